#include <omni/engine_metrics.hpp>

#include <omni/prometheus.hpp>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <string>

namespace omni {
namespace {

struct Names {
  const char* running;
  const char* waiting;
  const char* kv_usage;
  const char* queries;
  const char* hits;
  const char* hit_rate;
  const char* preemptions;
};

constexpr Names kVllmNames = {"vllm:num_requests_running", "vllm:num_requests_waiting",
                              "vllm:kv_cache_usage_perc",  "vllm:prefix_cache_queries_total",
                              "vllm:prefix_cache_hits_total", nullptr,
                              "vllm:num_preemptions_total"};
constexpr Names kSglangNames = {"sglang:num_running_reqs", "sglang:num_queue_reqs",
                                "sglang:token_usage",      nullptr,
                                nullptr,                   "sglang:cache_hit_rate",
                                nullptr};

void add(std::optional<double>& slot, double v) { slot = slot.value_or(0.0) + v; }
void take_max(std::optional<double>& slot, double v) { slot = std::max(slot.value_or(v), v); }

template <typename T>
std::optional<T> label_number(const prom::Sample& s, const char* name) {
  auto it = s.labels.find(name);
  if (it == s.labels.end()) return std::nullopt;
  T v{};
  const auto& text = it->second;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || p != text.data() + text.size()) return std::nullopt;
  return v;
}

}  // namespace

EngineMetrics parse_engine_metrics(EngineFlavor flavor, std::string_view exposition) {
  EngineMetrics m;
  const auto samples = prom::parse_text(exposition, &m.malformed_lines);
  const Names& n = flavor == EngineFlavor::kVllm ? kVllmNames : kSglangNames;
  auto is = [](const std::string& name, const char* want) {
    return want != nullptr && name == want;
  };
  for (const auto& s : samples) {
    if (!std::isfinite(s.value)) continue;
    if (is(s.name, n.running)) add(m.running, s.value);
    else if (is(s.name, n.waiting)) add(m.waiting, s.value);
    else if (is(s.name, n.kv_usage)) take_max(m.kv_usage, s.value);
    else if (is(s.name, n.queries)) add(m.prefix_cache_queries, s.value);
    else if (is(s.name, n.hits)) add(m.prefix_cache_hits, s.value);
    else if (is(s.name, n.hit_rate)) take_max(m.cache_hit_rate, s.value);
    else if (is(s.name, n.preemptions)) add(m.preemptions, s.value);
    else if (flavor == EngineFlavor::kVllm && s.name == "vllm:cache_config_info") {
      if (auto bs = label_number<std::uint32_t>(s, "block_size"); bs && *bs > 0) m.block_size = bs;
      if (auto nb = label_number<std::uint64_t>(s, "num_gpu_blocks")) m.num_gpu_blocks = nb;
    }
  }
  if (!m.cache_hit_rate && m.prefix_cache_queries && *m.prefix_cache_queries > 0 &&
      m.prefix_cache_hits) {
    m.cache_hit_rate = *m.prefix_cache_hits / *m.prefix_cache_queries;
  }
  if (m.kv_usage) m.kv_usage = std::clamp(*m.kv_usage, 0.0, 1.0);
  return m;
}

void apply_engine_metrics(const EngineMetrics& metrics, EngineLoad& load) {
  auto count = [](double v) {
    return static_cast<std::uint32_t>(std::clamp(v, 0.0, 4294967295.0));
  };
  if (metrics.running) load.running = count(*metrics.running);
  if (metrics.waiting) load.waiting = count(*metrics.waiting);
  if (metrics.kv_usage) load.kv_usage = *metrics.kv_usage;
  load.metrics_age = std::chrono::steady_clock::duration::zero();
  load.sent_since_poll = 0;
}

}  // namespace omni
