"""Networks: the LoRKD student (ShuffleNetV2 for 28 px with EKS convs), its BN-folded deploy twin, the teacher."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .eks import EKSConv2d, Segments, sort_by_task


@dataclass
class StudentConfig:
    """ShuffleNetV2 shape and decomposition settings. lora_tasks = 0 gives a plain (MTL/STL) student."""

    num_classes: tuple[int, ...] = (2, 2, 5)
    lora_tasks: int = 3
    rank: int = 4
    alpha: float = 16.0
    stages_repeats: tuple[int, int, int] = (4, 8, 4)
    stages_out_channels: tuple[int, int, int, int, int] = (24, 116, 232, 464, 1024)  # x1.0
    # one BatchNorm per task (statistics and affine) instead of one shared by all tasks (issue 13 probe)
    task_bn: bool = False

    @property
    def feature_dim(self) -> int:
        return self.stages_out_channels[-1]


class TaskBatchNorm2d(nn.Module):
    """One BatchNorm2d per task, routed like the EKS convs: each sample is normalised with its own task's batch
    statistics in training and its task's running statistics in eval, then its task's affine.

    Why: the three tasks are three modalities (ultrasound, X-ray, fundus photographs); a shared BatchNorm
    normalises each with statistics pooled over all of them (the domain-specific BatchNorm of multi-domain
    learning). Post-hoc re-estimation of per-task statistics hurt (models/README.md), so it is trained as such.
    """

    def __init__(self, channels: int, num_tasks: int):
        super().__init__()
        if num_tasks < 1:
            raise ValueError("per-task BatchNorm needs at least one task")
        self.bns = nn.ModuleList([nn.BatchNorm2d(channels) for _ in range(num_tasks)])
        # The base network's affine (what student.onnx holds before any expert is fed): None = the mean over tasks
        # of the folded (scale, shift), set at export; add-task pins it to the package's values (a plain attribute,
        # not state, so checkpoints stay as trained).
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (tasks, C): every task's BatchNorm as y = scale * x + shift (eval statistics)."""
        pairs = [bn_fold_factors(bn) for bn in self.bns]
        return torch.stack([s for s, _ in pairs]), torch.stack([b for _, b in pairs])

    def reference_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference is not None:
            return self.reference
        s, b = self.folded()
        return s.mean(0), b.mean(0)

    def forward(self, x: torch.Tensor, route: torch.Tensor | Segments | None) -> torch.Tensor:
        if route is None:
            if self.training:
                raise ValueError("per-task BatchNorm needs the task of every sample")
            s, b = self.reference_affine()  # the base network, as the exported graph runs it when nothing is fed
            return x * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)
        if isinstance(route, Segments):
            parts = [self.bns[t](xt) for t, xt in enumerate(x.split(list(route.counts))) if xt.shape[0]]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        task = route.argmax(1)  # one-hot mask (N, T), any order
        out = torch.empty_like(x)
        for t in task.unique().tolist():
            idx = (task == t).nonzero().squeeze(1)
            out[idx] = self.bns[t](x[idx])
        return out


class TaskAffine(nn.Module):
    """Deploy twin of TaskBatchNorm2d: y = x * scale + shift with `scale` and `shift` of shape (1, C, 1, 1).

    Both are overridable graph inputs listed in the manifest as layers (FORMAT.md section 1), so an expert's own
    per-task BatchNorm arrives through the ordinary merge rule, W0 + scale * B @ A, like any decomposed conv.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class ConvUnit(nn.Module):
    """conv -> BatchNorm (shared, or per task with cfg.task_bn) -> optional ReLU. In deploy mode: conv with
    folded bias, no BN (with cfg.task_bn: conv without bias, then a TaskAffine).

    The conv is an EKSConv2d when `decomposed` (groups == 1 convs) and an ordinary conv otherwise (depthwise).
    """

    def __init__(
        self, cin: int, cout: int, k: int, stride: int, groups: int, act: bool, cfg: StudentConfig, deploy: bool
    ):
        super().__init__()
        pad = k // 2
        self.decomposed = groups == 1
        if deploy and cfg.task_bn:  # per-task BatchNorm cannot fold into a shared conv: unfolded conv + affine
            self.conv: nn.Module = nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False)
            self.bn: nn.Module = TaskAffine(cout)
        elif deploy:
            self.conv = nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=True)
            self.bn = nn.Identity()
        else:
            if self.decomposed:
                self.conv = EKSConv2d(cin, cout, k, stride, pad, cfg.lora_tasks, cfg.rank, cfg.alpha)
            else:
                self.conv = nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False)
            self.bn = TaskBatchNorm2d(cout, cfg.lora_tasks) if cfg.task_bn else nn.BatchNorm2d(cout)
        self.act = act

    def forward(self, x: torch.Tensor, mask: torch.Tensor | Segments | None) -> torch.Tensor:
        if isinstance(self.conv, EKSConv2d):
            x = self.conv(x, mask)
        else:
            x = self.conv(x)
        x = self.bn(x, mask) if isinstance(self.bn, TaskBatchNorm2d) else self.bn(x)
        return F.relu(x) if self.act else x


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, cfg: StudentConfig, deploy: bool):
        super().__init__()
        self.stride = stride
        bf = oup // 2
        if stride > 1:
            self.branch1 = nn.ModuleList(
                [ConvUnit(inp, inp, 3, stride, inp, False, cfg, deploy), ConvUnit(inp, bf, 1, 1, 1, True, cfg, deploy)]
            )
        else:
            self.branch1 = nn.ModuleList()
        cin2 = inp if stride > 1 else bf
        self.branch2 = nn.ModuleList(
            [
                ConvUnit(cin2, bf, 1, 1, 1, True, cfg, deploy),
                ConvUnit(bf, bf, 3, stride, bf, False, cfg, deploy),
                ConvUnit(bf, bf, 1, 1, 1, True, cfg, deploy),
            ]
        )

    @staticmethod
    def _run(units: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor | Segments | None) -> torch.Tensor:
        for u in units:
            x = u(x, mask)
        return x

    def forward(self, x: torch.Tensor, mask: torch.Tensor | Segments | None) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self._run(self.branch2, x2, mask)), dim=1)
        else:
            out = torch.cat((self._run(self.branch1, x, mask), self._run(self.branch2, x, mask)), dim=1)
        return channel_shuffle(out, 2)


class Student(nn.Module):
    """ShuffleNetV2 adapted to 28 px: stride-1 3x3 stem, no max-pool; stages run 28 -> 14 -> 7 -> 4.

    `forward(x, task)` takes the task index of every sample (a mixed-task batch) and returns the pooled
    features (N, feature_dim); `logits(features, t)` applies head t. `task=None` runs the base network W0.
    """

    def __init__(self, cfg: StudentConfig, deploy: bool = False, routing: str = "segments"):
        super().__init__()
        self.cfg = cfg
        # "segments": sort the batch by task, one merged-weight conv per task (fast, the default);
        # "mask": the one-pass masked low-rank branch (kept as the reference and for the speed A/B).
        self.routing = routing
        ch = cfg.stages_out_channels
        self.stem = ConvUnit(3, ch[0], 3, 1, 1, True, cfg, deploy)
        stages = []
        inp = ch[0]
        for repeats, oup in zip(cfg.stages_repeats, ch[1:4], strict=True):
            blocks = [InvertedResidual(inp, oup, 2, cfg, deploy)]
            blocks += [InvertedResidual(oup, oup, 1, cfg, deploy) for _ in range(repeats - 1)]
            stages.append(nn.ModuleList(blocks))
            inp = oup
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = ConvUnit(inp, ch[4], 1, 1, 1, True, cfg, deploy)
        self.heads = nn.ModuleList([nn.Linear(ch[4], c) for c in cfg.num_classes]) if not deploy else nn.ModuleList()

    def task_mask(self, task: torch.Tensor | None) -> torch.Tensor | None:
        if task is None or self.cfg.lora_tasks == 0:
            return None
        return F.one_hot(task, self.cfg.lora_tasks).float()

    def features(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        if task is None or self.cfg.lora_tasks == 0 or self.routing == "mask":
            return self._features(x, self.task_mask(task))
        order, inverse, seg = sort_by_task(task, self.cfg.lora_tasks)
        # already sorted (e.g. one-task eval batches): skip the gathers
        sorted_ = bool((order == torch.arange(len(order), device=order.device)).all())
        f = self._features(x if sorted_ else x[order], seg)
        return f if sorted_ else f[inverse]

    def _features(self, x: torch.Tensor, route: torch.Tensor | Segments | None) -> torch.Tensor:
        x = self.stem(x, route)
        for stage in (self.stage2, self.stage3, self.stage4):
            for block in stage:
                x = block(x, route)
        x = self.conv5(x, route)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        return self.features(x, task)

    def logits(self, feats: torch.Tensor, t: int) -> torch.Tensor:
        return self.heads[t](feats)

    def eks_layers(self) -> list[tuple[str, EKSConv2d, nn.BatchNorm2d]]:
        """(manifest layer name, EKS conv, its BN) in graph order; the name is the conv's weight name."""
        out = []
        for name, mod in self.named_modules():
            if isinstance(mod, ConvUnit) and isinstance(mod.conv, EKSConv2d):
                out.append((f"{name}.conv.weight", mod.conv, mod.bn))
        return out


class DeployStudent(nn.Module):
    """Student graph for export (BatchNorm folded; with task_bn, unfolded convs each followed by a TaskAffine):
    logits = features(x) @ head_weight^T + head_bias."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.net = Student(cfg, deploy=True)

    def forward(self, x: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor) -> torch.Tensor:
        return F.linear(self.net.features(x), head_weight, head_bias)


def bn_fold_factors(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, b) with BN(y) = s * y + b per output channel (eval mode statistics)."""
    s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return s, bn.bias.detach() - bn.running_mean * s


@torch.no_grad()
def fold_student(student: Student) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Fold every BN into its conv.

    Returns (deploy_state, factors): `deploy_state` is the DeployStudent state dict (prefix `net.`), with
    folded W0 for decomposed convs; `factors[layer] = {"A": (T, r*k, Cin*k), "B": folded (T, Cout*k, r*k)}`.
    """
    if student.cfg.task_bn:
        return fold_task_bn(student)
    state: dict[str, torch.Tensor] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for name, mod in student.named_modules():
        if not isinstance(mod, ConvUnit):
            continue
        s, b = bn_fold_factors(mod.bn)
        w = mod.conv.weight.detach()
        state[f"net.{name}.conv.weight"] = (w * s.view(-1, 1, 1, 1)).float().clone()
        state[f"net.{name}.conv.bias"] = b.float().clone()
        if isinstance(mod.conv, EKSConv2d) and mod.conv.rank > 0:
            k = mod.conv.k
            factors[f"{name}.conv.weight"] = {
                "A": mod.conv.lora_A.detach().float().clone(),
                "B": (mod.conv.lora_B.detach() * s.repeat_interleave(k).view(1, -1, 1)).float().clone(),
            }
    return state, factors


def affine_factors(values: torch.Tensor, reference: torch.Tensor, rank: int, scale: float
                   ) -> dict[str, torch.Tensor]:
    """Per-task vectors (T, C) as factors of a [1, C, 1, 1] layer whose W0 is `reference`: scale * B_t @ A_t is
    values_t - reference within float32 rounding (B_t = e_1, A_t's first row = the difference / scale, the other
    rows zero): a vector is a rank-1 delta, so the ordinary merge rule carries it."""
    t, c = values.shape
    a = torch.zeros(t, rank, c)
    a[:, 0] = (values - reference.view(1, -1)) / scale
    b = torch.zeros(t, 1, rank)
    b[:, 0, 0] = 1.0
    return {"A": a.float(), "B": b}


@torch.no_grad()
def fold_task_bn(student: Student) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """`fold_student` for a student with one BatchNorm per task: nothing folds into the shared convs.

    Convs keep W0 and the factors as trained (no bias); every TaskBatchNorm2d becomes a TaskAffine whose `scale`
    and `shift` hold the reference affine (the base network) and whose factors give each task its own."""
    cfg = student.cfg
    state: dict[str, torch.Tensor] = {}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    scale = cfg.alpha / cfg.rank
    for name, mod in student.named_modules():
        if not isinstance(mod, ConvUnit):
            continue
        state[f"net.{name}.conv.weight"] = mod.conv.weight.detach().float().clone()
        if isinstance(mod.conv, EKSConv2d) and mod.conv.rank > 0:
            factors[f"{name}.conv.weight"] = {"A": mod.conv.lora_A.detach().float().clone(),
                                              "B": mod.conv.lora_B.detach().float().clone()}
        s, b = mod.bn.folded()
        s0, b0 = mod.bn.reference_affine()
        for part, values, ref in (("scale", s, s0), ("shift", b, b0)):
            state[f"net.{name}.bn.{part}"] = ref.float().view(1, -1, 1, 1).clone()
            factors[f"{name}.bn.{part}"] = affine_factors(values.float(), ref.float(), cfg.rank, scale)
    return state, factors


def deploy_layers(student: nn.Module) -> list[dict]:
    """The manifest's `layers` (FORMAT.md section 5) in graph order: every decomposed conv, and with per-task
    BatchNorm its unit's `bn.scale` and `bn.shift` right after its conv (those of depthwise convs included)."""
    rank = student.cfg.rank
    task_bn = bool(getattr(student.cfg, "task_bn", False))
    out = []

    def entry(name: str, cout: int, cin: int, k: int, role: str) -> dict:
        layer = {"name": name, "shape": [cout, cin, k, k], "kernel": k, "a_shape": [rank * k, cin * k],
                 "b_shape": [cout * k, rank * k]}
        return layer if role == "conv" else {**layer, "role": role}  # absent role = a conv (version 1 manifests)

    if not task_bn:
        return [entry(n, conv.out_channels, conv.in_channels, conv.k, "conv") for n, conv, _ in student.eks_layers()]
    for name, mod in student.named_modules():
        if isinstance(mod, ConvUnit):
            if isinstance(mod.conv, EKSConv2d) and mod.conv.rank > 0:
                out.append(entry(f"{name}.conv.weight", mod.conv.out_channels, mod.conv.in_channels, mod.conv.k,
                                 "conv"))
            c = mod.conv.out_channels
            out += [entry(f"{name}.bn.scale", 1, c, 1, "bn_scale"), entry(f"{name}.bn.shift", 1, c, 1, "bn_shift")]
    return out


def folded_delta(a: torch.Tensor, b: torch.Tensor, scale: float, shape: tuple[int, ...]) -> torch.Tensor:
    return scale * (b @ a).reshape(shape)


class Teacher(nn.Module):
    """ResNet-18 adapted to 28 px (3x3 stem, no max-pool), shared backbone, one head per task.

    The default stem stride is 2 (layer1 at 14x14): a stride-1 stem trains at ~18 img/s on this CPU, 4x slower.
    """

    def __init__(self, num_classes: tuple[int, ...] = (2, 2, 5), arch: str = "resnet18", stem_stride: int = 2):
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None)
        net.conv1 = nn.Conv2d(3, 64, 3, stem_stride, 1, bias=False)
        net.maxpool = nn.Identity()
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.backbone = net
        self.heads = nn.ModuleList([nn.Linear(self.feature_dim, c) for c in num_classes])

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone(x)

    def logits(self, feats: torch.Tensor, t: int) -> torch.Tensor:
        return self.heads[t](feats)


@torch.no_grad()
def count_params_macs(model: nn.Module, input_shape=(1, 3, 28, 28), extra_args=()) -> tuple[int, int]:
    """(parameters, multiply-accumulates per image) of a plain network (convs and Linears)."""
    macs = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal macs
        k = m.kernel_size[0] * m.kernel_size[1]
        hw = out.shape[2] * out.shape[3] if out.dim() == 4 else 1  # a Linear served as a 1x1 conv: (N, Cout)
        macs += out.shape[1] * hw * (m.in_channels // m.groups) * k

    def linear_hook(m: nn.Linear, _inp, out):
        nonlocal macs
        macs += m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        model(torch.zeros(input_shape), *extra_args)
    finally:
        for h in hooks:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return params, macs
