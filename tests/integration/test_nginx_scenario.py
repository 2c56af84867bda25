"""bench/scenario.py, the routing-scenario driver, end to end on a tiny slice: it starts the
omni-sim P/D cluster and nginx per system, replays a 20 s Mooncake slice with omni-bench, and
writes results.json, report.md and the plots; bench/miss_analysis.py then reads the kv_aware
run. Keeps the benchmark's commands from rotting; the figures themselves are for
docs/benchmarks.md, not asserted here beyond sanity."""
import json
import os
import shutil
import subprocess
import tempfile
import unittest

SOURCE = os.environ.get("OMNI_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY = os.environ.get("OMNI_BINARY_DIR", "")


class ScenarioTest(unittest.TestCase):
    def test_quick_scenario_runs_every_system_and_reports(self):
        if not os.path.exists(os.path.join(BINARY, "nginx-build", "objs",
                                           "ngx_http_omni_proxy_module.so")):
            raise unittest.SkipTest("needs the module build (OMNI_BINARY_DIR)")
        out = tempfile.mkdtemp(prefix="omni-scenario-test-")
        try:
            systems = "omni,round_robin,hash_prefix,sglang_cache_aware,omni_kv"
            r = subprocess.run(["/usr/bin/python3", os.path.join(SOURCE, "bench", "scenario.py"),
                                "--build", BINARY, "--quick", "--traces", "mooncake",
                                "--systems", systems, "--out", out],
                               capture_output=True, text=True, timeout=240)
            self.assertEqual(r.returncode, 0, r.stderr[-3000:])
            with open(os.path.join(out, "results.json")) as f:
                results = json.load(f)
            runs = results["runs"]
            self.assertEqual(sorted(x["system"] for x in runs), sorted(systems.split(",")))
            for run in runs:
                s = run["summary"]
                self.assertEqual(s["requests"]["errors"], 0, (run["system"], s["error_samples"]))
                self.assertEqual(s["requests"]["ok"], s["requests"]["scheduled"])
                self.assertEqual(s["nginx_bad_log_lines"], [])
                # Every answer named its servers, and all four prefill instances served.
                self.assertEqual(s["peers"]["prefill"]["absent"], 0)
                self.assertEqual(len(s["peers"]["prefill"]["counts"]), 4, run["system"])
                self.assertGreaterEqual(s["prefill_hit_rate"], 0.0)
            self.assertGreater(results["oracles"]["mooncake"]["oracle_hit_rate"], 0.0)
            with open(os.path.join(out, "report.md")) as f:
                report = f.read()
            self.assertIn("SGLang cache-aware rule (re-implemented)", report)
            for name in ("ttft_cdf_mooncake.svg", "load_mooncake.svg", "hit_rate_mooncake.svg"):
                self.assertTrue(os.path.getsize(os.path.join(out, name)) > 1000, name)
            # The lost-hit analysis of the kv_aware run: its hit rate is the engines' (from
            # decisions.log), and the causes add up to the loss.
            run_dir = os.path.join(out, "mooncake", "x1", "omni_kv", "r0")
            r = subprocess.run(["/usr/bin/python3", os.path.join(SOURCE, "bench", "miss_analysis.py"),
                                run_dir, "--window-s", "20"],
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(r.returncode, 0, r.stderr)
            lines = r.stdout.strip().splitlines()
            # Its LRU bound over the whole window is omni-bench's oracle, computed apart.
            whole = float(lines[0].rsplit(" ", 1)[1].rstrip("%"))
            self.assertAlmostEqual(whole, 100 * results["oracles"]["mooncake"]["oracle_hit_rate"],
                                   delta=0.15)
            line = lines[-1].split()
            hit, reuse, lost, causes = (float(line[1].rstrip("%")), float(line[2].rstrip("%")),
                                        float(line[3]), [float(x) for x in line[4:7]])
            kv_run = next(x for x in runs if x["system"] == "omni_kv")
            self.assertAlmostEqual(hit, 100 * kv_run["summary"]["prefill_hit_rate"], delta=0.6)
            self.assertGreater(reuse, 0)
            self.assertGreaterEqual(lost, 0)
            self.assertAlmostEqual(sum(causes), lost, delta=0.02)
            # The bound over the served requests: at most what they could reuse at all.
            served_bound = float(line[7].rstrip("%"))
            self.assertGreater(served_bound, 0)
            self.assertLessEqual(served_bound, reuse + 1.0)
        finally:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
