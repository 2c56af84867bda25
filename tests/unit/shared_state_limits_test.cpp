// Limit groups, engine load and bootstrap ports in SharedState.
#include <omni/shared_state.hpp>

#include <omni/prometheus.hpp>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace omni {
namespace {

SharedStateConfig config() {
  SharedStateConfig c;
  c.max_slots = 32;
  c.max_backends = 4;
  c.max_owners = 8;
  c.max_groups = 4;
  c.backends = {{"127.0.0.1:8100", "prefill"}, {"127.0.0.1:8200", "decode"}};
  c.groups = {"/v1/", "/generate"};
  return c;
}

struct Fixture {
  std::vector<char> mem;
  std::unique_ptr<SharedState> st;
  explicit Fixture(const SharedStateConfig& c = config()) {
    mem.assign(SharedState::required_bytes(c) + 128, static_cast<char>(0x5A));
    auto r = SharedState::create(mem.data(), mem.size(), c);
    EXPECT_TRUE(r.ok()) << r.error;
    st = std::move(r.state);
  }
};

TEST(SharedStateLimits, AdmitsUpToLimitThenQueuesThenRejects) {
  Fixture f;
  SharedState& s = *f.st;
  EXPECT_EQ(s.admit(100, 0, 2, 1), Admission::kAdmitted);
  EXPECT_EQ(s.admit(101, 0, 2, 1), Admission::kAdmitted);
  EXPECT_EQ(s.admit(100, 0, 2, 1), Admission::kQueued);
  EXPECT_EQ(s.admit(101, 0, 2, 1), Admission::kRejected);
  EXPECT_EQ(s.group_inflight(0), 2);
  EXPECT_EQ(s.group_queued(0), 1);
  // The other group is independent.
  EXPECT_EQ(s.admit(100, 1, 1, 0), Admission::kAdmitted);
  EXPECT_EQ(s.admit(100, 1, 1, 0), Admission::kRejected);

  EXPECT_FALSE(s.promote(100, 0, 2));  // still full
  s.leave(101, 0);
  // A newcomer may not jump the queue while someone waits.
  EXPECT_EQ(s.admit(102, 0, 2, 1), Admission::kRejected);
  EXPECT_TRUE(s.promote(100, 0, 2));
  EXPECT_EQ(s.group_inflight(0), 2);
  EXPECT_EQ(s.group_queued(0), 0);

  const GroupStats g = *s.group_stats(0);
  EXPECT_EQ(g.name, "/v1/");
  EXPECT_EQ(g.admitted_total, 3u);
  EXPECT_EQ(g.queued_total, 1u);
  EXPECT_EQ(g.rejected_total, 2u);
  EXPECT_EQ(g.timed_out_total, 0u);
}

TEST(SharedStateLimits, OwnersQueuedNamesWhomAFreedPlaceConcerns) {
  Fixture f;
  SharedState& s = *f.st;
  EXPECT_EQ(s.admit(100, 0, 1, 4), Admission::kAdmitted);
  EXPECT_EQ(s.admit(101, 0, 1, 4), Admission::kQueued);
  EXPECT_EQ(s.admit(102, 0, 1, 4), Admission::kQueued);
  EXPECT_EQ(s.admit(102, 1, 1, 4), Admission::kAdmitted);
  auto pids = s.owners_queued(0);
  std::sort(pids.begin(), pids.end());
  EXPECT_EQ(pids, (std::vector<std::int32_t>{101, 102}));
  EXPECT_TRUE(s.owners_queued(1).empty());
  EXPECT_TRUE(s.owners_queued(9).empty());
  s.leave(100, 0);
  EXPECT_TRUE(s.promote(101, 0, 1));
  EXPECT_EQ(s.owners_queued(0), (std::vector<std::int32_t>{102}));
}

TEST(SharedStateLimits, UnlimitedAndUnknownGroups) {
  Fixture f;
  SharedState& s = *f.st;
  for (int i = 0; i < 100; ++i) EXPECT_EQ(s.admit(7, 0, 0, 0), Admission::kAdmitted);
  EXPECT_EQ(s.group_inflight(0), 100);
  EXPECT_EQ(s.admit(7, 2, 0, 0), Admission::kRejected);  // registered groups: 0 and 1
  EXPECT_EQ(s.admit(0, 0, 0, 0), Admission::kRejected);  // invalid pid
  EXPECT_FALSE(s.group_stats(2).has_value());
}

TEST(SharedStateLimits, TimeoutCountsAndQueueEmpties) {
  Fixture f;
  SharedState& s = *f.st;
  ASSERT_EQ(s.admit(5, 0, 1, 4), Admission::kAdmitted);
  ASSERT_EQ(s.admit(5, 0, 1, 4), Admission::kQueued);
  ASSERT_EQ(s.admit(5, 0, 1, 4), Admission::kQueued);
  s.unqueue(5, 0, true);
  s.unqueue(5, 0, false);
  EXPECT_EQ(s.group_queued(0), 0);
  EXPECT_EQ(s.group_stats(0)->timed_out_total, 1u);
}

TEST(SharedStateLimits, DeadOwnersShareVanishes) {
  Fixture f;
  SharedState& s = *f.st;
  ASSERT_EQ(s.admit(4242, 0, 3, 3), Admission::kAdmitted);
  ASSERT_EQ(s.admit(4242, 0, 3, 3), Admission::kAdmitted);
  ASSERT_EQ(s.admit(4243, 0, 3, 3), Admission::kAdmitted);
  ASSERT_EQ(s.admit(4242, 0, 3, 3), Admission::kQueued);
  s.reclaim_dead([](std::int32_t pid) { return pid != 4242; });
  EXPECT_EQ(s.group_inflight(0), 1);
  EXPECT_EQ(s.group_queued(0), 0);
  EXPECT_EQ(s.admit(4243, 0, 3, 3), Admission::kAdmitted);
}

TEST(SharedStateLimits, GroupsAreCheckedAtAttach) {
  Fixture f;
  SharedStateConfig same = config();
  EXPECT_TRUE(SharedState::attach(f.mem.data(), f.mem.size(), &same).ok());
  SharedStateConfig renamed = config();
  renamed.groups[1] = "/other";
  auto r = SharedState::attach(f.mem.data(), f.mem.size(), &renamed);
  EXPECT_EQ(r.status, OpenStatus::kConfigMismatch);
  SharedStateConfig fewer = config();
  fewer.groups.pop_back();
  EXPECT_EQ(SharedState::attach(f.mem.data(), f.mem.size(), &fewer).status,
            OpenStatus::kConfigMismatch);
}

TEST(SharedStateLimits, InvalidGroupConfigIsRefused) {
  SharedStateConfig c = config();
  c.groups = {"a", "b", "c", "d", "e"};  // max_groups 4
  std::vector<char> mem(1 << 20);
  EXPECT_EQ(SharedState::create(mem.data(), mem.size(), c).status, OpenStatus::kBadArgument);
  c = config();
  c.groups = {""};
  EXPECT_EQ(SharedState::create(mem.data(), mem.size(), c).status, OpenStatus::kBadArgument);
  c.groups = {std::string(SharedState::kMaxGroupName + 1, 'x')};
  EXPECT_EQ(SharedState::create(mem.data(), mem.size(), c).status, OpenStatus::kBadArgument);
}

TEST(SharedStateEngineLoad, StoresPollAndCountsRequestsSince) {
  Fixture f;
  SharedState& s = *f.st;
  EXPECT_FALSE(s.engine_load(0).has_value());
  auto h = s.acquire(9, 1000);
  ASSERT_TRUE(h);
  ASSERT_EQ(s.set_backends(*h, 0, 1), SlotResult::kOk);
  EXPECT_EQ(s.sent_since_poll(0), 1u);  // never polled: everything is unseen

  EngineLoadSample x;
  x.running = 3;
  x.waiting = 7;
  x.kv_usage = 0.25;
  x.waiting_uncached_tokens = 4096;
  x.polled_ns = 5000;
  EXPECT_TRUE(s.set_engine_load(0, x));
  EXPECT_EQ(s.sent_since_poll(0), 0u);
  auto y = s.engine_load(0);
  ASSERT_TRUE(y);
  EXPECT_EQ(y->running, 3u);
  EXPECT_EQ(y->waiting, 7u);
  EXPECT_DOUBLE_EQ(y->kv_usage, 0.25);
  EXPECT_EQ(y->waiting_uncached_tokens, 4096u);
  EXPECT_EQ(y->polled_ns, 5000u);
  EXPECT_EQ(y->requests_at_poll, 1u);

  auto h2 = s.acquire(9, 2000);
  ASSERT_EQ(s.set_backends(*h2, 0, 1), SlotResult::kOk);
  EXPECT_EQ(s.sent_since_poll(0), 1u);

  x.kv_usage = std::nan("");
  x.waiting_uncached_tokens.reset();
  x.polled_ns = 0;
  EXPECT_FALSE(s.set_engine_load(0, x));  // a poll needs a time
  x.polled_ns = 6000;
  EXPECT_TRUE(s.set_engine_load(0, x));
  EXPECT_TRUE(std::isnan(s.engine_load(0)->kv_usage));
  EXPECT_FALSE(s.engine_load(0)->waiting_uncached_tokens.has_value());
  EXPECT_FALSE(s.set_engine_load(9, x));

  EXPECT_TRUE(s.count_poll_failure(1));
  EXPECT_EQ(s.poll_failures_total(1), 1u);
  EXPECT_EQ(s.bootstrap_port(0), 0u);
  EXPECT_TRUE(s.set_bootstrap_port(0, 8998));
  EXPECT_EQ(s.bootstrap_port(0), 8998u);
}

TEST(SharedStateEngineLoad, RenderedInMetricsAndStatus) {
  Fixture f;
  SharedState& s = *f.st;
  EngineLoadSample x;
  x.running = 2;
  x.waiting = 1;
  x.kv_usage = 0.5;
  x.polled_ns = 3'000'000'000;
  s.set_engine_load(1, x);
  ASSERT_EQ(s.admit(3, 0, 1, 0), Admission::kAdmitted);
  prom::TextWriter w;
  s.render_metrics(w);
  const std::string text = w.str();
  std::size_t malformed = 0;
  const auto samples = prom::parse_text(text, &malformed);
  ASSERT_EQ(malformed, 0u) << text;
  const auto* parsed = &samples;
  EXPECT_EQ(prom::find_value(*parsed, "omni_proxy_backend_engine_running",
                             {{"pool", "decode"}, {"backend", "127.0.0.1:8200"}}),
            2.0);
  EXPECT_EQ(prom::find_value(*parsed, "omni_proxy_backend_engine_kv_usage",
                             {{"pool", "decode"}, {"backend", "127.0.0.1:8200"}}),
            0.5);
  EXPECT_FALSE(prom::find_value(*parsed, "omni_proxy_backend_engine_running",
                                {{"pool", "prefill"}, {"backend", "127.0.0.1:8100"}})
                   .has_value());
  EXPECT_EQ(prom::find_value(*parsed, "omni_proxy_limit_inflight", {{"group", "/v1/"}}), 1.0);
  EXPECT_EQ(prom::find_value(*parsed, "omni_proxy_limit_rejected_total", {{"group", "/generate"}}),
            0.0);

  const nlohmann::json j = s.render_status_json();
  EXPECT_EQ(j["backends"][1]["engine"]["running"], 2);
  EXPECT_TRUE(j["backends"][0]["engine"].is_null());
  EXPECT_EQ(j["limits"][0]["group"], "/v1/");
  EXPECT_EQ(j["limits"][0]["inflight"], 1);
}

}  // namespace
}  // namespace omni
