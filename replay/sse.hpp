// Incremental parser of server-sent events (the text/event-stream format of OpenAI-style
// streaming). Bytes arrive in arbitrary pieces; an event is complete at its blank line. Only
// `data:` fields matter here: several data lines of one event are joined with "\n", comments
// (":...") and other fields are skipped. Lines end with "\n" or "\r\n".
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace omni::replay {

class SseParser {
 public:
  // An event or a line longer than this is an error (std::length_error): memory stays bounded
  // whatever the server sends.
  static constexpr std::size_t kMaxEventBytes = 16u << 20;

  // Parses `bytes` and appends the data of every event they complete to `events`.
  void feed(std::string_view bytes, std::vector<std::string>& events);

  // Bytes received but not yet part of a complete event.
  std::size_t pending() const { return line_.size() + data_.size(); }

 private:
  void line(std::string_view text, std::vector<std::string>& events);

  std::string line_;  // the current, incomplete line
  std::string data_;  // the current event's data so far
  bool has_data_ = false;
};

}  // namespace omni::replay
