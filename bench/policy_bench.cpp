// Scheduling-decision microbenchmarks (Google Benchmark): what one routing decision and one
// request's shared-state bookkeeping cost, as the pool grows (backends) and as more requests
// are in flight (tracked in the shared state).
//
//   pick/...                  make_least_outstanding_policy().pick() over a ready PoolSnapshot
//   pick_3_scorers/...        the same filters and picker with least-outstanding, queue-depth
//                             and KV-usage scorers (weights 2, 1, 1)
//   snapshot/...              the module's snapshot(): BackendState per server from SharedState
//                             (backend_outstanding, engine_load, sent_since_poll), no pick
//   snapshot_pick/...         snapshot, PoolSnapshot and pick: what the balancer does per try
//   slot_lifecycle/...        one aggregated request's slot: acquire, set_stage x7,
//                             set_backends, set_tokens, release, with K slots held elsewhere
//   prefix_keys/...           omni_proxy_policy cache_aware's per-request keys: a P-token
//                             prompt of token ids into chained 16-token block keys
//   cache_aware/...           its decision over a 262,144-entry prefix table already holding
//                             many prompts: eligibility filters, SGLang's rule (longest recorded
//                             prefix, smallest table) and recording the chosen server's keys;
//                             pools of 8, 16 and 64 servers (the rule's limit), 16k-token
//                             prompts sharing a 4k-token system prompt
//
// Every family but slot_lifecycle runs over backends = 8, 16, 64, 256, 1024 at a fixed number
// of requests in flight (inflight: 0, 1000, 10000), and reports its complexity in the number of
// backends (BigO). Time per iteration = time per decision (or per request, slot_lifecycle).
//
// Adding a benchmark: write `void bm_x(benchmark::State&, const Grid&)` using the helpers
// (make_backends, make_pool, Cluster) and add a line to kPoolBenchmarks in main().
//
// usage (about 35 s in all on the 2-core development machine; docs/benchmarks.md):
//   build/bench/policy_bench --benchmark_min_time=0.05 --benchmark_repetitions=3
//       --benchmark_report_aggregates_only=true      (one command line)
// Each aggregate has a "min" over the repetitions besides mean, median and stddev: on a shared
// machine the fastest repetition is the best estimate of the code's own cost.
// --benchmark_filter=REGEX selects families, e.g. 'pick/' or 'slot_lifecycle'.
#include <omni/block_hash.hpp>
#include <omni/lifecycle.hpp>
#include <omni/policy.hpp>
#include <omni/prefix_table.hpp>
#include <omni/shared_state.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

using namespace std::chrono_literals;

// The nginx module's shared-state shape (nginx_module/ngx_http_omni_proxy_module.cpp):
// 64 owner rows, one backend block per server a leg uses. Two workers hold slots.
constexpr std::uint32_t kModuleOwners = 64;
constexpr std::int32_t kWorkerPids[] = {4101, 4102};
constexpr std::int32_t kThisWorker = kWorkerPids[0];

// Where one benchmark of a family runs: pool size and requests in flight.
struct Grid {
  std::size_t backends = 8;
  std::uint32_t inflight = 0;
};

// splitmix64: a fixed, fast stream of request hashes (like hashes of request ids).
std::uint64_t mix(std::uint64_t x) { return omni::mix64(x + 0x9E3779B97F4A7C15ULL); }

std::string backend_name(std::size_t i) {
  return "10.0." + std::to_string(i / 250) + "." + std::to_string(i % 250 + 1) + ":8000";
}

// How `inflight` requests spread over `n` backends: the least-outstanding policy keeps them
// roughly even, so each gets inflight / n plus or minus a little (deterministic).
std::vector<std::uint32_t> spread(std::size_t n, std::uint32_t inflight, std::uint64_t seed) {
  std::vector<std::uint32_t> out(n, 0);
  std::mt19937_64 rng(seed);
  for (std::uint32_t k = 0; k < inflight; ++k) {
    // Two random choices, the less loaded wins: an even spread with some variation.
    const std::size_t a = rng() % n, b = rng() % n;
    ++out[out[a] <= out[b] ? a : b];
  }
  return out;
}

// N backends as the balancer's snapshot shows them: nginx's defaults (weight 1, max_fails 1,
// no max_conns), a few weight 2, outstanding requests spread as above, a fresh engine poll each
// (running, waiting, KV usage), and requests sent since that poll.
std::vector<omni::BackendState> make_backends(const Grid& g, std::uint64_t seed = 1) {
  std::vector<omni::BackendState> out(g.backends);
  const std::vector<std::uint32_t> outstanding = spread(g.backends, g.inflight, seed);
  std::mt19937_64 rng(seed * 7919);
  for (std::size_t i = 0; i < g.backends; ++i) {
    omni::BackendState& b = out[i];
    b.id = mix(0xB0 + i);
    b.name = backend_name(i);
    b.weight = i % 8 == 7 ? 2 : 1;
    b.max_fails = 1;
    b.outstanding = outstanding[i];
    b.active_conns = outstanding[i];
    b.load.running = std::min<std::uint32_t>(outstanding[i], 256);
    b.load.waiting = outstanding[i] > 256 ? outstanding[i] - 256 : 0;
    b.load.kv_usage = static_cast<double>(rng() % 1000) / 1000.0;
    b.load.metrics_age = std::chrono::milliseconds(rng() % 1000);
    b.load.sent_since_poll = static_cast<std::uint32_t>(rng() % 4);
  }
  return out;
}

omni::PoolSnapshot make_pool(const Grid& g, std::uint64_t seed = 1) {
  return omni::PoolSnapshot("decode", 1, make_backends(g, seed));
}

omni::Policy three_scorer_policy() {
  return omni::Policy(
      "least-outstanding+queue+kv", omni::make_eligibility_filters(),
      {{std::make_shared<omni::LeastOutstandingScorer>(), 2.0},
       {std::make_shared<omni::QueueDepthScorer>(), 1.0},
       {std::make_shared<omni::KvUsageScorer>(), 1.0}},
      std::make_shared<omni::MaxScorePicker>());
}

// One decision per iteration over a fixed snapshot; each iteration is a different request.
void run_picks(benchmark::State& state, const omni::Policy& policy, const omni::PoolSnapshot& pool) {
  const auto now = std::chrono::steady_clock::now();
  std::uint64_t n = 0;
  for (auto _ : state) {
    omni::RequestFeatures f;
    f.request_hash = mix(++n);
    omni::Pick p = policy.pick(f, pool, now);
    if (p.status != omni::PickStatus::kPicked) state.SkipWithError("no pick");
    benchmark::DoNotOptimize(p.chosen);
  }
  state.SetComplexityN(static_cast<benchmark::IterationCount>(pool.size()));
}

void bm_pick(benchmark::State& state, const Grid& g) {
  const omni::Policy policy = omni::make_least_outstanding_policy();
  run_picks(state, policy, make_pool(g));
}

void bm_pick_3_scorers(benchmark::State& state, const Grid& g) {
  const omni::Policy policy = three_scorer_policy();
  run_picks(state, policy, make_pool(g));
}

// A SharedState in a plain heap buffer, shaped like the module's: N backends in one pool,
// 64 owner rows, room for `inflight` + `spare` slots. `inflight` slots are held by the two
// workers, each assigned to a backend (spread as make_backends does) and in kPrefilling, so
// they count as outstanding; every backend has had an engine poll.
class Cluster {
 public:
  Cluster(const Grid& g, std::uint32_t spare = 1024) : grid_(g) {
    omni::SharedStateConfig c;
    c.max_slots = g.inflight + spare;
    c.max_backends = static_cast<std::uint32_t>(g.backends);
    c.max_owners = kModuleOwners;
    c.max_groups = 0;
    for (std::size_t i = 0; i < g.backends; ++i) c.backends.push_back({backend_name(i), "decode"});
    bytes_ = omni::SharedState::required_bytes(c);
    region_.reset(static_cast<char*>(std::aligned_alloc(4096, (bytes_ + 4095) / 4096 * 4096)));
    omni::OpenResult r = omni::SharedState::create(region_.get(), bytes_, c);
    if (!r.ok()) throw std::runtime_error("SharedState::create: " + r.error);
    state_ = std::move(r.state);
    const std::vector<omni::BackendState> shape = make_backends(g);
    std::uint64_t now = omni::monotonic_now_ns();
    std::uint32_t k = 0;
    for (std::size_t b = 0; b < g.backends; ++b) {
      for (std::uint32_t j = 0; j < shape[b].outstanding; ++j, ++k) {
        auto h = state_->acquire(kWorkerPids[k % 2], now, mix(k));
        if (!h) throw std::runtime_error("acquire failed while filling");
        const auto idx = static_cast<std::uint16_t>(b);
        state_->set_backends(*h, idx, idx);
        state_->set_stage(*h, omni::Stage::kPrefilling, now);
      }
    }
    for (std::size_t b = 0; b < g.backends; ++b) {
      omni::EngineLoadSample s;
      s.running = shape[b].load.running;
      s.waiting = shape[b].load.waiting;
      s.kv_usage = shape[b].load.kv_usage;
      s.polled_ns = now - static_cast<std::uint64_t>(
                              std::chrono::nanoseconds(*shape[b].load.metrics_age).count());
      state_->set_engine_load(static_cast<std::uint16_t>(b), s);
    }
  }

  omni::SharedState& state() { return *state_; }
  std::size_t bytes() const { return bytes_; }

  // The module's snapshot() (nginx_module/balancer.cpp) without nginx: the peer fields are
  // what round robin would show for an idle, healthy block.
  std::vector<omni::BackendState> snapshot() const {
    std::vector<omni::BackendState> out;
    const std::uint64_t now_ns = omni::monotonic_now_ns();
    out.reserve(grid_.backends);
    for (std::size_t i = 0; i < grid_.backends; ++i) {
      omni::BackendState b;
      b.id = mix(0xB0 + i);
      b.weight = 1;
      b.max_fails = 1;
      const auto backend = static_cast<std::uint16_t>(i);
      b.outstanding = static_cast<std::uint32_t>(state_->backend_outstanding(backend));
      if (auto load = state_->engine_load(backend)) {
        b.load.running = load->running;
        b.load.waiting = load->waiting;
        b.load.kv_usage = load->kv_usage;
        b.load.waiting_uncached_tokens = load->waiting_uncached_tokens;
        const std::uint64_t age = now_ns > load->polled_ns ? now_ns - load->polled_ns : 0;
        b.load.metrics_age = std::chrono::nanoseconds(age);
        b.load.sent_since_poll = static_cast<std::uint32_t>(state_->sent_since_poll(backend));
      }
      out.push_back(std::move(b));
    }
    return out;
  }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  Grid grid_;
  std::size_t bytes_ = 0;
  std::unique_ptr<char, Free> region_;
  std::unique_ptr<omni::SharedState> state_;
};

void bm_snapshot(benchmark::State& state, const Grid& g) {
  const Cluster cluster(g);
  for (auto _ : state) {
    std::vector<omni::BackendState> s = cluster.snapshot();
    benchmark::DoNotOptimize(s.data());
  }
  state.SetComplexityN(static_cast<benchmark::IterationCount>(g.backends));
}

// What the balancer's get does per try: snapshot, PoolSnapshot, pick (balancer.cpp pick()).
void bm_snapshot_pick(benchmark::State& state, const Grid& g) {
  const Cluster cluster(g);
  const omni::Policy policy = omni::make_least_outstanding_policy();
  std::uint64_t n = 0;
  for (auto _ : state) {
    const omni::PoolSnapshot snap("decode", 0, cluster.snapshot());
    omni::RequestFeatures f;
    f.request_hash = mix(++n);
    omni::Pick p = policy.pick(f, snap, std::chrono::steady_clock::now());
    if (p.status != omni::PickStatus::kPicked) state.SkipWithError("no pick");
    benchmark::DoNotOptimize(p.chosen);
  }
  state.SetComplexityN(static_cast<benchmark::IterationCount>(g.backends));
}

// One aggregated request's slot, as proxy_handler.cpp drives it: acquire (received), then
// tokenized, apc_matched, waiting_prefill, prefill_scheduled, set_backends, prefilling,
// decoding, set_tokens, done, release. `held` other slots stay held at random positions of a
// table of `capacity` slots (the module's 4m zone has about 21,600), so acquire's next-fit scan
// meets them.
void bm_slot_lifecycle(benchmark::State& state, std::uint32_t capacity, std::uint32_t held) {
  Grid g;
  g.backends = 8;
  g.inflight = 0;
  Cluster cluster(g, capacity);
  omni::SharedState& st = cluster.state();
  const std::uint64_t t0 = omni::monotonic_now_ns();
  std::vector<omni::SlotHandle> all;
  all.reserve(capacity);
  while (auto h = st.acquire(kWorkerPids[all.size() % 2], t0)) all.push_back(*h);
  std::mt19937_64 rng(42);
  std::shuffle(all.begin(), all.end(), rng);
  for (std::size_t i = held; i < all.size(); ++i) st.release(all[i]);
  constexpr omni::Stage kPath[] = {omni::Stage::kTokenized,        omni::Stage::kApcMatched,
                                   omni::Stage::kWaitingPrefill,   omni::Stage::kPrefillScheduled,
                                   omni::Stage::kPrefilling,       omni::Stage::kDecoding,
                                   omni::Stage::kDone};
  std::uint64_t n = 0;
  for (auto _ : state) {
    std::uint64_t now = t0 + 1000 * ++n;
    auto h = st.acquire(kThisWorker, now, n);
    if (!h) {
      state.SkipWithError("table full");
      break;
    }
    for (omni::Stage s : kPath) {
      if (s == omni::Stage::kPrefilling) {
        const auto b = static_cast<std::uint16_t>(n % g.backends);
        st.set_backends(*h, b, b);
      }
      if (s == omni::Stage::kDone) st.set_tokens(*h, 12, 0, 4);
      st.set_stage(*h, s, now += 100);
    }
    st.release(*h);
  }
  state.counters["held"] = held;
  state.counters["capacity"] = capacity;
}

// Token ids of a prompt: a shared system prompt (`system` of 64 of them) then its own tokens.
std::vector<omni::TokenId> prompt_ids(std::size_t tokens, std::uint64_t system, std::uint64_t own) {
  std::vector<omni::TokenId> ids(tokens);
  for (std::size_t i = 0; i < tokens; ++i) {
    const std::uint64_t seed = i < 4096 ? (system << 32) + i : (own << 32) + i;
    ids[i] = static_cast<omni::TokenId>(1000 + mix(seed) % 128000);
  }
  return ids;
}

void bm_prefix_keys(benchmark::State& state, std::size_t tokens) {
  const std::vector<omni::TokenId> ids = prompt_ids(tokens, 1, 2);
  omni::PrefixKeyOptions o;  // 16-token blocks, the directive's default
  for (auto _ : state) {
    omni::PrefixKeys k = omni::prefix_keys_from_ids(ids, o);
    benchmark::DoNotOptimize(k.blocks.data());
  }
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(tokens));
}

// A table the size of omni_proxy_prefix_table's default, warmed with `warm` earlier requests
// recorded by the rule itself; each iteration is one more request's decision and record.
void bm_cache_aware(benchmark::State& state, std::size_t backends) {
  constexpr std::uint64_t kEntries = 1u << 18;
  constexpr std::size_t kTokens = 16384;
  constexpr std::uint64_t kSystems = 64;
  constexpr std::size_t kWarm = 512;
  const Grid g{backends, 1000};
  const Cluster cluster(g);
  const std::size_t bytes = omni::PrefixTable::required_bytes(kEntries, 64);
  std::vector<std::uint64_t> region((bytes + 7) / 8);
  auto table = omni::PrefixTable::create(region.data(), bytes, kEntries, 64);
  const auto filters = omni::make_eligibility_filters();
  const omni::CacheAwareOptions options;
  // Keys of a rotation of requests, built outside the timed loop (the module builds them once
  // per request, before its legs; prefix_keys/ times that).
  std::vector<omni::PrefixKeys> requests;
  for (std::size_t r = 0; r < 64; ++r) {
    requests.push_back(omni::prefix_keys_from_ids(
        prompt_ids(kTokens, mix(r) % kSystems, 1'000'000 + r), omni::PrefixKeyOptions{}));
  }
  std::uint64_t n = 0;
  auto decide = [&](const omni::PrefixKeys& keys) {
    const omni::PoolSnapshot snap("prefill", 0, cluster.snapshot());
    omni::RequestFeatures f;
    f.request_hash = mix(++n);
    std::vector<std::size_t> candidates(snap.size());
    std::iota(candidates.begin(), candidates.end(), std::size_t{0});
    std::vector<omni::Rejection> rejected;
    const omni::PickContext ctx{f, snap, std::chrono::steady_clock::now()};
    for (const auto& filter : filters) filter->filter(ctx, candidates, rejected);
    const auto d = omni::cache_aware_choose(snap, candidates, table.get(), keys, 7, 0, options,
                                            omni::pick_seed(f.request_hash));
    table->insert(keys.blocks, 7, static_cast<unsigned>(d->chosen),
                  static_cast<std::uint32_t>(d->chosen));
    return d->chosen;
  };
  for (std::size_t w = 0; w < kWarm; ++w) {
    decide(omni::prefix_keys_from_ids(prompt_ids(kTokens, mix(w + 99) % kSystems, w),
                                      omni::PrefixKeyOptions{}));
  }
  std::size_t i = 0;
  for (auto _ : state) benchmark::DoNotOptimize(decide(requests[i++ % requests.size()]));
  state.counters["table_used"] = static_cast<double>(table->stats().used);
}

double min_of(const std::vector<double>& v) {
  return v.empty() ? 0.0 : *std::min_element(v.begin(), v.end());
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;

  // Families over the pool grid: name, function. Each is registered once per in-flight level,
  // over every pool size, with a BigO fit in the number of backends.
  struct PoolBenchmark {
    const char* name;
    void (*fn)(benchmark::State&, const Grid&);
  };
  const PoolBenchmark kPoolBenchmarks[] = {
      {"pick", bm_pick},
      {"pick_3_scorers", bm_pick_3_scorers},
      {"snapshot", bm_snapshot},
      {"snapshot_pick", bm_snapshot_pick},
  };
  const std::size_t kBackends[] = {8, 16, 64, 256, 1024};
  const std::uint32_t kInflight[] = {0, 1000, 10000};
  for (const PoolBenchmark& pb : kPoolBenchmarks) {
    for (std::uint32_t inflight : kInflight) {
      const std::string name = std::string(pb.name) + "/inflight:" + std::to_string(inflight);
      auto* b = benchmark::RegisterBenchmark(name.c_str(), [pb, inflight](benchmark::State& s) {
        pb.fn(s, Grid{static_cast<std::size_t>(s.range(0)), inflight});
      });
      for (std::size_t n : kBackends) b->Arg(static_cast<std::int64_t>(n));
      b->ArgName("backends")->Complexity(benchmark::oN)->Unit(benchmark::kNanosecond);
      b->ComputeStatistics("min", min_of);
    }
  }

  // Slot table of the module's 4m zone; held slots: none, 1k, 10k, and 95% full.
  constexpr std::uint32_t kCapacity = 21'600;
  for (std::uint32_t held : {0u, 1'000u, 10'000u, kCapacity / 20 * 19}) {
    const std::string name = "slot_lifecycle/held:" + std::to_string(held);
    benchmark::RegisterBenchmark(name.c_str(), [held](benchmark::State& s) {
      bm_slot_lifecycle(s, kCapacity, held);
    })->Unit(benchmark::kNanosecond)->ComputeStatistics("min", min_of);
  }

  for (std::size_t tokens : {1024u, 16384u}) {
    const std::string name = "prefix_keys/prompt:" + std::to_string(tokens);
    benchmark::RegisterBenchmark(name.c_str(), [tokens](benchmark::State& s) {
      bm_prefix_keys(s, tokens);
    })->Unit(benchmark::kNanosecond)->ComputeStatistics("min", min_of);
  }
  for (std::size_t backends : {8u, 16u, 64u}) {
    const std::string name = "cache_aware/prompt:16384/backends:" + std::to_string(backends);
    benchmark::RegisterBenchmark(name.c_str(), [backends](benchmark::State& s) {
      bm_cache_aware(s, backends);
    })->Unit(benchmark::kMicrosecond)->ComputeStatistics("min", min_of);
  }

  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
