// Which prefix blocks each engine instance holds in its KV cache, in shared memory, and the
// function that applies the engines' KV events (kv_events.hpp) to it.
//
// Keys. The proxy names a block by its own chained key (block_keys(): hash_block64 from
// kRootBlockHash over full blocks of token ids, the keys PrefixTable uses with salt 0), whatever
// hash the engine uses; the engine names it by its own block hash (an int, or a raw digest:
// engine_key() folds it to 64 bits). A BlockStored event carries the blocks' tokens, so its
// proxy keys are computed from the parent's proxy key, which the index resolves from the
// parent's engine hash. So the keys are identical whatever the engine's hash algorithm.
//
// Layout: a header (64 bytes), then one region per instance: a header of 16 words (its write
// lock, recency clock, eviction hand, gauges and counters) and two tables of `sets` sets of
// kWays entries, sets = ceil(1.25 x blocks_per_instance / kWays) (a load factor of at most 0.8
// when full), each set its 8 keys side by side then their two value words (a probe reads 64
// contiguous bytes):
//  - reverse: engine key -> proxy key, and the block's recency stamp (BlockRemoved, parents);
//  - forward: proxy key -> reference count, and the XOR of the engine keys referring to it
//    (what match() reads).
// Each key may live in either of two sets (two-choice hashing: a new key goes to the emptier),
// so full sets are rare: filling an instance to its bound with random keys meets one for about
// 0.04% of the blocks (one set choice: 11%). A lookup probes the first set, then the second.
// required_bytes = 64 + instances x (128 + 48 x kWays x ceil(5 x blocks_per_instance / 32)):
// 60 bytes per block, fixed at creation. Everything is position independent (no pointers in the
// region), 8-byte aligned, and every shared word is a lock-free std::atomic<uint64_t>, so the
// region may be mapped at different addresses by several processes.
//
// Invariants (kept by every write): each reverse entry's proxy key has a forward entry whose
// count is the number of reverse entries holding that key (two engine keys may name one proxy
// key: the block stays matched until both are gone), and the `blocks` gauge is the number of
// reverse entries, never above the bound after a store (blocks = stored - removed - evicted
// since the last clear). A store over the bound evicts an approximately least recently stored
// block: the oldest of kSampleSets consecutive reverse sets, scanned from a hand that sweeps the
// table (exact LRU when the table has at most kSampleSets sets). Full candidate sets also evict:
// the oldest entry of both reverse sets, or, when both forward sets are full, the least recently
// stored block whose key no other engine key shares (when every key there is shared, the new
// block is not indexed). Every such drop is counted in `evicted`.
//
// Concurrency. Readers (match, contains, key_of, counters) never lock and never block: an entry
// is emptied (its key word zeroed) before it is rewritten, so a concurrent write makes a read
// miss or see a block just removed, never read out of bounds. Writers serialize per instance
// on a try-lock word holding the writer's pid: kSpins spins with a pause, then the write is
// skipped and counted in `contended` (clear() waits longer, kClearSpins, yielding). A lock whose
// holder no longer exists (kill(pid, 0) fails with ESRCH: the process died mid-write) is taken
// over, and since the dead writer may have left the instance half-updated, the instance is then
// cleared (counted in `clears`, last_seq reset to -1: its subscriber resynchronizes). kill() is
// only called when a lock stays busy past the spins. All processes must share a pid namespace
// (nginx workers do); an unreaped zombie counts as alive (nginx's master reaps its workers).
// Threads of one process writing the same instance exclude each other too (a lock held by a
// live pid is never taken over).
#pragma once

#include "omni/block_hash.hpp"
#include "omni/kv_events.hpp"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

namespace omni::kv {

// Proxy block keys: the chain of hash_block64 from kRootBlockHash over full blocks of `ids`
// (block i covers tokens [i*block_size, (i+1)*block_size)), with a key of 0 replaced by 1
// (0 marks an empty slot). At most max_blocks keys; none when block_size is 0. Identical to
// omni::prefix_keys_from_ids(ids, {.block_tokens = block_size, .max_blocks = max_blocks, .salt = 0}).blocks
// (each link is block_key() of the previous key; the two differ only if a raw hash is 0,
// probability 2^-64).
std::vector<std::uint64_t> block_keys(std::span<const TokenId> ids, std::size_t block_size,
                                      std::size_t max_blocks = SIZE_MAX);
// One link of that chain: the key of a block given its parent's key (kRootBlockHash for block 0).
std::uint64_t block_key(std::uint64_t parent_key, std::span<const TokenId> tokens) noexcept;
// The 64-bit name of an engine block hash: an int as is; a byte string as a 64-bit hash of its bytes
// (never 0).
std::uint64_t engine_key(const ExternalHash& hash) noexcept;

struct KvIndexShape {
  std::uint32_t instances = 0;            // instance ids 0..instances-1
  std::uint32_t blocks_per_instance = 0;  // the most blocks one instance may hold: the memory bound
};

// Per-instance state and counters, readable by any process.
struct InstanceCounters {
  std::uint64_t blocks = 0;       // gauge: blocks indexed now
  std::uint64_t bound = 0;        // gauge: effective bound (set_bound, at most blocks_per_instance)
  std::uint64_t stored = 0;       // blocks stored (new)
  std::uint64_t refreshed = 0;    // stores of an engine key already held (recency refreshed)
  std::uint64_t removed = 0;      // blocks removed by BlockRemoved / remove()
  std::uint64_t unknown_removed = 0;  // removals of engine keys not held
  std::uint64_t evicted = 0;      // blocks dropped to stay within the bound
  std::uint64_t clears = 0;       // clear() calls (AllBlocksCleared, engine restarts)
  std::uint64_t orphans = 0;      // stored blocks whose parent was unknown: not indexed
  std::uint64_t skipped = 0;      // events or blocks ignored (other medium, malformed shape)
  std::uint64_t contended = 0;    // writes skipped because another writer held the instance
  std::int64_t last_seq = -1;     // set_last_seq: last KV-event batch applied, -1 none
  std::uint32_t block_size = 0;   // set_block_size: the engine's block size, 0 unknown
};

class KvIndex {
 public:
  static constexpr std::size_t kWays = 8;         // entries per set
  static constexpr std::size_t kSampleSets = 4;   // sets scanned for an LRU victim
  static constexpr int kSpins = 64;               // lock attempts before a write is skipped
  static constexpr int kClearSpins = 4096;        // the same for clear() (yielding)

  static std::size_t required_bytes(const KvIndexShape& shape) noexcept;
  // Lays out a fresh, empty index in `region` (zeroing it). Null when the region is too small,
  // not 8-byte aligned, or the shape has 0 instances or 0 blocks.
  static std::unique_ptr<KvIndex> create(void* region, std::size_t bytes, const KvIndexShape& shape);
  // Opens an index another process created in this region. Null when it holds none (bad magic,
  // version, or size).
  static std::unique_ptr<KvIndex> attach(void* region, std::size_t bytes);

  std::uint32_t instances() const noexcept;
  std::uint32_t blocks_per_instance() const noexcept;
  // Entries per table of one instance (sets x kWays).
  std::uint64_t slots_per_instance() const noexcept;
  // The pid holding the instance's write lock, 0 when free (diagnostics).
  std::int32_t lock_holder(std::uint32_t instance) const noexcept;
  // Byte offset of the instance's lock word in the region (tests simulate a dead holder).
  std::size_t lock_offset(std::uint32_t instance) const noexcept;

  // ---- writers (any process) ----
  // The effective bound of an instance (e.g. the engine's num_gpu_blocks): min(blocks, blocks_per_instance);
  // 0 restores blocks_per_instance. Lowering it evicts down to it at the next store.
  void set_bound(std::uint32_t instance, std::uint64_t blocks) noexcept;
  void set_block_size(std::uint32_t instance, std::uint32_t block_size) noexcept;
  void set_last_seq(std::uint32_t instance, std::int64_t seq) noexcept;

  // Records that `instance` holds the block with proxy key `key`, named `engine_key` by the
  // engine. Storing an engine key already held refreshes its recency (and, if its key changed,
  // re-points it). Over the bound, the instance's least recently stored block is evicted
  // (approximately LRU is fine: e.g. the oldest of the set, set-associative). false when skipped
  // (contended, or instance out of range).
  bool store(std::uint32_t instance, std::uint64_t engine_key, std::uint64_t key) noexcept;
  // Approximate mode (no events): records a whole chain for `instance`, each key its own engine
  // key, refreshing recency of those already held. One lock acquisition for the chain. The
  // chain is recorded from its last key to its first, so its head is the most recent (evicted
  // last, as engines evict a sequence's tail blocks first).
  bool store_chain(std::uint32_t instance, std::span<const std::uint64_t> keys) noexcept;
  // A chain owned by one holder (e.g. one in-flight request), so that several holders of a
  // shared prefix each keep it matched until the last one removes its chain: key k is stored
  // under the engine key tagged_engine_key(k, tag) (tag != 0 per holder; tag 0 is store_chain).
  // Recorded from its last key to its first, as store_chain. One lock acquisition each.
  bool store_tagged_chain(std::uint32_t instance, std::span<const std::uint64_t> keys,
                          std::uint64_t tag) noexcept;
  // Drops that holder's chain (keys that were evicted meanwhile count in unknown_removed). false
  // when the write was contended (the chain stays until evicted).
  bool remove_tagged_chain(std::uint32_t instance, std::span<const std::uint64_t> keys,
                           std::uint64_t tag) noexcept;
  static constexpr std::uint64_t tagged_engine_key(std::uint64_t key, std::uint64_t tag) noexcept {
    return tag == 0 ? key : mix64(key ^ mix64(tag));
  }
  // The proxy key of an engine block the instance holds.
  std::optional<std::uint64_t> key_of(std::uint32_t instance, std::uint64_t engine_key) const noexcept;
  // Drops an engine block; false when it was not held (or the write was contended).
  bool remove(std::uint32_t instance, std::uint64_t engine_key) noexcept;
  // Drops every block of the instance (and resets last_seq to -1).
  void clear(std::uint32_t instance) noexcept;
  void count_orphans(std::uint32_t instance, std::uint64_t n) noexcept;
  void count_skipped(std::uint32_t instance, std::uint64_t n) noexcept;

  // ---- readers (lock-free, never block; a concurrent write may make a read miss or see a
  // just-removed block, never crash or read out of bounds) ----
  // How many leading keys of `keys` the instance holds: the index of the first key it lacks.
  std::size_t match(std::uint32_t instance, std::span<const std::uint64_t> keys) const noexcept;
  bool contains(std::uint32_t instance, std::uint64_t key) const noexcept;
  InstanceCounters counters(std::uint32_t instance) const noexcept;

  struct Layout;  // the region's header (kv_index.cpp)
 private:
  explicit KvIndex(Layout* layout) noexcept : layout_(layout) {}
  Layout* layout_;
};

// What applying one batch did.
struct ApplyResult {
  std::size_t stored = 0;     // blocks stored or refreshed
  std::size_t removed = 0;
  std::size_t orphans = 0;    // blocks not indexed because their chain's parent is unknown
  std::size_t skipped = 0;    // events/blocks ignored
  bool cleared = false;       // an AllBlocksCleared was applied
};
struct ApplyOptions {
  // Block size to split BlockStored.token_ids by; 0: the event's block_size field (then the
  // instance's set_block_size value).
  std::uint32_t block_size = 0;
  // Index blocks stored on another medium than GPU (e.g. "CPU" offload); default: only GPU or unset.
  // (With it, a block's copies on two media are one entry: removing either drops it.)
  bool other_media = false;
};
// Applies a decoded batch to one instance, in event order:
//  - BlockStored: the chain's parent proxy key is kRootBlockHash when parent_block_hash is null, else
//    key_of(instance, engine_key(parent)); a chain whose parent is unknown is an orphan (counted, not
//    indexed — never re-rooted: a chain that continues a cached prefix extends it, and a chain whose
//    start we never saw cannot be keyed). Block i's proxy key = block_key(previous key, its block_size tokens
//    of token_ids); it is stored under engine_key(block_hashes[i]). token_ids.size() must equal
//    block_hashes.size() * block_size (else the event is skipped and counted); a non-null lora_id
//    or lora_name makes the chain unindexable for now (skipped: the proxy's keys do not carry adapters).
//    The event's block_size (when non-zero) is recorded with set_block_size.
//  - BlockRemoved: remove() each hash (unknown ones counted in unknown_removed).
//  - AllBlocksCleared: clear().
// Counting: `skipped` counts whole events ignored (a BlockStored or BlockRemoved on another
// medium, with an adapter, or of a malformed shape), `orphans` counts blocks; a block whose store
// was contended is in neither `stored` nor `skipped` (the instance's `contended` has it). The
// event's block_size is recorded only for events that are indexed (GPU, no adapter, the right
// shape): an offload medium may use another block size.
ApplyResult apply_batch(KvIndex& index, std::uint32_t instance, const EventBatch& batch,
                        const ApplyOptions& options = {});

}  // namespace omni::kv
