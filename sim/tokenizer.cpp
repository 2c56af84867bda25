#include "tokenizer.hpp"

#include <nlohmann/json.hpp>

#include <array>
#include <stdexcept>
#include <unordered_map>

namespace omni::sim {
namespace {

constexpr std::array<std::string_view, 48> kLexicon = {
    " the",    " a",      " model",  " token",   " cache",  " prefix", " decode", " prefill",
    " of",     " and",    " to",     " in",      " is",     " that",   " for",    " on",
    " with",   " as",     " it",     " by",      " this",   " from",   " at",     " an",
    " be",     " are",    " was",    " batch",   " step",   " engine", " route",  " block",
    " hash",   " event",  " queue",  " latency", " time",   " first",  " next",   " request",
    " answer", " simple", " fast",   " data",    " value",  " world",  ",",       "."};

bool is_word_byte(unsigned char c) noexcept {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

struct LexiconIndex {
  std::array<TokenId, kLexicon.size()> ids{};
  std::unordered_map<TokenId, std::string_view> text;
  LexiconIndex() {
    for (std::size_t i = 0; i < kLexicon.size(); ++i) {
      ids[i] = SimTokenizer::piece_id(kLexicon[i]);
      text.emplace(ids[i], kLexicon[i]);
    }
  }
};

const LexiconIndex& lexicon() {
  static const LexiconIndex index;
  return index;
}

}  // namespace

TokenId SimTokenizer::piece_id(std::string_view piece) noexcept {
  // FNV-1a, folded into the piece range.
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (unsigned char c : piece) {
    h ^= c;
    h *= 0x100000001b3ULL;
  }
  return kFirstPieceId + static_cast<TokenId>(h % (kVocabSize - kFirstPieceId));
}

void SimTokenizer::encode_append(std::string_view text, std::vector<TokenId>& out) const {
  std::size_t i = 0;
  const std::size_t n = text.size();
  while (i < n) {
    std::size_t start = i;
    if (text[i] == ' ' && i + 1 < n && is_word_byte(static_cast<unsigned char>(text[i + 1]))) {
      ++i;  // a single leading space joins the word
    }
    if (is_word_byte(static_cast<unsigned char>(text[i]))) {
      std::size_t end = i;
      while (end < n && end - start < 12 && is_word_byte(static_cast<unsigned char>(text[end]))) {
        ++end;
      }
      out.push_back(piece_id(text.substr(start, end - start)));
      i = end;
    } else {
      out.push_back(piece_id(text.substr(i, 1)));
      ++i;
    }
  }
}

std::vector<TokenId> SimTokenizer::encode(std::string_view text) const {
  std::vector<TokenId> out;
  out.reserve(text.size() / 4 + 1);
  encode_append(text, out);
  return out;
}

namespace {

// The text of a message's content: a string, null, or an array of {"type":"text"} parts.
std::string content_text(const nlohmann::json& content) {
  if (content.is_null()) return {};
  if (content.is_string()) return content.get<std::string>();
  if (content.is_array()) {
    std::string text;
    for (const auto& part : content) {
      // (Not part.value("type", ""): it throws json::type_error on a non-string type.)
      if (!part.is_object() || !part.contains("type") || part["type"] != "text" ||
          !part.contains("text") || !part["text"].is_string()) {
        throw std::invalid_argument(
            "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported");
      }
      text += part["text"].get<std::string>();
    }
    return text;
  }
  throw std::invalid_argument("message content must be a string or an array of parts");
}

}  // namespace

std::vector<TokenId> SimTokenizer::encode_chat(const nlohmann::json& messages,
                                               bool add_generation_prompt) const {
  if (!messages.is_array() || messages.empty()) {
    throw std::invalid_argument("messages must be a non-empty array");
  }
  std::vector<TokenId> out{kBos};
  for (const auto& m : messages) {
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) {
      throw std::invalid_argument("each message must be an object with a string role");
    }
    const std::string role = m["role"].get<std::string>();
    const std::string text = content_text(m.contains("content") ? m["content"] : nullptr);
    if (role == "system" || role == "developer") {
      encode_append(text, out);
      out.push_back(kSystemEnd);
    } else if (role == "user") {
      out.push_back(kUser);
      encode_append(text, out);
    } else if (role == "assistant") {
      out.push_back(kAssistant);
      encode_append(text, out);
      out.push_back(kEos);
    } else if (role == "tool") {
      out.push_back(kToolOutput);
      encode_append(text, out);
    } else {
      throw std::invalid_argument("unknown message role \"" + role + "\"");
    }
  }
  if (add_generation_prompt) out.push_back(kAssistant);
  return out;
}

std::size_t SimTokenizer::lexicon_size() noexcept { return kLexicon.size(); }

TokenId SimTokenizer::lexicon_token(std::size_t i) noexcept {
  return lexicon().ids[i % kLexicon.size()];
}

std::string_view SimTokenizer::decode(TokenId id) noexcept {
  const auto& text = lexicon().text;
  auto it = text.find(id);
  return it == text.end() ? std::string_view{} : it->second;
}

}  // namespace omni::sim
