#include "block_pool.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <set>
#include <stdexcept>
#include <variant>
#include <vector>

namespace omni::sim {
namespace {

constexpr std::uint32_t kBs = 2;

BlockKey key(std::uint64_t k) {
  return BlockKey{k, kv::ExternalHash::from_int(k)};
}

std::vector<TokenId> toks(TokenId a) {
  return {a, a + 1};
}

// Commits block `id` under key `k` with no parent.
void commit_root(BlockPool& pool, std::uint32_t id, std::uint64_t k) {
  ASSERT_TRUE(pool.commit(id, key(k), std::nullopt, toks(static_cast<TokenId>(k))));
}

// The hashes of the BlockRemoved events among `events` (all of them, in order).
std::vector<std::uint64_t> removed(const std::vector<kv::Event>& events) {
  std::vector<std::uint64_t> out;
  for (const auto& e : events) {
    if (const auto* r = std::get_if<kv::BlockRemoved>(&e)) {
      for (const auto& h : r->block_hashes) out.push_back(h.as_int());
    }
  }
  return out;
}

std::uint32_t alloc1(BlockPool& pool) {
  std::vector<std::uint32_t> ids;
  EXPECT_TRUE(pool.allocate(1, ids));
  return ids.empty() ? BlockPool::kNone : ids[0];
}

TEST(BlockPool, FreshPool) {
  BlockPool pool(8, 16);
  EXPECT_EQ(pool.num_blocks(), 8u);
  EXPECT_EQ(pool.block_size(), 16u);
  EXPECT_EQ(pool.num_free(), 8u);
  EXPECT_EQ(pool.num_cached(), 0u);
  EXPECT_EQ(pool.usage(), 0.0);
  EXPECT_TRUE(pool.take_events().empty());
  EXPECT_THROW(BlockPool(0, 16), std::invalid_argument);
  EXPECT_THROW(BlockPool(8, 0), std::invalid_argument);
}

TEST(BlockPool, AllocateAndReleaseAccounting) {
  struct Step {
    int allocate;  // >0: allocate this many into a new request; <0: release request #-n-1
    std::uint32_t free_after;
    double usage_after;
  };
  // 8 blocks.
  const std::vector<Step> steps = {
      {3, 5, 3.0 / 8},  {4, 1, 7.0 / 8}, {1, 0, 1.0},      {-1, 3, 5.0 / 8},
      {-3, 4, 4.0 / 8}, {2, 2, 6.0 / 8}, {-2, 6, 2.0 / 8}, {-4, 8, 0.0},
  };
  BlockPool pool(8, kBs);
  std::vector<std::vector<std::uint32_t>> held;
  for (const auto& s : steps) {
    if (s.allocate > 0) {
      held.emplace_back();
      ASSERT_TRUE(pool.allocate(static_cast<std::uint32_t>(s.allocate), held.back()));
      EXPECT_EQ(held.back().size(), static_cast<std::size_t>(s.allocate));
      for (auto id : held.back()) EXPECT_EQ(pool.ref_count(id), 1u);
    } else {
      auto& ids = held.at(static_cast<std::size_t>(-s.allocate - 1));
      pool.release(ids);
      for (auto id : ids) EXPECT_EQ(pool.ref_count(id), 0u);
      ids.clear();
    }
    EXPECT_EQ(pool.num_free(), s.free_after);
    EXPECT_DOUBLE_EQ(pool.usage(), s.usage_after);
  }
  EXPECT_TRUE(pool.take_events().empty());  // nothing was ever cached
}

TEST(BlockPool, AllocatedIdsAreDistinct) {
  BlockPool pool(16, kBs);
  std::vector<std::uint32_t> ids;
  ASSERT_TRUE(pool.allocate(10, ids));
  ASSERT_TRUE(pool.allocate(6, ids));
  std::set<std::uint32_t> unique(ids.begin(), ids.end());
  EXPECT_EQ(unique.size(), 16u);
  for (auto id : ids) EXPECT_LT(id, 16u);
}

TEST(BlockPool, AllocateFailsAtomically) {
  BlockPool pool(4, kBs);
  std::vector<std::uint32_t> a;
  ASSERT_TRUE(pool.allocate(3, a));
  std::vector<std::uint32_t> b = {777};  // existing content must survive
  EXPECT_FALSE(pool.allocate(2, b));
  EXPECT_EQ(b, std::vector<std::uint32_t>{777});
  EXPECT_EQ(pool.num_free(), 1u);
  EXPECT_TRUE(pool.allocate(1, b));
  EXPECT_EQ(pool.num_free(), 0u);
  EXPECT_FALSE(pool.allocate(1, b));
  EXPECT_TRUE(pool.allocate(0, b));  // nothing asked, nothing needed
}

TEST(BlockPool, AllocateFailureDoesNotEvict) {
  BlockPool pool(2, kBs);
  std::vector<std::uint32_t> ids;
  ASSERT_TRUE(pool.allocate(2, ids));
  commit_root(pool, ids[0], 100);
  pool.release(std::vector<std::uint32_t>{ids[0]});
  (void)pool.take_events();
  std::vector<std::uint32_t> more;
  EXPECT_FALSE(pool.allocate(2, more));
  EXPECT_TRUE(pool.take_events().empty());
  EXPECT_EQ(pool.num_cached(), 1u);
  EXPECT_TRUE(pool.is_cached(ids[0]));
}

TEST(BlockPool, ShareAddsReferencesToReferencedBlocks) {
  BlockPool pool(4, kBs);
  std::vector<std::uint32_t> parent, fork;
  ASSERT_TRUE(pool.allocate(2, parent));
  commit_root(pool, parent[0], 7);
  pool.share(parent, fork);
  EXPECT_EQ(fork, parent);
  for (auto id : parent) EXPECT_EQ(pool.ref_count(id), 2u);
  EXPECT_EQ(pool.num_free(), 2u) << "shared blocks are used once";
  pool.release(parent);
  EXPECT_EQ(pool.num_free(), 2u) << "the fork still holds them";
  for (auto id : fork) EXPECT_EQ(pool.ref_count(id), 1u);
  pool.release(fork);
  EXPECT_EQ(pool.num_free(), 4u);
  EXPECT_EQ(pool.num_cached(), 1u);
  // Only blocks someone references can be shared; nothing changes otherwise.
  std::vector<std::uint32_t> out;
  EXPECT_THROW(pool.share(fork, out), std::logic_error);
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(pool.num_free(), 4u);
}

TEST(BlockPool, CommitAndMatchPrefix) {
  BlockPool pool(8, kBs);
  std::vector<std::uint32_t> ids;
  ASSERT_TRUE(pool.allocate(3, ids));
  ASSERT_TRUE(pool.commit(ids[0], key(10), std::nullopt, toks(1)));
  ASSERT_TRUE(pool.commit(ids[1], key(11), key(10).external, toks(3)));
  ASSERT_TRUE(pool.commit(ids[2], key(12), key(11).external, toks(5)));
  EXPECT_EQ(pool.num_cached(), 3u);
  for (auto id : ids) EXPECT_TRUE(pool.is_cached(id));

  struct Case {
    std::vector<std::uint64_t> keys;
    std::uint32_t expected;
  };
  const std::vector<Case> cases = {
      {{}, 0},           {{10}, 1}, {{10, 11}, 2}, {{10, 11, 12}, 3}, {{10, 11, 12, 13}, 3},
      {{10, 99, 12}, 1}, {{99}, 0}, {{11, 12}, 2},
  };
  for (const auto& c : cases) {
    std::vector<BlockKey> keys;
    for (auto k : c.keys) keys.push_back(key(k));
    EXPECT_EQ(pool.match_prefix(keys), c.expected) << "keys[0..]=" << keys.size();
  }
  // Cached blocks stay matchable after release (evictable, not forgotten).
  pool.release(ids);
  const std::vector<BlockKey> all = {key(10), key(11), key(12)};
  EXPECT_EQ(pool.match_prefix(all), 3u);
  EXPECT_EQ(pool.num_free(), 8u);
}

TEST(BlockPool, DuplicateKeyCommitLeavesBlockUncached) {
  BlockPool pool(4, kBs);
  std::vector<std::uint32_t> ids;
  ASSERT_TRUE(pool.allocate(2, ids));
  EXPECT_TRUE(pool.commit(ids[0], key(5), std::nullopt, toks(1)));
  EXPECT_FALSE(pool.commit(ids[1], key(5), std::nullopt, toks(1)));
  EXPECT_TRUE(pool.is_cached(ids[0]));
  EXPECT_FALSE(pool.is_cached(ids[1]));
  EXPECT_EQ(pool.num_cached(), 1u);
  // Only one BlockStored for the key.
  const auto events = pool.take_events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(std::get<kv::BlockStored>(events[0]).block_hashes.size(), 1u);
  // Released, the duplicate is a plain free block: taking it evicts nothing.
  pool.release(std::vector<std::uint32_t>{ids[1]});
  pool.release(std::vector<std::uint32_t>{ids[0]});
  std::vector<std::uint32_t> again;
  ASSERT_TRUE(pool.allocate(3, again));  // 2 never used + the duplicate
  EXPECT_TRUE(pool.take_events().empty());
  EXPECT_TRUE(pool.is_cached(ids[0]));
  const std::vector<BlockKey> k5 = {key(5)};
  EXPECT_EQ(pool.match_prefix(k5), 1u);
}

TEST(BlockPool, EvictsLeastRecentlyFreedFirst) {
  // 4 blocks, each cached under its own key, released in the order 3rd, 1st, 4th, 2nd.
  BlockPool pool(4, kBs);
  std::vector<std::uint32_t> ids;
  for (int i = 0; i < 4; ++i) ids.push_back(alloc1(pool));
  for (std::uint32_t i = 0; i < 4; ++i) commit_root(pool, ids[i], 100 + i);
  for (std::uint32_t i : {2u, 0u, 3u, 1u}) pool.release(std::vector<std::uint32_t>{ids[i]});
  (void)pool.take_events();
  EXPECT_EQ(pool.num_free(), 4u);
  EXPECT_EQ(pool.num_cached(), 4u);

  // Given the release order, each single-block allocation evicts the next key in it.
  const std::vector<std::pair<std::uint32_t, std::uint64_t>> expected = {
      {ids[2], 102}, {ids[0], 100}, {ids[3], 103}, {ids[1], 101}};
  for (const auto& [id, k] : expected) {
    EXPECT_EQ(alloc1(pool), id);
    EXPECT_EQ(removed(pool.take_events()), std::vector<std::uint64_t>{k});
    EXPECT_FALSE(pool.is_cached(id));
  }
  EXPECT_EQ(pool.num_cached(), 0u);
  EXPECT_EQ(pool.num_free(), 0u);
}

TEST(BlockPool, ReleaseIsReverseSoTailBlocksAreEvictedFirst) {
  BlockPool pool(3, kBs);
  std::vector<std::uint32_t> ids;
  ASSERT_TRUE(pool.allocate(3, ids));
  ASSERT_TRUE(pool.commit(ids[0], key(1), std::nullopt, toks(0)));
  ASSERT_TRUE(pool.commit(ids[1], key(2), key(1).external, toks(2)));
  ASSERT_TRUE(pool.commit(ids[2], key(3), key(2).external, toks(4)));
  pool.release(ids);
  (void)pool.take_events();
  EXPECT_EQ(alloc1(pool), ids[2]);
  EXPECT_EQ(removed(pool.take_events()), std::vector<std::uint64_t>{3});
  // The head of the chain is still matchable.
  const std::vector<BlockKey> chain = {key(1), key(2), key(3)};
  EXPECT_EQ(pool.match_prefix(chain), 2u);
  EXPECT_EQ(alloc1(pool), ids[1]);
  EXPECT_EQ(removed(pool.take_events()), std::vector<std::uint64_t>{2});
  EXPECT_EQ(pool.match_prefix(chain), 1u);
}

TEST(BlockPool, ConsecutiveEvictionsMergeIntoOneBlockRemoved) {
  BlockPool pool(3, kBs);
  std::vector<std::uint32_t> ids;
  ASSERT_TRUE(pool.allocate(3, ids));
  for (std::uint32_t i = 0; i < 3; ++i) commit_root(pool, ids[i], 50 + i);
  pool.release(ids);  // reverse: 52, 51, 50
  (void)pool.take_events();
  std::vector<std::uint32_t> out;
  ASSERT_TRUE(pool.allocate(3, out));
  const auto events = pool.take_events();
  ASSERT_EQ(events.size(), 1u);
  const auto& ev = std::get<kv::BlockRemoved>(events[0]);
  EXPECT_EQ(ev.medium, "GPU");
  EXPECT_EQ(removed(events), (std::vector<std::uint64_t>{52, 51, 50}));
}

TEST(BlockPool, AcquireCachedTakesBlocksOffTheEvictionList) {
  BlockPool pool(3, kBs);
  std::vector<std::uint32_t> ids;
  ASSERT_TRUE(pool.allocate(3, ids));
  for (std::uint32_t i = 0; i < 3; ++i) commit_root(pool, ids[i], 10 + i);
  // Release so that key 10's block is the least recently freed.
  pool.release(std::vector<std::uint32_t>{ids[0]});
  pool.release(std::vector<std::uint32_t>{ids[1]});
  pool.release(std::vector<std::uint32_t>{ids[2]});
  (void)pool.take_events();
  ASSERT_EQ(pool.num_free(), 3u);

  const std::vector<BlockKey> k10 = {key(10)};
  std::vector<std::uint32_t> got;
  pool.acquire_cached(k10, 1, got);
  EXPECT_EQ(got, std::vector<std::uint32_t>{ids[0]});
  EXPECT_EQ(pool.ref_count(ids[0]), 1u);
  EXPECT_EQ(pool.num_free(), 2u);
  // A second holder adds a reference, not another free-count change.
  pool.acquire_cached(k10, 1, got);
  EXPECT_EQ(pool.ref_count(ids[0]), 2u);
  EXPECT_EQ(pool.num_free(), 2u);

  std::vector<std::uint32_t> out;
  ASSERT_TRUE(pool.allocate(2, out));
  EXPECT_EQ(removed(pool.take_events()), (std::vector<std::uint64_t>{11, 12}));
  EXPECT_TRUE(pool.is_cached(ids[0]));
  EXPECT_FALSE(pool.allocate(1, out));

  // Dropping both references makes it evictable again.
  pool.release(std::vector<std::uint32_t>{ids[0], ids[0]});
  EXPECT_EQ(pool.num_free(), 1u);
  EXPECT_EQ(alloc1(pool), ids[0]);
  EXPECT_EQ(removed(pool.take_events()), std::vector<std::uint64_t>{10});
}

TEST(BlockPool, NumEvictableCountsUnreferencedCachedBlocks) {
  BlockPool pool(4, kBs);
  std::vector<std::uint32_t> ids;
  ASSERT_TRUE(pool.allocate(3, ids));
  for (std::uint32_t i = 0; i < 3; ++i) commit_root(pool, ids[i], 10 + i);
  pool.release(std::vector<std::uint32_t>{ids[1], ids[2]});  // 11, 12 evictable; 10 held
  struct Case {
    std::vector<std::uint64_t> keys;
    std::uint32_t expected;
  };
  const std::vector<Case> cases = {
      {{}, 0}, {{10}, 0}, {{11}, 1}, {{10, 11, 12}, 2}, {{12, 99}, 1}, {{99}, 0},
  };
  for (const auto& c : cases) {
    std::vector<BlockKey> keys;
    for (auto k : c.keys) keys.push_back(key(k));
    EXPECT_EQ(pool.num_evictable(keys), c.expected) << keys.size();
  }
  // Acquiring evictable blocks uses up exactly that many free blocks.
  const std::vector<BlockKey> chain = {key(10), key(11), key(12)};
  const std::uint32_t free_before = pool.num_free();
  std::vector<std::uint32_t> got;
  pool.acquire_cached(chain, 3, got);
  EXPECT_EQ(free_before - pool.num_free(), 2u);
  EXPECT_EQ(pool.num_evictable(chain), 0u);
}

TEST(BlockPool, AcquireCachedPastThePrefixThrows) {
  BlockPool pool(2, kBs);
  const std::vector<BlockKey> keys = {key(1)};
  std::vector<std::uint32_t> out;
  EXPECT_THROW(pool.acquire_cached(keys, 1, out), std::logic_error);
}

TEST(BlockPool, ConsecutiveCommitsOfOneChainMergeIntoOneBlockStored) {
  BlockPool pool(8, 4);
  std::vector<std::uint32_t> ids;
  ASSERT_TRUE(pool.allocate(5, ids));
  const kv::ExternalHash grand = kv::ExternalHash::from_int(9);  // an already cached parent
  ASSERT_TRUE(pool.commit(ids[0], key(1), grand, std::vector<TokenId>{1, 2, 3, 4}));
  ASSERT_TRUE(pool.commit(ids[1], key(2), key(1).external, std::vector<TokenId>{5, 6, 7, 8}));
  ASSERT_TRUE(pool.commit(ids[2], key(3), key(2).external, std::vector<TokenId>{9, 10, 11, 12}));
  // A block that does not continue the chain starts a new event...
  ASSERT_TRUE(pool.commit(ids[3], key(20), std::nullopt, std::vector<TokenId>{7, 7, 7, 7}));
  // ...and so does one whose parent is not the last stored block.
  ASSERT_TRUE(pool.commit(ids[4], key(4), key(3).external, std::vector<TokenId>{13, 14, 15, 16}));

  const auto events = pool.take_events();
  ASSERT_EQ(events.size(), 3u);
  const auto& first = std::get<kv::BlockStored>(events[0]);
  EXPECT_EQ(first.block_hashes,
            (std::vector<kv::ExternalHash>{key(1).external, key(2).external, key(3).external}));
  EXPECT_EQ(first.parent_block_hash, grand);
  EXPECT_EQ(first.token_ids, (std::vector<std::uint32_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}));
  EXPECT_EQ(first.block_size, 4u);
  EXPECT_EQ(first.medium, "GPU");

  const auto& second = std::get<kv::BlockStored>(events[1]);
  EXPECT_EQ(second.block_hashes, std::vector<kv::ExternalHash>{key(20).external});
  EXPECT_FALSE(second.parent_block_hash.has_value());
  EXPECT_EQ(second.token_ids, (std::vector<std::uint32_t>{7, 7, 7, 7}));

  const auto& third = std::get<kv::BlockStored>(events[2]);
  EXPECT_EQ(third.block_hashes, std::vector<kv::ExternalHash>{key(4).external});
  EXPECT_EQ(third.parent_block_hash, key(3).external);

  EXPECT_TRUE(pool.take_events().empty());  // taken means gone
}

TEST(BlockPool, CommitOfACachedBlockThrows) {
  BlockPool pool(2, kBs);
  const auto id = alloc1(pool);
  commit_root(pool, id, 1);
  EXPECT_THROW(pool.commit(id, key(2), std::nullopt, toks(0)), std::logic_error);
}

TEST(BlockPool, ReleaseOfAFreeBlockThrows) {
  BlockPool pool(2, kBs);
  const auto id = alloc1(pool);
  pool.release(std::vector<std::uint32_t>{id});
  EXPECT_THROW(pool.release(std::vector<std::uint32_t>{id}), std::logic_error);
}

TEST(BlockPool, ClearCacheForgetsEveryHash) {
  BlockPool pool(4, kBs);
  std::vector<std::uint32_t> held, freed;
  ASSERT_TRUE(pool.allocate(2, held));
  ASSERT_TRUE(pool.allocate(2, freed));
  for (std::uint32_t i = 0; i < 2; ++i) commit_root(pool, held[i], 10 + i);
  for (std::uint32_t i = 0; i < 2; ++i) commit_root(pool, freed[i], 20 + i);
  pool.release(freed);
  (void)pool.take_events();
  ASSERT_EQ(pool.num_cached(), 4u);
  ASSERT_EQ(pool.num_free(), 2u);

  pool.clear_cache();
  const auto events = pool.take_events();
  ASSERT_EQ(events.size(), 1u);
  EXPECT_TRUE(std::holds_alternative<kv::AllBlocksCleared>(events[0]));
  EXPECT_EQ(pool.num_cached(), 0u);
  EXPECT_EQ(pool.num_free(), 2u);
  for (auto id : held) {
    EXPECT_FALSE(pool.is_cached(id));  // referenced, but no longer findable
    EXPECT_EQ(pool.ref_count(id), 1u);
  }
  for (auto id : freed) EXPECT_FALSE(pool.is_cached(id));
  const std::vector<BlockKey> keys = {key(10)};
  EXPECT_EQ(pool.match_prefix(keys), 0u);

  // Nothing is cached any more, so allocations and releases emit nothing.
  pool.release(held);
  std::vector<std::uint32_t> all;
  ASSERT_TRUE(pool.allocate(4, all));
  EXPECT_TRUE(pool.take_events().empty());
  // A key freed by the reset can be committed again.
  EXPECT_TRUE(pool.commit(all[0], key(10), std::nullopt, toks(10)));
}

TEST(BlockPool, NeverCachedFreeBlocksGoBeforeEvictions) {
  BlockPool pool(4, kBs);
  std::vector<std::uint32_t> cached;
  ASSERT_TRUE(pool.allocate(2, cached));
  commit_root(pool, cached[0], 1);
  commit_root(pool, cached[1], 2);
  pool.release(cached);
  (void)pool.take_events();

  std::vector<std::uint32_t> fresh;
  ASSERT_TRUE(pool.allocate(2, fresh));
  EXPECT_TRUE(pool.take_events().empty());
  for (auto id : fresh) {
    EXPECT_EQ(std::count(cached.begin(), cached.end(), id), 0) << id;
  }
  EXPECT_EQ(pool.num_cached(), 2u);

  // Only now does allocation evict (the tail block 2 was freed first).
  EXPECT_EQ(alloc1(pool), cached[1]);
  EXPECT_EQ(removed(pool.take_events()), std::vector<std::uint64_t>{2});

  // A never-cached block released later is still preferred over the remaining cached one.
  pool.release(std::vector<std::uint32_t>{fresh[0]});
  EXPECT_EQ(alloc1(pool), fresh[0]);
  EXPECT_TRUE(pool.take_events().empty());
  EXPECT_TRUE(pool.is_cached(cached[0]));
}

}  // namespace
}  // namespace omni::sim
