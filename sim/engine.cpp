#include "engine.hpp"

#include <algorithm>
#include <stdexcept>

namespace omni::sim {

const char* to_string(FinishReason r) noexcept {
  switch (r) {
    case FinishReason::kLength: return "length";
    case FinishReason::kStop: return "stop";
    case FinishReason::kAbort: return "abort";
    case FinishReason::kError: return "error";
  }
  return "error";
}

Engine::Engine(Profile profile, HashAlgo hash_algo, Hooks hooks)
    : profile_(std::move(profile)),
      hash_algo_(hash_algo),
      hooks_(std::move(hooks)),
      pool_(profile_.num_blocks, profile_.block_size) {
  validate(profile_);
  if (!hooks_.sample) throw std::invalid_argument("Engine needs a sample hook");
}

std::uint32_t Engine::blocks_for(std::uint32_t tokens) const noexcept {
  return (tokens + profile_.block_size - 1) / profile_.block_size;
}

std::string Engine::add(const RequestPtr& r, double now_ms) {
  auto check = [&](const SeqRequest& q) -> std::string {
    if (q.max_output_tokens == 0) return "max_tokens must be at least 1";
    const std::uint64_t total = r->tokens.size() + q.max_output_tokens;
    if (total > profile_.max_model_len) return "prompt and output exceed max_model_len";
    if (blocks_for(static_cast<std::uint32_t>(total)) > profile_.num_blocks) {
      return "the request needs more KV blocks than the engine has";
    }
    return {};
  };
  if (r->tokens.empty()) return "the prompt is empty";
  if (std::string why = check(*r); !why.empty()) return why;
  if (r->remote_kv_load && !r->start_kv_load && !hooks_.start_kv_load) {
    return "this engine cannot load remote KV";
  }
  for (const auto& f : r->forks) {
    if (!f || f == r) return "a fork must be a request of its own";
    if (f->remote_kv_load || f->hold_blocks_after_finish || !f->forks.empty()) {
      return "a fork cannot load remote KV, hold its blocks or have forks";
    }
    if (std::string why = check(*f); !why.empty()) return why;
  }
  r->id = next_id_++;
  r->num_prompt_tokens = static_cast<std::uint32_t>(r->tokens.size());
  r->arrival_ms = now_ms;
  ensure_block_keys(*r, r->num_prompt_tokens / profile_.block_size);
  for (const auto& f : r->forks) {
    f->id = next_id_++;
    f->parent_id = r->id;
    f->tokens = r->tokens;
    f->num_prompt_tokens = r->num_prompt_tokens;
    f->arrival_ms = now_ms;
    f->block_keys = r->block_keys;
    f->block_digests = r->block_digests;
  }
  num_pending_forks_ += r->forks.size();
  // The prompt is computed once, however many samples share it.
  stats_.prompt_tokens += r->num_prompt_tokens;
  waiting_.push_back(r);
  return {};
}

void Engine::ensure_block_keys(SeqRequest& r, std::uint32_t full_blocks) {
  const std::uint32_t bs = profile_.block_size;
  while (r.block_keys.size() < full_blocks) {
    const std::size_t i = r.block_keys.size();
    std::span<const TokenId> toks(r.tokens.data() + i * bs, bs);
    BlockKey key;
    if (hash_algo_ == HashAlgo::kFast64) {
      key.key = hash_block64(i == 0 ? kRootBlockHash : r.block_keys[i - 1].key, toks);
      key.external = kv::ExternalHash::from_int(key.key);
    } else {
      BlockDigest d = hash_block_sha256(i == 0 ? BlockDigest{} : r.block_digests[i - 1], toks);
      key.key = digest_to_u64(d);
      key.external = kv::ExternalHash::from_bytes(std::string(d.begin(), d.end()));
      r.block_digests.push_back(d);
    }
    r.block_keys.push_back(std::move(key));
  }
}

// Cached leading blocks, leaving at least one token to compute: the last prompt token must
// run through the model to produce logits.
std::uint32_t Engine::cached_prefix_blocks(SeqRequest& r) {
  const auto n_tokens = static_cast<std::uint32_t>(r.tokens.size());
  const std::uint32_t max_blocks = (n_tokens - 1) / profile_.block_size;
  ensure_block_keys(r, n_tokens / profile_.block_size);
  std::span<const BlockKey> keys(r.block_keys.data(), max_blocks);
  return pool_.match_prefix(keys);
}

void Engine::commit_full_blocks(SeqRequest& r) {
  const std::uint32_t bs = profile_.block_size;
  const std::uint32_t full = std::min<std::uint32_t>(
      r.num_computed / bs, static_cast<std::uint32_t>(r.blocks.size()));
  ensure_block_keys(r, full);
  for (std::uint32_t b = r.num_committed_blocks; b < full; ++b) {
    if (pool_.is_cached(r.blocks[b])) continue;  // a prefix hit, already cached
    std::optional<kv::ExternalHash> parent;
    if (b > 0) parent = r.block_keys[b - 1].external;
    pool_.commit(r.blocks[b], r.block_keys[b], parent,
                 std::span<const TokenId>(r.tokens.data() + std::size_t{b} * bs, bs));
  }
  r.num_committed_blocks = std::max(r.num_committed_blocks, full);
}

void Engine::release_blocks(SeqRequest& r) {
  pool_.release(r.blocks);
  r.blocks.clear();
  r.num_committed_blocks = 0;
}

void Engine::account(const SeqRequest& r, std::uint32_t n, StepWork& work) const {
  if (r.num_computed >= r.num_prompt_tokens && n == 1) {
    work.decode_seqs += 1;
    work.decode_kv_tokens += r.num_computed;
  } else {
    // Prompt tokens (and, after a preemption, recomputed output tokens, which can start past
    // the prompt when the cached prefix covers it) in this chunk.
    work.prefill_tokens += n;
    work.attention_pairs += attention_pairs(r.num_computed, n);
  }
}

// `rp` is a copy on purpose: the caller passes waiting_.front(), which pop_front() destroys.
bool Engine::admit(RequestPtr rp, std::uint32_t& budget, StepWork& work, double now_ms) {
  SeqRequest& r = *rp;
  const std::uint32_t bs = profile_.block_size;
  const std::uint32_t hit_blocks = cached_prefix_blocks(r);
  const std::uint32_t hit_tokens = hit_blocks * bs;
  const auto n_tokens = static_cast<std::uint32_t>(r.tokens.size());
  // Hit blocks no one references are counted in num_free(); acquiring them uses them up.
  const std::uint32_t evictable_hits =
      pool_.num_evictable(std::span<const BlockKey>(r.block_keys.data(), hit_blocks));

  if (r.remote_kv_load && !r.admitted_once) {
    // The whole prompt's blocks are allocated up front; the remote part is then loaded.
    const std::uint32_t total_blocks = blocks_for(n_tokens);
    if (total_blocks - hit_blocks + evictable_hits > pool_.num_free()) return false;
    pool_.acquire_cached(std::span<const BlockKey>(r.block_keys.data(), hit_blocks), hit_blocks,
                         r.blocks);
    pool_.allocate(total_blocks - hit_blocks, r.blocks);
    r.num_computed = hit_tokens;
    r.num_committed_blocks = hit_blocks;
    r.num_cached_tokens = hit_tokens;
    r.num_remote_blocks = total_blocks - hit_blocks;
    r.admitted_once = true;
    r.first_scheduled_ms = now_ms;
    stats_.prefix_cache_queries += n_tokens;
    stats_.prefix_cache_hits += hit_tokens;
    waiting_.pop_front();
    loading_.emplace(r.id, rp);
    if (r.start_kv_load) {
      r.start_kv_load(r);
    } else {
      hooks_.start_kv_load(r);
    }
    return true;
  }

  const std::uint32_t n = std::min(n_tokens - hit_tokens, budget);
  const std::uint32_t need = blocks_for(hit_tokens + n) - hit_blocks;
  if (need + evictable_hits > pool_.num_free()) return false;
  pool_.acquire_cached(std::span<const BlockKey>(r.block_keys.data(), hit_blocks), hit_blocks,
                       r.blocks);
  pool_.allocate(need, r.blocks);
  r.num_computed = hit_tokens;
  r.num_committed_blocks = hit_blocks;
  if (!r.admitted_once) {
    r.admitted_once = true;
    r.num_cached_tokens = hit_tokens;
    r.first_scheduled_ms = now_ms;
    stats_.prefix_cache_queries += n_tokens;
    stats_.prefix_cache_hits += hit_tokens;
  }
  waiting_.pop_front();
  running_.push_back(rp);
  account(r, n, work);
  planned_.push_back({rp, n});
  budget -= n;
  return true;
}

void Engine::preempt(const RequestPtr& r) {
  running_.erase(std::find(running_.begin(), running_.end(), r));
  release_blocks(*r);
  r->num_computed = 0;
  r->num_preemptions++;
  stats_.preemptions++;
  waiting_.push_front(r);
}

StepWork Engine::schedule(double now_ms) {
  if (!planned_.empty()) throw std::logic_error("schedule() while a step is planned");
  StepWork work;
  std::uint32_t budget = profile_.max_num_batched_tokens;
  bool preempted = false;

  // 1. Running requests, in admission order.
  for (std::size_t i = 0; i < running_.size() && budget > 0;) {
    RequestPtr r = running_[i];
    const auto n_tokens = static_cast<std::uint32_t>(r->tokens.size());
    const std::uint32_t n = std::min(n_tokens - r->num_computed, budget);
    const std::uint32_t have = static_cast<std::uint32_t>(r->blocks.size());
    const std::uint32_t want = blocks_for(r->num_computed + n);
    const std::uint32_t need = want > have ? want - have : 0;
    bool self_preempted = false;
    while (need > pool_.num_free()) {
      RequestPtr victim = running_.back();
      preempt(victim);
      preempted = true;
      if (victim == r) {
        self_preempted = true;
        break;
      }
    }
    if (self_preempted) break;  // r was the last running request
    pool_.allocate(need, r->blocks);
    account(*r, n, work);
    planned_.push_back({r, n});
    budget -= n;
    ++i;
  }

  // 2. Waiting requests, first come first served, unless this step had to preempt.
  while (!preempted && !waiting_.empty() && budget > 0 && slots_used() < profile_.max_num_seqs) {
    if (!admit(waiting_.front(), budget, work, now_ms)) break;  // (admit() copies it)
  }
  if (!planned_.empty()) stats_.steps++;
  return work;
}

void Engine::complete_step(double now_ms) {
  std::vector<Planned> planned;
  planned.swap(planned_);
  for (auto& [rp, n] : planned) {
    SeqRequest& r = *rp;
    if (r.finished) continue;  // aborted during the step (by an earlier callback, too)
    r.num_computed += n;
    commit_full_blocks(r);
    if (r.num_computed < r.tokens.size()) continue;  // prefill chunk, more to come
    if (r.forks.empty()) {
      emit_token(rp, now_ms);
      continue;
    }
    // The prompt is computed: its forks share it and sample from the same logits.
    const std::vector<RequestPtr> forked = fork(r, now_ms);
    emit_token(rp, now_ms);
    for (const auto& f : forked) {
      if (!f->finished) emit_token(f, now_ms);
    }
  }
}

void Engine::emit_token(const RequestPtr& rp, double now_ms) {
  SeqRequest& r = *rp;
  const TokenId t = hooks_.sample(r);
  r.tokens.push_back(t);
  stats_.generation_tokens++;
  if (r.first_token_ms < 0) r.first_token_ms = now_ms;
  if (r.on_token) r.on_token(r, t);
  if (r.finished) return;  // the callback aborted it
  if (r.num_output_tokens() >= r.max_output_tokens) finish(rp, r.reason_at_limit, {}, now_ms);
}

std::vector<RequestPtr> Engine::fork(SeqRequest& parent, double now_ms) {
  std::vector<RequestPtr> forks;
  forks.swap(parent.forks);
  num_pending_forks_ -= forks.size();
  const std::uint32_t bs = profile_.block_size;
  const std::uint32_t full = parent.num_prompt_tokens / bs;
  const std::uint32_t partial = parent.num_prompt_tokens % bs != 0 ? 1 : 0;
  std::vector<RequestPtr> running;
  std::size_t queued = 0;
  for (const auto& f : forks) {
    if (f->finished) continue;
    if (slots_used() >= profile_.max_num_seqs || pool_.num_free() < partial) {
      // No room now: first in line, before anything that arrived after the parent.
      waiting_.insert(waiting_.begin() + static_cast<std::ptrdiff_t>(queued++), f);
      continue;
    }
    pool_.share(std::span<const std::uint32_t>(parent.blocks.data(), full), f->blocks);
    pool_.allocate(partial, f->blocks);  // its own copy of the last, partial block
    f->num_computed = parent.num_prompt_tokens;
    f->num_forked_tokens = parent.num_prompt_tokens;
    f->num_committed_blocks = std::min(parent.num_committed_blocks, full);
    f->num_cached_tokens = parent.num_cached_tokens;
    f->admitted_once = true;
    f->first_scheduled_ms = now_ms;
    running_.push_back(f);
    running.push_back(f);
  }
  return running;
}

void Engine::drop_forks(SeqRequest& r) {
  num_pending_forks_ -= r.forks.size();
  for (const auto& f : r.forks) {
    f->finished = true;
    stats_.requests_aborted++;
  }
  r.forks.clear();
}

bool Engine::drop_pending_fork(std::uint64_t id) {
  auto drop_from = [&](const RequestPtr& parent) {
    auto& forks = parent->forks;
    auto it = std::find_if(forks.begin(), forks.end(),
                           [&](const RequestPtr& f) { return f->id == id; });
    if (it == forks.end()) return false;
    (*it)->finished = true;
    stats_.requests_aborted++;
    forks.erase(it);
    num_pending_forks_--;
    return true;
  };
  if (num_pending_forks_ == 0) return false;
  for (const auto& r : running_) {
    if (drop_from(r)) return true;
  }
  for (const auto& r : waiting_) {
    if (drop_from(r)) return true;
  }
  for (const auto& [rid, r] : loading_) {
    if (drop_from(r)) return true;
  }
  return false;
}

void Engine::finish(const RequestPtr& rp, FinishReason reason, const std::string& error,
                    double now_ms) {
  SeqRequest& r = *rp;
  r.finished = true;
  r.finish_ms = now_ms;
  if (auto it = std::find(running_.begin(), running_.end(), rp); it != running_.end()) {
    running_.erase(it);
  }
  loading_.erase(r.id);
  if (reason == FinishReason::kError) {
    stats_.requests_failed++;
  } else {
    stats_.requests_finished++;
  }
  if (r.hold_blocks_after_finish && reason != FinishReason::kError) {
    held_.emplace(r.id, rp);
  } else {
    release_blocks(r);
  }
  // Forks are forked when the prompt is computed, before any finish but a failure: they
  // share the parent's fate.
  std::vector<RequestPtr> forks;
  forks.swap(r.forks);
  num_pending_forks_ -= forks.size();
  for (const auto& f : forks) {
    if (!f->finished) finish(f, reason, error, now_ms);
  }
  if (r.on_finish) r.on_finish(r, reason, error);
}

void Engine::abort(std::uint64_t id) {
  auto drop = [&](const RequestPtr& r) {
    r->finished = true;
    release_blocks(*r);
    stats_.requests_aborted++;
    drop_forks(*r);
  };
  if (auto it = std::find_if(running_.begin(), running_.end(),
                             [&](const RequestPtr& r) { return r->id == id; });
      it != running_.end()) {
    RequestPtr r = *it;
    running_.erase(it);
    drop(r);
    return;
  }
  if (auto it = std::find_if(waiting_.begin(), waiting_.end(),
                             [&](const RequestPtr& r) { return r->id == id; });
      it != waiting_.end()) {
    RequestPtr r = *it;
    waiting_.erase(it);
    drop(r);
    return;
  }
  if (auto it = loading_.find(id); it != loading_.end()) {
    RequestPtr r = it->second;
    loading_.erase(it);
    drop(r);
    return;
  }
  if (drop_pending_fork(id)) return;
  release_held(id);
}

void Engine::kv_load_done(std::uint64_t id, bool ok, bool recompute_on_failure,
                          const std::string& error, double now_ms) {
  auto it = loading_.find(id);
  if (it == loading_.end()) return;  // aborted meanwhile
  RequestPtr rp = it->second;
  loading_.erase(it);
  SeqRequest& r = *rp;
  if (ok) {
    // The remote KV covers the whole prompt; the last prompt token is recomputed here to
    // produce the first output token's logits.
    r.num_computed = r.num_prompt_tokens - 1;
    commit_full_blocks(r);
  } else if (!recompute_on_failure) {
    finish(rp, FinishReason::kError, error, now_ms);
    return;
  }
  // On a recomputed failure, num_computed stays at the local prefix hit.
  running_.push_back(rp);
}

bool Engine::release_held(std::uint64_t id) {
  auto it = held_.find(id);
  if (it == held_.end()) return false;
  release_blocks(*it->second);
  held_.erase(it);
  return true;
}

const SeqRequest* Engine::find_held(std::uint64_t id) const {
  auto it = held_.find(id);
  return it == held_.end() ? nullptr : it->second.get();
}

std::uint64_t Engine::waiting_uncached_tokens() const {
  std::uint64_t total = 0;
  for (const auto& r : waiting_) {
    const std::uint64_t n = r->tokens.size();
    // As at admission: the last token is always computed.
    const std::size_t usable = std::min<std::size_t>(r->block_keys.size(),
                                                     (n - 1) / profile_.block_size);
    const std::uint32_t hit =
        pool_.match_prefix(std::span<const BlockKey>(r->block_keys.data(), usable));
    total += n - std::min<std::uint64_t>(n, std::uint64_t{hit} * profile_.block_size);
  }
  return total;
}

std::uint64_t Engine::num_used_tokens() const noexcept {
  return std::uint64_t{pool_.num_blocks() - pool_.num_free()} * profile_.block_size;
}

}  // namespace omni::sim
