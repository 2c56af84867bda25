#!/usr/bin/env python3
"""Where a scenario run lost prefix-cache hits: each request's missed reusable tokens, by cause.

For a Mooncake-format trace (hash_ids: one id per block of --trace-block tokens, equal ids at
equal positions meaning an equal prefix), a request could at best reuse the longest prefix an
earlier request already sent (less its last token, which is always computed). The engine reported
what it did reuse (requests.csv, cached_tokens). The difference is a miss, put in one class:

  routed_to_holder   the request went to a server that had been sent that prefix, and it still
                     missed there: the engine evicted it, or the holder's prefill had not reached
                     it yet when this request was scheduled;
  holder_finished    some earlier holder had finished prefilling that prefix (its first token
                     returned) before this request was sent, and the request went elsewhere;
  holder_in_flight   every holder was still queued or prefilling the prefix when this request
                     was sent, and the request went elsewhere.

It also computes the hit-rate bound (one shared LRU cache of the cluster's capacity, as
omni-bench --oracle-capacity-blocks) twice: over the whole trace window in arrival order (the
scenario report's bound), and over the requests the run served, in the order it sent them. A
system that refuses requests (the scheduler's 503s under overload) takes their prefixes'
reuse out of its own hit rate; the second bound compares it with what its served requests
could have hit.

Usage: miss_analysis.py RUN_DIR [RUN_DIR ...] [--trace FILE] [--window-s 240]
                        [--oracle-blocks N] [--oracle-block TOKENS]
RUN_DIR is one run of bench/scenario.py (it holds requests.csv and decisions.log). Prints the
whole window's bound, then one line per run: the hit rate, the reusable share, the lost points
(per request, what it could reuse less what it did, when positive; a request can reuse more
than the trace's 512-token blocks show, so hit + lost may exceed the reusable share), the lost
points by class, the bound over the served requests, and the hit rate as a share of it.
"""
import argparse
import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scenario import TRACES, data_dir  # noqa: E402  (the scenarios' trace folder and files)


def default_trace():
    return os.path.join(data_dir(), TRACES["mooncake"][1])


def load_trace(path, window_s):
    out = []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec["timestamp"] / 1000.0 > window_s:
                break
            out.append(rec)
    return out


def analyse(run_dir, trace, block):
    # The prefill engine's report of each request (decisions.log: id, status, prefill peer,
    # decode peer, predicted cached, reported cached, ...); requests.csv's cached_tokens is the
    # final response's, i.e. the decode engine's in P/D.
    prefill = {}
    with open(os.path.join(run_dir, "decisions.log")) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 6 and parts[0].startswith("bench-") and parts[5].isdigit():
                prefill[int(parts[0][6:])] = (parts[2], int(parts[5]))
    rows = {}
    with open(os.path.join(run_dir, "requests.csv")) as f:
        for row in csv.DictReader(f):
            i = int(row["index"])
            if row["outcome"] == "ok" and i in prefill:
                row["prefill_peer"], row["cached_tokens"] = prefill[i][0], prefill[i][1]
                rows[i] = row
    order = sorted(rows, key=lambda i: float(rows[i]["start_s"]))
    # prefix (position, hash id) -> list of (server, first-token time)
    holders = {}
    totals = {"prompt": 0, "reusable": 0, "cached": 0, "lost": 0, "routed_to_holder": 0,
              "holder_finished": 0, "holder_in_flight": 0}
    for i in order:
        row = rows[i]
        if i >= len(trace):
            continue
        ids = trace[i]["hash_ids"]
        prompt = int(row["prompt_tokens"] or trace[i]["input_length"])
        start = float(row["start_s"])
        server = row["prefill_peer"]
        # The longest prefix an earlier request sent, and who holds it.
        best, best_holders = 0, []
        for pos, h in enumerate(ids):
            got = holders.get((pos, h))
            if not got:
                break
            best, best_holders = pos + 1, got
        reusable = min(best * block, max(0, prompt - 1))
        cached = min(int(row["cached_tokens"]), prompt)
        missed = max(0, reusable - cached)
        totals["prompt"] += prompt
        totals["reusable"] += reusable
        totals["cached"] += cached
        totals["lost"] += missed
        if missed > 0:
            if any(s == server for s, _ in best_holders):
                totals["routed_to_holder"] += missed
            elif any(done <= start for _, done in best_holders):
                totals["holder_finished"] += missed
            else:
                totals["holder_in_flight"] += missed
        done = start + float(row["ttft_ms"] or 0) / 1000.0
        for pos, h in enumerate(ids):
            holders.setdefault((pos, h), []).append((server, done))
    # The served requests' trace records, in the order they were sent.
    return totals, [trace[i] for i in order if i < len(trace)]


def lru_bound(requests, capacity_blocks, block, trace_block):
    """The hit rate of one shared LRU cache of capacity_blocks blocks of `block` tokens over
    `requests` (trace records, in the order given), as omni-bench --oracle-capacity-blocks
    computes it: a request hits its longest run of cached leading blocks, at most
    (length - 1) // block, then its full blocks become most recently used, its first most of
    all. A block is keyed by its trace hash id's position and id and its place within it."""
    from collections import OrderedDict
    lru = OrderedDict()
    prompt = hits = 0
    for rec in requests:
        n = int(rec["input_length"])
        keys = []
        for pos, h in enumerate(rec["hash_ids"]):
            inside = min(trace_block, n - pos * trace_block) // block
            keys.extend((pos, h, k) for k in range(max(0, inside)))
        can_hit = (n - 1) // block if n > 0 else 0
        got = 0
        while got < can_hit and got < len(keys) and keys[got] in lru:
            got += 1
        for key in reversed(keys):
            lru[key] = True
            lru.move_to_end(key, last=False)
        while len(lru) > capacity_blocks:
            lru.popitem(last=True)
        prompt += n
        hits += got * block
    return hits / prompt if prompt else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--trace", default=None,
                    help="the Mooncake trace the runs replayed (default: the scenarios' own)")
    ap.add_argument("--window-s", type=float, default=240.0)
    ap.add_argument("--trace-block", type=int, default=512, help="tokens per hash id")
    ap.add_argument("--oracle-blocks", type=int, default=4 * 32768,
                    help="the bound's cache, blocks (default: the scenarios' 4 x 32768)")
    ap.add_argument("--oracle-block", type=int, default=64, help="the bound's block, tokens")
    args = ap.parse_args()
    trace = load_trace(args.trace or default_trace(), args.window_s)
    bound_all = lru_bound(trace, args.oracle_blocks, args.oracle_block, args.trace_block)
    print("bound over the whole window (arrival order): %.1f%%" % (100 * bound_all))
    print("%-60s %7s %7s %7s %9s %9s %9s %7s %7s" % (
        "run", "hit%", "reuse%", "lost", "to_holder", "finished", "in_flight", "bound%",
        "of_it"))
    for run in args.runs:
        for name in ("requests.csv", "decisions.log"):
            if not os.path.exists(os.path.join(run, name)):
                sys.exit("miss_analysis: no %s in %s" % (name, run))
        t, served = analyse(run, trace, args.trace_block)
        p = max(1, t["prompt"])
        pts = lambda k: 100.0 * t[k] / p  # noqa: E731  (points of hit rate)
        # The same bound over the requests this run served, in the order it sent them (a
        # refused request takes its prefix's reuse with it).
        bound = lru_bound(served, args.oracle_blocks, args.oracle_block, args.trace_block)
        print("%-60s %6.1f%% %6.1f%% %6.2f %9.2f %9.2f %9.2f %6.1f%% %6.0f%%" % (
            run[-60:], pts("cached"), pts("reusable"), pts("lost"),
            pts("routed_to_holder"), pts("holder_finished"), pts("holder_in_flight"),
            100 * bound, pts("cached") / max(1e-9, bound)))


if __name__ == "__main__":
    main()
