"""README command 1's demo (scripts/demo.sh) runs unattended and answers a streamed chat
request through the OpenAI SDK and a P/D round. Set-up and build are skipped here: ctest has
just built everything."""
import json
import os
import subprocess
import unittest

from simlib import SOURCE_DIR, free_port


class DemoTest(unittest.TestCase):
    def test_demo_runs_and_answers(self):
        build_dir = os.environ.get("OMNI_BINARY_DIR")
        if not build_dir:
            raise unittest.SkipTest("OMNI_BINARY_DIR is not set; run through ctest")
        env = dict(os.environ, OMNI_BUILD_DIR=build_dir, OMNI_DEMO_SECONDS="0",
                   OMNI_DEMO_PREFILL_PORT=str(free_port(2)), OMNI_DEMO_DECODE_PORT=str(free_port(2)))
        r = subprocess.run(["bash", os.path.join(SOURCE_DIR, "scripts", "demo.sh"), "--no-setup",
                            "--no-build"], env=env, capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        lines = r.stdout.splitlines()
        sdk = json.loads(next(l for l in lines if l.startswith('{"chunks"')))
        self.assertEqual(sdk["chunks"], 24)
        self.assertEqual(sdk["usage"]["completion_tokens"], 24)
        self.assertTrue(any(l.startswith("P/D round done") for l in lines), r.stdout)
        self.assertTrue(any(l.startswith("prefill: 200") for l in lines), r.stdout)


if __name__ == "__main__":
    unittest.main()
