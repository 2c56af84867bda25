#!/usr/bin/python3
"""Routing scenarios: the same omni-sim P/D cluster and the same trace, replayed by omni-bench
through nginx with our module and through every baseline, in one run, repeated, with plots.

For each trace, repeat and offered load, every system gets a fresh cluster (4 vLLM prefill and
4 vLLM decode instances of the calibrated DeepSeek-V3 H800 profiles, time-scaled), a fresh
nginx (2 workers, sequential P/D) configured for it, and the same slice of the trace. The
systems differ only in who chooses each leg's server:

  round_robin         nginx's weighted round robin (omni_proxy_policy upstream; shared zone)
  least_conn          nginx least_conn (shared zone)
  random_two          nginx random two least_conn (shared zone)
  hash_prefix         nginx hash $omni_prefix_key consistent (first 256 prompt tokens)
  sglang_cache_aware  SGLang's cache-aware rule, re-implemented (omni_proxy_policy cache_aware)
  omni                our module's default policy (least outstanding, cache-blind)
  omni_kv             omni_proxy_policy kv_aware over the engines' KV events
  omni_kv_approx      omni_proxy_policy kv_aware, approximate mode (no events)
  omni_sched          the schedulers (omni_proxy_schedule) over the KV events: requests wait in
                      the proxy's shared queue and are released to the instance whose next batch
                      has room and whose expected completion is soonest; admission control
                      refuses what cannot start within the TTFT SLO (max_wait = the SLO)

Every engine publishes KV events in every run (equal engine cost); only omni_kv reads them.

The order of the systems rotates with each repeat, so drift on the shared machine does not
always hit the same one. Afterwards the engines' own counters give each run's prefix-cache hit
rate on the prefill instances (the one that saves prefill work), and the workload's ideal hit
rate (one shared cache of the cluster's total prefill capacity) is computed by omni-bench
--dry-run. Outputs, in --out: one folder per run (summary.json, requests.csv, nginx's
error.log and decisions.log: per request, both legs' servers, the prefill engine's predicted
and reported cached tokens and the route explanations), results.json, report.md (the tables)
and, with python3-matplotlib, the plots (SVG). --docs also copies the plots to docs/img/.

Traces: mooncake and azure (slices of the real traces in ../shared/data) and multitenant, a
synthetic multi-tenant shared-prefix workload (omni-bench --synthetic: 8 tenants' 2,048-token
system prompts, 32 users each, conversations of up to 4 turns).

A system BASE@K=V+K=V is BASE with parameters added to its policy line (omni_sched: its
omni_proxy_scheduler line; pending=: the omni_proxy_kv_cache lines): omni_kv@epsilon=0.25,
omni_sched@miss_weight=0, omni_kv@pending=off. bench/miss_analysis.py splits a run's lost hits
by cause.

usage: bench/scenario.py [--build DIR] [--out DIR] [--traces mooncake,azure,multitenant] [--systems ...]
                         [--loads 0.5,1,1.5] [--repeats 2] [--time-scale 0.1] [--docs] [--quick]
"""
import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

SOURCE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Port probing is shared with the integration tests (one implementation of "a block of free
# ports below the ephemeral range").
sys.path.insert(0, os.path.join(SOURCE, "tests", "integration"))
from simlib import free_port  # noqa: E402


# name: (label, upstream balancer, location policy, omni_proxy_kv_cache mode)
SYSTEMS = {
    "round_robin": ("nginx round robin", "", "omni_proxy_policy upstream;", None),
    "least_conn": ("nginx least_conn", "least_conn;", "", None),
    "random_two": ("nginx random two least_conn", "random two least_conn;", "", None),
    "hash_prefix": ("nginx hash $omni_prefix_key consistent", "hash $omni_prefix_key consistent;", "",
                    None),
    "sglang_cache_aware": ("SGLang cache-aware rule (re-implemented)", "",
                           "omni_proxy_policy cache_aware;", None),
    "omni": ("omni_proxy (least outstanding)", "", "", None),
    "omni_kv": ("omni_proxy kv_aware (KV events)", "", "omni_proxy_policy kv_aware;", "events"),
    "omni_kv_approx": ("omni_proxy kv_aware (approximate)", "", "omni_proxy_policy kv_aware;",
                       "approximate"),
    "omni_sched": ("omni_proxy scheduler (KV events)", "", "omni_proxy_schedule on;", "events"),
}


def scheduler_conf(system, time_scale, slo_ttft_ms):
    """The http-level scheduler directives of a system, in wall-clock units (model times x the
    time scale): the queue bound is the TTFT SLO, the step target a third of it (a request
    waits at most for the step in progress and its own); the cost-model defaults are the
    profile's (30 ms per step, ~28 ms per 1000 uncached tokens) until the instances are
    measured."""
    base, _, params = system.partition("@")
    if base != "omni_sched":
        return ""
    extra = "".join(" " + p for p in params.split("+")
                    if p and p.split("=")[0] not in KV_CACHE_PARAMS)
    wall = lambda ms: max(1, int(round(ms * time_scale)))  # noqa: E731
    return ("    omni_proxy_scheduler max_wait=%dms merge=1ms lead=1ms step=%dms per_ktoken=%dms "
            "batch_tokens=131072 step_target=%dms itl=%dms%s;\n"
            "    omni_proxy_capacity prefill batch_tokens=131072;\n"
            "    omni_proxy_capacity decode max_seqs=1024;\n"
            % (wall(slo_ttft_ms), wall(30), wall(28), wall(slo_ttft_ms / 3), wall(48), extra))
# Port layout of a run: HTTP ports from a base, KV-event PUB ports at +100, replay at +200
# (prefill instances first, decode instances from +10).
PUB_OFFSET, REPLAY_OFFSET = 100, 200

# Trace slices: (omni-bench trace spec, file under the data folder, start s, window s).
TRACES = {
    "mooncake": ("mooncake", "traces/mooncake_synthetic_trace.jsonl", 0, 240),
    "azure": ("azure", "traces/azure_code_trace.csv", 0, 200),
    # 240 s at 3.5 req/s: about Mooncake's rate, with more shared prefix.
    "multitenant": ("synthetic", "arrival=poisson,rate=3.5,input=lognormal:6000:0.6,"
                    "output=lognormal:250:0.6,prefixes=8,prefix_len=2048,users=32,turns=4", 0, 240),
}

PREFILL_PROFILE = "deepseek-v3-h800-prefill"
DECODE_PROFILE = "deepseek-v3-h800-decode"
PREFILL_BLOCKS = 32768  # the prefill profile's KV blocks per instance (docs/simulator.md)
BLOCK_SIZE = 64


def data_dir():
    for d in (os.environ.get("OMNI_DATA_DIR"), os.path.join(SOURCE, "..", "shared", "data"),
              "/work/shared/data"):
        if d and os.path.isdir(os.path.join(d, "traces")):
            return os.path.abspath(d)
    sys.exit("scenario: no trace folder; set OMNI_DATA_DIR to the folder holding traces/")


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError("timed out waiting for " + what)


class Sim:
    """One omni-sim process of `instances` instances."""

    def __init__(self, binary, run_dir, name, args, port=0):
        self.ready = os.path.join(run_dir, name + ".ready.json")
        self.log = open(os.path.join(run_dir, name + ".log"), "wb")
        events = ["--kv-events-port", str(port + PUB_OFFSET), "--kv-replay-port",
                  str(port + REPLAY_OFFSET)] if port else []
        self.proc = subprocess.Popen(
            [binary, "--port", str(port), "--ready-file", self.ready, "--duration", "3600"] +
            events + args,
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(self.ready) or self.proc.poll() is not None, 30,
                 "omni-sim " + name)
        if self.proc.poll() is not None:
            raise RuntimeError("omni-sim %s exited: see %s.log" % (name, name))
        with open(self.ready) as f:
            self.instances = json.load(f)["instances"]

    def ports(self):
        return [i["http_port"] for i in self.instances]

    def counters(self):
        """Sums of the engines' prefix-cache counters over the instances."""
        hits = queries = 0.0
        for port in self.ports():
            text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10).read()
            for line in text.decode().splitlines():
                if line.startswith("vllm:prefix_cache_hits_total"):
                    hits += float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:prefix_cache_queries_total"):
                    queries += float(line.rsplit(" ", 1)[1])
        return hits, queries

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# Parameters of omni_proxy_kv_cache rather than of the policy or the scheduler.
KV_CACHE_PARAMS = ("pending",)


def add_variant(name):
    """A system named BASE@K=V+K=V (e.g. omni_kv@epsilon=0) is BASE with those parameters added
    to its omni_proxy_policy line (omni_sched: to its omni_proxy_scheduler line; pending=: to
    its omni_proxy_kv_cache lines), so one run can compare a policy's settings."""
    if "@" not in name or name in SYSTEMS:
        return
    base, params = name.split("@", 1)
    if base not in SYSTEMS:
        sys.exit("scenario: %r: unknown system %r" % (name, base))
    label, balancer, policy, kv = SYSTEMS[base]
    split = [p for p in params.split("+") if p]
    cache = [p for p in split if p.split("=")[0] in KV_CACHE_PARAMS]
    own = [p for p in split if p not in cache]
    if cache:
        if kv != "events":
            sys.exit("scenario: %r: %s need a system reading KV events" % (name, " ".join(cache)))
        kv = " ".join([kv] + cache)
    label = "%s %s" % (label, " ".join(split))
    if base == "omni_sched" or not own:  # scheduler_conf() puts its parameters on its own line
        SYSTEMS[name] = (label, balancer, policy, kv)
        return
    if not policy.startswith("omni_proxy_policy "):
        sys.exit("scenario: %r: parameters need a system with an omni_proxy_policy line" % name)
    SYSTEMS[name] = (label, balancer, "%s %s;" % (policy.rstrip(";"), " ".join(own)), kv)


def nginx_conf(run_dir, module, port, system, prefill_ports, decode_ports, sched=""):
    _, balancer, policy, kv = SYSTEMS[system]
    kv_mode, _, kv_extra = (kv or "").partition(" ")
    if kv_mode == "events":
        kv_conf = "".join("    omni_proxy_kv_cache %s events pub_port_offset=%d replay_port_offset=%d%s;\n"
                          % (name, PUB_OFFSET, REPLAY_OFFSET, " " + kv_extra if kv_extra else "")
                          for name in ("prefill", "decode"))
    elif kv == "approximate":
        kv_conf = "".join("    omni_proxy_kv_cache %s approximate block_size=%d;\n" % (name, BLOCK_SIZE)
                          for name in ("prefill", "decode"))
    else:
        kv_conf = ""

    def upstream(name, ports):
        servers = "".join("        server 127.0.0.1:%d;\n" % p for p in ports)
        return ("    upstream %s {\n        %s\n        zone %s 256k;\n%s        keepalive 64;\n"
                "        keepalive_timeout 4s;\n"
                "    }\n" % (name, balancer, name, servers))
    kv_conf += sched

    return """load_module {module};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_processes 2;
events {{ worker_connections 8192; }}
http {{
    # One line per request: how each leg's server was chosen and what the prefill engine hit
    # (the per-request view behind the hit-rate column; kept with the run's results).
    log_format decisions '$omni_request_id\t$status\t$omni_prefill_peer\t$omni_decode_peer\t'
                         '$omni_predicted_cached_tokens\t$omni_cached_tokens\t'
                         '$omni_prefill_route\t$omni_decode_route';
    access_log {d}/decisions.log decisions;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    omni_proxy_zone omni 128m;
{prefill}{decode}{kv}    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location /v1/ {{
            omni_proxy;
            omni_proxy_mode sequential;
            omni_proxy_prefill_upstream prefill;
            omni_proxy_decode_upstream decode;
            omni_proxy_route_header on;
            {policy}
        }}
        location /omni/status {{ omni_proxy_status; }}
    }}
}}
""".format(module=module, d=run_dir, port=port, policy=policy, kv=kv_conf,
           prefill=upstream("prefill", prefill_ports), decode=upstream("decode", decode_ports))


class Nginx:
    def __init__(self, run_dir, conf):
        self.dir = run_dir
        os.makedirs(os.path.join(run_dir, "tmp"), exist_ok=True)
        os.chmod(run_dir, 0o755)
        os.chmod(os.path.join(run_dir, "tmp"), 0o777)
        self.conf = os.path.join(run_dir, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        r = subprocess.run(["/usr/sbin/nginx", "-p", run_dir, "-c", self.conf],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError("nginx did not start: " + r.stderr)
        self.pid_file = os.path.join(run_dir, "nginx.pid")
        wait_for(lambda: os.path.exists(self.pid_file) and os.path.getsize(self.pid_file) > 0,
                 10, "nginx")

    def stop(self):
        subprocess.run(["/usr/sbin/nginx", "-p", self.dir, "-c", self.conf, "-s", "quit"],
                       capture_output=True, timeout=30)
        wait_for(lambda: not os.path.exists(self.pid_file), 30, "nginx to quit")

    def bad_log_lines(self):
        path = os.path.join(self.dir, "error.log")
        if not os.path.exists(path):
            return []
        with open(path, errors="replace") as f:
            return [l for l in f if "[alert]" in l or "[crit]" in l or "[emerg]" in l]


def trace_args(trace, data, args):
    kind, path, start, window = TRACES[trace]
    window = args.window or window
    if kind == "synthetic":
        return ["--synthetic", "duration=%g,%s" % (window, path)]
    return ["--trace", "%s:%s" % (kind, os.path.join(data, path)), "--start", str(start),
            "--window", str(window)]


def run_one(args, bins, trace, data, system, load, repeat, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    run_dir = tempfile.mkdtemp(prefix="omni-scenario-")
    sims, nginx = [], None
    scale = args.time_scale
    try:
        common = ["--engine", "vllm", "--instances", str(args.instances), "--time-scale",
                  str(scale), "--seed", str(1 + repeat)]
        base = free_port(REPLAY_OFFSET + 20)
        prefill = Sim(bins["sim"], run_dir, "prefill",
                      common + ["--role", "prefill", "--profile", PREFILL_PROFILE], port=base)
        sims.append(prefill)
        decode = Sim(bins["sim"], run_dir, "decode",
                     common + ["--role", "decode", "--profile", DECODE_PROFILE], port=base + 10)
        sims.append(decode)
        port = free_port()
        nginx = Nginx(run_dir, nginx_conf(run_dir, bins["module"], port, system, prefill.ports(),
                                          decode.ports(),
                                          scheduler_conf(system, scale, args.slo_ttft_ms)))
        summary_path = os.path.join(out_dir, "summary.json")
        cmd = [bins["bench"]] + trace_args(trace, data, args) + [
            "--target", "http://127.0.0.1:%d" % port, "--time-scale", str(scale),
            "--speedup", "%g" % (load / scale), "--label", "%s/%s/x%g/r%d" % (trace, system, load, repeat),
            "--slo-ttft-ms", str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms),
            "--seed", "7", "--summary", summary_path, "--csv", os.path.join(out_dir, "requests.csv")]
        with open(os.path.join(out_dir, "omni-bench.log"), "w") as log:
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=log, check=True,
                           timeout=args.run_timeout)
        with open(summary_path) as f:
            summary = json.load(f)
        hits, queries = prefill.counters()
        summary["prefill_hit_rate"] = hits / queries if queries else 0.0
        summary["nginx_bad_log_lines"] = nginx.bad_log_lines()
        try:
            st = json.loads(urllib.request.urlopen("http://127.0.0.1:%d/omni/status" % port,
                                                   timeout=10).read())
            summary["kv_status"] = st.get("kv")
            summary["scheduler_status"] = st.get("scheduler")
        except Exception:  # noqa: BLE001 (a report detail, not a result)
            summary["kv_status"] = None
        return summary
    finally:
        if nginx is not None:
            try:
                nginx.stop()
            except Exception as e:  # noqa: BLE001 (still stop the sims)
                print("scenario: nginx stop: %s" % e, file=sys.stderr)
            for name in ("error.log", "decisions.log"):
                if os.path.exists(os.path.join(run_dir, name)):
                    shutil.copy(os.path.join(run_dir, name), os.path.join(out_dir, name))
        for s in sims:
            s.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def oracle(args, bins, trace, data):
    cmd = [bins["bench"]] + trace_args(trace, data, args) + [
        "--dry-run", "--oracle-capacity-blocks", str(args.instances * PREFILL_BLOCKS),
        "--oracle-block-size", str(BLOCK_SIZE), "--seed", "7"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    return json.loads(out)


# --- aggregation and report --------------------------------------------------------------------

METRICS = [
    # (key in the table, header, getter, format)
    ("ttft_p50", "TTFT p50 ms", lambda s: s["latency_ms"]["ttft"]["p50"], "%.0f"),
    ("ttft_p99", "TTFT p99 ms", lambda s: s["latency_ms"]["ttft"]["p99"], "%.0f"),
    ("tpot_p50", "TPOT p50 ms", lambda s: s["latency_ms"]["tpot"]["p50"], "%.1f"),
    ("tpot_p99", "TPOT p99 ms", lambda s: s["latency_ms"]["tpot"]["p99"], "%.1f"),
    ("goodput", "goodput req/s", lambda s: s["goodput"]["requests_per_s"], "%.2f"),
    ("goodput_fraction", "within SLO", lambda s: s["goodput"]["fraction"], "%.1%%"),
    ("output_tps", "output tok/s", lambda s: s["throughput"]["output_tokens_per_s"], "%.0f"),
    ("hit_rate", "prefill hit rate", lambda s: s["prefill_hit_rate"], "%.1%%"),
    ("balance", "prefill max/mean", lambda s: s["peers"]["prefill"]["max_over_mean"], "%.2f"),
    ("errors", "errors", lambda s: s["requests"]["errors"] + s["requests"]["dropped"], "%d"),
]


def value(summary, getter):
    try:
        v = getter(summary)
        return None if v is None else float(v)
    except (KeyError, TypeError):
        return None


def fmt(spec, v):
    if v is None:
        return "–"
    if spec.endswith("%%"):
        return "%.1f%%" % (100 * v)
    return spec % v


def aggregate(results):
    """{trace: {load: {system: {metric: (median, min, max)}}}}"""
    table = {}
    for r in results:
        cell = table.setdefault(r["trace"], {}).setdefault(r["load"], {}).setdefault(r["system"], {})
        for key, _, getter, _ in METRICS:
            v = value(r["summary"], getter)
            if v is not None:
                cell.setdefault(key, []).append(v)
    for loads in table.values():
        for systems in loads.values():
            for cell in systems.values():
                for key, vs in cell.items():
                    cell[key] = (statistics.median(vs), min(vs), max(vs), len(vs))
    return table


def report(args, results, oracles, table):
    lines = ["# Routing scenarios", "",
             "omni-sim: %d prefill (`%s`) + %d decode (`%s`) vLLM instances, time scale %g; "
             "nginx 2 workers, sequential P/D; SLO TTFT <= %d ms, TPOT <= %d ms (model time). "
             "Median of %d repeats, [min–max] where they differ." % (
                 args.instances, PREFILL_PROFILE, args.instances, DECODE_PROFILE, args.time_scale,
                 args.slo_ttft_ms, args.slo_tpot_ms, args.repeats), ""]
    for trace, loads in table.items():
        o = oracles.get(trace, {})
        w = o.get("workload", {})
        lines += ["## %s" % trace, "",
                  "%d requests over %.0f s of trace (%.2f req/s), prompt tokens mean %.0f; ideal "
                  "hit rate (one shared cache of %d x %d blocks of %d tokens): %.1f%%." % (
                      w.get("requests", 0), w.get("span_s", 0), w.get("rate_per_s", 0),
                      w.get("input_tokens", {}).get("mean", 0), args.instances, PREFILL_BLOCKS,
                      BLOCK_SIZE, 100 * (o.get("oracle_hit_rate") or 0)), ""]
        for load in sorted(loads):
            lines += ["### offered load x%g (%.2f req/s)" % (load, load * w.get("rate_per_s", 0)), "",
                      "| system | " + " | ".join(h for _, h, _, _ in METRICS) + " |",
                      "|---|" + "---|" * len(METRICS)]
            for system in SYSTEMS:
                cell = loads[load].get(system)
                if cell is None:
                    continue
                row = []
                for key, _, _, spec in METRICS:
                    if key not in cell:
                        row.append("–")
                        continue
                    med, lo, hi, _ = cell[key]
                    text = fmt(spec, med)
                    if fmt(spec, lo) != fmt(spec, hi):
                        text += " [%s–%s]" % (fmt(spec, lo), fmt(spec, hi))
                    row.append(text)
                lines.append("| %s | %s |" % (SYSTEMS[system][0], " | ".join(row)))
            lines.append("")
    bad = [(r["trace"], r["system"], r["load"], r["repeat"], l) for r in results
           for l in r["summary"].get("nginx_bad_log_lines", [])]
    if bad:
        lines += ["## nginx [alert]/[crit]/[emerg] lines", ""] + ["- %s" % (b,) for b in bad]
    return "\n".join(lines) + "\n"


def plots(args, results, oracles, table, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("scenario: python3-matplotlib is missing (scripts/setup.sh installs it); no plots",
              file=sys.stderr)
        return []
    files = []
    main_load = args.loads[len(args.loads) // 2]
    for trace, loads in table.items():
        # TTFT CDF at the middle load, all repeats pooled.
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for system in SYSTEMS:
            ttfts = []
            for r in results:
                if (r["trace"], r["system"], r["load"]) != (trace, system, main_load):
                    continue
                with open(os.path.join(r["dir"], "requests.csv")) as f:
                    ttfts += [float(row["ttft_ms"]) for row in csv.DictReader(f)
                              if row["outcome"] == "ok" and row["ttft_ms"]]
            if not ttfts:
                continue
            ttfts.sort()
            ys = [(i + 1) / len(ttfts) for i in range(len(ttfts))]
            ax.plot([t / 1000 for t in ttfts], ys, label=SYSTEMS[system][0])
        ax.set_xscale("log")
        ax.set_xlabel("TTFT, s (model time, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title("%s: TTFT CDF at offered load x%g" % (trace, main_load))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        files.append(os.path.join(out, "ttft_cdf_%s.svg" % trace))
        fig.tight_layout()
        fig.savefig(files[-1])
        plt.close(fig)

        # Goodput and throughput against offered load.
        rate = oracles.get(trace, {}).get("workload", {}).get("rate_per_s", 1)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for system in SYSTEMS:
            xs, gp, gp_err, tp = [], [], [[], []], []
            for load in sorted(loads):
                cell = loads[load].get(system)
                if not cell or "goodput" not in cell:
                    continue
                med, lo, hi, _ = cell["goodput"]
                xs.append(load * rate)
                gp.append(med)
                gp_err[0].append(med - lo)
                gp_err[1].append(hi - med)
                tp.append(cell["output_tps"][0] if "output_tps" in cell else 0)
            if xs:
                axes[0].errorbar(xs, gp, yerr=gp_err, marker="o", capsize=3,
                                 label=SYSTEMS[system][0])
                axes[1].plot(xs, tp, marker="o", label=SYSTEMS[system][0])
        axes[0].set_xlabel("offered load, req/s")
        axes[0].set_ylabel("goodput, req/s within SLO")
        axes[1].set_xlabel("offered load, req/s")
        axes[1].set_ylabel("output tokens/s")
        for ax in axes:
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle("%s: goodput and throughput vs offered load (model time)" % trace)
        files.append(os.path.join(out, "load_%s.svg" % trace))
        fig.tight_layout()
        fig.savefig(files[-1])
        plt.close(fig)

        # Prefill cache-hit rate per system at the middle load, against the ideal.
        fig, ax = plt.subplots(figsize=(7, 3.6))
        names, meds, errs = [], [], [[], []]
        for system in SYSTEMS:
            cell = loads.get(main_load, {}).get(system)
            if not cell or "hit_rate" not in cell:
                continue
            med, lo, hi, _ = cell["hit_rate"]
            names.append(SYSTEMS[system][0].replace(" (", "\n("))
            meds.append(100 * med)
            errs[0].append(100 * (med - lo))
            errs[1].append(100 * (hi - med))
        ax.barh(names, meds, xerr=errs, capsize=3)
        ideal = oracles.get(trace, {}).get("oracle_hit_rate")
        if ideal is not None:
            ax.axvline(100 * ideal, color="k", linestyle="--", label="ideal shared cache")
            ax.legend(fontsize=7)
        ax.set_xlabel("prefill prefix-cache hit rate, % of prompt tokens")
        ax.set_title("%s: cache hits at offered load x%g" % (trace, main_load))
        ax.tick_params(axis="y", labelsize=7)
        files.append(os.path.join(out, "hit_rate_%s.svg" % trace))
        fig.tight_layout()
        fig.savefig(files[-1])
        plt.close(fig)
    return files


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default=os.path.join(SOURCE, "build"))
    p.add_argument("--out", default=None, help="results folder (default: a new one in /tmp)")
    p.add_argument("--traces", default="mooncake,azure,multitenant")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--loads", default="0.5,1,1.5",
                   help="offered loads, multiples of the trace's rate")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--instances", type=int, default=4, help="prefill and decode instances each")
    p.add_argument("--time-scale", type=float, default=0.1)
    p.add_argument("--window", type=float, default=None, help="trace seconds (default per trace)")
    p.add_argument("--slo-ttft-ms", type=int, default=3000)
    p.add_argument("--slo-tpot-ms", type=int, default=100)
    p.add_argument("--run-timeout", type=int, default=1800)
    p.add_argument("--docs", action="store_true", help="copy the plots to docs/img/")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 repeat, load 1, a 20 s window, time scale 0.05")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.loads, args.window, args.time_scale = 1, "1", 20, 0.05
    args.loads = [float(x) for x in args.loads.split(",")]
    traces = [t for t in args.traces.split(",") if t]
    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        add_variant(s)
    for name, known in (("trace", TRACES), ("system", SYSTEMS)):
        for x in traces if name == "trace" else systems:
            if x not in known:
                sys.exit("scenario: unknown %s %r; use %s" % (name, x, ", ".join(known)))
    args.build = os.path.abspath(args.build)
    bins = {"sim": os.path.join(args.build, "sim", "omni-sim"),
            "bench": os.path.join(args.build, "replay", "omni-bench"),
            "module": os.path.join(args.build, "nginx-build", "objs",
                                   "ngx_http_omni_proxy_module.so")}
    for b in bins.values():
        if not os.path.exists(b):
            sys.exit("scenario: %s is missing; build first (cmake --build %s)" % (b, args.build))
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="omni-scenarios-"))
    os.makedirs(out, exist_ok=True)
    data = data_dir()

    oracles = {t: oracle(args, bins, t, data) for t in traces}
    results = []
    t0 = time.time()
    for trace in traces:
        for repeat in range(args.repeats):
            order = systems[repeat % len(systems):] + systems[:repeat % len(systems)]
            for load in args.loads:
                for system in order:
                    run_dir = os.path.join(out, trace, "x%g" % load, system, "r%d" % repeat)
                    started = time.time()
                    summary = run_one(args, bins, trace, data, system, load, repeat, run_dir)
                    results.append({"trace": trace, "system": system, "load": load,
                                    "repeat": repeat, "dir": run_dir, "summary": summary})
                    print(json.dumps({
                        "trace": trace, "system": system, "load": load, "repeat": repeat,
                        "wall_s": round(time.time() - started, 1),
                        "ttft_p99_ms": summary["latency_ms"]["ttft"]["p99"],
                        "goodput_rps": summary["goodput"]["requests_per_s"],
                        "prefill_hit_rate": round(summary["prefill_hit_rate"], 4),
                        "errors": summary["requests"]["errors"],
                        "late": summary["requests"]["late"]}), flush=True)
    table = aggregate(results)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items()}, "oracles": oracles,
                   "runs": results}, f, indent=1)
    text = report(args, results, oracles, table)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    files = plots(args, results, oracles, table, out)
    if args.docs:
        img = os.path.join(SOURCE, "docs", "img")
        os.makedirs(img, exist_ok=True)
        for f in files:
            shutil.copy(f, img)
    print(text)
    print("scenario: %d runs in %.0f s; results in %s" % (len(results), time.time() - t0, out))


if __name__ == "__main__":
    main()
