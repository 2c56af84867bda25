"""Many concurrent requests to one omni-sim instance: more than a step admits at a time, so the
engine admits dozens of waiting requests per step (a regression test for a use-after-free in
Engine::admit, which ASan caught once more than 32 requests were queued; this file runs under
the sanitizer build in CI's second leg)."""
import concurrent.futures
import unittest

from simlib import Sim, metric, metrics, post

CONCURRENCY = 100
PD_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
             "remote_block_ids": None, "remote_host": None, "remote_port": None}


def concurrently(fn, count):
    """fn(i) for i in range(count), all at once; the results in order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(fn, range(count)))


class ConcurrentRequestsTest(unittest.TestCase):
    def test_100_concurrent_completions(self):
        # --time-scale 10 stretches each step to ~20 ms, so the requests pile up in the waiting
        # queue and the engine admits many of them in one step.
        with Sim("--engine", "vllm", "--time-scale", "10") as s:
            def one(i):
                return post(s.port(), "/v1/completions",
                            {"prompt": "req %d" % i, "max_tokens": 4}, timeout=60)

            for i, r in enumerate(concurrently(one, CONCURRENCY)):
                self.assertEqual(r.status, 200, r.body)
                j = r.json()
                self.assertEqual(j["usage"]["completion_tokens"], 4, j)
                self.assertEqual(j["choices"][0]["finish_reason"], "length")
            m = metrics(s.port())
            self.assertEqual(metric(m, "vllm:request_success_total"), CONCURRENCY)
            self.assertEqual(metric(m, "vllm:generation_tokens_total"), 4 * CONCURRENCY)
            self.assertEqual(metric(m, "vllm:num_requests_running"), 0)
            self.assertEqual(metric(m, "vllm:num_requests_waiting"), 0)
            # Fewer steps than requests: admissions were batched.
            self.assertLess(metric(m, "omni_sim:steps_total"), CONCURRENCY)

    def test_100_concurrent_streams(self):
        with Sim("--engine", "sglang", "--time-scale", "10") as s:
            def one(i):
                return post(s.port(), "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "stream %d" % i}],
                             "max_tokens": 3, "stream": True}, timeout=60)

            for r in concurrently(one, CONCURRENCY):
                self.assertEqual(r.status, 200, r.body)
                self.assertEqual(r.events()[-1], "[DONE]")
                pieces = [c["choices"][0]["delta"].get("content") for c in r.json_events()
                          if c["choices"] and "role" not in c["choices"][0]["delta"]]
                self.assertEqual(len(pieces), 3, r.body)

    def test_100_concurrent_pd_rounds(self):
        # Admission of KV-loading requests (the decode side) takes the other branch of
        # Engine::admit: 100 decodes arrive at once and all wait for their pulls.
        with Sim("--engine", "vllm", "--role", "prefill", "--time-scale", "10") as p, \
                Sim("--engine", "vllm", "--role", "decode", "--time-scale", "10") as d:
            prompts = [list(range(1000 + 50 * i, 1000 + 50 * i + 40)) for i in range(CONCURRENCY)]

            def prefill(i):
                return post(p.port(), "/v1/completions",
                            {"prompt": prompts[i], "max_tokens": 1,
                             "kv_transfer_params": dict(PD_PARAMS)},
                            headers={"X-Request-Id": "conc-%d" % i}, timeout=60)

            prefills = concurrently(prefill, CONCURRENCY)
            for r in prefills:
                self.assertEqual(r.status, 200, r.body)

            def decode(i):
                return post(d.port(), "/v1/completions",
                            {"prompt": prompts[i], "max_tokens": 3,
                             "kv_transfer_params": prefills[i].json()["kv_transfer_params"]},
                            headers={"X-Request-Id": "conc-%d" % i}, timeout=60)

            for r in concurrently(decode, CONCURRENCY):
                self.assertEqual(r.status, 200, r.body)
                self.assertEqual(r.json()["usage"]["completion_tokens"], 3)
            self.assertEqual(metric(metrics(p.port()), "omni_sim:kv_held_requests"), 0)
            self.assertEqual(metric(metrics(d.port()), "omni_sim:kv_pulls_failed_total"), 0)


if __name__ == "__main__":
    unittest.main()
