#include "http_client.hpp"

#include <boost/asio/ip/tcp.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

namespace omni::sim::http {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = asio::ip::tcp;

namespace {

class Call : public ClientCall, public std::enable_shared_from_this<Call> {
 public:
  Call(asio::io_context& io, std::function<void(ClientResult)> done)
      : resolver_(io), stream_(io), done_(std::move(done)) {}

  void start(const std::string& host, std::uint16_t port, const std::string& target,
             std::string body, std::chrono::milliseconds timeout) {
    req_.method(bhttp::verb::post);
    req_.target(target);
    req_.version(11);
    req_.set(bhttp::field::host, host + ":" + std::to_string(port));
    req_.set(bhttp::field::content_type, "application/json");
    req_.set(bhttp::field::connection, "close");
    req_.body() = std::move(body);
    req_.prepare_payload();
    stream_.expires_after(timeout);
    resolver_.async_resolve(host, std::to_string(port),
                            [self = shared_from_this()](beast::error_code ec,
                                                        tcp::resolver::results_type results) {
                              if (self->cancelled_) return;  // resolved as it was cancelled
                              if (ec) return self->fail(ec, "resolve");
                              self->stream_.async_connect(
                                  results, [self](beast::error_code ec, const tcp::endpoint&) {
                                    if (self->cancelled_) return self->close();
                                    if (ec) return self->fail(ec, "connect");
                                    self->send();
                                  });
                            });
  }

  // A completion already queued when cancel() runs still arrives; cancelled_ stops the call
  // there, so a cancelled call never connects or sends.
  void cancel() override {
    cancelled_ = true;
    done_ = nullptr;
    resolver_.cancel();
    close();
  }

 private:
  void close() {
    beast::error_code ec;
    stream_.socket().close(ec);
  }

  void send() {
    bhttp::async_write(stream_, req_, [self = shared_from_this()](beast::error_code ec,
                                                                   std::size_t) {
      if (ec) return self->fail(ec, "write");
      bhttp::async_read(self->stream_, self->buffer_, self->res_,
                        [self](beast::error_code ec, std::size_t) {
                          if (ec) return self->fail(ec, "read");
                          ClientResult r;
                          r.status = static_cast<int>(self->res_.result_int());
                          r.body = std::move(self->res_.body());
                          self->finish(std::move(r));
                        });
    });
  }

  void fail(beast::error_code ec, const char* stage) {
    ClientResult r;
    r.error = ec == beast::error::timeout ? std::string("timed out")
                                          : std::string(stage) + ": " + ec.message();
    finish(std::move(r));
  }

  void finish(ClientResult r) {
    beast::error_code ec;
    stream_.socket().close(ec);
    if (auto cb = std::move(done_)) {
      done_ = nullptr;
      cb(std::move(r));
    }
  }

  tcp::resolver resolver_;
  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  bhttp::request<bhttp::string_body> req_;
  bhttp::response<bhttp::string_body> res_;
  std::function<void(ClientResult)> done_;
  bool cancelled_ = false;
};

}  // namespace

std::shared_ptr<ClientCall> post_json(asio::io_context& io, const std::string& host,
                                      std::uint16_t port, const std::string& target,
                                      std::string body, std::chrono::milliseconds timeout,
                                      std::function<void(ClientResult)> done) {
  auto call = std::make_shared<Call>(io, std::move(done));
  call->start(host, port, target, std::move(body), timeout);
  return call;
}

}  // namespace omni::sim::http
