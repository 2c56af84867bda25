#include "response.hpp"

#include <algorithm>

namespace omni::replay {

std::string truncate_error(std::string_view text) {
  if (text.size() <= kMaxErrorBytes) return std::string(text);
  std::size_t cut = kMaxErrorBytes;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return std::string(text.substr(0, cut));
}

void ResponseReader::on_header(int status, bool event_stream, std::string prefill_peer,
                               std::string decode_peer) {
  rec_.status = status;
  rec_.prefill_peer = std::move(prefill_peer);
  rec_.decode_peer = std::move(decode_peer);
  // A 200 that is not an event stream (a server that ignores "stream") is read as a whole.
  sse_ = status == 200 && event_stream;
}

void ResponseReader::on_body(std::string_view bytes, double t_ms) {
  if (finished()) return;  // an error was already recorded; the rest is drained
  if (sse_) {
    try {
      parser_.feed(bytes, events_);
    } catch (const std::length_error& e) {
      return fail("bad_response", e.what());
    }
    for (const auto& e : events_) on_event(e, t_ms);
    events_.clear();
  } else if (rec_.status == 200) {
    if (body_.size() + bytes.size() > kMaxBodyBytes) return fail("bad_response", "body too large");
    body_.append(bytes);
  } else {
    // Only the start of an error body is kept (one byte more than needed shows the cut).
    const std::size_t room = kMaxErrorBytes + 1 - std::min(body_.size(), kMaxErrorBytes + 1);
    body_.append(bytes.substr(0, room));
  }
}

void ResponseReader::on_event(const std::string& data, double t_ms) {
  if (done_ || finished()) return;
  if (data == "[DONE]") {
    done_ = true;
    return;
  }
  const auto j = nlohmann::json::parse(data, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return fail("bad_response", "SSE event is not a JSON object: " + data);
  }
  if (j.contains("error")) return fail("stream_error", data);
  std::uint64_t tokens = 1;
  if (auto u = j.find("usage"); u != j.end() && u->is_object()) {
    read_usage(*u);
    // A running usage (continuous_usage_stats) says how many tokens this event carried.
    if (rec_.completion_tokens > static_cast<std::int64_t>(rec_.tokens_seen)) {
      tokens = static_cast<std::uint64_t>(rec_.completion_tokens) - rec_.tokens_seen;
    }
  }
  auto choices = j.find("choices");
  if (choices == j.end() || !choices->is_array() || choices->empty() ||
      !choices->front().is_object()) {
    return;  // the usage chunk, or a keep-alive
  }
  const auto& c = choices->front();
  auto non_empty = [](const nlohmann::json& o, const char* key) {
    auto it = o.find(key);
    return it != o.end() && it->is_string() && !it->get_ref<const std::string&>().empty();
  };
  bool text = non_empty(c, "text");
  if (auto d = c.find("delta"); !text && d != c.end() && d->is_object()) {
    text = non_empty(*d, "content") || non_empty(*d, "reasoning_content");
  }
  if (text) token_event(tokens, t_ms);
}

void ResponseReader::token_event(std::uint64_t tokens, double t_ms) {
  ++rec_.token_events;
  if (rec_.ttft_ms < 0) {
    rec_.ttft_ms = t_ms;
  } else {
    const double gap = t_ms - last_token_ms_;
    const double each = gap / static_cast<double>(tokens);
    rec_.itl_count += tokens;
    rec_.itl_sum_ms += gap;
    rec_.itl_max_ms = std::max(rec_.itl_max_ms, each);
    itl_.add(each, tokens);
  }
  rec_.tokens_seen += tokens;
  last_token_ms_ = t_ms;
}

void ResponseReader::read_usage(const nlohmann::json& usage) {
  auto count = [](const nlohmann::json& o, const char* key) -> std::int64_t {
    auto it = o.find(key);
    return it != o.end() && it->is_number_integer() ? it->get<std::int64_t>() : -1;
  };
  rec_.prompt_tokens = count(usage, "prompt_tokens");
  rec_.completion_tokens = count(usage, "completion_tokens");
  auto details = usage.find("prompt_tokens_details");
  rec_.cached_tokens =
      details != usage.end() && details->is_object() ? count(*details, "cached_tokens") : -1;
}

void ResponseReader::on_end(double t_ms) {
  if (rec_.e2e_ms < 0) rec_.e2e_ms = t_ms;
  if (finished()) return;
  if (rec_.status != 200) return fail("http_" + std::to_string(rec_.status), body_);
  if (sse_) {
    if (!done_) return fail("incomplete", "the stream ended without data: [DONE]");
  } else {
    // A whole answer: its arrival is the first (and only) output the client sees.
    const auto j = nlohmann::json::parse(body_, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("choices") || !j["choices"].is_array() ||
        j["choices"].empty()) {
      return fail("bad_response", "not a completion object: " + body_);
    }
    if (auto u = j.find("usage"); u != j.end() && u->is_object()) read_usage(*u);
    rec_.ttft_ms = t_ms;
  }
  if (rec_.completion_tokens < 0 && sse_) {
    rec_.completion_tokens = static_cast<std::int64_t>(rec_.tokens_seen);
  }
  rec_.outcome = kOutcomeOk;
}

void ResponseReader::on_failure(const std::string& kind, const std::string& message, double t_ms) {
  if (rec_.e2e_ms < 0) rec_.e2e_ms = t_ms;
  fail(kind, message);
}

void ResponseReader::fail(const std::string& kind, std::string_view message) {
  if (finished()) return;
  rec_.outcome = kind;
  rec_.error = truncate_error(message);
}

}  // namespace omni::replay
