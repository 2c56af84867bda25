#include "sse.hpp"
#include "response.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace omni::replay {
namespace {

std::vector<std::string> feed_all(SseParser& p, const std::vector<std::string>& chunks) {
  std::vector<std::string> events;
  for (const auto& c : chunks) p.feed(c, events);
  return events;
}

TEST(ReplaySse, EventsSplitAcrossChunks) {
  SseParser p;
  const auto events = feed_all(p, {"da", "ta: {\"a\":", "1}\n", "\n", "data: [DONE]\n\n"});
  EXPECT_EQ(events, (std::vector<std::string>{"{\"a\":1}", "[DONE]"}));
  EXPECT_EQ(p.pending(), 0u);
}

TEST(ReplaySse, EveryByteAlone) {
  const std::string stream = "data: one\r\n\r\n: comment\n\nevent: x\ndata: two\ndata:three\n\n";
  SseParser p;
  std::vector<std::string> events;
  for (char c : stream) p.feed(std::string_view(&c, 1), events);
  EXPECT_EQ(events, (std::vector<std::string>{"one", "two\nthree"}));
}

TEST(ReplaySse, IncompleteEventIsHeldBack) {
  SseParser p;
  const auto events = feed_all(p, {"data: done\n\ndata: half"});
  EXPECT_EQ(events, std::vector<std::string>{"done"});
  EXPECT_EQ(p.pending(), std::string("data: half").size());
}

TEST(ReplaySse, OversizedEventIsAnError) {
  SseParser p;
  std::vector<std::string> events;
  const std::string big(1 << 20, 'x');
  EXPECT_THROW(
      {
        for (int i = 0; i < 17; ++i) p.feed(big, events);
      },
      std::length_error);
}

// ResponseReader over hand-made responses.
class ReplayResponse : public ::testing::Test {
 protected:
  RequestRecord rec;
  LogHistogram itl;
  ResponseReader reader{rec, itl};

  static std::string chunk(const std::string& text) {
    return "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[{\"index\":0,"
           "\"text\":\"" +
           text + "\",\"finish_reason\":null}]}\n\n";
  }
  static std::string usage(int prompt, int completion, int cached) {
    return "data: {\"id\":\"cmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":" +
           std::to_string(prompt) + ",\"completion_tokens\":" + std::to_string(completion) +
           ",\"total_tokens\":0,\"prompt_tokens_details\":{\"cached_tokens\":" +
           std::to_string(cached) + "}}}\n\n";
  }
};

TEST_F(ReplayResponse, StreamedCompletion) {
  reader.on_header(200, true, "127.0.0.1:8100", "");
  reader.on_body(chunk(" the"), 50);
  const std::string second = chunk(" cache");
  reader.on_body(second.substr(0, 20), 60);  // a partial event is no token yet
  reader.on_body(second.substr(20), 70);
  reader.on_body(chunk(" hit"), 100);
  reader.on_body(usage(1000, 3, 512) + "data: [DONE]\n\n", 101);
  reader.on_end(102);
  EXPECT_EQ(rec.outcome, "ok");
  EXPECT_EQ(rec.status, 200);
  EXPECT_EQ(rec.prefill_peer, "127.0.0.1:8100");
  EXPECT_EQ(rec.decode_peer, "");
  EXPECT_EQ(rec.ttft_ms, 50);
  EXPECT_EQ(rec.e2e_ms, 102);
  EXPECT_EQ(rec.token_events, 3u);
  EXPECT_EQ(rec.itl_count, 2u);
  EXPECT_EQ(rec.itl_sum_ms, 50);
  EXPECT_EQ(rec.itl_max_ms, 30);
  EXPECT_EQ(rec.prompt_tokens, 1000);
  EXPECT_EQ(rec.cached_tokens, 512);
  EXPECT_EQ(rec.completion_tokens, 3);
  EXPECT_EQ(itl.count(), 2u);
}

TEST_F(ReplayResponse, ChatDeltasAndRoleChunk) {
  reader.on_header(200, true, "", "");
  reader.on_body(
      "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
      10);
  reader.on_body("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n", 20);
  reader.on_body("data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"}}]}\n\n", 25);
  reader.on_body("data: [DONE]\n\n", 26);
  reader.on_end(26);
  EXPECT_EQ(rec.outcome, "ok");
  EXPECT_EQ(rec.ttft_ms, 20);  // the role chunk carries no text
  EXPECT_EQ(rec.token_events, 2u);
  EXPECT_EQ(rec.completion_tokens, 2);  // no usage: counted from the stream
  EXPECT_EQ(rec.prompt_tokens, -1);
}

TEST_F(ReplayResponse, RunningUsageCountsSeveralTokensPerEvent) {
  reader.on_header(200, true, "", "");
  auto ev = [](const std::string& text, int completion) {
    return "data: {\"choices\":[{\"index\":0,\"text\":\"" + text +
           "\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":" +
           std::to_string(completion) + "}}\n\n";
  };
  reader.on_body(ev("a", 1), 10);
  reader.on_body(ev("b c d", 4), 40);  // three tokens, 30 ms: three gaps of 10 ms
  reader.on_body("data: [DONE]\n\n", 41);
  reader.on_end(41);
  EXPECT_EQ(rec.token_events, 2u);
  EXPECT_EQ(rec.tokens_seen, 4u);
  EXPECT_EQ(rec.itl_count, 3u);
  EXPECT_EQ(rec.itl_max_ms, 10);
  EXPECT_EQ(itl.count(), 3u);
  EXPECT_EQ(rec.completion_tokens, 4);
}

TEST_F(ReplayResponse, ErrorEventInsideAStream) {
  reader.on_header(200, true, "", "");
  reader.on_body(chunk("x"), 5);
  reader.on_body("data: {\"error\":{\"message\":\"KV transfer failed\",\"code\":500}}\n\n", 8);
  reader.on_body("data: [DONE]\n\n", 9);
  reader.on_end(9);
  EXPECT_EQ(rec.outcome, "stream_error");
  EXPECT_EQ(rec.error, "{\"error\":{\"message\":\"KV transfer failed\",\"code\":500}}");
}

TEST_F(ReplayResponse, HttpErrorKeepsTheStartOfItsBody) {
  reader.on_header(500, false, "", "");
  std::string body = "{\"error\":{\"message\":\"" + std::string(600, 'x') + "\"}}";
  reader.on_body(body.substr(0, 300), 1);
  reader.on_body(body.substr(300), 2);
  reader.on_end(3);
  EXPECT_EQ(rec.outcome, "http_500");
  EXPECT_EQ(rec.status, 500);
  EXPECT_EQ(rec.error, body.substr(0, kMaxErrorBytes));
  EXPECT_EQ(rec.e2e_ms, 3);
  EXPECT_EQ(rec.ttft_ms, -1);
}

TEST_F(ReplayResponse, StreamWithoutDoneIsIncomplete) {
  reader.on_header(200, true, "", "");
  reader.on_body(chunk("x"), 5);
  reader.on_end(6);
  EXPECT_EQ(rec.outcome, "incomplete");
}

TEST_F(ReplayResponse, TransportFailure) {
  reader.on_header(200, true, "", "");
  reader.on_body(chunk("x"), 5);
  reader.on_failure("transport", "read: Connection reset by peer", 7);
  EXPECT_EQ(rec.outcome, "transport");
  EXPECT_EQ(rec.error, "read: Connection reset by peer");
  EXPECT_EQ(rec.e2e_ms, 7);
}

TEST_F(ReplayResponse, NonStreamedAnswer) {
  rec.streamed = false;
  reader.on_header(200, false, "", "d:1");
  reader.on_body(
      "{\"choices\":[{\"index\":0,\"text\":\"a b\"}],\"usage\":{\"prompt_tokens\":9,"
      "\"completion_tokens\":2,\"prompt_tokens_details\":null}}",
      30);
  reader.on_end(31);
  EXPECT_EQ(rec.outcome, "ok");
  EXPECT_EQ(rec.ttft_ms, 31);  // the whole answer is the first output
  EXPECT_EQ(rec.e2e_ms, 31);
  EXPECT_EQ(rec.completion_tokens, 2);
  EXPECT_EQ(rec.cached_tokens, -1);
  EXPECT_EQ(rec.decode_peer, "d:1");
}

TEST_F(ReplayResponse, NonJsonAnswerIsBad) {
  reader.on_header(200, false, "", "");
  reader.on_body("<html>", 1);
  reader.on_end(2);
  EXPECT_EQ(rec.outcome, "bad_response");
}

TEST(ReplayResponseText, TruncationKeepsUtf8Whole) {
  const std::string s = std::string(499, 'a') + "\xc3\xa9" + "tail";  // 'é' across byte 500
  EXPECT_EQ(truncate_error(s), std::string(499, 'a'));
  EXPECT_EQ(truncate_error("short"), "short");
}

}  // namespace
}  // namespace omni::replay
