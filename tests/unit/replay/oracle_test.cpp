#include "oracle.hpp"

#include <gtest/gtest.h>

#include <vector>

namespace omni::replay {
namespace {

// Block "hashes" are arbitrary distinct values here: the oracle only compares them.
TEST(ReplayOracle, HitsTheCachedLeadingRun) {
  LruOracle o(100, 4);
  EXPECT_EQ(o.access(std::vector<BlockHash64>{1, 2, 3}, 12), 0u);
  // Blocks 1, 2 cached, then a new one: the run stops there.
  EXPECT_EQ(o.access(std::vector<BlockHash64>{1, 2, 9, 3}, 17), 8u);
  // A cached block after a miss does not count.
  EXPECT_EQ(o.access(std::vector<BlockHash64>{7, 2, 3}, 13), 0u);
}

TEST(ReplayOracle, LastPromptTokenIsAlwaysComputed) {
  LruOracle o(100, 4);
  o.access(std::vector<BlockHash64>{1, 2, 3}, 12);
  // 12 tokens: at most floor(11 / 4) = 2 blocks hit, as the engines cap it.
  EXPECT_EQ(o.access(std::vector<BlockHash64>{1, 2, 3}, 12), 8u);
  EXPECT_EQ(o.access(std::vector<BlockHash64>{1, 2, 3}, 13), 12u);
  EXPECT_EQ(o.access(std::vector<BlockHash64>{1}, 1), 0u);
}

TEST(ReplayOracle, EvictsLeastRecentlyUsedTailsFirst) {
  LruOracle o(4, 1);
  o.access(std::vector<BlockHash64>{1, 2, 3}, 10);  // LRU order, most recent first: 1 2 3
  o.access(std::vector<BlockHash64>{5, 6}, 10);     // 5 6 1 2 3 -> 3 evicted
  EXPECT_EQ(o.size(), 4u);
  EXPECT_EQ(o.access(std::vector<BlockHash64>{1, 2, 3}, 10), 2u);  // 1 2 hit, 3 gone
  // Now 1 2 3 5 (6 evicted): 5 is the least recent.
  EXPECT_EQ(o.access(std::vector<BlockHash64>{5, 6}, 10), 1u);
  EXPECT_EQ(o.size(), 4u);
}

TEST(ReplayOracle, OverWorkloadsWithSharedPrefixes) {
  Workload w;
  Request a;
  a.input_tokens = 1024;
  a.segments = {{1, 512}, {2, 512}};
  Request b = a;
  b.input_tokens = 1000;
  b.segments = {{1, 512}, {3, 512}};
  w.requests = {a, b, a};
  const PromptBuilder prompts({});
  const auto big = run_oracle(w, prompts, 1000, 64);
  EXPECT_EQ(big.prompt_tokens, 3048u);
  // b hits block 1's 512 tokens; the repeat of a hits all but its last block (1023 / 64 = 15).
  EXPECT_EQ(big.hit_tokens, 512u + 15 * 64);
  EXPECT_DOUBLE_EQ(big.hit_rate(), (512.0 + 960) / 3048);
  // Eight blocks keep only the shared segment's eight blocks (each prompt's head outlives its
  // tail): b and the repeat of a hit those.
  const auto small = run_oracle(w, prompts, 8, 64);
  EXPECT_EQ(small.hit_tokens, 8u * 64 + 8 * 64);
}

}  // namespace
}  // namespace omni::replay
