// The prefill and decode schedulers (omni/scheduler.hpp).
#include "omni/scheduler.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <stdexcept>

namespace omni::sched {
namespace detail {

constexpr std::uint64_t kMagic = 0x6f6d6e6973636864ULL;  // "omnischd"
constexpr std::uint32_t kVersion = 1;

// A two-parameter recursive least-squares fit y = t0 + t1 x with exponential forgetting. Plain
// doubles: only touched under the lock.
struct Rls {
  double t0, t1;         // parameters
  double p00, p01, p11;  // covariance (symmetric)
  std::uint64_t n;
};

struct PoolRecord {
  std::uint16_t base;
  std::uint16_t count;
  std::uint32_t pad;
  std::uint64_t ids[kMaxServers];
};

struct Instance {
  // Limits.
  std::uint32_t batch_tokens_cfg;
  std::uint32_t max_seqs;
  // Accounting, derived from the entries (repair() recomputes it).
  std::uint32_t outstanding;     // prefills released, not done
  std::uint32_t decoding;        // decodes released, not done
  std::uint64_t out_tokens;      // their uncached tokens
  std::uint64_t since_boundary;  // of which released after the step in progress began
  // The step cycle.
  std::uint64_t boundary_ns;            // start of the step in progress
  std::uint64_t cluster_start_ns;       // first completion of the open cluster (0: none open)
  std::uint64_t cluster_last_ns;        // last completion of the open cluster
  std::uint64_t cluster_step_start_ns;  // start of the step that cluster ended
  double cluster_tokens;
  std::uint64_t boundaries;
  std::uint64_t max_step_tokens;
  double cycle_ms;  // EWMA of observed step durations
  Rls step;         // step_ms = t0 + t1 x ktokens
  Rls itl;          // itl_ms = t0 + t1 x running
  // Statistics.
  std::uint64_t released;
  std::uint64_t decode_released;
};

enum Flags : std::uint8_t {
  kStarved = 1,
  kHeld = 2,
  kPrefillAccounted = 4,  // counted in its prefill server's outstanding and tokens
  kDecodeAccounted = 8,   // counted in its decode server's decoding
};

struct Entry {
  std::atomic<std::uint32_t> state;
  std::int32_t owner;
  std::uint64_t ticket;
  std::uint64_t enqueue_ns;
  std::uint64_t deadline_ns;  // the prefill queue bound
  std::uint64_t released_ns;
  std::uint64_t decode_enqueue_ns;
  std::uint64_t decode_released_ns;
  std::uint64_t ring_key;
  double key;
  double expected_ms;
  double runner_up_ms;
  std::int32_t priority;
  std::uint32_t prompt_tokens;
  std::uint32_t min_uncached;  // prompt - most cached anywhere (admission, order)
  std::uint32_t acct_tokens;   // uncached tokens accounted at the prefill server
  std::uint32_t cached_at;     // predicted cached tokens at the chosen prefill server
  std::uint32_t decode_load;   // the decode server's load at release (ITL fit)
  std::uint16_t ppool;
  std::uint16_t dpool;
  std::int16_t pserver;
  std::int16_t dserver;
  std::int16_t runner_up;
  std::uint8_t mode;
  std::uint8_t flags;
  std::uint8_t reason;
  std::uint8_t refusal;  // kRefused: 1 = decode wait, 2 = no server
};

struct Header {
  std::uint64_t magic;
  std::uint32_t version;
  std::uint32_t capacity;
  std::uint32_t instances;
  std::uint32_t pools;
  std::uint64_t bytes;
  std::uint64_t off_pools, off_inst, off_entries, off_cached, off_order, off_fifo, off_dqueue,
      off_free;
  RobustLockWord lock;
  // The lease.
  std::atomic<std::int32_t> leader;
  std::int32_t pad0;
  std::atomic<std::uint64_t> leader_beat_ns;
  std::atomic<std::uint64_t> leader_since_ns;
  std::atomic<std::uint64_t> leader_changes;
  // Derived, under the lock.
  std::uint32_t n_order, n_fifo, n_dqueue, n_free;
  std::uint32_t live;
  std::uint32_t pad1;
  std::uint64_t next_ticket;
  std::uint64_t last_reclaim_ns;
  // Counters (atomics: read without the lock).
  std::atomic<std::uint64_t> cache_updates;
  std::atomic<std::uint64_t> enqueued, released, decode_released, starved, held, refused_full,
      refused_deadline, refused_unavailable, refused_decode_wait, cancelled, completed, reclaimed,
      repairs, passes;
  Log2Histogram decision_latency;
  Log2Histogram notify_latency;
  Log2Histogram queue_wait;
  Log2Histogram decode_wait;
};

}  // namespace detail

using detail::Entry;
using detail::Header;
using detail::Instance;
using detail::Rls;

namespace {

std::size_t align64(std::size_t n) {
  return (n + 63) & ~std::size_t{63};
}

struct Layout {
  std::size_t pools, inst, entries, cached, order, fifo, dqueue, free, total;
};

Layout layout_for(std::uint32_t capacity, std::uint32_t instances, std::size_t pools) {
  Layout l{};
  std::size_t at = align64(sizeof(Header));
  l.pools = at;
  at += align64(sizeof(detail::PoolRecord) * pools);
  l.inst = at;
  at += align64(sizeof(Instance) * instances);
  l.entries = at;
  at += align64(sizeof(Entry) * capacity);
  l.cached = at;
  at += align64(sizeof(std::uint32_t) * 2 * kMaxServers * capacity);
  l.order = at;
  at += align64(sizeof(std::uint32_t) * capacity);
  l.fifo = at;
  at += align64(sizeof(std::uint32_t) * capacity);
  l.dqueue = at;
  at += align64(sizeof(std::uint32_t) * capacity);
  l.free = at;
  at += align64(sizeof(std::uint32_t) * capacity);
  l.total = at;
  return l;
}

bool shape_ok(const Shape& s) {
  if (s.capacity == 0 || s.capacity > kMaxCapacity) return false;
  if (s.instances == 0 || s.instances > kMaxInstances) return false;
  if (s.pools.empty() || s.pools.size() > kMaxPools) return false;
  for (const PoolShape& p : s.pools) {
    if (p.count == 0 || p.count > kMaxServers) return false;
    if (static_cast<std::uint32_t>(p.base) + p.count > s.instances) return false;
    if (p.ids.size() != p.count) return false;
  }
  return true;
}

double finite_or(double v, double fallback) {
  return std::isfinite(v) ? v : fallback;
}

void rls_init(Rls& r, double t0, double t1) {
  r.t0 = t0;
  r.t1 = t1;
  // Priors: the slope (time per 1000 tokens, or per running request) is learned from the first
  // observations; the intercept (the fixed cost of a step) moves slowly from its default, since
  // loaded engines run steps of similar sizes, which cannot separate the two (the slope would
  // collapse and the intercept take everything).
  r.p00 = 1.0;
  r.p01 = 0;
  r.p11 = 1e4;
  r.n = 0;
}

void rls_update(Rls& r, double x, double y, double lambda) {
  if (!std::isfinite(x) || !std::isfinite(y)) return;
  if (!(lambda > 0) || lambda > 1) lambda = 1;
  // phi = (1, x)
  const double pp0 = r.p00 + r.p01 * x;  // P phi
  const double pp1 = r.p01 + r.p11 * x;
  const double denom = lambda + pp0 + x * pp1;
  if (!(denom > 0) || !std::isfinite(denom)) return;
  const double k0 = pp0 / denom, k1 = pp1 / denom;
  const double err = y - (r.t0 + r.t1 * x);
  r.t0 += k0 * err;
  r.t1 += k1 * err;
  // P = (P - K phi' P) / lambda
  const double n00 = (r.p00 - k0 * pp0) / lambda;
  const double n01 = (r.p01 - k0 * pp1) / lambda;
  const double n11 = (r.p11 - k1 * pp1) / lambda;
  r.p00 = n00;
  r.p01 = n01;
  r.p11 = n11;
  // Keep the covariance bounded when the inputs stop varying (no wind-up).
  constexpr double kMaxP = 1e6;
  if (!(r.p00 < kMaxP) || !(r.p11 < kMaxP) || !std::isfinite(r.p01)) {
    r.p00 = std::min(std::isfinite(r.p00) ? r.p00 : kMaxP, kMaxP);
    r.p11 = std::min(std::isfinite(r.p11) ? r.p11 : kMaxP, kMaxP);
    r.p01 = 0;
  }
  ++r.n;
}

// The first observation starts from the configured defaults.
void fit_step(Rls& r, double ktokens, double ms, const Options& o) {
  if (r.n == 0) rls_init(r, o.default_step_ms, o.default_ms_per_ktoken);
  rls_update(r, ktokens, ms, o.forgetting);
}
void fit_itl(Rls& r, double running, double ms, const Options& o) {
  if (r.n == 0) rls_init(r, o.default_itl_ms, o.default_itl_ms_per_seq);
  rls_update(r, running, ms, o.forgetting);
}

std::uint64_t ms_to_ns(double ms) {
  if (!(ms > 0)) return 0;
  if (ms > 1e12) return static_cast<std::uint64_t>(1e18);
  return static_cast<std::uint64_t>(ms * 1e6);
}

double ns_to_ms(std::uint64_t ns) {
  return static_cast<double>(ns) / 1e6;
}

std::uint64_t guard_ns(const Options& o) {
  const std::uint64_t g =
      o.guard_ms != 0 ? o.guard_ms : std::min<std::uint64_t>(o.max_wait_ms / 10, 100);
  return g * 1'000'000ULL;
}

State state_of(const Entry& e) {
  return static_cast<State>(e.state.load(std::memory_order_acquire));
}

}  // namespace

std::string_view to_string(Verdict v) noexcept {
  switch (v) {
    case Verdict::kQueued:
      return "queued";
    case Verdict::kQueueFull:
      return "queue_full";
    case Verdict::kDeadline:
      return "deadline";
    case Verdict::kUnavailable:
      return "unavailable";
    case Verdict::kInvalid:
      return "invalid";
  }
  return "?";
}

// Everything that runs under the lock.
struct Scheduler::Impl {
  Scheduler& s;
  Header& h;

  explicit Impl(Scheduler& self) : s(self), h(*self.hdr_) {}

  Entry& entry(std::uint32_t i) { return s.entries_[i]; }
  Instance& inst(std::uint32_t i) { return s.inst_[i]; }
  std::uint32_t* cached(std::uint32_t i, int which) {
    return s.cached_ +
           (static_cast<std::size_t>(i) * 2 + static_cast<std::size_t>(which)) * kMaxServers;
  }
  const PoolShape& pool(std::uint16_t p) { return s.pools_[p]; }

  // --- Models -------------------------------------------------------------------------------
  std::uint32_t batch_tokens(const Instance& in, const Options& o) const {
    if (in.batch_tokens_cfg != 0) return in.batch_tokens_cfg;
    const std::uint64_t seen = in.max_step_tokens;
    const std::uint64_t def = std::max<std::uint32_t>(1, o.default_batch_tokens);
    return static_cast<std::uint32_t>(std::min<std::uint64_t>(std::max(seen, def), UINT32_MAX));
  }
  // The room of a next batch: B, or less with a step target.
  double release_budget(const Instance& in, const Options& o) const {
    const double B = batch_tokens(in, o);
    if (!(o.step_target_ms > 0)) return B;
    const double fit = (o.step_target_ms - step_a(in, o)) / step_b(in, o);
    return std::clamp(fit, 1.0, B);
  }
  static double step_a(const Instance& in, const Options& o) {
    if (in.step.n == 0) return std::max(0.0, o.default_step_ms);
    return std::max(0.0, finite_or(in.step.t0, o.default_step_ms));
  }
  static double step_b(const Instance& in, const Options& o) {  // ms per token
    double per_k =
        in.step.n == 0 ? o.default_ms_per_ktoken : finite_or(in.step.t1, o.default_ms_per_ktoken);
    // A fit gone flat or negative (few samples of similar size) must not make work free.
    per_k = std::max(per_k, 1e-3);
    return per_k / 1000.0;
  }
  static double step_ms(const Instance& in, double tokens, const Options& o) {
    return step_a(in, o) + step_b(in, o) * std::max(0.0, tokens);
  }
  static double itl_ms(const Instance& in, double running, const Options& o) {
    double c = in.itl.n == 0 ? o.default_itl_ms : finite_or(in.itl.t0, o.default_itl_ms);
    double d =
        in.itl.n == 0 ? o.default_itl_ms_per_seq : finite_or(in.itl.t1, o.default_itl_ms_per_seq);
    c = std::max(0.0, c);
    d = std::max(0.0, d);
    return c + d * std::max(0.0, running);
  }

  struct Now {
    std::uint64_t step_tokens = 0;
    std::uint64_t pending = 0;
    double remaining_ms = 0;
    std::uint64_t end_ns = 0;  // expected end of the step in progress (0: idle)
    bool busy = false;
  };
  Now state_now(const Instance& in, std::uint64_t now, const Options& o) const {
    Now n;
    if (in.outstanding == 0) return n;
    n.busy = true;
    const std::uint64_t B = batch_tokens(in, o);
    const std::uint64_t before =
        in.out_tokens > in.since_boundary ? in.out_tokens - in.since_boundary : 0;
    n.step_tokens = std::min(B, before);
    n.pending = in.out_tokens - n.step_tokens;
    n.end_ns = in.boundary_ns + ms_to_ns(step_ms(in, static_cast<double>(n.step_tokens), o));
    n.remaining_ms = n.end_ns > now ? ns_to_ms(n.end_ns - now) : 0.0;
    return n;
  }
  // The engine computes what it has in steps of up to B tokens, whatever the proxy's budget.
  double eta_ms(const Instance& in, const Now& n, double u, const Options& o) const {
    const double B = batch_tokens(in, o);
    const double w = static_cast<double>(n.pending) + u;
    const double steps = std::max(1.0, std::ceil(w / B));
    return n.remaining_ms + steps * step_a(in, o) + step_b(in, o) * w;
  }
  bool room(const Instance& in, const Now& n, double u, const Options& o) const {
    return n.pending == 0 || static_cast<double>(n.pending) + u <= release_budget(in, o);
  }

  // Closes a cluster of completions: one observed step.
  void close_cluster(Instance& in, const Options& o) {
    if (in.cluster_start_ns == 0) return;
    if (in.cluster_step_start_ns != 0 && in.cluster_start_ns > in.cluster_step_start_ns) {
      const double ms = ns_to_ms(in.cluster_start_ns - in.cluster_step_start_ns);
      const double tokens = std::max(0.0, in.cluster_tokens);
      fit_step(in.step, tokens / 1000.0, ms, o);
      in.cycle_ms = in.cycle_ms == 0 ? ms : 0.8 * in.cycle_ms + 0.2 * ms;
      in.max_step_tokens =
          std::max<std::uint64_t>(in.max_step_tokens, static_cast<std::uint64_t>(tokens));
    }
    in.cluster_start_ns = 0;
    in.cluster_last_ns = 0;
    in.cluster_step_start_ns = 0;
    in.cluster_tokens = 0;
  }
  void close_stale_clusters(std::uint64_t now, const Options& o) {
    const std::uint64_t merge = ms_to_ns(o.merge_ms);
    for (std::uint32_t i = 0; i < h.instances; ++i) {
      Instance& in = inst(i);
      if (in.cluster_start_ns != 0 && now > in.cluster_last_ns + merge) close_cluster(in, o);
    }
  }
  // A prefill answer came back from `in` at `now`: `tokens` were computed for it.
  void observe_completion(Instance& in, std::uint64_t now, double tokens, const Options& o) {
    const std::uint64_t merge = ms_to_ns(o.merge_ms);
    if (in.cluster_start_ns != 0 && now <= in.cluster_last_ns + merge) {
      in.cluster_last_ns = now;
      in.cluster_tokens += tokens;
      return;
    }
    close_cluster(in, o);
    // A new boundary: the step that began at boundary_ns ended; the next one begins now with
    // what was released meanwhile.
    in.cluster_start_ns = now;
    in.cluster_last_ns = now;
    in.cluster_step_start_ns = in.boundary_ns;
    in.cluster_tokens = tokens;
    in.boundary_ns = now;
    in.since_boundary = 0;
    ++in.boundaries;
  }

  // --- Accounting ---------------------------------------------------------------------------
  std::uint32_t backend_of(std::uint16_t pool_index, std::int32_t server) {
    return static_cast<std::uint32_t>(pool(pool_index).base) + static_cast<std::uint32_t>(server);
  }
  void account_prefill(Entry& e, std::uint64_t now) {
    Instance& in = inst(backend_of(e.ppool, e.pserver));
    if (in.outstanding == 0) {
      // An idle engine starts a step at once with this request.
      in.boundary_ns = now;
      in.since_boundary = 0;
    } else {
      in.since_boundary += e.acct_tokens;
    }
    ++in.outstanding;
    in.out_tokens += e.acct_tokens;
    e.flags |= detail::kPrefillAccounted;
    ++in.released;
  }
  void unaccount_prefill(Entry& e) {
    if (!(e.flags & detail::kPrefillAccounted)) return;
    e.flags &= static_cast<std::uint8_t>(~detail::kPrefillAccounted);
    Instance& in = inst(backend_of(e.ppool, e.pserver));
    if (in.outstanding > 0) --in.outstanding;
    in.out_tokens = in.out_tokens > e.acct_tokens ? in.out_tokens - e.acct_tokens : 0;
    if (e.released_ns > in.boundary_ns) {
      in.since_boundary = in.since_boundary > e.acct_tokens ? in.since_boundary - e.acct_tokens : 0;
    }
    if (in.outstanding == 0) {
      in.out_tokens = 0;
      in.since_boundary = 0;
    }
  }
  void account_decode(Entry& e) {
    Instance& in = inst(backend_of(e.dpool, e.dserver));
    ++in.decoding;
    ++in.decode_released;
    e.flags |= detail::kDecodeAccounted;
  }
  void unaccount_decode(Entry& e) {
    if (!(e.flags & detail::kDecodeAccounted)) return;
    e.flags &= static_cast<std::uint8_t>(~detail::kDecodeAccounted);
    Instance& in = inst(backend_of(e.dpool, e.dserver));
    if (in.decoding > 0) --in.decoding;
  }

  // --- Queues -------------------------------------------------------------------------------
  bool before(std::uint32_t a, std::uint32_t b) {
    const Entry& x = entry(a);
    const Entry& y = entry(b);
    if (x.priority != y.priority) return x.priority < y.priority;
    if (x.key != y.key) return x.key < y.key;
    return x.ticket < y.ticket;
  }
  bool decode_before(std::uint32_t a, std::uint32_t b) {
    const Entry& x = entry(a);
    const Entry& y = entry(b);
    if (x.priority != y.priority) return x.priority < y.priority;
    if (x.decode_enqueue_ns != y.decode_enqueue_ns)
      return x.decode_enqueue_ns < y.decode_enqueue_ns;
    return x.ticket < y.ticket;
  }
  static void insert_at(std::uint32_t* arr, std::uint32_t& n, std::uint32_t pos, std::uint32_t v) {
    std::memmove(arr + pos + 1, arr + pos, sizeof(std::uint32_t) * (n - pos));
    arr[pos] = v;
    ++n;
  }
  static bool remove_value(std::uint32_t* arr, std::uint32_t& n, std::uint32_t v) {
    for (std::uint32_t i = 0; i < n; ++i) {
      if (arr[i] != v) continue;
      std::memmove(arr + i, arr + i + 1, sizeof(std::uint32_t) * (n - i - 1));
      --n;
      return true;
    }
    return false;
  }
  std::uint32_t order_position(std::uint32_t idx) {
    std::uint32_t lo = 0, hi = h.n_order;
    while (lo < hi) {
      const std::uint32_t mid = (lo + hi) / 2;
      if (before(s.order_[mid], idx)) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    return lo;
  }
  void push_order(std::uint32_t idx) {
    insert_at(s.order_, h.n_order, order_position(idx), idx);
    s.fifo_[h.n_fifo++] = idx;  // arrivals come in time order
  }
  void pop_order(std::uint32_t idx) {
    remove_value(s.order_, h.n_order, idx);
    remove_value(s.fifo_, h.n_fifo, idx);
  }
  void push_decode(std::uint32_t idx) {
    std::uint32_t pos = h.n_dqueue;
    while (pos > 0 && decode_before(idx, s.dqueue_[pos - 1])) --pos;
    insert_at(s.dqueue_, h.n_dqueue, pos, idx);
  }
  void pop_decode(std::uint32_t idx) { remove_value(s.dqueue_, h.n_dqueue, idx); }

  // Refuses a queued entry (it leaves its queue; its owner answers 503). `why`: 1 no decode slot
  // in time, 2 no healthy server.
  void refuse(std::uint32_t idx, std::uint8_t why, std::atomic<std::uint64_t>& counter) {
    Entry& e = entry(idx);
    if (state_of(e) == State::kQueued) pop_order(idx);
    if (state_of(e) == State::kDecodeQueued) pop_decode(idx);
    e.refusal = why;
    e.state.store(static_cast<std::uint32_t>(State::kRefused), std::memory_order_release);
    counter.fetch_add(1, std::memory_order_relaxed);
  }

  void free_entry(std::uint32_t idx) {
    Entry& e = entry(idx);
    const State st = state_of(e);
    if (st == State::kFree) return;
    if (st == State::kQueued) pop_order(idx);
    if (st == State::kDecodeQueued) pop_decode(idx);
    unaccount_prefill(e);
    unaccount_decode(e);
    e.state.store(static_cast<std::uint32_t>(State::kFree), std::memory_order_release);
    e.owner = 0;
    s.free_[h.n_free++] = idx;
    if (h.live > 0) --h.live;
  }

  // --- Choices ------------------------------------------------------------------------------
  bool healthy(std::span<const InstanceView> views, std::uint32_t b) {
    return b >= views.size() || views[b].healthy;
  }
  double kv_usage(std::span<const InstanceView> views, std::uint32_t b) {
    return b < views.size() ? views[b].kv_usage : std::numeric_limits<double>::quiet_NaN();
  }
  std::uint64_t pairing_mask(const Options& o, std::uint32_t prefill_backend, std::uint16_t dpool) {
    for (const Options::Pairing& p : o.pairings) {
      if (p.prefill_backend == prefill_backend && p.decode_pool == dpool) return p.decode_mask;
    }
    return ~std::uint64_t{0};
  }

  // Decode choice among `mask` of `e`'s decode pool; -1: none eligible now.
  struct DecodePick {
    std::int32_t server = -1;
    double itl = 0;
  };
  DecodePick pick_decode(const Entry& e, std::uint32_t idx, std::uint64_t mask, const Options& o,
                         std::span<const InstanceView> views) {
    const PoolShape& dp = pool(e.dpool);
    const std::uint32_t* dc = cached(idx, 1);
    DecodePick best;
    bool best_under = false;
    std::uint32_t best_cached = 0;
    double best_load = 0;
    bool any_low = false;
    for (std::uint16_t j = 0; j < dp.count; ++j) {
      const std::uint32_t b = dp.base + j;
      if (!(mask >> j & 1) || !healthy(views, b)) continue;
      if (!(kv_usage(views, b) >= o.kv_usage_high)) any_low = true;
    }
    for (std::uint16_t j = 0; j < dp.count; ++j) {
      const std::uint32_t b = dp.base + j;
      if (!(mask >> j & 1) || !healthy(views, b)) continue;
      const Instance& in = inst(b);
      const bool high = kv_usage(views, b) >= o.kv_usage_high;
      if (high && any_low) continue;
      const double others = b < views.size() ? views[b].others_running : 0;
      const double load = static_cast<double>(in.decoding) + others;
      if (in.max_seqs != 0 && load >= in.max_seqs) continue;
      const double itl = itl_ms(in, load + 1, o);
      const bool under = !(o.tpot_slo_ms > 0) || itl <= o.tpot_slo_ms;
      const std::uint32_t c = dc[j];
      bool better;
      if (best.server < 0) {
        better = true;
      } else if (under != best_under) {
        better = under;
      } else if (under) {
        // Within the SLO: the one whose own cache holds most, then the least loaded, then
        // rendezvous hashing of the prefix (deterministic, spreads ties).
        better = c > best_cached || (c == best_cached && load < best_load) ||
                 (c == best_cached && load == best_load &&
                  mix64(e.ring_key ^ dp.ids[j]) > mix64(e.ring_key ^ dp.ids[best.server]));
      } else {
        better = itl < best.itl;
      }
      if (better) {
        best.server = j;
        best.itl = itl;
        best_under = under;
        best_cached = c;
        best_load = load;
      }
    }
    return best;
  }

  // Prefill choice for entry `idx`. Returns true when it was released (or refused).
  enum class Outcome { kReleased, kWait, kHold, kRefused };
  struct PoolNow {
    std::vector<Now> now;  // per server
  };

  Outcome place(std::uint32_t idx, std::uint64_t now, const Options& o,
                std::span<const InstanceView> views, bool force, std::vector<PoolNow>& pn,
                std::uint64_t& next_ns) {
    Entry& e = entry(idx);
    const PoolShape& pp = pool(e.ppool);
    const std::uint32_t* pc = cached(idx, 0);
    const bool parallel = e.mode == static_cast<std::uint8_t>(Mode::kParallel);
    KvCandidate roomy[kMaxServers];
    std::size_t n_all = 0, n_room = 0;
    double best_all = std::numeric_limits<double>::infinity();
    double best_room = std::numeric_limits<double>::infinity();
    std::int32_t dpick[kMaxServers];
    for (std::uint16_t j = 0; j < pp.count; ++j) {
      const std::uint32_t b = pp.base + j;
      dpick[j] = -1;
      if (!healthy(views, b)) continue;
      if (parallel) {
        const DecodePick d = pick_decode(e, idx, pairing_mask(o, b, e.dpool), o, views);
        if (d.server < 0) continue;
        dpick[j] = d.server;
      }
      const Instance& in = inst(b);
      const Now& st = pn[e.ppool].now[j];
      const std::uint32_t c = std::min(pc[j], e.prompt_tokens);
      const double u = static_cast<double>(e.prompt_tokens - c);
      KvCandidate k;
      k.index = j;
      k.cached_tokens = c;
      k.expected_ms = eta_ms(in, st, u, o);
      k.kv_usage = kv_usage(views, b);
      k.ring_load = static_cast<double>(in.out_tokens);
      k.tokens_per_s = 1.0 / step_b(in, o) * 1000.0;
      // Misses are priced (KvRouteOptions::miss_weight) in choose_prefill, among the servers
      // with room, and, unless Options::miss_wait is off, in the wait rule.
      const double score =
          k.expected_ms + (o.miss_wait ? miss_price_ms(u, k.tokens_per_s, o.route) : 0);
      ++n_all;
      best_all = std::min(best_all, score);
      if (force || room(in, st, u, o)) {
        roomy[n_room++] = k;
        best_room = std::min(best_room, score);
      }
    }
    if (n_all == 0) {
      // Nothing healthy (or, parallel, no decode slot anywhere): wait, unless the bound is up.
      if (!force) return Outcome::kWait;
      return Outcome::kRefused;
    }
    if (n_room == 0) return Outcome::kWait;
    // The best instance overall is full, and worth waiting for.
    if (!force && best_all < best_room && best_room > best_all + o.route.tie_fraction * best_all) {
      return Outcome::kWait;
    }
    // The ring key was chosen at enqueue (the prefix past what every server holds): a single
    // key, whatever the common part.
    const std::uint64_t ring_key[1] = {e.ring_key};
    const auto d = choose_prefill(std::span<const KvCandidate>(roomy, n_room), s.rings_[e.ppool],
                                  ring_key, 1, e.prompt_tokens, o.route);
    if (!d) return Outcome::kWait;
    const KvCandidate& chosen = roomy[d->chosen];
    const auto j = static_cast<std::uint16_t>(chosen.index);
    const std::uint32_t b = pp.base + j;
    Instance& in = inst(b);
    const Now& st = pn[e.ppool].now[j];
    // Boundary mode: hold it until the step in progress is about to end.
    if (!force && o.release == Release::kBoundary && st.busy && in.step.n >= o.min_cycle_samples &&
        st.remaining_ms > o.lead_ms) {
      const std::uint64_t at = st.end_ns - ms_to_ns(o.lead_ms);
      if (next_ns == 0 || at < next_ns) next_ns = at;
      if (!(e.flags & detail::kHeld)) {
        e.flags |= detail::kHeld;
        h.held.fetch_add(1, std::memory_order_relaxed);
      }
      return Outcome::kHold;
    }
    // Release.
    e.pserver = static_cast<std::int16_t>(j);
    e.runner_up = d->runner_up ? static_cast<std::int16_t>(roomy[*d->runner_up].index) : -1;
    e.reason = static_cast<std::uint8_t>(d->reason);
    e.expected_ms = chosen.expected_ms;
    e.runner_up_ms = d->runner_up ? roomy[*d->runner_up].expected_ms : 0;
    e.cached_at = chosen.cached_tokens;
    e.acct_tokens = e.prompt_tokens - chosen.cached_tokens;
    e.released_ns = now;
    if (force) e.flags |= detail::kStarved;
    pop_order(idx);
    account_prefill(e, now);
    if (parallel) {
      e.dserver = static_cast<std::int16_t>(dpick[j]);
      e.decode_released_ns = now;
      Instance& din = inst(backend_of(e.dpool, e.dserver));
      e.decode_load = din.decoding;
      account_decode(e);
    }
    // The instance's state changed: refresh it for the next entries of this pass.
    pn[e.ppool].now[j] = state_now(in, now, o);
    h.queue_wait.observe(now > e.enqueue_ns ? now - e.enqueue_ns : 0);
    e.state.store(static_cast<std::uint32_t>(State::kPrefill), std::memory_order_release);
    return Outcome::kReleased;
  }

  std::vector<PoolNow> pool_states(std::uint64_t now, const Options& o) {
    std::vector<PoolNow> pn(s.pools_.size());
    for (std::size_t p = 0; p < s.pools_.size(); ++p) {
      const PoolShape& ps = s.pools_[p];
      pn[p].now.resize(ps.count);
      for (std::uint16_t j = 0; j < ps.count; ++j)
        pn[p].now[j] = state_now(inst(ps.base + j), now, o);
    }
    return pn;
  }

  // Admission estimate: the wait before a request with key `key`, priority `prio` and
  // `uncached` tokens in `pool` would be released. Each healthy instance is free of the work
  // already released to it at free_i (the step in progress, then its pending tokens) and then
  // computes r_i = B / (a + b B) tokens per ms; the queued work ahead of the request (the
  // entries that sort before it) is shared out over the instances as they free up (water
  // filling): the wait is the time T at which sum_i max(0, T - free_i) r_i covers it. With
  // nothing ahead, the wait is until the soonest instance has room for it.
  double expected_wait_ms(std::uint16_t pool_index, std::int32_t prio, double key, double uncached,
                          std::uint64_t now, const Options& o, std::span<const InstanceView> views,
                          bool& any_healthy) {
    const PoolShape& pp = pool(pool_index);
    struct Lane {
      double free_ms, rate;
    };
    Lane lanes[kMaxServers];
    std::size_t n = 0;
    double soonest = std::numeric_limits<double>::infinity();
    any_healthy = false;
    for (std::uint16_t j = 0; j < pp.count; ++j) {
      const std::uint32_t b = pp.base + j;
      if (!healthy(views, b)) continue;
      any_healthy = true;
      const Instance& in = inst(b);
      const Now st = state_now(in, now, o);
      const double B = batch_tokens(in, o);
      double free_ms = st.remaining_ms;
      if (st.pending > 0) {
        const double pend = static_cast<double>(st.pending);
        free_ms += std::ceil(pend / B) * step_a(in, o) + step_b(in, o) * pend;
      }
      const double full = release_budget(in, o);
      lanes[n++] = {free_ms, full / (step_a(in, o) + step_b(in, o) * full)};
      soonest = std::min(soonest, room(in, st, uncached, o) ? 0.0 : st.remaining_ms);
    }
    if (!any_healthy) return std::numeric_limits<double>::infinity();
    double ahead = 0;
    for (std::uint32_t i = 0; i < h.n_order; ++i) {
      const Entry& q = entry(s.order_[i]);
      if (q.ppool != pool_index) continue;
      if (q.priority > prio || (q.priority == prio && q.key > key)) break;
      ahead += q.min_uncached;
    }
    if (ahead == 0) return std::isfinite(soonest) ? soonest : 0.0;
    std::sort(lanes, lanes + n, [](const Lane& x, const Lane& y) { return x.free_ms < y.free_ms; });
    // Water filling: with the first k lanes open, the work done by time T is
    // sum_{i<k} (T - free_i) r_i.
    double rate = 0, weighted = 0;  // sum r_i, sum free_i r_i over the open lanes
    for (std::size_t k = 0; k < n; ++k) {
      rate += lanes[k].rate;
      weighted += lanes[k].free_ms * lanes[k].rate;
      const double t = (ahead + weighted) / rate;
      if (k + 1 == n || t <= lanes[k + 1].free_ms) return std::max(t, 0.0);
    }
    return 0;
  }
};

// ---------------------------------------------------------------------------------------------
// Construction
// ---------------------------------------------------------------------------------------------

std::size_t Scheduler::required_bytes(const Shape& shape) noexcept {
  if (!shape_ok(shape)) return 0;
  return layout_for(shape.capacity, shape.instances, shape.pools.size()).total;
}

bool Scheduler::bind(void* region, std::size_t bytes) {
  if (region == nullptr || reinterpret_cast<std::uintptr_t>(region) % 8 != 0) return false;
  auto* base = static_cast<char*>(region);
  auto* hdr = reinterpret_cast<Header*>(base);
  if (bytes < sizeof(Header) || hdr->magic != detail::kMagic || hdr->version != detail::kVersion) {
    return false;
  }
  const Layout l = layout_for(hdr->capacity, hdr->instances, hdr->pools);
  if (hdr->bytes != l.total || l.total > bytes || hdr->off_entries != l.entries) return false;
  hdr_ = hdr;
  inst_ = reinterpret_cast<Instance*>(base + l.inst);
  entries_ = reinterpret_cast<Entry*>(base + l.entries);
  cached_ = reinterpret_cast<std::uint32_t*>(base + l.cached);
  order_ = reinterpret_cast<std::uint32_t*>(base + l.order);
  fifo_ = reinterpret_cast<std::uint32_t*>(base + l.fifo);
  dqueue_ = reinterpret_cast<std::uint32_t*>(base + l.dqueue);
  free_ = reinterpret_cast<std::uint32_t*>(base + l.free);
  auto* recs = reinterpret_cast<detail::PoolRecord*>(base + l.pools);
  pools_.clear();
  rings_.clear();
  for (std::uint32_t p = 0; p < hdr->pools; ++p) {
    PoolShape ps;
    ps.base = recs[p].base;
    ps.count = recs[p].count;
    if (ps.count == 0 || ps.count > kMaxServers ||
        static_cast<std::uint32_t>(ps.base) + ps.count > hdr->instances) {
      return false;
    }
    ps.ids.assign(recs[p].ids, recs[p].ids + ps.count);
    try {
      rings_.emplace_back(std::span<const std::uint64_t>(ps.ids));
    } catch (const std::invalid_argument&) {
      return false;  // duplicate ids: not a region create() made
    }
    pools_.push_back(std::move(ps));
  }
  return true;
}

std::unique_ptr<Scheduler> Scheduler::create(void* region, std::size_t bytes, const Shape& shape) {
  if (!shape_ok(shape) || region == nullptr || reinterpret_cast<std::uintptr_t>(region) % 8 != 0) {
    return nullptr;
  }
  const Layout l = layout_for(shape.capacity, shape.instances, shape.pools.size());
  if (bytes < l.total) return nullptr;
  // Distinct ids per pool, or the rings cannot be built.
  for (const PoolShape& p : shape.pools) {
    std::vector<std::uint64_t> ids = p.ids;
    std::sort(ids.begin(), ids.end());
    if (std::adjacent_find(ids.begin(), ids.end()) != ids.end()) return nullptr;
  }
  auto* base = static_cast<char*>(region);
  std::memset(base, 0, l.total);
  auto* hdr = new (base) Header();
  hdr->version = detail::kVersion;
  hdr->capacity = shape.capacity;
  hdr->instances = shape.instances;
  hdr->pools = static_cast<std::uint32_t>(shape.pools.size());
  hdr->bytes = l.total;
  hdr->off_pools = l.pools;
  hdr->off_inst = l.inst;
  hdr->off_entries = l.entries;
  hdr->off_cached = l.cached;
  hdr->off_order = l.order;
  hdr->off_fifo = l.fifo;
  hdr->off_dqueue = l.dqueue;
  hdr->off_free = l.free;
  hdr->next_ticket = 1;
  auto* recs = reinterpret_cast<detail::PoolRecord*>(base + l.pools);
  for (std::size_t p = 0; p < shape.pools.size(); ++p) {
    recs[p].base = shape.pools[p].base;
    recs[p].count = shape.pools[p].count;
    std::copy(shape.pools[p].ids.begin(), shape.pools[p].ids.end(), recs[p].ids);
  }
  auto* inst = reinterpret_cast<Instance*>(base + l.inst);
  for (std::uint32_t i = 0; i < shape.instances; ++i) new (&inst[i]) Instance();
  auto* entries = reinterpret_cast<Entry*>(base + l.entries);
  auto* free_stack = reinterpret_cast<std::uint32_t*>(base + l.free);
  for (std::uint32_t i = 0; i < shape.capacity; ++i) {
    new (&entries[i]) Entry();
    free_stack[i] = shape.capacity - 1 - i;  // index 0 on top
  }
  hdr->n_free = shape.capacity;
  std::atomic_thread_fence(std::memory_order_release);
  hdr->magic = detail::kMagic;
  auto s = std::unique_ptr<Scheduler>(new Scheduler());
  if (!s->bind(region, bytes)) return nullptr;
  // Cost models start from the defaults of a default Options; set_limits/pass refine them.
  const Options defaults;
  for (std::uint32_t i = 0; i < shape.instances; ++i) {
    rls_init(s->inst_[i].step, defaults.default_step_ms, defaults.default_ms_per_ktoken);
    rls_init(s->inst_[i].itl, defaults.default_itl_ms, defaults.default_itl_ms_per_seq);
  }
  return s;
}

std::unique_ptr<Scheduler> Scheduler::attach(void* region, std::size_t bytes) {
  auto s = std::unique_ptr<Scheduler>(new Scheduler());
  if (!s->bind(region, bytes)) return nullptr;
  return s;
}

std::uint32_t Scheduler::capacity() const noexcept {
  return hdr_->capacity;
}
std::uint32_t Scheduler::instances() const noexcept {
  return hdr_->instances;
}
std::size_t Scheduler::pools() const noexcept {
  return pools_.size();
}

void Scheduler::set_limits(std::uint32_t instance, const InstanceLimits& limits) noexcept {
  if (instance >= hdr_->instances) return;
  RobustLock lock(hdr_->lock);
  if (lock.took_over()) repair_locked();
  inst_[instance].batch_tokens_cfg = limits.batch_tokens;
  inst_[instance].max_seqs = limits.max_seqs;
}

// ---------------------------------------------------------------------------------------------
// Owners
// ---------------------------------------------------------------------------------------------

EnqueueResult Scheduler::enqueue(const EnqueueRequest& req, std::uint64_t now_ns,
                                 const Options& opt, std::span<const InstanceView> views) {
  EnqueueResult out;
  const bool needs_decode = req.mode != Mode::kAggregated;
  if (req.prefill_pool >= pools_.size() || (needs_decode && req.decode_pool >= pools_.size())) {
    out.verdict = Verdict::kInvalid;
    out.message = "the scheduler does not know this location's upstream blocks";
    return out;
  }
  RobustLock lock(hdr_->lock);
  if (lock.took_over()) repair_locked();
  Impl im(*this);
  const std::uint32_t max_queue =
      opt.max_queue == 0 ? hdr_->capacity : std::min(opt.max_queue, hdr_->capacity);
  const PoolShape& pp = pools_[req.prefill_pool];
  std::uint32_t most = 0;
  for (std::size_t j = 0; j < req.prefill_cached.size() && j < pp.count; ++j) {
    most = std::max(most, std::min(req.prefill_cached[j], req.prompt_tokens));
  }
  const double uncached = static_cast<double>(req.prompt_tokens - most);
  const double arrival_ms = ns_to_ms(now_ns);
  const double key = std::max(opt.wait_weight, 1e-9) * arrival_ms +
                     std::max(0.0, opt.length_weight_ms) * uncached / 1000.0;
  const std::int32_t prio = std::clamp(req.priority, -1'000'000, 1'000'000);
  if (hdr_->n_order >= max_queue || hdr_->n_free == 0) {
    out.verdict = Verdict::kQueueFull;
    hdr_->refused_full.fetch_add(1, std::memory_order_relaxed);
    // A place opens when the soonest step ends.
    bool any = false;
    const double wait =
        im.expected_wait_ms(req.prefill_pool, prio, key, uncached, now_ns, opt, views, any);
    out.retry_after_s = static_cast<std::uint32_t>(
        std::clamp(std::ceil((std::isfinite(wait) ? wait : 1000.0) / 1000.0 / 4), 1.0, 60.0));
    out.message = hdr_->n_free == 0
                      ? "the scheduler's queue is full (all " + std::to_string(hdr_->capacity) +
                            " entries are in use); try again later"
                      : "the scheduler's queue is full (" + std::to_string(hdr_->n_order) +
                            " requests waiting); try again later";
    return out;
  }
  bool any_healthy = false;
  const double wait =
      im.expected_wait_ms(req.prefill_pool, prio, key, uncached, now_ns, opt, views, any_healthy);
  out.expected_wait_ms = wait;
  if (!any_healthy) {
    out.verdict = Verdict::kUnavailable;
    out.retry_after_s = 1;
    out.message = "no prefill server is available";
    hdr_->refused_unavailable.fetch_add(1, std::memory_order_relaxed);
    return out;
  }
  std::uint64_t bound_ms = opt.max_wait_ms;
  if (req.max_wait_ms != 0) bound_ms = std::min(bound_ms, req.max_wait_ms);
  if (wait > static_cast<double>(bound_ms)) {
    out.verdict = Verdict::kDeadline;
    out.retry_after_s = static_cast<std::uint32_t>(
        std::clamp(std::ceil((wait - static_cast<double>(bound_ms)) / 1000.0), 1.0, 3600.0));
    out.message = "the scheduler expects a wait of " +
                  std::to_string(static_cast<long long>(wait)) +
                  " ms before this request could start, over its bound of " +
                  std::to_string(bound_ms) + " ms; try again later";
    hdr_->refused_deadline.fetch_add(1, std::memory_order_relaxed);
    return out;
  }
  const std::uint32_t idx = free_[--hdr_->n_free];
  Entry& e = entries_[idx];
  e.owner = req.owner_pid;
  e.ticket = hdr_->next_ticket++;
  e.enqueue_ns = now_ns;
  e.deadline_ns = now_ns + bound_ms * 1'000'000ULL;
  e.released_ns = 0;
  e.decode_enqueue_ns = 0;
  e.decode_released_ns = 0;
  e.ring_key = req.ring_key;
  e.key = key;
  e.expected_ms = 0;
  e.runner_up_ms = 0;
  e.priority = prio;
  e.prompt_tokens = req.prompt_tokens;
  e.min_uncached = static_cast<std::uint32_t>(uncached);
  e.acct_tokens = 0;
  e.cached_at = 0;
  e.decode_load = 0;
  e.ppool = req.prefill_pool;
  e.dpool = needs_decode ? req.decode_pool : kNoPool;
  e.pserver = -1;
  e.dserver = -1;
  e.runner_up = -1;
  e.mode = static_cast<std::uint8_t>(req.mode);
  e.flags = 0;
  e.reason = 0;
  e.refusal = 0;
  std::uint32_t* pc = im.cached(idx, 0);
  std::uint32_t* dc = im.cached(idx, 1);
  std::fill(pc, pc + kMaxServers, 0u);
  std::fill(dc, dc + kMaxServers, 0u);
  std::copy_n(req.prefill_cached.begin(),
              std::min<std::size_t>(req.prefill_cached.size(), pp.count), pc);
  if (needs_decode) {
    const PoolShape& dp = pools_[req.decode_pool];
    std::copy_n(req.decode_cached.begin(),
                std::min<std::size_t>(req.decode_cached.size(), dp.count), dc);
  }
  e.state.store(static_cast<std::uint32_t>(State::kQueued), std::memory_order_release);
  ++hdr_->live;
  im.push_order(idx);
  hdr_->enqueued.fetch_add(1, std::memory_order_relaxed);
  out.verdict = Verdict::kQueued;
  out.ref = {idx, e.ticket};
  out.wake_scheduler = true;
  return out;
}

Decision Scheduler::decision(Ref ref) const noexcept {
  Decision d;
  if (ref.index >= hdr_->capacity) return d;
  const Entry& e = entries_[ref.index];
  d.state = state_of(e);
  if (e.ticket != ref.ticket || d.state == State::kFree) {
    d.state = State::kFree;
    return d;
  }
  d.valid = true;
  d.prefill_server = e.pserver;
  d.decode_server = e.dserver;
  d.starved = (e.flags & detail::kStarved) != 0;
  d.held = (e.flags & detail::kHeld) != 0;
  d.reason = e.reason;
  d.runner_up = e.runner_up;
  d.expected_ms = e.expected_ms;
  d.runner_up_ms = e.runner_up_ms;
  d.cached_tokens = e.cached_at;
  d.enqueue_ns = e.enqueue_ns;
  d.released_ns = e.released_ns;
  d.decode_released_ns = e.decode_released_ns;
  d.refusal_status = d.state == State::kRefused ? 503 : 0;
  // The fields were read after the state; a concurrent reuse would change the ticket.
  if (e.ticket != ref.ticket) {
    d = Decision{};
  }
  return d;
}

bool Scheduler::cancel(Ref ref, std::uint64_t /*now_ns*/) noexcept {
  if (ref.index >= hdr_->capacity) return false;
  RobustLock lock(hdr_->lock);
  if (lock.took_over()) repair_locked();
  Entry& e = entries_[ref.index];
  if (e.ticket != ref.ticket || state_of(e) == State::kFree) return false;
  const bool frees_room = (e.flags & (detail::kPrefillAccounted | detail::kDecodeAccounted)) != 0;
  Impl(*this).free_entry(ref.index);
  hdr_->cancelled.fetch_add(1, std::memory_order_relaxed);
  return frees_room;
}

bool Scheduler::update_cached(Ref ref, std::span<const std::uint32_t> prefill_cached,
                              std::span<const std::uint32_t> decode_cached) noexcept {
  if (ref.index >= hdr_->capacity) return false;
  RobustLock lock(hdr_->lock);
  if (lock.took_over()) repair_locked();
  Impl im(*this);
  Entry& e = entries_[ref.index];
  const State st = state_of(e);
  if (e.ticket != ref.ticket || (st != State::kQueued && st != State::kDecodeQueued)) return false;
  bool changed = false;
  // Copies `from` (zeros past its end) into the first `count` values of `to`.
  auto refresh = [&changed](std::uint32_t* to, std::span<const std::uint32_t> from,
                            std::size_t count) {
    for (std::size_t j = 0; j < count; ++j) {
      const std::uint32_t v = j < from.size() ? from[j] : 0u;
      if (to[j] != v) to[j] = v, changed = true;
    }
  };
  if (st == State::kQueued) {
    const PoolShape& pp = pools_[e.ppool];
    std::uint32_t* pc = im.cached(ref.index, 0);
    refresh(pc, prefill_cached, pp.count);
    std::uint32_t most = 0;
    for (std::size_t j = 0; j < pp.count; ++j) most = std::max(most, std::min(pc[j], e.prompt_tokens));
    e.min_uncached = e.prompt_tokens - most;
  }
  if (e.dpool != kNoPool) refresh(im.cached(ref.index, 1), decode_cached, pools_[e.dpool].count);
  if (changed) hdr_->cache_updates.fetch_add(1, std::memory_order_relaxed);
  return changed;
}

bool Scheduler::prefill_done(Ref ref, std::uint64_t now_ns, bool ok,
                             std::optional<std::uint32_t> actual_cached, const Options& opt,
                             bool learn) noexcept {
  if (ref.index >= hdr_->capacity) return false;
  RobustLock lock(hdr_->lock);
  if (lock.took_over()) repair_locked();
  Impl im(*this);
  Entry& e = entries_[ref.index];
  if (e.ticket != ref.ticket || state_of(e) != State::kPrefill) return false;
  if (e.flags & detail::kPrefillAccounted) {
    Instance& in = inst_[im.backend_of(e.ppool, e.pserver)];
    double tokens = e.acct_tokens;
    if (actual_cached) {
      tokens = static_cast<double>(e.prompt_tokens - std::min(*actual_cached, e.prompt_tokens));
    }
    if (ok && learn) im.observe_completion(in, now_ns, tokens, opt);
    im.unaccount_prefill(e);
  }
  const auto mode = static_cast<Mode>(e.mode);
  if (!ok) {
    im.free_entry(ref.index);
    hdr_->completed.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  if (mode == Mode::kSequential) {
    e.decode_enqueue_ns = now_ns;
    e.state.store(static_cast<std::uint32_t>(State::kDecodeQueued), std::memory_order_release);
    im.push_decode(ref.index);
  } else {
    e.state.store(static_cast<std::uint32_t>(State::kDecode), std::memory_order_release);
  }
  return true;
}

bool Scheduler::decode_done(Ref ref, std::uint64_t now_ns, double tpot_ms,
                            const Options& opt) noexcept {
  (void)now_ns;
  if (ref.index >= hdr_->capacity) return false;
  RobustLock lock(hdr_->lock);
  if (lock.took_over()) repair_locked();
  Impl im(*this);
  Entry& e = entries_[ref.index];
  const State st = state_of(e);
  if (e.ticket != ref.ticket || st == State::kFree) return false;
  if ((e.flags & detail::kDecodeAccounted) && tpot_ms > 0 && std::isfinite(tpot_ms)) {
    Instance& in = inst_[im.backend_of(e.dpool, e.dserver)];
    fit_itl(in.itl, static_cast<double>(e.decode_load) + 1, tpot_ms, opt);
  }
  im.free_entry(ref.index);
  hdr_->completed.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// ---------------------------------------------------------------------------------------------
// The lease
// ---------------------------------------------------------------------------------------------

bool Scheduler::claim_lease(std::int32_t pid, std::uint64_t now_ns, std::uint64_t stale_ns,
                            bool* changed) noexcept {
  if (changed != nullptr) *changed = false;
  std::int32_t held = hdr_->leader.load(std::memory_order_acquire);
  if (held == pid) return true;
  const std::uint64_t beat = hdr_->leader_beat_ns.load(std::memory_order_acquire);
  const bool stale = held != 0 && stale_ns != 0 && now_ns > beat && now_ns - beat > stale_ns;
  if (held != 0 && !stale && !pid_gone(static_cast<std::uint64_t>(held))) return false;
  if (!hdr_->leader.compare_exchange_strong(held, pid, std::memory_order_acq_rel)) return false;
  hdr_->leader_beat_ns.store(now_ns, std::memory_order_release);
  hdr_->leader_since_ns.store(now_ns, std::memory_order_release);
  hdr_->leader_changes.fetch_add(1, std::memory_order_relaxed);
  if (changed != nullptr) *changed = true;
  return true;
}

void Scheduler::beat_lease(std::int32_t pid, std::uint64_t now_ns) noexcept {
  if (hdr_->leader.load(std::memory_order_acquire) == pid) {
    hdr_->leader_beat_ns.store(now_ns, std::memory_order_release);
  }
}

bool Scheduler::release_lease(std::int32_t pid) noexcept {
  std::int32_t held = pid;
  return hdr_->leader.compare_exchange_strong(held, 0, std::memory_order_acq_rel);
}

std::int32_t Scheduler::leader() const noexcept {
  return hdr_->leader.load(std::memory_order_acquire);
}
std::uint64_t Scheduler::leader_beat_ns() const noexcept {
  return hdr_->leader_beat_ns.load(std::memory_order_acquire);
}

// ---------------------------------------------------------------------------------------------
// The pass
// ---------------------------------------------------------------------------------------------

PassResult Scheduler::pass(std::uint64_t now_ns, const Options& opt,
                           std::span<const InstanceView> views) {
  PassResult r;
  RobustLock lock(hdr_->lock);
  if (lock.took_over()) {
    repair_locked();
    r.repaired = true;
  }
  Impl im(*this);
  hdr_->passes.fetch_add(1, std::memory_order_relaxed);
  im.close_stale_clusters(now_ns, opt);
  auto pn = im.pool_states(now_ns, opt);
  std::vector<std::int32_t>& wake = r.wake;
  auto notify = [&](std::int32_t pid) {
    if (std::find(wake.begin(), wake.end(), pid) == wake.end()) wake.push_back(pid);
  };
  std::uint64_t next = 0;
  auto want = [&](std::uint64_t at) {
    if (at != 0 && (next == 0 || at < next)) next = at;
  };
  const std::uint64_t guard = guard_ns(opt);

  // 1. The starvation bound: the oldest first, released whatever the budgets.
  while (hdr_->n_fifo > 0) {
    const std::uint32_t idx = fifo_[0];
    Entry& e = entries_[idx];
    const std::uint64_t due = e.deadline_ns > guard ? e.deadline_ns - guard : 0;
    if (due > now_ns) {
      want(due);
      break;
    }
    const auto out = im.place(idx, now_ns, opt, views, true, pn, next);
    ++r.scanned;
    if (out == Impl::Outcome::kReleased) {
      ++r.released;
      ++r.starved;
      hdr_->starved.fetch_add(1, std::memory_order_relaxed);
      hdr_->released.fetch_add(1, std::memory_order_relaxed);
      notify(e.owner);
    } else {
      // No healthy server at all: the request cannot be served within its bound.
      im.refuse(idx, 2, hdr_->refused_unavailable);
      ++r.refused;
      notify(e.owner);
    }
  }

  // 2. The queue in order, while some instance can take work.
  std::uint32_t i = 0;
  std::uint32_t examined = 0;
  while (i < hdr_->n_order && examined < kMaxScan) {
    // Stop early when no pool with queued work has an instance with room for anything.
    const std::uint32_t idx = order_[i];
    ++examined;
    ++r.scanned;
    const auto out = im.place(idx, now_ns, opt, views, false, pn, next);
    if (out == Impl::Outcome::kReleased) {
      ++r.released;
      hdr_->released.fetch_add(1, std::memory_order_relaxed);
      notify(entries_[idx].owner);
      continue;  // the entry left the order: the same position holds the next one
    }
    ++i;
    // A pool whose every instance is full stays full for the rest of the pass.
    bool any_room = false;
    const PoolShape& pp = pools_[entries_[idx].ppool];
    for (std::uint16_t j = 0; j < pp.count && !any_room; ++j) {
      const Impl::Now& st = pn[entries_[idx].ppool].now[j];
      any_room = st.pending == 0 || st.pending < im.release_budget(inst_[pp.base + j], opt);
    }
    if (!any_room && pools_.size() == 1) break;
  }
  if (i < hdr_->n_order && examined >= kMaxScan) want(now_ns + 1'000'000);  // more to look at

  // 3. Decode: in order, each to its best eligible decode server.
  const std::uint64_t dbound = opt.decode_max_wait_ms * 1'000'000ULL;
  std::uint32_t k = 0;
  examined = 0;
  while (k < hdr_->n_dqueue && examined < kMaxScan) {
    const std::uint32_t idx = dqueue_[k];
    Entry& e = entries_[idx];
    ++examined;
    const std::uint64_t pb = e.pserver >= 0 ? im.backend_of(e.ppool, e.pserver) : 0;
    const auto pick = im.pick_decode(
        e, idx, im.pairing_mask(opt, static_cast<std::uint32_t>(pb), e.dpool), opt, views);
    if (pick.server >= 0) {
      im.pop_decode(idx);
      e.dserver = static_cast<std::int16_t>(pick.server);
      Instance& din = inst_[im.backend_of(e.dpool, e.dserver)];
      e.decode_load = din.decoding;
      e.decode_released_ns = now_ns;
      im.account_decode(e);
      hdr_->decode_wait.observe(now_ns > e.decode_enqueue_ns ? now_ns - e.decode_enqueue_ns : 0);
      e.state.store(static_cast<std::uint32_t>(State::kDecode), std::memory_order_release);
      hdr_->decode_released.fetch_add(1, std::memory_order_relaxed);
      ++r.decode_released;
      notify(e.owner);
      continue;
    }
    if (dbound != 0 && now_ns >= e.decode_enqueue_ns + dbound) {
      im.refuse(idx, 1, hdr_->refused_decode_wait);
      ++r.refused;
      notify(e.owner);
      continue;
    }
    if (dbound != 0) want(e.decode_enqueue_ns + dbound);
    ++k;
  }

  // Open clusters close after the merge window; boundary holds asked for their own times.
  for (std::uint32_t b = 0; b < hdr_->instances; ++b) {
    const Instance& in = inst_[b];
    if (in.cluster_start_ns != 0) want(in.cluster_last_ns + ms_to_ns(opt.merge_ms) + 1);
  }
  want(next);
  r.next_ns = next;
  return r;
}

// ---------------------------------------------------------------------------------------------
// Recovery
// ---------------------------------------------------------------------------------------------

std::uint32_t Scheduler::reclaim_dead(std::uint64_t now_ns,
                                      const std::function<bool(std::int32_t)>& gone) {
  RobustLock lock(hdr_->lock);
  if (lock.took_over()) repair_locked();
  hdr_->last_reclaim_ns = now_ns;
  Impl im(*this);
  std::uint32_t freed = 0;
  std::vector<std::pair<std::int32_t, bool>> seen;  // pid -> gone, checked once per pid
  for (std::uint32_t i = 0; i < hdr_->capacity; ++i) {
    Entry& e = entries_[i];
    if (state_of(e) == State::kFree) continue;
    bool dead = false;
    auto it = std::find_if(seen.begin(), seen.end(), [&](auto& p) { return p.first == e.owner; });
    if (it != seen.end()) {
      dead = it->second;
    } else {
      dead = gone ? gone(e.owner) : pid_gone(static_cast<std::uint64_t>(e.owner));
      seen.emplace_back(e.owner, dead);
    }
    if (!dead) continue;
    im.free_entry(i);
    ++freed;
  }
  hdr_->reclaimed.fetch_add(freed, std::memory_order_relaxed);
  return freed;
}

std::uint32_t Scheduler::repair() {
  RobustLock lock(hdr_->lock);
  return repair_locked();
}

std::uint32_t Scheduler::repair_locked() {
  // Called with the lock held.
  Impl im(*this);
  std::uint32_t corrupt = 0;
  for (std::uint32_t b = 0; b < hdr_->instances; ++b) {
    Instance& in = inst_[b];
    in.outstanding = 0;
    in.decoding = 0;
    in.out_tokens = 0;
    in.since_boundary = 0;
    auto sane = [](const Rls& r) {
      return std::isfinite(r.t0) && std::isfinite(r.t1) && std::isfinite(r.p00) &&
             std::isfinite(r.p01) && std::isfinite(r.p11);
    };
    const Options defaults;
    if (!sane(in.step)) rls_init(in.step, defaults.default_step_ms, defaults.default_ms_per_ktoken);
    if (!sane(in.itl)) rls_init(in.itl, defaults.default_itl_ms, defaults.default_itl_ms_per_seq);
    if (!std::isfinite(in.cycle_ms) || in.cycle_ms < 0) in.cycle_ms = 0;
    if (!std::isfinite(in.cluster_tokens)) in.cluster_tokens = 0;
  }
  hdr_->n_order = hdr_->n_fifo = hdr_->n_dqueue = hdr_->n_free = 0;
  hdr_->live = 0;
  std::vector<std::uint32_t> queued, dqueued;
  for (std::uint32_t i = 0; i < hdr_->capacity; ++i) {
    Entry& e = entries_[i];
    const std::uint32_t raw = e.state.load(std::memory_order_acquire);
    bool ok = raw <= static_cast<std::uint32_t>(State::kRefused);
    const auto st = static_cast<State>(raw);
    if (ok && st != State::kFree) {
      ok = e.ppool < pools_.size() && e.ticket != 0 && e.ticket < hdr_->next_ticket + 1;
      const bool needs_decode = e.mode != static_cast<std::uint8_t>(Mode::kAggregated);
      if (ok && needs_decode) ok = e.dpool < pools_.size();
      if (ok && (e.flags & detail::kPrefillAccounted)) {
        ok = e.pserver >= 0 && static_cast<std::size_t>(e.pserver) < pools_[e.ppool].count;
      }
      if (ok && (e.flags & detail::kDecodeAccounted)) {
        ok = e.dserver >= 0 && e.dpool < pools_.size() &&
             static_cast<std::size_t>(e.dserver) < pools_[e.dpool].count;
      }
      if (ok && e.ticket >= hdr_->next_ticket) hdr_->next_ticket = e.ticket + 1;
    }
    if (!ok) {
      ++corrupt;
      e.state.store(static_cast<std::uint32_t>(State::kFree), std::memory_order_release);
    }
    if (state_of(e) == State::kFree) {
      e.flags = 0;
      continue;
    }
    ++hdr_->live;
    if (e.flags & detail::kPrefillAccounted) {
      Instance& in = inst_[im.backend_of(e.ppool, e.pserver)];
      ++in.outstanding;
      in.out_tokens += e.acct_tokens;
      if (e.released_ns > in.boundary_ns) in.since_boundary += e.acct_tokens;
    }
    if (e.flags & detail::kDecodeAccounted) ++inst_[im.backend_of(e.dpool, e.dserver)].decoding;
    if (state_of(e) == State::kQueued) queued.push_back(i);
    if (state_of(e) == State::kDecodeQueued) dqueued.push_back(i);
  }
  for (std::uint32_t i = hdr_->capacity; i-- > 0;) {
    if (state_of(entries_[i]) == State::kFree) free_[hdr_->n_free++] = i;
  }
  std::sort(queued.begin(), queued.end(),
            [&](std::uint32_t a, std::uint32_t b) { return im.before(a, b); });
  std::copy(queued.begin(), queued.end(), order_);
  hdr_->n_order = static_cast<std::uint32_t>(queued.size());
  std::sort(queued.begin(), queued.end(), [&](std::uint32_t a, std::uint32_t b) {
    const Entry& x = entries_[a];
    const Entry& y = entries_[b];
    return x.enqueue_ns != y.enqueue_ns ? x.enqueue_ns < y.enqueue_ns : x.ticket < y.ticket;
  });
  std::copy(queued.begin(), queued.end(), fifo_);
  hdr_->n_fifo = hdr_->n_order;
  std::sort(dqueued.begin(), dqueued.end(),
            [&](std::uint32_t a, std::uint32_t b) { return im.decode_before(a, b); });
  std::copy(dqueued.begin(), dqueued.end(), dqueue_);
  hdr_->n_dqueue = static_cast<std::uint32_t>(dqueued.size());
  hdr_->repairs.fetch_add(1, std::memory_order_relaxed);
  return corrupt;
}

void Scheduler::observe_decision_latency(std::uint64_t ns) noexcept {
  hdr_->decision_latency.observe(ns);
}
void Scheduler::observe_notify_latency(std::uint64_t ns) noexcept {
  hdr_->notify_latency.observe(ns);
}

// ---------------------------------------------------------------------------------------------
// Introspection
// ---------------------------------------------------------------------------------------------

Stats Scheduler::stats() const noexcept {
  Stats s;
  const Header& h = *hdr_;
  s.capacity = h.capacity;
  s.live = h.live;
  s.queued = h.n_order;
  s.decode_queued = h.n_dqueue;
  auto ld = [](const std::atomic<std::uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  s.enqueued = ld(h.enqueued);
  s.cache_updates = ld(h.cache_updates);
  s.released = ld(h.released);
  s.decode_released = ld(h.decode_released);
  s.starved = ld(h.starved);
  s.held = ld(h.held);
  s.refused_full = ld(h.refused_full);
  s.refused_deadline = ld(h.refused_deadline);
  s.refused_unavailable = ld(h.refused_unavailable);
  s.refused_decode_wait = ld(h.refused_decode_wait);
  s.cancelled = ld(h.cancelled);
  s.completed = ld(h.completed);
  s.reclaimed = ld(h.reclaimed);
  s.repairs = ld(h.repairs);
  s.passes = ld(h.passes);
  s.leader_pid = h.leader.load(std::memory_order_relaxed);
  s.leader_since_ns = ld(h.leader_since_ns);
  s.leader_beat_ns = ld(h.leader_beat_ns);
  s.leader_changes = ld(h.leader_changes);
  s.lock_acquired = ld(h.lock.acquired);
  s.lock_contended = ld(h.lock.contended);
  s.lock_takeovers = ld(h.lock.takeovers);
  return s;
}

InstanceStats Scheduler::instance_stats(std::uint32_t instance, std::uint64_t now_ns,
                                        const Options& opt) const {
  InstanceStats out;
  if (instance >= hdr_->instances) return out;
  // Read without the lock: figures of one moment may mix two updates.
  const Instance& in = inst_[instance];
  const Impl im(const_cast<Scheduler&>(*this));
  const Impl::Now n = im.state_now(in, now_ns, opt);
  out.outstanding = in.outstanding;
  out.outstanding_tokens = in.out_tokens;
  out.step_tokens = n.step_tokens;
  out.pending_tokens = n.pending;
  out.remaining_ms = n.remaining_ms;
  out.batch_tokens = im.batch_tokens(in, opt);
  out.step_ms = Impl::step_a(in, opt);
  out.ms_per_ktoken = Impl::step_b(in, opt) * 1000.0;
  out.step_samples = in.step.n;
  out.cycle_ms = in.cycle_ms;
  out.boundaries = in.boundaries;
  out.decoding = in.decoding;
  out.max_seqs = in.max_seqs;
  out.itl_ms = Impl::itl_ms(in, 0, opt);
  out.itl_ms_per_seq = Impl::itl_ms(in, 1, opt) - out.itl_ms;
  out.itl_samples = in.itl.n;
  out.released = in.released;
  out.decode_released = in.decode_released;
  return out;
}

const Log2Histogram& Scheduler::decision_latency() const noexcept {
  return hdr_->decision_latency;
}
const Log2Histogram& Scheduler::notify_latency() const noexcept {
  return hdr_->notify_latency;
}
const Log2Histogram& Scheduler::queue_wait() const noexcept {
  return hdr_->queue_wait;
}
const Log2Histogram& Scheduler::decode_wait() const noexcept {
  return hdr_->decode_wait;
}
const RobustLockWord& Scheduler::lock_word() const noexcept {
  return hdr_->lock;
}

std::vector<Ref> Scheduler::entries_of(std::int32_t pid) const {
  std::vector<Ref> out;
  for (std::uint32_t i = 0; i < hdr_->capacity; ++i) {
    const Entry& e = entries_[i];
    if (state_of(e) != State::kFree && e.owner == pid) out.push_back({i, e.ticket});
  }
  return out;
}

double Scheduler::step_ms(std::uint32_t instance, double tokens, const Options& opt) const {
  if (instance >= hdr_->instances) return 0;
  return Impl::step_ms(inst_[instance], tokens, opt);
}

double Scheduler::itl_ms(std::uint32_t instance, double running, const Options& opt) const {
  if (instance >= hdr_->instances) return 0;
  return Impl::itl_ms(inst_[instance], running, opt);
}

void Scheduler::observe_step(std::uint32_t instance, double tokens, double ms, const Options& opt) {
  if (instance >= hdr_->instances) return;
  RobustLock lock(hdr_->lock);
  if (lock.took_over()) repair_locked();
  fit_step(inst_[instance].step, tokens / 1000.0, ms, opt);
}

}  // namespace omni::sched
