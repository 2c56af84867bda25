// Routing policies: which backend of a pool gets a request.
//
// A policy is a const, pure function of (request features, pool snapshot, now), built from
// three kinds of pieces (the Gateway API Inference Extension's vocabulary):
//  - Filters remove ineligible backends (down, unhealthy, already tried, at max_conns, too many
//    recent failures) and say why;
//  - Scorers give each remaining backend a score in [0,1], higher is better; the policy
//    combines them as a weighted mean;
//  - a Picker chooses one candidate (and a runner-up) from the scores.
// Nothing here reads a clock or a global RNG: time comes in as `now`, and the only randomness
// is a seed derived from the request hash, so a given input always gives the same pick and any
// number of threads may share one Policy.
//
// Eligibility follows nginx's upstream peers (ngx_http_upstream_round_robin.c): the tried
// bitmap, `down`, `max_fails` within `fail_timeout`, `max_conns`.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace omni {

using TimePoint = std::chrono::steady_clock::time_point;

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

// Load an engine reports on its /metrics (vLLM, SGLang) or /v1/loads (SGLang) endpoint, plus
// what the proxy sent it since that report.
struct EngineLoad {
  std::uint32_t running = 0;  // requests in the running batch
  std::uint32_t waiting = 0;  // requests queued in the engine
  // Fraction of KV-cache blocks in use, 0..1; NaN when the engine does not report it.
  double kv_usage = std::numeric_limits<double>::quiet_NaN();
  // Prompt tokens queued and not covered by the prefix cache (SGLang /v1/loads).
  std::optional<std::uint64_t> waiting_uncached_tokens;
  // Age of the last successful poll when the snapshot was taken; nullopt = never polled.
  std::optional<std::chrono::steady_clock::duration> metrics_age;
  // Requests the proxy sent to this backend after that poll: load the report cannot show yet.
  std::uint32_t sent_since_poll = 0;

  // True when a poll exists and is at most `max_age` old.
  bool fresh(std::chrono::steady_clock::duration max_age) const noexcept {
    return metrics_age.has_value() && *metrics_age <= max_age;
  }
};

// One backend (a prefill or decode instance) as seen at snapshot time.
struct BackendState {
  std::uint32_t index = 0;      // position in its PoolSnapshot; set by the snapshot
  std::uint64_t id = 0;         // stable across snapshots and reloads (e.g. a hash of the address)
  std::string name;             // configured name or "host:port", for logs
  bool healthy = true;          // last active health check passed
  bool down = false;            // administratively disabled (nginx `down`)
  std::uint32_t max_conns = 0;  // 0 = unlimited
  std::uint32_t weight = 1;     // relative capacity, >= 1
  std::uint32_t outstanding = 0;   // requests in flight, the proxy's count over all workers
  std::uint32_t active_conns = 0;  // upstream connections in use, compared with max_conns
  std::uint32_t fails = 0;         // failures within the current fail_timeout window
  std::uint32_t max_fails = 0;     // fails at which the backend is skipped; 0 = never
  EngineLoad load;
};

// An immutable view of one pool. Built once per membership or state change and shared by
// pointer; every pick reads it without locks.
class PoolSnapshot {
 public:
  PoolSnapshot() = default;
  // Sets each backend's `index` to its position. Throws std::invalid_argument if a weight is 0.
  PoolSnapshot(std::string pool, std::uint64_t generation, std::vector<BackendState> backends);

  const std::string& pool() const noexcept { return pool_; }
  // Grows by one each time the pool's membership or configuration changes.
  std::uint64_t generation() const noexcept { return generation_; }
  std::span<const BackendState> backends() const noexcept { return backends_; }
  std::size_t size() const noexcept { return backends_.size(); }
  bool empty() const noexcept { return backends_.empty(); }
  const BackendState& operator[](std::size_t index) const { return backends_[index]; }

 private:
  std::string pool_;
  std::uint64_t generation_ = 0;
  std::vector<BackendState> backends_;
};

using PoolSnapshotPtr = std::shared_ptr<const PoolSnapshot>;

PoolSnapshotPtr make_pool_snapshot(std::string pool, std::uint64_t generation,
                                   std::vector<BackendState> backends);

// A set of backend indices as a bitmap: bit (i % 64) of word (i / 64), like nginx's `tried`.
class BackendBitmap {
 public:
  BackendBitmap() = default;
  explicit BackendBitmap(std::size_t size) : words_((size + 63) / 64, 0) {}

  void set(std::size_t index);  // grows the bitmap as needed
  bool test(std::size_t index) const noexcept;
  std::span<const std::uint64_t> words() const noexcept { return words_; }

 private:
  std::vector<std::uint64_t> words_;
};

// What a policy may know about a request. Views (spans) must outlive the pick() call.
struct RequestFeatures {
  // Hash of the request id; seeds tie-breaking and sampling, so a retry of the same request
  // with the same exclusions lands on the same backend.
  std::uint64_t request_hash = 0;
  std::uint32_t prompt_tokens = 0;  // exact when has_token_ids, otherwise an estimate
  bool has_token_ids = false;       // the proxy tokenized the prompt
  bool stream = false;
  std::int32_t priority = 0;                  // larger is more urgent
  std::optional<std::uint64_t> affinity_key;  // hash of a session or user key
  // Backends already tried for this request, as a BackendBitmap's words; indices past the end
  // are not excluded.
  std::span<const std::uint64_t> excluded;

  bool is_excluded(std::size_t index) const noexcept {
    const std::size_t word = index / 64;
    return word < excluded.size() && ((excluded[word] >> (index % 64)) & 1U) != 0;
  }
};

// Everything a filter or scorer may read for one pick.
struct PickContext {
  const RequestFeatures& request;
  const PoolSnapshot& pool;
  TimePoint now;
};

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

enum class FilterReason : std::uint8_t {
  kDown,          // administratively down
  kUnhealthy,     // failed its health check
  kExcluded,      // already tried for this request
  kAtMaxConns,    // active_conns >= max_conns
  kTooManyFails,  // fails >= max_fails within fail_timeout
  kOther,         // a policy-specific filter; see Rejection::filter
};

std::string_view to_string(FilterReason reason) noexcept;

// A backend a filter removed. Only the first filter to remove a backend reports it.
struct Rejection {
  std::size_t index = 0;  // backend index in the pool
  FilterReason reason = FilterReason::kOther;
  std::string_view filter;  // the filter's name(); valid while the Policy lives
};

// An eligible backend and its combined score.
struct CandidateScore {
  std::size_t index = 0;  // backend index in the pool
  double score = 0.0;     // weighted mean of the scorers' scores, in [0,1]
};

enum class PickStatus : std::uint8_t {
  kPicked,        // `chosen` is set
  kEmptyPool,     // the pool has no backends
  kAllExcluded,   // nothing left, and some up and healthy backend was rejected as already
                  // tried: the caller decides whether retries are exhausted
  kNoneEligible,  // nothing left, and no up and healthy backend was tried: every backend is
                  // down, unhealthy, at max_conns or failing
};

std::string_view to_string(PickStatus status) noexcept;

struct Pick {
  PickStatus status = PickStatus::kEmptyPool;
  std::optional<std::size_t> chosen;       // backend index in the pool
  std::optional<std::size_t> runner_up;    // the picker's second choice, if any
  std::vector<CandidateScore> candidates;  // backends that passed every filter, in pool order
  // Each scorer's score of each candidate before weighting:
  // scorer_scores[candidate_position * num_scorers + scorer_position].
  std::size_t num_scorers = 0;
  std::vector<double> scorer_scores;
  std::vector<Rejection> rejected;  // in filter order, then pool order

  double scorer_score(std::size_t candidate_position, std::size_t scorer_position) const {
    return scorer_scores.at(candidate_position * num_scorers + scorer_position);
  }
  // The combined score of backend `index`, if it was a candidate.
  std::optional<double> score_of(std::size_t index) const noexcept;
  // Why backend `index` was filtered out, if it was.
  std::optional<FilterReason> rejection_of(std::size_t index) const noexcept;
  // One line for debug logs: status, chosen and runner-up with scores, rejections by name.
  std::string explain(const PoolSnapshot& pool) const;
};

// ---------------------------------------------------------------------------------------------
// Pieces
// ---------------------------------------------------------------------------------------------

// Removes ineligible backends. Implementations are immutable and thread-safe.
class Filter {
 public:
  virtual ~Filter() = default;
  virtual std::string_view name() const noexcept = 0;
  // `candidates` holds backend indices in pool order; keeps the eligible ones in the same order
  // (possibly none) and appends one Rejection per removed backend to `rejected`.
  virtual void filter(const PickContext& ctx, std::vector<std::size_t>& candidates,
                      std::vector<Rejection>& rejected) const = 0;
};

// A filter that judges each backend on its own.
class BackendFilter : public Filter {
 public:
  void filter(const PickContext& ctx, std::vector<std::size_t>& candidates,
              std::vector<Rejection>& rejected) const final;

 protected:
  // Why `backend` is ineligible, or nullopt to keep it.
  virtual std::optional<FilterReason> reject(const PickContext& ctx,
                                             const BackendState& backend) const = 0;
};

// Scores candidates in [0,1], higher is better. Implementations are immutable and thread-safe.
class Scorer {
 public:
  virtual ~Scorer() = default;
  virtual std::string_view name() const noexcept = 0;
  // Writes scores[i] for backend candidates[i]. `candidates` is non-empty and
  // scores.size() == candidates.size(). Scores may be relative to the other candidates.
  // The policy clamps results to [0,1] and reads NaN as 0.
  virtual void score(const PickContext& ctx, std::span<const std::size_t> candidates,
                     std::span<double> scores) const = 0;
};

// A picker's choice, as positions in the candidate list.
struct PickerChoice {
  std::size_t chosen = 0;
  std::optional<std::size_t> runner_up;  // != chosen
};

// Chooses one candidate. Implementations are immutable and thread-safe.
class Picker {
 public:
  virtual ~Picker() = default;
  virtual std::string_view name() const noexcept = 0;
  // `candidates` is non-empty. `seed` is derived from the request hash: the only randomness.
  virtual PickerChoice choose(std::span<const CandidateScore> candidates, const PoolSnapshot& pool,
                              std::uint64_t seed) const = 0;
};

// -- Filters ----------------------------------------------------------------------------------

// Removes `down` backends (kDown) and unhealthy ones (kUnhealthy).
class HealthFilter final : public BackendFilter {
 public:
  std::string_view name() const noexcept override { return "health"; }

 protected:
  std::optional<FilterReason> reject(const PickContext& ctx,
                                     const BackendState& backend) const override;
};

// Removes backends already tried for this request (kExcluded).
class ExcludedFilter final : public BackendFilter {
 public:
  std::string_view name() const noexcept override { return "excluded"; }

 protected:
  std::optional<FilterReason> reject(const PickContext& ctx,
                                     const BackendState& backend) const override;
};

// Removes backends with max_conns > 0 and active_conns >= max_conns (kAtMaxConns).
class MaxConnsFilter final : public BackendFilter {
 public:
  std::string_view name() const noexcept override { return "max-conns"; }

 protected:
  std::optional<FilterReason> reject(const PickContext& ctx,
                                     const BackendState& backend) const override;
};

// Removes backends with max_fails > 0 and fails >= max_fails (kTooManyFails). `fails` counts
// only the current fail_timeout window; whoever builds the snapshot resets it.
class MaxFailsFilter final : public BackendFilter {
 public:
  std::string_view name() const noexcept override { return "max-fails"; }

 protected:
  std::optional<FilterReason> reject(const PickContext& ctx,
                                     const BackendState& backend) const override;
};

// The eligibility rules every balancer keeps, in the order that makes explanations useful:
// health (down, unhealthy), excluded, max-conns, max-fails. A tried backend is thus reported
// as kExcluded only if it is otherwise up.
std::vector<std::shared_ptr<const Filter>> make_eligibility_filters();

// -- Scorers ----------------------------------------------------------------------------------

// Least outstanding requests, weighted: load = outstanding / weight, normalized over the
// candidates so the least loaded scores 1 and the most loaded 0 (all equal: all 1).
class LeastOutstandingScorer final : public Scorer {
 public:
  std::string_view name() const noexcept override { return "least-outstanding"; }
  void score(const PickContext& ctx, std::span<const std::size_t> candidates,
             std::span<double> scores) const override;
};

// How a scorer treats engine metrics that are missing or too old.
struct EngineMetricsOptions {
  // Metrics older than this count as unknown. Must be positive.
  std::chrono::steady_clock::duration max_age = std::chrono::seconds(5);
  // Score of a backend whose metric is unknown, in [0,1]: neither preferred nor avoided.
  double unknown_score = 0.5;
};

enum class QueueMetric : std::uint8_t {
  kWaitingRequests,        // waiting (+ sent_since_poll if counted)
  kWaitingUncachedTokens,  // waiting_uncached_tokens; unknown where not reported
};

struct QueueDepthOptions {
  QueueMetric metric = QueueMetric::kWaitingRequests;
  // Count requests sent since the last poll as waiting (kWaitingRequests only), so a burst
  // between two polls does not all land on the backend that looked idle.
  bool count_sent_since_poll = true;
  EngineMetricsOptions metrics;
};

// Engine queue depth, normalized over the candidates whose metric is known: the shortest
// queue scores 1, the longest 0 (all equal: all 1).
class QueueDepthScorer final : public Scorer {
 public:
  // Throws std::invalid_argument on a non-positive max_age or unknown_score outside [0,1].
  explicit QueueDepthScorer(QueueDepthOptions options = {});
  std::string_view name() const noexcept override { return "queue-depth"; }
  void score(const PickContext& ctx, std::span<const std::size_t> candidates,
             std::span<double> scores) const override;

 private:
  QueueDepthOptions options_;
};

// Free KV cache: 1 - kv_usage, absolute (a nearly full cache means preemption whatever the
// others do). Unknown (NaN or stale) scores options.unknown_score.
class KvUsageScorer final : public Scorer {
 public:
  // Throws std::invalid_argument on a non-positive max_age or unknown_score outside [0,1].
  explicit KvUsageScorer(EngineMetricsOptions options = {});
  std::string_view name() const noexcept override { return "kv-usage"; }
  void score(const PickContext& ctx, std::span<const std::size_t> candidates,
             std::span<double> scores) const override;

 private:
  EngineMetricsOptions options_;
};

// -- Pickers ----------------------------------------------------------------------------------

// Highest score wins. Ties go to weighted rendezvous hashing of (seed, backend id): each tied
// backend wins with probability weight / (sum of tied weights) over request hashes, a given
// seed always picks the same one, and adding or removing a tied backend moves only the
// requests that it wins or had won. The runner-up is the next in the same order.
class MaxScorePicker final : public Picker {
 public:
  std::string_view name() const noexcept override { return "max-score"; }
  PickerChoice choose(std::span<const CandidateScore> candidates, const PoolSnapshot& pool,
                      std::uint64_t seed) const override;
};

// Power of two choices: samples two distinct candidates from the seed and takes the better
// (ties as in MaxScorePicker); the other is the runner-up. Avoids herding when many pickers act
// on the same stale snapshot.
class PowerOfTwoChoicesPicker final : public Picker {
 public:
  std::string_view name() const noexcept override { return "p2c"; }
  PickerChoice choose(std::span<const CandidateScore> candidates, const PoolSnapshot& pool,
                      std::uint64_t seed) const override;

  // The two distinct candidate positions sampled for `seed` out of `n` >= 2.
  static std::pair<std::size_t, std::size_t> sample(std::uint64_t seed, std::size_t n) noexcept;
};

// -- Policy -----------------------------------------------------------------------------------

struct WeightedScorer {
  std::shared_ptr<const Scorer> scorer;
  double weight = 1.0;  // > 0; the combined score is the weight-normalized mean
};

// Filters, then weighted scorers, then a picker. Immutable after construction; pick() is
// const and safe to call from any number of threads.
class Policy {
 public:
  // Throws std::invalid_argument on a null piece or a scorer weight that is not a positive
  // finite number. No scorers is allowed: every candidate then scores 1 and the picker's
  // tie-breaking decides.
  Policy(std::string name, std::vector<std::shared_ptr<const Filter>> filters,
         std::vector<WeightedScorer> scorers, std::shared_ptr<const Picker> picker);

  Pick pick(const RequestFeatures& request, const PoolSnapshot& pool, TimePoint now) const;

  const std::string& name() const noexcept { return name_; }
  std::span<const std::shared_ptr<const Filter>> filters() const noexcept { return filters_; }
  std::span<const WeightedScorer> scorers() const noexcept { return scorers_; }
  const Picker& picker() const noexcept { return *picker_; }

 private:
  std::string name_;
  std::vector<std::shared_ptr<const Filter>> filters_;
  std::vector<WeightedScorer> scorers_;
  double total_weight_ = 0.0;
  std::shared_ptr<const Picker> picker_;
};

// The default: eligibility filters, least outstanding requests per unit of weight, max-score
// picker with request-hash tie-breaking.
Policy make_least_outstanding_policy();

// The seed pickers get for a request hash (a full-avalanche mix of it).
std::uint64_t pick_seed(std::uint64_t request_hash) noexcept;

}  // namespace omni
