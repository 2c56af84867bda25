// What a proxy learns from an engine's answer as it passes through: token counts for logs and
// metrics, without holding the answer.
//  - Streamed (SSE): each `data:` event counts; an event that carries `usage` (OpenAI
//    include_usage) or SGLang's `meta_info` gives exact counts. Otherwise the output tokens are
//    estimated as the number of choice-carrying events (engines send one token per event and
//    choice).
//  - Not streamed: the answer is kept up to a bound and its `usage` / `meta_info` read at the
//    end.
#pragma once

#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <optional>
#include <string>
#include <string_view>

namespace omni {

class UsageScanner {
 public:
  explicit UsageScanner(bool stream, std::size_t max_buffer = std::size_t{1} << 20);

  // Body bytes in order, any split.
  void feed(std::string_view bytes);
  // The body ended; reads a non-streamed answer.
  void finish();

  std::uint32_t prompt_tokens() const noexcept { return prompt_tokens_; }
  std::uint32_t output_tokens() const noexcept;
  // Cached prompt tokens the engine reported (usage.prompt_tokens_details.cached_tokens, or
  // SGLang's meta_info.cached_tokens); nullopt when it did not.
  std::optional<std::uint32_t> cached_tokens() const noexcept {
    if (cached_tokens_ < 0) return std::nullopt;
    return static_cast<std::uint32_t>(std::min<std::int64_t>(cached_tokens_, UINT32_MAX));
  }
  // True when the counts come from the engine's own usage report.
  bool exact() const noexcept { return exact_; }
  // SSE data events seen, [DONE] excluded.
  std::uint32_t events() const noexcept { return events_; }
  // True once an SSE event with an `error` object went by.
  bool saw_error() const noexcept { return saw_error_; }

 private:
  void line(std::string_view l);
  void read_usage(std::string_view json);

  bool stream_;
  std::size_t max_buffer_;
  std::string buffer_;  // the partial line (stream) or the answer so far
  bool overflow_ = false;
  bool exact_ = false;
  bool saw_error_ = false;
  std::uint32_t events_ = 0;
  std::uint32_t choice_events_ = 0;
  std::uint32_t prompt_tokens_ = 0;
  std::uint32_t output_tokens_ = 0;
  std::int64_t cached_tokens_ = -1;
};

// The cached prompt tokens a non-streamed answer reports in its usage (or meta_info); nullopt
// when it reports none or is not JSON.
std::optional<std::uint32_t> cached_tokens_of(std::string_view answer);

// One HTTP/1.x response read to the end of the connection: status and decoded body
// (Content-Length, chunked, or up to EOF).
struct HttpResponse {
  int status = 0;
  std::string body;
};

// nullopt for a malformed or incomplete response.
std::optional<HttpResponse> parse_http_response(std::string_view raw);

}  // namespace omni
