#include <omni/lifecycle.hpp>

#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

namespace omni {
namespace {

constexpr std::uint64_t kMs = 1'000'000;

TEST(Lifecycle, StageNamesInOrderAndRoundTrip) {
  const std::vector<std::string> expected = {
      "received",   "tokenized",      "apc_matched",      "waiting_prefill", "prefill_scheduled",
      "prefilling", "waiting_decode", "decode_scheduled", "decoding",        "done"};
  ASSERT_EQ(expected.size(), kStageCount);
  for (std::size_t i = 0; i < kStageCount; ++i) {
    const std::optional<Stage> s = stage_at(i);
    ASSERT_TRUE(s.has_value());
    EXPECT_EQ(stage_index(*s), i);
    EXPECT_EQ(stage_name(*s), expected[i]);
    EXPECT_EQ(stage_from_name(expected[i]), s);
  }
  EXPECT_FALSE(stage_at(kStageCount).has_value());
  EXPECT_FALSE(stage_from_name("prefill").has_value());
  EXPECT_EQ(stage_name(static_cast<Stage>(42)), "unknown");
}

TEST(Lifecycle, TimelineIsAPlainValue) {
  static_assert(std::is_trivially_copyable_v<Timeline>);
  Timeline t;
  ASSERT_EQ(t.enter(Stage::kReceived, 5 * kMs), EnterResult::kEntered);
  ASSERT_EQ(t.enter(Stage::kTokenized, 7 * kMs), EnterResult::kEntered);
  Timeline copy;
  std::memcpy(&copy, &t, sizeof t);
  EXPECT_EQ(copy, t);
  EXPECT_EQ(Timeline::from_raw(t.stamps(), t.skipped_mask()), t);
}

TEST(Lifecycle, EnteringEveryStageInOrder) {
  Timeline t;
  EXPECT_FALSE(t.current().has_value());
  for (std::size_t i = 0; i < kStageCount; ++i) {
    const Stage s = *stage_at(i);
    EXPECT_EQ(t.enter(s, (i + 1) * 10 * kMs), EnterResult::kEntered) << stage_name(s);
    EXPECT_EQ(t.current(), s);
    EXPECT_EQ(t.at_ns(s), (i + 1) * 10 * kMs);
    EXPECT_FALSE(t.skipped(s));
  }
  for (std::size_t i = 0; i + 1 < kStageCount; ++i) {
    EXPECT_EQ(t.duration_ns(*stage_at(i)), 10 * kMs) << i;
  }
  EXPECT_FALSE(t.duration_ns(Stage::kDone).has_value());
  EXPECT_EQ(t.total_ns(), 90 * kMs);
  EXPECT_EQ(t.age_ns(500 * kMs), 90 * kMs);  // frozen at done
}

TEST(Lifecycle, DurationUnknownWhileStageIsCurrent) {
  Timeline t;
  t.enter(Stage::kReceived, 1 * kMs);
  t.enter(Stage::kTokenized, 3 * kMs);
  EXPECT_EQ(t.duration_ns(Stage::kReceived), 2 * kMs);
  EXPECT_FALSE(t.duration_ns(Stage::kTokenized).has_value());
  EXPECT_FALSE(t.duration_ns(Stage::kApcMatched).has_value());
  EXPECT_FALSE(t.total_ns().has_value());
  EXPECT_EQ(t.age_ns(10 * kMs), 9 * kMs);
  EXPECT_FALSE(t.age_ns(kMs / 2).has_value());
}

TEST(Lifecycle, SkippedStagesAreZeroLengthAndFlagged) {
  Timeline t;
  ASSERT_EQ(t.enter(Stage::kReceived, 100), EnterResult::kEntered);
  // No APC lookup, no tokenization: straight to waiting for prefill.
  ASSERT_EQ(t.enter(Stage::kWaitingPrefill, 400), EnterResult::kEntered);
  EXPECT_EQ(t.current(), Stage::kWaitingPrefill);
  EXPECT_FALSE(t.skipped(Stage::kReceived));
  EXPECT_TRUE(t.skipped(Stage::kTokenized));
  EXPECT_TRUE(t.skipped(Stage::kApcMatched));
  EXPECT_FALSE(t.skipped(Stage::kWaitingPrefill));
  EXPECT_EQ(t.at_ns(Stage::kTokenized), 400u);
  EXPECT_EQ(t.at_ns(Stage::kApcMatched), 400u);
  EXPECT_EQ(t.duration_ns(Stage::kReceived), 300u);  // received lasts until the jump
  EXPECT_EQ(t.duration_ns(Stage::kTokenized), 0u);
  EXPECT_EQ(t.duration_ns(Stage::kApcMatched), 0u);
  // An error ends the request early: every remaining stage is skipped.
  ASSERT_EQ(t.enter(Stage::kDone, 900), EnterResult::kEntered);
  EXPECT_EQ(t.duration_ns(Stage::kWaitingPrefill), 500u);
  for (Stage s : {Stage::kPrefillScheduled, Stage::kPrefilling, Stage::kWaitingDecode,
                  Stage::kDecodeScheduled, Stage::kDecoding}) {
    EXPECT_TRUE(t.skipped(s)) << stage_name(s);
    EXPECT_EQ(t.duration_ns(s), 0u) << stage_name(s);
  }
  EXPECT_EQ(t.total_ns(), 800u);
}

TEST(Lifecycle, FirstStageOtherThanReceivedSkipsReceived) {
  Timeline t;
  ASSERT_EQ(t.enter(Stage::kTokenized, 50), EnterResult::kEntered);
  EXPECT_TRUE(t.skipped(Stage::kReceived));
  EXPECT_EQ(t.at_ns(Stage::kReceived), 50u);
  EXPECT_EQ(t.current(), Stage::kTokenized);
}

struct RejectCase {
  const char* name;
  Stage current;
  Stage next;
  std::uint64_t now;
  EnterResult want;
};

TEST(Lifecycle, GoingBackOrRepeatingIsRejectedAndChangesNothing) {
  const RejectCase cases[] = {
      {"back one", Stage::kPrefilling, Stage::kPrefillScheduled, 900,
       EnterResult::kRejectedBackwards},
      {"back to start", Stage::kDone, Stage::kReceived, 900, EnterResult::kRejectedBackwards},
      {"same stage", Stage::kDecoding, Stage::kDecoding, 900, EnterResult::kRejectedSameStage},
      {"done twice", Stage::kDone, Stage::kDone, 900, EnterResult::kRejectedSameStage},
      {"zero time", Stage::kReceived, Stage::kTokenized, 0, EnterResult::kRejectedBadTime},
      {"bad stage", Stage::kReceived, static_cast<Stage>(10), 900, EnterResult::kRejectedBadStage},
  };
  for (const RejectCase& c : cases) {
    Timeline t;
    ASSERT_TRUE(accepted(t.enter(Stage::kReceived, 100))) << c.name;
    if (c.current != Stage::kReceived) {
      ASSERT_TRUE(accepted(t.enter(c.current, 200))) << c.name;
    }
    const Timeline before = t;
    EXPECT_EQ(t.enter(c.next, c.now), c.want) << c.name;
    EXPECT_FALSE(accepted(c.want)) << c.name;
    EXPECT_EQ(t, before) << c.name;
    EXPECT_EQ(t.current(), c.current) << c.name;
  }
}

TEST(Lifecycle, TimeGoingBackwardsIsClampedNotNegative) {
  Timeline t;
  t.enter(Stage::kReceived, 1000);
  EXPECT_EQ(t.enter(Stage::kTokenized, 400), EnterResult::kEnteredClamped);
  EXPECT_TRUE(accepted(EnterResult::kEnteredClamped));
  EXPECT_EQ(t.at_ns(Stage::kTokenized), 1000u);
  EXPECT_EQ(t.duration_ns(Stage::kReceived), 0u);
}

struct LatencyCase {
  const char* name;
  std::uint64_t received, first_token, done;  // done 0: not done
  std::uint32_t output_tokens;
  std::optional<std::uint64_t> ttft;
  std::optional<double> tpot;
};

TEST(Lifecycle, TtftAndTpot) {
  const LatencyCase cases[] = {
      {"typical", 1'000 * kMs, 1'250 * kMs, 3'250 * kMs, 101, 250 * kMs, 20.0 * kMs},
      {"two tokens", 0 + kMs, 3 * kMs, 5 * kMs, 2, 2 * kMs, 2.0 * kMs},
      {"one token: no tpot", kMs, 3 * kMs, 3 * kMs, 1, 2 * kMs, std::nullopt},
      {"not done: no tpot", kMs, 3 * kMs, 0, 50, 2 * kMs, std::nullopt},
      {"no first token", kMs, 0, 9 * kMs, 50, std::nullopt, std::nullopt},
      {"first token before received", 5 * kMs, 4 * kMs, 9 * kMs, 50, std::nullopt, std::nullopt},
      {"first token after done", kMs, 10 * kMs, 9 * kMs, 50, 9 * kMs, std::nullopt},
  };
  for (const LatencyCase& c : cases) {
    Timeline t;
    ASSERT_TRUE(accepted(t.enter(Stage::kReceived, c.received))) << c.name;
    if (c.done != 0) {
      ASSERT_TRUE(accepted(t.enter(Stage::kDone, c.done))) << c.name;
    }
    EXPECT_EQ(t.ttft_ns(c.first_token), c.ttft) << c.name;
    const std::optional<double> tpot = t.tpot_ns(c.first_token, c.output_tokens);
    ASSERT_EQ(tpot.has_value(), c.tpot.has_value()) << c.name;
    if (tpot) {
      EXPECT_DOUBLE_EQ(*tpot, *c.tpot) << c.name;
    }
  }
  EXPECT_FALSE(Timeline{}.ttft_ns(5).has_value());
}

TEST(Lifecycle, FromRawRejectsShapesEnterCannotMake) {
  Timeline::Stamps gap{};
  gap[0] = 10;
  gap[2] = 20;  // stage 1 missing
  EXPECT_FALSE(Timeline::from_raw(gap, 0).has_value());
  Timeline::Stamps decreasing{};
  decreasing[0] = 10;
  decreasing[1] = 5;
  EXPECT_FALSE(Timeline::from_raw(decreasing, 0).has_value());
  Timeline::Stamps two{};
  two[0] = 10;
  two[1] = 20;
  EXPECT_TRUE(Timeline::from_raw(two, 0b01).has_value());
  EXPECT_FALSE(Timeline::from_raw(two, 0b10).has_value());  // current stage cannot be skipped
  EXPECT_TRUE(Timeline::from_raw(Timeline::Stamps{}, 0).has_value());
}

TEST(Lifecycle, MonotonicClockAdvances) {
  const std::uint64_t a = monotonic_now_ns();
  const std::uint64_t b = monotonic_now_ns();
  EXPECT_GT(a, 0u);
  EXPECT_GE(b, a);
}

}  // namespace
}  // namespace omni
