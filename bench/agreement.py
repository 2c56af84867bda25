#!/usr/bin/python3
"""Two proxies, one cluster: do two nginx instances with separate zones (no shared memory) that
read the same KV-event streams route the same requests the same way, and how fast does a
restarted proxy rebuild its view?

One omni-sim P/D cluster (4 vLLM prefill + 4 decode instances, DeepSeek-V3 profiles, time
scale 0.1, KV events on), two nginx instances (2 workers each, `omni_proxy_policy kv_aware`
over the events, the configuration of bench/scenario.py's omni_kv system). Two omni-bench
processes replay the same trace slice at the same time, one through each proxy, with the same
request ids, so each proxy sees the same requests and its own copy of the load (the engines
serve both copies). The agreement rate is the share of requests whose prefill (and decode)
server was the same through both proxies.

Then proxy B is stopped and a fresh one started on the same engines: the time until its index
holds as many blocks per server as proxy A's (from the engines' replay sockets), and each
server's synced_after_ms from the status page, measure recovery.

usage: bench/agreement.py [--build DIR] [--trace mooncake|multitenant] [--window S]
                          [--load F] [--out DIR]
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scenario  # noqa: E402  (the cluster and nginx helpers)


def status(port):
    try:
        return json.loads(urllib.request.urlopen("http://127.0.0.1:%d/omni/status" % port,
                                                 timeout=5).read())
    except Exception:  # noqa: BLE001 (not up yet)
        return None


def blocks(port):
    st = status(port) or {}
    out = {}
    for p in (st.get("kv") or {}).get("pools", []):
        for s in p["servers"]:
            out[(p["name"], s["name"])] = s
    return out


def rows(path):
    with open(path) as f:
        return {r["index"]: r for r in csv.DictReader(f)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", default=os.path.join(scenario.SOURCE, "build"))
    p.add_argument("--trace", default="mooncake", choices=sorted(scenario.TRACES))
    p.add_argument("--window", type=float, default=120)
    p.add_argument("--load", type=float, default=1.0)
    p.add_argument("--time-scale", type=float, default=0.1)
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--out", default=None)
    p.add_argument("--policy-args", default="",
                   help="extra omni_proxy_policy kv_aware parameters, e.g. decode_slack=0.5")
    args = p.parse_args()
    args.build = os.path.abspath(args.build)
    bins = {"sim": os.path.join(args.build, "sim", "omni-sim"),
            "bench": os.path.join(args.build, "replay", "omni-bench"),
            "module": os.path.join(args.build, "nginx-build", "objs",
                                   "ngx_http_omni_proxy_module.so")}
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="omni-agreement-"))
    os.makedirs(out, exist_ok=True)
    run = tempfile.mkdtemp(prefix="omni-agreement-run-")
    sims, proxies = [], {}
    try:
        common = ["--engine", "vllm", "--instances", str(args.instances), "--time-scale",
                  str(args.time_scale), "--seed", "1"]
        base = scenario.free_port(scenario.REPLAY_OFFSET + 20)
        pre = scenario.Sim(bins["sim"], run, "prefill",
                           common + ["--role", "prefill", "--profile", scenario.PREFILL_PROFILE],
                           port=base)
        sims.append(pre)
        dec = scenario.Sim(bins["sim"], run, "decode",
                           common + ["--role", "decode", "--profile", scenario.DECODE_PROFILE],
                           port=base + 10)
        sims.append(dec)

        def start_proxy(name):
            d = os.path.join(run, name)
            os.makedirs(d, exist_ok=True)
            port = scenario.free_port()
            conf = scenario.nginx_conf(d, bins["module"], port, "omni_kv", pre.ports(),
                                       dec.ports())
            if args.policy_args:
                conf = conf.replace("omni_proxy_policy kv_aware;",
                                    "omni_proxy_policy kv_aware %s;" % args.policy_args)
            proxies[name] = (scenario.Nginx(d, conf), port)
            return port

        a, b = start_proxy("a"), start_proxy("b")
        time.sleep(1.0)  # both subscribers connected
        benches = []
        for name, port in (("a", a), ("b", b)):
            cmd = [bins["bench"]] + scenario.trace_args(args.trace, scenario.data_dir(), args) + [
                "--target", "http://127.0.0.1:%d" % port, "--time-scale", str(args.time_scale),
                "--speedup", "%g" % (args.load / args.time_scale), "--seed", "7",
                # Each replay its own request ids: the engines key the KV they hold for the
                # decode by it (vLLM's remote_request_id).
                "--request-id-prefix", "%s-bench-" % name,
                "--summary", os.path.join(out, name + ".summary.json"),
                "--csv", os.path.join(out, name + ".csv")]
            benches.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                            stderr=open(os.path.join(out, name + ".log"), "w")))
        for bp in benches:
            if bp.wait(timeout=3600) != 0:
                sys.exit("agreement: omni-bench failed; see %s" % out)
        ra, rb = rows(os.path.join(out, "a.csv")), rows(os.path.join(out, "b.csv"))
        both = [i for i in ra if i in rb and ra[i]["outcome"] == "ok" and rb[i]["outcome"] == "ok"]
        same_p = sum(ra[i]["prefill_peer"] == rb[i]["prefill_peer"] for i in both)
        same_d = sum(ra[i]["decode_peer"] == rb[i]["decode_peer"] for i in both)

        # Recovery: a fresh proxy B on the same engines.
        time.sleep(2.0)
        want = {k: v["blocks"] for k, v in blocks(a).items()}
        proxies.pop("b")[0].stop()
        t0 = time.time()
        b = start_proxy("b2")
        caught_up = None
        while time.time() - t0 < 60:
            got = {k: v["blocks"] for k, v in blocks(b).items()}
            if got and all(got.get(k, 0) >= n for k, n in want.items()):
                caught_up = time.time() - t0
                break
            time.sleep(0.05)
        synced = {"%s/%s" % k: v.get("feed", {}).get("synced_after_ms") for k, v in blocks(b).items()}
        result = {
            "trace": args.trace, "window_s": args.window, "load": args.load,
            "requests_compared": len(both),
            "prefill_agreement": same_p / len(both) if both else None,
            "decode_agreement": same_d / len(both) if both else None,
            "index_blocks_at_end": sum(want.values()),
            "recovery_s_to_same_blocks": caught_up,
            "recovery_synced_after_ms": synced,
        }
        with open(os.path.join(out, "agreement.json"), "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1))
    finally:
        for nginx, _ in proxies.values():
            try:
                nginx.stop()
            except Exception as e:  # noqa: BLE001
                print("agreement: nginx stop: %s" % e, file=sys.stderr)
        for s in sims:
            s.stop()
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
