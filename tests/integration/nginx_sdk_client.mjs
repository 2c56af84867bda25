// Drives the official OpenAI SDK (npm `openai`, v6) against omni_proxy locations and prints one
// JSON object describing what the SDK saw; test_nginx_openai_sdk.py starts nginx and omni-sim,
// runs this script and asserts on its output. Not a *.test.mjs file: ctest runs those directly.
//
// usage: node nginx_sdk_client.mjs '{"seq": "http://127.0.0.1:P/v1", "agg": "http://...", ...}'
//   every key names a location; the output has one entry per key.
import OpenAI from "openai";

const targets = JSON.parse(process.argv[2] ?? "{}");
const MAX_TOKENS = 7;

// A failed call becomes data for the Python side to assert on, never an unhandled rejection.
function describeError(err) {
  return {
    thrown: true,
    class: err?.constructor?.name ?? null,
    is_api_error: err instanceof OpenAI.APIError,
    is_bad_request: err instanceof OpenAI.BadRequestError,
    is_not_found: err instanceof OpenAI.NotFoundError,
    status: err?.status ?? null,
    message: String(err?.message ?? err),
    error: err?.error ?? null,
    code: err?.code ?? null,
    param: err?.param ?? null,
    type: err?.type ?? null,
  };
}

async function guarded(fn) {
  try {
    return await fn();
  } catch (err) {
    return describeError(err);
  }
}

async function chatNonStreamed(client, tag) {
  const r = await client.chat.completions.create(
    {
      model: "omni-sim",
      messages: [
        { role: "system", content: "You are a helpful assistant." },
        { role: "user", content: "Tell me about prefill and decode." },
      ],
      max_tokens: MAX_TOKENS,
    },
    { headers: { "X-Request-Id": `sdk-${tag}-chat` } },
  );
  return {
    id: r.id,
    request_id: r._request_id ?? null,
    object: r.object,
    model: r.model,
    choices: r.choices.map((c) => ({
      index: c.index,
      role: c.message?.role ?? null,
      content: c.message?.content ?? null,
      finish_reason: c.finish_reason,
    })),
    usage: r.usage,
  };
}

async function chatStreamed(client, tag, extra = {}) {
  const stream = await client.chat.completions.create(
    {
      model: "omni-sim",
      messages: [{ role: "user", content: "Stream me a few words." }],
      stream: true,
      stream_options: { include_usage: true },
      ...extra,
    },
    { headers: { "X-Request-Id": `sdk-${tag}-chat-stream` } },
  );
  const out = { chunks: 0, choice_chunks: 0, content_chunks: 0, roles: [], text: "",
                finish_reasons: [], indices: [], ids: [], objects: [], usage: null,
                usage_chunks: 0 };
  for await (const chunk of stream) {
    out.chunks += 1;
    out.ids.push(chunk.id);
    out.objects.push(chunk.object);
    if (chunk.usage) {
      out.usage = chunk.usage;
      out.usage_chunks += 1;
    }
    for (const c of chunk.choices) {
      out.choice_chunks += 1;
      out.indices.push(c.index);
      if (c.delta?.role) out.roles.push(c.delta.role);
      if (c.delta?.content) {
        out.content_chunks += 1;
        out.text += c.delta.content;
      }
      if (c.finish_reason) out.finish_reasons.push(c.finish_reason);
    }
  }
  out.ids = [...new Set(out.ids)];
  out.objects = [...new Set(out.objects)];
  return out;
}

async function completionNonStreamed(client, tag) {
  const r = await client.completions.create(
    {
      model: "omni-sim",
      prompt: "The quick brown fox jumps over the lazy dog",
      max_tokens: MAX_TOKENS,
    },
    { headers: { "X-Request-Id": `sdk-${tag}-cmpl` } },
  );
  return {
    id: r.id,
    request_id: r._request_id ?? null,
    object: r.object,
    choices: r.choices.map((c) => ({
      index: c.index,
      text: c.text,
      finish_reason: c.finish_reason,
    })),
    usage: r.usage,
  };
}

async function completionStreamed(client, tag) {
  const stream = await client.completions.create(
    {
      model: "omni-sim",
      prompt: [1000, 1001, 1002, 1003, 1004],
      max_tokens: MAX_TOKENS,
      stream: true,
      stream_options: { include_usage: true },
    },
    { headers: { "X-Request-Id": `sdk-${tag}-cmpl-stream` } },
  );
  const out = { chunks: 0, choice_chunks: 0, text_chunks: 0, text: "", finish_reasons: [],
                indices: [], ids: [], usage: null, usage_chunks: 0 };
  for await (const chunk of stream) {
    out.chunks += 1;
    out.ids.push(chunk.id);
    if (chunk.usage) {
      out.usage = chunk.usage;
      out.usage_chunks += 1;
    }
    for (const c of chunk.choices ?? []) {
      out.choice_chunks += 1;
      out.indices.push(c.index);
      if (c.text) {
        out.text_chunks += 1;
        out.text += c.text;
      }
      if (c.finish_reason) out.finish_reasons.push(c.finish_reason);
    }
  }
  out.ids = [...new Set(out.ids)];
  return out;
}

async function runTarget(baseURL, tag) {
  const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 20_000 });
  return {
    chat: await guarded(() => chatNonStreamed(client, tag)),
    chat_stream: await guarded(() => chatStreamed(client, tag, { max_tokens: MAX_TOKENS })),
    // No max_tokens: omni-sim stops by itself (--default-max-tokens), finish_reason "stop".
    chat_stream_default_length: await guarded(() => chatStreamed(client, `${tag}-default`)),
    completion: await guarded(() => completionNonStreamed(client, tag)),
    completion_stream: await guarded(() => completionStreamed(client, tag)),
    // Invalid requests: the SDK sends them as given (it does not validate), the proxy answers.
    missing_messages: await guarded(() =>
      client.chat.completions.create({ model: "omni-sim", max_tokens: 3 })),
    missing_messages_stream: await guarded(async () => {
      const s = await client.chat.completions.create({
        model: "omni-sim",
        max_tokens: 3,
        stream: true,
      });
      for await (const _ of s) { /* drain */ }
      return { thrown: false };
    }),
    zero_max_tokens: await guarded(() =>
      client.completions.create({ model: "omni-sim", prompt: "x", max_tokens: 0 })),
    unknown_model: await guarded(() =>
      client.chat.completions.create({
        model: "no-such-model",
        messages: [{ role: "user", content: "x" }],
        max_tokens: 2,
      })),
  };
}

const out = {};
for (const [tag, baseURL] of Object.entries(targets)) out[tag] = await runTarget(baseURL, tag);
process.stdout.write(JSON.stringify(out) + "\n");
