#include "oracle.hpp"

#include <vector>

namespace omni::replay {

LruOracle::LruOracle(std::uint64_t capacity_blocks, std::uint32_t block_size)
    : capacity_(capacity_blocks), block_size_(block_size) {}

std::uint64_t LruOracle::access(std::span<const BlockHash64> blocks, std::uint64_t prompt_tokens) {
  const std::uint64_t can_hit = prompt_tokens == 0 ? 0 : (prompt_tokens - 1) / block_size_;
  std::uint64_t hits = 0;
  while (hits < can_hit && hits < blocks.size() && index_.count(blocks[hits]) != 0) ++hits;
  // Last block first, so the first block ends up most recently used.
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    if (auto found = index_.find(*it); found != index_.end()) {
      lru_.splice(lru_.begin(), lru_, found->second);
      continue;
    }
    lru_.push_front(*it);
    index_.emplace(*it, lru_.begin());
    if (index_.size() > capacity_) {
      index_.erase(lru_.back());
      lru_.pop_back();
    }
  }
  return hits * block_size_;
}

OracleResult run_oracle(const Workload& workload, const PromptBuilder& prompts,
                        std::uint64_t capacity_blocks, std::uint32_t block_size) {
  OracleResult out;
  out.capacity_blocks = capacity_blocks;
  out.block_size = block_size;
  LruOracle cache(capacity_blocks, block_size);
  std::vector<TokenId> tokens;
  for (const Request& r : workload.requests) {
    tokens.clear();
    prompts.for_each_position(r, [&](std::uint64_t segment, std::uint32_t position) {
      tokens.push_back(prompts.token(segment, position));
    });
    const auto blocks = hash_blocks64(tokens, block_size);
    out.prompt_tokens += r.input_tokens;
    out.hit_tokens += cache.access(blocks, r.input_tokens);
  }
  return out;
}

}  // namespace omni::replay
