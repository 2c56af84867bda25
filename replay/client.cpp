#include "client.hpp"

#include <boost/beast/http.hpp>

#include <optional>

namespace omni::replay {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;

std::unique_ptr<Connection> ConnectionPool::acquire(bool& reused) {
  reused = !idle_.empty();
  if (!reused) return fresh();
  auto c = std::move(idle_.back());  // the most recently used: the least likely to be stale
  idle_.pop_back();
  return c;
}

std::unique_ptr<Connection> ConnectionPool::fresh() {
  ++opened_;
  return std::make_unique<Connection>(io_);
}

struct Exchange::Message {
  bhttp::request<bhttp::string_body> req;
  std::optional<bhttp::response_parser<bhttp::string_body>> parser;  // one per attempt
};

Exchange::Exchange(ConnectionPool& pool, ExchangeSpec spec, RequestRecord& record,
                   LogHistogram& itl, std::function<void()> done)
    : pool_(pool),
      spec_(std::move(spec)),
      reader_(record, itl),
      done_(std::move(done)),
      msg_(std::make_unique<Message>()) {}

Exchange::~Exchange() = default;

void Exchange::start() {
  started_ = Clock::now();
  deadline_ = started_ + spec_.timeout;
  auto& req = msg_->req;
  req.method(bhttp::verb::post);
  req.target(spec_.path);
  req.version(11);
  req.set(bhttp::field::host, spec_.host);
  req.set(bhttp::field::content_type, "application/json");
  req.set("X-Request-Id", spec_.request_id);
  req.body() = std::move(spec_.body);
  req.prepare_payload();
  conn_ = pool_.acquire(reused_);
  conn_->connected ? send() : connect();
}

void Exchange::cancel() {
  cancelled_ = true;
  if (conn_) {
    beast::error_code ec;
    conn_->stream.socket().close(ec);  // the pending operation completes with an error
  }
}

void Exchange::connect() {
  conn_->stream.expires_at(deadline_);
  conn_->stream.async_connect(pool_.endpoint(), [self = shared_from_this()](beast::error_code ec) {
    if (ec) return self->fail(ec, "connect");
    self->conn_->connected = true;
    self->conn_->stream.socket().set_option(asio::ip::tcp::no_delay(true), ec);
    self->send();
  });
}

void Exchange::send() {
  conn_->stream.expires_at(deadline_);
  msg_->parser.emplace();
  // The reader bounds what it keeps; this bounds what the parser reserves for a declared
  // Content-Length (a stream of 10,000 tokens is about 3 MB). Not boost::none, which Boost 1.74
  // compares as smaller than any Content-Length.
  msg_->parser->body_limit(std::uint64_t{1} << 30);
  bhttp::async_write(conn_->stream, msg_->req,
                     [self = shared_from_this()](beast::error_code ec, std::size_t) {
                       if (ec) return self->retry_stale(ec) ? void() : self->fail(ec, "write");
                       self->read_header();
                     });
}

void Exchange::read_header() {
  bhttp::async_read_header(
      conn_->stream, conn_->buffer, *msg_->parser,
      [self = shared_from_this()](beast::error_code ec, std::size_t) {
        if (ec) return self->retry_stale(ec) ? void() : self->fail(ec, "read");
        const auto& res = self->msg_->parser->get();
        auto header = [&](const std::string& name) {
          return name.empty() ? std::string() : std::string(res[name]);
        };
        const bool event_stream = res[bhttp::field::content_type].starts_with("text/event-stream");
        self->reader_.on_header(static_cast<int>(res.result_int()), event_stream,
                                header(self->spec_.prefill_header),
                                header(self->spec_.decode_header));
        // The response has begun: no retry can need the prompt again.
        self->msg_->req.body() = std::string();
        self->consume_body();
      });
}

void Exchange::read_body() {
  bhttp::async_read_some(conn_->stream, conn_->buffer, *msg_->parser,
                         [self = shared_from_this()](beast::error_code ec, std::size_t) {
                           if (ec) return self->fail(ec, "read");
                           self->consume_body();
                         });
}

void Exchange::consume_body() {
  auto& parser = *msg_->parser;
  auto& body = parser.get().body();
  if (!body.empty()) {
    reader_.on_body(body, elapsed_ms());
    body.clear();  // the parser appends after what is left: only new bytes next time
  }
  if (!parser.is_done()) return read_body();
  reader_.on_end(elapsed_ms());
  finish(parser.get().keep_alive());
}

bool Exchange::retry_stale(const boost::system::error_code& ec) {
  if (!reused_ || retried_ || cancelled_ || ec == beast::error::timeout ||
      conn_->buffer.size() > 0) {
    return false;
  }
  retried_ = true;
  reused_ = false;
  conn_ = pool_.fresh();
  connect();
  return true;
}

void Exchange::fail(const boost::system::error_code& ec, const char* stage) {
  const double t = elapsed_ms();
  if (cancelled_) {
    reader_.on_failure("cancelled", "interrupted", t);
  } else if (ec == beast::error::timeout) {
    reader_.on_failure("timeout", "no complete response within --timeout", t);
  } else {
    reader_.on_failure(std::string(stage) == "connect" ? "connect" : "transport",
                       std::string(stage) + ": " + ec.message(), t);
  }
  finish(false);
}

void Exchange::finish(bool keep_connection) {
  if (keep_connection && !cancelled_) {
    conn_->stream.expires_never();
    pool_.release(std::move(conn_));
  }
  conn_.reset();
  if (auto done = std::move(done_)) {
    done_ = nullptr;
    done();
  }
}

double Exchange::elapsed_ms() const {
  return std::chrono::duration<double, std::milli>(Clock::now() - started_).count();
}

}  // namespace omni::replay
