// HTTP/1.1 to the target: a pool of keep-alive connections and one exchange (request and
// streamed response) at a time on each.
//
// A request takes an idle connection, or opens a new one when none is idle (there is no cap
// here: the runner's --max-concurrency bounds how many are in use). A connection goes back to
// the pool after a complete response that allows keep-alive, and is closed otherwise. A server
// may close an idle connection at any time (omni-sim after 5 s, uvicorn's default); a request
// whose reused connection fails before any response byte arrives is retried once on a new
// connection, as HTTP clients do.
#pragma once

#include "response.hpp"

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace omni::replay {

struct Connection {
  explicit Connection(boost::asio::io_context& io) : stream(io) {}
  boost::beast::tcp_stream stream;
  boost::beast::flat_buffer buffer;
  bool connected = false;
};

class ConnectionPool {
 public:
  ConnectionPool(boost::asio::io_context& io, boost::asio::ip::tcp::endpoint endpoint)
      : io_(io), endpoint_(endpoint) {}

  // An idle connection (reused = true), or a new, not yet connected one.
  std::unique_ptr<Connection> acquire(bool& reused);
  // A new, not yet connected connection.
  std::unique_ptr<Connection> fresh();
  void release(std::unique_ptr<Connection> c) { idle_.push_back(std::move(c)); }
  void close_idle() { idle_.clear(); }

  const boost::asio::ip::tcp::endpoint& endpoint() const { return endpoint_; }
  std::uint64_t opened() const { return opened_; }  // connections opened so far

 private:
  boost::asio::io_context& io_;
  boost::asio::ip::tcp::endpoint endpoint_;
  std::vector<std::unique_ptr<Connection>> idle_;
  std::uint64_t opened_ = 0;
};

struct ExchangeSpec {
  std::string path;        // "/v1/completions"
  std::string host;        // Host header
  std::string request_id;  // X-Request-Id
  std::string body;
  std::chrono::steady_clock::duration timeout{};
  std::string prefill_header;  // response headers that name the chosen instances
  std::string decode_header;
};

// One request on the pool. `done` runs once, after the reader has recorded the outcome.
class Exchange : public std::enable_shared_from_this<Exchange> {
 public:
  using Clock = std::chrono::steady_clock;

  Exchange(ConnectionPool& pool, ExchangeSpec spec, RequestRecord& record, LogHistogram& itl,
           std::function<void()> done);
  ~Exchange();

  void start();
  // Aborts the exchange (recorded as "cancelled"); its callback still runs.
  void cancel();

 private:
  void connect();
  void send();
  void read_header();
  void read_body();
  void consume_body();
  // An error before the response started, on a reused connection: retry on a new one.
  bool retry_stale(const boost::system::error_code& ec);
  void fail(const boost::system::error_code& ec, const char* stage);
  void finish(bool keep_connection);
  double elapsed_ms() const;

  ConnectionPool& pool_;
  ExchangeSpec spec_;
  ResponseReader reader_;
  std::function<void()> done_;
  std::unique_ptr<Connection> conn_;
  bool reused_ = false;
  bool retried_ = false;
  bool cancelled_ = false;
  Clock::time_point started_{};
  Clock::time_point deadline_{};
  struct Message;  // the Beast request and response parser
  std::unique_ptr<Message> msg_;
};

}  // namespace omni::replay
