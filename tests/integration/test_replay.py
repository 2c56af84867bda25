"""omni-bench (replay/) against real omni-sim processes: Mooncake and Azure trace slices, a
synthetic shared-prefix workload, error recording, and open-loop behaviour under a concurrency
cap. omni-sim runs 100x faster than real time (--time-scale 0.01) or 10x for the timing tests.

The traces come from the shared data folder (OMNI_DATA_DIR, else ../shared/data next to the
source tree, else /work/shared/data); tests that need a missing trace are skipped.
"""
import csv
import json
import os
import signal
import subprocess
import tempfile
import time
import unittest

import simlib

BENCH = os.environ.get("OMNI_BENCH") or os.path.join(os.environ.get("OMNI_BINARY_DIR", ""),
                                                     "replay", "omni-bench")


def trace_path(name):
    for base in (os.environ.get("OMNI_DATA_DIR"),
                 os.path.join(simlib.SOURCE_DIR, "..", "shared", "data"), "/work/shared/data"):
        if base and os.path.exists(os.path.join(base, "traces", name)):
            return os.path.abspath(os.path.join(base, "traces", name))
    raise unittest.SkipTest(name + " not found: set OMNI_DATA_DIR to the shared data folder")


def run_bench(*args, expect_status=0, timeout=60):
    """Runs omni-bench; returns (summary from --summary, CSV rows, completed process)."""
    if not os.path.exists(BENCH):
        raise unittest.SkipTest("omni-bench not built (OMNI_BENCH)")
    with tempfile.TemporaryDirectory(prefix="omni-bench-test-") as d:
        summary_path, csv_path = os.path.join(d, "summary.json"), os.path.join(d, "requests.csv")
        cmd = [BENCH, "--summary", summary_path, "--csv", csv_path] + [str(a) for a in args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if p.returncode != expect_status:
            raise AssertionError("omni-bench exited %d:\n%s\n%s"
                                 % (p.returncode, p.stdout, p.stderr))
        if expect_status != 0:
            return None, None, p
        with open(summary_path) as f:
            summary = json.load(f)
        rows = []
        if os.path.exists(csv_path):
            with open(csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
        # stdout carries the same summary as one JSON line
        assert json.loads(p.stdout) == summary
        return summary, rows, p


def mooncake_shared_tokens(lines, block=512, engine_block=16):
    """For each request, the prompt tokens a cache holding other requests' prompts could hit:
    the longest block-id prefix shared with another request, in tokens, within full engine
    blocks and short of the last prompt token (as the engines cap it). Returns two lists: shared
    with an earlier request (what an ideal cache hits in arrival order) and with any other
    request (a bound whatever order the engine ran them in)."""
    def common(r, p):
        n = 0
        for b, (x, y) in enumerate(zip(r["hash_ids"], p["hash_ids"])):
            if x != y:
                break
            len_r = min(block, r["input_length"] - b * block)
            len_p = min(block, p["input_length"] - b * block)
            n += min(len_r, len_p)
            if len_r < block or len_p < block:
                break
        return n

    earlier, anywhere = [], []
    for i, r in enumerate(lines):
        cap = (r["input_length"] - 1) // engine_block * engine_block
        hit = lambda n: min(n // engine_block * engine_block, cap)
        shared = [common(r, p) for p in lines]
        earlier.append(hit(max(shared[:i], default=0)))
        anywhere.append(hit(max(shared[:i] + shared[i + 1:], default=0)))
    return earlier, anywhere


class ReplayAgainstSim(unittest.TestCase):
    """One fast omni-sim for the trace and synthetic replays; each test empties its cache."""

    @classmethod
    def setUpClass(cls):
        # omni-sim's keep-alive timer also runs while a request is being read, and a sanitizer
        # build of it can take seconds to read Mooncake's 50k-token bodies under load: a long
        # timer keeps it from closing connections mid-request.
        cls.sim = simlib.Sim("--profile", "fast", "--time-scale", "0.01",
                             "--max-model-len", "200000", "--num-blocks", "200000",
                             "--keepalive-timeout", "60", duration=120)
        cls.target = "http://127.0.0.1:%d" % cls.sim.port()

    @classmethod
    def tearDownClass(cls):
        cls.sim.stop()

    def setUp(self):
        self.assertEqual(simlib.post(self.sim.port(), "/reset_prefix_cache", "").status, 200)

    def test_mooncake_slice(self):
        path = trace_path("mooncake_synthetic_trace.jsonl")
        with open(path) as f:
            lines = [json.loads(next(f)) for _ in range(80)]
        s, rows, p = run_bench("--trace", "mooncake:" + path, "--limit", 80, "--speedup", 20,
                               "--time-scale", 0.01, "--target", self.target, "--label", "mc",
                               "--peer-header-decode", "X-Request-Id",
                               "--oracle-capacity-blocks", 200000, "--oracle-block-size", 16)
        self.assertIn("replaying 80 requests", p.stderr)
        self.assertEqual(s["label"], "mc")
        self.assertEqual(s["trace"]["source"], "mooncake")
        self.assertEqual(s["trace"]["limit"], 80)
        self.assertEqual(s["time_scale"], 0.01)
        self.assertEqual(s["speedup"], 20)
        req = s["requests"]
        self.assertEqual((req["scheduled"], req["sent"], req["ok"], req["errors"], req["dropped"]),
                         (80, 80, 80, 0, 0))
        self.assertEqual(req["errors_by_kind"], {})
        for k in ("p50", "p99", "max"):
            self.assertIsNotNone(req["lateness_ms"][k])
        self.assertLess(req["connections_opened"], 80)  # keep-alive connections are reused
        for metric in ("ttft", "tpot", "itl", "e2e"):
            for k in ("mean", "p50", "p90", "p99"):
                self.assertIsNotNone(s["latency_ms"][metric][k], metric + " " + k)
        # Model time: the fast profile's steps alone take 2 ms of model time, 0.02 ms of wall.
        self.assertGreater(s["latency_ms"]["ttft"]["p50"], 2)
        self.assertAlmostEqual(s["duration_s"], s["wall_duration_s"] / 0.01, places=6)
        self.assertEqual(s["throughput"]["input_tokens_per_s"],
                         s["prefix_cache"]["prompt_tokens"] / s["duration_s"])
        self.assertEqual(s["goodput"]["fraction"], 1.0)

        # One CSV row per request, lengths as in the trace, the engine's usage.
        self.assertEqual(len(rows), 80)
        for line, row in zip(lines, rows):
            self.assertEqual(row["outcome"], "ok")
            self.assertEqual(int(row["input_tokens"]), line["input_length"])
            self.assertEqual(int(row["prompt_tokens"]), line["input_length"])
            self.assertEqual(int(row["completion_tokens"]), line["output_length"])
            self.assertEqual(row["decode_peer"], "bench-" + row["index"])  # the echoed header
            self.assertEqual(row["prefill_peer"], "")
        self.assertEqual(s["peers"]["prefill"]["absent"], 80)
        self.assertEqual(len(s["peers"]["decode"]["counts"]), 80)

        # Equal hash ids are equal prompt prefixes at the engine: each request's cached tokens
        # are what it shares with the requests before it.
        expected, bound = mooncake_shared_tokens(lines)
        cached = [int(r["cached_tokens"]) for r in rows]
        self.assertGreater(sum(expected), 0)
        self.assertGreater(sum(c > 0 for c in cached), 0)
        for i, (c, e) in enumerate(zip(cached, bound)):
            self.assertLessEqual(c, e, "request %d hit more than it shares" % i)
        # Most of what is shared with earlier requests hits (a request that arrives while the
        # one it shares with is still being prefilled misses the blocks not yet computed).
        self.assertGreaterEqual(sum(cached), 0.9 * sum(expected))
        self.assertAlmostEqual(s["prefix_cache"]["hit_rate"],
                               sum(cached) / sum(int(r["prompt_tokens"]) for r in rows))
        # An unbounded ideal cache of the engine's block size hits what the engine hit (requests
        # do not overlap much at this speed).
        self.assertAlmostEqual(s["oracle_hit_rate"], s["prefix_cache"]["hit_rate"], delta=0.01)

    def test_azure_slice_text_prompts(self):
        path = trace_path("azure_code_trace.csv")
        s, rows, _ = run_bench("--trace", "azure:" + path, "--start", 10, "--window", 30,
                               "--limit", 50, "--speedup", 50, "--time-scale", 0.01,
                               "--prompt-mode", "text", "--target", self.target)
        self.assertEqual(s["trace"]["source"], "azure")
        self.assertEqual(s["trace"]["start_s"], 10)
        self.assertEqual(s["prompt_mode"], "text")
        n = s["requests"]["scheduled"]
        self.assertGreater(n, 20)
        self.assertLessEqual(n, 50)
        self.assertEqual(s["requests"]["ok"], n)
        self.assertEqual(len(rows), n)
        for row in rows:
            # One word per token with omni-sim's stand-in tokenizer; no prefix shared.
            self.assertEqual(int(row["prompt_tokens"]), int(row["input_tokens"]))
            self.assertEqual(int(row["cached_tokens"]), 0)
            self.assertEqual(int(row["completion_tokens"]), int(row["output_tokens"]))
        self.assertEqual(s["prefix_cache"]["hit_rate"], 0)

    def test_synthetic_shared_prefixes(self):
        # omni-bench is open loop: a turn never waits for the conversation's previous one. At
        # 2 req/s and time scale 0.01 a conversation's turns are about 30 ms apart on the wall
        # clock, enough for a sanitizer build of the sim under ctest -j2 to finish a turn's
        # prefill before the next arrives (at 100 req/s, 0.6 ms apart, it sometimes did not).
        spec = ("requests=60,rate=2,arrival=fixed,input=uniform:20:40,output=3,prefixes=2,"
                "prefix_len=512,users=3,turns=3")
        s, rows, _ = run_bench("--synthetic", spec, "--time-scale", 0.01,
                               "--target", self.target, "--oracle-capacity-blocks", 100000,
                               "--oracle-block-size", 16)
        self.assertEqual(s["trace"]["source"], "synthetic")
        self.assertEqual(s["trace"]["spec"], spec)
        self.assertEqual(s["requests"]["ok"], 60)
        # Two system prompts of 512 tokens: every request but the first of each hits at least
        # the system prompt, later turns their conversation's earlier prompt too.
        cached = sorted(int(r["cached_tokens"]) for r in rows)
        self.assertEqual(cached[:2], [0, 0])
        self.assertGreaterEqual(sum(c >= 512 for c in cached), 56)
        # Longer than any first turn (512 + at most 40): a later turn, which also hits the
        # previous turn's prompt (at least 532 tokens, 528 in full blocks of 16).
        later = [r for r in rows if int(r["input_tokens"]) > 552]
        self.assertGreater(len(later), 10)
        for r in later:
            self.assertGreaterEqual(int(r["cached_tokens"]), 528)
        self.assertGreater(s["prefix_cache"]["hit_rate"], 0.7)
        self.assertAlmostEqual(s["oracle_hit_rate"], s["prefix_cache"]["hit_rate"], delta=0.02)

        # The same spec as chat messages, non-streamed.
        s, rows, _ = run_bench("--synthetic", spec, "--limit", 12, "--time-scale", 0.01,
                               "--api", "chat", "--no-stream", "--seed", 5,
                               "--target", self.target)
        self.assertEqual((s["api"], s["prompt_mode"], s["stream"]), ("chat", "text", False))
        self.assertEqual(s["requests"]["ok"], 12)
        self.assertEqual(s["latency_ms"]["tpot"]["count"], 0)  # no stream, no TPOT
        self.assertEqual(s["latency_ms"]["ttft"]["p50"], s["latency_ms"]["e2e"]["p50"])
        self.assertGreater(s["prefix_cache"]["cached_tokens"], 0)
        for r in rows:
            self.assertEqual(int(r["completion_tokens"]), 3)
            # the chat template's role markers come on top of the words
            self.assertGreater(int(r["prompt_tokens"]), int(r["input_tokens"]))

        # Streamed chat: deltas are token events.
        s, rows, _ = run_bench("--synthetic", spec, "--limit", 6, "--time-scale", 0.01,
                               "--api", "chat", "--seed", 6, "--target", self.target)
        self.assertEqual(s["requests"]["ok"], 6)
        self.assertEqual(s["latency_ms"]["tpot"]["count"], 6)
        self.assertEqual(s["latency_ms"]["itl"]["count"], 6 * 2)
        self.assertTrue(all(r["token_events"] == "3" for r in rows))


class ReplayErrors(unittest.TestCase):

    def test_engine_errors_and_timeouts_are_recorded(self):
        # The sim's fault draws share its generator with token sampling, so which requests
        # fail depends on timing. 80 requests: no hang at all (0.9^80) is 2 in 10,000, where 40
        # gave one CI run under ASan no timeout. Expected: 20 errors (sd 3.9), 8 hangs (sd 2.7).
        with simlib.Sim("--time-scale", "0.01", "--fault-error-rate", "0.25",
                        "--fault-hang-rate", "0.1", "--seed", "3", duration=60) as sim:
            s, rows, _ = run_bench("--synthetic", "requests=80,rate=200,input=64,output=4",
                                   "--time-scale", 0.01, "--timeout", 1,
                                   "--target", "http://127.0.0.1:%d" % sim.port())
        req = s["requests"]
        kinds = req["errors_by_kind"]
        self.assertEqual(set(kinds), {"http_500", "timeout"})
        self.assertTrue(6 <= kinds["http_500"] <= 40, kinds)
        self.assertTrue(1 <= kinds["timeout"] <= 20, kinds)
        self.assertEqual(req["ok"] + req["errors"], 80)
        self.assertEqual(req["errors"], sum(kinds.values()))
        samples = s["error_samples"]
        self.assertTrue(1 <= len(samples) <= 5)
        self.assertIn("http_500", {e["kind"] for e in samples})
        body = next(e for e in samples if e["kind"] == "http_500")
        self.assertEqual(body["status"], 500)
        self.assertIn("error", json.loads(body["error"]))
        failed = [r for r in rows if r["outcome"] == "http_500"]
        self.assertEqual(len(failed), kinds["http_500"])
        self.assertTrue(all(r["status"] == "500" and r["error"] for r in failed))
        self.assertTrue(all(r["error"].startswith("no complete response")
                            for r in rows if r["outcome"] == "timeout"))
        # Latencies come from the successful requests only.
        self.assertEqual(s["latency_ms"]["ttft"]["count"], req["ok"])

    def test_stale_keepalive_connections_are_retried(self):
        # The server closes idle connections after 0.2 s; requests come 0.5 s apart, so each
        # later one finds its pooled connection closed and retries on a new one.
        with simlib.Sim("--time-scale", "0.01", "--keepalive-timeout", "0.2", duration=30) as sim:
            s, _, _ = run_bench("--synthetic", "requests=3,rate=2,arrival=fixed,input=16,output=2",
                                "--target", "http://127.0.0.1:%d" % sim.port())
        self.assertEqual(s["requests"]["ok"], 3)
        self.assertEqual(s["requests"]["connections_opened"], 3)

    def test_interrupt_writes_a_partial_summary(self):
        with simlib.Sim("--time-scale", "0.01", duration=30) as sim, \
                tempfile.TemporaryDirectory() as d:
            summary = os.path.join(d, "s.json")
            p = subprocess.Popen([BENCH, "--synthetic", "requests=100,rate=20,arrival=fixed,"
                                  "input=16,output=2", "--summary", summary,
                                  "--target", "http://127.0.0.1:%d" % sim.port()],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(0.5)
            p.send_signal(signal.SIGINT)
            p.communicate(timeout=10)
            self.assertEqual(p.returncode, 128 + signal.SIGINT)
            with open(summary) as f:
                s = json.load(f)
        self.assertTrue(s["interrupted"])
        req = s["requests"]
        self.assertTrue(0 < req["sent"] < 100, req)
        self.assertEqual(req["sent"] + req["not_sent"], 100)

    def test_unreachable_target(self):
        port = simlib.free_port()
        s, rows, _ = run_bench("--synthetic", "requests=3,rate=100,input=8,output=2",
                               "--target", "http://127.0.0.1:%d" % port)
        self.assertEqual(s["requests"]["errors_by_kind"], {"connect": 3})
        self.assertTrue(rows[0]["error"].startswith("connect: "))

    def test_bad_command_lines_and_traces(self):
        _, _, p = run_bench("--synthetic", "requests=3,rate=1", "--target", "http://x",
                            expect_status=2)
        self.assertIn("--target", p.stderr)
        _, _, p = run_bench("--synthetic", "requests=3,rate=1,colour=red", "--dry-run",
                            expect_status=2)
        self.assertIn('unknown key "colour"', p.stderr)
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl") as f:
            f.write('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n')
            f.write('{"timestamp": 5, "input_length": 10}\n')
            f.flush()
            _, _, p = run_bench("--trace", "mooncake:" + f.name, "--dry-run", expect_status=1)
            self.assertIn(f.name + ":2: missing \"output_length\"", p.stderr)
            s, _, _ = run_bench("--trace", "mooncake:" + f.name, "--dry-run", "--skip-bad-lines")
            self.assertEqual((s["trace"]["requests"], s["trace"]["skipped_lines"]), (1, 1))

    def test_dry_run_sends_nothing(self):
        path = trace_path("mooncake_synthetic_trace.jsonl")
        s, rows, _ = run_bench("--trace", "mooncake:" + path, "--dry-run",
                               "--oracle-capacity-blocks", 1000000)
        self.assertTrue(s["dry_run"])
        self.assertEqual(s["workload"]["requests"], 3993)
        self.assertAlmostEqual(s["workload"]["span_s"], 1022.025)
        self.assertAlmostEqual(s["workload"]["input_tokens"]["mean"], 15325.48, places=1)
        # 64% of the block references repeat an earlier block (the trace's own figure).
        self.assertAlmostEqual(s["workload"]["repeat_token_fraction"], 0.65, delta=0.02)
        self.assertTrue(0.4 < s["oracle_hit_rate"] <= s["workload"]["repeat_token_fraction"])
        self.assertEqual(rows, [])


class ReplayOpenLoop(unittest.TestCase):
    """Requests due faster than one connection serves them: late starts are reported, not
    hidden by serialising the schedule."""

    # Due every 2 ms; served one at a time, each takes about 12 ms.
    FAST = "requests=20,rate=500,arrival=fixed,input=32,output=60"

    @classmethod
    def setUpClass(cls):
        # 10x faster than real time: 60 output tokens take about 60 x 0.2 ms = 12 ms.
        cls.sim = simlib.Sim("--profile", "fast", "--time-scale", "0.1", duration=60)
        cls.target = "http://127.0.0.1:%d" % cls.sim.port()

    @classmethod
    def tearDownClass(cls):
        cls.sim.stop()

    def test_concurrency_cap_reports_late_starts(self):
        s, rows, _ = run_bench("--synthetic", self.FAST,
                               "--max-concurrency", 1, "--time-scale", 0.1,
                               "--target", self.target)
        req = s["requests"]
        self.assertEqual(req["ok"], 20)
        self.assertGreaterEqual(req["late"], 15)
        self.assertGreaterEqual(req["waited_for_slot"], 15)
        self.assertGreater(req["lateness_ms"]["max"], 100)  # wall ms
        self.assertGreater(req["lateness_ms"]["p99"], req["lateness_ms"]["p50"])
        # The schedule was 38 ms long; the run took the serial time.
        self.assertGreater(s["wall_duration_s"], 0.2)
        for r in rows:
            start, scheduled = float(r["start_s"]), float(r["scheduled_s"])
            self.assertAlmostEqual(float(r["lateness_ms"]), (start - scheduled) * 1000, delta=0.01)
        self.assertAlmostEqual(float(rows[1]["scheduled_s"]), 0.002, places=6)

    def test_max_lateness_drops_requests(self):
        s, rows, _ = run_bench("--synthetic", self.FAST,
                               "--max-concurrency", 1, "--max-lateness", 30, "--time-scale", 0.1,
                               "--target", self.target)
        req = s["requests"]
        self.assertGreater(req["dropped"], 5)
        self.assertEqual(req["sent"] + req["dropped"], 20)
        self.assertEqual(req["ok"], req["sent"])
        self.assertLessEqual(req["lateness_ms"]["max"], 30 + 5)
        self.assertEqual(sum(r["outcome"] == "dropped" for r in rows), req["dropped"])
        self.assertLess(s["goodput"]["fraction"], 1)

    def test_no_cap_starts_on_time(self):
        s, _, _ = run_bench("--synthetic", self.FAST, "--late-threshold", 50,
                            "--time-scale", 0.1, "--target", self.target)
        req = s["requests"]
        self.assertEqual(req["ok"], 20)
        self.assertEqual(req["waited_for_slot"], 0)
        # Late (50 ms behind, where the capped run is 100 ms and more) only when this machine
        # stalls the client: a sanitizer build next to other jobs on the 2 cores made 14 of 20
        # starts more than 5 ms late once.
        self.assertLess(req["late"], 10)


if __name__ == "__main__":
    unittest.main()
