// Jinja renderer for chat templates; semantics of @huggingface/jinja 0.5.11 (see jinja.hpp).
//
// Layout: text utilities (UTF-8 seen as the reference's JavaScript strings, numbers formatted
// as JavaScript does) - preprocessing and lexer - parser (AST) - parse-time validation -
// runtime values - interpreter - public API.
//
// Thread safety: a parsed Template is immutable. Everything render() creates lives in its own
// Renderer; runtime values use a non-atomic reference count because they never leave the
// render call that made them. Strings of the context and of the template are referenced, not
// copied.
#include "omni/jinja.hpp"

#include "unicode_tables.hpp"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <limits>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace omni::jinja {

namespace detail {
// src/jinja_unicode.cpp
int js_to_upper(char32_t cp, char32_t out[3]);
int js_to_lower(char32_t cp, char32_t out[3]);
bool js_is_cased(char32_t cp);
bool js_is_case_ignorable(char32_t cp);
}  // namespace detail

namespace {

// =============================================================================================
// Text utilities
// =============================================================================================

// Decodes one code point at s[i] (s.size() > i). Lone surrogates encoded as 3 bytes (WTF-8)
// decode to the surrogate; an invalid byte decodes to itself (as if Latin-1), length 1.
inline std::size_t decode_utf8(std::string_view s, std::size_t i, char32_t& cp) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    cp = b0;
    return 1;
  }
  auto cont = [&](std::size_t k) {
    return i + k < s.size() && (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80;
  };
  auto cb = [&](std::size_t k) { return static_cast<unsigned char>(s[i + k]) & 0x3Fu; };
  if (b0 >= 0xC2 && b0 < 0xE0 && cont(1)) {
    cp = (char32_t(b0 & 0x1F) << 6) | cb(1);
    return 2;
  }
  if (b0 >= 0xE0 && b0 < 0xF0 && cont(1) && cont(2)) {
    cp = (char32_t(b0 & 0x0F) << 12) | (cb(1) << 6) | cb(2);
    if (cp >= 0x800) return 3;
  } else if (b0 >= 0xF0 && b0 < 0xF5 && cont(1) && cont(2) && cont(3)) {
    cp = (char32_t(b0 & 0x07) << 18) | (cb(1) << 12) | (cb(2) << 6) | cb(3);
    if (cp >= 0x10000 && cp <= 0x10FFFF) return 4;
  }
  cp = b0;
  return 1;
}

using unicode::append_utf8;

// JavaScript's WhiteSpace + LineTerminator (the set of /\s/ and String.prototype.trim).
inline bool is_js_space(char32_t c) {
  if (c < 0x80) return c == ' ' || (c >= 0x09 && c <= 0x0D);
  return c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
         c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000 || c == 0xFEFF;
}

// Length in bytes of the JS whitespace code point at s[i], or 0.
inline std::size_t space_at(std::string_view s, std::size_t i) {
  if (i >= s.size()) return 0;
  const auto b = static_cast<unsigned char>(s[i]);
  if (b < 0x80) return (b == ' ' || (b >= 0x09 && b <= 0x0D)) ? 1 : 0;
  char32_t cp;
  std::size_t n = decode_utf8(s, i, cp);
  return is_js_space(cp) ? n : 0;
}

inline bool is_ascii_word(unsigned char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

std::string_view js_trim_start(std::string_view s) {
  std::size_t i = 0;
  while (std::size_t n = space_at(s, i)) i += n;
  return s.substr(i);
}

std::string_view js_trim_end(std::string_view s) {
  std::size_t end = s.size();
  while (end > 0) {
    const auto b = static_cast<unsigned char>(s[end - 1]);
    if (b < 0x80) {
      if (b == ' ' || (b >= 0x09 && b <= 0x0D)) {
        --end;
        continue;
      }
      break;
    }
    // Step back to the start of this code point.
    std::size_t start = end - 1;
    while (start > 0 && end - start < 4 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80)
      --start;
    char32_t cp;
    std::size_t n = decode_utf8(s, start, cp);
    if (start + n == end && is_js_space(cp)) {
      end = start;
      continue;
    }
    break;
  }
  return s.substr(0, end);
}

std::string_view js_trim(std::string_view s) { return js_trim_end(js_trim_start(s)); }

// Number of UTF-16 code units of s (JavaScript's length).
std::size_t utf16_length(std::string_view s) {
  std::size_t n = 0;
  for (std::size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    if (b < 0x80) {
      ++i;
      ++n;
      continue;
    }
    char32_t cp;
    i += decode_utf8(s, i, cp);
    n += cp >= 0x10000 ? 2 : 1;
  }
  return n;
}

// Compares as JavaScript compares strings (by UTF-16 code units).
int compare_utf16(std::string_view a, std::string_view b) {
  std::size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (a[i] == b[j] && static_cast<unsigned char>(a[i]) < 0x80) {
      ++i;
      ++j;
      continue;
    }
    char32_t ca, cb;
    std::size_t na = decode_utf8(a, i, ca), nb = decode_utf8(b, j, cb);
    if (ca != cb) {
      // First UTF-16 unit of each.
      std::uint32_t ua = ca >= 0x10000 ? 0xD800 + ((ca - 0x10000) >> 10) : ca;
      std::uint32_t ub = cb >= 0x10000 ? 0xD800 + ((cb - 0x10000) >> 10) : cb;
      if (ua != ub) return ua < ub ? -1 : 1;
      std::uint32_t la = 0xDC00 + ((ca - 0x10000) & 0x3FF), lb = 0xDC00 + ((cb - 0x10000) & 0x3FF);
      return la < lb ? -1 : 1;
    }
    i += na;
    j += nb;
  }
  if (i < a.size()) return 1;
  if (j < b.size()) return -1;
  return 0;
}

void append_case_mapped(std::string& out, std::string_view s, bool upper) {
  out.reserve(out.size() + s.size());
  for (std::size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    if (b < 0x80) {
      char c = s[i];
      if (upper && c >= 'a' && c <= 'z') c = static_cast<char>(c - 32);
      if (!upper && c >= 'A' && c <= 'Z') c = static_cast<char>(c + 32);
      out.push_back(c);
      ++i;
      continue;
    }
    char32_t cp;
    std::size_t n = decode_utf8(s, i, cp);
    if (!upper && cp == 0x3A3) {
      // Final_Sigma: preceded by a cased letter (skipping case-ignorables) and not followed
      // by one.
      bool before = false, after = false;
      for (std::size_t k = i; k > 0;) {
        std::size_t start = k - 1;
        while (start > 0 && k - start < 4 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80)
          --start;
        char32_t c;
        decode_utf8(s, start, c);
        k = start;
        if (detail::js_is_case_ignorable(c)) continue;
        before = detail::js_is_cased(c);
        break;
      }
      for (std::size_t k = i + n; k < s.size();) {
        char32_t c;
        k += decode_utf8(s, k, c);
        if (detail::js_is_case_ignorable(c)) continue;
        after = detail::js_is_cased(c);
        break;
      }
      append_utf8(out, before && !after ? 0x3C2 : 0x3C3);
      i += n;
      continue;
    }
    char32_t mapped[3];
    int m = upper ? detail::js_to_upper(cp, mapped) : detail::js_to_lower(cp, mapped);
    if (m == 1 && mapped[0] == cp) {
      out.append(s.substr(i, n));  // keeps invalid bytes as they were
    } else {
      for (int k = 0; k < m; ++k) append_utf8(out, mapped[k]);
    }
    i += n;
  }
}

std::string case_mapped(std::string_view s, bool upper) {
  std::string out;
  append_case_mapped(out, s, upper);
  return out;
}

// --- numbers as JavaScript prints them -------------------------------------------------------

// Number.prototype.toString() (and JSON.stringify for finite numbers).
void append_js_number(std::string& out, double v) {
  if (std::isnan(v)) {
    out += "NaN";
    return;
  }
  if (std::isinf(v)) {
    out += v < 0 ? "-Infinity" : "Infinity";
    return;
  }
  if (v == 0) {
    out += '0';
    return;
  }
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string_view sci(buf, static_cast<std::size_t>(res.ptr - buf));
  bool neg = false;
  if (sci.front() == '-') {
    neg = true;
    sci.remove_prefix(1);
  }
  std::size_t epos = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, epos)) {
    if (c != '.') digits.push_back(c);
  }
  int exp10 = 0;
  std::string_view es = sci.substr(epos + 1);
  if (es.front() == '+') es.remove_prefix(1);
  std::from_chars(es.data(), es.data() + es.size(), exp10);
  const int k = static_cast<int>(digits.size());
  const int n = exp10 + 1;  // value = 0.d1d2...dk * 10^n
  if (neg) out += '-';
  if (k <= n && n <= 21) {
    out += digits;
    out.append(static_cast<std::size_t>(n - k), '0');
  } else if (0 < n && n <= 21) {
    out.append(digits, 0, static_cast<std::size_t>(n));
    out += '.';
    out.append(digits, static_cast<std::size_t>(n), std::string::npos);
  } else if (-6 < n && n <= 0) {
    out += "0.";
    out.append(static_cast<std::size_t>(-n), '0');
    out += digits;
  } else {
    out += digits[0];
    if (k > 1) {
      out += '.';
      out.append(digits, 1, std::string::npos);
    }
    out += 'e';
    out += (n - 1 >= 0) ? '+' : '-';
    out += std::to_string(std::abs(n - 1));
  }
}

std::string js_number(double v) {
  std::string s;
  append_js_number(s, v);
  return s;
}

// FloatValue.toString() of the reference: integral values keep one decimal (toFixed(1)).
void append_float_display(std::string& out, double v) {
  if (v == 0 && std::signbit(v)) {
    out += "-0.0";
    return;
  }
  if (std::isfinite(v) && std::fmod(v, 1.0) == 0) {
    if (std::fabs(v) >= 1e21) {
      append_js_number(out, v);
      return;
    }
    char buf[400];
    int len = std::snprintf(buf, sizeof buf, "%.1f", v);
    out.append(buf, static_cast<std::size_t>(len));
    return;
  }
  append_js_number(out, v);
}

// Longest prefix of s (after leading whitespace) that is a StrDecimalLiteral; parseFloat.
double js_parse_float(std::string_view s) {
  s = js_trim_start(s);
  std::size_t i = 0;
  bool neg = false;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) {
    neg = s[i] == '-';
    ++i;
  }
  if (s.substr(i, 8) == "Infinity") return neg ? -INFINITY : INFINITY;
  std::size_t start = i;
  std::size_t int_digits = 0, frac_digits = 0;
  while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i, ++int_digits;
  if (i < s.size() && s[i] == '.') {
    std::size_t j = i + 1;
    while (j < s.size() && s[j] >= '0' && s[j] <= '9') ++j, ++frac_digits;
    if (int_digits > 0 || frac_digits > 0) i = j;
  }
  if (int_digits == 0 && frac_digits == 0) return NAN;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    std::size_t j = i + 1;
    if (j < s.size() && (s[j] == '+' || s[j] == '-')) ++j;
    std::size_t d = j;
    while (j < s.size() && s[j] >= '0' && s[j] <= '9') ++j;
    if (j > d) i = j;
  }
  std::string num(s.substr(start, i - start));
  double v = std::strtod(num.c_str(), nullptr);
  return neg ? -v : v;
}

// parseInt(s, 10).
double js_parse_int(std::string_view s) {
  s = js_trim_start(s);
  std::size_t i = 0;
  bool neg = false;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) {
    neg = s[i] == '-';
    ++i;
  }
  std::size_t start = i;
  while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
  if (i == start) return NAN;
  std::string num(s.substr(start, i - start));
  double v = std::strtod(num.c_str(), nullptr);
  return neg ? -v : v;
}

// ToNumber(string) (used by the loose equality ==).
double js_string_to_number(std::string_view s) {
  s = js_trim(s);
  if (s.empty()) return 0;
  if (s.size() > 2 && s[0] == '0' && (s[1] | 0x20) != '0') {
    int base = 0;
    char p = static_cast<char>(s[1] | 0x20);
    if (p == 'x') base = 16;
    if (p == 'o') base = 8;
    if (p == 'b') base = 2;
    if (base != 0) {
      double v = 0;
      for (char c : s.substr(2)) {
        int d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f') d = (c | 0x20) - 'a' + 10;
        else return NAN;
        if (d >= base) return NAN;
        v = v * base + d;
      }
      return v;
    }
  }
  std::size_t i = 0;
  bool neg = false;
  if (s[i] == '+' || s[i] == '-') {
    neg = s[i] == '-';
    ++i;
  }
  if (s.substr(i) == "Infinity") return neg ? -INFINITY : INFINITY;
  std::size_t digits = 0, start = i;
  while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i, ++digits;
  if (i < s.size() && s[i] == '.') {
    ++i;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i, ++digits;
  }
  if (digits == 0) return NAN;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
    std::size_t d = i;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
    if (i == d) return NAN;
  }
  if (i != s.size()) return NAN;
  std::string num(s.substr(start));
  double v = std::strtod(num.c_str(), nullptr);
  return neg ? -v : v;
}

// JSON.stringify(string), optionally with the reference's ensure_ascii post-processing.
void append_json_string(std::string& out, std::string_view s, bool ensure_ascii) {
  static constexpr char kHex[] = "0123456789abcdef";
  auto unit = [&](std::uint32_t u) {
    out += "\\u";
    out += kHex[(u >> 12) & 0xF];
    out += kHex[(u >> 8) & 0xF];
    out += kHex[(u >> 4) & 0xF];
    out += kHex[u & 0xF];
  };
  out += '"';
  std::size_t run = 0;  // start of the pending run of bytes copied as they are
  for (std::size_t i = 0; i < s.size();) {
    const auto b = static_cast<unsigned char>(s[i]);
    if (b >= 0x20 && b < 0x7F && b != '"' && b != '\\') {
      ++i;
      continue;
    }
    if (b >= 0x80 || b == 0x7F) {
      char32_t cp;
      std::size_t n = decode_utf8(s, i, cp);
      bool lone_surrogate = cp >= 0xD800 && cp <= 0xDFFF && n == 3;
      if (!ensure_ascii && !lone_surrogate && b != 0x7F) {
        i += n;
        continue;
      }
      if (!ensure_ascii && b == 0x7F) {
        ++i;
        continue;
      }
      out.append(s.substr(run, i - run));
      if (cp >= 0x10000) {
        unit(0xD800 + ((cp - 0x10000) >> 10));
        unit(0xDC00 + ((cp - 0x10000) & 0x3FF));
      } else {
        unit(cp);
      }
      i += n;
      run = i;
      continue;
    }
    out.append(s.substr(run, i - run));
    switch (b) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default: unit(b); break;
    }
    ++i;
    run = i;
  }
  out.append(s.substr(run));
  out += '"';
}

// String.prototype.localeCompare in the root locale, for ASCII strings (tojson sort_keys):
// primary weights (case-insensitive, control characters ignored), then lowercase before
// uppercase. Non-ASCII characters sort after ASCII by code point (approximation, documented).
int ascii_collation_weight(unsigned char c) {
  // Order of printable ASCII under ICU root collation (measured with localeCompare).
  static constexpr std::string_view kOrder =
      "\t\n\v\f\r _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$0123456789aAbBcCdDeEfFgGhHiIjJkKlLmMnNoO"
      "pPqQrRsStTuUvVwWxXyYzZ";
  static const std::array<std::int16_t, 128> kWeights = [] {
    std::array<std::int16_t, 128> w{};
    w.fill(-1);  // control characters: ignorable
    std::int16_t next = 1;
    for (std::size_t i = 0; i < kOrder.size(); ++i) {
      auto c = static_cast<unsigned char>(kOrder[i]);
      if (c >= 'A' && c <= 'Z') {
        w[c] = w[c + 32];  // same primary weight as the lowercase letter
      } else {
        w[c] = next++;
      }
    }
    return w;
  }();
  return c < 128 ? kWeights[c] : 1000 + c;
}

int locale_compare(std::string_view a, std::string_view b) {
  auto primary = [](std::string_view s) {
    std::vector<int> w;
    for (std::size_t i = 0; i < s.size();) {
      const auto c = static_cast<unsigned char>(s[i]);
      if (c < 0x80) {
        int x = ascii_collation_weight(c);
        if (x >= 0) w.push_back(x);
        ++i;
      } else {
        char32_t cp;
        i += decode_utf8(s, i, cp);
        w.push_back(1000 + static_cast<int>(cp));
      }
    }
    return w;
  };
  auto pa = primary(a), pb = primary(b);
  if (pa != pb) return std::lexicographical_compare(pa.begin(), pa.end(), pb.begin(), pb.end()) ? -1 : 1;
  // Tertiary: at the first position where case differs, lowercase first.
  std::size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    auto ca = static_cast<unsigned char>(a[i]), cb = static_cast<unsigned char>(b[j]);
    if (ca < 0x80 && ascii_collation_weight(ca) < 0) {
      ++i;
      continue;
    }
    if (cb < 0x80 && ascii_collation_weight(cb) < 0) {
      ++j;
      continue;
    }
    if (ca != cb) {
      bool la = ca >= 'a' && ca <= 'z', lb = cb >= 'a' && cb <= 'z';
      if (la != lb) return la ? -1 : 1;
    }
    ++i;
    ++j;
  }
  return 0;  // equal but for ignorable characters: equal (the stable sort keeps their order)
}

// =============================================================================================
// Preprocessing and lexer
// =============================================================================================

// Source text after preprocessing, with the original byte offset of every byte (for lines).
struct Mapped {
  std::string text;
  std::vector<std::uint32_t> origin;
};

bool is_line_terminator_at(std::string_view s, std::size_t i, std::size_t& len) {
  if (s[i] == '\n' || s[i] == '\r') {
    len = 1;
    return true;
  }
  if (static_cast<unsigned char>(s[i]) == 0xE2 && i + 2 < s.size() &&
      static_cast<unsigned char>(s[i + 1]) == 0x80 &&
      (static_cast<unsigned char>(s[i + 2]) == 0xA8 || static_cast<unsigned char>(s[i + 2]) == 0xA9)) {
    len = 3;
    return true;
  }
  return false;
}

Mapped preprocess(std::string_view source) {
  Mapped cur;
  cur.text.assign(source);
  cur.origin.resize(source.size());
  for (std::size_t i = 0; i < source.size(); ++i) cur.origin[i] = static_cast<std::uint32_t>(i);

  // A single trailing newline is dropped.
  if (!cur.text.empty() && cur.text.back() == '\n') {
    cur.text.pop_back();
    cur.origin.pop_back();
  }

  auto emit = [](Mapped& m, const Mapped& from, std::size_t i) {
    m.text.push_back(from.text[i]);
    m.origin.push_back(from.origin[i]);
  };

  // lstrip_blocks: /^[ \t]*({[#%-])/gm -> "$1"
  {
    Mapped next;
    next.text.reserve(cur.text.size());
    next.origin.reserve(cur.text.size());
    const std::string_view s = cur.text;
    bool line_start = true;
    for (std::size_t i = 0; i < s.size();) {
      if (line_start) {
        line_start = false;
        std::size_t j = i;
        while (j < s.size() && (s[j] == ' ' || s[j] == '\t')) ++j;
        if (j + 1 < s.size() && s[j] == '{' && (s[j + 1] == '#' || s[j + 1] == '%' || s[j + 1] == '-')) {
          i = j;  // drop the blanks
          continue;
        }
      }
      std::size_t len;
      if (is_line_terminator_at(s, i, len)) {
        for (std::size_t k = 0; k < len; ++k) emit(next, cur, i + k);
        i += len;
        line_start = true;
        continue;
      }
      emit(next, cur, i);
      ++i;
    }
    cur = std::move(next);
  }

  // trim_blocks: /([#%-]})\n/g -> "$1"
  {
    Mapped next;
    next.text.reserve(cur.text.size());
    next.origin.reserve(cur.text.size());
    const std::string_view s = cur.text;
    for (std::size_t i = 0; i < s.size();) {
      if ((s[i] == '#' || s[i] == '%' || s[i] == '-') && i + 2 < s.size() && s[i + 1] == '}' &&
          s[i + 2] == '\n') {
        emit(next, cur, i);
        emit(next, cur, i + 1);
        i += 3;
        continue;
      }
      emit(next, cur, i);
      ++i;
    }
    cur = std::move(next);
  }

  // {% generation %} / {% endgeneration %}:
  // /(\s*){%(-?)\s*(?:end)?generation\s*(-?)%}(\s*)/gs -> (lstrip ? "" : $1) + (rstrip ? "" : $4)
  if (cur.text.find("generation") != std::string::npos) {
    const std::string_view s = cur.text;
    auto skip_ws = [&](std::size_t i) {
      while (std::size_t n = space_at(s, i)) i += n;
      return i;
    };
    // Returns the end of a generation tag starting at i ("{%"), or npos; sets the flags.
    auto match_tag = [&](std::size_t i, bool& lstrip, bool& rstrip) -> std::size_t {
      if (s.substr(i, 2) != "{%") return std::string::npos;
      i += 2;
      lstrip = i < s.size() && s[i] == '-';
      if (lstrip) ++i;
      i = skip_ws(i);
      if (s.substr(i, 3) == "end" && s.substr(i + 3, 10) == "generation") i += 3;
      if (s.substr(i, 10) != "generation") return std::string::npos;
      i = skip_ws(i + 10);
      rstrip = i < s.size() && s[i] == '-';
      if (rstrip) ++i;
      if (s.substr(i, 2) != "%}") return std::string::npos;
      return i + 2;
    };
    Mapped next;
    std::size_t pos = 0;          // lastIndex
    std::size_t copied = 0;       // bytes of s already emitted
    std::size_t run_start = std::string::npos;
    for (std::size_t i = pos; i < s.size();) {
      bool lstrip = false, rstrip = false;
      std::size_t end = s[i] == '{' ? match_tag(i, lstrip, rstrip) : std::string::npos;
      if (end != std::string::npos) {
        std::size_t start = run_start != std::string::npos ? run_start : i;
        for (std::size_t k = copied; k < start; ++k) emit(next, cur, k);
        if (!lstrip) {
          for (std::size_t k = start; k < i; ++k) emit(next, cur, k);
        }
        std::size_t after_end = skip_ws(end);
        if (!rstrip) {
          for (std::size_t k = end; k < after_end; ++k) emit(next, cur, k);
        }
        copied = after_end;
        i = after_end;
        run_start = std::string::npos;
        continue;
      }
      if (std::size_t n = space_at(s, i)) {
        if (run_start == std::string::npos) run_start = i;
        i += n;
      } else {
        run_start = std::string::npos;
        ++i;
      }
    }
    for (std::size_t k = copied; k < s.size(); ++k) emit(next, cur, k);
    cur = std::move(next);
  }
  return cur;
}

enum class Tok : std::uint8_t {
  Text,
  Number,
  String,
  Ident,
  Equals,
  OpenParen,
  CloseParen,
  OpenStatement,
  CloseStatement,
  OpenExpression,
  CloseExpression,
  OpenSquare,
  CloseSquare,
  OpenCurly,
  CloseCurly,
  Comma,
  Dot,
  Colon,
  Pipe,
  Additive,
  Multiplicative,
  Power,
  Comparison,
  Unary,
  Comment,
};

struct Token {
  Tok type;
  std::string value;
  std::uint32_t line;
};

class Lexer {
 public:
  Lexer(std::string_view original, const Mapped& m) : m_(m), s_(m.text) {
    for (std::size_t i = 0; i < original.size(); ++i) {
      if (original[i] == '\n') newlines_.push_back(static_cast<std::uint32_t>(i));
    }
  }

  std::uint32_t line_at(std::size_t pos) const {
    std::uint32_t orig = pos < m_.origin.size() ? m_.origin[pos]
                                                : (m_.origin.empty() ? 0 : m_.origin.back() + 1);
    return static_cast<std::uint32_t>(
               std::lower_bound(newlines_.begin(), newlines_.end(), orig) - newlines_.begin()) +
           1;
  }

  [[noreturn]] void fail(const std::string& msg, std::size_t pos) const {
    throw TemplateError("jinja: " + msg + " (line " + std::to_string(line_at(pos)) + ")");
  }

  std::vector<Token> run() {
    std::vector<Token> tokens;
    const std::string_view s = s_;
    const std::size_t n = s.size();
    std::size_t pos = 0;
    int curly_depth = 0;

    auto push = [&](Tok t, std::string v, std::size_t at) {
      tokens.push_back(Token{t, std::move(v), line_at(at)});
    };
    auto strip_trailing = [&]() {
      if (!tokens.empty() && tokens.back().type == Tok::Text) {
        std::string& v = tokens.back().value;
        v.resize(js_trim_end(v).size());
        if (v.empty()) tokens.pop_back();
      }
    };
    auto skip_leading = [&]() {
      while (std::size_t k = space_at(s, pos)) pos += k;
    };
    auto starts = [&](std::string_view lit) { return s.substr(pos, lit.size()) == lit; };

    while (pos < n) {
      const Tok last = tokens.empty() ? Tok::Text : tokens.back().type;
      if (tokens.empty() || last == Tok::CloseStatement || last == Tok::CloseExpression ||
          last == Tok::Comment) {
        std::size_t start = pos;
        while (pos < n && !(s[pos] == '{' && pos + 1 < n &&
                            (s[pos + 1] == '%' || s[pos + 1] == '{' || s[pos + 1] == '#'))) {
          ++pos;
        }
        if (pos > start) {
          push(Tok::Text, std::string(s.substr(start, pos - start)), start);
          continue;
        }
      }

      if (starts("{#")) {
        std::size_t at = pos;
        pos += 2;
        bool strip_before = pos < n && s[pos] == '-';
        if (strip_before) ++pos;
        std::size_t cstart = pos;
        while (pos >= n || s[pos] != '#' || pos + 1 >= n || s[pos + 1] != '}') {
          if (pos + 2 >= n) fail("missing end of comment tag", at);
          ++pos;
        }
        std::string comment(s.substr(cstart, pos - cstart));
        bool strip_after = !comment.empty() && comment.back() == '-';
        if (strip_after) comment.pop_back();
        if (strip_before) strip_trailing();
        push(Tok::Comment, std::move(comment), at);
        pos += 2;
        if (strip_after) skip_leading();
        continue;
      }
      if (starts("{%-")) {
        strip_trailing();
        push(Tok::OpenStatement, "{%", pos);
        pos += 3;
        continue;
      }
      if (starts("{{-")) {
        strip_trailing();
        push(Tok::OpenExpression, "{{", pos);
        curly_depth = 0;
        pos += 3;
        continue;
      }

      // Whitespace inside a tag (the reference fails when the input ends in it).
      while (std::size_t k = space_at(s, pos)) {
        pos += k;
        if (pos >= n) fail("unexpected end of input", pos);
      }

      if (starts("-%}")) {
        push(Tok::CloseStatement, "%}", pos);
        pos += 3;
        skip_leading();
        continue;
      }
      if (starts("-}}")) {
        push(Tok::CloseExpression, "}}", pos);
        pos += 3;
        skip_leading();
        continue;
      }

      const char c = s[pos];
      if (c == '-' || c == '+') {
        if (tokens.empty() || tokens.back().type == Tok::Text) {
          fail(std::string("unexpected character '") + c + "'", pos);
        }
        switch (tokens.back().type) {
          case Tok::Ident:
          case Tok::Number:
          case Tok::String:
          case Tok::CloseParen:
          case Tok::CloseSquare:
            break;  // binary operator
          default: {
            std::size_t at = pos;
            ++pos;
            std::string num = consume_digits(pos);
            if (!num.empty() && pos + 1 < n && s[pos] == '.' && is_digit(s[pos + 1])) {
              ++pos;
              num += '.';
              num += consume_digits(pos);
            }
            if (num.empty()) {
              push(Tok::Unary, std::string(1, c), at);
            } else {
              push(Tok::Number, std::string(1, c) + num, at);
            }
            continue;
          }
        }
      }

      if (match_table(tokens, pos, curly_depth)) continue;

      if (c == '\'' || c == '"') {
        std::size_t at = pos;
        ++pos;
        std::string str = consume_string(pos, c, at);
        push(Tok::String, std::move(str), at);
        ++pos;  // closing quote
        continue;
      }
      if (is_digit(c)) {
        std::size_t at = pos;
        std::string num = consume_digits(pos);
        if (tokens.empty() || tokens.back().type != Tok::Dot) {
          if (pos + 1 < n && s[pos] == '.' && is_digit(s[pos + 1])) {
            ++pos;
            num += '.';
            num += consume_digits(pos);
          }
        }
        push(Tok::Number, std::move(num), at);
        continue;
      }
      if (is_ascii_word(static_cast<unsigned char>(c))) {
        std::size_t at = pos;
        while (pos < n && is_ascii_word(static_cast<unsigned char>(s[pos]))) ++pos;
        if (pos >= n) fail("unexpected end of input", pos);
        push(Tok::Ident, std::string(s.substr(at, pos - at)), at);
        continue;
      }
      char32_t cp;
      std::size_t len = decode_utf8(s, pos, cp);
      fail("unexpected character '" + std::string(s.substr(pos, len)) + "'", pos);
    }
    return tokens;
  }

 private:
  static bool is_digit(char c) { return c >= '0' && c <= '9'; }

  std::string consume_digits(std::size_t& pos) {
    std::size_t start = pos;
    while (pos < s_.size() && is_digit(s_[pos])) ++pos;
    if (pos > start && pos >= s_.size()) fail("unexpected end of input", pos);
    return std::string(s_.substr(start, pos - start));
  }

  std::string consume_string(std::size_t& pos, char quote, std::size_t at) {
    const std::string_view s = s_;
    std::string out;
    std::uint32_t pending_high = 0;  // a \uD8xx waiting for its low surrogate
    auto flush_high = [&]() {
      if (pending_high) {
        append_utf8(out, pending_high);
        pending_high = 0;
      }
    };
    while (true) {
      if (pos >= s.size()) fail("unterminated string", at);
      char c = s[pos];
      if (c == quote) break;
      if (c == '\\') {
        ++pos;
        if (pos >= s.size()) fail("unterminated string", at);
        char e = s[pos++];
        if (e == 'x' || e == 'u') {
          std::size_t len = e == 'x' ? 2 : 4;
          std::string_view hex = s.substr(pos, len);
          bool ok = hex.size() == len;
          std::uint32_t v = 0;
          for (char h : hex) {
            int d = (h >= '0' && h <= '9') ? h - '0'
                    : ((h | 0x20) >= 'a' && (h | 0x20) <= 'f') ? (h | 0x20) - 'a' + 10
                                                               : -1;
            if (d < 0) ok = false;
            v = v * 16 + static_cast<std::uint32_t>(d < 0 ? 0 : d);
          }
          if (!ok) fail("invalid hexadecimal escape sequence \\" + std::string(1, e) + std::string(hex), pos);
          pos += len;
          if (v >= 0xDC00 && v <= 0xDFFF && pending_high) {
            append_utf8(out, 0x10000 + ((pending_high - 0xD800) << 10) + (v - 0xDC00));
            pending_high = 0;
          } else {
            flush_high();
            if (v >= 0xD800 && v <= 0xDBFF) {
              pending_high = v;
            } else {
              append_utf8(out, v);
            }
          }
          continue;
        }
        flush_high();
        switch (e) {
          case 'n': out += '\n'; break;
          case 't': out += '\t'; break;
          case 'r': out += '\r'; break;
          case 'b': out += '\b'; break;
          case 'f': out += '\f'; break;
          case 'v': out += '\v'; break;
          case '\'': out += '\''; break;
          case '"': out += '"'; break;
          case '\\': out += '\\'; break;
          default: fail(std::string("unexpected escaped character '") + e + "'", pos);
        }
        continue;
      }
      flush_high();
      out += c;
      ++pos;
      if (pos >= s.size()) fail("unterminated string", at);
    }
    flush_high();
    return out;
  }

  bool match_table(std::vector<Token>& tokens, std::size_t& pos, int& curly_depth) {
    struct Entry {
      std::string_view seq;
      Tok type;
    };
    static constexpr Entry kTable[] = {
        {"{%", Tok::OpenStatement}, {"%}", Tok::CloseStatement}, {"{{", Tok::OpenExpression},
        {"}}", Tok::CloseExpression}, {"(", Tok::OpenParen},     {")", Tok::CloseParen},
        {"{", Tok::OpenCurly},        {"}", Tok::CloseCurly},     {"[", Tok::OpenSquare},
        {"]", Tok::CloseSquare},      {",", Tok::Comma},          {".", Tok::Dot},
        {":", Tok::Colon},            {"|", Tok::Pipe},           {"<=", Tok::Comparison},
        {">=", Tok::Comparison},      {"==", Tok::Comparison},    {"!=", Tok::Comparison},
        {"<", Tok::Comparison},       {">", Tok::Comparison},     {"+", Tok::Additive},
        {"-", Tok::Additive},         {"~", Tok::Additive},       {"**", Tok::Power},
        {"*", Tok::Multiplicative},   {"//", Tok::Multiplicative}, {"/", Tok::Multiplicative},
        {"%", Tok::Multiplicative},   {"=", Tok::Equals},
    };
    for (const Entry& e : kTable) {
      if (e.type == Tok::CloseExpression && curly_depth > 0) continue;
      if (s_.substr(pos, e.seq.size()) == e.seq) {
        tokens.push_back(Token{e.type, std::string(e.seq), line_at(pos)});
        if (e.type == Tok::OpenExpression) curly_depth = 0;
        else if (e.type == Tok::OpenCurly) ++curly_depth;
        else if (e.type == Tok::CloseCurly) --curly_depth;
        pos += e.seq.size();
        return true;
      }
    }
    return false;
  }

  const Mapped& m_;
  std::string_view s_;
  std::vector<std::uint32_t> newlines_;
};


// =============================================================================================
// AST
// =============================================================================================

enum class NK : std::uint8_t {
  // statements
  Text,
  Comment,
  If,
  For,
  Set,
  Macro,
  CallBlock,
  FilterBlock,
  Break,
  Continue,
  // expressions
  IntLit,
  FloatLit,
  StrLit,
  ArrayLit,
  TupleLit,
  ObjectLit,
  Ident,
  Member,
  Call,
  Unary,
  Binary,
  FilterExpr,
  TestExpr,
  Select,
  Ternary,
  Slice,
  KwArg,
  Spread,
  KwSpread,
};

enum class Op : std::uint8_t {
  None,
  And,
  Or,
  Not,
  Eq,
  Ne,
  Lt,
  Gt,
  Le,
  Ge,
  In,
  NotIn,
  Add,
  Sub,
  Concat,
  Mul,
  Div,
  FloorDiv,
  Mod,
  Pow,
  Neg,
  Pos,
};

const char* op_text(Op op) {
  switch (op) {
    case Op::And: return "and";
    case Op::Or: return "or";
    case Op::Not: return "not";
    case Op::Eq: return "==";
    case Op::Ne: return "!=";
    case Op::Lt: return "<";
    case Op::Gt: return ">";
    case Op::Le: return "<=";
    case Op::Ge: return ">=";
    case Op::In: return "in";
    case Op::NotIn: return "not in";
    case Op::Add: return "+";
    case Op::Sub: return "-";
    case Op::Concat: return "~";
    case Op::Mul: return "*";
    case Op::Div: return "/";
    case Op::FloorDiv: return "//";
    case Op::Mod: return "%";
    case Op::Pow: return "**";
    case Op::Neg: return "-";
    case Op::Pos: return "+";
    case Op::None: break;
  }
  return "?";
}

// Filters the reference knows (for some operand type, with or without arguments).
enum class Filter : std::uint8_t {
  Safe, Tojson, List, First, Last, Length, Reverse, Sort, Join, String, Unique, Upper, Lower,
  Title, Capitalize, Trim, Indent, Int, Float, Abs, Items, Bool, Default, Selectattr,
  Rejectattr, Map, Replace, Get, Keys, Values, Dictsort,
  // Known to Jinja2 but not to the reference: accepted at parse time because official templates
  // use them in optional branches (Llama 3.x: builtin_tools | reject(...)); rendering one fails
  // as in the reference ("Unknown ArrayValue filter: reject").
  Select, Reject,
};
constexpr std::pair<std::string_view, Filter> kFilters[] = {
    {"safe", Filter::Safe},       {"tojson", Filter::Tojson},       {"list", Filter::List},
    {"first", Filter::First},     {"last", Filter::Last},           {"length", Filter::Length},
    {"reverse", Filter::Reverse}, {"sort", Filter::Sort},           {"join", Filter::Join},
    {"string", Filter::String},   {"unique", Filter::Unique},       {"upper", Filter::Upper},
    {"lower", Filter::Lower},     {"title", Filter::Title},         {"capitalize", Filter::Capitalize},
    {"trim", Filter::Trim},       {"indent", Filter::Indent},       {"int", Filter::Int},
    {"float", Filter::Float},     {"abs", Filter::Abs},             {"items", Filter::Items},
    {"bool", Filter::Bool},       {"default", Filter::Default},     {"selectattr", Filter::Selectattr},
    {"rejectattr", Filter::Rejectattr}, {"map", Filter::Map},       {"replace", Filter::Replace},
    {"get", Filter::Get},         {"keys", Filter::Keys},           {"values", Filter::Values},
    {"dictsort", Filter::Dictsort}, {"select", Filter::Select}, {"reject", Filter::Reject},
};

enum class Test : std::uint8_t {
  Boolean, Callable, Odd, Even, False, True, None, String, Number, Integer, Iterable, Mapping,
  Sequence, Lower, Upper, Defined, Undefined, Equalto,
};
constexpr std::pair<std::string_view, Test> kTests[] = {
    {"boolean", Test::Boolean}, {"callable", Test::Callable}, {"odd", Test::Odd},
    {"even", Test::Even},       {"false", Test::False},       {"true", Test::True},
    {"none", Test::None},       {"string", Test::String},     {"number", Test::Number},
    {"integer", Test::Integer}, {"iterable", Test::Iterable}, {"mapping", Test::Mapping},
    {"sequence", Test::Sequence}, {"lower", Test::Lower},     {"upper", Test::Upper},
    {"defined", Test::Defined}, {"undefined", Test::Undefined}, {"equalto", Test::Equalto},
    {"eq", Test::Equalto},
};

// Built-in methods of strings and mappings (the reference's `builtins` that are functions).
enum class Method : std::uint8_t {
  None, Upper, Lower, Strip, Title, Capitalize, Rstrip, Lstrip, Startswith, Endswith, Split,
  Replace, Get, Items, Keys, Values, Dictsort,
};
constexpr std::pair<std::string_view, Method> kStringMethods[] = {
    {"upper", Method::Upper},   {"lower", Method::Lower},           {"strip", Method::Strip},
    {"title", Method::Title},   {"capitalize", Method::Capitalize}, {"rstrip", Method::Rstrip},
    {"lstrip", Method::Lstrip}, {"startswith", Method::Startswith}, {"endswith", Method::Endswith},
    {"split", Method::Split},   {"replace", Method::Replace},
};
constexpr std::pair<std::string_view, Method> kObjectMethods[] = {
    {"get", Method::Get},       {"items", Method::Items}, {"keys", Method::Keys},
    {"values", Method::Values}, {"dictsort", Method::Dictsort},
};

template <class E, std::size_t N>
bool lookup_name(const std::pair<std::string_view, E> (&table)[N], std::string_view name, E& out) {
  for (const auto& [n, e] : table) {
    if (n == name) {
      out = e;
      return true;
    }
  }
  return false;
}

// Global names with fixed ids.
enum : std::uint32_t {
  kIdNamespace,
  kIdTrue,
  kIdFalse,
  kIdNone,
  kIdTrueTitle,
  kIdFalseTitle,
  kIdNoneTitle,
  kIdRaiseException,
  kIdRange,
  kIdStrftimeNow,
  kIdLoop,
  kIdCaller,
  kIdKwargs,
  kIdVarargs,
  kNumFixedIds,
};
constexpr std::string_view kFixedNames[kNumFixedIds] = {
    "namespace", "true",  "false",          "none",         "True",
    "False",     "None",  "raise_exception", "range",       "strftime_now",
    "loop",      "caller", "kwargs",        "varargs",
};

struct Node;
using NodePtr = std::unique_ptr<Node>;
using NodeList = std::vector<NodePtr>;

struct Node {
  NK kind;
  std::uint32_t line = 0;
  std::uint16_t depth = 1;  // height of this subtree (bounded at parse time)
  Op op = Op::None;
  bool flag = false;        // Member: computed; TestExpr: negated; Filter*: called with (...)
  std::uint8_t code = 0;    // Filter / Test / Method of a member call
  std::uint32_t id = 0;     // interned name (Ident, Macro)
  double num = 0;
  std::string str;          // text, string literal, identifier, filter/test/keyword name
  NodePtr a, b, c;
  NodeList list, list2;
  bool uses_kwargs = false;  // Macro, CallBlock: the body reads `kwargs` / `varargs`
  bool uses_varargs = false;

  Node(NK k, std::uint32_t l) : kind(k), line(l) {}
};

// =============================================================================================
// Parser (a port of the reference's recursive descent, same precedence and quirks)
// =============================================================================================

class Parser {
 public:
  Parser(std::vector<Token> tokens, std::unordered_map<std::string, std::uint32_t>& names)
      : t_(std::move(tokens)), names_(names) {}

  NodeList parse_program() {
    NodeList body;
    while (cur_ < t_.size()) body.push_back(parse_any());
    return body;
  }

 private:
  struct DepthGuard {
    Parser& p;
    explicit DepthGuard(Parser& parser) : p(parser) {
      if (++p.depth_ > Limits::kMaxParseDepth) p.fail("template nesting is too deep");
    }
    ~DepthGuard() { --p.depth_; }
  };

  std::uint32_t line() const {
    if (cur_ < t_.size()) return t_[cur_].line;
    return t_.empty() ? 1 : t_.back().line;
  }

  [[noreturn]] void fail(const std::string& msg) const { fail_at(msg, line()); }
  [[noreturn]] static void fail_at(const std::string& msg, std::uint32_t line) {
    throw TemplateError("jinja: " + msg + " (line " + std::to_string(line) + ")");
  }

  static const char* tok_name(Tok t) {
    switch (t) {
      case Tok::Text: return "text";
      case Tok::Number: return "number";
      case Tok::String: return "string";
      case Tok::Ident: return "identifier";
      case Tok::Equals: return "'='";
      case Tok::OpenParen: return "'('";
      case Tok::CloseParen: return "')'";
      case Tok::OpenStatement: return "'{%'";
      case Tok::CloseStatement: return "'%}'";
      case Tok::OpenExpression: return "'{{'";
      case Tok::CloseExpression: return "'}}'";
      case Tok::OpenSquare: return "'['";
      case Tok::CloseSquare: return "']'";
      case Tok::OpenCurly: return "'{'";
      case Tok::CloseCurly: return "'}'";
      case Tok::Comma: return "','";
      case Tok::Dot: return "'.'";
      case Tok::Colon: return "':'";
      case Tok::Pipe: return "'|'";
      case Tok::Additive:
      case Tok::Multiplicative:
      case Tok::Power:
      case Tok::Comparison:
      case Tok::Unary: return "operator";
      case Tok::Comment: return "comment";
    }
    return "token";
  }

  std::string describe_current() const {
    if (cur_ >= t_.size()) return "end of template";
    const Token& t = t_[cur_];
    if (t.type == Tok::Ident || t.type == Tok::Additive || t.type == Tok::Multiplicative ||
        t.type == Tok::Power || t.type == Tok::Comparison || t.type == Tok::Unary) {
      return std::string(tok_name(t.type)) + " '" + t.value + "'";
    }
    return tok_name(t.type);
  }

  const Token& expect(Tok type, const char* what) {
    if (cur_ >= t_.size() || t_[cur_].type != type) {
      fail(std::string("expected ") + what + ", got " + describe_current());
    }
    return t_[cur_++];
  }

  bool is(Tok type) const { return cur_ < t_.size() && t_[cur_].type == type; }
  bool is2(Tok a, Tok b) const {
    return cur_ + 1 < t_.size() && t_[cur_].type == a && t_[cur_ + 1].type == b;
  }
  bool is_ident(std::string_view name, std::size_t off = 0) const {
    return cur_ + off < t_.size() && t_[cur_ + off].type == Tok::Ident && t_[cur_ + off].value == name;
  }
  bool is_statement(std::initializer_list<std::string_view> names) const {
    if (!(cur_ + 1 < t_.size() && t_[cur_].type == Tok::OpenStatement && t_[cur_ + 1].type == Tok::Ident))
      return false;
    for (auto n : names) {
      if (t_[cur_ + 1].value == n) return true;
    }
    return false;
  }
  void expect_ident(std::string_view name) {
    if (!is_ident(name)) fail("expected '" + std::string(name) + "', got " + describe_current());
    ++cur_;
  }

  // Fills in depth (height) from the children and enforces the bound.
  NodePtr finish(NodePtr n) {
    std::uint32_t d = 0;
    for (const Node* c : {n->a.get(), n->b.get(), n->c.get()}) {
      if (c) d = std::max<std::uint32_t>(d, c->depth);
    }
    for (const NodeList* l : {&n->list, &n->list2}) {
      for (const auto& c : *l) {
        if (c) d = std::max<std::uint32_t>(d, c->depth);
      }
    }
    if (d + 1 > 2 * Limits::kMaxParseDepth) fail_at("template nesting is too deep", n->line);
    n->depth = static_cast<std::uint16_t>(d + 1);
    return n;
  }

  NodePtr make(NK k, std::uint32_t line) { return std::make_unique<Node>(k, line); }

  std::uint32_t intern(const std::string& name) {
    auto it = names_.find(name);
    if (it != names_.end()) return it->second;
    auto id = static_cast<std::uint32_t>(names_.size());
    names_.emplace(name, id);
    return id;
  }

  NodePtr parse_body_until(NodeList& body, std::initializer_list<std::string_view> names,
                           const char* what) {
    while (!is_statement(names)) {
      if (cur_ >= t_.size()) fail(std::string("unexpected end of template, expected ") + what);
      body.push_back(parse_any());
    }
    return nullptr;
  }

  NodePtr parse_any() {
    DepthGuard g(*this);
    if (cur_ >= t_.size()) fail("unexpected end of template");
    const Token& t = t_[cur_];
    switch (t.type) {
      case Tok::Comment: {
        auto n = make(NK::Comment, t.line);
        ++cur_;
        return finish(std::move(n));
      }
      case Tok::Text: {
        auto n = make(NK::Text, t.line);
        n->str = t.value;
        ++cur_;
        return finish(std::move(n));
      }
      case Tok::OpenStatement:
        return parse_statement();
      case Tok::OpenExpression: {
        ++cur_;
        auto e = parse_expression();
        expect(Tok::CloseExpression, "'}}'");
        return e;
      }
      default:
        fail("unexpected " + describe_current());
    }
  }

  NodePtr parse_statement() {
    expect(Tok::OpenStatement, "'{%'");
    if (!is(Tok::Ident)) fail("expected a statement name, got " + describe_current());
    const std::string name = t_[cur_].value;
    const std::uint32_t line = t_[cur_].line;
    if (name == "set") {
      ++cur_;
      return parse_set(line);
    }
    if (name == "if") {
      ++cur_;
      auto n = parse_if(line);
      expect(Tok::OpenStatement, "'{%'");
      expect_ident("endif");
      expect(Tok::CloseStatement, "'%}'");
      return n;
    }
    if (name == "macro") {
      ++cur_;
      auto n = parse_macro(line);
      expect(Tok::OpenStatement, "'{%'");
      expect_ident("endmacro");
      expect(Tok::CloseStatement, "'%}'");
      return n;
    }
    if (name == "for") {
      ++cur_;
      auto n = parse_for(line);
      expect(Tok::OpenStatement, "'{%'");
      expect_ident("endfor");
      expect(Tok::CloseStatement, "'%}'");
      return n;
    }
    if (name == "call") {
      ++cur_;
      auto n = make(NK::CallBlock, line);
      if (is(Tok::OpenParen)) {
        n->flag = true;
        n->list = parse_args(true);
      }
      auto callee = parse_primary();
      if (callee->kind != NK::Ident) fail_at("expected an identifier after 'call'", line);
      auto call = make(NK::Call, line);
      call->a = std::move(callee);
      call->list = parse_args(false);
      n->a = finish(std::move(call));
      expect(Tok::CloseStatement, "'%}'");
      parse_body_until(n->list2, {"endcall"}, "{% endcall %}");
      expect(Tok::OpenStatement, "'{%'");
      expect_ident("endcall");
      expect(Tok::CloseStatement, "'%}'");
      return finish(std::move(n));
    }
    if (name == "break" || name == "continue") {
      ++cur_;
      expect(Tok::CloseStatement, "'%}'");
      return finish(make(name == "break" ? NK::Break : NK::Continue, line));
    }
    if (name == "filter") {
      ++cur_;
      auto n = make(NK::FilterBlock, line);
      parse_filter_spec(*n);
      expect(Tok::CloseStatement, "'%}'");
      parse_body_until(n->list2, {"endfilter"}, "{% endfilter %}");
      expect(Tok::OpenStatement, "'{%'");
      expect_ident("endfilter");
      expect(Tok::CloseStatement, "'%}'");
      return finish(std::move(n));
    }
    static constexpr std::string_view kKnownEnds[] = {
        "elif", "else", "endif", "endfor", "endset", "endmacro", "endcall", "endfilter"};
    for (auto e : kKnownEnds) {
      if (name == e) fail_at("unexpected '{% " + name + " %}'", line);
    }
    fail_at("unsupported statement '{% " + name + " %}'", line);
  }

  NodePtr parse_set(std::uint32_t line) {
    auto n = make(NK::Set, line);
    n->a = parse_expression_sequence(false);
    if (is(Tok::Equals)) {
      ++cur_;
      n->b = parse_expression_sequence(false);
    } else {
      expect(Tok::CloseStatement, "'%}' or '='");
      parse_body_until(n->list, {"endset"}, "{% endset %}");
      expect(Tok::OpenStatement, "'{%'");
      expect_ident("endset");
    }
    expect(Tok::CloseStatement, "'%}'");
    return finish(std::move(n));
  }

  NodePtr parse_if(std::uint32_t line) {
    DepthGuard g(*this);
    auto n = make(NK::If, line);
    n->a = parse_expression();
    expect(Tok::CloseStatement, "'%}'");
    parse_body_until(n->list, {"elif", "else", "endif"}, "{% endif %}");
    if (is_statement({"elif"})) {
      std::uint32_t l = t_[cur_ + 1].line;
      cur_ += 2;
      n->list2.push_back(parse_if(l));
    } else if (is_statement({"else"})) {
      cur_ += 2;
      expect(Tok::CloseStatement, "'%}'");
      parse_body_until(n->list2, {"endif"}, "{% endif %}");
    }
    return finish(std::move(n));
  }

  NodePtr parse_macro(std::uint32_t line) {
    auto n = make(NK::Macro, line);
    auto name = parse_primary();
    if (name->kind != NK::Ident) fail_at("expected an identifier after 'macro'", line);
    n->str = name->str;
    n->id = name->id;
    n->list = parse_args(true);
    expect(Tok::CloseStatement, "'%}'");
    parse_body_until(n->list2, {"endmacro"}, "{% endmacro %}");
    return finish(std::move(n));
  }

  NodePtr parse_for(std::uint32_t line) {
    auto n = make(NK::For, line);
    n->a = parse_expression_sequence(true);
    if (n->a->kind != NK::Ident && n->a->kind != NK::TupleLit) {
      fail_at("expected an identifier or tuple as the loop variable", line);
    }
    if (!is_ident("in")) fail("expected 'in' after the loop variable, got " + describe_current());
    ++cur_;
    n->b = parse_expression();
    expect(Tok::CloseStatement, "'%}'");
    parse_body_until(n->list, {"endfor", "else"}, "{% endfor %}");
    if (is_statement({"else"})) {
      cur_ += 2;
      expect(Tok::CloseStatement, "'%}'");
      parse_body_until(n->list2, {"endfor"}, "{% endfor %}");
    }
    return finish(std::move(n));
  }

  NodePtr parse_expression_sequence(bool primary) {
    std::uint32_t line = this->line();
    NodeList items;
    items.push_back(primary ? parse_primary() : parse_expression());
    const bool tuple = is(Tok::Comma);
    while (tuple) {
      ++cur_;
      items.push_back(primary ? parse_primary() : parse_expression());
      if (!is(Tok::Comma)) break;
    }
    if (!tuple) return std::move(items[0]);
    auto n = make(NK::TupleLit, line);
    n->list = std::move(items);
    return finish(std::move(n));
  }

  NodePtr parse_expression() {
    DepthGuard g(*this);
    return parse_if_expression();
  }

  NodePtr parse_if_expression() {
    DepthGuard g(*this);
    auto a = parse_or();
    if (is_ident("if")) {
      std::uint32_t line = t_[cur_].line;
      ++cur_;
      auto test = parse_or();
      if (is_ident("else")) {
        ++cur_;
        auto n = make(NK::Ternary, line);
        n->a = std::move(test);
        n->b = std::move(a);
        n->c = parse_if_expression();
        return finish(std::move(n));
      }
      auto n = make(NK::Select, line);
      n->a = std::move(a);
      n->b = std::move(test);
      return finish(std::move(n));
    }
    return a;
  }

  NodePtr binary(Op op, std::uint32_t line, NodePtr l, NodePtr r) {
    auto n = make(NK::Binary, line);
    n->op = op;
    n->a = std::move(l);
    n->b = std::move(r);
    return finish(std::move(n));
  }

  NodePtr parse_or() {
    auto left = parse_and();
    while (is_ident("or")) {
      std::uint32_t line = t_[cur_++].line;
      left = binary(Op::Or, line, std::move(left), parse_and());
    }
    return left;
  }

  NodePtr parse_and() {
    auto left = parse_not();
    while (is_ident("and")) {
      std::uint32_t line = t_[cur_++].line;
      left = binary(Op::And, line, std::move(left), parse_not());
    }
    return left;
  }

  NodePtr parse_not() {
    DepthGuard g(*this);
    NodePtr result;
    while (is_ident("not")) {
      std::uint32_t line = t_[cur_++].line;
      auto n = make(NK::Unary, line);
      n->op = Op::Not;
      n->a = parse_not();
      result = finish(std::move(n));
    }
    return result ? std::move(result) : parse_comparison();
  }

  NodePtr parse_comparison() {
    auto left = parse_additive();
    while (true) {
      Op op;
      std::uint32_t line = this->line();
      if (is_ident("not") && is_ident("in", 1)) {
        op = Op::NotIn;
        cur_ += 2;
      } else if (is_ident("in")) {
        op = Op::In;
        ++cur_;
      } else if (is(Tok::Comparison)) {
        const std::string& v = t_[cur_++].value;
        op = v == "==" ? Op::Eq : v == "!=" ? Op::Ne : v == "<" ? Op::Lt : v == ">" ? Op::Gt
             : v == "<=" ? Op::Le : Op::Ge;
      } else {
        break;
      }
      left = binary(op, line, std::move(left), parse_additive());
    }
    return left;
  }

  NodePtr parse_additive() {
    auto left = parse_multiplicative();
    while (is(Tok::Additive)) {
      const Token& t = t_[cur_++];
      Op op = t.value == "+" ? Op::Add : t.value == "-" ? Op::Sub : Op::Concat;
      left = binary(op, t.line, std::move(left), parse_multiplicative());
    }
    return left;
  }

  NodePtr parse_multiplicative() {
    auto left = parse_power();
    while (is(Tok::Multiplicative)) {
      const Token& t = t_[cur_++];
      Op op = t.value == "*" ? Op::Mul : t.value == "/" ? Op::Div : t.value == "//" ? Op::FloorDiv : Op::Mod;
      left = binary(op, t.line, std::move(left), parse_power());
    }
    return left;
  }

  NodePtr parse_power() {
    auto left = parse_test();
    while (is(Tok::Power)) {
      std::uint32_t line = t_[cur_++].line;
      left = binary(Op::Pow, line, std::move(left), parse_test());
    }
    return left;
  }

  NodePtr parse_test() {
    auto operand = parse_filter();
    while (is_ident("is")) {
      std::uint32_t line = t_[cur_++].line;
      bool negate = is_ident("not");
      if (negate) ++cur_;
      auto name = parse_primary();
      if (name->kind != NK::Ident) fail_at("expected the name of a test after 'is'", line);
      Test test;
      if (!lookup_name(kTests, name->str, test)) fail_at("unknown test '" + name->str + "'", line);
      auto n = make(NK::TestExpr, line);
      n->flag = negate;
      n->code = static_cast<std::uint8_t>(test);
      n->str = name->str;
      n->a = std::move(operand);
      operand = finish(std::move(n));
    }
    return operand;
  }

  // `name` or `name(args)` after a pipe or {% filter %}.
  void parse_filter_spec(Node& n) {
    std::uint32_t line = this->line();
    auto name = parse_primary();
    if (name->kind != NK::Ident) fail_at("expected the name of a filter", line);
    Filter f;
    if (!lookup_name(kFilters, name->str, f)) fail_at("unknown filter '" + name->str + "'", line);
    n.code = static_cast<std::uint8_t>(f);
    n.str = name->str;
    if (is(Tok::OpenParen)) {
      n.flag = true;
      n.list = parse_args(false);
      if (is(Tok::Dot) || is(Tok::OpenSquare) || is(Tok::OpenParen)) {
        fail_at("unsupported expression after filter '" + name->str + "(...)'", line);
      }
    }
  }

  NodePtr parse_filter() {
    auto operand = parse_unary_sign();
    while (is(Tok::Pipe)) {
      std::uint32_t line = t_[cur_++].line;
      auto n = make(NK::FilterExpr, line);
      parse_filter_spec(*n);
      n->a = std::move(operand);
      operand = finish(std::move(n));
    }
    return operand;
  }

  NodePtr parse_unary_sign() {
    DepthGuard g(*this);
    if (cur_ < t_.size() && (t_[cur_].type == Tok::Unary || t_[cur_].type == Tok::Additive) &&
        (t_[cur_].value == "-" || t_[cur_].value == "+")) {
      const Token& t = t_[cur_++];
      auto n = make(NK::Unary, t.line);
      n->op = t.value == "-" ? Op::Neg : Op::Pos;
      n->a = parse_unary_sign();
      return finish(std::move(n));
    }
    return parse_call_member();
  }

  NodePtr parse_call_member() {
    auto member = parse_member(parse_primary());
    if (is(Tok::OpenParen)) return parse_call(std::move(member));
    return member;
  }

  NodePtr parse_call(NodePtr callee) {
    DepthGuard g(*this);
    auto n = make(NK::Call, line());
    n->a = std::move(callee);
    n->list = parse_args(false);
    NodePtr expr = parse_member(finish(std::move(n)));
    if (is(Tok::OpenParen)) expr = parse_call(std::move(expr));
    return expr;
  }

  NodeList parse_args(bool parameters) {
    expect(Tok::OpenParen, "'('");
    NodeList args;
    std::vector<std::string> param_names;
    bool saw_keyword = false, saw_spread = false;
    while (!is(Tok::CloseParen)) {
      if (cur_ >= t_.size()) fail("unexpected end of template in an argument list");
      const bool kw_spread = is(Tok::Power);
      const bool pos_spread = is(Tok::Multiplicative) && t_[cur_].value == "*";
      if (parameters && (kw_spread || pos_spread)) {
        fail("argument unpacking is not allowed in parameter declarations");
      }
      if (kw_spread) {
        std::uint32_t line = t_[cur_++].line;
        auto n = make(NK::KwSpread, line);
        n->a = parse_expression();
        args.push_back(finish(std::move(n)));
        if (is(Tok::Comma)) ++cur_;
        if (!is(Tok::CloseParen)) fail("'**' must be applied to the final argument");
        break;
      }
      NodePtr arg;
      if (pos_spread) {
        if (saw_spread) fail("only one '*' argument unpacking is allowed");
        saw_spread = true;
        std::uint32_t line = t_[cur_++].line;
        auto n = make(NK::Spread, line);
        n->a = parse_expression();
        arg = finish(std::move(n));
      } else {
        arg = parse_expression();
        if (is(Tok::Equals)) {
          ++cur_;
          if (arg->kind != NK::Ident) {
            fail(parameters ? "expected an identifier for a parameter declaration"
                            : "expected an identifier for a keyword argument");
          }
          auto n = make(NK::KwArg, arg->line);
          n->str = arg->str;
          n->id = arg->id;
          n->a = parse_expression();
          arg = finish(std::move(n));
        }
        if (parameters) {
          if (arg->kind != NK::Ident && arg->kind != NK::KwArg) {
            fail("expected an identifier for a parameter declaration");
          }
          if (std::find(param_names.begin(), param_names.end(), arg->str) != param_names.end()) {
            fail("duplicate parameter name: " + arg->str);
          }
          param_names.push_back(arg->str);
        }
        if (arg->kind == NK::KwArg) {
          saw_keyword = true;
        } else if (saw_keyword) {
          fail(parameters ? "non-default argument follows default argument"
                          : "positional arguments must come before keyword arguments");
        } else if (saw_spread) {
          fail("positional arguments must not follow '*' argument unpacking");
        }
      }
      args.push_back(std::move(arg));
      if (is(Tok::Comma)) ++cur_;
    }
    expect(Tok::CloseParen, "')'");
    return args;
  }

  NodePtr parse_subscript(std::uint32_t line) {
    NodeList slices;  // null entries are omitted parts
    bool is_slice = false;
    while (!is(Tok::CloseSquare)) {
      if (cur_ >= t_.size()) fail("unexpected end of template in a subscript");
      if (is(Tok::Colon)) {
        slices.push_back(nullptr);
        ++cur_;
        is_slice = true;
      } else {
        slices.push_back(parse_expression());
        if (is(Tok::Colon)) {
          ++cur_;
          is_slice = true;
        }
      }
    }
    if (slices.empty()) fail_at("expected at least one argument for a subscript", line);
    if (is_slice) {
      if (slices.size() > 3) fail_at("expected 0-3 arguments for a slice", line);
      auto n = make(NK::Slice, line);
      n->a = std::move(slices[0]);
      if (slices.size() > 1) n->b = std::move(slices[1]);
      if (slices.size() > 2) n->c = std::move(slices[2]);
      return finish(std::move(n));
    }
    return std::move(slices[0]);
  }

  NodePtr parse_member(NodePtr object) {
    while (is(Tok::Dot) || is(Tok::OpenSquare)) {
      const Token& t = t_[cur_++];
      auto n = make(NK::Member, t.line);
      if (t.type == Tok::OpenSquare) {
        n->flag = true;
        n->b = parse_subscript(t.line);
        expect(Tok::CloseSquare, "']'");
      } else {
        n->b = parse_primary();
        if (n->b->kind != NK::Ident && n->b->kind != NK::IntLit) {
          fail_at("expected an identifier or integer after '.'", t.line);
        }
      }
      n->a = std::move(object);
      object = finish(std::move(n));
    }
    return object;
  }

  NodePtr parse_primary() {
    if (cur_ >= t_.size()) fail("unexpected end of template in an expression");
    const Token& t = t_[cur_++];
    switch (t.type) {
      case Tok::Number: {
        bool is_float = t.value.find('.') != std::string::npos;
        auto n = make(is_float ? NK::FloatLit : NK::IntLit, t.line);
        n->num = std::strtod(t.value.c_str(), nullptr);
        return finish(std::move(n));
      }
      case Tok::String: {
        auto n = make(NK::StrLit, t.line);
        n->str = t.value;
        while (is(Tok::String)) n->str += t_[cur_++].value;
        return finish(std::move(n));
      }
      case Tok::Ident: {
        auto n = make(NK::Ident, t.line);
        n->str = t.value;
        n->id = intern(t.value);
        return finish(std::move(n));
      }
      case Tok::OpenParen: {
        auto e = parse_expression_sequence(false);
        expect(Tok::CloseParen, "')'");
        return e;
      }
      case Tok::OpenSquare: {
        auto n = make(NK::ArrayLit, t.line);
        while (!is(Tok::CloseSquare)) {
          if (cur_ >= t_.size()) fail("unexpected end of template in a list");
          n->list.push_back(parse_expression());
          if (is(Tok::Comma)) ++cur_;
        }
        ++cur_;
        return finish(std::move(n));
      }
      case Tok::OpenCurly: {
        auto n = make(NK::ObjectLit, t.line);
        while (!is(Tok::CloseCurly)) {
          if (cur_ >= t_.size()) fail("unexpected end of template in a mapping");
          n->list.push_back(parse_expression());
          expect(Tok::Colon, "':' between key and value");
          n->list2.push_back(parse_expression());
          if (is(Tok::Comma)) ++cur_;
        }
        ++cur_;
        return finish(std::move(n));
      }
      default:
        --cur_;
        fail("unexpected " + describe_current());
    }
  }

  std::vector<Token> t_;
  std::size_t cur_ = 0;
  int depth_ = 0;
  std::unordered_map<std::string, std::uint32_t>& names_;
};

// =============================================================================================
// Parse-time validation: calls of unknown functions or methods, macro special arguments
// =============================================================================================

// Which of `kwargs` / `varargs` a macro or call block body reads before declaring it
// (the reference's findAccessedSpecialMacroArguments, same visiting order).
class SpecialArgs {
 public:
  static void analyse(Node& owner, const NodeList& params, const NodeList& body) {
    SpecialArgs s;
    for (const auto& p : params) s.declare(p->str);
    for (const auto& st : body) s.visit(st.get());
    owner.uses_kwargs = s.kwargs_accessed_;
    owner.uses_varargs = s.varargs_accessed_;
  }

 private:
  void declare(const std::string& name) {
    if (name == "kwargs") kwargs_declared_ = true;
    if (name == "varargs") varargs_declared_ = true;
  }
  void declare_target(const Node* t) {
    if (!t) return;
    if (t->kind == NK::Ident) declare(t->str);
    if (t->kind == NK::TupleLit) {
      for (const auto& x : t->list) declare_target(x.get());
    }
  }
  void visit_defaults(const NodeList& params) {
    for (const auto& p : params) {
      if (p->kind == NK::KwArg) visit(p->a.get());
    }
  }
  void visit_list(const NodeList& l) {
    for (const auto& x : l) visit(x.get());
  }
  void visit(const Node* n) {
    if (!n) return;
    switch (n->kind) {
      case NK::For:
        declare_target(n->a.get());
        if (n->b->kind == NK::Select) {
          visit(n->b->a.get());
          visit_list(n->list);
          visit_list(n->list2);
          visit(n->b->b.get());
          return;
        }
        visit(n->b.get());
        visit_list(n->list);
        visit_list(n->list2);
        return;
      case NK::Set:
        declare_target(n->a.get());
        visit(n->b.get());
        visit_list(n->list);
        return;
      case NK::Macro:
        for (const auto& p : n->list) declare(p->str);
        visit_defaults(n->list);
        visit_list(n->list2);
        return;
      case NK::CallBlock:
        visit(n->a.get());
        for (const auto& p : n->list) declare(p->str);
        visit_defaults(n->list);
        visit_list(n->list2);
        return;
      case NK::FilterBlock:
        visit_list(n->list2);
        visit_list(n->list);  // filter arguments
        return;
      case NK::Ident:
        if (n->str == "kwargs" && !kwargs_declared_) kwargs_accessed_ = true;
        if (n->str == "varargs" && !varargs_declared_) varargs_accessed_ = true;
        return;
      case NK::Member:
        visit(n->a.get());
        if (n->flag) visit(n->b.get());
        return;
      case NK::FilterExpr:
        visit(n->a.get());
        visit_list(n->list);
        return;
      case NK::TestExpr:
        visit(n->a.get());
        return;
      case NK::Select:
        visit(n->b.get());
        visit(n->a.get());
        return;
      case NK::KwArg:
        visit(n->a.get());
        return;
      case NK::ObjectLit:
        for (std::size_t i = 0; i < n->list.size(); ++i) {
          visit(n->list[i].get());
          visit(n->list2[i].get());
        }
        return;
      case NK::Ternary:  // condition, true branch, false branch
        visit(n->a.get());
        visit(n->b.get());
        visit(n->c.get());
        return;
      default:
        visit(n->a.get());
        visit(n->b.get());
        visit(n->c.get());
        visit_list(n->list);
        visit_list(n->list2);
        return;
    }
  }

  bool kwargs_declared_ = false, varargs_declared_ = false;
  bool kwargs_accessed_ = false, varargs_accessed_ = false;
};

class Validator {
 public:
  void run(NodeList& program) {
    for (auto& n : program) collect(n.get());
    for (auto& n : program) check(n.get());
  }

 private:
  void bind_target(const Node* t) {
    if (!t) return;
    if (t->kind == NK::Ident) bound_.insert(t->str);
    if (t->kind == NK::TupleLit) {
      for (const auto& x : t->list) bind_target(x.get());
    }
    if (t->kind == NK::Member && t->b && t->b->kind == NK::Ident) attrs_.insert(t->b->str);
  }

  // Names that may hold a callable: macros, anything assigned or bound as a parameter, and
  // attribute names assigned or given to namespace()/object literals.
  void collect(const Node* n) {
    if (!n) return;
    switch (n->kind) {
      case NK::Macro:
        bound_.insert(n->str);
        attrs_.insert(n->str);
        for (const auto& p : n->list) bound_.insert(p->str);
        break;
      case NK::CallBlock:
        for (const auto& p : n->list) bound_.insert(p->str);
        break;
      case NK::Set:
      case NK::For:
        bind_target(n->a.get());
        break;
      case NK::KwArg:
        attrs_.insert(n->str);
        break;
      case NK::ObjectLit:
        for (const auto& k : n->list) {
          if (k->kind == NK::StrLit) attrs_.insert(k->str);
        }
        break;
      default:
        break;
    }
    for (const Node* c : {n->a.get(), n->b.get(), n->c.get()}) collect(c);
    for (const auto& c : n->list) collect(c.get());
    for (const auto& c : n->list2) collect(c.get());
  }

  [[noreturn]] static void fail(const std::string& msg, std::uint32_t line) {
    throw TemplateError("jinja: " + msg + " (line " + std::to_string(line) + ")");
  }

  void check_callee(Node& call) {
    Node* callee = call.a.get();
    if (callee->kind == NK::Ident) {
      const std::string& name = callee->str;
      if (name == "namespace" || name == "range" || name == "raise_exception" ||
          name == "strftime_now" || name == "caller" || bound_.count(name)) {
        return;
      }
      fail("unknown function '" + name + "()'", call.line);
    }
    if (callee->kind == NK::Member) {
      const Node* prop = callee->b.get();
      std::string name;
      if (!callee->flag && prop->kind == NK::Ident) name = prop->str;
      else if (callee->flag && prop->kind == NK::StrLit) name = prop->str;
      else return;  // computed at render time
      Method m;
      if (lookup_name(kStringMethods, name, m) || lookup_name(kObjectMethods, name, m)) {
        call.code = static_cast<std::uint8_t>(m);
        return;
      }
      if (attrs_.count(name)) return;
      fail("unknown method '" + name + "()'", call.line);
    }
  }

  void check(Node* n) {
    if (!n) return;
    switch (n->kind) {
      case NK::Call:
        check_callee(*n);
        break;
      case NK::CallBlock:
        check_callee(*n->a);
        SpecialArgs::analyse(*n, n->list, n->list2);
        break;
      case NK::Macro:
        SpecialArgs::analyse(*n, n->list, n->list2);
        break;
      case NK::FilterExpr:
      case NK::FilterBlock: {
        auto f = static_cast<Filter>(n->code);
        if ((f == Filter::Selectattr || f == Filter::Rejectattr) && n->list.size() >= 2 &&
            n->list[1]->kind == NK::StrLit) {
          Test t;
          if (!lookup_name(kTests, n->list[1]->str, t)) {
            fail("unknown test '" + n->list[1]->str + "'", n->line);
          }
        }
        break;
      }
      default:
        break;
    }
    for (Node* c : {n->a.get(), n->b.get(), n->c.get()}) check(c);
    for (auto& c : n->list) check(c.get());
    for (auto& c : n->list2) check(c.get());
  }

  std::unordered_set<std::string> bound_;
  std::unordered_set<std::string> attrs_;
};

// =============================================================================================
// Runtime values
// =============================================================================================

// Heap objects of one render: non-atomic reference counts (they never leave the render call).
struct HeapObj {
  std::uint32_t rc = 0;
  virtual ~HeapObj() = default;
};

template <class T>
class Rc {
 public:
  Rc() = default;
  explicit Rc(T* p) : p_(p) {
    if (p_) ++p_->rc;
  }
  Rc(const Rc& o) : p_(o.p_) {
    if (p_) ++p_->rc;
  }
  Rc(Rc&& o) noexcept : p_(o.p_) { o.p_ = nullptr; }
  template <class U>
  Rc(const Rc<U>& o) : p_(o.get()) {  // NOLINT: implicit upcast
    if (p_) ++p_->rc;
  }
  Rc& operator=(Rc o) noexcept {
    std::swap(p_, o.p_);
    return *this;
  }
  ~Rc() { reset(); }
  void reset() {
    if (p_ && --p_->rc == 0) delete p_;
    p_ = nullptr;
  }
  T* get() const { return p_; }
  T* operator->() const { return p_; }
  T& operator*() const { return *p_; }
  explicit operator bool() const { return p_ != nullptr; }

 private:
  T* p_ = nullptr;
};

enum class VK : std::uint8_t { Undef, None, Bool, Int, Float, Str, Array, Object, Ns, Func };

struct ArrObj;
struct ObjObj;
struct FuncObj;

struct Value {
  VK k = VK::Undef;
  bool b = false;
  double n = 0;
  std::string_view s;  // Str: the characters (owned by h, the template or the context)
  Rc<HeapObj> h;       // Str: owner (may be null); Array/Object/Ns/Func: the object

  bool is_undef() const { return k == VK::Undef; }
  bool is_none() const { return k == VK::None; }
  bool is_num() const { return k == VK::Int || k == VK::Float; }
  bool is_str() const { return k == VK::Str; }
  ArrObj& arr() const;
  ObjObj& obj() const;
  FuncObj& fn() const;
};

struct StrObj : HeapObj {
  std::string s;
};

struct ArrObj : HeapObj {
  std::vector<Value> v;
  bool tuple = false;
};

struct Key {
  std::string_view s;
  Rc<HeapObj> owner;
};

// Ordered mapping (ObjectValue, NamespaceValue, keyword arguments): insertion order, like a
// JavaScript Map. Mappings with many keys get a hash index.
struct ObjObj : HeapObj {
  std::vector<std::pair<Key, Value>> e;
  std::unordered_map<std::string_view, std::uint32_t> idx;

  static constexpr std::size_t kIndexFrom = 12;

  const Value* find(std::string_view key) const {
    if (e.size() >= kIndexFrom) {
      auto it = idx.find(key);
      return it == idx.end() ? nullptr : &e[it->second].second;
    }
    for (const auto& kv : e) {
      if (kv.first.s == key) return &kv.second;
    }
    return nullptr;
  }
  Value* find(std::string_view key) { return const_cast<Value*>(std::as_const(*this).find(key)); }

  void set(Key key, Value v) {
    if (Value* existing = find(key.s)) {
      *existing = std::move(v);
      return;
    }
    e.emplace_back(std::move(key), std::move(v));
    if (e.size() == kIndexFrom) {
      for (std::uint32_t i = 0; i < e.size(); ++i) idx.emplace(e[i].first.s, i);
    } else if (e.size() > kIndexFrom) {
      idx.emplace(e.back().first.s, static_cast<std::uint32_t>(e.size() - 1));
    }
  }
  // Appends a key known to be new (input objects have unique keys).
  void append_new(Key key, Value v) { set(std::move(key), std::move(v)); }
};

struct Env;

enum class FK : std::uint8_t { Namespace, RaiseException, Range, StrftimeNow, Macro, Caller, Method };

struct FuncObj : HeapObj {
  FK kind;
  const Node* node = nullptr;  // Macro, Caller (the call block)
  Rc<Env> env;                 // Caller: the scope of the call block
  Value self;                  // Method: the receiver
  Method method = Method::None;
};

struct Env : HeapObj {
  Rc<Env> parent;
  std::vector<std::pair<std::uint32_t, Value>> vars;

  void set(std::uint32_t id, Value v) {
    for (auto& kv : vars) {
      if (kv.first == id) {
        kv.second = std::move(v);
        return;
      }
    }
    vars.emplace_back(id, std::move(v));
  }
  const Value* lookup(std::uint32_t id) const {
    for (const Env* e = this; e; e = e->parent.get()) {
      for (const auto& kv : e->vars) {
        if (kv.first == id) return &kv.second;
      }
    }
    return nullptr;
  }
};

ArrObj& Value::arr() const { return *static_cast<ArrObj*>(h.get()); }
ObjObj& Value::obj() const { return *static_cast<ObjObj*>(h.get()); }
FuncObj& Value::fn() const { return *static_cast<FuncObj*>(h.get()); }

Value make_bool(bool b) {
  Value v;
  v.k = VK::Bool;
  v.b = b;
  return v;
}
Value make_int(double n) {
  Value v;
  v.k = VK::Int;
  v.n = n;
  return v;
}
Value make_float(double n) {
  Value v;
  v.k = VK::Float;
  v.n = n;
  return v;
}
Value make_none() {
  Value v;
  v.k = VK::None;
  return v;
}
// A string whose characters outlive the render (template text, context) or are owned by `owner`.
Value make_str_view(std::string_view s, Rc<HeapObj> owner = {}) {
  Value v;
  v.k = VK::Str;
  v.s = s;
  v.h = std::move(owner);
  return v;
}
// A number from the context or range(): an integer if it has an integral value.
Value make_number(double d) {
  if (std::isfinite(d) && std::floor(d) == d) return make_int(d);
  return make_float(d);
}

const char* type_name(const Value& v) {
  switch (v.k) {
    case VK::Undef: return "UndefinedValue";
    case VK::None: return "NullValue";
    case VK::Bool: return "BooleanValue";
    case VK::Int: return "IntegerValue";
    case VK::Float: return "FloatValue";
    case VK::Str: return "StringValue";
    case VK::Array: return v.arr().tuple ? "TupleValue" : "ArrayValue";
    case VK::Object: return "ObjectValue";
    case VK::Ns: return "NamespaceValue";
    case VK::Func: return "FunctionValue";
  }
  return "?";
}

// Python-like truthiness of the reference (__bool__).
bool truthy(const Value& v) {
  switch (v.k) {
    case VK::Undef:
    case VK::None: return false;
    case VK::Bool: return v.b;
    case VK::Int:
    case VK::Float: return v.n != 0 && !std::isnan(v.n);
    case VK::Str: return !v.s.empty();
    case VK::Array: return !v.arr().v.empty();
    case VK::Object: return !v.obj().e.empty();
    case VK::Ns:
    case VK::Func: return true;
  }
  return false;
}

// JavaScript truthiness of the underlying value (objects and arrays are always true).
bool raw_truthy(const Value& v) {
  if (v.k == VK::Array || v.k == VK::Object) return true;
  return truthy(v);
}

enum class Flow : std::uint8_t { Normal, Break, Continue };

// break/continue leaving a macro or caller body, caught by the nearest enclosing loop.
struct LoopSignal {
  Flow flow;
};

struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<Key, Value>> kw;
  std::vector<Value> keep;  // keeps ** sources alive (their keys are views)

  const Value* kwarg(std::string_view name) const {
    for (const auto& kv : kw) {
      if (kv.first.s == name) return &kv.second;
    }
    return nullptr;
  }
};

}  // namespace

// =============================================================================================
// Template::Impl
// =============================================================================================

struct Template::Impl {
  std::string source;
  NodeList body;
  std::unordered_map<std::string, std::uint32_t> names;
};

namespace {

// =============================================================================================
// Interpreter
// =============================================================================================

[[noreturn]] void fail(const std::string& msg) { throw RenderError(msg); }

struct JsonOpts {
  int indent = 0;  // 0: no pretty printing
  bool ensure_ascii = false;
  bool sort_keys = false;
  std::string_view item_sep = ", ";
  std::string_view key_sep = ": ";
};

bool is_array_index_key(std::string_view k, std::uint32_t& out) {
  if (k.empty() || k.size() > 10) return false;
  if (k.size() > 1 && k[0] == '0') return false;
  std::uint64_t v = 0;
  for (char c : k) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<std::uint64_t>(c - '0');
  }
  if (v > 4294967294ULL) return false;
  out = static_cast<std::uint32_t>(v);
  return true;
}

class Renderer {
 public:
  Renderer(const Template::Impl& t, const RenderOptions& o) : t_(t), opts_(o) {}

  ~Renderer() {
    // Break any reference cycle (only mutable containers can close one).
    for (auto& ns : namespaces_) ns->e.clear(), ns->idx.clear();
    for (auto& env : captured_envs_) env->vars.clear();
  }

  template <class J>
  std::string render(const J& context) {
    Rc<Env> global(new Env());
    static constexpr std::uint32_t kBuiltinFns[][2] = {
        {kIdNamespace, static_cast<std::uint32_t>(FK::Namespace)},
        {kIdRaiseException, static_cast<std::uint32_t>(FK::RaiseException)},
        {kIdRange, static_cast<std::uint32_t>(FK::Range)},
        {kIdStrftimeNow, static_cast<std::uint32_t>(FK::StrftimeNow)},
    };
    for (const auto& [id, kind] : kBuiltinFns) {
      auto* f = new FuncObj();
      f->kind = static_cast<FK>(kind);
      Value v;
      v.k = VK::Func;
      v.h = Rc<HeapObj>(f);
      global->vars.emplace_back(id, std::move(v));
    }
    global->vars.emplace_back(kIdTrue, make_bool(true));
    global->vars.emplace_back(kIdFalse, make_bool(false));
    global->vars.emplace_back(kIdNone, make_none());
    global->vars.emplace_back(kIdTrueTitle, make_bool(true));
    global->vars.emplace_back(kIdFalseTitle, make_bool(false));
    global->vars.emplace_back(kIdNoneTitle, make_none());

    if (context.is_object()) {
      for (auto it = context.begin(); it != context.end(); ++it) {
        const std::string& key = it.key();
        for (std::uint32_t i = 0; i < kNumFixedIds; ++i) {
          if (i == kIdLoop || i == kIdCaller || i == kIdKwargs || i == kIdVarargs) continue;
          if (key == kFixedNames[i]) fail("Variable already declared: " + key);
        }
        auto found = t_.names.find(key);
        if (found == t_.names.end()) continue;  // the template never reads it
        global->set(found->second, from_json(it.value(), 0));
      }
    } else if (!context.is_null()) {
      fail("the render context must be a JSON object");
    }

    std::string out;
    out.reserve(t_.source.size() + 1024);
    Flow flow;
    try {
      flow = exec_block(t_.body, *global, out);
    } catch (const LoopSignal&) {
      flow = Flow::Break;
    }
    if (flow != Flow::Normal) fail("'break' or 'continue' outside of a loop");
    return out;
  }

 private:
  // ------------------------------------------------------------------------------------------
  // Bookkeeping and bounds
  // ------------------------------------------------------------------------------------------

  struct DepthGuard {
    Renderer& r;
    explicit DepthGuard(Renderer& renderer) : r(renderer) {
      if (++r.depth_ > Limits::kMaxRenderDepth) {
        --r.depth_;
        fail("template recursion is too deep (more than " +
             std::to_string(Limits::kMaxRenderDepth) + " levels)");
      }
    }
    ~DepthGuard() { --r.depth_; }
  };

  void count_iteration() {
    if (++iterations_ > Limits::kMaxIterations) {
      fail("too many loop iterations and macro calls (more than " +
           std::to_string(Limits::kMaxIterations) + ")");
    }
  }

  void charge(std::size_t bytes) {
    built_ += bytes;
    if (built_ > Limits::kMaxBuiltBytes) fail("template built too much data while rendering");
  }

  static void check_size(const std::string& s) {
    if (s.size() > Limits::kMaxOutputBytes) {
      fail("rendered text is larger than " + std::to_string(Limits::kMaxOutputBytes) + " bytes");
    }
  }

  Value make_str(std::string s) {
    check_size(s);
    charge(s.size());
    auto* o = new StrObj();
    o->s = std::move(s);
    Rc<HeapObj> h(o);
    return make_str_view(o->s, std::move(h));
  }

  Value make_array(std::vector<Value> items, bool tuple = false) {
    charge(items.size() * sizeof(Value));
    auto* a = new ArrObj();
    a->v = std::move(items);
    a->tuple = tuple;
    Value v;
    v.k = VK::Array;
    v.h = Rc<HeapObj>(a);
    return v;
  }

  Value make_object(ObjObj* o, VK kind = VK::Object) {
    charge(o->e.size() * (sizeof(Value) + sizeof(Key)));
    Value v;
    v.k = kind;
    v.h = Rc<HeapObj>(o);
    if (kind == VK::Ns) namespaces_.push_back(Rc<ObjObj>(o));
    return v;
  }

  static Key key_of(const Value& str) { return Key{str.s, str.h}; }

  // ------------------------------------------------------------------------------------------
  // Context conversion (convertToRuntimeValues)
  // ------------------------------------------------------------------------------------------

  template <class J>
  Value from_json(const J& j, int depth) {
    if (depth > Limits::kMaxValueDepth) fail("input nesting is too deep");
    switch (j.type()) {
      case nlohmann::json::value_t::null: return make_none();
      case nlohmann::json::value_t::boolean: return make_bool(j.template get<bool>());
      case nlohmann::json::value_t::number_integer:
        return make_int(static_cast<double>(j.template get<std::int64_t>()));
      case nlohmann::json::value_t::number_unsigned:
        return make_int(static_cast<double>(j.template get<std::uint64_t>()));
      case nlohmann::json::value_t::number_float: return make_number(j.template get<double>());
      case nlohmann::json::value_t::string:
        return make_str_view(j.template get_ref<const std::string&>());
      case nlohmann::json::value_t::array: {
        std::vector<Value> items;
        items.reserve(j.size());
        for (const auto& x : j) items.push_back(from_json(x, depth + 1));
        return make_array(std::move(items));
      }
      case nlohmann::json::value_t::object: {
        auto* o = new ObjObj();
        Value result = make_object(o);
        o->e.reserve(j.size());
        // JavaScript objects list integer-like keys first, in numeric order.
        std::vector<std::pair<std::uint32_t, const std::string*>> index_keys;
        for (auto it = j.begin(); it != j.end(); ++it) {
          std::uint32_t n;
          if (is_array_index_key(it.key(), n)) index_keys.emplace_back(n, &it.key());
        }
        if (!index_keys.empty()) {
          std::sort(index_keys.begin(), index_keys.end());
          for (const auto& [n, key] : index_keys) {
            o->append_new(Key{*key, {}}, from_json(j.at(*key), depth + 1));
          }
        }
        for (auto it = j.begin(); it != j.end(); ++it) {
          std::uint32_t n;
          if (!index_keys.empty() && is_array_index_key(it.key(), n)) continue;
          o->append_new(Key{it.key(), {}}, from_json(it.value(), depth + 1));
        }
        charge(o->e.size() * (sizeof(Value) + sizeof(Key)));
        return result;
      }
      default:
        fail("unsupported JSON value in the render context (binary or discarded)");
    }
  }

  // ------------------------------------------------------------------------------------------
  // Strings of values
  // ------------------------------------------------------------------------------------------

  // RuntimeValue.toString(): what {{ }} prints.
  void append_display(std::string& out, const Value& v, int depth = 0) {
    switch (v.k) {
      case VK::Undef:
        if (v.b) fail("Cannot read properties of undefined (reading 'type')");
        out += "undefined";
        return;
      case VK::None: out += "null"; return;
      case VK::Bool: out += v.b ? "true" : "false"; return;
      case VK::Int: append_js_number(out, v.n); return;
      case VK::Float: append_float_display(out, v.n); return;
      case VK::Str: out.append(v.s); return;
      case VK::Array:
      case VK::Object:
      case VK::Ns: to_json(out, v, JsonOpts{}, depth, false); return;
      case VK::Func: fail("cannot print a function or macro (call it)");
    }
  }

  // String(value.value): what `~`, `+` and join use for the underlying JavaScript value.
  void append_raw(std::string& out, const Value& v) {
    switch (v.k) {
      case VK::Int:
      case VK::Float: append_js_number(out, v.n); return;
      case VK::Array: {
        const auto& items = v.arr().v;
        for (std::size_t i = 0; i < items.size(); ++i) {
          if (i) out += ',';
          if (!(items[i].k == VK::Undef && items[i].b)) append_display(out, items[i], 1);
          check_size(out);
        }
        return;
      }
      case VK::Object:
      case VK::Ns: out += "[object Map]"; return;
      default: append_display(out, v); return;
    }
  }

  std::string raw_string(const Value& v) {
    std::string s;
    append_raw(s, v);
    return s;
  }

  void to_json(std::string& out, const Value& v, const JsonOpts& o, int depth, bool undef_null) {
    if (depth > Limits::kMaxValueDepth) fail("value nesting is too deep to convert to JSON");
    switch (v.k) {
      case VK::None: out += "null"; return;
      case VK::Undef:
        if (v.b) fail("Cannot read properties of undefined (reading 'type')");
        out += undef_null ? "null" : "undefined";
        return;
      case VK::Int:
      case VK::Float:
        if (std::isfinite(v.n)) append_js_number(out, v.n);
        else out += "null";
        return;
      case VK::Bool: out += v.b ? "true" : "false"; return;
      case VK::Str: append_json_string(out, v.s, o.ensure_ascii); return;
      case VK::Func: fail("Cannot convert to JSON: FunctionValue");
      case VK::Array:
      case VK::Object:
      case VK::Ns: break;
    }
    if (v.k == VK::Array && v.arr().tuple) fail("Cannot convert to JSON: TupleValue");
    const std::string indent_str(static_cast<std::size_t>(o.indent), ' ');
    auto pad = [&](int d) {
      out += '\n';
      for (int i = 0; i < d; ++i) out += indent_str;
    };
    if (v.k == VK::Array) {
      const auto& items = v.arr().v;
      out += '[';
      for (std::size_t i = 0; i < items.size(); ++i) {
        if (i) out += o.item_sep;
        if (o.indent) pad(depth + 1);
        to_json(out, items[i], o, depth + 1, undef_null);
        check_size(out);
      }
      if (o.indent && !items.empty()) pad(depth);
      out += ']';
      return;
    }
    const auto& entries = v.obj().e;
    std::vector<std::size_t> order(entries.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    if (o.sort_keys) {
      std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
        return locale_compare(entries[a].first.s, entries[b].first.s) < 0;
      });
    }
    out += '{';
    for (std::size_t i = 0; i < order.size(); ++i) {
      if (i) out += o.item_sep;
      if (o.indent) pad(depth + 1);
      const auto& kv = entries[order[i]];
      append_json_string(out, kv.first.s, o.ensure_ascii);
      out += o.key_sep;
      to_json(out, kv.second, o, depth + 1, undef_null);
      check_size(out);
    }
    if (o.indent && !entries.empty()) pad(depth);
    out += '}';
  }

  // ------------------------------------------------------------------------------------------
  // Statements
  // ------------------------------------------------------------------------------------------

  Flow exec_block(const NodeList& body, Env& env, std::string& out) {
    for (const auto& st : body) {
      Flow f = exec(*st, env, out);
      if (f != Flow::Normal) return f;
    }
    return Flow::Normal;
  }

  Flow exec(const Node& n, Env& env, std::string& out) {
    DepthGuard guard(*this);
    switch (n.kind) {
      case NK::Text:
        out += n.str;
        check_size(out);
        return Flow::Normal;
      case NK::Comment:
        return Flow::Normal;
      case NK::If:
        return exec_block(truthy(eval(*n.a, env)) ? n.list : n.list2, env, out);
      case NK::For:
        return exec_for(n, env, out);
      case NK::Set:
        return exec_set(n, env);
      case NK::Macro: {
        auto* f = new FuncObj();
        f->kind = FK::Macro;
        f->node = &n;
        Value v;
        v.k = VK::Func;
        v.h = Rc<HeapObj>(f);
        env.set(n.id, std::move(v));
        return Flow::Normal;
      }
      case NK::CallBlock:
        return exec_call_block(n, env, out);
      case NK::FilterBlock: {
        std::string body;
        Flow f = exec_block(n.list2, env, body);
        if (f != Flow::Normal) return f;
        Value rendered = make_str(std::move(body));
        Value result = apply_filter(rendered, n, env);
        if (!result.is_undef() && !result.is_none()) append_display(out, result);
        check_size(out);
        return Flow::Normal;
      }
      case NK::Break:
        return Flow::Break;
      case NK::Continue:
        return Flow::Continue;
      default:
        break;
    }
    // An expression: print it.
    if (n.kind == NK::Binary && (n.op == Op::Add || n.op == Op::Concat)) {
      Value v = eval_additive_chain(n, env, &out);
      if (!v.is_undef() && !v.is_none()) append_display(out, v);
    } else {
      Value v = eval(n, env);
      if (!v.is_undef() && !v.is_none()) append_display(out, v);
    }
    check_size(out);
    return Flow::Normal;
  }

  void bind_loop_var(const Node& target, const Value& item, Env& scope) {
    if (target.kind == NK::Ident) {
      scope.set(target.id, plain(item));
      return;
    }
    const auto& items = item.arr().v;  // checked before the loop runs
    for (std::size_t j = 0; j < target.list.size(); ++j) {
      const Node& t = *target.list[j];
      if (t.kind != NK::Ident) fail(std::string("Cannot unpack non-identifier type: ") + kind_name(t));
      scope.set(t.id, plain(items[j]));
    }
  }

  static const char* kind_name(const Node& n) {
    switch (n.kind) {
      case NK::IntLit: return "IntegerLiteral";
      case NK::FloatLit: return "FloatLiteral";
      case NK::StrLit: return "StringLiteral";
      case NK::ArrayLit: return "ArrayLiteral";
      case NK::TupleLit: return "TupleLiteral";
      case NK::ObjectLit: return "ObjectLiteral";
      case NK::Ident: return "Identifier";
      case NK::Member: return "MemberExpression";
      case NK::Call: return "CallExpression";
      default: return "Expression";
    }
  }

  Flow exec_for(const Node& n, Env& env, std::string& out) {
    Rc<Env> scope(new Env());
    scope->parent = Rc<Env>(&env);
    const Node* test = nullptr;
    Value iterable;
    if (n.b->kind == NK::Select) {
      iterable = eval(*n.b->a, *scope);
      test = n.b->b.get();
    } else {
      iterable = eval(*n.b, *scope);
    }
    if (iterable.k != VK::Array && iterable.k != VK::Object) {
      fail(std::string("Expected iterable or object type in for loop: got ") + type_name(iterable));
    }
    if (iterable.k == VK::Object) iterable = keys_of(iterable);
    const std::vector<Value>& all = iterable.arr().v;

    const Node& target = *n.a;
    // The reference prepares every item (unpacking checks, the `if` filter) before the body runs.
    if (target.kind == NK::TupleLit) {
      for (const Value& item : all) {
        if (item.k != VK::Array || item.arr().tuple) {
          fail(std::string("Cannot unpack non-iterable type: ") + type_name(item));
        }
        std::size_t have = item.arr().v.size(), want = target.list.size();
        if (have != want) fail(std::string("Too ") + (want > have ? "few" : "many") + " items to unpack");
      }
    }
    std::vector<Value> filtered;
    const std::vector<Value>* items = &all;
    if (test) {
      for (const Value& item : all) {
        count_iteration();
        Rc<Env> loop_scope(new Env());
        loop_scope->parent = scope;
        bind_loop_var(target, item, *loop_scope);
        if (truthy(eval(*test, *loop_scope))) filtered.push_back(item);
      }
      items = &filtered;
    }

    const std::size_t count = items->size();
    bool no_iteration = true;
    Rc<ObjObj> loop_obj;
    for (std::size_t i = 0; i < count; ++i) {
      count_iteration();
      // `loop` is rebuilt for every iteration; reuse the object when nothing kept the last one.
      if (!loop_obj || loop_obj->rc != 2) {
        loop_obj = Rc<ObjObj>(new ObjObj());
        static constexpr std::string_view kLoopKeys[] = {"index",     "index0", "revindex",
                                                         "revindex0", "first",  "last",
                                                         "length",    "previtem", "nextitem"};
        for (auto k : kLoopKeys) loop_obj->e.emplace_back(Key{k, {}}, Value{});
      }
      auto& e = loop_obj->e;
      const double di = static_cast<double>(i), dn = static_cast<double>(count);
      e[0].second = make_int(di + 1);
      e[1].second = make_int(di);
      e[2].second = make_int(dn - di);
      e[3].second = make_int(dn - di - 1);
      e[4].second = make_bool(i == 0);
      e[5].second = make_bool(i + 1 == count);
      e[6].second = make_int(dn);
      e[7].second = i > 0 ? (*items)[i - 1] : Value{};
      e[8].second = i + 1 < count ? (*items)[i + 1] : Value{};
      Value loop_value;
      loop_value.k = VK::Object;
      loop_value.h = Rc<HeapObj>(loop_obj);
      scope->set(kIdLoop, std::move(loop_value));  // the scope and loop_obj hold it: rc == 2
      bind_loop_var(target, (*items)[i], *scope);

      const std::size_t mark = out.size();
      Flow f;
      try {
        f = exec_block(n.list, *scope, out);
      } catch (const LoopSignal& s) {
        f = s.flow;
      }
      if (f == Flow::Continue) {
        out.resize(mark);
        continue;
      }
      if (f == Flow::Break) {
        out.resize(mark);
        break;
      }
      no_iteration = false;
    }
    if (no_iteration) return exec_block(n.list2, *scope, out);
    return Flow::Normal;
  }

  Flow exec_set(const Node& n, Env& env) {
    Value rhs;
    const Node& target = *n.a;
    if (n.b && try_append_in_place(n, env)) return Flow::Normal;
    if (n.b) {
      // A namespace attribute keeps JavaScript's undefined as the reference's Map does; a
      // variable reads back as undefined.
      rhs = target.kind == NK::TupleLit ? eval(*n.b, env)
            : target.kind == NK::Member ? eval_raw(*n.b, env)
                                        : plain(eval_raw(*n.b, env));
    } else {
      std::string body;
      Flow f = exec_block(n.list, env, body);
      if (f != Flow::Normal) return f;
      rhs = make_str(std::move(body));
    }
    if (target.kind == NK::Ident) {
      env.set(target.id, std::move(rhs));
    } else if (target.kind == NK::TupleLit) {
      if (rhs.k != VK::Array) fail(std::string("Cannot unpack non-iterable type in set: ") + type_name(rhs));
      const auto& items = rhs.arr().v;
      if (items.size() != target.list.size()) {
        fail(std::string("Too ") + (target.list.size() > items.size() ? "few" : "many") +
             " items to unpack in set");
      }
      for (std::size_t i = 0; i < items.size(); ++i) {
        const Node& t = *target.list[i];
        if (t.kind != NK::Ident) fail(std::string("Cannot unpack to non-identifier in set: ") + kind_name(t));
        env.set(t.id, items[i]);
      }
    } else if (target.kind == NK::Member) {
      Value object = eval(*target.a, env);
      if (object.k != VK::Ns) fail("cannot assign attribute on non-namespace object");
      if (target.b->kind != NK::Ident) fail("Cannot assign to member with non-identifier property");
      object.obj().set(Key{target.b->str, {}}, std::move(rhs));
    } else {
      fail("Invalid LHS inside assignment expression");
    }
    return Flow::Normal;
  }

  Flow exec_call_block(const Node& n, Env& env, std::string& out) {
    auto* f = new FuncObj();
    f->kind = FK::Caller;
    f->node = &n;
    f->env = Rc<Env>(&env);
    Value caller;
    caller.k = VK::Func;
    caller.h = Rc<HeapObj>(f);
    captured_envs_.push_back(f->env);

    const Node& call = *n.a;
    Args args = eval_args(call.list, env);
    Value fn = eval(*call.a, env);
    if (fn.k != VK::Func) fail(std::string("Cannot call something that is not a function: got ") + type_name(fn));
    Rc<Env> call_env(new Env());
    call_env->parent = Rc<Env>(&env);
    call_env->set(kIdCaller, std::move(caller));
    Value result = call_function(fn, std::move(args), *call_env, true);
    if (!result.is_undef() && !result.is_none()) append_display(out, result);
    check_size(out);
    return Flow::Normal;
  }

  // ------------------------------------------------------------------------------------------
  // Expressions
  // ------------------------------------------------------------------------------------------

  // `[] | first` is JavaScript's undefined itself in the reference, not an UndefinedValue:
  // storing it ({% set %}, a mapping value, a macro argument) gives an undefined variable,
  // almost anything else fails. eval_raw() may return it (an Undef with b set); eval() fails.
  static bool is_raw_undef(const Value& v) { return v.k == VK::Undef && v.b; }
  static Value plain(Value v) {
    if (is_raw_undef(v)) v.b = false;
    return v;
  }

  Value eval(const Node& n, Env& env) {
    Value v = eval_raw(n, env);
    if (is_raw_undef(v)) fail("Cannot read properties of undefined (reading 'type')");
    return v;
  }

  Value eval_raw(const Node& n, Env& env) {
    DepthGuard guard(*this);
    switch (n.kind) {
      case NK::IntLit: return make_int(n.num);
      case NK::FloatLit: return make_float(n.num);
      case NK::StrLit: return make_str_view(n.str);
      case NK::ArrayLit:
      case NK::TupleLit: {
        std::vector<Value> items;
        items.reserve(n.list.size());
        for (const auto& x : n.list) items.push_back(eval_raw(*x, env));
        return make_array(std::move(items), n.kind == NK::TupleLit);
      }
      case NK::ObjectLit: {
        auto* o = new ObjObj();
        Value result = make_object(o);
        for (std::size_t i = 0; i < n.list.size(); ++i) {
          Value key = eval(*n.list[i], env);
          if (key.k != VK::Str) fail(std::string("Object keys must be strings: got ") + type_name(key));
          o->set(key_of(key), eval_raw(*n.list2[i], env));
        }
        return result;
      }
      case NK::Ident: {
        const Value* v = env.lookup(n.id);
        return v ? plain(*v) : Value{};
      }
      case NK::Member: return eval_member(n, env);
      case NK::Call: return eval_call(n, env);
      case NK::Unary: {
        Value arg = eval(*n.a, env);
        if (n.op == Op::Not) return make_bool(!truthy(arg));
        double sign = n.op == Op::Neg ? -1 : 1;
        if (arg.is_num() || arg.k == VK::Bool) {
          double x = arg.k == VK::Bool ? (arg.b ? 1 : 0) : arg.n;
          return arg.k == VK::Float ? make_float(sign * x) : make_int(sign * x);
        }
        fail(std::string("Unknown operator \"") + op_text(n.op) + "\" for " + type_name(arg));
      }
      case NK::Binary:
        if (n.op == Op::And) {
          Value left = eval(*n.a, env);
          return truthy(left) ? eval_raw(*n.b, env) : left;
        }
        if (n.op == Op::Or) {
          Value left = eval(*n.a, env);
          return truthy(left) ? left : eval_raw(*n.b, env);
        }
        if (n.op == Op::Add || n.op == Op::Concat) return eval_additive_chain(n, env, nullptr);
        {
          Value left = eval(*n.a, env);
          Value right = eval(*n.b, env);
          return binary(n.op, left, right);
        }
      case NK::FilterExpr: {
        Value operand = eval_raw(*n.a, env);
        if (is_raw_undef(operand)) {
          const auto f = static_cast<Filter>(n.code);
          if (f == Filter::Safe) return operand;
          if (f == Filter::Default && n.flag) {
            eval_args(n.list, env);
            return operand;
          }
          fail("Cannot read properties of undefined (reading 'type')");
        }
        return apply_filter(operand, n, env);
      }
      case NK::TestExpr: {
        Value operand = eval(*n.a, env);
        bool r = run_test(static_cast<Test>(n.code), operand, nullptr);
        return make_bool(n.flag ? !r : r);
      }
      case NK::Select:
        if (!truthy(eval(*n.b, env))) return Value{};
        return eval_raw(*n.a, env);
      case NK::Ternary:
        return truthy(eval(*n.a, env)) ? eval_raw(*n.b, env) : eval_raw(*n.c, env);
      default:
        fail("unexpected expression");
    }
  }

  // a + b ~ c ... : left to right; once the left side is a string, append in place (into the
  // output directly when printing: a failure aborts the whole render anyway).
  Value eval_additive_chain(const Node& n, Env& env, std::string* sink) {
    const Node* chain[64];
    std::size_t len = 0;
    const Node* cur = &n;
    while (cur->kind == NK::Binary && (cur->op == Op::Add || cur->op == Op::Concat || cur->op == Op::Sub) &&
           len < 63) {
      chain[len++] = cur;
      cur = cur->a.get();
    }
    // chain[len-1] is the innermost: its left operand is `cur`.
    Value acc = eval(*cur, env);
    std::size_t i = len;
    while (i > 0 && acc.k != VK::Str) {
      const Node* op = chain[--i];
      Value right = eval(*op->b, env);
      acc = binary(op->op, acc, right);
    }
    if (i == 0) return acc;
    std::string local;
    std::string* buf = sink ? sink : &local;
    const std::size_t start = buf->size();
    buf->append(acc.s);
    append_chain_rest(chain, i, env, *buf);
    if (sink) {
      charge(buf->size() - start);
      return Value{};  // already printed
    }
    return make_str(std::move(local));
  }

  // Appends the right operands chain[i-1] ... chain[0] to `buf`, whose text is the string the
  // chain has built so far.
  void append_chain_rest(const Node* const* chain, std::size_t i, Env& env, std::string& buf) {
    while (i > 0) {
      const Node* op = chain[--i];
      Value right = eval(*op->b, env);
      if (op->op == Op::Sub || right.is_undef() || right.is_none()) {
        // Not a concatenation: binary() raises the reference's error (the left side is a string).
        binary(op->op, make_str_view(""), right);
        fail("unexpected operand");
      }
      append_raw(buf, right);
      check_size(buf);
    }
  }

  // {% set x = x + ... %} and {% set ns.x = ns.x + ... %} on a string nobody else holds: append
  // in place (linear, as the reference's string ropes are) instead of copying the string each
  // time. Returns false when the pattern does not apply (the caller then evaluates normally).
  bool try_append_in_place(const Node& n, Env& env) {
    const Node& target = *n.a;
    const Node* rhs = n.b.get();
    if (!rhs || rhs->kind != NK::Binary || (rhs->op != Op::Add && rhs->op != Op::Concat)) return false;
    const Node* chain[64];
    std::size_t len = 0;
    const Node* cur = rhs;
    while (cur->kind == NK::Binary && (cur->op == Op::Add || cur->op == Op::Concat || cur->op == Op::Sub) &&
           len < 63) {
      chain[len++] = cur;
      cur = cur->a.get();
    }
    Value* slot = nullptr;
    Value holder;  // keeps the namespace alive
    if (target.kind == NK::Ident) {
      if (cur->kind != NK::Ident || cur->id != target.id) return false;
      for (auto& kv : env.vars) {
        if (kv.first == target.id) slot = &kv.second;
      }
    } else if (target.kind == NK::Member && !target.flag && target.b->kind == NK::Ident &&
               target.a->kind == NK::Ident) {
      if (cur->kind != NK::Member || cur->flag || cur->b->kind != NK::Ident || cur->b->str != target.b->str ||
          cur->a->kind != NK::Ident || cur->a->id != target.a->id) {
        return false;
      }
      const Value* ns = env.lookup(target.a->id);
      if (!ns || ns->k != VK::Ns) return false;
      holder = *ns;
      slot = holder.obj().find(target.b->str);
    } else {
      return false;
    }
    if (!slot || !slot->is_str() || !slot->h) return false;
    const Value old = *slot;
    auto* so = static_cast<StrObj*>(old.h.get());
    if (old.s.data() != so->s.data() || old.s.size() != so->s.size()) return false;
    std::string suffix;
    append_chain_rest(chain, len, env, suffix);
    // Still the same string, held only by its variable and `old`: nobody can see it change.
    Value* now = target.kind == NK::Ident ? nullptr : holder.obj().find(target.b->str);
    if (target.kind == NK::Ident) {
      for (auto& kv : env.vars) {
        if (kv.first == target.id) now = &kv.second;
      }
    }
    if (now && now->h.get() == so && so->rc == 2 && now->s.data() == so->s.data()) {
      so->s.append(suffix);
      check_size(so->s);
      charge(suffix.size());
      now->s = so->s;
      return true;
    }
    std::string joined(old.s);
    joined += suffix;
    Value result = make_str(std::move(joined));
    if (target.kind == NK::Ident) {
      env.set(target.id, std::move(result));
    } else {
      holder.obj().set(Key{target.b->str, {}}, std::move(result));
    }
    return true;
  }

  static bool loose_equal(const Value& a, const Value& b) {
    auto is_ref = [](const Value& v) {
      return v.k == VK::Array || v.k == VK::Object || v.k == VK::Ns || v.k == VK::Func;
    };
    if (is_ref(a) && is_ref(b)) return a.h.get() == b.h.get();
    const bool an = a.is_undef() || a.is_none(), bn = b.is_undef() || b.is_none();
    if (an || bn) return an && bn;
    if (a.k == VK::Bool) return loose_equal(make_int(a.b ? 1 : 0), b);
    if (b.k == VK::Bool) return loose_equal(a, make_int(b.b ? 1 : 0));
    if (a.is_num() && b.is_num()) return a.n == b.n;
    if (a.is_str() && b.is_str()) return a.s == b.s;
    if (a.is_num() && b.is_str()) return a.n == js_string_to_number(b.s);
    if (a.is_str() && b.is_num()) return js_string_to_number(a.s) == b.n;
    // An object compared with a primitive: compare its string form.
    const Value& ref = is_ref(a) ? a : b;
    const Value& prim = is_ref(a) ? b : a;
    if (ref.k == VK::Func) return false;
    std::string s;
    if (ref.k == VK::Array) {
      const auto& items = ref.arr().v;
      for (std::size_t i = 0; i < items.size(); ++i) {
        if (i) s += ',';
        if (!(items[i].k == VK::Undef && items[i].b)) append_display_static(s, items[i]);
      }
    } else {
      s = "[object Map]";
    }
    if (prim.is_str()) return prim.s == s;
    return prim.n == js_string_to_number(s);
  }

  // Display without a renderer (for ==): containers print as JSON.
  static void append_display_static(std::string& out, const Value& v) {
    switch (v.k) {
      case VK::Undef: out += "undefined"; return;
      case VK::None: out += "null"; return;
      case VK::Bool: out += v.b ? "true" : "false"; return;
      case VK::Int: append_js_number(out, v.n); return;
      case VK::Float: append_float_display(out, v.n); return;
      case VK::Str: out.append(v.s); return;
      default: out += "[object]"; return;
    }
  }

  // === of the underlying values.
  static bool strict_equal(const Value& a, const Value& b) {
    if (a.is_num() && b.is_num()) return a.n == b.n;
    if (a.k != b.k) return false;
    switch (a.k) {
      case VK::Undef:
      case VK::None: return true;
      case VK::Bool: return a.b == b.b;
      case VK::Str: return a.s == b.s;
      default: return a.h.get() == b.h.get();
    }
  }

  Value binary(Op op, const Value& left, const Value& right) {
    switch (op) {
      case Op::Eq: return make_bool(loose_equal(left, right));
      case Op::Ne: return make_bool(!loose_equal(left, right));
      default: break;
    }
    if (left.is_undef() || right.is_undef()) {
      if (right.is_undef() && (op == Op::In || op == Op::NotIn)) return make_bool(op == Op::NotIn);
      fail(std::string("Cannot perform operation ") + op_text(op) + " on undefined values");
    }
    if (left.is_none() || right.is_none()) fail("Cannot perform operation on null values");
    if (op == Op::Concat) {
      std::string s = raw_string(left);
      append_raw(s, right);
      return make_str(std::move(s));
    }
    auto numeric_like = [](const Value& v) { return v.is_num() || v.k == VK::Bool; };
    auto number_of = [](const Value& v) { return v.k == VK::Bool ? (v.b ? 1.0 : 0.0) : v.n; };
    if (op == Op::Pow && numeric_like(left) && numeric_like(right)) {
      double a = number_of(left), b = number_of(right);
      if (a == 0 && b < 0) fail("0.0 cannot be raised to a negative power");
      double r = std::pow(a, b);
      if (std::isnan(a) || std::isnan(b) || ((b == INFINITY || b == -INFINITY) && std::fabs(a) == 1)) r = NAN;
      if (!std::isfinite(r)) fail("Exponentiation result is not a finite real number");
      bool is_float = left.k == VK::Float || right.k == VK::Float || b < 0;
      return is_float ? make_float(r) : make_int(r);
    }
    if (left.is_num() && right.is_num()) {
      const double a = left.n, b = right.n;
      const bool is_float = left.k == VK::Float || right.k == VK::Float;
      switch (op) {
        case Op::Add: return is_float ? make_float(a + b) : make_int(a + b);
        case Op::Sub: return is_float ? make_float(a - b) : make_int(a - b);
        case Op::Mul: return is_float ? make_float(a * b) : make_int(a * b);
        case Op::Div: return make_float(a / b);
        case Op::FloorDiv: {
          double r = std::floor(a / b);
          return is_float ? make_float(r) : make_int(r);
        }
        case Op::Mod: {
          double r = std::fmod(a, b);
          return is_float ? make_float(r) : make_int(r);
        }
        case Op::Lt: return make_bool(a < b);
        case Op::Gt: return make_bool(a > b);
        case Op::Ge: return make_bool(a >= b);
        case Op::Le: return make_bool(a <= b);
        default: break;
      }
    } else if (left.k == VK::Array && right.k == VK::Array) {
      if (op == Op::Add) {
        std::vector<Value> items = left.arr().v;
        items.insert(items.end(), right.arr().v.begin(), right.arr().v.end());
        return make_array(std::move(items));
      }
    } else if (right.k == VK::Array) {
      if (op == Op::In || op == Op::NotIn) {
        bool member = false;
        for (const Value& x : right.arr().v) {
          if (is_raw_undef(x)) fail("Cannot read properties of undefined (reading 'value')");
          if (strict_equal(x, left)) {
            member = true;
            break;
          }
        }
        return make_bool(op == Op::In ? member : !member);
      }
    }
    if ((left.is_str() || right.is_str()) && op == Op::Add) {
      std::string s = raw_string(left);
      append_raw(s, right);
      return make_str(std::move(s));
    }
    if (left.is_str() && right.is_str() && (op == Op::In || op == Op::NotIn)) {
      bool found = right.s.find(left.s) != std::string_view::npos;
      return make_bool(op == Op::In ? found : !found);
    }
    if (left.is_str() && right.k == VK::Object && (op == Op::In || op == Op::NotIn)) {
      bool found = right.obj().find(left.s) != nullptr;
      return make_bool(op == Op::In ? found : !found);
    }
    fail(std::string("Unknown operator \"") + op_text(op) + "\" between " + type_name(left) + " and " +
         type_name(right));
  }

  // --- member access ---------------------------------------------------------------------------

  Value bound_method(const Value& self, Method m) {
    auto* f = new FuncObj();
    f->kind = FK::Method;
    f->self = self;
    f->method = m;
    Value v;
    v.k = VK::Func;
    v.h = Rc<HeapObj>(f);
    return v;
  }

  // UTF-16 code unit `index` (negative: from the end) of s as a string, or undefined.
  Value string_at(const Value& str, double index) {
    const std::string_view s = str.s;
    double len = static_cast<double>(utf16_length(s));
    if (index < 0) index += len;
    if (!(index >= 0 && index < len)) return Value{};
    std::size_t target = static_cast<std::size_t>(index), unit = 0;
    for (std::size_t i = 0; i < s.size();) {
      char32_t cp;
      std::size_t n = decode_utf8(s, i, cp);
      std::size_t units = cp >= 0x10000 ? 2 : 1;
      if (target < unit + units) {
        if (units == 1) return make_str_view(s.substr(i, n), str.h);
        std::string half;
        char32_t hi = 0xD800 + ((cp - 0x10000) >> 10), lo = 0xDC00 + ((cp - 0x10000) & 0x3FF);
        append_utf8(half, target == unit ? hi : lo);  // a lone surrogate, as JavaScript gives
        return make_str(std::move(half));
      }
      unit += units;
      i += n;
    }
    return Value{};
  }

  Value member(const Value& object, const Value& prop) {
    if (object.k == VK::Object || object.k == VK::Ns) {
      if (!prop.is_str()) fail(std::string("Cannot access property with non-string: got ") + type_name(prop));
      if (const Value* v = object.obj().find(prop.s)) return plain(*v);
      Method m;
      if (object.k == VK::Object && lookup_name(kObjectMethods, prop.s, m)) return bound_method(object, m);
      return Value{};
    }
    if (object.k == VK::Array || object.is_str()) {
      if (prop.k == VK::Int) {
        if (object.is_str()) return string_at(object, prop.n);
        const auto& items = object.arr().v;
        double idx = prop.n < 0 ? prop.n + static_cast<double>(items.size()) : prop.n;
        if (!(idx >= 0 && idx < static_cast<double>(items.size()))) return Value{};
        return plain(items[static_cast<std::size_t>(idx)]);
      }
      if (prop.is_str()) {
        if (prop.s == "length") {
          return make_int(static_cast<double>(object.is_str() ? utf16_length(object.s) : object.arr().v.size()));
        }
        Method m;
        if (object.is_str() && lookup_name(kStringMethods, prop.s, m)) return bound_method(object, m);
        return Value{};
      }
      fail(std::string("Cannot access property with non-string/non-number: got ") + type_name(prop));
    }
    if (!prop.is_str()) fail(std::string("Cannot access property with non-string: got ") + type_name(prop));
    return Value{};
  }

  Value eval_member(const Node& n, Env& env) {
    Value object = eval(*n.a, env);
    if (n.flag && n.b->kind == NK::Slice) return eval_slice(object, *n.b, env);
    Value prop;
    if (n.flag) prop = eval(*n.b, env);
    else if (n.b->kind == NK::IntLit) prop = make_int(n.b->num);
    else prop = make_str_view(n.b->str);
    return member(object, prop);
  }

  Value eval_slice(const Value& object, const Node& sl, Env& env) {
    if (object.k != VK::Array && !object.is_str()) fail("Slice object must be an array or string");
    Value start = sl.a ? eval(*sl.a, env) : Value{};
    Value stop = sl.b ? eval(*sl.b, env) : Value{};
    Value step = sl.c ? eval(*sl.c, env) : Value{};
    if (start.k != VK::Int && !start.is_undef()) fail("Slice start must be numeric or undefined");
    if (stop.k != VK::Int && !stop.is_undef()) fail("Slice stop must be numeric or undefined");
    if (step.k != VK::Int && !step.is_undef()) fail("Slice step must be numeric or undefined");

    // Code point boundaries for strings.
    std::vector<std::size_t> bounds;
    double len;
    if (object.is_str()) {
      for (std::size_t i = 0; i < object.s.size();) {
        bounds.push_back(i);
        char32_t cp;
        i += decode_utf8(object.s, i, cp);
      }
      bounds.push_back(object.s.size());
      len = static_cast<double>(bounds.size() - 1);
    } else {
      len = static_cast<double>(object.arr().v.size());
    }
    const double st = step.is_undef() ? 1 : step.n;
    const double dir = st > 0 ? 1 : (st < 0 ? -1 : 0);
    double a, b;
    if (dir >= 0) {
      a = start.is_undef() ? 0 : start.n;
      a = a < 0 ? std::max(len + a, 0.0) : std::min(a, len);
      b = stop.is_undef() ? len : stop.n;
      b = b < 0 ? std::max(len + b, 0.0) : std::min(b, len);
    } else {
      a = start.is_undef() ? len - 1 : start.n;
      a = a < 0 ? std::max(len + a, -1.0) : std::min(a, len - 1);
      b = stop.is_undef() ? -1 : stop.n;
      b = b < -1 ? std::max(len + b, -1.0) : std::min(b, len - 1);
    }
    if (object.is_str()) {
      std::string out;
      for (double i = a; dir * i < dir * b; i += st) {
        auto k = static_cast<std::size_t>(i);
        out.append(object.s.substr(bounds[k], bounds[k + 1] - bounds[k]));
      }
      return make_str(std::move(out));
    }
    std::vector<Value> items;
    const auto& src = object.arr().v;
    for (double i = a; dir * i < dir * b; i += st) items.push_back(src[static_cast<std::size_t>(i)]);
    return make_array(std::move(items));
  }

  // --- calls -----------------------------------------------------------------------------------

  Args eval_args(const NodeList& list, Env& env) {
    Args args;
    for (const auto& a : list) {
      if (a->kind == NK::Spread) {
        Value v = eval(*a->a, env);
        if (v.k != VK::Array) fail(std::string("Cannot unpack non-iterable type: ") + type_name(v));
        for (const Value& x : v.arr().v) args.pos.push_back(x);
      } else if (a->kind != NK::KwArg && a->kind != NK::KwSpread) {
        args.pos.push_back(eval_raw(*a, env));
      }
    }
    for (const auto& a : list) {
      if (a->kind == NK::KwArg) {
        if (args.kwarg(a->str)) fail("Got multiple values for keyword argument '" + a->str + "'");
        args.kw.emplace_back(Key{a->str, {}}, eval_raw(*a->a, env));
      } else if (a->kind == NK::KwSpread) {
        Value v = eval(*a->a, env);
        if (v.k != VK::Object) fail(std::string("Argument after ** must be a mapping, not ") + type_name(v));
        for (const auto& kv : v.obj().e) {
          if (args.kwarg(kv.first.s)) {
            fail("Got multiple values for keyword argument '" + std::string(kv.first.s) + "'");
          }
          args.kw.emplace_back(kv.first, kv.second);
        }
        args.keep.push_back(std::move(v));
      }
    }
    return args;
  }

  Value eval_call(const Node& n, Env& env) {
    Args args = eval_args(n.list, env);
    const Node& callee = *n.a;
    const bool raw_args = std::any_of(args.pos.begin(), args.pos.end(), is_raw_undef) ||
                          std::any_of(args.kw.begin(), args.kw.end(), [](const auto& kv) { return is_raw_undef(kv.second); });
    // Fast path for methods of strings and mappings: no bound function object.
    if (callee.kind == NK::Member && !callee.flag && n.code != 0 && !raw_args) {
      Value object = eval(*callee.a, env);
      const auto m = static_cast<Method>(n.code);
      if (object.is_str() && m >= Method::Upper && m <= Method::Replace) {
        return call_method(object, m, args);
      }
      if (object.k == VK::Object && m >= Method::Get) {
        if (const Value* own = object.obj().find(callee.b->str)) {
          Value fn = *own;
          if (fn.k != VK::Func) fail(std::string("Cannot call something that is not a function: got ") + type_name(fn));
          return call_function(fn, std::move(args), env, false);
        }
        return call_method(object, m, args);
      }
      Value fn = member(object, make_str_view(callee.b->str));
      if (fn.k != VK::Func) fail(std::string("Cannot call something that is not a function: got ") + type_name(fn));
      return call_function(fn, std::move(args), env, false);
    }
    Value fn = eval(callee, env);
    if (fn.k != VK::Func) fail(std::string("Cannot call something that is not a function: got ") + type_name(fn));
    return call_function(fn, std::move(args), env, false);
  }

  // `from_call_block`: the reference always passes (possibly empty) keyword arguments then.
  Value call_function(const Value& fn, Args args, Env& env, bool from_call_block) {
    FuncObj& f = fn.fn();
    if (f.kind != FK::Macro && f.kind != FK::Caller) check_no_raw(args);
    switch (f.kind) {
      case FK::Macro: return call_macro(*f.node, f.node->list, f.node->list2, "'" + f.node->str + "'", std::move(args), env);
      case FK::Caller: {
        Rc<Env> scope(new Env());
        scope->parent = f.env;
        return call_macro(*f.node, f.node->list, f.node->list2, "None", std::move(args), *f.env, scope);
      }
      case FK::Method: return call_method(f.self, f.method, args);
      case FK::Namespace: return call_namespace(args);
      case FK::RaiseException: {
        if (!args.pos.empty()) fail(raw_string(args.pos[0]));
        if (!args.kw.empty()) fail("[object Map]");
        fail("");
      }
      case FK::Range: {
        if (!args.kw.empty() || from_call_block) fail("range() does not take keyword arguments");
        return call_range(args);
      }
      case FK::StrftimeNow: {
        if (!args.kw.empty() || from_call_block) fail("strftime_now() does not take keyword arguments");
        if (args.pos.empty() || !args.pos[0].is_str()) fail("strftime_now() expects a format string");
        return make_str(strftime_now(args.pos[0].s));
      }
    }
    fail("unknown function");
  }

  // Binds arguments as the reference's bindMacroArguments and renders the body.
  Value call_macro(const Node& def, const NodeList& params, const NodeList& body, const std::string& display,
                   Args args, Env& parent, Rc<Env> scope = {}) {
    count_iteration();
    DepthGuard guard(*this);
    if (!scope) {
      scope = Rc<Env>(new Env());
      scope->parent = Rc<Env>(&parent);
    }
    std::vector<std::pair<Key, Value>> kw = std::move(args.kw);
    std::vector<const Node*> pending;
    for (std::size_t i = 0; i < params.size(); ++i) {
      const Node& p = *params[i];
      bool have = i < args.pos.size() && !is_raw_undef(args.pos[i]);
      Value v;
      if (have) v = args.pos[i];
      if (!have) {
        for (auto it = kw.begin(); it != kw.end(); ++it) {
          if (it->first.s == p.str) {
            v = std::move(it->second);
            kw.erase(it);
            have = !is_raw_undef(v);
            v = plain(std::move(v));
            break;
          }
        }
      }
      if (!have && p.kind == NK::KwArg) pending.push_back(&p);
      scope->set(p.id, std::move(v));
    }
    if (def.uses_kwargs) {
      auto* o = new ObjObj();
      Value kwv = make_object(o);
      for (auto& kv : kw) o->set(std::move(kv.first), std::move(kv.second));
      scope->set(kIdKwargs, std::move(kwv));
    } else if (!kw.empty()) {
      fail("macro " + display + " takes no keyword argument '" + std::string(kw.front().first.s) + "'");
    }
    if (def.uses_varargs) {
      std::vector<Value> rest;
      for (std::size_t i = params.size(); i < args.pos.size(); ++i) rest.push_back(args.pos[i]);
      scope->set(kIdVarargs, make_array(std::move(rest)));
    } else if (args.pos.size() > params.size()) {
      fail("macro " + display + " takes not more than " + std::to_string(params.size()) + " argument(s)");
    }
    for (const Node* p : pending) scope->set(p->id, eval(*p->a, *scope));
    std::string out;
    Flow f = exec_block(body, *scope, out);
    if (f != Flow::Normal) throw LoopSignal{f};
    return make_str(std::move(out));
  }

  Value call_namespace(const Args& args) {
    if (args.pos.size() > 1) fail("namespace expected at most 1 argument, got " + std::to_string(args.pos.size()));
    auto* o = new ObjObj();
    Value ns = make_object(o, VK::Ns);
    if (args.pos.size() == 1) {
      const Value& src = args.pos[0];
      if (src.k == VK::Object) {
        for (const auto& kv : src.obj().e) o->set(kv.first, kv.second);
      } else if (src.k == VK::Array) {
        for (const Value& pair : src.arr().v) {
          Value key, value;
          if (pair.k == VK::Array && pair.arr().v.size() == 2) {
            key = pair.arr().v[0];
            value = pair.arr().v[1];
          } else if (pair.is_str()) {
            std::vector<std::size_t> b;
            for (std::size_t i = 0; i < pair.s.size();) {
              b.push_back(i);
              char32_t cp;
              i += decode_utf8(pair.s, i, cp);
            }
            if (b.size() != 2) fail("namespace expected an object or an iterable of [key, value] pairs");
            key = make_str_view(pair.s.substr(0, b[1]), pair.h);
            value = make_str_view(pair.s.substr(b[1]), pair.h);
          } else {
            fail("namespace expected an object or an iterable of [key, value] pairs");
          }
          if (!key.is_str()) fail("namespace keys must be strings");
          o->set(key_of(key), value);
        }
      } else {
        fail(std::string("'") + type_name(src) + "' object is not iterable");
      }
    }
    for (const auto& kv : args.kw) o->set(kv.first, kv.second);
    return ns;
  }

  Value call_range(const Args& args) {
    std::vector<double> a;
    for (const Value& v : args.pos) {
      if (v.is_num()) a.push_back(v.n);
      else if (v.k == VK::Bool) a.push_back(v.b ? 1 : 0);
      else fail(std::string("range() arguments must be numbers: got ") + type_name(v));
    }
    if (a.empty()) return make_array({});
    double start = 0, stop, step = a.size() > 2 ? a[2] : 1;
    if (a.size() == 1) {
      stop = a[0];
    } else {
      start = a[0];
      stop = a[1];
    }
    if (step == 0) fail("range() step must not be zero");
    double count = step > 0 ? std::ceil((stop - start) / step) : std::ceil((start - stop) / -step);
    if (std::isnan(count) || count > static_cast<double>(Limits::kMaxRangeItems)) {
      if (!std::isnan(count)) fail("range() would produce more than " + std::to_string(Limits::kMaxRangeItems) + " items");
    }
    std::vector<Value> items;
    if (step > 0) {
      for (double i = start; i < stop; i += step) {
        items.push_back(make_number(i));
        if (items.size() > Limits::kMaxRangeItems) fail("range() produces too many items");
      }
    } else {
      for (double i = start; i > stop; i += step) {
        items.push_back(make_number(i));
        if (items.size() > Limits::kMaxRangeItems) fail("range() produces too many items");
      }
    }
    return make_array(std::move(items));
  }

  std::string strftime_now(std::string_view format) const {
    std::time_t t = opts_.now_epoch_seconds != 0 ? static_cast<std::time_t>(opts_.now_epoch_seconds)
                                                 : std::time(nullptr);
    std::tm tm{};
    gmtime_r(&t, &tm);
    static constexpr const char* kMonths[] = {"January", "February", "March",     "April",
                                              "May",     "June",     "July",      "August",
                                              "September", "October", "November", "December"};
    auto pad2 = [](int v) {
      std::string s = std::to_string(v);
      return v < 10 ? "0" + s : s;
    };
    std::string out;
    for (std::size_t i = 0; i < format.size(); ++i) {
      if (format[i] == '%' && i + 1 < format.size()) {
        char c = format[i + 1];
        switch (c) {
          case 'Y': out += std::to_string(tm.tm_year + 1900); ++i; continue;
          case 'm': out += pad2(tm.tm_mon + 1); ++i; continue;
          case 'd': out += pad2(tm.tm_mday); ++i; continue;
          case 'b': out += std::string(kMonths[tm.tm_mon]).substr(0, 3); ++i; continue;
          case 'B': out += kMonths[tm.tm_mon]; ++i; continue;
          case 'H': out += pad2(tm.tm_hour); ++i; continue;
          case 'M': out += pad2(tm.tm_min); ++i; continue;
          case '%': out += '%'; ++i; continue;
          default: break;
        }
      }
      out += format[i];
    }
    return out;
  }

  // --- methods of strings and mappings ----------------------------------------------------------

  static void check_no_raw(const Args& args) {
    for (const Value& v : args.pos) {
      if (is_raw_undef(v)) fail("Cannot read properties of undefined (reading 'value')");
    }
    for (const auto& kv : args.kw) {
      if (is_raw_undef(kv.second)) fail("Cannot read properties of undefined (reading 'value')");
    }
  }

  // The reference passes keyword arguments as one trailing positional KeywordArgumentsValue.
  static bool arg_is_kwargs(const Args& args, std::size_t i) {
    return i == args.pos.size() && !args.kw.empty();
  }
  static std::size_t arg_count(const Args& args) { return args.pos.size() + (args.kw.empty() ? 0 : 1); }

  Value str_result(const Value& self, std::string_view result) {
    if (result.size() == self.s.size()) return self;  // unchanged (a substring of equal length)
    if (result.data() >= self.s.data() && result.data() + result.size() <= self.s.data() + self.s.size()) {
      return make_str_view(result, self.h);
    }
    return make_str(std::string(result));
  }

  Value call_method(const Value& self, Method m, const Args& args) {
    if (self.is_str()) return call_string_method(self, m, args);
    return call_object_method(self, m, args);
  }

  Value call_string_method(const Value& self, Method m, const Args& args) {
    const std::string_view s = self.s;
    switch (m) {
      case Method::Upper: return make_str(case_mapped(s, true));
      case Method::Lower: return make_str(case_mapped(s, false));
      case Method::Strip: return str_result(self, js_trim(s));
      case Method::Lstrip: return str_result(self, js_trim_start(s));
      case Method::Rstrip: return str_result(self, js_trim_end(s));
      case Method::Title: {
        std::string out(s);
        for (std::size_t i = 0; i < out.size(); ++i) {
          auto c = static_cast<unsigned char>(out[i]);
          if (is_ascii_word(c) && (i == 0 || !is_ascii_word(static_cast<unsigned char>(out[i - 1])))) {
            if (c >= 'a' && c <= 'z') out[i] = static_cast<char>(c - 32);
          }
        }
        return make_str(std::move(out));
      }
      case Method::Capitalize: return make_str(capitalize(s));
      case Method::Startswith:
      case Method::Endswith: {
        const bool starts = m == Method::Startswith;
        const char* name = starts ? "startswith" : "endswith";
        if (arg_count(args) == 0) fail(std::string(name) + "() requires at least one argument");
        auto test = [&](std::string_view p) {
          return starts ? s.substr(0, p.size()) == p
                        : (p.size() <= s.size() && s.substr(s.size() - p.size()) == p);
        };
        if (!arg_is_kwargs(args, 0)) {
          const Value& pat = args.pos[0];
          if (pat.is_str()) return make_bool(test(pat.s));
          if (pat.k == VK::Array) {
            for (const Value& item : pat.arr().v) {
              if (!item.is_str()) fail(std::string(name) + "() tuple elements must be strings");
              if (test(item.s)) return make_bool(true);
            }
            return make_bool(false);
          }
        }
        fail(std::string(name) + "() argument must be a string or tuple of strings");
      }
      case Method::Split: return split(self, args);
      case Method::Replace: {
        if (arg_count(args) < 2) fail("replace() requires at least two arguments");
        if (arg_is_kwargs(args, 0) || arg_is_kwargs(args, 1) || !args.pos[0].is_str() || !args.pos[1].is_str()) {
          fail("replace() arguments must be strings");
        }
        Value count = make_none();
        if (args.pos.size() > 2) {
          count = args.pos[2];
        } else if (!args.kw.empty()) {
          if (const Value* c = args.kwarg("count")) count = *c;
        }
        if (count.k != VK::Int && !count.is_none()) fail("replace() count argument must be a number or null");
        return replace(self, args.pos[0].s, args.pos[1].s, count);
      }
      default: break;
    }
    fail("unknown string method");
  }

  static std::string capitalize(std::string_view s) {
    std::string out;
    if (s.empty()) return out;
    char32_t cp;
    std::size_t n = decode_utf8(s, 0, cp);
    if (cp >= 0x10000) return std::string(s);  // charAt(0) is half a surrogate pair
    append_case_mapped(out, s.substr(0, n), true);
    out.append(s.substr(n));
    return out;
  }

  Value split(const Value& self, const Args& args) {
    const std::string_view s = self.s;
    Value sep = make_none();
    if (arg_count(args) > 0) {
      if (arg_is_kwargs(args, 0)) fail("sep argument must be a string or null");
      sep = args.pos[0];
    }
    if (!sep.is_str() && !sep.is_none()) fail("sep argument must be a string or null");
    double maxsplit = -1;
    if (arg_count(args) > 1) {
      if (arg_is_kwargs(args, 1) || args.pos[1].k != VK::Int) fail("maxsplit argument must be a number");
      maxsplit = args.pos[1].n;
    }
    std::vector<Value> parts;
    if (sep.is_none()) {
      const std::string_view text = js_trim_start(s);
      std::size_t i = 0;
      while (i < text.size()) {
        std::size_t start = i;
        while (i < text.size() && !space_at(text, i)) {
          char32_t cp;
          i += decode_utf8(text, i, cp);
        }
        if (maxsplit != -1 && static_cast<double>(parts.size()) >= maxsplit) {
          parts.push_back(str_result(self, text.substr(start)));
          break;
        }
        parts.push_back(str_result(self, text.substr(start, i - start)));
        while (std::size_t k = space_at(text, i)) i += k;
      }
    } else {
      if (sep.s.empty()) fail("empty separator");
      std::size_t start = 0;
      while (true) {
        if (maxsplit != -1 && static_cast<double>(parts.size()) >= maxsplit) {
          parts.push_back(str_result(self, s.substr(start)));
          break;
        }
        std::size_t pos = s.find(sep.s, start);
        if (pos == std::string_view::npos) {
          parts.push_back(str_result(self, s.substr(start)));
          break;
        }
        parts.push_back(str_result(self, s.substr(start, pos - start)));
        start = pos + sep.s.size();
      }
    }
    return make_array(std::move(parts));
  }

  Value replace(const Value& self, std::string_view from, std::string_view to, const Value& count) {
    const std::string_view s = self.s;
    if (count.k == VK::Int && count.n == 0) return self;
    double remaining = (count.is_none() || count.n < 0) ? INFINITY : count.n;
    std::string out;
    if (from.empty()) {
      // An empty pattern matches at every code point boundary (start and end included).
      std::size_t i = 0;
      while (true) {
        if (remaining > 0) {
          out.append(to);
          --remaining;
        }
        if (i >= s.size()) break;
        char32_t cp;
        std::size_t n = decode_utf8(s, i, cp);
        out.append(s.substr(i, n));
        i += n;
        check_size(out);
      }
      return make_str(std::move(out));
    }
    std::size_t start = 0;
    while (remaining > 0) {
      std::size_t pos = s.find(from, start);
      if (pos == std::string_view::npos) break;
      out.append(s.substr(start, pos - start));
      out.append(to);
      start = pos + from.size();
      --remaining;
      check_size(out);
    }
    if (start == 0 && out.empty()) return self;
    out.append(s.substr(start));
    return make_str(std::move(out));
  }

  Value keys_of(const Value& object) {
    std::vector<Value> keys;
    keys.reserve(object.obj().e.size());
    for (const auto& kv : object.obj().e) keys.push_back(make_str_view(kv.first.s, kv.first.owner));
    return make_array(std::move(keys));
  }

  Value items_of(const Value& object) {
    std::vector<Value> items;
    items.reserve(object.obj().e.size());
    for (const auto& kv : object.obj().e) {
      items.push_back(make_array({make_str_view(kv.first.s, kv.first.owner), kv.second}));
    }
    return make_array(std::move(items));
  }

  Value call_object_method(const Value& self, Method m, const Args& args) {
    switch (m) {
      case Method::Get: {
        if (arg_count(args) == 0) fail("get() requires a key");
        if (arg_is_kwargs(args, 0) || arg_is_kwargs(args, 1)) fail("get() does not take keyword arguments");
        const Value& key = args.pos[0];
        if (!key.is_str()) fail(std::string("Object key must be a string: got ") + type_name(key));
        if (const Value* v = self.obj().find(key.s)) return *v;
        return args.pos.size() > 1 ? args.pos[1] : make_none();
      }
      case Method::Items: return items_of(self);
      case Method::Keys: return keys_of(self);
      case Method::Values: {
        std::vector<Value> values;
        for (const auto& kv : self.obj().e) values.push_back(kv.second);
        return make_array(std::move(values));
      }
      case Method::Dictsort: {
        auto opt = [&](std::size_t i, std::string_view name) -> const Value* {
          if (i < args.pos.size()) return &args.pos[i];
          return args.kwarg(name);
        };
        const Value* cs = opt(0, "case_sensitive");
        const Value* by = opt(1, "by");
        const Value* rev = opt(2, "reverse");
        if (cs && cs->k != VK::Bool) fail("case_sensitive must be a boolean");
        if (by && !by->is_str()) fail("by must be a string");
        if (by && by->s != "key" && by->s != "value") fail("by must be either 'key' or 'value'");
        if (rev && rev->k != VK::Bool) fail("reverse must be a boolean");
        const bool case_sensitive = cs && cs->b, reverse = rev && rev->b;
        const std::size_t index = (by && by->s == "value") ? 1 : 0;
        Value items = items_of(self);
        auto& v = items.arr().v;
        std::stable_sort(v.begin(), v.end(), [&](const Value& a, const Value& b) {
          int r = compare_values(a.arr().v[index], b.arr().v[index], case_sensitive);
          return reverse ? r > 0 : r < 0;
        });
        return items;
      }
      default: break;
    }
    fail("unknown mapping method");
  }

  // compareRuntimeValues of the reference (sort, dictsort).
  static int compare_values(const Value& a, const Value& b, bool case_sensitive) {
    if (is_raw_undef(a) || is_raw_undef(b)) fail("Cannot read properties of undefined (reading 'type')");
    if (a.is_none() && b.is_none()) return 0;
    if (a.is_none() || b.is_none()) fail(std::string("Cannot compare ") + type_name(a) + " with " + type_name(b));
    if (a.is_undef() && b.is_undef()) return 0;
    if (a.is_undef() || b.is_undef()) fail(std::string("Cannot compare ") + type_name(a) + " with " + type_name(b));
    auto numeric_like = [](const Value& v) { return v.is_num() || v.k == VK::Bool; };
    if (numeric_like(a) && numeric_like(b)) {
      double x = a.k == VK::Bool ? (a.b ? 1 : 0) : a.n, y = b.k == VK::Bool ? (b.b ? 1 : 0) : b.n;
      return x < y ? -1 : (x > y ? 1 : 0);
    }
    if (std::string_view(type_name(a)) != type_name(b)) {
      fail(std::string("Cannot compare different types: ") + type_name(a) + " and " + type_name(b));
    }
    if (a.is_str()) {
      if (case_sensitive) return compare_utf16(a.s, b.s);
      return compare_utf16(case_mapped(a.s, false), case_mapped(b.s, false));
    }
    fail(std::string("Cannot compare type: ") + type_name(a));
  }

  // --- tests -----------------------------------------------------------------------------------

  bool run_test(Test t, const Value& v, const Value* arg) {
    switch (t) {
      case Test::Boolean: return v.k == VK::Bool;
      case Test::Callable: return v.k == VK::Func;
      case Test::Odd:
      case Test::Even: {
        if (v.k != VK::Int) fail(std::string("cannot ") + (t == Test::Odd ? "odd" : "even") + " on " + type_name(v));
        bool even = std::fmod(v.n, 2) == 0;
        return t == Test::Odd ? !even : even;
      }
      case Test::False: return v.k == VK::Bool && !v.b;
      case Test::True: return v.k == VK::Bool && v.b;
      case Test::None: return v.is_none();
      case Test::String: return v.is_str();
      case Test::Number: return v.is_num();
      case Test::Integer: return v.k == VK::Int;
      case Test::Iterable: return (v.k == VK::Array && !v.arr().tuple) || v.is_str();
      case Test::Mapping: return v.k == VK::Object;
      case Test::Sequence: return v.k == VK::Array || v.k == VK::Object || v.is_str();
      case Test::Lower: return v.is_str() && case_mapped(v.s, false) == v.s;
      case Test::Upper: return v.is_str() && case_mapped(v.s, true) == v.s;
      case Test::Defined: return !v.is_undef();
      case Test::Undefined: return v.is_undef();
      case Test::Equalto:
        if (!arg) fail("Cannot read properties of undefined (reading 'value')");
        return strict_equal(v, *arg);
    }
    return false;
  }

  // --- filters ---------------------------------------------------------------------------------

  // getAttributeValue: "a.b.0" paths into mappings and arrays.
  static Value attribute_path(const Value& item, std::string_view path) {
    Value cur = item;
    std::size_t start = 0;
    while (true) {
      std::size_t dot = path.find('.', start);
      std::string_view part = path.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start);
      if (cur.k == VK::Object || cur.k == VK::Ns) {
        const Value* v = cur.obj().find(part);
        cur = v ? plain(*v) : Value{};
      } else if (cur.k == VK::Array) {
        // parseInt(part, 10)
        double idx = js_parse_int(part);
        const auto& items = cur.arr().v;
        if (!std::isnan(idx) && idx >= 0 && idx < static_cast<double>(items.size())) {
          Value next = plain(items[static_cast<std::size_t>(idx)]);
          cur = std::move(next);
        } else {
          return Value{};
        }
      } else {
        return Value{};
      }
      if (dot == std::string_view::npos) break;
      start = dot + 1;
    }
    return cur;
  }

  Value tojson_filter(const Value& operand, const Node& f, Env& env) {
    JsonOpts o;
    if (f.flag) {
      Args args = eval_args(f.list, env);
      check_no_raw(args);
      if (const Value* indent = args.kwarg("indent")) {
        if (indent->k != VK::Int && !indent->is_none()) fail("If set, indent must be a number");
        if (indent->k == VK::Int) {
          if (indent->n < 0) fail("Invalid count value: " + js_number(indent->n));
          if (indent->n > 1000) fail("tojson indent is too large");
          o.indent = static_cast<int>(indent->n);
        }
      }
      if (const Value* ea = args.kwarg("ensure_ascii")) {
        if (ea->k != VK::Bool) fail("If set, ensure_ascii must be a boolean");
        o.ensure_ascii = ea->b;
      }
      if (const Value* sk = args.kwarg("sort_keys")) {
        if (sk->k != VK::Bool) fail("If set, sort_keys must be a boolean");
        o.sort_keys = sk->b;
      }
      if (o.indent) o.item_sep = ",";
      const Value* seps = args.kwarg("separators");
      if (seps && !seps->is_none()) {
        if (seps->k != VK::Array) fail("If set, separators must be a tuple of two strings");
        const auto& items = seps->arr().v;
        if (items.size() != 2 || !items[0].is_str() || !items[1].is_str()) {
          fail("separators must be a tuple of two strings");
        }
        std::string out;
        o.item_sep = items[0].s;
        o.key_sep = items[1].s;
        to_json(out, operand, o, 0, true);
        return make_str(std::move(out));
      }
    }
    std::string out;
    to_json(out, operand, o, 0, true);
    return make_str(std::move(out));
  }

  Value apply_filter(const Value& operand, const Node& f, Env& env) {
    const auto name = static_cast<Filter>(f.code);
    const std::string& fname = f.str;
    if (!f.flag) {
      if (name == Filter::Safe) return operand;
      if (name == Filter::Tojson) return tojson_filter(operand, f, env);
      switch (operand.k) {
        case VK::Array: {
          const auto& items = operand.arr().v;
          switch (name) {
            case Filter::List: return operand;
            case Filter::First:
            case Filter::Last:
              if (items.empty()) {
                Value raw;  // JavaScript's undefined (see eval_raw)
                raw.b = true;
                return raw;
              }
              return name == Filter::First ? items.front() : items.back();
            case Filter::Length: return make_int(static_cast<double>(items.size()));
            case Filter::Reverse: return make_array(std::vector<Value>(items.rbegin(), items.rend()));
            case Filter::Sort: {
              std::vector<Value> v = items;
              std::stable_sort(v.begin(), v.end(),
                               [](const Value& a, const Value& b) { return compare_values(a, b, false) < 0; });
              return make_array(std::move(v));
            }
            case Filter::Join: return make_str(join_raw(items, ""));
            case Filter::String: {
              std::string out;
              to_json(out, operand, JsonOpts{}, 0, false);
              return make_str(std::move(out));
            }
            case Filter::Unique: return unique(items);
            default: fail("Unknown ArrayValue filter: " + fname);
          }
        }
        case VK::Str:
          switch (name) {
            case Filter::Length: return make_int(static_cast<double>(utf16_length(operand.s)));
            case Filter::Upper: return make_str(case_mapped(operand.s, true));
            case Filter::Lower: return make_str(case_mapped(operand.s, false));
            case Filter::Title: return call_string_method(operand, Method::Title, Args{});
            case Filter::Capitalize: return make_str(capitalize(operand.s));
            case Filter::Trim: return str_result(operand, js_trim(operand.s));
            case Filter::Indent: return indent(operand, 4, false, false);
            case Filter::Join:
            case Filter::String: return operand;
            case Filter::Int: {
              double v = js_parse_int(operand.s);
              return make_int(std::isnan(v) ? 0 : v);
            }
            case Filter::Float: {
              double v = js_parse_float(operand.s);
              return make_float(std::isnan(v) ? 0 : v);
            }
            default: fail("Unknown StringValue filter: " + fname);
          }
        case VK::Int:
        case VK::Float:
          switch (name) {
            case Filter::Abs: return operand.k == VK::Int ? make_int(std::fabs(operand.n)) : make_float(std::fabs(operand.n));
            case Filter::Int: return make_int(std::floor(operand.n));
            case Filter::Float: return make_float(operand.n);
            case Filter::String: {
              std::string s;
              append_display(s, operand);
              return make_str(std::move(s));
            }
            default: fail("Unknown NumericValue filter: " + fname);
          }
        case VK::Object:
          switch (name) {
            case Filter::Items: return items_of(operand);
            case Filter::Length: return make_int(static_cast<double>(operand.obj().e.size()));
            case Filter::Get: fail("get() requires a key");
            case Filter::Keys: return call_object_method(operand, Method::Keys, Args{});
            case Filter::Values: return call_object_method(operand, Method::Values, Args{});
            case Filter::Dictsort: return call_object_method(operand, Method::Dictsort, Args{});
            default: fail("Unknown ObjectValue filter: " + fname);
          }
        case VK::Bool:
          switch (name) {
            case Filter::Bool: return operand;
            case Filter::Int: return make_int(operand.b ? 1 : 0);
            case Filter::Float: return make_float(operand.b ? 1 : 0);
            case Filter::String: return make_str_view(operand.b ? "true" : "false");
            default: fail("Unknown BooleanValue filter: " + fname);
          }
        default:
          fail("Cannot apply filter \"" + fname + "\" to type: " + type_name(operand));
      }
    }

    // Called with arguments: name(...)
    switch (name) {
      case Filter::Tojson: return tojson_filter(operand, f, env);
      case Filter::Join: {
        std::vector<Value> chars;
        const std::vector<Value>* items = nullptr;
        if (operand.is_str()) {
          for (std::size_t i = 0; i < operand.s.size();) {
            char32_t cp;
            std::size_t n = decode_utf8(operand.s, i, cp);
            chars.push_back(make_str_view(operand.s.substr(i, n), operand.h));
            i += n;
          }
          items = &chars;
        } else if (operand.k == VK::Array) {
          items = &operand.arr().v;
        } else {
          fail("Cannot apply filter \"join\" to type: " + std::string(type_name(operand)));
        }
        Args args = eval_args(f.list, env);
        check_no_raw(args);
        Value sep = make_str_view("");
        if (!args.pos.empty()) sep = args.pos[0];
        else if (const Value* s = args.kwarg("separator")) sep = *s;
        if (!sep.is_str()) fail("separator must be a string");
        return make_str(join_raw(*items, sep.s));
      }
      case Filter::Int:
      case Filter::Float: {
        const bool is_int = name == Filter::Int;
        Args args = eval_args(f.list, env);
        check_no_raw(args);
        Value def = is_int ? make_int(0) : make_float(0);
        if (!args.pos.empty()) def = args.pos[0];
        else if (const Value* d = args.kwarg("default")) def = *d;
        if (operand.is_str()) {
          double v = is_int ? js_parse_int(operand.s) : js_parse_float(operand.s);
          if (std::isnan(v)) return def;
          return is_int ? make_int(v) : make_float(v);
        }
        if (operand.is_num()) return operand;
        if (operand.k == VK::Bool) return is_int ? make_int(operand.b ? 1 : 0) : make_float(operand.b ? 1 : 0);
        fail("Cannot apply filter \"" + fname + "\" to type: " + type_name(operand));
      }
      case Filter::Default: {
        Args args = eval_args(f.list, env);
        check_no_raw(args);
        Value def = args.pos.empty() ? make_str_view("") : args.pos[0];
        Value boolean = make_bool(false);
        if (args.pos.size() > 1) boolean = args.pos[1];
        else if (const Value* b = args.kwarg("boolean")) boolean = *b;
        if (boolean.k != VK::Bool) fail("`default` filter flag must be a boolean");
        if (operand.is_undef() || (boolean.b && !truthy(operand))) return def;
        return operand;
      }
      default: break;
    }
    if (operand.k == VK::Array) {
      const auto& items = operand.arr().v;
      switch (name) {
        case Filter::Sort: {
          Args args = eval_args(f.list, env);
          check_no_raw(args);
          auto opt = [&](std::size_t i, std::string_view n) -> const Value* {
            if (i < args.pos.size()) return &args.pos[i];
            return args.kwarg(n);
          };
          const Value* rev = opt(0, "reverse");
          const Value* cs = opt(1, "case_sensitive");
          const Value* attr = opt(2, "attribute");
          if (rev && rev->k != VK::Bool) fail("reverse must be a boolean");
          if (cs && cs->k != VK::Bool) fail("case_sensitive must be a boolean");
          if (attr && !attr->is_str() && attr->k != VK::Int && !attr->is_none()) {
            fail("attribute must be a string, integer, or null");
          }
          const bool reverse = rev && rev->b, case_sensitive = cs && cs->b;
          std::string path;
          const bool by_attr = attr && !attr->is_none();
          if (by_attr) path = attr->is_str() ? std::string(attr->s) : js_number(attr->n);
          std::vector<Value> v = items;
          std::stable_sort(v.begin(), v.end(), [&](const Value& a, const Value& b) {
            int r = by_attr ? compare_values(attribute_path(a, path), attribute_path(b, path), case_sensitive)
                            : compare_values(a, b, case_sensitive);
            return reverse ? r > 0 : r < 0;
          });
          return make_array(std::move(v));
        }
        case Filter::Selectattr:
        case Filter::Rejectattr: {
          const bool select = name == Filter::Selectattr;
          for (const Value& item : items) {
            if (item.k != VK::Object && item.k != VK::Ns) fail("`" + fname + "` can only be applied to array of objects");
          }
          for (const auto& a : f.list) {
            if (a->kind != NK::StrLit) fail("arguments of `" + fname + "` must be strings");
          }
          if (f.list.empty()) fail("Cannot read properties of undefined (reading 'value')");
          const std::string& attr = f.list[0]->str;
          Test test = Test::Defined;
          const bool has_test = f.list.size() > 1;
          if (has_test) lookup_name(kTests, f.list[1]->str, test);  // validated at parse time
          Value arg;
          const bool has_arg = f.list.size() > 2;
          if (has_arg) arg = make_str_view(f.list[2]->str);
          std::vector<Value> out;
          for (const Value& item : items) {
            const Value* a = item.obj().find(attr);
            if (a && is_raw_undef(*a)) a = nullptr;  // JavaScript's undefined: as if missing
            bool result = false;
            if (a) result = has_test ? run_test(test, *a, has_arg ? &arg : nullptr) : truthy(*a);
            if (result == select) out.push_back(item);
          }
          return make_array(std::move(out));
        }
        case Filter::Map: {
          Args args = eval_args(f.list, env);
          check_no_raw(args);
          const Value* attr = args.kwarg("attribute");
          if (!attr) fail("`map` expressions without `attribute` set are not currently supported.");
          if (!attr->is_str()) fail("attribute must be a string");
          const Value* def = args.kwarg("default");
          std::vector<Value> out;
          out.reserve(items.size());
          for (const Value& item : items) {
            if (item.k != VK::Object && item.k != VK::Ns) fail("items in map must be an object");
            Value v = attribute_path(item, attr->s);
            if (v.is_undef() && def) v = *def;
            out.push_back(std::move(v));
          }
          return make_array(std::move(out));
        }
        default: fail("Unknown ArrayValue filter: " + fname);
      }
    }
    if (operand.is_str()) {
      switch (name) {
        case Filter::Indent: {
          Args args = eval_args(f.list, env);
          check_no_raw(args);
          auto opt = [&](std::size_t i, std::string_view n) -> const Value* {
            if (i < args.pos.size()) return &args.pos[i];
            return args.kwarg(n);
          };
          const Value* width = opt(0, "width");
          if (width && width->k != VK::Int) fail("width must be a number");
          const Value* first = opt(1, "first");
          const Value* blank = opt(2, "blank");
          double w = width ? width->n : 4;
          if (w < 0) fail("Invalid count value: " + js_number(w));
          if (w > 10000) fail("indent width is too large");
          return indent(operand, static_cast<std::size_t>(w), first && raw_truthy(*first), blank && raw_truthy(*blank));
        }
        case Filter::Replace: {
          Args args = eval_args(f.list, env);
          check_no_raw(args);
          // The reference appends the keyword arguments as one more (possibly empty) argument.
          Args call;
          call.pos = std::move(args.pos);
          call.kw = std::move(args.kw);
          if (call.kw.empty()) {
            if (call.pos.size() < 1) fail("replace() arguments must be strings");
            if (call.pos.size() == 1) fail("replace() arguments must be strings");
          }
          return call_string_method(operand, Method::Replace, call);
        }
        default: fail("Unknown StringValue filter: " + fname);
      }
    }
    if (operand.k == VK::Object) {
      Method m;
      if (lookup_name(kObjectMethods, fname, m)) {
        Args args = eval_args(f.list, env);
        check_no_raw(args);
        return call_object_method(operand, m, args);
      }
      fail("Unknown ObjectValue filter: " + fname);
    }
    fail("Cannot apply filter \"" + fname + "\" to type: " + type_name(operand));
  }

  std::string join_raw(const std::vector<Value>& items, std::string_view sep) {
    std::string out;
    for (std::size_t i = 0; i < items.size(); ++i) {
      if (i) out += sep;
      const Value& v = items[i];
      if (is_raw_undef(v)) fail("Cannot read properties of undefined (reading 'value')");
      if (!v.is_undef() && !v.is_none()) append_raw(out, v);  // Array.join: null/undefined -> ""
      check_size(out);
    }
    return out;
  }

  Value unique(const std::vector<Value>& items) {
    std::vector<Value> out;
    std::unordered_set<std::string_view> strings;
    std::unordered_set<double> numbers;
    std::unordered_set<const void*> refs;
    bool seen_nan = false, seen_true = false, seen_false = false, seen_none = false, seen_undef = false;
    for (const Value& v : items) {
      if (is_raw_undef(v)) fail("Cannot read properties of undefined (reading 'value')");
      bool fresh = false;
      switch (v.k) {
        case VK::Str: fresh = strings.insert(v.s).second; break;
        case VK::Int:
        case VK::Float:
          if (std::isnan(v.n)) {
            fresh = !seen_nan;
            seen_nan = true;
          } else {
            fresh = numbers.insert(v.n == 0 ? 0.0 : v.n).second;
          }
          break;
        case VK::Bool:
          fresh = v.b ? !seen_true : !seen_false;
          (v.b ? seen_true : seen_false) = true;
          break;
        case VK::None:
          fresh = !seen_none;
          seen_none = true;
          break;
        case VK::Undef:
          fresh = !seen_undef;
          seen_undef = true;
          break;
        default: fresh = refs.insert(v.h.get()).second; break;
      }
      if (fresh) out.push_back(v);
    }
    return make_array(std::move(out));
  }

  Value indent(const Value& operand, std::size_t width, bool first, bool blank) {
    const std::string pad(width, ' ');
    const std::string_view s = operand.s;
    std::string out;
    std::size_t start = 0, line_no = 0;
    while (true) {
      std::size_t nl = s.find('\n', start);
      std::string_view line = s.substr(start, nl == std::string_view::npos ? std::string_view::npos : nl - start);
      if (line_no > 0) out += '\n';
      if (!((!first && line_no == 0) || (!blank && line.empty()))) out += pad;
      out.append(line);
      check_size(out);
      if (nl == std::string_view::npos) break;
      start = nl + 1;
      ++line_no;
    }
    return make_str(std::move(out));
  }

  const Template::Impl& t_;
  const RenderOptions& opts_;
  int depth_ = 0;
  unsigned long long iterations_ = 0;
  unsigned long long built_ = 0;
  std::vector<Rc<ObjObj>> namespaces_;
  std::vector<Rc<Env>> captured_envs_;
};

}  // namespace

// =============================================================================================
// Public API
// =============================================================================================

Template::Template(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Template::Template(Template&&) noexcept = default;
Template& Template::operator=(Template&&) noexcept = default;
Template::~Template() = default;

Template Template::parse(std::string_view source) {
  auto impl = std::make_unique<Impl>();
  impl->source.assign(source);
  for (std::uint32_t i = 0; i < kNumFixedIds; ++i) impl->names.emplace(std::string(kFixedNames[i]), i);
  Mapped pre = preprocess(impl->source);
  Lexer lexer(impl->source, pre);
  std::vector<Token> tokens = lexer.run();
  Parser parser(std::move(tokens), impl->names);
  impl->body = parser.parse_program();
  Validator().run(impl->body);
  return Template(std::move(impl));
}

std::string Template::render(const nlohmann::json& context, const RenderOptions& options) const {
  Renderer r(*impl_, options);
  return r.render(context);
}

std::string Template::render(const nlohmann::ordered_json& context, const RenderOptions& options) const {
  Renderer r(*impl_, options);
  return r.render(context);
}

}  // namespace omni::jinja
