"""Leave-one-out table of the add-task experiment (models/reproduce-add-task.sh): `python -m lorkd.loo RUNS`."""

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
    if not m:
        return "–"
    return f"{m['test_acc']:.3f} / {m['test_auc']:.3f}"


def table(runs: Path) -> str:
    runs = Path(runs)
    times = _read(runs / "times.json")
    joint = _read(runs / "pkg-all" / "manifest.json")
    shipped = _read(SHIPPED)
    stl = shipped.get("provenance", {}).get("evaluation", {}).get("stl", {})
    joint_wall = times.get("joint-all")
    rows = [
        "| held-out task T | joint 3-task expert (retrained here) | add-task expert | STL (shipped) "
        "| joint 3-task (shipped package) | other two experts of the 2-task package | 2-task joint run, s "
        "| add-task, s (training only) | add-task / 3-task joint wall | bytes added (expert + golden) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    deltas = []
    for t in TASKS:
        rec = _read(runs / f"add-{t}.json")
        minus = _read(runs / f"pkg-minus-{t}" / "manifest.json")
        add = {k: rec["metrics"][k] for k in ("test_acc", "test_auc")} if rec else {}
        j = task_metrics(joint, t)
        if add and j:
            deltas.append((add["test_acc"] - j["test_acc"], add["test_auc"] - j["test_auc"]))
        others = ", ".join(f"{o} {fmt(task_metrics(minus, o))}" for o in TASKS if o != t)
        add_wall = times.get(f"add-{t}")
        ratio = f"{add_wall / joint_wall:.2f}" if add_wall and joint_wall else "–"
        train_s = f"{rec['run']['train_seconds']:.0f}" if rec else "–"
        b = rec.get("bytes_added", {}) if rec else {}
        rows.append(
            f"| {t} | {fmt(j)} | {fmt(add)} | {fmt(stl.get(t, {}))} | {fmt(task_metrics(shipped, t))} | {others} "
            f"| {times.get('joint-minus-' + t, float('nan')):.0f} "
            f"| {add_wall or float('nan'):.0f} ({train_s}) | {ratio} "
            f"| {b.get('expert', 0):,} + {b.get('golden', 0):,} |"
        )
    out = "\n".join(rows) + "\n"
    if joint_wall:
        out += f"\n3-task joint LoRKD retrain (same recipe, this machine, same lanes): {joint_wall:.0f} s.\n"
    if deltas:
        da = sum(d[0] for d in deltas) / len(deltas)
        du = sum(d[1] for d in deltas) / len(deltas)
        out += (f"Mean add-task minus joint expert over {len(deltas)} held-out tasks: ACC {100 * da:+.1f} points, "
                f"AUC {100 * du:+.1f} points.\n")
    return out


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "models/runs/loo")), end="")
