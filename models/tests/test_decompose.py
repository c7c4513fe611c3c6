"""Generic decomposition of torchvision CNNs: which layers, routing, export and ORT parity per architecture."""

from __future__ import annotations

import onnx
import pytest
import torch
from conftest import randomise
from torch import nn

from lorkd.data import TaskData, resize_images
from lorkd.decompose import SUPPORTED, adapt_stem, build_student, decompose, torchvision_model
from lorkd.eks import EKSConv2d
from lorkd.export import export_package
from lorkd.package import load_package
from lorkd.parity import package_parity


def groups1_convs(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_decompose_replaces_exactly_the_groups1_convs(arch):
    ref = torchvision_model(arch)
    n1 = groups1_convs(ref)
    norms = sum(1 for m in ref.modules() if isinstance(m, nn.BatchNorm2d))
    depthwise = sum(1 for m in ref.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    s = build_student(arch, (2, 3), image_size=16)
    eks = [m for m in s.modules() if isinstance(m, EKSConv2d)]
    assert len(eks) == n1 > 0
    assert sum(1 for m in s.modules() if isinstance(m, nn.Conv2d) and m.groups > 1) == depthwise
    assert sum(1 for m in s.modules() if isinstance(m, nn.BatchNorm2d)) == norms
    assert len(s.eks_layers()) == n1 and len({n for n, _, _ in s.eks_layers()}) == n1
    # B = 0: every expert starts as the given network
    s.eval()
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(s(x, torch.tensor([0, 1, 1, 0])), s(x, None))
    assert s.logits(s(x, None), 1).shape == (4, 3)


def test_decompose_keeps_the_pretrained_weights_and_routes_mixed_batches():
    torch.manual_seed(0)
    net = torchvision_model("shufflenet_v2_x0_5")
    w = net.conv1[0].weight.detach().clone()
    s = decompose(net, tasks=["a", "b"], rank=2, alpha=4.0, num_classes=(2, 2), image_size=28)
    assert torch.equal(s.backbone.conv1[0].weight, w) and s.backbone.conv1[0].scale == 2.0
    randomise(s)
    x = torch.randn(5, 3, 64, 64)
    task = torch.tensor([1, 0, 1, 1, 0])
    mixed = s(x, task)
    for t in (0, 1):
        torch.testing.assert_close(mixed[task == t], s(x[task == t], torch.full(((task == t).sum(),), t)),
                                   rtol=1e-4, atol=1e-5)
    # the routing is only set during the forward
    assert all(m.route is None for m in s.modules() if isinstance(m, EKSConv2d))
    # a task's loss gives exactly zero gradient to the other task's factors, through the whole network
    s.logits(s(x, task)[task == 0], 0).sum().backward()
    convs = [m for m in s.modules() if isinstance(m, EKSConv2d)]
    assert all(c.lora_B.grad is None or torch.count_nonzero(c.lora_B.grad[1]) == 0 for c in convs)
    assert any(c.lora_B.grad is not None and torch.count_nonzero(c.lora_B.grad[0]) > 0 for c in convs)


def test_stem_adapts_below_64_px_only():
    small = torchvision_model("resnet18")
    changed = adapt_stem(small, 28)
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity) and len(changed) == 2
    big = torchvision_model("resnet18")
    assert adapt_stem(big, 64) == [] and big.conv1.stride == (2, 2)


@pytest.fixture(scope="module")
def tasks16(tasks):
    """The synthetic tasks at 16 px: cheap, and an export size other than 28."""
    return [TaskData(td.spec, {k: resize_images(v, 16) for k, v in td.images.items()}, td.labels, td.md5)
            for td in tasks]


@pytest.mark.parametrize("arch", SUPPORTED)
def test_generic_export_serves_with_parity(arch, tmp_path, tasks16):
    torch.manual_seed(1)
    s = randomise(build_student(arch, (2, 3), image_size=16))
    out = tmp_path / arch
    manifest = export_package(s, tasks16, out, name=f"tiny-{arch}", golden_per_task=1)
    load_package(out)
    assert manifest["model"]["arch"] == f"{arch}_16px"
    assert len(manifest["layers"]) == groups1_convs(torchvision_model(arch))
    assert manifest["input"]["height"] == 16 and manifest["tasks"][1]["input"]["width"] == 16
    graph_input = onnx.load(str(out / "student.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in graph_input[1:]] == [3, 16, 16]
    res = package_parity(out, s, tasks16, "test", base_images=2)
    assert res["max_abs_err"] <= 1e-4 and res["argmax_agreement"] == 1.0, res
    assert max(r["base_max_abs_err"] for r in res["tasks"].values()) <= 1e-4


def test_linear_layers_decompose_as_1x1_convs_and_export(tmp_path, tasks16):
    torch.manual_seed(2)
    s = randomise(build_student("mobilenet_v3_small", (2, 3), image_size=16, linear=True))
    names = [n for n, _, _ in s.eks_layers()]
    assert names[-1] == "classifier.0.weight"  # the 576 -> 1024 Linear; the classifier became the task heads
    assert len(names) == groups1_convs(torchvision_model("mobilenet_v3_small")) + 1
    x = torch.randn(3, 3, 16, 16)
    task = torch.tensor([1, 0, 1])
    mixed = s(x, task)
    torch.testing.assert_close(mixed[task == 0], s(x[task == 0], torch.zeros(1, dtype=torch.long)),
                               rtol=1e-4, atol=1e-5)
    manifest = export_package(s, tasks16, tmp_path / "pkg", golden_per_task=1)
    layer = next(L for L in manifest["layers"] if L["name"] == "classifier.0.weight")
    assert layer["shape"] == [1024, 576, 1, 1] and layer["a_shape"] == [4, 576] and layer["b_shape"] == [1024, 4]
    res = package_parity(tmp_path / "pkg", s, tasks16, "test", base_images=2)
    assert res["max_abs_err"] <= 1e-4 and res["argmax_agreement"] == 1.0, res
