// Tokenizer-result reuse: the proxy renders and tokenizes a request once, and sends the engines
// token ids, so neither the prefill nor the decode instance tokenizes it again.
//
// tokenize_request() runs off the event loop (an nginx thread pool): it renders chats with the
// model's template, tokenizes every text input, and builds the body the engines get instead of
// the client's:
//  - completions with text prompts: `prompt` becomes token ids ([int], or [[int]] for a list);
//  - chat completions: the rendered conversation becomes a completions request with token ids
//    (`messages` replaced by `prompt` in place; chat-only members dropped; max_completion_tokens
//    becomes max_tokens); the engine's completions answer is converted back into a chat answer
//    (chat_response_from_completion, ChatStreamConverter), so the client sees the chat format
//    in content, usage, finish reasons and ids;
//  - SGLang /generate with `text`: `text` becomes `input_ids`.
// Requests whose meaning the conversion cannot keep are tokenized (for routing and the
// lifecycle) but forwarded as the client sent them, with the reason reported
// (ForwardReason): tools (the engine parses tool calls out of chat output), logprobs (their
// chat format differs), echo, continue_final_message, a request-supplied chat_template,
// reasoning_effort, non-text content parts.
// A request that already carries token ids is forwarded unchanged.
#pragma once

#include <omni/block_hash.hpp>
#include <omni/chat_template.hpp>
#include <omni/engine_metrics.hpp>
#include <omni/request_body.hpp>
#include <omni/tokenizer.hpp>

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace omni {

// How a request's tokens reached the engine; also the label of the forwarding metric.
enum class ForwardReason : std::uint8_t {
  kForwarded = 0,          // the engines got token ids
  kClientIds,              // the client sent token ids: forwarded unchanged
  kDisabled,               // forwarding is off for the location
  kTools,                  // chat with tools
  kLogprobs,               // chat with logprobs / top_logprobs
  kEcho,                   // chat with echo
  kContinueFinalMessage,   // chat with continue_final_message
  kCustomTemplate,         // chat with its own chat_template
  kReasoningEffort,        // chat with reasoning_effort
  kNonTextContent,         // chat with image/audio/... content parts
  kNoTemplate,             // chat, and the tokenizer has no chat template
  kCount
};
// "forwarded", "client_ids", "disabled", "tools", ...
std::string_view forward_reason_name(ForwardReason reason) noexcept;

struct ForwardingOptions {
  bool forward = true;  // omni_proxy_token_forwarding
  EngineFlavor engine = EngineFlavor::kVllm;
  jinja::RenderOptions render;
};

struct TokenizedRequest {
  // Token ids of each input item (one for a single prompt or a chat), as the engine sees them.
  std::vector<std::vector<TokenId>> ids;
  std::size_t prompt_tokens = 0;  // over all items
  ForwardReason reason = ForwardReason::kForwarded;
  // When reason is kForwarded: the body to send instead of the client's, and its API.
  std::optional<ParsedBody> upstream;
  std::string upstream_text;  // `upstream` serialized
  Api upstream_api = Api::kCompletions;
  // The client asked for a chat and the engines answer a completion: convert the answer.
  bool chat_to_completion = false;
};

// Renders and tokenizes `body` and decides what to forward. `chat` may be null (the tokenizer
// has no template). Errors: 400 when the template refuses the conversation (its own
// raise_exception message) or the messages cannot be rendered; 500 for an internal failure.
BodyResult<TokenizedRequest> tokenize_request(const ParsedBody& body, const Tokenizer& tokenizer,
                                              const ChatTemplate* chat,
                                              const ForwardingOptions& options);

// The chat answer for a completions answer (non-streamed): "cmpl-" ids become "chatcmpl-",
// object "chat.completion", each choice's `text` becomes `message` {role, content, ...}; every
// other member is kept in place. A body that is not a completions answer (an error) is
// returned unchanged.
std::string chat_response_from_completion(std::string_view body, EngineFlavor engine);

// The same for a streamed answer, event by event: each `data: {...}` completion chunk becomes a
// chat.completion.chunk (a first chunk per choice carries delta {role: "assistant", content:
// ""}, as the engines' own chat streams do); `data: [DONE]`, comments and non-JSON events pass
// unchanged. Input may be split anywhere; output is whole events.
class ChatStreamConverter {
 public:
  explicit ChatStreamConverter(EngineFlavor engine) : engine_(engine) {}
  // Appends the converted form of the complete events in `data` to `out`; keeps the rest.
  void feed(std::string_view data, std::string& out);
  // End of the stream: whatever is left (an unterminated event) goes out unchanged.
  void finish(std::string& out);
  // Bytes held waiting for the end of an event.
  std::size_t pending() const noexcept { return buffer_.size(); }

 private:
  void convert_event(std::string_view event, std::string& out);
  EngineFlavor engine_;
  std::string buffer_;
  std::vector<bool> role_sent_;
};

}  // namespace omni
