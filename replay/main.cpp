// omni-bench: replays a request trace (Mooncake, Azure, or synthetic) open-loop against an
// OpenAI-compatible server and reports latency, throughput, goodput and prefix-cache figures.
// See replay/README.md.
#include "options.hpp"
#include "oracle.hpp"
#include "runner.hpp"
#include "summary.hpp"
#include "synthetic.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/signal_set.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <csignal>
#include <fstream>
#include <iostream>

namespace {

using namespace omni::replay;

[[noreturn]] void die(int status, const std::string& msg) {
  std::cerr << "omni-bench: " << msg << (status == 2 ? "\n(see omni-bench --help)\n" : "\n");
  std::exit(status);
}

// Opened before the run, so that a bad path fails at once rather than after it.
std::ofstream open_output(const std::string& path, const char* flag) {
  std::ofstream out(path);
  if (!out) die(2, std::string(flag) + ": cannot write " + path);
  return out;
}

Workload load(const Options& o) {
  try {
    if (!o.trace.empty()) return load_trace(o.trace, o.slice);
    Workload w = generate_synthetic(parse_synthetic(o.synthetic), o.synthetic, o.prompt.seed);
    apply_slice(w.requests, o.slice);
    return w;
  } catch (const std::invalid_argument& e) {
    die(2, e.what());
  } catch (const TraceError& e) {
    die(1, e.what());
  }
}

// Each request in flight holds a socket, so the descriptor limit must allow --max-concurrency
// of them; the soft limit is often 1024. Raises it as far as the hard limit allows.
void raise_descriptor_limit(std::size_t concurrency) {
  rlimit lim{};
  if (getrlimit(RLIMIT_NOFILE, &lim) != 0 || lim.rlim_cur == RLIM_INFINITY) return;
  const rlim_t want = static_cast<rlim_t>(concurrency) + 64;  // and stdio, files, the resolver
  if (lim.rlim_cur >= want) return;
  lim.rlim_cur = lim.rlim_max == RLIM_INFINITY ? want : std::min(want, lim.rlim_max);
  if (setrlimit(RLIMIT_NOFILE, &lim) != 0 || lim.rlim_cur < want) {
    std::cerr << "omni-bench: warning: open-file limit " << lim.rlim_cur << " is below "
              << want << "; requests beyond it fail to connect\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  try {
    o = parse_options(argc, argv);
  } catch (const UsageError& e) {
    die(2, e.what());
  }
  if (o.help) {
    std::cout << kUsage;
    return 0;
  }
  std::ofstream summary_file, csv_file;
  if (!o.summary_path.empty()) summary_file = open_output(o.summary_path, "--summary");
  if (!o.csv_path.empty()) csv_file = open_output(o.csv_path, "--csv");

  const Workload workload = load(o);
  const PromptBuilder prompts(o.prompt);
  std::optional<OracleResult> oracle;
  if (o.oracle_capacity_blocks) {
    oracle = run_oracle(workload, prompts, *o.oracle_capacity_blocks, o.oracle_block_size);
  }

  nlohmann::ordered_json summary;
  int interrupted_by = 0;  // the signal that ended the run early
  if (o.dry_run) {
    summary["label"] = o.label;
    summary["dry_run"] = true;
    summary["trace"] = trace_json(workload, o.slice);
    summary["workload"] = workload_json(workload);
    if (oracle) add_oracle(summary, *oracle);
  } else {
    boost::asio::io_context io(1);
    boost::system::error_code ec;
    boost::asio::ip::tcp::resolver resolver(io);
    const auto found = resolver.resolve(o.target_host, std::to_string(o.target_port), ec);
    if (ec || found.empty())
      die(1, "--target: cannot resolve " + o.target_host + ": " + ec.message());
    o.run.endpoint = *found.begin();

    const double span = workload.requests.empty() ? 0 : workload.requests.back().arrival_s;
    std::cerr << "omni-bench: replaying " << workload.requests.size() << " requests (" << span
              << " s of trace, " << span / o.run.speedup << " s at speedup " << o.run.speedup
              << ") to " << o.target << "\n";
    raise_descriptor_limit(o.run.max_concurrency);
    Runner runner(io, o.run, workload, prompts);
    boost::asio::signal_set signals(io, SIGINT, SIGTERM);
    signals.async_wait([&](boost::system::error_code e, int signal) {
      if (e) return;
      interrupted_by = signal;
      runner.interrupt();
    });
    const RunResult result = runner.run();
    signals.cancel();

    SummaryInputs in;
    in.label = o.label;
    in.target = o.target;
    in.config = o.run;
    in.slice = o.slice;
    in.time_scale = o.time_scale;
    in.slo_ttft_ms = o.slo_ttft_ms;
    in.slo_tpot_ms = o.slo_tpot_ms;
    in.oracle = oracle;
    summary = summarize(in, workload, result);
    if (csv_file.is_open()) {
      write_csv(csv_file, result, o.time_scale);
      if (!csv_file.flush()) die(1, "--csv: write error on " + o.csv_path);
    }
  }
  // Error bodies are cut at 500 bytes by a server-agnostic rule: replace, never throw, on
  // invalid UTF-8.
  const auto text = [&](int indent) {
    return summary.dump(indent, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
  };
  std::cout << text(-1) << std::endl;
  if (summary_file.is_open() && !(summary_file << text(2) << "\n" && summary_file.flush())) {
    die(1, "--summary: write error on " + o.summary_path);
  }
  return interrupted_by ? 128 + interrupted_by : 0;
}
