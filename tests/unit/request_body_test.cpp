#include <omni/request_body.hpp>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace omni {
namespace {

using ojson = nlohmann::ordered_json;

// Parses a body expected to be valid; reports the error otherwise.
ParsedBody parse_ok(Api api, std::string_view body) {
  auto result = parse_request_body(api, body);
  if (!result.ok()) {
    ADD_FAILURE() << "unexpected error " << result.error().status << " (" << result.error().param
                  << "): " << result.error().message;
    return ParsedBody{};
  }
  return std::move(result).value();
}

BodyError parse_error(Api api, std::string_view body, const ParseOptions& options = {}) {
  auto result = parse_request_body(api, body, options);
  if (result.ok()) {
    ADD_FAILURE() << "body accepted: " << body.substr(0, 200);
    return BodyError{};
  }
  return result.error();
}

std::vector<std::string> keys_of(const ojson& obj) {
  std::vector<std::string> keys;
  for (const auto& [key, value] : obj.items()) keys.push_back(key);
  return keys;
}

const char* const kPrefillKv =
    R"({"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,)"
    R"("remote_block_ids":null,"remote_host":null,"remote_port":null})";

// ---------------------------------------------------------------------------------------------
// Features
// ---------------------------------------------------------------------------------------------

TEST(RequestBody, CompletionsStringPromptFeatures) {
  const ParsedBody p = parse_ok(
      Api::kCompletions,
      R"({"model":"deepseek-v3","prompt":"Hello, world!","max_tokens":64,"n":2,"priority":-5})");
  const BodyFeatures& f = p.features;
  EXPECT_EQ(f.api, Api::kCompletions);
  EXPECT_EQ(f.model, "deepseek-v3");
  EXPECT_FALSE(f.stream);
  EXPECT_FALSE(f.include_usage);
  EXPECT_EQ(f.n, 2);
  EXPECT_FALSE(f.batch_input);
  EXPECT_EQ(f.batch_size, 1u);
  EXPECT_EQ(f.prompt_chars, 13u);
  EXPECT_EQ(f.prompt_token_ids, 0u);
  EXPECT_FALSE(f.has_token_ids);
  EXPECT_EQ(f.max_tokens, 64);
  EXPECT_FALSE(f.has_max_completion_tokens);
  EXPECT_EQ(f.priority, -5);
  EXPECT_FALSE(f.has_kv_transfer_params);
  EXPECT_FALSE(f.has_bootstrap);
}

TEST(RequestBody, CompletionsPromptForms) {
  {
    const auto f = parse_ok(Api::kCompletions, R"({"prompt":[9707,11,1879,0]})").features;
    EXPECT_TRUE(f.has_token_ids);
    EXPECT_EQ(f.prompt_token_ids, 4u);
    EXPECT_EQ(f.prompt_chars, 0u);
    EXPECT_FALSE(f.batch_input);
    EXPECT_EQ(f.batch_size, 1u);
  }
  {
    const auto f = parse_ok(Api::kCompletions, R"({"prompt":["ab","cde","f"]})").features;
    EXPECT_FALSE(f.has_token_ids);
    EXPECT_EQ(f.prompt_chars, 6u);
    EXPECT_TRUE(f.batch_input);
    EXPECT_EQ(f.batch_size, 3u);
  }
  {
    const auto f = parse_ok(Api::kCompletions, R"({"prompt":[[1,2,3],[4],[5,6]]})").features;
    EXPECT_TRUE(f.has_token_ids);
    EXPECT_EQ(f.prompt_token_ids, 6u);
    EXPECT_TRUE(f.batch_input);
    EXPECT_EQ(f.batch_size, 3u);
  }
  {
    // A list with one item is still a batch (SGLang wants its bootstrap fields as arrays).
    const auto f = parse_ok(Api::kCompletions, R"({"prompt":["only"]})").features;
    EXPECT_TRUE(f.batch_input);
    EXPECT_EQ(f.batch_size, 1u);
  }
}

TEST(RequestBody, ChatFeatures) {
  const ParsedBody p = parse_ok(Api::kChatCompletions, R"({
    "model": "qwen3",
    "messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": [
        {"type": "text", "text": "Describe"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": " this"}]},
      {"role": "assistant", "content": null, "tool_calls": [{"id": "1"}]},
      {"role": "tool", "tool_call_id": "1"}
    ],
    "stream": true,
    "stream_options": {"include_usage": true},
    "max_tokens": 10,
    "max_completion_tokens": 20,
    "kv_transfer_params": null,
    "bootstrap_room": 5
  })");
  const BodyFeatures& f = p.features;
  EXPECT_EQ(f.api, Api::kChatCompletions);
  EXPECT_EQ(f.model, "qwen3");
  EXPECT_TRUE(f.stream);
  EXPECT_TRUE(f.include_usage);
  EXPECT_EQ(f.n, 1);
  EXPECT_EQ(f.batch_size, 1u);
  EXPECT_FALSE(f.batch_input);
  EXPECT_EQ(f.prompt_chars, 9u + 8u + 5u);
  EXPECT_EQ(f.max_tokens, 20);  // max_completion_tokens wins
  EXPECT_TRUE(f.has_max_completion_tokens);
  EXPECT_FALSE(f.priority.has_value());
  EXPECT_TRUE(f.has_kv_transfer_params);
  EXPECT_TRUE(f.has_bootstrap);
}

TEST(RequestBody, GenerateFeatures) {
  {
    const auto f =
        parse_ok(Api::kGenerate, R"({"text":"abc","sampling_params":{"max_new_tokens":0,"n":3},)"
                                 R"("stream":true})")
            .features;
    EXPECT_EQ(f.api, Api::kGenerate);
    EXPECT_TRUE(f.stream);
    EXPECT_EQ(f.prompt_chars, 3u);
    EXPECT_EQ(f.max_tokens, 0);
    EXPECT_EQ(f.n, 3);
    EXPECT_FALSE(f.batch_input);
  }
  {
    const auto f = parse_ok(Api::kGenerate, R"({"text":["a","bb"],"sampling_params":[)"
                                            R"({"max_new_tokens":5},{"max_new_tokens":9}]})")
                       .features;
    EXPECT_TRUE(f.batch_input);
    EXPECT_EQ(f.batch_size, 2u);
    EXPECT_EQ(f.prompt_chars, 3u);
    EXPECT_EQ(f.max_tokens, 9);
  }
  {
    const auto f = parse_ok(Api::kGenerate, R"({"input_ids":[1,2,3]})").features;
    EXPECT_TRUE(f.has_token_ids);
    EXPECT_EQ(f.prompt_token_ids, 3u);
    EXPECT_FALSE(f.batch_input);
    EXPECT_FALSE(f.max_tokens.has_value());
  }
  {
    const auto f = parse_ok(Api::kGenerate, R"({"input_ids":[[1,2],[3]],"text":null})").features;
    EXPECT_TRUE(f.has_token_ids);
    EXPECT_EQ(f.prompt_token_ids, 3u);
    EXPECT_TRUE(f.batch_input);
    EXPECT_EQ(f.batch_size, 2u);
  }
}

TEST(RequestBody, NullCountsAsAbsent) {
  const auto f = parse_ok(Api::kChatCompletions,
                          R"({"model":null,"messages":[{"role":"user","content":"x"}],)"
                          R"("stream":null,"stream_options":null,"max_tokens":null,"n":null,)"
                          R"("max_completion_tokens":null,"priority":null})")
                     .features;
  EXPECT_EQ(f.model, "");
  EXPECT_FALSE(f.stream);
  EXPECT_EQ(f.n, 1);
  EXPECT_FALSE(f.max_tokens.has_value());
  EXPECT_TRUE(f.has_max_completion_tokens);
  EXPECT_FALSE(f.priority.has_value());
}

TEST(RequestBody, PromptCharsCountCodePoints) {
  // 中 文 ␠ 😀 ␠ 中(escaped) 😀(escaped pair) ␠ " q " ␠ \ ␠ LF = 15 code points.
  const auto f =
      parse_ok(Api::kCompletions, R"({"prompt":"中文 😀 \u4e2d\ud83d\ude00 \"q\" \\ \n"})").features;
  EXPECT_EQ(f.prompt_chars, 15u);
}

TEST(RequestBody, ApiPaths) {
  EXPECT_EQ(api_from_path("/v1/completions"), Api::kCompletions);
  EXPECT_EQ(api_from_path("/v1/chat/completions"), Api::kChatCompletions);
  EXPECT_EQ(api_from_path("/generate"), Api::kGenerate);
  EXPECT_FALSE(api_from_path("/v1/completions/").has_value());
  EXPECT_FALSE(api_from_path("/v1/embeddings").has_value());
  for (const Api api : {Api::kCompletions, Api::kChatCompletions, Api::kGenerate}) {
    EXPECT_EQ(api_from_path(api_path(api)), api);
  }
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

struct ErrorCase {
  Api api;
  std::string body;
  int status;
  std::string param;
};

TEST(RequestBody, ValidationErrorTable) {
  constexpr Api C = Api::kCompletions;
  constexpr Api H = Api::kChatCompletions;
  constexpr Api G = Api::kGenerate;
  const std::vector<ErrorCase> cases = {
      // Not JSON, or not an object.
      {C, "", 400, ""},
      {C, "   ", 400, ""},
      {C, "{", 400, ""},
      {C, R"({"prompt":"a",})", 400, ""},
      {C, R"({"prompt":"a"} x)", 400, ""},
      {C, R"({'prompt':'a'})", 400, ""},
      {C, "{\"prompt\":\"\xff\"}", 400, ""},   // invalid UTF-8
      {C, R"({"prompt":"\ud800"})", 400, ""},  // lone surrogate
      {C, R"({"prompt":"a","t":1e400})", 400, ""},
      {C, "[]", 400, ""},
      {C, R"("prompt")", 400, ""},
      {C, "null", 400, ""},
      // Completions input.
      {C, "{}", 400, "prompt"},
      {C, R"({"prompt":null})", 400, "prompt"},
      {C, R"({"prompt":""})", 400, "prompt"},
      {C, R"({"prompt":[]})", 400, "prompt"},
      {C, R"({"prompt":{}})", 400, "prompt"},
      {C, R"({"prompt":7})", 400, "prompt"},
      {C, R"({"prompt":[true]})", 400, "prompt"},
      {C, R"({"prompt":[1,"a"]})", 400, "prompt[1]"},
      {C, R"({"prompt":[1,-2]})", 400, "prompt[1]"},
      {C, R"({"prompt":[1.5]})", 400, "prompt[0]"},
      {C, R"({"prompt":["a",""]})", 400, "prompt[1]"},
      {C, R"({"prompt":["a",1]})", 400, "prompt[1]"},
      {C, R"({"prompt":[[1],[]]})", 400, "prompt[1]"},
      {C, R"({"prompt":[[1],["a"]]})", 400, "prompt[1][0]"},
      {C, R"({"prompt":[[1],2]})", 400, "prompt[1]"},
      // Common fields.
      {C, R"({"prompt":"a","model":5})", 400, "model"},
      {C, R"({"prompt":"a","stream":"true"})", 400, "stream"},
      {C, R"({"prompt":"a","stream":1})", 400, "stream"},
      {C, R"({"prompt":"a","max_tokens":0})", 400, "max_tokens"},
      {C, R"({"prompt":"a","max_tokens":-1})", 400, "max_tokens"},
      {C, R"({"prompt":"a","max_tokens":1.5})", 400, "max_tokens"},
      {C, R"({"prompt":"a","max_tokens":"10"})", 400, "max_tokens"},
      {C, R"({"prompt":"a","max_tokens":18446744073709551615})", 400, "max_tokens"},
      {H, R"({"messages":[{"role":"u"}],"max_completion_tokens":0})", 400, "max_completion_tokens"},
      {H, R"({"messages":[{"role":"u"}],"max_completion_tokens":true})", 400,
       "max_completion_tokens"},
      {C, R"({"prompt":"a","n":0})", 400, "n"},
      {C, R"({"prompt":"a","n":"2"})", 400, "n"},
      {C, R"({"prompt":"a","priority":"high"})", 400, "priority"},
      {C, R"({"prompt":"a","priority":1.5})", 400, "priority"},
      {C, R"({"prompt":"a","stream_options":{"include_usage":true}})", 400, "stream_options"},
      {C, R"({"prompt":"a","stream":false,"stream_options":{}})", 400, "stream_options"},
      {C, R"({"prompt":"a","stream":true,"stream_options":"yes"})", 400, "stream_options"},
      {C, R"({"prompt":"a","stream":true,"stream_options":{"include_usage":1}})", 400,
       "stream_options.include_usage"},
      // Chat input.
      {H, "{}", 400, "messages"},
      {H, R"({"messages":{}})", 400, "messages"},
      {H, R"({"messages":[]})", 400, "messages"},
      {H, R"({"messages":"hi"})", 400, "messages"},
      {H, R"({"messages":["hi"]})", 400, "messages[0]"},
      {H, R"({"messages":[{"content":"hi"}]})", 400, "messages[0].role"},
      {H, R"({"messages":[{"role":"user","content":"a"},{"role":1}]})", 400, "messages[1].role"},
      {H, R"({"messages":[{"role":null}]})", 400, "messages[0].role"},
      {H, R"({"messages":[{"role":"user","content":5}]})", 400, "messages[0].content"},
      {H, R"({"messages":[{"role":"user","content":{}}]})", 400, "messages[0].content"},
      // Generate input.
      {G, "{}", 400, "text"},
      {G, R"({"text":null,"input_ids":null})", 400, "text"},
      {G, R"({"text":"a","input_ids":[1]})", 400, "text"},
      {G, R"({"text":""})", 400, "text"},
      {G, R"({"text":[]})", 400, "text"},
      {G, R"({"text":[""]})", 400, "text[0]"},
      {G, R"({"text":[1,2]})", 400, "text"},
      {G, R"({"input_ids":"abc"})", 400, "input_ids"},
      {G, R"({"input_ids":[]})", 400, "input_ids"},
      {G, R"({"input_ids":["a"]})", 400, "input_ids"},
      {G, R"({"input_ids":[[1],[-1]]})", 400, "input_ids[1][0]"},
      {G, R"({"text":"a","sampling_params":"x"})", 400, "sampling_params"},
      {G, R"({"text":"a","sampling_params":{"max_new_tokens":-1}})", 400,
       "sampling_params.max_new_tokens"},
      {G, R"({"text":"a","sampling_params":{"n":0}})", 400, "sampling_params.n"},
      {G, R"({"text":["a"],"sampling_params":[{"n":0}]})", 400, "sampling_params[0].n"},
      {G, R"({"text":"a","stream":"no"})", 400, "stream"},
  };
  for (const ErrorCase& c : cases) {
    SCOPED_TRACE(std::string(api_path(c.api)) + " " + c.body);
    const BodyError err = parse_error(c.api, c.body);
    EXPECT_EQ(err.status, c.status);
    EXPECT_EQ(err.param, c.param);
    EXPECT_EQ(err.type, "BadRequestError");
    EXPECT_FALSE(err.message.empty());
    // The error body is what an OpenAI client expects.
    const auto json = nlohmann::json::parse(err.to_json());
    EXPECT_EQ(json.at("error").at("code"), c.status);
    EXPECT_EQ(json.at("error").at("message"), err.message);
    if (c.param.empty()) {
      EXPECT_TRUE(json.at("error").at("param").is_null());
    } else {
      EXPECT_EQ(json.at("error").at("param"), c.param);
    }
  }
}

TEST(RequestBody, AcceptedEdgeCases) {
  // Fields the reference would trip on, and the engines accept.
  parse_ok(Api::kCompletions, R"({"prompt":"a","stream":false,"stream_options":null})");
  parse_ok(Api::kCompletions, R"({"prompt":"a","max_tokens":9223372036854775807})");
  parse_ok(Api::kCompletions, R"({"prompt":[0]})");
  parse_ok(Api::kChatCompletions, R"({"messages":[{"role":""}]})");
  parse_ok(Api::kChatCompletions, R"({"messages":[{"role":"user","content":[]}]})");
  parse_ok(Api::kCompletions, "\xEF\xBB\xBF{\"prompt\":\"bom\"}");
  parse_ok(Api::kCompletions, " \t\r\n{\"prompt\":\"ws\"} \n");
  const auto f =
      parse_ok(Api::kCompletions,
               R"({"prompt":"a","stream":true,"stream_options":{"include_usage":false}})")
          .features;
  EXPECT_TRUE(f.stream);
  EXPECT_FALSE(f.include_usage);
}

TEST(RequestBody, InvalidJsonMessageNamesByteOffset) {
  const BodyError err = parse_error(Api::kCompletions, R"({"prompt": "a", oops})");
  EXPECT_EQ(err.status, 400);
  EXPECT_NE(err.message.find("not valid JSON"), std::string::npos) << err.message;
  EXPECT_NE(err.message.find("at byte 17"), std::string::npos) << err.message;
  EXPECT_EQ(err.message.find("[json.exception"), std::string::npos) << err.message;
}

TEST(RequestBody, InvalidJsonMessageIsValidUtf8) {
  const BodyError err = parse_error(Api::kCompletions, "{\"prompt\":\"ok\xff\xfe\"}");
  EXPECT_EQ(err.status, 400);
  EXPECT_EQ(err.message.find('\xff'), std::string::npos) << err.message;
  EXPECT_NE(err.message.find("\xEF\xBF\xBD"), std::string::npos) << err.message;
  EXPECT_EQ(nlohmann::json::parse(err.to_json()).at("error").at("message"), err.message);
}

TEST(RequestBody, TooLargeIs413) {
  const std::string body = R"({"prompt":")" + std::string(100, 'x') + R"("})";
  ParseOptions options;
  options.max_body_bytes = body.size() - 1;
  const BodyError err = parse_error(Api::kCompletions, body, options);
  EXPECT_EQ(err.status, 413);
  EXPECT_EQ(err.type, "RequestTooLargeError");
  EXPECT_EQ(nlohmann::json::parse(err.to_json()).at("error").at("code"), 413);
  options.max_body_bytes = body.size();
  EXPECT_TRUE(parse_request_body(Api::kCompletions, body, options).ok());
  // Too large wins over invalid: no parsing happens.
  options.max_body_bytes = 3;
  EXPECT_EQ(parse_error(Api::kCompletions, "{{{{{", options).status, 413);
}

// ---------------------------------------------------------------------------------------------
// Nesting limit
// ---------------------------------------------------------------------------------------------

TEST(RequestBody, DeepNestingRejectedQuickly) {
  const auto start = std::chrono::steady_clock::now();
  const std::vector<std::string> bodies = {
      std::string(100000, '['),
      std::string(100000, '[') + std::string(100000, ']'),
      R"({"prompt":"x","extra":)" + std::string(100000, '['),
      [] {
        std::string s;
        for (int i = 0; i < 100000; ++i) s += R"({"a":)";
        return s;
      }(),
  };
  for (const std::string& body : bodies) {
    const BodyError err = parse_error(Api::kCompletions, body);
    EXPECT_EQ(err.status, 400);
    EXPECT_NE(err.message.find("deeper than 128"), std::string::npos) << err.message;
  }
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_LT(elapsed, std::chrono::seconds(2));
  // The same holds for a prefill response.
  const auto kv = extract_kv_transfer_params(std::string(100000, '{'));
  ASSERT_FALSE(kv.ok());
  EXPECT_EQ(kv.error().status, 502);
}

TEST(RequestBody, NestingLimitBoundary) {
  // The top-level object is depth 1; 127 arrays inside it make 128.
  auto body_with_depth = [](std::size_t depth) {
    return R"({"prompt":"x","deep":)" + std::string(depth - 1, '[') + std::string(depth - 1, ']') +
           "}";
  };
  const ParsedBody p = parse_ok(Api::kCompletions, body_with_depth(128));
  EXPECT_EQ(serialize(p), body_with_depth(128));
  EXPECT_EQ(parse_error(Api::kCompletions, body_with_depth(129)).status, 400);

  ParseOptions shallow;
  shallow.max_depth = 2;
  EXPECT_TRUE(
      parse_request_body(Api::kChatCompletions, R"({"messages":["not an object"]})", shallow)
          .error()
          .param == "messages[0]");
  EXPECT_EQ(parse_request_body(Api::kChatCompletions, R"({"messages":[{"role":"u"}]})", shallow)
                .error()
                .status,
            400);
}

TEST(RequestBody, FindExcessNestingIgnoresStrings) {
  EXPECT_EQ(find_excess_nesting("[[[", 3), std::nullopt);
  EXPECT_EQ(find_excess_nesting("[[[[", 3), std::size_t{3});
  EXPECT_EQ(find_excess_nesting("[{[]}]{[", 2), std::size_t{2});
  EXPECT_EQ(find_excess_nesting("[[]][[]][[]]", 2), std::nullopt);
  // Brackets inside strings, escaped quotes and escaped backslashes do not count.
  EXPECT_EQ(find_excess_nesting(R"(["[[[[{{{{"])", 1), std::nullopt);
  EXPECT_EQ(find_excess_nesting(R"(["\"[[[["])", 1), std::nullopt);
  EXPECT_EQ(find_excess_nesting(R"(["\\",[)", 1), std::size_t{6});
  EXPECT_EQ(find_excess_nesting(R"(["unterminated [[[[)", 1), std::nullopt);
  EXPECT_EQ(find_excess_nesting("", 0), std::nullopt);
  EXPECT_EQ(find_excess_nesting("]]]][", 1), std::nullopt);

  // A prompt full of brackets is text, not nesting.
  const std::string prompt(100000, '[');
  const auto f = parse_ok(Api::kCompletions, R"({"prompt":")" + prompt + R"("})").features;
  EXPECT_EQ(f.prompt_chars, prompt.size());
}

// ---------------------------------------------------------------------------------------------
// Parsing fidelity
// ---------------------------------------------------------------------------------------------

TEST(RequestBody, ParseMatchesNlohmannDom) {
  // The linear-time builder must produce exactly what nlohmann's own ordered parser does,
  // duplicate keys included (last value wins, at the first key's position).
  const std::vector<std::string> bodies = {
      R"({"prompt":"a"})",
      R"({"prompt":"a","x":{"b":[1,2,{"c":null}],"a":true},"y":[[],{},[{}]],"z":-0.5e-3})",
      R"({"prompt":"a","dup":1,"other":2,"dup":{"k":[3]}})",
      R"({"prompt":"first","prompt":"second","n":1,"n":2})",
      R"({"prompt":"a","big":18446744073709551615,"neg":-9223372036854775808,"f":1.0,"e":1E2})",
      R"({"prompt":"a","nested":{"a":1,"a":2,"b":{"a":3,"a":4}}})",
      [] {
        // Enough members to use the builder's hash index, with duplicates before and after.
        std::string s = R"({"prompt":"a")";
        for (int i = 0; i < 100; ++i)
          s += ",\"k" + std::to_string(i % 70) + "\":" + std::to_string(i);
        return s + "}";
      }(),
  };
  for (const std::string& body : bodies) {
    SCOPED_TRACE(body);
    const ParsedBody p = parse_ok(Api::kCompletions, body);
    const ojson reference = ojson::parse(body);
    EXPECT_EQ(p.json, reference);
    EXPECT_EQ(serialize(p), reference.dump());
  }
  EXPECT_EQ(
      parse_ok(Api::kCompletions, R"({"prompt":"first","prompt":"second"})").features.prompt_chars,
      6u);
}

TEST(RequestBody, UnicodePreserved) {
  const std::string body =
      R"({"model":"m","prompt":"中文提示 😀🚀 \u4e2d\u6587 \ud83d\ude00 é","名字":"值"})";
  const ParsedBody p = parse_ok(Api::kCompletions, body);
  const std::string expected_prompt = "中文提示 😀🚀 中文 😀 é";
  for (const std::string& out :
       {serialize(p), vllm_prefill_body(p), vllm_decode_body(p, nullptr),
        sglang_bootstrap_body(p, "10.0.0.1", 8998, std::vector<std::uint64_t>{1}).value()}) {
    SCOPED_TRACE(out);
    // Raw UTF-8 out, never \u escapes; escaped input comes out as the same characters.
    EXPECT_NE(out.find(R"("prompt":")" + expected_prompt + "\""), std::string::npos);
    EXPECT_NE(out.find(R"("名字":"值")"), std::string::npos);
    EXPECT_EQ(ojson::parse(out).at("prompt"), expected_prompt);
  }
}

TEST(RequestBody, NumbersAndEscapesRoundTrip) {
  const std::string body =
      R"({"prompt":"tab\tquote\"nl\nctl\u0001","temperature":0.7,"top_p":1e-05,)"
      R"("seed":18446744073709551615,"bias":-42,"logit_bias":{"100":-100,"7":1.5},)"
      R"("x":[true,false,null]})";
  const ParsedBody p = parse_ok(Api::kCompletions, body);
  EXPECT_EQ(ojson::parse(serialize(p)), ojson::parse(body));
  const ojson prefill = ojson::parse(vllm_prefill_body(p));
  EXPECT_EQ(prefill.at("prompt"), "tab\tquote\"nl\nctl\x01");
  EXPECT_EQ(prefill.at("temperature").get<double>(), 0.7);
  EXPECT_EQ(prefill.at("seed").get<std::uint64_t>(), 18446744073709551615ULL);
  EXPECT_EQ(prefill.at("bias"), -42);
  EXPECT_EQ(prefill.at("logit_bias"), ojson::parse(R"({"100":-100,"7":1.5})"));
  EXPECT_EQ(keys_of(prefill.at("logit_bias")), (std::vector<std::string>{"100", "7"}));
}

// ---------------------------------------------------------------------------------------------
// vLLM sequential rewrites
// ---------------------------------------------------------------------------------------------

TEST(RequestBody, PrefillAndDecodeExactOutput) {
  const std::string body =
      R"({"model":"m","messages":[{"role":"user","content":"stream"}],"stream":true,)"
      R"("stream_options":{"include_usage":true},"max_tokens":100,"min_tokens":5,)"
      R"("temperature":0.7,"x-extra":{"b":1,"a":[1,2]}})";
  const ParsedBody p = parse_ok(Api::kChatCompletions, body);
  EXPECT_EQ(serialize(p), body);
  EXPECT_EQ(vllm_prefill_body(p),
            R"({"model":"m","messages":[{"role":"user","content":"stream"}],"stream":false,)"
            R"("max_tokens":1,"temperature":0.7,"x-extra":{"b":1,"a":[1,2]},)"
            R"("kv_transfer_params":)" +
                std::string(kPrefillKv) + "}");

  const auto kv = extract_kv_transfer_params(
      R"({"id":"cmpl-1","choices":[{"text":""}],"kv_transfer_params":{"do_remote_prefill":true,)"
      R"("do_remote_decode":false,"remote_block_ids":[7,3,9],"remote_engine_id":"e-1",)"
      R"("remote_request_id":"r-1","remote_host":"10.0.0.2","remote_port":5600,"tp_size":8}})");
  ASSERT_TRUE(kv.ok());
  ASSERT_TRUE(kv->has_value());
  const std::string kv_text =
      R"({"do_remote_prefill":true,"do_remote_decode":false,"remote_block_ids":[7,3,9],)"
      R"("remote_engine_id":"e-1","remote_request_id":"r-1","remote_host":"10.0.0.2",)"
      R"("remote_port":5600,"tp_size":8})";
  EXPECT_EQ((*kv)->dump(), kv_text);
  // Decode: the client body untouched (min_tokens and stream_options kept), plus the params.
  EXPECT_EQ(vllm_decode_body(p, &**kv),
            body.substr(0, body.size() - 1) + R"(,"kv_transfer_params":)" + kv_text + "}");
  EXPECT_EQ(vllm_decode_body(p, nullptr), body);
}

TEST(RequestBody, PrefillAppendsMissingFields) {
  const ParsedBody p = parse_ok(Api::kCompletions, R"({"prompt":"p","model":"m"})");
  EXPECT_EQ(vllm_prefill_body(p), R"({"prompt":"p","model":"m","kv_transfer_params":)" +
                                      std::string(kPrefillKv) +
                                      R"(,"stream":false,"max_tokens":1})");
}

TEST(RequestBody, PrefillReplacesInPlace) {
  const ParsedBody p = parse_ok(
      Api::kChatCompletions,
      R"({"kv_transfer_params":{"client":"junk"},"max_completion_tokens":50,"stream":true,)"
      R"("messages":[{"role":"user","content":"hi"}],"max_tokens":60})");
  EXPECT_EQ(vllm_prefill_body(p), R"({"kv_transfer_params":)" + std::string(kPrefillKv) +
                                      R"(,"max_completion_tokens":1,"stream":false,)"
                                      R"("messages":[{"role":"user","content":"hi"}],)"
                                      R"("max_tokens":1})");
}

TEST(RequestBody, MaxCompletionTokensOnlyWhenPresent) {
  const ParsedBody without =
      parse_ok(Api::kChatCompletions, R"({"messages":[{"role":"user","content":"hi"}]})");
  const ojson a = ojson::parse(vllm_prefill_body(without));
  EXPECT_FALSE(a.contains("max_completion_tokens"));
  EXPECT_EQ(a.at("max_tokens"), 1);

  const ParsedBody with =
      parse_ok(Api::kChatCompletions,
               R"({"messages":[{"role":"user","content":"hi"}],"max_completion_tokens":300})");
  const ojson b = ojson::parse(vllm_prefill_body(with));
  EXPECT_EQ(b.at("max_completion_tokens"), 1);
  EXPECT_EQ(b.at("max_tokens"), 1);
  EXPECT_EQ(ojson::parse(vllm_decode_body(with, nullptr)).at("max_completion_tokens"), 300);
}

TEST(RequestBody, MinTokensAndStreamOptionsOnlyLeavePrefill) {
  const ParsedBody p = parse_ok(Api::kCompletions, R"({"prompt":"p","min_tokens":8,"stream":true,)"
                                                   R"("stream_options":{"include_usage":true,)"
                                                   R"("continuous_usage_stats":true}})");
  const ojson prefill = ojson::parse(vllm_prefill_body(p));
  EXPECT_FALSE(prefill.contains("min_tokens"));
  EXPECT_FALSE(prefill.contains("stream_options"));
  EXPECT_EQ(prefill.at("stream"), false);

  const ojson kv = ojson::parse(R"({"do_remote_prefill":true,"remote_block_ids":[1]})");
  const ojson decode = ojson::parse(vllm_decode_body(p, &kv));
  EXPECT_EQ(decode.at("min_tokens"), 8);
  EXPECT_EQ(decode.at("stream"), true);
  EXPECT_EQ(decode.at("stream_options"),
            ojson::parse(R"({"include_usage":true,"continuous_usage_stats":true})"));
  EXPECT_EQ(decode.at("kv_transfer_params"), kv);
}

TEST(RequestBody, DecodeReplacesClientKvTransferParamsInPlace) {
  const ParsedBody p =
      parse_ok(Api::kCompletions, R"({"kv_transfer_params":{"x":1},"prompt":"p"})");
  const ojson kv = ojson::parse(R"({"remote_engine_id":"e"})");
  EXPECT_EQ(vllm_decode_body(p, &kv), R"({"kv_transfer_params":{"remote_engine_id":"e"},)"
                                      R"("prompt":"p"})");
  EXPECT_EQ(vllm_decode_body(p, nullptr), R"({"kv_transfer_params":{"x":1},"prompt":"p"})");
}

// The reference's token scanner took string values for keys. Each of these message contents
// must come through every rewrite byte for byte.
TEST(RequestBody, ContentThatLooksLikeKeysStaysIntact) {
  const std::vector<std::string> contents = {
      R"("stream")",
      R"("max_tokens")",
      R"("min_tokens")",
      R"("stream_options")",
      R"("kv_transfer_params")",
      R"("bootstrap_room")",
      R"("{\"stream\": true, \"max_tokens\": 5}")",
      R"("\"stream\": true")",
      R"("stream\":false,\"max_tokens\":1")",
      R"("}],\"stream\":true,\"x\":[{\"")",
  };
  for (const std::string& content : contents) {
    const std::string messages = R"([{"role":"system","content":"max_tokens"},)"
                                 R"({"role":"user","content":)" +
                                 content + R"(,"name":"stream"}])";
    const std::string body = R"({"model":"stream","messages":)" + messages +
                             R"(,"stream":true,"max_tokens":7,"user":"min_tokens"})";
    SCOPED_TRACE(body);
    const ParsedBody p = parse_ok(Api::kChatCompletions, body);
    const ojson kv = ojson::parse(R"({"remote_host":"stream"})");
    const std::vector<std::string> outputs = {
        serialize(p), vllm_prefill_body(p), vllm_decode_body(p, &kv), vllm_decode_body(p, nullptr),
        sglang_bootstrap_body(p, "h", 1, std::vector<std::uint64_t>{2}).value()};
    for (const std::string& out : outputs) {
      EXPECT_NE(out.find(R"("messages":)" + messages + ","), std::string::npos) << out;
      const ojson j = ojson::parse(out);
      EXPECT_EQ(j.at("model"), "stream");
      EXPECT_EQ(j.at("user"), "min_tokens");
    }
    EXPECT_EQ(serialize(p), body);
    EXPECT_EQ(vllm_decode_body(p, nullptr), body);
  }
}

TEST(RequestBody, ThousandsOfFieldsKept) {
  // The reference lost every field past its 256th JSON token.
  std::string body = R"({"prompt":"p")";
  std::vector<std::string> expected_keys = {"prompt"};
  for (int i = 0; i < 1500; ++i) {
    const std::string key = "field_" + std::to_string(1499 - i);
    body += ",\"" + key + "\":";
    body += i % 3 == 0 ? std::to_string(i) : i % 3 == 1 ? R"({"v":[1,"two",3]})" : R"("s")";
    expected_keys.push_back(key);
  }
  body += R"(,"stream":true,"max_tokens":9})";
  expected_keys.push_back("stream");
  expected_keys.push_back("max_tokens");
  const ParsedBody p = parse_ok(Api::kCompletions, body);
  EXPECT_EQ(serialize(p), body);

  const ojson prefill = ojson::parse(vllm_prefill_body(p));
  std::vector<std::string> prefill_keys = expected_keys;
  prefill_keys.push_back("kv_transfer_params");
  EXPECT_EQ(keys_of(prefill), prefill_keys);
  EXPECT_EQ(prefill.at("stream"), false);
  EXPECT_EQ(prefill.at("field_1498"), ojson::parse(R"({"v":[1,"two",3]})"));
  EXPECT_EQ(prefill.at("field_0"), "s");

  const ojson kv = ojson::parse(R"({"k":1})");
  const ojson decode = ojson::parse(vllm_decode_body(p, &kv));
  EXPECT_EQ(keys_of(decode), prefill_keys);
  EXPECT_EQ(decode.at("max_tokens"), 9);
}

TEST(RequestBody, ManyMessagesKept) {
  std::string messages = "[";
  for (int i = 0; i < 400; ++i) {
    if (i > 0) messages += ',';
    messages += R"({"role":")" + std::string(i % 2 ? "assistant" : "user") +
                R"(","content":[{"type":"text","text":"turn )" + std::to_string(i) + R"("}]})";
  }
  messages += "]";
  const std::string body = R"({"messages":)" + messages + R"(,"stream":true,"tail":"end"})";
  const ParsedBody p = parse_ok(Api::kChatCompletions, body);
  const std::string prefill = vllm_prefill_body(p);
  EXPECT_NE(prefill.find(R"({"messages":)" + messages + R"(,"stream":false,"tail":"end",)"),
            std::string::npos);
  EXPECT_EQ(ojson::parse(prefill).at("messages").size(), 400u);
}

TEST(RequestBody, OneMegabytePrompt) {
  std::string prompt;
  prompt.reserve(1 << 20);
  while (prompt.size() < (1u << 20)) prompt += "token 中 ";
  const std::string body = R"({"model":"m","prompt":")" + prompt + R"(","max_tokens":16})";
  const ParsedBody p = parse_ok(Api::kCompletions, body);
  EXPECT_EQ(p.features.prompt_chars, prompt.size() / 10 * 8);  // "token 中 " is 10 bytes, 8 chars
  const std::string prefill = vllm_prefill_body(p);
  EXPECT_GT(prefill.size(), prompt.size());
  EXPECT_EQ(ojson::parse(prefill).at("prompt").get_ref<const std::string&>(), prompt);
  EXPECT_EQ(vllm_decode_body(p, nullptr), body);
}

TEST(RequestBody, ManyKeysParseInLinearTime) {
  // nlohmann's own ordered parser is quadratic in an object's member count; ours is not.
  std::string body = R"({"prompt":"p")";
  for (int i = 0; i < 50000; ++i) body += ",\"k" + std::to_string(i) + "\":0";
  body += "}";
  const auto start = std::chrono::steady_clock::now();
  const ParsedBody p = parse_ok(Api::kCompletions, body);
  const std::string prefill = vllm_prefill_body(p);
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(p.json.size(), 50001u);
  EXPECT_GT(prefill.size(), body.size());
  EXPECT_LT(elapsed, std::chrono::seconds(5));
}

// ---------------------------------------------------------------------------------------------
// SGLang bootstrap
// ---------------------------------------------------------------------------------------------

TEST(RequestBody, BootstrapScalarsForSingleInput) {
  const ParsedBody p =
      parse_ok(Api::kGenerate, R"({"text":"hi","sampling_params":{"max_new_tokens":8}})");
  const auto out = sglang_bootstrap_body(p, "10.0.0.7", 8998, std::vector<std::uint64_t>{42});
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, R"({"text":"hi","sampling_params":{"max_new_tokens":8},)"
                  R"("bootstrap_host":"10.0.0.7","bootstrap_port":8998,"bootstrap_room":42})");

  const ParsedBody chat =
      parse_ok(Api::kChatCompletions, R"({"messages":[{"role":"user","content":"x"}]})");
  const std::vector<std::uint64_t> max_room = {kMaxBootstrapRoom};
  const ojson j = ojson::parse(sglang_bootstrap_body(chat, "h", 1, max_room).value());
  EXPECT_EQ(j.at("bootstrap_room").get<std::uint64_t>(), 9223372036854775807ULL);
  EXPECT_EQ(j.at("bootstrap_port"), 1);
}

TEST(RequestBody, BootstrapArraysForBatchInput) {
  {
    const ParsedBody p = parse_ok(Api::kGenerate, R"({"text":["a","b","c"],"stream":true})");
    const auto out = sglang_bootstrap_body(p, "pf-0", 9000, std::vector<std::uint64_t>{11, 22, 33});
    ASSERT_TRUE(out.ok());
    EXPECT_EQ(*out, R"({"text":["a","b","c"],"stream":true,)"
                    R"("bootstrap_host":["pf-0","pf-0","pf-0"],"bootstrap_port":[9000,9000,9000],)"
                    R"("bootstrap_room":[11,22,33]})");
  }
  {
    const ParsedBody p = parse_ok(Api::kGenerate, R"({"input_ids":[[1,2],[3]]})");
    const ojson j =
        ojson::parse(sglang_bootstrap_body(p, "h", 2, std::vector<std::uint64_t>{5, 6}).value());
    EXPECT_EQ(j.at("bootstrap_room"), ojson::parse("[5,6]"));
    EXPECT_EQ(j.at("bootstrap_host"), ojson::parse(R"(["h","h"])"));
  }
  {
    // A one-item list is a batch of one: arrays of one.
    const ParsedBody p = parse_ok(Api::kCompletions, R"({"prompt":["only"]})");
    const ojson j =
        ojson::parse(sglang_bootstrap_body(p, "h", 3, std::vector<std::uint64_t>{0}).value());
    EXPECT_EQ(j.at("bootstrap_room"), ojson::parse("[0]"));
    EXPECT_EQ(j.at("bootstrap_port"), ojson::parse("[3]"));
  }
  {
    // Token ids as a single flat list are one input: scalars.
    const ParsedBody p = parse_ok(Api::kCompletions, R"({"prompt":[1,2,3]})");
    const ojson j =
        ojson::parse(sglang_bootstrap_body(p, "h", 3, std::vector<std::uint64_t>{9}).value());
    EXPECT_EQ(j.at("bootstrap_room"), 9);
  }
}

TEST(RequestBody, BootstrapReplacesExistingFieldsInPlace) {
  const ParsedBody p =
      parse_ok(Api::kGenerate, R"({"bootstrap_room":7,"text":"a","bootstrap_host":"old"})");
  EXPECT_TRUE(p.features.has_bootstrap);
  EXPECT_EQ(sglang_bootstrap_body(p, "new", 8998, std::vector<std::uint64_t>{8}).value(),
            R"({"bootstrap_room":8,"text":"a","bootstrap_host":"new","bootstrap_port":8998})");
}

TEST(RequestBody, BootstrapCallerErrors) {
  const ParsedBody single = parse_ok(Api::kGenerate, R"({"text":"a"})");
  const ParsedBody batch = parse_ok(Api::kGenerate, R"({"text":["a","b"]})");
  const std::vector<std::uint64_t> one = {1};
  const std::vector<std::uint64_t> two = {1, 2};
  const std::vector<std::uint64_t> too_big = {kMaxBootstrapRoom + 1};
  const std::vector<BodyResult<std::string>> failures = {
      sglang_bootstrap_body(single, "h", 1, two),
      sglang_bootstrap_body(single, "h", 1, {}),
      sglang_bootstrap_body(batch, "h", 1, one),
      sglang_bootstrap_body(single, "h", 1, too_big),
      sglang_bootstrap_body(single, "", 1, one),
      sglang_bootstrap_body(single, "h", 0, one),
      sglang_bootstrap_body(single, "h", 65536, one),
  };
  for (const auto& r : failures) {
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().status, 500);
    EXPECT_FALSE(r.error().message.empty());
  }
  EXPECT_TRUE(sglang_bootstrap_body(batch, "h", 65535, two).ok());
}

TEST(RequestBody, BootstrapHostWithInvalidUtf8DoesNotThrow) {
  const ParsedBody p = parse_ok(Api::kGenerate, R"({"text":"a"})");
  const auto out = sglang_bootstrap_body(p, "bad\xff", 1, std::vector<std::uint64_t>{1});
  ASSERT_TRUE(out.ok());
  EXPECT_NO_THROW(ojson::parse(*out));
}

// ---------------------------------------------------------------------------------------------
// Prefill response
// ---------------------------------------------------------------------------------------------

TEST(RequestBody, PrefillResponseKvTransferParams) {
  {
    const auto r = extract_kv_transfer_params(R"({"id":"x","choices":[]})");
    ASSERT_TRUE(r.ok());
    EXPECT_FALSE(r->has_value());
  }
  {
    const auto r = extract_kv_transfer_params(R"({"kv_transfer_params":null,"id":"x"})");
    ASSERT_TRUE(r.ok());
    EXPECT_FALSE(r->has_value());
  }
  {
    const auto r = extract_kv_transfer_params(
        R"({"kv_transfer_params":{"remote_port":1,"remote_block_ids":[],"b":{"z":1,"a":2}}})");
    ASSERT_TRUE(r.ok());
    ASSERT_TRUE(r->has_value());
    EXPECT_EQ((*r)->dump(), R"({"remote_port":1,"remote_block_ids":[],"b":{"z":1,"a":2}})");
  }
  {
    const auto r = extract_kv_transfer_params(R"({"kv_transfer_params":{}})");
    ASSERT_TRUE(r.ok());
    ASSERT_TRUE(r->has_value());
    EXPECT_TRUE((*r)->empty());
  }
}

TEST(RequestBody, PrefillResponseErrors) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "not valid JSON"},
      {R"({"kv_transfer_params":)", "not valid JSON"},
      {R"({"kv_transfer_params":{"a":1})", "not valid JSON"},
      {"<html>502 Bad Gateway</html>", "not valid JSON"},
      {R"([{"kv_transfer_params":{}}])", "not an object"},
      {R"("ok")", "not an object"},
      {R"({"kv_transfer_params":[1,2]})", "kv_transfer_params"},
      {R"({"kv_transfer_params":"x"})", "kv_transfer_params"},
      {R"({"kv_transfer_params":0})", "kv_transfer_params"},
  };
  for (const auto& [response, needle] : cases) {
    SCOPED_TRACE(response);
    const auto r = extract_kv_transfer_params(response);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().status, 502);
    EXPECT_EQ(r.error().type, "BadGatewayError");
    EXPECT_NE(r.error().message.find(needle), std::string::npos) << r.error().message;
    EXPECT_NE(r.error().message.find("prefill response"), std::string::npos);
  }
}

TEST(RequestBody, ResultAccessors) {
  BodyResult<int> good(5);
  EXPECT_TRUE(good.ok());
  EXPECT_TRUE(static_cast<bool>(good));
  EXPECT_EQ(*good, 5);
  BodyResult<int> bad(BodyError{400, "m", "p", "t"});
  EXPECT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().param, "p");
  EXPECT_THROW(bad.value(), std::bad_variant_access);
  const auto json = nlohmann::json::parse(bad.error().to_json());
  EXPECT_EQ(json.at("error").at("type"), "t");
  EXPECT_EQ(json.at("error").at("message"), "m");
}

}  // namespace
}  // namespace omni
