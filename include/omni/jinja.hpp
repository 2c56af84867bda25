// A renderer for the subset of Jinja2 that model chat templates use.
//
// Parse once (Template::parse), render many times from any number of threads. The output
// matches the reference renderer `@huggingface/jinja` (0.5.11) byte for byte on the templates
// models ship (DeepSeek-V3, Qwen3, Llama-3.x and the like). Anything the renderer does not
// support (an unknown statement, filter, test, global function or method) is a TemplateError
// from parse(), naming the construct and its line, never a silent difference at render time.
//
// Semantics are the reference's, not Python Jinja2's, where the two differ. The ones that
// matter to template authors:
//  - Templates are preprocessed as the reference does: one trailing newline is dropped,
//    lstrip_blocks and trim_blocks are on, `{%-`, `-%}`, `{{-`, `-}}`, `{#-`, `-#}` strip
//    whitespace, `{% generation %}` / `{% endgeneration %}` tags are removed.
//  - true/false print as "true"/"false"; none and undefined print nothing; a float with an
//    integral value prints with ".0" (1.0), but JSON numbers that are integral are integers.
//  - `+` concatenates when either side is a string; `+`, `~` and most operators throw on
//    none/undefined operands; `<`, `>` compare numbers only; `==` is JavaScript's loose
//    equality of the two values.
//  - String methods strip()/lstrip()/rstrip() ignore their argument and strip whitespace;
//    title()/capitalize() do not lowercase the rest; length and indexing count UTF-16 code
//    units, slicing counts code points (as the reference, which runs on JavaScript strings).
//  - tojson: separators ", " and ": " (with indent=N: "," and ": "), keys in insertion
//    order, non-ASCII characters written as is (ensure_ascii=true escapes them).
//  - break/continue discard the output of the iteration they end; a loop whose iterations
//    all ended in continue (or whose first ended in break) renders its else block.
//  - strftime_now(fmt) knows %Y %m %d %b %B %H %M %% (English month names) and formats in
//    UTC; other directives are copied as is.
//
// Where the reference throws at render time, render() throws RenderError. Where the
// reference would produce JavaScript artefacts (printing a macro prints its JavaScript
// source, a raw `[] | first` result, keyword arguments passed to functions that take none),
// render() throws RenderError instead.
//
// Bounds (a hostile template or input cannot hang the caller or exhaust its stack):
//  - template nesting (parentheses, blocks, expressions) deeper than 128 levels: TemplateError;
//  - render recursion (nested evaluation including macro calls) deeper than 500: RenderError;
//  - nesting of values (input JSON, tojson, printing containers) deeper than 256: RenderError;
//  - output, and any single string built while rendering, larger than 64 MiB: RenderError;
//  - more than 2,000,000 loop iterations and macro calls in one render: RenderError;
//  - range() producing more than 1,000,000 items: RenderError;
//  - more than 1 GiB of strings and array items built in one render: RenderError.
#pragma once

#include <nlohmann/json.hpp>

#include <cstddef>
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

// Limits enforced while parsing and rendering (see the list above).
struct Limits {
  static constexpr int kMaxParseDepth = 128;
  static constexpr int kMaxRenderDepth = 500;
  static constexpr int kMaxValueDepth = 256;
  static constexpr std::size_t kMaxOutputBytes = std::size_t{64} << 20;
  static constexpr unsigned long long kMaxIterations = 2'000'000;
  static constexpr std::size_t kMaxRangeItems = 1'000'000;
  static constexpr unsigned long long kMaxBuiltBytes = 1ULL << 30;
};

class Template {
 public:
  // Parses with the settings the reference uses for chat templates (trim_blocks and
  // lstrip_blocks as @huggingface/jinja applies them).
  static Template parse(std::string_view source);

  // Renders with `context` (a JSON object) as the global variables. JSON null is Jinja's none;
  // names absent from the context are undefined.
  //
  // Key order: the reference keeps a JSON object's keys in the order of the request
  // (integer-like keys first, as JavaScript objects do), which `tojson`, `items()` and loops
  // over a mapping show; chat templates print tool definitions with `tojson`. The
  // nlohmann::ordered_json overload keeps that order exactly. nlohmann::json stores keys sorted,
  // so with it objects are seen in sorted key order (integer-like keys still first). Pass a
  // typed value (a braced initializer list would be ambiguous between the two).
  std::string render(const nlohmann::ordered_json& context,
                     const RenderOptions& options = {}) const;
  std::string render(const nlohmann::json& context, const RenderOptions& options = {}) const;

  Template(Template&&) noexcept;
  Template& operator=(Template&&) noexcept;
  ~Template();

  struct Impl;

 private:
  explicit Template(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace omni::jinja
