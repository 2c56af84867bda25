#include "timing_model.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace omni::sim {
namespace {

// The "fast" profile without jitter and with coefficients chosen so every part of a step is
// easy to compute by hand.
Profile hand_profile() {
  Profile p = builtin_profile("fast");
  p.jitter_cv = 0.0;
  p.step_overhead_ms = 2.0;
  p.prefill_ms_per_token = 0.5;
  p.prefill_ms_per_mtok2 = 0.25;
  p.decode_ms_per_seq = 0.125;
  p.decode_ms_per_kv_ktoken = 8.0;
  p.kv_transfer_base_ms = 1.5;
  p.kv_transfer_ms_per_block = 0.25;
  return p;
}

struct StepCase {
  const char* name;
  StepWork work;
  double expected_ms;
};

TEST(TimingModel, MeanStepIsTheSumOfItsNamedParts) {
  // overhead 2 + 0.5/token + 0.25/M attention pairs + 0.125/seq + 8/K kv tokens
  const std::vector<StepCase> cases = {
      {"one prefill token", {1, 0.0, 0, 0}, 2.0 + 0.5},
      {"prefill only", {100, 0.0, 0, 0}, 2.0 + 50.0},
      {"attention only counts with tokens", {100, 4e6, 0, 0}, 2.0 + 50.0 + 1.0},
      {"one decode, no kv", {0, 0.0, 1, 0}, 2.0 + 0.125},
      {"decode with kv", {0, 0.0, 8, 3000}, 2.0 + 1.0 + 24.0},
      {"mixed batch", {100, 2e6, 8, 3000}, 2.0 + 50.0 + 0.5 + 1.0 + 24.0},
      {"large batch", {10000, 1e8, 1000, 1000000}, 2.0 + 5000.0 + 25.0 + 125.0 + 8000.0},
  };
  const TimingModel model(hand_profile(), 1);
  for (const auto& c : cases) {
    EXPECT_DOUBLE_EQ(model.mean_step_ms(c.work), c.expected_ms) << c.name;
  }
}

TEST(TimingModel, EachCoefficientScalesOnlyItsOwnPart) {
  // Zeroing all coefficients but one leaves exactly that part.
  const StepWork work{300, 5e6, 7, 2500};
  struct Part {
    const char* name;
    double Profile::*coef;
    double expected_ms;  // with the coefficient of hand_profile()
  };
  const std::vector<Part> parts = {
      {"overhead", &Profile::step_overhead_ms, 2.0},
      {"prefill tokens", &Profile::prefill_ms_per_token, 150.0},
      {"attention", &Profile::prefill_ms_per_mtok2, 1.25},
      {"decode seqs", &Profile::decode_ms_per_seq, 0.875},
      {"decode kv", &Profile::decode_ms_per_kv_ktoken, 20.0},
  };
  double sum = 0.0;
  for (const auto& part : parts) {
    Profile p = hand_profile();
    for (const auto& other : parts) {
      if (other.coef != part.coef) p.*(other.coef) = 0.0;
    }
    EXPECT_DOUBLE_EQ(TimingModel(p, 1).mean_step_ms(work), part.expected_ms) << part.name;
    sum += part.expected_ms;
  }
  EXPECT_DOUBLE_EQ(TimingModel(hand_profile(), 1).mean_step_ms(work), sum);
}

TEST(TimingModel, EmptyWorkCostsNothing) {
  TimingModel model(builtin_profile("fast"), 7);  // with jitter and a step overhead
  ASSERT_GT(model.profile().step_overhead_ms, 0.0);
  ASSERT_GT(model.profile().jitter_cv, 0.0);
  EXPECT_TRUE(StepWork{}.empty());
  EXPECT_EQ(model.mean_step_ms(StepWork{}), 0.0);
  EXPECT_EQ(model.step_ms(StepWork{}), 0.0);
  // attention pairs or kv tokens without tokens or sequences are not work either.
  const StepWork no_tokens{0, 123.0, 0, 456};
  EXPECT_TRUE(no_tokens.empty());
  EXPECT_EQ(model.mean_step_ms(no_tokens), 0.0);
}

TEST(TimingModel, AttentionPairsFormula) {
  struct Case {
    std::uint64_t context, n;
    double expected;
  };
  const std::vector<Case> cases = {
      {0, 0, 0.0},   {0, 1, 1.0},       {0, 4, 10.0},         {10, 1, 11.0},       {10, 3, 36.0},
      {100, 0, 0.0}, {4096, 1, 4097.0}, {0, 4096, 8390656.0}, {1000, 10, 10055.0},
  };
  for (const auto& c : cases) {
    EXPECT_DOUBLE_EQ(attention_pairs(c.context, c.n), c.expected)
        << "context=" << c.context << " n=" << c.n;
  }
  // Against the definition: sum_{i<n} (context + i + 1).
  for (std::uint64_t context : {0u, 1u, 7u, 64u}) {
    for (std::uint64_t n : {0u, 1u, 2u, 15u, 100u}) {
      double sum = 0;
      for (std::uint64_t i = 0; i < n; ++i) sum += static_cast<double>(context + i + 1);
      EXPECT_DOUBLE_EQ(attention_pairs(context, n), sum) << context << " " << n;
    }
  }
  // Chunking a prompt does not change its total attention.
  EXPECT_DOUBLE_EQ(attention_pairs(0, 100),
                   attention_pairs(0, 30) + attention_pairs(30, 50) + attention_pairs(80, 20));
}

TEST(TimingModel, NoJitterMeansStepTimeIsTheMean) {
  Profile p = hand_profile();
  TimingModel model(p, 99);
  const StepWork work{100, 2e6, 8, 3000};
  for (int i = 0; i < 5; ++i) EXPECT_EQ(model.step_ms(work), model.mean_step_ms(work));
}

std::vector<double> draws(std::uint64_t seed, double cv, int n) {
  Profile p = hand_profile();
  p.jitter_cv = cv;
  TimingModel model(p, seed);
  const StepWork work{100, 2e6, 8, 3000};
  std::vector<double> out;
  out.reserve(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) out.push_back(model.step_ms(work));
  return out;
}

TEST(TimingModel, JitterIsSeeded) {
  EXPECT_EQ(draws(42, 0.05, 100), draws(42, 0.05, 100));
  const auto a = draws(1, 0.05, 100);
  const auto b = draws(2, 0.05, 100);
  int equal = 0;
  for (std::size_t i = 0; i < a.size(); ++i) equal += a[i] == b[i] ? 1 : 0;
  EXPECT_EQ(equal, 0);
  // Jitter actually varies the step time.
  const auto c = draws(3, 0.05, 100);
  EXPECT_NE(c[0], c[1]);
}

TEST(TimingModel, JitterHasMeanOneAndTheConfiguredCv) {
  const double mean = TimingModel(hand_profile(), 1).mean_step_ms(StepWork{100, 2e6, 8, 3000});
  for (double cv : {0.05, 0.3, 0.8}) {
    const auto xs = draws(12345, cv, 20000);
    double sum = 0, sum2 = 0;
    for (double x : xs) {
      EXPECT_GT(x, 0.0);
      sum += x;
    }
    const double m = sum / static_cast<double>(xs.size());
    for (double x : xs) sum2 += (x - m) * (x - m);
    const double sd = std::sqrt(sum2 / static_cast<double>(xs.size() - 1));
    EXPECT_NEAR(m / mean, 1.0, 0.02) << "cv=" << cv;
    EXPECT_NEAR(sd / m, cv, 0.1 * cv) << "cv=" << cv;
  }
}

TEST(TimingModel, TransferIsLinearInBlocks) {
  const TimingModel model(hand_profile(), 1);  // 1.5 ms + 0.25 ms per block
  struct Case {
    std::uint64_t blocks;
    double expected_ms;
  };
  for (const Case& c : std::vector<Case>{{0, 1.5}, {1, 1.75}, {4, 2.5}, {1000, 251.5}}) {
    EXPECT_DOUBLE_EQ(model.transfer_ms(c.blocks), c.expected_ms) << c.blocks;
  }
}

TEST(TimingModel, EveryBuiltinProfileValidates) {
  const auto names = builtin_profile_names();
  ASSERT_GE(names.size(), 4u);
  for (const auto& name : names) {
    const Profile p = builtin_profile(name);
    EXPECT_EQ(p.name, name);
    EXPECT_FALSE(p.description.empty()) << name;
    EXPECT_NO_THROW(validate(p)) << name;
    EXPECT_NO_THROW(TimingModel(p, 1)) << name;
  }
}

TEST(TimingModel, UnknownProfileThrowsNamingTheKnownOnes) {
  try {
    (void)builtin_profile("no-such-gpu");
    FAIL() << "expected std::invalid_argument";
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("no-such-gpu"), std::string::npos) << what;
    for (const auto& name : builtin_profile_names()) {
      EXPECT_NE(what.find(name), std::string::npos) << name << " missing from: " << what;
    }
  }
}

TEST(TimingModel, ValidateRejectsImpossibleValues) {
  struct Case {
    const char* name;
    void (*mutate)(Profile&);
  };
  const std::vector<Case> cases = {
      {"block_size 0", [](Profile& p) { p.block_size = 0; }},
      {"num_blocks 0", [](Profile& p) { p.num_blocks = 0; }},
      {"num_blocks 1", [](Profile& p) { p.num_blocks = 1; }},
      {"max_num_seqs 0", [](Profile& p) { p.max_num_seqs = 0; }},
      {"max_num_batched_tokens 0", [](Profile& p) { p.max_num_batched_tokens = 0; }},
      {"max_model_len 0", [](Profile& p) { p.max_model_len = 0; }},
      {"max_model_len 1", [](Profile& p) { p.max_model_len = 1; }},
      {"negative overhead", [](Profile& p) { p.step_overhead_ms = -1; }},
      {"negative prefill", [](Profile& p) { p.prefill_ms_per_token = -0.001; }},
      {"negative attention", [](Profile& p) { p.prefill_ms_per_mtok2 = -1; }},
      {"negative decode seq", [](Profile& p) { p.decode_ms_per_seq = -1; }},
      {"negative decode kv", [](Profile& p) { p.decode_ms_per_kv_ktoken = -1; }},
      {"negative transfer base", [](Profile& p) { p.kv_transfer_base_ms = -1; }},
      {"negative transfer per block", [](Profile& p) { p.kv_transfer_ms_per_block = -1; }},
      {"negative jitter", [](Profile& p) { p.jitter_cv = -0.1; }},
      {"jitter 2", [](Profile& p) { p.jitter_cv = 2.0; }},
      {"NaN overhead", [](Profile& p) { p.step_overhead_ms = std::nan(""); }},
  };
  for (const auto& c : cases) {
    Profile p = builtin_profile("fast");
    c.mutate(p);
    EXPECT_THROW(validate(p), std::invalid_argument) << c.name;
    EXPECT_THROW(TimingModel(p, 1), std::invalid_argument) << c.name;
  }
  // Boundaries that are allowed.
  Profile p = builtin_profile("fast");
  p.num_blocks = 2;
  p.max_model_len = 2;
  p.step_overhead_ms = 0;
  p.jitter_cv = 0;
  EXPECT_NO_THROW(validate(p));
}

// Calibration against DeepSeek's published figures (derivations in the profile comments).
TEST(TimingModelCalibration, DeepSeekDecodeAt705SeqsOf4989Tokens) {
  const TimingModel model(builtin_profile("deepseek-v3-h800-decode"), 1);
  StepWork work;
  work.decode_seqs = 705;
  work.decode_kv_tokens = 705ull * 4989ull;
  const double expected_ms = 1000.0 / 21.0;  // 21 tokens/s per sequence, ~47.6 ms
  EXPECT_NEAR(model.mean_step_ms(work) / expected_ms, 1.0, 0.02) << model.mean_step_ms(work);
}

TEST(TimingModelCalibration, DeepSeekPrefillOf4096TokenPrompt) {
  const TimingModel model(builtin_profile("deepseek-v3-h800-prefill"), 1);
  StepWork work;
  work.prefill_tokens = 4096;
  work.attention_pairs = attention_pairs(0, 4096);
  const double per_token_ms =
      (model.mean_step_ms(work) - model.profile().step_overhead_ms) / 4096.0;
  const double expected_ms = 1000.0 / 32200.0;  // 32.2k uncached tokens/s per node
  EXPECT_NEAR(per_token_ms / expected_ms, 1.0, 0.05) << per_token_ms;
}

}  // namespace
}  // namespace omni::sim
