// Reads the load signals a router needs out of an engine's Prometheus exposition, for vLLM and
// SGLang names (docs/metrics.md):
//   vLLM:   vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc,
//           vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total,
//           vllm:num_preemptions_total, vllm:cache_config_info{block_size,num_gpu_blocks}
//   SGLang: sglang:num_running_reqs, sglang:num_queue_reqs, sglang:token_usage,
//           sglang:cache_hit_rate
// An engine with several data-parallel ranks exposes one sample per rank (label `engine` for
// vLLM, `dp_rank` for SGLang): request counts and counters are summed, usage fractions take
// the maximum (the fullest rank is the one that preempts first).
#pragma once

#include <omni/policy.hpp>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace omni {

enum class EngineFlavor { kVllm, kSglang };

struct EngineMetrics {
  std::optional<double> running;
  std::optional<double> waiting;
  std::optional<double> kv_usage;              // 0..1
  std::optional<double> prefix_cache_queries;  // tokens (vLLM)
  std::optional<double> prefix_cache_hits;     // tokens (vLLM)
  std::optional<double> cache_hit_rate;        // 0..1 (SGLang, or hits/queries for vLLM)
  std::optional<double> preemptions;           // vLLM
  std::optional<std::uint32_t> block_size;     // vllm:cache_config_info
  std::optional<std::uint64_t> num_gpu_blocks; // vllm:cache_config_info
  std::size_t malformed_lines = 0;

  // True when the exposition had the engine's core load signals.
  bool complete() const noexcept { return running && waiting && kv_usage; }
};

EngineMetrics parse_engine_metrics(EngineFlavor flavor, std::string_view exposition);

// Copies the load signals into a policy's EngineLoad (fields the exposition lacked are left as
// they are) and marks the poll as fresh.
void apply_engine_metrics(const EngineMetrics& metrics, EngineLoad& load);

}  // namespace omni
