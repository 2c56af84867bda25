#include "timing_model.hpp"

#include <cmath>
#include <stdexcept>

namespace omni::sim {
namespace {

Profile fast_profile() {
  Profile p;
  p.name = "fast";
  p.description = "tiny, quick steps for tests; not calibrated";
  p.block_size = 16;
  p.num_blocks = 4096;
  p.max_num_seqs = 128;
  p.max_num_batched_tokens = 2048;
  p.max_model_len = 32768;
  p.step_overhead_ms = 2.0;
  p.prefill_ms_per_token = 0.002;
  p.prefill_ms_per_mtok2 = 0.0;
  p.decode_ms_per_seq = 0.01;
  p.decode_ms_per_kv_ktoken = 0.0;
  p.jitter_cv = 0.05;
  p.kv_transfer_base_ms = 1.0;
  p.kv_transfer_ms_per_block = 0.01;
  return p;
}

// DeepSeek-V3/R1 on H800 as DeepSeek serves it. One simulated instance is one node
// (8 x H800) of a deployment unit. Every number is derived in docs/simulator.md.
Profile deepseek_prefill_profile() {
  Profile p;
  p.name = "deepseek-v3-h800-prefill";
  p.description = "DeepSeek-V3 prefill, one H800 node of an EP32 unit";
  p.block_size = 64;                  // vLLM forces 64 for the FlashMLA backend
  p.num_blocks = 32768;               // ~2.1M tokens of MLA KV per node
  p.max_num_seqs = 256;
  p.max_num_batched_tokens = 131072;  // 16K tokens per GPU (profile-data) x 8
  p.max_model_len = 163840;
  p.step_overhead_ms = 30.0;
  p.prefill_ms_per_token = 0.0277;    // 32.2k uncached tokens/s per node at ~4K context
  p.prefill_ms_per_mtok2 = 1.69;      // slope of per-token time vs prompt length (LMSYS)
  p.decode_ms_per_seq = 0.0382;
  p.decode_ms_per_kv_ktoken = 0.00293;
  p.jitter_cv = 0.05;
  p.kv_transfer_base_ms = 1.0;
  p.kv_transfer_ms_per_block = 0.112;  // 64 x 70,272 B over ~40 GB/s RDMA
  return p;
}

Profile deepseek_decode_profile() {
  Profile p = deepseek_prefill_profile();
  p.name = "deepseek-v3-h800-decode";
  p.description = "DeepSeek-V3 decode, one H800 node of an EP144 unit";
  p.num_blocks = 65536;               // ~4.2M tokens of MLA KV per node
  p.max_num_seqs = 1024;
  p.max_num_batched_tokens = 8192;
  p.step_overhead_ms = 10.4;          // 61 layers x ~0.17 ms dispatch (LMSYS)
  p.decode_ms_per_seq = 0.0382;       // fits 47.6 ms (21 tok/s) at 705 seqs x 4,989 tokens
  p.decode_ms_per_kv_ktoken = 0.00293;  // 70,272 B/token over 8 x 3,000 GB/s (FlashMLA)
  return p;
}

}  // namespace

std::vector<std::string> builtin_profile_names() {
  return {"fast", "deepseek-v3-h800", "deepseek-v3-h800-prefill", "deepseek-v3-h800-decode"};
}

Profile builtin_profile(std::string_view name) {
  if (name == "fast") return fast_profile();
  if (name == "deepseek-v3-h800-prefill") return deepseek_prefill_profile();
  if (name == "deepseek-v3-h800-decode") return deepseek_decode_profile();
  if (name == "deepseek-v3-h800") {
    Profile p = deepseek_decode_profile();
    p.name = "deepseek-v3-h800";
    p.description = "DeepSeek-V3 aggregated: decode node limits, prefill costs of a prefill node";
    p.max_num_batched_tokens = 16384;
    p.prefill_ms_per_token = deepseek_prefill_profile().prefill_ms_per_token;
    return p;
  }
  std::string known;
  for (const auto& n : builtin_profile_names()) known += (known.empty() ? "" : ", ") + n;
  throw std::invalid_argument("unknown profile \"" + std::string(name) + "\"; known: " + known);
}

void validate(const Profile& p) {
  auto require = [](bool ok, const char* what) {
    if (!ok) throw std::invalid_argument(what);
  };
  require(p.block_size > 0, "block_size must be positive");
  require(p.num_blocks >= 2, "num_blocks must be at least 2");
  require(p.max_num_seqs > 0, "max_num_seqs must be positive");
  require(p.max_num_batched_tokens > 0, "max_num_batched_tokens must be positive");
  require(p.max_model_len > 1, "max_model_len must be at least 2");
  require(p.step_overhead_ms >= 0 && p.prefill_ms_per_token >= 0 && p.prefill_ms_per_mtok2 >= 0 &&
              p.decode_ms_per_seq >= 0 && p.decode_ms_per_kv_ktoken >= 0 &&
              p.kv_transfer_base_ms >= 0 && p.kv_transfer_ms_per_block >= 0,
          "step and transfer times must not be negative");
  require(p.jitter_cv >= 0 && p.jitter_cv < 2, "jitter_cv must be in [0, 2)");
}

double attention_pairs(std::uint64_t context, std::uint64_t n) noexcept {
  const double c = static_cast<double>(context);
  const double k = static_cast<double>(n);
  return k * c + k * (k + 1) / 2.0;
}

namespace {
// A log-normal with mean 1 and the given coefficient of variation.
std::lognormal_distribution<double> unit_mean_lognormal(double cv) {
  const double sigma2 = std::log1p(cv * cv);
  return std::lognormal_distribution<double>(-sigma2 / 2.0, std::sqrt(sigma2));
}
}  // namespace

TimingModel::TimingModel(Profile profile, std::uint64_t seed)
    : profile_(std::move(profile)), rng_(seed), jitter_(unit_mean_lognormal(profile_.jitter_cv)) {
  validate(profile_);
}

double TimingModel::mean_step_ms(const StepWork& work) const noexcept {
  if (work.empty()) return 0.0;
  const Profile& p = profile_;
  return p.step_overhead_ms + p.prefill_ms_per_token * static_cast<double>(work.prefill_tokens) +
         p.prefill_ms_per_mtok2 * work.attention_pairs / 1e6 +
         p.decode_ms_per_seq * static_cast<double>(work.decode_seqs) +
         p.decode_ms_per_kv_ktoken * static_cast<double>(work.decode_kv_tokens) / 1e3;
}

double TimingModel::step_ms(const StepWork& work) {
  const double mean = mean_step_ms(work);
  if (mean == 0.0 || profile_.jitter_cv == 0.0) return mean;
  return mean * jitter_(rng_);
}

double TimingModel::transfer_ms(std::uint64_t blocks) const noexcept {
  return profile_.kv_transfer_base_ms +
         profile_.kv_transfer_ms_per_block * static_cast<double>(blocks);
}

}  // namespace omni::sim
