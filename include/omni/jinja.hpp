// A renderer for the subset of Jinja2 that model chat templates use.
//
// Parse once (Template::parse), render many times from any number of threads. The output
// matches the reference renderer `@huggingface/jinja` byte for byte on the templates models
// ship (DeepSeek-V3, Qwen3, Llama-3.x and the like). Anything the renderer does not support
// (an unknown statement, filter, test, global function or method) is a TemplateError from
// parse(), naming the construct and its line, never a silent difference at render time.
#pragma once

#include <nlohmann/json.hpp>

#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>

namespace omni::jinja {

// Syntax errors and unsupported constructs, at parse time.
class TemplateError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Errors while rendering: raise_exception() from the template (the message is the template's
// own, meant for the user), type errors, undefined calls.
class RenderError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct RenderOptions {
  // strftime_now(fmt) formats this time (seconds since the epoch, UTC); 0 means "now".
  // Tests inject a fixed time.
  long long now_epoch_seconds = 0;
};

class Template {
 public:
  // Parses with the settings the reference uses for chat templates (trim_blocks and
  // lstrip_blocks as @huggingface/jinja applies them).
  static Template parse(std::string_view source);

  // Renders with `context` (a JSON object) as the global variables. JSON null is Jinja's none;
  // names absent from the context are undefined.
  std::string render(const nlohmann::json& context, const RenderOptions& options = {}) const;
  // The same from an insertion-ordered document. This is the one chat templates use: object
  // keys keep the order the client sent them in (as JavaScript objects and Python dicts do),
  // which `tojson`, `items()` and loops over mappings show. (Added by the lead engineer while
  // the renderer was being written: implement it; the plain-json overload may forward to it.)
  std::string render(const nlohmann::ordered_json& context, const RenderOptions& options = {}) const;

  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;
  ~Template();

  struct Impl;

 private:
  explicit Template(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace omni::jinja
