#include "stats.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace omni::replay {

namespace {

constexpr double kMinMs = 1e-3;         // 1 microsecond: the first bucket's upper edge
constexpr double kGrowth = 1.01;        // each bucket 1% wider than the one before
constexpr std::size_t kBuckets = 2400;  // up to 1e-3 * 1.01^2399 ms, about 6.4 hours

nlohmann::ordered_json figure(std::optional<double> v, double scale) {
  return v ? nlohmann::ordered_json(*v * scale) : nlohmann::ordered_json(nullptr);
}

}  // namespace

std::optional<double> percentile(std::vector<double>& values, double q) {
  if (values.empty()) return std::nullopt;
  std::sort(values.begin(), values.end());
  const double pos = std::clamp(q, 0.0, 1.0) * static_cast<double>(values.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(pos));
  const auto hi = std::min(lo + 1, values.size() - 1);
  return values[lo] + (values[hi] - values[lo]) * (pos - static_cast<double>(lo));
}

nlohmann::ordered_json distribution(std::vector<double> values, double scale) {
  nlohmann::ordered_json j;
  j["count"] = values.size();
  const std::optional<double> mean =
      values.empty() ? std::nullopt
                     : std::optional<double>(std::accumulate(values.begin(), values.end(), 0.0) /
                                             static_cast<double>(values.size()));
  j["mean"] = figure(mean, scale);
  j["p50"] = figure(percentile(values, 0.5), scale);
  j["p90"] = figure(percentile(values, 0.9), scale);
  j["p99"] = figure(percentile(values, 0.99), scale);
  j["max"] = figure(values.empty() ? std::nullopt : std::optional<double>(values.back()), scale);
  return j;
}

LogHistogram::LogHistogram() : buckets_(kBuckets, 0) {}

std::size_t LogHistogram::bucket(double ms) {
  if (!(ms > kMinMs)) return 0;
  const double i = std::ceil(std::log(ms / kMinMs) / std::log(kGrowth));
  return static_cast<std::size_t>(std::min(i, static_cast<double>(kBuckets - 1)));
}

double LogHistogram::bucket_value(std::size_t i) {
  // Bucket i > 0 holds (kMinMs * g^(i-1), kMinMs * g^i]; its geometric middle is g^(i - 1/2).
  return i == 0 ? kMinMs : kMinMs * std::pow(kGrowth, static_cast<double>(i) - 0.5);
}

void LogHistogram::add(double ms, std::uint64_t count) {
  if (count == 0) return;
  buckets_[bucket(ms)] += count;
  min_ = count_ == 0 ? ms : std::min(min_, ms);
  max_ = count_ == 0 ? ms : std::max(max_, ms);
  count_ += count;
  sum_ += ms * static_cast<double>(count);
}

std::optional<double> LogHistogram::percentile(double q) const {
  if (count_ == 0) return std::nullopt;
  // The value of rank ceil(q * count) (1-based), the nearest-rank definition: interpolating
  // between two ranks inside a bucket would add nothing to a 1%-wide bucket.
  const auto rank = std::max<std::uint64_t>(
      1,
      static_cast<std::uint64_t>(std::ceil(std::clamp(q, 0.0, 1.0) * static_cast<double>(count_))));
  std::uint64_t seen = 0;
  for (std::size_t i = 0; i < buckets_.size(); ++i) {
    seen += buckets_[i];
    if (seen >= rank) return std::clamp(bucket_value(i), min_, max_);
  }
  return max_;
}

nlohmann::ordered_json LogHistogram::summary(double scale) const {
  nlohmann::ordered_json j;
  j["count"] = count_;
  j["mean"] = figure(
      count_ ? std::optional<double>(sum_ / static_cast<double>(count_)) : std::nullopt, scale);
  j["p50"] = figure(percentile(0.5), scale);
  j["p90"] = figure(percentile(0.9), scale);
  j["p99"] = figure(percentile(0.99), scale);
  j["max"] = figure(count_ ? std::optional<double>(max_) : std::nullopt, scale);
  return j;
}

}  // namespace omni::replay
