// One vLLM-style P/D request by hand, as a proxy sends it (see docs/simulator.md):
//  1. the prefill leg: the client body with max_tokens 1, stream false and
//     kv_transfer_params.do_remote_decode; its answer names the KV blocks it holds;
//  2. the decode leg: the client body plus those kv_transfer_params, streamed back.
// usage: node examples/pd_round.mjs PREFILL_URL DECODE_URL [PROMPT]
const [prefillUrl, decodeUrl, prompt = "Explain prefix caching in one sentence."] =
  process.argv.slice(2);
if (!prefillUrl || !decodeUrl) {
  console.error("usage: node examples/pd_round.mjs PREFILL_URL DECODE_URL [PROMPT]");
  process.exit(2);
}
const requestId = `demo-${Date.now()}`;
const client = {
  model: "omni-sim",
  messages: [{ role: "user", content: prompt }],
  max_tokens: 16,
  stream: true,
  stream_options: { include_usage: true },
};
const headers = { "Content-Type": "application/json", "X-Request-Id": requestId };

const prefillBody = { ...client, max_tokens: 1, stream: false };
delete prefillBody.stream_options;
prefillBody.kv_transfer_params = {
  do_remote_decode: true, do_remote_prefill: false, remote_engine_id: null,
  remote_block_ids: null, remote_host: null, remote_port: null,
};
const t0 = performance.now();
const p = await fetch(`${prefillUrl}/v1/chat/completions`, {
  method: "POST", headers, body: JSON.stringify(prefillBody),
});
const prefill = await p.json();
if (!p.ok) throw new Error(`prefill failed: ${p.status} ${JSON.stringify(prefill)}`);
const kv = prefill.kv_transfer_params;
console.log(`prefill: ${p.status} in ${(performance.now() - t0).toFixed(1)} ms, ` +
            `holds ${kv.remote_block_ids.length} blocks on engine ${kv.remote_engine_id}`);

const d = await fetch(`${decodeUrl}/v1/chat/completions`, {
  method: "POST", headers, body: JSON.stringify({ ...client, kv_transfer_params: kv }),
});
if (!d.ok) throw new Error(`decode failed: ${d.status} ${await d.text()}`);
process.stdout.write("decode:  ");
let usage = null;
let buffer = "";
const decoder = new TextDecoder();
for await (const bytes of d.body) {
  buffer += decoder.decode(bytes, { stream: true });
  let end;
  while ((end = buffer.indexOf("\n\n")) >= 0) {
    const event = buffer.slice(0, end);
    buffer = buffer.slice(end + 2);
    if (!event.startsWith("data: ")) continue;
    const data = event.slice(6);
    if (data === "[DONE]") continue;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(`decode error: ${JSON.stringify(chunk.error)}`);
    if (chunk.choices?.length) process.stdout.write(chunk.choices[0].delta.content ?? "");
    if (chunk.usage) usage = chunk.usage;
  }
}
process.stdout.write("\n");
console.log(`P/D round done in ${(performance.now() - t0).toFixed(1)} ms; usage ${JSON.stringify(usage)}`);
