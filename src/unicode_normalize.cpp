// UTF-8 validation/replacement, JavaScript trimming and Unicode normalization for the
// tokenizer (see unicode_tables.hpp).
//
// Normalization uses utf8proc (Debian 12: 2.8.0, Unicode 15.0). The reference runs on node's
// ICU (Unicode 17.0); the few characters added since Unicode 15.0 that take part in canonical
// normalization (46 combining marks, 20 composites, see kCccPatch/kDecompPatch) are handled by a
// small own implementation of the standard algorithm that consults the patch first and utf8proc
// otherwise. It only runs for text that contains one of them. The same goes for the 37
// compatibility decompositions (NFKC/NFKD) added since (kCompatPatch). Checked against node for
// every single code point in all four forms.
#include "unicode_tables.hpp"

#include <utf8proc.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <unordered_map>
#include <vector>

namespace omni::unicode {

// ---- UTF-8 ----------------------------------------------------------------------------------

namespace {

inline bool ascii_word(const char* p) {
  std::uint64_t w;
  std::memcpy(&w, p, 8);
  return (w & 0x8080808080808080ULL) == 0;
}

// Length of the valid UTF-8 sequence at s[i] (whose lead byte is >= 0x80), or 0 if invalid.
inline std::size_t valid_seq_len(std::string_view s, std::size_t i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  const std::size_t n = s.size();
  auto cont = [&](std::size_t k, unsigned char lo, unsigned char hi) {
    if (i + k >= n) return false;
    const auto b = static_cast<unsigned char>(s[i + k]);
    return b >= lo && b <= hi;
  };
  if (b0 >= 0xC2 && b0 <= 0xDF) return cont(1, 0x80, 0xBF) ? 2 : 0;
  if (b0 >= 0xE0 && b0 <= 0xEF) {
    const unsigned char lo = b0 == 0xE0 ? 0xA0 : 0x80;
    const unsigned char hi = b0 == 0xED ? 0x9F : 0xBF;
    return cont(1, lo, hi) && cont(2, 0x80, 0xBF) ? 3 : 0;
  }
  if (b0 >= 0xF0 && b0 <= 0xF4) {
    const unsigned char lo = b0 == 0xF0 ? 0x90 : 0x80;
    const unsigned char hi = b0 == 0xF4 ? 0x8F : 0xBF;
    return cont(1, lo, hi) && cont(2, 0x80, 0xBF) && cont(3, 0x80, 0xBF) ? 4 : 0;
  }
  return 0;
}

}  // namespace

std::size_t first_invalid_utf8(std::string_view s) {
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    if (i + 8 <= n && ascii_word(s.data() + i)) {
      i += 8;
      continue;
    }
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const std::size_t len = valid_seq_len(s, i);
    if (len == 0) return i;
    i += len;
  }
  return n;
}

void append_sanitized_utf8(std::string& out, std::string_view s) {
  std::size_t bad = first_invalid_utf8(s);
  if (bad == s.size()) {
    out.append(s);
    return;
  }
  out.reserve(out.size() + s.size() + 8);
  out.append(s.substr(0, bad));
  // The WHATWG UTF-8 decoder from the first invalid byte on: a lead byte followed by fewer
  // continuation bytes (within the allowed ranges) than it needs is one maximal subpart and
  // becomes one U+FFFD; the byte that broke the sequence is looked at again.
  const std::size_t n = s.size();
  std::size_t i = bad;
  while (i < n) {
    const auto b0 = static_cast<unsigned char>(s[i]);
    if (b0 < 0x80) {
      out.push_back(static_cast<char>(b0));
      ++i;
      continue;
    }
    const std::size_t len = valid_seq_len(s, i);
    if (len != 0) {
      out.append(s.substr(i, len));
      i += len;
      continue;
    }
    // Invalid: consume the lead byte plus every continuation byte that was still acceptable.
    std::size_t need = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (b0 >= 0xC2 && b0 <= 0xDF) {
      need = 1;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      need = 2;
      if (b0 == 0xE0) lo = 0xA0;
      if (b0 == 0xED) hi = 0x9F;
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      need = 3;
      if (b0 == 0xF0) lo = 0x90;
      if (b0 == 0xF4) hi = 0x8F;
    }
    ++i;
    for (std::size_t k = 0; k < need && i < n; ++k) {
      const auto b = static_cast<unsigned char>(s[i]);
      if (b < lo || b > hi) break;
      lo = 0x80;
      hi = 0xBF;
      ++i;
    }
    out.append("\xEF\xBF\xBD");
  }
}

bool sanitize_utf8(std::string_view s, std::string& out) {
  if (first_invalid_utf8(s) == s.size()) return false;
  out.clear();
  append_sanitized_utf8(out, s);
  return true;
}

std::string_view js_trim_start(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size()) {
    std::size_t j = i;
    if (!is_js_space(next_cp(s, j))) break;
    i = j;
  }
  return s.substr(i);
}

std::string_view js_trim_end(std::string_view s) {
  std::size_t end = s.size();
  while (end > 0) {
    std::size_t start = end - 1;
    while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
    std::size_t j = start;
    if (!is_js_space(next_cp(s, j))) break;
    end = start;
  }
  return s.substr(0, end);
}

// ---- normalization --------------------------------------------------------------------------

namespace {

constexpr char32_t kMaxCp = 0x110000;

struct NormData {
  // NFC quick check: set for every code point that is not NFC_Quick_Check=Yes or has a
  // non-zero combining class, i.e. that can change or reorder under NFC.
  std::vector<std::uint64_t> nfc_unsafe;
  // Code points whose normalization needs the patch (unknown to utf8proc).
  std::vector<std::uint64_t> patched;
  std::unordered_map<char32_t, std::uint8_t> ccc;
  std::unordered_map<char32_t, std::pair<char32_t, char32_t>> decomp;
  std::unordered_map<std::uint64_t, char32_t> comp;
  std::unordered_map<char32_t, char32_t> compat;

  static bool test(const std::vector<std::uint64_t>& bits, char32_t cp) {
    return (bits[cp >> 6] >> (cp & 63)) & 1;
  }
  static void set(std::vector<std::uint64_t>& bits, char32_t cp) {
    bits[cp >> 6] |= std::uint64_t{1} << (cp & 63);
  }
};

std::string utf8proc_run(std::string_view in, int options) {
  utf8proc_uint8_t* dst = nullptr;
  const utf8proc_ssize_t n =
      utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(in.data()),
                   static_cast<utf8proc_ssize_t>(in.size()), &dst,
                   static_cast<utf8proc_option_t>(options));
  if (n < 0) {
    std::free(dst);
    return std::string(in);  // cannot happen for valid UTF-8; leave the text as it is
  }
  std::string out(reinterpret_cast<const char*>(dst), static_cast<std::size_t>(n));
  std::free(dst);
  return out;
}

NormData build_norm_data() {
  NormData d;
  d.nfc_unsafe.assign(kMaxCp / 64, 0);
  d.patched.assign(kMaxCp / 64, 0);
  for (char32_t cp = 0; cp < kMaxCp; ++cp) {
    if (cp >= 0xD800 && cp < 0xE000) continue;
    const utf8proc_property_t* p = utf8proc_get_property(static_cast<utf8proc_int32_t>(cp));
    if (p->combining_class != 0) NormData::set(d.nfc_unsafe, cp);
    if (p->decomp_seqindex != UINT16_MAX && p->decomp_type == 0) {
      utf8proc_int32_t buf[8];
      int bound = 0;
      const utf8proc_ssize_t n = utf8proc_decompose_char(static_cast<utf8proc_int32_t>(cp), buf,
                                                         8, UTF8PROC_DECOMPOSE, &bound);
      for (utf8proc_ssize_t k = 1; k < n && k < 8; ++k) {
        NormData::set(d.nfc_unsafe, static_cast<char32_t>(buf[k]));  // may compose with a starter
      }
      std::string one;
      append_utf8(one, cp);
      if (utf8proc_run(one, UTF8PROC_STABLE | UTF8PROC_COMPOSE) != one) {
        NormData::set(d.nfc_unsafe, cp);  // exclusion or singleton
      }
    }
  }
  for (char32_t cp = 0x1161; cp <= 0x1175; ++cp) NormData::set(d.nfc_unsafe, cp);  // Hangul V
  for (char32_t cp = 0x11A8; cp <= 0x11C2; ++cp) NormData::set(d.nfc_unsafe, cp);  // Hangul T
  for (const CccPatch& c : ccc_patch()) {
    d.ccc[c.cp] = c.ccc;
    NormData::set(d.nfc_unsafe, c.cp);
    NormData::set(d.patched, c.cp);
  }
  for (const LowerPatch& c : compat_patch()) {
    d.compat[c.from] = c.to;
    NormData::set(d.patched, c.from);
  }
  for (const DecompPatch& c : decomp_patch()) {
    d.decomp[c.cp] = {c.first, c.second};
    d.comp[(std::uint64_t{c.first} << 32) | c.second] = c.cp;
    for (char32_t x : {c.cp, c.first, c.second}) {
      // Only the characters utf8proc does not know force the patched path (U+0307 does not).
      if (utf8proc_category(static_cast<utf8proc_int32_t>(x)) == UTF8PROC_CATEGORY_CN) {
        NormData::set(d.patched, x);
      }
    }
    NormData::set(d.nfc_unsafe, c.second);
    NormData::set(d.nfc_unsafe, c.cp);
  }
  return d;
}

const NormData& norm_data() {
  static const NormData data = build_norm_data();
  return data;
}

std::uint8_t ccc_of(const NormData& d, char32_t cp) {
  if (auto it = d.ccc.find(cp); it != d.ccc.end()) return it->second;
  return static_cast<std::uint8_t>(
      utf8proc_get_property(static_cast<utf8proc_int32_t>(cp))->combining_class);
}

void decompose_into(const NormData& d, char32_t cp, bool compat, std::u32string& out) {
  if (compat) {
    if (auto it = d.compat.find(cp); it != d.compat.end()) {
      decompose_into(d, it->second, compat, out);
      return;
    }
  }
  if (auto it = d.decomp.find(cp); it != d.decomp.end()) {
    decompose_into(d, it->second.first, compat, out);
    decompose_into(d, it->second.second, compat, out);
    return;
  }
  utf8proc_int32_t buf[32];
  int bound = 0;
  const int options = UTF8PROC_DECOMPOSE | (compat ? UTF8PROC_COMPAT : 0);
  const utf8proc_ssize_t n = utf8proc_decompose_char(
      static_cast<utf8proc_int32_t>(cp), buf, 32, static_cast<utf8proc_option_t>(options), &bound);
  if (n <= 0 || n > 32) {
    out.push_back(cp);
    return;
  }
  for (utf8proc_ssize_t k = 0; k < n; ++k) out.push_back(static_cast<char32_t>(buf[k]));
}

// Primary composite of <first, second>, or 0.
char32_t compose_pair(const NormData& d, char32_t first, char32_t second) {
  if (auto it = d.comp.find((std::uint64_t{first} << 32) | second); it != d.comp.end()) {
    return it->second;
  }
  if (NormData::test(d.patched, first) || NormData::test(d.patched, second)) return 0;  // new
  std::string pair;
  append_utf8(pair, first);
  append_utf8(pair, second);
  const std::string composed = utf8proc_run(pair, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
  std::size_t i = 0;
  if (composed.empty()) return 0;
  const char32_t c = next_cp(composed, i);
  return i == composed.size() && c != first ? c : 0;
}

// The standard algorithm (decompose, reorder, optionally compose) with the patch data.
std::string normalize_patched(const NormData& d, std::string_view in, bool compat, bool compose) {
  std::u32string buf;
  buf.reserve(in.size());
  for (std::size_t i = 0; i < in.size();) decompose_into(d, next_cp(in, i), compat, buf);
  std::vector<std::uint8_t> cc(buf.size());
  for (std::size_t k = 0; k < buf.size(); ++k) cc[k] = ccc_of(d, buf[k]);
  for (std::size_t k = 1; k < buf.size(); ++k) {  // canonical ordering (stable)
    std::size_t j = k;
    while (j > 0 && cc[j] != 0 && cc[j - 1] > cc[j]) {
      std::swap(cc[j], cc[j - 1]);
      std::swap(buf[j], buf[j - 1]);
      --j;
    }
  }
  if (compose && !buf.empty()) {
    std::size_t starter = 0;
    bool have_starter = cc[0] == 0;
    int last_cc = have_starter ? 0 : 256;
    std::size_t out_len = 1;
    for (std::size_t k = 1; k < buf.size(); ++k) {
      const char32_t ch = buf[k];
      const int ch_cc = cc[k];
      if (have_starter && (last_cc < ch_cc || last_cc == 0)) {
        if (const char32_t c = compose_pair(d, buf[starter], ch); c != 0) {
          buf[starter] = c;
          continue;
        }
      }
      if (ch_cc == 0) {
        starter = out_len;
        have_starter = true;
      }
      last_cc = ch_cc;
      buf[out_len] = ch;
      cc[out_len] = static_cast<std::uint8_t>(ch_cc);
      ++out_len;
    }
    buf.resize(out_len);
  }
  std::string out;
  out.reserve(in.size());
  for (char32_t c : buf) append_utf8(out, c);
  return out;
}

bool all_ascii(std::string_view s) {
  std::size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    if (!ascii_word(s.data() + i)) return false;
  }
  for (; i < s.size(); ++i) {
    if (static_cast<unsigned char>(s[i]) >= 0x80) return false;
  }
  return true;
}

// NFC quick check: true when no code point of s can change under NFC. Code points below
// U+0300 never do (lead bytes below 0xCC).
bool nfc_quick_yes(const NormData& d, std::string_view s) {
  std::size_t i = 0;
  const std::size_t n = s.size();
  while (i < n) {
    if (i + 8 <= n && ascii_word(s.data() + i)) {
      i += 8;
      continue;
    }
    const auto b = static_cast<unsigned char>(s[i]);
    if (b < 0xCC) {
      ++i;
      continue;
    }
    const char32_t cp = next_cp(s, i);
    if (NormData::test(d.nfc_unsafe, cp)) return false;
  }
  return true;
}

bool has_patched(const NormData& d, std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    if (static_cast<unsigned char>(s[i]) < 0xCC) {
      ++i;
      continue;
    }
    if (NormData::test(d.patched, next_cp(s, i))) return true;
  }
  return false;
}

}  // namespace

void prepare_normalization() { norm_data(); }

bool normalize(NormForm form, std::string_view in, std::string& out) {
  if (all_ascii(in)) return false;  // ASCII is invariant under all four forms
  const NormData& d = norm_data();
  if (form == NormForm::kNFC && nfc_quick_yes(d, in)) return false;
  const bool compat = form == NormForm::kNFKC || form == NormForm::kNFKD;
  const bool compose = form == NormForm::kNFC || form == NormForm::kNFKC;
  std::string result;
  if (has_patched(d, in)) {
    result = normalize_patched(d, in, compat, compose);
  } else {
    int options = UTF8PROC_STABLE | (compose ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE);
    if (compat) options |= UTF8PROC_COMPAT;
    result = utf8proc_run(in, options);
  }
  if (result == in) return false;
  out = std::move(result);
  return true;
}

}  // namespace omni::unicode
