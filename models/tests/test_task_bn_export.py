"""Per-task BatchNorm in a package: its scale and shift travel as [1, C, 1, 1] layers through the ordinary merge."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import randomise, tiny_config, tiny_two_task_config, write_npz

from lorkd.add_task import add_task, folded_w0, load_base_student
from lorkd.data import TaskSpec
from lorkd.export import export_package
from lorkd.models import Student, TaskBatchNorm2d, affine_factors, deploy_layers
from lorkd.package import base_weights, delta, load_package, read_expert
from lorkd.parity import eks_parity, package_parity
from lorkd.pipeline import export_from_run
from lorkd.train import train_run


@pytest.fixture()
def tbn_student() -> Student:
    torch.manual_seed(0)
    return randomise(Student(dataclasses.replace(tiny_config(), task_bn=True)))  # every task's BN its own values


def test_affine_factors_give_the_difference_within_float32_rounding():
    g = torch.Generator().manual_seed(0)
    values, ref = torch.rand(3, 7, generator=g) + 0.5, torch.rand(7, generator=g)
    f = affine_factors(values, ref, rank=4, scale=4.0)
    assert f["A"].shape == (3, 4, 7) and f["B"].shape == (3, 1, 4)
    got = ref + 4.0 * (f["B"] @ f["A"]).squeeze(1)
    assert torch.allclose(got, values, rtol=0, atol=3e-7)  # an ulp or two of values near 1.4


def test_layers_list_every_units_scale_and_shift_after_its_conv(tbn_student):
    layers = deploy_layers(tbn_student)
    units = [m for m in tbn_student.modules() if isinstance(m, TaskBatchNorm2d)]
    assert sum(L.get("role") == "bn_scale" for L in layers) == len(units)
    assert sum(L.get("role") == "bn_shift" for L in layers) == len(units)
    assert [L["name"] for L in layers[:3]] == ["stem.conv.weight", "stem.bn.scale", "stem.bn.shift"]
    scale = layers[1]
    assert scale["shape"] == [1, 8, 1, 1] and scale["a_shape"] == [4, 8] and scale["b_shape"] == [1, 4]
    # without per-task BatchNorm the list is the decomposed convs, with no role (version 1 manifests unchanged)
    plain = deploy_layers(randomise(Student(tiny_config())))
    assert all("role" not in L for L in plain) and len(plain) == sum(L.get("role") is None for L in layers)


def test_package_of_a_per_task_batchnorm_student_has_parity(tmp_path, tbn_student, tasks):
    pkg = tmp_path / "pkg"
    export_package(tbn_student, tasks, pkg, name="tiny-tbn", golden_per_task=2)
    manifest = load_package(pkg)
    # merged path (every task, the base network, the in-place switch) and the mixed-task graph
    par = package_parity(pkg, tbn_student, tasks)
    assert par["max_abs_err"] < 1e-5 and par["argmax_agreement"] == 1.0
    assert all(t["base_max_abs_err"] < 1e-5 for t in par["tasks"].values())
    eks = eks_parity(pkg, manifest, tbn_student, tasks)
    assert eks["max_abs_err"] < 1e-5 and eks["mixed"]["batches_with_several_tasks"] >= 1
    # the experts really carry different BatchNorms: their scale deltas differ and are not zero
    w0 = base_weights(pkg / "student.onnx", [L["name"] for L in manifest["layers"]])
    experts = [read_expert(pkg / t["file"])[0] for t in manifest["tasks"]]
    shape = [1, 8, 1, 1]
    d = [delta(e, "stem.bn.scale", shape, manifest["lora"]["scale"]) for e in experts]
    assert np.abs(d[0] - d[1]).max() > 1e-3
    s, _ = tbn_student.stem.bn.folded()
    for t in range(2):
        assert np.allclose(w0["stem.bn.scale"] + d[t], s[t].numpy().reshape(shape), atol=1e-6)


def test_add_task_on_a_per_task_batchnorm_package(tmp_path, data_dir, tasks):
    """The new task gets the base network's affine (frozen, zero delta); the package's other files stay."""
    new = TaskSpec("gamma", "gamma.npz", "Gamma (grey)", "synthetic", ("0", "1", "2"), 1)
    write_npz(data_dir / new.file, 1, 3, seed=3)
    cfg = tiny_two_task_config(data_dir, task_bn=True)
    train_run(cfg, tasks, tmp_path / "run", progress=False)
    pkg = tmp_path / "pkg"
    export_from_run(tmp_path / "run", pkg, checkpoint_out=tmp_path / "ck", name="tiny-tbn")
    before = (pkg / "student.onnx").read_bytes()
    student, _ = load_base_student(tmp_path / "ck" / "best.pt")
    w0 = folded_w0(student)
    rec = add_task(pkg, "gamma", tmp_path / "add", overrides=["epochs=1", "batch_size=8", "max_batches_per_epoch=2"],
                   source={"path": str(data_dir / new.file), "labels": list(new.labels), "channels": 1,
                           "name": new.name}, progress=False)
    assert rec["parity"]["max_abs_err"] <= 1e-4 and rec["parity"]["argmax_agreement"] == 1.0
    assert (pkg / "student.onnx").read_bytes() == before
    manifest = load_package(pkg)
    gamma, _ = read_expert(pkg / "experts/gamma.safetensors")
    for L in manifest["layers"]:
        if L.get("role"):
            assert np.abs(delta(gamma, L["name"], L["shape"], manifest["lora"]["scale"])).max() < 1e-6
            assert np.array_equal(w0[L["name"]], base_weights(pkg / "student.onnx", [L["name"]])[L["name"]])
