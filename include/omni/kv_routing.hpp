// KV-cache-aware routing decisions, as pure functions (no clocks, no globals, no I/O).
//
// Prefill: given each eligible instance's predicted cached prefix for the request and its load,
// take the instance with the lowest expected time to first token (TTFT). When no instance holds
// a useful part of the prefix (nothing beyond what every candidate holds), use consistent
// hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded
// Loads", SODA 2018): requests that share the prefix meet on the same instance, and no instance
// takes more than (1 + epsilon) times its share of the load.
// Decode: least loaded first, then the instance whose own prefix cache holds most of the
// request (fewer KV blocks to transfer and allocate), then the ring order.
//
// Every decision says why (KvRouteDecision::Reason, the runner-up and both expected TTFTs) and
// is deterministic: the same inputs give the same output whatever the order of the candidates,
// since every tie is broken by the ring, which depends only on member ids.
#pragma once

#include "omni/block_hash.hpp"

#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace omni {

// A consistent-hash ring over a pool's members, by stable member id (e.g. a hash of
// "host:port"), so that two proxies with the same members build the same ring whatever the
// member order.
//
// Exact construction (enough to reproduce it elsewhere):
//  - member i with id `id` and weight `w` owns the points
//        point_position(id, v) = mix64(id ^ mix64(v))   for v = 0, 1, ..., vnodes_per_weight*w - 1
//    (mix64 is omni::mix64, the splitmix64 finaliser; raising a weight only adds points);
//  - the points are sorted by (position, member id), ascending, as unsigned 64-bit integers;
//  - a key sits at key_position(key) = mix64(key); walking "clockwise" from a key means visiting
//    the points in sorted order starting at the first point whose position is >= the key's
//    position, wrapping from the last point to the first;
//  - a key's home is the owner of the first point of that walk (of the first point owned by an
//    eligible member, when some members are ineligible).
class BoundedLoadRing {
 public:
  // Upper bound on the total number of points (sum of weights x vnodes_per_weight).
  static constexpr std::size_t kMaxPoints = std::size_t{1} << 24;

  // `ids[i]` is member i; `weights` empty = all 1, else same size, each >= 1. Each member gets
  // vnodes_per_weight * weight points. Throws std::invalid_argument on duplicate ids, size
  // mismatch, a zero weight, vnodes_per_weight == 0 or more than kMaxPoints points.
  // An empty ring is allowed (choose() then always returns nullopt).
  explicit BoundedLoadRing(std::span<const std::uint64_t> ids,
                           std::span<const std::uint32_t> weights = {},
                           unsigned vnodes_per_weight = 100);

  std::size_t size() const noexcept { return ids_.size(); }
  std::size_t points() const noexcept { return positions_.size(); }
  std::uint64_t id(std::size_t member) const { return ids_.at(member); }
  std::uint32_t weight(std::size_t member) const { return weights_.at(member); }

  static constexpr std::uint64_t key_position(std::uint64_t key) noexcept { return mix64(key); }
  static constexpr std::uint64_t point_position(std::uint64_t id, std::uint64_t vnode) noexcept {
    return mix64(id ^ mix64(vnode));
  }

  // The member owning `key` on the plain ring (no loads), for tests. 0 on an empty ring.
  std::size_t home(std::uint64_t key) const noexcept;

  // Eligible members in the order the clockwise walk from `key` first meets them:
  // rank[i] = 0 for the key's (eligible) home, 1 for the next distinct eligible member, ...;
  // ineligible members get UINT32_MAX. Returns the number of eligible members. This is the
  // deterministic tie order of choose_prefill and choose_decode.
  // eligible.size() == rank.size() == size(), else std::invalid_argument.
  std::size_t clockwise_ranks(std::uint64_t key, std::span<const bool> eligible,
                              std::span<std::uint32_t> rank) const;

  struct Choice {
    std::size_t member = 0;                // chosen member index
    std::optional<std::size_t> runner_up;  // a distinct eligible member (see choose())
    std::size_t home = 0;                  // the key's first eligible member clockwise
    bool overflowed = false;               // member != home: home was at capacity
    double capacity = 0;                   // the bound used, for the chosen member
    bool none_fit = false;                 // no member was under its bound (see choose())
  };

  // Bounded loads. Let L = sum of the eligible members' loads, W = sum of their weights,
  // c = cost (the load this request adds). Member i's capacity is
  //     capacity_i = (1 + epsilon) * (L + c) * weight_i / W,
  // and member i has room when
  //     load_i < capacity_i                                              (strictly).
  // Walking clockwise from the key, the first eligible member with room is chosen.
  //
  // This is the paper's rule generalised to weighted, real-valued loads: there every ball has
  // cost 1, m counts the balls including the new one, and a bin takes the ball when
  // load + 1 <= ceil((1 + eps) m / n), which for integer loads is exactly load < (1 + eps) m / n.
  // (Requiring load + cost <= capacity instead would reject every member of an idle or lightly
  // loaded pool whenever the cost exceeds the average share, e.g. always for the first request,
  // and the ring would degrade to least-loaded.) Consequences:
  //  - after the choice, load_i + c < capacity_i + c: no member exceeds (1 + eps) x its
  //    weighted share of the total (this request included) by more than one request's cost;
  //  - some member always has room when c > 0 or epsilon > 0 (the weighted mean of load_i /
  //    weight_i is L / W < capacity_i / weight_i). With epsilon == 0 and c == 0 and every
  //    load_i / weight_i equal, nobody has room: `none_fit`, and the member with the least
  //    load_i / weight_i is taken (ties: the first on the walk, i.e. the home), the runner-up
  //    being the second by the same order.
  // Runner-up (when some member had room): the walk continues clockwise past the chosen member's
  // point and takes the next member that has room, skipping the chosen member and members the
  // walk already found full; when no other member has room, the first member distinct from the
  // chosen one after its point. nullopt when only one member is eligible.
  //
  // loads.size() == eligible.size() == size(), else std::invalid_argument. Loads of ineligible
  // members are ignored; eligible loads below 0 count as 0 (floating-point residue of
  // decrements); a NaN or infinite eligible load, or a cost or epsilon that is negative or not
  // finite, throws std::invalid_argument. nullopt when nothing is eligible.
  // Scratch: O(size()) bytes, on the stack up to 256 members. Time: a binary search plus a walk
  // that usually stops after a few points.
  std::optional<Choice> choose(std::uint64_t key, std::span<const double> loads,
                               std::span<const bool> eligible, double cost, double epsilon) const;

 private:
  std::size_t first_point(std::uint64_t key) const noexcept;

  std::vector<std::uint64_t> ids_;
  std::vector<std::uint32_t> weights_;
  std::vector<std::uint64_t> positions_;  // sorted point positions
  std::vector<std::uint32_t> owners_;     // owners_[p] = member of point p
};

// One eligible prefill candidate.
struct KvCandidate {
  std::size_t index = 0;            // member index in the pool / ring
  std::uint32_t cached_tokens = 0;  // predicted prefix-cache hit for this request (<= prompt)
  double queued_tokens = 0;         // uncached prompt tokens queued ahead of it: the engine's
                                    // reported waiting uncached tokens plus what the proxy sent
                                    // since the last poll, or the proxy's own in-flight
                                    // accounting (the caller decides)
  double tokens_per_s = 0;          // its measured prefill speed, uncached tokens per second (> 0)
  double kv_usage = std::numeric_limits<double>::quiet_NaN();  // 0..1, NaN unknown
  double ring_load = 0;  // load for the bounded-load ring (e.g. in-flight uncached tokens)
  // When finite: the caller's own expected TTFT for this candidate (ms, without the fixed
  // overhead and the KV-usage penalty), replacing the queued_tokens / tokens_per_s formula
  // (the scheduler's step model, omni/scheduler.hpp).
  double expected_ms = std::numeric_limits<double>::quiet_NaN();
};

struct KvRouteOptions {
  double epsilon = 0.25;              // bounded-load slack for cold prefixes
  double kv_usage_high = 0.95;        // above: the instance is about to preempt; penalised
  double kv_usage_penalty_ms = 1000;  // added to its expected TTFT
  double fixed_overhead_ms = 0;  // added to every candidate (does not change the choice; shows in
                                 // costs; the tie rule compares TTFTs without it)
  // Candidates whose score (below) is within this fraction of the lowest score are a tie: the one
  // with more cached tokens wins (it spends less of the cluster's compute), then the ring order.
  double tie_fraction = 0.05;
  // Warm choices rank candidates by
  //     score = expected TTFT + miss_weight x 1000 x uncached tokens / tokens_per_s   (ms),
  // i.e. the request's own wait plus a price on the prefill compute it spends there. The request's
  // TTFT alone (0) ignores that recomputing a prefix another instance holds takes compute from
  // every request queued after it; 1 counts that compute once more. Only uncached work is priced,
  // so among equally cached candidates the choice is the TTFT's. Candidates without a usable
  // tokens_per_s are not priced. 0..10.
  double miss_weight = 0;
};

struct KvRouteDecision {
  enum class Reason : std::uint8_t {
    kWarm,          // lowest expected TTFT, and some instance had a useful cached prefix
    kCold,          // no useful cached prefix anywhere: the ring's home for the prefix
    kColdOverflow,  // cold, but the home was over (1+eps) x average: the next one clockwise
  };
  Reason reason = Reason::kCold;
  std::size_t chosen = 0;                            // position in the candidate span
  std::optional<std::size_t> runner_up;              // position in the candidate span
  double chosen_ttft_ms = 0, runner_up_ttft_ms = 0;  // expected TTFT of each
  std::uint32_t chosen_cached = 0, runner_up_cached = 0;
  std::uint32_t common_cached = 0;  // tokens every candidate holds (e.g. a shared system prompt)
  // Added: how the ring was used.
  std::uint64_t ring_key = 0;  // the key placed on the ring (cold choice, tie order)
  std::size_t ring_home = 0;   // cold: position of the key's home in the candidate span
  double ring_capacity = 0;    // cold: the chosen member's bound (BoundedLoadRing::choose)
  bool ring_none_fit = false;  // cold: no member had room (epsilon == 0 edge)
  bool tie_broken = false;     // warm: the tie rule (cached tokens, ring) decided
};
std::string_view to_string(KvRouteDecision::Reason reason) noexcept;
// One line for logs, e.g. "warm chosen=#2 ttft=12.5ms cached=1024 runner_up=#0 ttft=40.1ms
// cached=0 common=512 key=0123456789abcdef".
std::string explain(const KvRouteDecision& decision);

// Expected TTFT at one candidate, ms:
//   (expected_ms when finite, else
//   1000 * (queued_tokens + max(0, prompt_tokens - cached_tokens)) / tokens_per_s)
//   + (kv_usage > kv_usage_high ? kv_usage_penalty_ms : 0) + fixed_overhead_ms.
// queued_tokens below 0 or NaN count as 0; a tokens_per_s that is not a positive finite number
// gives +infinity (a candidate that can be chosen only when every candidate is unknown).
double expected_ttft_ms(const KvCandidate& c, std::uint32_t prompt_tokens,
                        const KvRouteOptions& o) noexcept;

// The miss_weight price of computing `uncached_tokens` at `tokens_per_s`, ms (what a warm
// choice adds to a candidate's expected TTFT to rank it): 0 when miss_weight is not a positive
// finite number or tokens_per_s is not a positive finite speed.
double miss_price_ms(double uncached_tokens, double tokens_per_s, const KvRouteOptions& o) noexcept;

// The prefill choice. `candidates` non-empty (else nullopt). `ring` is the pool's ring;
// candidate.index are its member indices (candidates is a subset: members not listed are
// ineligible). `prefix_keys` are the request's chained block keys (key i covers blocks 0..i),
// `block_tokens` tokens each. cached_tokens above prompt_tokens count as prompt_tokens.
//  1. common = min over candidates of cached_tokens (what everyone holds, e.g. a system prompt
//     cached everywhere); if max cached_tokens <= common (no candidate has a cached prefix the
//     others lack): COLD. The ring key is the first block key past the common part:
//     prefix_keys[common / block_tokens] (so requests that share a tenant or conversation prefix
//     beyond a global system prompt meet on the same instance), or, when the prompt has no full
//     block past it, the last key, or mix64(prompt_tokens) with no keys. Choose with
//     ring.choose(key, ring_load of each member (0 for non-candidates, eligible=false),
//     cost = prompt_tokens - common (the request's uncached tokens), epsilon).
//     runner_up = the ring's runner_up.
//  2. Otherwise WARM: the candidate with the lowest score (expected_ttft_ms plus the miss_weight
//     price of its uncached tokens, KvRouteOptions); ties (tie_fraction: every candidate within
//     tie_fraction x the lowest, fixed_overhead_ms left out) -> more cached tokens -> earlier on
//     the ring from the ring key (deterministic: never depends on candidate order). runner_up =
//     the best of the others by the same rule. The decision reports expected TTFTs, not scores.
//     This is what keeps the "common-prefix trap" balanced: a cached prefix only wins while its
//     saving (times 1 + miss_weight) exceeds the queue it adds.
//     Note (measured in kv_routing_test.cpp, CommonPrefixTrapStaysBalanced): this is myopic.
//     When one prefix is shared by every request, the instances end up evenly loaded only at
//     high load; at lower load the rule uses just as many instances as the holders' queues
//     require and never sends anything to the rest (warming one costs more than those queues),
//     which keeps TTFT low but leaves the shares uneven.
// Throws std::invalid_argument on a candidate index >= ring.size(), two candidates with the same
// index, block_tokens == 0 with keys, or (cold) a NaN or infinite ring_load.
std::optional<KvRouteDecision> choose_prefill(std::span<const KvCandidate> candidates,
                                              const BoundedLoadRing& ring,
                                              std::span<const std::uint64_t> prefix_keys,
                                              std::size_t block_tokens, std::uint32_t prompt_tokens,
                                              const KvRouteOptions& options);

// One eligible decode candidate.
struct DecodeCandidate {
  std::size_t index = 0;            // member index in the pool / ring
  std::uint32_t cached_tokens = 0;  // its own prefix cache's predicted hit (blocks it need not
                                    // receive)
  double outstanding = 0;           // requests in flight there (the proxy's count), per unit of
                                    // weight
  double running = 0;               // its reported running batch (0 unknown), in the same unit
  double kv_usage = std::numeric_limits<double>::quiet_NaN();
};
struct DecodeRouteOptions {
  double kv_usage_high = 0.95;  // candidates at or above are used only if all are
  double slack = 0.10;  // candidates within max(1, slack * min load) of the least loaded are
                        // "equally loaded"
};
struct DecodeRouteDecision {
  std::size_t chosen = 0;  // position in the candidate span
  std::optional<std::size_t> runner_up;
  std::uint32_t chosen_cached = 0;
  bool cache_decided = false;  // the cache broke the tie among equally loaded candidates
  // Added:
  double chosen_load = 0;          // its load (see choose_decode)
  std::size_t equally_loaded = 0;  // how many candidates were equally loaded with the chosen
  bool all_kv_high = false;        // every candidate was at kv_usage_high, so all were used
};
// One line for logs.
std::string explain(const DecodeRouteDecision& decision);

// Load of a candidate = max(outstanding, running): the proxy's own count is always current but
// misses other proxies' requests, the engine's running batch sees everyone's but lags; their
// maximum is a lower bound on the true load that is right in both cases (running == 0, i.e.
// unknown, leaves outstanding). Negative or NaN values count as 0. The caller passes both per
// unit of weight.
// Rule: candidates with kv_usage >= kv_usage_high are left out unless all are (NaN kv_usage is
// unknown, not high); among the rest, the equally loaded are those with load <= min_load +
// max(1, slack * min_load); among them, the most cached tokens (fewer blocks to transfer, less
// KV to allocate); then the ring order from `ring_key`. cache_decided is true when load and ring
// order alone would have picked another candidate. runner_up = the best of the others by the
// same rule. nullopt when `candidates` is empty. Throws std::invalid_argument on an index >=
// ring.size() or a duplicate index.
std::optional<DecodeRouteDecision> choose_decode(std::span<const DecodeCandidate> candidates,
                                                 const BoundedLoadRing& ring,
                                                 std::uint64_t ring_key,
                                                 const DecodeRouteOptions& options);

}  // namespace omni
