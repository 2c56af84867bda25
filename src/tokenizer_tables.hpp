// Flat hash tables and the added-token trie of the tokenizer (internal).
#pragma once

#include <omni/block_hash.hpp>  // TokenId

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace omni::tokenizer_detail {

inline std::uint64_t mul_mix(std::uint64_t a, std::uint64_t b) {
  const unsigned __int128 r = static_cast<unsigned __int128>(a) * b;
  return static_cast<std::uint64_t>(r) ^ static_cast<std::uint64_t>(r >> 64);
}

inline std::uint64_t hash_bytes(std::string_view s) {
  const char* p = s.data();
  std::size_t n = s.size();
  std::uint64_t h = 0x243F6A8885A308D3ULL ^ (n * 0x9E3779B97F4A7C15ULL);
  while (n >= 8) {
    std::uint64_t w;
    std::memcpy(&w, p, 8);
    h = mul_mix(h ^ w, 0x9E3779B97F4A7C15ULL);
    p += 8;
    n -= 8;
  }
  if (n > 0) {
    std::uint64_t w = 0;
    std::memcpy(&w, p, n);
    h = mul_mix(h ^ w, 0xBF58476D1CE4E5B9ULL);
  }
  return mul_mix(h, 0x94D049BB133111EBULL);
}

inline std::size_t next_pow2(std::size_t n) {
  std::size_t p = 16;
  while (p < n) p <<= 1;
  return p;
}

// Byte string -> uint32 value, open addressing (linear probing), keys in one arena.
class StringMap {
 public:
  void reserve(std::size_t n) {
    entries_.reserve(n);
    if (next_pow2(n * 2) > slots_.size()) rehash(next_pow2(n * 2));
  }

  const std::uint32_t* find(std::string_view key) const { return find_h(key, hash_bytes(key)); }
  std::uint32_t* find(std::string_view key) {
    return const_cast<std::uint32_t*>(std::as_const(*this).find(key));
  }
  const std::uint32_t* find_h(std::string_view key, std::uint64_t h) const {
    if (slots_.empty()) return nullptr;
    const auto tag = static_cast<std::uint32_t>(h >> 32);
    for (std::size_t i = h & mask_;; i = (i + 1) & mask_) {
      const std::uint32_t e = slots_[i];
      if (e == 0) return nullptr;
      const Entry& en = entries_[e - 1];
      if (en.tag == tag && en.len == key.size() &&
          std::memcmp(arena_.data() + en.off, key.data(), key.size()) == 0) {
        return &en.value;
      }
    }
  }

  // Inserts key with `value` unless present; returns the value slot and whether it is new.
  std::pair<std::uint32_t*, bool> insert(std::string_view key, std::uint32_t value) {
    const std::uint64_t h = hash_bytes(key);
    if (std::uint32_t* v = const_cast<std::uint32_t*>(find_h(key, h))) return {v, false};
    if ((entries_.size() + 1) * 2 > slots_.size()) rehash(next_pow2((entries_.size() + 1) * 2));
    Entry en;
    en.off = static_cast<std::uint32_t>(arena_.size());
    en.len = static_cast<std::uint32_t>(key.size());
    en.tag = static_cast<std::uint32_t>(h >> 32);
    en.value = value;
    arena_.append(key);
    entries_.push_back(en);
    place(h, static_cast<std::uint32_t>(entries_.size()));
    return {&entries_.back().value, true};
  }

  std::size_t size() const { return entries_.size(); }
  std::string_view key_at(std::size_t i) const {
    return std::string_view(arena_).substr(entries_[i].off, entries_[i].len);
  }
  std::uint32_t value_at(std::size_t i) const { return entries_[i].value; }

  void shrink_to_fit() {
    arena_.shrink_to_fit();
    entries_.shrink_to_fit();
  }
  std::size_t memory_bytes() const {
    return arena_.capacity() + entries_.capacity() * sizeof(Entry) +
           slots_.capacity() * sizeof(std::uint32_t);
  }

 private:
  struct Entry {
    std::uint32_t off;
    std::uint32_t len;
    std::uint32_t tag;
    mutable std::uint32_t value;
  };

  void place(std::uint64_t h, std::uint32_t entry_plus_one) {
    for (std::size_t i = h & mask_;; i = (i + 1) & mask_) {
      if (slots_[i] == 0) {
        slots_[i] = entry_plus_one;
        return;
      }
    }
  }
  void rehash(std::size_t n) {
    slots_.assign(n, 0);
    mask_ = n - 1;
    for (std::size_t e = 0; e < entries_.size(); ++e) {
      place(hash_bytes(key_at(e)), static_cast<std::uint32_t>(e + 1));
    }
  }

  std::vector<std::uint32_t> slots_;
  std::vector<Entry> entries_;
  std::string arena_;
  std::size_t mask_ = 0;
};

// (left symbol, right symbol) -> (rank, merged symbol).
class MergeMap {
 public:
  struct Value {
    std::uint32_t rank;
    std::uint32_t merged;
  };

  void reserve(std::size_t n) { rehash(next_pow2(n + n / 2 + 1)); }

  const Value* find(std::uint32_t a, std::uint32_t b) const {
    const std::uint64_t key = (std::uint64_t{a} << 32) | b;
    for (std::size_t i = slot_of(key);; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key == key) return &s.value;
      if (s.key == kEmpty) return nullptr;
    }
  }

  void prefetch(std::uint32_t a, std::uint32_t b) const {
    __builtin_prefetch(&slots_[slot_of((std::uint64_t{a} << 32) | b)]);
  }

  // Sets (overwrites) the value of (a, b).
  void set(std::uint32_t a, std::uint32_t b, Value v) {
    if ((size_ + 1) * 3 > slots_.size() * 2) rehash(slots_.size() * 2);
    const std::uint64_t key = (std::uint64_t{a} << 32) | b;
    for (std::size_t i = slot_of(key);; i = (i + 1) & mask_) {
      Slot& s = slots_[i];
      if (s.key == key) {
        s.value = v;
        return;
      }
      if (s.key == kEmpty) {
        s.key = key;
        s.value = v;
        ++size_;
        return;
      }
    }
  }

  std::size_t size() const { return size_; }
  std::size_t memory_bytes() const { return slots_.capacity() * sizeof(Slot); }

 private:
  static constexpr std::uint64_t kEmpty = ~std::uint64_t{0};
  struct Slot {
    std::uint64_t key = kEmpty;
    Value value{};
  };
  std::size_t slot_of(std::uint64_t key) const {
    return static_cast<std::size_t>((key * 0x9E3779B97F4A7C15ULL) >> shift_);
  }
  void rehash(std::size_t n) {
    n = next_pow2(n);
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(n, Slot{});
    mask_ = n - 1;
    shift_ = 64 - static_cast<unsigned>(__builtin_ctzll(n));
    size_ = 0;
    for (const Slot& s : old) {
      if (s.key != kEmpty) set(static_cast<std::uint32_t>(s.key >> 32),
                               static_cast<std::uint32_t>(s.key), s.value);
    }
  }

  std::vector<Slot> slots_{16};
  std::size_t mask_ = 15;
  unsigned shift_ = 60;
  std::size_t size_ = 0;
};

// A bounded cache of word -> ids shared by all threads: sharded, each shard behind a mutex;
// a full shard is emptied (words repeat, so it refills with the current ones).
class WordCache {
 public:
  static constexpr std::size_t kShards = 64;
  static constexpr std::size_t kEntriesPerShard = 1024;
  static constexpr std::size_t kArenaPerShard = 32 * 1024;
  static constexpr std::size_t kMaxKey = 255;

  WordCache() : shards_(new Shard[kShards]) {}

  // Appends the cached ids of `key` to `out`; false when absent.
  bool lookup(std::uint64_t h, std::string_view key, std::vector<TokenId>& out) const {
    Shard& s = shards_[shard_of(h)];
    std::lock_guard lock(s.mu);
    if (s.slots.empty()) return false;
    const auto tag = static_cast<std::uint32_t>(h >> 32);
    for (std::size_t i = (h >> 6) & (kSlots - 1);; i = (i + 1) & (kSlots - 1)) {
      const std::uint16_t e = s.slots[i];
      if (e == 0) return false;
      const Entry& en = s.entries[e - 1];
      if (en.tag == tag && en.klen == key.size() &&
          std::memcmp(s.arena.data() + en.off, key.data(), key.size()) == 0) {
        const std::size_t at = out.size();
        out.resize(at + en.nids);
        std::memcpy(out.data() + at, s.arena.data() + en.off + en.klen, en.nids * sizeof(TokenId));
        return true;
      }
    }
  }

  void insert(std::uint64_t h, std::string_view key, std::span<const TokenId> ids) {
    if (key.size() > kMaxKey || ids.size() > 0xFFFF) return;
    const std::size_t need = key.size() + ids.size() * sizeof(TokenId);
    Shard& s = shards_[shard_of(h)];
    std::lock_guard lock(s.mu);
    if (s.slots.empty()) {
      s.slots.assign(kSlots, 0);
      s.entries.reserve(kEntriesPerShard);
      s.arena.reserve(kArenaPerShard);
    }
    if (s.entries.size() >= kEntriesPerShard || s.arena.size() + need > kArenaPerShard) {
      std::fill(s.slots.begin(), s.slots.end(), 0);
      s.entries.clear();
      s.arena.clear();
    }
    const auto tag = static_cast<std::uint32_t>(h >> 32);
    std::size_t i = (h >> 6) & (kSlots - 1);
    for (;; i = (i + 1) & (kSlots - 1)) {
      const std::uint16_t e = s.slots[i];
      if (e == 0) break;
      const Entry& en = s.entries[e - 1];
      if (en.tag == tag && en.klen == key.size() &&
          std::memcmp(s.arena.data() + en.off, key.data(), key.size()) == 0) {
        return;  // another thread got there first
      }
    }
    Entry en;
    en.tag = tag;
    en.off = static_cast<std::uint32_t>(s.arena.size());
    en.klen = static_cast<std::uint16_t>(key.size());
    en.nids = static_cast<std::uint16_t>(ids.size());
    s.arena.append(key);
    s.arena.append(reinterpret_cast<const char*>(ids.data()), ids.size() * sizeof(TokenId));
    s.entries.push_back(en);
    s.slots[i] = static_cast<std::uint16_t>(s.entries.size());
  }

  // Bytes held when every shard is full.
  static constexpr std::size_t max_memory_bytes() {
    return kShards * (sizeof(Shard) + kSlots * sizeof(std::uint16_t) +
                      kEntriesPerShard * sizeof(Entry) + kArenaPerShard);
  }

 private:
  static constexpr std::size_t kSlots = 2 * kEntriesPerShard;
  struct Entry {
    std::uint32_t tag;
    std::uint32_t off;
    std::uint16_t klen;
    std::uint16_t nids;
  };
  struct Shard {
    std::mutex mu;
    std::vector<std::uint16_t> slots;
    std::vector<Entry> entries;
    std::string arena;
  };
  static std::size_t shard_of(std::uint64_t h) { return h & (kShards - 1); }

  std::unique_ptr<Shard[]> shards_;
};

// Longest-match dictionary of added-token contents (the reference's DictionarySplitter).
class TokenTrie {
 public:
  void build(const std::vector<std::string>& words) {
    nodes_.assign(1, Node{});
    std::vector<std::vector<std::pair<unsigned char, std::uint32_t>>> kids(1);
    first_.fill(false);
    for (const std::string& w : words) {
      if (w.empty()) continue;
      first_[static_cast<unsigned char>(w[0])] = true;
      std::uint32_t n = 0;
      for (char ch : w) {
        const auto b = static_cast<unsigned char>(ch);
        std::uint32_t next = 0;
        for (const auto& [kb, kn] : kids[n]) {
          if (kb == b) next = kn;
        }
        if (next == 0) {
          next = static_cast<std::uint32_t>(nodes_.size());
          nodes_.push_back(Node{});
          kids.emplace_back();
          kids[n].emplace_back(b, next);
        }
        n = next;
      }
      nodes_[n].len = static_cast<std::uint32_t>(w.size());
    }
    // Flatten the children into sorted runs of one edge array.
    edges_.clear();
    for (std::size_t n = 0; n < nodes_.size(); ++n) {
      auto& k = kids[n];
      std::sort(k.begin(), k.end());
      nodes_[n].first_edge = static_cast<std::uint32_t>(edges_.size());
      nodes_[n].edge_count = static_cast<std::uint32_t>(k.size());
      for (const auto& [b, child] : k) edges_.push_back({b, child});
    }
    empty_ = words.empty() ||
             std::all_of(words.begin(), words.end(), [](const std::string& w) { return w.empty(); });
    single_first_ = -1;
    int count = 0;
    for (int b = 0; b < 256; ++b) {
      if (first_[b]) {
        ++count;
        single_first_ = b;
      }
    }
    if (count != 1) single_first_ = -1;
  }

  bool empty() const { return empty_; }

  // Length of the longest word starting at s[i], or 0.
  std::size_t longest_at(std::string_view s, std::size_t i) const {
    std::uint32_t n = 0;
    std::size_t best = 0;
    for (std::size_t j = i; j < s.size(); ++j) {
      const auto b = static_cast<unsigned char>(s[j]);
      const Node& node = nodes_[n];
      std::uint32_t next = 0;
      for (std::uint32_t e = node.first_edge; e < node.first_edge + node.edge_count; ++e) {
        if (edges_[e].byte == b) {
          next = edges_[e].child;
          break;
        }
        if (edges_[e].byte > b) break;
      }
      if (next == 0) break;
      n = next;
      if (nodes_[n].len) best = nodes_[n].len;
    }
    return best;
  }

  // Next position >= i whose byte can start a word (s.size() if none).
  std::size_t next_candidate(std::string_view s, std::size_t i) const {
    if (single_first_ >= 0) {
      const void* p = std::memchr(s.data() + i, single_first_, s.size() - i);
      return p ? static_cast<std::size_t>(static_cast<const char*>(p) - s.data()) : s.size();
    }
    while (i < s.size() && !first_[static_cast<unsigned char>(s[i])]) ++i;
    return i;
  }

  std::size_t memory_bytes() const {
    return nodes_.capacity() * sizeof(Node) + edges_.capacity() * sizeof(Edge);
  }

 private:
  struct Node {
    std::uint32_t first_edge = 0;
    std::uint32_t edge_count = 0;
    std::uint32_t len = 0;  // length of the word ending here, 0 if none
  };
  struct Edge {
    unsigned char byte;
    std::uint32_t child;
  };
  std::vector<Node> nodes_;
  std::vector<Edge> edges_;
  std::array<bool, 256> first_{};
  int single_first_ = -1;
  bool empty_ = true;
};

}  // namespace omni::tokenizer_detail
