// The run's summary (one JSON object) and per-request CSV, from the records. Latencies are
// reported in model time (wall / time_scale) and throughputs per model second; lateness and
// the schedule stay in wall time, since they measure the client against the clock. The field
// list is in replay/README.md.
#pragma once

#include "oracle.hpp"
#include "runner.hpp"
#include "workload.hpp"

#include <nlohmann/json.hpp>

#include <optional>
#include <ostream>
#include <string>

namespace omni::replay {

struct SummaryInputs {
  std::string label;
  std::string target;
  RunConfig config;
  TraceOptions slice;
  double time_scale = 1;
  std::optional<double> slo_ttft_ms;  // model time
  std::optional<double> slo_tpot_ms;
  std::optional<OracleResult> oracle;
};

// TPOT of one request, wall ms: (e2e - ttft) / (completion_tokens - 1), for a successful
// streamed request of at least two output tokens.
std::optional<double> tpot_ms(const RequestRecord& r);

// The trace's source, file and slice.
nlohmann::ordered_json trace_json(const Workload& workload, const TraceOptions& slice);
// Lengths, arrival rate and prompt reuse of a workload (for --dry-run).
nlohmann::ordered_json workload_json(const Workload& workload);
// {"oracle_hit_rate": x, "oracle": {...}} fields, added to `out`.
void add_oracle(nlohmann::ordered_json& out, const OracleResult& oracle);

nlohmann::ordered_json summarize(const SummaryInputs& in, const Workload& workload,
                                 const RunResult& run);

void write_csv(std::ostream& out, const RunResult& run, double time_scale);

}  // namespace omni::replay
