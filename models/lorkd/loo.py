"""Leave-one-out tables of the add-task experiment (models/reproduce-add-task.sh): `python -m lorkd.loo RUNS`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

TASKS = ("breast", "pneumonia", "retina")
SHIPPED = Path(__file__).resolve().parents[1] / "medmnist-lorkd" / "manifest.json"


def _read(path: Path) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def task_metrics(manifest: dict, task: str) -> dict:
    return next((t["metrics"] for t in manifest.get("tasks", []) if t["id"] == task), {})


def fmt(m: dict) -> str:
    return f"{m['test_acc']:.3f} / {m['test_auc']:.3f}" if m else "–"


def _s(v: float | None) -> str:
    return f"{v:.0f}" if v else "–"


def draws(cfg: dict, n_train: int) -> int:
    """Images drawn by a run: epochs x (epoch_draws or the training set size), in whole batches."""
    per = cfg.get("epoch_draws") or n_train
    steps = -(-per // cfg["batch_size"])
    return cfg["epochs"] * steps * cfg["batch_size"]


def table(runs: Path) -> str:
    runs = Path(runs)
    times = _read(runs / "times.json")
    solo = _read(runs / "timing" / "times.json")
    joint = _read(runs / "pkg-all" / "manifest.json")
    shipped = _read(SHIPPED)
    stl = shipped.get("provenance", {}).get("evaluation", {}).get("stl", {})
    acc = [
        "| held-out task T | LoRKD joint 3-task, retrained here | **add-task** (2-task package + T) | add-task - joint "
        "| STL (shipped) | LoRKD joint 3-task (shipped package) | the 2-task package's other experts |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    cost = [
        "| held-out task T | 2-task joint run, s | add-task, s (training only) | add-task / 3-task joint retrain "
        "| images drawn: add-task / 3-task joint | bytes added: expert + golden |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    deltas = []
    joint_cfg = _read(runs / "joint-all" / "config.json")
    joint_draws = draws(joint_cfg, 6334) if joint_cfg else 0  # 546 + 4,708 + 1,080 training images
    joint_solo = solo.get("joint-all")
    for t in TASKS:
        rec = _read(runs / f"add-{t}.json")
        add = {k: rec["metrics"][k] for k in ("test_acc", "test_auc")} if rec else {}
        j = task_metrics(joint, t)
        d = ""
        if add and j:
            deltas.append((add["test_acc"] - j["test_acc"], add["test_auc"] - j["test_auc"]))
            d = f"{100 * deltas[-1][0]:+.1f} / {100 * deltas[-1][1]:+.1f} pts"
        minus = _read(runs / f"pkg-minus-{t}" / "manifest.json")
        others = ", ".join(f"{o} {fmt(task_metrics(minus, o))}" for o in TASKS if o != t)
        acc.append(f"| {t} | {fmt(j)} | {fmt(add)} | {d} | {fmt(stl.get(t, {}))} | {fmt(task_metrics(shipped, t))} "
                   f"| {others} |")
        srec = _read(runs / "timing" / f"add-{t}.json")
        add_solo = solo.get(f"add-{t}")
        ratio = f"{add_solo / joint_solo:.2f}" if add_solo and joint_solo else "–"
        train_s = _s(srec["run"]["train_seconds"]) if srec else "–"
        b = rec.get("bytes_added", {}) if rec else {}
        n_add = draws(rec["config"], 0) if rec else 0
        cost.append(f"| {t} | {_s(times.get('joint-minus-' + t))} | {_s(add_solo)} ({train_s}) | {ratio} "
                    f"| {n_add:,} / {joint_draws:,} | {b.get('expert', 0):,} + {b.get('golden', 0):,} |")
    out = "\n".join(acc) + "\n"
    if deltas:
        da = sum(d[0] for d in deltas) / len(deltas)
        du = sum(d[1] for d in deltas) / len(deltas)
        out += (f"\nMean add-task minus joint expert over {len(deltas)} held-out tasks: ACC {100 * da:+.1f} points, "
                f"AUC {100 * du:+.1f} points.\n")
    out += "\n" + "\n".join(cost) + "\n"
    if joint_solo:
        out += (f"\n3-task joint LoRKD retrain, same recipe, same machine and lane conditions as the add-task "
                f"times: {joint_solo:.0f} s (in the two-lane run: {_s(times.get('joint-all'))} s).\n")
    return out


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "models/runs/loo")), end="")
