"""vLLM-style sequential P/D between two omni-sim processes: the prefill keeps the prompt's
KV and names it in kv_transfer_params; the decode pulls it over the prefill's side channel."""
import time
import unittest

from simlib import Sim, metric, metrics, post, wait_until

PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                  "remote_block_ids": None, "remote_host": None, "remote_port": None}
PROMPT = list(range(2000, 2000 + 70))  # 70 tokens: 5 blocks of 16, the last one partial


def prefill_body(prompt=PROMPT):
    return {"prompt": prompt, "max_tokens": 1, "stream": False,
            "kv_transfer_params": dict(PREFILL_PARAMS)}


class VllmPdTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.p = Sim("--engine", "vllm", "--role", "prefill", "--kv-hold-timeout", "1.5")
        cls.d = Sim("--engine", "vllm", "--role", "decode")

    @classmethod
    def tearDownClass(cls):
        cls.p.stop()
        cls.d.stop()

    def prefill(self, prompt=PROMPT, request_id="r"):
        r = post(self.p.port(), "/v1/completions", prefill_body(prompt),
                 headers={"X-Request-Id": request_id})
        self.assertEqual(r.status, 200, r.body)
        return r.json()

    def held(self):
        return metric(metrics(self.p.port()), "omni_sim:kv_held_requests")

    def test_handshake_streams_from_decode(self):
        held_before = self.held()
        p = self.prefill(request_id="pd-1")
        kv = p["kv_transfer_params"]
        self.assertEqual(p["usage"]["completion_tokens"], 1)
        self.assertTrue(kv["do_remote_prefill"])
        self.assertFalse(kv["do_remote_decode"])
        self.assertEqual(len(kv["remote_block_ids"]), 5)
        self.assertEqual(kv["remote_engine_id"], self.p.instances[0]["engine_id"])
        self.assertEqual(kv["remote_request_id"], "cmpl-pd-1-0")
        self.assertEqual(kv["remote_host"], "127.0.0.1")
        self.assertEqual(kv["remote_port"], self.p.instances[0]["kv_transfer_port"])
        self.assertEqual(kv["tp_size"], 1)
        self.assertEqual(self.held(), held_before + 1)

        r = post(self.d.port(), "/v1/completions",
                 {"prompt": PROMPT, "max_tokens": 6, "stream": True,
                  "stream_options": {"include_usage": True}, "kv_transfer_params": kv},
                 headers={"X-Request-Id": "pd-1"})
        self.assertEqual(r.status, 200)
        chunks = r.json_events()
        self.assertEqual(len([c for c in chunks if c["choices"]]), 6)
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], 6)
        self.assertEqual(r.events()[-1], "[DONE]")
        # The prefill freed the blocks once pulled, and both sides counted the transfer.
        pm, dm = metrics(self.p.port()), metrics(self.d.port())
        self.assertEqual(metric(pm, "omni_sim:kv_held_requests"), held_before)
        self.assertGreaterEqual(metric(pm, "omni_sim:kv_blocks_sent_total"), 5)
        self.assertGreaterEqual(metric(dm, "omni_sim:kv_blocks_received_total"), 5)

        # A second pull of the same KV fails clearly: the blocks are gone.
        again = post(self.d.port(), "/v1/completions",
                     {"prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": kv})
        self.assertEqual(again.status, 500)
        # The decode cached the full pulled blocks, so only the last block is pulled again.
        self.assertIn("unknown or expired remote_request_id cmpl-pd-1-0",
                      again.json()["error"]["message"])

    def test_decode_side_prefix_cache_shortens_the_pull(self):
        prompt = list(range(9000, 9000 + 64))  # 4 full blocks
        kv1 = self.prefill(prompt, "warm")["kv_transfer_params"]
        r1 = post(self.d.port(), "/v1/completions",
                  {"prompt": prompt, "max_tokens": 1, "kv_transfer_params": kv1}).json()
        self.assertEqual(r1["usage"]["prompt_tokens_details"]["cached_tokens"], 0)
        before = metric(metrics(self.d.port()), "omni_sim:kv_blocks_received_total")
        kv2 = self.prefill(prompt, "warm2")["kv_transfer_params"]
        r2 = post(self.d.port(), "/v1/completions",
                  {"prompt": prompt, "max_tokens": 1, "kv_transfer_params": kv2}).json()
        self.assertEqual(r2["usage"]["prompt_tokens_details"]["cached_tokens"], 48)
        after = metric(metrics(self.d.port()), "omni_sim:kv_blocks_received_total")
        self.assertEqual(after - before, 1)  # only the block that must be recomputed

    def test_unpulled_kv_expires(self):
        kv = self.prefill(list(range(3000, 3040)), "expire")["kv_transfer_params"]
        # Every hold expires 1.5 s after its prefill (--kv-hold-timeout).
        self.assertTrue(wait_until(lambda: self.held() == 0, 10))
        self.assertGreaterEqual(
            metric(metrics(self.p.port()), "omni_sim:kv_holds_expired_total"), 1)
        r = post(self.d.port(), "/v1/completions",
                 {"prompt": list(range(3000, 3040)), "max_tokens": 2, "kv_transfer_params": kv})
        self.assertEqual(r.status, 500)
        self.assertIn("unknown or expired", r.json()["error"]["message"])

    def test_bad_params_give_clear_errors(self):
        kv = self.prefill(list(range(4000, 4050)), "bad")["kv_transfer_params"]
        cases = [
            ({**kv, "remote_engine_id": "not-an-engine"}, "unknown remote_engine_id"),
            ({**kv, "remote_block_ids": kv["remote_block_ids"][:1]}, "remote_block_ids has 1"),
            ({**kv, "remote_port": None}, "needs remote_block_ids"),
            ({**kv, "remote_request_id": "cmpl-nobody-0"}, "unknown or expired"),
        ]
        for params, message in cases:
            with self.subTest(message=message):
                r = post(self.d.port(), "/v1/completions",
                         {"prompt": list(range(4000, 4050)), "max_tokens": 2,
                          "kv_transfer_params": params})
                self.assertEqual(r.status, 500, r.body)
                self.assertIn(message, r.json()["error"]["message"])
        # Streamed, the error arrives inside the stream, as vLLM sends it.
        r = post(self.d.port(), "/v1/completions",
                 {"prompt": list(range(4000, 4050)), "max_tokens": 2, "stream": True,
                  "kv_transfer_params": {**kv, "remote_request_id": "cmpl-nobody-0"}})
        self.assertEqual(r.status, 200)
        self.assertIn("error", r.json_events()[0])
        self.assertEqual(r.events()[-1], "[DONE]")

    def test_roles_are_enforced(self):
        r = post(self.d.port(), "/v1/completions", prefill_body())
        self.assertEqual(r.status, 400)
        self.assertIn("decode instance", r.json()["error"]["message"])


class VllmPdRecomputeTest(unittest.TestCase):
    def test_failed_pull_is_recomputed_with_the_recompute_policy(self):
        with Sim("--engine", "vllm", "--role", "decode",
                 "--kv-load-failure-policy", "recompute") as d:
            kv = {"do_remote_prefill": True, "remote_block_ids": [0, 1, 2],
                  "remote_engine_id": "gone", "remote_request_id": "cmpl-x-0",
                  "remote_host": "127.0.0.1", "remote_port": 1}
            r = post(d.port(), "/v1/completions",
                     {"prompt": list(range(100, 140)), "max_tokens": 3,
                      "kv_transfer_params": kv})
            self.assertEqual(r.status, 200, r.body)
            self.assertEqual(r.json()["usage"]["completion_tokens"], 3)
            self.assertEqual(metric(metrics(d.port()), "omni_sim:kv_pulls_failed_total"), 1)


class VllmPdTransferTimeTest(unittest.TestCase):
    def test_transfer_time_grows_with_blocks(self):
        # fast profile: a pull takes 1 ms + 0.01 ms per block, times --time-scale 10, so
        # 400 blocks take about 40 ms longer than 2 blocks.
        with Sim("--engine", "vllm", "--role", "prefill", "--time-scale", "10") as p, \
             Sim("--engine", "vllm", "--role", "decode", "--time-scale", "10") as d:
            def pd_seconds(n_tokens, base):
                prompt = list(range(base, base + n_tokens))
                kv = post(p.port(), "/v1/completions", prefill_body(prompt)).json()[
                    "kv_transfer_params"]
                t0 = time.monotonic()
                r = post(d.port(), "/v1/completions",
                         {"prompt": prompt, "max_tokens": 1, "kv_transfer_params": kv})
                self.assertEqual(r.status, 200, r.body)
                return time.monotonic() - t0
            small = min(pd_seconds(16 * 2, 10000 + i * 100) for i in range(3))
            large = min(pd_seconds(16 * 400, 20000 + i * 7000) for i in range(3))
            self.assertGreater(large - small, 0.025)


if __name__ == "__main__":
    unittest.main()
