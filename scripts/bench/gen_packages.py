#!/usr/bin/env python3
"""Synthetic lorkd packages for the scale benchmarks (issue 5, item 5; models/FORMAT.md v1).

Each package reuses the real shared student (`student.onnx` of a source package, copied byte for byte) and holds
N synthetic experts: random low-rank factors for every decomposed layer and a random head. Task specs (input
channels, size, normalisation, classes, labels) are cycled from the source package's tasks, so any image the
source tasks accept works for every synthetic task. The experts are NOT trained: they exist to measure
assembly, caching and memory, never accuracy.

    gen_packages.py --source models/medmnist-lorkd --out bench-out/packages --counts 10,100,1000

writes bench-out/packages/synthetic-<N>/ (skipped when an up-to-date one is already there).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def expert_tensors(manifest: dict, classes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for layer in manifest["layers"]:
        # Small factors: dW = scale * B @ A stays a perturbation of W0, as a trained delta would.
        tensors[f"{layer['name']}.lora_A"] = rng.normal(0.0, 0.05, layer["a_shape"]).astype(np.float32)
        tensors[f"{layer['name']}.lora_B"] = rng.normal(0.0, 0.01, layer["b_shape"]).astype(np.float32)
    features = manifest["model"]["feature_dim"]
    tensors["head.weight"] = rng.normal(0.0, 0.05, (classes, features)).astype(np.float32)
    tensors["head.bias"] = rng.normal(0.0, 0.05, (classes,)).astype(np.float32)
    return tensors


def generate(source: Path, out: Path, count: int, seed: int) -> Path:
    src = json.loads((source / "manifest.json").read_text())
    pkg = out / f"synthetic-{count}"
    stamp = pkg / ".generated"
    student_sha = sha256_file(source / src["model"]["file"])
    eks = src["model"].get("eks")  # the optional mixed-task graph (FORMAT.md section 8), copied as is
    eks_sha = sha256_file(source / eks["file"]) if eks else ""
    key = f"{count}:{seed}:{student_sha}:{eks_sha}"
    if stamp.exists() and stamp.read_text() == key:
        return pkg
    if pkg.exists():
        shutil.rmtree(pkg)
    (pkg / "experts").mkdir(parents=True)
    (pkg / "golden").mkdir()
    shutil.copyfile(source / src["model"]["file"], pkg / "student.onnx")

    lora = src["lora"]
    rng = np.random.default_rng(seed)
    tasks = []
    files = {"student.onnx": student_sha}
    if eks:
        shutil.copyfile(source / eks["file"], pkg / eks["file"])
        files[eks["file"]] = eks_sha
    for i in range(count):
        base = src["tasks"][i % len(src["tasks"])]
        task_id = f"syn-{i:05d}"
        rel = f"experts/{task_id}.safetensors"
        tensors = expert_tensors(src, base["num_classes"], rng)
        metadata = {
            "format": "lorkd-expert",
            "format_version": "1",
            "task": task_id,
            "rank": str(lora["rank"]),
            "alpha": str(lora["alpha"]),
            "scale": str(lora["scale"]),
        }
        save_file(tensors, str(pkg / rel), metadata=metadata)
        files[rel] = sha256_file(pkg / rel)
        tasks.append({
            "id": task_id,
            "name": f"synthetic expert {i} (input spec of {base['id']}; random factors, untrained)",
            "modality": base.get("modality", "synthetic"),
            "labels": base["labels"],
            "num_classes": base["num_classes"],
            "file": rel,
            "input": base["input"],
            "metrics": {},
        })
    golden = pkg / "golden" / "golden.json"
    golden.write_text(json.dumps({"tolerance": 1e-4, "cases": []}, indent=1))
    files["golden/golden.json"] = sha256_file(golden)

    manifest = {
        "format": "lorkd-package",
        "format_version": 1,
        "name": f"synthetic-{count}",
        "description": f"{count} synthetic experts (random low-rank factors) on the shared student of "
                       f"{src['name']}; for benchmarks only",
        "model": src["model"],
        "input": src["input"],
        "lora": lora,
        "layers": src["layers"],
        "tasks": tasks,
        "files": files,
        "provenance": {"generator": "scripts/bench/gen_packages.py", "source_package": src["name"],
                       "seed": seed},
    }
    (pkg / "manifest.json").write_text(json.dumps(manifest, indent=1))
    stamp.write_text(key)
    return pkg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="models/medmnist-lorkd", type=Path)
    p.add_argument("--out", default="bench-out/packages", type=Path)
    p.add_argument("--counts", default="10,100,1000")
    p.add_argument("--seed", default=5, type=int)
    args = p.parse_args(argv)
    for count in (int(c) for c in args.counts.split(",") if c):
        pkg = generate(args.source, args.out, count, args.seed)
        size = sum(f.stat().st_size for f in (pkg / "experts").iterdir())
        print(f"{pkg}: {count} experts, {size / 1e6:.1f} MB of expert files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
