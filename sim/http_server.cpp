#include "http_server.hpp"

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http.hpp>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <ctime>
#include <optional>

namespace omni::sim::http {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;

std::string Request::header(std::string_view name) const {
  for (const auto& [k, v] : headers) {
    if (k == name) return v;
  }
  return {};
}

std::string Request::path() const {
  const auto q = target.find('?');
  return q == std::string::npos ? target : target.substr(0, q);
}

std::string http_date() {
  static thread_local std::time_t cached_at = 0;
  static thread_local std::string cached;
  const std::time_t now = std::time(nullptr);
  if (now != cached_at) {
    char buf[64];
    std::tm tm{};
    gmtime_r(&now, &tm);
    std::strftime(buf, sizeof buf, "%a, %d %b %Y %H:%M:%S GMT", &tm);
    cached.assign(buf);
    cached_at = now;
  }
  return cached;
}

struct Server::Impl {
  Impl(asio::io_context& io, Handler h, ServerOptions o)
      : io(io), acceptor(io), handler(std::move(h)), options(std::move(o)) {}
  asio::io_context& io;
  tcp::acceptor acceptor;
  Handler handler;
  ServerOptions options;
  bool closed = false;
};

class Session : public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, Server& server)
      : socket_(std::move(socket)), server_(server), idle_timer_(socket_.get_executor()) {
    server_.sessions_.insert(this);
  }
  ~Session() {
    if (registered_) server_.sessions_.erase(this);
  }
  void start() { read_request(); }

  void reset() {
    if (closed_) return;
    boost::system::error_code ec;
    socket_.set_option(asio::socket_base::linger(true, 0), ec);
    close();
  }

  // Called by Server::close; the server may be destroyed afterwards.
  void detach_and_reset() {
    reset();
    registered_ = false;
  }

  bool closed() const noexcept { return closed_; }

  void send(Responder& r, int status, std::string_view type, std::string_view body,
            const Headers& extra) {
    if (!owns(r) || r.streaming_) return;
    std::string out = head(status, type, extra, false);
    out += "content-length: " + std::to_string(body.size()) + "\r\n\r\n";
    out.append(body);
    r.done_ = true;
    response_complete_ = true;
    write(std::move(out));
  }

  void start_stream(Responder& r, int status, std::string_view type, const Headers& extra) {
    if (!owns(r) || r.streaming_) return;
    r.streaming_ = true;
    std::string out = head(status, type, extra, true);
    out += "transfer-encoding: chunked\r\n\r\n";
    write(std::move(out));
  }

  void write_chunk(Responder& r, std::string_view data) {
    if (!owns(r) || !r.streaming_ || data.empty()) return;
    char size[20];
    const int n = std::snprintf(size, sizeof size, "%zx\r\n", data.size());
    std::string out;
    out.reserve(static_cast<std::size_t>(n) + data.size() + 2);
    out.append(size, static_cast<std::size_t>(n));
    out.append(data);
    out += "\r\n";
    write(std::move(out));
  }

  void finish_stream(Responder& r) {
    if (!owns(r) || !r.streaming_) return;
    r.done_ = true;
    response_complete_ = true;
    write("0\r\n\r\n");
  }

  bool owns(const Responder& r) const noexcept {
    return !closed_ && current_.get() == &r && !r.done_;
  }

 private:
  std::string head(int status, std::string_view type, const Headers& extra, bool streaming) {
    std::string out = "HTTP/1.1 " + std::to_string(status) + " ";
    const auto reason = bhttp::obsolete_reason(static_cast<bhttp::status>(status));
    out.append(reason.data(), reason.size());
    out += "\r\ndate: " + http_date() + "\r\nserver: " + server_.impl_->options.server_header +
           "\r\ncontent-type: ";
    out.append(type);
    out += "\r\n";
    for (const auto& [k, v] : extra) out += k + ": " + v + "\r\n";
    if (!keep_alive_) out += "connection: close\r\n";
    if (streaming) out += "cache-control: no-cache\r\n";
    return out;
  }

  void read_request() {
    if (closed_) return;
    parser_.emplace();
    parser_->body_limit(server_.impl_->options.body_limit);
    parser_->header_limit(static_cast<std::uint32_t>(server_.impl_->options.header_limit));
    arm_idle_timer();
    bhttp::async_read(socket_, buffer_, *parser_,
                      [self = shared_from_this()](beast::error_code ec, std::size_t) {
                        self->on_read(ec);
                      });
  }

  void arm_idle_timer() {
    const double s = server_.impl_->options.keepalive_timeout_s;
    if (s <= 0) return;
    idle_timer_.expires_after(std::chrono::milliseconds(static_cast<long>(s * 1000)));
    idle_timer_.async_wait([weak = weak_from_this()](beast::error_code ec) {
      if (ec) return;
      if (auto self = weak.lock(); self && !self->current_) self->close();
    });
  }

  void on_read(beast::error_code ec) {
    idle_timer_.cancel();
    if (closed_) return;
    if (ec) {
      if (ec == bhttp::error::body_limit) {
        keep_alive_ = false;
        reply_error(413, "{\"error\":{\"message\":\"Request body too large\",\"type\":\""
                         "RequestTooLargeError\",\"param\":null,\"code\":413}}");
      } else if (ec != bhttp::error::end_of_stream && ec != asio::error::eof &&
                 ec != asio::error::operation_aborted && ec != asio::error::connection_reset &&
                 buffer_.size() > 0) {
        keep_alive_ = false;
        reply_error(400, "{\"detail\":\"Invalid HTTP request\"}");
      } else {
        close();
      }
      return;
    }
    auto msg = parser_->release();
    Request req;
    req.method = std::string(msg.method_string());
    req.target = std::string(msg.target());
    req.body = std::move(msg.body());
    for (const auto& field : msg) {
      std::string name(field.name_string());
      std::transform(name.begin(), name.end(), name.begin(),
                     [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
      req.headers.emplace_back(std::move(name), std::string(field.value()));
    }
    keep_alive_ = msg.keep_alive();
    response_complete_ = false;
    current_ = std::make_shared<Responder>(weak_from_this());
    watch_disconnect();
    auto responder = current_;
    try {
      server_.impl_->handler(std::move(req), responder);
    } catch (const std::exception& e) {
      // A handler bug must not take the process down; the client gets a 500.
      std::fprintf(stderr, "omni-sim: request handler failed: %s\n", e.what());
      if (responder->open()) {
        responder->send(500, "application/json",
                        "{\"error\":{\"message\":\"internal error\",\"type\":"
                        "\"InternalServerError\",\"param\":null,\"code\":500}}");
      }
    }
  }

  void reply_error(int status, std::string body) {
    current_ = std::make_shared<Responder>(weak_from_this());
    response_complete_ = false;
    send(*current_, status, "application/json", body, {});
  }

  // While a response is pending, a read notices the client going away.
  void watch_disconnect() {
    if (watching_ || closed_) return;
    watching_ = true;
    socket_.async_read_some(
        buffer_.prepare(4096), [self = shared_from_this()](beast::error_code ec, std::size_t n) {
          self->watching_ = false;
          if (!ec) {
            self->buffer_.commit(n);  // a pipelined request: keep it for the parser
            if (self->current_ && self->buffer_.size() < (1u << 20)) self->watch_disconnect();
            else if (!self->current_) self->read_request();
            return;
          }
          if (ec == asio::error::operation_aborted && !self->closed_) {
            if (!self->current_) self->read_request();  // cancelled to read the next request
            return;
          }
          self->close();
        });
  }

  void write(std::string data) {
    if (closed_) return;
    pending_ += data;
    if (!writing_) flush();
  }

  void flush() {
    if (pending_.empty()) {
      if (response_complete_) on_response_written();
      return;
    }
    writing_ = true;
    inflight_.swap(pending_);
    pending_.clear();
    asio::async_write(socket_, asio::buffer(inflight_),
                      [self = shared_from_this()](beast::error_code ec, std::size_t) {
                        self->writing_ = false;
                        self->inflight_.clear();
                        if (ec) {
                          self->close();
                          return;
                        }
                        self->flush();
                      });
  }

  void on_response_written() {
    current_.reset();
    response_complete_ = false;
    if (!keep_alive_) {
      boost::system::error_code ec;
      socket_.shutdown(tcp::socket::shutdown_send, ec);
      close();
      return;
    }
    if (watching_) {
      boost::system::error_code ec;
      socket_.cancel(ec);  // the watch handler then reads the next request
    } else {
      read_request();
    }
  }

  void close() {
    if (closed_) return;
    closed_ = true;
    idle_timer_.cancel();
    boost::system::error_code ec;
    socket_.close(ec);
    if (current_ && !current_->done_) {
      auto cb = std::move(current_->on_disconnect_);
      current_->done_ = true;
      current_.reset();
      if (cb) cb();
    }
    current_.reset();
  }

  tcp::socket socket_;
  Server& server_;
  asio::steady_timer idle_timer_;
  beast::flat_buffer buffer_;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser_;
  std::shared_ptr<Responder> current_;
  std::string pending_, inflight_;
  bool writing_ = false;
  bool watching_ = false;
  bool keep_alive_ = true;
  bool response_complete_ = false;
  bool closed_ = false;
  bool registered_ = true;
};

// ---------------------------------------------------------------------------------------------

namespace {
template <typename F>
void with_session(const std::weak_ptr<Session>& weak, F&& f) {
  if (auto s = weak.lock()) f(*s);
}
}  // namespace

void Responder::send(int status, std::string_view content_type, std::string_view body,
                     const Headers& extra) {
  with_session(session_, [&](Session& s) { s.send(*this, status, content_type, body, extra); });
}
void Responder::start_stream(int status, std::string_view content_type, const Headers& extra) {
  with_session(session_, [&](Session& s) { s.start_stream(*this, status, content_type, extra); });
}
void Responder::write_chunk(std::string_view data) {
  with_session(session_, [&](Session& s) { s.write_chunk(*this, data); });
}
void Responder::finish_stream() {
  with_session(session_, [&](Session& s) { s.finish_stream(*this); });
}
void Responder::reset() {
  done_ = true;
  on_disconnect_ = nullptr;
  with_session(session_, [&](Session& s) { s.reset(); });
}
bool Responder::open() const noexcept {
  auto s = session_.lock();
  return s && !done_ && s->owns(*this);
}

// ---------------------------------------------------------------------------------------------

Server::Server(asio::io_context& io, const std::string& host, std::uint16_t port, Handler handler,
               ServerOptions options)
    : impl_(std::make_unique<Impl>(io, std::move(handler), std::move(options))) {
  tcp::endpoint ep(asio::ip::make_address(host), port);
  impl_->acceptor.open(ep.protocol());
  impl_->acceptor.set_option(asio::socket_base::reuse_address(true));
  impl_->acceptor.bind(ep);
  impl_->acceptor.listen(asio::socket_base::max_listen_connections);
  port_ = impl_->acceptor.local_endpoint().port();

  auto accept = std::make_shared<std::function<void()>>();
  *accept = [this, accept_weak = std::weak_ptr<std::function<void()>>(accept)]() {
    impl_->acceptor.async_accept([this, accept_weak](beast::error_code ec, tcp::socket socket) {
      if (ec == asio::error::operation_aborted || impl_->closed) return;
      if (!ec) {
        boost::system::error_code ignored;
        socket.set_option(tcp::no_delay(true), ignored);
        std::make_shared<Session>(std::move(socket), *this)->start();
      }
      if (auto next = accept_weak.lock()) (*next)();
    });
  };
  accept_loop_ = accept;
  (*accept)();
}

Server::~Server() { close(); }

void Server::close() {
  if (impl_->closed) return;
  impl_->closed = true;
  boost::system::error_code ec;
  impl_->acceptor.close(ec);
  auto sessions = sessions_;
  sessions_.clear();
  for (Session* s : sessions) s->detach_and_reset();
}

}  // namespace omni::sim::http
