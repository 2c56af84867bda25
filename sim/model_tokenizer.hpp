// A model's real tokenizer and chat template (`omni-sim --tokenizer DIR`), loaded once per
// process and shared by every instance, so that the engines' CPU cost of tokenizing text
// prompts is real.
//
// Everything here is immutable after load() and safe to use from many threads at once
// (omni::Tokenizer and omni::ChatTemplate promise that for their const methods).
#pragma once

#include <omni/chat_template.hpp>
#include <omni/tokenizer.hpp>

#include <memory>
#include <string>

namespace omni::sim {

class ModelTokenizer {
 public:
  // Loads DIR/tokenizer.json (and tokenizer_config.json, whose chat template, if any, is parsed
  // here). Throws std::runtime_error with a message naming DIR.
  static std::shared_ptr<const ModelTokenizer> load(const std::string& dir);

  const std::string& dir() const noexcept { return dir_; }
  const omni::Tokenizer& tokenizer() const noexcept { return *tokenizer_; }
  // The model's default chat template; null when its config has none.
  const omni::ChatTemplate* chat_template() const noexcept { return chat_.get(); }
  // Token ids given in requests must be below this (the tokenizer's vocabulary, added tokens
  // included).
  std::size_t vocab_size() const noexcept { return vocab_size_; }

 private:
  ModelTokenizer() = default;
  std::string dir_;
  std::unique_ptr<omni::Tokenizer> tokenizer_;
  std::unique_ptr<omni::ChatTemplate> chat_;
  std::size_t vocab_size_ = 0;
};

}  // namespace omni::sim
