#!/usr/bin/env python3
"""End-to-end benchmarks of the running lorkd server (issue 5, items 3-6), loopback only, bounded in time.

Sections (all by default; pick with --sections):
  warm      one warm expert, native predict (PNG body) and OIP v2 infer (JSON), wrk at each concurrency
  batching  dynamic batching off (--max-batch-size 1) and on (default), same concurrency
  cold      process start to ready; first answer of a not yet assembled expert (shipped and synthetic package)
  scale     synthetic packages of N experts, 16-expert cache budget: single expert vs uniformly random task mix
  execution issue 8: single expert vs random mix over 3/100/1000 experts for LORKD_EXECUTION auto, merged, mixed

Writes <out>/e2e.json (read by report.py). Needs `wrk` (Debian package) and the release binary.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
LUA = HERE / "post.lua"
NATIVE = "/v1/experts/%s/predict"
OIP = "/v2/models/%s/infer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0]) * 1024
    return out


class Server:
    """One lorkd process on 127.0.0.1:<free port>; `ready_s` is the time from spawn to /v2/health/ready = 200."""

    def __init__(self, binary: Path, package: Path, extra: list[str], logs: Path, name: str,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.log_path = logs / f"{name}.log"
        cmd = [str(binary), "--host", "127.0.0.1", "--port", str(self.port), "--package", str(package),
               "--provider", "cpu", "--log", "warn", "--log-format", "json", *extra]
        self.cmd = cmd
        self.log = self.log_path.open("w")
        started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **(env or {})))
        deadline = started + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                status, _ = self.get("/v2/health/ready", timeout=1)
                if status == 200:
                    break
            except OSError:
                pass
            if time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready after 300 s; see {self.log_path}")
            time.sleep(0.005)
        self.ready_s = time.perf_counter() - started

    def get(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        """Prometheus text -> {metric name: value summed over labels}."""
        _, body = self.get("/metrics")
        sums: dict[str, float] = {}
        for line in body.decode().splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{", 1)[0]
            sums[name] = sums.get(name, 0.0) + float(value)
        return sums

    def metrics_by_label(self, name: str) -> dict[str, float]:
        """One metric's samples by their label set (e.g. `path="mixed"`)."""
        _, body = self.get("/metrics")
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if line.startswith(name + "{"):
                labels, value = line[len(name):].rsplit(" ", 1)
                out[labels.strip("{}")] = float(value)
        return out

    def memory(self) -> dict[str, int]:
        return proc_status(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def wrk(server: Server, *, body: Path, content_type: str, path_fmt: str, connections: int, seconds: int,
        task: str | None = None, tasks_file: Path | None = None) -> dict:
    """One closed-loop wrk run (1 thread, `connections` connections); returns throughput and latency percentiles."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        result_path = Path(tmp.name)
    env = dict(os.environ, BODY_FILE=str(body), CONTENT_TYPE=content_type, PATH_FMT=path_fmt,
               TASK=task or "", TASKS_FILE=str(tasks_file or ""), WRK_RESULT=str(result_path))
    before = server.metrics()
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s", str(LUA),
           f"http://127.0.0.1:{server.port}"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 120)
    if run.returncode != 0:
        raise RuntimeError(f"wrk failed: {run.stderr or run.stdout}")
    after = server.metrics()
    res = json.loads(result_path.read_text())
    result_path.unlink()
    secs = res["duration_us"] / 1e6
    errors = sum(res["errors"].values())
    batches = delta(after, before, "lorkd_batch_size_count")
    hits = delta(after, before, "lorkd_expert_cache_hits_total")
    misses = delta(after, before, "lorkd_expert_cache_misses_total")
    return {
        "connections": connections,
        "seconds": round(secs, 2),
        "requests": res["requests"],
        "errors": errors,
        "rps": (res["requests"] - res["errors"]["status"]) / secs,
        "p50_ms": res["latency_us"]["p50"] / 1e3,
        "p99_ms": res["latency_us"]["p99"] / 1e3,
        "mean_ms": res["latency_us"]["mean"] / 1e3,
        "mean_batch": (delta(after, before, "lorkd_batch_size_sum") / batches) if batches else None,
        "cache_hits": hits,
        "cache_misses": misses,
        "hit_rate": hits / (hits + misses) if hits + misses else None,
        "dedicated_sessions": after.get("lorkd_dedicated_sessions"),
    }


def interleaved(plan: list[tuple[str, Server, dict]], repeats: int) -> dict[str, dict]:
    """Runs every (key, server, wrk kwargs) of `plan` once per round, `repeats` rounds, in rotating order, so that
    the noise of a shared machine hits every row alike; returns per key the medians over rounds."""
    runs: dict[str, list[dict]] = {key: [] for key, _, _ in plan}
    for r in range(repeats):
        for i in range(len(plan)):
            key, server, kwargs = plan[(i + r) % len(plan)]
            runs[key].append(wrk(server, **kwargs))
    out = {}
    for key, rs in runs.items():
        def med(k: str, rs: list[dict] = rs) -> float | None:
            values = [x[k] for x in rs if x[k] is not None]
            return statistics.median(values) if values else None

        out[key] = {
            "connections": rs[0]["connections"], "repeats": len(rs), "seconds": rs[0]["seconds"],
            "requests": sum(x["requests"] for x in rs), "errors": sum(x["errors"] for x in rs),
            "rps": med("rps"), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"), "mean_ms": med("mean_ms"),
            "mean_batch": med("mean_batch"), "hit_rate": med("hit_rate"),
            "cache_hits": sum(x["cache_hits"] for x in rs), "cache_misses": sum(x["cache_misses"] for x in rs),
            "dedicated_sessions": rs[-1]["dedicated_sessions"], "rps_runs": [round(x["rps"], 1) for x in rs],
        }
    return out


def oip_body(manifest: dict, task: str, image: Path, out: Path) -> Path:
    """An OIP v2 infer request for `task` holding `image` preprocessed as FORMAT.md section 4 says."""
    spec = next(t for t in manifest["tasks"] if t["id"] == task)["input"]
    img = Image.open(image)
    img = img.convert("L").convert("RGB") if spec["channels"] == 1 else img.convert("RGB")
    img = img.resize((spec["width"], spec["height"]), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    x = x.transpose(2, 0, 1)[None]
    request = {"id": "bench", "inputs": [{"name": manifest["model"]["input_name"], "shape": list(x.shape),
                                          "datatype": "FP32", "data": [round(float(v), 6) for v in x.ravel()]}]}
    out.write_text(json.dumps(request))
    return out


def post(conn: http.client.HTTPConnection, path: str, body: bytes, content_type: str) -> tuple[float, int, dict]:
    started = time.perf_counter()
    conn.request("POST", path, body, {"Content-Type": content_type})
    resp = conn.getresponse()
    data = resp.read()
    took = time.perf_counter() - started
    try:
        answer = json.loads(data)
    except ValueError:
        answer = {}
    return took, resp.status, answer


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    v = sorted(values)

    def pct(p: float) -> float:
        return v[min(len(v) - 1, max(0, int(round(p / 100 * (len(v) - 1)))))]

    return {"n": len(v), "p50_ms": statistics.median(v) * 1e3, "p99_ms": pct(99) * 1e3,
            "min_ms": v[0] * 1e3, "max_ms": v[-1] * 1e3}


def sequential(server: Server, tasks: list[str], body: bytes, content_type: str = "image/png") -> dict:
    """One request after another on one keep-alive connection; latency per request and the server's own view."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    lat, expert_ms, misses, errors = [], [], 0, 0
    for task in tasks:
        took, status, answer = post(conn, NATIVE % task, body, content_type)
        if status != 200:
            errors += 1
            continue
        lat.append(took)
        misses += answer.get("cache") == "miss"
        expert_ms.append(answer.get("timings", {}).get("expert_ms", float("nan")))
    conn.close()
    out = percentiles(lat)
    out.update(errors=errors, misses=misses,
               server_expert_ms_p50=statistics.median(expert_ms) if expert_ms else None)
    return out


def expert_bytes(manifest: dict) -> int:
    layers = sum(int(np.prod(layer["shape"])) for layer in manifest["layers"])
    features = manifest["model"]["feature_dim"]
    head = max(t["num_classes"] for t in manifest["tasks"]) * (features + 1)
    return 4 * (layers + head)


def help_text(binary: Path) -> str:
    return subprocess.run([str(binary), "--help"], capture_output=True, text=True).stdout


def section_warm(a, results: dict, logs: Path) -> None:
    manifest = json.loads((a.package / "manifest.json").read_text())
    png = a.package / "golden" / a.task / "0.png"
    oip = oip_body(manifest, a.task, png, a.out / f"oip-{a.task}.json")
    native = dict(body=png, content_type="image/png", path_fmt=NATIVE, task=a.task)
    infer = dict(body=oip, content_type="application/json", path_fmt=OIP, task=a.task)
    shared_flag = "--dedicated-sessions" in help_text(a.binary)
    with Server(a.binary, a.package, ["--preload", a.task], logs, "warm") as s:
        # The expert promoted to a dedicated session (weights baked in) after the warm-up, for that path.
        other = (Server(a.binary, a.package, ["--preload", a.task, "--dedicated-sessions", "1"], logs,
                        "warm-dedicated") if shared_flag else None)
        # One ORT intra-op thread instead of one per core: on a shared machine a spinning pool loses its slices.
        single = Server(a.binary, a.package, ["--preload", a.task, "--intra-op-threads", "1"], logs, "warm-1thread")
        try:
            # Warm-up: arenas, connections and (where the server has it) promotion to a dedicated session.
            for server in (s, other, single):
                if server:
                    wrk(server, **native, connections=8, seconds=a.warmup)
            plan = []
            for route, kw in [("native", native), ("oip", infer)]:
                for c in a.concurrency:
                    plan.append((f"{route}|default flags|{c}", s, dict(kw, connections=c, seconds=a.duration)))
            if other:
                for c in sorted({a.concurrency[0], 32 if 32 in a.concurrency else a.concurrency[-1]}):
                    plan.append((f"native|--dedicated-sessions 1|{c}", other,
                                 dict(native, connections=c, seconds=a.duration)))
            for c in sorted({a.concurrency[0], 32 if 32 in a.concurrency else a.concurrency[-1]}):
                plan.append((f"native|--intra-op-threads 1|{c}", single,
                             dict(native, connections=c, seconds=a.duration)))
            agg = interleaved(plan, a.repeats)
            results["warm_memory"] = s.memory()
        finally:
            single.stop()
            if other:
                other.stop()
    rows = []
    for key, r in agg.items():
        r["route"], r["server"], _ = key.split("|")
        rows.append(r)
        print(f"warm {r['route']:6} {r['server']:24} c={r['connections']:<3} {r['rps']:8.1f} req/s  "
              f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  batch {r['mean_batch'] or 0:5.2f}  "
              f"runs {r['rps_runs']}  errors {r['errors']}", flush=True)
    results["warm"] = rows


def section_batching(a, results: dict, logs: Path) -> None:
    png = a.package / "golden" / a.task / "0.png"
    native = dict(body=png, content_type="image/png", path_fmt=NATIVE, task=a.task)
    levels = [c for c in a.concurrency if c in (8, 32)] or a.concurrency[-1:]
    off = Server(a.binary, a.package, ["--preload", a.task, "--max-batch-size", "1"], logs, "batching-off")
    try:
        with Server(a.binary, a.package, ["--preload", a.task], logs, "batching-on") as on:
            for server in (off, on):
                wrk(server, **native, connections=8, seconds=a.warmup)
            plan = []
            for c in levels:
                plan.append((f"off (--max-batch-size 1)|{c}", off, dict(native, connections=c, seconds=a.duration)))
                plan.append((f"on (default, max 32)|{c}", on, dict(native, connections=c, seconds=a.duration)))
            agg = interleaved(plan, a.repeats)
    finally:
        off.stop()
    rows = []
    for key, r in agg.items():
        r["batching"] = key.split("|")[0]
        rows.append(r)
        print(f"batching {r['batching']:26} c={r['connections']:<3} {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.2f}  "
              f"p99 {r['p99_ms']:7.2f} ms  batch {r['mean_batch'] or 0:5.2f}  runs {r['rps_runs']}", flush=True)
    rows.sort(key=lambda r: (r["connections"], r["batching"]))
    results["batching"] = rows


def section_cold(a, results: dict, logs: Path) -> None:
    manifest = json.loads((a.package / "manifest.json").read_text())
    tasks = [t["id"] for t in manifest["tasks"]]
    png = (a.package / "golden" / a.task / "0.png").read_bytes()
    cold: dict = {}
    # Process start to ready (/v2/health/ready = 200), no preload and with every expert preloaded.
    for label, extra in [("no preload", []), ("--preload all", ["--preload", "all"])]:
        times, rss = [], []
        for i in range(a.starts):
            with Server(a.binary, a.package, extra, logs, f"start-{i}") as s:
                times.append(s.ready_s)
                rss.append(s.memory()["VmRSS"])
        cold[f"start_to_ready {label}"] = {"n": len(times), "p50_ms": statistics.median(times) * 1e3,
                                           "max_ms": max(times) * 1e3, "rss_at_ready": statistics.median(rss)}
        print(f"start to ready ({label}): median {statistics.median(times) * 1e3:.0f} ms", flush=True)
    # Shipped package, a one-expert cache: cycling through its tasks makes every request assemble its expert.
    extra = ["--cache-bytes", "1"]
    if "--dedicated-sessions" in help_text(a.binary):
        extra += ["--dedicated-sessions", "0"]
    with Server(a.binary, a.package, extra, logs, "cold-shipped") as s:
        sequential(s, [a.task], png)  # first run of the session (arenas) is not an expert's cold start
        order = [tasks[i % len(tasks)] for i in range(a.cold_requests)]
        if len(tasks) == 1:
            order = order[:1]
        cold["shipped package, expert not assembled"] = sequential(s, order, png)
    with Server(a.binary, a.package, ["--preload", a.task], logs, "warm-sequential") as s:
        sequential(s, [a.task] * 5, png)
        cold["shipped package, warm expert (reference)"] = sequential(s, [a.task] * a.cold_requests, png)
    # Synthetic package: many experts, cache large enough, each asked once.
    syn = a.packages / f"synthetic-{a.cold_experts}"
    syn_manifest = json.loads((syn / "manifest.json").read_text())
    syn_tasks = [t["id"] for t in syn_manifest["tasks"]]
    with Server(a.binary, syn, ["--cache-bytes", "4GiB"], logs, "cold-synthetic") as s:
        sequential(s, [syn_tasks[0]], png)
        cold[f"synthetic-{a.cold_experts}, each expert once"] = sequential(s, syn_tasks[1:], png)
    for k, v in cold.items():
        if "p50_ms" in v and "n" in v and "start" not in k:
            print(f"cold {k}: p50 {v['p50_ms']:.1f} ms p99 {v['p99_ms']:.1f} ms (n={v['n']}, "
                  f"misses {v.get('misses')})", flush=True)
    results["cold"] = cold


def single_and_mix(a, pkg: Path, n: int, tasks_name: str) -> tuple[dict, int, dict, dict]:
    """The package's manifest and expert size, and the wrk arguments of the two rows every scale table compares:
    one expert (the first task), and a uniformly random mix over its first `n` tasks (the `golden/<task>/0.png` of
    `--task` as the body)."""
    png = a.package / "golden" / a.task / "0.png"
    manifest = json.loads((pkg / "manifest.json").read_text())
    tasks = [t["id"] for t in manifest["tasks"]][:n]
    tasks_file = a.out / tasks_name
    tasks_file.write_text("\n".join(tasks) + "\n")
    common = dict(body=png, content_type="image/png", path_fmt=NATIVE, connections=a.scale_concurrency)
    return manifest, expert_bytes(manifest), dict(common, task=tasks[0]), dict(common, tasks_file=tasks_file)


def section_scale(a, results: dict, logs: Path) -> None:
    rows = []
    runs = [(n, "default flags", [], {}) for n in a.counts]
    if a.counts and "--dedicated-sessions" in help_text(a.binary):
        # Where the memory goes, at the largest count: glibc limited to two malloc arenas (fragmentation across
        # threads' arenas shows up as RSS), and up to 4 hot experts promoted to dedicated sessions.
        n = max(a.counts)
        runs.append((n, "--dedicated-sessions 0, MALLOC_ARENA_MAX=2", ["--dedicated-sessions", "0"],
                     {"MALLOC_ARENA_MAX": "2"}))
        runs.append((n, "--dedicated-sessions 4", ["--dedicated-sessions", "4"], {}))
    for n, label, extra, env in runs:
        pkg = a.packages / f"synthetic-{n}"
        manifest, per_expert, single_kw, mix_kw = single_and_mix(a, pkg, n, f"tasks-{n}.txt")
        budget = 16 * per_expert
        with Server(a.binary, pkg, ["--cache-bytes", str(budget), *extra], logs, f"scale-{n}-{len(runs)}",
                    env=env) as s:
            at_ready = s.memory()
            wrk(s, **single_kw, seconds=a.warmup)
            wrk(s, **mix_kw, seconds=a.warmup)
            agg = interleaved([("single", s, dict(single_kw, seconds=a.duration)),
                               ("mix", s, dict(mix_kw, seconds=a.duration))], a.repeats)
            mem = s.memory()
            m = s.metrics()
        single, mix = agg["single"], agg["mix"]
        deltas_bytes = sum(f.stat().st_size for f in (pkg / "experts").iterdir())
        shared_bytes = (pkg / "student.onnx").stat().st_size
        row = {
            "experts": n, "server": label, "cache_budget_bytes": budget, "expert_bytes": per_expert,
            "single": single, "mix": mix,
            "rss_at_ready": at_ready["VmRSS"], "rss_after": mem["VmRSS"], "rss_peak": mem["VmHWM"],
            "ready_s": s.ready_s,
            "shared_model_bytes": shared_bytes, "deltas_bytes": deltas_bytes,
            "rss_target_bytes": shared_bytes + deltas_bytes + 16 * per_expert + 150 * 2**20,
            "resident_experts": m.get("lorkd_expert_cache_resident_experts"),
            "dedicated_sessions": m.get("lorkd_dedicated_sessions"),
        }
        rows.append(row)
        print(f"scale N={n:<5} [{label}] single {single['rps']:7.1f} req/s | mix {mix['rps']:7.1f} req/s "
              f"p99 {mix['p99_ms']:7.1f} ms hit {mix['hit_rate'] or 0:.3f} batch {mix['mean_batch'] or 0:.2f} | "
              f"RSS {mem['VmRSS'] / 2**20:.0f} MiB (peak {mem['VmHWM'] / 2**20:.0f}, "
              f"target {row['rss_target_bytes'] / 2**20:.0f})", flush=True)
    results["scale"] = rows


def section_execution(a, results: dict, logs: Path) -> None:
    """Issue 8: one expert vs a uniformly random mix over N experts (the shipped package for N = 3, synthetic
    packages otherwise) for each execution mode, side by side per server; path counts and RSS from the server."""
    rows = []
    for n in a.execution_counts:
        pkg = a.package if n <= len(json.loads((a.package / "manifest.json").read_text())["tasks"]) \
            else a.packages / f"synthetic-{n}"
        manifest, per_expert, single_kw, mix_kw = single_and_mix(a, pkg, n, f"exec-tasks-{n}.txt")
        budget = 16 * per_expert
        for mode in a.modes:
            with Server(a.binary, pkg, ["--cache-bytes", str(budget), "--execution", mode], logs,
                        f"exec-{n}-{mode}") as s:
                at_ready = s.memory()
                wrk(s, **single_kw, seconds=a.warmup)
                wrk(s, **mix_kw, seconds=a.warmup)
                before = s.metrics_by_label("lorkd_execution_images_total")
                agg = interleaved([("single", s, dict(single_kw, seconds=a.duration)),
                                   ("mix", s, dict(mix_kw, seconds=a.duration))], a.repeats)
                after = s.metrics_by_label("lorkd_execution_images_total")
                mem = s.memory()
                _, info = s.get("/v1/info")
            single, mix = agg["single"], agg["mix"]
            deltas_bytes = sum((pkg / t["file"]).stat().st_size for t in manifest["tasks"])
            shared_bytes = (pkg / manifest["model"]["file"]).stat().st_size
            row = {
                "experts": n, "execution": mode, "in_effect": json.loads(info)["runtime"]["execution"],
                "single": single, "mix": mix,
                "mix_over_single": mix["rps"] / single["rps"] if single["rps"] else None,
                "mix_p99_over_single": mix["p99_ms"] / single["p99_ms"] if single["p99_ms"] else None,
                "images_by_path": {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after},
                "rss_at_ready": at_ready["VmRSS"], "rss_after": mem["VmRSS"], "rss_peak": mem["VmHWM"],
                "shared_model_bytes": shared_bytes, "deltas_bytes": deltas_bytes,
                "rss_target_bytes": shared_bytes + deltas_bytes + 150 * 2**20,
            }
            rows.append(row)
            print(f"execution N={n:<5} {mode:<6} single {single['rps']:7.1f} req/s p99 {single['p99_ms']:6.1f} | "
                  f"mix {mix['rps']:7.1f} req/s p99 {mix['p99_ms']:6.1f} ms batch {mix['mean_batch'] or 0:5.2f} "
                  f"= {row['mix_over_single'] or 0:.2f}x | paths {row['images_by_path']} | "
                  f"RSS {mem['VmRSS'] / 2**20:.0f} MiB (peak {mem['VmHWM'] / 2**20:.0f}, "
                  f"target {row['rss_target_bytes'] / 2**20:.0f})", flush=True)
    results["execution"] = rows


def machine() -> dict:
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    return {"nproc": os.cpu_count(), "cpu": cpu.group(1) if cpu else "?",
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--binary", type=Path, default=Path("target/release/lorkd"))
    p.add_argument("--package", type=Path, default=Path("models/medmnist-lorkd"))
    p.add_argument("--packages", type=Path, default=Path("bench-out/packages"))
    p.add_argument("--task", default="retina")
    p.add_argument("--out", type=Path, default=Path("bench-out/results"))
    p.add_argument("--sections", default="warm,batching,cold,scale,execution")
    p.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run")
    p.add_argument("--warmup", type=int, default=2, help="seconds of wrk warm-up before measuring")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per row (medians are reported)")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--scale-concurrency", type=int, default=32)
    p.add_argument("--counts", default="10,100,1000")
    p.add_argument("--execution-counts", default="3,100,1000", help="experts in the mix (execution section)")
    p.add_argument("--modes", default="auto,merged,mixed", help="execution modes (execution section)")
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--cold-requests", type=int, default=60)
    p.add_argument("--cold-experts", type=int, default=100)
    p.add_argument("--check", action="store_true",
                   help="smoke mode: exit 1 when any request failed (never on a number)")
    a = p.parse_args(argv)
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    a.counts = [int(c) for c in a.counts.split(",") if c]
    a.execution_counts = [int(c) for c in a.execution_counts.split(",") if c]
    a.modes = [m for m in a.modes.split(",") if m]
    a.out.mkdir(parents=True, exist_ok=True)
    logs = a.out / "logs"
    logs.mkdir(exist_ok=True)
    results: dict = {"machine_before": machine(), "binary": str(a.binary), "task": a.task,
                     "duration_s": a.duration, "package": str(a.package)}
    sections = {"warm": section_warm, "batching": section_batching, "cold": section_cold,
                "scale": section_scale, "execution": section_execution}
    for name in a.sections.split(","):
        started = time.time()
        sections[name](a, results, logs)
        print(f"-- section {name}: {time.time() - started:.0f} s", flush=True)
    results["machine_after"] = machine()
    (a.out / "e2e.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {a.out / 'e2e.json'}")
    if a.check:
        runs = results.get("warm", []) + results.get("batching", [])
        runs += [r[k] for r in results.get("scale", []) + results.get("execution", []) for k in ("single", "mix")]
        failed = [r for r in runs if r["errors"] or not r["requests"]]
        failed += [v for v in results.get("cold", {}).values() if v.get("errors")]
        if failed:
            print(f"smoke check failed: {len(failed)} runs with failed requests: {failed}", file=sys.stderr)
            return 1
        print("smoke check: every request answered 2xx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
