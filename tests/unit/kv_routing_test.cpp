#include <omni/kv_routing.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <vector>

namespace omni {
namespace {

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

// A deterministic random stream (the same on every platform, unlike <random>'s distributions).
struct Rng {
  std::uint64_t state;
  explicit Rng(std::uint64_t seed) : state(seed) {}
  std::uint64_t next() { return mix64(state += 0x9e3779b97f4a7c15ULL); }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0,1)
  std::uint64_t below(std::uint64_t n) { return next() % n; }
  std::uint64_t between(std::uint64_t lo, std::uint64_t hi) { return lo + below(hi - lo + 1); }
  template <typename T>
  void shuffle(std::vector<T>& v) {
    for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[below(i)]);
  }
};

// FNV-1a of "host:port", the kind of id a proxy would use.
std::uint64_t address_id(const std::string& address) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char ch : address) {
    h ^= ch;
    h *= 0x100000001b3ULL;
  }
  return h;
}

std::vector<std::uint64_t> member_ids(std::size_t n) {
  std::vector<std::uint64_t> ids;
  for (std::size_t i = 0; i < n; ++i) {
    ids.push_back(address_id("10.0.0." + std::to_string(i + 1) + ":8000"));
  }
  return ids;
}

// A contiguous bool array (std::vector<bool> is not one).
struct Bools {
  explicit Bools(std::size_t n, bool value = true) : data(new bool[n]), size(n) {
    std::fill_n(data.get(), n, value);
  }
  bool& operator[](std::size_t i) { return data[i]; }
  std::span<const bool> span() const { return {data.get(), size}; }
  std::unique_ptr<bool[]> data;
  std::size_t size;
};

std::string shares_of(const std::vector<std::size_t>& share) {
  const double mean = std::accumulate(share.begin(), share.end(), 0.0) / share.size();
  std::string out;
  for (std::size_t s : share) {
    char buf[16];
    std::snprintf(buf, sizeof buf, " %.2f", static_cast<double>(s) / mean);
    out += buf;
  }
  return out;
}

// Zipf(s) over ranks 0..n-1.
class Zipf {
 public:
  Zipf(std::size_t n, double s) : cdf_(n) {
    double sum = 0;
    for (std::size_t k = 0; k < n; ++k)
      cdf_[k] = sum += 1.0 / std::pow(static_cast<double>(k + 1), s);
    for (double& c : cdf_) c /= sum;
  }
  std::size_t operator()(Rng& rng) const {
    const double u = rng.uniform();
    const auto it = std::upper_bound(cdf_.begin(), cdf_.end(), u);
    return std::min<std::size_t>(static_cast<std::size_t>(it - cdf_.begin()), cdf_.size() - 1);
  }

 private:
  std::vector<double> cdf_;
};

// ---------------------------------------------------------------------------------------------
// BoundedLoadRing
// ---------------------------------------------------------------------------------------------

TEST(BoundedLoadRing, PointsFollowTheDocumentedConstruction) {
  const std::vector<std::uint64_t> ids = {7, 3};
  const std::vector<std::uint32_t> weights = {1, 2};
  BoundedLoadRing ring(ids, weights, 3);
  EXPECT_EQ(ring.size(), 2u);
  EXPECT_EQ(ring.points(), 9u);  // 3 x 1 + 3 x 2
  EXPECT_EQ(BoundedLoadRing::point_position(7, 2), mix64(7 ^ mix64(2)));
  EXPECT_EQ(BoundedLoadRing::key_position(42), mix64(42));
  // Reproduce home() from the documented construction for a few keys.
  std::vector<std::pair<std::uint64_t, std::uint64_t>> points;  // (position, id)
  for (std::size_t i = 0; i < ids.size(); ++i) {
    for (std::uint64_t v = 0; v < 3u * weights[i]; ++v) {
      points.emplace_back(mix64(ids[i] ^ mix64(v)), ids[i]);
    }
  }
  std::sort(points.begin(), points.end());
  for (std::uint64_t key = 0; key < 1000; ++key) {
    const std::uint64_t pos = mix64(key);
    auto it = std::lower_bound(points.begin(), points.end(), std::make_pair(pos, std::uint64_t{0}));
    if (it == points.end()) it = points.begin();
    EXPECT_EQ(ring.id(ring.home(key)), it->second) << key;
  }
}

TEST(BoundedLoadRing, SameRingWhateverTheIdOrder) {
  const std::vector<std::uint64_t> ids = member_ids(8);
  std::vector<std::uint64_t> shuffled = ids;
  Rng rng(1);
  rng.shuffle(shuffled);
  ASSERT_NE(shuffled, ids);
  BoundedLoadRing a(ids), b(shuffled);
  std::vector<double> loads_a(8), loads_b(8);
  for (std::size_t i = 0; i < 8; ++i) loads_a[i] = static_cast<double>(rng.below(100));
  for (std::size_t i = 0; i < 8; ++i) {
    const auto it = std::find(ids.begin(), ids.end(), shuffled[i]);
    loads_b[i] = loads_a[static_cast<std::size_t>(it - ids.begin())];
  }
  Bools all(8);
  for (std::uint64_t k = 0; k < 10000; ++k) {
    const std::uint64_t key = mix64(k);
    ASSERT_EQ(a.id(a.home(key)), b.id(b.home(key)));
    const auto ca = a.choose(key, loads_a, all.span(), 10, 0.25);
    const auto cb = b.choose(key, loads_b, all.span(), 10, 0.25);
    ASSERT_TRUE(ca && cb);
    ASSERT_EQ(a.id(ca->member), b.id(cb->member));
    ASSERT_EQ(a.id(*ca->runner_up), b.id(*cb->runner_up));
  }
}

TEST(BoundedLoadRing, RemovingOrAddingAMemberMovesOnlyItsKeys) {
  const std::vector<std::uint64_t> ids = member_ids(8);
  const BoundedLoadRing full(ids);
  for (std::size_t removed = 0; removed < ids.size(); ++removed) {
    std::vector<std::uint64_t> rest = ids;
    rest.erase(rest.begin() + static_cast<std::ptrdiff_t>(removed));
    const BoundedLoadRing smaller(rest);
    std::size_t owned = 0, moved = 0;
    for (std::uint64_t k = 0; k < 10000; ++k) {
      const std::uint64_t before = full.id(full.home(k));
      const std::uint64_t after = smaller.id(smaller.home(k));
      if (before == ids[removed]) {
        ++owned;
        ++moved;  // its keys must move somewhere
      } else {
        ASSERT_EQ(before, after) << "key " << k << " moved though its owner stayed";
      }
    }
    // Adding the member back moves exactly the keys it then owns, and only to it.
    for (std::uint64_t k = 0; k < 10000; ++k) {
      const std::uint64_t small_owner = smaller.id(smaller.home(k));
      const std::uint64_t full_owner = full.id(full.home(k));
      if (small_owner != full_owner) {
        ASSERT_EQ(full_owner, ids[removed]);
      }
    }
    EXPECT_EQ(moved, owned);
    EXPECT_GT(owned, 10000u / 8 / 2);  // about 1/8 of the keys (balance is tested below)
    EXPECT_LT(owned, 10000u / 8 * 2);
  }
}

// A member's share of the ring is the sum of vnodes arcs, so its relative standard deviation is
// about 1/sqrt(vnodes): 10% with 100 vnodes. "Every member of 8 within +-25% of the mean" is then
// a property of most id sets, not all (a member 2.5 standard deviations out is not rare among 8):
// it is checked over 200 id sets, together with the spread itself. The shares of the id set the
// other tests use are printed.
TEST(BoundedLoadRing, HomesAreBalanced) {
  struct Row {
    std::size_t members;
    unsigned vnodes;
  };
  for (const Row& row : {Row{8, 100}, Row{16, 100}, Row{8, 400}}) {
    const std::size_t keys = 10000, sets = 200;
    const double mean = static_cast<double>(keys) / static_cast<double>(row.members);
    std::size_t sets_within = 0;
    double sum_sq = 0;
    for (std::size_t set = 0; set < sets; ++set) {
      std::vector<std::uint64_t> ids;
      for (std::size_t i = 0; i < row.members; ++i) {
        ids.push_back(
            address_id("10." + std::to_string(set) + ".0." + std::to_string(i + 1) + ":8000"));
      }
      const BoundedLoadRing ring(ids, {}, row.vnodes);
      std::vector<std::size_t> count(row.members, 0);
      for (std::uint64_t k = 0; k < keys; ++k) ++count[ring.home(mix64(k + 12345 * set))];
      bool within = true;
      for (std::size_t c : count) {
        const double r = static_cast<double>(c) / mean - 1;
        sum_sq += r * r;
        within = within && std::fabs(r) <= 0.25;
      }
      sets_within += within ? 1 : 0;
    }
    const double rel_sd = std::sqrt(sum_sq / static_cast<double>(sets * row.members));
    // Arc variance plus the sampling noise of `keys` keys.
    const double expected_sd = std::sqrt(1.0 / row.vnodes + 1 / mean);
    std::printf(
        "[ring balance] %zu members x %u vnodes: share relative sd %.3f (expected %.3f); id sets "
        "with every member within +-25%%: %zu/%zu\n",
        row.members, row.vnodes, rel_sd, expected_sd, sets_within, sets);
    EXPECT_NEAR(rel_sd, expected_sd, 0.2 * expected_sd) << row.members << "x" << row.vnodes;
    if (row.members == 8 && row.vnodes == 100) {
      EXPECT_GE(sets_within, sets * 85 / 100);
    }
    if (row.vnodes == 400) {
      EXPECT_EQ(sets_within, sets);
    }
  }
  const BoundedLoadRing ring(member_ids(8));
  std::vector<std::size_t> count(8, 0);
  for (std::uint64_t k = 0; k < 10000; ++k) ++count[ring.home(mix64(k))];
  std::printf("[ring balance] 10.0.0.1-8:8000 x 100 vnodes, homes / mean:%s\n",
              shares_of(count).c_str());
  for (std::size_t c : count) EXPECT_NEAR(static_cast<double>(c), 1250.0, 1250.0 * 0.4);
}

TEST(BoundedLoadRing, WeightsScaleTheShare) {
  const std::vector<std::uint64_t> ids = member_ids(4);
  const std::vector<std::uint32_t> weights = {1, 1, 2, 4};
  const BoundedLoadRing ring(ids, weights);
  EXPECT_EQ(ring.points(), 800u);
  std::vector<double> count(4, 0);
  for (std::uint64_t k = 0; k < 40000; ++k) ++count[ring.home(k)];
  for (std::size_t i = 0; i < 4; ++i) {
    const double expected = 40000.0 * weights[i] / 8.0;
    EXPECT_NEAR(count[i], expected, expected * 0.25) << i;
  }
  // Capacity is proportional to weight.
  const std::vector<double> loads = {0, 0, 0, 0};
  Bools all(4);
  const auto c = ring.choose(1, loads, all.span(), 8, 0.0);
  ASSERT_TRUE(c);
  EXPECT_DOUBLE_EQ(c->capacity, 8.0 * weights[c->member] / 8.0);
}

// Sequential arrivals of Zipf-distributed keys. After each choice the chosen member's load grows
// by the request's cost; departures make every load decay by the same factor (so the ratio of any
// load to the average is what the arrivals made it). At every step:
//  - the chosen member is the first member clockwise from the key with load < capacity (checked
//    against an independent walk through clockwise_ranks), so a key keeps its home whenever its
//    home is under capacity;
//  - the chosen member's new load is at most (1 + eps) x the new average + the cost;
//  - the maximum load is at most (1 + eps) x the average + the largest cost.
TEST(BoundedLoadRing, BoundedLoadsUnderZipfArrivals) {
  struct Row {
    double epsilon;
    double decay;
  };
  for (const Row& row :
       {Row{0.25, 0.99}, Row{0.1, 0.99}, Row{0.5, 0.95}, Row{1.0, 0.999}, Row{0.0, 0.99}}) {
    const std::size_t n = 8;
    const BoundedLoadRing ring(member_ids(n));
    Rng rng(static_cast<std::uint64_t>(row.epsilon * 1000) + 7);
    const Zipf zipf(1000, 1.1);
    std::vector<double> loads(n, 0.0);
    Bools all(n);
    std::vector<std::uint32_t> rank(n);
    const double max_cost = 8;
    std::size_t at_home = 0, home_had_room = 0, overflowed = 0;
    double worst_ratio = 0;  // max load / ((1 + eps) avg + max_cost)
    for (int step = 0; step < 10000; ++step) {
      for (double& l : loads) l *= row.decay;
      const std::uint64_t key = mix64(zipf(rng) + 1);
      const double cost = static_cast<double>(rng.between(1, 8));
      const auto c = ring.choose(key, loads, all.span(), cost, row.epsilon);
      ASSERT_TRUE(c);
      ASSERT_FALSE(c->none_fit);  // cost > 0: someone always has room
      // Independent check of the rule.
      const double total = std::accumulate(loads.begin(), loads.end(), 0.0) + cost;
      const double capacity = (1 + row.epsilon) * total / static_cast<double>(n);
      EXPECT_NEAR(c->capacity, capacity, 1e-9 * capacity);
      ring.clockwise_ranks(key, all.span(), rank);
      std::size_t expected = n;
      for (std::size_t i = 0; i < n; ++i) {
        if (loads[i] < capacity && (expected == n || rank[i] < rank[expected])) expected = i;
      }
      ASSERT_EQ(c->member, expected) << "step " << step;
      ASSERT_EQ(c->home, ring.home(key));
      if (loads[c->home] < capacity) {
        ++home_had_room;
        ASSERT_EQ(c->member, c->home) << "step " << step << ": left a home that had room";
      }
      if (c->member == c->home) ++at_home;
      if (c->overflowed) ++overflowed;
      EXPECT_EQ(c->overflowed, c->member != c->home);

      loads[c->member] += cost;
      const double average = total / static_cast<double>(n);
      ASSERT_LE(loads[c->member], (1 + row.epsilon) * average + cost + 1e-9);
      const double max_load = *std::max_element(loads.begin(), loads.end());
      ASSERT_LE(max_load, (1 + row.epsilon) * average + max_cost + 1e-9) << "step " << step;
      worst_ratio = std::max(worst_ratio, max_load / ((1 + row.epsilon) * average + max_cost));
    }
    std::printf(
        "[bounded loads] eps=%.2f decay=%.3f: %zu/10000 at home, home had room %zu, overflowed "
        "%zu, worst max/((1+eps)avg+cost)=%.3f\n",
        row.epsilon, row.decay, at_home, home_had_room, overflowed, worst_ratio);
    EXPECT_EQ(at_home, home_had_room);
  }
}

// With departures of individual requests (not uniform decay) the maximum can exceed the bound
// once the average drops (the ring never moves a request that is in flight), but each choice
// still respects it.
TEST(BoundedLoadRing, BoundHoldsAtEachChoiceWithIndividualDepartures) {
  const std::size_t n = 8;
  const double eps = 0.25;
  const BoundedLoadRing ring(member_ids(n));
  Rng rng(99);
  const Zipf zipf(500, 1.2);
  std::vector<double> loads(n, 0.0);
  struct Job {
    int leaves;
    std::size_t member;
    double cost;
  };
  std::vector<Job> jobs;
  Bools all(n);
  for (int step = 0; step < 10000; ++step) {
    std::erase_if(jobs, [&](const Job& j) {
      if (j.leaves > step) return false;
      loads[j.member] -= j.cost;
      return true;
    });
    const std::uint64_t key = zipf(rng);
    const double cost = static_cast<double>(rng.between(1, 16));
    const auto c = ring.choose(key, loads, all.span(), cost, eps);
    ASSERT_TRUE(c);
    const double total = std::accumulate(loads.begin(), loads.end(), 0.0) + cost;
    loads[c->member] += cost;
    ASSERT_LE(loads[c->member], (1 + eps) * total / n + cost + 1e-9);
    jobs.push_back({step + static_cast<int>(rng.between(1, 200)), c->member, cost});
  }
}

TEST(BoundedLoadRing, EpsilonZero) {
  const BoundedLoadRing ring(member_ids(4));
  Bools all(4);
  // Every load equal and no cost: nobody is strictly under capacity; the least loaded relative to
  // weight, first on the walk, i.e. the home.
  const std::vector<double> equal = {5, 5, 5, 5};
  for (std::uint64_t key = 0; key < 200; ++key) {
    const auto c = ring.choose(key, equal, all.span(), 0, 0.0);
    ASSERT_TRUE(c);
    EXPECT_TRUE(c->none_fit);
    EXPECT_EQ(c->member, ring.home(key));
    EXPECT_FALSE(c->overflowed);
    ASSERT_TRUE(c->runner_up);
    EXPECT_NE(*c->runner_up, c->member);
  }
  // An idle pool with no cost: the home.
  const std::vector<double> idle = {0, 0, 0, 0};
  EXPECT_EQ(ring.choose(9, idle, all.span(), 0, 0.0)->member, ring.home(9));
  // With a cost, the only member under the exact average takes everything.
  const std::vector<double> skewed = {0, 5, 5, 5};
  for (std::uint64_t key = 0; key < 200; ++key) {
    const auto c = ring.choose(key, skewed, all.span(), 1, 0.0);
    ASSERT_TRUE(c);
    EXPECT_FALSE(c->none_fit);
    EXPECT_EQ(c->member, 0u);
    EXPECT_EQ(c->overflowed, ring.home(key) != 0);
  }
  // An idle pool and a cost: the home takes it (0 < capacity), for any epsilon.
  for (double eps : {0.0, 0.25}) {
    for (std::uint64_t key = 0; key < 200; ++key) {
      EXPECT_EQ(ring.choose(key, idle, all.span(), 1000, eps)->member, ring.home(key));
    }
  }
}

TEST(BoundedLoadRing, IneligibleMembersAreSkipped) {
  const std::size_t n = 6;
  const BoundedLoadRing ring(member_ids(n));
  const std::vector<double> loads = {10, 0, 3, 7, 1, 2};
  std::vector<std::uint32_t> rank(n);
  for (std::size_t off = 0; off < n; ++off) {
    Bools eligible(n);
    eligible[off] = false;
    eligible[(off + 2) % n] = false;
    for (std::uint64_t key = 0; key < 2000; ++key) {
      const auto c = ring.choose(key, loads, eligible.span(), 1, 0.25);
      ASSERT_TRUE(c);
      EXPECT_TRUE(eligible[c->member]);
      EXPECT_TRUE(eligible[c->home]);
      ring.clockwise_ranks(key, eligible.span(), rank);
      EXPECT_EQ(rank[c->home], 0u);
      EXPECT_EQ(rank[off], UINT32_MAX);
      if (eligible[ring.home(key)]) {
        EXPECT_EQ(c->home, ring.home(key));
      }
      ASSERT_TRUE(c->runner_up);
      EXPECT_TRUE(eligible[*c->runner_up]);
    }
  }
  // Capacity counts eligible members only: loads of ineligible ones are ignored.
  Bools two(n, false);
  two[1] = two[4] = true;
  const auto c = ring.choose(3, loads, two.span(), 1, 0.0);
  ASSERT_TRUE(c);
  EXPECT_DOUBLE_EQ(c->capacity, (0 + 1 + 1) / 2.0);
  // Nothing eligible.
  Bools none(n, false);
  EXPECT_FALSE(ring.choose(3, loads, none.span(), 1, 0.25));
  // One eligible: no runner-up.
  Bools one(n, false);
  one[2] = true;
  const auto solo = ring.choose(3, loads, one.span(), 1, 0.25);
  ASSERT_TRUE(solo);
  EXPECT_EQ(solo->member, 2u);
  EXPECT_EQ(solo->home, 2u);
  EXPECT_FALSE(solo->runner_up);
}

TEST(BoundedLoadRing, RunnerUpIsDistinctAndNextWithRoom) {
  const std::size_t n = 8;
  const BoundedLoadRing ring(member_ids(n));
  Rng rng(5);
  Bools all(n);
  std::vector<std::uint32_t> rank(n);
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<double> loads(n);
    for (double& l : loads) l = static_cast<double>(rng.below(20));
    const std::uint64_t key = rng.next();
    const double cost = static_cast<double>(rng.between(1, 5));
    const auto c = ring.choose(key, loads, all.span(), cost, 0.1);
    ASSERT_TRUE(c);
    ASSERT_TRUE(c->runner_up);
    ASSERT_NE(*c->runner_up, c->member);
    ASSERT_LT(*c->runner_up, n);
    // When another member has room, the runner-up has room.
    bool other_has_room = false;
    for (std::size_t i = 0; i < n; ++i) {
      if (i != c->member && loads[i] < c->capacity) other_has_room = true;
    }
    if (other_has_room) {
      EXPECT_LT(loads[*c->runner_up], c->capacity);
    }
  }
}

TEST(BoundedLoadRing, RejectsBadInput) {
  const std::vector<std::uint64_t> dup = {1, 2, 1};
  EXPECT_THROW(BoundedLoadRing{dup}, std::invalid_argument);
  const std::vector<std::uint64_t> ids = {1, 2, 3};
  const std::vector<std::uint32_t> two = {1, 1};
  EXPECT_THROW(BoundedLoadRing(ids, two), std::invalid_argument);
  const std::vector<std::uint32_t> zero = {1, 0, 1};
  EXPECT_THROW(BoundedLoadRing(ids, zero), std::invalid_argument);
  EXPECT_THROW(BoundedLoadRing(ids, {}, 0), std::invalid_argument);
  const BoundedLoadRing ring(ids);
  Bools all(3);
  const std::vector<double> short_loads = {1, 2};
  EXPECT_THROW(ring.choose(1, short_loads, all.span(), 1, 0.25), std::invalid_argument);
  const std::vector<double> nan_loads = {1, std::nan(""), 2};
  EXPECT_THROW(ring.choose(1, nan_loads, all.span(), 1, 0.25), std::invalid_argument);
  const std::vector<double> loads = {1, -0.5, 2};  // negative residue counts as 0
  EXPECT_TRUE(ring.choose(1, loads, all.span(), 1, 0.25));
  EXPECT_THROW(ring.choose(1, loads, all.span(), -1, 0.25), std::invalid_argument);
  EXPECT_THROW(ring.choose(1, loads, all.span(), 1, -0.1), std::invalid_argument);
  const BoundedLoadRing empty(std::span<const std::uint64_t>{});
  EXPECT_EQ(empty.size(), 0u);
  EXPECT_EQ(empty.home(5), 0u);
  EXPECT_FALSE(empty.choose(1, {}, {}, 1, 0.25));
}

// ---------------------------------------------------------------------------------------------
// Cost model
// ---------------------------------------------------------------------------------------------

TEST(KvRoute, ExpectedTtftFormula) {
  struct Row {
    double queued;
    std::uint32_t cached;
    std::uint32_t prompt;
    double speed;
    double kv;
    double overhead;
    double expected_ms;
  };
  const double nan = std::nan("");
  const Row rows[] = {
      {0, 0, 1000, 10000, nan, 0, 100},      // 1000 uncached tokens at 10k/s
      {0, 600, 1000, 10000, nan, 0, 40},     // cached tokens lower it
      {500, 600, 1000, 10000, nan, 0, 90},   // queued tokens raise it
      {0, 1200, 1000, 10000, nan, 0, 0},     // cached beyond the prompt counts as all
      {-50, 0, 1000, 10000, nan, 0, 100},    // negative queue counts as 0
      {0, 0, 1000, 10000, 0.96, 0, 1100},    // above kv_usage_high: +1000 ms
      {0, 0, 1000, 10000, 0.95, 0, 100},     // at kv_usage_high: no penalty
      {0, 0, 1000, 10000, nan, 25, 125},     // fixed overhead
      {2000, 0, 2000, 4000, 0.5, 10, 1010},  // (2000 + 2000) / 4000 s + 10 ms
  };
  KvRouteOptions o;
  for (const Row& r : rows) {
    KvCandidate c;
    c.queued_tokens = r.queued;
    c.cached_tokens = r.cached;
    c.tokens_per_s = r.speed;
    c.kv_usage = r.kv;
    o.fixed_overhead_ms = r.overhead;
    EXPECT_DOUBLE_EQ(expected_ttft_ms(c, r.prompt, o), r.expected_ms)
        << r.queued << " " << r.cached << " " << r.prompt << " " << r.kv;
  }
  KvCandidate unknown;
  unknown.tokens_per_s = 0;
  EXPECT_TRUE(std::isinf(expected_ttft_ms(unknown, 10, KvRouteOptions{})));
  unknown.tokens_per_s = nan;
  EXPECT_TRUE(std::isinf(expected_ttft_ms(unknown, 10, KvRouteOptions{})));
}

TEST(KvRoute, CachedLowersQueuedRaisesPenaltyAdds) {
  KvRouteOptions o;
  KvCandidate base;
  base.tokens_per_s = 8000;
  base.queued_tokens = 1000;
  base.cached_tokens = 512;
  const double t = expected_ttft_ms(base, 4096, o);
  KvCandidate more_cached = base;
  more_cached.cached_tokens = 2048;
  EXPECT_LT(expected_ttft_ms(more_cached, 4096, o), t);
  KvCandidate more_queued = base;
  more_queued.queued_tokens = 3000;
  EXPECT_GT(expected_ttft_ms(more_queued, 4096, o), t);
  KvCandidate full = base;
  full.kv_usage = 0.99;
  EXPECT_DOUBLE_EQ(expected_ttft_ms(full, 4096, o), t + o.kv_usage_penalty_ms);
  o.kv_usage_high = 1.0;
  EXPECT_DOUBLE_EQ(expected_ttft_ms(full, 4096, o), t);
}

// ---------------------------------------------------------------------------------------------
// choose_prefill
// ---------------------------------------------------------------------------------------------

std::vector<KvCandidate> idle_candidates(std::size_t n, double speed = 10000) {
  std::vector<KvCandidate> out(n);
  for (std::size_t i = 0; i < n; ++i) {
    out[i].index = i;
    out[i].tokens_per_s = speed;
  }
  return out;
}

std::vector<std::uint64_t> keys_of(std::size_t blocks, std::uint64_t seed) {
  std::vector<std::uint64_t> keys(blocks);
  std::uint64_t h = seed;
  for (auto& k : keys) k = h = mix64(h + 1);
  return keys;
}

TEST(KvRoute, ColdGoesToTheRingHome) {
  const BoundedLoadRing ring(member_ids(8));
  const KvRouteOptions o;
  for (std::uint64_t seed = 0; seed < 200; ++seed) {
    const auto keys = keys_of(10, seed);
    const auto cands = idle_candidates(8);
    const auto d = choose_prefill(cands, ring, keys, 16, 160, o);
    ASSERT_TRUE(d);
    EXPECT_EQ(d->reason, KvRouteDecision::Reason::kCold);
    EXPECT_EQ(d->ring_key, keys[0]);
    EXPECT_EQ(cands[d->chosen].index, ring.home(keys[0]));
    EXPECT_EQ(d->ring_home, d->chosen);
    EXPECT_DOUBLE_EQ(d->chosen_ttft_ms, 16.0);  // 160 tokens at 10k/s
    ASSERT_TRUE(d->runner_up);
    EXPECT_NE(*d->runner_up, d->chosen);
  }
  const auto keys = keys_of(10, 1);
  // Everyone holds the first two blocks (a system prompt): the key is the first block past it.
  auto cands = idle_candidates(8);
  for (auto& c : cands) c.cached_tokens = 32;
  auto d = choose_prefill(cands, ring, keys, 16, 160, o);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->reason, KvRouteDecision::Reason::kCold);
  EXPECT_EQ(d->common_cached, 32u);
  EXPECT_EQ(d->ring_key, keys[2]);
  EXPECT_EQ(cands[d->chosen].index, ring.home(keys[2]));
  // No full block past the common part: the last key.
  for (auto& c : cands) c.cached_tokens = 160;
  d = choose_prefill(cands, ring, keys, 16, 165, o);
  EXPECT_EQ(d->ring_key, keys.back());
  // No keys at all: mix64(prompt_tokens).
  d = choose_prefill(cands, ring, {}, 16, 165, o);
  EXPECT_EQ(d->ring_key, mix64(165));
  // The candidates are a subset: the home among them.
  std::vector<KvCandidate> subset = {cands[1], cands[4], cands[6]};
  for (auto& c : subset) c.cached_tokens = 0;
  d = choose_prefill(subset, ring, keys, 16, 160, o);
  Bools eligible(8, false);
  eligible[1] = eligible[4] = eligible[6] = true;
  std::vector<std::uint32_t> rank(8);
  ring.clockwise_ranks(keys[0], eligible.span(), rank);
  EXPECT_EQ(rank[subset[d->chosen].index], 0u);
}

TEST(KvRoute, ColdOverflowWhenTheHomeIsFull) {
  const BoundedLoadRing ring(member_ids(8));
  const auto keys = keys_of(4, 77);
  auto cands = idle_candidates(8);
  const std::size_t home = ring.home(keys[0]);
  for (auto& c : cands) c.ring_load = 1000;
  cands[home].ring_load = 5000;  // average (12000 + 64) / 8 ~ 1508, x1.25 ~ 1885 < 5000
  KvRouteOptions o;
  const auto d = choose_prefill(cands, ring, keys, 16, 64, o);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->reason, KvRouteDecision::Reason::kColdOverflow);
  EXPECT_NE(cands[d->chosen].index, home);
  EXPECT_EQ(cands[d->ring_home].index, home);
  EXPECT_NEAR(d->ring_capacity, 1.25 * (12000.0 + 64) / 8, 1e-9);
  EXPECT_NE(explain(*d).find("cold-overflow"), std::string::npos);
  // With a larger epsilon the home takes it.
  o.epsilon = 3.0;
  EXPECT_EQ(choose_prefill(cands, ring, keys, 16, 64, o)->reason, KvRouteDecision::Reason::kCold);
}

TEST(KvRoute, WarmPicksTheHolderWithTheLowestTtft) {
  const BoundedLoadRing ring(member_ids(4));
  const auto keys = keys_of(64, 3);
  auto cands = idle_candidates(4);
  cands[1].cached_tokens = 512;
  cands[1].queued_tokens = 2000;
  cands[3].cached_tokens = 512;
  cands[3].queued_tokens = 100;
  const KvRouteOptions o;
  const auto d = choose_prefill(cands, ring, keys, 16, 1024, o);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->reason, KvRouteDecision::Reason::kWarm);
  EXPECT_EQ(d->chosen, 3u);
  EXPECT_EQ(d->chosen_cached, 512u);
  EXPECT_DOUBLE_EQ(d->chosen_ttft_ms, 1000.0 * (100 + 512) / 10000);
  ASSERT_TRUE(d->runner_up);
  // Runner-up: the idle ones cost 102.4 ms, the other holder 251.2 ms.
  EXPECT_TRUE(*d->runner_up == 0 || *d->runner_up == 2);
  EXPECT_DOUBLE_EQ(d->runner_up_ttft_ms, 102.4);
  EXPECT_EQ(d->runner_up_cached, 0u);
  EXPECT_EQ(d->common_cached, 0u);
  EXPECT_NE(explain(*d).find("warm chosen=#3"), std::string::npos) << explain(*d);
}

TEST(KvRoute, WarmButTheHoldersQueueExceedsTheSaving) {
  const BoundedLoadRing ring(member_ids(4));
  const auto keys = keys_of(64, 4);
  auto cands = idle_candidates(4);
  // The holder saves 1000 tokens but has 1500 queued; the others have 200 queued.
  for (auto& c : cands) c.queued_tokens = 200;
  cands[2].cached_tokens = 1000;
  cands[2].queued_tokens = 1500;
  const KvRouteOptions o;
  auto d = choose_prefill(cands, ring, keys, 16, 1024, o);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->reason, KvRouteDecision::Reason::kWarm);
  EXPECT_NE(d->chosen, 2u);
  EXPECT_EQ(d->chosen_cached, 0u);
  EXPECT_DOUBLE_EQ(d->chosen_ttft_ms, 122.4);
  // Shorter queue: the holder wins again.
  cands[2].queued_tokens = 900;
  d = choose_prefill(cands, ring, keys, 16, 1024, o);
  EXPECT_EQ(d->chosen, 2u);
  // A holder about to preempt is penalised.
  cands[2].kv_usage = 0.97;
  d = choose_prefill(cands, ring, keys, 16, 1024, o);
  EXPECT_NE(d->chosen, 2u);
}

// miss_weight prices the uncached prefill a candidate would spend: the holder of a prefix keeps
// its requests while its queue is below (1 + miss_weight) x the saving, not just the saving.
TEST(KvRoute, MissWeightPricesRecomputation) {
  const BoundedLoadRing ring(member_ids(4));
  const auto keys = keys_of(64, 4);
  // Prompt 1024 at 10k tokens/s. The holder (#2) has 1000 of it cached; the others have 200
  // tokens queued: (200 + 1024) / 10k = 122.4 ms.
  auto with_holder_queue = [&](double queued) {
    auto cands = idle_candidates(4);
    for (auto& c : cands) c.queued_tokens = 200;
    cands[2].cached_tokens = 1000;
    cands[2].queued_tokens = queued;
    return cands;
  };
  struct Row {
    double miss_weight;
    double holder_queue;
    bool holder_wins;
  };
  // The holder wins while its queue < 200 + 1000 x (1 + miss_weight).
  const Row rows[] = {{0, 1150, true},  {0, 1250, false},  {1, 1250, true},
                      {1, 2150, true},  {1, 2250, false},  {2, 3150, true},
                      {2, 3250, false}, {0.5, 1650, true}, {0.5, 1750, false}};
  for (const Row& r : rows) {
    KvRouteOptions o;
    o.tie_fraction = 0;  // the band would blur the boundary
    o.miss_weight = r.miss_weight;
    const auto cands = with_holder_queue(r.holder_queue);
    const auto d = choose_prefill(cands, ring, keys, 16, 1024, o);
    ASSERT_TRUE(d);
    EXPECT_EQ(d->reason, KvRouteDecision::Reason::kWarm);
    EXPECT_EQ(d->chosen == 2, r.holder_wins)
        << "miss_weight " << r.miss_weight << " queue " << r.holder_queue << ": " << explain(*d);
    // The decision reports expected TTFTs, not scores (the runner-up of an idle server is
    // another idle server, at the same price).
    const double holder_ttft = (r.holder_queue + 24) / 10, other_ttft = 122.4;
    EXPECT_DOUBLE_EQ(d->chosen_ttft_ms, r.holder_wins ? holder_ttft : other_ttft);
    EXPECT_DOUBLE_EQ(d->runner_up_ttft_ms, other_ttft);
  }
  // Among equally cached candidates the price is the same: the TTFT decides, whatever the weight.
  // (The tie band is a fraction of the lowest score, which the price raises: 0 here, so that
  // only the scores decide.)
  for (const double w : {0.0, 1.0, 10.0}) {
    auto cands = idle_candidates(4);
    for (std::size_t i = 0; i < 4; ++i) {
      cands[i].cached_tokens = 512;
      cands[i].queued_tokens = 100.0 * double(4 - i);
    }
    cands[0].cached_tokens = 0;
    cands[0].queued_tokens = 0;  // cold but idle: 102.4 ms + w x 102.4
    KvRouteOptions o;
    o.tie_fraction = 0;
    o.miss_weight = w;
    const auto d = choose_prefill(cands, ring, keys, 16, 1024, o);
    ASSERT_TRUE(d);
    // #3 (100 queued + 512) = 61.2 ms is the fastest of the holders, and faster than #0 at any w.
    EXPECT_EQ(d->chosen, 3u) << w;
  }
  // A candidate without a measured speed is not priced (its TTFT is unknown, +inf, anyway), and
  // a negative or NaN weight counts as 0.
  for (const double w : {-1.0, std::numeric_limits<double>::quiet_NaN()}) {
    KvRouteOptions o;
    o.tie_fraction = 0;
    o.miss_weight = w;
    const auto d = choose_prefill(with_holder_queue(1250), ring, keys, 16, 1024, o);
    EXPECT_NE(d->chosen, 2u) << w;
  }
}

TEST(KvRoute, TieRule) {
  const BoundedLoadRing ring(member_ids(4));
  const auto keys = keys_of(64, 5);
  struct Row {
    const char* what;
    double queued0, queued1;
    std::uint32_t cached0, cached1;
    double tie_fraction;
    int expected;  // candidate position; -1 = the earlier of the two on the ring
    bool tie_broken;
  };
  // Prompt 1024 at 10k tokens/s; candidates 2 and 3 are far behind (queue 10^6).
  const Row rows[] = {
      // 0: (500 + 512) / 10k = 101.2 ms, 1: (270 + 768) / 10k = 103.8 ms
      {"within 5%, faster and more cached", 500, 270, 512, 256, 0.05, 0, false},
      // 0: (280 + 512) / 10k = 79.2 ms, 1: (0 + 768) / 10k = 76.8 ms: 3.1% apart
      {"within 5%: more cached wins though slower", 280, 0, 512, 256, 0.05, 0, true},
      {"outside the band: the faster wins", 280, 0, 512, 256, 0.03, 1, false},
      {"no band at all", 280, 0, 512, 256, 0.0, 1, false},
      {"equal TTFT and cache: ring order", 300, 300, 512, 512, 0.05, -1, true},
  };
  for (const Row& r : rows) {
    auto cands = idle_candidates(4);
    cands[0].queued_tokens = r.queued0;
    cands[1].queued_tokens = r.queued1;
    cands[0].cached_tokens = r.cached0;
    cands[1].cached_tokens = r.cached1;
    cands[2].queued_tokens = cands[3].queued_tokens = 1e6;
    KvRouteOptions o;
    o.tie_fraction = r.tie_fraction;
    const auto d = choose_prefill(cands, ring, keys, 16, 1024, o);
    ASSERT_TRUE(d) << r.what;
    EXPECT_EQ(d->reason, KvRouteDecision::Reason::kWarm) << r.what;
    int expected = r.expected;
    if (expected < 0) {
      Bools eligible(4);
      std::vector<std::uint32_t> rank(4);
      ring.clockwise_ranks(d->ring_key, eligible.span(), rank);
      expected = rank[0] < rank[1] ? 0 : 1;
    }
    EXPECT_EQ(d->chosen, static_cast<std::size_t>(expected)) << r.what;
    EXPECT_EQ(d->runner_up, static_cast<std::size_t>(1 - expected)) << r.what;
    EXPECT_EQ(d->tie_broken, r.tie_broken) << r.what << ": " << explain(*d);
  }
  // The fixed overhead is not part of the band: adding 1 s does not turn a loss into a tie.
  auto cands = idle_candidates(2);
  cands[0].cached_tokens = 512;
  cands[0].queued_tokens = 1000;  // 151.2 ms vs 102.4 ms
  KvRouteOptions o;
  o.fixed_overhead_ms = 1000;
  const auto d = choose_prefill(cands, ring, keys, 16, 1024, o);
  EXPECT_EQ(d->chosen, 1u);
  EXPECT_DOUBLE_EQ(d->chosen_ttft_ms, 1102.4);
}

// Random pools, some with exact ties; shuffling the candidates never changes the decision.
TEST(KvRoute, DeterministicUnderShuffledCandidates) {
  const std::size_t n = 12;
  const BoundedLoadRing ring(member_ids(n));
  Rng rng(2024);
  for (int trial = 0; trial < 1000; ++trial) {
    const std::size_t count = 1 + rng.below(n);
    std::vector<std::size_t> members(n);
    std::iota(members.begin(), members.end(), 0);
    rng.shuffle(members);
    std::vector<KvCandidate> cands(count);
    const bool coarse = trial % 2 == 0;  // few distinct values: many exact ties
    for (std::size_t j = 0; j < count; ++j) {
      KvCandidate& c = cands[j];
      c.index = members[j];
      c.cached_tokens = static_cast<std::uint32_t>(16 * rng.below(coarse ? 3 : 64));
      c.queued_tokens = static_cast<double>(coarse ? 500 * rng.below(3) : rng.below(5000));
      c.tokens_per_s = coarse ? 10000 : 5000 + static_cast<double>(rng.below(10000));
      c.kv_usage = rng.below(10) == 0 ? 0.99 : 0.5;
      c.ring_load = static_cast<double>(coarse ? 100 * rng.below(3) : rng.below(4000));
    }
    const auto keys = keys_of(64, rng.next());
    const std::uint32_t prompt = static_cast<std::uint32_t>(rng.between(1, 1024));
    KvRouteOptions o;
    o.tie_fraction = trial % 3 == 0 ? 0.0 : 0.05;
    const auto d0 = choose_prefill(cands, ring, keys, 16, prompt, o);
    ASSERT_TRUE(d0);
    for (int s = 0; s < 4; ++s) {
      std::vector<KvCandidate> shuffled = cands;
      rng.shuffle(shuffled);
      const auto d = choose_prefill(shuffled, ring, keys, 16, prompt, o);
      ASSERT_TRUE(d);
      ASSERT_EQ(d->reason, d0->reason);
      ASSERT_EQ(shuffled[d->chosen].index, cands[d0->chosen].index) << "trial " << trial;
      ASSERT_EQ(d->runner_up.has_value(), d0->runner_up.has_value());
      if (d->runner_up) {
        ASSERT_EQ(shuffled[*d->runner_up].index, cands[*d0->runner_up].index) << "trial " << trial;
      }
      ASSERT_EQ(d->chosen_ttft_ms, d0->chosen_ttft_ms);
      ASSERT_EQ(d->common_cached, d0->common_cached);
      ASSERT_EQ(d->ring_key, d0->ring_key);
      ASSERT_EQ(d->tie_broken, d0->tie_broken);
    }
  }
}

TEST(KvRoute, RejectsBadInput) {
  const BoundedLoadRing ring(member_ids(4));
  const auto keys = keys_of(4, 1);
  const KvRouteOptions o;
  EXPECT_FALSE(choose_prefill({}, ring, keys, 16, 64, o));
  auto cands = idle_candidates(2);
  cands[1].index = 0;
  EXPECT_THROW(choose_prefill(cands, ring, keys, 16, 64, o), std::invalid_argument);
  cands[1].index = 4;
  EXPECT_THROW(choose_prefill(cands, ring, keys, 16, 64, o), std::invalid_argument);
  cands[1].index = 1;
  EXPECT_THROW(choose_prefill(cands, ring, keys, 0, 64, o), std::invalid_argument);
  cands[0].ring_load = std::nan("");
  EXPECT_THROW(choose_prefill(cands, ring, keys, 16, 64, o), std::invalid_argument);
}

// A tiny cluster model for the simulations: each instance has a queue of uncached prompt tokens
// that drains at its prefill speed, and a prefix cache (the set of block keys it has computed).
struct SimCluster {
  struct Instance {
    double queue = 0;
    std::unordered_set<std::uint64_t> cache;
  };
  SimCluster(std::size_t n, double speed) : instances(n), speed(speed) {}

  std::uint32_t cached(std::size_t i, const std::vector<std::uint64_t>& keys,
                       std::size_t block) const {
    std::size_t hit = 0;
    while (hit < keys.size() && instances[i].cache.count(keys[hit]) != 0) ++hit;
    return static_cast<std::uint32_t>(hit * block);
  }
  void drain(double seconds) {
    for (auto& in : instances) in.queue = std::max(0.0, in.queue - speed * seconds);
  }
  // Sends the request to `i`; returns its TTFT in ms under the model.
  double send(std::size_t i, const std::vector<std::uint64_t>& keys, std::size_t block,
              std::uint32_t prompt) {
    const double uncached = prompt - cached(i, keys, block);
    instances[i].queue += uncached;
    instances[i].cache.insert(keys.begin(), keys.end());
    return 1000.0 * instances[i].queue / speed;
  }
  std::vector<Instance> instances;
  double speed;
};

std::vector<TokenId> tokens_of(std::uint32_t first, std::size_t n) {
  std::vector<TokenId> out(n);
  std::iota(out.begin(), out.end(), first);
  return out;
}

struct SimRequest {
  std::vector<std::uint64_t> keys;
  std::uint32_t prompt = 0;
  std::size_t group = 0;  // tenant
  double gap_s = 0;       // time since the previous arrival
};

struct SimResult {
  std::vector<std::size_t> share;                            // requests per instance
  std::vector<std::map<std::size_t, std::size_t>> by_group;  // group -> instance -> requests
  double mean_ttft_ms = 0, max_ttft_ms = 0;
  double cached_fraction = 0;            // cached prompt tokens / prompt tokens
  std::array<std::size_t, 3> reasons{};  // by Reason
};

enum class Router { kKvAware, kGreedyLongestPrefix };

SimResult simulate(const std::vector<SimRequest>& requests, std::size_t n, std::size_t groups,
                   double speed, std::size_t block, Router router, const KvRouteOptions& o = {}) {
  const BoundedLoadRing ring(member_ids(n));
  SimCluster cluster(n, speed);
  SimResult r;
  r.share.assign(n, 0);
  r.by_group.resize(groups);
  double cached_tokens = 0, prompt_tokens = 0;
  std::vector<KvCandidate> cands(n);
  for (const SimRequest& req : requests) {
    cluster.drain(req.gap_s);
    for (std::size_t i = 0; i < n; ++i) {
      cands[i].index = i;
      cands[i].cached_tokens = cluster.cached(i, req.keys, block);
      cands[i].queued_tokens = cluster.instances[i].queue;
      cands[i].tokens_per_s = speed;
      cands[i].ring_load = cluster.instances[i].queue;
    }
    std::size_t chosen = 0;
    if (router == Router::kKvAware) {
      const auto d = choose_prefill(cands, ring, req.keys, block, req.prompt, o);
      chosen = cands[d->chosen].index;
      ++r.reasons[static_cast<std::size_t>(d->reason)];
    } else {  // the longest cached prefix; ties: the shortest queue, then the lowest index
      for (std::size_t i = 1; i < n; ++i) {
        if (cands[i].cached_tokens > cands[chosen].cached_tokens ||
            (cands[i].cached_tokens == cands[chosen].cached_tokens &&
             cands[i].queued_tokens < cands[chosen].queued_tokens)) {
          chosen = i;
        }
      }
    }
    cached_tokens += cands[chosen].cached_tokens;
    prompt_tokens += req.prompt;
    const double ttft = cluster.send(chosen, req.keys, block, req.prompt);
    r.mean_ttft_ms += ttft / static_cast<double>(requests.size());
    r.max_ttft_ms = std::max(r.max_ttft_ms, ttft);
    ++r.share[chosen];
    ++r.by_group[req.group][chosen];
  }
  r.cached_fraction = cached_tokens / prompt_tokens;
  return r;
}

// Requests of `groups` tenants (1 = everyone shares one prompt): each is the tenant's
// `shared_tokens`-token prompt followed by a random suffix of suffix_min..suffix_max tokens.
// Arrivals are Poisson or regular, at `utilization` of the cluster's prefill capacity when the
// shared prompts are cached.
std::vector<SimRequest> shared_prefix_requests(std::uint64_t seed, std::size_t count,
                                               std::size_t groups, std::size_t shared_tokens,
                                               std::size_t suffix_min, std::size_t suffix_max,
                                               double utilization, bool poisson,
                                               double cluster_tokens_per_s, std::size_t block) {
  Rng rng(seed);
  const double warm_tokens =
      static_cast<double>(shared_tokens % block) + static_cast<double>(suffix_min + suffix_max) / 2;
  const double mean_gap = warm_tokens / (utilization * cluster_tokens_per_s);
  std::vector<SimRequest> requests;
  for (std::size_t r = 0; r < count; ++r) {
    const std::size_t group = rng.below(groups);
    std::vector<TokenId> tokens = tokens_of(static_cast<TokenId>(1 + 10000 * group), shared_tokens);
    const std::size_t suffix = rng.between(suffix_min, suffix_max);
    for (std::size_t t = 0; t < suffix; ++t) {
      tokens.push_back(static_cast<TokenId>(100000 + rng.below(50000)));
    }
    SimRequest req;
    req.keys = hash_blocks64(tokens, block);
    req.prompt = static_cast<std::uint32_t>(tokens.size());
    req.group = group;
    req.gap_s = poisson ? -mean_gap * std::log(1 - rng.uniform()) : mean_gap;
    requests.push_back(std::move(req));
  }
  return requests;
}

// The common-prefix trap: 2,000 requests share a 1,000-token system prompt and differ after it.
// Greedy longest-prefix routing sends everything to the first instance that cached the system
// prompt, whose queue then grows without bound. The expected-TTFT rule sends a request elsewhere
// as soon as the holders' queues outgrow the saving (1,000 tokens); the new instance caches the
// system prompt too, and once every instance holds it the shared part is common and the distinct
// suffixes go round the bounded-load ring.
//
// What this does and does not give (measured, see the printed shares): at high load every
// instance ends up holding the prompt and the shares are even (0.5x..1.5x of the mean, asserted at
// 90% load over several seeds and both arrival processes). At lower load the rule deliberately
// uses only as many instances as it needs, since an instance without the prompt costs 1,000 extra
// tokens of prefill while the holders' queues stay shorter than that; some instances then get
// nothing, and what is asserted there is that no instance is sent more work than it can serve,
// and the contrast with greedy.
TEST(KvRoute, CommonPrefixTrapStaysBalanced) {
  const std::size_t n = 8, block = 16, count = 2000;
  const double speed = 10000;  // uncached tokens per second per instance
  struct Row {
    bool poisson;
    double utilization;
    bool balanced;  // assert 0.5x..1.5x
  };
  const Row rows[] = {{true, 0.3, false}, {true, 0.5, false},  {true, 0.7, false},
                      {true, 0.9, true},  {false, 0.5, false}, {false, 0.9, true}};
  // The core's defaults (the request's TTFT alone), and the module's kv_aware defaults (misses
  // priced at twice their compute, tie 0.05): the holders keep more, but not everything.
  KvRouteOptions priced;
  priced.miss_weight = 2;
  priced.tie_fraction = 0.05;
  for (const KvRouteOptions& o : {KvRouteOptions{}, priced}) {
    for (const Row& row : rows) {
      for (std::uint64_t seed = 1; seed <= 4; ++seed) {
        const auto requests = shared_prefix_requests(
            seed, count, 1, 1000, 100, 1000, row.utilization, row.poisson, speed * n, block);
        const SimResult kv = simulate(requests, n, 1, speed, block, Router::kKvAware, o);
        const SimResult greedy =
            simulate(requests, n, 1, speed, block, Router::kGreedyLongestPrefix);
        const char* arrivals = row.poisson ? "poisson" : "regular";
        std::printf(
            "[common-prefix trap] miss_weight %g, %s %.0f%% load seed %llu: kv-aware shares / "
            "mean:%s; TTFT mean "
            "%.0f max %.0f ms; warm %zu cold %zu cold-overflow %zu | greedy: max share %.2f, TTFT "
            "mean %.0f max %.0f ms\n",
            o.miss_weight, arrivals, 100 * row.utilization, static_cast<unsigned long long>(seed),
            shares_of(kv.share).c_str(), kv.mean_ttft_ms, kv.max_ttft_ms, kv.reasons[0],
            kv.reasons[1], kv.reasons[2],
            static_cast<double>(*std::max_element(greedy.share.begin(), greedy.share.end())) /
                (static_cast<double>(count) / n),
            greedy.mean_ttft_ms, greedy.max_ttft_ms);
        const double mean = static_cast<double>(count) / n;
        // What one instance can serve at this load, as a multiple of the mean share.
        const double servable = 1 / row.utilization;
        for (std::size_t i = 0; i < n; ++i) {
          const double share = static_cast<double>(kv.share[i]) / mean;
          if (row.balanced) {
            EXPECT_GE(share, 0.5) << arrivals << " " << row.utilization << " seed " << seed;
            EXPECT_LE(share, 1.5) << arrivals << " " << row.utilization << " seed " << seed;
          }
          EXPECT_LT(share, servable) << arrivals << " " << row.utilization << " seed " << seed;
        }
        EXPECT_EQ(*std::max_element(greedy.share.begin(), greedy.share.end()), count);
        EXPECT_LT(kv.max_ttft_ms * 10, greedy.max_ttft_ms);
      }
    }
  }
}

// Eight tenants, each with its own 2,000-token prompt and random suffixes: each tenant's
// requests stay mostly on one or two instances (cache locality) while the load stays balanced.
// Locality loosens as the load rises (a tenant's prompt is copied to another instance whenever
// its holders' queues outgrow the 2,000-token saving, and copies are never evicted in this
// model): asserted per tenant at 50% load, on average at 70%.
TEST(KvRoute, MultiTenantLocality) {
  const std::size_t n = 8, tenants = 8, block = 16, count = 4000;
  const double speed = 10000;
  for (const double utilization : {0.5, 0.7}) {
    for (std::uint64_t seed = 1; seed <= 4; ++seed) {
      const auto requests = shared_prefix_requests(seed, count, tenants, 2000, 50, 500, utilization,
                                                   true, speed * n, block);
      const SimResult kv = simulate(requests, n, tenants, speed, block, Router::kKvAware);
      double top2_sum = 0, top2_min = 1;
      std::string tenants_line;
      for (std::size_t t = 0; t < tenants; ++t) {
        std::vector<std::size_t> per;
        std::size_t total = 0;
        for (const auto& [instance, c] : kv.by_group[t]) {
          per.push_back(c);
          total += c;
        }
        std::sort(per.rbegin(), per.rend());
        const double top2 = static_cast<double>(per[0] + (per.size() > 1 ? per[1] : 0)) / total;
        top2_sum += top2;
        top2_min = std::min(top2_min, top2);
        char buf[32];
        std::snprintf(buf, sizeof buf, " %.0f%%/%zu", 100 * top2, per.size());
        tenants_line += buf;
        if (utilization <= 0.5) {
          EXPECT_GT(top2, 0.7) << "seed " << seed << " tenant " << t;
        }
      }
      std::printf(
          "[multi-tenant] %.0f%% load seed %llu: shares / mean:%s; TTFT mean %.0f max %.0f ms; "
          "cached %.1f%%; per tenant top-two share/instances used:%s\n",
          100 * utilization, static_cast<unsigned long long>(seed), shares_of(kv.share).c_str(),
          kv.mean_ttft_ms, kv.max_ttft_ms, 100 * kv.cached_fraction, tenants_line.c_str());
      EXPECT_GT(top2_sum / tenants, 0.85) << "seed " << seed;
      EXPECT_GT(top2_min, 0.5) << "seed " << seed;
      const double mean = static_cast<double>(count) / n;
      for (std::size_t i = 0; i < n; ++i) {
        EXPECT_GE(kv.share[i], 0.5 * mean) << "seed " << seed << " instance " << i;
        EXPECT_LE(kv.share[i], 1.5 * mean) << "seed " << seed << " instance " << i;
      }
      EXPECT_GT(kv.cached_fraction, 0.8);
    }
  }
}

TEST(KvRoute, SixtyFourCandidatesAreFast) {
  const std::size_t n = 64;
  const BoundedLoadRing ring(member_ids(n));
  Rng rng(3);
  std::vector<KvCandidate> warm(n), cold(n);
  for (std::size_t i = 0; i < n; ++i) {
    warm[i].index = cold[i].index = i;
    warm[i].tokens_per_s = cold[i].tokens_per_s = 10000;
    warm[i].cached_tokens = static_cast<std::uint32_t>(16 * rng.below(32));
    warm[i].queued_tokens = cold[i].queued_tokens = static_cast<double>(rng.below(4000));
    cold[i].ring_load = static_cast<double>(rng.below(4000));
  }
  const auto keys = keys_of(64, 9);
  const KvRouteOptions o;
  const int iterations = 20000;
  std::size_t sink = 0;
  for (auto* cands : {&warm, &cold}) {
    const auto start = std::chrono::steady_clock::now();
    for (int it = 0; it < iterations; ++it) {
      const auto d = choose_prefill(*cands, ring, std::span(keys).subspan(it % 8), 16, 1024, o);
      sink += d->chosen;
    }
    const double us =
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start)
            .count() /
        iterations;
    std::printf("[speed] choose_prefill, 64 candidates, %s: %.2f us per decision\n",
                cands == &warm ? "warm" : "cold", us);
  }
  EXPECT_LT(sink, static_cast<std::size_t>(2 * iterations) * n);
}

// ---------------------------------------------------------------------------------------------
// choose_decode
// ---------------------------------------------------------------------------------------------

std::vector<DecodeCandidate> decode_candidates(std::initializer_list<double> outstanding) {
  std::vector<DecodeCandidate> out;
  for (double o : outstanding) {
    DecodeCandidate c;
    c.index = out.size();
    c.outstanding = o;
    out.push_back(c);
  }
  return out;
}

TEST(KvDecodeRoute, LeastLoadedWins) {
  const BoundedLoadRing ring(member_ids(4));
  const DecodeRouteOptions o;
  auto cands = decode_candidates({12, 5, 30, 9});
  cands[0].cached_tokens = 4096;  // busier: its cache does not matter
  auto d = choose_decode(cands, ring, 1, o);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->chosen, 1u);
  EXPECT_EQ(d->runner_up, 3u);
  EXPECT_FALSE(d->cache_decided);
  EXPECT_DOUBLE_EQ(d->chosen_load, 5);
  EXPECT_EQ(d->equally_loaded, 1u);
  // The engine's running batch counts: load = max(outstanding, running).
  cands[1].running = 20;
  d = choose_decode(cands, ring, 1, o);
  EXPECT_EQ(d->chosen, 3u);
  EXPECT_DOUBLE_EQ(d->chosen_load, 9);
  cands[3].running = 2;  // lower than outstanding: outstanding stands
  EXPECT_EQ(choose_decode(cands, ring, 1, o)->chosen, 3u);
  EXPECT_FALSE(choose_decode({}, ring, 1, o));
}

TEST(KvDecodeRoute, CacheBreaksTiesWithinSlack) {
  const BoundedLoadRing ring(member_ids(4));
  struct Row {
    const char* what;
    std::vector<double> load;
    std::vector<std::uint32_t> cached;
    double slack;
    std::size_t expected;
    bool cache_decided;
    std::size_t equally_loaded;
  };
  const std::vector<Row> rows = {
      // min 10, band 10 + max(1, 1) = 11
      {"within slack: most cached", {10, 10.5, 12, 40}, {0, 512, 2048, 4096}, 0.1, 1, true, 2},
      // min 40, band 40 + 4 = 44
      {"slack scales with load", {40, 43, 45, 50}, {0, 512, 2048, 4096}, 0.1, 1, true, 2},
      {"slack 0: still within 1", {40, 41, 45, 50}, {0, 512, 2048, 4096}, 0.0, 1, true, 2},
      {"outside: least loaded", {10, 12, 13, 14}, {0, 512, 2048, 4096}, 0.1, 0, false, 1},
      {"idle: most cached", {0, 0, 0, 0}, {16, 64, 32, 0}, 0.1, 1, true, 4},
  };
  for (const Row& r : rows) {
    std::vector<DecodeCandidate> cands(4);
    for (std::size_t i = 0; i < 4; ++i) {
      cands[i].index = i;
      cands[i].outstanding = r.load[i];
      cands[i].cached_tokens = r.cached[i];
    }
    DecodeRouteOptions o;
    o.slack = r.slack;
    for (std::uint64_t key = 0; key < 20; ++key) {
      const auto d = choose_decode(cands, ring, key, o);
      ASSERT_TRUE(d) << r.what;
      EXPECT_EQ(d->chosen, r.expected) << r.what;
      EXPECT_EQ(d->chosen_cached, r.cached[r.expected]) << r.what;
      EXPECT_EQ(d->equally_loaded, r.equally_loaded) << r.what;
      // cache_decided: load and ring order alone would have picked another one.
      if (r.equally_loaded == 1) {
        EXPECT_FALSE(d->cache_decided) << r.what;
      } else {
        Bools all(4);
        std::vector<std::uint32_t> rank(4);
        ring.clockwise_ranks(key, all.span(), rank);
        const double low = *std::min_element(r.load.begin(), r.load.end());
        const double limit = low + std::max(1.0, r.slack * low);
        std::size_t ring_first = 4;
        for (std::size_t i = 0; i < 4; ++i) {
          if (r.load[i] <= limit && (ring_first == 4 || rank[i] < rank[ring_first])) {
            ring_first = i;
          }
        }
        EXPECT_EQ(d->cache_decided, ring_first != r.expected) << r.what << " key " << key;
      }
    }
  }
  // Equal load and cache: the ring order from the key.
  std::vector<DecodeCandidate> cands = decode_candidates({3, 3, 3, 3});
  Bools all(4);
  std::vector<std::uint32_t> rank(4);
  std::vector<std::size_t> wins(4, 0);
  for (std::uint64_t key = 0; key < 400; ++key) {
    const auto d = choose_decode(cands, ring, key, DecodeRouteOptions{});
    ring.clockwise_ranks(key, all.span(), rank);
    EXPECT_EQ(rank[d->chosen], 0u);
    EXPECT_EQ(rank[*d->runner_up], 1u);
    EXPECT_FALSE(d->cache_decided);
    ++wins[d->chosen];
  }
  for (std::size_t w : wins) EXPECT_GT(w, 50u);  // the keys spread over the members
}

TEST(KvDecodeRoute, HighKvUsageExcludedUnlessAll) {
  const BoundedLoadRing ring(member_ids(4));
  const DecodeRouteOptions o;
  auto cands = decode_candidates({1, 5, 9, 20});
  cands[0].kv_usage = 0.97;
  cands[1].kv_usage = 0.95;          // at the threshold: excluded
  cands[2].kv_usage = std::nan("");  // unknown: usable
  auto d = choose_decode(cands, ring, 7, o);
  ASSERT_TRUE(d);
  EXPECT_EQ(d->chosen, 2u);
  EXPECT_EQ(d->runner_up, 3u);
  EXPECT_FALSE(d->all_kv_high);
  // All high: all are used, least loaded first.
  for (auto& c : cands) c.kv_usage = 0.99;
  d = choose_decode(cands, ring, 7, o);
  EXPECT_EQ(d->chosen, 0u);
  EXPECT_EQ(d->runner_up, 1u);
  EXPECT_TRUE(d->all_kv_high);
  EXPECT_NE(explain(*d).find("all-kv-high"), std::string::npos);
  // One usable: it is chosen, and the runner-up comes from the rest.
  cands[3].kv_usage = 0.2;
  d = choose_decode(cands, ring, 7, o);
  EXPECT_EQ(d->chosen, 3u);
  EXPECT_EQ(d->runner_up, 0u);
}

TEST(KvDecodeRoute, DeterministicUnderShuffledCandidates) {
  const std::size_t n = 10;
  const BoundedLoadRing ring(member_ids(n));
  Rng rng(77);
  for (int trial = 0; trial < 1000; ++trial) {
    const std::size_t count = 1 + rng.below(n);
    std::vector<std::size_t> members(n);
    std::iota(members.begin(), members.end(), 0);
    rng.shuffle(members);
    std::vector<DecodeCandidate> cands(count);
    for (std::size_t j = 0; j < count; ++j) {
      cands[j].index = members[j];
      cands[j].outstanding = static_cast<double>(rng.below(trial % 2 ? 4 : 40));
      cands[j].running = rng.below(3) == 0 ? static_cast<double>(rng.below(40)) : 0;
      cands[j].cached_tokens = static_cast<std::uint32_t>(16 * rng.below(3));
      cands[j].kv_usage = rng.below(5) == 0 ? 0.99 : 0.3;
    }
    const std::uint64_t key = rng.next();
    const auto d0 = choose_decode(cands, ring, key, DecodeRouteOptions{});
    ASSERT_TRUE(d0);
    for (int s = 0; s < 4; ++s) {
      std::vector<DecodeCandidate> shuffled = cands;
      rng.shuffle(shuffled);
      const auto d = choose_decode(shuffled, ring, key, DecodeRouteOptions{});
      ASSERT_TRUE(d);
      ASSERT_EQ(shuffled[d->chosen].index, cands[d0->chosen].index) << "trial " << trial;
      ASSERT_EQ(d->runner_up.has_value(), d0->runner_up.has_value());
      if (d->runner_up) {
        ASSERT_EQ(shuffled[*d->runner_up].index, cands[*d0->runner_up].index);
      }
      ASSERT_EQ(d->cache_decided, d0->cache_decided);
      ASSERT_EQ(d->equally_loaded, d0->equally_loaded);
    }
  }
}

TEST(KvDecodeRoute, RejectsBadInput) {
  const BoundedLoadRing ring(member_ids(2));
  auto cands = decode_candidates({1, 2});
  cands[1].index = 0;
  EXPECT_THROW(choose_decode(cands, ring, 1, DecodeRouteOptions{}), std::invalid_argument);
  cands[1].index = 2;
  EXPECT_THROW(choose_decode(cands, ring, 1, DecodeRouteOptions{}), std::invalid_argument);
}

}  // namespace
}  // namespace omni
