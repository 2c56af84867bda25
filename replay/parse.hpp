// Strict number parsing for the command line, the synthetic spec and the Azure CSV: the whole
// text must be the number (std::from_chars, so no locale, sign or whitespace surprises).
#pragma once

#include <charconv>
#include <cmath>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace omni::replay {

template <typename T>
std::optional<T> parse_number(std::string_view text) {
  T out{};
  const char* end = text.data() + text.size();
  auto [p, ec] = std::from_chars(text.data(), end, out);
  if (ec != std::errc() || p != end) return std::nullopt;
  if constexpr (std::is_floating_point_v<T>) {
    if (!std::isfinite(out)) return std::nullopt;
  }
  return out;
}

// `text` as a number in [lo, hi]; otherwise throws Error with
// `<what>: invalid value "<text>" (expected <lo>..<hi>)`.
template <typename T, typename Error = std::invalid_argument>
T parse_in_range(const std::string& what, std::string_view text, T lo, T hi) {
  const auto v = parse_number<T>(text);
  if (!v || *v < lo || *v > hi) {
    std::ostringstream os;
    os << what << ": invalid value \"" << text << "\" (expected " << lo << ".." << hi << ")";
    throw Error(os.str());
  }
  return *v;
}

}  // namespace omni::replay
