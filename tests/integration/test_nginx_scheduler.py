"""The prefill and decode schedulers (omni_proxy_scheduler, omni_proxy_schedule) through Debian's
nginx with the module (2 workers) in front of omni-sim P/D instances:
- requests go through the shared queue and run on the servers it chose (route headers, status);
- the scheduling worker is killed with SIGKILL under load: another worker takes over within
  200 ms (pidfd), queued requests of the surviving worker are not lost, and the dead worker's
  slots and entries are reclaimed;
- overload: a full queue answers 429, a wait that cannot meet the bound answers 503, both at once
  with Retry-After and an OpenAI-style body;
- priority: a more urgent request (header or body field) overtakes queued ones;
- a waiting request's cache predictions are refreshed: it follows a prefix released meanwhile;
- a server nginx counts failed (max_fails within fail_timeout) gets no requests from it;
- a reload while requests are queued loses none of them;
- decode max_num_seqs (omni_proxy_capacity) makes requests wait for a decode slot;
- parallel (SGLang) P/D chooses prefill and decode together within omni_proxy_pd_group;
- configuration mistakes fail `nginx -t` naming the directive."""
import json
import os
import signal
import threading
import time
import unittest

from simlib import Sim, free_port, get, post, wait_bootstrap_ports, wait_until
from test_nginx_module import Nginx, assert_config_fails

SLOW = ("--profile", "fast", "--max-num-batched-tokens", "512", "--time-scale", "20")


def ids(seed, n):
    return [1000 + (seed * 7919 + 13 * i) % 60000 for i in range(n)]


def body(seed, n=400, max_tokens=3, **extra):
    b = {"model": "omni-sim", "prompt": ids(seed, n), "max_tokens": max_tokens, "stream": False}
    b.update(extra)
    return b


def header(headers, name):
    """A header of a response's (lower-cased) header dict."""
    return headers.get(name.lower())


def status(port):
    try:
        r = get(port, "/omni/status", timeout=5)
    except OSError:
        return None
    return r.json() if r.status == 200 else None


def sched(port):
    return (status(port) or {}).get("scheduler") or {}


def conf(listen, prefill, decode, scheduler="omni_proxy_scheduler;", extra="", mode="sequential",
         location_extra=""):
    ps = "".join("server 127.0.0.1:%d; " % p for p in prefill)
    ds = "".join("server 127.0.0.1:%d; " % p for p in decode)
    return """
    omni_proxy_zone omni 32m;
    omni_proxy_poll_interval 200ms;
    {scheduler}
    upstream prefill {{ {ps} }}
    upstream decode {{ {ds} }}
    {extra}
    server {{
        listen 127.0.0.1:{listen};
        omni_proxy_route_header on;
        location /v1/ {{
            omni_proxy; omni_proxy_mode {mode};
            omni_proxy_prefill_upstream prefill; omni_proxy_decode_upstream decode;
            omni_proxy_schedule on;
            {location_extra}
        }}
        location /omni/status {{ omni_proxy_status; }}
        location /omni/metrics {{ omni_proxy_metrics; }}
    }}
""".format(scheduler=scheduler, ps=ps, ds=ds, extra=extra, listen=listen, mode=mode,
           location_extra=location_extra)


class Cluster:
    """omni-sim prefill and decode processes and one nginx."""

    def __init__(self, test, prefill=2, decode=2, sim_args=SLOW, engine="vllm", **kw):
        self.p = Sim("--engine", engine, "--role", "prefill", "--instances", str(prefill), *sim_args)
        self.d = Sim("--engine", engine, "--role", "decode", "--instances", str(decode), *sim_args)
        self.listen = free_port()
        self.prefill_ports = [self.p.port(i) for i in range(prefill)]
        self.decode_ports = [self.d.port(i) for i in range(decode)]
        self.nginx = Nginx(conf(self.listen, self.prefill_ports, self.decode_ports, **kw),
                           port=self.listen)
        r = self.nginx.run()
        if r.returncode != 0:
            self.stop()
            test.fail(r.stderr)
        ok = wait_until(lambda: sched(self.listen).get("leader_pid", 0) != 0, 10)
        if not ok:
            self.stop()
            test.fail("no worker runs the scheduler")

    def stop(self, allow=()):
        try:
            self.nginx.cleanup(allow=allow)
        finally:
            self.p.stop()
            self.d.stop()


def run_load(port, bodies, results, headers=None, timeout=60, stagger=0.0):
    """One thread per request; results[i] = (status, headers, body, t_done) or an exception."""
    threads = []

    def one(i, b):
        try:
            r = post(port, "/v1/completions", b, headers=headers or {}, timeout=timeout)
            results[i] = (r.status, r.headers, r.body, time.monotonic())
        except Exception as e:  # noqa: BLE001 (connection reset by a killed worker)
            results[i] = e

    for i, b in enumerate(bodies):
        t = threading.Thread(target=one, args=(i, b))
        t.start()
        threads.append(t)
        if stagger:
            time.sleep(stagger)
    return threads


class SchedulerBasicsTest(unittest.TestCase):
    def test_requests_run_where_the_scheduler_says(self):
        c = Cluster(self)
        try:
            results = [None] * 12
            for t in run_load(c.listen, [body(i, n=300) for i in range(12)], results):
                t.join(60)
            for r in results:
                self.assertIsInstance(r, tuple, r)
                self.assertEqual(r[0], 200, r[2])
            peers = {header(r[1], "X-Omni-Prefill-Peer") for r in results}
            self.assertTrue(peers <= {"127.0.0.1:%d" % p for p in c.prefill_ports}, peers)
            st = sched(c.listen)
            self.assertEqual(st["counters"]["enqueued"], 12)
            self.assertEqual(st["counters"]["released"], 12)
            self.assertEqual(st["counters"]["decode_released"], 12)
            self.assertTrue(wait_until(lambda: sched(c.listen)["entries"] == 0, 5), sched(c.listen))
            self.assertGreater(st["decision_latency"]["count"], 0)
            self.assertGreater(st["lock"]["acquired"], 0)
            self.assertIn("hold", st["lock"])
            # The learned step cycle of the prefill servers.
            servers = st["pools"][0]["servers"]
            self.assertGreater(sum(s["boundaries"] for s in servers), 0)
            m = get(c.listen, "/omni/metrics").body.decode()
            for name in ("omni_proxy_sched_queued", "omni_proxy_sched_events_total",
                         "omni_proxy_sched_lock_hold_seconds_bucket",
                         "omni_proxy_sched_decision_latency_seconds_count",
                         "omni_proxy_sched_cycle_ms"):
                self.assertIn(name, m)
        finally:
            c.stop()

    def test_route_headers_and_decode_scheduling(self):
        c = Cluster(self)
        try:
            r = post(c.listen, "/v1/completions", body(1, n=200))
            self.assertEqual(r.status, 200, r.body)
            route = dict(kv.strip().split("=", 1) for kv in
                         (header(r.headers, "X-Omni-Prefill-Route") or "").split(";") if "=" in kv)
            self.assertIn(route.get("reason"), ("cold", "cold_overflow", "warm"))
            self.assertIn("expected_ttft_ms", route)
            self.assertIsNotNone(header(r.headers, "X-Omni-Decode-Peer"))
        finally:
            c.stop()


class SchedulerCommonPrefixTest(unittest.TestCase):
    def test_shared_first_blocks_stay_balanced(self):
        """Every request starts with the same 256 tokens (a system prompt). A greedy
        longest-prefix rule sends them all to the first server that cached it; here, once that
        server's queue costs more than the prefix saves, the others take requests, cache the
        prefix too, and from then on it decides nothing."""
        c = Cluster(self, prefill=2, decode=1)
        try:
            head = ids(424242, 256)
            results = [None] * 24
            bodies = [body(0, n=64) for _ in range(24)]
            for i, b in enumerate(bodies):
                b["prompt"] = head + ids(1000 + i, 300)
            for t in run_load(c.listen, bodies, results, stagger=0.02):
                t.join(60)
            peers = [header(r[1], "X-Omni-Prefill-Peer") for r in results]
            for r in results:
                self.assertEqual(r[0], 200, r)
            counts = {p: peers.count(p) for p in set(peers)}
            self.assertEqual(len(counts), 2, counts)
            self.assertGreaterEqual(min(counts.values()), 6, counts)
        finally:
            c.stop()


class SchedulerCacheRefreshTest(unittest.TestCase):
    def test_waiting_requests_see_prefixes_released_meanwhile(self):
        """One prefill server, busy with a 6000-token prompt. A (3000 tokens) and then B
        (sharing A's first 2816) queue behind it, predicted to hit nothing. A is released first;
        while B waits behind it, B's owner predicts again and the scheduler takes the new values:
        B is placed with A's prefix predicted cached (its route shows 2816, not the 0 of its
        arrival), and the engine reuses it."""
        c = Cluster(self, prefill=1, decode=1,
                    extra="omni_proxy_capacity prefill batch_tokens=512;")
        try:
            head = ids(777, 2816)
            bodies = [body(1, n=6000), body(3), body(4)]
            bodies[1]["prompt"] = head + ids(11, 184)
            bodies[2]["prompt"] = head + ids(12, 184)
            first, then = [None], [None] * 2
            busy = run_load(c.listen, bodies[:1], first)
            self.assertTrue(wait_until(lambda: sched(c.listen).get("counters", {})
                                       .get("released", 0) >= 1, 10))
            threads = busy + run_load(c.listen, bodies[1:], then, stagger=0.02)
            # One snapshot with B enqueued and A not yet released proves B arrived predicting
            # nothing (the 6000-token prompt takes about a second here, so it nearly always does).
            seen = {}

            def both_queued():
                counters = sched(c.listen).get("counters", {})
                if counters.get("enqueued", 0) >= 3:
                    seen.update(counters)
                    return True
                return False

            self.assertTrue(wait_until(both_queued, 10, interval=0.005))
            for t in threads:
                t.join(90)
            for r in first + then:
                self.assertIsInstance(r, tuple, r)
                self.assertEqual(r[0], 200, r[2])
            route = dict(kv.strip().split("=", 1) for kv in
                         (header(then[1][1], "X-Omni-Prefill-Route") or "").split(";") if "=" in kv)
            # B was placed with A's prefix predicted cached (at arrival or refreshed since).
            self.assertEqual(int(route["cached"]), 2816, route)
            st = sched(c.listen)
            self.assertEqual(st["counters"]["enqueued"], 3)
            if seen["released"] == 1:  # B came before A's release: only the refresh knew
                self.assertGreaterEqual(st["counters"]["cache_updates"], 1, st["counters"])
        finally:
            c.stop()


class SchedulerFailedPeerTest(unittest.TestCase):
    def test_a_server_nginx_counts_failed_gets_no_requests(self):
        """A decode engine goes away and comes back at once (as after a reset keepalive
        connection): nginx counts it failed for fail_timeout (10 s) and will not connect to it,
        while the poller already sees it healthy. The scheduler must not place decodes there:
        a forced choice nginx refuses ends in "no live upstreams" (502)."""
        pre = Sim("--engine", "vllm", "--role", "prefill", "--instances", "1")
        dec = [Sim("--engine", "vllm", "--role", "decode", "--instances", "1") for _ in range(2)]
        nginx = None
        try:
            ports = [d.port() for d in dec]
            listen = free_port()
            # With zones, nginx's failure accounting is shared by the workers (as in production).
            # Polls every 5 s: the poller would take 15 s to call the engine down, so only nginx
            # knows of the failure.
            text = conf(listen, [pre.port()], ports).replace(
                "omni_proxy_poll_interval 200ms;", "omni_proxy_poll_interval 5s;").replace(
                "upstream prefill {", "upstream prefill { zone prefill 64k;").replace(
                "upstream decode {", "upstream decode { zone decode 64k;")
            nginx = Nginx(text, port=listen)
            r = nginx.run()
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertTrue(wait_until(lambda: sched(listen).get("leader_pid", 0) != 0, 10))
            # Both decode engines polled once (a server never polled successfully counts as
            # down once a poll failed).
            polled = lambda: get(listen, "/omni/metrics").body.decode().count(  # noqa: E731
                'omni_proxy_backend_metrics_polled_seconds{pool="decode"')
            self.assertTrue(wait_until(lambda: polled() == 2, 10))
            dec[0].stop()
            failed = "127.0.0.1:%d" % ports[0]
            # Until a decode leg meets the stopped engine (nginx retries it on the other one).
            for i in range(40):
                res = post(listen, "/v1/completions", body(100 + i, n=64), timeout=30)
                self.assertEqual(res.status, 200, res.body)
                with open(nginx.error_log) as f:
                    if any("connect() failed" in l and failed in l for l in f):
                        break
            else:
                with open(nginx.error_log) as f:
                    tail = [l for l in f if "[error]" in l or "[warn]" in l or "omni" in l][-8:]
                self.fail("no decode leg went to the stopped engine: %s %s" % (
                    [header(res.headers, "X-Omni-Decode-Peer")], "".join(tail)))
            dec[0] = Sim("--engine", "vllm", "--role", "decode", "--instances", "1",
                         "--port", str(ports[0]))
            # nginx still counts it failed (fail_timeout 10 s).
            codes, peers = [], []
            for i in range(12):
                res = post(listen, "/v1/completions", body(200 + i, n=64), timeout=30)
                codes.append(res.status)
                peers.append(header(res.headers, "X-Omni-Decode-Peer"))
            self.assertEqual(codes, [200] * 12, peers)
            with open(nginx.error_log) as f:
                log = [l for l in f if "[error]" in l or "[warn]" in l]
            self.assertNotIn(failed, peers, "".join(log[-6:]))
        finally:
            if nginx is not None:
                nginx.cleanup(allow=("connect() failed", "upstream server temporarily disabled"))
            pre.stop()
            for d in dec:
                d.stop()


class SchedulerOverloadTest(unittest.TestCase):
    def test_full_queue_gives_429_with_retry_after(self):
        c = Cluster(self, prefill=1, decode=1,
                    scheduler="omni_proxy_scheduler max_queue=3;",
                    extra="omni_proxy_capacity prefill batch_tokens=512;")
        try:
            results = [None] * 14
            for t in run_load(c.listen, [body(i, n=1500) for i in range(14)], results):
                t.join(90)
            codes = [r[0] for r in results if isinstance(r, tuple)]
            self.assertEqual(len(codes), 14, results)
            self.assertIn(429, codes)
            self.assertIn(200, codes)
            for r in results:
                if r[0] == 429:
                    self.assertGreaterEqual(int(header(r[1], "Retry-After")), 1)
                    err = json.loads(r[2])["error"]
                    self.assertEqual(err["code"], 429)
                    self.assertIn("queue is full", err["message"])
            self.assertGreater(sched(c.listen)["counters"]["refused_queue_full"], 0)
        finally:
            c.stop()

    def test_unmeetable_wait_gives_503_at_once(self):
        c = Cluster(self, prefill=1, decode=1,
                    scheduler="omni_proxy_scheduler max_wait=400ms per_ktoken=400ms;",
                    extra="omni_proxy_capacity prefill batch_tokens=512;")
        try:
            results = [None] * 12
            start = time.monotonic()
            for t in run_load(c.listen, [body(i, n=1500) for i in range(12)], results):
                t.join(90)
            refused = [r for r in results if isinstance(r, tuple) and r[0] == 503]
            self.assertTrue(refused, [r[0] if isinstance(r, tuple) else r for r in results])
            for r in refused:
                self.assertIsNotNone(header(r[1], "Retry-After"))
                err = json.loads(r[2])["error"]
                self.assertEqual(err["code"], 503)
                self.assertIn("expects a wait", err["message"])
                # Refused at once, not after waiting the bound.
                self.assertLess(r[3] - start, 0.4 + 1.0)
            self.assertGreater(sched(c.listen)["counters"]["refused_deadline"], 0)
        finally:
            c.stop()


class SchedulerPriorityTest(unittest.TestCase):
    def test_urgent_request_overtakes_queued_ones(self):
        c = Cluster(self, prefill=1, decode=1,
                    extra="omni_proxy_capacity prefill batch_tokens=512;")
        try:
            low = [None] * 6
            threads = run_load(c.listen, [body(i, n=1500, priority=10) for i in range(6)], low)
            self.assertTrue(wait_until(lambda: sched(c.listen).get("queued", 0) >= 4, 10))
            high = [None]
            threads += run_load(c.listen, [body(99, n=1500)], high,
                                headers={"X-Omni-Priority": "-5"})
            for t in threads:
                t.join(120)
            self.assertEqual(high[0][0], 200, high[0])
            done_before = sum(1 for r in low if r[3] < high[0][3])
            # At most the one running and the one already in the next batch finish first.
            self.assertLessEqual(done_before, 2, [r[3] for r in low] + [high[0][3]])
        finally:
            c.stop()


class SchedulerFailoverTest(unittest.TestCase):
    def test_kill_9_of_the_scheduling_worker_under_load(self):
        c = Cluster(self, prefill=2, decode=2,
                    extra="omni_proxy_capacity prefill batch_tokens=512;")
        try:
            before = sched(c.listen)
            leader = before["leader_pid"]
            results = [None] * 24
            threads = run_load(c.listen, [body(i, n=1200) for i in range(24)], results,
                               stagger=0.01)
            self.assertTrue(wait_until(lambda: sched(c.listen).get("queued", 0) >= 4, 10),
                            sched(c.listen))
            killed_at = time.monotonic_ns()
            os.kill(leader, signal.SIGKILL)
            took = wait_until(lambda: sched(c.listen).get("leader_pid") not in (0, leader), 5,
                              interval=0.005)
            self.assertTrue(took, sched(c.listen))
            after = sched(c.listen)
            takeover_ms = (after["leader_since_ns"] - killed_at) / 1e6
            self.assertLess(takeover_ms, 200, after)
            # More load after the takeover: all of it succeeds.
            later = [None] * 6
            threads += run_load(c.listen, [body(100 + i, n=600) for i in range(6)], later)
            for t in threads:
                t.join(120)
            self.assertTrue(all(not t.is_alive() for t in threads), "a request hung")
            for r in later:
                self.assertEqual(r[0], 200, r)
            ok = [r for r in results if isinstance(r, tuple)]
            lost = [r for r in results if not isinstance(r, tuple)]
            # Only requests on the killed worker's own connections may be lost; every answer
            # that came is a success (none was left queued to time out).
            for r in ok:
                self.assertEqual(r[0], 200, r[2])
            self.assertLess(len(lost), len(results))
            # The dead worker's slots and entries are reclaimed.
            self.assertTrue(wait_until(lambda: (status(c.listen) or {}).get("slots", {})
                                       .get("used", 1) == 0 and
                                       sched(c.listen).get("entries", 1) == 0, 10),
                            status(c.listen))
        finally:
            c.stop(allow=("exited on signal 9",))


class SchedulerReloadTest(unittest.TestCase):
    def test_reload_while_requests_are_queued(self):
        c = Cluster(self, prefill=1, decode=1,
                    extra="omni_proxy_capacity prefill batch_tokens=512;")
        try:
            first = sched(c.listen)["leader_pid"]
            results = [None] * 10
            threads = run_load(c.listen, [body(i, n=1200) for i in range(10)], results)
            self.assertTrue(wait_until(lambda: sched(c.listen).get("queued", 0) >= 4, 10))
            r = c.nginx.run("-s", "reload")
            self.assertEqual(r.returncode, 0, r.stderr)
            for t in threads:
                t.join(120)
            for r in results:
                self.assertIsInstance(r, tuple, r)
                self.assertEqual(r[0], 200, r[2])
            self.assertTrue(wait_until(lambda: sched(c.listen).get("leader_pid") not in (0, first),
                                       10), sched(c.listen))
        finally:
            c.stop()


class SchedulerDecodeTest(unittest.TestCase):
    def test_decode_max_seqs_makes_requests_wait(self):
        c = Cluster(self, prefill=2, decode=1,
                    sim_args=("--profile", "fast", "--time-scale", "5"),
                    extra="omni_proxy_capacity decode max_seqs=1;")
        try:
            results = [None] * 5
            for t in run_load(c.listen, [body(i, n=200, max_tokens=20) for i in range(5)],
                              results):
                t.join(60)
            for r in results:
                self.assertEqual(r[0], 200, r)
            st = sched(c.listen)
            self.assertEqual(st["counters"]["decode_released"], 5)
            self.assertGreater(st["decode_wait"]["count"], 0)
            self.assertGreater(st["decode_wait"]["max_us"], 1000)  # someone waited for the slot
        finally:
            c.stop()

    def test_parallel_pairs_within_groups(self):
        p = Sim("--engine", "sglang", "--role", "prefill", "--instances", "2", "--profile", "fast")
        d = Sim("--engine", "sglang", "--role", "decode", "--instances", "2", "--profile", "fast")
        listen = free_port()
        pp = [p.port(0), p.port(1)]
        dd = [d.port(0), d.port(1)]
        groups = ("omni_proxy_pd_group prefill decode prefill=127.0.0.1:%d decode=127.0.0.1:%d;"
                  " omni_proxy_pd_group prefill decode prefill=127.0.0.1:%d decode=127.0.0.1:%d;"
                  % (pp[0], dd[1], pp[1], dd[0]))
        n = Nginx(conf(listen, pp, dd, extra=groups, mode="parallel",
                       location_extra="omni_proxy_engine sglang;"), port=listen)
        try:
            r = n.run()
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertTrue(wait_until(lambda: sched(listen).get("leader_pid", 0) != 0, 10))
            # Both prefill instances run on one host with different bootstrap ports.
            wait_bootstrap_ports(listen, "prefill", p)
            pairs = set()
            for i in range(12):
                resp = post(listen, "/v1/completions", body(i, n=100))
                self.assertEqual(resp.status, 200, resp.body)
                pairs.add((header(resp.headers, "X-Omni-Prefill-Peer"),
                          header(resp.headers, "X-Omni-Decode-Peer")))
            allowed = {("127.0.0.1:%d" % pp[0], "127.0.0.1:%d" % dd[1]),
                       ("127.0.0.1:%d" % pp[1], "127.0.0.1:%d" % dd[0])}
            self.assertTrue(pairs <= allowed, pairs)
        finally:
            n.cleanup()
            p.stop()
            d.stop()


class SchedulerConfigTest(unittest.TestCase):
    def check(self, text, *needles):
        assert_config_fails(self, text, *needles)

    def test_mistakes_fail_nginx_t_naming_the_directive(self):
        base = conf(8000, [9001], [9002])
        self.check(base.replace("omni_proxy_scheduler;", ""),
                   '"omni_proxy_schedule"', '"omni_proxy_scheduler"')
        self.check(base.replace("omni_proxy_scheduler;", "omni_proxy_scheduler queue=5;"),
                   '"omni_proxy_scheduler": invalid parameter "queue=5"')
        self.check(base.replace("omni_proxy_scheduler;",
                                "omni_proxy_scheduler release=sometimes;"),
                   'invalid parameter "release=sometimes"')
        self.check(base.replace("omni_proxy_scheduler;", "omni_proxy_scheduler miss_weight=11;"),
                   '"omni_proxy_scheduler": invalid parameter "miss_weight=11"', "miss_weight=X")
        self.check(base.replace("omni_proxy_scheduler;", "omni_proxy_scheduler miss_wait=maybe;"),
                   '"omni_proxy_scheduler": invalid parameter "miss_wait=maybe"', "miss_wait=on|off")
        self.check(base.replace("omni_proxy_zone omni 32m;", ""),
                   '"omni_proxy_scheduler" needs "omni_proxy_zone"')
        self.check(base.replace("omni_proxy_scheduler;",
                                "omni_proxy_scheduler; omni_proxy_capacity nosuch max_seqs=4;"),
                   '"omni_proxy_capacity"', 'upstream "nosuch"')
        self.check(base.replace("omni_proxy_scheduler;",
                                "omni_proxy_scheduler; omni_proxy_capacity decode max_seqs=0;"),
                   '"omni_proxy_capacity": invalid parameter "max_seqs=0"')
        self.check(base.replace("omni_proxy_scheduler;",
                                "omni_proxy_scheduler; omni_proxy_pd_group prefill decode "
                                "prefill=127.0.0.1:9001 decode=127.0.0.1:1;"),
                   '"omni_proxy_pd_group"', 'no server "127.0.0.1:1"')

    def test_valid_configuration_passes(self):
        n = Nginx(conf(8000, [9001, 9003], [9002], scheduler=(
            "omni_proxy_scheduler queue=1024 max_queue=512 max_wait=20s wait_weight=2 "
            "length_weight=50ms release=boundary lead=3ms merge=2ms step=30ms per_ktoken=31ms "
            "batch_tokens=131072 tpot_slo=100ms itl=25ms tie=0.1 epsilon=0.3 miss_weight=2 "
            "miss_wait=off priority_header=X-Priority;"),
            extra="omni_proxy_capacity prefill batch_tokens=65536; "
                  "omni_proxy_capacity decode max_seqs=256; "
                  "omni_proxy_pd_group prefill decode prefill=127.0.0.1:9001,127.0.0.1:9003 "
                  "decode=127.0.0.1:9002;"))
        try:
            r = n.run("-t")
            self.assertEqual(r.returncode, 0, r.stderr)
        finally:
            n.cleanup()


if __name__ == "__main__":
    unittest.main()
