"""Training-throughput benchmark: variants measured side by side (interleaved rounds), medians reported.

`lorkd-train bench-train` times full training steps (forward, per-task CE, transfer loss, backward, SGD step)
of mixed-task batches. Variants run in turn within every round, so a noisy, shared machine slows them alike;
the median over rounds is what models/README.md quotes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .models import Student
from .train import WIDTHS, KDProjection, transfer_loss


@dataclass(frozen=True)
class Variant:
    name: str
    decomposed: bool
    routing: str = "segments"
    channels_last: bool = False
    arch: str = ""  # "" = the built-in 28-px ShuffleNetV2; else a lorkd.decompose architecture name
    threads: int = 0  # 0 = the bench's --threads


VARIANTS = {
    "plain": Variant("plain ShuffleNetV2 x1.0 (MTL, no factors)", False),
    "lorkd-mask": Variant("LoRKD, mask routing (before)", True, "mask"),
    "lorkd": Variant("LoRKD, task-sorted segments (after)", True, "segments"),
    "lorkd-cl": Variant("LoRKD, segments + channels_last", True, "segments", channels_last=True),
    "plain-cl": Variant("plain ShuffleNetV2 x1.0, channels_last", False, channels_last=True),
    "plain-2t": Variant("plain ShuffleNetV2 x1.0, 2 torch threads", False, threads=2),
    "lorkd-2t": Variant("LoRKD, segments, 2 torch threads", True, "segments", threads=2),
    "mbv3s": Variant("LoRKD MobileNetV3-small (generic decompose)", True, arch="mobilenet_v3_small"),
    "mbv3s-plain": Variant("plain MobileNetV3-small (generic, no factors)", False, arch="mobilenet_v3_small"),
}


def build_variant(v: Variant, num_classes: tuple[int, ...], width: str, image_size: int) -> nn.Module:
    if v.arch:
        from .decompose import build_student

        return build_student(v.arch, num_classes, image_size=image_size,
                             num_tasks=len(num_classes) if v.decomposed else 0)
    from .models import StudentConfig

    cfg = StudentConfig(num_classes=num_classes, lora_tasks=len(num_classes) if v.decomposed else 0,
                        **WIDTHS[width])
    return Student(cfg, routing=v.routing)


def make_step(model: nn.Module, num_classes: tuple[int, ...], batch: int, image_size: int, channels_last: bool,
              teacher_dim: int = 512, seed: int = 0) -> Callable[[], None]:
    """One closure = one training step on a fixed random mixed-task batch (data cost excluded on purpose:
    the loop indexes an in-memory tensor, which is negligible next to the step)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    t = torch.randint(0, len(num_classes), (batch,), generator=g)
    y = torch.stack([torch.randint(0, num_classes[int(k)], (), generator=g) for k in t])
    tf = torch.randn(batch, teacher_dim, generator=g)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    proj = KDProjection(teacher_dim, model_feature_dim(model))
    opt = torch.optim.SGD(list(model.parameters()) + list(proj.parameters()), lr=0.01, momentum=0.9, nesterov=True)
    model.train()

    def step() -> None:
        feats = model(x, t)
        ce = feats.new_zeros(())
        for k in range(len(num_classes)):
            sel = t == k
            if sel.any():
                ce = ce + F.cross_entropy(model.logits(feats[sel], k), y[sel], reduction="sum")
        loss = (ce + transfer_loss(feats, proj(tf), 4.0)) / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def model_feature_dim(model: nn.Module) -> int:
    return int(model.cfg.feature_dim) if hasattr(model, "cfg") else int(model.feature_dim)


def bench(names: list[str], rounds: int = 5, steps: int = 5, batch: int = 128, image_size: int = 28,
          width: str = "x1.0", threads: int = 1, num_classes: tuple[int, ...] = (2, 2, 5),
          log: Callable[[str], None] = print) -> dict[str, dict]:
    """Median images/s per variant over `rounds` interleaved rounds of `steps` steps (after one warm-up step)."""
    steps_fn = {}
    for n in names:
        torch.manual_seed(0)
        v = VARIANTS[n]
        m = build_variant(v, num_classes, width, image_size)
        steps_fn[n] = make_step(m, num_classes, batch, image_size, v.channels_last)
        steps_fn[n]()  # warm-up (allocator, oneDNN primitive caches)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names:
            torch.set_num_threads(VARIANTS[n].threads or threads)
            t0 = time.perf_counter()
            for _ in range(steps):
                steps_fn[n]()
            rates[n].append(steps * batch / (time.perf_counter() - t0))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {rates[n][-1]:.0f}" for n in names))
    return {n: {"name": VARIANTS[n].name, "median_img_s": statistics.median(v), "all": v} for n, v in rates.items()}


LOOP_VARIANTS = {
    "plain": {"mode": "mtl"},
    "lorkd-mask": {"mode": "lorkd", "routing": "mask"},
    "lorkd": {"mode": "lorkd", "routing": "segments"},
    "mbv3s": {"mode": "lorkd", "arch": "mobilenet_v3_small"},
}


def bench_loop(names: list[str], rounds: int = 3, batches: int = 15, data_dir=None, workdir=None,
               log: Callable[[str], None] = print) -> dict[str, dict]:
    """The real training loop (train_run: real MedMNIST data, sampling, flips, transfer loss with stand-in teacher
    features, the per-epoch val evaluation), one short epoch per variant per round, interleaved. Reports the
    training images/s and the epoch's images/s including evaluation."""
    import tempfile
    from pathlib import Path

    from .data import DEFAULT_TASKS, MultiTaskDataset, load_tasks
    from .train import TrainConfig, train_run

    tasks = load_tasks(DEFAULT_TASKS, data_dir)
    work = Path(workdir or tempfile.mkdtemp(prefix="lorkd-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    n = len(MultiTaskDataset(tasks, "train"))
    tf = work / "teacher_features.pt"
    torch.save({"tasks": list(DEFAULT_TASKS), "features": torch.randn(n, 2, 512).half()}, tf)
    train: dict[str, list[float]] = {k: [] for k in names}
    epoch: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names:
            out = work / f"{k}-{r}"
            cfg = TrainConfig(**LOOP_VARIANTS[k], epochs=1, max_batches_per_epoch=batches,
                              teacher_features=str(tf), num_threads=1)
            train_run(cfg, tasks, out, progress=False)
            import json

            h = json.loads((out / "history.json").read_text())[0]
            train[k].append(h["images_per_second"])
            epoch[k].append(batches * cfg.batch_size / h["epoch_seconds"])
        log(f"loop round {r + 1}/{rounds}: " + ", ".join(f"{k} {train[k][-1]:.0f}" for k in names))
    return {k: {"train_img_s": statistics.median(train[k]), "with_eval_img_s": statistics.median(epoch[k]),
                "all": train[k]} for k in names}


def bench_infer(packages: list[str], rounds: int = 7, iters: int = 50, batches: tuple[int, ...] = (1, 32),
                threads: int = 1, log: Callable[[str], None] = print) -> dict[str, dict]:
    """onnxruntime CPU latency of each package's first expert (merged weights fed as in the service's shared
    session), packages interleaved per round; medians in milliseconds per call."""
    from pathlib import Path

    import numpy as np
    import onnxruntime as ort

    from .package import expert_feeds, load_package

    sessions = {}
    for p in packages:
        manifest = load_package(Path(p))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(Path(p) / manifest["model"]["file"]), so, providers=["CPUExecutionProvider"])
        feeds = expert_feeds(Path(p), manifest, manifest["tasks"][0]["id"])
        h, w = manifest["input"]["height"], manifest["input"]["width"]
        sessions[p] = (sess, feeds, h, w)
    res: dict[str, dict[int, list[float]]] = {p: {b: [] for b in batches} for p in packages}
    for r in range(rounds):
        for p, (sess, feeds, h, w) in sessions.items():
            for b in batches:
                x = np.random.default_rng(r).standard_normal((b, 3, h, w)).astype(np.float32)
                sess.run(["logits"], {"input": x, **feeds})
                t0 = time.perf_counter()
                for _ in range(iters):
                    sess.run(["logits"], {"input": x, **feeds})
                res[p][b].append((time.perf_counter() - t0) / iters * 1000)
        log(f"infer round {r + 1}/{rounds}")
    return {p: {f"batch{b}_ms": statistics.median(v) for b, v in d.items()} for p, d in res.items()}
