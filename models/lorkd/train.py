"""Training: teacher, LoRKD student (CE + task knowledge transfer), MTL and STL baselines; resumable."""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .data import MultiTaskDataset, TaskData, class_weights, task_balanced_weights
from .metrics import evaluate, selection_score
from .models import Student, StudentConfig, Teacher

MODES = ("teacher", "lorkd", "lorkd_nokd", "mtl", "stl")


@dataclass
class TrainConfig:
    """Every hyper-parameter of a run (JSON config file and `--set key=value` flags map onto this)."""

    mode: str = "lorkd"
    tasks: tuple[str, ...] = ("breast", "pneumonia", "retina")
    epochs: int = 7
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    # task sampling: task t gets a share of draws proportional to n_t ** task_power (1 = natural mix)
    task_power: float = 0.5
    # class-weighted CE: weight_c = (n / (C * n_c)) ** class_weight_power (1 = inverse frequency)
    class_weight_power: float = 0.5
    hflip: bool = True
    # LoRKD
    rank: int = 4
    alpha: float = 16.0
    beta: float = 5.0  # weight of the task knowledge transfer loss (0 = ablation)
    temperature: float = 4.0
    # transfer loss (issue 13): "teacher_proj" = KL to softmax(P f_teacher / T) with P trained on that same loss
    # (the original, target can drift); "fitnets" = a student-side projection Q regresses the teacher's fixed,
    # standardised feature (MSE per dimension); "logits" = KL to the teacher's own task head at temperature T
    kd_variant: str = "teacher_proj"
    # training augmentation on top of the flip: "" | "shift" (random translation of up to 2 px, edge padded)
    augment: str = ""
    # weight averaging (issue 13): evaluate, select and export an exponential moving average of the weights and
    # BatchNorm statistics, decay min(ema_decay, (1 + k) / (ema_ramp + k)) at step k; 0 = off (the raw weights). The
    # cap binds only from step ema_cap_step(ema_decay, ema_ramp) on (890 for 0.99 with ramp 10): in a shorter run
    # only the ramp counts
    ema_decay: float = 0.0
    # the ramp's constant c: while the ramp sets the average, step j weighs about (j + c)^(c - 2) and the average's
    # mean age is about k / c steps (10: the last tenth of the run; 4: the last quarter, weights rising as j^2;
    # 2: the plain mean of the weights after every step, the starting ones included). At least 2: below, early
    # steps would weigh more than late ones
    ema_ramp: float = 10.0
    # one BatchNorm per task in the built-in LoRKD student (statistics and affine), routed like the factors;
    # exported as per-task scale and shift layers (FORMAT.md section 1)
    task_bn: bool = False
    width: str = "x1.0"  # x1.0 | tiny (tests)
    # student architecture: "" = the built-in 28-px ShuffleNetV2 (`width`); else any torchvision CNN name,
    # decomposed by lorkd.decompose (tested: shufflenet_v2_x0_5..x2_0, mobilenet_v3_small/large, resnet18)
    arch: str = ""
    student_checkpoint: str = ""  # local weights to start the generic student from (never downloaded)
    # BatchNorm momentum of generic students (torchvision's MobileNetV3 uses 0.01: over a few hundred steps its
    # running statistics stay near their init and eval predicts one class); 0 keeps the architecture's own
    bn_momentum: float = 0.1
    decompose_linear: bool = False  # generic students: also decompose every Linear but the classifier
    image_size: int = 28  # model input size; every task is resized to it at load
    # per-task data sources: {"task": {"type": "npz"|"folder"|"csv", "path": ..., "labels": [...],
    # "channels": 1|3, "mean": [3], "std": [3]}}; a MedMNIST id without an entry is its npz in --data-dir
    task_sources: dict = field(default_factory=dict)
    # cross-validation on train+val (lorkd.data.cv_split): K folds, fold `cv_fold` is val; 0 = the official split
    cv_folds: int = 0
    cv_fold: int = 0
    teacher_arch: str = "resnet18"
    teacher_stem_stride: int = 2
    teacher_features: str = ""  # path to precomputed teacher features (teacher-features command)
    seed: int = 0
    device: str = "auto"
    num_threads: int = 1  # 1 beats 2 by 3-7x on this shared 2-core box (OpenMP contention), see README
    eval_batch_size: int = 512
    max_batches_per_epoch: int = 0  # 0 = full epoch (tests use small numbers)
    epoch_draws: int = 0  # samples drawn per epoch; 0 = the training set size (STL members get their task share)
    # split each batch into this many chunks (gradient accumulation; BatchNorm sees one chunk at a time). Under
    # DDP the chunks are dealt to the ranks, so a single process with micro_batches = world size reproduces a
    # DDP run step for step (tests/test_distributed.py). 0 = the world size (1 without DDP).
    micro_batches: int = 0
    routing: str = "segments"  # EKS routing of the built-in student: segments (fast) | mask (reference)
    # add-task: train only the factors and heads; W0, depthwise convs and BatchNorm (in eval mode) stay frozen
    freeze_base: bool = False
    # per-task refinement (issue 13, eighth pass): after the run, W0, depthwise convs and BatchNorm freeze at the
    # selected checkpoint and only the factors and heads train on for `refine_epochs` more epochs (cosine from
    # `refine_lr`, no warm-up). With the base frozen the tasks no longer share a trainable weight, so each task
    # keeps the refine epoch (0 = the checkpoint it started from) where its own val score peaked: the exported
    # expert of every task is exactly the network that was scored. 0 = off.
    refine_epochs: int = 0
    refine_lr: float = 0.01
    # keep each task's factors and head from the epoch of its own best val score (needs freeze_base; set by the
    # refinement stage, not meant to be set by hand)
    per_task_select: bool = False
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        d = dict(d)
        if "tasks" in d:
            d["tasks"] = tuple(d["tasks"])
        return cls(**d)

    def with_overrides(self, pairs: list[str]) -> TrainConfig:
        d = dataclasses.asdict(self)
        for pair in pairs:
            key, _, raw = pair.partition("=")
            if key not in d:
                raise ValueError(f"unknown config key {key!r}")
            cur = d[key]
            if isinstance(cur, bool):
                val = raw.lower() in ("1", "true", "yes")
            elif isinstance(cur, int):
                val = int(raw)
            elif isinstance(cur, float):
                val = float(raw)
            elif isinstance(cur, tuple):
                val = tuple(s for s in raw.split(",") if s)
            else:
                val = raw
            d[key] = val
        return TrainConfig.from_dict(d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        return d


WIDTHS = {
    "x1.0": dict(stages_repeats=(4, 8, 4), stages_out_channels=(24, 116, 232, 464, 1024)),
    "x0.5": dict(stages_repeats=(4, 8, 4), stages_out_channels=(24, 48, 96, 192, 1024)),
    "tiny": dict(stages_repeats=(1, 1, 1), stages_out_channels=(8, 16, 32, 64, 64)),
}


def student_config(cfg: TrainConfig, num_classes: tuple[int, ...], decomposed: bool) -> StudentConfig:
    return StudentConfig(
        num_classes=num_classes, lora_tasks=len(num_classes) if decomposed else 0,
        rank=cfg.rank, alpha=cfg.alpha, task_bn=cfg.task_bn, **WIDTHS[cfg.width],
    )


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, tasks: list[TaskData]) -> nn.Module:
    return build_model_for(cfg, tuple(td.spec.num_classes for td in tasks))


def build_model_for(cfg: TrainConfig, ncls: tuple[int, ...]) -> nn.Module:
    """The untrained network of a config, given the class count of each task (no data needed)."""
    decomposed = cfg.mode in ("lorkd", "lorkd_nokd")
    if cfg.task_bn and (cfg.arch or not decomposed):
        raise ValueError("task_bn (per-task BatchNorm) exists for the built-in decomposed student only")
    if cfg.mode == "teacher":
        return Teacher(ncls, cfg.teacher_arch, cfg.teacher_stem_stride)
    if cfg.arch:
        from .decompose import build_student

        student = build_student(cfg.arch, ncls, cfg.image_size, len(ncls) if decomposed else 0, cfg.rank,
                                cfg.alpha, cfg.student_checkpoint or None, cfg.decompose_linear)
        if cfg.bn_momentum:
            for m in student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = cfg.bn_momentum
        return student
    if cfg.image_size != 28:
        raise ValueError("the built-in ShuffleNetV2 is the 28-px one: set arch (e.g. shufflenet_v2_x1_0) "
                         "for other input sizes")
    return Student(student_config(cfg, ncls, decomposed=decomposed), routing=cfg.routing)


class KDProjection(nn.Module):
    """Learned projection of the teacher's pooled feature to the student's feature width."""

    def __init__(self, teacher_dim: int, student_dim: int):
        super().__init__()
        self.proj = nn.Linear(teacher_dim, student_dim)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.proj(f)


KD_VARIANTS = ("teacher_proj", "fitnets", "logits")


def fitnets_loss(student_proj: torch.Tensor, teacher_std: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over dimensions of (Q f_s - z_t)^2 against the fixed standardised teacher feature, summed."""
    return (student_proj - teacher_std).pow(2).mean(dim=1).sum()


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: per-sample T^2 * KL(softmax(teacher/T) || softmax(student/T)) over the classes, summed."""
    return transfer_loss(student_logits, teacher_logits, temperature)


@torch.no_grad()
def softmax_stats(z: torch.Tensor, temperature: float) -> tuple[float, float]:
    """(mean entropy of softmax(z/T) relative to log D, mean KL(softmax(z/T) || uniform) in nats)."""
    logp = F.log_softmax(z.float() / temperature, dim=1)
    ent = -(logp.exp() * logp).sum(dim=1)
    logd = math.log(z.shape[1])
    return float((ent / logd).mean()), float((logd - ent).mean())


@torch.no_grad()
def kd_diagnostics(model: nn.Module, kd_proj: KDProjection | None, train, tfeat: torch.Tensor, idx: torch.Tensor,
                   cfg: TrainConfig, device) -> dict:
    """Is the transfer target collapsing? On a fixed sample of training images (no flip):

    teacher_proj: entropy of the target softmax(P f_t / T) relative to log D (1 = uniform), its KL to uniform,
    its spread over samples (mean total variation to the mean target; 0 = one target for every image), the same
    entropy for the student's softmax(f_s / T) and the cosine between P f_t and f_s. fitnets: cosine and MSE
    between Q f_s and the standardised teacher feature. logits: agreement of teacher and student argmax and
    the KL at temperature T."""
    was_training = model.training
    model.eval()
    x, t = train.x[idx], train.t[idx]
    fs = torch.cat([model(x[s:s + 256].to(device), t[s:s + 256].to(device)).float().cpu()
                    for s in range(0, len(idx), 256)])
    tf = tfeat[idx, 0]
    out: dict = {}
    if cfg.kd_variant == "teacher_proj" and kd_proj is not None:
        z = kd_proj(tf.to(device)).float().cpu()
        out["target_entropy_rel"], out["target_kl_uniform"] = softmax_stats(z, cfg.temperature)
        p = F.softmax(z / cfg.temperature, dim=1)
        out["target_spread_tv"] = float(0.5 * (p - p.mean(0)).abs().sum(1).mean())
        out["student_entropy_rel"], out["student_kl_uniform"] = softmax_stats(fs, cfg.temperature)
        out["cos_target_student"] = float(F.cosine_similarity(z, fs, dim=1).mean())
        out["teacher_raw_entropy_rel"], _ = softmax_stats(tf, cfg.temperature)
    elif cfg.kd_variant == "fitnets" and kd_proj is not None:
        q = kd_proj(fs.to(device)).float().cpu()
        out["cos_student_teacher"] = float(F.cosine_similarity(q, tf, dim=1).mean())
        out["mse"] = float((q - tf).pow(2).mean())
    elif cfg.kd_variant == "logits":
        agree, kl = [], []
        for k in range(int(t.max()) + 1):
            sel = t == k
            if sel.any():
                sl = model.logits(fs[sel].to(device), k).float().cpu()
                tl = tf[sel, :sl.shape[1]]
                agree.append((sl.argmax(1) == tl.argmax(1)).float())
                kl.append(F.kl_div(F.log_softmax(sl / cfg.temperature, 1), F.log_softmax(tl / cfg.temperature, 1),
                                   log_target=True, reduction="none").sum(1))
        out["argmax_agreement"] = float(torch.cat(agree).mean())
        out["kl_T"] = float(torch.cat(kl).mean())
    model.train(was_training)
    return out


def transfer_loss(student_feat: torch.Tensor, teacher_proj: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample T^2 * KL(softmax(teacher/T) || softmax(student/T)) over the feature dimension, summed."""
    log_s = F.log_softmax(student_feat / temperature, dim=1)
    log_t = F.log_softmax(teacher_proj / temperature, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1)
    return temperature**2 * kl.sum()


class StepLoss(nn.Module):
    """The whole training objective as one module, so that DDP sees every trained parameter in its forward
    (heads and the KD projection run outside the student's forward otherwise)."""

    def __init__(self, model: nn.Module, kd_proj: KDProjection | None, class_weights: list[torch.Tensor],
                 beta: float, temperature: float, kd_variant: str = "teacher_proj"):
        super().__init__()
        self.model, self.kd_proj = model, kd_proj
        self.cw = class_weights
        self.beta, self.temperature = beta, temperature
        self.kd_variant = kd_variant

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, tf: torch.Tensor | None,
                denom: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, ce, kd): per-sample sums divided by `denom` (the global batch size)."""
        feats = self.model(x, t)
        ce = feats.new_zeros(())
        kd = feats.new_zeros(())
        logit_kd = self.kd_variant == "logits" and tf is not None and self.beta > 0
        for k in range(len(self.cw)):
            sel = t == k
            if sel.any():
                logits = self.model.logits(feats[sel], k)
                ce = ce + F.cross_entropy(logits, y[sel], weight=self.cw[k], reduction="sum")
                if logit_kd:  # tf: the teacher's own head of the sample's task, padded to the widest task
                    kd = kd + logit_kd_loss(logits, tf[sel, :logits.shape[1]], self.temperature)
        ce = ce / denom
        if logit_kd:
            kd = self.beta * kd / denom
        elif self.kd_proj is not None and tf is not None:
            if self.kd_variant == "fitnets":
                kd = self.beta * fitnets_loss(self.kd_proj(feats), tf) / denom
            else:
                kd = self.beta * transfer_loss(feats, self.kd_proj(tf), self.temperature) / denom
        return ce + kd, ce, kd


def random_shift(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Translate every image by its (dy, dx) in pixels, edges replicated (the teacher's features are not
    recomputed for the shifted image: its pooled feature is close to shift-invariant)."""
    m = int(shifts.abs().max()) if len(shifts) else 0
    if m == 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (m, m, m, m), mode="replicate")
    rows = (m - shifts[:, 0])[:, None] + torch.arange(h)
    cols = (m - shifts[:, 1])[:, None] + torch.arange(w)
    return pad[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
               rows[:, None, :, None], cols[:, None, None, :]]


def dist_info() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def lr_at(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    p = (step - warm) / max(1, total - warm)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * p))


def _save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


TRAINABLE_WHEN_FROZEN = ("lora_A", "lora_B", "heads.")


def freeze_base(model: nn.Module) -> None:
    """Freeze everything but the task factors and heads (W0, depthwise convs, BatchNorm affine parameters)."""
    for name, p in model.named_parameters():
        p.requires_grad_(any(k in name for k in TRAINABLE_WHEN_FROZEN))


def ema_decay_at(decay: float, step: int, ramp: float = 10.0) -> float:
    """Decay of the weight average after `step` optimiser steps: ramps up from 1 / ramp so that the average forgets
    the random initialisation within the first few dozen steps instead of dragging it along for 1 / (1 - decay)."""
    return min(decay, (1 + step) / (ramp + step))


def ema_cap_step(decay: float, ramp: float = 10.0) -> int:
    """The first step at which `ema_decay_at` reaches `decay`. Before it the ramp (1 + k) / (ramp + k) alone sets
    the average (about the last 1 / ramp of the steps so far), so in a run with no more steps than this the setting
    has no effect: 0.99 binds at step 890 with ramp 10, after the 500 steps of a 10-epoch MedMNIST student."""
    if not 0 < decay < 1:
        raise ValueError(f"ema_decay {decay}: a weight average needs 0 < ema_decay < 1 (0 turns it off)")
    if not ramp >= 2:
        raise ValueError(f"ema_ramp {ramp}: below 2 the ramp weighs early steps more than late ones")
    return max(0, math.ceil((ramp * decay - 1) / (1 - decay) - 1e-9))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over every floating tensor of the state (parameters and BatchNorm
    running statistics); integer buffers (batch counters) are copied."""
    live = model.state_dict()
    for k, v in ema.state_dict().items():
        if v.dtype.is_floating_point:
            v.mul_(decay).add_(live[k].detach(), alpha=1 - decay)
        else:
            v.copy_(live[k])


def task_score(metrics: dict) -> float:
    """One task's share of the selection score: (ACC + AUC) / 2, as `selection_score` averages it over tasks."""
    return selection_score({"t": metrics})


def take_task(dst: dict, src: dict, t: int) -> None:
    """Copy task `t`'s own weights (its slice of every stacked factor and its head) from state `src` into `dst`;
    every shared tensor of `dst` is left as it is."""
    for k, v in src.items():
        if k.endswith(("lora_A", "lora_B")):
            dst[k][t] = v[t]
        elif k.startswith(f"heads.{t}."):
            dst[k] = v.clone()


def batchnorm_eval(model: nn.Module) -> None:
    """BatchNorm in eval mode: the shared running statistics serve every expert and must not move."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_run(cfg: TrainConfig, tasks: list[TaskData], out: Path, progress: bool = True,
              model: nn.Module | None = None) -> dict:
    """Train one model on `tasks` (all of cfg.tasks, or one task for an STL member); resumes from out/last.pt.

    `model` replaces the config's freshly built network (add-task passes the package's student with one new
    task's factors). Returns the run summary (best epoch, val and test metrics of the best checkpoint, wall time).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.num_threads)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    model = (model if model is not None else build_model(cfg, tasks)).to(device)
    if cfg.freeze_base:
        freeze_base(model)
    if cfg.per_task_select and not (cfg.freeze_base and cfg.ema_decay == 0):
        raise ValueError("per_task_select needs freeze_base (tasks share no trainable weight) and no weight average")
    if cfg.refine_epochs > 0 and dist_info()[1] > 1:  # checked on every rank, before any of them trains
        raise ValueError("refine_epochs runs in one process: train under DDP without it, then rerun the finished "
                         "run in one process with it (the first stage resumes past its end)")
    # the weight average is what gets evaluated, selected and saved as best.pt (so exported) when it is on
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    train = MultiTaskDataset(tasks, "train")
    cw = [class_weights(td.labels["train"], td.spec.num_classes, cfg.class_weight_power).to(device) for td in tasks]

    use_kd = cfg.mode == "lorkd" and cfg.beta > 0
    kd_proj = None
    tfeat = None
    diag_idx = None
    if cfg.kd_variant not in KD_VARIANTS:
        raise ValueError(f"unknown kd_variant {cfg.kd_variant!r} (one of {KD_VARIANTS})")
    if use_kd:
        if not cfg.teacher_features:
            raise ValueError("lorkd with beta > 0 needs teacher_features (run the teacher-features command)")
        blob = torch.load(cfg.teacher_features, map_location="cpu")
        if blob["tasks"] != [td.spec.id for td in tasks]:
            raise ValueError(f"teacher features were computed for tasks {blob['tasks']}")
        tfeat = blob["features"].float()  # (N_train, 2, D): [original, horizontally flipped]
        if tfeat.shape[0] != len(train):
            raise ValueError("teacher features do not match the training set size")
        feature_dim = model.cfg.feature_dim
        if cfg.kd_variant == "teacher_proj":
            kd_proj = KDProjection(tfeat.shape[2], feature_dim).to(device)
        elif cfg.kd_variant == "fitnets":
            # fixed target: the teacher's feature standardised per dimension with training-set statistics
            flat = tfeat.reshape(-1, tfeat.shape[2])
            tfeat = (tfeat - flat.mean(0)) / (flat.std(0) + 1e-5)
            kd_proj = KDProjection(feature_dim, tfeat.shape[2]).to(device)
        else:  # logits of the teacher's own task heads
            if "logits" not in blob:
                raise ValueError("kd_variant=logits needs teacher logits in the features file "
                                 "(recompute it with teacher-features from a toolkit teacher)")
            tfeat = blob["logits"].float()  # (N_train, 2, C_max)
        # a fixed sample of training images for the per-epoch diagnostics of the transfer target
        diag_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(1234))[:1024]

    params = [p for p in model.parameters() if p.requires_grad] + (list(kd_proj.parameters()) if kd_proj else [])
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer}")

    rank, world = dist_info()
    chunks = cfg.micro_batches or world
    if chunks % world:
        raise ValueError(f"micro_batches={chunks} must be a multiple of the world size {world}")
    step_loss = StepLoss(model, kd_proj, cw, cfg.beta, cfg.temperature, cfg.kd_variant)
    runner: nn.Module = step_loss
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # find_unused_parameters: a task absent from a rank's chunk leaves its factors and head without gradient
        runner = DDP(step_loss, device_ids=[device.index] if device.type == "cuda" else None,
                     find_unused_parameters=True)

    weights = task_balanced_weights(train.t, cfg.task_power)
    steps_per_epoch = math.ceil((cfg.epoch_draws or len(train)) / cfg.batch_size)
    if cfg.max_batches_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_batches_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    ema_cap = ema_cap_step(cfg.ema_decay, cfg.ema_ramp) if ema is not None else None
    ema_reached = ema_cap is not None and ema_cap < total_steps
    if ema_cap is not None and not ema_reached and rank == 0:
        print(f"[{out.name}] ema_decay {cfg.ema_decay} would bind at step {ema_cap}, after this run's {total_steps} "
              f"steps: the average follows the ramp (1 + k) / ({cfg.ema_ramp:g} + k) and the setting has no effect")

    start_epoch, history, best = 0, [], {"score": -1.0, "epoch": -1}
    # with averaging on, the raw weights follow the same trajectory as a run without it (averaging only reads
    # them), so their best checkpoint is kept too (raw_best.pt): one run gives both sides of the comparison
    best_raw = {"score": -1.0, "epoch": -1} if ema is not None else None
    elapsed = 0.0
    # per-task selection: each task's best {score, epoch, val} so far and the state composed of every task's best
    # factors and head over the frozen base; epoch 0 is the model as it came in
    task_best, composed = None, None
    last = out / "last.pt"
    if last.exists():
        ck = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        if kd_proj is not None and ck.get("kd_proj"):
            kd_proj.load_state_dict(ck["kd_proj"])
        if ema is not None:  # a checkpoint from before averaging was switched on starts it from its weights
            ema.load_state_dict(ck.get("ema") or ck["model"])
        start_epoch, history, best, elapsed = ck["epoch"] + 1, ck["history"], ck["best"], ck["elapsed"]
        # a checkpoint that did not track the raw weights' best cannot say which earlier epoch it was
        best_raw = ck.get("best_raw") if ema is not None else None
        task_best, composed = ck.get("task_best"), ck.get("composed")
        torch.set_rng_state(ck["rng"])
        if rank == 0:
            print(f"[{out.name}] resumed after epoch {ck['epoch']}")
    if rank == 0:
        with open(out / "config.json", "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)

    if cfg.per_task_select and task_best is None:
        val0 = evaluate(model, tasks, "val", device, cfg.eval_batch_size)
        task_best = {k: {"score": task_score(m), "epoch": 0, "val": {"acc": m["acc"], "auc": m["auc"]}}
                     for k, m in val0.items()}
        composed = copy.deepcopy(model.state_dict())
    diag_init = None
    if diag_idx is not None and start_epoch == 0 and rank == 0:
        diag_init = kd_diagnostics(model, kd_proj, train, tfeat, diag_idx, cfg, device)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        model.train()
        if cfg.freeze_base:
            batchnorm_eval(model)
        if kd_proj:
            kd_proj.train()
        # every rank draws the same global order and takes its chunks of each batch
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.multinomial(weights, steps_per_epoch * cfg.batch_size, replacement=True, generator=g)
        flips = torch.rand(len(order), generator=g) < 0.5 if cfg.hflip else torch.zeros(len(order), dtype=torch.bool)
        # drawn only with the augmentation on, so that every other config keeps its exact data order
        shifts = torch.randint(-2, 3, (len(order), 2), generator=g) if cfg.augment == "shift" else None
        sums = torch.zeros(4, dtype=torch.float64)  # loss, ce, kd (times samples), samples
        bar = tqdm(range(steps_per_epoch), desc=f"{out.name} ep{epoch + 1}/{cfg.epochs}",
                   disable=not progress or rank != 0, leave=False, mininterval=5)
        for s in bar:
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            fl = flips[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            for pg in opt.param_groups:
                pg["lr"] = lr_at(cfg, epoch * steps_per_epoch + s, total_steps, steps_per_epoch)
            opt.zero_grad(set_to_none=True)
            mine = list(range(rank, chunks, world))
            for j, c in enumerate(mine):
                part = idx.tensor_split(chunks)[c]
                pfl = fl.tensor_split(chunks)[c]
                x = train.x[part]
                x = torch.where(pfl[:, None, None, None], x.flip(3), x)
                if cfg.augment == "shift":
                    x = random_shift(x, shifts[s * cfg.batch_size:(s + 1) * cfg.batch_size].tensor_split(chunks)[c])
                x = x.to(device)
                y, t = train.y[part].to(device), train.t[part].to(device)
                tf = tfeat[part, pfl.long()].to(device) if use_kd else None
                sync = contextlib.nullcontext() if world == 1 or j == len(mine) - 1 else runner.no_sync()
                with sync:
                    loss, ce, kd = runner(x, y, t, tf, len(idx))
                    # DDP averages gradients over ranks; the losses are already global-batch means
                    (loss * world).backward()
                sums += torch.tensor([loss.item(), ce.item(), kd.item(), 0.0], dtype=torch.float64) * len(idx)
            sums[3] += len(idx)
            opt.step()
            if ema is not None:
                ema_update(ema, model, ema_decay_at(cfg.ema_decay, epoch * steps_per_epoch + s, cfg.ema_ramp))
            if s % 10 == 0:
                bar.set_postfix(loss=f"{sums[0] / sums[3]:.3f}")
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
            sums[3] /= world
        train_time = time.time() - t0
        rec = None
        if rank == 0:
            scored = ema if ema is not None else model
            val = evaluate(scored, tasks, "val", device, cfg.eval_batch_size)
            score = selection_score(val)
            elapsed += time.time() - t0
            rec = {
                "epoch": epoch + 1, "train_loss": float(sums[0] / sums[3]), "train_ce": float(sums[1] / sums[3]),
                "train_kd": float(sums[2] / sums[3]),
                "val": {k: {"acc": v["acc"], "auc": v["auc"]} for k, v in val.items()},
                "val_score": score, "epoch_seconds": time.time() - t0, "train_seconds": train_time,
                "images_per_second": float(sums[3]) / train_time, "world_size": world,
            }
            if diag_idx is not None:
                rec["kd_diag"] = kd_diagnostics(model, kd_proj, train, tfeat, diag_idx, cfg, device)
                if diag_init is not None:
                    rec["kd_diag_init"] = diag_init
                    diag_init = None
            if best_raw is not None:
                t_raw = time.time()
                raw_val = evaluate(model, tasks, "val", device, cfg.eval_batch_size)
                rec["raw_val"] = {k: {"acc": v["acc"], "auc": v["auc"]} for k, v in raw_val.items()}
                rec["raw_val_score"] = selection_score(raw_val)
                if rec["raw_val_score"] > best_raw["score"]:
                    best_raw = {"score": rec["raw_val_score"], "epoch": epoch + 1}
                    _save({"model": model.state_dict(), "epoch": epoch + 1, "config": cfg.to_dict(),
                           "tasks": [td.spec.id for td in tasks]}, out / "raw_best.pt")
                # the run's wall time counts this evaluation too
                dt = time.time() - t_raw
                elapsed += dt
                rec["epoch_seconds"] += dt
            history.append(rec)
            vs = " ".join(f"{k}:{v['acc']:.3f}/{v['auc']:.3f}" for k, v in val.items())
            print(f"[{out.name}] epoch {epoch + 1}/{cfg.epochs} loss {rec['train_loss']:.4f} "
                  f"(ce {rec['train_ce']:.4f} kd {rec['train_kd']:.4f}) val acc/auc {vs} score {score:.4f} "
                  f"({rec['epoch_seconds']:.0f}s, {rec['images_per_second']:.0f} img/s)", flush=True)
            if cfg.per_task_select:
                improved = False
                for t, td in enumerate(tasks):
                    m = val[td.spec.id]
                    if task_score(m) > task_best[td.spec.id]["score"]:
                        task_best[td.spec.id] = {"score": task_score(m), "epoch": epoch + 1,
                                                 "val": {"acc": m["acc"], "auc": m["auc"]}}
                        take_task(composed, model.state_dict(), t)
                        improved = True
                rec["task_best_epochs"] = {k: v["epoch"] for k, v in task_best.items()}
                best = {"score": selection_score({k: v["val"] for k, v in task_best.items()}),
                        "epoch": max(v["epoch"] for v in task_best.values()),
                        "task_epochs": rec["task_best_epochs"]}
                if improved or not (out / "best.pt").exists():
                    _save({"model": composed, "epoch": best["epoch"], "task_epochs": best["task_epochs"],
                           "config": cfg.to_dict(), "tasks": [td.spec.id for td in tasks]}, out / "best.pt")
            elif score > best["score"]:
                best = {"score": score, "epoch": epoch + 1}
                _save({"model": scored.state_dict(), "epoch": epoch + 1, "config": cfg.to_dict(),
                       "tasks": [td.spec.id for td in tasks]}, out / "best.pt")
            _save({"model": model.state_dict(), "opt": opt.state_dict(),
                   "kd_proj": kd_proj.state_dict() if kd_proj else None,
                   "ema": ema.state_dict() if ema is not None else None, "epoch": epoch, "history": history,
                   "best": best, "best_raw": best_raw, "elapsed": elapsed, "rng": torch.get_rng_state(),
                   "task_best": task_best, "composed": composed}, last)
            with open(out / "history.json", "w") as f:
                json.dump(history, f, indent=1)
            write_history_csv(history, out / "history.csv")
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    summary = {"mode": cfg.mode, "tasks": [td.spec.id for td in tasks], "best_epoch": best["epoch"],
               "best_val_score": best["score"], "wall_seconds": elapsed, "epochs": cfg.epochs}
    if task_best is not None:
        summary["task_best_epochs"] = {k: v["epoch"] for k, v in task_best.items()}
    if best_raw is not None:
        summary["raw_best_epoch"], summary["raw_best_val_score"] = best_raw["epoch"], best_raw["score"]
    if ema is not None:
        summary["ema_decay_reached"] = ema_reached
    if cfg.refine_epochs > 0 and rank == 0:
        summary = refine_run(cfg, tasks, out, summary, progress)
    if rank == 0:
        with open(out / "summary.json", "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def refine_run(cfg: TrainConfig, tasks: list[TaskData], out: Path, summary: dict, progress: bool) -> dict:
    """The per-task refinement stage (`refine_epochs`): continue from the run's selected checkpoint with the base
    frozen, keep each task's best epoch, and make that composed network the run's best.pt (the first stage's
    stays as stage1_best.pt, its stage under refine/). Resumes from refine/last.pt. Returns the run summary with
    the refinement's per-task epochs, its val score and its wall time added."""
    if cfg.mode not in ("lorkd", "lorkd_nokd"):
        raise ValueError("refine_epochs needs a decomposed student (lorkd modes): other modes have no task factors")
    stage1 = out / "stage1_best.pt"
    if not stage1.exists():
        _save(torch.load(out / "best.pt", map_location="cpu", weights_only=False), stage1)
    # Task loss only: the transfer loss's projection is trained jointly with the first stage and not kept with its
    # selected checkpoint, and a fresh one would pull the factors towards a random target.
    rcfg = TrainConfig.from_dict({**cfg.to_dict(), "epochs": cfg.refine_epochs, "lr": cfg.refine_lr,
                                  "warmup_epochs": 0.0, "freeze_base": True, "per_task_select": True,
                                  "refine_epochs": 0, "beta": 0.0, "ema_decay": 0.0})
    model = load_trained(out, tasks, stage1.name)
    rsum = train_run(rcfg, tasks, out / "refine", progress, model=model)
    _save(torch.load(out / "refine" / "best.pt", map_location="cpu", weights_only=False), out / "best.pt")
    return {**summary, "stage1_best_epoch": summary["best_epoch"], "stage1_val_score": summary["best_val_score"],
            "best_val_score": rsum["best_val_score"], "refine_epochs": cfg.refine_epochs,
            "refine_task_epochs": rsum["task_best_epochs"],
            "wall_seconds": summary["wall_seconds"] + rsum["wall_seconds"]}


def write_history_csv(history: list[dict], path: Path) -> None:
    """One row per epoch: losses, throughput, val ACC/AUC per task and the selection score."""
    if not history:
        return
    tasks = list(history[0]["val"])
    cols = ["epoch", "train_loss", "train_ce", "train_kd", "val_score", "epoch_seconds", "train_seconds",
            "images_per_second"] + [f"val_{t}_{m}" for t in tasks for m in ("acc", "auc")]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for h in history:
            row = [h.get(c, "") for c in cols[:8]] + [h["val"][t][m] for t in tasks for m in ("acc", "auc")]
            w.writerow(row)


def load_trained(run: Path, tasks: list[TaskData], which: str = "best.pt", device: str = "cpu") -> nn.Module:
    run = Path(run)
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    model = build_model(cfg, tasks)
    ck = torch.load(run / which, map_location=device, weights_only=False)
    model.load_state_dict(ck["model"])
    return model.eval()


@torch.no_grad()
def teacher_features(teacher: Teacher, tasks: list[TaskData], out: Path, batch_size: int = 256,
                     progress: bool = True) -> None:
    """Pooled teacher features of every training image and of its horizontal flip: (N, 2, D), float16; and
    the logits of the teacher's own head of each image's task (N, 2, C_max), float32, zero-padded to the
    widest task (for `kd_variant = "logits"`)."""
    teacher.eval()
    train = MultiTaskDataset(tasks, "train")
    feats = torch.zeros(len(train), 2, teacher.feature_dim, dtype=torch.float16)
    cmax = max(td.spec.num_classes for td in tasks)
    logits = torch.zeros(len(train), 2, cmax, dtype=torch.float32)
    for s in tqdm(range(0, len(train), batch_size), desc="teacher features", disable=not progress, mininterval=5):
        x = train.x[s:s + batch_size]
        t = train.t[s:s + batch_size]
        for j, xx in enumerate((x, x.flip(3))):
            f = teacher(xx)
            feats[s:s + batch_size, j] = f.half()
            for k in t.unique().tolist():
                sel = t == k
                lk = teacher.logits(f[sel], k)
                logits[s:s + batch_size, j][sel, :lk.shape[1]] = lk
    torch.save({"tasks": [td.spec.id for td in tasks], "features": feats, "logits": logits}, out)
