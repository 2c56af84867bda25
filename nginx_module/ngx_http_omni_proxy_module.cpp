// ngx_http_omni_proxy_module: nginx glue for the omni-proxy core library.
//
// Conventions (see docs/architecture.md): every entry point nginx calls is noexcept and turns
// any C++ exception into a logged NGX_ERROR; directives are validated when nginx parses them;
// the shared zone keeps nginx's slab-pool header intact so the master can recover its mutex.
#include "omni_module.hpp"

#include <omni/version.hpp>

#include <cstddef>
#include <cstdio>
#include <exception>
#include <string>

namespace {

using omni::ngx::LocConf;
using omni::ngx::MainConf;

// Bounds of omni_proxy_zone's SIZE, documented in docs/directives.md.
constexpr size_t kZoneMinPages = 8;                        // nginx's slab allocator minimum
constexpr size_t kZoneMaxSize = size_t{1} << 30;           // 1 GiB
constexpr uint64_t kZoneMagic = 0x6f6d6e6970726f78ULL;     // "omniprox"
constexpr uint32_t kZoneLayoutVersion = 1;

// Lives in the shared zone, after nginx's slab-pool header. Fixed-width, trivially copyable.
struct ZoneHeader {
  uint64_t magic;
  uint32_t layout_version;
  uint32_t reserved;
  uint64_t created_msec;     // when this zone was first initialised
  uint64_t generation;       // bumped on every reload that reuses the zone
};

// Bounds of the other directives, documented in docs/directives.md.
constexpr size_t kDefaultMaxBodySize = 8u << 20;          // 8 MiB
constexpr size_t kMaxBodySizeLimit = 256u << 20;          // 256 MiB
constexpr size_t kPrefillResponseBuffer = 8u << 20;       // in-memory prefill answers
constexpr size_t kUpstreamHeaderBuffer = 16u << 10;

char* set_zone(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
char* set_status(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
char* set_proxy(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
char* set_upstream(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
char* set_max_body_size(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
void* create_main_conf(ngx_conf_t* cf) noexcept;
void* create_loc_conf(ngx_conf_t* cf) noexcept;
char* merge_loc_conf(ngx_conf_t* cf, void* parent, void* child) noexcept;
ngx_int_t postconfiguration(ngx_conf_t* cf) noexcept;

ngx_conf_enum_t modes[] = {
    {ngx_string("aggregated"), omni::ngx::kModeAggregated},
    {ngx_string("sequential"), omni::ngx::kModeSequential},
    {ngx_null_string, 0},
};

ngx_command_t commands[] = {
    {ngx_string("omni_proxy_zone"), NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE2, set_zone,
     NGX_HTTP_MAIN_CONF_OFFSET, 0, nullptr},
    {ngx_string("omni_proxy_status"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, set_status,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    {ngx_string("omni_proxy"), NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS, set_proxy,
     NGX_HTTP_LOC_CONF_OFFSET, 0, nullptr},
    {ngx_string("omni_proxy_mode"), NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF |
     NGX_CONF_TAKE1, ngx_conf_set_enum_slot, NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, mode),
     modes},
    {ngx_string("omni_proxy_upstream"), NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_upstream,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, decode), nullptr},
    {ngx_string("omni_proxy_decode_upstream"), NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_upstream,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, decode), nullptr},
    {ngx_string("omni_proxy_prefill_upstream"), NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_upstream,
     NGX_HTTP_LOC_CONF_OFFSET, offsetof(LocConf, prefill), nullptr},
    {ngx_string("omni_proxy_connect_timeout"), NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF |
     NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, ngx_conf_set_msec_slot, NGX_HTTP_LOC_CONF_OFFSET,
     offsetof(LocConf, connect_timeout), nullptr},
    {ngx_string("omni_proxy_prefill_timeout"), NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF |
     NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, ngx_conf_set_msec_slot, NGX_HTTP_LOC_CONF_OFFSET,
     offsetof(LocConf, prefill_timeout), nullptr},
    {ngx_string("omni_proxy_decode_timeout"), NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF |
     NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, ngx_conf_set_msec_slot, NGX_HTTP_LOC_CONF_OFFSET,
     offsetof(LocConf, decode_timeout), nullptr},
    {ngx_string("omni_proxy_max_body_size"), NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF |
     NGX_HTTP_LOC_CONF | NGX_CONF_TAKE1, set_max_body_size, NGX_HTTP_LOC_CONF_OFFSET,
     offsetof(LocConf, max_body_size), nullptr},
    ngx_null_command,
};

ngx_http_module_t module_ctx = {
    nullptr,           // preconfiguration
    postconfiguration, // postconfiguration
    create_main_conf,  // create main configuration
    nullptr,           // init main configuration
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
    nullptr,  // init master
    nullptr,  // init module
    nullptr,  // init process
    nullptr,  // init thread
    nullptr,  // exit thread
    nullptr,  // exit process
    nullptr,  // exit master
    NGX_MODULE_V1_PADDING};
}

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

}  // namespace omni::ngx

namespace {

using omni::ngx::log_exception;

void* create_main_conf(ngx_conf_t* cf) noexcept {
  auto* mcf = static_cast<MainConf*>(ngx_pcalloc(cf->pool, sizeof(MainConf)));
  return mcf;  // null on allocation failure, which nginx reports
}

void* create_loc_conf(ngx_conf_t* cf) noexcept {
  auto* lcf = static_cast<LocConf*>(ngx_pcalloc(cf->pool, sizeof(LocConf)));
  if (lcf == nullptr) return nullptr;
  lcf->status = NGX_CONF_UNSET;
  lcf->enable = NGX_CONF_UNSET;
  lcf->mode = NGX_CONF_UNSET_UINT;
  lcf->max_body_size = NGX_CONF_UNSET_SIZE;
  lcf->connect_timeout = NGX_CONF_UNSET_MSEC;
  lcf->prefill_timeout = NGX_CONF_UNSET_MSEC;
  lcf->decode_timeout = NGX_CONF_UNSET_MSEC;
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

char* merge_loc_conf(ngx_conf_t* cf, void* parent, void* child) noexcept try {
  auto* prev = static_cast<LocConf*>(parent);
  auto* conf = static_cast<LocConf*>(child);
  ngx_conf_merge_value(conf->status, prev->status, 0);
  ngx_conf_merge_value(conf->enable, prev->enable, 0);
  ngx_conf_merge_uint_value(conf->mode, prev->mode, omni::ngx::kModeAggregated);
  ngx_conf_merge_size_value(conf->max_body_size, prev->max_body_size, kDefaultMaxBodySize);
  ngx_conf_merge_msec_value(conf->connect_timeout, prev->connect_timeout, 5000);
  ngx_conf_merge_msec_value(conf->prefill_timeout, prev->prefill_timeout, 300000);
  ngx_conf_merge_msec_value(conf->decode_timeout, prev->decode_timeout, 600000);
  char* rc = merge_leg(cf, &conf->prefill, &prev->prefill, conf->connect_timeout,
                       conf->prefill_timeout, true);
  if (rc != NGX_CONF_OK) return rc;
  rc = merge_leg(cf, &conf->decode, &prev->decode, conf->connect_timeout, conf->decode_timeout,
                 false);
  if (rc != NGX_CONF_OK) return rc;
  if (!conf->enable) return NGX_CONF_OK;

  if (conf->decode.upstream == nullptr) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       conf->mode == omni::ngx::kModeAggregated
                           ? "\"omni_proxy\" needs \"omni_proxy_upstream\" in aggregated mode"
                           : "\"omni_proxy\" needs \"omni_proxy_decode_upstream\"");
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  if (conf->mode == omni::ngx::kModeSequential && conf->prefill.upstream == nullptr) {
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"omni_proxy_mode sequential\" needs \"omni_proxy_prefill_upstream\"");
    return static_cast<char*>(NGX_CONF_ERROR);
  }
  // The body limit is ours; nginx's own check must not undercut it. Prefill answers carry one
  // block id per KV block, far more than nginx's default in-memory subrequest buffer.
  auto* clcf = static_cast<ngx_http_core_loc_conf_t*>(
      ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
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

ngx_int_t postconfiguration(ngx_conf_t*) noexcept { return omni::ngx::install_filters(); }

// init_zone follows ngx_http_limit_req_module: reuse the old zone's data across a reload, adopt
// an existing mapping, or lay out a fresh zone.
ngx_int_t init_zone(ngx_shm_zone_t* shm_zone, void* data) noexcept try {
  auto* shpool = reinterpret_cast<ngx_slab_pool_t*>(shm_zone->shm.addr);
  if (data != nullptr) {  // reload with an unchanged name, tag and size
    auto* hdr = static_cast<ZoneHeader*>(data);
    if (hdr->magic != kZoneMagic || hdr->layout_version != kZoneLayoutVersion) {
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
  hdr->magic = kZoneMagic;
  hdr->layout_version = kZoneLayoutVersion;
  hdr->created_msec = static_cast<uint64_t>(ngx_current_msec);
  hdr->generation = 0;
  shpool->data = hdr;
  shm_zone->data = hdr;

  static const char kCtx[] = " in omni_proxy_zone \"";
  size_t len = sizeof(kCtx) + shm_zone->shm.name.len + 1;
  shpool->log_ctx = static_cast<u_char*>(ngx_slab_alloc(shpool, len));
  if (shpool->log_ctx == nullptr) return NGX_ERROR;
  ngx_sprintf(shpool->log_ctx, " in omni_proxy_zone \"%V\"%Z", &shm_zone->shm.name);
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
    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V\": invalid zone size \"%V\"; use bytes with an optional k or m suffix",
                       &cmd->name,
                       &value[2]);
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
  mcf->zone->data = mcf;  // placeholder until init_zone runs, marks the zone as taken
  return NGX_CONF_OK;
} catch (...) {
  log_exception(cf->log, "omni_proxy_zone");
  return static_cast<char*>(NGX_CONF_ERROR);
}

// omni_proxy_status: a JSON snapshot of the module's state.
ngx_int_t status_handler(ngx_http_request_t* r) noexcept try {
  if (!(r->method & (NGX_HTTP_GET | NGX_HTTP_HEAD))) return NGX_HTTP_NOT_ALLOWED;
  ngx_int_t rc = ngx_http_discard_request_body(r);
  if (rc != NGX_OK) return rc;

  auto* mcf = static_cast<MainConf*>(
      ngx_http_get_module_main_conf(r, ngx_http_omni_proxy_module));
  std::string body = "{\"version\":\"";
  body += omni::kVersion;
  body += "\",\"pid\":" + std::to_string(ngx_pid);
  if (mcf->zone != nullptr && mcf->zone->shm.addr != nullptr) {
    auto* shpool = reinterpret_cast<ngx_slab_pool_t*>(mcf->zone->shm.addr);
    auto* hdr = static_cast<ZoneHeader*>(mcf->zone->data);
    size_t free_pages = 0;
    ngx_shmtx_lock(&shpool->mutex);
    free_pages = shpool->pfree;
    ngx_shmtx_unlock(&shpool->mutex);
    body += ",\"zone\":{\"name\":\"" +
            std::string(reinterpret_cast<const char*>(mcf->zone->shm.name.data),
                        mcf->zone->shm.name.len) +
            "\",\"size\":" + std::to_string(mcf->zone->shm.size) +
            ",\"free_bytes\":" + std::to_string(free_pages * ngx_pagesize) +
            ",\"generation\":" + std::to_string(hdr->generation) + "}";
  } else {
    body += ",\"zone\":null";
  }
  body += "}\n";

  return omni::ngx::send_json(r, NGX_HTTP_OK, body);
} catch (...) {
  log_exception(r->connection->log, "omni_proxy_status");
  return NGX_HTTP_INTERNAL_SERVER_ERROR;
}

char* set_status(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept try {
  auto* lcf = static_cast<LocConf*>(conf);
  if (lcf->status != NGX_CONF_UNSET) return const_cast<char*>("is duplicate");
  lcf->status = 1;
  auto* clcf = static_cast<ngx_http_core_loc_conf_t*>(
      ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module));
  clcf->handler = status_handler;
  (void)cmd;
  return NGX_CONF_OK;
} catch (...) {
  log_exception(cf->log, "omni_proxy_status");
  return static_cast<char*>(NGX_CONF_ERROR);
}

}  // namespace
