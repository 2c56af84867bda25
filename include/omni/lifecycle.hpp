// The ten-stage request lifecycle and a per-request timeline of when each stage was entered.
//
// Stages, in order (a request only ever moves forward):
//   received → tokenized → apc_matched → waiting_prefill → prefill_scheduled →
//   prefilling → waiting_decode → decode_scheduled → decoding → done
// A request may skip stages (no APC lookup, parallel P/D with no separate decode wait, an
// error that ends it early); a skipped stage gets the timestamp of the stage entered after it,
// so it lasts zero nanoseconds, and is flagged as skipped.
//
// Timestamps are monotonic nanoseconds (CLOCK_MONOTONIC, the clock std::chrono::steady_clock
// reads on Linux; it is system-wide, so stamps taken by different nginx workers compare).
// 0 means "not reached". Timeline is a plain value (trivially copyable, fixed size) so that it
// can be copied into and out of shared memory.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <type_traits>

namespace omni {

enum class Stage : std::uint8_t {
  kReceived = 0,
  kTokenized,
  kApcMatched,
  kWaitingPrefill,
  kPrefillScheduled,
  kPrefilling,
  kWaitingDecode,
  kDecodeScheduled,
  kDecoding,
  kDone,
};

inline constexpr std::size_t kStageCount = 10;

constexpr std::size_t stage_index(Stage s) noexcept {
  return static_cast<std::size_t>(s);
}

// The label value used in metrics and JSON: "received", "tokenized", "apc_matched",
// "waiting_prefill", "prefill_scheduled", "prefilling", "waiting_decode", "decode_scheduled",
// "decoding", "done". An out-of-range value gives "unknown".
std::string_view stage_name(Stage s) noexcept;
// Inverse of stage_name.
std::optional<Stage> stage_from_name(std::string_view name) noexcept;
// The stage at `index` (0..kStageCount-1), nullopt past the end.
std::optional<Stage> stage_at(std::size_t index) noexcept;

// Nanoseconds on the monotonic clock; never 0 on a running Linux system.
std::uint64_t monotonic_now_ns() noexcept;

enum class EnterResult : std::uint8_t {
  kEntered,            // recorded at `now`
  kEnteredClamped,     // recorded, but `now` was earlier than the previous stamp: recorded at
                       // that stamp instead, so durations never go negative
  kRejectedSameStage,  // already in this stage; nothing changed
  kRejectedBackwards,  // a stage earlier than the current one; nothing changed
  kRejectedBadTime,    // now == 0 (reserved for "not reached"); nothing changed
  kRejectedBadStage,   // not one of the ten stages; nothing changed
};

constexpr bool accepted(EnterResult r) noexcept {
  return r == EnterResult::kEntered || r == EnterResult::kEnteredClamped;
}

class Timeline {
 public:
  using Stamps = std::array<std::uint64_t, kStageCount>;

  // Moves to `stage` at `now_ns`. Stages between the current one and `stage` are recorded as
  // skipped with the same stamp (zero length); entering a first stage other than kReceived
  // skips kReceived too.
  EnterResult enter(Stage stage, std::uint64_t now_ns) noexcept;

  // The latest stage entered; nullopt before the first enter().
  std::optional<Stage> current() const noexcept;
  bool reached(Stage s) const noexcept { return at_ns_[stage_index(s)] != 0; }
  // Skipped: reached only because a later stage was entered.
  bool skipped(Stage s) const noexcept { return (skipped_mask_ >> stage_index(s)) & 1u; }
  // The stamp of `s`, 0 when not reached.
  std::uint64_t at_ns(Stage s) const noexcept { return at_ns_[stage_index(s)]; }

  // Time from entering `s` to entering the next stage; nullopt while `s` is current or not
  // reached, and for kDone (which has no next stage). 0 for skipped stages.
  std::optional<std::uint64_t> duration_ns(Stage s) const noexcept;
  // received → done; nullopt until done.
  std::optional<std::uint64_t> total_ns() const noexcept;
  // received → `now_ns` (or → done once done); nullopt before received or if now is earlier.
  std::optional<std::uint64_t> age_ns(std::uint64_t now_ns) const noexcept;
  // Time to first token: received → `first_token_ns` (tracked by the caller; the first token
  // arrives somewhere inside prefilling..decoding). nullopt when not received, when
  // first_token_ns is 0 or earlier than received.
  std::optional<std::uint64_t> ttft_ns(std::uint64_t first_token_ns) const noexcept;
  // Time per output token after the first: (done − first token) / (output_tokens − 1), in
  // nanoseconds. nullopt until done, with fewer than 2 output tokens, or when first_token_ns
  // is 0 or outside [received, done].
  std::optional<double> tpot_ns(std::uint64_t first_token_ns,
                                std::uint32_t output_tokens) const noexcept;

  // Raw state, for storing a timeline field by field (shared memory).
  const Stamps& stamps() const noexcept { return at_ns_; }
  std::uint16_t skipped_mask() const noexcept { return skipped_mask_; }
  // Rebuilds a timeline from raw state; nullopt unless the stamps are a non-decreasing prefix of
  // non-zero values followed by zeros and the mask only flags reached stages other than the
  // current one (the shape enter() produces).
  static std::optional<Timeline> from_raw(const Stamps& stamps,
                                          std::uint16_t skipped_mask) noexcept;

  friend bool operator==(const Timeline&, const Timeline&) = default;

 private:
  // Number of stages reached: the reached ones are always a prefix.
  std::size_t reached_count() const noexcept;

  Stamps at_ns_{};
  std::uint16_t skipped_mask_ = 0;  // bit i: stage i was skipped
};

static_assert(std::is_trivially_copyable_v<Timeline>);
static_assert(std::is_standard_layout_v<Timeline>);
static_assert(sizeof(Timeline) == 88);

}  // namespace omni
