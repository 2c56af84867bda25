// Token forwarding: the bodies the engines get instead of the client's, and chat answers made
// from completion answers. A byte-per-token fake tokenizer keeps the expected ids readable; the
// real tokenizers are covered by the parity tests.
#include <omni/token_forwarding.hpp>

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

namespace omni {
namespace {

using ojson = nlohmann::ordered_json;

// Every byte is a token (id = byte + 1000); add_special_tokens prepends id 1.
class ByteTokenizer : public Tokenizer {
 public:
  ByteTokenizer() {
    info_.bos_token = "<s>";
    info_.eos_token = "</s>";
  }
  std::vector<TokenId> encode(std::string_view text, bool add_special) const override {
    std::vector<TokenId> out;
    if (add_special) out.push_back(1);
    for (unsigned char c : text) out.push_back(1000 + c);
    return out;
  }
  std::string decode(std::span<const TokenId> ids, bool) const override {
    std::string s;
    for (TokenId id : ids) {
      if (id >= 1000) s.push_back(static_cast<char>(id - 1000));
    }
    return s;
  }
  std::optional<TokenId> token_to_id(std::string_view) const override { return std::nullopt; }
  std::optional<std::string> id_to_token(TokenId) const override { return std::nullopt; }
  std::size_t vocab_size() const override { return 2000; }
  const TokenizerConfigInfo& config() const override { return info_; }
  std::size_t memory_bytes() const override { return 0; }

 private:
  TokenizerConfigInfo info_;
};

std::vector<TokenId> bytes(std::string_view s, bool special = false) {
  return ByteTokenizer().encode(s, special);
}

ParsedBody parse(Api api, const std::string& body) {
  auto p = parse_request_body(api, body);
  EXPECT_TRUE(p.ok()) << (p.ok() ? "" : p.error().message);
  return std::move(*p);
}

// A ChatML-like template: enough to see roles, the generation prompt and kwargs.
constexpr const char* kTemplate =
    "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}</>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% if think is defined and not think %}"
    "[nothink]{% endif %}{% endif %}";

class TokenForwardingTest : public ::testing::Test {
 protected:
  ByteTokenizer tok;
  ChatTemplate chat{kTemplate, tok.config()};
  ForwardingOptions options;

  TokenizedRequest run(Api api, const std::string& body, const ChatTemplate* tpl) {
    auto r = tokenize_request(parse(api, body), tok, tpl, options);
    EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.error().message);
    return std::move(*r);
  }
};

TEST_F(TokenForwardingTest, CompletionPromptBecomesIdsInPlace) {
  auto t = run(Api::kCompletions, R"({"model":"m","prompt":"hi","max_tokens":5,"stream":true})",
               &chat);
  EXPECT_EQ(t.reason, ForwardReason::kForwarded);
  ASSERT_TRUE(t.upstream);
  EXPECT_EQ(t.upstream_api, Api::kCompletions);
  EXPECT_FALSE(t.chat_to_completion);
  // vLLM adds special tokens to completion prompts by default.
  EXPECT_EQ(t.ids.at(0), bytes("hi", true));
  EXPECT_EQ(t.prompt_tokens, 3u);
  EXPECT_EQ(t.upstream_text, R"({"model":"m","prompt":[1,1104,1105],"max_tokens":5,"stream":true})");
  EXPECT_TRUE(t.upstream->features.has_token_ids);
  EXPECT_TRUE(t.upstream->features.stream);
}

TEST_F(TokenForwardingTest, CompletionHonoursAddSpecialTokensAndDropsIt) {
  auto t = run(Api::kCompletions, R"({"prompt":"a","add_special_tokens":false})", &chat);
  EXPECT_EQ(t.upstream_text, R"({"prompt":[1097]})");
}

TEST_F(TokenForwardingTest, CompletionListOfPromptsStaysAList) {
  auto t = run(Api::kCompletions, R"({"prompt":["a","bc"]})", &chat);
  ASSERT_EQ(t.ids.size(), 2u);
  EXPECT_EQ(t.ids[1], bytes("bc", true));
  EXPECT_EQ(t.upstream_text, R"({"prompt":[[1,1097],[1,1098,1099]]})");
  EXPECT_TRUE(t.upstream->features.batch_input);
  EXPECT_EQ(t.upstream->features.batch_size, 2u);
}

TEST_F(TokenForwardingTest, ClientIdsAreForwardedUnchanged) {
  auto t = run(Api::kCompletions, R"({"prompt":[5,6,7]})", &chat);
  EXPECT_EQ(t.reason, ForwardReason::kClientIds);
  EXPECT_FALSE(t.upstream);
  EXPECT_EQ(t.prompt_tokens, 3u);
  auto g = run(Api::kGenerate, R"({"input_ids":[[1,2],[3]]})", &chat);
  EXPECT_EQ(g.reason, ForwardReason::kClientIds);
  EXPECT_EQ(g.prompt_tokens, 3u);
}

TEST_F(TokenForwardingTest, GenerateTextBecomesInputIdsAtItsPosition) {
  auto t = run(Api::kGenerate, R"({"rid":"x","text":"ab","sampling_params":{"max_new_tokens":3}})",
               &chat);
  EXPECT_EQ(t.reason, ForwardReason::kForwarded);
  EXPECT_EQ(t.upstream_api, Api::kGenerate);
  EXPECT_EQ(t.upstream_text,
            R"({"rid":"x","input_ids":[1,1097,1098],"sampling_params":{"max_new_tokens":3}})");
}

TEST_F(TokenForwardingTest, ChatBecomesACompletionWithTheRenderedIds) {
  auto t = run(Api::kChatCompletions,
               R"({"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,)"
               R"("stream_options":{"include_usage":true},"max_completion_tokens":9,)"
               R"("max_tokens":4,"temperature":0.5,"tool_choice":"none","top_k":3})",
               &chat);
  EXPECT_EQ(t.reason, ForwardReason::kForwarded);
  EXPECT_TRUE(t.chat_to_completion);
  EXPECT_EQ(t.upstream_api, Api::kCompletions);
  // The template writes the special tokens; the prompt is encoded without adding any.
  EXPECT_EQ(t.ids.at(0), bytes("<s><user>hi</><assistant>"));
  const ojson up = ojson::parse(t.upstream_text);
  EXPECT_EQ(up["prompt"].size(), t.ids[0].size());
  EXPECT_EQ(up["max_tokens"], 9);  // max_completion_tokens wins
  EXPECT_FALSE(up.contains("max_completion_tokens"));
  EXPECT_FALSE(up.contains("messages"));
  EXPECT_FALSE(up.contains("tool_choice"));
  EXPECT_EQ(up["top_k"], 3);
  EXPECT_EQ(up["stream_options"]["include_usage"], true);
  // Member order is kept: prompt where messages was, max_tokens at the first max key.
  std::vector<std::string> keys;
  for (const auto& [k, v] : up.items()) keys.push_back(k);
  EXPECT_EQ(keys, (std::vector<std::string>{"model", "prompt", "stream", "stream_options",
                                            "max_tokens", "temperature", "top_k"}));
}

TEST_F(TokenForwardingTest, ChatTemplateKwargsAndGenerationPromptReachTheTemplate) {
  auto t = run(Api::kChatCompletions,
               R"({"messages":[{"role":"user","content":"x"}],"chat_template_kwargs":{"think":false}})",
               &chat);
  EXPECT_EQ(t.ids.at(0), bytes("<s><user>x</><assistant>[nothink]"));
  auto u = run(Api::kChatCompletions,
               R"({"messages":[{"role":"user","content":"x"}],"add_generation_prompt":false})",
               &chat);
  EXPECT_EQ(u.ids.at(0), bytes("<s><user>x</>"));
}

TEST_F(TokenForwardingTest, TextPartsAreJoinedWithNewlines) {
  auto t = run(Api::kChatCompletions,
               R"({"messages":[{"role":"user","content":[{"type":"text","text":"a"},)"
               R"({"type":"text","text":"b"}]}]})",
               &chat);
  EXPECT_EQ(t.ids.at(0), bytes("<s><user>a\nb</><assistant>"));
}

TEST_F(TokenForwardingTest, ChatsWhoseMeaningCannotBeKeptPassThroughAsText) {
  struct Case {
    const char* extra;
    ForwardReason reason;
    bool tokenized;
  };
  const Case cases[] = {
      {R"("tools":[{"type":"function","function":{"name":"f"}}])", ForwardReason::kTools, true},
      {R"("logprobs":true)", ForwardReason::kLogprobs, true},
      {R"("top_logprobs":2)", ForwardReason::kLogprobs, true},
      {R"("echo":true)", ForwardReason::kEcho, true},
      {R"("reasoning_effort":"low")", ForwardReason::kReasoningEffort, true},
      {R"("continue_final_message":true)", ForwardReason::kContinueFinalMessage, false},
      {R"("chat_template":"{{ 1 }}")", ForwardReason::kCustomTemplate, false},
  };
  for (const Case& c : cases) {
    auto t = run(Api::kChatCompletions,
                 std::string(R"({"messages":[{"role":"user","content":"q"}],)") + c.extra + "}",
                 &chat);
    EXPECT_EQ(t.reason, c.reason) << c.extra;
    EXPECT_FALSE(t.upstream) << c.extra;
    EXPECT_FALSE(t.chat_to_completion) << c.extra;
    EXPECT_EQ(t.prompt_tokens > 0, c.tokenized) << c.extra;
  }
  auto img = run(Api::kChatCompletions,
                 R"({"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]})",
                 &chat);
  EXPECT_EQ(img.reason, ForwardReason::kNonTextContent);
  auto none = run(Api::kChatCompletions, R"({"messages":[{"role":"user","content":"q"}]})", nullptr);
  EXPECT_EQ(none.reason, ForwardReason::kNoTemplate);
  // An empty tools list is no tools.
  auto empty = run(Api::kChatCompletions,
                   R"({"messages":[{"role":"user","content":"q"}],"tools":[]})", &chat);
  EXPECT_EQ(empty.reason, ForwardReason::kForwarded);
}

TEST_F(TokenForwardingTest, ForwardingOffStillTokenizes) {
  options.forward = false;
  auto t = run(Api::kChatCompletions, R"({"messages":[{"role":"user","content":"q"}]})", &chat);
  EXPECT_EQ(t.reason, ForwardReason::kDisabled);
  EXPECT_FALSE(t.upstream);
  EXPECT_GT(t.prompt_tokens, 0u);
}

TEST_F(TokenForwardingTest, TemplateRefusalIsTheClientsError) {
  ChatTemplate strict("{% for m in messages %}{% if m.role != 'user' %}"
                      "{{ raise_exception('Only user messages, please') }}{% endif %}{% endfor %}",
                      tok.config());
  auto r = tokenize_request(
      parse(Api::kChatCompletions, R"({"messages":[{"role":"system","content":"s"}]})"), tok,
      &strict, options);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().status, 400);
  EXPECT_NE(r.error().message.find("Only user messages, please"), std::string::npos);
  EXPECT_EQ(r.error().param, "messages");
}

TEST(ChatAnswers, CompletionAnswerBecomesAChatAnswer) {
  const std::string completion =
      R"({"id":"cmpl-abc","object":"text_completion","created":5,"model":"m",)"
      R"("choices":[{"index":0,"text":"Hello","logprobs":null,"finish_reason":"stop",)"
      R"("stop_reason":null,"prompt_logprobs":null}],)"
      R"("usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2},"kv_transfer_params":null})";
  const std::string chat = chat_response_from_completion(completion, EngineFlavor::kVllm);
  EXPECT_EQ(chat,
            R"({"id":"chatcmpl-abc","object":"chat.completion","created":5,"model":"m",)"
            R"("choices":[{"index":0,"message":{"role":"assistant","content":"Hello",)"
            R"("reasoning_content":null,"tool_calls":[]},"logprobs":null,"finish_reason":"stop",)"
            R"("stop_reason":null}],)"
            R"("usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2},"kv_transfer_params":null})");
  // SGLang's chat messages carry tool_calls null.
  EXPECT_NE(chat_response_from_completion(completion, EngineFlavor::kSglang)
                .find(R"("tool_calls":null)"),
            std::string::npos);
  // Errors and anything else pass unchanged.
  const std::string error = R"({"error":{"message":"bad","code":400}})";
  EXPECT_EQ(chat_response_from_completion(error, EngineFlavor::kVllm), error);
  EXPECT_EQ(chat_response_from_completion("not json", EngineFlavor::kVllm), "not json");
}

TEST(ChatAnswers, StreamIsConvertedEventByEventWhateverTheSplits) {
  const std::string in =
      "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"m\","
      "\"choices\":[{\"index\":0,\"text\":\"He\",\"logprobs\":null,\"finish_reason\":null,"
      "\"stop_reason\":null}]}\n\n"
      "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"m\","
      "\"choices\":[{\"index\":0,\"text\":\"y \\u00e9\",\"logprobs\":null,\"finish_reason\":\"length\","
      "\"stop_reason\":null}]}\n\n"
      ": keep-alive\n\n"
      "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"created\":1,\"model\":\"m\","
      "\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"total_tokens\":4,\"completion_tokens\":2}}\n\n"
      "data: [DONE]\n\n";
  const std::string want =
      "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\","
      "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,"
      "\"finish_reason\":null,\"stop_reason\":null}]}\n\n"
      "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\","
      "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"He\"},\"logprobs\":null,\"finish_reason\":null,"
      "\"stop_reason\":null}]}\n\n"
      "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\","
      "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"y \xc3\xa9\"},\"logprobs\":null,"
      "\"finish_reason\":\"length\",\"stop_reason\":null}]}\n\n"
      ": keep-alive\n\n"
      "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\","
      "\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"total_tokens\":4,\"completion_tokens\":2}}\n\n"
      "data: [DONE]\n\n";
  for (std::size_t step : {in.size(), std::size_t{1}, std::size_t{7}, std::size_t{64}}) {
    ChatStreamConverter conv(EngineFlavor::kVllm);
    std::string out;
    for (std::size_t i = 0; i < in.size(); i += step) conv.feed(in.substr(i, step), out);
    conv.finish(out);
    EXPECT_EQ(out, want) << "split every " << step << " bytes";
    EXPECT_EQ(conv.pending(), 0u);
  }
}

TEST(ChatAnswers, EachChoiceOfAStreamGetsItsRoleDelta) {
  ChatStreamConverter conv(EngineFlavor::kVllm);
  std::string out;
  for (int i : {0, 1, 0, 1}) {
    conv.feed("data: {\"id\":\"cmpl-2\",\"object\":\"text_completion\",\"choices\":[{\"index\":" +
                  std::to_string(i) + ",\"text\":\"t\",\"finish_reason\":null}]}\n\n",
              out);
  }
  std::size_t roles = 0;
  for (std::size_t at = out.find("\"role\""); at != std::string::npos;
       at = out.find("\"role\"", at + 1)) {
    ++roles;
  }
  EXPECT_EQ(roles, 2u);
}

TEST(ChatAnswers, AnUnterminatedEventIsFlushedAsIsAtTheEnd) {
  ChatStreamConverter conv(EngineFlavor::kVllm);
  std::string out;
  conv.feed("data: {\"error\":{\"message\":\"x\"}}\n\ndata: {\"id\":", out);
  EXPECT_EQ(out, "data: {\"error\":{\"message\":\"x\"}}\n\n");
  conv.finish(out);
  EXPECT_EQ(out, "data: {\"error\":{\"message\":\"x\"}}\n\ndata: {\"id\":");
}

}  // namespace
}  // namespace omni
