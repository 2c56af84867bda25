// Types shared by the module's translation units.
#pragma once

#include "ngx.hpp"

#include <omni/chat_template.hpp>
#include <omni/engine_metrics.hpp>
#include <omni/prefix_table.hpp>
#include <omni/prometheus.hpp>
#include <omni/scheduler.hpp>
#include <nlohmann/json.hpp>
#include <omni/shared_state.hpp>
#include <omni/tokenizer.hpp>

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

extern "C" {
extern ngx_module_t ngx_http_omni_proxy_module;
}

namespace omni::ngx {

// How a location proxies.
enum Mode : ngx_uint_t {
  kModeAggregated = 1,  // one leg to one pool
  kModeSequential = 2,  // vLLM P/D: prefill leg, then decode leg with the KV handle
  kModeParallel = 3,    // SGLang P/D: both legs at once, joined by a bootstrap room
};

enum Engine : ngx_uint_t {
  kEngineVllm = 1,
  kEngineSglang = 2,
};

// Who chooses the server of a leg (omni_proxy_policy).
enum PolicyKind : ngx_uint_t {
  kPolicyLeastOutstanding = 1,  // the core policy: fewest outstanding requests over all workers
  kPolicyUpstream = 2,          // the upstream block's own balancer (round robin, least_conn, ...)
  kPolicyCacheAware = 3,        // a re-implementation of SGLang's cache-aware rule
  kPolicyKvAware = 4,           // ours: expected TTFT over the KV index, bounded-load ring (kv.cpp)
};

// How a pool's prefix caches are known (omni_proxy_kv_cache).
enum class KvMode : std::uint8_t {
  kNone,         // not indexed
  kEvents,       // the engines' KV events, read by the subscriber
  kApproximate,  // predicted from the proxy's own routing, bounded by the engines' capacity
};

// Parameters of omni_proxy_policy kv_aware (pool memory, trivially destructible).
struct KvPolicyOptions {
  // Bounded-load slack for cold prefixes. 0.05, not 0.25: on Mooncake (mostly cold, long
  // prompts) a home at 1.25x the mean queue cost more TTFT than the locality saved
  // (docs/benchmarks.md, "The ring's slack").
  double epsilon = 0.05;
  // Scores this close are a tie: more cached wins. (Was 0.3 while misses were not priced: a
  // crude way of counting the cluster's compute, which miss_weight now prices.)
  double tie_fraction = 0.05;
  // Price of a warm choice's uncached prefill compute, in units of the request's own TTFT
  // (omni::KvRouteOptions::miss_weight). 2: on Mooncake x1 the hit rate rose from 12.3-13.4%
  // to 14.3-14.6% of a 15.6% bound, and goodput at x1.5 by about 5%; multi-tenant TTFT p99
  // level within the repeats' spread (docs/benchmarks.md, "Pricing misses").
  double miss_weight = 2;
  double kv_usage_high = 0.95;     // KV usage at which an instance is avoided
  double prefill_tps = 20000;      // prefill speed assumed before one is measured, tokens/s
  double decode_slack = 0.10;      // decode loads this close are equal: more cached wins
};

// Which leg an upstream request is.
enum class Leg : std::uint8_t { kNone, kPrefill, kDecode };

// One upstream{} block used by an omni_proxy leg. Its servers (primary, then backup) are
// backends base .. base+count-1 of the shared state.
struct Pool {
  ngx_http_upstream_srv_conf_t* uscf = nullptr;
  std::string name;
  ngx_http_upstream_init_peer_pt original_init = nullptr;  // the block's own balancer
  std::uint16_t base = 0;
  std::uint16_t count = 0;
  omni::EngineFlavor flavor = omni::EngineFlavor::kVllm;
  bool flavor_set = false;
  bool sglang_prefill = false;  // prefill pool of a parallel location: learn bootstrap ports
  bool cache_aware = false;     // a cache_aware location uses it: at most 64 servers
  // KV-cache index (omni_proxy_kv_cache; kv_aware locations default to approximate).
  KvMode kv_mode = KvMode::kNone;
  bool kv_declared = false;          // an omni_proxy_kv_cache directive names this block
  int kv_pub_offset = 0;             // events: PUB port = server port + offset
  int kv_replay_offset = 0;          // events: replay port = server port + offset
  bool kv_replay = false;            // events: the engines have a replay socket
  std::string kv_topic;              // events: SUB topic prefix
  std::uint32_t kv_block_size = 0;   // tokens per block; 0: learned from the engines
  std::uint32_t kv_max_blocks = 0;   // per-server bound; 0: the engine's num_gpu_blocks
  bool kv_pending = false;           // events: prompts sent count as cached until prefilled
  std::uint16_t kv_pool_index = 0;   // position among the registry's pools
  struct Server {
    std::string name;  // host:port as nginx prints it
    std::string host;  // without the port
    std::uint64_t id = 0;  // hash of the name: the policy's stable backend id
    ngx_addr_t addr{};
  };
  std::vector<Server> servers;  // index i is backend base + i
};

// A tokenizer declared with omni_proxy_tokenizer, loaded when the configuration is read (in
// the master, so forked workers share its pages).
struct TokenizerEntry {
  std::string name;
  std::string path;
  std::shared_ptr<const omni::Tokenizer> tokenizer;
  std::shared_ptr<const omni::ChatTemplate> chat;  // null when the model has no template
  double load_ms = 0;
};

// Everything configuration-time the runtime needs; owned by the main conf's pool.
struct Registry {
  std::deque<TokenizerEntry> tokenizers;  // stable addresses: locations point at entries
  std::vector<Pool> pools;
  std::vector<std::string> groups;   // limit group names (locations with limits)
  omni::SharedStateConfig state_config;
  std::uint64_t prefix_entries = 0;  // entries of the shared prefix table; 0: no table
  std::uint32_t kv_blocks = 0;       // blocks per server of the KV index; 0: no index
  std::uint32_t kv_pending_blocks = 0;  // blocks per server of the pending index; 0: none
  // omni_proxy_kv_cache declarations, resolved against the pools at postconfiguration.
  struct KvDecl {
    std::string upstream;
    KvMode mode = KvMode::kApproximate;
    int pub_offset = 0;
    int replay_offset = 0;
    bool replay = false;
    std::string topic;
    std::uint32_t block_size = 0;
    std::uint32_t max_blocks = 0;
    bool pending = true;
    std::string file;  // where it was declared, for errors
    ngx_uint_t line = 0;
  };
  std::vector<KvDecl> kv_decls;
  // The schedulers (omni_proxy_scheduler, omni_proxy_capacity, omni_proxy_pd_group).
  struct Sched {
    bool enabled = false;
    std::uint32_t capacity = 4096;     // queue entries in the zone
    omni::sched::Options options;
    std::string priority_header = "x-omni-priority";  // lower case
    std::string file;                  // where omni_proxy_scheduler was declared
    ngx_uint_t line = 0;
    struct CapacityDecl {
      std::string upstream;
      std::uint32_t batch_tokens = 0;
      std::uint32_t max_seqs = 0;
      std::string file;
      ngx_uint_t line = 0;
    };
    std::vector<CapacityDecl> capacities;
    struct GroupDecl {
      std::string prefill_upstream, decode_upstream;
      std::vector<std::string> prefill, decode;  // server names as nginx prints them
      std::string file;
      ngx_uint_t line = 0;
    };
    std::vector<GroupDecl> groups;
    std::vector<omni::sched::InstanceLimits> limits;  // per backend, resolved
    std::vector<std::pair<std::string, ngx_uint_t>> uses;  // omni_proxy_schedule on: where
  };
  Sched sched;
  std::uint64_t fingerprint = 0;     // of state_config and the table; a change gets a fresh zone
};

struct MainConf {
  ngx_shm_zone_t* zone;  // null when omni_proxy_zone is absent
  Registry* registry;
  ngx_msec_t poll_interval;  // omni_proxy_poll_interval; 0 disables polling
  ngx_msec_t poll_timeout;   // omni_proxy_poll_timeout
  ngx_uint_t prefix_entries; // omni_proxy_prefix_table
  ngx_uint_t kv_blocks;      // omni_proxy_kv_index_blocks
};

struct LocConf {
  ngx_flag_t status;   // omni_proxy_status
  ngx_flag_t metrics;  // omni_proxy_metrics
  ngx_flag_t enable;   // omni_proxy
  ngx_uint_t mode;     // omni_proxy_mode
  ngx_uint_t engine;   // omni_proxy_engine
  size_t max_body_size;                 // omni_proxy_max_body_size
  ngx_http_upstream_conf_t prefill;     // the prefill leg (sequential, parallel)
  ngx_http_upstream_conf_t decode;      // the decode leg, or the only leg (aggregated)
  ngx_msec_t connect_timeout;           // omni_proxy_connect_timeout
  ngx_msec_t prefill_timeout;           // omni_proxy_prefill_timeout
  ngx_msec_t decode_timeout;            // omni_proxy_decode_timeout
  ngx_uint_t max_inflight;              // omni_proxy_max_inflight; 0 = unlimited
  ngx_uint_t max_queue;                 // omni_proxy_max_queue
  ngx_msec_t queue_timeout;             // omni_proxy_queue_timeout
  ngx_uint_t bootstrap_port;            // omni_proxy_bootstrap_port (fallback)
  ngx_int_t group;                      // limit group index, -1 for none
  ngx_str_t location;                   // the location's name, for the limit group
  ngx_str_t tokenizer_name;             // omni_proxy_tokenize; "off" or empty: none
  const TokenizerEntry* tokenizer;      // resolved at merge; null: no tokenizing
  ngx_flag_t token_forwarding;          // omni_proxy_token_forwarding
  ngx_str_t thread_pool_name;           // omni_proxy_thread_pool
  ngx_thread_pool_t* thread_pool;       // resolved at merge when tokenizing
  ngx_uint_t policy;                    // omni_proxy_policy: PolicyKind
  omni::CacheAwareOptions* cache_aware; // its parameters (cache_aware), pool memory
  omni::PrefixKeyOptions* prefix;       // how prompts are keyed (cache_aware), pool memory
  ngx_flag_t route_header;              // omni_proxy_route_header
  KvPolicyOptions* kv;                  // its parameters (kv_aware), pool memory
  ngx_flag_t schedule;                  // omni_proxy_schedule
};

// Logs the exception being handled (call only inside a catch block) as an [alert].
void log_exception(ngx_log_t* log, const char* where) noexcept;
// Sends `body` as a complete application/json response with `status`; returns what the
// output filter returned (proxy_handler.cpp).
ngx_int_t send_json(ngx_http_request_t* r, ngx_uint_t status, std::string_view body);
// The same with any content type; `content_type` must outlive the request (a literal).
ngx_int_t send_body(ngx_http_request_t* r, ngx_uint_t status, std::string_view content_type,
                    std::string_view body);
// The value of the client request's header `name` (case-insensitive), or "" (proxy_handler.cpp).
std::string header_value(ngx_http_request_t* r, std::string_view name);
// Sends an OpenAI-style error; with a Retry-After header when retry_after_s > 0.
ngx_int_t send_error(ngx_http_request_t* r, ngx_uint_t status, const std::string& message,
                     const std::string& param = {}, unsigned retry_after_s = 0);

// The content handler of omni_proxy locations (proxy_handler.cpp).
ngx_int_t proxy_handler(ngx_http_request_t* r) noexcept;
// Installs the header and body filters that turn nginx's own error pages for omni_proxy
// requests into OpenAI-style JSON, and the log-phase handler that closes the lifecycle.
ngx_int_t install_filters(ngx_conf_t* cf) noexcept;
// Worker start and exit for the request path (local wait queues).
void proxy_exit_process() noexcept;

// --- Runtime state of this worker (ngx_http_omni_proxy_module.cpp) --------------------------
// The shared state view, or null without omni_proxy_zone (or before the worker attached).
omni::SharedState* shared_state() noexcept;
// The shared prefix table (cache_aware locations), or null.
omni::PrefixTable* prefix_table() noexcept;
// The registry of the running configuration (null without omni_proxy legs).
const Registry* registry() noexcept;
const Pool* find_pool(const ngx_http_upstream_srv_conf_t* uscf) noexcept;

// --- Balancer (balancer.cpp) ----------------------------------------------------------------
// Installs the peer-choice wrapper on every pool's upstream block (init_main_conf time, after
// nginx initialised the blocks' own balancers).
void install_balancer(Registry& registry) noexcept;
// One routing decision of kv_aware, for the response header, the log and the status page.
struct KvExplain {
  bool set = false;
  std::uint8_t reason = 0;           // omni::KvRouteDecision::Reason; 3: decode choice
  bool cache_decided = false;        // decode: the cache broke a tie
  std::int32_t chosen = -1;          // server index within the pool
  std::int32_t runner_up = -1;
  std::uint32_t cached = 0;          // predicted cached tokens on chosen
  std::uint32_t runner_up_cached = 0;
  double ttft_ms = 0;                // expected TTFT on chosen (prefill)
  double runner_up_ttft_ms = 0;
  std::vector<std::uint32_t> cached_by_server;  // predicted cached tokens of each pool server
};

// A request's state for kv_aware routing (owned by the request's State).
struct KvRequest {
  omni::PrefixKeys keys[2];          // keyed with the prefill [0] and decode [1] pools' block sizes
  bool keyed = false;
  std::uint32_t prompt_tokens = 0;   // the proxy's count (token ids), else an estimate
  KvExplain route[2];                // [0] prefill (or the only leg), [1] decode
  const struct Pool* pools[2] = {nullptr, nullptr};  // the pools of route[0] and route[1]
  // The proxy's in-flight accounting of predicted uncached prefill tokens.
  std::int32_t accounted_backend = -1;
  std::int64_t accounted_tokens = 0;
  std::uint64_t accounted_ns = 0;    // when the prefill leg was sent
  // Events mode: the prompt's blocks recorded as pending on the server prefilling them.
  std::int32_t pending_backend = -1;
  std::uint64_t pending_tag = 0;
  bool solo = false;                 // nothing else was prefilling there: a speed sample
  std::int64_t actual_cached = -1;   // the engine's usage.prompt_tokens_details.cached_tokens
};

// Features of a request the balancer needs; set on the leg request's context.
struct PeerChoice {
  std::uint64_t request_hash = 0;
  std::int32_t forced = -1;  // server index within the pool to use, or -1 to let the policy pick
  bool forced_retry = false;  // forced only for the first try: a retry goes where the policy says
  const LocConf* lcf = nullptr;             // the location's policy
  const omni::PrefixKeys* keys = nullptr;   // the prompt's prefix keys (cache_aware)
  KvRequest* kv = nullptr;                  // kv_aware: keys in, explanation out
  bool decode_leg = false;                  // the leg is a P/D decode leg
};
// Chooses a server of `pool` for a request now (parallel P/D picks the prefill server before
// the bodies are built); -1 when none is eligible.
std::int32_t choose_server(const Pool& pool, const PeerChoice& choice) noexcept;
// Whether round robin would skip this peer now: marked down, or max_fails failures within
// fail_timeout (nginx's own test; read without the peers' lock: a hint). True for nullptr.
inline bool peer_unavailable(const ngx_http_upstream_rr_peer_t* peer, time_t now) noexcept {
  if (peer == nullptr || peer->down) return true;
  return peer->max_fails != 0 && peer->fails >= peer->max_fails &&
         now - peer->checked <= peer->fail_timeout;
}
// Hooks into the request path (proxy_handler.cpp): what the balancer should do for a leg
// request (false: not an omni_proxy leg, leave nginx's choice alone), and what it chose
// (`server` within `pool`; -1 when nginx found no live server).
bool leg_choice(ngx_http_request_t* r, PeerChoice& out) noexcept;
void leg_peer_chosen(ngx_http_request_t* r, const Pool& pool, std::int32_t server) noexcept;
void leg_peer_released(ngx_http_request_t* r, const Pool& pool, std::int32_t server,
                       ngx_uint_t state) noexcept;
// True when the leg was ended by the proxy (the other P/D leg failed): its server did not fail.
bool leg_cancelled(ngx_http_request_t* r) noexcept;

// --- Metrics poller (poller.cpp) --------------------------------------------------------------
void poller_start(ngx_cycle_t* cycle) noexcept;
// True when this worker is (or just became) the one polling: one worker polls at a time, and
// another takes over when it dies or stops polling for `stale_msec`
// (ngx_http_omni_proxy_module.cpp).
bool claim_poller(ngx_msec_t stale_msec) noexcept;
void poller_stop() noexcept;

// --- KV-cache-aware routing (kv.cpp) ----------------------------------------------------------
// Configuration: omni_proxy_kv_cache (http level).
char* set_kv_cache(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
// Resolves the declarations against the pools (postconfiguration); an error names the directive.
bool kv_finalize(ngx_conf_t* cf, Registry& reg) noexcept;
// Bytes of the zone the KV index and its bookkeeping need (0: none).
std::size_t kv_index_bytes(const Registry& reg) noexcept;
std::size_t kv_shared_bytes(const Registry& reg) noexcept;
// Lays them out in a fresh zone; false on failure (logged).
bool kv_create(void* index_region, std::size_t index_bytes, void* shared_region,
               std::size_t shared_bytes, const Registry& reg, ngx_log_t* log) noexcept;
// Worker start (attach, claim a token row, start the subscriber lease timer) and exit.
void kv_init_process(ngx_cycle_t* cycle, void* index_region, std::size_t index_bytes,
                     void* shared_region, std::size_t shared_bytes) noexcept;
void kv_exit_process() noexcept;
// Frees the token rows of workers that died.
void kv_reclaim() noexcept;
// Computes the request's keys once its body is final (kv_aware).
void kv_key_request(const LocConf& lcf, const omni::ParsedBody& body, std::size_t prompt_tokens,
                    KvRequest& kv) noexcept;
// The balancer's choice for kv_aware; -1 when none is eligible.
std::int32_t kv_pick(const Pool& pool, const omni::PoolSnapshot& snap,
                     const omni::RequestFeatures& f, const PeerChoice& choice);
// The request's prefill leg went to `server` of `pool` / came back.
void kv_prefill_sent(KvRequest& kv, const Pool& pool, std::int32_t server) noexcept;
void kv_prefill_done(KvRequest& kv) noexcept;
// The engine's report of cached tokens for the prefill (accuracy, speed).
void kv_observe_cached(KvRequest& kv, const Pool& pool, std::int32_t server,
                       std::uint32_t cached_tokens, std::uint32_t prompt_tokens) noexcept;
// The poller read an engine's cache configuration.
void kv_engine_config(const Pool& pool, std::uint16_t server, std::optional<std::uint32_t> block_size,
                      std::optional<std::uint64_t> num_gpu_blocks) noexcept;
// "reason=warm; cached=..; ..." for the response header and log variables; empty when unset.
std::string kv_explain_text(const Pool* pool, const KvExplain& e);
// Status JSON and metrics.
nlohmann::json kv_status_json();
void kv_render_metrics(omni::prom::TextWriter& w);

// --- Wake-ups between workers (notify.cpp) ----------------------------------------------------
// Binds this worker's wake-up socket (init_process, with omni_proxy_zone); false on failure.
bool notify_init(ngx_cycle_t* cycle) noexcept;
void notify_exit() noexcept;
bool notify_ready() noexcept;
// Called on the event loop on every wake-up of this worker.
using NotifyHandler = void (*)();
void notify_subscribe(NotifyHandler handler) noexcept;
// Wakes the worker `pid` (this worker: a posted event). Best effort.
void notify_wake(std::int32_t pid) noexcept;
struct NotifyStats {
  std::uint64_t sent = 0, failed = 0, received = 0;
};
NotifyStats notify_stats() noexcept;

// --- Schedulers (scheduler.cpp) ---------------------------------------------------------------
// Configuration: omni_proxy_scheduler, omni_proxy_capacity, omni_proxy_pd_group (http level).
char* set_scheduler(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
char* set_capacity(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
char* set_pd_group(ngx_conf_t* cf, ngx_command_t* cmd, void* conf) noexcept;
// Resolves the declarations against the pools (postconfiguration); an error names the directive.
bool sched_finalize(ngx_conf_t* cf, Registry& reg) noexcept;
// Bytes of the zone the scheduler needs (0: not configured).
std::size_t sched_bytes(const Registry& reg) noexcept;
bool sched_create(void* region, std::size_t bytes, const Registry& reg, ngx_log_t* log) noexcept;
// Worker start and exit. `generation` is the zone header's reload generation: a worker of an
// older cycle hands the scheduler over when a newer cycle reuses the zone.
void sched_init_process(ngx_cycle_t* cycle, void* region, std::size_t bytes,
                        const std::uint64_t* generation) noexcept;
void sched_exit_process() noexcept;

// A request's place in the scheduler (owned by the request's State).
struct SchedRequest {
  omni::sched::Ref ref{};
  bool active = false;        // it holds an entry
  bool waiting = false;       // linked in this worker's list of requests awaiting a decision
  std::uint8_t seen = 0;      // the entry state last acted upon (omni::sched::State)
  bool latency_recorded = false;
  bool timed_out = false;     // the backstop fired: no decision came in time
  bool sequential = false;    // vLLM P/D: waits again for its decode server after the prefill
  std::uint64_t enqueue_ns = 0;
  ngx_queue_t link{};
  // Called (on the event loop) when the entry's state changed from `seen`.
  void (*on_change)(void* data) = nullptr;
  void* data = nullptr;
  ngx_event_t backstop{};     // a decision that never comes: the request fails cleanly
  // While it waits, its predicted cached tokens are refreshed (other requests' prefixes are
  // sent or cached meanwhile): its keys and pools (set by sched_enqueue), and where the
  // request keeps the values the scheduler has ([0] prefill pool, [1] decode pool; the caller's).
  const KvRequest* kv = nullptr;
  const Pool* kv_pools[2] = {nullptr, nullptr};
  std::vector<std::uint32_t>* cached = nullptr;
};
struct SchedEnqueue {
  bool queued = false;
  std::vector<std::uint32_t> cached[2];  // predicted cached tokens per server: prefill, decode
  ngx_uint_t status = 0;       // refusals: 429 or 503
  unsigned retry_after_s = 0;
  std::string message;
};
// Whether requests of this location go through the scheduler in this worker.
bool sched_active(const LocConf& lcf) noexcept;
// The request's priority: the priority header, else the body's `priority`, else 0.
std::int32_t sched_priority(ngx_http_request_t* r, std::optional<std::int64_t> body_priority);
// Enqueues a request of `lcf` whose prompt is keyed in `kv`; on success it waits for its
// decision (on_change). Refusals are answered by the caller.
SchedEnqueue sched_enqueue(const LocConf& lcf, const KvRequest& kv, std::int32_t priority,
                           SchedRequest& sr, ngx_log_t* log);
omni::sched::Decision sched_decision(const SchedRequest& sr) noexcept;
// The owner acts on the decision: records the decision latency once.
void sched_acted(SchedRequest& sr) noexcept;
// The prefill leg came back (aggregated: the first token) from `server` (index within the
// prefill pool; -1 unknown). Sequential requests then wait for their decode server (on_change
// again).
void sched_prefill_done(SchedRequest& sr, bool ok, std::optional<std::uint32_t> actual_cached,
                        std::int32_t server) noexcept;
void sched_decode_done(SchedRequest& sr, double tpot_ms) noexcept;
// The request ends or fails: frees its entry (idempotent).
void sched_cancel(SchedRequest& sr) noexcept;
nlohmann::json sched_status_json();
void sched_render_metrics(omni::prom::TextWriter& w);

// The kv_aware pieces the scheduler uses (kv.cpp): predicted cached tokens of the request on each
// server of `pool` ([0] prefill keys, [1] decode keys), and the ring key of its prefix past
// what every server holds.
void kv_cached_by_server(const Pool& pool, const KvRequest& kv, int which,
                         std::vector<std::uint32_t>& out) noexcept;
std::uint64_t kv_ring_key(const KvRequest& kv, int which, std::span<const std::uint32_t> cached) noexcept;
// Records a choice the scheduler made for a leg (explanation, approximate-mode blocks).
void kv_record_choice(const Pool& pool, KvRequest& kv, int which, std::int32_t server,
                      std::int32_t runner_up, std::uint8_t reason, double ttft_ms,
                      double runner_up_ttft_ms, std::span<const std::uint32_t> cached) noexcept;

// --- Variables (variables.cpp) ---------------------------------------------------------------
ngx_int_t add_variables(ngx_conf_t* cf) noexcept;

// Per-request view for variables (proxy_handler.cpp): nullptr when the request is not ours.
struct RequestView {
  const char* request_id;
  std::size_t request_id_len;
  const omni::Timeline* timeline;
  std::uint64_t first_token_ns;
  std::uint32_t prompt_tokens;
  std::uint32_t output_tokens;
  std::int32_t forward_reason;     // omni::ForwardReason, -1 when not tokenized
  std::uint64_t tokenize_wall_ns;  // in the thread pool; 0 when not tokenized
  std::int32_t prefill_backend;  // -1 none
  std::int32_t decode_backend;   // -1 none
  const KvRequest* kv;           // kv_aware routing
};
bool request_view(ngx_http_request_t* r, RequestView& out) noexcept;
// A hash of the prompt's first 256 tokens (or 1024 bytes of text; all of a shorter prompt),
// for `hash $omni_prefix_key consistent`; false when the request is not ours or not parsed.
bool prefix_key(ngx_http_request_t* r, std::uint64_t& out) noexcept;
std::string backend_name(std::int32_t backend);

}  // namespace omni::ngx
