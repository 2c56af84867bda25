#include "summary.hpp"

#include <algorithm>
#include <cstdio>
#include <map>
#include <set>
#include <unordered_set>

namespace omni::replay {

namespace {

using ojson = nlohmann::ordered_json;

ojson optional_number(std::optional<double> v) {
  return v ? ojson(*v) : ojson(nullptr);
}

ojson ratio(double num, double den) {
  return den > 0 ? ojson(num / den) : ojson(nullptr);
}

// Requests per instance named by one response header.
ojson peer_counts(const std::vector<RequestRecord>& records, std::string RequestRecord::*peer) {
  std::map<std::string, std::uint64_t> counts;
  std::uint64_t absent = 0;
  for (const auto& r : records) {
    if (r.status == 0) continue;  // no response, no header
    const std::string& name = r.*peer;
    name.empty() ? ++absent : ++counts[name];
  }
  ojson j;
  j["counts"] = ojson::object();
  std::uint64_t total = 0, most = 0;
  for (const auto& [name, n] : counts) {
    j["counts"][name] = n;
    total += n;
    most = std::max(most, n);
  }
  j["absent"] = absent;
  // Balance: the busiest instance's share against an even split (1.0: perfectly even).
  j["max_over_mean"] = counts.empty()
                           ? ojson(nullptr)
                           : ojson(static_cast<double>(most) * static_cast<double>(counts.size()) /
                                   static_cast<double>(total));
  return j;
}

ojson length_stats(const Workload& w, std::uint32_t Request::*field) {
  std::vector<double> v;
  v.reserve(w.requests.size());
  double sum = 0;
  for (const auto& r : w.requests) {
    v.push_back(r.*field);
    sum += r.*field;
  }
  ojson j = distribution(std::move(v));
  j["sum"] = sum;
  return j;
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\r\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

// Milliseconds to the microsecond, seconds to the microsecond.
std::string csv_number(double v, int decimals = 3) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}

}  // namespace

std::optional<double> tpot_ms(const RequestRecord& r) {
  if (!r.ok() || !r.streamed || r.completion_tokens < 2 || r.ttft_ms < 0) return std::nullopt;
  return (r.e2e_ms - r.ttft_ms) / static_cast<double>(r.completion_tokens - 1);
}

ojson trace_json(const Workload& w, const TraceOptions& slice) {
  ojson j;
  j["source"] = w.source;
  j[w.source == "synthetic" ? "spec" : "path"] = w.path;
  j["start_s"] = slice.start_s;
  j["window_s"] = optional_number(slice.window_s);
  j["limit"] = slice.limit ? ojson(*slice.limit) : ojson(nullptr);
  j["requests"] = w.requests.size();
  j["span_s"] = w.requests.empty() ? 0.0 : w.requests.back().arrival_s;
  j["skipped_lines"] = w.skipped_lines;
  return j;
}

ojson workload_json(const Workload& w) {
  ojson j;
  j["requests"] = w.requests.size();
  const double span = w.requests.empty() ? 0.0 : w.requests.back().arrival_s;
  j["span_s"] = span;
  j["rate_per_s"] = ratio(static_cast<double>(w.requests.size()), span);
  j["input_tokens"] = length_stats(w, &Request::input_tokens);
  j["output_tokens"] = length_stats(w, &Request::output_tokens);
  // Prompt tokens inside segments that an earlier request already sent: the hit rate of an
  // unbounded cache that keeps whole segments.
  std::unordered_set<std::uint64_t> seen;
  double repeated = 0, total = 0;
  for (const auto& r : w.requests) {
    std::uint64_t left = r.input_tokens;
    for (const auto& s : r.segments) {
      const std::uint64_t used = std::min<std::uint64_t>(left, s.length);
      if (!seen.insert(s.id).second) repeated += static_cast<double>(used);
      left -= used;
      if (left == 0) break;
    }
    total += r.input_tokens;
  }
  j["distinct_segments"] = seen.size();
  j["repeat_token_fraction"] = ratio(repeated, total);
  return j;
}

void add_oracle(ojson& out, const OracleResult& o) {
  out["oracle_hit_rate"] = o.hit_rate();
  out["oracle"] = {{"capacity_blocks", o.capacity_blocks},
                   {"block_size", o.block_size},
                   {"prompt_tokens", o.prompt_tokens},
                   {"hit_tokens", o.hit_tokens}};
}

ojson summarize(const SummaryInputs& in, const Workload& workload, const RunResult& run) {
  const auto& records = run.records;
  const double to_model = 1.0 / in.time_scale;  // wall ms -> model ms
  const double duration_s = run.wall_duration_s / in.time_scale;

  std::uint64_t sent = 0, ok = 0, dropped = 0, not_sent = 0, late = 0, waited = 0, good = 0;
  double input_tokens = 0, output_tokens = 0, prompt_tokens = 0, cached_tokens = 0;
  std::uint64_t with_usage = 0;
  std::map<std::string, std::uint64_t> errors;
  std::vector<double> lateness, ttft, tpot, e2e;
  ojson samples = ojson::array();
  std::set<std::string> sampled;
  for (const auto& r : records) {
    if (r.outcome == "dropped") ++dropped;
    if (r.outcome == "not_sent") ++not_sent;
    if (!r.sent()) continue;
    ++sent;
    lateness.push_back(r.lateness_ms);
    late += r.late;
    waited += r.waited;
    if (!r.ok()) {
      ++errors[r.outcome];
      if (samples.size() < 5 && sampled.insert(r.error).second) {
        samples.push_back(
            {{"index", r.index}, {"kind", r.outcome}, {"status", r.status}, {"error", r.error}});
      }
      continue;
    }
    ++ok;
    ttft.push_back(r.ttft_ms);
    e2e.push_back(r.e2e_ms);
    const auto t = tpot_ms(r);
    if (t) tpot.push_back(*t);
    input_tokens += r.prompt_tokens >= 0 ? static_cast<double>(r.prompt_tokens) : r.input_tokens;
    output_tokens += static_cast<double>(std::max<std::int64_t>(r.completion_tokens, 0));
    if (r.prompt_tokens >= 0 && r.cached_tokens >= 0) {
      ++with_usage;
      prompt_tokens += static_cast<double>(r.prompt_tokens);
      cached_tokens += static_cast<double>(r.cached_tokens);
    }
    // Goodput: a request meets an SLO it is not measured for (TPOT of a one-token answer).
    const bool ttft_met = !in.slo_ttft_ms || r.ttft_ms * to_model <= *in.slo_ttft_ms;
    const bool tpot_met = !in.slo_tpot_ms || !t || *t * to_model <= *in.slo_tpot_ms;
    good += ttft_met && tpot_met;
  }

  ojson j;
  j["label"] = in.label;
  j["target"] = in.target;
  j["model"] = in.config.model;
  j["api"] = in.config.api == Api::kChat ? "chat" : "completions";
  j["prompt_mode"] = in.config.prompt_mode == PromptMode::kText ? "text" : "tokens";
  j["stream"] = in.config.stream;
  j["trace"] = trace_json(workload, in.slice);
  j["time_scale"] = in.time_scale;
  j["speedup"] = in.config.speedup;
  j["interrupted"] = run.interrupted;

  ojson req;
  req["scheduled"] = records.size();
  req["sent"] = sent;
  req["ok"] = ok;
  req["errors"] = sent - ok;
  req["errors_by_kind"] = ojson::object();
  for (const auto& [kind, n] : errors) req["errors_by_kind"][kind] = n;
  req["dropped"] = dropped;
  req["not_sent"] = not_sent;
  req["late"] = late;
  req["waited_for_slot"] = waited;
  req["lateness_ms"] = distribution(lateness);
  req["late_threshold_ms"] = in.config.late_threshold_ms;
  req["max_lateness_ms"] = optional_number(in.config.max_lateness_ms);
  req["max_concurrency"] = in.config.max_concurrency;
  req["connections_opened"] = run.connections_opened;
  j["requests"] = req;

  j["duration_s"] = duration_s;
  j["wall_duration_s"] = run.wall_duration_s;
  j["throughput"] = {{"requests_per_s", ratio(static_cast<double>(ok), duration_s)},
                     {"input_tokens_per_s", ratio(input_tokens, duration_s)},
                     {"output_tokens_per_s", ratio(output_tokens, duration_s)}};
  j["goodput"] = {
      {"slo_ttft_ms", optional_number(in.slo_ttft_ms)},
      {"slo_tpot_ms", optional_number(in.slo_tpot_ms)},
      {"requests", good},
      {"requests_per_s", ratio(static_cast<double>(good), duration_s)},
      {"fraction", ratio(static_cast<double>(good), static_cast<double>(records.size()))}};
  j["latency_ms"] = {{"ttft", distribution(ttft, to_model)},
                     {"tpot", distribution(tpot, to_model)},
                     {"itl", run.itl.summary(to_model)},
                     {"e2e", distribution(e2e, to_model)}};
  j["prefix_cache"] = {{"requests_with_usage", with_usage},
                       {"prompt_tokens", prompt_tokens},
                       {"cached_tokens", cached_tokens},
                       {"hit_rate", ratio(cached_tokens, prompt_tokens)}};
  if (in.oracle) add_oracle(j, *in.oracle);
  j["peers"] = {{"prefill", peer_counts(records, &RequestRecord::prefill_peer)},
                {"decode", peer_counts(records, &RequestRecord::decode_peer)}};
  j["error_samples"] = samples;
  return j;
}

void write_csv(std::ostream& out, const RunResult& run, double time_scale) {
  out << "index,trace_s,scheduled_s,start_s,lateness_ms,late,waited,outcome,status,ttft_ms,"
         "tpot_ms,e2e_ms,itl_count,itl_mean_ms,itl_max_ms,input_tokens,output_tokens,"
         "prompt_tokens,cached_tokens,completion_tokens,token_events,prefill_peer,decode_peer,"
         "error\n";
  auto model = [&](double wall_ms) {
    return wall_ms < 0 ? std::string() : csv_number(wall_ms / time_scale);
  };
  auto count = [](std::int64_t v) { return v < 0 ? std::string() : std::to_string(v); };
  for (const auto& r : run.records) {
    const auto t = tpot_ms(r);
    out << r.index << ',' << csv_number(r.trace_s, 6) << ',' << csv_number(r.scheduled_s, 6) << ','
        << (r.start_s < 0 ? std::string() : csv_number(r.start_s, 6)) << ','
        << (r.start_s < 0 ? std::string() : csv_number(r.lateness_ms)) << ',' << r.late << ','
        << r.waited << ',' << r.outcome << ',' << r.status << ',' << model(r.ttft_ms) << ','
        << (t ? model(*t) : std::string()) << ',' << model(r.e2e_ms) << ',' << r.itl_count << ','
        << (r.itl_count ? model(r.itl_sum_ms / static_cast<double>(r.itl_count)) : std::string())
        << ',' << (r.itl_count ? model(r.itl_max_ms) : std::string()) << ',' << r.input_tokens
        << ',' << r.output_tokens << ',' << count(r.prompt_tokens) << ',' << count(r.cached_tokens)
        << ',' << count(r.completion_tokens) << ',' << r.token_events << ','
        << csv_field(r.prefill_peer) << ',' << csv_field(r.decode_peer) << ',' << csv_field(r.error)
        << '\n';
  }
}

}  // namespace omni::replay
