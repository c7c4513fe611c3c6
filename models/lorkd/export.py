"""Export: trained LoRKD student -> servable package (FORMAT.md v1), and standalone merged experts."""

from __future__ import annotations

import datetime as _dt
import io
import json
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper
from PIL import Image
from safetensors.numpy import save_file

from . import __version__
from .data import TaskData, to_tensor
from .models import DeployStudent, Student, count_params_macs, deploy_layers, fold_student
from .package import FORMAT, FORMAT_VERSION, sha256_file

OPSET = 17


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_deploy(student: Student) -> tuple[torch.nn.Module, dict]:
    """BN-folded deploy network (forward(x, head_weight, head_bias), parameters under `net.`) and factors."""
    if hasattr(student, "deploy"):  # lorkd.decompose.LoRKDStudent: architecture-agnostic folding
        return student.deploy()
    state, factors = fold_student(student.eval())
    deploy = DeployStudent(student.cfg).eval()
    deploy.load_state_dict(state)
    return deploy, factors


def _onnx_export(module: torch.nn.Module, args: tuple, input_names, dynamic_axes) -> onnx.ModelProto:
    """TorchScript-based exporter (stable, parameter-named initializers), in memory."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, buf, dynamo=False, opset_version=OPSET, input_names=input_names,
            output_names=["logits"], dynamic_axes=dynamic_axes, do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def image_size(student: torch.nn.Module) -> int:
    """The student's square input size (the built-in ShuffleNetV2 is the 28-px one)."""
    return int(getattr(student.cfg, "image_size", 28))


def arch_name(student: torch.nn.Module) -> str:
    cfg = student.cfg
    if hasattr(cfg, "arch"):
        return f"{cfg.arch}_{cfg.image_size}px"
    return "shufflenet_v2_x1_0_28px" if cfg.stages_out_channels[-1] == 1024 else "shufflenet_v2_custom_28px"


def export_student_onnx(deploy: torch.nn.Module, layer_names: list[str], path: Path, feature_dim: int,
                        size: int = 28) -> None:
    """Write student.onnx: folded W0 as overridable initializers named as the layers, dynamic batch/classes.

    Height and width are fixed at `size` (the manifest's input size; the service checks each task against the
    graph's input dims at load)."""
    f = feature_dim
    args = (torch.zeros(2, 3, size, size), torch.zeros(3, f), torch.zeros(3))
    model = _onnx_export(
        deploy, args, ["input", "head_weight", "head_bias"],
        {"input": {0: "batch"}, "head_weight": {0: "classes"}, "head_bias": {0: "classes"},
         "logits": {0: "batch", 1: "classes"}},
    )
    g = model.graph
    # strip the wrapper prefix "net." from every initializer name, keep node references in sync
    rename = {i.name: i.name[len("net."):] for i in g.initializer if i.name.startswith("net.")}
    for init in g.initializer:
        init.name = rename.get(init.name, init.name)
    for node in g.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
    inits = {i.name: i for i in g.initializer}
    missing = [n for n in layer_names if n not in inits]
    if missing:
        raise RuntimeError(f"exporter did not keep initializers for {missing[:3]}...")
    existing_inputs = {i.name for i in g.input}
    for name in layer_names:
        if name in existing_inputs:
            continue
        dims = list(inits[name].dims)
        g.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
    model.doc_string = "lorkd student: W0 of decomposed convs are overridable initializers (FORMAT.md v1)"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def choose_golden(labels: np.ndarray, n: int) -> list[int]:
    """First test image of each class (round robin over classes), n in total: covers every class it can."""
    by_class = [list(np.flatnonzero(labels == c)) for c in range(int(labels.max()) + 1)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(n, len(labels)):
        for idxs in by_class:
            if depth < len(idxs) and len(chosen) < n:
                chosen.append(int(idxs[depth]))
        depth += 1
    return chosen


def save_png(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if img.shape[-1] == 1:
        Image.fromarray(img[..., 0], mode="L").save(path, optimize=True)
    else:
        Image.fromarray(img, mode="RGB").save(path, optimize=True)


def expert_tensors(student: torch.nn.Module, factors: dict[str, dict[str, torch.Tensor]], layer_names: list[str],
                   t: int) -> dict[str, np.ndarray]:
    """The tensors of expert file t (FORMAT.md section 2): BN-folded factors of every layer and head t."""
    tensors: dict[str, np.ndarray] = {}
    for layer in layer_names:
        tensors[f"{layer}.lora_A"] = factors[layer]["A"][t].numpy().astype(np.float32)
        tensors[f"{layer}.lora_B"] = factors[layer]["B"][t].numpy().astype(np.float32)
    tensors["head.weight"] = student.heads[t].weight.detach().numpy().astype(np.float32)
    tensors["head.bias"] = student.heads[t].bias.detach().numpy().astype(np.float32)
    return tensors


def write_expert(path: Path, tensors: dict[str, np.ndarray], task: str, rank: int, alpha: float) -> None:
    """One expert file with its metadata (format, task, rank, alpha, scale)."""
    meta = {
        "format": "lorkd-expert", "format_version": str(FORMAT_VERSION), "task": task,
        "rank": str(rank), "alpha": repr(float(alpha)), "scale": repr(float(alpha / rank)),
    }
    save_file(tensors, str(path), metadata=meta)
    # safetensors writes 0600; a package is served by another user (the image runs as uid 65532).
    Path(path).chmod(0o644)


def golden_cases(student: torch.nn.Module, t: int, td: TaskData, out_dir: Path, n: int) -> list[dict]:
    """Write n golden test images of task td (head t of `student`) under out_dir/golden/<id>/ and return their
    cases: logits of the exported PyTorch model (EKS forward, unmerged, BN unfolded)."""
    idx = choose_golden(td.labels["test"], n)
    imgs = td.images["test"][idx]
    x = to_tensor(imgs, td.spec.mean, td.spec.std)
    with torch.no_grad():
        logits = student.logits(student(x, torch.full((len(idx),), t, dtype=torch.long)), t)
    probs = torch.softmax(logits, dim=1)
    cases = []
    for j, i in enumerate(idx):
        rel = f"golden/{td.spec.id}/{j}.png"
        save_png(imgs[j], Path(out_dir) / rel)
        cases.append({
            "task": td.spec.id, "file": rel, "label": int(td.labels["test"][i]), "test_index": i,
            "logits": [float(v) for v in logits[j]], "probabilities": [float(v) for v in probs[j]],
            "top1": int(logits[j].argmax()),
        })
    return cases


def task_entry(td: TaskData, size: int, metrics: dict) -> dict:
    """The manifest entry of one task (FORMAT.md section 5)."""
    return {
        "id": td.spec.id, "name": td.spec.name, "modality": td.spec.modality,
        "labels": list(td.spec.labels), "num_classes": td.spec.num_classes,
        "file": f"experts/{td.spec.id}.safetensors",
        "input": {"channels": td.spec.channels, "height": size, "width": size,
                  "mean": list(td.spec.mean), "std": list(td.spec.std)},
        "metrics": metrics,
    }


def export_package(
    student: Student,
    tasks: list[TaskData],
    out_dir: Path,
    *,
    name: str = "medmnist-lorkd",
    description: str = "",
    metrics: dict[str, dict[str, float]] | None = None,
    provenance: dict | None = None,
    golden_per_task: int = 4,
    readme: str | None = None,
    eks: bool = True,
) -> dict:
    """Write the package folder; returns the manifest. The student must be a decomposed (lora_tasks > 0) one.
    With `eks`, also the mixed-task graph student_eks.onnx and manifest.model.eks (lorkd.eks_graph)."""
    cfg = student.cfg
    if cfg.lora_tasks != len(tasks):
        raise ValueError("student must have one set of factors per task")
    student = student.eval()
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "experts").mkdir(parents=True)
    layers = deploy_layers(student)
    layer_names = [L["name"] for L in layers]
    deploy, factors = build_deploy(student)
    size = image_size(student)
    export_student_onnx(deploy, layer_names, out_dir / "student.onnx", cfg.feature_dim, size)

    scale = cfg.alpha / cfg.rank
    for t, td in enumerate(tasks):
        write_expert(out_dir / "experts" / f"{td.spec.id}.safetensors",
                     expert_tensors(student, factors, layer_names, t), td.spec.id, cfg.rank, cfg.alpha)

    cases = []
    for t, td in enumerate(tasks):
        cases += golden_cases(student, t, td, out_dir, golden_per_task)
    with open(out_dir / "golden" / "golden.json", "w") as f:
        json.dump({"tolerance": 1e-4, "cases": cases}, f, indent=1)

    params, macs = count_params_macs(deploy.net, input_shape=(1, 3, size, size), extra_args=())
    if readme:
        (out_dir / "README.md").write_text(readme)
    files = {}
    for p in sorted(out_dir.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            files[p.relative_to(out_dir).as_posix()] = sha256_file(p)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "description": description,
        "model": {
            "file": "student.onnx", "arch": arch_name(student), "opset": OPSET,
            "input_name": "input", "output_name": "logits",
            "head_weight_input": "head_weight", "head_bias_input": "head_bias",
            "feature_dim": cfg.feature_dim,
            "parameters": params,
            "flops": macs,
            "flops_note": f"multiply-accumulates per {size}x{size} image, backbone only "
                          "(a head adds classes*feature_dim)",
        },
        "input": {"channels": 3, "height": size, "width": size, "layout": "NCHW", "dtype": "float32"},
        "lora": {"rank": cfg.rank, "alpha": float(cfg.alpha), "scale": float(scale)},
        "layers": layers,
        "tasks": [task_entry(td, size, (metrics or {}).get(td.spec.id, {})) for td in tasks],
        "files": files,
        "provenance": {
            "data": {td.spec.id: {"file": td.spec.file, "md5": td.md5} for td in tasks},
            "config": {},
            "git_revision": git_revision(),
            "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "toolkit_version": __version__,
            **(provenance or {}),
        },
    }
    with open(out_dir / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1)
    if eks:
        from .eks_graph import export_eks

        export_eks(out_dir)
        manifest = json.loads((out_dir / "manifest.json").read_text())
    return manifest
