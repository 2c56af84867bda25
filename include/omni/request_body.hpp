// Client request bodies: validation, feature extraction and the per-leg rewrites of P/D
// disaggregation, done on a parsed document and never by scanning text.
//
// The reference proxy rewrote bodies with a token scanner that took string values for keys (a
// message whose content was "stream" corrupted the body) and dropped fields past 256 tokens.
// Here a body is parsed once into an nlohmann::ordered_json, which keeps every member and its
// order; each rewrite serializes that document with a handful of top-level members added,
// replaced or removed, so everything else survives unchanged in value and order. Re-serializing
// is semantic, not byte-for-byte: insignificant whitespace goes, "\u4e2d" comes out as the UTF-8
// bytes of the same character, "\/" as "/", 1E2 as 100.0, and of duplicate keys the last value
// wins (at the first key's position).
//
// Wire formats (the product brief, "Wire formats"):
//  - vLLM sequential P/D: the prefill leg gets the client body with kv_transfer_params asking
//    for remote decode, stream false and max_tokens 1; the decode leg gets the client body plus
//    the kv_transfer_params the prefill response carried.
//  - SGLang parallel P/D: both legs get the client body plus bootstrap_host/port/room, scalars
//    for a single input and arrays (one entry per item) for a list input.
//
// Nothing here throws except std::bad_alloc, and std::bad_variant_access from
// BodyResult::value()/error() called on the wrong alternative.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include <nlohmann/json.hpp>

namespace omni {

// The client-facing API a body is addressed to; chosen by the caller from the request path.
enum class Api {
  kCompletions,      // OpenAI /v1/completions
  kChatCompletions,  // OpenAI /v1/chat/completions
  kGenerate,         // SGLang native /generate
};

// The canonical path of an API ("/v1/completions", ...).
std::string_view api_path(Api api) noexcept;
// The API served at exactly `path` (no query string), if any.
std::optional<Api> api_from_path(std::string_view path) noexcept;

// A client-visible error; `to_json()` is the OpenAI-style error body to answer with.
struct BodyError {
  int status = 400;
  std::string message;
  std::string param;  // the offending field ("max_tokens", "messages[2].role"); empty if none
  std::string type;   // error type name; omni::error_type_for_status(status) when built here

  std::string to_json() const;
};

// A value or a BodyError. Accessing the wrong alternative throws std::bad_variant_access.
template <typename T>
class BodyResult {
 public:
  BodyResult(T value) : v_(std::in_place_index<0>, std::move(value)) {}          // NOLINT: implicit
  BodyResult(BodyError error) : v_(std::in_place_index<1>, std::move(error)) {}  // NOLINT

  bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }

  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  const BodyError& error() const { return std::get<1>(v_); }

  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<T, BodyError> v_;
};

struct ParseOptions {
  // Bodies longer than this are refused with 413 before any parsing.
  std::size_t max_body_bytes = std::size_t{64} << 20;
  // Arrays and objects nested deeper than this are refused with 400 by a linear pre-scan, before
  // nlohmann's recursive-descent parser sees the body. The top-level object is depth 1.
  std::size_t max_depth = 128;
};

// What scheduling needs to know about a request, gathered in the validating pass.
struct BodyFeatures {
  Api api = Api::kCompletions;
  std::string model;  // empty when absent or null
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  std::int64_t n = 1;          // `n`; for /generate sampling_params.n
  // List input: completions `prompt` as [string] or [[int]], /generate `text` as [string] or
  // `input_ids` as [[int]]. Such a request is a batch even with a single item, and SGLang
  // wants its bootstrap fields as arrays.
  bool batch_input = false;
  std::size_t batch_size = 1;  // items of a list input; 1 otherwise
  // Unicode code points of all text content: prompt strings, message contents (strings and
  // text parts), /generate text. Not counted: tool definitions, tool-call arguments, names.
  std::size_t prompt_chars = 0;
  std::size_t prompt_token_ids = 0;  // total token ids when the input is given as ids
  bool has_token_ids = false;
  // max_completion_tokens, else max_tokens; for /generate sampling_params.max_new_tokens.
  std::optional<std::int64_t> max_tokens;
  bool has_max_completion_tokens = false;  // the key is present, whatever its value
  std::optional<std::int64_t> priority;    // body field `priority` (vLLM: lower runs first)
  bool has_kv_transfer_params = false;     // the key is present, whatever its value
  bool has_bootstrap = false;  // any of bootstrap_host/bootstrap_port/bootstrap_room present
};

struct ParsedBody {
  nlohmann::ordered_json json;  // always an object
  BodyFeatures features;
};

// Validates `body` as a request to `api` and extracts its features. Errors:
//  - 413 when longer than options.max_body_bytes;
//  - 400 for nesting deeper than options.max_depth, invalid JSON (the message names nlohmann's
//    byte offset), a non-object top level, or an invalid field, with `param` naming it:
//      completions: `prompt` a non-empty string, [int], [string] or [[int]] (no empty items,
//        ids non-negative);
//      chat: `messages` a non-empty array of objects, each with a string `role` and a
//        `content` that is absent, null, a string or an array;
//      generate: exactly one of `text` (string or [string]) and `input_ids` ([int] or
//        [[int]]); `sampling_params` an object whose max_new_tokens is an integer >= 0 and
//        whose n is an integer >= 1;
//      all: `model` a string, `stream` a bool, `max_tokens`/`max_completion_tokens`/`n`
//        integers >= 1, `priority` an integer; for the OpenAI APIs `stream_options` an object
//        allowed only with stream true, its include_usage a bool.
// A null value counts as absent everywhere, as it does for vLLM's and SGLang's own validators.
BodyResult<ParsedBody> parse_request_body(Api api, std::string_view body,
                                          const ParseOptions& options = {});

// The byte offset of the first '[' or '{' (outside strings) that opens a level deeper than
// `max_depth`, or nullopt if there is none. Linear, constant stack; never fails on malformed
// input (that is left to the parser).
std::optional<std::size_t> find_excess_nesting(std::string_view text,
                                               std::size_t max_depth) noexcept;

// The document re-serialized unchanged (compact, UTF-8 kept as is).
std::string serialize(const ParsedBody& body);

// The vLLM sequential prefill leg: kv_transfer_params requesting remote decode (added or
// replaced), "stream": false, "max_tokens": 1, "max_completion_tokens": 1 only if the client sent
// that key; stream_options and min_tokens removed. Replaced members keep their position; added
// ones are appended.
std::string vllm_prefill_body(const ParsedBody& body);

// The vLLM sequential decode leg: the client body plus `kv_transfer_params` (added or replaced)
// when non-null; with null it is the client body unchanged.
std::string vllm_decode_body(const ParsedBody& body,
                             const nlohmann::ordered_json* kv_transfer_params);

// The body both SGLang parallel legs get: bootstrap_host, bootstrap_port and bootstrap_room
// added or replaced, as scalars for a single input and as arrays of features.batch_size entries
// (host and port repeated, one room per item) for a list input. `rooms` must hold exactly one
// room per item (1 for a single input), each in [0, 2^63-1]; `host` must be non-empty and `port`
// in [1, 65535]. A violation is the caller's bug and yields a 500 error.
BodyResult<std::string> sglang_bootstrap_body(const ParsedBody& body, std::string_view host,
                                              int port, std::span<const std::uint64_t> rooms);

// The largest valid bootstrap room, 2^63-1.
inline constexpr std::uint64_t kMaxBootstrapRoom = (std::uint64_t{1} << 63) - 1;

// The kv_transfer_params of a non-streamed vLLM prefill response: the object when present,
// nullopt when absent or null (the prefill finished on its first token; decode goes without
// it). Invalid JSON, a non-object response, nesting past `max_depth`, or a kv_transfer_params
// that is neither an object nor null yield a 502 error whose message says what was wrong.
BodyResult<std::optional<nlohmann::ordered_json>> extract_kv_transfer_params(
    std::string_view prefill_response, std::size_t max_depth = 128);

}  // namespace omni
