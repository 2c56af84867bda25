// Reads one HTTP response of the OpenAI API into a RequestRecord: status, the peer headers,
// the SSE stream's token events (TTFT, inter-token gaps), the final usage, and how it ended.
// It sees bytes and times only, no sockets, so it is tested on hand-made responses.
//
// Token counting. An event is a token event when its first choice carries non-empty text
// (`text`, or the chat delta's `content` or `reasoning_content`); TTFT is the first one. An
// event counts as one token unless it carries a running usage (vLLM's
// stream_options.continuous_usage_stats), in which case it counts the growth of
// completion_tokens since the previous event. The gap before an event of k tokens counts as k
// inter-token gaps of gap/k; the tokens of the first event after the first one count no gap.
// The final usage's completion_tokens, when present, is the request's output length (TPOT uses
// it), whatever the event count said.
#pragma once

#include "record.hpp"
#include "sse.hpp"
#include "stats.hpp"

#include <string>
#include <string_view>
#include <vector>

namespace omni::replay {

class ResponseReader {
 public:
  // A 200 non-streamed body larger than this is a bad_response (the answer to any request
  // omni-bench sends is far smaller).
  static constexpr std::size_t kMaxBodyBytes = 64u << 20;

  // `itl` receives every inter-token gap (wall ms); it outlives the reader.
  ResponseReader(RequestRecord& record, LogHistogram& itl) : rec_(record), itl_(itl) {}

  void on_header(int status, bool event_stream, std::string prefill_peer, std::string decode_peer);
  // `t_ms`: wall ms since the request started, when these bytes arrived.
  void on_body(std::string_view bytes, double t_ms);
  // The response is complete (the HTTP message ended).
  void on_end(double t_ms);
  // No (complete) response: kind is "timeout", "connect", "transport" or "cancelled".
  void on_failure(const std::string& kind, const std::string& message, double t_ms);

  bool finished() const { return !rec_.outcome.empty(); }

 private:
  void on_event(const std::string& data, double t_ms);
  void token_event(std::uint64_t tokens, double t_ms);
  void read_usage(const nlohmann::json& usage);
  void fail(const std::string& kind, std::string_view message);

  RequestRecord& rec_;
  LogHistogram& itl_;
  bool sse_ = false;
  bool done_ = false;  // saw data: [DONE]
  double last_token_ms_ = -1;
  std::string body_;  // a non-SSE body (errors: its first kMaxErrorBytes bytes)
  SseParser parser_;
  std::vector<std::string> events_;
};

// `text` cut to at most kMaxErrorBytes bytes, not inside a UTF-8 sequence.
std::string truncate_error(std::string_view text);

}  // namespace omni::replay
