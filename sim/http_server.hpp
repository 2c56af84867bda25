// A small HTTP/1.1 server on Boost.Beast for the simulated engines: keep-alive, streamed
// (chunked) responses, client-disconnect notification and abrupt resets for fault injection.
// Single-threaded: everything runs on the io_context that owns it.
#pragma once

#include <boost/asio/io_context.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

namespace omni::sim::http {

using Headers = std::vector<std::pair<std::string, std::string>>;

struct Request {
  std::string method;
  std::string target;  // path and query
  std::string body;
  Headers headers;     // names lower-cased
  std::string header(std::string_view name) const;
  std::string path() const;  // target without the query
};

class Session;

// Answers one request. Calls after the response completed, or after the connection went away,
// are ignored.
class Responder {
 public:
  explicit Responder(std::weak_ptr<Session> session) : session_(std::move(session)) {}
  void send(int status, std::string_view content_type, std::string_view body,
            const Headers& extra = {});
  void start_stream(int status, std::string_view content_type, const Headers& extra = {});
  void write_chunk(std::string_view data);
  void finish_stream();
  // Closes the connection at once with a TCP reset.
  void reset();
  bool open() const noexcept;
  // Called at most once, if the client disconnects before the response completes.
  void on_disconnect(std::function<void()> cb) { on_disconnect_ = std::move(cb); }

 private:
  friend class Session;
  std::weak_ptr<Session> session_;
  std::function<void()> on_disconnect_;
  bool done_ = false;
  bool streaming_ = false;
};

using Handler = std::function<void(Request&&, const std::shared_ptr<Responder>&)>;

struct ServerOptions {
  std::size_t body_limit = 64u << 20;   // bytes; larger bodies get 413
  std::size_t header_limit = 64u << 10;
  double keepalive_timeout_s = 5.0;     // idle keep-alive connections are closed (uvicorn's 5 s)
  std::string server_header = "uvicorn";
};

class Server {
 public:
  // Binds host:port (port 0: an ephemeral port) and starts accepting.
  Server(boost::asio::io_context& io, const std::string& host, std::uint16_t port,
         Handler handler, ServerOptions options = {});
  ~Server();
  std::uint16_t port() const noexcept { return port_; }
  // Stops accepting and resets every open connection.
  void close();
  std::size_t num_connections() const noexcept { return sessions_.size(); }

 private:
  struct Impl;
  friend class Session;
  std::unique_ptr<Impl> impl_;
  std::uint16_t port_ = 0;
  std::unordered_set<Session*> sessions_;
  std::shared_ptr<std::function<void()>> accept_loop_;
};

// "Sun, 22 Nov 2026 06:40:00 GMT", cached per second.
std::string http_date();

}  // namespace omni::sim::http
