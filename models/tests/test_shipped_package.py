"""The shipped packages: `models/medmnist-lorkd` (built-in ShuffleNetV2) and `models/medmnist-mbv3s-lorkd`
(MobileNetV3-small via lorkd.decompose): checksums, golden cases, real-data parity on the full test split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorkd.data import default_data_dir, load_tasks, to_tensor
from lorkd.package import expert_feeds, load_package, merged_expert_onnx
from lorkd.parity import package_parity, session

MODELS = Path(__file__).resolve().parents[1]
PKG = MODELS / "medmnist-lorkd"
CKPT = MODELS / "checkpoints" / "medmnist-lorkd"
PACKAGES = pytest.mark.parametrize("name", ["medmnist-lorkd", "medmnist-mbv3s-lorkd"])
HAVE_DATA = (default_data_dir() / "breastmnist.npz").exists()


def _read_png(path: Path) -> np.ndarray:
    img = np.asarray(Image.open(path))
    return img[..., None] if img.ndim == 2 else img


@PACKAGES
def test_shipped_package_verifies_and_reproduces_golden(name):
    PKG = MODELS / name
    manifest = load_package(PKG)
    assert [t["id"] for t in manifest["tasks"]] == ["breast", "pneumonia", "retina"]
    golden = json.loads((PKG / "golden/golden.json").read_text())
    sess = session(PKG / "student.onnx")
    feeds = {t: expert_feeds(PKG, manifest, t) for t in ("breast", "pneumonia", "retina")}
    assert {c["task"] for c in golden["cases"]} == set(feeds)
    for case in golden["cases"]:
        x = to_tensor(_read_png(PKG / case["file"])[None]).numpy()
        got = sess.run(["logits"], {"input": x, **feeds[case["task"]]})[0][0]
        assert np.abs(got - np.array(case["logits"])).max() <= golden["tolerance"], case["file"]
        assert int(got.argmax()) == case["top1"]


@PACKAGES
@pytest.mark.skipif(not HAVE_DATA, reason="../shared/data/medmnist not present")
def test_golden_images_are_the_real_test_images(name):
    PKG = MODELS / name
    golden = json.loads((PKG / "golden/golden.json").read_text())
    tasks = {td.spec.id: td for td in load_tasks()}
    for case in golden["cases"]:
        td = tasks[case["task"]]
        assert np.array_equal(_read_png(PKG / case["file"]), td.images["test"][case["test_index"]])
        assert case["label"] == int(td.labels["test"][case["test_index"]])


@PACKAGES
@pytest.mark.skipif(not HAVE_DATA, reason="../shared/data/medmnist not present")
def test_full_test_split_parity_with_the_shipped_checkpoint(name):
    """ORT (merged W_t + head t) vs the trained PyTorch EKS student on every test image of every task."""
    from lorkd.package import sha256_file
    from lorkd.train import load_trained

    PKG, CKPT = MODELS / name, MODELS / "checkpoints" / name
    manifest = load_package(PKG)
    assert manifest["provenance"]["pytorch_checkpoint"]["sha256"] == sha256_file(CKPT / "best.pt")
    torch.set_num_threads(2)
    tasks = load_tasks()
    student = load_trained(CKPT, tasks)
    res = package_parity(PKG, student, tasks, "test", base_images=32)
    assert sum(r["n"] for r in res["tasks"].values()) == 156 + 624 + 400
    assert res["max_abs_err"] <= 1e-4
    assert res["argmax_agreement"] == 1.0
    assert max(r["base_max_abs_err"] for r in res["tasks"].values()) <= 1e-4
    assert res["switch_max_abs_err"] <= 1e-5


def test_the_default_package_names_the_teacher_targets_committed_beside_it():
    """The distillation targets next to the checkpoint are the ones the package's student learnt from."""
    from lorkd.package import sha256_file

    teacher = load_package(PKG)["provenance"]["teacher"]
    assert teacher["sha256"] == sha256_file(CKPT / "teacher_features.pt")
    assert teacher["features"] == "models/checkpoints/medmnist-lorkd/teacher_features.pt"
    blob = torch.load(CKPT / "teacher_features.pt", map_location="cpu")
    assert blob["tasks"] == ["breast", "pneumonia", "retina"]
    assert blob["features"].shape[:2] == blob["logits"].shape[:2]
    assert blob["features"].shape[1] == 2  # every image and its flip
    if HAVE_DATA:
        assert blob["features"].shape[0] == sum(len(td.labels["train"]) for td in load_tasks())


def test_standalone_merged_expert_from_shipped_package(tmp_path):
    manifest = load_package(PKG)
    golden = json.loads((PKG / "golden/golden.json").read_text())
    merged_expert_onnx(PKG, "retina", tmp_path / "retina.onnx")
    sess = session(tmp_path / "retina.onnx")
    assert manifest["tasks"][2]["id"] == "retina"
    for case in (c for c in golden["cases"] if c["task"] == "retina"):
        got = sess.run(["logits"], {"input": to_tensor(_read_png(PKG / case["file"])[None]).numpy()})[0][0]
        assert np.abs(got - np.array(case["logits"])).max() <= golden["tolerance"]
