#include "omni/robust_lock.hpp"

#include <cerrno>
#include <climits>
#include <csignal>
#include <ctime>

#include <sched.h>
#include <unistd.h>

namespace omni {
namespace {

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

}  // namespace

std::uint64_t steady_now_ns() noexcept {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000'000ULL +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

void Log2Histogram::observe(std::uint64_t ns) noexcept {
  buckets[bucket_of(ns)].fetch_add(1, std::memory_order_relaxed);
  count.fetch_add(1, std::memory_order_relaxed);
  sum_ns.fetch_add(ns, std::memory_order_relaxed);
  std::uint64_t seen = max_ns.load(std::memory_order_relaxed);
  while (ns > seen && !max_ns.compare_exchange_weak(seen, ns, std::memory_order_relaxed)) {
  }
}

std::size_t Log2Histogram::bucket_of(std::uint64_t ns) noexcept {
  if (ns < 4) return static_cast<std::size_t>(ns);
  const auto k = static_cast<std::size_t>(63 - __builtin_clzll(ns));  // >= 2
  const auto sub = static_cast<std::size_t>((ns >> (k - 2)) & 3);
  const std::size_t b = kSub * (k - 1) + sub;
  return b < kBuckets ? b : kBuckets - 1;
}

std::uint64_t Log2Histogram::upper_ns(std::size_t b) noexcept {
  if (b + 1 >= kBuckets) return UINT64_MAX;
  if (b < 4) return b;
  const std::size_t k = b / kSub + 1;
  const std::uint64_t sub = b % kSub;
  return ((4 + sub + 1) << (k - 2)) - 1;
}

std::uint64_t Log2Histogram::quantile_ns(double q) const noexcept {
  std::uint64_t counts[kBuckets];
  std::uint64_t total = 0;
  for (std::size_t k = 0; k < kBuckets; ++k) {
    counts[k] = buckets[k].load(std::memory_order_relaxed);
    total += counts[k];
  }
  if (total == 0) return 0;
  if (!(q > 0)) q = 0;
  if (q > 1) q = 1;
  const auto rank = static_cast<std::uint64_t>(q * static_cast<double>(total));
  std::uint64_t seen = 0;
  for (std::size_t k = 0; k < kBuckets; ++k) {
    seen += counts[k];
    if (seen > rank || (seen == total && counts[k] > 0)) {
      const std::uint64_t upper = upper_ns(k);
      const std::uint64_t mx = max_ns.load(std::memory_order_relaxed);
      return mx != 0 && mx < upper ? mx : upper;
    }
  }
  return max_ns.load(std::memory_order_relaxed);
}

void Log2Histogram::reset() noexcept {
  for (auto& b : buckets) b.store(0, std::memory_order_relaxed);
  count.store(0, std::memory_order_relaxed);
  sum_ns.store(0, std::memory_order_relaxed);
  max_ns.store(0, std::memory_order_relaxed);
}

bool pid_gone(std::uint64_t pid) noexcept {
  if (pid == 0) return false;
  if (pid > static_cast<std::uint64_t>(INT_MAX)) return true;
  return ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
}

RobustLock::RobustLock(RobustLockWord& word) noexcept : word_(word) {
  const auto self = static_cast<std::uint64_t>(static_cast<std::uint32_t>(::getpid()));
  std::uint64_t start = 0;
  for (std::uint64_t spin = 0;; ++spin) {
    std::uint64_t held = word_.holder.load(std::memory_order_relaxed);
    if (held == 0) {
      if (word_.holder.compare_exchange_weak(held, self, std::memory_order_acquire,
                                             std::memory_order_relaxed)) {
        break;
      }
      continue;
    }
    if (start == 0) start = steady_now_ns();
    if (spin < 256) {
      cpu_relax();
      continue;
    }
    // Every 64 yields: is the holder still there?
    if (spin % 64 == 0 && pid_gone(held) &&
        word_.holder.compare_exchange_strong(held, self, std::memory_order_acquire,
                                             std::memory_order_relaxed)) {
      took_over_ = true;
      word_.takeovers.fetch_add(1, std::memory_order_relaxed);
      break;
    }
    ::sched_yield();
  }
  acquired_ns_ = steady_now_ns();
  word_.acquired.fetch_add(1, std::memory_order_relaxed);
  if (start != 0) {
    word_.contended.fetch_add(1, std::memory_order_relaxed);
    word_.wait.observe(acquired_ns_ > start ? acquired_ns_ - start : 0);
  }
}

RobustLock::~RobustLock() {
  const std::uint64_t now = steady_now_ns();
  word_.hold.observe(now > acquired_ns_ ? now - acquired_ns_ : 0);
  word_.holder.store(0, std::memory_order_release);
}

}  // namespace omni
