"""Export round trip: ORT package vs PyTorch EKS, base network, merge/switch rule, standalone merged expert."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from safetensors import safe_open

from lorkd.data import to_tensor
from lorkd.export import export_package
from lorkd.package import (
    base_weights,
    delta,
    expert_feeds,
    load_package,
    merge,
    merged_expert_onnx,
    read_expert,
    switch,
)
from lorkd.parity import package_parity, session


@pytest.fixture()
def pkg(tmp_path, tiny_student, tasks):
    out = tmp_path / "pkg"
    export_package(tiny_student, tasks, out, name="tiny", golden_per_task=3)
    return out


def test_package_layout_and_expert_metadata(pkg, tiny_student):
    manifest = load_package(pkg)
    assert manifest["format"] == "lorkd-package" and manifest["format_version"] == 1
    assert [L["name"] for L in manifest["layers"]] == [n for n, _, _ in tiny_student.eks_layers()]
    assert manifest["layers"][0]["kernel"] == 3  # the stem
    model = onnx.load(str(pkg / "student.onnx"))
    inputs = {i.name for i in model.graph.input}
    inits = {i.name for i in model.graph.initializer}
    for L in manifest["layers"]:
        assert L["name"] in inputs and L["name"] in inits  # overridable initializer
    assert {"input", "head_weight", "head_bias"} <= inputs
    assert [o.name for o in model.graph.output] == ["logits"]
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    assert model.opset_import[0].version >= 17
    with safe_open(str(pkg / "experts/beta.safetensors"), framework="numpy") as f:
        meta = f.metadata()
        assert meta["format"] == "lorkd-expert" and meta["task"] == "beta"
        assert float(meta["scale"]) == 4.0 and meta["rank"] == "4"
        for L in manifest["layers"]:
            assert list(f.get_tensor(f"{L['name']}.lora_A").shape) == L["a_shape"]
            assert list(f.get_tensor(f"{L['name']}.lora_B").shape) == L["b_shape"]
        assert f.get_tensor("head.weight").shape == (3, 64)
    # servers run as another user (the image's uid 65532): expert files must be world-readable
    for expert in (pkg / "experts").iterdir():
        assert expert.stat().st_mode & 0o044 == 0o044, expert


def test_ort_matches_pytorch_eks_and_base(pkg, tiny_student, tasks):
    res = package_parity(pkg, tiny_student, tasks, "test")
    for tid, r in res["tasks"].items():
        assert r["max_abs_err"] <= 1e-4, tid
        assert r["argmax_agreement"] == 1.0, tid
        assert r["base_max_abs_err"] <= 1e-4, tid
    assert res["switch_max_abs_err"] <= 1e-5


def test_experts_really_differ_from_base(pkg, tiny_student, tasks):
    manifest = load_package(pkg)
    sess = session(pkg / "student.onnx")
    x = to_tensor(tasks[1].images["test"]).numpy()
    feeds = expert_feeds(pkg, manifest, "beta")
    expert = sess.run(["logits"], {"input": x, **feeds})[0]
    base = sess.run(["logits"], {"input": x, "head_weight": feeds["head_weight"], "head_bias": feeds["head_bias"]})[0]
    assert np.abs(expert - base).max() > 1e-3
    assert expert.shape == (len(x), 3)


def test_golden_cases_reproduce(pkg):
    manifest = load_package(pkg)
    golden = json.loads((pkg / "golden/golden.json").read_text())
    sess = session(pkg / "student.onnx")
    from PIL import Image

    assert len(golden["cases"]) == 6
    for case in golden["cases"]:
        img = np.asarray(Image.open(pkg / case["file"]))
        if img.ndim == 2:
            img = img[..., None]
        feeds = expert_feeds(pkg, manifest, case["task"])
        got = sess.run(["logits"], {"input": to_tensor(img[None]).numpy(), **feeds})[0][0]
        assert np.abs(got - np.array(case["logits"])).max() <= golden["tolerance"]
        assert int(got.argmax()) == case["top1"]


def test_bn_folded_merge_equals_folding_the_merged_weight(pkg, tiny_student):
    """fold(W0 + dW_t) == fold(W0) + fold(dW_t): B rows carry the BN scale of their output channel."""
    manifest = load_package(pkg)
    names = [L["name"] for L in manifest["layers"]]
    w0 = base_weights(pkg / "student.onnx", names)
    ex, _ = read_expert(pkg / "experts/alpha.safetensors")
    merged = merge(w0, ex, manifest["layers"], 4.0)
    for name, conv, bn in tiny_student.eks_layers():
        s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
        direct = (conv.merged_weight(0) * s.view(-1, 1, 1, 1)).detach().numpy()
        np.testing.assert_allclose(merged[name], direct, atol=1e-5, rtol=1e-5)


def test_switch_rule(pkg):
    manifest = load_package(pkg)
    layers = manifest["layers"]
    w0 = base_weights(pkg / "student.onnx", [L["name"] for L in layers])
    ea, _ = read_expert(pkg / "experts/alpha.safetensors")
    eb, _ = read_expert(pkg / "experts/beta.safetensors")
    w_a = merge(w0, ea, layers, 4.0)
    w_b = switch(w_a, ea, eb, layers, 4.0)
    direct = merge(w0, eb, layers, 4.0)
    for L in layers:
        assert np.abs(w_b[L["name"]] - direct[L["name"]]).max() <= 1e-5
        assert np.abs(delta(eb, L["name"], L["shape"], 4.0)).max() > 0


def test_standalone_merged_expert(pkg, tmp_path, tasks):
    manifest = load_package(pkg)
    out = tmp_path / "beta.onnx"
    merged_expert_onnx(pkg, "beta", out)
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ["input"]
    x = to_tensor(tasks[1].images["test"]).numpy()
    got = session(out).run(["logits"], {"input": x})[0]
    ref = session(pkg / "student.onnx").run(["logits"], {"input": x, **expert_feeds(pkg, manifest, "beta")})[0]
    np.testing.assert_allclose(got, ref, atol=1e-5)
