// Internal Unicode helpers of the tokenizer: UTF-8 coding, the WHATWG replacement of invalid
// UTF-8, JavaScript's whitespace set, Unicode normalization (utf8proc plus a patch for the
// characters its Unicode 15.0 tables lack) and the property differences between PCRE2's
// Unicode 14 tables and the reference's (node.js / ICU) Unicode 17 tables.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace omni::unicode {

struct CodeRange {
  char32_t lo;
  char32_t hi;  // inclusive
};

// What node's \p{name} matches compared with PCRE2's: code points to add and to remove.
// `pcre_unknown`: PCRE2 does not know the property at all (then `add` is the whole set).
struct PropertyDelta {
  const char* name;
  bool pcre_unknown;
  std::span<const CodeRange> add;
  std::span<const CodeRange> remove;
};
const PropertyDelta* property_delta(std::string_view name);  // nullptr: no difference

struct CccPatch {
  char32_t cp;
  std::uint8_t ccc;
};
struct DecompPatch {
  char32_t cp;
  char32_t first;
  char32_t second;
};
std::span<const CccPatch> ccc_patch();
std::span<const DecompPatch> decomp_patch();

// General categories in utf8proc's numbering (UTF8PROC_CATEGORY_*) where node's ICU differs.
struct GcPatch {
  char32_t lo;
  char32_t hi;
  std::uint8_t gc;
};
std::span<const GcPatch> gc_patch();

// Simple lowercase mappings (utf8proc_tolower) where node's toLowerCase differs.
struct LowerPatch {
  char32_t from;
  char32_t to;
};
std::span<const LowerPatch> lower_patch();
// Compatibility decompositions (NFKC/NFKD) to one character that utf8proc does not know.
std::span<const LowerPatch> compat_patch();
// The simple lowercase mapping of cp as node has it (not U+0130 nor U+03A3: those depend on
// the full mapping / the context, see the Lowercase normalizer).
char32_t simple_lower(char32_t cp);

// ---- character properties as the reference sees them (Unicode 17) ----------------------------

enum : std::uint8_t {
  kPropL = 1,      // \p{L}
  kPropN = 2,      // \p{N}
  kPropM = 4,      // \p{M}
  kPropP = 8,      // \p{P}
  kPropS = 16,     // \p{S}
  kPropWS = 32,    // \p{White_Space}
  kPropJsWS = 64,  // JavaScript's \s
};

// Two-stage table of the flags above for every code point (built once, on first use).
class PropertyTable {
 public:
  static const PropertyTable& get();
  std::uint8_t operator()(char32_t cp) const {
    return cp < 0x80 ? ascii_[cp] : stage2_[(std::size_t{stage1_[cp >> 7]} << 7) | (cp & 127)];
  }
  std::size_t memory_bytes() const { return stage1_.size() * 2 + stage2_.size(); }

 private:
  PropertyTable();
  std::uint8_t ascii_[128];
  std::vector<std::uint16_t> stage1_;
  std::vector<std::uint8_t> stage2_;
};

// ---- UTF-8 -------------------------------------------------------------------------------

// Decodes the code point at s[i] of valid UTF-8 and advances i.
inline char32_t next_cp(std::string_view s, std::size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    ++i;
    return b0;
  }
  if (b0 < 0xE0) {
    const char32_t cp = (char32_t(b0 & 0x1F) << 6) | (static_cast<unsigned char>(s[i + 1]) & 0x3F);
    i += 2;
    return cp;
  }
  if (b0 < 0xF0) {
    const char32_t cp = (char32_t(b0 & 0x0F) << 12) |
                        (char32_t(static_cast<unsigned char>(s[i + 1]) & 0x3F) << 6) |
                        (static_cast<unsigned char>(s[i + 2]) & 0x3F);
    i += 3;
    return cp;
  }
  const char32_t cp = (char32_t(b0 & 0x07) << 18) |
                      (char32_t(static_cast<unsigned char>(s[i + 1]) & 0x3F) << 12) |
                      (char32_t(static_cast<unsigned char>(s[i + 2]) & 0x3F) << 6) |
                      (static_cast<unsigned char>(s[i + 3]) & 0x3F);
  i += 4;
  return cp;
}

// Byte length of the code point whose lead byte is b (valid UTF-8).
inline std::size_t cp_len(unsigned char b) {
  return b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
}

inline void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Offset of the first byte that is not part of valid UTF-8, or s.size() when all is valid.
std::size_t first_invalid_utf8(std::string_view s);

// Replaces every maximal invalid subsequence by U+FFFD (the WHATWG decoder, i.e. what a
// JavaScript TextDecoder without `fatal` does). Returns false and leaves `out` alone when s is
// valid.
bool sanitize_utf8(std::string_view s, std::string& out);
// Appends the sanitized form of s to out (valid input is appended as is).
void append_sanitized_utf8(std::string& out, std::string_view s);

// JavaScript's WhiteSpace + LineTerminator set (String.prototype.trim, the \s of a u-flag
// RegExp): TAB LF VT FF CR SPACE NBSP U+1680 U+2000..U+200A U+2028 U+2029 U+202F U+205F
// U+3000 U+FEFF. Not U+0085 (that is only in the Unicode White_Space property).
inline bool is_js_space(char32_t c) {
  if (c < 0x80) return c == ' ' || (c >= 0x09 && c <= 0x0D);
  return c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
         c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000 || c == 0xFEFF;
}
std::string_view js_trim_start(std::string_view s);
std::string_view js_trim_end(std::string_view s);

// ---- normalization -------------------------------------------------------------------------

enum class NormForm { kNFC, kNFD, kNFKC, kNFKD };
// Normalizes valid UTF-8 like String.prototype.normalize. Returns false and leaves `out`
// alone when the text is already in that form (the common case, found without allocating).
bool normalize(NormForm form, std::string_view in, std::string& out);
// Builds the normalization tables now (once per process) rather than on the first text that
// needs them.
void prepare_normalization();

}  // namespace omni::unicode
