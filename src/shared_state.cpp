#include <omni/shared_state.hpp>

#include <omni/prometheus.hpp>
#include <omni/token_forwarding.hpp>

#include <boost/interprocess/managed_external_buffer.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <array>
#include <cerrno>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>

#include <signal.h>
#include <unistd.h>

namespace omni {
namespace shm_detail {

constexpr std::uint64_t kMagic = 0x314D48534D4E4D4FULL;  // "OMNMSHM1" little-endian
constexpr std::uint32_t kLayoutVersion = 4;
constexpr std::size_t kLine = 64;

// Histogram bounds in nanoseconds (rendered in seconds). Changing them changes the layout
// fingerprint, so a zone written with other bounds is refused at attach.
constexpr std::size_t kMaxBounds = 15;
constexpr std::array<std::uint64_t, 15> kStageBoundsNs = {
    1'000'000,     2'500'000,     5'000'000,      10'000'000,     25'000'000,
    50'000'000,    100'000'000,   250'000'000,    500'000'000,    1'000'000'000,
    2'500'000'000, 5'000'000'000, 10'000'000'000, 30'000'000'000, 60'000'000'000};
constexpr std::array<std::uint64_t, 14> kRequestBoundsNs = {
    50'000'000,     100'000'000,     250'000'000,     500'000'000,    1'000'000'000,
    2'500'000'000,  5'000'000'000,   10'000'000'000,  20'000'000'000, 30'000'000'000,
    60'000'000'000, 120'000'000'000, 300'000'000'000, 600'000'000'000};
constexpr std::array<std::uint64_t, 15> kTtftBoundsNs = {
    10'000'000,    25'000'000,     50'000'000,     100'000'000,    200'000'000,
    300'000'000,   500'000'000,    750'000'000,    1'000'000'000,  2'000'000'000,
    5'000'000'000, 10'000'000'000, 20'000'000'000, 40'000'000'000, 80'000'000'000};
constexpr std::array<std::uint64_t, 15> kTpotBoundsNs = {
    5'000'000,   10'000'000,  15'000'000,  20'000'000,    30'000'000,
    40'000'000,  50'000'000,  75'000'000,  100'000'000,   150'000'000,
    200'000'000, 300'000'000, 500'000'000, 1'000'000'000, 2'500'000'000};

// Histogram indexes: one per stage that has a successor, then the whole-request ones.
constexpr std::size_t kStageHists = kStageCount - 1;  // kReceived..kDecoding
constexpr std::size_t kRequestHist = kStageHists;
constexpr std::size_t kTtftHist = kStageHists + 1;
constexpr std::size_t kTpotHist = kStageHists + 2;
constexpr std::size_t kHistCount = kStageHists + 3;

struct Bounds {
  const std::uint64_t* ns;
  std::size_t n;
};

Bounds bounds_of(std::size_t hist) noexcept {
  if (hist < kStageHists) return {kStageBoundsNs.data(), kStageBoundsNs.size()};
  if (hist == kRequestHist) return {kRequestBoundsNs.data(), kRequestBoundsNs.size()};
  if (hist == kTtftHist) return {kTtftBoundsNs.data(), kTtftBoundsNs.size()};
  return {kTpotBoundsNs.data(), kTpotBoundsNs.size()};
}

// Control word of a slot: owner pid (32) | generation (30) | state (2). One CAS claims a slot
// and names its owner; the generation advances on every free, so handles of earlier claims
// never match again (until 2^30 reuses of the same slot).
constexpr std::uint64_t kStateFree = 0;
constexpr std::uint64_t kStateInUse = 1;
constexpr std::uint32_t kGenMask = (1u << 30) - 1;

constexpr std::uint64_t make_ctrl(std::uint64_t state, std::uint32_t gen, std::int32_t pid) {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(pid)) << 32) |
         (static_cast<std::uint64_t>(gen & kGenMask) << 2) | state;
}
constexpr std::uint64_t ctrl_state(std::uint64_t c) {
  return c & 3u;
}
constexpr std::uint32_t ctrl_gen(std::uint64_t c) {
  return static_cast<std::uint32_t>(c >> 2) & kGenMask;
}
constexpr std::int32_t ctrl_pid(std::uint64_t c) {
  return static_cast<std::int32_t>(static_cast<std::uint32_t>(c >> 32));
}

// One in-flight request. Only the owner writes the fields after `ctrl`, bracketed by `seq`:
// high 32 bits = generation the data belongs to, low 32 bits = counter, odd while writing.
// A reader accepts the fields only if seq was even, unchanged across the read and of the
// claim's generation (so a claimed-but-not-yet-initialised slot is never read as the
// previous request's data).
struct alignas(kLine) Slot {
  std::atomic<std::uint64_t> ctrl;
  std::atomic<std::uint64_t> seq;
  std::atomic<std::uint64_t> at_ns[kStageCount];
  std::atomic<std::uint64_t> first_token_ns;
  std::atomic<std::uint64_t> request_id;
  std::atomic<std::uint32_t> prompt_tokens;
  std::atomic<std::uint32_t> cached_tokens;
  std::atomic<std::uint32_t> output_tokens;
  std::atomic<std::uint16_t> skipped_mask;
  std::atomic<std::uint16_t> prefill;
  std::atomic<std::uint16_t> decode;
  std::atomic<std::uint16_t> owner_row;
};

// Gauge row of one owner pid. `word`: owner pid (low 32 bits; 0 = free row) | pid of the
// process zeroing the row after the owner died (high 32 bits; 0 = none).
struct alignas(kLine) OwnerRow {
  std::atomic<std::uint64_t> word;
  std::atomic<std::int32_t> slots;
  std::atomic<std::int32_t> in_stage[kStageCount];
};

// Per (backend, owner) gauges; a backend's cells for all owners are contiguous.
struct GaugeCell {
  std::atomic<std::int32_t> outstanding;
  std::atomic<std::int32_t> streams;
};

// Identity and counters of one backend, then the engine load its poller last wrote. The load
// fields have one writer at a time (the polling worker); each is an independent atomic, so a
// reader may combine two polls' values for a moment, which a scorer tolerates.
struct alignas(kLine) BackendBlock {
  char name[SharedState::kMaxBackendName + 1];
  char pool[SharedState::kMaxPoolName + 1];
  std::atomic<std::uint64_t> requests_total;
  std::atomic<std::uint64_t> errors_total;
  std::atomic<std::uint64_t> retries_total;
  std::atomic<std::uint64_t> polled_ns;          // 0: never polled
  std::atomic<std::uint64_t> requests_at_poll;   // requests_total when polled
  std::atomic<std::uint64_t> kv_usage_bits;      // double
  std::atomic<std::uint64_t> waiting_uncached;   // kNoValue: not reported
  std::atomic<std::uint32_t> running;
  std::atomic<std::uint32_t> waiting;
  std::atomic<std::uint32_t> poll_failures_total;
  std::atomic<std::uint32_t> bootstrap_port;     // 0: unknown
};

constexpr std::uint64_t kNoValue = ~std::uint64_t{0};

// Per (limit group, owner) gauges, like GaugeCell.
struct GroupCell {
  std::atomic<std::int32_t> inflight;
  std::atomic<std::int32_t> queued;
};

// Identity and counters of one limit group.
struct alignas(kLine) GroupBlock {
  char name[SharedState::kMaxGroupName + 1];
  std::atomic<std::uint64_t> admitted_total;
  std::atomic<std::uint64_t> queued_total;
  std::atomic<std::uint64_t> rejected_total;   // queue full
  std::atomic<std::uint64_t> timed_out_total;  // left the queue at its timeout
};

// Per-bucket counts (index n = above every bound) and the sum, both only ever incremented.
struct alignas(kLine) Histogram {
  std::atomic<std::uint64_t> counts[kMaxBounds + 1];
  std::atomic<std::uint64_t> sum_ns;
};

// At the start of the (64-aligned) region. Immutable after create() except the atomics in the
// last cache line. Offsets are relative to the Root's own address.
struct alignas(kLine) Root {
  std::uint64_t magic;
  std::uint32_t layout_version;
  std::uint32_t root_bytes;
  std::uint64_t layout_fingerprint;
  std::uint64_t config_fingerprint;
  std::uint64_t region_bytes;  // as given to create()
  std::uint64_t end_off;       // one past the last byte the state uses
  std::uint32_t max_slots;
  std::uint32_t max_backends;
  std::uint32_t max_owners;
  std::uint32_t backend_count;
  std::uint64_t slots_off;
  std::uint64_t owners_off;
  std::uint64_t cells_off;
  std::uint64_t backends_off;
  std::uint64_t hists_off;
  std::uint64_t group_cells_off;
  std::uint64_t groups_off;
  std::uint32_t max_groups;
  std::uint32_t group_count;
  alignas(kLine) std::atomic<std::uint32_t> ready;  // 1 once create() published everything
  std::atomic<std::uint32_t> cursor;                // next-fit hint for acquire
  std::atomic<std::uint64_t> acquire_full_total;
  std::atomic<std::uint64_t> acquire_no_owner_total;
  std::atomic<std::uint64_t> reclaimed_total;
  // One past the highest owner row ever claimed: per-owner gauges are summed over these rows
  // only (the rest were never written), so a read costs the workers that exist, not max_owners.
  std::atomic<std::uint32_t> owner_rows_used;
  // Tokenizer-result reuse (count_tokenized).
  alignas(kLine) std::atomic<std::uint64_t> tokenized_total;
  std::atomic<std::uint64_t> tokenized_tokens_total;
  std::atomic<std::uint64_t> tokenize_wall_ns_total;
  std::atomic<std::uint64_t> tokenize_cpu_ns_total;
  std::atomic<std::uint64_t> tokenize_errors_total;
  std::array<std::atomic<std::uint64_t>, SharedState::kForwardReasons> forward_total;
};

static_assert(static_cast<std::size_t>(ForwardReason::kCount) <= SharedState::kForwardReasons);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);
static_assert(std::atomic<std::int32_t>::is_always_lock_free);
static_assert(std::atomic<std::uint16_t>::is_always_lock_free);
// Lock-free atomics of these widths are plain memory words: address-free, so they work across
// processes mapping the region at different addresses.
static_assert(sizeof(std::atomic<std::uint64_t>) == 8 && sizeof(std::atomic<std::uint16_t>) == 2);
static_assert(std::is_standard_layout_v<Slot> && std::is_trivially_destructible_v<Slot>);
static_assert(std::is_standard_layout_v<OwnerRow> && std::is_trivially_destructible_v<OwnerRow>);
static_assert(std::is_standard_layout_v<GaugeCell> && std::is_trivially_destructible_v<GaugeCell>);
static_assert(std::is_standard_layout_v<BackendBlock> &&
              std::is_trivially_destructible_v<BackendBlock>);
static_assert(std::is_standard_layout_v<Histogram> && std::is_trivially_destructible_v<Histogram>);
static_assert(std::is_standard_layout_v<Root> && std::is_trivially_destructible_v<Root>);
static_assert(std::is_trivially_copyable_v<SlotHandle> && std::is_trivially_copyable_v<Timeline>);
static_assert(sizeof(Slot) == SharedState::kSlotBytes);
static_assert(std::is_standard_layout_v<GroupCell> && std::is_trivially_destructible_v<GroupCell>);
static_assert(std::is_standard_layout_v<GroupBlock> &&
              std::is_trivially_destructible_v<GroupBlock>);
static_assert(sizeof(OwnerRow) == 64 && sizeof(GaugeCell) == 8 && sizeof(BackendBlock) == 256);
static_assert(sizeof(GroupCell) == 8 && sizeof(GroupBlock) == 128);
static_assert(sizeof(Root) == 384);

using Segment = boost::interprocess::managed_external_buffer;

constexpr std::size_t round_up(std::size_t n, std::size_t a) {
  return (n + a - 1) / a * a;
}

// What one allocate_aligned(n, 64) may cost in the segment beyond n: rbtree_best_fit's block
// header plus up to one alignment unit of front padding it cannot split off.
constexpr std::size_t kPerAllocOverhead = 2 * kLine + 64;
constexpr std::size_t kAllocations = 7;

struct Sizes {
  std::size_t slots, owners, cells, backends, hists, group_cells, groups;
};

Sizes component_sizes(std::uint64_t slots, std::uint64_t backends, std::uint64_t owners,
                      std::uint64_t groups) {
  return {round_up(slots * sizeof(Slot), kLine),
          round_up(owners * sizeof(OwnerRow), kLine),
          round_up(backends * owners * sizeof(GaugeCell), kLine),
          round_up(backends * sizeof(BackendBlock), kLine),
          round_up(kHistCount * sizeof(Histogram), kLine),
          round_up(groups * owners * sizeof(GroupCell), kLine),
          round_up(groups * sizeof(GroupBlock), kLine)};
}

// Everything but the slot array: alignment slack, Root, segment manager, allocations.
std::size_t fixed_bytes(const SharedStateConfig& c) {
  const Sizes s = component_sizes(0, c.max_backends, c.max_owners, c.max_groups);
  return kLine + sizeof(Root) + round_up(Segment::segment_manager::get_min_size(), kLine) +
         kAllocations * kPerAllocOverhead + s.owners + s.cells + s.backends + s.hists +
         s.group_cells + s.groups;
}

// FNV-1a, for fingerprints.
struct Fnv {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  void bytes(const void* p, std::size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 0x100000001b3ULL;
  }
  void u64(std::uint64_t v) { bytes(&v, sizeof v); }
  void str(std::string_view s) {
    u64(s.size());
    bytes(s.data(), s.size());
  }
};

std::uint64_t layout_fingerprint() {
  Fnv f;
  for (std::uint64_t v :
       {std::uint64_t{kLayoutVersion}, std::uint64_t{sizeof(Root)}, std::uint64_t{sizeof(Slot)},
        std::uint64_t{sizeof(OwnerRow)}, std::uint64_t{sizeof(GaugeCell)},
        std::uint64_t{sizeof(BackendBlock)}, std::uint64_t{sizeof(Histogram)},
        std::uint64_t{sizeof(GroupCell)}, std::uint64_t{sizeof(GroupBlock)},
        std::uint64_t{kStageCount}, std::uint64_t{kHistCount}}) {
    f.u64(v);
  }
  for (std::size_t h = 0; h < kHistCount; ++h) {
    const Bounds b = bounds_of(h);
    f.u64(b.n);
    f.bytes(b.ns, b.n * sizeof(std::uint64_t));
  }
  return f.h;
}

std::uint64_t config_fingerprint(const SharedStateConfig& c) {
  Fnv f;
  f.u64(c.max_slots);
  f.u64(c.max_backends);
  f.u64(c.max_owners);
  f.u64(c.backends.size());
  for (const BackendSpec& b : c.backends) {
    f.str(b.name);
    f.str(b.pool);
  }
  f.u64(c.max_groups);
  f.u64(c.groups.size());
  for (const std::string& g : c.groups) f.str(g);
  return f.h;
}

char* aligned_base(void* region) {
  const auto addr = reinterpret_cast<std::uintptr_t>(region);
  return reinterpret_cast<char*>(round_up(addr, kLine));
}

// Seqlock writer side; only a slot's owner calls these.
std::uint32_t begin_write(Slot& s, std::uint32_t gen) noexcept {
  const auto counter = static_cast<std::uint32_t>(s.seq.load(std::memory_order_relaxed));
  // Odd; if a dead previous owner left it odd, step to the next odd value so readers that
  // sampled the old one notice the change.
  const std::uint32_t odd = counter + 1 + (counter & 1u);
  s.seq.store((static_cast<std::uint64_t>(gen) << 32) | odd, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  return odd;
}

void end_write(Slot& s, std::uint32_t gen, std::uint32_t odd) noexcept {
  s.seq.store((static_cast<std::uint64_t>(gen) << 32) | (odd + 1), std::memory_order_release);
}

// Owner-side loads (no concurrent writer).
Timeline::Stamps load_stamps(const Slot& s) noexcept {
  Timeline::Stamps t{};
  for (std::size_t i = 0; i < kStageCount; ++i) t[i] = s.at_ns[i].load(std::memory_order_relaxed);
  return t;
}

Timeline load_timeline(const Slot& s) noexcept {
  // The owner's own data always has the shape enter() produces.
  return Timeline::from_raw(load_stamps(s), s.skipped_mask.load(std::memory_order_relaxed))
      .value_or(Timeline{});
}

int stage_of(const Timeline& t) noexcept {
  const auto c = t.current();
  return c ? static_cast<int>(stage_index(*c)) : -1;
}

void observe(Histogram& h, std::size_t which, std::uint64_t value_ns) noexcept {
  const Bounds b = bounds_of(which);
  std::size_t i = 0;
  while (i < b.n && value_ns > b.ns[i]) ++i;
  h.counts[i].fetch_add(1, std::memory_order_relaxed);
  h.sum_ns.fetch_add(value_ns, std::memory_order_relaxed);
}

std::int64_t clamp_gauge(std::int64_t v) {
  return v < 0 ? 0 : v;
}

std::string bounded_string(const char* s, std::size_t cap) {
  return std::string(s, strnlen(s, cap));
}

}  // namespace shm_detail

using namespace shm_detail;

std::uint64_t HistogramSnapshot::count() const noexcept {
  std::uint64_t n = overflow;
  for (std::uint64_t c : counts) n += c;
  return n;
}

// ---------------------------------------------------------------------------------------------
// Sizing, create, attach
// ---------------------------------------------------------------------------------------------

std::size_t SharedState::required_bytes(const SharedStateConfig& config) noexcept {
  const std::uint64_t slots = std::max<std::uint32_t>(config.max_slots, 1);
  return fixed_bytes(config) + component_sizes(slots, 0, 0, 0).slots;
}

std::uint32_t SharedState::max_slots_for(std::size_t region_bytes,
                                         const SharedStateConfig& config) noexcept {
  const std::size_t fixed = fixed_bytes(config);
  if (region_bytes <= fixed) return 0;
  const std::size_t n = (region_bytes - fixed) / sizeof(Slot);
  return static_cast<std::uint32_t>(std::min<std::size_t>(n, kMaxSlots));
}

namespace {

std::string validate_config(const SharedStateConfig& c) {
  if (c.max_slots > SharedState::kMaxSlots) {
    return "max_slots " + std::to_string(c.max_slots) + " exceeds " +
           std::to_string(SharedState::kMaxSlots);
  }
  if (c.max_backends == 0 || c.max_backends > SharedState::kMaxBackends) {
    return "max_backends must be in [1, " + std::to_string(SharedState::kMaxBackends) + "]";
  }
  if (c.max_owners == 0 || c.max_owners > SharedState::kMaxOwners) {
    return "max_owners must be in [1, " + std::to_string(SharedState::kMaxOwners) + "]";
  }
  if (c.max_groups > SharedState::kMaxGroups) {
    return "max_groups must be at most " + std::to_string(SharedState::kMaxGroups);
  }
  if (c.groups.size() > c.max_groups) {
    return std::to_string(c.groups.size()) + " limit groups exceed max_groups " +
           std::to_string(c.max_groups);
  }
  for (std::size_t i = 0; i < c.groups.size(); ++i) {
    if (c.groups[i].empty() || c.groups[i].size() > SharedState::kMaxGroupName ||
        c.groups[i].find('\0') != std::string::npos) {
      return "limit group " + std::to_string(i) + ": name must be 1.." +
             std::to_string(SharedState::kMaxGroupName) + " bytes without NUL";
    }
  }
  if (c.backends.size() > c.max_backends) {
    return std::to_string(c.backends.size()) + " backends exceed max_backends " +
           std::to_string(c.max_backends);
  }
  for (std::size_t i = 0; i < c.backends.size(); ++i) {
    const BackendSpec& b = c.backends[i];
    if (b.name.empty() || b.name.size() > SharedState::kMaxBackendName ||
        b.name.find('\0') != std::string::npos) {
      return "backend " + std::to_string(i) + ": name must be 1.." +
             std::to_string(SharedState::kMaxBackendName) + " bytes without NUL";
    }
    if (b.pool.size() > SharedState::kMaxPoolName || b.pool.find('\0') != std::string::npos) {
      return "backend " + b.name + ": pool must be at most " +
             std::to_string(SharedState::kMaxPoolName) + " bytes without NUL";
    }
    for (std::size_t j = 0; j < i; ++j) {
      if (c.backends[j].name == b.name && c.backends[j].pool == b.pool) {
        return "backend " + b.name + " (pool " + b.pool + ") registered twice";
      }
    }
  }
  return {};
}

OpenResult fail(OpenStatus status, std::string message) {
  OpenResult r;
  r.status = status;
  r.error = "omni shared state: " + std::move(message);
  return r;
}

template <class T>
T* construct_array(Segment& seg, std::size_t n, std::size_t bytes) {
  void* p = seg.allocate_aligned(bytes, kLine);  // throws bad_alloc when out of space
  std::memset(p, 0, bytes);
  T* first = static_cast<T*>(p);
  std::uninitialized_value_construct_n(first, n);
  return first;
}

}  // namespace

OpenResult SharedState::create(void* region, std::size_t bytes,
                               const SharedStateConfig& config_in) {
  if (region == nullptr) return fail(OpenStatus::kBadArgument, "null region");
  if (std::string err = validate_config(config_in); !err.empty()) {
    return fail(OpenStatus::kBadArgument, err);
  }
  SharedStateConfig config = config_in;
  if (config.max_slots == 0) {
    config.max_slots = max_slots_for(bytes, config);
    if (config.max_slots == 0) {
      return fail(OpenStatus::kRegionTooSmall,
                  "region of " + std::to_string(bytes) + " bytes holds no slot; " +
                      std::to_string(required_bytes(config)) + " bytes needed for one");
    }
  }
  const std::size_t need = required_bytes(config);
  if (bytes < need) {
    return fail(OpenStatus::kRegionTooSmall,
                "region of " + std::to_string(bytes) +
                    " bytes is too small: " + std::to_string(config.max_slots) + " slots, " +
                    std::to_string(config.max_backends) + " backends and " +
                    std::to_string(config.max_owners) + " owners need " + std::to_string(need) +
                    " bytes (" + std::to_string(sizeof(Slot)) + " per slot)");
  }

  char* base = aligned_base(region);
  char* const end = static_cast<char*>(region) + bytes;
  auto* root = new (base) Root{};
  root->ready.store(0, std::memory_order_relaxed);
  root->magic = 0;
  char* seg_begin = base + sizeof(Root);
  const std::size_t seg_bytes = static_cast<std::size_t>(end - seg_begin) / kLine * kLine;

  const std::uint64_t slots = config.max_slots;
  const std::uint64_t nb = config.max_backends;
  const std::uint64_t no = config.max_owners;
  const std::uint64_t ng = config.max_groups;
  const Sizes sz = component_sizes(slots, nb, no, ng);
  try {
    Segment seg(boost::interprocess::create_only, seg_begin, seg_bytes);
    Slot* s = construct_array<Slot>(seg, slots, sz.slots);
    OwnerRow* o = construct_array<OwnerRow>(seg, no, sz.owners);
    GaugeCell* c = construct_array<GaugeCell>(seg, nb * no, sz.cells);
    BackendBlock* b = construct_array<BackendBlock>(seg, nb, sz.backends);
    Histogram* h = construct_array<Histogram>(seg, kHistCount, sz.hists);
    GroupCell* gc = construct_array<GroupCell>(seg, ng * no, sz.group_cells);
    GroupBlock* g = construct_array<GroupBlock>(seg, ng, sz.groups);
    for (std::size_t i = 0; i < config.groups.size(); ++i) {
      std::memcpy(g[i].name, config.groups[i].data(), config.groups[i].size());
    }
    for (std::uint64_t i = 0; i < nb; ++i) {
      b[i].waiting_uncached.store(kNoValue, std::memory_order_relaxed);
      b[i].kv_usage_bits.store(std::bit_cast<std::uint64_t>(
                                   std::numeric_limits<double>::quiet_NaN()),
                               std::memory_order_relaxed);
    }
    for (std::uint64_t i = 0; i < slots; ++i) {
      s[i].ctrl.store(make_ctrl(kStateFree, 0, 0), std::memory_order_relaxed);
      s[i].prefill.store(kNoBackend, std::memory_order_relaxed);
      s[i].decode.store(kNoBackend, std::memory_order_relaxed);
    }
    for (std::size_t i = 0; i < config.backends.size(); ++i) {
      std::memcpy(b[i].name, config.backends[i].name.data(), config.backends[i].name.size());
      std::memcpy(b[i].pool, config.backends[i].pool.data(), config.backends[i].pool.size());
    }
    auto off = [base](const void* p) {
      return static_cast<std::uint64_t>(static_cast<const char*>(p) - base);
    };
    root->slots_off = off(s);
    root->owners_off = off(o);
    root->cells_off = off(c);
    root->backends_off = off(b);
    root->hists_off = off(h);
    root->group_cells_off = off(gc);
    root->groups_off = off(g);
    root->end_off = std::max({root->slots_off + sz.slots, root->owners_off + sz.owners,
                              root->cells_off + sz.cells, root->backends_off + sz.backends,
                              root->hists_off + sz.hists, root->group_cells_off + sz.group_cells,
                              root->groups_off + sz.groups});
    // `seg` goes out of scope without touching the memory: the segment manager stays in the
    // region, unused after this point.
  } catch (const std::exception& e) {
    return fail(OpenStatus::kInternalError,
                std::string("segment manager failed while building the state: ") + e.what());
  }

  root->layout_version = kLayoutVersion;
  root->root_bytes = sizeof(Root);
  root->layout_fingerprint = layout_fingerprint();
  root->config_fingerprint = config_fingerprint(config);
  root->region_bytes = bytes;
  root->max_slots = config.max_slots;
  root->max_backends = config.max_backends;
  root->max_owners = config.max_owners;
  root->backend_count = static_cast<std::uint32_t>(config.backends.size());
  root->max_groups = config.max_groups;
  root->group_count = static_cast<std::uint32_t>(config.groups.size());
  root->magic = kMagic;
  root->ready.store(1, std::memory_order_release);

  OpenResult r;
  r.state.reset(new SharedState(root));
  return r;
}

OpenResult SharedState::attach(void* region, std::size_t bytes, const SharedStateConfig* expected) {
  if (region == nullptr) return fail(OpenStatus::kBadArgument, "null region");
  char* base = aligned_base(region);
  const std::size_t lead = static_cast<std::size_t>(base - static_cast<char*>(region));
  if (bytes < lead + sizeof(Root)) {
    return fail(OpenStatus::kRegionTooSmall,
                "region of " + std::to_string(bytes) + " bytes cannot hold the root header");
  }
  auto* root = reinterpret_cast<Root*>(base);
  if (root->ready.load(std::memory_order_acquire) != 1 || root->magic != kMagic) {
    return fail(OpenStatus::kNotInitialized, "region holds no published state (bad magic)");
  }
  if (root->layout_version != kLayoutVersion || root->root_bytes != sizeof(Root) ||
      root->layout_fingerprint != layout_fingerprint()) {
    return fail(OpenStatus::kLayoutMismatch,
                "region was written with layout version " + std::to_string(root->layout_version) +
                    ", this build uses " + std::to_string(kLayoutVersion) +
                    (root->layout_version == kLayoutVersion ? " with another struct layout" : ""));
  }
  if (lead + root->end_off > bytes) {
    return fail(OpenStatus::kRegionTooSmall,
                "region of " + std::to_string(bytes) + " bytes is smaller than the " +
                    std::to_string(root->region_bytes) + " bytes the state was created in");
  }
  SharedStateConfig cfg_limits;
  cfg_limits.max_slots = root->max_slots;
  cfg_limits.max_backends = root->max_backends;
  cfg_limits.max_owners = root->max_owners;
  cfg_limits.max_groups = root->max_groups;
  const Sizes sz = component_sizes(root->max_slots, root->max_backends, root->max_owners,
                                   root->max_groups);
  auto in_bounds = [&](std::uint64_t off, std::size_t n) {
    return off % kLine == 0 && off >= sizeof(Root) && off + n <= root->end_off;
  };
  if (!validate_config(cfg_limits).empty() || root->max_slots == 0 ||
      root->backend_count > root->max_backends || root->group_count > root->max_groups ||
      !in_bounds(root->group_cells_off, sz.group_cells) || !in_bounds(root->groups_off, sz.groups) ||
      !in_bounds(root->slots_off, sz.slots) ||
      !in_bounds(root->owners_off, sz.owners) || !in_bounds(root->cells_off, sz.cells) ||
      !in_bounds(root->backends_off, sz.backends) || !in_bounds(root->hists_off, sz.hists)) {
    return fail(OpenStatus::kLayoutMismatch, "root header is corrupt");
  }
  std::unique_ptr<SharedState> st(new SharedState(root));
  if (expected != nullptr) {
    auto mismatch = [](std::string_view what, std::uint64_t have, std::uint64_t want) {
      return fail(OpenStatus::kConfigMismatch,
                  "zone holds " + std::string(what) + " " + std::to_string(have) +
                      ", config wants " + std::to_string(want) +
                      "; use a new zone (name or size) for the new config");
    };
    if (expected->max_slots != 0 && expected->max_slots != root->max_slots) {
      return mismatch("max_slots", root->max_slots, expected->max_slots);
    }
    if (expected->max_backends != root->max_backends) {
      return mismatch("max_backends", root->max_backends, expected->max_backends);
    }
    if (expected->max_owners != root->max_owners) {
      return mismatch("max_owners", root->max_owners, expected->max_owners);
    }
    if (expected->max_groups != root->max_groups) {
      return mismatch("max_groups", root->max_groups, expected->max_groups);
    }
    if (expected->groups.size() != root->group_count) {
      return mismatch("limit group count", root->group_count, expected->groups.size());
    }
    for (std::size_t i = 0; i < expected->groups.size(); ++i) {
      const GroupBlock& g = st->groups_[i];
      if (bounded_string(g.name, sizeof g.name) != expected->groups[i]) {
        return fail(OpenStatus::kConfigMismatch,
                    "limit group " + std::to_string(i) + " differs between zone and config");
      }
    }
    if (expected->backends.size() != root->backend_count) {
      return mismatch("backend count", root->backend_count, expected->backends.size());
    }
    for (std::size_t i = 0; i < expected->backends.size(); ++i) {
      const BackendBlock& b = st->backends_[i];
      const std::string name = bounded_string(b.name, sizeof b.name);
      const std::string pool = bounded_string(b.pool, sizeof b.pool);
      if (name != expected->backends[i].name || pool != expected->backends[i].pool) {
        return fail(OpenStatus::kConfigMismatch, "backend " + std::to_string(i) + " is " + pool +
                                                     "/" + name + " in the zone but " +
                                                     expected->backends[i].pool + "/" +
                                                     expected->backends[i].name + " in the config");
      }
    }
  }
  OpenResult r;
  r.state = std::move(st);
  return r;
}

SharedState::SharedState(Root* root) noexcept
    : root_(root),
      slots_(reinterpret_cast<Slot*>(reinterpret_cast<char*>(root) + root->slots_off)),
      owners_(reinterpret_cast<OwnerRow*>(reinterpret_cast<char*>(root) + root->owners_off)),
      cells_(reinterpret_cast<GaugeCell*>(reinterpret_cast<char*>(root) + root->cells_off)),
      backends_(
          reinterpret_cast<BackendBlock*>(reinterpret_cast<char*>(root) + root->backends_off)),
      hists_(reinterpret_cast<Histogram*>(reinterpret_cast<char*>(root) + root->hists_off)),
      group_cells_(
          reinterpret_cast<GroupCell*>(reinterpret_cast<char*>(root) + root->group_cells_off)),
      groups_(reinterpret_cast<GroupBlock*>(reinterpret_cast<char*>(root) + root->groups_off)),
      max_groups_(root->max_groups),
      group_count_(static_cast<std::uint16_t>(root->group_count)),
      max_slots_(root->max_slots),
      max_backends_(root->max_backends),
      max_owners_(root->max_owners),
      backend_count_(static_cast<std::uint16_t>(root->backend_count)) {}

SharedState::~SharedState() = default;

// ---------------------------------------------------------------------------------------------
// Owners and gauges
// ---------------------------------------------------------------------------------------------

std::optional<std::uint32_t> SharedState::owner_row(std::int32_t pid) noexcept {
  const auto want = static_cast<std::uint64_t>(static_cast<std::uint32_t>(pid));
  const std::uint64_t hint = owner_hint_.load(std::memory_order_relaxed);
  if ((hint >> 32) == want) {
    const auto i = static_cast<std::uint32_t>(hint);
    if (i < max_owners_ && owners_[i].word.load(std::memory_order_acquire) == want) return i;
  }
  for (std::uint32_t i = 0; i < max_owners_; ++i) {
    if (owners_[i].word.load(std::memory_order_acquire) == want) {
      owner_hint_.store((want << 32) | i, std::memory_order_relaxed);
      return i;
    }
  }
  // Register in the first free row. A lost race on a row to the same pid (another thread of
  // this process) adopts that row, so a pid normally has one row; a duplicate would still be
  // correct, only wasteful.
  for (std::uint32_t i = 0; i < max_owners_; ++i) {
    std::uint64_t w = 0;
    if (owners_[i].word.compare_exchange_strong(w, want, std::memory_order_acq_rel) || w == want) {
      // Published before the row's cells are first written (the caller writes them next).
      std::uint32_t used = root_->owner_rows_used.load(std::memory_order_relaxed);
      while (used < i + 1 &&
             !root_->owner_rows_used.compare_exchange_weak(used, i + 1, std::memory_order_release)) {
      }
      owner_hint_.store((want << 32) | i, std::memory_order_relaxed);
      return i;
    }
  }
  return std::nullopt;
}

OwnerRow* SharedState::row_of(const Slot& s, std::int32_t pid) const noexcept {
  const std::uint32_t i = s.owner_row.load(std::memory_order_relaxed);
  if (i >= max_owners_) return nullptr;
  // The row can only belong to someone else if a wrong liveness answer reclaimed it.
  const auto want = static_cast<std::uint64_t>(static_cast<std::uint32_t>(pid));
  if (owners_[i].word.load(std::memory_order_relaxed) != want) return nullptr;
  return &owners_[i];
}

// Adds `sign` times the gauge contribution of a slot in `stage` (-1: none) with these
// backends to `row`. See set_backends() for the semantics.
void SharedState::apply_gauges(OwnerRow* row, int stage, std::uint16_t prefill,
                               std::uint16_t decode, std::int32_t sign) noexcept {
  if (row == nullptr || stage < 0) return;
  const auto owner = static_cast<std::size_t>(row - owners_);
  row->in_stage[stage].fetch_add(sign, std::memory_order_relaxed);
  const bool prefill_busy =
      prefill < backend_count_ && stage < static_cast<int>(Stage::kWaitingDecode);
  const bool decode_busy = decode < backend_count_ && stage < static_cast<int>(Stage::kDone);
  if (prefill_busy) {
    cells_[prefill * std::size_t{max_owners_} + owner].outstanding.fetch_add(
        sign, std::memory_order_relaxed);
  }
  if (decode_busy && !(prefill_busy && prefill == decode)) {
    cells_[decode * std::size_t{max_owners_} + owner].outstanding.fetch_add(
        sign, std::memory_order_relaxed);
  }
  if (decode < backend_count_ && stage == static_cast<int>(Stage::kDecoding)) {
    cells_[decode * std::size_t{max_owners_} + owner].streams.fetch_add(sign,
                                                                        std::memory_order_relaxed);
  }
}

void SharedState::zero_owner(std::uint32_t owner) noexcept {
  OwnerRow& r = owners_[owner];
  r.slots.store(0, std::memory_order_relaxed);
  for (auto& g : r.in_stage) g.store(0, std::memory_order_relaxed);
  for (std::size_t b = 0; b < max_backends_; ++b) {
    GaugeCell& c = cells_[b * max_owners_ + owner];
    c.outstanding.store(0, std::memory_order_relaxed);
    c.streams.store(0, std::memory_order_relaxed);
  }
  for (std::size_t g = 0; g < max_groups_; ++g) {
    GroupCell& c = group_cells_[g * max_owners_ + owner];
    c.inflight.store(0, std::memory_order_relaxed);
    c.queued.store(0, std::memory_order_relaxed);
  }
}

// ---------------------------------------------------------------------------------------------
// Slots
// ---------------------------------------------------------------------------------------------

Slot* SharedState::owned(const SlotHandle& h) const noexcept {
  if (h.index >= max_slots_) return nullptr;
  Slot& s = slots_[h.index];
  if (s.ctrl.load(std::memory_order_acquire) != make_ctrl(kStateInUse, h.generation, h.owner_pid)) {
    return nullptr;
  }
  return &s;
}

std::optional<SlotHandle> SharedState::acquire(std::int32_t owner_pid, std::uint64_t now_ns,
                                               std::uint64_t request_id) noexcept {
  if (owner_pid <= 0 || now_ns == 0) return std::nullopt;
  const std::optional<std::uint32_t> owner = owner_row(owner_pid);
  if (!owner) {
    root_->acquire_no_owner_total.fetch_add(1, std::memory_order_relaxed);
    return std::nullopt;
  }
  // Next fit from the shared hint: under normal load the next slot is usually free.
  const std::uint32_t start = root_->cursor.load(std::memory_order_relaxed) % max_slots_;
  for (std::uint32_t k = 0; k < max_slots_; ++k) {
    std::uint32_t i = start + k;
    if (i >= max_slots_) i -= max_slots_;
    Slot& s = slots_[i];
    std::uint64_t c = s.ctrl.load(std::memory_order_relaxed);
    if (ctrl_state(c) != kStateFree) continue;
    const std::uint32_t gen = ctrl_gen(c);
    if (!s.ctrl.compare_exchange_strong(c, make_ctrl(kStateInUse, gen, owner_pid),
                                        std::memory_order_acq_rel)) {
      continue;
    }
    root_->cursor.store(i + 1, std::memory_order_relaxed);
    const std::uint32_t odd = begin_write(s, gen);
    s.at_ns[0].store(now_ns, std::memory_order_relaxed);
    for (std::size_t j = 1; j < kStageCount; ++j) s.at_ns[j].store(0, std::memory_order_relaxed);
    s.first_token_ns.store(0, std::memory_order_relaxed);
    s.request_id.store(request_id, std::memory_order_relaxed);
    s.prompt_tokens.store(0, std::memory_order_relaxed);
    s.cached_tokens.store(0, std::memory_order_relaxed);
    s.output_tokens.store(0, std::memory_order_relaxed);
    s.skipped_mask.store(0, std::memory_order_relaxed);
    s.prefill.store(kNoBackend, std::memory_order_relaxed);
    s.decode.store(kNoBackend, std::memory_order_relaxed);
    s.owner_row.store(static_cast<std::uint16_t>(*owner), std::memory_order_relaxed);
    OwnerRow& row = owners_[*owner];
    row.slots.fetch_add(1, std::memory_order_relaxed);
    apply_gauges(&row, static_cast<int>(Stage::kReceived), kNoBackend, kNoBackend, +1);
    end_write(s, gen, odd);
    return SlotHandle{i, gen, owner_pid};
  }
  root_->acquire_full_total.fetch_add(1, std::memory_order_relaxed);
  return std::nullopt;
}

SlotResult SharedState::set_stage(const SlotHandle& h, Stage stage, std::uint64_t now_ns) noexcept {
  Slot* s = owned(h);
  if (s == nullptr) return SlotResult::kStaleHandle;
  if (stage_index(stage) >= kStageCount || now_ns == 0) return SlotResult::kInvalidArgument;
  const Timeline before = load_timeline(*s);
  Timeline after = before;
  if (!accepted(after.enter(stage, now_ns))) return SlotResult::kRejected;

  const int from = stage_of(before);
  const int to = stage_of(after);
  const std::uint16_t prefill = s->prefill.load(std::memory_order_relaxed);
  const std::uint16_t decode = s->decode.load(std::memory_order_relaxed);
  const std::uint32_t odd = begin_write(*s, h.generation);
  for (int i = from < 0 ? 0 : from; i <= to; ++i) {
    s->at_ns[i].store(after.stamps()[i], std::memory_order_relaxed);
  }
  s->skipped_mask.store(after.skipped_mask(), std::memory_order_relaxed);
  OwnerRow* row = row_of(*s, h.owner_pid);
  apply_gauges(row, from, prefill, decode, -1);
  apply_gauges(row, to, prefill, decode, +1);
  end_write(*s, h.generation, odd);

  // Stages left by this move: the old current one (entered for real) and any skipped ones,
  // which are not observed (a zero would only record that the stage does not apply).
  for (int i = from < 0 ? 0 : from; i < to; ++i) {
    const Stage st = static_cast<Stage>(i);
    if (after.skipped(st)) continue;
    observe(hists_[i], static_cast<std::size_t>(i), after.duration_ns(st).value_or(0));
  }
  if (to == static_cast<int>(Stage::kDone)) {
    observe(hists_[kRequestHist], kRequestHist, after.total_ns().value_or(0));
    const auto tpot = after.tpot_ns(s->first_token_ns.load(std::memory_order_relaxed),
                                    s->output_tokens.load(std::memory_order_relaxed));
    if (tpot) observe(hists_[kTpotHist], kTpotHist, static_cast<std::uint64_t>(*tpot));
  }
  return SlotResult::kOk;
}

SlotResult SharedState::set_backends(const SlotHandle& h, std::uint16_t prefill,
                                     std::uint16_t decode) noexcept {
  Slot* s = owned(h);
  if (s == nullptr) return SlotResult::kStaleHandle;
  auto valid = [this](std::uint16_t b) { return b == kNoBackend || b < backend_count_; };
  if (!valid(prefill) || !valid(decode)) return SlotResult::kInvalidArgument;
  const std::uint16_t old_prefill = s->prefill.load(std::memory_order_relaxed);
  const std::uint16_t old_decode = s->decode.load(std::memory_order_relaxed);
  const int stage = stage_of(load_timeline(*s));
  const std::uint32_t odd = begin_write(*s, h.generation);
  s->prefill.store(prefill, std::memory_order_relaxed);
  s->decode.store(decode, std::memory_order_relaxed);
  OwnerRow* row = row_of(*s, h.owner_pid);
  apply_gauges(row, stage, old_prefill, old_decode, -1);
  apply_gauges(row, stage, prefill, decode, +1);
  end_write(*s, h.generation, odd);
  if (prefill != kNoBackend && prefill != old_prefill) {
    backends_[prefill].requests_total.fetch_add(1, std::memory_order_relaxed);
  }
  if (decode != kNoBackend && decode != old_decode && decode != prefill) {
    backends_[decode].requests_total.fetch_add(1, std::memory_order_relaxed);
  }
  return SlotResult::kOk;
}

SlotResult SharedState::set_tokens(const SlotHandle& h, std::uint32_t prompt_tokens,
                                   std::uint32_t cached_tokens,
                                   std::uint32_t output_tokens) noexcept {
  Slot* s = owned(h);
  if (s == nullptr) return SlotResult::kStaleHandle;
  const std::uint32_t odd = begin_write(*s, h.generation);
  s->prompt_tokens.store(prompt_tokens, std::memory_order_relaxed);
  s->cached_tokens.store(cached_tokens, std::memory_order_relaxed);
  s->output_tokens.store(output_tokens, std::memory_order_relaxed);
  end_write(*s, h.generation, odd);
  return SlotResult::kOk;
}

SlotResult SharedState::set_first_token(const SlotHandle& h, std::uint64_t now_ns) noexcept {
  Slot* s = owned(h);
  if (s == nullptr) return SlotResult::kStaleHandle;
  if (now_ns == 0) return SlotResult::kInvalidArgument;
  if (s->first_token_ns.load(std::memory_order_relaxed) != 0) return SlotResult::kRejected;
  const std::uint64_t received = s->at_ns[0].load(std::memory_order_relaxed);
  now_ns = std::max(now_ns, received);  // same clamp as Timeline::enter
  const std::uint32_t odd = begin_write(*s, h.generation);
  s->first_token_ns.store(now_ns, std::memory_order_relaxed);
  end_write(*s, h.generation, odd);
  observe(hists_[kTtftHist], kTtftHist, now_ns - received);
  return SlotResult::kOk;
}

SlotResult SharedState::release(const SlotHandle& h) noexcept {
  Slot* s = owned(h);
  if (s == nullptr) return SlotResult::kStaleHandle;
  const int stage = stage_of(load_timeline(*s));
  const std::uint16_t prefill = s->prefill.load(std::memory_order_relaxed);
  const std::uint16_t decode = s->decode.load(std::memory_order_relaxed);
  const std::uint32_t odd = begin_write(*s, h.generation);
  OwnerRow* row = row_of(*s, h.owner_pid);
  apply_gauges(row, stage, prefill, decode, -1);
  if (row != nullptr) row->slots.fetch_sub(1, std::memory_order_relaxed);
  end_write(*s, h.generation, odd);
  std::uint64_t c = make_ctrl(kStateInUse, h.generation, h.owner_pid);
  if (!s->ctrl.compare_exchange_strong(c, make_ctrl(kStateFree, h.generation + 1, 0),
                                       std::memory_order_acq_rel)) {
    return SlotResult::kStaleHandle;
  }
  return SlotResult::kOk;
}

std::optional<SlotSnapshot> SharedState::read(const SlotHandle& h) const noexcept {
  if (owned(h) == nullptr) return std::nullopt;
  SlotSnapshot out;
  if (read_index(h.index, &out) != SlotRead::kConsistent || !(out.handle == h)) {
    return std::nullopt;
  }
  return out;
}

SlotRead SharedState::read_index(std::uint32_t index, SlotSnapshot* out) const noexcept {
  if (index >= max_slots_) return SlotRead::kFree;
  const Slot& s = slots_[index];
  for (int attempt = 0; attempt < 8; ++attempt) {
    const std::uint64_t c1 = s.ctrl.load(std::memory_order_acquire);
    if (ctrl_state(c1) != kStateInUse) return SlotRead::kFree;
    const std::uint64_t q1 = s.seq.load(std::memory_order_acquire);
    if ((q1 & 1u) != 0 || (q1 >> 32) != ctrl_gen(c1)) continue;
    SlotSnapshot snap;
    snap.handle = SlotHandle{index, ctrl_gen(c1), ctrl_pid(c1)};
    const Timeline::Stamps stamps = load_stamps(s);
    const std::uint16_t mask = s.skipped_mask.load(std::memory_order_relaxed);
    snap.first_token_ns = s.first_token_ns.load(std::memory_order_relaxed);
    snap.request_id = s.request_id.load(std::memory_order_relaxed);
    snap.prompt_tokens = s.prompt_tokens.load(std::memory_order_relaxed);
    snap.cached_tokens = s.cached_tokens.load(std::memory_order_relaxed);
    snap.output_tokens = s.output_tokens.load(std::memory_order_relaxed);
    snap.prefill = s.prefill.load(std::memory_order_relaxed);
    snap.decode = s.decode.load(std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_acquire);
    if (s.seq.load(std::memory_order_relaxed) != q1 ||
        s.ctrl.load(std::memory_order_relaxed) != c1) {
      continue;
    }
    const std::optional<Timeline> t = Timeline::from_raw(stamps, mask);
    if (!t) return SlotRead::kTorn;  // consistent but malformed: not something a writer makes
    snap.timeline = *t;
    if (out != nullptr) *out = snap;
    return SlotRead::kConsistent;
  }
  return SlotRead::kTorn;
}

std::size_t SharedState::reclaim_dead(const std::function<bool(std::int32_t)>& is_alive) {
  // One predicate call per distinct pid; there are few (one per worker).
  std::vector<std::pair<std::int32_t, bool>> known;
  auto alive = [&](std::int32_t pid) {
    for (const auto& [p, a] : known) {
      if (p == pid) return a;
    }
    const bool a = is_alive(pid);
    known.emplace_back(pid, a);
    return a;
  };
  std::size_t freed = 0;
  for (std::uint32_t i = 0; i < max_slots_; ++i) {
    Slot& s = slots_[i];
    std::uint64_t c = s.ctrl.load(std::memory_order_acquire);
    if (ctrl_state(c) != kStateInUse || alive(ctrl_pid(c))) continue;
    // The owner is gone, so nobody else writes this slot; its fields need no reset (the next
    // owner initialises them) and only one reclaimer's CAS succeeds.
    if (s.ctrl.compare_exchange_strong(c, make_ctrl(kStateFree, ctrl_gen(c) + 1, 0),
                                       std::memory_order_acq_rel)) {
      ++freed;
    }
  }
  const auto self = static_cast<std::uint32_t>(::getpid());
  for (std::uint32_t o = 0; o < max_owners_; ++o) {
    std::uint64_t w = owners_[o].word.load(std::memory_order_acquire);
    const auto pid = static_cast<std::int32_t>(static_cast<std::uint32_t>(w));
    const auto reclaimer = static_cast<std::uint32_t>(w >> 32);
    if (pid == 0 || alive(pid)) continue;
    // Another live process (or thread of ours) is zeroing this row: leave it to it.
    if (reclaimer != 0 && (reclaimer == self || alive(static_cast<std::int32_t>(reclaimer)))) {
      continue;
    }
    const std::uint64_t mine =
        (static_cast<std::uint64_t>(self) << 32) | static_cast<std::uint32_t>(pid);
    if (!owners_[o].word.compare_exchange_strong(w, mine, std::memory_order_acq_rel)) continue;
    zero_owner(o);
    owners_[o].word.store(0, std::memory_order_release);
  }
  root_->reclaimed_total.fetch_add(freed, std::memory_order_relaxed);
  return freed;
}

// ---------------------------------------------------------------------------------------------
// Counters and reads
// ---------------------------------------------------------------------------------------------

bool SharedState::count_error(std::uint16_t backend) noexcept {
  if (backend >= backend_count_) return false;
  backends_[backend].errors_total.fetch_add(1, std::memory_order_relaxed);
  return true;
}

bool SharedState::count_retry(std::uint16_t backend) noexcept {
  if (backend >= backend_count_) return false;
  backends_[backend].retries_total.fetch_add(1, std::memory_order_relaxed);
  return true;
}

std::uint32_t SharedState::slots_used() const noexcept {
  std::int64_t n = 0;
  for (std::uint32_t o = 0; o < max_owners_; ++o) {
    n += owners_[o].slots.load(std::memory_order_relaxed);
  }
  return static_cast<std::uint32_t>(std::clamp<std::int64_t>(n, 0, max_slots_));
}

std::int64_t SharedState::requests_in_stage(Stage s) const noexcept {
  const std::size_t i = stage_index(s);
  if (i >= kStageCount) return 0;
  std::int64_t n = 0;
  for (std::uint32_t o = 0; o < max_owners_; ++o) {
    n += owners_[o].in_stage[i].load(std::memory_order_relaxed);
  }
  return clamp_gauge(n);
}

std::optional<std::uint16_t> SharedState::find_backend(std::string_view name) const noexcept {
  for (std::uint16_t i = 0; i < backend_count_; ++i) {
    if (std::string_view(backends_[i].name, strnlen(backends_[i].name, sizeof backends_[i].name)) ==
        name) {
      return i;
    }
  }
  return std::nullopt;
}

std::uint32_t SharedState::owner_rows_used() const noexcept {
  return std::min(max_owners_, root_->owner_rows_used.load(std::memory_order_acquire));
}

namespace {
// A gauge sharded per owner (a backend's GaugeCells, a limit group's GroupCells): the sum of
// one field over every owner row.
template <class Cell>
std::int64_t sum_cells(const Cell* row, std::uint32_t owners,
                       std::atomic<std::int32_t> Cell::*field) noexcept {
  std::int64_t n = 0;
  for (std::uint32_t o = 0; o < owners; ++o) {
    n += (row[o].*field).load(std::memory_order_relaxed);
  }
  return clamp_gauge(n);
}
}  // namespace

std::int64_t SharedState::backend_outstanding(std::uint16_t backend) const noexcept {
  if (backend >= backend_count_) return 0;
  return sum_cells(cells_ + std::size_t{backend} * max_owners_, owner_rows_used(),
                   &GaugeCell::outstanding);
}

std::int64_t SharedState::backend_active_streams(std::uint16_t backend) const noexcept {
  if (backend >= backend_count_) return 0;
  return sum_cells(cells_ + std::size_t{backend} * max_owners_, owner_rows_used(),
                   &GaugeCell::streams);
}

std::optional<BackendStats> SharedState::backend_stats(std::uint16_t backend) const {
  if (backend >= backend_count_) return std::nullopt;
  const BackendBlock& b = backends_[backend];
  BackendStats st;
  st.name = bounded_string(b.name, sizeof b.name);
  st.pool = bounded_string(b.pool, sizeof b.pool);
  st.outstanding = backend_outstanding(backend);
  st.active_streams = backend_active_streams(backend);
  st.requests_total = b.requests_total.load(std::memory_order_relaxed);
  st.errors_total = b.errors_total.load(std::memory_order_relaxed);
  st.retries_total = b.retries_total.load(std::memory_order_relaxed);
  return st;
}

HistogramSnapshot SharedState::histogram(std::size_t which) const {
  const Bounds b = bounds_of(which);
  const Histogram& h = hists_[which];
  HistogramSnapshot snap;
  snap.upper_bounds_s.reserve(b.n);
  snap.counts.reserve(b.n);
  for (std::size_t i = 0; i < b.n; ++i) {
    snap.upper_bounds_s.push_back(static_cast<double>(b.ns[i]) / 1e9);
    snap.counts.push_back(h.counts[i].load(std::memory_order_relaxed));
  }
  snap.overflow = h.counts[b.n].load(std::memory_order_relaxed);
  snap.sum_s = static_cast<double>(h.sum_ns.load(std::memory_order_relaxed)) / 1e9;
  return snap;
}

HistogramSnapshot SharedState::stage_histogram(Stage s) const {
  const std::size_t i = stage_index(s);
  if (i >= kStageHists) return {};
  return histogram(i);
}
HistogramSnapshot SharedState::request_duration_histogram() const {
  return histogram(kRequestHist);
}
HistogramSnapshot SharedState::ttft_histogram() const {
  return histogram(kTtftHist);
}
HistogramSnapshot SharedState::tpot_histogram() const {
  return histogram(kTpotHist);
}

std::uint64_t SharedState::acquire_failures_total() const noexcept {
  return root_->acquire_full_total.load(std::memory_order_relaxed) +
         root_->acquire_no_owner_total.load(std::memory_order_relaxed);
}

std::uint64_t SharedState::reclaimed_total() const noexcept {
  return root_->reclaimed_total.load(std::memory_order_relaxed);
}

void SharedState::count_tokenized(std::uint64_t tokens, std::uint64_t wall_ns,
                                  std::uint64_t cpu_ns, std::uint8_t reason) noexcept {
  root_->tokenized_total.fetch_add(1, std::memory_order_relaxed);
  root_->tokenized_tokens_total.fetch_add(tokens, std::memory_order_relaxed);
  root_->tokenize_wall_ns_total.fetch_add(wall_ns, std::memory_order_relaxed);
  root_->tokenize_cpu_ns_total.fetch_add(cpu_ns, std::memory_order_relaxed);
  if (reason < kForwardReasons) {
    root_->forward_total[reason].fetch_add(1, std::memory_order_relaxed);
  }
}

void SharedState::count_tokenize_error() noexcept {
  root_->tokenize_errors_total.fetch_add(1, std::memory_order_relaxed);
}

TokenizerStats SharedState::tokenizer_stats() const noexcept {
  TokenizerStats t;
  t.requests = root_->tokenized_total.load(std::memory_order_relaxed);
  t.tokens = root_->tokenized_tokens_total.load(std::memory_order_relaxed);
  t.wall_ns = root_->tokenize_wall_ns_total.load(std::memory_order_relaxed);
  t.cpu_ns = root_->tokenize_cpu_ns_total.load(std::memory_order_relaxed);
  t.errors = root_->tokenize_errors_total.load(std::memory_order_relaxed);
  for (std::size_t i = 0; i < kForwardReasons; ++i) {
    t.by_reason[i] = root_->forward_total[i].load(std::memory_order_relaxed);
  }
  return t;
}

std::vector<std::int32_t> SharedState::owners() const {
  std::vector<std::int32_t> pids;
  for (std::uint32_t o = 0; o < max_owners_; ++o) {
    const std::uint64_t w = owners_[o].word.load(std::memory_order_acquire);
    if (w != 0) pids.push_back(static_cast<std::int32_t>(static_cast<std::uint32_t>(w)));
  }
  return pids;
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

void SharedState::render_metrics(prom::TextWriter& w) const {
  auto d = [](auto v) { return static_cast<double>(v); };
  w.family("omni_proxy_inflight_slots_used", "gauge",
           "In-flight request slots held, over all workers.");
  w.sample("omni_proxy_inflight_slots_used", {}, d(slots_used()));
  w.family("omni_proxy_inflight_slots_capacity", "gauge",
           "In-flight request slots in the shared zone; requests beyond it get 503.");
  w.sample("omni_proxy_inflight_slots_capacity", {}, d(max_slots_));
  w.family("omni_proxy_slot_acquire_failures_total", "counter",
           "Requests refused a slot: all slots held (full) or the owner table full (owners).");
  w.sample("omni_proxy_slot_acquire_failures_total", {{"reason", "full"}},
           d(root_->acquire_full_total.load(std::memory_order_relaxed)));
  w.sample("omni_proxy_slot_acquire_failures_total", {{"reason", "owners"}},
           d(root_->acquire_no_owner_total.load(std::memory_order_relaxed)));
  w.family("omni_proxy_slots_reclaimed_total", "counter",
           "Slots freed because the worker holding them died.");
  w.sample("omni_proxy_slots_reclaimed_total", {}, d(reclaimed_total()));

  const TokenizerStats tok = tokenizer_stats();
  w.family("omni_proxy_tokenized_requests_total", "counter",
           "Requests the proxy rendered and tokenized (omni_proxy_tokenizer).");
  w.sample("omni_proxy_tokenized_requests_total", {}, d(tok.requests));
  w.family("omni_proxy_tokenized_prompt_tokens_total", "counter",
           "Prompt tokens the proxy produced or was sent as ids.");
  w.sample("omni_proxy_tokenized_prompt_tokens_total", {}, d(tok.tokens));
  w.family("omni_proxy_tokenize_seconds_total", "counter",
           "Wall time spent rendering and tokenizing in the thread pool.");
  w.sample("omni_proxy_tokenize_seconds_total", {}, d(tok.wall_ns) / 1e9);
  w.family("omni_proxy_tokenize_cpu_seconds_total", "counter",
           "CPU time of the thread-pool threads spent rendering and tokenizing.");
  w.sample("omni_proxy_tokenize_cpu_seconds_total", {}, d(tok.cpu_ns) / 1e9);
  w.family("omni_proxy_tokenize_errors_total", "counter",
           "Requests refused while tokenizing (a template's raise_exception, bad input).");
  w.sample("omni_proxy_tokenize_errors_total", {}, d(tok.errors));
  w.family("omni_proxy_token_forwarding_total", "counter",
           "Tokenized requests by how their prompt reached the engines: forwarded as token ids, "
           "or passed through as text and why.");
  for (std::size_t i = 0; i < static_cast<std::size_t>(ForwardReason::kCount); ++i) {
    w.sample("omni_proxy_token_forwarding_total",
             {{"result", std::string(forward_reason_name(static_cast<ForwardReason>(i)))}},
             d(tok.by_reason[i]));
  }

  w.family("omni_proxy_requests_in_stage", "gauge", "Requests currently in each lifecycle stage.");
  for (std::size_t i = 0; i < kStageCount; ++i) {
    const Stage s = static_cast<Stage>(i);
    w.sample("omni_proxy_requests_in_stage", {{"stage", std::string(stage_name(s))}},
             d(requests_in_stage(s)));
  }
  auto hist = [&w](std::string_view name, const prom::Labels& labels, const HistogramSnapshot& h) {
    w.histogram(name, labels, h.upper_bounds_s, h.counts, h.overflow, h.sum_s);
  };
  w.family("omni_proxy_stage_duration_seconds", "histogram",
           "Time from entering a lifecycle stage to entering the next (skipped stages are not "
           "observed).");
  for (std::size_t i = 0; i < kStageHists; ++i) {
    hist("omni_proxy_stage_duration_seconds",
         {{"stage", std::string(stage_name(static_cast<Stage>(i)))}}, histogram(i));
  }
  w.family("omni_proxy_request_duration_seconds", "histogram",
           "Time from received to done, for requests that reached done.");
  hist("omni_proxy_request_duration_seconds", {}, histogram(kRequestHist));
  w.family("omni_proxy_ttft_seconds", "histogram", "Time from received to the first token.");
  hist("omni_proxy_ttft_seconds", {}, histogram(kTtftHist));
  w.family("omni_proxy_tpot_seconds", "histogram",
           "Time per output token after the first, per request.");
  hist("omni_proxy_tpot_seconds", {}, histogram(kTpotHist));

  struct Family {
    const char* name;
    const char* type;
    const char* help;
  };
  static constexpr Family kBackendFamilies[] = {
      {"omni_proxy_backend_outstanding", "gauge",
       "Requests assigned to the backend and not finished with it (prefill: until the prefill "
       "leg ends; decode: until done)."},
      {"omni_proxy_backend_active_streams", "gauge", "Requests decoding on the backend."},
      {"omni_proxy_backend_requests_total", "counter", "Requests assigned to the backend."},
      {"omni_proxy_backend_errors_total", "counter", "Failed requests to the backend."},
      {"omni_proxy_backend_retries_total", "counter", "Requests retried away from the backend."},
  };
  std::vector<BackendStats> stats;
  stats.reserve(backend_count_);
  for (std::uint16_t b = 0; b < backend_count_; ++b) stats.push_back(*backend_stats(b));
  for (std::size_t f = 0; f < std::size(kBackendFamilies); ++f) {
    w.family(kBackendFamilies[f].name, kBackendFamilies[f].type, kBackendFamilies[f].help);
    for (const BackendStats& st : stats) {
      const double v = f == 0   ? d(st.outstanding)
                       : f == 1 ? d(st.active_streams)
                       : f == 2 ? d(st.requests_total)
                       : f == 3 ? d(st.errors_total)
                                : d(st.retries_total);
      w.sample(kBackendFamilies[f].name, {{"pool", st.pool}, {"backend", st.name}}, v);
    }
  }

  // Engine load as last polled: only backends polled at least once have samples.
  static constexpr Family kEngineFamilies[] = {
      {"omni_proxy_backend_engine_running", "gauge",
       "Requests running in the engine at the last /metrics poll."},
      {"omni_proxy_backend_engine_waiting", "gauge",
       "Requests waiting in the engine at the last /metrics poll."},
      {"omni_proxy_backend_engine_kv_usage", "gauge",
       "KV-cache usage (0-1) the engine reported at the last /metrics poll."},
      {"omni_proxy_backend_metrics_polled_seconds", "gauge",
       "Monotonic time of the last successful /metrics poll, in seconds."},
  };
  std::vector<std::optional<EngineLoadSample>> loads;
  for (std::uint16_t b = 0; b < backend_count_; ++b) loads.push_back(engine_load(b));
  for (std::size_t f = 0; f < std::size(kEngineFamilies); ++f) {
    w.family(kEngineFamilies[f].name, kEngineFamilies[f].type, kEngineFamilies[f].help);
    for (std::uint16_t b = 0; b < backend_count_; ++b) {
      if (!loads[b]) continue;
      const EngineLoadSample& x = *loads[b];
      if (f == 2 && std::isnan(x.kv_usage)) continue;
      const double v = f == 0 ? d(x.running)
                       : f == 1 ? d(x.waiting)
                       : f == 2 ? x.kv_usage
                                : d(x.polled_ns) / 1e9;
      w.sample(kEngineFamilies[f].name, {{"pool", stats[b].pool}, {"backend", stats[b].name}}, v);
    }
  }
  w.family("omni_proxy_backend_poll_failures_total", "counter",
           "Polls of the backend's /metrics that failed (connect, timeout, status, parse).");
  for (std::uint16_t b = 0; b < backend_count_; ++b) {
    w.sample("omni_proxy_backend_poll_failures_total",
             {{"pool", stats[b].pool}, {"backend", stats[b].name}}, d(poll_failures_total(b)));
  }

  static constexpr Family kGroupFamilies[] = {
      {"omni_proxy_limit_inflight", "gauge", "Requests in flight under the limit group."},
      {"omni_proxy_limit_queued", "gauge", "Requests waiting in the limit group's queue."},
      {"omni_proxy_limit_admitted_total", "counter", "Requests admitted by the limit group."},
      {"omni_proxy_limit_queued_total", "counter", "Requests that had to wait in the queue."},
      {"omni_proxy_limit_rejected_total", "counter",
       "Requests refused because the queue was full (429)."},
      {"omni_proxy_limit_timed_out_total", "counter",
       "Requests that waited in the queue until its timeout (503)."},
  };
  std::vector<GroupStats> groups;
  for (std::uint16_t g = 0; g < group_count_; ++g) groups.push_back(*group_stats(g));
  for (std::size_t f = 0; f < std::size(kGroupFamilies); ++f) {
    w.family(kGroupFamilies[f].name, kGroupFamilies[f].type, kGroupFamilies[f].help);
    for (const GroupStats& g : groups) {
      const double v = f == 0   ? d(g.inflight)
                       : f == 1 ? d(g.queued)
                       : f == 2 ? d(g.admitted_total)
                       : f == 3 ? d(g.queued_total)
                       : f == 4 ? d(g.rejected_total)
                                : d(g.timed_out_total);
      w.sample(kGroupFamilies[f].name, {{"group", g.name}}, v);
    }
  }
}

nlohmann::json SharedState::render_status_json() const {
  nlohmann::json j;
  j["slots"] = {
      {"used", slots_used()},
      {"capacity", max_slots_},
      {"bytes_per_slot", sizeof(Slot)},
      {"acquire_failures_full", root_->acquire_full_total.load(std::memory_order_relaxed)},
      {"acquire_failures_owners", root_->acquire_no_owner_total.load(std::memory_order_relaxed)},
      {"reclaimed_total", reclaimed_total()},
  };
  {
    const TokenizerStats tok = tokenizer_stats();
    nlohmann::json by = nlohmann::json::object();
    for (std::size_t i = 0; i < static_cast<std::size_t>(ForwardReason::kCount); ++i) {
      by[std::string(forward_reason_name(static_cast<ForwardReason>(i)))] = tok.by_reason[i];
    }
    j["tokenizer"] = {{"requests", tok.requests},
                      {"prompt_tokens", tok.tokens},
                      {"seconds", static_cast<double>(tok.wall_ns) / 1e9},
                      {"cpu_seconds", static_cast<double>(tok.cpu_ns) / 1e9},
                      {"errors", tok.errors},
                      {"forwarding", std::move(by)}};
  }
  nlohmann::json stages = nlohmann::json::object();
  for (std::size_t i = 0; i < kStageCount; ++i) {
    const Stage s = static_cast<Stage>(i);
    stages[std::string(stage_name(s))] = requests_in_stage(s);
  }
  j["stages"] = std::move(stages);
  nlohmann::json backends = nlohmann::json::array();
  for (std::uint16_t b = 0; b < backend_count_; ++b) {
    const BackendStats st = *backend_stats(b);
    backends.push_back({{"index", b},
                        {"name", st.name},
                        {"pool", st.pool},
                        {"outstanding", st.outstanding},
                        {"active_streams", st.active_streams},
                        {"requests_total", st.requests_total},
                        {"errors_total", st.errors_total},
                        {"retries_total", st.retries_total}});
    nlohmann::json& row = backends.back();
    row["sent_since_poll"] = sent_since_poll(b);
    row["poll_failures_total"] = poll_failures_total(b);
    if (const std::uint16_t port = bootstrap_port(b); port != 0) row["bootstrap_port"] = port;
    if (const auto load = engine_load(b)) {
      nlohmann::json e = {{"running", load->running}, {"waiting", load->waiting},
                          {"polled_ns", load->polled_ns}};
      e["kv_usage"] = std::isnan(load->kv_usage) ? nlohmann::json(nullptr)
                                                 : nlohmann::json(load->kv_usage);
      if (load->waiting_uncached_tokens) {
        e["waiting_uncached_tokens"] = *load->waiting_uncached_tokens;
      }
      row["engine"] = std::move(e);
    } else {
      row["engine"] = nullptr;
    }
  }
  j["backends"] = std::move(backends);
  nlohmann::json limits = nlohmann::json::array();
  for (std::uint16_t g = 0; g < group_count_; ++g) {
    const GroupStats st = *group_stats(g);
    limits.push_back({{"group", st.name},
                      {"inflight", st.inflight},
                      {"queued", st.queued},
                      {"admitted_total", st.admitted_total},
                      {"queued_total", st.queued_total},
                      {"rejected_total", st.rejected_total},
                      {"timed_out_total", st.timed_out_total}});
  }
  j["limits"] = std::move(limits);
  nlohmann::json workers = nlohmann::json::array();
  for (std::uint32_t o = 0; o < max_owners_; ++o) {
    const std::uint64_t w = owners_[o].word.load(std::memory_order_acquire);
    if (w == 0) continue;
    workers.push_back({{"pid", static_cast<std::int32_t>(static_cast<std::uint32_t>(w))},
                       {"slots", owners_[o].slots.load(std::memory_order_relaxed)}});
  }
  j["workers"] = std::move(workers);
  return j;
}

// ---------------------------------------------------------------------------------------------
// Engine load
// ---------------------------------------------------------------------------------------------

bool SharedState::set_engine_load(std::uint16_t backend, const EngineLoadSample& x) noexcept {
  if (backend >= backend_count_ || x.polled_ns == 0) return false;
  BackendBlock& b = backends_[backend];
  b.running.store(x.running, std::memory_order_relaxed);
  b.waiting.store(x.waiting, std::memory_order_relaxed);
  b.kv_usage_bits.store(std::bit_cast<std::uint64_t>(x.kv_usage), std::memory_order_relaxed);
  b.waiting_uncached.store(x.waiting_uncached_tokens.value_or(kNoValue),
                           std::memory_order_relaxed);
  b.requests_at_poll.store(b.requests_total.load(std::memory_order_relaxed),
                           std::memory_order_relaxed);
  b.polled_ns.store(x.polled_ns, std::memory_order_release);
  return true;
}

bool SharedState::count_poll_failure(std::uint16_t backend) noexcept {
  if (backend >= backend_count_) return false;
  backends_[backend].poll_failures_total.fetch_add(1, std::memory_order_relaxed);
  return true;
}

std::optional<EngineLoadSample> SharedState::engine_load(std::uint16_t backend) const noexcept {
  if (backend >= backend_count_) return std::nullopt;
  const BackendBlock& b = backends_[backend];
  EngineLoadSample x;
  x.polled_ns = b.polled_ns.load(std::memory_order_acquire);
  if (x.polled_ns == 0) return std::nullopt;
  x.running = b.running.load(std::memory_order_relaxed);
  x.waiting = b.waiting.load(std::memory_order_relaxed);
  x.kv_usage = std::bit_cast<double>(b.kv_usage_bits.load(std::memory_order_relaxed));
  const std::uint64_t u = b.waiting_uncached.load(std::memory_order_relaxed);
  if (u != kNoValue) x.waiting_uncached_tokens = u;
  x.requests_at_poll = b.requests_at_poll.load(std::memory_order_relaxed);
  return x;
}

std::uint64_t SharedState::sent_since_poll(std::uint16_t backend) const noexcept {
  if (backend >= backend_count_) return 0;
  const BackendBlock& b = backends_[backend];
  const std::uint64_t now = b.requests_total.load(std::memory_order_relaxed);
  const std::uint64_t then = b.requests_at_poll.load(std::memory_order_relaxed);
  return now >= then ? now - then : 0;
}

std::uint64_t SharedState::poll_failures_total(std::uint16_t backend) const noexcept {
  if (backend >= backend_count_) return 0;
  return backends_[backend].poll_failures_total.load(std::memory_order_relaxed);
}

bool SharedState::set_bootstrap_port(std::uint16_t backend, std::uint16_t port) noexcept {
  if (backend >= backend_count_) return false;
  backends_[backend].bootstrap_port.store(port, std::memory_order_relaxed);
  return true;
}

std::uint16_t SharedState::bootstrap_port(std::uint16_t backend) const noexcept {
  if (backend >= backend_count_) return 0;
  return static_cast<std::uint16_t>(
      backends_[backend].bootstrap_port.load(std::memory_order_relaxed));
}

// ---------------------------------------------------------------------------------------------
// Limit groups
// ---------------------------------------------------------------------------------------------

Admission SharedState::admit(std::int32_t owner_pid, std::uint16_t group,
                             std::uint32_t max_inflight, std::uint32_t max_queue) noexcept {
  if (group >= group_count_ || owner_pid <= 0) return Admission::kRejected;
  const std::optional<std::uint32_t> owner = owner_row(owner_pid);
  if (!owner) return Admission::kRejected;
  GroupCell* row = group_cells_ + std::size_t{group} * max_owners_;
  GroupBlock& g = groups_[group];
  // Nobody may jump a non-empty queue.
  if ((max_inflight == 0 || group_inflight(group) < max_inflight) && group_queued(group) == 0) {
    row[*owner].inflight.fetch_add(1, std::memory_order_relaxed);
    g.admitted_total.fetch_add(1, std::memory_order_relaxed);
    return Admission::kAdmitted;
  }
  if (group_queued(group) < max_queue) {
    row[*owner].queued.fetch_add(1, std::memory_order_relaxed);
    g.queued_total.fetch_add(1, std::memory_order_relaxed);
    return Admission::kQueued;
  }
  g.rejected_total.fetch_add(1, std::memory_order_relaxed);
  return Admission::kRejected;
}

bool SharedState::promote(std::int32_t owner_pid, std::uint16_t group,
                          std::uint32_t max_inflight) noexcept {
  if (group >= group_count_) return false;
  const std::optional<std::uint32_t> owner = owner_row(owner_pid);
  if (!owner) return false;
  if (max_inflight != 0 && group_inflight(group) >= max_inflight) return false;
  GroupCell& c = group_cells_[std::size_t{group} * max_owners_ + *owner];
  c.inflight.fetch_add(1, std::memory_order_relaxed);
  c.queued.fetch_sub(1, std::memory_order_relaxed);
  groups_[group].admitted_total.fetch_add(1, std::memory_order_relaxed);
  return true;
}

void SharedState::unqueue(std::int32_t owner_pid, std::uint16_t group, bool timed_out) noexcept {
  if (group >= group_count_) return;
  const std::optional<std::uint32_t> owner = owner_row(owner_pid);
  if (!owner) return;
  group_cells_[std::size_t{group} * max_owners_ + *owner].queued.fetch_sub(
      1, std::memory_order_relaxed);
  if (timed_out) groups_[group].timed_out_total.fetch_add(1, std::memory_order_relaxed);
}

void SharedState::leave(std::int32_t owner_pid, std::uint16_t group) noexcept {
  if (group >= group_count_) return;
  const std::optional<std::uint32_t> owner = owner_row(owner_pid);
  if (!owner) return;
  group_cells_[std::size_t{group} * max_owners_ + *owner].inflight.fetch_sub(
      1, std::memory_order_relaxed);
}

std::int64_t SharedState::group_inflight(std::uint16_t group) const noexcept {
  if (group >= group_count_) return 0;
  return sum_cells(group_cells_ + std::size_t{group} * max_owners_, owner_rows_used(),
                   &GroupCell::inflight);
}

std::int64_t SharedState::group_queued(std::uint16_t group) const noexcept {
  if (group >= group_count_) return 0;
  return sum_cells(group_cells_ + std::size_t{group} * max_owners_, owner_rows_used(),
                   &GroupCell::queued);
}

std::vector<std::int32_t> SharedState::owners_queued(std::uint16_t group) const {
  std::vector<std::int32_t> pids;
  if (group >= group_count_) return pids;
  const GroupCell* row = group_cells_ + std::size_t{group} * max_owners_;
  const std::uint32_t used = owner_rows_used();
  for (std::uint32_t o = 0; o < used; ++o) {
    if (row[o].queued.load(std::memory_order_relaxed) <= 0) continue;
    const std::uint64_t w = owners_[o].word.load(std::memory_order_acquire);
    if (w != 0) pids.push_back(static_cast<std::int32_t>(static_cast<std::uint32_t>(w)));
  }
  return pids;
}

std::optional<GroupStats> SharedState::group_stats(std::uint16_t group) const {
  if (group >= group_count_) return std::nullopt;
  const GroupBlock& g = groups_[group];
  GroupStats st;
  st.name = bounded_string(g.name, sizeof g.name);
  st.inflight = group_inflight(group);
  st.queued = group_queued(group);
  st.admitted_total = g.admitted_total.load(std::memory_order_relaxed);
  st.queued_total = g.queued_total.load(std::memory_order_relaxed);
  st.rejected_total = g.rejected_total.load(std::memory_order_relaxed);
  st.timed_out_total = g.timed_out_total.load(std::memory_order_relaxed);
  return st;
}

bool pid_alive(std::int32_t pid) noexcept {
  if (pid <= 0) return false;
  return ::kill(pid, 0) == 0 || errno != ESRCH;
}

}  // namespace omni
