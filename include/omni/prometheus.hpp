// Prometheus text exposition format (version 0.0.4): a writer for the metrics we serve and a
// parser for the metrics we scrape from engines.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace omni::prom {

using Labels = std::vector<std::pair<std::string, std::string>>;

class TextWriter {
 public:
  // Starts a metric family: writes its # HELP and # TYPE lines (type: counter, gauge,
  // histogram, summary or untyped).
  void family(std::string_view name, std::string_view type, std::string_view help);
  // One sample line; label values are escaped.
  void sample(std::string_view name, const Labels& labels, double value);
  // A whole histogram. `upper_bounds` excludes +Inf; `bucket_counts[i]` counts the
  // observations in (upper_bounds[i-1], upper_bounds[i]] (per bucket, not cumulative: the
  // writer accumulates them into `le` buckets); `overflow` counts those above every bound.
  // Throws std::invalid_argument when the two vectors differ in length.
  void histogram(std::string_view name, const Labels& labels,
                 const std::vector<double>& upper_bounds,
                 const std::vector<std::uint64_t>& bucket_counts, std::uint64_t overflow,
                 double sum);
  const std::string& str() const noexcept { return out_; }
  std::string take() noexcept { return std::move(out_); }

 private:
  std::string out_;
};

struct Sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0.0;
};

// Parses exposition text. Comment lines are skipped; a malformed line is skipped and counted
// in `malformed` when given. Values accept NaN, +Inf and -Inf.
std::vector<Sample> parse_text(std::string_view text, std::size_t* malformed = nullptr);

// The value of the first sample named `name` whose labels include every pair in `match`.
std::optional<double> find_value(const std::vector<Sample>& samples, std::string_view name,
                                 const std::map<std::string, std::string>& match = {});

}  // namespace omni::prom
