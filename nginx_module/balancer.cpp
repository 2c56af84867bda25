// Peer choice for omni_proxy legs, on top of the upstream block's own balancer.
//
// Upstream blocks stay ordinary (servers, weights, max_fails, backup, keepalive, zone): nginx
// initialises them with their own balancer (round robin unless the block names another), and
// keepalive wraps that. At init_main_conf time we wrap each pool block's per-request init: after
// the original init ran, the round-robin peer data of the request is found (directly, or inside
// keepalive's data, whose first members are stable since nginx 1.1.4) and the request's `get`
// is wrapped. Our `get` runs the location's policy over a snapshot of the block's servers (by
// default omni/policy.hpp: eligibility filters, then least outstanding requests over all
// workers, from the shared state; with `omni_proxy_policy cache_aware`, SGLang's rule over the
// shared prefix table, omni/prefix_table.hpp), then steers round robin to the chosen server by
// marking every other server as already tried for the duration of the call
// (`omni_proxy_policy upstream` skips both: round robin chooses). Round robin thus still does the connecting, the
// failure accounting (max_fails, fail_timeout), max_conns and backup servers, and keepalive
// still finds cached connections. If the block names another balancer (least_conn, hash,
// random, ...), that balancer's choice stands and the wrapper only accounts, except for a
// forced server (the parallel prefill named in the body), which is steered the same way: every
// stock balancer keeps round-robin peer data first and honours its tried bitmap. A third-party
// balancer whose data cannot be recognised fails such a request rather than send it elsewhere.
#include "omni_module.hpp"

#include <omni/policy.hpp>

#include <chrono>
#include <exception>
#include <numeric>

extern "C" {
extern ngx_module_t ngx_http_upstream_keepalive_module;
}

namespace omni::ngx {
namespace {

// The leading members of ngx_http_upstream_keepalive_peer_data_t (static in the keepalive
// module; unchanged since nginx 1.1.4).
struct KeepalivePeerData {
  void* conf;
  ngx_http_upstream_t* upstream;
  void* data;
  ngx_event_get_peer_pt original_get_peer;
  ngx_event_free_peer_pt original_free_peer;
};

struct PeerData {
  ngx_http_request_t* r;
  const Pool* pool;
  ngx_event_get_peer_pt get;
  ngx_event_free_peer_pt free;
  void* data;
  ngx_http_upstream_rr_peer_data_t* rrp;  // the balancer's round-robin data, if found
  bool steer;                             // the policy chooses (round-robin blocks)
  PeerChoice choice;
  std::int32_t current;                   // server index of the connection in use, -1 none
  unsigned gets;                          // tries so far
};

const omni::Policy& policy() {
  static const omni::Policy p = omni::make_least_outstanding_policy();
  return p;
}

// The eligibility filters the cache-aware rule chooses after.
const std::vector<std::shared_ptr<const omni::Filter>>& eligibility_filters() {
  static const auto filters = omni::make_eligibility_filters();
  return filters;
}

// Peer `i` of the primary servers, or nullptr.
ngx_http_upstream_rr_peer_t* peer_at(ngx_http_upstream_rr_peers_t* peers, std::int32_t i) {
  ngx_http_upstream_rr_peer_t* peer = peers != nullptr ? peers->peer : nullptr;
  for (; peer != nullptr && i > 0; --i) peer = peer->next;
  return i == 0 ? peer : nullptr;
}

std::int32_t server_of(const ngx_http_upstream_rr_peer_data_t* rrp, const Pool& pool) {
  if (rrp == nullptr || rrp->current == nullptr) return -1;
  const ngx_http_upstream_rr_peers_t* peers = rrp->peers;
  std::int32_t offset = 0;
  for (const ngx_http_upstream_rr_peers_t* p = peers; p != nullptr; p = p->next) {
    std::int32_t i = 0;
    for (ngx_http_upstream_rr_peer_t* peer = p->peer; peer != nullptr; peer = peer->next, ++i) {
      if (peer == rrp->current) return offset + i < pool.count ? offset + i : -1;
    }
    offset += static_cast<std::int32_t>(p->number);
  }
  return -1;
}

// The policy's view of the primary servers of `peers` (read under nginx's lock when the block
// has a zone).
std::vector<omni::BackendState> snapshot(const Pool& pool, ngx_http_upstream_rr_peers_t* peers) {
  std::vector<omni::BackendState> out;
  omni::SharedState* st = shared_state();
  const time_t now = ngx_time();
  const std::uint64_t now_ns = omni::monotonic_now_ns();
  out.reserve(pool.count);  // nothing below may throw while the lock is held
  ngx_http_upstream_rr_peers_rlock(peers);
  std::uint32_t i = 0;
  for (ngx_http_upstream_rr_peer_t* peer = peers->peer; peer != nullptr && i < pool.count;
       peer = peer->next, ++i) {
    omni::BackendState b;
    b.id = pool.servers[i].id;
    b.down = peer->down != 0;
    b.weight = peer->weight > 0 ? static_cast<std::uint32_t>(peer->weight) : 1;
    b.max_conns = static_cast<std::uint32_t>(peer->max_conns);
    b.active_conns = static_cast<std::uint32_t>(peer->conns);
    b.max_fails = static_cast<std::uint32_t>(peer->max_fails);
    b.fails = now - peer->checked <= peer->fail_timeout ? static_cast<std::uint32_t>(peer->fails)
                                                        : 0;
    if (st != nullptr) {
      const auto backend = static_cast<std::uint16_t>(pool.base + i);
      b.outstanding = static_cast<std::uint32_t>(st->backend_outstanding(backend));
      if (auto load = st->engine_load(backend)) {
        b.load.running = load->running;
        b.load.waiting = load->waiting;
        b.load.kv_usage = load->kv_usage;
        b.load.waiting_uncached_tokens = load->waiting_uncached_tokens;
        const std::uint64_t age_ns = now_ns > load->polled_ns ? now_ns - load->polled_ns : 0;
        b.load.metrics_age = std::chrono::nanoseconds(age_ns);
        b.load.sent_since_poll = static_cast<std::uint32_t>(st->sent_since_poll(backend));
      }
    }
    out.push_back(std::move(b));
  }
  ngx_http_upstream_rr_peers_unlock(peers);
  return out;
}

// SGLang's cache-aware rule over the eligible servers; the chosen server's prompt prefix is
// recorded in the shared table, as SGLang's router inserts it into its tree.
std::int32_t pick_cache_aware(const Pool& pool, const omni::PoolSnapshot& snap,
                              const omni::RequestFeatures& f, const PeerChoice& choice) {
  std::vector<std::size_t> candidates(snap.size());
  std::iota(candidates.begin(), candidates.end(), std::size_t{0});
  std::vector<omni::Rejection> rejected;
  const omni::PickContext ctx{f, snap, std::chrono::steady_clock::now()};
  for (const auto& filter : eligibility_filters()) filter->filter(ctx, candidates, rejected);
  if (candidates.empty()) return -1;
  omni::PrefixTable* table = prefix_table();
  static const omni::PrefixKeys kNoKeys;
  const omni::PrefixKeys& keys = choice.keys != nullptr ? *choice.keys : kNoKeys;
  // Each upstream block records its prefixes apart: its servers are its tenants.
  const std::uint64_t salt = 0x706f6f6c00000000ULL | pool.base;
  const auto d = omni::cache_aware_choose(snap, candidates, table, keys, salt, pool.base,
                                          *choice.lcf->cache_aware, omni::pick_seed(f.request_hash));
  if (!d) return -1;
  if (table != nullptr && d->chosen < omni::PrefixTable::kMaxTenants) {
    table->insert(keys.blocks, salt, static_cast<unsigned>(d->chosen),
                  static_cast<std::uint32_t>(pool.base + d->chosen));
  }
  return static_cast<std::int32_t>(d->chosen);
}

std::int32_t pick(const Pool& pool, ngx_http_upstream_rr_peers_t* peers, const PeerChoice& choice,
                  std::span<const std::uint64_t> tried) {
  std::vector<omni::BackendState> servers = snapshot(pool, peers);
  if (servers.empty()) return -1;
  const omni::PoolSnapshot snap(pool.name, 0, std::move(servers));
  omni::RequestFeatures f;
  f.request_hash = choice.request_hash;
  f.excluded = tried;
  if (choice.lcf != nullptr && choice.lcf->policy == kPolicyCacheAware) {
    return pick_cache_aware(pool, snap, f, choice);
  }
  if (choice.lcf != nullptr && choice.lcf->policy == kPolicyKvAware) {
    return kv_pick(pool, snap, f, choice);
  }
  const omni::Pick p = policy().pick(f, snap, std::chrono::steady_clock::now());
  if (p.status != omni::PickStatus::kPicked || !p.chosen) return -1;
  return static_cast<std::int32_t>(*p.chosen);
}

ngx_int_t get_peer(ngx_peer_connection_t* pc, void* data) noexcept {
  auto* pd = static_cast<PeerData*>(data);
  ngx_http_upstream_rr_peer_data_t* rrp = pd->rrp;
  // Servers marked tried only for this call: at most 64 x 64 servers.
  std::uintptr_t marked[64] = {};
  std::size_t marked_words = 0;
  if (rrp != nullptr && (pd->steer || pd->choice.forced >= 0) && rrp->peers->number > 1 &&
      rrp->peers->number <= 64 * 64) {
    const ngx_uint_t n = rrp->peers->number;
    const std::size_t words = (n + 8 * sizeof(std::uintptr_t) - 1) / (8 * sizeof(std::uintptr_t));
    std::int32_t chosen = pd->choice.forced;
    // The scheduler's choice holds for the first try; a retry goes where the policy says, and
    // so does a first try whose server round robin would refuse now (max_fails reached within
    // fail_timeout, e.g. a keepalive connection the engine had closed): forcing it would end
    // the request with "no live upstreams" (502).
    if (chosen >= 0 && pd->choice.forced_retry &&
        (pd->gets > 0 || peer_unavailable(peer_at(rrp->peers, chosen), ngx_time()))) {
      chosen = -1;
    }
    if (chosen < 0 && pd->steer) {
      try {
        chosen = pick(*pd->pool, rrp->peers, pd->choice,
                      std::span<const std::uint64_t>(
                          reinterpret_cast<const std::uint64_t*>(rrp->tried), words));
      } catch (...) {
        log_exception(pc->log, "balancer");
        chosen = -1;
      }
    }
    if (chosen >= 0 && static_cast<ngx_uint_t>(chosen) < n) {
      for (ngx_uint_t i = 0; i < n; ++i) {
        const std::size_t w = i / (8 * sizeof(std::uintptr_t));
        const std::uintptr_t bit = std::uintptr_t{1} << (i % (8 * sizeof(std::uintptr_t)));
        if (static_cast<std::int32_t>(i) == chosen || (rrp->tried[w] & bit)) continue;
        rrp->tried[w] |= bit;
        marked[w] |= bit;
      }
      marked_words = words;
    }
  }
  ++pd->gets;
  const ngx_int_t rc = pd->get(pc, pd->data);
  for (std::size_t w = 0; w < marked_words; ++w) rrp->tried[w] &= ~marked[w];
  pd->current = -1;
  if (rc == NGX_OK || rc == NGX_DONE) {
    pd->current = server_of(rrp, *pd->pool);
    if (pd->current < 0 && pc->name != nullptr) {  // another balancer chose: find it by name
      const std::string_view name(reinterpret_cast<const char*>(pc->name->data), pc->name->len);
      for (std::size_t i = 0; i < pd->pool->servers.size(); ++i) {
        if (pd->pool->servers[i].name == name) pd->current = static_cast<std::int32_t>(i);
      }
    }
  }
  leg_peer_chosen(pd->r, *pd->pool, pd->current);
  return rc;
}

void free_peer(ngx_peer_connection_t* pc, void* data, ngx_uint_t state) noexcept {
  auto* pd = static_cast<PeerData*>(data);
  // A leg the proxy cancelled did not fail: its server must not be counted down.
  if ((state & NGX_PEER_FAILED) && leg_cancelled(pd->r)) state &= ~NGX_PEER_FAILED;
  if (pd->current >= 0) leg_peer_released(pd->r, *pd->pool, pd->current, state);
  pd->free(pc, pd->data, state);
  pd->current = -1;
}

ngx_int_t init_peer(ngx_http_request_t* r, ngx_http_upstream_srv_conf_t* us) noexcept {
  const Pool* pool = find_pool(us);
  if (pool == nullptr || pool->original_init == nullptr) return NGX_ERROR;
  if (pool->original_init(r, us) != NGX_OK) return NGX_ERROR;
  PeerChoice choice;
  if (!leg_choice(r, choice)) return NGX_OK;  // another module's request to this block
  ngx_http_upstream_t* u = r->upstream;
  auto* pd = static_cast<PeerData*>(ngx_pcalloc(r->pool, sizeof(PeerData)));
  if (pd == nullptr) return NGX_ERROR;
  pd->r = r;
  pd->pool = pool;
  pd->get = u->peer.get;
  pd->free = u->peer.free;
  pd->data = u->peer.data;
  pd->choice = choice;
  pd->current = -1;
  // The balancer's own peer data: every stock balancer (round robin, least_conn, hash,
  // ip_hash, random) keeps an ngx_http_upstream_rr_peer_data_t first and honours its tried
  // bitmap; keepalive wraps it. It is recognised by pointing at the block's peers.
  void* data = u->peer.data;
  ngx_event_get_peer_pt get = u->peer.get;
  const auto* kcf = static_cast<const ngx_uint_t*>(
      ngx_http_conf_upstream_srv_conf(us, ngx_http_upstream_keepalive_module));
  if (kcf != nullptr && *kcf != 0) {  // keepalive is configured: its data comes first
    const auto* kp = static_cast<const KeepalivePeerData*>(u->peer.data);
    if (kp != nullptr && kp->upstream == u) {
      data = kp->data;
      get = kp->original_get_peer;
    } else {
      data = nullptr;
    }
  }
  auto* rrp = static_cast<ngx_http_upstream_rr_peer_data_t*>(data);
  if (rrp != nullptr && rrp->peers == us->peer.data) {
    pd->rrp = rrp;
    // The policy chooses for round-robin blocks; a block that names its own method keeps it,
    // and so does every block of a location with "omni_proxy_policy upstream", except for a
    // forced server (the parallel prefill named in the body).
    pd->steer = get == ngx_http_upstream_get_round_robin_peer &&
                (choice.lcf == nullptr || choice.lcf->policy != kPolicyUpstream);
  }
  if (choice.forced >= 0 && !choice.forced_retry && pd->rrp == nullptr) {
    ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                  "omni_proxy: upstream \"%V\" uses a balancer that cannot be told which "
                  "prefill server to use; use round robin (no method directive) for it",
                  &us->host);
    return NGX_ERROR;
  }
  // A forced server (the parallel prefill, named in the body) must not be retried elsewhere.
  if (choice.forced >= 0 && !choice.forced_retry) u->peer.tries = 1;
  u->peer.get = get_peer;
  u->peer.free = free_peer;
  u->peer.data = pd;
  return NGX_OK;
}

}  // namespace

void install_balancer(Registry& registry) noexcept {
  for (Pool& pool : registry.pools) {
    if (pool.uscf->peer.init == init_peer) continue;
    pool.original_init = pool.uscf->peer.init;
    pool.uscf->peer.init = init_peer;
  }
}

std::int32_t choose_server(const Pool& pool, const PeerChoice& choice) noexcept try {
  auto* peers = static_cast<ngx_http_upstream_rr_peers_t*>(pool.uscf->peer.data);
  if (peers == nullptr || peers->number == 0) return -1;
  if (peers->number == 1) return peers->peer->down ? -1 : 0;
  return pick(pool, peers, choice, {});
} catch (...) {
  log_exception(ngx_cycle->log, "choose_server");
  return -1;
}

}  // namespace omni::ngx
