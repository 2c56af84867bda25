#include <omni/prometheus.hpp>

#include <charconv>
#include <cmath>
#include <stdexcept>
#include <system_error>

namespace omni::prom {
namespace {

// Values that are integral and below 2^53 in magnitude are exact in a double and print as
// plain integers ("3", not "3.0" or "3e+00"); everything else prints in the shortest form
// that parses back to the same double. std::to_chars/from_chars are locale-independent.
void append_value(std::string& out, double v) {
  if (std::isnan(v)) {
    out += "NaN";
    return;
  }
  if (std::isinf(v)) {
    out += v > 0 ? "+Inf" : "-Inf";
    return;
  }
  char buf[64];
  std::to_chars_result res;
  constexpr double kExactIntLimit = 9007199254740992.0;  // 2^53
  if (std::fabs(v) < kExactIntLimit && v == std::trunc(v)) {
    res = std::to_chars(buf, buf + sizeof(buf), static_cast<std::int64_t>(v));
  } else {
    res = std::to_chars(buf, buf + sizeof(buf), v);
  }
  out.append(buf, res.ptr);
}

// Label values escape backslash, double quote and newline.
void append_label_value(std::string& out, std::string_view v) {
  for (char c : v) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '"': out += "\\\""; break;
      case '\n': out += "\\n"; break;
      default: out += c;
    }
  }
}

// HELP text escapes backslash and newline only.
void append_help(std::string& out, std::string_view v) {
  for (char c : v) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      default: out += c;
    }
  }
}

void append_labels(std::string& out, const Labels& labels,
                   const std::pair<std::string_view, std::string_view>* extra = nullptr) {
  if (labels.empty() && extra == nullptr) return;
  out += '{';
  bool first = true;
  auto one = [&](std::string_view k, std::string_view v) {
    if (!first) out += ',';
    first = false;
    out += k;
    out += "=\"";
    append_label_value(out, v);
    out += '"';
  };
  for (const auto& [k, v] : labels) one(k, v);
  if (extra != nullptr) one(extra->first, extra->second);
  out += '}';
}

// ------------------------------------------------------------------------------------------
// Parsing: one sample line is
//   name ['{' [label '=' '"' escaped '"' {',' ...} [',']] '}'] value [timestamp]
// with blanks (spaces, tabs) allowed between tokens, as Prometheus' own text parser does.
// ------------------------------------------------------------------------------------------

bool is_blank(char c) { return c == ' ' || c == '\t'; }
bool is_name_start(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
}
bool is_name_char(char c) { return is_name_start(c) || (c >= '0' && c <= '9'); }

class LineParser {
 public:
  explicit LineParser(std::string_view line) : s_(line) {}

  bool parse(Sample& out) {
    if (!name(out.name, /*allow_colon=*/true)) return false;
    skip_blanks();
    if (peek('{')) {
      ++pos_;
      if (!labels(out.labels)) return false;
    }
    // After '}' the separating blank is optional, as in Prometheus' parser.
    skip_blanks();
    std::string_view value_token = token();
    if (value_token.empty() || !parse_double(value_token, out.value)) return false;
    skip_blanks();
    if (pos_ < s_.size() && s_[pos_] != '#') {
      std::string_view ts = token();
      if (!is_timestamp(ts)) return false;
      skip_blanks();
    }
    // An OpenMetrics exemplar (" # {...} v") may trail; nothing else may.
    return pos_ == s_.size() || s_[pos_] == '#';
  }

 private:
  bool peek(char c) const { return pos_ < s_.size() && s_[pos_] == c; }
  void skip_blanks() {
    while (pos_ < s_.size() && is_blank(s_[pos_])) ++pos_;
  }

  bool name(std::string& out, bool allow_colon) {
    const std::size_t start = pos_;
    if (pos_ >= s_.size() || !is_name_start(s_[pos_]) || (!allow_colon && s_[pos_] == ':')) {
      return false;
    }
    ++pos_;
    while (pos_ < s_.size() && is_name_char(s_[pos_]) && (allow_colon || s_[pos_] != ':')) {
      ++pos_;
    }
    out.assign(s_.substr(start, pos_ - start));
    return true;
  }

  bool labels(std::map<std::string, std::string>& out) {
    for (;;) {
      skip_blanks();
      if (peek('}')) {
        ++pos_;
        return true;
      }
      std::string key;
      if (!name(key, /*allow_colon=*/false)) return false;
      skip_blanks();
      if (!peek('=')) return false;
      ++pos_;
      skip_blanks();
      if (!peek('"')) return false;
      ++pos_;
      std::string value;
      if (!quoted(value)) return false;
      if (!out.emplace(std::move(key), std::move(value)).second) return false;  // duplicate
      skip_blanks();
      if (peek(',')) {
        ++pos_;
      } else if (!peek('}')) {
        return false;
      }
    }
  }

  // After the opening quote; consumes the closing one.
  bool quoted(std::string& out) {
    while (pos_ < s_.size()) {
      const char c = s_[pos_++];
      if (c == '"') return true;
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= s_.size()) return false;
      switch (s_[pos_++]) {
        case '\\': out += '\\'; break;
        case '"': out += '"'; break;
        case 'n': out += '\n'; break;
        default: return false;
      }
    }
    return false;
  }

  std::string_view token() {
    const std::size_t start = pos_;
    while (pos_ < s_.size() && !is_blank(s_[pos_])) ++pos_;
    return s_.substr(start, pos_ - start);
  }

  // Go's strconv.ParseFloat forms that matter here: decimal and exponent forms, an optional
  // sign, and NaN/Inf/Infinity in any case.
  static bool parse_double(std::string_view t, double& out) {
    bool negative = false;
    if (!t.empty() && (t[0] == '+' || t[0] == '-')) {
      negative = t[0] == '-';
      t.remove_prefix(1);
    }
    if (t.empty() || t[0] == '+' || t[0] == '-') return false;
    double v = 0.0;
    const auto [ptr, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
    if (ec != std::errc() || ptr != t.data() + t.size()) return false;
    out = negative ? -v : v;
    return true;
  }

  static bool is_timestamp(std::string_view t) {
    if (!t.empty() && t[0] == '-') t.remove_prefix(1);
    if (t.empty()) return false;
    for (char c : t) {
      if (c < '0' || c > '9') return false;
    }
    return true;
  }

  std::string_view s_;
  std::size_t pos_ = 0;
};

}  // namespace

void TextWriter::family(std::string_view name, std::string_view type, std::string_view help) {
  out_ += "# HELP ";
  out_ += name;
  out_ += ' ';
  append_help(out_, help);
  out_ += "\n# TYPE ";
  out_ += name;
  out_ += ' ';
  out_ += type;
  out_ += '\n';
}

void TextWriter::sample(std::string_view name, const Labels& labels, double value) {
  out_ += name;
  append_labels(out_, labels);
  out_ += ' ';
  append_value(out_, value);
  out_ += '\n';
}

// Writes only the sample lines; the caller starts the family with family(name, "histogram",
// help). Bucket lines carry cumulative counts, as the exposition format requires.
void TextWriter::histogram(std::string_view name, const Labels& labels,
                           const std::vector<double>& upper_bounds,
                           const std::vector<std::uint64_t>& bucket_counts,
                           std::uint64_t overflow, double sum) {
  if (upper_bounds.size() != bucket_counts.size()) {
    throw std::invalid_argument("histogram: one count per upper bound required");
  }
  const std::string base(name);
  const std::string bucket_name = base + "_bucket";
  std::uint64_t cumulative = 0;
  std::string le;
  for (std::size_t i = 0; i < upper_bounds.size(); ++i) {
    cumulative += bucket_counts[i];
    le.clear();
    append_value(le, upper_bounds[i]);
    const std::pair<std::string_view, std::string_view> le_label{"le", le};
    out_ += bucket_name;
    append_labels(out_, labels, &le_label);
    out_ += ' ';
    append_value(out_, static_cast<double>(cumulative));
    out_ += '\n';
  }
  cumulative += overflow;
  const std::pair<std::string_view, std::string_view> inf_label{"le", "+Inf"};
  out_ += bucket_name;
  append_labels(out_, labels, &inf_label);
  out_ += ' ';
  append_value(out_, static_cast<double>(cumulative));
  out_ += '\n';
  sample(base + "_sum", labels, sum);
  sample(base + "_count", labels, static_cast<double>(cumulative));
}

std::vector<Sample> parse_text(std::string_view text, std::size_t* malformed) {
  std::vector<Sample> samples;
  std::size_t bad = 0;
  while (!text.empty()) {
    const std::size_t eol = text.find('\n');
    std::string_view line = text.substr(0, eol);
    text.remove_prefix(eol == std::string_view::npos ? text.size() : eol + 1);

    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    while (!line.empty() && is_blank(line.front())) line.remove_prefix(1);
    while (!line.empty() && is_blank(line.back())) line.remove_suffix(1);
    if (line.empty() || line.front() == '#') continue;

    Sample sample;
    if (LineParser(line).parse(sample)) {
      samples.push_back(std::move(sample));
    } else {
      ++bad;
    }
  }
  if (malformed != nullptr) *malformed = bad;
  return samples;
}

std::optional<double> find_value(const std::vector<Sample>& samples, std::string_view name,
                                 const std::map<std::string, std::string>& match) {
  for (const Sample& s : samples) {
    if (s.name != name) continue;
    bool all = true;
    for (const auto& [k, v] : match) {
      auto it = s.labels.find(k);
      if (it == s.labels.end() || it->second != v) {
        all = false;
        break;
      }
    }
    if (all) return s.value;
  }
  return std::nullopt;
}

}  // namespace omni::prom
