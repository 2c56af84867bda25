#include "workload.hpp"

#include <gtest/gtest.h>

#include <sstream>
#include <string>

namespace omni::replay {
namespace {

std::string mooncake_line(double ts_ms, int input, int output, const std::string& ids) {
  return "{\"timestamp\": " + std::to_string(ts_ms) +
         ", \"input_length\": " + std::to_string(input) +
         ", \"output_length\": " + std::to_string(output) + ", \"hash_ids\": [" + ids + "]}\n";
}

Workload mooncake(const std::string& text, TraceOptions slice = {}) {
  std::istringstream in(text);
  return read_mooncake(in, "t.jsonl", slice);
}

Workload azure(const std::string& text, TraceOptions slice = {}) {
  std::istringstream in(text);
  return read_azure(in, "t.csv", slice);
}

// The message of the TraceError `f` throws ("" when it does not throw).
template <typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const TraceError& e) {
    return e.what();
  }
  return "";
}

TEST(ReplayMooncake, ParsesRequestsAndBlocks) {
  const auto w = mooncake(mooncake_line(0, 1000, 5, "7, 8") + "\n" +  // blank line: ignored
                          mooncake_line(1500, 512, 1, "7"));
  EXPECT_EQ(w.source, "mooncake");
  ASSERT_EQ(w.requests.size(), 2u);
  const auto& a = w.requests[0];
  EXPECT_EQ(a.arrival_s, 0);
  EXPECT_EQ(a.input_tokens, 1000u);
  EXPECT_EQ(a.output_tokens, 5u);
  ASSERT_EQ(a.segments.size(), 2u);
  EXPECT_EQ(a.segments[0].id, 7u);
  EXPECT_EQ(a.segments[1].id, 8u);
  EXPECT_EQ(a.segments[0].length, 512u);
  EXPECT_DOUBLE_EQ(w.requests[1].arrival_s, 1.5);
}

TEST(ReplayMooncake, SliceKeepsWindowThenLimitAndRebases) {
  std::string text;
  for (int i = 0; i < 10; ++i) text += mooncake_line(i * 1000.0, 10, 1, std::to_string(i));
  TraceOptions slice;
  slice.start_s = 2.5;
  slice.window_s = 5;  // 3, 4, 5, 6, 7 s
  auto w = mooncake(text, slice);
  ASSERT_EQ(w.requests.size(), 5u);
  EXPECT_EQ(w.requests.front().segments[0].id, 3u);
  EXPECT_EQ(w.requests.front().arrival_s, 0);
  EXPECT_DOUBLE_EQ(w.requests.back().arrival_s, 4);
  slice.limit = 2;
  w = mooncake(text, slice);
  ASSERT_EQ(w.requests.size(), 2u);
  EXPECT_EQ(w.requests[1].segments[0].id, 4u);
}

TEST(ReplayMooncake, LimitStopsReadingBeforeLaterBadLines) {
  TraceOptions slice;
  slice.limit = 1;
  const auto w = mooncake(mooncake_line(0, 10, 1, "1") + "not json\n", slice);
  EXPECT_EQ(w.requests.size(), 1u);
}

TEST(ReplayMooncake, MalformedLinesNameFileAndLine) {
  const std::string good = mooncake_line(0, 10, 1, "1");
  struct Case {
    std::string line;
    std::string message;
  };
  const Case cases[] = {
      {"{\"timestamp\": 1", "t.jsonl:2: not JSON"},
      {"[1, 2]", "t.jsonl:2: not a JSON object"},
      {"{\"input_length\": 10, \"output_length\": 1, \"hash_ids\": [1]}",
       "t.jsonl:2: missing \"timestamp\""},
      {"{\"timestamp\": -1, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [1]}",
       "t.jsonl:2: \"timestamp\" must be a non-negative number"},
      {"{\"timestamp\": 5, \"input_length\": 0, \"output_length\": 1, \"hash_ids\": []}",
       "t.jsonl:2: \"input_length\" must be an integer"},
      {"{\"timestamp\": 5, \"input_length\": 10, \"output_length\": \"3\", \"hash_ids\": [1]}",
       "t.jsonl:2: \"output_length\" must be an integer"},
      {"{\"timestamp\": 5, \"input_length\": 600, \"output_length\": 1, \"hash_ids\": [1]}",
       "t.jsonl:2: \"hash_ids\" has 1 ids, input_length 600 needs 2 blocks of 512"},
      {"{\"timestamp\": 5, \"input_length\": 10, \"output_length\": 1, \"hash_ids\": [-3]}",
       "t.jsonl:2: \"hash_ids\" must hold non-negative integers"},
  };
  for (const auto& c : cases) {
    const std::string msg = error_of([&] { mooncake(good + c.line + "\n"); });
    EXPECT_EQ(msg.rfind(c.message, 0), 0u) << c.line << " -> " << msg;
  }
  const std::string backwards = mooncake_line(2000, 10, 1, "1") + mooncake_line(1000, 10, 1, "2");
  EXPECT_EQ(error_of([&] { mooncake(backwards); }),
            "t.jsonl:2: timestamp goes backwards (traces must be in arrival order)");
}

TEST(ReplayMooncake, SkipBadLinesCountsThem) {
  TraceOptions slice;
  slice.skip_bad_lines = true;
  const auto w = mooncake(
      mooncake_line(0, 10, 1, "1") + "garbage\n{}\n" + mooncake_line(10, 10, 1, "2"), slice);
  EXPECT_EQ(w.requests.size(), 2u);
  EXPECT_EQ(w.skipped_lines, 2u);
}

TEST(ReplayMooncake, HashBlockSizeIsConfigurable) {
  TraceOptions slice;
  slice.hash_block_tokens = 16;
  const auto w = mooncake(mooncake_line(0, 33, 1, "1, 2, 3"), slice);
  ASSERT_EQ(w.requests.size(), 1u);
  EXPECT_EQ(w.requests[0].segments.size(), 3u);
  EXPECT_EQ(w.requests[0].segments[2].length, 16u);
}

TEST(ReplayAzure, ParsesRelativeTimestamps) {
  const auto w = azure(
      "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
      "2023-11-16 18:17:03.9799600,4808,10\r\n"
      "2023-11-16 18:17:04.0319600,3180,8\r\n"
      "2023-11-17 00:00:00,110,27\r\n");
  EXPECT_EQ(w.source, "azure");
  ASSERT_EQ(w.requests.size(), 3u);
  EXPECT_EQ(w.requests[0].arrival_s, 0);
  EXPECT_NEAR(w.requests[1].arrival_s, 0.052, 1e-6);
  // Across midnight: 5 h 42 min 56.02004 s after the first row.
  EXPECT_NEAR(w.requests[2].arrival_s, 5 * 3600 + 42 * 60 + 56.02004, 1e-6);
  EXPECT_EQ(w.requests[0].input_tokens, 4808u);
  EXPECT_EQ(w.requests[0].output_tokens, 10u);
  // No prefix information: every prompt is one segment of its own.
  ASSERT_EQ(w.requests[0].segments.size(), 1u);
  EXPECT_EQ(w.requests[0].segments[0].length, 4808u);
  EXPECT_NE(w.requests[0].segments[0].id, w.requests[1].segments[0].id);
  EXPECT_NE(w.requests[1].segments[0].id, w.requests[2].segments[0].id);
}

TEST(ReplayAzure, WindowCountsFromTheFirstRow) {
  std::string text = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
  for (int s = 0; s < 10; ++s) text += "2023-11-16 18:17:0" + std::to_string(s) + ".5,100,5\n";
  TraceOptions slice;
  slice.start_s = 3;
  slice.window_s = 2;
  const auto w = azure(text, slice);
  ASSERT_EQ(w.requests.size(), 2u);  // rows at +3 s and +4 s
  EXPECT_DOUBLE_EQ(w.requests[1].arrival_s, 1);
}

TEST(ReplayAzure, MalformedLinesNameFileAndLine) {
  const std::string header = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
  EXPECT_EQ(error_of([&] { azure("time,a,b\n"); }),
            "t.csv:1: expected the header TIMESTAMP,ContextTokens,GeneratedTokens");
  EXPECT_EQ(error_of([&] { azure(header + "2023-11-16 18:17:03.1,10\n"); }),
            "t.csv:2: expected 3 comma-separated fields");
  EXPECT_EQ(error_of([&] {
              azure(header + "2023-13-16 18:17:03.1,10,5\n");
            }).rfind("t.csv:2: bad TIMESTAMP", 0),
            0u);
  EXPECT_EQ(error_of([&] { azure(header + "2023-11-16 18:17:03.1,x,5\n"); }),
            "t.csv:2: ContextTokens must be an integer >= 1");
  EXPECT_EQ(error_of([&] { azure(header + "2023-11-16 18:17:03.1,10,0\n"); }),
            "t.csv:2: GeneratedTokens must be an integer >= 1");
  EXPECT_EQ(error_of([&] { azure(""); }), "t.csv: empty file (no header)");
  TraceOptions skip;
  skip.skip_bad_lines = true;
  const auto w = azure(header + "bad\n2023-11-16 18:17:03.1,10,5\n", skip);
  EXPECT_EQ(w.requests.size(), 1u);
  EXPECT_EQ(w.skipped_lines, 1u);
}

TEST(ReplayTrace, LoadTraceReportsUnreadableFiles) {
  EXPECT_EQ(error_of([] { load_trace("mooncake:/nonexistent/x.jsonl", {}); }),
            "/nonexistent/x.jsonl: cannot open for reading");
  EXPECT_THROW(load_trace("csv:/x", {}), std::invalid_argument);
}

}  // namespace
}  // namespace omni::replay
