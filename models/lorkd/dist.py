"""Distributed training on torch.distributed (DDP): NCCL on GPUs, gloo on CPUs.

Launch with torchrun, e.g. `torchrun --nproc_per_node=2 -m lorkd.cli train ...`: `init_from_env` reads the
variables torchrun sets. Each rank takes its chunks of every global batch (TrainConfig.micro_batches), so a
single process with micro_batches = world size follows the same trajectory (tests/test_distributed.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns whether one was joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def device_for_rank(device: str) -> str:
    """Under torchrun with CUDA, every rank uses its own GPU (LOCAL_RANK)."""
    if dist.is_initialized() and torch.cuda.is_available() and device in ("auto", "cuda"):
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def _gloo_worker(rank: int, world: int, init_file: str, cfg, tasks, out: str) -> None:
    from .train import train_run

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train_run(cfg, tasks, Path(out), progress=False)
    finally:
        dist.destroy_process_group()


def spawn_gloo(world: int, cfg, tasks, out: Path, init_file: Path) -> None:
    """Run `train_run` in `world` local gloo processes (CPU); used by the test and for a quick local check."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(world, str(init_file), cfg, tasks, str(out)), nprocs=world, join=True)
