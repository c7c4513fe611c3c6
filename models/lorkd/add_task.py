"""Add one task's expert to an existing package without retraining (or touching) the other experts.

The base is the package's trained PyTorch student (the checkpoint that `export --checkpoint-out` records in the
manifest's provenance): its shared weights W0, depthwise convs and BatchNorm are frozen (BN in eval mode) and
only the new task's factors B_t A_t in every decomposed layer and its head are trained, with the transfer loss
when a teacher is given. The new expert is exported exactly as `export` writes experts (BN-folded factors), so
the unchanged service merges it onto the unchanged `student.onnx`. Files written: `experts/<id>.safetensors`,
`golden/<id>/<n>.png`, `golden/golden.json` (cases appended) and `manifest.json` (task entry, checksums,
`provenance.tasks.<id>`); every other file of the package stays byte-identical.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .data import load_task
from .eks import EKSConv2d
from .export import build_deploy, expert_tensors, git_revision, golden_cases, task_entry, write_expert
from .metrics import evaluate
from .models import TaskBatchNorm2d, Teacher, deploy_layers, fold_task_bn
from .package import PackageError, base_weights, load_package, sha256_file, validate_manifest
from .parity import session, task_parity
from .train import TrainConfig, build_model_for, teacher_features, train_run

# Training defaults of add-task on top of the base run's config (then --set): measured on the leave-one-out
# experiment (models/README.md). The base run's SGD lr 0.05 barely moved the factors in this budget; AdamW
# lr 2e-3 on factors and head, 160 steps of 64, brought every added expert within 2 points of the joint one.
DEFAULTS = ("optimizer=adamw", "lr=0.002", "batch_size=64", "epochs=5", "epoch_draws=2048")
PARITY_TOLERANCE = 1e-4
BASE_TOLERANCE = 1e-5  # folded W0 of the checkpoint vs student.onnx (float32 rounding of the fold)


def heads_num_classes(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """Class count of every head of a student/teacher state dict (`heads.<i>.weight`), in head order."""
    ncls = {int(k.split(".")[1]): int(v.shape[0]) for k, v in state.items()
            if k.startswith("heads.") and k.endswith(".weight")}
    return tuple(ncls[i] for i in range(len(ncls)))


def base_checkpoint_path(pkg: Path, manifest: dict, checkpoint: Path | None) -> Path:
    """The student checkpoint to train against: the given one, else the one the manifest's provenance names."""
    if checkpoint is not None:
        return Path(checkpoint)
    rec = manifest.get("provenance", {}).get("pytorch_checkpoint")
    if not rec:
        raise PackageError(f"{pkg}: the manifest names no pytorch_checkpoint; pass --checkpoint")
    p = Path(rec["path"])
    p = p / "best.pt" if p.suffix != ".pt" else p
    if not p.exists() and not p.is_absolute():
        p = Path(pkg).resolve().parents[1] / p  # paths are recorded relative to the repository root
    if rec.get("sha256") and p.exists() and sha256_file(p) != rec["sha256"]:
        raise PackageError(f"{p}: sha256 differs from the manifest's provenance.pytorch_checkpoint")
    return p


def load_base_student(checkpoint: Path) -> tuple[nn.Module, TrainConfig]:
    """The package's trained student from its checkpoint (`config.json` beside it), without the tasks' data."""
    checkpoint = Path(checkpoint)
    cfg = TrainConfig.from_dict(json.loads((checkpoint.parent / "config.json").read_text()))
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    student = build_model_for(cfg, heads_num_classes(ck["model"]))
    student.load_state_dict(ck["model"])
    return student.eval(), cfg


def one_task_view(student: nn.Module, num_classes: int, seed: int = 0) -> nn.Module:
    """Turn a trained T-task student into a 1-task student over the same shared weights: every EKS conv keeps
    W0 and gets fresh factors (A Kaiming-uniform, B = 0, so the new expert starts as the base network), and one
    new head. Separate parameters (not a new slot of the stacked factors) keep the other tasks' factors out of
    the optimiser entirely (weight decay and momentum would move them otherwise)."""
    g = torch.Generator().manual_seed(seed)
    for m in student.modules():
        if isinstance(m, EKSConv2d) and m.rank > 0:
            k, r = m.k, m.rank
            a = torch.empty(1, r * k, m.in_channels * k)
            bound = 1.0 / math.sqrt(m.in_channels * k)  # kaiming_uniform_(a=sqrt(5)) on a (r k, Cin k) matrix
            a.uniform_(-bound, bound, generator=g)
            m.lora_A = nn.Parameter(a)
            m.lora_B = nn.Parameter(torch.zeros(1, m.out_channels * k, r * k))
            m.num_tasks = 1
        if isinstance(m, TaskBatchNorm2d):
            m.bns = nn.ModuleList([reference_batchnorm(m)])
    student.cfg = dataclasses.replace(student.cfg, num_classes=(num_classes,), lora_tasks=1)
    head = nn.Linear(student.cfg.feature_dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.empty_like(head.weight).uniform_(-1, 1, generator=g) / math.sqrt(head.in_features))
        head.bias.zero_()
    student.heads = nn.ModuleList([head])
    return student


@torch.no_grad()
def reference_batchnorm(m: TaskBatchNorm2d) -> nn.BatchNorm2d:
    """The new task's BatchNorm of a per-task-BatchNorm student: the base network's affine (what student.onnx
    holds), frozen like every other BatchNorm, so its expert's scale and shift deltas are zero. Pins the module's
    reference first: the mean over tasks would otherwise become this one task's own affine."""
    s0, b0 = m.reference = tuple(v.clone() for v in m.reference_affine())
    bn = nn.BatchNorm2d(len(s0), eps=0.0)  # eps 0: scale = weight / sqrt(1) = s0 exactly
    bn.weight.copy_(s0)
    bn.bias.copy_(b0)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    return bn.eval()


def folded_w0(student: nn.Module) -> dict[str, np.ndarray]:
    """W0 of every decomposed layer with its BatchNorm folded in (what student.onnx holds); with per-task
    BatchNorm, the unfolded convs and every unit's reference scale and shift."""
    if getattr(student.cfg, "task_bn", False):
        state, _ = fold_task_bn(student)
        return {L["name"]: state[f"net.{L['name']}"].numpy() for L in deploy_layers(student)}
    out = {}
    with torch.no_grad():
        for name, conv, bn in student.eks_layers():
            s = torch.ones(conv.out_channels) if bn is None else bn.weight / torch.sqrt(bn.running_var + bn.eps)
            out[name] = (conv.weight * s.view(-1, 1, 1, 1)).float().numpy()
    return out


def check_base(pkg: Path, manifest: dict, student: nn.Module) -> float:
    """The checkpoint must be the package's student: same layers, rank, alpha, and folded W0 equal to the
    initializers of student.onnx. Returns the max abs W0 difference."""
    names = [L["name"] for L in manifest["layers"]]
    mine = folded_w0(student)
    if list(mine) != names:
        raise PackageError("the checkpoint's decomposed layers differ from the package's layers")
    cfg = student.cfg
    if cfg.rank != manifest["lora"]["rank"] or float(cfg.alpha) != float(manifest["lora"]["alpha"]):
        raise PackageError("the checkpoint's rank/alpha differ from the package's lora settings")
    w0 = base_weights(Path(pkg) / manifest["model"]["file"], names)
    err = max(float(np.abs(w0[n] - mine[n]).max()) for n in names)
    if err > BASE_TOLERANCE:
        raise PackageError(f"the checkpoint is not this package's student (folded W0 differs by {err:.2e})")
    return err


def load_teacher_run(run: Path) -> Teacher:
    """A teacher trained by `train --mode teacher`, built from its own checkpoint (no data of its tasks needed)."""
    cfg = json.loads((Path(run) / "config.json").read_text())
    ck = torch.load(Path(run) / "best.pt", map_location="cpu", weights_only=False)
    teacher = Teacher(heads_num_classes(ck["model"]), cfg.get("teacher_arch", "resnet18"),
                      cfg.get("teacher_stem_stride", 2))
    teacher.load_state_dict(ck["model"])
    return teacher.eval()


def frozen_state(student: nn.Module) -> dict[str, torch.Tensor]:
    """Everything add-task must not change: all parameters and buffers but the new factors and head."""
    return {k: v.detach().clone() for k, v in student.state_dict().items()
            if "lora_A" not in k and "lora_B" not in k and not k.startswith("heads.")}


def with_task(tasks: list[dict], entry: dict) -> list[dict]:
    """The manifest's task list with `entry` appended, or in place of the task of the same id."""
    if any(t["id"] == entry["id"] for t in tasks):
        return [entry if t["id"] == entry["id"] else t for t in tasks]
    return tasks + [entry]


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.chmod(0o644)
    os.replace(tmp, path)


def add_task(
    pkg: Path,
    task_id: str,
    run: Path,
    *,
    source: dict | None = None,
    checkpoint: Path | None = None,
    data_dir: Path | None = None,
    teacher_run: Path | None = None,
    teacher_features_file: Path | None = None,
    overrides: list[str] | None = None,
    golden_per_task: int = 4,
    replace: bool = False,
    progress: bool = True,
) -> dict:
    """Train task `task_id` against the package's frozen student and add its expert to the package.

    `run` holds the training run (checkpoints, history; resumable). Returns the task's provenance record.
    """
    t_start = time.time()
    pkg = Path(pkg)
    manifest = load_package(pkg)
    ids = [t["id"] for t in manifest["tasks"]]
    if task_id in ids and not replace:
        raise PackageError(f"task {task_id!r} is already in {pkg} (use --replace to retrain it)")
    ck_path = base_checkpoint_path(pkg, manifest, checkpoint)
    student, base_cfg = load_base_student(ck_path)
    w0_err = check_base(pkg, manifest, student)
    size = int(manifest["input"]["height"])
    td = load_task(task_id, source, data_dir, size)

    teacher_info: dict = {}
    tf_path = ""
    if teacher_run is not None:
        run.mkdir(parents=True, exist_ok=True)
        tf_path = str(Path(run) / "teacher_features.pt")
        if not Path(tf_path).exists():
            torch.set_num_threads(base_cfg.num_threads)
            teacher_features(load_teacher_run(teacher_run), [td], Path(tf_path), progress=progress)
        teacher_info = {"run": str(teacher_run), "sha256": sha256_file(Path(teacher_run) / "best.pt")}
    elif teacher_features_file is not None:
        tf_path = str(teacher_features_file)
        teacher_info = {"features": tf_path, "sha256": sha256_file(Path(tf_path))}
    cfg = TrainConfig.from_dict({
        **base_cfg.to_dict(), "mode": "lorkd" if tf_path else "lorkd_nokd", "tasks": [task_id],
        "task_sources": {task_id: source} if source else {}, "teacher_features": tf_path, "freeze_base": True,
        "epoch_draws": 0, "max_batches_per_epoch": 0, "micro_batches": 0,
    }).with_overrides([*DEFAULTS, *(overrides or [])])
    if not cfg.freeze_base:
        raise ValueError("add-task trains against a frozen base: freeze_base cannot be turned off")

    view = one_task_view(student, td.spec.num_classes, cfg.seed)
    before = frozen_state(view)
    summary = train_run(cfg, [td], Path(run), progress=progress, model=view)
    best = torch.load(Path(run) / "best.pt", map_location="cpu", weights_only=False)
    view.load_state_dict(best["model"])
    view = view.eval()
    after = frozen_state(view)
    if any(not torch.equal(before[k], after[k]) for k in before):
        raise RuntimeError("add-task changed a frozen weight of the shared student")

    test = evaluate(view, [td], "test")[task_id]
    val = evaluate(view, [td], "val")[task_id]
    metrics = {"test_acc": test["acc"], "test_auc": test["auc"], "val_acc": val["acc"], "val_auc": val["auc"]}

    # the expert file, exported exactly as `export` does (BN-folded factors, same metadata)
    layer_names = [L["name"] for L in manifest["layers"]]
    _, factors = build_deploy(view)
    rel = f"experts/{task_id}.safetensors"
    tmp_expert = pkg / "experts" / f".{task_id}.safetensors.tmp"
    tensors = expert_tensors(view, factors, layer_names, 0)
    if not all(np.isfinite(v).all() for v in tensors.values()):
        raise RuntimeError(f"training of {task_id} diverged (non-finite factors or head): lower lr")
    write_expert(tmp_expert, tensors, task_id, cfg.rank, cfg.alpha)

    new = json.loads(json.dumps(manifest))
    entry = task_entry(td, size, {"test_acc": test["acc"], "test_auc": test["auc"]})
    new["tasks"] = with_task(new["tasks"], entry)
    # parity before anything visible changes: ORT with the merged weights vs the PyTorch forward, whole test split
    check = {**new, "tasks": with_task(new["tasks"], {**entry, "file": tmp_expert.relative_to(pkg).as_posix()})}
    sess = session(pkg / manifest["model"]["file"])
    w0 = base_weights(pkg / manifest["model"]["file"], layer_names)
    with torch.no_grad():
        parity = task_parity(pkg, check, sess, w0, view, 0, td, "test", base_images=64)
    if parity["max_abs_err"] > PARITY_TOLERANCE or parity["argmax_agreement"] != 1.0:
        tmp_expert.unlink()
        raise RuntimeError(f"parity failed for {task_id}: {parity}")

    # golden cases of the new task (old cases of the same id dropped when replacing)
    golden_path = pkg / "golden" / "golden.json"
    golden = json.loads(golden_path.read_text())
    old_golden = pkg / "golden" / task_id
    if old_golden.exists():
        shutil.rmtree(old_golden)
    cases = golden_cases(view, 0, td, pkg, golden_per_task)
    for p in old_golden.iterdir():
        p.chmod(0o644)
    golden["cases"] = [c for c in golden["cases"] if c["task"] != task_id] + cases
    _write_json_atomic(golden_path, golden)
    os.replace(tmp_expert, pkg / rel)

    files = {k: v for k, v in new["files"].items() if not k.startswith(f"golden/{task_id}/")}
    files[rel] = sha256_file(pkg / rel)
    files["golden/golden.json"] = sha256_file(golden_path)
    for c in cases:
        files[c["file"]] = sha256_file(pkg / c["file"])
    new["files"] = dict(sorted(files.items()))
    added = os.path.getsize(pkg / rel)
    record = {
        "method": "add-task: new factors and head trained against the frozen shared student",
        "base": {"student_onnx_sha256": manifest["files"][manifest["model"]["file"]],
                 "checkpoint": ck_path.as_posix(), "checkpoint_sha256": sha256_file(ck_path),
                 "w0_max_abs_diff": w0_err},
        "data": {"file": td.spec.file, "md5": td.md5},
        "config": cfg.to_dict(),
        "teacher": teacher_info,
        "metrics": metrics,
        "parity": parity,
        "run": {"best_epoch": best.get("epoch"), "train_seconds": summary["wall_seconds"],
                "total_seconds": time.time() - t_start},
        "bytes_added": {"expert": added, "golden": sum(os.path.getsize(pkg / c["file"]) for c in cases)},
        "git_revision": git_revision(),
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "toolkit_version": __version__,
    }
    prov = new.setdefault("provenance", {})
    prov.setdefault("tasks", {})[task_id] = record
    validate_manifest(new)
    _write_json_atomic(pkg / "manifest.json", new)
    load_package(pkg)  # every checksum, the new ones included
    return record
