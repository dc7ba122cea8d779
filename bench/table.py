"""The markdown table of bench/compare.sh.

    python3 bench/table.py RESULTS.jsonl META.json-string [RECOVERY.json]

RESULTS has one line per cell: {"round", "workload", "system", "report"},
with "report" in the shape of `stemectl bench --output json`. RECOVERY, when
given, is the recovery cell: {"wal_bytes", "records", "assertions",
"seconds", "value_bytes"}. Prints the table, with medians over the rounds, the ratios and the targets, and exits
non-zero when a cell is missing or measured nothing.
"""

import json
import statistics
import sys

SYSTEMS = ["fdatasync", "etcd", "postgresql", "stemedb"]
RSS_TARGET_MB = 300.0
RECOVERY_TARGET_MB_S = 150.0


def kind_of(workload):
    return workload.split(" ", 1)[0]


def op_of(workload, report):
    """(throughput, latency percentiles in µs) of one cell."""
    kind = kind_of(workload)
    if report.get("system") == "fdatasync":
        return report["writes"]["per_s"], report["writes"]["latency_us"]
    if kind == "read":
        return report["reads"]["per_s"], report["reads"]["latency_us"]
    if kind == "batch":
        return report["assertions_per_s"], report["writes"]["latency_us"]
    return report["writes"]["per_s"], report["writes"]["latency_us"]


def concurrency_of(workload):
    return int(workload.rsplit("c=", 1)[1])


def fmt_rate(x):
    return "-" if x is None else f"{x:,.0f}"


def fmt_ms(us):
    return "-" if us is None else f"{us / 1000:.2f}"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}"


def ratio(a, b):
    return None if a is None or not b else a / b


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    meta = json.loads(sys.argv[2])
    rounds = int(meta["rounds"])

    workloads = []
    cells = {}
    problems = []
    errors = []
    for r in rows:
        if r["workload"] not in workloads:
            workloads.append(r["workload"])
        rep = r["report"]
        rep.setdefault("system", r["system"])
        rate, lat = op_of(r["workload"], rep)
        if not lat or rate <= 0:
            problems.append(f'round {r["round"]} {r["workload"]} {r["system"]}: nothing measured')
            continue
        if rep.get("errors_total"):
            errors.append(f'round {r["round"]}, {r["workload"]}, {r["system"]}: '
                          + ", ".join(f"{k} {n}" for k, n in rep["errors"].items()))
        cells.setdefault((r["workload"], r["system"]), []).append(
            {"rate": rate, "p50": lat["p50"], "p99": lat["p99"], "rss": rep.get("rss_peak_kib")})
    for w in workloads:
        for s in SYSTEMS:
            n = len(cells.get((w, s), []))
            if n != rounds:
                problems.append(f"{w} {s}: {n} of {rounds} rounds measured")

    def med(w, s, key):
        vals = [c[key] for c in cells.get((w, s), []) if c[key] is not None]
        return statistics.median(vals) if vals else None

    out = []
    out.append(f'Run {meta["date"]}: `{meta["command"]}`, {rounds} round(s), '
               f'{meta["secs"]} s per cell after {meta["warmup"]} s warmup, '
               f'{int(meta["elapsed"]) // 60} min {int(meta["elapsed"]) % 60} s in all.')
    out.append("")
    out.append(f'Machine: {meta["nproc"]} cores ({meta["cpu"]}), data on {meta["fs"]}; '
               f'load average {meta["load_start"]} at the start, {meta["load_end"]} at the end. '
               f'etcd {meta["etcd"]}, PostgreSQL {meta["pg"]} ({meta["pg_sync"]}), '
               f'StemeDB {meta["rev"]}.')
    out.append("")
    out.append("| workload | fdatasync /s | fdatasync p50 ms | etcd /s | p50 ms | p99 ms "
               "| PostgreSQL /s | p50 ms | p99 ms | StemeDB /s | p50 ms | p99 ms "
               "| StemeDB ÷ etcd | StemeDB ÷ PostgreSQL | StemeDB ÷ fdatasync | target | met? |")
    out.append("|---|" + "---:|" * 14 + "---|---|")
    for w in workloads:
        kind = kind_of(w)
        raw, raw_p50 = med(w, "fdatasync", "rate"), med(w, "fdatasync", "p50")
        e, p, s = (med(w, x, "rate") for x in ("etcd", "postgresql", "stemedb"))
        s_p50, s_p99 = med(w, "stemedb", "p50"), med(w, "stemedb", "p99")
        r_etcd, r_pg = ratio(s, e), ratio(s, p)
        r_raw = ratio(s, raw) if kind == "write" else None
        misses = []
        if kind == "write":
            c = concurrency_of(w)
            need = 1.3 if c == 1 else 2.0
            target = f"≥ {need:g}× etcd and PostgreSQL"
            if r_etcd is None or r_etcd < need:
                misses.append(f"{fmt_ratio(r_etcd)}× etcd")
            if r_pg is None or r_pg < need:
                misses.append(f"{fmt_ratio(r_pg)}× PostgreSQL")
            if c == 1:
                target += "; p50 ≤ fdatasync p50 + 0.25 ms"
                limit = None if raw_p50 is None else raw_p50 + 250
                if s_p50 is None or limit is None or s_p50 > limit:
                    misses.append(f"p50 {fmt_ms(s_p50)} > {fmt_ms(limit)} ms")
        elif kind == "batch":
            target = "≥ 8× PostgreSQL rows/s"
            if r_pg is None or r_pg < 8:
                misses.append(f"{fmt_ratio(r_pg)}×")
        else:
            target = "≥ 1.5× PostgreSQL; p99 ≤ 1 ms"
            if r_pg is None or r_pg < 1.5:
                misses.append(f"{fmt_ratio(r_pg)}×")
            if s_p99 is None or s_p99 > 1000:
                misses.append(f"p99 {fmt_ms(s_p99)} ms")
        met = "yes" if not misses else "**no**: " + ", ".join(misses)
        out.append(
            f"| {w} | {fmt_rate(raw)} | {fmt_ms(raw_p50)} "
            f'| {fmt_rate(e)} | {fmt_ms(med(w, "etcd", "p50"))} | {fmt_ms(med(w, "etcd", "p99"))} '
            f'| {fmt_rate(p)} | {fmt_ms(med(w, "postgresql", "p50"))} | {fmt_ms(med(w, "postgresql", "p99"))} '
            f"| {fmt_rate(s)} | {fmt_ms(s_p50)} | {fmt_ms(s_p99)} "
            f"| {fmt_ratio(r_etcd)} | {fmt_ratio(r_pg)} | {fmt_ratio(r_raw)} | {target} | {met} |")
    rss = [c["rss"] for c in cells.get(("write c=256", "stemedb"), []) if c["rss"]]
    if rss:
        peak_mb = max(rss) / 1024
        met = "yes" if peak_mb <= RSS_TARGET_MB else "**no**"
        cols = ["peak RSS walld + stemed, write c=256"] + [""] * 8 + [f"{peak_mb:,.0f} MB"] + [""] * 5
        cols += [f"≤ {RSS_TARGET_MB:g} MB", met]
        out.append("| " + " | ".join(cols) + " |")
    recovery = json.load(open(sys.argv[3])) if len(sys.argv) > 3 else None
    if recovery:
        mb = recovery["wal_bytes"] / 1e6
        secs = recovery["seconds"]
        rate = mb / secs if secs > 0 else None
        if rate is None:
            problems.append("recovery: no replay time measured")
        met = "yes" if rate is not None and rate >= RECOVERY_TARGET_MB_S else "**no**"
        per_s = f'{recovery["assertions"] / secs:,.0f}' if secs > 0 else "-"
        cols = [f'recovery: replay {mb:,.0f} MB of WAL ({recovery["records"]:,} transactions, '
                f'{recovery["assertions"]:,} assertions, {per_s} assertions/s) into a new store']
        cols += [""] * 8 + [f"{rate:,.1f} MB/s" if rate else "-", f"{secs:,.1f} s", ""]
        cols += [""] * 3 + [f"≥ {RECOVERY_TARGET_MB_S:g} MB/s", met]
        out.append("| " + " | ".join(cols) + " |")
    out.append("")
    out.append(
        "Medians over the rounds of each figure. /s: durable single writes per second "
        "(a 1-assertion transaction, a Put, a 1-row INSERT); for `batch` rows, items per second "
        "(assertions, Puts in a Txn, rows) with latency per 100-item transaction; for `read`, reads "
        f'per second (a Get of one entity of 20 facts, a single-key linearizable Range, a prepared '
        f'SELECT by primary key; over {meta["read_keys"]} entities, keys or rows of 320 value bytes). '
        "fdatasync: 8 KiB writes + fdatasync in a loop on one thread in the same file system, "
        "measured right before each workload's cells; \"StemeDB ÷ fdatasync\" is single-write "
        "throughput over that rate. Peak RSS: the larger, over the rounds, of walld's plus "
        "stemed's VmHWM, reset just before the cell. Clients: stemectl bench (StemeDB), "
        "stemedb-peer-bench (etcd, gRPC KV API), pgbench -M prepared -j 2 (PostgreSQL), one "
        "closed-loop process each, on the same cores as the servers. Recovery: a second node "
        "whose checkpoints truncate no WAL, filled with 100-assertion transactions "
        f'({recovery["value_bytes"] if recovery else "-"} value bytes) until walld wrote that much WAL; '
        "stemed stopped, its store deleted, and the time from stemed's start until /readyz "
        "said ready (all records applied), in that row's p50 column.")
    if errors:
        out.append("")
        out.append("Failed operations (not in the figures): " + "; ".join(errors) + ".")
    print("\n".join(out))
    if problems:
        print("\ncompare: " + "\ncompare: ".join(problems), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
