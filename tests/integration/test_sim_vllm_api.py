"""omni-sim as a vLLM OpenAI server: endpoints, streaming, usage, errors, keep-alive."""
import http.client
import json
import socket
import unittest

from simlib import Sim, get, metric, metrics, post, request

PROMPT = "The quick brown fox jumps over the lazy dog near the river bank, " * 4


class VllmApiTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.sim = Sim("--engine", "vllm", "--max-model-len", "4096", "--max-body-bytes", "65536")
        cls.port = cls.sim.port()

    @classmethod
    def tearDownClass(cls):
        cls.sim.stop()

    def test_health_models_version(self):
        self.assertEqual(get(self.port, "/health").status, 200)
        models = get(self.port, "/v1/models").json()
        self.assertEqual(models["object"], "list")
        self.assertEqual(models["data"][0]["id"], "omni-sim")
        self.assertEqual(models["data"][0]["max_model_len"], 4096)

    def test_completion_not_streamed(self):
        r = post(self.port, "/v1/completions", {"prompt": PROMPT, "max_tokens": 7},
                 headers={"X-Request-Id": "abc-123"})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.headers["x-request-id"], "abc-123")
        j = r.json()
        self.assertEqual(j["id"], "cmpl-abc-123")
        self.assertEqual(j["object"], "text_completion")
        self.assertEqual(j["choices"][0]["finish_reason"], "length")
        self.assertTrue(j["choices"][0]["text"])
        self.assertEqual(j["usage"]["completion_tokens"], 7)
        self.assertEqual(j["usage"]["total_tokens"],
                         j["usage"]["prompt_tokens"] + j["usage"]["completion_tokens"])
        self.assertIn("cached_tokens", j["usage"]["prompt_tokens_details"])
        self.assertIsNone(j["kv_transfer_params"])

    def test_repeated_prompt_hits_prefix_cache(self):
        prompt = list(range(1000, 1000 + 100))  # token ids: 100 tokens, block size 16
        first = post(self.port, "/v1/completions", {"prompt": prompt, "max_tokens": 2}).json()
        second = post(self.port, "/v1/completions", {"prompt": prompt, "max_tokens": 2}).json()
        self.assertEqual(first["usage"]["prompt_tokens"], 100)
        self.assertEqual(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0)
        # Full blocks only, and the last prompt token is always recomputed: (100-1)//16*16.
        self.assertEqual(second["usage"]["prompt_tokens_details"]["cached_tokens"], 96)

    def test_completion_streamed_with_usage(self):
        r = post(self.port, "/v1/completions",
                 {"prompt": PROMPT, "max_tokens": 5, "stream": True,
                  "stream_options": {"include_usage": True}})
        self.assertEqual(r.status, 200)
        self.assertTrue(r.headers["content-type"].startswith("text/event-stream"))
        self.assertEqual(r.headers.get("transfer-encoding"), "chunked")
        events = r.events()
        self.assertEqual(events[-1], "[DONE]")
        chunks = r.json_events()
        text_chunks = [c for c in chunks if c["choices"]]
        self.assertEqual(len(text_chunks), 5)
        self.assertEqual([c["choices"][0]["finish_reason"] for c in text_chunks],
                         [None, None, None, None, "length"])
        usage = chunks[-1]
        self.assertEqual(usage["choices"], [])
        self.assertEqual(usage["usage"]["completion_tokens"], 5)

    def test_chat_streamed(self):
        r = post(self.port, "/v1/chat/completions",
                 {"model": "omni-sim", "messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "Hello!"}],
                  "max_tokens": 4, "stream": True})
        self.assertEqual(r.status, 200)
        chunks = r.json_events()
        self.assertEqual(chunks[0]["object"], "chat.completion.chunk")
        self.assertEqual(chunks[0]["choices"][0]["delta"], {"role": "assistant", "content": ""})
        contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:]]
        self.assertEqual(len(contents), 4)
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "length")
        self.assertEqual(r.events()[-1], "[DONE]")

    def test_chat_not_streamed_without_max_tokens_stops(self):
        r = post(self.port, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]})
        self.assertEqual(r.status, 200, r.body)
        j = r.json()
        self.assertEqual(j["object"], "chat.completion")
        self.assertEqual(j["choices"][0]["finish_reason"], "stop")
        self.assertEqual(j["choices"][0]["message"]["role"], "assistant")
        self.assertGreaterEqual(j["usage"]["completion_tokens"], 1)
        self.assertLessEqual(j["usage"]["completion_tokens"], 256)

    def test_batch_prompts(self):
        j = post(self.port, "/v1/completions",
                 {"prompt": ["one two three", [5000, 5001, 5002]], "max_tokens": 3}).json()
        self.assertEqual([c["index"] for c in j["choices"]], [0, 1])
        self.assertEqual(j["usage"]["completion_tokens"], 6)

    def assert_error(self, r, status, param=None, type_=None):
        self.assertEqual(r.status, status, r.body)
        j = r.json()
        self.assertEqual(set(j), {"error"})
        self.assertEqual(j["error"]["code"], status)
        self.assertTrue(j["error"]["message"])
        if param is not None:
            self.assertEqual(j["error"]["param"], param)
        if type_ is not None:
            self.assertEqual(j["error"]["type"], type_)

    def test_errors(self):
        p = self.port
        self.assert_error(post(p, "/v1/completions", "{not json"), 400, "body", "Bad Request")
        self.assert_error(post(p, "/v1/completions", [1, 2]), 400, "body")
        self.assert_error(post(p, "/v1/completions", {"max_tokens": 3}), 400, "body.prompt")
        self.assert_error(post(p, "/v1/chat/completions", {"max_tokens": 3}), 400, "body.messages")
        self.assert_error(post(p, "/v1/completions", {"prompt": "x", "model": "gpt-9"}), 404,
                          "model", "NotFoundError")
        self.assert_error(post(p, "/v1/completions", {"prompt": "x", "max_tokens": 0}), 400)
        self.assert_error(post(p, "/v1/completions", {"prompt": "x", "max_tokens": "3"}), 400)
        self.assert_error(post(p, "/v1/completions", {"prompt": [1, -5]}), 400)
        self.assert_error(post(p, "/v1/completions",
                               {"prompt": "x", "stream_options": {"include_usage": True}}), 400)
        self.assert_error(post(p, "/v1/completions", {"prompt": "x", "n": 0}), 400, "n",
                          "BadRequestError")
        self.assert_error(post(p, "/v1/completions", {"prompt": "x", "n": "2"}), 400, "body.n")
        self.assert_error(post(p, "/v1/completions", {"prompt": "", "max_tokens": 2}), 400)
        too_long = post(p, "/v1/completions", {"prompt": list(range(300, 4300)), "max_tokens": 100})
        self.assert_error(too_long, 400, "input_tokens", "BadRequestError")
        self.assertIn("maximum context length is 4096", too_long.json()["error"]["message"])
        # Routing errors in FastAPI's shape.
        self.assertEqual(get(p, "/v1/completions").status, 405)
        self.assertEqual(get(p, "/nope").status, 404)
        self.assertEqual(get(p, "/nope").json(), {"detail": "Not Found"})

    def test_body_too_large(self):
        r = post(self.port, "/v1/completions", {"prompt": "x" * 70000})
        self.assert_error(r, 413)

    def test_malformed_http_is_rejected_and_server_survives(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
            data = s.recv(4096)
            self.assertTrue(data.startswith(b"HTTP/1.1 400"), data)
        self.assertEqual(get(self.port, "/health").status, 200)

    def test_keepalive_reuses_one_connection(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            for i in range(5):
                r = request(self.port, "POST", "/v1/completions",
                            {"prompt": "keep alive %d" % i, "max_tokens": 2}, conn=conn)
                self.assertEqual(r.status, 200)
            r = request(self.port, "POST", "/v1/completions",
                        {"prompt": "stream", "max_tokens": 2, "stream": True}, conn=conn)
            self.assertEqual(r.events()[-1], "[DONE]")
            self.assertEqual(request(self.port, "GET", "/health", conn=conn).status, 200)
        finally:
            conn.close()

    def test_reset_prefix_cache(self):
        prompt = list(range(7000, 7040))
        post(self.port, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        self.assertEqual(post(self.port, "/reset_prefix_cache", None).status, 200)
        again = post(self.port, "/v1/completions", {"prompt": prompt, "max_tokens": 1}).json()
        self.assertEqual(again["usage"]["prompt_tokens_details"]["cached_tokens"], 0)

    def test_client_disconnect_frees_the_sequence(self):
        # Start a long stream, read a little, hang up, and check the engine drained it.
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        body = json.dumps({"prompt": "long one", "max_tokens": 3000, "stream": True}).encode()
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.assertIn(b"200 OK", s.recv(4096))
        s.close()
        from simlib import wait_until
        self.assertTrue(wait_until(lambda: metric(metrics(self.port),
                                                  "vllm:num_requests_running") == 0, 10))


if __name__ == "__main__":
    unittest.main()
