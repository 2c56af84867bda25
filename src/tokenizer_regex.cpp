// Oniguruma -> JavaScript -> PCRE2 pattern translation and the JavaScript match loops. See
// tokenizer_regex.hpp.
#include "tokenizer_regex.hpp"

#include <omni/tokenizer.hpp>

#include "unicode_tables.hpp"

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstring>
#include <optional>

namespace omni::tokenizer_detail {

namespace {

[[noreturn]] void regex_error(const std::string& what, std::string_view pattern) {
  std::size_t cut = std::min<std::size_t>(pattern.size(), 200);
  while (cut < pattern.size() && (static_cast<unsigned char>(pattern[cut]) & 0xC0) == 0x80) ++cut;
  std::string p(pattern.substr(0, cut));
  throw TokenizerError("regex: " + what + " in pattern \"" + p + "\"");
}

std::size_t char_len_at(std::string_view s, std::size_t i) {
  const auto b = static_cast<unsigned char>(s[i]);
  const std::size_t len = unicode::cp_len(b);
  return std::min(len, s.size() - i);
}

std::string_view char_at(std::string_view s, std::size_t i) { return s.substr(i, char_len_at(s, i)); }

bool is_ascii_letter(std::string_view c) {
  return c.size() == 1 && ((c[0] >= 'A' && c[0] <= 'Z') || (c[0] >= 'a' && c[0] <= 'z'));
}
bool is_ascii_alnum(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}
bool is_hex(char c) {
  return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F') || (c >= 'a' && c <= 'f');
}
char lower(char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; }
char upper(char c) { return c >= 'a' && c <= 'z' ? static_cast<char>(c - 32) : c; }

bool starts_with(std::string_view s, std::size_t i, std::string_view p) {
  return s.size() >= i && s.substr(i).starts_with(p);
}

// =============================================================================================
// Port of the reference's rewrite_oniguruma_to_js (src/utils/core.ts of @huggingface/tokenizers
// 0.2.0). Names and structure follow the original so the two can be compared line by line.
// =============================================================================================

const std::string kWordCharsInClass = "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}";
const std::string kWordChars = kWordCharsInClass + "\\u00B2\\u00B3\\u00B9\\u00BC-\\u00BE";
const std::string kWordClass = "[" + kWordChars + "]";
const std::string kNonWordClass = "[^" + kWordChars + "]";
const std::string kWordBoundary = "(?:(?<!" + kWordClass + ")(?=" + kWordClass + ")|(?<=" +
                                  kWordClass + ")(?!" + kWordClass + "))";
const std::string kNonWordBoundary = "(?:(?<!" + kWordClass + ")(?!" + kWordClass + ")|(?<=" +
                                     kWordClass + ")(?=" + kWordClass + "))";
const std::string kLineStart = "(?:(?<![\\s\\S])|(?<=\\n))";
const std::string kLineEnd = "(?:(?=\\n)|(?![\\s\\S]))";
const std::string kHexDigitChars = "0-9A-Fa-f";
const std::string kAnyCodePoint = "[\\s\\S]";

std::optional<std::string> escape_rewrite(std::string_view c) {
  if (c.size() != 1) return std::nullopt;
  switch (c[0]) {
    case 'A': return std::string("(?<![\\s\\S])");
    case 'z': return std::string("(?![\\s\\S])");
    case 'Z': return std::string("(?=\\n?(?![\\s\\S]))");
    case 'h': return "[" + kHexDigitChars + "]";
    case 'H': return "[^" + kHexDigitChars + "]";
    case 'w': return kWordClass;
    case 'W': return kNonWordClass;
    case 'd': return std::string("\\p{Nd}");
    case 'D': return std::string("\\P{Nd}");
    case 's': return std::string("\\p{White_Space}");
    case 'S': return std::string("\\P{White_Space}");
    case 'b': return kWordBoundary;
    case 'B': return kNonWordBoundary;
    case 'a': return std::string("\\x07");
    case 'e': return std::string("\\x1B");
    default: return std::nullopt;
  }
}

std::optional<std::string> class_escape_rewrite(std::string_view c) {
  if (c.size() != 1) return std::nullopt;
  switch (c[0]) {
    case 'h': return kHexDigitChars;
    case 'w': return kWordCharsInClass;
    case 'd': return std::string("\\p{Nd}");
    case 'D': return std::string("\\P{Nd}");
    case 's': return std::string("\\p{White_Space}");
    case 'S': return std::string("\\P{White_Space}");
    case 'a': return std::string("\\x07");
    case 'e': return std::string("\\x1B");
    default: return std::nullopt;
  }
}

std::optional<std::string> class_complement_alternative(std::string_view c) {
  if (c == "W") return "[^" + kWordCharsInClass + "]";
  if (c == "H") return "[^" + kHexDigitChars + "]";
  return std::nullopt;
}

std::optional<std::string> raw_whitespace_escape(std::string_view c) {
  if (c == "\n") return std::string("\\n");
  if (c == "\r") return std::string("\\r");
  if (c == "\t") return std::string("\\t");
  if (c == "\f") return std::string("\\f");
  if (c == "\v") return std::string("\\v");
  return std::nullopt;
}

std::optional<std::string> posix_class_fragment(std::string_view name) {
  if (name == "alpha") return std::string("\\p{Alphabetic}");
  if (name == "alnum") return std::string("\\p{Alphabetic}\\p{Nd}");
  if (name == "digit") return std::string("\\p{Nd}");
  if (name == "lower") return std::string("\\p{Lowercase}");
  if (name == "upper") return std::string("\\p{Uppercase}");
  if (name == "space") return std::string("\\p{White_Space}");
  if (name == "blank") return std::string("\\t\\p{Zs}");
  if (name == "punct") return std::string("\\p{P}\\p{S}");
  if (name == "cntrl") return std::string("\\p{Cc}");
  if (name == "word") return kWordCharsInClass;
  if (name == "xdigit") return kHexDigitChars;
  return std::nullopt;
}

constexpr std::string_view kJsSyntaxChars = "^$\\.*+?()[]{}|/";

// /^\(\?(?:<[=!]|<[A-Za-z_][A-Za-z0-9_]*>|[:=!>])/
std::size_t match_group_prefix(std::string_view s, std::size_t i) {
  if (!starts_with(s, i, "(?")) return 0;
  std::size_t j = i + 2;
  if (j >= s.size()) return 0;
  if (s[j] == '<') {
    if (j + 1 < s.size() && (s[j + 1] == '=' || s[j + 1] == '!')) return j + 2 - i;
    std::size_t k = j + 1;
    if (k < s.size() && ((s[k] >= 'A' && s[k] <= 'Z') || (s[k] >= 'a' && s[k] <= 'z') ||
                         s[k] == '_')) {
      ++k;
      while (k < s.size() && (is_ascii_alnum(s[k]) || s[k] == '_')) ++k;
      if (k < s.size() && s[k] == '>') return k + 1 - i;
    }
    return 0;
  }
  if (s[j] == ':' || s[j] == '=' || s[j] == '!' || s[j] == '>') return j + 1 - i;
  return 0;
}

// /^\\([pPxu])\{([^}]*)\}/
bool match_braced_escape(std::string_view s, std::size_t i, char& kind, std::string_view& body,
                         std::size_t& len) {
  if (i + 2 >= s.size() || s[i] != '\\') return false;
  const char k = s[i + 1];
  if (k != 'p' && k != 'P' && k != 'x' && k != 'u') return false;
  if (s[i + 2] != '{') return false;
  const std::size_t close = s.find('}', i + 3);
  if (close == std::string_view::npos) return false;
  kind = k;
  body = s.substr(i + 3, close - (i + 3));
  len = close + 1 - i;
  return true;
}

// /^\{(\d+(?:,\d*)?|,\d+)\}/ ; returns the length and the captured body.
std::size_t match_quantifier_brace(std::string_view s, std::size_t i, std::string& body) {
  if (i >= s.size() || s[i] != '{') return 0;
  std::size_t j = i + 1;
  auto digits = [&](std::size_t from) {
    std::size_t k = from;
    while (k < s.size() && s[k] >= '0' && s[k] <= '9') ++k;
    return k;
  };
  std::size_t k = digits(j);
  if (k > j) {
    if (k < s.size() && s[k] == ',') k = digits(k + 1);
  } else {
    if (j < s.size() && s[j] == ',') {
      const std::size_t m = digits(j + 1);
      if (m == j + 1) return 0;
      k = m;
    } else {
      return 0;
    }
  }
  if (k >= s.size() || s[k] != '}') return 0;
  body = std::string(s.substr(j, k - j));
  return k + 1 - i;
}

// /^(?:\\x[0-9A-Fa-f]{2}|\\u[0-9A-Fa-f]{4}|\\c[A-Za-z])/
std::size_t match_fixed_width_escape(std::string_view s, std::size_t i) {
  if (i + 1 >= s.size() || s[i] != '\\') return 0;
  const char k = s[i + 1];
  if (k == 'x' && i + 3 < s.size() && is_hex(s[i + 2]) && is_hex(s[i + 3])) return 4;
  if (k == 'u' && i + 5 < s.size() && is_hex(s[i + 2]) && is_hex(s[i + 3]) && is_hex(s[i + 4]) &&
      is_hex(s[i + 5])) {
    return 6;
  }
  if (k == 'c' && i + 2 < s.size() && is_ascii_letter(s.substr(i + 2, 1))) return 3;
  return 0;
}

std::optional<std::string> ascii_folded_hex_atom(std::string_view hex) {
  if (hex.empty() || hex.size() > 8) return std::nullopt;
  unsigned long v = 0;
  for (char c : hex) {
    if (!is_hex(c)) return std::nullopt;
    v = v * 16 + static_cast<unsigned long>(c <= '9' ? c - '0' : (lower(c) - 'a' + 10));
  }
  if (v > 127) return std::nullopt;
  const char c = static_cast<char>(v);
  if (!is_ascii_letter(std::string_view(&c, 1))) return std::nullopt;
  return std::string("[") + lower(c) + upper(c) + "]";
}

// regex.replace(/\[\^\(\\s\|\[([^\]]+)\]\)\]/g, "[^()|\\s$1]")
std::string normalize_bloom_split_char_class(std::string_view re) {
  static constexpr std::string_view kHead = "[^(\\s|[";
  std::string out;
  std::size_t i = 0;
  while (i < re.size()) {
    if (starts_with(re, i, kHead)) {
      const std::size_t body_start = i + kHead.size();
      std::size_t k = body_start;
      while (k < re.size() && re[k] != ']') ++k;
      if (k > body_start && starts_with(re, k, "])]")) {
        out += "[^()|\\s";
        out.append(re.substr(body_start, k - body_start));
        out += "]";
        i = k + 3;
        continue;
      }
    }
    out.push_back(re[i]);
    ++i;
  }
  return out;
}

enum class Tail { kNone, kSet, kScalar, kRange, kCompleteRange };

struct Operand {
  std::string fragment;
  std::vector<std::string> alternatives;
  Tail tail = Tail::kNone;
  bool contains_complex_set = false;
};

[[noreturn]] void range_error(std::string_view re, std::size_t index) {
  regex_error("unsupported range with a set-valued character-class operand at index " +
                  std::to_string(index),
              re);
}

void add_character_class_atom(std::string_view re, Operand& op, const std::string& atom,
                              std::size_t index, bool contains_complex_set = true) {
  if (op.tail == Tail::kRange) range_error(re, index);
  op.alternatives.push_back(atom);
  op.tail = Tail::kSet;
  op.contains_complex_set = op.contains_complex_set || contains_complex_set;
}

void append_character_class_fragment(std::string_view re, Operand& op,
                                     const std::string& fragment, bool set_valued = false,
                                     std::size_t index = 0) {
  if (set_valued && op.tail == Tail::kRange) range_error(re, index);
  if (op.tail == Tail::kRange) {
    op.fragment += fragment;
    op.tail = Tail::kCompleteRange;
    return;
  }
  op.fragment += fragment;
  op.tail = set_valued ? Tail::kSet : Tail::kScalar;
  op.contains_complex_set = op.contains_complex_set || set_valued;
}

std::size_t rewrite_character_class_escape(std::string_view re, std::size_t index, Operand& op) {
  char kind = 0;
  std::string_view body;
  std::size_t len = 0;
  if (match_braced_escape(re, index, kind, body, len)) {
    const std::string text(re.substr(index, len));
    if (kind == 'P' && body == "Word") {
      add_character_class_atom(re, op, "[^" + kWordCharsInClass + "]", index);
    } else {
      const std::string replacement = kind == 'x' ? "\\u{" + std::string(body) + "}"
                                      : (kind == 'p' && body == "Word") ? kWordCharsInClass
                                                                        : text;
      append_character_class_fragment(re, op, replacement, kind == 'p' || kind == 'P', index);
    }
    return index + len;
  }
  if (const std::size_t fixed = match_fixed_width_escape(re, index)) {
    append_character_class_fragment(re, op, std::string(re.substr(index, fixed)));
    return index + fixed;
  }
  if (index + 1 >= re.size()) {
    regex_error("unterminated escape in character class at index " + std::to_string(index), re);
  }
  const std::string_view next = char_at(re, index + 1);
  const std::size_t next_end = index + 1 + next.size();
  if (auto raw = raw_whitespace_escape(next)) {
    append_character_class_fragment(re, op, *raw);
    return next_end;
  }
  if (auto complement = class_complement_alternative(next)) {
    add_character_class_atom(re, op, *complement, index);
    return next_end;
  }
  std::string replacement;
  bool set_valued = false;
  if (auto rewrite = class_escape_rewrite(next)) {
    replacement = *rewrite;
    set_valued = next != "a" && next != "e";
  } else if (next.size() == 1 && is_ascii_alnum(next[0])) {
    replacement = "\\" + std::string(next);
  } else if (next.size() == 1 && (kJsSyntaxChars.find(next[0]) != std::string_view::npos ||
                                  next[0] == '-')) {
    replacement = "\\" + std::string(next);
  } else {
    replacement = std::string(next);
  }
  append_character_class_fragment(re, op, replacement, set_valued, index);
  return next_end;
}

std::string compile_character_set_union(const std::vector<std::string>& pieces) {
  if (pieces.size() == 1) return pieces[0];
  std::string joined;
  for (std::size_t k = 0; k < pieces.size(); ++k) {
    if (k) joined += "|";
    joined += pieces[k];
  }
  return "(?:(?=(?:" + joined + "))" + kAnyCodePoint + ")";
}

std::string compile_character_class_operand(const Operand& op) {
  std::vector<std::string> pieces;
  if (!op.fragment.empty()) pieces.push_back("[" + op.fragment + "]");
  pieces.insert(pieces.end(), op.alternatives.begin(), op.alternatives.end());
  if (pieces.empty()) pieces.push_back("[]");  // cannot happen (empty operands are rejected)
  return compile_character_set_union(pieces);
}

std::string get_ascii_fold_additions(const std::string& positive_atom) {
  std::string additions;
  for (char c = 'A'; c <= 'Z'; ++c) {
    const char l = lower(c);
    const bool has_upper = Regex::full_match(positive_atom, std::string_view(&c, 1));
    const bool has_lower = Regex::full_match(positive_atom, std::string_view(&l, 1));
    if (has_upper != has_lower) additions.push_back(has_upper ? l : c);
  }
  return additions;
}

struct ParsedClass {
  std::string atom;
  std::size_t end;
  bool negated;
  bool contains_complex_set;
  bool contains_nested_negated_complex_set;
};

ParsedClass parse_character_class(std::string_view re, std::size_t start, bool ascii_fold,
                                  bool apply_ascii_fold = true, int nesting_depth = 1) {
  if (nesting_depth > 256) {
    regex_error("maximum character-class nesting depth of 256 exceeded", re);
  }
  std::size_t i = start + 1;
  const bool negated = i < re.size() && re[i] == '^';
  if (negated) ++i;
  const std::size_t first_content_index = i;
  std::vector<Operand> operands(1);
  bool contains_nested_negated_complex_set = false;
  while (i < re.size()) {
    Operand& op = operands.back();
    const std::string_view ch = char_at(re, i);
    if (ch == "\\") {
      i = rewrite_character_class_escape(re, i, op);
      continue;
    }
    if (ch == "]") {
      if (i == first_content_index) {
        append_character_class_fragment(re, op, "\\]");
        ++i;
        continue;
      }
      if (op.tail == Tail::kNone) {
        if (operands.size() > 1) {
          regex_error("malformed character-class intersection with an empty operand", re);
        }
        regex_error("empty character class at index " + std::to_string(start), re);
      }
      bool contains_complex_set = false;
      for (const auto& o : operands) contains_complex_set |= o.contains_complex_set;
      if (negated && operands.size() > 1 && contains_nested_negated_complex_set) {
        regex_error(
            "unsupported outer-negated character-class intersection with a nested negated class",
            re);
      }
      const std::string first_atom = compile_character_class_operand(operands[0]);
      std::string positive_atom = first_atom;
      if (operands.size() > 1) {
        std::string lookaheads;
        for (std::size_t j = 1; j < operands.size(); ++j) {
          lookaheads += "(?=" + compile_character_class_operand(operands[j]) + ")";
        }
        positive_atom = "(?:" + lookaheads + first_atom + ")";
      }
      const bool is_direct_class = operands.size() == 1 && op.alternatives.empty();
      std::string direct_fragment = op.fragment;
      if (ascii_fold && apply_ascii_fold) {
        const std::string additions = get_ascii_fold_additions(positive_atom);
        if (!additions.empty()) {
          if (is_direct_class) {
            direct_fragment += additions;
            positive_atom = "[" + direct_fragment + "]";
          } else {
            positive_atom = compile_character_set_union({positive_atom, "[" + additions + "]"});
          }
        }
      }
      const std::string atom = negated ? (is_direct_class ? "[^" + direct_fragment + "]"
                                                          : "(?:(?!" + positive_atom + ")" +
                                                                kAnyCodePoint + ")")
                                       : positive_atom;
      return {atom, i + 1, negated, contains_complex_set, contains_nested_negated_complex_set};
    }
    if (starts_with(re, i, "&&")) {
      if (op.tail == Tail::kNone) {
        regex_error("malformed character-class intersection with an empty operand", re);
      }
      operands.emplace_back();
      i += 2;
      continue;
    }
    if (ch == "[") {
      if (starts_with(re, i, "[:^:]")) {
        regex_error("malformed empty negated POSIX character class", re);
      }
      // /^\[:(\^?)(\p{Alphabetic}+):\]/u -- POSIX class names are ASCII letters in practice;
      // other alphabetic characters cannot name a known class and fail below either way.
      if (starts_with(re, i, "[:")) {
        std::size_t k = i + 2;
        const bool posix_negated = k < re.size() && re[k] == '^';
        if (posix_negated) ++k;
        const std::size_t name_start = k;
        while (k < re.size() && ((re[k] >= 'a' && re[k] <= 'z') || (re[k] >= 'A' && re[k] <= 'Z'))) {
          ++k;
        }
        if (k > name_start && starts_with(re, k, ":]")) {
          const std::string_view name = re.substr(name_start, k - name_start);
          const auto fragment = posix_class_fragment(name);
          if (!fragment) {
            regex_error("unsupported POSIX character class \"" + std::string(name) + "\"", re);
          }
          if (ascii_fold && posix_negated && (name == "lower" || name == "upper")) {
            regex_error("unsupported negated POSIX " + std::string(name) +
                            " class inside an inline case-insensitive group",
                        re);
          }
          if (posix_negated) {
            add_character_class_atom(re, op, "[^" + *fragment + "]", i);
          } else {
            append_character_class_fragment(re, op, *fragment, true, i);
          }
          i = k + 2;
          continue;
        }
      }
      // /^\[(?:\.[^\]]*\.\]|=[^\]]*=\])/
      if (starts_with(re, i, "[.") || starts_with(re, i, "[=")) {
        const char d = re[i + 1];
        const std::size_t close = re.find(']', i + 2);
        if (close != std::string_view::npos && close > i + 2 && re[close - 1] == d) {
          regex_error("unsupported POSIX collating or equivalence bracket expression", re);
        }
      }
      ParsedClass nested = parse_character_class(re, i, ascii_fold, false, nesting_depth + 1);
      add_character_class_atom(re, operands.back(), nested.atom, i, nested.contains_complex_set);
      contains_nested_negated_complex_set = contains_nested_negated_complex_set ||
                                            nested.contains_nested_negated_complex_set ||
                                            (nested.negated && nested.contains_complex_set);
      i = nested.end;
      continue;
    }
    if (ch == "-") {
      const bool is_terminal_literal =
          (i + 1 < re.size() && re[i + 1] == ']') || starts_with(re, i + 1, "&&");
      if (op.tail == Tail::kSet && !is_terminal_literal) range_error(re, i);
      if (op.tail == Tail::kNone || op.tail == Tail::kRange || op.tail == Tail::kCompleteRange ||
          is_terminal_literal) {
        append_character_class_fragment(re, op, "\\-");
      } else {
        op.fragment += "-";
        op.tail = Tail::kRange;
      }
      ++i;
      continue;
    }
    append_character_class_fragment(
        re, op, ch == "^" && op.fragment.empty() ? std::string("\\^") : std::string(ch));
    i += ch.size();
  }
  regex_error(operands.size() > 1 ? "unterminated character-class intersection"
                                  : "unterminated character class",
              re);
}

}  // namespace

std::string rewrite_oniguruma_to_js(std::string_view onig) {
  const std::string normalized = normalize_bloom_split_char_class(onig);
  const std::string_view re = normalized;
  std::string out;
  std::ptrdiff_t atom_start = -1;
  bool last_was_quantifier = false;
  bool ascii_fold = false;
  std::vector<std::pair<std::ptrdiff_t, bool>> group_states;
  auto emit_atom = [&](const std::string& text) {
    atom_start = static_cast<std::ptrdiff_t>(out.size());
    out += text;
    last_was_quantifier = false;
  };
  for (std::size_t i = 0; i < re.size();) {
    const std::string_view ch = char_at(re, i);
    if (ch == "\\") {
      char kind = 0;
      std::string_view body;
      std::size_t len = 0;
      if (match_braced_escape(re, i, kind, body, len)) {
        std::string replacement(re.substr(i, len));
        if (kind == 'x') {
          const std::string code_point_escape = "\\u{" + std::string(body) + "}";
          replacement = ascii_fold ? ascii_folded_hex_atom(body).value_or(code_point_escape)
                                   : code_point_escape;
        } else if (body == "Word") {
          replacement = kind == 'p' ? kWordClass : kNonWordClass;
        }
        emit_atom(replacement);
        i += len;
        continue;
      }
      if (const std::size_t fixed = match_fixed_width_escape(re, i)) {
        const std::string text(re.substr(i, fixed));
        const std::string replacement =
            ascii_fold && text[1] != 'c' ? ascii_folded_hex_atom(text.substr(2)).value_or(text)
                                         : text;
        emit_atom(replacement);
        i += fixed;
        continue;
      }
      if (i + 1 >= re.size()) {
        out += ch;
        break;
      }
      const std::string_view next = char_at(re, i + 1);
      i += 1 + next.size();
      if (next == "G") continue;
      if (auto raw = raw_whitespace_escape(next)) {
        emit_atom(*raw);
        continue;
      }
      std::string replacement;
      if (auto rewrite = escape_rewrite(next)) {
        replacement = *rewrite;
      } else if (next.size() == 1 && is_ascii_alnum(next[0])) {
        replacement = "\\" + std::string(next);
      } else if (next.size() == 1 && kJsSyntaxChars.find(next[0]) != std::string_view::npos) {
        replacement = "\\" + std::string(next);
      } else {
        replacement = std::string(next);
      }
      emit_atom(replacement);
      continue;
    }
    const char c = ch[0];
    if (ch.size() == 1) {
      switch (c) {
        case '[': {
          ParsedClass parsed = parse_character_class(re, i, ascii_fold);
          emit_atom(parsed.atom);
          i = parsed.end;
          continue;
        }
        case ']':
          emit_atom("\\]");
          ++i;
          continue;
        case '.':
          emit_atom("[^\\n]");
          ++i;
          continue;
        case '^':
          emit_atom(kLineStart);
          ++i;
          continue;
        case '$':
          emit_atom(kLineEnd);
          ++i;
          continue;
        case '(': {
          const bool inline_case_insensitive = starts_with(re, i, "(?i:");
          std::string source_prefix;
          if (inline_case_insensitive) {
            source_prefix = "(?i:";
          } else if (const std::size_t g = match_group_prefix(re, i)) {
            source_prefix = std::string(re.substr(i, g));
          } else {
            source_prefix = "(";
          }
          const std::string output_prefix =
              inline_case_insensitive ? "(?:" : (source_prefix == "(?>" ? "(?:" : source_prefix);
          group_states.emplace_back(static_cast<std::ptrdiff_t>(out.size()), ascii_fold);
          if (inline_case_insensitive) ascii_fold = true;
          out += output_prefix;
          last_was_quantifier = false;
          i += source_prefix.size();
          continue;
        }
        case ')':
          out += ')';
          if (group_states.empty()) {
            atom_start = -1;
            ascii_fold = false;
          } else {
            atom_start = group_states.back().first;
            ascii_fold = group_states.back().second;
            group_states.pop_back();
          }
          last_was_quantifier = false;
          ++i;
          continue;
        case '|':
          out += '|';
          atom_start = -1;
          last_was_quantifier = false;
          ++i;
          continue;
        case '{': {
          std::string qbody;
          const std::size_t qlen = match_quantifier_brace(re, i, qbody);
          if (qlen == 0 || atom_start < 0) {
            emit_atom("\\{");
            ++i;
            continue;
          }
          const std::string body = qbody[0] == ',' ? "0" + qbody : qbody;
          i += qlen;
          const char following = i < re.size() ? re[i] : '\0';
          if (following == '+' || following == '*') {
            const auto as = static_cast<std::size_t>(atom_start);
            out = out.substr(0, as) + "(?:" + out.substr(as) + "{" + body + "})" + following;
            ++i;
          } else {
            out += "{" + body + "}";
          }
          last_was_quantifier = true;
          continue;
        }
        case '}':
          emit_atom("\\}");
          ++i;
          continue;
        case '+':
          if (last_was_quantifier) {
            ++i;
            continue;
          }
          out += '+';
          last_was_quantifier = true;
          ++i;
          continue;
        case '*':
        case '?':
          out += c;
          last_was_quantifier = true;
          ++i;
          continue;
        default:
          break;
      }
    }
    if (ascii_fold && is_ascii_letter(ch)) {
      emit_atom(std::string("[") + lower(c) + upper(c) + "]");
    } else {
      emit_atom(std::string(ch));
    }
    i += ch.size();
  }
  return out;
}

// =============================================================================================
// JavaScript (u flag) -> PCRE2
// =============================================================================================

namespace {

// JavaScript's \s under the u flag (WhiteSpace + LineTerminator), as class contents.
constexpr std::string_view kJsSpaceClass =
    "\\x{9}-\\x{D}\\x{20}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}"
    "\\x{205F}\\x{3000}\\x{FEFF}";
constexpr std::string_view kJsWordClass = "A-Za-z0-9_";

std::string hex_cp(char32_t cp) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "\\x{%X}", static_cast<unsigned>(cp));
  return buf;
}

// Ranges as PCRE2 class contents (surrogates cannot be named in UTF mode; the tables never
// contain them).
std::string ranges_fragment(std::span<const unicode::CodeRange> ranges) {
  std::string out;
  for (const auto& r : ranges) {
    out += hex_cp(r.lo);
    if (r.hi != r.lo) out += "-" + hex_cp(r.hi);
  }
  return out;
}

struct GcName {
  const char* short_name;
  const char* long_name;
  const char* alias;
};
constexpr GcName kGeneralCategories[] = {
    {"C", "Other", nullptr},
    {"Cc", "Control", "cntrl"},
    {"Cf", "Format", nullptr},
    {"Cn", "Unassigned", nullptr},
    {"Co", "Private_Use", nullptr},
    {"Cs", "Surrogate", nullptr},
    {"L", "Letter", nullptr},
    {"LC", "Cased_Letter", nullptr},
    {"Ll", "Lowercase_Letter", nullptr},
    {"Lm", "Modifier_Letter", nullptr},
    {"Lo", "Other_Letter", nullptr},
    {"Lt", "Titlecase_Letter", nullptr},
    {"Lu", "Uppercase_Letter", nullptr},
    {"M", "Mark", "Combining_Mark"},
    {"Mc", "Spacing_Mark", nullptr},
    {"Me", "Enclosing_Mark", nullptr},
    {"Mn", "Nonspacing_Mark", nullptr},
    {"N", "Number", nullptr},
    {"Nd", "Decimal_Number", "digit"},
    {"Nl", "Letter_Number", nullptr},
    {"No", "Other_Number", nullptr},
    {"P", "Punctuation", "punct"},
    {"Pc", "Connector_Punctuation", nullptr},
    {"Pd", "Dash_Punctuation", nullptr},
    {"Pe", "Close_Punctuation", nullptr},
    {"Pf", "Final_Punctuation", nullptr},
    {"Pi", "Initial_Punctuation", nullptr},
    {"Po", "Other_Punctuation", nullptr},
    {"Ps", "Open_Punctuation", nullptr},
    {"S", "Symbol", nullptr},
    {"Sc", "Currency_Symbol", nullptr},
    {"Sk", "Modifier_Symbol", nullptr},
    {"Sm", "Math_Symbol", nullptr},
    {"So", "Other_Symbol", nullptr},
    {"Z", "Separator", nullptr},
    {"Zl", "Line_Separator", nullptr},
    {"Zp", "Paragraph_Separator", nullptr},
    {"Zs", "Space_Separator", nullptr},
};

const char* general_category(std::string_view name) {
  for (const auto& g : kGeneralCategories) {
    if (name == g.short_name || name == g.long_name || (g.alias && name == g.alias)) {
      return g.short_name;
    }
  }
  return nullptr;
}

struct BinaryProperty {
  const char* name;
  const char* alias;
};
// The binary properties of ECMAScript's table that PCRE2 10.42 also knows.
constexpr BinaryProperty kBinaryProperties[] = {
    {"ASCII_Hex_Digit", "AHex"},
    {"Alphabetic", "Alpha"},
    {"Bidi_Control", "Bidi_C"},
    {"Bidi_Mirrored", "Bidi_M"},
    {"Case_Ignorable", "CI"},
    {"Cased", nullptr},
    {"Changes_When_Casefolded", "CWCF"},
    {"Changes_When_Casemapped", "CWCM"},
    {"Changes_When_Lowercased", "CWL"},
    {"Changes_When_Titlecased", "CWT"},
    {"Changes_When_Uppercased", "CWU"},
    {"Dash", nullptr},
    {"Default_Ignorable_Code_Point", "DI"},
    {"Deprecated", "Dep"},
    {"Diacritic", "Dia"},
    {"Emoji", nullptr},
    {"Emoji_Component", "EComp"},
    {"Emoji_Modifier", "EMod"},
    {"Emoji_Modifier_Base", "EBase"},
    {"Emoji_Presentation", "EPres"},
    {"Extended_Pictographic", "ExtPict"},
    {"Extender", "Ext"},
    {"Grapheme_Base", "Gr_Base"},
    {"Grapheme_Extend", "Gr_Ext"},
    {"Hex_Digit", "Hex"},
    {"IDS_Binary_Operator", "IDSB"},
    {"IDS_Trinary_Operator", "IDST"},
    {"ID_Continue", "IDC"},
    {"ID_Start", "IDS"},
    {"Ideographic", "Ideo"},
    {"Join_Control", "Join_C"},
    {"Logical_Order_Exception", "LOE"},
    {"Lowercase", "Lower"},
    {"Math", nullptr},
    {"Noncharacter_Code_Point", "NChar"},
    {"Pattern_Syntax", "Pat_Syn"},
    {"Pattern_White_Space", "Pat_WS"},
    {"Quotation_Mark", "QMark"},
    {"Radical", nullptr},
    {"Regional_Indicator", "RI"},
    {"Sentence_Terminal", "STerm"},
    {"Soft_Dotted", "SD"},
    {"Terminal_Punctuation", "Term"},
    {"Unified_Ideograph", "UIdeo"},
    {"Uppercase", "Upper"},
    {"Variation_Selector", "VS"},
    {"White_Space", "space"},
    {"XID_Continue", "XIDC"},
    {"XID_Start", "XIDS"},
};

const char* binary_property(std::string_view name) {
  for (const auto& b : kBinaryProperties) {
    if (name == b.name || (b.alias && name == b.alias)) return b.name;
  }
  return nullptr;
}

bool is_script_name(std::string_view v) {
  if (v.empty()) return false;
  return std::all_of(v.begin(), v.end(), [](char c) { return is_ascii_alnum(c) || c == '_'; });
}

// A \p{..} / \P{..} as PCRE2: either plain class contents (`simple`) or a standalone atom.
struct PropertyPiece {
  bool simple;
  std::string text;
};

PropertyPiece property_piece(std::string_view body, bool negated, std::string_view pattern) {
  std::string base;  // PCRE2 \p{..} of the same name ("" when PCRE2 lacks it)
  const unicode::PropertyDelta* delta = nullptr;
  bool all = false, ascii = false;
  const std::size_t eq = body.find('=');
  if (eq != std::string_view::npos) {
    const std::string_view key = body.substr(0, eq), value = body.substr(eq + 1);
    if (key == "General_Category" || key == "gc") {
      const char* gc = general_category(value);
      if (!gc) regex_error("invalid property name \\p{" + std::string(body) + "}", pattern);
      base = std::string("\\p{") + gc + "}";
      delta = unicode::property_delta(gc);
    } else if ((key == "Script" || key == "sc") && is_script_name(value)) {
      // Script tables are PCRE2's (Unicode 14): no difference table for scripts.
      base = "\\p{sc:" + std::string(value) + "}";
    } else if ((key == "Script_Extensions" || key == "scx") && is_script_name(value)) {
      base = "\\p{scx:" + std::string(value) + "}";
    } else {
      regex_error("invalid property name \\p{" + std::string(body) + "}", pattern);
    }
  } else if (const char* gc = general_category(body)) {
    base = std::string("\\p{") + gc + "}";
    delta = unicode::property_delta(gc);
  } else if (const char* bin = binary_property(body)) {
    base = std::string("\\p{") + bin + "}";
    delta = unicode::property_delta(bin);
  } else if (body == "Any") {
    all = true;
  } else if (body == "ASCII") {
    ascii = true;
  } else if (body == "Assigned") {
    // Assigned = not Cn.
    negated = !negated;
    base = "\\p{Cn}";
    delta = unicode::property_delta("Cn");
  } else if (is_script_name(body)) {
    // compile_unicode_regexp retries an unknown name as Script=name.
    base = "\\p{sc:" + std::string(body) + "}";
  } else {
    regex_error("invalid property name \\p{" + std::string(body) + "}", pattern);
  }
  if (all) return negated ? PropertyPiece{false, "(?!)"} : PropertyPiece{true, "\\x{0}-\\x{10FFFF}"};
  if (ascii) {
    return PropertyPiece{true, negated ? "\\x{80}-\\x{10FFFF}" : "\\x{0}-\\x{7F}"};
  }
  std::string add, rem;
  if (delta) {
    if (delta->pcre_unknown) base.clear();
    add = ranges_fragment(delta->add);
    rem = ranges_fragment(delta->remove);
  }
  const std::string positive = base + add;
  if (!negated) {
    if (rem.empty()) return {true, positive};
    return {false, "(?:(?![" + rem + "])[" + positive + "])"};
  }
  if (add.empty() && rem.empty() && !base.empty()) {
    return {true, "\\P" + base.substr(2)};
  }
  if (rem.empty()) return {false, "[^" + positive + "]"};
  return {false, "(?:[" + rem + "]|[^" + positive + "])"};
}

class JsTranslator {
 public:
  explicit JsTranslator(std::string_view src) : s_(src) {}

  std::string run() {
    prescan();
    while (i_ < s_.size()) term();
    if (!groups_.empty()) fail("unterminated group");
    return out_;
  }

 private:
  enum class Group { kCapture, kNonCapture, kLookahead, kLookbehind };

  [[noreturn]] void fail(const std::string& what) { regex_error(what, s_); }

  // Counts capture groups and collects their names (backreferences may point forward).
  void prescan() {
    bool in_class = false;
    for (std::size_t k = 0; k < s_.size(); ++k) {
      const char c = s_[k];
      if (c == '\\') {
        ++k;
        continue;
      }
      if (in_class) {
        if (c == ']') in_class = false;
        continue;
      }
      if (c == '[') {
        in_class = true;
      } else if (c == '(') {
        if (k + 1 < s_.size() && s_[k + 1] == '?') {
          if (k + 2 < s_.size() && s_[k + 2] == '<' && k + 3 < s_.size() && s_[k + 3] != '=' &&
              s_[k + 3] != '!') {
            const std::size_t close = s_.find('>', k + 3);
            if (close != std::string_view::npos) {
              names_.emplace_back(s_.substr(k + 3, close - (k + 3)));
            }
            ++captures_;
          }
        } else {
          ++captures_;
        }
      }
    }
  }

  void literal(char32_t cp) {
    if (cp < 0x80 && is_ascii_alnum(static_cast<char>(cp))) {
      out_.push_back(static_cast<char>(cp));
    } else {
      out_ += hex_cp(cp);
    }
  }

  unsigned hex_value(std::size_t from, std::size_t count) {
    unsigned v = 0;
    for (std::size_t k = from; k < from + count; ++k) {
      const char c = s_[k];
      v = v * 16 + static_cast<unsigned>(c <= '9' ? c - '0' : (lower(c) - 'a' + 10));
    }
    return v;
  }

  // \u escapes at i_ (pointing at 'u'); returns the code point or a lone surrogate value.
  char32_t unicode_escape() {
    if (i_ + 1 < s_.size() && s_[i_ + 1] == '{') {
      std::size_t k = i_ + 2;
      while (k < s_.size() && is_hex(s_[k])) ++k;
      if (k == i_ + 2 || k >= s_.size() || s_[k] != '}') fail("invalid Unicode escape");
      if (k - (i_ + 2) > 8) fail("invalid Unicode escape");
      const unsigned v = hex_value(i_ + 2, k - (i_ + 2));
      if (v > 0x10FFFF) fail("invalid Unicode escape");
      i_ = k + 1;
      return v;
    }
    if (i_ + 4 >= s_.size() + 0 || i_ + 5 > s_.size()) fail("invalid Unicode escape");
    for (std::size_t k = i_ + 1; k < i_ + 5; ++k) {
      if (!is_hex(s_[k])) fail("invalid Unicode escape");
    }
    unsigned v = hex_value(i_ + 1, 4);
    i_ += 5;
    if (v >= 0xD800 && v <= 0xDBFF && starts_with(s_, i_, "\\u") && i_ + 6 <= s_.size()) {
      bool ok = true;
      for (std::size_t k = i_ + 2; k < i_ + 6; ++k) ok = ok && is_hex(s_[k]);
      if (ok) {
        const unsigned lo = hex_value(i_ + 2, 4);
        if (lo >= 0xDC00 && lo <= 0xDFFF) {
          v = 0x10000 + ((v - 0xD800) << 10) + (lo - 0xDC00);
          i_ += 6;
        }
      }
    }
    return v;
  }

  static bool is_surrogate(char32_t v) { return v >= 0xD800 && v <= 0xDFFF; }

  // Escapes that denote one character, shared by both contexts (i_ at the letter after '\').
  // Returns false when the escape is not a character escape.
  bool character_escape(char32_t& cp) {
    const char c = s_[i_];
    switch (c) {
      case 'f': cp = 0x0C; ++i_; return true;
      case 'n': cp = 0x0A; ++i_; return true;
      case 'r': cp = 0x0D; ++i_; return true;
      case 't': cp = 0x09; ++i_; return true;
      case 'v': cp = 0x0B; ++i_; return true;
      case '0':
        if (i_ + 1 < s_.size() && s_[i_ + 1] >= '0' && s_[i_ + 1] <= '9') {
          fail("invalid decimal escape");
        }
        cp = 0;
        ++i_;
        return true;
      case 'c':
        if (i_ + 1 < s_.size() && is_ascii_letter(s_.substr(i_ + 1, 1))) {
          cp = static_cast<char32_t>(s_[i_ + 1]) % 32;
          i_ += 2;
          return true;
        }
        fail("invalid unicode escape \\c");
      case 'x':
        if (i_ + 2 < s_.size() && is_hex(s_[i_ + 1]) && is_hex(s_[i_ + 2])) {
          cp = hex_value(i_ + 1, 2);
          i_ += 3;
          return true;
        }
        fail("invalid escape \\x");
      case 'u':
        cp = unicode_escape();
        return true;
      default:
        if (kJsSyntaxChars.find(c) != std::string_view::npos) {
          cp = static_cast<unsigned char>(c);
          ++i_;
          return true;
        }
        return false;
    }
  }

  std::string property_body() {
    // i_ at 'p' or 'P'
    if (i_ + 1 >= s_.size() || s_[i_ + 1] != '{') fail("invalid property name");
    const std::size_t close = s_.find('}', i_ + 2);
    if (close == std::string_view::npos) fail("invalid property name");
    std::string body(s_.substr(i_ + 2, close - (i_ + 2)));
    i_ = close + 1;
    return body;
  }

  void atom_escape() {
    ++i_;  // the backslash
    if (i_ >= s_.size()) fail("\\ at end of pattern");
    const char c = s_[i_];
    switch (c) {
      case 'd': out_ += "[0-9]"; ++i_; quantifiable_ = true; return;
      case 'D': out_ += "[^0-9]"; ++i_; quantifiable_ = true; return;
      case 'w': out_ += "[" + std::string(kJsWordClass) + "]"; ++i_; quantifiable_ = true; return;
      case 'W': out_ += "[^" + std::string(kJsWordClass) + "]"; ++i_; quantifiable_ = true; return;
      case 's': out_ += "[" + std::string(kJsSpaceClass) + "]"; ++i_; quantifiable_ = true; return;
      case 'S': out_ += "[^" + std::string(kJsSpaceClass) + "]"; ++i_; quantifiable_ = true; return;
      case 'b':
      case 'B': {
        const std::string w = "[" + std::string(kJsWordClass) + "]";
        out_ += c == 'b' ? "(?:(?<=" + w + ")(?!" + w + ")|(?<!" + w + ")(?=" + w + "))"
                         : "(?:(?<=" + w + ")(?=" + w + ")|(?<!" + w + ")(?!" + w + "))";
        ++i_;
        quantifiable_ = false;
        return;
      }
      case 'p':
      case 'P': {
        const std::string body = property_body();
        const PropertyPiece p = property_piece(body, c == 'P', s_);
        out_ += p.simple ? "[" + p.text + "]" : p.text;
        quantifiable_ = true;
        return;
      }
      case 'k': {
        if (names_.empty() || i_ + 1 >= s_.size() || s_[i_ + 1] != '<') fail("invalid named reference");
        const std::size_t close = s_.find('>', i_ + 2);
        if (close == std::string_view::npos) fail("invalid named reference");
        const std::string name(s_.substr(i_ + 2, close - (i_ + 2)));
        if (std::find(names_.begin(), names_.end(), name) == names_.end()) {
          fail("invalid named capture referenced");
        }
        out_ += "\\k<" + name + ">";
        i_ = close + 1;
        quantifiable_ = true;
        return;
      }
      default:
        break;
    }
    if (c >= '1' && c <= '9') {
      std::size_t k = i_;
      unsigned long n = 0;
      while (k < s_.size() && s_[k] >= '0' && s_[k] <= '9' && n < 100000) {
        n = n * 10 + static_cast<unsigned long>(s_[k] - '0');
        ++k;
      }
      if (n > captures_) fail("invalid escape (back reference to a missing group)");
      out_ += "\\g{" + std::to_string(n) + "}";
      i_ = k;
      quantifiable_ = true;
      return;
    }
    char32_t cp = 0;
    if (!character_escape(cp)) fail("invalid escape \\" + std::string(char_at(s_, i_)));
    if (is_surrogate(cp)) {
      out_ += "(?!)";  // a lone surrogate: never present in valid UTF-8 text
    } else {
      literal(cp);
    }
    quantifiable_ = true;
  }

  struct ClassAtom {
    bool is_char = true;
    char32_t cp = 0;
    bool simple = true;  // set: plain class contents; otherwise a standalone atom
    std::string text;
  };

  ClassAtom class_atom() {
    ClassAtom a;
    if (s_[i_] != '\\') {
      const std::size_t len = char_len_at(s_, i_);
      std::size_t k = i_;
      a.cp = unicode::next_cp(s_, k);
      i_ += len;
      return a;
    }
    ++i_;
    if (i_ >= s_.size()) fail("\\ at end of pattern");
    const char c = s_[i_];
    auto set = [&](bool simple, std::string text) {
      a.is_char = false;
      a.simple = simple;
      a.text = std::move(text);
      ++i_;
      return a;
    };
    switch (c) {
      case 'd': return set(true, "0-9");
      case 'D': return set(false, "[^0-9]");
      case 'w': return set(true, std::string(kJsWordClass));
      case 'W': return set(false, "[^" + std::string(kJsWordClass) + "]");
      case 's': return set(true, std::string(kJsSpaceClass));
      case 'S': return set(false, "[^" + std::string(kJsSpaceClass) + "]");
      case 'b': a.cp = 0x08; ++i_; return a;
      case '-': a.cp = '-'; ++i_; return a;
      case 'p':
      case 'P': {
        const std::string body = property_body();
        const PropertyPiece p = property_piece(body, c == 'P', s_);
        a.is_char = false;
        a.simple = p.simple;
        a.text = p.text;
        return a;
      }
      default:
        break;
    }
    if (!character_escape(a.cp)) fail("invalid class escape");
    return a;
  }

  void char_class() {
    ++i_;  // '['
    bool negated = false;
    if (i_ < s_.size() && s_[i_] == '^') {
      negated = true;
      ++i_;
    }
    std::string simple;
    std::vector<std::string> complex;
    bool drop_surrogates = false;
    auto add_char = [&](char32_t cp) {
      if (is_surrogate(cp)) {
        drop_surrogates = true;
        return;
      }
      simple += hex_cp(cp);
    };
    for (;;) {
      if (i_ >= s_.size()) fail("unterminated character class");
      if (s_[i_] == ']') {
        ++i_;
        break;
      }
      ClassAtom a = class_atom();
      if (i_ + 1 < s_.size() && s_[i_] == '-' && s_[i_ + 1] != ']') {
        ++i_;
        ClassAtom b = class_atom();
        if (!a.is_char || !b.is_char) fail("invalid character class");
        if (a.cp > b.cp) fail("range out of order in character class");
        char32_t lo = a.cp, hi = b.cp;
        if (is_surrogate(lo) && is_surrogate(hi)) continue;
        if (is_surrogate(lo)) lo = 0xE000;
        if (is_surrogate(hi)) hi = 0xD7FF;
        if (lo <= 0xD7FF && hi >= 0xE000) {
          simple += hex_cp(lo) + "-" + hex_cp(hi);  // PCRE2 skips the surrogate gap itself
        } else {
          simple += hex_cp(lo) + "-" + hex_cp(hi);
        }
        continue;
      }
      if (a.is_char) {
        add_char(a.cp);
      } else if (a.simple) {
        simple += a.text;
      } else {
        complex.push_back(a.text);
      }
    }
    (void)drop_surrogates;
    if (complex.empty()) {
      if (simple.empty()) {
        out_ += negated ? "(?s:.)" : "(?!)";
      } else {
        out_ += (negated ? "[^" : "[") + simple + "]";
      }
    } else {
      // Each alternative matches exactly one character, so the union can be atomic: without
      // that, a quantified union backtracks exponentially through equivalent alternatives.
      std::string positive = "(?>";
      bool first = true;
      if (!simple.empty()) {
        positive += "[" + simple + "]";
        first = false;
      }
      for (const auto& c : complex) {
        if (!first) positive += "|";
        positive += c;
        first = false;
      }
      positive += ")";
      out_ += negated ? "(?:(?!" + positive + ")(?s:.))" : positive;
    }
    quantifiable_ = true;
  }

  void quantifier_suffix() {
    if (i_ < s_.size() && s_[i_] == '?') {
      out_ += '?';
      ++i_;
    }
    quantifiable_ = false;
  }

  void term() {
    const char c = s_[i_];
    switch (c) {
      case '\\':
        atom_escape();
        return;
      case '(': {
        Group g = Group::kCapture;
        std::string prefix = "(";
        std::size_t len = 1;
        if (starts_with(s_, i_, "(?:")) {
          g = Group::kNonCapture, prefix = "(?:", len = 3;
        } else if (starts_with(s_, i_, "(?=") || starts_with(s_, i_, "(?!")) {
          g = Group::kLookahead, prefix = std::string(s_.substr(i_, 3)), len = 3;
        } else if (starts_with(s_, i_, "(?<=") || starts_with(s_, i_, "(?<!")) {
          g = Group::kLookbehind, prefix = std::string(s_.substr(i_, 4)), len = 4;
        } else if (starts_with(s_, i_, "(?<")) {
          const std::size_t close = s_.find('>', i_ + 3);
          if (close == std::string_view::npos) fail("invalid capture group name");
          const std::string_view name = s_.substr(i_ + 3, close - (i_ + 3));
          if (name.empty() || (name[0] >= '0' && name[0] <= '9') ||
              !std::all_of(name.begin(), name.end(),
                           [](char ch) { return is_ascii_alnum(ch) || ch == '_'; })) {
            fail("capture group name not supported");
          }
          prefix = "(?<" + std::string(name) + ">";
          len = close + 1 - i_;
        } else if (starts_with(s_, i_, "(?")) {
          fail("invalid group");
        }
        groups_.push_back(g);
        out_ += prefix;
        i_ += len;
        quantifiable_ = false;
        return;
      }
      case ')': {
        if (groups_.empty()) fail("unmatched ')'");
        const Group g = groups_.back();
        groups_.pop_back();
        out_ += ')';
        ++i_;
        quantifiable_ = g == Group::kCapture || g == Group::kNonCapture;
        return;
      }
      case '|':
        out_ += '|';
        ++i_;
        quantifiable_ = false;
        return;
      case '*':
      case '+':
      case '?':
        if (!quantifiable_) fail("nothing to repeat");
        out_ += c;
        ++i_;
        quantifier_suffix();
        return;
      case '{': {
        std::string body;
        const std::size_t len = match_quantifier_brace(s_, i_, body);
        if (len == 0 || body[0] == ',') fail("lone quantifier brackets");
        if (!quantifiable_) fail("nothing to repeat");
        const std::size_t comma = body.find(',');
        if (comma != std::string::npos && comma + 1 < body.size()) {
          const unsigned long lo = std::stoul(body.substr(0, comma));
          const unsigned long hi = std::stoul(body.substr(comma + 1));
          if (lo > hi) fail("numbers out of order in {} quantifier");
        }
        out_ += "{" + body + "}";
        i_ += len;
        quantifier_suffix();
        return;
      }
      case '}':
      case ']':
        fail("lone quantifier brackets");
      case '[':
        char_class();
        return;
      case '.':
        out_ += "[^\\n\\r\\x{2028}\\x{2029}]";
        ++i_;
        quantifiable_ = true;
        return;
      case '^':
        out_ += '^';
        ++i_;
        quantifiable_ = false;
        return;
      case '$':
        out_ += "\\z";
        ++i_;
        quantifiable_ = false;
        return;
      default: {
        std::size_t k = i_;
        const char32_t cp = unicode::next_cp(s_, k);
        i_ = k;
        literal(cp);
        quantifiable_ = true;
        return;
      }
    }
  }

  std::string_view s_;
  std::size_t i_ = 0;
  std::string out_;
  std::uint32_t captures_ = 0;
  std::vector<std::string> names_;
  std::vector<Group> groups_;
  bool quantifiable_ = false;
};

}  // namespace

std::string js_to_pcre2(std::string_view js) { return JsTranslator(js).run(); }

std::string escape_reg_exp(std::string_view s) {
  static constexpr std::string_view kSpecial = ".*+?^${}()|[]\\";
  std::string out;
  for (char c : s) {
    if (kSpecial.find(c) != std::string_view::npos) out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

// =============================================================================================
// Regex
// =============================================================================================

MatchScratch::~MatchScratch() {
  if (md_) pcre2_match_data_free(md_);
  if (mctx_) pcre2_match_context_free(mctx_);
  if (jit_stack_) pcre2_jit_stack_free(jit_stack_);
}

MatchScratch& MatchScratch::local() {
  thread_local MatchScratch scratch;
  return scratch;
}

void MatchScratch::ensure(std::uint32_t pairs) {
  if (md_ && pairs_ >= pairs) return;
  if (md_) pcre2_match_data_free(md_);
  pairs_ = std::max<std::uint32_t>(pairs, 16);
  md_ = pcre2_match_data_create(pairs_, nullptr);
  if (!md_) throw std::bad_alloc();
}

Regex::Regex(std::string_view js_pattern, bool allow_fast) {
  pattern_ = js_to_pcre2(js_pattern);
  int err = 0;
  PCRE2_SIZE off = 0;
  code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern_.data()), pattern_.size(),
                        PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_UNSET_BACKREF, &err, &off, nullptr);
  if (!code_) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof msg);
    regex_error(std::string("PCRE2 cannot compile the translated pattern (") +
                    reinterpret_cast<const char*>(msg) + ")",
                js_pattern);
  }
  jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
  std::uint32_t count = 0;
  pcre2_pattern_info(code_, PCRE2_INFO_CAPTURECOUNT, &count);
  captures_ = count;
  if (allow_fast && captures_ == 0) fast_ = make_fast_pattern(js_pattern);
}

Regex::~Regex() {
  if (code_) pcre2_code_free(code_);
}

bool Regex::find(std::string_view subject, std::size_t from, MatchScratch& scratch,
                 std::vector<Span>* groups, Span& match) const {
  if (fast_) {
    if (!fast_->find(subject, from, match)) return false;
    if (groups) groups->assign(1, match);
    return true;
  }
  scratch.ensure(captures_ + 1);
  const auto* subj = reinterpret_cast<PCRE2_SPTR>(subject.data());
  int rc = jit_ ? pcre2_jit_match(code_, subj, subject.size(), from, 0, scratch.md_, nullptr)
                : pcre2_match(code_, subj, subject.size(), from, PCRE2_NO_UTF_CHECK, scratch.md_,
                              nullptr);
  if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {
    // Deep backtracking on a long subject: retry with a large JIT stack of this thread.
    if (!scratch.jit_stack_) {
      scratch.jit_stack_ = pcre2_jit_stack_create(64 * 1024, 64 * 1024 * 1024, nullptr);
      scratch.mctx_ = pcre2_match_context_create(nullptr);
      if (!scratch.jit_stack_ || !scratch.mctx_) throw std::bad_alloc();
      pcre2_jit_stack_assign(scratch.mctx_, nullptr, scratch.jit_stack_);
    }
    rc = pcre2_jit_match(code_, subj, subject.size(), from, 0, scratch.md_, scratch.mctx_);
  }
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  if (rc < 0) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(rc, msg, sizeof msg);
    throw TokenizerError(std::string("regex match failed: ") + reinterpret_cast<const char*>(msg));
  }
  const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(scratch.md_);
  match = {ov[0], ov[1]};
  if (groups) {
    groups->resize(captures_ + 1);
    for (std::uint32_t g = 0; g <= captures_; ++g) {
      if (ov[2 * g] == PCRE2_UNSET) {
        (*groups)[g] = {SIZE_MAX, SIZE_MAX};
      } else {
        (*groups)[g] = {ov[2 * g], ov[2 * g + 1]};
      }
    }
  }
  return true;
}

bool Regex::full_match(std::string_view js_pattern, std::string_view s) {
  const Regex re("^(?:" + std::string(js_pattern) + ")$");
  Span m{};
  return re.find(s, 0, MatchScratch::local(), nullptr, m) && m.begin == 0 && m.end == s.size();
}

std::vector<Span> js_split(const Regex& re, std::string_view s, MatchScratch& scratch) {
  std::vector<Span> out;
  const std::size_t size = s.size();
  std::vector<Span> groups;
  Span m{};
  if (size == 0) {
    if (!re.find(s, 0, scratch, nullptr, m)) out.push_back({0, 0});
    return out;
  }
  std::size_t p = 0, q = 0;
  while (q < size) {
    if (!re.find(s, q, scratch, &groups, m) || m.begin >= size) break;
    if (m.end == p) {  // an empty match where the last piece ended
      q = m.begin + char_len_at(s, m.begin);
      continue;
    }
    out.push_back({p, m.begin});
    for (std::size_t g = 1; g < groups.size(); ++g) out.push_back(groups[g]);
    p = std::min(m.end, size);
    q = p;
  }
  out.push_back({p, size});
  return out;
}

std::string js_replace_all(const Regex& re, std::string_view s, std::string_view replacement,
                           MatchScratch& scratch) {
  std::string out;
  std::size_t prev = 0;
  std::vector<Span> groups;
  std::size_t from = 0;
  Span m{};
  const std::size_t ncap = re.capture_count();
  while (from <= s.size() && re.find(s, from, scratch, &groups, m)) {
    out.append(s.substr(prev, m.begin - prev));
    // GetSubstitution
    for (std::size_t k = 0; k < replacement.size(); ++k) {
      const char c = replacement[k];
      if (c != '$' || k + 1 >= replacement.size()) {
        out.push_back(c);
        continue;
      }
      const char n = replacement[k + 1];
      if (n == '$') {
        out.push_back('$');
        ++k;
      } else if (n == '&') {
        out.append(s.substr(m.begin, m.end - m.begin));
        ++k;
      } else if (n == '`') {
        out.append(s.substr(0, m.begin));
        ++k;
      } else if (n == '\'') {
        out.append(s.substr(m.end));
        ++k;
      } else if (n >= '0' && n <= '9') {
        std::size_t idx = static_cast<std::size_t>(n - '0');
        std::size_t used = 2;
        if (k + 2 < replacement.size() && replacement[k + 2] >= '0' && replacement[k + 2] <= '9') {
          const std::size_t two = idx * 10 + static_cast<std::size_t>(replacement[k + 2] - '0');
          if (two >= 1 && two <= ncap) {
            idx = two;
            used = 3;
          }
        }
        if (idx >= 1 && idx <= ncap) {
          const Span g = groups[idx];
          if (g.valid()) out.append(s.substr(g.begin, g.end - g.begin));
          k += used - 1;
        } else {
          out.push_back('$');
        }
      } else {
        out.push_back('$');  // "$<" is literal too: named groups are rejected at load time
      }
    }
    prev = m.end;
    if (m.end == m.begin) {
      if (m.end >= s.size()) break;
      from = m.end + char_len_at(s, m.end);
    } else {
      from = m.end;
    }
  }
  out.append(s.substr(prev));
  return out;
}

}  // namespace omni::tokenizer_detail
