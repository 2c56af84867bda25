#include "protocol.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <string>
#include <variant>
#include <vector>

namespace omni::sim {
namespace {

using nlohmann::json;

constexpr std::uint32_t kMaxModelLen = 64;
constexpr std::uint32_t kDefaultMaxTokens = 16;

const Protocol& vllm() {
  static const Protocol p(EngineKind::kVllm, "sim-model", kMaxModelLen, kDefaultMaxTokens);
  return p;
}
const Protocol& sglang() {
  static const Protocol p(EngineKind::kSglang, "sim-model", kMaxModelLen, kDefaultMaxTokens);
  return p;
}
const Protocol& proto(EngineKind k) {
  return k == EngineKind::kVllm ? vllm() : sglang();
}

const char* name(EngineKind k) {
  return k == EngineKind::kVllm ? "vllm" : "sglang";
}

ParsedRequest ok(const Protocol& p, Api api, const json& body) {
  auto r = p.parse(api, body.dump());
  if (auto* e = std::get_if<ProtocolError>(&r)) {
    ADD_FAILURE() << "unexpected error " << e->status << ": " << e->body << "\nfor " << body.dump();
    return {};
  }
  return std::get<ParsedRequest>(r);
}

ProtocolError fail(const Protocol& p, Api api, std::string_view body) {
  auto r = p.parse(api, body);
  if (std::holds_alternative<ParsedRequest>(r)) {
    ADD_FAILURE() << "expected an error for " << body;
    return {};
  }
  return std::get<ProtocolError>(r);
}
ProtocolError fail(const Protocol& p, Api api, const json& body) {
  return fail(p, api, std::string_view(body.dump()));
}

// The error object of a body in the engine's shape for `api`, checking the shape itself.
json error_of(EngineKind kind, Api api, const ProtocolError& e) {
  const json body = json::parse(e.body);
  if (kind == EngineKind::kSglang && api == Api::kGenerate) {
    EXPECT_EQ(body.size(), 1u) << e.body;
    EXPECT_EQ(body.at("error").size(), 1u) << e.body;
    EXPECT_TRUE(body.at("error").at("message").is_string()) << e.body;
    return body.at("error");
  }
  if (kind == EngineKind::kSglang) {
    EXPECT_EQ(body.at("object"), "error") << e.body;
    EXPECT_EQ(body.size(), 5u) << e.body;
    EXPECT_EQ(body.at("code"), e.status);
    return body;
  }
  EXPECT_EQ(body.size(), 1u) << e.body;
  const json& err = body.at("error");
  EXPECT_EQ(err.size(), 4u) << e.body;
  EXPECT_TRUE(err.contains("message") && err.contains("type") && err.contains("param"));
  EXPECT_EQ(err.at("code"), e.status);
  return err;
}

const SimTokenizer kTok;
// /generate defaults to 128 new tokens, more than kMaxModelLen.
const json kFewTokens = {{"max_new_tokens", 4}};

// ---------------------------------------------------------------------------------------------
// Valid requests
// ---------------------------------------------------------------------------------------------

TEST(Protocol, CompletionPromptForms) {
  for (EngineKind kind : {EngineKind::kVllm, EngineKind::kSglang}) {
    SCOPED_TRACE(name(kind));
    const Protocol& p = proto(kind);
    {
      const auto r = ok(p, Api::kCompletions, {{"model", "sim-model"}, {"prompt", "Hello world"}});
      EXPECT_EQ(r.api, Api::kCompletions);
      EXPECT_FALSE(r.batch);
      ASSERT_EQ(r.prompts.size(), 1u);
      EXPECT_EQ(r.prompts[0], kTok.encode("Hello world"));
      EXPECT_FALSE(r.stream);
      EXPECT_FALSE(r.kv_transfer_params.has_value());
      EXPECT_TRUE(r.bootstrap.empty());
    }
    {
      const auto r = ok(p, Api::kCompletions, {{"prompt", {5, 6, 129279}}});
      EXPECT_FALSE(r.batch);
      ASSERT_EQ(r.prompts.size(), 1u);
      EXPECT_EQ(r.prompts[0], (std::vector<TokenId>{5, 6, 129279}));
    }
    {
      const auto r = ok(p, Api::kCompletions, {{"prompt", {"a b", "c"}}});
      EXPECT_TRUE(r.batch);
      ASSERT_EQ(r.prompts.size(), 2u);
      EXPECT_EQ(r.prompts[0], kTok.encode("a b"));
      EXPECT_EQ(r.prompts[1], kTok.encode("c"));
    }
    {
      const auto r = ok(p, Api::kCompletions, {{"prompt", json::array({{1, 2}, {3}})}});
      EXPECT_TRUE(r.batch);
      ASSERT_EQ(r.prompts.size(), 2u);
      EXPECT_EQ(r.prompts[0], (std::vector<TokenId>{1, 2}));
      EXPECT_EQ(r.prompts[1], (std::vector<TokenId>{3}));
    }
    {
      const auto r = ok(p, Api::kCompletions, {{"prompt", json::array({"x", {9, 8}})}});
      EXPECT_TRUE(r.batch);
      ASSERT_EQ(r.prompts.size(), 2u);
      EXPECT_EQ(r.prompts[1], (std::vector<TokenId>{9, 8}));
    }
    {
      // model may be omitted or null
      const auto r = ok(p, Api::kCompletions, {{"model", nullptr}, {"prompt", "x"}});
      EXPECT_EQ(r.prompts.size(), 1u);
    }
  }
}

TEST(Protocol, ChatMessages) {
  const json messages = json::array({{{"role", "system"}, {"content", "Be brief."}},
                                     {{"role", "user"}, {"content", "Hi there"}}});
  for (EngineKind kind : {EngineKind::kVllm, EngineKind::kSglang}) {
    SCOPED_TRACE(name(kind));
    const auto r =
        ok(proto(kind), Api::kChatCompletions, {{"model", "sim-model"}, {"messages", messages}});
    EXPECT_EQ(r.api, Api::kChatCompletions);
    ASSERT_EQ(r.prompts.size(), 1u);
    EXPECT_EQ(r.prompts[0], kTok.encode_chat(messages, true));
    EXPECT_FALSE(r.batch);
    const auto no_gen = ok(proto(kind), Api::kChatCompletions,
                           {{"messages", messages}, {"add_generation_prompt", false}});
    EXPECT_EQ(no_gen.prompts[0], kTok.encode_chat(messages, false));
  }
}

TEST(Protocol, StreamAndUsageOptions) {
  struct Case {
    json extra;
    bool stream, include_usage;
  };
  const std::vector<Case> cases = {
      {json::object(), false, false},
      {{{"stream", true}}, true, false},
      {{{"stream", false}}, false, false},
      {{{"stream", true}, {"stream_options", {{"include_usage", true}}}}, true, true},
      {{{"stream", true}, {"stream_options", {{"include_usage", false}}}}, true, false},
      {{{"stream", true}, {"stream_options", nullptr}}, true, false},
  };
  for (const auto& c : cases) {
    json body = {{"prompt", "hi"}};
    body.update(c.extra);
    const auto r = ok(vllm(), Api::kCompletions, body);
    EXPECT_EQ(r.stream, c.stream) << body.dump();
    EXPECT_EQ(r.include_usage, c.include_usage) << body.dump();
  }
}

TEST(Protocol, MaxTokensAndDefaults) {
  struct Case {
    EngineKind kind;
    Api api;
    json body;
    std::uint32_t max_tokens;
    bool given;
  };
  const json msgs = json::array({{{"role", "user"}, {"content", "hi"}}});
  const std::vector<Case> cases = {
      {EngineKind::kVllm, Api::kCompletions, {{"prompt", "hi"}}, kDefaultMaxTokens, false},
      {EngineKind::kVllm,
       Api::kCompletions,
       {{"prompt", "hi"}, {"max_tokens", nullptr}},
       kDefaultMaxTokens,
       false},
      {EngineKind::kVllm, Api::kCompletions, {{"prompt", "hi"}, {"max_tokens", 7}}, 7, true},
      {EngineKind::kVllm, Api::kChatCompletions, {{"messages", msgs}}, kDefaultMaxTokens, false},
      {EngineKind::kVllm,
       Api::kChatCompletions,
       {{"messages", msgs}, {"max_completion_tokens", 9}},
       9,
       true},
      {EngineKind::kSglang, Api::kCompletions, {{"prompt", "hi"}}, kDefaultMaxTokens, false},
      {EngineKind::kSglang, Api::kGenerate, {{"text", "hi"}}, 128, false},
      {EngineKind::kSglang,
       Api::kGenerate,
       {{"text", "hi"}, {"sampling_params", {{"max_new_tokens", 5}}}},
       5,
       true},
      {EngineKind::kSglang,
       Api::kGenerate,
       {{"text", "hi"}, {"sampling_params", {{"max_new_tokens", nullptr}}}},
       128,
       true},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(name(c.kind)) + " " + c.body.dump());
    // The SGLang default exceeds this test's max_model_len; use a roomier protocol there.
    const Protocol roomy(c.kind, "sim-model", 4096, kDefaultMaxTokens);
    const auto r = ok(roomy, c.api, c.body);
    EXPECT_EQ(r.max_tokens, c.max_tokens);
    if (c.api != Api::kGenerate) {
      EXPECT_EQ(r.max_tokens_given, c.given);
    }
  }
}

TEST(Protocol, KvTransferParamsAreKeptAsAnObject) {
  const json params = {{"do_remote_decode", true},
                       {"remote_engine_id", nullptr},
                       {"nested", {{"a", json::array({1, 2})}}}};
  const auto r = ok(vllm(), Api::kCompletions, {{"prompt", "hi"}, {"kv_transfer_params", params}});
  ASSERT_TRUE(r.kv_transfer_params.has_value());
  EXPECT_EQ(*r.kv_transfer_params, params);
  const auto none =
      ok(vllm(), Api::kCompletions, {{"prompt", "hi"}, {"kv_transfer_params", nullptr}});
  EXPECT_FALSE(none.kv_transfer_params.has_value());
}

// ---------------------------------------------------------------------------------------------
// SGLang /generate and bootstrap fields
// ---------------------------------------------------------------------------------------------

TEST(Protocol, GenerateInputs) {
  {
    const auto r = ok(sglang(), Api::kGenerate,
                      {{"text", "Hello world"}, {"rid", "abc"}, {"sampling_params", kFewTokens}});
    EXPECT_EQ(r.api, Api::kGenerate);
    EXPECT_FALSE(r.batch);
    ASSERT_EQ(r.prompts.size(), 1u);
    EXPECT_EQ(r.prompts[0], kTok.encode("Hello world"));
    EXPECT_EQ(r.rid, "abc");
  }
  {
    const auto r =
        ok(sglang(), Api::kGenerate,
           {{"input_ids", {4, 5, 6}}, {"stream", true}, {"sampling_params", kFewTokens}});
    EXPECT_FALSE(r.batch);
    EXPECT_EQ(r.prompts, (std::vector<std::vector<TokenId>>{{4, 5, 6}}));
    EXPECT_TRUE(r.stream);
  }
  {
    const auto r =
        ok(sglang(), Api::kGenerate, {{"text", {"a", "b c"}}, {"sampling_params", kFewTokens}});
    EXPECT_TRUE(r.batch);
    EXPECT_EQ(r.prompts, (std::vector<std::vector<TokenId>>{kTok.encode("a"), kTok.encode("b c")}));
  }
  {
    const auto r = ok(sglang(), Api::kGenerate,
                      {{"input_ids", json::array({{1, 2}, {3}})}, {"sampling_params", kFewTokens}});
    EXPECT_TRUE(r.batch);
    EXPECT_EQ(r.prompts, (std::vector<std::vector<TokenId>>{{1, 2}, {3}}));
  }
}

TEST(Protocol, BootstrapFields) {
  {
    // Single request: scalars.
    const auto r = ok(sglang(), Api::kGenerate,
                      {{"text", "hi"},
                       {"sampling_params", kFewTokens},
                       {"bootstrap_host", "10.0.0.1"},
                       {"bootstrap_port", 8998},
                       {"bootstrap_room", 42}});
    ASSERT_EQ(r.bootstrap.size(), 1u);
    EXPECT_EQ(r.bootstrap[0].host, "10.0.0.1");
    EXPECT_EQ(r.bootstrap[0].port, 8998);
    EXPECT_EQ(r.bootstrap[0].room, 42u);
  }
  {
    // Batch: one entry per item.
    const auto r = ok(sglang(), Api::kGenerate,
                      {{"text", {"a", "b", "c"}},
                       {"sampling_params", kFewTokens},
                       {"bootstrap_host", {"h0", "h1", "h2"}},
                       {"bootstrap_port", {1000, 1001, 1002}},
                       {"bootstrap_room", {7, 8, 9223372036854775807LL}}});
    ASSERT_EQ(r.bootstrap.size(), 3u);
    for (std::size_t i = 0; i < 2; ++i) {
      EXPECT_EQ(r.bootstrap[i].host, "h" + std::to_string(i));
      EXPECT_EQ(r.bootstrap[i].port, 1000 + i);
      EXPECT_EQ(r.bootstrap[i].room, 7 + i);
    }
    EXPECT_EQ(r.bootstrap[2].room, 9223372036854775807ULL);
  }
  {
    // The OpenAI endpoints of SGLang take them too.
    const auto r = ok(sglang(), Api::kChatCompletions,
                      {{"messages", json::array({{{"role", "user"}, {"content", "hi"}}})},
                       {"bootstrap_host", "h"},
                       {"bootstrap_port", 1},
                       {"bootstrap_room", 0}});
    ASSERT_EQ(r.bootstrap.size(), 1u);
    EXPECT_EQ(r.bootstrap[0].room, 0u);
  }
  {
    // vLLM ignores them.
    const auto r = ok(vllm(), Api::kCompletions,
                      {{"prompt", "hi"}, {"bootstrap_host", {"x"}}, {"bootstrap_port", "bad"}});
    EXPECT_TRUE(r.bootstrap.empty());
  }
}

TEST(Protocol, BadBootstrapFields) {
  const json single = {{"text", "hi"},
                       {"sampling_params", kFewTokens},
                       {"bootstrap_host", "h"},
                       {"bootstrap_port", 80},
                       {"bootstrap_room", 1}};
  const json batch = {{"text", {"a", "b"}},
                      {"sampling_params", kFewTokens},
                      {"bootstrap_host", {"h", "h"}},
                      {"bootstrap_port", {80, 81}},
                      {"bootstrap_room", {1, 2}}};
  struct Case {
    const char* name;
    json base;
    const char* key;
    json value;  // null: remove the key
  };
  const std::vector<Case> cases = {
      {"missing room", single, "bootstrap_room", nullptr},
      {"missing host", single, "bootstrap_host", nullptr},
      {"array for a single request", single, "bootstrap_room", {1}},
      {"negative room", single, "bootstrap_room", -1},
      {"room past 2^63-1", single, "bootstrap_room", 9223372036854775808ULL},
      {"string room", single, "bootstrap_room", "1"},
      {"port 0", single, "bootstrap_port", 0},
      {"port too large", single, "bootstrap_port", 65536},
      {"numeric host", single, "bootstrap_host", 5},
      {"batch array too short", batch, "bootstrap_room", {1}},
      {"batch array too long", batch, "bootstrap_port", {80, 81, 82}},
      {"batch scalar", batch, "bootstrap_host", "h"},
  };
  ASSERT_EQ(ok(sglang(), Api::kGenerate, single).bootstrap.size(), 1u);
  ASSERT_EQ(ok(sglang(), Api::kGenerate, batch).bootstrap.size(), 2u);
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    json body = c.base;
    if (c.value.is_null()) {
      body.erase(c.key);
    } else {
      body[c.key] = c.value;
    }
    const auto e = fail(sglang(), Api::kGenerate, body);
    EXPECT_EQ(e.status, 400);
    const json err = error_of(EngineKind::kSglang, Api::kGenerate, e);
    EXPECT_NE(err.at("message").get<std::string>().find("bootstrap"), std::string::npos) << e.body;
  }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

TEST(Protocol, InvalidJsonShapes) {
  for (std::string_view body : {std::string_view("{not json"), std::string_view(""),
                                std::string_view("[1, 2]"), std::string_view("\"str\"")}) {
    SCOPED_TRACE(std::string(body));
    {
      const auto e = fail(vllm(), Api::kCompletions, body);
      EXPECT_EQ(e.status, 400);
      const json err = error_of(EngineKind::kVllm, Api::kCompletions, e);
      EXPECT_EQ(err.at("type"), "Bad Request");
      EXPECT_EQ(err.at("param"), "body");
      EXPECT_EQ(err.at("code"), 400);
      EXPECT_TRUE(err.at("message").is_string());
    }
    {
      const auto e = fail(sglang(), Api::kChatCompletions, body);
      EXPECT_EQ(e.status, 400);
      const json err = error_of(EngineKind::kSglang, Api::kChatCompletions, e);
      EXPECT_EQ(err.at("code"), 400);
      EXPECT_TRUE(err.at("message").is_string());
    }
    {
      const auto e = fail(sglang(), Api::kGenerate, body);
      EXPECT_EQ(e.status, 400);
      (void)error_of(EngineKind::kSglang, Api::kGenerate, e);
    }
  }
}

TEST(Protocol, OpenAiValidationErrors) {
  struct Case {
    const char* name;
    Api api;
    json body;
    int status;
    const char* type;   // nullptr: don't check
    const char* param;  // nullptr: null
  };
  const json msgs = json::array({{{"role", "user"}, {"content", "hi"}}});
  const std::vector<Case> cases = {
      {"unknown model",
       Api::kCompletions,
       {{"model", "gpt-9"}, {"prompt", "x"}},
       404,
       "NotFoundError",
       "model"},
      {"model not a string",
       Api::kCompletions,
       {{"model", 5}, {"prompt", "x"}},
       400,
       "Bad Request",
       "body.model"},
      {"missing prompt",
       Api::kCompletions,
       {{"model", "sim-model"}},
       400,
       "Bad Request",
       "body.prompt"},
      {"empty prompt list",
       Api::kCompletions,
       {{"prompt", json::array()}},
       400,
       "Bad Request",
       "body.prompt"},
      {"prompt of the wrong type",
       Api::kCompletions,
       {{"prompt", 5}},
       400,
       "Bad Request",
       "body.prompt"},
      {"batch item of the wrong type",
       Api::kCompletions,
       {{"prompt", {"a", 5}}},
       400,
       "Bad Request",
       "body.prompt"},
      {"empty string prompt", Api::kCompletions, {{"prompt", ""}}, 400, nullptr, nullptr},
      {"missing messages",
       Api::kChatCompletions,
       {{"model", "sim-model"}},
       400,
       "Bad Request",
       "body.messages"},
      {"unknown role",
       Api::kChatCompletions,
       {{"messages", json::array({{{"role", "wizard"}, {"content", "x"}}})}},
       400,
       "Bad Request",
       "body.messages"},
      {"max_tokens 0",
       Api::kCompletions,
       {{"prompt", "x"}, {"max_tokens", 0}},
       400,
       nullptr,
       "max_tokens"},
      {"max_tokens negative",
       Api::kCompletions,
       {{"prompt", "x"}, {"max_tokens", -5}},
       400,
       nullptr,
       "max_tokens"},
      {"max_completion_tokens 0",
       Api::kChatCompletions,
       {{"messages", msgs}, {"max_completion_tokens", 0}},
       400,
       nullptr,
       "max_completion_tokens"},
      {"max_tokens not an integer",
       Api::kCompletions,
       {{"prompt", "x"}, {"max_tokens", "3"}},
       400,
       "Bad Request",
       "body.max_tokens"},
      {"stream_options without stream",
       Api::kCompletions,
       {{"prompt", "x"}, {"stream_options", {{"include_usage", true}}}},
       400,
       nullptr,
       "stream_options"},
      {"stream_options with stream false",
       Api::kChatCompletions,
       {{"messages", msgs}, {"stream", false}, {"stream_options", {{"include_usage", true}}}},
       400,
       nullptr,
       "stream_options"},
      {"stream not a boolean",
       Api::kCompletions,
       {{"prompt", "x"}, {"stream", "yes"}},
       400,
       "Bad Request",
       "body.stream"},
      {"include_usage not a boolean",
       Api::kCompletions,
       {{"prompt", "x"}, {"stream", true}, {"stream_options", {{"include_usage", "yes"}}}},
       400,
       "Bad Request",
       "body.stream_options.include_usage"},
      {"stream_options not an object",
       Api::kCompletions,
       {{"prompt", "x"}, {"stream", true}, {"stream_options", 1}},
       400,
       "Bad Request",
       "body.stream_options"},
      {"text part of a non-string type",
       Api::kChatCompletions,
       {{"messages", json::array({{{"role", "user"},
                                   {"content", json::array({{{"type", 5}, {"text", "x"}}})}}})}},
       400,
       "Bad Request",
       "body.messages"},
      {"n = 0", Api::kCompletions, {{"prompt", "x"}, {"n", 0}}, 400, "BadRequestError", "n"},
      {"n = -1 chat",
       Api::kChatCompletions,
       {{"messages", msgs}, {"n", -1}},
       400,
       "BadRequestError",
       "n"},
      {"n over the limit",
       Api::kCompletions,
       {{"prompt", "x"}, {"n", Protocol::kMaxN + 1}},
       400,
       "BadRequestError",
       "n"},
      {"n huge", Api::kCompletions, {{"prompt", "x"}, {"n", UINT64_MAX}}, 400, nullptr, "n"},
      {"n a string", Api::kCompletions, {{"prompt", "x"}, {"n", "2"}}, 400, "Bad Request", "body.n"},
      {"n fractional", Api::kCompletions, {{"prompt", "x"}, {"n", 1.5}}, 400, "Bad Request",
       "body.n"},
      {"n a boolean", Api::kCompletions, {{"prompt", "x"}, {"n", true}}, 400, "Bad Request",
       "body.n"},
      {"token id = vocab size",
       Api::kCompletions,
       {{"prompt", {1, 129280}}},
       400,
       "Bad Request",
       "body.prompt"},
      {"negative token id",
       Api::kCompletions,
       {{"prompt", {-1}}},
       400,
       "Bad Request",
       "body.prompt"},
      {"token id out of vocab in a batch",
       Api::kCompletions,
       {{"prompt", json::array({{1}, {1u << 31}})}},
       400,
       "Bad Request",
       "body.prompt"},
      {"non-integer token id",
       Api::kCompletions,
       {{"prompt", {1, 2.5}}},
       400,
       "Bad Request",
       "body.prompt"},
      {"min_tokens over max_tokens",
       Api::kCompletions,
       {{"prompt", "x"}, {"max_tokens", 2}, {"min_tokens", 3}},
       400,
       nullptr,
       "min_tokens"},
      {"kv_transfer_params not an object",
       Api::kCompletions,
       {{"prompt", "x"}, {"kv_transfer_params", "x"}},
       400,
       "Bad Request",
       "body.kv_transfer_params"},
      {"kv_transfer_params with a batch",
       Api::kCompletions,
       {{"prompt", {"x", "y"}}, {"kv_transfer_params", json::object()}},
       400,
       nullptr,
       "kv_transfer_params"},
  };
  for (EngineKind kind : {EngineKind::kVllm, EngineKind::kSglang}) {
    for (const auto& c : cases) {
      SCOPED_TRACE(std::string(name(kind)) + ": " + c.name);
      const auto e = fail(proto(kind), c.api, c.body);
      EXPECT_EQ(e.status, c.status) << e.body;
      const json err = error_of(kind, c.api, e);
      if (c.type != nullptr) {
        EXPECT_EQ(err.at("type"), c.type) << e.body;
      }
      if (c.param != nullptr) {
        EXPECT_EQ(err.at("param"), c.param) << e.body;
      } else {
        EXPECT_TRUE(err.at("param").is_null()) << e.body;
      }
      EXPECT_FALSE(err.at("message").get<std::string>().empty());
    }
  }
  // The mentioned bad token id is in the message.
  const auto e = fail(vllm(), Api::kCompletions, json{{"prompt", {1, 129280}}});
  EXPECT_NE(e.body.find("129280"), std::string::npos) << e.body;
}

TEST(Protocol, ParallelSamplingN) {
  const json msgs = json::array({{{"role", "user"}, {"content", "hi"}}});
  for (EngineKind k : {EngineKind::kVllm, EngineKind::kSglang}) {
    SCOPED_TRACE(name(k));
    const Protocol& p = proto(k);
    EXPECT_EQ(ok(p, Api::kCompletions, {{"prompt", "x"}}).n, 1u);
    EXPECT_EQ(ok(p, Api::kCompletions, {{"prompt", "x"}, {"n", nullptr}}).n, 1u);
    EXPECT_EQ(ok(p, Api::kCompletions, {{"prompt", "x"}, {"n", 1}}).n, 1u);
    const ParsedRequest c = ok(p, Api::kCompletions, {{"prompt", "x"}, {"n", 3}, {"stream", true}});
    EXPECT_EQ(c.n, 3u);
    EXPECT_EQ(c.prompts.size(), 1u) << "n samples share one prompt";
    EXPECT_FALSE(c.batch);
    const ParsedRequest b = ok(p, Api::kCompletions, {{"prompt", {"a", "b"}}, {"n", 2}});
    EXPECT_EQ(b.n, 2u);
    EXPECT_EQ(b.prompts.size(), 2u);
    EXPECT_TRUE(b.batch);
    EXPECT_EQ(ok(p, Api::kChatCompletions, {{"messages", msgs}, {"n", Protocol::kMaxN}}).n,
              static_cast<std::uint32_t>(Protocol::kMaxN));
  }
  // vLLM P/D legs carry n through: a prefill (max_tokens 1) and a decode with n > 1.
  const ParsedRequest pd = ok(vllm(), Api::kCompletions,
                              {{"prompt", "x"},
                               {"n", 4},
                               {"max_tokens", 1},
                               {"kv_transfer_params", {{"do_remote_decode", true}}}});
  EXPECT_EQ(pd.n, 4u);
  ASSERT_TRUE(pd.kv_transfer_params.has_value());
  // SGLang /generate: sampling_params.n, for text and input_ids, single or batch.
  const json sp = {{"max_new_tokens", 3}, {"n", 3}};
  EXPECT_EQ(ok(sglang(), Api::kGenerate, {{"text", "a"}, {"sampling_params", sp}}).n, 3u);
  const ParsedRequest g =
      ok(sglang(), Api::kGenerate, {{"input_ids", {{1, 2}, {3}}}, {"sampling_params", sp}});
  EXPECT_EQ(g.n, 3u);
  EXPECT_EQ(g.prompts.size(), 2u);
  EXPECT_EQ(ok(sglang(), Api::kGenerate, {{"text", "a"}, {"sampling_params", kFewTokens}}).n, 1u);
  // n = 1 with bootstrap fields is the ordinary P/D case.
  EXPECT_EQ(ok(sglang(), Api::kGenerate,
               {{"text", "a"},
                {"sampling_params", {{"max_new_tokens", 2}, {"n", 1}}},
                {"bootstrap_host", "127.0.0.1"},
                {"bootstrap_port", 8998},
                {"bootstrap_room", 7}})
                .bootstrap.size(),
            1u);
  // The OpenAI endpoints of SGLang refuse n > 1 with bootstrap fields too, in their shape.
  const auto e = fail(sglang(), Api::kCompletions,
                      json{{"prompt", "x"},
                           {"n", 2},
                           {"max_tokens", 2},
                           {"bootstrap_host", "127.0.0.1"},
                           {"bootstrap_port", 8998},
                           {"bootstrap_room", 7}});
  EXPECT_EQ(e.status, 400);
  EXPECT_NE(error_of(EngineKind::kSglang, Api::kCompletions, e).at("message").get<std::string>()
                .find("n > 1"),
            std::string::npos);
  // vLLM's own wording for n < 1.
  EXPECT_EQ(error_of(EngineKind::kVllm, Api::kCompletions,
                     fail(vllm(), Api::kCompletions, json{{"prompt", "x"}, {"n", 0}}))
                .at("message"),
            "n must be at least 1, got 0.");
}

TEST(Protocol, PromptTooLong) {
  struct Case {
    std::size_t prompt_len;
    json max_tokens;  // null: absent, the context fills up (only the prompt must fit)
    bool rejected;
  };
  // max_model_len 64
  const std::vector<Case> cases = {
      {48, nullptr, false}, {63, nullptr, false}, {64, nullptr, true}, {60, 4, false}, {60, 5, true},
      {63, 1, false},       {64, 1, true},       {65, 1, true},  {1, 64, true},
  };
  for (EngineKind kind : {EngineKind::kVllm, EngineKind::kSglang}) {
    for (const auto& c : cases) {
      SCOPED_TRACE(std::string(name(kind)) + " prompt=" + std::to_string(c.prompt_len) +
                   " max_tokens=" + c.max_tokens.dump());
      json body = {{"prompt", std::vector<TokenId>(c.prompt_len, 300)}};
      if (!c.max_tokens.is_null()) body["max_tokens"] = c.max_tokens;
      const auto r = proto(kind).parse(Api::kCompletions, body.dump());
      if (!c.rejected) {
        EXPECT_TRUE(std::holds_alternative<ParsedRequest>(r));
        continue;
      }
      ASSERT_TRUE(std::holds_alternative<ProtocolError>(r));
      const auto& e = std::get<ProtocolError>(r);
      EXPECT_EQ(e.status, 400);
      const json err = error_of(kind, Api::kCompletions, e);
      EXPECT_EQ(err.at("param"), "input_tokens");
      const std::uint64_t out = c.max_tokens.is_null() ? 1 : c.max_tokens.get<std::uint64_t>();
      const std::string n = std::to_string(c.prompt_len);
      EXPECT_EQ(err.at("message"),
                "This model's maximum context length is 64 tokens. However, you requested " +
                    std::to_string(out) + " output tokens and your prompt contains at least " + n +
                    " input tokens, for a total of at least " + std::to_string(c.prompt_len + out) +
                    " tokens. Please reduce the length of the input prompt or the number of "
                    "requested output tokens. (parameter=input_tokens, value=" +
                    n + ")");
    }
  }
  // /generate checks the same limit, in its own error shape.
  const auto e = fail(sglang(), Api::kGenerate,
                      json{{"input_ids", std::vector<TokenId>(60, 300)},
                           {"sampling_params", {{"max_new_tokens", 10}}}});
  EXPECT_EQ(e.status, 400);
  EXPECT_NE(error_of(EngineKind::kSglang, Api::kGenerate, e)
                .at("message")
                .get<std::string>()
                .find("maximum context length is 64"),
            std::string::npos);
}

TEST(Protocol, GenerateErrors) {
  const std::vector<std::pair<const char*, json>> cases = {
      {"both text and input_ids", {{"text", "a"}, {"input_ids", {1}}}},
      {"neither", {{"sampling_params", json::object()}}},
      {"both null", {{"text", nullptr}, {"input_ids", nullptr}}},
      {"empty text list", {{"text", json::array()}}},
      {"text of the wrong type", {{"text", 5}}},
      {"non-string in text list", {{"text", {"a", 1}}}},
      {"empty input_ids", {{"input_ids", json::array()}}},
      {"input_ids out of vocab", {{"input_ids", {129280}}}},
      {"batch input_ids with a bad item", {{"input_ids", json::array({{1}, 2})}}},
      {"sampling_params not an object", {{"text", "a"}, {"sampling_params", 3}}},
      {"max_new_tokens 0", {{"text", "a"}, {"sampling_params", {{"max_new_tokens", 0}}}}},
      {"max_new_tokens not an int",
       {{"text", "a"}, {"sampling_params", {{"max_new_tokens", "3"}}}}},
      {"stream not a boolean", {{"text", "a"}, {"stream", 1}}},
      {"n 0", {{"text", "a"}, {"sampling_params", {{"max_new_tokens", 2}, {"n", 0}}}}},
      {"n not an int", {{"text", "a"}, {"sampling_params", {{"max_new_tokens", 2}, {"n", "2"}}}}},
      {"n over the limit",
       {{"text", "a"}, {"sampling_params", {{"max_new_tokens", 2}, {"n", Protocol::kMaxN + 1}}}}},
      {"n > 1 with bootstrap fields",
       {{"text", "a"},
        {"sampling_params", {{"max_new_tokens", 2}, {"n", 2}}},
        {"bootstrap_host", "127.0.0.1"},
        {"bootstrap_port", 8998},
        {"bootstrap_room", 7}}},
  };
  for (const auto& [what, body] : cases) {
    SCOPED_TRACE(what);
    const auto e = fail(sglang(), Api::kGenerate, body);
    EXPECT_EQ(e.status, 400);
    (void)error_of(EngineKind::kSglang, Api::kGenerate, e);
  }
  const auto both = fail(sglang(), Api::kGenerate, json{{"text", "a"}, {"input_ids", {1}}});
  EXPECT_EQ(json::parse(both.body),
            (json{{"error", {{"message", "Either text or input_ids should be provided."}}}}));
}

TEST(Protocol, ErrorBodyShapes) {
  {
    const json j = json::parse(vllm().error_body(Api::kCompletions, 503, "busy"));
    EXPECT_EQ(j, (json{{"error",
                        {{"message", "busy"},
                         {"type", "ServiceUnavailableError"},
                         {"param", nullptr},
                         {"code", 503}}}}));
  }
  {
    const json j =
        json::parse(sglang().error_body(Api::kChatCompletions, 400, "bad", "BadRequestError", "x"));
    EXPECT_EQ(j, (json{{"object", "error"},
                       {"message", "bad"},
                       {"type", "BadRequestError"},
                       {"param", "x"},
                       {"code", 400}}));
  }
  {
    const json j = json::parse(sglang().error_body(Api::kGenerate, 500, "oops", "T", "p"));
    EXPECT_EQ(j, (json{{"error", {{"message", "oops"}}}}));
  }
  {
    // Invalid UTF-8 in an echoed message never makes an invalid body.
    const std::string bad = "bad \xff byte";
    for (EngineKind kind : {EngineKind::kVllm, EngineKind::kSglang}) {
      for (Api api : {Api::kCompletions, Api::kGenerate}) {
        EXPECT_TRUE(json::accept(proto(kind).error_body(api, 400, bad)));
      }
    }
  }
}

TEST(Protocol, ModelsBody) {
  const json j = json::parse(vllm().models_body(1700000000));
  EXPECT_EQ(j.at("object"), "list");
  ASSERT_EQ(j.at("data").size(), 1u);
  const json& m = j.at("data")[0];
  EXPECT_EQ(m.at("id"), "sim-model");
  EXPECT_EQ(m.at("object"), "model");
  EXPECT_EQ(m.at("created"), 1700000000);
  EXPECT_EQ(m.at("owned_by"), "vllm");
  EXPECT_EQ(m.at("max_model_len"), kMaxModelLen);
  EXPECT_EQ(json::parse(sglang().models_body(0)).at("data")[0].at("owned_by"), "sglang");
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

ResponseMeta meta() {
  ResponseMeta m;
  m.id = "cmpl-\"1\"";
  m.model = "sim-model";
  m.created = 1700000000;
  m.e2e_latency_s = 0.25;
  return m;
}

TEST(Protocol, OpenAiResponseCompletions) {
  const std::vector<ChoiceResult> choices = {
      {" the model", {11, 12}, "length", 10, 8},
      {" a \"quoted\"\n", {13}, "stop", 5, 0},
  };
  const json j = json::parse(openai_response(Api::kCompletions, meta(), choices, nullptr));
  EXPECT_EQ(j.at("id"), "cmpl-\"1\"");
  EXPECT_EQ(j.at("object"), "text_completion");
  EXPECT_EQ(j.at("created"), 1700000000);
  EXPECT_EQ(j.at("model"), "sim-model");
  ASSERT_EQ(j.at("choices").size(), 2u);
  for (std::size_t i = 0; i < 2; ++i) {
    const json& c = j.at("choices")[i];
    EXPECT_EQ(c.at("index"), i);
    EXPECT_EQ(c.at("text"), choices[i].text);
    EXPECT_EQ(c.at("finish_reason"), choices[i].finish_reason);
    EXPECT_TRUE(c.at("logprobs").is_null());
  }
  const json& u = j.at("usage");
  EXPECT_EQ(u.at("prompt_tokens"), 15);
  EXPECT_EQ(u.at("completion_tokens"), 3);
  EXPECT_EQ(u.at("total_tokens"), 18);
  EXPECT_EQ(u.at("prompt_tokens_details").at("cached_tokens"), 8);
  ASSERT_TRUE(j.contains("kv_transfer_params"));
  EXPECT_TRUE(j.at("kv_transfer_params").is_null());
}

TEST(Protocol, OpenAiResponseCountsEachPromptOnce) {
  // Two prompts with n = 2: choices prompt-major, the prompt counted at sample 0 only.
  std::vector<ChoiceResult> choices = {
      {"a", {1, 2}, "length", 10, 4, 0},
      {"b", {3}, "stop", 10, 4, 1},
      {"c", {4, 5, 6}, "length", 7, 0, 0},
      {"d", {7}, "stop", 7, 0, 1},
  };
  for (Api api : {Api::kCompletions, Api::kChatCompletions}) {
    const json j = json::parse(openai_response(api, meta(), choices, nullptr));
    ASSERT_EQ(j.at("choices").size(), 4u);
    for (std::size_t i = 0; i < 4; ++i) {
      const json& c = j.at("choices")[i];
      EXPECT_EQ(c.at("index"), i);
      EXPECT_EQ(c.at("finish_reason"), choices[i].finish_reason);
      EXPECT_EQ(api == Api::kChatCompletions ? c.at("message").at("content") : c.at("text"),
                choices[i].text);
    }
    const json& u = j.at("usage");
    EXPECT_EQ(u.at("prompt_tokens"), 17);
    EXPECT_EQ(u.at("completion_tokens"), 7);
    EXPECT_EQ(u.at("total_tokens"), 24);
    EXPECT_EQ(u.at("prompt_tokens_details").at("cached_tokens"), 4);
  }
}

TEST(Protocol, OpenAiResponseChatWithKvTransferParams) {
  const json params = {{"remote_block_ids", {1, 2, 3}}, {"remote_host", "h"}};
  const json j = json::parse(
      openai_response(Api::kChatCompletions, meta(), {{"hello", {5}, "length", 3, 0}}, &params));
  EXPECT_EQ(j.at("object"), "chat.completion");
  const json& c = j.at("choices")[0];
  EXPECT_EQ(c.at("message").at("role"), "assistant");
  EXPECT_EQ(c.at("message").at("content"), "hello");
  EXPECT_EQ(c.at("finish_reason"), "length");
  EXPECT_EQ(j.at("usage").at("prompt_tokens_details").at("cached_tokens"), 0);
  EXPECT_EQ(j.at("kv_transfer_params"), params);
}

TEST(Protocol, OpenAiChunks) {
  struct Case {
    Api api;
    const char* text;
    const char* finish;
    bool role;
  };
  const std::vector<Case> cases = {
      {Api::kCompletions, " word", nullptr, false},
      {Api::kCompletions, "", "length", false},
      {Api::kCompletions, "q\"uote\\ \n\t\x01", nullptr, false},
      {Api::kChatCompletions, " word", nullptr, false},
      {Api::kChatCompletions, "", nullptr, true},
      {Api::kChatCompletions, "end\r\n", "stop", false},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.text);
    const std::string raw = openai_chunk(c.api, meta(), 3, c.text, c.finish, c.role);
    json j;
    ASSERT_NO_THROW(j = json::parse(raw)) << raw;
    EXPECT_EQ(j.at("id"), "cmpl-\"1\"");
    EXPECT_EQ(j.at("created"), 1700000000);
    EXPECT_EQ(j.at("model"), "sim-model");
    ASSERT_EQ(j.at("choices").size(), 1u);
    const json& ch = j.at("choices")[0];
    EXPECT_EQ(ch.at("index"), 3);
    if (c.finish == nullptr) {
      EXPECT_TRUE(ch.at("finish_reason").is_null());
    } else {
      EXPECT_EQ(ch.at("finish_reason"), c.finish);
    }
    if (c.api == Api::kChatCompletions) {
      EXPECT_EQ(j.at("object"), "chat.completion.chunk");
      EXPECT_FALSE(ch.contains("text"));
      if (c.role) {
        EXPECT_EQ(ch.at("delta"), (json{{"role", "assistant"}, {"content", ""}}));
      } else {
        EXPECT_EQ(ch.at("delta"), (json{{"content", c.text}}));
      }
    } else {
      EXPECT_EQ(j.at("object"), "text_completion");
      EXPECT_EQ(ch.at("text"), c.text);
      EXPECT_FALSE(ch.contains("delta"));
    }
  }
}

TEST(Protocol, OpenAiUsageChunk) {
  for (Api api : {Api::kCompletions, Api::kChatCompletions}) {
    const json j = json::parse(openai_usage_chunk(api, meta(), 100, 20, 64));
    EXPECT_EQ(j.at("object"),
              api == Api::kChatCompletions ? "chat.completion.chunk" : "text_completion");
    EXPECT_TRUE(j.at("choices").empty());
    EXPECT_EQ(j.at("usage").at("prompt_tokens"), 100);
    EXPECT_EQ(j.at("usage").at("completion_tokens"), 20);
    EXPECT_EQ(j.at("usage").at("total_tokens"), 120);
    EXPECT_EQ(j.at("usage").at("prompt_tokens_details").at("cached_tokens"), 64);
  }
}

TEST(Protocol, SglangGenerateItem) {
  struct Case {
    const char* reason;
    bool finished;
    json expected_finish;
  };
  const std::vector<Case> cases = {
      {"length", false, nullptr},
      {"length", true, {{"type", "length"}, {"length", 3}}},
      {"stop", true, {{"type", "stop"}, {"matched", SimTokenizer::kEos}}},
      {"abort", true, {{"type", "abort"}, {"message", " a b"}, {"status_code", 500}}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(c.reason) + (c.finished ? " finished" : " running"));
    const ChoiceResult r{" a b", {7, 8, 9}, c.reason, 12, 4};
    const json item = sglang_generate_item(meta(), r, c.finished, std::nullopt);
    EXPECT_EQ(item.at("text"), " a b");
    EXPECT_EQ(item.at("output_ids"), (json{7, 8, 9}));
    const json& mi = item.at("meta_info");
    EXPECT_EQ(mi.at("id"), "cmpl-\"1\"");
    EXPECT_EQ(mi.at("finish_reason"), c.expected_finish);
    EXPECT_EQ(mi.at("prompt_tokens"), 12);
    EXPECT_EQ(mi.at("completion_tokens"), 3);
    EXPECT_EQ(mi.at("cached_tokens"), 4);
    EXPECT_DOUBLE_EQ(mi.at("e2e_latency").get<double>(), 0.25);
    EXPECT_FALSE(item.contains("index"));
  }
  const json indexed =
      sglang_generate_item(meta(), ChoiceResult{"x", {1}, "stop", 1, 0}, true, std::size_t{2});
  EXPECT_EQ(indexed.at("index"), 2);
}

TEST(Protocol, AppendJsonStringRoundTrips) {
  const std::vector<std::string> cases = {
      "",
      "plain text",
      "q\"uote",
      "back\\slash",
      "\\\"",
      "new\nline\r\ttab",
      std::string("nul\0byte", 8),
      "\x01\x02\x1f\x7f",
      "\b\f",
      "utf8 \xc3\xa9 \xe2\x82\xac",
      "</script>",
  };
  for (const auto& s : cases) {
    std::string out = "prefix:";
    append_json_string(out, s);
    ASSERT_EQ(out.rfind("prefix:", 0), 0u);
    const std::string encoded = out.substr(7);
    json parsed;
    ASSERT_NO_THROW(parsed = json::parse(encoded)) << encoded;
    ASSERT_TRUE(parsed.is_string());
    EXPECT_EQ(parsed.get<std::string>(), s) << encoded;
    // No raw control characters survive.
    for (unsigned char ch : encoded) EXPECT_GE(ch, 0x20) << encoded;
  }
  std::string out;
  append_json_string(out, "a\"b");
  EXPECT_EQ(out, R"("a\"b")");
}

}  // namespace
}  // namespace omni::sim
