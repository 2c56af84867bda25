#include <omni/kv_subscriber.hpp>

#include <zmq.hpp>
#include <zmq_addon.hpp>

#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace omni::kv {

std::string_view to_string(ResetReason reason) noexcept {
  switch (reason) {
    case ResetReason::kRestart:
      return "restart";
    case ResetReason::kUnrecoverable:
      return "unrecoverable";
  }
  return "unknown";
}

// =============================================================================================
// KvFeed
// =============================================================================================
namespace {

// True when `seq` is the batch right after `last` (seq >= 0, so seq - 1 cannot overflow).
bool follows(std::int64_t seq, std::int64_t last) noexcept {
  return seq >= 0 && seq - 1 == last;
}

std::int64_t next_after(std::int64_t last) noexcept {
  return last == std::numeric_limits<std::int64_t>::max() ? last : last + 1;
}

}  // namespace

KvFeed::KvFeed(Options options, std::int64_t resume_after)
    : options_(options), last_(std::max<std::int64_t>(resume_after, -1)) {
  options_.max_pending = std::max<std::size_t>(options_.max_pending, 1);
  options_.max_replay_attempts = std::max(options_.max_replay_attempts, 1);
}

void KvFeed::hold(std::int64_t seq, std::string payload) {
  auto [it, inserted] = pending_.try_emplace(seq, std::move(payload));
  if (!inserted) {
    ++stats_.duplicates;
    return;
  }
  while (pending_.size() > options_.max_pending) {
    pending_.erase(pending_.begin());
    ++stats_.pending_dropped;
  }
}

// A reset makes every batch before it moot, so deliveries already queued in `a` are dropped:
// the transport always applies the reset first. The first reason given is kept.
void KvFeed::mark_reset(Actions& a, ResetReason reason) {
  if (!a.reset) {
    a.reset = true;
    a.reset_reason = reason;
  }
  a.deliver.clear();
}

void KvFeed::request(Actions& a, Clock::time_point now) {
  a.request_replay_from = next_after(last_);
  state_ = State::kReplaying;
  deadline_ = now + options_.replay_timeout;
  attempt_received_ = false;
  ++stats_.replays_requested;
}

void KvFeed::drain(Actions& a) {
  while (!pending_.empty()) {
    auto it = pending_.begin();
    if (it->first <= last_) {
      ++stats_.duplicates;
      pending_.erase(it);
      continue;
    }
    if (!follows(it->first, last_)) break;
    last_ = it->first;
    a.deliver.emplace_back(it->first, std::move(it->second));
    pending_.erase(it);
  }
}

// In the live state: deliver what continues the sequence; a hole left is a gap, asked for by a
// replay or, without one, skipped with a reset.
void KvFeed::settle(Actions& a, Clock::time_point now) {
  for (;;) {
    drain(a);
    if (pending_.empty()) return;
    ++stats_.gaps;
    if (replay_supported) {
      request(a, now);
      return;
    }
    ++stats_.unrecoverable;
    mark_reset(a, ResetReason::kUnrecoverable);
    last_ = pending_.begin()->first - 1;  // > last_: the hole
  }
}

// The gap cannot be filled: reset, and go on from the earliest batch held.
void KvFeed::give_up(Actions& a, Clock::time_point now) {
  ++stats_.unrecoverable;
  mark_reset(a, ResetReason::kUnrecoverable);
  state_ = State::kLive;
  failures_ = 0;
  if (!pending_.empty() && pending_.begin()->first > last_) {
    last_ = pending_.begin()->first - 1;
  }
  settle(a, now);
}

KvFeed::Actions KvFeed::on_live(std::int64_t seq, std::string payload, Clock::time_point now) {
  Actions a;
  ++stats_.live;
  if (seq < 0) return a;  // not a batch number (the transport counts it as malformed)

  // The live stream never repeats or goes back within one engine run. Before any live batch,
  // `last_` is what a previous subscriber applied from this engine: a seq not above it is a
  // new run too.
  const bool restart = live_high_ ? seq <= *live_high_ : seq <= last_;
  if (restart) {
    ++stats_.restarts;
    mark_reset(a, ResetReason::kRestart);
    if (state_ != State::kLive) a.abandon_replay = true;
    state_ = State::kLive;
    pending_.clear();
    failures_ = 0;
    last_ = -1;
    live_high_.reset();
  }
  live_high_ = seq;

  if (seq <= last_) {  // a replay already delivered it; the live stream is catching up
    ++stats_.duplicates;
    return a;
  }
  hold(seq, std::move(payload));
  if (state_ == State::kLive) settle(a, now);
  return a;
}

KvFeed::Actions KvFeed::on_replayed(std::int64_t seq, std::string payload, Clock::time_point now) {
  Actions a;
  if (state_ != State::kReplaying || seq < 0) return a;  // stale: no request is out
  ++stats_.replayed;
  deadline_ = now + options_.replay_timeout;  // progress
  if (seq <= last_) {
    ++stats_.duplicates;
    return a;
  }
  const bool first = !attempt_received_;
  attempt_received_ = true;
  if (follows(seq, last_)) {
    last_ = seq;
    a.deliver.emplace_back(seq, std::move(payload));
    return a;
  }
  if (first) {
    // The replay starts later than asked: the engine's buffer no longer has last_+1..seq-1.
    ++stats_.unrecoverable;
    mark_reset(a, ResetReason::kUnrecoverable);
    last_ = seq;
    a.deliver.emplace_back(seq, std::move(payload));
    return a;
  }
  // A hole inside the replay (the engine's ROUTER dropped replies at its high-water mark):
  // keep what follows; the next attempt asks again from last_+1.
  hold(seq, std::move(payload));
  return a;
}

KvFeed::Actions KvFeed::on_replay_end(Clock::time_point now) {
  Actions a;
  if (state_ != State::kReplaying) return a;
  startup_ = false;
  ++stats_.replays_completed;
  state_ = State::kLive;
  failures_ = 0;
  drain(a);
  if (!pending_.empty() && !attempt_received_) {
    // The engine had nothing past last_ although it had published what we hold: its buffer
    // lost the batches in between (or it restarted). Asking again would not help.
    give_up(a, now);
    return a;
  }
  settle(a, now);  // a hole after some progress: asked for again from last_+1
  return a;
}

KvFeed::Actions KvFeed::on_start(Clock::time_point now) {
  Actions a;
  if (!replay_supported || state_ != State::kLive) return a;
  startup_ = true;
  request(a, now);
  return a;
}

KvFeed::Actions KvFeed::on_tick(Clock::time_point now) {
  Actions a;
  if (state_ == State::kReplaying && now >= deadline_) {
    ++stats_.replays_failed;
    ++failures_;
    a.abandon_replay = true;
    if (startup_ && pending_.empty()) {
      // The catch-up replay at start found no engine (yet): nothing was missed that a reset
      // would repair, so go live; a gap seen later asks again.
      startup_ = false;
      state_ = State::kLive;
      failures_ = 0;
      return a;
    }
    if (failures_ >= options_.max_replay_attempts || !replay_supported) {
      give_up(a, now);
      return a;
    }
    state_ = State::kBackoff;
    auto wait = options_.replay_retry_min;
    for (int i = 1; i < failures_ && wait < options_.replay_retry_max; ++i) wait *= 2;
    retry_at_ = now + std::min(wait, options_.replay_retry_max);
  } else if (state_ == State::kBackoff && now >= retry_at_) {
    if (replay_supported) {
      request(a, now);
    } else {
      give_up(a, now);
    }
  }
  return a;
}

// =============================================================================================
// KvSubscriber
// =============================================================================================
namespace {

constexpr std::size_t kMaxFramesKept = 4;  // frames beyond are counted, not kept

// The asynchronous signals: nginx handles them on its main thread. Faults stay deliverable so
// a crash in this thread still reaches the default action (or a sanitizer's handler).
sigset_t blocked_signals() {
  sigset_t set;
  sigfillset(&set);
  for (int s : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT, SIGSYS}) sigdelset(&set, s);
  return set;
}

std::uint64_t unix_ms_now() {
  const auto since = std::chrono::system_clock::now().time_since_epoch();
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::milliseconds>(since).count());
}

int clamp_ms(std::chrono::milliseconds ms) {
  return static_cast<int>(std::clamp<std::int64_t>(ms.count(), 0, std::numeric_limits<int>::max()));
}

// Receives one multipart message without blocking: false when none is waiting. Keeps the first
// kMaxFramesKept frames; `count` is the number of frames.
bool receive(zmq::socket_t& socket, std::vector<zmq::message_t>& frames, std::size_t& count) {
  frames.clear();
  count = 0;
  zmq::message_t msg;
  if (!socket.recv(msg, zmq::recv_flags::dontwait)) return false;
  for (;;) {
    ++count;
    const bool more = msg.more();
    if (frames.size() < kMaxFramesKept) frames.push_back(std::move(msg));
    if (!more) return true;
    msg = zmq::message_t();
    // The rest of a multipart message arrives with its first frame.
    if (!socket.recv(msg, zmq::recv_flags::none)) return true;
  }
}

struct Connection {
  std::optional<zmq::socket_t> sub;
  std::optional<zmq::socket_t> monitor;  // PAIR reading the SUB's socket monitor
  std::optional<zmq::socket_t> dealer;
};

enum class SocketKind : std::uint8_t { kSub, kDealer, kMonitor };

// The subscriber whose thread this is (stop() from a sink callback must not join itself).
thread_local const void* tls_subscriber = nullptr;

}  // namespace

struct KvSubscriber::Impl {
  Impl(std::vector<KvEndpoint> eps, KvSink& s, KvSubscriberOptions opts,
       std::vector<std::int64_t> resume)
      : endpoints(std::move(eps)), sink(s), options(opts) {
    if (!resume.empty() && resume.size() != endpoints.size()) {
      throw std::invalid_argument("KvSubscriber: resume_after must have one entry per endpoint");
    }
    if (options.tick_interval.count() <= 0) options.tick_interval = std::chrono::milliseconds(1);
    options.max_batches_per_wakeup = std::max<std::size_t>(options.max_batches_per_wakeup, 1);
    feeds.reserve(endpoints.size());
    counters.resize(endpoints.size());
    for (std::size_t i = 0; i < endpoints.size(); ++i) {
      feeds.emplace_back(options.feed, resume.empty() ? -1 : resume[i]);
      feeds.back().replay_supported = !endpoints[i].replay.empty();
      counters[i].last_seq = feeds.back().last_applied();
    }
    snapshot = counters;
  }

  void run();
  void setup(std::uint32_t i);
  void configure(zmq::socket_t& socket) const;
  bool open_dealer(std::uint32_t i);
  void apply(std::uint32_t i, KvFeed::Actions&& actions);
  void read_sub(std::uint32_t i, KvFeed::Clock::time_point now);
  void read_dealer(std::uint32_t i, KvFeed::Clock::time_point now);
  void read_monitor(std::uint32_t i);
  void publish(std::uint32_t i);

  std::vector<KvEndpoint> endpoints;
  KvSink& sink;
  KvSubscriberOptions options;

  // Owned by the subscriber thread once started.
  std::vector<KvFeed> feeds;
  std::vector<InstanceFeedStats> counters;  // transport counters (feed fields filled on publish)
  std::vector<Connection> connections;
  std::vector<bool> dirty;
  std::vector<zmq::message_t> frames;

  mutable std::mutex stats_mutex;
  std::vector<InstanceFeedStats> snapshot;

  std::mutex control_mutex;
  std::unique_ptr<zmq::context_t> ctx;
  std::thread thread;
  bool started = false;
  std::atomic<bool> stop_requested{false};
  std::atomic<bool> running{false};
  std::atomic<std::uint64_t> tick_errors{0};
  std::atomic<std::uint64_t> loop_errors{0};
};

void KvSubscriber::Impl::configure(zmq::socket_t& socket) const {
  socket.set(zmq::sockopt::linger, 0);
  socket.set(zmq::sockopt::rcvhwm, std::max(options.receive_hwm, 0));
  socket.set(zmq::sockopt::maxmsgsize, options.max_message_bytes);
  const int ivl = std::max(clamp_ms(options.reconnect_min), 1);
  socket.set(zmq::sockopt::reconnect_ivl, ivl);
  socket.set(zmq::sockopt::reconnect_ivl_max, std::max(clamp_ms(options.reconnect_max), ivl));
}

void KvSubscriber::Impl::setup(std::uint32_t i) {
  Connection& c = connections[i];
  const KvEndpoint& ep = endpoints[i];
  try {
    zmq::socket_t sub(*ctx, zmq::socket_type::sub);
    configure(sub);
    sub.set(zmq::sockopt::subscribe, ep.topic);
    // The monitor is attached before connecting so the first connection is seen.
    std::optional<zmq::socket_t> monitor;
    const std::string monitor_ep = "inproc://omni-kv-monitor-" + std::to_string(i);
    if (zmq_socket_monitor(sub.handle(), monitor_ep.c_str(),
                           ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED) == 0) {
      monitor.emplace(*ctx, zmq::socket_type::pair);
      monitor->set(zmq::sockopt::linger, 0);
      monitor->connect(monitor_ep);
    } else if (zmq_errno() == ETERM) {
      throw zmq::error_t();
    }
    sub.connect(ep.pub);
    c.sub = std::move(sub);
    c.monitor = std::move(monitor);
  } catch (const zmq::error_t& e) {
    if (e.num() == ETERM) throw;
    ++counters[i].connect_errors;
  }
  if (feeds[i].replay_supported && !open_dealer(i)) {
    feeds[i].replay_supported = false;  // a malformed replay endpoint stays malformed
  }
  dirty[i] = true;
}

bool KvSubscriber::Impl::open_dealer(std::uint32_t i) {
  Connection& c = connections[i];
  c.dealer.reset();
  try {
    zmq::socket_t dealer(*ctx, zmq::socket_type::dealer);
    configure(dealer);
    dealer.connect(endpoints[i].replay);
    c.dealer = std::move(dealer);
    return true;
  } catch (const zmq::error_t& e) {
    if (e.num() == ETERM) throw;
    ++counters[i].connect_errors;
    dirty[i] = true;
    return false;
  }
}

void KvSubscriber::Impl::apply(std::uint32_t i, KvFeed::Actions&& a) {
  InstanceFeedStats& st = counters[i];
  Connection& c = connections[i];
  if (a.abandon_replay) c.dealer.reset();  // drops the stale replies it may still receive
  if (a.reset) {
    ++st.resets;
    try {
      sink.on_reset(i, a.reset_reason);
    } catch (...) {
      ++st.sink_errors;
    }
  }
  for (auto& [seq, payload] : a.deliver) {
    std::size_t skipped = 0;
    EventBatch batch;
    try {
      batch = decode_batch(payload, &skipped);
    } catch (...) {
      ++st.malformed;  // the seq stays consumed: see the header
      continue;
    }
    st.skipped_events += skipped;
    try {
      sink.on_batch(i, seq, batch);
    } catch (...) {
      ++st.sink_errors;
      continue;
    }
    ++st.batches_applied;
    st.events_applied += batch.events.size();
    st.last_batch_unix_ms = unix_ms_now();
  }
  if (a.request_replay_from) {
    // A DEALER is reused only after a replay that ended cleanly; one abandoned was dropped
    // above, so a new one is made here.
    if (c.dealer || open_dealer(i)) {
      const std::string seq_frame = encode_seq(*a.request_replay_from);
      const std::array<zmq::const_buffer, 2> request = {zmq::const_buffer(),
                                                        zmq::buffer(seq_frame)};
      // Queued even before the TCP connection is up; a request that cannot be queued is
      // retried when the attempt times out.
      (void)zmq::send_multipart(*c.dealer, request, zmq::send_flags::dontwait);
    }
  }
  dirty[i] = true;
}

void KvSubscriber::Impl::read_sub(std::uint32_t i, KvFeed::Clock::time_point now) {
  for (std::size_t n = 0; n < options.max_batches_per_wakeup; ++n) {
    Connection& c = connections[i];
    if (!c.sub) return;
    std::size_t count = 0;
    if (!receive(*c.sub, frames, count)) return;
    dirty[i] = true;
    // [topic, seq, payload]
    if (count != 3 || frames[1].size() != 8) {
      ++counters[i].malformed;
      continue;
    }
    const std::int64_t seq = decode_seq(frames[1].to_string_view());
    if (seq < 0) {
      ++counters[i].malformed;
      continue;
    }
    apply(i, feeds[i].on_live(seq, frames[2].to_string(), now));
  }
}

void KvSubscriber::Impl::read_dealer(std::uint32_t i, KvFeed::Clock::time_point now) {
  for (std::size_t n = 0; n < options.max_batches_per_wakeup; ++n) {
    Connection& c = connections[i];
    if (!c.dealer) return;  // abandoned while handling an earlier reply
    std::size_t count = 0;
    if (!receive(*c.dealer, frames, count)) return;
    dirty[i] = true;
    // ["", seq, payload]; the end marker has seq -1 and an empty payload.
    if (count != 3 || frames[0].size() != 0 || frames[1].size() != 8) {
      ++counters[i].malformed;
      continue;
    }
    const std::int64_t seq = decode_seq(frames[1].to_string_view());
    if (seq < 0 && seq != kReplayEndSeq) {
      ++counters[i].malformed;
      continue;
    }
    if (!feeds[i].awaiting_replay()) {
      ++counters[i].stale_replies;
      continue;
    }
    if (seq == kReplayEndSeq) {
      apply(i, feeds[i].on_replay_end(now));
    } else {
      apply(i, feeds[i].on_replayed(seq, frames[2].to_string(), now));
    }
  }
}

void KvSubscriber::Impl::read_monitor(std::uint32_t i) {
  for (;;) {
    Connection& c = connections[i];
    if (!c.monitor) return;
    std::size_t count = 0;
    if (!receive(*c.monitor, frames, count)) return;
    // [event (u16 native) + value (u32), endpoint]
    if (frames.empty() || frames[0].size() < sizeof(std::uint16_t)) continue;
    std::uint16_t event = 0;
    std::memcpy(&event, frames[0].data(), sizeof event);
    if (event == ZMQ_EVENT_CONNECTED) ++counters[i].connects;
    if (event == ZMQ_EVENT_DISCONNECTED) ++counters[i].disconnects;
    if (event == ZMQ_EVENT_MONITOR_STOPPED) c.monitor.reset();
    dirty[i] = true;
  }
}

void KvSubscriber::Impl::publish(std::uint32_t i) {
  InstanceFeedStats s = counters[i];
  s.feed = feeds[i].stats();
  s.last_seq = feeds[i].last_applied();
  s.replaying = feeds[i].replaying();
  std::lock_guard<std::mutex> lock(stats_mutex);
  snapshot[i] = s;
}

void KvSubscriber::Impl::run() {
  const sigset_t blocked = blocked_signals();
  pthread_sigmask(SIG_BLOCK, &blocked, nullptr);
  tls_subscriber = this;

  const auto n = static_cast<std::uint32_t>(endpoints.size());
  connections.clear();
  connections.resize(n);
  dirty.assign(n, false);
  struct Item {
    std::uint32_t instance;
    SocketKind kind;
  };
  std::vector<zmq::pollitem_t> items;
  std::vector<Item> owners;

  try {
    for (std::uint32_t i = 0; i < n; ++i) setup(i);
    // Catch up at once from every replay socket: what the engines published before this
    // subscriber started (a restarted proxy, a worker taking over) is in their buffers.
    for (std::uint32_t i = 0; i < n; ++i) apply(i, feeds[i].on_start(KvFeed::Clock::now()));
    for (std::uint32_t i = 0; i < n; ++i) publish(i);
    auto next_tick = KvFeed::Clock::now() + options.tick_interval;

    while (!stop_requested.load()) {
      try {
        items.clear();
        owners.clear();
        for (std::uint32_t i = 0; i < n; ++i) {
          Connection& c = connections[i];
          if (c.sub) {
            items.push_back({c.sub->handle(), 0, ZMQ_POLLIN, 0});
            owners.push_back({i, SocketKind::kSub});
          }
          if (c.dealer) {
            items.push_back({c.dealer->handle(), 0, ZMQ_POLLIN, 0});
            owners.push_back({i, SocketKind::kDealer});
          }
          if (c.monitor) {
            items.push_back({c.monitor->handle(), 0, ZMQ_POLLIN, 0});
            owners.push_back({i, SocketKind::kMonitor});
          }
        }
        auto now = KvFeed::Clock::now();
        const auto wait =
            std::clamp(std::chrono::duration_cast<std::chrono::milliseconds>(next_tick - now),
                       std::chrono::milliseconds(0), options.tick_interval);
        if (items.empty()) {
          std::this_thread::sleep_for(wait);  // every endpoint was malformed
        } else {
          zmq::poll(items.data(), items.size(), wait);
        }
        now = KvFeed::Clock::now();
        for (std::size_t k = 0; k < items.size(); ++k) {
          if ((items[k].revents & ZMQ_POLLIN) == 0) continue;
          const Item& owner = owners[k];
          switch (owner.kind) {
            case SocketKind::kSub:
              read_sub(owner.instance, now);
              break;
            case SocketKind::kDealer:
              read_dealer(owner.instance, now);
              break;
            case SocketKind::kMonitor:
              read_monitor(owner.instance);
              break;
          }
        }
        if (now >= next_tick) {
          for (std::uint32_t i = 0; i < n; ++i) {
            KvFeed::Actions a = feeds[i].on_tick(now);
            if (a.reset || a.abandon_replay || a.request_replay_from || !a.deliver.empty()) {
              apply(i, std::move(a));
            }
            dirty[i] = true;  // at least once a tick
          }
          bool keep_going = true;
          try {
            keep_going = sink.on_tick();
          } catch (...) {
            ++tick_errors;
          }
          if (!keep_going) stop_requested = true;
          next_tick = now + options.tick_interval;
        }
      } catch (const zmq::error_t& e) {
        if (e.num() == ETERM) break;
        ++loop_errors;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      } catch (...) {
        ++loop_errors;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      for (std::uint32_t i = 0; i < n; ++i) {
        if (dirty[i]) {
          publish(i);
          dirty[i] = false;
        }
      }
    }
  } catch (...) {
    // ETERM while setting up: stop() was called.
  }
  for (std::uint32_t i = 0; i < n; ++i) publish(i);
  connections.clear();  // closes every socket before the context is terminated
  running = false;
}

KvSubscriber::KvSubscriber(std::vector<KvEndpoint> endpoints, KvSink& sink,
                           KvSubscriberOptions options, std::vector<std::int64_t> resume_after)
    : impl_(std::make_unique<Impl>(std::move(endpoints), sink, options, std::move(resume_after))) {}

KvSubscriber::~KvSubscriber() {
  stop();
}

void KvSubscriber::start() {
  std::lock_guard<std::mutex> lock(impl_->control_mutex);
  if (impl_->started) return;
  impl_->started = true;
  impl_->ctx = std::make_unique<zmq::context_t>(1);
  impl_->running = true;
  // The thread inherits the mask it is created with, so it never runs with signals open.
  const sigset_t blocked = blocked_signals();
  sigset_t old;
  pthread_sigmask(SIG_BLOCK, &blocked, &old);
  try {
    impl_->thread = std::thread([impl = impl_.get()] { impl->run(); });
  } catch (...) {
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    impl_->running = false;
    throw;
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

void KvSubscriber::stop() {
  if (!impl_) return;
  if (tls_subscriber == impl_.get()) {
    impl_->stop_requested = true;  // from a sink callback: the loop ends after it returns
    return;
  }
  std::lock_guard<std::mutex> lock(impl_->control_mutex);
  impl_->stop_requested = true;
  if (impl_->ctx) impl_->ctx->shutdown();  // wakes zmq::poll at once
  if (impl_->thread.joinable()) impl_->thread.join();
  impl_->ctx.reset();
}

bool KvSubscriber::running() const noexcept {
  return impl_->running.load();
}

InstanceFeedStats KvSubscriber::stats(std::uint32_t instance) const {
  std::lock_guard<std::mutex> lock(impl_->stats_mutex);
  return impl_->snapshot.at(instance);
}

std::size_t KvSubscriber::size() const noexcept {
  return impl_->endpoints.size();
}

std::uint64_t KvSubscriber::tick_errors() const noexcept {
  return impl_->tick_errors.load();
}

std::uint64_t KvSubscriber::loop_errors() const noexcept {
  return impl_->loop_errors.load();
}

}  // namespace omni::kv
