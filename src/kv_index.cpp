#include "omni/kv_index.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <new>
#include <string_view>

#include <sched.h>
#include <unistd.h>

namespace omni::kv {
namespace {

constexpr std::uint64_t kMagic = 0x6f6d6e696b766978ULL;  // "omnikvix"
constexpr std::uint64_t kVersion = 1;
constexpr std::size_t kWays = KvIndex::kWays;
// The table name of engine key 0 (0 marks an empty slot).
constexpr std::uint64_t kZeroEngineKey = 0x5bd1e9955bd1e995ULL;
// Mixed into keys before choosing their sets, so the two tables place a block independently.
constexpr std::uint64_t kReverseSalt = 0x7265766572736500ULL;  // "reverse"
constexpr std::uint64_t kForwardSalt = 0x666f727761726400ULL;  // "forward"

std::uint64_t nonzero(std::uint64_t key) noexcept { return key == 0 ? 1 : key; }
std::uint64_t slot_engine(std::uint64_t engine) noexcept {
  return engine == 0 ? kZeroEngineKey : engine;
}

void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

using Word = std::atomic<std::uint64_t>;
static_assert(Word::is_always_lock_free);

// engine key -> proxy key, kWays entries with their keys side by side (a probe reads 64 bytes).
struct ReverseSet {
  Word engine[kWays];  // 0: empty
  Word key[kWays];
  Word stamp[kWays];   // the instance's clock when last stored
};

// proxy key -> how many reverse entries hold it.
struct ForwardSet {
  Word key[kWays];     // 0: empty
  Word refs[kWays];
  Word owners[kWays];  // XOR of the engine keys of those reverse entries (the one, when refs is 1)
};

struct Instance {
  Word lock;  // writer's pid, 0 free
  Word clock;
  Word hand;  // next set the eviction sample starts at
  Word blocks;
  Word bound;
  Word stored;
  Word refreshed;
  Word removed;
  Word unknown_removed;
  Word evicted;
  Word clears;
  Word orphans;
  Word skipped;
  Word contended;
  Word last_seq;  // int64 bit pattern
  Word block_size;
};

static_assert(sizeof(ReverseSet) == 24 * kWays);
static_assert(sizeof(ForwardSet) == 24 * kWays);
static_assert(sizeof(Instance) == 128);

constexpr std::uint64_t kNoSeq = static_cast<std::uint64_t>(std::int64_t{-1});

std::uint64_t sets_for(std::uint64_t blocks_per_instance) noexcept {
  const std::uint64_t slots = (blocks_per_instance * 5 + 3) / 4;  // 1.25 x, rounded up
  return std::max<std::uint64_t>(1, (slots + kWays - 1) / kWays);
}

std::uint64_t instance_bytes_for(std::uint64_t sets) noexcept {
  return sizeof(Instance) + sets * (sizeof(ReverseSet) + sizeof(ForwardSet));
}

// A uniform set number from a mixed 64-bit hash.
std::size_t scale(std::uint64_t mixed, std::uint64_t sets) noexcept {
  return static_cast<std::size_t>((static_cast<unsigned __int128>(mixed) * sets) >> 64);
}

// The two candidate sets of a key (two-choice hashing; equal sometimes, and always with one set).
struct Choices {
  std::size_t first;
  std::size_t second;
};
Choices choices(std::uint64_t key, std::uint64_t salt, std::uint64_t sets) noexcept {
  const std::uint64_t h = mix64(key ^ salt);
  return {scale(h, sets), scale(mix64(h), sets)};
}
// How many distinct sets `c` names (1 or 2): loops visit c.first, then c.second if distinct.
std::size_t distinct(const Choices& c) noexcept { return c.first == c.second ? 1 : 2; }
std::size_t nth(const Choices& c, std::size_t i) noexcept { return i == 0 ? c.first : c.second; }

}  // namespace

struct KvIndex::Layout {
  std::uint64_t magic;
  std::uint64_t version;
  std::uint64_t bytes;
  std::uint64_t instances;
  std::uint64_t blocks_per_instance;
  std::uint64_t sets;            // per table of one instance
  std::uint64_t instance_bytes;  // stride of the per-instance regions
  std::uint64_t reserved;

  Instance& instance(std::uint64_t i) noexcept {
    return *reinterpret_cast<Instance*>(reinterpret_cast<char*>(this + 1) + i * instance_bytes);
  }
  ReverseSet* reverse(Instance& in) noexcept { return reinterpret_cast<ReverseSet*>(&in + 1); }
  ForwardSet* forward(Instance& in) noexcept {
    return reinterpret_cast<ForwardSet*>(reverse(in) + sets);
  }
};

static_assert(sizeof(KvIndex::Layout) == 64);

namespace {

// ---------------------------------------------------------------------------------------------
// Lock-free lookups
// ---------------------------------------------------------------------------------------------

bool set_has(const ForwardSet& set, std::uint64_t key) noexcept {
  for (std::size_t w = 0; w < kWays; ++w) {
    if (set.key[w].load(std::memory_order_acquire) == key) return true;
  }
  return false;
}

bool forward_contains(KvIndex::Layout& l, Instance& in, std::uint64_t key) noexcept {
  const ForwardSet* sets = l.forward(in);
  const std::uint64_t h = mix64(key ^ kForwardSalt);
  const std::size_t first = scale(h, l.sets);
  if (set_has(sets[first], key)) return true;
  const std::size_t second = scale(mix64(h), l.sets);
  return second != first && set_has(sets[second], key);
}

std::optional<std::uint64_t> reverse_lookup(KvIndex::Layout& l, Instance& in,
                                            std::uint64_t engine) noexcept {
  const Choices c = choices(engine, kReverseSalt, l.sets);
  for (std::size_t i = 0; i < distinct(c); ++i) {
    const std::size_t s = nth(c, i);
    const ReverseSet& set = l.reverse(in)[s];
    for (std::size_t w = 0; w < kWays; ++w) {
      if (set.engine[w].load(std::memory_order_acquire) != engine) continue;
      const std::uint64_t key = set.key[w].load(std::memory_order_acquire);
      // Rewritten meanwhile: the key may belong to another block.
      if (set.engine[w].load(std::memory_order_acquire) != engine || key == 0) return std::nullopt;
      return key;
    }
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// The write lock
// ---------------------------------------------------------------------------------------------

// kill(pid, 0) semantics: dead only when no such process exists (ESRCH); a word that is no pid
// at all (garbage) counts as dead.
bool holder_dead(std::uint64_t held) noexcept {
  if (held == 0) return false;
  if (held > static_cast<std::uint64_t>(INT32_MAX)) return true;
  return ::kill(static_cast<pid_t>(held), 0) != 0 && errno == ESRCH;
}

// ---------------------------------------------------------------------------------------------
// Writes, under the instance's lock
// ---------------------------------------------------------------------------------------------

// One entry of a reverse set.
struct Rev {
  ReverseSet* set = nullptr;
  std::size_t way = 0;
  explicit operator bool() const noexcept { return set != nullptr; }
  bool operator==(const Rev&) const = default;
  Word& engine() const noexcept { return set->engine[way]; }
  Word& key() const noexcept { return set->key[way]; }
  Word& stamp() const noexcept { return set->stamp[way]; }
};

class Writer {
 public:
  Writer(KvIndex::Layout& l, Instance& in) noexcept
      : l_(l), in_(in), reverse_(l.reverse(in)), forward_(l.forward(in)) {}

  // Takes the lock within `spins` attempts (yielding every 64 when `yield`), taking it over
  // from a dead holder (and then clearing the instance: `*took_over` set). false: skipped,
  // counted.
  bool lock(int spins, bool yield, bool* took_over = nullptr) noexcept {
    const auto self = static_cast<std::uint64_t>(static_cast<std::uint32_t>(::getpid()));
    for (int spin = 0; spin < spins; ++spin) {
      std::uint64_t held = in_.lock.load(std::memory_order_relaxed);
      if (held == 0) {
        if (in_.lock.compare_exchange_weak(held, self, std::memory_order_acquire,
                                           std::memory_order_relaxed)) {
          return true;
        }
        continue;
      }
      if (yield && spin % 64 == 63) {
        if (holder_dead(held)) break;
        ::sched_yield();
      } else {
        cpu_relax();
      }
    }
    std::uint64_t held = in_.lock.load(std::memory_order_relaxed);
    if (held != 0 && holder_dead(held) &&
        in_.lock.compare_exchange_strong(held, self, std::memory_order_acquire,
                                         std::memory_order_relaxed)) {
      // The dead writer may have stopped half-way: start the instance over.
      reset();
      if (took_over != nullptr) *took_over = true;
      return true;
    }
    if (held == 0 && in_.lock.compare_exchange_strong(held, self, std::memory_order_acquire,
                                                      std::memory_order_relaxed)) {
      return true;
    }
    in_.contended.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  void unlock() noexcept { in_.lock.store(0, std::memory_order_release); }

  // Drops every block, counted as a clear.
  void reset() noexcept {
    for (std::uint64_t s = 0; s < l_.sets; ++s) {
      for (std::size_t w = 0; w < kWays; ++w) {
        reverse_[s].engine[w].store(0, std::memory_order_release);
        reverse_[s].key[w].store(0, std::memory_order_relaxed);
        reverse_[s].stamp[w].store(0, std::memory_order_relaxed);
        forward_[s].key[w].store(0, std::memory_order_release);
        forward_[s].refs[w].store(0, std::memory_order_relaxed);
        forward_[s].owners[w].store(0, std::memory_order_relaxed);
      }
    }
    in_.blocks.store(0, std::memory_order_relaxed);
    in_.hand.store(0, std::memory_order_relaxed);
    in_.clears.fetch_add(1, std::memory_order_relaxed);
    in_.last_seq.store(kNoSeq, std::memory_order_relaxed);
  }

  // Stores (or refreshes) one block. `engine` and `key` are slot values (non-zero).
  void store(std::uint64_t engine, std::uint64_t key) noexcept {
    const std::uint64_t now = in_.clock.fetch_add(1, std::memory_order_relaxed) + 1;
    const std::uint64_t bound = in_.bound.load(std::memory_order_relaxed);
    // A lowered bound: down to it first, whatever this store does.
    while (in_.blocks.load(std::memory_order_relaxed) > bound && evict_sampled()) {
    }
    if (const Rev r = find_reverse(engine)) {
      in_.refreshed.fetch_add(1, std::memory_order_relaxed);
      const std::uint64_t old = r.key().load(std::memory_order_relaxed);
      if (old != key) {
        release_forward(old, engine);
        if (!acquire_forward(key, engine, r)) {
          // No room for the new key: the block is dropped.
          erase_reverse(r);
          in_.evicted.fetch_add(1, std::memory_order_relaxed);
          return;
        }
        r.key().store(key, std::memory_order_release);
      }
      r.stamp().store(now, std::memory_order_relaxed);
      return;
    }
    in_.stored.fetch_add(1, std::memory_order_relaxed);
    while (in_.blocks.load(std::memory_order_relaxed) >= bound && evict_sampled()) {
    }
    if (!acquire_forward(key, engine, Rev{})) {
      in_.evicted.fetch_add(1, std::memory_order_relaxed);  // stored, and dropped at once
      return;
    }
    // An empty entry of the emptier candidate set, else the least recently stored of both.
    const Choices c = choices(engine, kReverseSalt, l_.sets);
    Rev slot = empty_reverse(c);
    if (!slot) {
      for (std::size_t i = 0; i < distinct(c); ++i) {
        const std::size_t s = nth(c, i);
        for (std::size_t w = 0; w < kWays; ++w) {
          const Rev e{&reverse_[s], w};
          if (!slot || e.stamp().load(std::memory_order_relaxed) <
                           slot.stamp().load(std::memory_order_relaxed)) {
            slot = e;
          }
        }
      }
      evict(slot);
    }
    slot.key().store(key, std::memory_order_relaxed);
    slot.stamp().store(now, std::memory_order_relaxed);
    slot.engine().store(engine, std::memory_order_release);
    in_.blocks.fetch_add(1, std::memory_order_relaxed);
  }

  bool remove(std::uint64_t engine) noexcept {
    const Rev r = find_reverse(engine);
    if (!r) {
      in_.unknown_removed.fetch_add(1, std::memory_order_relaxed);
      return false;
    }
    release_forward(r.key().load(std::memory_order_relaxed), engine);
    erase_reverse(r);
    in_.removed.fetch_add(1, std::memory_order_relaxed);
    return true;
  }

 private:
  Rev find_reverse(std::uint64_t engine) noexcept {
    const Choices c = choices(engine, kReverseSalt, l_.sets);
    for (std::size_t i = 0; i < distinct(c); ++i) {
      const std::size_t s = nth(c, i);
      for (std::size_t w = 0; w < kWays; ++w) {
        if (reverse_[s].engine[w].load(std::memory_order_relaxed) == engine) {
          return {&reverse_[s], w};
        }
      }
    }
    return {};
  }

  // The first empty way of whichever candidate set has more of them; none when both are full.
  Rev empty_reverse(const Choices& c) noexcept {
    Rev best;
    std::size_t best_free = 0;
    for (std::size_t i = 0; i < distinct(c); ++i) {
      const std::size_t s = nth(c, i);
      std::size_t free = 0;
      Rev first;
      for (std::size_t w = 0; w < kWays; ++w) {
        if (reverse_[s].engine[w].load(std::memory_order_relaxed) != 0) continue;
        if (free++ == 0) first = {&reverse_[s], w};
      }
      if (free > best_free) {
        best = first;
        best_free = free;
      }
    }
    return best;
  }

  // Empties a reverse entry (its forward reference already released) and counts it gone.
  void erase_reverse(const Rev& r) noexcept {
    r.engine().store(0, std::memory_order_release);  // readers miss from here on
    r.key().store(0, std::memory_order_relaxed);
    r.stamp().store(0, std::memory_order_relaxed);
    in_.blocks.fetch_sub(1, std::memory_order_relaxed);
  }

  // Drops a held block to make room.
  void evict(const Rev& r) noexcept {
    release_forward(r.key().load(std::memory_order_relaxed),
                    r.engine().load(std::memory_order_relaxed));
    erase_reverse(r);
    in_.evicted.fetch_add(1, std::memory_order_relaxed);
  }

  // Evicts the least recently stored block of kSampleSets sets from the hand on (further when
  // they are all empty). false when the instance holds nothing.
  bool evict_sampled() noexcept {
    const std::uint64_t sets = l_.sets;
    std::uint64_t s = in_.hand.load(std::memory_order_relaxed) % sets;
    Rev victim;
    for (std::uint64_t scanned = 0;
         scanned < sets && (scanned < KvIndex::kSampleSets || !victim); ++scanned) {
      for (std::size_t w = 0; w < kWays; ++w) {
        const Rev e{&reverse_[s], w};
        if (e.engine().load(std::memory_order_relaxed) == 0) continue;
        if (!victim || e.stamp().load(std::memory_order_relaxed) <
                           victim.stamp().load(std::memory_order_relaxed)) {
          victim = e;
        }
      }
      s = s + 1 == sets ? 0 : s + 1;
    }
    in_.hand.store(s, std::memory_order_relaxed);
    if (!victim) return false;
    evict(victim);
    return true;
  }

  // One more reference to `key` from `engine`: a new forward entry if needed, in the emptier
  // candidate set, or evicting the least recently stored block whose key no other engine key
  // shares when both are full. false when every key of both sets is shared. `keep`: a reverse
  // entry never to evict (the one being re-pointed).
  bool acquire_forward(std::uint64_t key, std::uint64_t engine, const Rev& keep) noexcept {
    const Choices c = choices(key, kForwardSalt, l_.sets);
    ForwardSet* target = nullptr;
    std::size_t way = 0;
    std::size_t best_free = 0;
    for (std::size_t i = 0; i < distinct(c); ++i) {
      const std::size_t s = nth(c, i);
      ForwardSet& set = forward_[s];
      std::size_t free = 0;
      std::size_t first_free = 0;
      for (std::size_t w = 0; w < kWays; ++w) {
        const std::uint64_t k = set.key[w].load(std::memory_order_relaxed);
        if (k == key) {
          set.refs[w].fetch_add(1, std::memory_order_relaxed);
          set.owners[w].fetch_xor(engine, std::memory_order_relaxed);
          return true;
        }
        if (k == 0 && free++ == 0) first_free = w;
      }
      if (free > best_free) {
        target = &set;
        way = first_free;
        best_free = free;
      }
    }
    if (target == nullptr) {
      Rev victim;  // the least recently stored sole holder of a key of either set
      ForwardSet* victim_set = nullptr;
      std::size_t victim_way = 0;
      for (std::size_t i = 0; i < distinct(c); ++i) {
        const std::size_t s = nth(c, i);
        ForwardSet& set = forward_[s];
        for (std::size_t w = 0; w < kWays && target == nullptr; ++w) {
          if (set.refs[w].load(std::memory_order_relaxed) != 1) continue;
          const Rev owner = find_reverse(set.owners[w].load(std::memory_order_relaxed));
          if (!owner || owner.key().load(std::memory_order_relaxed) !=
                            set.key[w].load(std::memory_order_relaxed)) {
            // Not the invariant: an entry nobody holds. Reuse it.
            set.key[w].store(0, std::memory_order_release);
            target = &set;
            way = w;
            break;
          }
          if (owner == keep) continue;
          if (!victim || owner.stamp().load(std::memory_order_relaxed) <
                             victim.stamp().load(std::memory_order_relaxed)) {
            victim = owner;
            victim_set = &set;
            victim_way = w;
          }
        }
        if (target != nullptr) break;
      }
      if (target == nullptr) {
        if (!victim) return false;
        // Its key had one reference: evicting it empties exactly that way.
        evict(victim);
        target = victim_set;
        way = victim_way;
        if (target->key[way].load(std::memory_order_relaxed) != 0) return false;  // unreachable
      }
    }
    target->refs[way].store(1, std::memory_order_relaxed);
    target->owners[way].store(engine, std::memory_order_relaxed);
    target->key[way].store(key, std::memory_order_release);
    return true;
  }

  // One reference fewer to `key` from `engine`; the entry is emptied at zero.
  void release_forward(std::uint64_t key, std::uint64_t engine) noexcept {
    const Choices c = choices(key, kForwardSalt, l_.sets);
    for (std::size_t i = 0; i < distinct(c); ++i) {
      const std::size_t s = nth(c, i);
      ForwardSet& set = forward_[s];
      for (std::size_t w = 0; w < kWays; ++w) {
        if (set.key[w].load(std::memory_order_relaxed) != key) continue;
        const std::uint64_t refs = set.refs[w].load(std::memory_order_relaxed);
        if (refs <= 1) {
          set.key[w].store(0, std::memory_order_release);  // readers miss from here on
          set.refs[w].store(0, std::memory_order_relaxed);
          set.owners[w].store(0, std::memory_order_relaxed);
        } else {
          set.refs[w].store(refs - 1, std::memory_order_relaxed);
          set.owners[w].fetch_xor(engine, std::memory_order_relaxed);
        }
        return;
      }
    }
  }

  KvIndex::Layout& l_;
  Instance& in_;
  ReverseSet* reverse_;
  ForwardSet* forward_;
};

// Runs `fn(writer)` under the instance's lock; false when skipped.
template <class Fn>
bool with_lock(KvIndex::Layout& l, Instance& in, int spins, bool yield, Fn&& fn) noexcept {
  Writer w(l, in);
  if (!w.lock(spins, yield)) return false;
  fn(w);
  w.unlock();
  return true;
}

// A 64-bit hash of a byte string, never 0: 8-byte words folded through mix64().
std::uint64_t hash_bytes(std::string_view bytes) noexcept {
  std::uint64_t h = mix64(0x656e67696e650000ULL ^ (bytes.size() * 0x9fb21c651e98df25ULL));
  std::size_t i = 0;
  for (; i + 8 <= bytes.size(); i += 8) {
    std::uint64_t w;
    std::memcpy(&w, bytes.data() + i, 8);
    h = mix64(h ^ w) + 0x94d049bb133111ebULL;
  }
  std::uint64_t tail = 0;
  std::memcpy(&tail, bytes.data() + i, bytes.size() - i);
  return nonzero(mix64(h ^ tail ^ 0xbf58476d1ce4e5b9ULL));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

std::uint64_t block_key(std::uint64_t parent_key, std::span<const TokenId> tokens) noexcept {
  return nonzero(hash_block64(parent_key, tokens));
}

std::vector<std::uint64_t> block_keys(std::span<const TokenId> ids, std::size_t block_size,
                                      std::size_t max_blocks) {
  std::vector<std::uint64_t> out;
  if (block_size == 0) return out;
  const std::size_t blocks = std::min(ids.size() / block_size, max_blocks);
  out.reserve(blocks);
  std::uint64_t parent = kRootBlockHash;
  for (std::size_t b = 0; b < blocks; ++b) {
    parent = block_key(parent, ids.subspan(b * block_size, block_size));
    out.push_back(parent);
  }
  return out;
}

std::uint64_t engine_key(const ExternalHash& hash) noexcept {
  if (hash.is_int()) return hash.as_int();
  return hash_bytes(hash.as_bytes());
}

// ---------------------------------------------------------------------------------------------
// The index
// ---------------------------------------------------------------------------------------------

std::size_t KvIndex::required_bytes(const KvIndexShape& shape) noexcept {
  const unsigned __int128 total =
      sizeof(Layout) + static_cast<unsigned __int128>(shape.instances) *
                           instance_bytes_for(sets_for(shape.blocks_per_instance));
  return total > SIZE_MAX ? SIZE_MAX : static_cast<std::size_t>(total);
}

std::unique_ptr<KvIndex> KvIndex::create(void* region, std::size_t bytes,
                                         const KvIndexShape& shape) {
  if (region == nullptr || shape.instances == 0 || shape.blocks_per_instance == 0 ||
      reinterpret_cast<std::uintptr_t>(region) % 8 != 0) {
    return nullptr;
  }
  const std::size_t need = required_bytes(shape);
  if (need == SIZE_MAX || bytes < need) return nullptr;
  std::memset(region, 0, need);
  auto* l = new (region) Layout{};
  l->version = kVersion;
  l->bytes = need;
  l->instances = shape.instances;
  l->blocks_per_instance = shape.blocks_per_instance;
  l->sets = sets_for(shape.blocks_per_instance);
  l->instance_bytes = instance_bytes_for(l->sets);
  for (std::uint64_t i = 0; i < l->instances; ++i) {
    Instance& in = *new (&l->instance(i)) Instance{};
    in.bound.store(shape.blocks_per_instance, std::memory_order_relaxed);
    in.last_seq.store(kNoSeq, std::memory_order_relaxed);
    for (std::uint64_t s = 0; s < l->sets; ++s) {
      new (l->reverse(in) + s) ReverseSet{};
      new (l->forward(in) + s) ForwardSet{};
    }
  }
  std::atomic_thread_fence(std::memory_order_release);
  l->magic = kMagic;
  return std::unique_ptr<KvIndex>(new KvIndex(l));
}

std::unique_ptr<KvIndex> KvIndex::attach(void* region, std::size_t bytes) {
  if (region == nullptr || reinterpret_cast<std::uintptr_t>(region) % 8 != 0 ||
      bytes < sizeof(Layout)) {
    return nullptr;
  }
  auto* l = static_cast<Layout*>(region);
  if (l->magic != kMagic || l->version != kVersion) return nullptr;
  std::atomic_thread_fence(std::memory_order_acquire);
  if (l->instances == 0 || l->instances > UINT32_MAX || l->blocks_per_instance == 0 ||
      l->blocks_per_instance > UINT32_MAX) {
    return nullptr;
  }
  const KvIndexShape shape{static_cast<std::uint32_t>(l->instances),
                           static_cast<std::uint32_t>(l->blocks_per_instance)};
  if (l->sets != sets_for(shape.blocks_per_instance) ||
      l->instance_bytes != instance_bytes_for(l->sets) || l->bytes != required_bytes(shape) ||
      l->bytes > bytes) {
    return nullptr;
  }
  return std::unique_ptr<KvIndex>(new KvIndex(l));
}

std::uint32_t KvIndex::instances() const noexcept {
  return static_cast<std::uint32_t>(layout_->instances);
}

std::uint32_t KvIndex::blocks_per_instance() const noexcept {
  return static_cast<std::uint32_t>(layout_->blocks_per_instance);
}

std::uint64_t KvIndex::slots_per_instance() const noexcept { return layout_->sets * kWays; }

std::int32_t KvIndex::lock_holder(std::uint32_t instance) const noexcept {
  if (instance >= layout_->instances) return 0;
  return static_cast<std::int32_t>(
      layout_->instance(instance).lock.load(std::memory_order_relaxed));
}

std::size_t KvIndex::lock_offset(std::uint32_t instance) const noexcept {
  if (instance >= layout_->instances) return 0;
  return static_cast<std::size_t>(reinterpret_cast<const char*>(&layout_->instance(instance).lock) -
                                  reinterpret_cast<const char*>(layout_));
}

void KvIndex::set_bound(std::uint32_t instance, std::uint64_t blocks) noexcept {
  if (instance >= layout_->instances) return;
  const std::uint64_t cap = layout_->blocks_per_instance;
  layout_->instance(instance).bound.store(blocks == 0 ? cap : std::min(blocks, cap),
                                          std::memory_order_relaxed);
}

void KvIndex::set_block_size(std::uint32_t instance, std::uint32_t block_size) noexcept {
  if (instance >= layout_->instances) return;
  layout_->instance(instance).block_size.store(block_size, std::memory_order_relaxed);
}

void KvIndex::set_last_seq(std::uint32_t instance, std::int64_t seq) noexcept {
  if (instance >= layout_->instances) return;
  layout_->instance(instance).last_seq.store(static_cast<std::uint64_t>(seq),
                                             std::memory_order_relaxed);
}

bool KvIndex::store(std::uint32_t instance, std::uint64_t engine_key, std::uint64_t key) noexcept {
  if (instance >= layout_->instances) return false;
  return with_lock(*layout_, layout_->instance(instance), kSpins, false,
                   [&](Writer& w) { w.store(slot_engine(engine_key), nonzero(key)); });
}

bool KvIndex::store_chain(std::uint32_t instance, std::span<const std::uint64_t> keys) noexcept {
  if (instance >= layout_->instances) return false;
  if (keys.empty()) return true;
  return with_lock(*layout_, layout_->instance(instance), kSpins, false, [&](Writer& w) {
    for (std::size_t i = keys.size(); i-- > 0;) {
      const std::uint64_t key = nonzero(keys[i]);
      w.store(slot_engine(key), key);
    }
  });
}

bool KvIndex::store_tagged_chain(std::uint32_t instance, std::span<const std::uint64_t> keys,
                                 std::uint64_t tag) noexcept {
  if (instance >= layout_->instances) return false;
  if (keys.empty()) return true;
  return with_lock(*layout_, layout_->instance(instance), kSpins, false, [&](Writer& w) {
    for (std::size_t i = keys.size(); i-- > 0;) {
      const std::uint64_t key = nonzero(keys[i]);
      w.store(slot_engine(tagged_engine_key(key, tag)), key);
    }
  });
}

bool KvIndex::remove_tagged_chain(std::uint32_t instance, std::span<const std::uint64_t> keys,
                                  std::uint64_t tag) noexcept {
  if (instance >= layout_->instances) return false;
  if (keys.empty()) return true;
  return with_lock(*layout_, layout_->instance(instance), kSpins, false, [&](Writer& w) {
    for (std::uint64_t k : keys) w.remove(slot_engine(tagged_engine_key(nonzero(k), tag)));
  });
}

std::optional<std::uint64_t> KvIndex::key_of(std::uint32_t instance,
                                             std::uint64_t engine_key) const noexcept {
  if (instance >= layout_->instances) return std::nullopt;
  return reverse_lookup(*layout_, layout_->instance(instance), slot_engine(engine_key));
}

bool KvIndex::remove(std::uint32_t instance, std::uint64_t engine_key) noexcept {
  if (instance >= layout_->instances) return false;
  bool removed = false;
  with_lock(*layout_, layout_->instance(instance), kSpins, false,
            [&](Writer& w) { removed = w.remove(slot_engine(engine_key)); });
  return removed;
}

void KvIndex::clear(std::uint32_t instance) noexcept {
  if (instance >= layout_->instances) return;
  Instance& in = layout_->instance(instance);
  Writer w(*layout_, in);
  bool took_over = false;
  if (w.lock(kClearSpins, true, &took_over)) {
    if (!took_over) w.reset();  // taking the lock over reset it already (one clear)
    w.unlock();
  } else {
    in.last_seq.store(kNoSeq, std::memory_order_relaxed);  // its subscriber resynchronizes
  }
}

void KvIndex::count_orphans(std::uint32_t instance, std::uint64_t n) noexcept {
  if (instance >= layout_->instances) return;
  layout_->instance(instance).orphans.fetch_add(n, std::memory_order_relaxed);
}

void KvIndex::count_skipped(std::uint32_t instance, std::uint64_t n) noexcept {
  if (instance >= layout_->instances) return;
  layout_->instance(instance).skipped.fetch_add(n, std::memory_order_relaxed);
}

std::size_t KvIndex::match(std::uint32_t instance,
                           std::span<const std::uint64_t> keys) const noexcept {
  if (instance >= layout_->instances) return 0;
  Instance& in = layout_->instance(instance);
  for (std::size_t i = 0; i < keys.size(); ++i) {
    if (!forward_contains(*layout_, in, nonzero(keys[i]))) return i;
  }
  return keys.size();
}

bool KvIndex::contains(std::uint32_t instance, std::uint64_t key) const noexcept {
  if (instance >= layout_->instances) return false;
  return forward_contains(*layout_, layout_->instance(instance), nonzero(key));
}

InstanceCounters KvIndex::counters(std::uint32_t instance) const noexcept {
  InstanceCounters c;
  if (instance >= layout_->instances) return c;
  const Instance& in = layout_->instance(instance);
  auto get = [](const Word& w) { return w.load(std::memory_order_relaxed); };
  c.blocks = get(in.blocks);
  c.bound = get(in.bound);
  c.stored = get(in.stored);
  c.refreshed = get(in.refreshed);
  c.removed = get(in.removed);
  c.unknown_removed = get(in.unknown_removed);
  c.evicted = get(in.evicted);
  c.clears = get(in.clears);
  c.orphans = get(in.orphans);
  c.skipped = get(in.skipped);
  c.contended = get(in.contended);
  c.last_seq = static_cast<std::int64_t>(get(in.last_seq));
  c.block_size = static_cast<std::uint32_t>(get(in.block_size));
  return c;
}

// ---------------------------------------------------------------------------------------------
// Applying events
// ---------------------------------------------------------------------------------------------

namespace {

// GPU (any case) or unset, unless other media are indexed too.
bool medium_indexed(const std::optional<std::string>& medium, const ApplyOptions& options) {
  if (options.other_media || !medium) return true;
  constexpr std::string_view kGpu = "gpu";
  const std::string& m = *medium;
  if (m.size() != kGpu.size()) return false;
  for (std::size_t i = 0; i < m.size(); ++i) {
    if ((m[i] | 0x20) != kGpu[i]) return false;
  }
  return true;
}

}  // namespace

ApplyResult apply_batch(KvIndex& index, std::uint32_t instance, const EventBatch& batch,
                        const ApplyOptions& options) {
  ApplyResult result;
  if (instance >= index.instances()) return result;
  std::size_t skipped = 0;
  std::size_t orphans = 0;
  for (const Event& event : batch.events) {
    if (const auto* stored = std::get_if<BlockStored>(&event)) {
      if (!medium_indexed(stored->medium, options) || stored->lora_id || stored->lora_name) {
        ++skipped;
        continue;
      }
      std::size_t block_size = options.block_size != 0 ? options.block_size : stored->block_size;
      if (block_size == 0) block_size = index.counters(instance).block_size;
      const std::size_t blocks = stored->block_hashes.size();
      if (block_size == 0 || stored->token_ids.size() / block_size != blocks ||
          stored->token_ids.size() % block_size != 0) {
        ++skipped;
        continue;
      }
      if (stored->block_size != 0) index.set_block_size(instance, stored->block_size);
      std::uint64_t key = kRootBlockHash;
      if (stored->parent_block_hash) {
        const auto parent = index.key_of(instance, engine_key(*stored->parent_block_hash));
        if (!parent) {
          orphans += blocks;
          continue;
        }
        key = *parent;
      }
      const std::span<const TokenId> tokens(stored->token_ids);
      for (std::size_t i = 0; i < blocks; ++i) {
        key = block_key(key, tokens.subspan(i * block_size, block_size));
        if (index.store(instance, engine_key(stored->block_hashes[i]), key)) ++result.stored;
      }
    } else if (const auto* removed = std::get_if<BlockRemoved>(&event)) {
      if (!medium_indexed(removed->medium, options)) {
        ++skipped;
        continue;
      }
      for (const ExternalHash& h : removed->block_hashes) {
        if (index.remove(instance, engine_key(h))) ++result.removed;
      }
    } else {
      index.clear(instance);
      result.cleared = true;
    }
  }
  if (skipped != 0) index.count_skipped(instance, skipped);
  if (orphans != 0) index.count_orphans(instance, orphans);
  result.skipped = skipped;
  result.orphans = orphans;
  return result;
}

}  // namespace omni::kv
