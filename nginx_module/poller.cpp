// The engine metrics poller. One worker at a time (claim_poller) polls every server of every
// pool on a timer, with nginx's own non-blocking connections: GET /metrics (vLLM or SGLang
// names, omni/engine_metrics.hpp) and, for SGLang prefill pools until known, GET
// /get_server_info for the bootstrap port. Results go to the shared state, where every
// worker's balancer reads them. Request handling never waits on a poll: a poll that is slow
// only delays the next sample of that server, and it is abandoned at omni_proxy_poll_timeout.
#include "omni_module.hpp"

#include <omni/engine_metrics.hpp>
#include <omni/lifecycle.hpp>
#include <omni/response_scan.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

namespace omni::ngx {
namespace {

constexpr std::size_t kMaxResponse = 4u << 20;  // a /metrics page larger than this is refused

struct PollJob {
  const Pool* pool = nullptr;
  std::uint16_t server = 0;
  bool server_info = false;  // GET /get_server_info instead of /metrics
  bool active = false;
  ngx_peer_connection_t pc{};
  std::string request;
  std::size_t sent = 0;
  std::string response;
};

struct Poller {
  std::vector<std::unique_ptr<PollJob>> jobs;
  ngx_event_t tick{};
  ngx_msec_t interval = 0;
  ngx_msec_t timeout = 0;
  ngx_log_t* log = nullptr;
};

Poller& poller() {
  static Poller p;
  return p;
}

std::uint16_t backend_of(const PollJob& job) {
  return static_cast<std::uint16_t>(job.pool->base + job.server);
}

void close_job(PollJob& job) {
  if (job.pc.connection != nullptr) {
    ngx_close_connection(job.pc.connection);
    job.pc.connection = nullptr;
  }
  job.active = false;
  job.response.clear();
  job.response.shrink_to_fit();
}

void fail(PollJob& job, const char* why) {
  if (omni::SharedState* st = shared_state(); st != nullptr && !job.server_info) {
    st->count_poll_failure(backend_of(job));
  }
  ngx_log_error(NGX_LOG_INFO, poller().log, 0, "omni_proxy: polling %s of %s failed: %s",
                job.server_info ? "/get_server_info" : "/metrics",
                job.pool->servers[job.server].name.c_str(), why);
  close_job(job);
}

void finish(PollJob& job) noexcept try {
  omni::SharedState* st = shared_state();
  const auto resp = omni::parse_http_response(job.response);
  if (!resp) return fail(job, "malformed HTTP response");
  if (resp->status != 200) return fail(job, "HTTP status is not 200");
  if (st == nullptr) return close_job(job);
  if (job.server_info) {
    auto j = nlohmann::json::parse(resp->body, nullptr, false);
    auto it = j.is_object() ? j.find("disaggregation_bootstrap_port") : j.end();
    if (it != j.end() && it->is_number_integer() && it->get<long>() > 0 &&
        it->get<long>() < 65536) {
      st->set_bootstrap_port(backend_of(job), static_cast<std::uint16_t>(it->get<long>()));
    }
    return close_job(job);
  }
  const omni::EngineMetrics m = omni::parse_engine_metrics(job.pool->flavor, resp->body);
  if (!m.running && !m.waiting) return fail(job, "no request gauges in the exposition");
  omni::EngineLoadSample x;
  x.running = static_cast<std::uint32_t>(std::max(0.0, m.running.value_or(0)));
  x.waiting = static_cast<std::uint32_t>(std::max(0.0, m.waiting.value_or(0)));
  if (m.kv_usage) x.kv_usage = *m.kv_usage;
  x.polled_ns = omni::monotonic_now_ns();
  st->set_engine_load(backend_of(job), x);
  // The engine's cache geometry sizes the KV index (kv.cpp): its block size keys the prompts,
  // its num_gpu_blocks bounds the blocks kept for it.
  if (m.block_size || m.num_gpu_blocks) {
    kv_engine_config(*job.pool, job.server, m.block_size, m.num_gpu_blocks);
  }
  close_job(job);
} catch (...) {
  log_exception(poller().log, "poll");
  fail(job, "exception");
}

void on_read(ngx_event_t* rev) noexcept {
  auto* c = static_cast<ngx_connection_t*>(rev->data);
  auto* job = static_cast<PollJob*>(c->data);
  if (rev->timedout) return fail(*job, "timed out");
  u_char buf[16384];
  for (;;) {
    const ssize_t n = c->recv(c, buf, sizeof(buf));
    if (n > 0) {
      if (job->response.size() + static_cast<std::size_t>(n) > kMaxResponse) {
        return fail(*job, "response too large");
      }
      job->response.append(reinterpret_cast<const char*>(buf), static_cast<std::size_t>(n));
      continue;
    }
    if (n == 0) return finish(*job);  // Connection: close ends the answer
    if (n == NGX_AGAIN) {
      if (ngx_handle_read_event(rev, 0) != NGX_OK) fail(*job, "event error");
      return;
    }
    return fail(*job, "read error");
  }
}

void on_write(ngx_event_t* wev) noexcept {
  auto* c = static_cast<ngx_connection_t*>(wev->data);
  auto* job = static_cast<PollJob*>(c->data);
  if (wev->timedout) return fail(*job, "timed out");
  while (job->sent < job->request.size()) {
    const ssize_t n = c->send(c, reinterpret_cast<u_char*>(job->request.data()) + job->sent,
                              job->request.size() - job->sent);
    if (n > 0) {
      job->sent += static_cast<std::size_t>(n);
      continue;
    }
    if (n == NGX_AGAIN) {
      if (ngx_handle_write_event(wev, 0) != NGX_OK) fail(*job, "event error");
      return;
    }
    return fail(*job, "send error");
  }
  // Sent: nothing more to write; wait for the answer.
  wev->handler = [](ngx_event_t*) {};
  if (ngx_handle_write_event(wev, 0) != NGX_OK) fail(*job, "event error");
}

void start(PollJob& job) noexcept try {
  const Pool::Server& s = job.pool->servers[job.server];
  job.request = std::string("GET ") + (job.server_info ? "/get_server_info" : "/metrics") +
                " HTTP/1.1\r\nHost: " + s.name +
                "\r\nAccept: */*\r\nUser-Agent: omni_proxy\r\nConnection: close\r\n\r\n";
  job.sent = 0;
  job.response.clear();
  job.pc = {};
  job.pc.sockaddr = s.addr.sockaddr;
  job.pc.socklen = s.addr.socklen;
  job.pc.name = const_cast<ngx_str_t*>(&s.addr.name);
  job.pc.get = ngx_event_get_peer;
  job.pc.log = poller().log;
  job.pc.log_error = NGX_ERROR_INFO;
  const ngx_int_t rc = ngx_event_connect_peer(&job.pc);
  if (rc == NGX_ERROR || rc == NGX_BUSY || rc == NGX_DECLINED) {
    job.pc.connection = nullptr;
    return fail(job, "connect failed");
  }
  job.active = true;
  ngx_connection_t* c = job.pc.connection;
  c->data = &job;
  c->log_error = NGX_ERROR_INFO;
  c->read->handler = on_read;
  c->write->handler = on_write;
  ngx_add_timer(c->read, poller().timeout);
  if (rc == NGX_OK) on_write(c->write);  // connected at once
} catch (...) {
  log_exception(poller().log, "poll start");
}

void on_tick(ngx_event_t* ev) noexcept {
  Poller& p = poller();
  if (ngx_exiting || ngx_quit || ngx_terminate) return;
  if (claim_poller(std::max<ngx_msec_t>(3 * p.interval, 3000))) {
    omni::SharedState* st = shared_state();
    for (auto& job : p.jobs) {
      if (job->active) continue;
      if (job->server_info &&
          (st == nullptr || st->bootstrap_port(backend_of(*job)) != 0)) {
        continue;
      }
      start(*job);
    }
  }
  ngx_add_timer(ev, p.interval);
}

}  // namespace

void poller_start(ngx_cycle_t* cycle) noexcept try {
  const Registry* reg = registry();
  auto* mcf = static_cast<MainConf*>(
      ngx_http_cycle_get_module_main_conf(cycle, ngx_http_omni_proxy_module));
  if (reg == nullptr || mcf == nullptr || mcf->poll_interval == 0) return;
  Poller& p = poller();
  p.interval = mcf->poll_interval;
  p.timeout = std::min(mcf->poll_timeout, mcf->poll_interval);
  p.log = cycle->log;
  for (const Pool& pool : reg->pools) {
    for (std::uint16_t i = 0; i < pool.count; ++i) {
      for (bool info : {false, true}) {
        if (info && !pool.sglang_prefill) continue;
        auto job = std::make_unique<PollJob>();
        job->pool = &pool;
        job->server = i;
        job->server_info = info;
        p.jobs.push_back(std::move(job));
      }
    }
  }
  if (p.jobs.empty()) return;
  p.tick.handler = on_tick;
  p.tick.log = cycle->log;
  p.tick.data = &p;
  p.tick.cancelable = 1;
  ngx_add_timer(&p.tick, 1);  // first poll right away
} catch (...) {
  log_exception(cycle->log, "poller_start");
}

void poller_stop() noexcept {
  Poller& p = poller();
  if (p.tick.timer_set) ngx_del_timer(&p.tick);
  for (auto& job : p.jobs) close_job(*job);
  p.jobs.clear();
}

}  // namespace omni::ngx
