#include "instance.hpp"

#include <omni/prometheus.hpp>
#include <omni/version.hpp>

#include <boost/asio/post.hpp>

#include <algorithm>
#include <cmath>
#include <ctime>

namespace omni::sim {

using nlohmann::json;
namespace asio = boost::asio;

const char* to_string(Role r) noexcept {
  switch (r) {
    case Role::kPrefill: return "prefill";
    case Role::kDecode: return "decode";
    case Role::kBoth: return "both";
  }
  return "both";
}

const char* to_string(EngineKind k) noexcept {
  return k == EngineKind::kVllm ? "vllm" : "sglang";
}

// One client request: one or more sequences (a batch of prompts, n samples each) answered
// together. Item i is sample i % n of prompt i / n; sample 0 is the engine request that
// computes the prompt, the others are its forks.
struct Instance::Job {
  Api api = Api::kCompletions;
  ParsedRequest parsed;
  ResponseMeta meta;
  std::shared_ptr<http::Responder> res;
  std::vector<RequestPtr> items;
  std::vector<ChoiceResult> choices;
  std::vector<bool> item_done;
  bool roles_sent = false;                 // chat stream: the role chunks went out
  std::size_t remaining = 0;
  bool done = false;
  bool prefill_for_remote_decode = false;  // vLLM P leg
  bool sglang_prefill = false;             // SGLang P leg
  std::optional<json> kv_params_out;       // vLLM P leg answer
  std::vector<std::shared_ptr<http::ClientCall>> calls;
  std::vector<std::uint64_t> rooms;
  std::string fault;                       // "", "disconnect"
  double arrival_ms = 0;
  std::vector<double> last_token_ms;       // per item, for inter-token latency
  // The answer is a list (SGLang /generate): a batch input, or n > 1.
  bool list_answer() const { return parsed.batch || parsed.n > 1; }
};

struct Instance::Room {
  std::weak_ptr<Job> job;                  // the prefill request, once it arrived
  std::size_t item = 0;
  std::shared_ptr<http::Responder> join;   // the decode's long poll, once it arrived
  bool prefill_started = false;
  std::shared_ptr<asio::steady_timer> timer;
  std::uint32_t num_blocks = 0;
};

struct Instance::HeldKv {
  std::uint64_t engine_request_id = 0;
  std::vector<std::uint32_t> block_ids;
  bool transferring = false;
  std::shared_ptr<asio::steady_timer> expiry;
};

namespace {

const std::vector<double> kTtftBuckets = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                                          0.25,  0.5,   0.75, 1.0,  2.5,  5.0,  7.5,  10.0,
                                          20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
const std::vector<double> kE2eBuckets = {0.3,  0.5,  0.8,  1.0,   1.5,   2.0,   2.5,
                                         5.0,  10.0, 15.0, 20.0,  30.0,  40.0,  50.0,
                                         60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};
const std::vector<double> kItlBuckets = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                                         0.4,  0.5,   0.75, 1.0,   2.5, 5.0,  7.5, 10.0};

std::string random_hex(std::mt19937_64& rng, int bytes) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < bytes; ++i) {
    const auto v = static_cast<unsigned>(rng() & 0xff);
    s.push_back(digits[v >> 4]);
    s.push_back(digits[v & 0xf]);
  }
  return s;
}

double wall_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

void Instance::Histogram::observe(double v) {
  sum += v;
  for (std::size_t i = 0; i < bounds.size(); ++i) {
    if (v <= bounds[i]) {
      counts[i]++;
      return;
    }
  }
  overflow++;
}

Instance::Instance(asio::io_context& io, zmq::context_t* zmq_ctx, InstanceConfig config)
    : io_(io),
      cfg_(std::move(config)),
      protocol_(cfg_.engine, cfg_.model, cfg_.profile.max_model_len, cfg_.default_max_tokens,
                cfg_.tokenizer),
      timing_(cfg_.profile, cfg_.seed * 7919 + static_cast<std::uint64_t>(cfg_.index)),
      step_timer_(io),
      rng_(cfg_.seed * 104729 + static_cast<std::uint64_t>(cfg_.index)),
      start_(std::chrono::steady_clock::now()) {
  ttft_.bounds = kTtftBuckets;
  ttft_.counts.assign(kTtftBuckets.size(), 0);
  e2e_.bounds = kE2eBuckets;
  e2e_.counts.assign(kE2eBuckets.size(), 0);
  itl_.bounds = kItlBuckets;
  itl_.counts.assign(kItlBuckets.size(), 0);
  {
    // Ids are unique across processes and runs; they never draw from the seeded RNG, so ids
    // do not perturb the model's reproducible sequence.
    std::random_device rd;
    id_rng_.seed((static_cast<std::uint64_t>(rd()) << 32) ^ rd());
  }
  if (cfg_.engine_id.empty()) cfg_.engine_id = random_hex(id_rng_, 16);
  if (cfg_.tokenizer && cfg_.tokenize_pool != nullptr) {
    tokenize_strand_.emplace(asio::make_strand(cfg_.tokenize_pool->get_executor()));
  }

  Engine::Hooks hooks;
  hooks.sample = [this](SeqRequest&) { return sample(); };
  engine_ = std::make_unique<Engine>(cfg_.profile, cfg_.hash, std::move(hooks));

  server_ = std::make_unique<http::Server>(
      io_, cfg_.host, cfg_.http_port,
      [this](http::Request&& req, const std::shared_ptr<http::Responder>& res) {
        handle(std::move(req), res);
      },
      cfg_.http);
  http::ServerOptions internal = cfg_.http;
  internal.keepalive_timeout_s = std::max(cfg_.http.keepalive_timeout_s, 60.0);
  if (cfg_.role == Role::kPrefill && cfg_.engine == EngineKind::kVllm) {
    side_server_ = std::make_unique<http::Server>(
        io_, cfg_.host, cfg_.side_port,
        [this](http::Request&& req, const std::shared_ptr<http::Responder>& res) {
          handle_side(std::move(req), res);
        },
        internal);
  }
  if (cfg_.role == Role::kPrefill && cfg_.engine == EngineKind::kSglang) {
    bootstrap_server_ = std::make_unique<http::Server>(
        io_, cfg_.host, cfg_.bootstrap_port,
        [this](http::Request&& req, const std::shared_ptr<http::Responder>& res) {
          handle_bootstrap(std::move(req), res);
        },
        internal);
  }
  if (cfg_.kv_events && zmq_ctx != nullptr) {
    KvPublisherOptions kv = cfg_.kv;
    kv.host = cfg_.host;
    publisher_ = std::make_unique<KvEventPublisher>(*zmq_ctx, kv);
  }
}

Instance::~Instance() {
  // Closing a server runs its sessions' disconnect callbacks, which reach into this instance's
  // jobs and bootstrap rooms: close the servers while those members still exist.
  bootstrap_server_.reset();
  side_server_.reset();
  server_.reset();
}

json Instance::describe() const {
  json j = {{"index", cfg_.index},
            {"engine", to_string(cfg_.engine)},
            {"role", to_string(cfg_.role)},
            {"engine_id", cfg_.engine_id},
            {"host", cfg_.host},
            {"http_port", server_->port()},
            {"url", "http://" + cfg_.host + ":" + std::to_string(server_->port())},
            {"block_size", cfg_.profile.block_size},
            {"num_blocks", cfg_.profile.num_blocks},
            {"profile", cfg_.profile.name}};
  if (side_server_) j["kv_transfer_port"] = side_server_->port();
  if (bootstrap_server_) j["bootstrap_port"] = bootstrap_server_->port();
  if (publisher_) {
    j["kv_events_endpoint"] = publisher_->pub_endpoint();
    j["kv_events_port"] = publisher_->pub_port();
    if (publisher_->replay_port() >= 0) {
      j["kv_replay_endpoint"] = publisher_->replay_endpoint();
      j["kv_replay_port"] = publisher_->replay_port();
    }
  }
  return j;
}

double Instance::now_ms() const {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start_)
      .count();
}

void Instance::after_ms(double ms, std::function<void()> fn) {
  auto timer = std::make_shared<asio::steady_timer>(io_);
  timer->expires_after(std::chrono::microseconds(static_cast<std::int64_t>(ms * 1000.0)));
  timer->async_wait([timer, fn = std::move(fn)](boost::system::error_code ec) {
    if (!ec) fn();
  });
}

TokenId Instance::sample() {
  return SimTokenizer::lexicon_token(static_cast<std::size_t>(rng_() % SimTokenizer::lexicon_size()));
}

// ---------------------------------------------------------------------------------------------
// The step loop
// ---------------------------------------------------------------------------------------------

void Instance::kick() {
  if (crashed_ || step_in_flight_ || kick_posted_) return;
  kick_posted_ = true;
  asio::post(io_, [this] {
    kick_posted_ = false;
    if (!step_in_flight_) run_step();
  });
}

void Instance::run_step() {
  if (crashed_) return;
  const StepWork work = engine_->schedule(now_ms());
  if (!engine_->step_planned()) {
    step_in_flight_ = false;
    return;
  }
  step_in_flight_ = true;
  const double ms = timing_.step_ms(work) * cfg_.time_scale * cfg_.faults.slowdown;
  step_timer_.expires_after(std::chrono::microseconds(static_cast<std::int64_t>(ms * 1000.0)));
  step_timer_.async_wait([this](boost::system::error_code ec) {
    if (ec || crashed_) return;
    engine_->complete_step(now_ms());
    if (publisher_) publisher_->publish(engine_->take_events(), wall_seconds());
    run_step();
  });
}

// ---------------------------------------------------------------------------------------------
// HTTP routing
// ---------------------------------------------------------------------------------------------

void Instance::handle(http::Request&& req, const std::shared_ptr<http::Responder>& res) {
  // Nothing a request does may take the process down: any exception becomes a 500.
  try {
    route(std::move(req), res);
  } catch (const std::exception& e) {
    internal_error(res, e);
  }
}

void Instance::internal_error(const std::shared_ptr<http::Responder>& res,
                              const std::exception& e) {
  requests_error_++;
  std::fprintf(stderr, "omni-sim: instance %d: internal error: %s\n", cfg_.index, e.what());
  if (res->open()) {
    res->send(500, "application/json",
              protocol_.error_body(Api::kCompletions, 500,
                                   std::string("internal error: ") + e.what(),
                                   "InternalServerError"));
  }
}

void Instance::route(http::Request&& req, const std::shared_ptr<http::Responder>& res) {
  const std::string path = req.path();
  const bool get = req.method == "GET" || req.method == "HEAD";
  const bool post = req.method == "POST";
  const bool sglang = cfg_.engine == EngineKind::kSglang;
  auto method_not_allowed = [&] {
    res->send(405, "application/json", "{\"detail\":\"Method Not Allowed\"}");
  };
  if (path == "/health") {
    if (!get) return method_not_allowed();
    return res->send(200, "application/json", "");
  }
  if (path == "/metrics") {
    if (!get) return method_not_allowed();
    return res->send(200, "text/plain; version=0.0.4; charset=utf-8", metrics_text());
  }
  if (path == "/v1/models") {
    if (!get) return method_not_allowed();
    return res->send(200, "application/json", protocol_.models_body(std::time(nullptr)));
  }
  if (path == "/v1/completions" || path == "/v1/chat/completions" ||
      (sglang && path == "/generate")) {
    if (!post) return method_not_allowed();
    const Api api = path == "/generate"        ? Api::kGenerate
                    : path == "/v1/completions" ? Api::kCompletions
                                                : Api::kChatCompletions;
    return handle_generate(api, std::move(req), res);
  }
  if ((!sglang && path == "/reset_prefix_cache") || (sglang && path == "/flush_cache")) {
    if (!post) return method_not_allowed();
    engine_->reset_prefix_cache();
    if (publisher_) publisher_->publish(engine_->take_events(), wall_seconds());
    return res->send(200, "application/json", "");
  }
  if (sglang && path == "/v1/loads") {
    if (!get) return method_not_allowed();
    return res->send(200, "application/json", loads_json());
  }
  if (sglang && (path == "/get_server_info" || path == "/server_info")) {
    if (!get) return method_not_allowed();
    return res->send(200, "application/json", server_info_json());
  }
  if (!sglang && path == "/version") {
    return res->send(200, "application/json",
                     json{{"version", std::string("omni-sim ") + kVersion}}.dump());
  }
  res->send(404, "application/json", "{\"detail\":\"Not Found\"}");
}

void Instance::handle_generate(Api api, http::Request&& req,
                               const std::shared_ptr<http::Responder>& res) {
  requests_seen_++;
  if (cfg_.faults.crash_after > 0 && requests_seen_ > cfg_.faults.crash_after) {
    faults_injected_["crash"]++;
    crash();
    return;
  }
  // Faults are drawn before parsing, so a fault rate applies to every request.
  std::string fault;
  if (cfg_.faults.any()) {
    const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
    double edge = cfg_.faults.error_rate;
    if (u < edge) {
      fault = "error";
    } else if (u < (edge += cfg_.faults.hang_rate)) {
      fault = "hang";
    } else if (u < (edge += cfg_.faults.disconnect_rate)) {
      fault = "disconnect";
    } else if (u < (edge += cfg_.faults.slow_rate)) {
      fault = "slow";
    }
  }
  if (fault == "error") {
    faults_injected_["error"]++;
    requests_error_++;
    return res->send(500, "application/json",
                     protocol_.error_body(api, 500, "Injected fault: internal server error",
                                          "InternalServerError"));
  }
  if (fault == "hang") {
    faults_injected_["hang"]++;
    return;  // never answered; the connection stays open until the client gives up
  }

  if (!tokenize_strand_) return start_job(api, req, res, fault, protocol_.parse(api, req.body));

  // Off this thread: parsing and tokenizing a long prompt takes milliseconds, during which
  // this thread would stall every instance's steps and streams. The protocol is immutable but
  // for its atomic counters; the instance outlives the pool's work (see InstanceConfig).
  asio::post(*tokenize_strand_, [this, api, req = std::move(req), res, fault]() mutable {
    std::variant<ParsedRequest, ProtocolError> parsed;
    try {
      parsed = protocol_.parse(api, req.body);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "omni-sim: instance %d: internal error: %s\n", cfg_.index, e.what());
      parsed = protocol_.error(api, 500, std::string("internal error: ") + e.what(),
                               "InternalServerError");
    }
    std::string().swap(req.body);
    asio::post(io_, [this, api, req = std::move(req), res = std::move(res),
                     fault = std::move(fault), parsed = std::move(parsed)]() mutable {
      // The client may have gone, or the instance crashed, meanwhile.
      if (crashed_ || !res->open()) return;
      try {
        start_job(api, req, res, fault, std::move(parsed));
      } catch (const std::exception& e) {
        internal_error(res, e);
      }
    });
  });
}

void Instance::start_job(Api api, const http::Request& req,
                         const std::shared_ptr<http::Responder>& res, const std::string& fault,
                         std::variant<ParsedRequest, ProtocolError>&& parsed) {
  if (auto* err = std::get_if<ProtocolError>(&parsed)) {
    requests_error_++;
    return res->send(err->status, "application/json", err->body);
  }
  auto job = std::make_shared<Job>();
  job->api = api;
  job->parsed = std::move(std::get<ParsedRequest>(parsed));
  job->res = res;
  job->fault = fault;
  job->arrival_ms = now_ms();
  const ParsedRequest& p = job->parsed;

  std::string base = req.header("x-request-id");
  if (base.empty()) base = random_hex(id_rng_, 16);
  if (api == Api::kGenerate) {
    job->meta.id = p.rid.empty() ? random_hex(id_rng_, 16) : p.rid;
  } else {
    job->meta.id = (api == Api::kCompletions ? "cmpl-" : "chatcmpl-") + base;
  }
  job->meta.model = cfg_.model;
  job->meta.created = std::time(nullptr);

  // P/D roles of this request.
  const bool vllm = cfg_.engine == EngineKind::kVllm;
  bool remote_decode = false, remote_prefill = false;
  if (vllm && p.kv_transfer_params) {
    remote_decode = p.kv_transfer_params->value("do_remote_decode", false);
    remote_prefill = p.kv_transfer_params->value("do_remote_prefill", false);
    if (remote_decode && cfg_.role == Role::kDecode) {
      return res->send(400, "application/json",
                       protocol_.error_body(api, 400,
                                            "do_remote_decode was requested from a decode "
                                            "instance, which cannot produce KV for others",
                                            "BadRequestError", "kv_transfer_params"));
    }
    if (remote_prefill && cfg_.role == Role::kPrefill) {
      return res->send(400, "application/json",
                       protocol_.error_body(api, 400,
                                            "do_remote_prefill was requested from a prefill "
                                            "instance, which cannot load remote KV",
                                            "BadRequestError", "kv_transfer_params"));
    }
  }
  const bool sglang_pd = !vllm && !p.bootstrap.empty() && cfg_.role != Role::kBoth;
  job->prefill_for_remote_decode = remote_decode;
  job->sglang_prefill = sglang_pd && cfg_.role == Role::kPrefill;
  jobs_.insert(job);

  // n samples of each prompt: sample 0 computes the prompt (and is the one that holds or
  // loads KV in P/D); samples 1..n-1 are its forks, each with its own output length. A P/D
  // prefill with n > 1 computes the prompt once and answers n one-token choices; the KV it
  // holds for the decode is sample 0's.
  const std::size_t per_prompt = p.n;
  const std::size_t n = p.prompts.size() * per_prompt;
  job->choices.resize(n);
  job->item_done.assign(n, false);
  job->last_token_ms.assign(n, -1.0);
  job->remaining = n;
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t prompt_index = i / per_prompt;
    const auto sample = static_cast<std::uint32_t>(i % per_prompt);
    const std::vector<TokenId>& prompt = p.prompts[prompt_index];
    auto r = std::make_shared<SeqRequest>();
    // vLLM names the samples of a request n>1 "<sample>_<request id>".
    r->request_id = job->meta.id + "-" + std::to_string(prompt_index);
    if (sample > 0) r->request_id = std::to_string(sample) + "_" + r->request_id;
    if (sample == 0) r->tokens = prompt;  // forks get it from the engine
    if (p.max_tokens_given || api == Api::kGenerate) {
      r->max_output_tokens = p.max_tokens;
      r->reason_at_limit = FinishReason::kLength;
    } else {
      // No max_tokens: the sequence ends as if the model emitted EOS after a random length,
      // within what the context leaves; every sample draws its own.
      const auto room = cfg_.profile.max_model_len - static_cast<std::uint32_t>(prompt.size());
      r->max_output_tokens = std::min<std::uint32_t>(
          room, 1 + static_cast<std::uint32_t>(rng_() % cfg_.default_max_tokens));
      r->reason_at_limit = FinishReason::kStop;
    }
    r->hold_blocks_after_finish = sample == 0 && (remote_decode || job->sglang_prefill);
    r->remote_kv_load =
        sample == 0 && (remote_prefill || (sglang_pd && cfg_.role == Role::kDecode));
    std::weak_ptr<Job> weak = job;
    r->on_token = [this, weak, i](SeqRequest& sr, TokenId t) {
      if (auto j = weak.lock()) on_token(j, i, sr, t);
    };
    r->on_finish = [this, weak, i](SeqRequest& sr, FinishReason reason, const std::string& e) {
      if (auto j = weak.lock()) on_finish(j, i, sr, reason, e);
    };
    if (remote_prefill && r->remote_kv_load) {
      r->start_kv_load = [this, weak](SeqRequest& sr) {
        if (auto j = weak.lock()) start_vllm_pull(j, sr);
      };
    } else if (r->remote_kv_load) {
      // (The protocol refuses n > 1 with bootstrap fields: item i is prompt i.)
      r->start_kv_load = [this, weak, i](SeqRequest& sr) {
        if (auto j = weak.lock()) start_sglang_join(j, i, sr);
      };
    }
    job->choices[i].prompt_tokens = static_cast<std::uint32_t>(prompt.size());
    job->choices[i].sample = sample;
    if (sample > 0) job->items[i - sample]->forks.push_back(r);
    job->items.push_back(std::move(r));
  }

  res->on_disconnect([this, weak = std::weak_ptr<Job>(job)] {
    if (auto j = weak.lock()) abort_job(j);
  });
  if (p.stream) {
    http::Headers h;
    if (vllm) h.emplace_back("x-request-id", base);
    res->start_stream(200, "text/event-stream; charset=utf-8", h);
  }

  auto admit_all = [this, job] {
    if (job->done) return;
    // The forks go in with their sample 0.
    for (std::size_t i = 0; i < job->items.size(); i += job->parsed.n) submit(job, i);
  };
  if (fault == "slow") {
    faults_injected_["slow"]++;
    after_ms(cfg_.faults.slow_ms, admit_all);
  } else {
    admit_all();
  }
}

// Hands one sequence to the engine, or (SGLang prefill) to its bootstrap room.
void Instance::submit(const std::shared_ptr<Job>& job, std::size_t i) {
  if (job->done) return;
  if (job->sglang_prefill) {
    const std::uint64_t room_id = job->parsed.bootstrap[i].room;
    auto& room = rooms_[room_id];
    if (!room) room = std::make_shared<Room>();
    if (!room->job.expired()) {
      return fail_job(job, 409,
                      "bootstrap_room " + std::to_string(room_id) + " is already in use");
    }
    room->job = job;
    room->item = i;
    job->rooms.push_back(room_id);
    if (!room->join) {
      // Wait in the bootstrap queue for the decode to join.
      room->timer = std::make_shared<asio::steady_timer>(io_);
      room->timer->expires_after(
          std::chrono::milliseconds(static_cast<std::int64_t>(cfg_.bootstrap_timeout_s * 1000)));
      std::weak_ptr<Job> weak = job;
      room->timer->async_wait([this, weak, room_id](boost::system::error_code ec) {
        if (ec) return;
        bootstrap_timeouts_++;
        if (auto j = weak.lock()) {
          char secs[32];
          std::snprintf(secs, sizeof secs, "%.1f", cfg_.bootstrap_timeout_s);
          fail_job(j, 500,
                   "KVTransferError(bootstrap_room=" + std::to_string(room_id) + "): Request " +
                       std::to_string(room_id) + " timed out after " + secs +
                       "s in KVPoll.Bootstrapping");
        }
      });
      return;
    }
    room->prefill_started = true;
  }
  const auto& r = job->items[i];
  std::string why = engine_->add(r, now_ms());
  if (!why.empty()) return fail_job(job, 400, why);
  kick();
}

void Instance::on_token(const std::shared_ptr<Job>& job, std::size_t i, SeqRequest& r,
                        TokenId t) {
  if (job->done) return;
  ChoiceResult& c = job->choices[i];
  const std::string_view piece = SimTokenizer::decode(t);
  c.text.append(piece);
  c.output_ids.push_back(t);
  const double now = now_ms();
  if (c.output_ids.size() == 1 && c.sample == 0) {  // once per prompt
    ttft_.observe((now - job->arrival_ms) / 1000.0);
  }
  if (job->last_token_ms[i] >= 0) itl_.observe((now - job->last_token_ms[i]) / 1000.0);
  job->last_token_ms[i] = now;
  if (job->parsed.stream) {
    const bool last = r.num_output_tokens() >= r.max_output_tokens;
    const char* finish = last ? to_string(r.reason_at_limit) : nullptr;
    if (job->api == Api::kGenerate) {
      c.cached_tokens = r.num_cached_tokens;
      c.finish_reason = last ? to_string(r.reason_at_limit) : "";
      std::optional<std::size_t> index;
      if (job->list_answer()) index = i;
      job->res->write_chunk("data: " + sglang_generate_item(job->meta, c, last, index).dump() +
                            "\n\n");
    } else {
      std::string out;
      if (job->api == Api::kChatCompletions && !job->roles_sent) {
        // As vLLM does with the first output: one role chunk per choice, in index order.
        job->roles_sent = true;
        for (std::size_t k = 0; k < job->items.size(); ++k) {
          out += "data: " + openai_chunk(job->api, job->meta, k, "", nullptr, true) + "\n\n";
        }
      }
      out += "data: " + openai_chunk(job->api, job->meta, i, piece, finish, false) + "\n\n";
      job->res->write_chunk(out);
    }
  }
  if (job->fault == "disconnect") {
    faults_injected_["disconnect"]++;
    job->res->reset();
    abort_job(job);
  }
}

void Instance::on_finish(const std::shared_ptr<Job>& job, std::size_t i, SeqRequest& r,
                         FinishReason reason, const std::string& error) {
  if (job->done) return;
  if (reason == FinishReason::kError) {
    fail_job(job, 500, error);
    return;
  }
  ChoiceResult& c = job->choices[i];
  c.finish_reason = to_string(reason);
  c.cached_tokens = r.num_cached_tokens;
  if (job->prefill_for_remote_decode) hold_for_pull(job, r);
  if (job->sglang_prefill) return sglang_transfer(job, i, r);
  complete_item(job, i);
}

void Instance::complete_item(const std::shared_ptr<Job>& job, std::size_t i) {
  if (job->done || job->item_done[i]) return;
  job->item_done[i] = true;
  if (--job->remaining > 0) return;
  retire(job);
  requests_ok_++;
  const double e2e_s = (now_ms() - job->arrival_ms) / 1000.0;
  e2e_.observe(e2e_s);
  job->meta.e2e_latency_s = e2e_s;
  for (auto room : job->rooms) drop_room(room);
  job->rooms.clear();

  std::uint64_t prompt = 0, completion = 0, cached = 0;
  for (const auto& c : job->choices) {
    if (c.sample == 0) {  // a prompt counts once, however many samples it has
      prompt += c.prompt_tokens;
      cached += c.cached_tokens;
    }
    completion += c.output_ids.size();
  }
  if (job->parsed.stream) {
    std::string out;
    if (job->api != Api::kGenerate && job->parsed.include_usage) {
      out += "data: " + openai_usage_chunk(job->api, job->meta, prompt, completion, cached) +
             "\n\n";
    }
    out += "data: [DONE]\n\n";
    job->res->write_chunk(out);
    job->res->finish_stream();
    return;
  }
  http::Headers h;
  if (cfg_.engine == EngineKind::kVllm && job->api != Api::kGenerate) {
    const std::string& id = job->meta.id;
    h.emplace_back("x-request-id", id.substr(id.find('-') + 1));
  }
  if (job->api == Api::kGenerate) {
    json body;
    if (job->list_answer()) {
      body = json::array();
      for (const auto& c : job->choices) body.push_back(sglang_generate_item(job->meta, c, true, {}));
    } else {
      body = sglang_generate_item(job->meta, job->choices[0], true, {});
    }
    job->res->send(200, "application/json", body.dump(), h);
    return;
  }
  const json* kvp = job->kv_params_out ? &*job->kv_params_out : nullptr;
  job->res->send(200, "application/json",
                 openai_response(job->api, job->meta, job->choices, kvp), h);
}

void Instance::fail_job(const std::shared_ptr<Job>& job, int status, const std::string& message) {
  if (job->done) return;
  requests_error_++;
  abort_job(job);
  if (job->parsed.stream) {
    // Headers went out already: the error travels in the stream, as the engines send it.
    json err = job->api == Api::kGenerate || cfg_.engine == EngineKind::kSglang
                   ? json{{"error", {{"message", message}}}}
                   : json::parse(protocol_.error_body(job->api, status, message));
    job->res->write_chunk("data: " + err.dump(-1, ' ', false, json::error_handler_t::replace) +
                          "\n\ndata: [DONE]\n\n");
    job->res->finish_stream();
  } else {
    const std::string type = status >= 500 ? "InternalServerError" : "";
    job->res->send(status, "application/json",
                   protocol_.error_body(job->api, status, message, type));
  }
}

// Stops every part of a job: engine sequences, outgoing calls, bootstrap rooms.
void Instance::abort_job(const std::shared_ptr<Job>& job) {
  retire(job);
  for (const auto& r : job->items) {
    if (r->id != 0 && !r->finished) engine_->abort(r->id);
  }
  for (auto& call : job->calls) call->cancel();
  job->calls.clear();
  for (auto room_id : job->rooms) {
    auto it = rooms_.find(room_id);
    if (it == rooms_.end()) continue;
    if (it->second->join) {
      it->second->join->send(500, "application/json",
                             json{{"error", "the prefill request was aborted"}}.dump());
    }
    drop_room(room_id);
  }
  job->rooms.clear();
  kick();  // released blocks may let waiting requests in
}

void Instance::retire(const std::shared_ptr<Job>& job) {
  job->done = true;
  jobs_.erase(job);
}

// ---------------------------------------------------------------------------------------------
// vLLM P/D
// ---------------------------------------------------------------------------------------------

void Instance::hold_for_pull(const std::shared_ptr<Job>& job, SeqRequest& r) {
  const SeqRequest* held = engine_->find_held(r.id);
  if (held == nullptr) return;
  auto h = std::make_shared<HeldKv>();
  h->engine_request_id = r.id;
  h->block_ids = held->blocks;
  const std::string name = r.request_id;
  h->expiry = std::make_shared<asio::steady_timer>(io_);
  h->expiry->expires_after(
      std::chrono::milliseconds(static_cast<std::int64_t>(cfg_.kv_hold_timeout_s * 1000)));
  h->expiry->async_wait([this, name](boost::system::error_code ec) {
    if (ec) return;
    auto it = held_.find(name);
    if (it == held_.end() || it->second->transferring) return;
    engine_->release_held(it->second->engine_request_id);
    held_.erase(it);
    kv_holds_expired_++;
    kick();
  });
  held_[name] = h;
  job->kv_params_out = json{{"do_remote_prefill", true},
                            {"do_remote_decode", false},
                            {"remote_block_ids", h->block_ids},
                            {"remote_engine_id", cfg_.engine_id},
                            {"remote_request_id", name},
                            {"remote_host", cfg_.host},
                            {"remote_port", side_server_ ? side_server_->port() : 0},
                            {"tp_size", 1}};
}

void Instance::start_vllm_pull(const std::shared_ptr<Job>& job, SeqRequest& r) {
  const std::uint64_t id = r.id;
  auto fail = [this, id](const std::string& why) {
    kv_pulls_failed_++;
    asio::post(io_, [this, id, why] {
      engine_->kv_load_done(id, false, cfg_.kv_load_recompute, why, now_ms());
      kick();
    });
  };
  const json& kvp = *job->parsed.kv_transfer_params;
  auto str = [&](const char* k) {
    return kvp.contains(k) && kvp[k].is_string() ? kvp[k].get<std::string>() : std::string();
  };
  const std::string host = str("remote_host"), engine_id = str("remote_engine_id"),
                    remote_id = str("remote_request_id");
  const bool port_ok = kvp.contains("remote_port") && kvp["remote_port"].is_number_integer() &&
                       kvp["remote_port"].get<int>() > 0 && kvp["remote_port"].get<int>() < 65536;
  if (host.empty() || engine_id.empty() || remote_id.empty() || !port_ok ||
      !kvp.contains("remote_block_ids") || !kvp["remote_block_ids"].is_array()) {
    return fail("KV transfer failed: kv_transfer_params needs remote_block_ids, "
                "remote_engine_id, remote_request_id, remote_host and remote_port");
  }
  const json& ids = kvp["remote_block_ids"];
  const std::uint32_t total_blocks = static_cast<std::uint32_t>(r.blocks.size());
  if (ids.size() != total_blocks) {
    return fail("KV transfer failed: remote_block_ids has " + std::to_string(ids.size()) +
                " blocks but the prompt needs " + std::to_string(total_blocks));
  }
  const std::uint32_t local = total_blocks - r.num_remote_blocks;
  json wanted = json::array();
  for (std::size_t b = local; b < ids.size(); ++b) wanted.push_back(ids[b]);
  if (wanted.empty()) {  // everything was cached locally
    asio::post(io_, [this, id] {
      engine_->kv_load_done(id, true, false, {}, now_ms());
      kick();
    });
    return;
  }
  json body = {{"remote_engine_id", engine_id},
               {"remote_request_id", remote_id},
               {"block_ids", wanted},
               {"requester_engine_id", cfg_.engine_id}};
  const auto port = static_cast<std::uint16_t>(kvp["remote_port"].get<int>());
  const auto n = wanted.size();
  std::weak_ptr<Job> weak = job;
  auto call = http::post_json(
      io_, host, port, "/v1/kv/pull", body.dump(), std::chrono::seconds(60),
      [this, id, n, remote_id](http::ClientResult result) {
        if (result.status == 200) {
          kv_blocks_received_ += n;
          engine_->kv_load_done(id, true, false, {}, now_ms());
        } else {
          kv_pulls_failed_++;
          std::string why = result.status == 0 ? result.error : result.body;
          try {
            json j = json::parse(result.body);
            if (j.contains("error") && j["error"].is_string()) why = j["error"];
          } catch (const std::exception&) {
          }
          engine_->kv_load_done(id, false, cfg_.kv_load_recompute,
                                "KV transfer failed for remote_request_id " + remote_id + ": " +
                                    why,
                                now_ms());
        }
        kick();
      });
  job->calls.push_back(std::move(call));
}

// POST /v1/kv/pull on a prefill's side channel: {"remote_engine_id", "remote_request_id",
// "block_ids"}. Answers after the transfer time, then frees the blocks.
void Instance::handle_side(http::Request&& req, const std::shared_ptr<http::Responder>& res) {
  auto error = [&](int status, const std::string& msg) {
    kv_pulls_failed_++;
    res->send(status, "application/json", json{{"error", msg}}.dump());
  };
  if (req.path() != "/v1/kv/pull") return res->send(404, "application/json", "{\"error\":\"not found\"}");
  if (req.method != "POST") return error(405, "method not allowed");
  json j = json::parse(req.body, nullptr, false);
  if (!j.is_object() || !j.contains("remote_request_id") || !j["remote_request_id"].is_string() ||
      !j.contains("block_ids") || !j["block_ids"].is_array()) {
    return error(400, "a pull needs remote_request_id and block_ids");
  }
  if (j.value("remote_engine_id", "") != cfg_.engine_id) {
    return error(404, "unknown remote_engine_id " + j.value("remote_engine_id", std::string("?")) +
                          " (this engine is " + cfg_.engine_id + ")");
  }
  const std::string name = j["remote_request_id"].get<std::string>();
  auto it = held_.find(name);
  if (it == held_.end()) {
    return error(404, "unknown or expired remote_request_id " + name);
  }
  auto held = it->second;
  if (held->transferring) return error(409, "remote_request_id " + name + " is already being pulled");
  for (const auto& b : j["block_ids"]) {
    if (!b.is_number_unsigned() ||
        std::find(held->block_ids.begin(), held->block_ids.end(), b.get<std::uint32_t>()) ==
            held->block_ids.end()) {
      return error(400, "block " + b.dump() + " is not held for " + name);
    }
  }
  held->transferring = true;
  const std::size_t n = j["block_ids"].size();
  const double ms = timing_.transfer_ms(n) * cfg_.time_scale;
  after_ms(ms, [this, name, held, n, res, ms] {
    held->transferring = false;
    if (held->expiry) held->expiry->cancel();
    engine_->release_held(held->engine_request_id);
    held_.erase(name);
    kv_pulls_served_++;
    kv_blocks_sent_ += n;
    kick();
    res->send(200, "application/json",
              json{{"ok", true}, {"num_blocks", n}, {"transfer_ms", ms}}.dump());
  });
}

// ---------------------------------------------------------------------------------------------
// SGLang P/D
// ---------------------------------------------------------------------------------------------

void Instance::start_sglang_join(const std::shared_ptr<Job>& job, std::size_t i, SeqRequest& r) {
  const BootstrapInfo& b = job->parsed.bootstrap[i];
  const std::uint64_t id = r.id;
  if (job->done) {
    // The request was aborted (its client went away) before the engine got to its KV: no join,
    // or it would wait for the prefill with nobody to answer.
    engine_->kv_load_done(id, false, false, "the request was aborted", now_ms());
    return;
  }
  const std::uint64_t room = b.room;
  json body = {{"room", room},
               {"num_blocks", r.num_remote_blocks},
               {"prompt_tokens", r.num_prompt_tokens},
               {"decode_engine_id", cfg_.engine_id}};
  auto call = http::post_json(
      io_, b.host, b.port, "/bootstrap/join", body.dump(),
      std::chrono::milliseconds(static_cast<std::int64_t>(cfg_.waiting_timeout_s * 1000)),
      [this, id, room, n = r.num_remote_blocks](http::ClientResult result) {
        if (result.status == 200) {
          kv_blocks_received_ += n;
          engine_->kv_load_done(id, true, false, {}, now_ms());
        } else {
          std::string why;
          if (result.status == 0 && result.error == "timed out") {
            bootstrap_timeouts_++;
            char secs[32];
            std::snprintf(secs, sizeof secs, "%.1f", cfg_.waiting_timeout_s);
            why = "Request " + std::to_string(room) + " timed out after " + secs +
                  "s waiting for the prefill";
          } else if (result.status == 0) {
            why = "cannot reach the prefill bootstrap server: " + result.error;
          } else {
            json j = json::parse(result.body, nullptr, false);
            why = j.is_object() && j.contains("error") && j["error"].is_string()
                      ? j["error"].get<std::string>()
                      : result.body;
          }
          engine_->kv_load_done(id, false, false,
                                "KVTransferError(bootstrap_room=" + std::to_string(room) + "): " +
                                    why,
                                now_ms());
        }
        kick();
      });
  job->calls.push_back(std::move(call));
}

// POST /bootstrap/join {"room": R, ...}: the decode side meets the prefill of room R.
void Instance::handle_bootstrap(http::Request&& req, const std::shared_ptr<http::Responder>& res) {
  const std::string path = req.path();
  if (path == "/health") return res->send(200, "text/plain", "OK");
  if (path == "/route") {
    return res->send(200, "application/json",
                     json{{"rank_ip", cfg_.host},
                          {"rank_port", server_->port()},
                          {"engine_id", cfg_.engine_id}}
                         .dump());
  }
  if (path != "/bootstrap/join") return res->send(404, "application/json", "{\"error\":\"not found\"}");
  if (req.method != "POST") {
    return res->send(405, "application/json", "{\"error\":\"method not allowed\"}");
  }
  json j = json::parse(req.body, nullptr, false);
  if (!j.is_object() || !j.contains("room") || !j["room"].is_number_unsigned()) {
    return res->send(400, "application/json", json{{"error", "a join needs a room"}}.dump());
  }
  const std::uint64_t room_id = j["room"].get<std::uint64_t>();
  auto& room = rooms_[room_id];
  if (!room) room = std::make_shared<Room>();
  if (room->join) {
    return res->send(409, "application/json",
                     json{{"error", "bootstrap_room " + std::to_string(room_id) +
                                        " already has a decode"}}
                         .dump());
  }
  room->join = res;
  res->on_disconnect([this, room_id] {
    auto it = rooms_.find(room_id);
    if (it == rooms_.end()) return;
    it->second->join.reset();
    if (it->second->job.expired()) drop_room(room_id);
  });
  if (auto job = room->job.lock()) {
    // The prefill was waiting for us: it may start now.
    if (room->timer) room->timer->cancel();
    room->prefill_started = true;
    const auto& r = job->items[room->item];
    std::string why = engine_->add(r, now_ms());
    if (!why.empty()) return fail_job(job, 400, why);
    kick();
    return;
  }
  // The decode came first: wait for the prefill request.
  room->timer = std::make_shared<asio::steady_timer>(io_);
  room->timer->expires_after(
      std::chrono::milliseconds(static_cast<std::int64_t>(cfg_.bootstrap_timeout_s * 1000)));
  room->timer->async_wait([this, room_id](boost::system::error_code ec) {
    if (ec) return;
    auto it = rooms_.find(room_id);
    if (it == rooms_.end() || !it->second->job.expired()) return;
    bootstrap_timeouts_++;
    if (it->second->join) {
      it->second->join->send(504, "application/json",
                             json{{"error", "no prefill request arrived for bootstrap_room " +
                                                std::to_string(room_id)}}
                                 .dump());
    }
    drop_room(room_id);
  });
}

void Instance::sglang_transfer(const std::shared_ptr<Job>& job, std::size_t i, SeqRequest& r) {
  const std::uint64_t room_id = job->parsed.bootstrap[i].room;
  const std::uint64_t engine_id = r.id;
  const std::size_t blocks = r.blocks.size();
  const double ms = timing_.transfer_ms(blocks) * cfg_.time_scale;
  std::weak_ptr<Job> weak = job;
  after_ms(ms, [this, weak, i, room_id, engine_id, blocks, ms] {
    engine_->release_held(engine_id);
    kick();
    auto it = rooms_.find(room_id);
    if (it != rooms_.end() && it->second->join) {
      kv_blocks_sent_ += blocks;
      it->second->join->send(200, "application/json",
                             json{{"ok", true}, {"num_blocks", blocks}, {"transfer_ms", ms}}.dump());
      it->second->join.reset();
    }
    if (auto job = weak.lock()) complete_item(job, i);
  });
}

void Instance::drop_room(std::uint64_t room_id) {
  auto it = rooms_.find(room_id);
  if (it == rooms_.end()) return;
  if (it->second->timer) it->second->timer->cancel();
  rooms_.erase(it);
}

// ---------------------------------------------------------------------------------------------
// Crash
// ---------------------------------------------------------------------------------------------

void Instance::crash() {
  if (crashed_) return;
  crashed_ = true;
  step_timer_.cancel();
  server_->close();
  if (side_server_) side_server_->close();
  if (bootstrap_server_) bootstrap_server_->close();
  if (publisher_) publisher_->close();
  auto jobs = jobs_;
  for (const auto& job : jobs) {
    retire(job);
    for (auto& call : job->calls) call->cancel();
  }
  for (auto& [name, held] : held_) {
    if (held->expiry) held->expiry->cancel();
  }
  held_.clear();
  for (auto& [id, room] : rooms_) {
    if (room->timer) room->timer->cancel();
  }
  rooms_.clear();
}

// ---------------------------------------------------------------------------------------------
// Observability
// ---------------------------------------------------------------------------------------------

std::string Instance::metrics_text() const {
  prom::TextWriter w;
  const EngineStats& s = engine_->stats();
  const BlockPool& pool = engine_->pool();
  const prom::Labels base = {{"engine", std::to_string(cfg_.index)}, {"model_name", cfg_.model}};
  if (cfg_.engine == EngineKind::kVllm) {
    w.family("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.");
    w.sample("vllm:num_requests_running", base, static_cast<double>(engine_->num_running()));
    w.family("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.");
    w.sample("vllm:num_requests_waiting", base, static_cast<double>(engine_->num_waiting()));
    w.family("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.");
    w.sample("vllm:kv_cache_usage_perc", base, pool.usage());
    w.family("vllm:prefix_cache_queries_total", "counter",
             "Prefix cache queries, in terms of number of queried tokens.");
    w.sample("vllm:prefix_cache_queries_total", base, static_cast<double>(s.prefix_cache_queries));
    w.family("vllm:prefix_cache_hits_total", "counter",
             "Prefix cache hits, in terms of number of cached tokens.");
    w.sample("vllm:prefix_cache_hits_total", base, static_cast<double>(s.prefix_cache_hits));
    w.family("vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine.");
    w.sample("vllm:num_preemptions_total", base, static_cast<double>(s.preemptions));
    w.family("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.");
    w.sample("vllm:prompt_tokens_total", base, static_cast<double>(s.prompt_tokens));
    w.family("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.");
    w.sample("vllm:generation_tokens_total", base, static_cast<double>(s.generation_tokens));
    w.family("vllm:request_success_total", "counter", "Count of successfully processed requests.");
    w.sample("vllm:request_success_total", base, static_cast<double>(requests_ok_));
    w.family("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig");
    w.sample("vllm:cache_config_info",
             {{"block_size", std::to_string(cfg_.profile.block_size)},
              {"enable_prefix_caching", "True"},
              {"engine", std::to_string(cfg_.index)},
              {"num_gpu_blocks", std::to_string(cfg_.profile.num_blocks)},
              {"prefix_caching_hash_algo", cfg_.hash == HashAlgo::kSha256 ? "sha256" : "omni64"}},
             1.0);
    w.family("vllm:time_to_first_token_seconds", "histogram", "Histogram of time to first token in seconds.");
    w.histogram("vllm:time_to_first_token_seconds", base, ttft_.bounds, ttft_.counts,
                ttft_.overflow, ttft_.sum);
    w.family("vllm:inter_token_latency_seconds", "histogram", "Histogram of inter-token latency in seconds.");
    w.histogram("vllm:inter_token_latency_seconds", base, itl_.bounds, itl_.counts, itl_.overflow,
                itl_.sum);
    w.family("vllm:e2e_request_latency_seconds", "histogram", "Histogram of e2e request latency in seconds.");
    w.histogram("vllm:e2e_request_latency_seconds", base, e2e_.bounds, e2e_.counts, e2e_.overflow,
                e2e_.sum);
  } else {
    const prom::Labels sl = {{"engine_type", cfg_.role == Role::kBoth ? "unified" : to_string(cfg_.role)},
                             {"model_name", cfg_.model},
                             {"pp_rank", "0"},
                             {"tp_rank", "0"}};
    const double hit_rate = s.prefix_cache_queries == 0
                                ? 0.0
                                : static_cast<double>(s.prefix_cache_hits) /
                                      static_cast<double>(s.prefix_cache_queries);
    w.family("sglang:num_running_reqs", "gauge", "The number of running requests.");
    w.sample("sglang:num_running_reqs", sl, static_cast<double>(engine_->num_running()));
    w.family("sglang:num_queue_reqs", "gauge", "The number of requests in the waiting queue.");
    w.sample("sglang:num_queue_reqs", sl, static_cast<double>(engine_->num_waiting()));
    w.family("sglang:num_used_tokens", "gauge", "The number of used tokens.");
    w.sample("sglang:num_used_tokens", sl, static_cast<double>(engine_->num_used_tokens()));
    w.family("sglang:token_usage", "gauge", "The token usage.");
    w.sample("sglang:token_usage", sl, pool.usage());
    w.family("sglang:cache_hit_rate", "gauge", "The prefix cache hit rate.");
    w.sample("sglang:cache_hit_rate", sl, hit_rate);
    w.family("sglang:prompt_tokens_total", "counter", "Number of prefill tokens processed.");
    w.sample("sglang:prompt_tokens_total", sl, static_cast<double>(s.prompt_tokens));
    w.family("sglang:generation_tokens_total", "counter", "Number of generation tokens processed.");
    w.sample("sglang:generation_tokens_total", sl, static_cast<double>(s.generation_tokens));
    w.family("sglang:cached_tokens_total", "counter", "Number of cached prompt tokens.");
    w.sample("sglang:cached_tokens_total", sl, static_cast<double>(s.prefix_cache_hits));
    w.family("sglang:num_requests_total", "counter", "Number of requests processed.");
    w.sample("sglang:num_requests_total", sl, static_cast<double>(requests_ok_));
    w.family("sglang:time_to_first_token_seconds", "histogram", "Histogram of time to first token in seconds.");
    w.histogram("sglang:time_to_first_token_seconds", sl, ttft_.bounds, ttft_.counts,
                ttft_.overflow, ttft_.sum);
    w.family("sglang:e2e_request_latency_seconds", "histogram", "Histogram of E2E request latency in seconds");
    w.histogram("sglang:e2e_request_latency_seconds", sl, e2e_.bounds, e2e_.counts, e2e_.overflow,
                e2e_.sum);
  }
  // The simulator's own counters.
  const prom::Labels ol = {{"instance", std::to_string(cfg_.index)}, {"role", to_string(cfg_.role)}};
  w.family("omni_sim:steps_total", "counter", "Engine steps executed.");
  w.sample("omni_sim:steps_total", ol, static_cast<double>(s.steps));
  w.family("omni_sim:requests_total", "counter", "Generation requests received.");
  w.sample("omni_sim:requests_total", ol, static_cast<double>(requests_seen_));
  w.family("omni_sim:request_errors_total", "counter", "Generation requests answered with an error.");
  w.sample("omni_sim:request_errors_total", ol, static_cast<double>(requests_error_));
  w.family("omni_sim:kv_cached_blocks", "gauge", "Blocks currently in the prefix cache.");
  w.sample("omni_sim:kv_cached_blocks", ol, static_cast<double>(pool.num_cached()));
  w.family("omni_sim:kv_held_requests", "gauge", "Finished prefills whose KV waits to be pulled.");
  w.sample("omni_sim:kv_held_requests", ol, static_cast<double>(engine_->num_held()));
  w.family("omni_sim:kv_pulls_served_total", "counter", "KV pulls served to decode instances.");
  w.sample("omni_sim:kv_pulls_served_total", ol, static_cast<double>(kv_pulls_served_));
  w.family("omni_sim:kv_pulls_failed_total", "counter", "KV pulls that failed, on either side.");
  w.sample("omni_sim:kv_pulls_failed_total", ol, static_cast<double>(kv_pulls_failed_));
  w.family("omni_sim:kv_blocks_sent_total", "counter", "KV blocks sent to decode instances.");
  w.sample("omni_sim:kv_blocks_sent_total", ol, static_cast<double>(kv_blocks_sent_));
  w.family("omni_sim:kv_blocks_received_total", "counter", "KV blocks received from prefill instances.");
  w.sample("omni_sim:kv_blocks_received_total", ol, static_cast<double>(kv_blocks_received_));
  w.family("omni_sim:kv_holds_expired_total", "counter", "Held KV freed because nobody pulled it in time.");
  w.sample("omni_sim:kv_holds_expired_total", ol, static_cast<double>(kv_holds_expired_));
  w.family("omni_sim:bootstrap_timeouts_total", "counter", "SGLang bootstrap rendezvous that timed out.");
  w.sample("omni_sim:bootstrap_timeouts_total", ol, static_cast<double>(bootstrap_timeouts_));
  if (publisher_) {
    w.family("omni_sim:kv_event_batches_total", "counter", "KV event batches published.");
    w.sample("omni_sim:kv_event_batches_total", ol, static_cast<double>(publisher_->batches_published()));
  }
  // Tokenizing text prompts (chat rendering included), measured around each render + encode:
  // the engine-side cost that token-id prompts avoid.
  const TokenizeCounters& tc = protocol_.tokenize_counters();
  auto load = [](const std::atomic<std::uint64_t>& v) {
    return static_cast<double>(v.load(std::memory_order_relaxed));
  };
  w.family("omni_sim_tokenize_cpu_seconds_total", "counter",
           "Thread CPU time spent rendering and tokenizing text prompts.");
  w.sample("omni_sim_tokenize_cpu_seconds_total", ol, load(tc.cpu_ns) / 1e9);
  w.family("omni_sim_tokenize_seconds_total", "counter",
           "Wall time spent rendering and tokenizing text prompts.");
  w.sample("omni_sim_tokenize_seconds_total", ol, load(tc.wall_ns) / 1e9);
  w.family("omni_sim_tokenized_prompts_total", "counter",
           "Text prompts tokenized (a chat counts once).");
  w.sample("omni_sim_tokenized_prompts_total", ol, load(tc.prompts));
  w.family("omni_sim_tokenized_tokens_total", "counter", "Token ids produced by tokenizing text prompts.");
  w.sample("omni_sim_tokenized_tokens_total", ol, load(tc.tokens));
  w.family("omni_sim:faults_injected_total", "counter", "Faults injected, by kind.");
  for (const char* kind : {"error", "hang", "disconnect", "slow", "crash"}) {
    prom::Labels l = ol;
    l.emplace_back("kind", kind);
    auto it = faults_injected_.find(kind);
    w.sample("omni_sim:faults_injected_total", l,
             it == faults_injected_.end() ? 0.0 : static_cast<double>(it->second));
  }
  return w.take();
}

std::string Instance::loads_json() const {
  const EngineStats& s = engine_->stats();
  const BlockPool& pool = engine_->pool();
  const std::uint64_t capacity = std::uint64_t{pool.num_blocks()} * pool.block_size();
  char ts[64];
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  std::strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", &tm);
  const double hit_rate = s.prefix_cache_queries == 0
                              ? 0.0
                              : static_cast<double>(s.prefix_cache_hits) /
                                    static_cast<double>(s.prefix_cache_queries);
  json load = {
      {"dp_rank", 0},
      {"timestamp", ts},
      {"num_running_reqs", engine_->num_running()},
      {"num_waiting_reqs", engine_->num_waiting()},
      {"num_waiting_uncached_tokens",
       cfg_.role == Role::kDecode ? 0 : engine_->waiting_uncached_tokens()},
      {"num_used_tokens", engine_->num_used_tokens()},
      {"num_total_tokens", engine_->num_used_tokens()},
      {"max_total_num_tokens", capacity},
      {"token_usage", pool.usage()},
      {"gen_throughput", 0.0},
      {"cache_hit_rate", hit_rate},
      {"utilization", static_cast<double>(engine_->num_running()) /
                          static_cast<double>(cfg_.profile.max_num_seqs)},
      {"max_running_requests", cfg_.profile.max_num_seqs},
      {"disaggregation",
       {{"mode", cfg_.role == Role::kBoth ? "null" : to_string(cfg_.role)},
        {"prefill_prealloc_queue_reqs", 0},
        {"prefill_inflight_queue_reqs", cfg_.role == Role::kPrefill ? engine_->num_held() : 0},
        {"decode_prealloc_queue_reqs", 0},
        {"decode_transfer_queue_reqs", 0},
        {"decode_retracted_queue_reqs", 0}}}};
  json body = {{"timestamp", ts},
               {"version", std::string("omni-sim ") + kVersion},
               {"accelerator", "simulated"},
               {"num_accelerators", 0},
               {"loads", json::array({load})}};
  return body.dump();
}

std::string Instance::server_info_json() const {
  json j = {{"model_path", cfg_.model},
            {"served_model_name", cfg_.model},
            {"disaggregation_mode", cfg_.role == Role::kBoth ? "null" : to_string(cfg_.role)},
            {"page_size", cfg_.profile.block_size},
            {"max_running_requests", cfg_.profile.max_num_seqs},
            {"max_total_num_tokens",
             std::uint64_t{cfg_.profile.num_blocks} * cfg_.profile.block_size},
            {"context_length", cfg_.profile.max_model_len},
            {"chunked_prefill_size", cfg_.profile.max_num_batched_tokens},
            {"version", std::string("omni-sim ") + kVersion}};
  if (bootstrap_server_) j["disaggregation_bootstrap_port"] = bootstrap_server_->port();
  return j.dump();
}

}  // namespace omni::sim
