// omni-sim: simulated vLLM and SGLang inference engines, any number of instances in one
// process. See docs/simulator.md.
#include "instance.hpp"
#include "model_tokenizer.hpp"

#include <omni/version.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <unistd.h>

namespace {

using omni::sim::EngineKind;
using omni::sim::Role;

constexpr int kMaxInstances = 64;

const char* kUsage = R"(usage: omni-sim [options]

Simulated vLLM / SGLang inference engines. Every instance gets its own port; one process
runs them all on one thread (plus tokenizer threads with --tokenizer).

Cluster:
  --engine vllm|sglang          engine to imitate (default vllm)
  --role prefill|decode|both    P/D role of every instance (default both)
  --instances N                 instances in this process, 1..64 (default 1)
  --host ADDR                   bind and advertised address (default 127.0.0.1)
  --port P                      HTTP port of instance 0; instance i uses P+i; 0 picks free
                                ports (default 8000)
  --kv-transfer-port P          vLLM prefill KV side channel, first port (default 0: free)
  --bootstrap-port P            SGLang prefill bootstrap server, first port (default 8998)
  --model NAME                  served model name (default omni-sim)

Engine model:
  --profile NAME                fast | deepseek-v3-h800 | deepseek-v3-h800-prefill |
                                deepseek-v3-h800-decode (default fast)
  --block-size N  --num-blocks N  --max-num-seqs N  --max-num-batched-tokens N
  --max-model-len N             override the profile's limits
  --time-scale F                wall time = model time x F (default 1)
  --seed N                      RNG seed for jitter, sampling and faults (default 1)
  --default-max-tokens N        output length bound when a request sets none (default 256)
  --tokenizer DIR               tokenize text prompts with the model's real tokenizer and chat
                                template (DIR/tokenizer.json, DIR/tokenizer_config.json), as
                                the engines do, on worker threads; token ids are checked
                                against its vocabulary (default: the built-in stand-in)

KV events (ZMQ, vLLM wire format):
  --kv-events                   publish KV events (implied by the next two)
  --kv-events-port P            PUB port of instance 0, P+i for instance i (0: free)
  --kv-replay-port P            ROUTER replay port, first port (0: free, the default)
  --no-kv-replay                no replay socket
  --kv-events-encoding array|map  event encoding (default: map for vllm, array for sglang)
  --kv-events-topic T           topic frame (default empty)
  --kv-events-buffer N          batches kept for replay (default 10000)
  --kv-hash fast64|sha256       block hash: 64-bit ints or 32-byte digests (default fast64)

P/D:
  --kv-hold-timeout S           vLLM prefill frees unpulled KV after S s (default 480)
  --kv-load-failure-policy fail|recompute  vLLM decode on a failed pull (default fail)
  --bootstrap-timeout S         SGLang prefill waits S s for its decode (default 300)
  --waiting-timeout S           SGLang decode waits S s for its prefill (default 300)

Faults (generation requests only):
  --fault-error-rate X          fraction answered 500 at once
  --fault-hang-rate X           fraction never answered
  --fault-disconnect-rate X     fraction reset after the first output token
  --fault-slow-rate X --fault-slow-ms MS   fraction delayed by MS before admission
  --fault-slowdown F            every step takes F times longer
  --fault-crash-after N         the instance crashes when request N+1 arrives
  --fault-instances LIST        comma-separated instance indexes the faults apply to
                                (default: all)

Process:
  --keepalive-timeout S         idle keep-alive connections close after S s (default 5)
  --max-body-bytes N            larger request bodies get 413 (default 67108864)
  --ready-file PATH             write the instances' ports as JSON once listening
  --duration S                  exit after S seconds (default 0: run until SIGINT/SIGTERM)
  --version, --help
)";

[[noreturn]] void die(const std::string& msg) {
  std::cerr << "omni-sim: " << msg << "\n(see omni-sim --help)\n";
  std::exit(2);
}

template <typename T>
T parse_number(const std::string& flag, const std::string& v, T lo, T hi) {
  T out{};
  const char* end = v.data() + v.size();
  auto [p, ec] = std::from_chars(v.data(), end, out);
  if (ec != std::errc() || p != end || out < lo || out > hi) {
    std::ostringstream os;
    os << flag << ": invalid value \"" << v << "\" (expected " << lo << ".." << hi << ")";
    die(os.str());
  }
  return out;
}

struct Options {
  omni::sim::InstanceConfig base;
  int instances = 1;
  int port = 8000;
  int kv_transfer_port = 0;
  int bootstrap_port = 8998;
  int kv_events_port = 0;
  int kv_replay_port = 0;
  bool replay = true;
  std::string encoding;
  std::string profile = "fast";
  long block_size = -1, num_blocks = -1, max_num_seqs = -1, max_batched = -1, max_model_len = -1;
  std::set<int> fault_instances;
  std::string ready_file;
  double duration_s = 0;
  std::string tokenizer_dir;
};

Options parse_args(int argc, char** argv) {
  Options o;
  auto& c = o.base;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) die(flag + ": missing value");
      return argv[++i];
    };
    auto rate = [&]() { return parse_number<double>(flag, value(), 0.0, 1.0); };
    auto seconds = [&]() { return parse_number<double>(flag, value(), 0.0, 1e7); };
    auto port = [&]() { return parse_number<int>(flag, value(), 0, 65535); };
    auto count = [&](long hi) { return parse_number<long>(flag, value(), 1, hi); };
    if (flag == "--help" || flag == "-h") {
      std::cout << kUsage;
      std::exit(0);
    } else if (flag == "--version") {
      std::cout << "omni-sim " << omni::kVersion << "\n";
      std::exit(0);
    } else if (flag == "--engine") {
      const std::string v = value();
      if (v == "vllm") c.engine = EngineKind::kVllm;
      else if (v == "sglang") c.engine = EngineKind::kSglang;
      else die("--engine: expected vllm or sglang, got \"" + v + "\"");
    } else if (flag == "--role") {
      const std::string v = value();
      if (v == "prefill") c.role = Role::kPrefill;
      else if (v == "decode") c.role = Role::kDecode;
      else if (v == "both") c.role = Role::kBoth;
      else die("--role: expected prefill, decode or both, got \"" + v + "\"");
    } else if (flag == "--instances") {
      o.instances = static_cast<int>(count(kMaxInstances));
    } else if (flag == "--host") {
      c.host = value();
    } else if (flag == "--port") {
      o.port = port();
    } else if (flag == "--kv-transfer-port") {
      o.kv_transfer_port = port();
    } else if (flag == "--bootstrap-port") {
      o.bootstrap_port = port();
    } else if (flag == "--model") {
      c.model = value();
      if (c.model.empty()) die("--model: must not be empty");
    } else if (flag == "--profile") {
      o.profile = value();
    } else if (flag == "--block-size") {
      o.block_size = count(4096);
    } else if (flag == "--num-blocks") {
      o.num_blocks = count(1L << 24);
    } else if (flag == "--max-num-seqs") {
      o.max_num_seqs = count(1L << 16);
    } else if (flag == "--max-num-batched-tokens") {
      o.max_batched = count(1L << 24);
    } else if (flag == "--max-model-len") {
      o.max_model_len = count(1L << 24);
    } else if (flag == "--time-scale") {
      c.time_scale = parse_number<double>(flag, value(), 1e-6, 1e6);
    } else if (flag == "--seed") {
      c.seed = parse_number<std::uint64_t>(flag, value(), 0, UINT64_MAX);
    } else if (flag == "--default-max-tokens") {
      c.default_max_tokens = static_cast<std::uint32_t>(count(1L << 24));
    } else if (flag == "--tokenizer") {
      o.tokenizer_dir = value();
      if (o.tokenizer_dir.empty()) die("--tokenizer: must not be empty");
    } else if (flag == "--kv-events") {
      c.kv_events = true;
    } else if (flag == "--kv-events-port") {
      c.kv_events = true;
      o.kv_events_port = port();
    } else if (flag == "--kv-replay-port") {
      c.kv_events = true;
      o.kv_replay_port = port();
    } else if (flag == "--no-kv-replay") {
      o.replay = false;
    } else if (flag == "--kv-events-encoding") {
      o.encoding = value();
      if (o.encoding != "array" && o.encoding != "map") {
        die("--kv-events-encoding: expected array or map, got \"" + o.encoding + "\"");
      }
    } else if (flag == "--kv-events-topic") {
      c.kv.topic = value();
    } else if (flag == "--kv-events-buffer") {
      c.kv.buffer_steps = static_cast<std::size_t>(count(1L << 22));
    } else if (flag == "--kv-hash") {
      const std::string v = value();
      if (v == "fast64") c.hash = omni::sim::HashAlgo::kFast64;
      else if (v == "sha256") c.hash = omni::sim::HashAlgo::kSha256;
      else die("--kv-hash: expected fast64 or sha256, got \"" + v + "\"");
    } else if (flag == "--kv-hold-timeout") {
      c.kv_hold_timeout_s = seconds();
    } else if (flag == "--kv-load-failure-policy") {
      const std::string v = value();
      if (v == "fail") c.kv_load_recompute = false;
      else if (v == "recompute") c.kv_load_recompute = true;
      else die("--kv-load-failure-policy: expected fail or recompute, got \"" + v + "\"");
    } else if (flag == "--bootstrap-timeout") {
      c.bootstrap_timeout_s = seconds();
    } else if (flag == "--waiting-timeout") {
      c.waiting_timeout_s = seconds();
    } else if (flag == "--fault-error-rate") {
      c.faults.error_rate = rate();
    } else if (flag == "--fault-hang-rate") {
      c.faults.hang_rate = rate();
    } else if (flag == "--fault-disconnect-rate") {
      c.faults.disconnect_rate = rate();
    } else if (flag == "--fault-slow-rate") {
      c.faults.slow_rate = rate();
    } else if (flag == "--fault-slow-ms") {
      c.faults.slow_ms = parse_number<double>(flag, value(), 0.0, 1e9);
    } else if (flag == "--fault-slowdown") {
      c.faults.slowdown = parse_number<double>(flag, value(), 0.01, 1e6);
    } else if (flag == "--fault-crash-after") {
      c.faults.crash_after = parse_number<std::uint64_t>(flag, value(), 1, UINT64_MAX);
    } else if (flag == "--fault-instances") {
      std::stringstream ss(value());
      std::string item;
      while (std::getline(ss, item, ',')) {
        o.fault_instances.insert(parse_number<int>(flag, item, 0, kMaxInstances - 1));
      }
    } else if (flag == "--keepalive-timeout") {
      c.http.keepalive_timeout_s = seconds();
    } else if (flag == "--max-body-bytes") {
      c.http.body_limit = static_cast<std::size_t>(count(1L << 32));
    } else if (flag == "--ready-file") {
      o.ready_file = value();
    } else if (flag == "--duration") {
      o.duration_s = seconds();
    } else {
      die("unknown option \"" + flag + "\"");
    }
  }
  const double total_rate = c.faults.error_rate + c.faults.hang_rate + c.faults.disconnect_rate +
                            c.faults.slow_rate;
  if (total_rate > 1.0) die("the fault rates add up to more than 1");
  if (c.faults.slow_rate > 0 && c.faults.slow_ms <= 0) die("--fault-slow-rate needs --fault-slow-ms");
  if (o.encoding.empty()) o.encoding = c.engine == EngineKind::kVllm ? "map" : "array";
  c.kv.encode.encoding =
      o.encoding == "map" ? omni::kv::EventEncoding::kMap : omni::kv::EventEncoding::kArray;
  c.kv.encode.layout =
      c.engine == EngineKind::kVllm ? omni::kv::EventLayout::kVllm : omni::kv::EventLayout::kSglang;
  if (!o.replay) o.kv_replay_port = -1;

  try {
    c.profile = omni::sim::builtin_profile(o.profile);
  } catch (const std::exception& e) {
    die(std::string("--profile: ") + e.what());
  }
  if (o.block_size > 0) c.profile.block_size = static_cast<std::uint32_t>(o.block_size);
  if (o.num_blocks > 0) c.profile.num_blocks = static_cast<std::uint32_t>(o.num_blocks);
  if (o.max_num_seqs > 0) c.profile.max_num_seqs = static_cast<std::uint32_t>(o.max_num_seqs);
  if (o.max_batched > 0) c.profile.max_num_batched_tokens = static_cast<std::uint32_t>(o.max_batched);
  if (o.max_model_len > 0) c.profile.max_model_len = static_cast<std::uint32_t>(o.max_model_len);
  try {
    omni::sim::validate(c.profile);
  } catch (const std::exception& e) {
    die(e.what());
  }
  for (int base : {o.port, o.kv_transfer_port, o.bootstrap_port, o.kv_events_port, o.kv_replay_port}) {
    if (base > 0 && base + o.instances - 1 > 65535) die("a port range runs past 65535");
  }
  return o;
}

std::uint16_t nth_port(int base, int i) {
  return base <= 0 ? 0 : static_cast<std::uint16_t>(base + i);
}

void write_ready_file(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << text << "\n";
    if (!f) die("cannot write " + tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) die("cannot rename " + tmp + " to " + path);
}

}  // namespace

int main(int argc, char** argv) {
  Options o = parse_args(argc, argv);
  // The model's tokenizer, shared by every instance, and the threads that tokenize with it: one
  // per instance up to the number of cores.
  std::optional<boost::asio::thread_pool> tokenize_pool;
  if (!o.tokenizer_dir.empty()) {
    try {
      o.base.tokenizer = omni::sim::ModelTokenizer::load(o.tokenizer_dir);
    } catch (const std::exception& e) {
      std::cerr << "omni-sim: --tokenizer: " << e.what() << "\n";
      return 2;
    }
    const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
    tokenize_pool.emplace(std::min<std::size_t>(cores, static_cast<std::size_t>(o.instances)));
    o.base.tokenize_pool = &*tokenize_pool;
  }
  boost::asio::io_context io(1);
  std::optional<zmq::context_t> zmq_ctx;
  if (o.base.kv_events) zmq_ctx.emplace(1);

  std::vector<std::unique_ptr<omni::sim::Instance>> instances;
  try {
    for (int i = 0; i < o.instances; ++i) {
      omni::sim::InstanceConfig c = o.base;
      c.index = i;
      c.http_port = nth_port(o.port, i);
      c.side_port = nth_port(o.kv_transfer_port, i);
      c.bootstrap_port = nth_port(o.bootstrap_port, i);
      c.kv.pub_port = o.kv_events_port <= 0 ? 0 : o.kv_events_port + i;
      c.kv.replay_port = o.kv_replay_port < 0 ? -1 : (o.kv_replay_port == 0 ? 0 : o.kv_replay_port + i);
      if (!o.fault_instances.empty() && o.fault_instances.count(i) == 0) c.faults = {};
      instances.push_back(std::make_unique<omni::sim::Instance>(io, zmq_ctx ? &*zmq_ctx : nullptr, c));
    }
  } catch (const std::exception& e) {
    std::cerr << "omni-sim: cannot start: " << e.what() << "\n";
    return 1;
  }

  omni::sim::ReplayService replay;
  if (zmq_ctx) {
    std::vector<omni::sim::KvEventPublisher*> pubs;
    for (auto& inst : instances) {
      if (inst->publisher() != nullptr) pubs.push_back(inst->publisher());
    }
    replay.start(std::move(pubs));
  }

  nlohmann::json ready = {{"event", "ready"},
                          {"version", omni::kVersion},
                          {"pid", static_cast<long>(::getpid())},
                          {"instances", nlohmann::json::array()}};
  for (auto& inst : instances) ready["instances"].push_back(inst->describe());
  const std::string ready_text = ready.dump();
  std::cout << ready_text << std::endl;
  if (!o.ready_file.empty()) write_ready_file(o.ready_file, ready_text);

  boost::asio::signal_set signals(io, SIGINT, SIGTERM);
  signals.async_wait([&](const boost::system::error_code&, int) { io.stop(); });
  boost::asio::steady_timer deadline(io);
  if (o.duration_s > 0) {
    deadline.expires_after(std::chrono::milliseconds(static_cast<long>(o.duration_s * 1000)));
    deadline.async_wait([&](const boost::system::error_code& ec) {
      if (!ec) io.stop();
    });
  }
  ::signal(SIGPIPE, SIG_IGN);
  io.run();
  // No tokenizing may be running once the instances it works for are gone.
  if (tokenize_pool) {
    tokenize_pool->stop();
    tokenize_pool->join();
  }
  replay.stop();
  instances.clear();
  return 0;
}
