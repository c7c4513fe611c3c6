"""add-task: a new task's expert trained against a package's frozen student and added without touching the rest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_two_task_config, write_npz

from lorkd.add_task import add_task, folded_w0, load_base_student, one_task_view
from lorkd.cli import main
from lorkd.data import TaskSpec, load_npz, to_tensor
from lorkd.package import PackageError, base_weights, expert_feeds, load_package, sha256_file
from lorkd.parity import session
from lorkd.pipeline import export_from_run
from lorkd.train import TrainConfig, train_run

NEW = TaskSpec("gamma", "gamma.npz", "Gamma (grey)", "synthetic", ("0", "1", "2"), 1)
BUDGET = ["epochs=2", "batch_size=8", "max_batches_per_epoch=3", "lr=0.01"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_dir, tasks):
    """A tiny 2-task LoRKD run exported as a package, with its checkpoint recorded in the provenance."""
    root = tmp_path_factory.mktemp("addtask")
    write_npz(data_dir / NEW.file, 1, 3, seed=3)
    cfg = tiny_two_task_config(data_dir)
    train_run(cfg, tasks, root / "run", progress=False)
    return root


def fresh_package(base, tmp_path):
    pkg = tmp_path / "pkg"
    export_from_run(base / "run", pkg, checkpoint_out=tmp_path / "ck", name="tiny")
    return pkg


def source(data_dir) -> dict:
    return {"path": str(data_dir / NEW.file), "labels": list(NEW.labels), "channels": 1, "name": NEW.name}


def test_add_task_keeps_the_rest_and_serves_with_parity(base, tmp_path, data_dir):
    pkg = fresh_package(base, tmp_path)
    before = {p.relative_to(pkg).as_posix(): p.read_bytes() for p in pkg.rglob("*") if p.is_file()}
    old_manifest = load_package(pkg)
    student, _ = load_base_student(tmp_path / "ck" / "best.pt")
    frozen_before = folded_w0(student)

    rec = add_task(pkg, "gamma", tmp_path / "run", source=source(data_dir), overrides=BUDGET, progress=False)

    manifest = load_package(pkg)  # schema and every sha256
    # the other experts, the shared graph and the old golden images are byte-identical
    for rel, data in before.items():
        if rel not in ("manifest.json", "golden/golden.json"):
            assert (pkg / rel).read_bytes() == data, rel
    assert [t["id"] for t in manifest["tasks"]] == ["alpha", "beta", "gamma"]
    assert manifest["tasks"][:2] == old_manifest["tasks"]
    entry = manifest["tasks"][2]
    assert entry["file"] == "experts/gamma.safetensors" and entry["num_classes"] == 3
    assert entry["input"]["channels"] == 1 and entry["input"]["height"] == 28
    assert set(entry["metrics"]) == {"test_acc", "test_auc"}
    assert manifest["files"]["experts/gamma.safetensors"] == sha256_file(pkg / "experts/gamma.safetensors")
    for k, v in old_manifest["files"].items():
        if k != "golden/golden.json":
            assert manifest["files"][k] == v
    prov = manifest["provenance"]["tasks"]["gamma"]
    assert prov["base"]["student_onnx_sha256"] == old_manifest["files"]["student.onnx"]
    assert prov["base"]["checkpoint_sha256"] == sha256_file(tmp_path / "ck" / "best.pt")
    assert prov["data"]["md5"] and prov["config"]["freeze_base"] and prov["git_revision"]
    assert rec["parity"]["max_abs_err"] <= 1e-4 and rec["parity"]["argmax_agreement"] == 1.0
    assert manifest["provenance"]["config"] == old_manifest["provenance"]["config"]

    # golden: old cases unchanged, new ones reproduce through onnxruntime with the merged weights
    golden = json.loads((pkg / "golden/golden.json").read_text())
    old = json.loads(before["golden/golden.json"])
    assert golden["cases"][: len(old["cases"])] == old["cases"]
    new_cases = [c for c in golden["cases"] if c["task"] == "gamma"]
    assert len(new_cases) == 4
    sess = session(pkg / "student.onnx")
    feeds = expert_feeds(pkg, manifest, "gamma")
    from PIL import Image

    for case in new_cases:
        img = np.asarray(Image.open(pkg / case["file"]))[..., None]
        got = sess.run(["logits"], {"input": to_tensor(img[None]).numpy(), **feeds})[0][0]
        assert np.abs(got - np.array(case["logits"])).max() <= 1e-4
        assert int(got.argmax()) == case["top1"]

    # the factors were trained (the expert differs from W0) and nothing shared moved
    w0 = base_weights(pkg / "student.onnx", list(frozen_before))
    assert max(float(np.abs(feeds[n] - w0[n]).max()) for n in w0) > 1e-4
    trained = torch.load(tmp_path / "run" / "best.pt", weights_only=False)["model"]
    view = one_task_view(load_base_student(tmp_path / "ck" / "best.pt")[0], 3)
    view.load_state_dict(trained)
    for n, w in folded_w0(view).items():
        np.testing.assert_array_equal(w, frozen_before[n])


def test_full_parity_on_the_new_task_split(base, tmp_path, data_dir):
    """`parity` (the full split through ORT vs the trained PyTorch model) for the added task, via the CLI."""
    pkg = fresh_package(base, tmp_path)
    src = tmp_path / "src.json"
    src.write_text(json.dumps(source(data_dir)))
    assert main(["add-task", "--package", str(pkg), "--task", "gamma", "--source-file", str(src),
                 "--run", str(tmp_path / "run"), "--out", str(tmp_path / "rec.json"), "--no-progress",
                 "--set", *BUDGET]) == 0
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["parity"]["n"] == 10 and rec["parity"]["base_max_abs_err"] <= 1e-4
    # adding it again is refused; --replace retrains it in place
    with pytest.raises(PackageError):
        add_task(pkg, "gamma", tmp_path / "run2", source=source(data_dir), overrides=BUDGET, progress=False)
    add_task(pkg, "gamma", tmp_path / "run3", source=source(data_dir), overrides=BUDGET + ["seed=1"],
             replace=True, progress=False)
    manifest = load_package(pkg)
    assert [t["id"] for t in manifest["tasks"]] == ["alpha", "beta", "gamma"]
    golden = json.loads((pkg / "golden/golden.json").read_text())
    assert sum(c["task"] == "gamma" for c in golden["cases"]) == 4


def test_transfer_loss_with_a_teacher_and_a_wrong_base_is_refused(base, tmp_path, data_dir, tasks):
    pkg = fresh_package(base, tmp_path)
    td = load_npz(data_dir / NEW.file, NEW)
    feats = torch.randn(len(td.labels["train"]), 2, 16).half()
    torch.save({"tasks": ["gamma"], "features": feats}, tmp_path / "tf.pt")
    rec = add_task(pkg, "gamma", tmp_path / "run", source=source(data_dir), teacher_features_file=tmp_path / "tf.pt",
                   overrides=BUDGET + ["beta=1.0"], progress=False)
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert rec["config"]["mode"] == "lorkd" and all(h["train_kd"] > 0 for h in hist)

    # a checkpoint that is not the package's student (other W0) is refused before any training
    other = tmp_path / "other"
    cfg = TrainConfig(mode="lorkd_nokd", tasks=("alpha", "beta"), width="tiny", epochs=1, batch_size=8,
                      max_batches_per_epoch=1, lr=0.01, seed=5, num_threads=1)
    train_run(cfg, tasks, other, progress=False)
    with pytest.raises(PackageError, match="not this package's student"):
        add_task(pkg, "delta", tmp_path / "run4", source=source(data_dir), checkpoint=other / "best.pt",
                 overrides=BUDGET, progress=False)


def test_generic_student_base(tmp_path, data_dir, tasks):
    """A package made by lorkd.decompose (torchvision MobileNetV3-small, Linear decomposed too) takes a new
    expert the same way, with parity."""
    cfg = tiny_two_task_config(data_dir, width="x1.0", arch="mobilenet_v3_small", decompose_linear=True,
                               max_batches_per_epoch=1)
    train_run(cfg, tasks, tmp_path / "run", progress=False)
    pkg = tmp_path / "pkg"
    export_from_run(tmp_path / "run", pkg, checkpoint_out=tmp_path / "ck", name="generic")
    experts = {p.name: p.read_bytes() for p in (pkg / "experts").iterdir()}
    rec = add_task(pkg, "gamma", tmp_path / "add", source=source(data_dir),
                   overrides=["epochs=1", "batch_size=8", "max_batches_per_epoch=2"], progress=False)
    assert rec["parity"]["max_abs_err"] <= 1e-4 and rec["parity"]["argmax_agreement"] == 1.0
    assert all((pkg / "experts" / n).read_bytes() == b for n, b in experts.items())
    assert [t["id"] for t in load_package(pkg)["tasks"]] == ["alpha", "beta", "gamma"]


def test_diverged_training_is_refused(base, tmp_path, data_dir):
    """NaN factors must not reach the package (a NaN logit would slip through a plain max() tolerance check)."""
    pkg = fresh_package(base, tmp_path)
    manifest = (pkg / "manifest.json").read_bytes()
    with pytest.raises(RuntimeError, match="diverged"):
        add_task(pkg, "gamma", tmp_path / "run", source=source(data_dir), overrides=BUDGET + ["lr=1e30"],
                 progress=False)
    assert (pkg / "manifest.json").read_bytes() == manifest
    assert not any(p.name.startswith(".gamma") or p.name.startswith("gamma") for p in (pkg / "experts").iterdir())


def test_folder_of_images_source(base, tmp_path):
    """The new task's data come through the toolkit's loaders: here a folder of RGB images at another size
    (resized to the package's 28 px; classes are the sorted folder names when no labels are given)."""
    from lorkd.synthetic import write_folder_task

    write_folder_task(tmp_path / "photos", ("low", "mid", "high"), 40, grey=False, seed=4)
    pkg = fresh_package(base, tmp_path)
    rec = add_task(pkg, "photos", tmp_path / "run", overrides=BUDGET, progress=False,
                   source={"type": "folder", "path": str(tmp_path / "photos"), "channels": 3})
    entry = load_package(pkg)["tasks"][-1]
    assert entry["id"] == "photos" and entry["labels"] == ["high", "low", "mid"] and entry["input"]["channels"] == 3
    assert rec["parity"]["max_abs_err"] <= 1e-4 and rec["parity"]["n"] == 12
