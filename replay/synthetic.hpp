// Synthetic workloads: arrivals at a fixed or Poisson rate, drawn lengths, and optionally a
// shared-prefix, multi-turn structure, all from one seed (the same seed and spec give the same
// workload, request for request).
//
// Structure: `prefixes` system prompts of `prefix_len` tokens, each with `users` users (so
// prefixes x users conversation slots; with prefixes=0 there are `users` slots and no system
// prompt). Every request picks a slot uniformly at random and sends that slot's next turn:
//   system prompt + every earlier question and answer of the conversation + a new question,
// with the question's length drawn from `input` and the answer's (max_tokens) from `output`.
// After `turns` turns the slot starts a new conversation (same system prompt, fresh history).
// The defaults (users=1, turns=1, prefixes=0) give independent prompts of `input` tokens.
//
// The answers in the history are tokens of our own, not what the engine generated, so a turn
// can hit the cache on the previous turn's prompt but not on its answer, as for a real client
// whose engine does not keep decode blocks; and the replay stays open-loop: a turn does not wait
// for the previous one to finish.
#pragma once

#include "random.hpp"
#include "workload.hpp"

#include <cstdint>
#include <optional>
#include <string>

namespace omni::replay {

// A length distribution: "N" or "fixed:N", "uniform:A:B" (inclusive), "lognormal:MEAN:CV"
// (a log-normal with that mean and coefficient of variation). Draws are at least 1.
struct LengthDist {
  enum class Kind { kFixed, kUniform, kLognormal };
  Kind kind = Kind::kFixed;
  double a = 1;  // fixed value, uniform low, lognormal mean
  double b = 0;  // uniform high, lognormal cv

  static LengthDist parse(const std::string& text);  // throws std::invalid_argument
  std::uint32_t sample(SplitMix64& rng) const;
};

struct SyntheticSpec {
  std::optional<std::uint64_t> requests;  // stop after this many requests,
  std::optional<double> duration_s;       // or when arrivals pass this time (whichever first)
  double rate = 0;                        // requests per second (trace time)
  bool poisson = true;                    // else one every 1/rate s
  LengthDist input{LengthDist::Kind::kFixed, 512, 0};
  LengthDist output{LengthDist::Kind::kFixed, 128, 0};
  std::uint32_t prefixes = 0;
  std::uint32_t prefix_len = 0;
  std::uint32_t users = 1;
  std::uint32_t turns = 1;
};

// Upper bound on generated requests, so a typo cannot exhaust memory.
inline constexpr std::uint64_t kMaxSyntheticRequests = 10'000'000;

// "KEY=VAL,KEY=VAL,...": keys requests, duration, rate, arrival (poisson|fixed), input, output,
// prefixes, prefix_len, users, turns. Throws std::invalid_argument naming the key.
SyntheticSpec parse_synthetic(const std::string& text);

// The workload (`text` is the spec as given, kept as its name). Arrival times start at the
// first draw; apply_slice() re-bases them to 0.
Workload generate_synthetic(const SyntheticSpec& spec, const std::string& text, std::uint64_t seed);

}  // namespace omni::replay
