// omni-bench's command line.
#pragma once

#include "prompt.hpp"
#include "runner.hpp"
#include "workload.hpp"

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

namespace omni::replay {

// A bad command line; the message names the flag. omni-bench exits 2 on it.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string target;       // as given: http://HOST:PORT
  std::string target_host;  // parsed from it
  std::uint16_t target_port = 0;
  std::string trace;      // KIND:PATH
  std::string synthetic;  // KEY=VAL,...
  TraceOptions slice;
  RunConfig run;  // endpoint is resolved later, from target_host/target_port
  PromptConfig prompt;
  double time_scale = 1;
  std::optional<double> slo_ttft_ms;
  std::optional<double> slo_tpot_ms;
  std::string csv_path;
  std::string summary_path;
  std::string label;
  std::optional<std::uint64_t> oracle_capacity_blocks;
  std::uint32_t oracle_block_size = 64;
  bool dry_run = false;
  bool help = false;
};

extern const char* const kUsage;

// Throws UsageError.
Options parse_options(int argc, const char* const* argv);

}  // namespace omni::replay
