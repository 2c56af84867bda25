#include <omni/response_scan.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <limits>

namespace omni {
namespace {

std::uint32_t clamp_u32(std::int64_t v) {
  if (v < 0) return 0;
  return static_cast<std::uint32_t>(
      std::min<std::int64_t>(v, std::numeric_limits<std::uint32_t>::max()));
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) {
    s.remove_suffix(1);
  }
  return s;
}

// Adds the prompt/completion tokens of one `usage` or `meta_info` object.
// Cached prompt tokens of a usage object (usage.prompt_tokens_details.cached_tokens, as vLLM
// and OpenAI write it) or of SGLang's meta_info (cached_tokens); -1 when absent.
std::int64_t cached_of(const nlohmann::json& o) {
  if (!o.is_object()) return -1;
  if (auto d = o.find("prompt_tokens_details"); d != o.end() && d->is_object()) {
    if (auto c = d->find("cached_tokens"); c != d->end() && c->is_number_integer()) {
      return std::max<std::int64_t>(0, c->get<std::int64_t>());
    }
  }
  if (auto c = o.find("cached_tokens"); c != o.end() && c->is_number_integer()) {
    return std::max<std::int64_t>(0, c->get<std::int64_t>());
  }
  return -1;
}

bool add_counts(const nlohmann::json& o, std::int64_t& prompt, std::int64_t& output,
                std::int64_t* cached = nullptr) {
  if (!o.is_object()) return false;
  auto p = o.find("prompt_tokens");
  auto c = o.find("completion_tokens");
  if (c == o.end() || !c->is_number_integer()) return false;
  output += c->get<std::int64_t>();
  if (p != o.end() && p->is_number_integer()) prompt += p->get<std::int64_t>();
  if (cached != nullptr) {
    if (const std::int64_t n = cached_of(o); n >= 0) *cached = std::max<std::int64_t>(0, *cached) + n;
  }
  return true;
}

// Sums prompt/completion tokens of an OpenAI `usage` object or SGLang `meta_info` (an object,
// or an array of them for a batch).
bool counts_of(const nlohmann::json& j, std::int64_t& prompt, std::int64_t& output,
               std::int64_t* cached = nullptr) {
  auto one = [&](const nlohmann::json& o) { return add_counts(o, prompt, output, cached); };
  if (j.is_array()) {
    bool any = false;
    for (const auto& item : j) {
      if (item.is_object() && item.contains("meta_info")) any = one(item["meta_info"]) || any;
    }
    return any;
  }
  if (!j.is_object()) return false;
  if (auto u = j.find("usage"); u != j.end() && u->is_object()) return one(*u);
  if (auto m = j.find("meta_info"); m != j.end()) return one(*m);
  return false;
}

// The `usage` object of an answer whose last top-level member it is, as vLLM and SGLang write
// their OpenAI answers: found from the end and returned as its own text, so only that small
// object is parsed, not the whole answer. Empty when the answer is not laid out that way (the
// caller then parses all of it). Outside strings every '"' of JSON is a real quote, so a key
// `"usage"` is recognised by an unescaped quote before it and a ':' after it; the object ends at
// its matching brace (strings skipped), and only the top-level object's '}' and whitespace may
// follow.
std::string_view trailing_usage(std::string_view json) {
  auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; };
  const std::size_t key = json.rfind("\"usage\"");
  if (key == std::string_view::npos) return {};
  std::size_t slashes = 0;
  while (slashes < key && json[key - 1 - slashes] == '\\') ++slashes;
  if (slashes % 2 != 0) return {};
  std::size_t i = key + 7;
  while (i < json.size() && is_space(json[i])) ++i;
  if (i >= json.size() || json[i] != ':') return {};
  ++i;
  while (i < json.size() && is_space(json[i])) ++i;
  if (i >= json.size() || json[i] != '{') return {};
  const std::size_t begin = i;
  int depth = 0;
  bool in_string = false;
  for (; i < json.size(); ++i) {
    const char c = json[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      ++depth;
    } else if ((c == '}' || c == ']') && --depth == 0) {
      break;
    }
  }
  if (i >= json.size()) return {};
  const std::size_t end = i + 1;
  std::size_t j = end;
  while (j < json.size() && is_space(json[j])) ++j;
  if (j >= json.size() || json[j] != '}') return {};
  for (++j; j < json.size(); ++j) {
    if (!is_space(json[j])) return {};
  }
  return json.substr(begin, end - begin);
}

}  // namespace

UsageScanner::UsageScanner(bool stream, std::size_t max_buffer)
    : stream_(stream), max_buffer_(max_buffer) {}

std::uint32_t UsageScanner::output_tokens() const noexcept {
  return exact_ ? output_tokens_ : choice_events_;
}

void UsageScanner::feed(std::string_view bytes) {
  if (!stream_) {
    if (overflow_) return;
    if (buffer_.size() + bytes.size() > max_buffer_) {
      overflow_ = true;
      buffer_.clear();
      return;
    }
    buffer_.append(bytes);
    return;
  }
  while (!bytes.empty()) {
    const auto nl = bytes.find('\n');
    const std::string_view part = bytes.substr(0, nl);
    if (!overflow_) {
      if (buffer_.size() + part.size() > max_buffer_) {
        overflow_ = true;  // this line is dropped
        buffer_.clear();
      } else {
        buffer_.append(part);
      }
    }
    if (nl == std::string_view::npos) return;
    if (!overflow_) line(buffer_);
    buffer_.clear();
    overflow_ = false;
    bytes.remove_prefix(nl + 1);
  }
}

void UsageScanner::line(std::string_view l) {
  l = trim(l);
  if (!l.starts_with("data:")) return;
  l = trim(l.substr(5));
  if (l.empty() || l == "[DONE]") return;
  ++events_;
  const bool has_choices = l.find("\"choices\"") != std::string_view::npos &&
                           l.find("\"choices\":[]") == std::string_view::npos;
  const bool has_usage = l.find("\"usage\"") != std::string_view::npos ||
                         l.find("\"meta_info\"") != std::string_view::npos;
  if (l.find("\"error\"") != std::string_view::npos) {
    auto j = nlohmann::json::parse(l, nullptr, false);
    if (j.is_object() && j.contains("error") && j["error"].is_object()) saw_error_ = true;
  }
  if (has_choices || (!has_usage && l.find("\"text\"") != std::string_view::npos)) {
    ++choice_events_;
  }
  if (has_usage) read_usage(l);
}

void UsageScanner::read_usage(std::string_view json) {
  std::int64_t prompt = 0;
  std::int64_t output = 0;
  std::int64_t cached = -1;
  bool found = false;
  if (const std::string_view usage = trailing_usage(json); !usage.empty()) {
    auto u = nlohmann::json::parse(usage, nullptr, false);
    found = !u.is_discarded() && add_counts(u, prompt, output, &cached);
  }
  if (!found) {
    prompt = output = 0;
    cached = -1;
    auto j = nlohmann::json::parse(json, nullptr, false);
    if (j.is_discarded() || !counts_of(j, prompt, output, &cached)) return;
  }
  exact_ = true;
  cached_tokens_ = cached;
  prompt_tokens_ = clamp_u32(prompt);
  output_tokens_ = clamp_u32(output);  // streamed meta_info and usage are cumulative
}

void UsageScanner::finish() {
  if (stream_) {
    if (!overflow_ && !buffer_.empty()) line(buffer_);
    buffer_.clear();
    return;
  }
  if (!overflow_ && !buffer_.empty()) read_usage(buffer_);
  buffer_.clear();
  buffer_.shrink_to_fit();
}

std::optional<std::uint32_t> cached_tokens_of(std::string_view answer) {
  std::int64_t prompt = 0, output = 0, cached = -1;
  if (const std::string_view usage = trailing_usage(answer); !usage.empty()) {
    auto u = nlohmann::json::parse(usage, nullptr, false);
    if (!u.is_discarded() && add_counts(u, prompt, output, &cached) && cached >= 0) {
      return clamp_u32(cached);
    }
  }
  cached = -1;
  auto j = nlohmann::json::parse(answer, nullptr, false);
  if (j.is_discarded() || !counts_of(j, prompt, output, &cached) || cached < 0) return std::nullopt;
  return clamp_u32(cached);
}

std::optional<HttpResponse> parse_http_response(std::string_view raw) {
  const auto head_end = raw.find("\r\n\r\n");
  if (head_end == std::string_view::npos || !raw.starts_with("HTTP/1.")) return std::nullopt;
  std::string_view head = raw.substr(0, head_end);
  std::string_view body = raw.substr(head_end + 4);
  const auto sp = head.find(' ');
  if (sp == std::string_view::npos || head.size() < sp + 4) return std::nullopt;
  HttpResponse r;
  const char* first = head.data() + sp + 1;
  if (std::from_chars(first, first + 3, r.status).ec != std::errc{} || r.status < 100 ||
      r.status > 599) {
    return std::nullopt;
  }
  std::optional<std::size_t> length;
  bool chunked = false;
  std::size_t pos = head.find("\r\n");
  while (pos != std::string_view::npos) {
    const std::size_t next = head.find("\r\n", pos + 2);
    std::string_view h = head.substr(pos + 2, next == std::string_view::npos ? std::string_view::npos
                                                                            : next - pos - 2);
    pos = next;
    const auto colon = h.find(':');
    if (colon == std::string_view::npos) continue;
    std::string name(h.substr(0, colon));
    std::transform(name.begin(), name.end(), name.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    const std::string_view value = trim(h.substr(colon + 1));
    if (name == "content-length") {
      std::size_t n = 0;
      if (std::from_chars(value.data(), value.data() + value.size(), n).ec != std::errc{}) {
        return std::nullopt;
      }
      length = n;
    } else if (name == "transfer-encoding") {
      std::string v(value);
      std::transform(v.begin(), v.end(), v.begin(),
                     [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
      chunked = v.find("chunked") != std::string::npos;
    }
  }
  if (chunked) {
    while (true) {
      const auto eol = body.find("\r\n");
      if (eol == std::string_view::npos) return std::nullopt;
      std::size_t size = 0;
      std::string_view hex = body.substr(0, eol);
      hex = hex.substr(0, hex.find(';'));
      hex = trim(hex);
      if (hex.empty() ||
          std::from_chars(hex.data(), hex.data() + hex.size(), size, 16).ec != std::errc{}) {
        return std::nullopt;
      }
      body.remove_prefix(eol + 2);
      if (size == 0) return r;
      if (body.size() < size + 2) return std::nullopt;
      r.body.append(body.substr(0, size));
      body.remove_prefix(size + 2);
    }
  }
  if (length) {
    if (body.size() < *length) return std::nullopt;
    r.body.assign(body.substr(0, *length));
    return r;
  }
  r.body.assign(body);
  return r;
}

}  // namespace omni
