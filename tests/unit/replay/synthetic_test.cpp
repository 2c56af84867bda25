#include "synthetic.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <numeric>
#include <string>

namespace omni::replay {
namespace {

Workload generate(const std::string& spec, std::uint64_t seed = 1) {
  return generate_synthetic(parse_synthetic(spec), spec, seed);
}

bool starts_with(const std::vector<Segment>& v, const std::vector<Segment>& prefix) {
  if (prefix.size() > v.size()) return false;
  for (std::size_t i = 0; i < prefix.size(); ++i) {
    if (v[i].id != prefix[i].id || v[i].length != prefix[i].length) return false;
  }
  return true;
}

TEST(ReplaySynthetic, ParsesSpecAndNamesBadKeys) {
  const auto s = parse_synthetic(
      "requests=10,rate=2.5,arrival=fixed,input=uniform:5:9,output=lognormal:100:0.5,"
      "prefixes=3,prefix_len=64,users=4,turns=2");
  EXPECT_EQ(*s.requests, 10u);
  EXPECT_EQ(s.rate, 2.5);
  EXPECT_FALSE(s.poisson);
  EXPECT_EQ(s.input.kind, LengthDist::Kind::kUniform);
  EXPECT_EQ(s.output.kind, LengthDist::Kind::kLognormal);
  EXPECT_EQ(s.prefixes, 3u);
  EXPECT_EQ(s.users, 4u);
  auto message = [](const std::string& spec) {
    try {
      parse_synthetic(spec);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_EQ(message("rate=1"), "--synthetic: requests=N or duration=S is required");
  EXPECT_EQ(message("requests=5"), "--synthetic: rate=R (requests/s) is required");
  EXPECT_EQ(message("requests=5,rate=1,colour=red"), "--synthetic: unknown key \"colour\"");
  EXPECT_EQ(message("requests=5,rate=1,input=normal:3"),
            "--synthetic: length \"normal:3\": expected N, fixed:N, uniform:A:B or "
            "lognormal:MEAN:CV");
  EXPECT_EQ(message("requests=x,rate=1"),
            "--synthetic: requests: invalid value \"x\" (expected 1..10000000)");
  EXPECT_EQ(message("requests=5,rate=1,prefixes=2"),
            "--synthetic: prefixes=N needs prefix_len=TOKENS");
  EXPECT_EQ(message("requests=5,rate=1,rate=2"), "--synthetic: rate given twice");
  EXPECT_EQ(message("requests=5,rate=1,turns"), "--synthetic: \"turns\" is not KEY=VALUE");
}

TEST(ReplaySynthetic, IndependentPromptsByDefault) {
  const auto w = generate("requests=50,rate=10,input=100,output=7");
  ASSERT_EQ(w.requests.size(), 50u);
  std::map<std::uint64_t, int> ids;
  for (const auto& r : w.requests) {
    EXPECT_EQ(r.input_tokens, 100u);
    EXPECT_EQ(r.output_tokens, 7u);
    ASSERT_EQ(r.segments.size(), 1u);
    ids[r.segments[0].id]++;
  }
  EXPECT_EQ(ids.size(), 50u);
}

TEST(ReplaySynthetic, SharedSystemPromptsAndGrowingMultiTurnHistory) {
  const auto w = generate(
      "requests=400,rate=100,input=uniform:10:20,output=uniform:5:8,prefixes=2,prefix_len=300,"
      "users=3,turns=4");
  ASSERT_EQ(w.requests.size(), 400u);
  std::map<std::uint64_t, int> system_prompts;
  for (const auto& r : w.requests) {
    ASSERT_GE(r.segments.size(), 2u);
    EXPECT_LT(r.segments[0].id, 2u);  // one of the two system prompts
    EXPECT_EQ(r.segments[0].length, 300u);
    system_prompts[r.segments[0].id]++;
    // system prompt + (question, answer) per earlier turn + the new question
    EXPECT_EQ(r.segments.size() % 2, 0u);
    EXPECT_LE(r.segments.size(), 2u + 2 * 3);
    std::uint64_t sum = 0;
    for (const auto& s : r.segments) sum += s.length;
    EXPECT_EQ(sum, r.input_tokens);
    EXPECT_GE(r.segments.back().length, 10u);
    EXPECT_LE(r.segments.back().length, 20u);
  }
  EXPECT_EQ(system_prompts.size(), 2u);
  // Every later turn extends an earlier request's prompt (the previous turn) by that turn's
  // answer and a new question, and its history's answer lengths are that turn's max_tokens.
  int extended = 0;
  for (std::size_t i = 0; i < w.requests.size(); ++i) {
    const auto& r = w.requests[i];
    if (r.segments.size() == 2) continue;  // a first turn
    std::vector<Segment> previous(r.segments.begin(), r.segments.end() - 2);
    bool found = false;
    for (std::size_t j = 0; j < i && !found; ++j) {
      const auto& p = w.requests[j];
      found = p.segments.size() == previous.size() && starts_with(previous, p.segments) &&
              r.segments[r.segments.size() - 2].length == p.output_tokens;
    }
    EXPECT_TRUE(found) << "request " << i;
    extended += found;
  }
  EXPECT_GT(extended, 200);  // 3 of 4 turns are later turns
}

TEST(ReplaySynthetic, SameSeedSameWorkload) {
  const std::string spec =
      "requests=200,rate=20,input=lognormal:300:1,output=uniform:1:50,prefixes=4,prefix_len=100,"
      "users=2,turns=3";
  const auto a = generate(spec, 7), b = generate(spec, 7), c = generate(spec, 8);
  ASSERT_EQ(a.requests.size(), b.requests.size());
  bool differs = false;
  for (std::size_t i = 0; i < a.requests.size(); ++i) {
    EXPECT_EQ(a.requests[i].arrival_s, b.requests[i].arrival_s);
    EXPECT_EQ(a.requests[i].input_tokens, b.requests[i].input_tokens);
    EXPECT_EQ(a.requests[i].output_tokens, b.requests[i].output_tokens);
    EXPECT_TRUE(starts_with(a.requests[i].segments, b.requests[i].segments));
    differs |= a.requests[i].input_tokens != c.requests[i].input_tokens;
  }
  EXPECT_TRUE(differs);
}

TEST(ReplaySynthetic, PoissonRateAndDuration) {
  auto w = generate("requests=20000,rate=50");
  const double span = w.requests.back().arrival_s - w.requests.front().arrival_s;
  EXPECT_NEAR(19999 / span, 50, 50 * 0.03);  // sd of the estimate: 50/sqrt(20000) = 0.35
  // Exponential gaps: coefficient of variation 1.
  std::vector<double> gaps;
  for (std::size_t i = 1; i < w.requests.size(); ++i) {
    gaps.push_back(w.requests[i].arrival_s - w.requests[i - 1].arrival_s);
  }
  const double mean = std::accumulate(gaps.begin(), gaps.end(), 0.0) / gaps.size();
  double var = 0;
  for (double g : gaps) var += (g - mean) * (g - mean);
  EXPECT_NEAR(std::sqrt(var / gaps.size()) / mean, 1.0, 0.05);

  w = generate("duration=10,rate=4,arrival=fixed");
  ASSERT_EQ(w.requests.size(), 40u);
  EXPECT_DOUBLE_EQ(w.requests[1].arrival_s, 0.25);
  EXPECT_LT(w.requests.back().arrival_s, 10);
}

TEST(ReplaySynthetic, LengthDistributions) {
  SplitMix64 rng(3);
  const auto uniform = LengthDist::parse("uniform:5:9");
  std::map<std::uint32_t, int> seen;
  for (int i = 0; i < 5000; ++i) seen[uniform.sample(rng)]++;
  ASSERT_EQ(seen.size(), 5u);
  EXPECT_EQ(seen.begin()->first, 5u);
  EXPECT_EQ(seen.rbegin()->first, 9u);

  const auto lognormal = LengthDist::parse("lognormal:1000:0.5");
  std::vector<double> v;
  for (int i = 0; i < 50000; ++i) v.push_back(lognormal.sample(rng));
  const double mean = std::accumulate(v.begin(), v.end(), 0.0) / v.size();
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean);
  EXPECT_NEAR(mean, 1000, 15);
  EXPECT_NEAR(std::sqrt(var / v.size()) / mean, 0.5, 0.02);

  EXPECT_EQ(LengthDist::parse("42").sample(rng), 42u);
  EXPECT_EQ(LengthDist::parse("fixed:42").sample(rng), 42u);
  EXPECT_THROW(LengthDist::parse("uniform:9:5"), std::invalid_argument);
}

}  // namespace
}  // namespace omni::replay
