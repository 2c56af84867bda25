// Character properties as the reference (node's ICU, Unicode 17) sees them: utf8proc's general
// categories (Unicode 15.0) with kGcPatch over them, folded into the flags the hand-written
// pre-tokenizer matchers need (see tokenizer_fast_split.cpp).
#include "unicode_tables.hpp"

#include <utf8proc.h>

#include <cstring>
#include <string>
#include <unordered_map>

namespace omni::unicode {

namespace {

constexpr char32_t kMaxCp = 0x110000;

std::uint8_t flags_of(std::uint8_t gc, char32_t cp) {
  std::uint8_t f = 0;
  switch (gc) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
      f |= kPropL;
      break;
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
      f |= kPropM;
      break;
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_NO:
      f |= kPropN;
      break;
    case UTF8PROC_CATEGORY_PC:
    case UTF8PROC_CATEGORY_PD:
    case UTF8PROC_CATEGORY_PS:
    case UTF8PROC_CATEGORY_PE:
    case UTF8PROC_CATEGORY_PI:
    case UTF8PROC_CATEGORY_PF:
    case UTF8PROC_CATEGORY_PO:
      f |= kPropP;
      break;
    case UTF8PROC_CATEGORY_SM:
    case UTF8PROC_CATEGORY_SC:
    case UTF8PROC_CATEGORY_SK:
    case UTF8PROC_CATEGORY_SO:
      f |= kPropS;
      break;
    default:
      break;
  }
  // White_Space (Unicode 17): TAB..CR, SPACE, NEL, NBSP, OGHAM SPACE MARK, EN QUAD..HAIR SPACE,
  // LS, PS, NNBSP, MMSP, IDEOGRAPHIC SPACE.
  const bool ws = (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 ||
                  cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
                  cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
  if (ws) f |= kPropWS;
  if (is_js_space(cp)) f |= kPropJsWS;
  return f;
}

}  // namespace

PropertyTable::PropertyTable() {
  std::vector<std::uint8_t> gc(kMaxCp);
  for (char32_t cp = 0; cp < kMaxCp; ++cp) {
    gc[cp] = (cp >= 0xD800 && cp < 0xE000)
                 ? static_cast<std::uint8_t>(UTF8PROC_CATEGORY_CS)
                 : static_cast<std::uint8_t>(utf8proc_category(static_cast<utf8proc_int32_t>(cp)));
  }
  for (const GcPatch& p : gc_patch()) {
    for (char32_t cp = p.lo; cp <= p.hi; ++cp) gc[cp] = p.gc;
  }
  for (char32_t cp = 0; cp < 0x80; ++cp) ascii_[cp] = flags_of(gc[cp], cp);
  stage1_.resize(kMaxCp >> 7);
  std::unordered_map<std::string, std::uint16_t> blocks;
  std::string block(128, '\0');
  for (char32_t b = 0; b < (kMaxCp >> 7); ++b) {
    for (char32_t k = 0; k < 128; ++k) {
      const char32_t cp = (b << 7) | k;
      block[k] = static_cast<char>(flags_of(gc[cp], cp));
    }
    auto [it, inserted] = blocks.emplace(block, static_cast<std::uint16_t>(blocks.size()));
    if (inserted) stage2_.insert(stage2_.end(), block.begin(), block.end());
    stage1_[b] = it->second;
  }
  stage2_.shrink_to_fit();
}

char32_t simple_lower(char32_t cp) {
  static const std::unordered_map<char32_t, char32_t> patch = [] {
    std::unordered_map<char32_t, char32_t> m;
    for (const LowerPatch& p : lower_patch()) m.emplace(p.from, p.to);
    return m;
  }();
  if (cp < 0x80) return cp >= 'A' && cp <= 'Z' ? cp + 32 : cp;
  if (auto it = patch.find(cp); it != patch.end()) return it->second;
  return static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(cp)));
}

const PropertyTable& PropertyTable::get() {
  static const PropertyTable table;
  return table;
}

}  // namespace omni::unicode
