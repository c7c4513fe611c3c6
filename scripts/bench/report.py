#!/usr/bin/env python3
"""Turns one benchmark run (criterion estimates, ceiling.json, e2e.json) into the Markdown tables of BENCHMARKS.md.

    report.py --results bench-out/results --criterion bench-out/criterion > bench-out/results/tables.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MiB = 2**20


def fmt(v, digits=1):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def criterion_rows(root: Path) -> list[dict]:
    rows = []
    for bench in sorted(root.glob("**/new/benchmark.json")):
        meta = json.loads(bench.read_text())
        est = json.loads((bench.parent / "estimates.json").read_text())
        rows.append({"group": meta["group_id"], "function": meta.get("function_id"),
                     "value": meta.get("value_str"), "median_ns": est["median"]["point_estimate"],
                     "throughput": meta.get("throughput")})
    return rows


def micro(rows: list[dict]) -> str:
    if not rows:
        return "_no criterion results found_\n"
    out = []
    body = []
    for r in rows:
        ms = r["median_ns"] / 1e6
        name = f"{r['group']}/{r['function']}" + (f"/{r['value']}" if r["value"] else "")
        per = ""
        tp = r["throughput"] or {}
        if "Elements" in tp and tp["Elements"]:
            n = tp["Elements"]
            unit = "images/s" if r["group"] == "inference" else "weights/µs"
            rate = n / (r["median_ns"] / 1e9) if unit == "images/s" else n / (r["median_ns"] / 1e3)
            per = f"{rate:,.0f} {unit}"
        body.append([f"`{name}`", f"{ms:,.3f}", per])
    out.append(table(["benchmark", "median ms", "rate"], body))
    return "\n".join(out)


def ceiling(c: dict) -> tuple[str, dict]:
    rows = c["rows"]
    variants = sorted({r["variant"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    get = {(r["variant"], r["batch"]): r for r in rows}
    body = []
    for v in variants:
        body.append([f"`{v}`"] + [f"{get[(v, b)]['images_per_s']:,.0f} / {get[(v, b)]['run_ms']:.2f} ms / "
                                  f"{b / get[(v, b)]['run_ms'] * 1e3:,.0f}"
                                  if (v, b) in get else "n/a" for b in batches])
    text = ("Each cell: images/s over the whole window / median time of one run / batch ÷ median run "
            "(the last is what an uncontended core pair gives; the first includes preemption by other "
            "processes).\n\n")
    text += table(["variant"] + [f"batch {b}" for b in batches], body)
    ratios = []
    if "standalone" in variants:
        for v in variants:
            if v == "standalone":
                continue
            ratios.append([f"`{v}` / `standalone`"] + [
                f"{get[(v, b)]['images_per_s'] / get[('standalone', b)]['images_per_s']:.2f} "
                f"({get[('standalone', b)]['run_ms'] / get[(v, b)]['run_ms']:.2f})"
                if (v, b) in get and ("standalone", b) in get else "n/a" for b in batches])
        text += ("\nRatios to the standalone merged expert, same batch: throughput over the window "
                 "(median of rounds), in brackets from the median run time:\n\n")
        text += table(["ratio"] + [f"batch {b}" for b in batches], ratios)
    best = {v: max(get[(v, b)]["images_per_s"] for b in batches if (v, b) in get) for v in variants}
    at = {v: {b: get[(v, b)]["images_per_s"] for b in batches if (v, b) in get} for v in variants}
    return text, {"best": best, "at": at}


def e2e_warm(rows: list[dict]) -> str:
    body = [[r["route"], r.get("server", ""), r["connections"], fmt(r["rps"]), fmt(r["p50_ms"], 2),
             fmt(r["p99_ms"], 2), fmt(r["mean_batch"], 2), r["errors"], runs(r)] for r in rows]
    return table(["route", "server", "concurrency", "req/s", "p50 ms", "p99 ms", "mean batch", "errors",
                  "req/s of each round"], body)


def runs(r: dict) -> str:
    return ", ".join(f"{x:.0f}" for x in r.get("rps_runs", []))


def batching(rows: list[dict]) -> str:
    body = [[r["batching"], r["connections"], fmt(r["rps"]), fmt(r["p50_ms"], 2), fmt(r["p99_ms"], 2),
             fmt(r["mean_batch"], 2), r["errors"], runs(r)] for r in rows]
    return table(["dynamic batching", "concurrency", "req/s", "p50 ms", "p99 ms", "mean batch", "errors",
                  "req/s of each round"], body)


def cold(c: dict) -> str:
    body = []
    for k, v in c.items():
        if k.startswith("start_to_ready"):
            body.append([k.replace("start_to_ready", "process start to ready,"), v["n"], fmt(v["p50_ms"]),
                         "—", fmt(v["max_ms"]), f"RSS at ready {v['rss_at_ready'] / MiB:.0f} MiB"])
        else:
            body.append([f"first answer: {k}", v["n"], fmt(v.get("p50_ms")), fmt(v.get("p99_ms")),
                         fmt(v.get("max_ms")),
                         f"misses {v.get('misses')}, errors {v.get('errors')}, server expert_ms p50 "
                         f"{fmt(v.get('server_expert_ms_p50'), 2)}"])
    return table(["what", "n", "p50 ms", "p99 ms", "max ms", "notes"], body)


def scale(rows: list[dict], naive_rss: float | None, merged_bytes: int | None) -> str:
    body = []
    for r in rows:
        s, m = r["single"], r["mix"]
        naive = f"{r['experts'] * merged_bytes / MiB:,.0f}" if merged_bytes else "n/a"
        naive_m = f"{r['experts'] * naive_rss / MiB:,.0f}" if naive_rss else "n/a"
        body.append([r["experts"], r.get("server", ""), fmt(s["rps"]), fmt(m["rps"]), f"{m['rps'] / s['rps']:.2f}",
                     fmt(s["p99_ms"]), fmt(m["p99_ms"]),
                     f"{m['hit_rate']:.3f}" if m["hit_rate"] is not None else "n/a",
                     f"{fmt(s['mean_batch'], 1)} / {fmt(m['mean_batch'], 1)}",
                     fmt(r.get("dedicated_sessions"), 0),
                     f"{r['rss_at_ready'] / MiB:.0f}", f"{r['rss_after'] / MiB:.0f}",
                     f"{r['rss_peak'] / MiB:.0f}", f"{r['rss_target_bytes'] / MiB:.0f}", naive, naive_m])
    return table(["experts", "server", "single req/s", "mix req/s", "mix/single", "single p99 ms", "mix p99 ms",
                  "mix hit rate", "mean batch single / mix", "dedicated sessions",
                  "RSS ready MiB", "RSS after MiB", "RSS peak MiB", "RSS target MiB",
                  "naive: N x merged file MiB", "naive: N x session RSS MiB"], body)


def execution(rows: list[dict]) -> str:
    """Issue 8: single expert vs random mix per execution mode, images by path, RSS against its target."""
    body = []
    for r in rows:
        s, m = r["single"], r["mix"]
        paths = ", ".join(f"{k.split('=')[1].strip(chr(34))} {v:,.0f}" for k, v in sorted(r["images_by_path"].items()) if v)
        body.append([r["experts"], r["execution"] + ("" if r["in_effect"] == r["execution"] else f" (ran {r['in_effect']})"),
                     fmt(s["rps"]), fmt(m["rps"]), f"{r['mix_over_single']:.2f}", fmt(s["p99_ms"]), fmt(m["p99_ms"]),
                     f"{r['mix_p99_over_single']:.2f}", f"{fmt(s['mean_batch'], 1)} / {fmt(m['mean_batch'], 1)}",
                     paths or "n/a", f"{r['rss_after'] / MiB:.0f}", f"{r['rss_peak'] / MiB:.0f}",
                     f"{r['rss_target_bytes'] / MiB:.0f}"])
    return table(["experts", "execution", "single req/s", "mix req/s", "mix/single", "single p99 ms", "mix p99 ms",
                  "mix p99/single", "mean batch single / mix", "images by path", "RSS after MiB", "RSS peak MiB",
                  "RSS target MiB"], body)


def targets(c_info: dict | None, e2e: dict) -> str:
    body = []
    warm = e2e.get("warm", [])
    if c_info:
        best = c_info["best"]
        at = c_info["at"]
        default32 = next((r for r in warm if r["route"] == "native" and r["connections"] == 32
                          and r.get("server") == "default flags"), None)
        if default32:
            path = "service_dedicated" if (default32.get("dedicated_sessions") or 0) >= 1 else "service_shared"
            if path in best:
                ratio = default32["rps"] / best[path]
                body.append([f"e2e warm c=32 (native, default flags; expert on {path.split('_')[1]} session) "
                             f">= 0.9 x in-process `{path}` ceiling (best batch)",
                             f"{default32['rps']:,.0f} / {best[path]:,.0f} = {ratio:.2f}",
                             "met" if ratio >= 0.9 else "not met"])
        for r in warm:
            if r["route"] != "native" or r["connections"] != 32 or r.get("server") == "default flags":
                continue
            path = "service_dedicated" if (r.get("dedicated_sessions") or 0) >= 1 else "service_shared"
            if "intra-op" in r.get("server", "") or path not in best:
                continue  # the ceiling ran with the default thread count
            ratio = r["rps"] / best[path]
            body.append([f"e2e warm c=32 (native, {r['server']}) >= 0.9 x in-process `{path}` ceiling",
                         f"{r['rps']:,.0f} / {best[path]:,.0f} = {ratio:.2f}", "met" if ratio >= 0.9 else "not met"])
        for v in ("service_shared", "service_dedicated"):
            if v in at and 32 in at[v] and "standalone" in at and 32 in at["standalone"]:
                ratio = at[v][32] / at["standalone"][32]
                body.append([f"`{v}` >= 0.9 x `standalone` at batch 32",
                             f"{at[v][32]:,.0f} / {at['standalone'][32]:,.0f} = {ratio:.2f}",
                             "met" if ratio >= 0.9 else "not met"])
    coldrow = e2e.get("cold", {}).get("shipped package, expert not assembled")
    if coldrow and coldrow.get("n"):
        body.append(["cold expert first answer <= 50 ms p50 (shipped package)", f"{coldrow['p50_ms']:.1f} ms",
                     "met" if coldrow["p50_ms"] <= 50 else "not met"])
    for r in e2e.get("scale", []):
        if r["experts"] != max(x["experts"] for x in e2e["scale"]) or r.get("server", "default flags") != "default flags":
            continue
        n = r["experts"]
        body.append([f"{n} experts, 16-expert cache: RSS <= shared model + all deltas + 16 experts + 150 MiB",
                     f"{r['rss_after'] / MiB:.0f} MiB after load (peak {r['rss_peak'] / MiB:.0f}) vs "
                     f"{r['rss_target_bytes'] / MiB:.0f} MiB",
                     "met" if r["rss_peak"] <= r["rss_target_bytes"] else "not met"])
        ratio = r["mix"]["rps"] / r["single"]["rps"]
        body.append([f"{n} experts: random-mix throughput >= 0.7 x single-expert",
                     f"{r['mix']['rps']:,.0f} / {r['single']['rps']:,.0f} = {ratio:.2f}",
                     "met" if ratio >= 0.7 else "not met"])
    return table(["target", "measured", "verdict"], body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path("bench-out/results"))
    p.add_argument("--criterion", type=Path, default=Path("bench-out/criterion"))
    a = p.parse_args(argv)
    parts = []
    machine = a.results / "machine.txt"
    if machine.exists():
        parts.append("## Machine during this run\n\n```\n" + machine.read_text().strip() + "\n```\n")
    parts.append("## 1. Micro-benchmarks (criterion, medians)\n\n" + micro(criterion_rows(a.criterion)))
    c_info = None
    ceiling_path = a.results / "ceiling.json"
    naive_rss = merged_bytes = None
    if ceiling_path.exists():
        c = json.loads(ceiling_path.read_text())
        text, c_info = ceiling(c)
        naive_rss, merged_bytes = c.get("naive_session_rss_bytes"), c.get("merged_model_file_bytes")
        parts.append(f"## 2. In-process ceiling (task `{c['task']}`, {c['rounds']} interleaved rounds x "
                     f"{c['seconds_per_cell']} s per cell; medians)\n\n" + text)
        if naive_rss:
            parts.append(f"Naive alternative, measured: each extra standalone session of the merged model adds "
                         f"{naive_rss / MiB:.1f} MiB RSS (merged file {merged_bytes / MiB:.1f} MiB); "
                         f"one assembled expert in the cache holds {c['expert_bytes'] / MiB:.1f} MiB.\n")
    one = a.results / "ceiling-1thread.json"
    if one.exists():
        c1 = json.loads(one.read_text())
        text, _ = ceiling(c1)
        parts.append(f"### 2b. The same with one ONNX Runtime intra-op thread (`LORKD_BENCH_THREADS=1`, "
                     f"`--intra-op-threads 1`; {c1['rounds']} rounds x {c1['seconds_per_cell']} s)\n\n"
                     "Less sensitive to the other processes on the 2 cores (no spinning thread pool), so the "
                     "per-run cost of each path shows more clearly.\n\n" + text)
    e2e_path = a.results / "e2e.json"
    e2e = json.loads(e2e_path.read_text()) if e2e_path.exists() else {}
    if e2e.get("warm"):
        parts.append(f"## 3. End to end, one warm expert (`{e2e['task']}`), wrk -t1, {e2e['duration_s']} s per "
                     "row\n\n" + e2e_warm(e2e["warm"]))
    if e2e.get("cold"):
        parts.append("## 4. Cold start\n\n" + cold(e2e["cold"]))
    if e2e.get("scale"):
        parts.append("## 5. Scale across experts (uniformly random task mix, 16-expert cache budget)\n\n"
                     + scale(e2e["scale"], naive_rss, merged_bytes))
    if e2e.get("batching"):
        parts.append("## 6. Dynamic batching off vs on\n\n" + batching(e2e["batching"]))
    if e2e.get("execution"):
        parts.append("## 7. Execution paths: one expert vs a random mix (issue 8), wrk -c"
                     f"{e2e['execution'][0]['single']['connections']}, 16-expert cache budget\n\n"
                     + execution(e2e["execution"]))
    parts.append("## Targets\n\n" + targets(c_info, e2e))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
