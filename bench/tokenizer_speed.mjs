// The reference JS tokenizer's throughput on the same corpus, for bench/tokenizer_bench.sh.
//   node bench/tokenizer_speed.mjs DIR CORPUS [SECONDS]   (run from the source folder)
import fs from "node:fs";
import { Tokenizer } from "@huggingface/tokenizers";

const [dir, corpus, secondsArg] = process.argv.slice(2);
const budget = Number(secondsArg ?? 3);
const docs = fs.readFileSync(corpus, "utf8").split("\n").filter((l) => l.trim()).map((l) => JSON.parse(l));
const bytes = docs.reduce((s, d) => s + Buffer.byteLength(d, "utf8"), 0);
const heap0 = process.memoryUsage().rss;
let t0 = performance.now();
const tok = new Tokenizer(JSON.parse(fs.readFileSync(`${dir}/tokenizer.json`, "utf8")),
                          JSON.parse(fs.readFileSync(`${dir}/tokenizer_config.json`, "utf8")));
const loadMs = performance.now() - t0;
const rssDelta = process.memoryUsage().rss - heap0;
let tokens = 0;
t0 = performance.now();
for (const d of docs) tokens += tok.encode(d, { add_special_tokens: false }).ids.length;
const cold = (performance.now() - t0) / 1e3;
let passes = 0;
let warm = 0;
t0 = performance.now();
do {
  for (const d of docs) tok.encode(d, { add_special_tokens: false });
  passes++;
  warm = (performance.now() - t0) / 1e3;
} while (warm < budget);
console.log(JSON.stringify({
  impl: "huggingface-js", load_ms: loadMs, rss_delta_bytes: rssDelta, bytes, tokens,
  cold_mb_s: bytes / cold / 1e6, warm_mb_s: (bytes * passes) / warm / 1e6, passes,
}));
