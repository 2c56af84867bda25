#include "sse.hpp"

namespace omni::replay {

void SseParser::feed(std::string_view bytes, std::vector<std::string>& events) {
  while (!bytes.empty()) {
    const auto nl = bytes.find('\n');
    if (nl == std::string_view::npos) {
      line_.append(bytes);
      if (pending() > kMaxEventBytes) throw std::length_error("SSE event larger than 16 MiB");
      return;
    }
    // The common case, a whole line inside one read, needs no copy.
    std::string_view text = bytes.substr(0, nl);
    if (!line_.empty()) {
      line_.append(text);
      text = line_;
    }
    if (!text.empty() && text.back() == '\r') text.remove_suffix(1);
    line(text, events);
    line_.clear();
    bytes.remove_prefix(nl + 1);
  }
}

void SseParser::line(std::string_view text, std::vector<std::string>& events) {
  if (text.empty()) {  // the blank line ends the event
    if (has_data_) events.push_back(std::move(data_));
    data_.clear();
    has_data_ = false;
    return;
  }
  if (text.front() == ':') return;  // comment
  const auto colon = text.find(':');
  const std::string_view field = text.substr(0, colon);
  if (field != "data") return;
  std::string_view value =
      colon == std::string_view::npos ? std::string_view{} : text.substr(colon + 1);
  if (!value.empty() && value.front() == ' ') value.remove_prefix(1);
  if (has_data_) data_.push_back('\n');
  data_.append(value);
  has_data_ = true;
  if (data_.size() > kMaxEventBytes) throw std::length_error("SSE event larger than 16 MiB");
}

}  // namespace omni::replay
