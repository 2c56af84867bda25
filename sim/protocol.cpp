#include "protocol.hpp"

#include <omni/jinja.hpp>
#include <omni/openai_error.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <ctime>

namespace omni::sim {

using nlohmann::json;
using ojson = nlohmann::ordered_json;

Protocol::Protocol(EngineKind kind, std::string served_model, std::uint32_t max_model_len,
                   std::uint32_t default_max_tokens,
                   std::shared_ptr<const ModelTokenizer> tokenizer)
    : kind_(kind),
      model_(std::move(served_model)),
      max_model_len_(max_model_len),
      default_max_tokens_(default_max_tokens),
      model_tok_(std::move(tokenizer)),
      vocab_size_(model_tok_ ? model_tok_->vocab_size() : std::size_t{SimTokenizer::kVocabSize}) {}

std::string Protocol::error_body(Api api, int status, std::string_view message,
                                 std::string_view type, std::string_view param) const {
  if (kind_ == EngineKind::kSglang) {
    if (api == Api::kGenerate) {
      return json{{"error", {{"message", std::string(message)}}}}.dump(
          -1, ' ', false, json::error_handler_t::replace);
    }
    json j = {{"object", "error"},
              {"message", std::string(message)},
              {"type", std::string(type.empty() ? error_type_for_status(status) : type)},
              {"param", param.empty() ? json(nullptr) : json(std::string(param))},
              {"code", status}};
    return j.dump(-1, ' ', false, json::error_handler_t::replace);
  }
  return openai_error_body(status, message, type, param);
}

std::string Protocol::models_body(std::int64_t created) const {
  json model = {{"id", model_},
                {"object", "model"},
                {"created", created},
                {"owned_by", kind_ == EngineKind::kVllm ? "vllm" : "sglang"},
                {"root", model_},
                {"parent", nullptr},
                {"max_model_len", max_model_len_}};
  return json{{"object", "list"}, {"data", json::array({model})}}.dump();
}

namespace {

// A validation failure in vLLM's shape: 400, type "Bad Request", param = location.
struct Invalid {
  std::string message;
  std::string param;
};

bool as_token_ids(const json& j, std::size_t vocab_size, std::vector<TokenId>& out,
                  std::string& why) {
  out.clear();
  out.reserve(j.size());
  for (const auto& v : j) {
    if (!v.is_number_integer()) {
      why = "token ids must be integers";
      return false;
    }
    // (An unsigned id above INT64_MAX reads as negative: out of vocabulary either way.)
    const auto id = v.get<std::int64_t>();
    if (id < 0 || static_cast<std::uint64_t>(id) >= vocab_size) {
      why = "Token id " + std::to_string(id) + " is out of vocabulary";
      return false;
    }
    out.push_back(static_cast<TokenId>(id));
  }
  return true;
}

// A bool member, or `dflt` when it is absent or not a bool (as the proxy reads it).
bool flag(const json& j, const char* key, bool dflt) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() ? it->get<bool>() : dflt;
}

std::uint64_t thread_cpu_ns() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000'000ULL +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

// Adds the calling thread's CPU time and the wall time of its scope to the counters (on every
// exit: a prompt the template refuses cost CPU too); done() also counts the prompt.
class TokenizeTimer {
 public:
  explicit TokenizeTimer(TokenizeCounters& c) noexcept
      : c_(c), cpu0_(thread_cpu_ns()), wall0_(std::chrono::steady_clock::now()) {}
  ~TokenizeTimer() {
    const std::uint64_t cpu = thread_cpu_ns() - cpu0_;
    const auto wall = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now() - wall0_)
                          .count();
    c_.cpu_ns.fetch_add(cpu, std::memory_order_relaxed);
    c_.wall_ns.fetch_add(static_cast<std::uint64_t>(std::max<std::int64_t>(wall, 0)),
                         std::memory_order_relaxed);
  }
  TokenizeTimer(const TokenizeTimer&) = delete;
  TokenizeTimer& operator=(const TokenizeTimer&) = delete;
  void done(std::size_t tokens) noexcept {
    c_.prompts.fetch_add(1, std::memory_order_relaxed);
    c_.tokens.fetch_add(tokens, std::memory_order_relaxed);
  }

 private:
  TokenizeCounters& c_;
  std::uint64_t cpu0_;
  std::chrono::steady_clock::time_point wall0_;
};

// vLLM's answer to a chat request for a model without a chat template.
constexpr const char* kNoChatTemplate =
    "As of transformers v4.44, default chat template is no longer allowed, so you must provide "
    "a chat template if the tokenizer does not define one.";

}  // namespace

std::vector<TokenId> Protocol::encode_text(const std::string& text,
                                           bool add_special_tokens) const {
  TokenizeTimer timer(counters_);
  std::vector<TokenId> ids = model_tok_ ? model_tok_->tokenizer().encode(text, add_special_tokens)
                                        : tokenizer_.encode(text);
  timer.done(ids.size());
  return ids;
}

std::optional<ProtocolError> Protocol::encode_model_chat(const json& j, std::string_view body,
                                                         ParsedRequest& out) const {
  const Api api = Api::kChatCompletions;
  auto invalid = [&](const std::string& msg, const std::string& param) {
    return error(api, 400, "1 validation error:\n  " + param + ": " + msg, "Bad Request",
                 param);
  };
  const json& messages = j["messages"];
  if (!messages.is_array()) return invalid("Input should be a valid list", "body.messages");
  if (j.contains("add_generation_prompt") && !j["add_generation_prompt"].is_null() &&
      !j["add_generation_prompt"].is_boolean()) {
    return invalid("Input should be a valid boolean", "body.add_generation_prompt");
  }
  if (j.contains("chat_template_kwargs") && !j["chat_template_kwargs"].is_null() &&
      !j["chat_template_kwargs"].is_object()) {
    return invalid("Input should be a valid dictionary", "body.chat_template_kwargs");
  }
  const ChatTemplate* chat = model_tok_->chat_template();
  if (chat == nullptr) return error(api, 400, kNoChatTemplate, "BadRequestError");

  // The template sees objects in the client's key order (`tools | tojson`): the members it
  // renders are read again from the body, order kept. (Not measured: vLLM parses the body
  // once, and parsing is not tokenizing.)
  const ojson doc = ojson::parse(body, nullptr, /*allow_exceptions=*/false);
  if (!doc.is_object()) {
    return error(api, 500, "internal error: the body does not parse again", "InternalServerError");
  }
  std::string why;
  std::optional<ChatPrompt> prompt;
  {
    TokenizeTimer timer(counters_);
    try {
      prompt = encode_chat_request(doc, *chat, model_tok_->tokenizer(), why);
    } catch (const jinja::RenderError& e) {
      return error(api, 400, e.what(), "BadRequestError");
    }
    if (prompt) timer.done(prompt->ids.size());
  }
  if (!prompt) return invalid(why, "body.messages");
  out.prompts.push_back(std::move(prompt->ids));
  return std::nullopt;
}

std::optional<ProtocolError> Protocol::check_lengths(Api api, const ParsedRequest& r) const {
  for (const auto& p : r.prompts) {
    if (p.empty()) return error(api, 400, "The prompt cannot be empty.", "BadRequestError");
    // Without max_tokens, vLLM fills the context: only the prompt itself must fit.
    const std::uint64_t out_tokens =
        r.max_tokens_given || api == Api::kGenerate ? r.max_tokens : 1;
    const std::uint64_t total = p.size() + out_tokens;
    if (p.size() >= max_model_len_ || total > max_model_len_) {
      const std::string msg =
          "This model's maximum context length is " + std::to_string(max_model_len_) +
          " tokens. However, you requested " + std::to_string(out_tokens) +
          " output tokens and your prompt contains at least " + std::to_string(p.size()) +
          " input tokens, for a total of at least " + std::to_string(total) +
          " tokens. Please reduce the length of the input prompt or the number of requested "
          "output tokens. (parameter=input_tokens, value=" + std::to_string(p.size()) + ")";
      return error(api, 400, msg, "BadRequestError", "input_tokens");
    }
  }
  return std::nullopt;
}

std::variant<ParsedRequest, ProtocolError> Protocol::parse(Api api, std::string_view body) const {
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return error(api, 400, "1 validation error:\n  JSON decode error: the body is not valid JSON",
                 "Bad Request", "body");
  }
  if (!j.is_object()) {
    return error(api, 400, "1 validation error:\n  Input should be a valid dictionary or object",
                 "Bad Request", "body");
  }
  ParsedRequest out;
  out.api = api;
  std::optional<ProtocolError> err =
      api == Api::kGenerate ? parse_generate(j, out) : parse_openai(api, j, body, out);
  if (err) return *err;
  if (auto e = parse_bootstrap(api, j, out)) return *e;
  if (out.n > 1 && !out.bootstrap.empty()) {
    // SGLang would send every sample of a prompt to the same bootstrap room.
    return error(api, 400,
                 "Parallel sampling (n > 1) is not supported with bootstrap_room in omni-sim.");
  }
  if (auto e = check_lengths(api, out)) return *e;
  return out;
}

std::optional<ProtocolError> Protocol::parse_openai(Api api, const json& j,
                                                    std::string_view body,
                                                    ParsedRequest& out) const {
  auto invalid = [&](const std::string& msg, const std::string& param) {
    return error(api, 400, "1 validation error:\n  " + param + ": " + msg, "Bad Request",
                 param);
  };
  if (j.contains("model") && !j["model"].is_null()) {
    if (!j["model"].is_string()) return invalid("Input should be a valid string", "body.model");
    if (j["model"].get<std::string>() != model_) {
      return error(api, 404, "The model `" + j["model"].get<std::string>() + "` does not exist.",
                   "NotFoundError", "model");
    }
  }
  if (api == Api::kCompletions) {
    if (!j.contains("prompt")) return invalid("Field required", "body.prompt");
    const json& p = j["prompt"];
    std::string why;
    // vLLM tokenizes completions prompts with special tokens unless told otherwise.
    const bool add_special = flag(j, "add_special_tokens", true);
    if (p.is_string()) {
      out.prompts.push_back(encode_text(p.get_ref<const std::string&>(), add_special));
    } else if (p.is_array() && !p.empty() && p[0].is_number_integer()) {
      std::vector<TokenId> ids;
      if (!as_token_ids(p, vocab_size_, ids, why)) return invalid(why, "body.prompt");
      out.prompts.push_back(std::move(ids));
    } else if (p.is_array() && !p.empty()) {
      out.batch = true;
      for (const auto& item : p) {
        if (item.is_string()) {
          out.prompts.push_back(encode_text(item.get_ref<const std::string&>(), add_special));
        } else if (item.is_array()) {
          std::vector<TokenId> ids;
          if (!as_token_ids(item, vocab_size_, ids, why)) return invalid(why, "body.prompt");
          out.prompts.push_back(std::move(ids));
        } else {
          return invalid("Input should be a string or a list of token ids", "body.prompt");
        }
      }
    } else {
      return invalid("Input should be a non-empty string, list of token ids or list of prompts",
                     "body.prompt");
    }
  } else {
    if (!j.contains("messages")) return invalid("Field required", "body.messages");
    if (model_tok_) {
      if (auto e = encode_model_chat(j, body, out)) return e;
    } else {
      try {
        const bool gen_prompt = j.value("add_generation_prompt", true);
        TokenizeTimer timer(counters_);
        out.prompts.push_back(tokenizer_.encode_chat(j["messages"], gen_prompt));
        timer.done(out.prompts.back().size());
      } catch (const std::exception& e) {
        return invalid(e.what(), "body.messages");
      }
    }
  }

  for (const char* key : {"max_tokens", "max_completion_tokens"}) {
    if (!j.contains(key) || j[key].is_null()) continue;
    if (!j[key].is_number_integer()) {
      return invalid("Input should be a valid integer", std::string("body.") + key);
    }
    const auto v = j[key].get<std::int64_t>();
    if (v < 1) {
      return error(api, 400, std::string(key) + " must be at least 1, got " + std::to_string(v) +
                                 ".", "BadRequestError", key);
    }
    out.max_tokens = static_cast<std::uint32_t>(std::min<std::int64_t>(v, UINT32_MAX));
    out.max_tokens_given = true;
  }
  if (!out.max_tokens_given) out.max_tokens = default_max_tokens_;
  if (j.contains("n") && !j["n"].is_null()) {
    const json& n = j["n"];
    if (!n.is_number_integer()) return invalid("Input should be a valid integer", "body.n");
    const std::int64_t v = n.is_number_unsigned()
                               ? static_cast<std::int64_t>(std::min<std::uint64_t>(
                                     n.get<std::uint64_t>(), INT64_MAX))
                               : n.get<std::int64_t>();
    if (v < 1) {
      return error(api, 400, "n must be at least 1, got " + std::to_string(v) + ".",
                   "BadRequestError", "n");
    }
    if (v > kMaxN) {
      return error(api, 400, "n must be at most " + std::to_string(kMaxN) + " in omni-sim, got " +
                                 std::to_string(v) + ".", "BadRequestError", "n");
    }
    out.n = static_cast<std::uint32_t>(v);
  }
  if (j.contains("stream") && !j["stream"].is_null()) {
    if (!j["stream"].is_boolean()) return invalid("Input should be a valid boolean", "body.stream");
    out.stream = j["stream"].get<bool>();
  }
  if (j.contains("stream_options") && !j["stream_options"].is_null()) {
    if (!out.stream) {
      return error(api, 400, "Stream options can only be defined when `stream=True`.",
                   "BadRequestError", "stream_options");
    }
    const json& so = j["stream_options"];
    if (!so.is_object()) {
      return invalid("Input should be a valid dictionary", "body.stream_options");
    }
    // (json::value() would throw on a non-boolean, out of the request handler.)
    if (so.contains("include_usage") && !so["include_usage"].is_null()) {
      if (!so["include_usage"].is_boolean()) {
        return invalid("Input should be a valid boolean", "body.stream_options.include_usage");
      }
      out.include_usage = so["include_usage"].get<bool>();
    }
  }
  if (j.contains("min_tokens") && j["min_tokens"].is_number_integer() &&
      j["min_tokens"].get<std::int64_t>() > static_cast<std::int64_t>(out.max_tokens)) {
    return error(api, 400, "min_tokens must be less than or equal to max_tokens.",
                 "BadRequestError", "min_tokens");
  }
  if (j.contains("kv_transfer_params") && !j["kv_transfer_params"].is_null()) {
    if (!j["kv_transfer_params"].is_object()) {
      return invalid("Input should be a valid dictionary", "body.kv_transfer_params");
    }
    if (out.prompts.size() != 1) {
      return error(api, 400, "kv_transfer_params needs a single prompt.", "BadRequestError",
                   "kv_transfer_params");
    }
    out.kv_transfer_params = j["kv_transfer_params"];
  }
  return std::nullopt;
}

std::optional<ProtocolError> Protocol::parse_generate(const json& j, ParsedRequest& out) const {
  const Api api = Api::kGenerate;
  const bool has_text = j.contains("text") && !j["text"].is_null();
  const bool has_ids = j.contains("input_ids") && !j["input_ids"].is_null();
  if (has_text == has_ids) {
    return error(api, 400, "Either text or input_ids should be provided.");
  }
  std::string why;
  if (has_text) {
    const json& t = j["text"];
    // SGLang tokenizes /generate text with the tokenizer's defaults: special tokens added.
    if (t.is_string()) {
      out.prompts.push_back(encode_text(t.get_ref<const std::string&>(), true));
    } else if (t.is_array() && !t.empty()) {
      out.batch = true;
      for (const auto& item : t) {
        if (!item.is_string()) return error(api, 400, "text must be a string or list of strings");
        out.prompts.push_back(encode_text(item.get_ref<const std::string&>(), true));
      }
    } else {
      return error(api, 400, "text must be a string or a non-empty list of strings");
    }
  } else {
    const json& ids = j["input_ids"];
    if (!ids.is_array() || ids.empty()) {
      return error(api, 400, "input_ids must be a non-empty list");
    }
    if (ids[0].is_array()) {
      out.batch = true;
      for (const auto& item : ids) {
        std::vector<TokenId> v;
        if (!item.is_array() || !as_token_ids(item, vocab_size_, v, why)) {
          return error(api, 400, why.empty() ? "input_ids items must be lists of ints" : why);
        }
        out.prompts.push_back(std::move(v));
      }
    } else {
      std::vector<TokenId> v;
      if (!as_token_ids(ids, vocab_size_, v, why)) return error(api, 400, why);
      out.prompts.push_back(std::move(v));
    }
  }
  out.max_tokens = 128;  // SGLang's default max_new_tokens
  if (j.contains("sampling_params") && !j["sampling_params"].is_null()) {
    const json& sp = j["sampling_params"];
    if (!sp.is_object()) return error(api, 400, "sampling_params must be an object");
    if (sp.contains("max_new_tokens") && !sp["max_new_tokens"].is_null()) {
      if (!sp["max_new_tokens"].is_number_integer() ||
          sp["max_new_tokens"].get<std::int64_t>() < 1) {
        return error(api, 400, "max_new_tokens must be a positive integer");
      }
      out.max_tokens = static_cast<std::uint32_t>(
          std::min<std::int64_t>(sp["max_new_tokens"].get<std::int64_t>(), UINT32_MAX));
    }
    if (sp.contains("n") && !sp["n"].is_null()) {
      if (!sp["n"].is_number_integer() || sp["n"].get<std::int64_t>() < 1 ||
          sp["n"].get<std::int64_t>() > kMaxN) {
        return error(api, 400,
                     "n must be a positive integer (at most " + std::to_string(kMaxN) +
                         " in omni-sim)");
      }
      out.n = static_cast<std::uint32_t>(sp["n"].get<std::int64_t>());
    }
    out.max_tokens_given = true;
  }
  if (j.contains("stream") && !j["stream"].is_null()) {
    if (!j["stream"].is_boolean()) return error(api, 400, "stream must be a boolean");
    out.stream = j["stream"].get<bool>();
  }
  if (j.contains("rid") && j["rid"].is_string()) out.rid = j["rid"].get<std::string>();
  return std::nullopt;
}

std::optional<ProtocolError> Protocol::parse_bootstrap(Api api, const json& j,
                                                       ParsedRequest& out) const {
  if (kind_ != EngineKind::kSglang) return std::nullopt;
  const bool any = j.contains("bootstrap_room") || j.contains("bootstrap_host") ||
                   j.contains("bootstrap_port");
  if (!any) return std::nullopt;
  for (const char* key : {"bootstrap_room", "bootstrap_host", "bootstrap_port"}) {
    if (!j.contains(key) || j[key].is_null()) {
      return error(api, 400, std::string(key) + " is required with the other bootstrap fields");
    }
  }
  const std::size_t n = out.prompts.size();
  auto item = [&](const char* key, std::size_t i) -> const json* {
    const json& v = j[key];
    if (out.batch) {
      if (!v.is_array() || v.size() != n) return nullptr;
      return &v[i];
    }
    return v.is_array() ? nullptr : &v;
  };
  for (std::size_t i = 0; i < n; ++i) {
    const json* room = item("bootstrap_room", i);
    const json* host = item("bootstrap_host", i);
    const json* port = item("bootstrap_port", i);
    if (room == nullptr || host == nullptr || port == nullptr) {
      return error(api, 400,
                   out.batch ? "bootstrap fields must be lists with one entry per batch item"
                             : "bootstrap fields must be scalars for a single request");
    }
    const bool room_ok = room->is_number_unsigned()
                             ? room->get<std::uint64_t>() <= static_cast<std::uint64_t>(INT64_MAX)
                             : room->is_number_integer() && room->get<std::int64_t>() >= 0;
    if (!room_ok) {
      return error(api, 400, "bootstrap_room must be an integer in [0, 2^63-1]");
    }
    if (!host->is_string() || !port->is_number_integer() || port->get<std::int64_t>() <= 0 ||
        port->get<std::int64_t>() > 65535) {
      return error(api, 400, "bootstrap_host must be a string and bootstrap_port a port number");
    }
    out.bootstrap.push_back(BootstrapInfo{host->get<std::string>(),
                                          static_cast<std::uint16_t>(port->get<std::int64_t>()),
                                          room->get<std::uint64_t>()});
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

void append_json_string(std::string& out, std::string_view s) {
  out.push_back('"');
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out.push_back(static_cast<char>(c));
        }
    }
  }
  out.push_back('"');
}

namespace {

json usage_json(std::uint64_t prompt, std::uint64_t completion, std::uint64_t cached) {
  return {{"prompt_tokens", prompt},
          {"total_tokens", prompt + completion},
          {"completion_tokens", completion},
          {"prompt_tokens_details", {{"cached_tokens", cached}}}};
}

}  // namespace

std::string openai_response(Api api, const ResponseMeta& meta,
                            const std::vector<ChoiceResult>& choices,
                            const json* kv_transfer_params) {
  json out_choices = json::array();
  std::uint64_t prompt = 0, completion = 0, cached = 0;
  for (std::size_t i = 0; i < choices.size(); ++i) {
    const auto& c = choices[i];
    if (c.sample == 0) {
      prompt += c.prompt_tokens;
      cached += c.cached_tokens;
    }
    completion += c.output_ids.size();
    if (api == Api::kChatCompletions) {
      out_choices.push_back({{"index", i},
                             {"message",
                              {{"role", "assistant"},
                               {"content", c.text},
                               {"reasoning_content", nullptr},
                               {"tool_calls", json::array()}}},
                             {"logprobs", nullptr},
                             {"finish_reason", c.finish_reason},
                             {"stop_reason", nullptr}});
    } else {
      out_choices.push_back({{"index", i},
                             {"text", c.text},
                             {"logprobs", nullptr},
                             {"finish_reason", c.finish_reason},
                             {"stop_reason", nullptr},
                             {"prompt_logprobs", nullptr}});
    }
  }
  json body = {{"id", meta.id},
               {"object", api == Api::kChatCompletions ? "chat.completion" : "text_completion"},
               {"created", meta.created},
               {"model", meta.model},
               {"choices", std::move(out_choices)},
               {"usage", usage_json(prompt, completion, cached)},
               {"kv_transfer_params",
                kv_transfer_params != nullptr ? *kv_transfer_params : json(nullptr)}};
  return body.dump();
}

std::string openai_chunk(Api api, const ResponseMeta& meta, std::size_t index,
                         std::string_view text, const char* finish_reason, bool role_delta) {
  std::string s;
  s.reserve(200 + text.size());
  s += "{\"id\":";
  append_json_string(s, meta.id);
  s += api == Api::kChatCompletions ? ",\"object\":\"chat.completion.chunk\""
                                    : ",\"object\":\"text_completion\"";
  s += ",\"created\":" + std::to_string(meta.created) + ",\"model\":";
  append_json_string(s, meta.model);
  s += ",\"choices\":[{\"index\":" + std::to_string(index);
  if (api == Api::kChatCompletions) {
    s += ",\"delta\":{";
    if (role_delta) {
      s += "\"role\":\"assistant\",\"content\":\"\"";
    } else {
      s += "\"content\":";
      append_json_string(s, text);
    }
    s += "}";
  } else {
    s += ",\"text\":";
    append_json_string(s, text);
  }
  s += ",\"logprobs\":null,\"finish_reason\":";
  s += finish_reason != nullptr ? "\"" + std::string(finish_reason) + "\"" : "null";
  s += ",\"stop_reason\":null}]}";
  return s;
}

std::string openai_usage_chunk(Api api, const ResponseMeta& meta, std::uint64_t prompt_tokens,
                               std::uint64_t completion_tokens, std::uint64_t cached_tokens) {
  json body = {
      {"id", meta.id},
      {"object", api == Api::kChatCompletions ? "chat.completion.chunk" : "text_completion"},
      {"created", meta.created},
      {"model", meta.model},
      {"choices", json::array()},
      {"usage", usage_json(prompt_tokens, completion_tokens, cached_tokens)}};
  return body.dump();
}

json sglang_generate_item(const ResponseMeta& meta, const ChoiceResult& c, bool finished,
                          std::optional<std::size_t> index) {
  json finish = nullptr;
  if (finished) {
    if (c.finish_reason == "length") {
      finish = {{"type", "length"}, {"length", c.output_ids.size()}};
    } else if (c.finish_reason == "stop") {
      finish = {{"type", "stop"}, {"matched", SimTokenizer::kEos}};
    } else {
      finish = {{"type", "abort"}, {"message", c.text}, {"status_code", 500}};
    }
  }
  json item = {{"text", c.text},
               {"output_ids", c.output_ids},
               {"meta_info",
                {{"id", meta.id},
                 {"finish_reason", finish},
                 {"prompt_tokens", c.prompt_tokens},
                 {"completion_tokens", c.output_ids.size()},
                 {"cached_tokens", c.cached_tokens},
                 {"e2e_latency", meta.e2e_latency_s}}}};
  if (index) item["index"] = *index;
  return item;
}

}  // namespace omni::sim
