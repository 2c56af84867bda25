#!/usr/bin/env bash
# Reproduces every table and plot in docs/benchmarks.md, in one unattended command: installs
# what is missing (scripts/setup.sh), builds (RelWithDebInfo, module included), then runs each
# benchmark in turn and keeps its output in one folder. The routing scenarios also copy their
# plots into docs/img/. Takes about 2.5 hours on the 2-core development machine, most of it
# the routing and scheduling scenarios; run it on an otherwise idle machine.
#
# usage: bench/reproduce.sh [BUILD_DIR] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${1:-build}"
OUT="${2:-$(mktemp -d /tmp/omni-benchmarks-XXXXXX)}"
mkdir -p "$OUT"

scripts/setup.sh
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$BUILD_DIR" -j2

step() {  # name, command...: runs one benchmark, its output to the terminal and OUT/name.txt
  local name="$1"; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.txt"
}
step sim_bench bench/sim_bench.sh "$BUILD_DIR" 8
step overhead bench/overhead_bench.sh "$BUILD_DIR"
step policy_bench "$BUILD_DIR/bench/policy_bench" --benchmark_min_time=0.2
step tokenizer bench/tokenizer_bench.sh "$BUILD_DIR" 3
step forwarding bench/forwarding_bench.sh "$BUILD_DIR" 300
step sched_bench bench/sched_bench.sh "$BUILD_DIR" 2000 10 3
step scenarios /usr/bin/python3 bench/scenario.py --build "$BUILD_DIR" --out "$OUT/scenarios" \
  --traces mooncake,multitenant --loads 0.5,1,1.5,2 --repeats 2 --docs
step scenarios_azure /usr/bin/python3 bench/scenario.py --build "$BUILD_DIR" \
  --out "$OUT/scenarios_azure" --traces azure --loads 2,5,10 --repeats 1 --window 600 \
  --time-scale 0.25 --docs
step agreement /usr/bin/python3 bench/agreement.py --build "$BUILD_DIR" --out "$OUT/agreement"
echo "reproduce: every output is in $OUT (routing tables: $OUT/scenarios/report.md)"
