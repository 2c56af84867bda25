// The open-loop replay: request i is due trace_time_i / speedup after the run starts, whether
// or not earlier requests have finished.
//
// At most max_concurrency requests are in flight. A request due while that many are in flight
// waits, first come first served, for one to finish, and its start is late by the wait; a
// request whose start would be later than max_lateness is dropped instead (never sent). Any
// start more than late_threshold behind schedule, whatever the cause (waiting for a slot, or
// the client itself falling behind), is counted as late with its lateness, so an overloaded
// replay shows up in the summary instead of quietly becoming a closed loop.
#pragma once

#include "client.hpp"
#include "prompt.hpp"
#include "record.hpp"
#include "stats.hpp"
#include "workload.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace omni::replay {

enum class Api { kCompletions, kChat };
enum class PromptMode { kTokens, kText };

struct RunConfig {
  boost::asio::ip::tcp::endpoint endpoint;
  std::string host;  // Host header
  Api api = Api::kCompletions;
  PromptMode prompt_mode = PromptMode::kTokens;
  bool stream = true;
  std::string model = "omni-sim";
  double speedup = 1;
  std::size_t max_concurrency = 1024;
  std::optional<double> max_lateness_ms;  // wall
  double late_threshold_ms = 5;           // wall
  std::chrono::steady_clock::duration timeout = std::chrono::seconds(600);
  std::string prefill_header = "X-Omni-Prefill-Peer";
  std::string decode_header = "X-Omni-Decode-Peer";
  std::string request_id_prefix = "bench-";  // X-Request-Id is the prefix and the index
};

struct RunResult {
  std::vector<RequestRecord> records;  // one per workload request, in order
  LogHistogram itl;                    // every inter-token gap, wall ms
  double wall_duration_s = 0;          // run start to the last request's end
  std::uint64_t connections_opened = 0;
  bool interrupted = false;
};

// The JSON body of request `r` (see the README for its fields).
std::string request_body(const RunConfig& config, const PromptBuilder& prompts, const Request& r);

class Runner {
 public:
  Runner(boost::asio::io_context& io, const RunConfig& config, const Workload& workload,
         const PromptBuilder& prompts);

  // Replays the whole workload; returns when every request has ended (or after interrupt()).
  RunResult run();
  // Stops: requests not started yet are "not_sent", those in flight are cancelled.
  void interrupt();

 private:
  using Clock = std::chrono::steady_clock;

  void prepare_next();
  void arm();
  void on_timer();
  void due(std::size_t i);
  void launch(std::size_t i, bool waited);
  std::string take_body(std::size_t i);
  void ended();
  double seconds_since_start(Clock::time_point t) const;

  boost::asio::io_context& io_;
  RunConfig config_;
  const Workload& workload_;
  const PromptBuilder& prompts_;
  ConnectionPool pool_;
  boost::asio::steady_timer timer_;
  RunResult result_;
  Clock::time_point start_{};
  std::size_t next_ = 0;             // next request to become due
  std::deque<std::size_t> waiting_;  // due, waiting for a free place
  std::size_t in_flight_ = 0;
  std::size_t ended_ = 0;  // finished, dropped or not sent
  std::unordered_map<std::size_t, std::weak_ptr<Exchange>> exchanges_;  // in flight
  // The next request's body, built while waiting for it to become due.
  std::optional<std::size_t> prepared_index_;
  std::string prepared_body_;
  bool stopping_ = false;
};

}  // namespace omni::replay
