#!/usr/bin/env python3
"""Reads wrk --latency outputs named ROUND.TARGET.CONNS.txt in a directory and prints the table:
median over rounds of req/s, p50 and p99, and the req/s ratio to nginx at the same connections.

usage: wrk_summary.py DIR
"""
import os
import re
import statistics
import sys

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def ms(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * UNITS[m.group(2)] if m else float("nan")


def parse(path):
    out = {"rps": float("nan"), "p50": float("nan"), "p99": float("nan"), "errors": 0, "requests": 0}
    for line in open(path):
        line = line.strip()
        if line.startswith("Requests/sec:"):
            out["rps"] = float(line.split()[1])
        elif re.match(r"^50(\.0+)?%", line):
            out["p50"] = ms(line.split()[1])
        elif re.match(r"^99(\.0+)?%", line):
            out["p99"] = ms(line.split()[1])
        elif line.startswith("Non-2xx or 3xx responses:"):
            out["errors"] += int(line.split(":")[1])
        elif line.startswith("Socket errors:"):
            out["errors"] += sum(int(n) for n in re.findall(r"\d+", line))
        m = re.match(r"^(\d+) requests in", line)
        if m:
            out["requests"] = int(m.group(1))
    return out


d = sys.argv[1]
runs = {}
for name in sorted(os.listdir(d)):
    m = re.match(r"^(\d+)\.([\w-]+)\.(\d+)\.txt$", name)
    if m:
        runs.setdefault((m.group(2), int(m.group(3))), []).append(parse(os.path.join(d, name)))

order = ["nginx", "portico-nopolicy", "portico-key", "portico-v2-key", "portico-v2-notrace", "portico-quota",
         "baseline-v2-key"]
conns = sorted({c for _, c in runs})
print(f"{'target':<18} {'conns':>5} {'req/s':>10} {'min-max req/s':>15} {'p50 ms':>8} {'p99 ms':>8} {'x nginx':>8} {'errors':>7}")
for c in conns:
    base = runs.get(("nginx", c))
    base_rps = statistics.median(r["rps"] for r in base) if base else float("nan")
    base_p99 = statistics.median(r["p99"] for r in base) if base else float("nan")
    for t in order:
        rs = runs.get((t, c))
        if not rs:
            continue
        rps = statistics.median(r["rps"] for r in rs)
        p50 = statistics.median(r["p50"] for r in rs)
        p99 = statistics.median(r["p99"] for r in rs)
        errors = sum(r["errors"] for r in rs)
        # The rounds' spread: a ratio between two targets whose ranges overlap is not a
        # difference this run can tell from noise.
        spread = f"{min(r['rps'] for r in rs):.0f}-{max(r['rps'] for r in rs):.0f}"
        print(f"{t:<18} {c:>5} {rps:>10.0f} {spread:>15} {p50:>8.2f} {p99:>8.2f} {rps / base_rps:>8.2f} {errors:>7}")
    v1, v2 = runs.get(("portico-key", c)), runs.get(("portico-v2-key", c))
    if v1 and v2:
        ratio = statistics.median(r["rps"] for r in v2) / statistics.median(r["rps"] for r in v1)
        print(f"{'':<18} {'':>5} (espv2 dialect / esp dialect, same key check: {ratio:.2f})")
    def median_rps(target):
        rs = runs.get((target, c))
        return statistics.median(r["rps"] for r in rs) if rs else None

    traced, untraced, before = (median_rps(t) for t in ("portico-v2-key", "portico-v2-notrace", "baseline-v2-key"))
    if traced and untraced:
        print(f"{'':<18} {'':>5} (espv2 tracing on / --disable_tracing: {traced / untraced:.2f})")
    if traced and before:
        print(f"{'':<18} {'':>5} (espv2 this build / the baseline build: {traced / before:.2f})")
    print(f"{'':<18} {'':>5} (nginx p99 {base_p99:.2f} ms; {len(base or [])} rounds, medians)")
