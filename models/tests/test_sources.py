"""Data sources beyond 28-px MedMNIST: npz at any size, image folders, CSV manifests; any teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_npz
from PIL import Image

from lorkd.data import MultiTaskDataset, load_task, read_image, resize_images, task_spec
from lorkd.teacher import PenultimateFeatures, external_teacher_features, load_teacher


def write_folder(root, size=64, classes=("cat", "dog"), n=(4, 2, 2), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val", "test"), n, strict=True):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shape = (size, size, 3) if mode == "RGB" else (size, size)
                arr = (rng.integers(0, 128, size=shape) + 100 * c).clip(0, 255).astype(np.uint8)
                Image.fromarray(arr, mode=mode).save(d / f"{i}.png")


def test_folder_source_reads_classes_splits_and_resizes(tmp_path):
    write_folder(tmp_path / "pets")
    td = load_task("pets", {"type": "folder", "path": str(tmp_path / "pets")}, image_size=32)
    assert td.spec.labels == ("cat", "dog") and td.spec.channels == 3
    assert td.images["train"].shape == (8, 32, 32, 3) and td.images["test"].shape == (4, 32, 32, 3)
    assert list(td.labels["train"]) == [0, 0, 0, 0, 1, 1, 1, 1]
    # class order from the config wins over folder order
    td2 = load_task("pets", {"type": "folder", "path": str(tmp_path / "pets"), "labels": ["dog", "cat"]})
    assert td2.spec.labels == ("dog", "cat") and list(td2.labels["val"]) == [0, 0, 1, 1]
    assert td2.images["val"][:2].mean() > td2.images["val"][2:].mean() + 50  # dogs (label 0) are the bright ones
    assert td2.images["val"].shape[1:] == (64, 64, 3)


def test_folder_with_unknown_class_is_rejected(tmp_path):
    write_folder(tmp_path / "p", classes=("a", "b"))
    with pytest.raises(ValueError, match="not among the labels"):
        load_task("p", {"type": "folder", "path": str(tmp_path / "p"), "labels": ["a"]})


def test_csv_source_grey_normalisation_and_labels(tmp_path):
    write_folder(tmp_path / "img", size=40, classes=("neg", "pos"), mode="L")
    rows = ["path,label,split"]
    for p in sorted((tmp_path / "img").rglob("*.png")):
        split, cls = p.parts[-3], p.parts[-2]
        rows.append(f"img/{split}/{cls}/{p.name},{cls},{split}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    src = {"type": "csv", "path": str(tmp_path / "m.csv"), "channels": 1, "mean": [0.2, 0.2, 0.2],
           "std": [0.3, 0.3, 0.3]}
    td = load_task("xray", src, image_size=40)
    assert td.spec.labels == ("neg", "pos") and td.images["train"].shape == (8, 40, 40, 1)
    ds = MultiTaskDataset([td], "test")
    assert ds.x.shape == (4, 3, 40, 40)
    expect = (td.images["test"][0, 0, 0, 0] / 255 - 0.2) / 0.3
    assert abs(float(ds.x[0, 0, 0, 0]) - expect) < 1e-5
    (tmp_path / "bad.csv").write_text("path,label,split\nimg/train/neg/0.png,neg,training\n")
    with pytest.raises(ValueError, match="unknown splits"):
        load_task("x", {"type": "csv", "path": str(tmp_path / "bad.csv"), "labels": ["neg"]})


def test_npz_at_another_resolution_keeps_the_registry_spec(tmp_path):
    write_npz(tmp_path / "breastmnist_64.npz", 1, 2, size=64)
    td = load_task("breast", {"path": str(tmp_path / "breastmnist_64.npz")})
    assert td.images["train"].shape[1:] == (64, 64, 1) and td.spec.labels == ("malignant", "normal, benign")
    assert load_task("breast", {"path": str(tmp_path / "breastmnist_64.npz")}, image_size=28).images[
        "train"].shape[1:] == (28, 28, 1)
    assert task_spec("breast", {"path": "x.npz"}).official_md5 is None


def test_resize_and_16_bit_images(tmp_path):
    imgs = np.full((2, 10, 10, 1), 200, np.uint8)
    assert resize_images(imgs, 5).shape == (2, 5, 5, 1) and resize_images(imgs, 5).max() == 200
    Image.fromarray(np.full((4, 4), 0x8000, np.uint16)).save(tmp_path / "16.png")
    assert read_image(tmp_path / "16.png", 1).max() == 0x80


def test_any_torchvision_teacher_penultimate_features(tmp_path, tasks):
    net = load_teacher("torchvision:resnet18", None)
    feat = PenultimateFeatures(net)
    assert feat.feature_dim == 512 and not any(p.requires_grad for p in net.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert feat(x).shape == (2, 512)
    ckpt = tmp_path / "teacher.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    again = PenultimateFeatures(load_teacher("resnet18", str(ckpt)))
    torch.testing.assert_close(again(x), feat(x))
    out = external_teacher_features(net, tasks, tmp_path / "tf.pt", image_size=32, progress=False)
    assert out.shape == (sum(len(td.labels["train"]) for td in tasks), 2, 512)
    assert not torch.equal(out[:, 0], out[:, 1])  # the flip is a different view
    mbv3 = PenultimateFeatures(load_teacher("mobilenet_v3_small", None))
    assert mbv3.feature_dim == 1024 and mbv3(x).shape == (2, 1024)
    with pytest.raises(ValueError, match="torchvision:<name>"):
        load_teacher("keras:foo", None)
