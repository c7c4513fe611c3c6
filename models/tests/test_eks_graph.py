"""The mixed-task graph student_eks.onnx: golden cases alone and in mixed batches, rank padding, unused slots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from lorkd.data import to_tensor
from lorkd.eks_graph import (
    EKS_FILE,
    bank_layout,
    eks_session_inputs,
    expert_bank_entry,
    export_eks,
    make_banks,
)
from lorkd.export import export_package
from lorkd.package import expert_feeds, load_package, read_expert, sha256_file
from lorkd.parity import session

MODELS = Path(__file__).resolve().parents[1]
PACKAGES = pytest.mark.parametrize("name", ["medmnist-lorkd", "medmnist-mbv3s-lorkd"])


def _read_png(path: Path) -> np.ndarray:
    img = np.asarray(Image.open(path))
    return img[..., None] if img.ndim == 2 else img


def _run(sess, eks: dict, x: np.ndarray, slots, feeds: dict) -> np.ndarray:
    return sess.run([eks["output_name"]], {eks["input_name"]: x, eks["task_input"]: np.asarray(slots, np.int64),
                                           **feeds})[0]


@PACKAGES
def test_shipped_eks_golden_alone_and_mixed(name):
    pkg = MODELS / name
    manifest = load_package(pkg)
    eks = manifest["model"]["eks"]
    layout = bank_layout(manifest, eks["rank"])
    assert eks["bank_width"] == layout["bank_width"] and eks["segments"] == layout["segments"]
    assert manifest["files"][EKS_FILE] == sha256_file(pkg / EKS_FILE)
    golden = json.loads((pkg / "golden/golden.json").read_text())
    cases = golden["cases"]
    ids = [t["id"] for t in manifest["tasks"]]
    slot_of, feeds = eks_session_inputs(pkg, manifest, ids, np.random.default_rng(3))
    sess = session(pkg / eks["file"])
    x = np.concatenate([to_tensor(_read_png(pkg / c["file"])[None]).numpy() for c in cases])
    slots = [slot_of[c["task"]] for c in cases]
    alone = np.concatenate([_run(sess, eks, x[i:i + 1], slots[i:i + 1], feeds) for i in range(len(cases))])
    order = np.random.default_rng(0).permutation(len(cases))  # every task in one batch, shuffled
    mixed = np.empty_like(alone)
    mixed[order] = _run(sess, eks, x[order], np.asarray(slots)[order], feeds)
    for got in (alone, mixed):
        for c, row in zip(cases, got, strict=True):
            n = len(c["logits"])
            assert np.abs(row[:n] - np.array(c["logits"])).max() <= golden["tolerance"], c["file"]
            assert int(row[:n].argmax()) == c["top1"]
            assert np.all(row[n:] == 0.0)  # zero-padded head rows


@pytest.fixture()
def tiny_pkg(tmp_path, tiny_student, tasks):
    out = tmp_path / "pkg"
    export_package(tiny_student, tasks, out, name="tiny", golden_per_task=2)
    return out


def test_export_eks_is_idempotent_and_listed(tiny_pkg):
    manifest = load_package(tiny_pkg)
    assert manifest["model"]["eks"]["file"] == EKS_FILE and EKS_FILE in manifest["files"]
    before = (tiny_pkg / "manifest.json").read_bytes(), (tiny_pkg / EKS_FILE).read_bytes()
    export_eks(tiny_pkg)
    assert ((tiny_pkg / "manifest.json").read_bytes(), (tiny_pkg / EKS_FILE).read_bytes()) == before
    # the W0 are plain initializers: no layer input, no overridable initializer
    sess = session(tiny_pkg / EKS_FILE)
    assert [i.name for i in sess.get_inputs()] == ["input", "task_slot", "factor_bank", "head_weight_bank",
                                                  "head_bias_bank"]
    assert not sess.get_overridable_initializers()


def test_tiny_mixed_batch_matches_merged_experts(tiny_pkg):
    manifest = load_package(tiny_pkg)
    eks = manifest["model"]["eks"]
    ids = [t["id"] for t in manifest["tasks"]]
    slot_of, feeds = eks_session_inputs(tiny_pkg, manifest, ids, np.random.default_rng(1), extra_slots=2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 28, 28)).astype(np.float32)
    task = np.array([0, 1, 1, 0, 1, 0])
    got = _run(session(tiny_pkg / EKS_FILE), eks, x, [slot_of[ids[t]] for t in task], feeds)
    base = session(tiny_pkg / "student.onnx")
    for t, tid in enumerate(ids):
        ref = base.run(["logits"], {"input": x, **expert_feeds(tiny_pkg, manifest, tid)})[0]
        sel = task == t
        assert np.abs(got[sel, : ref.shape[1]] - ref[sel]).max() <= 1e-5


def test_lower_rank_expert_is_zero_padded_exactly(tiny_pkg, tmp_path):
    manifest = load_package(tiny_pkg)
    eks = manifest["model"]["eks"]
    layout = {k: eks[k] for k in ("rank", "bank_width", "segments")}
    ex, meta = read_expert(tiny_pkg / "experts/beta.safetensors")
    r2 = {}
    rng = np.random.default_rng(5)
    for L in manifest["layers"]:
        k = L["kernel"]
        a, b = ex[f"{L['name']}.lora_A"], ex[f"{L['name']}.lora_B"]
        r2[f"{L['name']}.lora_A"] = np.ascontiguousarray(a[: 2 * k])
        r2[f"{L['name']}.lora_B"] = np.ascontiguousarray(b[:, : 2 * k] + rng.standard_normal((b.shape[0], 2 * k),
                                                                                           dtype=np.float32) * 0.05)
    r2["head.weight"], r2["head.bias"] = ex["head.weight"], ex["head.bias"]
    path = tmp_path / "beta2.safetensors"
    save_file(r2, str(path), metadata={**meta, "rank": "2", "scale": repr(16.0 / 2)})
    row, hw, hb = expert_bank_entry(path, layout)
    for s in layout["segments"]:  # the padding is zeros: A's extra rows, B's extra columns
        m = row[s["offset"]: s["offset"] + s["rows"] * s["cols"]].reshape(s["rows"], s["cols"])
        k = next(L["kernel"] for L in manifest["layers"] if L["name"] == s["layer"])
        pad = m[2 * k:] if s["factor"] == "A" else m[:, 2 * k:]
        assert pad.size and not pad.any()
    # against student.onnx with the rank-2 merge W0 + 8 * B A
    from lorkd.package import base_weights, merge

    names = [L["name"] for L in manifest["layers"]]
    feeds = merge(base_weights(tiny_pkg / "student.onnx", names), r2, manifest["layers"], 8.0)
    x = np.random.default_rng(2).standard_normal((3, 3, 28, 28)).astype(np.float32)
    ref = session(tiny_pkg / "student.onnx").run(["logits"], {"input": x, **feeds, "head_weight": hw,
                                                              "head_bias": hb})[0]
    bank, hwb, hbb = make_banks([(row, hw, hb)])
    got = _run(session(tiny_pkg / EKS_FILE), eks, x, [0, 0, 0],
               {eks["bank_input"]: bank, eks["head_weight_input"]: hwb, eks["head_bias_input"]: hbb})
    assert np.abs(got - ref).max() <= 1e-5


def test_unused_slot_rows_do_not_matter(tiny_pkg):
    manifest = load_package(tiny_pkg)
    eks = manifest["model"]["eks"]
    ids = [t["id"] for t in manifest["tasks"]]
    slot_of, feeds = eks_session_inputs(tiny_pkg, manifest, ids, None, extra_slots=2)
    sess = session(tiny_pkg / EKS_FILE)
    x = np.random.default_rng(0).standard_normal((4, 3, 28, 28)).astype(np.float32)
    slots = [slot_of["alpha"], slot_of["beta"], slot_of["beta"], slot_of["alpha"]]
    ref = _run(sess, eks, x, slots, feeds)
    poisoned = {k: v.copy() for k, v in feeds.items()}
    for v in poisoned.values():
        v[len(ids):] = np.nan  # the unused rows
    assert np.array_equal(_run(sess, eks, x, slots, poisoned), ref)


def test_manifest_eks_entry_is_validated(tiny_pkg):
    from lorkd.package import PackageError, validate_manifest

    manifest = load_package(tiny_pkg)
    validate_manifest(manifest)
    for breaking in (
        lambda e: e["segments"].pop(),  # a factor without its segment
        lambda e: e["segments"][1].update(offset=e["segments"][0]["offset"]),  # overlap
        lambda e: e["segments"][0].update(rows=e["segments"][0]["rows"] + 1),  # wrong shape at the bank rank
        lambda e: e.update(bank_width=e["segments"][-1]["offset"]),  # does not fit the row
        lambda e: e.update(rank=1),  # below lora.rank
    ):
        bad = json.loads(json.dumps(manifest))
        breaking(bad["model"]["eks"])
        with pytest.raises(PackageError):
            validate_manifest(bad)
    bad = json.loads(json.dumps(manifest))
    del bad["files"][EKS_FILE]
    with pytest.raises(PackageError):
        validate_manifest(bad)
