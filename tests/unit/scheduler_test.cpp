#include <omni/scheduler.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

namespace omni::sched {
namespace {

constexpr std::uint64_t kMs = 1'000'000ULL;

// A region for a scheduler: page-aligned, shared with forked children.
struct Region {
  explicit Region(std::size_t n) : bytes(n) {
    ptr = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  }
  ~Region() {
    if (ptr != MAP_FAILED) ::munmap(ptr, bytes);
  }
  void* ptr;
  std::size_t bytes;
};

// Prefill pool 0 (servers 0..p-1), decode pool 1 (servers p..p+d-1).
Shape make_shape(std::uint16_t prefill, std::uint16_t decode, std::uint32_t capacity = 256) {
  Shape s;
  s.capacity = capacity;
  s.instances = prefill + decode;
  PoolShape p;
  p.base = 0;
  p.count = prefill;
  for (std::uint16_t i = 0; i < prefill; ++i) p.ids.push_back(0x1000 + i * 7919ULL);
  s.pools.push_back(p);
  if (decode > 0) {
    PoolShape d;
    d.base = prefill;
    d.count = decode;
    for (std::uint16_t i = 0; i < decode; ++i) d.ids.push_back(0x9000 + i * 104729ULL);
    s.pools.push_back(d);
  }
  return s;
}

struct Fixture {
  explicit Fixture(Shape shape)
      : shape_(std::move(shape)), region(Scheduler::required_bytes(shape_)) {
    sched = Scheduler::create(region.ptr, region.bytes, shape_);
  }
  Shape shape_;
  Region region;
  std::unique_ptr<Scheduler> sched;
};

EnqueueRequest prefill_only(std::uint32_t tokens, std::int32_t priority = 0) {
  EnqueueRequest r;
  r.owner_pid = static_cast<std::int32_t>(::getpid());
  r.mode = Mode::kAggregated;
  r.prefill_pool = 0;
  r.prompt_tokens = tokens;
  r.priority = priority;
  r.ring_key = tokens * 2654435761ULL + 17;
  return r;
}

Options quiet_options() {
  Options o;
  o.default_step_ms = 10;
  o.default_ms_per_ktoken = 50;
  o.default_batch_tokens = 4096;
  o.max_wait_ms = 10'000;
  return o;
}

// ---------------------------------------------------------------------------------------------
// Layout and bounds
// ---------------------------------------------------------------------------------------------

TEST(SchedulerLayout, RejectsBadShapesAndSmallRegions) {
  Shape s = make_shape(2, 2);
  const std::size_t need = Scheduler::required_bytes(s);
  ASSERT_GT(need, 0u);
  Region r(need);
  EXPECT_EQ(Scheduler::create(r.ptr, need - 64, s), nullptr);
  Shape bad = s;
  bad.pools[0].count = 65;
  EXPECT_EQ(Scheduler::required_bytes(bad), 0u);
  bad = s;
  bad.capacity = 0;
  EXPECT_EQ(Scheduler::required_bytes(bad), 0u);
  bad = s;
  bad.pools[1].ids[1] = bad.pools[1].ids[0];  // duplicate ids: no ring
  EXPECT_EQ(Scheduler::create(r.ptr, need, bad), nullptr);
  auto made = Scheduler::create(r.ptr, need, s);
  ASSERT_NE(made, nullptr);
  auto again = Scheduler::attach(r.ptr, need);
  ASSERT_NE(again, nullptr);
  EXPECT_EQ(again->capacity(), 256u);
  EXPECT_EQ(again->pools(), 2u);
  EXPECT_EQ(again->pool(1).base, 2);
  std::vector<char> junk(need, 0x5a);
  EXPECT_EQ(Scheduler::attach(junk.data(), junk.size()), nullptr);
}

// ---------------------------------------------------------------------------------------------
// Queue order
// ---------------------------------------------------------------------------------------------

// One instance kept busy (its next batch full), so every request queues; then release them one
// batch at a time and record the order.
// The order in which the requests are released, one batch at a time: within a pass, the one
// expected to finish first (the current step before the next batch) comes first.
std::vector<std::uint32_t> release_order(Scheduler& s, const Options& o,
                                         const std::vector<Ref>& refs, std::uint64_t& now) {
  std::vector<std::uint32_t> order;
  std::vector<bool> seen(refs.size(), false);
  for (int round = 0; round < 200 && order.size() < refs.size(); ++round) {
    s.pass(now, o);
    std::vector<std::pair<double, std::uint32_t>> batch;
    for (std::size_t i = 0; i < refs.size(); ++i) {
      if (seen[i]) continue;
      const Decision d = s.decision(refs[i]);
      if (d.state != State::kPrefill) continue;
      seen[i] = true;
      batch.emplace_back(d.expected_ms, static_cast<std::uint32_t>(i));
    }
    std::sort(batch.begin(), batch.end());
    for (auto& [eta, i] : batch) {
      order.push_back(i);
      now += kMs;
      s.prefill_done(refs[i], now, true, std::nullopt, o);
      s.decode_done(refs[i], now, 0, o);
    }
    now += kMs;
  }
  return order;
}

TEST(SchedulerOrder, ShortBeforeLongPriorityFirstAndAgeingWins) {
  Fixture f(make_shape(1, 0));
  Options o = quiet_options();
  o.length_weight_ms = 100;  // 100 ms of arrival per 1k tokens
  Scheduler& s = *f.sched;
  s.set_limits(0, {1000, 0});  // every request fills a batch: one released per step
  std::uint64_t now = 1'000 * kMs;
  // A blocker occupies the instance, so that the rest queue.
  auto blocker = s.enqueue(prefill_only(1000), now, o);
  ASSERT_EQ(blocker.verdict, Verdict::kQueued);
  s.pass(now, o);
  ASSERT_EQ(s.decision(blocker.ref).state, State::kPrefill);
  auto block2 = s.enqueue(prefill_only(1000), now, o);  // fills the next batch
  s.pass(now, o);
  ASSERT_EQ(s.decision(block2.ref).state, State::kPrefill);

  std::vector<Ref> refs;
  // 0: long (8k) at t; 1: short (1k) at t+300 ms: its key is earlier (300 + 100 < 800).
  refs.push_back(s.enqueue(prefill_only(8000), now, o).ref);
  refs.push_back(s.enqueue(prefill_only(1000), now + 300 * kMs, o).ref);
  // 2: short at t+900 ms: key 1000 > 800: after the long one.
  refs.push_back(s.enqueue(prefill_only(1000), now + 900 * kMs, o).ref);
  // 3: priority -1 (more urgent), long, last to arrive: first of all.
  refs.push_back(s.enqueue(prefill_only(8000, -1), now + 950 * kMs, o).ref);
  now += 1000 * kMs;
  s.prefill_done(blocker.ref, now, true, std::nullopt, o);
  s.decode_done(blocker.ref, now, 0, o);
  s.prefill_done(block2.ref, now, true, std::nullopt, o);
  s.decode_done(block2.ref, now, 0, o);
  const auto order = release_order(s, o, refs, now);
  EXPECT_EQ(order, (std::vector<std::uint32_t>{3, 1, 0, 2}));
}

// ---------------------------------------------------------------------------------------------
// The starvation bound
// ---------------------------------------------------------------------------------------------

// A long request arrives in a flood of short ones at a rate the instance cannot absorb; every
// short one sorts before it (short and later, but the length weight is large). The bound still
// releases it within max_wait.
TEST(SchedulerStarvation, LongRequestInFloodOfShortOnesIsServedWithinTheBound) {
  Fixture f(make_shape(1, 0, 4096));
  Options o = quiet_options();
  o.default_batch_tokens = 2048;
  o.length_weight_ms = 100'000;  // length dominates: without the bound it would never go
  o.max_wait_ms = 2'000;
  Scheduler& s = *f.sched;
  std::uint64_t now = 10'000 * kMs;
  const std::uint64_t start = now;
  Ref long_ref;
  bool long_released = false;
  std::uint64_t long_enqueued = 0, long_released_at = 0;
  std::vector<std::pair<Ref, std::uint64_t>> running;  // released, done at
  std::uint64_t shorts = 0;
  for (std::uint64_t tick = 0; tick < 6000; ++tick) {
    now = start + tick * kMs;
    // Short ones: 3 per ms, 500 tokens each; the engine does about 1 per ms.
    for (int k = 0; k < 3; ++k) {
      auto e = s.enqueue(prefill_only(500), now, o);
      if (e.verdict == Verdict::kQueued) ++shorts;
    }
    if (tick == 100) {
      auto e = s.enqueue(prefill_only(20000), now, o);
      ASSERT_EQ(e.verdict, Verdict::kQueued);
      long_ref = e.ref;
      long_enqueued = now;
    }
    // Completions: each released request takes 1 ms of engine time.
    for (auto it = running.begin(); it != running.end();) {
      if (it->second <= now) {
        s.prefill_done(it->first, now, true, std::nullopt, o);
        s.decode_done(it->first, now, 0, o);
        it = running.erase(it);
      } else {
        ++it;
      }
    }
    s.pass(now, o);
    for (const Ref& r : s.entries_of(static_cast<std::int32_t>(::getpid()))) {
      const Decision d = s.decision(r);
      if (d.state != State::kPrefill) continue;
      if (std::none_of(running.begin(), running.end(), [&](auto& p) {
            return p.first.index == r.index && p.first.ticket == r.ticket;
          })) {
        running.emplace_back(r, now + kMs);
        if (r.index == long_ref.index && r.ticket == long_ref.ticket && !long_released) {
          long_released = true;
          long_released_at = now;
          EXPECT_TRUE(d.starved);
        }
      }
    }
  }
  ASSERT_TRUE(long_released);
  EXPECT_LE(long_released_at - long_enqueued, o.max_wait_ms * kMs);
  // Short ones kept flowing meanwhile.
  EXPECT_GT(shorts, 1000u);
  EXPECT_GT(s.stats().released, 1000u);
  EXPECT_EQ(s.stats().starved, 1u);
}

// ---------------------------------------------------------------------------------------------
// Cycle learning and the cost model
// ---------------------------------------------------------------------------------------------

TEST(SchedulerModel, StepFitConvergesFromNoisySamples) {
  Fixture f(make_shape(1, 0));
  Options o = quiet_options();
  Scheduler& s = *f.sched;
  // Before data: the defaults.
  EXPECT_NEAR(s.step_ms(0, 1000, o), 10 + 50, 1e-9);
  std::uint64_t x = 12345;
  for (int i = 0; i < 400; ++i) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    const double tokens = 500 + static_cast<double>(x >> 40) / (1 << 24) * 30000;
    const double noise = 1.0 + ((static_cast<double>((x >> 8) & 0xffff) / 65535.0) - 0.5) * 0.1;
    s.observe_step(0, tokens, (30 + 0.0277 * tokens) * noise, o);
  }
  const InstanceStats st = s.instance_stats(0, 0, o);
  EXPECT_NEAR(st.ms_per_ktoken, 27.7, 27.7 * 0.05);
  EXPECT_NEAR(st.step_ms, 30, 10);
  EXPECT_NEAR(s.step_ms(0, 16000, o), 30 + 0.0277 * 16000, (30 + 0.0277 * 16000) * 0.05);
  EXPECT_EQ(st.step_samples, 400u);
}

// A simulated engine: back-to-back steps of at most B tokens, FCFS (chunked: a job larger than
// the room left takes what fits), step time a + b x tokens.
struct SimEngine {
  SimEngine(double a, double b, std::uint32_t budget_tokens)
      : a_ms(a), b_ms_per_token(b), budget(budget_tokens) {}
  double a_ms, b_ms_per_token;
  std::uint32_t budget;
  struct Job {
    Ref ref;
    double left;
  };
  std::vector<Job> queue;
  std::uint64_t step_end = 0;  // 0: idle
  std::vector<Job> in_step;
  std::vector<double> step_take;

  void submit(Ref r, double tokens) { queue.push_back({r, tokens}); }
  // Advances to `now`; returns the jobs that completed, with their completion times.
  std::vector<std::pair<Ref, std::uint64_t>> advance(std::uint64_t now) {
    std::vector<std::pair<Ref, std::uint64_t>> done;
    while (true) {
      if (step_end == 0) {
        if (queue.empty()) break;
        start(now);
        continue;
      }
      if (step_end > now) break;
      const std::uint64_t t = step_end;
      std::vector<Job> carry;
      for (std::size_t i = 0; i < in_step.size(); ++i) {
        in_step[i].left -= step_take[i];
        if (in_step[i].left <= 0.5) {
          done.emplace_back(in_step[i].ref, t);
        } else {
          carry.push_back(in_step[i]);
        }
      }
      queue.insert(queue.begin(), carry.begin(), carry.end());
      in_step.clear();
      step_take.clear();
      step_end = 0;
      if (!queue.empty()) start(t);
    }
    return done;
  }
  void start(std::uint64_t t) {
    double room = budget;
    double tokens = 0;
    while (!queue.empty() && room > 0) {
      Job j = queue.front();
      queue.erase(queue.begin());
      const double take = std::min(j.left, room);
      room -= take;
      tokens += take;
      in_step.push_back(j);
      step_take.push_back(take);
    }
    step_end = t + static_cast<std::uint64_t>((a_ms + b_ms_per_token * tokens) * 1e6);
  }
};

// Drives a scheduler over simulated engines with an injected clock: requests released to an
// instance are submitted to its engine; the engine's completions are reported back.
struct Harness {
  Harness(Scheduler& sched, Options opt, std::vector<SimEngine> eng)
      : s(sched), o(std::move(opt)), engines(std::move(eng)) {}
  Scheduler& s;
  Options o;
  std::vector<SimEngine> engines;  // one per prefill server (pool 0)
  struct Req {
    Ref ref;
    std::uint32_t prompt = 0;
    std::vector<std::uint32_t> cached;
    std::int32_t server = -1;
    std::uint64_t enqueued = 0, released = 0, done = 0;
  };
  std::vector<Req> reqs;
  std::uint64_t now = 1'000 * kMs;

  std::optional<std::size_t> submit(std::uint32_t prompt, std::vector<std::uint32_t> cached = {},
                                    std::uint64_t ring_key = 0) {
    EnqueueRequest r = prefill_only(prompt);
    r.prefill_cached = cached;
    if (ring_key != 0) r.ring_key = ring_key;
    auto e = s.enqueue(r, now, o);
    if (e.verdict != Verdict::kQueued) return std::nullopt;
    reqs.push_back({e.ref, prompt, std::move(cached), -1, now, 0, 0});
    return reqs.size() - 1;
  }
  void tick(std::uint64_t dt_ms = 1) {
    now += dt_ms * kMs;
    for (SimEngine& eng : engines) {
      for (auto& [ref, t] : eng.advance(now)) {
        s.prefill_done(ref, t, true, std::nullopt, o);
        s.decode_done(ref, t, 0, o);
        for (Req& q : reqs) {
          if (q.ref.index == ref.index && q.ref.ticket == ref.ticket) q.done = t;
        }
      }
    }
    s.pass(now, o);
    for (Req& q : reqs) {
      if (q.server >= 0 || q.done != 0) continue;
      const Decision d = s.decision(q.ref);
      if (d.state != State::kPrefill) continue;
      q.server = d.prefill_server;
      q.released = now;
      const std::uint32_t c =
          static_cast<std::size_t>(q.server) < q.cached.size() ? q.cached[q.server] : 0;
      engines[static_cast<std::size_t>(q.server)].submit(q.ref, q.prompt - std::min(c, q.prompt));
    }
  }
};

TEST(SchedulerModel, LearnsTheStepCycleFromCompletions) {
  Fixture f(make_shape(1, 0, 1024));
  Options o = quiet_options();
  Scheduler& s = *f.sched;
  s.set_limits(0, {8192, 0});
  Harness h(s, o, {SimEngine{40, 0.02, 8192}});
  std::uint64_t x = 99;
  std::uint64_t next_arrival = 0;
  for (int ms = 0; ms < 30'000; ++ms) {
    if (static_cast<std::uint64_t>(ms) >= next_arrival) {
      // 1k..4k tokens every 20..140 ms: batches of varying size, the engine ~60% busy.
      x = x * 6364136223846793005ULL + 1;
      h.submit(1000 + static_cast<std::uint32_t>((x >> 33) % 3000));
      next_arrival = static_cast<std::uint64_t>(ms) + 20 + (x >> 40) % 120;
    }
    h.tick();
  }
  const InstanceStats st = s.instance_stats(0, h.now, o);
  EXPECT_GT(st.boundaries, 100u);
  EXPECT_GT(st.step_samples, 100u);
  // step = 40 ms + 20 ms per 1k tokens.
  EXPECT_NEAR(st.ms_per_ktoken, 20, 3);
  EXPECT_NEAR(st.step_ms, 40, 8);
  EXPECT_GT(st.cycle_ms, 40);
  EXPECT_EQ(st.batch_tokens, 8192u);
  std::size_t done = 0;
  for (const auto& q : h.reqs) done += q.done != 0;
  EXPECT_GT(done, h.reqs.size() * 9 / 10);
}

// ---------------------------------------------------------------------------------------------
// Release and node choice
// ---------------------------------------------------------------------------------------------

TEST(SchedulerRelease, FullInstancesGetNothingAndWorkGoesToWhicheverFreesFirst) {
  Fixture f(make_shape(2, 0, 1024));
  Options o = quiet_options();
  Scheduler& s = *f.sched;
  s.set_limits(0, {4000, 0});
  s.set_limits(1, {4000, 0});
  // Instance 1 is four times slower.
  Harness h(s, o, {SimEngine{10, 0.01, 4000}, SimEngine{10, 0.04, 4000}});
  // A burst of 40 requests of 2k tokens at once.
  for (int i = 0; i < 40; ++i) ASSERT_TRUE(h.submit(2000));
  h.tick(0);
  // At most a step in progress plus a full next batch each: 2 + 2 per instance.
  std::size_t released = 0;
  for (const auto& q : h.reqs) released += q.server >= 0;
  EXPECT_LE(released, 8u);
  EXPECT_GE(released, 2u);
  for (int ms = 0; ms < 10'000; ++ms) h.tick();
  std::size_t on_fast = 0, on_slow = 0;
  for (const auto& q : h.reqs) {
    ASSERT_NE(q.done, 0u);
    (q.server == 0 ? on_fast : on_slow)++;
  }
  // Late binding: the fast instance frees up more often and takes most of the work.
  EXPECT_GT(on_fast, on_slow * 2);
  EXPECT_EQ(s.stats().queued, 0u);
}

// Two servers loaded unevenly: four requests warm on server 1 (they go there), then four cold
// ones. Returns the busier server and by how many outstanding tokens.
struct Uneven {
  std::uint32_t busy = 0;
  std::uint64_t difference = 0;
};
Uneven load_unevenly(Harness& h) {
  for (int i = 0; i < 4; ++i) h.submit(10000, {0, 10000 - 1});
  h.tick(0);
  for (int i = 0; i < 4; ++i) h.submit(10000, {0, 0});
  h.tick(0);
  const InstanceStats s0 = h.s.instance_stats(0, h.now, h.o);
  const InstanceStats s1 = h.s.instance_stats(1, h.now, h.o);
  Uneven u;
  u.busy = s0.outstanding_tokens > s1.outstanding_tokens ? 0 : 1;
  u.difference = u.busy == 0 ? s0.outstanding_tokens - s1.outstanding_tokens
                             : s1.outstanding_tokens - s0.outstanding_tokens;
  return u;
}

TEST(SchedulerRelease, CachedPrefixIsPreferredUnlessItsQueueCostsMore) {
  Fixture f(make_shape(2, 0, 1024));
  Options o = quiet_options();
  Scheduler& s = *f.sched;
  s.set_limits(0, {16384, 0});
  s.set_limits(1, {16384, 0});
  Harness h(s, o, {SimEngine{10, 0.05, 16384}, SimEngine{10, 0.05, 16384}});
  // Both idle: 8k of 9k tokens cached on server 1 wins.
  auto a = h.submit(9000, {0, 8000});
  h.tick(0);
  ASSERT_TRUE(a);
  EXPECT_EQ(h.reqs[*a].server, 1);
  // Server 1 now computes 1k tokens (~60 ms); a request with 8k cached on server 0 and 4k on
  // server 1 goes to 0: the larger saving.
  auto b = h.submit(9000, {8000, 4000});
  h.tick(0);
  ASSERT_TRUE(b);
  EXPECT_EQ(h.reqs[*b].server, 0);
  // Load server 1 with ~40k uncached tokens (about 2 s of work): a request with 1k of its 20k
  // tokens cached there goes to server 0 instead, where its queue is short.
  const std::uint32_t busy = load_unevenly(h).busy;
  std::vector<std::uint32_t> small(2, 0);
  small[busy] = 1000;
  auto c = h.submit(20000, small);
  h.tick(0);
  ASSERT_TRUE(c);
  EXPECT_NE(static_cast<std::uint32_t>(h.reqs[*c].server), busy);
  // But a prefix that saves more than the queue costs waits for its server even while the
  // other has room: 19.9k of 20k cached on the busy one.
  std::vector<std::uint32_t> big(2, 0);
  big[busy] = 19900;
  auto d = h.submit(20000, big);
  h.tick(0);
  ASSERT_TRUE(d);
  const Decision dd = s.decision(h.reqs[*d].ref);
  EXPECT_TRUE(
      dd.state == State::kQueued ||
      (dd.state == State::kPrefill && static_cast<std::uint32_t>(dd.prefill_server) == busy));
  for (int ms = 0; ms < 10'000 && h.reqs[*d].done == 0; ++ms) h.tick();
  EXPECT_EQ(static_cast<std::uint32_t>(h.reqs[*d].server), busy);
}

// route.miss_weight prices the uncached prefill in the choice, and in the decision to wait as
// Options::miss_wait says. With a queue of D tokens more on one server, a prompt with c tokens
// cached there goes to the other while c < D unpriced, and waits for the holder once
// (1 + w) c > D: c = D / 3 does both.
TEST(SchedulerRelease, MissWeightWaitsForTheHolderAsMissWaitSays) {
  struct Case {
    double weight;
    bool miss_wait;
    int queued;  // requests like it submitted together
    bool waits;  // the first placed goes to the busy holder
  };
  const Case cases[] = {
      {0.0, true, 1, false},  {10.0, true, 1, true},   {10.0, false, 1, false},
      {10.0, true, 2, true}, {10.0, false, 2, false},
  };
  for (const Case& c : cases) {
    const std::string what = "weight " + std::to_string(c.weight) + " miss_wait " +
                             (c.miss_wait ? "on" : "off") + " queued " + std::to_string(c.queued);
    Fixture f(make_shape(2, 0, 1024));
    Options o = quiet_options();
    Scheduler& s = *f.sched;
    s.set_limits(0, {16384, 0});
    s.set_limits(1, {16384, 0});
    Harness h(s, o, {SimEngine{10, 0.05, 16384}, SimEngine{10, 0.05, 16384}});
    const Uneven u = load_unevenly(h);
    const std::uint32_t busy = u.busy;
    const std::uint64_t d = u.difference;
    ASSERT_GT(d, 6000u) << what;
    std::vector<std::uint32_t> cached(2, 0);
    cached[busy] = static_cast<std::uint32_t>(d / 3);
    h.o.route.miss_weight = c.weight;
    h.o.miss_wait = c.miss_wait;
    std::vector<std::size_t> rs;
    for (int i = 0; i < c.queued; ++i) {
      auto r = h.submit(20000, cached);
      ASSERT_TRUE(r) << what;
      rs.push_back(*r);
    }
    // The first of them placed: on the busy holder when the price made it wait, else on the
    // other server as soon as that has room.
    std::optional<std::size_t> first;
    for (int ms = 0; ms < 20'000 && !first; ++ms) {
      h.tick();
      for (const std::size_t r : rs) {
        if (!first && h.reqs[r].server >= 0) first = r;
      }
    }
    ASSERT_TRUE(first) << what;
    EXPECT_EQ(static_cast<std::uint32_t>(h.reqs[*first].server) == busy, c.waits) << what;
  }
}

// The caches change while a request waits (another request's prefix is sent, or cached): its
// owner refreshes the predictions, and the scheduler places it by the new ones.
TEST(SchedulerRelease, UpdatedCachePredictionsDecideThePlace) {
  for (const std::uint32_t holder : {0u, 1u}) {
    Fixture f(make_shape(2, 0, 64));
    Options o = quiet_options();
    Scheduler& s = *f.sched;
    s.set_limits(0, {16384, 0});
    s.set_limits(1, {16384, 0});
    const std::vector<std::uint32_t> none(2, 0);
    EnqueueRequest req = prefill_only(10000);
    req.prefill_cached = none;
    const EnqueueResult e = s.enqueue(req, 1'000 * kMs, o);
    ASSERT_EQ(e.verdict, Verdict::kQueued);
    std::vector<std::uint32_t> cached(2, 0);
    cached[holder] = 8000;
    EXPECT_TRUE(s.update_cached(e.ref, cached, {})) << holder;
    EXPECT_FALSE(s.update_cached(e.ref, cached, {})) << "nothing changed";
    EXPECT_FALSE(s.update_cached({e.ref.index, e.ref.ticket + 1}, none, {})) << "stale ref";
    EXPECT_FALSE(s.update_cached({999, e.ref.ticket}, none, {})) << "out of range";
    EXPECT_EQ(s.stats().cache_updates, 1u);
    s.pass(1'000 * kMs, o);
    const Decision d = s.decision(e.ref);
    ASSERT_EQ(d.state, State::kPrefill) << holder;
    EXPECT_EQ(d.prefill_server, static_cast<std::int32_t>(holder));
    EXPECT_EQ(d.cached_tokens, 8000u);
    EXPECT_FALSE(s.update_cached(e.ref, none, {})) << "released: no longer waiting";
  }
}

TEST(SchedulerRelease, BoundaryModeHoldsUntilTheStepIsAboutToEnd) {
  Fixture f(make_shape(1, 0, 1024));
  Options o = quiet_options();
  o.release = Release::kBoundary;
  o.lead_ms = 5;
  o.min_cycle_samples = 4;
  Scheduler& s = *f.sched;
  s.set_limits(0, {100000, 0});
  for (int i = 0; i < 50; ++i) s.observe_step(0, 10000, 10 + 0.05 * 10000, o);  // 510 ms
  Harness h(s, o, {SimEngine{10, 0.05, 100000}});
  auto a = h.submit(10000);
  h.tick(0);
  ASSERT_EQ(h.reqs[*a].server, 0);  // idle: released at once
  const std::uint64_t started = h.now;
  h.tick(100);
  auto b = h.submit(1000);
  const PassResult r = s.pass(h.now, o);
  EXPECT_EQ(s.decision(h.reqs[*b].ref).state, State::kQueued);
  // Asked to run again `lead` before the expected end of the 510 ms step.
  EXPECT_NEAR(static_cast<double>(r.next_ns - started) / 1e6, 505, 2);
  EXPECT_TRUE(s.decision(h.reqs[*b].ref).held);
  h.now = r.next_ns;
  s.pass(h.now, o);
  EXPECT_EQ(s.decision(h.reqs[*b].ref).state, State::kPrefill);
}

// ---------------------------------------------------------------------------------------------
// Admission control
// ---------------------------------------------------------------------------------------------

TEST(SchedulerAdmission, QueueFullDeadlineAndUnavailable) {
  Fixture f(make_shape(1, 0, 64));
  Options o = quiet_options();
  o.max_queue = 10;
  o.max_wait_ms = 1000;
  o.default_batch_tokens = 1000;
  Scheduler& s = *f.sched;
  std::uint64_t now = 1'000 * kMs;
  // Fill the instance (step + next batch), then the queue.
  std::vector<EnqueueResult> out;
  for (int i = 0; i < 2; ++i) {
    out.push_back(s.enqueue(prefill_only(1000), now, o));
    s.pass(now, o);
  }
  // 1000 tokens take 10 + 50 ms: about 60 ms each; 10 queued ones take ~600 ms < 1000.
  for (int i = 0; i < 10; ++i) {
    auto e = s.enqueue(prefill_only(1000), now, o);
    EXPECT_EQ(e.verdict, Verdict::kQueued) << i;
    EXPECT_TRUE(e.wake_scheduler);
  }
  auto full = s.enqueue(prefill_only(1000), now, o);
  EXPECT_EQ(full.verdict, Verdict::kQueueFull);
  EXPECT_GE(full.retry_after_s, 1u);
  EXPECT_NE(full.message.find("queue is full"), std::string::npos);

  // A deadline that cannot be met: the work ahead takes longer than the bound.
  o.max_queue = 0;
  EnqueueRequest tight = prefill_only(1000);
  tight.max_wait_ms = 100;
  auto late = s.enqueue(tight, now, o);
  EXPECT_EQ(late.verdict, Verdict::kDeadline);
  EXPECT_GE(late.retry_after_s, 1u);
  EXPECT_GT(late.expected_wait_ms, 100);
  // A more urgent one jumps the queue, so its wait is short.
  EnqueueRequest urgent = prefill_only(1000, -5);
  urgent.max_wait_ms = 200;
  EXPECT_EQ(s.enqueue(urgent, now, o).verdict, Verdict::kQueued);

  InstanceView down;
  down.healthy = false;
  std::vector<InstanceView> views{down};
  auto none = s.enqueue(prefill_only(10), now, o, views);
  EXPECT_EQ(none.verdict, Verdict::kUnavailable);
  const Stats st = s.stats();
  EXPECT_EQ(st.refused_full, 1u);
  EXPECT_EQ(st.refused_deadline, 1u);
  EXPECT_EQ(st.refused_unavailable, 1u);

  EnqueueRequest bad = prefill_only(10);
  bad.prefill_pool = 7;
  EXPECT_EQ(s.enqueue(bad, now, o).verdict, Verdict::kInvalid);
}

// ---------------------------------------------------------------------------------------------
// Decode
// ---------------------------------------------------------------------------------------------

EnqueueRequest sequential(std::uint32_t tokens, std::vector<std::uint32_t>* dcached = nullptr) {
  EnqueueRequest r = prefill_only(tokens);
  r.mode = Mode::kSequential;
  r.decode_pool = 1;
  if (dcached != nullptr) r.decode_cached = *dcached;
  return r;
}

TEST(SchedulerDecode, MaxSeqsIsRespectedAndTheRequestWaits) {
  Fixture f(make_shape(1, 2, 64));
  Options o = quiet_options();
  Scheduler& s = *f.sched;
  s.set_limits(1, {0, 2});
  s.set_limits(2, {0, 1});
  std::uint64_t now = 1'000 * kMs;
  std::vector<Ref> refs;
  for (int i = 0; i < 4; ++i) {
    auto e = s.enqueue(sequential(100), now, o);
    ASSERT_EQ(e.verdict, Verdict::kQueued);
    refs.push_back(e.ref);
  }
  for (int round = 0; round < 4; ++round) {
    s.pass(now, o);
    for (const Ref& r : refs) {
      if (s.decision(r).state == State::kPrefill) s.prefill_done(r, now, true, std::nullopt, o);
    }
    now += kMs;
  }
  s.pass(now, o);
  int decoding = 0, waiting = 0;
  std::map<int, int> per_server;
  for (const Ref& r : refs) {
    const Decision d = s.decision(r);
    if (d.state == State::kDecode) {
      ++decoding;
      ++per_server[d.decode_server];
    }
    if (d.state == State::kDecodeQueued) ++waiting;
  }
  EXPECT_EQ(decoding, 3);  // 2 + 1 slots
  EXPECT_EQ(waiting, 1);
  EXPECT_EQ(per_server[0], 2);
  EXPECT_EQ(per_server[1], 1);
  // One finishes: the waiting one gets its slot.
  for (const Ref& r : refs) {
    if (s.decision(r).state == State::kDecode) {
      s.decode_done(r, now, 25, o);
      break;
    }
  }
  s.pass(now, o);
  waiting = 0;
  for (const Ref& r : refs) waiting += s.decision(r).state == State::kDecodeQueued;
  EXPECT_EQ(waiting, 0);
  EXPECT_EQ(s.stats().decode_queued, 0u);
}

TEST(SchedulerDecode, SloThenCacheThenLoad) {
  Fixture f(make_shape(1, 2, 64));
  Options o = quiet_options();
  o.tpot_slo_ms = 50;
  Scheduler& s = *f.sched;
  std::uint64_t now = 1'000 * kMs;
  auto run_one = [&](std::vector<std::uint32_t> dc) {
    auto e = s.enqueue(sequential(100, &dc), now, o);
    s.pass(now, o);
    s.prefill_done(e.ref, now, true, std::nullopt, o);
    s.pass(now, o);
    return e.ref;
  };
  // Cache decides among equally good ones.
  const Ref a = run_one({0, 640});
  EXPECT_EQ(s.decision(a).decode_server, 1);
  const Ref b = run_one({640, 0});
  EXPECT_EQ(s.decision(b).decode_server, 0);
  s.decode_done(a, now, 0, o);
  s.decode_done(b, now, 0, o);
  // Teach server 0 (backend 1) that it is slow under load: 20 + 10 ms per request.
  std::vector<Ref> load;
  for (int i = 0; i < 6; ++i) load.push_back(run_one({640, 0}));
  for (const Ref& r : load) {
    const Decision d = s.decision(r);
    s.decode_done(r, now, d.decode_server == 0 ? 20 + 10.0 * 6 : 21, o);
  }
  // Now 640 cached tokens on server 0 no longer win: with 5 running it would break the SLO.
  std::vector<Ref> busy;
  for (int i = 0; i < 4; ++i) busy.push_back(run_one({640, 0}));
  const Ref c = run_one({640, 0});
  EXPECT_EQ(s.decision(c).decode_server, 1);
}

TEST(SchedulerDecode, ParallelChoosesBothWithinPairings) {
  Fixture f(make_shape(2, 2, 64));
  Options o = quiet_options();
  o.pairings.push_back({0, 1, 0b10});  // prefill 0 pairs only with decode 1
  o.pairings.push_back({1, 1, 0b01});  // prefill 1 only with decode 0
  Scheduler& s = *f.sched;
  std::uint64_t now = 1'000 * kMs;
  for (int i = 0; i < 8; ++i) {
    EnqueueRequest r = prefill_only(100 + i);
    r.mode = Mode::kParallel;
    r.decode_pool = 1;
    r.ring_key = 1000 + i * 77;
    auto e = s.enqueue(r, now, o);
    s.pass(now, o);
    const Decision d = s.decision(e.ref);
    ASSERT_EQ(d.state, State::kPrefill);
    EXPECT_EQ(d.decode_server, d.prefill_server == 0 ? 1 : 0);
    s.prefill_done(e.ref, now, true, std::nullopt, o);
    EXPECT_EQ(s.decision(e.ref).state, State::kDecode);
  }
  // Decode 0 at its limit: only prefill 0 (paired with decode 1) can take parallel work.
  s.set_limits(2, {0, 1});
  EnqueueRequest r = prefill_only(100);
  r.mode = Mode::kParallel;
  r.decode_pool = 1;
  auto e = s.enqueue(r, now, o);
  s.pass(now, o);
  const Decision d = s.decision(e.ref);
  ASSERT_EQ(d.state, State::kPrefill);
  EXPECT_EQ(d.prefill_server, 0);
  EXPECT_EQ(d.decode_server, 1);
}

// ---------------------------------------------------------------------------------------------
// Lease, reclaim, repair
// ---------------------------------------------------------------------------------------------

// A pid that certainly does not exist any more: a child that exited and was reaped.
std::int32_t dead_pid() {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  int status = 0;
  ::waitpid(child, &status, 0);
  return static_cast<std::int32_t>(child);
}

TEST(SchedulerLease, ClaimBeatStaleDeadAndRelease) {
  Fixture f(make_shape(1, 0));
  Scheduler& s = *f.sched;
  const auto self = static_cast<std::int32_t>(::getpid());
  const std::int32_t parent = static_cast<std::int32_t>(::getppid());  // alive
  bool changed = false;
  EXPECT_TRUE(s.claim_lease(parent, 100 * kMs, 500 * kMs, &changed));
  EXPECT_TRUE(changed);
  EXPECT_FALSE(s.claim_lease(self, 200 * kMs, 500 * kMs, &changed));  // alive and fresh
  s.beat_lease(parent, 300 * kMs);
  EXPECT_FALSE(s.claim_lease(self, 700 * kMs, 500 * kMs));
  EXPECT_TRUE(s.claim_lease(self, 900 * kMs, 500 * kMs, &changed));  // silent for 600 ms
  EXPECT_TRUE(changed);
  EXPECT_EQ(s.leader(), self);
  EXPECT_TRUE(s.claim_lease(self, 950 * kMs, 500 * kMs, &changed));
  EXPECT_FALSE(changed);
  EXPECT_TRUE(s.release_lease(self));
  EXPECT_EQ(s.leader(), 0);
  // A dead holder is replaced at once, however fresh its beat.
  const std::int32_t gone = dead_pid();
  ASSERT_TRUE(s.claim_lease(gone, 1000 * kMs, 500 * kMs));
  EXPECT_TRUE(s.claim_lease(self, 1000 * kMs, 500 * kMs, &changed));
  EXPECT_TRUE(changed);
  EXPECT_EQ(s.stats().leader_changes, 4u);
}

TEST(SchedulerRecovery, DeadOwnersAreReclaimedAndTheirServersFreed) {
  Fixture f(make_shape(1, 1, 64));
  Options o = quiet_options();
  Scheduler& s = *f.sched;
  std::uint64_t now = 1'000 * kMs;
  const std::int32_t gone = dead_pid();
  EnqueueRequest r = sequential(3000);
  r.owner_pid = gone;
  auto released = s.enqueue(r, now, o);
  s.pass(now, o);
  ASSERT_EQ(s.decision(released.ref).state, State::kPrefill);
  auto queued = s.enqueue(r, now, o);
  EXPECT_EQ(s.instance_stats(0, now, o).outstanding, 1u);
  EXPECT_EQ(s.reclaim_dead(now), 2u);
  EXPECT_EQ(s.instance_stats(0, now, o).outstanding, 0u);
  EXPECT_EQ(s.instance_stats(0, now, o).outstanding_tokens, 0u);
  EXPECT_EQ(s.stats().queued, 0u);
  EXPECT_EQ(s.stats().live, 0u);
  EXPECT_FALSE(s.decision(queued.ref).valid);
  // Mine survive.
  auto mine = s.enqueue(sequential(10), now, o);
  EXPECT_EQ(s.reclaim_dead(now), 0u);
  EXPECT_TRUE(s.decision(mine.ref).valid);
}

TEST(SchedulerRecovery, LockOfADeadProcessIsTakenOverAndTheStateRebuilt) {
  Fixture f(make_shape(2, 1, 64));
  Options o = quiet_options();
  Scheduler& s = *f.sched;
  std::uint64_t now = 1'000 * kMs;
  std::vector<Ref> refs;
  for (int i = 0; i < 6; ++i) refs.push_back(s.enqueue(sequential(2000), now, o).ref);
  s.pass(now, o);
  const InstanceStats before0 = s.instance_stats(0, now, o);
  const InstanceStats before1 = s.instance_stats(1, now, o);
  const Stats before = s.stats();
  // A child takes the lock, scribbles over the derived state as if killed mid-update, and dies
  // holding it.
  const pid_t child = ::fork();
  if (child == 0) {
    auto* word = const_cast<RobustLockWord*>(&s.lock_word());
    word->holder.store(static_cast<std::uint64_t>(::getpid()));
    ::_exit(0);
  }
  int status = 0;
  ::waitpid(child, &status, 0);
  ASSERT_EQ(s.lock_word().holder.load(), static_cast<std::uint64_t>(child));
  // The next call takes the lock over and repairs.
  const PassResult r = s.pass(now, o);
  EXPECT_TRUE(r.repaired);
  EXPECT_EQ(s.stats().lock_takeovers, 1u);
  EXPECT_EQ(s.stats().repairs, before.repairs + 1);
  EXPECT_EQ(s.instance_stats(0, now, o).outstanding_tokens, before0.outstanding_tokens);
  EXPECT_EQ(s.instance_stats(1, now, o).outstanding_tokens, before1.outstanding_tokens);
  EXPECT_EQ(s.stats().queued, before.queued);
  EXPECT_EQ(s.stats().live, 6u);
  // Corrupt an entry: repair frees it and keeps the rest.
  EXPECT_EQ(s.repair(), 0u);
}

// Two processes on one region: a child enqueues and waits for its decision, the parent is the
// scheduler.
TEST(SchedulerProcesses, ChildEnqueuesParentDecides) {
  Fixture f(make_shape(2, 0, 64));
  Options o = quiet_options();
  int to_parent[2];
  ASSERT_EQ(::pipe(to_parent), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    auto view = Scheduler::attach(f.region.ptr, f.region.bytes);
    if (!view) ::_exit(2);
    EnqueueRequest r = prefill_only(500);
    r.owner_pid = static_cast<std::int32_t>(::getpid());
    auto e = view->enqueue(r, steady_now_ns(), o);
    if (e.verdict != Verdict::kQueued) ::_exit(3);
    char c = 1;
    if (::write(to_parent[1], &c, 1) != 1) ::_exit(4);
    for (int i = 0; i < 5000; ++i) {
      const Decision d = view->decision(e.ref);
      if (d.state == State::kPrefill) {
        view->observe_decision_latency(steady_now_ns() - d.enqueue_ns);
        ::_exit(d.prefill_server >= 0 ? 0 : 5);
      }
      ::usleep(1000);
    }
    ::_exit(6);
  }
  char c = 0;
  ASSERT_EQ(::read(to_parent[0], &c, 1), 1);
  const PassResult r = f.sched->pass(steady_now_ns(), o);
  EXPECT_EQ(r.released, 1u);
  ASSERT_EQ(r.wake.size(), 1u);
  EXPECT_EQ(r.wake[0], static_cast<std::int32_t>(child));
  int status = 0;
  ::waitpid(child, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(f.sched->decision_latency().count.load(), 1u);
  ::close(to_parent[0]);
  ::close(to_parent[1]);
}

TEST(SchedulerHistogram, QuantilesAreWithinAQuarter) {
  Log2Histogram h{};
  h.reset();
  for (int i = 0; i < 99; ++i) h.observe(1000);  // bucket [896, 1023]
  h.observe(5'000'000);                          // ~5 ms
  EXPECT_EQ(h.count.load(), 100u);
  EXPECT_LE(h.quantile_ns(0.5), 1023u);
  EXPECT_GE(h.quantile_ns(0.5), 1000u);
  EXPECT_EQ(h.quantile_ns(1.0), 5'000'000u);  // the bucket's bound, capped at the largest seen
  EXPECT_EQ(h.max_ns.load(), 5'000'000u);
  // Every value falls in a bucket whose bounds hold it and are at most 25% apart.
  for (std::uint64_t v : {0ull, 1ull, 3ull, 4ull, 5ull, 7ull, 8ull, 9ull, 1000ull, 1023ull, 1024ull,
                          999'999ull, 1'000'000ull, (1ull << 34) - 1}) {
    const std::size_t b = Log2Histogram::bucket_of(v);
    ASSERT_LT(b + 1, Log2Histogram::kBuckets) << v;
    EXPECT_LE(v, Log2Histogram::upper_ns(b)) << v;
    if (b > 0) {
      EXPECT_GT(v, Log2Histogram::upper_ns(b - 1)) << v;
    }
    EXPECT_LE(static_cast<double>(Log2Histogram::upper_ns(b)), 1.25 * static_cast<double>(v) + 1)
        << v;
  }
  EXPECT_EQ(Log2Histogram::bucket_of(1ull << 40), Log2Histogram::kBuckets - 1);
}

}  // namespace
}  // namespace omni::sched
