#!/usr/bin/env bash
# The proxy's own cost: plain nginx `proxy_pass` against the omni_proxy module in aggregated
# mode (omni_proxy_zone, no tokenizer), both Debian's /usr/sbin/nginx with 2 workers, in front
# of a backend so cheap it is never what limits them: a third nginx (1 worker) answering
# POST /v1/completions with a fixed small OpenAI completion (`return 200`), on 4 ports, so the
# pool has 4 servers and the module's balancer runs its policy on every request (with one
# server it leaves the choice to round robin); it also answers the module's engine poller
# (GET /metrics, once a second per server). Both proxies: the same upstream block (4 servers,
# keepalive 64), keep-alive to the client, `reuseport` listeners.
#
# h2load (HTTP/1.1, keep-alive) sends a small completion body ({"model","prompt","max_tokens"},
# which the module parses) in R rounds, alternating the systems within each round so drift on
# this shared machine hits all of them:
#   1. max throughput, closed loop, C connections: backend alone, plain, module;
#   2. fixed rate = 50% of plain's median max req/s (h2load --rps per connection, connections
#      opened 1/8 per millisecond so their 10 ms rate timers do not fire together): backend alone
#      (the machine's own latency floor), plain, module; latency percentiles from h2load's
#      per-request log.
# CPU per request: utime+stime of each nginx's worker processes (/proc/PID/stat, before and
# after each run) divided by the requests done; also h2load's own.
# Prints one JSON line per run, then a summary with per-round ratios, their median and range,
# and a verdict on each goal (module >= 0.90 of plain's throughput, < 200 us added at p99 at
# 50% load): pass or fail when every round agrees, inconclusive when they disagree. Exits
# non-zero only on errors (failed or non-2xx requests, nginx alerts), not on a missed goal.
#
# usage: bench/overhead_bench.sh [BUILD_DIR] [DURATION_S]
#   env: OMNI_BENCH_ROUNDS (3), OMNI_BENCH_CONNECTIONS (64, closed loop),
#        OMNI_BENCH_RATE_CONNECTIONS (32, fixed rate), OMNI_BENCH_QUIET_CORES (0.25: a fixed-rate
#        round is "quiet" when other processes used at most this many cores during both of its
#        proxy runs; the summary also judges the latency goal on those rounds alone),
#        OMNI_BENCH_PROMPT_WORDS (0: a 12-word prompt, a 111-byte body; N: N words, about 7 bytes
#        each), OMNI_BENCH_ANSWER_WORDS (4: a 242-byte answer; N: N words, about 5 bytes each)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${1:-build}"
DURATION="${2:-10}"
ROUNDS="${OMNI_BENCH_ROUNDS:-3}"
CONNECTIONS="${OMNI_BENCH_CONNECTIONS:-64}"
RATE_CONNECTIONS="${OMNI_BENCH_RATE_CONNECTIONS:-32}"
QUIET="${OMNI_BENCH_QUIET_CORES:-0.25}"
PROMPT_WORDS="${OMNI_BENCH_PROMPT_WORDS:-0}"
ANSWER_WORDS="${OMNI_BENCH_ANSWER_WORDS:-4}"
case "$BUILD_DIR" in /*) ;; *) BUILD_DIR="$(pwd)/$BUILD_DIR" ;; esac
MODULE_SO="$BUILD_DIR/nginx-build/objs/ngx_http_omni_proxy_module.so"
[ -f "$MODULE_SO" ] || { echo "build first: cmake --build $BUILD_DIR (the module)" >&2; exit 1; }
command -v h2load >/dev/null || { echo "h2load is missing: scripts/setup.sh installs it" >&2; exit 1; }

. bench/lib.sh
ports=()  # six distinct free ports: 4 for the backend, then plain's and the module's
while [ "${#ports[@]}" -lt 6 ]; do
  p=$(free_port)
  case " ${ports[*]} " in *" $p "*) ;; *) ports+=("$p") ;; esac
done
backend_ports=("${ports[@]:0:4}")
plain_port=${ports[4]}
module_port=${ports[5]}

# The answer, as `set` lines (an nginx configuration string holds at most about 4 KB) and the
# `return` that joins them; the request body.
/usr/bin/python3 - "$dir" "$PROMPT_WORDS" "$ANSWER_WORDS" <<'PY'
import json, sys
d, prompt_words, answer_words = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
text = (" one two three four" if answer_words == 4 else
        "".join(" w%d" % i for i in range(answer_words)))
answer = json.dumps({"id": "cmpl-bench", "object": "text_completion", "created": 1764000000,
                     "model": "m", "choices": [{"index": 0, "text": text, "logprobs": None,
                                                "finish_reason": "length"}],
                     "usage": {"prompt_tokens": 12, "completion_tokens": answer_words,
                               "total_tokens": 12 + answer_words}}, separators=(",", ":"))
parts = [answer[i:i + 3000] for i in range(0, len(answer), 3000)]
with open(d + "/answer.conf", "w") as f:
    for i, part in enumerate(parts):
        f.write("            set $answer%d '%s';\n" % (i, part))
    f.write("            return 200 '%s';\n" % "".join("$answer%d" % i for i in range(len(parts))))
prompt = ("How much does a proxy cost per request? Measure it with a fast backend."
          if prompt_words == 0 else " ".join("word%d" % i for i in range(prompt_words)))
with open(d + "/body.json", "w") as f:
    f.write(json.dumps({"model": "m", "prompt": prompt, "max_tokens": 4}, separators=(",", ":")))
with open(d + "/answer_bytes", "w") as f:
    f.write(str(len(answer)))
PY
cat > "$dir/backend.conf" <<CONF
pid $dir/backend.nginx.pid;
error_log $dir/logs/backend.error.log warn;
worker_processes 1;
events { worker_connections 4096; }
http {
$(http_preamble)
    keepalive_requests 1000000;
    server {
$(for p in "${backend_ports[@]}"; do echo "        listen 127.0.0.1:$p;"; done)
        location = /v1/completions {
            default_type application/json;
$(cat "$dir/answer.conf")
        }
        # The module's engine poller (default: every second) reads this as a vLLM exposition.
        location = /metrics {
            default_type text/plain;
            return 200 'vllm:num_requests_running{engine="0"} 3\nvllm:num_requests_waiting{engine="0"} 0\nvllm:kv_cache_usage_perc{engine="0"} 0.25\n';
        }
    }
}
CONF
upstream="upstream backend {
$(for p in "${backend_ports[@]}"; do echo "        server 127.0.0.1:$p;"; done)
        keepalive 64;
        keepalive_timeout 4s;
        keepalive_requests 1000000;
    }"
cat > "$dir/plain.conf" <<CONF
pid $dir/plain.nginx.pid;
error_log $dir/logs/plain.error.log warn;
worker_processes 2;
events { worker_connections 4096; }
http {
$(http_preamble)
    keepalive_requests 1000000;
    $upstream
    server {
        listen 127.0.0.1:$plain_port reuseport;
        location /v1/ {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
CONF
cat > "$dir/module.conf" <<CONF
load_module $MODULE_SO;
pid $dir/module.nginx.pid;
error_log $dir/logs/module.error.log warn;
worker_processes 2;
events { worker_connections 4096; }
http {
$(http_preamble)
    keepalive_requests 1000000;
    omni_proxy_zone omni 4m;
    $upstream
    server {
        listen 127.0.0.1:$module_port reuseport;
        location /v1/ { omni_proxy; omni_proxy_upstream backend; }
    }
}
CONF
nginx_start backend
nginx_start plain
nginx_start module


rc=0
/usr/bin/python3 - "$dir" "$DURATION" "$ROUNDS" "$CONNECTIONS" "$RATE_CONNECTIONS" \
  "${backend_ports[0]}" "$plain_port" "$module_port" "$QUIET" <<'PY' || rc=$?
import json, os, re, resource, statistics, subprocess, sys, time

d = sys.argv[1]
duration, rounds, conns, rate_conns = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
quiet_cores = float(sys.argv[9])
ports = {"backend": int(sys.argv[6]), "plain": int(sys.argv[7]), "module": int(sys.argv[8])}
tck = os.sysconf("SC_CLK_TCK")
errors = 0

def master(name):
    return int(open("%s/%s.nginx.pid" % (d, name)).read())

def workers_cpu(name):
    """Seconds of CPU (user + system) of the workers of nginx `name`, and how many there are."""
    m, total, n = master(name), 0, 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == m:
            total += int(fields[11]) + int(fields[12])
            n += 1
    return total / tck, n

def busy_seconds():
    """CPU seconds the whole machine spent busy (not idle or waiting for I/O) since boot."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / tck

def h2load(name, seconds, clients, rps=None, log=None):
    cmd = ["h2load", "--h1", "-c", str(clients), "-d", "%s/body.json" % d,
           "-H", "Content-Type: application/json"]
    if rps:
        # h2load's rate timer fires at most every 10 ms and then sends that period's requests
        # back to back, and clients that connect together fire together. Connecting 1/8 of the
        # clients per millisecond spreads their timers over the period: small bursts, not one
        # burst of every client every 10 ms. -r needs -n instead of -D.
        cmd += ["--rps", str(rps), "-n", str(rps * clients * seconds),
                "-r", str(max(1, clients // 8)), "--rate-period", "1ms"]
    else:
        cmd += ["-D", str(seconds)]
    if log:
        cmd += ["--log-file", log]
    cmd.append("http://127.0.0.1:%d/v1/completions" % ports[name])
    before = {n: workers_cpu(n)[0] for n in ("backend", "plain", "module")}
    busy0 = busy_seconds()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    seconds = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = {n: workers_cpu(n)[0] for n in ("backend", "plain", "module")}
    busy = busy_seconds() - busy0
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    s = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    f = re.search(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s", out)
    if not (m and s and f):
        raise SystemExit("h2load output not understood:\n" + out)
    done, ok = int(m.group(3)), int(s.group(1))
    cpu = {n: after[n] - before[n] for n in after}
    h2 = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    per = lambda sec: round(sec / done * 1e6, 2) if done else None
    r = {"system": name, "requests": done, "ok_2xx": ok,
         "failed": int(m.group(5)) + int(m.group(6)) + int(m.group(7)),
         "non_2xx": done - ok, "req_per_s": float(f.group(3)),
         "cpu_us_per_req": per(cpu[name]) if name != "backend" else None,
         "backend_cpu_us_per_req": per(cpu["backend"]),
         "h2load_cpu_us_per_req": per(h2),
         # cores used by the benchmark's processes, and by everything else on the machine
         "cores_used": round((sum(cpu.values()) + h2) / seconds, 2),
         "other_cores": round(max(0.0, busy - sum(cpu.values()) - h2) / seconds, 2)}
    if log:
        lat = sorted(int(line.split("\t")[2]) for line in open(log)
                     if line.split("\t")[1].startswith("2"))
        q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None
        r.update({"p50_us": q(0.50), "p90_us": q(0.90), "p99_us": q(0.99), "p999_us": q(0.999),
                  "max_us": lat[-1] if lat else None})
        os.remove(log)
    return r

def report(phase, rnd, r):
    global errors
    errors += r["failed"] + r["non_2xx"]
    print(json.dumps({"phase": phase, "round": rnd, **r}), flush=True)
    return r

print(json.dumps({"start": {"duration_s": duration, "rounds": rounds, "connections": conns,
                            "body_bytes": os.path.getsize(d + "/body.json"),
                            "answer_bytes": int(open(d + "/answer_bytes").read()),
                            "rate_connections": rate_conns, "cpus": os.cpu_count(),
                            "loadavg": open("/proc/loadavg").read().split()[:3],
                            "workers": {n: workers_cpu(n)[1] for n in ("backend", "plain", "module")}}}),
      flush=True)
for name in ("backend", "plain", "module"):  # warm-up: connections, caches, keepalive pools
    h2load(name, 2, conns)

maxr = {"backend": [], "plain": [], "module": []}
for rnd in range(1, rounds + 1):
    for name in ("backend", "plain", "module"):
        maxr[name].append(report("max", rnd, h2load(name, duration, conns,
                                                     log="%s/lat.tsv" % d)))

plain_max = statistics.median(r["req_per_s"] for r in maxr["plain"])
per_conn = max(1, round(plain_max * 0.5 / rate_conns))
rate = per_conn * rate_conns
rater = {"backend": [], "plain": [], "module": []}
for rnd in range(1, rounds + 1):
    for name in ("backend", "plain", "module"):
        rater[name].append(report("rate", rnd, h2load(name, duration, rate_conns, rps=per_conn,
                                                      log="%s/lat.tsv" % d)))

def spread(values):
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "per_round": [round(v, 3) for v in values]}

med = lambda rs, k: round(statistics.median(r[k] for r in rs), 2)
verdict = lambda oks: "pass" if all(oks) else "fail" if not any(oks) else "inconclusive"
ratio = [m["req_per_s"] / p["req_per_s"] for p, m in zip(maxr["plain"], maxr["module"])]
add50 = [m["p50_us"] - p["p50_us"] for p, m in zip(rater["plain"], rater["module"])]
add99 = [m["p99_us"] - p["p99_us"] for p, m in zip(rater["plain"], rater["module"])]
cpu_add = [m["cpu_us_per_req"] - p["cpu_us_per_req"] for p, m in zip(maxr["plain"], maxr["module"])]
# Rounds in which nothing else on the machine used more than QUIET cores during either run.
quiet = [i for i, (p, m) in enumerate(zip(rater["plain"], rater["module"]))
         if max(p["other_cores"], m["other_cores"]) <= quiet_cores]
headroom = med(maxr["backend"], "req_per_s") / max(med(maxr["plain"], "req_per_s"),
                                                     med(maxr["module"], "req_per_s"))
summary = {
    "summary": "omni_proxy (aggregated) vs plain proxy_pass, 2 workers each",
    "max_req_per_s": {n: round(med(maxr[n], "req_per_s")) for n in maxr},
    "backend_over_fastest_proxy": round(headroom, 2),
    "throughput_ratio_module_over_plain": spread(ratio),
    "fixed_rate_req_per_s": rate,
    # backend: h2load straight to the backend at the same rate, the machine's own floor.
    "latency_us_at_fixed_rate": {n: {"p50": med(rater[n], "p50_us"), "p99": med(rater[n], "p99_us")}
                                 for n in rater},
    "added_us_p50": spread(add50),
    "added_us_p99": spread(add99),
    "quiet_rounds": {"other_cores_max": quiet_cores, "rounds": [i + 1 for i in quiet],
                     "added_us_p50": [add50[i] for i in quiet],
                     "added_us_p99": [add99[i] for i in quiet]},
    "proxy_cpu_us_per_req": {n: med(maxr[n], "cpu_us_per_req") for n in ("plain", "module")},
    "proxy_cpu_us_per_req_at_rate": {n: med(rater[n], "cpu_us_per_req") for n in ("plain", "module")},
    "added_cpu_us_per_req": spread(cpu_add),
    "backend_cpu_us_per_req": med(maxr["plain"] + maxr["module"], "backend_cpu_us_per_req"),
    "h2load_cpu_us_per_req": med(maxr["plain"] + maxr["module"], "h2load_cpu_us_per_req"),
    "other_cores_median": round(statistics.median(
        r["other_cores"] for rs in (*maxr.values(), *rater.values()) for r in rs), 2),
    # The module's rate as a share of the rate asked for (below 1: it could not keep up, so its
    # latency is that of an overloaded proxy).
    "module_rate_achieved": round(med(rater["module"], "req_per_s") / rate, 3),
    # pass or fail when every round agrees, inconclusive when the rounds disagree.
    "goals": {"throughput_ratio_ge_0.90": verdict([r >= 0.90 for r in ratio]),
              "added_p99_lt_200us": verdict([a < 200 for a in add99]),
              "added_p99_lt_200us_quiet_rounds":
                  verdict([add99[i] < 200 for i in quiet]) if quiet else "no quiet round"},
    "errors": errors,
    "loadavg_end": open("/proc/loadavg").read().split()[:3],
}
print(json.dumps(summary), flush=True)
sys.exit(1 if errors else 0)
PY
for n in backend plain module; do
  if grep -E '\[(alert|crit|emerg)\]' "$dir/logs/$n.error.log" >&2; then rc=1; fi
done
exit "$rc"
