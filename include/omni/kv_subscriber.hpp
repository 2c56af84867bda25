// Reads every engine's KV-event stream (include/omni/kv_events.hpp) on one thread, in sequence
// order, and hands the decoded batches to a sink.
//
// Per engine ("instance"): one SUB socket on its PUB endpoint and, when it has one, one DEALER
// on its ROUTER replay endpoint. KvFeed holds the sequence logic with no transport:
//  - a batch whose seq continues the last applied one is delivered;
//  - a jump forward is a gap: live batches are held (at most max_pending, the oldest dropped
//    beyond) while a replay from last+1 is asked for, with a timeout and exponential backoff
//    between attempts; what the replay cannot give (the engine's buffer no longer has it, no
//    replay socket, every attempt timed out) is an unrecoverable gap: the sink is told to drop
//    the instance (ResetReason::kUnrecoverable) and the stream continues from the earliest
//    batch held;
//  - the live stream going back (a seq not above the highest live seq seen, or, before any
//    live batch, not above `resume_after`) is an engine restart: reset (kRestart), then the
//    batch is the first of a new run (seq 0 delivered, a later seq replayed from 0). A live seq
//    above the highest live seq but not above the last applied one is the live stream catching
//    up with a replay that ran ahead of it: a duplicate, not a restart;
//  - a replay whose first batch is later than asked means the engine's buffer lost the rest
//    (unrecoverable); a hole further inside a replay (replies dropped at the engine's ROUTER
//    high-water mark) is asked for again from last+1 once the replay ends.
// Replay DEALER: made when the subscriber starts (a malformed replay endpoint then disables
// replay for that instance) and reused while replays end with their end marker; dropped when an
// attempt is abandoned (timeout, engine restart), so stale replies die with it, and made anew
// for the next request.
// A malformed message (wrong frame count, a seq frame that is not 8 bytes, a negative seq) is
// counted and skipped. A payload decode_batch() rejects under a valid seq is counted as
// malformed but still takes its place in the sequence: the engine did number it, and holding
// the stream for a batch no replay can repair would stall the instance forever; its events are
// lost (nothing is reset for it: a lost BlockRemoved only leaves a stale entry, a lost
// BlockStored a missed hit).
//
// Known limit of the wire protocol (it has no run identifier): an engine that restarts and
// publishes past the highest seq seen from its previous run before the subscriber hears from it
// again looks like a gap, not a restart.
//
// KvSubscriber runs in one nginx worker: its thread blocks the asynchronous signals so nginx's
// handlers stay on the main thread, and it never throws out of the thread (sink and decoding
// exceptions are counted and the stream goes on).
#pragma once

#include "omni/kv_events.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace omni::kv {

// One engine's endpoints.
struct KvEndpoint {
  std::string pub;  // ZMQ endpoint of its PUB socket, e.g. "tcp://127.0.0.1:5557"
  std::string
      replay;  // its ROUTER replay socket; empty: none (gaps are then skipped, not recovered)
  std::string topic;  // SUB prefix filter; "" = everything
};

enum class ResetReason : std::uint8_t {
  kRestart,        // the engine's sequence numbers went back: a new engine process
  kUnrecoverable,  // a gap the replay could not fill (no replay socket, or the engine's buffer
                   // no longer has it)
};
std::string_view to_string(ResetReason reason) noexcept;

// Receives each instance's batches in sequence order, each sequence number at most once per
// engine run. Called only from the subscriber thread.
class KvSink {
 public:
  virtual ~KvSink() = default;
  virtual void on_batch(std::uint32_t instance, std::int64_t seq, const EventBatch& batch) = 0;
  // Drop everything known about the instance (called before the batches that follow a restart).
  virtual void on_reset(std::uint32_t instance, ResetReason reason) = 0;
  // Called about every tick_interval from the subscriber thread (e.g. a heartbeat). Return
  // false to make the subscriber stop by itself.
  virtual bool on_tick() { return true; }
};

// Sequence logic of one instance, with no transport (unit-testable with injected time).
// Live batches arrive on the PUB stream; replayed batches answer a replay request.
//
// States: live; replaying (a request is out, deadline = last request or replayed batch +
// replay_timeout); backing off (a replay attempt failed, the next is due at retry time).
// replaying() is true in the last two: live batches are held in both.
class KvFeed {
 public:
  struct Options {
    // Batches held while a replay runs (live ones, and replayed ones past a hole). Beyond it the
    // oldest (lowest seq) is dropped and counted in pending_dropped; nothing is re-requested at
    // once: the running replay usually covers the dropped ones, and a hole left when it ends is
    // asked for by the next replay (from last_applied + 1). Values below 1 count as 1.
    std::size_t max_pending = 10000;
    // No end marker and no replayed batch for this long: the attempt failed.
    std::chrono::milliseconds replay_timeout{2000};
    // Backoff before attempt n+1 after n failures: min * 2^(n-1), at most max.
    std::chrono::milliseconds replay_retry_min{100}, replay_retry_max{5000};
    // Failed attempts for one gap before it is unrecoverable (reset, continue live). Below 1: 1.
    int max_replay_attempts = 5;
  };
  // `resume_after`: the last sequence number already applied by a previous subscriber (-1: none).
  KvFeed(Options options, std::int64_t resume_after);

  struct Actions {
    bool reset = false;  // call sink.on_reset first
    ResetReason reset_reason = ResetReason::kRestart;
    // The transport should drop its replay connection (and the stale replies it may still
    // bring): a replay attempt was abandoned (timeout, engine restart).
    bool abandon_replay = false;
    std::optional<std::int64_t> request_replay_from;  // send a replay request starting here
    // Payloads to decode and apply, in order.
    std::vector<std::pair<std::int64_t, std::string>> deliver;
  };
  using Clock = std::chrono::steady_clock;
  Actions on_live(std::int64_t seq, std::string payload, Clock::time_point now);
  Actions on_replayed(std::int64_t seq, std::string payload, Clock::time_point now);
  Actions on_replay_end(Clock::time_point now);
  // At start: with a replay socket, ask for everything after the last applied batch (from 0
  // when none), so a restarted proxy or a worker taking over catches up without waiting for a
  // live batch. If no engine answers, the feed goes live without a reset.
  Actions on_start(Clock::time_point now);
  Actions on_tick(Clock::time_point now);  // timeouts and retries
  bool replay_supported = true;  // false: a gap resets (kUnrecoverable) and continues live
  std::int64_t last_applied() const noexcept { return last_; }
  bool replaying() const noexcept { return state_ != State::kLive; }
  // A request is out and its replies are wanted (replaying() and not backing off).
  bool awaiting_replay() const noexcept { return state_ == State::kReplaying; }
  std::size_t pending() const noexcept { return pending_.size(); }
  struct Stats {
    std::uint64_t live = 0, replayed = 0, duplicates = 0, gaps = 0, replays_requested = 0,
                  replays_completed = 0, replays_failed = 0, restarts = 0, unrecoverable = 0,
                  pending_dropped = 0;
  };
  const Stats& stats() const noexcept { return stats_; }

 private:
  enum class State : std::uint8_t { kLive, kReplaying, kBackoff };

  void hold(std::int64_t seq, std::string payload);
  void mark_reset(Actions& a, ResetReason reason);
  void request(Actions& a, Clock::time_point now);
  void give_up(Actions& a, Clock::time_point now);
  void drain(Actions& a);
  void settle(Actions& a, Clock::time_point now);

  Options options_;
  std::int64_t last_;
  std::optional<std::int64_t> live_high_;  // highest live seq of this run
  bool startup_ = false;                   // the replay in progress is on_start's
  State state_ = State::kLive;
  std::map<std::int64_t, std::string> pending_;
  Clock::time_point deadline_{}, retry_at_{};
  bool attempt_received_ = false;  // the current attempt brought a batch above last_
  int failures_ = 0;
  Stats stats_;
};

struct KvSubscriberOptions {
  KvFeed::Options feed;
  std::chrono::milliseconds reconnect_min{100};   // ZMQ_RECONNECT_IVL
  std::chrono::milliseconds reconnect_max{5000};  // ZMQ_RECONNECT_IVL_MAX: exponential backoff
  std::chrono::milliseconds tick_interval{100};
  std::int64_t max_message_bytes = 64 << 20;  // ZMQ_MAXMSGSIZE
  std::size_t max_batches_per_wakeup = 256;   // fairness between instances
  int receive_hwm = 100000;                   // ZMQ_RCVHWM of the SUB and DEALER sockets
};

struct InstanceFeedStats {  // KvFeed::Stats plus transport counters, a consistent snapshot
  KvFeed::Stats feed;
  std::uint64_t batches_applied = 0, events_applied = 0, malformed = 0, skipped_events = 0;
  std::int64_t last_seq = -1;
  bool replaying = false;
  std::uint64_t last_batch_unix_ms = 0;         // wall time the last batch was applied, 0 never
  std::uint64_t connects = 0, disconnects = 0;  // of the SUB socket, from ZMQ's socket monitor
  std::uint64_t resets = 0;                     // on_reset calls
  // connect() refused an endpoint (malformed), or a socket could not be made.
  std::uint64_t connect_errors = 0;
  std::uint64_t sink_errors = 0;    // exceptions thrown by on_batch / on_reset
  std::uint64_t stale_replies = 0;  // replay replies with no replay running
};

class KvSubscriber {
 public:
  // Instance i is endpoints[i]. `resume_after[i]` (if given; size == endpoints.size(), else
  // std::invalid_argument) is the last sequence number already applied for it (-1 none): the
  // subscriber then asks for a replay from resume_after+1 when it first hears from that engine
  // and finds a gap.
  KvSubscriber(std::vector<KvEndpoint> endpoints, KvSink& sink, KvSubscriberOptions options = {},
               std::vector<std::int64_t> resume_after = {});
  ~KvSubscriber();  // stop()
  KvSubscriber(const KvSubscriber&) = delete;
  KvSubscriber& operator=(const KvSubscriber&) = delete;

  // Starts the thread (once: a stopped subscriber is not restarted). connect() failures on
  // malformed endpoints are counted per instance, not thrown.
  void start();
  // Idempotent; wakes the thread at once (the ZMQ context is shut down) and joins it, so it
  // returns as soon as a sink callback in progress returns.
  void stop();
  bool running() const noexcept;
  InstanceFeedStats stats(std::uint32_t instance) const;  // std::out_of_range past size()
  std::size_t size() const noexcept;
  std::uint64_t tick_errors() const noexcept;  // exceptions thrown by sink.on_tick()
  std::uint64_t loop_errors() const noexcept;  // unexpected errors the thread recovered from

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace omni::kv
