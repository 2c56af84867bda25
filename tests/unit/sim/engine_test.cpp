#include "engine.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace omni::sim {
namespace {

// The "fast" profile shrunk so tests exercise chunking, limits and eviction with a few tokens:
// 4-token blocks, a 16-token step budget, no jitter.
Profile small_profile() {
  Profile p = builtin_profile("fast");
  p.jitter_cv = 0.0;
  p.block_size = 4;
  p.num_blocks = 64;
  p.max_num_seqs = 8;
  p.max_num_batched_tokens = 16;
  p.max_model_len = 256;
  return p;
}

std::vector<TokenId> seq(std::size_t n, TokenId first) {
  std::vector<TokenId> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = first + static_cast<TokenId>(i);
  return v;
}

std::vector<TokenId> concat(std::vector<TokenId> a, const std::vector<TokenId>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

std::uint32_t ceil_div(std::uint32_t a, std::uint32_t b) {
  return (a + b - 1) / b;
}

// What the callbacks of one request saw.
struct Record {
  std::vector<TokenId> outputs;
  int finishes = 0;
  FinishReason reason = FinishReason::kAbort;
  std::string error;
};

struct Item {
  RequestPtr r;
  Record rec;
};

// Drives an engine the way the instance does (schedule, wait the step time, complete) and
// checks invariants on every step:
//  - every scheduled token is accounted in the StepWork as a prefill token or a decode;
//  - a step never exceeds the token budget or the sequence limit;
//  - a request never has computed more tokens than its blocks hold.
class Harness {
 public:
  using SampleFn = std::function<TokenId(SeqRequest&)>;

  explicit Harness(const Profile& p, HashAlgo algo = HashAlgo::kFast64, SampleFn sample = {})
      : profile(p), timing(p, 1), engine(p, algo, make_hooks(std::move(sample))) {}

  Item& make(std::vector<TokenId> prompt, std::uint32_t max_out) {
    Item& it = items.emplace_back();
    it.r = std::make_shared<SeqRequest>();
    it.r->request_id = "req-" + std::to_string(items.size() - 1);
    it.r->tokens = std::move(prompt);
    it.r->max_output_tokens = max_out;
    Record* rec = &it.rec;
    it.r->on_token = [rec](SeqRequest&, TokenId t) {
      EXPECT_EQ(rec->finishes, 0) << "token after finish";
      rec->outputs.push_back(t);
    };
    it.r->on_finish = [rec](SeqRequest&, FinishReason why, const std::string& e) {
      rec->finishes++;
      rec->reason = why;
      rec->error = e;
    };
    return it;
  }
  std::string add(Item& it) { return engine.add(it.r, now); }
  Item& submit(std::vector<TokenId> prompt, std::uint32_t max_out) {
    Item& it = make(std::move(prompt), max_out);
    EXPECT_EQ(add(it), "");
    return it;
  }
  // Another sample of parent's prompt (n > 1); add the parent afterwards.
  Item& fork_of(Item& parent, std::uint32_t max_out) {
    Item& f = make({}, max_out);
    f.r->request_id = "fork-" + std::to_string(parent.r->forks.size() + 1) + "-of-" +
                      parent.r->request_id;
    parent.r->forks.push_back(f.r);
    return f;
  }

  // One engine step; false when there was nothing to compute.
  bool step() {
    const StepWork work = engine.schedule(now);
    if (!engine.step_planned()) {
      EXPECT_TRUE(work.empty());
      collect_events();
      return false;
    }
    std::vector<std::uint32_t> before;
    for (const auto& it : items) before.push_back(it.r->num_computed);
    now += timing.step_ms(work);
    engine.complete_step(now);
    std::uint64_t scheduled = 0;
    auto& step_chunks = chunks.emplace_back();
    for (std::size_t i = 0; i < items.size(); ++i) {
      EXPECT_GE(items[i].r->num_computed, before[i]);
      std::uint32_t n = items[i].r->num_computed - before[i];
      // A fork takes over its parent's computed prompt without computing it.
      if (before[i] == 0 && items[i].r->num_forked_tokens > 0 && forked.insert(i).second) {
        EXPECT_EQ(n, items[i].r->num_forked_tokens);
        n -= items[i].r->num_forked_tokens;
      }
      if (n > 0) step_chunks.push_back({i, before[i], n});
      scheduled += n;
    }
    EXPECT_EQ(work.prefill_tokens + work.decode_seqs, scheduled)
        << "scheduled tokens not accounted in the step's work, step " << works.size();
    EXPECT_LE(scheduled, profile.max_num_batched_tokens);
    EXPECT_LE(work.decode_seqs, profile.max_num_seqs);
    for (const auto& it : items) {
      if (it.r->finished) continue;
      EXPECT_GE(it.r->blocks.size() * profile.block_size, it.r->num_computed)
          << it.r->request_id << " computed more tokens than its blocks hold";
    }
    works.push_back(work);
    collect_events();
    return true;
  }

  // Steps until the engine is idle; returns the number of steps.
  int run(int max_steps = 10000) {
    int n = 0;
    while (step()) {
      if (++n >= max_steps) {
        ADD_FAILURE() << "engine did not go idle";
        break;
      }
    }
    return n;
  }

  void collect_events() {
    for (auto& e : engine.take_events()) events.push_back(std::move(e));
  }
  std::vector<kv::BlockStored> stored() const {
    std::vector<kv::BlockStored> out;
    for (const auto& e : events) {
      if (const auto* s = std::get_if<kv::BlockStored>(&e)) out.push_back(*s);
    }
    return out;
  }
  bool all_blocks_free() const { return engine.pool().num_free() == engine.pool().num_blocks(); }

  // Tokens [start, start + n) of items[item] were computed in a step.
  struct Chunk {
    std::size_t item;
    std::uint32_t start, n;
  };

  Profile profile;
  TimingModel timing;
  std::deque<Item> items;  // stable addresses
  std::vector<StepWork> works;
  std::vector<std::vector<Chunk>> chunks;  // per step
  std::vector<kv::Event> events;
  std::vector<std::uint64_t> loads;  // ids passed to Hooks::start_kv_load
  std::set<std::size_t> forked;      // items whose forked prompt was discounted
  double now = 0;
  Engine engine;  // last: its hooks refer to the members above

 private:
  Engine::Hooks make_hooks(SampleFn sample) {
    Engine::Hooks h;
    const std::uint32_t bs = profile.block_size;
    h.sample = [bs, sample = std::move(sample)](SeqRequest& r) -> TokenId {
      EXPECT_GE(r.blocks.size() * bs, r.num_computed)
          << r.request_id << " sampled without the KV of its tokens";
      EXPECT_EQ(r.num_computed, r.tokens.size());
      return sample ? sample(r) : static_cast<TokenId>(1000 + r.num_output_tokens());
    };
    h.start_kv_load = [this](SeqRequest& r) { loads.push_back(r.id); };
    return h;
  }
};

std::vector<TokenId> expected_outputs(std::uint32_t n) {
  return seq(n, 1000);
}

// ---------------------------------------------------------------------------------------------
// Prefix caching
// ---------------------------------------------------------------------------------------------

TEST(Engine, SecondIdenticalPromptHitsTheCachedPrefix) {
  // block size 4: the hit is the full blocks before the last prompt token.
  struct Case {
    std::uint32_t len, expected_hit;
  };
  const std::vector<Case> cases = {{1, 0}, {3, 0},   {4, 0},   {5, 4},   {8, 4},
                                   {9, 8}, {23, 20}, {24, 20}, {40, 36}, {61, 60}};
  for (const auto& c : cases) {
    SCOPED_TRACE("len=" + std::to_string(c.len));
    Harness h(small_profile());
    const auto prompt = seq(c.len, 500);
    Item& first = h.submit(prompt, 2);
    h.run();
    EXPECT_EQ(first.r->num_cached_tokens, 0u);
    const std::size_t steps_before = h.works.size();

    Item& second = h.submit(prompt, 2);
    h.run();
    EXPECT_EQ(second.r->num_cached_tokens, c.expected_hit);
    EXPECT_EQ(c.expected_hit, (c.len - 1) / 4 * 4);
    EXPECT_EQ(h.engine.stats().prefix_cache_queries, 2u * c.len);
    EXPECT_EQ(h.engine.stats().prefix_cache_hits, c.expected_hit);
    // Only the uncached tokens are computed.
    std::uint64_t prefill = 0;
    for (std::size_t i = steps_before; i < h.works.size(); ++i)
      prefill += h.works[i].prefill_tokens;
    EXPECT_EQ(prefill, c.len - c.expected_hit);
    EXPECT_EQ(second.rec.outputs, expected_outputs(2));
  }
}

TEST(Engine, BlockStoredEventsCoverTheFullPromptBlocks) {
  struct Case {
    std::uint32_t len;
    HashAlgo algo;
  };
  const std::vector<Case> cases = {{3, HashAlgo::kFast64},  {4, HashAlgo::kFast64},
                                   {16, HashAlgo::kFast64}, {37, HashAlgo::kFast64},
                                   {37, HashAlgo::kSha256}, {8, HashAlgo::kSha256}};
  for (const auto& c : cases) {
    SCOPED_TRACE("len=" + std::to_string(c.len) +
                 (c.algo == HashAlgo::kSha256 ? " sha256" : " fast64"));
    Harness h(small_profile(), c.algo);
    const auto prompt = seq(c.len, 7);
    h.submit(prompt, 1);  // one output token: only prompt tokens are ever computed
    h.run();

    const std::uint32_t full = c.len / 4;
    std::vector<kv::ExternalHash> expected_hashes;
    if (c.algo == HashAlgo::kFast64) {
      for (auto k : hash_blocks64(prompt, 4))
        expected_hashes.push_back(kv::ExternalHash::from_int(k));
    } else {
      for (const auto& d : hash_blocks_sha256(prompt, 4)) {
        expected_hashes.push_back(kv::ExternalHash::from_bytes(std::string(d.begin(), d.end())));
      }
    }
    ASSERT_EQ(expected_hashes.size(), full);

    const auto stored = h.stored();
    std::vector<kv::ExternalHash> hashes;
    std::vector<std::uint32_t> tokens;
    for (std::size_t i = 0; i < stored.size(); ++i) {
      const auto& ev = stored[i];
      EXPECT_EQ(ev.block_size, 4u);
      EXPECT_EQ(ev.token_ids.size(), ev.block_hashes.size() * 4);
      if (i == 0) {
        EXPECT_FALSE(ev.parent_block_hash.has_value()) << "block 0 has no parent";
      } else {
        EXPECT_EQ(ev.parent_block_hash, hashes.back()) << "event " << i << " continues the chain";
      }
      hashes.insert(hashes.end(), ev.block_hashes.begin(), ev.block_hashes.end());
      tokens.insert(tokens.end(), ev.token_ids.begin(), ev.token_ids.end());
    }
    EXPECT_EQ(hashes, expected_hashes);
    EXPECT_EQ(tokens, std::vector<std::uint32_t>(prompt.begin(), prompt.begin() + full * 4));
    EXPECT_EQ(h.events.size(), stored.size()) << "no removals or clears expected";
    // A 16-token budget prefills a 37-token prompt in 3 chunks, one event per chunk.
    if (c.len == 37) {
      EXPECT_EQ(stored.size(), 3u);
    }
    if (c.len <= 16) {
      EXPECT_EQ(stored.size(), full == 0 ? 0u : 1u);
    }
  }
}

TEST(Engine, ResetPrefixCacheForgetsCachedPrompts) {
  Harness h(small_profile());
  const auto prompt = seq(20, 1);
  h.submit(prompt, 1);
  h.run();
  h.engine.reset_prefix_cache();
  h.collect_events();
  ASSERT_FALSE(h.events.empty());
  EXPECT_TRUE(std::holds_alternative<kv::AllBlocksCleared>(h.events.back()));
  Item& again = h.submit(prompt, 1);
  h.run();
  EXPECT_EQ(again.r->num_cached_tokens, 0u);
}

// ---------------------------------------------------------------------------------------------
// Scheduling limits
// ---------------------------------------------------------------------------------------------

TEST(Engine, ChunkedPrefillRespectsTheTokenBudget) {
  // budget 16: steps before the first token = ceil(len / 16).
  for (std::uint32_t len : {1u, 15u, 16u, 17u, 32u, 33u, 100u}) {
    SCOPED_TRACE("len=" + std::to_string(len));
    Harness h(small_profile());
    Item& it = h.submit(seq(len, 3), 3);
    int steps = 0;
    while (it.rec.outputs.empty()) {
      ASSERT_TRUE(h.step());
      ++steps;
    }
    EXPECT_EQ(steps, static_cast<int>(ceil_div(len, 16)));
    std::uint64_t prefill = 0;
    double pairs = 0;
    for (const auto& w : h.works) {
      EXPECT_LE(w.prefill_tokens, 16u);
      EXPECT_EQ(w.decode_seqs, 0u);
      prefill += w.prefill_tokens;
      pairs += w.attention_pairs;
    }
    EXPECT_EQ(prefill, len);
    // Chunks attend to the context computed before them.
    EXPECT_DOUBLE_EQ(pairs, attention_pairs(0, len));
    EXPECT_EQ(it.r->first_token_ms, h.now);
    h.run();
    EXPECT_EQ(it.rec.outputs, expected_outputs(3));
  }
}

TEST(Engine, DecodesAreOneTokenPerStep) {
  Harness h(small_profile());
  Item& it = h.submit(seq(10, 3), 5);
  h.run();
  ASSERT_EQ(h.works.size(), 5u);  // 1 prefill step + 4 decode steps
  EXPECT_EQ(h.works[0].prefill_tokens, 10u);
  for (std::size_t i = 1; i < h.works.size(); ++i) {
    EXPECT_EQ(h.works[i].prefill_tokens, 0u);
    EXPECT_EQ(h.works[i].decode_seqs, 1u);
    EXPECT_EQ(h.works[i].decode_kv_tokens, 10u + i - 1) << "context before the new token";
  }
  EXPECT_EQ(it.rec.outputs, expected_outputs(5));
  EXPECT_EQ(it.rec.finishes, 1);
  EXPECT_EQ(it.rec.reason, FinishReason::kLength);
  EXPECT_EQ(h.engine.stats().generation_tokens, 5u);
  EXPECT_EQ(h.engine.stats().requests_finished, 1u);
  EXPECT_TRUE(h.all_blocks_free());
}

TEST(Engine, ReasonAtLimitIsReported) {
  Harness h(small_profile());
  Item& it = h.make(seq(5, 3), 2);
  it.r->reason_at_limit = FinishReason::kStop;
  ASSERT_EQ(h.add(it), "");
  h.run();
  EXPECT_EQ(it.rec.reason, FinishReason::kStop);
  EXPECT_STREQ(to_string(FinishReason::kStop), "stop");
  EXPECT_STREQ(to_string(FinishReason::kLength), "length");
}

TEST(Engine, MaxNumSeqsIsRespected) {
  Profile p = small_profile();
  p.max_num_seqs = 3;
  Harness h(p);
  for (TokenId i = 0; i < 7; ++i) h.submit(seq(3, 100 * (i + 1)), 5);
  EXPECT_EQ(h.engine.num_waiting(), 7u);
  ASSERT_TRUE(h.step());
  EXPECT_EQ(h.engine.num_running(), 3u);
  EXPECT_EQ(h.engine.num_waiting(), 4u);
  std::size_t max_running = 0;
  while (h.step()) {
    max_running = std::max(max_running, h.engine.num_running());
    EXPECT_LE(h.engine.num_running(), 3u);
  }
  EXPECT_EQ(max_running, 3u);
  for (const auto& it : h.items) EXPECT_EQ(it.rec.outputs, expected_outputs(5));
  EXPECT_EQ(h.engine.num_running(), 0u);
  EXPECT_EQ(h.engine.num_waiting(), 0u);
}

TEST(Engine, PreemptionUnderBlockPressureStillFinishesEveryRequest) {
  // 16 blocks of 4 tokens; four requests of 8 + 24 tokens need 8 blocks each.
  Profile p = small_profile();
  p.num_blocks = 16;
  Harness h(p);
  for (TokenId i = 0; i < 4; ++i) h.submit(seq(8, 100 * (i + 1)), 24);
  h.run();
  EXPECT_GT(h.engine.stats().preemptions, 0u);
  std::uint64_t preemptions = 0;
  for (const auto& it : h.items) {
    SCOPED_TRACE(it.r->request_id);
    EXPECT_EQ(it.rec.finishes, 1);
    EXPECT_EQ(it.rec.reason, FinishReason::kLength);
    EXPECT_EQ(it.rec.outputs, expected_outputs(24));  // no token lost or repeated
    EXPECT_EQ(it.r->num_output_tokens(), 24u);
    EXPECT_TRUE(it.r->blocks.empty());
    preemptions += it.r->num_preemptions;
  }
  EXPECT_EQ(preemptions, h.engine.stats().preemptions);
  EXPECT_EQ(h.engine.stats().generation_tokens, 4u * 24u);
  EXPECT_EQ(h.engine.stats().requests_finished, 4u);
  EXPECT_EQ(h.engine.num_running(), 0u);
  EXPECT_EQ(h.engine.num_waiting(), 0u);
  EXPECT_TRUE(h.all_blocks_free()) << h.engine.pool().num_free();
  EXPECT_EQ(h.engine.num_used_tokens(), 0u);
}

TEST(Engine, RecomputedOutputTokensArePrefillWork) {
  // Two requests share 6 blocks; one is preempted after generating output and readmitted
  // with a cached prefix longer than its prompt. Recomputing its output tokens is prefill
  // work (a chunk of several tokens), not one decode.
  Profile p = small_profile();
  p.num_blocks = 6;
  p.max_model_len = 24;
  Harness h(p);
  Item& a = h.submit(seq(4, 100), 16);
  Item& b = h.submit(seq(4, 200), 16);
  h.run();
  EXPECT_GT(b.r->num_preemptions + a.r->num_preemptions, 0u);
  EXPECT_EQ(a.rec.outputs, expected_outputs(16));
  EXPECT_EQ(b.rec.outputs, expected_outputs(16));
  EXPECT_TRUE(h.all_blocks_free());

  // Find the recomputation chunks that start past the 4-token prompt.
  int past_prompt = 0;
  for (std::size_t s = 0; s < h.chunks.size(); ++s) {
    std::uint64_t multi_token = 0;
    for (const auto& c : h.chunks[s]) {
      if (c.n > 1) multi_token += c.n;
      if (c.start >= 4 && c.n > 1) ++past_prompt;
    }
    EXPECT_GE(h.works[s].prefill_tokens, multi_token) << "step " << s;
  }
  EXPECT_GT(past_prompt, 0) << "the scenario no longer recomputes past the prompt";
}

// A prefix hit on evictable cached blocks takes those blocks off the free list, so admission
// must count them against the free blocks, as vLLM does (num_evictable_computed_blocks).
TEST(Engine, AdmissionCountsEvictablePrefixHitsAgainstFreeBlocks) {
  for (bool remote : {false, true}) {
    SCOPED_TRACE(remote ? "remote kv load" : "local prefill");
    Profile p = small_profile();
    p.num_blocks = 8;
    p.max_num_batched_tokens = 64;
    p.max_model_len = 32;
    Harness h(p);
    const auto shared = seq(8, 10);
    // A caches two blocks of `shared` and frees them (evictable).
    h.submit(concat(shared, {900}), 1);
    h.run();
    ASSERT_EQ(h.engine.pool().num_cached(), 2u);
    // B takes the 6 never-cached blocks over two steps, leaving only the 2 evictable ones.
    Item& b = h.submit(seq(20, 300), 12);
    ASSERT_TRUE(h.step());
    // C would hit both cached blocks and needs 2 more: 4 blocks from a pool of 2 free.
    Item& c = h.make(concat(shared, seq(5, 901)), 1);
    std::size_t blocks_at_load = 0;
    if (remote) {
      c.r->remote_kv_load = true;
      c.r->start_kv_load = [&](SeqRequest& r) { blocks_at_load = r.blocks.size(); };
    }
    ASSERT_EQ(h.add(c), "");
    ASSERT_TRUE(h.step());
    EXPECT_FALSE(c.r->admitted_once) << "admitted with " << c.r->blocks.size() << " blocks";
    EXPECT_TRUE(c.rec.outputs.empty());
    EXPECT_EQ(h.engine.pool().num_free(), 2u);
    // Everything still completes once B is done.
    for (int i = 0; i < 100 && (c.rec.finishes == 0 || b.rec.finishes == 0); ++i) {
      if (remote && blocks_at_load > 0 && h.engine.num_waiting() > 0 &&
          h.engine.num_running() == 0) {
        EXPECT_EQ(blocks_at_load, 4u);
        h.engine.kv_load_done(c.r->id, true, false, "", h.now);
      }
      h.step();
    }
    EXPECT_EQ(b.rec.outputs, expected_outputs(12));
    EXPECT_EQ(c.rec.outputs, expected_outputs(1));
    if (remote) {
      EXPECT_EQ(blocks_at_load, 4u);
    }
    EXPECT_TRUE(h.all_blocks_free());
  }
}

// ---------------------------------------------------------------------------------------------
// P/D: remote KV load and held blocks
// ---------------------------------------------------------------------------------------------

struct RemoteCase {
  const char* name;
  bool warm;  // a previous request cached the first 3 blocks of the prompt locally
};

class RemoteKvLoad : public ::testing::TestWithParam<RemoteCase> {
 protected:
  static constexpr std::uint32_t kLen = 22;  // 6 blocks of 4

  void SetUp() override {
    if (GetParam().warm) {
      h.submit(std::vector<TokenId>(prompt.begin(), prompt.begin() + 13), 1);
      h.run();
      ASSERT_EQ(h.engine.pool().num_cached(), 3u);
    }
    hit_blocks = GetParam().warm ? 3 : 0;
    steps_before = h.works.size();
    Item& it = h.make(prompt, 3);
    it.r->remote_kv_load = true;
    it.r->start_kv_load = [this](SeqRequest& r) {
      ++load_calls;
      remote_blocks_at_start = r.num_remote_blocks;
      blocks_at_start = r.blocks.size();
    };
    ASSERT_EQ(h.add(it), "");
    item = &it;
    // Admission starts the load and computes nothing.
    EXPECT_FALSE(h.step());
    EXPECT_EQ(load_calls, 1);
  }

  std::uint64_t prefill_since_load() const {
    std::uint64_t n = 0;
    for (std::size_t i = steps_before; i < h.works.size(); ++i) n += h.works[i].prefill_tokens;
    return n;
  }

  Harness h{small_profile()};
  const std::vector<TokenId> prompt = seq(kLen, 40);
  Item* item = nullptr;
  std::uint32_t hit_blocks = 0;
  std::size_t steps_before = 0;
  int load_calls = 0;
  std::uint32_t remote_blocks_at_start = 0;
  std::size_t blocks_at_start = 0;
};

TEST_P(RemoteKvLoad, StartsWithTheBlocksNotCachedLocally) {
  EXPECT_EQ(remote_blocks_at_start, 6u - hit_blocks);
  EXPECT_EQ(blocks_at_start, 6u);
  EXPECT_EQ(item->r->num_cached_tokens, hit_blocks * 4);
  EXPECT_TRUE(h.loads.empty()) << "the request's own start_kv_load wins over the hook";
  // Waiting for the KV: no token, however long.
  for (int i = 0; i < 3; ++i) EXPECT_FALSE(h.step());
  EXPECT_TRUE(item->rec.outputs.empty());
  EXPECT_EQ(h.engine.num_waiting(), 1u);
  EXPECT_EQ(h.engine.num_running(), 0u);
}

TEST_P(RemoteKvLoad, FirstTokenOneStepAfterTheLoad) {
  h.engine.kv_load_done(item->r->id, true, false, "", h.now);
  ASSERT_TRUE(h.step());
  EXPECT_EQ(item->rec.outputs, expected_outputs(1));
  EXPECT_EQ(h.works.back().prefill_tokens, 1u) << "only the last prompt token is computed";
  h.run();
  EXPECT_EQ(item->rec.outputs, expected_outputs(3));
  EXPECT_EQ(item->rec.reason, FinishReason::kLength);
  EXPECT_EQ(prefill_since_load(), 1u);
  // The loaded blocks are cached now: every full prompt block is findable.
  Item& again = h.submit(prompt, 1);
  h.run();
  EXPECT_EQ(again.r->num_cached_tokens, (kLen - 1) / 4 * 4);
  EXPECT_TRUE(h.all_blocks_free());
}

TEST_P(RemoteKvLoad, FailureWithoutRecomputeFailsTheRequest) {
  h.engine.kv_load_done(item->r->id, false, false, "transfer failed", h.now);
  EXPECT_EQ(item->rec.finishes, 1);
  EXPECT_EQ(item->rec.reason, FinishReason::kError);
  EXPECT_EQ(item->rec.error, "transfer failed");
  EXPECT_TRUE(item->rec.outputs.empty());
  EXPECT_TRUE(item->r->blocks.empty());
  EXPECT_TRUE(h.all_blocks_free());
  EXPECT_EQ(h.engine.stats().requests_failed, 1u);
  EXPECT_EQ(h.engine.num_waiting(), 0u);
  EXPECT_FALSE(h.step());
}

TEST_P(RemoteKvLoad, FailureWithRecomputePrefillsLocally) {
  h.engine.kv_load_done(item->r->id, false, true, "transfer failed", h.now);
  EXPECT_EQ(item->rec.finishes, 0);
  h.run();
  EXPECT_EQ(item->rec.outputs, expected_outputs(3));
  EXPECT_EQ(item->rec.reason, FinishReason::kLength);
  EXPECT_EQ(prefill_since_load(), kLen - hit_blocks * 4);
  EXPECT_EQ(h.engine.stats().requests_failed, 0u);
  EXPECT_TRUE(h.all_blocks_free());
}

TEST_P(RemoteKvLoad, AbortWhileLoadingReleasesBlocks) {
  h.engine.abort(item->r->id);
  EXPECT_TRUE(h.all_blocks_free());
  EXPECT_EQ(h.engine.num_waiting(), 0u);
  // A late completion of the aborted load is ignored.
  h.engine.kv_load_done(item->r->id, true, false, "", h.now);
  EXPECT_FALSE(h.step());
  EXPECT_EQ(item->rec.finishes, 0);
  EXPECT_TRUE(item->rec.outputs.empty());
  EXPECT_EQ(h.engine.stats().requests_aborted, 1u);
}

INSTANTIATE_TEST_SUITE_P(Engine, RemoteKvLoad,
                         ::testing::Values(RemoteCase{"cold", false}, RemoteCase{"warm", true}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(Engine, RemoteKvLoadFallsBackToTheHook) {
  Harness h(small_profile());
  Item& it = h.make(seq(10, 1), 2);
  it.r->remote_kv_load = true;
  ASSERT_EQ(h.add(it), "");
  EXPECT_FALSE(h.step());
  EXPECT_EQ(h.loads, std::vector<std::uint64_t>{it.r->id});
  h.engine.kv_load_done(it.r->id, true, false, "", h.now);
  h.run();
  EXPECT_EQ(it.rec.outputs, expected_outputs(2));
}

TEST(Engine, HeldBlocksStayReferencedUntilReleased) {
  Harness h(small_profile());
  Item& it = h.make(seq(10, 1), 2);
  it.r->hold_blocks_after_finish = true;
  ASSERT_EQ(h.add(it), "");
  h.run();
  EXPECT_EQ(it.rec.finishes, 1);
  EXPECT_EQ(it.rec.reason, FinishReason::kLength);
  EXPECT_EQ(h.engine.num_held(), 1u);
  ASSERT_EQ(h.engine.find_held(it.r->id), it.r.get());
  EXPECT_EQ(it.r->blocks.size(), 3u);  // 11 computed tokens
  EXPECT_EQ(h.engine.pool().num_free(), h.engine.pool().num_blocks() - 3);
  for (auto b : it.r->blocks) EXPECT_EQ(h.engine.pool().ref_count(b), 1u);

  EXPECT_TRUE(h.engine.release_held(it.r->id));
  EXPECT_TRUE(h.all_blocks_free());
  EXPECT_EQ(h.engine.num_held(), 0u);
  EXPECT_EQ(h.engine.find_held(it.r->id), nullptr);
  EXPECT_FALSE(h.engine.release_held(it.r->id));
  EXPECT_FALSE(h.engine.release_held(12345));
}

TEST(Engine, AbortOfAHeldRequestReleasesIt) {
  Harness h(small_profile());
  Item& it = h.make(seq(10, 1), 2);
  it.r->hold_blocks_after_finish = true;
  ASSERT_EQ(h.add(it), "");
  h.run();
  ASSERT_EQ(h.engine.num_held(), 1u);
  h.engine.abort(it.r->id);
  EXPECT_EQ(h.engine.num_held(), 0u);
  EXPECT_TRUE(h.all_blocks_free());
}

TEST(Engine, FailedRequestsAreNotHeld) {
  Harness h(small_profile());
  Item& it = h.make(seq(10, 1), 2);
  it.r->hold_blocks_after_finish = true;
  it.r->remote_kv_load = true;
  ASSERT_EQ(h.add(it), "");
  EXPECT_FALSE(h.step());
  h.engine.kv_load_done(it.r->id, false, false, "boom", h.now);
  EXPECT_EQ(it.rec.reason, FinishReason::kError);
  EXPECT_EQ(h.engine.num_held(), 0u);
  EXPECT_TRUE(h.all_blocks_free());
}

// ---------------------------------------------------------------------------------------------
// Abort
// ---------------------------------------------------------------------------------------------

TEST(Engine, AbortReleasesBlocksAndFiresNoCallback) {
  enum class When { kWaiting, kRunningBetweenSteps, kRunningMidStep, kPrefillMidStep };
  for (When when :
       {When::kWaiting, When::kRunningBetweenSteps, When::kRunningMidStep, When::kPrefillMidStep}) {
    SCOPED_TRACE(static_cast<int>(when));
    Harness h(small_profile());
    Item& other = h.submit(seq(6, 900), 4);
    Item& victim = h.submit(seq(40, 1), 8);  // prefilled over 3 steps
    switch (when) {
      case When::kWaiting:
        h.engine.abort(victim.r->id);
        break;
      case When::kRunningBetweenSteps:
        for (int i = 0; i < 4; ++i) ASSERT_TRUE(h.step());
        ASSERT_FALSE(victim.rec.outputs.empty());
        h.engine.abort(victim.r->id);
        break;
      case When::kRunningMidStep:
      case When::kPrefillMidStep: {
        const int warm = when == When::kRunningMidStep ? 4 : 1;
        for (int i = 0; i < warm; ++i) ASSERT_TRUE(h.step());
        const StepWork w = h.engine.schedule(h.now);
        ASSERT_FALSE(w.empty());
        h.engine.abort(victim.r->id);
        h.engine.complete_step(h.now + 1);
        h.collect_events();
        break;
      }
    }
    const auto outputs_at_abort = victim.rec.outputs;
    EXPECT_TRUE(victim.r->finished);
    EXPECT_TRUE(victim.r->blocks.empty());
    h.run();
    EXPECT_EQ(victim.rec.finishes, 0);
    EXPECT_EQ(victim.rec.outputs, outputs_at_abort);
    EXPECT_EQ(other.rec.outputs, expected_outputs(4));
    EXPECT_EQ(h.engine.stats().requests_aborted, 1u);
    EXPECT_EQ(h.engine.stats().requests_finished, 1u);
    EXPECT_TRUE(h.all_blocks_free());
  }
}

TEST(Engine, AbortOfAnUnknownIdIsHarmless) {
  Harness h(small_profile());
  Item& it = h.submit(seq(6, 1), 2);
  h.engine.abort(999);
  h.run();
  EXPECT_EQ(it.rec.outputs, expected_outputs(2));
  EXPECT_EQ(h.engine.stats().requests_aborted, 0u);
}

// ---------------------------------------------------------------------------------------------
// Admission checks
// ---------------------------------------------------------------------------------------------

TEST(Engine, AddRejectsRequestsThatCanNeverRun) {
  struct Case {
    const char* name;
    std::size_t prompt_len;
    std::uint32_t max_out;
    bool remote;
    const char* error_contains;
  };
  // max_model_len 256, 40 blocks of 4 = 160 tokens of KV.
  const std::vector<Case> cases = {
      {"empty prompt", 0, 4, false, "empty"},
      {"no output", 10, 0, false, "max_tokens"},
      {"prompt + output over max_model_len", 250, 7, false, "max_model_len"},
      {"prompt alone over max_model_len", 257, 1, false, "max_model_len"},
      {"more blocks than the pool", 150, 20, false, "blocks"},
      {"remote load without a loader", 10, 4, true, "remote"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    Profile p = small_profile();
    p.num_blocks = 40;
    Engine::Hooks hooks;
    hooks.sample = [](SeqRequest&) { return TokenId{7}; };
    Engine e(p, HashAlgo::kFast64, hooks);  // no start_kv_load hook
    auto r = std::make_shared<SeqRequest>();
    r->tokens = seq(c.prompt_len, 1);
    r->max_output_tokens = c.max_out;
    r->remote_kv_load = c.remote;
    const std::string err = e.add(r, 0);
    EXPECT_NE(err.find(c.error_contains), std::string::npos) << err;
    EXPECT_EQ(e.num_waiting(), 0u);
    EXPECT_EQ(r->id, 0u) << "not queued";
    EXPECT_EQ(e.stats().prompt_tokens, 0u);
  }
  // Exactly at the limits is fine.
  Profile p = small_profile();
  p.num_blocks = 40;
  Engine::Hooks hooks;
  hooks.sample = [](SeqRequest&) { return TokenId{7}; };
  Engine e(p, HashAlgo::kFast64, hooks);
  auto r = std::make_shared<SeqRequest>();
  r->tokens = seq(150, 1);
  r->max_output_tokens = 10;  // 160 tokens = 40 blocks
  EXPECT_EQ(e.add(r, 0), "");
  EXPECT_EQ(e.num_waiting(), 1u);
}

TEST(Engine, RequiresASampleHook) {
  EXPECT_THROW(Engine(small_profile(), HashAlgo::kFast64, Engine::Hooks{}), std::invalid_argument);
}

TEST(Engine, ScheduleTwiceWithoutCompletingThrows) {
  Harness h(small_profile());
  h.submit(seq(5, 1), 1);
  (void)h.engine.schedule(0);
  EXPECT_THROW((void)h.engine.schedule(0), std::logic_error);
}

// ---------------------------------------------------------------------------------------------
// Many waiting requests (regression)
// ---------------------------------------------------------------------------------------------

// admit() used to bind waiting_.front() by reference, pop_front() and then copy it into
// running_ (or loading_): a heap-use-after-free under ASan once a step admitted past a deque
// node (32 requests), and whenever the queue held the last reference. Here the engine holds
// the only references, and 100 requests are admitted in one step.
TEST(Engine, ManyWaitingRequestsOwnedOnlyByTheEngine) {
  for (bool remote : {false, true}) {
    SCOPED_TRACE(remote ? "remote kv load" : "local prefill");
    Profile p = builtin_profile("fast");
    p.jitter_cv = 0.0;
    ASSERT_GE(p.max_num_seqs, 100u);
    struct Counts {
      std::uint64_t tokens = 0, finishes = 0;
      std::vector<std::uint64_t> loads;
    };
    auto counts = std::make_shared<Counts>();
    Engine::Hooks hooks;
    hooks.sample = [](SeqRequest& r) { return static_cast<TokenId>(1000 + r.num_output_tokens()); };
    hooks.start_kv_load = [counts](SeqRequest& r) { counts->loads.push_back(r.id); };
    Engine e(p, HashAlgo::kFast64, hooks);
    constexpr std::uint64_t kRequests = 100;
    for (std::uint64_t i = 0; i < kRequests; ++i) {
      auto r = std::make_shared<SeqRequest>();
      r->tokens = seq(4 + i % 7, static_cast<TokenId>(100 * i + 1));
      r->max_output_tokens = 4;
      r->remote_kv_load = remote;
      r->on_token = [counts](SeqRequest&, TokenId) { counts->tokens++; };
      r->on_finish = [counts](SeqRequest& sr, FinishReason why, const std::string&) {
        EXPECT_EQ(why, FinishReason::kLength);
        EXPECT_EQ(sr.num_output_tokens(), 4u);
        counts->finishes++;
      };
      ASSERT_EQ(e.add(r, 0), "");
    }
    EXPECT_EQ(e.num_waiting(), kRequests);
    double now = 0;
    for (int step = 0; step < 100 && counts->finishes < kRequests; ++step) {
      (void)e.schedule(now);
      if (step == 0) {
        // Everything is admitted at once: into the batch, or loading its KV.
        EXPECT_EQ(e.num_running(), remote ? 0u : kRequests);
        EXPECT_EQ(counts->loads.size(), remote ? kRequests : 0u);
        EXPECT_EQ(e.num_waiting(), remote ? kRequests : 0u);
      }
      if (e.step_planned()) e.complete_step(now += 1);
      for (auto id : std::exchange(counts->loads, {})) e.kv_load_done(id, true, false, "", now);
    }
    EXPECT_EQ(counts->finishes, kRequests);
    EXPECT_EQ(counts->tokens, 4 * kRequests);
    EXPECT_EQ(e.num_running(), 0u);
    EXPECT_EQ(e.num_waiting(), 0u);
    EXPECT_EQ(e.pool().num_free(), e.pool().num_blocks());
  }
}

// A token callback may abort its own request (the instance does, for an injected disconnect):
// the engine must not then finish it.
TEST(Engine, TokenCallbackThatAbortsItsRequestEndsIt) {
  for (bool hold : {false, true}) {
    SCOPED_TRACE(hold ? "held" : "not held");
    Harness h(small_profile());
    Item& it = h.make(seq(6, 1), 1);
    it.r->hold_blocks_after_finish = hold;
    auto inner = it.r->on_token;
    it.r->on_token = [&h, inner](SeqRequest& r, TokenId t) {
      inner(r, t);
      h.engine.abort(r.id);
    };
    ASSERT_EQ(h.add(it), "");
    h.run();
    EXPECT_EQ(it.rec.outputs, expected_outputs(1));
    EXPECT_EQ(it.rec.finishes, 0);
    EXPECT_EQ(h.engine.stats().requests_aborted, 1u);
    EXPECT_EQ(h.engine.stats().requests_finished, 0u);
    EXPECT_EQ(h.engine.num_held(), 0u);
    EXPECT_TRUE(h.all_blocks_free());
  }
}

// ---------------------------------------------------------------------------------------------
// Parallel sampling: forks
// ---------------------------------------------------------------------------------------------

TEST(Engine, ForksShareThePromptAndDecodeAsSequencesOfTheirOwn) {
  Harness h(small_profile());  // 4-token blocks
  Item& parent = h.make(seq(10, 50), 3);  // 2 full blocks and a partial one
  Item& f1 = h.fork_of(parent, 5);
  Item& f2 = h.fork_of(parent, 1);
  f2.r->reason_at_limit = FinishReason::kStop;
  ASSERT_EQ(h.add(parent), "");
  EXPECT_EQ(f1.r->tokens, parent.r->tokens);
  EXPECT_EQ(f1.r->parent_id, parent.r->id);
  EXPECT_EQ(f2.r->parent_id, parent.r->id);
  EXPECT_NE(f1.r->id, parent.r->id);
  EXPECT_NE(f1.r->id, f2.r->id);
  EXPECT_EQ(h.engine.num_waiting(), 3u);
  EXPECT_EQ(h.engine.stats().prompt_tokens, 10u) << "one prompt";

  // One step computes the prompt once; every sample takes its first token from it.
  ASSERT_TRUE(h.step());
  EXPECT_EQ(h.works[0].prefill_tokens, 10u);
  EXPECT_EQ(h.works[0].decode_seqs, 0u);
  for (Item* it : {&parent, &f1, &f2}) EXPECT_EQ(it->rec.outputs, expected_outputs(1));
  EXPECT_EQ(f2.rec.finishes, 1);
  EXPECT_EQ(f2.rec.reason, FinishReason::kStop);
  EXPECT_EQ(f1.r->num_forked_tokens, 10u);
  EXPECT_EQ(f1.r->first_token_ms, parent.r->first_token_ms);
  // Parent and f1 run, sharing the two full prompt blocks; each has its own partial block.
  EXPECT_EQ(h.engine.num_running(), 2u);
  EXPECT_EQ(h.engine.num_waiting(), 0u);
  ASSERT_EQ(parent.r->blocks.size(), 3u);
  ASSERT_EQ(f1.r->blocks.size(), 3u);
  for (std::size_t b = 0; b < 2; ++b) {
    EXPECT_EQ(f1.r->blocks[b], parent.r->blocks[b]);
    EXPECT_EQ(h.engine.pool().ref_count(parent.r->blocks[b]), 2u);
  }
  EXPECT_NE(f1.r->blocks[2], parent.r->blocks[2]);
  EXPECT_EQ(h.engine.pool().num_free(), 64u - 4u);

  // Then each decodes its own tokens: the batch holds both.
  ASSERT_TRUE(h.step());
  EXPECT_EQ(h.works[1].prefill_tokens, 0u);
  EXPECT_EQ(h.works[1].decode_seqs, 2u);
  EXPECT_EQ(h.works[1].decode_kv_tokens, 20u);  // context before the new tokens
  h.run();
  EXPECT_EQ(parent.rec.outputs, expected_outputs(3));
  EXPECT_EQ(f1.rec.outputs, expected_outputs(5));
  EXPECT_EQ(parent.rec.reason, FinishReason::kLength);
  EXPECT_EQ(f1.rec.reason, FinishReason::kLength);
  for (Item* it : {&parent, &f1, &f2}) EXPECT_EQ(it->rec.finishes, 1);
  std::uint64_t prefill = 0;
  for (const auto& w : h.works) prefill += w.prefill_tokens;
  EXPECT_EQ(prefill, 10u);
  EXPECT_EQ(h.engine.stats().generation_tokens, 9u);
  EXPECT_EQ(h.engine.stats().requests_finished, 3u);
  EXPECT_TRUE(h.all_blocks_free());
  // The shared prompt blocks were cached once, by the parent.
  std::size_t stored_blocks = 0;
  for (const auto& ev : h.stored()) stored_blocks += ev.block_hashes.size();
  EXPECT_GE(stored_blocks, 2u);
  Item& again = h.submit(seq(10, 50), 1);
  h.run();
  EXPECT_EQ(again.r->num_cached_tokens, 8u);
}

TEST(Engine, ForksOfABlockAlignedPromptShareEveryPromptBlock) {
  Harness h(small_profile());
  Item& parent = h.make(seq(8, 70), 3);
  Item& f1 = h.fork_of(parent, 3);
  ASSERT_EQ(h.add(parent), "");
  ASSERT_TRUE(h.step());
  EXPECT_EQ(f1.r->blocks, parent.r->blocks) << "no partial block to copy";
  EXPECT_EQ(h.engine.pool().num_free(), 64u - 2u);
  ASSERT_TRUE(h.step());  // each sample's second token needs a block of its own
  ASSERT_EQ(f1.r->blocks.size(), 3u);
  ASSERT_EQ(parent.r->blocks.size(), 3u);
  EXPECT_NE(f1.r->blocks[2], parent.r->blocks[2]);
  h.run();
  EXPECT_EQ(parent.rec.outputs, expected_outputs(3));
  EXPECT_EQ(f1.rec.outputs, expected_outputs(3));
  EXPECT_TRUE(h.all_blocks_free());
}

TEST(Engine, ForksWithoutASequenceSlotWaitAndHitThePrefixCache) {
  Profile p = small_profile();
  p.max_num_seqs = 2;
  Harness h(p);
  Item& parent = h.make(seq(9, 80), 2);
  Item& f1 = h.fork_of(parent, 2);
  Item& f2 = h.fork_of(parent, 2);
  Item& f3 = h.fork_of(parent, 2);
  ASSERT_EQ(h.add(parent), "");
  ASSERT_TRUE(h.step());
  EXPECT_EQ(h.engine.num_running(), 2u);
  EXPECT_EQ(h.engine.num_waiting(), 2u);
  EXPECT_EQ(f1.rec.outputs, expected_outputs(1));
  EXPECT_TRUE(f2.rec.outputs.empty());
  EXPECT_TRUE(f3.rec.outputs.empty());
  h.run();
  for (Item* it : {&parent, &f1, &f2, &f3}) {
    SCOPED_TRACE(it->r->request_id);
    EXPECT_EQ(it->rec.outputs, expected_outputs(2));
    EXPECT_EQ(it->rec.finishes, 1);
  }
  // The waiting forks were admitted like any request: the prompt's full blocks were hits.
  for (Item* it : {&f2, &f3}) {
    EXPECT_EQ(it->r->num_forked_tokens, 0u);
    EXPECT_EQ(it->r->num_cached_tokens, 8u);
  }
  std::uint64_t prefill = 0;
  for (const auto& w : h.works) prefill += w.prefill_tokens;
  EXPECT_EQ(prefill, 9u + 1u + 1u);
  for (const auto& w : h.works) EXPECT_LE(w.decode_seqs + w.prefill_tokens, 16u);
  EXPECT_TRUE(h.all_blocks_free());
}

TEST(Engine, ForksWithoutAFreeBlockWait) {
  Profile p = small_profile();
  p.num_blocks = 4;
  Harness h(p);
  Item& parent = h.make(seq(10, 90), 1);  // 3 blocks
  Item& f1 = h.fork_of(parent, 1);          // takes the last free block for its copy
  Item& f2 = h.fork_of(parent, 1);          // none left: waits
  ASSERT_EQ(h.add(parent), "");
  ASSERT_TRUE(h.step());
  EXPECT_EQ(parent.rec.outputs, expected_outputs(1));
  EXPECT_EQ(f1.rec.outputs, expected_outputs(1));
  EXPECT_TRUE(f2.rec.outputs.empty());
  EXPECT_EQ(h.engine.num_waiting(), 1u);
  h.run();
  EXPECT_EQ(f2.rec.outputs, expected_outputs(1));
  EXPECT_EQ(f2.r->num_cached_tokens, 8u);
  EXPECT_TRUE(h.all_blocks_free());
}

TEST(Engine, ForksUnderBlockPressureArePreemptedAndRecomputed) {
  Profile p = small_profile();
  p.num_blocks = 16;
  Harness h(p);
  Item& parent = h.make(seq(8, 100), 24);
  std::vector<Item*> samples = {&parent};
  for (int i = 0; i < 3; ++i) samples.push_back(&h.fork_of(parent, 24));
  ASSERT_EQ(h.add(parent), "");
  h.run();
  EXPECT_GT(h.engine.stats().preemptions, 0u);
  for (Item* it : samples) {
    SCOPED_TRACE(it->r->request_id);
    EXPECT_EQ(it->rec.outputs, expected_outputs(24));
    EXPECT_EQ(it->rec.finishes, 1);
  }
  EXPECT_EQ(h.engine.stats().generation_tokens, 4u * 24u);
  EXPECT_TRUE(h.all_blocks_free());
}

TEST(Engine, AbortAndForks) {
  enum class What { kParentWaiting, kParentMidPrefill, kPendingFork, kRunningFork, kParentAfterFork };
  for (What what : {What::kParentWaiting, What::kParentMidPrefill, What::kPendingFork,
                    What::kRunningFork, What::kParentAfterFork}) {
    SCOPED_TRACE(static_cast<int>(what));
    Harness h(small_profile());
    Item& parent = h.make(seq(40, 1), 4);  // prefilled over 3 steps
    Item& f1 = h.fork_of(parent, 4);
    Item& f2 = h.fork_of(parent, 4);
    ASSERT_EQ(h.add(parent), "");
    std::vector<Item*> aborted, survivors;
    switch (what) {
      case What::kParentWaiting:
        h.engine.abort(parent.r->id);
        aborted = {&parent, &f1, &f2};
        break;
      case What::kParentMidPrefill:
        ASSERT_TRUE(h.step());
        h.engine.abort(parent.r->id);
        aborted = {&parent, &f1, &f2};
        break;
      case What::kPendingFork:
        ASSERT_TRUE(h.step());
        h.engine.abort(f1.r->id);
        EXPECT_EQ(h.engine.num_waiting(), 1u) << "f2 still waits for the prompt";
        aborted = {&f1};
        survivors = {&parent, &f2};
        break;
      case What::kRunningFork:
        for (int i = 0; i < 4; ++i) ASSERT_TRUE(h.step());
        ASSERT_EQ(f1.rec.outputs.size(), 2u);
        h.engine.abort(f1.r->id);
        aborted = {&f1};
        survivors = {&parent, &f2};
        break;
      case What::kParentAfterFork:
        for (int i = 0; i < 4; ++i) ASSERT_TRUE(h.step());
        h.engine.abort(parent.r->id);
        aborted = {&parent};
        survivors = {&f1, &f2};
        break;
    }
    std::vector<std::size_t> outputs_at_abort;
    for (Item* it : aborted) outputs_at_abort.push_back(it->rec.outputs.size());
    h.run();
    for (std::size_t i = 0; i < aborted.size(); ++i) {
      EXPECT_TRUE(aborted[i]->r->finished);
      EXPECT_EQ(aborted[i]->rec.finishes, 0) << "no callback for an abort";
      EXPECT_EQ(aborted[i]->rec.outputs.size(), outputs_at_abort[i]);
    }
    for (Item* it : survivors) {
      EXPECT_EQ(it->rec.outputs, expected_outputs(4));
      EXPECT_EQ(it->rec.finishes, 1);
    }
    EXPECT_EQ(h.engine.stats().requests_aborted, aborted.size());
    EXPECT_EQ(h.engine.num_waiting(), 0u);
    EXPECT_EQ(h.engine.num_running(), 0u);
    EXPECT_TRUE(h.all_blocks_free());
  }
}

// A P/D decode with n > 1: the KV is loaded once, then every sample decodes from it.
TEST(Engine, ForksOfARemoteKvLoad) {
  for (bool ok : {true, false}) {
    SCOPED_TRACE(ok ? "load ok" : "load failed");
    Harness h(small_profile());
    Item& parent = h.make(seq(22, 40), 3);
    parent.r->remote_kv_load = true;
    Item& f1 = h.fork_of(parent, 2);
    Item& f2 = h.fork_of(parent, 4);
    ASSERT_EQ(h.add(parent), "");
    EXPECT_FALSE(h.step());
    ASSERT_EQ(h.loads, std::vector<std::uint64_t>{parent.r->id});
    EXPECT_EQ(h.engine.num_waiting(), 3u);
    h.engine.kv_load_done(parent.r->id, ok, false, ok ? "" : "transfer failed", h.now);
    if (!ok) {
      for (Item* it : {&parent, &f1, &f2}) {
        EXPECT_EQ(it->rec.finishes, 1);
        EXPECT_EQ(it->rec.reason, FinishReason::kError);
        EXPECT_EQ(it->rec.error, "transfer failed");
        EXPECT_TRUE(it->rec.outputs.empty());
      }
      EXPECT_EQ(h.engine.stats().requests_failed, 3u);
      EXPECT_EQ(h.engine.num_waiting(), 0u);
      EXPECT_FALSE(h.step());
      EXPECT_TRUE(h.all_blocks_free());
      continue;
    }
    h.run();
    EXPECT_EQ(parent.rec.outputs, expected_outputs(3));
    EXPECT_EQ(f1.rec.outputs, expected_outputs(2));
    EXPECT_EQ(f2.rec.outputs, expected_outputs(4));
    std::uint64_t prefill = 0;
    for (const auto& w : h.works) prefill += w.prefill_tokens;
    EXPECT_EQ(prefill, 1u) << "only the last prompt token, once";
    EXPECT_EQ(h.loads.size(), 1u) << "one load for every sample";
    EXPECT_TRUE(h.all_blocks_free());
  }
}

// A P/D prefill with n > 1: the prompt is computed once and only the parent holds its KV.
TEST(Engine, ForksOfAHeldPrefillAreNotHeld) {
  Harness h(small_profile());
  Item& parent = h.make(seq(10, 5), 1);
  parent.r->hold_blocks_after_finish = true;
  Item& f1 = h.fork_of(parent, 1);
  Item& f2 = h.fork_of(parent, 1);
  ASSERT_EQ(h.add(parent), "");
  h.run();
  ASSERT_EQ(h.works.size(), 1u);
  EXPECT_EQ(h.works[0].prefill_tokens, 10u);
  for (Item* it : {&parent, &f1, &f2}) {
    EXPECT_EQ(it->rec.outputs, expected_outputs(1));
    EXPECT_EQ(it->rec.reason, FinishReason::kLength);
  }
  EXPECT_EQ(h.engine.num_held(), 1u);
  ASSERT_EQ(h.engine.find_held(parent.r->id), parent.r.get());
  EXPECT_EQ(h.engine.find_held(f1.r->id), nullptr);
  for (auto b : parent.r->blocks) EXPECT_EQ(h.engine.pool().ref_count(b), 1u);
  EXPECT_EQ(h.engine.pool().num_free(), 64u - 3u);
  EXPECT_TRUE(h.engine.release_held(parent.r->id));
  EXPECT_TRUE(h.all_blocks_free());
}

TEST(Engine, AddRejectsForksThatCannotRun) {
  struct Case {
    const char* name;
    std::function<void(SeqRequest& parent, SeqRequest& fork)> setup;
    const char* error_contains;
  };
  const std::vector<Case> cases = {
      {"fork with no output", [](SeqRequest&, SeqRequest& f) { f.max_output_tokens = 0; },
       "max_tokens"},
      {"fork over max_model_len",
       [](SeqRequest& p, SeqRequest& f) {
         p.tokens = seq(250, 1);
         p.max_output_tokens = 2;
         f.max_output_tokens = 7;
       },
       "max_model_len"},
      {"fork loading remote KV", [](SeqRequest&, SeqRequest& f) { f.remote_kv_load = true; },
       "fork"},
      {"fork holding its blocks",
       [](SeqRequest&, SeqRequest& f) { f.hold_blocks_after_finish = true; }, "fork"},
      {"fork with forks",
       [](SeqRequest&, SeqRequest& f) { f.forks.push_back(std::make_shared<SeqRequest>()); },
       "fork"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    Harness h(small_profile());
    Item& parent = h.make(seq(10, 1), 2);
    Item& f = h.fork_of(parent, 2);
    c.setup(*parent.r, *f.r);
    const std::string err = h.add(parent);
    EXPECT_NE(err.find(c.error_contains), std::string::npos) << err;
    EXPECT_EQ(parent.r->id, 0u);
    EXPECT_EQ(f.r->id, 0u);
    EXPECT_EQ(h.engine.num_waiting(), 0u);
    EXPECT_EQ(h.engine.stats().prompt_tokens, 0u);
  }
  Harness h(small_profile());
  Item& parent = h.make(seq(10, 1), 2);
  parent.r->forks.push_back(parent.r);
  EXPECT_NE(h.add(parent), "");
  parent.r->forks = {nullptr};
  EXPECT_NE(h.add(parent), "");
}

// ---------------------------------------------------------------------------------------------
// Determinism
// ---------------------------------------------------------------------------------------------

struct RunResult {
  std::vector<std::vector<TokenId>> outputs;
  std::uint64_t steps = 0;
  std::uint64_t preemptions = 0;
  double end_ms = 0;
  std::vector<kv::Event> events;
};

RunResult run_workload(std::uint64_t seed) {
  Profile p = small_profile();
  p.jitter_cv = 0.1;
  p.num_blocks = 24;
  auto rng = std::make_shared<std::mt19937_64>(seed);
  Harness h(p, HashAlgo::kFast64,
            [rng](SeqRequest&) { return static_cast<TokenId>(256 + (*rng)() % 1000); });
  std::mt19937_64 workload(1234);
  for (int wave = 0; wave < 5; ++wave) {
    for (int i = 0; i < 3; ++i) {
      const auto len = static_cast<std::size_t>(1 + workload() % 30);
      const auto shared = static_cast<TokenId>(workload() % 3);  // some shared prefixes
      h.submit(seq(len, 1000 * shared), static_cast<std::uint32_t>(1 + workload() % 20));
    }
    for (int s = 0; s < 4; ++s) h.step();
  }
  h.run();
  RunResult out;
  for (const auto& it : h.items) {
    EXPECT_EQ(it.rec.finishes, 1);
    out.outputs.push_back(it.rec.outputs);
  }
  out.steps = h.engine.stats().steps;
  out.preemptions = h.engine.stats().preemptions;
  out.end_ms = h.now;
  out.events = h.events;
  return out;
}

TEST(Engine, SameInputsGiveTheSameRun) {
  const RunResult a = run_workload(7);
  const RunResult b = run_workload(7);
  EXPECT_EQ(a.outputs, b.outputs);
  EXPECT_EQ(a.steps, b.steps);
  EXPECT_EQ(a.preemptions, b.preemptions);
  EXPECT_EQ(a.end_ms, b.end_ms);
  EXPECT_TRUE(a.events == b.events);
  EXPECT_GT(a.steps, 0u);
  // The sample seed matters (so the comparison above is not vacuous).
  EXPECT_NE(run_workload(8).outputs, a.outputs);
}

}  // namespace
}  // namespace omni::sim
