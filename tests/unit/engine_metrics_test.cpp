#include <omni/engine_metrics.hpp>

#include <gtest/gtest.h>

#include <cmath>

namespace omni {
namespace {

// The shape vLLM's prometheus_client exposition has: HELP/TYPE lines, _created samples, one
// series per data-parallel engine.
constexpr const char* kVllmTwoEngines = R"(# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 4.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.75
# HELP vllm:prefix_cache_queries_total Prefix cache queries.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7e+09
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 1000.0
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 300.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 500.0
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="m"} 2.0
# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="64",cache_dtype="auto",engine="0",num_gpu_blocks="65536"} 1.0
)";

constexpr const char* kSglang = R"(# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{engine_type="unified",model_name="m",tp_rank="0",pp_rank="0"} 12.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{engine_type="unified",model_name="m",tp_rank="0",pp_rank="0"} 5.0
# TYPE sglang:token_usage gauge
sglang:token_usage{engine_type="unified",model_name="m",tp_rank="0",pp_rank="0"} 0.5
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{engine_type="unified",model_name="m",tp_rank="0",pp_rank="0"} 0.4
)";

TEST(EngineMetrics, VllmSumsCountsAndTakesTheFullestRank) {
  const EngineMetrics m = parse_engine_metrics(EngineFlavor::kVllm, kVllmTwoEngines);
  ASSERT_TRUE(m.complete());
  EXPECT_EQ(*m.running, 7);
  EXPECT_EQ(*m.waiting, 1);
  EXPECT_DOUBLE_EQ(*m.kv_usage, 0.75);
  EXPECT_EQ(*m.prefix_cache_queries, 2000);
  EXPECT_EQ(*m.prefix_cache_hits, 800);
  EXPECT_DOUBLE_EQ(*m.cache_hit_rate, 0.4);
  EXPECT_EQ(*m.preemptions, 2);
  EXPECT_EQ(*m.block_size, 64u);
  EXPECT_EQ(*m.num_gpu_blocks, 65536u);
  EXPECT_EQ(m.malformed_lines, 0u);
}

TEST(EngineMetrics, Sglang) {
  const EngineMetrics m = parse_engine_metrics(EngineFlavor::kSglang, kSglang);
  ASSERT_TRUE(m.complete());
  EXPECT_EQ(*m.running, 12);
  EXPECT_EQ(*m.waiting, 5);
  EXPECT_DOUBLE_EQ(*m.kv_usage, 0.5);
  EXPECT_DOUBLE_EQ(*m.cache_hit_rate, 0.4);
  EXPECT_FALSE(m.block_size.has_value());
}

TEST(EngineMetrics, TheOtherEnginesNamesAreIgnored) {
  EXPECT_FALSE(parse_engine_metrics(EngineFlavor::kSglang, kVllmTwoEngines).running);
  EXPECT_FALSE(parse_engine_metrics(EngineFlavor::kVllm, kSglang).running);
}

TEST(EngineMetrics, GivenBrokenOrPartialInputExpectWhatCouldBeRead) {
  struct Case {
    const char* text;
    bool complete;
    std::size_t malformed;
  };
  const Case cases[] = {
      {"", false, 0},
      {"garbage line without value\n", false, 1},
      {"vllm:num_requests_running{engine=\"0\"} 2\nvllm:num_requests_waiting 1\n", false, 0},
      {"vllm:num_requests_running 2\nvllm:num_requests_waiting 1\nvllm:kv_cache_usage_perc 3\n",
       true, 0},
      {"vllm:num_requests_running NaN\nvllm:num_requests_waiting 1\nvllm:kv_cache_usage_perc 0\n",
       false, 0},
      {"vllm:cache_config_info{block_size=\"x\",num_gpu_blocks=\"-1\"} 1\n", false, 0},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.text);
    const EngineMetrics m = parse_engine_metrics(EngineFlavor::kVllm, c.text);
    EXPECT_EQ(m.complete(), c.complete);
    EXPECT_EQ(m.malformed_lines, c.malformed);
    if (m.kv_usage) {
      EXPECT_GE(*m.kv_usage, 0.0);
      EXPECT_LE(*m.kv_usage, 1.0);  // clamped
    }
    EXPECT_FALSE(m.block_size.has_value());
  }
}

TEST(EngineMetrics, ApplyFillsTheLoadAndMarksItFresh) {
  EngineLoad load;
  load.sent_since_poll = 9;
  apply_engine_metrics(parse_engine_metrics(EngineFlavor::kVllm, kVllmTwoEngines), load);
  EXPECT_EQ(load.running, 7u);
  EXPECT_EQ(load.waiting, 1u);
  EXPECT_DOUBLE_EQ(load.kv_usage, 0.75);
  EXPECT_EQ(load.sent_since_poll, 0u);
  EXPECT_TRUE(load.fresh(std::chrono::seconds(1)));

  EngineLoad untouched;
  untouched.running = 3;
  apply_engine_metrics(parse_engine_metrics(EngineFlavor::kVllm, ""), untouched);
  EXPECT_EQ(untouched.running, 3u);
  EXPECT_TRUE(std::isnan(untouched.kv_usage));
}

}  // namespace
}  // namespace omni
