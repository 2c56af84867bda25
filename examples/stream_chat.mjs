// Streams one chat completion with the official OpenAI SDK and prints it as it arrives.
// usage: node examples/stream_chat.mjs BASE_URL [MODEL] [PROMPT]
//   BASE_URL  e.g. http://127.0.0.1:8000/v1
import OpenAI from "openai";

const [baseURL, model = "omni-sim", prompt = "Say hello to the cluster."] = process.argv.slice(2);
if (!baseURL) {
  console.error("usage: node examples/stream_chat.mjs BASE_URL [MODEL] [PROMPT]");
  process.exit(2);
}
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 30_000 });
const started = performance.now();
let firstTokenMs = null;
let chunks = 0;
const stream = await client.chat.completions.create({
  model,
  messages: [
    { role: "system", content: "You are a helpful assistant." },
    { role: "user", content: prompt },
  ],
  max_tokens: 24,
  stream: true,
  stream_options: { include_usage: true },
});
let usage = null;
for await (const chunk of stream) {
  const delta = chunk.choices[0]?.delta?.content;
  if (delta) {
    if (firstTokenMs === null) firstTokenMs = performance.now() - started;
    chunks += 1;
    process.stdout.write(delta);
  }
  if (chunk.usage) usage = chunk.usage;
}
process.stdout.write("\n");
console.log(JSON.stringify({
  chunks,
  ttft_ms: Number(firstTokenMs?.toFixed(1)),
  total_ms: Number((performance.now() - started).toFixed(1)),
  usage,
}));
