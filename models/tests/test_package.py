"""Manifest schema and checksum verification."""

from __future__ import annotations

import copy
import json

import pytest

from lorkd.export import export_package
from lorkd.package import PackageError, expert_version, load_package, validate_manifest, verify_checksums


@pytest.fixture(scope="module")
def pkg(tmp_path_factory, tasks):
    from conftest import randomise, tiny_config

    from lorkd.models import Student

    out = tmp_path_factory.mktemp("p") / "pkg"
    export_package(randomise(Student(tiny_config())), tasks, out, name="tiny", golden_per_task=2)
    return out


def test_manifest_is_valid_and_lists_every_file(pkg):
    manifest = load_package(pkg)
    on_disk = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert manifest["lora"] == {"rank": 4, "alpha": 16.0, "scale": 4.0}
    grey, rgb = manifest["tasks"]
    assert grey["input"]["channels"] == 1 and rgb["input"]["channels"] == 3
    assert grey["input"]["mean"] == [0.5] * 3 and grey["input"]["std"] == [0.5] * 3
    assert manifest["provenance"]["data"]["alpha"]["md5"]
    assert len(expert_version(pkg, manifest, "alpha")) == 16


def test_tampered_file_is_detected(pkg, tmp_path):
    import shutil

    copy_dir = tmp_path / "copy"
    shutil.copytree(pkg, copy_dir)
    target = copy_dir / "experts" / "beta.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    manifest = json.loads((copy_dir / "manifest.json").read_text())
    assert verify_checksums(copy_dir, manifest) == ["experts/beta.safetensors"]
    with pytest.raises(PackageError, match="beta"):
        load_package(copy_dir)
    (copy_dir / "golden" / "golden.json").unlink()
    assert "golden/golden.json" in verify_checksums(copy_dir, manifest)


@pytest.mark.parametrize(
    "mutate,msg",
    [
        (lambda m: m.update(format_version=2), "format_version"),
        (lambda m: m["tasks"][1].update(id="alpha"), "duplicate"),
        (lambda m: m["tasks"][0].update(id="Bad Id"), "bad or duplicate"),
        (lambda m: m["tasks"][0].update(num_classes=7), "num_classes"),
        (lambda m: m["lora"].update(scale=2.0), "scale"),
        (lambda m: m["layers"][0].update(a_shape=[1, 1]), "a_shape"),
        (lambda m: m["files"].pop("student.onnx"), "not listed"),
        (lambda m: m["files"].update({"../x": "0" * 64}), "bad path"),
        (lambda m: m.pop("layers"), "layers"),
    ],
)
def test_schema_rejects_bad_manifests(pkg, mutate, msg):
    manifest = json.loads((pkg / "manifest.json").read_text())
    bad = copy.deepcopy(manifest)
    mutate(bad)
    with pytest.raises(PackageError, match=msg):
        validate_manifest(bad)
