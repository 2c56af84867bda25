#include <omni/kv_routing.hpp>

#include <algorithm>
#include <array>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <utility>

namespace omni {
namespace {

constexpr std::uint32_t kNoRank = std::numeric_limits<std::uint32_t>::max();
constexpr std::uint32_t kNoPosition = std::numeric_limits<std::uint32_t>::max();

// O(n) scratch that lives on the stack up to N elements.
template <typename T, std::size_t N>
class Scratch {
 public:
  Scratch(std::size_t n, T init) : n_(n) {
    if (n > N) heap_ = std::make_unique<T[]>(n);
    std::fill_n(data(), n, init);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  T* data() noexcept { return heap_ ? heap_.get() : inline_.data(); }
  T& operator[](std::size_t i) noexcept { return data()[i]; }
  std::span<T> span() noexcept { return {data(), n_}; }

 private:
  std::array<T, N> inline_;
  std::unique_ptr<T[]> heap_;
  std::size_t n_;
};

constexpr std::size_t kInline = 256;

double nonneg(double x) noexcept {
  return x > 0 ? x : 0.0;
}  // NaN -> 0

bool finite_nonneg(double x) noexcept {
  return std::isfinite(x) && x >= 0;
}

// Map member index -> candidate position; throws on out-of-range or duplicate indices.
template <typename Candidate>
void index_candidates(std::span<const Candidate> candidates, std::size_t ring_size,
                      Scratch<std::uint32_t, kInline>& position_of,
                      Scratch<bool, kInline>& eligible) {
  if (candidates.size() >= kNoPosition) throw std::invalid_argument("too many candidates");
  for (std::size_t j = 0; j < candidates.size(); ++j) {
    const std::size_t index = candidates[j].index;
    if (index >= ring_size) throw std::invalid_argument("candidate index outside the ring");
    if (position_of[index] != kNoPosition) throw std::invalid_argument("duplicate candidate");
    position_of[index] = static_cast<std::uint32_t>(j);
    eligible[index] = true;
  }
}

// Ring ranks of the candidates' members, computed on first use.
class LazyRanks {
 public:
  LazyRanks(const BoundedLoadRing& ring, std::uint64_t key, std::span<const bool> eligible)
      : ring_(ring), key_(key), eligible_(eligible), ranks_(ring.size(), kNoRank) {}
  std::uint32_t operator()(std::size_t member) {
    if (!computed_) {
      ring_.clockwise_ranks(key_, eligible_, ranks_.span());
      computed_ = true;
    }
    return ranks_[member];
  }

 private:
  const BoundedLoadRing& ring_;
  std::uint64_t key_;
  std::span<const bool> eligible_;
  Scratch<std::uint32_t, kInline> ranks_;
  bool computed_ = false;
};

std::string format_ms(double ms) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", ms);
  return buf;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// BoundedLoadRing
// ---------------------------------------------------------------------------------------------

BoundedLoadRing::BoundedLoadRing(std::span<const std::uint64_t> ids,
                                 std::span<const std::uint32_t> weights, unsigned vnodes_per_weight)
    : ids_(ids.begin(), ids.end()) {
  if (!weights.empty() && weights.size() != ids.size()) {
    throw std::invalid_argument("BoundedLoadRing: weights and ids differ in size");
  }
  if (vnodes_per_weight == 0) throw std::invalid_argument("BoundedLoadRing: vnodes_per_weight 0");
  if (ids.size() >= kNoPosition) throw std::invalid_argument("BoundedLoadRing: too many members");
  if (weights.empty()) {
    weights_.assign(ids.size(), 1);
  } else {
    weights_.assign(weights.begin(), weights.end());
  }
  std::vector<std::uint64_t> sorted_ids(ids.begin(), ids.end());
  std::sort(sorted_ids.begin(), sorted_ids.end());
  if (std::adjacent_find(sorted_ids.begin(), sorted_ids.end()) != sorted_ids.end()) {
    throw std::invalid_argument("BoundedLoadRing: duplicate member id");
  }
  std::uint64_t total = 0;
  for (std::uint32_t w : weights_) {
    if (w == 0) throw std::invalid_argument("BoundedLoadRing: weight 0");
    total += static_cast<std::uint64_t>(w) * vnodes_per_weight;
    if (total > kMaxPoints) throw std::invalid_argument("BoundedLoadRing: too many points");
  }

  struct Point {
    std::uint64_t position;
    std::uint64_t id;
    std::uint32_t member;
  };
  std::vector<Point> points;
  points.reserve(static_cast<std::size_t>(total));
  for (std::size_t i = 0; i < ids_.size(); ++i) {
    const std::uint64_t n = static_cast<std::uint64_t>(weights_[i]) * vnodes_per_weight;
    for (std::uint64_t v = 0; v < n; ++v) {
      points.push_back({point_position(ids_[i], v), ids_[i], static_cast<std::uint32_t>(i)});
    }
  }
  std::sort(points.begin(), points.end(), [](const Point& a, const Point& b) {
    return a.position != b.position ? a.position < b.position : a.id < b.id;
  });
  positions_.reserve(points.size());
  owners_.reserve(points.size());
  for (const Point& p : points) {
    positions_.push_back(p.position);
    owners_.push_back(p.member);
  }
}

std::size_t BoundedLoadRing::first_point(std::uint64_t key) const noexcept {
  const auto it = std::lower_bound(positions_.begin(), positions_.end(), key_position(key));
  return it == positions_.end() ? 0 : static_cast<std::size_t>(it - positions_.begin());
}

std::size_t BoundedLoadRing::home(std::uint64_t key) const noexcept {
  if (positions_.empty()) return 0;
  return owners_[first_point(key)];
}

std::size_t BoundedLoadRing::clockwise_ranks(std::uint64_t key, std::span<const bool> eligible,
                                             std::span<std::uint32_t> rank) const {
  const std::size_t n = size();
  if (eligible.size() != n || rank.size() != n) {
    throw std::invalid_argument("BoundedLoadRing::clockwise_ranks: size mismatch");
  }
  std::size_t n_eligible = 0;
  for (std::size_t i = 0; i < n; ++i) {
    rank[i] = kNoRank;
    n_eligible += eligible[i] ? 1 : 0;
  }
  if (n_eligible == 0) return 0;
  const std::size_t points = positions_.size();
  std::size_t p = first_point(key);
  std::uint32_t next = 0;
  for (std::size_t step = 0; step < points && next < n_eligible; ++step) {
    const std::uint32_t m = owners_[p];
    if (eligible[m] && rank[m] == kNoRank) rank[m] = next++;
    if (++p == points) p = 0;
  }
  return n_eligible;
}

std::optional<BoundedLoadRing::Choice> BoundedLoadRing::choose(std::uint64_t key,
                                                               std::span<const double> loads,
                                                               std::span<const bool> eligible,
                                                               double cost, double epsilon) const {
  const std::size_t n = size();
  if (loads.size() != n || eligible.size() != n) {
    throw std::invalid_argument("BoundedLoadRing::choose: size mismatch");
  }
  if (!finite_nonneg(cost)) throw std::invalid_argument("BoundedLoadRing::choose: bad cost");
  if (!finite_nonneg(epsilon)) throw std::invalid_argument("BoundedLoadRing::choose: bad epsilon");

  double total = cost;
  double weight_sum = 0;
  std::size_t n_eligible = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (!eligible[i]) continue;
    if (!std::isfinite(loads[i])) throw std::invalid_argument("BoundedLoadRing::choose: bad load");
    total += nonneg(loads[i]);
    weight_sum += weights_[i];
    ++n_eligible;
  }
  if (n_eligible == 0) return std::nullopt;

  // capacity_i = per_weight * weight_i; room when load_i < capacity_i.
  const double per_weight = (1.0 + epsilon) * total / weight_sum;
  auto load_of = [&](std::size_t i) { return nonneg(loads[i]); };
  auto has_room = [&](std::size_t i) { return load_of(i) < per_weight * weights_[i]; };
  auto relative = [&](std::size_t i) { return load_of(i) / weights_[i]; };

  Scratch<bool, kInline> seen(n, false);
  const std::size_t points = positions_.size();
  const std::size_t start = first_point(key);

  Choice choice;
  bool have_home = false;
  std::optional<std::size_t> chosen;
  std::size_t chosen_step = 0;
  std::optional<std::size_t> least, second_least;  // by load / weight, first met on ties
  std::size_t n_seen = 0;
  std::size_t p = start;
  for (std::size_t step = 0; step < points; ++step, p = (p + 1 == points ? 0 : p + 1)) {
    const std::uint32_t m = owners_[p];
    if (!eligible[m] || seen[m]) continue;
    seen[m] = true;
    ++n_seen;
    if (!have_home) {
      choice.home = m;
      have_home = true;
    }
    if (has_room(m)) {
      chosen = m;
      chosen_step = step;
      break;
    }
    if (!least || relative(m) < relative(*least)) {
      second_least = least;
      least = m;
    } else if (!second_least || relative(m) < relative(*second_least)) {
      second_least = m;
    }
    if (n_seen == n_eligible) break;
  }

  if (chosen) {
    choice.member = *chosen;
    if (n_eligible > 1) {
      // Continue the walk past the chosen member's point: the next member with room, skipping
      // the chosen one and those already found full; else the first distinct member.
      std::optional<std::size_t> first_distinct;
      p = start + chosen_step + 1;
      p %= points;
      for (std::size_t step = 1; step < points; ++step, p = (p + 1 == points ? 0 : p + 1)) {
        const std::uint32_t m = owners_[p];
        if (!eligible[m] || m == *chosen) continue;
        if (!first_distinct) first_distinct = m;
        if (seen[m]) continue;
        seen[m] = true;
        ++n_seen;
        if (has_room(m)) {
          choice.runner_up = m;
          break;
        }
        if (n_seen == n_eligible) break;
      }
      if (!choice.runner_up) choice.runner_up = first_distinct;
    }
  } else {
    // Nobody has room (epsilon == 0, cost == 0, every load / weight equal, or rounding).
    choice.none_fit = true;
    choice.member = *least;
    choice.runner_up = second_least;
  }
  choice.overflowed = choice.member != choice.home;
  choice.capacity = per_weight * weights_[choice.member];
  return choice;
}

// ---------------------------------------------------------------------------------------------
// Prefill
// ---------------------------------------------------------------------------------------------

std::string_view to_string(KvRouteDecision::Reason reason) noexcept {
  switch (reason) {
    case KvRouteDecision::Reason::kWarm:
      return "warm";
    case KvRouteDecision::Reason::kCold:
      return "cold";
    case KvRouteDecision::Reason::kColdOverflow:
      return "cold-overflow";
  }
  return "unknown";
}

namespace {

// Expected TTFT without the fixed overhead.
double variable_ttft_ms(const KvCandidate& c, std::uint32_t prompt_tokens,
                        const KvRouteOptions& o) noexcept {
  if (std::isfinite(c.expected_ms)) {
    return nonneg(c.expected_ms) + (c.kv_usage > o.kv_usage_high ? o.kv_usage_penalty_ms : 0.0);
  }
  if (!(c.tokens_per_s > 0) || !std::isfinite(c.tokens_per_s)) {
    return std::numeric_limits<double>::infinity();
  }
  const double uncached =
      c.cached_tokens >= prompt_tokens ? 0.0 : static_cast<double>(prompt_tokens - c.cached_tokens);
  double ms = 1000.0 * (nonneg(c.queued_tokens) + uncached) / c.tokens_per_s;
  if (c.kv_usage > o.kv_usage_high) ms += o.kv_usage_penalty_ms;
  return std::isnan(ms) ? std::numeric_limits<double>::infinity() : ms;
}

// Upper end of the tie band above the lowest value `low`.
double tie_limit(double low, double fraction) noexcept {
  if (!(fraction > 0) || !std::isfinite(fraction) || std::isinf(low)) return low;
  return low + fraction * low;
}

}  // namespace

double miss_price_ms(double uncached_tokens, double tokens_per_s,
                     const KvRouteOptions& o) noexcept {
  if (!(o.miss_weight > 0) || !std::isfinite(o.miss_weight)) return 0;
  if (!(tokens_per_s > 0) || !std::isfinite(tokens_per_s)) return 0;
  return o.miss_weight * 1000.0 * nonneg(uncached_tokens) / tokens_per_s;
}

double expected_ttft_ms(const KvCandidate& c, std::uint32_t prompt_tokens,
                        const KvRouteOptions& o) noexcept {
  return variable_ttft_ms(c, prompt_tokens, o) + o.fixed_overhead_ms;
}

std::optional<KvRouteDecision> choose_prefill(std::span<const KvCandidate> candidates,
                                              const BoundedLoadRing& ring,
                                              std::span<const std::uint64_t> prefix_keys,
                                              std::size_t block_tokens, std::uint32_t prompt_tokens,
                                              const KvRouteOptions& options) {
  if (candidates.empty()) return std::nullopt;
  if (block_tokens == 0 && !prefix_keys.empty()) {
    throw std::invalid_argument("choose_prefill: block_tokens 0");
  }
  const std::size_t n = ring.size();
  Scratch<std::uint32_t, kInline> position_of(n, kNoPosition);
  Scratch<bool, kInline> eligible(n, false);
  index_candidates(candidates, n, position_of, eligible);

  auto cached = [&](std::size_t j) { return std::min(candidates[j].cached_tokens, prompt_tokens); };
  std::uint32_t common = cached(0), most = cached(0);
  for (std::size_t j = 1; j < candidates.size(); ++j) {
    common = std::min(common, cached(j));
    most = std::max(most, cached(j));
  }

  KvRouteDecision d;
  d.common_cached = common;
  if (prefix_keys.empty()) {
    d.ring_key = mix64(prompt_tokens);
  } else {
    const std::size_t block = common / block_tokens;
    d.ring_key = block < prefix_keys.size() ? prefix_keys[block] : prefix_keys.back();
  }

  auto fill = [&](std::size_t chosen, std::optional<std::size_t> runner_up, double chosen_var,
                  double runner_var) {
    d.chosen = chosen;
    d.chosen_cached = cached(chosen);
    d.chosen_ttft_ms = chosen_var + options.fixed_overhead_ms;
    d.runner_up = runner_up;
    if (runner_up) {
      d.runner_up_cached = cached(*runner_up);
      d.runner_up_ttft_ms = runner_var + options.fixed_overhead_ms;
    }
  };

  if (most <= common) {
    Scratch<double, kInline> loads(n, 0.0);
    for (const KvCandidate& c : candidates) loads[c.index] = c.ring_load;
    const double cost = static_cast<double>(prompt_tokens - common);
    const auto choice =
        ring.choose(d.ring_key, loads.span(), eligible.span(), cost, options.epsilon);
    // Non-empty candidates: something is eligible.
    d.reason = choice->overflowed ? KvRouteDecision::Reason::kColdOverflow
                                  : KvRouteDecision::Reason::kCold;
    d.ring_home = position_of[choice->home];
    d.ring_capacity = choice->capacity;
    d.ring_none_fit = choice->none_fit;
    const std::size_t chosen = position_of[choice->member];
    std::optional<std::size_t> runner_up;
    double runner_var = 0;
    if (choice->runner_up) {
      runner_up = position_of[*choice->runner_up];
      runner_var = variable_ttft_ms(candidates[*runner_up], prompt_tokens, options);
    }
    fill(chosen, runner_up, variable_ttft_ms(candidates[chosen], prompt_tokens, options),
         runner_var);
    return d;
  }

  // Warm.
  d.reason = KvRouteDecision::Reason::kWarm;
  Scratch<double, kInline> ttft(candidates.size(), 0.0), score(candidates.size(), 0.0);
  for (std::size_t j = 0; j < candidates.size(); ++j) {
    ttft[j] = variable_ttft_ms(candidates[j], prompt_tokens, options);
    score[j] = ttft[j] + miss_price_ms(double(prompt_tokens - cached(j)),
                                       candidates[j].tokens_per_s, options);
  }
  LazyRanks rank(ring, d.ring_key, eligible.span());

  // The best candidate other than `skip`; sets `tied` when the tie rule decided.
  auto best = [&](std::optional<std::size_t> skip, bool& tied) -> std::optional<std::size_t> {
    double low = std::numeric_limits<double>::infinity();
    bool any = false;
    for (std::size_t j = 0; j < candidates.size(); ++j) {
      if (j == skip) continue;
      any = true;
      low = std::min(low, score[j]);
    }
    if (!any) return std::nullopt;
    const double limit = tie_limit(low, options.tie_fraction);
    std::optional<std::size_t> out;
    std::size_t band = 0;
    bool lowest_won = false;
    for (std::size_t j = 0; j < candidates.size(); ++j) {
      if (j == skip || !(score[j] <= limit)) continue;
      ++band;
      if (!out) {
        out = j;
        continue;
      }
      const std::uint32_t cj = cached(j), co = cached(*out);
      if (cj > co || (cj == co && rank(candidates[j].index) < rank(candidates[*out].index))) {
        out = j;
      }
    }
    lowest_won = score[*out] == low;
    // The tie rule decided when several were in the band and the winner is not the unique
    // lowest TTFT.
    if (band > 1) {
      std::size_t at_low = 0;
      for (std::size_t j = 0; j < candidates.size(); ++j) {
        if (j != skip && score[j] == low) ++at_low;
      }
      tied = !lowest_won || at_low > 1;
    }
    return out;
  };

  bool tied = false, runner_tied = false;
  const std::size_t chosen = *best(std::nullopt, tied);
  const std::optional<std::size_t> runner_up = best(chosen, runner_tied);
  d.tie_broken = tied;
  fill(chosen, runner_up, ttft[chosen], runner_up ? ttft[*runner_up] : 0.0);
  return d;
}

std::string explain(const KvRouteDecision& d) {
  std::string out(to_string(d.reason));
  out += " chosen=#" + std::to_string(d.chosen) + " ttft=" + format_ms(d.chosen_ttft_ms) +
         "ms cached=" + std::to_string(d.chosen_cached);
  if (d.runner_up) {
    out += " runner_up=#" + std::to_string(*d.runner_up) +
           " ttft=" + format_ms(d.runner_up_ttft_ms) +
           "ms cached=" + std::to_string(d.runner_up_cached);
  }
  out += " common=" + std::to_string(d.common_cached);
  if (d.reason == KvRouteDecision::Reason::kWarm) {
    if (d.tie_broken) out += " tie";
  } else {
    out += " home=#" + std::to_string(d.ring_home) + " capacity=" + format_ms(d.ring_capacity);
    if (d.ring_none_fit) out += " none-fit";
  }
  char key[24];
  std::snprintf(key, sizeof key, "%016" PRIx64, d.ring_key);
  out += " key=";
  out += key;
  return out;
}

// ---------------------------------------------------------------------------------------------
// Decode
// ---------------------------------------------------------------------------------------------

std::optional<DecodeRouteDecision> choose_decode(std::span<const DecodeCandidate> candidates,
                                                 const BoundedLoadRing& ring,
                                                 std::uint64_t ring_key,
                                                 const DecodeRouteOptions& options) {
  if (candidates.empty()) return std::nullopt;
  const std::size_t n = ring.size();
  Scratch<std::uint32_t, kInline> position_of(n, kNoPosition);
  Scratch<bool, kInline> eligible(n, false);
  index_candidates(candidates, n, position_of, eligible);
  LazyRanks rank(ring, ring_key, eligible.span());

  const double slack = finite_nonneg(options.slack) ? options.slack : 0.0;
  auto load = [&](std::size_t j) {
    return std::max(nonneg(candidates[j].outstanding), nonneg(candidates[j].running));
  };
  auto high = [&](std::size_t j) { return candidates[j].kv_usage >= options.kv_usage_high; };

  struct Pick {
    std::size_t chosen = 0;
    std::size_t equal = 0;
    bool cache_decided = false;
    bool all_high = false;
  };
  auto best = [&](std::optional<std::size_t> skip) -> std::optional<Pick> {
    bool any = false, any_low = false;
    for (std::size_t j = 0; j < candidates.size(); ++j) {
      if (j == skip) continue;
      any = true;
      any_low = any_low || !high(j);
    }
    if (!any) return std::nullopt;
    auto usable = [&](std::size_t j) { return j != skip && (!any_low || !high(j)); };
    double low = std::numeric_limits<double>::infinity();
    for (std::size_t j = 0; j < candidates.size(); ++j) {
      if (usable(j)) low = std::min(low, load(j));
    }
    const double limit = low + std::max(1.0, slack * low);
    Pick pick;
    pick.all_high = !any_low;
    std::optional<std::size_t> out, ring_first;
    for (std::size_t j = 0; j < candidates.size(); ++j) {
      if (!usable(j) || !(load(j) <= limit)) continue;
      ++pick.equal;
      if (!out) {
        out = ring_first = j;
        continue;
      }
      const std::uint32_t rj = rank(candidates[j].index);
      if (rj < rank(candidates[*ring_first].index)) ring_first = j;
      const std::uint32_t cj = candidates[j].cached_tokens, co = candidates[*out].cached_tokens;
      if (cj > co || (cj == co && rj < rank(candidates[*out].index))) out = j;
    }
    pick.chosen = *out;
    pick.cache_decided = *out != *ring_first;
    return pick;
  };

  const Pick first = *best(std::nullopt);
  DecodeRouteDecision d;
  d.chosen = first.chosen;
  d.chosen_cached = candidates[first.chosen].cached_tokens;
  d.cache_decided = first.cache_decided;
  d.chosen_load = load(first.chosen);
  d.equally_loaded = first.equal;
  d.all_kv_high = first.all_high;
  if (const auto second = best(first.chosen)) d.runner_up = second->chosen;
  return d;
}

std::string explain(const DecodeRouteDecision& d) {
  std::string out = "decode chosen=#" + std::to_string(d.chosen) +
                    " load=" + format_ms(d.chosen_load) +
                    " cached=" + std::to_string(d.chosen_cached) +
                    " equally_loaded=" + std::to_string(d.equally_loaded);
  if (d.runner_up) out += " runner_up=#" + std::to_string(*d.runner_up);
  if (d.cache_decided) out += " cache-decided";
  if (d.all_kv_high) out += " all-kv-high";
  return out;
}

}  // namespace omni
