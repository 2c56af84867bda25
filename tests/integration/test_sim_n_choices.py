"""Parallel sampling (`n > 1`) in omni-sim: vLLM's OpenAI APIs streamed and not, through a vLLM
P/D round done by hand between two processes, and SGLang's /generate (sampling_params.n).

Every sample of a prompt has its own output and finish_reason; usage counts the prompt once and
the completion tokens of every choice. The engine computes the prompt once and decodes the n
samples as sequences of the batch."""
import concurrent.futures
import socket
import threading
import unittest

from simlib import Sim, metric, metrics, post, wait_until

PD_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
             "remote_block_ids": None, "remote_host": None, "remote_port": None}
MESSAGES = [{"role": "user", "content": "give me several answers"}]


def content(choice, chat):
    """The text a streamed choice carries (None for a role chunk)."""
    return choice["delta"].get("content") if chat else choice["text"]


class StreamedChoices:
    """A streamed OpenAI answer with n choices, checked chunk by chunk as vLLM sends them."""

    def __init__(self, test, r, chat, include_usage):
        test.assertEqual(r.status, 200, r.body)
        events = r.events()
        test.assertEqual(events[-1], "[DONE]")
        self.chunks = r.json_events()
        self.tokens = {}     # index -> number of content chunks
        self.text = {}       # index -> text
        self.finish = {}     # index -> finish_reason
        self.roles = {}      # index -> role chunks seen (chat)
        self.usage = None
        for i, c in enumerate(self.chunks):
            test.assertNotIn("error", c)
            if include_usage and i == len(self.chunks) - 1:
                test.assertEqual(c["choices"], [])
                self.usage = c["usage"]
                continue
            # vLLM sends each choice's tokens as chunks of their own.
            test.assertEqual(len(c["choices"]), 1, c)
            ch = c["choices"][0]
            idx = ch["index"]
            test.assertNotIn(idx, self.finish, "a chunk after the choice finished")
            if chat and "role" in ch["delta"]:
                test.assertEqual(ch["delta"]["role"], "assistant")
                test.assertNotIn(idx, self.tokens, "the role chunk comes first")
                self.roles[idx] = self.roles.get(idx, 0) + 1
                continue
            piece = content(ch, chat)
            test.assertTrue(piece, c)
            self.tokens[idx] = self.tokens.get(idx, 0) + 1
            self.text[idx] = self.text.get(idx, "") + piece
            if ch["finish_reason"] is not None:
                self.finish[idx] = ch["finish_reason"]
        if not include_usage:
            test.assertNotIn("usage", self.chunks[-1])
        if chat:
            # vLLM sends every choice's role chunk first, in index order.
            head = [c["choices"][0] for c in self.chunks[:len(self.roles)]]
            test.assertEqual([ch["index"] for ch in head], sorted(self.roles))
            test.assertTrue(all("role" in ch["delta"] for ch in head), head)


class VllmNTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.sim = Sim("--engine", "vllm", "--default-max-tokens", "64")
        cls.port = cls.sim.port()

    @classmethod
    def tearDownClass(cls):
        cls.sim.stop()

    def prompt_tokens(self, path, body):
        b = dict(body, max_tokens=1, n=1, stream=False)
        return post(self.port, path, b).json()["usage"]["prompt_tokens"]

    def test_not_streamed(self):
        for chat in (False, True):
            with self.subTest(chat=chat):
                path = "/v1/chat/completions" if chat else "/v1/completions"
                body = {"messages": MESSAGES} if chat else {"prompt": "several answers please"}
                prompt_tokens = self.prompt_tokens(path, body)
                r = post(self.port, path, dict(body, n=3, max_tokens=5),
                         headers={"X-Request-Id": "n3"})
                self.assertEqual(r.status, 200, r.body)
                j = r.json()
                self.assertEqual(j["id"], ("chatcmpl-" if chat else "cmpl-") + "n3")
                self.assertEqual([c["index"] for c in j["choices"]], [0, 1, 2])
                for c in j["choices"]:
                    self.assertEqual(c["finish_reason"], "length")
                    text = c["message"]["content"] if chat else c["text"]
                    self.assertTrue(text)
                    if chat:
                        self.assertEqual(c["message"]["role"], "assistant")
                # Samples are independent draws.
                texts = [c["message"]["content"] if chat else c["text"] for c in j["choices"]]
                self.assertGreater(len(set(texts)), 1, texts)
                u = j["usage"]
                self.assertEqual(u["completion_tokens"], 15)
                self.assertEqual(u["prompt_tokens"], prompt_tokens, "the prompt counts once")
                self.assertEqual(u["total_tokens"], prompt_tokens + 15)

    def test_streamed(self):
        for chat in (False, True):
            for include_usage in (False, True):
                with self.subTest(chat=chat, include_usage=include_usage):
                    path = "/v1/chat/completions" if chat else "/v1/completions"
                    body = {"messages": MESSAGES} if chat else {"prompt": "stream several"}
                    prompt_tokens = self.prompt_tokens(path, body)
                    body = dict(body, n=3, max_tokens=4, stream=True)
                    if include_usage:
                        body["stream_options"] = {"include_usage": True}
                    s = StreamedChoices(self, post(self.port, path, body), chat, include_usage)
                    self.assertEqual(s.tokens, {0: 4, 1: 4, 2: 4})
                    self.assertEqual(s.finish, {0: "length", 1: "length", 2: "length"})
                    if chat:
                        self.assertEqual(s.roles, {0: 1, 1: 1, 2: 1})
                    if include_usage:
                        self.assertEqual(s.usage["completion_tokens"], 12)
                        self.assertEqual(s.usage["prompt_tokens"], prompt_tokens)

    def test_without_max_tokens_each_sample_draws_its_length(self):
        r = post(self.port, "/v1/completions",
                 {"prompt": "how long", "n": 6, "stream": True,
                  "stream_options": {"include_usage": True}})
        s = StreamedChoices(self, r, False, True)
        self.assertEqual(sorted(s.tokens), list(range(6)))
        self.assertEqual(set(s.finish.values()), {"stop"})
        for count in s.tokens.values():
            self.assertTrue(1 <= count <= 64, s.tokens)
        self.assertGreater(len(set(s.tokens.values())), 1, s.tokens)
        self.assertEqual(s.usage["completion_tokens"], sum(s.tokens.values()))

    def test_batch_prompts_times_n(self):
        j = post(self.port, "/v1/completions",
                 {"prompt": [list(range(3000, 3005)), list(range(4000, 4003))], "n": 2,
                  "max_tokens": 3}).json()
        # Prompt-major: prompt i, sample s is choice i * n + s.
        self.assertEqual([c["index"] for c in j["choices"]], [0, 1, 2, 3])
        self.assertEqual(j["usage"]["prompt_tokens"], 5 + 3)
        self.assertEqual(j["usage"]["completion_tokens"], 4 * 3)

    def test_n_one_and_null_are_one_choice(self):
        for n in (1, None):
            j = post(self.port, "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": n}).json()
            self.assertEqual([c["index"] for c in j["choices"]], [0])

    def test_invalid_n(self):
        for n, param in ((0, "n"), (-2, "n"), (10 ** 6, "n"), ("2", "body.n"), (1.5, "body.n"),
                         (True, "body.n")):
            with self.subTest(n=n):
                r = post(self.port, "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": n})
                self.assertEqual(r.status, 400, r.body)
                self.assertEqual(r.json()["error"]["param"], param)
        self.assertEqual(post(self.port, "/v1/completions", {"prompt": "x", "n": 0}).json()[
            "error"]["message"], "n must be at least 1, got 0.")

    def test_disconnect_frees_every_sample(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        body = b'{"prompt": "a long one", "max_tokens": 3000, "n": 4, "stream": true}'
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.assertIn(b"200 OK", s.recv(4096))
        self.assertTrue(wait_until(
            lambda: metric(metrics(self.port), "vllm:num_requests_running") == 4, 10))
        s.close()
        self.assertTrue(wait_until(
            lambda: metric(metrics(self.port), "vllm:num_requests_running") == 0, 10))
        self.assertEqual(metric(metrics(self.port), "vllm:kv_cache_usage_perc"), 0)


class VllmNEngineTest(unittest.TestCase):
    def test_samples_share_the_prompt_and_decode_together(self):
        # --time-scale 10: ~20 ms steps, so the running gauge can be watched.
        with Sim("--engine", "vllm", "--time-scale", "10") as s:
            prompt = list(range(5000, 5000 + 100))
            before = metrics(s.port())
            seen = []
            done = threading.Event()

            def watch():
                while not done.is_set():
                    seen.append(metric(metrics(s.port()), "vllm:num_requests_running"))

            t = threading.Thread(target=watch)
            t.start()
            try:
                r = post(s.port(), "/v1/completions",
                         {"prompt": prompt, "n": 4, "max_tokens": 30}, timeout=60)
            finally:
                done.set()
                t.join()
            self.assertEqual(r.status, 200, r.body)
            self.assertEqual(r.json()["usage"]["completion_tokens"], 120)
            after = metrics(s.port())
            delta = lambda name: metric(after, name) - metric(before, name)
            # The batch held the 4 samples.
            self.assertEqual(max(seen), 4, seen)
            # The prompt was computed once; the samples decoded in the same steps.
            self.assertEqual(delta("vllm:prompt_tokens_total"), 100)
            self.assertEqual(delta("vllm:generation_tokens_total"), 120)
            self.assertLessEqual(delta("omni_sim:steps_total"), 30 + 1)
            self.assertEqual(delta("vllm:request_success_total"), 1)

    def test_concurrent_requests_with_n(self):
        with Sim("--engine", "vllm", "--time-scale", "5") as s:
            def one(i):
                return post(s.port(), "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "q %d" % i}], "n": 4,
                             "max_tokens": 3, "stream": i % 2 == 0}, timeout=60)

            with concurrent.futures.ThreadPoolExecutor(max_workers=40) as pool:
                results = list(pool.map(one, range(40)))
            for i, r in enumerate(results):
                self.assertEqual(r.status, 200, r.body)
                if i % 2 == 0:
                    self.assertEqual(StreamedChoices(self, r, True, False).tokens,
                                     {0: 3, 1: 3, 2: 3, 3: 3})
                else:
                    self.assertEqual(r.json()["usage"]["completion_tokens"], 12)
            m = metrics(s.port())
            self.assertEqual(metric(m, "vllm:generation_tokens_total"), 40 * 4 * 3)
            self.assertEqual(metric(m, "vllm:num_requests_running"), 0)
            self.assertEqual(metric(m, "vllm:num_requests_waiting"), 0)
            self.assertEqual(metric(m, "vllm:kv_cache_usage_perc"), 0)


class VllmPdNTest(unittest.TestCase):
    """The vLLM P/D handshake by hand, with n > 1: the prefill computes the prompt once and
    holds one KV; the decode pulls it once and generates n choices from it."""

    @classmethod
    def setUpClass(cls):
        cls.p = Sim("--engine", "vllm", "--role", "prefill")
        cls.d = Sim("--engine", "vllm", "--role", "decode")

    @classmethod
    def tearDownClass(cls):
        cls.p.stop()
        cls.d.stop()

    def prefill(self, path, body, request_id, n):
        b = dict(body, max_tokens=1, stream=False, kv_transfer_params=dict(PD_PARAMS))
        if n is not None:
            b["n"] = n
        r = post(self.p.port(), path, b, headers={"X-Request-Id": request_id})
        self.assertEqual(r.status, 200, r.body)
        return r.json()

    def test_rounds(self):
        prompt = list(range(6000, 6000 + 70))  # 5 blocks of 16, the last one partial
        for chat in (False, True):
            for stream in (False, True):
                for prefill_n in (3, None):  # the proxy may or may not pass n to the prefill
                    with self.subTest(chat=chat, stream=stream, prefill_n=prefill_n):
                        self.round(chat, stream, prefill_n, prompt)

    def round(self, chat, stream, prefill_n, prompt):
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {"messages": MESSAGES} if chat else {"prompt": prompt}
        rid = "pd-n-%s-%s-%s" % (chat, stream, prefill_n)
        pm, dm = metrics(self.p.port()), metrics(self.d.port())
        held = metric(pm, "omni_sim:kv_held_requests")
        p = self.prefill(path, body, rid, prefill_n)
        n_prefill = prefill_n or 1
        self.assertEqual([c["index"] for c in p["choices"]], list(range(n_prefill)))
        self.assertEqual(p["usage"]["completion_tokens"], n_prefill)
        kv = p["kv_transfer_params"]
        self.assertTrue(kv["do_remote_prefill"])
        self.assertEqual(kv["remote_request_id"], ("chatcmpl-" if chat else "cmpl-") + rid + "-0")
        # One prompt computed, one KV held for the decode.
        pm2 = metrics(self.p.port())
        self.assertEqual(metric(pm2, "omni_sim:kv_held_requests"), held + 1)
        self.assertEqual(metric(pm2, "vllm:prompt_tokens_total") -
                         metric(pm, "vllm:prompt_tokens_total"), p["usage"]["prompt_tokens"])

        d_body = dict(body, n=3, max_tokens=5, stream=stream, kv_transfer_params=kv)
        if stream:
            d_body["stream_options"] = {"include_usage": True}
        r = post(self.d.port(), path, d_body, headers={"X-Request-Id": rid})
        if stream:
            s = StreamedChoices(self, r, chat, True)
            self.assertEqual(s.tokens, {0: 5, 1: 5, 2: 5})
            self.assertEqual(s.finish, {0: "length", 1: "length", 2: "length"})
            usage = s.usage
        else:
            self.assertEqual(r.status, 200, r.body)
            j = r.json()
            self.assertEqual([c["index"] for c in j["choices"]], [0, 1, 2])
            self.assertEqual({c["finish_reason"] for c in j["choices"]}, {"length"})
            usage = j["usage"]
        self.assertEqual(usage["completion_tokens"], 15)
        self.assertEqual(usage["prompt_tokens"], p["usage"]["prompt_tokens"])
        # The KV was pulled once, for all three samples, and the prefill freed it.
        pm3, dm3 = metrics(self.p.port()), metrics(self.d.port())
        self.assertEqual(metric(pm3, "omni_sim:kv_held_requests"), held)
        self.assertEqual(metric(dm3, "omni_sim:kv_pulls_failed_total"), 0)
        self.assertEqual(metric(pm3, "omni_sim:kv_pulls_served_total") -
                         metric(pm, "omni_sim:kv_pulls_served_total"), 1)
        blocks = metric(dm3, "omni_sim:kv_blocks_received_total") - \
            metric(dm, "omni_sim:kv_blocks_received_total")
        self.assertLessEqual(blocks, len(kv["remote_block_ids"]))
        self.assertEqual(metric(dm3, "vllm:num_requests_running"), 0)
        self.assertEqual(metric(dm3, "vllm:kv_cache_usage_perc"), 0)


class SglangNTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.sim = Sim("--engine", "sglang")
        cls.port = cls.sim.port()

    @classmethod
    def tearDownClass(cls):
        cls.sim.stop()

    def test_generate_returns_a_list_of_n(self):
        r = post(self.port, "/generate",
                 {"text": "sample me", "sampling_params": {"max_new_tokens": 4, "n": 3}})
        self.assertEqual(r.status, 200, r.body)
        items = r.json()
        self.assertIsInstance(items, list)
        self.assertEqual(len(items), 3)
        prompt = items[0]["meta_info"]["prompt_tokens"]
        for it in items:
            self.assertEqual(it["meta_info"]["finish_reason"], {"type": "length", "length": 4})
            self.assertEqual(it["meta_info"]["completion_tokens"], 4)
            self.assertEqual(len(it["output_ids"]), 4)
            self.assertEqual(it["meta_info"]["prompt_tokens"], prompt)

    def test_generate_batch_times_n(self):
        items = post(self.port, "/generate",
                     {"input_ids": [[1, 2, 3], [4, 5]],
                      "sampling_params": {"max_new_tokens": 2, "n": 2}}).json()
        self.assertEqual([it["meta_info"]["prompt_tokens"] for it in items], [3, 3, 2, 2])

    def test_generate_streamed(self):
        r = post(self.port, "/generate",
                 {"input_ids": [7, 8, 9], "stream": True,
                  "sampling_params": {"max_new_tokens": 3, "n": 2}})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.events()[-1], "[DONE]")
        last = {}
        for c in r.json_events():
            idx = c["index"]
            prev = last.get(idx)
            if prev is not None:
                # SGLang streams cumulative text and ids.
                self.assertTrue(c["text"].startswith(prev["text"]))
                self.assertEqual(c["output_ids"][:len(prev["output_ids"])], prev["output_ids"])
            last[idx] = c
        self.assertEqual(sorted(last), [0, 1])
        for c in last.values():
            self.assertEqual(len(c["output_ids"]), 3)
            self.assertEqual(c["meta_info"]["finish_reason"]["type"], "length")

    def test_openai_api_with_n(self):
        j = post(self.port, "/v1/completions",
                 {"prompt": "sglang openai", "n": 2, "max_tokens": 3}).json()
        self.assertEqual([c["index"] for c in j["choices"]], [0, 1])
        self.assertEqual(j["usage"]["completion_tokens"], 6)

    def test_invalid_n_and_n_with_bootstrap(self):
        for sp in ({"n": 0}, {"n": "2"}, {"n": 10 ** 6}):
            r = post(self.port, "/generate", {"text": "x", "sampling_params": sp})
            self.assertEqual(r.status, 400, r.body)
            self.assertIn("message", r.json()["error"])
        r = post(self.port, "/generate",
                 {"text": "x", "sampling_params": {"n": 2, "max_new_tokens": 2},
                  "bootstrap_host": "127.0.0.1", "bootstrap_port": 8998, "bootstrap_room": 1})
        self.assertEqual(r.status, 400, r.body)
        self.assertIn("n > 1", r.json()["error"]["message"])


if __name__ == "__main__":
    unittest.main()
