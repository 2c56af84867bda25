#include <omni/prometheus.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <limits>

namespace omni::prom {
namespace {

TEST(PromWriter, FamilyWritesHelpAndType) {
  TextWriter w;
  w.family("omni_requests_total", "counter", "Requests routed.");
  EXPECT_EQ(w.str(),
            "# HELP omni_requests_total Requests routed.\n"
            "# TYPE omni_requests_total counter\n");
}

TEST(PromWriter, HelpEscapesBackslashAndNewlineOnly) {
  TextWriter w;
  w.family("m", "gauge", "a\\b\nc \"q\"");
  EXPECT_EQ(w.str(), "# HELP m a\\\\b\\nc \"q\"\n# TYPE m gauge\n");
}

TEST(PromWriter, SampleWithAndWithoutLabels) {
  TextWriter w;
  w.sample("up", {}, 1);
  w.sample("omni_queue_depth", {{"upstream", "a:8000"}, {"model", "m"}}, 4);
  EXPECT_EQ(w.str(), "up 1\nomni_queue_depth{upstream=\"a:8000\",model=\"m\"} 4\n");
}

TEST(PromWriter, LabelValuesAreEscaped) {
  TextWriter w;
  w.sample("m", {{"v", "a\\b\"c\nd"}}, 0);
  EXPECT_EQ(w.str(), "m{v=\"a\\\\b\\\"c\\nd\"} 0\n");
}

TEST(PromWriter, ValueFormatting) {
  auto fmt = [](double v) {
    TextWriter w;
    w.sample("m", {}, v);
    std::string s = w.take();
    return s.substr(2, s.size() - 3);  // between "m " and "\n"
  };
  EXPECT_EQ(fmt(0), "0");
  EXPECT_EQ(fmt(3), "3");
  EXPECT_EQ(fmt(-42), "-42");
  EXPECT_EQ(fmt(1e15), "1000000000000000");
  EXPECT_EQ(fmt(9007199254740991.0), "9007199254740991");  // 2^53 - 1
  EXPECT_EQ(fmt(0.5), "0.5");
  EXPECT_EQ(fmt(std::numeric_limits<double>::quiet_NaN()), "NaN");
  EXPECT_EQ(fmt(std::numeric_limits<double>::infinity()), "+Inf");
  EXPECT_EQ(fmt(-std::numeric_limits<double>::infinity()), "-Inf");
  // Non-integral and large values print in a form that parses back exactly.
  for (double v : {0.1, 1.0 / 3.0, 9007199254740992.0, 1e300, -2.5e-310, 123456.789}) {
    EXPECT_EQ(std::strtod(fmt(v).c_str(), nullptr), v) << fmt(v);
    EXPECT_EQ(fmt(v).find(' '), std::string::npos);
  }
}

TEST(PromWriter, HistogramIsCumulative) {
  TextWriter w;
  w.family("lat_seconds", "histogram", "Latency.");
  w.histogram("lat_seconds", {{"route", "chat"}}, {0.1, 0.5, 1}, {2, 0, 3}, 1, 4.25);
  EXPECT_EQ(w.str(),
            "# HELP lat_seconds Latency.\n"
            "# TYPE lat_seconds histogram\n"
            "lat_seconds_bucket{route=\"chat\",le=\"0.1\"} 2\n"
            "lat_seconds_bucket{route=\"chat\",le=\"0.5\"} 2\n"
            "lat_seconds_bucket{route=\"chat\",le=\"1\"} 5\n"
            "lat_seconds_bucket{route=\"chat\",le=\"+Inf\"} 6\n"
            "lat_seconds_sum{route=\"chat\"} 4.25\n"
            "lat_seconds_count{route=\"chat\"} 6\n");
}

TEST(PromWriter, HistogramWithoutLabels) {
  TextWriter w;
  w.histogram("h", {}, {}, {}, 0, 0);
  EXPECT_EQ(w.str(), "h_bucket{le=\"+Inf\"} 0\nh_sum 0\nh_count 0\n");
}

TEST(PromWriter, HistogramSizeMismatchThrows) {
  TextWriter w;
  EXPECT_THROW(w.histogram("h", {}, {1, 2}, {1}, 0, 0), std::invalid_argument);
}

TEST(PromRoundTrip, WriterOutputParsesBack) {
  TextWriter w;
  w.family("omni_tokens_total", "counter", "Tokens\nwith \\ odd help");
  w.sample("omni_tokens_total", {{"kind", "prompt"}, {"odd", "x\"y\\z\n,}{="}}, 12345);
  w.sample("omni_ratio", {}, 0.1);
  w.sample("omni_nan", {}, std::numeric_limits<double>::quiet_NaN());
  w.sample("omni_inf", {{"a", ""}}, -std::numeric_limits<double>::infinity());
  w.histogram("omni_lat", {{"u", "1"}}, {0.25, 2.5}, {1, 2}, 3, 7.5);

  std::size_t malformed = 99;
  const std::vector<Sample> samples = parse_text(w.str(), &malformed);
  EXPECT_EQ(malformed, 0u);
  ASSERT_EQ(samples.size(), 4u + 5u);
  EXPECT_EQ(samples[0].name, "omni_tokens_total");
  EXPECT_EQ(samples[0].labels,
            (std::map<std::string, std::string>{{"kind", "prompt"}, {"odd", "x\"y\\z\n,}{="}}));
  EXPECT_EQ(samples[0].value, 12345);
  EXPECT_EQ(find_value(samples, "omni_ratio"), 0.1);
  EXPECT_TRUE(std::isnan(*find_value(samples, "omni_nan")));
  EXPECT_EQ(find_value(samples, "omni_inf", {{"a", ""}}), -std::numeric_limits<double>::infinity());
  EXPECT_EQ(find_value(samples, "omni_lat_bucket", {{"le", "2.5"}}), 3);
  EXPECT_EQ(find_value(samples, "omni_lat_bucket", {{"le", "+Inf"}, {"u", "1"}}), 6);
  EXPECT_EQ(find_value(samples, "omni_lat_sum"), 7.5);
  EXPECT_EQ(find_value(samples, "omni_lat_count"), 6);
}

TEST(PromParse, VllmLines) {
  const std::string text =
      "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
      "# TYPE vllm:cache_config_info gauge\n"
      "vllm:cache_config_info{block_size=\"16\",engine=\"0\",num_gpu_blocks=\"1024\"} 1.0\n"
      "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of tokens.\n"
      "# TYPE vllm:prefix_cache_hits_total counter\n"
      "vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"m\"} 3.0\n"
      "vllm:prefix_cache_hits_created{engine=\"0\",model_name=\"m\"} 1.7180000001234e+09\n"
      "vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 0.0\n";
  std::size_t malformed = 99;
  const std::vector<Sample> samples = parse_text(text, &malformed);
  EXPECT_EQ(malformed, 0u);
  ASSERT_EQ(samples.size(), 4u);
  EXPECT_EQ(samples[0].name, "vllm:cache_config_info");
  EXPECT_EQ(samples[0].labels.at("block_size"), "16");
  EXPECT_EQ(samples[0].labels.at("num_gpu_blocks"), "1024");
  EXPECT_EQ(find_value(samples, "vllm:prefix_cache_hits_total", {{"model_name", "m"}}), 3.0);
  EXPECT_EQ(find_value(samples, "vllm:prefix_cache_hits_created"), 1.7180000001234e+09);
  EXPECT_EQ(find_value(samples, "vllm:num_requests_waiting"), 0.0);
}

TEST(PromParse, TimestampsWhitespaceBlankLinesAndComments) {
  const std::string text =
      "\n"
      "   # a comment with leading blanks\n"
      "#\n"
      "a 1 1700000000000\n"
      "b{x=\"1\"}\t2\t-5\r\n"
      "  c  {  x = \"1\" ,  y=\"2\" , }   3   \n"
      "d{} 4\n"
      "e{x=\"1\"}5\n"
      "f +Inf\n"
      "g -inf\n"
      "h nan\n"
      "i 1e3 # {trace_id=\"abc\"} 1.0\n"
      "\n";
  std::size_t malformed = 99;
  const std::vector<Sample> samples = parse_text(text, &malformed);
  EXPECT_EQ(malformed, 0u);
  ASSERT_EQ(samples.size(), 9u);
  EXPECT_EQ(find_value(samples, "a"), 1);
  EXPECT_EQ(find_value(samples, "b", {{"x", "1"}}), 2);
  EXPECT_EQ(find_value(samples, "c", {{"x", "1"}, {"y", "2"}}), 3);
  EXPECT_EQ(find_value(samples, "d"), 4);
  EXPECT_EQ(find_value(samples, "e"), 5);
  EXPECT_EQ(find_value(samples, "f"), std::numeric_limits<double>::infinity());
  EXPECT_EQ(find_value(samples, "g"), -std::numeric_limits<double>::infinity());
  EXPECT_TRUE(std::isnan(*find_value(samples, "h")));
  EXPECT_EQ(find_value(samples, "i"), 1000);
}

TEST(PromParse, EscapedQuotesAndCommasInLabelValues) {
  const std::vector<Sample> samples =
      parse_text("m{a=\"x,\\\"y\\\",z\",b=\"back\\\\slash\",c=\"new\\nline\"} 1\n");
  ASSERT_EQ(samples.size(), 1u);
  EXPECT_EQ(samples[0].labels.at("a"), "x,\"y\",z");
  EXPECT_EQ(samples[0].labels.at("b"), "back\\slash");
  EXPECT_EQ(samples[0].labels.at("c"), "new\nline");
}

TEST(PromParse, MalformedLinesAreCountedAndSkipped) {
  const std::string text =
      "good 1\n"
      "no_value\n"
      "no_value_braces{a=\"b\"}\n"
      "bad_value abc\n"
      "1starts_with_digit 1\n"
      "unterminated{a=\"b} 1\n"
      "unquoted{a=b} 1\n"
      "no_close{a=\"b\" 1\n"
      "bad_escape{a=\"\\t\"} 1\n"
      "dup{a=\"1\",a=\"2\"} 1\n"
      "bad_ts 1 12x\n"
      "extra 1 2 3\n"
      "also_good{x=\"y\"} 2\n"
      "{a=\"b\"} 1\n";
  std::size_t malformed = 0;
  const std::vector<Sample> samples = parse_text(text, &malformed);
  EXPECT_EQ(malformed, 12u);
  ASSERT_EQ(samples.size(), 2u);
  EXPECT_EQ(samples[0].name, "good");
  EXPECT_EQ(samples[1].name, "also_good");
  EXPECT_EQ(parse_text(text).size(), 2u);  // the counter is optional
}

TEST(PromParse, EmptyInput) {
  std::size_t malformed = 99;
  EXPECT_TRUE(parse_text("", &malformed).empty());
  EXPECT_EQ(malformed, 0u);
}

TEST(PromFindValue, FirstMatchWithAllLabels) {
  const std::vector<Sample> samples =
      parse_text("m{a=\"1\",b=\"x\"} 1\nm{a=\"2\",b=\"x\"} 2\nm{a=\"2\",b=\"y\"} 3\nn 4\n");
  EXPECT_EQ(find_value(samples, "m"), 1);
  EXPECT_EQ(find_value(samples, "m", {{"a", "2"}}), 2);
  EXPECT_EQ(find_value(samples, "m", {{"a", "2"}, {"b", "y"}}), 3);
  EXPECT_EQ(find_value(samples, "m", {{"a", "3"}}), std::nullopt);
  EXPECT_EQ(find_value(samples, "m", {{"c", ""}}), std::nullopt);
  EXPECT_EQ(find_value(samples, "n"), 4);
  EXPECT_EQ(find_value(samples, "missing"), std::nullopt);
}

}  // namespace
}  // namespace omni::prom
