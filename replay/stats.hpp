// Percentiles and a bounded-memory latency histogram.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <vector>

namespace omni::replay {

// The q-quantile (0 <= q <= 1) of `values` with linear interpolation between closest ranks
// (numpy's default, "type 7"); nullopt for no values. Sorts `values`.
std::optional<double> percentile(std::vector<double>& values, double q);

// {"count", "mean", "p50", "p90", "p99", "max"} of `values` (null figures when empty), each
// multiplied by `scale`.
nlohmann::ordered_json distribution(std::vector<double> values, double scale = 1.0);

// Latencies in log-spaced buckets 1% wide from 1 microsecond up (one bucket below that, one
// above about 6 hours): fixed memory however many values, percentiles within 0.5% of the
// exact ones, exact count, mean and max. Used for the inter-token latencies of a whole run,
// which can be far too many to keep.
class LogHistogram {
 public:
  LogHistogram();

  void add(double ms, std::uint64_t count = 1);
  std::uint64_t count() const { return count_; }
  // As distribution(), from the buckets (each percentile is its bucket's geometric middle,
  // clamped to the observed minimum and maximum).
  nlohmann::ordered_json summary(double scale = 1.0) const;
  std::optional<double> percentile(double q) const;

 private:
  static std::size_t bucket(double ms);
  static double bucket_value(std::size_t i);

  std::vector<std::uint64_t> buckets_;
  std::uint64_t count_ = 0;
  double sum_ = 0;
  double min_ = 0;
  double max_ = 0;
};

}  // namespace omni::replay
