// sim_load: drives omni-sim with many concurrent streamed completions and measures whether the
// simulator keeps the pace its timing model sets, or becomes the bottleneck.
//
// Each of --streams connections (spread round-robin over the instances' ports) loops: POST a
// streamed /v1/completions with a token-id prompt and --max-tokens, read the SSE stream,
// record the gaps between events. At the end it prints one JSON object with the event rate,
// the measured inter-token latency (ITL) and the timing model's predicted step time for the
// same batch, and their ratio: a ratio near 1 means the simulator is not the bottleneck.
//
// usage: sim_load --ports P1,P2,... --streams N --seconds S --max-tokens M --prompt-tokens T
//                 --profile NAME [--time-scale F]
#include "timing_model.hpp"

#include <utility>
#include <array>

#include <boost/asio.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

struct Stats {
  std::uint64_t events = 0;
  std::uint64_t responses = 0;
  std::uint64_t errors = 0;
  std::vector<double> itl_ms;
};

class Stream : public std::enable_shared_from_this<Stream> {
 public:
  Stream(asio::io_context& io, std::uint16_t port, std::string request, Stats& stats,
         Clock::time_point stop, Clock::time_point measure_from)
      : socket_(io), port_(port), request_(std::move(request)), stats_(stats), stop_(stop),
        measure_from_(measure_from) {}

  void start() {
    socket_.async_connect(tcp::endpoint(asio::ip::make_address("127.0.0.1"), port_),
                          [self = shared_from_this()](boost::system::error_code ec) {
                            if (ec) return self->fail();
                            self->socket_.set_option(tcp::no_delay(true));
                            self->send();
                          });
  }

 private:
  void send() {
    if (Clock::now() >= stop_) return;
    buf_.clear();
    last_event_ = {};
    asio::async_write(socket_, asio::buffer(request_),
                      [self = shared_from_this()](boost::system::error_code ec, std::size_t) {
                        if (ec) return self->fail();
                        self->read();
                      });
  }

  void read() {
    socket_.async_read_some(asio::buffer(chunk_),
                            [self = shared_from_this()](boost::system::error_code ec, std::size_t n) {
                              if (ec) return self->fail();
                              self->consume(n);
                            });
  }

  void consume(std::size_t n) {
    const auto now = Clock::now();
    buf_.append(chunk_.data(), n);
    std::size_t pos;
    bool done = false;
    while ((pos = buf_.find("data: ", scan_)) != std::string::npos) {
      scan_ = pos + 6;
      if (buf_.compare(pos + 6, 6, "[DONE]") == 0) {
        done = true;
        continue;
      }
      if (buf_.compare(pos + 6, 2, "{\"") != 0) continue;
      if (now >= measure_from_) {
        stats_.events++;
        if (last_event_ != Clock::time_point{}) {
          stats_.itl_ms.push_back(std::chrono::duration<double, std::milli>(now - last_event_).count());
        }
      }
      last_event_ = now;
    }
    if (done && buf_.find("0\r\n\r\n", scan_ > 6 ? scan_ - 6 : 0) != std::string::npos) {
      if (now >= measure_from_) stats_.responses++;
      buf_.clear();
      scan_ = 0;
      return send();
    }
    if (buf_.size() > (1u << 20)) return fail();
    read();
  }

  void fail() {
    if (Clock::now() < stop_) stats_.errors++;
  }

  tcp::socket socket_;
  std::uint16_t port_;
  std::string request_;
  Stats& stats_;
  Clock::time_point stop_, measure_from_;
  Clock::time_point last_event_{};
  std::array<char, 16384> chunk_{};
  std::string buf_;
  std::size_t scan_ = 0;
};

int main(int argc, char** argv) {
  std::vector<std::uint16_t> ports;
  int streams = 512;
  double seconds = 10, warmup = 2, time_scale = 1;
  int max_tokens = 200, prompt_tokens = 100;
  std::string profile = "deepseek-v3-h800-decode";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i], v = argv[i + 1];
    if (f == "--ports") {
      std::stringstream ss(v);
      std::string p;
      while (std::getline(ss, p, ',')) ports.push_back(static_cast<std::uint16_t>(std::stoi(p)));
    } else if (f == "--streams") streams = std::stoi(v);
    else if (f == "--seconds") seconds = std::stod(v);
    else if (f == "--warmup") warmup = std::stod(v);
    else if (f == "--max-tokens") max_tokens = std::stoi(v);
    else if (f == "--prompt-tokens") prompt_tokens = std::stoi(v);
    else if (f == "--profile") profile = v;
    else if (f == "--time-scale") time_scale = std::stod(v);
    else {
      std::cerr << "sim_load: unknown flag " << f << "\n";
      return 2;
    }
  }
  if (ports.empty()) {
    std::cerr << "sim_load: --ports is required\n";
    return 2;
  }
  asio::io_context io(1);
  Stats stats;
  const auto start = Clock::now();
  const auto measure_from = start + std::chrono::milliseconds(static_cast<long>(warmup * 1000));
  const auto stop = measure_from + std::chrono::milliseconds(static_cast<long>(seconds * 1000));
  std::vector<std::shared_ptr<Stream>> all;
  for (int s = 0; s < streams; ++s) {
    std::string prompt = "[";
    for (int t = 0; t < prompt_tokens; ++t) {
      prompt += std::to_string(1000 + s * 7 + t * 13 % 100000) + (t + 1 < prompt_tokens ? "," : "]");
    }
    const std::string body = "{\"prompt\":" + prompt + ",\"max_tokens\":" +
                             std::to_string(max_tokens) + ",\"stream\":true}";
    const std::string req = "POST /v1/completions HTTP/1.1\r\nHost: sim\r\n"
                            "Content-Type: application/json\r\nContent-Length: " +
                            std::to_string(body.size()) + "\r\n\r\n" + body;
    auto st = std::make_shared<Stream>(io, ports[static_cast<std::size_t>(s) % ports.size()], req,
                                       stats, stop, measure_from);
    st->start();
    all.push_back(st);
  }
  asio::steady_timer t(io);
  t.expires_at(stop);
  t.async_wait([&](boost::system::error_code) { io.stop(); });
  io.run();

  // The model's step time for the batch each instance runs: streams/instances sequences with
  // about prompt + max_tokens/2 tokens of context each.
  const auto model = omni::sim::builtin_profile(profile);
  omni::sim::TimingModel tm(model, 1);
  const double per_instance = static_cast<double>(streams) / static_cast<double>(ports.size());
  omni::sim::StepWork work;
  work.decode_seqs = static_cast<std::uint32_t>(std::min<double>(per_instance, model.max_num_seqs));
  work.decode_kv_tokens = static_cast<std::uint64_t>(work.decode_seqs * (prompt_tokens + max_tokens / 2.0));
  const double predicted_ms = tm.mean_step_ms(work) * time_scale;
  auto& itl = stats.itl_ms;
  std::sort(itl.begin(), itl.end());
  const double mean = itl.empty() ? 0 : std::accumulate(itl.begin(), itl.end(), 0.0) / itl.size();
  auto pct = [&](double q) { return itl.empty() ? 0 : itl[static_cast<std::size_t>(q * (itl.size() - 1))]; };
  std::printf(
      "{\"streams\":%d,\"instances\":%zu,\"seconds\":%.1f,\"events_per_s\":%.0f,"
      "\"responses\":%llu,\"errors\":%llu,\"itl_ms_mean\":%.2f,\"itl_ms_p50\":%.2f,"
      "\"itl_ms_p99\":%.2f,\"model_step_ms\":%.2f,\"itl_over_model\":%.3f}\n",
      streams, ports.size(), seconds, static_cast<double>(stats.events) / seconds,
      static_cast<unsigned long long>(stats.responses), static_cast<unsigned long long>(stats.errors),
      mean, pct(0.5), pct(0.99), predicted_ms, predicted_ms > 0 ? mean / predicted_ms : 0.0);
  return 0;
}
