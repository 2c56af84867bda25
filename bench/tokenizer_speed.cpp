// Tokenizer throughput and memory of our C++ tokenizer, for bench/tokenizer_bench.sh.
//
//   tokenizer_speed DIR CORPUS [SECONDS]
//
// CORPUS is JSON Lines of strings (documents). Prints one JSON line:
//   load_ms, memory_bytes (the tokenizer's own estimate), rss_delta_bytes (resident memory the
//   load added), bytes, tokens, cold_mb_s (the first pass, empty caches), warm_mb_s (passes
//   until SECONDS elapsed), all on one thread (one core).
#include <omni/tokenizer.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <unistd.h>

namespace {

long rss_bytes() {
  std::ifstream f("/proc/self/statm");
  long size = 0, resident = 0;
  f >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: tokenizer_speed DIR CORPUS [SECONDS]\n";
    return 2;
  }
  const double budget = argc > 3 ? std::stod(argv[3]) : 3.0;
  std::vector<std::string> docs;
  {
    std::ifstream in(argv[2]);
    std::string line;
    while (std::getline(in, line)) {
      if (!line.empty()) docs.push_back(nlohmann::json::parse(line).get<std::string>());
    }
  }
  std::size_t bytes = 0;
  for (const auto& d : docs) bytes += d.size();

  const long rss0 = rss_bytes();
  auto t0 = std::chrono::steady_clock::now();
  auto tok = omni::Tokenizer::load_dir(argv[1]);
  const double load_ms = seconds_since(t0) * 1e3;
  const long rss1 = rss_bytes();

  std::size_t tokens = 0;
  t0 = std::chrono::steady_clock::now();
  for (const auto& d : docs) tokens += tok->encode(d, false).size();
  const double cold = seconds_since(t0);

  std::size_t passes = 0;
  t0 = std::chrono::steady_clock::now();
  double warm = 0;
  do {
    std::size_t n = 0;
    for (const auto& d : docs) n += tok->encode(d, false).size();
    if (n != tokens) {
      std::cerr << "tokenizer_speed: a second pass gave " << n << " tokens, the first " << tokens
                << "\n";
      return 1;
    }
    ++passes;
    warm = seconds_since(t0);
  } while (warm < budget);

  nlohmann::json out = {{"impl", "omni-cpp"},
                        {"load_ms", load_ms},
                        {"memory_bytes", tok->memory_bytes()},
                        {"rss_delta_bytes", rss1 - rss0},
                        {"bytes", bytes},
                        {"tokens", tokens},
                        {"cold_mb_s", static_cast<double>(bytes) / cold / 1e6},
                        {"warm_mb_s", static_cast<double>(bytes) * static_cast<double>(passes) /
                                          warm / 1e6},
                        {"passes", passes}};
  std::cout << out.dump() << "\n";
  return 0;
}
