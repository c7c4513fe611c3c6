"""Throughput benchmark of the mixed-task EKS graph against a merged expert (interleaved rounds, medians)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .eks_graph import VARIANTS, bank_layout, build_eks_model
from .package import load_package, merged_expert_onnx

DEFAULT_VARIANTS = ("naive", "stem", "interleave", "fused-all", "final")
LEVELS = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}


def make_session(model: bytes, threads: int, level: str = "all", optimized_out: Path | None = None
                 ) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = LEVELS[level]
    so.log_severity_level = 3
    if optimized_out is not None:
        so.optimized_model_filepath = str(optimized_out)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def random_banks(manifest: dict, layout: dict, experts: int, seed: int = 0, segment_banks: bool = False):
    """`experts` random experts (factor scale like the trained ones), heads padded to the largest class count."""
    rng = np.random.default_rng(seed)
    bank = (rng.standard_normal((experts, layout["bank_width"]), dtype=np.float32) * np.float32(0.05))
    classes = max(t["num_classes"] for t in manifest["tasks"])
    f = int(manifest["model"]["feature_dim"])
    hw = rng.standard_normal((experts, classes, f), dtype=np.float32) * np.float32(0.03)
    hb = rng.standard_normal((experts, classes), dtype=np.float32) * np.float32(0.1)
    feeds = {"factor_bank": bank, "head_weight_bank": hw, "head_bias_bank": hb}
    if segment_banks:  # the naive variant: one bank input per factor
        for s in layout["segments"]:
            n = s["rows"] * s["cols"]
            feeds[f"bank/{s['layer']}/{s['factor']}"] = np.ascontiguousarray(
                bank[:, s["offset"]: s["offset"] + n].reshape(experts, s["rows"], s["cols"]))
        del feeds["factor_bank"]
    return feeds


def bench_eks(pkg: Path, experts: int = 1000, batches: list[int] | tuple[int, ...] = (1, 8, 32),
              threads: list[int] | tuple[int, ...] = (2, 1), rounds: int = 15, variants: list[str] | None = None,
              opt_levels: list[str] | tuple[str, ...] = ("all",), min_time: float = 0.15,
              optimized_dir: Path | None = None, verbose: bool = True) -> dict:
    """Merged expert (W_t and head baked in, ORT_ENABLE_ALL) vs the mixed graph variants, images/s.

    Every round runs every (batch, session) in turn for at least `min_time` seconds; the reported ratio is the
    median over rounds of (mixed img/s / merged img/s) in the same round."""
    pkg = Path(pkg)
    manifest = load_package(pkg)
    layout = bank_layout(manifest)
    student = onnx.load(str(pkg / manifest["model"]["file"]))
    variants = list(variants or DEFAULT_VARIANTS)
    task = manifest["tasks"][0]["id"]
    with tempfile.TemporaryDirectory() as tmp:
        merged_path = Path(tmp) / "merged.onnx"
        merged_expert_onnx(pkg, task, merged_path)
        merged = merged_path.read_bytes()
    models = {v: build_eks_model(student, manifest, layout, VARIANTS[v]).SerializeToString() for v in variants}
    rng = np.random.default_rng(1)
    h, w = int(manifest["input"]["height"]), int(manifest["input"]["width"])
    out: dict = {"package": str(pkg), "experts": experts, "rounds": rounds, "ort": ort.__version__,
                 "merged_task": task, "results": {}}
    for t in threads:
        sessions: dict[str, ort.InferenceSession] = {}
        for lvl in opt_levels:
            sessions[f"merged@{lvl}"] = make_session(merged, t, lvl)
            for v in variants:
                opt_path = None
                if optimized_dir is not None:
                    optimized_dir.mkdir(parents=True, exist_ok=True)
                    opt_path = optimized_dir / f"{v}@{lvl}.onnx"
                sessions[f"{v}@{lvl}"] = make_session(models[v], t, lvl, opt_path)
        banks = {False: random_banks(manifest, layout, experts)}
        if any(VARIANTS[v].segment_banks for v in variants):
            banks[True] = random_banks(manifest, layout, experts, segment_banks=True)
        ort_banks = {k: {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in b.items()} for k, b in banks.items()}
        for b in batches:
            x = rng.standard_normal((b, 3, h, w), dtype=np.float32)
            xs = ort.OrtValue.ortvalue_from_numpy(x)
            slot_sets = [ort.OrtValue.ortvalue_from_numpy(rng.integers(0, experts, b).astype(np.int64))
                         for _ in range(16)]
            feeds = {}
            for name in sessions:
                v = name.split("@")[0]
                if v == "merged":
                    feeds[name] = [{"input": xs}]
                else:
                    bk = ort_banks[VARIANTS[v].segment_banks]
                    feeds[name] = [{"input": xs, "task_slot": s, **bk} for s in slot_sets]
            ips: dict[str, list[float]] = {n: [] for n in sessions}
            cps: dict[str, list[float]] = {n: [] for n in sessions}  # images per CPU second of this process
            for name, s in sessions.items():  # warm-up
                for f in feeds[name][:3]:
                    s.run_with_ort_values(["logits"], f)
            for _ in range(rounds):
                for name, s in sessions.items():
                    n = 0
                    t0, c0 = time.perf_counter(), time.process_time()
                    while True:
                        s.run_with_ort_values(["logits"], feeds[name][n % len(feeds[name])])
                        n += 1
                        el = time.perf_counter() - t0
                        if el >= min_time and n >= 3:
                            break
                    ips[name].append(n * b / el)
                    cps[name].append(n * b / max(time.process_time() - c0, 1e-9))
            res = {}
            for name in sessions:
                lvl = name.split("@")[1]
                base = ips[f"merged@{lvl}"]
                base_all = ips.get("merged@all", base)
                mine, cpu, cbase = ips[name], cps[name], cps.get("merged@all", cps[f"merged@{lvl}"])
                res[name] = {
                    "img_s": statistics.median(mine),
                    "ratio_vs_merged_same_level": statistics.median(a / m for a, m in zip(mine, base, strict=True)),
                    "ratio_vs_merged_all": statistics.median(a / m for a, m in zip(mine, base_all, strict=True)),
                    "img_per_cpu_s": statistics.median(cpu),
                    "cpu_ratio_vs_merged_all": statistics.median(a / m for a, m in zip(cpu, cbase, strict=True)),
                    "wall_rounds": mine, "cpu_rounds": cpu,
                }
            out["results"][f"threads={t},batch={b}"] = res
            if verbose:
                print(f"threads {t} batch {b}: " + ", ".join(
                    f"{n} {r['img_s']:.0f} img/s ({r['ratio_vs_merged_all']:.2f}x, "
                    f"cpu {r['cpu_ratio_vs_merged_all']:.2f}x)"
                    for n, r in res.items()),
                    flush=True)
    return out
