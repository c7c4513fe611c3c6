"""Any teacher: a torchvision or timm model by name, weights from a local file, penultimate features found
automatically, frozen. Its features of every training image (and of the horizontal flip) are precomputed once,
in the layout `train_run` reads (teacher-features command)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .data import MultiTaskDataset, TaskData, resize_images, to_tensor
from .decompose import last_linear, load_state

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_teacher(arch: str, checkpoint: str | None) -> nn.Module:
    """`torchvision:<name>`, `timm:<name>` or a bare torchvision name; weights only from `checkpoint`.

    A missing checkpoint is allowed only for tests (random weights); the CLI requires one."""
    lib, _, name = arch.rpartition(":")
    if lib in ("", "torchvision"):
        import torchvision

        if not hasattr(torchvision.models, name):
            raise ValueError(f"unknown torchvision architecture {name!r}")
        net = getattr(torchvision.models, name)(weights=None)
    elif lib == "timm":
        try:
            import timm
        except ImportError as e:  # optional: pip install timm
            raise ValueError("timm teachers need the timm package (pip install timm)") from e
        net = timm.create_model(name, pretrained=False)
    else:
        raise ValueError(f"teacher {arch!r}: use torchvision:<name> or timm:<name>")
    if checkpoint:
        load_state(net, checkpoint)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


class PenultimateFeatures(nn.Module):
    """Wraps a classifier network; forward returns the input of its last Linear (the pooled feature)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        name, self.head = last_linear(net)
        self.head_name = name
        self.feature_dim = self.head.in_features
        self._feat: torch.Tensor | None = None
        self.head.register_forward_pre_hook(self._grab)

    def _grab(self, _mod, inp) -> None:
        self._feat = inp[0]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._feat = None
        self.net(x)
        if self._feat is None:
            raise RuntimeError(f"the teacher's last Linear ({self.head_name}) was not called")
        return self._feat.flatten(1)


@torch.no_grad()
def external_teacher_features(teacher: nn.Module, tasks: list[TaskData], out: Path, image_size: int,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size: int = 64,
                              progress: bool = True) -> torch.Tensor:
    """(N_train, 2, D) float16 features of every training image and its flip, in MultiTaskDataset order;
    images are resized to the teacher's input size and normalised with its own statistics."""
    feat = teacher if isinstance(teacher, PenultimateFeatures) else PenultimateFeatures(teacher)
    feat.eval()
    images = np.concatenate([td.images["train"] if td.images["train"].shape[3] == 3
                             else np.repeat(td.images["train"], 3, axis=3) for td in tasks])
    if len(images) != len(MultiTaskDataset(tasks, "train")):
        raise AssertionError("teacher features out of step with the training set")
    out_t = torch.zeros(len(images), 2, feat.feature_dim, dtype=torch.float16)
    for s in tqdm(range(0, len(images), batch_size), desc="teacher features", disable=not progress, mininterval=5):
        x = to_tensor(resize_images(images[s:s + batch_size], image_size), mean, std)
        out_t[s:s + batch_size, 0] = feat(x).half()
        out_t[s:s + batch_size, 1] = feat(x.flip(3)).half()
    torch.save({"tasks": [td.spec.id for td in tasks], "features": out_t}, out)
    return out_t
