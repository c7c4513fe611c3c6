"""A tiny synthetic folder-of-images dataset (learnable: class = brightness band) and the config that trains a
LoRKD student on it, for end-to-end tests of train -> export -> serve at sizes other than 28 px."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SPLIT_COUNTS = {"train": 12, "val": 4, "test": 4}  # images per class


def write_folder_task(root: Path, classes: tuple[str, ...], size: int, grey: bool, seed: int) -> None:
    """root/<split>/<class>/<n>.png; class c images are noise around brightness 40 + 80 c."""
    rng = np.random.default_rng(seed)
    for split, n in SPLIT_COUNTS.items():
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size, size) if grey else (size, size, 3)
                img = np.clip(rng.normal(40 + 80 * c, 25, size=shape), 0, 255).astype(np.uint8)
                Image.fromarray(img, mode="L" if grey else "RGB").save(d / f"{i}.png")


def write_synthetic(out: Path, size: int = 64, arch: str = "shufflenet_v2_x0_5") -> Path:
    """Two folder tasks (grey 2-class, RGB 3-class) and `config.json` training a LoRKD student at `size` px.
    Returns the config path."""
    out = Path(out)
    write_folder_task(out / "scans", ("negative", "positive"), size, grey=True, seed=1)
    write_folder_task(out / "photos", ("low", "mid", "high"), size, grey=False, seed=2)
    cfg = {
        "mode": "lorkd_nokd", "tasks": ["scans", "photos"], "arch": arch, "image_size": size,
        "decompose_linear": True,
        "epochs": 1, "batch_size": 8, "max_batches_per_epoch": 2, "lr": 0.01, "num_threads": 1,
        "task_sources": {
            "scans": {"type": "folder", "path": str((out / "scans").resolve()), "channels": 1,
                      "name": "Synthetic grey scans", "modality": "synthetic",
                      "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
            "photos": {"type": "folder", "path": str((out / "photos").resolve()), "channels": 3,
                       "name": "Synthetic RGB photos", "modality": "synthetic",
                       "labels": ["low", "mid", "high"]},
        },
    }
    path = out / "config.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path
