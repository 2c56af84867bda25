#include "model_tokenizer.hpp"

#include <omni/jinja.hpp>

#include <stdexcept>

namespace omni::sim {

std::shared_ptr<const ModelTokenizer> ModelTokenizer::load(const std::string& dir) {
  std::shared_ptr<ModelTokenizer> m(new ModelTokenizer());
  m->dir_ = dir;
  try {
    m->tokenizer_ = omni::Tokenizer::load_dir(dir);
  } catch (const std::exception& e) {
    throw std::runtime_error("cannot load the tokenizer in " + dir + ": " + e.what());
  }
  if (!m->tokenizer_) throw std::runtime_error("cannot load the tokenizer in " + dir);
  m->vocab_size_ = m->tokenizer_->vocab_size();
  const std::string& source = m->tokenizer_->config().chat_template;
  if (!source.empty()) {
    // A template we cannot render fails here, at start-up, rather than every chat request.
    try {
      m->chat_ = std::make_unique<omni::ChatTemplate>(source, m->tokenizer_->config());
    } catch (const std::exception& e) {
      throw std::runtime_error("cannot use the chat template of " + dir + ": " + e.what());
    }
  }
  return m;
}

}  // namespace omni::sim
