// A renderer for the subset of Jinja2 that model chat templates use.
//
// Parse once (Template::parse), render many times from any number of threads. The output
// matches the reference renderer `@huggingface/jinja` (0.5.11) byte for byte on the templates
// models ship (DeepSeek-V3, Qwen3, Llama-3.x and the like). Anything the renderer does not
// support (an unknown statement, filter, test, global function or method) is a TemplateError
// from parse(), naming the construct and its line, never a silent difference at render time.
//
// Supported (everything the reference supports):
//  - statements: if/elif/else, for (with `if` filter, else, tuple unpacking, loop.index,
//    index0, revindex, revindex0, first, last, length, previtem, nextitem), break, continue,
//    set (name, tuple, namespace attribute, {% set x %}...{% endset %}), macro (defaults,
//    kwargs, varargs, recursion), call blocks with caller(), filter blocks, comments;
//  - expressions: literals (numbers, strings with escapes, lists, tuples, dicts), attribute
//    and subscript access, slices with any step, calls with keyword, *args and **kwargs,
//    + - * / // % ** ~, comparisons, in / not in, and / or / not, `a if c else b`, `is` tests;
//  - filters: safe tojson(indent, ensure_ascii, sort_keys, separators) list first last length
//    reverse sort(reverse, case_sensitive, attribute) join string unique upper lower title
//    capitalize trim indent(width, first, blank) int float abs items bool default(value,
//    boolean) selectattr rejectattr map(attribute, default) replace get keys values dictsort;
//  - tests: defined undefined none string number integer boolean true false iterable mapping
//    sequence callable odd even lower upper eq equalto (with selectattr/rejectattr);
//  - methods: strings upper lower strip lstrip rstrip title capitalize startswith endswith
//    split replace (and .length); mappings get items keys values dictsort;
//  - globals: namespace(), range(), raise_exception(), strftime_now(), true/false/none (also
//    True/False/None).
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
// Where the reference throws at render time, render() throws RenderError, with the reference's
// message for the errors templates meet (raise_exception's message exactly; "Cannot perform
// operation on null values" and the like). Known differences, none of which the official
// DeepSeek-V3, Qwen3 and Llama-3.1 templates can reach:
//  - unknown filters, tests, functions and methods are TemplateErrors at parse time, even in
//    a branch that never runs (the reference fails only when it runs them);
//  - printing a function or macro (`{{ m }}`, `{{ d.items }}`): the reference prints its
//    JavaScript source, we throw RenderError;
//  - JavaScript artefacts we refuse instead of imitating: keyword arguments to range(),
//    strftime_now() or get() (the reference passes a Map object), non-numeric range()
//    arguments, `[] | first` / `[] | last` (JavaScript's undefined itself) passed to a filter
//    or a built-in function (anywhere else it behaves as in the reference);
//  - a JavaScript lone surrogate (indexing into half of a character outside the BMP) comes out
//    as its 3-byte WTF-8 form, as UTF-8 cannot carry it;
//  - tojson(sort_keys=true) orders ASCII keys as the reference's localeCompare does (ICU root
//    collation); keys with other characters sort after them by code point;
//  - error messages for the reference's own TypeErrors are worded differently;
//  - the bounds below (the reference has none, or overflows its stack).
//
// Bounds (a hostile template or input cannot hang the caller or exhaust its stack):
//  - template nesting (parentheses, blocks, expressions) deeper than 128 levels: TemplateError;
//  - render recursion (nested evaluation including macro calls) deeper than 500: RenderError;
//  - nesting of values (input JSON, tojson, printing containers) deeper than 256: RenderError;
//  - output, and any single string built while rendering, larger than 64 MiB: RenderError;
//  - more than 2,000,000 loop iterations and macro calls in one render: RenderError;
//  - range() producing more than 1,000,000 items: RenderError;
//  - more than 512 MiB of strings and array items built in one render: RenderError.
// At these bounds rendering needs less than 384 KiB of stack (optimized build).
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
  static constexpr unsigned long long kMaxBuiltBytes = 512ULL << 20;
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
