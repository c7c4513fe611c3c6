"""Shared fixtures: tiny synthetic MedMNIST-layout tasks and a tiny decomposed student."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lorkd.data import TaskSpec, load_npz
from lorkd.models import Student, StudentConfig

torch.set_num_threads(2)

GREY = TaskSpec("alpha", "alpha.npz", "Alpha (grey)", "synthetic", ("no", "yes"), 1)
RGB = TaskSpec("beta", "beta.npz", "Beta (RGB)", "synthetic", ("a", "b", "c"), 3)


def write_npz(path: Path, channels: int, classes: int, n=(24, 8, 10), seed: int = 0, size: int = 28) -> None:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        shape = (count, size, size) if channels == 1 else (count, size, size, 3)
        labels = np.arange(count) % classes
        imgs = rng.integers(0, 256, size=shape, dtype=np.uint8)
        # make the label learnable: brighten by class
        imgs = np.clip(imgs.astype(np.int32) // 2 + (labels * 60).reshape((-1,) + (1,) * (len(shape) - 1)), 0, 255)
        arrays[f"{split}_images"] = imgs.astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("medmnist")
    write_npz(d / GREY.file, 1, 2, seed=1)
    write_npz(d / RGB.file, 3, 3, seed=2)
    return d


@pytest.fixture(scope="session")
def tasks(data_dir):
    return [load_npz(data_dir / GREY.file, GREY), load_npz(data_dir / RGB.file, RGB)]


def tiny_config(lora_tasks: int = 2) -> StudentConfig:
    return StudentConfig(num_classes=(2, 3), lora_tasks=lora_tasks, rank=4, alpha=16.0,
                         stages_repeats=(1, 1, 1), stages_out_channels=(8, 16, 32, 64, 64))


def randomise(student: Student, seed: int = 0) -> Student:
    """Non-trivial factors (B != 0) and BatchNorm statistics, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        for _, conv, _ in student.eks_layers():
            conv.lora_B.copy_(torch.randn(conv.lora_B.shape, generator=g) * 0.05)
    return student.eval()


@pytest.fixture()
def tiny_student() -> Student:
    torch.manual_seed(0)
    return randomise(Student(tiny_config()))


def tiny_two_task_config(data_dir: Path, **overrides):
    """A TrainConfig of the two synthetic tasks (alpha grey, beta RGB) read from `data_dir`: a tiny LoRKD student
    without transfer, one short epoch; `overrides` replace any key."""
    from lorkd.train import TrainConfig

    base = dict(mode="lorkd_nokd", tasks=("alpha", "beta"), width="tiny", epochs=1, batch_size=8,
                max_batches_per_epoch=2, lr=0.01, num_threads=1,
                task_sources={"alpha": {"path": str(data_dir / "alpha.npz"), "labels": ["no", "yes"], "channels": 1},
                              "beta": {"path": str(data_dir / "beta.npz"), "labels": ["a", "b", "c"], "channels": 3}})
    return TrainConfig(**{**base, **overrides})
