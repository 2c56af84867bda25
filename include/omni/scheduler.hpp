// The prefill and decode schedulers: a bounded queue of requests in shared memory, ordered by
// priority, waiting time and uncached length; per-instance models learned online (the step
// cycle and the time a step takes as a function of its tokens, the decode inter-token latency
// as a function of the running batch); and the decisions that release each request to a
// prefill (and decode) instance at the moment it can join that instance's next batch.
//
// Roles. Every nginx worker is an *owner*: it enqueues its requests (admission control decides
// at once: queued, or refused with 429/503 and a Retry-After), learns the decision for each (a
// server, or a refusal), runs the legs, and reports what happened (prefill done, decode done,
// cancelled). Exactly one worker at a time is the *scheduler* (a lease in the region: pid,
// heartbeat): it runs pass() whenever something changed (an enqueue, a completion) and at the
// time pass() asks for (a step boundary, a starvation deadline). Everything is in one region
// under one RobustLock, and no call blocks on anything but that lock, held for microseconds.
// The caller moves the notifications between processes: pass() lists the owners whose entries
// were decided, and enqueue()/completion calls say when the scheduler should run.
//
// Ordering. Queued prefill requests are served in order of (priority class, then
//     key = wait_weight x arrival_ms + length_weight x uncached_ktokens)
// ascending (lower priority values first, as vLLM's `priority` field): among equal classes a
// short request goes before a long one that arrived up to length_weight x (difference in
// ktokens) / wait_weight ms earlier, and since the key is fixed at arrival while later arrivals
// get later keys, no request waits behind an endless stream of short ones. On top of that, a
// request that has waited max_wait - guard is released at the next pass to the best instance
// whatever its batch budget (the starvation bound is a hard guarantee, across priority classes
// too), and a request whose expected wait at arrival already exceeds max_wait is refused (503)
// instead of being accepted to time out.
//
// Release and node choice (prefill). Each instance's work is modelled as back-to-back steps:
//     step_ms(tokens) = a + b x tokens          (fitted online, recursive least squares)
// with at most `batch_tokens` (B) uncached tokens per step. A step boundary is observed when
// the prefill answers of one step come back together (completions within `merge` of each
// other). At any time the model knows, per instance: the step in progress (started at the last
// boundary, with min(B, outstanding tokens released before it) tokens) and its expected end,
// and the tokens pending for the next steps. The expected completion time of a request with u
// uncached tokens there (u = prompt - the tokens that instance has cached) is
//     ETA = remaining time of the step in progress + n x a + b x (pending + u),
//     n = ceil((pending + u) / B)
// (0 remaining when idle). A request goes to the instance with the lowest ETA among those whose
// next batch still has room (pending + u <= B, or nothing pending), with the tie and cold-prefix
// rules of omni/kv_routing.hpp (bounded-load consistent hashing of the prefix). When the
// instance with the lowest ETA overall has no room (its cache saves more than the queue costs),
// the request keeps waiting for it rather than going elsewhere. Instances whose next batch is
// full get nothing more: requests wait in the proxy, where they can still go to whichever
// instance frees up first. With step_target, the room of a next batch is the smaller of B and
// the tokens a step of step_target ms computes: shorter steps, so that the requests of one batch
// all meet their TTFT budget, at the cost of one step overhead (a) more often. In `boundary`
// release mode a request chosen for a busy instance whose cycle is learned is held until `lead`
// before the step's expected end, so that it arrives in time for the next batch and a later, more
// urgent request can still take its place.
//
// Decode. A decode instance is eligible while its running requests (the proxy's own decodes
// there plus those the engine last reported running for others) are below `max_seqs` and its KV
// usage is below
// kv_usage_high (unless all are). The expected inter-token latency with one more request is
//     itl_ms(running + 1) = c + d x (running + 1)   (fitted online from finished requests' TPOT)
// Instances that stay within the TPOT SLO are preferred; among them the one whose own prefix
// cache holds most of the prompt, then the least loaded. When no instance is eligible, the
// request waits (stage waiting_decode). In parallel mode P and D are chosen together: D among
// the decode servers the prefill server may pair with (pairing masks); in sequential mode the
// decode server is chosen after the prefill, among the servers its prefill server pairs with.
//
// Crash consistency. Entries are the truth; the sorted queue, the free stack and every
// per-instance sum are derived from them and rebuilt by repair() when the lock is taken over
// from a dead process, and when the scheduler lease changes hands. Owners of entries that died
// are reclaimed by reclaim_dead(). Decisions are published by a release store of the entry's
// state after its fields are written; owners read the state with acquire and never lock to
// learn a decision.
//
// Bounds: capacity entries (the queue plus every request between enqueue and the end of its
// decode), kMaxServers servers per pool, kMaxPools pools, kMaxInstances instances; every pass
// examines at most kMaxScan queued entries (so the lock is held for a bounded time whatever the
// queue length).
#pragma once

#include "omni/kv_routing.hpp"
#include "omni/robust_lock.hpp"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace omni::sched {

inline constexpr std::size_t kMaxServers = 64;  // per pool (the pairing masks are 64-bit)
inline constexpr std::size_t kMaxPools = 32;
inline constexpr std::size_t kMaxInstances = 1024;  // backends over all pools
inline constexpr std::uint32_t kMaxCapacity = 1u << 20;
inline constexpr std::size_t kMaxScan = 256;  // queued entries examined per pass
inline constexpr std::uint16_t kNoPool = 0xFFFF;

// How a request runs, which decides what the scheduler chooses for it.
enum class Mode : std::uint8_t {
  kAggregated = 0,  // one leg: the prefill pool is the only pool; done at the first token
  kSequential = 1,  // vLLM P/D: prefill, then decode (queued again for its decode server)
  kParallel = 2,    // SGLang P/D: prefill and decode servers chosen together
};

// A pool: an upstream block's servers, backends base .. base + count - 1.
struct PoolShape {
  std::uint16_t base = 0;
  std::uint16_t count = 0;
  std::vector<std::uint64_t> ids;  // stable server ids (hash of host:port), count of them
};

struct Shape {
  std::uint32_t capacity = 4096;  // entries
  std::uint32_t instances = 0;    // backends (all pools' servers)
  std::vector<PoolShape> pools;
};

// Per-instance static knowledge, from configuration or the engines (omni_proxy_capacity).
struct InstanceLimits {
  std::uint32_t batch_tokens = 0;  // B: uncached tokens one prefill step absorbs; 0: default
  std::uint32_t max_seqs = 0;      // decode: concurrent requests the engine runs; 0: no limit
};

// What the caller knows of an instance at pass time (from the engine poller and nginx).
struct InstanceView {
  bool healthy = true;               // false: never chosen (down, failing, not polled successfully)
  std::uint32_t engine_running = 0;  // the engine's reported running requests (0: unknown)
  std::uint32_t engine_waiting = 0;
  // Decode: requests the engine runs for others (other proxies): its reported running requests
  // minus this proxy's own decodes there when it reported. Counted with this proxy's current
  // decodes against max_seqs, so that its own finished requests free their slot at once.
  std::uint32_t others_running = 0;
  double kv_usage = std::numeric_limits<double>::quiet_NaN();
};

enum class Release : std::uint8_t {
  kImmediate,  // release as soon as the chosen instance's next batch has room
  kBoundary,   // hold until `lead` before the expected end of the step in progress
};

struct Options {
  // Queue order.
  double wait_weight = 1.0;       // > 0
  double length_weight_ms = 100;  // ms of arrival time per 1000 uncached tokens, >= 0
  // Hard bound on the prefill queue wait, and the margin before it at which a request is
  // released whatever the budgets (so that it is on its way by max_wait).
  std::uint64_t max_wait_ms = 30000;
  std::uint64_t guard_ms = 0;   // 0: min(max_wait / 10, 100 ms)
  std::uint32_t max_queue = 0;  // waiting prefill requests at most; 0: capacity
  // Release timing.
  Release release = Release::kImmediate;
  double lead_ms = 2;   // boundary mode: release this long before a step ends
  double merge_ms = 2;  // completions this close belong to one step
  // Cost model defaults, used until an instance has measurements.
  double default_step_ms = 10;                 // a
  double default_ms_per_ktoken = 50;           // b x 1000 (20k tokens/s)
  std::uint32_t default_batch_tokens = 16384;  // B when neither configured nor observed
  // The step the proxy aims for: it releases at most the tokens a step of this many ms
  // computes (from the fitted a and b) into an instance's next batch, even when the engine
  // would absorb more (B), so that a full step does not push every request in it past its
  // TTFT budget. 0: the engine's own budget B.
  double step_target_ms = 0;
  double forgetting = 0.98;             // of the online fits, 0 < f <= 1
  std::uint32_t min_cycle_samples = 8;  // boundary mode needs this many steps observed
  // Decode.
  double tpot_slo_ms = 0;                // 0: no SLO
  double default_itl_ms = 20;            // c before measurements
  double default_itl_ms_per_seq = 0.05;  // d before measurements
  double kv_usage_high = 0.95;
  std::uint64_t decode_max_wait_ms = 30000;  // a request waiting this long for a decode slot
                                             // is refused (503)
  // Routing rules shared with kv_aware (tie fraction, epsilon of the cold-prefix ring).
  KvRouteOptions route;
  // Whether route.miss_weight also prices the decision to wait for a full server that holds
  // more of the prompt, against releasing now to a server with room (else it prices only the
  // choice among servers with room). Waiting is where the hits under overload come from.
  bool miss_wait = true;
  // Parallel mode: allowed decode servers of each prefill server, as (prefill backend index,
  // decode pool) -> mask over the decode pool's servers. A prefill backend without an entry may
  // pair with every decode server.
  struct Pairing {
    std::uint16_t prefill_backend = 0;
    std::uint16_t decode_pool = 0;
    std::uint64_t decode_mask = 0;
  };
  std::vector<Pairing> pairings;
};

// A request's handle: its entry and the ticket that entry had when it was issued (an entry
// reclaimed and reused gets a new ticket, so a stale handle never matches).
struct Ref {
  std::uint32_t index = 0;
  std::uint64_t ticket = 0;
};

struct EnqueueRequest {
  std::int32_t owner_pid = 0;
  Mode mode = Mode::kSequential;
  std::uint16_t prefill_pool = 0;       // aggregated: the only pool
  std::uint16_t decode_pool = kNoPool;  // sequential and parallel
  std::int32_t priority = 0;            // lower first; clamped to [-1e6, 1e6]
  std::uint32_t prompt_tokens = 0;
  std::uint64_t ring_key = 0;  // the prefix's ring key (kv_routing's cold rule)
  // Predicted cached tokens per server of the prefill / decode pool (index within the pool);
  // shorter spans mean 0 for the rest.
  std::span<const std::uint32_t> prefill_cached;
  std::span<const std::uint32_t> decode_cached;
  std::uint64_t max_wait_ms = 0;  // the request's own bound when tighter than Options; 0: none
};

enum class Verdict : std::uint8_t {
  kQueued,       // waiting for a decision
  kQueueFull,    // 429: the queue is at max_queue / capacity
  kDeadline,     // 503: the expected wait exceeds the bound
  kUnavailable,  // 503: no healthy server in the pool
  kInvalid,      // 500: a pool or mode the scheduler does not know (a configuration bug)
};
std::string_view to_string(Verdict v) noexcept;

struct EnqueueResult {
  Verdict verdict = Verdict::kQueued;
  Ref ref;                          // kQueued
  double expected_wait_ms = 0;      // the admission estimate
  std::uint32_t retry_after_s = 0;  // refusals
  std::string message;              // refusals: why, for the client
  bool wake_scheduler = false;      // the scheduler should run a pass
};

// Where an entry is (EntryState), as the owner sees it.
enum class State : std::uint8_t {
  kFree = 0,
  kQueued = 1,        // waiting for its prefill (and, in parallel mode, decode) server
  kPrefill = 2,       // released to its prefill server (parallel: and its decode server)
  kDecodeQueued = 3,  // sequential: prefill done, waiting for a decode server
  kDecode = 4,        // decoding (sequential after its decode release; aggregated and
                      // parallel after the prefill is done)
  kRefused = 5,       // the scheduler refused it while queued (503): drop it
};

struct Decision {
  State state = State::kFree;
  bool valid = false;                // the ref still names this request
  std::int32_t prefill_server = -1;  // index within the prefill pool
  std::int32_t decode_server = -1;   // index within the decode pool
  bool starved = false;              // released by the starvation bound
  bool held = false;                 // boundary mode held it for a step boundary
  std::uint8_t reason = 0;           // KvRouteDecision::Reason of the prefill choice
  std::int32_t runner_up = -1;       // prefill runner-up, index within the pool
  double expected_ms = 0;            // the chosen prefill server's ETA at release
  double runner_up_ms = 0;
  std::uint32_t cached_tokens = 0;  // predicted, at the chosen prefill server
  std::uint64_t enqueue_ns = 0;
  std::uint64_t released_ns = 0;  // prefill release
  std::uint64_t decode_released_ns = 0;
  std::uint32_t refusal_status = 0;  // kRefused: 503
};

struct PassResult {
  std::uint32_t released = 0;  // prefill releases this pass
  std::uint32_t decode_released = 0;
  std::uint32_t refused = 0;
  std::uint32_t starved = 0;
  std::uint32_t scanned = 0;
  std::uint64_t next_ns = 0;       // run again at this time at the latest; 0: on events only
  std::vector<std::int32_t> wake;  // owners to notify (distinct pids)
  bool repaired = false;           // derived state was rebuilt first
};

// Per-instance figures for the status page and metrics.
struct InstanceStats {
  std::uint32_t outstanding = 0;  // prefills released and not done
  std::uint64_t outstanding_tokens = 0;
  std::uint64_t step_tokens = 0;     // in the step in progress
  std::uint64_t pending_tokens = 0;  // for the next steps
  double remaining_ms = 0;           // of the step in progress
  std::uint32_t batch_tokens = 0;    // B in use
  double step_ms = 0;                // a
  double ms_per_ktoken = 0;          // b x 1000
  std::uint64_t step_samples = 0;
  double cycle_ms = 0;  // EWMA of observed busy step durations
  std::uint64_t boundaries = 0;
  std::uint32_t decoding = 0;  // decodes released and not done (proxy count)
  std::uint32_t max_seqs = 0;
  double itl_ms = 0;          // c
  double itl_ms_per_seq = 0;  // d
  std::uint64_t itl_samples = 0;
  std::uint64_t released = 0;  // prefill releases to it
  std::uint64_t decode_released = 0;
};

struct Stats {
  std::uint32_t capacity = 0;
  std::uint32_t live = 0;    // entries in use
  std::uint32_t queued = 0;  // waiting prefill
  std::uint32_t decode_queued = 0;
  std::uint64_t enqueued = 0, released = 0, decode_released = 0, starved = 0, held = 0;
  std::uint64_t refused_full = 0, refused_deadline = 0, refused_unavailable = 0,
                refused_decode_wait = 0;
  std::uint64_t cancelled = 0, completed = 0, reclaimed = 0, repairs = 0, passes = 0;
  std::uint64_t cache_updates = 0;  // update_cached calls that changed a waiting request
  std::int32_t leader_pid = 0;
  std::uint64_t leader_since_ns = 0, leader_beat_ns = 0, leader_changes = 0;
  std::uint64_t lock_acquired = 0, lock_contended = 0, lock_takeovers = 0;
};

namespace detail {
struct Header;
struct Entry;
struct Instance;
}  // namespace detail

class Scheduler {
 public:
  // Bytes a region needs for `shape`; 0 when the shape is out of bounds.
  static std::size_t required_bytes(const Shape& shape) noexcept;
  // Lays out a fresh scheduler in `region` (8-byte aligned, zeroed or not). Per-instance limits
  // come later (set_limits). nullptr when the region is too small or the shape out of bounds.
  static std::unique_ptr<Scheduler> create(void* region, std::size_t bytes, const Shape& shape);
  // A view of a scheduler laid out by create() (another process, the same bytes); nullptr when
  // the region does not hold one.
  static std::unique_ptr<Scheduler> attach(void* region, std::size_t bytes);

  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  std::uint32_t capacity() const noexcept;
  std::uint32_t instances() const noexcept;
  std::size_t pools() const noexcept;
  const PoolShape& pool(std::size_t p) const { return pools_.at(p); }

  void set_limits(std::uint32_t instance, const InstanceLimits& limits) noexcept;

  // --- Owners -------------------------------------------------------------------------------
  // Admission: queues the request or says why not. `views` as for pass() (health, for the
  // estimate); empty: all healthy.
  EnqueueResult enqueue(const EnqueueRequest& req, std::uint64_t now_ns, const Options& opt,
                        std::span<const InstanceView> views = {});
  // The decision as it stands (lock-free).
  Decision decision(Ref ref) const noexcept;
  // The client left or the request failed before it finished: the entry is freed and whatever
  // it held on its servers released. Returns whether the scheduler should run (it freed room).
  bool cancel(Ref ref, std::uint64_t now_ns) noexcept;
  // The prefill leg finished (its answer came back; aggregated: the first token). `ok` false:
  // failed. `actual_cached`: the engine's usage.prompt_tokens_details.cached_tokens, when
  // reported (corrects the tokens the step computed). Sequential: the entry becomes
  // kDecodeQueued when `ok` (the next pass picks its decode server), else it is freed. Parallel
  // and aggregated: kDecode. `learn` false: the leg ran elsewhere (a retry), so its time says
  // nothing of the chosen instance's steps. Returns whether the scheduler should run.
  bool prefill_done(Ref ref, std::uint64_t now_ns, bool ok,
                    std::optional<std::uint32_t> actual_cached, const Options& opt,
                    bool learn = true) noexcept;
  // Newer predicted cached tokens of a request still waiting (the caches changed while it
  // queued: another request's prefix was sent or cached). kQueued: both pools' values are
  // replaced (spans as in EnqueueRequest); kDecodeQueued: the decode pool's only. Its place in
  // the queue stays (the order key is the admission estimate). Returns whether a value changed,
  // i.e. the scheduler should run a pass; false for a stale ref or a request no longer waiting.
  bool update_cached(Ref ref, std::span<const std::uint32_t> prefill_cached,
                     std::span<const std::uint32_t> decode_cached) noexcept;
  // The decode leg finished (the request's end); `tpot_ms` > 0 when measured (feeds the
  // inter-token latency fit). The entry is freed. Returns whether the scheduler should run.
  bool decode_done(Ref ref, std::uint64_t now_ns, double tpot_ms, const Options& opt) noexcept;

  // --- The scheduler ------------------------------------------------------------------------
  // The lease: take it when free, held by `pid` already, or held by a process that is gone or
  // silent for `stale_ns`. Returns true when `pid` holds it afterwards; `changed` is set when
  // it just changed hands (the new holder then reclaims and repairs).
  bool claim_lease(std::int32_t pid, std::uint64_t now_ns, std::uint64_t stale_ns,
                   bool* changed = nullptr) noexcept;
  void beat_lease(std::int32_t pid, std::uint64_t now_ns) noexcept;
  // Gives the lease up (a worker exiting); true when `pid` held it.
  bool release_lease(std::int32_t pid) noexcept;
  std::int32_t leader() const noexcept;
  std::uint64_t leader_beat_ns() const noexcept;

  // One scheduling pass: decisions for queued prefill and decode requests. `views[i]` for
  // instance i (shorter: the rest healthy and unloaded).
  PassResult pass(std::uint64_t now_ns, const Options& opt,
                  std::span<const InstanceView> views = {});
  // Frees the entries of owners that are gone (`gone(pid)` true); returns the count. The
  // default predicate is pid_gone().
  std::uint32_t reclaim_dead(std::uint64_t now_ns,
                             const std::function<bool(std::int32_t)>& gone = {});
  // Rebuilds every derived structure from the entries (after a takeover; under the lock).
  // Returns how many entries were found corrupt and freed.
  std::uint32_t repair();

  // Owners record when they acted on a decision: from enqueue (the decision latency, which
  // includes any wait for a server) and from the release (what the notification costs).
  void observe_decision_latency(std::uint64_t ns) noexcept;
  void observe_notify_latency(std::uint64_t ns) noexcept;

  // --- Introspection --------------------------------------------------------------------------
  Stats stats() const noexcept;
  InstanceStats instance_stats(std::uint32_t instance, std::uint64_t now_ns,
                               const Options& opt) const;
  const Log2Histogram& decision_latency() const noexcept;
  const Log2Histogram& notify_latency() const noexcept;
  const Log2Histogram& queue_wait() const noexcept;   // enqueue -> prefill release
  const Log2Histogram& decode_wait() const noexcept;  // decode enqueue -> decode release
  const RobustLockWord& lock_word() const noexcept;
  // Entries of `pid` (tests, status).
  std::vector<Ref> entries_of(std::int32_t pid) const;

  // Cost model of one instance as it stands: the expected time of a step of `tokens`.
  double step_ms(std::uint32_t instance, double tokens, const Options& opt) const;
  double itl_ms(std::uint32_t instance, double running, const Options& opt) const;

  // Feeds an observed step directly (tests of the fit): `tokens` computed in `ms`.
  void observe_step(std::uint32_t instance, double tokens, double ms, const Options& opt);

 private:
  Scheduler() = default;
  bool bind(void* region, std::size_t bytes);
  std::uint32_t repair_locked();
  struct Impl;
  friend struct Impl;

  detail::Header* hdr_ = nullptr;
  detail::Instance* inst_ = nullptr;
  detail::Entry* entries_ = nullptr;
  std::uint32_t* cached_ = nullptr;  // [capacity][2][kMaxServers]
  std::uint32_t* order_ = nullptr;   // queued prefill entries, sorted
  std::uint32_t* fifo_ = nullptr;    // queued prefill entries, by arrival
  std::uint32_t* dqueue_ = nullptr;  // queued decode entries, by (priority, decode arrival)
  std::uint32_t* free_ = nullptr;    // free entry stack
  std::vector<PoolShape> pools_;
  std::vector<BoundedLoadRing> rings_;
};

}  // namespace omni::sched
