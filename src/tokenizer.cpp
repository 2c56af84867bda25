// The tokenizer.json tokenizer (see include/omni/tokenizer.hpp).
//
// The reference is @huggingface/tokenizers 0.2.0 (JavaScript). Its pipeline, reproduced here:
//   1. added tokens that are not "normalized" are cut out of the text (longest match, left to
//      right; lstrip/rstrip trim the JavaScript whitespace of the neighbouring pieces);
//   2. each remaining section is normalized, then the "normalized" added tokens are cut out of
//      it the same way;
//   3. each remaining piece goes through the pre-tokenizer steps and the model (BPE);
//   4. the post-processor adds the template's special tokens.
// Places where the reference differs from the Rust `tokenizers` crate (and we follow the
// reference) are marked "Reference:" below.
//
// Speed: the byte-level BPE works on raw bytes (the vocabulary's byte-level strings are decoded
// to bytes once at load time), merges are a flat (left id, right id) -> (rank, merged id) table,
// results per word are cached in a bounded sharded cache, regexes run on PCRE2's JIT.
#include <omni/tokenizer.hpp>

#include "tokenizer_regex.hpp"
#include "tokenizer_tables.hpp"
#include "unicode_tables.hpp"

#include <nlohmann/json.hpp>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <algorithm>
#include <array>
#include <fstream>
#include <limits>
#include <optional>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

namespace omni {
namespace tokenizer_detail {
namespace {

using json = nlohmann::json;

[[noreturn]] void fail(const std::string& what) { throw TokenizerError(what); }

// ---- JSON helpers ---------------------------------------------------------------------------

const json* member(const json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

bool get_bool(const json& obj, const char* key, bool def, const std::string& where) {
  const json* v = member(obj, key);
  if (!v) return def;
  if (!v->is_boolean()) fail(where + ": \"" + key + "\" must be a boolean");
  return v->get<bool>();
}

std::optional<std::string> get_string(const json& obj, const char* key, const std::string& where) {
  const json* v = member(obj, key);
  if (!v) return std::nullopt;
  if (!v->is_string()) fail(where + ": \"" + key + "\" must be a string");
  return v->get<std::string>();
}

std::string type_of(const json& obj, const std::string& where) {
  if (!obj.is_object()) fail(where + " must be an object");
  const json* t = member(obj, "type");
  if (!t || !t->is_string()) fail(where + " has no \"type\"");
  return t->get<std::string>();
}

// ---- byte-level alphabet --------------------------------------------------------------------

struct ByteLevelAlphabet {
  std::array<char32_t, 256> byte_to_cp{};
  std::array<std::string, 256> byte_to_utf8;
  std::array<std::int16_t, 0x180> cp_to_byte{};  // -1: not a byte-level character

  ByteLevelAlphabet() {
    cp_to_byte.fill(-1);
    std::array<bool, 256> direct{};
    for (int b = '!'; b <= '~'; ++b) direct[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      byte_to_cp[b] = direct[b] ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
    }
    for (int b = 0; b < 256; ++b) {
      unicode::append_utf8(byte_to_utf8[b], byte_to_cp[b]);
      cp_to_byte[byte_to_cp[b]] = static_cast<std::int16_t>(b);
    }
  }

  int byte_of(char32_t cp) const { return cp < cp_to_byte.size() ? cp_to_byte[cp] : -1; }

  // Byte-level string -> bytes; nullopt when a character is not in the alphabet.
  std::optional<std::string> decode(std::string_view s) const {
    std::string out;
    out.reserve(s.size());
    for (std::size_t i = 0; i < s.size();) {
      const int b = byte_of(unicode::next_cp(s, i));
      if (b < 0) return std::nullopt;
      out.push_back(static_cast<char>(b));
    }
    return out;
  }

  std::string encode(std::string_view bytes) const {
    std::string out;
    out.reserve(bytes.size() * 2);
    for (char c : bytes) out += byte_to_utf8[static_cast<unsigned char>(c)];
    return out;
  }
};

const ByteLevelAlphabet& byte_level() {
  static const ByteLevelAlphabet a;
  return a;
}

// ---- small string helpers -------------------------------------------------------------------

std::string replace_all_literal(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  std::size_t pos = 0;
  while (true) {
    const std::size_t hit = s.find(from, pos);
    if (hit == std::string_view::npos) break;
    out.append(s.substr(pos, hit - pos));
    out.append(to);
    pos = hit + from.size();
  }
  out.append(s.substr(pos));
  return out;
}

std::string js_trim(std::string_view s) {
  return std::string(unicode::js_trim_end(unicode::js_trim_start(s)));
}

// The reference's clean_up_tokenization.
std::string clean_up_tokenization(std::string text) {
  static constexpr std::pair<std::string_view, std::string_view> kRules[] = {
      {" .", "."},    {" ?", "?"},    {" !", "!"},      {" ,", ","},      {" ' ", "'"},
      {" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"},
  };
  for (const auto& [from, to] : kRules) {
    if (text.find(from) != std::string::npos) text = replace_all_literal(text, from, to);
  }
  return text;
}

std::size_t utf16_length(std::string_view s) {
  std::size_t n = 0;
  for (std::size_t i = 0; i < s.size();) n += unicode::next_cp(s, i) >= 0x10000 ? 2 : 1;
  return n;
}

// String.prototype.toLowerCase (ICU, no locale): the simple mappings, U+0130 -> "i\u0307", and
// capital sigma -> final sigma when a cased letter precedes it and none follows (skipping
// case-ignorable characters both ways; a character that is both counts as ignorable, as ICU
// does).
std::string js_to_lower(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  std::size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<unsigned char>(s[i]);
    if (b < 0x80) {
      out.push_back(static_cast<char>(b >= 'A' && b <= 'Z' ? b + 32 : b));
      ++i;
      continue;
    }
    const std::size_t start = i;
    const char32_t cp = unicode::next_cp(s, i);
    if (cp == 0x130) {
      out += "i\u0307";
    } else if (cp == 0x3A3) {
      static const Regex cased("^\\p{Cased}"), ignorable("^\\p{Case_Ignorable}");
      MatchScratch& scratch = MatchScratch::local();
      auto kind = [&](std::size_t at, std::size_t len) {  // 2 ignorable, 1 cased, 0 neither
        const std::string_view c = s.substr(at, len);
        Span m{};
        if (ignorable.find(c, 0, scratch, nullptr, m)) return 2;
        return cased.find(c, 0, scratch, nullptr, m) ? 1 : 0;
      };
      bool before = false;
      for (std::size_t j = start; j > 0;) {
        std::size_t k = j - 1;
        while (k > 0 && (static_cast<unsigned char>(s[k]) & 0xC0) == 0x80) --k;
        const int t = kind(k, j - k);
        j = k;
        if (t == 2) continue;
        before = t == 1;
        break;
      }
      bool after = false;
      for (std::size_t j = i; j < s.size();) {
        const std::size_t len = unicode::cp_len(static_cast<unsigned char>(s[j]));
        const int t = kind(j, len);
        j += len;
        if (t == 2) continue;
        after = t == 1;
        break;
      }
      unicode::append_utf8(out, before && !after ? 0x3C2 : 0x3C3);
    } else {
      unicode::append_utf8(out, unicode::simple_lower(cp));
    }
  }
  return out;
}

// Pattern of a Split/Replace (the reference's create_pattern).
std::string create_pattern(const json& pattern, bool invert, const std::string& where) {
  if (const json* re = member(pattern, "Regex")) {
    if (!re->is_string()) fail(where + ": pattern.Regex must be a string");
    return rewrite_oniguruma_to_js(re->get<std::string>());
  }
  if (const json* str = member(pattern, "String")) {
    if (!str->is_string()) fail(where + ": pattern.String must be a string");
    const std::string escaped = escape_reg_exp(str->get<std::string>());
    return invert ? escaped : "(" + escaped + ")";
  }
  fail(where + ": unsupported pattern (neither \"Regex\" nor \"String\")");
}

// ---- components -----------------------------------------------------------------------------

struct NormStep {
  enum class Kind { kUnicode, kReplace, kStrip, kPrepend, kStripAccents, kLowercase, kPrecompiled };
  Kind kind;
  unicode::NormForm form = unicode::NormForm::kNFC;
  std::shared_ptr<Regex> re;
  std::shared_ptr<Regex> re2;
  std::string content;
  bool left = false, right = false;
};

struct PreTokStep {
  enum class Kind { kMatches, kIsolated, kRemoved, kByteLevel, kMetaspace, kReplace };
  Kind kind;
  std::shared_ptr<Regex> re;
  bool trim = false;              // BertPreTokenizer trims first
  bool add_prefix_space = false;  // ByteLevel
  bool use_regex = true;          // ByteLevel
  std::string replacement;        // Metaspace
  std::string str_rep;            // Metaspace
  enum class Prepend { kAlways, kFirst, kNever } prepend = Prepend::kAlways;
  std::string content;            // Replace
};

struct PostStep {
  enum class Kind { kTemplate, kCls, kByteLevel };
  Kind kind;
  std::vector<std::int64_t> items;  // kTemplate: -1 = the sequence, else a token id
  TokenId cls = 0, sep = 0;
};

struct DecoderNode {
  enum class Kind {
    kByteLevel, kByteFallback, kFuse, kStrip, kReplace, kMetaspace, kSequence, kBPE, kWordPiece
  };
  Kind kind;
  std::vector<DecoderNode> children;
  std::shared_ptr<Regex> re;
  std::string content;  // Replace content, Strip content, Metaspace replacement, BPE suffix,
                        // WordPiece prefix
  std::size_t start = 0, stop = 0;
  bool cleanup = false;
  bool passes_added_tokens = false;  // only the top-level decoder sees the added tokens
};

constexpr std::uint32_t kNoSym = std::numeric_limits<std::uint32_t>::max();
constexpr TokenId kNotInVocab = std::numeric_limits<TokenId>::max();  // sym_out_ of a non-token

}  // namespace

// =============================================================================================

class TokenizerImpl final : public Tokenizer {
 public:
  TokenizerImpl(std::string_view tokenizer_json, std::string_view config_json);

  std::vector<TokenId> encode(std::string_view text, bool add_special_tokens) const override;
  std::string decode(std::span<const TokenId> ids, bool skip_special_tokens) const override;
  std::optional<TokenId> token_to_id(std::string_view token) const override;
  std::optional<std::string> id_to_token(TokenId id) const override;
  std::size_t vocab_size() const override { return id_off_.empty() ? 0 : id_off_.size() - 1; }
  const TokenizerConfigInfo& config() const override { return info_; }
  std::size_t memory_bytes() const override;

 private:
  struct AddedToken {
    std::string content;
    TokenId id = 0;
    bool lstrip = false, rstrip = false, special = false, normalized = false;
  };
  struct EncodeState {
    std::vector<TokenId>& out;
    MatchScratch& scratch;
    bool last_was_unk = false;  // fuse_unk within one model call
  };
  struct TransparentHash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const { return hash_bytes(s); }
  };

  // load
  void load_config(const json& cfg);
  void load_added_tokens(const json& tj);
  void parse_normalizer(const json& n, const std::string& where);
  void parse_pre_tokenizer(const json& p, const std::string& where);
  void parse_model(const json& m);
  void parse_post_processor(const json& p, const std::string& where);
  DecoderNode parse_decoder(const json& d, const std::string& where, bool top);
  void finish_load();
  std::optional<TokenId> final_lookup(std::string_view token) const;
  TokenId required_token(const std::string& token, const std::string& where) const;

  // encode
  const AddedToken* added_of(std::string_view s) const;
  void split_added(std::string_view text, const TokenTrie& trie,
                   std::vector<std::string_view>& pieces) const;
  void strip_around_added(std::vector<std::string_view>& pieces) const;
  bool normalize(std::string_view in, std::string& out) const;
  void pre_tokenize(std::size_t step, std::string_view piece, bool bl_view,
                    std::size_t section_index, EncodeState& st) const;
  template <typename Emit>
  static void split(const PreTokStep& s, std::string_view text, MatchScratch& scratch,
                    Emit&& emit);
  void model(std::string_view piece, EncodeState& st) const;
  void bpe(std::string_view word, std::vector<TokenId>& out) const;
  void emit_symbol(std::uint32_t sym, std::string_view word, std::size_t begin, std::size_t end,
                   std::vector<TokenId>& out) const;
  void emit_model_id(TokenId id, EncodeState& st) const;

  // decode
  std::vector<std::string> decode_chain(const DecoderNode& d,
                                        std::vector<std::string> tokens) const;
  std::string_view token_text(TokenId id) const {
    return std::string_view(id_arena_).substr(id_off_[id], id_off_[id + 1] - id_off_[id]);
  }

  TokenizerConfigInfo info_;
  bool cleanup_spaces_ = true;
  bool remove_space_ = false;
  bool lowercase_and_remove_accent_ = false;
  std::unique_ptr<Regex> marks_;  // \p{M}, for do_lowercase_and_remove_accent

  // added tokens
  std::vector<AddedToken> added_;
  std::unordered_map<std::string, std::uint32_t, TransparentHash, std::equal_to<>> added_map_;
  std::size_t added_map_max_len_ = 0;
  TokenTrie unnormalized_trie_, normalized_trie_;
  std::unordered_set<std::string> special_strings_;  // for skip_special_tokens

  // normalizer
  bool has_normalizer_ = false;
  std::vector<NormStep> norm_;

  // pre-tokenizer
  std::vector<PreTokStep> pre_;
  bool byte_level_input_ = false;  // the model sees byte-level strings (we keep raw bytes)

  // model (BPE)
  StringMap tok_to_id_;  // the reference's model.tokens_to_ids (vocabulary + added tokens)
  StringMap sym_map_;    // model key (raw bytes in byte-level mode) -> symbol
  std::vector<std::uint8_t> sym_in_vocab_;  // load time only
  std::vector<TokenId> sym_out_;             // output id of a symbol, kNotInVocab if none
  MergeMap merges_;
  std::array<std::uint32_t, 256> byte_sym_{};
  bool ignore_merges_ = false, byte_fallback_ = false, fuse_unk_ = false;
  std::optional<std::string> unk_token_;
  std::optional<TokenId> unk_model_id_;  // vocabulary id of unk_token (the fallback id)
  std::optional<TokenId> unk_emit_id_;   // the id a <unk> produced by the model maps to
  std::string end_of_word_suffix_;
  std::array<std::int64_t, 256> fallback_ids_{};
  mutable WordCache cache_;

  // ids -> tokens
  std::string id_arena_;
  std::vector<std::uint32_t> id_off_;  // size max id + 2
  std::vector<std::uint8_t> id_flags_;
  static constexpr std::uint8_t kPresent = 1, kSpecial = 2, kAddedContent = 4;
  std::string id_bytes_arena_;          // byte-level decoding of each id (fast decode path)
  std::vector<std::uint32_t> id_bytes_off_;

  // load-time only: the vocabulary's strings (views into the parsed JSON)
  std::vector<std::pair<TokenId, std::string_view>> vocab_texts_;

  // post-processor and decoder
  std::vector<PostStep> post_;
  std::optional<DecoderNode> decoder_;
};

// ---- loading --------------------------------------------------------------------------------

TokenizerImpl::TokenizerImpl(std::string_view tokenizer_json, std::string_view config_json) {
  json tj, cfg;
  try {
    tj = json::parse(tokenizer_json);
  } catch (const json::exception& e) {
    fail(std::string("tokenizer.json: invalid JSON: ") + e.what());
  }
  if (!tj.is_object()) fail("tokenizer.json: not a JSON object");
  if (!config_json.empty()) {
    try {
      cfg = json::parse(config_json);
    } catch (const json::exception& e) {
      fail(std::string("tokenizer_config.json: invalid JSON: ") + e.what());
    }
    if (!cfg.is_object()) fail("tokenizer_config.json: not a JSON object");
  } else {
    cfg = json::object();
  }
  load_config(cfg);
  if (lowercase_and_remove_accent_) marks_ = std::make_unique<Regex>("\\p{M}");

  // "truncation" and "padding" are ignored, as the reference ignores them: encode() returns
  // every id.
  if (const json* n = member(tj, "normalizer")) parse_normalizer(*n, "normalizer");
  has_normalizer_ = member(tj, "normalizer") != nullptr;
  if (const json* p = member(tj, "pre_tokenizer")) parse_pre_tokenizer(*p, "pre_tokenizer");
  // A final ByteLevel without prefix space or regex changes nothing in our raw-byte form.
  while (!pre_.empty() && pre_.back().kind == PreTokStep::Kind::kByteLevel &&
         !pre_.back().add_prefix_space && !pre_.back().use_regex) {
    pre_.pop_back();
  }
  const json* m = member(tj, "model");
  if (!m) fail("tokenizer.json: no \"model\"");
  parse_model(*m);
  load_added_tokens(tj);
  if (const json* p = member(tj, "post_processor")) parse_post_processor(*p, "post_processor");
  if (const json* d = member(tj, "decoder")) decoder_ = parse_decoder(*d, "decoder", true);
  finish_load();
}

void TokenizerImpl::load_config(const json& cfg) {
  auto token_value = [&](const char* key) -> std::string {
    const json* v = member(cfg, key);
    if (!v) return {};
    if (v->is_string()) return v->get<std::string>();
    if (v->is_object()) {
      if (const json* c = member(*v, "content"); c && c->is_string()) return c->get<std::string>();
    }
    return {};
  };
  info_.bos_token = token_value("bos_token");
  info_.eos_token = token_value("eos_token");
  info_.pad_token = token_value("pad_token");
  info_.unk_token = token_value("unk_token");
  if (auto c = member(cfg, "tokenizer_class"); c && c->is_string()) {
    info_.tokenizer_class = c->get<std::string>();
  }
  if (const json* ct = member(cfg, "chat_template")) {
    if (ct->is_string()) {
      info_.chat_template = ct->get<std::string>();
    } else if (ct->is_array()) {
      for (const json& t : *ct) {
        const json* name = member(t, "name");
        const json* tmpl = member(t, "template");
        if (!name || !tmpl || !name->is_string() || !tmpl->is_string()) {
          fail("tokenizer_config.json: chat_template entries must be {\"name\", \"template\"}");
        }
        info_.named_templates.emplace_back(name->get<std::string>(), tmpl->get<std::string>());
        if (name->get<std::string>() == "default") info_.chat_template = tmpl->get<std::string>();
      }
    } else {
      fail("tokenizer_config.json: chat_template must be a string or a list");
    }
  }
  const std::string where = "tokenizer_config.json";
  cleanup_spaces_ = get_bool(cfg, "clean_up_tokenization_spaces", true, where);
  remove_space_ = get_bool(cfg, "remove_space", false, where);
  lowercase_and_remove_accent_ = get_bool(cfg, "do_lowercase_and_remove_accent", false, where);
  if (const json* extra = member(cfg, "additional_special_tokens")) {
    if (extra->is_array()) {
      // Reference: only plain strings take part in skip_special_tokens.
      for (const json& t : *extra) {
        if (t.is_string()) special_strings_.insert(t.get<std::string>());
      }
    }
  }
}

void TokenizerImpl::parse_normalizer(const json& n, const std::string& where) {
  const std::string type = type_of(n, where);
  NormStep step{};
  if (type == "Sequence") {
    const json* list = member(n, "normalizers");
    if (list) {
      if (!list->is_array()) fail(where + ": \"normalizers\" must be a list");
      for (std::size_t i = 0; i < list->size(); ++i) {
        if ((*list)[i].is_null()) continue;  // the reference skips null entries
        parse_normalizer((*list)[i], where + ".normalizers[" + std::to_string(i) + "]");
      }
    }
    return;
  }
  if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
    step.kind = NormStep::Kind::kUnicode;
    unicode::prepare_normalization();
    step.form = type == "NFC"    ? unicode::NormForm::kNFC
                : type == "NFD"  ? unicode::NormForm::kNFD
                : type == "NFKC" ? unicode::NormForm::kNFKC
                                 : unicode::NormForm::kNFKD;
  } else if (type == "Replace") {
    step.kind = NormStep::Kind::kReplace;
    const json* pattern = member(n, "pattern");
    if (!pattern) fail(where + ": Replace without a pattern");
    step.re = std::make_shared<Regex>(create_pattern(*pattern, true, where));
    step.content = get_string(n, "content", where).value_or("");
    if (step.content.find("$<") != std::string::npos) {
      fail(where + ": Replace content with \"$<\" is not supported");
    }
  } else if (type == "Strip") {
    step.kind = NormStep::Kind::kStrip;
    step.left = get_bool(n, "strip_left", false, where);
    step.right = get_bool(n, "strip_right", false, where);
  } else if (type == "Prepend") {
    step.kind = NormStep::Kind::kPrepend;
    const json* p = member(n, "prepend");
    if (!p || !p->is_string()) fail(where + ": Prepend needs a string \"prepend\"");
    step.content = p->get<std::string>();
  } else if (type == "StripAccents") {
    step.kind = NormStep::Kind::kStripAccents;
    step.re = std::make_shared<Regex>("\\p{M}");
  } else if (type == "Lowercase") {
    step.kind = NormStep::Kind::kLowercase;
  } else if (type == "Precompiled") {
    // Reference: the precompiled_charsmap is not used; controls are removed, a fixed set of
    // spaces becomes " ", then NFKC (around any U+FF5E). The Rust crate applies the charsmap.
    step.kind = NormStep::Kind::kPrecompiled;
    unicode::prepare_normalization();
    step.re = std::make_shared<Regex>(
        "[\\u0001-\\u0008\\u000B\\u000E-\\u001F\\u007F\\u008F\\u009F]");
    step.re2 = std::make_shared<Regex>(
        "[\\u0009\\u000A\\u000C\\u000D\\u00A0\\u1680\\u2000-\\u200F\\u2028\\u2029\\u202F"
        "\\u205F\\u2581\\u3000\\uFEFF\\uFFFD]");
  } else {
    fail("tokenizer.json: " + where + ": normalizer type \"" + type + "\" is not supported");
  }
  norm_.push_back(std::move(step));
}

void TokenizerImpl::parse_pre_tokenizer(const json& p, const std::string& where) {
  const std::string type = type_of(p, where);
  PreTokStep step{};
  if (type == "Sequence") {
    const json* list = member(p, "pretokenizers");
    if (list) {
      if (!list->is_array()) fail(where + ": \"pretokenizers\" must be a list");
      for (std::size_t i = 0; i < list->size(); ++i) {
        if ((*list)[i].is_null()) continue;  // the reference skips null entries
        parse_pre_tokenizer((*list)[i], where + ".pretokenizers[" + std::to_string(i) + "]");
      }
    }
    return;
  }
  const bool after_byte_level = byte_level_input_;
  if (type == "Split") {
    const json* pattern = member(p, "pattern");
    if (!pattern) fail(where + ": Split without a pattern");
    // Reference: create_pattern(pattern, invert ?? true) -- a String pattern becomes a capture
    // group when invert is false, which matters to the "Removed" split below.
    const json* inv = member(p, "invert");
    if (inv && !inv->is_boolean()) fail(where + ": \"invert\" must be a boolean");
    const bool invert = inv ? inv->get<bool>() : false;
    step.re = std::make_shared<Regex>(create_pattern(*pattern, inv ? invert : true, where));
    const std::string behavior = get_string(p, "behavior", where).value_or("Isolated");
    static const char* const kBehaviors[] = {"Removed", "Isolated", "MergedWithPrevious",
                                             "MergedWithNext", "Contiguous"};
    if (std::find(std::begin(kBehaviors), std::end(kBehaviors), behavior) == std::end(kBehaviors)) {
      fail("tokenizer.json: " + where + ": Split behavior \"" + behavior + "\" is not supported");
    }
    if (invert) {
      step.kind = PreTokStep::Kind::kMatches;
    } else if (behavior == "Removed") {
      step.kind = PreTokStep::Kind::kRemoved;
    } else {
      // Reference: every behavior other than Removed splits like Isolated (the Rust crate
      // merges the delimiter into the previous/next piece for MergedWith*/Contiguous).
      step.kind = PreTokStep::Kind::kIsolated;
    }
  } else if (type == "ByteLevel") {
    if (byte_level_input_) fail("tokenizer.json: " + where + ": a second ByteLevel pre-tokenizer");
    step.kind = PreTokStep::Kind::kByteLevel;
    step.add_prefix_space = get_bool(p, "add_prefix_space", false, where);
    step.use_regex = get_bool(p, "use_regex", true, where);
    if (step.use_regex) {
      // The reference's own JavaScript GPT-2 pattern (JavaScript \s: includes U+FEFF, not U+0085).
      step.re = std::make_shared<Regex>(
          "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+");
    }
    byte_level_input_ = true;
  } else if (type == "Digits") {
    step.kind = PreTokStep::Kind::kMatches;
    // JavaScript \d is ASCII 0-9 only.
    step.re = std::make_shared<Regex>(get_bool(p, "individual_digits", false, where)
                                          ? "[^\\d]+|\\d"
                                          : "[^\\d]+|\\d+");
  } else if (type == "Whitespace") {
    step.kind = PreTokStep::Kind::kMatches;
    step.re = std::make_shared<Regex>("\\w+|[^\\w\\s]+");
  } else if (type == "WhitespaceSplit") {
    step.kind = PreTokStep::Kind::kMatches;
    step.re = std::make_shared<Regex>("\\S+");
  } else if (type == "Punctuation" || type == "BertPreTokenizer") {
    static const std::string kPunct =
        "\\p{P}\\u0021-\\u002F\\u003A-\\u0040\\u005B-\\u0060\\u007B-\\u007E";
    step.kind = PreTokStep::Kind::kMatches;
    if (type == "Punctuation") {
      step.re = std::make_shared<Regex>("[^" + kPunct + "]+|[" + kPunct + "]+");
    } else {
      step.trim = true;
      step.re = std::make_shared<Regex>("[^\\s" + kPunct + "]+|[" + kPunct + "]");
    }
  } else if (type == "Metaspace") {
    step.kind = PreTokStep::Kind::kMetaspace;
    step.replacement = get_string(p, "replacement", where).value_or("\u2581");
    const std::string str_rep = get_string(p, "str_rep", where).value_or("");
    step.str_rep = str_rep.empty() ? step.replacement : str_rep;
    const std::string scheme = get_string(p, "prepend_scheme", where).value_or("always");
    if (scheme == "always") {
      step.prepend = PreTokStep::Prepend::kAlways;
    } else if (scheme == "first") {
      step.prepend = PreTokStep::Prepend::kFirst;
    } else if (scheme == "never") {
      step.prepend = PreTokStep::Prepend::kNever;
    } else {
      fail("tokenizer.json: " + where + ": Metaspace prepend_scheme \"" + scheme +
           "\" is not supported");
    }
    // Reference: Metaspace never splits on the replacement character (the Rust crate does when
    // "split" is true).
  } else if (type == "Replace") {
    step.kind = PreTokStep::Kind::kReplace;
    const json* pattern = member(p, "pattern");
    if (!pattern) fail(where + ": Replace without a pattern");
    step.re = std::make_shared<Regex>(create_pattern(*pattern, true, where));
    step.content = get_string(p, "content", where).value_or("");
    if (step.content.find("$<") != std::string::npos) {
      fail(where + ": Replace content with \"$<\" is not supported");
    }
  } else {
    fail("tokenizer.json: " + where + ": pre-tokenizer type \"" + type + "\" is not supported");
  }
  if (after_byte_level && step.kind != PreTokStep::Kind::kMatches &&
      step.kind != PreTokStep::Kind::kIsolated && step.kind != PreTokStep::Kind::kRemoved) {
    fail("tokenizer.json: " + where + ": pre-tokenizer \"" + type +
         "\" after ByteLevel is not supported");
  }
  pre_.push_back(std::move(step));
}

void TokenizerImpl::parse_model(const json& m) {
  std::string type;
  if (const json* t = member(m, "type")) {
    if (!t->is_string()) fail("tokenizer.json: model.type must be a string");
    type = t->get<std::string>();
  } else if (member(m, "merges") && m.contains("continuing_subword_prefix") &&
             m.contains("unk_token")) {
    type = "BPE";  // the reference's guess for a model without a type
  }
  if (type != "BPE") {
    fail("tokenizer.json: model type \"" + (type.empty() ? std::string("(none)") : type) +
         "\" is not supported (only BPE)");
  }
  const std::string where = "tokenizer.json: model";
  if (member(m, "dropout")) fail(where + ": BPE dropout is not supported (must be null)");
  if (auto p = get_string(m, "continuing_subword_prefix", where); p && !p->empty()) {
    // Reference: ignores continuing_subword_prefix (the Rust crate applies it); rather than
    // produce ids that differ from one of the two, refuse.
    fail(where + ": BPE continuing_subword_prefix \"" + *p + "\" is not supported");
  }
  if (auto p = get_string(m, "continuing_subword_suffix", where); p && !p->empty()) {
    fail(where + ": BPE continuing_subword_suffix is not supported");
  }
  end_of_word_suffix_ = get_string(m, "end_of_word_suffix", where).value_or("");
  ignore_merges_ = get_bool(m, "ignore_merges", false, where);
  byte_fallback_ = get_bool(m, "byte_fallback", false, where);
  fuse_unk_ = get_bool(m, "fuse_unk", false, where);
  unk_token_ = get_string(m, "unk_token", where);

  const json* vocab = member(m, "vocab");
  if (!vocab || !vocab->is_object()) fail(where + ": BPE vocab must be an object");
  const ByteLevelAlphabet& bl = byte_level();
  tok_to_id_.reserve(vocab->size() + 1024);
  sym_map_.reserve(vocab->size() + 1024);
  auto add_sym = [&](std::string_view key, bool in_vocab) -> std::uint32_t {
    auto [v, inserted] = sym_map_.insert(key, static_cast<std::uint32_t>(sym_in_vocab_.size()));
    if (inserted) {
      sym_in_vocab_.push_back(in_vocab ? 1 : 0);
      sym_out_.push_back(0);
    } else if (in_vocab) {
      sym_in_vocab_[*v] = 1;
    }
    return *v;
  };
  auto model_key = [&](std::string_view token) -> std::optional<std::string> {
    if (byte_level_input_) return bl.decode(token);
    return std::string(token);
  };
  TokenId max_id = 0;
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    if (!it.value().is_number_integer()) fail(where + ": vocab ids must be integers");
    const auto id = it.value().get<std::int64_t>();
    if (id < 0 || id > 16'000'000) fail(where + ": vocab id out of range");
    auto [v, inserted] = tok_to_id_.insert(it.key(), static_cast<TokenId>(id));
    if (!inserted) *v = static_cast<TokenId>(id);
    max_id = std::max(max_id, static_cast<TokenId>(id));
    if (auto key = model_key(it.key())) add_sym(*key, true);
    vocab_texts_.emplace_back(static_cast<TokenId>(id), std::string_view(it.key()));
  }
  if (unk_token_) {
    if (const std::uint32_t* v = tok_to_id_.find(*unk_token_)) unk_model_id_ = *v;
  }

  // Merges: "a b" strings or ["a", "b"] pairs (the first entry decides, as in the reference);
  // a later duplicate overrides the rank of an earlier one (a JavaScript Map).
  const json* merges = member(m, "merges");
  if (!merges || !merges->is_array()) fail(where + ": BPE merges must be a list");
  merges_.reserve(merges->size());
  const bool pairs = !merges->empty() && (*merges)[0].is_array();
  std::uint32_t rank = 0;
  for (const json& mg : *merges) {
    const std::uint32_t r = rank++;
    std::string_view a, b;
    std::string sa, sb;
    if (pairs) {
      if (!mg.is_array() || mg.size() != 2 || !mg[0].is_string() || !mg[1].is_string()) continue;
      sa = mg[0].get<std::string>();
      sb = mg[1].get<std::string>();
    } else {
      if (!mg.is_string()) fail(where + ": merges mix strings and other values");
      const std::string& s = mg.get_ref<const std::string&>();
      // x.split(" ", 2): up to the second space.
      const std::size_t sp = s.find(' ');
      if (sp == std::string::npos) continue;
      const std::size_t sp2 = s.find(' ', sp + 1);
      sa = s.substr(0, sp);
      sb = s.substr(sp + 1, sp2 == std::string::npos ? std::string::npos : sp2 - sp - 1);
    }
    if (sa.empty() || sb.empty()) continue;  // an empty piece never occurs in a word
    auto ka = model_key(sa), kb = model_key(sb);
    if (!ka || !kb) continue;  // not byte-level characters: can never apply
    const std::uint32_t left = add_sym(*ka, false);
    const std::uint32_t right = add_sym(*kb, false);
    const std::uint32_t merged = add_sym(*ka + *kb, false);
    merges_.set(left, right, {r, merged});
  }
  if (byte_level_input_) {
    for (int b = 0; b < 256; ++b) {
      const char c = static_cast<char>(b);
      byte_sym_[b] = add_sym(std::string_view(&c, 1), false);
    }
  }
  id_off_.assign(static_cast<std::size_t>(max_id) + 2, 0);
}

void TokenizerImpl::load_added_tokens(const json& tj) {
  const json* list = member(tj, "added_tokens");
  if (list && !list->is_array()) fail("tokenizer.json: added_tokens must be a list");
  std::vector<std::string> unnormalized, normalized;
  if (list) {
    for (const json& t : *list) {
      const std::string where = "tokenizer.json: added_tokens";
      AddedToken a;
      const json* content = member(t, "content");
      const json* id = member(t, "id");
      if (!content || !content->is_string() || !id || !id->is_number_integer()) {
        fail(where + ": every entry needs a string content and an integer id");
      }
      a.content = content->get<std::string>();
      const auto raw_id = id->get<std::int64_t>();
      if (raw_id < 0 || raw_id > 16'000'000) fail(where + ": id out of range");
      a.id = static_cast<TokenId>(raw_id);
      // Reference: single_word is not implemented (ignored); lstrip/rstrip trim the
      // neighbouring pieces' JavaScript whitespace.
      a.lstrip = get_bool(t, "lstrip", false, where);
      a.rstrip = get_bool(t, "rstrip", false, where);
      a.special = get_bool(t, "special", false, where);
      a.normalized = get_bool(t, "normalized", !a.special, where);
      added_.push_back(a);
    }
  }
  for (std::uint32_t k = 0; k < added_.size(); ++k) {
    AddedToken& a = added_[k];
    // model.tokens_to_ids.set(content, id); model.vocab[id] = content
    auto [v, inserted] = tok_to_id_.insert(a.content, a.id);
    if (!inserted) *v = a.id;
    if (a.id + 2 > id_off_.size()) id_off_.resize(a.id + 2, 0);
    if (a.special) special_strings_.insert(a.content);
    added_map_[a.content] = k;
    if (a.normalized && has_normalizer_) {
      std::string norm;
      const std::string n = normalize(a.content, norm) ? norm : a.content;
      normalized.push_back(n);
      added_map_[n] = k;
    } else {
      unnormalized.push_back(a.content);
    }
    // The model sees the content as one of its token strings too.
    std::optional<std::string> key;
    if (byte_level_input_) {
      key = byte_level().decode(a.content);
    } else {
      key = a.content;
    }
    if (key) {
      auto [sv, sins] = sym_map_.insert(*key, static_cast<std::uint32_t>(sym_in_vocab_.size()));
      if (sins) {
        sym_in_vocab_.push_back(1);
        sym_out_.push_back(0);
      } else {
        sym_in_vocab_[*sv] = 1;
      }
    }
  }
  for (const auto& [k, v] : added_map_) added_map_max_len_ = std::max(added_map_max_len_, k.size());
  unnormalized_trie_.build(unnormalized);
  normalized_trie_.build(normalized);
}

std::optional<TokenId> TokenizerImpl::final_lookup(std::string_view token) const {
  if (auto it = added_map_.find(token); it != added_map_.end()) return added_[it->second].id;
  if (const std::uint32_t* v = tok_to_id_.find(token)) return *v;
  return unk_model_id_;
}

TokenId TokenizerImpl::required_token(const std::string& token, const std::string& where) const {
  auto id = final_lookup(token);
  if (!id) fail("tokenizer.json: " + where + ": token \"" + token + "\" is not in the vocabulary");
  return *id;
}

void TokenizerImpl::parse_post_processor(const json& p, const std::string& where) {
  const std::string type = type_of(p, where);
  PostStep step{};
  if (type == "Sequence") {
    const json* list = member(p, "processors");
    if (list) {
      if (!list->is_array()) fail(where + ": \"processors\" must be a list");
      for (std::size_t i = 0; i < list->size(); ++i) {
        parse_post_processor((*list)[i], where + ".processors[" + std::to_string(i) + "]");
      }
    }
    return;
  }
  if (type == "ByteLevel") {
    step.kind = PostStep::Kind::kByteLevel;
  } else if (type == "TemplateProcessing") {
    step.kind = PostStep::Kind::kTemplate;
    const json* single = member(p, "single");
    if (!single || !single->is_array()) fail(where + ": TemplateProcessing needs \"single\"");
    // "pair" is accepted but never used: encode() takes one sequence.
    for (const json& item : *single) {
      if (const json* sp = member(item, "SpecialToken")) {
        const json* id = member(*sp, "id");
        if (!id || !id->is_string()) fail(where + ": SpecialToken without a string id");
        // Reference: the token string is looked up (not special_tokens[..].ids).
        step.items.push_back(required_token(id->get<std::string>(), where));
      } else if (const json* seq = member(item, "Sequence")) {
        const json* id = member(*seq, "id");
        if (!id || !id->is_string() || id->get<std::string>() != "A") {
          fail(where + ": the single template may only contain sequence A");
        }
        step.items.push_back(-1);
      } else {
        fail(where + ": unknown template item");
      }
    }
  } else if (type == "BertProcessing" || type == "RobertaProcessing") {
    step.kind = PostStep::Kind::kCls;
    const json* cls = member(p, "cls");
    const json* sep = member(p, "sep");
    if (!cls || !sep || !cls->is_array() || !sep->is_array() || cls->empty() || sep->empty() ||
        !(*cls)[0].is_string() || !(*sep)[0].is_string()) {
      fail(where + ": " + type + " needs cls and sep");
    }
    step.cls = required_token((*cls)[0].get<std::string>(), where);
    step.sep = required_token((*sep)[0].get<std::string>(), where);
  } else {
    fail("tokenizer.json: " + where + ": post-processor type \"" + type + "\" is not supported");
  }
  post_.push_back(std::move(step));
}

DecoderNode TokenizerImpl::parse_decoder(const json& d, const std::string& where, bool top) {
  const std::string type = type_of(d, where);
  DecoderNode node{};
  node.passes_added_tokens = top;
  if (type == "ByteLevel") {
    node.kind = DecoderNode::Kind::kByteLevel;
  } else if (type == "ByteFallback") {
    node.kind = DecoderNode::Kind::kByteFallback;
  } else if (type == "Fuse") {
    node.kind = DecoderNode::Kind::kFuse;
  } else if (type == "Strip") {
    node.kind = DecoderNode::Kind::kStrip;
    node.content = get_string(d, "content", where).value_or("");
    auto count = [&](const char* key) -> std::size_t {
      const json* v = member(d, key);
      if (!v) return 0;
      if (!v->is_number_integer() || v->get<std::int64_t>() < 0) {
        fail(where + ": \"" + key + "\" must be a non-negative integer");
      }
      return static_cast<std::size_t>(v->get<std::int64_t>());
    };
    node.start = count("start");
    node.stop = count("stop");
  } else if (type == "Replace") {
    node.kind = DecoderNode::Kind::kReplace;
    const json* pattern = member(d, "pattern");
    if (!pattern) fail(where + ": Replace without a pattern");
    node.re = std::make_shared<Regex>(create_pattern(*pattern, true, where));
    node.content = get_string(d, "content", where).value_or("");
    if (node.content.find("$<") != std::string::npos) {
      fail(where + ": Replace content with \"$<\" is not supported");
    }
  } else if (type == "Metaspace") {
    node.kind = DecoderNode::Kind::kMetaspace;
    node.content = get_string(d, "replacement", where).value_or("\u2581");
  } else if (type == "BPEDecoder") {
    node.kind = DecoderNode::Kind::kBPE;
    node.content = get_string(d, "suffix", where).value_or("");
    if (node.content.empty()) fail(where + ": BPEDecoder with an empty suffix is not supported");
  } else if (type == "WordPiece") {
    node.kind = DecoderNode::Kind::kWordPiece;
    node.content = get_string(d, "prefix", where).value_or("");
    node.cleanup = get_bool(d, "cleanup", false, where);
  } else if (type == "Sequence") {
    node.kind = DecoderNode::Kind::kSequence;
    const json* list = member(d, "decoders");
    if (list) {
      if (!list->is_array()) fail(where + ": \"decoders\" must be a list");
      for (std::size_t i = 0; i < list->size(); ++i) {
        node.children.push_back(
            parse_decoder((*list)[i], where + ".decoders[" + std::to_string(i) + "]", false));
      }
    }
  } else {
    fail("tokenizer.json: " + where + ": decoder type \"" + type + "\" is not supported");
  }
  return node;
}

void TokenizerImpl::finish_load() {
  // ids -> token strings: the vocabulary, then the added tokens over it.
  const std::size_t n_ids = id_off_.size() - 1;
  std::vector<std::string_view> text(n_ids);
  std::vector<bool> present(n_ids, false);
  // model.vocab: the vocabulary (a later string with the same id wins), then the added tokens.
  for (const auto& [id, t] : vocab_texts_) {
    text[id] = t;
    present[id] = true;
  }
  vocab_texts_.clear();
  vocab_texts_.shrink_to_fit();
  for (const AddedToken& a : added_) {
    text[a.id] = a.content;
    present[a.id] = true;
  }
  id_flags_.assign(n_ids, 0);
  id_arena_.clear();
  for (std::size_t id = 0; id < n_ids; ++id) {
    id_off_[id] = static_cast<std::uint32_t>(id_arena_.size());
    if (present[id]) {
      id_arena_.append(text[id]);
      id_flags_[id] |= kPresent;
    }
  }
  id_off_[n_ids] = static_cast<std::uint32_t>(id_arena_.size());
  std::unordered_set<std::string_view> added_contents;
  for (const AddedToken& a : added_) added_contents.insert(a.content);
  for (std::size_t id = 0; id < n_ids; ++id) {
    if (!(id_flags_[id] & kPresent)) continue;
    const std::string_view t = token_text(static_cast<TokenId>(id));
    if (special_strings_.count(std::string(t))) id_flags_[id] |= kSpecial;
    if (added_contents.count(t)) id_flags_[id] |= kAddedContent;
  }

  // Output id of every model symbol that is a vocabulary string: added_tokens_map first.
  const ByteLevelAlphabet& bl = byte_level();
  std::fill(sym_out_.begin(), sym_out_.end(), kNotInVocab);
  for (std::size_t e = 0; e < sym_map_.size(); ++e) {
    const std::uint32_t sym = sym_map_.value_at(e);
    if (!sym_in_vocab_[sym]) continue;
    const std::string token = byte_level_input_ ? bl.encode(sym_map_.key_at(e))
                                                : std::string(sym_map_.key_at(e));
    // Every such string is in tokens_to_ids, so final_lookup finds it.
    if (const auto id = final_lookup(token)) sym_out_[sym] = *id;
  }
  if (unk_token_) unk_emit_id_ = final_lookup(*unk_token_);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    fallback_ids_[b] = -1;
    if (tok_to_id_.find(name)) {
      if (auto id = final_lookup(name)) fallback_ids_[b] = *id;
    }
  }

  // The fast decode path: a top-level ByteLevel decoder.
  if (decoder_ && decoder_->kind == DecoderNode::Kind::kByteLevel) {
    id_bytes_off_.assign(n_ids + 1, 0);
    for (std::size_t id = 0; id < n_ids; ++id) {
      id_bytes_off_[id] = static_cast<std::uint32_t>(id_bytes_arena_.size());
      const std::string_view t = token_text(static_cast<TokenId>(id));
      for (std::size_t i = 0; i < t.size();) {
        const int b = bl.byte_of(unicode::next_cp(t, i));
        // Reference: a character outside the alphabet becomes byte 0 (Uint8Array of undefined).
        id_bytes_arena_.push_back(static_cast<char>(b < 0 ? 0 : b));
      }
    }
    id_bytes_off_[n_ids] = static_cast<std::uint32_t>(id_bytes_arena_.size());
  }
  id_arena_.shrink_to_fit();
  id_bytes_arena_.shrink_to_fit();
  tok_to_id_.shrink_to_fit();
  sym_map_.shrink_to_fit();
  sym_in_vocab_.clear();
  sym_in_vocab_.shrink_to_fit();
  sym_out_.shrink_to_fit();
}

// ---- encoding -------------------------------------------------------------------------------

const TokenizerImpl::AddedToken* TokenizerImpl::added_of(std::string_view s) const {
  if (s.size() > added_map_max_len_ || added_map_.empty()) return nullptr;
  auto it = added_map_.find(s);
  return it == added_map_.end() ? nullptr : &added_[it->second];
}

// DictionarySplitter.split: pieces between the longest added-token matches, and the matches.
void TokenizerImpl::split_added(std::string_view text, const TokenTrie& trie,
                                std::vector<std::string_view>& pieces) const {
  pieces.clear();
  if (trie.empty()) {
    pieces.push_back(text);
    return;
  }
  std::size_t start = 0, i = 0;
  while (i < text.size()) {
    i = trie.next_candidate(text, i);
    if (i >= text.size()) break;
    const std::size_t len = trie.longest_at(text, i);
    if (len == 0) {
      ++i;
      continue;
    }
    if (i > start) pieces.push_back(text.substr(start, i - start));
    pieces.push_back(text.substr(i, len));
    i += len;
    start = i;
  }
  if (start < text.size()) pieces.push_back(text.substr(start));
}

void TokenizerImpl::strip_around_added(std::vector<std::string_view>& pieces) const {
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    const AddedToken* a = added_of(pieces[i]);
    if (!a) continue;
    if (a->lstrip && i > 0) pieces[i - 1] = unicode::js_trim_end(pieces[i - 1]);
    if (a->rstrip && i + 1 < pieces.size()) pieces[i + 1] = unicode::js_trim_start(pieces[i + 1]);
  }
}

bool TokenizerImpl::normalize(std::string_view in, std::string& out) const {
  std::string cur;
  bool changed = false;
  auto current = [&]() -> std::string_view { return changed ? std::string_view(cur) : in; };
  std::string next;
  MatchScratch& scratch = MatchScratch::local();
  for (const NormStep& s : norm_) {
    switch (s.kind) {
      case NormStep::Kind::kUnicode:
        if (unicode::normalize(s.form, current(), next)) {
          cur.swap(next);
          changed = true;
        }
        break;
      case NormStep::Kind::kReplace:
      case NormStep::Kind::kStripAccents: {
        std::string r = js_replace_all(*s.re, current(), s.content, scratch);
        if (r != current()) {
          cur = std::move(r);
          changed = true;
        }
        break;
      }
      case NormStep::Kind::kStrip: {
        std::string_view v = current();
        if (s.left) v = unicode::js_trim_start(v);
        if (s.right) v = unicode::js_trim_end(v);
        if (v.size() != current().size()) {
          cur = std::string(v);
          changed = true;
        }
        break;
      }
      case NormStep::Kind::kPrepend:
        cur = s.content + std::string(current());
        changed = true;
        break;
      case NormStep::Kind::kPrecompiled: {
        std::string r = js_replace_all(*s.re, current(), "", scratch);
        r = js_replace_all(*s.re2, r, " ", scratch);
        std::string n;
        if (r.find("\uFF5E") == std::string::npos) {
          if (unicode::normalize(unicode::NormForm::kNFKC, r, n)) r = std::move(n);
        } else {
          // NFKC of each part between the U+FF5E (which NFKC would turn into "~").
          std::string joined;
          std::size_t pos = 0;
          while (true) {
            const std::size_t hit = r.find("\uFF5E", pos);
            const std::string_view part = std::string_view(r).substr(
                pos, hit == std::string::npos ? std::string::npos : hit - pos);
            joined += unicode::normalize(unicode::NormForm::kNFKC, part, n) ? n : std::string(part);
            if (hit == std::string::npos) break;
            joined += "\uFF5E";
            pos = hit + 3;
          }
          r = std::move(joined);
        }
        if (r != current()) {
          cur = std::move(r);
          changed = true;
        }
        break;
      }
      case NormStep::Kind::kLowercase: {
        std::string r = js_to_lower(current());
        if (r != current()) {
          cur = std::move(r);
          changed = true;
        }
        break;
      }
    }
  }
  if (changed) out = std::move(cur);
  return changed;
}

std::vector<TokenId> TokenizerImpl::encode(std::string_view text, bool add_special_tokens) const {
  std::string sanitized;
  if (unicode::sanitize_utf8(text, sanitized)) text = sanitized;
  std::vector<TokenId> ids;
  ids.reserve(text.size() / 3 + 4);
  EncodeState st{ids, MatchScratch::local()};

  std::vector<std::string_view> sections;
  split_added(text, unnormalized_trie_, sections);
  strip_around_added(sections);
  std::vector<std::string_view> subsections;
  std::string prepared, normalized;
  for (std::size_t si = 0; si < sections.size(); ++si) {
    std::string_view section = sections[si];
    if (section.empty()) continue;
    if (const AddedToken* a = added_of(section)) {
      ids.push_back(a->id);
      continue;
    }
    if (remove_space_) {
      // processed_text.trim().split(/\s+/).join(" ")
      const std::string trimmed = js_trim(section);
      prepared.clear();
      bool in_space = false;
      for (std::size_t i = 0; i < trimmed.size();) {
        const std::size_t at = i;
        const char32_t cp = unicode::next_cp(trimmed, i);
        if (unicode::is_js_space(cp)) {
          in_space = true;
          continue;
        }
        if (in_space) prepared.push_back(' ');
        in_space = false;
        prepared.append(trimmed, at, i - at);
      }
      section = prepared;
    }
    if (lowercase_and_remove_accent_) {
      // lowercase_and_remove_accents: toLowerCase, then every \p{M} removed.
      prepared = js_replace_all(*marks_, js_to_lower(section), "", st.scratch);
      section = prepared;
    }
    if (has_normalizer_ && normalize(section, normalized)) section = normalized;
    if (section.empty()) continue;
    split_added(section, normalized_trie_, subsections);
    strip_around_added(subsections);
    for (std::string_view sub : subsections) {
      if (sub.empty()) continue;
      if (const AddedToken* a = added_of(sub)) {
        ids.push_back(a->id);
        continue;
      }
      st.last_was_unk = false;
      pre_tokenize(0, sub, false, si, st);
    }
  }

  // Post-processor.
  for (const PostStep& p : post_) {
    if (p.kind == PostStep::Kind::kByteLevel) continue;
    if (p.kind == PostStep::Kind::kCls) {
      if (!add_special_tokens) continue;
      ids.insert(ids.begin(), p.cls);
      ids.push_back(p.sep);
      continue;
    }
    std::vector<TokenId> out;
    out.reserve(ids.size() + p.items.size());
    for (std::int64_t item : p.items) {
      if (item < 0) {
        out.insert(out.end(), ids.begin(), ids.end());
      } else if (add_special_tokens) {
        out.push_back(static_cast<TokenId>(item));
      }
    }
    ids = std::move(out);
  }
  return ids;
}

void TokenizerImpl::pre_tokenize(std::size_t step, std::string_view piece, bool bl_view,
                                 std::size_t section_index, EncodeState& st) const {
  if (step == pre_.size()) {
    model(piece, st);
    return;
  }
  const PreTokStep& s = pre_[step];
  switch (s.kind) {
    case PreTokStep::Kind::kByteLevel: {
      std::string prefixed;
      std::string_view text = piece;
      if (s.add_prefix_space && (piece.empty() || piece[0] != ' ')) {
        prefixed = " " + std::string(piece);
        text = prefixed;
      }
      if (!s.use_regex) {
        pre_tokenize(step + 1, text, true, section_index, st);
        return;
      }
      for_each_match(*s.re, text, st.scratch, [&](const Span& m) {
        if (m.end > m.begin) {
          pre_tokenize(step + 1, text.substr(m.begin, m.end - m.begin), true, section_index, st);
        }
      });
      return;
    }
    case PreTokStep::Kind::kMetaspace: {
      std::string normalized = replace_all_literal(piece, " ", s.str_rep);
      if (!std::string_view(normalized).starts_with(s.replacement) &&
          (s.prepend == PreTokStep::Prepend::kAlways ||
           (s.prepend == PreTokStep::Prepend::kFirst && section_index == 0))) {
        normalized = s.str_rep + normalized;
      }
      pre_tokenize(step + 1, normalized, bl_view, section_index, st);
      return;
    }
    case PreTokStep::Kind::kReplace: {
      const std::string replaced = js_replace_all(*s.re, piece, s.content, st.scratch);
      pre_tokenize(step + 1, replaced, bl_view, section_index, st);
      return;
    }
    default:
      break;
  }

  // Splitting steps.
  if (bl_view) {
    // After ByteLevel the steps see the byte-level string; we keep raw bytes, so match on the
    // byte-level form and map the pieces back (one character per byte).
    const ByteLevelAlphabet& bl = byte_level();
    std::string bl_text;
    std::vector<std::uint32_t> bl_to_raw(piece.size() * 2 + 1, 0);
    for (std::size_t k = 0; k < piece.size(); ++k) {
      bl_to_raw[bl_text.size()] = static_cast<std::uint32_t>(k);
      bl_text += bl.byte_to_utf8[static_cast<unsigned char>(piece[k])];
    }
    bl_to_raw[bl_text.size()] = static_cast<std::uint32_t>(piece.size());
    split(s, bl_text, st.scratch, [&](std::size_t b, std::size_t e) {
      const std::size_t rb = bl_to_raw[b], re = bl_to_raw[e];
      pre_tokenize(step + 1, piece.substr(rb, re - rb), true, section_index, st);
    });
    return;
  }
  split(s, piece, st.scratch, [&](std::size_t b, std::size_t e) {
    pre_tokenize(step + 1, piece.substr(b, e - b), false, section_index, st);
  });
}

// The pieces (non-empty [begin, end) ranges of `text`, in order) of a splitting step.
template <typename Emit>
void TokenizerImpl::split(const PreTokStep& s, std::string_view text, MatchScratch& scratch,
                          Emit&& emit) {
  auto piece = [&](std::size_t b, std::size_t e) {
    if (e > b) emit(b, e);
  };
  if (s.trim) {
    const std::string_view t = unicode::js_trim_end(unicode::js_trim_start(text));
    const std::size_t off = static_cast<std::size_t>(t.data() - text.data());
    for_each_match(*s.re, t, scratch, [&](const Span& m) { piece(off + m.begin, off + m.end); });
    return;
  }
  switch (s.kind) {
    case PreTokStep::Kind::kMatches:
      for_each_match(*s.re, text, scratch, [&](const Span& m) { piece(m.begin, m.end); });
      return;
    case PreTokStep::Kind::kIsolated: {
      std::size_t prev = 0;
      for_each_match(*s.re, text, scratch, [&](const Span& m) {
        piece(prev, m.begin);
        piece(m.begin, m.end);
        prev = m.end;
      });
      piece(prev, text.size());
      return;
    }
    case PreTokStep::Kind::kRemoved: {
      // text.split(pattern).filter(x => x): includes the texts of capture groups.
      const std::vector<Span> parts = js_split(*s.re, text, scratch);
      for (const Span& sp : parts) {
        if (sp.valid()) piece(sp.begin, sp.end);
      }
      return;
    }
    default:
      return;
  }
}

void TokenizerImpl::emit_model_id(TokenId id, EncodeState& st) const {
  if (fuse_unk_ && unk_model_id_) {
    // Reference fuse_unk: consecutive unknown tokens of one model call become one.
    const bool is_unk = id == *unk_model_id_ || (unk_emit_id_ && id == *unk_emit_id_);
    if (is_unk && st.last_was_unk) return;
    st.last_was_unk = is_unk;
  }
  st.out.push_back(id);
}

void TokenizerImpl::model(std::string_view piece, EncodeState& st) const {
  if (piece.empty()) return;
  // One byte (byte-level) needs no merging and no cache.
  if (byte_level_input_ && piece.size() == 1 && end_of_word_suffix_.empty()) {
    const TokenId id = sym_out_[byte_sym_[static_cast<unsigned char>(piece[0])]];
    if (id != kNotInVocab) {
      emit_model_id(id, st);
      return;
    }
  }
  const bool cacheable = piece.size() <= WordCache::kMaxKey;
  const std::uint64_t h = cacheable ? hash_bytes(piece) : 0;
  const std::size_t at = st.out.size();
  if (!(cacheable && cache_.lookup(h, piece, st.out))) {
    const std::uint32_t* sym = ignore_merges_ ? sym_map_.find(piece) : nullptr;
    if (sym && sym_out_[*sym] != kNotInVocab) {
      // ignore_merges: a word that is a token is that token.
      st.out.push_back(sym_out_[*sym]);
    } else {
      bpe(piece, st.out);
    }
    if (cacheable) {
      cache_.insert(h, piece, std::span<const TokenId>(st.out.data() + at, st.out.size() - at));
    }
  }
  if (fuse_unk_ && unk_model_id_) {
    // Re-run the appended ids through the fuse logic.
    std::vector<TokenId> produced(st.out.begin() + static_cast<std::ptrdiff_t>(at), st.out.end());
    st.out.resize(at);
    for (TokenId id : produced) emit_model_id(id, st);
  }
}

// One symbol of a finished word: its id, or byte fallback / unk for strings outside the vocab.
void TokenizerImpl::emit_symbol(std::uint32_t sym, std::string_view word, std::size_t begin,
                                std::size_t end, std::vector<TokenId>& out) const {
  if (sym != kNoSym && sym_out_[sym] != kNotInVocab) {
    out.push_back(sym_out_[sym]);
    return;
  }
  if (byte_fallback_) {
    // The token string (byte-level characters in byte-level mode) as UTF-8 bytes.
    std::string t = byte_level_input_ ? byte_level().encode(word.substr(begin, end - begin))
                                      : std::string(word.substr(begin, end - begin));
    if (end == word.size()) t += end_of_word_suffix_;
    bool all = true;
    for (char c : t) all = all && fallback_ids_[static_cast<unsigned char>(c)] >= 0;
    if (all) {
      for (char c : t) {
        out.push_back(static_cast<TokenId>(fallback_ids_[static_cast<unsigned char>(c)]));
      }
      return;
    }
  }
  if (unk_token_) {
    if (!unk_emit_id_) {
      fail("encode: unk_token \"" + *unk_token_ + "\" is not in the vocabulary");
    }
    out.push_back(*unk_emit_id_);
  }
  // Reference: without an unk_token the unknown piece is dropped.
}

void TokenizerImpl::bpe(std::string_view word, std::vector<TokenId>& out) const {
  struct Sym {
    std::uint32_t sym;
    std::uint32_t begin;
    std::uint32_t end;
  };
  constexpr std::size_t kSmall = 64;
  // Symbols of the word: one per byte (byte-level) or per character.
  std::size_t n = 0;
  if (byte_level_input_) {
    n = word.size();
  } else {
    for (std::size_t i = 0; i < word.size(); i += unicode::cp_len(static_cast<unsigned char>(word[i]))) ++n;
  }
  std::array<Sym, kSmall> small;
  std::vector<Sym> large;
  Sym* syms = small.data();
  if (n > kSmall) {
    large.resize(n);
    syms = large.data();
  }
  if (byte_level_input_) {
    for (std::size_t i = 0; i < n; ++i) {
      syms[i] = {byte_sym_[static_cast<unsigned char>(word[i])], static_cast<std::uint32_t>(i),
                 static_cast<std::uint32_t>(i + 1)};
    }
  } else {
    std::size_t k = 0;
    for (std::size_t i = 0; i < word.size();) {
      const std::size_t b = i;
      i += unicode::cp_len(static_cast<unsigned char>(word[i]));
      const std::uint32_t* s = sym_map_.find(word.substr(b, i - b));
      syms[k++] = {s ? *s : kNoSym, static_cast<std::uint32_t>(b), static_cast<std::uint32_t>(i)};
    }
  }
  if (!end_of_word_suffix_.empty()) {
    // The last character carries the suffix.
    Sym& last = syms[n - 1];
    std::string key(word.substr(last.begin, last.end - last.begin));
    key += byte_level_input_ ? byte_level().decode(end_of_word_suffix_).value_or("\xFF\xFF")
                             : end_of_word_suffix_;
    const std::uint32_t* s = sym_map_.find(key);
    last.sym = s ? *s : kNoSym;
  }
  auto rank_of = [&](std::uint32_t a, std::uint32_t b, std::uint32_t& merged) -> std::uint32_t {
    if (a == kNoSym || b == kNoSym) return kNoSym;
    const MergeMap::Value* v = merges_.find(a, b);
    if (!v) return kNoSym;
    merged = v->merged;
    return v->rank;
  };
  if (n <= kSmall) {
    // Small word: repeatedly merge the lowest-ranked pair, leftmost first (the reference's
    // order: rank, then position).
    std::array<std::uint32_t, kSmall> ranks, merged;
    for (std::size_t i = 0; i + 1 < n; ++i) {
      if (syms[i].sym != kNoSym && syms[i + 1].sym != kNoSym) merges_.prefetch(syms[i].sym, syms[i + 1].sym);
    }
    for (std::size_t i = 0; i + 1 < n; ++i) ranks[i] = rank_of(syms[i].sym, syms[i + 1].sym, merged[i]);
    while (n > 1) {
      std::size_t best = 0;
      std::uint32_t best_rank = kNoSym;
      for (std::size_t i = 0; i + 1 < n; ++i) {
        if (ranks[i] < best_rank) {
          best_rank = ranks[i];
          best = i;
        }
      }
      if (best_rank == kNoSym) break;
      syms[best].sym = merged[best];
      syms[best].end = syms[best + 1].end;
      for (std::size_t i = best + 1; i + 1 < n; ++i) syms[i] = syms[i + 1];
      for (std::size_t i = best + 1; i + 2 < n; ++i) {
        ranks[i] = ranks[i + 1];
        merged[i] = merged[i + 1];
      }
      --n;
      if (best + 1 < n) ranks[best] = rank_of(syms[best].sym, syms[best + 1].sym, merged[best]);
      if (best > 0) ranks[best - 1] = rank_of(syms[best - 1].sym, syms[best].sym, merged[best - 1]);
    }
    for (std::size_t i = 0; i < n; ++i) emit_symbol(syms[i].sym, word, syms[i].begin, syms[i].end, out);
    return;
  }
  // Long word: a heap of (rank, position) over a linked list, O(n log n).
  struct Node {
    std::uint32_t sym, begin, end;
    std::int32_t prev, next;
    bool alive;
  };
  std::vector<Node> nodes(n);
  for (std::size_t i = 0; i < n; ++i) {
    nodes[i] = {syms[i].sym, syms[i].begin, syms[i].end, static_cast<std::int32_t>(i) - 1,
                i + 1 < n ? static_cast<std::int32_t>(i + 1) : -1, true};
  }
  struct Cand {
    std::uint32_t rank;
    std::uint32_t left;
    std::uint32_t right;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<>> heap;
  auto push = [&](std::int32_t l, std::int32_t r) {
    if (l < 0 || r < 0) return;
    std::uint32_t m = 0;
    const std::uint32_t rk = rank_of(nodes[l].sym, nodes[r].sym, m);
    if (rk != kNoSym) heap.push({rk, static_cast<std::uint32_t>(l), static_cast<std::uint32_t>(r)});
  };
  for (std::size_t i = 0; i + 1 < n; ++i) {
    push(static_cast<std::int32_t>(i), static_cast<std::int32_t>(i + 1));
  }
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Node& l = nodes[c.left];
    if (!l.alive || l.next != static_cast<std::int32_t>(c.right)) continue;
    Node& r = nodes[c.right];
    std::uint32_t m = 0;
    if (rank_of(l.sym, r.sym, m) != c.rank) continue;  // stale: the pair changed since
    l.sym = m;
    l.end = r.end;
    r.alive = false;
    l.next = r.next;
    if (r.next >= 0) nodes[r.next].prev = static_cast<std::int32_t>(c.left);
    push(l.prev, static_cast<std::int32_t>(c.left));
    push(static_cast<std::int32_t>(c.left), l.next);
  }
  for (std::int32_t i = 0; i >= 0; i = nodes[i].next) {
    emit_symbol(nodes[i].sym, word, nodes[i].begin, nodes[i].end, out);
  }
}

// ---- decoding -------------------------------------------------------------------------------

namespace {

// JavaScript parseInt(s, 16) of the two UTF-16 units after "<0x" (ByteFallback); -1 for NaN.
int parse_fallback_byte(std::string_view two) {
  std::size_t i = 0;
  std::u32string cps;
  while (i < two.size()) cps.push_back(unicode::next_cp(two, i));
  std::size_t k = 0;
  while (k < cps.size() && unicode::is_js_space(cps[k])) ++k;
  int sign = 1;
  if (k < cps.size() && (cps[k] == '-' || cps[k] == '+')) {
    if (cps[k] == '-') sign = -1;
    ++k;
  }
  if (k + 1 < cps.size() && cps[k] == '0' && (cps[k + 1] == 'x' || cps[k + 1] == 'X')) k += 2;
  int v = 0, digits = 0;
  for (; k < cps.size(); ++k) {
    const char32_t c = cps[k];
    int d;
    if (c >= '0' && c <= '9') d = static_cast<int>(c - '0');
    else if (c >= 'a' && c <= 'f') d = static_cast<int>(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F') d = static_cast<int>(c - 'A' + 10);
    else break;
    v = v * 16 + d;
    ++digits;
  }
  if (digits == 0) return -1;
  return ((sign * v) % 256 + 256) % 256;  // Uint8Array wraps
}

// TextDecoder("utf-8") without ignoreBOM: invalid bytes become U+FFFD, a leading BOM is dropped.
std::string text_decode(std::string_view bytes, bool ignore_bom) {
  std::string out;
  unicode::append_sanitized_utf8(out, bytes);
  if (!ignore_bom && std::string_view(out).starts_with("\xEF\xBB\xBF")) out.erase(0, 3);
  return out;
}

}  // namespace

std::vector<std::string> TokenizerImpl::decode_chain(const DecoderNode& d,
                                                     std::vector<std::string> tokens) const {
  using K = DecoderNode::Kind;
  switch (d.kind) {
    case K::kSequence:
      for (const DecoderNode& c : d.children) tokens = decode_chain(c, std::move(tokens));
      return tokens;
    case K::kByteLevel: {
      const ByteLevelAlphabet& bl = byte_level();
      std::vector<std::string> out;
      std::string bytes;
      bool have = false;
      auto flush = [&]() {
        if (have) out.push_back(text_decode(bytes, true));
        bytes.clear();
        have = false;
      };
      std::unordered_set<std::string_view> added;
      if (d.passes_added_tokens) {
        for (const AddedToken& a : added_) added.insert(a.content);
      }
      for (const std::string& t : tokens) {
        if (d.passes_added_tokens && added.count(t)) {
          flush();
          out.push_back(t);
          continue;
        }
        have = true;
        for (std::size_t i = 0; i < t.size();) {
          const int b = bl.byte_of(unicode::next_cp(t, i));
          bytes.push_back(static_cast<char>(b < 0 ? 0 : b));
        }
      }
      flush();
      return out;
    }
    case K::kByteFallback: {
      std::vector<std::string> out;
      std::string bytes;
      bool have = false;
      for (const std::string& t : tokens) {
        int byte = -1;
        if (utf16_length(t) == 6 && t.starts_with("<0x") && t.ends_with(">")) {
          byte = parse_fallback_byte(std::string_view(t).substr(3, t.size() - 4));
        }
        if (byte >= 0) {
          bytes.push_back(static_cast<char>(byte));
          have = true;
          continue;
        }
        if (have) out.push_back(text_decode(bytes, false));
        bytes.clear();
        have = false;
        out.push_back(t);
      }
      if (have) out.push_back(text_decode(bytes, false));
      return out;
    }
    case K::kFuse: {
      std::string all;
      for (const std::string& t : tokens) all += t;
      return {all};
    }
    case K::kStrip: {
      // token[i] === content compares one UTF-16 unit: only a single BMP character can match.
      std::size_t ci = 0;
      const bool single = !d.content.empty() && unicode::next_cp(d.content, ci) < 0x10000 &&
                          ci == d.content.size();
      if (!single) return tokens;
      for (std::string& t : tokens) {
        std::size_t start_cut = 0;  // bytes
        std::size_t i = 0;
        for (std::size_t k = 0; k < d.start && i < t.size(); ++k) {
          if (std::string_view(t).substr(i).starts_with(d.content)) {
            i += d.content.size();
            start_cut = i;
          } else {
            break;
          }
        }
        std::size_t stop_cut = t.size();
        std::size_t j = t.size();
        for (std::size_t k = 0; k < d.stop && j > 0; ++k) {
          if (j >= d.content.size() && std::string_view(t).substr(0, j).ends_with(d.content)) {
            j -= d.content.size();
            stop_cut = j;
          } else {
            break;
          }
        }
        t = start_cut < stop_cut ? t.substr(start_cut, stop_cut - start_cut) : std::string();
      }
      return tokens;
    }
    case K::kReplace: {
      MatchScratch& scratch = MatchScratch::local();
      for (std::string& t : tokens) t = js_replace_all(*d.re, t, d.content, scratch);
      return tokens;
    }
    case K::kMetaspace: {
      for (std::size_t i = 0; i < tokens.size(); ++i) {
        std::string n = replace_all_literal(tokens[i], d.content, " ");
        if (i == 0 && !n.empty() && n[0] == ' ') n.erase(0, 1);
        tokens[i] = std::move(n);
      }
      return tokens;
    }
    case K::kBPE: {
      for (std::size_t i = 0; i < tokens.size(); ++i) {
        tokens[i] = replace_all_literal(tokens[i], d.content, i + 1 == tokens.size() ? "" : " ");
      }
      return tokens;
    }
    case K::kWordPiece: {
      for (std::size_t i = 0; i < tokens.size(); ++i) {
        std::string& t = tokens[i];
        if (i != 0) {
          if (!d.content.empty() && t.starts_with(d.content)) {
            t.erase(0, d.content.size());
          } else {
            t = " " + t;
          }
        }
        if (d.cleanup) t = clean_up_tokenization(std::move(t));
      }
      return tokens;
    }
  }
  return tokens;
}

std::string TokenizerImpl::decode(std::span<const TokenId> ids, bool skip_special_tokens) const {
  for (TokenId id : ids) {
    if (id >= id_flags_.size() || !(id_flags_[id] & kPresent)) {
      fail("decode: unknown token id " + std::to_string(id));
    }
  }
  std::string decoded;
  if (decoder_ && decoder_->kind == DecoderNode::Kind::kByteLevel) {
    // Fast path: bytes of each id, added tokens verbatim.
    std::string bytes;
    bool have = false;
    for (TokenId id : ids) {
      const std::uint8_t f = id_flags_[id];
      if (skip_special_tokens && (f & kSpecial)) continue;
      if (f & kAddedContent) {
        if (have) unicode::append_sanitized_utf8(decoded, bytes);
        bytes.clear();
        have = false;
        decoded.append(token_text(id));
        continue;
      }
      have = true;
      bytes.append(std::string_view(id_bytes_arena_)
                       .substr(id_bytes_off_[id], id_bytes_off_[id + 1] - id_bytes_off_[id]));
    }
    if (have) unicode::append_sanitized_utf8(decoded, bytes);
  } else {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (TokenId id : ids) {
      if (skip_special_tokens && (id_flags_[id] & kSpecial)) continue;
      tokens.emplace_back(token_text(id));
    }
    if (decoder_) {
      for (const std::string& t : decode_chain(*decoder_, std::move(tokens))) decoded += t;
    } else {
      for (std::size_t i = 0; i < tokens.size(); ++i) {
        if (i) decoded += ' ';
        decoded += tokens[i];
      }
    }
  }
  if (decoder_ && !end_of_word_suffix_.empty()) {
    decoded = replace_all_literal(decoded, end_of_word_suffix_, " ");
    if (skip_special_tokens) decoded = js_trim(decoded);
  }
  if (cleanup_spaces_) decoded = clean_up_tokenization(std::move(decoded));
  return decoded;
}

std::optional<TokenId> TokenizerImpl::token_to_id(std::string_view token) const {
  if (const std::uint32_t* v = tok_to_id_.find(token)) return *v;
  return std::nullopt;
}

std::optional<std::string> TokenizerImpl::id_to_token(TokenId id) const {
  if (id >= id_flags_.size() || !(id_flags_[id] & kPresent)) return std::nullopt;
  return std::string(token_text(id));
}

std::size_t TokenizerImpl::memory_bytes() const {
  std::size_t n = sizeof(*this);
  n += tok_to_id_.memory_bytes() + sym_map_.memory_bytes() + merges_.memory_bytes();
  n += sym_in_vocab_.capacity() + sym_out_.capacity() * sizeof(TokenId);
  n += id_arena_.capacity() + id_off_.capacity() * sizeof(std::uint32_t) + id_flags_.capacity();
  n += id_bytes_arena_.capacity() + id_bytes_off_.capacity() * sizeof(std::uint32_t);
  n += unnormalized_trie_.memory_bytes() + normalized_trie_.memory_bytes();
  for (const AddedToken& a : added_) n += sizeof(AddedToken) + a.content.capacity();
  for (const auto& [k, v] : added_map_) n += k.capacity() + 48;
  for (const auto& s : special_strings_) n += s.capacity() + 48;
  n += WordCache::max_memory_bytes();
  return n;
}

}  // namespace tokenizer_detail

std::unique_ptr<Tokenizer> Tokenizer::load_json(std::string_view tokenizer_json,
                                                std::string_view config_json) {
  auto tok = std::make_unique<tokenizer_detail::TokenizerImpl>(tokenizer_json, config_json);
#if defined(__GLIBC__)
  // The parsed JSON (several times the file's size) is gone: give its pages back to the system
  // instead of leaving them in malloc's free lists.
  malloc_trim(0);
#endif
  return tok;
}

std::unique_ptr<Tokenizer> Tokenizer::load_dir(const std::string& dir) {
  auto read = [](const std::string& path, bool required) -> std::optional<std::string> {
    std::ifstream f(path, std::ios::binary);
    if (!f) {
      if (required) throw TokenizerError("cannot read " + path);
      return std::nullopt;
    }
    std::ostringstream ss;
    ss << f.rdbuf();
    return ss.str();
  };
  const std::string base = dir.empty() || dir.back() == '/' ? dir : dir + "/";
  const auto tj = read(base + "tokenizer.json", true);
  const auto cfg = read(base + "tokenizer_config.json", false);
  return load_json(*tj, cfg ? std::string_view(*cfg) : std::string_view());
}

}  // namespace omni
