#include <omni/kv_index.hpp>
#include <omni/prefix_table.hpp>

#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <thread>
#include <vector>

namespace omni::kv {
namespace {

std::vector<TokenId> tokens(std::size_t n, TokenId first) {
  std::vector<TokenId> out(n);
  std::iota(out.begin(), out.end(), first);
  return out;
}

struct Region {
  explicit Region(std::size_t bytes) : storage((bytes + 7) / 8, 0) {}
  void* data() { return storage.data(); }
  std::size_t size() const { return storage.size() * 8; }
  std::vector<std::uint64_t> storage;
};

struct Fixture {
  explicit Fixture(KvIndexShape shape)
      : region(KvIndex::required_bytes(shape)),
        index(KvIndex::create(region.data(), region.size(), shape)) {}
  Region region;
  std::unique_ptr<KvIndex> index;
};

std::vector<std::uint64_t> ints(std::initializer_list<std::uint64_t> v) { return v; }

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

TEST(KvIndex, BlockKeysAreThePrefixTableKeys) {
  const auto ids = tokens(100, 7);
  for (std::size_t bs : {1u, 3u, 16u, 100u, 101u}) {
    for (std::size_t max : {std::size_t{2}, std::size_t{8192}, SIZE_MAX}) {
      PrefixKeyOptions o;
      o.block_tokens = bs;
      o.max_blocks = max;
      o.salt = 0;
      EXPECT_EQ(block_keys(ids, bs, max), prefix_keys_from_ids(ids, o).blocks)
          << "block size " << bs << ", max " << max;
    }
  }
  // Each link is block_key() of the previous one.
  const auto keys = block_keys(ids, 16);
  ASSERT_EQ(keys.size(), 6u);  // the trailing partial block is not keyed
  std::uint64_t parent = kRootBlockHash;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    parent = block_key(parent, std::span(ids).subspan(i * 16, 16));
    EXPECT_EQ(keys[i], parent);
  }
  EXPECT_TRUE(block_keys(ids, 0).empty());
  EXPECT_EQ(block_keys(ids, 16, 2).size(), 2u);
}

TEST(KvIndex, EngineKeysOfBothHashKinds) {
  EXPECT_EQ(engine_key(ExternalHash::from_int(0)), 0u);
  EXPECT_EQ(engine_key(ExternalHash::from_int(42)), 42u);
  EXPECT_EQ(engine_key(ExternalHash::from_int(0x8000000000000001ULL)), 0x8000000000000001ULL);
  const std::string a(32, 'a');
  std::string b = a;
  b[31] = 'b';
  EXPECT_EQ(engine_key(ExternalHash::from_bytes(a)), engine_key(ExternalHash::from_bytes(a)));
  EXPECT_NE(engine_key(ExternalHash::from_bytes(a)), engine_key(ExternalHash::from_bytes(b)));
  EXPECT_NE(engine_key(ExternalHash::from_bytes(a)), 0u);
  EXPECT_NE(engine_key(ExternalHash::from_bytes("")), 0u);
  EXPECT_NE(engine_key(ExternalHash::from_bytes("x")),
            engine_key(ExternalHash::from_bytes(std::string("x\0", 2))));
}

// ---------------------------------------------------------------------------------------------
// The index
// ---------------------------------------------------------------------------------------------

TEST(KvIndex, RequiredBytesAreLinearAndCreateChecksItsArguments) {
  const KvIndexShape shape{3, 1000};
  const std::size_t one = KvIndex::required_bytes({1, 1000});
  const std::size_t two = KvIndex::required_bytes({2, 1000});
  EXPECT_EQ(KvIndex::required_bytes(shape) - two, two - one);  // linear in instances
  // About 60 bytes per block: 1.25 slots x 48 bytes, plus 128 per instance and 64 in all.
  EXPECT_EQ(KvIndex::required_bytes({1, 32000}), 64u + 128u + 48u * 40000u);
  EXPECT_EQ(KvIndex::required_bytes({4, 32000}) - 64u, 4u * (128u + 48u * 40000u));

  Region region(KvIndex::required_bytes(shape) + 8);
  EXPECT_EQ(KvIndex::attach(region.data(), region.size()), nullptr);  // nothing there yet
  EXPECT_EQ(KvIndex::create(region.data(), KvIndex::required_bytes(shape) - 1, shape), nullptr);
  EXPECT_EQ(KvIndex::create(region.data(), region.size(), {0, 1000}), nullptr);
  EXPECT_EQ(KvIndex::create(region.data(), region.size(), {3, 0}), nullptr);
  EXPECT_EQ(KvIndex::create(static_cast<char*>(region.data()) + 4, region.size() - 8, shape),
            nullptr);
  auto index = KvIndex::create(region.data(), region.size(), shape);
  ASSERT_NE(index, nullptr);
  EXPECT_EQ(index->instances(), 3u);
  EXPECT_EQ(index->blocks_per_instance(), 1000u);
  EXPECT_EQ(index->slots_per_instance(), 1256u);  // 1250 rounded up to whole sets of 8
  for (std::uint32_t i = 0; i < 3; ++i) {
    const InstanceCounters c = index->counters(i);
    EXPECT_EQ(c.blocks, 0u);
    EXPECT_EQ(c.bound, 1000u);
    EXPECT_EQ(c.last_seq, -1);
    EXPECT_EQ(c.block_size, 0u);
  }
}

TEST(KvIndex, AttachSeesTheSameDataAndRejectsGarbage) {
  const KvIndexShape shape{2, 256};
  Region region(KvIndex::required_bytes(shape));
  auto index = KvIndex::create(region.data(), region.size(), shape);
  ASSERT_NE(index, nullptr);
  const auto keys = block_keys(tokens(64, 1), 16);
  for (std::size_t i = 0; i < keys.size(); ++i) ASSERT_TRUE(index->store(1, 100 + i, keys[i]));
  index->set_last_seq(1, 77);
  index->set_block_size(1, 16);

  // Another handle on the same memory: writes through either are seen by both.
  auto other = KvIndex::attach(region.data(), region.size());
  ASSERT_NE(other, nullptr);
  EXPECT_EQ(other->instances(), 2u);
  EXPECT_EQ(other->match(1, keys), 4u);
  EXPECT_EQ(other->match(0, keys), 0u);
  EXPECT_EQ(other->counters(1).last_seq, 77);
  ASSERT_TRUE(other->remove(1, 102));
  EXPECT_EQ(index->match(1, keys), 2u);

  // The same bytes at another address (another process's mapping): no pointers inside.
  Region copy(region.size());
  std::memcpy(copy.data(), region.data(), region.size());
  auto moved = KvIndex::attach(copy.data(), copy.size());
  ASSERT_NE(moved, nullptr);
  EXPECT_EQ(moved->match(1, keys), 2u);
  EXPECT_EQ(moved->key_of(1, 101), keys[1]);
  EXPECT_EQ(moved->counters(1).blocks, 3u);
  EXPECT_EQ(moved->counters(1).block_size, 16u);
  ASSERT_TRUE(moved->store(1, 102, keys[2]));  // the copy is independent
  EXPECT_EQ(moved->match(1, keys), 4u);
  EXPECT_EQ(index->match(1, keys), 2u);

  // Garbage: too short, random bytes, a wrong version, a size that disagrees with the shape.
  EXPECT_EQ(KvIndex::attach(region.data(), region.size() - 8), nullptr);
  EXPECT_EQ(KvIndex::attach(region.data(), 32), nullptr);
  EXPECT_EQ(KvIndex::attach(nullptr, region.size()), nullptr);
  Region noise(region.size());
  std::mt19937_64 rng(5);
  for (auto& w : noise.storage) w = rng();
  EXPECT_EQ(KvIndex::attach(noise.data(), noise.size()), nullptr);
  Region tampered(region.size());
  std::memcpy(tampered.data(), region.data(), region.size());
  tampered.storage[1] += 1;  // version
  EXPECT_EQ(KvIndex::attach(tampered.data(), tampered.size()), nullptr);
  std::memcpy(tampered.data(), region.data(), region.size());
  tampered.storage[4] += 1;  // blocks_per_instance: the sizes no longer add up
  EXPECT_EQ(KvIndex::attach(tampered.data(), tampered.size()), nullptr);
  std::memcpy(tampered.data(), region.data(), region.size());
  tampered.storage[0] = 0;  // magic
  EXPECT_EQ(KvIndex::attach(tampered.data(), tampered.size()), nullptr);
}

TEST(KvIndex, StoreMatchContainsRemove) {
  Fixture f({2, 128});
  KvIndex& x = *f.index;
  const auto keys = block_keys(tokens(80, 3), 16);  // 5 blocks
  ASSERT_EQ(keys.size(), 5u);
  for (std::size_t i = 0; i < 3; ++i) ASSERT_TRUE(x.store(0, 1000 + i, keys[i]));
  EXPECT_EQ(x.match(0, keys), 3u);
  EXPECT_EQ(x.match(1, keys), 0u);  // instances are independent
  EXPECT_EQ(x.match(0, std::span(keys).first(2)), 2u);
  EXPECT_EQ(x.match(0, {}), 0u);
  EXPECT_TRUE(x.contains(0, keys[2]));
  EXPECT_FALSE(x.contains(0, keys[3]));
  EXPECT_EQ(x.key_of(0, 1001), keys[1]);
  EXPECT_EQ(x.key_of(0, 1003), std::nullopt);
  EXPECT_EQ(x.key_of(1, 1001), std::nullopt);

  // A hole stops the match at the first missing key.
  ASSERT_TRUE(x.store(0, 1004, keys[4]));
  EXPECT_EQ(x.match(0, keys), 3u);
  EXPECT_TRUE(x.remove(0, 1001));
  EXPECT_FALSE(x.remove(0, 1001));
  EXPECT_EQ(x.match(0, keys), 1u);
  EXPECT_FALSE(x.contains(0, keys[1]));

  // Engine key 0 is a key like any other.
  ASSERT_TRUE(x.store(0, 0, keys[1]));
  EXPECT_EQ(x.key_of(0, 0), keys[1]);
  EXPECT_EQ(x.match(0, keys), 3u);

  const InstanceCounters c = x.counters(0);
  EXPECT_EQ(c.blocks, 4u);
  EXPECT_EQ(c.stored, 5u);
  EXPECT_EQ(c.removed, 1u);
  EXPECT_EQ(c.unknown_removed, 1u);
  EXPECT_EQ(c.refreshed, 0u);
  EXPECT_EQ(c.evicted, 0u);
  EXPECT_EQ(x.counters(1).blocks, 0u);
}

TEST(KvIndex, OutOfRangeInstancesAreIgnored) {
  Fixture f({2, 16});
  KvIndex& x = *f.index;
  const auto keys = ints({5, 6});
  EXPECT_FALSE(x.store(2, 1, 5));
  EXPECT_FALSE(x.store_chain(2, keys));
  EXPECT_FALSE(x.remove(2, 1));
  EXPECT_EQ(x.match(2, keys), 0u);
  EXPECT_FALSE(x.contains(2, 5));
  EXPECT_EQ(x.key_of(2, 1), std::nullopt);
  x.clear(2);
  x.set_bound(2, 4);
  x.set_last_seq(2, 4);
  x.count_orphans(2, 1);
  EXPECT_EQ(x.counters(2).bound, 0u);
  EXPECT_EQ(x.counters(2).last_seq, -1);
}

TEST(KvIndex, TwoEngineKeysOfOneProxyKeyAreReferenceCounted) {
  Fixture f({1, 64});
  KvIndex& x = *f.index;
  ASSERT_TRUE(x.store(0, 11, 500));
  ASSERT_TRUE(x.store(0, 12, 500));  // e.g. another adapter's block with the same tokens
  EXPECT_EQ(x.counters(0).blocks, 2u);
  EXPECT_TRUE(x.remove(0, 11));
  EXPECT_TRUE(x.contains(0, 500));  // still held under engine key 12
  EXPECT_TRUE(x.remove(0, 12));
  EXPECT_FALSE(x.contains(0, 500));
  EXPECT_EQ(x.counters(0).blocks, 0u);
}

TEST(KvIndex, RestoringAnEngineKeyRefreshesOrRepointsIt) {
  Fixture f({1, 64});
  KvIndex& x = *f.index;
  ASSERT_TRUE(x.store(0, 7, 100));
  ASSERT_TRUE(x.store(0, 7, 100));  // refresh
  ASSERT_TRUE(x.store(0, 8, 100));  // a second reference to 100
  ASSERT_TRUE(x.store(0, 7, 200));  // re-pointed
  EXPECT_EQ(x.key_of(0, 7), 200u);
  EXPECT_TRUE(x.contains(0, 200));
  EXPECT_TRUE(x.contains(0, 100));  // engine key 8 still holds it
  ASSERT_TRUE(x.remove(0, 8));
  EXPECT_FALSE(x.contains(0, 100));
  const InstanceCounters c = x.counters(0);
  EXPECT_EQ(c.blocks, 1u);
  EXPECT_EQ(c.stored, 2u);
  EXPECT_EQ(c.refreshed, 2u);
  ASSERT_TRUE(x.remove(0, 7));
  EXPECT_FALSE(x.contains(0, 200));
  EXPECT_EQ(x.counters(0).blocks, 0u);
}

// 24 blocks per instance make 4 sets (no more than kSampleSets: eviction is exact LRU), and a
// bound of 8 leaves no set ever full.
TEST(KvIndex, OverTheBoundTheLeastRecentlyStoredBlockIsEvicted) {
  Fixture f({1, 24});
  KvIndex& x = *f.index;
  ASSERT_EQ(x.slots_per_instance(), 32u);
  x.set_bound(0, 8);
  EXPECT_EQ(x.counters(0).bound, 8u);
  for (std::uint64_t e = 1; e <= 8; ++e) ASSERT_TRUE(x.store(0, e, 100 + e));
  ASSERT_TRUE(x.store(0, 1, 101));  // 1 is now the most recent, 2 the least
  ASSERT_TRUE(x.store(0, 9, 109));
  EXPECT_EQ(x.key_of(0, 2), std::nullopt);
  EXPECT_FALSE(x.contains(0, 102));
  EXPECT_EQ(x.key_of(0, 1), 101u);
  ASSERT_TRUE(x.store(0, 10, 110));
  EXPECT_EQ(x.key_of(0, 3), std::nullopt);
  for (std::uint64_t e : {1, 4, 5, 6, 7, 8, 9, 10}) EXPECT_EQ(x.key_of(0, e), 100 + e) << e;
  InstanceCounters c = x.counters(0);
  EXPECT_EQ(c.blocks, 8u);
  EXPECT_EQ(c.evicted, 2u);

  // Many more: the bound holds throughout.
  for (std::uint64_t e = 11; e <= 200; ++e) {
    ASSERT_TRUE(x.store(0, e, 100 + e));
    ASSERT_LE(x.counters(0).blocks, 8u);
  }
  for (std::uint64_t e = 193; e <= 200; ++e) EXPECT_EQ(x.key_of(0, e), 100 + e);
  c = x.counters(0);
  EXPECT_EQ(c.blocks, 8u);
  EXPECT_EQ(c.blocks, c.stored - c.evicted - c.removed);
}

TEST(KvIndex, LoweringTheBoundEvictsAtTheNextStore) {
  Fixture f({1, 256});  // 40 sets: 40 blocks never fill one
  KvIndex& x = *f.index;
  for (std::uint64_t e = 1; e <= 40; ++e) ASSERT_TRUE(x.store(0, e, 1000 + e));
  EXPECT_EQ(x.counters(0).blocks, 40u);
  x.set_bound(0, 10);
  EXPECT_EQ(x.counters(0).blocks, 40u);  // not yet
  ASSERT_TRUE(x.store(0, 41, 1041));
  InstanceCounters c = x.counters(0);
  EXPECT_EQ(c.blocks, 10u);
  EXPECT_EQ(c.evicted, 31u);
  EXPECT_EQ(x.key_of(0, 41), 1041u);  // the newest stays
  x.set_bound(0, 0);
  EXPECT_EQ(x.counters(0).bound, 256u);  // restored
  x.set_bound(0, 1u << 20);
  EXPECT_EQ(x.counters(0).bound, 256u);  // never above blocks_per_instance
  x.set_bound(0, 1);
  ASSERT_TRUE(x.store(0, 42, 1042));
  EXPECT_EQ(x.counters(0).blocks, 1u);
  EXPECT_EQ(x.key_of(0, 42), 1042u);
  // A store that only refreshes trims to a lowered bound too.
  x.set_bound(0, 0);
  for (std::uint64_t e = 43; e <= 50; ++e) ASSERT_TRUE(x.store(0, e, 1000 + e));
  EXPECT_EQ(x.counters(0).blocks, 9u);
  x.set_bound(0, 3);
  ASSERT_TRUE(x.store(0, 50, 1050));
  EXPECT_EQ(x.counters(0).blocks, 3u);
  EXPECT_EQ(x.key_of(0, 50), 1050u);
}

TEST(KvIndex, FillingToTheBoundHardlyEverMeetsAFullSet) {
  // At full load each set holds 6.4 entries on average; with two candidate sets per key a full
  // pair (an early eviction) is rare: under 0.5% of the blocks stored up to the bound.
  Fixture f({1, 20000});
  KvIndex& x = *f.index;
  std::mt19937_64 rng(1);
  for (std::uint64_t i = 0; i < 20000; ++i) ASSERT_TRUE(x.store(0, rng(), rng()));
  InstanceCounters c = x.counters(0);
  EXPECT_LT(c.evicted, 100u);
  EXPECT_EQ(c.blocks, 20000u - c.evicted);
  for (std::uint64_t i = 0; i < 20000; ++i) {
    ASSERT_TRUE(x.store(0, rng(), rng()));
    if (i % 997 == 0) {
      ASSERT_LE(x.counters(0).blocks, 20000u);
    }
  }
  c = x.counters(0);
  EXPECT_LE(c.blocks, 20000u);
  EXPECT_GE(c.blocks, 19990u);
  EXPECT_EQ(c.blocks, c.stored - c.evicted);
}

// White box: the forward table's two candidate sets of a key, as kv_index.cpp chooses them.
std::pair<std::uint64_t, std::uint64_t> forward_sets(std::uint64_t key, std::uint64_t sets) {
  constexpr std::uint64_t kForwardSalt = 0x666f727761726400ULL;
  auto scale = [&](std::uint64_t h) {
    return static_cast<std::uint64_t>((static_cast<unsigned __int128>(h) * sets) >> 64);
  };
  const std::uint64_t h = mix64(key ^ kForwardSalt);
  return {scale(h), scale(mix64(h))};
}

// Both candidate sets of a new key full of keys that two engine keys share: nothing can make
// room (evicting one holder would not free a way), so the new block is dropped and counted.
TEST(KvIndex, AKeyWhoseSetsHoldOnlySharedKeysIsDropped) {
  Fixture f({1, 100});
  KvIndex& x = *f.index;
  const std::uint64_t sets = x.slots_per_instance() / KvIndex::kWays;
  ASSERT_EQ(sets, 16u);
  std::vector<std::uint64_t> crowded;  // keys whose two sets are 0 and 1
  for (std::uint64_t k = 1; crowded.size() < 18; ++k) {
    const auto [a, b] = forward_sets(k, sets);
    if (std::min(a, b) == 0 && std::max(a, b) == 1) crowded.push_back(k);
  }
  for (std::size_t i = 0; i < 16; ++i) {
    ASSERT_TRUE(x.store(0, 1000 + i, crowded[i]));
    ASSERT_TRUE(x.store(0, 2000 + i, crowded[i]));
  }
  InstanceCounters c = x.counters(0);
  ASSERT_EQ(c.blocks, 32u);
  ASSERT_EQ(c.evicted, 0u);  // sets 0 and 1 now hold 16 keys, each shared
  ASSERT_TRUE(x.store(0, 3000, crowded[16]));
  c = x.counters(0);
  EXPECT_EQ(c.stored, 33u);
  EXPECT_EQ(c.evicted, 1u);
  EXPECT_EQ(c.blocks, 32u);
  EXPECT_FALSE(x.contains(0, crowded[16]));
  EXPECT_EQ(x.key_of(0, 3000), std::nullopt);
  // Re-pointing a block from a key elsewhere to one of those sets: dropped too.
  std::uint64_t elsewhere = 1;
  while (forward_sets(elsewhere, sets).first <= 1 || forward_sets(elsewhere, sets).second <= 1) {
    ++elsewhere;
  }
  ASSERT_TRUE(x.store(0, 4000, elsewhere));
  ASSERT_TRUE(x.store(0, 4000, crowded[17]));
  c = x.counters(0);
  EXPECT_EQ(c.refreshed, 1u);
  EXPECT_EQ(c.evicted, 2u);
  EXPECT_EQ(c.blocks, 32u);
  EXPECT_EQ(x.key_of(0, 4000), std::nullopt);
  EXPECT_FALSE(x.contains(0, elsewhere));
  EXPECT_FALSE(x.contains(0, crowded[17]));
  // Once a key there has one holder left, a new key evicts that holder instead.
  ASSERT_TRUE(x.remove(0, 1000));
  EXPECT_TRUE(x.contains(0, crowded[0]));  // engine key 2000 still holds it
  ASSERT_TRUE(x.store(0, 3001, crowded[16]));
  c = x.counters(0);
  EXPECT_EQ(c.evicted, 3u);
  EXPECT_EQ(c.blocks, 31u);
  EXPECT_TRUE(x.contains(0, crowded[16]));
  EXPECT_FALSE(x.contains(0, crowded[0]));
  EXPECT_EQ(x.key_of(0, 2000), std::nullopt);
  // Re-pointing one holder of a shared key there leaves its twin the sole holder, and the least
  // recently stored sole holder (that twin, not 3001) is evicted for room.
  ASSERT_TRUE(x.store(0, 1001, crowded[17]));
  EXPECT_EQ(x.key_of(0, 1001), crowded[17]);
  EXPECT_EQ(x.counters(0).evicted, 4u);
  EXPECT_EQ(x.key_of(0, 2001), std::nullopt);
  EXPECT_FALSE(x.contains(0, crowded[1]));
  EXPECT_EQ(x.key_of(0, 3001), crowded[16]);
  for (std::size_t i = 2; i < 16; ++i) EXPECT_TRUE(x.contains(0, crowded[i])) << i;
  EXPECT_EQ(x.counters(0).blocks, 30u);
}

TEST(KvIndex, StoreChainRecordsTheHeadLast) {
  Fixture f({1, 24});
  KvIndex& x = *f.index;
  const auto keys = block_keys(tokens(12 * 4, 9), 4);
  ASSERT_TRUE(x.store_chain(0, std::span(keys).first(5)));
  EXPECT_EQ(x.match(0, keys), 5u);
  EXPECT_EQ(x.key_of(0, keys[3]), keys[3]);  // each key its own engine key
  ASSERT_TRUE(x.store_chain(0, keys));
  EXPECT_EQ(x.match(0, keys), 12u);
  InstanceCounters c = x.counters(0);
  EXPECT_EQ(c.stored, 12u);
  EXPECT_EQ(c.refreshed, 5u);
  EXPECT_EQ(c.blocks, 12u);
  // A chain longer than the bound keeps its head: the tail is evicted first.
  x.clear(0);
  x.set_bound(0, 8);
  ASSERT_TRUE(x.store_chain(0, keys));
  EXPECT_EQ(x.match(0, keys), 8u);
  EXPECT_EQ(x.counters(0).blocks, 8u);
  EXPECT_TRUE(x.store_chain(0, {}));
}

TEST(KvIndex, TaggedChainsKeepASharedPrefixUntilTheLastHolderLeaves) {
  Fixture f({2, 64});
  KvIndex& x = *f.index;
  const auto a = block_keys(tokens(10 * 4, 3), 4);   // 10 blocks
  auto b_tokens = tokens(10 * 4, 3);
  for (std::size_t i = 6 * 4; i < b_tokens.size(); ++i) b_tokens[i] += 1000;  // shares 6 blocks
  const auto b = block_keys(b_tokens, 4);
  ASSERT_EQ(std::mismatch(a.begin(), a.end(), b.begin()).first - a.begin(), 6);
  ASSERT_TRUE(x.store_tagged_chain(0, a, 11));
  ASSERT_TRUE(x.store_tagged_chain(0, b, 12));
  EXPECT_EQ(x.match(0, a), 10u);
  EXPECT_EQ(x.match(0, b), 10u);
  EXPECT_EQ(x.counters(0).blocks, 20u);  // one entry per holder and block
  EXPECT_EQ(x.match(1, a), 0u);          // per instance
  // The first holder leaves: the shared prefix stays, its own tail goes.
  ASSERT_TRUE(x.remove_tagged_chain(0, a, 11));
  EXPECT_EQ(x.match(0, a), 6u);
  EXPECT_EQ(x.match(0, b), 10u);
  EXPECT_EQ(x.counters(0).blocks, 10u);
  // Removing it again, or with the wrong tag, changes nothing.
  ASSERT_TRUE(x.remove_tagged_chain(0, a, 11));
  ASSERT_TRUE(x.remove_tagged_chain(0, b, 13));
  EXPECT_EQ(x.match(0, b), 10u);
  EXPECT_EQ(x.counters(0).unknown_removed, 20u);
  ASSERT_TRUE(x.remove_tagged_chain(0, b, 12));
  EXPECT_EQ(x.match(0, a), 0u);
  EXPECT_EQ(x.match(0, b), 0u);
  EXPECT_EQ(x.counters(0).blocks, 0u);
  // A tagged chain and an untagged one of the same keys are distinct holders.
  ASSERT_TRUE(x.store_chain(0, a));
  ASSERT_TRUE(x.store_tagged_chain(0, a, 11));
  ASSERT_TRUE(x.remove_tagged_chain(0, a, 11));
  EXPECT_EQ(x.match(0, a), 10u);
  EXPECT_EQ(KvIndex::tagged_engine_key(a[0], 0), a[0]);
  EXPECT_NE(KvIndex::tagged_engine_key(a[0], 11), KvIndex::tagged_engine_key(a[0], 12));
  // Bounded like every chain: over the bound the oldest holders' tails go first.
  x.clear(0);
  x.set_bound(0, 12);
  ASSERT_TRUE(x.store_tagged_chain(0, a, 21));
  ASSERT_TRUE(x.store_tagged_chain(0, b, 22));
  EXPECT_EQ(x.counters(0).blocks, 12u);
  EXPECT_EQ(x.match(0, b), 10u);  // the newest chain is whole
  EXPECT_EQ(x.match(0, a), 6u);   // the older one keeps what it shares with it
  EXPECT_TRUE(x.store_tagged_chain(0, {}, 1));
  EXPECT_TRUE(x.remove_tagged_chain(0, {}, 1));
  EXPECT_FALSE(x.store_tagged_chain(2, a, 1));
  EXPECT_FALSE(x.remove_tagged_chain(2, a, 1));
}

TEST(KvIndex, ClearDropsEveryBlockAndResetsTheSequence) {
  Fixture f({2, 64});
  KvIndex& x = *f.index;
  const auto keys = block_keys(tokens(64, 1), 8);
  ASSERT_TRUE(x.store_chain(0, keys));
  ASSERT_TRUE(x.store_chain(1, keys));
  x.set_last_seq(0, 12);
  x.clear(0);
  InstanceCounters c = x.counters(0);
  EXPECT_EQ(c.blocks, 0u);
  EXPECT_EQ(c.clears, 1u);
  EXPECT_EQ(c.last_seq, -1);
  EXPECT_EQ(x.match(0, keys), 0u);
  EXPECT_EQ(x.key_of(0, keys[0]), std::nullopt);
  EXPECT_EQ(x.match(1, keys), 8u);  // the other instance keeps its blocks
  ASSERT_TRUE(x.store_chain(0, keys));  // and the cleared one fills again
  EXPECT_EQ(x.match(0, keys), 8u);
  EXPECT_EQ(x.counters(0).blocks, 8u);
}

TEST(KvIndex, CountersAndAccessors) {
  Fixture f({1, 16});
  KvIndex& x = *f.index;
  x.set_last_seq(0, 41);
  x.set_block_size(0, 16);
  x.count_orphans(0, 3);
  x.count_skipped(0, 2);
  x.count_skipped(0, 1);
  const InstanceCounters c = x.counters(0);
  EXPECT_EQ(c.last_seq, 41);
  EXPECT_EQ(c.block_size, 16u);
  EXPECT_EQ(c.orphans, 3u);
  EXPECT_EQ(c.skipped, 3u);
  x.set_last_seq(0, -1);
  EXPECT_EQ(x.counters(0).last_seq, -1);
  EXPECT_EQ(x.lock_holder(0), 0);
}

// A pid that no longer exists: a child that has exited and been reaped.
pid_t dead_pid() {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  int status = 0;
  ::waitpid(child, &status, 0);
  return child;
}

TEST(KvIndex, ContendedWritesAreSkippedAndDeadHoldersTakenOver) {
  Fixture f({2, 64});
  KvIndex& x = *f.index;
  ASSERT_TRUE(x.store(1, 5, 50));
  x.set_last_seq(1, 9);
  auto* lock = reinterpret_cast<std::atomic<std::uint64_t>*>(
      static_cast<char*>(f.region.data()) + x.lock_offset(1));
  ASSERT_EQ(lock->load(), 0u);

  // Held by a live process (this one, as if another thread were writing): skipped.
  lock->store(static_cast<std::uint64_t>(::getpid()));
  EXPECT_EQ(x.lock_holder(1), ::getpid());
  EXPECT_FALSE(x.store(1, 6, 60));
  EXPECT_FALSE(x.remove(1, 5));
  EXPECT_FALSE(x.store_chain(1, ints({1, 2})));
  EXPECT_TRUE(x.store(0, 6, 60));  // other instances are unaffected
  InstanceCounters c = x.counters(1);
  EXPECT_EQ(c.contended, 3u);
  EXPECT_EQ(c.blocks, 1u);
  EXPECT_EQ(c.unknown_removed, 0u);
  EXPECT_TRUE(x.contains(1, 50));  // readers never wait
  x.clear(1);                      // waits longer, then gives up; the sequence is reset
  c = x.counters(1);
  EXPECT_EQ(c.contended, 4u);
  EXPECT_EQ(c.clears, 0u);
  EXPECT_EQ(c.last_seq, -1);
  x.set_last_seq(1, 9);

  // Held by a process that died mid-write: taken over, and the instance starts over.
  lock->store(static_cast<std::uint64_t>(dead_pid()));
  EXPECT_TRUE(x.store(1, 6, 60));
  c = x.counters(1);
  EXPECT_EQ(c.clears, 1u);
  EXPECT_EQ(c.last_seq, -1);
  EXPECT_EQ(c.blocks, 1u);
  EXPECT_FALSE(x.contains(1, 50));
  EXPECT_TRUE(x.contains(1, 60));
  EXPECT_EQ(x.lock_holder(1), 0);  // released after the write

  // A dead holder during clear(): one clear, not two.
  lock->store(static_cast<std::uint64_t>(dead_pid()));
  x.clear(1);
  EXPECT_EQ(x.counters(1).clears, 2u);
  EXPECT_EQ(x.counters(1).blocks, 0u);
  EXPECT_EQ(x.lock_holder(1), 0);
}

// Random operations against a reference model (engine key -> proxy key). Every eviction is
// accounted for: the blocks the index no longer holds are exactly `evicted` more than before.
TEST(KvIndex, RandomOperationsMatchAReferenceModel) {
  for (std::uint32_t bpi : {8u, 24u, 100u}) {
    Fixture f({2, bpi});
    KvIndex& x = *f.index;
    std::mt19937_64 rng(bpi);
    std::map<std::uint64_t, std::uint64_t> ref;  // engine key -> proxy key
    std::uint64_t base_stored = 0, base_removed = 0, base_evicted = 0;
    std::uint64_t bound = bpi;
    auto engine = [&] { return rng() % (3 * bpi) + (rng() % 4 == 0 ? 0 : 1); };
    auto key = [&] { return 1 + rng() % (bpi / 2 + 2); };  // few keys: many shared
    for (int step = 0; step < 20000; ++step) {
      const InstanceCounters before = x.counters(0);
      const int op = static_cast<int>(rng() % 100);
      bool stored = false;
      std::uint64_t held_before = 0;  // engine keys stored again by this step
      if (op < 55) {
        const std::uint64_t e = engine(), k = key();
        held_before = ref.count(e);
        ASSERT_TRUE(x.store(0, e, k));
        ref[e] = k;
        stored = true;
      } else if (op < 85) {
        const std::uint64_t e = engine();
        EXPECT_EQ(x.remove(0, e), ref.erase(e) == 1);
      } else if (op < 92) {
        // Distinct keys (a key evicted by the chain and stored again by it would be counted
        // evicted without being gone).
        std::vector<std::uint64_t> chain;
        for (int i = static_cast<int>(rng() % 5); i > 0; --i) {
          const std::uint64_t k = key();
          if (std::find(chain.begin(), chain.end(), k) == chain.end()) chain.push_back(k);
        }
        for (std::uint64_t k : chain) held_before += ref.count(k);
        ASSERT_TRUE(x.store_chain(0, chain));
        for (std::uint64_t k : chain) ref[k] = k;
        stored = !chain.empty();
      } else if (op < 97) {
        bound = rng() % 3 == 0 ? bpi : 1 + rng() % bpi;
        x.set_bound(0, bound);
      } else if (op < 98) {
        x.clear(0);
        ref.clear();
        const InstanceCounters c = x.counters(0);
        base_stored = c.stored;
        base_removed = c.removed;
        base_evicted = c.evicted;
      } else {
        // The other instance, to check it never disturbs this one.
        ASSERT_TRUE(x.store(1, engine(), key()));
      }
      const InstanceCounters c = x.counters(0);
      // Blocks the index dropped: exactly the evictions of this step, but for blocks a chain
      // evicted and then stored again (stored anew, not refreshed).
      std::size_t gone = 0;
      for (auto it = ref.begin(); it != ref.end();) {
        if (!x.key_of(0, it->first)) {
          it = ref.erase(it);
          ++gone;
        } else {
          ++it;
        }
      }
      ASSERT_EQ(gone + (held_before - (c.refreshed - before.refreshed)),
                c.evicted - before.evicted)
          << "step " << step;
      ASSERT_EQ(c.blocks, ref.size()) << "step " << step;
      ASSERT_EQ(c.blocks, (c.stored - base_stored) - (c.removed - base_removed) -
                              (c.evicted - base_evicted));
      if (stored) {
        ASSERT_LE(c.blocks, bound) << "step " << step;
      }
      if (step % 50 == 0) {
        // The forward table holds exactly the keys some engine key maps to.
        std::set<std::uint64_t> held;
        for (const auto& [e, k] : ref) {
          ASSERT_EQ(x.key_of(0, e), k);
          held.insert(k);
        }
        for (std::uint64_t k = 1; k < bpi / 2 + 3; ++k) {
          ASSERT_EQ(x.contains(0, k), held.count(k) == 1) << "key " << k << " step " << step;
        }
      }
    }
    EXPECT_GT(x.counters(0).evicted, 0u);
    EXPECT_EQ(x.counters(0).contended, 0u);
  }
}

// One writer storing and removing continuously, one reader matching: no crash, no read out of
// bounds (ASan), results within bounds, and a prefix nobody touches always fully matched.
TEST(KvIndex, ReadersRunConcurrentlyWithAWriter) {
  Fixture f({2, 4096});
  KvIndex& x = *f.index;
  const auto pinned = block_keys(tokens(32 * 16, 5), 16);  // 32 blocks, never removed
  for (std::size_t i = 0; i < pinned.size(); ++i) ASSERT_TRUE(x.store(1, 1u << 20 | i, pinned[i]));
  std::vector<std::vector<std::uint64_t>> prompts;
  for (TokenId p = 0; p < 64; ++p) prompts.push_back(block_keys(tokens(16 * 24, 1000 * (p + 1)), 16));

  std::atomic<bool> done{false};
  std::thread writer([&] {
    std::mt19937_64 rng(3);
    for (int round = 0; round < 3000; ++round) {
      const auto& keys = prompts[rng() % prompts.size()];
      const std::uint64_t base = (rng() % 16) << 8;  // at most 16 x 24 blocks live
      for (std::size_t i = 0; i < keys.size(); ++i) x.store(1, base | i, keys[i]);
      for (std::size_t i = rng() % keys.size(); i < keys.size(); ++i) x.remove(1, base | i);
      if (round % 500 == 499) x.store_chain(0, keys);
    }
    done.store(true);
  });
  std::size_t reads = 0, full_pinned = 0;
  std::mt19937_64 rng(4);
  while (!done.load() || reads < 1000) {
    const auto& keys = prompts[rng() % prompts.size()];
    const std::size_t m = x.match(1, keys);
    ASSERT_LE(m, keys.size());
    if (x.match(1, pinned) == pinned.size()) ++full_pinned;
    ASSERT_LE(x.counters(1).blocks, 4096u);
    (void)x.key_of(1, rng() % (16 << 8));
    ++reads;
  }
  writer.join();
  EXPECT_EQ(full_pinned, reads);
  const InstanceCounters c = x.counters(1);
  EXPECT_EQ(c.contended, 0u);
  EXPECT_EQ(c.blocks, c.stored - c.removed - c.evicted);
  EXPECT_EQ(x.match(1, pinned), pinned.size());
}

// ---------------------------------------------------------------------------------------------
// Applying events
// ---------------------------------------------------------------------------------------------

ExternalHash int_hash(std::uint64_t v) { return ExternalHash::from_int(v); }

BlockStored stored_event(std::vector<ExternalHash> hashes, std::optional<ExternalHash> parent,
                         std::vector<TokenId> ids, std::uint32_t block_size) {
  BlockStored ev;
  ev.block_hashes = std::move(hashes);
  ev.parent_block_hash = std::move(parent);
  ev.token_ids = std::move(ids);
  ev.block_size = block_size;
  return ev;
}

// The engine's names for the blocks of `ids`: a 64-bit chain from another root (so that they
// differ from the proxy's keys), or sha256 digests.
std::vector<ExternalHash> engine_hashes(const std::vector<TokenId>& ids, std::size_t bs, bool bytes) {
  std::vector<ExternalHash> out;
  if (bytes) {
    for (const BlockDigest& d : hash_blocks_sha256(ids, bs)) {
      out.push_back(ExternalHash::from_bytes(std::string(d.begin(), d.end())));
    }
  } else {
    for (BlockHash64 h : hash_blocks64(ids, bs, 12345)) out.push_back(int_hash(h));
  }
  return out;
}

std::vector<ExternalHash> slice(const std::vector<ExternalHash>& v, std::size_t from, std::size_t to) {
  return {v.begin() + static_cast<std::ptrdiff_t>(from), v.begin() + static_cast<std::ptrdiff_t>(to)};
}

std::vector<TokenId> slice(const std::vector<TokenId>& v, std::size_t from, std::size_t to) {
  return {v.begin() + static_cast<std::ptrdiff_t>(from), v.begin() + static_cast<std::ptrdiff_t>(to)};
}

TEST(KvApply, AChainThatContinuesAStoredChainExtendsIt) {
  Fixture f({2, 256});
  KvIndex& x = *f.index;
  const auto ids = tokens(8 * 4 + 3, 50);  // 8 full blocks of 4, and a partial one
  const auto keys = block_keys(ids, 4);
  const auto hashes = engine_hashes(ids, 4, false);
  EventBatch first;
  first.events.emplace_back(stored_event(slice(hashes, 0, 4), std::nullopt, slice(ids, 0, 16), 4));
  ApplyResult r = apply_batch(x, 1, first);
  EXPECT_EQ(r.stored, 4u);
  EXPECT_EQ(x.match(1, keys), 4u);
  EventBatch second;
  second.events.emplace_back(stored_event(slice(hashes, 4, 8), hashes[3], slice(ids, 16, 32), 4));
  r = apply_batch(x, 1, second);
  EXPECT_EQ(r.stored, 4u);
  EXPECT_EQ(r.orphans, 0u);
  EXPECT_EQ(x.match(1, keys), 8u);  // both parts, as one prompt
  EXPECT_EQ(x.match(0, keys), 0u);
  EXPECT_EQ(x.key_of(1, engine_key(hashes[5])), keys[5]);
  EXPECT_EQ(x.counters(1).blocks, 8u);
  EXPECT_EQ(x.counters(1).block_size, 4u);
  // Stored again (e.g. an engine re-announcing a cached prefix): refreshed, not doubled.
  r = apply_batch(x, 1, first);
  EXPECT_EQ(r.stored, 4u);
  EXPECT_EQ(x.counters(1).blocks, 8u);
  EXPECT_EQ(x.counters(1).refreshed, 4u);
}

TEST(KvApply, AChainWithAnUnknownParentIsAnOrphan) {
  Fixture f({1, 256});
  KvIndex& x = *f.index;
  const auto ids = tokens(6 * 4, 1);
  const auto keys = block_keys(ids, 4);
  const auto hashes = engine_hashes(ids, 4, false);
  EventBatch batch;
  batch.events.emplace_back(stored_event(slice(hashes, 3, 6), hashes[2], slice(ids, 12, 24), 4));
  const ApplyResult r = apply_batch(x, 0, batch);
  EXPECT_EQ(r.stored, 0u);
  EXPECT_EQ(r.orphans, 3u);
  EXPECT_EQ(x.counters(0).orphans, 3u);
  EXPECT_EQ(x.counters(0).blocks, 0u);
  // Not re-rooted either: its tokens' keys from the root are not there.
  for (std::uint64_t k : block_keys(slice(ids, 12, 24), 4)) EXPECT_FALSE(x.contains(0, k));
  EXPECT_EQ(x.key_of(0, engine_key(hashes[4])), std::nullopt);
  EXPECT_EQ(x.match(0, keys), 0u);
}

TEST(KvApply, RemovedAndAllBlocksCleared) {
  Fixture f({1, 256});
  KvIndex& x = *f.index;
  const auto ids = tokens(8 * 4, 1);
  const auto keys = block_keys(ids, 4);
  const auto hashes = engine_hashes(ids, 4, false);
  EventBatch batch;
  batch.events.emplace_back(stored_event(hashes, std::nullopt, ids, 4));
  BlockRemoved removed;
  removed.block_hashes = {hashes[6], hashes[4], int_hash(999)};
  removed.medium = "GPU";
  batch.events.emplace_back(removed);
  ApplyResult r = apply_batch(x, 0, batch);
  EXPECT_EQ(r.stored, 8u);
  EXPECT_EQ(r.removed, 2u);
  EXPECT_FALSE(r.cleared);
  EXPECT_EQ(x.match(0, keys), 4u);
  InstanceCounters c = x.counters(0);
  EXPECT_EQ(c.blocks, 6u);
  EXPECT_EQ(c.removed, 2u);
  EXPECT_EQ(c.unknown_removed, 1u);

  // Cleared, then stored again within the same batch: event order holds.
  x.set_last_seq(0, 5);
  EventBatch restart;
  restart.events.emplace_back(AllBlocksCleared{});
  restart.events.emplace_back(stored_event(slice(hashes, 0, 2), std::nullopt, slice(ids, 0, 8), 4));
  r = apply_batch(x, 0, restart);
  EXPECT_TRUE(r.cleared);
  EXPECT_EQ(r.stored, 2u);
  c = x.counters(0);
  EXPECT_EQ(c.clears, 1u);
  EXPECT_EQ(c.blocks, 2u);
  EXPECT_EQ(c.last_seq, -1);
  EXPECT_EQ(x.match(0, keys), 2u);
}

TEST(KvApply, TheProxyKeysDoNotDependOnTheEnginesHash) {
  const auto ids = tokens(10 * 16, 77);
  const auto keys = block_keys(ids, 16);
  std::vector<std::uint64_t> held[2];
  for (bool bytes : {false, true}) {
    Fixture f({1, 256});
    KvIndex& x = *f.index;
    const auto hashes = engine_hashes(ids, 16, bytes);
    ASSERT_EQ(hashes.size(), 10u);
    EXPECT_EQ(hashes[0].is_int(), !bytes);
    if (bytes) {
      EXPECT_EQ(hashes[0].as_bytes().size(), 32u);
    }
    EventBatch batch;
    batch.events.emplace_back(stored_event(slice(hashes, 0, 3), std::nullopt, slice(ids, 0, 48), 16));
    batch.events.emplace_back(stored_event(slice(hashes, 3, 10), hashes[2], slice(ids, 48, 160), 16));
    BlockRemoved removed;
    removed.block_hashes = {hashes[9]};
    batch.events.emplace_back(removed);
    const ApplyResult r = apply_batch(x, 0, batch);
    EXPECT_EQ(r.stored, 10u);
    EXPECT_EQ(r.removed, 1u);
    EXPECT_EQ(x.match(0, keys), 9u);
    for (std::size_t i = 0; i < 9; ++i) {
      const auto k = x.key_of(0, engine_key(hashes[i]));
      ASSERT_TRUE(k.has_value());
      held[bytes].push_back(*k);
    }
  }
  EXPECT_EQ(held[0], held[1]);
  EXPECT_EQ(held[0], std::vector<std::uint64_t>(keys.begin(), keys.begin() + 9));
}

// A batch with every kind of event, as an engine would publish it.
EventBatch mixed_batch(bool bytes, bool with_medium) {
  const auto ids = tokens(12 * 4, 300);
  const auto other = tokens(3 * 4, 9000);
  const auto hashes = engine_hashes(ids, 4, bytes);
  const auto other_hashes = engine_hashes(other, 4, bytes);
  std::optional<std::string> medium;
  if (with_medium) medium = "GPU";
  EventBatch batch;
  batch.ts = 1718000000.5;
  batch.data_parallel_rank = 0;
  auto stored = [&](BlockStored ev) {
    ev.medium = medium;
    batch.events.emplace_back(std::move(ev));
  };
  stored(stored_event(slice(hashes, 0, 5), std::nullopt, slice(ids, 0, 20), 4));
  stored(stored_event(slice(hashes, 5, 12), hashes[4], slice(ids, 20, 48), 4));
  stored(stored_event(other_hashes, std::nullopt, other, 4));
  stored(stored_event(slice(hashes, 8, 10), int_hash(4242), slice(ids, 32, 40), 4));  // orphan
  BlockRemoved removed;
  removed.block_hashes = {hashes[11], hashes[10], other_hashes[0]};
  removed.medium = medium;
  batch.events.emplace_back(removed);
  BlockStored cpu = stored_event(slice(hashes, 0, 1), std::nullopt, slice(ids, 0, 4), 4);
  if (with_medium) {
    cpu.medium = "CPU";  // skipped
    batch.events.emplace_back(cpu);
  }
  return batch;
}

struct Snapshot {
  InstanceCounters counters;
  std::vector<std::size_t> matches;
  std::vector<std::optional<std::uint64_t>> keys;
};

Snapshot snapshot(const KvIndex& x, std::uint32_t instance, const EventBatch& batch) {
  Snapshot s;
  s.counters = x.counters(instance);
  for (const auto& ids : {tokens(12 * 4, 300), tokens(3 * 4, 9000)}) {
    s.matches.push_back(x.match(instance, block_keys(ids, 4)));
  }
  for (const Event& ev : batch.events) {
    if (const auto* st = std::get_if<BlockStored>(&ev)) {
      for (const auto& h : st->block_hashes) s.keys.push_back(x.key_of(instance, engine_key(h)));
    }
  }
  return s;
}

void expect_same(const Snapshot& a, const Snapshot& b, const std::string& what) {
  EXPECT_EQ(a.matches, b.matches) << what;
  EXPECT_EQ(a.keys, b.keys) << what;
  EXPECT_EQ(a.counters.blocks, b.counters.blocks) << what;
  EXPECT_EQ(a.counters.stored, b.counters.stored) << what;
  EXPECT_EQ(a.counters.removed, b.counters.removed) << what;
  EXPECT_EQ(a.counters.orphans, b.counters.orphans) << what;
  EXPECT_EQ(a.counters.skipped, b.counters.skipped) << what;
  EXPECT_EQ(a.counters.block_size, b.counters.block_size) << what;
}

TEST(KvApply, EveryEncodingGivesTheSameIndex) {
  for (bool bytes : {false, true}) {
    for (bool with_medium : {false, true}) {
      const EventBatch batch = mixed_batch(bytes, with_medium);
      Fixture direct({1, 256});
      const ApplyResult r = apply_batch(*direct.index, 0, batch);
      EXPECT_EQ(r.stored, 5u + 7u + 3u);
      EXPECT_EQ(r.orphans, 2u);
      EXPECT_EQ(r.removed, 3u);
      EXPECT_EQ(r.skipped, with_medium ? 1u : 0u);
      const Snapshot want = snapshot(*direct.index, 0, batch);
      EXPECT_EQ(want.matches, (std::vector<std::size_t>{10, 0}));
      for (EventEncoding encoding : {EventEncoding::kArray, EventEncoding::kMap}) {
        for (EventLayout layout : {EventLayout::kVllm, EventLayout::kSglang}) {
          const std::string what = std::string(bytes ? "bytes" : "ints") +
                                   (with_medium ? " medium" : "") +
                                   (encoding == EventEncoding::kMap ? " map" : " array") +
                                   (layout == EventLayout::kVllm ? " vllm" : " sglang");
          const std::string payload = encode_batch(batch, {encoding, layout});
          const EventBatch decoded = decode_batch(payload);
          Fixture f({1, 256});
          apply_batch(*f.index, 0, decoded);
          expect_same(snapshot(*f.index, 0, batch), want, what);
        }
      }
    }
  }
}

TEST(KvApply, MalformedShapesAreSkipped) {
  Fixture f({1, 256});
  KvIndex& x = *f.index;
  const auto ids = tokens(4 * 4, 1);
  const auto hashes = engine_hashes(ids, 4, false);
  EventBatch batch;
  // One token short, one hash short, and no block size anywhere.
  batch.events.emplace_back(stored_event(hashes, std::nullopt, slice(ids, 0, 15), 4));
  batch.events.emplace_back(stored_event(slice(hashes, 0, 3), std::nullopt, ids, 4));
  batch.events.emplace_back(stored_event(hashes, std::nullopt, ids, 0));
  ApplyResult r = apply_batch(x, 0, batch);
  EXPECT_EQ(r.skipped, 3u);
  EXPECT_EQ(r.stored, 0u);
  EXPECT_EQ(x.counters(0).skipped, 3u);
  EXPECT_EQ(x.counters(0).blocks, 0u);

  // The event's block size 0 falls back to the instance's.
  x.set_block_size(0, 4);
  EventBatch fallback;
  fallback.events.emplace_back(stored_event(hashes, std::nullopt, ids, 0));
  r = apply_batch(x, 0, fallback);
  EXPECT_EQ(r.stored, 4u);
  EXPECT_EQ(x.match(0, block_keys(ids, 4)), 4u);

  // The option overrides both: 16 tokens are 2 blocks of 8.
  const auto eight = engine_hashes(ids, 8, false);
  EventBatch by_option;
  by_option.events.emplace_back(stored_event(eight, std::nullopt, ids, 4));
  r = apply_batch(x, 0, by_option, {.block_size = 8});
  EXPECT_EQ(r.stored, 2u);
  EXPECT_EQ(x.match(0, block_keys(ids, 8)), 2u);
  EXPECT_EQ(x.counters(0).block_size, 4u);  // the event's field is what is recorded

  // An instance out of range: nothing at all.
  r = apply_batch(x, 3, by_option);
  EXPECT_EQ(r.stored, 0u);
}

TEST(KvApply, OtherMediaAreSkippedByDefault) {
  const auto ids = tokens(4 * 4, 1);
  const auto keys = block_keys(ids, 4);
  const auto hashes = engine_hashes(ids, 4, true);
  EventBatch gpu;
  gpu.events.emplace_back(stored_event(hashes, std::nullopt, ids, 4));
  std::get<BlockStored>(gpu.events.back()).medium = "GPU";
  EventBatch cpu;
  BlockStored offload = stored_event(hashes, std::nullopt, tokens(2 * 8, 1), 8);
  offload.block_hashes.resize(2);
  offload.medium = "CPU";
  cpu.events.emplace_back(offload);
  BlockRemoved cpu_removed;
  cpu_removed.block_hashes = {hashes[0]};
  cpu_removed.medium = "CPU";
  cpu.events.emplace_back(cpu_removed);

  Fixture f({1, 64});
  KvIndex& x = *f.index;
  apply_batch(x, 0, gpu);
  ApplyResult r = apply_batch(x, 0, cpu);
  EXPECT_EQ(r.skipped, 2u);
  EXPECT_EQ(r.stored, 0u);
  EXPECT_EQ(r.removed, 0u);
  EXPECT_EQ(x.match(0, keys), 4u);  // the CPU copy's removal leaves the GPU block
  EXPECT_EQ(x.counters(0).block_size, 4u);  // the offload's block size is not recorded
  EXPECT_EQ(x.counters(0).skipped, 2u);

  // Indexed when asked: the removal now drops the block.
  r = apply_batch(x, 0, cpu, {.other_media = true});
  EXPECT_EQ(r.skipped, 0u);
  EXPECT_EQ(r.stored, 2u);
  EXPECT_EQ(r.removed, 1u);
  EXPECT_EQ(x.match(0, keys), 0u);
}

TEST(KvApply, AdapterChainsAreSkipped) {
  const auto ids = tokens(2 * 4, 1);
  const auto hashes = engine_hashes(ids, 4, false);
  Fixture f({1, 64});
  KvIndex& x = *f.index;
  EventBatch batch;
  BlockStored with_id = stored_event(hashes, std::nullopt, ids, 4);
  with_id.lora_id = 3;
  BlockStored with_name = stored_event(hashes, std::nullopt, ids, 4);
  with_name.lora_name = "adapter";
  batch.events.emplace_back(with_id);
  batch.events.emplace_back(with_name);
  const ApplyResult r = apply_batch(x, 0, batch);
  EXPECT_EQ(r.skipped, 2u);
  EXPECT_EQ(r.stored, 0u);
  EXPECT_EQ(x.counters(0).blocks, 0u);
  EXPECT_EQ(x.match(0, block_keys(ids, 4)), 0u);
}

TEST(KvApply, ABlockRestoredUnderNewTokensIsRepointed) {
  Fixture f({1, 64});
  KvIndex& x = *f.index;
  const auto a = tokens(4, 1);
  const auto b = tokens(4, 100);
  EventBatch batch;
  batch.events.emplace_back(stored_event({int_hash(77)}, std::nullopt, a, 4));
  batch.events.emplace_back(stored_event({int_hash(77)}, std::nullopt, b, 4));
  const ApplyResult r = apply_batch(x, 0, batch);
  EXPECT_EQ(r.stored, 2u);
  EXPECT_EQ(x.key_of(0, 77), block_keys(b, 4)[0]);
  EXPECT_EQ(x.match(0, block_keys(a, 4)), 0u);
  EXPECT_EQ(x.match(0, block_keys(b, 4)), 1u);
  const InstanceCounters c = x.counters(0);
  EXPECT_EQ(c.blocks, 1u);
  EXPECT_EQ(c.stored, 1u);
  EXPECT_EQ(c.refreshed, 1u);
}

TEST(KvApply, LastSeqAndBlockSizeAccessors) {
  Fixture f({2, 64});
  KvIndex& x = *f.index;
  EXPECT_EQ(x.counters(0).last_seq, -1);
  x.set_last_seq(0, 0);
  EXPECT_EQ(x.counters(0).last_seq, 0);
  x.set_last_seq(0, std::int64_t{1} << 40);
  EXPECT_EQ(x.counters(0).last_seq, std::int64_t{1} << 40);
  EventBatch batch;
  batch.events.emplace_back(stored_event({int_hash(1)}, std::nullopt, tokens(16, 1), 16));
  apply_batch(x, 1, batch);
  EXPECT_EQ(x.counters(1).block_size, 16u);
  EXPECT_EQ(x.counters(0).block_size, 0u);
  EXPECT_EQ(x.counters(1).last_seq, -1);  // the caller records the sequence it applied
}

}  // namespace
}  // namespace omni::kv
