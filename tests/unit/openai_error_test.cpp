#include <omni/openai_error.hpp>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <string>

namespace omni {
namespace {

using nlohmann::json;

TEST(OpenAiError, BodyShape) {
  const json body = json::parse(openai_error_body(404, "model 'x' not found"));
  ASSERT_TRUE(body.is_object());
  ASSERT_EQ(body.size(), 1u);
  const json& err = body.at("error");
  ASSERT_EQ(err.size(), 4u);
  EXPECT_EQ(err.at("message"), "model 'x' not found");
  EXPECT_EQ(err.at("type"), "NotFoundError");
  EXPECT_TRUE(err.at("param").is_null());
  EXPECT_EQ(err.at("code"), 404);
  EXPECT_TRUE(err.at("code").is_number_integer());
}

TEST(OpenAiError, ExplicitTypeAndParam) {
  const json err =
      json::parse(openai_error_body(400, "bad value", "invalid_request_error", "max_tokens"))
          .at("error");
  EXPECT_EQ(err.at("type"), "invalid_request_error");
  EXPECT_EQ(err.at("param"), "max_tokens");
  EXPECT_EQ(err.at("code"), 400);
}

TEST(OpenAiError, TypeNamesForStatuses) {
  EXPECT_EQ(error_type_for_status(400), "BadRequestError");
  EXPECT_EQ(error_type_for_status(401), "AuthenticationError");
  EXPECT_EQ(error_type_for_status(404), "NotFoundError");
  EXPECT_EQ(error_type_for_status(429), "RateLimitError");
  EXPECT_EQ(error_type_for_status(503), "ServiceUnavailableError");
  EXPECT_EQ(error_type_for_status(500), "InternalServerError");
  EXPECT_EQ(error_type_for_status(599), "InternalServerError");
  EXPECT_EQ(error_type_for_status(418), "BadRequestError");
  EXPECT_EQ(json::parse(openai_error_body(429, "slow down")).at("error").at("type"),
            "RateLimitError");
}

TEST(OpenAiError, MessageIsJsonEscaped) {
  const std::string message = "quote \" backslash \\ newline \n tab \t ctl \x01 unicode \xc3\xa9";
  const std::string raw = openai_error_body(400, message);
  EXPECT_EQ(raw.find('\n'), std::string::npos);
  EXPECT_EQ(json::parse(raw).at("error").at("message"), message);
}

TEST(OpenAiError, InvalidUtf8DoesNotThrow) {
  const std::string message = "bad \xff\xfe bytes \xc3";
  std::string raw;
  ASSERT_NO_THROW(raw = openai_error_body(400, message));
  const json body = json::parse(raw);  // the output itself is valid UTF-8 JSON
  const std::string decoded = body.at("error").at("message");
  EXPECT_EQ(decoded.rfind("bad ", 0), 0u);
  EXPECT_NE(decoded.find(" bytes "), std::string::npos);
  EXPECT_NE(decoded.find("\xef\xbf\xbd"), std::string::npos);  // U+FFFD replacement
}

}  // namespace
}  // namespace omni
