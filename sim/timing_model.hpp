// The simulator's step-time model.
//
// An engine runs in steps. Each step computes a batch: chunks of prompts being prefilled and
// one token for each running decode. Its duration in milliseconds has named parts:
//
//   step_ms = step_overhead_ms                                   fixed cost of a step
//           + prefill_ms_per_token     * prefill_tokens          linear work per new token
//           + prefill_ms_per_mtok2     * attention_pairs / 1e6   attention of new tokens over
//                                                                their context (quadratic)
//           + decode_ms_per_seq        * decode_seqs             per-sequence decode work
//           + decode_ms_per_kv_ktoken  * decode_kv_tokens / 1e3  reading the KV cache
//
// then multiplied by a log-normal jitter of mean 1 and coefficient of variation jitter_cv,
// drawn from a seeded RNG. Only uncached tokens are computed, so a prefix-cache hit removes its
// tokens from prefill_tokens (but they still count as context in attention_pairs).
//
// KV transfer between a prefill and a decode instance takes
//   kv_transfer_base_ms + kv_transfer_ms_per_block * blocks.
//
// Profiles and the public sources of their numbers: docs/simulator.md.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace omni::sim {

struct Profile {
  std::string name;
  std::string description;
  // Engine limits.
  std::uint32_t block_size = 16;
  std::uint32_t num_blocks = 4096;
  std::uint32_t max_num_seqs = 256;
  std::uint32_t max_num_batched_tokens = 8192;
  std::uint32_t max_model_len = 32768;
  // Step time, milliseconds.
  double step_overhead_ms = 1.0;
  double prefill_ms_per_token = 0.001;
  double prefill_ms_per_mtok2 = 0.0;
  double decode_ms_per_seq = 0.01;
  double decode_ms_per_kv_ktoken = 0.0;
  double jitter_cv = 0.0;
  // KV transfer, milliseconds.
  double kv_transfer_base_ms = 0.5;
  double kv_transfer_ms_per_block = 0.01;
};

// Built-in profiles: "fast" (tests), "deepseek-v3-h800-prefill", "deepseek-v3-h800-decode"
// and "deepseek-v3-h800" (the decode numbers for an aggregated instance). Throws
// std::invalid_argument naming the known profiles on an unknown name.
Profile builtin_profile(std::string_view name);
std::vector<std::string> builtin_profile_names();
// Rejects impossible values (zero limits, negative times) with std::invalid_argument.
void validate(const Profile& p);

// What one step computes.
struct StepWork {
  std::uint64_t prefill_tokens = 0;    // uncached prompt tokens computed in this step
  double attention_pairs = 0.0;        // sum over computed tokens of their context length
  std::uint32_t decode_seqs = 0;       // sequences generating one token
  std::uint64_t decode_kv_tokens = 0;  // context tokens those sequences attend to
  bool empty() const noexcept { return prefill_tokens == 0 && decode_seqs == 0; }
};

// Attention pairs of a chunk of `n` new tokens appended after `context` computed tokens:
// sum_{i<n} (context + i + 1).
double attention_pairs(std::uint64_t context, std::uint64_t n) noexcept;

class TimingModel {
 public:
  TimingModel(Profile profile, std::uint64_t seed);

  // Expected step time, without jitter.
  double mean_step_ms(const StepWork& work) const noexcept;
  // A step time with jitter.
  double step_ms(const StepWork& work);
  double transfer_ms(std::uint64_t blocks) const noexcept;
  const Profile& profile() const noexcept { return profile_; }

 private:
  Profile profile_;
  std::mt19937_64 rng_;
  std::lognormal_distribution<double> jitter_;
};

}  // namespace omni::sim
