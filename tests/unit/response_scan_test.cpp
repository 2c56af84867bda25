#include <omni/response_scan.hpp>

#include <gtest/gtest.h>

#include <string>

namespace omni {
namespace {

TEST(UsageScanner, CountsStreamedEventsAcrossSplits) {
  const std::string sse =
      "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n"
      "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"}}]}\n\n"
      "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"usage\"}}]}\n\n"
      "data: [DONE]\n\n";
  for (std::size_t step : {1u, 3u, 7u, 1000u}) {
    UsageScanner s(true);
    for (std::size_t i = 0; i < sse.size(); i += step) s.feed(std::string_view(sse).substr(i, step));
    s.finish();
    EXPECT_EQ(s.events(), 3u) << step;
    EXPECT_EQ(s.output_tokens(), 3u) << step;
    EXPECT_FALSE(s.exact()) << step;  // "usage" inside content is not a usage report
  }
}

TEST(UsageScanner, UsageChunkGivesExactCounts) {
  UsageScanner s(true);
  s.feed("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\r\n\r\n");
  s.feed("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":5}}\n\n");
  s.feed("data: [DONE]\n\n");
  s.finish();
  EXPECT_TRUE(s.exact());
  EXPECT_EQ(s.prompt_tokens(), 12u);
  EXPECT_EQ(s.output_tokens(), 5u);
}

TEST(UsageScanner, SglangMetaInfoIsCumulative) {
  UsageScanner s(true);
  s.feed("data: {\"text\":\"a\",\"meta_info\":{\"prompt_tokens\":4,\"completion_tokens\":1}}\n\n");
  s.feed("data: {\"text\":\"ab\",\"meta_info\":{\"prompt_tokens\":4,\"completion_tokens\":2}}\n\n");
  s.finish();
  EXPECT_TRUE(s.exact());
  EXPECT_EQ(s.prompt_tokens(), 4u);
  EXPECT_EQ(s.output_tokens(), 2u);
}

TEST(UsageScanner, NotStreamedReadsUsageAtEnd) {
  UsageScanner s(false);
  s.feed("{\"choices\":[{\"text\":\"hi\"}],\"usage\":{\"prompt_tokens\":3,");
  s.feed("\"completion_tokens\":9,\"total_tokens\":12}}");
  EXPECT_EQ(s.output_tokens(), 0u);
  s.finish();
  EXPECT_TRUE(s.exact());
  EXPECT_EQ(s.prompt_tokens(), 3u);
  EXPECT_EQ(s.output_tokens(), 9u);
}

TEST(UsageScanner, NotStreamedBatchOfMetaInfoIsSummed) {
  UsageScanner s(false);
  s.feed("[{\"text\":\"a\",\"meta_info\":{\"prompt_tokens\":2,\"completion_tokens\":3}},"
         "{\"text\":\"b\",\"meta_info\":{\"prompt_tokens\":5,\"completion_tokens\":7}}]");
  s.finish();
  EXPECT_EQ(s.prompt_tokens(), 7u);
  EXPECT_EQ(s.output_tokens(), 10u);
}

TEST(UsageScanner, BoundsAndGarbage) {
  UsageScanner s(false, 16);
  s.feed("{\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}");
  s.finish();
  EXPECT_FALSE(s.exact());  // over the bound: not kept
  UsageScanner g(true, 64);
  g.feed("data: {not json \"usage\" at all}\n\n");
  g.feed("data: " + std::string(100, 'x') + "\n\n");  // longer than the bound: dropped
  g.feed("data: {\"error\":{\"message\":\"boom\",\"code\":502}}\n\n");
  g.finish();
  EXPECT_FALSE(g.exact());
  EXPECT_TRUE(g.saw_error());
  EXPECT_EQ(g.events(), 2u);
}

TEST(HttpResponse, ContentLengthChunkedAndEof) {
  auto a = parse_http_response("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloextra");
  ASSERT_TRUE(a);
  EXPECT_EQ(a->status, 200);
  EXPECT_EQ(a->body, "hello");
  auto b = parse_http_response(
      "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n");
  ASSERT_TRUE(b);
  EXPECT_EQ(b->body, "abcde");
  auto c = parse_http_response("HTTP/1.0 503 Busy\r\nServer: x\r\n\r\nall of it");
  ASSERT_TRUE(c);
  EXPECT_EQ(c->status, 503);
  EXPECT_EQ(c->body, "all of it");
}

TEST(HttpResponse, RejectsMalformedAndTruncated) {
  EXPECT_FALSE(parse_http_response(""));
  EXPECT_FALSE(parse_http_response("HTTP/1.1 200 OK\r\n"));
  EXPECT_FALSE(parse_http_response("SSH-2.0\r\n\r\n"));
  EXPECT_FALSE(parse_http_response("HTTP/1.1 2x0 OK\r\n\r\n"));
  EXPECT_FALSE(parse_http_response("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"));
  EXPECT_FALSE(parse_http_response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"));
  EXPECT_FALSE(parse_http_response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"));
}

}  // namespace
}  // namespace omni

namespace omni {
namespace {

std::pair<std::uint32_t, std::uint32_t> whole_answer_counts(std::string_view body) {
  UsageScanner s(false);
  s.feed(body.substr(0, body.size() / 2));
  s.feed(body.substr(body.size() / 2));
  s.finish();
  return {s.prompt_tokens(), s.exact() ? s.output_tokens() : 0xffffffffu};
}

TEST(UsageScanner, WholeAnswerUsageFoundWhereverItIs) {
  using P = std::pair<std::uint32_t, std::uint32_t>;
  // vLLM's layout, usage last (read from the end), with spacing.
  EXPECT_EQ(whole_answer_counts(R"({"id":"cmpl-1","choices":[{"text":"hi"}],"usage": {"prompt_tokens": 12, "total_tokens": 16, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}} }
)"),
            P(12, 4));
  // Usage not last: the whole answer is parsed.
  EXPECT_EQ(whole_answer_counts(R"({"usage":{"prompt_tokens":3,"completion_tokens":2},"id":"x"})"),
            P(3, 2));
  // A generated text that looks like a usage key is a string: escaped quotes, never taken.
  EXPECT_EQ(whole_answer_counts(
                R"({"choices":[{"text":"\"usage\":{\"prompt_tokens\":99,\"completion_tokens\":99}"}],"usage":{"prompt_tokens":5,"completion_tokens":1}})"),
            P(5, 1));
  EXPECT_EQ(whole_answer_counts(
                R"({"usage":{"prompt_tokens":5,"completion_tokens":1},"choices":[{"text":"x \"usage\":{\"prompt_tokens\":99,\"completion_tokens\":99}}"}]})"),
            P(5, 1));
  // A nested usage that ends the document is not the top-level one.
  EXPECT_EQ(whole_answer_counts(R"({"meta":{"usage":{"prompt_tokens":9,"completion_tokens":9}}})"),
            P(0, 0xffffffffu));
  // Braces inside strings of the usage object do not end it early.
  EXPECT_EQ(whole_answer_counts(R"({"usage":{"note":"a}b{","prompt_tokens":7,"completion_tokens":3}})"),
            P(7, 3));
  // SGLang's batch answer (an array of items with meta_info).
  EXPECT_EQ(whole_answer_counts(R"([{"text":"a","meta_info":{"prompt_tokens":2,"completion_tokens":1}},{"text":"b","meta_info":{"prompt_tokens":3,"completion_tokens":2}}])"),
            P(5, 3));
  EXPECT_EQ(whole_answer_counts(R"({"usage":{"prompt_tokens":1,"completion_tokens":1}} trailing)"),
            P(0, 0xffffffffu));
}

}  // namespace
}  // namespace omni
