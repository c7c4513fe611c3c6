"""Generic decomposition (PEFT-style): any torchvision-style CNN -> LoRKD student, and its BN-folded deploy twin.

`decompose(model, tasks=3, rank=4, alpha=16)` replaces every groups == 1 square-kernel conv by an EKS conv
(W0 copied from the conv, per-task factors B_t = 0 so every expert starts as the given model); depthwise and
grouped convs, norms and everything else stay shared. The last Linear (the classifier) is replaced by one head
per task; its input is the feature the heads and the transfer loss use.

Routing cannot be threaded through a foreign forward(), so the wrapper sorts the batch by task and sets the
segments on every EKS conv for the duration of the forward (EKSConv2d.route), then restores the batch order.

Export does not need to know the architecture: a forward with hooks pairs each conv with the BatchNorm that
consumes its output (the conv -> BN pattern of torchvision/timm CNNs), and the deploy copy folds that BN.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .eks import EKSConv2d, EKSLinear, LinearAsConv, sort_by_task

# Architectures tested end to end (decompose, train step, export, ORT parity); others may work.
SUPPORTED = (
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "mobilenet_v3_small", "mobilenet_v3_large", "resnet18",
)
# Below this input size the stem is adapted (first conv stride 1, max-pools removed), as for 28-px MedMNIST;
# from 64 px up the standard stem is kept.
SMALL_INPUT = 64


@dataclass
class GenericConfig:
    """What export and training read from a student (mirrors models.StudentConfig's used fields)."""

    arch: str
    num_classes: tuple[int, ...]
    lora_tasks: int
    rank: int
    alpha: float
    feature_dim: int
    image_size: int


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier: the last nn.Linear in module order (fc, classifier[-1], head.fc, ...)."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("model has no nn.Linear classifier to replace by task heads")
    return found[-1]


def adapt_stem(model: nn.Module, image_size: int) -> list[str]:
    """Small inputs (< 64 px): first conv stride 1 and every max-pool removed. Returns what was changed."""
    if image_size >= SMALL_INPUT:
        return []
    changed = []
    first = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if first[1].stride != (1, 1):
        first[1].stride = (1, 1)
        changed.append(f"{first[0]}: stride 1")
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.MaxPool2d):
            model.set_submodule(name, nn.Identity())
            changed.append(f"{name}: max-pool removed")
    return changed


def decomposable(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size[0] == m.kernel_size[1]
            and m.padding_mode == "zeros" and isinstance(m.padding, tuple))


def decompose(model: nn.Module, tasks: int | list[str] | tuple[str, ...], rank: int = 4, alpha: float = 16.0,
              num_classes: tuple[int, ...] | None = None, arch: str = "custom",
              image_size: int = 224, linear: bool = False) -> LoRKDStudent:
    """Turn `model` (modified in place) into a LoRKD student with one expert per task.

    tasks: number of tasks or their ids; num_classes: classes per task (default 2 each); linear: also decompose
    every Linear except the classifier (e.g. MobileNetV3's 576 -> 1024 layer), served as 1x1 convs.
    """
    n_tasks = tasks if isinstance(tasks, int) else len(tasks)
    num_classes = tuple(num_classes or (2,) * n_tasks)
    if len(num_classes) != n_tasks:
        raise ValueError(f"{n_tasks} tasks but {len(num_classes)} class counts")
    head_name, head = last_linear(model)
    model.set_submodule(head_name, nn.Identity())
    for name, m in list(model.named_modules()):
        if decomposable(m):
            model.set_submodule(name, EKSConv2d.from_conv(m, n_tasks, rank, alpha))
        elif linear and isinstance(m, nn.Linear):
            model.set_submodule(name, EKSLinear.from_linear(m, n_tasks, rank, alpha))
    cfg = GenericConfig(arch, num_classes, n_tasks, rank, alpha, head.in_features, image_size)
    return LoRKDStudent(model, cfg)


def plain(model: nn.Module, num_classes: tuple[int, ...], arch: str = "custom", image_size: int = 224) -> LoRKDStudent:
    """The same wrapper without factors (MTL/STL baselines on the generic path)."""
    head_name, head = last_linear(model)
    model.set_submodule(head_name, nn.Identity())
    cfg = GenericConfig(arch, tuple(num_classes), 0, 0, 0.0, head.in_features, image_size)
    return LoRKDStudent(model, cfg)


def torchvision_model(arch: str, checkpoint: str | None = None) -> nn.Module:
    """A torchvision architecture by name; weights only from a local file (never downloaded)."""
    if not hasattr(torchvision.models, arch):
        raise ValueError(f"unknown torchvision architecture {arch!r}")
    net = getattr(torchvision.models, arch)(weights=None)
    if checkpoint:
        load_state(net, checkpoint)
    return net


def load_state(net: nn.Module, checkpoint: str) -> None:
    """Load a local state dict (plain, or under 'state_dict'/'model'; a 'module.' DDP prefix is stripped)."""
    sd = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if isinstance(sd, nn.Module):
        sd = sd.state_dict()
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    net.load_state_dict(sd)


def build_student(arch: str, num_classes: tuple[int, ...], image_size: int = 28, num_tasks: int | None = None,
                  rank: int = 4, alpha: float = 16.0, checkpoint: str | None = None,
                  linear: bool = False) -> LoRKDStudent:
    """torchvision `arch` (optionally initialised from a local checkpoint), stem adapted to the input size,
    decomposed (num_tasks = 0: plain multi-head network)."""
    net = torchvision_model(arch, checkpoint)
    adapt_stem(net, image_size)
    n = len(num_classes) if num_tasks is None else num_tasks
    if n == 0:
        return plain(net, num_classes, arch, image_size)
    return decompose(net, n, rank, alpha, num_classes, arch, image_size, linear)


class LoRKDStudent(nn.Module):
    """A decomposed backbone plus per-task heads: forward(x, task) -> features, logits(features, t)."""

    def __init__(self, backbone: nn.Module, cfg: GenericConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.heads = nn.ModuleList([nn.Linear(cfg.feature_dim, c) for c in cfg.num_classes])
        self.routing = "segments"

    @property
    def feature_dim(self) -> int:
        return self.cfg.feature_dim

    def _eks(self) -> list[EKSConv2d]:
        return [m for m in self.backbone.modules() if isinstance(m, EKSConv2d)]

    def forward(self, x: torch.Tensor, task: torch.Tensor | None = None) -> torch.Tensor:
        if task is None or self.cfg.lora_tasks == 0:
            return self.backbone(x)
        order, inverse, seg = sort_by_task(task, self.cfg.lora_tasks)
        ident = bool((order == torch.arange(len(order), device=order.device)).all())
        convs = self._eks()
        for c in convs:
            c.route = seg
        try:
            f = self.backbone(x if ident else x[order])
        finally:
            for c in convs:
                c.route = None
        return f if ident else f[inverse]

    def logits(self, feats: torch.Tensor, t: int) -> torch.Tensor:
        return self.heads[t](feats)

    def eks_layers(self) -> list[tuple[str, EKSConv2d, nn.BatchNorm2d | None]]:
        """(manifest layer name, EKS conv, the BN folded into it or None) in execution order."""
        bn_of = conv_bn_pairs(self.backbone, self.cfg.image_size)
        order = execution_order(self.backbone, self.cfg.image_size)
        mods = dict(self.backbone.named_modules())
        return [(f"{n}.weight", mods[n], bn_of.get(n)) for n in order if isinstance(mods[n], EKSConv2d)]

    def deploy(self) -> tuple[nn.Module, dict[str, dict[str, torch.Tensor]]]:
        """(BN-folded DeployNet taking (x, head_weight, head_bias), factors[layer] = {"A", "B" folded})."""
        return fold_generic(self)


def _trace(backbone: nn.Module, image_size: int):
    """Run one eval forward on zeros with hooks: execution order of convs and which BN eats which conv."""
    order: list[str] = []
    out_of: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # keep outputs alive so that their ids stay unique during the forward
    pairs: dict[str, nn.BatchNorm2d] = {}
    hooks = []
    for name, m in backbone.named_modules():
        if isinstance(m, (nn.Conv2d, EKSConv2d)):
            def conv_hook(mod, inp, out, name=name):
                order.append(name)
                out_of[id(out)] = name
                keep.append(out)
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.BatchNorm2d):
            def bn_hook(mod, inp, name=name):
                src = out_of.get(id(inp[0]))
                if src is not None:
                    pairs[src] = mod
            hooks.append(m.register_forward_pre_hook(bn_hook))
    was = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            backbone(torch.zeros(1, 3, image_size, image_size))
    finally:
        backbone.train(was)
        for h in hooks:
            h.remove()
    return order, pairs


def conv_bn_pairs(backbone: nn.Module, image_size: int) -> dict[str, nn.BatchNorm2d]:
    return _trace(backbone, image_size)[1]


def execution_order(backbone: nn.Module, image_size: int) -> list[str]:
    seen: list[str] = []
    for n in _trace(backbone, image_size)[0]:
        if n not in seen:
            seen.append(n)
    return seen


class DeployNet(nn.Module):
    """BN-folded plain network for export: logits = backbone(x) @ head_weight^T + head_bias.

    Parameter names are `net.<backbone path>`, so the exported initializers are the manifest layer names once
    the `net.` prefix is stripped (export.export_student_onnx)."""

    def __init__(self, backbone: nn.Module, feature_dim: int):
        super().__init__()
        self.net = backbone
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor) -> torch.Tensor:
        return F.linear(self.net(x), head_weight, head_bias)


@torch.no_grad()
def fold_generic(student: LoRKDStudent) -> tuple[DeployNet, dict[str, dict[str, torch.Tensor]]]:
    """Deploy copy: every decomposed conv -> nn.Conv2d (W0 and bias BN-folded), its BN -> Identity;
    factors' B rows scaled by the BN factor of their output channel (FORMAT.md section 1)."""
    student = student.eval()
    pairs = conv_bn_pairs(student.backbone, student.cfg.image_size)
    net = copy.deepcopy(student.backbone).eval()
    bn_names = {id(bn): n for n, bn in student.backbone.named_modules() if isinstance(bn, nn.BatchNorm2d)}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for name, m in list(student.backbone.named_modules()):
        if not isinstance(m, EKSConv2d):
            continue
        bn = pairs.get(name)
        if bn is not None:
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            b0 = m.bias if m.bias is not None else torch.zeros_like(s)
            bias = bn.bias + (b0 - bn.running_mean) * s
            net.set_submodule(bn_names[id(bn)], nn.Identity())
        else:
            s = torch.ones(m.out_channels)
            bias = m.bias if m.bias is not None else torch.zeros(m.out_channels)
        kind = LinearAsConv if isinstance(m, EKSLinear) else nn.Conv2d
        conv = kind(m.in_channels, m.out_channels, m.k, m.stride, m.padding, m.dilation, bias=True)
        conv.weight.copy_(m.weight * s.view(-1, 1, 1, 1))
        conv.bias.copy_(bias)
        net.set_submodule(name, conv)
        if m.rank > 0:
            factors[f"{name}.weight"] = {
                "A": m.lora_A.detach().float().clone(),
                "B": (m.lora_B.detach() * s.repeat_interleave(m.k).view(1, -1, 1)).float().clone(),
            }
    return DeployNet(net, student.cfg.feature_dim).eval(), factors
