#include <omni/request_body.hpp>

#include <omni/openai_error.hpp>

#include <cstring>
#include <limits>
#include <unordered_map>
#include <vector>

namespace omni {
namespace {

using ojson = nlohmann::ordered_json;

BodyError make_error(int status, std::string message, std::string param = {}) {
  return BodyError{status, std::move(message), std::move(param),
                   std::string(error_type_for_status(status))};
}

BodyError bad_request(std::string message, std::string param = {}) {
  return make_error(400, std::move(message), std::move(param));
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

// `s` with every byte that is not part of a well-formed UTF-8 sequence replaced by U+FFFD.
std::string valid_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  std::size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<unsigned char>(s[i]);
    std::size_t len = 0;
    unsigned char lo = 0x80;
    unsigned char hi = 0xBF;  // the allowed range of the second byte (RFC 3629 table)
    if (b < 0x80) {
      len = 1;
    } else if (b >= 0xC2 && b <= 0xDF) {
      len = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
      len = 3;
      if (b == 0xE0) lo = 0xA0;
      if (b == 0xED) hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
      len = 4;
      if (b == 0xF0) lo = 0x90;
      if (b == 0xF4) hi = 0x8F;
    }
    bool ok = len > 0 && i + len <= s.size();
    for (std::size_t k = 1; ok && k < len; ++k) {
      const auto c = static_cast<unsigned char>(s[i + k]);
      ok = k == 1 ? (c >= lo && c <= hi) : (c >= 0x80 && c <= 0xBF);
    }
    if (ok) {
      out.append(s.substr(i, len));
      i += len;
    } else {
      out += "\xEF\xBF\xBD";
      ++i;
    }
  }
  return out;
}

// Builds an ordered_json from nlohmann's SAX events in time linear in the input.
//
// nlohmann's own DOM builder inserts each object member through ordered_map::operator[], a
// linear search of the members so far, which makes an object of N members cost O(N^2): a 1 MB
// body of short keys would stall the event loop for seconds. Here each open object collects its
// members in a plain vector (with a hash index once it grows) and becomes an ordered_map, sized
// exactly, when it closes. Duplicate keys keep nlohmann's semantics: the last value wins, at the
// first occurrence's position.
//
// Pointer stability: only the innermost open container grows, so the slot an open child lives
// in (an element of its parent's vector) never moves while the child is being filled.
class OrderedDomBuilder {
 public:
  using number_integer_t = ojson::number_integer_t;
  using number_unsigned_t = ojson::number_unsigned_t;
  using number_float_t = ojson::number_float_t;
  using string_t = ojson::string_t;
  using binary_t = ojson::binary_t;

  bool null() { return put(ojson(nullptr)) != nullptr; }
  bool boolean(bool v) { return put(ojson(v)) != nullptr; }
  bool number_integer(number_integer_t v) { return put(ojson(v)) != nullptr; }
  bool number_unsigned(number_unsigned_t v) { return put(ojson(v)) != nullptr; }
  bool number_float(number_float_t v, const string_t& /*text*/) { return put(ojson(v)) != nullptr; }
  // The lexer clears its token buffer before the next token, so the string can be taken.
  bool string(string_t& v) { return put(ojson(std::move(v))) != nullptr; }
  bool binary(binary_t& /*v*/) {
    // JSON text has no binary values; only the binary formats emit this event.
    error_message_ = "unexpected binary value";
    return false;
  }

  bool start_object(std::size_t /*elements*/) {
    ojson* slot = put(ojson(ojson::value_t::object));
    frames_.push_back(Frame{true, slot, {}, {}, false});
    return true;
  }

  bool key(string_t& k) {
    Frame& f = frames_.back();
    if (!f.indexed && f.members.size() >= kIndexThreshold) {
      f.index.reserve(f.members.size() * 2);
      for (std::size_t i = 0; i < f.members.size(); ++i) f.index.emplace(f.members[i].first, i);
      f.indexed = true;
    }
    if (f.indexed) {
      auto [it, inserted] = f.index.emplace(k, f.members.size());
      if (!inserted) {
        pending_ = &f.members[it->second].second;
        return true;
      }
    } else {
      for (auto& member : f.members) {
        if (member.first == k) {
          pending_ = &member.second;
          return true;
        }
      }
    }
    f.members.emplace_back(std::move(k), ojson());
    pending_ = &f.members.back().second;
    return true;
  }

  bool end_object() {
    Frame& f = frames_.back();
    ojson::object_t& map = f.slot->get_ref<ojson::object_t&>();
    map.reserve(f.members.size());
    // Container::emplace_back appends without ordered_map's duplicate search; keys are unique.
    for (auto& member : f.members) {
      map.emplace_back(std::move(member.first), std::move(member.second));
    }
    frames_.pop_back();
    return true;
  }

  bool start_array(std::size_t /*elements*/) {
    ojson* slot = put(ojson(ojson::value_t::array));
    frames_.push_back(Frame{false, slot, {}, {}, false});
    return true;
  }

  bool end_array() {
    frames_.pop_back();
    return true;
  }

  bool parse_error(std::size_t position, const std::string& /*last_token*/,
                   const ojson::exception& ex) {
    error_position_ = position;
    // what() is "[json.exception.parse_error.101] parse error at line 1, column 2: ..."; the
    // bracketed id means nothing to a client.
    std::string_view what = ex.what();
    if (!what.empty() && what.front() == '[') {
      const std::size_t close = what.find("] ");
      if (close != std::string_view::npos) what.remove_prefix(close + 2);
    }
    // The message quotes the input near the error, which may be invalid UTF-8.
    error_message_ = valid_utf8(what);
    return false;
  }

  ojson& root() { return root_; }
  std::size_t error_position() const { return error_position_; }
  const std::string& error_message() const { return error_message_; }

 private:
  static constexpr std::size_t kIndexThreshold = 32;

  struct Frame {
    bool is_object;
    ojson* slot;  // the container's place in its parent (or the root)
    // Objects only: members so far, and a key -> member index once there are many.
    std::vector<std::pair<std::string, ojson>> members;
    std::unordered_map<std::string, std::size_t> index;
    bool indexed;
  };

  // Stores a finished value (or a fresh container) where the parser is, and returns its slot.
  ojson* put(ojson&& v) {
    if (frames_.empty()) {
      root_ = std::move(v);
      return &root_;
    }
    Frame& f = frames_.back();
    if (f.is_object) {
      *pending_ = std::move(v);
      return pending_;
    }
    ojson::array_t& array = f.slot->get_ref<ojson::array_t&>();
    array.push_back(std::move(v));
    return &array.back();
  }

  ojson root_;
  std::vector<Frame> frames_;
  ojson* pending_ = nullptr;  // the member slot the last key() selected
  std::size_t error_position_ = 0;
  std::string error_message_;
};

struct JsonParseFailure {
  std::size_t byte = 0;
  std::string detail;
};

// Parses `text` (already depth-checked) into `out`. Never throws but for bad_alloc.
std::optional<JsonParseFailure> parse_ordered(std::string_view text, ojson& out) {
  OrderedDomBuilder builder;
  const char* begin = text.data();
  const bool ok = ojson::sax_parse(begin, begin + text.size(), &builder);
  if (!ok) return JsonParseFailure{builder.error_position(), builder.error_message()};
  out = std::move(builder.root());
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// Validation helpers
// ---------------------------------------------------------------------------------------------

// Unicode code points in valid UTF-8 (the parser has rejected anything else).
std::size_t code_points(std::string_view s) noexcept {
  std::size_t n = 0;
  for (const char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

// An integer value as int64; nullopt for a non-integer or one above INT64_MAX.
std::optional<std::int64_t> as_int64(const ojson& v) {
  if (v.is_number_unsigned()) {
    const auto u = v.get<std::uint64_t>();
    if (u > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      return std::nullopt;
    }
    return static_cast<std::int64_t>(u);
  }
  if (v.is_number_integer()) return v.get<std::int64_t>();
  return std::nullopt;
}

std::string in_quotes(std::string_view param) {
  return "'" + std::string(param) + "'";
}

// Reads an optional integer >= `min`. A null `v` (absent, or JSON null) leaves `out` unset.
std::optional<BodyError> read_int(const ojson* v, std::string_view param, std::int64_t min,
                                  std::optional<std::int64_t>& out) {
  if (v == nullptr) return std::nullopt;
  const std::optional<std::int64_t> i = as_int64(*v);
  if (!i) {
    if (v->is_number_integer()) {
      return bad_request(in_quotes(param) + " is out of range", std::string(param));
    }
    return bad_request(in_quotes(param) + " must be an integer, got " + v->type_name(),
                       std::string(param));
  }
  if (*i < min) {
    return bad_request(in_quotes(param) + " must be at least " + std::to_string(min) + ", got " +
                           std::to_string(*i),
                       std::string(param));
  }
  out = *i;
  return std::nullopt;
}

std::string indexed(std::string_view param, std::size_t i) {
  return std::string(param) + "[" + std::to_string(i) + "]";
}

bool is_token_id(const ojson& v) {
  return v.is_number_unsigned() || (v.is_number_integer() && v.get<std::int64_t>() >= 0);
}

// A non-empty array of non-negative integers; adds its length to `tokens`.
std::optional<BodyError> check_token_ids(const ojson& v, const std::string& param,
                                         std::size_t& tokens) {
  if (!v.is_array() || v.empty()) {
    return bad_request(in_quotes(param) + " must be a non-empty array of token ids", param);
  }
  for (std::size_t i = 0; i < v.size(); ++i) {
    if (!is_token_id(v[i])) {
      return bad_request(in_quotes(indexed(param, i)) + " must be a non-negative integer token id",
                         indexed(param, i));
    }
  }
  tokens += v.size();
  return std::nullopt;
}

// A prompt-like input: a non-empty string or [string] when `allow_string`, a non-empty [int] or
// [[int]] when `allow_ids`. Fills the input features.
std::optional<BodyError> check_prompt_input(const ojson& v, const std::string& param,
                                            bool allow_string, bool allow_ids, BodyFeatures& f) {
  const char* expected = allow_string && allow_ids
                             ? " must be a non-empty string, array of token ids, array of strings "
                               "or array of token-id arrays"
                         : allow_string ? " must be a non-empty string or array of strings"
                                        : " must be a non-empty array of token ids or of token-id "
                                          "arrays";
  if (allow_string && v.is_string()) {
    const auto& s = v.get_ref<const std::string&>();
    if (s.empty()) return bad_request(in_quotes(param) + " must not be empty", param);
    f.prompt_chars += code_points(s);
    return std::nullopt;
  }
  if (!v.is_array() || v.empty()) return bad_request(in_quotes(param) + expected, param);
  const ojson& first = v.front();
  if (allow_ids && first.is_number()) {
    f.has_token_ids = true;
    return check_token_ids(v, param, f.prompt_token_ids);
  }
  if (allow_string && first.is_string()) {
    for (std::size_t i = 0; i < v.size(); ++i) {
      const ojson& item = v[i];
      if (!item.is_string() || item.get_ref<const std::string&>().empty()) {
        return bad_request(in_quotes(indexed(param, i)) + " must be a non-empty string",
                           indexed(param, i));
      }
      f.prompt_chars += code_points(item.get_ref<const std::string&>());
    }
    f.batch_input = true;
    f.batch_size = v.size();
    return std::nullopt;
  }
  if (allow_ids && first.is_array()) {
    f.has_token_ids = true;
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (auto err = check_token_ids(v[i], indexed(param, i), f.prompt_token_ids)) return err;
    }
    f.batch_input = true;
    f.batch_size = v.size();
    return std::nullopt;
  }
  return bad_request(in_quotes(param) + expected, param);
}

std::optional<BodyError> check_messages(const ojson* messages, BodyFeatures& f) {
  if (messages == nullptr) return bad_request("'messages' is required", "messages");
  if (!messages->is_array() || messages->empty()) {
    return bad_request("'messages' must be a non-empty array of message objects", "messages");
  }
  for (std::size_t i = 0; i < messages->size(); ++i) {
    const ojson& m = (*messages)[i];
    const std::string at = indexed("messages", i);
    if (!m.is_object()) {
      return bad_request(in_quotes(at) + " must be an object, got " + m.type_name(), at);
    }
    const auto role = m.find("role");
    if (role == m.end() || !role->is_string()) {
      return bad_request(in_quotes(at + ".role") + " must be a string", at + ".role");
    }
    const auto content = m.find("content");
    if (content == m.end() || content->is_null()) continue;
    if (content->is_string()) {
      f.prompt_chars += code_points(content->get_ref<const std::string&>());
    } else if (content->is_array()) {
      // Content parts: {"type": "text", "text": ...} counts; images, audio and the like do not.
      for (const ojson& part : *content) {
        if (part.is_string()) {
          f.prompt_chars += code_points(part.get_ref<const std::string&>());
        } else if (part.is_object()) {
          const auto text = part.find("text");
          if (text != part.end() && text->is_string()) {
            f.prompt_chars += code_points(text->get_ref<const std::string&>());
          }
        }
      }
    } else {
      return bad_request(in_quotes(at + ".content") +
                             " must be a string or an array of content parts, got " +
                             content->type_name(),
                         at + ".content");
    }
  }
  return std::nullopt;
}

// sampling_params of /generate: an object, or (for a batch) an array of objects.
std::optional<BodyError> check_sampling_params(const ojson* sp, BodyFeatures& f) {
  if (sp == nullptr) return std::nullopt;
  auto check_one = [&f](const ojson& obj, const std::string& at) -> std::optional<BodyError> {
    if (!obj.is_object()) {
      return bad_request(in_quotes(at) + " must be an object, got " + obj.type_name(), at);
    }
    const auto mnt = obj.find("max_new_tokens");
    std::optional<std::int64_t> max_new;
    if (mnt != obj.end() && !mnt->is_null()) {
      if (auto err = read_int(&*mnt, at + ".max_new_tokens", 0, max_new)) return err;
      if (!f.max_tokens || *max_new > *f.max_tokens) f.max_tokens = max_new;
    }
    const auto n = obj.find("n");
    std::optional<std::int64_t> n_value;
    if (n != obj.end() && !n->is_null()) {
      if (auto err = read_int(&*n, at + ".n", 1, n_value)) return err;
      if (*n_value > f.n) f.n = *n_value;
    }
    return std::nullopt;
  };
  if (sp->is_array()) {
    for (std::size_t i = 0; i < sp->size(); ++i) {
      if (auto err = check_one((*sp)[i], indexed("sampling_params", i))) return err;
    }
    return std::nullopt;
  }
  return check_one(*sp, "sampling_params");
}

// The top-level members validation looks at, found in one pass. JSON null counts as absent.
struct KnownFields {
  const ojson* model = nullptr;
  const ojson* stream = nullptr;
  const ojson* stream_options = nullptr;
  const ojson* max_tokens = nullptr;
  const ojson* max_completion_tokens = nullptr;
  const ojson* n = nullptr;
  const ojson* priority = nullptr;
  const ojson* prompt = nullptr;
  const ojson* messages = nullptr;
  const ojson* text = nullptr;
  const ojson* input_ids = nullptr;
  const ojson* sampling_params = nullptr;
  bool has_max_completion_tokens = false;
  bool has_kv_transfer_params = false;
  bool has_bootstrap = false;
};

KnownFields scan_fields(const ojson& obj) {
  KnownFields k;
  for (const auto& [key, value] : obj.get_ref<const ojson::object_t&>()) {
    const ojson* v = value.is_null() ? nullptr : &value;
    if (key == "model") {
      k.model = v;
    } else if (key == "stream") {
      k.stream = v;
    } else if (key == "stream_options") {
      k.stream_options = v;
    } else if (key == "max_tokens") {
      k.max_tokens = v;
    } else if (key == "max_completion_tokens") {
      k.max_completion_tokens = v;
      k.has_max_completion_tokens = true;
    } else if (key == "n") {
      k.n = v;
    } else if (key == "priority") {
      k.priority = v;
    } else if (key == "prompt") {
      k.prompt = v;
    } else if (key == "messages") {
      k.messages = v;
    } else if (key == "text") {
      k.text = v;
    } else if (key == "input_ids") {
      k.input_ids = v;
    } else if (key == "sampling_params") {
      k.sampling_params = v;
    } else if (key == "kv_transfer_params") {
      k.has_kv_transfer_params = true;
    } else if (key == "bootstrap_host" || key == "bootstrap_port" || key == "bootstrap_room") {
      k.has_bootstrap = true;
    }
  }
  return k;
}

// Validates in a fixed order (input first, then the common fields) so that a body with several
// problems always reports the same one.
std::optional<BodyError> validate(Api api, const ojson& obj, BodyFeatures& f) {
  const KnownFields k = scan_fields(obj);
  f.api = api;
  f.has_max_completion_tokens = k.has_max_completion_tokens;
  f.has_kv_transfer_params = k.has_kv_transfer_params;
  f.has_bootstrap = k.has_bootstrap;

  switch (api) {
    case Api::kCompletions:
      if (k.prompt == nullptr) return bad_request("'prompt' is required", "prompt");
      if (auto err = check_prompt_input(*k.prompt, "prompt", true, true, f)) return err;
      break;
    case Api::kChatCompletions:
      if (auto err = check_messages(k.messages, f)) return err;
      break;
    case Api::kGenerate:
      if ((k.text == nullptr) == (k.input_ids == nullptr)) {
        return bad_request("exactly one of 'text' and 'input_ids' is required", "text");
      }
      if (k.text != nullptr) {
        if (auto err = check_prompt_input(*k.text, "text", true, false, f)) return err;
      } else if (auto err = check_prompt_input(*k.input_ids, "input_ids", false, true, f)) {
        return err;
      }
      if (auto err = check_sampling_params(k.sampling_params, f)) return err;
      break;
  }

  if (k.model != nullptr) {
    if (!k.model->is_string()) {
      return bad_request(std::string("'model' must be a string, got ") + k.model->type_name(),
                         "model");
    }
    f.model = k.model->get<std::string>();
  }
  if (k.stream != nullptr) {
    if (!k.stream->is_boolean()) {
      return bad_request(std::string("'stream' must be a boolean, got ") + k.stream->type_name(),
                         "stream");
    }
    f.stream = k.stream->get<bool>();
  }
  if (auto err =
          read_int(k.priority, "priority", std::numeric_limits<std::int64_t>::min(), f.priority)) {
    return err;
  }
  if (api == Api::kGenerate) return std::nullopt;

  std::optional<std::int64_t> max_tokens;
  std::optional<std::int64_t> max_completion_tokens;
  if (auto err = read_int(k.max_tokens, "max_tokens", 1, max_tokens)) return err;
  if (auto err =
          read_int(k.max_completion_tokens, "max_completion_tokens", 1, max_completion_tokens)) {
    return err;
  }
  f.max_tokens = max_completion_tokens ? max_completion_tokens : max_tokens;
  std::optional<std::int64_t> n;
  if (auto err = read_int(k.n, "n", 1, n)) return err;
  f.n = n.value_or(1);

  if (k.stream_options != nullptr) {
    if (!k.stream_options->is_object()) {
      return bad_request(
          std::string("'stream_options' must be an object, got ") + k.stream_options->type_name(),
          "stream_options");
    }
    // vLLM refuses the same: usage options mean nothing without streaming.
    if (!f.stream) {
      return bad_request("'stream_options' is only allowed when 'stream' is true",
                         "stream_options");
    }
    const auto usage = k.stream_options->find("include_usage");
    if (usage != k.stream_options->end() && !usage->is_null()) {
      if (!usage->is_boolean()) {
        return bad_request(std::string("'stream_options.include_usage' must be a boolean, got ") +
                               usage->type_name(),
                           "stream_options.include_usage");
      }
      f.include_usage = usage->get<bool>();
    }
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// Serialization
// ---------------------------------------------------------------------------------------------

// A top-level edit: set `key` to `*value` (in place if present, else appended), or remove it
// when `value` is null.
struct Edit {
  std::string_view key;
  const ojson* value;
};

void dump_to(std::string& out, const ojson& v) {
  // Strings in a parsed document are valid UTF-8; `replace` only matters for values a caller
  // built (a bootstrap host), and keeps this from throwing.
  out += v.dump(-1, ' ', false, ojson::error_handler_t::replace);
}

void append_member(std::string& out, bool& first, std::string_view key, const ojson& value) {
  if (!first) out += ',';
  first = false;
  dump_to(out, ojson(std::string(key)));
  out += ':';
  dump_to(out, value);
}

// Serializes `obj` with `edits` applied, member by member, so the document is never copied.
std::string serialize_with(const ojson& obj, std::span<const Edit> edits) {
  std::vector<bool> applied(edits.size(), false);
  std::string out;
  out += '{';
  bool first = true;
  for (const auto& [key, value] : obj.get_ref<const ojson::object_t&>()) {
    const ojson* replacement = &value;
    for (std::size_t i = 0; i < edits.size(); ++i) {
      if (edits[i].key == key) {
        replacement = edits[i].value;
        applied[i] = true;
        break;
      }
    }
    if (replacement != nullptr) append_member(out, first, key, *replacement);
  }
  for (std::size_t i = 0; i < edits.size(); ++i) {
    if (!applied[i] && edits[i].value != nullptr) {
      append_member(out, first, edits[i].key, *edits[i].value);
    }
  }
  out += '}';
  return out;
}

const ojson& prefill_kv_transfer_params() {
  static const ojson kParams = [] {
    ojson p = ojson::object();
    p["do_remote_decode"] = true;
    p["do_remote_prefill"] = false;
    p["remote_engine_id"] = nullptr;
    p["remote_block_ids"] = nullptr;
    p["remote_host"] = nullptr;
    p["remote_port"] = nullptr;
    return p;
  }();
  return kParams;
}

}  // namespace

std::string_view api_path(Api api) noexcept {
  switch (api) {
    case Api::kCompletions:
      return "/v1/completions";
    case Api::kChatCompletions:
      return "/v1/chat/completions";
    case Api::kGenerate:
      return "/generate";
  }
  return {};
}

std::optional<Api> api_from_path(std::string_view path) noexcept {
  for (const Api api : {Api::kCompletions, Api::kChatCompletions, Api::kGenerate}) {
    if (path == api_path(api)) return api;
  }
  return std::nullopt;
}

std::string BodyError::to_json() const {
  return openai_error_body(status, message, type, param);
}

std::optional<std::size_t> find_excess_nesting(std::string_view text,
                                               std::size_t max_depth) noexcept {
  std::size_t depth = 0;
  const char* const begin = text.data();
  const char* const end = begin + text.size();
  for (const char* p = begin; p < end; ++p) {
    switch (*p) {
      case '"':
        // Skip the string: up to the next quote that no backslash escapes. An unterminated
        // string ends the scan; the parser reports it.
        for (++p; p < end && *p != '"'; ++p) {
          if (*p == '\\') ++p;
        }
        break;
      case '[':
      case '{':
        if (++depth > max_depth) return static_cast<std::size_t>(p - begin);
        break;
      case ']':
      case '}':
        if (depth > 0) --depth;
        break;
      default:
        break;
    }
  }
  return std::nullopt;
}

BodyResult<ParsedBody> parse_request_body(Api api, std::string_view body,
                                          const ParseOptions& options) {
  if (body.size() > options.max_body_bytes) {
    return make_error(413, "request body is " + std::to_string(body.size()) +
                               " bytes; the limit is " + std::to_string(options.max_body_bytes));
  }
  if (const auto at = find_excess_nesting(body, options.max_depth)) {
    return bad_request("request body nests arrays/objects deeper than " +
                       std::to_string(options.max_depth) + " levels (at byte " +
                       std::to_string(*at) + ")");
  }
  ParsedBody parsed;
  if (const auto failure = parse_ordered(body, parsed.json)) {
    return bad_request("request body is not valid JSON (at byte " + std::to_string(failure->byte) +
                       "): " + failure->detail);
  }
  if (!parsed.json.is_object()) {
    return bad_request(std::string("request body must be a JSON object, got ") +
                       parsed.json.type_name());
  }
  if (auto err = validate(api, parsed.json, parsed.features)) return std::move(*err);
  return BodyResult<ParsedBody>(std::move(parsed));
}

std::string serialize(const ParsedBody& body) {
  return body.json.dump(-1, ' ', false, ojson::error_handler_t::replace);
}

std::string vllm_prefill_body(const ParsedBody& body) {
  static const ojson kFalse = false;
  static const ojson kOne = 1;
  std::vector<Edit> edits = {
      {"kv_transfer_params", &prefill_kv_transfer_params()},
      {"stream", &kFalse},
      {"max_tokens", &kOne},
      {"stream_options", nullptr},
      {"min_tokens", nullptr},
  };
  if (body.features.has_max_completion_tokens) edits.push_back({"max_completion_tokens", &kOne});
  return serialize_with(body.json, edits);
}

std::string vllm_decode_body(const ParsedBody& body, const ojson* kv_transfer_params) {
  if (kv_transfer_params == nullptr) return serialize(body);
  const Edit edit{"kv_transfer_params", kv_transfer_params};
  return serialize_with(body.json, std::span<const Edit>(&edit, 1));
}

BodyResult<std::string> sglang_bootstrap_body(const ParsedBody& body, std::string_view host,
                                              int port, std::span<const std::uint64_t> rooms) {
  const BodyFeatures& f = body.features;
  const std::size_t items = f.batch_input ? f.batch_size : 1;
  if (rooms.size() != items) {
    return make_error(500, "bootstrap rewrite got " + std::to_string(rooms.size()) + " rooms for " +
                               std::to_string(items) + " input items");
  }
  if (host.empty()) return make_error(500, "bootstrap rewrite got an empty host");
  if (port < 1 || port > 65535) {
    return make_error(500, "bootstrap rewrite got port " + std::to_string(port));
  }
  for (const std::uint64_t room : rooms) {
    if (room > kMaxBootstrapRoom) {
      return make_error(500, "bootstrap room " + std::to_string(room) + " exceeds 2^63-1");
    }
  }
  ojson host_value;
  ojson port_value;
  ojson room_value;
  if (f.batch_input) {
    host_value = ojson::array();
    port_value = ojson::array();
    room_value = ojson::array();
    for (const std::uint64_t room : rooms) {
      host_value.push_back(std::string(host));
      port_value.push_back(port);
      room_value.push_back(room);
    }
  } else {
    host_value = std::string(host);
    port_value = port;
    room_value = rooms.front();
  }
  const Edit edits[] = {
      {"bootstrap_host", &host_value},
      {"bootstrap_port", &port_value},
      {"bootstrap_room", &room_value},
  };
  return serialize_with(body.json, edits);
}

BodyResult<std::optional<ojson>> extract_kv_transfer_params(std::string_view prefill_response,
                                                            std::size_t max_depth) {
  using Result = BodyResult<std::optional<ojson>>;
  if (const auto at = find_excess_nesting(prefill_response, max_depth)) {
    return make_error(502, "prefill response nests deeper than " + std::to_string(max_depth) +
                               " levels (at byte " + std::to_string(*at) + ")");
  }
  ojson doc;
  if (const auto failure = parse_ordered(prefill_response, doc)) {
    return make_error(502, "prefill response is not valid JSON (at byte " +
                               std::to_string(failure->byte) + "): " + failure->detail);
  }
  if (!doc.is_object()) {
    return make_error(
        502, std::string("prefill response is a JSON ") + doc.type_name() + ", not an object");
  }
  const auto it = doc.find("kv_transfer_params");
  if (it == doc.end() || it->is_null()) return Result(std::optional<ojson>());
  if (!it->is_object()) {
    return make_error(502, std::string("prefill response has a kv_transfer_params that is a ") +
                               it->type_name() + ", not an object");
  }
  return Result(std::optional<ojson>(std::move(*it)));
}

}  // namespace omni
