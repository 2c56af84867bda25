// The request path of omni_proxy locations.
//
// Every leg to an engine is an nginx upstream request (keepalive, timeouts, retries through the
// upstream block's balancer wrapped by balancer.cpp, as nginx users expect), sent and parsed by
// the callbacks below.
//  - aggregated: the client request itself runs one leg to the location's pool;
//  - sequential (vLLM P/D): an in-memory subrequest runs the prefill leg (the client body with
//    kv_transfer_params.do_remote_decode, max_tokens 1, stream false); when it completes, the
//    client request runs the decode leg (the client body plus the kv_transfer_params the
//    prefill returned), whose answer streams to the client unbuffered;
//  - parallel (SGLang P/D): the prefill server is chosen first, both legs get the body with
//    its bootstrap_host/port and a random bootstrap_room, and they run at once: the prefill
//    as a background in-memory subrequest (drained), the decode on the client request. When
//    either fails, the other is cancelled (its upstream socket is shut down, so nginx's own
//    error path runs) and the client gets an error.
// Each request holds a slot of the shared state (omni/shared_state.hpp) from the handler to
// the log phase, moving through the ten lifecycle stages; a location with limits admits it
// through its limit group first, queueing it in this worker when the group is full.
// Request bodies are parsed and rewritten structurally by the core (omni/request_body.hpp).
// Errors nginx generates for these requests (a failed or timed-out leg, a body over the limit)
// are rewritten into OpenAI-style JSON by a header and body filter; a decode leg that fails
// after its answer started streaming ends the stream with an SSE error event.
#include "omni_module.hpp"

#include <omni/openai_error.hpp>
#include <omni/request_body.hpp>
#include <omni/response_scan.hpp>
#include <omni/token_forwarding.hpp>

#include <nlohmann/json.hpp>

#include <sys/socket.h>
#include <time.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <new>
#include <random>
#include <string>
#include <vector>

namespace omni::ngx {
namespace {

enum class Admitted : std::uint8_t { kNone, kInflight, kQueued };

// State of one client request, shared by its legs. Owned by the client request's pool.
struct State {
  ngx_http_request_t* r = nullptr;  // the client request
  LocConf* lcf = nullptr;
  omni::Api api = omni::Api::kCompletions;
  std::string client_body;
  std::optional<omni::ParsedBody> parsed;
  std::string request_id;
  std::uint64_t request_hash = 0;
  std::string prefill_body;
  std::string decode_body;
  // The prefill leg's outcome.
  ngx_http_request_t* prefill_sr = nullptr;
  bool prefill_done = false;
  ngx_int_t prefill_rc = NGX_OK;
  ngx_uint_t prefill_status = 0;
  std::string prefill_response;
  bool decode_done = false;
  std::string error_message;  // why a leg was cancelled, for the client's error
  // Lifecycle (mirrored into the shared slot when there is one).
  std::optional<omni::SlotHandle> slot;
  omni::Timeline timeline;
  std::uint64_t first_token_ns = 0;
  std::int32_t prefill_backend = -1;
  std::int32_t decode_backend = -1;
  std::optional<omni::UsageScanner> scanner;
  bool finished = false;
  // Tokenizer-result reuse (omni_proxy_tokenize).
  struct TokenizeJob* job = nullptr;  // while the thread pool works on it
  std::int32_t forward_reason = -1;   // omni::ForwardReason once tokenized
  ngx_uint_t tokenize_status = 0;     // non-zero: tokenizing refused the request with this
  std::string tokenize_error;         // and this OpenAI-style body
  std::uint64_t tokenize_wall_ns = 0;
  std::size_t prompt_tokens = 0;      // the proxy's own count
  std::string upstream_path;          // the engines' path when it is not the client's
  std::string upstream_body;          // the rewritten body (aggregated mode sends it as is)
  bool chat_to_completion = false;    // the engines answer a completion: convert it to chat
  std::optional<omni::ChatStreamConverter> converter;
  std::string whole_answer;           // a non-streamed answer being converted
  // The prompt's prefix keys (cache_aware locations), computed once the body is final.
  std::optional<omni::PrefixKeys> prefix_keys;
  // kv_aware routing: keys, explanations, in-flight accounting.
  KvRequest kv;
  // The schedulers (omni_proxy_schedule).
  SchedRequest sched;
  bool scheduled = false;          // it went through the scheduler
  std::vector<std::uint32_t> sched_cached[2];  // predicted cached tokens per server at enqueue
  bool sched_first_token = false;  // aggregated: the first token was reported as the prefill
  // Limits.
  Admitted admitted = Admitted::kNone;
  ngx_queue_t queue{};     // in the worker's wait queue of the group while queued
  ngx_event_t queue_timer{};
};

// Per nginx request (the client request, or a leg subrequest).
struct Ctx {
  State* state = nullptr;
  Leg leg = Leg::kNone;
  const std::string* body = nullptr;  // what this leg sends; owned by State
  std::int32_t forced = -1;           // server the balancer must use (parallel prefill, or the
                                      // scheduler's choice)
  bool forced_retry = false;          // a retry may go elsewhere (the scheduler's choice)
  ngx_http_status_t status{};
  ngx_http_chunked_t chunked{};
  bool scanning = false;  // the decode answer is a success: scan it for tokens
  bool drain = false;     // a parallel prefill's successful answer: read and dropped
  bool cancelled = false; // ended by cancel_leg: not the server's failure
  // An nginx-generated error page being replaced with OpenAI-style JSON (pool memory).
  ngx_str_t json_error{};
  bool json_error_sent = false;
  // The decode answer is a completion converted into a chat answer on its way out; its buffers.
  bool converting = false;
  ngx_chain_t* conv_free = nullptr;
  ngx_chain_t* conv_busy = nullptr;
};

// A zeroed context from the request's pool (its members' initializers do not run there).
Ctx* new_ctx(ngx_pool_t* pool) {
  auto* ctx = static_cast<Ctx*>(ngx_pcalloc(pool, sizeof(Ctx)));
  if (ctx != nullptr) ctx->forced = -1;
  return ctx;
}

Ctx* get_ctx(ngx_http_request_t* r) {
  return static_cast<Ctx*>(ngx_http_get_module_ctx(r, ngx_http_omni_proxy_module));
}

// ---------------------------------------------------------------------------------------------
// Lifecycle and limits
// ---------------------------------------------------------------------------------------------

// This worker's wait queues, one per limit group. A worker that frees a place wakes the workers
// with requests waiting in that group (notify.cpp); the timer is only a safety net for a lost
// wake-up (and the only way without the wake-up socket).
constexpr ngx_msec_t kQueueTick = 20;        // without wake-ups
constexpr ngx_msec_t kQueueSafetyTick = 1000;
ngx_msec_t queue_tick_ms() { return notify_ready() ? kQueueSafetyTick : kQueueTick; }
struct WaitQueues {
  std::vector<ngx_queue_t> groups;
  std::size_t waiting = 0;
  ngx_event_t tick{};
  ngx_event_t kick{};  // posted when a local request frees a place
};

WaitQueues& wait_queues() {
  static WaitQueues q;
  return q;
}

void enter(State& st, omni::Stage stage, std::uint64_t now = 0) noexcept {
  if (now == 0) now = omni::monotonic_now_ns();
  if (!omni::accepted(st.timeline.enter(stage, now))) return;
  if (st.slot) {
    if (omni::SharedState* ss = shared_state()) ss->set_stage(*st.slot, stage, now);
  }
}

void sync_backends(State& st) noexcept {
  if (!st.slot) return;
  omni::SharedState* ss = shared_state();
  if (ss == nullptr) return;
  auto idx = [](std::int32_t b) {
    return b < 0 ? omni::kNoBackend : static_cast<std::uint16_t>(b);
  };
  ss->set_backends(*st.slot, idx(st.prefill_backend), idx(st.decode_backend));
}

void leave_group(State& st) noexcept;

// kv_aware, at the end of a request: an aggregated answer's cached tokens are the prefill's
// (accuracy of the prediction), and what it still accounted as prefilling is released.
void kv_finish(State& st) noexcept {
  if (st.kv.keyed && st.lcf->mode == kModeAggregated && st.scanner && st.kv.actual_cached < 0 &&
      st.prefill_backend >= 0) {
    if (const auto cached = st.scanner->cached_tokens()) {
      if (const Pool* pool = find_pool(st.lcf->decode.upstream)) {
        kv_observe_cached(st.kv, *pool, st.prefill_backend - pool->base, *cached,
                          st.scanner->prompt_tokens());
      }
    }
  }
  kv_prefill_done(st.kv);
}

// The prefill server that served the request, as an index within its pool (-1: none yet).
std::int32_t served_prefill(const State& st) noexcept {
  const Pool* pool = find_pool(st.lcf->mode == kModeAggregated ? st.lcf->decode.upstream
                                                               : st.lcf->prefill.upstream);
  if (pool == nullptr || st.prefill_backend < pool->base ||
      st.prefill_backend >= pool->base + pool->count) {
    return -1;
  }
  return st.prefill_backend - pool->base;
}

// The request's scheduler entry ends: a decode that ran reports its time per output token (the
// decode scheduler's inter-token latency fit); anything else is cancelled.
void sched_finish(State& st) noexcept {
  if (!st.sched.active) return;
  const omni::sched::Decision d = sched_decision(st.sched);
  if (d.state == omni::sched::State::kDecode && st.scanner && st.first_token_ns != 0) {
    const std::uint64_t out = st.scanner->output_tokens();
    const std::uint64_t now = omni::monotonic_now_ns();
    const double tpot_ms = out > 1 && now > st.first_token_ns
                               ? double(now - st.first_token_ns) / 1e6 / double(out - 1)
                               : 0.0;
    sched_decode_done(st.sched, tpot_ms);
    return;
  }
  if (d.state == omni::sched::State::kDecode) {
    sched_decode_done(st.sched, 0);
    return;
  }
  sched_cancel(st.sched);
}

// Ends the lifecycle: done, token counts, slot and limit group released. Idempotent; runs in
// the log phase (so the access log sees a finished request) and again, harmlessly, when the
// request's pool is destroyed.
void finish(State& st) noexcept {
  if (st.finished) return;
  st.finished = true;
  if (st.scanner) {
    try {
      st.scanner->finish();
    } catch (...) {
    }
  }
  omni::SharedState* ss = shared_state();
  if (st.slot && ss != nullptr) {
    if (st.scanner) {
      ss->set_tokens(*st.slot, st.scanner->prompt_tokens(),
                     st.scanner->cached_tokens().value_or(0), st.scanner->output_tokens());
    }
  }
  kv_finish(st);
  sched_finish(st);
  enter(st, omni::Stage::kDone);
  if (st.slot && ss != nullptr) ss->release(*st.slot);
  st.slot.reset();
  leave_group(st);
}

void destroy_state(void* data) noexcept {
  auto* st = static_cast<State*>(data);
  finish(*st);
  delete st;
}

void dispatch_group(std::size_t group) noexcept;

// Takes a waiting request out of this worker's wait queue (it got a place, timed out or left).
void unlink_waiter(State& st, Admitted next) noexcept {
  ngx_queue_remove(&st.queue);
  --wait_queues().waiting;
  if (st.queue_timer.timer_set) ngx_del_timer(&st.queue_timer);
  st.admitted = next;
}

void leave_group(State& st) noexcept {
  const LocConf* lcf = st.lcf;
  omni::SharedState* ss = shared_state();
  if (lcf == nullptr || lcf->group < 0 || ss == nullptr) return;
  const auto group = static_cast<std::uint16_t>(lcf->group);
  if (st.admitted == Admitted::kQueued) {
    unlink_waiter(st, Admitted::kNone);
    ss->unqueue(ngx_pid, group, false);
  } else if (st.admitted == Admitted::kInflight) {
    ss->leave(ngx_pid, group);
    st.admitted = Admitted::kNone;
    // A place is free: this worker's next waiter takes it, from the event loop (not from
    // inside this request's log phase or pool cleanup), or another worker's.
    WaitQueues& q = wait_queues();
    if (q.waiting > 0 && q.kick.handler != nullptr && !q.kick.posted) {
      ngx_post_event(&q.kick, &ngx_posted_events);
    }
    try {
      for (std::int32_t pid : ss->owners_queued(group)) {
        if (pid != ngx_pid) notify_wake(pid);
      }
    } catch (...) {
    }
    return;
  }
  st.admitted = Admitted::kNone;
}

}  // namespace

ngx_int_t send_error(ngx_http_request_t* r, ngx_uint_t status, const std::string& message,
                     const std::string& param, unsigned retry_after_s) {
  if (retry_after_s > 0) {
    auto* h = static_cast<ngx_table_elt_t*>(ngx_list_push(&r->headers_out.headers));
    if (h == nullptr) return NGX_ERROR;
    h->hash = 1;
    ngx_str_set(&h->key, "Retry-After");
    h->value.data = static_cast<u_char*>(ngx_pnalloc(r->pool, NGX_INT_T_LEN));
    if (h->value.data == nullptr) return NGX_ERROR;
    h->value.len = static_cast<size_t>(ngx_sprintf(h->value.data, "%ui", retry_after_s) -
                                       h->value.data);
  }
  return send_json(r, status, omni::openai_error_body(static_cast<int>(status), message, {},
                                                      param));
}

namespace {

// The whole client body as one string, from memory buffers or nginx's temporary file.
bool collect_body(ngx_http_request_t* r, std::string& out) {
  if (r->request_body == nullptr) return true;
  for (ngx_chain_t* cl = r->request_body->bufs; cl != nullptr; cl = cl->next) {
    ngx_buf_t* b = cl->buf;
    if (b->in_file) {
      const auto len = static_cast<size_t>(b->file_last - b->file_pos);
      const size_t at = out.size();
      out.resize(at + len);
      ssize_t n = ngx_read_file(b->file, reinterpret_cast<u_char*>(&out[at]), len, b->file_pos);
      if (n != static_cast<ssize_t>(len)) return false;
    } else {
      out.append(reinterpret_cast<const char*>(b->pos), static_cast<size_t>(b->last - b->pos));
    }
  }
  return true;
}


// X-Request-Id: the client's when it is sane, otherwise 32 random hex digits. Both legs carry
// the same one, as vLLM's P/D connectors expect.
std::string request_id(ngx_http_request_t* r) {
  std::string id = header_value(r, "X-Request-Id");
  bool ok = !id.empty() && id.size() <= 128;
  for (char c : id) ok = ok && c > 0x20 && c < 0x7f;
  if (ok) return id;
  static const char* hex = "0123456789abcdef";
  id.clear();
  for (int i = 0; i < 8; ++i) {
    const auto v = static_cast<unsigned>(ngx_random());
    for (int k = 0; k < 4; ++k) id.push_back(hex[(v >> (4 * k)) & 0xf]);
  }
  return id;
}

bool acceptable_content_type(ngx_http_request_t* r) {
  if (r->headers_in.content_type == nullptr) return true;
  std::string t(reinterpret_cast<const char*>(r->headers_in.content_type->value.data),
                r->headers_in.content_type->value.len);
  for (auto& c : t) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  t = t.substr(0, t.find(';'));
  while (!t.empty() && t.back() == ' ') t.pop_back();
  // curl -d sends application/x-www-form-urlencoded; it is tolerated, the body must be JSON.
  return t == "application/json" || t.ends_with("+json") || t == "application/x-www-form-urlencoded";
}

// ---------------------------------------------------------------------------------------------
// Upstream callbacks: HTTP/1.1 to a vLLM or SGLang server.
// ---------------------------------------------------------------------------------------------

ngx_int_t create_request(ngx_http_request_t* r) noexcept try {
  Ctx* ctx = get_ctx(r);
  if (ctx == nullptr || ctx->body == nullptr) return NGX_ERROR;
  ngx_http_upstream_t* u = r->upstream;
  const std::string& body = *ctx->body;
  std::string head = "POST ";
  if (!ctx->state->upstream_path.empty()) {
    head += ctx->state->upstream_path;
  } else {
    head.append(reinterpret_cast<const char*>(r->uri.data), r->uri.len);
  }
  if (r->args.len > 0) {
    head.push_back('?');
    head.append(reinterpret_cast<const char*>(r->args.data), r->args.len);
  }
  head += " HTTP/1.1\r\nHost: ";
  const ngx_str_t& host = u->conf->upstream->host;
  head.append(reinterpret_cast<const char*>(host.data), host.len);
  head += "\r\nContent-Type: application/json\r\nAccept: */*\r\nContent-Length: ";
  head += std::to_string(body.size());
  head += "\r\nX-Request-Id: " + ctx->state->request_id + "\r\n";
  const std::string auth = header_value(r, "Authorization");
  if (!auth.empty()) head += "Authorization: " + auth + "\r\n";
  head += "\r\n";

  auto* hb = ngx_create_temp_buf(r->pool, head.size());
  if (hb == nullptr) return NGX_ERROR;
  hb->last = ngx_cpymem(hb->pos, head.data(), head.size());
  auto* bb = static_cast<ngx_buf_t*>(ngx_calloc_buf(r->pool));
  if (bb == nullptr) return NGX_ERROR;
  bb->pos = reinterpret_cast<u_char*>(const_cast<char*>(body.data()));
  bb->last = bb->pos + body.size();
  // A retry rewinds pos to start (ngx_http_upstream_reinit): both ends must be set.
  bb->start = bb->pos;
  bb->end = bb->last;
  bb->memory = 1;
  ngx_chain_t* cl = ngx_alloc_chain_link(r->pool);
  ngx_chain_t* cl2 = ngx_alloc_chain_link(r->pool);
  if (cl == nullptr || cl2 == nullptr) return NGX_ERROR;
  cl->buf = hb;
  cl->next = cl2;
  cl2->buf = bb;
  cl2->next = nullptr;
  u->request_bufs = cl;
  return NGX_OK;
} catch (...) {
  log_exception(r->connection->log, "create_request");
  return NGX_ERROR;
}

ngx_int_t process_status_line(ngx_http_request_t* r) noexcept;

ngx_int_t reinit_request(ngx_http_request_t* r) noexcept {
  Ctx* ctx = get_ctx(r);
  if (ctx == nullptr) return NGX_OK;
  ctx->status = {};
  ctx->chunked = {};
  r->upstream->process_header = process_status_line;
  r->state = 0;
  return NGX_OK;
}

// The decode (or aggregated) leg's answer began: the request is decoding; a successful
// answer is scanned for token counts as it streams to the client.
void cancel_leg(ngx_http_request_t* leg_r) noexcept;

void decode_header_done(ngx_http_request_t* r) noexcept {
  Ctx* ctx = get_ctx(r);
  if (ctx == nullptr || ctx->state == nullptr) return;
  State& st = *ctx->state;
  const ngx_uint_t status = r->upstream->headers_in.status_n;
  // An engine that answers 5xx failed this request, whether or not nginx retries it
  // (connection errors and timeouts are counted when nginx releases the server).
  if (status >= NGX_HTTP_INTERNAL_SERVER_ERROR) {
    const std::int32_t backend = ctx->leg == Leg::kPrefill || st.lcf->mode == kModeAggregated
                                     ? st.prefill_backend
                                     : st.decode_backend;
    omni::SharedState* ss = shared_state();
    if (ss != nullptr && backend >= 0) ss->count_error(static_cast<std::uint16_t>(backend));
  }
  if (ctx->leg == Leg::kPrefill) {
    // Parallel P/D only needs to know the prefill succeeded: its answer is not kept (it may
    // hold every generated token).
    if (st.lcf->mode == kModeParallel && status == NGX_HTTP_OK) ctx->drain = true;
    return;
  }
  if (ctx->leg != Leg::kDecode || r != r->main) return;
  enter(st, omni::Stage::kDecoding);
  // A decode that answers with an error leaves no use for its parallel prefill, which would
  // otherwise wait for this decode in its bootstrap queue.
  if (status >= NGX_HTTP_BAD_REQUEST && st.prefill_sr != nullptr && !st.prefill_done) {
    cancel_leg(st.prefill_sr);
  }
  if (status == NGX_HTTP_OK && st.parsed) {
    try {
      st.scanner.emplace(st.parsed->features.stream);
      ctx->scanning = true;
    } catch (...) {
    }
  }
}

ngx_int_t process_header(ngx_http_request_t* r) noexcept {
  ngx_http_upstream_t* u = r->upstream;
  auto* umcf = static_cast<ngx_http_upstream_main_conf_t*>(
      ngx_http_get_module_main_conf(r, ngx_http_upstream_module));
  for (;;) {
    ngx_int_t rc = ngx_http_parse_header_line(r, &u->buffer, 1);
    if (rc == NGX_OK) {
      auto* h = static_cast<ngx_table_elt_t*>(ngx_list_push(&u->headers_in.headers));
      if (h == nullptr) return NGX_ERROR;
      h->hash = r->header_hash;
      h->key.len = static_cast<size_t>(r->header_name_end - r->header_name_start);
      h->value.len = static_cast<size_t>(r->header_end - r->header_start);
      h->key.data = static_cast<u_char*>(
          ngx_pnalloc(r->pool, h->key.len + 1 + h->value.len + 1 + h->key.len));
      if (h->key.data == nullptr) {
        h->hash = 0;
        return NGX_ERROR;
      }
      h->value.data = h->key.data + h->key.len + 1;
      h->lowcase_key = h->key.data + h->key.len + 1 + h->value.len + 1;
      ngx_memcpy(h->key.data, r->header_name_start, h->key.len);
      h->key.data[h->key.len] = '\0';
      ngx_memcpy(h->value.data, r->header_start, h->value.len);
      h->value.data[h->value.len] = '\0';
      if (h->key.len == r->lowcase_index) {
        ngx_memcpy(h->lowcase_key, r->lowcase_header, h->key.len);
      } else {
        ngx_strlow(h->lowcase_key, h->key.data, h->key.len);
      }
      auto* hh = static_cast<ngx_http_upstream_header_t*>(
          ngx_hash_find(&umcf->headers_in_hash, h->hash, h->lowcase_key, h->key.len));
      if (hh != nullptr && hh->handler(r, h, hh->offset) != NGX_OK) return NGX_ERROR;
      continue;
    }
    if (rc == NGX_HTTP_PARSE_HEADER_DONE) {
      if (u->headers_in.chunked) u->headers_in.content_length_n = -1;
      decode_header_done(r);
      if (u->headers_in.status_n == NGX_HTTP_NO_CONTENT ||
          u->headers_in.status_n == NGX_HTTP_NOT_MODIFIED ||
          (!u->headers_in.chunked && u->headers_in.content_length_n == 0)) {
        u->keepalive = !u->headers_in.connection_close;
      }
      return NGX_OK;
    }
    if (rc == NGX_AGAIN) return NGX_AGAIN;
    ngx_log_error(NGX_LOG_ERR, r->connection->log, 0, "omni_proxy: upstream sent an invalid header");
    return NGX_HTTP_UPSTREAM_INVALID_HEADER;
  }
}

ngx_int_t process_status_line(ngx_http_request_t* r) noexcept {
  Ctx* ctx = get_ctx(r);
  if (ctx == nullptr) return NGX_ERROR;
  ngx_http_upstream_t* u = r->upstream;
  ngx_int_t rc = ngx_http_parse_status_line(r, &u->buffer, &ctx->status);
  if (rc == NGX_AGAIN) return rc;
  if (rc == NGX_ERROR) {
    ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                  "omni_proxy: upstream sent no valid HTTP/1.x status line");
    return NGX_HTTP_UPSTREAM_INVALID_HEADER;
  }
  if (u->state != nullptr && u->state->status == 0) u->state->status = ctx->status.code;
  u->headers_in.status_n = ctx->status.code;
  const auto len = static_cast<size_t>(ctx->status.end - ctx->status.start);
  u->headers_in.status_line.len = len;
  u->headers_in.status_line.data = static_cast<u_char*>(ngx_pnalloc(r->pool, len));
  if (u->headers_in.status_line.data == nullptr) return NGX_ERROR;
  ngx_memcpy(u->headers_in.status_line.data, ctx->status.start, len);
  if (ctx->status.http_version < NGX_HTTP_VERSION_11) u->headers_in.connection_close = 1;
  u->process_header = process_header;
  return process_header(r);
}

// Body with a Content-Length, or until the connection closes.
ngx_int_t copy_filter(void* data, ssize_t bytes) noexcept {
  auto* r = static_cast<ngx_http_request_t*>(data);
  ngx_http_upstream_t* u = r->upstream;
  if (u->length == 0) {
    u->keepalive = 0;
    return NGX_OK;
  }
  ngx_chain_t** ll = &u->out_bufs;
  while (*ll != nullptr) ll = &(*ll)->next;
  ngx_chain_t* cl = ngx_chain_get_free_buf(r->pool, &u->free_bufs);
  if (cl == nullptr) return NGX_ERROR;
  *ll = cl;
  cl->buf->flush = 1;
  cl->buf->memory = 1;
  ngx_buf_t* b = &u->buffer;
  cl->buf->pos = b->last;
  b->last += bytes;
  cl->buf->last = b->last;
  cl->buf->tag = u->output.tag;
  if (u->length == -1) return NGX_OK;
  if (bytes > u->length) {
    cl->buf->last = cl->buf->pos + u->length;
    u->length = 0;
    u->keepalive = 0;
    return NGX_OK;
  }
  u->length -= bytes;
  if (u->length == 0) u->keepalive = !u->headers_in.connection_close;
  return NGX_OK;
}

// A chunked body (how the engines stream): decoded here, re-chunked by nginx for the client.
ngx_int_t chunked_filter(void* data, ssize_t bytes) noexcept {
  auto* r = static_cast<ngx_http_request_t*>(data);
  Ctx* ctx = get_ctx(r);
  if (ctx == nullptr) return NGX_ERROR;
  ngx_http_upstream_t* u = r->upstream;
  ngx_buf_t* buf = &u->buffer;
  buf->pos = buf->last;
  buf->last += bytes;
  ngx_chain_t** ll = &u->out_bufs;
  while (*ll != nullptr) ll = &(*ll)->next;
  for (;;) {
    ngx_int_t rc = ngx_http_parse_chunked(r, buf, &ctx->chunked);
    if (rc == NGX_OK) {
      ngx_chain_t* cl = ngx_chain_get_free_buf(r->pool, &u->free_bufs);
      if (cl == nullptr) return NGX_ERROR;
      *ll = cl;
      ll = &cl->next;
      ngx_buf_t* b = cl->buf;
      b->flush = 1;
      b->memory = 1;
      b->pos = buf->pos;
      b->tag = u->output.tag;
      if (buf->last - buf->pos >= ctx->chunked.size) {
        buf->pos += static_cast<size_t>(ctx->chunked.size);
        b->last = buf->pos;
        ctx->chunked.size = 0;
      } else {
        ctx->chunked.size -= buf->last - buf->pos;
        buf->pos = buf->last;
        b->last = buf->last;
      }
      continue;
    }
    if (rc == NGX_DONE) {
      u->keepalive = !u->headers_in.connection_close;
      u->length = 0;
      if (buf->pos != buf->last) u->keepalive = 0;
      break;
    }
    if (rc == NGX_AGAIN) break;
    ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                  "omni_proxy: upstream sent an invalid chunked response");
    return NGX_ERROR;
  }
  return NGX_OK;
}

ngx_int_t input_filter_init(void* data) noexcept {
  auto* r = static_cast<ngx_http_request_t*>(data);
  ngx_http_upstream_t* u = r->upstream;
  if (u->headers_in.status_n == NGX_HTTP_NO_CONTENT ||
      u->headers_in.status_n == NGX_HTTP_NOT_MODIFIED) {
    u->length = 0;
    u->keepalive = !u->headers_in.connection_close;
  } else if (u->headers_in.chunked) {
    u->input_filter = chunked_filter;
    u->length = 1;
  } else if (u->headers_in.content_length_n == 0) {
    u->length = 0;
    u->keepalive = !u->headers_in.connection_close;
  } else {
    u->length = u->headers_in.content_length_n;
  }
  return NGX_OK;
}

void abort_request(ngx_http_request_t*) noexcept {}

// Ends a leg's upstream request from outside: nginx then runs its own error path for that leg
// (no retry: tries is set to 1), which answers or ends the client's response.
void cancel_leg(ngx_http_request_t* leg_r) noexcept {
  ngx_http_upstream_t* u = leg_r->upstream;
  if (u == nullptr || u->cleanup == nullptr) return;  // not started, or already finalized
  if (Ctx* ctx = get_ctx(leg_r)) ctx->cancelled = true;
  u->peer.tries = 1;
  ngx_connection_t* c = u->peer.connection;
  if (c == nullptr || c->fd == NGX_INVALID_FILE) return;
  ::shutdown(c->fd, SHUT_RDWR);
  ngx_post_event(c->read, &ngx_posted_events);
  ngx_post_event(c->write, &ngx_posted_events);
}

// An error as one SSE event, for a stream that already started.
void send_sse_error(ngx_http_request_t* r, int status, const std::string& message) noexcept try {
  const std::string event =
      "data: " + omni::openai_error_body(status, message) + "\n\n";
  auto* b = ngx_create_temp_buf(r->pool, event.size());
  if (b == nullptr) return;
  b->last = ngx_cpymem(b->pos, event.data(), event.size());
  b->flush = 1;
  b->last_buf = 1;  // the chunked encoding ends properly; nginx then closes the connection
  ngx_chain_t out{b, nullptr};
  (void)ngx_http_output_filter(r, &out);
} catch (...) {
  log_exception(r->connection->log, "send_sse_error");
}

void finalize_request(ngx_http_request_t* r, ngx_int_t rc) noexcept {
  Ctx* ctx = get_ctx(r);
  if (ctx == nullptr || ctx->state == nullptr || ctx->leg != Leg::kDecode || r != r->main) return;
  State& st = *ctx->state;
  st.decode_done = true;
  const bool failed = rc == NGX_ERROR || rc >= NGX_HTTP_SPECIAL_RESPONSE;
  // Parallel P/D: a decode that failed leaves no use for its prefill.
  if (failed && st.prefill_sr != nullptr && !st.prefill_done) cancel_leg(st.prefill_sr);
  if (failed && rc != NGX_HTTP_CLIENT_CLOSED_REQUEST && rc != NGX_HTTP_REQUEST_TIME_OUT &&
      r->upstream->header_sent && !r->connection->error && st.parsed &&
      st.parsed->features.stream) {
    std::string why = st.error_message;
    if (why.empty()) {
      why = rc == NGX_HTTP_GATEWAY_TIME_OUT ? "the decode engine stopped answering in time"
                                            : "the decode engine failed while streaming";
    }
    const int status = rc == NGX_HTTP_GATEWAY_TIME_OUT ? 504 : 502;
    send_sse_error(r, status, why);
  }
}

// Sets up this request's leg: an upstream request to the leg's pool. The caller then starts it
// with ngx_http_upstream_init().
ngx_int_t prepare_leg(ngx_http_request_t* r, Ctx* ctx) {
  auto* lcf = static_cast<LocConf*>(ngx_http_get_module_loc_conf(r, ngx_http_omni_proxy_module));
  if (ngx_http_upstream_create(r) != NGX_OK) return NGX_HTTP_INTERNAL_SERVER_ERROR;
  ngx_http_upstream_t* u = r->upstream;
  u->conf = ctx->leg == Leg::kPrefill ? &lcf->prefill : &lcf->decode;
  ngx_str_set(&u->schema, "http://");
  u->output.tag = reinterpret_cast<ngx_buf_tag_t>(&ngx_http_omni_proxy_module);
  u->create_request = create_request;
  u->reinit_request = reinit_request;
  u->process_header = process_status_line;
  u->abort_request = abort_request;
  u->finalize_request = finalize_request;
  u->input_filter_init = input_filter_init;
  u->input_filter = copy_filter;
  u->input_filter_ctx = r;
  u->buffering = 0;  // stream as the engine produces, no proxy buffering
  r->state = 0;
  return NGX_OK;
}

// Sets up and starts the leg of a request whose body is already read. The upstream request then
// owns the request's last reference and finalizes it.
void start_leg(ngx_http_request_t* r, Ctx* ctx) {
  ngx_int_t rc = prepare_leg(r, ctx);
  if (rc != NGX_OK) {
    ngx_http_finalize_request(r, rc);
    return;
  }
  ngx_http_upstream_init(r);
}

// ---------------------------------------------------------------------------------------------
// P/D
// ---------------------------------------------------------------------------------------------

// The message of an engine's OpenAI-style error body, if it is one.
std::string engine_error_message(const std::string& body) {
  auto j = nlohmann::json::parse(body, nullptr, false);
  if (!j.is_object()) return {};
  if (j.contains("error") && j["error"].is_object() && j["error"].contains("message") &&
      j["error"]["message"].is_string()) {
    return j["error"]["message"].get<std::string>();
  }
  // SGLang: {"object": "error", "message": "...", "type": ..., "code": ...}
  if (j.contains("message") && j["message"].is_string()) return j["message"].get<std::string>();
  return {};
}

bool prefill_ok(const State& st) {
  return st.prefill_rc == NGX_OK && st.prefill_status == NGX_HTTP_OK;
}

// Why the prefill leg failed, for the client: timeout or failure, the engine's status and its
// own message when it sent one.
std::string prefill_failure(const State& st) {
  std::string why = st.prefill_rc == NGX_HTTP_GATEWAY_TIME_OUT ? "the prefill leg timed out"
                                                               : "the prefill leg failed";
  if (st.prefill_status != 0) why += " with HTTP " + std::to_string(st.prefill_status);
  const std::string msg = engine_error_message(st.prefill_response);
  if (!msg.empty()) why += ": " + msg;
  return why;
}

ngx_int_t prefill_done(ngx_http_request_t* sr, void* data, ngx_int_t rc) noexcept {
  auto* state = static_cast<State*>(data);
  state->prefill_done = true;
  state->prefill_rc = rc;
  state->prefill_status =
      sr->upstream != nullptr ? sr->upstream->headers_in.status_n : sr->headers_out.status;
  if (sr->out != nullptr && sr->out->buf != nullptr) {
    ngx_buf_t* b = sr->out->buf;
    try {
      state->prefill_response.assign(reinterpret_cast<const char*>(b->pos),
                                     static_cast<size_t>(b->last - b->pos));
    } catch (...) {
      state->prefill_rc = NGX_ERROR;
    }
  }
  if (state->lcf->mode == kModeParallel) {
    kv_prefill_done(state->kv);  // its tokens no longer queue on the prefill server
    if (state->scheduled) {
      sched_prefill_done(state->sched, prefill_ok(*state), std::nullopt, served_prefill(*state));
    }
    // The prefill's answer is drained; a failed prefill cancels the decode that waits on it.
    if (!prefill_ok(*state) && !state->decode_done) {
      try {
        state->error_message = prefill_failure(*state);
      } catch (...) {
      }
      cancel_leg(state->r);
    }
    return rc;
  }
  enter(*state, omni::Stage::kWaitingDecode);
  return rc;
}

// Sequential: the decode leg, with the prefill's kv_transfer_params, on `forced` (the decode
// scheduler's choice) or wherever the policy says (-1).
void start_decode(ngx_http_request_t* r, Ctx* ctx, std::int32_t forced) {
  State& st = *ctx->state;
  enter(st, omni::Stage::kDecodeScheduled);
  ctx->leg = Leg::kDecode;
  ctx->body = &st.decode_body;
  ctx->forced = forced;
  ctx->forced_retry = true;
  start_leg(r, ctx);
}

// The client request's write handler while the sequential prefill subrequest runs: continues
// with the decode leg once the prefill finished.
void after_prefill(ngx_http_request_t* r) noexcept try {
  Ctx* ctx = get_ctx(r);
  if (ctx == nullptr || !ctx->state->prefill_done) return;
  r->write_event_handler = ngx_http_request_empty_handler;
  State& st = *ctx->state;
  if (!prefill_ok(st) && st.scheduled) {
    sched_prefill_done(st.sched, false, std::nullopt, served_prefill(st));
  }
  if (!prefill_ok(st)) {
    // A client error the engine reported stays a client error.
    const ngx_uint_t status = st.prefill_status >= 400 && st.prefill_status < 500
                                  ? st.prefill_status
                              : st.prefill_rc == NGX_HTTP_GATEWAY_TIME_OUT
                                  ? NGX_HTTP_GATEWAY_TIME_OUT
                                  : NGX_HTTP_BAD_GATEWAY;
    ngx_http_finalize_request(r, send_error(r, status, prefill_failure(st)));
    return;
  }
  const std::optional<std::uint32_t> actual_cached = omni::cached_tokens_of(st.prefill_response);
  if (st.kv.keyed) {
    if (const Pool* pool = find_pool(st.lcf->prefill.upstream); pool != nullptr &&
                                                                  st.prefill_backend >= 0) {
      if (actual_cached) {
        kv_observe_cached(st.kv, *pool, st.prefill_backend - pool->base, *actual_cached,
                          st.kv.prompt_tokens);
      }
    }
    kv_prefill_done(st.kv);
  }
  auto kv = omni::extract_kv_transfer_params(st.prefill_response);
  if (!kv.ok()) {
    if (st.scheduled) sched_prefill_done(st.sched, false, std::nullopt, served_prefill(st));
    ngx_http_finalize_request(
        r, send_error(r, NGX_HTTP_BAD_GATEWAY, "the prefill leg answered: " + kv.error().message));
    return;
  }
  st.prefill_response.clear();
  st.prefill_response.shrink_to_fit();
  st.decode_body = omni::vllm_decode_body(*st.parsed, kv->has_value() ? &**kv : nullptr);
  if (st.scheduled) {
    // The decode scheduler picks the decode server when one has a slot.
    sched_prefill_done(st.sched, true, actual_cached, served_prefill(st));
    // Waiting for its decode server: the decision comes through on_change, even when the
    // scheduling worker (another process) has made it already.
    if (st.sched.waiting) {
      r->read_event_handler = ngx_http_test_reading;  // a client that leaves is noticed
      return;
    }
  }
  start_decode(r, ctx, -1);
} catch (...) {
  log_exception(r->connection->log, "after_prefill");
  ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
}

// Starts the prefill leg as a subrequest of the client request. `background`: it runs beside
// the client request's own leg (parallel) instead of before it (sequential).
bool start_prefill(ngx_http_request_t* r, State& st, const std::string* body, bool background,
                   std::int32_t forced, bool forced_retry = false) {
  auto* ps = static_cast<ngx_http_post_subrequest_t*>(
      ngx_palloc(r->pool, sizeof(ngx_http_post_subrequest_t)));
  if (ps == nullptr) return false;
  ps->handler = prefill_done;
  ps->data = &st;
  ngx_http_request_t* sr = nullptr;
  ngx_uint_t flags = NGX_HTTP_SUBREQUEST_IN_MEMORY | NGX_HTTP_SUBREQUEST_CLONE;
  if (background) flags |= NGX_HTTP_SUBREQUEST_BACKGROUND;
  if (ngx_http_subrequest(r, &r->uri, &r->args, &sr, ps, flags) != NGX_OK) return false;
  auto* sctx = new_ctx(r->pool);
  if (sctx == nullptr) return false;
  sctx->state = &st;
  sctx->leg = Leg::kPrefill;
  sctx->body = body;
  sctx->forced = forced;
  sctx->forced_retry = forced_retry;
  ngx_http_set_ctx(sr, sctx, ngx_http_omni_proxy_module);
  st.prefill_sr = sr;
  return true;
}

std::uint64_t random_room() {
  static std::mt19937_64 rng(std::random_device{}() ^
                             (static_cast<std::uint64_t>(ngx_pid) << 32) ^
                             static_cast<std::uint64_t>(ngx_current_msec));
  return rng() & omni::kMaxBootstrapRoom;
}

// Parallel P/D: picks the prefill server, names it in the body, starts both legs.
// `chosen` and `decode`: the scheduler's servers (-1: the policy chooses now).
void start_parallel(ngx_http_request_t* r, Ctx* ctx, std::int32_t chosen = -1,
                    std::int32_t decode = -1) {
  State& st = *ctx->state;
  const Pool* pool = find_pool(st.lcf->prefill.upstream);
  PeerChoice choice;
  choice.request_hash = st.request_hash;
  choice.lcf = st.lcf;
  choice.keys = st.prefix_keys ? &*st.prefix_keys : nullptr;
  choice.kv = &st.kv;
  const std::int32_t server =
      chosen >= 0 ? chosen : pool != nullptr ? choose_server(*pool, choice) : -1;
  if (server < 0) {
    ngx_http_finalize_request(
        r, send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE, "no prefill server is available", {}, 1));
    return;
  }
  const Pool::Server& p = pool->servers[static_cast<std::size_t>(server)];
  std::uint16_t port = 0;
  if (omni::SharedState* ss = shared_state()) {
    port = ss->bootstrap_port(static_cast<std::uint16_t>(pool->base + server));
  }
  if (port == 0) port = static_cast<std::uint16_t>(st.lcf->bootstrap_port);
  std::vector<std::uint64_t> rooms(st.parsed->features.batch_size);
  for (auto& room : rooms) room = random_room();
  auto body = omni::sglang_bootstrap_body(*st.parsed, p.host, port, rooms);
  if (!body.ok()) {
    ngx_http_finalize_request(r, send_json(r, static_cast<ngx_uint_t>(body.error().status),
                                           body.error().to_json()));
    return;
  }
  st.decode_body = std::move(*body);
  enter(st, omni::Stage::kPrefillScheduled);
  if (!start_prefill(r, st, &st.decode_body, true, server)) {
    ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
    return;
  }
  ctx->leg = Leg::kDecode;
  ctx->body = &st.decode_body;
  ctx->forced = decode;
  ctx->forced_retry = true;
  start_leg(r, ctx);
}

void sched_changed(void* data) noexcept;

// Runs the request's legs; it has its place (admitted, or no limit).
void proceed(ngx_http_request_t* r) noexcept try {
  Ctx* ctx = get_ctx(r);
  State& st = *ctx->state;
  enter(st, omni::Stage::kWaitingPrefill);
  if (sched_active(*st.lcf) && st.parsed && st.kv.keyed) {
    st.sched.on_change = sched_changed;
    st.sched.data = &st;
    st.sched.cached = st.sched_cached;
    SchedEnqueue e = sched_enqueue(*st.lcf, st.kv, sched_priority(r, st.parsed->features.priority),
                                   st.sched, r->connection->log);
    if (e.queued) {
      st.scheduled = true;
      st.sched_cached[0] = std::move(e.cached[0]);
      st.sched_cached[1] = std::move(e.cached[1]);
      r->read_event_handler = ngx_http_test_reading;  // a client that leaves is noticed
      return;
    }
    ngx_http_finalize_request(r, send_error(r, e.status, e.message, {}, e.retry_after_s));
    return;
  }
  switch (st.lcf->mode) {
    case kModeAggregated:
      enter(st, omni::Stage::kPrefillScheduled);
      ctx->leg = Leg::kDecode;
      // Forwarded as the client sent it, or with the proxy's token ids.
      ctx->body = st.upstream_body.empty() ? &st.client_body : &st.upstream_body;
      start_leg(r, ctx);
      return;
    case kModeParallel:
      start_parallel(r, ctx);
      return;
    default:
      break;
  }
  // Sequential: the prefill leg first; the decode leg starts in after_prefill.
  st.prefill_body = omni::vllm_prefill_body(*st.parsed);
  enter(st, omni::Stage::kPrefillScheduled);
  if (!start_prefill(r, st, &st.prefill_body, false, -1)) {
    ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
    return;
  }
  r->write_event_handler = after_prefill;
} catch (...) {
  log_exception(r->connection->log, "proceed");
  ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
}

// The scheduler decided for a waiting request (omni_proxy_schedule): start its legs on the
// chosen servers, or fail it with the scheduler's reason.
void sched_changed(void* data) noexcept {
  auto* st = static_cast<State*>(data);
  ngx_http_request_t* r = st->r;
  ngx_connection_t* c = r->connection;
  try {
    Ctx* ctx = get_ctx(r);
    const omni::sched::Decision d = sched_decision(st->sched);
    r->read_event_handler = ngx_http_block_reading;
    const bool aggregated = st->lcf->mode == kModeAggregated;
    const Pool* ppool = find_pool(aggregated ? st->lcf->decode.upstream : st->lcf->prefill.upstream);
    const Pool* dpool = aggregated ? nullptr : find_pool(st->lcf->decode.upstream);
    switch (d.valid ? d.state : omni::sched::State::kFree) {
      case omni::sched::State::kPrefill: {
        sched_acted(st->sched);
        if (ppool != nullptr) {
          kv_record_choice(*ppool, st->kv, 0, d.prefill_server, d.runner_up, d.reason,
                           d.expected_ms, d.runner_up_ms, st->sched_cached[0]);
        }
        if (st->lcf->mode == kModeParallel) {
          if (dpool != nullptr) {
            kv_record_choice(*dpool, st->kv, 1, d.decode_server, -1, 3, 0, 0,
                             st->sched_cached[1]);
          }
          start_parallel(r, ctx, d.prefill_server, d.decode_server);
        } else if (aggregated) {
          enter(*st, omni::Stage::kPrefillScheduled);
          ctx->leg = Leg::kDecode;
          ctx->body = st->upstream_body.empty() ? &st->client_body : &st->upstream_body;
          ctx->forced = d.prefill_server;
          ctx->forced_retry = true;
          start_leg(r, ctx);
        } else {
          st->prefill_body = omni::vllm_prefill_body(*st->parsed);
          enter(*st, omni::Stage::kPrefillScheduled);
          if (!start_prefill(r, *st, &st->prefill_body, false, d.prefill_server, true)) {
            ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
            break;
          }
          r->write_event_handler = after_prefill;
        }
        break;
      }
      case omni::sched::State::kDecode:  // sequential: the decode server was chosen
        sched_acted(st->sched);
        if (dpool != nullptr) {
          kv_record_choice(*dpool, st->kv, 1, d.decode_server, -1, 3, 0, 0, st->sched_cached[1]);
        }
        start_decode(r, ctx, d.decode_server);
        break;
      case omni::sched::State::kRefused:
        sched_cancel(st->sched);
        ngx_http_finalize_request(
            r, send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                          st->prefill_done ? "no decode server had room for the request in time; "
                                             "try again later"
                                           : "no prefill server can take the request; try again "
                                             "later",
                          {}, 1));
        break;
      case omni::sched::State::kQueued:
      case omni::sched::State::kDecodeQueued:
        break;  // nothing new
      default:
        sched_cancel(st->sched);
        ngx_http_finalize_request(
            r, send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                          st->sched.timed_out
                              ? "the scheduler did not decide for the request in time; try again"
                              : "the scheduler lost the request (a worker exited); try again",
                          {}, 1));
        break;
    }
  } catch (...) {
    log_exception(c->log, "scheduler decision");
    ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
  }
  ngx_http_run_posted_requests(c);
}

// ---------------------------------------------------------------------------------------------
// Wait queues
// ---------------------------------------------------------------------------------------------

// A wake-up from another worker: a place may be free in any group.
void dispatch_all_groups() noexcept {
  WaitQueues& q = wait_queues();
  for (std::size_t g = 0; g < q.groups.size(); ++g) dispatch_group(g);
}

void queue_tick(ngx_event_t*) noexcept {
  WaitQueues& q = wait_queues();
  for (std::size_t g = 0; g < q.groups.size(); ++g) dispatch_group(g);
  if (q.waiting > 0 && !q.tick.timer_set) ngx_add_timer(&q.tick, queue_tick_ms());
}

// Moves this worker's waiters of `group` into free in-flight places, oldest first.
void dispatch_group(std::size_t group) noexcept {
  WaitQueues& q = wait_queues();
  omni::SharedState* ss = shared_state();
  if (ss == nullptr || group >= q.groups.size()) return;
  ngx_queue_t* head = &q.groups[group];
  while (!ngx_queue_empty(head)) {
    State* st = ngx_queue_data(ngx_queue_head(head), State, queue);
    if (!ss->promote(ngx_pid, static_cast<std::uint16_t>(group),
                     static_cast<std::uint32_t>(st->lcf->max_inflight))) {
      break;
    }
    unlink_waiter(*st, Admitted::kInflight);
    ngx_http_request_t* r = st->r;
    r->read_event_handler = ngx_http_block_reading;
    ngx_connection_t* c = r->connection;
    proceed(r);
    ngx_http_run_posted_requests(c);
  }
}

void queue_timeout(ngx_event_t* ev) noexcept {
  auto* st = static_cast<State*>(ev->data);
  omni::SharedState* ss = shared_state();
  if (st->admitted != Admitted::kQueued) return;
  unlink_waiter(*st, Admitted::kNone);
  if (ss != nullptr) ss->unqueue(ngx_pid, static_cast<std::uint16_t>(st->lcf->group), true);
  ngx_http_request_t* r = st->r;
  ngx_connection_t* c = r->connection;
  r->read_event_handler = ngx_http_block_reading;
  ngx_http_finalize_request(
      r, send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                    "the request waited " + std::to_string(st->lcf->queue_timeout) +
                        " ms in the queue without getting a place; try again later",
                    {}, 1));
  ngx_http_run_posted_requests(c);
}

// Admits the request to its location's limit group: runs it, queues it, or refuses it (429).
void admit(ngx_http_request_t* r, State& st) {
  omni::SharedState* ss = shared_state();
  const LocConf& lcf = *st.lcf;
  if (lcf.group < 0 || ss == nullptr) {
    proceed(r);
    return;
  }
  const auto group = static_cast<std::uint16_t>(lcf.group);
  switch (ss->admit(ngx_pid, group, static_cast<std::uint32_t>(lcf.max_inflight),
                    static_cast<std::uint32_t>(lcf.max_queue))) {
    case omni::Admission::kAdmitted:
      st.admitted = Admitted::kInflight;
      proceed(r);
      return;
    case omni::Admission::kRejected:
      ngx_http_finalize_request(
          r, send_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                        "too many requests: " + std::to_string(lcf.max_inflight) +
                            " in flight and " + std::to_string(lcf.max_queue) +
                            " waiting; try again later",
                        {}, 1));
      return;
    case omni::Admission::kQueued:
      break;
  }
  WaitQueues& q = wait_queues();
  if (q.groups.empty()) {
    // Sized once per worker: queued requests point at their group's sentinel.
    const Registry* reg = registry();
    q.groups.resize(reg != nullptr ? reg->groups.size() : 0);
    for (ngx_queue_t& g : q.groups) {
      ngx_queue_init(&g);
    }
  }
  if (group >= q.groups.size()) {
    ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
    return;
  }
  st.admitted = Admitted::kQueued;
  ngx_queue_insert_tail(&q.groups[group], &st.queue);
  ++q.waiting;
  enter(st, omni::Stage::kWaitingPrefill);
  st.queue_timer.handler = queue_timeout;
  st.queue_timer.data = &st;
  st.queue_timer.log = r->connection->log;
  ngx_add_timer(&st.queue_timer, lcf.queue_timeout);
  if (q.kick.handler == nullptr) {
    q.kick.handler = queue_tick;
    q.kick.log = ngx_cycle->log;
    q.kick.data = &q;
  }
  if (!q.tick.timer_set) {
    q.tick.handler = queue_tick;
    q.tick.log = ngx_cycle->log;
    q.tick.data = &q;
    q.tick.cancelable = 1;
    ngx_add_timer(&q.tick, queue_tick_ms());
    notify_subscribe(dispatch_all_groups);
  }
  // A client that hangs up while waiting is noticed, and its request finalized (499).
  r->read_event_handler = ngx_http_test_reading;
}

// ---------------------------------------------------------------------------------------------
// Tokenizing, in nginx's thread pool
// ---------------------------------------------------------------------------------------------

// The work handed to a thread: it owns its inputs (the parsed body is moved in and back), so the
// thread touches no request memory. The request is blocked (r->main->blocked) meanwhile, which
// keeps it, its pool and its State alive whatever happens to the client.
struct TokenizeJob {
  omni::ParsedBody body;
  const TokenizerEntry* entry = nullptr;
  omni::ForwardingOptions options;
  std::optional<omni::BodyResult<omni::TokenizedRequest>> result;
  std::string failure;  // an exception's message
  std::uint64_t wall_ns = 0;
  std::uint64_t cpu_ns = 0;
};

std::uint64_t thread_cpu_ns() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000'000ULL +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

// Runs in a thread-pool thread.
void tokenize_thread(void* data, ngx_log_t*) noexcept {
  TokenizeJob* job = *static_cast<TokenizeJob**>(data);
  const std::uint64_t cpu0 = thread_cpu_ns();
  const std::uint64_t t0 = omni::monotonic_now_ns();
  try {
    job->result.emplace(omni::tokenize_request(job->body, *job->entry->tokenizer,
                                               job->entry->chat.get(), job->options));
  } catch (const std::exception& e) {
    try {
      job->failure = e.what();
    } catch (...) {
    }
  } catch (...) {
    job->failure = "unknown exception";
  }
  if (job->failure.empty() && !job->result) job->failure = "no result";
  job->wall_ns = omni::monotonic_now_ns() - t0;
  job->cpu_ns = thread_cpu_ns() - cpu0;
}

void tokenized(ngx_http_request_t* r) noexcept;
void after_tokenize(ngx_http_request_t* r, State& st);

// Back on the event loop: the thread finished.
void tokenize_event(ngx_event_t* ev) noexcept {
  auto* r = static_cast<ngx_http_request_t*>(ev->data);
  ngx_connection_t* c = r->connection;
  Ctx* ctx = get_ctx(r);
  State& st = *ctx->state;
  TokenizeJob* job = st.job;
  st.job = nullptr;
  r->main->blocked--;
  r->aio = 0;
  // The job's outcome moves into the State's parsed body and fields read by tokenized().
  try {
    st.parsed.emplace(std::move(job->body));
  } catch (...) {
  }
  st.tokenize_wall_ns = job->wall_ns;
  omni::SharedState* ss = shared_state();
  bool ok = job->failure.empty() && job->result && job->result->ok();
  if (!ok) {
    if (ss != nullptr) ss->count_tokenize_error();
    try {
      if (!job->failure.empty()) {
        ngx_log_error(NGX_LOG_ALERT, c->log, 0, "omni_proxy: tokenizing failed: %s",
                      job->failure.c_str());
        st.tokenize_status = NGX_HTTP_INTERNAL_SERVER_ERROR;
        st.tokenize_error = omni::openai_error_body(500, "the proxy could not tokenize the request");
      } else {
        st.tokenize_status = static_cast<ngx_uint_t>(job->result->error().status);
        st.tokenize_error = job->result->error().to_json();
      }
    } catch (...) {
      st.tokenize_status = NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
  } else {
    omni::TokenizedRequest& t = job->result->value();
    st.prompt_tokens = t.prompt_tokens;
    st.forward_reason = static_cast<std::int32_t>(t.reason);
    st.chat_to_completion = t.chat_to_completion;
    if (ss != nullptr) {
      ss->count_tokenized(t.prompt_tokens, job->wall_ns, job->cpu_ns,
                          static_cast<std::uint8_t>(t.reason));
    }
    if (t.upstream) {
      try {
        if (t.upstream_api != st.api) {
          // The client's path with the API's suffix swapped (a location may add a prefix).
          std::string path(reinterpret_cast<const char*>(r->uri.data), r->uri.len);
          path.resize(path.size() - omni::api_path(st.api).size());
          path += omni::api_path(t.upstream_api);
          st.upstream_path = std::move(path);
        }
        st.upstream_body = std::move(t.upstream_text);
        st.parsed.emplace(std::move(*t.upstream));
      } catch (...) {
        st.tokenize_status = NGX_HTTP_INTERNAL_SERVER_ERROR;
      }
    }
  }
  delete job;
  r->write_event_handler(r);
  ngx_http_run_posted_requests(c);
}

// Hands the request to the location's thread pool; tokenized() continues it.
void start_tokenize(ngx_http_request_t* r, State& st) {
  auto* job = new TokenizeJob();
  job->entry = st.lcf->tokenizer;
  job->options.forward = st.lcf->token_forwarding != 0;
  job->options.engine =
      st.lcf->engine == kEngineSglang ? omni::EngineFlavor::kSglang : omni::EngineFlavor::kVllm;
  ngx_thread_task_t* task = ngx_thread_task_alloc(r->pool, sizeof(TokenizeJob*));
  if (task == nullptr) {
    delete job;
    ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
    return;
  }
  job->body = std::move(*st.parsed);
  st.parsed.reset();
  *static_cast<TokenizeJob**>(task->ctx) = job;
  task->handler = tokenize_thread;
  task->event.data = r;
  task->event.handler = tokenize_event;
  if (ngx_thread_task_post(st.lcf->thread_pool, task) != NGX_OK) {
    // The pool's queue is full (thread_pool max_queue): nginx logged it.
    st.parsed.emplace(std::move(job->body));
    delete job;
    ngx_http_finalize_request(
        r, send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                      "the proxy's tokenizer queue is full; try again later", {}, 1));
    return;
  }
  st.job = job;
  r->main->blocked++;
  r->aio = 1;
  r->write_event_handler = tokenized;
}

// The request continues once its prompt is tokenized (or needed no tokenizing).
void tokenized(ngx_http_request_t* r) noexcept try {
  Ctx* ctx = get_ctx(r);
  State& st = *ctx->state;
  // A write event of the client connection while the thread still works (nginx calls the
  // write handler whenever the connection is writable): nothing to do yet.
  if (st.job != nullptr) return;
  r->write_event_handler = ngx_http_request_empty_handler;
  if (st.tokenize_status == 0 && !st.parsed) st.tokenize_status = NGX_HTTP_INTERNAL_SERVER_ERROR;
  if (st.tokenize_status != 0) {
    // A template that refused the conversation is the request's fault (4xx, the core's
    // OpenAI-style body); anything else is ours.
    if (st.tokenize_error.empty()) {
      ngx_http_finalize_request(r, send_error(r, st.tokenize_status,
                                              "the proxy could not tokenize the request"));
      return;
    }
    ngx_http_finalize_request(r, send_json(r, st.tokenize_status, st.tokenize_error));
    return;
  }
  after_tokenize(r, st);
} catch (...) {
  log_exception(r->connection->log, "tokenized");
  ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
}

// ---------------------------------------------------------------------------------------------
// The client request
// ---------------------------------------------------------------------------------------------

// Tokenized (or not tokenizing): the lifecycle moves on and the request asks for its place.
void after_tokenize(ngx_http_request_t* r, State& st) {
  // The cache-aware rule keys the prompt as the engines will see it (token ids when the proxy
  // tokenized it). The APC match stage proper is not implemented yet: it takes no time.
  if (st.lcf->policy == kPolicyCacheAware && st.parsed && st.lcf->prefix != nullptr) {
    st.prefix_keys.emplace(omni::prefix_keys_of(*st.parsed, *st.lcf->prefix));
  }
  if ((st.lcf->policy == kPolicyKvAware || sched_active(*st.lcf)) && st.parsed) {
    kv_key_request(*st.lcf, *st.parsed, st.prompt_tokens, st.kv);
  }
  const std::uint64_t now = omni::monotonic_now_ns();
  enter(st, omni::Stage::kTokenized, now);
  enter(st, omni::Stage::kApcMatched, now);
  enter(st, omni::Stage::kWaitingPrefill, now);
  admit(r, st);
}

void body_ready(ngx_http_request_t* r) noexcept try {
  Ctx* ctx = get_ctx(r);
  State& st = *ctx->state;
  if (!collect_body(r, st.client_body)) {
    ngx_http_finalize_request(r, send_error(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                            "could not read the request body"));
    return;
  }
  omni::ParseOptions options;
  options.max_body_bytes = st.lcf->max_body_size;
  auto parsed = omni::parse_request_body(st.api, st.client_body, options);
  if (!parsed.ok()) {
    ngx_http_finalize_request(r, send_json(r, static_cast<ngx_uint_t>(parsed.error().status),
                                           parsed.error().to_json()));
    return;
  }
  st.parsed.emplace(std::move(*parsed));
  if (st.lcf->tokenizer != nullptr) {
    start_tokenize(r, st);
    return;
  }
  after_tokenize(r, st);
} catch (...) {
  log_exception(r->connection->log, "body_ready");
  ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
}

std::optional<omni::Api> api_for(const ngx_str_t& uri) {
  std::string_view path(reinterpret_cast<const char*>(uri.data), uri.len);
  for (omni::Api api : {omni::Api::kChatCompletions, omni::Api::kCompletions, omni::Api::kGenerate}) {
    std::string_view want = omni::api_path(api);
    if (path.size() >= want.size() && path.substr(path.size() - want.size()) == want) return api;
  }
  return std::nullopt;
}

// nginx's own error pages for our requests become OpenAI-style JSON.
ngx_http_output_header_filter_pt next_header_filter;
ngx_http_output_body_filter_pt next_body_filter;

// A chat request the engines answer as a completion: the answer is converted on its way out, so
// its length changes.
void start_converting(ngx_http_request_t* r, Ctx* ctx) {
  State& st = *ctx->state;
  if (!st.chat_to_completion || ctx->leg != Leg::kDecode || r->upstream == nullptr ||
      r->headers_out.status != NGX_HTTP_OK || ctx->converting) {
    return;
  }
  ctx->converting = true;
  r->headers_out.content_length_n = -1;
  if (r->headers_out.content_length != nullptr) {
    r->headers_out.content_length->hash = 0;
    r->headers_out.content_length = nullptr;
  }
  if (st.parsed && st.parsed->features.stream) {
    st.converter.emplace(st.lcf->engine == kEngineSglang ? omni::EngineFlavor::kSglang
                                                         : omni::EngineFlavor::kVllm);
  }
}

// omni_proxy_route_header: the servers that served the request, on the client's answer.
ngx_int_t add_route_headers(ngx_http_request_t* r, const State& st) {
  const std::string values[] = {backend_name(st.prefill_backend), backend_name(st.decode_backend),
                                kv_explain_text(st.kv.pools[0], st.kv.route[0]),
                                kv_explain_text(st.kv.pools[1], st.kv.route[1])};
  const char* const names[] = {"X-Omni-Prefill-Peer", "X-Omni-Decode-Peer", "X-Omni-Prefill-Route",
                               "X-Omni-Decode-Route"};
  for (std::size_t k = 0; k < 4; ++k) {
    const char* name = names[k];
    const std::string& value = values[k];
    if (value.empty()) continue;
    auto* h = static_cast<ngx_table_elt_t*>(ngx_list_push(&r->headers_out.headers));
    if (h == nullptr) return NGX_ERROR;
    h->hash = 1;
    h->key.data = reinterpret_cast<u_char*>(const_cast<char*>(name));
    h->key.len = std::strlen(name);
    h->value.data = static_cast<u_char*>(ngx_pnalloc(r->pool, value.size()));
    if (h->value.data == nullptr) return NGX_ERROR;
    ngx_memcpy(h->value.data, value.data(), value.size());
    h->value.len = value.size();
  }
  return NGX_OK;
}

ngx_int_t header_filter(ngx_http_request_t* r) noexcept try {
  if (r == r->main) {
    Ctx* ctx = get_ctx(r);
    if (ctx != nullptr && ctx->state != nullptr) {
      start_converting(r, ctx);
      if (ctx->state->lcf->route_header && add_route_headers(r, *ctx->state) != NGX_OK) {
        return NGX_ERROR;
      }
    }
  }
  // Requests of omni_proxy locations, whether or not our handler ran yet: nginx checks some
  // limits (client_max_body_size) before any content handler.
  auto* lcf = static_cast<LocConf*>(ngx_http_get_module_loc_conf(r, ngx_http_omni_proxy_module));
  if (r != r->main) {
    // A drained answer takes no room in the subrequest's in-memory buffer, whatever its size.
    Ctx* sctx = get_ctx(r);
    if (sctx != nullptr && sctx->drain) r->headers_out.content_length_n = -1;
    return next_header_filter(r);
  }
  if (lcf == nullptr || !lcf->enable || r->err_status < 400) {
    return next_header_filter(r);
  }
  Ctx* ctx = get_ctx(r);
  if (ctx == nullptr) {
    ctx = new_ctx(r->pool);
    if (ctx == nullptr) return NGX_ERROR;
    ngx_http_set_ctx(r, ctx, ngx_http_omni_proxy_module);
  }
  const auto status = static_cast<int>(r->err_status);
  std::string message;
  if (ctx->state != nullptr && !ctx->state->error_message.empty()) {
    message = ctx->state->error_message;
  } else {
    switch (status) {
      case NGX_HTTP_BAD_GATEWAY: message = "the engine could not be reached or failed"; break;
      case NGX_HTTP_GATEWAY_TIME_OUT: message = "the engine did not answer in time"; break;
      case NGX_HTTP_REQUEST_ENTITY_TOO_LARGE: message = "the request body is too large"; break;
      default: message = "the request failed with HTTP " + std::to_string(status); break;
    }
  }
  const std::string body = omni::openai_error_body(status, message);
  ctx->json_error.data = static_cast<u_char*>(ngx_pnalloc(r->pool, body.size()));
  if (ctx->json_error.data == nullptr) return NGX_ERROR;
  ngx_memcpy(ctx->json_error.data, body.data(), body.size());
  ctx->json_error.len = body.size();
  r->headers_out.content_length_n = static_cast<off_t>(body.size());
  if (r->headers_out.content_length != nullptr) {
    r->headers_out.content_length->hash = 0;
    r->headers_out.content_length = nullptr;
  }
  ngx_str_set(&r->headers_out.content_type, "application/json");
  r->headers_out.content_type_len = r->headers_out.content_type.len;
  r->headers_out.content_type_lowcase = nullptr;
  return next_header_filter(r);
} catch (...) {
  log_exception(r->connection->log, "header_filter");
  return NGX_ERROR;
}

// Notes the first output byte (TTFT) and feeds the token scanner.
void observe_body(State& st, ngx_chain_t* in) noexcept {
  for (ngx_chain_t* cl = in; cl != nullptr; cl = cl->next) {
    ngx_buf_t* b = cl->buf;
    if (b == nullptr || b->in_file || b->last <= b->pos) continue;
    // Aggregated: the first bytes of the answer end the prefill, for the scheduler.
    if (st.scheduled && !st.sched_first_token && st.lcf->mode == kModeAggregated) {
      st.sched_first_token = true;
      // A whole (non-streamed) answer comes at the end of the generation: its time says
      // nothing of the prefill step, so it does not feed the step model.
      const bool stream = st.parsed && st.parsed->features.stream;
      sched_prefill_done(st.sched, true, std::nullopt, stream ? served_prefill(st) : -1);
    }
    // TTFT and TPOT describe streams: a whole answer arrives at once.
    if (st.first_token_ns == 0 && st.parsed && st.parsed->features.stream) {
      st.first_token_ns = omni::monotonic_now_ns();
      if (st.lcf->mode == kModeAggregated) kv_prefill_done(st.kv);
      if (st.slot) {
        if (omni::SharedState* ss = shared_state()) ss->set_first_token(*st.slot, st.first_token_ns);
      }
    }
    try {
      st.scanner->feed(std::string_view(reinterpret_cast<const char*>(b->pos),
                                        static_cast<std::size_t>(b->last - b->pos)));
    } catch (...) {
    }
  }
}

// A non-streamed answer larger than this goes out unconverted rather than held without bound.
constexpr std::size_t kMaxConvertedAnswer = std::size_t{64} << 20;

// Converts the decode leg's completion answer into the chat answer the client asked for.
ngx_int_t convert_body(ngx_http_request_t* r, Ctx* ctx, ngx_chain_t* in) noexcept try {
  State& st = *ctx->state;
  const omni::EngineFlavor engine =
      st.lcf->engine == kEngineSglang ? omni::EngineFlavor::kSglang : omni::EngineFlavor::kVllm;
  std::string out;
  bool last = false;
  bool flush = false;
  for (ngx_chain_t* cl = in; cl != nullptr; cl = cl->next) {
    ngx_buf_t* b = cl->buf;
    last = last || b->last_buf;
    flush = flush || b->flush;
    if (b->in_file || b->last <= b->pos) continue;
    const std::string_view data(reinterpret_cast<const char*>(b->pos),
                                static_cast<std::size_t>(b->last - b->pos));
    if (st.converter) {
      st.converter->feed(data, out);
    } else if (st.whole_answer.size() + data.size() <= kMaxConvertedAnswer) {
      st.whole_answer.append(data);
    } else {
      out += st.whole_answer;
      out += data;
      st.whole_answer.clear();
      st.chat_to_completion = false;
    }
    b->pos = b->last;
  }
  if (last) {
    if (st.converter) {
      st.converter->finish(out);
    } else if (!st.whole_answer.empty()) {
      out += omni::chat_response_from_completion(st.whole_answer, engine);
      st.whole_answer.clear();
    }
  }
  if (out.empty() && !last && !flush) return next_body_filter(r, nullptr);
  const auto tag = reinterpret_cast<ngx_buf_tag_t>(&ngx_http_omni_proxy_module);
  ngx_chain_t* cl = ngx_chain_get_free_buf(r->pool, &ctx->conv_free);
  if (cl == nullptr) return NGX_ERROR;
  ngx_buf_t* b = cl->buf;
  if (!out.empty() && (b->start == nullptr || static_cast<std::size_t>(b->end - b->start) < out.size())) {
    const std::size_t cap = std::max<std::size_t>(out.size(), 4096);
    b->start = static_cast<u_char*>(ngx_palloc(r->pool, cap));
    if (b->start == nullptr) return NGX_ERROR;
    b->end = b->start + cap;
  }
  b->pos = b->start;
  b->last = out.empty() ? b->start : ngx_cpymem(b->start, out.data(), out.size());
  b->temporary = out.empty() ? 0 : 1;
  b->memory = 0;
  b->flush = 1;
  b->last_buf = last ? 1 : 0;
  b->tag = tag;
  cl->next = nullptr;
  ngx_chain_t* chain = cl;
  const ngx_int_t rc = next_body_filter(r, chain);
  ngx_chain_update_chains(r->pool, &ctx->conv_free, &ctx->conv_busy, &chain, tag);
  return rc;
} catch (...) {
  log_exception(r->connection->log, "convert_body");
  return NGX_ERROR;
}

ngx_int_t body_filter(ngx_http_request_t* r, ngx_chain_t* in) noexcept {
  Ctx* ctx = get_ctx(r);
  if (ctx == nullptr) return next_body_filter(r, in);
  if (r != r->main) {
    if (!ctx->drain) return next_body_filter(r, in);
    // Data is consumed here; only the special buffers (flush, last) go on, so the subrequest
    // still completes.
    ngx_chain_t* out = nullptr;
    ngx_chain_t** ll = &out;
    for (ngx_chain_t* cl = in; cl != nullptr; cl = cl->next) {
      if (ngx_buf_special(cl->buf)) {
        ngx_chain_t* link = ngx_alloc_chain_link(r->pool);
        if (link == nullptr) return NGX_ERROR;
        link->buf = cl->buf;
        *ll = link;
        ll = &link->next;
      } else {
        cl->buf->pos = cl->buf->last;
      }
    }
    *ll = nullptr;
    return out != nullptr ? next_body_filter(r, out) : NGX_OK;
  }
  if (ctx->json_error.len == 0) {
    if (ctx->scanning && ctx->state != nullptr && ctx->state->scanner) observe_body(*ctx->state, in);
    if (ctx->converting && ctx->state != nullptr && ctx->state->chat_to_completion) {
      return convert_body(r, ctx, in);
    }
    return next_body_filter(r, in);
  }
  for (ngx_chain_t* cl = in; cl != nullptr; cl = cl->next) cl->buf->pos = cl->buf->last;
  if (ctx->json_error_sent) return NGX_OK;
  ctx->json_error_sent = true;
  auto* b = static_cast<ngx_buf_t*>(ngx_calloc_buf(r->pool));
  if (b == nullptr) return NGX_ERROR;
  b->pos = ctx->json_error.data;
  b->last = ctx->json_error.data + ctx->json_error.len;
  b->memory = 1;
  b->last_buf = 1;
  ngx_chain_t out{b, nullptr};
  return next_body_filter(r, &out);
}

// The log phase of our requests: the lifecycle ends before the access log reads it.
ngx_int_t log_handler(ngx_http_request_t* r) noexcept {
  if (r != r->main) return NGX_OK;
  Ctx* ctx = get_ctx(r);
  if (ctx != nullptr && ctx->state != nullptr) finish(*ctx->state);
  return NGX_OK;
}

std::uint64_t hash_id(const std::string& id) {
  return std::hash<std::string>{}(id);
}

}  // namespace

ngx_int_t proxy_handler(ngx_http_request_t* r) noexcept try {
  if (r != r->main) {
    // One of our leg subrequests (cloned from the client request).
    Ctx* ctx = get_ctx(r);
    if (ctx == nullptr || ctx->leg == Leg::kNone) return NGX_HTTP_INTERNAL_SERVER_ERROR;
    ngx_int_t rc = prepare_leg(r, ctx);
    if (rc != NGX_OK) return rc;
    // As proxy_pass does: the body is the parent's, already read; this starts the upstream and
    // balances the request's reference count.
    rc = ngx_http_read_client_request_body(r, ngx_http_upstream_init);
    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) return rc;
    return NGX_DONE;
  }
  auto* lcf = static_cast<LocConf*>(ngx_http_get_module_loc_conf(r, ngx_http_omni_proxy_module));
  auto* cln = ngx_pool_cleanup_add(r->pool, 0);
  auto* ctx = new_ctx(r->pool);
  if (cln == nullptr || ctx == nullptr) return NGX_HTTP_INTERNAL_SERVER_ERROR;
  ctx->state = new State();
  cln->handler = destroy_state;
  cln->data = ctx->state;
  ngx_http_set_ctx(r, ctx, ngx_http_omni_proxy_module);
  State& st = *ctx->state;
  st.r = r;
  st.lcf = lcf;
  st.request_id = request_id(r);
  st.request_hash = hash_id(st.request_id);
  st.timeline.enter(omni::Stage::kReceived, omni::monotonic_now_ns());

  auto api = api_for(r->uri);
  if (!api) {
    return send_error(r, NGX_HTTP_NOT_FOUND,
                      "omni_proxy serves /v1/completions, /v1/chat/completions and /generate");
  }
  if (lcf->mode == kModeSequential && *api == omni::Api::kGenerate) {
    return send_error(r, NGX_HTTP_NOT_FOUND,
                      "sequential P/D serves /v1/completions and /v1/chat/completions");
  }
  st.api = *api;
  if (r->method != NGX_HTTP_POST) {
    ngx_int_t rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) return rc;
    return send_error(r, NGX_HTTP_NOT_ALLOWED, "only POST is allowed here");
  }
  if (!acceptable_content_type(r)) {
    ngx_int_t rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) return rc;
    return send_error(r, NGX_HTTP_UNSUPPORTED_MEDIA_TYPE, "the body must be application/json");
  }
  if (r->headers_in.content_length_n > static_cast<off_t>(lcf->max_body_size)) {
    ngx_int_t rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) return rc;
    return send_error(r, NGX_HTTP_REQUEST_ENTITY_TOO_LARGE,
                      "the request body is larger than " + std::to_string(lcf->max_body_size) +
                          " bytes");
  }
  // A slot of the shared state: the hard bound on requests in flight over all workers.
  if (omni::SharedState* ss = shared_state()) {
    st.slot = ss->acquire(ngx_pid, st.timeline.at_ns(omni::Stage::kReceived), st.request_hash);
    if (!st.slot) {
      ngx_int_t rc = ngx_http_discard_request_body(r);
      if (rc != NGX_OK) return rc;
      return send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                        "all " + std::to_string(ss->capacity()) +
                            " request slots of the proxy are in use; try again later",
                        {}, 1);
    }
  }
  ngx_int_t rc = ngx_http_read_client_request_body(r, body_ready);
  if (rc >= NGX_HTTP_SPECIAL_RESPONSE) return rc;
  return NGX_DONE;
} catch (...) {
  log_exception(r->connection->log, "omni_proxy");
  return NGX_HTTP_INTERNAL_SERVER_ERROR;
}

ngx_int_t send_json(ngx_http_request_t* r, ngx_uint_t status, std::string_view body) {
  return send_body(r, status, "application/json", body);
}

ngx_int_t send_body(ngx_http_request_t* r, ngx_uint_t status, std::string_view content_type,
                    std::string_view body) {
  r->headers_out.status = status;
  r->headers_out.content_length_n = static_cast<off_t>(body.size());
  r->headers_out.content_type.data =
      reinterpret_cast<u_char*>(const_cast<char*>(content_type.data()));
  r->headers_out.content_type.len = content_type.size();
  r->headers_out.content_type_len = r->headers_out.content_type.len;
  r->headers_out.content_type_lowcase = nullptr;
  ngx_int_t rc = ngx_http_send_header(r);
  if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) return rc;
  auto* b = ngx_create_temp_buf(r->pool, body.size() + 1);
  if (b == nullptr) return NGX_ERROR;
  b->last = ngx_cpymem(b->pos, body.data(), body.size());
  b->last_buf = (r == r->main) ? 1 : 0;
  b->last_in_chain = 1;
  ngx_chain_t out{b, nullptr};
  return ngx_http_output_filter(r, &out);
}

ngx_int_t install_filters(ngx_conf_t* cf) noexcept {
  next_header_filter = ngx_http_top_header_filter;
  ngx_http_top_header_filter = header_filter;
  next_body_filter = ngx_http_top_body_filter;
  ngx_http_top_body_filter = body_filter;
  // Our log handler goes first in the log phase, before the access log reads our variables.
  auto* cmcf = static_cast<ngx_http_core_main_conf_t*>(
      ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module));
  ngx_array_t& handlers = cmcf->phases[NGX_HTTP_LOG_PHASE].handlers;
  auto* h = static_cast<ngx_http_handler_pt*>(ngx_array_push(&handlers));
  if (h == nullptr) return NGX_ERROR;
  auto* elts = static_cast<ngx_http_handler_pt*>(handlers.elts);
  for (ngx_uint_t i = handlers.nelts - 1; i > 0; --i) elts[i] = elts[i - 1];
  elts[0] = log_handler;
  return NGX_OK;
}

void proxy_exit_process() noexcept {
  WaitQueues& q = wait_queues();
  if (q.tick.timer_set) ngx_del_timer(&q.tick);
  if (q.kick.posted) {
    ngx_delete_posted_event(&q.kick);  // a multi-statement macro
  }
}

std::string header_value(ngx_http_request_t* r, std::string_view name) {
  ngx_list_part_t* part = &r->headers_in.headers.part;
  auto* h = static_cast<ngx_table_elt_t*>(part->elts);
  for (ngx_uint_t i = 0;; ++i) {
    if (i >= part->nelts) {
      if (part->next == nullptr) break;
      part = part->next;
      h = static_cast<ngx_table_elt_t*>(part->elts);
      i = 0;
    }
    if (h[i].hash != 0 && h[i].key.len == name.size() &&
        ngx_strncasecmp(h[i].key.data, reinterpret_cast<u_char*>(const_cast<char*>(name.data())),
                        name.size()) == 0) {
      return std::string(reinterpret_cast<const char*>(h[i].value.data), h[i].value.len);
    }
  }
  return {};
}

// --- Hooks for the balancer and the variables --------------------------------------------------

bool leg_choice(ngx_http_request_t* r, PeerChoice& out) noexcept {
  Ctx* ctx = get_ctx(r);
  if (ctx == nullptr || ctx->state == nullptr || ctx->leg == Leg::kNone) return false;
  out.request_hash = ctx->state->request_hash;
  out.forced = ctx->forced;
  out.forced_retry = ctx->forced_retry;
  out.lcf = ctx->state->lcf;
  out.keys = ctx->state->prefix_keys ? &*ctx->state->prefix_keys : nullptr;
  out.kv = &ctx->state->kv;
  out.decode_leg = ctx->leg == Leg::kDecode && ctx->state->lcf->mode != kModeAggregated;
  return true;
}

void leg_peer_chosen(ngx_http_request_t* r, const Pool& pool, std::int32_t server) noexcept {
  Ctx* ctx = get_ctx(r);
  if (ctx == nullptr || ctx->state == nullptr || server < 0) return;
  State& st = *ctx->state;
  const std::int32_t backend = pool.base + server;
  omni::SharedState* ss = shared_state();
  const bool aggregated = st.lcf->mode == kModeAggregated;
  if (ctx->leg == Leg::kPrefill || aggregated) {
    if (st.prefill_backend >= 0 && st.prefill_backend != backend && ss != nullptr) {
      ss->count_retry(static_cast<std::uint16_t>(st.prefill_backend));
    }
    st.prefill_backend = backend;
    if (aggregated) st.decode_backend = backend;
    sync_backends(st);
    enter(st, omni::Stage::kPrefilling);
    if (st.kv.keyed) kv_prefill_sent(st.kv, pool, server);
  } else {
    if (st.decode_backend >= 0 && st.decode_backend != backend && ss != nullptr) {
      ss->count_retry(static_cast<std::uint16_t>(st.decode_backend));
    }
    st.decode_backend = backend;
    sync_backends(st);
  }
}

bool leg_cancelled(ngx_http_request_t* r) noexcept {
  Ctx* ctx = get_ctx(r);
  return ctx != nullptr && ctx->cancelled;
}

void leg_peer_released(ngx_http_request_t* r, const Pool& pool, std::int32_t server,
                       ngx_uint_t state) noexcept {
  if (!(state & NGX_PEER_FAILED)) return;
  // A 5xx answer was counted when its header arrived.
  if (r->upstream != nullptr && r->upstream->headers_in.status_n >= NGX_HTTP_INTERNAL_SERVER_ERROR) {
    return;
  }
  if (omni::SharedState* ss = shared_state()) {
    ss->count_error(static_cast<std::uint16_t>(pool.base + server));
  }
}

bool prefix_key(ngx_http_request_t* r, std::uint64_t& out) noexcept try {
  Ctx* ctx = get_ctx(r->main);
  if (ctx == nullptr || ctx->state == nullptr || !ctx->state->parsed) return false;
  // The first 256 tokens (1024 bytes of text), or the whole of a shorter prompt: the key of
  // SGLang's prefix_hash policy (prefix_token_count 256).
  omni::PrefixKeyOptions o;
  o.block_tokens = 256;
  o.block_bytes = 1024;
  o.max_blocks = 1;
  omni::PrefixKeys keys = omni::prefix_keys_of(*ctx->state->parsed, o);
  if (keys.blocks.empty() && keys.units > 0) {
    o.block_tokens = keys.units;
    o.block_bytes = keys.units;
    keys = omni::prefix_keys_of(*ctx->state->parsed, o);
  }
  out = keys.blocks.empty() ? 0 : keys.blocks.front();
  return true;
} catch (...) {
  return false;
}

bool request_view(ngx_http_request_t* r, RequestView& out) noexcept {
  Ctx* ctx = get_ctx(r->main);
  if (ctx == nullptr || ctx->state == nullptr) return false;
  const State& st = *ctx->state;
  out.request_id = st.request_id.data();
  out.request_id_len = st.request_id.size();
  out.timeline = &st.timeline;
  out.first_token_ns = st.first_token_ns;
  out.prompt_tokens = st.scanner ? st.scanner->prompt_tokens() : 0;
  if (out.prompt_tokens == 0) out.prompt_tokens = static_cast<std::uint32_t>(st.prompt_tokens);
  out.forward_reason = st.forward_reason;
  out.tokenize_wall_ns = st.tokenize_wall_ns;
  out.output_tokens = st.scanner ? st.scanner->output_tokens() : 0;
  out.prefill_backend = st.prefill_backend;
  out.decode_backend = st.decode_backend;
  out.kv = &st.kv;
  return true;
}

}  // namespace omni::ngx
