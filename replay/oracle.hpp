// The prefix-cache hit rate of an ideal cluster: one least-recently-used cache of N blocks that
// every request shares, computed in-process over the workload's prompts. It is the ceiling a
// KV-aware scheduler can approach with that much cache, to compare the engines' measured hit
// rate against.
//
// Blocks are full blocks of `block_size` prompt tokens, keyed by the same chained hash the
// engines use (omni::hash_blocks64), so a block stands for its whole prefix. A request hits
// the longest run of leading blocks that are all cached, capped as the engines cap it: the last
// prompt token is always computed, so at most floor((len - 1) / block_size) blocks hit. Then
// all its full blocks become most recently used, the first block most of all: eviction takes a
// prompt's tail before its head, since a cached block is useless without its predecessors.
#pragma once

#include "prompt.hpp"
#include "workload.hpp"

#include <omni/block_hash.hpp>

#include <cstdint>
#include <list>
#include <span>
#include <unordered_map>

namespace omni::replay {

class LruOracle {
 public:
  LruOracle(std::uint64_t capacity_blocks, std::uint32_t block_size);

  // One prompt of `prompt_tokens` tokens whose full blocks hash to `blocks` (in order): returns
  // the tokens that hit, and caches the blocks.
  std::uint64_t access(std::span<const BlockHash64> blocks, std::uint64_t prompt_tokens);

  std::uint64_t size() const { return index_.size(); }

 private:
  std::uint64_t capacity_;
  std::uint32_t block_size_;
  std::list<BlockHash64> lru_;  // most recently used first
  std::unordered_map<BlockHash64, std::list<BlockHash64>::iterator> index_;
};

struct OracleResult {
  std::uint64_t capacity_blocks = 0;
  std::uint32_t block_size = 0;
  std::uint64_t prompt_tokens = 0;
  std::uint64_t hit_tokens = 0;
  double hit_rate() const {
    return prompt_tokens ? static_cast<double>(hit_tokens) / static_cast<double>(prompt_tokens)
                         : 0.0;
  }
};

// Runs the workload's prompts, in arrival order, through an LruOracle.
OracleResult run_oracle(const Workload& workload, const PromptBuilder& prompts,
                        std::uint64_t capacity_blocks, std::uint32_t block_size);

}  // namespace omni::replay
