// omni-tokenize: loads a tokenizer folder (tokenizer.json, tokenizer_config.json) with the
// proxy's own C++ tokenizer and chat-template renderer, reads stdin and writes JSON to stdout.
//
//   omni-tokenize DIR encode  [--no-special] [--jsonl]   text -> {"ids": [...], "count": n}
//   omni-tokenize DIR decode  [--skip-special] [--jsonl] ids  -> {"text": "..."}
//   omni-tokenize DIR chat    [--jsonl] [--template FILE] [--now EPOCH]
//        {"messages": [...], "tools": [...], "add_generation_prompt": true,
//         "chat_template_kwargs": {...}} (or just the messages array)
//        -> {"prompt": "...", "ids": [...], "count": n}
//   omni-tokenize DIR forward --api chat|completions|generate [--engine vllm|sglang]
//        [--template FILE] [--now EPOCH]
//        a request body -> {"reason": "...", "prompt_tokens": n, "upstream_path": "...",
//                           "upstream_body": {...}}: what the proxy sends the engines
//   omni-tokenize DIR info  -> vocabulary size, special tokens, load time, memory
//
// encode reads all of stdin as raw bytes (invalid UTF-8 becomes U+FFFD, as the proxy does).
// With --jsonl every input line is one JSON document (encode: a string, or {"text": ...} or
// {"hex": "<bytes as hex>"}, with an optional "add_special_tokens": bool; decode: an array of
// ids, or {"ids": [...], "skip_special_tokens": bool}; chat: as above),
// and every output line answers it; a failing line answers {"error": "..."} and the rest go on.
// Exit status: 0 on success, 1 when the input (or, in --jsonl mode, any line) failed, 2 for a
// usage or load error.
#include <omni/chat_template.hpp>
#include <omni/request_body.hpp>
#include <omni/token_forwarding.hpp>
#include <omni/tokenizer.hpp>

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

using ojson = nlohmann::ordered_json;

struct Args {
  std::string dir;
  std::string command;
  bool no_special = false;
  bool skip_special = false;
  bool jsonl = false;
  std::string template_file;
  long long now = 0;
  std::string api = "chat";
  std::string engine = "vllm";
};

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "omni-tokenize: " << why << "\n"
            << "usage: omni-tokenize DIR encode [--no-special] [--jsonl]\n"
            << "       omni-tokenize DIR decode [--skip-special] [--jsonl]\n"
            << "       omni-tokenize DIR chat [--jsonl] [--template FILE] [--now EPOCH]\n"
            << "       omni-tokenize DIR forward --api chat|completions|generate"
               " [--engine vllm|sglang] [--template FILE] [--now EPOCH]\n"
            << "       omni-tokenize DIR info\n";
  std::exit(2);
}

Args parse_args(int argc, char** argv) {
  if (argc < 3) usage("a tokenizer folder and a command are required");
  Args a;
  a.dir = argv[1];
  a.command = argv[2];
  for (int i = 3; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--no-special") a.no_special = true;
    else if (arg == "--skip-special") a.skip_special = true;
    else if (arg == "--jsonl") a.jsonl = true;
    else if (arg == "--template") a.template_file = value();
    else if (arg == "--now") a.now = std::stoll(value());
    else if (arg == "--api") a.api = value();
    else if (arg == "--engine") a.engine = value();
    else usage("unknown option " + arg);
  }
  return a;
}

std::string read_all(std::istream& in) {
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::string dump(const ojson& j) { return j.dump(-1, ' ', false, ojson::error_handler_t::replace); }

ojson ids_json(const std::vector<omni::TokenId>& ids) {
  ojson a = ojson::array();
  for (auto id : ids) a.push_back(id);
  return a;
}

// Bytes written as hex digits: how --jsonl input carries text that is not valid UTF-8.
std::string from_hex(const std::string& hex) {
  if (hex.size() % 2 != 0) throw std::invalid_argument("hex text has an odd length");
  std::string out;
  for (std::size_t i = 0; i < hex.size(); i += 2) {
    out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  return out;
}

class Tool {
 public:
  explicit Tool(const Args& args) : args_(args) {
    const auto t0 = std::chrono::steady_clock::now();
    tokenizer_ = omni::Tokenizer::load_dir(args.dir);
    load_ms_ = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0)
                   .count();
    std::string source = tokenizer_->config().chat_template;
    if (!args.template_file.empty()) {
      std::ifstream f(args.template_file, std::ios::binary);
      if (!f) throw std::runtime_error("cannot read the template file " + args.template_file);
      source = read_all(f);
    }
    if (!source.empty()) chat_.emplace(source, tokenizer_->config());
    render_.now_epoch_seconds = args.now;
  }

  ojson encode(const ojson& in) const {
    bool special = !args_.no_special;
    std::string text;
    if (in.is_string()) {
      text = in.get<std::string>();
    } else if (in.is_object() && in.contains("text") && in["text"].is_string()) {
      text = in["text"].get<std::string>();
    } else if (in.is_object() && in.contains("hex") && in["hex"].is_string()) {
      text = from_hex(in["hex"].get<std::string>());
    } else {
      throw std::invalid_argument("expected a string, {\"text\": ...} or {\"hex\": ...}");
    }
    if (in.is_object() && in.contains("add_special_tokens")) {
      special = in["add_special_tokens"].get<bool>();
    }
    return encode_text(text, special);
  }

  ojson encode_text(const std::string& text, bool special) const {
    auto ids = tokenizer_->encode(text, special);
    return ojson{{"ids", ids_json(ids)}, {"count", ids.size()}};
  }

  ojson decode(const ojson& in) const {
    const ojson& ids = in.is_object() && in.contains("ids") ? in["ids"] : in;
    if (!ids.is_array()) throw std::invalid_argument("expected an array of ids or {\"ids\": [...]}");
    std::vector<omni::TokenId> v;
    for (const auto& id : ids) {
      if (!id.is_number_unsigned()) throw std::invalid_argument("ids must be non-negative integers");
      v.push_back(id.get<omni::TokenId>());
    }
    bool skip = args_.skip_special;
    if (in.is_object() && in.contains("skip_special_tokens")) {
      skip = in["skip_special_tokens"].get<bool>();
    }
    return ojson{{"text", tokenizer_->decode(v, skip)}};
  }

  ojson chat(const ojson& in) const {
    if (!chat_) throw std::runtime_error("the tokenizer has no chat template (use --template)");
    // A bare messages array, or a chat request body.
    const ojson request = in.is_array() ? ojson{{"messages", in}} : in;
    std::string why;
    auto prompt = omni::encode_chat_request(request, *chat_, *tokenizer_, why, render_);
    if (!prompt) throw std::invalid_argument(why);
    return ojson{{"prompt", prompt->text}, {"ids", ids_json(prompt->ids)},
                 {"count", prompt->ids.size()}};
  }

  ojson forward(const std::string& body) const {
    omni::Api api = omni::Api::kChatCompletions;
    if (args_.api == "completions") api = omni::Api::kCompletions;
    else if (args_.api == "generate") api = omni::Api::kGenerate;
    else if (args_.api != "chat") throw std::invalid_argument("--api is chat, completions or generate");
    auto parsed = omni::parse_request_body(api, body);
    if (!parsed.ok()) return ojson::parse(parsed.error().to_json());
    omni::ForwardingOptions options;
    options.engine = args_.engine == "sglang" ? omni::EngineFlavor::kSglang : omni::EngineFlavor::kVllm;
    options.render = render_;
    auto result = omni::tokenize_request(*parsed, *tokenizer_, chat_ ? &*chat_ : nullptr, options);
    if (!result.ok()) return ojson::parse(result.error().to_json());
    ojson out = ojson::object();
    out["reason"] = std::string(omni::forward_reason_name(result->reason));
    out["prompt_tokens"] = result->prompt_tokens;
    if (result->upstream) {
      out["upstream_path"] = std::string(omni::api_path(result->upstream_api));
      out["upstream_body"] = result->upstream->json;
      out["chat_to_completion"] = result->chat_to_completion;
    } else {
      out["upstream_path"] = std::string(omni::api_path(api));
      out["upstream_body"] = parsed->json;
    }
    return out;
  }

  ojson info() const {
    const auto& c = tokenizer_->config();
    return ojson{{"vocab_size", tokenizer_->vocab_size()},
                 {"memory_bytes", tokenizer_->memory_bytes()},
                 {"load_ms", load_ms_},
                 {"bos_token", c.bos_token},
                 {"eos_token", c.eos_token},
                 {"tokenizer_class", c.tokenizer_class},
                 {"chat_template", chat_.has_value()}};
  }

 private:
  const Args& args_;
  std::unique_ptr<omni::Tokenizer> tokenizer_;
  std::optional<omni::ChatTemplate> chat_;
  omni::jinja::RenderOptions render_;
  double load_ms_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse_args(argc, argv);
  const std::string& cmd = args.command;
  if (cmd != "encode" && cmd != "decode" && cmd != "chat" && cmd != "forward" && cmd != "info") {
    usage("unknown command " + cmd);
  }
  std::optional<Tool> tool;
  try {
    tool.emplace(args);
  } catch (const std::exception& e) {
    std::cout << dump(ojson{{"error", e.what()}}) << "\n";
    std::cerr << "omni-tokenize: " << e.what() << "\n";
    return 2;
  }
  std::ios::sync_with_stdio(false);
  auto one = [&](const std::string& input, bool raw) -> ojson {
    if (cmd == "encode" && raw) return tool->encode_text(input, !args.no_special);
    if (cmd == "forward") return tool->forward(input);
    if (cmd == "info") return tool->info();
    const ojson in = ojson::parse(input);
    if (cmd == "encode") return tool->encode(in);
    if (cmd == "decode") return tool->decode(in);
    return tool->chat(in);
  };
  int status = 0;
  if (cmd == "info") {
    std::cout << dump(tool->info()) << "\n";
    return 0;
  }
  if (!args.jsonl) {
    try {
      std::cout << dump(one(read_all(std::cin), true)) << "\n";
    } catch (const std::exception& e) {
      std::cout << dump(ojson{{"error", e.what()}}) << "\n";
      std::cerr << "omni-tokenize: " << e.what() << "\n";
      status = 1;
    }
    return status;
  }
  std::string line;
  while (std::getline(std::cin, line)) {
    try {
      std::cout << dump(one(line, false)) << "\n";
    } catch (const std::exception& e) {
      std::cout << dump(ojson{{"error", e.what()}}) << "\n";
      status = 1;
    }
  }
  std::cout.flush();
  return status;
}
