"""The request path through Debian's nginx with the module, in front of omni-sim processes:
aggregated and sequential (vLLM P/D) modes, streamed and not, structural body rewriting,
OpenAI-style errors, retries of a failed prefill, failing legs, client disconnects and a 1 MB
prompt. nginx runs 2 workers; every error.log is checked for [alert], [crit] and [emerg]."""
import json
import socket
import threading
import time
import unittest

from simlib import Sim, get, metric, metrics, port_open, post, wait_until
from test_nginx_module import Nginx


def config(agg_port, prefill_ports, decode_ports):
    servers = lambda ports: "\n".join("        server 127.0.0.1:%d max_fails=0;" % p for p in ports)
    return """
    upstream agg {{
{agg}
        keepalive 16;
    }}
    upstream prefill {{
{prefill}
        keepalive 16;
    }}
    upstream decode {{
{decode}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:PORT;
        omni_proxy_connect_timeout 2s;
        omni_proxy_prefill_timeout 10s;
        omni_proxy_decode_timeout 10s;
        location /v1/ {{
            omni_proxy;
            omni_proxy_mode sequential;
            omni_proxy_prefill_upstream prefill;
            omni_proxy_decode_upstream decode;
            omni_proxy_max_body_size 4m;
        }}
        location /generate {{
            omni_proxy;
            omni_proxy_upstream agg;
        }}
    }}
    server {{
        listen 127.0.0.1:AGGPORT;
        location / {{
            omni_proxy;
            omni_proxy_mode aggregated;
            omni_proxy_upstream agg;
            omni_proxy_max_body_size 64k;
        }}
    }}
""".format(agg=servers([agg_port]), prefill=servers(prefill_ports), decode=servers(decode_ports))


class NginxProxyTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.agg = Sim("--engine", "vllm")
        cls.prefill = Sim("--engine", "vllm", "--role", "prefill", "--instances", "2")
        cls.decode = Sim("--engine", "vllm", "--role", "decode")
        from simlib import free_port
        cls.agg_port = free_port()
        conf = config(cls.agg.port(), [cls.prefill.port(0), cls.prefill.port(1)],
                      [cls.decode.port()]).replace("AGGPORT", str(cls.agg_port))
        cls.nginx = Nginx(conf)
        r = cls.nginx.run()
        assert r.returncode == 0, r.stderr
        assert wait_until(lambda: port_open(cls.nginx.port), 10)

    @classmethod
    def tearDownClass(cls):
        errors = cls.nginx.errors()
        cls.nginx.cleanup()
        for s in (cls.agg, cls.prefill, cls.decode):
            s.stop()
        assert errors == [], errors

    # --- sequential -------------------------------------------------------------------------

    def test_sequential_completion(self):
        r = post(self.nginx.port, "/v1/completions",
                 {"prompt": "The quick brown fox jumps over the lazy dog " * 3, "max_tokens": 5},
                 headers={"X-Request-Id": "pd-seq-1"})
        self.assertEqual(r.status, 200, r.body)
        j = r.json()
        self.assertEqual(j["id"], "cmpl-pd-seq-1")  # both legs carried the client's id
        self.assertEqual(j["usage"]["completion_tokens"], 5)
        self.assertIsNone(j["kv_transfer_params"])
        self.assertEqual(r.headers["x-request-id"], "pd-seq-1")

    def test_sequential_stream_pulls_kv_from_prefill(self):
        before = metric(metrics(self.decode.port()), "omni_sim:kv_blocks_received_total")
        prompt = list(range(5000, 5100))  # 7 blocks of 16
        r = post(self.nginx.port, "/v1/completions",
                 {"prompt": prompt, "max_tokens": 6, "stream": True,
                  "stream_options": {"include_usage": True}})
        self.assertEqual(r.status, 200, r.body)
        self.assertTrue(r.headers["content-type"].startswith("text/event-stream"))
        chunks = r.json_events()
        self.assertEqual(len([c for c in chunks if c["choices"]]), 6)
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 6)
        self.assertEqual(r.events()[-1], "[DONE]")
        after = metric(metrics(self.decode.port()), "omni_sim:kv_blocks_received_total")
        self.assertEqual(after - before, 7)
        self.assertTrue(wait_until(lambda: metric(metrics(self.prefill.port(0)),
                                                  "omni_sim:kv_held_requests") +
                                   metric(metrics(self.prefill.port(1)),
                                          "omni_sim:kv_held_requests") == 0, 5))

    def test_sequential_chat_streams_incrementally(self):
        # Tokens arrive as the engine produces them, not buffered to the end.
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.nginx.port, timeout=10)
        conn.request("POST", "/v1/chat/completions",
                     body=json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 60, "stream": True}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        self.assertEqual(resp.status, 200)
        first = resp.read1(65536)
        t_first = time.monotonic()
        rest = resp.read()
        t_end = time.monotonic()
        conn.close()
        self.assertTrue(first.startswith(b"data: "), first)
        self.assertNotIn(b"[DONE]", first)
        self.assertIn(b"[DONE]", rest)
        self.assertGreater(t_end - t_first, 0.05)  # 60 steps of >= 2 ms arrive over time

    def test_body_rewrite_keeps_content_that_looks_like_fields(self):
        messages = [{"role": "system", "content": "stream"},
                    {"role": "user", "content": "max_tokens"},
                    {"role": "user", "content": '{"stream": true, "max_tokens": 1}'}]
        direct = post(self.agg.port(), "/v1/chat/completions",
                      {"messages": messages, "max_tokens": 3}).json()
        via = post(self.nginx.port, "/v1/chat/completions",
                   {"messages": messages, "max_tokens": 3, "unknown_field": {"kept": [1, 2]}})
        self.assertEqual(via.status, 200, via.body)
        self.assertEqual(via.json()["usage"]["prompt_tokens"], direct["usage"]["prompt_tokens"])
        self.assertEqual(via.json()["usage"]["completion_tokens"], 3)

    def test_one_megabyte_prompt(self):
        prompt = "lorem ipsum dolor sit amet " * 38000  # ~1 MB
        r = post(self.nginx.port, "/v1/completions",
                 {"prompt": prompt, "max_tokens": 2}, timeout=60)
        # 228k tokens exceed the simulated context (32k): the engine's own 400 comes back.
        self.assertEqual(r.status, 400, r.body[:300])
        self.assertIn("maximum context length", r.json()["error"]["message"])

    def test_large_prompt_within_context(self):
        prompt = list(range(1000, 1000 + 20000))  # 20k token ids, ~120 KB of JSON
        r = post(self.nginx.port, "/v1/completions", {"prompt": prompt, "max_tokens": 2},
                 timeout=60)
        self.assertEqual(r.status, 200, r.body[:300])
        self.assertEqual(r.json()["usage"]["prompt_tokens"], 20000)

    # --- aggregated -------------------------------------------------------------------------

    def test_aggregated_forwards_as_is(self):
        r = post(self.agg_port, "/v1/completions", {"prompt": "hello", "max_tokens": 3})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.json()["usage"]["completion_tokens"], 3)
        s = post(self.agg_port, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                  "stream": True})
        self.assertEqual(s.events()[-1], "[DONE]")

    def test_aggregated_sglang_generate_is_forwarded(self):
        # /generate in sequential locations is refused; an aggregated location forwards it
        # (the vLLM simulator answers 404 for it, which comes back as is).
        r = post(self.nginx.port, "/generate", {"text": "hi"})
        self.assertEqual(r.status, 404)

    # --- errors -----------------------------------------------------------------------------

    def assert_openai_error(self, r, status):
        self.assertEqual(r.status, status, r.body)
        self.assertTrue(r.headers["content-type"].startswith("application/json"))
        j = r.json()
        self.assertEqual(j["error"]["code"], status)
        self.assertTrue(j["error"]["message"])

    def test_client_errors(self):
        p = self.nginx.port
        self.assert_openai_error(post(p, "/v1/completions", "{not json"), 400)
        self.assert_openai_error(post(p, "/v1/completions", {"max_tokens": 2}), 400)
        self.assert_openai_error(post(p, "/v1/completions", {"prompt": "x", "stream": "yes"}), 400)
        self.assert_openai_error(post(p, "/v1/completions", "[" * 10000 + "]" * 10000), 400)
        self.assert_openai_error(get(p, "/v1/completions"), 405)
        self.assert_openai_error(post(p, "/v1/completions", {"prompt": "x"},
                                      headers={"Content-Type": "text/plain"}), 415)
        self.assert_openai_error(post(p, "/v1/embeddings", {"input": "x"}), 404)
        self.assert_openai_error(post(self.agg_port, "/v1/completions",
                                      {"prompt": "x" * 70000}), 413)
        # The engine's own client errors come back with their status.
        self.assert_openai_error(post(p, "/v1/completions", {"prompt": "x", "model": "nope"}), 404)


class NginxProxyFailureTest(unittest.TestCase):
    def run_with(self, prefill_ports, decode_ports, body, expect_status):
        from simlib import free_port
        agg = free_port()
        n = Nginx(config(decode_ports[0], prefill_ports, decode_ports).replace(
            "AGGPORT", str(agg)))
        try:
            self.assertEqual(n.run().returncode, 0)
            self.assertTrue(wait_until(lambda: port_open(n.port), 10))
            r = post(n.port, "/v1/completions", body)
            self.assertEqual(r.status, expect_status, r.body)
            return r
        finally:
            errors = n.errors()
            n.cleanup()
            self.assertEqual(errors, [])

    def test_prefill_failure_is_retried_on_another_prefill(self):
        from simlib import free_port
        with Sim("--role", "prefill") as p, Sim("--role", "decode") as d:
            dead = free_port()
            r = self.run_with([dead, p.port()], [d.port()], {"prompt": "x", "max_tokens": 2},
                              200)
            self.assertEqual(r.json()["usage"]["completion_tokens"], 2)

    def test_failing_prefill_gives_502(self):
        with Sim("--role", "prefill", "--fault-error-rate", "1") as p, \
             Sim("--role", "decode") as d:
            r = self.run_with([p.port()], [d.port()], {"prompt": "x", "max_tokens": 2}, 502)
            self.assertIn("prefill", r.json()["error"]["message"])
            self.assertEqual(metric(metrics(d.port()), "omni_sim:requests_total"), 0)

    def test_unreachable_decode_gives_502_json(self):
        from simlib import free_port
        with Sim("--role", "prefill") as p:
            r = self.run_with([p.port()], [free_port()], {"prompt": "x", "max_tokens": 2}, 502)
            self.assertEqual(r.json()["error"]["type"], "BadGatewayError")

    def test_hanging_decode_times_out_with_504_json(self):
        with Sim("--role", "prefill") as p, Sim("--role", "decode", "--fault-hang-rate", "1") as d:
            from simlib import free_port
            agg = free_port()
            conf = config(d.port(), [p.port()], [d.port()]).replace("AGGPORT", str(agg)) \
                .replace("omni_proxy_decode_timeout 10s", "omni_proxy_decode_timeout 1s")
            n = Nginx(conf)
            try:
                self.assertEqual(n.run().returncode, 0)
                self.assertTrue(wait_until(lambda: port_open(n.port), 10))
                t0 = time.monotonic()
                r = post(n.port, "/v1/completions", {"prompt": "x", "max_tokens": 2})
                self.assertEqual(r.status, 504, r.body)
                self.assertEqual(r.json()["error"]["code"], 504)
                self.assertLess(time.monotonic() - t0, 6)
            finally:
                errors = n.errors()
                n.cleanup()
                self.assertEqual(errors, [])

    def test_client_disconnect_cancels_the_decode(self):
        with Sim("--role", "prefill") as p, Sim("--role", "decode") as d:
            from simlib import free_port
            agg = free_port()
            n = Nginx(config(d.port(), [p.port()], [d.port()]).replace("AGGPORT", str(agg)))
            try:
                self.assertEqual(n.run().returncode, 0)
                self.assertTrue(wait_until(lambda: port_open(n.port), 10))
                s = socket.create_connection(("127.0.0.1", n.port), timeout=5)
                body = json.dumps({"prompt": "x", "max_tokens": 3000, "stream": True}).encode()
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nContent-Length: " +
                          str(len(body)).encode() + b"\r\n\r\n" + body)
                self.assertIn(b"200 OK", s.recv(4096))
                self.assertTrue(wait_until(
                    lambda: metric(metrics(d.port()), "vllm:num_requests_running") == 1, 5))
                s.close()
                self.assertTrue(wait_until(
                    lambda: metric(metrics(d.port()), "vllm:num_requests_running") == 0, 10))
            finally:
                errors = n.errors()
                n.cleanup()
                self.assertEqual(errors, [])


if __name__ == "__main__":
    unittest.main()
