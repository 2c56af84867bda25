#include <omni/shared_state.hpp>

#include <omni/prometheus.hpp>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <thread>
#include <vector>

#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

namespace omni {
namespace {

using ::testing::HasSubstr;

constexpr std::uint64_t kMs = 1'000'000;
constexpr std::uint64_t kSec = 1'000'000'000;
constexpr std::uint16_t kP0 = 0, kP1 = 1, kD0 = 2, kD1 = 3;

SharedStateConfig test_config(std::uint32_t slots) {
  SharedStateConfig c;
  c.max_slots = slots;
  c.max_backends = 8;
  c.max_owners = 16;
  c.backends = {{"10.0.0.1:8000", "prefill"},
                {"10.0.0.2:8000", "prefill"},
                {"10.0.0.3:9000", "decode"},
                {"10.0.0.4:9000", "decode"}};
  return c;
}

// A 64-aligned heap region, pre-filled with garbage so create() must initialise everything.
class Region {
 public:
  explicit Region(std::size_t bytes, std::size_t misalign = 0)
      : bytes_(bytes), raw_(static_cast<char*>(std::aligned_alloc(64, round(bytes + misalign)))) {
    std::memset(raw_, 0xA5, round(bytes + misalign));
    data_ = raw_ + misalign;
  }
  ~Region() { std::free(raw_); }
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;
  void* data() const { return data_; }
  std::size_t size() const { return bytes_; }

 private:
  static std::size_t round(std::size_t n) { return (n + 63) / 64 * 64; }
  std::size_t bytes_;
  char* raw_;
  char* data_;
};

std::unique_ptr<SharedState> create_or_die(const Region& r, const SharedStateConfig& c) {
  OpenResult res = SharedState::create(r.data(), r.size(), c);
  EXPECT_TRUE(res.ok()) << res.error;
  return std::move(res.state);
}

void expect_gauges_zero(const SharedState& st) {
  EXPECT_EQ(st.slots_used(), 0u);
  for (std::size_t i = 0; i < kStageCount; ++i) {
    EXPECT_EQ(st.requests_in_stage(*stage_at(i)), 0) << stage_name(*stage_at(i));
  }
  for (std::uint16_t b = 0; b < st.backend_count(); ++b) {
    EXPECT_EQ(st.backend_outstanding(b), 0) << b;
    EXPECT_EQ(st.backend_active_streams(b), 0) << b;
  }
}

std::size_t slots_in_use(const SharedState& st) {
  std::size_t n = 0;
  for (std::uint32_t i = 0; i < st.capacity(); ++i) {
    if (st.read_index(i, nullptr) != SlotRead::kFree) ++n;
  }
  return n;
}

// --------------------------------------------------------------------------------------------
// Sizing
// --------------------------------------------------------------------------------------------

TEST(SharedState, BytesPerSlot) {
  static_assert(SharedState::kSlotBytes <= 256);
  EXPECT_EQ(SharedState::kSlotBytes, 192u);
  SharedStateConfig a = test_config(1000);
  SharedStateConfig b = test_config(21000);
  EXPECT_EQ(SharedState::required_bytes(b) - SharedState::required_bytes(a),
            20000 * SharedState::kSlotBytes);
  // 20,000 slots and 64 backends: a few MiB, not the reference's 2 GiB.
  SharedStateConfig big = test_config(20000);
  big.max_backends = 64;
  big.max_owners = 64;
  EXPECT_LT(SharedState::required_bytes(big), 5u << 20);
}

TEST(SharedState, RequiredBytesIsEnoughAndOneLessIsAClearError) {
  struct Case {
    std::uint32_t slots, backends, owners;
  };
  for (const Case& c : {Case{1, 1, 1}, Case{7, 4, 3}, Case{100, 8, 16}, Case{20000, 64, 64},
                        Case{1000, 256, 128}}) {
    SharedStateConfig cfg = test_config(c.slots);
    cfg.max_backends = c.backends;
    cfg.max_owners = c.owners;
    cfg.backends.resize(std::min<std::size_t>(cfg.backends.size(), c.backends));
    const std::size_t need = SharedState::required_bytes(cfg);
    for (std::size_t misalign : {0, 1, 8, 63}) {
      Region ok(need, misalign);
      OpenResult r = SharedState::create(ok.data(), ok.size(), cfg);
      ASSERT_TRUE(r.ok()) << c.slots << "/" << c.backends << "/" << c.owners << " misalign "
                          << misalign << ": " << r.error;
      EXPECT_EQ(r.state->capacity(), c.slots);
      // Every slot is usable.
      for (std::uint32_t i = 0; i < c.slots; ++i) ASSERT_TRUE(r.state->acquire(7, 1 + i));
    }
    Region small(need - 1);
    OpenResult r = SharedState::create(small.data(), small.size(), cfg);
    EXPECT_EQ(r.status, OpenStatus::kRegionTooSmall);
    EXPECT_FALSE(r.state);
    EXPECT_THAT(r.error, HasSubstr("too small"));
    EXPECT_THAT(r.error, HasSubstr(std::to_string(need)));
  }
}

TEST(SharedState, CapacityDerivedFromRegionSize) {
  SharedStateConfig cfg = test_config(0);  // as many as fit
  Region r(1 << 20);
  auto st = create_or_die(r, cfg);
  const std::uint32_t cap = SharedState::max_slots_for(r.size(), cfg);
  EXPECT_EQ(st->capacity(), cap);
  cfg.max_slots = cap;
  EXPECT_LE(SharedState::required_bytes(cfg), r.size());
  cfg.max_slots = cap + 1;
  EXPECT_GT(SharedState::required_bytes(cfg), r.size());

  Region tiny(512);
  OpenResult t = SharedState::create(tiny.data(), tiny.size(), test_config(0));
  EXPECT_EQ(t.status, OpenStatus::kRegionTooSmall);
  EXPECT_THAT(t.error, HasSubstr("holds no slot"));
}

TEST(SharedState, BadConfigIsAnErrorNotACrash) {
  Region r(1 << 20);
  auto expect_bad = [&](SharedStateConfig c, const char* what) {
    OpenResult res = SharedState::create(r.data(), r.size(), c);
    EXPECT_EQ(res.status, OpenStatus::kBadArgument) << what;
    EXPECT_THAT(res.error, HasSubstr(what));
  };
  SharedStateConfig c = test_config(10);
  c.max_backends = 2;
  expect_bad(c, "exceed max_backends");
  c = test_config(10);
  c.backends[1].name = std::string(200, 'x');
  expect_bad(c, "name must be");
  c = test_config(10);
  c.backends[1] = c.backends[0];
  expect_bad(c, "registered twice");
  c = test_config(10);
  c.max_owners = 0;
  expect_bad(c, "max_owners");
  EXPECT_EQ(SharedState::create(nullptr, 100, test_config(10)).status, OpenStatus::kBadArgument);
  EXPECT_EQ(SharedState::attach(nullptr, 100).status, OpenStatus::kBadArgument);
}

// --------------------------------------------------------------------------------------------
// Create / attach
// --------------------------------------------------------------------------------------------

TEST(SharedState, AttachFromSecondViewSeesTheSameState) {
  const SharedStateConfig cfg = test_config(100);
  Region r(SharedState::required_bytes(cfg));
  auto a = create_or_die(r, cfg);
  const auto h = a->acquire(1001, 10 * kMs, 0xfeed);
  ASSERT_TRUE(h);
  ASSERT_EQ(a->set_backends(*h, kP1, kD0), SlotResult::kOk);
  ASSERT_EQ(a->set_stage(*h, Stage::kPrefilling, 12 * kMs), SlotResult::kOk);
  ASSERT_EQ(a->set_tokens(*h, 900, 512, 0), SlotResult::kOk);

  OpenResult res = SharedState::attach(r.data(), r.size(), &cfg);
  ASSERT_TRUE(res.ok()) << res.error;
  SharedState& b = *res.state;
  EXPECT_EQ(b.capacity(), 100u);
  EXPECT_EQ(b.backend_count(), 4);
  EXPECT_EQ(b.find_backend("10.0.0.3:9000"), kD0);
  EXPECT_EQ(b.slots_used(), 1u);
  EXPECT_EQ(b.requests_in_stage(Stage::kPrefilling), 1);
  EXPECT_EQ(b.backend_outstanding(kP1), 1);
  EXPECT_EQ(b.backend_outstanding(kD0), 1);
  const std::optional<SlotSnapshot> snap = b.read(*h);
  ASSERT_TRUE(snap);
  EXPECT_EQ(snap->request_id, 0xfeedu);
  EXPECT_EQ(snap->handle.owner_pid, 1001);
  EXPECT_EQ(snap->prefill, kP1);
  EXPECT_EQ(snap->decode, kD0);
  EXPECT_EQ(snap->prompt_tokens, 900u);
  EXPECT_EQ(snap->cached_tokens, 512u);
  EXPECT_EQ(snap->timeline.current(), Stage::kPrefilling);
  EXPECT_EQ(snap->timeline.at_ns(Stage::kReceived), 10 * kMs);
  EXPECT_TRUE(snap->timeline.skipped(Stage::kTokenized));

  // Writes through either view are seen by the other.
  const auto h2 = b.acquire(1002, 20 * kMs);
  ASSERT_TRUE(h2);
  EXPECT_EQ(a->slots_used(), 2u);
  EXPECT_EQ(b.release(*h), SlotResult::kOk);
  EXPECT_EQ(a->slots_used(), 1u);
  EXPECT_EQ(a->backend_outstanding(kP1), 0);
  EXPECT_THAT(a->owners(), ::testing::UnorderedElementsAre(1001, 1002));
}

TEST(SharedState, AttachAtAnotherAddressUsesOffsetsOnly) {
  const SharedStateConfig cfg = test_config(50);
  Region r1(SharedState::required_bytes(cfg));
  auto a = create_or_die(r1, cfg);
  const auto h = a->acquire(77, 5 * kMs);
  ASSERT_TRUE(h);
  ASSERT_EQ(a->set_stage(*h, Stage::kDecoding, 9 * kMs), SlotResult::kOk);
  // Same bytes mapped elsewhere (as after a remap): every reference must be relative.
  Region r2(r1.size());
  std::memcpy(r2.data(), r1.data(), r1.size());
  OpenResult res = SharedState::attach(r2.data(), r2.size(), &cfg);
  ASSERT_TRUE(res.ok()) << res.error;
  EXPECT_EQ(res.state->requests_in_stage(Stage::kDecoding), 1);
  const auto snap = res.state->read(*h);
  ASSERT_TRUE(snap);
  EXPECT_EQ(snap->timeline.at_ns(Stage::kDecoding), 9 * kMs);
  EXPECT_EQ(res.state->release(*h), SlotResult::kOk);
  EXPECT_EQ(a->slots_used(), 1u);  // the original is untouched
  expect_gauges_zero(*res.state);
}

TEST(SharedState, AttachReportsUninitialisedIncompatibleOrCorruptRegions) {
  const SharedStateConfig cfg = test_config(100);
  Region r(SharedState::required_bytes(cfg));
  std::memset(r.data(), 0, r.size());
  OpenResult none = SharedState::attach(r.data(), r.size(), &cfg);
  EXPECT_EQ(none.status, OpenStatus::kNotInitialized);
  EXPECT_THAT(none.error, HasSubstr("magic"));

  auto st = create_or_die(r, cfg);
  EXPECT_TRUE(SharedState::attach(r.data(), r.size(), nullptr).ok());

  SharedStateConfig other = cfg;
  other.backends[2].name = "10.0.0.9:9000";
  OpenResult renamed = SharedState::attach(r.data(), r.size(), &other);
  EXPECT_EQ(renamed.status, OpenStatus::kConfigMismatch);
  EXPECT_THAT(renamed.error, HasSubstr("10.0.0.9:9000"));
  other = cfg;
  other.backends.pop_back();
  EXPECT_EQ(SharedState::attach(r.data(), r.size(), &other).status, OpenStatus::kConfigMismatch);
  other = cfg;
  other.max_slots = 200;
  OpenResult more = SharedState::attach(r.data(), r.size(), &other);
  EXPECT_EQ(more.status, OpenStatus::kConfigMismatch);
  EXPECT_THAT(more.error, HasSubstr("max_slots 100"));
  other.max_slots = 0;  // "whatever is there" is compatible
  EXPECT_TRUE(SharedState::attach(r.data(), r.size(), &other).ok());

  EXPECT_EQ(SharedState::attach(r.data(), r.size() / 2, &cfg).status, OpenStatus::kRegionTooSmall);

  // The layout version lives right after the 8-byte magic at the start of the root.
  auto* version = reinterpret_cast<std::uint32_t*>(static_cast<char*>(r.data()) + 8);
  const std::uint32_t saved = *version;
  *version = saved + 1;
  OpenResult old = SharedState::attach(r.data(), r.size(), &cfg);
  EXPECT_EQ(old.status, OpenStatus::kLayoutMismatch);
  EXPECT_THAT(old.error, HasSubstr("layout version"));
  *version = saved;
  EXPECT_TRUE(SharedState::attach(r.data(), r.size(), &cfg).ok());
}

// --------------------------------------------------------------------------------------------
// Slots
// --------------------------------------------------------------------------------------------

TEST(SharedState, FillToCapacityThenAcquireFailsCleanly) {
  constexpr std::uint32_t kSlots = 20000;  // past the reference's 16,384 crash
  const SharedStateConfig cfg = test_config(kSlots);
  Region r(SharedState::required_bytes(cfg));
  auto st = create_or_die(r, cfg);
  std::vector<SlotHandle> held;
  std::vector<bool> seen(kSlots, false);
  for (std::uint32_t i = 0; i < kSlots; ++i) {
    const auto h = st->acquire(100 + static_cast<std::int32_t>(i % 4), 1 + i);
    ASSERT_TRUE(h) << i;
    ASSERT_LT(h->index, kSlots);
    ASSERT_FALSE(seen[h->index]) << "slot " << h->index << " claimed twice";
    seen[h->index] = true;
    held.push_back(*h);
  }
  EXPECT_EQ(st->slots_used(), kSlots);
  EXPECT_EQ(st->requests_in_stage(Stage::kReceived), kSlots);
  EXPECT_FALSE(st->acquire(100, 99 * kSec));
  EXPECT_FALSE(st->acquire(100, 99 * kSec));
  EXPECT_EQ(st->acquire_failures_total(), 2u);

  // One release makes exactly that slot available again.
  const SlotHandle freed = held[12345];
  ASSERT_EQ(st->release(freed), SlotResult::kOk);
  const auto again = st->acquire(100, 100 * kSec);
  ASSERT_TRUE(again);
  EXPECT_EQ(again->index, freed.index);
  EXPECT_NE(again->generation, freed.generation);
  held[12345] = *again;

  for (const SlotHandle& h : held) ASSERT_EQ(st->release(h), SlotResult::kOk);
  expect_gauges_zero(*st);
  EXPECT_EQ(slots_in_use(*st), 0u);
}

TEST(SharedState, ReleaseAndReuseRejectsStaleHandles) {
  const SharedStateConfig cfg = test_config(1);
  Region r(SharedState::required_bytes(cfg));
  auto st = create_or_die(r, cfg);
  const auto h1 = st->acquire(42, 1 * kMs);
  ASSERT_TRUE(h1);
  EXPECT_FALSE(st->acquire(43, 2 * kMs));  // full
  ASSERT_EQ(st->release(*h1), SlotResult::kOk);

  EXPECT_EQ(st->release(*h1), SlotResult::kStaleHandle);
  EXPECT_EQ(st->set_stage(*h1, Stage::kTokenized, 3 * kMs), SlotResult::kStaleHandle);

  const auto h2 = st->acquire(43, 4 * kMs);
  ASSERT_TRUE(h2);
  EXPECT_EQ(h2->index, h1->index);
  EXPECT_NE(h2->generation, h1->generation);
  // The old claim can touch nothing of the new one.
  EXPECT_EQ(st->set_stage(*h1, Stage::kDone, 5 * kMs), SlotResult::kStaleHandle);
  EXPECT_EQ(st->set_backends(*h1, kP0, kD0), SlotResult::kStaleHandle);
  EXPECT_EQ(st->set_tokens(*h1, 1, 1, 1), SlotResult::kStaleHandle);
  EXPECT_EQ(st->set_first_token(*h1, 5 * kMs), SlotResult::kStaleHandle);
  EXPECT_EQ(st->release(*h1), SlotResult::kStaleHandle);
  EXPECT_FALSE(st->read(*h1));
  // Same slot and generation but another owner is stale too.
  SlotHandle forged = *h2;
  forged.owner_pid = 42;
  EXPECT_EQ(st->release(forged), SlotResult::kStaleHandle);

  const auto snap = st->read(*h2);
  ASSERT_TRUE(snap);
  EXPECT_EQ(snap->timeline.current(), Stage::kReceived);
  EXPECT_EQ(snap->handle.owner_pid, 43);
  EXPECT_EQ(st->slots_used(), 1u);
  EXPECT_EQ(st->release(*h2), SlotResult::kOk);
  expect_gauges_zero(*st);
}

TEST(SharedState, InvalidArgumentsAndRejectedMoves) {
  const SharedStateConfig cfg = test_config(4);
  Region r(SharedState::required_bytes(cfg));
  auto st = create_or_die(r, cfg);
  EXPECT_FALSE(st->acquire(0, 1));
  EXPECT_FALSE(st->acquire(-5, 1));
  EXPECT_FALSE(st->acquire(10, 0));
  const auto h = st->acquire(10, 1 * kMs);
  ASSERT_TRUE(h);
  EXPECT_EQ(st->set_backends(*h, 4, kD0), SlotResult::kInvalidArgument);  // 4 backends: 0..3
  EXPECT_EQ(st->set_backends(*h, kP0, 99), SlotResult::kInvalidArgument);
  EXPECT_EQ(st->set_stage(*h, Stage::kTokenized, 0), SlotResult::kInvalidArgument);
  EXPECT_EQ(st->set_stage(*h, static_cast<Stage>(11), 5), SlotResult::kInvalidArgument);
  EXPECT_EQ(st->set_stage(*h, Stage::kReceived, 2 * kMs), SlotResult::kRejected);
  ASSERT_EQ(st->set_stage(*h, Stage::kPrefilling, 2 * kMs), SlotResult::kOk);
  EXPECT_EQ(st->set_stage(*h, Stage::kTokenized, 3 * kMs), SlotResult::kRejected);
  EXPECT_EQ(st->requests_in_stage(Stage::kPrefilling), 1);
  EXPECT_EQ(st->requests_in_stage(Stage::kTokenized), 0);
  ASSERT_EQ(st->set_first_token(*h, 4 * kMs), SlotResult::kOk);
  EXPECT_EQ(st->set_first_token(*h, 5 * kMs), SlotResult::kRejected);
  EXPECT_EQ(st->ttft_histogram().count(), 1u);
  EXPECT_FALSE(st->count_error(4));
  EXPECT_TRUE(st->count_error(kP0));
  EXPECT_EQ(st->release(*h), SlotResult::kOk);
  expect_gauges_zero(*st);
}

TEST(SharedState, GaugesFollowStagesAndBackendsThenReturnToZero) {
  const SharedStateConfig cfg = test_config(8);
  Region r(SharedState::required_bytes(cfg));
  auto st = create_or_die(r, cfg);
  const auto h = st->acquire(500, 1 * kMs);
  ASSERT_TRUE(h);
  EXPECT_EQ(st->requests_in_stage(Stage::kReceived), 1);
  ASSERT_EQ(st->set_stage(*h, Stage::kTokenized, 2 * kMs), SlotResult::kOk);
  ASSERT_EQ(st->set_stage(*h, Stage::kWaitingPrefill, 3 * kMs), SlotResult::kOk);
  EXPECT_EQ(st->requests_in_stage(Stage::kReceived), 0);
  EXPECT_EQ(st->requests_in_stage(Stage::kApcMatched), 0);  // skipped: never counted
  EXPECT_EQ(st->requests_in_stage(Stage::kWaitingPrefill), 1);
  ASSERT_EQ(st->set_backends(*h, kP0, kD0), SlotResult::kOk);
  EXPECT_EQ(st->backend_outstanding(kP0), 1);
  EXPECT_EQ(st->backend_outstanding(kD0), 1);
  ASSERT_EQ(st->set_stage(*h, Stage::kPrefilling, 4 * kMs), SlotResult::kOk);
  ASSERT_EQ(st->set_stage(*h, Stage::kWaitingDecode, 5 * kMs), SlotResult::kOk);
  EXPECT_EQ(st->backend_outstanding(kP0), 0);  // the prefill leg is over
  EXPECT_EQ(st->backend_outstanding(kD0), 1);
  EXPECT_EQ(st->backend_active_streams(kD0), 0);
  // Decode fails over to another instance.
  ASSERT_TRUE(st->count_retry(kD0));
  ASSERT_EQ(st->set_backends(*h, kP0, kD1), SlotResult::kOk);
  EXPECT_EQ(st->backend_outstanding(kD0), 0);
  EXPECT_EQ(st->backend_outstanding(kD1), 1);
  ASSERT_EQ(st->set_stage(*h, Stage::kDecoding, 6 * kMs), SlotResult::kOk);
  EXPECT_EQ(st->backend_active_streams(kD1), 1);
  EXPECT_EQ(st->requests_in_stage(Stage::kDecoding), 1);
  ASSERT_EQ(st->set_stage(*h, Stage::kDone, 7 * kMs), SlotResult::kOk);
  EXPECT_EQ(st->backend_outstanding(kD1), 0);
  EXPECT_EQ(st->backend_active_streams(kD1), 0);
  EXPECT_EQ(st->requests_in_stage(Stage::kDone), 1);
  EXPECT_EQ(st->slots_used(), 1u);
  ASSERT_EQ(st->release(*h), SlotResult::kOk);
  expect_gauges_zero(*st);
  // Counters survive the release.
  EXPECT_EQ(st->backend_stats(kP0)->requests_total, 1u);  // re-set to kP0: not a new request
  EXPECT_EQ(st->backend_stats(kD0)->requests_total, 1u);
  EXPECT_EQ(st->backend_stats(kD0)->retries_total, 1u);
  EXPECT_EQ(st->backend_stats(kD1)->requests_total, 1u);

  // Releasing mid-flight (client hung up while decoding) withdraws everything too.
  const auto h2 = st->acquire(500, 10 * kMs);
  ASSERT_TRUE(h2);
  ASSERT_EQ(st->set_backends(*h2, kP1, kP1), SlotResult::kOk);  // same instance for P and D
  EXPECT_EQ(st->backend_outstanding(kP1), 1);                   // counted once
  EXPECT_EQ(st->backend_stats(kP1)->requests_total, 1u);
  ASSERT_EQ(st->set_stage(*h2, Stage::kDecoding, 11 * kMs), SlotResult::kOk);
  EXPECT_EQ(st->backend_active_streams(kP1), 1);
  ASSERT_EQ(st->release(*h2), SlotResult::kOk);
  expect_gauges_zero(*st);
}

TEST(SharedState, ReclaimDeadFreesOnlyDeadOwnersAndRestoresGauges) {
  const SharedStateConfig cfg = test_config(32);
  Region r(SharedState::required_bytes(cfg));
  auto st = create_or_die(r, cfg);
  constexpr std::int32_t kDead = 101, kAlive = 102;
  std::vector<SlotHandle> dead, alive;
  for (int i = 0; i < 5; ++i) {
    const auto h = st->acquire(kDead, 1 * kMs);
    ASSERT_TRUE(h);
    ASSERT_EQ(st->set_backends(*h, kP0, kD0), SlotResult::kOk);
    ASSERT_EQ(st->set_stage(*h, i % 2 ? Stage::kDecoding : Stage::kPrefilling, 2 * kMs),
              SlotResult::kOk);
    dead.push_back(*h);
  }
  for (int i = 0; i < 3; ++i) {
    const auto h = st->acquire(kAlive, 1 * kMs);
    ASSERT_TRUE(h);
    ASSERT_EQ(st->set_backends(*h, kP1, kD0), SlotResult::kOk);
    ASSERT_EQ(st->set_stage(*h, Stage::kPrefilling, 2 * kMs), SlotResult::kOk);
    alive.push_back(*h);
  }
  EXPECT_EQ(st->backend_outstanding(kD0), 8);
  EXPECT_EQ(st->backend_active_streams(kD0), 2);

  std::vector<std::int32_t> asked;
  const std::size_t freed = st->reclaim_dead([&](std::int32_t pid) {
    asked.push_back(pid);
    return pid != kDead;
  });
  EXPECT_EQ(freed, 5u);
  EXPECT_THAT(asked, ::testing::UnorderedElementsAre(kDead, kAlive));  // once per pid
  EXPECT_EQ(st->reclaimed_total(), 5u);
  EXPECT_EQ(st->slots_used(), 3u);
  EXPECT_EQ(slots_in_use(*st), 3u);
  EXPECT_EQ(st->requests_in_stage(Stage::kPrefilling), 3);
  EXPECT_EQ(st->requests_in_stage(Stage::kDecoding), 0);
  EXPECT_EQ(st->backend_outstanding(kP0), 0);
  EXPECT_EQ(st->backend_outstanding(kP1), 3);
  EXPECT_EQ(st->backend_outstanding(kD0), 3);
  EXPECT_EQ(st->backend_active_streams(kD0), 0);
  EXPECT_THAT(st->owners(), ::testing::ElementsAre(kAlive));
  for (const SlotHandle& h : dead) EXPECT_EQ(st->release(h), SlotResult::kStaleHandle);

  EXPECT_EQ(st->reclaim_dead([](std::int32_t pid) { return pid != kDead; }), 0u);
  for (const SlotHandle& h : alive) EXPECT_EQ(st->release(h), SlotResult::kOk);
  expect_gauges_zero(*st);
  // Freed slots and the freed owner row are reusable.
  for (std::uint32_t i = 0; i < st->capacity(); ++i) ASSERT_TRUE(st->acquire(103, 5 * kMs));
}

TEST(SharedState, ConcurrentAcquireReleaseNeverDoubleClaims) {
  constexpr int kThreads = 4;
  constexpr int kOpsPerThread = 100000;
  // Below the 8 one thread may hold: the table fills up even when a loaded machine runs the
  // threads one after another.
  constexpr std::uint32_t kSlots = 6;
  const SharedStateConfig cfg = test_config(kSlots);
  Region r(SharedState::required_bytes(cfg));
  auto st = create_or_die(r, cfg);
  std::vector<std::atomic<int>> holder(kSlots);
  for (auto& h : holder) h.store(-1);
  std::atomic<int> double_claims{0}, bad_results{0};
  std::atomic<long> acquired{0}, refused{0}, leftover{0};

  auto worker = [&](int t) {
    std::mt19937 rng(static_cast<unsigned>(t) * 7919u + 1);
    std::vector<SlotHandle> held;
    const std::int32_t pid = 2000 + t;
    std::uint64_t now = 1;
    for (int op = 0; op < kOpsPerThread; ++op) {
      ++now;
      const bool take = held.empty() || (held.size() < 8 && rng() % 2 == 0);
      if (take) {
        const auto h = st->acquire(pid, now);
        if (!h) {
          refused.fetch_add(1, std::memory_order_relaxed);
          continue;
        }
        acquired.fetch_add(1, std::memory_order_relaxed);
        if (holder[h->index].exchange(t) != -1) double_claims.fetch_add(1);
        const std::uint16_t p = static_cast<std::uint16_t>(rng() % 2);
        if (st->set_backends(*h, p, static_cast<std::uint16_t>(2 + rng() % 2)) != SlotResult::kOk ||
            st->set_stage(*h, *stage_at(1 + rng() % 9), now) != SlotResult::kOk) {
          bad_results.fetch_add(1);
        }
        held.push_back(*h);
      } else {
        const std::size_t k = rng() % held.size();
        const SlotHandle h = held[k];
        held[k] = held.back();
        held.pop_back();
        if (holder[h.index].exchange(-1) != t) double_claims.fetch_add(1);
        if (st->release(h) != SlotResult::kOk) bad_results.fetch_add(1);
      }
    }
    leftover.fetch_add(static_cast<long>(held.size()));
    for (const SlotHandle& h : held) {
      holder[h.index].store(-1);
      if (st->release(h) != SlotResult::kOk) bad_results.fetch_add(1);
    }
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) threads.emplace_back(worker, t);
  for (auto& th : threads) th.join();

  EXPECT_EQ(double_claims.load(), 0);
  EXPECT_EQ(bad_results.load(), 0);
  // Each op acquired, was refused, or released a slot held in the loop (the `leftover` ones were
  // released after it), so acquires are about (ops - refused) / 2. With 4 threads truly in
  // parallel on 6 slots refusals are frequent (one clean run: 99,184 acquires of 400,000 ops):
  // the floor checks that the table was worked hard, not how the threads interleaved.
  EXPECT_GT(acquired.load(), kThreads * kOpsPerThread / 10);
  EXPECT_EQ(2 * acquired.load() - leftover.load() + refused.load(),
            static_cast<long>(kThreads) * kOpsPerThread);
  EXPECT_GT(refused.load(), 0);  // the full table was exercised
  EXPECT_EQ(st->acquire_failures_total(), static_cast<std::uint64_t>(refused.load()));
  expect_gauges_zero(*st);
  EXPECT_EQ(slots_in_use(*st), 0u);
  std::size_t requests = 0;
  for (std::uint16_t b = 0; b < 4; ++b) requests += st->backend_stats(b)->requests_total;
  EXPECT_EQ(requests, 2 * static_cast<std::size_t>(acquired.load()));
}

// Kills and reaps a forked child if a failed assertion leaves the test early.
struct ChildGuard {
  pid_t pid;
  ~ChildGuard() {
    if (pid > 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
};

// A real second process on a MAP_SHARED mapping: the child holds slots and churns through
// updates until SIGKILL lands at an arbitrary instruction; the parent then reclaims.
TEST(SharedState, ForkedWorkerKilledMidUpdateIsReclaimed) {
  const SharedStateConfig cfg = test_config(256);
  const std::size_t bytes = SharedState::required_bytes(cfg);
  void* region = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(region, MAP_FAILED);
  OpenResult created = SharedState::create(region, bytes, cfg);
  ASSERT_TRUE(created.ok()) << created.error;
  SharedState& parent = *created.state;
  const std::int32_t self = static_cast<std::int32_t>(::getpid());
  const auto mine = parent.acquire(self, monotonic_now_ns());
  ASSERT_TRUE(mine);
  ASSERT_EQ(parent.set_backends(*mine, kP0, kD0), SlotResult::kOk);

  constexpr int kHeld = 10;
  for (int round = 0; round < 3; ++round) {
    int ready[2];
    ASSERT_EQ(::pipe(ready), 0);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      // Child: its own view, as a worker after fork; no gtest macros here.
      ::close(ready[0]);
      OpenResult view = SharedState::attach(region, bytes, &cfg);
      if (!view.ok()) ::_exit(2);
      SharedState& s = *view.state;
      const std::int32_t me = static_cast<std::int32_t>(::getpid());
      for (int i = 0; i < kHeld; ++i) {
        const auto h = s.acquire(me, monotonic_now_ns(), static_cast<std::uint64_t>(i));
        if (!h || s.set_backends(*h, kP1, kD1) != SlotResult::kOk ||
            s.set_stage(*h, Stage::kDecoding, monotonic_now_ns()) != SlotResult::kOk) {
          ::_exit(3);
        }
      }
      const char ok = 'k';
      if (::write(ready[1], &ok, 1) != 1) ::_exit(4);
      std::vector<SlotHandle> leaked;    // held past the churn, recycled oldest first
      for (std::uint64_t n = 0;; ++n) {  // until killed
        const auto h = s.acquire(me, monotonic_now_ns(), n);
        if (!h) continue;
        s.set_backends(*h, static_cast<std::uint16_t>(n % 2),
                       static_cast<std::uint16_t>(2 + n % 2));
        s.set_stage(*h, Stage::kPrefilling, monotonic_now_ns());
        s.set_tokens(*h, 100, 10, 5);
        s.set_stage(*h, Stage::kDecoding, monotonic_now_ns());
        if (n % 3 != 0) {
          s.release(*h);
          continue;
        }
        leaked.push_back(*h);
        if (leaked.size() > 20) {
          s.release(leaked.front());
          leaked.erase(leaked.begin());
        }
      }
    }
    ChildGuard guard{child};
    ::close(ready[1]);
    char got = 0;
    ASSERT_EQ(::read(ready[0], &got, 1), 1) << "child failed to start";
    ::close(ready[0]);
    ::usleep(static_cast<useconds_t>(500 + round * 1500));
    ASSERT_EQ(::kill(child, SIGKILL), 0);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    guard.pid = -1;
    ASSERT_TRUE(WIFSIGNALED(status));
    ASSERT_FALSE(pid_alive(child));  // reaped: kill(pid, 0) gives ESRCH

    // At most the one slot the child was writing can be half-done, and it is detectable.
    std::size_t in_use = 0, torn = 0;
    for (std::uint32_t i = 0; i < parent.capacity(); ++i) {
      SlotSnapshot snap;
      const SlotRead rd = parent.read_index(i, &snap);
      if (rd == SlotRead::kFree) continue;
      ++in_use;
      if (rd == SlotRead::kTorn) ++torn;
    }
    EXPECT_LE(torn, 1u);
    EXPECT_GE(in_use, static_cast<std::size_t>(kHeld + 1));
    EXPECT_EQ(parent.reclaim_dead([](std::int32_t pid) { return pid_alive(pid); }), in_use - 1);

    // Only the parent's own request remains, and every gauge says exactly that.
    EXPECT_EQ(slots_in_use(parent), 1u);
    EXPECT_EQ(parent.slots_used(), 1u);
    EXPECT_EQ(parent.requests_in_stage(Stage::kReceived), 1);
    for (std::size_t i = 1; i < kStageCount; ++i) {
      EXPECT_EQ(parent.requests_in_stage(*stage_at(i)), 0);
    }
    EXPECT_EQ(parent.backend_outstanding(kP0), 1);
    EXPECT_EQ(parent.backend_outstanding(kD0), 1);
    for (std::uint16_t b : {kP1, kD1}) {
      EXPECT_EQ(parent.backend_outstanding(b), 0);
      EXPECT_EQ(parent.backend_active_streams(b), 0);
    }
    EXPECT_THAT(parent.owners(), ::testing::ElementsAre(self));
    ASSERT_TRUE(parent.read(*mine));
  }
  // The table is fully usable again.
  std::uint32_t got = 1;  // `mine`
  while (parent.acquire(self, monotonic_now_ns())) ++got;
  EXPECT_EQ(got, parent.capacity());
  created.state.reset();
  ::munmap(region, bytes);
}

// --------------------------------------------------------------------------------------------
// Rendering
// --------------------------------------------------------------------------------------------

// Runs one request through received → ... → done with the given time in `received`.
void run_request(SharedState& st, std::uint64_t received_for_ns, std::uint64_t t0) {
  const auto h = st.acquire(900, t0);
  ASSERT_TRUE(h);
  ASSERT_EQ(st.set_backends(*h, kP0, kD0), SlotResult::kOk);
  ASSERT_EQ(st.set_stage(*h, Stage::kTokenized, t0 + received_for_ns), SlotResult::kOk);
  ASSERT_EQ(st.set_stage(*h, Stage::kPrefilling, t0 + received_for_ns + 100 * kMs),
            SlotResult::kOk);
  ASSERT_EQ(st.set_first_token(*h, t0 + received_for_ns + 300 * kMs), SlotResult::kOk);
  ASSERT_EQ(st.set_stage(*h, Stage::kDecoding, t0 + received_for_ns + 300 * kMs), SlotResult::kOk);
  ASSERT_EQ(st.set_tokens(*h, 1000, 0, 101), SlotResult::kOk);
  ASSERT_EQ(st.set_stage(*h, Stage::kDone, t0 + received_for_ns + 2300 * kMs), SlotResult::kOk);
  ASSERT_EQ(st.release(*h), SlotResult::kOk);
}

TEST(SharedState, MetricsParseBackWithCumulativeBuckets) {
  const SharedStateConfig cfg = test_config(16);
  Region r(SharedState::required_bytes(cfg));
  auto st = create_or_die(r, cfg);
  // Time spent in `received`: 0.5 ms, 3 ms, 20 ms, 2 s and 100 s (above every bound).
  const std::uint64_t received_for[] = {kMs / 2, 3 * kMs, 20 * kMs, 2 * kSec, 100 * kSec};
  std::uint64_t t0 = kSec;
  for (std::uint64_t d : received_for) {
    run_request(*st, d, t0);
    t0 += 200 * kSec;
  }
  const auto live = st->acquire(901, t0);  // one in flight, decoding on d1
  ASSERT_TRUE(live);
  ASSERT_EQ(st->set_backends(*live, kP1, kD1), SlotResult::kOk);
  ASSERT_EQ(st->set_stage(*live, Stage::kDecoding, t0 + kMs), SlotResult::kOk);
  ASSERT_TRUE(st->count_error(kD1));

  prom::TextWriter w;
  st->render_metrics(w);
  std::size_t malformed = 0;
  const std::vector<prom::Sample> samples = prom::parse_text(w.str(), &malformed);
  EXPECT_EQ(malformed, 0u);
  using prom::find_value;
  EXPECT_EQ(find_value(samples, "omni_proxy_inflight_slots_used"), 1);
  EXPECT_EQ(find_value(samples, "omni_proxy_inflight_slots_capacity"), 16);
  EXPECT_EQ(find_value(samples, "omni_proxy_requests_in_stage", {{"stage", "decoding"}}), 1);
  EXPECT_EQ(find_value(samples, "omni_proxy_requests_in_stage", {{"stage", "done"}}), 0);

  const std::string b = "omni_proxy_stage_duration_seconds_bucket";
  auto bucket = [&](const char* stage, const char* le) {
    return find_value(samples, b, {{"stage", stage}, {"le", le}});
  };
  // The live request left `received` after 1 ms too: six observations.
  EXPECT_EQ(bucket("received", "0.001"), 2);  // bounds are inclusive
  EXPECT_EQ(bucket("received", "0.005"), 3);
  EXPECT_EQ(bucket("received", "0.025"), 4);
  EXPECT_EQ(bucket("received", "2.5"), 5);
  EXPECT_EQ(bucket("received", "60"), 5);
  EXPECT_EQ(bucket("received", "+Inf"), 6);
  EXPECT_EQ(find_value(samples, "omni_proxy_stage_duration_seconds_count", {{"stage", "received"}}),
            6);
  const auto sum =
      find_value(samples, "omni_proxy_stage_duration_seconds_sum", {{"stage", "received"}});
  ASSERT_TRUE(sum);
  EXPECT_NEAR(*sum, 102.0245, 1e-9);
  EXPECT_EQ(bucket("tokenized", "0.1"), 5);  // tokenized lasted 100 ms each time
  EXPECT_EQ(bucket("tokenized", "0.05"), 0);
  // Skipped stages are not observed; prefilling lasted 200 ms; decoding 2 s.
  EXPECT_EQ(
      find_value(samples, "omni_proxy_stage_duration_seconds_count", {{"stage", "apc_matched"}}),
      0);
  EXPECT_EQ(bucket("prefilling", "0.25"), 5);
  EXPECT_EQ(bucket("decoding", "2.5"), 5);
  EXPECT_EQ(bucket("decoding", "1"), 0);
  EXPECT_FALSE(bucket("done", "+Inf").has_value());  // done has no duration

  // TTFT: received time + 300 ms; TPOT: 2 s over 100 tokens = 20 ms.
  EXPECT_EQ(find_value(samples, "omni_proxy_ttft_seconds_count"), 5);
  EXPECT_EQ(find_value(samples, "omni_proxy_ttft_seconds_bucket", {{"le", "0.3"}}), 0);
  EXPECT_EQ(find_value(samples, "omni_proxy_ttft_seconds_bucket", {{"le", "0.5"}}), 3);
  EXPECT_EQ(find_value(samples, "omni_proxy_ttft_seconds_bucket", {{"le", "5"}}), 4);
  EXPECT_EQ(find_value(samples, "omni_proxy_ttft_seconds_bucket", {{"le", "+Inf"}}), 5);
  EXPECT_EQ(find_value(samples, "omni_proxy_tpot_seconds_bucket", {{"le", "0.015"}}), 0);
  EXPECT_EQ(find_value(samples, "omni_proxy_tpot_seconds_bucket", {{"le", "0.02"}}), 5);
  EXPECT_EQ(find_value(samples, "omni_proxy_request_duration_seconds_count"), 5);

  // Every histogram series: buckets in `le` order never decrease and +Inf equals _count.
  std::map<std::string, std::vector<double>> series;  // name + labels sans le -> bucket values
  std::map<std::string, double> counts;
  for (const prom::Sample& s : samples) {
    const std::string suffix = "_bucket";
    std::string key;
    std::map<std::string, std::string> labels = s.labels;
    labels.erase("le");
    for (const auto& [k, v] : labels) key += k + "=" + v + ",";
    if (s.name.size() > suffix.size() &&
        s.name.compare(s.name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      series[s.name.substr(0, s.name.size() - suffix.size()) + "|" + key].push_back(s.value);
    } else if (s.name.ends_with("_seconds_count")) {
      counts[s.name.substr(0, s.name.size() - 6) + "|" + key] = s.value;
    }
  }
  EXPECT_EQ(series.size(), 9u + 3u);
  for (const auto& [key, values] : series) {
    for (std::size_t i = 1; i < values.size(); ++i) EXPECT_LE(values[i - 1], values[i]) << key;
    ASSERT_TRUE(counts.count(key)) << key;
    EXPECT_EQ(values.back(), counts[key]) << key;
  }

  auto backend = [&](const char* name, const char* pool, const char* backend_name) {
    return find_value(samples, name, {{"pool", pool}, {"backend", backend_name}});
  };
  EXPECT_EQ(backend("omni_proxy_backend_requests_total", "prefill", "10.0.0.1:8000"), 5);
  EXPECT_EQ(backend("omni_proxy_backend_requests_total", "decode", "10.0.0.3:9000"), 5);
  EXPECT_EQ(backend("omni_proxy_backend_outstanding", "decode", "10.0.0.4:9000"), 1);
  EXPECT_EQ(backend("omni_proxy_backend_outstanding", "prefill", "10.0.0.2:8000"), 0);
  EXPECT_EQ(backend("omni_proxy_backend_active_streams", "decode", "10.0.0.4:9000"), 1);
  EXPECT_EQ(backend("omni_proxy_backend_errors_total", "decode", "10.0.0.4:9000"), 1);
  EXPECT_EQ(backend("omni_proxy_backend_retries_total", "decode", "10.0.0.4:9000"), 0);
  EXPECT_THAT(w.str(), HasSubstr("# TYPE omni_proxy_stage_duration_seconds histogram\n"));
  EXPECT_THAT(w.str(), HasSubstr("# TYPE omni_proxy_backend_requests_total counter\n"));
}

TEST(SharedState, StatusJsonContents) {
  const SharedStateConfig cfg = test_config(10);
  Region r(SharedState::required_bytes(cfg));
  auto st = create_or_die(r, cfg);
  const auto a = st->acquire(300, 1 * kMs);
  const auto b = st->acquire(301, 1 * kMs);
  ASSERT_TRUE(a && b);
  ASSERT_EQ(st->set_backends(*a, kP0, kD1), SlotResult::kOk);
  ASSERT_EQ(st->set_stage(*a, Stage::kPrefilling, 2 * kMs), SlotResult::kOk);
  ASSERT_TRUE(st->count_retry(kP1));

  const nlohmann::json j = st->render_status_json();
  EXPECT_EQ(j["slots"]["used"], 2);
  EXPECT_EQ(j["slots"]["capacity"], 10);
  EXPECT_EQ(j["slots"]["bytes_per_slot"], SharedState::kSlotBytes);
  EXPECT_EQ(j["slots"]["acquire_failures_full"], 0);
  EXPECT_EQ(j["stages"].size(), kStageCount);
  EXPECT_EQ(j["stages"]["received"], 1);
  EXPECT_EQ(j["stages"]["prefilling"], 1);
  EXPECT_EQ(j["stages"]["decoding"], 0);
  ASSERT_EQ(j["backends"].size(), 4u);
  EXPECT_EQ(j["backends"][0]["name"], "10.0.0.1:8000");
  EXPECT_EQ(j["backends"][0]["pool"], "prefill");
  EXPECT_EQ(j["backends"][0]["outstanding"], 1);
  EXPECT_EQ(j["backends"][0]["requests_total"], 1);
  EXPECT_EQ(j["backends"][1]["retries_total"], 1);
  EXPECT_EQ(j["backends"][3]["index"], 3);
  EXPECT_EQ(j["backends"][3]["outstanding"], 1);
  EXPECT_EQ(j["backends"][3]["active_streams"], 0);
  ASSERT_EQ(j["workers"].size(), 2u);
  EXPECT_EQ(j["workers"][0]["pid"], 300);
  EXPECT_EQ(j["workers"][0]["slots"], 1);
}

}  // namespace
}  // namespace omni
