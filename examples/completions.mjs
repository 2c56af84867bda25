// Two text completions with the official OpenAI SDK: one streamed, one not. Prints each
// answer's text, then one JSON line summing it up (the scripts/demo.sh test parses these).
// usage: node examples/completions.mjs BASE_URL [MODEL] [PROMPT]
//   BASE_URL  e.g. http://127.0.0.1:8080/v1
import OpenAI from "openai";

const [baseURL, model = "omni-sim",
       prompt = "Prefill computes the prompt once; decode then streams the answer token by token, " +
                "reading the KV cache the prefill instance computed for it."] =
  process.argv.slice(2);
if (!baseURL) {
  console.error("usage: node examples/completions.mjs BASE_URL [MODEL] [PROMPT]");
  process.exit(2);
}
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 30_000 });
const tag = `${process.pid}-${Date.now()}`;

// Streamed: tokens arrive as the engine produces them.
let started = performance.now();
let firstTokenMs = null;
let chunks = 0;
let usage = null;
let id = null;
const stream = await client.completions.create(
  { model, prompt, max_tokens: 16, stream: true, stream_options: { include_usage: true } },
  { headers: { "X-Request-Id": `demo-stream-${tag}` } },
);
for await (const chunk of stream) {
  id ??= chunk.id;
  const text = chunk.choices[0]?.text;
  if (text) {
    if (firstTokenMs === null) firstTokenMs = performance.now() - started;
    chunks += 1;
    process.stdout.write(text);
  }
  if (chunk.usage) usage = chunk.usage;
}
process.stdout.write("\n");
console.log(JSON.stringify({
  request: "completions, streamed",
  id,
  chunks,
  ttft_ms: Number(firstTokenMs?.toFixed(1)),
  total_ms: Number((performance.now() - started).toFixed(1)),
  usage,
}));

// Not streamed: one JSON answer.
started = performance.now();
const r = await client.completions.create(
  { model, prompt, max_tokens: 8 },
  { headers: { "X-Request-Id": `demo-whole-${tag}` } },
);
console.log(r.choices[0].text);
console.log(JSON.stringify({
  request: "completions, not streamed",
  id: r.id,
  finish_reason: r.choices[0].finish_reason,
  total_ms: Number((performance.now() - started).toFixed(1)),
  usage: r.usage,
}));
