#include "workload.hpp"

#include "parse.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <limits>

namespace omni::replay {

namespace {

// Keeps the requests of a slice, offered in arrival order, and re-bases them.
class Slicer {
 public:
  explicit Slicer(const TraceOptions& slice) : slice_(slice) {}

  // Returns false once nothing later can be kept (past the window, or the limit reached), so
  // reading can stop early.
  bool offer(Request r) {
    if (r.arrival_s < slice_.start_s) return true;
    if (slice_.window_s && r.arrival_s >= slice_.start_s + *slice_.window_s) return false;
    kept_.push_back(std::move(r));
    return !(slice_.limit && kept_.size() >= *slice_.limit);
  }

  std::vector<Request> finish() {
    if (!kept_.empty()) {
      const double first = kept_.front().arrival_s;
      for (auto& r : kept_) r.arrival_s -= first;
    }
    return std::move(kept_);
  }

 private:
  TraceOptions slice_;
  std::vector<Request> kept_;
};

// Reads a trace line by line into a Slicer. Both formats go through it so that ordering
// checks, bad-line handling and the early stop are the same.
class SliceReader {
 public:
  SliceReader(const std::string& name, const TraceOptions& slice)
      : name_(name), skip_bad_lines_(slice.skip_bad_lines), slicer_(slice) {}

  [[noreturn]] void fail(std::uint64_t line, const std::string& why) const {
    throw TraceError(name_ + ":" + std::to_string(line) + ": " + why);
  }

  // A line that did not parse: an error, or skipped and counted with --skip-bad-lines.
  void bad_line(std::uint64_t line, const std::string& why) {
    if (!skip_bad_lines_) fail(line, why);
    ++skipped_;
  }

  // Offers a parsed request whose arrival_s is its trace time; false: stop reading.
  bool offer(std::uint64_t line, Request r) {
    if (last_time_ && r.arrival_s < *last_time_) {
      fail(line, "timestamp goes backwards (traces must be in arrival order)");
    }
    last_time_ = r.arrival_s;
    return slicer_.offer(std::move(r));
  }

  Workload finish(std::string source) {
    Workload w;
    w.source = std::move(source);
    w.path = name_;
    w.skipped_lines = skipped_;
    w.requests = slicer_.finish();
    return w;
  }

 private:
  std::string name_;
  bool skip_bad_lines_;
  Slicer slicer_;
  std::optional<double> last_time_;
  std::uint64_t skipped_ = 0;
};

bool blank(const std::string& s) {
  return std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isspace(c) != 0; });
}

// A JSON field that must be an integer in [lo, hi].
std::uint64_t integer_field(const nlohmann::json& j, const char* key, std::uint64_t lo,
                            std::uint64_t hi) {
  auto it = j.find(key);
  if (it == j.end()) throw std::invalid_argument(std::string("missing \"") + key + "\"");
  if (!it->is_number_integer() || it->get<std::int64_t>() < 0 || it->get<std::uint64_t>() < lo ||
      it->get<std::uint64_t>() > hi) {
    throw std::invalid_argument(std::string("\"") + key + "\" must be an integer in " +
                                std::to_string(lo) + ".." + std::to_string(hi));
  }
  return it->get<std::uint64_t>();
}

constexpr std::uint64_t kMaxTokens = std::numeric_limits<std::uint32_t>::max();

Request mooncake_request(const nlohmann::json& j, std::uint32_t block_tokens) {
  if (!j.is_object()) throw std::invalid_argument("not a JSON object");
  auto ts = j.find("timestamp");
  if (ts == j.end()) throw std::invalid_argument("missing \"timestamp\"");
  if (!ts->is_number() || !std::isfinite(ts->get<double>()) || ts->get<double>() < 0) {
    throw std::invalid_argument("\"timestamp\" must be a non-negative number (ms)");
  }
  Request r;
  r.arrival_s = ts->get<double>() / 1000.0;
  r.input_tokens = static_cast<std::uint32_t>(integer_field(j, "input_length", 1, kMaxTokens));
  r.output_tokens = static_cast<std::uint32_t>(integer_field(j, "output_length", 1, kMaxTokens));
  auto ids = j.find("hash_ids");
  if (ids == j.end()) throw std::invalid_argument("missing \"hash_ids\"");
  if (!ids->is_array()) throw std::invalid_argument("\"hash_ids\" must be an array");
  const std::uint64_t want = (r.input_tokens + std::uint64_t{block_tokens} - 1) / block_tokens;
  if (ids->size() != want) {
    throw std::invalid_argument("\"hash_ids\" has " + std::to_string(ids->size()) +
                                " ids, input_length " + std::to_string(r.input_tokens) + " needs " +
                                std::to_string(want) + " blocks of " +
                                std::to_string(block_tokens));
  }
  r.segments.reserve(ids->size());
  for (const auto& id : *ids) {
    if (!id.is_number_integer() || id.get<std::int64_t>() < 0) {
      throw std::invalid_argument("\"hash_ids\" must hold non-negative integers");
    }
    r.segments.push_back({id.get<std::uint64_t>(), block_tokens});
  }
  return r;
}

template <typename T>
bool parse_int(std::string_view s, T& out) {
  const auto v = parse_number<T>(s);
  if (v) out = *v;
  return v.has_value();
}

// "2023-11-16 18:17:03.9799600" -> seconds since 1970-01-01 (UTC; only differences matter).
double azure_time(std::string_view s) {
  int y = 0, mo = 0, d = 0, h = 0, mi = 0, sec = 0;
  if (s.size() < 19 || s[4] != '-' || s[7] != '-' || (s[10] != ' ' && s[10] != 'T') ||
      s[13] != ':' || s[16] != ':' || !parse_int(s.substr(0, 4), y) ||
      !parse_int(s.substr(5, 2), mo) || !parse_int(s.substr(8, 2), d) ||
      !parse_int(s.substr(11, 2), h) || !parse_int(s.substr(14, 2), mi) ||
      !parse_int(s.substr(17, 2), sec) || mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 ||
      mi > 59 || sec > 60) {
    throw std::invalid_argument("bad TIMESTAMP \"" + std::string(s) +
                                "\" (expected YYYY-MM-DD HH:MM:SS[.fraction])");
  }
  double frac = 0;
  if (s.size() > 19) {
    std::string_view f = s.substr(20);
    if (s[19] != '.' || f.empty() ||
        !std::all_of(f.begin(), f.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      throw std::invalid_argument("bad TIMESTAMP fraction in \"" + std::string(s) + "\"");
    }
    double scale = 0.1;
    for (char c : f) {
      frac += (c - '0') * scale;
      scale /= 10;
    }
  }
  // Days from the civil date (Howard Hinnant's algorithm).
  y -= mo <= 2;
  const int era = (y >= 0 ? y : y - 399) / 400;
  const unsigned yoe = static_cast<unsigned>(y - era * 400);
  const unsigned doy =
      (153u * static_cast<unsigned>(mo + (mo > 2 ? -3 : 9)) + 2) / 5 + static_cast<unsigned>(d) - 1;
  const unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
  const double days = era * 146097.0 + doe - 719468.0;
  return days * 86400.0 + h * 3600.0 + mi * 60.0 + sec + frac;
}

std::string trim(std::string s) {
  while (!s.empty() && (s.back() == '\r' || s.back() == ' ')) s.pop_back();
  std::size_t b = 0;
  while (b < s.size() && s[b] == ' ') ++b;
  return s.substr(b);
}

}  // namespace

Workload read_mooncake(std::istream& in, const std::string& name, const TraceOptions& slice) {
  SliceReader reader(name, slice);
  std::string line;
  std::uint64_t n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (blank(line)) continue;
    Request r;
    try {
      r = mooncake_request(nlohmann::json::parse(line), slice.hash_block_tokens);
    } catch (const nlohmann::json::parse_error& e) {
      reader.bad_line(n, std::string("not JSON: ") + e.what());
      continue;
    } catch (const std::invalid_argument& e) {
      reader.bad_line(n, e.what());
      continue;
    }
    if (!reader.offer(n, std::move(r))) break;
  }
  if (in.bad()) throw TraceError(name + ": read error");
  return reader.finish("mooncake");
}

Workload read_azure(std::istream& in, const std::string& name, const TraceOptions& slice) {
  SliceReader reader(name, slice);
  std::string line;
  std::uint64_t n = 0;
  std::optional<double> first_time;
  // Prompts share nothing: each request's prompt is one segment of its own.
  std::uint64_t next_id = 0;
  while (std::getline(in, line)) {
    ++n;
    line = trim(std::move(line));
    if (n == 1) {
      if (line.rfind("TIMESTAMP,ContextTokens,GeneratedTokens", 0) != 0) {
        reader.fail(n, "expected the header TIMESTAMP,ContextTokens,GeneratedTokens");
      }
      continue;
    }
    if (line.empty()) continue;
    double time_s = 0;
    Request r;
    try {
      const auto c1 = line.find(',');
      const auto c2 = c1 == std::string::npos ? c1 : line.find(',', c1 + 1);
      if (c2 == std::string::npos || line.find(',', c2 + 1) != std::string::npos) {
        throw std::invalid_argument("expected 3 comma-separated fields");
      }
      time_s = azure_time(std::string_view(line).substr(0, c1));
      std::uint64_t context = 0, generated = 0;
      if (!parse_int(std::string_view(line).substr(c1 + 1, c2 - c1 - 1), context) || context < 1 ||
          context > kMaxTokens) {
        throw std::invalid_argument("ContextTokens must be an integer >= 1");
      }
      if (!parse_int(std::string_view(line).substr(c2 + 1), generated) || generated < 1 ||
          generated > kMaxTokens) {
        throw std::invalid_argument("GeneratedTokens must be an integer >= 1");
      }
      r.input_tokens = static_cast<std::uint32_t>(context);
      r.output_tokens = static_cast<std::uint32_t>(generated);
    } catch (const std::invalid_argument& e) {
      reader.bad_line(n, e.what());
      continue;
    }
    // Timestamps are relative to the first row (the slice's start counts from it).
    if (!first_time) first_time = time_s;
    r.arrival_s = time_s - *first_time;
    r.segments.push_back({next_id++, r.input_tokens});
    if (!reader.offer(n, std::move(r))) break;
  }
  if (n == 0) throw TraceError(name + ": empty file (no header)");
  if (in.bad()) throw TraceError(name + ": read error");
  return reader.finish("azure");
}

Workload load_trace(const std::string& spec, const TraceOptions& slice) {
  const auto colon = spec.find(':');
  const std::string kind = colon == std::string::npos ? "" : spec.substr(0, colon);
  if (kind != "mooncake" && kind != "azure") {
    throw std::invalid_argument("--trace: expected mooncake:PATH or azure:PATH, got \"" + spec +
                                "\"");
  }
  const std::string path = spec.substr(colon + 1);
  std::ifstream in(path);
  if (!in) throw TraceError(path + ": cannot open for reading");
  return kind == "mooncake" ? read_mooncake(in, path, slice) : read_azure(in, path, slice);
}

void apply_slice(std::vector<Request>& requests, const TraceOptions& slice) {
  Slicer slicer(slice);
  for (auto& r : requests) {
    if (!slicer.offer(std::move(r))) break;
  }
  requests = slicer.finish();
}

}  // namespace omni::replay
