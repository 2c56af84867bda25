#!/usr/bin/env bash
# Is omni-sim ever the bottleneck? One omni-sim process with 8 instances, pinned to one core,
# serves streamed completions to a C++ load generator pinned to the other core. Two runs in the
# same invocation: a light baseline (8 streams) and the target load (512 streams). Each prints
# the measured inter-token latency against the timing model's step time for that batch
# (itl_over_model: 1.0 means the simulator keeps the model's pace) and the simulator's CPU use.
#
# usage: bench/sim_bench.sh [BUILD_DIR] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${1:-build}"
SECONDS_PER_RUN="${2:-10}"
PROFILE="${OMNI_BENCH_PROFILE:-deepseek-v3-h800-decode}"
SIM="$BUILD_DIR/sim/omni-sim"
LOAD="$BUILD_DIR/bench/sim_load"
[ -x "$SIM" ] && [ -x "$LOAD" ] || { echo "build first: cmake --build $BUILD_DIR" >&2; exit 1; }
cores=$(nproc)
pin_sim=""; pin_load=""
if [ "$cores" -ge 2 ] && command -v taskset >/dev/null; then pin_sim="taskset -c 0"; pin_load="taskset -c 1"; fi

run() {  # streams
  local streams="$1" dir
  dir="$(mktemp -d)"
  $pin_sim "$SIM" --engine vllm --instances 8 --port 0 --profile "$PROFILE" \
    --max-num-seqs 1024 --ready-file "$dir/ready.json" --duration $((SECONDS_PER_RUN + 30)) \
    > "$dir/sim.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 200); do [ -f "$dir/ready.json" ] && break; sleep 0.05; done
  local ports
  ports=$(/usr/bin/python3 -c "import json,sys; print(','.join(str(i['http_port']) for i in json.load(open(sys.argv[1]))['instances']))" "$dir/ready.json")
  local ticks t0 t1 w0 w1
  ticks=$(getconf CLK_TCK)
  # CPU time of the simulator over the measured window (after a 2 s warm-up).
  ( sleep 2; awk '{print $14+$15}' "/proc/$pid/stat" > "$dir/cpu0"; date +%s.%N > "$dir/w0"
    sleep "$SECONDS_PER_RUN"; awk '{print $14+$15}' "/proc/$pid/stat" > "$dir/cpu1"; date +%s.%N > "$dir/w1" ) &
  local sampler=$!
  local result
  result=$($pin_load "$LOAD" --ports "$ports" --streams "$streams" --seconds "$SECONDS_PER_RUN" \
           --warmup 2 --max-tokens 200 --prompt-tokens 100 --profile "$PROFILE")
  wait "$sampler"
  t0=$(cat "$dir/cpu0"); t1=$(cat "$dir/cpu1"); w0=$(cat "$dir/w0"); w1=$(cat "$dir/w1")
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  local cpu
  cpu=$(awk -v a="$t0" -v b="$t1" -v c="$ticks" -v x="$w0" -v y="$w1" 'BEGIN{printf "%.3f", (b-a)/c/(y-x)}')
  echo "${result%\}},\"sim_cpu_cores\":$cpu,\"profile\":\"$PROFILE\"}"
}
baseline=$(run 8)
load=$(run 512)
echo "$baseline"
echo "$load"
/usr/bin/python3 - "$baseline" "$load" <<'PY'
import json, sys
b, l = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps({"summary": "omni-sim 8 instances, 512 vs 8 streams",
                  "itl_over_model_baseline": b["itl_over_model"],
                  "itl_over_model_512": l["itl_over_model"],
                  "ratio_512_vs_baseline": round(l["itl_over_model"] / b["itl_over_model"], 3),
                  "events_per_s_512": l["events_per_s"], "sim_cpu_cores_512": l["sim_cpu_cores"],
                  "errors": b["errors"] + l["errors"]}))
PY
