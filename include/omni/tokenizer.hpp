// A Hugging Face `tokenizer.json` tokenizer (BPE family), in plain C++.
//
// Loads the files a model ships (`tokenizer.json` and `tokenizer_config.json`) and produces
// exactly the ids the reference implementation (the `tokenizers` library, as reproduced by
// `@huggingface/tokenizers`) produces: normalizer, added/special tokens, pre-tokenizer, BPE
// model, post-processor; and the decoder for the way back.
//
// Every component the file names must be supported; an unsupported one is a TokenizerError at
// load time that names it, never silently different ids.
//
// A loaded Tokenizer is immutable apart from internal caches, and every const method is safe to
// call from many threads at once (nginx thread pools tokenize in parallel).
#pragma once

#include <omni/block_hash.hpp>  // TokenId

#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace omni {

class TokenizerError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// What `tokenizer_config.json` contributes besides the chat template.
struct TokenizerConfigInfo {
  std::string bos_token;  // empty when the config has none
  std::string eos_token;
  std::string pad_token;
  std::string unk_token;
  std::string chat_template;  // the default template; empty when the model has none
  // Named templates when the config gives a list of {name, template}; "default" is also
  // copied into chat_template.
  std::vector<std::pair<std::string, std::string>> named_templates;
  std::string tokenizer_class;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Loads `<dir>/tokenizer.json` and, when present, `<dir>/tokenizer_config.json`.
  static std::unique_ptr<Tokenizer> load_dir(const std::string& dir);
  // Loads from the contents of the two files; `config_json` may be empty.
  static std::unique_ptr<Tokenizer> load_json(std::string_view tokenizer_json,
                                              std::string_view config_json);

  // Text to ids. `add_special_tokens` applies the post-processor's template (BOS etc.), like
  // `encode(text, add_special_tokens=True)` in the reference. Added tokens written in the text
  // are always recognised, as the reference does. Invalid UTF-8 is first replaced by U+FFFD,
  // one per maximal invalid subsequence (the WHATWG / Unicode "maximal subpart" rule, which is
  // what a JavaScript TextDecoder does), so the result is defined for any bytes.
  virtual std::vector<TokenId> encode(std::string_view text, bool add_special_tokens) const = 0;

  // Ids back to text (the decoder, e.g. ByteLevel). Unknown ids throw TokenizerError. Bytes
  // that do not form valid UTF-8 come out as U+FFFD, as the reference does.
  virtual std::string decode(std::span<const TokenId> ids, bool skip_special_tokens) const = 0;

  // The id of a token string (vocabulary or added token), if any.
  virtual std::optional<TokenId> token_to_id(std::string_view token) const = 0;
  virtual std::optional<std::string> id_to_token(TokenId id) const = 0;
  virtual std::size_t vocab_size() const = 0;  // including added tokens

  virtual const TokenizerConfigInfo& config() const = 0;

  // Approximate heap bytes held by this tokenizer (vocabulary, merges, caches at their bound).
  virtual std::size_t memory_bytes() const = 0;
};

}  // namespace omni
