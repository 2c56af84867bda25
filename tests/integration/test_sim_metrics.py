"""The metrics routers poll, with the engines' own names, and their consistency with what was
served; preemption under KV pressure; the exposition checked by Prometheus's own parser
(promtool, from Debian's prometheus package)."""
import shutil
import subprocess
import threading
import unittest

from simlib import Sim, get, metric, metrics, post


class VllmMetricsTest(unittest.TestCase):
    def test_vllm_metrics_track_requests(self):
        with Sim("--engine", "vllm", "--block-size", "16", "--num-blocks", "512") as s:
            prompt = list(range(500, 500 + 50))
            for _ in range(3):
                self.assertEqual(post(s.port(), "/v1/completions",
                                      {"prompt": prompt, "max_tokens": 4}).status, 200)
            m = metrics(s.port())
            self.assertEqual(metric(m, "vllm:prompt_tokens_total", model_name="omni-sim"), 150)
            self.assertEqual(metric(m, "vllm:generation_tokens_total"), 12)
            self.assertEqual(metric(m, "vllm:prefix_cache_queries_total"), 150)
            self.assertEqual(metric(m, "vllm:prefix_cache_hits_total"), 2 * 48)
            self.assertEqual(metric(m, "vllm:request_success_total"), 3)
            self.assertEqual(metric(m, "vllm:num_requests_running"), 0)
            self.assertEqual(metric(m, "vllm:num_requests_waiting"), 0)
            self.assertEqual(metric(m, "vllm:kv_cache_usage_perc"), 0)
            self.assertEqual(metric(m, "vllm:cache_config_info", block_size="16",
                                    num_gpu_blocks="512", engine="0"), 1)
            self.assertEqual(metric(m, "vllm:time_to_first_token_seconds_count"), 3)
            self.assertEqual(metric(m, "vllm:e2e_request_latency_seconds_count"), 3)
            self.assertEqual(metric(m, "vllm:num_preemptions_total"), 0)

    def test_gauges_while_busy(self):
        with Sim("--engine", "vllm", "--max-num-seqs", "2", "--time-scale", "5") as s:
            threads = [threading.Thread(target=post, args=(s.port(), "/v1/completions",
                                                           {"prompt": "busy %d" % i,
                                                            "max_tokens": 30}))
                       for i in range(5)]
            for t in threads:
                t.start()
            from simlib import wait_until
            self.assertTrue(wait_until(
                lambda: metric(metrics(s.port()), "vllm:num_requests_running") == 2 and
                metric(metrics(s.port()), "vllm:num_requests_waiting") == 3, 5))
            self.assertGreater(metric(metrics(s.port()), "vllm:kv_cache_usage_perc"), 0)
            for t in threads:
                t.join(30)
            self.assertEqual(metric(metrics(s.port()), "vllm:request_success_total"), 5)

    def test_preemption_when_kv_runs_out(self):
        # 24 blocks of 16 tokens; four sequences growing to 160 tokens need 40 blocks.
        with Sim("--engine", "vllm", "--num-blocks", "24", "--max-model-len", "384") as s:
            results = []
            def run(i):
                results.append(post(s.port(), "/v1/completions",
                                    {"prompt": list(range(1000 * (i + 1), 1000 * (i + 1) + 40)),
                                     "max_tokens": 120}))
            threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            self.assertEqual([r.status for r in results], [200] * 4)
            self.assertTrue(all(r.json()["usage"]["completion_tokens"] == 120 for r in results))
            m = metrics(s.port())
            self.assertGreater(metric(m, "vllm:num_preemptions_total"), 0)
            self.assertEqual(metric(m, "vllm:kv_cache_usage_perc"), 0)


def promtool_problems(text):
    """Runs `promtool check metrics`; returns its problem lines. A parse error fails."""
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    if r.returncode not in (0, 3):  # 3: lint problems, 1: the text does not parse
        raise AssertionError("promtool rejected the exposition: " + r.stdout + r.stderr)
    return [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]


class PromtoolTest(unittest.TestCase):
    def test_exposition_parses_with_promtool(self):
        if shutil.which("promtool") is None:
            self.fail("promtool is missing: scripts/setup.sh installs Debian's prometheus")
        for engine, path, body in (
                ("vllm", "/v1/completions", {"prompt": "x", "max_tokens": 3}),
                ("sglang", "/generate", {"text": "x", "sampling_params": {"max_new_tokens": 3}})):
            with self.subTest(engine=engine), Sim("--engine", engine, "--kv-events") as s:
                self.assertEqual(post(s.port(), path, body).status, 200)
                problems = promtool_problems(get(s.port(), "/metrics").body.decode())
                # The engines' own names use ':' (vLLM's and SGLang's convention), which
                # promtool's linter flags; anything else is a real problem.
                self.assertEqual([p for p in problems
                                  if not p.endswith("metric names should not contain ':'")], [])


class SglangMetricsTest(unittest.TestCase):
    def test_sglang_metric_names(self):
        with Sim("--engine", "sglang") as s:
            for _ in range(2):
                self.assertEqual(post(s.port(), "/generate",
                                      {"input_ids": list(range(100, 150)),
                                       "sampling_params": {"max_new_tokens": 3}}).status, 200)
            m = metrics(s.port())
            labels = dict(engine_type="unified", model_name="omni-sim")
            self.assertEqual(metric(m, "sglang:num_running_reqs", **labels), 0)
            self.assertEqual(metric(m, "sglang:num_queue_reqs", **labels), 0)
            self.assertEqual(metric(m, "sglang:token_usage", **labels), 0)
            self.assertAlmostEqual(metric(m, "sglang:cache_hit_rate", **labels), 48 / 100)
            self.assertEqual(metric(m, "sglang:prompt_tokens_total", **labels), 100)
            self.assertEqual(metric(m, "sglang:generation_tokens_total", **labels), 6)
            loads = get(s.port(), "/v1/loads").json()["loads"][0]
            self.assertAlmostEqual(loads["cache_hit_rate"], 0.48)
            self.assertEqual(loads["disaggregation"]["mode"], "null")


if __name__ == "__main__":
    unittest.main()
