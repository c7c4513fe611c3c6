"""Reading a lorkd package (FORMAT.md v1): manifest, checksums, expert files and the merge/switch rule."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from safetensors import safe_open

FORMAT = "lorkd-package"
FORMAT_VERSION = 1
EXPERT_FORMAT = "lorkd-expert"
TASK_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class PackageError(ValueError):
    """A package that does not satisfy FORMAT.md."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def expert_version(pkg: Path, manifest: dict, task: str) -> str:
    spec = next(t for t in manifest["tasks"] if t["id"] == task)
    s = manifest["files"][manifest["model"]["file"]] + ":" + manifest["files"][spec["file"]]
    return hashlib.sha256(s.encode()).hexdigest()[:16]


def load_manifest(pkg: Path) -> dict:
    with open(Path(pkg) / "manifest.json") as f:
        return json.load(f)


def validate_manifest(manifest: dict) -> None:
    """Schema checks of FORMAT.md section 5 (raises PackageError)."""

    def need(obj: dict, key: str, typ, where: str):
        if key not in obj:
            raise PackageError(f"{where}: missing key {key!r}")
        if not isinstance(obj[key], typ):
            raise PackageError(f"{where}.{key}: expected {typ}, got {type(obj[key]).__name__}")
        return obj[key]

    if need(manifest, "format", str, "manifest") != FORMAT:
        raise PackageError(f"manifest.format must be {FORMAT!r}")
    if need(manifest, "format_version", int, "manifest") != FORMAT_VERSION:
        raise PackageError(f"unsupported format_version {manifest['format_version']}")
    need(manifest, "name", str, "manifest")
    model = need(manifest, "model", dict, "manifest")
    for k in ("file", "input_name", "output_name", "head_weight_input", "head_bias_input"):
        need(model, k, str, "model")
    need(model, "feature_dim", int, "model")
    need(model, "opset", int, "model")
    inp = need(manifest, "input", dict, "manifest")
    for k in ("channels", "height", "width"):
        need(inp, k, int, "input")
    lora = need(manifest, "lora", dict, "manifest")
    need(lora, "rank", int, "lora")
    for k in ("alpha", "scale"):
        need(lora, k, (int, float), "lora")
    if abs(lora["scale"] - lora["alpha"] / lora["rank"]) > 1e-9:
        raise PackageError("lora.scale != alpha / rank")
    layers = need(manifest, "layers", list, "manifest")
    if not layers:
        raise PackageError("manifest.layers is empty")
    r = lora["rank"]
    for i, layer in enumerate(layers):
        where = f"layers[{i}]"
        need(layer, "name", str, where)
        shape = need(layer, "shape", list, where)
        k = need(layer, "kernel", int, where)
        if len(shape) != 4 or shape[2] != k or shape[3] != k:
            raise PackageError(f"{where}: shape {shape} does not match kernel {k}")
        cout, cin = shape[0], shape[1]
        if need(layer, "a_shape", list, where) != [r * k, cin * k]:
            raise PackageError(f"{where}: a_shape must be [r*k, Cin*k]")
        if need(layer, "b_shape", list, where) != [cout * k, r * k]:
            raise PackageError(f"{where}: b_shape must be [Cout*k, r*k]")
    tasks = need(manifest, "tasks", list, "manifest")
    seen = set()
    for i, task in enumerate(tasks):
        where = f"tasks[{i}]"
        tid = need(task, "id", str, where)
        if not TASK_ID_RE.match(tid) or tid in seen:
            raise PackageError(f"{where}: bad or duplicate id {tid!r}")
        seen.add(tid)
        labels = need(task, "labels", list, where)
        if need(task, "num_classes", int, where) != len(labels):
            raise PackageError(f"{where}: num_classes != len(labels)")
        need(task, "file", str, where)
        tin = need(task, "input", dict, where)
        if need(tin, "channels", int, f"{where}.input") not in (1, 3):
            raise PackageError(f"{where}.input.channels must be 1 or 3")
        for k in ("mean", "std"):
            if len(need(tin, k, list, f"{where}.input")) != 3:
                raise PackageError(f"{where}.input.{k} must have 3 values")
    files = need(manifest, "files", dict, "manifest")
    extra = []
    if "eks" in model:
        validate_eks(need(model, "eks", dict, "model"), layers, r)
        extra.append(model["eks"]["file"])
    for f in [model["file"]] + [t["file"] for t in tasks] + extra:
        if f not in files:
            raise PackageError(f"files: {f} is not listed")
    for path, digest in files.items():
        if path == "manifest.json" or "\\" in path or path.startswith("/") or ".." in path.split("/"):
            raise PackageError(f"files: bad path {path!r}")
        if not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
            raise PackageError(f"files[{path}]: not a lowercase sha256 hex digest")


def validate_eks(eks: dict, layers: list[dict], package_rank: int) -> None:
    """`model.eks` (FORMAT.md section 8): one A and one B segment per layer, shapes at the bank rank, inside
    the row and not overlapping."""

    def need(key: str, typ):
        if not isinstance(eks.get(key), typ) or isinstance(eks.get(key), bool):
            raise PackageError(f"model.eks.{key}: missing or not {typ.__name__}")
        return eks[key]

    for k in ("file", "input_name", "task_input", "bank_input", "head_weight_input", "head_bias_input",
              "output_name"):
        need(k, str)
    rank, width = need("rank", int), need("bank_width", int)
    if rank < package_rank:
        raise PackageError("model.eks.rank is below lora.rank")
    want = {}
    for L in layers:
        cout, cin, k = L["shape"][0], L["shape"][1], L["kernel"]
        want[(L["name"], "A")] = [rank * k, cin * k]
        want[(L["name"], "B")] = [cout * k, rank * k]
    spans = []
    seen = set()
    for i, seg in enumerate(need("segments", list)):
        if not isinstance(seg, dict):
            raise PackageError(f"model.eks.segments[{i}]: not an object")
        key = (seg.get("layer"), seg.get("factor"))
        vals = [seg.get("offset"), seg.get("rows"), seg.get("cols")]
        if key not in want or key in seen or not all(isinstance(v, int) and v >= 0 for v in vals):
            raise PackageError(f"model.eks.segments[{i}]: unknown or duplicate {key} or bad numbers")
        if vals[1:] != want[key]:
            raise PackageError(f"model.eks.segments[{i}]: shape {vals[1:]} != {want[key]} at rank {rank}")
        seen.add(key)
        spans.append((vals[0], vals[0] + vals[1] * vals[2]))
    if seen != set(want):
        raise PackageError("model.eks.segments: every layer needs one A and one B segment")
    spans.sort()
    if spans and spans[-1][1] > width or any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
        raise PackageError("model.eks.segments overlap or do not fit bank_width")


def verify_checksums(pkg: Path, manifest: dict) -> list[str]:
    """Paths whose file is missing or whose sha256 differs from the manifest (empty = all good)."""
    bad = []
    for rel, digest in manifest["files"].items():
        p = Path(pkg) / rel
        if not p.is_file() or sha256_file(p) != digest:
            bad.append(rel)
    return bad


def load_package(pkg: Path) -> dict:
    """Load and fully verify a package; raises PackageError on any problem."""
    manifest = load_manifest(pkg)
    validate_manifest(manifest)
    bad = verify_checksums(pkg, manifest)
    if bad:
        raise PackageError(f"checksum mismatch or missing file: {', '.join(bad)}")
    return manifest


def base_weights(onnx_path: Path, layer_names: list[str]) -> dict[str, np.ndarray]:
    """W0 (folded) of every decomposed layer, read from the initializers of student.onnx."""
    model = onnx.load(str(onnx_path))
    inits = {i.name: i for i in model.graph.initializer}
    return {n: numpy_helper.to_array(inits[n]).astype(np.float32) for n in layer_names}


def read_expert(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta


def delta(expert: dict[str, np.ndarray], layer: str, shape: list[int], scale: float) -> np.ndarray:
    """dW_t = scale * reshape_row_major(B_t @ A_t, shape)."""
    a = expert[f"{layer}.lora_A"].astype(np.float32)
    b = expert[f"{layer}.lora_B"].astype(np.float32)
    return (np.float32(scale) * (b @ a)).reshape(shape).astype(np.float32)


def merge(w0: dict[str, np.ndarray], expert: dict[str, np.ndarray], layers: list[dict], scale: float):
    return {L["name"]: w0[L["name"]] + delta(expert, L["name"], L["shape"], scale) for L in layers}


def switch(w_a: dict[str, np.ndarray], ea: dict, eb: dict, layers: list[dict], scale: float):
    """In-place task switch of the paper: W_b = W_a - dW_a + dW_b."""
    return {
        L["name"]: (w_a[L["name"]] - delta(ea, L["name"], L["shape"], scale)) + delta(eb, L["name"], L["shape"], scale)
        for L in layers
    }


def expert_feeds(pkg: Path, manifest: dict, task: str, w0: dict[str, np.ndarray] | None = None) -> dict:
    """ORT feeds (all but `input`) that turn student.onnx into expert `task`."""
    layers = manifest["layers"]
    if w0 is None:
        w0 = base_weights(Path(pkg) / manifest["model"]["file"], [L["name"] for L in layers])
    spec = next(t for t in manifest["tasks"] if t["id"] == task)
    ex, meta = read_expert(Path(pkg) / spec["file"])
    scale = float(meta.get("scale", manifest["lora"]["scale"]))
    if abs(scale - float(manifest["lora"]["scale"])) > 1e-9:
        raise PackageError(f"expert {task}: scale {scale} != manifest lora.scale")
    feeds = merge(w0, ex, layers, scale)
    m = manifest["model"]
    feeds[m["head_weight_input"]] = ex["head.weight"].astype(np.float32)
    feeds[m["head_bias_input"]] = ex["head.bias"].astype(np.float32)
    return feeds


def merged_expert_onnx(pkg: Path, task: str, out: Path) -> None:
    """Standalone expert for edge use: student.onnx with W_t and head t baked in as plain initializers.

    The result has a single input (`input`) and output `logits`; nothing is overridable.
    """
    pkg = Path(pkg)
    manifest = load_package(pkg)
    feeds = expert_feeds(pkg, manifest, task)
    model = onnx.load(str(pkg / manifest["model"]["file"]))
    g = model.graph
    keep_inputs = [i for i in g.input if i.name == manifest["model"]["input_name"]]
    by_name = {i.name: i for i in g.initializer}
    for name, value in feeds.items():
        tensor = numpy_helper.from_array(value.astype(np.float32), name)
        if name in by_name:
            by_name[name].CopyFrom(tensor)
        else:
            g.initializer.append(tensor)
    del g.input[:]
    g.input.extend(keep_inputs)
    # the head's class count is now fixed
    out_vi = g.output[0]
    dims = out_vi.type.tensor_type.shape.dim
    if len(dims) == 2:
        dims[1].ClearField("dim_param")
        dims[1].dim_value = int(feeds[manifest["model"]["head_bias_input"]].shape[0])
    model.doc_string = f"lorkd merged expert '{task}' (W0 + dW_t and head baked in) from package {manifest['name']}"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out))
