#include <omni/token_forwarding.hpp>

#include <omni/openai_error.hpp>

#include <array>
#include <exception>
#include <utility>

namespace omni {

using ojson = nlohmann::ordered_json;

std::string_view forward_reason_name(ForwardReason reason) noexcept {
  static constexpr std::array<std::string_view, static_cast<std::size_t>(ForwardReason::kCount)>
      kNames = {"forwarded",  "client_ids", "disabled",  "tools",
                "logprobs",   "echo",       "continue_final_message",
                "custom_chat_template",     "reasoning_effort",
                "non_text_content",         "no_chat_template"};
  const auto i = static_cast<std::size_t>(reason);
  return i < kNames.size() ? kNames[i] : std::string_view("unknown");
}

namespace {

bool is_set(const ojson& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && !it->is_null();
}

bool is_true(const ojson& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() && it->get<bool>();
}

bool flag(const ojson& j, const char* key, bool dflt) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() ? it->get<bool>() : dflt;
}

ojson ids_json(const std::vector<TokenId>& ids) {
  ojson a = ojson::array();
  a.get_ref<ojson::array_t&>().reserve(ids.size());
  for (TokenId id : ids) a.push_back(id);
  return a;
}

std::vector<TokenId> ids_of(const ojson& a) {
  std::vector<TokenId> out;
  out.reserve(a.size());
  for (const auto& v : a) out.push_back(static_cast<TokenId>(v.get<std::uint64_t>()));
  return out;
}

void count(TokenizedRequest& out) {
  out.prompt_tokens = 0;
  for (const auto& item : out.ids) out.prompt_tokens += item.size();
}

// The rewritten body: the client's features, updated for what changed (the API, the prompt now
// given as ids), and its serialization. Not parsed again: the ids are the tokenizer's, the rest
// of the document was validated with the client's body.
ParsedBody rewritten(Api api, ojson doc, const BodyFeatures& client,
                     const std::vector<std::vector<TokenId>>& ids, std::string& text) {
  text = doc.dump(-1, ' ', false, ojson::error_handler_t::replace);
  ParsedBody out;
  out.json = std::move(doc);
  out.features = client;
  out.features.api = api;
  out.features.has_token_ids = true;
  out.features.prompt_chars = 0;
  out.features.prompt_token_ids = 0;
  for (const auto& item : ids) out.features.prompt_token_ids += item.size();
  out.features.has_max_completion_tokens =
      client.has_max_completion_tokens && api == client.api;
  return out;
}

// Text inputs: a string, or a list mixing strings and id lists. `key` is "prompt" or "text".
void tokenize_texts(const ojson& input, const Tokenizer& tokenizer, bool add_special,
                    TokenizedRequest& out) {
  if (input.is_string()) {
    out.ids.push_back(tokenizer.encode(input.get_ref<const std::string&>(), add_special));
    return;
  }
  for (const auto& item : input) {
    if (item.is_string()) {
      out.ids.push_back(tokenizer.encode(item.get_ref<const std::string&>(), add_special));
    } else {
      out.ids.push_back(ids_of(item));
    }
  }
}

// `input` replaced by `ids` under `new_key`, at the same position; `drop` members removed.
ojson with_ids(const ojson& doc, const char* key, const char* new_key, bool list,
               const std::vector<std::vector<TokenId>>& ids,
               std::initializer_list<const char*> drop) {
  ojson out = ojson::object();
  for (const auto& [k, v] : doc.items()) {
    bool dropped = false;
    for (const char* d : drop) dropped = dropped || k == d;
    if (dropped) continue;
    if (k == key) {
      if (list) {
        ojson a = ojson::array();
        for (const auto& item : ids) a.push_back(ids_json(item));
        out[new_key] = std::move(a);
      } else {
        out[new_key] = ids_json(ids.front());
      }
      continue;
    }
    out[k] = v;
  }
  return out;
}

BodyResult<TokenizedRequest> tokenize_completion(const ParsedBody& body,
                                                 const Tokenizer& tokenizer,
                                                 const ForwardingOptions& options) {
  TokenizedRequest out;
  const ojson& doc = body.json;
  const ojson& prompt = doc["prompt"];
  if (prompt.is_array() && !prompt.empty() && prompt[0].is_number_integer()) {
    out.ids.push_back(ids_of(prompt));
    out.reason = ForwardReason::kClientIds;
    count(out);
    return out;
  }
  // vLLM tokenizes completion prompts with add_special_tokens true unless told otherwise.
  tokenize_texts(prompt, tokenizer, flag(doc, "add_special_tokens", true), out);
  count(out);
  bool any_text = prompt.is_string();
  for (const auto& item : prompt) any_text = any_text || item.is_string();
  if (!any_text) {
    out.reason = ForwardReason::kClientIds;
    return out;
  }
  if (!options.forward) {
    out.reason = ForwardReason::kDisabled;
    return out;
  }
  out.upstream.emplace(rewritten(Api::kCompletions,
                                with_ids(doc, "prompt", "prompt", prompt.is_array(), out.ids,
                                         {"add_special_tokens"}),
                                body.features, out.ids, out.upstream_text));
  out.upstream_api = Api::kCompletions;
  return out;
}

BodyResult<TokenizedRequest> tokenize_generate(const ParsedBody& body,
                                               const Tokenizer& tokenizer,
                                               const ForwardingOptions& options) {
  TokenizedRequest out;
  const ojson& doc = body.json;
  if (!is_set(doc, "text")) {
    const ojson& ids = doc["input_ids"];
    if (!ids.empty() && ids[0].is_array()) {
      for (const auto& item : ids) out.ids.push_back(ids_of(item));
    } else {
      out.ids.push_back(ids_of(ids));
    }
    out.reason = ForwardReason::kClientIds;
    count(out);
    return out;
  }
  // SGLang's /generate tokenizes text with the tokenizer's defaults (special tokens added).
  const ojson& text = doc["text"];
  tokenize_texts(text, tokenizer, true, out);
  count(out);
  if (!options.forward) {
    out.reason = ForwardReason::kDisabled;
    return out;
  }
  out.upstream.emplace(rewritten(Api::kGenerate,
                                with_ids(doc, "text", "input_ids", text.is_array(), out.ids, {}),
                                body.features, out.ids, out.upstream_text));
  out.upstream_api = Api::kGenerate;
  return out;
}

// Chat members a completions request does not take, dropped when converting.
constexpr const char* kChatOnly[] = {
    "messages",         "add_generation_prompt", "continue_final_message",
    "chat_template_kwargs", "documents",         "tools",
    "tool_choice",      "parallel_tool_calls",   "add_special_tokens",
    "echo",             "logprobs",              "top_logprobs",
    "chat_template",    "reasoning_effort",      "functions",
    "function_call",    "max_completion_tokens", "max_tokens",
    "mm_processor_kwargs", "include_reasoning"};

ojson chat_as_completion(const ojson& doc, const std::vector<TokenId>& ids) {
  // max_completion_tokens wins over max_tokens, as in the engines' chat endpoints.
  ojson max_tokens = nullptr;
  if (is_set(doc, "max_completion_tokens")) {
    max_tokens = doc["max_completion_tokens"];
  } else if (is_set(doc, "max_tokens")) {
    max_tokens = doc["max_tokens"];
  }
  ojson out = ojson::object();
  bool max_placed = false;
  for (const auto& [k, v] : doc.items()) {
    if (k == "messages") {
      out["prompt"] = ids_json(ids);
      continue;
    }
    if ((k == "max_tokens" || k == "max_completion_tokens") && !max_placed &&
        !max_tokens.is_null()) {
      out["max_tokens"] = max_tokens;
      max_placed = true;
      continue;
    }
    bool chat_only = false;
    for (const char* c : kChatOnly) chat_only = chat_only || k == c;
    if (!chat_only) out[k] = v;
  }
  return out;
}

BodyResult<TokenizedRequest> tokenize_chat(const ParsedBody& body, const Tokenizer& tokenizer,
                                           const ChatTemplate* chat,
                                           const ForwardingOptions& options) {
  TokenizedRequest out;
  const ojson& doc = body.json;
  if (chat == nullptr) {
    out.reason = ForwardReason::kNoTemplate;
    return out;
  }
  // Rendered here only with the model's own template and the plain chat semantics.
  if (is_set(doc, "chat_template")) {
    out.reason = ForwardReason::kCustomTemplate;
    return out;
  }
  if (is_true(doc, "continue_final_message")) {
    out.reason = ForwardReason::kContinueFinalMessage;
    return out;
  }
  if (is_set(doc, "chat_template_kwargs") && !doc["chat_template_kwargs"].is_object()) {
    return BodyError{400, "chat_template_kwargs must be an object", "chat_template_kwargs", {}};
  }
  std::string why;
  std::optional<ChatPrompt> prompt;
  try {
    prompt = encode_chat_request(doc, *chat, tokenizer, why, options.render);
  } catch (const jinja::RenderError& e) {
    return BodyError{400, std::string("the chat template refused the conversation: ") + e.what(),
                     "messages", {}};
  }
  if (!prompt) {
    out.reason = ForwardReason::kNonTextContent;
    return out;
  }
  out.ids.push_back(std::move(prompt->ids));
  count(out);
  if ((is_set(doc, "tools") && !(doc["tools"].is_array() && doc["tools"].empty())) ||
      is_set(doc, "functions") || is_set(doc, "function_call")) {
    out.reason = ForwardReason::kTools;
  } else if (is_true(doc, "logprobs") || is_set(doc, "top_logprobs")) {
    out.reason = ForwardReason::kLogprobs;
  } else if (is_true(doc, "echo")) {
    out.reason = ForwardReason::kEcho;
  } else if (is_set(doc, "reasoning_effort")) {
    out.reason = ForwardReason::kReasoningEffort;
  } else if (!options.forward) {
    out.reason = ForwardReason::kDisabled;
  }
  if (out.reason != ForwardReason::kForwarded) return out;
  out.upstream.emplace(rewritten(Api::kCompletions, chat_as_completion(doc, out.ids.front()),
                                body.features, out.ids, out.upstream_text));
  out.upstream_api = Api::kCompletions;
  out.chat_to_completion = true;
  return out;
}

}  // namespace

BodyResult<TokenizedRequest> tokenize_request(const ParsedBody& body, const Tokenizer& tokenizer,
                                              const ChatTemplate* chat,
                                              const ForwardingOptions& options) {
  try {
    switch (body.features.api) {
      case Api::kCompletions: return tokenize_completion(body, tokenizer, options);
      case Api::kGenerate: return tokenize_generate(body, tokenizer, options);
      case Api::kChatCompletions: return tokenize_chat(body, tokenizer, chat, options);
    }
    return BodyError{500, "unknown API", {}, {}};
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& e) {
    return BodyError{500, std::string("tokenizing the request failed: ") + e.what(), {}, {}};
  }
}

// --- Answers ----------------------------------------------------------------------------------

namespace {

void chat_id(ojson& doc) {
  auto it = doc.find("id");
  if (it == doc.end() || !it->is_string()) return;
  const std::string& id = it->get_ref<const std::string&>();
  if (id.starts_with("cmpl-")) *it = "chat" + id;
}

ojson message_of(const ojson& text, EngineFlavor engine) {
  ojson m = ojson::object();
  m["role"] = "assistant";
  m["content"] = text.is_string() ? text : ojson("");
  m["reasoning_content"] = nullptr;
  m["tool_calls"] = engine == EngineFlavor::kVllm ? ojson::array() : ojson(nullptr);
  return m;
}

// A completion choice as a chat choice: `text` becomes `message` (or `delta` in a stream).
ojson chat_choice(const ojson& choice, EngineFlavor engine, bool stream) {
  if (!choice.is_object()) return choice;
  ojson out = ojson::object();
  for (const auto& [k, v] : choice.items()) {
    if (k == "text") {
      if (stream) {
        out["delta"] = ojson{{"content", v.is_string() ? v : ojson("")}};
      } else {
        out["message"] = message_of(v, engine);
      }
      continue;
    }
    if ((k == "prompt_logprobs" || k == "prompt_token_ids") && v.is_null()) continue;
    out[k] = v;
  }
  return out;
}

std::string dump(const ojson& j) { return j.dump(-1, ' ', false, ojson::error_handler_t::replace); }

bool is_completion(const ojson& doc) {
  auto it = doc.find("object");
  return doc.is_object() && it != doc.end() && *it == "text_completion";
}

}  // namespace

std::string chat_response_from_completion(std::string_view body, EngineFlavor engine) {
  ojson doc = ojson::parse(body, nullptr, false);
  if (doc.is_discarded() || !is_completion(doc)) return std::string(body);
  chat_id(doc);
  doc["object"] = "chat.completion";
  auto it = doc.find("choices");
  if (it != doc.end() && it->is_array()) {
    for (auto& c : *it) c = chat_choice(c, engine, false);
  }
  return dump(doc);
}

namespace {

// An event ends at a blank line ("\n\n" or "\r\n\r\n"); returns the end of the separator.
std::size_t event_end(std::string_view s, std::size_t& sep_len) {
  const std::size_t a = s.find("\n\n");
  const std::size_t b = s.find("\r\n\r\n");
  if (a == std::string_view::npos && b == std::string_view::npos) return std::string_view::npos;
  if (b != std::string_view::npos && (a == std::string_view::npos || b < a)) {
    sep_len = 4;
    return b;
  }
  sep_len = 2;
  return a;
}

// Larger events are passed through unconverted rather than held without bound.
constexpr std::size_t kMaxEvent = std::size_t{32} << 20;

}  // namespace

void ChatStreamConverter::feed(std::string_view data, std::string& out) {
  buffer_.append(data);
  std::size_t pos = 0;
  for (;;) {
    std::size_t sep = 0;
    const std::size_t end = event_end(std::string_view(buffer_).substr(pos), sep);
    if (end == std::string_view::npos) break;
    convert_event(std::string_view(buffer_).substr(pos, end + sep), out);
    pos += end + sep;
  }
  buffer_.erase(0, pos);
  if (buffer_.size() > kMaxEvent) {
    out += buffer_;
    buffer_.clear();
  }
}

void ChatStreamConverter::finish(std::string& out) {
  out += buffer_;
  buffer_.clear();
}

void ChatStreamConverter::convert_event(std::string_view event, std::string& out) {
  // Engines send one `data:` line per event.
  std::string_view line = event;
  while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.remove_suffix(1);
  if (!line.starts_with("data:") || line.find('\n') != std::string_view::npos) {
    out += event;
    return;
  }
  std::string_view payload = line.substr(5);
  if (payload.starts_with(' ')) payload.remove_prefix(1);
  ojson doc = ojson::parse(payload, nullptr, false);
  if (doc.is_discarded() || !is_completion(doc)) {
    out += event;
    return;
  }
  chat_id(doc);
  doc["object"] = "chat.completion.chunk";
  auto it = doc.find("choices");
  if (it != doc.end() && it->is_array()) {
    for (auto& c : *it) {
      // The engines' chat streams open each choice with a role-only delta.
      const std::size_t index =
          c.is_object() && c.contains("index") && c["index"].is_number_unsigned()
              ? c["index"].get<std::size_t>()
              : 0;
      if (index < 4096 && (index >= role_sent_.size() || !role_sent_[index])) {
        if (index >= role_sent_.size()) role_sent_.resize(index + 1, false);
        role_sent_[index] = true;
        ojson head = doc;
        ojson role_choice = chat_choice(c, engine_, true);
        role_choice["delta"] = ojson{{"role", "assistant"}, {"content", ""}};
        if (role_choice.contains("logprobs")) role_choice["logprobs"] = nullptr;
        role_choice["finish_reason"] = nullptr;
        if (role_choice.contains("stop_reason")) role_choice["stop_reason"] = nullptr;
        head["choices"] = ojson::array({std::move(role_choice)});
        head.erase("usage");
        out += "data: " + dump(head) + "\n\n";
      }
      c = chat_choice(c, engine_, true);
    }
  }
  out += "data: " + dump(doc) + "\n\n";
}

}  // namespace omni
