#include <omni/kv_subscriber.hpp>

#include "kv_publisher.hpp"  // the simulator's vLLM-style publisher (omni_sim_lib)

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>
#include <msgpack.hpp>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <variant>
#include <vector>

namespace omni::kv {
namespace {

using namespace std::chrono_literals;
using Clock = KvFeed::Clock;

// =============================================================================================
// KvFeed: sequence logic with injected time
// =============================================================================================

const Clock::time_point t0 = Clock::time_point{} + 1h;

std::string p(std::int64_t seq) {
  return "p" + std::to_string(seq);
}

// The actions in the order the transport carries them out, e.g. "reset:restart 0 1 replay:2".
std::string log_of(const KvFeed::Actions& a) {
  std::string out;
  auto add = [&](const std::string& token) {
    if (!out.empty()) out += ' ';
    out += token;
  };
  if (a.abandon_replay) add("abandon");
  if (a.reset) add("reset:" + std::string(to_string(a.reset_reason)));
  for (const auto& [seq, payload] : a.deliver) add(payload == p(seq) ? std::to_string(seq) : "BAD");
  if (a.request_replay_from) add("replay:" + std::to_string(*a.request_replay_from));
  return out;
}

KvFeed::Options feed_options() {
  KvFeed::Options o;
  o.replay_timeout = 100ms;
  o.replay_retry_min = 10ms;
  o.replay_retry_max = 40ms;
  o.max_replay_attempts = 3;
  return o;
}

struct Feed {
  explicit Feed(std::int64_t resume_after = -1, KvFeed::Options o = feed_options())
      : feed(o, resume_after) {}
  std::string live(std::int64_t seq, Clock::time_point now = t0) {
    return log_of(feed.on_live(seq, p(seq), now));
  }
  std::string replayed(std::int64_t seq, Clock::time_point now = t0) {
    return log_of(feed.on_replayed(seq, p(seq), now));
  }
  std::string end(Clock::time_point now = t0) { return log_of(feed.on_replay_end(now)); }
  std::string tick(Clock::time_point now) { return log_of(feed.on_tick(now)); }
  KvFeed feed;
};

TEST(KvFeed, DeliversInOrderFromZero) {
  Feed f;
  EXPECT_EQ(f.live(0), "0");
  EXPECT_EQ(f.live(1), "1");
  EXPECT_EQ(f.live(2), "2");
  EXPECT_EQ(f.feed.last_applied(), 2);
  EXPECT_FALSE(f.feed.replaying());
  EXPECT_EQ(f.feed.stats().live, 3u);
  EXPECT_EQ(f.feed.stats().gaps, 0u);
}

TEST(KvFeed, StartAsksForEverythingAfterTheLastApplied) {
  Feed fresh;
  EXPECT_EQ(log_of(fresh.feed.on_start(t0)), "replay:0");
  EXPECT_EQ(fresh.replayed(0), "0");
  EXPECT_EQ(fresh.replayed(1), "1");
  EXPECT_EQ(fresh.end(), "");
  EXPECT_FALSE(fresh.feed.replaying());
  EXPECT_EQ(fresh.live(2), "2");
  EXPECT_EQ(fresh.feed.stats().replays_completed, 1u);

  Feed resumed(41);
  EXPECT_EQ(log_of(resumed.feed.on_start(t0)), "replay:42");
  EXPECT_EQ(resumed.end(), "");  // nothing new: caught up, no reset
  EXPECT_EQ(resumed.live(42), "42");

  Feed no_replay;
  no_replay.feed.replay_supported = false;
  EXPECT_EQ(log_of(no_replay.feed.on_start(t0)), "");
}

TEST(KvFeed, AStartReplayNobodyAnswersGoesLiveWithoutAReset) {
  Feed f(7);
  EXPECT_EQ(log_of(f.feed.on_start(t0)), "replay:8");
  EXPECT_EQ(f.tick(t0 + 150ms), "abandon");  // no reset: the index of 0..7 stays
  EXPECT_FALSE(f.feed.replaying());
  EXPECT_EQ(f.feed.last_applied(), 7);
  EXPECT_EQ(f.live(8), "8");
  EXPECT_EQ(f.feed.stats().unrecoverable, 0u);
}

TEST(KvFeed, FirstBatchAfterZeroIsAGapReplayedFromZero) {
  Feed f;
  EXPECT_EQ(f.live(3), "replay:0");
  EXPECT_TRUE(f.feed.replaying());
  EXPECT_TRUE(f.feed.awaiting_replay());
  EXPECT_EQ(f.replayed(0), "0");
  EXPECT_EQ(f.replayed(1), "1");
  EXPECT_EQ(f.replayed(2), "2");
  EXPECT_EQ(f.replayed(3), "3");
  EXPECT_EQ(f.end(), "");  // the held 3 is a duplicate now
  EXPECT_FALSE(f.feed.replaying());
  EXPECT_EQ(f.live(4), "4");
  const auto& s = f.feed.stats();
  EXPECT_EQ(s.gaps, 1u);
  EXPECT_EQ(s.replays_requested, 1u);
  EXPECT_EQ(s.replays_completed, 1u);
  EXPECT_EQ(s.replayed, 4u);
  EXPECT_EQ(s.duplicates, 1u);
  EXPECT_EQ(s.restarts + s.unrecoverable, 0u);
}

TEST(KvFeed, ResumeAfterContinuesOrReplaysFromTheNextSeq) {
  Feed in_order(10);
  EXPECT_EQ(in_order.feed.last_applied(), 10);
  EXPECT_EQ(in_order.live(11), "11");

  Feed gap(10);
  EXPECT_EQ(gap.live(20), "replay:11");
  EXPECT_EQ(gap.replayed(11), "11");
  for (int s = 12; s <= 20; ++s) EXPECT_EQ(gap.replayed(s), std::to_string(s));
  EXPECT_EQ(gap.end(), "");
  EXPECT_EQ(gap.feed.last_applied(), 20);
}

TEST(KvFeed, FirstLiveBatchNotAboveResumeAfterIsARestart) {
  Feed f(10);
  EXPECT_EQ(f.live(3), "reset:restart replay:0");
  EXPECT_EQ(f.feed.stats().restarts, 1u);
  Feed g(10);
  EXPECT_EQ(g.live(0), "reset:restart 0");
  Feed h(10);
  EXPECT_EQ(h.live(10), "reset:restart replay:0");  // the engine is not past what was applied
}

TEST(KvFeed, LiveBatchesAreHeldDuringTheReplayAndDeliveredAtTheEnd) {
  Feed f;
  EXPECT_EQ(f.live(0), "0");
  EXPECT_EQ(f.live(1), "1");
  EXPECT_EQ(f.live(3), "replay:2");
  EXPECT_EQ(f.live(4), "");
  EXPECT_EQ(f.live(5), "");
  EXPECT_EQ(f.feed.pending(), 3u);
  EXPECT_EQ(f.replayed(2), "2");
  EXPECT_EQ(f.replayed(3), "3");
  EXPECT_EQ(f.end(), "4 5");
  EXPECT_EQ(f.live(6), "6");
  EXPECT_EQ(f.feed.pending(), 0u);
}

TEST(KvFeed, LiveStreamCatchingUpWithTheReplayIsNotARestart) {
  Feed f;
  EXPECT_EQ(f.live(0), "0");
  EXPECT_EQ(f.live(3), "replay:1");
  // The engine published up to 6 before answering; live 4..6 are still on their way.
  for (int s = 1; s <= 6; ++s) EXPECT_EQ(f.replayed(s), std::to_string(s));
  EXPECT_EQ(f.end(), "");
  EXPECT_EQ(f.live(4), "");
  EXPECT_EQ(f.live(5), "");
  EXPECT_EQ(f.live(6), "");
  EXPECT_EQ(f.live(7), "7");
  EXPECT_EQ(f.feed.stats().restarts, 0u);
  EXPECT_EQ(f.feed.stats().duplicates, 4u);  // held 3, live 4, 5, 6
}

TEST(KvFeed, DuplicateAndStaleReplayedBatchesAreIgnored) {
  Feed f;
  EXPECT_EQ(f.replayed(0), "");  // no request out
  EXPECT_EQ(f.end(), "");
  EXPECT_EQ(f.feed.stats().replayed, 0u);
  EXPECT_EQ(f.live(0), "0");
  EXPECT_EQ(f.live(1), "1");
  EXPECT_EQ(f.live(4), "replay:2");
  EXPECT_EQ(f.replayed(1), "");  // duplicate
  EXPECT_EQ(f.replayed(2), "2");
  EXPECT_EQ(f.replayed(2), "");
  EXPECT_EQ(f.replayed(3), "3");
  EXPECT_EQ(f.end(), "4");
  EXPECT_EQ(f.feed.stats().duplicates, 2u);
}

TEST(KvFeed, ReplayStartingLaterThanAskedIsUnrecoverable) {
  Feed f;
  EXPECT_EQ(f.live(0), "0");
  EXPECT_EQ(f.live(1), "1");
  EXPECT_EQ(f.live(10), "replay:2");
  // The engine's buffer starts at 7.
  EXPECT_EQ(f.replayed(7), "reset:unrecoverable 7");
  EXPECT_EQ(f.replayed(8), "8");
  EXPECT_EQ(f.replayed(9), "9");
  EXPECT_EQ(f.replayed(10), "10");
  EXPECT_EQ(f.end(), "");
  EXPECT_EQ(f.feed.stats().unrecoverable, 1u);
  EXPECT_EQ(f.live(11), "11");
}

TEST(KvFeed, EmptyReplayIsUnrecoverableAndContinuesFromTheHeldBatches) {
  Feed f;
  EXPECT_EQ(f.live(10), "replay:0");
  EXPECT_EQ(f.live(11), "");
  EXPECT_EQ(f.end(), "reset:unrecoverable 10 11");
  EXPECT_EQ(f.feed.stats().unrecoverable, 1u);
  EXPECT_EQ(f.feed.stats().replays_completed, 1u);
  EXPECT_FALSE(f.feed.replaying());
}

TEST(KvFeed, HoleInsideAReplayIsAskedForAgain) {
  Feed f;
  EXPECT_EQ(f.live(0), "0");
  EXPECT_EQ(f.live(6), "replay:1");
  EXPECT_EQ(f.replayed(1), "1");
  EXPECT_EQ(f.replayed(2), "2");
  EXPECT_EQ(f.replayed(4), "");  // 3 lost on the way: held
  EXPECT_EQ(f.replayed(5), "");
  EXPECT_EQ(f.end(), "replay:3");
  EXPECT_EQ(f.replayed(3), "3");
  EXPECT_EQ(f.replayed(4), "4");
  EXPECT_EQ(f.replayed(5), "5");
  EXPECT_EQ(f.replayed(6), "6");
  EXPECT_EQ(f.end(), "");
  EXPECT_EQ(f.feed.stats().unrecoverable, 0u);
  EXPECT_EQ(f.feed.stats().replays_requested, 2u);
  EXPECT_EQ(f.feed.last_applied(), 6);
}

TEST(KvFeed, RestartResetsAndStartsANewRun) {
  Feed f;
  for (int s = 0; s <= 5; ++s) EXPECT_EQ(f.live(s), std::to_string(s));
  EXPECT_EQ(f.live(0), "reset:restart 0");
  EXPECT_EQ(f.live(1), "1");
  EXPECT_EQ(f.feed.stats().restarts, 1u);

  Feed g;
  for (int s = 0; s <= 5; ++s) EXPECT_EQ(g.live(s), std::to_string(s));
  EXPECT_EQ(g.live(5), "reset:restart replay:0");  // a repeated seq is a new run too
  EXPECT_EQ(g.replayed(0), "0");
  for (int s = 1; s <= 5; ++s) EXPECT_EQ(g.replayed(s), std::to_string(s));
  EXPECT_EQ(g.end(), "");
  EXPECT_EQ(g.live(6), "6");
}

TEST(KvFeed, RestartDuringAReplayAbandonsIt) {
  Feed f;
  EXPECT_EQ(f.live(0), "0");
  EXPECT_EQ(f.live(5), "replay:1");
  EXPECT_EQ(f.live(6), "");
  EXPECT_EQ(f.live(2), "abandon reset:restart replay:0");
  EXPECT_EQ(f.feed.pending(), 1u);  // only the new run's 2
  EXPECT_EQ(f.replayed(0), "0");
  EXPECT_EQ(f.replayed(1), "1");
  EXPECT_EQ(f.replayed(2), "2");
  EXPECT_EQ(f.end(), "");
  EXPECT_EQ(f.live(3), "3");
  EXPECT_EQ(f.feed.stats().restarts, 1u);
}

TEST(KvFeed, ReplayTimeoutRetriesWithBackoffThenGivesUp) {
  Feed f;  // timeout 100 ms, retries after 10 then 20 ms, 3 attempts
  EXPECT_EQ(f.live(0, t0), "0");
  EXPECT_EQ(f.live(5, t0), "replay:1");
  EXPECT_EQ(f.live(6, t0 + 50ms), "");
  EXPECT_EQ(f.tick(t0 + 99ms), "");
  EXPECT_EQ(f.tick(t0 + 100ms), "abandon");
  EXPECT_TRUE(f.feed.replaying());
  EXPECT_FALSE(f.feed.awaiting_replay());
  EXPECT_EQ(f.replayed(1, t0 + 105ms), "");  // stale: that attempt was abandoned
  EXPECT_EQ(f.live(7, t0 + 105ms), "");
  EXPECT_EQ(f.tick(t0 + 109ms), "");
  EXPECT_EQ(f.tick(t0 + 110ms), "replay:1");
  EXPECT_EQ(f.tick(t0 + 210ms), "abandon");
  EXPECT_EQ(f.tick(t0 + 229ms), "");
  EXPECT_EQ(f.tick(t0 + 230ms), "replay:1");
  EXPECT_EQ(f.tick(t0 + 330ms), "abandon reset:unrecoverable 5 6 7");
  EXPECT_FALSE(f.feed.replaying());
  EXPECT_EQ(f.live(8), "8");
  const auto& s = f.feed.stats();
  EXPECT_EQ(s.replays_requested, 3u);
  EXPECT_EQ(s.replays_failed, 3u);
  EXPECT_EQ(s.unrecoverable, 1u);
}

TEST(KvFeed, BackoffDoublesUpToTheMaximum) {
  KvFeed::Options o = feed_options();
  o.max_replay_attempts = 10;
  Feed f(-1, o);
  EXPECT_EQ(f.live(3, t0), "replay:0");
  Clock::time_point now = t0;
  for (auto wait : {10ms, 20ms, 40ms, 40ms, 40ms}) {
    now += 100ms;
    EXPECT_EQ(f.tick(now), "abandon");
    EXPECT_EQ(f.tick(now + wait - 1ms), "");
    now += wait;
    EXPECT_EQ(f.tick(now), "replay:0");
  }
}

TEST(KvFeed, ReplayedBatchesExtendTheDeadline) {
  Feed f;
  EXPECT_EQ(f.live(3, t0), "replay:0");
  EXPECT_EQ(f.replayed(0, t0 + 90ms), "0");
  EXPECT_EQ(f.tick(t0 + 150ms), "");
  EXPECT_EQ(f.tick(t0 + 190ms), "abandon");
}

TEST(KvFeed, GivingUpWithAHoleAmongTheHeldBatchesAsksAgain) {
  KvFeed::Options o = feed_options();
  o.max_replay_attempts = 1;
  Feed f(-1, o);
  EXPECT_EQ(f.live(0, t0), "0");
  EXPECT_EQ(f.live(3, t0), "replay:1");
  EXPECT_EQ(f.live(5, t0), "");  // 4 lost too
  EXPECT_EQ(f.tick(t0 + 100ms), "abandon reset:unrecoverable 3 replay:4");
  EXPECT_EQ(f.replayed(4, t0 + 110ms), "4");
  EXPECT_EQ(f.replayed(5, t0 + 110ms), "5");
  EXPECT_EQ(f.end(t0 + 110ms), "");
}

TEST(KvFeed, WithoutReplayAGapResetsAndContinues) {
  Feed f;
  f.feed.replay_supported = false;
  EXPECT_EQ(f.live(0), "0");
  EXPECT_EQ(f.live(1), "1");
  EXPECT_EQ(f.live(5), "reset:unrecoverable 5");
  EXPECT_EQ(f.live(6), "6");
  EXPECT_FALSE(f.feed.replaying());
  EXPECT_EQ(f.feed.stats().gaps, 1u);
  EXPECT_EQ(f.feed.stats().unrecoverable, 1u);
  EXPECT_EQ(f.feed.stats().replays_requested, 0u);

  Feed first;
  first.feed.replay_supported = false;
  EXPECT_EQ(first.live(3), "reset:unrecoverable 3");

  Feed restart;  // one reset, with the restart as its reason
  restart.feed.replay_supported = false;
  for (int s = 0; s <= 5; ++s) EXPECT_EQ(restart.live(s), std::to_string(s));
  EXPECT_EQ(restart.live(2), "reset:restart 2");
  EXPECT_EQ(restart.feed.stats().restarts, 1u);
  EXPECT_EQ(restart.feed.stats().unrecoverable, 1u);
}

TEST(KvFeed, PendingOverflowDropsTheOldestAndTheNextReplayFetchesThem) {
  KvFeed::Options o = feed_options();
  o.max_pending = 3;
  Feed f(-1, o);
  EXPECT_EQ(f.live(0), "0");
  EXPECT_EQ(f.live(2), "replay:1");
  for (int s = 3; s <= 6; ++s) EXPECT_EQ(f.live(s), "");
  EXPECT_EQ(f.feed.pending(), 3u);  // 4, 5, 6
  EXPECT_EQ(f.feed.stats().pending_dropped, 2u);
  // The engine answered before publishing 3: the replay ends at 2.
  EXPECT_EQ(f.replayed(1), "1");
  EXPECT_EQ(f.replayed(2), "2");
  EXPECT_EQ(f.end(), "replay:3");
  EXPECT_EQ(f.replayed(3), "3");
  EXPECT_EQ(f.replayed(4), "4");
  EXPECT_EQ(f.end(), "5 6");
  EXPECT_EQ(f.feed.stats().unrecoverable, 0u);
}

TEST(KvFeed, NegativeSeqIsIgnored) {
  Feed f;
  EXPECT_EQ(f.live(-5), "");
  EXPECT_EQ(f.live(0), "0");
  EXPECT_EQ(f.live(std::numeric_limits<std::int64_t>::max()), "replay:1");
}

// =============================================================================================
// KvSubscriber: real ZMQ sockets on loopback
// =============================================================================================

bool wait_until(const std::function<bool()>& pred, std::chrono::milliseconds timeout = 3000ms) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    if (pred()) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(2ms);
  }
}

// Calls `publish_next` every 10 ms until `pred` holds (false after `timeout`): the way past
// PUB/SUB's slow joiner.
bool publish_until(const std::function<void()>& publish_next, const std::function<bool()>& pred,
                   std::chrono::milliseconds timeout = 3000ms) {
  const auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    publish_next();
    if (wait_until(pred, 10ms)) return true;
  }
  return false;
}

enum class HashKind { kInt, kBytes };

// Waits until the subscriber's stats have caught up with `last`, the last seq the sink got
// (stats are published after the batches of a wakeup are applied) and no replay is running.
bool settled(const KvSubscriber& sub, std::uint32_t instance, std::int64_t last) {
  return wait_until([&] {
    const InstanceFeedStats st = sub.stats(instance);
    return st.last_seq == last && !st.replaying;
  });
}

ExternalHash hash_of(HashKind kind, std::int64_t i) {
  if (kind == HashKind::kInt) return ExternalHash::from_int(0x8000000000000000ULL + 7 * i);
  return ExternalHash::from_bytes(std::string(31, 'h') + static_cast<char>('a' + i % 26));
}

std::vector<Event> events_for(HashKind kind, std::int64_t seq) {
  BlockStored stored;
  stored.block_hashes = {hash_of(kind, 2 * seq), hash_of(kind, 2 * seq + 1)};
  if (seq > 0) stored.parent_block_hash = hash_of(kind, 2 * seq - 1);
  for (std::uint32_t t = 0; t < 8; ++t)
    stored.token_ids.push_back(static_cast<std::uint32_t>(seq) * 8 + t);
  stored.block_size = 4;
  stored.medium = "GPU";
  std::vector<Event> events{stored};
  if (seq % 2 == 1) events.emplace_back(BlockRemoved{{hash_of(kind, 2 * seq - 2)}, "GPU"});
  return events;
}

double ts_for(std::int64_t seq) {
  return 1718000000.0 + static_cast<double>(seq) / 8;
}

EventBatch batch_for(HashKind kind, std::int64_t seq) {
  return EventBatch{ts_for(seq), events_for(kind, seq), 0};
}

struct Record {
  std::uint32_t instance = 0;
  bool reset = false;
  ResetReason reason = ResetReason::kRestart;
  std::int64_t seq = -1;
  EventBatch batch;
};

class RecordingSink : public KvSink {
 public:
  void on_batch(std::uint32_t instance, std::int64_t seq, const EventBatch& batch) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      log_.push_back({instance, false, ResetReason::kRestart, seq, batch});
    }
    if (throw_on_batch_every > 0 && seq % throw_on_batch_every == 0) {
      throw std::runtime_error("sink failure");
    }
  }
  void on_reset(std::uint32_t instance, ResetReason reason) override {
    std::lock_guard<std::mutex> lock(mutex_);
    log_.push_back({instance, true, reason, -1, {}});
  }
  bool on_tick() override {
    const int n = ++ticks;
    if (throw_on_tick) throw std::runtime_error("tick failure");
    return stop_after_ticks == 0 || n < stop_after_ticks;
  }

  std::vector<Record> log(std::uint32_t instance) const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<Record> out;
    for (const Record& r : log_) {
      if (r.instance == instance) out.push_back(r);
    }
    return out;
  }
  // Seqs applied to the instance since its last reset.
  std::vector<std::int64_t> run(std::uint32_t instance) const {
    std::vector<std::int64_t> out;
    for (const Record& r : log(instance)) {
      if (r.reset) {
        out.clear();
      } else {
        out.push_back(r.seq);
      }
    }
    return out;
  }
  std::vector<ResetReason> resets(std::uint32_t instance) const {
    std::vector<ResetReason> out;
    for (const Record& r : log(instance)) {
      if (r.reset) out.push_back(r.reason);
    }
    return out;
  }
  bool saw_batch(std::uint32_t instance) const { return !run(instance).empty(); }
  bool has(std::uint32_t instance, std::int64_t seq) const {
    for (const Record& r : log(instance)) {
      if (!r.reset && r.seq == seq) return true;
    }
    return false;
  }

  int throw_on_batch_every = 0;
  bool throw_on_tick = false;
  int stop_after_ticks = 0;
  std::atomic<int> ticks{0};

 private:
  mutable std::mutex mutex_;
  std::vector<Record> log_;
};

std::vector<std::int64_t> iota(std::int64_t from, std::int64_t to_inclusive) {
  std::vector<std::int64_t> out;
  for (std::int64_t s = from; s <= to_inclusive; ++s) out.push_back(s);
  return out;
}

KvSubscriberOptions fast_options() {
  KvSubscriberOptions o;
  o.reconnect_min = 10ms;
  o.reconnect_max = 100ms;
  o.tick_interval = 10ms;
  o.feed.replay_timeout = 1000ms;
  o.feed.replay_retry_min = 20ms;
  o.feed.replay_retry_max = 200ms;
  o.feed.max_replay_attempts = 3;
  return o;
}

// A free loopback port: bound once, then released. A plain socket, closed synchronously (a
// ZMQ listener is closed later by its I/O thread, and a subscriber could still reach it).
int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  int port = -1;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0) {
    port = ntohs(addr.sin_port);
  }
  ::close(fd);
  return port;
}

// An engine driven by hand: raw PUB and ROUTER sockets, so tests can skip sequence numbers,
// send malformed messages, lose the replay buffer's head or leave replay requests unanswered.
class FakeEngine {
 public:
  explicit FakeEngine(bool with_replay, HashKind kind = HashKind::kInt) : kind_(kind) {
    pub_.set(zmq::sockopt::linger, 0);
    pub_.set(zmq::sockopt::sndhwm, 100000);
    pub_.bind("tcp://127.0.0.1:*");
    pub_endpoint_ = pub_.get(zmq::sockopt::last_endpoint);
    if (with_replay) {
      router_.emplace(ctx_, zmq::socket_type::router);
      router_->set(zmq::sockopt::linger, 0);
      router_->bind("tcp://127.0.0.1:*");
      replay_endpoint_ = router_->get(zmq::sockopt::last_endpoint);
      thread_ = std::thread([this] { serve(); });
    }
  }
  ~FakeEngine() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }

  const std::string& pub_endpoint() const { return pub_endpoint_; }
  const std::string& replay_endpoint() const { return replay_endpoint_; }
  std::int64_t next_seq() const { return next_; }

  // Publishes the next batch; `live` false loses it on the PUB side (still replayable).
  void publish(bool live = true) {
    const std::int64_t seq = next_++;
    publish_payload(seq, encode_batch(batch_for(kind_, seq)), live);
  }
  void publish_payload(std::int64_t seq, const std::string& payload, bool live = true) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ring_[seq] = payload;
    }
    if (live) send_raw({"", encode_seq(seq), payload});
  }
  void skip_seq() { ++next_; }
  void send_raw(const std::vector<std::string>& frames) {
    std::vector<zmq::const_buffer> buffers;
    for (const std::string& f : frames) buffers.push_back(zmq::buffer(f));
    ASSERT_TRUE(zmq::send_multipart(pub_, buffers, zmq::send_flags::dontwait));
  }
  std::vector<std::int64_t> requests() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return requests_;
  }

  std::atomic<bool> answer_replays{true};

 private:
  void serve() {
    while (!stop_) {
      zmq::pollitem_t item{router_->handle(), 0, ZMQ_POLLIN, 0};
      zmq::poll(&item, 1, 10ms);
      if ((item.revents & ZMQ_POLLIN) == 0) continue;
      std::vector<zmq::message_t> request;
      if (!zmq::recv_multipart(*router_, std::back_inserter(request))) continue;
      if (request.size() != 3 || request[1].size() != 0 || request[2].size() != 8) continue;
      const std::int64_t start = decode_seq(request[2].to_string_view());
      std::vector<std::pair<std::int64_t, std::string>> batches;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        requests_.push_back(start);
        for (auto it = ring_.lower_bound(start); it != ring_.end(); ++it) batches.push_back(*it);
      }
      if (!answer_replays) continue;
      const std::string identity = request[0].to_string();
      auto send = [&](std::int64_t seq, const std::string& payload) {
        const std::string seq_frame = encode_seq(seq);
        std::array<zmq::const_buffer, 4> frames = {zmq::buffer(identity), zmq::const_buffer(),
                                                   zmq::buffer(seq_frame), zmq::buffer(payload)};
        zmq::send_multipart(*router_, frames);
      };
      for (const auto& [seq, payload] : batches) send(seq, payload);
      send(kReplayEndSeq, std::string());
    }
  }

  HashKind kind_;
  zmq::context_t ctx_{1};
  zmq::socket_t pub_{ctx_, zmq::socket_type::pub};
  std::optional<zmq::socket_t> router_;
  std::string pub_endpoint_, replay_endpoint_;
  std::int64_t next_ = 0;
  mutable std::mutex mutex_;
  std::map<std::int64_t, std::string> ring_;
  std::vector<std::int64_t> requests_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Two simulator engines with the given encodings; every batch reaches its own instance, in
// order from 0 (the ones the SUB joined too late for come through the replay), decoded exactly.
void check_two_sim_engines(sim::KvPublisherOptions a_options, HashKind a_kind,
                           sim::KvPublisherOptions b_options, HashKind b_kind) {
  zmq::context_t ctx(1);
  sim::KvEventPublisher a(ctx, a_options);
  sim::KvEventPublisher b(ctx, b_options);
  sim::ReplayService service;
  service.start({&a, &b});

  RecordingSink sink;
  KvSubscriber sub({{a.pub_endpoint(), a.replay_endpoint(), ""},
                    {b.pub_endpoint(), b.replay_endpoint(), b_options.topic}},
                   sink, fast_options());
  ASSERT_EQ(sub.size(), 2u);
  sub.start();
  EXPECT_TRUE(sub.running());

  std::int64_t na = 0, nb = 0;
  auto publish_both = [&] {
    a.publish(events_for(a_kind, na), ts_for(na));
    ++na;
    b.publish(events_for(b_kind, nb), ts_for(nb));
    ++nb;
  };
  ASSERT_TRUE(publish_until(publish_both, [&] { return sink.saw_batch(0) && sink.saw_batch(1); }));
  for (int i = 0; i < 20; ++i) publish_both();
  ASSERT_TRUE(wait_until([&] { return sink.has(0, na - 1) && sink.has(1, nb - 1); }));

  for (std::uint32_t inst : {0u, 1u}) {
    const HashKind kind = inst == 0 ? a_kind : b_kind;
    const auto log = sink.log(inst);
    ASSERT_EQ(log.size(), static_cast<std::size_t>(inst == 0 ? na : nb)) << "instance " << inst;
    for (std::size_t s = 0; s < log.size(); ++s) {
      ASSERT_FALSE(log[s].reset);
      ASSERT_EQ(log[s].seq, static_cast<std::int64_t>(s));
      ASSERT_EQ(log[s].batch, batch_for(kind, log[s].seq)) << "instance " << inst << " seq " << s;
    }
    const InstanceFeedStats st = sub.stats(inst);
    EXPECT_EQ(st.batches_applied, log.size());
    EXPECT_EQ(st.last_seq, static_cast<std::int64_t>(log.size()) - 1);
    EXPECT_EQ(st.malformed, 0u);
    EXPECT_EQ(st.resets, 0u);
    EXPECT_EQ(st.feed.restarts + st.feed.unrecoverable, 0u);
    EXPECT_GT(st.events_applied, st.batches_applied);
    EXPECT_GT(st.last_batch_unix_ms, 0u);
    // Counted from ZMQ's socket monitor, which can trail the data: wait for it.
    EXPECT_TRUE(wait_until([&] { return sub.stats(inst).connects >= 1u; }));
  }
  sub.stop();
  EXPECT_FALSE(sub.running());
  service.stop();
}

TEST(KvSubscriber, TwoEnginesArrayIntAndMapBytesInOrderToTheirInstances) {
  sim::KvPublisherOptions a;  // vLLM array form, int hashes
  sim::KvPublisherOptions b;  // vLLM map form, byte hashes, a topic
  b.encode = {EventEncoding::kMap, EventLayout::kVllm};
  b.topic = "kv@engine-b";
  check_two_sim_engines(a, HashKind::kInt, b, HashKind::kBytes);
}

TEST(KvSubscriber, TwoEnginesMapIntAndSglangArrayBytesInOrderToTheirInstances) {
  sim::KvPublisherOptions a;
  a.encode = {EventEncoding::kMap, EventLayout::kVllm};
  sim::KvPublisherOptions b;
  b.encode = {EventEncoding::kArray, EventLayout::kSglang};
  check_two_sim_engines(a, HashKind::kInt, b, HashKind::kBytes);
}

TEST(KvSubscriber, TopicFilterDropsOtherTopics) {
  FakeEngine engine(true);
  RecordingSink sink;
  KvSubscriber sub({{engine.pub_endpoint(), engine.replay_endpoint(), "kv"}}, sink, fast_options());
  sub.start();
  // Only "kv"-prefixed messages pass; the FakeEngine's own topic is "", so send by hand.
  std::int64_t seq = 0;
  auto publish = [&] {
    const std::string payload = encode_batch(batch_for(HashKind::kInt, seq));
    engine.send_raw({"other", encode_seq(seq), payload});
    engine.send_raw({"kv-a", encode_seq(seq), payload});
    ++seq;
  };
  ASSERT_TRUE(publish_until(publish, [&] { return sink.saw_batch(0); }));
  // The replay has nothing (the raw messages are not in the ring), so the join may reset; what
  // follows must be the "kv" stream only, without duplicates.
  const std::int64_t last = seq - 1;
  ASSERT_TRUE(wait_until([&] { return sink.has(0, last); }));
  const auto run = sink.run(0);
  ASSERT_FALSE(run.empty());
  EXPECT_EQ(run, iota(run.front(), last));
  EXPECT_EQ(sub.stats(0).malformed, 0u);
}

TEST(KvSubscriber, GapIsRecoveredThroughReplay) {
  FakeEngine engine(true);
  RecordingSink sink;
  KvSubscriber sub({{engine.pub_endpoint(), engine.replay_endpoint(), ""}}, sink, fast_options());
  sub.start();
  ASSERT_TRUE(publish_until([&] { engine.publish(); }, [&] { return sink.saw_batch(0); }));
  ASSERT_TRUE(wait_until([&] { return sink.has(0, engine.next_seq() - 1); }));
  ASSERT_TRUE(settled(sub, 0, engine.next_seq() - 1));
  const InstanceFeedStats before = sub.stats(0);

  engine.publish(/*live=*/false);
  engine.publish(/*live=*/false);
  engine.publish(/*live=*/false);
  for (int i = 0; i < 5; ++i) engine.publish();
  const std::int64_t last = engine.next_seq() - 1;
  ASSERT_TRUE(wait_until([&] { return sink.has(0, last) && !sub.stats(0).replaying; }));

  EXPECT_EQ(sink.run(0), iota(0, last));
  EXPECT_TRUE(sink.resets(0).empty());
  const InstanceFeedStats after = sub.stats(0);
  EXPECT_EQ(after.feed.gaps, before.feed.gaps + 1);
  EXPECT_EQ(after.feed.replays_completed, before.feed.replays_completed + 1);
  EXPECT_EQ(after.feed.unrecoverable, 0u);
  EXPECT_EQ(after.batches_applied, static_cast<std::uint64_t>(last + 1));
  EXPECT_EQ(after.last_seq, last);
}

TEST(KvSubscriber, GapWithoutReplaySocketResetsAsUnrecoverable) {
  FakeEngine engine(false);
  RecordingSink sink;
  KvSubscriber sub({{engine.pub_endpoint(), "", ""}}, sink, fast_options());
  sub.start();
  ASSERT_TRUE(publish_until([&] { engine.publish(); }, [&] { return sink.saw_batch(0); }));
  ASSERT_TRUE(wait_until([&] { return sink.has(0, engine.next_seq() - 1); }));
  const std::size_t resets_before = sink.resets(0).size();  // 1 if the SUB joined after seq 0

  engine.publish(/*live=*/false);
  engine.publish(/*live=*/false);
  const std::int64_t resumed = engine.next_seq();
  for (int i = 0; i < 5; ++i) engine.publish();
  const std::int64_t last = engine.next_seq() - 1;
  ASSERT_TRUE(wait_until([&] { return sink.has(0, last); }));

  const auto resets = sink.resets(0);
  ASSERT_EQ(resets.size(), resets_before + 1);
  EXPECT_EQ(resets.back(), ResetReason::kUnrecoverable);
  EXPECT_EQ(sink.run(0), iota(resumed, last));
  const InstanceFeedStats st = sub.stats(0);
  EXPECT_EQ(st.feed.replays_requested, 0u);
  EXPECT_EQ(st.feed.unrecoverable, resets.size());
  EXPECT_EQ(st.resets, resets.size());
}

TEST(KvSubscriber, ReplayThatNeverAnswersIsUnrecoverableAfterRetries) {
  FakeEngine engine(true);
  engine.answer_replays = false;
  RecordingSink sink;
  KvSubscriberOptions options = fast_options();
  options.feed.replay_timeout = 100ms;
  options.feed.replay_retry_min = 10ms;
  options.feed.replay_retry_max = 20ms;
  options.feed.max_replay_attempts = 2;
  KvSubscriber sub({{engine.pub_endpoint(), engine.replay_endpoint(), ""}}, sink, options);
  sub.start();
  ASSERT_TRUE(publish_until([&] { engine.publish(); }, [&] { return sink.saw_batch(0); }));
  ASSERT_TRUE(wait_until([&] { return sink.has(0, engine.next_seq() - 1); }));
  ASSERT_TRUE(settled(sub, 0, engine.next_seq() - 1));
  const std::size_t resets_before = sink.resets(0).size();
  const std::uint64_t failed_before = sub.stats(0).feed.replays_failed;

  engine.publish(/*live=*/false);
  const std::int64_t resumed = engine.next_seq();
  engine.publish();
  ASSERT_TRUE(wait_until([&] { return sink.has(0, resumed); }));
  for (int i = 0; i < 3; ++i) engine.publish();
  const std::int64_t last = engine.next_seq() - 1;
  ASSERT_TRUE(wait_until([&] { return sink.has(0, last); }));

  const auto resets = sink.resets(0);
  ASSERT_EQ(resets.size(), resets_before + 1);
  EXPECT_EQ(resets.back(), ResetReason::kUnrecoverable);
  EXPECT_EQ(sink.run(0), iota(resumed, last));
  const InstanceFeedStats st = sub.stats(0);
  EXPECT_EQ(st.feed.replays_failed, failed_before + 2);
  EXPECT_GE(engine.requests().size(), 2u);
}

TEST(KvSubscriber, EngineRestartResetsThenDeliversTheNewRun) {
  zmq::context_t ctx(1);
  sim::KvPublisherOptions options;
  auto engine = std::make_unique<sim::KvEventPublisher>(ctx, options);
  auto service = std::make_unique<sim::ReplayService>();
  service->start({engine.get()});
  RecordingSink sink;
  KvSubscriber sub({{engine->pub_endpoint(), engine->replay_endpoint(), ""}}, sink, fast_options());
  sub.start();
  std::int64_t n = 0;
  auto publish = [&] {
    engine->publish(events_for(HashKind::kInt, n), ts_for(n));
    ++n;
  };
  ASSERT_TRUE(publish_until(publish, [&] { return sink.saw_batch(0); }));
  while (n < 100) publish();  // well past what the new run reaches before it is heard
  ASSERT_TRUE(wait_until([&] { return sink.has(0, 99); }));
  ASSERT_EQ(sink.run(0), iota(0, 99));

  // The engine dies; a new process binds the same ports and numbers from 0 again.
  service->stop();
  engine->close();
  options.pub_port = engine->pub_port();
  options.replay_port = engine->replay_port();
  service.reset();
  engine.reset();
  // The old sockets are closed by ZMQ's I/O thread: the ports may take a moment to free up.
  ASSERT_TRUE(wait_until([&] {
    try {
      engine = std::make_unique<sim::KvEventPublisher>(ctx, options);
      return true;
    } catch (const zmq::error_t&) {
      return false;
    }
  }));
  service = std::make_unique<sim::ReplayService>();
  service->start({engine.get()});
  n = 0;
  ASSERT_TRUE(publish_until(publish, [&] { return !sink.resets(0).empty(); }));
  for (int i = 0; i < 5; ++i) publish();
  ASSERT_TRUE(
      wait_until([&] { return sink.has(0, n - 1) && sink.run(0).size() == std::size_t(n); }));

  EXPECT_EQ(sink.resets(0), std::vector<ResetReason>{ResetReason::kRestart});
  EXPECT_EQ(sink.run(0), iota(0, n - 1));
  const InstanceFeedStats st = sub.stats(0);
  EXPECT_EQ(st.feed.restarts, 1u);
  EXPECT_EQ(st.feed.unrecoverable, 0u);
  // Counted from ZMQ's socket monitor, which can trail the data: wait for them.
  EXPECT_TRUE(wait_until([&] {
    const InstanceFeedStats now = sub.stats(0);
    return now.disconnects >= 1u && now.connects >= 2u;
  }));
  sub.stop();
  service->stop();
}

TEST(KvSubscriber, MalformedMessagesAreCountedAndSkipped) {
  FakeEngine engine(true);
  RecordingSink sink;
  KvSubscriber sub({{engine.pub_endpoint(), engine.replay_endpoint(), ""}}, sink, fast_options());
  sub.start();
  ASSERT_TRUE(publish_until([&] { engine.publish(); }, [&] { return sink.saw_batch(0); }));
  ASSERT_TRUE(wait_until([&] { return sink.has(0, engine.next_seq() - 1); }));
  ASSERT_TRUE(settled(sub, 0, engine.next_seq() - 1));
  const InstanceFeedStats before = sub.stats(0);

  const std::string good = encode_batch(batch_for(HashKind::kInt, 0));
  const std::int64_t next = engine.next_seq();
  engine.send_raw({"", encode_seq(next)});                  // 2 frames
  engine.send_raw({"", encode_seq(next).substr(1), good});  // 7-byte seq
  engine.send_raw({"", encode_seq(next), good, "extra"});   // 4 frames
  engine.send_raw({"", encode_seq(-5), good});              // negative seq
  // Not a batch, under a valid seq: counted, and the sequence moves on past it.
  engine.publish_payload(next, std::string("\xc1\x00garbage", 9));
  engine.skip_seq();
  const std::int64_t first_good = engine.next_seq();
  for (int i = 0; i < 3; ++i) engine.publish();
  const std::int64_t last = engine.next_seq() - 1;
  ASSERT_TRUE(wait_until([&] { return sink.has(0, last); }));

  const InstanceFeedStats after = sub.stats(0);
  EXPECT_EQ(after.malformed, before.malformed + 5);
  EXPECT_FALSE(sink.has(0, next));
  for (std::int64_t s = first_good; s <= last; ++s) EXPECT_TRUE(sink.has(0, s)) << s;
  EXPECT_EQ(after.feed.gaps, before.feed.gaps);  // the garbage batch took its place
  EXPECT_EQ(after.feed.replays_requested, before.feed.replays_requested);
  EXPECT_TRUE(sink.resets(0).empty());
  EXPECT_EQ(after.last_seq, last);
  EXPECT_EQ(after.batches_applied, static_cast<std::uint64_t>(last));  // all but the garbage
}

TEST(KvSubscriber, UnknownEventsAreSkippedAndCounted) {
  FakeEngine engine(true);
  RecordingSink sink;
  KvSubscriber sub({{engine.pub_endpoint(), engine.replay_endpoint(), ""}}, sink, fast_options());
  sub.start();
  ASSERT_TRUE(publish_until([&] { engine.publish(); }, [&] { return sink.saw_batch(0); }));
  // [ts, [["FutureEvent", 1], ["AllBlocksCleared"]], 0]
  msgpack::sbuffer buf;
  msgpack::packer<msgpack::sbuffer> pk(buf);
  pk.pack_array(3);
  pk.pack_double(1718000000.5);
  pk.pack_array(2);
  pk.pack_array(2);
  pk.pack(std::string("FutureEvent"));
  pk.pack(1);
  pk.pack_array(1);
  pk.pack(std::string("AllBlocksCleared"));
  pk.pack(0);
  const std::string payload(buf.data(), buf.size());
  const std::int64_t seq = engine.next_seq();
  engine.publish_payload(seq, payload);
  engine.skip_seq();
  ASSERT_TRUE(wait_until([&] { return sink.has(0, seq); }));
  const auto log = sink.log(0);
  ASSERT_EQ(log.back().batch.events.size(), 1u);
  EXPECT_TRUE(std::holds_alternative<AllBlocksCleared>(log.back().batch.events[0]));
  EXPECT_EQ(sub.stats(0).skipped_events, 1u);
}

TEST(KvSubscriber, ResumeAfterReplaysFromTheNextSeqOnFirstContact) {
  FakeEngine engine(true);
  for (int i = 0; i < 10; ++i) engine.publish();  // nobody listens yet
  RecordingSink sink;
  KvSubscriber sub({{engine.pub_endpoint(), engine.replay_endpoint(), ""}}, sink, fast_options(),
                   {4});
  EXPECT_EQ(sub.stats(0).last_seq, 4);
  sub.start();
  ASSERT_TRUE(publish_until([&] { engine.publish(); }, [&] { return sink.saw_batch(0); }));
  const std::int64_t last = engine.next_seq() - 1;
  ASSERT_TRUE(wait_until([&] { return sink.has(0, last); }));

  ASSERT_FALSE(engine.requests().empty());
  EXPECT_EQ(engine.requests().front(), 5);
  EXPECT_EQ(sink.run(0), iota(5, last));
  EXPECT_TRUE(sink.resets(0).empty());
}

TEST(KvSubscriber, ConnectsBeforeTheEngineExists) {
  zmq::context_t ctx(1);
  sim::KvPublisherOptions options;
  options.pub_port = free_port();
  do {
    options.replay_port = free_port();
  } while (options.replay_port == options.pub_port);
  ASSERT_GT(options.pub_port, 0);
  ASSERT_GT(options.replay_port, 0);
  RecordingSink sink;
  KvSubscriber sub({{"tcp://127.0.0.1:" + std::to_string(options.pub_port),
                     "tcp://127.0.0.1:" + std::to_string(options.replay_port), ""}},
                   sink, fast_options());
  sub.start();
  // Let it fail to connect a few times first.
  ASSERT_TRUE(wait_until([&] { return sink.ticks.load() >= 5; }));
  EXPECT_EQ(sub.stats(0).connects, 0u);

  sim::KvEventPublisher engine(ctx, options);
  sim::ReplayService service;
  service.start({&engine});
  std::int64_t n = 0;
  auto publish = [&] {
    engine.publish(events_for(HashKind::kBytes, n), ts_for(n));
    ++n;
  };
  ASSERT_TRUE(publish_until(publish, [&] { return sink.saw_batch(0); }));
  ASSERT_TRUE(wait_until([&] { return sink.has(0, n - 1); }));
  EXPECT_EQ(sink.run(0), iota(0, n - 1));
  // The connect is counted from ZMQ's socket monitor, a separate inproc stream that can be read
  // after the first data frames: wait for it rather than expect it at once.
  EXPECT_TRUE(wait_until([&] { return sub.stats(0).connects >= 1u; }));
  sub.stop();
  service.stop();
}

TEST(KvSubscriber, MalformedEndpointsAreCountedNotThrown) {
  FakeEngine engine(false);
  RecordingSink sink;
  KvSubscriber sub({{"not an endpoint", "", ""}, {engine.pub_endpoint(), "bogus://replay", ""}},
                   sink, fast_options());
  sub.start();
  ASSERT_TRUE(wait_until(
      [&] { return sub.stats(0).connect_errors == 1 && sub.stats(1).connect_errors == 1; }));
  // Instance 1 still works, its gaps skipped as there is no usable replay socket.
  ASSERT_TRUE(publish_until([&] { engine.publish(); }, [&] { return sink.saw_batch(1); }));
  EXPECT_TRUE(sub.running());
  EXPECT_EQ(sub.stats(1).feed.replays_requested, 0u);
  EXPECT_THROW(sub.stats(2), std::out_of_range);
}

TEST(KvSubscriber, SinkExceptionsAreCountedAndTheStreamGoesOn) {
  FakeEngine engine(true);
  RecordingSink sink;
  sink.throw_on_batch_every = 3;
  sink.throw_on_tick = true;
  KvSubscriber sub({{engine.pub_endpoint(), engine.replay_endpoint(), ""}}, sink, fast_options());
  sub.start();
  ASSERT_TRUE(publish_until([&] { engine.publish(); }, [&] { return sink.saw_batch(0); }));
  for (int i = 0; i < 6; ++i) engine.publish();
  const std::int64_t last = engine.next_seq() - 1;
  ASSERT_TRUE(wait_until([&] { return sink.has(0, last) && sub.tick_errors() > 0; }));
  EXPECT_EQ(sink.run(0), iota(0, last));
  const InstanceFeedStats st = sub.stats(0);
  EXPECT_EQ(st.sink_errors, static_cast<std::uint64_t>(last / 3 + 1));
  EXPECT_EQ(st.batches_applied + st.sink_errors, static_cast<std::uint64_t>(last + 1));
  EXPECT_TRUE(sub.running());
}

TEST(KvSubscriber, StopJoinsPromptlyAndIsIdempotent) {
  FakeEngine engine(true);
  RecordingSink sink;
  KvSubscriberOptions options = fast_options();
  options.tick_interval = 2000ms;
  KvSubscriber sub({{engine.pub_endpoint(), engine.replay_endpoint(), ""}}, sink, options);
  sub.start();
  sub.start();  // no second thread
  ASSERT_TRUE(wait_until([&] { return sub.stats(0).connects >= 1; }));
  const auto begin = Clock::now();
  sub.stop();
  const auto took = Clock::now() - begin;
  EXPECT_LT(took, 500ms);
  EXPECT_FALSE(sub.running());
  sub.stop();
}

TEST(KvSubscriber, SinkCanStopTheSubscriberFromOnTick) {
  RecordingSink sink;
  sink.stop_after_ticks = 3;
  KvSubscriber sub({}, sink, fast_options());
  EXPECT_EQ(sub.size(), 0u);
  sub.start();
  ASSERT_TRUE(wait_until([&] { return !sub.running(); }));
  EXPECT_EQ(sink.ticks.load(), 3);
}

TEST(KvSubscriber, ResumeAfterSizeMustMatch) {
  RecordingSink sink;
  EXPECT_THROW(KvSubscriber({{"tcp://127.0.0.1:1", "", ""}}, sink, {}, {1, 2}),
               std::invalid_argument);
}

}  // namespace
}  // namespace omni::kv
