"""Shared state through real nginx (2 workers) in front of omni-sim: omni_proxy_metrics
(validated by promtool), omni_proxy_status, the engine /metrics poller, the lifecycle in log
variables, least-outstanding peer choice across workers, in-flight limits with a wait queue
(429 and 503 with Retry-After), slot exhaustion (503 with Retry-After) and a killed worker's
slots being reclaimed."""
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import unittest

from simlib import (Sim, free_port, get, metric, metrics, parse_exposition, port_open, post,
                    request, wait_until)
from test_nginx_module import Nginx

PROMTOOL = shutil.which("promtool")
STAGES = ["received", "tokenized", "apc_matched", "waiting_prefill", "prefill_scheduled",
          "prefilling", "waiting_decode", "decode_scheduled", "decoding", "done"]

LOG_FORMAT = ("$omni_request_id|$status|$omni_prefill_peer|$omni_decode_peer|$omni_ttft_ms|"
              "$omni_tpot_ms|$omni_total_ms|$omni_prompt_tokens|$omni_output_tokens|"
              "$omni_stage_prefilling_ms|$omni_stages")


def servers(ports, extra=""):
    return "\n".join("        server 127.0.0.1:%d max_fails=0%s;" % (p, extra) for p in ports)


def status(port):
    r = get(port, "/omni/status", timeout=5)
    assert r.status == 200, r.body
    return r.json()


def prom(port):
    """(text, {(name, labels): value}) of omni_proxy_metrics."""
    r = get(port, "/omni/metrics", timeout=5)
    assert r.status == 200, r.body
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4"), r.headers
    text = r.body.decode()
    values = parse_exposition(text)
    return text, values


def worker_pids(nginx):
    """The pids of the nginx master's worker processes, from /proc."""
    with open(os.path.join(nginx.dir, "nginx.pid")) as f:
        master = int(f.read())
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master:
            pids.add(int(entry))
    return pids


def open_stream(port, path, body, request_id=None, timeout=30):
    """Sends a request and returns the open socket without reading the answer."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    data = json.dumps(body).encode()
    head = ("POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n" % (path, len(data)))
    if request_id:
        head += "X-Request-Id: %s\r\n" % request_id
    s.sendall(head.encode() + b"\r\n" + data)
    return s


class NginxStateTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.prefill = Sim("--engine", "vllm", "--role", "prefill", "--instances", "2")
        cls.decode = Sim("--engine", "vllm", "--role", "decode", "--instances", "2")
        # Every request waits 1.5 s before the engine admits it: holds a limit's place.
        cls.slow = Sim("--engine", "vllm", "--fault-slow-rate", "1", "--fault-slow-ms", "1500")
        cls.limit_port = free_port()
        conf = """
    omni_proxy_zone omni 4m;
    omni_proxy_poll_interval 200ms;
    log_format omni '{fmt}';
    upstream prefill {{
{prefill}
        keepalive 8;
    }}
    upstream decode {{
{decode}
        keepalive 8;
    }}
    upstream slow {{
{slow}
    }}
    server {{
        listen 127.0.0.1:PORT;
        access_log {logdir}/omni.log omni;
        location /v1/ {{
            omni_proxy;
            omni_proxy_mode sequential;
            omni_proxy_prefill_upstream prefill;
            omni_proxy_decode_upstream decode;
        }}
        location = /omni/status {{ omni_proxy_status; }}
        location = /omni/metrics {{ omni_proxy_metrics; }}
    }}
    server {{
        listen 127.0.0.1:{limit_port};
        location /v1/completions {{
            omni_proxy;
            omni_proxy_upstream slow;
            omni_proxy_max_inflight 1;
            omni_proxy_max_queue 1;
            omni_proxy_queue_timeout 4s;
        }}
        location /v1/chat/completions {{
            omni_proxy;
            omni_proxy_upstream slow;
            omni_proxy_max_inflight 1;
            omni_proxy_max_queue 1;
            omni_proxy_queue_timeout 500ms;
        }}
    }}
"""
        cls.nginx = Nginx("")
        body = conf.format(fmt=LOG_FORMAT, prefill=servers([cls.prefill.port(0), cls.prefill.port(1)]),
                           decode=servers([cls.decode.port(0), cls.decode.port(1)]),
                           slow=servers([cls.slow.port()]), logdir=cls.nginx.dir + "/logs",
                           limit_port=cls.limit_port)
        with open(cls.nginx.conf, "w") as f:
            f.write(cls.nginx.render(body))
        cls.access_log = os.path.join(cls.nginx.dir, "logs", "omni.log")
        r = cls.nginx.run()
        assert r.returncode == 0, r.stderr
        assert wait_until(lambda: port_open(cls.nginx.port), 10)

    @classmethod
    def tearDownClass(cls):
        errors = cls.nginx.errors()
        cls.nginx.cleanup()
        for s in (cls.prefill, cls.decode, cls.slow):
            s.stop()
        assert errors == [], errors

    def log_line(self, request_id):
        def find():
            if not os.path.exists(self.access_log):
                return None
            with open(self.access_log) as f:
                for line in f:
                    if line.startswith(request_id + "|"):
                        return line.rstrip("\n").split("|")
            return None
        self.assertTrue(wait_until(lambda: find() is not None, 5), "no access log line")
        return find()

    def test_metrics_are_valid_exposition_and_count_requests(self):
        for i in range(4):
            r = post(self.nginx.port, "/v1/completions",
                     {"prompt": "metrics %d" % i, "max_tokens": 4, "stream": i % 2 == 0})
            self.assertEqual(r.status, 200, r.body)
        # The slot is released in the log phase, after the response is complete.
        self.assertTrue(wait_until(lambda: prom(self.nginx.port)[1][
            ("omni_proxy_inflight_slots_used", frozenset())] == 0, 5))
        text, v = prom(self.nginx.port)
        if PROMTOOL:
            p = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                               text=True, timeout=30)
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        else:
            self.skipTest("promtool is not installed")
        self.assertGreater(v[("omni_proxy_inflight_slots_capacity", frozenset())], 10000)
        for stage in STAGES:
            self.assertEqual(v[("omni_proxy_requests_in_stage", frozenset({("stage", stage)}))],
                             0, stage)
        # Every stage with a successor has a histogram; the ones this release does not
        # implement (tokenized, apc_matched) are recorded as zero-length.
        done = v[("omni_proxy_request_duration_seconds_count", frozenset())]
        self.assertGreaterEqual(done, 4)
        for stage in ["received", "prefilling", "waiting_decode", "decode_scheduled", "decoding"]:
            self.assertGreaterEqual(
                v[("omni_proxy_stage_duration_seconds_count", frozenset({("stage", stage)}))],
                4, stage)
        self.assertGreaterEqual(v[("omni_proxy_ttft_seconds_count", frozenset())], 4)
        self.assertGreaterEqual(v[("omni_proxy_tpot_seconds_count", frozenset())], 4)
        self.assertEqual(v[("omni_proxy_zone_size_bytes", frozenset({("zone", "omni")}))],
                         4 * 1024 * 1024)
        prefill_reqs = sum(val for (n, l), val in v.items()
                           if n == "omni_proxy_backend_requests_total" and ("pool", "prefill") in l)
        decode_reqs = sum(val for (n, l), val in v.items()
                          if n == "omni_proxy_backend_requests_total" and ("pool", "decode") in l)
        self.assertGreaterEqual(prefill_reqs, 4)
        self.assertGreaterEqual(decode_reqs, 4)

    def test_poller_feeds_engine_load_of_every_server(self):
        def polled():
            st = status(self.nginx.port)
            return all(b["engine"] is not None for b in st["backends"])
        self.assertTrue(wait_until(polled, 5))
        st = status(self.nginx.port)
        self.assertEqual([p["name"] for p in st["pools"]], ["prefill", "decode", "slow"])
        self.assertEqual(len(st["backends"]), 5)
        for b in st["backends"]:
            self.assertIn("running", b["engine"])
            self.assertIn("waiting", b["engine"])
            self.assertTrue(b["engine"]["kv_usage"] is None or 0 <= b["engine"]["kv_usage"] <= 1)
        self.assertIn(st["zone"]["poller_pid"], [w["pid"] for w in st["workers"]] +
                      [st["zone"]["poller_pid"]])
        self.assertNotEqual(st["zone"]["poller_pid"], 0)
        _, v = prom(self.nginx.port)
        polled_at = [val for (n, l), val in v.items()
                     if n == "omni_proxy_backend_metrics_polled_seconds"]
        self.assertEqual(len(polled_at), 5)
        # A running request is visible to the poller: the engine reports it.
        s = open_stream(self.nginx.port, "/v1/completions",
                        {"prompt": "poll me", "max_tokens": 400, "stream": True})
        try:
            def sees_running():
                st = status(self.nginx.port)
                return any(b["pool"] == "decode" and (b["engine"] or {}).get("running", 0) >= 1
                           for b in st["backends"])
            self.assertTrue(wait_until(sees_running, 5))
        finally:
            s.close()

    def test_access_log_has_lifecycle_peers_and_tokens(self):
        rid = "state-log-1"
        r = post(self.nginx.port, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "log me " * 20}], "max_tokens": 12,
                  "stream": True, "stream_options": {"include_usage": True}},
                 headers={"X-Request-Id": rid})
        self.assertEqual(r.status, 200, r.body)
        usage = r.json_events()[-1]["usage"]
        f = self.log_line(rid)
        (req_id, code, prefill_peer, decode_peer, ttft, tpot, total, prompt, output,
         prefilling, stages) = f
        self.assertEqual(code, "200")
        self.assertIn(prefill_peer, ["127.0.0.1:%d" % self.prefill.port(i) for i in range(2)])
        self.assertIn(decode_peer, ["127.0.0.1:%d" % self.decode.port(i) for i in range(2)])
        self.assertGreater(float(ttft), 0)
        self.assertGreater(float(total), float(ttft))
        self.assertGreater(float(tpot), 0)
        self.assertEqual(int(prompt), usage["prompt_tokens"])
        self.assertEqual(int(output), 12)
        self.assertGreater(float(prefilling), 0)
        pairs = dict(p.split("=") for p in stages.split(","))
        self.assertEqual(list(pairs), STAGES)
        self.assertEqual(pairs["done"], "1")
        self.assertEqual(float(pairs["tokenized"]), 0)
        self.assertEqual(float(pairs["apc_matched"]), 0)
        self.assertAlmostEqual(sum(float(pairs[s]) for s in STAGES[:-1]), float(total), delta=0.01)

    def test_error_requests_are_logged_and_released(self):
        rid = "state-log-bad"
        r = post(self.nginx.port, "/v1/completions", "{not json", headers={"X-Request-Id": rid})
        self.assertEqual(r.status, 400)
        f = self.log_line(rid)
        self.assertEqual(f[1], "400")
        self.assertEqual(f[2], "-")  # no prefill peer was chosen
        self.assertIn("done=1", f[-1])

    def test_least_outstanding_spreads_streams_over_servers(self):
        # Streams opened one after another while the others still run: each goes to the
        # server with fewer outstanding requests, whichever worker takes it.
        socks = []
        try:
            for i in range(4):
                socks.append(open_stream(self.nginx.port, "/v1/completions",
                                         {"prompt": "spread %d" % i, "max_tokens": 300,
                                          "stream": True}, request_id="spread-%d" % i))
                time.sleep(0.15)

            def decoding():
                st = status(self.nginx.port)
                return {b["name"]: b["active_streams"] for b in st["backends"]
                        if b["pool"] == "decode"}
            self.assertTrue(wait_until(lambda: sum(decoding().values()) == 4, 5), decoding())
            self.assertEqual(sorted(decoding().values()), [2, 2])
        finally:
            for s in socks:
                s.close()
        self.assertTrue(wait_until(lambda: status(self.nginx.port)["slots"]["used"] == 0, 5))

    def test_least_outstanding_avoids_the_busy_server(self):
        # Round robin would alternate; least outstanding sends every short request to the
        # server that is not busy with the long stream.
        def counts():
            return {b["name"]: b["requests_total"] for b in status(self.nginx.port)["backends"]
                    if b["pool"] == "decode"}
        before = counts()
        s = open_stream(self.nginx.port, "/v1/completions",
                        {"prompt": "long", "max_tokens": 400, "stream": True})
        try:
            self.assertTrue(wait_until(lambda: sum(counts().values()) == sum(before.values()) + 1,
                                       5))
            busy = [n for n, c in counts().items() if c > before[n]][0]
            for i in range(6):
                r = post(self.nginx.port, "/v1/completions", {"prompt": "short %d" % i,
                                                               "max_tokens": 2})
                self.assertEqual(r.status, 200, r.body)
            after = counts()
            self.assertEqual(after[busy] - before[busy], 1, (before, after))
            idle = [n for n in after if n != busy][0]
            self.assertEqual(after[idle] - before[idle], 6, (before, after))
        finally:
            s.close()

    def test_limit_queues_then_refuses_with_429(self):
        results = {}

        def run(name, body):
            t0 = time.monotonic()
            r = post(self.limit_port, "/v1/completions", body, timeout=20)
            results[name] = (r, time.monotonic() - t0)

        a = threading.Thread(target=run, args=("a", {"prompt": "a", "max_tokens": 2}))
        a.start()
        self.assertTrue(wait_until(lambda: self._limit("/v1/completions")["inflight"] == 1, 5))
        b = threading.Thread(target=run, args=("b", {"prompt": "b", "max_tokens": 2}))
        b.start()
        self.assertTrue(wait_until(lambda: self._limit("/v1/completions")["queued"] == 1, 5))
        c = post(self.limit_port, "/v1/completions", {"prompt": "c", "max_tokens": 2})
        self.assertEqual(c.status, 429, c.body)
        self.assertEqual(c.headers.get("retry-after"), "1")
        self.assertEqual(c.json()["error"]["type"], "RateLimitError")
        a.join(20)
        b.join(20)
        self.assertEqual(results["a"][0].status, 200)
        self.assertEqual(results["b"][0].status, 200, results["b"][0].body)
        # b waited for a's place, then for its own engine delay.
        self.assertGreater(results["b"][1], 2.5)
        lim = self._limit("/v1/completions")
        self.assertEqual((lim["inflight"], lim["queued"]), (0, 0))
        self.assertGreaterEqual(lim["rejected_total"], 1)
        self.assertGreaterEqual(lim["queued_total"], 1)

    def test_queue_timeout_gives_503_with_retry_after(self):
        results = {}

        def run():
            results["a"] = post(self.limit_port, "/v1/chat/completions",
                                {"messages": [{"role": "user", "content": "a"}], "max_tokens": 2},
                                timeout=20)
        a = threading.Thread(target=run)
        a.start()
        self.assertTrue(wait_until(lambda: self._limit("/v1/chat/completions")["inflight"] == 1,
                                   5))
        t0 = time.monotonic()
        b = post(self.limit_port, "/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "b"}], "max_tokens": 2})
        waited = time.monotonic() - t0
        self.assertEqual(b.status, 503, b.body)
        self.assertEqual(b.headers.get("retry-after"), "1")
        self.assertIn("queue", b.json()["error"]["message"])
        self.assertGreater(waited, 0.4)
        self.assertLess(waited, 1.4)
        a.join(20)
        self.assertEqual(results["a"].status, 200)
        self.assertGreaterEqual(self._limit("/v1/chat/completions")["timed_out_total"], 1)

    def test_client_leaving_the_queue_frees_its_place(self):
        s1 = open_stream(self.limit_port, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        try:
            self.assertTrue(wait_until(lambda: self._limit("/v1/completions")["inflight"] == 1, 5))
            s2 = open_stream(self.limit_port, "/v1/completions", {"prompt": "y", "max_tokens": 2})
            self.assertTrue(wait_until(lambda: self._limit("/v1/completions")["queued"] == 1, 5))
            s2.close()
            self.assertTrue(wait_until(lambda: self._limit("/v1/completions")["queued"] == 0, 5))
        finally:
            s1.close()
        self.assertTrue(wait_until(lambda: self._limit("/v1/completions")["inflight"] == 0, 5))

    def _limit(self, location):
        for g in status(self.nginx.port)["limits"]:
            if g["group"] == location:
                return g
        raise KeyError(location)


class NginxOtherBalancerTest(unittest.TestCase):
    """An upstream block with its own balancer (least_conn, then keepalive): nginx's choice
    stands and the proxy still accounts every request to the server nginx chose."""

    def test_least_conn_block_is_served_and_accounted(self):
        sims = [Sim("--engine", "vllm"), Sim("--engine", "vllm")]
        n = Nginx("""
    omni_proxy_zone omni 1m;
    upstream lc {{
        least_conn;
        server 127.0.0.1:{a};
        server 127.0.0.1:{b};
        keepalive 4;
    }}
    server {{
        listen 127.0.0.1:PORT;
        location /v1/ {{ omni_proxy; omni_proxy_upstream lc; }}
        location = /omni/status {{ omni_proxy_status; }}
    }}
""".format(a=sims[0].port(), b=sims[1].port()))
        try:
            self.assertEqual(n.run().returncode, 0)
            self.assertTrue(wait_until(lambda: port_open(n.port), 10))
            for i in range(6):
                r = post(n.port, "/v1/completions", {"prompt": "lc %d" % i, "max_tokens": 2})
                self.assertEqual(r.status, 200, r.body)
            st = status(n.port)
            self.assertEqual(sum(b["requests_total"] for b in st["backends"]), 6)
            self.assertEqual(st["slots"]["used"], 0)
            self.assertEqual(n.errors(), [])
        finally:
            n.cleanup()
            for s in sims:
                s.stop()


class NginxRetryAndPollerTest(unittest.TestCase):
    """A prefill leg answered 500 after the request was sent is retried on the other server
    with the same body; the metrics poller moves to a new worker when the polling one drains
    after a reload."""

    def test_prefill_500_is_retried_with_the_full_body(self):
        bad = Sim("--engine", "vllm", "--role", "prefill", "--fault-error-rate", "1")
        good = Sim("--engine", "vllm", "--role", "prefill")
        dec = Sim("--engine", "vllm", "--role", "decode")
        n = Nginx("""
    omni_proxy_zone omni 1m;
    upstream p {{ server 127.0.0.1:{bad} max_fails=0; server 127.0.0.1:{good} max_fails=0;
                  keepalive 4; }}
    upstream d {{ server 127.0.0.1:{dec}; keepalive 4; }}
    server {{
        listen 127.0.0.1:PORT;
        location /v1/ {{ omni_proxy; omni_proxy_mode sequential;
                        omni_proxy_prefill_upstream p; omni_proxy_decode_upstream d; }}
        location = /omni/status {{ omni_proxy_status; }}
    }}
""".format(bad=bad.port(), good=good.port(), dec=dec.port()))
        try:
            self.assertEqual(n.run().returncode, 0)
            self.assertTrue(wait_until(lambda: port_open(n.port), 10))
            for i in range(6):
                r = post(n.port, "/v1/completions", {"prompt": "retry %d " % i * 30,
                                                      "max_tokens": 3})
                self.assertEqual(r.status, 200, r.body)
                self.assertEqual(r.json()["usage"]["completion_tokens"], 3)
            rows = {b["name"]: b for b in status(n.port)["backends"] if b["pool"] == "p"}
            bad_row = rows["127.0.0.1:%d" % bad.port()]
            good_row = rows["127.0.0.1:%d" % good.port()]
            self.assertGreaterEqual(bad_row["errors_total"], 1)
            self.assertGreaterEqual(bad_row["retries_total"], 1)
            self.assertEqual(good_row["errors_total"], 0)
            self.assertEqual(metric(metrics(good.port()), "vllm:request_success_total"), 6)
        finally:
            try:
                n.cleanup()  # fails on nginx alerts (a retry that sent a broken body did)
            finally:
                for s in (bad, good, dec):
                    s.stop()

    def test_poller_moves_to_a_new_worker_after_reload(self):
        eng = Sim("--engine", "vllm")
        hang = Sim("--engine", "vllm", "--fault-hang-rate", "1")
        n = Nginx("""
    omni_proxy_zone omni 1m;
    omni_proxy_poll_interval 200ms;
    upstream e {{ server 127.0.0.1:{eng}; }}
    upstream h {{ server 127.0.0.1:{hang}; }}
    server {{
        listen 127.0.0.1:PORT;
        omni_proxy_decode_timeout 60s;
        location /v1/ {{ omni_proxy; omni_proxy_upstream h; }}
        location /e/ {{ omni_proxy; omni_proxy_upstream e; }}
        location = /omni/status {{ omni_proxy_status; }}
    }}
""".format(eng=eng.port(), hang=hang.port()))
        socks = []
        try:
            self.assertEqual(n.run().returncode, 0)
            self.assertTrue(wait_until(lambda: port_open(n.port), 10))
            self.assertTrue(wait_until(lambda: status(n.port)["zone"]["poller_pid"] != 0, 5))
            old_workers = worker_pids(n)
            self.assertIn(status(n.port)["zone"]["poller_pid"], old_workers)
            # Requests that never end keep the old workers draining after the reload.
            for i in range(8):
                socks.append(open_stream(n.port, "/v1/completions", {"prompt": "h%d" % i}))
            self.assertTrue(wait_until(lambda: status(n.port)["slots"]["used"] == 8, 5))
            self.assertEqual(n.run("-s", "reload").returncode, 0)

            def new_poller():
                st = status(n.port)
                return st["zone"]["poller_pid"] not in old_workers and st["zone"]["generation"] == 1
            self.assertTrue(wait_until(new_poller, 8), status(n.port))

            def fresh():
                st = status(n.port)
                e = [b for b in st["backends"] if b["pool"] == "e"][0]["engine"]
                return e is not None and e["polled_ns"]
            first = fresh()
            self.assertTrue(wait_until(lambda: fresh() != first, 3))
        finally:
            for s in socks:
                s.close()
            try:
                n.cleanup()
            finally:
                eng.stop()
                hang.stop()


class NginxSlotsTest(unittest.TestCase):
    """A zone with few slots: running out gives 503 with Retry-After; a killed worker's slots
    come back."""

    def setUp(self):
        self.sim = Sim("--engine", "vllm", "--fault-hang-rate", "1")
        self.nginx = Nginx("""
    omni_proxy_zone small 32k;
    omni_proxy_poll_interval 0;
    upstream hang {{ server 127.0.0.1:{port}; }}
    server {{
        listen 127.0.0.1:PORT;
        omni_proxy_decode_timeout 60s;
        location /v1/ {{ omni_proxy; omni_proxy_upstream hang; }}
        location = /omni/status {{ omni_proxy_status; }}
    }}
""".format(port=self.sim.port()))
        r = self.nginx.run()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(wait_until(lambda: self._status() is not None, 10))
        self.socks = []

    def tearDown(self):
        for s in self.socks:
            s.close()
        try:
            self.nginx.cleanup(allow=("exited on signal 9",))
        finally:
            self.sim.stop()

    def _status(self):
        try:
            r = get(self.nginx.port, "/omni/status", timeout=2)
            return r.json() if r.status == 200 else None
        except OSError:
            return None

    def test_full_zone_answers_503_then_recovers(self):
        cap = self._status()["slots"]["capacity"]
        self.assertGreater(cap, 0)
        self.assertLess(cap, 200)
        for i in range(cap):
            self.socks.append(open_stream(self.nginx.port, "/v1/completions",
                                          {"prompt": "hold %d" % i, "max_tokens": 2}))
        self.assertTrue(wait_until(lambda: self._status()["slots"]["used"] == cap, 10))
        r = post(self.nginx.port, "/v1/completions", {"prompt": "one more", "max_tokens": 2})
        self.assertEqual(r.status, 503, r.body)
        self.assertEqual(r.headers.get("retry-after"), "1")
        self.assertIn("slots", r.json()["error"]["message"])
        self.assertGreaterEqual(self._status()["slots"]["acquire_failures_full"], 1)
        for s in self.socks:
            s.close()
        self.socks = []
        self.assertTrue(wait_until(lambda: self._status()["slots"]["used"] == 0, 10))
        self.assertEqual(self.nginx.errors(), [])

    def test_killed_worker_slots_are_reclaimed(self):
        for i in range(6):
            self.socks.append(open_stream(self.nginx.port, "/v1/completions",
                                          {"prompt": "doomed %d" % i, "max_tokens": 2}))
        self.assertTrue(wait_until(lambda: self._status()["slots"]["used"] == 6, 10))
        holders = [w["pid"] for w in self._status()["workers"] if w["slots"] > 0]
        self.assertTrue(holders)
        for pid in holders:
            os.kill(pid, signal.SIGKILL)
        # The master starts replacements; they (and the survivors' timers) reclaim the slots.
        self.assertTrue(wait_until(lambda: (self._status() or {}).get("slots", {}).get("used")
                                   == 0, 10), self._status())
        st = self._status()
        self.assertGreaterEqual(st["slots"]["reclaimed_total"], 6)
        self.assertTrue(all(w["pid"] not in holders for w in st["workers"]), st["workers"])
        self.assertEqual(sum(st["stages"].values()), 0)
        # Still serving, with a slot to spare for a new request.
        s = open_stream(self.nginx.port, "/v1/completions", {"prompt": "after", "max_tokens": 2})
        self.socks.append(s)
        self.assertTrue(wait_until(lambda: self._status()["slots"]["used"] == 1, 10))
        # Only the kills themselves may be reported.
        unexpected = [l for l in self.nginx.errors() if "exited on signal 9" not in l]
        self.assertEqual(unexpected, [])


if __name__ == "__main__":
    unittest.main()
