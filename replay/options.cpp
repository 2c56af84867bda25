#include "options.hpp"

#include "parse.hpp"

#include <limits>

namespace omni::replay {

const char* const kUsage =
    R"(usage: omni-bench (--trace KIND:PATH | --synthetic SPEC) --target URL [options]
       omni-bench (--trace KIND:PATH | --synthetic SPEC) --dry-run [options]

Replays a request trace open-loop against an OpenAI-compatible server and reports latency,
throughput, goodput and prefix-cache figures. See replay/README.md.

Workload:
  --trace mooncake:PATH | azure:PATH   a Mooncake JSONL or Azure CSV trace
  --synthetic KEY=VAL,...   generated: requests=N | duration=S, rate=R, arrival=poisson|fixed,
                            input=DIST, output=DIST, prefixes=N, prefix_len=T, users=M,
                            turns=T; DIST is N, uniform:A:B or lognormal:MEAN:CV
  --limit N                 the first N requests (after --start/--window)
  --start S  --window S     the requests arriving in [S, S+W) trace seconds
  --skip-bad-lines          skip (and count) malformed trace lines instead of failing
  --hash-block-size N       Mooncake tokens per hash id (default 512)
  --seed N                  prompt tokens and synthetic draws (default 1)

Requests:
  --target http://HOST:PORT  the server (required unless --dry-run)
  --api completions|chat    /v1/completions (default) or /v1/chat/completions
  --prompt-mode tokens|text token-id prompts (default; completions only) or text
  --model NAME              (default omni-sim)
  --no-stream               non-streamed requests
  --token-min N --vocab N   token ids in [N, vocab) (default 1000, 129280)
  --timeout S               per-request timeout (default 600)
  --peer-header-prefill NAME  --peer-header-decode NAME
                            response headers naming the chosen instances
                            (default X-Omni-Prefill-Peer, X-Omni-Decode-Peer)

Arrivals:
  --speedup F               request i is due at trace_time_i / F (default 1)
  --max-concurrency N       requests in flight at most (default 1024)
  --max-lateness MS         drop requests that would start more than MS late (default: never)
  --late-threshold MS       a start this far behind schedule counts as late (default 5)

Report:
  --time-scale F            the engines run F x real time: latencies / F (default 1)
  --slo-ttft-ms X --slo-tpot-ms Y   goodput SLOs, model time
  --summary PATH            also write the summary JSON there (always printed to stdout)
  --csv PATH                one row per request
  --label TEXT              copied into the summary
  --request-id-prefix P     X-Request-Id is P and the request's index (default bench-); two
                            replays against one cluster need different ones
  --oracle-capacity-blocks N  hit rate of an ideal shared LRU cache of N blocks
  --oracle-block-size N     its block size in tokens (default 64)
  --dry-run                 print workload statistics (and the oracle) without sending
  --help
)";

namespace {

template <typename T>
T number(const std::string& flag, const std::string& v, T lo, T hi) {
  return parse_in_range<T, UsageError>(flag, v, lo, hi);
}

// "http://HOST:PORT" with an optional trailing "/"; HOST may be [v6].
void parse_target(Options& o) {
  const std::string prefix = "http://";
  std::string rest = o.target;
  if (rest.rfind(prefix, 0) != 0) {
    throw UsageError("--target: expected http://HOST:PORT, got \"" + o.target + "\"");
  }
  rest = rest.substr(prefix.size());
  if (!rest.empty() && rest.back() == '/') rest.pop_back();
  const auto colon = rest.rfind(':');
  if (colon == std::string::npos || colon == 0 || rest.find('/') != std::string::npos) {
    throw UsageError("--target: expected http://HOST:PORT, got \"" + o.target + "\"");
  }
  o.target_host = rest.substr(0, colon);
  o.target_port = number<std::uint16_t>("--target port", rest.substr(colon + 1), 1, 65535);
  o.run.host = rest;
  if (o.target_host.size() > 2 && o.target_host.front() == '[' && o.target_host.back() == ']') {
    o.target_host = o.target_host.substr(1, o.target_host.size() - 2);
  }
}

}  // namespace

Options parse_options(int argc, const char* const* argv) {
  Options o;
  std::optional<std::string> prompt_mode;
  constexpr double kBig = 1e12;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(flag + ": missing value");
      return argv[++i];
    };
    if (flag == "--help" || flag == "-h")
      o.help = true;
    else if (flag == "--trace")
      o.trace = value();
    else if (flag == "--synthetic")
      o.synthetic = value();
    else if (flag == "--limit") {
      o.slice.limit =
          number<std::uint64_t>(flag, value(), 1, std::numeric_limits<std::uint64_t>::max());
    } else if (flag == "--start")
      o.slice.start_s = number<double>(flag, value(), 0, kBig);
    else if (flag == "--window")
      o.slice.window_s = number<double>(flag, value(), 1e-9, kBig);
    else if (flag == "--skip-bad-lines")
      o.slice.skip_bad_lines = true;
    else if (flag == "--hash-block-size") {
      o.slice.hash_block_tokens = number<std::uint32_t>(flag, value(), 1, 1u << 20);
    } else if (flag == "--seed") {
      o.prompt.seed =
          number<std::uint64_t>(flag, value(), 0, std::numeric_limits<std::uint64_t>::max());
    } else if (flag == "--target")
      o.target = value();
    else if (flag == "--api") {
      const std::string v = value();
      if (v != "completions" && v != "chat") {
        throw UsageError("--api: expected completions or chat, got \"" + v + "\"");
      }
      o.run.api = v == "chat" ? Api::kChat : Api::kCompletions;
    } else if (flag == "--prompt-mode") {
      prompt_mode = value();
      if (*prompt_mode != "tokens" && *prompt_mode != "text") {
        throw UsageError("--prompt-mode: expected tokens or text, got \"" + *prompt_mode + "\"");
      }
    } else if (flag == "--model")
      o.run.model = value();
    else if (flag == "--no-stream")
      o.run.stream = false;
    else if (flag == "--token-min") {
      o.prompt.token_min =
          number<std::uint32_t>(flag, value(), 0, std::numeric_limits<std::uint32_t>::max() - 1);
    } else if (flag == "--vocab") {
      o.prompt.vocab =
          number<std::uint32_t>(flag, value(), 1, std::numeric_limits<std::uint32_t>::max());
    } else if (flag == "--timeout") {
      o.run.timeout = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
          std::chrono::duration<double>(number<double>(flag, value(), 1e-3, 1e7)));
    } else if (flag == "--peer-header-prefill")
      o.run.prefill_header = value();
    else if (flag == "--peer-header-decode")
      o.run.decode_header = value();
    else if (flag == "--speedup")
      o.run.speedup = number<double>(flag, value(), 1e-6, 1e9);
    else if (flag == "--max-concurrency") {
      o.run.max_concurrency = number<std::size_t>(flag, value(), 1, 1'000'000);
    } else if (flag == "--max-lateness")
      o.run.max_lateness_ms = number<double>(flag, value(), 0, kBig);
    else if (flag == "--late-threshold")
      o.run.late_threshold_ms = number<double>(flag, value(), 0, kBig);
    else if (flag == "--time-scale")
      o.time_scale = number<double>(flag, value(), 1e-6, 1e6);
    else if (flag == "--slo-ttft-ms")
      o.slo_ttft_ms = number<double>(flag, value(), 0, kBig);
    else if (flag == "--slo-tpot-ms")
      o.slo_tpot_ms = number<double>(flag, value(), 0, kBig);
    else if (flag == "--summary")
      o.summary_path = value();
    else if (flag == "--csv")
      o.csv_path = value();
    else if (flag == "--label")
      o.label = value();
    else if (flag == "--request-id-prefix") {
      o.run.request_id_prefix = value();
      if (o.run.request_id_prefix.empty() || o.run.request_id_prefix.size() > 64 ||
          o.run.request_id_prefix.find_first_of(" \t\r\n") != std::string::npos) {
        throw UsageError("--request-id-prefix: 1 to 64 characters, no spaces");
      }
    }
    else if (flag == "--oracle-capacity-blocks") {
      o.oracle_capacity_blocks = number<std::uint64_t>(flag, value(), 1, std::uint64_t{1} << 40);
    } else if (flag == "--oracle-block-size") {
      o.oracle_block_size = number<std::uint32_t>(flag, value(), 1, 1u << 20);
    } else if (flag == "--dry-run")
      o.dry_run = true;
    else
      throw UsageError("unknown flag " + flag);
  }
  if (o.help) return o;
  if (o.trace.empty() == o.synthetic.empty()) {
    throw UsageError("--trace or --synthetic: exactly one workload is required");
  }
  if (!o.dry_run) {
    if (o.target.empty()) throw UsageError("--target: required (or --dry-run)");
  }
  if (!o.target.empty()) parse_target(o);
  if (o.prompt.token_min >= o.prompt.vocab) {
    throw UsageError("--token-min: must be below --vocab (" + std::to_string(o.prompt.vocab) + ")");
  }
  if (o.run.api == Api::kChat && prompt_mode == "tokens") {
    throw UsageError("--prompt-mode: chat messages are text; --api chat needs --prompt-mode text");
  }
  o.run.prompt_mode =
      o.run.api == Api::kChat || prompt_mode == "text" ? PromptMode::kText : PromptMode::kTokens;
  return o;
}

}  // namespace omni::replay
