"""Loader on a small npz in the official MedMNIST layout, preprocessing and imbalance handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import GREY, RGB, write_npz

from lorkd.data import MultiTaskDataset, class_weights, load_npz, task_balanced_weights, to_tensor


def test_loader_reads_official_layout(tasks):
    grey, rgb = tasks
    assert grey.images["train"].shape == (24, 28, 28, 1) and rgb.images["train"].shape == (24, 28, 28, 3)
    assert grey.labels["val"].dtype == np.int64 and grey.labels["val"].shape == (8,)
    assert len(grey.md5) == 32


def test_grey_is_replicated_and_normalised():
    img = np.array([[0, 255], [51, 102]], dtype=np.uint8).reshape(1, 2, 2, 1)
    x = to_tensor(img)
    assert x.shape == (1, 3, 2, 2)
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 1], x[0, 2])
    torch.testing.assert_close(x[0, 0], torch.tensor([[-1.0, 1.0], [-0.6, -0.2]]))


def test_mixed_dataset(tasks):
    ds = MultiTaskDataset(tasks, "train")
    assert len(ds) == 48 and ds.x.shape == (48, 3, 28, 28)
    x, y, t, i = ds[30]
    assert int(t) == 1 and int(y) == 30 % 3 and i == 30


def test_rejects_bad_labels(tmp_path):
    write_npz(tmp_path / "x.npz", 1, 4)  # 4 classes written, spec says 2
    with pytest.raises(ValueError, match="labels outside"):
        load_npz(tmp_path / "x.npz", GREY)
    assert RGB.num_classes == 3


def test_imbalance_weights():
    cw = class_weights(np.array([0] * 30 + [1] * 10), 2, power=1.0)
    torch.testing.assert_close(cw, torch.tensor([40 / 60, 40 / 20]))
    assert torch.equal(class_weights(np.array([0, 0, 1]), 2, power=0.0), torch.ones(2))
    t = torch.tensor([0] * 100 + [1] * 25)
    w = task_balanced_weights(t, power=0.5)
    share0 = w[t == 0].sum() / w.sum()
    assert abs(float(share0) - 10 / 15) < 1e-6  # sqrt(100) : sqrt(25)
