#include <omni/policy.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace omni {
namespace {

using namespace std::chrono_literals;

const TimePoint kNow{std::chrono::seconds(1000)};

BackendState backend(std::uint32_t outstanding, std::uint32_t weight = 1) {
  BackendState b;
  b.outstanding = outstanding;
  b.weight = weight;
  return b;
}

// Names backends b0, b1, ... and gives them distinct stable ids.
PoolSnapshot pool_of(std::vector<BackendState> backends) {
  for (std::size_t i = 0; i < backends.size(); ++i) {
    if (backends[i].name.empty()) backends[i].name = "b" + std::to_string(i);
    if (backends[i].id == 0) backends[i].id = 0x1000 + i;
  }
  return PoolSnapshot("pool", 1, std::move(backends));
}

PoolSnapshot pool_with_outstanding(const std::vector<std::uint32_t>& outstanding) {
  std::vector<BackendState> backends;
  for (std::uint32_t o : outstanding) backends.push_back(backend(o));
  return pool_of(std::move(backends));
}

RequestFeatures request(std::uint64_t hash, std::span<const std::uint64_t> excluded = {}) {
  RequestFeatures r;
  r.request_hash = hash;
  r.excluded = excluded;
  return r;
}

EngineLoad fresh_load(std::uint32_t waiting, double kv_usage) {
  EngineLoad load;
  load.waiting = waiting;
  load.kv_usage = kv_usage;
  load.metrics_age = 100ms;
  return load;
}

// ---------------------------------------------------------------------------------------------
// Least outstanding requests (the default policy)
// ---------------------------------------------------------------------------------------------

TEST(PolicyLeastOutstanding, PicksMinOutstanding) {
  struct Case {
    std::vector<std::uint32_t> outstanding;
    std::size_t chosen;
    std::optional<std::size_t> runner_up;  // nullopt: not checked
  };
  const std::vector<Case> cases = {
      {{3, 1, 2}, 1, 2},       {{0, 5, 5, 5}, 0, std::nullopt},
      {{9, 8, 7, 6, 5}, 4, 3}, {{7}, 0, std::nullopt},
      {{100, 0}, 1, 0},
  };
  const Policy policy = make_least_outstanding_policy();
  for (const Case& c : cases) {
    const PoolSnapshot pool = pool_with_outstanding(c.outstanding);
    for (std::uint64_t hash : {0ULL, 1ULL, 0xdeadbeefULL}) {
      const Pick pick = policy.pick(request(hash), pool, kNow);
      SCOPED_TRACE(pick.explain(pool));
      EXPECT_EQ(pick.status, PickStatus::kPicked);
      EXPECT_EQ(pick.chosen, c.chosen);
      if (c.runner_up) {
        EXPECT_EQ(pick.runner_up, c.runner_up);
      }
      EXPECT_TRUE(pick.rejected.empty());
    }
  }
}

TEST(PolicyLeastOutstanding, WeightsRespected) {
  struct Case {
    std::vector<std::uint32_t> outstanding;
    std::vector<std::uint32_t> weights;
    std::vector<std::size_t> allowed;  // acceptable picks (more than one on a tie)
  };
  const std::vector<Case> cases = {
      {{4, 6}, {1, 2}, {1}},             // 4 vs 3 per unit of weight
      {{1, 3}, {1, 2}, {0}},             // 1 vs 1.5
      {{2, 3}, {1, 4}, {1}},             // 2 vs 0.75
      {{10, 25, 9}, {2, 5, 1}, {0, 1}},  // 5 vs 5 vs 9
  };
  const Policy policy = make_least_outstanding_policy();
  for (const Case& c : cases) {
    std::vector<BackendState> backends;
    for (std::size_t i = 0; i < c.outstanding.size(); ++i) {
      backends.push_back(backend(c.outstanding[i], c.weights[i]));
    }
    const PoolSnapshot pool = pool_of(std::move(backends));
    for (std::uint64_t hash = 0; hash < 100; ++hash) {
      const Pick pick = policy.pick(request(hash), pool, kNow);
      SCOPED_TRACE(pick.explain(pool));
      ASSERT_TRUE(pick.chosen.has_value());
      EXPECT_NE(std::find(c.allowed.begin(), c.allowed.end(), *pick.chosen), c.allowed.end());
    }
  }
}

TEST(PolicyLeastOutstanding, EqualCountsGoToTheServerSentLeastSinceThePoll) {
  // Sequential light traffic: nothing outstanding anywhere, but server 1 got fewer requests
  // since the engines were last polled, so it is next whatever the request hash.
  std::vector<BackendState> backends = {backend(0, 1), backend(0, 1), backend(0, 1)};
  backends[0].load.sent_since_poll = 3;
  backends[1].load.sent_since_poll = 1;
  backends[2].load.sent_since_poll = 2;
  const PoolSnapshot pool = pool_of(std::move(backends));
  const Policy policy = make_least_outstanding_policy();
  for (std::uint64_t hash = 0; hash < 200; ++hash) {
    const Pick pick = policy.pick(request(hash), pool, kNow);
    EXPECT_EQ(pick.chosen, 1u);
    EXPECT_EQ(pick.runner_up, 2u);
  }
  // A real difference in outstanding requests always wins over recent sends.
  std::vector<BackendState> busy = {backend(1, 1), backend(2, 1)};
  busy[1].load.sent_since_poll = 0;
  busy[0].load.sent_since_poll = 5000;
  const PoolSnapshot pool2 = pool_of(std::move(busy));
  EXPECT_EQ(policy.pick(request(7), pool2, kNow).chosen, 0u);
}

TEST(PolicyLeastOutstanding, TiesAreDeterministic) {
  const PoolSnapshot pool = pool_with_outstanding({2, 2, 2, 2, 2, 2});
  const Policy a = make_least_outstanding_policy();
  const Policy b = make_least_outstanding_policy();
  for (std::uint64_t hash = 0; hash < 1000; ++hash) {
    const Pick first = a.pick(request(hash), pool, kNow);
    const Pick again = a.pick(request(hash), pool, kNow);
    const Pick other_instance = b.pick(request(hash), pool, kNow + 1h);
    ASSERT_TRUE(first.chosen.has_value());
    EXPECT_EQ(first.chosen, again.chosen);
    EXPECT_EQ(first.runner_up, again.runner_up);
    EXPECT_EQ(first.chosen, other_instance.chosen);
    EXPECT_EQ(first.runner_up, other_instance.runner_up);
    EXPECT_NE(first.chosen, first.runner_up);
  }
}

TEST(PolicyLeastOutstanding, TiesSpreadEvenlyOverRequestHashes) {
  struct Case {
    std::vector<std::uint32_t> weights;
  };
  const std::vector<Case> cases = {{{1, 1}}, {{1, 1, 1, 1}}, {{1, 3}}, {{2, 1, 1}}};
  constexpr int kRequests = 10000;
  const Policy policy = make_least_outstanding_policy();
  for (const Case& c : cases) {
    std::vector<BackendState> backends;
    for (std::uint32_t w : c.weights) backends.push_back(backend(0, w));
    const PoolSnapshot pool = pool_of(std::move(backends));
    std::vector<int> chosen(pool.size(), 0);
    for (std::uint64_t hash = 1; hash <= kRequests; ++hash) {
      const Pick pick = policy.pick(request(hash), pool, kNow);
      ASSERT_TRUE(pick.chosen.has_value());
      ++chosen[*pick.chosen];
    }
    double total_weight = 0;
    for (std::uint32_t w : c.weights) total_weight += w;
    for (std::size_t i = 0; i < pool.size(); ++i) {
      const double expected = kRequests * c.weights[i] / total_weight;
      EXPECT_NEAR(chosen[i], expected, 0.05 * expected) << "backend " << i;
    }
  }
}

TEST(PolicyLeastOutstanding, RemovingATiedBackendMovesOnlyItsRequests) {
  const PoolSnapshot four = pool_with_outstanding({0, 0, 0, 0});
  std::vector<BackendState> without_b2(four.backends().begin(), four.backends().end());
  without_b2.erase(without_b2.begin() + 2);
  const PoolSnapshot three = pool_of(std::move(without_b2));  // ids kept: b0, b1, b3
  const Policy policy = make_least_outstanding_policy();
  for (std::uint64_t hash = 0; hash < 2000; ++hash) {
    const Pick before = policy.pick(request(hash), four, kNow);
    const Pick after = policy.pick(request(hash), three, kNow);
    ASSERT_TRUE(before.chosen && after.chosen);
    if (*before.chosen == 2) {
      EXPECT_EQ(three[*after.chosen].id, four[*before.runner_up].id);
    } else {
      EXPECT_EQ(three[*after.chosen].id, four[*before.chosen].id);
    }
  }
}

TEST(PolicyLeastOutstanding, RunnerUp) {
  struct Case {
    std::vector<std::uint32_t> outstanding;
    std::size_t chosen;
    std::optional<std::size_t> runner_up;
  };
  const std::vector<Case> cases = {
      {{5, 1, 3, 2}, 1, 3},
      {{1, 5}, 0, 1},
      {{4}, 0, std::nullopt},
      {{0, 9, 9, 1}, 0, 3},
  };
  const Policy policy = make_least_outstanding_policy();
  for (const Case& c : cases) {
    const PoolSnapshot pool = pool_with_outstanding(c.outstanding);
    const Pick pick = policy.pick(request(7), pool, kNow);
    SCOPED_TRACE(pick.explain(pool));
    EXPECT_EQ(pick.chosen, c.chosen);
    EXPECT_EQ(pick.runner_up, c.runner_up);
  }
  // With the chosen backend excluded (a retry), the runner-up is picked.
  const PoolSnapshot pool = pool_with_outstanding({6, 2, 2, 4, 2});
  for (std::uint64_t hash = 0; hash < 200; ++hash) {
    const Pick first = policy.pick(request(hash), pool, kNow);
    BackendBitmap tried;
    tried.set(*first.chosen);
    const Pick retry = policy.pick(request(hash, tried.words()), pool, kNow);
    EXPECT_EQ(retry.chosen, first.runner_up);
  }
}

// ---------------------------------------------------------------------------------------------
// Filters
// ---------------------------------------------------------------------------------------------

TEST(PolicyFilters, IneligibleBackendsRemovedWithReasons) {
  struct Case {
    std::string what;
    std::function<void(BackendState&)> mutate;  // applied to backend 0, the least loaded
    bool exclude = false;
    FilterReason reason;
  };
  const std::vector<Case> cases = {
      {"down", [](BackendState& b) { b.down = true; }, false, FilterReason::kDown},
      {"unhealthy", [](BackendState& b) { b.healthy = false; }, false, FilterReason::kUnhealthy},
      {"down and unhealthy",
       [](BackendState& b) {
         b.down = true;
         b.healthy = false;
       },
       false, FilterReason::kDown},
      {"excluded", [](BackendState&) {}, true, FilterReason::kExcluded},
      {"unhealthy and tried", [](BackendState& b) { b.healthy = false; }, true,
       FilterReason::kUnhealthy},
      {"at max_conns",
       [](BackendState& b) {
         b.max_conns = 4;
         b.active_conns = 4;
       },
       false, FilterReason::kAtMaxConns},
      {"over max_conns",
       [](BackendState& b) {
         b.max_conns = 4;
         b.active_conns = 9;
       },
       false, FilterReason::kAtMaxConns},
      {"max_fails reached",
       [](BackendState& b) {
         b.max_fails = 3;
         b.fails = 3;
       },
       false, FilterReason::kTooManyFails},
  };
  const Policy policy = make_least_outstanding_policy();
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    std::vector<BackendState> backends = {backend(0), backend(5), backend(3)};
    c.mutate(backends[0]);
    const PoolSnapshot pool = pool_of(std::move(backends));
    BackendBitmap tried;
    if (c.exclude) tried.set(0);
    const Pick pick = policy.pick(request(11, tried.words()), pool, kNow);
    SCOPED_TRACE(pick.explain(pool));
    EXPECT_EQ(pick.status, PickStatus::kPicked);
    EXPECT_EQ(pick.chosen, 2u);
    EXPECT_EQ(pick.runner_up, 1u);
    ASSERT_EQ(pick.rejected.size(), 1u);
    EXPECT_EQ(pick.rejected[0].index, 0u);
    EXPECT_EQ(pick.rejection_of(0), c.reason);
    EXPECT_FALSE(pick.score_of(0).has_value());
    EXPECT_EQ(pick.candidates.size(), 2u);
  }
}

TEST(PolicyFilters, LimitsThatDoNotBind) {
  struct Case {
    std::string what;
    std::function<void(BackendState&)> mutate;
  };
  const std::vector<Case> cases = {
      {"max_conns 0 is unlimited", [](BackendState& b) { b.active_conns = 1000; }},
      {"below max_conns",
       [](BackendState& b) {
         b.max_conns = 4;
         b.active_conns = 3;
       }},
      {"max_fails 0 never trips", [](BackendState& b) { b.fails = 1000; }},
      {"below max_fails",
       [](BackendState& b) {
         b.max_fails = 3;
         b.fails = 2;
       }},
  };
  const Policy policy = make_least_outstanding_policy();
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    std::vector<BackendState> backends = {backend(0), backend(5)};
    c.mutate(backends[0]);
    const PoolSnapshot pool = pool_of(std::move(backends));
    const Pick pick = policy.pick(request(3), pool, kNow);
    EXPECT_EQ(pick.chosen, 0u);
    EXPECT_TRUE(pick.rejected.empty());
  }
}

TEST(PolicyFilters, ExcludedBitmapBeyondWordBoundary) {
  std::vector<std::uint32_t> outstanding(130, 10);
  outstanding[70] = 0;
  outstanding[129] = 1;
  const PoolSnapshot pool = pool_with_outstanding(outstanding);
  BackendBitmap tried(pool.size());
  tried.set(70);
  const Policy policy = make_least_outstanding_policy();
  const Pick pick = policy.pick(request(5, tried.words()), pool, kNow);
  EXPECT_EQ(pick.chosen, 129u);
  EXPECT_EQ(pick.rejection_of(70), FilterReason::kExcluded);
  // A bitmap shorter than the pool excludes nothing past its end.
  BackendBitmap short_bitmap;
  short_bitmap.set(3);
  EXPECT_EQ(short_bitmap.words().size(), 1u);
  EXPECT_EQ(policy.pick(request(5, short_bitmap.words()), pool, kNow).chosen, 70u);
}

TEST(PolicyFilters, EmptyPool) {
  const PoolSnapshot pool("empty", 3, {});
  const Pick pick = make_least_outstanding_policy().pick(request(1), pool, kNow);
  EXPECT_EQ(pick.status, PickStatus::kEmptyPool);
  EXPECT_FALSE(pick.chosen.has_value());
  EXPECT_FALSE(pick.runner_up.has_value());
  EXPECT_TRUE(pick.candidates.empty());
  EXPECT_TRUE(pick.rejected.empty());
}

TEST(PolicyFilters, NothingLeft) {
  struct Case {
    std::string what;
    std::vector<std::function<void(BackendState&)>> mutate;  // one per backend
    std::vector<std::size_t> tried;
    PickStatus status;
    std::vector<FilterReason> reasons;  // per backend
  };
  const auto none = [](BackendState&) {};
  const auto unhealthy = [](BackendState& b) { b.healthy = false; };
  const auto down = [](BackendState& b) { b.down = true; };
  const auto busy = [](BackendState& b) {
    b.max_conns = 1;
    b.active_conns = 1;
  };
  const std::vector<Case> cases = {
      {"all tried",
       {none, none, none},
       {0, 1, 2},
       PickStatus::kAllExcluded,
       {FilterReason::kExcluded, FilterReason::kExcluded, FilterReason::kExcluded}},
      {"healthy ones tried, the rest unhealthy",
       {none, unhealthy, none},
       {0, 1, 2},
       PickStatus::kAllExcluded,
       {FilterReason::kExcluded, FilterReason::kUnhealthy, FilterReason::kExcluded}},
      {"tried one, others down or busy",
       {none, down, busy},
       {0},
       PickStatus::kAllExcluded,
       {FilterReason::kExcluded, FilterReason::kDown, FilterReason::kAtMaxConns}},
      {"nothing usable",
       {unhealthy, down, busy},
       {},
       PickStatus::kNoneEligible,
       {FilterReason::kUnhealthy, FilterReason::kDown, FilterReason::kAtMaxConns}},
      {"tried ones are unhealthy anyway",
       {unhealthy, unhealthy, down},
       {0, 1},
       PickStatus::kNoneEligible,
       {FilterReason::kUnhealthy, FilterReason::kUnhealthy, FilterReason::kDown}},
  };
  const Policy policy = make_least_outstanding_policy();
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    std::vector<BackendState> backends(3);
    for (std::size_t i = 0; i < 3; ++i) c.mutate[i](backends[i]);
    const PoolSnapshot pool = pool_of(std::move(backends));
    BackendBitmap tried;
    for (std::size_t i : c.tried) tried.set(i);
    const Pick pick = policy.pick(request(9, tried.words()), pool, kNow);
    SCOPED_TRACE(pick.explain(pool));
    EXPECT_EQ(pick.status, c.status);
    EXPECT_FALSE(pick.chosen.has_value());
    EXPECT_FALSE(pick.runner_up.has_value());
    EXPECT_TRUE(pick.candidates.empty());
    ASSERT_EQ(pick.rejected.size(), 3u);
    for (std::size_t i = 0; i < 3; ++i) EXPECT_EQ(pick.rejection_of(i), c.reasons[i]) << i;
  }
}

TEST(PolicyFilters, ExplainNamesBackendsAndReasons) {
  std::vector<BackendState> backends = {backend(0), backend(1), backend(2)};
  backends[0].name = "10.0.0.1:8000";
  backends[0].down = true;
  backends[1].name = "10.0.0.2:8000";
  backends[2].name = "10.0.0.3:8000";
  const PoolSnapshot pool("prefill", 1, std::move(backends));
  const Pick pick = make_least_outstanding_policy().pick(request(1), pool, kNow);
  const std::string text = pick.explain(pool);
  EXPECT_NE(text.find("pool=prefill"), std::string::npos) << text;
  EXPECT_NE(text.find("status=picked"), std::string::npos) << text;
  EXPECT_NE(text.find("chosen=10.0.0.2:8000(1.000)"), std::string::npos) << text;
  EXPECT_NE(text.find("runner_up=10.0.0.3:8000(0.000)"), std::string::npos) << text;
  EXPECT_NE(text.find("10.0.0.1:8000:down"), std::string::npos) << text;
}

// A set-level filter a later policy might add: keep the candidates at most `slack` requests
// above the least loaded one.
class NearLeastLoadedFilter final : public Filter {
 public:
  explicit NearLeastLoadedFilter(std::uint32_t slack) : slack_(slack) {}
  std::string_view name() const noexcept override { return "near-least-loaded"; }
  void filter(const PickContext& ctx, std::vector<std::size_t>& candidates,
              std::vector<Rejection>& rejected) const override {
    std::uint32_t least = std::numeric_limits<std::uint32_t>::max();
    for (std::size_t i : candidates) least = std::min(least, ctx.pool[i].outstanding);
    std::vector<std::size_t> kept;
    for (std::size_t i : candidates) {
      if (ctx.pool[i].outstanding <= least + slack_) {
        kept.push_back(i);
      } else {
        rejected.push_back(Rejection{i, FilterReason::kOther, name()});
      }
    }
    candidates = std::move(kept);
  }

 private:
  std::uint32_t slack_;
};

TEST(PolicyFilters, CustomSetLevelFilter) {
  std::vector<BackendState> backends = {backend(4), backend(0), backend(1), backend(9)};
  backends[0].load = fresh_load(0, 0.0);  // idle engine, but 4 outstanding
  backends[1].load = fresh_load(8, 0.9);
  backends[2].load = fresh_load(8, 0.9);
  const PoolSnapshot pool = pool_of(std::move(backends));
  const Policy policy("near-least-loaded+kv", {std::make_shared<NearLeastLoadedFilter>(1)},
                      {{std::make_shared<KvUsageScorer>(), 1.0}},
                      std::make_shared<MaxScorePicker>());
  const Pick pick = policy.pick(request(2), pool, kNow);
  SCOPED_TRACE(pick.explain(pool));
  EXPECT_EQ(pick.status, PickStatus::kPicked);
  ASSERT_EQ(pick.candidates.size(), 2u);  // b1, b2
  EXPECT_EQ(pick.rejection_of(0), FilterReason::kOther);
  EXPECT_EQ(pick.rejection_of(3), FilterReason::kOther);
  EXPECT_EQ(pick.rejected[0].filter, "near-least-loaded");
  EXPECT_NE(pick.explain(pool).find("b0:other/near-least-loaded"), std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// Scorers and composition
// ---------------------------------------------------------------------------------------------

TEST(PolicyScorers, ScoresStayInUnitInterval) {
  std::mt19937_64 rng(20240601);  // fixed: the test is deterministic
  const Policy policy("everything", make_eligibility_filters(),
                      {{std::make_shared<LeastOutstandingScorer>(), 2.0},
                       {std::make_shared<QueueDepthScorer>(), 1.5},
                       {std::make_shared<QueueDepthScorer>(
                            QueueDepthOptions{QueueMetric::kWaitingUncachedTokens, false, {}}),
                        0.5},
                       {std::make_shared<KvUsageScorer>(), 1.0}},
                      std::make_shared<MaxScorePicker>());
  for (int round = 0; round < 200; ++round) {
    std::vector<BackendState> backends(1 + rng() % 20);
    for (BackendState& b : backends) {
      b.outstanding = static_cast<std::uint32_t>(rng() % 50);
      b.weight = static_cast<std::uint32_t>(1 + rng() % 4);
      b.load.waiting = static_cast<std::uint32_t>(rng() % 30);
      b.load.sent_since_poll = static_cast<std::uint32_t>(rng() % 3);
      const int kv = static_cast<int>(rng() % 4);
      b.load.kv_usage = kv == 0   ? std::numeric_limits<double>::quiet_NaN()
                        : kv == 1 ? 1.2  // out of range: clamped
                                  : static_cast<double>(rng() % 1000) / 1000.0;
      if (rng() % 2) b.load.waiting_uncached_tokens = rng() % 100000;
      if (rng() % 4) b.load.metrics_age = std::chrono::milliseconds(rng() % 8000);
    }
    const PoolSnapshot pool = pool_of(std::move(backends));
    const Pick pick = policy.pick(request(rng()), pool, kNow);
    ASSERT_EQ(pick.status, PickStatus::kPicked);
    ASSERT_EQ(pick.scorer_scores.size(), pick.candidates.size() * 4);
    for (double s : pick.scorer_scores) {
      EXPECT_GE(s, 0.0);
      EXPECT_LE(s, 1.0);
    }
    double best = 0.0;
    for (const CandidateScore& c : pick.candidates) {
      EXPECT_GE(c.score, 0.0);
      EXPECT_LE(c.score, 1.0);
      best = std::max(best, c.score);
    }
    EXPECT_EQ(pick.score_of(*pick.chosen), best);
  }
}

TEST(PolicyScorers, LeastOutstandingNormalization) {
  struct Case {
    std::vector<std::uint32_t> outstanding;
    std::vector<std::uint32_t> weights;
    std::vector<double> scores;
  };
  const std::vector<Case> cases = {
      {{0, 5, 10}, {1, 1, 1}, {1.0, 0.5, 0.0}},
      {{3, 3}, {1, 1}, {1.0, 1.0}},
      {{0, 0, 0}, {1, 2, 3}, {1.0, 1.0, 1.0}},
      {{4, 4, 8}, {1, 2, 1}, {2.0 / 3.0, 1.0, 0.0}},  // loads 4, 2, 8
  };
  const Policy policy("lor", {}, {{std::make_shared<LeastOutstandingScorer>(), 1.0}},
                      std::make_shared<MaxScorePicker>());
  for (const Case& c : cases) {
    std::vector<BackendState> backends;
    for (std::size_t i = 0; i < c.outstanding.size(); ++i) {
      backends.push_back(backend(c.outstanding[i], c.weights[i]));
    }
    const PoolSnapshot pool = pool_of(std::move(backends));
    const Pick pick = policy.pick(request(0), pool, kNow);
    for (std::size_t i = 0; i < c.scores.size(); ++i) {
      EXPECT_DOUBLE_EQ(pick.scorer_score(i, 0), c.scores[i]) << i;
      EXPECT_DOUBLE_EQ(*pick.score_of(i), c.scores[i]) << i;
    }
  }
}

TEST(PolicyScorers, QueueDepth) {
  struct Case {
    std::string what;
    QueueDepthOptions options;
    std::vector<EngineLoad> loads;
    std::vector<double> scores;
  };
  EngineLoad stale = fresh_load(0, 0.1);
  stale.metrics_age = 30s;
  EngineLoad never_polled;
  EngineLoad burst = fresh_load(1, 0.1);
  burst.sent_since_poll = 9;
  EngineLoad tokens_small = fresh_load(5, 0.1);
  tokens_small.waiting_uncached_tokens = 1000;
  EngineLoad tokens_large = fresh_load(1, 0.1);
  tokens_large.waiting_uncached_tokens = 9000;
  const std::vector<Case> cases = {
      {"shortest queue wins",
       {},
       {fresh_load(2, 0), fresh_load(6, 0), fresh_load(4, 0)},
       {1.0, 0.0, 0.5}},
      {"stale and missing metrics are neutral",
       {},
       {fresh_load(2, 0), stale, never_polled, fresh_load(6, 0)},
       {1.0, 0.5, 0.5, 0.0}},
      {"custom unknown score",
       QueueDepthOptions{QueueMetric::kWaitingRequests, true, {1min, 0.0}},
       {fresh_load(2, 0), never_polled},
       {1.0, 0.0}},
      {"sent since poll counts", {}, {burst, fresh_load(5, 0)}, {0.0, 1.0}},
      {"sent since poll ignored",
       QueueDepthOptions{QueueMetric::kWaitingRequests, false, {}},
       {burst, fresh_load(5, 0)},
       {1.0, 0.0}},
      {"uncached tokens",
       QueueDepthOptions{QueueMetric::kWaitingUncachedTokens, true, {}},
       {tokens_small, tokens_large, fresh_load(0, 0)},
       {1.0, 0.0, 0.5}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    std::vector<BackendState> backends;
    for (const EngineLoad& load : c.loads) {
      backends.push_back(backend(0));
      backends.back().load = load;
    }
    const PoolSnapshot pool = pool_of(std::move(backends));
    const Policy policy("queue", {}, {{std::make_shared<QueueDepthScorer>(c.options), 1.0}},
                        std::make_shared<MaxScorePicker>());
    const Pick pick = policy.pick(request(0), pool, kNow);
    for (std::size_t i = 0; i < c.scores.size(); ++i) {
      EXPECT_DOUBLE_EQ(pick.scorer_score(i, 0), c.scores[i]) << i;
    }
  }
}

TEST(PolicyScorers, KvUsage) {
  EngineLoad stale = fresh_load(0, 0.0);
  stale.metrics_age = 6s;
  const std::vector<EngineLoad> loads = {fresh_load(0, 0.25), fresh_load(0, 1.0),
                                         fresh_load(0, std::nan("")), stale, fresh_load(0, -0.5)};
  const std::vector<double> expected = {0.75, 0.0, 0.5, 0.5, 1.0};
  std::vector<BackendState> backends;
  for (const EngineLoad& load : loads) {
    backends.push_back(backend(0));
    backends.back().load = load;
  }
  const PoolSnapshot pool = pool_of(std::move(backends));
  const Policy policy("kv", {}, {{std::make_shared<KvUsageScorer>(), 1.0}},
                      std::make_shared<MaxScorePicker>());
  const Pick pick = policy.pick(request(0), pool, kNow);
  for (std::size_t i = 0; i < expected.size(); ++i) {
    EXPECT_DOUBLE_EQ(pick.scorer_score(i, 0), expected[i]) << i;
  }
  EXPECT_EQ(pick.chosen, 4u);
}

TEST(PolicyComposition, WeightedScorers) {
  // b0: fewest outstanding but a nearly full KV cache; b1: most outstanding, cache mostly free.
  std::vector<BackendState> backends = {backend(0), backend(2), backend(1)};
  backends[0].load = fresh_load(0, 0.9);
  backends[1].load = fresh_load(0, 0.1);
  backends[2].load = fresh_load(0, 0.5);
  const PoolSnapshot pool = pool_of(std::move(backends));
  // Per-scorer scores: least-outstanding {1, 0, 0.5}, kv-usage {0.1, 0.9, 0.5}.
  const std::vector<std::vector<double>> component = {{1.0, 0.1}, {0.0, 0.9}, {0.5, 0.5}};
  struct Case {
    double lor_weight;
    double kv_weight;
    std::size_t chosen;
    std::size_t runner_up;
    std::vector<double> totals;
  };
  const std::vector<Case> cases = {
      {1.0, 3.0, 1, 2, {0.325, 0.675, 0.5}},
      {3.0, 1.0, 0, 2, {0.775, 0.225, 0.5}},
      {1.0, 1.0, 0, 2, {0.55, 0.45, 0.5}},
  };
  for (const Case& c : cases) {
    const Policy policy("lor+kv", make_eligibility_filters(),
                        {{std::make_shared<LeastOutstandingScorer>(), c.lor_weight},
                         {std::make_shared<KvUsageScorer>(), c.kv_weight}},
                        std::make_shared<MaxScorePicker>());
    const Pick pick = policy.pick(request(0), pool, kNow);
    SCOPED_TRACE(pick.explain(pool));
    EXPECT_EQ(pick.chosen, c.chosen);
    EXPECT_EQ(pick.runner_up, c.runner_up);
    ASSERT_EQ(pick.num_scorers, 2u);
    for (std::size_t i = 0; i < pool.size(); ++i) {
      EXPECT_DOUBLE_EQ(pick.scorer_score(i, 0), component[i][0]) << i;
      EXPECT_DOUBLE_EQ(pick.scorer_score(i, 1), component[i][1]) << i;
      EXPECT_NEAR(*pick.score_of(i), c.totals[i], 1e-12) << i;
    }
  }
}

TEST(PolicyComposition, ScaledWeightsGiveTheSamePicks) {
  std::mt19937_64 rng(7);
  std::vector<BackendState> backends(16);
  for (BackendState& b : backends) {
    b.outstanding = static_cast<std::uint32_t>(rng() % 10);
    b.load = fresh_load(static_cast<std::uint32_t>(rng() % 10), (rng() % 100) / 100.0);
  }
  const PoolSnapshot pool = pool_of(std::move(backends));
  auto make = [](double scale) {
    return Policy("mix", make_eligibility_filters(),
                  {{std::make_shared<LeastOutstandingScorer>(), 1.0 * scale},
                   {std::make_shared<QueueDepthScorer>(), 2.0 * scale},
                   {std::make_shared<KvUsageScorer>(), 0.5 * scale}},
                  std::make_shared<MaxScorePicker>());
  };
  const Policy unit = make(1.0);
  const Policy scaled = make(8.0);  // a power of two: the weighted means are bit-identical
  for (std::uint64_t hash = 0; hash < 500; ++hash) {
    EXPECT_EQ(unit.pick(request(hash), pool, kNow).chosen,
              scaled.pick(request(hash), pool, kNow).chosen);
  }
}

TEST(PolicyComposition, NoScorersIsRendezvousHashing) {
  const PoolSnapshot pool = pool_with_outstanding({9, 0, 4});
  const Policy policy("hash", make_eligibility_filters(), {}, std::make_shared<MaxScorePicker>());
  std::vector<int> chosen(3, 0);
  for (std::uint64_t hash = 0; hash < 3000; ++hash) {
    const Pick pick = policy.pick(request(hash), pool, kNow);
    EXPECT_EQ(pick.num_scorers, 0u);
    EXPECT_EQ(*pick.score_of(*pick.chosen), 1.0);
    ++chosen[*pick.chosen];
  }
  for (int n : chosen) EXPECT_NEAR(n, 1000, 100);
}

// ---------------------------------------------------------------------------------------------
// Power of two choices
// ---------------------------------------------------------------------------------------------

TEST(PolicyPowerOfTwoChoices, SamplesAreDistinctAndCoverThePool) {
  for (std::size_t n : {2u, 3u, 7u, 64u}) {
    std::vector<int> seen(n, 0);
    for (std::uint64_t hash = 0; hash < 5000; ++hash) {
      const auto [a, b] = PowerOfTwoChoicesPicker::sample(pick_seed(hash), n);
      ASSERT_LT(a, n);
      ASSERT_LT(b, n);
      ASSERT_NE(a, b);
      ++seen[a];
      ++seen[b];
    }
    for (int count : seen) EXPECT_GT(count, 0);
  }
}

TEST(PolicyPowerOfTwoChoices, PicksTheBetterOfItsSamples) {
  const std::vector<std::uint32_t> outstanding = {7, 3, 9, 1, 5, 8, 2, 6};
  const PoolSnapshot pool = pool_with_outstanding(outstanding);
  const Policy policy("lor-p2c", make_eligibility_filters(),
                      {{std::make_shared<LeastOutstandingScorer>(), 1.0}},
                      std::make_shared<PowerOfTwoChoicesPicker>());
  std::vector<int> chosen(pool.size(), 0);
  for (std::uint64_t hash = 0; hash < 4000; ++hash) {
    const Pick pick = policy.pick(request(hash), pool, kNow);
    ASSERT_EQ(pick.status, PickStatus::kPicked);
    const auto [a, b] = PowerOfTwoChoicesPicker::sample(pick_seed(hash), pool.size());
    const std::size_t better = outstanding[a] < outstanding[b] ? a : b;
    const std::size_t worse = better == a ? b : a;
    EXPECT_EQ(pick.chosen, better);
    EXPECT_EQ(pick.runner_up, worse);
    const Pick again = policy.pick(request(hash), pool, kNow);
    EXPECT_EQ(again.chosen, pick.chosen);
    EXPECT_EQ(again.runner_up, pick.runner_up);
    ++chosen[*pick.chosen];
  }
  EXPECT_EQ(chosen[2], 0);          // the most loaded never wins a pair
  EXPECT_GT(chosen[3], chosen[6]);  // better backends win more often
  EXPECT_GT(chosen[6], chosen[1]);
}

TEST(PolicyPowerOfTwoChoices, SmallPoolsAndTies) {
  const Policy policy("p2c", make_eligibility_filters(),
                      {{std::make_shared<LeastOutstandingScorer>(), 1.0}},
                      std::make_shared<PowerOfTwoChoicesPicker>());
  const PoolSnapshot one = pool_with_outstanding({3});
  const Pick single = policy.pick(request(1), one, kNow);
  EXPECT_EQ(single.chosen, 0u);
  EXPECT_FALSE(single.runner_up.has_value());

  const PoolSnapshot two = pool_with_outstanding({4, 4});
  std::vector<int> chosen(2, 0);
  for (std::uint64_t hash = 0; hash < 10000; ++hash) {
    const Pick pick = policy.pick(request(hash), two, kNow);
    ASSERT_TRUE(pick.chosen && pick.runner_up);
    EXPECT_NE(*pick.chosen, *pick.runner_up);
    ++chosen[*pick.chosen];
  }
  EXPECT_NEAR(chosen[0], 5000, 250);
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

TEST(PolicyConfig, InvalidConfigThrows) {
  const auto lor = std::make_shared<LeastOutstandingScorer>();
  const auto picker = std::make_shared<MaxScorePicker>();
  struct Case {
    std::string what;
    std::function<void()> build;
    std::string message;  // a substring of what()
  };
  const std::vector<Case> cases = {
      {"zero weight",
       [&] {
         Policy("p", {}, {{lor, 0.0}}, picker);
       },
       "least-outstanding"},
      {"negative weight",
       [&] {
         Policy("p", {}, {{lor, -1.0}}, picker);
       },
       "positive"},
      {"NaN weight",
       [&] {
         Policy("p", {}, {{lor, std::nan("")}}, picker);
       },
       "positive"},
      {"infinite weight",
       [&] {
         Policy("p", {}, {{lor, std::numeric_limits<double>::infinity()}}, picker);
       },
       "positive"},
      {"overflowing weights",
       [&] {
         const double big = std::numeric_limits<double>::max();
         Policy("p", {}, {{lor, big}, {lor, big}}, picker);
       },
       "overflow"},
      {"null scorer",
       [&] {
         Policy("p", {}, {{nullptr, 1.0}}, picker);
       },
       "null"},
      {"null filter",
       [&] {
         Policy("p", {nullptr}, {{lor, 1.0}}, picker);
       },
       "null"},
      {"null picker",
       [&] {
         Policy("p", {}, {{lor, 1.0}}, nullptr);
       },
       "picker"},
      {"zero backend weight",
       [] {
         BackendState b;
         b.name = "x:1";
         b.weight = 0;
         PoolSnapshot("pool", 1, {b});
       },
       "x:1"},
      {"negative metrics age",
       [] {
         QueueDepthScorer(QueueDepthOptions{QueueMetric::kWaitingRequests, true, {-1s, 0.5}});
       },
       "max_age"},
      {"unknown score above 1",
       [] {
         KvUsageScorer(EngineMetricsOptions{5s, 1.5});
       },
       "unknown_score"},
      {"unknown score NaN",
       [] {
         KvUsageScorer(EngineMetricsOptions{5s, std::nan("")});
       },
       "unknown_score"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    try {
      c.build();
      ADD_FAILURE() << "no exception";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(c.message), std::string::npos) << e.what();
    }
  }
}

TEST(PolicyConfig, SnapshotAssignsIndicesAndSharesCheaply) {
  std::vector<BackendState> backends(3);
  backends[0].index = 99;
  const PoolSnapshotPtr snapshot = make_pool_snapshot("decode", 7, std::move(backends));
  EXPECT_EQ(snapshot->pool(), "decode");
  EXPECT_EQ(snapshot->generation(), 7u);
  for (std::size_t i = 0; i < snapshot->size(); ++i) EXPECT_EQ((*snapshot)[i].index, i);
  const PoolSnapshotPtr copy = snapshot;
  EXPECT_EQ(copy.get(), snapshot.get());
}

// ---------------------------------------------------------------------------------------------
// Concurrency and cost
// ---------------------------------------------------------------------------------------------

TEST(PolicyConcurrency, SharedPolicyGivesSerialResults) {
  std::vector<std::uint32_t> outstanding(32);
  for (std::size_t i = 0; i < outstanding.size(); ++i) outstanding[i] = i % 4;
  const PoolSnapshot pool = pool_with_outstanding(outstanding);
  const Policy policy = make_least_outstanding_policy();
  constexpr std::uint64_t kPerThread = 2000;
  std::vector<std::optional<std::size_t>> serial(2 * kPerThread);
  for (std::uint64_t h = 0; h < serial.size(); ++h)
    serial[h] = policy.pick(request(h), pool, kNow).chosen;
  std::vector<std::optional<std::size_t>> parallel(serial.size());
  {
    std::vector<std::jthread> threads;
    for (std::uint64_t t = 0; t < 2; ++t) {
      threads.emplace_back([&, t] {
        for (std::uint64_t h = t * kPerThread; h < (t + 1) * kPerThread; ++h) {
          parallel[h] = policy.pick(request(h), pool, kNow).chosen;
        }
      });
    }
  }
  EXPECT_EQ(parallel, serial);
}

TEST(PolicyCost, HundredThousandPicksOver64BackendsSmokeCheck) {
  std::mt19937_64 rng(1);
  std::vector<BackendState> backends(64);
  for (BackendState& b : backends) {
    b.outstanding = static_cast<std::uint32_t>(rng() % 8);
    b.max_conns = 1000;
    b.max_fails = 3;
  }
  const PoolSnapshot pool = pool_of(std::move(backends));
  const Policy policy = make_least_outstanding_policy();
  BackendBitmap tried(64);
  tried.set(5);
  std::size_t checksum = 0;
  const auto start = std::chrono::steady_clock::now();
  for (std::uint64_t hash = 0; hash < 100000; ++hash) {
    checksum += *policy.pick(request(hash, tried.words()), pool, kNow).chosen;
  }
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_GT(checksum, 0u);
  // The bound is for optimized builds; -O0 and sanitizers (about 30x slower) only guard
  // against something pathological.
#if defined(__OPTIMIZE__) && !defined(__SANITIZE_ADDRESS__)
  constexpr auto kBound = 2s;
#else
  constexpr auto kBound = 60s;
#endif
  EXPECT_LT(elapsed, kBound) << std::chrono::duration<double>(elapsed).count() << " s";
}

}  // namespace
}  // namespace omni
