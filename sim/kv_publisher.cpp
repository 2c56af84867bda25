#include "kv_publisher.hpp"

#include <chrono>
#include <stdexcept>

namespace omni::sim {
namespace {

std::uint16_t bound_port(zmq::socket_t& s) {
  const std::string ep = s.get(zmq::sockopt::last_endpoint);
  const auto colon = ep.rfind(':');
  if (colon == std::string::npos) throw std::runtime_error("cannot read ZMQ endpoint " + ep);
  return static_cast<std::uint16_t>(std::stoi(ep.substr(colon + 1)));
}

std::string tcp_endpoint(const std::string& host, int port) {
  return "tcp://" + host + ":" + (port == 0 ? std::string("*") : std::to_string(port));
}

}  // namespace

KvEventPublisher::KvEventPublisher(zmq::context_t& ctx, KvPublisherOptions options)
    : options_(std::move(options)) {
  pub_.emplace(ctx, zmq::socket_type::pub);
  pub_->set(zmq::sockopt::sndhwm, options_.send_hwm);
  pub_->set(zmq::sockopt::linger, 0);
  pub_->bind(tcp_endpoint(options_.host, options_.pub_port));
  pub_port_ = bound_port(*pub_);
  if (options_.replay_port >= 0) {
    replay_.emplace(ctx, zmq::socket_type::router);
    replay_->set(zmq::sockopt::linger, 0);
    replay_->bind(tcp_endpoint(options_.host, options_.replay_port));
    replay_port_ = bound_port(*replay_);
  }
}

KvEventPublisher::~KvEventPublisher() = default;

std::string KvEventPublisher::pub_endpoint() const {
  return "tcp://" + options_.host + ":" + std::to_string(pub_port_);
}

std::string KvEventPublisher::replay_endpoint() const {
  return replay_port_ < 0 ? std::string()
                          : "tcp://" + options_.host + ":" + std::to_string(replay_port_);
}

void KvEventPublisher::publish(std::vector<kv::Event> events, double ts) {
  if (closed_.load() || events.empty()) return;
  kv::EventBatch batch;
  batch.ts = ts;
  batch.events = std::move(events);
  batch.data_parallel_rank = options_.data_parallel_rank;
  std::string payload = kv::encode_batch(batch, options_.encode);
  const std::int64_t seq = next_seq_++;
  const std::string seq_frame = kv::encode_seq(seq);

  std::array<zmq::const_buffer, 3> frames = {
      zmq::buffer(options_.topic), zmq::buffer(seq_frame), zmq::buffer(payload)};
  auto sent = zmq::send_multipart(*pub_, frames, zmq::send_flags::dontwait);
  if (!sent) dropped_++;

  std::lock_guard<std::mutex> lock(ring_mutex_);
  ring_.emplace_back(seq, std::move(payload));
  while (ring_.size() > options_.buffer_steps) ring_.pop_front();
}

void KvEventPublisher::close() {
  if (closed_.exchange(true)) return;
  pub_.reset();
}

void KvEventPublisher::close_replay_socket() { replay_.reset(); }

void KvEventPublisher::serve_replay_request() {
  std::vector<zmq::message_t> request;
  auto got = zmq::recv_multipart(*replay_, std::back_inserter(request), zmq::recv_flags::dontwait);
  if (!got || request.empty()) return;
  // [identity, "", start_seq]; anything else is ignored, as vLLM does.
  if (request.size() != 3 || request[1].size() != 0 || request[2].size() != 8) return;
  std::int64_t start = 0;
  try {
    start = kv::decode_seq(request[2].to_string_view());
  } catch (const std::exception&) {
    return;
  }
  const std::string identity = request[0].to_string();
  std::vector<std::pair<std::int64_t, std::string>> batches;
  {
    std::lock_guard<std::mutex> lock(ring_mutex_);
    for (const auto& [seq, payload] : ring_) {
      if (seq >= start) batches.emplace_back(seq, payload);
    }
  }
  auto send = [&](const std::string& seq_frame, const std::string& payload) {
    std::array<zmq::const_buffer, 4> frames = {zmq::buffer(identity), zmq::const_buffer(),
                                               zmq::buffer(seq_frame), zmq::buffer(payload)};
    zmq::send_multipart(*replay_, frames);
  };
  for (const auto& [seq, payload] : batches) send(kv::encode_seq(seq), payload);
  send(kv::encode_seq(kv::kReplayEndSeq), std::string());
}

void ReplayService::start(std::vector<KvEventPublisher*> publishers) {
  publishers_ = std::move(publishers);
  stop_ = false;
  thread_ = std::thread([this] {
    while (!stop_.load()) {
      std::vector<zmq::pollitem_t> items;
      std::vector<KvEventPublisher*> owners;
      for (auto* p : publishers_) {
        if (p->replay_socket() == nullptr) continue;
        if (p->closed()) {
          p->close_replay_socket();
          continue;
        }
        items.push_back({p->replay_socket()->handle(), 0, ZMQ_POLLIN, 0});
        owners.push_back(p);
      }
      if (items.empty()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        continue;
      }
      try {
        zmq::poll(items.data(), items.size(), std::chrono::milliseconds(100));
        for (std::size_t i = 0; i < items.size(); ++i) {
          if (items[i].revents & ZMQ_POLLIN) owners[i]->serve_replay_request();
        }
      } catch (const zmq::error_t&) {
        if (stop_.load()) break;
      }
    }
  });
}

void ReplayService::stop() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

}  // namespace omni::sim
