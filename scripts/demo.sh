#!/usr/bin/env bash
# Command 1 of README.md: sets up, builds and runs the demo cluster, then serves until Ctrl-C.
#
# The cluster is simulated vLLM engines (omni-sim): OMNI_DEMO_PREFILL instances in prefill role
# and OMNI_DEMO_DECODE in decode role, publishing KV events. The demo sends a streamed chat
# request through the official OpenAI SDK and one P/D round (prefill leg, KV pull, streamed
# decode leg), then keeps the cluster up for you to try.
#
# Environment: OMNI_DEMO_SECONDS (serve this long, then stop; 0 stops right after the demo;
# unset serves until Ctrl-C), OMNI_DEMO_PREFILL_PORT (8100), OMNI_DEMO_DECODE_PORT (8200),
# OMNI_BUILD_DIR (build). Flags: --no-setup, --no-build.
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
BUILD_DIR="${OMNI_BUILD_DIR:-build}"
PREFILL_PORT="${OMNI_DEMO_PREFILL_PORT:-8100}"
DECODE_PORT="${OMNI_DEMO_DECODE_PORT:-8200}"

if [ "$setup" = 1 ]; then bash scripts/setup.sh; fi
if [ "$build" = 1 ]; then
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DOMNI_BUILD_TESTS=OFF \
    -DOMNI_BUILD_BENCH=OFF > /dev/null
  cmake --build "$BUILD_DIR" -j2
fi
SIM="$BUILD_DIR/sim/omni-sim"
run_dir="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$run_dir"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

start() {  # name, args...
  local name="$1"; shift
  "$SIM" "$@" --ready-file "$run_dir/$name.json" > "$run_dir/$name.log" 2>&1 &
  pids+=("$!")
  for _ in $(seq 1 200); do
    [ -f "$run_dir/$name.json" ] && return 0
    sleep 0.05
  done
  echo "demo: $name did not start:" >&2
  cat "$run_dir/$name.log" >&2
  exit 1
}
start prefill --engine vllm --role prefill --instances 2 --port "$PREFILL_PORT" --kv-events
start decode --engine vllm --role decode --instances 2 --port "$DECODE_PORT" --kv-events

echo "demo: prefill instances on 127.0.0.1:$PREFILL_PORT-$((PREFILL_PORT + 1)), decode on" \
     "127.0.0.1:$DECODE_PORT-$((DECODE_PORT + 1))"
echo
echo "== a streamed chat completion through the OpenAI SDK (decode instance 0) =="
node examples/stream_chat.mjs "http://127.0.0.1:$DECODE_PORT/v1" omni-sim \
  "Say hello to the cluster."
echo
echo "== one P/D round: prefill leg on 127.0.0.1:$PREFILL_PORT, decode leg on 127.0.0.1:$DECODE_PORT =="
node examples/pd_round.mjs "http://127.0.0.1:$PREFILL_PORT" "http://127.0.0.1:$DECODE_PORT"
echo

seconds="${OMNI_DEMO_SECONDS:-}"
if [ "$seconds" = "0" ]; then exit 0; fi
echo "demo: serving; try  curl -N http://127.0.0.1:$DECODE_PORT/v1/chat/completions \\"
echo "        -d '{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":true}'"
if [ -n "$seconds" ]; then
  echo "demo: stopping in $seconds s"
  sleep "$seconds"
else
  echo "demo: Ctrl-C stops it"
  wait
fi
