// The official OpenAI SDK (npm `openai`, v6) against omni-sim: a real client parses our
// streamed and non-streamed answers and our errors.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, existsSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import OpenAI from "openai";

const sim = process.env.OMNI_SIM;
let proc;
let dir;
let client;

before(async () => {
  assert.ok(sim, "OMNI_SIM must point at omni-sim (run through ctest)");
  dir = mkdtempSync(join(tmpdir(), "omni-sdk-"));
  const ready = join(dir, "ready.json");
  proc = spawn(sim, ["--port", "0", "--ready-file", ready, "--duration", "60"], { stdio: "ignore" });
  const deadline = Date.now() + 10_000;
  while (!existsSync(ready)) {
    if (Date.now() > deadline) throw new Error("omni-sim did not start");
    await new Promise((r) => setTimeout(r, 20));
  }
  const port = JSON.parse(readFileSync(ready, "utf8")).instances[0].http_port;
  client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "unused", maxRetries: 0 });
});

after(() => {
  proc?.kill("SIGTERM");
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test("streamed chat completion", async () => {
  const stream = await client.chat.completions.create({
    model: "omni-sim",
    messages: [{ role: "user", content: "Hello there" }],
    max_tokens: 6,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.choices.length) {
      text += chunk.choices[0].delta.content ?? "";
      finish = chunk.choices[0].finish_reason ?? finish;
    }
    if (chunk.usage) usage = chunk.usage;
  }
  assert.ok(text.length > 0);
  assert.equal(finish, "length");
  assert.equal(usage.completion_tokens, 6);
  assert.equal(usage.total_tokens, usage.prompt_tokens + 6);
});

test("non-streamed completion with token ids", async () => {
  const r = await client.completions.create({ model: "omni-sim", prompt: [1000, 1001, 1002], max_tokens: 3 });
  assert.equal(r.object, "text_completion");
  assert.equal(r.usage.prompt_tokens, 3);
  assert.equal(r.usage.completion_tokens, 3);
  assert.equal(r.choices[0].finish_reason, "length");
});

test("models list", async () => {
  const models = await client.models.list();
  assert.deepEqual(models.data.map((m) => m.id), ["omni-sim"]);
});

test("errors surface as typed SDK errors", async () => {
  await assert.rejects(
    client.chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "x" }] }),
    (err) => err instanceof OpenAI.NotFoundError && err.status === 404 && /does not exist/.test(err.message),
  );
  await assert.rejects(
    client.completions.create({ model: "omni-sim", prompt: "x", max_tokens: 0 }),
    (err) => err instanceof OpenAI.BadRequestError && err.status === 400,
  );
});
