"""MedMNIST data: task registry, official npz loader, preprocessing and task-balanced sampling."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

# Grey images are replicated into 3 identical channels; every task is normalised with mean = std = 0.5
# per channel, so the student sees one input format: float32 [3, 28, 28] in [-1, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one MedMNIST task (what the manifest publishes)."""

    id: str
    file: str
    name: str
    modality: str
    labels: tuple[str, ...]
    channels: int
    official_md5: str | None = None
    reference_acc: float | None = None  # MedMNIST v2 ResNet-18 (28) test ACC

    @property
    def num_classes(self) -> int:
        return len(self.labels)


TASKS: dict[str, TaskSpec] = {
    "breast": TaskSpec(
        "breast", "breastmnist.npz", "BreastMNIST: breast ultrasound", "ultrasound",
        ("malignant", "normal, benign"), 1, "750601b1f35ba3300ea97c75c52ff8f6", 0.863,
    ),
    "pneumonia": TaskSpec(
        "pneumonia", "pneumoniamnist.npz", "PneumoniaMNIST: paediatric chest X-ray", "x-ray",
        ("normal", "pneumonia"), 1, "88f817cb74189d81f6df1930098ff783", 0.854,
    ),
    "retina": TaskSpec(
        "retina", "retinamnist.npz", "RetinaMNIST: retinal fundus, diabetic retinopathy grade", "fundus photograph",
        ("0", "1", "2", "3", "4"), 3, "bd4c0672f1bba3e3a89f0e4e876791e4", 0.524,
    ),
}
DEFAULT_TASKS = ("breast", "pneumonia", "retina")


def default_data_dir() -> Path:
    """`../shared/data/medmnist` relative to the repository root (override with LORKD_DATA_DIR)."""
    env = os.environ.get("LORKD_DATA_DIR")
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data" / "medmnist"


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class TaskData:
    """One task's splits as uint8 HWC images (channels 1 or 3) and int64 labels."""

    spec: TaskSpec
    images: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    md5: str = ""


def load_npz(path: Path, spec: TaskSpec) -> TaskData:
    """Read an npz in the official MedMNIST layout (`<split>_images`, `<split>_labels` of shape (N, 1))."""
    td = TaskData(spec=spec, md5=md5sum(Path(path)))
    with np.load(path) as z:
        for split in SPLITS:
            imgs = np.asarray(z[f"{split}_images"], dtype=np.uint8)
            if imgs.ndim == 3:
                imgs = imgs[..., None]
            if imgs.ndim != 4 or imgs.shape[-1] not in (1, 3):
                raise ValueError(f"{path}: {split}_images has shape {imgs.shape}, expected (N,H,W) or (N,H,W,1|3)")
            labels = np.asarray(z[f"{split}_labels"]).reshape(-1).astype(np.int64)
            if len(labels) != len(imgs):
                raise ValueError(f"{path}: {split} has {len(imgs)} images but {len(labels)} labels")
            if labels.min() < 0 or labels.max() >= spec.num_classes:
                raise ValueError(f"{path}: {split} labels outside [0, {spec.num_classes})")
            td.images[split] = imgs
            td.labels[split] = labels
    return td


def load_tasks(task_ids: list[str] | tuple[str, ...] = DEFAULT_TASKS, data_dir: Path | None = None) -> list[TaskData]:
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    return [load_npz(data_dir / TASKS[t].file, TASKS[t]) for t in task_ids]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C in {1, 3}) -> float32 normalised (N, 3, H, W); grey is repeated to 3 channels."""
    x = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


class MultiTaskDataset(Dataset):
    """The union of several tasks' split; item = (image [3,H,W], label, task index, index within dataset)."""

    def __init__(self, tasks: list[TaskData], split: str, task_index: dict[str, int] | None = None):
        task_index = task_index or {td.spec.id: i for i, td in enumerate(tasks)}
        self.x = torch.cat([to_tensor(td.images[split]) for td in tasks])
        self.y = torch.cat([torch.from_numpy(td.labels[split]) for td in tasks])
        self.t = torch.cat(
            [torch.full((len(td.labels[split]),), task_index[td.spec.id], dtype=torch.long) for td in tasks]
        )

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], self.t[i], i


def task_balanced_weights(task_of_sample: torch.Tensor, power: float) -> torch.Tensor:
    """Per-sample sampling weights such that task t's share of draws is proportional to n_t ** power.

    power = 1 reproduces plain uniform sampling; power = 0 gives every task an equal share.
    """
    counts = torch.bincount(task_of_sample).double()
    per_task = counts.pow(power) / counts
    return per_task[task_of_sample]


def class_weights(labels: np.ndarray, num_classes: int, power: float) -> torch.Tensor:
    """CE class weights (n / (C * n_c)) ** power, so power = 1 is inverse frequency and 0 is unweighted."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    counts = np.maximum(counts, 1.0)
    w = (counts.sum() / (num_classes * counts)) ** power
    return torch.tensor(w, dtype=torch.float32)
