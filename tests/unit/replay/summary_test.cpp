#include "summary.hpp"
#include "stats.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

namespace omni::replay {
namespace {

TEST(ReplayStats, PercentileInterpolatesBetweenRanks) {
  std::vector<double> v = {4, 1, 3, 2};
  EXPECT_EQ(*percentile(v, 0), 1);
  EXPECT_EQ(*percentile(v, 1), 4);
  EXPECT_DOUBLE_EQ(*percentile(v, 0.5), 2.5);
  EXPECT_DOUBLE_EQ(*percentile(v, 0.9), 3.7);
  std::vector<double> one = {7};
  EXPECT_EQ(*percentile(one, 0.99), 7);
  std::vector<double> none;
  EXPECT_FALSE(percentile(none, 0.5));
}

TEST(ReplayStats, DistributionScalesAndHandlesEmpty) {
  const auto d = distribution({10, 20, 30, 40, 50}, 0.5);
  EXPECT_EQ(d["count"], 5);
  EXPECT_DOUBLE_EQ(d["mean"].get<double>(), 15);
  EXPECT_DOUBLE_EQ(d["p50"].get<double>(), 15);
  EXPECT_DOUBLE_EQ(d["max"].get<double>(), 25);
  const auto e = distribution({});
  EXPECT_EQ(e["count"], 0);
  EXPECT_TRUE(e["p99"].is_null());
}

TEST(ReplayStats, LogHistogramWithinHalfAPercent) {
  LogHistogram h;
  std::vector<double> exact;
  for (int i = 1; i <= 10000; ++i) {
    const double v = 0.01 * i * (1 + (i % 7));  // 0.01 .. 800 ms, uneven
    h.add(v);
    exact.push_back(v);
  }
  h.add(2.0, 3);  // three equal gaps at once
  for (int k = 0; k < 3; ++k) exact.push_back(2.0);
  EXPECT_EQ(h.count(), exact.size());
  for (double q : {0.5, 0.9, 0.99}) {
    std::vector<double> copy = exact;
    const auto want = static_cast<std::size_t>(std::ceil(q * copy.size())) - 1;
    std::sort(copy.begin(), copy.end());
    EXPECT_NEAR(*h.percentile(q), copy[want], copy[want] * 0.005) << q;
  }
  const auto s = h.summary(2.0);
  EXPECT_DOUBLE_EQ(s["max"].get<double>(), 2 * *std::max_element(exact.begin(), exact.end()));
  EXPECT_EQ(LogHistogram().summary()["p50"], nullptr);
}

RequestRecord ok_record(std::uint64_t index, double ttft, double e2e, int completion, int prompt,
                        int cached) {
  RequestRecord r;
  r.index = index;
  r.start_s = index * 0.1;
  r.scheduled_s = index * 0.1;
  r.outcome = kOutcomeOk;
  r.status = 200;
  r.ttft_ms = ttft;
  r.e2e_ms = e2e;
  r.completion_tokens = completion;
  r.prompt_tokens = prompt;
  r.cached_tokens = cached;
  r.input_tokens = static_cast<std::uint32_t>(prompt);
  r.output_tokens = static_cast<std::uint32_t>(completion);
  return r;
}

TEST(ReplaySummary, ArithmeticOnHandMadeRecords) {
  RunResult run;
  // Wall times at time_scale 0.5: model times are twice these.
  run.records.push_back(ok_record(0, 10, 110, 11, 1000, 0));    // TPOT 10 wall, 20 model
  run.records.push_back(ok_record(1, 50, 250, 21, 1000, 800));  // TPOT 10 / 20, TTFT 100 model
  run.records.push_back(ok_record(2, 20, 20, 1, 500, 256));     // one token: no TPOT
  run.records.back().prefill_peer = "p:1";
  run.records[0].prefill_peer = "p:1";
  run.records[1].prefill_peer = "p:2";
  RequestRecord err;
  err.index = 3;
  err.start_s = 0.3;
  err.scheduled_s = 0.25;
  err.lateness_ms = 50;
  err.late = true;
  err.waited = true;
  err.outcome = "http_500";
  err.status = 500;
  err.error = "{\"error\":\"boom\"}";
  run.records.push_back(err);
  err.index = 4;
  run.records.push_back(err);  // same body: one sample
  RequestRecord dropped;
  dropped.index = 5;
  dropped.start_s = 1;
  dropped.outcome = "dropped";
  run.records.push_back(dropped);
  run.itl.add(10, 30);
  run.wall_duration_s = 2;  // 4 model seconds

  SummaryInputs in;
  in.label = "hand";
  in.target = "http://127.0.0.1:1";
  in.time_scale = 0.5;
  in.slo_ttft_ms = 60;  // model ms: requests 0 (20) and 2 (40) meet it, 1 (100) does not
  in.slo_tpot_ms = 25;
  Workload w;
  w.source = "mooncake";
  w.requests.resize(6);
  const auto s = summarize(in, w, run);

  EXPECT_EQ(s["label"], "hand");
  EXPECT_EQ(s["time_scale"], 0.5);
  const auto& req = s["requests"];
  EXPECT_EQ(req["scheduled"], 6);
  EXPECT_EQ(req["sent"], 5);
  EXPECT_EQ(req["ok"], 3);
  EXPECT_EQ(req["errors"], 2);
  EXPECT_EQ(req["errors_by_kind"]["http_500"], 2);
  EXPECT_EQ(req["dropped"], 1);
  EXPECT_EQ(req["late"], 2);
  EXPECT_EQ(req["waited_for_slot"], 2);
  EXPECT_EQ(req["lateness_ms"]["max"], 50);
  EXPECT_EQ(s["duration_s"], 4);
  EXPECT_DOUBLE_EQ(s["throughput"]["requests_per_s"].get<double>(), 3 / 4.0);
  EXPECT_DOUBLE_EQ(s["throughput"]["input_tokens_per_s"].get<double>(), 2500 / 4.0);
  EXPECT_DOUBLE_EQ(s["throughput"]["output_tokens_per_s"].get<double>(), 33 / 4.0);
  EXPECT_EQ(s["goodput"]["requests"], 2);
  EXPECT_DOUBLE_EQ(s["goodput"]["requests_per_s"].get<double>(), 0.5);
  EXPECT_DOUBLE_EQ(s["goodput"]["fraction"].get<double>(), 2 / 6.0);
  const auto& lat = s["latency_ms"];
  EXPECT_EQ(lat["ttft"]["count"], 3);
  EXPECT_DOUBLE_EQ(lat["ttft"]["p50"].get<double>(), 40);
  EXPECT_DOUBLE_EQ(lat["ttft"]["max"].get<double>(), 100);
  EXPECT_EQ(lat["tpot"]["count"], 2);
  EXPECT_DOUBLE_EQ(lat["tpot"]["mean"].get<double>(), 20);
  EXPECT_DOUBLE_EQ(lat["e2e"]["max"].get<double>(), 500);
  EXPECT_EQ(lat["itl"]["count"], 30);
  EXPECT_NEAR(lat["itl"]["p50"].get<double>(), 20, 0.1);
  EXPECT_DOUBLE_EQ(s["prefix_cache"]["hit_rate"].get<double>(), 1056 / 2500.0);
  EXPECT_EQ(s["peers"]["prefill"]["counts"]["p:1"], 2);
  EXPECT_EQ(s["peers"]["prefill"]["counts"]["p:2"], 1);
  EXPECT_EQ(s["peers"]["prefill"]["absent"], 2);  // the two 500s
  EXPECT_DOUBLE_EQ(s["peers"]["prefill"]["max_over_mean"].get<double>(), 2 / 1.5);
  EXPECT_EQ(s["peers"]["decode"]["absent"], 5);
  ASSERT_EQ(s["error_samples"].size(), 1u);
  EXPECT_EQ(s["error_samples"][0]["kind"], "http_500");
  EXPECT_FALSE(s.contains("oracle_hit_rate"));

  in.slo_ttft_ms.reset();
  in.slo_tpot_ms = 15;  // nobody's TPOT (20 model ms) meets it; the one-token answer does
  EXPECT_EQ(summarize(in, w, run)["goodput"]["requests"], 1);
}

TEST(ReplaySummary, CsvHasARowPerRequestInModelTime) {
  RunResult run;
  run.records.push_back(ok_record(0, 10, 110, 11, 1000, 0));
  RequestRecord err;
  err.index = 1;
  err.start_s = 0.5;
  err.outcome = "transport";
  err.error = "read: reset, \"twice\"\nagain";
  run.records.push_back(err);
  std::ostringstream out;
  write_csv(out, run, 0.5);
  std::istringstream in(out.str());
  std::string header, row0;
  std::getline(in, header);
  std::getline(in, row0);
  EXPECT_EQ(header.substr(0, 30), "index,trace_s,scheduled_s,star");
  EXPECT_NE(row0.find(",ok,200,20.000,20.000,220.000,"), std::string::npos) << row0;
  EXPECT_NE(out.str().find("\"read: reset, \"\"twice\"\"\nagain\"\n"), std::string::npos);
}

}  // namespace
}  // namespace omni::replay
