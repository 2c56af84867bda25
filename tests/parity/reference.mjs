// Builds the tokenizer/chat-template parity corpus and the reference answers for it.
//
//   node tests/parity/reference.mjs --tokenizers DIR --data DIR --out DIR [--only NAME]
//
// DIR/<name>/{tokenizer.json,tokenizer_config.json} for name in deepseek_v3, qwen3, llama3_1.
// For each tokenizer it writes, into --out:
//   <name>.encode.in.jsonl / .expected.jsonl  {"text"|"hex", "add_special_tokens"} -> {"ids"}
//   <name>.decode.in.jsonl / .expected.jsonl  {"ids", "skip_special_tokens"} -> {"text"}
//   <name>.chat.in.jsonl   / .expected.jsonl  {"messages", "tools", "add_generation_prompt",
//                                               "chat_template_kwargs"} -> {"prompt", "ids"}
//                                               or {"error": "..."} when the template refuses
// The reference is @huggingface/tokenizers for ids and text, and @huggingface/jinja for the
// rendered prompts, with the variables transformers' apply_chat_template passes.
// Invalid UTF-8 inputs ("hex") reach the reference through TextDecoder, which replaces each
// maximal invalid subsequence with U+FFFD: that is the behaviour the C++ tokenizer defines.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Tokenizer } from "@huggingface/tokenizers";
import { Template } from "@huggingface/jinja";

const here = path.dirname(fileURLToPath(import.meta.url));
const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
for (const k of ["tokenizers", "data", "out"]) {
  if (!args[k]) throw new Error(`--${k} is required`);
}
fs.mkdirSync(args.out, { recursive: true });

// --- The corpus -------------------------------------------------------------------------------
const questions = fs
  .readFileSync(path.join(args.data, "traces", "mt_bench_questions.jsonl"), "utf8")
  .split("\n")
  .filter((l) => l.trim())
  .map((l) => JSON.parse(l));
const hard = JSON.parse(fs.readFileSync(path.join(here, "hard_cases.json"), "utf8"));

// A seeded generator (mulberry32), so the corpus is the same on every run.
function rng(seed) {
  return () => {
    seed |= 0;
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const rand = rng(20261122);
const ranges = [
  [0x20, 0x7e, 30], [0x09, 0x0d, 3], [0xa0, 0xff, 4], [0x100, 0x24f, 3], [0x370, 0x3ff, 2],
  [0x400, 0x4ff, 2], [0x590, 0x6ff, 2], [0x900, 0x97f, 1], [0xe00, 0xe7f, 1], [0x1100, 0x11ff, 1],
  [0x2000, 0x206f, 3], [0x2070, 0x22ff, 2], [0x3000, 0x30ff, 3], [0x4e00, 0x9fff, 6],
  [0xac00, 0xd7a3, 2], [0xff00, 0xffef, 2], [0x1f300, 0x1faff, 4], [0x0300, 0x036f, 3],
  [0x30, 0x39, 6], [0x660, 0x669, 1], [0x1d400, 0x1d7ff, 1], [0x20000, 0x2a6df, 1],
];
const totalWeight = ranges.reduce((s, r) => s + r[2], 0);
function randomCodePoint() {
  let w = rand() * totalWeight;
  for (const [lo, hi, weight] of ranges) {
    if ((w -= weight) < 0) return lo + Math.floor(rand() * (hi - lo + 1));
  }
  return 0x20;
}
function randomText() {
  const n = 1 + Math.floor(rand() * 120);
  let s = "";
  for (let i = 0; i < n; i++) {
    const r = rand();
    if (r < 0.08) s += " ".repeat(1 + Math.floor(rand() * 4));
    else if (r < 0.1) s += "\n";
    else s += String.fromCodePoint(randomCodePoint());
  }
  return s;
}

const texts = [];
for (const h of hard) texts.push(h.hex !== undefined ? { hex: h.hex } : { text: h.text });
for (const q of questions) for (const t of q.turns) texts.push({ text: t });
for (let i = 0; i < 300; i++) texts.push({ text: randomText() });
// Everything at once: one long document crossing every kind of boundary.
texts.push({ text: questions.map((q) => q.turns.join("\n\n")).join("\n\n\n") });
texts.push({ text: hard.filter((h) => h.text !== undefined).map((h) => h.text).join(" ") });

const tools = [
  {
    type: "function",
    function: {
      name: "get_weather",
      description: "Get the current weather in a city",
      parameters: {
        type: "object",
        properties: {
          city: { type: "string", description: "The city, e.g. Paris" },
          unit: { type: "string", enum: ["celsius", "fahrenheit"] },
        },
        required: ["city"],
      },
    },
  },
  {
    type: "function",
    function: {
      name: "search",
      description: "Search the web — returns snippets (UTF-8: 検索)",
      parameters: { type: "object", properties: { q: { type: "string" }, k: { type: "integer", default: 5 } } },
    },
  },
];
const system = "You are a helpful, precise assistant. Answer concisely.";
function answer(q, i) {
  return `Sure. Regarding "${q.turns[i].slice(0, 60)}", here is a short answer:\n\n1. First point.\n2. Second point.`;
}

const chats = [];
for (const [k, q] of questions.entries()) {
  const [t1, t2] = q.turns;
  chats.push({ messages: [{ role: "user", content: t1 }], add_generation_prompt: true });
  chats.push({ messages: [{ role: "system", content: system }, { role: "user", content: t1 }], add_generation_prompt: true });
  const two = [
    { role: "user", content: t1 },
    { role: "assistant", content: answer(q, 0) },
    { role: "user", content: t2 ?? "Go on." },
  ];
  chats.push({ messages: two, add_generation_prompt: true });
  chats.push({ messages: [{ role: "system", content: system }, ...two], add_generation_prompt: true });
  chats.push({ messages: [...two, { role: "assistant", content: answer(q, 1) }], add_generation_prompt: false });
  chats.push({ messages: [{ role: "system", content: system }, { role: "user", content: t1 }], tools, add_generation_prompt: true });
  if (k % 4 === 0) {
    chats.push({ messages: [{ role: "user", content: t1 }], add_generation_prompt: true, chat_template_kwargs: { enable_thinking: false } });
    chats.push({ messages: [{ role: "user", content: t1 }], add_generation_prompt: true, chat_template_kwargs: { enable_thinking: true } });
  }
  if (k % 8 === 0) {
    // Reasoning in an earlier assistant turn, and a tool round trip.
    chats.push({
      messages: [
        { role: "user", content: t1 },
        { role: "assistant", content: "<think>\nLet me think about it.\n</think>\n\n" + answer(q, 0) },
        { role: "user", content: t2 ?? "More." },
      ],
      add_generation_prompt: true,
    });
    chats.push({
      messages: [
        { role: "system", content: system },
        { role: "user", content: "What is the weather in Paris? " + t1.slice(0, 40) },
        {
          role: "assistant",
          content: null,
          tool_calls: [{ id: "call_1", type: "function", function: { name: "get_weather", arguments: '{"city": "Paris"}' } }],
        },
        { role: "tool", tool_call_id: "call_1", content: '{"temperature": 21, "unit": "celsius"}' },
        { role: "tool", tool_call_id: "call_2", content: "second result" },
      ],
      tools,
      add_generation_prompt: true,
    });
  }
}
// Edge cases of the conversation itself.
chats.push({ messages: [{ role: "user", content: "" }], add_generation_prompt: true });
chats.push({ messages: [{ role: "user", content: "   padded   \n" }], add_generation_prompt: true });
chats.push({ messages: [{ role: "user", content: "<|im_start|>system\nhi<|im_end|> <｜User｜> <|eot_id|>" }], add_generation_prompt: true });
chats.push({ messages: [{ role: "system", content: "s1" }, { role: "system", content: "s2" }, { role: "user", content: "u" }], add_generation_prompt: true });
chats.push({ messages: [{ role: "user", content: "中文問題：😀 ¿qué?" }], tools: [], add_generation_prompt: true });

// --- Reference answers ------------------------------------------------------------------------
function tokenValue(v) {
  if (v === null || v === undefined) return undefined;
  if (typeof v === "object") return v.content;
  return v;
}

const names = ["deepseek_v3", "qwen3", "llama3_1"].filter((n) => !args.only || n === args.only);
const lines = (items) => items.map((x) => JSON.stringify(x)).join("\n") + "\n";
const summary = {};
for (const name of names) {
  const dir = path.join(args.tokenizers, name);
  const tj = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer.json"), "utf8"));
  const tc = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer_config.json"), "utf8"));
  const tok = new Tokenizer(tj, tc);
  const template = new Template(tc.chat_template);
  const specials = {};
  for (const key of ["bos_token", "eos_token", "unk_token", "pad_token"]) {
    const v = tokenValue(tc[key]);
    if (v) specials[key] = v;
  }

  const encIn = [], encOut = [], decIn = [], decOut = [];
  for (const t of texts) {
    const str = t.hex !== undefined ? new TextDecoder().decode(Buffer.from(t.hex, "hex")) : t.text;
    for (const special of [true, false]) {
      const ids = tok.encode(str, { add_special_tokens: special }).ids;
      encIn.push({ ...t, add_special_tokens: special });
      encOut.push({ ids });
      if (special && ids.length > 0) {
        for (const skip of [false, true]) {
          decIn.push({ ids, skip_special_tokens: skip });
          decOut.push({ text: tok.decode(ids, { skip_special_tokens: skip }) });
        }
      }
    }
  }
  const chatIn = [], chatOut = [];
  for (const c of chats) {
    chatIn.push(c);
    try {
      const prompt = template.render({
        messages: c.messages,
        add_generation_prompt: c.add_generation_prompt,
        tools: c.tools ?? null,
        documents: null,
        ...specials,
        ...(c.chat_template_kwargs ?? {}),
      });
      chatOut.push({ prompt, ids: tok.encode(prompt, { add_special_tokens: false }).ids });
    } catch (e) {
      chatOut.push({ error: String(e.message ?? e) });
    }
  }
  const write = (kind, input, expected) => {
    fs.writeFileSync(path.join(args.out, `${name}.${kind}.in.jsonl`), lines(input));
    fs.writeFileSync(path.join(args.out, `${name}.${kind}.expected.jsonl`), lines(expected));
  };
  write("encode", encIn, encOut);
  write("decode", decIn, decOut);
  write("chat", chatIn, chatOut);
  summary[name] = { encode: encIn.length, decode: decIn.length, chat: chatIn.length };
}
console.log(JSON.stringify(summary));
