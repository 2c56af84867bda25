// A lock for data in memory shared by processes that may die at any instruction (nginx workers
// killed with SIGKILL), and the log2 histograms that measure how long it is held and waited for.
//
// The lock word holds the holder's pid (0: free). A process that finds the lock busy spins with
// a pause, then yields; every 64 yields it checks whether the holder still exists
// (kill(pid, 0) fails with ESRCH) and, if it does not, takes the lock over by compare-and-swap.
// The caller learns of a takeover (`took_over()`): the dead holder may have stopped half-way
// through an update, so the data must be checked or rebuilt before use. This is what nginx's
// own ngx_shmtx cannot offer outside the slab pool's mutex (only that one is force-unlocked by
// the master when a worker dies). All processes must share a pid namespace. Not reentrant.
//
// Everything lives in a caller-provided struct in the shared region (RobustLockWord), trivially
// constructible from zero bytes.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace omni {

// A histogram of nanosecond durations with four linear sub-buckets per power of two (every
// bucket is at most 25% wide: quantiles within 25%): values 0..3 have a bucket each, then
// [2^k, 2^(k+1)) is split in four for k = 2 .. 33, and everything from 2^34 ns (about 17 s) up
// is in the last bucket. Lock-free; a process killed during observe() loses at most that
// observation.
struct Log2Histogram {
  static constexpr std::size_t kSub = 4;
  static constexpr std::size_t kBuckets = 4 + kSub * 32 + 1;
  std::atomic<std::uint64_t> buckets[kBuckets];
  std::atomic<std::uint64_t> count;
  std::atomic<std::uint64_t> sum_ns;
  std::atomic<std::uint64_t> max_ns;

  void observe(std::uint64_t ns) noexcept;
  static std::size_t bucket_of(std::uint64_t ns) noexcept;
  // Upper bound (inclusive) of bucket k in nanoseconds; the last bucket: UINT64_MAX.
  static std::uint64_t upper_ns(std::size_t k) noexcept;
  // The value under which a fraction q (0..1) of the observations fall, as a bucket's upper
  // bound (an overestimate by at most 25%, and never above the largest value seen); 0 with no
  // observations.
  std::uint64_t quantile_ns(double q) const noexcept;
  void reset() noexcept;
};
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);

struct RobustLockWord {
  std::atomic<std::uint64_t> holder;  // pid of the holder, 0 when free
  std::atomic<std::uint64_t> acquired;
  std::atomic<std::uint64_t> contended;  // acquisitions that had to wait
  std::atomic<std::uint64_t> takeovers;  // locks taken from a dead holder
  Log2Histogram hold;                    // from acquisition to release
  Log2Histogram wait;                    // from the first attempt to acquisition (contended)
};

// Takes the lock for its lifetime. Blocks (spinning, then yielding) until it has it; it never
// fails, since a dead holder is always taken over.
class RobustLock {
 public:
  explicit RobustLock(RobustLockWord& word) noexcept;
  ~RobustLock();
  RobustLock(const RobustLock&) = delete;
  RobustLock& operator=(const RobustLock&) = delete;

  // True when the lock was taken from a holder that had died: repair the data.
  bool took_over() const noexcept { return took_over_; }

 private:
  RobustLockWord& word_;
  std::uint64_t acquired_ns_ = 0;
  bool took_over_ = false;
};

// Whether the process named by a lock or lease word is gone (kill(pid, 0) fails with ESRCH). A
// value that is no pid at all counts as gone; 0 (nobody) is not gone.
bool pid_gone(std::uint64_t pid) noexcept;

// CLOCK_MONOTONIC in nanoseconds.
std::uint64_t steady_now_ns() noexcept;

}  // namespace omni
