#include <omni/prefix_table.hpp>

#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <thread>
#include <vector>

namespace omni {
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

PoolSnapshot pool_with_outstanding(const std::vector<std::uint32_t>& outstanding) {
  std::vector<BackendState> backends;
  for (std::size_t i = 0; i < outstanding.size(); ++i) {
    BackendState b;
    b.id = 1000 + i;
    b.outstanding = outstanding[i];
    backends.push_back(b);
  }
  return PoolSnapshot("pool", 1, std::move(backends));
}

std::vector<std::size_t> all_of(const PoolSnapshot& pool) {
  std::vector<std::size_t> out(pool.size());
  std::iota(out.begin(), out.end(), 0);
  return out;
}

TEST(PrefixKeys, EqualPrefixesGiveEqualLeadingKeys) {
  PrefixKeyOptions o;
  o.block_tokens = 4;
  auto a = tokens(18, 100);
  auto b = a;
  b[9] = 7;  // differs in block 2
  PrefixKeys ka = prefix_keys_from_ids(a, o);
  PrefixKeys kb = prefix_keys_from_ids(b, o);
  ASSERT_EQ(ka.blocks.size(), 4u);  // the trailing partial block is not keyed
  EXPECT_EQ(ka.units, 18u);
  EXPECT_EQ(ka.blocks[0], kb.blocks[0]);
  EXPECT_EQ(ka.blocks[1], kb.blocks[1]);
  EXPECT_NE(ka.blocks[2], kb.blocks[2]);
  EXPECT_NE(ka.blocks[3], kb.blocks[3]);  // chained: a change poisons every later key
  o.salt = 5;
  EXPECT_NE(prefix_keys_from_ids(a, o).blocks[0], ka.blocks[0]);
  o.max_blocks = 2;
  EXPECT_EQ(prefix_keys_from_ids(a, o).blocks.size(), 2u);
}

TEST(PrefixKeys, TextAndParsedBodies) {
  PrefixKeyOptions o;
  o.block_bytes = 8;
  const std::string text = "You are a helpful assistant. Answer briefly.";
  PrefixKeys k = prefix_keys_from_text(text, o);
  EXPECT_EQ(k.blocks.size(), text.size() / 8);
  EXPECT_FALSE(k.token_ids);

  auto ids_body = parse_request_body(Api::kCompletions, R"({"prompt": [[1,2,3,4,5,6,7,8,9]]})");
  ASSERT_TRUE(ids_body.ok());
  o.block_tokens = 4;
  PrefixKeys ki = prefix_keys_of(*ids_body, o);
  EXPECT_TRUE(ki.token_ids);
  EXPECT_EQ(ki.units, 9u);
  EXPECT_EQ(ki.blocks, prefix_keys_from_ids(tokens(9, 1), o).blocks);

  auto text_body = parse_request_body(Api::kCompletions,
                                      R"({"prompt": ")" + text + R"("})");
  ASSERT_TRUE(text_body.ok());
  EXPECT_EQ(prefix_keys_of(*text_body, o).blocks, k.blocks);

  auto chat1 = parse_request_body(
      Api::kChatCompletions,
      R"({"messages": [{"role": "system", "content": "Be brief and precise, always."},
                       {"role": "user", "content": "What is a prefix cache?"}]})");
  auto chat2 = parse_request_body(
      Api::kChatCompletions,
      R"({"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief and precise, always."}]},
                       {"role": "user", "content": "Something else entirely."}]})");
  ASSERT_TRUE(chat1.ok());
  ASSERT_TRUE(chat2.ok());
  PrefixKeys c1 = prefix_keys_of(*chat1, o);
  PrefixKeys c2 = prefix_keys_of(*chat2, o);
  ASSERT_GE(c1.blocks.size(), 4u);
  EXPECT_EQ(c1.blocks[0], c2.blocks[0]);  // the shared system prompt
  EXPECT_NE(c1.blocks.back(), c2.blocks.back());

  // A chat longer than the keys cover: keyed on its first max_blocks blocks, its whole length
  // still counted (the match rate's denominator).
  PrefixKeyOptions two = o;
  two.max_blocks = 2;
  PrefixKeys short_keys = prefix_keys_of(*chat1, two);
  EXPECT_EQ(short_keys.blocks, std::vector<std::uint64_t>(c1.blocks.begin(), c1.blocks.begin() + 2));
  EXPECT_EQ(short_keys.units, c1.units);

  auto generate = parse_request_body(Api::kGenerate, R"({"input_ids": [1,2,3,4,5,6,7,8]})");
  ASSERT_TRUE(generate.ok());
  EXPECT_EQ(prefix_keys_of(*generate, o).blocks, prefix_keys_from_ids(tokens(8, 1), o).blocks);
}

TEST(PrefixTable, CreateAttachAndBounds) {
  Region region(PrefixTable::required_bytes(64, 4));
  EXPECT_EQ(PrefixTable::attach(region.data(), region.size()), nullptr);  // nothing there yet
  EXPECT_EQ(PrefixTable::create(region.data(), region.size() - 8, 64, 4), nullptr);
  EXPECT_EQ(PrefixTable::create(region.data(), region.size(), 64, 0), nullptr);
  auto t = PrefixTable::create(region.data(), region.size(), 64, 4);
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->stats().entries, 64u);
  auto other = PrefixTable::attach(region.data(), region.size());
  ASSERT_NE(other, nullptr);
  const std::vector<std::uint64_t> keys = {11, 12, 13};
  t->insert(keys, 0, 2, 2);
  EXPECT_EQ(other->size(2), 3);  // the same memory seen through another handle
  EXPECT_EQ(other->match(keys, 0, ~0ULL).blocks, 3u);
  // Out-of-range tenants and counters are ignored.
  t->insert(keys, 0, 64, 2);
  t->insert(keys, 0, 1, 9);
  EXPECT_EQ(t->size(9), 0);
  EXPECT_EQ(t->stats().inserts, 3u);
}

TEST(PrefixTable, LongestPrefixAmongEligibleTenants) {
  Region region(PrefixTable::required_bytes(1024, 8));
  auto t = PrefixTable::create(region.data(), region.size(), 1024, 8);
  ASSERT_NE(t, nullptr);
  const std::vector<std::uint64_t> a = {1, 2, 3, 4, 5, 6};
  t->insert(std::span(a).first(2), 0, 0, 0);  // tenant 0 holds blocks 0..1
  t->insert(std::span(a).first(5), 0, 3, 3);  // tenant 3 holds blocks 0..4
  struct Row {
    std::uint64_t eligible;
    std::size_t blocks;
    std::uint64_t tenants;
  };
  for (const Row& row : std::vector<Row>{
           {~0ULL, 5, 1ULL << 3},
           {1ULL << 0, 2, 1ULL << 0},
           {(1ULL << 0) | (1ULL << 5), 2, 1ULL << 0},
           {1ULL << 5, 0, 0},
       }) {
    const PrefixTable::Match m = t->match(a, 0, row.eligible);
    EXPECT_EQ(m.blocks, row.blocks) << row.eligible;
    EXPECT_EQ(m.tenants, row.tenants) << row.eligible;
  }
  // A chain that differs in its first block matches nothing.
  const std::vector<std::uint64_t> b = {9, 2, 3};
  EXPECT_EQ(t->match(b, 0, ~0ULL).blocks, 0u);
  // Another salt (another upstream block) sees none of it.
  EXPECT_EQ(t->match(a, 7, ~0ULL).blocks, 0u);
  t->insert(std::span(a).first(1), 7, 1, 1);
  EXPECT_EQ(t->match(a, 7, ~0ULL).tenants, 1ULL << 1);
  EXPECT_EQ(t->match(a, 0, ~0ULL).blocks, 5u);
  EXPECT_EQ(t->size(0), 2);
  EXPECT_EQ(t->size(3), 5);
  // Recording an existing key for another tenant adds the tenant, not an entry.
  t->insert(std::span(a).first(2), 0, 3, 3);
  EXPECT_EQ(t->size(3), 5);
  EXPECT_EQ(t->stats().used, 6u);  // five, and one under salt 7
}

TEST(PrefixTable, FullSetsEvictTheLeastRecentlyRecorded) {
  // One set of kWays entries: the ninth key evicts the oldest.
  Region region(PrefixTable::required_bytes(PrefixTable::kWays, 2));
  auto t = PrefixTable::create(region.data(), region.size(), PrefixTable::kWays, 2);
  ASSERT_NE(t, nullptr);
  for (std::uint64_t k = 1; k <= PrefixTable::kWays; ++k) {
    const std::uint64_t key[] = {k};
    t->insert(key, 0, 0, 0);
  }
  EXPECT_EQ(t->size(0), static_cast<std::int64_t>(PrefixTable::kWays));
  const std::uint64_t first[] = {1};
  t->insert(first, 0, 1, 1);  // refreshes key 1: key 2 is now the oldest
  const std::uint64_t fresh[] = {100};
  t->insert(fresh, 0, 1, 1);
  EXPECT_EQ(t->stats().evictions, 1u);
  const std::uint64_t two[] = {2};
  EXPECT_EQ(t->match(two, 0, ~0ULL).blocks, 0u);
  EXPECT_EQ(t->match(first, 0, ~0ULL).tenants, 0b11u);
  EXPECT_EQ(t->size(0), static_cast<std::int64_t>(PrefixTable::kWays) - 1);  // lost key 2
  EXPECT_EQ(t->size(1), 2);
}

TEST(PrefixTable, ConcurrentWritersKeepCountsConsistent) {
  constexpr std::size_t kEntries = 4096;
  Region region(PrefixTable::required_bytes(kEntries, 4));
  auto t = PrefixTable::create(region.data(), region.size(), kEntries, 4);
  ASSERT_NE(t, nullptr);
  std::vector<std::thread> threads;
  for (unsigned w = 0; w < 4; ++w) {
    threads.emplace_back([&, w] {
      std::vector<std::uint64_t> keys(64);
      for (std::uint64_t round = 0; round < 200; ++round) {
        for (std::size_t i = 0; i < keys.size(); ++i) keys[i] = 1 + (round * 64 + i) % 3000;
        t->insert(keys, 0, w, w);
      }
    });
  }
  for (auto& th : threads) th.join();
  // Every tenant's size equals the entries carrying its bit (a skipped write never half-lands).
  std::int64_t total = 0;
  for (std::uint32_t c = 0; c < 4; ++c) total += t->size(c);
  std::int64_t bits = 0;
  for (std::uint64_t k = 1; k <= 3000; ++k) {
    const std::uint64_t key[] = {k};
    bits += std::popcount(t->match(key, 0, ~0ULL).tenants);
  }
  EXPECT_EQ(total, bits);
  EXPECT_LE(t->stats().used, kEntries);
}

TEST(CacheAware, ImbalancedPicksTheLeastLoaded) {
  const PoolSnapshot pool = pool_with_outstanding({100, 10, 30});
  PrefixKeys keys;
  auto d = cache_aware_choose(pool, all_of(pool), nullptr, keys, 0, 0, {}, 1);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->reason, CacheAwareDecision::Reason::kImbalanced);
  EXPECT_EQ(d->chosen, 1u);
  EXPECT_EQ(d->runner_up, 2u);
  // 100 - 40 > 64 fails: balanced.
  const PoolSnapshot balanced = pool_with_outstanding({100, 40, 40});
  d = cache_aware_choose(balanced, all_of(balanced), nullptr, keys, 0, 0, {}, 1);
  EXPECT_EQ(d->reason, CacheAwareDecision::Reason::kSmallestTree);
  // Both conditions are needed: 300 > 1.5 x 230 fails.
  const PoolSnapshot close = pool_with_outstanding({300, 230});
  d = cache_aware_choose(close, all_of(close), nullptr, keys, 0, 0, {}, 1);
  EXPECT_EQ(d->reason, CacheAwareDecision::Reason::kSmallestTree);
  EXPECT_FALSE(cache_aware_choose(pool, {}, nullptr, keys, 0, 0, {}, 1));
}

TEST(CacheAware, MatchAboveThresholdFollowsTheCache) {
  Region region(PrefixTable::required_bytes(1024, 8));
  auto t = PrefixTable::create(region.data(), region.size(), 1024, 8);
  ASSERT_NE(t, nullptr);
  const PoolSnapshot pool = pool_with_outstanding({3, 1, 2, 0});
  const std::uint32_t base = 4;  // the pool's counters are 4..7
  PrefixKeyOptions o;
  o.block_tokens = 4;
  const PrefixKeys keys = prefix_keys_from_ids(tokens(40, 7), o);  // 10 blocks
  t->insert(std::span(keys.blocks).first(4), 0, 2, base + 2);         // 40% cached on server 2
  t->insert(std::span(keys.blocks).first(2), 0, 0, base + 0);         // 20% on server 0
  CacheAwareOptions opt;
  auto d = cache_aware_choose(pool, all_of(pool), t.get(), keys, 0, base, opt, 9);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->reason, CacheAwareDecision::Reason::kCacheHit);
  EXPECT_EQ(d->chosen, 2u);
  EXPECT_EQ(d->matched_blocks, 4u);
  EXPECT_DOUBLE_EQ(d->match_rate, 0.4);
  // Above the threshold only: 40% is not above 50%. The fallback is the smallest table:
  // servers 1 and 3 have none; server 3 is less loaded but ties on size go to the hash.
  opt.cache_threshold = 0.5;
  d = cache_aware_choose(pool, all_of(pool), t.get(), keys, 0, base, opt, 9);
  EXPECT_EQ(d->reason, CacheAwareDecision::Reason::kSmallestTree);
  EXPECT_TRUE(d->chosen == 1u || d->chosen == 3u);
  // A server that is not a candidate (tried, down) is not followed.
  const std::vector<std::size_t> without_2 = {0, 1, 3};
  opt.cache_threshold = 0.1;
  d = cache_aware_choose(pool, without_2, t.get(), keys, 0, base, opt, 9);
  EXPECT_EQ(d->reason, CacheAwareDecision::Reason::kCacheHit);
  EXPECT_EQ(d->chosen, 0u);
}

TEST(CacheAware, SmallestTreeSpreadsColdPrefixes) {
  // Cold prompts go to the server with the least recorded; recording them keeps the sizes even.
  Region region(PrefixTable::required_bytes(1 << 14, 4));
  auto t = PrefixTable::create(region.data(), region.size(), 1 << 14, 4);
  const PoolSnapshot pool = pool_with_outstanding({0, 0, 0, 0});
  PrefixKeyOptions o;
  o.block_tokens = 4;
  std::vector<int> chosen(4, 0);
  for (TokenId r = 0; r < 40; ++r) {
    const PrefixKeys keys = prefix_keys_from_ids(tokens(16, 1000 * (r + 1)), o);
    auto d = cache_aware_choose(pool, all_of(pool), t.get(), keys, 0, 0, {}, r);
    ASSERT_TRUE(d);
    EXPECT_EQ(d->reason, CacheAwareDecision::Reason::kSmallestTree);
    ++chosen[d->chosen];
    t->insert(keys.blocks, 0, static_cast<unsigned>(d->chosen), static_cast<std::uint32_t>(d->chosen));
  }
  for (int c : chosen) EXPECT_EQ(c, 10);
}

}  // namespace
}  // namespace omni
