// Cross-process request state: the in-flight slot table, per-backend counters, per-stage gauges
// and latency histograms, all in one caller-provided memory region shared by every nginx
// worker.
//
// Placement. The region is, in production, the nginx shared zone's memory after nginx's own
// ngx_slab_pool_t header (allocate it with ngx_slab_alloc in the zone's init callback and keep
// the pointer in shpool->data; never touch the slab header or its mutex); in tests, any buffer
// or a MAP_SHARED mapping. Its layout:
//   [pad to 64 B][Root: magic, layout version, sizes, offsets of every component, globals]
//   [boost::interprocess::managed_external_buffer: slots | owner rows | gauge cells |
//    backend blocks | histograms]
// create() runs once (the nginx master, before workers fork): it builds the segment and
// allocates every component through the segment manager, records their offsets in the Root and
// publishes the Root last. attach() and every runtime operation read only the Root and the
// preallocated components: they never enter the segment manager (no allocation, no named-object
// lookup, no lock of any kind). Offsets, not pointers, are stored, so a view at another address
// works. The region must have the same address modulo 64 in every view (true for nginx zones,
// which share one address, and for page-aligned mappings).
//
// Concurrency and crash consistency. Every runtime field is a lock-free std::atomic of a fixed
// width, so a worker killed at any instruction can never block the others:
//  - A slot is claimed by one CAS on its control word (state | generation | owner pid); a claim
//    therefore always names its owner, and reclaim_dead() can free it.
//  - Only the owner writes a slot's fields, under a per-slot seqlock word (data generation |
//    counter; odd while writing). Readers retry or report kTorn, so a half-done update — or an
//    owner killed mid-update — is detectable.
//  - Gauges (requests per stage, outstanding and active streams per backend, slots used) are
//    sharded per owner pid: each worker only adds to its own row, and a gauge is the sum of the
//    rows. A dead worker's row holds exactly the contributions of its unreleased slots plus
//    whatever update it died in, so reclaim_dead() undoes all of it by zeroing the row: no
//    intent log, no drift.
//  - Counters and histograms only grow; a worker killed mid-update loses at most that one
//    observation.
//
// Reload. nginx reuses a zone when its name, tag and size are unchanged; then everything in the
// region survives (slots of still-running old workers, counters, histograms) and new workers
// call attach(), which checks the magic, the layout version/fingerprint (struct sizes, bucket
// bounds) and, given the new config, its compatibility (same slot/backend/owner limits, same
// backends in the same order). On any mismatch attach() fails with a message; the module must
// then not re-create the state in place while old workers may still use it — derive the zone's
// name or size from the config so that a changed config gets a fresh zone. A changed size always
// gets a fresh zone (nginx maps a new one), on which the master calls create() again.
//
// Sizing. Bytes per in-flight slot: kSlotBytes (192: timeline 80, first-token time, request id,
// three token counts, backend indexes, owner row index, control word, seqlock word; padded to
// three cache lines so neighbouring slots owned by different workers never share a line). The
// rest is fixed: ~max_backends x (192 + 8 x max_owners) + max_owners x 64 + histograms + the
// segment manager's own overhead (required_bytes() budgets it conservatively and create()
// demands exactly that much); the nginx zone needs that plus the slab pool's overhead.
// 20,000 slots with 64 backends and 64 owners take about 4 MiB.
#pragma once

#include <omni/lifecycle.hpp>

#include <nlohmann/json_fwd.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <array>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace omni {

namespace prom {
class TextWriter;
}

namespace shm_detail {
struct Root;
struct Slot;
struct OwnerRow;
struct GaugeCell;
struct BackendBlock;
struct Histogram;
struct GroupCell;
struct GroupBlock;
}  // namespace shm_detail

// "No backend assigned" in set_backends() and SlotSnapshot.
inline constexpr std::uint16_t kNoBackend = 0xFFFF;

struct BackendSpec {
  std::string name;  // label `backend`, e.g. "10.0.0.5:8000"; at most kMaxBackendName bytes
  std::string pool;  // label `pool`, e.g. the upstream block's name; at most kMaxPoolName bytes
};

struct SharedStateConfig {
  // In-flight slots (the hard cap on concurrent requests). 0: as many as fit in the region.
  std::uint32_t max_slots = 0;
  // Backend blocks reserved; `backends` may use fewer.
  std::uint32_t max_backends = 64;
  // Distinct worker pids that may hold slots at once: worker_processes, doubled to cover the
  // old generation still draining during a reload, plus slack.
  std::uint32_t max_owners = 64;
  // Registered at create, in index order (the index set_backends() takes).
  std::vector<BackendSpec> backends;
  // Limit groups (an admission limit each: in-flight requests and a wait queue, e.g. one per
  // nginx location with limits) reserved, and their names in index order.
  std::uint32_t max_groups = 64;
  std::vector<std::string> groups;
};

// The engine load a backend's /metrics showed at the last successful poll.
struct EngineLoadSample {
  std::uint32_t running = 0;
  std::uint32_t waiting = 0;
  double kv_usage = std::numeric_limits<double>::quiet_NaN();  // 0..1, NaN: not reported
  std::optional<std::uint64_t> waiting_uncached_tokens;
  std::uint64_t polled_ns = 0;         // monotonic; 0: never polled
  std::uint64_t requests_at_poll = 0;  // the backend's requests_total at that poll
};

// Tokenizer-result reuse, over all workers (SharedState::count_tokenized).
struct TokenizerStats {
  std::uint64_t requests = 0;  // requests tokenized
  std::uint64_t tokens = 0;    // their prompt tokens
  std::uint64_t wall_ns = 0;   // time in the thread pool rendering and tokenizing
  std::uint64_t cpu_ns = 0;    // CPU time of that work
  std::uint64_t errors = 0;    // requests refused while tokenizing
  std::array<std::uint64_t, 16> by_reason{};  // by omni::ForwardReason
};

// Admission to a limit group.
enum class Admission : std::uint8_t {
  kAdmitted,  // counted in flight; call leave() when done
  kQueued,    // counted as waiting; call unqueue() when it leaves the queue
  kRejected,  // in-flight limit reached and the queue is full
};

struct GroupStats {
  std::string name;
  std::int64_t inflight = 0;
  std::int64_t queued = 0;
  std::uint64_t admitted_total = 0;
  std::uint64_t queued_total = 0;
  std::uint64_t rejected_total = 0;
  std::uint64_t timed_out_total = 0;
};

// Identifies one claim of one slot. A handle is only valid while its slot is held by the same
// claim: after release (or reclaim) the slot's generation moves on and the handle is rejected.
struct SlotHandle {
  std::uint32_t index = 0;
  std::uint32_t generation = 0;  // 30 bits
  std::int32_t owner_pid = 0;
  friend bool operator==(const SlotHandle&, const SlotHandle&) = default;
};

enum class SlotResult : std::uint8_t {
  kOk,
  kStaleHandle,      // the slot was released or reclaimed since the handle was issued
  kRejected,         // a valid request refused: backwards or repeated stage, second first token
  kInvalidArgument,  // now == 0, unknown stage or backend index
};

// A consistent copy of one slot.
struct SlotSnapshot {
  SlotHandle handle;
  std::uint64_t request_id = 0;
  Timeline timeline;
  std::uint64_t first_token_ns = 0;  // 0: no token yet
  std::uint32_t prompt_tokens = 0;
  std::uint32_t cached_tokens = 0;  // prompt tokens covered by the prefix cache
  std::uint32_t output_tokens = 0;
  std::uint16_t prefill = kNoBackend;
  std::uint16_t decode = kNoBackend;
};

enum class SlotRead : std::uint8_t {
  kFree,        // not held
  kConsistent,  // *out filled
  kTorn,        // being written right now, or left half-written by an owner that died
};

struct HistogramSnapshot {
  std::vector<double> upper_bounds_s;  // excludes +Inf
  std::vector<std::uint64_t> counts;   // per bucket (not cumulative), one per bound
  std::uint64_t overflow = 0;          // observations above every bound
  double sum_s = 0.0;
  std::uint64_t count() const noexcept;
};

struct BackendStats {
  std::string name;
  std::string pool;
  std::int64_t outstanding = 0;     // gauge: see SharedState::set_backends
  std::int64_t active_streams = 0;  // gauge: slots decoding on this backend
  std::uint64_t requests_total = 0;
  std::uint64_t errors_total = 0;
  std::uint64_t retries_total = 0;
};

enum class OpenStatus : std::uint8_t {
  kOk,
  kBadArgument,     // null region, invalid config (limits, names)
  kRegionTooSmall,  // create: fewer bytes than required_bytes(); attach: smaller than created
  kNotInitialized,  // attach: no published state (wrong magic or create() never finished)
  kLayoutMismatch,  // attach: built by a different layout version / struct layout
  kConfigMismatch,  // attach: incompatible with the expected config
  kInternalError,   // the segment manager failed (should not happen once sizes check out)
};

class SharedState;

struct OpenResult {
  std::unique_ptr<SharedState> state;  // set iff status == kOk
  OpenStatus status = OpenStatus::kOk;
  std::string error;  // human-readable reason when status != kOk
  bool ok() const noexcept { return status == OpenStatus::kOk; }
};

class SharedState {
 public:
  static constexpr std::size_t kSlotBytes = 192;
  static constexpr std::size_t kMaxBackendName = 127;
  static constexpr std::size_t kMaxPoolName = 39;
  static constexpr std::uint32_t kMaxSlots = 1u << 24;
  static constexpr std::uint32_t kMaxBackends = 4096;
  static constexpr std::uint32_t kMaxOwners = 1024;
  static constexpr std::uint32_t kMaxGroups = 4096;
  static constexpr std::size_t kMaxGroupName = 95;

  // Bytes create() needs for `config` (max_slots 0 counts as 1).
  static std::size_t required_bytes(const SharedStateConfig& config) noexcept;
  // The largest max_slots that fits `region_bytes` with the rest of `config`; 0 if none.
  static std::uint32_t max_slots_for(std::size_t region_bytes,
                                     const SharedStateConfig& config) noexcept;

  // Builds fresh state in [region, region + bytes), discarding whatever was there. Not
  // concurrent with anything else on the region. Never throws.
  static OpenResult create(void* region, std::size_t bytes, const SharedStateConfig& config);
  // A view of state a create() published in this region, possibly from another process.
  // With `expected`, also checks that the state is compatible with that config. Never throws.
  static OpenResult attach(void* region, std::size_t bytes,
                           const SharedStateConfig* expected = nullptr);

  SharedState(const SharedState&) = delete;
  SharedState& operator=(const SharedState&) = delete;
  ~SharedState();

  // --- In-flight slots ------------------------------------------------------------------------
  // Claims a free slot for `owner_pid` (> 0) and enters kReceived at now_ns (!= 0). nullopt when
  // every slot is held, or the owner table is full (reclaim_dead frees dead owners): the caller
  // answers 503 with Retry-After. Lock-free.
  std::optional<SlotHandle> acquire(std::int32_t owner_pid, std::uint64_t now_ns,
                                    std::uint64_t request_id = 0) noexcept;
  // Moves the slot's timeline (Timeline::enter rules; backwards or repeated stages give
  // kRejected). Observes the duration of every stage left, except the ones skipped; entering
  // kDone also observes the request duration and, when a first token and >= 2 output tokens
  // were recorded, TPOT.
  SlotResult set_stage(const SlotHandle& h, Stage stage, std::uint64_t now_ns) noexcept;
  // Assigns backends (kNoBackend for none). Each backend newly assigned counts one request.
  // Gauge semantics: a slot counts as outstanding on its prefill backend while its stage is
  // before kWaitingDecode and on its decode backend until kDone (once if both are the same),
  // and as an active stream on its decode backend while in kDecoding.
  SlotResult set_backends(const SlotHandle& h, std::uint16_t prefill,
                          std::uint16_t decode) noexcept;
  SlotResult set_tokens(const SlotHandle& h, std::uint32_t prompt_tokens,
                        std::uint32_t cached_tokens, std::uint32_t output_tokens) noexcept;
  // Records the first output token (once; a second call gives kRejected) and observes TTFT.
  SlotResult set_first_token(const SlotHandle& h, std::uint64_t now_ns) noexcept;
  // Frees the slot and withdraws its gauge contributions. The handle becomes stale.
  SlotResult release(const SlotHandle& h) noexcept;

  // The owner's view of its slot; nullopt for a stale handle.
  std::optional<SlotSnapshot> read(const SlotHandle& h) const noexcept;
  // Any slot, for diagnostics (another worker may be writing it).
  SlotRead read_index(std::uint32_t index, SlotSnapshot* out) const noexcept;

  // Frees every slot whose owner pid `is_alive` reports dead and zeroes dead owners' gauge
  // rows; returns the number of slots freed. Safe to run from several workers at once and
  // against live traffic; a reclaimer that dies midway is taken over by the next one. The
  // predicate must not throw; it is called once per distinct pid. A pid reused by a new
  // process before reclaim looks alive, so run this promptly (on worker exit, and on a timer).
  std::size_t reclaim_dead(const std::function<bool(std::int32_t)>& is_alive);

  // --- Tokenizer ------------------------------------------------------------------------------
  static constexpr std::size_t kForwardReasons = 16;  // >= omni::ForwardReason::kCount
  // One tokenized request: its prompt tokens, the wall and CPU time it took, and how its
  // prompt was forwarded (an omni::ForwardReason).
  void count_tokenized(std::uint64_t tokens, std::uint64_t wall_ns, std::uint64_t cpu_ns,
                       std::uint8_t reason) noexcept;
  void count_tokenize_error() noexcept;
  TokenizerStats tokenizer_stats() const noexcept;

  // --- Backend counters -----------------------------------------------------------------------
  bool count_error(std::uint16_t backend) noexcept;
  bool count_retry(std::uint16_t backend) noexcept;

  // --- Engine load (written by the worker that polls the backends' /metrics) ---------------------
  // Stores a successful poll taken at `sample.polled_ns` (!= 0); requests_at_poll is taken from
  // the backend's requests_total now, so sent_since_poll() counts what the poll cannot show.
  bool set_engine_load(std::uint16_t backend, const EngineLoadSample& sample) noexcept;
  bool count_poll_failure(std::uint16_t backend) noexcept;
  std::optional<EngineLoadSample> engine_load(std::uint16_t backend) const noexcept;
  // Requests assigned to the backend since its last poll (all of them if never polled).
  std::uint64_t sent_since_poll(std::uint16_t backend) const noexcept;
  std::uint64_t poll_failures_total(std::uint16_t backend) const noexcept;
  // SGLang prefill instances: the bootstrap server port their /get_server_info announced.
  bool set_bootstrap_port(std::uint16_t backend, std::uint16_t port) noexcept;
  std::uint16_t bootstrap_port(std::uint16_t backend) const noexcept;  // 0: unknown

  // --- Limit groups ---------------------------------------------------------------------------
  // Admits one request of `owner_pid` to `group`: in flight while fewer than `max_inflight`
  // (0: unlimited) are, otherwise queued while fewer than `max_queue` wait, otherwise
  // rejected. The counts are sums of per-owner rows (a dead owner's share vanishes with
  // reclaim_dead), read then incremented without a lock: concurrent admissions in different
  // workers may overshoot a limit by at most one per worker. kRejected also when the group or
  // owner is unknown.
  Admission admit(std::int32_t owner_pid, std::uint16_t group, std::uint32_t max_inflight,
                  std::uint32_t max_queue) noexcept;
  // A queued request takes an in-flight place if one is free (then it is no longer queued).
  bool promote(std::int32_t owner_pid, std::uint16_t group, std::uint32_t max_inflight) noexcept;
  // A queued request leaves the queue without running; `timed_out` counts it as a timeout.
  void unqueue(std::int32_t owner_pid, std::uint16_t group, bool timed_out) noexcept;
  // An admitted request is done.
  void leave(std::int32_t owner_pid, std::uint16_t group) noexcept;
  std::uint16_t group_count() const noexcept { return group_count_; }
  std::int64_t group_inflight(std::uint16_t group) const noexcept;
  std::int64_t group_queued(std::uint16_t group) const noexcept;
  // The pids of the owners with requests queued in `group` (whom a freed place concerns).
  std::vector<std::int32_t> owners_queued(std::uint16_t group) const;
  std::optional<GroupStats> group_stats(std::uint16_t group) const;

  // --- Reads ----------------------------------------------------------------------------------
  std::uint32_t capacity() const noexcept { return max_slots_; }
  std::uint32_t slots_used() const noexcept;
  std::int64_t requests_in_stage(Stage s) const noexcept;
  std::uint16_t backend_count() const noexcept { return backend_count_; }
  std::optional<std::uint16_t> find_backend(std::string_view name) const noexcept;
  std::int64_t backend_outstanding(std::uint16_t backend) const noexcept;
  std::int64_t backend_active_streams(std::uint16_t backend) const noexcept;
  std::optional<BackendStats> backend_stats(std::uint16_t backend) const;
  // Durations of the stages that have a successor (kReceived..kDecoding); empty for kDone.
  HistogramSnapshot stage_histogram(Stage s) const;
  HistogramSnapshot request_duration_histogram() const;
  HistogramSnapshot ttft_histogram() const;
  HistogramSnapshot tpot_histogram() const;
  std::uint64_t acquire_failures_total() const noexcept;
  std::uint64_t reclaimed_total() const noexcept;
  // Owner pids with a registered gauge row.
  std::vector<std::int32_t> owners() const;

  // Families, all prefixed omni_proxy_: inflight_slots_used, inflight_slots_capacity,
  // slot_acquire_failures_total{reason}, slots_reclaimed_total, requests_in_stage{stage},
  // stage_duration_seconds{stage} (histogram), request_duration_seconds, ttft_seconds,
  // tpot_seconds (histograms), backend_outstanding, backend_active_streams (gauges),
  // backend_requests_total, backend_errors_total, backend_retries_total (counters), the
  // backend ones labelled {pool, backend}; tokenized_requests_total,
  // tokenized_prompt_tokens_total, tokenize_seconds_total, tokenize_cpu_seconds_total,
  // tokenize_errors_total, token_forwarding_total{result}.
  void render_metrics(prom::TextWriter& w) const;
  // {"slots": {used, capacity, bytes_per_slot, acquire_failures_full, acquire_failures_owners,
  //  reclaimed_total}, "stages": {name: count}, "backends": [{index, name, pool, outstanding,
  //  active_streams, requests_total, errors_total, retries_total}],
  //  "workers": [{pid, slots}], "tokenizer": {requests, prompt_tokens, seconds, cpu_seconds,
  //  errors, forwarding: {result: count}}}
  nlohmann::json render_status_json() const;

 private:
  explicit SharedState(shm_detail::Root* root) noexcept;

  shm_detail::Slot* owned(const SlotHandle& h) const noexcept;
  std::uint32_t owner_rows_used() const noexcept;
  std::optional<std::uint32_t> owner_row(std::int32_t pid) noexcept;
  shm_detail::OwnerRow* row_of(const shm_detail::Slot& s, std::int32_t pid) const noexcept;
  void apply_gauges(shm_detail::OwnerRow* row, int stage, std::uint16_t prefill,
                    std::uint16_t decode, std::int32_t sign) noexcept;
  void zero_owner(std::uint32_t owner) noexcept;
  HistogramSnapshot histogram(std::size_t which) const;

  shm_detail::Root* root_;
  shm_detail::Slot* slots_;
  shm_detail::OwnerRow* owners_;
  shm_detail::GaugeCell* cells_;  // [backend][owner]
  shm_detail::BackendBlock* backends_;
  shm_detail::Histogram* hists_;
  shm_detail::GroupCell* group_cells_;  // [group][owner]
  shm_detail::GroupBlock* groups_;
  std::uint32_t max_groups_;
  std::uint16_t group_count_;
  std::uint32_t max_slots_;
  std::uint32_t max_backends_;
  std::uint32_t max_owners_;
  std::uint16_t backend_count_;
  // This view's last (pid << 32 | owner row); a hint, revalidated on use.
  std::atomic<std::uint64_t> owner_hint_{0};
};

// kill(pid, 0) semantics: false only when no such process exists (ESRCH). A zombie counts as
// alive until reaped.
bool pid_alive(std::int32_t pid) noexcept;

}  // namespace omni
