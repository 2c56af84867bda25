"""SGLang parallel P/D through Debian's nginx with the module (omni_proxy_mode parallel), in
front of omni-sim SGLang processes: both legs get the body with bootstrap_host/port/room, the
bootstrap ports are discovered from /get_server_info, the KV really moves between the sims,
batch input gets one room per item, and a failure of either leg cancels the other and reaches
the client as an OpenAI-style error (JSON before the stream started, a final SSE error event
after). A decode that fails mid-stream is also checked in aggregated and sequential (vLLM)
modes, and a client that hangs up aborts both legs. Also: parallel mode needs no explicit
omni_proxy_engine, and a prefill answer of many MB (omni-sim's SGLang prefill answers with the
whole generation) is drained without harming the client's stream. nginx runs 2 workers; every
error.log is checked for [alert], [crit] and [emerg].

Sims and nginx are shared per class; tests within a class run one at a time, so the "nothing
left behind" checks (engine gauges, open connections to a sim, nginx's request slots) see
only the test's own requests."""
import http.client
import json
import random
import socket
import time
import unittest

from simlib import (Response, Sim, backend_rows, free_port, get, metric, metrics,
                    wait_bootstrap_ports, wait_until)
from test_nginx_module import Nginx

LEG_TIMEOUT_S = 10  # omni_proxy_prefill_timeout / omni_proxy_decode_timeout unless a test says


# --- helpers -------------------------------------------------------------------------------------


def status(port):
    try:
        r = get(port, "/omni/status", timeout=3)
        return r.json() if r.status == 200 else None
    except (OSError, ValueError):
        return None


def slots_used(port):
    s = status(port)
    return None if s is None else s["slots"]["used"]


def open_connections(port):
    """Connected TCP sockets whose local port is `port` (a sim's accepted connections:
    ESTABLISHED, or CLOSE_WAIT when the peer hung up and the sim did not close yet)."""
    n = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4:
                continue
            local, state = fields[1], fields[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state in ("01", "08"):
                n += 1
    return n


def engine_busy(sim, i=0):
    """Requests an instance is running or has queued (its own gauges)."""
    m = metrics(sim.port(i))
    try:
        return metric(m, "sglang:num_running_reqs") + metric(m, "sglang:num_queue_reqs")
    except KeyError:
        return metric(m, "vllm:num_requests_running") + metric(m, "vllm:num_requests_waiting")


def counter(sim, name, i=None, **labels):
    instances = range(len(sim.instances)) if i is None else [i]
    return sum(metric(metrics(sim.port(k)), name, **labels) for k in instances)


class Result(Response):
    def __init__(self, status, headers, body, complete, error, elapsed):
        super().__init__(status, headers, body)
        self.complete = complete  # the body ended as HTTP says (chunked terminator / length)
        self.error = error        # what the client library raised while reading, if anything
        self.elapsed = elapsed


def call(port, path, body, timeout=20):
    """One POST, read to the end as a client would; notes how the body ended and how long the
    whole exchange took."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.monotonic()
    try:
        conn.request("POST", path, body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = b""
        complete, error = True, None
        try:
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                data += chunk
        except http.client.IncompleteRead as e:
            data += e.partial
            complete, error = False, "IncompleteRead"
        except (OSError, http.client.HTTPException) as e:
            complete, error = False, repr(e)
        return Result(resp.status, resp.getheaders(), data, complete, error,
                      time.monotonic() - t0)
    finally:
        conn.close()


def fresh_ids(n=100):
    """Token ids no other request used (so nothing hits a prefix cache)."""
    base = random.randrange(1000, 120000)
    return list(range(base, base + n))


def upstream(name, ports, keepalive=True):
    servers = "\n".join("        server 127.0.0.1:%d max_fails=0;" % p for p in ports)
    return "    upstream %s {\n%s\n%s    }\n" % (name, servers,
                                              "        keepalive 16;\n" if keepalive else "")


STATUS_SERVER = """
    server {
        listen 127.0.0.1:PORT;
        location = /omni/status { omni_proxy_status; }
        location = /omni/metrics { omni_proxy_metrics; }
    }
"""


def parallel_server(port, prefill, decode, extra=""):
    return """
    server {
        listen 127.0.0.1:%d;
        omni_proxy_connect_timeout 2s;
        omni_proxy_prefill_timeout %ds;
        omni_proxy_decode_timeout %ds;
        location / {
            omni_proxy;
            omni_proxy_mode parallel;
            omni_proxy_engine sglang;
            omni_proxy_prefill_upstream %s;
            omni_proxy_decode_upstream %s;
            # Nothing listens there: a request that used the fallback instead of the
            # discovered port fails at once.
            omni_proxy_bootstrap_port 1;
            %s
        }
    }
""" % (port, LEG_TIMEOUT_S, LEG_TIMEOUT_S, prefill, decode, extra)


class _Base(unittest.TestCase):
    nginx = None
    sims = ()

    @classmethod
    def start_nginx(cls, conf):
        cls.nginx = Nginx(conf)
        r = cls.nginx.run()
        if r.returncode != 0:
            cls.nginx.cleanup()
            raise RuntimeError("nginx did not start: " + r.stderr)
        if not wait_until(lambda: status(cls.nginx.port) is not None, 10):
            raise RuntimeError("nginx status never answered")

    @classmethod
    def tearDownClass(cls):
        errors = []
        if cls.nginx is not None:
            errors = cls.nginx.errors()
            cls.nginx.cleanup()
        for s in cls.sims:
            s.stop()
        assert errors == [], errors

    def settle(self, timeout=8):
        """Lets a request that a failed assertion left in flight end before the next test."""
        wait_until(lambda: slots_used(self.nginx.port) == 0, timeout, 0.05)

    def assert_json_error(self, r, statuses):
        self.assertIn(r.status, statuses, r.body[:500])
        self.assertTrue(r.headers.get("content-type", "").startswith("application/json"),
                        r.headers)
        self.assertTrue(r.complete, r.error)
        j = r.json()
        self.assertIsInstance(j.get("error"), dict, j)
        self.assertIsInstance(j["error"].get("message"), str, j)
        self.assertTrue(j["error"]["message"])
        self.assertEqual(j["error"].get("code"), r.status, j)
        return j["error"]

    def assert_sse_error_end(self, r, min_data_events=1):
        """HTTP 200, `min_data_events` ordinary events, then a final event with an error object,
        and a chunked body that ends properly."""
        self.assertEqual(r.status, 200, r.body[:500])
        self.assertTrue(r.headers.get("content-type", "").startswith("text/event-stream"),
                        r.headers)
        self.assertTrue(r.complete, "the stream did not end properly (%s); got %r" %
                        (r.error, r.body[-300:]))
        events = r.events()
        # An optional [DONE] may follow the error; nothing else may.
        if events and events[-1] == "[DONE]":
            events = events[:-1]
        self.assertTrue(events, r.body)
        last = json.loads(events[-1])
        self.assertIsInstance(last.get("error"), dict, "last event is not an error: %r" % last)
        err = last["error"]
        self.assertIsInstance(err.get("message"), str, err)
        self.assertTrue(err["message"])
        self.assertIsInstance(err.get("type"), str, err)
        self.assertIsInstance(err.get("code"), int, err)
        self.assertGreaterEqual(err["code"], 500, err)
        data = [json.loads(e) for e in events[:-1]]
        self.assertGreaterEqual(len(data), min_data_events, r.body)
        for d in data:
            self.assertNotIn("error", d, r.body)
        return err

    def assert_failed_fast(self, r, limit):
        self.assertLess(r.elapsed, limit, "the client waited %.2f s" % r.elapsed)


# --- happy path ----------------------------------------------------------------------------------


class NginxParallelPdTest(_Base):
    @classmethod
    def setUpClass(cls):
        cls.sims = []
        cls.prefill = Sim("--engine", "sglang", "--role", "prefill", "--instances", "2",
                          "--bootstrap-port", "0")
        cls.sims.append(cls.prefill)
        cls.decode = Sim("--engine", "sglang", "--role", "decode", "--instances", "2")
        cls.sims.append(cls.decode)
        cls.api_port = free_port()
        conf = (upstream("sgl_prefill", [cls.prefill.port(0), cls.prefill.port(1)]) +
                upstream("sgl_decode", [cls.decode.port(0), cls.decode.port(1)]) +
                "    omni_proxy_zone omni 4m;\n    omni_proxy_poll_interval 1s;\n" +
                STATUS_SERVER +
                parallel_server(cls.api_port, "sgl_prefill", "sgl_decode"))
        try:
            cls.start_nginx(conf)
            # No traffic before nginx knows where the prefills' bootstrap servers are.
            wait_bootstrap_ports(cls.nginx.port, "sgl_prefill", cls.prefill)
        except Exception:
            cls.tearDownClass()
            raise

    def tearDown(self):
        self.settle()

    # --- shapes of the answers ---

    def check_generate(self, item, n):
        self.assertIsInstance(item["text"], str)
        self.assertTrue(item["text"])
        self.assertEqual(len(item["output_ids"]), n)
        self.assertEqual(item["meta_info"]["completion_tokens"], n)
        self.assertEqual(item["meta_info"]["finish_reason"], {"type": "length", "length": n})

    def check_generate_stream(self, r, n):
        self.assertEqual(r.status, 200, r.body)
        self.assertTrue(r.complete, r.error)
        self.assertTrue(r.headers["content-type"].startswith("text/event-stream"))
        self.assertEqual(r.events()[-1], "[DONE]")
        chunks = r.json_events()
        self.assertTrue(chunks)
        text = ""
        for c in chunks:
            self.assertNotIn("error", c)
            self.assertTrue(c["text"].startswith(text), (text, c["text"]))  # cumulative
            text = c["text"]
        self.assertEqual(chunks[-1]["meta_info"]["completion_tokens"], n)
        self.assertEqual(chunks[-1]["meta_info"]["finish_reason"]["type"], "length")
        return chunks

    def test_generate_text(self):
        r = call(self.api_port, "/generate",
                 {"text": "the parallel prefill and decode meet", "sampling_params":
                  {"max_new_tokens": 6}})
        self.assertEqual(r.status, 200, r.body)
        self.check_generate(r.json(), 6)

    def test_generate_input_ids(self):
        ids = fresh_ids(40)
        r = call(self.api_port, "/generate",
                 {"input_ids": ids, "sampling_params": {"max_new_tokens": 5}})
        self.assertEqual(r.status, 200, r.body)
        self.check_generate(r.json(), 5)
        self.assertEqual(r.json()["meta_info"]["prompt_tokens"], 40)

    def test_generate_text_streamed(self):
        r = call(self.api_port, "/generate",
                 {"text": "stream this through nginx", "stream": True,
                  "sampling_params": {"max_new_tokens": 7}})
        self.check_generate_stream(r, 7)

    def test_generate_input_ids_streamed(self):
        r = call(self.api_port, "/generate",
                 {"input_ids": fresh_ids(30), "stream": True,
                  "sampling_params": {"max_new_tokens": 4}})
        chunks = self.check_generate_stream(r, 4)
        self.assertEqual(chunks[-1]["meta_info"]["prompt_tokens"], 30)

    def test_chat_completions(self):
        r = call(self.api_port, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "hello over P/D"}], "max_tokens": 5})
        self.assertEqual(r.status, 200, r.body)
        j = r.json()
        self.assertEqual(j["object"], "chat.completion")
        self.assertEqual(len(j["choices"]), 1)
        self.assertEqual(j["choices"][0]["message"]["role"], "assistant")
        self.assertIsInstance(j["choices"][0]["message"]["content"], str)
        self.assertEqual(j["choices"][0]["finish_reason"], "length")
        self.assertEqual(j["usage"]["completion_tokens"], 5)
        self.assertNotIn("bootstrap_room", j)

    def test_chat_completions_streamed(self):
        r = call(self.api_port, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "stream hello"}], "max_tokens": 6,
                  "stream": True, "stream_options": {"include_usage": True}})
        self.assertEqual(r.status, 200, r.body)
        self.assertTrue(r.complete, r.error)
        self.assertEqual(r.events()[-1], "[DONE]")
        chunks = r.json_events()
        for c in chunks:
            self.assertEqual(c["object"], "chat.completion.chunk")
        content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
        self.assertEqual(len(content), 6)
        finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        self.assertEqual(finals[-1], "length")
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 6)

    def test_completions(self):
        r = call(self.api_port, "/v1/completions", {"prompt": "once upon a time", "max_tokens": 4})
        self.assertEqual(r.status, 200, r.body)
        j = r.json()
        self.assertEqual(j["object"], "text_completion")
        self.assertIsInstance(j["choices"][0]["text"], str)
        self.assertEqual(j["choices"][0]["finish_reason"], "length")
        self.assertEqual(j["usage"]["completion_tokens"], 4)

    def test_completions_streamed(self):
        r = call(self.api_port, "/v1/completions",
                 {"prompt": "once upon a streamed time", "max_tokens": 5, "stream": True})
        self.assertEqual(r.status, 200, r.body)
        self.assertTrue(r.complete, r.error)
        self.assertEqual(r.events()[-1], "[DONE]")
        chunks = [c for c in r.json_events() if c["choices"]]
        self.assertEqual(len(chunks), 5)
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "length")

    # --- batch input: the bootstrap fields become lists (the sims refuse scalars for a batch) ---

    def test_generate_batch_text(self):
        texts = ["first of three", "second of three", "third of three"]
        r = call(self.api_port, "/generate",
                 {"text": texts, "sampling_params": {"max_new_tokens": 3}})
        self.assertEqual(r.status, 200, r.body)
        items = r.json()
        self.assertIsInstance(items, list)
        self.assertEqual(len(items), 3)
        for item in items:
            self.check_generate(item, 3)

    def test_generate_batch_input_ids(self):
        batch = [fresh_ids(20), fresh_ids(33)]
        r = call(self.api_port, "/generate",
                 {"input_ids": batch, "sampling_params": {"max_new_tokens": 2}})
        self.assertEqual(r.status, 200, r.body)
        items = r.json()
        self.assertEqual(len(items), 2)
        self.assertEqual(sorted(i["meta_info"]["prompt_tokens"] for i in items), [20, 33])
        for item in items:
            self.check_generate(item, 2)

    def test_generate_batch_streamed(self):
        r = call(self.api_port, "/generate",
                 {"text": ["alpha batch", "beta batch"], "stream": True,
                  "sampling_params": {"max_new_tokens": 3}})
        self.assertEqual(r.status, 200, r.body)
        self.assertTrue(r.complete, r.error)
        self.assertEqual(r.events()[-1], "[DONE]")
        last = {}
        for c in r.json_events():
            self.assertNotIn("error", c)
            last[c["index"]] = c
        self.assertEqual(sorted(last), [0, 1])
        for c in last.values():
            self.assertEqual(c["meta_info"]["completion_tokens"], 3)

    def test_completions_batch_prompt(self):
        r = call(self.api_port, "/v1/completions",
                 {"prompt": ["batch prompt one", "batch prompt two"], "max_tokens": 3})
        self.assertEqual(r.status, 200, r.body)
        j = r.json()
        self.assertEqual(sorted(c["index"] for c in j["choices"]), [0, 1])
        for c in j["choices"]:
            self.assertIsInstance(c["text"], str)
            self.assertEqual(c["finish_reason"], "length")
        self.assertEqual(j["usage"]["completion_tokens"], 6)

    def test_completions_batch_prompt_streamed(self):
        r = call(self.api_port, "/v1/completions",
                 {"prompt": ["streamed batch one", "streamed batch two", "streamed batch three"],
                  "max_tokens": 2, "stream": True})
        self.assertEqual(r.status, 200, r.body)
        self.assertTrue(r.complete, r.error)
        self.assertEqual(r.events()[-1], "[DONE]")
        finished = {}
        for c in r.json_events():
            for ch in c["choices"]:
                if ch.get("finish_reason"):
                    finished[ch["index"]] = ch["finish_reason"]
        self.assertEqual(finished, {0: "length", 1: "length", 2: "length"})

    # --- configuration ---

    def test_parallel_mode_defaults_to_the_sglang_engine(self):
        # omni_proxy_engine defaults to sglang in parallel mode (SGLang's P/D protocol), also
        # when the mode is set in a location, as usual, below http{} and server{}.
        ups = upstream("p", [self.prefill.port(0)]) + upstream("d", [self.decode.port(0)])
        for where in ("location", "server"):
            with self.subTest(mode_set_in=where):
                loc = "omni_proxy; omni_proxy_prefill_upstream p; omni_proxy_decode_upstream d;"
                mode = "omni_proxy_mode parallel;"
                if where == "location":
                    srv = "server { listen 127.0.0.1:PORT; location / { %s %s } }" % (mode, loc)
                else:
                    srv = "server { listen 127.0.0.1:PORT; %s location / { %s } }" % (mode, loc)
                n = Nginx(ups + "    " + srv + "\n")
                try:
                    r = n.run("-t")
                    self.assertEqual(r.returncode, 0, r.stderr)
                finally:
                    n.cleanup()

    # --- discovery, balance, KV transfer ---

    def test_bootstrap_ports_are_the_announced_ones(self):
        rows = {b["name"]: b for b in backend_rows(self.nginx.port, "sgl_prefill")}
        for inst in self.prefill.instances:
            name = "127.0.0.1:%d" % inst["http_port"]
            self.assertIn(name, rows)
            self.assertEqual(rows[name]["bootstrap_port"], inst["bootstrap_port"])
            info = get(inst["http_port"], "/get_server_info").json()
            self.assertEqual(info["disaggregation_bootstrap_port"], inst["bootstrap_port"])
        # Decode servers have no bootstrap server.
        for b in backend_rows(self.nginx.port, "sgl_decode"):
            self.assertNotIn("bootstrap_port", b)

    def test_both_prefills_work_and_kv_moves_through_bootstrap(self):
        def snapshot():
            return {
                "sent": [counter(self.prefill, "omni_sim:kv_blocks_sent_total", i) for i in (0, 1)],
                "p_ok": [counter(self.prefill, "sglang:num_requests_total", i) for i in (0, 1)],
                "received": counter(self.decode, "omni_sim:kv_blocks_received_total"),
                "d_ok": counter(self.decode, "sglang:num_requests_total"),
                "status": {b["name"]: b["requests_total"]
                           for b in backend_rows(self.nginx.port, "sgl_prefill")},
            }

        before = snapshot()
        n = 10
        for k in range(n):
            # 100 fresh token ids: 7 blocks of 16 to move from prefill to decode.
            body = {"input_ids": fresh_ids(100), "sampling_params": {"max_new_tokens": 3}}
            if k % 2:
                body["stream"] = True
            r = call(self.api_port, "/generate", body)
            self.assertEqual(r.status, 200, r.body)
        # The prefills' answers are drained in the background; they may land just after.
        self.assertTrue(wait_until(
            lambda: sum(snapshot()["p_ok"]) - sum(before["p_ok"]) == n, 5))
        after = snapshot()
        sent = [a - b for a, b in zip(after["sent"], before["sent"])]
        per_prefill = [a - b for a, b in zip(after["p_ok"], before["p_ok"])]
        self.assertEqual(after["d_ok"] - before["d_ok"], n)
        self.assertEqual(sum(sent), 7 * n, sent)
        self.assertEqual(after["received"] - before["received"], 7 * n)
        # Both prefill instances got work, by the sims' and by nginx's own count.
        self.assertTrue(all(p > 0 for p in per_prefill), per_prefill)
        self.assertTrue(all(s > 0 for s in sent), sent)
        by_status = {k: after["status"][k] - before["status"].get(k, 0) for k in after["status"]}
        self.assertEqual(len(by_status), 2, after["status"])
        self.assertTrue(all(v > 0 for v in by_status.values()), by_status)
        self.assertEqual(sum(by_status.values()), n, by_status)
        # No rendezvous timed out, nothing is held.
        self.assertEqual(counter(self.prefill, "omni_sim:bootstrap_timeouts_total"), 0)
        self.assertEqual(counter(self.decode, "omni_sim:bootstrap_timeouts_total"), 0)


# --- failing legs --------------------------------------------------------------------------------


class NginxParallelOtherBalancerTest(_Base):
    """A prefill block with its own balancer method: the prefill named in the body is still the
    one the prefill leg goes to."""

    @classmethod
    def setUpClass(cls):
        cls.prefill = Sim("--engine", "sglang", "--role", "prefill", "--instances", "2",
                          "--bootstrap-port", "0")
        cls.decode = Sim("--engine", "sglang", "--role", "decode")
        cls.sims = [cls.prefill, cls.decode]
        try:
            cls.port = free_port()
            conf = ("    omni_proxy_zone omni 4m;\n    omni_proxy_poll_interval 200ms;\n"
                    "    upstream lc_prefill {\n        least_conn;\n" +
                    "".join("        server 127.0.0.1:%d max_fails=0;\n" % cls.prefill.port(i)
                            for i in range(2)) +
                    "        keepalive 8;\n    }\n" + upstream("lc_decode", [cls.decode.port()]) +
                    STATUS_SERVER + parallel_server(cls.port, "lc_prefill", "lc_decode"))
            cls.start_nginx(conf)
            wait_bootstrap_ports(cls.nginx.port, "lc_prefill", cls.prefill)
        except Exception:
            cls.tearDownClass()
            raise

    def test_forced_prefill_with_least_conn(self):
        for i in range(8):
            r = call(self.port, "/generate", {"input_ids": fresh_ids(40),
                                               "sampling_params": {"max_new_tokens": 3}})
            self.assertEqual(r.status, 200, r.body)
        self.assertEqual(sum(counter(self.prefill, "omni_sim:bootstrap_timeouts_total", i)
                             for i in range(2)), 0)
        rows = backend_rows(self.nginx.port, "lc_prefill")
        self.assertEqual(sum(b["requests_total"] for b in rows), 8)
        self.assertEqual(sum(b["errors_total"] for b in rows), 0)


class NginxParallelFailureTest(_Base):
    """One nginx; each scenario has its own server block (port) and its own sims."""

    @classmethod
    def setUpClass(cls):
        cls.sims = []
        sg = ("--engine", "sglang")

        def sim(*args):
            s = Sim(*args)
            cls.sims.append(s)
            return s

        try:
            # Prefill answers 500 at once / decode healthy.
            cls.p_err = sim(*sg, "--role", "prefill", "--bootstrap-port", "0",
                            "--fault-error-rate", "1")
            cls.d_for_perr = sim(*sg, "--role", "decode")
            # Prefill healthy (its bootstrap wait would end after 5 s) / decode answers 500.
            cls.p_for_derr = sim(*sg, "--role", "prefill", "--bootstrap-port", "0",
                                 "--bootstrap-timeout", "5")
            cls.d_err = sim(*sg, "--role", "decode", "--fault-error-rate", "1")
            # Prefill never answers / decode healthy; omni_proxy_prefill_timeout 2s.
            cls.p_hang = sim(*sg, "--role", "prefill", "--bootstrap-port", "0",
                             "--fault-hang-rate", "1")
            cls.d_for_hang = sim(*sg, "--role", "decode")
            # Prefill healthy / decode resets after the first token.
            cls.p_ok = sim(*sg, "--role", "prefill", "--bootstrap-port", "0")
            cls.d_disc = sim(*sg, "--role", "decode", "--fault-disconnect-rate", "1")
            # Healthy pair for client disconnects; the decode steps 5x slower, so its stream
            # lasts seconds while the prefill finishes in well under one.
            cls.p_ok2 = sim(*sg, "--role", "prefill", "--bootstrap-port", "0")
            cls.d_ok = sim(*sg, "--role", "decode", "--fault-slowdown", "5")
            # Healthy pair, 20x faster than real time, for a prefill answer of many MB.
            cls.p_big = sim(*sg, "--role", "prefill", "--bootstrap-port", "0",
                            "--time-scale", "0.05")
            cls.d_big = sim(*sg, "--role", "decode", "--time-scale", "0.05")
            # Prefill that waits 4 s before admission / decode healthy.
            cls.p_slow = sim(*sg, "--role", "prefill", "--bootstrap-port", "0",
                             "--fault-slow-rate", "1", "--fault-slow-ms", "4000")
            cls.d_for_slow = sim(*sg, "--role", "decode")
            # vLLM: an aggregated engine and a sequential decode that reset after one token.
            cls.v_agg = sim("--engine", "vllm", "--fault-disconnect-rate", "1")
            cls.v_prefill = sim("--engine", "vllm", "--role", "prefill")
            cls.v_decode = sim("--engine", "vllm", "--role", "decode",
                               "--fault-disconnect-rate", "1")

            cls.ports = {k: free_port() for k in
                         ("perr", "derr", "phang", "ddisc", "cdisc", "pslow", "big", "agg",
                          "seq")}
            # No keepalive: a connection open to a sim is a request in flight.
            ups = "".join(upstream(name, [s.port()], keepalive=False) for name, s in (
                ("p_err", cls.p_err), ("d_for_perr", cls.d_for_perr),
                ("p_for_derr", cls.p_for_derr), ("d_err", cls.d_err),
                ("p_hang", cls.p_hang), ("d_for_hang", cls.d_for_hang),
                ("p_ok", cls.p_ok), ("d_disc", cls.d_disc),
                ("p_ok2", cls.p_ok2), ("d_ok", cls.d_ok),
                ("p_big", cls.p_big), ("d_big", cls.d_big),
                ("p_slow", cls.p_slow), ("d_for_slow", cls.d_for_slow),
                ("v_agg", cls.v_agg), ("v_prefill", cls.v_prefill), ("v_decode", cls.v_decode)))
            p = cls.ports
            conf = (ups + "    omni_proxy_zone omni 4m;\n" + STATUS_SERVER +
                    parallel_server(p["perr"], "p_err", "d_for_perr") +
                    parallel_server(p["derr"], "p_for_derr", "d_err") +
                    parallel_server(p["phang"], "p_hang", "d_for_hang",
                                    "omni_proxy_prefill_timeout 2s;") +
                    parallel_server(p["ddisc"], "p_ok", "d_disc") +
                    parallel_server(p["cdisc"], "p_ok2", "d_ok") +
                    parallel_server(p["pslow"], "p_slow", "d_for_slow") +
                    parallel_server(p["big"], "p_big", "d_big") +
                    """
    server {
        listen 127.0.0.1:%d;
        omni_proxy_decode_timeout 10s;
        location / { omni_proxy; omni_proxy_mode aggregated; omni_proxy_upstream v_agg; }
    }
    server {
        listen 127.0.0.1:%d;
        omni_proxy_prefill_timeout 10s;
        omni_proxy_decode_timeout 10s;
        location / {
            omni_proxy;
            omni_proxy_mode sequential;
            omni_proxy_prefill_upstream v_prefill;
            omni_proxy_decode_upstream v_decode;
        }
    }
""" % (p["agg"], p["seq"]))
            cls.start_nginx(conf)
            for pool, s in (("p_err", cls.p_err), ("p_for_derr", cls.p_for_derr),
                            ("p_hang", cls.p_hang), ("p_ok", cls.p_ok), ("p_ok2", cls.p_ok2),
                            ("p_slow", cls.p_slow), ("p_big", cls.p_big)):
                wait_bootstrap_ports(cls.nginx.port, pool, s)
        except Exception:
            cls.tearDownClass()
            raise

    def tearDown(self):
        self.settle()

    def assert_released(self, *sims, timeout=2.0):
        """Nothing of the test's requests is left: no request slot in nginx, no connection open
        to the sims (HTTP port and, for prefills, bootstrap port), nothing running or queued."""
        self.assertTrue(wait_until(lambda: slots_used(self.nginx.port) == 0, timeout, 0.05),
                        "nginx still holds %s request slots; stages %s" %
                        (slots_used(self.nginx.port),
                         (status(self.nginx.port) or {}).get("stages")))
        for s in sims:
            ports = [s.port()] + ([s.instances[0]["bootstrap_port"]]
                                  if s.instances[0].get("bootstrap_port") else [])
            for port in ports:
                self.assertTrue(wait_until(lambda: open_connections(port) == 0, timeout, 0.05),
                                "%d connection(s) still open to %s port %d" %
                                (open_connections(port), s.info["instances"][0]["role"], port))
            self.assertTrue(wait_until(lambda: engine_busy(s) == 0, timeout, 0.05),
                            "the %s sim still has %s requests" %
                            (s.instances[0]["role"], engine_busy(s)))

    # --- a leg that fails before the answer started ---

    def test_failing_prefill_cancels_decode(self):
        port = self.ports["perr"]
        cases = [
            ("/generate", {"text": "prefill will fail", "sampling_params": {"max_new_tokens": 5}}),
            ("/v1/completions", {"prompt": "prefill will fail", "max_tokens": 5}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "fail"}],
                                      "max_tokens": 5, "stream": True}),
        ]
        for path, body in cases:
            with self.subTest(path=path, stream=body.get("stream", False)):
                d_ok_before = counter(self.d_for_perr, "sglang:num_requests_total")
                r = call(port, path, body)
                self.assert_failed_fast(r, 2.0)  # the leg timeouts are 10 s
                if r.status == 200:
                    # The decode's stream had started: the error ends it.
                    self.assert_sse_error_end(r, min_data_events=0)
                else:
                    err = self.assert_json_error(r, (500, 502))
                    self.assertIn("prefill", err["message"])
                self.assert_released(self.d_for_perr, self.p_err)
                self.assertEqual(counter(self.d_for_perr, "sglang:num_requests_total"), d_ok_before)
        self.assertEqual(counter(self.d_for_perr, "omni_sim:kv_blocks_received_total"), 0)
        # The decode the proxy cancelled did not fail: it is not counted (nor, for nginx's
        # max_fails, marked) as failing.
        self.assertEqual([b["errors_total"] for b in backend_rows(self.nginx.port, "d_for_perr")],
                         [0])
        self.assertGreaterEqual(sum(b["errors_total"]
                                    for b in backend_rows(self.nginx.port, "p_err")), 3)

    def test_failing_decode_cancels_prefill_bootstrap_wait(self):
        port = self.ports["derr"]
        cases = [
            ("/generate", {"text": "decode will fail", "sampling_params": {"max_new_tokens": 5}}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "fail"}],
                                      "max_tokens": 5, "stream": True}),
        ]
        for path, body in cases:
            with self.subTest(path=path, stream=body.get("stream", False)):
                try:
                    r = call(port, path, body)
                    self.assert_failed_fast(r, 2.0)
                    if r.status == 200:
                        self.assert_sse_error_end(r, min_data_events=0)
                    else:
                        # The engine's own 500 relayed, or the module's 502.
                        self.assertIn(r.status, (500, 502), r.body)
                        self.assertTrue(r.headers["content-type"].startswith("application/json"))
                        self.assertIn("error", r.body.decode())
                    # The prefill waits in its bootstrap queue for a decode that will never
                    # come (until --bootstrap-timeout 5): nginx must cancel it, not wait.
                    self.assert_released(self.p_for_derr, self.d_err, timeout=1.5)
                finally:
                    self.settle()
        self.assertEqual(counter(self.p_for_derr, "omni_sim:kv_blocks_sent_total"), 0)

    def test_hanging_prefill_times_out_and_cancels_decode(self):
        port = self.ports["phang"]
        cases = [
            ("/generate", {"text": "prefill hangs", "sampling_params": {"max_new_tokens": 5}}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hang"}],
                                      "max_tokens": 5, "stream": True}),
        ]
        for path, body in cases:
            with self.subTest(path=path, stream=body.get("stream", False)):
                r = call(port, path, body)
                # omni_proxy_prefill_timeout 2s, decode timeout 10s.
                self.assertGreater(r.elapsed, 1.8)
                self.assert_failed_fast(r, 4.0)
                if r.status == 200:
                    self.assert_sse_error_end(r, min_data_events=0)
                else:
                    self.assert_json_error(r, (502, 504))
                self.assert_released(self.d_for_hang, self.p_hang)

    # --- the decode fails after its answer started streaming ---

    def check_mid_stream_failure(self, port, decode_sim, stream_cases, whole_cases):
        for path, body in stream_cases:
            with self.subTest(path=path, stream=True):
                r = call(port, path, body)
                self.assert_failed_fast(r, 3.0)
                err = self.assert_sse_error_end(r, min_data_events=1)
                self.assertEqual(err["code"], 502, err)
                self.assert_released(decode_sim)
        for path, body in whole_cases:
            with self.subTest(path=path, stream=False):
                r = call(port, path, body)
                self.assert_failed_fast(r, 3.0)
                self.assert_json_error(r, (502,))
                self.assert_released(decode_sim)

    def test_decode_fails_mid_stream_parallel(self):
        before = counter(self.d_disc, "omni_sim:faults_injected_total", kind="disconnect")
        self.check_mid_stream_failure(
            self.ports["ddisc"], self.d_disc,
            [("/v1/chat/completions", {"messages": [{"role": "user", "content": "reset"}],
                                       "max_tokens": 50, "stream": True}),
             ("/v1/completions", {"prompt": "reset me", "max_tokens": 50, "stream": True}),
             ("/generate", {"text": "reset me", "stream": True,
                            "sampling_params": {"max_new_tokens": 50}})],
            [("/v1/chat/completions", {"messages": [{"role": "user", "content": "reset"}],
                                       "max_tokens": 50}),
             ("/generate", {"text": "reset me", "sampling_params": {"max_new_tokens": 50}})])
        self.assertEqual(counter(self.d_disc, "omni_sim:faults_injected_total", kind="disconnect")
                         - before, 5)
        self.assert_released(self.p_ok)

    def test_decode_fails_mid_stream_aggregated(self):
        self.check_mid_stream_failure(
            self.ports["agg"], self.v_agg,
            [("/v1/chat/completions", {"messages": [{"role": "user", "content": "reset"}],
                                       "max_tokens": 50, "stream": True}),
             ("/v1/completions", {"prompt": "reset me", "max_tokens": 50, "stream": True})],
            [("/v1/completions", {"prompt": "reset me", "max_tokens": 50})])

    def test_decode_fails_mid_stream_sequential(self):
        self.check_mid_stream_failure(
            self.ports["seq"], self.v_decode,
            [("/v1/chat/completions", {"messages": [{"role": "user", "content": "reset"}],
                                       "max_tokens": 50, "stream": True}),
             ("/v1/completions", {"prompt": "reset me", "max_tokens": 50, "stream": True})],
            [("/v1/completions", {"prompt": "reset me", "max_tokens": 50})])
        self.assert_released(self.v_prefill)
        self.assertEqual(counter(self.v_prefill, "omni_sim:kv_held_requests"), 0)

    def test_large_prefill_answer_is_drained(self):
        # omni-sim's SGLang prefill answers with the whole generation (streamed /generate text
        # is cumulative: ~12 MB for 1500 tokens). In parallel mode the prefill's answer only
        # tells whether the leg succeeded; its size must not break the client's stream.
        r = call(self.ports["big"], "/generate",
                 {"text": "a long answer", "stream": True,
                  "sampling_params": {"max_new_tokens": 1500}}, timeout=30)
        self.assertEqual(r.status, 200, r.body[:500])
        self.assertTrue(r.complete, "the stream was cut (%s) after %d bytes: %r" %
                        (r.error, len(r.body), r.body[-200:]))
        self.assertEqual(r.events()[-1], "[DONE]")
        last = r.json_events()[-1]
        self.assertNotIn("error", last)
        self.assertEqual(last["meta_info"]["completion_tokens"], 1500)
        self.assert_released(self.p_big, self.d_big)

    # --- the client hangs up ---

    def open_stream(self, port, path, body):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        data = json.dumps(body).encode()
        s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nContent-Length: " +
                  str(len(data)).encode() + b"\r\n\r\n" + data)
        return s

    def test_client_disconnect_mid_stream_aborts_both_legs(self):
        p_ok_before = counter(self.p_ok2, "sglang:num_requests_total")
        d_ok_before = counter(self.d_ok, "sglang:num_requests_total")
        gen_before = counter(self.d_ok, "sglang:generation_tokens_total")
        # 300 decode steps of >= 10 ms: the stream would last 3 s or more.
        s = self.open_stream(self.ports["cdisc"], "/v1/completions",
                             {"prompt": "a long story", "stream": True, "max_tokens": 300})
        try:
            got = b""
            deadline = time.monotonic() + 5
            while b"data: " not in got and time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            self.assertIn(b"200 OK", got)
            self.assertIn(b"data: ", got)
            self.assertEqual(engine_busy(self.d_ok), 1)
        finally:
            s.close()
        t0 = time.monotonic()
        self.assert_released(self.d_ok, self.p_ok2, timeout=2.0)
        self.assertLess(time.monotonic() - t0, 2.0)
        # The decode was aborted, not finished; it stopped generating.
        self.assertEqual(counter(self.d_ok, "sglang:num_requests_total"), d_ok_before)
        generated = counter(self.d_ok, "sglang:generation_tokens_total") - gen_before
        self.assertLess(generated, 300)
        time.sleep(0.2)
        self.assertEqual(counter(self.d_ok, "sglang:generation_tokens_total") - gen_before,
                         generated)
        # The prefill had already done its part (the KV moved before the first token).
        self.assertEqual(counter(self.p_ok2, "sglang:num_requests_total") - p_ok_before, 1)

    def test_client_disconnect_during_prefill_aborts_both_legs(self):
        p_seen = counter(self.p_slow, "omni_sim:requests_total")
        d_seen = counter(self.d_for_slow, "omni_sim:requests_total")
        s = self.open_stream(self.ports["pslow"], "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "slow prefill"}],
                              "max_tokens": 5, "stream": True})
        try:
            # Both legs reached their engines; the prefill waits 4 s before admission.
            self.assertTrue(wait_until(
                lambda: counter(self.p_slow, "omni_sim:requests_total") == p_seen + 1 and
                counter(self.d_for_slow, "omni_sim:requests_total") == d_seen + 1, 3))
        finally:
            s.close()
        t0 = time.monotonic()
        self.assert_released(self.p_slow, self.d_for_slow, timeout=2.0)
        self.assertLess(time.monotonic() - t0, 2.0)
        self.assertEqual(counter(self.d_for_slow, "sglang:num_requests_total"), 0)
        self.assertEqual(counter(self.p_slow, "omni_sim:kv_blocks_sent_total"), 0)


if __name__ == "__main__":
    unittest.main()
