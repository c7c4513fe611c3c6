"""DDP on gloo: two local processes follow the same trajectory as one process on the same data order."""

from __future__ import annotations

import json

import pytest
import torch

from lorkd.dist import spawn_gloo
from lorkd.train import TrainConfig, build_model, seed_everything, train_run


def _params(path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, map_location="cpu", weights_only=False)["model"]
    # BatchNorm running statistics are rank 0's under DDP (broadcast_buffers), so only trained weights compare
    return {k: v for k, v in sd.items() if "running_" not in k and "num_batches" not in k}


@pytest.mark.parametrize("micro", [2, 4])  # 4: two chunks per rank, the first under no_sync (accumulation)
def test_two_gloo_processes_match_a_single_process(tmp_path, tasks, micro):
    cfg = TrainConfig(mode="lorkd_nokd", width="tiny", epochs=2, batch_size=8, max_batches_per_epoch=3, lr=0.05,
                      num_threads=1, micro_batches=micro)
    seed_everything(cfg.seed)
    init = build_model(cfg, tasks).state_dict()
    train_run(cfg, tasks, tmp_path / "single", progress=False)
    spawn_gloo(2, cfg, tasks, tmp_path / "ddp", tmp_path / "rendezvous")
    single, ddp = _params(tmp_path / "single" / "last.pt"), _params(tmp_path / "ddp" / "last.pt")
    assert single.keys() == ddp.keys()
    diff = max(float((single[k] - ddp[k]).abs().max()) for k in single)
    moved = max(float((single[k] - init[k]).abs().max()) for k in single)
    assert moved > 1e-3  # training really changed the weights, so agreement means something
    print(f"gloo 2 processes vs 1 process: max |parameter difference| {diff:.2e}")
    assert diff <= 1e-5, diff

    hs = json.loads((tmp_path / "single" / "history.json").read_text())
    hd = json.loads((tmp_path / "ddp" / "history.json").read_text())
    assert [h["world_size"] for h in hd] == [2, 2] and [h["world_size"] for h in hs] == [1, 1]
    for a, b in zip(hs, hd, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-5
