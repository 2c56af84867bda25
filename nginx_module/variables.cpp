// nginx variables for log_format: the request's lifecycle, peers and token counts.
//   $omni_request_id          the X-Request-Id both legs carried
//   $omni_stage_<stage>_ms    time spent in each stage (received .. decoding), milliseconds
//   $omni_stages              all ten stages as name=ms pairs, comma-separated
//   $omni_total_ms            received to done (or to now while running)
//   $omni_ttft_ms             received to the first output byte sent to the client
//   $omni_tpot_ms             time per output token after the first
//   $omni_prefill_peer        the prefill server (sequential, parallel; aggregated: the server)
//   $omni_decode_peer         the decode server
//   $omni_prompt_tokens       from the engine's usage report, else the proxy's own count
//   $omni_output_tokens       from the usage report, else the count of streamed token events
//   $omni_token_forwarding    how the prompt reached the engines when the proxy tokenized it:
//                             "forwarded" (token ids) or why it went as text ("tools", ...)
//   $omni_tokenize_ms         time the proxy spent rendering and tokenizing (thread pool)
//   $omni_prefix_key          16 hex digits hashing the prompt's first 256 tokens (1024 bytes
//                             of text), for `hash $omni_prefix_key consistent;`
//   $omni_prefill_route       kv_aware: why the prefill server was chosen ("reason=warm;
//                             cached=..; expected_ttft_ms=..; runner_up=..; ...")
//   $omni_decode_route        kv_aware: the same for the decode server
//   $omni_predicted_cached_tokens  kv_aware: cached prompt tokens predicted on the prefill server
//   $omni_cached_tokens       cached prompt tokens the prefill engine reported
// A variable is empty ("-" in logs) when the request did not reach that point.
#include "omni_module.hpp"

#include <omni/lifecycle.hpp>
#include <omni/token_forwarding.hpp>

#include <cstdio>
#include <string>

namespace omni::ngx {
namespace {

enum Var : uintptr_t {
  kRequestId = 100,
  kStages,
  kTotal,
  kTtft,
  kTpot,
  kPrefillPeer,
  kDecodePeer,
  kPromptTokens,
  kOutputTokens,
  kTokenForwarding,
  kTokenizeMs,
  kPrefixKey,
  kPrefillRoute,
  kDecodeRoute,
  kPredictedCached,
  kCachedTokens,
};

ngx_int_t set_value(ngx_http_request_t* r, ngx_http_variable_value_t* v, const std::string& s) {
  if (s.empty()) {
    v->not_found = 1;
    return NGX_OK;
  }
  auto* p = static_cast<u_char*>(ngx_pnalloc(r->pool, s.size()));
  if (p == nullptr) return NGX_ERROR;
  ngx_memcpy(p, s.data(), s.size());
  v->data = p;
  v->len = static_cast<unsigned>(s.size());
  v->valid = 1;
  v->no_cacheable = 1;
  v->not_found = 0;
  return NGX_OK;
}

std::string ms(double ns) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f", ns / 1e6);
  return buf;
}

// A stage's duration; for the current stage, up to now.
std::optional<std::uint64_t> stage_ns(const omni::Timeline& t, omni::Stage s) {
  if (auto d = t.duration_ns(s)) return d;
  if (t.current() == s && s != omni::Stage::kDone) {
    const std::uint64_t now = omni::monotonic_now_ns();
    const std::uint64_t at = t.at_ns(s);
    return now > at ? now - at : 0;
  }
  return std::nullopt;
}

ngx_int_t get(ngx_http_request_t* r, ngx_http_variable_value_t* v, uintptr_t data) noexcept try {
  if (data == kPrefixKey) {
    std::uint64_t key = 0;
    if (!prefix_key(r, key)) return set_value(r, v, {});
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(key));
    return set_value(r, v, hex);
  }
  RequestView view{};
  if (!request_view(r, view)) {
    v->not_found = 1;
    return NGX_OK;
  }
  const omni::Timeline& t = *view.timeline;
  if (data < kRequestId) {  // a stage
    const auto s = omni::stage_at(data);
    if (!s) return set_value(r, v, {});
    const auto d = stage_ns(t, *s);
    return set_value(r, v, d ? ms(static_cast<double>(*d)) : std::string());
  }
  switch (static_cast<Var>(data)) {
    case kRequestId:
      return set_value(r, v, std::string(view.request_id, view.request_id_len));
    case kStages: {
      std::string out;
      for (std::size_t i = 0; i < omni::kStageCount; ++i) {
        const omni::Stage s = *omni::stage_at(i);
        const auto d = stage_ns(t, s);
        if (!d && s != omni::Stage::kDone) continue;
        if (!out.empty()) out += ',';
        out += std::string(omni::stage_name(s)) + "=" +
               (s == omni::Stage::kDone ? std::string(t.reached(s) ? "1" : "0")
                                        : ms(static_cast<double>(*d)));
      }
      return set_value(r, v, out);
    }
    case kTotal: {
      auto d = t.age_ns(omni::monotonic_now_ns());
      return set_value(r, v, d ? ms(static_cast<double>(*d)) : std::string());
    }
    case kTtft: {
      auto d = t.ttft_ns(view.first_token_ns);
      return set_value(r, v, d ? ms(static_cast<double>(*d)) : std::string());
    }
    case kTpot: {
      auto d = t.tpot_ns(view.first_token_ns, view.output_tokens);
      return set_value(r, v, d ? ms(*d) : std::string());
    }
    case kPrefillPeer:
      return set_value(r, v, backend_name(view.prefill_backend));
    case kDecodePeer:
      return set_value(r, v, backend_name(view.decode_backend));
    case kPromptTokens:
      return set_value(r, v, view.prompt_tokens ? std::to_string(view.prompt_tokens) : "");
    case kOutputTokens:
      return set_value(r, v, std::to_string(view.output_tokens));
    case kTokenForwarding:
      return set_value(r, v, view.forward_reason < 0
                                 ? std::string()
                                 : std::string(omni::forward_reason_name(
                                       static_cast<omni::ForwardReason>(view.forward_reason))));
    case kTokenizeMs:
      return set_value(r, v, view.forward_reason < 0
                                 ? std::string()
                                 : ms(static_cast<double>(view.tokenize_wall_ns)));
    case kPrefixKey:
      break;  // answered above
    case kPrefillRoute:
      return set_value(r, v, view.kv ? kv_explain_text(view.kv->pools[0], view.kv->route[0]) : "");
    case kDecodeRoute:
      return set_value(r, v, view.kv ? kv_explain_text(view.kv->pools[1], view.kv->route[1]) : "");
    case kPredictedCached:
      return set_value(r, v, view.kv && view.kv->route[0].set
                                 ? std::to_string(view.kv->route[0].cached)
                                 : std::string());
    case kCachedTokens:
      return set_value(r, v, view.kv && view.kv->actual_cached >= 0
                                 ? std::to_string(view.kv->actual_cached)
                                 : std::string());
  }
  return set_value(r, v, {});
} catch (...) {
  log_exception(r->connection->log, "variable");
  return NGX_ERROR;
}

}  // namespace

ngx_int_t add_variables(ngx_conf_t* cf) noexcept try {
  struct Def {
    std::string name;
    uintptr_t data;
  };
  std::vector<Def> defs = {
      {"omni_request_id", kRequestId},     {"omni_stages", kStages},
      {"omni_total_ms", kTotal},           {"omni_ttft_ms", kTtft},
      {"omni_tpot_ms", kTpot},             {"omni_prefill_peer", kPrefillPeer},
      {"omni_decode_peer", kDecodePeer},   {"omni_prompt_tokens", kPromptTokens},
      {"omni_output_tokens", kOutputTokens}, {"omni_token_forwarding", kTokenForwarding},
      {"omni_tokenize_ms", kTokenizeMs},   {"omni_prefix_key", kPrefixKey},
      {"omni_prefill_route", kPrefillRoute}, {"omni_decode_route", kDecodeRoute},
      {"omni_predicted_cached_tokens", kPredictedCached}, {"omni_cached_tokens", kCachedTokens},
  };
  for (std::size_t i = 0; i + 1 < omni::kStageCount; ++i) {
    defs.push_back({"omni_stage_" + std::string(omni::stage_name(*omni::stage_at(i))) + "_ms", i});
  }
  for (const Def& d : defs) {
    ngx_str_t name;
    name.len = d.name.size();
    name.data = static_cast<u_char*>(ngx_pnalloc(cf->pool, d.name.size()));
    if (name.data == nullptr) return NGX_ERROR;
    ngx_memcpy(name.data, d.name.data(), d.name.size());
    ngx_http_variable_t* var = ngx_http_add_variable(cf, &name, NGX_HTTP_VAR_NOCACHEABLE);
    if (var == nullptr) return NGX_ERROR;
    var->get_handler = get;
    var->data = d.data;
  }
  return NGX_OK;
} catch (...) {
  log_exception(cf->log, "add_variables");
  return NGX_ERROR;
}

}  // namespace omni::ngx
