#include "omni/prefix_table.hpp"

#include <algorithm>
#include <bit>
#include <cstring>
#include <limits>
#include <new>

namespace omni {
namespace {

constexpr std::uint64_t kMagic = 0x6f6d6e6970667874ULL;  // "omnipfxt"
constexpr std::uint64_t kStampBits = 48;                 // stamp's low bits; counter base above
constexpr std::uint64_t kStampMask = (std::uint64_t{1} << kStampBits) - 1;
constexpr int kSpins = 64;
// A set lock older than this many recorded keys was left by a writer that died: take it over.
constexpr std::uint64_t kStaleLockAge = std::uint64_t{1} << 20;

std::uint64_t nonzero(std::uint64_t key) noexcept { return key == 0 ? 1 : key; }

// A chained hash of one block of bytes given its parent: 8-byte words folded through mix64().
std::uint64_t hash_bytes(std::uint64_t parent, std::string_view bytes) noexcept {
  std::uint64_t h = mix64(parent ^ (bytes.size() * 0x9fb21c651e98df25ULL));
  std::size_t i = 0;
  for (; i + 8 <= bytes.size(); i += 8) {
    std::uint64_t w;
    std::memcpy(&w, bytes.data() + i, 8);
    h = mix64(h ^ w) + 0x94d049bb133111ebULL;
  }
  std::uint64_t tail = 0;
  std::memcpy(&tail, bytes.data() + i, bytes.size() - i);
  return mix64(h ^ tail ^ 0xbf58476d1ce4e5b9ULL);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Prefix keys
// ---------------------------------------------------------------------------------------------

PrefixKeys prefix_keys_from_ids(std::span<const TokenId> ids, const PrefixKeyOptions& options) {
  PrefixKeys out;
  out.token_ids = true;
  out.units = ids.size();
  out.block_units = std::max<std::size_t>(1, options.block_tokens);
  const std::size_t blocks = std::min(ids.size() / out.block_units, options.max_blocks);
  out.blocks.reserve(blocks);
  std::uint64_t parent = kRootBlockHash ^ mix64(options.salt);
  for (std::size_t b = 0; b < blocks; ++b) {
    parent = hash_block64(parent, ids.subspan(b * out.block_units, out.block_units));
    out.blocks.push_back(nonzero(parent));
  }
  return out;
}

PrefixKeys prefix_keys_from_text(std::string_view text, const PrefixKeyOptions& options) {
  PrefixKeys out;
  out.units = text.size();
  out.block_units = std::max<std::size_t>(1, options.block_bytes);
  const std::size_t blocks = std::min(text.size() / out.block_units, options.max_blocks);
  out.blocks.reserve(blocks);
  std::uint64_t parent = kRootBlockHash ^ mix64(options.salt ^ 0x7465787400000000ULL);
  for (std::size_t b = 0; b < blocks; ++b) {
    parent = hash_bytes(parent, text.substr(b * out.block_units, out.block_units));
    out.blocks.push_back(nonzero(parent));
  }
  return out;
}

namespace {

// The first item of a prompt field: ids if it is [int] or [[int]], text if it is a string or
// [string]; at most `limit` ids are read, and `units` is the item's whole length. Returns false
// when it is neither.
bool first_item(const nlohmann::ordered_json& v, std::size_t limit, std::vector<TokenId>& ids,
                std::string_view& text, bool& is_ids, std::size_t& units) {
  const nlohmann::ordered_json* item = &v;
  if (v.is_array() && !v.empty() && (v.front().is_array() || v.front().is_string())) {
    item = &v.front();
  }
  if (item->is_string()) {
    text = item->get_ref<const std::string&>();
    units = text.size();
    is_ids = false;
    return true;
  }
  if (!item->is_array()) return false;
  units = item->size();
  ids.reserve(std::min(limit, units));
  for (const auto& id : *item) {
    if (ids.size() == limit) break;
    if (!id.is_number_integer()) return false;
    ids.push_back(static_cast<TokenId>(id.get<std::int64_t>()));
  }
  is_ids = true;
  return true;
}

}  // namespace

PrefixKeys prefix_keys_of(const ParsedBody& body, const PrefixKeyOptions& options) {
  const auto& j = body.json;
  const char* field = nullptr;
  switch (body.features.api) {
    case Api::kCompletions: field = "prompt"; break;
    case Api::kGenerate:
      field = j.contains("input_ids") && !j["input_ids"].is_null() ? "input_ids" : "text";
      break;
    case Api::kChatCompletions: break;
  }
  const std::size_t limit =
      options.max_blocks * std::max<std::size_t>(1, std::max(options.block_tokens,
                                                             options.block_bytes));
  if (field != nullptr) {
    std::vector<TokenId> ids;
    std::string_view text;
    bool is_ids = false;
    std::size_t units = 0;
    auto it = j.find(field);
    if (it == j.end() || !first_item(*it, limit, ids, text, is_ids, units)) {
      return prefix_keys_from_text({}, options);
    }
    PrefixKeys keys = is_ids ? prefix_keys_from_ids(ids, options)
                             : prefix_keys_from_text(text, options);
    keys.units = units;
    return keys;
  }
  // Chat: the text of the messages in order, each as "role\ncontent\n". Only the first
  // `limit` bytes are kept (the keys cover no more); `units` counts them all.
  std::string text;
  std::size_t units = 0;
  auto append = [&](std::string_view part) {
    units += part.size();
    if (text.size() < limit) text.append(part.substr(0, limit - text.size()));
  };
  auto messages = j.find("messages");
  if (messages != j.end() && messages->is_array()) {
    for (const auto& m : *messages) {
      if (!m.is_object()) continue;
      auto role = m.find("role");
      if (role != m.end() && role->is_string()) append(role->get_ref<const std::string&>());
      append("\n");
      auto content = m.find("content");
      if (content != m.end() && content->is_string()) {
        append(content->get_ref<const std::string&>());
      } else if (content != m.end() && content->is_array()) {
        for (const auto& part : *content) {
          if (!part.is_object()) continue;
          auto t = part.find("text");
          if (t != part.end() && t->is_string()) append(t->get_ref<const std::string&>());
        }
      }
      append("\n");
    }
  }
  PrefixKeys keys = prefix_keys_from_text(text, options);
  keys.units = units;
  return keys;
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

struct PrefixEntry {
  std::atomic<std::uint64_t> key;      // 0: empty
  std::atomic<std::uint64_t> tenants;  // bit i: sent to tenant i of the key's salt
  std::atomic<std::uint64_t> stamp;    // counter base << 48 | recording clock
};

struct PrefixTable::Layout {
  std::uint64_t magic;
  std::uint64_t sets;
  std::uint64_t counters;
  std::uint64_t bytes;
  std::atomic<std::uint64_t> clock;  // keys recorded so far: the LRU order
  std::atomic<std::uint64_t> used;
  std::atomic<std::uint64_t> evictions;
  std::atomic<std::uint64_t> contended;

  std::atomic<std::int64_t>* sizes() noexcept {
    return reinterpret_cast<std::atomic<std::int64_t>*>(this + 1);
  }
  std::atomic<std::uint64_t>* locks() noexcept {
    return reinterpret_cast<std::atomic<std::uint64_t>*>(sizes() + counters);
  }
  PrefixEntry* entries() noexcept {
    return reinterpret_cast<PrefixEntry*>(locks() + sets);
  }
  PrefixEntry* set_of(std::uint64_t key) noexcept {
    const auto set = static_cast<std::uint64_t>(
        (static_cast<unsigned __int128>(mix64(key)) * sets) >> 64);
    return entries() + set * kWays;
  }
  std::atomic<std::uint64_t>& lock_of(const PrefixEntry* set) noexcept {
    return locks()[static_cast<std::size_t>(set - entries()) / kWays];
  }
};

static_assert(sizeof(PrefixEntry) == 24);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
static_assert(sizeof(PrefixTable::Layout) % 8 == 0);

std::size_t PrefixTable::required_bytes(std::uint64_t entries, std::uint32_t counters) noexcept {
  const std::uint64_t sets = std::max<std::uint64_t>(1, (entries + kWays - 1) / kWays);
  return sizeof(Layout) + counters * sizeof(std::int64_t) + sets * sizeof(std::uint64_t) +
         sets * kWays * sizeof(PrefixEntry);
}

std::unique_ptr<PrefixTable> PrefixTable::create(void* region, std::size_t bytes,
                                                 std::uint64_t entries, std::uint32_t counters) {
  if (region == nullptr || counters == 0 || reinterpret_cast<std::uintptr_t>(region) % 8 != 0 ||
      bytes < required_bytes(entries, counters)) {
    return nullptr;
  }
  const std::size_t need = required_bytes(entries, counters);
  std::memset(region, 0, need);
  auto* l = new (region) Layout{};
  l->sets = std::max<std::uint64_t>(1, (entries + kWays - 1) / kWays);
  l->counters = counters;
  l->bytes = need;
  for (std::uint64_t i = 0; i < counters; ++i) new (l->sizes() + i) std::atomic<std::int64_t>(0);
  for (std::uint64_t i = 0; i < l->sets; ++i) new (l->locks() + i) std::atomic<std::uint64_t>(0);
  for (std::uint64_t i = 0; i < l->sets * kWays; ++i) new (l->entries() + i) PrefixEntry{};
  std::atomic_thread_fence(std::memory_order_release);
  l->magic = kMagic;
  return std::unique_ptr<PrefixTable>(new PrefixTable(l));
}

std::unique_ptr<PrefixTable> PrefixTable::attach(void* region, std::size_t bytes) {
  if (region == nullptr || bytes < sizeof(Layout)) return nullptr;
  auto* l = static_cast<Layout*>(region);
  if (l->magic != kMagic || l->bytes > bytes) return nullptr;
  return std::unique_ptr<PrefixTable>(new PrefixTable(l));
}

namespace {
std::uint64_t salted(std::uint64_t key, std::uint64_t salt) noexcept {
  return salt == 0 ? key : nonzero(key ^ mix64(salt));
}
}  // namespace

PrefixTable::Match PrefixTable::match(std::span<const std::uint64_t> keys, std::uint64_t salt,
                                      std::uint64_t eligible) const noexcept {
  Match m;
  std::uint64_t running = eligible;
  for (std::size_t i = 0; i < keys.size() && running != 0; ++i) {
    const std::uint64_t key = salted(keys[i], salt);
    const PrefixEntry* set = layout_->set_of(key);
    std::uint64_t holders = 0;
    for (std::size_t w = 0; w < kWays; ++w) {
      if (set[w].key.load(std::memory_order_acquire) != key) continue;
      holders = set[w].tenants.load(std::memory_order_acquire);
      // Rewritten meanwhile: the tenants may belong to another key.
      if (set[w].key.load(std::memory_order_acquire) != key) holders = 0;
      break;
    }
    if ((holders & running) == 0) break;
    running &= holders;
    m.blocks = i + 1;
    m.tenants = running;
  }
  return m;
}

void PrefixTable::insert(std::span<const std::uint64_t> keys, std::uint64_t salt,
                         unsigned tenant, std::uint32_t counter) noexcept {
  Layout& l = *layout_;
  if (tenant >= kMaxTenants || counter >= l.counters || counter < tenant) return;
  const std::uint64_t bit = std::uint64_t{1} << tenant;
  // One clock reading per call: the keys take consecutive stamps, in order.
  std::uint64_t now = l.clock.fetch_add(keys.size(), std::memory_order_relaxed);
  for (const std::uint64_t unsalted : keys) {
    const std::uint64_t key = salted(unsalted, salt);
    PrefixEntry* set = l.set_of(key);
    std::atomic<std::uint64_t>& lock = l.lock_of(set);
    ++now;
    bool locked = false;
    for (int spin = 0; spin < kSpins && !locked; ++spin) {
      std::uint64_t held = lock.load(std::memory_order_relaxed);
      // Held, and not for long (a holder that took it after our clock reading is young).
      if (held != 0 && (held >= now || now - held < kStaleLockAge)) continue;
      locked = lock.compare_exchange_weak(held, now, std::memory_order_acquire);
    }
    if (!locked) {
      l.contended.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    const std::uint64_t stamp = (std::uint64_t{counter - tenant} << kStampBits) | (now & kStampMask);
    PrefixEntry* hit = nullptr;
    PrefixEntry* victim = nullptr;
    for (std::size_t w = 0; w < kWays; ++w) {
      const std::uint64_t k = set[w].key.load(std::memory_order_relaxed);
      if (k == key) {
        hit = &set[w];
        break;
      }
      if (victim == nullptr || victim->key.load(std::memory_order_relaxed) != 0) {
        // Prefer an empty entry, else the least recently recorded.
        if (k == 0 || victim == nullptr ||
            (set[w].stamp.load(std::memory_order_relaxed) & kStampMask) <
                (victim->stamp.load(std::memory_order_relaxed) & kStampMask)) {
          victim = &set[w];
        }
      }
    }
    if (hit != nullptr) {
      const std::uint64_t old = hit->tenants.load(std::memory_order_relaxed);
      if ((old & bit) == 0) {
        hit->tenants.store(old | bit, std::memory_order_release);
        l.sizes()[counter].fetch_add(1, std::memory_order_relaxed);
      }
      hit->stamp.store(stamp, std::memory_order_relaxed);
    } else {
      const std::uint64_t old_key = victim->key.load(std::memory_order_relaxed);
      if (old_key != 0) {
        // Forget what the evicted key counted for its tenants.
        const std::uint64_t base = victim->stamp.load(std::memory_order_relaxed) >> kStampBits;
        std::uint64_t bits = victim->tenants.load(std::memory_order_relaxed);
        while (bits != 0) {
          const auto t = static_cast<std::uint64_t>(std::countr_zero(bits));
          bits &= bits - 1;
          if (base + t < l.counters) l.sizes()[base + t].fetch_sub(1, std::memory_order_relaxed);
        }
        l.evictions.fetch_add(1, std::memory_order_relaxed);
      } else {
        l.used.fetch_add(1, std::memory_order_relaxed);
      }
      victim->key.store(0, std::memory_order_release);  // readers see a miss meanwhile
      victim->tenants.store(bit, std::memory_order_relaxed);
      victim->stamp.store(stamp, std::memory_order_relaxed);
      victim->key.store(key, std::memory_order_release);
      l.sizes()[counter].fetch_add(1, std::memory_order_relaxed);
    }
    lock.store(0, std::memory_order_release);
  }
}

std::int64_t PrefixTable::size(std::uint32_t counter) const noexcept {
  if (counter >= layout_->counters) return 0;
  return layout_->sizes()[counter].load(std::memory_order_relaxed);
}

std::uint32_t PrefixTable::counters() const noexcept {
  return static_cast<std::uint32_t>(layout_->counters);
}

PrefixTableStats PrefixTable::stats() const noexcept {
  PrefixTableStats s;
  s.entries = layout_->sets * kWays;
  s.used = layout_->used.load(std::memory_order_relaxed);
  s.inserts = layout_->clock.load(std::memory_order_relaxed);
  s.evictions = layout_->evictions.load(std::memory_order_relaxed);
  s.contended = layout_->contended.load(std::memory_order_relaxed);
  return s;
}

// ---------------------------------------------------------------------------------------------
// The cache-aware rule
// ---------------------------------------------------------------------------------------------

std::string_view to_string(CacheAwareDecision::Reason reason) noexcept {
  switch (reason) {
    case CacheAwareDecision::Reason::kImbalanced: return "imbalanced";
    case CacheAwareDecision::Reason::kCacheHit: return "cache-hit";
    case CacheAwareDecision::Reason::kSmallestTree: return "smallest-tree";
  }
  return "unknown";
}

std::optional<CacheAwareDecision> cache_aware_choose(const PoolSnapshot& pool,
                                                     std::span<const std::size_t> candidates,
                                                     const PrefixTable* table,
                                                     const PrefixKeys& keys, std::uint64_t salt,
                                                     std::uint32_t counter_base,
                                                     const CacheAwareOptions& options,
                                                     std::uint64_t seed) {
  if (candidates.empty()) return std::nullopt;
  auto load = [&](std::size_t i) { return static_cast<std::uint64_t>(pool[i].outstanding); };
  // Ties go to a per-request hash of the server id, so equal servers share the requests.
  auto tiebreak = [&](std::size_t i) { return mix64(seed ^ pool[i].id); };
  std::uint64_t min_load = std::numeric_limits<std::uint64_t>::max();
  std::uint64_t max_load = 0;
  std::uint64_t eligible = 0;
  for (std::size_t i : candidates) {
    min_load = std::min(min_load, load(i));
    max_load = std::max(max_load, load(i));
    if (i < PrefixTable::kMaxTenants) eligible |= std::uint64_t{1} << i;
  }
  // Best candidate by a key (smaller first) and the runner-up.
  auto best_two = [&](auto&& key, auto&& allowed, CacheAwareDecision& d) {
    bool found = false;
    for (std::size_t i : candidates) {
      if (!allowed(i)) continue;
      auto better = [&](std::size_t a, std::size_t b) {
        const auto ka = key(a), kb = key(b);
        return ka != kb ? ka < kb : tiebreak(a) < tiebreak(b);
      };
      if (!found || better(i, d.chosen)) {
        if (found) d.runner_up = d.chosen;
        d.chosen = i;
        found = true;
      } else if (!d.runner_up || better(i, *d.runner_up)) {
        d.runner_up = i;
      }
    }
  };
  auto any = [](std::size_t) { return true; };
  CacheAwareDecision d;
  const bool imbalanced = max_load - min_load > options.balance_abs &&
                          static_cast<double>(max_load) > options.balance_rel * static_cast<double>(min_load);
  if (imbalanced) {
    d.reason = CacheAwareDecision::Reason::kImbalanced;
    best_two(load, any, d);
    return d;
  }
  PrefixTable::Match m;
  if (table != nullptr && !keys.blocks.empty()) m = table->match(keys.blocks, salt, eligible);
  d.matched_blocks = m.blocks;
  d.match_rate = keys.units == 0 ? 0.0
                                 : static_cast<double>(m.blocks * keys.block_units) /
                                       static_cast<double>(keys.units);
  if (m.blocks > 0 && d.match_rate > options.cache_threshold) {
    d.reason = CacheAwareDecision::Reason::kCacheHit;
    best_two(load, [&](std::size_t i) { return i < 64 && ((m.tenants >> i) & 1U) != 0; }, d);
    // The runner-up is the best of the others by the fallback rule.
    std::optional<std::size_t> other;
    for (std::size_t i : candidates) {
      if (i == d.chosen) continue;
      const auto size_i = table->size(counter_base + static_cast<std::uint32_t>(i));
      if (!other || size_i < table->size(counter_base + static_cast<std::uint32_t>(*other))) other = i;
    }
    d.runner_up = other;
    return d;
  }
  d.reason = CacheAwareDecision::Reason::kSmallestTree;
  auto tree_size = [&](std::size_t i) {
    return table == nullptr ? std::int64_t{0}
                            : table->size(counter_base + static_cast<std::uint32_t>(i));
  };
  best_two(tree_size, any, d);
  return d;
}

}  // namespace omni
