// Publishes an engine's KV events the way vLLM's ZmqEventPublisher does: a PUB socket sending
// [topic, seq (8 bytes, big-endian), msgpack EventBatch], and a ROUTER replay socket that
// re-sends buffered batches from a requested sequence number (wire details in
// include/omni/kv_events.hpp). Sending never blocks the engine: when the PUB queue is full
// (high-water mark) a batch is dropped for live subscribers but kept for replay.
//
// Threads: publish() and close() run on the engine's thread; the replay sockets of all
// instances are served by one ReplayService thread. The ring buffer is shared under a mutex.
#pragma once

#include <omni/kv_events.hpp>

#include <zmq.hpp>
#include <zmq_addon.hpp>

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace omni::sim {

struct KvPublisherOptions {
  std::string host = "127.0.0.1";
  int pub_port = 0;        // 0: an ephemeral port
  int replay_port = 0;     // 0: ephemeral, -1: no replay socket
  std::string topic;       // vLLM's default topic is ""
  kv::EncodeOptions encode;
  std::size_t buffer_steps = 10000;  // batches kept for replay (vLLM's default)
  int send_hwm = 100000;             // vLLM's default high-water mark
  std::optional<std::int64_t> data_parallel_rank = 0;
};

class KvEventPublisher {
 public:
  KvEventPublisher(zmq::context_t& ctx, KvPublisherOptions options);
  ~KvEventPublisher();

  std::uint16_t pub_port() const noexcept { return pub_port_; }
  int replay_port() const noexcept { return replay_port_; }
  std::string pub_endpoint() const;
  std::string replay_endpoint() const;

  // Encodes and sends one batch; ts in seconds since the epoch.
  void publish(std::vector<kv::Event> events, double ts);
  // Closes both sockets (an engine crash). Idempotent.
  void close();
  bool closed() const noexcept { return closed_.load(); }

  std::uint64_t batches_published() const noexcept { return next_seq_; }
  std::uint64_t batches_dropped() const noexcept { return dropped_; }

  // Replay side, for ReplayService's thread only.
  zmq::socket_t* replay_socket() noexcept { return replay_ ? &*replay_ : nullptr; }
  void serve_replay_request();
  void close_replay_socket();

 private:
  KvPublisherOptions options_;
  std::optional<zmq::socket_t> pub_;
  std::optional<zmq::socket_t> replay_;
  std::uint16_t pub_port_ = 0;
  int replay_port_ = -1;
  std::int64_t next_seq_ = 0;
  std::uint64_t dropped_ = 0;
  std::mutex ring_mutex_;
  std::deque<std::pair<std::int64_t, std::string>> ring_;
  std::atomic<bool> closed_{false};
};

// One thread answering the replay sockets of every publisher in the process.
class ReplayService {
 public:
  ~ReplayService() { stop(); }
  void start(std::vector<KvEventPublisher*> publishers);
  void stop();

 private:
  std::vector<KvEventPublisher*> publishers_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
};

}  // namespace omni::sim
