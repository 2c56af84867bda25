// Hand-written matchers for the pre-tokenizer patterns of the models this project serves.
//
// PCRE2 evaluates \p{..} through its Unicode tables for every character, which makes these
// alternations run at ~50 MB/s; a direct scanner over one flag table is several times faster.
// Each matcher reproduces the leftmost-first, backtracking semantics of its pattern exactly
// (the reasoning is spelled out per alternative), with the same Unicode 17 properties as the
// PCRE2 translation. A matcher is used only when the JavaScript pattern is character for
// character one of those below; tests/unit/tokenizer_test.cpp checks each against PCRE2 on
// random text, and anything else runs on PCRE2.
#include "tokenizer_regex.hpp"
#include "unicode_tables.hpp"

namespace omni::tokenizer_detail {

namespace {

using unicode::kPropJsWS;
using unicode::kPropL;
using unicode::kPropM;
using unicode::kPropN;
using unicode::kPropP;
using unicode::kPropS;
using unicode::kPropWS;
using unicode::PropertyTable;

constexpr std::size_t kNone = static_cast<std::size_t>(-1);

struct Char {
  char32_t cp;
  std::uint32_t len;
  std::uint8_t f;
};

[[gnu::always_inline]] inline Char char_at(const PropertyTable& t, std::string_view s, std::size_t i) {
  const auto b = static_cast<unsigned char>(s[i]);
  if (b < 0x80) return {b, 1, t(b)};
  std::size_t j = i;
  const char32_t cp = unicode::next_cp(s, j);
  return {cp, static_cast<std::uint32_t>(j - i), t(cp)};
}

// End of the run of characters whose flags intersect `mask`, from i.
[[gnu::always_inline]] inline std::size_t run_with(const PropertyTable& t, std::string_view s, std::size_t i,
                            std::uint8_t mask) {
  while (i < s.size()) {
    const Char c = char_at(t, s, i);
    if (!(c.f & mask)) break;
    i += c.len;
  }
  return i;
}

// End of the run of characters whose flags do not intersect `mask`, from i.
[[gnu::always_inline]] inline std::size_t run_without(const PropertyTable& t, std::string_view s, std::size_t i,
                               std::uint8_t mask) {
  while (i < s.size()) {
    const Char c = char_at(t, s, i);
    if (c.f & mask) break;
    i += c.len;
  }
  return i;
}

// [\r\n]*
inline std::size_t newlines(std::string_view s, std::size_t i) {
  while (i < s.size() && (s[i] == '\r' || s[i] == '\n')) ++i;
  return i;
}

// The whitespace tail shared by the patterns, at a whitespace character i (`ws` = the class of
// \s):
//   \s*[\r\n]+   (only when `newline_alt`): \s* first takes the whole run W and gives characters
//                back until [\r\n] can match; the first fit is the last \r or \n of W, and
//                [\r\n]+ then stops at the end of W or at the first non-newline, i.e. right
//                after that last newline.
//   \s+(?!\S)    all of W when it reaches the end of the subject; otherwise W minus its last
//                character (whose following character is \S), which needs |W| >= 2.
//   \s+          W (a single whitespace character before a non-space).
inline std::size_t whitespace(const PropertyTable& t, std::string_view s, std::size_t i,
                              std::uint8_t ws, bool newline_alt) {
  std::size_t j = i, last_nl = kNone, last_start = i, count = 0;
  while (j < s.size()) {
    const Char c = char_at(t, s, j);
    if (!(c.f & ws)) break;
    if (c.cp == '\r' || c.cp == '\n') last_nl = j;
    last_start = j;
    j += c.len;
    ++count;
  }
  if (newline_alt && last_nl != kNone) return last_nl + 1;
  if (j == s.size()) return j;
  if (count >= 2) return last_start;
  return j;
}

// Qwen2/Qwen3 (max_digits 1) and Llama 3 (max_digits 3), after the reference's rewrite:
//   (?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])
//   |[^\r\n\p{L}\p{N}]?\p{L}+ | \p{N}{1,max} | ?[^\s\p{L}\p{N}]+[\r\n]* | \s*[\r\n]+
//   | \s+(?!\S) | \s+                                   (\s = \p{White_Space})
// Every character starts a match, so a search is a match at `from`.
class Gpt4Style final : public FastPattern {
 public:
  explicit Gpt4Style(std::size_t max_digits) : max_digits_(max_digits) {}

  bool find(std::string_view s, std::size_t from, Span& m) const override {
    if (from >= s.size()) return false;
    m = {from, match_at(PropertyTable::get(), s, from)};
    return true;
  }

 private:
  std::size_t match_at(const PropertyTable& t, std::string_view s, std::size_t i) const {
    const std::size_t n = s.size();
    const Char c = char_at(t, s, i);
    // Contractions, ASCII case folded by the rewrite (b | 0x20 maps only 'X'/'x' to 'x').
    if (c.cp == '\'' && i + 1 < n) {
      const char b1 = static_cast<char>(s[i + 1] | 0x20);
      if (b1 == 's' || b1 == 't' || b1 == 'm' || b1 == 'd') return i + 2;
      if (i + 2 < n) {
        const char b2 = static_cast<char>(s[i + 2] | 0x20);
        if ((b1 == 'r' && b2 == 'e') || (b1 == 'v' && b2 == 'e') || (b1 == 'l' && b2 == 'l')) {
          return i + 3;
        }
      }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+ : a letter run, or one other non-newline character before it
    // (a letter cannot be the optional character, so a letter at i starts the run itself).
    if (c.f & kPropL) return run_with(t, s, i + c.len, kPropL);
    if (c.cp != '\r' && c.cp != '\n' && !(c.f & kPropN) && i + c.len < n) {
      const Char d = char_at(t, s, i + c.len);
      if (d.f & kPropL) return run_with(t, s, i + c.len + d.len, kPropL);
    }
    // \p{N}{1,max}
    if (c.f & kPropN) {
      std::size_t j = i + c.len;
      for (std::size_t k = 1; k < max_digits_ && j < n; ++k) {
        const Char d = char_at(t, s, j);
        if (!(d.f & kPropN)) break;
        j += d.len;
      }
      return j;
    }
    //  ?[^\s\p{L}\p{N}]+[\r\n]* : with the space if the next character qualifies, else without.
    constexpr std::uint8_t kNotOther = kPropWS | kPropL | kPropN;
    if (c.cp == ' ' && i + 1 < n) {
      const Char d = char_at(t, s, i + 1);
      if (!(d.f & kNotOther)) return newlines(s, run_without(t, s, i + 1 + d.len, kNotOther));
    }
    if (!(c.f & kNotOther)) return newlines(s, run_without(t, s, i + c.len, kNotOther));
    // c is whitespace.
    return whitespace(t, s, i, kPropWS, true);
  }

  std::size_t max_digits_;
};

// DeepSeek-V3's third Split, after the rewrite:
//   [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+ | [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+
//   | ?[\p{P}\p{S}]+[\r\n]* | \s*[\r\n]+ | \s+(?!\S) | \s+          (\s = \p{White_Space})
// Characters that start none of these (a digit or control not followed by a letter or mark)
// are skipped by the search.
class DeepSeekStyle final : public FastPattern {
 public:
  bool find(std::string_view s, std::size_t from, Span& m) const override {
    const PropertyTable& t = PropertyTable::get();
    for (std::size_t i = from; i < s.size();) {
      const std::size_t e = match_at(t, s, i);
      if (e != kNone) {
        m = {i, e};
        return true;
      }
      i += unicode::cp_len(static_cast<unsigned char>(s[i]));
    }
    return false;
  }

 private:
  static bool ascii_punct(char32_t c) {
    return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) ||
           (c >= 0x7B && c <= 0x7E);
  }
  static bool ascii_alpha(char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); }

  static std::size_t match_at(const PropertyTable& t, std::string_view s, std::size_t i) {
    const std::size_t n = s.size();
    const Char c = char_at(t, s, i);
    // ASCII punctuation + ASCII letters.
    if (ascii_punct(c.cp) && i + 1 < n && ascii_alpha(s[i + 1])) {
      std::size_t j = i + 2;
      while (j < n && ascii_alpha(s[j])) ++j;
      return j;
    }
    // [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+ : the optional character may be a mark (M is not
    // excluded); taking it first or not gives the same run when it is one.
    constexpr std::uint8_t kLM = kPropL | kPropM;
    if (c.cp != '\r' && c.cp != '\n' && !(c.f & (kPropL | kPropP | kPropS)) && i + c.len < n) {
      const Char d = char_at(t, s, i + c.len);
      if (d.f & kLM) return run_with(t, s, i + c.len + d.len, kLM);
    }
    if (c.f & kLM) return run_with(t, s, i + c.len, kLM);
    //  ?[\p{P}\p{S}]+[\r\n]*
    constexpr std::uint8_t kPS = kPropP | kPropS;
    if (c.cp == ' ' && i + 1 < n) {
      const Char d = char_at(t, s, i + 1);
      if (d.f & kPS) return newlines(s, run_with(t, s, i + 1 + d.len, kPS));
    }
    if (c.f & kPS) return newlines(s, run_with(t, s, i + c.len, kPS));
    if (c.f & kPropWS) return whitespace(t, s, i, kPropWS, true);
    return kNone;
  }
};

// The reference ByteLevel pre-tokenizer's own JavaScript pattern (GPT-2), \s = JavaScript's:
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
class Gpt2Style final : public FastPattern {
 public:
  bool find(std::string_view s, std::size_t from, Span& m) const override {
    if (from >= s.size()) return false;
    m = {from, match_at(PropertyTable::get(), s, from)};
    return true;
  }

 private:
  static std::size_t match_at(const PropertyTable& t, std::string_view s, std::size_t i) {
    const std::size_t n = s.size();
    const Char c = char_at(t, s, i);
    if (c.cp == '\'' && i + 1 < n) {
      const char b1 = s[i + 1];
      if (b1 == 's' || b1 == 't' || b1 == 'm' || b1 == 'd') return i + 2;
      if (i + 2 < n) {
        const char b2 = s[i + 2];
        if ((b1 == 'r' && b2 == 'e') || (b1 == 'v' && b2 == 'e') || (b1 == 'l' && b2 == 'l')) {
          return i + 3;
        }
      }
    }
    //  ?\p{L}+ then  ?\p{N}+ then  ?[^\s\p{L}\p{N}]+ : each with the space when the character
    // after it qualifies, else without.
    const bool space = c.cp == ' ' && i + 1 < n;
    const Char d = space ? char_at(t, s, i + 1) : Char{0, 0, 0};
    if (space && (d.f & kPropL)) return run_with(t, s, i + 1 + d.len, kPropL);
    if (c.f & kPropL) return run_with(t, s, i + c.len, kPropL);
    if (space && (d.f & kPropN)) return run_with(t, s, i + 1 + d.len, kPropN);
    if (c.f & kPropN) return run_with(t, s, i + c.len, kPropN);
    constexpr std::uint8_t kNotOther = kPropJsWS | kPropL | kPropN;
    if (space && !(d.f & kNotOther)) return run_without(t, s, i + 1 + d.len, kNotOther);
    if (!(c.f & kNotOther)) return run_without(t, s, i + c.len, kNotOther);
    return whitespace(t, s, i, kPropJsWS, false);
  }
};

// \p{N}{1,3} (DeepSeek-V3's first Split).
class DigitsUpTo3 final : public FastPattern {
 public:
  bool find(std::string_view s, std::size_t from, Span& m) const override {
    const PropertyTable& t = PropertyTable::get();
    const std::size_t n = s.size();
    for (std::size_t i = from; i < n;) {
      const auto b = static_cast<unsigned char>(s[i]);
      if (b < 0x80) {
        if (b >= '0' && b <= '9') return take(t, s, i, m);
        ++i;
        continue;
      }
      const Char c = char_at(t, s, i);
      if (c.f & kPropN) return take(t, s, i, m);
      i += c.len;
    }
    return false;
  }

 private:
  static bool take(const PropertyTable& t, std::string_view s, std::size_t i, Span& m) {
    std::size_t j = i;
    for (int k = 0; k < 3 && j < s.size(); ++k) {
      const Char c = char_at(t, s, j);
      if (!(c.f & kPropN)) break;
      j += c.len;
    }
    m = {i, j};
    return true;
  }
};

// The patterns as the reference's rewrite produces them (raw CR/LF where the tokenizer.json
// has them).
constexpr std::string_view kQwen =
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}| ?[^\\p{White_Space}\\p{L}\\p{N}]+[\\r\\n]*|\\p{White_Space}*[\\r\\n]+|"
    "\\p{White_Space}+(?!\\P{White_Space})|\\p{White_Space}+";
constexpr std::string_view kLlama3 =
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
    "\\p{N}{1,3}| ?[^\\p{White_Space}\\p{L}\\p{N}]+[\\r\\n]*|\\p{White_Space}*[\\r\\n]+|"
    "\\p{White_Space}+(?!\\P{White_Space})|\\p{White_Space}+";
constexpr std::string_view kDeepSeek =
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?"
    "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\p{White_Space}*[\r\n]+|"
    "\\p{White_Space}+(?!\\P{White_Space})|\\p{White_Space}+";
constexpr std::string_view kGpt2 =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
constexpr std::string_view kDigits3 = "\\p{N}{1,3}";

}  // namespace

std::unique_ptr<FastPattern> make_fast_pattern(std::string_view js_pattern) {
  std::unique_ptr<FastPattern> p;
  if (js_pattern == kQwen) {
    p = std::make_unique<Gpt4Style>(1);
  } else if (js_pattern == kLlama3) {
    p = std::make_unique<Gpt4Style>(3);
  } else if (js_pattern == kDeepSeek) {
    p = std::make_unique<DeepSeekStyle>();
  } else if (js_pattern == kGpt2) {
    p = std::make_unique<Gpt2Style>();
  } else if (js_pattern == kDigits3) {
    p = std::make_unique<DigitsUpTo3>();
  }
  if (p) PropertyTable::get();  // build the table at load time, not on the first request
  return p;
}

}  // namespace omni::tokenizer_detail
