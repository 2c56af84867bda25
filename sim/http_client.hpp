// A minimal async HTTP/1.1 client (Boost.Beast) for the simulator's instance-to-instance
// calls: the vLLM KV pull over the side channel and the SGLang bootstrap join. One request per
// connection, with a deadline; cancel() aborts it and suppresses the callback.
#pragma once

#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace omni::sim::http {

struct ClientResult {
  int status = 0;           // 0 when no response arrived
  std::string body;
  std::string error;        // transport error or timeout, when status == 0
};

class ClientCall {
 public:
  virtual ~ClientCall() = default;
  virtual void cancel() = 0;
};

std::shared_ptr<ClientCall> post_json(boost::asio::io_context& io, const std::string& host,
                                      std::uint16_t port, const std::string& target,
                                      std::string body, std::chrono::milliseconds timeout,
                                      std::function<void(ClientResult)> done);

}  // namespace omni::sim::http
