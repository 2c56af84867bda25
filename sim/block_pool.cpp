#include "block_pool.hpp"

#include <stdexcept>

namespace omni::sim {

BlockPool::BlockPool(std::uint32_t num_blocks, std::uint32_t block_size)
    : block_size_(block_size),
      ref_(num_blocks, 0),
      hash_of_(num_blocks),
      prev_(num_blocks, kNone),
      next_(num_blocks, kNone),
      num_free_(num_blocks) {
  if (num_blocks == 0 || block_size == 0) {
    throw std::invalid_argument("BlockPool needs at least one block of at least one token");
  }
  free_never_cached_.reserve(num_blocks);
  for (std::uint32_t i = num_blocks; i-- > 0;) free_never_cached_.push_back(i);
  cached_.reserve(num_blocks);
}

double BlockPool::usage() const noexcept {
  return 1.0 - static_cast<double>(num_free_) / static_cast<double>(ref_.size());
}

std::uint32_t BlockPool::match_prefix(std::span<const BlockKey> keys) const {
  std::uint32_t n = 0;
  for (const auto& k : keys) {
    if (cached_.find(k.key) == cached_.end()) break;
    ++n;
  }
  return n;
}

std::uint32_t BlockPool::num_evictable(std::span<const BlockKey> keys) const {
  std::uint32_t n = 0;
  for (const auto& k : keys) {
    auto it = cached_.find(k.key);
    if (it != cached_.end() && ref_[it->second] == 0) ++n;
  }
  return n;
}

void BlockPool::acquire_cached(std::span<const BlockKey> keys, std::uint32_t n,
                               std::vector<std::uint32_t>& out) {
  for (std::uint32_t i = 0; i < n; ++i) {
    auto it = cached_.find(keys[i].key);
    if (it == cached_.end()) throw std::logic_error("acquire_cached past the cached prefix");
    const std::uint32_t id = it->second;
    if (ref_[id]++ == 0) {
      lru_remove(id);
      --num_free_;
    }
    out.push_back(id);
  }
}

void BlockPool::share(std::span<const std::uint32_t> ids, std::vector<std::uint32_t>& out) {
  for (const std::uint32_t id : ids) {
    if (ref_[id] == 0) throw std::logic_error("share of an unreferenced block");
  }
  for (const std::uint32_t id : ids) {
    ref_[id]++;
    out.push_back(id);
  }
}

bool BlockPool::allocate(std::uint32_t n, std::vector<std::uint32_t>& out) {
  if (n > num_free_) return false;
  for (std::uint32_t i = 0; i < n; ++i) {
    std::uint32_t id;
    if (!free_never_cached_.empty()) {
      id = free_never_cached_.back();
      free_never_cached_.pop_back();
    } else {
      id = lru_head_;
      lru_remove(id);
      uncache(id);
    }
    ref_[id] = 1;
    --num_free_;
    out.push_back(id);
  }
  return true;
}

void BlockPool::release(std::span<const std::uint32_t> ids) {
  for (auto it = ids.rbegin(); it != ids.rend(); ++it) {
    const std::uint32_t id = *it;
    if (ref_[id] == 0) throw std::logic_error("release of a free block");
    if (--ref_[id] != 0) continue;
    ++num_free_;
    if (hash_of_[id]) {
      lru_push_back(id);
    } else {
      free_never_cached_.push_back(id);
    }
  }
}

bool BlockPool::commit(std::uint32_t id, const BlockKey& key,
                       const std::optional<kv::ExternalHash>& parent,
                       std::span<const TokenId> tokens) {
  if (hash_of_[id]) throw std::logic_error("commit of an already cached block");
  if (!cached_.emplace(key.key, id).second) return false;
  hash_of_[id] = key;
  // Extend the previous BlockStored when this block continues its chain, so one request's
  // blocks of one step travel as one event, as vLLM sends them.
  if (!events_.empty() && parent) {
    if (auto* last = std::get_if<kv::BlockStored>(&events_.back());
        last != nullptr && !last->block_hashes.empty() && last->block_hashes.back() == *parent) {
      last->block_hashes.push_back(key.external);
      last->token_ids.insert(last->token_ids.end(), tokens.begin(), tokens.end());
      return true;
    }
  }
  kv::BlockStored ev;
  ev.block_hashes.push_back(key.external);
  ev.parent_block_hash = parent;
  ev.token_ids.assign(tokens.begin(), tokens.end());
  ev.block_size = block_size_;
  ev.medium = "GPU";
  events_.emplace_back(std::move(ev));
  return true;
}

void BlockPool::uncache(std::uint32_t id) {
  auto& h = hash_of_[id];
  if (!h) return;
  cached_.erase(h->key);
  // Merge consecutive removals into one event.
  if (!events_.empty()) {
    if (auto* last = std::get_if<kv::BlockRemoved>(&events_.back())) {
      last->block_hashes.push_back(h->external);
      h.reset();
      return;
    }
  }
  kv::BlockRemoved ev;
  ev.block_hashes.push_back(h->external);
  ev.medium = "GPU";
  events_.emplace_back(std::move(ev));
  h.reset();
}

void BlockPool::clear_cache() {
  while (lru_head_ != kNone) {
    const std::uint32_t id = lru_head_;
    lru_remove(id);
    hash_of_[id].reset();
    free_never_cached_.push_back(id);
  }
  // Referenced blocks keep their contents but are no longer findable by hash.
  for (auto& [key, id] : cached_) hash_of_[id].reset();
  cached_.clear();
  events_.emplace_back(kv::AllBlocksCleared{});
}

std::vector<kv::Event> BlockPool::take_events() {
  std::vector<kv::Event> out;
  out.swap(events_);
  return out;
}

void BlockPool::lru_remove(std::uint32_t id) noexcept {
  const std::uint32_t p = prev_[id], n = next_[id];
  if (p != kNone) next_[p] = n; else lru_head_ = n;
  if (n != kNone) prev_[n] = p; else lru_tail_ = p;
  prev_[id] = next_[id] = kNone;
}

void BlockPool::lru_push_back(std::uint32_t id) noexcept {
  prev_[id] = lru_tail_;
  next_[id] = kNone;
  if (lru_tail_ != kNone) next_[lru_tail_] = id; else lru_head_ = id;
  lru_tail_ = id;
}

}  // namespace omni::sim
