// The simulator's tokenizer: a deterministic stand-in for a model's real tokenizer.
//
// Text splits into pieces: a run of ASCII letters or digits (at most 12 bytes) with at most
// one leading space, or any other single byte. Each piece maps to a stable id in
// [kFirstPieceId, vocab_size) by hashing. Equal text prefixes give equal token prefixes, which
// is all prefix caching needs; the ids mean nothing to a real model. Prompts given as token ids
// are used exactly as given.
//
// Chat requests are rendered with a DeepSeek-V3-style template whose role markers are single
// special tokens.
#pragma once

#include <omni/block_hash.hpp>

#include <nlohmann/json_fwd.hpp>

#include <string>
#include <string_view>
#include <vector>

namespace omni::sim {

class SimTokenizer {
 public:
  static constexpr TokenId kBos = 0;
  static constexpr TokenId kEos = 1;
  static constexpr TokenId kUser = 2;
  static constexpr TokenId kAssistant = 3;
  static constexpr TokenId kSystemEnd = 4;
  static constexpr TokenId kToolOutput = 5;
  static constexpr TokenId kFirstPieceId = 256;
  static constexpr TokenId kVocabSize = 129280;  // DeepSeek-V3's vocabulary size

  std::vector<TokenId> encode(std::string_view text) const;
  void encode_append(std::string_view text, std::vector<TokenId>& out) const;
  // Renders an OpenAI `messages` array and tokenizes it. Throws std::invalid_argument with a
  // user-facing message on a malformed message.
  std::vector<TokenId> encode_chat(const nlohmann::json& messages,
                                   bool add_generation_prompt) const;

  // Output vocabulary: the simulator generates words from a fixed lexicon.
  static std::size_t lexicon_size() noexcept;
  static TokenId lexicon_token(std::size_t i) noexcept;
  // Text of a token the simulator generated (a lexicon word); "" for others.
  static std::string_view decode(TokenId id) noexcept;
  static TokenId piece_id(std::string_view piece) noexcept;
};

}  // namespace omni::sim
