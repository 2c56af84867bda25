#include "prompt.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <sstream>
#include <string>
#include <vector>

namespace omni::replay {
namespace {

Request request(std::uint32_t input, std::vector<Segment> segments) {
  Request r;
  r.input_tokens = input;
  r.output_tokens = 1;
  r.segments = std::move(segments);
  return r;
}

std::vector<std::uint32_t> ids(const PromptBuilder& b, const Request& r) {
  std::string json;
  b.append_ids_json(r, json);
  return nlohmann::json::parse(json).get<std::vector<std::uint32_t>>();
}

std::vector<std::string> words(const PromptBuilder& b, const Request& r) {
  std::string text;
  b.append_text(r, text);
  std::istringstream in(text);
  std::vector<std::string> out;
  for (std::string w; in >> w;) out.push_back(w);
  EXPECT_EQ(text.find("  "), std::string::npos);  // single spaces
  return out;
}

TEST(ReplayPrompt, EqualHashIdsGiveEqualPrefixes) {
  const PromptBuilder b({});
  const auto a = ids(b, request(1100, {{1, 512}, {2, 512}, {3, 512}}));
  const auto c = ids(b, request(1300, {{1, 512}, {2, 512}, {4, 512}}));
  ASSERT_EQ(a.size(), 1100u);  // truncated to input_length inside the last block
  ASSERT_EQ(c.size(), 1300u);
  EXPECT_TRUE(std::equal(a.begin(), a.begin() + 1024, c.begin()));
  EXPECT_NE(std::vector<std::uint32_t>(a.begin() + 1024, a.end()),
            std::vector<std::uint32_t>(c.begin() + 1024, c.begin() + 1100));
  // A block's tokens do not depend on where it sits in the prompt.
  const auto d = ids(b, request(512, {{2, 512}}));
  EXPECT_TRUE(std::equal(d.begin(), d.end(), a.begin() + 512));
}

TEST(ReplayPrompt, TokensStayInRangeAndDependOnSeed) {
  PromptConfig config;
  config.token_min = 1000;
  config.vocab = 1010;
  const PromptBuilder b(config);
  const auto t = ids(b, request(2000, {{9, 2000}}));
  std::vector<int> seen(10, 0);
  for (auto id : t) {
    ASSERT_GE(id, 1000u);
    ASSERT_LT(id, 1010u);
    seen[id - 1000]++;
  }
  for (int n : seen) EXPECT_GT(n, 100);  // all ten ids, roughly evenly
  PromptConfig other;
  other.seed = 2;
  EXPECT_NE(ids(PromptBuilder(other), request(50, {{9, 50}})),
            ids(PromptBuilder({}), request(50, {{9, 50}})));
  EXPECT_EQ(ids(PromptBuilder({}), request(50, {{9, 50}})),
            ids(PromptBuilder({}), request(50, {{9, 50}})));
}

TEST(ReplayPrompt, TruncatesToInputLength) {
  const PromptBuilder b({});
  EXPECT_EQ(ids(b, request(1, {{1, 512}, {2, 512}})).size(), 1u);
  EXPECT_EQ(ids(b, request(513, {{1, 512}, {2, 512}})).size(), 513u);
  EXPECT_EQ(words(b, request(513, {{1, 512}, {2, 512}})).size(), 513u);
}

TEST(ReplayPrompt, TextModeHasOneWordPerTokenAndSharedPrefixes) {
  const PromptBuilder b({});
  const auto a = words(b, request(700, {{1, 512}, {2, 512}}));
  const auto c = words(b, request(600, {{1, 512}, {3, 512}}));
  ASSERT_EQ(a.size(), 700u);
  EXPECT_TRUE(std::equal(a.begin(), a.begin() + 512, c.begin()));
  EXPECT_FALSE(std::equal(a.begin() + 512, a.begin() + 600, c.begin() + 512));
  for (const auto& w : a) {
    for (char ch : w) ASSERT_TRUE(ch >= 'a' && ch <= 'z') << w;
  }
}

}  // namespace
}  // namespace omni::replay
