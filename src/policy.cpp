#include <omni/policy.hpp>

#include <omni/block_hash.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <stdexcept>

namespace omni {
namespace {

// Salts keep the derived streams (tie keys, second sample) independent of the seed itself.
constexpr std::uint64_t kSeedSalt = 0x6a09e667f3bcc909ULL;
constexpr std::uint64_t kIdSalt = 0xbb67ae8584caa73bULL;
constexpr std::uint64_t kSampleSalt = 0x3c6ef372fe94f82bULL;

double clamp_unit(double v) noexcept {
  if (std::isnan(v)) return 0.0;
  return std::clamp(v, 0.0, 1.0);
}

// Min-max normalization in place: the smallest of the known (non-NaN) loads becomes 1, the
// largest 0, all equal become 1; unknown ones become `unknown_score`.
void normalize_loads(std::span<double> loads, double unknown_score) noexcept {
  double lo = std::numeric_limits<double>::infinity();
  double hi = -std::numeric_limits<double>::infinity();
  for (double v : loads) {
    if (std::isnan(v)) continue;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  const double spread = hi - lo;
  for (double& v : loads) {
    if (std::isnan(v)) {
      v = unknown_score;
    } else if (!(spread > 0.0)) {
      v = 1.0;
    } else {
      v = (hi - v) / spread;
    }
  }
}

void validate(const EngineMetricsOptions& options, std::string_view scorer) {
  if (options.max_age <= std::chrono::steady_clock::duration::zero()) {
    throw std::invalid_argument(std::string(scorer) + " scorer: metrics max_age must be positive");
  }
  if (!(options.unknown_score >= 0.0 && options.unknown_score <= 1.0)) {
    throw std::invalid_argument(std::string(scorer) +
                                " scorer: unknown_score must be in [0,1], got " +
                                std::to_string(options.unknown_score));
  }
}

// A candidate under comparison; the rendezvous key is computed only when scores tie.
struct Ranked {
  std::size_t pos = 0;
  double score = 0.0;
  double key = -1.0;  // < 0: not computed yet
};

// Weighted rendezvous key (exponential race): -ln(u) / weight with u uniform in (0,1) from
// (seed, backend id). The smallest key wins, with probability proportional to weight.
double rendezvous_key(std::uint64_t seed, const BackendState& backend) noexcept {
  const std::uint64_t h = mix64(seed ^ mix64(backend.id ^ kIdSalt));
  const double u = (static_cast<double>(h >> 11) + 0.5) * 0x1p-53;
  return -std::log(u) / static_cast<double>(std::max<std::uint32_t>(backend.weight, 1));
}

// Strict order of the picker: higher score, then smaller rendezvous key, then lower position
// (only identical ids and weights reach that).
class Ranking {
 public:
  Ranking(std::span<const CandidateScore> candidates, const PoolSnapshot& pool,
          std::uint64_t seed) noexcept
      : candidates_(candidates), pool_(pool), seed_(seed) {}

  Ranked at(std::size_t pos) const noexcept { return Ranked{pos, candidates_[pos].score}; }

  bool outranks(Ranked& a, Ranked& b) const noexcept {
    if (a.score != b.score) return a.score > b.score;
    if (a.key < 0.0) a.key = key(a.pos);
    if (b.key < 0.0) b.key = key(b.pos);
    if (a.key != b.key) return a.key < b.key;
    return a.pos < b.pos;
  }

 private:
  double key(std::size_t pos) const noexcept {
    return rendezvous_key(seed_, pool_[candidates_[pos].index]);
  }

  std::span<const CandidateScore> candidates_;
  const PoolSnapshot& pool_;
  std::uint64_t seed_;
};

std::string format_score(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3f", v);
  return buf;
}

}  // namespace

std::uint64_t pick_seed(std::uint64_t request_hash) noexcept {
  return mix64(request_hash ^ kSeedSalt);
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

PoolSnapshot::PoolSnapshot(std::string pool, std::uint64_t generation,
                           std::vector<BackendState> backends)
    : pool_(std::move(pool)), generation_(generation), backends_(std::move(backends)) {
  if (backends_.size() > std::numeric_limits<std::uint32_t>::max()) {
    throw std::invalid_argument("pool \"" + pool_ + "\": too many backends");
  }
  for (std::size_t i = 0; i < backends_.size(); ++i) {
    BackendState& b = backends_[i];
    if (b.weight == 0) {
      throw std::invalid_argument("pool \"" + pool_ + "\": backend \"" + b.name + "\" (position " +
                                  std::to_string(i) + ") has weight 0; weights must be >= 1");
    }
    b.index = static_cast<std::uint32_t>(i);
  }
}

PoolSnapshotPtr make_pool_snapshot(std::string pool, std::uint64_t generation,
                                   std::vector<BackendState> backends) {
  return std::make_shared<const PoolSnapshot>(std::move(pool), generation, std::move(backends));
}

void BackendBitmap::set(std::size_t index) {
  const std::size_t word = index / 64;
  if (word >= words_.size()) words_.resize(word + 1, 0);
  words_[word] |= std::uint64_t{1} << (index % 64);
}

bool BackendBitmap::test(std::size_t index) const noexcept {
  const std::size_t word = index / 64;
  return word < words_.size() && ((words_[word] >> (index % 64)) & 1U) != 0;
}

// ---------------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------------

std::string_view to_string(FilterReason reason) noexcept {
  switch (reason) {
    case FilterReason::kDown:
      return "down";
    case FilterReason::kUnhealthy:
      return "unhealthy";
    case FilterReason::kExcluded:
      return "excluded";
    case FilterReason::kAtMaxConns:
      return "at-max-conns";
    case FilterReason::kTooManyFails:
      return "too-many-fails";
    case FilterReason::kOther:
      return "other";
  }
  return "unknown";
}

std::string_view to_string(PickStatus status) noexcept {
  switch (status) {
    case PickStatus::kPicked:
      return "picked";
    case PickStatus::kEmptyPool:
      return "empty-pool";
    case PickStatus::kAllExcluded:
      return "all-excluded";
    case PickStatus::kNoneEligible:
      return "none-eligible";
  }
  return "unknown";
}

std::optional<double> Pick::score_of(std::size_t index) const noexcept {
  for (const CandidateScore& c : candidates) {
    if (c.index == index) return c.score;
  }
  return std::nullopt;
}

std::optional<FilterReason> Pick::rejection_of(std::size_t index) const noexcept {
  for (const Rejection& r : rejected) {
    if (r.index == index) return r.reason;
  }
  return std::nullopt;
}

std::string Pick::explain(const PoolSnapshot& pool) const {
  auto name_of = [&pool](std::size_t index) -> std::string {
    if (index < pool.size() && !pool[index].name.empty()) return pool[index].name;
    return "#" + std::to_string(index);
  };
  std::string out = "pool=" + pool.pool() + " status=" + std::string(to_string(status));
  auto append_backend = [&](std::string_view label, std::optional<std::size_t> index) {
    if (!index) return;
    out += ' ';
    out += label;
    out += '=' + name_of(*index);
    if (auto s = score_of(*index)) out += '(' + format_score(*s) + ')';
  };
  append_backend("chosen", chosen);
  append_backend("runner_up", runner_up);
  out += " candidates=" + std::to_string(candidates.size());
  if (!rejected.empty()) {
    out += " rejected=[";
    for (std::size_t i = 0; i < rejected.size(); ++i) {
      if (i > 0) out += ' ';
      out += name_of(rejected[i].index) + ':' + std::string(to_string(rejected[i].reason));
      if (rejected[i].reason == FilterReason::kOther) out += '/' + std::string(rejected[i].filter);
    }
    out += ']';
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Filters
// ---------------------------------------------------------------------------------------------

void BackendFilter::filter(const PickContext& ctx, std::vector<std::size_t>& candidates,
                           std::vector<Rejection>& rejected) const {
  std::size_t kept = 0;
  for (std::size_t index : candidates) {
    if (auto reason = reject(ctx, ctx.pool[index])) {
      rejected.push_back(Rejection{index, *reason, name()});
    } else {
      candidates[kept++] = index;
    }
  }
  candidates.resize(kept);
}

std::optional<FilterReason> HealthFilter::reject(const PickContext&,
                                                 const BackendState& backend) const {
  if (backend.down) return FilterReason::kDown;
  if (!backend.healthy) return FilterReason::kUnhealthy;
  return std::nullopt;
}

std::optional<FilterReason> ExcludedFilter::reject(const PickContext& ctx,
                                                   const BackendState& backend) const {
  if (ctx.request.is_excluded(backend.index)) return FilterReason::kExcluded;
  return std::nullopt;
}

std::optional<FilterReason> MaxConnsFilter::reject(const PickContext&,
                                                   const BackendState& backend) const {
  if (backend.max_conns > 0 && backend.active_conns >= backend.max_conns) {
    return FilterReason::kAtMaxConns;
  }
  return std::nullopt;
}

std::optional<FilterReason> MaxFailsFilter::reject(const PickContext&,
                                                   const BackendState& backend) const {
  if (backend.max_fails > 0 && backend.fails >= backend.max_fails) {
    return FilterReason::kTooManyFails;
  }
  return std::nullopt;
}

std::vector<std::shared_ptr<const Filter>> make_eligibility_filters() {
  return {std::make_shared<HealthFilter>(), std::make_shared<ExcludedFilter>(),
          std::make_shared<MaxConnsFilter>(), std::make_shared<MaxFailsFilter>()};
}

// ---------------------------------------------------------------------------------------------
// Scorers
// ---------------------------------------------------------------------------------------------

void LeastOutstandingScorer::score(const PickContext& ctx, std::span<const std::size_t> candidates,
                                   std::span<double> scores) const {
  for (std::size_t i = 0; i < candidates.size(); ++i) {
    const BackendState& b = ctx.pool[candidates[i]];
    // Equal outstanding counts are told apart by the requests sent since the last engine poll
    // (a fraction of one request, so it never outweighs a real difference): light sequential
    // traffic then alternates between idle servers instead of following the request hash.
    const double recent = std::min<double>(b.load.sent_since_poll, 1000.0) * 1e-4;
    scores[i] = (static_cast<double>(b.outstanding) + recent) /
                static_cast<double>(std::max<std::uint32_t>(b.weight, 1));
  }
  normalize_loads(scores, 1.0);
}

QueueDepthScorer::QueueDepthScorer(QueueDepthOptions options) : options_(options) {
  validate(options_.metrics, name());
}

void QueueDepthScorer::score(const PickContext& ctx, std::span<const std::size_t> candidates,
                             std::span<double> scores) const {
  constexpr double kUnknown = std::numeric_limits<double>::quiet_NaN();
  for (std::size_t i = 0; i < candidates.size(); ++i) {
    const EngineLoad& load = ctx.pool[candidates[i]].load;
    if (!load.fresh(options_.metrics.max_age)) {
      scores[i] = kUnknown;
    } else if (options_.metric == QueueMetric::kWaitingRequests) {
      std::uint64_t depth = load.waiting;
      if (options_.count_sent_since_poll) depth += load.sent_since_poll;
      scores[i] = static_cast<double>(depth);
    } else if (load.waiting_uncached_tokens) {
      scores[i] = static_cast<double>(*load.waiting_uncached_tokens);
    } else {
      scores[i] = kUnknown;
    }
  }
  normalize_loads(scores, options_.metrics.unknown_score);
}

KvUsageScorer::KvUsageScorer(EngineMetricsOptions options) : options_(options) {
  validate(options_, name());
}

void KvUsageScorer::score(const PickContext& ctx, std::span<const std::size_t> candidates,
                          std::span<double> scores) const {
  for (std::size_t i = 0; i < candidates.size(); ++i) {
    const EngineLoad& load = ctx.pool[candidates[i]].load;
    if (load.fresh(options_.max_age) && !std::isnan(load.kv_usage)) {
      scores[i] = 1.0 - std::clamp(load.kv_usage, 0.0, 1.0);
    } else {
      scores[i] = options_.unknown_score;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Pickers
// ---------------------------------------------------------------------------------------------

PickerChoice MaxScorePicker::choose(std::span<const CandidateScore> candidates,
                                    const PoolSnapshot& pool, std::uint64_t seed) const {
  const Ranking ranking(candidates, pool, seed);
  Ranked best = ranking.at(0);
  std::optional<Ranked> second;
  for (std::size_t pos = 1; pos < candidates.size(); ++pos) {
    Ranked r = ranking.at(pos);
    if (ranking.outranks(r, best)) {
      second = best;
      best = r;
    } else if (!second || ranking.outranks(r, *second)) {
      second = r;
    }
  }
  PickerChoice choice{best.pos, std::nullopt};
  if (second) choice.runner_up = second->pos;
  return choice;
}

std::pair<std::size_t, std::size_t> PowerOfTwoChoicesPicker::sample(std::uint64_t seed,
                                                                    std::size_t n) noexcept {
  const std::size_t first = static_cast<std::size_t>(seed % n);
  const std::size_t offset = 1 + static_cast<std::size_t>(mix64(seed ^ kSampleSalt) % (n - 1));
  return {first, (first + offset) % n};
}

PickerChoice PowerOfTwoChoicesPicker::choose(std::span<const CandidateScore> candidates,
                                             const PoolSnapshot& pool, std::uint64_t seed) const {
  if (candidates.size() == 1) return PickerChoice{0, std::nullopt};
  const auto [first, second] = sample(seed, candidates.size());
  const Ranking ranking(candidates, pool, seed);
  Ranked a = ranking.at(first);
  Ranked b = ranking.at(second);
  if (ranking.outranks(a, b)) return PickerChoice{a.pos, b.pos};
  return PickerChoice{b.pos, a.pos};
}

// ---------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------

Policy::Policy(std::string name, std::vector<std::shared_ptr<const Filter>> filters,
               std::vector<WeightedScorer> scorers, std::shared_ptr<const Picker> picker)
    : name_(std::move(name)),
      filters_(std::move(filters)),
      scorers_(std::move(scorers)),
      picker_(std::move(picker)) {
  const std::string where = "policy \"" + name_ + "\": ";
  for (std::size_t i = 0; i < filters_.size(); ++i) {
    if (!filters_[i])
      throw std::invalid_argument(where + "filter " + std::to_string(i) + " is null");
  }
  for (std::size_t i = 0; i < scorers_.size(); ++i) {
    const WeightedScorer& s = scorers_[i];
    if (!s.scorer) throw std::invalid_argument(where + "scorer " + std::to_string(i) + " is null");
    if (!(std::isfinite(s.weight) && s.weight > 0.0)) {
      throw std::invalid_argument(where + "scorer \"" + std::string(s.scorer->name()) +
                                  "\" has weight " + std::to_string(s.weight) +
                                  "; weights must be positive and finite");
    }
    total_weight_ += s.weight;
  }
  if (!std::isfinite(total_weight_)) {
    throw std::invalid_argument(where + "scorer weights overflow");
  }
  if (!picker_) throw std::invalid_argument(where + "picker is null");
}

Pick Policy::pick(const RequestFeatures& request, const PoolSnapshot& pool, TimePoint now) const {
  Pick out;
  out.num_scorers = scorers_.size();
  if (pool.empty()) {
    out.status = PickStatus::kEmptyPool;
    return out;
  }

  const PickContext ctx{request, pool, now};
  std::vector<std::size_t> candidates(pool.size());
  std::iota(candidates.begin(), candidates.end(), std::size_t{0});
  for (const auto& filter : filters_) {
    if (candidates.empty()) break;
    filter->filter(ctx, candidates, out.rejected);
  }
  if (candidates.empty()) {
    const bool tried =
        std::any_of(out.rejected.begin(), out.rejected.end(),
                    [](const Rejection& r) { return r.reason == FilterReason::kExcluded; });
    out.status = tried ? PickStatus::kAllExcluded : PickStatus::kNoneEligible;
    return out;
  }

  const std::size_t n = candidates.size();
  const std::size_t num_scorers = scorers_.size();
  out.scorer_scores.assign(n * num_scorers, 0.0);
  std::vector<double> column(num_scorers > 0 ? n : 0);
  for (std::size_t s = 0; s < num_scorers; ++s) {
    std::fill(column.begin(), column.end(), 0.0);
    scorers_[s].scorer->score(ctx, candidates, column);
    for (std::size_t i = 0; i < n; ++i)
      out.scorer_scores[i * num_scorers + s] = clamp_unit(column[i]);
  }
  out.candidates.resize(n);
  for (std::size_t i = 0; i < n; ++i) {
    double total = 1.0;
    if (num_scorers > 0) {
      double sum = 0.0;
      for (std::size_t s = 0; s < num_scorers; ++s) {
        sum += scorers_[s].weight * out.scorer_scores[i * num_scorers + s];
      }
      total = clamp_unit(sum / total_weight_);
    }
    out.candidates[i] = CandidateScore{candidates[i], total};
  }

  const PickerChoice choice =
      picker_->choose(out.candidates, pool, pick_seed(request.request_hash));
  if (choice.chosen >= n ||
      (choice.runner_up && (*choice.runner_up >= n || *choice.runner_up == choice.chosen))) {
    throw std::logic_error("picker \"" + std::string(picker_->name()) +
                           "\" returned an invalid candidate position");
  }
  out.status = PickStatus::kPicked;
  out.chosen = out.candidates[choice.chosen].index;
  if (choice.runner_up) out.runner_up = out.candidates[*choice.runner_up].index;
  return out;
}

Policy make_least_outstanding_policy() {
  return Policy("least-outstanding", make_eligibility_filters(),
                {WeightedScorer{std::make_shared<LeastOutstandingScorer>(), 1.0}},
                std::make_shared<MaxScorePicker>());
}

}  // namespace omni
