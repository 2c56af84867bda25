// KV-cache-aware routing (omni_proxy_policy kv_aware) and the KV-event subscriber.
//
// Configuration: `omni_proxy_kv_cache UPSTREAM events|approximate [...]` says how the prefix
// caches of an upstream block's servers are known; `omni_proxy_kv_index_blocks N` bounds the
// blocks kept per server. The index (omni/kv_index.hpp) lives in the shared zone, one table per
// server, read lock-free by every worker's balancer.
//
// Events: exactly one worker at a time holds the subscriber lease (a pid and a heartbeat in the
// zone) and runs one thread (omni/kv_subscriber.hpp) with one SUB socket per server of every
// `events` block. The thread applies each batch to the index and beats the lease; when the
// worker dies (kill -9) another worker's lease timer sees the heartbeat go stale and starts a
// subscriber that resumes from the last sequence number applied, asking the engines' replay
// sockets for what it missed. Events lag the routing: a prompt's blocks are published only as
// the engine prefills them, so a second request with the same prefix, arriving while the first
// still waits or prefills, would see no holder. So each prompt sent is also recorded as pending
// on its server (a second, smaller index, one tagged chain per request, omni/kv_index.hpp) until
// its prefill ends; a server's predicted cache is the longer of its evented and pending matches
// (`pending=off` turns this off). Approximate: the balancer records each routed prompt's blocks
// for the chosen server, bounded by the engine's capacity (num_gpu_blocks) as an LRU.
//
// The decision (omni/kv_routing.hpp): eligible prefill servers are scored by expected time to
// first token: the uncached tokens queued there (the proxy's own in-flight accounting, or the
// engine's reported waiting uncached tokens when larger) plus this request's uncached tokens, at
// the server's measured prefill speed. A prefix no server holds goes to its home on a
// consistent-hash ring with bounded loads. Decode servers: least loaded, ties to the one whose
// own prefix cache holds most of the prompt.
#include "omni_module.hpp"

#include <omni/block_hash.hpp>
#include <omni/kv_index.hpp>
#include <omni/kv_routing.hpp>
#include <omni/kv_subscriber.hpp>
#include <omni/lifecycle.hpp>
#include <omni/prometheus.hpp>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <ctime>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

namespace omni::ngx {
namespace {

constexpr std::uint64_t kKvMagic = 0x6f6d6e696b767368ULL;  // "omnikvsh"
constexpr std::uint32_t kRows = 64;               // workers accounting in-flight tokens at once
constexpr ngx_msec_t kLeaseTick = 250;            // how often a worker checks the lease
constexpr std::uint64_t kLeaseStaleMs = 1500;     // a subscriber silent this long is dead
constexpr std::uint32_t kDefaultBlockSize = 16;   // before an engine says otherwise (vLLM's)
constexpr double kSpeedAlpha = 0.2;               // EWMA weight of a new prefill-speed sample
constexpr int kReasons = 4;                       // warm, cold, cold_overflow, decode

const char* const kReasonNames[kReasons] = {"warm", "cold", "cold_overflow", "decode"};

using Atomic64 = std::atomic<std::uint64_t>;
static_assert(Atomic64::is_always_lock_free);

// Per server, in the zone.
struct BackendShared {
  // The subscriber's feed, copied from its stats every tick.
  Atomic64 batches, events, malformed, skipped_events, gaps, replays_requested,
      replays_completed, replays_failed, restarts, unrecoverable, duplicates, pending_dropped;
  std::atomic<std::int64_t> feed_last_seq;
  Atomic64 replaying;
  Atomic64 connects, disconnects;
  Atomic64 last_batch_unix_ms;
  Atomic64 synced_after_ms;   // from the subscriber's start to the first batch applied in order
  // Prediction accuracy, from the engines' usage.prompt_tokens_details.cached_tokens.
  Atomic64 predictions, predicted_tokens, actual_tokens, abs_error_tokens, within_block;
  Atomic64 speed_bits;        // double: EWMA of solo prefill speed, tokens/s; 0: none yet
  Atomic64 speed_samples;
  // Prefill legs sent whose predicted cache there came (partly) from pending prompts, and the
  // tokens the pending index added to the prediction.
  Atomic64 pending_legs, pending_tokens;
  Atomic64 chosen[kReasons];  // decisions that chose this server, by reason
};

struct PoolShared {
  Atomic64 decisions[kReasons];
  // The last decision, for the status page (fields may mix two decisions for a moment).
  Atomic64 last_reason, last_chosen, last_runner_up, last_cached, last_runner_up_cached,
      last_ttft_us, last_runner_up_ttft_us, last_unix_ms;
};

struct SharedHeader {
  std::uint64_t magic;
  std::uint32_t backends;
  std::uint32_t pools;
  std::atomic<std::int32_t> sub_pid;      // the worker running the subscriber; 0 none
  std::int32_t pad;
  Atomic64 sub_beat_ms;                   // CLOCK_MONOTONIC ms of its last tick
  Atomic64 sub_started_unix_ms;
  Atomic64 sub_starts;                    // subscribers started (takeovers + restarts)
  std::atomic<std::int32_t> row_pid[kRows];
};

std::size_t align8(std::size_t n) { return (n + 7) & ~std::size_t{7}; }

std::size_t shared_bytes_for(std::uint32_t backends, std::uint32_t pools) {
  return align8(sizeof(SharedHeader)) + align8(sizeof(BackendShared) * backends) +
         align8(sizeof(PoolShared) * pools) +
         align8(sizeof(std::atomic<std::int64_t>) * kRows * backends);
}

struct SharedView {
  SharedHeader* hdr = nullptr;
  BackendShared* backends = nullptr;
  PoolShared* pools = nullptr;
  std::atomic<std::int64_t>* tokens = nullptr;  // [row * backends + backend]

  std::int64_t inflight_tokens(std::uint32_t backend) const noexcept {
    std::int64_t sum = 0;
    for (std::uint32_t row = 0; row < kRows; ++row) {
      if (hdr->row_pid[row].load(std::memory_order_relaxed) == 0) continue;
      sum += tokens[row * hdr->backends + backend].load(std::memory_order_relaxed);
    }
    return std::max<std::int64_t>(0, sum);
  }
};

SharedView view_of(void* region) {
  SharedView v;
  auto* base = static_cast<char*>(region);
  v.hdr = static_cast<SharedHeader*>(region);
  std::size_t off = align8(sizeof(SharedHeader));
  v.backends = reinterpret_cast<BackendShared*>(base + off);
  off += align8(sizeof(BackendShared) * v.hdr->backends);
  v.pools = reinterpret_cast<PoolShared*>(base + off);
  off += align8(sizeof(PoolShared) * v.hdr->pools);
  v.tokens = reinterpret_cast<std::atomic<std::int64_t>*>(base + off);
  return v;
}

std::uint64_t mono_ms() { return omni::monotonic_now_ns() / 1'000'000; }

std::uint64_t unix_ms() {
  timespec ts{};
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000 + static_cast<std::uint64_t>(ts.tv_nsec) / 1'000'000;
}

double load_double(const Atomic64& a) { return std::bit_cast<double>(a.load(std::memory_order_relaxed)); }

// ---------------------------------------------------------------------------------------------
// The subscriber: a sink that applies batches to the index, run by the lease holder
// ---------------------------------------------------------------------------------------------

struct FeedTarget {
  std::uint16_t backend;
  std::uint32_t block_size;  // the block's configured size; 0: the events' own
};

class IndexSink final : public omni::kv::KvSink {
 public:
  IndexSink(omni::kv::KvIndex& index, SharedView shared, std::vector<FeedTarget> targets)
      : index_(index), shared_(shared), targets_(std::move(targets)), started_ms_(mono_ms()) {}

  void attach(omni::kv::KvSubscriber* sub) { sub_ = sub; }

  void on_batch(std::uint32_t instance, std::int64_t seq,
                const omni::kv::EventBatch& batch) override {
    const FeedTarget& t = targets_.at(instance);
    omni::kv::ApplyOptions o;
    o.block_size = t.block_size;
    omni::kv::apply_batch(index_, t.backend, batch, o);
    index_.set_last_seq(t.backend, seq);
    BackendShared& b = shared_.backends[t.backend];
    b.last_batch_unix_ms.store(unix_ms(), std::memory_order_relaxed);
    if (b.synced_after_ms.load(std::memory_order_relaxed) == 0) {
      b.synced_after_ms.store(std::max<std::uint64_t>(1, mono_ms() - started_ms_));
    }
  }

  void on_reset(std::uint32_t instance, omni::kv::ResetReason) override {
    index_.clear(targets_.at(instance).backend);
  }

  bool on_tick() override {
    SharedHeader& h = *shared_.hdr;
    if (h.sub_pid.load() != ngx_pid) return false;  // the lease went to another worker
    h.sub_beat_ms.store(mono_ms());
    if (sub_ == nullptr) return true;
    for (std::uint32_t i = 0; i < targets_.size(); ++i) {
      const omni::kv::InstanceFeedStats s = sub_->stats(i);
      BackendShared& b = shared_.backends[targets_[i].backend];
      b.batches.store(s.batches_applied);
      b.events.store(s.events_applied);
      b.malformed.store(s.malformed);
      b.skipped_events.store(s.skipped_events);
      b.gaps.store(s.feed.gaps);
      b.replays_requested.store(s.feed.replays_requested);
      b.replays_completed.store(s.feed.replays_completed);
      b.replays_failed.store(s.feed.replays_failed);
      b.restarts.store(s.feed.restarts);
      b.unrecoverable.store(s.feed.unrecoverable);
      b.duplicates.store(s.feed.duplicates);
      b.pending_dropped.store(s.feed.pending_dropped);
      b.feed_last_seq.store(s.last_seq);
      b.replaying.store(s.replaying ? 1 : 0);
      b.connects.store(s.connects);
      b.disconnects.store(s.disconnects);
    }
    return true;
  }

 private:
  omni::kv::KvIndex& index_;
  SharedView shared_;
  std::vector<FeedTarget> targets_;
  std::uint64_t started_ms_;
  omni::kv::KvSubscriber* sub_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Worker runtime
// ---------------------------------------------------------------------------------------------

struct Runtime {
  std::unique_ptr<omni::kv::KvIndex> index;
  std::unique_ptr<omni::kv::KvIndex> pending;  // events pools' prompts still prefilling
  std::uint64_t pending_seq = 0;               // this worker's pending tags
  SharedView shared;
  std::int32_t row = -1;
  std::vector<std::unique_ptr<omni::BoundedLoadRing>> rings;  // per pool (kv pools only)
  std::unique_ptr<IndexSink> sink;
  std::unique_ptr<omni::kv::KvSubscriber> subscriber;
  ngx_event_t lease_timer{};
  ngx_log_t* log = nullptr;
};

Runtime& rt() {
  static Runtime r;
  return r;
}

bool any_events(const Registry& reg) {
  return std::any_of(reg.pools.begin(), reg.pools.end(),
                     [](const Pool& p) { return p.kv_mode == KvMode::kEvents; });
}

std::string zmq_endpoint(const Pool::Server& s, int offset) {
  // The port of "host:port" (the server's configured name), moved by the offset.
  const std::size_t colon = s.name.rfind(':');
  long port = colon == std::string::npos ? 80 : std::strtol(s.name.c_str() + colon + 1, nullptr, 10);
  port += offset;
  if (port <= 0 || port > 65535) return {};
  const bool v6 = s.host.find(':') != std::string::npos;
  return "tcp://" + (v6 ? "[" + s.host + "]" : s.host) + ":" + std::to_string(port);
}

void stop_subscriber() {
  Runtime& r = rt();
  if (r.subscriber) r.subscriber->stop();
  r.subscriber.reset();
  r.sink.reset();
}

void start_subscriber() try {
  Runtime& r = rt();
  const Registry* reg = registry();
  if (reg == nullptr || r.index == nullptr) return;
  std::vector<omni::kv::KvEndpoint> endpoints;
  std::vector<FeedTarget> targets;
  std::vector<std::int64_t> resume;
  for (const Pool& pool : reg->pools) {
    if (pool.kv_mode != KvMode::kEvents) continue;
    for (std::uint16_t i = 0; i < pool.count; ++i) {
      const Pool::Server& s = pool.servers[i];
      omni::kv::KvEndpoint e;
      e.pub = zmq_endpoint(s, pool.kv_pub_offset);
      if (pool.kv_replay) e.replay = zmq_endpoint(s, pool.kv_replay_offset);
      e.topic = pool.kv_topic;
      endpoints.push_back(std::move(e));
      const auto backend = static_cast<std::uint16_t>(pool.base + i);
      targets.push_back({backend, pool.kv_block_size});
      resume.push_back(r.index->counters(backend).last_seq);
    }
  }
  if (endpoints.empty()) return;
  r.sink = std::make_unique<IndexSink>(*r.index, r.shared, std::move(targets));
  r.subscriber = std::make_unique<omni::kv::KvSubscriber>(std::move(endpoints), *r.sink,
                                                          omni::kv::KvSubscriberOptions{},
                                                          std::move(resume));
  r.sink->attach(r.subscriber.get());
  r.shared.hdr->sub_beat_ms.store(mono_ms());
  r.shared.hdr->sub_started_unix_ms.store(unix_ms());
  r.shared.hdr->sub_starts.fetch_add(1);
  for (std::uint32_t b = 0; b < r.shared.hdr->backends; ++b) {
    r.shared.backends[b].synced_after_ms.store(0);
  }
  r.subscriber->start();
  ngx_log_error(NGX_LOG_NOTICE, r.log, 0,
                "omni_proxy: this worker now reads the KV events of %uz servers",
                r.subscriber->size());
} catch (...) {
  log_exception(rt().log, "KV-event subscriber start");
  stop_subscriber();
}

// Every worker: keep the lease if held (the thread beats it), take it over when its holder died
// or went silent.
void lease_tick(ngx_event_t* ev) noexcept {
  Runtime& r = rt();
  if (ngx_exiting || ngx_quit || ngx_terminate) return;
  SharedHeader& h = *r.shared.hdr;
  std::int32_t cur = h.sub_pid.load();
  if (cur == ngx_pid) {
    if (r.subscriber == nullptr || !r.subscriber->running()) {
      stop_subscriber();
      start_subscriber();
    }
  } else {
    if (r.subscriber) stop_subscriber();  // the lease moved on while this thread lagged
    const std::uint64_t beat = h.sub_beat_ms.load();
    const std::uint64_t now = mono_ms();
    const bool stale = now > beat && now - beat > kLeaseStaleMs;
    if (cur == 0 || !omni::pid_alive(cur) || stale) {
      if (h.sub_pid.compare_exchange_strong(cur, ngx_pid)) {
        if (cur != 0) {
          ngx_log_error(NGX_LOG_WARN, ev->log, 0,
                        "omni_proxy: took the KV-event subscriber over from worker %d", cur);
        }
        start_subscriber();
      }
    }
  }
  ngx_add_timer(ev, kLeaseTick);
}

// The block size keys are computed with for a pool: configured, else what its engines said.
std::uint32_t block_size_of(const Pool& pool) {
  if (pool.kv_block_size != 0) return pool.kv_block_size;
  if (const omni::kv::KvIndex* idx = rt().index.get()) {
    for (std::uint16_t i = 0; i < pool.count; ++i) {
      const std::uint32_t bs = idx->counters(pool.base + i).block_size;
      if (bs != 0) return bs;
    }
  }
  return kDefaultBlockSize;
}

// Predicted cached tokens: the matched blocks, of which the engine reuses at most those before
// the prompt's last token (vLLM and SGLang always compute at least one token).
std::uint32_t cached_tokens(std::size_t matched_blocks, const omni::PrefixKeys& keys,
                            std::uint32_t prompt_tokens) {
  if (matched_blocks == 0 || keys.block_units == 0) return 0;
  if (!keys.token_ids) {  // text keys: bytes; scale to the prompt's tokens
    if (keys.units == 0) return 0;
    const double frac = std::min(1.0, double(matched_blocks * keys.block_units) / double(keys.units));
    return static_cast<std::uint32_t>(frac * prompt_tokens);
  }
  const std::size_t usable = prompt_tokens > 0 ? (prompt_tokens - 1) / keys.block_units : 0;
  return static_cast<std::uint32_t>(std::min(matched_blocks, usable) * keys.block_units);
}

// Blocks of `keys` a server is predicted to hold: its index's match, or, in an events pool that
// tracks pending prompts, the longer match among the prompts still prefilling there (they are
// cached by the time a request sent now is scheduled behind them).
std::size_t matched_blocks(const Pool& pool, std::uint32_t backend, const omni::PrefixKeys& keys) {
  const Runtime& r = rt();
  if (r.index == nullptr || pool.kv_mode == KvMode::kNone) return 0;
  std::size_t m = r.index->match(backend, keys.blocks);
  if (pool.kv_pending && r.pending != nullptr && m < keys.blocks.size()) {
    m = std::max(m, r.pending->match(backend, keys.blocks));
  }
  return m;
}

const omni::BoundedLoadRing* ring_of(const Pool& pool) {
  Runtime& r = rt();
  if (pool.kv_pool_index >= r.rings.size()) return nullptr;
  return r.rings[pool.kv_pool_index].get();
}

void record_decision(const Pool& pool, const KvExplain& e) {
  Runtime& r = rt();
  if (r.shared.hdr == nullptr || e.chosen < 0) return;
  PoolShared& p = r.shared.pools[pool.kv_pool_index];
  p.decisions[e.reason].fetch_add(1, std::memory_order_relaxed);
  r.shared.backends[pool.base + e.chosen].chosen[e.reason].fetch_add(1, std::memory_order_relaxed);
  p.last_reason.store(e.reason, std::memory_order_relaxed);
  p.last_chosen.store(static_cast<std::uint64_t>(e.chosen), std::memory_order_relaxed);
  p.last_runner_up.store(static_cast<std::uint64_t>(e.runner_up), std::memory_order_relaxed);
  p.last_cached.store(e.cached, std::memory_order_relaxed);
  p.last_runner_up_cached.store(e.runner_up_cached, std::memory_order_relaxed);
  p.last_ttft_us.store(static_cast<std::uint64_t>(e.ttft_ms * 1000), std::memory_order_relaxed);
  p.last_runner_up_ttft_us.store(static_cast<std::uint64_t>(e.runner_up_ttft_ms * 1000),
                                 std::memory_order_relaxed);
  p.last_unix_ms.store(unix_ms(), std::memory_order_relaxed);
}

std::int32_t pick_prefill(const Pool& pool, const omni::PoolSnapshot& snap,
                          std::span<const std::size_t> eligible, const KvPolicyOptions& o,
                          KvRequest& kv, KvExplain& ex) {
  Runtime& r = rt();
  const omni::BoundedLoadRing* ring = ring_of(pool);
  const omni::PrefixKeys& keys = kv.keys[0];
  ex = {};
  ex.cached_by_server.assign(pool.count, 0);
  // Prefill speeds: every server runs at the pool's mean measured speed (prefill_tps before
  // any measurement), times its speed class: its own measured speed over the mean, in steps of
  // powers of 2, once it has kSpeedSamples samples and is 1.75x faster or slower. Noise between
  // equal servers would otherwise decide close calls, and differently in each proxy (each
  // measures its own legs); a genuinely slower or faster instance still shows.
  constexpr std::uint64_t kSpeedSamples = 20;
  double sum = 0;
  std::size_t measured = 0;
  for (std::uint16_t i = 0; i < pool.count && r.shared.hdr != nullptr; ++i) {
    const double v = load_double(r.shared.backends[pool.base + i].speed_bits);
    if (v > 0) sum += v, ++measured;
  }
  const double mean = measured > 0 ? sum / double(measured) : o.prefill_tps;
  std::vector<omni::KvCandidate> cands;
  cands.reserve(eligible.size());
  for (std::size_t i : eligible) {
    const auto backend = static_cast<std::uint32_t>(pool.base + i);
    omni::KvCandidate c;
    c.index = i;
    c.cached_tokens = cached_tokens(matched_blocks(pool, backend, keys), keys, kv.prompt_tokens);
    ex.cached_by_server[i] = c.cached_tokens;
    double queued = r.shared.hdr != nullptr ? double(r.shared.inflight_tokens(backend)) : 0.0;
    const omni::EngineLoad& load = snap[i].load;
    if (load.waiting_uncached_tokens && load.fresh(std::chrono::seconds(5))) {
      queued = std::max(queued, double(*load.waiting_uncached_tokens));
    }
    c.queued_tokens = queued;
    double speed_class = 1.0;
    if (r.shared.hdr != nullptr &&
        r.shared.backends[backend].speed_samples.load(std::memory_order_relaxed) >= kSpeedSamples) {
      const double ratio = load_double(r.shared.backends[backend].speed_bits) / mean;
      if (ratio > 1.75 || ratio < 0.57) {
        speed_class = std::exp2(std::clamp(std::round(std::log2(ratio)), -3.0, 3.0));
      }
    }
    c.tokens_per_s = mean * speed_class;
    c.kv_usage = load.fresh(std::chrono::seconds(5)) ? load.kv_usage
                                                      : std::numeric_limits<double>::quiet_NaN();
    c.ring_load = queued;
    cands.push_back(c);
  }
  if (ring == nullptr || cands.empty()) return -1;
  omni::KvRouteOptions ro;
  ro.epsilon = o.epsilon;
  ro.tie_fraction = o.tie_fraction;
  ro.miss_weight = o.miss_weight;
  ro.kv_usage_high = o.kv_usage_high;
  const auto d = omni::choose_prefill(cands, *ring, keys.blocks, std::max<std::size_t>(1, keys.block_units),
                                      kv.prompt_tokens, ro);
  if (!d) return -1;
  ex.set = true;
  ex.reason = static_cast<std::uint8_t>(d->reason);
  ex.chosen = static_cast<std::int32_t>(cands[d->chosen].index);
  ex.cached = d->chosen_cached;
  ex.ttft_ms = d->chosen_ttft_ms;
  if (d->runner_up) {
    ex.runner_up = static_cast<std::int32_t>(cands[*d->runner_up].index);
    ex.runner_up_cached = d->runner_up_cached;
    ex.runner_up_ttft_ms = d->runner_up_ttft_ms;
  }
  return ex.chosen;
}

std::int32_t pick_decode(const Pool& pool, const omni::PoolSnapshot& snap,
                         std::span<const std::size_t> eligible, const KvPolicyOptions& o,
                         KvRequest& kv, std::uint64_t request_hash, KvExplain& ex) {
  const omni::BoundedLoadRing* ring = ring_of(pool);
  const omni::PrefixKeys& keys = kv.keys[1];
  ex = {};
  ex.cached_by_server.assign(pool.count, 0);
  std::vector<omni::DecodeCandidate> cands;
  cands.reserve(eligible.size());
  for (std::size_t i : eligible) {
    const auto backend = static_cast<std::uint32_t>(pool.base + i);
    omni::DecodeCandidate c;
    c.index = i;
    c.cached_tokens = cached_tokens(matched_blocks(pool, backend, keys), keys, kv.prompt_tokens);
    ex.cached_by_server[i] = c.cached_tokens;
    c.outstanding = double(snap[i].outstanding) / std::max<std::uint32_t>(1, snap[i].weight);
    const omni::EngineLoad& load = snap[i].load;
    if (load.fresh(std::chrono::seconds(5))) {
      c.running = load.running;
      c.kv_usage = load.kv_usage;
    }
    cands.push_back(c);
  }
  if (ring == nullptr || cands.empty()) return -1;
  omni::DecodeRouteOptions ro;
  ro.kv_usage_high = o.kv_usage_high;
  ro.slack = o.decode_slack;
  const std::uint64_t key = keys.blocks.empty() ? omni::mix64(request_hash) : keys.blocks.front();
  const auto d = omni::choose_decode(cands, *ring, key, ro);
  if (!d) return -1;
  ex.set = true;
  ex.reason = 3;
  ex.cache_decided = d->cache_decided;
  ex.chosen = static_cast<std::int32_t>(cands[d->chosen].index);
  ex.cached = d->chosen_cached;
  if (d->runner_up) {
    ex.runner_up = static_cast<std::int32_t>(cands[*d->runner_up].index);
    ex.runner_up_cached = cands[*d->runner_up].cached_tokens;
  }
  return ex.chosen;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

// omni_proxy_kv_cache UPSTREAM events|approximate [pub_port_offset=N] [replay_port_offset=N]
//                     [topic=T] [pending=on|off] [block_size=N] [max_blocks=N]
char* set_kv_cache(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept try {
  auto* mcf = static_cast<MainConf*>(conf);
  auto* value = static_cast<ngx_str_t*>(cf->args->elts);
  Registry::KvDecl d;
  d.upstream.assign(reinterpret_cast<const char*>(value[1].data), value[1].len);
  for (const Registry::KvDecl& other : mcf->registry->kv_decls) {
    if (other.upstream == d.upstream) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V\": upstream \"%V\" is declared already",
                         &cmd->name, &value[1]);
      return static_cast<char*>(NGX_CONF_ERROR);
    }
  }
  const std::string_view mode(reinterpret_cast<const char*>(value[2].data), value[2].len);
  if (mode == "events") {
    d.mode = KvMode::kEvents;
  } else if (mode == "approximate") {
    d.mode = KvMode::kApproximate;
  } else {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"%V\": invalid mode \"%V\"; use events or approximate", &cmd->name,
                       &value[2]);
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  bool have_pub = false;
  for (ngx_uint_t i = 3; i < cf->args->nelts; ++i) {
    const std::string arg(reinterpret_cast<const char*>(value[i].data), value[i].len);
    const std::size_t eq = arg.find('=');
    const std::string name = arg.substr(0, eq);
    const std::string text = eq == std::string::npos ? "" : arg.substr(eq + 1);
    char* end = nullptr;
    errno = 0;
    const long n = text.empty() ? 0 : std::strtol(text.c_str(), &end, 10);
    const bool integer = !text.empty() && end != nullptr && *end == '\0' && errno == 0;
    const bool events = d.mode == KvMode::kEvents;
    if (events && name == "pub_port_offset" && integer && n > -65536 && n < 65536) {
      d.pub_offset = static_cast<int>(n);
      have_pub = true;
    } else if (events && name == "replay_port_offset" && integer && n > -65536 && n < 65536) {
      d.replay_offset = static_cast<int>(n);
      d.replay = true;
    } else if (events && name == "topic" && eq != std::string::npos) {
      d.topic = text;
    } else if (name == "block_size" && integer && n >= 1 && n <= 4096) {
      d.block_size = static_cast<std::uint32_t>(n);
    } else if (name == "max_blocks" && integer && n >= 16 && n <= (1L << 24)) {
      d.max_blocks = static_cast<std::uint32_t>(n);
    } else if (events && name == "pending" && (text == "on" || text == "off")) {
      d.pending = text == "on";
    } else {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "\"%V\": invalid parameter \"%V\"; use %s block_size=1..4096, "
                         "max_blocks=16..16777216",
                         &cmd->name, &value[i],
                         d.mode == KvMode::kEvents
                             ? "pub_port_offset=N, replay_port_offset=N, topic=T, "
                               "pending=on|off,"
                             : "(approximate mode)");
      return static_cast<char*>(NGX_CONF_ERROR);
    }
  }
  if (d.mode == KvMode::kEvents && !have_pub) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"%V %V events\" needs pub_port_offset=N: each server's KV-event PUB "
                       "port is its HTTP port plus N", &cmd->name, &value[1]);
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  d.file.assign(reinterpret_cast<const char*>(cf->conf_file->file.name.data),
                cf->conf_file->file.name.len);
  d.line = cf->conf_file->line;
  mcf->registry->kv_decls.push_back(std::move(d));
  return NGX_CONF_OK;
} catch (...) {
  log_exception(cf->log, "omni_proxy_kv_cache");
  return static_cast<char*>(NGX_CONF_ERROR);
}

bool kv_finalize(ngx_conf_t* cf, Registry& reg) noexcept try {
  for (std::size_t i = 0; i < reg.pools.size(); ++i) {
    reg.pools[i].kv_pool_index = static_cast<std::uint16_t>(i);
  }
  for (const Registry::KvDecl& d : reg.kv_decls) {
    Pool* pool = nullptr;
    for (Pool& p : reg.pools) {
      if (p.name == d.upstream) pool = &p;
    }
    if (pool == nullptr) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "\"omni_proxy_kv_cache\" in %s:%ui: upstream \"%s\" is not used by any "
                         "omni_proxy location", d.file.c_str(), d.line, d.upstream.c_str());
      return false;
    }
    pool->kv_declared = true;
    pool->kv_mode = d.mode;
    pool->kv_pub_offset = d.pub_offset;
    pool->kv_replay_offset = d.replay_offset;
    pool->kv_replay = d.replay;
    pool->kv_topic = d.topic;
    pool->kv_block_size = d.block_size;
    pool->kv_max_blocks = d.max_blocks;
    pool->kv_pending = d.mode == KvMode::kEvents && d.pending;
    reg.kv_blocks = 1;  // an index is needed; sized below
  }
  for (Pool& p : reg.pools) {
    if (p.kv_mode != KvMode::kNone) reg.kv_blocks = 1;
  }
  if (reg.kv_blocks != 0) {
    auto* mcf = static_cast<MainConf*>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_omni_proxy_module));
    reg.kv_blocks = mcf->kv_blocks == NGX_CONF_UNSET_UINT ? 65536
                                                          : static_cast<std::uint32_t>(mcf->kv_blocks);
    // Pending prompts: half the index's bound per server (prompts queued or prefilling there).
    reg.kv_pending_blocks = 0;
    for (const Pool& p : reg.pools) {
      if (p.kv_pending) reg.kv_pending_blocks = std::max<std::uint32_t>(1024, reg.kv_blocks / 2);
    }
    if (mcf->zone == nullptr) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "\"omni_proxy_policy kv_aware\" and \"omni_proxy_kv_cache\" need "
                         "\"omni_proxy_zone\": the KV index is shared by all workers");
      return false;
    }
  }
  return true;
} catch (...) {
  log_exception(cf->log, "omni_proxy_kv_cache");
  return false;
}

namespace {
// The region holds the index, then (when some events pool tracks pending prompts) the pending
// index, each 8-byte aligned.
omni::kv::KvIndexShape index_shape(const Registry& reg, std::uint32_t blocks) {
  omni::kv::KvIndexShape shape;
  shape.instances = std::max<std::uint32_t>(1, reg.state_config.max_backends);
  shape.blocks_per_instance = blocks;
  return shape;
}
std::size_t main_index_bytes(const Registry& reg) {
  return align8(omni::kv::KvIndex::required_bytes(index_shape(reg, reg.kv_blocks)));
}
}  // namespace

std::size_t kv_index_bytes(const Registry& reg) noexcept {
  if (reg.kv_blocks == 0) return 0;
  std::size_t n = main_index_bytes(reg);
  if (reg.kv_pending_blocks != 0) {
    n += omni::kv::KvIndex::required_bytes(index_shape(reg, reg.kv_pending_blocks));
  }
  return n;
}

std::size_t kv_shared_bytes(const Registry& reg) noexcept {
  if (reg.kv_blocks == 0) return 0;
  return shared_bytes_for(std::max<std::uint32_t>(1, reg.state_config.max_backends),
                          static_cast<std::uint32_t>(reg.pools.size()));
}

bool kv_create(void* index_region, std::size_t index_bytes, void* shared_region,
               std::size_t shared_bytes, const Registry& reg, ngx_log_t* log) noexcept try {
  const omni::kv::KvIndexShape shape = index_shape(reg, reg.kv_blocks);
  const std::size_t main_bytes = main_index_bytes(reg);
  if (index_bytes < main_bytes) return false;
  auto index = omni::kv::KvIndex::create(index_region, main_bytes, shape);
  if (index == nullptr) return false;
  if (reg.kv_pending_blocks != 0 &&
      omni::kv::KvIndex::create(static_cast<char*>(index_region) + main_bytes,
                                index_bytes - main_bytes,
                                index_shape(reg, reg.kv_pending_blocks)) == nullptr) {
    return false;
  }
  for (const Pool& p : reg.pools) {
    for (std::uint16_t i = 0; i < p.count; ++i) {
      if (p.kv_block_size != 0) index->set_block_size(p.base + i, p.kv_block_size);
      if (p.kv_max_blocks != 0) index->set_bound(p.base + i, p.kv_max_blocks);
    }
  }
  std::memset(shared_region, 0, shared_bytes);
  auto* hdr = new (shared_region) SharedHeader();
  hdr->backends = shape.instances;
  hdr->pools = static_cast<std::uint32_t>(reg.pools.size());
  hdr->magic = kKvMagic;
  return true;
} catch (...) {
  log_exception(log, "KV index");
  return false;
}

namespace {
// A row of in-flight accounting changes hands (taken at start, or its worker died): its tokens
// go. A dead worker's pending chains would stay until pushed out and cannot be told from the
// others', so then every server's pending index starts again (the live workers' removals of
// chains no longer there are harmless).
void forget_row(std::uint32_t row, bool owner_died) {
  Runtime& r = rt();
  for (std::uint32_t b = 0; b < r.shared.hdr->backends; ++b) {
    r.shared.tokens[row * r.shared.hdr->backends + b].store(0);
  }
  if (owner_died && r.pending != nullptr) {
    for (std::uint32_t b = 0; b < r.pending->instances(); ++b) r.pending->clear(b);
  }
}
}  // namespace

void kv_init_process(ngx_cycle_t* cycle, void* index_region, std::size_t index_bytes,
                     void* shared_region, std::size_t shared_bytes) noexcept try {
  Runtime& r = rt();
  const Registry* reg = registry();
  r.log = cycle->log;
  if (reg == nullptr || index_region == nullptr || shared_region == nullptr) return;
  const std::size_t main_bytes = main_index_bytes(*reg);
  r.index = index_bytes >= main_bytes ? omni::kv::KvIndex::attach(index_region, main_bytes)
                                      : nullptr;
  r.pending = reg->kv_pending_blocks != 0 && r.index != nullptr
                  ? omni::kv::KvIndex::attach(static_cast<char*>(index_region) + main_bytes,
                                              index_bytes - main_bytes)
                  : nullptr;
  auto* hdr = static_cast<SharedHeader*>(shared_region);
  if (r.index == nullptr || hdr->magic != kKvMagic ||
      shared_bytes < shared_bytes_for(hdr->backends, hdr->pools)) {
    ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                  "omni_proxy: the KV index is missing from the zone; kv_aware routes by load");
    r.index.reset();
    r.pending.reset();
    return;
  }
  r.shared = view_of(shared_region);
  // This worker's row of in-flight token accounting: a free row or one of a dead worker.
  for (std::uint32_t row = 0; row < kRows && r.row < 0; ++row) {
    std::int32_t cur = r.shared.hdr->row_pid[row].load();
    if (cur != 0 && omni::pid_alive(cur)) continue;
    if (r.shared.hdr->row_pid[row].compare_exchange_strong(cur, ngx_pid)) {
      forget_row(row, cur != 0);
      r.row = static_cast<std::int32_t>(row);
    }
  }
  r.rings.clear();
  r.rings.resize(reg->pools.size());
  for (const Pool& p : reg->pools) {
    std::vector<std::uint64_t> ids;
    for (const Pool::Server& s : p.servers) ids.push_back(s.id);
    if (!ids.empty()) r.rings[p.kv_pool_index] = std::make_unique<omni::BoundedLoadRing>(ids);
  }
  if (any_events(*reg)) {
    r.lease_timer.handler = lease_tick;
    r.lease_timer.log = cycle->log;
    r.lease_timer.data = &r;
    r.lease_timer.cancelable = 1;
    ngx_add_timer(&r.lease_timer, 1);
  }
} catch (...) {
  log_exception(cycle->log, "KV index attach");
}

void kv_exit_process() noexcept {
  Runtime& r = rt();
  if (r.lease_timer.timer_set) ngx_del_timer(&r.lease_timer);
  stop_subscriber();
  if (r.shared.hdr != nullptr) {
    std::int32_t me = ngx_pid;
    r.shared.hdr->sub_pid.compare_exchange_strong(me, 0);
    if (r.row >= 0) {
      for (std::uint32_t b = 0; b < r.shared.hdr->backends; ++b) {
        r.shared.tokens[r.row * r.shared.hdr->backends + b].store(0);
      }
      r.shared.hdr->row_pid[r.row].store(0);
    }
  }
  r.row = -1;
  r.rings.clear();
  r.pending.reset();
  r.index.reset();
  r.shared = {};
}

void kv_reclaim() noexcept {
  Runtime& r = rt();
  if (r.shared.hdr == nullptr) return;
  for (std::uint32_t row = 0; row < kRows; ++row) {
    std::int32_t pid = r.shared.hdr->row_pid[row].load();
    if (pid == 0 || omni::pid_alive(pid)) continue;
    if (r.shared.hdr->row_pid[row].compare_exchange_strong(pid, 0)) forget_row(row, true);
  }
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

void kv_key_request(const LocConf& lcf, const omni::ParsedBody& body, std::size_t prompt_tokens,
                    KvRequest& kv) noexcept try {
  const Pool* prefill = find_pool(lcf.mode == kModeAggregated ? lcf.decode.upstream
                                                               : lcf.prefill.upstream);
  const Pool* decode = find_pool(lcf.decode.upstream);
  kv.pools[0] = prefill;
  kv.pools[1] = lcf.mode == kModeAggregated ? nullptr : decode;
  omni::PrefixKeyOptions o;
  o.block_tokens = prefill != nullptr ? block_size_of(*prefill) : kDefaultBlockSize;
  kv.keys[0] = omni::prefix_keys_of(body, o);
  const std::uint32_t decode_bs = decode != nullptr ? block_size_of(*decode) : o.block_tokens;
  if (decode_bs == o.block_tokens) {
    kv.keys[1] = kv.keys[0];
  } else {
    o.block_tokens = decode_bs;
    kv.keys[1] = omni::prefix_keys_of(body, o);
  }
  kv.prompt_tokens = static_cast<std::uint32_t>(
      prompt_tokens > 0 ? prompt_tokens
                        : kv.keys[0].token_ids ? kv.keys[0].units : kv.keys[0].units / 4);
  kv.keyed = true;
} catch (...) {
  log_exception(ngx_cycle->log, "KV keys");
}

std::int32_t kv_pick(const Pool& pool, const omni::PoolSnapshot& snap,
                     const omni::RequestFeatures& f, const PeerChoice& choice) {
  static const auto filters = omni::make_eligibility_filters();
  std::vector<std::size_t> eligible(snap.size());
  std::iota(eligible.begin(), eligible.end(), std::size_t{0});
  std::vector<omni::Rejection> rejected;
  const omni::PickContext ctx{f, snap, std::chrono::steady_clock::now()};
  for (const auto& filter : filters) filter->filter(ctx, eligible, rejected);
  if (eligible.empty()) return -1;
  static const KvPolicyOptions kDefaults;
  const KvPolicyOptions& o = choice.lcf != nullptr && choice.lcf->kv != nullptr ? *choice.lcf->kv
                                                                                 : kDefaults;
  KvRequest* kv = choice.kv;
  if (kv == nullptr || !kv->keyed) {
    static KvRequest empty;
    empty = {};
    kv = &empty;
  }
  KvExplain& ex = kv->route[choice.decode_leg ? 1 : 0];
  const std::int32_t chosen =
      choice.decode_leg ? pick_decode(pool, snap, eligible, o, *kv, f.request_hash, ex)
                        : pick_prefill(pool, snap, eligible, o, *kv, ex);
  if (chosen < 0) return -1;
  record_decision(pool, ex);
  // Approximate mode: the chosen server will hold the prompt's blocks once it prefilled them.
  Runtime& r = rt();
  if (pool.kv_mode == KvMode::kApproximate && r.index != nullptr) {
    r.index->store_chain(pool.base + chosen, kv->keys[choice.decode_leg ? 1 : 0].blocks);
  }
  return chosen;
}

void kv_cached_by_server(const Pool& pool, const KvRequest& kv, int which,
                         std::vector<std::uint32_t>& out) noexcept {
  out.assign(pool.count, 0);
  if (!kv.keyed || which < 0 || which > 1) return;
  const omni::PrefixKeys& keys = kv.keys[which];
  for (std::uint16_t i = 0; i < pool.count; ++i) {
    out[i] = cached_tokens(matched_blocks(pool, pool.base + i, keys), keys, kv.prompt_tokens);
  }
}

std::uint64_t kv_ring_key(const KvRequest& kv, int which,
                          std::span<const std::uint32_t> cached) noexcept {
  const omni::PrefixKeys& keys = kv.keys[which < 0 || which > 1 ? 0 : which];
  if (!kv.keyed || keys.blocks.empty() || keys.block_units == 0) {
    return omni::mix64(kv.prompt_tokens);
  }
  // The first block past what every server holds (a system prompt cached everywhere), as
  // omni::choose_prefill keys its cold choice.
  std::uint32_t common = cached.empty() ? 0 : cached[0];
  for (std::uint32_t c : cached) common = std::min(common, c);
  const std::size_t block = common / keys.block_units;
  return block < keys.blocks.size() ? keys.blocks[block] : keys.blocks.back();
}

void kv_record_choice(const Pool& pool, KvRequest& kv, int which, std::int32_t server,
                      std::int32_t runner_up, std::uint8_t reason, double ttft_ms,
                      double runner_up_ttft_ms, std::span<const std::uint32_t> cached) noexcept {
  if (which < 0 || which > 1 || server < 0 || server >= pool.count) return;
  KvExplain& ex = kv.route[which];
  ex = {};
  try {
    ex.cached_by_server.assign(cached.begin(), cached.end());
  } catch (...) {
    return;
  }
  ex.set = true;
  ex.reason = reason;
  ex.chosen = server;
  ex.runner_up = runner_up;
  auto at = [&](std::int32_t i) {
    return i >= 0 && static_cast<std::size_t>(i) < cached.size() ? cached[static_cast<std::size_t>(i)]
                                                                   : 0u;
  };
  ex.cached = at(server);
  ex.runner_up_cached = at(runner_up);
  ex.ttft_ms = ttft_ms;
  ex.runner_up_ttft_ms = runner_up_ttft_ms;
  kv.pools[which] = &pool;
  if (pool.kv_mode == KvMode::kNone) return;
  record_decision(pool, ex);
  Runtime& r = rt();
  if (pool.kv_mode == KvMode::kApproximate && r.index != nullptr && kv.keyed) {
    r.index->store_chain(pool.base + server, kv.keys[which].blocks);
  }
}

void kv_prefill_sent(KvRequest& kv, const Pool& pool, std::int32_t server) noexcept {
  Runtime& r = rt();
  kv_prefill_done(kv);  // a retry moves the accounting to the new server
  if (r.shared.hdr == nullptr || server < 0 || server >= pool.count || !kv.keyed) return;
  const KvExplain& ex = kv.route[0];
  std::uint32_t cached = 0;
  if (static_cast<std::size_t>(server) < ex.cached_by_server.size()) {
    cached = ex.cached_by_server[static_cast<std::size_t>(server)];
  }
  const auto backend = static_cast<std::uint32_t>(pool.base + server);
  const omni::PrefixKeys& keys = kv.keys[0];
  if (pool.kv_pending && r.pending != nullptr && !keys.blocks.empty()) {
    // How much of the prediction the pending prompts made (the index alone would say less).
    const std::uint32_t evented = r.index != nullptr
        ? cached_tokens(r.index->match(backend, keys.blocks), keys, kv.prompt_tokens)
        : 0;
    if (cached > evented) {
      r.shared.backends[backend].pending_legs.fetch_add(1, std::memory_order_relaxed);
      r.shared.backends[backend].pending_tokens.fetch_add(cached - evented,
                                                          std::memory_order_relaxed);
    }
    // Tags: this worker's pid and sequence, so no two requests of the zone share one.
    const std::uint64_t tag =
        omni::mix64((std::uint64_t(std::uint32_t(ngx_pid)) << 40) ^ ++r.pending_seq) | 1;
    if (r.pending->store_tagged_chain(backend, keys.blocks, tag)) {
      kv.pending_backend = static_cast<std::int32_t>(backend);
      kv.pending_tag = tag;
    }
  }
  if (r.row < 0) return;
  const std::int64_t tokens = std::max<std::int64_t>(0, std::int64_t(kv.prompt_tokens) - cached);
  kv.solo = r.shared.inflight_tokens(backend) == 0;
  r.shared.tokens[std::uint32_t(r.row) * r.shared.hdr->backends + backend].fetch_add(tokens);
  kv.accounted_backend = static_cast<std::int32_t>(backend);
  kv.accounted_tokens = tokens;
  kv.accounted_ns = omni::monotonic_now_ns();
}

void kv_prefill_done(KvRequest& kv) noexcept {
  Runtime& r = rt();
  if (kv.pending_backend >= 0 && r.pending != nullptr) {
    // Its blocks are in the engine's cache now, and their events on the way (or already applied).
    r.pending->remove_tagged_chain(static_cast<std::uint32_t>(kv.pending_backend),
                                   kv.keys[0].blocks, kv.pending_tag);
  }
  kv.pending_backend = -1;
  kv.pending_tag = 0;
  if (kv.accounted_backend < 0) return;
  if (r.shared.hdr != nullptr && r.row >= 0) {
    r.shared.tokens[std::uint32_t(r.row) * r.shared.hdr->backends +
                    std::uint32_t(kv.accounted_backend)]
        .fetch_sub(kv.accounted_tokens);
  }
  kv.accounted_backend = -1;
  kv.accounted_tokens = 0;
}

void kv_observe_cached(KvRequest& kv, const Pool& pool, std::int32_t server,
                       std::uint32_t cached, std::uint32_t prompt_tokens) noexcept {
  Runtime& r = rt();
  if (r.shared.hdr == nullptr || server < 0 || !kv.keyed) return;
  const KvExplain& ex = kv.route[0];
  if (!ex.set) return;
  kv.actual_cached = cached;
  const auto backend = static_cast<std::uint32_t>(pool.base + server);
  BackendShared& b = r.shared.backends[backend];
  const std::uint32_t predicted = static_cast<std::size_t>(server) < ex.cached_by_server.size()
                                      ? ex.cached_by_server[static_cast<std::size_t>(server)]
                                      : 0;
  const std::uint64_t err = predicted > cached ? predicted - cached : cached - predicted;
  b.predictions.fetch_add(1, std::memory_order_relaxed);
  b.predicted_tokens.fetch_add(predicted, std::memory_order_relaxed);
  b.actual_tokens.fetch_add(cached, std::memory_order_relaxed);
  b.abs_error_tokens.fetch_add(err, std::memory_order_relaxed);
  if (err < std::max<std::size_t>(1, kv.keys[0].block_units)) {
    b.within_block.fetch_add(1, std::memory_order_relaxed);
  }
  // The server's prefill speed, from legs that had it to themselves.
  if (kv.solo && kv.accounted_ns != 0 && prompt_tokens > cached) {
    const double secs = double(omni::monotonic_now_ns() - kv.accounted_ns) / 1e9;
    if (secs > 0) {
      const double sample = double(prompt_tokens - cached) / secs;
      const double old = load_double(b.speed_bits);
      const double next = old > 0 ? old + kSpeedAlpha * (sample - old) : sample;
      b.speed_bits.store(std::bit_cast<std::uint64_t>(next), std::memory_order_relaxed);
      b.speed_samples.fetch_add(1, std::memory_order_relaxed);
    }
  }
}

void kv_engine_config(const Pool& pool, std::uint16_t server, std::optional<std::uint32_t> block_size,
                      std::optional<std::uint64_t> num_gpu_blocks) noexcept {
  omni::kv::KvIndex* idx = rt().index.get();
  if (idx == nullptr || pool.kv_mode == KvMode::kNone || server >= pool.count) return;
  const std::uint32_t backend = pool.base + server;
  if (block_size && *block_size > 0 && pool.kv_block_size == 0) {
    idx->set_block_size(backend, *block_size);
  }
  if (num_gpu_blocks && *num_gpu_blocks > 0 && pool.kv_max_blocks == 0) {
    idx->set_bound(backend, *num_gpu_blocks);
  }
}

std::string kv_explain_text(const Pool* pool, const KvExplain& e) {
  if (!e.set || e.chosen < 0) return {};
  std::string out = "reason=";
  out += kReasonNames[std::min<int>(e.reason, kReasons - 1)];
  if (e.reason == 3 && e.cache_decided) out += "+cache";
  out += "; cached=" + std::to_string(e.cached);
  char buf[64];
  if (e.reason != 3) {
    std::snprintf(buf, sizeof buf, "; expected_ttft_ms=%.1f", e.ttft_ms);
    out += buf;
  }
  if (e.runner_up >= 0 && pool != nullptr &&
      static_cast<std::size_t>(e.runner_up) < pool->servers.size()) {
    out += "; runner_up=" + pool->servers[static_cast<std::size_t>(e.runner_up)].name;
    out += "; runner_up_cached=" + std::to_string(e.runner_up_cached);
    if (e.reason != 3) {
      std::snprintf(buf, sizeof buf, "; runner_up_expected_ttft_ms=%.1f", e.runner_up_ttft_ms);
      out += buf;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Observability
// ---------------------------------------------------------------------------------------------

nlohmann::json kv_status_json() {
  Runtime& r = rt();
  const Registry* reg = registry();
  if (reg == nullptr || r.index == nullptr || r.shared.hdr == nullptr) return nullptr;
  const SharedHeader& h = *r.shared.hdr;
  const std::uint64_t beat = h.sub_beat_ms.load();
  const std::uint64_t now = mono_ms();
  nlohmann::json j;
  j["blocks_per_server"] = r.index->blocks_per_instance();
  j["subscriber"] = {{"pid", h.sub_pid.load()},
                     {"heartbeat_age_ms", beat == 0 ? nlohmann::json(nullptr)
                                                    : nlohmann::json(now > beat ? now - beat : 0)},
                     {"started_unix_ms", h.sub_started_unix_ms.load()},
                     {"starts", h.sub_starts.load()}};
  nlohmann::json pools = nlohmann::json::array();
  for (const Pool& p : reg->pools) {
    if (p.kv_mode == KvMode::kNone) continue;
    const PoolShared& ps = r.shared.pools[p.kv_pool_index];
    nlohmann::json decisions;
    for (int k = 0; k < kReasons; ++k) decisions[kReasonNames[k]] = ps.decisions[k].load();
    nlohmann::json servers = nlohmann::json::array();
    for (std::uint16_t i = 0; i < p.count; ++i) {
      const std::uint32_t backend = p.base + i;
      const omni::kv::InstanceCounters c = r.index->counters(backend);
      const BackendShared& b = r.shared.backends[backend];
      nlohmann::json s = {{"name", p.servers[i].name},
                          {"blocks", c.blocks},
                          {"bound", c.bound},
                          {"block_size", c.block_size},
                          {"stored", c.stored},
                          {"removed", c.removed},
                          {"evicted", c.evicted},
                          {"clears", c.clears},
                          {"orphans", c.orphans},
                          {"last_seq", c.last_seq},
                          {"inflight_uncached_tokens", r.shared.inflight_tokens(backend)},
                          {"prefill_tokens_per_s", load_double(b.speed_bits)}};
      const std::uint64_t n = b.predictions.load();
      s["prediction"] = {{"requests", n},
                         {"predicted_tokens", b.predicted_tokens.load()},
                         {"actual_tokens", b.actual_tokens.load()},
                         {"mean_abs_error_tokens",
                          n == 0 ? 0.0 : double(b.abs_error_tokens.load()) / double(n)},
                         {"within_one_block", n == 0 ? 0.0 : double(b.within_block.load()) / double(n)}};
      nlohmann::json chosen;
      for (int k = 0; k < kReasons; ++k) chosen[kReasonNames[k]] = b.chosen[k].load();
      s["chosen"] = std::move(chosen);
      if (p.kv_pending && r.pending != nullptr) {
        const omni::kv::InstanceCounters pc = r.pending->counters(backend);
        s["pending"] = {{"blocks", pc.blocks},
                        {"bound", pc.bound},
                        {"evicted", pc.evicted},
                        {"legs", b.pending_legs.load()},
                        {"tokens", b.pending_tokens.load()}};
      }
      if (p.kv_mode == KvMode::kEvents) {
        const std::uint64_t last = b.last_batch_unix_ms.load();
        s["feed"] = {{"batches", b.batches.load()},
                     {"events", b.events.load()},
                     {"malformed", b.malformed.load()},
                     {"skipped_events", b.skipped_events.load()},
                     {"gaps", b.gaps.load()},
                     {"replays_requested", b.replays_requested.load()},
                     {"replays_completed", b.replays_completed.load()},
                     {"replays_failed", b.replays_failed.load()},
                     {"restarts", b.restarts.load()},
                     {"unrecoverable", b.unrecoverable.load()},
                     {"duplicates", b.duplicates.load()},
                     {"replaying", b.replaying.load() != 0},
                     {"connects", b.connects.load()},
                     {"disconnects", b.disconnects.load()},
                     {"last_seq", b.feed_last_seq.load()},
                     {"last_batch_age_ms", last == 0 ? nlohmann::json(nullptr)
                                                     : nlohmann::json(unix_ms() - std::min(last, unix_ms()))},
                     {"synced_after_ms", b.synced_after_ms.load()}};
      }
      servers.push_back(std::move(s));
    }
    nlohmann::json last = nullptr;
    if (ps.last_unix_ms.load() != 0) {
      const auto name = [&p](std::uint64_t i) -> nlohmann::json {
        return i < p.servers.size() ? nlohmann::json(p.servers[i].name) : nlohmann::json(nullptr);
      };
      last = {{"reason", kReasonNames[std::min<std::uint64_t>(ps.last_reason.load(), kReasons - 1)]},
              {"chosen", name(ps.last_chosen.load())},
              {"cached", ps.last_cached.load()},
              {"expected_ttft_ms", double(ps.last_ttft_us.load()) / 1000},
              {"runner_up", name(ps.last_runner_up.load())},
              {"runner_up_cached", ps.last_runner_up_cached.load()},
              {"runner_up_expected_ttft_ms", double(ps.last_runner_up_ttft_us.load()) / 1000},
              {"unix_ms", ps.last_unix_ms.load()}};
    }
    pools.push_back({{"name", p.name},
                     {"mode", p.kv_mode == KvMode::kEvents ? "events" : "approximate"},
                     {"pending", p.kv_pending},
                     {"block_size", block_size_of(p)},
                     {"decisions", std::move(decisions)},
                     {"last_decision", std::move(last)},
                     {"servers", std::move(servers)}});
  }
  j["pools"] = std::move(pools);
  return j;
}

void kv_render_metrics(omni::prom::TextWriter& w) {
  Runtime& r = rt();
  const Registry* reg = registry();
  if (reg == nullptr || r.index == nullptr || r.shared.hdr == nullptr) return;
  struct Row {
    const Pool* pool;
    std::uint16_t i;
    omni::kv::InstanceCounters c;
    const BackendShared* b;
  };
  std::vector<Row> rows;
  for (const Pool& p : reg->pools) {
    if (p.kv_mode == KvMode::kNone) continue;
    for (std::uint16_t i = 0; i < p.count; ++i) {
      rows.push_back({&p, i, r.index->counters(p.base + i), &r.shared.backends[p.base + i]});
    }
  }
  auto labels = [](const Row& row) -> omni::prom::Labels {
    return {{"pool", row.pool->name}, {"backend", row.pool->servers[row.i].name}};
  };
  auto family_of = [&](const std::vector<Row>& of, const char* name, const char* type,
                       const char* help, auto value) {
    w.family(name, type, help);
    for (const Row& row : of) w.sample(name, labels(row), static_cast<double>(value(row)));
  };
  auto family = [&](const char* name, const char* type, const char* help, auto value) {
    family_of(rows, name, type, help, value);
  };
  family("omni_proxy_kv_index_blocks", "gauge", "Blocks the KV index holds for the server.",
         [](const Row& x) { return x.c.blocks; });
  family("omni_proxy_kv_index_bound_blocks", "gauge",
         "Most blocks the index keeps for the server (num_gpu_blocks or max_blocks).",
         [](const Row& x) { return x.c.bound; });
  w.family("omni_proxy_kv_index_blocks_total", "counter",
           "Blocks entering and leaving the KV index, by kind.");
  for (const Row& row : rows) {
    const std::pair<const char*, std::uint64_t> kinds[] = {
        {"stored", row.c.stored},   {"removed", row.c.removed}, {"evicted", row.c.evicted},
        {"orphan", row.c.orphans},  {"skipped", row.c.skipped}, {"unknown_removed", row.c.unknown_removed}};
    for (const auto& [kind, v] : kinds) {
      omni::prom::Labels l = labels(row);
      l.emplace_back("kind", kind);
      w.sample("omni_proxy_kv_index_blocks_total", l, static_cast<double>(v));
    }
  }
  family("omni_proxy_kv_index_clears_total", "counter",
         "Times the server's index was dropped (AllBlocksCleared, engine restart, lost events).",
         [](const Row& x) { return x.c.clears; });
  family("omni_proxy_kv_events_batches_total", "counter", "KV-event batches applied.",
         [](const Row& x) { return x.b->batches.load(); });
  family("omni_proxy_kv_events_malformed_total", "counter",
         "KV-event messages that could not be decoded (skipped).",
         [](const Row& x) { return x.b->malformed.load(); });
  family("omni_proxy_kv_events_gaps_total", "counter", "Sequence gaps detected in a KV-event stream.",
         [](const Row& x) { return x.b->gaps.load(); });
  family("omni_proxy_kv_events_replays_total", "counter", "Replays completed after a gap.",
         [](const Row& x) { return x.b->replays_completed.load(); });
  family("omni_proxy_kv_events_restarts_total", "counter",
         "Engine restarts detected (sequence numbers went back).",
         [](const Row& x) { return x.b->restarts.load(); });
  family("omni_proxy_kv_inflight_uncached_tokens", "gauge",
         "Predicted uncached prompt tokens the proxy sent the server that are still prefilling.",
         [&r](const Row& x) { return r.shared.inflight_tokens(x.pool->base + x.i); });
  std::vector<Row> pending_rows;
  for (const Row& row : rows) {
    if (row.pool->kv_pending && r.pending != nullptr) pending_rows.push_back(row);
  }
  if (!pending_rows.empty()) {
    family_of(pending_rows, "omni_proxy_kv_pending_blocks", "gauge",
              "Blocks of prompts sent to the server and still prefilling (events pools).",
              [&r](const Row& x) { return r.pending->counters(x.pool->base + x.i).blocks; });
    family_of(pending_rows, "omni_proxy_kv_pending_legs_total", "counter",
              "Prefill legs whose predicted cache there came partly from prompts still "
              "prefilling.",
              [](const Row& x) { return x.b->pending_legs.load(); });
    family_of(pending_rows, "omni_proxy_kv_pending_tokens_total", "counter",
              "Cached tokens those legs were predicted beyond what the events showed.",
              [](const Row& x) { return x.b->pending_tokens.load(); });
  }
  family("omni_proxy_kv_prediction_requests_total", "counter",
         "Requests whose predicted cached tokens were compared with the engine's report.",
         [](const Row& x) { return x.b->predictions.load(); });
  family("omni_proxy_kv_predicted_cached_tokens_total", "counter",
         "Cached prompt tokens the proxy predicted for those requests.",
         [](const Row& x) { return x.b->predicted_tokens.load(); });
  family("omni_proxy_kv_actual_cached_tokens_total", "counter",
         "Cached prompt tokens the engine reported for those requests.",
         [](const Row& x) { return x.b->actual_tokens.load(); });
  family("omni_proxy_kv_prediction_abs_error_tokens_total", "counter",
         "Sum of |predicted - reported| cached tokens.",
         [](const Row& x) { return x.b->abs_error_tokens.load(); });
  w.family("omni_proxy_kv_route_decisions_total", "counter",
           "kv_aware routing decisions by the server chosen and why.");
  for (const Row& row : rows) {
    for (int k = 0; k < kReasons; ++k) {
      omni::prom::Labels l = labels(row);
      l.emplace_back("reason", kReasonNames[k]);
      w.sample("omni_proxy_kv_route_decisions_total", l,
               static_cast<double>(row.b->chosen[k].load()));
    }
  }
  if (any_events(*reg)) {
    const std::uint64_t beat = r.shared.hdr->sub_beat_ms.load();
    const std::uint64_t now = mono_ms();
    w.family("omni_proxy_kv_subscriber_up", "gauge",
             "1 when a worker runs the KV-event subscriber and it beat recently.");
    w.sample("omni_proxy_kv_subscriber_up", {},
             r.shared.hdr->sub_pid.load() != 0 && beat != 0 && now - std::min(now, beat) < kLeaseStaleMs ? 1 : 0);
  }
}

}  // namespace omni::ngx
