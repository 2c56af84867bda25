#include <omni/lifecycle.hpp>

#include <chrono>

namespace omni {
namespace {

constexpr std::array<std::string_view, kStageCount> kStageNames = {
    "received",   "tokenized",      "apc_matched",      "waiting_prefill", "prefill_scheduled",
    "prefilling", "waiting_decode", "decode_scheduled", "decoding",        "done",
};

}  // namespace

std::string_view stage_name(Stage s) noexcept {
  const std::size_t i = stage_index(s);
  return i < kStageCount ? kStageNames[i] : std::string_view("unknown");
}

std::optional<Stage> stage_from_name(std::string_view name) noexcept {
  for (std::size_t i = 0; i < kStageCount; ++i) {
    if (kStageNames[i] == name) return static_cast<Stage>(i);
  }
  return std::nullopt;
}

std::optional<Stage> stage_at(std::size_t index) noexcept {
  if (index >= kStageCount) return std::nullopt;
  return static_cast<Stage>(index);
}

std::uint64_t monotonic_now_ns() noexcept {
  const auto d = std::chrono::steady_clock::now().time_since_epoch();
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(d).count());
}

std::size_t Timeline::reached_count() const noexcept {
  std::size_t n = 0;
  while (n < kStageCount && at_ns_[n] != 0) ++n;
  return n;
}

std::optional<Stage> Timeline::current() const noexcept {
  const std::size_t n = reached_count();
  if (n == 0) return std::nullopt;
  return static_cast<Stage>(n - 1);
}

EnterResult Timeline::enter(Stage stage, std::uint64_t now_ns) noexcept {
  const std::size_t target = stage_index(stage);
  if (target >= kStageCount) return EnterResult::kRejectedBadStage;
  if (now_ns == 0) return EnterResult::kRejectedBadTime;
  const std::size_t n = reached_count();
  if (n > 0) {
    if (target == n - 1) return EnterResult::kRejectedSameStage;
    if (target < n - 1) return EnterResult::kRejectedBackwards;
  }
  EnterResult result = EnterResult::kEntered;
  if (n > 0 && now_ns < at_ns_[n - 1]) {
    now_ns = at_ns_[n - 1];
    result = EnterResult::kEnteredClamped;
  }
  for (std::size_t i = n; i < target; ++i) {
    at_ns_[i] = now_ns;
    skipped_mask_ = static_cast<std::uint16_t>(skipped_mask_ | (1u << i));
  }
  at_ns_[target] = now_ns;
  return result;
}

std::optional<std::uint64_t> Timeline::duration_ns(Stage s) const noexcept {
  const std::size_t i = stage_index(s);
  if (i + 1 >= kStageCount || at_ns_[i] == 0 || at_ns_[i + 1] == 0) return std::nullopt;
  return at_ns_[i + 1] - at_ns_[i];
}

std::optional<std::uint64_t> Timeline::total_ns() const noexcept {
  const std::uint64_t start = at_ns(Stage::kReceived);
  const std::uint64_t end = at_ns(Stage::kDone);
  if (start == 0 || end == 0) return std::nullopt;
  return end - start;
}

std::optional<std::uint64_t> Timeline::age_ns(std::uint64_t now_ns) const noexcept {
  const std::uint64_t start = at_ns(Stage::kReceived);
  if (start == 0) return std::nullopt;
  if (const std::uint64_t end = at_ns(Stage::kDone); end != 0) return end - start;
  if (now_ns < start) return std::nullopt;
  return now_ns - start;
}

std::optional<std::uint64_t> Timeline::ttft_ns(std::uint64_t first_token_ns) const noexcept {
  const std::uint64_t start = at_ns(Stage::kReceived);
  if (start == 0 || first_token_ns == 0 || first_token_ns < start) return std::nullopt;
  return first_token_ns - start;
}

std::optional<double> Timeline::tpot_ns(std::uint64_t first_token_ns,
                                        std::uint32_t output_tokens) const noexcept {
  const std::uint64_t start = at_ns(Stage::kReceived);
  const std::uint64_t end = at_ns(Stage::kDone);
  if (end == 0 || output_tokens < 2 || first_token_ns == 0 || first_token_ns < start ||
      first_token_ns > end) {
    return std::nullopt;
  }
  return static_cast<double>(end - first_token_ns) / static_cast<double>(output_tokens - 1);
}

std::optional<Timeline> Timeline::from_raw(const Stamps& stamps,
                                           std::uint16_t skipped_mask) noexcept {
  Timeline t;
  t.at_ns_ = stamps;
  t.skipped_mask_ = skipped_mask;
  const std::size_t n = t.reached_count();
  for (std::size_t i = n; i < kStageCount; ++i) {
    if (stamps[i] != 0) return std::nullopt;  // a gap: not a prefix
  }
  for (std::size_t i = 1; i < n; ++i) {
    if (stamps[i] < stamps[i - 1]) return std::nullopt;
  }
  // Only stages before the current one can be skipped.
  const std::uint32_t allowed = n == 0 ? 0u : ((1u << (n - 1)) - 1u);
  if ((skipped_mask & ~allowed) != 0) return std::nullopt;
  return t;
}

}  // namespace omni
