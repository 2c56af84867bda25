// Turns a request's segments into the prompt that is sent: token ids (the default) or text.
//
// Token p of segment `id` is mix3(seed, id, p) mapped into [token_min, vocab), so equal segment
// ids give equal tokens wherever they occur, and the prompt is its segments' tokens cut to
// input_tokens. In text mode each such token becomes one word of a fixed lexicon of short,
// common English words (one token each in the usual BPE vocabularies, with the leading space),
// joined by spaces: equal segments give equal text, hence equal token prefixes at the engine,
// and the prompt is about input_tokens tokens long (exact with omni-sim's stand-in tokenizer).
#pragma once

#include "random.hpp"
#include "workload.hpp"

#include <cstdint>
#include <string>
#include <string_view>

namespace omni::replay {

struct PromptConfig {
  std::uint64_t seed = 1;
  std::uint32_t token_min = 1000;  // ids below it include the special tokens
  std::uint32_t vocab = 129280;    // DeepSeek-V3's vocabulary, omni-sim's default
};

class PromptBuilder {
 public:
  explicit PromptBuilder(const PromptConfig& config) : config_(config) {}

  std::uint32_t token(std::uint64_t segment, std::uint32_t position) const noexcept {
    return config_.token_min + static_cast<std::uint32_t>(hash(segment, position) %
                                                          (config_.vocab - config_.token_min));
  }

  // Calls fn(segment, position) for each of the request's input_tokens prompt positions.
  template <typename F>
  void for_each_position(const Request& r, F&& fn) const {
    std::uint64_t left = r.input_tokens;
    for (const Segment& s : r.segments) {
      for (std::uint32_t p = 0; p < s.length && left > 0; ++p, --left) fn(s.id, p);
      if (left == 0) break;
    }
  }

  // Appends the prompt as a JSON array of token ids.
  void append_ids_json(const Request& r, std::string& out) const;
  // Appends the prompt as words separated by single spaces (plain ASCII letters: no JSON
  // escaping is needed).
  void append_text(const Request& r, std::string& out) const;

 private:
  static std::string_view word(std::uint64_t hash) noexcept;

  std::uint64_t hash(std::uint64_t segment, std::uint32_t position) const noexcept {
    return SplitMix64::mix3(config_.seed, segment, position);
  }

  PromptConfig config_;
};

}  // namespace omni::replay
