// One simulated engine instance: an Engine driven in real time, its HTTP API, its KV event
// publisher, and its side of the P/D handshakes.
//
// P/D, vLLM style (NixlConnector): a prefill given kv_transfer_params.do_remote_decode keeps
// the prompt's blocks after answering, and returns kv_transfer_params naming them and its side
// channel (remote_host/remote_port). A decode given do_remote_prefill allocates the prompt's
// blocks and pulls the remote ones over that side channel (POST /v1/kv/pull); the transfer
// takes the profile's transfer time, after which the prefill frees them. Held blocks are freed
// after kv_hold_timeout_s if nobody pulls them.
//
// P/D, SGLang style: prefill and decode receive the same body with bootstrap_host/port/room.
// The prefill waits in its bootstrap queue until the decode joins the room at the prefill's
// bootstrap server (POST /bootstrap/join, a long poll); then it prefills, transfers and
// answers both. Either side gives up with an error after its timeout.
//
// Threads: everything runs on the io_context's thread, except that with a model tokenizer
// (`--tokenizer`) generation requests are parsed and tokenized on a thread pool shared by the
// instances (one request at a time per instance, in arrival order, much as an engine's single
// tokenizing thread or process), so that a long prompt does not stall every instance's steps
// and streams; the parsed request comes back to the io thread.
#pragma once

#include "engine.hpp"
#include "http_client.hpp"
#include "http_server.hpp"
#include "kv_publisher.hpp"
#include "protocol.hpp"
#include "timing_model.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/thread_pool.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace omni::sim {

enum class Role { kPrefill, kDecode, kBoth };
const char* to_string(Role r) noexcept;
const char* to_string(EngineKind k) noexcept;

struct FaultConfig {
  double error_rate = 0;       // answer 500 at once
  double hang_rate = 0;        // accept and never answer
  double disconnect_rate = 0;  // reset the connection after the first output token
  double slow_rate = 0;        // delay admission by slow_ms
  double slow_ms = 0;
  double slowdown = 1.0;       // multiplies every step time
  std::uint64_t crash_after = 0;  // crash when request crash_after+1 arrives (0: never)
  bool any() const noexcept {
    return error_rate > 0 || hang_rate > 0 || disconnect_rate > 0 || slow_rate > 0 ||
           slowdown != 1.0 || crash_after > 0;
  }
};

struct InstanceConfig {
  EngineKind engine = EngineKind::kVllm;
  Role role = Role::kBoth;
  int index = 0;
  std::string host = "127.0.0.1";  // bind address, and the address given to peers
  std::uint16_t http_port = 0;
  std::uint16_t side_port = 0;       // vLLM prefill: KV side channel
  std::uint16_t bootstrap_port = 0;  // SGLang prefill: bootstrap server
  Profile profile;
  HashAlgo hash = HashAlgo::kFast64;
  double time_scale = 1.0;           // wall time = model time x time_scale
  std::uint64_t seed = 1;
  std::string model = "omni-sim";
  std::uint32_t default_max_tokens = 256;
  bool kv_events = false;
  KvPublisherOptions kv;
  double kv_hold_timeout_s = 480;    // vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT
  double bootstrap_timeout_s = 300;  // SGLang's SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT
  double waiting_timeout_s = 300;    // SGLang's SGLANG_DISAGGREGATION_WAITING_TIMEOUT
  bool kv_load_recompute = false;    // vLLM kv_load_failure_policy: false = "fail"
  FaultConfig faults;
  http::ServerOptions http;
  std::string engine_id;
  // --tokenizer: the model's tokenizer, shared by the instances (null: the stand-in).
  std::shared_ptr<const ModelTokenizer> tokenizer;
  // Where requests are parsed and tokenized (null: on the io thread). Must outlive the
  // instance's use of it: the owner stops and joins it before destroying instances.
  boost::asio::thread_pool* tokenize_pool = nullptr;
};

class Instance {
 public:
  Instance(boost::asio::io_context& io, zmq::context_t* zmq_ctx, InstanceConfig config);
  ~Instance();
  Instance(const Instance&) = delete;
  Instance& operator=(const Instance&) = delete;

  // Ports and endpoints, as printed at start-up.
  nlohmann::json describe() const;
  KvEventPublisher* publisher() noexcept { return publisher_.get(); }
  // Stops everything at once, as a crashed engine would: listeners close, connections reset.
  void crash();
  bool crashed() const noexcept { return crashed_; }
  const Engine& engine() const noexcept { return *engine_; }

 private:
  struct Job;
  struct Room;
  struct HeldKv;

  void handle(http::Request&& req, const std::shared_ptr<http::Responder>& res);
  void route(http::Request&& req, const std::shared_ptr<http::Responder>& res);
  void handle_generate(Api api, http::Request&& req, const std::shared_ptr<http::Responder>& res);
  // The rest of handle_generate once the body is parsed (on the io thread).
  void start_job(Api api, const http::Request& req, const std::shared_ptr<http::Responder>& res,
                 const std::string& fault, std::variant<ParsedRequest, ProtocolError>&& parsed);
  void internal_error(const std::shared_ptr<http::Responder>& res, const std::exception& e);
  void handle_side(http::Request&& req, const std::shared_ptr<http::Responder>& res);
  void handle_bootstrap(http::Request&& req, const std::shared_ptr<http::Responder>& res);

  void submit(const std::shared_ptr<Job>& job, std::size_t item);
  void on_token(const std::shared_ptr<Job>& job, std::size_t item, SeqRequest& r, TokenId t);
  void on_finish(const std::shared_ptr<Job>& job, std::size_t item, SeqRequest& r,
                 FinishReason reason, const std::string& error);
  void complete_item(const std::shared_ptr<Job>& job, std::size_t item);
  void fail_job(const std::shared_ptr<Job>& job, int status, const std::string& message);
  void abort_job(const std::shared_ptr<Job>& job);
  void retire(const std::shared_ptr<Job>& job);
  void start_vllm_pull(const std::shared_ptr<Job>& job, SeqRequest& r);
  void start_sglang_join(const std::shared_ptr<Job>& job, std::size_t item, SeqRequest& r);
  void hold_for_pull(const std::shared_ptr<Job>& job, SeqRequest& r);
  void sglang_transfer(const std::shared_ptr<Job>& job, std::size_t item, SeqRequest& r);
  void drop_room(std::uint64_t room);

  void kick();
  void run_step();
  double now_ms() const;
  void after_ms(double ms, std::function<void()> fn);
  TokenId sample();

  std::string metrics_text() const;
  std::string loads_json() const;
  std::string server_info_json() const;

  boost::asio::io_context& io_;
  InstanceConfig cfg_;
  Protocol protocol_;
  TimingModel timing_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<http::Server> server_;
  std::unique_ptr<http::Server> side_server_;       // vLLM prefill side channel
  std::unique_ptr<http::Server> bootstrap_server_;  // SGLang prefill bootstrap
  std::unique_ptr<KvEventPublisher> publisher_;
  std::optional<boost::asio::strand<boost::asio::thread_pool::executor_type>> tokenize_strand_;
  boost::asio::steady_timer step_timer_;
  bool step_in_flight_ = false;
  bool kick_posted_ = false;
  bool crashed_ = false;
  std::mt19937_64 rng_;     // seeded: sampling, faults, output lengths
  std::mt19937_64 id_rng_;  // request and engine ids
  std::chrono::steady_clock::time_point start_;

  std::unordered_map<std::string, std::shared_ptr<HeldKv>> held_;  // by remote_request_id
  std::map<std::uint64_t, std::shared_ptr<Room>> rooms_;            // SGLang bootstrap rooms
  // Every job that has not answered yet. Jobs are owned here; everything else holds weak
  // references, so a finished job is freed at once.
  std::unordered_set<std::shared_ptr<Job>> jobs_;

  // Counters for /metrics beyond the engine's own.
  std::uint64_t requests_seen_ = 0;
  std::uint64_t requests_ok_ = 0;
  std::uint64_t requests_error_ = 0;
  std::uint64_t kv_pulls_served_ = 0, kv_pulls_failed_ = 0;
  std::uint64_t kv_blocks_sent_ = 0, kv_blocks_received_ = 0;
  std::uint64_t kv_holds_expired_ = 0;
  std::uint64_t bootstrap_timeouts_ = 0;
  std::map<std::string, std::uint64_t> faults_injected_;
  struct Histogram {
    std::vector<double> bounds;
    std::vector<std::uint64_t> counts;
    std::uint64_t overflow = 0;
    double sum = 0;
    void observe(double v);
  };
  Histogram ttft_, e2e_, itl_;
};

}  // namespace omni::sim
