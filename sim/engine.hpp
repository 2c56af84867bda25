// One simulated inference engine: vLLM-style continuous batching over a paged KV cache.
//
// Every step the scheduler fills a token budget (max_num_batched_tokens):
//  1. each running request gets its next tokens: one for a decode, a chunk for a prompt that
//     is still being prefilled (chunked prefill);
//  2. waiting requests are admitted in arrival order while there is budget, a free sequence
//     slot (max_num_seqs) and KV blocks; an admitted prompt skips its cached prefix.
// When a running request needs a block and none is free, the most recently admitted running
// request is preempted: its blocks are released (its full blocks stay cached) and it goes back
// to the head of the queue, to be recomputed later.
//
// Parallel sampling (OpenAI `n`, SGLang `sampling_params.n`): a request may carry forks, the
// other samples of its prompt. The prompt is computed once, by the parent. In the step that
// completes it, every fork becomes a running sequence of its own: it takes a reference on the
// parent's full prompt blocks (shared, as vLLM's prefix cache and SGLang's radix cache share
// them), gets its own copy of the partial last block, and samples its first token from the
// same logits as the parent. From then on each decodes its own tokens, so the batch holds n
// sequences. A fork that finds no free sequence slot or block waits at the head of the queue
// and is admitted like any request, the parent's blocks then being prefix-cache hits.
//
// The engine is pure logic with no clock or I/O: the driver calls schedule(), waits the step
// time the TimingModel gives for the returned work, then calls complete_step(). Outputs leave
// through the request's callbacks; KV events through take_events().
#pragma once

#include "block_pool.hpp"
#include "timing_model.hpp"

#include <omni/block_hash.hpp>
#include <omni/kv_events.hpp>

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

namespace omni::sim {

enum class HashAlgo { kFast64, kSha256 };

enum class FinishReason { kLength, kStop, kAbort, kError };
const char* to_string(FinishReason r) noexcept;

struct SeqRequest;
using RequestPtr = std::shared_ptr<SeqRequest>;

struct SeqRequest {
  // Set by the caller.
  std::string request_id;           // external id, for logs and P/D handshakes
  std::vector<TokenId> tokens;      // the prompt; output tokens are appended
  std::uint32_t max_output_tokens = 16;
  FinishReason reason_at_limit = FinishReason::kLength;
  bool remote_kv_load = false;      // decode side of P/D: fill the prompt's KV from a prefill
  bool hold_blocks_after_finish = false;  // prefill side of P/D: keep KV until pulled
  std::function<void(SeqRequest&, TokenId)> on_token;
  std::function<void(SeqRequest&, FinishReason, const std::string& error)> on_finish;
  // For remote_kv_load: called once the request holds its blocks, to start fetching the KV;
  // the fetch ends with Engine::kv_load_done(). Must not call back into the engine
  // synchronously. Falls back to Hooks::start_kv_load.
  std::function<void(SeqRequest&)> start_kv_load;
  // Further samples of this request's prompt (n > 1), forked when the prompt is computed (see
  // above). Each has its own max_output_tokens, reason_at_limit and callbacks; add() gives it
  // the prompt. A fork cannot load remote KV, hold its blocks or have forks of its own. Until
  // it is forked it goes wherever its parent goes: aborting the parent drops it, and a parent
  // failing before its prompt is computed fails it too.
  std::vector<RequestPtr> forks;

  // Kept by the engine.
  std::uint64_t id = 0;
  std::uint32_t num_prompt_tokens = 0;
  std::uint32_t num_computed = 0;          // tokens whose KV is computed
  std::uint32_t num_cached_tokens = 0;     // prefix-cache hit at first admission
  std::uint32_t num_remote_blocks = 0;     // blocks to load from a remote prefill
  std::uint32_t num_preemptions = 0;
  std::uint64_t parent_id = 0;             // a fork's parent
  std::uint32_t num_forked_tokens = 0;     // prompt tokens whose KV a fork took from its parent
  std::vector<std::uint32_t> blocks;
  std::vector<BlockKey> block_keys;        // keys of the full blocks of `tokens`, by index
  std::vector<BlockDigest> block_digests;  // sha256 chain when HashAlgo::kSha256
  std::uint32_t num_committed_blocks = 0;
  bool admitted_once = false;
  bool finished = false;
  double arrival_ms = 0, first_scheduled_ms = -1, first_token_ms = -1, finish_ms = -1;

  std::uint32_t num_output_tokens() const noexcept {
    return static_cast<std::uint32_t>(tokens.size()) - num_prompt_tokens;
  }
};

struct EngineStats {
  std::uint64_t prompt_tokens = 0;
  std::uint64_t generation_tokens = 0;
  std::uint64_t prefix_cache_queries = 0;  // prompt tokens looked up at first admission
  std::uint64_t prefix_cache_hits = 0;
  std::uint64_t preemptions = 0;
  std::uint64_t steps = 0;
  std::uint64_t requests_finished = 0;
  std::uint64_t requests_aborted = 0;
  std::uint64_t requests_failed = 0;
};

class Engine {
 public:
  struct Hooks {
    // A request with remote_kv_load was admitted and holds its blocks: fetch the KV, then
    // call kv_load_done().
    std::function<void(SeqRequest&)> start_kv_load;
    // The next output token of a request.
    std::function<TokenId(SeqRequest&)> sample;
  };

  Engine(Profile profile, HashAlgo hash_algo, Hooks hooks);

  // Queues a request (and registers its forks). Returns an empty string, or why it or one of
  // its forks can never run (nothing is then queued and no callback fires).
  std::string add(const RequestPtr& request, double now_ms);
  // Drops a request wherever it is, releasing its blocks, with its forks not forked yet. No
  // callback fires.
  void abort(std::uint64_t id);
  void kv_load_done(std::uint64_t id, bool ok, bool recompute_on_failure,
                    const std::string& error, double now_ms);
  // Releases the blocks a finished prefill kept for a remote decode. False if unknown.
  bool release_held(std::uint64_t id);
  const SeqRequest* find_held(std::uint64_t id) const;

  // Plans the next step. Empty work means there is nothing to compute now.
  StepWork schedule(double now_ms);
  // Applies the planned step: advances requests, samples tokens, caches full blocks.
  void complete_step(double now_ms);
  bool step_planned() const noexcept { return !planned_.empty(); }
  // Drops every unreferenced cached block (AllBlocksCleared).
  void reset_prefix_cache() { pool_.clear_cache(); }

  std::vector<kv::Event> take_events() { return pool_.take_events(); }

  std::size_t num_running() const noexcept { return running_.size(); }
  // Queued, loading remote KV, or forks waiting for their parent's prompt.
  std::size_t num_waiting() const noexcept {
    return waiting_.size() + loading_.size() + num_pending_forks_;
  }
  std::size_t num_held() const noexcept { return held_.size(); }
  // Uncached prompt tokens of the waiting requests (SGLang's num_waiting_uncached_tokens,
  // estimated from the current cache).
  std::uint64_t waiting_uncached_tokens() const;
  std::uint64_t num_used_tokens() const noexcept;
  const BlockPool& pool() const noexcept { return pool_; }
  const Profile& profile() const noexcept { return profile_; }
  const EngineStats& stats() const noexcept { return stats_; }

 private:
  struct Planned {
    RequestPtr request;
    std::uint32_t num_tokens;
  };

  std::uint32_t blocks_for(std::uint32_t tokens) const noexcept;
  void ensure_block_keys(SeqRequest& r, std::uint32_t full_blocks);
  std::uint32_t cached_prefix_blocks(SeqRequest& r);
  void commit_full_blocks(SeqRequest& r);
  void preempt(const RequestPtr& r);
  void finish(const RequestPtr& r, FinishReason reason, const std::string& error, double now_ms);
  void release_blocks(SeqRequest& r);
  // Takes its own reference: it pops the queue's.
  bool admit(RequestPtr r, std::uint32_t& budget, StepWork& work, double now_ms);
  // Samples r's next token; finishes r at its limit.
  void emit_token(const RequestPtr& r, double now_ms);
  // Turns the pending forks of `parent`, whose prompt was just computed, into sequences.
  // Returns those that run now (they sample their first token in this step); the others wait.
  std::vector<RequestPtr> fork(SeqRequest& parent, double now_ms);
  // Forgets the pending forks of r (an abort): no callback fires.
  void drop_forks(SeqRequest& r);
  bool drop_pending_fork(std::uint64_t id);
  void account(const SeqRequest& r, std::uint32_t n, StepWork& work) const;
  std::size_t slots_used() const noexcept { return running_.size() + loading_.size(); }

  Profile profile_;
  HashAlgo hash_algo_;
  Hooks hooks_;
  BlockPool pool_;
  std::uint64_t next_id_ = 1;
  std::deque<RequestPtr> waiting_;
  std::vector<RequestPtr> running_;  // admission order
  std::unordered_map<std::uint64_t, RequestPtr> loading_;
  std::unordered_map<std::uint64_t, RequestPtr> held_;
  std::vector<Planned> planned_;
  std::size_t num_pending_forks_ = 0;
  EngineStats stats_;
};

}  // namespace omni::sim
