// The prefill and decode schedulers in nginx (omni_proxy_scheduler, omni_proxy_schedule).
//
// The queue, the per-instance models and every decision live in the shared zone
// (omni/scheduler.hpp). This file is the glue:
//  - one scheduling worker: the lease in the zone (pid and heartbeat). Every worker watches
//    the holder: a pidfd (pidfd_open) registered in its event loop becomes readable the moment
//    the holder dies, and a 100 ms timer checks the heartbeat (a holder alive but stuck, that
//    stopped beating for 500 ms, is replaced). The new holder reclaims the dead worker's entries
//    and runs a pass at once. After a reload that keeps the zone, the old cycle's holder hands
//    the lease over (the zone's generation tells it a newer cycle runs);
//  - notifications without polling (notify.cpp): an owner that enqueues (or frees a server)
//    wakes the scheduling worker; the scheduling worker wakes each owner whose requests it
//    decided;
//  - the request side: enqueue with admission control, learning the decision, reporting the
//    legs' ends (proxy_handler.cpp calls these).
#include "omni_module.hpp"

#include <omni/lifecycle.hpp>
#include <omni/robust_lock.hpp>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace omni::ngx {
namespace {

constexpr ngx_msec_t kLeaseTick = 100;  // heartbeat and lease check
constexpr std::uint64_t kLeaseStaleNs = 500'000'000ULL;
constexpr ngx_msec_t kReclaimEvery = 1000;
constexpr ngx_msec_t kBackstopSlack = 5000;  // past the bounds, a request gives up waiting
constexpr ngx_msec_t kRefreshEvery = 10;     // waiting requests' cache predictions, per worker
constexpr std::size_t kRefreshBatch = 32;    // at most this many (the oldest) per refresh
constexpr std::uint32_t kMinCapacity = 64;
constexpr std::uint32_t kMaxCapacity = omni::sched::kMaxCapacity;

struct SchedRuntime {
  std::unique_ptr<omni::sched::Scheduler> s;
  const Registry* reg = nullptr;
  ngx_log_t* log = nullptr;
  const std::uint64_t* generation = nullptr;
  std::uint64_t my_generation = 0;
  ngx_connection_t* pidfd = nullptr;
  std::int32_t watched = 0;
  ngx_event_t lease_timer{};
  ngx_event_t pass_timer{};
  ngx_event_t pass_event{};  // posted: run a pass after the current events
  ngx_event_t refresh_timer{};
  ngx_msec_t last_reclaim = 0;
  bool leader = false;
  ngx_queue_t waiting{};
  std::size_t waiting_count = 0;
  std::vector<omni::sched::InstanceView> views;
  ngx_msec_t last_refresh = 0;
  // Per backend: the poll last seen, and this proxy's decodes there at that moment (what the
  // engine's running count includes of ours).
  std::vector<std::pair<std::uint64_t, std::uint32_t>> polled;
};

SchedRuntime& srt() {
  static SchedRuntime r;
  return r;
}

// --- Configuration helpers ---------------------------------------------------------------------

std::string arg_string(const ngx_str_t& v) {
  return std::string(reinterpret_cast<const char*>(v.data), v.len);
}

bool parse_ms(const std::string& text, double& out) {
  if (text.empty()) return false;
  ngx_str_t s{text.size(), reinterpret_cast<u_char*>(const_cast<char*>(text.data()))};
  const ngx_int_t ms = ngx_parse_time(&s, 0);
  if (ms == NGX_ERROR) return false;
  out = static_cast<double>(ms);
  return true;
}

bool parse_uint(const std::string& text, std::uint64_t lo, std::uint64_t hi, std::uint64_t& out) {
  if (text.empty()) return false;
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(text.c_str(), &end, 10);
  if (errno != 0 || end == nullptr || *end != '\0' || text[0] == '-' || v < lo || v > hi) {
    return false;
  }
  out = v;
  return true;
}

bool parse_double(const std::string& text, double lo, double hi, double& out) {
  if (text.empty()) return false;
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text.c_str(), &end);
  if (errno != 0 || end == nullptr || *end != '\0' || !std::isfinite(v) || v < lo || v > hi) {
    return false;
  }
  out = v;
  return true;
}

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> out;
  std::size_t at = 0;
  while (at <= text.size()) {
    const std::size_t comma = text.find(',', at);
    const std::size_t end = comma == std::string::npos ? text.size() : comma;
    if (end > at) out.push_back(text.substr(at, end - at));
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return out;
}

const Pool* pool_named(const Registry& reg, const std::string& name) {
  for (const Pool& p : reg.pools) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

std::uint16_t pool_index(const Registry& reg, const Pool* pool) {
  return static_cast<std::uint16_t>(pool - reg.pools.data());
}

std::int32_t server_index(const Pool& pool, const std::string& name) {
  for (std::size_t i = 0; i < pool.servers.size(); ++i) {
    if (pool.servers[i].name == name) return static_cast<std::int32_t>(i);
  }
  return -1;
}

// --- Notifications -------------------------------------------------------------------------------

void run_pass() noexcept;
void scan_waiting() noexcept;
void refresh_waiting() noexcept;

void post(ngx_event_t& ev) {
  if (!ev.posted) {
    ngx_post_event(&ev, &ngx_posted_events);  // a multi-statement macro
  }
}

// Every wake-up of this worker (notify.cpp): the scheduling worker runs a pass, every worker
// looks at its waiting requests.
void on_wake() noexcept {
  SchedRuntime& r = srt();
  if (r.leader) run_pass();
  scan_waiting();
  refresh_waiting();
}

// --- The lease ----------------------------------------------------------------------------------

void on_pidfd(ngx_event_t* ev) noexcept;

void unwatch() {
  SchedRuntime& r = srt();
  if (r.pidfd != nullptr) {
    ngx_close_connection(r.pidfd);
    r.pidfd = nullptr;
  }
  r.watched = 0;
}

// Watches the scheduling worker: its pidfd becomes readable when it exits.
void watch(std::int32_t pid) {
  SchedRuntime& r = srt();
  if (pid == r.watched) return;
  unwatch();
  if (pid <= 0 || pid == ngx_pid) return;
  const int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) return;  // gone already, or no pidfd: the lease timer still notices
  ngx_connection_t* c = ngx_get_connection(fd, r.log);
  if (c == nullptr) {
    ::close(fd);
    return;
  }
  c->read->handler = on_pidfd;
  c->read->log = r.log;
  c->write->log = r.log;
  c->data = c;
  if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
    ngx_close_connection(c);
    return;
  }
  r.pidfd = c;
  r.watched = pid;
}

bool superseded() {
  SchedRuntime& r = srt();
  return r.generation != nullptr && *r.generation != r.my_generation;
}

// Takes the lease when it is free, dead or stale; hands it over when a newer cycle runs.
void check_lease() noexcept try {
  SchedRuntime& r = srt();
  if (r.s == nullptr) return;
  const std::uint64_t now = omni::steady_now_ns();
  if (superseded()) {
    // A newer cycle's workers share this zone: they schedule (they take the lease at their
    // next tick), this worker's queued requests included.
    if (r.leader && r.s->release_lease(ngx_pid)) {
      ngx_log_error(NGX_LOG_NOTICE, r.log, 0,
                    "omni_proxy scheduler: worker %P hands the scheduler to the new workers",
                    ngx_pid);
    }
    r.leader = false;
    watch(r.s->leader());
    return;
  }
  // Otherwise this cycle's workers schedule, a worker shutting down gracefully included: after
  // a reload that changed the configuration, the old workers keep scheduling their own zone's
  // queue until they are gone.
  bool changed = false;
  r.leader = r.s->claim_lease(ngx_pid, now, kLeaseStaleNs, &changed);
  if (r.leader) {
    unwatch();
    r.s->beat_lease(ngx_pid, now);
    if (changed) {
      const std::uint32_t freed = r.s->reclaim_dead(now);
      r.s->repair();
      r.last_reclaim = ngx_current_msec;
      ngx_log_error(NGX_LOG_NOTICE, r.log, 0,
                    "omni_proxy scheduler: worker %P runs the scheduler (%uD entries of exited "
                    "workers freed)",
                    ngx_pid, freed);
      run_pass();
    } else if (ngx_current_msec - r.last_reclaim >= kReclaimEvery) {
      r.last_reclaim = ngx_current_msec;
      if (r.s->reclaim_dead(now) > 0) run_pass();
    }
  } else {
    watch(r.s->leader());
  }
} catch (...) {
  log_exception(srt().log, "scheduler lease");
}

void on_pidfd(ngx_event_t*) noexcept {
  unwatch();
  check_lease();
}

void lease_tick(ngx_event_t* ev) noexcept {
  check_lease();
  SchedRuntime& r = srt();
  // The engines' polled load changes without an event: queued requests are looked at again.
  if (r.s != nullptr && r.leader) {
    const omni::sched::Stats st = r.s->stats();
    if (st.queued + st.decode_queued > 0) run_pass();
  }
  if (r.s != nullptr && !ngx_terminate) ngx_add_timer(ev, kLeaseTick);
}

// Wakes the scheduling worker (or becomes it when there is none).
void wake_leader() noexcept {
  SchedRuntime& r = srt();
  if (r.s == nullptr) return;
  std::int32_t holder = r.s->leader();
  if (holder == 0 || (holder != ngx_pid && omni::pid_gone(static_cast<std::uint64_t>(holder)))) {
    check_lease();
    holder = r.s->leader();
  }
  if (holder == ngx_pid) {
    r.leader = true;
    post(r.pass_event);
  } else {
    notify_wake(holder);
  }
}

// --- Passes
// ---------------------------------------------------------------------------------------

// Health and load of every backend, from the poller and the configuration.
void fill_views() {
  SchedRuntime& r = srt();
  omni::SharedState* ss = shared_state();
  r.views.assign(r.s->instances(), omni::sched::InstanceView{});
  const std::uint64_t now = omni::steady_now_ns();
  MainConf* mcf = static_cast<MainConf*>(
      ngx_http_cycle_get_module_main_conf(ngx_cycle, ngx_http_omni_proxy_module));
  const std::uint64_t interval_ns =
      mcf != nullptr && mcf->poll_interval != NGX_CONF_UNSET_MSEC
          ? static_cast<std::uint64_t>(mcf->poll_interval) * 1'000'000ULL
          : 0;
  for (const Pool& p : r.reg->pools) {
    auto* peers = static_cast<ngx_http_upstream_rr_peers_t*>(p.uscf->peer.data);
    ngx_http_upstream_rr_peer_t* peer = peers != nullptr ? peers->peer : nullptr;
    for (std::uint16_t i = 0; i < p.count; ++i, peer = peer != nullptr ? peer->next : nullptr) {
      omni::sched::InstanceView& v = r.views[p.base + i];
      // Down, or failed max_fails times within fail_timeout: nginx would not connect to it, so
      // a request placed there would fail with "no live upstreams".
      if (peer != nullptr && peer_unavailable(peer, ngx_time())) v.healthy = false;
      if (ss == nullptr) continue;
      const auto load = ss->engine_load(static_cast<std::uint16_t>(p.base + i));
      if (load && load->polled_ns != 0) {
        v.engine_running = load->running;
        v.engine_waiting = load->waiting;
        v.kv_usage = load->kv_usage;
        const std::uint32_t b = p.base + i;
        if (r.polled.size() < r.views.size()) r.polled.resize(r.views.size(), {0, 0});
        if (r.polled[b].first != load->polled_ns) {
          r.polled[b] = {load->polled_ns,
                         r.s->instance_stats(b, now, r.reg->sched.options).decoding};
        }
        v.others_running =
            load->running > r.polled[b].second ? load->running - r.polled[b].second : 0;
      }
      // Polling says the engine is unreachable: failures and no success for 3 intervals.
      if (interval_ns != 0 && ss->poll_failures_total(static_cast<std::uint16_t>(p.base + i)) > 0) {
        const std::uint64_t last = load ? load->polled_ns : 0;
        if (last == 0 || (now > last && now - last > 3 * interval_ns)) v.healthy = false;
      }
    }
  }
}

void run_pass() noexcept try {
  SchedRuntime& r = srt();
  if (r.s == nullptr || !r.leader) return;
  if (r.s->leader() != ngx_pid) {  // lost it (stale heartbeat during a long stall)
    r.leader = false;
    return;
  }
  fill_views();
  const std::uint64_t now = omni::steady_now_ns();
  r.s->beat_lease(ngx_pid, now);
  omni::sched::PassResult res = r.s->pass(now, r.reg->sched.options, r.views);
  for (std::int32_t pid : res.wake) notify_wake(pid);
  if (r.pass_timer.timer_set) ngx_del_timer(&r.pass_timer);
  if (res.next_ns != 0) {
    const std::uint64_t after = res.next_ns > now ? res.next_ns - now : 0;
    const auto ms = static_cast<ngx_msec_t>(
        std::min<std::uint64_t>(std::max<std::uint64_t>(1, (after + 999'999) / 1'000'000), 60'000));
    ngx_add_timer(&r.pass_timer, ms);
  }
} catch (...) {
  log_exception(srt().log, "scheduler pass");
}

void on_pass_event(ngx_event_t*) noexcept {
  run_pass();
}

void unlink_waiting(SchedRequest& sr) {
  if (!sr.waiting) return;
  ngx_queue_remove(&sr.link);
  sr.waiting = false;
  --srt().waiting_count;
  if (sr.backstop.timer_set) ngx_del_timer(&sr.backstop);
}

void on_backstop(ngx_event_t* ev) noexcept {
  auto* sr = static_cast<SchedRequest*>(ev->data);
  // The decision never came (no scheduling worker, or the entry was lost): the request's own
  // handler sees a free entry and fails it.
  sr->timed_out = true;
  sched_cancel(*sr);
  if (sr->on_change != nullptr) sr->on_change(sr->data);
}

void link_waiting(SchedRequest& sr, ngx_msec_t bound) {
  SchedRuntime& r = srt();
  if (!sr.waiting) {
    ngx_queue_insert_tail(&r.waiting, &sr.link);
    sr.waiting = true;
    ++r.waiting_count;
  }
  if (!r.refresh_timer.timer_set && r.refresh_timer.handler != nullptr) {
    ngx_add_timer(&r.refresh_timer, kRefreshEvery);
  }
  sr.backstop.handler = on_backstop;
  sr.backstop.data = &sr;
  sr.backstop.log = r.log;
  if (sr.backstop.timer_set) ngx_del_timer(&sr.backstop);
  ngx_add_timer(&sr.backstop, bound + kBackstopSlack);
}

void scan_waiting() noexcept {
  SchedRuntime& r = srt();
  if (r.s == nullptr || r.waiting.next == nullptr) return;
  // Collect first: a handler may finalize its request (and unlink others' neighbours).
  std::vector<SchedRequest*> changed;
  for (ngx_queue_t* q = ngx_queue_head(&r.waiting); q != ngx_queue_sentinel(&r.waiting);
       q = ngx_queue_next(q)) {
    SchedRequest* sr = ngx_queue_data(q, SchedRequest, link);
    const omni::sched::Decision d = r.s->decision(sr->ref);
    if (static_cast<std::uint8_t>(d.state) != sr->seen) changed.push_back(sr);
  }
  for (SchedRequest* sr : changed) {
    // Still waiting (an earlier handler may have ended this request)?
    bool present = false;
    for (ngx_queue_t* q = ngx_queue_head(&r.waiting); q != ngx_queue_sentinel(&r.waiting);
         q = ngx_queue_next(q)) {
      if (ngx_queue_data(q, SchedRequest, link) == sr) {
        present = true;
        break;
      }
    }
    if (!present) continue;
    unlink_waiting(*sr);
    if (sr->on_change != nullptr) sr->on_change(sr->data);
  }
}

// The caches change while requests wait: a request sent meanwhile is pending on its server
// (kv.cpp), or cached (approximate mode), a prefill that ended is in the events. Every
// kRefreshEvery ms while this worker has waiting requests, and on its wake-ups (at most once
// per millisecond), the oldest kRefreshBatch of them (those placed next) get fresh predictions;
// those that changed go to the scheduler, whose next pass places them by the new values. An
// owner is woken only for its own requests, hence the timer. Cost: per refreshed request and
// server, one index lookup per block it holds plus one.
void refresh_waiting() noexcept try {
  SchedRuntime& r = srt();
  if (r.s == nullptr || r.waiting.next == nullptr || r.waiting_count == 0) return;
  if (r.last_refresh == ngx_current_msec) return;
  r.last_refresh = ngx_current_msec;
  bool changed = false;
  std::vector<std::uint32_t> fresh[2];
  std::size_t done = 0;
  for (ngx_queue_t* q = ngx_queue_head(&r.waiting);
       q != ngx_queue_sentinel(&r.waiting) && done < kRefreshBatch; q = ngx_queue_next(q)) {
    SchedRequest* sr = ngx_queue_data(q, SchedRequest, link);
    ++done;
    if (sr->kv == nullptr || sr->cached == nullptr || !sr->active) continue;
    for (int which = 0; which < 2; ++which) {
      fresh[which].clear();
      if (sr->kv_pools[which] != nullptr) {
        kv_cached_by_server(*sr->kv_pools[which], *sr->kv, which, fresh[which]);
      }
    }
    if (fresh[0] == sr->cached[0] && fresh[1] == sr->cached[1]) continue;
    // Kept only when the scheduler took them (not when it placed the request meanwhile): the
    // request's route explanation shows the values it was placed by.
    if (!r.s->update_cached(sr->ref, fresh[0], fresh[1])) continue;
    changed = true;
    sr->cached[0].swap(fresh[0]);
    sr->cached[1].swap(fresh[1]);
  }
  if (changed) wake_leader();
} catch (...) {
  log_exception(srt().log, "scheduler cache refresh");
}

void refresh_tick(ngx_event_t* ev) noexcept {
  SchedRuntime& r = srt();
  refresh_waiting();
  if (r.waiting_count > 0 && !ngx_exiting && !ngx_terminate) ngx_add_timer(ev, kRefreshEvery);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Directives
// ---------------------------------------------------------------------------------------------

char* set_scheduler(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept try {
  auto* mcf = static_cast<MainConf*>(conf);
  Registry::Sched& sc = mcf->registry->sched;
  if (sc.enabled) return const_cast<char*>("is duplicate");
  auto* value = static_cast<ngx_str_t*>(cf->args->elts);
  omni::sched::Options& o = sc.options;
  // Misses priced as kv_aware prices them (miss_weight=2), in the choice and in the decision to
  // wait for the holder: on Mooncake x1.5-x2 that keeps 94-97% of the hits the served requests
  // could have, against 73-83% unpriced (docs/benchmarks.md, "The scheduler's price").
  o.route.miss_weight = 2;
  for (ngx_uint_t i = 1; i < cf->args->nelts; ++i) {
    const std::string arg = arg_string(value[i]);
    const std::size_t eq = arg.find('=');
    const std::string name = arg.substr(0, eq);
    const std::string text = eq == std::string::npos ? "" : arg.substr(eq + 1);
    std::uint64_t n = 0;
    double ms = 0, x = 0;
    bool ok = true;
    if (name == "queue" && parse_uint(text, kMinCapacity, kMaxCapacity, n)) {
      sc.capacity = static_cast<std::uint32_t>(n);
    } else if (name == "max_queue" && parse_uint(text, 1, kMaxCapacity, n)) {
      o.max_queue = static_cast<std::uint32_t>(n);
    } else if (name == "max_wait" && parse_ms(text, ms) && ms >= 1 && ms <= 3'600'000) {
      o.max_wait_ms = static_cast<std::uint64_t>(ms);
    } else if (name == "decode_max_wait" && parse_ms(text, ms) && ms >= 1 && ms <= 3'600'000) {
      o.decode_max_wait_ms = static_cast<std::uint64_t>(ms);
    } else if (name == "wait_weight" && parse_double(text, 1e-6, 1e6, x)) {
      o.wait_weight = x;
    } else if (name == "length_weight" && parse_ms(text, ms) && ms <= 3'600'000) {
      o.length_weight_ms = ms;
    } else if (name == "release" && (text == "immediate" || text == "boundary")) {
      o.release =
          text == "boundary" ? omni::sched::Release::kBoundary : omni::sched::Release::kImmediate;
    } else if (name == "lead" && parse_ms(text, ms) && ms <= 60'000) {
      o.lead_ms = ms;
    } else if (name == "merge" && parse_ms(text, ms) && ms >= 1 && ms <= 1000) {
      o.merge_ms = ms;
    } else if (name == "step" && parse_ms(text, ms) && ms <= 60'000) {
      o.default_step_ms = ms;
    } else if (name == "per_ktoken" && parse_ms(text, ms) && ms >= 1 && ms <= 60'000) {
      o.default_ms_per_ktoken = ms;
    } else if (name == "batch_tokens" && parse_uint(text, 1, 1u << 24, n)) {
      o.default_batch_tokens = static_cast<std::uint32_t>(n);
    } else if (name == "step_target" && parse_ms(text, ms) && ms <= 600'000) {
      o.step_target_ms = ms;
    } else if (name == "tpot_slo" && parse_ms(text, ms) && ms <= 60'000) {
      o.tpot_slo_ms = ms;
    } else if (name == "itl" && parse_ms(text, ms) && ms >= 1 && ms <= 60'000) {
      o.default_itl_ms = ms;
    } else if (name == "tie" && parse_double(text, 0, 10, x)) {
      o.route.tie_fraction = x;
    } else if (name == "epsilon" && parse_double(text, 0, 10, x)) {
      o.route.epsilon = x;
    } else if (name == "miss_weight" && parse_double(text, 0, 10, x)) {
      o.route.miss_weight = x;
    } else if (name == "miss_wait" && (text == "on" || text == "off")) {
      o.miss_wait = text == "on";
    } else if (name == "priority_header" && !text.empty() && text.size() <= 64) {
      sc.priority_header = text;
      std::transform(sc.priority_header.begin(), sc.priority_header.end(),
                     sc.priority_header.begin(), [](unsigned char ch) { return std::tolower(ch); });
    } else {
      ok = false;
    }
    if (!ok) {
      ngx_conf_log_error(
          NGX_LOG_EMERG, cf, 0,
          "\"%V\": invalid parameter \"%V\"; use queue=64..%uD, max_queue=N, max_wait=TIME, "
          "decode_max_wait=TIME, wait_weight=X, length_weight=TIME, release=immediate|boundary, "
          "lead=TIME, merge=TIME, step=TIME, per_ktoken=TIME, batch_tokens=N, step_target=TIME, "
          "tpot_slo=TIME, "
          "itl=TIME, tie=X, epsilon=X, miss_weight=X, miss_wait=on|off, "
          "priority_header=NAME",
          &cmd->name, &value[i], kMaxCapacity);
      return static_cast<char*>(NGX_CONF_ERROR);
    }
  }
  if (o.max_queue > sc.capacity) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V\": max_queue=%uD exceeds queue=%uD", &cmd->name,
                       o.max_queue, sc.capacity);
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  sc.enabled = true;
  sc.file = arg_string(cf->conf_file->file.name);
  sc.line = cf->conf_file->line;
  return NGX_CONF_OK;
} catch (...) {
  log_exception(cf->log, "omni_proxy_scheduler");
  return static_cast<char*>(NGX_CONF_ERROR);
}

char* set_capacity(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept try {
  auto* mcf = static_cast<MainConf*>(conf);
  auto* value = static_cast<ngx_str_t*>(cf->args->elts);
  Registry::Sched::CapacityDecl d;
  d.upstream = arg_string(value[1]);
  for (const auto& other : mcf->registry->sched.capacities) {
    if (other.upstream == d.upstream) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V\": upstream \"%V\" is declared already",
                         &cmd->name, &value[1]);
      return static_cast<char*>(NGX_CONF_ERROR);
    }
  }
  for (ngx_uint_t i = 2; i < cf->args->nelts; ++i) {
    const std::string arg = arg_string(value[i]);
    const std::size_t eq = arg.find('=');
    const std::string name = arg.substr(0, eq);
    const std::string text = eq == std::string::npos ? "" : arg.substr(eq + 1);
    std::uint64_t n = 0;
    if (name == "batch_tokens" && parse_uint(text, 1, 1u << 24, n)) {
      d.batch_tokens = static_cast<std::uint32_t>(n);
    } else if (name == "max_seqs" && parse_uint(text, 1, 1u << 20, n)) {
      d.max_seqs = static_cast<std::uint32_t>(n);
    } else {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "\"%V\": invalid parameter \"%V\"; use batch_tokens=1..16777216, "
                         "max_seqs=1..1048576",
                         &cmd->name, &value[i]);
      return static_cast<char*>(NGX_CONF_ERROR);
    }
  }
  d.file = arg_string(cf->conf_file->file.name);
  d.line = cf->conf_file->line;
  mcf->registry->sched.capacities.push_back(std::move(d));
  return NGX_CONF_OK;
} catch (...) {
  log_exception(cf->log, "omni_proxy_capacity");
  return static_cast<char*>(NGX_CONF_ERROR);
}

char* set_pd_group(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept try {
  auto* mcf = static_cast<MainConf*>(conf);
  auto* value = static_cast<ngx_str_t*>(cf->args->elts);
  Registry::Sched::GroupDecl g;
  g.prefill_upstream = arg_string(value[1]);
  g.decode_upstream = arg_string(value[2]);
  for (ngx_uint_t i = 3; i < cf->args->nelts; ++i) {
    const std::string arg = arg_string(value[i]);
    if (arg.rfind("prefill=", 0) == 0) {
      for (auto& s : split_commas(arg.substr(8))) g.prefill.push_back(s);
    } else if (arg.rfind("decode=", 0) == 0) {
      for (auto& s : split_commas(arg.substr(7))) g.decode.push_back(s);
    } else {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "\"%V\": invalid parameter \"%V\"; use prefill=ADDR[,ADDR...] "
                         "decode=ADDR[,ADDR...]",
                         &cmd->name, &value[i]);
      return static_cast<char*>(NGX_CONF_ERROR);
    }
  }
  if (g.prefill.empty() || g.decode.empty()) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"%V\" needs prefill=ADDR[,ADDR...] and decode=ADDR[,ADDR...]", &cmd->name);
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  g.file = arg_string(cf->conf_file->file.name);
  g.line = cf->conf_file->line;
  mcf->registry->sched.groups.push_back(std::move(g));
  return NGX_CONF_OK;
} catch (...) {
  log_exception(cf->log, "omni_proxy_pd_group");
  return static_cast<char*>(NGX_CONF_ERROR);
}

bool sched_finalize(ngx_conf_t* cf, Registry& reg) noexcept try {
  Registry::Sched& sc = reg.sched;
  if (!sc.uses.empty() && !sc.enabled) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"omni_proxy_schedule\" in %s:%ui needs \"omni_proxy_scheduler\" at the "
                       "http level",
                       sc.uses[0].first.c_str(), sc.uses[0].second);
    return false;
  }
  if (!sc.enabled) {
    if (!sc.capacities.empty() || !sc.groups.empty()) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "\"%s\" needs \"omni_proxy_scheduler\" at the http level",
                         sc.capacities.empty() ? "omni_proxy_pd_group" : "omni_proxy_capacity");
      return false;
    }
    return true;
  }
  if (reg.pools.empty()) return true;  // nothing to schedule: no zone room is taken
  if (reg.state_config.max_backends > omni::sched::kMaxInstances) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"omni_proxy_scheduler\": omni_proxy locations use %uD servers; the "
                       "scheduler handles at most %uz",
                       reg.state_config.max_backends, omni::sched::kMaxInstances);
    return false;
  }
  if (reg.pools.size() > omni::sched::kMaxPools) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"omni_proxy_scheduler\": %uz upstream blocks are used by omni_proxy "
                       "locations; the scheduler handles at most %uz",
                       reg.pools.size(), omni::sched::kMaxPools);
    return false;
  }
  for (const Pool& p : reg.pools) {
    if (p.count > omni::sched::kMaxServers) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "\"omni_proxy_scheduler\": upstream \"%s\" has %ud servers; the "
                         "scheduler handles at most %uz per upstream block",
                         p.name.c_str(), static_cast<unsigned>(p.count), omni::sched::kMaxServers);
      return false;
    }
  }
  sc.limits.assign(reg.state_config.max_backends, omni::sched::InstanceLimits{});
  for (const auto& d : sc.capacities) {
    const Pool* pool = pool_named(reg, d.upstream);
    if (pool == nullptr) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "\"omni_proxy_capacity\" in %s:%ui: upstream \"%s\" is not used by any "
                         "omni_proxy location",
                         d.file.c_str(), d.line, d.upstream.c_str());
      return false;
    }
    for (std::uint16_t i = 0; i < pool->count; ++i) {
      sc.limits[pool->base + i] = {d.batch_tokens, d.max_seqs};
    }
  }
  sc.options.pairings.clear();
  for (const auto& g : sc.groups) {
    const Pool* pp = pool_named(reg, g.prefill_upstream);
    const Pool* dp = pool_named(reg, g.decode_upstream);
    if (pp == nullptr || dp == nullptr) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "\"omni_proxy_pd_group\" in %s:%ui: upstream \"%s\" is not used by any "
                         "omni_proxy location",
                         g.file.c_str(), g.line,
                         (pp == nullptr ? g.prefill_upstream : g.decode_upstream).c_str());
      return false;
    }
    std::uint64_t mask = 0;
    for (const std::string& name : g.decode) {
      const std::int32_t j = server_index(*dp, name);
      if (j < 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"omni_proxy_pd_group\" in %s:%ui: upstream \"%s\" has no server "
                           "\"%s\" (name servers as host:port, as in the upstream block)",
                           g.file.c_str(), g.line, g.decode_upstream.c_str(), name.c_str());
        return false;
      }
      mask |= std::uint64_t{1} << j;
    }
    for (const std::string& name : g.prefill) {
      const std::int32_t j = server_index(*pp, name);
      if (j < 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"omni_proxy_pd_group\" in %s:%ui: upstream \"%s\" has no server "
                           "\"%s\" (name servers as host:port, as in the upstream block)",
                           g.file.c_str(), g.line, g.prefill_upstream.c_str(), name.c_str());
        return false;
      }
      const auto backend = static_cast<std::uint16_t>(pp->base + j);
      const std::uint16_t dpool = pool_index(reg, dp);
      bool merged = false;
      for (auto& pr : sc.options.pairings) {
        if (pr.prefill_backend == backend && pr.decode_pool == dpool) {
          pr.decode_mask |= mask;  // several groups: the union
          merged = true;
        }
      }
      if (!merged) sc.options.pairings.push_back({backend, dpool, mask});
    }
  }
  return true;
} catch (...) {
  log_exception(cf->log, "omni_proxy_scheduler");
  return false;
}

namespace {

omni::sched::Shape shape_of(const Registry& reg) {
  omni::sched::Shape shape;
  shape.capacity = reg.sched.capacity;
  shape.instances = std::max<std::uint32_t>(1, reg.state_config.max_backends);
  for (const Pool& p : reg.pools) {
    omni::sched::PoolShape ps;
    ps.base = p.base;
    ps.count = p.count;
    for (const Pool::Server& s : p.servers) ps.ids.push_back(s.id);
    // Two servers of one block with the same name: ids must still differ for the ring.
    for (std::size_t i = 0; i < ps.ids.size(); ++i) {
      for (std::size_t j = 0; j < i; ++j) {
        if (ps.ids[j] == ps.ids[i]) ps.ids[i] = omni::mix64(ps.ids[i] + i);
      }
    }
    shape.pools.push_back(std::move(ps));
  }
  return shape;
}

}  // namespace

std::size_t sched_bytes(const Registry& reg) noexcept try {
  if (!reg.sched.enabled || reg.pools.empty()) return 0;
  return omni::sched::Scheduler::required_bytes(shape_of(reg));
} catch (...) {
  return 0;
}

bool sched_create(void* region, std::size_t bytes, const Registry& reg, ngx_log_t* log) noexcept
    try {
  auto s = omni::sched::Scheduler::create(region, bytes, shape_of(reg));
  if (s == nullptr) {
    ngx_log_error(NGX_LOG_EMERG, log, 0, "omni_proxy_scheduler: cannot lay out the queue");
    return false;
  }
  for (std::size_t b = 0; b < reg.sched.limits.size() && b < s->instances(); ++b) {
    s->set_limits(static_cast<std::uint32_t>(b), reg.sched.limits[b]);
  }
  return true;
} catch (...) {
  log_exception(log, "omni_proxy_scheduler");
  return false;
}

void sched_init_process(ngx_cycle_t* cycle, void* region, std::size_t bytes,
                        const std::uint64_t* generation) noexcept try {
  SchedRuntime& r = srt();
  const Registry* reg = registry();
  if (reg == nullptr || !reg->sched.enabled) return;
  r.s = omni::sched::Scheduler::attach(region, bytes);
  if (r.s == nullptr) {
    ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                  "omni_proxy_scheduler: the zone holds no scheduler; scheduled locations "
                  "route without queueing");
    return;
  }
  r.reg = reg;
  r.log = cycle->log;
  r.generation = generation;
  r.my_generation = generation != nullptr ? *generation : 0;
  ngx_queue_init(&r.waiting);
  // This cycle's capacities (a reload may have changed them).
  for (std::size_t b = 0; b < reg->sched.limits.size() && b < r.s->instances(); ++b) {
    r.s->set_limits(static_cast<std::uint32_t>(b), reg->sched.limits[b]);
  }
  for (ngx_event_t* ev : {&r.pass_event, &r.pass_timer, &r.lease_timer, &r.refresh_timer}) {
    ev->log = cycle->log;
    ev->data = &r;
  }
  r.pass_event.handler = on_pass_event;
  r.pass_timer.handler = on_pass_event;
  r.pass_timer.cancelable = 1;
  r.lease_timer.handler = lease_tick;
  r.lease_timer.cancelable = 1;
  r.refresh_timer.handler = refresh_tick;
  r.refresh_timer.cancelable = 1;
  if (!notify_ready()) {
    ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                  "omni_proxy_scheduler: no wake-up socket; scheduled locations route without "
                  "queueing in this worker");
    r.s.reset();
    return;
  }
  notify_subscribe(on_wake);
  check_lease();
  ngx_add_timer(&r.lease_timer, kLeaseTick);
} catch (...) {
  log_exception(cycle->log, "scheduler init_process");
}

void sched_exit_process() noexcept {
  SchedRuntime& r = srt();
  if (r.s == nullptr) return;
  if (r.lease_timer.timer_set) ngx_del_timer(&r.lease_timer);
  if (r.pass_timer.timer_set) ngx_del_timer(&r.pass_timer);
  if (r.pass_event.posted) {
    ngx_delete_posted_event(&r.pass_event);
  }
  const bool was_leader = r.s->release_lease(ngx_pid);
  unwatch();
  // The other workers watch this one's pidfd: they take over when it has exited.
  (void)was_leader;
  r.s.reset();
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

bool sched_active(const LocConf& lcf) noexcept {
  return lcf.schedule == 1 && srt().s != nullptr;
}

std::int32_t sched_priority(ngx_http_request_t* r, std::optional<std::int64_t> body_priority) {
  static const std::string kDefault = "x-omni-priority";
  const std::string v =
      header_value(r, srt().reg != nullptr ? srt().reg->sched.priority_header : kDefault);
  if (!v.empty()) {
    char* end = nullptr;
    errno = 0;
    const long long p = std::strtoll(v.c_str(), &end, 10);
    if (errno == 0 && end != nullptr && *end == '\0') {
      return static_cast<std::int32_t>(std::clamp<long long>(p, -1'000'000, 1'000'000));
    }
  }
  if (body_priority) {
    return static_cast<std::int32_t>(
        std::clamp<std::int64_t>(*body_priority, -1'000'000, 1'000'000));
  }
  return 0;
}

SchedEnqueue sched_enqueue(const LocConf& lcf, const KvRequest& kv, std::int32_t priority,
                           SchedRequest& sr, ngx_log_t* log) try {
  SchedRuntime& r = srt();
  SchedEnqueue out;
  const Registry& reg = *r.reg;
  const bool aggregated = lcf.mode == kModeAggregated;
  const Pool* pp = find_pool(aggregated ? lcf.decode.upstream : lcf.prefill.upstream);
  const Pool* dp = aggregated ? nullptr : find_pool(lcf.decode.upstream);
  if (pp == nullptr || (!aggregated && dp == nullptr)) {
    out.status = NGX_HTTP_INTERNAL_SERVER_ERROR;
    out.message = "the scheduler does not know this location's upstream blocks";
    return out;
  }
  std::vector<std::uint32_t> pc, dc;
  kv_cached_by_server(*pp, kv, 0, pc);
  if (dp != nullptr) kv_cached_by_server(*dp, kv, 1, dc);
  omni::sched::EnqueueRequest req;
  req.owner_pid = ngx_pid;
  req.mode = aggregated                  ? omni::sched::Mode::kAggregated
             : lcf.mode == kModeParallel ? omni::sched::Mode::kParallel
                                         : omni::sched::Mode::kSequential;
  req.prefill_pool = pool_index(reg, pp);
  req.decode_pool = dp != nullptr ? pool_index(reg, dp) : omni::sched::kNoPool;
  req.priority = priority;
  req.prompt_tokens = kv.prompt_tokens;
  req.ring_key = kv_ring_key(kv, 0, pc);
  req.prefill_cached = pc;
  req.decode_cached = dc;
  fill_views();
  const std::uint64_t now = omni::steady_now_ns();
  const omni::sched::EnqueueResult res = r.s->enqueue(req, now, reg.sched.options, r.views);
  if (res.verdict != omni::sched::Verdict::kQueued) {
    out.status = res.verdict == omni::sched::Verdict::kQueueFull ? NGX_HTTP_TOO_MANY_REQUESTS
                 : res.verdict == omni::sched::Verdict::kInvalid ? NGX_HTTP_INTERNAL_SERVER_ERROR
                                                                 : NGX_HTTP_SERVICE_UNAVAILABLE;
    out.retry_after_s = res.retry_after_s;
    out.message = res.message;
    return out;
  }
  sr.ref = res.ref;
  sr.active = true;
  sr.kv = &kv;
  sr.kv_pools[0] = pp;
  sr.kv_pools[1] = dp;
  sr.sequential = req.mode == omni::sched::Mode::kSequential;
  sr.seen = static_cast<std::uint8_t>(omni::sched::State::kQueued);
  sr.enqueue_ns = now;
  sr.latency_recorded = false;
  link_waiting(sr, static_cast<ngx_msec_t>(reg.sched.options.max_wait_ms));
  out.queued = true;
  out.cached[0] = std::move(pc);
  out.cached[1] = std::move(dc);
  wake_leader();
  return out;
} catch (...) {
  log_exception(log, "scheduler enqueue");
  SchedEnqueue out;
  out.status = NGX_HTTP_INTERNAL_SERVER_ERROR;
  out.message = "the scheduler failed";
  return out;
}

omni::sched::Decision sched_decision(const SchedRequest& sr) noexcept {
  SchedRuntime& r = srt();
  if (r.s == nullptr || !sr.active) return {};
  return r.s->decision(sr.ref);
}

void sched_acted(SchedRequest& sr) noexcept {
  SchedRuntime& r = srt();
  const omni::sched::Decision d = sched_decision(sr);
  sr.seen = static_cast<std::uint8_t>(d.state);
  if (r.s == nullptr || sr.latency_recorded || !d.valid) return;
  sr.latency_recorded = true;
  const std::uint64_t now = omni::steady_now_ns();
  r.s->observe_decision_latency(now > sr.enqueue_ns ? now - sr.enqueue_ns : 0);
  // From the decision to this worker acting on it: what the notification costs.
  if (d.released_ns != 0)
    r.s->observe_notify_latency(now > d.released_ns ? now - d.released_ns : 0);
}

void sched_prefill_done(SchedRequest& sr, bool ok, std::optional<std::uint32_t> actual_cached,
                        std::int32_t server) noexcept {
  SchedRuntime& r = srt();
  if (r.s == nullptr || !sr.active) return;
  const bool learn = server >= 0 && r.s->decision(sr.ref).prefill_server == server;
  const bool wake = r.s->prefill_done(sr.ref, omni::steady_now_ns(), ok, actual_cached,
                                      r.reg->sched.options, learn);
  const omni::sched::Decision d = r.s->decision(sr.ref);
  if (!d.valid) sr.active = false;
  // Sequential: it waits for its decode server. The scheduling worker (another process) may
  // have chosen it already, between the two calls above: the scan sees the change either way,
  // and exactly one decode leg starts, from on_change.
  if (ok && sr.sequential && d.valid) {
    sr.seen = static_cast<std::uint8_t>(omni::sched::State::kDecodeQueued);
    link_waiting(sr, static_cast<ngx_msec_t>(r.reg->sched.options.decode_max_wait_ms));
    if (d.state != omni::sched::State::kDecodeQueued) notify_wake(ngx_pid);
  }
  if (wake) wake_leader();
}

void sched_decode_done(SchedRequest& sr, double tpot_ms) noexcept {
  SchedRuntime& r = srt();
  if (r.s == nullptr || !sr.active) return;
  unlink_waiting(sr);
  sr.active = false;
  if (r.s->decode_done(sr.ref, omni::steady_now_ns(), tpot_ms, r.reg->sched.options)) {
    wake_leader();
  }
}

void sched_cancel(SchedRequest& sr) noexcept {
  SchedRuntime& r = srt();
  unlink_waiting(sr);
  if (r.s == nullptr || !sr.active) return;
  sr.active = false;
  if (r.s->cancel(sr.ref, omni::steady_now_ns())) wake_leader();
}

// ---------------------------------------------------------------------------------------------
// Observability
// ---------------------------------------------------------------------------------------------

namespace {

nlohmann::json histogram_json(const omni::Log2Histogram& h) {
  const std::uint64_t count = h.count.load(std::memory_order_relaxed);
  nlohmann::json j = {{"count", count}};
  if (count == 0) return j;
  j["mean_us"] = static_cast<double>(h.sum_ns.load(std::memory_order_relaxed)) / count / 1e3;
  j["p50_us_at_most"] = static_cast<double>(h.quantile_ns(0.5)) / 1e3;
  j["p99_us_at_most"] = static_cast<double>(h.quantile_ns(0.99)) / 1e3;
  j["max_us"] = static_cast<double>(h.max_ns.load(std::memory_order_relaxed)) / 1e3;
  // The non-empty buckets, [upper bound in ns, count] (quantiles of a period from two reads).
  nlohmann::json b = nlohmann::json::array();
  for (std::size_t k = 0; k < omni::Log2Histogram::kBuckets; ++k) {
    const std::uint64_t c = h.buckets[k].load(std::memory_order_relaxed);
    if (c != 0) b.push_back({omni::Log2Histogram::upper_ns(k), c});
  }
  j["buckets"] = std::move(b);
  return j;
}

void histogram_metric(omni::prom::TextWriter& w, const char* name, const char* help,
                      const omni::Log2Histogram& h) {
  w.family(name, "histogram", help);
  // Powers of two as `le` bounds (the sub-buckets of each are summed): 35 lines, not 133.
  std::vector<double> bounds;
  std::vector<std::uint64_t> counts;
  std::uint64_t overflow = 0, acc = 0;
  for (std::size_t k = 0; k < omni::Log2Histogram::kBuckets; ++k) {
    const std::uint64_t c = h.buckets[k].load(std::memory_order_relaxed);
    if (k + 1 == omni::Log2Histogram::kBuckets) {
      overflow = c;
      break;
    }
    acc += c;
    if (k < 4 || k % omni::Log2Histogram::kSub == 3) {
      bounds.push_back(static_cast<double>(omni::Log2Histogram::upper_ns(k) + 1) / 1e9);
      counts.push_back(acc);
      acc = 0;
    }
  }
  w.histogram(name, {}, bounds, counts, overflow,
              static_cast<double>(h.sum_ns.load(std::memory_order_relaxed)) / 1e9);
}

}  // namespace

nlohmann::json sched_status_json() {
  SchedRuntime& r = srt();
  if (r.s == nullptr) return nullptr;
  const omni::sched::Stats st = r.s->stats();
  const std::uint64_t now = omni::steady_now_ns();
  nlohmann::json j;
  j["leader_pid"] = st.leader_pid;
  j["leader_for_ms"] = st.leader_since_ns != 0 && now > st.leader_since_ns
                           ? (now - st.leader_since_ns) / 1'000'000
                           : 0;
  j["leader_beat_age_ms"] =
      st.leader_beat_ns != 0 && now > st.leader_beat_ns ? (now - st.leader_beat_ns) / 1'000'000 : 0;
  j["leader_changes"] = st.leader_changes;
  j["leader_since_ns"] = st.leader_since_ns;  // CLOCK_MONOTONIC
  j["capacity"] = st.capacity;
  j["entries"] = st.live;
  j["queued"] = st.queued;
  j["decode_queued"] = st.decode_queued;
  j["counters"] = {{"enqueued", st.enqueued},
                   {"cache_updates", st.cache_updates},
                   {"released", st.released},
                   {"decode_released", st.decode_released},
                   {"starved", st.starved},
                   {"held", st.held},
                   {"refused_queue_full", st.refused_full},
                   {"refused_deadline", st.refused_deadline},
                   {"refused_unavailable", st.refused_unavailable},
                   {"refused_decode_wait", st.refused_decode_wait},
                   {"cancelled", st.cancelled},
                   {"completed", st.completed},
                   {"reclaimed", st.reclaimed},
                   {"repairs", st.repairs},
                   {"passes", st.passes}};
  const omni::RobustLockWord& lw = r.s->lock_word();
  j["lock"] = {{"acquired", st.lock_acquired},
               {"contended", st.lock_contended},
               {"takeovers", st.lock_takeovers},
               {"hold", histogram_json(lw.hold)},
               {"wait", histogram_json(lw.wait)}};
  j["decision_latency"] = histogram_json(r.s->decision_latency());
  j["notify_latency"] = histogram_json(r.s->notify_latency());
  j["queue_wait"] = histogram_json(r.s->queue_wait());
  j["decode_wait"] = histogram_json(r.s->decode_wait());
  const NotifyStats ns = notify_stats();
  j["this_worker"] = {
      {"pid", ngx_pid},        {"leader", r.leader},        {"waiting", r.waiting_count},
      {"wakes_sent", ns.sent}, {"wakes_failed", ns.failed}, {"wakes_received", ns.received}};
  nlohmann::json pools = nlohmann::json::array();
  for (const Pool& p : r.reg->pools) {
    nlohmann::json servers = nlohmann::json::array();
    for (std::uint16_t i = 0; i < p.count; ++i) {
      const omni::sched::InstanceStats is =
          r.s->instance_stats(p.base + i, now, r.reg->sched.options);
      servers.push_back({{"name", p.servers[i].name},
                         {"outstanding", is.outstanding},
                         {"outstanding_tokens", is.outstanding_tokens},
                         {"step_tokens", is.step_tokens},
                         {"pending_tokens", is.pending_tokens},
                         {"step_remaining_ms", is.remaining_ms},
                         {"batch_tokens", is.batch_tokens},
                         {"step_ms", is.step_ms},
                         {"ms_per_ktoken", is.ms_per_ktoken},
                         {"step_samples", is.step_samples},
                         {"cycle_ms", is.cycle_ms},
                         {"boundaries", is.boundaries},
                         {"decoding", is.decoding},
                         {"max_seqs", is.max_seqs},
                         {"itl_ms", is.itl_ms},
                         {"itl_ms_per_seq", is.itl_ms_per_seq},
                         {"itl_samples", is.itl_samples},
                         {"released", is.released},
                         {"decode_released", is.decode_released}});
    }
    pools.push_back({{"name", p.name}, {"servers", std::move(servers)}});
  }
  j["pools"] = std::move(pools);
  return j;
}

void sched_render_metrics(omni::prom::TextWriter& w) {
  SchedRuntime& r = srt();
  if (r.s == nullptr) return;
  const omni::sched::Stats st = r.s->stats();
  w.family("omni_proxy_sched_queued", "gauge", "Requests waiting in the scheduler, by leg.");
  w.sample("omni_proxy_sched_queued", {{"leg", "prefill"}}, st.queued);
  w.sample("omni_proxy_sched_queued", {{"leg", "decode"}}, st.decode_queued);
  w.family("omni_proxy_sched_entries", "gauge",
           "Scheduler entries in use (queued or between release and the end of the decode).");
  w.sample("omni_proxy_sched_entries", {}, st.live);
  w.family("omni_proxy_sched_capacity", "gauge", "Scheduler entries in the zone (queue=).");
  w.sample("omni_proxy_sched_capacity", {}, st.capacity);
  w.family("omni_proxy_sched_events_total", "counter", "Scheduler events, by kind.");
  const std::pair<const char*, std::uint64_t> events[] = {{"enqueued", st.enqueued},
                                                          {"released", st.released},
                                                          {"decode_released", st.decode_released},
                                                          {"starved", st.starved},
                                                          {"held", st.held},
                                                          {"cancelled", st.cancelled},
                                                          {"completed", st.completed},
                                                          {"reclaimed", st.reclaimed},
                                                          {"repairs", st.repairs},
                                                          {"passes", st.passes},
                                                          {"cache_updates", st.cache_updates},
                                                          {"leader_changes", st.leader_changes}};
  for (const auto& [kind, v] : events) {
    w.sample("omni_proxy_sched_events_total", {{"event", kind}}, static_cast<double>(v));
  }
  w.family("omni_proxy_sched_refused_total", "counter",
           "Requests the scheduler refused, by reason (429 queue_full; 503 otherwise).");
  const std::pair<const char*, std::uint64_t> refused[] = {{"queue_full", st.refused_full},
                                                           {"deadline", st.refused_deadline},
                                                           {"unavailable", st.refused_unavailable},
                                                           {"decode_wait", st.refused_decode_wait}};
  for (const auto& [reason, v] : refused) {
    w.sample("omni_proxy_sched_refused_total", {{"reason", reason}}, static_cast<double>(v));
  }
  w.family("omni_proxy_sched_lock_acquisitions_total", "counter",
           "Acquisitions of the scheduler's shared-memory lock, by kind.");
  w.sample("omni_proxy_sched_lock_acquisitions_total", {{"kind", "all"}},
           static_cast<double>(st.lock_acquired));
  w.sample("omni_proxy_sched_lock_acquisitions_total", {{"kind", "contended"}},
           static_cast<double>(st.lock_contended));
  w.sample("omni_proxy_sched_lock_acquisitions_total", {{"kind", "takeover"}},
           static_cast<double>(st.lock_takeovers));
  const omni::RobustLockWord& lw = r.s->lock_word();
  histogram_metric(w, "omni_proxy_sched_lock_hold_seconds",
                   "How long the scheduler's shared-memory lock was held.", lw.hold);
  histogram_metric(w, "omni_proxy_sched_lock_wait_seconds",
                   "How long a contended acquisition of the scheduler's lock waited.", lw.wait);
  histogram_metric(w, "omni_proxy_sched_decision_latency_seconds",
                   "From enqueue to the owning worker acting on the decision (includes any "
                   "wait for a server).",
                   r.s->decision_latency());
  histogram_metric(w, "omni_proxy_sched_notify_latency_seconds",
                   "From the scheduler's decision to the owning worker acting on it.",
                   r.s->notify_latency());
  histogram_metric(w, "omni_proxy_sched_queue_wait_seconds", "From enqueue to the prefill release.",
                   r.s->queue_wait());
  histogram_metric(w, "omni_proxy_sched_decode_wait_seconds",
                   "From the end of the prefill to the decode release (sequential).",
                   r.s->decode_wait());
  struct Row {
    const Pool* pool;
    std::uint16_t i;
    omni::sched::InstanceStats s;
  };
  std::vector<Row> rows;
  const std::uint64_t now = omni::steady_now_ns();
  for (const Pool& p : r.reg->pools) {
    for (std::uint16_t i = 0; i < p.count; ++i) {
      rows.push_back({&p, i, r.s->instance_stats(p.base + i, now, r.reg->sched.options)});
    }
  }
  auto family = [&](const char* name, const char* type, const char* help, auto value) {
    w.family(name, type, help);
    for (const Row& row : rows) {
      w.sample(name, {{"pool", row.pool->name}, {"backend", row.pool->servers[row.i].name}},
               static_cast<double>(value(row.s)));
    }
  };
  using IS = omni::sched::InstanceStats;
  family("omni_proxy_sched_outstanding_tokens", "gauge",
         "Uncached prompt tokens released to the server and not yet prefilled.",
         [](const IS& s) { return s.outstanding_tokens; });
  family("omni_proxy_sched_pending_tokens", "gauge",
         "Of those, the tokens waiting for the server's next steps.",
         [](const IS& s) { return s.pending_tokens; });
  family("omni_proxy_sched_batch_tokens", "gauge", "Tokens one prefill step absorbs (B).",
         [](const IS& s) { return s.batch_tokens; });
  family("omni_proxy_sched_step_ms", "gauge", "Fitted fixed cost of a step, ms.",
         [](const IS& s) { return s.step_ms; });
  family("omni_proxy_sched_ms_per_ktoken", "gauge", "Fitted step cost per 1000 tokens, ms.",
         [](const IS& s) { return s.ms_per_ktoken; });
  family("omni_proxy_sched_cycle_ms", "gauge", "Observed step duration (moving average), ms.",
         [](const IS& s) { return s.cycle_ms; });
  family("omni_proxy_sched_step_boundaries_total", "counter",
         "Step ends observed from prefill completions.", [](const IS& s) { return s.boundaries; });
  family("omni_proxy_sched_decoding", "gauge", "Decodes the scheduler released to the server.",
         [](const IS& s) { return s.decoding; });
  family("omni_proxy_sched_itl_ms", "gauge", "Fitted inter-token latency at an empty batch, ms.",
         [](const IS& s) { return s.itl_ms; });
}

}  // namespace omni::ngx
