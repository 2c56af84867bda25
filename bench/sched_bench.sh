#!/usr/bin/env bash
# The scheduler's own cost at a fixed request rate: how long from enqueue until the owning
# worker acts on its decision, how long the scheduler's shared-memory lock is held and waited
# for, and what queueing through the scheduler adds to the proxy's latency, against routing
# alone in the same run.
#
# Two nginx instances with the module (2 workers each) in front of a backend so cheap it never
# limits them (a third nginx answering a canned completion, as in overhead_bench.sh):
#   routing    omni_proxy_policy kv_aware (the same decision, made in the balancer)
#   scheduled  the same plus omni_proxy_schedule on (every request goes through the shared
#              queue, the scheduling worker and a wake-up of its owner)
# h2load sends RATE req/s (default 2000) for SECONDS to each, alternating, ROUNDS times.
# Figures per round: the scheduler's histograms (decision latency = enqueue -> owner acting,
# notify latency = decision -> owner acting, lock hold and contended wait), read from
# /omni/metrics before and after the round; h2load's latency percentiles for both.
#
# usage: bench/sched_bench.sh [BUILD_DIR] [RATE] [SECONDS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${1:-build}"
RATE="${2:-2000}"
SECONDS_PER_RUN="${3:-10}"
ROUNDS="${4:-3}"
MODULE_SO="$(readlink -f "$BUILD_DIR")/nginx-build/objs/ngx_http_omni_proxy_module.so"
[ -f "$MODULE_SO" ] || { echo "no module at $MODULE_SO: build first" >&2; exit 1; }
command -v h2load >/dev/null || { echo "h2load is missing: scripts/setup.sh installs it" >&2; exit 1; }
# shellcheck source=bench/lib.sh
source bench/lib.sh

ports=()
while [ "${#ports[@]}" -lt 4 ]; do
  p="$(free_port)"
  case " ${ports[*]} " in *" $p "*) ;; *) ports+=("$p") ;; esac
done
backend_port="${ports[0]}"; backend_port2="${ports[1]}"
routing_port="${ports[2]}"; scheduled_port="${ports[3]}"

cat > "$dir/body.json" <<'JSON'
{"model":"m","prompt":"How long does the scheduler take to decide? Measure it at a fixed rate.","max_tokens":4}
JSON
cat > "$dir/backend.conf" <<CONF
pid $dir/backend.nginx.pid;
error_log $dir/logs/backend.error.log warn;
worker_processes 1;
events { worker_connections 8192; }
http {
$(http_preamble)
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$backend_port;
        listen 127.0.0.1:$backend_port2;
        location = /v1/completions {
            default_type application/json;
            return 200 '{"id":"cmpl-b","object":"text_completion","created":1764000000,"model":"m","choices":[{"index":0,"text":" one two three four","logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":16,"completion_tokens":4,"total_tokens":20}}';
        }
        location = /metrics {
            default_type text/plain;
            return 200 'vllm:num_requests_running{engine="0"} 0\nvllm:num_requests_waiting{engine="0"} 0\nvllm:kv_cache_usage_perc{engine="0"} 0.1\n';
        }
    }
}
CONF
module_conf() {  # NAME PORT EXTRA_HTTP EXTRA_LOCATION
  cat > "$dir/$1.conf" <<CONF
load_module $MODULE_SO;
pid $dir/$1.nginx.pid;
error_log $dir/logs/$1.error.log warn;
worker_processes 2;
events { worker_connections 8192; }
http {
$(http_preamble)
    keepalive_requests 1000000;
    omni_proxy_zone omni 64m;
    $3
    upstream backend {
        server 127.0.0.1:$backend_port;
        server 127.0.0.1:$backend_port2;
        keepalive 64;
        keepalive_timeout 4s;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$2 reuseport;
        location /v1/ { omni_proxy; omni_proxy_upstream backend; omni_proxy_policy kv_aware; $4 }
        location /omni/metrics { omni_proxy_metrics; }
        location /omni/status { omni_proxy_status; }
    }
}
CONF
}
module_conf routing "$routing_port" "" ""
module_conf scheduled "$scheduled_port" "omni_proxy_scheduler queue=8192 max_wait=5s;" \
  "omni_proxy_schedule on;"
nginx_start backend
nginx_start routing
nginx_start scheduled

/usr/bin/python3 - "$dir" "$RATE" "$SECONDS_PER_RUN" "$ROUNDS" "$routing_port" "$scheduled_port" <<'PY'
import json, re, subprocess, sys, time, urllib.request

d, rate, seconds, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ports = {"routing": int(sys.argv[5]), "scheduled": int(sys.argv[6])}
CONNS = 32

def status(port):
    return json.loads(urllib.request.urlopen("http://127.0.0.1:%d/omni/status" % port,
                                             timeout=10).read())

def hist(st, path):
    """The [upper_ns, count] buckets of a scheduler histogram in a status document."""
    node = st["scheduler"]
    for key in path:
        node = node[key]
    return {b[0]: b[1] for b in node.get("buckets", [])}

def quantile(before, after, q):
    """The upper bound (us) under which a fraction q of the period's observations fall."""
    delta = {ub: after[ub] - before.get(ub, 0) for ub in after}
    total = sum(delta.values())
    if total <= 0:
        return None, 0
    seen = 0
    for ub in sorted(delta):
        seen += delta[ub]
        if seen >= q * total:
            return ub / 1e3, int(total)
    return None, int(total)

def h2load(name, secs):
    per_conn = max(1, rate // CONNS)
    log = "%s/%s.h2load.log" % (d, name)
    cmd = ["h2load", "--h1", "-c", str(CONNS), "-d", d + "/body.json",
           "-H", "Content-Type: application/json", "--rps", str(per_conn),
           "-n", str(per_conn * CONNS * secs), "-r", str(max(1, CONNS // 8)),
           "--rate-period", "1ms", "--log-file", log,
           "http://127.0.0.1:%d/v1/completions" % ports[name]]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=secs * 6 + 60).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    lat = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", out)
    def us(v):
        m = re.match(r"([\d.]+)(us|ms|s)", v)
        return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]
    lats = sorted(int(line.split()[2]) for line in open(log) if len(line.split()) >= 3)
    pct = lambda q: lats[min(len(lats) - 1, int(q * len(lats)))] if lats else None  # noqa: E731
    return {"done": int(done.group(1)), "ok": int(done.group(2)), "failed": int(done.group(3)),
            "rps": float(rps.group(1)), "mean_us": us(lat.group(3)), "max_us": us(lat.group(2)),
            "p50_us": pct(0.50), "p99_us": pct(0.99)}

HISTS = {"decision_latency": ["decision_latency"], "notify_latency": ["notify_latency"],
         "lock_hold": ["lock", "hold"], "lock_wait": ["lock", "wait"]}

for name in ports:  # warm-up: connections, keepalive pools, the cost models
    h2load(name, 2)
print("sched_bench: %d req/s for %d s per run, %d rounds, %d connections, 2 workers" %
      (rate, seconds, rounds, CONNS))
rows = []
for rnd in range(rounds):
    for name in ("routing", "scheduled"):
        st0 = status(ports[name])
        r = h2load(name, seconds)
        row = {"round": rnd, "system": name, **r}
        if name == "scheduled":
            st1 = status(ports[name])
            for short, path in HISTS.items():
                p50, n = quantile(hist(st0, path), hist(st1, path), 0.50)
                p99, _ = quantile(hist(st0, path), hist(st1, path), 0.99)
                row[short] = {"count": n, "p50_us_at_most": p50, "p99_us_at_most": p99}
            s0, s1 = st0["scheduler"], st1["scheduler"]
            row["passes_per_request"] = ((s1["counters"]["passes"] - s0["counters"]["passes"]) /
                                         max(1, s1["counters"]["enqueued"] - s0["counters"]["enqueued"]))
            row["lock_acquisitions_per_request"] = (
                (s1["lock"]["acquired"] - s0["lock"]["acquired"]) /
                max(1, s1["counters"]["enqueued"] - s0["counters"]["enqueued"]))
            row["lock_hold_max_us"] = s1["lock"]["hold"].get("max_us")
        rows.append(row)
        print(json.dumps(row))
        sys.stdout.flush()

def med(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None

print()
print("| figure | routing alone | scheduled |")
print("|---|---|---|")
for key, label in (("rps", "achieved req/s"), ("p50_us", "client latency p50, us"),
                   ("p99_us", "client latency p99, us"), ("failed", "failed requests")):
    a = med([r[key] for r in rows if r["system"] == "routing"])
    b = med([r[key] for r in rows if r["system"] == "scheduled"])
    print("| %s | %s | %s |" % (label, a, b))
sch = [r for r in rows if r["system"] == "scheduled"]
for short, label in (("decision_latency", "decision latency (enqueue -> owner acts)"),
                     ("notify_latency", "notification (decision -> owner acts)"),
                     ("lock_hold", "lock hold"), ("lock_wait", "lock wait (contended)")):
    p50 = med([r[short]["p50_us_at_most"] for r in sch])
    p99 = med([r[short]["p99_us_at_most"] for r in sch])
    n = med([r[short]["count"] for r in sch])
    print("| %s p50 / p99, us (bucket bounds, within 25%%) | | %s / %s (n=%s) |" % (label, p50, p99, n))
print("| scheduler passes per request | | %.2f |" % med([r["passes_per_request"] for r in sch]))
print("| lock acquisitions per request | | %.2f |" % med([r["lock_acquisitions_per_request"] for r in sch]))
for key in ("p50_us", "p99_us"):
    ratio = med([r[key] for r in sch]) / med([r[key] for r in rows if r["system"] == "routing"])
    print("scheduled / routing client latency %s: %.2f" % (key[:3], ratio))
PY
