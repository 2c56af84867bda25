"""KV-cache-aware routing (omni_proxy_policy kv_aware, omni_proxy_kv_cache) through Debian's
nginx with the module (2 workers) in front of omni-sim instances that publish vLLM KV events:
- the subscriber fills one index per server from the engines' events, and a prompt that shares
  a cached prefix goes where it is cached, with the predicted cached tokens equal to the
  engine's usage report (the accuracy metric);
- cold prefixes spread over the bounded-load ring; a trace whose requests all share their first
  blocks stays balanced (the common-prefix trap);
- the P/D decode choice sees the decode instances' own caches;
- an engine restart (sequence numbers back to 0) drops that server's index; malformed event
  messages are counted and skipped; a restarted nginx rebuilds its view from the replay
  sockets; two nginx instances with separate zones agree on the routes of the same requests;
- a prompt still prefilling counts as cached on its server (pending), so a request sharing its
  prefix follows it before any event shows it; a killed worker's pending prompts are dropped;
  pending=off turns that off;
- approximate mode predicts from routing alone; config mistakes fail `nginx -t` naming the
  directive."""
import collections
import json
import os
import signal
import struct
import threading
import time
import unittest

import msgpack
import zmq

from simlib import Sim, free_port, get, post, wait_until
from test_nginx_module import Nginx, assert_config_fails
from test_nginx_state import worker_pids

N = 4  # servers


def ids(seed, n=256, shared=0, shared_seed=0):
    """A token-id prompt whose first `shared` ids come from `shared_seed`."""
    head = [1000 + (shared_seed * 977 + 7 * i) % 50000 for i in range(shared)]
    tail = [1000 + (seed * 131 + 17 * i) % 90000 for i in range(n - shared)]
    return head + tail


def complete(port, prompt, **kw):
    return post(port, "/v1/completions",
                {"model": "omni-sim", "prompt": prompt, "max_tokens": 2, "stream": False}, **kw)


def peer(r):
    return r.headers.get("X-Omni-Prefill-Peer") or r.headers.get("x-omni-prefill-peer")


def header(r, name):
    for k, v in r.headers.items():
        if k.lower() == name.lower():
            return v
    return None


def route(r, which="Prefill"):
    text = header(r, "X-Omni-%s-Route" % which) or ""
    out = {}
    for part in text.split(";"):
        if "=" in part:
            k, v = part.strip().split("=", 1)
            out[k] = v
    return out


def status(port):
    r = get(port, "/omni/status")
    return r.json() if r.status == 200 else None


def kv_servers(port, pool=None):
    st = status(port) or {}
    out = {}
    for p in (st.get("kv") or {}).get("pools", []):
        if pool is None or p["name"] == pool:
            for s in p["servers"]:
                out[s["name"]] = s
    return out


def start_sims(http, events, replay, count=N, extra=()):
    return Sim("--engine", "vllm", "--role", "both", "--instances", str(count),
               "--time-scale", "0.01", "--port", str(http), "--kv-events-port", str(events),
               "--kv-replay-port", str(replay), *extra)


def kv_conf(http, count, listen_port, policy="kv_aware", extra="", replay=True):
    servers = "".join("server 127.0.0.1:%d; " % (http + i) for i in range(count))
    return """
    omni_proxy_zone omni 64m;
    omni_proxy_kv_index_blocks 8192;
    omni_proxy_poll_interval 200ms;
    upstream engines {{ {servers} }}
    omni_proxy_kv_cache engines events pub_port_offset={pub} {rep};
    {extra}
    server {{
        listen 127.0.0.1:{listen};
        omni_proxy_route_header on;
        location /v1/ {{ omni_proxy; omni_proxy_upstream engines; omni_proxy_policy {policy}; }}
        location /omni/status {{ omni_proxy_status; }}
        location /omni/metrics {{ omni_proxy_metrics; }}
    }}
""".format(servers=servers, pub=100, rep="replay_port_offset=200" if replay else "",
           listen=listen_port, policy=policy, extra=extra)


class KvRoutingTest(unittest.TestCase):
    """One cluster of 4 aggregated vLLM sims with events, one nginx."""

    @classmethod
    def setUpClass(cls):
        base = free_port(300)
        cls.http = base
        cls.sim = start_sims(base, base + 100, base + 200)
        cls.listen = free_port()
        cls.nginx = Nginx(kv_conf(base, N, cls.listen), port=cls.listen)
        r = cls.nginx.run()
        if r.returncode != 0:
            cls.sim.stop()
            raise AssertionError(r.stderr)
        ok = wait_until(lambda: (status(cls.listen) or {}).get("kv", {}).get("subscriber", {})
                        .get("pid", 0) != 0, 10)
        if not ok:
            cls.tearDownClass()
            raise AssertionError("no worker runs the KV-event subscriber")

    @classmethod
    def tearDownClass(cls):
        try:
            cls.nginx.cleanup()
        finally:
            cls.sim.stop()

    def wait_blocks(self, name, at_least):
        ok = wait_until(lambda: kv_servers(self.listen).get(name, {}).get("blocks", 0) >= at_least,
                        10)
        self.assertTrue(ok, kv_servers(self.listen).get(name))

    def test_prefix_follows_cache_and_prediction_matches_engine(self):
        first = complete(self.listen, ids(11))
        self.assertEqual(first.status, 200, first.body)
        home = peer(first)
        self.assertTrue(home)
        self.wait_blocks(home, 15)  # 256 tokens: 15 full blocks of 16 before the last token
        second = complete(self.listen, ids(11)[:200] + ids(12)[:56])
        self.assertEqual(second.status, 200, second.body)
        self.assertEqual(peer(second), home)
        rt = route(second)
        self.assertEqual(rt.get("reason"), "warm", rt)
        cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        self.assertEqual(cached, 192)  # 12 full blocks shared
        self.assertEqual(int(rt["cached"]), cached)
        self.assertIn("runner_up", rt)
        self.assertEqual(int(rt["runner_up_cached"]), 0)
        st = status(self.listen)["kv"]
        pool = st["pools"][0]
        self.assertEqual(pool["mode"], "events")
        self.assertEqual(pool["block_size"], 16)
        self.assertIsNotNone(pool["last_decision"])
        s = kv_servers(self.listen)[home]
        self.assertGreaterEqual(s["prediction"]["requests"], 2)
        self.assertEqual(s["feed"]["malformed"], 0)
        self.assertGreaterEqual(s["feed"]["batches"], 1)
        self.assertEqual(s["bound"], 4096)  # the engine's num_gpu_blocks, from /metrics
        m = get(self.listen, "/omni/metrics").body.decode()
        self.assertIn("omni_proxy_kv_prediction_abs_error_tokens_total", m)
        self.assertIn('omni_proxy_kv_route_decisions_total{pool="engines",backend="%s",reason="warm"}'
                      % home, m)

    def test_cold_prefixes_spread_and_return_home(self):
        peers = collections.Counter()
        reasons = collections.Counter()
        first_peer = {}
        for seed in range(100, 140):
            r = complete(self.listen, ids(seed))
            self.assertEqual(r.status, 200, r.body)
            peers[peer(r)] += 1
            reasons[route(r).get("reason")] += 1
            first_peer[seed] = peer(r)
        self.assertGreaterEqual(reasons["cold"] + reasons["cold_overflow"], 35, reasons)
        self.assertEqual(len(peers), N, peers)
        self.assertTrue(all(c >= 3 for c in peers.values()), peers)
        # Once their blocks are known, the same prompts go back where they are cached.
        time.sleep(0.5)
        back = 0
        for seed in range(100, 110):
            r = complete(self.listen, ids(seed))
            back += peer(r) == first_peer[seed] and route(r).get("reason") == "warm"
        self.assertGreaterEqual(back, 9)

    def test_common_prefix_trap_stays_balanced(self):
        """Every request shares its first 64 tokens (4 blocks): a greedy longest-prefix rule
        sends them all to the first server that cached them."""
        peers = collections.Counter()
        errors = []
        lock = threading.Lock()
        seeds = iter(range(1000, 1160))

        def client():
            while True:
                with lock:
                    seed = next(seeds, None)
                if seed is None:
                    return
                r = complete(self.listen, ids(seed, shared=64, shared_seed=5))
                with lock:
                    if r.status != 200:
                        errors.append(r.body)
                    peers[peer(r)] += 1

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual(errors, [])
        mean = 160 / N
        self.assertEqual(len(peers), N, peers)
        for name, count in peers.items():
            self.assertGreaterEqual(count, 0.5 * mean, peers)
            self.assertLessEqual(count, 1.5 * mean, peers)


class KvFaultsTest(unittest.TestCase):
    """Engines as separate processes (restartable), a fake engine for malformed events, nginx
    restarts and two proxies."""

    def setUp(self):
        self.base = free_port(300)
        self.sims = [start_sims(self.base + i, self.base + 100 + i, self.base + 200 + i, count=1)
                     for i in range(2)]
        self.nginxes = []

    def tearDown(self):
        for n in self.nginxes:
            n.cleanup()
        for s in self.sims:
            s.stop()

    def start_nginx(self, extra="", policy="kv_aware"):
        listen = free_port()
        n = Nginx(kv_conf(self.base, 2, listen, policy=policy, extra=extra), port=listen)
        r = n.run()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.nginxes.append(n)
        self.assertTrue(wait_until(lambda: (status(listen) or {}).get("kv", {})
                                   .get("subscriber", {}).get("pid", 0) != 0, 10))
        return listen

    def name(self, i):
        return "127.0.0.1:%d" % (self.base + i)

    def test_engine_restart_drops_its_index(self):
        listen = self.start_nginx()
        # Cold prefixes go to their homes on the ring (which depends on the ports): 12 of them
        # leave engine 0 without any with probability 2^-12.
        for seed in range(12):
            self.assertEqual(complete(listen, ids(seed)).status, 200)
        self.assertTrue(wait_until(lambda: sum(s["blocks"] for s in kv_servers(listen).values())
                                   >= 12 * 15, 10), kv_servers(listen))
        before = kv_servers(listen)[self.name(0)]
        self.assertGreater(before["blocks"], 0)
        # Restart engine 0 on the same ports: its sequence numbers start again at 0. A real
        # engine takes minutes to come back; wait until the subscriber reconnected, as it has
        # by then, so the new run's events are not lost to the PUB socket's slow joiner.
        connects = before["feed"]["connects"]
        self.sims[0].stop()
        self.sims[0] = start_sims(self.base, self.base + 100, self.base + 200, count=1)
        self.assertTrue(wait_until(lambda: kv_servers(listen)[self.name(0)]["feed"]["connects"]
                                   > connects, 10), kv_servers(listen)[self.name(0)])
        time.sleep(0.3)
        for seed in range(50, 60):
            complete(listen, ids(seed))
        ok = wait_until(lambda: kv_servers(listen)[self.name(0)]["feed"]["restarts"] >= 1, 10)
        s = kv_servers(listen)[self.name(0)]
        self.assertTrue(ok, s)
        self.assertGreaterEqual(s["clears"], 1)
        # What it holds now is only the new engine's: requests since the restart.
        self.assertLess(s["blocks"], before["blocks"] + 10 * 15)
        r = complete(listen, ids(1))
        self.assertEqual(r.status, 200)

    def test_malformed_events_are_counted_and_skipped(self):
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        fake_http = self.base + 2  # a third server whose events come from this test
        pub.bind("tcp://127.0.0.1:%d" % (fake_http + 100))
        extra_sim = start_sims(fake_http, self.base + 290, self.base + 291, count=1)
        self.sims.append(extra_sim)
        try:
            listen = free_port()
            body = kv_conf(self.base, 3, listen, replay=False)
            n = Nginx(body, port=listen)
            r = n.run()
            self.assertEqual(r.returncode, 0, r.stderr)
            self.nginxes.append(n)
            name = self.name(2)
            seq = 0
            tokens = list(range(5000, 5016))
            good = msgpack.packb([time.time(), [["BlockStored", [0x1234], None, tokens, 16, None,
                                                  "GPU", None]], 0], use_bin_type=True)
            deadline = time.time() + 15
            seen = {}
            while time.time() < deadline:
                pub.send_multipart([b"", struct.pack(">q", seq), b"\xc1\xc1garbage"])
                pub.send_multipart([b"", b"\x00" * 7, good])      # a 7-byte sequence frame
                pub.send_multipart([b"", struct.pack(">q", seq + 1)])  # two frames
                pub.send_multipart([b"", struct.pack(">q", seq + 1), good])
                seq += 2
                time.sleep(0.1)
                seen = kv_servers(listen).get(name, {})
                if seen.get("feed", {}).get("malformed", 0) >= 3 and seen.get("blocks", 0) >= 1:
                    break
            self.assertGreaterEqual(seen["feed"]["malformed"], 3, seen)
            self.assertGreaterEqual(seen["blocks"], 1, seen)
            self.assertEqual(complete(listen, ids(3)).status, 200)
            self.assertEqual(n.errors(), [])
        finally:
            pub.close(0)
            ctx.term()

    def test_restarted_nginx_rebuilds_its_view_from_replay(self):
        listen = self.start_nginx()
        for seed in range(8):
            self.assertEqual(complete(listen, ids(seed)).status, 200)
        self.assertTrue(wait_until(lambda: sum(s["blocks"] for s in kv_servers(listen).values())
                                   >= 8 * 15, 10))
        # Settled: the engines published everything (two equal looks 0.5 s apart).
        before = None
        for _ in range(20):
            time.sleep(0.5)
            now = {k: v["blocks"] for k, v in kv_servers(listen).items()}
            if now == before:
                break
            before = now
        n = self.nginxes.pop()
        n.cleanup()
        t0 = time.time()
        listen = self.start_nginx()
        ok = wait_until(lambda: {k: v["blocks"] for k, v in kv_servers(listen).items()} == before,
                        10)
        elapsed = time.time() - t0
        servers = kv_servers(listen)
        self.assertTrue(ok, (before, servers))
        self.assertLess(elapsed, 5.0)
        for s in servers.values():
            self.assertGreater(s["feed"]["synced_after_ms"], 0)
            self.assertLess(s["feed"]["synced_after_ms"], 2000)

    def test_two_proxies_agree(self):
        a = self.start_nginx()
        b = self.start_nginx()
        agree = total = 0
        for i in range(40):
            tenant = i % 5
            prompt = ids(2000 + i, shared=128, shared_seed=tenant)
            out = [None, None]

            def send(k, port):
                out[k] = complete(port, prompt, headers={"X-Request-Id": "agree-%d" % i})

            ts = [threading.Thread(target=send, args=(k, p)) for k, p in ((0, a), (1, b))]
            for t in ts:
                t.start()
            for t in ts:
                t.join(30)
            self.assertEqual(out[0].status, 200)
            self.assertEqual(out[1].status, 200)
            total += 1
            agree += peer(out[0]) == peer(out[1])
            if peer(out[0]) != peer(out[1]):
                print("disagree", i, header(out[0], "X-Omni-Prefill-Route"), "|",
                      header(out[1], "X-Omni-Prefill-Route"))
            time.sleep(0.05)
        rate = agree / total
        print("two-proxy agreement: %d/%d = %.3f" % (agree, total, rate))
        self.assertGreaterEqual(rate, 0.9)

    def test_approximate_mode_predicts_from_routing(self):
        listen = free_port()
        servers = "".join("server 127.0.0.1:%d; " % (self.base + i) for i in range(2))
        body = """
    omni_proxy_zone omni 64m;
    omni_proxy_kv_index_blocks 4096;
    upstream guess {{ {servers} }}
    omni_proxy_kv_cache guess approximate block_size=16;
    server {{
        listen 127.0.0.1:{listen};
        omni_proxy_route_header on;
        location /v1/ {{ omni_proxy; omni_proxy_upstream guess; omni_proxy_policy kv_aware; }}
        location /omni/status {{ omni_proxy_status; }}
    }}
""".format(servers=servers, listen=listen)
        n = Nginx(body, port=listen)
        self.assertEqual(n.run().returncode, 0)
        self.nginxes.append(n)
        first = complete(listen, ids(77))
        second = complete(listen, ids(77)[:160] + ids(78)[:96])
        self.assertEqual(peer(first), peer(second))
        rt = route(second)
        self.assertEqual(rt["reason"], "warm")
        self.assertEqual(int(rt["cached"]), 160)
        self.assertEqual(second.json()["usage"]["prompt_tokens_details"]["cached_tokens"], 160)
        pools = status(listen)["kv"]["pools"]
        self.assertEqual(pools[0]["mode"], "approximate")


class KvPendingTest(unittest.TestCase):
    """Events lag the routing: while a long prompt still prefills, no event shows its blocks.
    A second request sharing its prefix must still see them (pending on the server prefilling
    them) and go there; with pending=off it sees nothing. Two slow engines (deepseek profile at
    time scale 1, 2048-token chunks, steps 4 times longer: the first chunk's events come after
    about 0.35 s, and a 12000-token prompt prefills for about 2 s)."""

    def setUp(self):
        self.base = free_port(300)
        self.sim = start_sims(self.base, self.base + 100, self.base + 200, count=2,
                              extra=("--profile", "deepseek-v3-h800", "--max-num-batched-tokens",
                                     "2048", "--time-scale", "1", "--fault-slowdown", "4"))
        self.nginxes = []

    def tearDown(self):
        for n in self.nginxes:
            n.cleanup()
        self.sim.stop()

    def start_nginx(self, pending):
        listen = free_port()
        conf = kv_conf(self.base, 2, listen).replace(
            "pub_port_offset=100", "pub_port_offset=100 pending=%s" % pending)
        n = Nginx(conf, port=listen)
        r = n.run()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.nginxes.append(n)
        self.assertTrue(wait_until(lambda: (status(listen) or {}).get("kv", {})
                                   .get("subscriber", {}).get("pid", 0) != 0, 10))
        # Keys are cut at the engines' block size, learned from their metrics: both prompts
        # must be keyed with the same one.
        self.assertTrue(wait_until(lambda: status(listen)["kv"]["pools"][0]["block_size"] == 64,
                                   10), status(listen)["kv"])
        return listen

    def overlap(self, listen, seed):
        """Sends a 12000-token prompt, then, while it prefills, one sharing its first 6400
        tokens (100 blocks of 64); checks both answered and the first ran where it showed
        prefilling; returns (second, that server, its status while the first prefilled)."""
        first_prompt = ids(seed, n=12000)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault(
            "first", complete(listen, first_prompt, timeout=30)))
        t.start()
        seen = {}

        def prefilling():
            for name, s in kv_servers(listen).items():
                if s["inflight_uncached_tokens"] > 0:
                    seen[name] = s
                    return True
            return False

        self.assertTrue(wait_until(prefilling, 5, interval=0.005), "the first never showed")
        second = complete(listen, first_prompt[:6400] + ids(seed + 1, n=2000), timeout=30)
        t.join(30)
        first = out["first"]
        self.assertEqual(first.status, 200, first.body)
        self.assertEqual(second.status, 200, second.body)
        (home, during), = seen.items()
        self.assertEqual(peer(first), home)
        return second, home, during

    def test_prompts_still_prefilling_count_as_cached_where_they_prefill(self):
        listen = self.start_nginx("on")
        second, home, during = self.overlap(listen, 501)
        # While it prefilled: its blocks pending there (187 of 64 tokens).
        self.assertGreater(during["pending"]["blocks"], 0, during)
        self.assertEqual(during["pending"]["bound"], 4096)  # half of omni_proxy_kv_index_blocks
        rt = route(second)
        self.assertEqual(peer(second), home, (rt, during))
        self.assertEqual(rt["reason"], "warm", rt)
        self.assertEqual(int(rt["cached"]), 6400)
        self.assertEqual(int(rt["runner_up_cached"]), 0)
        # The engine agrees: it scheduled the second behind the first and reused the prefix.
        self.assertEqual(second.json()["usage"]["prompt_tokens_details"]["cached_tokens"], 6400)
        after = kv_servers(listen)
        self.assertEqual(after[home]["pending"]["legs"], 1)
        self.assertEqual(after[home]["pending"]["tokens"], 6400)
        # Both prefills are over: nothing pending anywhere, and the events took over.
        self.assertTrue(wait_until(lambda: all(s["pending"]["blocks"] == 0
                                               for s in kv_servers(listen).values()), 5),
                        kv_servers(listen))
        self.assertGreaterEqual(kv_servers(listen)[home]["blocks"], 187)
        self.assertTrue(status(listen)["kv"]["pools"][0]["pending"])
        m = get(listen, "/omni/metrics").body.decode()
        self.assertIn('omni_proxy_kv_pending_legs_total{pool="engines",backend="%s"} 1' % home, m)
        self.assertIn('omni_proxy_kv_pending_blocks{pool="engines",backend="%s"} 0' % home, m)

    def test_a_dead_workers_pending_prompts_are_dropped(self):
        listen = self.start_nginx("on")
        nginx = self.nginxes[-1]
        before = worker_pids(nginx)

        def send():
            try:
                complete(listen, ids(701, n=12000), timeout=30)
            except OSError:
                pass  # its worker was killed

        t = threading.Thread(target=send)
        t.start()
        pending = lambda: sum(s.get("pending", {}).get("blocks", 0)  # noqa: E731
                              for s in kv_servers(listen).values())
        self.assertTrue(wait_until(lambda: pending() > 0, 5, interval=0.005))
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        self.nginxes.remove(nginx)
        self.addCleanup(nginx.cleanup, allow=("exited on signal 9",))
        t.join(30)
        # The master starts new workers; the first to see the dead ones drops their chains.
        self.assertTrue(wait_until(lambda: worker_pids(nginx) and not
                                   worker_pids(nginx) & before and pending() == 0, 10),
                        kv_servers(listen))

    def test_pending_off_sees_only_events(self):
        listen = self.start_nginx("off")
        second, home, during = self.overlap(listen, 601)
        self.assertNotIn("pending", during)
        rt = route(second)
        self.assertEqual(int(rt["cached"]), 0, rt)
        self.assertEqual(int(rt.get("runner_up_cached", 0)), 0, rt)
        self.assertFalse(status(listen)["kv"]["pools"][0]["pending"])
        self.assertNotIn("omni_proxy_kv_pending_blocks", get(listen, "/omni/metrics").body.decode())


class KvPdTest(unittest.TestCase):
    def test_decode_choice_sees_decode_caches(self):
        base = free_port(300)
        pre = Sim("--engine", "vllm", "--role", "prefill", "--instances", "2", "--time-scale",
                  "0.01", "--port", str(base), "--kv-events-port", str(base + 100),
                  "--kv-replay-port", str(base + 200))
        dec = Sim("--engine", "vllm", "--role", "decode", "--instances", "2", "--time-scale",
                  "0.01", "--port", str(base + 10), "--kv-events-port", str(base + 110),
                  "--kv-replay-port", str(base + 210))
        listen = free_port()
        body = """
    omni_proxy_zone omni 64m;
    omni_proxy_kv_index_blocks 4096;
    upstream pre {{ server 127.0.0.1:{p0}; server 127.0.0.1:{p1}; }}
    upstream dec {{ server 127.0.0.1:{d0}; server 127.0.0.1:{d1}; }}
    omni_proxy_kv_cache pre events pub_port_offset=100 replay_port_offset=200;
    omni_proxy_kv_cache dec events pub_port_offset=100 replay_port_offset=200;
    server {{
        listen 127.0.0.1:{listen};
        omni_proxy_route_header on;
        location /v1/ {{ omni_proxy; omni_proxy_mode sequential;
                         omni_proxy_prefill_upstream pre; omni_proxy_decode_upstream dec;
                         omni_proxy_policy kv_aware; }}
        location /omni/status {{ omni_proxy_status; }}
    }}
""".format(p0=base, p1=base + 1, d0=base + 10, d1=base + 11, listen=listen)
        n = Nginx(body, port=listen)
        try:
            r = n.run()
            self.assertEqual(r.returncode, 0, r.stderr)
            first = complete(listen, ids(31))
            self.assertEqual(first.status, 200, first.body)
            d = header(first, "X-Omni-Decode-Peer")
            self.assertTrue(wait_until(lambda: kv_servers(listen, "dec").get(d, {})
                                       .get("blocks", 0) >= 15, 10), kv_servers(listen, "dec"))
            second = complete(listen, ids(31))
            self.assertEqual(header(second, "X-Omni-Decode-Peer"), d)
            rt = route(second, "Decode")
            self.assertEqual(int(rt["cached"]), 240, rt)
            self.assertEqual(route(second)["reason"], "warm")
            self.assertEqual(n.errors(), [])
        finally:
            n.cleanup()
            pre.stop()
            dec.stop()


class KvConfigTest(unittest.TestCase):
    def check_fails(self, body, *needles):
        assert_config_fails(self, body, *needles)

    LOC = """
    omni_proxy_zone omni 64m;
    upstream engines { server 127.0.0.1:9; }
    %s
    server { listen 127.0.0.1:PORT;
             location /v1/ { omni_proxy; omni_proxy_upstream engines; %s } }
"""

    def test_errors_name_the_directive(self):
        self.check_fails(self.LOC % ("omni_proxy_kv_cache nowhere events pub_port_offset=1;",
                                     "omni_proxy_policy kv_aware;"),
                         "omni_proxy_kv_cache", "nowhere")
        self.check_fails(self.LOC % ("omni_proxy_kv_cache engines events;", ""),
                         "omni_proxy_kv_cache", "pub_port_offset")
        self.check_fails(self.LOC % ("omni_proxy_kv_cache engines sometimes;", ""),
                         "omni_proxy_kv_cache", "sometimes")
        self.check_fails(self.LOC % ("omni_proxy_kv_cache engines approximate topic=x;", ""),
                         "omni_proxy_kv_cache", "topic=x")
        self.check_fails(self.LOC % ("omni_proxy_kv_cache engines approximate pending=on;", ""),
                         "omni_proxy_kv_cache", "pending=on")
        self.check_fails(self.LOC % ("omni_proxy_kv_cache engines events pub_port_offset=1 "
                                     "pending=maybe;", ""),
                         "omni_proxy_kv_cache", "pending=maybe", "pending=on|off")
        self.check_fails(self.LOC % ("", "omni_proxy_policy kv_aware epsilon=-1;"),
                         "omni_proxy_policy", "epsilon=-1")
        for bad in ("miss_weight=11", "miss_weight=-0.5", "miss_weight=x", "miss_weight="):
            self.check_fails(self.LOC % ("", "omni_proxy_policy kv_aware %s;" % bad),
                             "omni_proxy_policy", bad, "miss_weight=0..10")
        self.check_fails(self.LOC % ("omni_proxy_kv_index_blocks 10;", ""),
                         "omni_proxy_kv_index_blocks")
        self.check_fails("""
    upstream engines { server 127.0.0.1:9; }
    server { listen 127.0.0.1:PORT;
             location /v1/ { omni_proxy; omni_proxy_upstream engines; omni_proxy_policy kv_aware; } }
""", "omni_proxy_zone")


if __name__ == "__main__":
    unittest.main()
