// Deterministic pseudo-random numbers for omni-bench. Everything a run draws (prompt tokens,
// synthetic arrivals and lengths) comes from here rather than from <random>'s distributions,
// whose algorithms differ between standard libraries: the same seed must give the same workload
// on every machine.
#pragma once

#include <omni/block_hash.hpp>

#include <cmath>
#include <cstdint>

namespace omni::replay {

// SplitMix64 (Steele, Lea, Flood 2014): a 64-bit counter with a strong output mix. Used both as
// a stream (next()) and as a stateless hash of a few words (mix3()).
class SplitMix64 {
 public:
  explicit SplitMix64(std::uint64_t seed) noexcept : state_(seed) {}

  std::uint64_t next() noexcept { return finalize(state_ += kGamma); }

  // Uniform in [0, 1) with 53 random bits.
  double uniform() noexcept { return static_cast<double>(next() >> 11) * 0x1.0p-53; }

  // Uniform in (0, 1]: safe to take the logarithm of.
  double uniform_open0() noexcept { return 1.0 - uniform(); }

  // Exponential with the given rate (mean 1/rate), by inversion.
  double exponential(double rate) noexcept { return -std::log(uniform_open0()) / rate; }

  // Standard normal, Box-Muller (one of the pair; simplicity over speed).
  double normal() noexcept {
    return std::sqrt(-2.0 * std::log(uniform_open0())) * std::cos(2.0 * kPi * uniform());
  }

  // Hash of (a, b, c): each word goes through the mix in turn, so any change to any word changes
  // the whole output. Prompt tokens are mix3(seed, segment, position).
  static std::uint64_t mix3(std::uint64_t a, std::uint64_t b, std::uint64_t c) noexcept {
    return finalize(finalize(finalize(a + kGamma) ^ b) + c);
  }

 private:
  static constexpr std::uint64_t kGamma = 0x9e3779b97f4a7c15ULL;
  static constexpr double kPi = 3.14159265358979323846;

  static std::uint64_t finalize(std::uint64_t z) noexcept { return omni::mix64(z); }

  std::uint64_t state_;
};

}  // namespace omni::replay
