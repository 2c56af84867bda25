"""Server-choice policies of omni_proxy locations (omni_proxy_policy), the route headers
(omni_proxy_route_header) and $omni_prefix_key, through Debian's nginx with the module (2
workers) in front of omni-sim vLLM instances:
- `upstream` leaves the choice to the block's balancer: nginx's round robin cycles through the
  servers whatever their load;
- `hash $omni_prefix_key consistent` sends equal prompt prefixes to one server;
- `cache_aware` (the SGLang rule, re-implemented) sends requests sharing a prefix to the server
  that got it first, spreads cold prefixes by table size, falls back to the least loaded
  server when loads are imbalanced, and records its table in the status page and metrics;
- config mistakes fail `nginx -t` naming the directive."""
import collections
import json
import unittest

from simlib import Sim, free_port, get, post
from test_nginx_module import Nginx

PROMPT_LEN = 64


def ids(seed, n=PROMPT_LEN, shared=None):
    """A token-id prompt; `shared` leading ids (a shared prefix) come from seed 0."""
    head = [1000 + (7 * i) % 5000 for i in range(shared or 0)]
    tail = [1000 + (seed * 131 + 17 * i) % 90000 for i in range(n - len(head))]
    return head + tail


class PolicyTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.sim = Sim("--engine", "vllm", "--role", "both", "--instances", "4",
                      "--time-scale", "0.01")
        cls.servers = ["127.0.0.1:%d" % cls.sim.port(i) for i in range(4)]
        servers = "".join("server %s; " % s for s in cls.servers)
        cls.ports = {name: p for name, p in zip(("rr", "hash", "cache", "busy"), [free_port()
                                                                                for _ in range(4)])}
        body = """
    omni_proxy_zone omni 16m;
    omni_proxy_prefix_table 4096;
    upstream plain {{ zone plain 64k; {servers} }}
    upstream hashed {{ hash $omni_prefix_key consistent; {servers} }}
    upstream aware {{ {servers} }}
    upstream aware_busy {{ {servers} }}
    server {{
        listen 127.0.0.1:{rr};
        location /v1/ {{ omni_proxy; omni_proxy_upstream plain; omni_proxy_policy upstream;
                         omni_proxy_route_header on; }}
    }}
    server {{
        listen 127.0.0.1:{hash};
        location /v1/ {{ omni_proxy; omni_proxy_upstream hashed; omni_proxy_route_header on; }}
    }}
    server {{
        listen 127.0.0.1:{cache};
        omni_proxy_route_header on;
        location /v1/ {{ omni_proxy; omni_proxy_upstream aware;
                         omni_proxy_policy cache_aware block_tokens=16; }}
        location /omni/status {{ omni_proxy_status; }}
        location /omni/metrics {{ omni_proxy_metrics; }}
    }}
    server {{
        listen 127.0.0.1:{busy};
        location /v1/ {{ omni_proxy; omni_proxy_upstream aware_busy; omni_proxy_route_header on;
                         omni_proxy_policy cache_aware balance_abs_threshold=2
                                                   balance_rel_threshold=1.5; }}
    }}
""".format(servers=servers, **cls.ports)
        cls.nginx = Nginx(body)
        r = cls.nginx.run()
        if r.returncode != 0:
            cls.sim.stop()
            raise AssertionError(r.stderr)

    @classmethod
    def tearDownClass(cls):
        try:
            cls.nginx.cleanup()
        finally:
            cls.sim.stop()

    def complete(self, which, prompt, max_tokens=2):
        r = post(self.ports[which], "/v1/completions",
                 {"model": "omni-sim", "prompt": prompt, "max_tokens": max_tokens})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.headers.get("x-omni-prefill-peer"), r.headers.get("x-omni-decode-peer"))
        return r.headers.get("x-omni-decode-peer"), r.json()

    def test_upstream_policy_is_nginx_round_robin(self):
        # One connection, one worker at a time: round robin cycles through all four in order.
        seen = [self.complete("rr", ids(i))[0] for i in range(8)]
        self.assertEqual(sorted(set(seen)), sorted(self.servers))
        self.assertEqual(seen[:4], seen[4:8])

    def test_hash_on_prefix_key_keeps_prefixes_together(self):
        # Same first 256 tokens, different tails: one server. Different prefixes spread out.
        same = {self.complete("hash", ids(i, n=300, shared=256))[0] for i in range(6)}
        self.assertEqual(len(same), 1)
        spread = {self.complete("hash", ids(100 + i, n=300))[0] for i in range(24)}
        self.assertGreaterEqual(len(spread), 3)
        # A prompt shorter than 256 tokens is keyed on all of it, text prompts on their bytes.
        short = {self.complete("hash", ids(7, n=20))[0] for _ in range(3)}
        self.assertEqual(len(short), 1)
        text = {self.complete("hash", "a fixed text prompt %d" % 3)[0] for _ in range(3)}
        self.assertEqual(len(text), 1)

    def test_cache_aware_follows_prefixes_and_spreads_cold_ones(self):
        # Cold, unrelated prompts go to the server with the smallest table: all four in turn.
        cold = [self.complete("cache", ids(500 + i))[0] for i in range(8)]
        self.assertEqual(collections.Counter(cold), {s: 2 for s in self.servers})
        # Requests sharing most of their prompt with an earlier one follow it, and the engine
        # confirms the prefix cache hit.
        first, _ = self.complete("cache", ids(900, n=128))
        for i in range(5):
            prompt = ids(900, n=128)[:112] + ids(901 + i, n=16)
            peer, answer = self.complete("cache", prompt)
            self.assertEqual(peer, first)
            self.assertGreaterEqual(answer["usage"]["prompt_tokens_details"]["cached_tokens"], 96)
        # A prefix covering 25% of the prompt is below the 0.3 threshold: not followed, but the
        # request goes to the smallest table, which is not the one holding the prefix.
        prompt = ids(900, n=128)[:32] + ids(950, n=96)
        peer, _ = self.complete("cache", prompt)
        self.assertNotEqual(peer, first)
        status = get(self.ports["cache"], "/omni/status").json()
        table = status["prefix_table"]
        self.assertEqual(table["entries"], 4096)
        self.assertGreater(table["used"], 0)
        self.assertEqual(table["contended"], 0)
        text = get(self.ports["cache"], "/omni/metrics").body.decode()
        self.assertIn("omni_proxy_prefix_table_used ", text)

    def test_cache_aware_balances_when_imbalanced(self):
        # Long generations pile onto the prefix's server until the imbalance rule takes over.
        import concurrent.futures
        prompt = ids(4242, n=96)
        first, _ = self.complete("busy", prompt)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(self.complete, "busy", prompt, 400) for _ in range(8)]
            peers = [f.result()[0] for f in futures]
        self.assertIn(first, peers)
        self.assertGreater(len(set(peers)), 1, peers)


class PolicyConfigTest(unittest.TestCase):
    def expect_error(self, body, message):
        n = Nginx(body)
        try:
            r = n.run("-t")
            self.assertNotEqual(r.returncode, 0)
            self.assertIn(message, r.stderr)
        finally:
            n.cleanup(allow=("[emerg]",))

    def test_config_mistakes_name_the_directive(self):
        loc = """
    omni_proxy_zone omni 16m;
    upstream u { server 127.0.0.1:1; }
    server { listen 127.0.0.1:PORT; location /v1/ { omni_proxy; omni_proxy_upstream u; %s } }
"""
        self.expect_error(loc % "omni_proxy_policy fastest;",
                          '"omni_proxy_policy": invalid value "fastest"')
        self.expect_error(loc % "omni_proxy_policy upstream block_tokens=4;",
                          '"omni_proxy_policy upstream" takes no parameters')
        self.expect_error(loc % "omni_proxy_policy cache_aware cache_threshold=2;",
                          'invalid parameter "cache_threshold=2"')
        self.expect_error(loc % "omni_proxy_policy cache_aware balance_rel_threshold=0.5;",
                          'invalid parameter "balance_rel_threshold=0.5"')
        self.expect_error(loc % "omni_proxy_policy upstream; omni_proxy_policy upstream;",
                          "is duplicate")
        self.expect_error(loc % "omni_proxy_route_header maybe;", "omni_proxy_route_header")
        self.expect_error("omni_proxy_prefix_table 10;" + loc % "",
                          '"omni_proxy_prefix_table": "10" must be an integer from 1024')
        many = "".join("server 127.0.0.1:%d; " % (1000 + i) for i in range(65))
        self.expect_error("""
    omni_proxy_zone omni 16m;
    upstream u { %s }
    server { listen 127.0.0.1:PORT; location /v1/ { omni_proxy; omni_proxy_upstream u;
                                                    omni_proxy_policy cache_aware; } }
""" % many, 'upstream "u" has 65 servers')
        self.expect_error("""
    omni_proxy_zone omni 64k;
    omni_proxy_prefix_table 1048576;
    upstream u { server 127.0.0.1:1; }
    server { listen 127.0.0.1:PORT; location /v1/ { omni_proxy; omni_proxy_upstream u;
                                                    omni_proxy_policy cache_aware; } }
""", "is too small")


if __name__ == "__main__":
    unittest.main()
