"""README command 1's demo (scripts/demo.sh) runs unattended: omni-sim prefill and decode
instances behind Debian's nginx with the module in sequential (vLLM P/D) mode. The OpenAI SDK's
streamed chat and the completions requests go through nginx, the status page answers, both
prefill and both decode instances serve requests, and everything stops when the demo ends.
Set-up and build are skipped here: ctest has just built everything."""
import json
import os
import re
import signal
import subprocess
import unittest

from simlib import MODULE_SO, SOURCE_DIR, free_port, port_open

SERVED = re.compile(r"^served: (prefill|decode)\s+127\.0\.0\.1:(\d+) requests=(\d+) "
                    r"(kv_pulls_served|kv_blocks_received)=(\d+)$")


def disjoint_ports():
    """nginx's port and the first of two consecutive ports for each role, all different."""
    for _ in range(50):
        nginx, prefill, decode = free_port(), free_port(2), free_port(2)
        used = [nginx, prefill, prefill + 1, decode, decode + 1]
        if len(set(used)) == len(used):
            return nginx, prefill, decode
    raise RuntimeError("no disjoint free ports")




class DemoTest(unittest.TestCase):
    def run_demo(self, env):
        # Its own session, so a demo that hangs can be stopped with everything it started.
        proc = subprocess.Popen(["bash", os.path.join(SOURCE_DIR, "scripts", "demo.sh"),
                                 "--no-setup", "--no-build"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # its trap stops nginx and omni-sim
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
            self.fail("the demo did not finish in 180 s:\n" + out + err)
        return proc.returncode, out, err

    def test_demo_runs_through_nginx(self):
        build_dir = os.environ.get("OMNI_BINARY_DIR")
        if not build_dir:
            raise unittest.SkipTest("OMNI_BINARY_DIR is not set; run through ctest")
        if not MODULE_SO:
            raise unittest.SkipTest("OMNI_MODULE_SO is not set: this build has no nginx module")
        nginx_port, prefill_port, decode_port = disjoint_ports()
        env = dict(os.environ, OMNI_BUILD_DIR=build_dir, OMNI_DEMO_SECONDS="0",
                   OMNI_DEMO_PORT=str(nginx_port), OMNI_DEMO_PREFILL_PORT=str(prefill_port),
                   OMNI_DEMO_DECODE_PORT=str(decode_port))
        rc, out, err = self.run_demo(env)
        report = out + err
        self.assertEqual(rc, 0, report)
        lines = out.splitlines()
        self.assertIn("demo: nginx with omni_proxy on 127.0.0.1:%d" % nginx_port, out)

        # The SDK's streamed chat: every chunk and the usage came back through nginx.
        chat = json.loads(next(l for l in lines if l.startswith('{"chunks"')))
        self.assertEqual(chat["chunks"], 24, report)
        self.assertEqual(chat["usage"]["completion_tokens"], 24, report)

        # The completions, streamed and not; the client's X-Request-Id reached the decode leg.
        summaries = {j["request"]: j for j in
                     (json.loads(l) for l in lines if l.startswith('{"request"'))}
        stream = summaries["completions, streamed"]
        self.assertEqual(stream["chunks"], 16, report)
        self.assertEqual(stream["usage"]["completion_tokens"], 16, report)
        self.assertTrue(stream["id"].startswith("cmpl-demo-stream-"), report)
        whole = summaries["completions, not streamed"]
        self.assertEqual(whole["usage"]["completion_tokens"], 8, report)
        self.assertEqual(whole["finish_reason"], "length", report)
        self.assertTrue(whole["id"].startswith("cmpl-demo-whole-"), report)

        # nginx's status page.
        at = lines.index("== GET /omni/status ==")
        status = json.loads(lines[at + 1])
        self.assertEqual(status["zone"]["name"], "omni", report)
        self.assertGreater(status["slots"]["capacity"], 50000, report)
        self.assertEqual(status["slots"]["used"], 0, report)
        self.assertTrue(status["version"], report)

        # Each omni-sim instance's own counters: the three client requests each ran a prefill
        # leg and a decode leg (which pulled the prefill's KV), spread over both instances of
        # each pool. Talking to a decode instance directly would leave the prefills idle.
        served = {}
        for l in lines:
            m = SERVED.match(l)
            if m:
                served[(m.group(1), int(m.group(2)))] = (int(m.group(3)), int(m.group(5)))
        self.assertEqual(sorted(served), [("decode", decode_port), ("decode", decode_port + 1),
                                          ("prefill", prefill_port),
                                          ("prefill", prefill_port + 1)], report)
        for (role, port), (requests, _) in served.items():
            self.assertGreaterEqual(requests, 1, "%s %d served nothing\n%s" % (role, port, report))
        by_role = lambda role, k: sum(v[k] for (r, _), v in served.items() if r == role)
        self.assertEqual(by_role("prefill", 0), 3, report)
        self.assertEqual(by_role("decode", 0), 3, report)
        self.assertEqual(by_role("prefill", 1), 3, report)  # every decode pulled its KV
        self.assertGreater(by_role("decode", 1), 0, report)

        # nginx logged the SDK's request, answered by a decode instance.
        self.assertRegex(out, r'"POST /v1/chat/completions HTTP/1\.1" 200 \d+ [\d.]+ s '
                              r'prefill=127\.0\.0\.1:(%d|%d) decode=127\.0\.0\.1:(%d|%d) '
                              r'ttft_ms=[\d.]+ tpot_ms=[\d.]+ tokens=\d+/24 '
                              r'stages_ms=received=[\d.]+,.*,done=1 '
                              r'forwarding=forwarded tokenize_ms=[\d.]+'
                         % (prefill_port, prefill_port + 1, decode_port, decode_port + 1))
        # The proxy tokenized every request once and sent the engines token ids.
        self.assertRegex(out, r'omni_proxy_token_forwarding_total\{result="forwarded"\} 3')
        # The proxy's own metrics counted the requests per instance.
        self.assertRegex(out, r'omni_proxy_backend_requests_total\{pool="decode",'
                              r'backend="127\.0\.0\.1:\d+"\} [1-9]')
        self.assertRegex(out, r'omni_proxy_ttft_seconds_count [2-9]')

        # The demo stopped nginx and omni-sim on its way out.
        for port in (nginx_port, prefill_port, prefill_port + 1, decode_port, decode_port + 1):
            self.assertFalse(port_open(port), "port %d still listens after the demo" % port)


if __name__ == "__main__":
    unittest.main()
