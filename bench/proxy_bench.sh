#!/usr/bin/env bash
# What does the proxy cost? h2load (HTTP/1.1, keep-alive) sends small non-streamed completions
# (4 output tokens) three ways in one invocation:
#   1. direct:     straight to one omni-sim instance (the baseline);
#   2. aggregated: through nginx (2 workers) with omni_proxy, one leg, to that same instance;
#   3. sequential: through nginx, a prefill leg then a decode leg (vLLM P/D, KV pull) to a
#                  prefill and a decode omni-sim instance.
# omni-sim runs 100x faster than real time (--time-scale 0.01), so the engines add little and the
# proxy's share shows. Each run prints JSON (req/s, mean and max latency, failures); the summary
# gives the proxied runs' throughput and mean latency relative to the direct run.
#
# usage: bench/proxy_bench.sh [BUILD_DIR] [REQUESTS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${1:-build}"
REQUESTS="${2:-4000}"
CONNECTIONS="${3:-32}"
SIM="$BUILD_DIR/sim/omni-sim"
MODULE_SO="$(pwd)/$BUILD_DIR/nginx-build/objs/ngx_http_omni_proxy_module.so"
[ -x "$SIM" ] && [ -f "$MODULE_SO" ] || {
  echo "build first: cmake --build $BUILD_DIR (omni-sim and the module)" >&2; exit 1; }
command -v h2load >/dev/null || { echo "h2load is missing: scripts/setup.sh installs it" >&2; exit 1; }

. bench/lib.sh
agg_port=$(sim agg --engine vllm)
prefill_port=$(sim prefill --engine vllm --role prefill)
decode_port=$(sim decode --engine vllm --role decode)
nginx_agg=$(free_port)
nginx_seq=$(free_port)

cat > "$dir/nginx.conf" <<EOF
load_module $MODULE_SO;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
worker_processes 2;
events { worker_connections 4096; }
http {
$(http_preamble)
    omni_proxy_zone omni 4m;
    upstream agg { server 127.0.0.1:$agg_port; keepalive 64; }
    upstream prefill { server 127.0.0.1:$prefill_port; keepalive 64; }
    upstream decode { server 127.0.0.1:$decode_port; keepalive 64; }
    server {
        listen 127.0.0.1:$nginx_agg;
        location /v1/ { omni_proxy; omni_proxy_upstream agg; }
    }
    server {
        listen 127.0.0.1:$nginx_seq;
        location /v1/ { omni_proxy; omni_proxy_mode sequential;
                        omni_proxy_prefill_upstream prefill; omni_proxy_decode_upstream decode; }
    }
}
EOF
/usr/sbin/nginx -p "$dir" -c "$dir/nginx.conf"
sleep 0.5

echo '{"prompt": "How much does a proxy cost per request? Measure it.", "max_tokens": 4}' \
  > "$dir/body.json"

run() {  # name, port
  local out
  out=$(h2load --h1 -n "$REQUESTS" -c "$CONNECTIONS" -d "$dir/body.json" \
        -H 'Content-Type: application/json' "http://127.0.0.1:$2/v1/completions" 2>&1)
  /usr/bin/python3 - "$1" "$out" <<'PY'
import json, re, sys
name, out = sys.argv[1], sys.argv[2]
rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
req = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
status = re.search(r"status codes: (\d+) 2xx", out)
t = re.search(r"time for request:\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)", out)
ms = lambda v, u: float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[u]
print(json.dumps({"run": name, "requests": int(req.group(1)), "ok_2xx": int(status.group(1)),
                  "failed": int(req.group(3)), "req_per_s": rps,
                  "latency_ms_mean": round(ms(t.group(5), t.group(6)), 3),
                  "latency_ms_max": round(ms(t.group(3), t.group(4)), 3)}))
PY
}
run direct "$agg_port" | tee "$dir/direct.json"
run aggregated "$nginx_agg" | tee "$dir/aggregated.json"
run sequential "$nginx_seq" | tee "$dir/sequential.json"
/usr/bin/python3 - "$dir" <<'PY'
import json, sys
d = {n: json.load(open("%s/%s.json" % (sys.argv[1], n))) for n in ("direct", "aggregated", "sequential")}
base = d["direct"]
print(json.dumps({"summary": "through nginx vs direct to omni-sim",
                  "aggregated_rps_ratio": round(d["aggregated"]["req_per_s"] / base["req_per_s"], 3),
                  "aggregated_latency_ratio": round(d["aggregated"]["latency_ms_mean"] / base["latency_ms_mean"], 3),
                  "aggregated_added_ms_mean": round(d["aggregated"]["latency_ms_mean"] - base["latency_ms_mean"], 3),
                  "sequential_rps_ratio": round(d["sequential"]["req_per_s"] / base["req_per_s"], 3),
                  "failed": sum(v["failed"] for v in d.values())}))
PY
if grep -E '\[(alert|crit|emerg)\]' "$dir/logs/error.log" >&2; then exit 1; fi
