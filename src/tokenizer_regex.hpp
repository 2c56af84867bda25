// Regular expressions of the tokenizer: the patterns of tokenizer.json are Oniguruma syntax
// (the Rust `tokenizers` crate compiles them with onig); the reference (`@huggingface/
// tokenizers`) rewrites them into JavaScript RegExp syntax and runs them with the `u` flag. We
// port that rewrite exactly, then translate the JavaScript pattern into PCRE2 syntax with
// JavaScript's semantics (what \s, \d, \w, \b, ., $, \p{..} match under the `u` flag), and run
// it with PCRE2's JIT. The JavaScript-level global-match loops (matchAll, split, replaceAll)
// are reproduced on top, including how they step over empty matches.
//
// Where PCRE2 and JavaScript still differ (none of it occurs in the patterns tokenizers ship;
// found by comparing random patterns and texts against node):
//   - lookbehind must have a bounded length in PCRE2 (JavaScript allows any): such a pattern is
//     refused at load time (TokenizerError);
//   - a quantified group that can match the empty string: JavaScript rejects an empty
//     iteration and tries the group's other alternatives, PCRE2 ends the loop;
//   - a backreference inside the group it refers to: JavaScript matches it as empty;
//   - node's irregexp can report a zero-width match (e.g. of $ or (?!..)) in the middle of a
//     surrogate pair, i.e. inside a character; we never split a character.
// Unicode properties are node's (Unicode 17) for General_Category values and the binary
// properties listed in tokenizer_regex.cpp; Script / Script_Extensions use PCRE2's Unicode 14
// tables (no tokenizer we know of uses them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

namespace omni::tokenizer_detail {

// The reference's rewrite_oniguruma_to_js (with normalize_bloom_split_char_class applied
// first), ported. Throws TokenizerError for patterns the reference rejects.
std::string rewrite_oniguruma_to_js(std::string_view onig);

// JavaScript (u-flag) pattern syntax to PCRE2 syntax with the same matches. Throws
// TokenizerError for patterns JavaScript rejects (or that PCRE2 cannot express).
std::string js_to_pcre2(std::string_view js);

// Per-thread scratch for matching (match data and, when needed, a JIT stack). A Regex is
// shared by all threads; the scratch is not.
class MatchScratch {
 public:
  MatchScratch() = default;
  MatchScratch(const MatchScratch&) = delete;
  MatchScratch& operator=(const MatchScratch&) = delete;
  ~MatchScratch();

  // The calling thread's scratch.
  static MatchScratch& local();

 private:
  friend class Regex;
  void ensure(std::uint32_t pairs);
  pcre2_match_data* md_ = nullptr;
  std::uint32_t pairs_ = 0;
  pcre2_match_context* mctx_ = nullptr;
  pcre2_jit_stack* jit_stack_ = nullptr;
};

struct Span {
  std::size_t begin;
  std::size_t end;
  bool valid() const { return begin != SIZE_MAX; }
};

// A hand-written matcher equivalent to one specific pattern (tokenizer_fast_split.cpp).
class FastPattern {
 public:
  virtual ~FastPattern() = default;
  // Leftmost match starting at or after `from`; the patterns have no capture groups.
  virtual bool find(std::string_view s, std::size_t from, Span& m) const = 0;
};
// The matcher for `js_pattern` when there is one, else nullptr.
std::unique_ptr<FastPattern> make_fast_pattern(std::string_view js_pattern);

class Regex {
 public:
  // Compiles a JavaScript-syntax pattern (as the reference passes to new RegExp(.., "gu")).
  // With `allow_fast`, a pattern that has a hand-written matcher uses it instead of PCRE2
  // (tests turn it off to compare the two).
  explicit Regex(std::string_view js_pattern, bool allow_fast = true);
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  ~Regex();

  // Finds the leftmost match starting at or after `from` (a code point boundary of valid
  // UTF-8 `subject`). On success fills `groups` (group 0 = the match; unset groups invalid).
  bool find(std::string_view subject, std::size_t from, MatchScratch& scratch,
            std::vector<Span>* groups, Span& match) const;
  std::uint32_t capture_count() const { return captures_; }
  const std::string& pcre2_pattern() const { return pattern_; }

  // Does the whole of `s` match (like new RegExp("^(?:" + p + ")$", "u").test(s))?
  static bool full_match(std::string_view js_pattern, std::string_view s);

 private:
  pcre2_code* code_ = nullptr;
  std::unique_ptr<FastPattern> fast_;
  bool jit_ = false;
  std::uint32_t captures_ = 0;
  std::string pattern_;
};

// ---- the JavaScript global-match loops ---------------------------------------------------

// String.prototype.match / matchAll with a global regex: every match, in order, stepping one
// code point past an empty match.
template <typename F>
void for_each_match(const Regex& re, std::string_view s, MatchScratch& scratch, F&& f) {
  std::size_t from = 0;
  Span m{};
  while (from <= s.size() && re.find(s, from, scratch, nullptr, m)) {
    f(m);
    if (m.end == m.begin) {
      if (m.end >= s.size()) break;
      const auto b = static_cast<unsigned char>(s[m.end]);
      from = m.end + (b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4);
    } else {
      from = m.end;
    }
  }
}

// String.prototype.split(regex): pieces between matches plus every capture group's text
// (unset groups as invalid spans).
std::vector<Span> js_split(const Regex& re, std::string_view s, MatchScratch& scratch);

// String.prototype.replaceAll(regex, replacement) with JavaScript's $-patterns.
std::string js_replace_all(const Regex& re, std::string_view s, std::string_view replacement,
                           MatchScratch& scratch);

// The reference's escape_reg_exp (for String patterns).
std::string escape_reg_exp(std::string_view s);

}  // namespace omni::tokenizer_detail
