"""A new user's path on a synthetic 64-px folder-of-images dataset, through the documented commands: own
torchvision teacher from a local checkpoint -> teacher features -> LoRKD training -> plot -> export -> parity ->
the package answers its golden cases at 64 px (the Rust service side is in tests/parity.rs)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
import torchvision
from PIL import Image

from lorkd.cli import main
from lorkd.data import to_tensor
from lorkd.package import expert_feeds, load_package
from lorkd.parity import session


def test_synthetic_64px_folders_train_export_serve(tmp_path):
    assert main(["synthetic-data", "--out", str(tmp_path / "data"), "--size", "64"]) == 0
    cfg = str(tmp_path / "data" / "config.json")
    # a user's own foundation model: a torchvision network saved as a local state dict, used at its own size
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "foundation.pth")
    tf = str(tmp_path / "tf.pt")
    assert main(["teacher-features", "--arch", "torchvision:resnet18", "--checkpoint", str(tmp_path / "foundation.pth"),
                 "--image-size", "96", "--config", cfg, "--out", tf, "--threads", "1"]) == 0
    assert torch.load(tf)["features"].shape == (2 * 12 + 3 * 12, 2, 512)
    assert main(["train", "--mode", "lorkd", "--config", cfg, "--set", f"teacher_features={tf}", "beta=1",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "history.json").read_text())[0]["train_kd"] > 0
    csv_rows = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert len(csv_rows) == 2 and "val_scans_acc" in csv_rows[0] and "images_per_second" in csv_rows[0]
    assert main(["plot", "--run", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    pkg = tmp_path / "pkg"
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(pkg)]) == 0
    assert main(["parity", "--run", str(tmp_path / "run"), "--package", str(pkg), "--threads", "1"]) == 0
    manifest = load_package(pkg)
    assert manifest["name"] == "pkg" and manifest["model"]["arch"] == "shufflenet_v2_x0_5_64px"
    assert manifest["input"]["height"] == 64
    assert manifest["description"] == ("LoRKD experts (shufflenet_v2_x0_5 at 64 px, rank-4 EKS layers) for: "
                                       "Synthetic grey scans, Synthetic RGB photos.")
    scans = next(t for t in manifest["tasks"] if t["id"] == "scans")
    assert scans["input"] == {"channels": 1, "height": 64, "width": 64, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert scans["labels"] == ["negative", "positive"]
    dims = onnx.load(str(pkg / "student.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 64, 64]
    # what a server does: decode the golden PNG, normalise with the task's statistics, run the merged expert
    golden = json.loads((pkg / "golden/golden.json").read_text())
    sess = session(pkg / "student.onnx")
    specs = {t["id"]: t for t in manifest["tasks"]}
    for case in golden["cases"]:
        img = np.asarray(Image.open(pkg / case["file"]))
        assert img.shape[:2] == (64, 64)
        img = img[..., None] if img.ndim == 2 else img
        spec = specs[case["task"]]["input"]
        x = to_tensor(img[None], spec["mean"], spec["std"]).numpy()
        got = sess.run(["logits"], {"input": x, **expert_feeds(pkg, manifest, case["task"])})[0][0]
        assert np.abs(got - np.array(case["logits"])).max() <= golden["tolerance"]
