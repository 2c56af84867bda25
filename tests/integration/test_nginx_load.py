"""Debian's nginx with the module under load, in front of omni-sim processes:

- `n > 1` in sequential (vLLM P/D) and aggregated locations, streamed and not;
- 500 concurrent streams through a sequential location, every one a complete, well-formed SSE
  stream of its own request;
- `nginx -s reload` while 60 streams run and new requests keep coming: nothing is lost, old
  streams finish on the old workers, which then exit, and the shared zone survives.

nginx runs 2 workers. Clients are asyncio with raw sockets (HTTP/1.1, chunked decoding checked),
every read bounded by a timeout. Every error.log must stay free of [error], [crit], [alert] and
[emerg] lines.
"""
import asyncio
import json
import os
import re
import resource
import signal
import time
import unittest

from simlib import Sim, free_port, metric, metrics, post, wait_until, port_open
from test_nginx_module import Nginx

ERROR_LEVELS = re.compile(r"\[(error|crit|alert|emerg)\]")
WORKER_CONNECTIONS = 4096
NOFILE = 16384


class LoadNginx(Nginx):
    """The test helper's nginx with room for thousands of connections per worker."""

    def render(self, body):
        text = super().render(body)
        events = "events { worker_connections 256; }"
        if events not in text:
            raise AssertionError("Nginx.render() changed; update LoadNginx: " + text)
        # Never more than the hard limit: an unprivileged master could not raise it.
        nofile = raise_nofile(NOFILE)
        if nofile == resource.RLIM_INFINITY:
            nofile = NOFILE
        return text.replace(events, "worker_rlimit_nofile %d;\nevents { worker_connections %d; }"
                            % (nofile, WORKER_CONNECTIONS))

    def master_pid(self):
        with open(os.path.join(self.dir, "nginx.pid")) as f:
            return int(f.read().strip())

    def workers(self):
        """{pid: title} of the master's worker processes."""
        master = self.master_pid()
        out = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % entry) as f:
                    stat = f.read()
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])
                if ppid != master:
                    continue
                with open("/proc/%s/cmdline" % entry, "rb") as f:
                    title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, ValueError):
                continue
            if "worker process" in title:
                out[int(entry)] = title
        return out

    def cleanup(self):
        """Nginx.cleanup (a graceful quit), then SIGKILL for whatever of this nginx is left."""
        try:
            master = self.master_pid()
            workers = list(self.workers())
        except (OSError, ValueError):
            master, workers = None, []
        super().cleanup()
        if master is None:
            return
        for pid in [master] + workers:
            try:
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    if not f.read().startswith(b"nginx:"):
                        continue
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def error_lines(self):
        if not os.path.exists(self.error_log):
            return []
        with open(self.error_log) as f:
            return [line for line in f if ERROR_LEVELS.search(line)]


def raise_nofile(want):
    """Raises this process's soft open-file limit (inherited by omni-sim and nginx); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def config(prefill_ports, decode_ports, agg_ports=None, agg_listen=None, timeout="30s"):
    servers = lambda ports: "\n".join("        server 127.0.0.1:%d max_fails=0;" % p for p in ports)
    text = """
    omni_proxy_zone omni 4m;
    upstream prefill {{
{prefill}
        keepalive 64;
    }}
    upstream decode {{
{decode}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:PORT backlog=4096;
        omni_proxy_connect_timeout 5s;
        omni_proxy_prefill_timeout {timeout};
        omni_proxy_decode_timeout {timeout};
        location /v1/ {{
            omni_proxy;
            omni_proxy_mode sequential;
            omni_proxy_prefill_upstream prefill;
            omni_proxy_decode_upstream decode;
        }}
        location = /omni/status {{
            omni_proxy_status;
        }}
    }}
""".format(prefill=servers(prefill_ports), decode=servers(decode_ports), timeout=timeout)
    if agg_ports:
        text += """
    upstream agg {{
{agg}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{listen};
        omni_proxy_decode_timeout {timeout};
        location /v1/ {{
            omni_proxy;
            omni_proxy_mode aggregated;
            omni_proxy_upstream agg;
        }}
    }}
""".format(agg=servers(agg_ports), listen=agg_listen, timeout=timeout)
    return text




# --- an HTTP/1.1 client on raw asyncio streams -----------------------------------------------

class Result:
    def __init__(self):
        self.status = None
        self.headers = {}
        self.body = b""
        self.error = None      # a transport or framing problem, as text
        self.t_start = time.monotonic()
        self.t_first_data = None
        self.t_end = None

    def json(self):
        return json.loads(self.body)


async def fetch(port, method, path, body=None, headers=None, timeout=30.0, first_data=None):
    """One request on its own connection (Connection: close). The body is read strictly: chunked
    framing must be valid and complete, Content-Length must match. Never raises: problems are in
    `error`. `first_data` (an asyncio.Event) is set when the first body bytes arrive."""
    res = Result()
    writer = None
    chunks = []
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            payload = b"" if body is None else json.dumps(body).encode()
            head = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1", "Connection: close"]
            if body is not None:
                head += ["Content-Type: application/json", "Content-Length: %d" % len(payload)]
            head += ["%s: %s" % kv for kv in (headers or {}).items()]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
            await writer.drain()
            raw = await reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
                raise ValueError("bad status line %r" % lines[0])
            res.status = int(parts[1])
            for line in lines[1:]:
                if line:
                    k, v = line.split(":", 1)
                    res.headers[k.strip().lower()] = v.strip()

            def got(data):
                if data and res.t_first_data is None:
                    res.t_first_data = time.monotonic()
                    if first_data is not None:
                        first_data.set()
                chunks.append(data)

            if res.headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";")[0].strip(), 16)
                    if size == 0:
                        if await reader.readuntil(b"\r\n") != b"\r\n":
                            raise ValueError("trailers after the last chunk")
                        break
                    got(await reader.readexactly(size))
                    if await reader.readexactly(2) != b"\r\n":
                        raise ValueError("chunk not followed by CRLF")
            elif "content-length" in res.headers:
                got(await reader.readexactly(int(res.headers["content-length"])))
            else:
                got(await reader.read())
    except TimeoutError:
        res.error = "timed out after %.1f s" % timeout
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        res.error = "%s: %s" % (type(e).__name__, e)
    finally:
        res.t_end = time.monotonic()
        res.body = b"".join(chunks)
        if res.error:
            res.error += " (status %s, %d body bytes)" % (res.status, len(res.body))
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2)
            except (OSError, TimeoutError):
                pass
    return res


def stream_problems(res, request_id, expected_id, max_tokens, chat):
    """Why `res` is not a complete, well-formed SSE stream of `max_tokens` tokens of the request
    sent with X-Request-Id `request_id`, whose chunks carry `expected_id`, with usage (an empty
    list when it is)."""
    if res.error:
        return ["transport: " + res.error]
    if res.status != 200:
        return ["status %s: %r" % (res.status, res.body[:300])]
    problems = []
    if not res.headers.get("content-type", "").startswith("text/event-stream"):
        problems.append("content-type %r" % res.headers.get("content-type"))
    if res.headers.get("x-request-id") != request_id:
        problems.append("X-Request-Id %r" % res.headers.get("x-request-id"))
    text = res.body.decode("utf-8", "replace")
    if not text.endswith("data: [DONE]\n\n"):
        problems.append("does not end with data: [DONE]: %r" % text[-200:])
    blocks = text.split("\n\n")
    if blocks[-1] != "":
        problems.append("trailing bytes after the last event: %r" % blocks[-1][:100])
    events = []
    for block in blocks[:-1]:
        if not block.startswith("data: ") or "\n" in block:
            problems.append("malformed event %r" % block[:200])
            continue
        events.append(block[len("data: "):])
    if not events or events[-1] != "[DONE]" or events.count("[DONE]") != 1:
        problems.append("[DONE] is not the single last event")
        return problems
    tokens = 0
    finishes = []
    usage = []
    for e in events[:-1]:
        try:
            j = json.loads(e)
        except ValueError:
            problems.append("event is not JSON: %r" % e[:200])
            continue
        if "error" in j:
            problems.append("error event: %r" % e[:300])
            continue
        if j.get("id") != expected_id:
            problems.append("id %r, expected %r" % (j.get("id"), expected_id))
        if j.get("usage"):
            usage.append(j["usage"])
        for c in j.get("choices", []):
            if c.get("index") != 0:
                problems.append("choice index %r" % c.get("index"))
            piece = c.get("delta", {}).get("content") if chat else c.get("text")
            if piece:
                tokens += 1
            if c.get("finish_reason"):
                finishes.append(c["finish_reason"])
    if tokens != max_tokens:
        problems.append("%d token chunks, expected %d" % (tokens, max_tokens))
    if finishes != ["length"]:
        problems.append("finish reasons %r" % finishes)
    if len(usage) != 1 or usage[0].get("completion_tokens") != max_tokens:
        problems.append("usage %r" % usage)
    return problems


def stream_body(i, max_tokens, chat):
    prompt = "Request %d asks about prefill and decode disaggregation, block %d." % (i, i * 7)
    body = {"model": "omni-sim", "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


async def run_stream(port, i, tag, max_tokens, timeout, first_data=None):
    """Streams request `i` (chat for odd i, completions for even i); returns (result, problems)."""
    chat = i % 2 == 1
    path, body = stream_body(i, max_tokens, chat)
    rid = "%s-%d" % (tag, i)
    res = await fetch(port, "POST", path, body, {"X-Request-Id": rid}, timeout, first_data)
    expected = ("chatcmpl-" if chat else "cmpl-") + rid
    return res, stream_problems(res, rid, expected, max_tokens, chat)


class _NginxCase(unittest.TestCase):
    """Starts sims and an nginx per test; stops them all after it and checks error.log."""

    def setUp(self):
        self.sims = []
        self.nginx = None
        # A cleanup, not tearDown: it also runs when setUp fails half-way.
        self.addCleanup(self.stop_all)

    def sim(self, *args, **kw):
        s = Sim(*args, **kw)
        self.sims.append(s)
        return s

    def start_nginx(self, conf, *ports):
        self.nginx = LoadNginx(conf)
        r = self.nginx.run()
        self.assertEqual(r.returncode, 0, r.stderr)
        for p in (self.nginx.port,) + ports:
            self.assertTrue(wait_until(lambda: port_open(p), 10), "nginx does not listen on %d" % p)
        self.assertTrue(wait_until(lambda: len(self.nginx.workers()) == 2, 10),
                        self.nginx.workers())

    def assert_all_complete(self, results, what):
        """`results` are run_stream() answers; every one must be a complete stream."""
        failures = [{"i": i, "problems": p} for i, (_, p) in enumerate(results) if p]
        if failures:
            self.fail("%s: %d of %d failed; first: %s" % (
                what, len(failures), len(results), json.dumps(failures[:5], indent=1)))

    def stop_all(self):
        errors = []
        try:
            if self.nginx is not None:
                errors = self.nginx.error_lines()
                self.nginx.cleanup()
        finally:
            sim_problems = []
            for s in self.sims:
                try:
                    s.stop()
                except AssertionError as e:  # an exit status or sanitizer report
                    sim_problems.append(str(e))
        if errors or sim_problems:
            self.fail("\n".join(sim_problems) + "\nerror.log:\n" + "".join(errors[:20]))


# --- n > 1 ------------------------------------------------------------------------------------

class NginxNChoicesTest(_NginxCase):
    """`n > 1` through both modes, streamed and not: every choice index is there with its own
    tokens, and usage sums them; invalid `n` is refused by the proxy itself."""

    N = 3
    MAX_TOKENS = 4

    def setUp(self):
        super().setUp()
        self.agg = self.sim("--engine", "vllm")
        self.prefill = self.sim("--engine", "vllm", "--role", "prefill")
        self.decode = self.sim("--engine", "vllm", "--role", "decode")
        self.agg_listen = free_port()
        self.start_nginx(config([self.prefill.port()], [self.decode.port()], [self.agg.port()],
                                self.agg_listen, "20s"), self.agg_listen)

    def cases(self):
        for mode, port in (("sequential", self.nginx.port), ("aggregated", self.agg_listen)):
            for chat in (False, True):
                for stream in (False, True):
                    body = {"model": "omni-sim", "max_tokens": self.MAX_TOKENS, "n": self.N,
                            "stream": stream}
                    if chat:
                        path = "/v1/chat/completions"
                        body["messages"] = [{"role": "user", "content": "several answers"}]
                    else:
                        path = "/v1/completions"
                        body["prompt"] = "several answers please"
                    if stream:
                        body["stream_options"] = {"include_usage": True}
                    with self.subTest(mode=mode, chat=chat, stream=stream):
                        yield port, path, body, chat, stream

    def test_n_choices_all_present(self):
        for port, path, body, chat, stream in self.cases():
            r = post(port, path, body, timeout=20)
            self.assertEqual(r.status, 200, r.body[:500])
            if not stream:
                j = r.json()
                self.assertEqual(sorted(c["index"] for c in j["choices"]), list(range(self.N)))
                for c in j["choices"]:
                    self.assertEqual(c["finish_reason"], "length", c)
                self.assertEqual(j["usage"]["completion_tokens"], self.N * self.MAX_TOKENS, j)
                continue
            self.assertEqual(r.events()[-1], "[DONE]")
            per_index = {}
            finishes = {}
            for ev in r.json_events():
                self.assertNotIn("error", ev)
                for c in ev.get("choices", []):
                    piece = c.get("delta", {}).get("content") if chat else c.get("text")
                    per_index[c["index"]] = per_index.get(c["index"], 0) + (1 if piece else 0)
                    if c.get("finish_reason"):
                        finishes[c["index"]] = c["finish_reason"]
            self.assertEqual(sorted(per_index), list(range(self.N)), per_index)
            self.assertEqual(set(per_index.values()), {self.MAX_TOKENS}, per_index)
            self.assertEqual(finishes, {i: "length" for i in range(self.N)})

    def test_invalid_n_is_refused_by_the_proxy(self):
        before = metric(metrics(self.agg.port()), "omni_sim:requests_total") + \
            metric(metrics(self.prefill.port()), "omni_sim:requests_total")
        for port in (self.nginx.port, self.agg_listen):
            for n in (0, -1, "two", 1.5):
                with self.subTest(port=port, n=n):
                    r = post(port, "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": n},
                             timeout=10)
                    self.assertEqual(r.status, 400, r.body)
                    err = r.json()["error"]
                    self.assertEqual((err["code"], err["param"]), (400, "n"), err)
            # n = 1 and n = null are fine.
            for n in (1, None):
                r = post(port, "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": n},
                         timeout=10)
                self.assertEqual(r.status, 200, r.body)
                self.assertEqual([c["index"] for c in r.json()["choices"]], [0])
        after = metric(metrics(self.agg.port()), "omni_sim:requests_total") + \
            metric(metrics(self.prefill.port()), "omni_sim:requests_total")
        self.assertEqual(after - before, 4)  # only the four valid requests reached an engine


# --- 500 concurrent streams -------------------------------------------------------------------

class NginxConcurrentStreamsTest(_NginxCase):
    STREAMS = 500
    MAX_TOKENS = 40

    def setUp(self):
        super().setUp()
        limit = raise_nofile(NOFILE)
        if limit != resource.RLIM_INFINITY and limit < 4 * self.STREAMS:
            self.skipTest("open-file limit %d is too low for %d streams" % (limit, self.STREAMS))
        self.prefill = self.sim("--engine", "vllm", "--role", "prefill", "--instances", "2",
                                "--profile", "fast")
        # 2 x 256 sequences: every stream decodes at once rather than queueing in the engine.
        # --time-scale 3 stretches each stream to about a second so they really overlap.
        self.decode = self.sim("--engine", "vllm", "--role", "decode", "--instances", "2",
                               "--profile", "fast", "--max-num-seqs", "256", "--time-scale", "3")
        self.start_nginx(config([self.prefill.port(0), self.prefill.port(1)],
                                [self.decode.port(0), self.decode.port(1)]))

    def test_500_concurrent_streams(self):
        async def main():
            return await asyncio.gather(*(
                run_stream(self.nginx.port, i, "load", self.MAX_TOKENS, 60)
                for i in range(self.STREAMS)))

        t0 = time.monotonic()
        results = asyncio.run(main())
        elapsed = time.monotonic() - t0
        self.assert_all_complete(results, "streams")
        self.assertEqual(len(results), self.STREAMS)
        # They really ran at the same time: the most streams open at one instant.
        edges = sorted([(r.t_start, 1) for r, _ in results] + [(r.t_end, -1) for r, _ in results])
        open_now = peak = 0
        for _, d in edges:
            open_now += d
            peak = max(peak, open_now)
        self.assertGreaterEqual(peak, self.STREAMS * 0.8, "peak concurrency %d" % peak)
        # Each request ran exactly one prefill and one decode leg, and every KV the prefills
        # held was pulled.
        def total(sim, name):
            return sum(metric(metrics(sim.port(i)), name) for i in range(2))
        self.assertEqual(total(self.prefill, "omni_sim:requests_total"), self.STREAMS)
        self.assertEqual(total(self.decode, "omni_sim:requests_total"), self.STREAMS)
        self.assertEqual(total(self.decode, "omni_sim:kv_pulls_failed_total"), 0)
        self.assertTrue(wait_until(
            lambda: total(self.prefill, "omni_sim:kv_held_requests") == 0, 10))
        self.assertLess(elapsed, 60)


# --- reload under load ------------------------------------------------------------------------

class NginxReloadUnderLoadTest(_NginxCase):
    LONG_STREAMS = 60
    LONG_TOKENS = 120   # about 3 s at --time-scale 10 (2.6 ms steps at this load, times 10)
    SHORT_TOKENS = 6
    CHURN_CLIENTS = 4

    def setUp(self):
        super().setUp()
        raise_nofile(NOFILE)
        self.prefill = self.sim("--engine", "vllm", "--role", "prefill", "--profile", "fast")
        self.decode = self.sim("--engine", "vllm", "--role", "decode", "--profile", "fast",
                               "--time-scale", "10")
        self.start_nginx(config([self.prefill.port()], [self.decode.port()]))

    async def status(self):
        r = await fetch(self.nginx.port, "GET", "/omni/status", timeout=5)
        if r.error or r.status != 200:
            return None
        return r.json()

    async def wait_for(self, predicate, timeout, interval=0.05):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await predicate():
                return True
            await asyncio.sleep(interval)
        return False

    def test_reload_while_streaming(self):
        port = self.nginx.port
        old_workers = set(self.nginx.workers())
        self.assertEqual(len(old_workers), 2)
        marks = {}

        async def main():
            first = await self.status()
            self.assertIsNotNone(first)
            self.assertEqual(first["zone"]["name"], "omni")
            marks["gen0"] = first["zone"]["generation"]

            started = [asyncio.Event() for _ in range(self.LONG_STREAMS)]
            long_tasks = [asyncio.create_task(
                run_stream(port, i, "long", self.LONG_TOKENS, 60, started[i]))
                for i in range(self.LONG_STREAMS)]
            # Every long stream is flowing (on an old worker) before the reload.
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 20)

            stop = asyncio.Event()
            churn = []

            async def churner(c):
                k = 0
                while not stop.is_set():
                    i = 2 * (1000 * c + k) + (k % 2)
                    k += 1
                    churn.append(await run_stream(port, i, "churn", self.SHORT_TOKENS, 30))

            churners = [asyncio.create_task(churner(c)) for c in range(self.CHURN_CLIENTS)]
            await asyncio.sleep(0.3)
            marks["reload"] = time.monotonic()
            r = await asyncio.to_thread(self.nginx.run, "-s", "reload")
            self.assertEqual(r.returncode, 0, r.stderr)

            async def new_generation():
                s = await self.status()
                return s is not None and s["zone"]["generation"] == marks["gen0"] + 1
            self.assertTrue(await self.wait_for(new_generation, 15), await self.status())
            marks["reloaded"] = time.monotonic()
            marks["status_after"] = await self.status()

            # The master tells the old workers to quit gracefully once the new ones run.
            async def old_ones_shutting_down():
                ws = self.nginx.workers()
                old = {p: t for p, t in ws.items() if p in old_workers}
                marks["workers_after"] = ws
                return bool(old) and all("shutting down" in t for t in old.values())
            marks["old_shutting_down"] = await self.wait_for(old_ones_shutting_down, 10)
            marks["long_open_after_reload"] = sum(1 for t in long_tasks if not t.done())
            # Keep sending new requests to the new workers for a while.
            await asyncio.sleep(1.5)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*churners), 40)
            long_results = await asyncio.wait_for(asyncio.gather(*long_tasks), 60)
            marks["all_done"] = time.monotonic()
            return long_results, churn

        long_results, churn = asyncio.run(main())

        # The reload happened while every long stream was still running.
        self.assertEqual(marks["long_open_after_reload"], self.LONG_STREAMS)
        self.assert_all_complete(long_results, "long streams")
        for res, _ in long_results:
            self.assertGreater(res.t_end, marks["reloaded"])
        self.assert_all_complete(churn, "new requests")
        after = [r for r, _ in churn if r.t_start >= marks["reloaded"]]
        self.assertGreaterEqual(len(after), self.CHURN_CLIENTS, "too few requests after reload")

        # New workers took over; the old ones were shutting down gracefully while their
        # streams ran, and exit once those are done.
        workers_after = marks["workers_after"]
        self.assertTrue(marks["old_shutting_down"],
                        "old workers %r, after the reload: %r" % (old_workers, workers_after))
        self.assertTrue(wait_until(lambda: not (set(self.nginx.workers()) & old_workers), 10),
                        "old workers did not exit: %r" % self.nginx.workers())
        self.assertEqual(len(self.nginx.workers()), 2, self.nginx.workers())

        # The zone survived the reload: same zone, generation one more.
        s = marks["status_after"]
        self.assertEqual(s["zone"]["name"], "omni")
        self.assertEqual(s["zone"]["size"], 4 * 1024 * 1024)
        self.assertEqual(s["zone"]["generation"], marks["gen0"] + 1)
        # (An old worker may answer that first status: the generation lives in the zone, which
        # old and new workers share.) Once the old workers are gone, a new one answers.
        final = asyncio.run(self.status())
        self.assertIsNotNone(final)
        self.assertEqual(final["zone"]["generation"], marks["gen0"] + 1)
        self.assertNotIn(final["pid"], old_workers)
        self.assertIn(final["pid"], set(self.nginx.workers()))

        # And the proxy still works on the new workers alone.
        res, problems = asyncio.run(run_stream(self.nginx.port, 1, "final", 3, 20))
        self.assertEqual(problems, [])
        # No request was lost or run twice: one prefill and one decode leg each.
        sent = self.LONG_STREAMS + len(churn) + 1
        self.assertEqual(metric(metrics(self.prefill.port()), "omni_sim:requests_total"), sent)
        self.assertEqual(metric(metrics(self.decode.port()), "omni_sim:requests_total"), sent)


if __name__ == "__main__":
    unittest.main()
