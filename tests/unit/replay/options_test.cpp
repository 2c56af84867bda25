#include "options.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace omni::replay {
namespace {

Options parse(std::vector<const char*> args) {
  args.insert(args.begin(), "omni-bench");
  return parse_options(static_cast<int>(args.size()), args.data());
}

std::string usage_error(std::vector<const char*> args) {
  try {
    parse(std::move(args));
  } catch (const UsageError& e) {
    return e.what();
  }
  return "";
}

TEST(ReplayOptions, Defaults) {
  const auto o = parse({"--trace", "mooncake:x", "--target", "http://127.0.0.1:8000/"});
  EXPECT_EQ(o.target_host, "127.0.0.1");
  EXPECT_EQ(o.target_port, 8000);
  EXPECT_EQ(o.run.host, "127.0.0.1:8000");
  EXPECT_EQ(o.run.max_concurrency, 1024u);
  EXPECT_FALSE(o.run.max_lateness_ms);
  EXPECT_EQ(o.run.late_threshold_ms, 5);
  EXPECT_EQ(o.run.timeout, std::chrono::seconds(600));
  EXPECT_EQ(o.run.model, "omni-sim");
  EXPECT_TRUE(o.run.stream);
  EXPECT_EQ(o.run.prompt_mode, PromptMode::kTokens);
  EXPECT_EQ(o.prompt.token_min, 1000u);
  EXPECT_EQ(o.prompt.vocab, 129280u);
  EXPECT_EQ(o.oracle_block_size, 64u);
  EXPECT_EQ(o.time_scale, 1);
}

TEST(ReplayOptions, ChatIsText) {
  const auto o = parse({"--synthetic", "requests=1,rate=1", "--dry-run", "--api", "chat"});
  EXPECT_EQ(o.run.prompt_mode, PromptMode::kText);
  EXPECT_EQ(usage_error({"--synthetic", "requests=1,rate=1", "--dry-run", "--api", "chat",
                         "--prompt-mode", "tokens"}),
            "--prompt-mode: chat messages are text; --api chat needs --prompt-mode text");
}

TEST(ReplayOptions, BadFlagsNameTheFlag) {
  EXPECT_EQ(usage_error({"--trace", "mooncake:x", "--dry-run", "--speedup", "0"}),
            "--speedup: invalid value \"0\" (expected 1e-06..1e+09)");
  EXPECT_EQ(usage_error({"--trace", "mooncake:x", "--dry-run", "--max-concurrency", "x"}),
            "--max-concurrency: invalid value \"x\" (expected 1..1000000)");
  EXPECT_EQ(usage_error({"--trace", "mooncake:x", "--dry-run", "--limit"}),
            "--limit: missing value");
  EXPECT_EQ(usage_error({"--trace", "mooncake:x", "--bogus"}), "unknown flag --bogus");
  EXPECT_EQ(usage_error({"--trace", "mooncake:x"}), "--target: required (or --dry-run)");
  EXPECT_EQ(usage_error({"--dry-run"}), "--trace or --synthetic: exactly one workload is required");
  EXPECT_EQ(usage_error({"--trace", "mooncake:x", "--target", "https://h:1"}),
            "--target: expected http://HOST:PORT, got \"https://h:1\"");
  EXPECT_EQ(usage_error({"--trace", "mooncake:x", "--target", "http://h:99999"}),
            "--target port: invalid value \"99999\" (expected 1..65535)");
  EXPECT_EQ(usage_error({"--trace", "mooncake:x", "--dry-run", "--token-min", "5", "--vocab", "5"}),
            "--token-min: must be below --vocab (5)");
}

}  // namespace
}  // namespace omni::replay
