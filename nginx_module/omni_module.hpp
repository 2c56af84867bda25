// Types shared by the module's translation units.
#pragma once

#include "ngx.hpp"

#include <string_view>

extern "C" {
extern ngx_module_t ngx_http_omni_proxy_module;
}

namespace omni::ngx {

// How a location proxies.
enum Mode : ngx_uint_t {
  kModeAggregated = 1,  // one leg to one pool
  kModeSequential = 2,  // vLLM P/D: prefill leg, then decode leg with the KV handle
};

struct MainConf {
  ngx_shm_zone_t* zone;  // null when omni_proxy_zone is absent
};

struct LocConf {
  ngx_flag_t status;   // omni_proxy_status
  ngx_flag_t enable;   // omni_proxy
  ngx_uint_t mode;     // omni_proxy_mode
  size_t max_body_size;                 // omni_proxy_max_body_size
  ngx_http_upstream_conf_t prefill;     // the prefill leg (sequential)
  ngx_http_upstream_conf_t decode;      // the decode leg, or the only leg (aggregated)
  ngx_msec_t connect_timeout;           // omni_proxy_connect_timeout
  ngx_msec_t prefill_timeout;           // omni_proxy_prefill_timeout
  ngx_msec_t decode_timeout;            // omni_proxy_decode_timeout
};

// Logs the exception being handled (call only inside a catch block) as an [alert].
void log_exception(ngx_log_t* log, const char* where) noexcept;
// Sends `body` as a complete application/json response with `status`; returns what the
// output filter returned (proxy_handler.cpp).
ngx_int_t send_json(ngx_http_request_t* r, ngx_uint_t status, std::string_view body);

// The content handler of omni_proxy locations (proxy_handler.cpp).
ngx_int_t proxy_handler(ngx_http_request_t* r) noexcept;
// Installs the header and body filters that turn nginx's own error pages for omni_proxy
// requests into OpenAI-style JSON.
ngx_int_t install_filters() noexcept;

}  // namespace omni::ngx
