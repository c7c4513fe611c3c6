"""Loader on a small npz in the official MedMNIST layout, preprocessing and imbalance handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import GREY, RGB, write_npz

from lorkd.data import (
    MultiTaskDataset,
    class_weights,
    cv_folds_of,
    cv_split,
    load_config_tasks,
    load_npz,
    task_balanced_weights,
    to_tensor,
)


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


def test_cv_folds_are_stratified_balanced_and_fixed():
    labels = np.array([0] * 50 + [1] * 23 + [2] * 7)
    fold = cv_folds_of(labels, 5)
    assert np.array_equal(fold, cv_folds_of(labels, 5)), "one assignment for every configuration and seed"
    sizes = np.bincount(fold, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for c in range(3):
        per_class = np.bincount(fold[labels == c], minlength=5)
        assert per_class.max() - per_class.min() <= 1, (c, per_class)
    assert not np.array_equal(fold, cv_folds_of(labels, 5, seed=14))
    with pytest.raises(ValueError):
        cv_folds_of(labels, 1)


def test_cv_split_partitions_train_and_val_and_keeps_test(tasks):
    grey = tasks[0]
    pool = np.concatenate([grey.images["train"], grey.images["val"]])
    seen = []
    for k in range(4):
        f = cv_split(grey, 4, k)
        assert np.array_equal(f.images["test"], grey.images["test"])
        assert np.array_equal(f.labels["test"], grey.labels["test"])
        assert len(f.labels["train"]) + len(f.labels["val"]) == len(pool)
        assert not set(f.pool_index["train"]) & set(f.pool_index["val"])
        assert np.array_equal(f.images["val"], pool[f.pool_index["val"]])
        assert np.array_equal(f.images["train"], pool[f.pool_index["train"]])
        seen += list(f.pool_index["val"])
    assert sorted(seen) == list(range(len(pool))), "every pool image is val in exactly one fold"
    assert grey.pool_index == {} and len(grey.labels["val"]) == 8, "the official split is not modified"
    with pytest.raises(ValueError):
        cv_split(grey, 4, 4)


def test_config_selects_the_fold(data_dir):
    cfg = {"tasks": ["alpha"], "task_sources": {"alpha": {"file": "alpha.npz", "labels": ["no", "yes"], "channels": 1}}}
    official = load_config_tasks(cfg, data_dir)[0]
    fold = load_config_tasks({**cfg, "cv_folds": 4, "cv_fold": 1}, data_dir)[0]
    assert np.array_equal(fold.labels["val"], cv_split(official, 4, 1).labels["val"])
    assert len(fold.labels["val"]) == 8 and official.pool_index == {}
