// A paged KV cache with prefix caching, as vLLM's BlockPool keeps it.
//
// The pool has `num_blocks` blocks of `block_size` token slots. A request holds references on
// the blocks of its tokens. A block becomes *cached* once it is full and committed under the
// hash of its prefix; a cached block whose last reference is dropped stays cached and
// evictable, in least-recently-freed order, until its slot is needed. Allocation takes a
// never-cached free block first and evicts the least recently freed cached block after that.
//
// Every change to the set of cached blocks is recorded as a KV event (BlockStored,
// BlockRemoved, AllBlocksCleared), which the engine publishes once per step.
#pragma once

#include <omni/block_hash.hpp>
#include <omni/kv_events.hpp>

#include <cstdint>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

namespace omni::sim {

// The identity of a full block: a 64-bit key (the map key) and the hash as it is published.
struct BlockKey {
  BlockHash64 key = 0;
  kv::ExternalHash external;
};

class BlockPool {
 public:
  static constexpr std::uint32_t kNone = UINT32_MAX;

  BlockPool(std::uint32_t num_blocks, std::uint32_t block_size);

  std::uint32_t num_blocks() const noexcept { return static_cast<std::uint32_t>(ref_.size()); }
  std::uint32_t block_size() const noexcept { return block_size_; }
  // Blocks that an allocation can take: never-cached free ones plus evictable cached ones.
  std::uint32_t num_free() const noexcept { return num_free_; }
  std::uint32_t num_cached() const noexcept { return static_cast<std::uint32_t>(cached_.size()); }
  // Fraction of blocks referenced by requests, vLLM's kv_cache_usage_perc.
  double usage() const noexcept;

  // How many leading blocks of `keys` are cached.
  std::uint32_t match_prefix(std::span<const BlockKey> keys) const;
  // How many of the (cached) blocks of `keys` no request references: acquiring them takes
  // them off the free count, so an admission must count them against num_free().
  std::uint32_t num_evictable(std::span<const BlockKey> keys) const;
  // Takes a reference on each of the first `n` cached blocks of `keys` (n <= match_prefix)
  // and appends their ids to `out`.
  void acquire_cached(std::span<const BlockKey> keys, std::uint32_t n,
                      std::vector<std::uint32_t>& out);
  // Takes one more reference on each of `ids`, blocks a request references already (a fork
  // sharing its parent's prompt), and appends them to `out`.
  void share(std::span<const std::uint32_t> ids, std::vector<std::uint32_t>& out);
  // Appends `n` newly allocated blocks to `out`, or returns false (and changes nothing) when
  // fewer than `n` are free.
  bool allocate(std::uint32_t n, std::vector<std::uint32_t>& out);
  // Drops one reference on each block. Blocks are released in reverse, so a request's tail
  // blocks are evicted before its head.
  void release(std::span<const std::uint32_t> ids);
  // Caches full block `id` under `key`. `parent` is the hash of the previous block of the
  // same sequence (none for block 0) and `tokens` its contents. Returns false when another
  // block already caches `key` (this one then stays uncached).
  bool commit(std::uint32_t id, const BlockKey& key, const std::optional<kv::ExternalHash>& parent,
              std::span<const TokenId> tokens);
  bool is_cached(std::uint32_t id) const noexcept { return hash_of_[id].has_value(); }
  std::uint32_t ref_count(std::uint32_t id) const noexcept { return ref_[id]; }
  // Forgets every cached block that no request references (a cache reset).
  void clear_cache();

  // KV events recorded since the last call, in order.
  std::vector<kv::Event> take_events();

 private:
  void lru_remove(std::uint32_t id) noexcept;
  void lru_push_back(std::uint32_t id) noexcept;
  void uncache(std::uint32_t id);

  std::uint32_t block_size_;
  std::vector<std::uint32_t> ref_;
  std::vector<std::optional<BlockKey>> hash_of_;
  std::unordered_map<BlockHash64, std::uint32_t> cached_;  // key -> block id
  std::vector<std::uint32_t> free_never_cached_;            // a stack
  // Evictable cached blocks, least recently freed first: an intrusive doubly linked list.
  std::vector<std::uint32_t> prev_, next_;
  std::uint32_t lru_head_ = kNone, lru_tail_ = kNone;
  std::uint32_t num_free_ = 0;
  std::vector<kv::Event> events_;
};

}  // namespace omni::sim
