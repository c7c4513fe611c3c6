"""Parity of an exported package against the trained PyTorch EKS student, and the task-switch rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from .data import TaskData, task_tensor
from .models import Student
from .package import base_weights, delta, expert_feeds, load_package, read_expert, switch

EKS_TOLERANCE = 1e-4


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3  # the "initializer appears in graph inputs" warnings are by design here
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _finite_or_inf(err: float) -> float:
    """NaN logits must fail a tolerance check (max(x, nan) would silently keep x)."""
    return err if np.isfinite(err) else float("inf")


@torch.no_grad()
def task_parity(pkg: Path, manifest: dict, sess: ort.InferenceSession, w0: dict[str, np.ndarray], student: Student,
                t: int, td: TaskData, split: str = "test", batch_size: int = 256, base_images: int | None = None,
                progress: bool = False) -> dict:
    """One task: ORT with the merged W_t and head of manifest task `td.spec.id` vs the PyTorch EKS forward of
    the student's task index t, on a whole split; plus the base network (no layer inputs fed => W0)."""
    tid = td.spec.id
    feeds = expert_feeds(pkg, manifest, tid, w0)
    head = {k: feeds[k] for k in ("head_weight", "head_bias")}
    x_all = task_tensor(td, split)
    max_err = base_err = 0.0
    agree = 0
    for s in tqdm(range(0, len(x_all), batch_size), desc=f"parity {tid}", disable=not progress, leave=False):
        x = x_all[s:s + batch_size]
        ref = student.logits(student(x, torch.full((len(x),), t, dtype=torch.long)), t).numpy()
        got = sess.run(["logits"], {"input": x.numpy(), **feeds})[0]
        max_err = max(max_err, _finite_or_inf(float(np.abs(got - ref).max())))
        if base_images is None or s < base_images:
            xb = x if base_images is None else x[: base_images - s]
            base = student.logits(student(xb, None), t).numpy()
            got0 = sess.run(["logits"], {"input": xb.numpy(), **head})[0]
            base_err = max(base_err, _finite_or_inf(float(np.abs(got0 - base).max())))
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
    return {"n": len(x_all), "max_abs_err": max_err, "argmax_agreement": agree / len(x_all),
            "base_max_abs_err": base_err}


@torch.no_grad()
def package_parity(pkg: Path, student: Student, tasks: list[TaskData], split: str = "test",
                   batch_size: int = 256, base_images: int | None = None, progress: bool = False) -> dict:
    """Max |ORT(merged W_t, head_t) - PyTorch EKS| logits and argmax agreement per task on a whole split,
    plus the base network check (layer inputs not fed => W0; on the first `base_images` images of each task,
    all when None) and the switch error for every task pair."""
    pkg = Path(pkg)
    manifest = load_package(pkg)
    sess = session(pkg / manifest["model"]["file"])
    layers = manifest["layers"]
    names = [L["name"] for L in layers]
    w0 = base_weights(pkg / manifest["model"]["file"], names)
    student = student.eval()
    ids = [t["id"] for t in manifest["tasks"]]
    out: dict = {"tasks": {}}
    for t, td in enumerate(tasks):
        tid = td.spec.id
        if ids[t] != tid:
            raise ValueError(f"task order differs: package {ids} vs data {tid}")
        out["tasks"][tid] = task_parity(pkg, manifest, sess, w0, student, t, td, split, batch_size, base_images,
                                        progress)
    experts = {tid: read_expert(pkg / f"experts/{tid}.safetensors")[0] for tid in ids}
    scale = float(manifest["lora"]["scale"])
    sw = 0.0
    for a in ids:
        w_a = {n: w0[n] + delta(experts[a], n, L["shape"], scale) for n, L in zip(names, layers, strict=True)}
        for b in ids:
            if a == b:
                continue
            w_b = switch(w_a, experts[a], experts[b], layers, scale)
            direct = {n: w0[n] + delta(experts[b], n, L["shape"], scale) for n, L in zip(names, layers, strict=True)}
            sw = max(sw, max(float(np.abs(w_b[n] - direct[n]).max()) for n in names))
    out["switch_max_abs_err"] = sw
    out["max_abs_err"] = max(v["max_abs_err"] for v in out["tasks"].values())
    out["argmax_agreement"] = min(v["argmax_agreement"] for v in out["tasks"].values())
    if "eks" in manifest["model"]:
        out["eks"] = eks_parity(pkg, manifest, student, tasks, split, progress=progress)
    return out


@torch.no_grad()
def eks_parity(pkg: Path, manifest: dict, student: Student, tasks: list[TaskData], split: str = "test",
               batch_size: int = 64, seed: int = 0, progress: bool = False) -> dict:
    """The mixed-task graph (student_eks.onnx) on a whole split vs the PyTorch EKS forward: every task alone,
    then all tasks' images shuffled together into mixed batches. The experts sit in shuffled bank slots next
    to a random, unused slot row (slots are not task indices; an unused row must not matter)."""
    from .eks_graph import eks_session_inputs

    eks = manifest["model"]["eks"]
    sess = session(Path(pkg) / eks["file"])
    ids = [t["id"] for t in manifest["tasks"]]
    rng = np.random.default_rng(seed)
    slot_of, feeds = eks_session_inputs(pkg, manifest, ids, rng)
    xs, refs, tix = [], [], []
    for t, td in enumerate(tasks):
        x = task_tensor(td, split)
        ref = np.concatenate([student.logits(student(x[s:s + 256], torch.full((len(x[s:s + 256]),), t)), t).numpy()
                              for s in range(0, len(x), 256)])
        xs.append(x.numpy())
        refs.append(ref)
        tix.append(np.full(len(x), t))

    def run(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        slots = np.array([slot_of[ids[int(i)]] for i in t], dtype=np.int64)
        return sess.run([eks["output_name"]], {eks["input_name"]: x, eks["task_input"]: slots, **feeds})[0]

    def compare(got: np.ndarray, ref: np.ndarray) -> tuple[float, int]:
        n = ref.shape[1]
        err = _finite_or_inf(float(np.abs(got[:, :n] - ref).max()))
        return err, int((got[:, :n].argmax(1) == ref.argmax(1)).sum())

    out: dict = {"alone": {}, "mixed": {}}
    for t, td in enumerate(tasks):
        err, agree = 0.0, 0
        for s in tqdm(range(0, len(xs[t]), batch_size), desc=f"eks alone {td.spec.id}", disable=not progress,
                      leave=False):
            e, a = compare(run(xs[t][s:s + batch_size], tix[t][s:s + batch_size]), refs[t][s:s + batch_size])
            err, agree = max(err, e), agree + a
        out["alone"][td.spec.id] = {"n": len(xs[t]), "max_abs_err": err, "argmax_agreement": agree / len(xs[t])}
    x_all = np.concatenate(xs)
    t_all = np.concatenate(tix)
    pos = np.concatenate([np.arange(len(x)) for x in xs])
    order = rng.permutation(len(x_all))
    err, agree, mixed_batches = 0.0, 0, 0
    for s in tqdm(range(0, len(order), batch_size), desc="eks mixed", disable=not progress, leave=False):
        idx = order[s:s + batch_size]
        got = run(x_all[idx], t_all[idx])
        mixed_batches += int(len(set(t_all[idx].tolist())) > 1)
        for t in set(t_all[idx].tolist()):
            sel = t_all[idx] == t
            e, a = compare(got[sel], refs[t][pos[idx][sel]])
            err, agree = max(err, e), agree + a
    out["mixed"] = {"n": len(x_all), "batch_size": batch_size, "batches_with_several_tasks": mixed_batches,
                    "max_abs_err": err, "argmax_agreement": agree / len(x_all)}
    out["max_abs_err"] = max([err] + [v["max_abs_err"] for v in out["alone"].values()])
    out["argmax_agreement"] = min([agree / len(x_all)] + [v["argmax_agreement"] for v in out["alone"].values()])
    return out
