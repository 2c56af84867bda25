// The simulated engines' HTTP protocol: request parsing and validation, response bodies and
// error bodies, in the shapes vLLM and SGLang use.
//
// vLLM  (OpenAI server): POST /v1/completions, /v1/chat/completions. Errors are
//        {"error": {"message", "type", "param", "code"}}; body validation failures are 400
//        with type "Bad Request"; an unknown model is 404 NotFoundError.
// SGLang: the same OpenAI endpoints, with flat errors
//        {"object": "error", "message", "type", "param", "code"}, and POST /generate with
//        `text` or `input_ids`, `sampling_params`, errors {"error": {"message"}}.
//
// Text prompts are tokenized by the stand-in SimTokenizer, or, given a ModelTokenizer
// (`--tokenizer DIR`), by the model's real tokenizer and chat template, as vLLM and SGLang
// do: completions prompts with add_special_tokens (default true), chats rendered with the
// model's template then encoded with add_special_tokens (default false), /generate text with
// special tokens. Either way the cost is measured (TokenizeCounters).
#pragma once

#include "model_tokenizer.hpp"
#include "tokenizer.hpp"

#include <nlohmann/json.hpp>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace omni::sim {

enum class EngineKind { kVllm, kSglang };
enum class Api { kCompletions, kChatCompletions, kGenerate };

struct BootstrapInfo {
  std::string host;
  std::uint16_t port = 0;
  std::uint64_t room = 0;
};

struct ParsedRequest {
  Api api = Api::kCompletions;
  std::vector<std::vector<TokenId>> prompts;  // one per batch item
  bool batch = false;                 // the input was a list: the answer is a list too
  std::uint32_t n = 1;                // samples per prompt (`n`, SGLang `sampling_params.n`)
  std::uint32_t max_tokens = 0;
  bool max_tokens_given = false;
  bool stream = false;
  bool include_usage = false;         // stream_options.include_usage
  std::optional<nlohmann::json> kv_transfer_params;  // vLLM P/D
  std::vector<BootstrapInfo> bootstrap;              // SGLang P/D, one per item
  std::string rid;                    // SGLang request id
};

struct ProtocolError {
  int status = 400;
  std::string body;
};

// What tokenizing text prompts has cost (chat rendering included): thread CPU time and wall
// time around each render + encode, the prompts tokenized (a chat counts once, a batch of
// texts once per text; token-id prompts are not tokenized) and the ids they produced.
// Updated from whichever thread parses; lock-free.
struct TokenizeCounters {
  std::atomic<std::uint64_t> cpu_ns{0};
  std::atomic<std::uint64_t> wall_ns{0};
  std::atomic<std::uint64_t> prompts{0};
  std::atomic<std::uint64_t> tokens{0};
};

class Protocol {
 public:
  // The largest `n` accepted (the engines themselves set no limit).
  static constexpr std::int64_t kMaxN = 256;

  // `tokenizer` null: the stand-in SimTokenizer.
  Protocol(EngineKind kind, std::string served_model, std::uint32_t max_model_len,
           std::uint32_t default_max_tokens,
           std::shared_ptr<const ModelTokenizer> tokenizer = nullptr);

  EngineKind kind() const noexcept { return kind_; }
  const std::string& model() const noexcept { return model_; }
  const ModelTokenizer* model_tokenizer() const noexcept { return model_tok_.get(); }
  // Token ids given in requests must be below this.
  std::size_t vocab_size() const noexcept { return vocab_size_; }

  // Parses and validates a request body for `api`, tokenizing its text. Safe to call from
  // several threads at once.
  std::variant<ParsedRequest, ProtocolError> parse(Api api, std::string_view body) const;

  const TokenizeCounters& tokenize_counters() const noexcept { return counters_; }

  // An error body in this engine's shape for `api`.
  std::string error_body(Api api, int status, std::string_view message,
                         std::string_view type = {}, std::string_view param = {}) const;
  ProtocolError error(Api api, int status, std::string_view message, std::string_view type = {},
                      std::string_view param = {}) const {
    return ProtocolError{status, error_body(api, status, message, type, param)};
  }

  // GET /v1/models.
  std::string models_body(std::int64_t created) const;

 private:
  std::optional<ProtocolError> parse_openai(Api api, const nlohmann::json& j,
                                            std::string_view body, ParsedRequest& out) const;
  // One text prompt to ids (measured).
  std::vector<TokenId> encode_text(const std::string& text, bool add_special_tokens) const;
  // A chat with the model's template (measured); the error to answer when it cannot.
  std::optional<ProtocolError> encode_model_chat(const nlohmann::json& j, std::string_view body,
                                                 ParsedRequest& out) const;
  std::optional<ProtocolError> parse_generate(const nlohmann::json& j, ParsedRequest& out) const;
  std::optional<ProtocolError> parse_bootstrap(Api api, const nlohmann::json& j,
                                               ParsedRequest& out) const;
  std::optional<ProtocolError> check_lengths(Api api, const ParsedRequest& r) const;

  EngineKind kind_;
  std::string model_;
  std::uint32_t max_model_len_;
  std::uint32_t default_max_tokens_;
  SimTokenizer tokenizer_;
  std::shared_ptr<const ModelTokenizer> model_tok_;
  std::size_t vocab_size_;
  mutable TokenizeCounters counters_;
};

// One generated sequence, for response bodies.
struct ChoiceResult {
  std::string text;
  std::vector<TokenId> output_ids;
  std::string finish_reason;  // "length", "stop", "abort", "error"
  std::uint32_t prompt_tokens = 0;
  std::uint32_t cached_tokens = 0;
  // Which of its prompt's n samples this is. OpenAI usage counts a prompt (and its cached
  // tokens) once, at sample 0, as vLLM does; SGLang's meta_info reports it on every sample.
  std::uint32_t sample = 0;
};

struct ResponseMeta {
  std::string id;       // "cmpl-...", "chatcmpl-..." or the SGLang rid
  std::string model;
  std::int64_t created = 0;
  double e2e_latency_s = 0;
};

// Non-streamed OpenAI response (completions or chat), one choice per entry of `choices`, whose
// position is its `index` (prompt-major: prompt i, sample j is i * n + j), with usage and, when
// given, kv_transfer_params (null otherwise, as vLLM sends it).
std::string openai_response(Api api, const ResponseMeta& meta,
                            const std::vector<ChoiceResult>& choices,
                            const nlohmann::json* kv_transfer_params);
// One SSE event (without the "data: " framing) of a streamed OpenAI response. For chat, a
// `role_delta` chunk carries {"role":"assistant","content":""}.
std::string openai_chunk(Api api, const ResponseMeta& meta, std::size_t index,
                         std::string_view text, const char* finish_reason, bool role_delta);
std::string openai_usage_chunk(Api api, const ResponseMeta& meta, std::uint64_t prompt_tokens,
                               std::uint64_t completion_tokens, std::uint64_t cached_tokens);
// SGLang /generate item: {"text", "output_ids", "meta_info"}; `finished` controls whether
// finish_reason is null. `index` is added for batched streams.
nlohmann::json sglang_generate_item(const ResponseMeta& meta, const ChoiceResult& c,
                                    bool finished, std::optional<std::size_t> index);

// JSON string escaping for hand-built bodies on the hot path.
void append_json_string(std::string& out, std::string_view s);

}  // namespace omni::sim
