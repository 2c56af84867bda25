#include "tokenizer.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace omni::sim {
namespace {

using nlohmann::json;
using T = SimTokenizer;

std::vector<TokenId> pieces(std::initializer_list<std::string_view> ps) {
  std::vector<TokenId> out;
  for (auto p : ps) out.push_back(T::piece_id(p));
  return out;
}

bool starts_with(const std::vector<TokenId>& v, const std::vector<TokenId>& prefix) {
  return prefix.size() <= v.size() && std::equal(prefix.begin(), prefix.end(), v.begin());
}

TEST(SimTokenizer, SplitsTextIntoPieces) {
  struct Case {
    std::string text;
    std::vector<TokenId> expected;
  };
  const std::vector<Case> cases = {
      {"", {}},
      {"Hello", pieces({"Hello"})},
      {"Hello world", pieces({"Hello", " world"})},
      {"Hello, world!", pieces({"Hello", ",", " world", "!"})},
      {" leading", pieces({" leading"})},
      {"a  b", pieces({"a", " ", " b"})},
      {"trailing ", pieces({"trailing", " "})},
      {"x1 2y", pieces({"x1", " 2y"})},
      {"abcdefghijklmnopq", pieces({"abcdefghijkl", "mnopq"})},  // words split at 12 bytes
      {"a\nb", pieces({"a", "\n", "b"})},
      {"\xc3\xa9", pieces({"\xc3", "\xa9"})},  // non-ASCII: one piece per byte
  };
  const T tok;
  for (const auto& c : cases) EXPECT_EQ(tok.encode(c.text), c.expected) << '"' << c.text << '"';
}

TEST(SimTokenizer, IsDeterministic) {
  const std::string text = "The quick brown fox, 42 times: jumps over the lazy dog.";
  const auto a = T{}.encode(text);
  const auto b = T{}.encode(text);
  EXPECT_EQ(a, b);
  EXPECT_FALSE(a.empty());
  // Stable across calls of the static mapping too.
  EXPECT_EQ(T::piece_id(" the"), T::piece_id(" the"));
  EXPECT_NE(T::piece_id(" the"), T::piece_id("the"));
}

TEST(SimTokenizer, IdsAreInThePieceRange) {
  std::string all_bytes;
  for (int c = 1; c < 256; ++c) all_bytes.push_back(static_cast<char>(c));
  const T tok;
  for (const std::string& text :
       {all_bytes, std::string("Mixed CASE words and 1234567890123456 digits"),
        std::string(1000, 'z')}) {
    const auto ids = tok.encode(text);
    ASSERT_FALSE(ids.empty());
    for (TokenId id : ids) {
      EXPECT_GE(id, T::kFirstPieceId);
      EXPECT_LT(id, T::kVocabSize);
    }
  }
}

TEST(SimTokenizer, EncodeAppendAppends) {
  const T tok;
  std::vector<TokenId> out = {7};
  tok.encode_append("Hello world", out);
  EXPECT_EQ(out, (std::vector<TokenId>{7, T::piece_id("Hello"), T::piece_id(" world")}));
}

TEST(SimTokenizer, PrefixPropertyAtPieceBoundaries) {
  // When `a` ends where a piece ends, encode(a + b) starts with encode(a).
  struct Case {
    std::string a, b;
  };
  const std::vector<Case> cases = {
      {"Hello world", " again"},
      {"Hello", ", world"},
      {"x", "!"},
      {"The cache", " hit."},
      {"", "abc"},
      {"line\n", "next line"},
      {"a, b", " c"},
      {"123", " 456"},
  };
  const T tok;
  for (const auto& c : cases) {
    const auto ab = tok.encode(c.a + c.b);
    EXPECT_TRUE(starts_with(ab, tok.encode(c.a))) << '"' << c.a << "\" + \"" << c.b << '"';
    // And the rest is exactly encode(b).
    auto joined = tok.encode(c.a);
    tok.encode_append(c.b, joined);
    EXPECT_EQ(ab, joined) << '"' << c.a << "\" + \"" << c.b << '"';
  }
  // Splitting inside a word, or after a space that joins the next word, breaks it.
  EXPECT_FALSE(starts_with(tok.encode("Hello"), tok.encode("Hel")));
  EXPECT_FALSE(starts_with(tok.encode("Hello world"), tok.encode("Hello ")));
}

json conversation() {
  return json::array({
      {{"role", "system"}, {"content", "You are terse."}},
      {{"role", "user"}, {"content", "What is a prefix cache?"}},
      {{"role", "assistant"}, {"content", "Reused KV."}},
      {{"role", "user"}, {"content", "And a block?"}},
  });
}

TEST(SimTokenizer, ChatTemplateLayout) {
  const T tok;
  const json msgs = json::array({
      {{"role", "system"}, {"content", "Sys"}},
      {{"role", "user"}, {"content", "Hi"}},
      {{"role", "assistant"}, {"content", "Yo"}},
      {{"role", "tool"}, {"content", "42"}},
  });
  const std::vector<TokenId> expected = {
      T::kBos,       T::piece_id("Sys"), T::kSystemEnd, T::kUser,       T::piece_id("Hi"),
      T::kAssistant, T::piece_id("Yo"),  T::kEos,       T::kToolOutput, T::piece_id("42")};
  EXPECT_EQ(tok.encode_chat(msgs, false), expected);
  auto with_prompt = expected;
  with_prompt.push_back(T::kAssistant);
  EXPECT_EQ(tok.encode_chat(msgs, true), with_prompt);
  // "developer" is a system role; null content is empty text.
  const json dev = json::array(
      {{{"role", "developer"}, {"content", "D"}}, {{"role", "user"}, {"content", nullptr}}});
  EXPECT_EQ(tok.encode_chat(dev, false),
            (std::vector<TokenId>{T::kBos, T::piece_id("D"), T::kSystemEnd, T::kUser}));
  // Text parts are concatenated.
  const json parts =
      json::array({{{"role", "user"},
                    {"content", json::array({{{"type", "text"}, {"text", "Hello"}},
                                             {{"type", "text"}, {"text", " world"}}})}}});
  const json plain = json::array({{{"role", "user"}, {"content", "Hello world"}}});
  EXPECT_EQ(tok.encode_chat(parts, true), tok.encode_chat(plain, true));
}

TEST(SimTokenizer, ChatPrefixesAcrossTurns) {
  const T tok;
  const json conv = conversation();
  json with_answer = conv;
  with_answer.push_back({{"role", "assistant"}, {"content", "A unit of KV."}});
  json with_user = conv;
  with_user.push_back({{"role", "user"}, {"content", "Thanks"}});

  // Without the generation prompt, a conversation prefixes any continuation of it.
  for (bool gen : {false, true}) {
    EXPECT_TRUE(starts_with(tok.encode_chat(with_answer, gen), tok.encode_chat(conv, false)));
    EXPECT_TRUE(starts_with(tok.encode_chat(with_user, gen), tok.encode_chat(conv, false)));
  }
  // With it, the prompt the model saw prefixes the conversation once its answer is appended
  // (the next turn's prompt reuses the whole cache)...
  EXPECT_TRUE(starts_with(tok.encode_chat(with_answer, true), tok.encode_chat(conv, true)));
  // ...but not a conversation continued by another user turn.
  EXPECT_FALSE(starts_with(tok.encode_chat(with_user, true), tok.encode_chat(conv, true)));
}

TEST(SimTokenizer, ChatRejectsMalformedMessages) {
  const T tok;
  const std::vector<std::pair<const char*, json>> cases = {
      {"not an array", json::object()},
      {"empty", json::array()},
      {"message not an object", json::array({"hi"})},
      {"no role", json::array({{{"content", "hi"}}})},
      {"role not a string", json::array({{{"role", 1}, {"content", "hi"}}})},
      {"unknown role", json::array({{{"role", "wizard"}, {"content", "hi"}}})},
      {"image part",
       json::array(
           {{{"role", "user"},
             {"content", json::array({{{"type", "image_url"}, {"image_url", {{"url", "x"}}}}})}}})},
      {"part type not a string",
       json::array({{{"role", "user"}, {"content", json::array({{{"type", 5}, {"text", "x"}}})}}})},
      {"part not an object", json::array({{{"role", "user"}, {"content", json::array({"x"})}}})},
      {"text part without text",
       json::array({{{"role", "user"}, {"content", json::array({{{"type", "text"}}})}}})},
      {"numeric content", json::array({{{"role", "user"}, {"content", 5}}})},
  };
  for (const auto& [name, msgs] : cases) {
    EXPECT_THROW((void)tok.encode_chat(msgs, true), std::invalid_argument) << name;
  }
  try {
    (void)tok.encode_chat(json::array({{{"role", "wizard"}, {"content", "hi"}}}), true);
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("wizard"), std::string::npos) << e.what();
  }
}

TEST(SimTokenizer, LexiconTokensDecodeToTheirWords) {
  ASSERT_GT(T::lexicon_size(), 0u);
  std::set<TokenId> ids;
  const T tok;
  for (std::size_t i = 0; i < T::lexicon_size(); ++i) {
    const TokenId id = T::lexicon_token(i);
    ids.insert(id);
    const std::string_view text = T::decode(id);
    EXPECT_FALSE(text.empty()) << i;
    // A generated word re-encodes to its own token: streamed text round-trips.
    EXPECT_EQ(tok.encode(text), std::vector<TokenId>{id}) << text;
  }
  EXPECT_EQ(ids.size(), T::lexicon_size()) << "lexicon ids collide";
  EXPECT_EQ(T::lexicon_token(T::lexicon_size()), T::lexicon_token(0)) << "index wraps";
}

TEST(SimTokenizer, NonLexiconIdsDecodeToNothing) {
  for (TokenId id : {T::kBos, T::kEos, T::kUser, T::kAssistant, T::kFirstPieceId,
                     T::piece_id("zebra"), T::kVocabSize - 1}) {
    EXPECT_TRUE(T::decode(id).empty()) << id;
  }
}

}  // namespace
}  // namespace omni::sim
