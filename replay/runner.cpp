#include "runner.hpp"

#include <nlohmann/json.hpp>

namespace omni::replay {

std::string request_body(const RunConfig& config, const PromptBuilder& prompts, const Request& r) {
  std::string b = "{\"model\":" + nlohmann::json(config.model).dump();
  if (config.api == Api::kChat) {
    b += ",\"messages\":[{\"role\":\"user\",\"content\":\"";
    prompts.append_text(r, b);
    b += "\"}]";
  } else if (config.prompt_mode == PromptMode::kText) {
    b += ",\"prompt\":\"";
    prompts.append_text(r, b);
    b += "\"";
  } else {
    b += ",\"prompt\":";
    prompts.append_ids_json(r, b);
  }
  // min_tokens and ignore_eos make the engine produce exactly output_tokens tokens, as the
  // trace recorded them, whatever it samples.
  const std::string n = std::to_string(r.output_tokens);
  b += ",\"max_tokens\":" + n + ",\"min_tokens\":" + n + ",\"ignore_eos\":true,\"temperature\":0";
  b += config.stream ? ",\"stream\":true,\"stream_options\":{\"include_usage\":true}}"
                     : ",\"stream\":false}";
  return b;
}

Runner::Runner(boost::asio::io_context& io, const RunConfig& config, const Workload& workload,
               const PromptBuilder& prompts)
    : io_(io),
      config_(config),
      workload_(workload),
      prompts_(prompts),
      pool_(io, config.endpoint),
      timer_(io) {}

RunResult Runner::run() {
  const auto& requests = workload_.requests;
  result_.records.resize(requests.size());
  for (std::size_t i = 0; i < requests.size(); ++i) {
    auto& rec = result_.records[i];
    rec.index = i;
    rec.trace_s = requests[i].arrival_s;
    rec.scheduled_s = requests[i].arrival_s / config_.speedup;
    rec.input_tokens = requests[i].input_tokens;
    rec.output_tokens = requests[i].output_tokens;
    rec.streamed = config_.stream;
  }
  if (!requests.empty()) {
    prepare_next();  // the first body too is ready before the clock starts
    start_ = Clock::now();
    arm();
    io_.run();
  }
  result_.connections_opened = pool_.opened();
  result_.interrupted = stopping_;
  return std::move(result_);
}

void Runner::prepare_next() {
  if (next_ < result_.records.size() && prepared_index_ != next_) {
    prepared_body_ = request_body(config_, prompts_, workload_.requests[next_]);
    prepared_index_ = next_;
  }
}

void Runner::arm() {
  if (stopping_ || next_ >= result_.records.size()) return;
  // Build the next body now, while idle, rather than when it is due (a long prompt takes a
  // millisecond or more): only an overloaded client starts late.
  prepare_next();
  timer_.expires_at(start_ +
                    std::chrono::duration_cast<Clock::duration>(
                        std::chrono::duration<double>(result_.records[next_].scheduled_s)));
  timer_.async_wait([this](boost::system::error_code ec) {
    if (!ec) on_timer();
  });
}

void Runner::on_timer() {
  const double now = seconds_since_start(Clock::now());
  while (!stopping_ && next_ < result_.records.size() &&
         result_.records[next_].scheduled_s <= now) {
    due(next_++);
  }
  arm();
}

void Runner::due(std::size_t i) {
  if (in_flight_ < config_.max_concurrency) {
    launch(i, false);
  } else {
    waiting_.push_back(i);
  }
}

void Runner::launch(std::size_t i, bool waited) {
  auto& rec = result_.records[i];
  rec.waited = waited;
  const double late_ms = (seconds_since_start(Clock::now()) - rec.scheduled_s) * 1000;
  if (config_.max_lateness_ms && late_ms > *config_.max_lateness_ms) {
    rec.start_s = rec.scheduled_s + late_ms / 1000;
    rec.lateness_ms = late_ms;
    rec.outcome = "dropped";
    return ended();
  }
  ExchangeSpec spec;
  spec.path = config_.api == Api::kChat ? "/v1/chat/completions" : "/v1/completions";
  spec.host = config_.host;
  spec.request_id = config_.request_id_prefix + std::to_string(i);
  spec.body = take_body(i);
  spec.timeout = config_.timeout;
  spec.prefill_header = config_.prefill_header;
  spec.decode_header = config_.decode_header;
  // The start is taken after the body is built: building a long prompt (when it was not built
  // ahead) is the client's time, so it shows as lateness, not as TTFT.
  rec.start_s = seconds_since_start(Clock::now());
  rec.lateness_ms = (rec.start_s - rec.scheduled_s) * 1000;
  rec.late = rec.lateness_ms > config_.late_threshold_ms;
  ++in_flight_;
  auto exchange = std::make_shared<Exchange>(pool_, std::move(spec), rec, result_.itl, [this, i] {
    --in_flight_;
    exchanges_.erase(i);
    while (!stopping_ && !waiting_.empty() && in_flight_ < config_.max_concurrency) {
      const std::size_t next = waiting_.front();
      waiting_.pop_front();
      launch(next, true);
    }
    ended();
  });
  exchanges_.emplace(i, exchange);
  exchange->start();
}

std::string Runner::take_body(std::size_t i) {
  if (prepared_index_ != i) return request_body(config_, prompts_, workload_.requests[i]);
  prepared_index_.reset();
  return std::move(prepared_body_);
}

void Runner::ended() {
  if (++ended_ < result_.records.size()) return;
  result_.wall_duration_s = seconds_since_start(Clock::now());
  timer_.cancel();
  pool_.close_idle();
  io_.stop();
}

void Runner::interrupt() {
  if (stopping_) return;
  stopping_ = true;
  timer_.cancel();
  auto not_sent = [this](std::size_t i) {
    result_.records[i].outcome = "not_sent";
    ended();
  };
  for (std::size_t i : waiting_) not_sent(i);
  waiting_.clear();
  for (; next_ < result_.records.size(); ++next_) not_sent(next_);
  // Cancelled exchanges end through their callbacks, which erase them from the map.
  std::vector<std::shared_ptr<Exchange>> running;
  for (auto& [i, weak] : exchanges_) {
    if (auto e = weak.lock()) running.push_back(std::move(e));
  }
  for (auto& e : running) e->cancel();
}

double Runner::seconds_since_start(Clock::time_point t) const {
  return std::chrono::duration<double>(t - start_).count();
}

}  // namespace omni::replay
