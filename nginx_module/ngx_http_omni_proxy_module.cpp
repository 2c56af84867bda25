// ngx_http_omni_proxy_module: nginx glue for the omni-proxy core library.
//
// Conventions (see docs/architecture.md): every entry point nginx calls is noexcept and turns
// any C++ exception into a logged NGX_ERROR; directives are validated when nginx parses them;
// the shared zone keeps nginx's slab-pool header intact so the master can recover its mutex.
//
// This file: directives and configuration, the registry of upstream blocks the legs use, the
// shared zone (omni::SharedState in slab memory), the worker's timers (dead-worker reclaim),
// and the omni_proxy_status / omni_proxy_metrics handlers.
#include "omni_module.hpp"

#include <omni/prometheus.hpp>
#include <omni/version.hpp>

#include <nlohmann/json.hpp>

#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <type_traits>

namespace {

using omni::ngx::LocConf;
using omni::ngx::MainConf;
using omni::ngx::Pool;
using omni::ngx::Registry;
using omni::ngx::log_exception;

// Bounds, documented in docs/directives.md.
constexpr size_t kZoneMinPages = 8;                        // nginx's slab allocator minimum
constexpr size_t kZoneMaxSize = size_t{1} << 30;           // 1 GiB
constexpr uint64_t kZoneMagic = 0x6f6d6e6970726f78ULL;     // "omniprox"
constexpr uint32_t kZoneLayoutVersion = 7;
constexpr std::uint32_t kMaxOwners = 64;                   // worker pids holding slots at once
constexpr size_t kDefaultMaxBodySize = 8u << 20;           // 8 MiB
constexpr size_t kMaxBodySizeLimit = 256u << 20;           // 256 MiB
constexpr size_t kPrefillResponseBuffer = 8u << 20;        // in-memory prefill answers
constexpr size_t kUpstreamHeaderBuffer = 16u << 10;
constexpr ngx_uint_t kMaxQueueLimit = 1u << 20;
constexpr ngx_uint_t kMaxInflightLimit = 1u << 24;
constexpr ngx_msec_t kReclaimInterval = 1000;
constexpr ngx_uint_t kDefaultPrefixEntries = 1u << 18;     // 6 MiB of prefix table
constexpr ngx_uint_t kMaxPrefixEntries = 1u << 25;

// Lives in the shared zone, after nginx's slab-pool header. Fixed-width, trivially copyable.
struct ZoneHeader {
  uint64_t magic;
  uint32_t layout_version;
  uint32_t reserved;
  uint64_t created_msec;     // when this zone was first initialised
  uint64_t generation;       // bumped on every reload that reuses the zone
  uint64_t fingerprint;      // of the SharedStateConfig it was built for
  uint64_t state_offset;     // the SharedState region, from the zone start
  uint64_t state_bytes;
  uint64_t prefix_offset;    // the PrefixTable region (0: none)
  uint64_t prefix_bytes;
  uint64_t kv_index_offset;  // the KV index (kv_aware, omni_proxy_kv_cache; 0: none)
  uint64_t kv_index_bytes;
  uint64_t kv_shared_offset; // its bookkeeping: subscriber lease, feed stats, accounting
  uint64_t kv_shared_bytes;
  uint64_t sched_offset;     // the schedulers' queue and models (omni_proxy_scheduler; 0: none)
  uint64_t sched_bytes;
  std::atomic<int32_t> poller_pid;  // the worker polling engine metrics (0: none)
  int32_t pad;
  std::atomic<uint64_t> poller_beat_msec;  // when that worker last polled (ngx_current_msec)
};

char* set_zone(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
char* set_status(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
char* set_metrics(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
char* set_proxy(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
char* set_upstream(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
char* set_max_body_size(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
char* set_bounded_num(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
char* set_tokenizer(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
void* create_main_conf(ngx_conf_t* cf) noexcept;
char* init_main_conf(ngx_conf_t* cf, void* conf) noexcept;
char* finalize_registry(ngx_conf_t* cf) noexcept;
char* set_enum(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
char* set_policy(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
void* create_loc_conf(ngx_conf_t* cf) noexcept;
char* merge_loc_conf(ngx_conf_t* cf, void* parent, void* child) noexcept;
ngx_int_t preconfiguration(ngx_conf_t* cf) noexcept;
ngx_int_t postconfiguration(ngx_conf_t* cf) noexcept;
ngx_int_t init_process(ngx_cycle_t* cycle) noexcept;
void exit_process(ngx_cycle_t* cycle) noexcept;

ngx_conf_enum_t modes[] = {
    {ngx_string("aggregated"), omni::ngx::kModeAggregated},
    {ngx_string("sequential"), omni::ngx::kModeSequential},
    {ngx_string("parallel"), omni::ngx::kModeParallel},
    {ngx_null_string, 0},
};

ngx_conf_enum_t engines[] = {
    {ngx_string("vllm"), omni::ngx::kEngineVllm},
    {ngx_string("sglang"), omni::ngx::kEngineSglang},
    {ngx_null_string, 0},
};

// Upper bounds for set_bounded_num, by directive.
ngx_conf_num_bounds_t inflight_bounds = {ngx_conf_check_num_bounds, 0,
                                         static_cast<ngx_int_t>(kMaxInflightLimit)};
ngx_conf_num_bounds_t queue_bounds = {ngx_conf_check_num_bounds, 0,
                                      static_cast<ngx_int_t>(kMaxQueueLimit)};
ngx_conf_num_bounds_t port_bounds = {ngx_conf_check_num_bounds, 1, 65535};
ngx_conf_num_bounds_t kv_blocks_bounds = {ngx_conf_check_num_bounds, 1024, 1 << 24};
ngx_conf_num_bounds_t prefix_table_bounds = {ngx_conf_check_num_bounds, 1024,
                                             static_cast<ngx_int_t>(kMaxPrefixEntries)};

constexpr ngx_uint_t kAnyLevel = NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF;

ngx_command_t commands[] = {
    {ngx_string("omni_proxy_zone"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE2, set_zone,
     NGX_HTTP_MAIN_CONF_OFFSET, 0, nullptr},
    {ngx_string("omni_proxy_poll_interval"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
     ngx_conf_set_msec_slot, NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, poll_interval),
     nullptr},
    {ngx_string("omni_proxy_poll_timeout"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
     ngx_conf_set_msec_slot, NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, poll_timeout), nullptr},
    {ngx_string("omni_proxy_prefix_table"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1, set_bounded_num,
     NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, prefix_entries), &prefix_table_bounds},
    {ngx_string("omni_proxy_kv_cache"), NGX_HTTP_MAIN_CONF | NGX_CONF_2MORE,
     omni::ngx::set_kv_cache, NGX_HTTP_MAIN_CONF_OFFSET, 0, nullptr},
    {ngx_string("omni_proxy_scheduler"), NGX_HTTP_MAIN_CONF | NGX_CONF_ANY,
     omni::ngx::set_scheduler, NGX_HTTP_MAIN_CONF_OFFSET, 0, nullptr},
    {ngx_string("omni_proxy_capacity"), NGX_HTTP_MAIN_CONF | NGX_CONF_2MORE,
     omni::ngx::set_capacity, NGX_HTTP_MAIN_CONF_OFFSET, 0, nullptr},
    {ngx_string("omni_proxy_pd_group"), NGX_HTTP_MAIN_CONF | NGX_CONF_2MORE,
     omni::ngx::set_pd_group, NGX_HTTP_MAIN_CONF_OFFSET, 0, nullptr},
    {ngx_string("omni_proxy_schedule"), kAnyLevel | NGX_CONF_FLAG, ngx_conf_set_flag_slot,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, schedule), nullptr},
    {ngx_string("omni_proxy_kv_index_blocks"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
     set_bounded_num, NGX_HTTP_MAIN_CONF_OFFSET, offsetof(MainConf, kv_blocks), &kv_blocks_bounds},
    {ngx_string("omni_proxy_tokenizer"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE23, set_tokenizer,
     NGX_HTTP_MAIN_CONF_OFFSET, 0, nullptr},
    {ngx_string("omni_proxy_tokenize"), kAnyLevel | NGX_CONF_TAKE1, ngx_conf_set_str_slot,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, tokenizer_name), nullptr},
    {ngx_string("omni_proxy_token_forwarding"), kAnyLevel | NGX_CONF_FLAG, ngx_conf_set_flag_slot,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, token_forwarding), nullptr},
    {ngx_string("omni_proxy_thread_pool"), kAnyLevel | NGX_CONF_TAKE1, ngx_conf_set_str_slot,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, thread_pool_name), nullptr},
    {ngx_string("omni_proxy_status"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, set_status,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    {ngx_string("omni_proxy_metrics"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, set_metrics,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    {ngx_string("omni_proxy"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, set_proxy,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    {ngx_string("omni_proxy_mode"), kAnyLevel | NGX_CONF_TAKE1, set_enum,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, mode), modes},
    {ngx_string("omni_proxy_engine"), kAnyLevel | NGX_CONF_TAKE1, set_enum,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, engine), engines},
    {ngx_string("omni_proxy_policy"), kAnyLevel | NGX_CONF_1MORE, set_policy,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    {ngx_string("omni_proxy_route_header"), kAnyLevel | NGX_CONF_FLAG, ngx_conf_set_flag_slot,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, route_header), nullptr},
    {ngx_string("omni_proxy_upstream"), NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_upstream,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, decode), nullptr},
    {ngx_string("omni_proxy_decode_upstream"), NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_upstream,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, decode), nullptr},
    {ngx_string("omni_proxy_prefill_upstream"), NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_upstream,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, prefill), nullptr},
    {ngx_string("omni_proxy_connect_timeout"), kAnyLevel | NGX_CONF_TAKE1, ngx_conf_set_msec_slot,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, connect_timeout), nullptr},
    {ngx_string("omni_proxy_prefill_timeout"), kAnyLevel | NGX_CONF_TAKE1, ngx_conf_set_msec_slot,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, prefill_timeout), nullptr},
    {ngx_string("omni_proxy_decode_timeout"), kAnyLevel | NGX_CONF_TAKE1, ngx_conf_set_msec_slot,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, decode_timeout), nullptr},
    {ngx_string("omni_proxy_queue_timeout"), kAnyLevel | NGX_CONF_TAKE1, ngx_conf_set_msec_slot,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, queue_timeout), nullptr},
    {ngx_string("omni_proxy_max_body_size"), kAnyLevel | NGX_CONF_TAKE1, set_max_body_size,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, max_body_size), nullptr},
    {ngx_string("omni_proxy_max_inflight"), kAnyLevel | NGX_CONF_TAKE1, set_bounded_num,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, max_inflight), &inflight_bounds},
    {ngx_string("omni_proxy_max_queue"), kAnyLevel | NGX_CONF_TAKE1, set_bounded_num,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, max_queue), &queue_bounds},
    {ngx_string("omni_proxy_bootstrap_port"), kAnyLevel | NGX_CONF_TAKE1, set_bounded_num,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, bootstrap_port), &port_bounds},
    ngx_null_command,
};

ngx_http_module_t module_ctx = {
    preconfiguration,  // preconfiguration
    postconfiguration, // postconfiguration
    create_main_conf,  // create main configuration
    init_main_conf,    // init main configuration
    nullptr,           // create server configuration
    nullptr,           // merge server configuration
    create_loc_conf,   // create location configuration
    merge_loc_conf,    // merge location configuration
};

}  // namespace

extern "C" {
// Referenced by name from the generated ngx_http_omni_proxy_module_modules.c.
ngx_module_t ngx_http_omni_proxy_module = {
    NGX_MODULE_V1,
    &module_ctx,
    commands,
    NGX_HTTP_MODULE,
    nullptr,       // init master
    nullptr,       // init module
    init_process,  // init process
    nullptr,       // init thread
    nullptr,       // exit thread
    exit_process,  // exit process
    nullptr,       // exit master
    NGX_MODULE_V1_PADDING};
}

// ---------------------------------------------------------------------------------------------
// Worker runtime
// ---------------------------------------------------------------------------------------------

namespace {

struct Runtime {
  std::unique_ptr<omni::SharedState> state;
  std::unique_ptr<omni::PrefixTable> prefix_table;
  const Registry* registry = nullptr;
  ZoneHeader* zone = nullptr;
  ngx_event_t reclaim_timer{};
};

Runtime& runtime() {
  static Runtime rt;
  return rt;
}

MainConf* main_conf(ngx_cycle_t* cycle) {
  if (cycle->conf_ctx == nullptr || cycle->conf_ctx[ngx_http_module.index] == nullptr) {
    return nullptr;
  }
  return static_cast<MainConf*>(
      ngx_http_cycle_get_module_main_conf(cycle, ngx_http_omni_proxy_module));
}

void reclaim(ngx_log_t* log) noexcept try {
  omni::SharedState* st = runtime().state.get();
  if (st == nullptr) return;
  omni::ngx::kv_reclaim();
  const std::size_t freed = st->reclaim_dead(omni::pid_alive);
  if (freed > 0) {
    ngx_log_error(NGX_LOG_WARN, log, 0,
                  "omni_proxy: freed %uz request slots of workers that died", freed);
  }
} catch (...) {
  log_exception(log, "reclaim");
}

void reclaim_tick(ngx_event_t* ev) noexcept {
  reclaim(ev->log);
  if (!ngx_exiting && !ngx_quit && !ngx_terminate) ngx_add_timer(ev, kReclaimInterval);
}

ngx_int_t init_process(ngx_cycle_t* cycle) noexcept try {
  MainConf* mcf = main_conf(cycle);
  if (mcf == nullptr) return NGX_OK;
  Runtime& rt = runtime();
  rt.registry = mcf->registry;
  if (mcf->zone == nullptr || mcf->zone->data == nullptr) return NGX_OK;
  auto* hdr = static_cast<ZoneHeader*>(mcf->zone->data);
  if (hdr->magic != kZoneMagic || hdr->state_bytes == 0) return NGX_OK;
  rt.zone = hdr;
  auto* base = static_cast<char*>(static_cast<void*>(mcf->zone->shm.addr));
  omni::OpenResult r = omni::SharedState::attach(base + hdr->state_offset, hdr->state_bytes,
                                                 &mcf->registry->state_config);
  if (!r.ok()) {
    ngx_log_error(NGX_LOG_ALERT, cycle->log, 0, "omni_proxy_zone \"%V\": %s",
                  &mcf->zone->shm.name, r.error.c_str());
    return NGX_OK;  // serve without shared state rather than not at all
  }
  rt.state = std::move(r.state);
  if (hdr->prefix_offset != 0) {
    rt.prefix_table = omni::PrefixTable::attach(base + hdr->prefix_offset, hdr->prefix_bytes);
    if (rt.prefix_table == nullptr) {
      ngx_log_error(NGX_LOG_ALERT, cycle->log, 0,
                    "omni_proxy_zone \"%V\": the prefix table is missing; cache_aware "
                    "locations choose by load alone", &mcf->zone->shm.name);
    }
  }
  if (hdr->kv_index_offset != 0) {
    omni::ngx::kv_init_process(cycle, base + hdr->kv_index_offset, hdr->kv_index_bytes,
                               base + hdr->kv_shared_offset, hdr->kv_shared_bytes);
  }
  omni::ngx::notify_init(cycle);  // wake-ups between workers (limit queues, schedulers)
  if (hdr->sched_offset != 0) {
    omni::ngx::sched_init_process(cycle, base + hdr->sched_offset, hdr->sched_bytes,
                                  &hdr->generation);
  }
  reclaim(cycle->log);  // a worker that just replaced a dead one frees its slots at once
  rt.reclaim_timer.handler = reclaim_tick;
  rt.reclaim_timer.log = cycle->log;
  rt.reclaim_timer.data = &rt;
  rt.reclaim_timer.cancelable = 1;
  ngx_add_timer(&rt.reclaim_timer, kReclaimInterval);
  omni::ngx::poller_start(cycle);
  return NGX_OK;
} catch (...) {
  log_exception(cycle->log, "init_process");
  return NGX_OK;
}

void exit_process(ngx_cycle_t*) noexcept {
  Runtime& rt = runtime();
  omni::ngx::poller_stop();
  omni::ngx::kv_exit_process();
  omni::ngx::sched_exit_process();
  omni::ngx::proxy_exit_process();
  omni::ngx::notify_exit();
  if (rt.reclaim_timer.timer_set) ngx_del_timer(&rt.reclaim_timer);
  if (rt.zone != nullptr) {
    int32_t me = ngx_pid;
    rt.zone->poller_pid.compare_exchange_strong(me, 0);
  }
  rt.state.reset();
  rt.prefix_table.reset();
}

}  // namespace

namespace omni::ngx {

void log_exception(ngx_log_t* log, const char* where) noexcept {
  try {
    throw;
  } catch (const std::exception& e) {
    ngx_log_error(NGX_LOG_ALERT, log, 0, "omni_proxy: %s failed: %s", where, e.what());
  } catch (...) {
    ngx_log_error(NGX_LOG_ALERT, log, 0, "omni_proxy: %s failed: unknown exception", where);
  }
}

omni::SharedState* shared_state() noexcept { return runtime().state.get(); }

omni::PrefixTable* prefix_table() noexcept { return runtime().prefix_table.get(); }

const Registry* registry() noexcept { return runtime().registry; }

const Pool* find_pool(const ngx_http_upstream_srv_conf_t* uscf) noexcept {
  // During configuration (nginx -t, the master) the runtime registry is not set yet; the
  // current cycle's main conf always is.
  const Registry* reg = runtime().registry;
  if (reg == nullptr) {
    MainConf* mcf = main_conf(const_cast<ngx_cycle_t*>(ngx_cycle));
    reg = mcf != nullptr ? mcf->registry : nullptr;
  }
  if (reg == nullptr) return nullptr;
  for (const Pool& p : reg->pools) {
    if (p.uscf == uscf) return &p;
  }
  return nullptr;
}

std::string backend_name(std::int32_t backend) {
  const Registry* reg = registry();
  if (reg == nullptr || backend < 0) return {};
  for (const Pool& p : reg->pools) {
    if (backend >= p.base && backend < p.base + p.count) {
      return p.servers[static_cast<std::size_t>(backend - p.base)].name;
    }
  }
  return {};
}

// The poller's claim on polling (poller.cpp): one worker at a time polls. Another worker takes
// over when the poller died or stopped polling (a worker draining after a reload no longer
// polls): its heartbeat is older than `stale_msec`.
bool claim_poller(ngx_msec_t stale_msec) noexcept {
  ZoneHeader* z = runtime().zone;
  if (z == nullptr) return false;
  const auto now = static_cast<uint64_t>(ngx_current_msec);
  int32_t cur = z->poller_pid.load();
  if (cur != ngx_pid) {
    const uint64_t beat = z->poller_beat_msec.load();
    const bool stale = now > beat && now - beat > stale_msec;
    if (cur != 0 && omni::pid_alive(cur) && !stale) return false;
    if (!z->poller_pid.compare_exchange_strong(cur, ngx_pid)) return false;
  }
  z->poller_beat_msec.store(now);
  return true;
}

}  // namespace omni::ngx

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

namespace {

void destroy_registry(void* data) noexcept { delete static_cast<Registry*>(data); }

void* create_main_conf(ngx_conf_t* cf) noexcept try {
  auto* mcf = static_cast<MainConf*>(ngx_pcalloc(cf->pool, sizeof(MainConf)));
  if (mcf == nullptr) return nullptr;
  ngx_pool_cleanup_t* cln = ngx_pool_cleanup_add(cf->pool, 0);
  if (cln == nullptr) return nullptr;
  mcf->registry = new Registry();
  cln->handler = destroy_registry;
  cln->data = mcf->registry;
  mcf->poll_interval = NGX_CONF_UNSET_MSEC;
  mcf->poll_timeout = NGX_CONF_UNSET_MSEC;
  mcf->prefix_entries = NGX_CONF_UNSET_UINT;
  mcf->kv_blocks = NGX_CONF_UNSET_UINT;
  return mcf;
} catch (...) {
  log_exception(cf->log, "create_main_conf");
  return nullptr;
}

void* create_loc_conf(ngx_conf_t* cf) noexcept {
  auto* lcf = static_cast<LocConf*>(ngx_pcalloc(cf->pool, sizeof(LocConf)));
  if (lcf == nullptr) return nullptr;
  lcf->status = NGX_CONF_UNSET;
  lcf->metrics = NGX_CONF_UNSET;
  lcf->enable = NGX_CONF_UNSET;
  lcf->mode = NGX_CONF_UNSET_UINT;
  lcf->engine = NGX_CONF_UNSET_UINT;
  lcf->max_body_size = NGX_CONF_UNSET_SIZE;
  lcf->connect_timeout = NGX_CONF_UNSET_MSEC;
  lcf->prefill_timeout = NGX_CONF_UNSET_MSEC;
  lcf->decode_timeout = NGX_CONF_UNSET_MSEC;
  lcf->queue_timeout = NGX_CONF_UNSET_MSEC;
  lcf->max_inflight = NGX_CONF_UNSET_UINT;
  lcf->max_queue = NGX_CONF_UNSET_UINT;
  lcf->bootstrap_port = NGX_CONF_UNSET_UINT;
  lcf->group = -1;
  lcf->token_forwarding = NGX_CONF_UNSET;
  lcf->policy = NGX_CONF_UNSET_UINT;
  lcf->route_header = NGX_CONF_UNSET;
  lcf->schedule = NGX_CONF_UNSET;
  for (ngx_http_upstream_conf_t* leg : {&lcf->prefill, &lcf->decode}) {
    leg->hide_headers = static_cast<ngx_array_t*>(NGX_CONF_UNSET_PTR);
    leg->pass_headers = static_cast<ngx_array_t*>(NGX_CONF_UNSET_PTR);
  }
  return lcf;
}

// The upstream settings of one leg: timeouts from our directives, unbuffered, keepalive through
// the upstream block, and retries on another server for connection errors and timeouts (and,
// for the prefill leg, 5xx answers) before any byte reached the client.
char* merge_leg(ngx_conf_t* cf, ngx_http_upstream_conf_t* conf, ngx_http_upstream_conf_t* prev,
                ngx_msec_t connect, ngx_msec_t read, bool prefill) {
  if (conf->upstream == nullptr) conf->upstream = prev->upstream;
  conf->connect_timeout = connect;
  conf->send_timeout = read;
  conf->read_timeout = read;
  conf->next_upstream_timeout = 0;
  conf->send_lowat = 0;
  conf->buffer_size = kUpstreamHeaderBuffer;
  conf->limit_rate = 0;
  conf->buffering = 0;
  conf->request_buffering = 1;
  conf->pass_request_headers = 0;
  conf->pass_request_body = 0;
  conf->ignore_client_abort = 0;
  conf->intercept_errors = 0;
  conf->socket_keepalive = 0;
  conf->next_upstream_tries = 2;
  conf->next_upstream = NGX_CONF_BITMASK_SET | NGX_HTTP_UPSTREAM_FT_ERROR |
                        NGX_HTTP_UPSTREAM_FT_TIMEOUT | NGX_HTTP_UPSTREAM_FT_NON_IDEMPOTENT;
  if (prefill) {
    conf->next_upstream |= NGX_HTTP_UPSTREAM_FT_HTTP_500 | NGX_HTTP_UPSTREAM_FT_HTTP_502 |
                           NGX_HTTP_UPSTREAM_FT_HTTP_503 | NGX_HTTP_UPSTREAM_FT_HTTP_504;
  }
  ngx_str_set(&conf->module, "omni_proxy");
  static ngx_str_t hide[] = {ngx_string("Date"), ngx_string("Server"), ngx_null_string};
  ngx_hash_init_t hash;
  hash.max_size = 512;
  hash.bucket_size = ngx_align(64, ngx_cacheline_size);
  hash.name = const_cast<char*>("omni_proxy_headers_hash");
  if (ngx_http_upstream_hide_headers_hash(cf, conf, prev, hide, &hash) != NGX_OK) {
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  return NGX_CONF_OK;
}

char* conf_error(ngx_conf_t* cf, const char* message) {
  ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "%s", message);
  return static_cast<char*>(NGX_CONF_ERROR);
}

// Records that a leg of a location with `engine` uses this upstream block.
char* register_pool(ngx_conf_t* cf, ngx_http_upstream_srv_conf_t* uscf, ngx_uint_t engine,
                    bool sglang_prefill) {
  auto* mcf = static_cast<MainConf*>(
      ngx_http_conf_get_module_main_conf(cf, ngx_http_omni_proxy_module));
  Registry& reg = *mcf->registry;
  const omni::EngineFlavor flavor =
      engine == omni::ngx::kEngineSglang ? omni::EngineFlavor::kSglang : omni::EngineFlavor::kVllm;
  Pool* pool = nullptr;
  for (Pool& p : reg.pools) {
    if (p.uscf == uscf) pool = &p;
  }
  if (pool == nullptr) {
    reg.pools.emplace_back();
    pool = &reg.pools.back();
    pool->uscf = uscf;
    pool->name.assign(reinterpret_cast<const char*>(uscf->host.data), uscf->host.len);
  }
  if (pool->flavor_set && pool->flavor != flavor) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"omni_proxy_engine\": upstream \"%V\" is used with both vllm and sglang",
                       &uscf->host);
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  pool->flavor = flavor;
  pool->flavor_set = true;
  pool->sglang_prefill = pool->sglang_prefill || sglang_prefill;
  return NGX_CONF_OK;
}

// omni_proxy_tokenize NAME of an enabled location: the tokenizer declared at http level, and
// the thread pool that runs it (nginx itself reports an undeclared pool other than "default").
char* resolve_tokenizer(ngx_conf_t* cf, LocConf* conf) {
  conf->tokenizer = nullptr;
  conf->thread_pool = nullptr;
  const ngx_str_t& name = conf->tokenizer_name;
  if (name.len == 3 && ngx_strncmp(name.data, "off", 3) == 0) return NGX_CONF_OK;
  auto* mcf = static_cast<MainConf*>(
      ngx_http_conf_get_module_main_conf(cf, ngx_http_omni_proxy_module));
  const std::string_view want(reinterpret_cast<const char*>(name.data), name.len);
  for (const auto& entry : mcf->registry->tokenizers) {
    if (entry.name == want) conf->tokenizer = &entry;
  }
  if (conf->tokenizer == nullptr) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"omni_proxy_tokenize\": no tokenizer \"%V\"; declare it with "
                       "\"omni_proxy_tokenizer %V <folder>;\" at http level",
                       &name, &name);
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  conf->thread_pool = ngx_thread_pool_add(cf, &conf->thread_pool_name);
  if (conf->thread_pool == nullptr) return static_cast<char*>(NGX_CONF_ERROR);
  return NGX_CONF_OK;
}

char* merge_loc_conf(ngx_conf_t* cf, void* parent, void* child) noexcept try {
  auto* prev = static_cast<LocConf*>(parent);
  auto* conf = static_cast<LocConf*>(child);
  ngx_conf_merge_value(conf->status, prev->status, 0);
  ngx_conf_merge_value(conf->metrics, prev->metrics, 0);
  ngx_conf_merge_value(conf->enable, prev->enable, 0);
  ngx_conf_merge_uint_value(conf->mode, prev->mode, omni::ngx::kModeAggregated);
  // The engine's default depends on the mode of the location that proxies, so an unset
  // engine stays unset through server-level merges and is resolved below.
  if (conf->engine == NGX_CONF_UNSET_UINT) conf->engine = prev->engine;
  ngx_conf_merge_size_value(conf->max_body_size, prev->max_body_size, kDefaultMaxBodySize);
  ngx_conf_merge_msec_value(conf->connect_timeout, prev->connect_timeout, 5000);
  ngx_conf_merge_msec_value(conf->prefill_timeout, prev->prefill_timeout, 300000);
  ngx_conf_merge_msec_value(conf->decode_timeout, prev->decode_timeout, 600000);
  ngx_conf_merge_msec_value(conf->queue_timeout, prev->queue_timeout, 30000);
  ngx_conf_merge_uint_value(conf->max_inflight, prev->max_inflight, 0);
  ngx_conf_merge_uint_value(conf->max_queue, prev->max_queue, 0);
  ngx_conf_merge_uint_value(conf->bootstrap_port, prev->bootstrap_port, 8998);
  ngx_conf_merge_str_value(conf->tokenizer_name, prev->tokenizer_name, "off");
  ngx_conf_merge_value(conf->token_forwarding, prev->token_forwarding, 1);
  ngx_conf_merge_str_value(conf->thread_pool_name, prev->thread_pool_name, "default");
  if (conf->policy == NGX_CONF_UNSET_UINT) {
    conf->policy = prev->policy;
    conf->cache_aware = prev->cache_aware;
    conf->prefix = prev->prefix;
    conf->kv = prev->kv;
  }
  ngx_conf_merge_uint_value(conf->policy, prev->policy, omni::ngx::kPolicyLeastOutstanding);
  ngx_conf_merge_value(conf->route_header, prev->route_header, 0);
  ngx_conf_merge_value(conf->schedule, prev->schedule, 0);
  char* rc = merge_leg(cf, &conf->prefill, &prev->prefill, conf->connect_timeout,
                       conf->prefill_timeout, true);
  if (rc != NGX_CONF_OK) return rc;
  rc = merge_leg(cf, &conf->decode, &prev->decode, conf->connect_timeout, conf->decode_timeout,
                 false);
  if (rc != NGX_CONF_OK) return rc;
  if (!conf->enable) return NGX_CONF_OK;
  if (conf->engine == NGX_CONF_UNSET_UINT) {
    conf->engine = conf->mode == omni::ngx::kModeParallel ? omni::ngx::kEngineSglang
                                                          : omni::ngx::kEngineVllm;
  }

  const bool aggregated = conf->mode == omni::ngx::kModeAggregated;
  if (conf->decode.upstream == nullptr) {
    return conf_error(cf, aggregated
                              ? "\"omni_proxy\" needs \"omni_proxy_upstream\" in aggregated mode"
                              : "\"omni_proxy\" needs \"omni_proxy_decode_upstream\"");
  }
  if (!aggregated && conf->prefill.upstream == nullptr) {
    return conf_error(cf, conf->mode == omni::ngx::kModeSequential
                              ? "\"omni_proxy_mode sequential\" needs \"omni_proxy_prefill_upstream\""
                              : "\"omni_proxy_mode parallel\" needs \"omni_proxy_prefill_upstream\"");
  }
  if (conf->mode == omni::ngx::kModeSequential && conf->engine != omni::ngx::kEngineVllm) {
    return conf_error(cf, "\"omni_proxy_engine sglang\" cannot use \"omni_proxy_mode sequential\""
                          " (vLLM's P/D protocol); use \"omni_proxy_mode parallel\"");
  }
  if (conf->mode == omni::ngx::kModeParallel && conf->engine != omni::ngx::kEngineSglang) {
    return conf_error(cf, "\"omni_proxy_mode parallel\" is SGLang's P/D protocol and needs "
                          "\"omni_proxy_engine sglang\"");
  }
  if (conf->max_queue > 0 && conf->max_inflight == 0) {
    return conf_error(cf, "\"omni_proxy_max_queue\" needs \"omni_proxy_max_inflight\"");
  }
  rc = resolve_tokenizer(cf, conf);
  if (rc != NGX_CONF_OK) return rc;
  if (!aggregated) {
    rc = register_pool(cf, conf->prefill.upstream, conf->engine,
                       conf->mode == omni::ngx::kModeParallel);
    if (rc != NGX_CONF_OK) return rc;
  }
  rc = register_pool(cf, conf->decode.upstream, conf->engine, false);
  if (rc != NGX_CONF_OK) return rc;
  if (conf->policy == omni::ngx::kPolicyCacheAware) {
    auto* mcf = static_cast<MainConf*>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_omni_proxy_module));
    for (Pool& pool : mcf->registry->pools) {
      if (pool.uscf == conf->decode.upstream || pool.uscf == conf->prefill.upstream) {
        pool.cache_aware = true;
      }
    }
    mcf->registry->prefix_entries = 1;  // sized in finalize_registry
  }
  if (conf->schedule) {
    auto* mcf = static_cast<MainConf*>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_omni_proxy_module));
    mcf->registry->sched.uses.emplace_back(
        std::string(reinterpret_cast<const char*>(cf->conf_file->file.name.data),
                    cf->conf_file->file.name.len),
        cf->conf_file->line);
  }
  if (conf->policy == omni::ngx::kPolicyKvAware || conf->schedule) {
    // Pools without an omni_proxy_kv_cache declaration are predicted from routing.
    auto* mcf = static_cast<MainConf*>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_omni_proxy_module));
    for (Pool& pool : mcf->registry->pools) {
      if ((pool.uscf == conf->decode.upstream || pool.uscf == conf->prefill.upstream) &&
          pool.kv_mode == omni::ngx::KvMode::kNone) {
        pool.kv_mode = omni::ngx::KvMode::kApproximate;
      }
    }
  }

  auto* clcf = static_cast<ngx_http_core_loc_conf_t*>(
      ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
  if (conf->max_inflight > 0) {
    auto* mcf = static_cast<MainConf*>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_omni_proxy_module));
    std::string name(reinterpret_cast<const char*>(clcf->name.data), clcf->name.len);
    if (name.empty()) name = "location";
    if (name.size() > omni::SharedState::kMaxGroupName) {
      name.resize(omni::SharedState::kMaxGroupName);
    }
    // Two locations with the same name (in different servers) get distinct group names.
    for (const std::string& g : mcf->registry->groups) {
      if (g == name) {
        name = name.substr(0, omni::SharedState::kMaxGroupName - 6) + "#" +
               std::to_string(mcf->registry->groups.size());
        break;
      }
    }
    if (mcf->registry->groups.size() >= omni::SharedState::kMaxGroups) {
      return conf_error(cf, "\"omni_proxy_max_inflight\": too many locations with limits");
    }
    conf->group = static_cast<ngx_int_t>(mcf->registry->groups.size());
    mcf->registry->groups.push_back(std::move(name));
  }
  // The body limit is ours; nginx's own check must not undercut it. Prefill answers carry one
  // block id per KV block, far more than nginx's default in-memory subrequest buffer.
  clcf->client_max_body_size = static_cast<off_t>(conf->max_body_size);
  // The module parses the whole body in memory anyway: keep it there, never in a temp file.
  if (clcf->client_body_buffer_size < conf->max_body_size) {
    clcf->client_body_buffer_size = conf->max_body_size;
  }
  if (clcf->subrequest_output_buffer_size < kPrefillResponseBuffer) {
    clcf->subrequest_output_buffer_size = kPrefillResponseBuffer;
  }
  return NGX_CONF_OK;
} catch (...) {
  log_exception(cf->log, "merge_loc_conf");
  return static_cast<char*>(NGX_CONF_ERROR);
}

std::size_t prefix_table_bytes(const Registry& reg) {
  if (reg.prefix_entries == 0) return 0;
  return omni::PrefixTable::required_bytes(
      reg.prefix_entries, std::max<std::uint32_t>(1, reg.state_config.max_backends));
}

// FNV-1a over the state config: a changed backend or group set needs a fresh zone.
uint64_t fingerprint(const omni::SharedStateConfig& c, std::uint64_t prefix_entries,
                     std::uint64_t kv_index_bytes, std::uint64_t sched_bytes) {
  uint64_t h = 0xcbf29ce484222325ULL;
  auto mix = [&h](std::string_view s) {
    for (unsigned char ch : s) h = (h ^ ch) * 0x100000001b3ULL;
    h = (h ^ 0xff) * 0x100000001b3ULL;
  };
  mix(std::to_string(kZoneLayoutVersion));
  mix(std::to_string(prefix_entries));
  mix(std::to_string(kv_index_bytes));
  mix(std::to_string(sched_bytes));
  mix(std::to_string(c.max_backends) + "/" + std::to_string(c.max_owners) + "/" +
      std::to_string(c.max_groups));
  for (const omni::BackendSpec& b : c.backends) {
    mix(b.pool);
    mix(b.name);
  }
  for (const std::string& g : c.groups) mix(g);
  return h;
}

char* init_main_conf(ngx_conf_t*, void* conf) noexcept {
  auto* mcf = static_cast<MainConf*>(conf);
  ngx_conf_init_msec_value(mcf->poll_interval, 1000);
  ngx_conf_init_msec_value(mcf->poll_timeout, 1000);
  return NGX_CONF_OK;
}

// Runs at postconfiguration: after ngx_http_upstream_module's init_main_conf gave every
// upstream block its balancer and servers, and after every location was merged (which is when
// the legs registered their blocks and limit groups). The registry learns the servers, the
// balancer wrapper is installed and the shared state's shape is fixed.
char* finalize_registry(ngx_conf_t* cf) noexcept try {
  auto* mcf = static_cast<MainConf*>(
      ngx_http_conf_get_module_main_conf(cf, ngx_http_omni_proxy_module));
  Registry& reg = *mcf->registry;
  std::size_t next = 0;
  for (Pool& pool : reg.pools) {
    auto* peers = static_cast<ngx_http_upstream_rr_peers_t*>(pool.uscf->peer.data);
    if (peers == nullptr || pool.uscf->peer.init == nullptr) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "omni_proxy: upstream \"%V\" has no servers omni_proxy can use",
                         &pool.uscf->host);
      return static_cast<char*>(NGX_CONF_ERROR);
    }
    pool.base = static_cast<std::uint16_t>(next);
    pool.servers.clear();
    for (ngx_http_upstream_rr_peers_t* p = peers; p != nullptr; p = p->next) {
      for (ngx_http_upstream_rr_peer_t* peer = p->peer; peer != nullptr; peer = peer->next) {
        Pool::Server s;
        s.name.assign(reinterpret_cast<const char*>(peer->name.data), peer->name.len);
        s.id = std::hash<std::string>{}(s.name);
        u_char text[NGX_SOCKADDR_STRLEN];
        const size_t len = ngx_sock_ntop(peer->sockaddr, peer->socklen, text, sizeof(text), 0);
        s.host.assign(reinterpret_cast<const char*>(text), len);
        s.addr.sockaddr = peer->sockaddr;
        s.addr.socklen = peer->socklen;
        s.addr.name = peer->name;
        pool.servers.push_back(std::move(s));
      }
    }
    pool.count = static_cast<std::uint16_t>(pool.servers.size());
    next += pool.count;
    if (next > omni::SharedState::kMaxBackends) {
      return conf_error(cf, "omni_proxy: the upstream blocks used have more than 4096 servers");
    }
  }
  omni::SharedStateConfig& sc = reg.state_config;
  sc = {};
  sc.max_slots = 0;
  sc.max_owners = kMaxOwners;
  for (const Pool& pool : reg.pools) {
    for (const Pool::Server& s : pool.servers) {
      omni::BackendSpec b;
      b.name = s.name.substr(0, omni::SharedState::kMaxBackendName);
      b.pool = pool.name.substr(0, omni::SharedState::kMaxPoolName);
      sc.backends.push_back(std::move(b));
    }
  }
  sc.max_backends = std::max<std::uint32_t>(1, static_cast<std::uint32_t>(sc.backends.size()));
  sc.groups = reg.groups;
  sc.max_groups = static_cast<std::uint32_t>(reg.groups.size());
  if (reg.prefix_entries > 0) {
    reg.prefix_entries = mcf->prefix_entries == NGX_CONF_UNSET_UINT ? kDefaultPrefixEntries
                                                                    : mcf->prefix_entries;
    for (const Pool& pool : reg.pools) {
      if (pool.cache_aware && pool.count > omni::PrefixTable::kMaxTenants) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"omni_proxy_policy cache_aware\": upstream \"%V\" has %ud servers; "
                           "the cache-aware rule handles at most %uz per upstream block",
                           &pool.uscf->host, static_cast<unsigned>(pool.count),
                           omni::PrefixTable::kMaxTenants);
        return static_cast<char*>(NGX_CONF_ERROR);
      }
    }
  }
  if (reg.sched.enabled && !reg.pools.empty() && mcf->zone == nullptr) {
    return conf_error(cf, "\"omni_proxy_scheduler\" needs \"omni_proxy_zone\": the queue is "
                          "shared by all workers");
  }
  if (!omni::ngx::sched_finalize(cf, reg)) return static_cast<char*>(NGX_CONF_ERROR);
  if (!omni::ngx::kv_finalize(cf, reg)) return static_cast<char*>(NGX_CONF_ERROR);
  reg.fingerprint =
      fingerprint(sc, reg.prefix_entries, omni::ngx::kv_index_bytes(reg), omni::ngx::sched_bytes(reg));
  omni::ngx::install_balancer(reg);
  if (!reg.groups.empty() && mcf->zone == nullptr) {
    return conf_error(cf, "\"omni_proxy_max_inflight\" needs \"omni_proxy_zone\": the limits "
                          "are shared by all workers");
  }

  if (mcf->zone != nullptr) {
    // Slack for the slab allocator: its page descriptors, the page of small allocations
    // (ZoneHeader, log_ctx) and the rounding of each large allocation to whole pages; the KV
    // index adds two large allocations.
    const std::size_t need = omni::SharedState::required_bytes(sc) + prefix_table_bytes(reg) +
                             omni::ngx::kv_index_bytes(reg) + omni::ngx::kv_shared_bytes(reg) +
                             omni::ngx::sched_bytes(reg) +
                             ((reg.kv_blocks > 0 ? 7 : 5) + (reg.sched.enabled ? 1 : 0)) *
                                 ngx_pagesize;
    if (mcf->zone->shm.size < need) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "\"omni_proxy_zone\": zone \"%V\" of %uz bytes is too small for %uz "
                         "servers, %uz limit groups, the prefix table, the KV index and the "
                         "scheduler; it needs at least %uzk",
                         &mcf->zone->shm.name, mcf->zone->shm.size, sc.backends.size(),
                         sc.groups.size(), (need + 1023) / 1024);
      return static_cast<char*>(NGX_CONF_ERROR);
    }
    // A zone whose layout or config differs from the old cycle's must not be reused in place
    // while old workers still use it: nginx then maps a fresh one.
    ngx_cycle_t* old = cf->cycle->old_cycle;
    if (old != nullptr) {
      ngx_list_part_t* part = &old->shared_memory.part;
      auto* zones = static_cast<ngx_shm_zone_t*>(part->elts);
      for (ngx_uint_t i = 0;; ++i) {
        if (i >= part->nelts) {
          if (part->next == nullptr) break;
          part = part->next;
          zones = static_cast<ngx_shm_zone_t*>(part->elts);
          i = 0;
          if (part->nelts == 0) continue;
        }
        ngx_shm_zone_t& z = zones[i];
        if (z.tag != &ngx_http_omni_proxy_module || z.shm.name.len != mcf->zone->shm.name.len ||
            ngx_strncmp(z.shm.name.data, mcf->zone->shm.name.data, z.shm.name.len) != 0) {
          continue;
        }
        auto* hdr = static_cast<ZoneHeader*>(z.data);
        if (hdr == nullptr || hdr->magic != kZoneMagic ||
            hdr->layout_version != kZoneLayoutVersion || hdr->fingerprint != reg.fingerprint) {
          mcf->zone->noreuse = 1;
          ngx_conf_log_error(NGX_LOG_NOTICE, cf, 0,
                             "omni_proxy_zone \"%V\": servers or limits changed, the new "
                             "workers start with a fresh zone",
                             &mcf->zone->shm.name);
        }
      }
    }
  }
  return NGX_CONF_OK;
} catch (...) {
  log_exception(cf->log, "omni_proxy configuration");
  return static_cast<char*>(NGX_CONF_ERROR);
}

char* set_proxy(ngx_conf_t* cf, ngx_command_t*, void* conf) noexcept {
  auto* lcf = static_cast<LocConf*>(conf);
  if (lcf->enable != NGX_CONF_UNSET) return const_cast<char*>("is duplicate");
  lcf->enable = 1;
  auto* clcf = static_cast<ngx_http_core_loc_conf_t*>(
      ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
  clcf->handler = omni::ngx::proxy_handler;
  return NGX_CONF_OK;
}

// omni_proxy_upstream / omni_proxy_prefill_upstream / omni_proxy_decode_upstream NAME: an
// upstream{} block by name, as proxy_pass http://NAME finds it.
char* set_upstream(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept {
  auto* leg = reinterpret_cast<ngx_http_upstream_conf_t*>(static_cast<char*>(conf) + cmd->offset);
  if (leg->upstream != nullptr) return const_cast<char*>("is duplicate");
  auto* value = static_cast<ngx_str_t*>(cf->args->elts);
  if (value[1].len == 0 || ngx_strlchr(value[1].data, value[1].data + value[1].len, '/') ||
      ngx_strlchr(value[1].data, value[1].data + value[1].len, ':')) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"%V\": \"%V\" is not an upstream name; name an upstream{} block",
                       &cmd->name, &value[1]);
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  ngx_url_t u;
  ngx_memzero(&u, sizeof(ngx_url_t));
  u.url = value[1];
  u.no_resolve = 1;
  leg->upstream = ngx_http_upstream_add(cf, &u, 0);
  if (leg->upstream == nullptr) return static_cast<char*>(NGX_CONF_ERROR);
  return NGX_CONF_OK;
}

char* set_max_body_size(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept {
  char* rc = ngx_conf_set_size_slot(cf, cmd, conf);
  if (rc != NGX_CONF_OK) return rc;
  auto* lcf = static_cast<LocConf*>(conf);
  if (lcf->max_body_size == 0 || lcf->max_body_size > kMaxBodySizeLimit) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V\" must be between 1 and %uzm", &cmd->name,
                       kMaxBodySizeLimit >> 20);
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  return NGX_CONF_OK;
}

// omni_proxy_policy kv_aware [epsilon=E] [tie=F] [miss_weight=W] [kv_usage_high=U]
//                            [prefill_tps=N] [decode_slack=F]
char* set_kv_policy(ngx_conf_t* cf, ngx_command_t* cmd, LocConf* lcf) {
  auto* value = static_cast<ngx_str_t*>(cf->args->elts);
  auto* o = static_cast<omni::ngx::KvPolicyOptions*>(
      ngx_palloc(cf->pool, sizeof(omni::ngx::KvPolicyOptions)));
  if (o == nullptr) return static_cast<char*>(NGX_CONF_ERROR);
  new (o) omni::ngx::KvPolicyOptions();
  static_assert(std::is_trivially_destructible_v<omni::ngx::KvPolicyOptions>);
  for (ngx_uint_t i = 2; i < cf->args->nelts; ++i) {
    const std::string arg(reinterpret_cast<const char*>(value[i].data), value[i].len);
    const std::size_t eq = arg.find('=');
    const std::string name = arg.substr(0, eq);
    const std::string text = eq == std::string::npos ? "" : arg.substr(eq + 1);
    char* end = nullptr;
    errno = 0;
    const double number = text.empty() ? -1 : std::strtod(text.c_str(), &end);
    const bool numeric = !text.empty() && end != nullptr && *end == '\0' && errno == 0 &&
                         std::isfinite(number);
    if (name == "epsilon" && numeric && number >= 0 && number <= 10) {
      o->epsilon = number;
    } else if (name == "tie" && numeric && number >= 0 && number <= 1) {
      o->tie_fraction = number;
    } else if (name == "miss_weight" && numeric && number >= 0 && number <= 10) {
      o->miss_weight = number;
    } else if (name == "kv_usage_high" && numeric && number > 0 && number <= 1) {
      o->kv_usage_high = number;
    } else if (name == "prefill_tps" && numeric && number >= 1 && number <= 1e9) {
      o->prefill_tps = number;
    } else if (name == "decode_slack" && numeric && number >= 0 && number <= 10) {
      o->decode_slack = number;
    } else {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "\"%V kv_aware\": invalid parameter \"%V\"; use epsilon=0..10, tie=0..1, "
                         "miss_weight=0..10, kv_usage_high=0..1, prefill_tps=N, "
                         "decode_slack=0..10",
                         &cmd->name, &value[i]);
      return static_cast<char*>(NGX_CONF_ERROR);
    }
  }
  lcf->kv = o;
  return NGX_CONF_OK;
}

// ngx_conf_set_enum_slot, with a message that names the directive and the choices.
// omni_proxy_policy least_outstanding | upstream | cache_aware | kv_aware [name=value ...]
char* set_policy(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept try {
  auto* lcf = static_cast<LocConf*>(conf);
  if (lcf->policy != NGX_CONF_UNSET_UINT) return const_cast<char*>("is duplicate");
  auto* value = static_cast<ngx_str_t*>(cf->args->elts);
  const std::string_view kind(reinterpret_cast<const char*>(value[1].data), value[1].len);
  if (kind == "least_outstanding") {
    lcf->policy = omni::ngx::kPolicyLeastOutstanding;
  } else if (kind == "upstream") {
    lcf->policy = omni::ngx::kPolicyUpstream;
  } else if (kind == "cache_aware") {
    lcf->policy = omni::ngx::kPolicyCacheAware;
  } else if (kind == "kv_aware") {
    lcf->policy = omni::ngx::kPolicyKvAware;
    return set_kv_policy(cf, cmd, lcf);
  } else {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"%V\": invalid value \"%V\"; use one of: least_outstanding, upstream, "
                       "cache_aware, kv_aware", &cmd->name, &value[1]);
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  if (lcf->policy != omni::ngx::kPolicyCacheAware && cf->args->nelts > 2) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V %V\" takes no parameters", &cmd->name,
                       &value[1]);
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  if (lcf->policy != omni::ngx::kPolicyCacheAware) return NGX_CONF_OK;
  auto* options = static_cast<omni::CacheAwareOptions*>(
      ngx_palloc(cf->pool, sizeof(omni::CacheAwareOptions)));
  auto* prefix = static_cast<omni::PrefixKeyOptions*>(
      ngx_palloc(cf->pool, sizeof(omni::PrefixKeyOptions)));
  if (options == nullptr || prefix == nullptr) return static_cast<char*>(NGX_CONF_ERROR);
  new (options) omni::CacheAwareOptions();
  new (prefix) omni::PrefixKeyOptions();
  // Trivially destructible: nothing to clean up with the pool.
  static_assert(std::is_trivially_destructible_v<omni::CacheAwareOptions> &&
                std::is_trivially_destructible_v<omni::PrefixKeyOptions>);
  for (ngx_uint_t i = 2; i < cf->args->nelts; ++i) {
    const std::string arg(reinterpret_cast<const char*>(value[i].data), value[i].len);
    const std::size_t eq = arg.find('=');
    const std::string name = arg.substr(0, eq);
    const std::string text = eq == std::string::npos ? "" : arg.substr(eq + 1);
    char* end = nullptr;
    errno = 0;
    const double number = text.empty() ? -1 : std::strtod(text.c_str(), &end);
    const bool numeric = !text.empty() && end != nullptr && *end == '\0' && errno == 0 &&
                         std::isfinite(number);
    auto whole = [&](double lo, double hi) {
      return numeric && number >= lo && number <= hi && number == std::floor(number);
    };
    if (name == "cache_threshold" && numeric && number >= 0 && number <= 1) {
      options->cache_threshold = number;
    } else if (name == "balance_abs_threshold" && whole(0, 1e9)) {
      options->balance_abs = static_cast<std::uint32_t>(number);
    } else if (name == "balance_rel_threshold" && numeric && number >= 1 && number <= 1e6) {
      options->balance_rel = number;
    } else if (name == "block_tokens" && whole(1, 4096)) {
      prefix->block_tokens = static_cast<std::size_t>(number);
    } else if (name == "block_bytes" && whole(1, 65536)) {
      prefix->block_bytes = static_cast<std::size_t>(number);
    } else {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "\"%V cache_aware\": invalid parameter \"%V\"; use cache_threshold=0..1, "
                         "balance_abs_threshold=N, balance_rel_threshold=>=1, block_tokens=1..4096, "
                         "block_bytes=1..65536", &cmd->name, &value[i]);
      return static_cast<char*>(NGX_CONF_ERROR);
    }
  }
  lcf->cache_aware = options;
  lcf->prefix = prefix;
  return NGX_CONF_OK;
} catch (...) {
  log_exception(cf->log, "set_policy");
  return static_cast<char*>(NGX_CONF_ERROR);
}

char* set_enum(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept {
  auto* field = reinterpret_cast<ngx_uint_t*>(static_cast<char*>(conf) + cmd->offset);
  if (*field != NGX_CONF_UNSET_UINT) return const_cast<char*>("is duplicate");
  auto* value = static_cast<ngx_str_t*>(cf->args->elts);
  std::string choices;
  for (auto* e = static_cast<ngx_conf_enum_t*>(cmd->post); e->name.len != 0; ++e) {
    if (e->name.len == value[1].len && ngx_strcasecmp(e->name.data, value[1].data) == 0) {
      *field = e->value;
      return NGX_CONF_OK;
    }
    if (!choices.empty()) choices += ", ";
    choices.append(reinterpret_cast<const char*>(e->name.data), e->name.len);
  }
  ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V\": invalid value \"%V\"; use one of: %s",
                     &cmd->name, &value[1], choices.c_str());
  return static_cast<char*>(NGX_CONF_ERROR);
}

// A number with bounds, with a message naming the directive and the bounds.
char* set_bounded_num(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept {
  auto* field = reinterpret_cast<ngx_uint_t*>(static_cast<char*>(conf) + cmd->offset);
  if (*field != NGX_CONF_UNSET_UINT) return const_cast<char*>("is duplicate");
  auto* value = static_cast<ngx_str_t*>(cf->args->elts);
  const auto* bounds = static_cast<const ngx_conf_num_bounds_t*>(cmd->post);
  const ngx_int_t n = ngx_atoi(value[1].data, value[1].len);
  if (n == NGX_ERROR || n < bounds->low || n > bounds->high) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V\": \"%V\" must be an integer from %i to %i",
                       &cmd->name, &value[1], bounds->low, bounds->high);
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  *field = static_cast<ngx_uint_t>(n);
  return NGX_CONF_OK;
}

ngx_int_t preconfiguration(ngx_conf_t* cf) noexcept { return omni::ngx::add_variables(cf); }

ngx_int_t postconfiguration(ngx_conf_t* cf) noexcept {
  if (finalize_registry(cf) != NGX_CONF_OK) return NGX_ERROR;
  return omni::ngx::install_filters(cf);
}

// ---------------------------------------------------------------------------------------------
// The shared zone
// ---------------------------------------------------------------------------------------------

// init_zone follows ngx_http_limit_req_module: reuse the old zone's data across a reload, adopt
// an existing mapping, or lay out a fresh zone: our header, then the shared state in the rest.
ngx_int_t init_zone(ngx_shm_zone_t* shm_zone, void* data) noexcept try {
  auto* shpool = reinterpret_cast<ngx_slab_pool_t*>(shm_zone->shm.addr);
  auto* mcf = static_cast<MainConf*>(shm_zone->data);  // the placeholder set_zone left
  const Registry& reg = *mcf->registry;
  if (data != nullptr) {  // reload with an unchanged name, tag, size and config
    auto* hdr = static_cast<ZoneHeader*>(data);
    if (hdr->magic != kZoneMagic || hdr->layout_version != kZoneLayoutVersion ||
        hdr->fingerprint != reg.fingerprint) {
      ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                    "omni_proxy_zone \"%V\" holds an incompatible layout; restart nginx",
                    &shm_zone->shm.name);
      return NGX_ERROR;
    }
    hdr->generation++;
    shm_zone->data = hdr;
    return NGX_OK;
  }
  if (shm_zone->shm.exists) {  // Windows: the zone survived in another process
    shm_zone->data = shpool->data;
    return NGX_OK;
  }
  auto* hdr = static_cast<ZoneHeader*>(ngx_slab_calloc(shpool, sizeof(ZoneHeader)));
  if (hdr == nullptr) return NGX_ERROR;
  static const char kCtx[] = " in omni_proxy_zone \"";
  const size_t len = sizeof(kCtx) + shm_zone->shm.name.len + 1;
  shpool->log_ctx = static_cast<u_char*>(ngx_slab_alloc(shpool, len));
  if (shpool->log_ctx == nullptr) return NGX_ERROR;
  ngx_sprintf(shpool->log_ctx, " in omni_proxy_zone \"%V\"%Z", &shm_zone->shm.name);

  // The prefix table first (cache_aware locations), then the largest run of pages left holds
  // the shared state.
  if (reg.prefix_entries > 0) {
    const std::size_t bytes = prefix_table_bytes(reg);
    void* table = ngx_slab_alloc(shpool, bytes);
    if (table == nullptr ||
        omni::PrefixTable::create(table, bytes, reg.prefix_entries,
                                  std::max<std::uint32_t>(1, reg.state_config.max_backends)) ==
            nullptr) {
      ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                    "omni_proxy_zone \"%V\": no room for the prefix table of %uL entries",
                    &shm_zone->shm.name, reg.prefix_entries);
      return NGX_ERROR;
    }
    hdr->prefix_offset = static_cast<uint64_t>(static_cast<u_char*>(table) - shm_zone->shm.addr);
    hdr->prefix_bytes = bytes;
  }
  // The KV index and its bookkeeping (kv_aware locations, omni_proxy_kv_cache).
  if (reg.kv_blocks > 0) {
    const std::size_t ib = omni::ngx::kv_index_bytes(reg);
    const std::size_t sb = omni::ngx::kv_shared_bytes(reg);
    void* index = ngx_slab_alloc(shpool, ib);
    void* shared = index != nullptr ? ngx_slab_alloc(shpool, sb) : nullptr;
    if (shared == nullptr ||
        !omni::ngx::kv_create(index, ib, shared, sb, reg, shm_zone->shm.log)) {
      ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                    "omni_proxy_zone \"%V\": no room for the KV index of %uz bytes",
                    &shm_zone->shm.name, ib + sb);
      return NGX_ERROR;
    }
    hdr->kv_index_offset = static_cast<uint64_t>(static_cast<u_char*>(index) - shm_zone->shm.addr);
    hdr->kv_index_bytes = ib;
    hdr->kv_shared_offset = static_cast<uint64_t>(static_cast<u_char*>(shared) - shm_zone->shm.addr);
    hdr->kv_shared_bytes = sb;
  }
  // The schedulers' queue (omni_proxy_scheduler).
  if (const std::size_t sb = omni::ngx::sched_bytes(reg); sb > 0) {
    void* q = ngx_slab_alloc(shpool, sb);
    if (q == nullptr || !omni::ngx::sched_create(q, sb, reg, shm_zone->shm.log)) {
      ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                    "omni_proxy_zone \"%V\": no room for the scheduler's queue of %uz bytes",
                    &shm_zone->shm.name, sb);
      return NGX_ERROR;
    }
    hdr->sched_offset = static_cast<uint64_t>(static_cast<u_char*>(q) - shm_zone->shm.addr);
    hdr->sched_bytes = sb;
  }
  // The largest run of pages left holds the shared state.
  void* region = nullptr;
  size_t bytes = static_cast<size_t>(shpool->pfree) * ngx_pagesize;
  for (int tries = 0; region == nullptr && tries < 8 && bytes > ngx_pagesize; ++tries) {
    region = ngx_slab_alloc(shpool, bytes);
    if (region == nullptr) bytes -= ngx_pagesize;
  }
  if (region == nullptr) {
    ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                  "omni_proxy_zone \"%V\": no room for the request slots", &shm_zone->shm.name);
    return NGX_ERROR;
  }
  omni::OpenResult r = omni::SharedState::create(region, bytes, reg.state_config);
  if (!r.ok()) {
    ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0, "omni_proxy_zone \"%V\": %s",
                  &shm_zone->shm.name, r.error.c_str());
    return NGX_ERROR;
  }
  hdr->magic = kZoneMagic;
  hdr->layout_version = kZoneLayoutVersion;
  hdr->created_msec = static_cast<uint64_t>(ngx_current_msec);
  hdr->generation = 0;
  hdr->fingerprint = reg.fingerprint;
  hdr->state_offset = static_cast<uint64_t>(static_cast<u_char*>(region) - shm_zone->shm.addr);
  hdr->state_bytes = bytes;
  hdr->poller_pid.store(0);
  shpool->data = hdr;
  shm_zone->data = hdr;
  return NGX_OK;
} catch (...) {
  log_exception(shm_zone->shm.log, "init_zone");
  return NGX_ERROR;
}

char* set_zone(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept try {
  auto* mcf = static_cast<MainConf*>(conf);
  auto* value = static_cast<ngx_str_t*>(cf->args->elts);
  if (mcf->zone != nullptr) return const_cast<char*>("is duplicate");

  ngx_str_t name = value[1];
  if (name.len == 0) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V\": zone name must not be empty", &cmd->name);
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  ssize_t size = ngx_parse_size(&value[2]);
  if (size == NGX_ERROR) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"%V\": invalid zone size \"%V\"; use bytes with an optional k or m "
                       "suffix",
                       &cmd->name, &value[2]);
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  if (static_cast<size_t>(size) < kZoneMinPages * ngx_pagesize ||
      static_cast<size_t>(size) > kZoneMaxSize) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"%V\": zone \"%V\" size %V is out of range; it must be between %uzk "
                       "and %uzm",
                       &cmd->name, &name, &value[2], kZoneMinPages * ngx_pagesize / 1024,
                       kZoneMaxSize >> 20);
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  mcf->zone = ngx_shared_memory_add(cf, &name, static_cast<size_t>(size),
                                    &ngx_http_omni_proxy_module);
  if (mcf->zone == nullptr) return static_cast<char*>(NGX_CONF_ERROR);
  if (mcf->zone->data != nullptr) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V\": zone \"%V\" is already used", &cmd->name,
                       &name);
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  mcf->zone->init = init_zone;
  mcf->zone->data = mcf;  // until init_zone runs: marks the zone as taken, carries the config
  return NGX_CONF_OK;
} catch (...) {
  log_exception(cf->log, "omni_proxy_zone");
  return static_cast<char*>(NGX_CONF_ERROR);
}

// ---------------------------------------------------------------------------------------------
// Observability handlers
// ---------------------------------------------------------------------------------------------

const char* engine_name(omni::EngineFlavor f) {
  return f == omni::EngineFlavor::kSglang ? "sglang" : "vllm";
}

// What the observability handlers show of omni_proxy_zone.
struct ZoneView {
  std::string name;
  size_t size = 0;
  size_t free_bytes = 0;  // unused slab pages
  const ZoneHeader* header = nullptr;
};

std::optional<ZoneView> zone_view(const MainConf& mcf) {
  if (mcf.zone == nullptr || mcf.zone->shm.addr == nullptr) return std::nullopt;
  auto* shpool = reinterpret_cast<ngx_slab_pool_t*>(mcf.zone->shm.addr);
  ZoneView v;
  v.name.assign(reinterpret_cast<const char*>(mcf.zone->shm.name.data), mcf.zone->shm.name.len);
  v.size = mcf.zone->shm.size;
  ngx_shmtx_lock(&shpool->mutex);
  v.free_bytes = shpool->pfree * ngx_pagesize;
  ngx_shmtx_unlock(&shpool->mutex);
  v.header = static_cast<const ZoneHeader*>(mcf.zone->data);
  return v;
}

// GET and HEAD only, and the request body (if any) read away; NGX_OK to go on.
ngx_int_t accept_get(ngx_http_request_t* r) {
  if (!(r->method & (NGX_HTTP_GET | NGX_HTTP_HEAD))) return NGX_HTTP_NOT_ALLOWED;
  return ngx_http_discard_request_body(r);
}

// omni_proxy_status: a JSON snapshot of backends, queues, stages and the zone.
ngx_int_t status_handler(ngx_http_request_t* r) noexcept try {
  if (ngx_int_t rc = accept_get(r); rc != NGX_OK) return rc;
  auto* mcf = static_cast<MainConf*>(
      ngx_http_get_module_main_conf(r, ngx_http_omni_proxy_module));
  nlohmann::json j;
  j["version"] = omni::kVersion;
  j["pid"] = static_cast<long>(ngx_pid);
  if (const auto zone = zone_view(*mcf)) {
    j["zone"] = {{"name", zone->name},
                 {"size", zone->size},
                 {"free_bytes", zone->free_bytes},
                 {"state_bytes", zone->header->state_bytes},
                 {"generation", zone->header->generation},
                 {"poller_pid", zone->header->poller_pid.load()}};
  } else {
    j["zone"] = nullptr;
  }
  nlohmann::json pools = nlohmann::json::array();
  for (const Pool& p : mcf->registry->pools) {
    nlohmann::json servers = nlohmann::json::array();
    for (std::size_t i = 0; i < p.servers.size(); ++i) {
      servers.push_back({{"name", p.servers[i].name}, {"backend", p.base + i}});
    }
    pools.push_back({{"name", p.name}, {"engine", engine_name(p.flavor)}, {"servers", servers}});
  }
  j["pools"] = std::move(pools);
  if (omni::SharedState* st = omni::ngx::shared_state()) {
    j.update(st->render_status_json());
  }
  if (const omni::PrefixTable* t = omni::ngx::prefix_table()) {
    const omni::PrefixTableStats ps = t->stats();
    j["prefix_table"] = {{"entries", ps.entries}, {"used", ps.used}, {"inserts", ps.inserts},
                         {"evictions", ps.evictions}, {"contended", ps.contended}};
  }
  if (auto kv = omni::ngx::kv_status_json(); !kv.is_null()) j["kv"] = std::move(kv);
  if (auto sc = omni::ngx::sched_status_json(); !sc.is_null()) j["scheduler"] = std::move(sc);
  return omni::ngx::send_json(r, NGX_HTTP_OK, j.dump() + "\n");
} catch (...) {
  log_exception(r->connection->log, "omni_proxy_status");
  return NGX_HTTP_INTERNAL_SERVER_ERROR;
}

// omni_proxy_metrics: Prometheus text exposition 0.0.4.
ngx_int_t metrics_handler(ngx_http_request_t* r) noexcept try {
  if (ngx_int_t rc = accept_get(r); rc != NGX_OK) return rc;
  auto* mcf = static_cast<MainConf*>(
      ngx_http_get_module_main_conf(r, ngx_http_omni_proxy_module));
  omni::prom::TextWriter w;
  w.family("omni_proxy_info", "gauge", "The omni_proxy module's version.");
  w.sample("omni_proxy_info", {{"version", omni::kVersion}}, 1);
  if (const auto zone = zone_view(*mcf)) {
    const omni::prom::Labels labels = {{"zone", zone->name}};
    w.family("omni_proxy_zone_size_bytes", "gauge", "Size of omni_proxy_zone.");
    w.sample("omni_proxy_zone_size_bytes", labels, static_cast<double>(zone->size));
    w.family("omni_proxy_zone_free_bytes", "gauge", "Free pages of omni_proxy_zone, in bytes.");
    w.sample("omni_proxy_zone_free_bytes", labels, static_cast<double>(zone->free_bytes));
    w.family("omni_proxy_zone_generation", "gauge",
             "Reloads the zone survived since it was created.");
    w.sample("omni_proxy_zone_generation", labels,
             static_cast<double>(zone->header->generation));
  }
  if (omni::SharedState* st = omni::ngx::shared_state()) st->render_metrics(w);
  if (const omni::PrefixTable* t = omni::ngx::prefix_table()) {
    const omni::PrefixTableStats ps = t->stats();
    const omni::prom::Labels none;
    w.family("omni_proxy_prefix_table_entries", "gauge",
             "Capacity of the cache_aware prefix table, in block keys.");
    w.sample("omni_proxy_prefix_table_entries", none, static_cast<double>(ps.entries));
    w.family("omni_proxy_prefix_table_used", "gauge", "Entries of the prefix table in use.");
    w.sample("omni_proxy_prefix_table_used", none, static_cast<double>(ps.used));
    w.family("omni_proxy_prefix_table_evictions_total", "counter",
             "Prefix-table entries replaced because their set was full.");
    w.sample("omni_proxy_prefix_table_evictions_total", none, static_cast<double>(ps.evictions));
    w.family("omni_proxy_prefix_table_contended_total", "counter",
             "Prefix-table writes skipped because another worker held the set.");
    w.sample("omni_proxy_prefix_table_contended_total", none, static_cast<double>(ps.contended));
  }
  omni::ngx::kv_render_metrics(w);
  omni::ngx::sched_render_metrics(w);
  return omni::ngx::send_body(r, NGX_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8",
                              w.str());
} catch (...) {
  log_exception(r->connection->log, "omni_proxy_metrics");
  return NGX_HTTP_INTERNAL_SERVER_ERROR;
}

char* set_handler(ngx_conf_t* cf, ngx_flag_t* flag, ngx_http_handler_pt handler) {
  if (*flag != NGX_CONF_UNSET) return const_cast<char*>("is duplicate");
  *flag = 1;
  auto* clcf = static_cast<ngx_http_core_loc_conf_t*>(
      ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
  clcf->handler = handler;
  return NGX_CONF_OK;
}

// Loaded tokenizers by file identity, so a reload whose files did not change reuses the
// running configuration's (the old cycle still holds them while the new one is read).
struct LoadedTokenizer {
  std::string key;
  std::weak_ptr<const omni::Tokenizer> tokenizer;
  std::weak_ptr<const omni::ChatTemplate> chat;
};
std::vector<LoadedTokenizer>& tokenizer_cache() {
  static std::vector<LoadedTokenizer> cache;
  return cache;
}

// Path, size and modification time; empty when the file is missing.
std::string file_stamp(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return {};
  return path + ":" + std::to_string(st.st_size) + ":" + std::to_string(st.st_mtim.tv_sec) + "." +
         std::to_string(st.st_mtim.tv_nsec);
}

std::string read_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
  std::string out;
  char buf[65536];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  const bool failed = std::ferror(f) != 0;
  std::fclose(f);
  if (failed) throw std::runtime_error("cannot read " + path);
  return out;
}

// omni_proxy_tokenizer NAME FOLDER [chat_template=FILE]: loads FOLDER/tokenizer.json and
// FOLDER/tokenizer_config.json now, so a broken tokenizer fails `nginx -t` naming it. Relative
// paths are relative to nginx's configuration prefix.
char* set_tokenizer(ngx_conf_t* cf, ngx_command_t*, void* conf) noexcept try {
  auto* mcf = static_cast<MainConf*>(conf);
  auto* value = static_cast<ngx_str_t*>(cf->args->elts);
  ngx_str_t name = value[1];
  ngx_str_t folder = value[2];
  const std::string tname(reinterpret_cast<const char*>(name.data), name.len);
  if (tname.empty() || tname == "off") {
    return const_cast<char*>(": the name must not be empty or \"off\"");
  }
  for (const auto& entry : mcf->registry->tokenizers) {
    if (entry.name == tname) return const_cast<char*>(": a tokenizer of that name is declared already");
  }
  if (ngx_conf_full_name(cf->cycle, &folder, 1) != NGX_OK) return static_cast<char*>(NGX_CONF_ERROR);
  std::string template_path;
  if (cf->args->nelts == 4) {
    ngx_str_t arg = value[3];
    constexpr std::string_view kPrefix = "chat_template=";
    const std::string_view a(reinterpret_cast<const char*>(arg.data), arg.len);
    if (!a.starts_with(kPrefix) || a.size() == kPrefix.size()) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                         "\"omni_proxy_tokenizer\" \"%V\": unknown parameter \"%V\" (expected "
                         "chat_template=FILE)", &name, &arg);
      return static_cast<char*>(NGX_CONF_ERROR);
    }
    ngx_str_t file;
    file.data = arg.data + kPrefix.size();
    file.len = arg.len - kPrefix.size();
    if (ngx_conf_full_name(cf->cycle, &file, 1) != NGX_OK) return static_cast<char*>(NGX_CONF_ERROR);
    template_path.assign(reinterpret_cast<const char*>(file.data), file.len);
  }
  omni::ngx::TokenizerEntry entry;
  entry.name = tname;
  entry.path.assign(reinterpret_cast<const char*>(folder.data), folder.len);
  const std::string key = file_stamp(entry.path + "/tokenizer.json") + "|" +
                          file_stamp(entry.path + "/tokenizer_config.json") + "|" +
                          (template_path.empty() ? std::string() : file_stamp(template_path));
  auto& cache = tokenizer_cache();
  std::erase_if(cache, [](const LoadedTokenizer& l) { return l.tokenizer.expired(); });
  for (const LoadedTokenizer& l : cache) {
    if (l.key == key) {
      entry.tokenizer = l.tokenizer.lock();
      entry.chat = l.chat.lock();
    }
  }
  if (entry.tokenizer == nullptr) {
    const auto t0 = std::chrono::steady_clock::now();
    std::shared_ptr<const omni::Tokenizer> tok;
    try {
      tok = omni::Tokenizer::load_dir(entry.path);
    } catch (const std::exception& e) {
      ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"omni_proxy_tokenizer\" \"%V\": cannot load "
                         "\"%V\": %s", &name, &folder, e.what());
      return static_cast<char*>(NGX_CONF_ERROR);
    }
    std::string source = tok->config().chat_template;
    std::string where = "the chat template of tokenizer_config.json";
    if (!template_path.empty()) {
      where = template_path;
      try {
        source = read_file(template_path);
      } catch (const std::exception& e) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"omni_proxy_tokenizer\" \"%V\": %s", &name,
                           e.what());
        return static_cast<char*>(NGX_CONF_ERROR);
      }
    }
    std::shared_ptr<const omni::ChatTemplate> chat;
    if (!source.empty()) {
      try {
        chat = std::make_shared<const omni::ChatTemplate>(source, tok->config());
      } catch (const std::exception& e) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"omni_proxy_tokenizer\" \"%V\": %s: %s",
                           &name, where.c_str(), e.what());
        return static_cast<char*>(NGX_CONF_ERROR);
      }
    }
    entry.tokenizer = std::move(tok);
    entry.chat = std::move(chat);
    entry.load_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    cache.push_back({key, entry.tokenizer, entry.chat});
    ngx_conf_log_error(NGX_LOG_INFO, cf, 0,
                       "omni_proxy_tokenizer \"%V\": loaded in %.0f ms, %uz KiB, chat template: %s",
                       &name, entry.load_ms, entry.tokenizer->memory_bytes() / 1024,
                       entry.chat ? "yes" : "none");
  }
  mcf->registry->tokenizers.push_back(std::move(entry));
  return NGX_CONF_OK;
} catch (...) {
  log_exception(cf->log, "omni_proxy_tokenizer");
  return static_cast<char*>(NGX_CONF_ERROR);
}

char* set_status(ngx_conf_t* cf, ngx_command_t*, void* conf) noexcept {
  return set_handler(cf, &static_cast<LocConf*>(conf)->status, status_handler);
}

char* set_metrics(ngx_conf_t* cf, ngx_command_t*, void* conf) noexcept {
  return set_handler(cf, &static_cast<LocConf*>(conf)->metrics, metrics_handler);
}

}  // namespace
