// A model's chat template, applied the way the reference stacks apply it.
//
// The template is rendered (omni/jinja.hpp) with the variables `apply_chat_template` gives it in
// Hugging Face transformers and transformers.js: `messages`, `add_generation_prompt`, `tools`
// (null when the request has none), `documents` (null), the special tokens the tokenizer config
// names (`bos_token`, `eos_token`, `pad_token`, `unk_token`, each only when set), and then the
// request's `chat_template_kwargs` (e.g. Qwen3's `enable_thinking`), which may override any of
// them. The rendered prompt is then tokenized without adding special tokens (the template
// writes them), as vLLM and SGLang do for chat requests.
//
// Objects keep their key order throughout (nlohmann::ordered_json), as JavaScript and Python do:
// `tools | tojson` must print a tool's keys in the order the client sent them.
//
// Message contents given as arrays of text parts are joined with "\n" first, as vLLM does for
// templates that take string contents; parts of any other type (images, audio) are not
// rendered here (normalize_messages reports them).
#pragma once

#include <omni/jinja.hpp>
#include <omni/tokenizer.hpp>

#include <nlohmann/json.hpp>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace omni {

class ChatTemplate {
 public:
  // Parses `source`; throws jinja::TemplateError naming what is unsupported.
  ChatTemplate(std::string_view source, const TokenizerConfigInfo& tokens);

  // Renders a conversation. `messages` must already be normalized (normalize_messages);
  // `tools` and `kwargs` may be null. Throws jinja::RenderError (for instance the template's
  // own raise_exception, "Conversation roles must alternate ...").
  std::string render(const nlohmann::ordered_json& messages, const nlohmann::ordered_json& tools,
                     bool add_generation_prompt, const nlohmann::ordered_json& kwargs,
                     const jinja::RenderOptions& options = {}) const;

 private:
  jinja::Template template_;
  nlohmann::ordered_json base_;  // the special tokens
};

// An OpenAI `messages` array as the template sees it: text-part arrays joined with "\n".
// Returns nullopt, and sets `why`, when a message carries content the template cannot render
// as text (a non-text part, a part without a string `text`).
std::optional<nlohmann::ordered_json> normalize_messages(const nlohmann::ordered_json& messages,
                                                         std::string& why);

struct ChatPrompt {
  std::string text;          // the rendered conversation
  std::vector<TokenId> ids;  // its tokens
};

// The prompt of a chat request (an OpenAI chat completions body), as vLLM builds it: `messages`
// normalized, rendered with the request's `tools`, `add_generation_prompt` (default true) and
// `chat_template_kwargs`, then encoded with its `add_special_tokens` (default false: the template
// writes the special tokens). Returns nullopt, with `why`, for messages the template cannot see
// as text (normalize_messages); throws jinja::RenderError when the template refuses them.
std::optional<ChatPrompt> encode_chat_request(const nlohmann::ordered_json& request,
                                              const ChatTemplate& chat, const Tokenizer& tokenizer,
                                              std::string& why,
                                              const jinja::RenderOptions& options = {});

}  // namespace omni
