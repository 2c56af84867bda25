// What omni-bench records about one request. Times are wall-clock, as measured; the summary and
// the CSV convert latencies to model time (divided by --time-scale).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace omni::replay {

// How a request ended: "ok", or an error kind: "dropped" (later than --max-lateness, never
// sent), "http_<status>", "timeout", "connect", "transport" (the connection failed mid-request),
// "incomplete" (the stream ended without [DONE]), "stream_error" (an error event inside a 200
// stream), "bad_response" (a 200 whose body is not what the API promises), "cancelled"
// (interrupted by SIGINT/SIGTERM; "not_sent" when it had not started yet).
inline constexpr const char* kOutcomeOk = "ok";

struct RequestRecord {
  std::uint64_t index = 0;
  double trace_s = 0;      // arrival in the (sliced) trace, trace seconds
  double scheduled_s = 0;  // when it was due, wall seconds after the run started (trace/speedup)
  double start_s = -1;     // when it was sent (or dropped), wall seconds; -1: never
  double lateness_ms = 0;  // start - scheduled, wall ms
  bool late = false;       // lateness above the late threshold (any cause)
  bool waited = false;     // it found --max-concurrency requests in flight and waited
  std::string outcome;     // see above; empty while in flight
  int status = 0;          // HTTP status, 0 when no response arrived
  std::string error;       // error body or transport error, at most kMaxErrorBytes
  std::uint32_t input_tokens = 0;   // from the workload
  std::uint32_t output_tokens = 0;  // requested (max_tokens)
  bool streamed = true;
  // Wall ms after start; negative: not measured.
  double ttft_ms = -1;
  double e2e_ms = -1;
  std::uint64_t itl_count = 0;  // gaps between successive tokens
  double itl_sum_ms = 0;
  double itl_max_ms = 0;
  std::uint64_t token_events = 0;  // SSE events that carried output
  std::uint64_t tokens_seen = 0;   // output tokens counted from the stream
  // From the final usage; -1 when the response did not say.
  std::int64_t prompt_tokens = -1;
  std::int64_t cached_tokens = -1;
  std::int64_t completion_tokens = -1;
  std::string prefill_peer;  // response headers naming the chosen instances; empty if absent
  std::string decode_peer;

  bool ok() const { return outcome == kOutcomeOk; }
  bool sent() const { return start_s >= 0 && outcome != "dropped"; }
};

inline constexpr std::size_t kMaxErrorBytes = 500;

}  // namespace omni::replay
