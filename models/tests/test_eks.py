"""EKS conv: per-sample equivalence with the merged plain conv, and explicit gradient separation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorkd.eks import EKSConv2d, EKSLinear, Segments, sort_by_task


def make(k: int, stride: int = 1, tasks: int = 3) -> EKSConv2d:
    torch.manual_seed(k * 10 + stride)
    conv = EKSConv2d(6, 10, k, stride=stride, padding=k // 2, num_tasks=tasks, rank=4, alpha=16.0)
    with torch.no_grad():
        conv.lora_B.normal_(0, 0.1)
    return conv.double()


@pytest.mark.parametrize("k,stride", [(1, 1), (3, 1), (3, 2)])
def test_eks_equals_plain_conv_with_merged_weight_per_sample(k, stride):
    conv = make(k, stride)
    x = torch.randn(7, 6, 9, 9, dtype=torch.float64)
    task = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    y = conv(x, F.one_hot(task, 3).double())
    for b in range(len(x)):
        t = int(task[b])
        dw = conv.scale * (conv.lora_B[t] @ conv.lora_A[t]).reshape(conv.weight.shape)
        ref = F.conv2d(x[b:b + 1], conv.weight + dw, None, stride, k // 2)
        torch.testing.assert_close(y[b:b + 1], ref, rtol=1e-10, atol=1e-10)
    # the delta is not trivially zero, so the check above really exercises the factors
    assert (y - F.conv2d(x, conv.weight, None, stride, k // 2)).abs().max() > 1e-3


def test_eks_without_task_is_the_base_network():
    conv = make(1)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(conv(x, None), F.conv2d(x, conv.weight))


def test_b_starts_at_zero_so_every_expert_starts_at_w0():
    conv = EKSConv2d(4, 5, 3, padding=1, num_tasks=2)
    assert torch.count_nonzero(conv.lora_B) == 0
    assert torch.count_nonzero(conv.lora_A) > 0
    assert conv.scale == 4.0
    assert conv.lora_A.shape == (2, 12, 12) and conv.lora_B.shape == (2, 15, 12)


@pytest.mark.parametrize("k", [1, 3])
def test_gradient_separation(k):
    conv = make(k)
    x = torch.randn(6, 6, 8, 8, dtype=torch.float64)
    task = torch.tensor([0, 1, 2, 0, 1, 2])
    y = conv(x, F.one_hot(task, 3).double())
    loss_task1 = y[task == 1].pow(2).sum()
    loss_task1.backward()
    ga, gb = conv.lora_A.grad, conv.lora_B.grad
    for other in (0, 2):
        assert torch.count_nonzero(ga[other]) == 0, "task 1's loss leaked into task {other}'s A"
        assert torch.count_nonzero(gb[other]) == 0
    assert torch.count_nonzero(gb[1]) > 0 and torch.count_nonzero(ga[1]) > 0
    assert torch.count_nonzero(conv.weight.grad) > 0  # W0 is shared and trained


def test_student_gradient_separation_through_the_whole_network(tiny_student):
    # eval-mode BN: in train mode the shared BN's batch statistics couple the samples of a mixed batch,
    # so separation is exact per EKS conv (tests above) but not through batch statistics (see README).
    s = tiny_student.eval()
    x = torch.randn(6, 3, 28, 28)
    task = torch.tensor([0, 1, 0, 1, 1, 0])
    feats = s(x, task)
    s.logits(feats[task == 0], 0).sum().backward()
    for name, conv, _ in s.eks_layers():
        assert torch.count_nonzero(conv.lora_A.grad[1]) == 0, name
        assert torch.count_nonzero(conv.lora_B.grad[1]) == 0, name
    assert any(torch.count_nonzero(conv.lora_B.grad[0]) > 0 for _, conv, _ in s.eks_layers())


@pytest.mark.parametrize("k,stride", [(1, 1), (3, 2)])
def test_segments_routing_equals_mask_routing_and_separates_gradients(k, stride):
    conv = make(k, stride)
    x = torch.randn(7, 6, 9, 9, dtype=torch.float64)
    task = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    order, inverse, seg = sort_by_task(task, 3)
    assert seg.counts == (2, 2, 3) and torch.equal(task[order], torch.tensor([0, 0, 1, 1, 2, 2, 2]))
    y_seg = conv(x[order], seg)[inverse]
    y_mask = conv(x, F.one_hot(task, 3).double())
    torch.testing.assert_close(y_seg, y_mask, rtol=1e-10, atol=1e-10)
    y_seg[task == 1].pow(2).sum().backward()
    for other in (0, 2):
        assert conv.lora_A.grad is None or torch.count_nonzero(conv.lora_A.grad[other]) == 0
        assert torch.count_nonzero(conv.lora_B.grad[other]) == 0
    assert torch.count_nonzero(conv.lora_B.grad[1]) > 0


def test_segments_must_cover_the_batch():
    conv = make(1)
    with pytest.raises(ValueError, match="segments cover"):
        conv(torch.randn(3, 6, 4, 4, dtype=torch.float64), Segments((1, 1, 0)))


def test_student_routings_agree(tiny_student):
    x = torch.randn(6, 3, 28, 28)
    task = torch.tensor([1, 0, 1, 0, 0, 1])
    seg = tiny_student(x, task)
    tiny_student.routing = "mask"
    torch.testing.assert_close(seg, tiny_student(x, task), rtol=1e-5, atol=1e-5)


def test_eks_linear_equals_linear_with_merged_weight_per_sample():
    torch.manual_seed(3)
    lin = torch.nn.Linear(6, 5).double()
    eks = EKSLinear.from_linear(lin, 3, 2, 4.0).double()
    with torch.no_grad():
        eks.lora_B.normal_(0, 0.1)
    x = torch.randn(7, 6, dtype=torch.float64)
    task = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    order, inverse, seg = sort_by_task(task, 3)
    y = eks(x[order], seg)[inverse]
    torch.testing.assert_close(eks(x, F.one_hot(task, 3).double()), y, rtol=1e-10, atol=1e-10)
    for b in range(len(x)):
        w = lin.weight + eks.delta(int(task[b])).view(5, 6)
        torch.testing.assert_close(y[b], F.linear(x[b], w, lin.bias), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eks(x), lin(x))  # no task: the given Linear
