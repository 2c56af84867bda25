// Prompt-prefix keys and a shared table of which servers were sent which prefixes.
//
// The table is the "approximate tree" of SGLang's cache-aware router, kept at block
// granularity in a memory region that several processes (nginx workers) map: a request's
// prompt becomes a chain of block keys (key i covers blocks 0..i, so equal keys mean equal
// prefixes), and after each routing decision the chain is recorded for the chosen server.
// A later request's longest recorded prefix, and the servers it was sent to, predict where
// its prefix is cached without asking the engines.
//
// Layout: a header, one counter per server ("tree size" in blocks), one lock word per set, and
// `sets` x kWays entries. The table is set-associative: a key lives in the set its hash names,
// and a full set evicts its least recently recorded entry, so memory is fixed at creation and
// the table keeps learning forever. Readers never lock (an entry being rewritten reads as a
// miss); writers take the set's lock word with a bounded spin and skip the write if another
// process holds it (a prediction, not a record of truth), and a lock left by a process that
// died is taken over after a fixed number of writes elsewhere. Everything is position
// independent: no pointers are stored in the region.
#pragma once

#include "omni/block_hash.hpp"
#include "omni/policy.hpp"
#include "omni/request_body.hpp"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace omni {

// ---------------------------------------------------------------------------------------------
// Prefix keys of a request
// ---------------------------------------------------------------------------------------------

struct PrefixKeyOptions {
  std::size_t block_tokens = 16;    // token ids per block when the prompt is token ids
  std::size_t block_bytes = 64;     // bytes per block when it is text
  std::size_t max_blocks = 8192;    // longer prompts are keyed on their first max_blocks blocks
  std::uint64_t salt = 0;           // mixed into every key (e.g. the upstream block)
};

struct PrefixKeys {
  std::vector<std::uint64_t> blocks;  // chained: blocks[i] covers blocks 0..i; never 0
  std::size_t units = 0;              // prompt length in tokens (token ids) or bytes (text)
  std::size_t block_units = 0;        // tokens or bytes per block
  bool token_ids = false;
};

// Keys of full blocks of token ids.
PrefixKeys prefix_keys_from_ids(std::span<const TokenId> ids, const PrefixKeyOptions& options);
// Keys of full blocks of text bytes (a prompt the proxy did not tokenize).
PrefixKeys prefix_keys_from_text(std::string_view text, const PrefixKeyOptions& options);
// Keys of a parsed request: its first item's token ids when the body carries ids (completions
// `prompt`, /generate `input_ids`), else its prompt text (completions `prompt`, /generate
// `text`, or a chat's messages as "role\ncontent\n" for each text part, in order).
PrefixKeys prefix_keys_of(const ParsedBody& body, const PrefixKeyOptions& options);

// ---------------------------------------------------------------------------------------------
// The shared table
// ---------------------------------------------------------------------------------------------

struct PrefixTableStats {
  std::uint64_t entries = 0;      // capacity
  std::uint64_t used = 0;         // entries holding a key
  std::uint64_t inserts = 0;      // keys recorded (new or refreshed)
  std::uint64_t evictions = 0;    // entries replaced because their set was full
  std::uint64_t contended = 0;    // writes skipped because another writer held the set
};

class PrefixTable {
 public:
  static constexpr std::size_t kWays = 8;
  static constexpr std::size_t kMaxTenants = 64;  // servers per salt (one bit each)

  // Bytes needed for at least `entries` entries (rounded up to whole sets, at least one) and
  // `counters` tenant counters.
  static std::size_t required_bytes(std::uint64_t entries, std::uint32_t counters) noexcept;
  // Lays out a fresh table in `region` (zeroed here). Null when the region is too small, not
  // 8-byte aligned, or counters is 0.
  static std::unique_ptr<PrefixTable> create(void* region, std::size_t bytes,
                                             std::uint64_t entries, std::uint32_t counters);
  // Opens a table another process created in this region. Null when it holds none.
  static std::unique_ptr<PrefixTable> attach(void* region, std::size_t bytes);

  // Keys are recorded per `salt` (e.g. one per upstream block): the same prompt recorded under
  // two salts is two independent sets of entries.
  //
  // The longest recorded prefix of `keys` among `eligible` tenants (bit i: tenant i): how many
  // leading blocks it covers, and which eligible tenants hold all of them. {0, 0} when none.
  struct Match {
    std::size_t blocks = 0;
    std::uint64_t tenants = 0;
  };
  Match match(std::span<const std::uint64_t> keys, std::uint64_t salt,
              std::uint64_t eligible) const noexcept;

  // Records that `keys` were sent to tenant `tenant` (< kMaxTenants) whose size counter is
  // `counter` (< counters()).
  void insert(std::span<const std::uint64_t> keys, std::uint64_t salt, unsigned tenant,
              std::uint32_t counter) noexcept;

  // Blocks recorded for a tenant (the "tree size"); 0 for an unknown counter.
  std::int64_t size(std::uint32_t counter) const noexcept;
  std::uint32_t counters() const noexcept;
  PrefixTableStats stats() const noexcept;

  struct Layout;  // the region's header (prefix_table.cpp)

 private:
  explicit PrefixTable(Layout* layout) noexcept : layout_(layout) {}
  Layout* layout_;
};

// ---------------------------------------------------------------------------------------------
// SGLang's cache-aware rule, re-implemented
// ---------------------------------------------------------------------------------------------

// The rule of SGLang's router (sgl-router / SGLang Model Gateway, policy "cache_aware"), with
// its documented defaults. Loads are the proxy's own in-flight requests per server.
//   1. Imbalanced (max - min > balance_abs AND max > balance_rel x min): the least loaded.
//   2. Otherwise the longest recorded prefix: if it covers more than cache_threshold of the
//      prompt, a server holding it (the least loaded of them); else the server with the
//      smallest table ("most free cache").
// The chosen server's prefix is then recorded (the caller inserts).
struct CacheAwareOptions {
  double cache_threshold = 0.3;
  std::uint32_t balance_abs = 64;
  double balance_rel = 1.5;
};

// The SGLang rule over the eligible candidates of a pool. The pool's keys are recorded under
// `salt`; `counter_base` + i is the size counter of pool server i; tenant bits are pool server
// indices (pools of at most PrefixTable::kMaxTenants servers). `candidates` are pool indices
// in pool order.
struct CacheAwareDecision {
  std::size_t chosen = 0;                 // pool index
  std::optional<std::size_t> runner_up;   // pool index
  enum class Reason : std::uint8_t { kImbalanced, kCacheHit, kSmallestTree } reason =
      Reason::kSmallestTree;
  std::size_t matched_blocks = 0;
  double match_rate = 0.0;
};
std::string_view to_string(CacheAwareDecision::Reason reason) noexcept;

std::optional<CacheAwareDecision> cache_aware_choose(const PoolSnapshot& pool,
                                                     std::span<const std::size_t> candidates,
                                                     const PrefixTable* table,
                                                     const PrefixKeys& keys, std::uint64_t salt,
                                                     std::uint32_t counter_base,
                                                     const CacheAwareOptions& options,
                                                     std::uint64_t seed);

}  // namespace omni
