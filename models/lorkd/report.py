"""The results report: evaluate every run's val-selected checkpoint on the official test split, write the
table into models/README.md (between the `results` markers), a training-curve PNG and confusion matrices."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from .data import TASKS, load_tasks  # noqa: E402
from .metrics import evaluate  # noqa: E402
from .models import DeployStudent, Teacher, count_params_macs  # noqa: E402
from .train import TrainConfig, build_model, load_trained  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"
LABELS = {
    "teacher": "Teacher ResNet-18 (multi-task)",
    "stl": "STL (one ShuffleNetV2 per task)",
    "mtl": "MTL (shared ShuffleNetV2, per-task heads)",
    "lorkd_nokd": "LoRKD w/o transfer loss",
    "lorkd": "**LoRKD** (shipped)",
}
ORDER = ("teacher", "stl", "mtl", "lorkd_nokd", "lorkd")


def _run_summary(run: Path) -> dict:
    s = run / "summary.json"
    return json.loads(s.read_text()) if s.exists() else {}


def parity_lines(p: dict) -> list[str]:
    """The parity report (`lorkd-train parity --out`) as a markdown table and the task-switch line."""
    lines = ["| task | images | max abs logit error | argmax agreement | base network (W0) max error |",
             "| --- | --- | --- | --- | --- |"]
    for tid, r in p["tasks"].items():
        lines.append(f"| {tid} | {r['n']} | {r['max_abs_err']:.2e} | {r['argmax_agreement']:.4f} | "
                     f"{r['base_max_abs_err']:.2e} |")
    lines += ["", f"Task switch `W_b = W_a - dW_a + dW_b` vs direct merge, max abs error over all task pairs and "
              f"layers: {p['switch_max_abs_err']:.2e}.", ""]
    mixed = p.get("eks", {}).get("mixed")
    if mixed:
        lines += [f"Mixed-task graph (`student_eks.onnx`), the {mixed['n']:,} test images with tasks shuffled into "
                  f"batches of {mixed['batch_size']}: max abs logit error {mixed['max_abs_err']:.2e}, argmax "
                  f"agreement {mixed['argmax_agreement']:.4f}.", ""]
    return lines


def write_results_section(readme: Path, section: str) -> None:
    """Replace the text between the results markers of `readme` (created, or the markers appended, if missing)."""
    text = readme.read_text() if readme.exists() else f"# lorkd toolkit\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    pre, rest = text.split(START, 1)
    post = rest.split(END, 1)[1] if END in rest else ""
    readme.write_text(pre + START + "\n" + section + END + post)


def parity_section(path: Path, heading: str) -> list[str]:
    """`heading` and the parity table of a parity report file; nothing when the file is absent."""
    if not path.exists():
        return []
    return [heading, ""] + parity_lines(json.loads(path.read_text()))


def evaluate_runs(runs: Path, data_dir: Path | None) -> dict:
    """{run name: {"test": {task: metrics}, "val": ..., "best_epoch": .., "wall_seconds": ..}}."""
    torch.set_num_threads(1)
    out: dict = {}
    for name in ORDER:
        if name == "stl":
            members = sorted(p for p in (runs / "stl").glob("*") if (p / "best.pt").exists()) if (
                runs / "stl").exists() else []
            if not members:
                continue
            rec = {"test": {}, "val": {}, "best_epoch": {}, "wall_seconds": 0.0}
            for m in members:
                tasks = load_tasks([m.name], data_dir)
                model = load_trained(m, tasks)
                rec["test"].update(evaluate(model, tasks, "test"))
                rec["val"].update(evaluate(model, tasks, "val"))
                s = _run_summary(m)
                rec["best_epoch"][m.name] = s.get("best_epoch")
                rec["wall_seconds"] += s.get("wall_seconds", 0.0)
            out[name] = rec
            continue
        run = runs / name
        if not (run / "best.pt").exists():
            continue
        cfg = json.loads((run / "config.json").read_text())
        tasks = load_tasks(cfg["tasks"], data_dir)
        model = load_trained(run, tasks)
        s = _run_summary(run)
        out[name] = {"test": evaluate(model, tasks, "test"), "val": evaluate(model, tasks, "val"),
                     "best_epoch": s.get("best_epoch"), "wall_seconds": s.get("wall_seconds")}
    return out


def model_costs(runs: Path, data_dir: Path | None = None) -> dict:
    """Parameters and MACs of one deployed expert (backbone + a 2-class head) per method."""
    costs = {}
    cfg = TrainConfig.from_dict(json.loads((runs / "lorkd" / "config.json").read_text())) if (
        runs / "lorkd" / "config.json").exists() else TrainConfig()
    student = build_model(cfg.with_overrides(["mode=mtl"]), load_tasks(cfg.tasks, data_dir))
    deploy = DeployStudent(student.cfg).eval()
    p, macs = count_params_macs(deploy.net)
    f = student.cfg.feature_dim
    costs["student"] = {"params": p + 2 * f + 2, "macs": macs + 2 * f}
    teacher = Teacher((2,), cfg.teacher_arch, cfg.teacher_stem_stride).eval()
    tp, tmacs = count_params_macs(teacher)
    costs["teacher"] = {"params": tp + 2 * teacher.feature_dim + 2, "macs": tmacs + 2 * teacher.feature_dim}
    return costs


def curves_png(runs: Path, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for name in ORDER:
        hist_files = [runs / name / "history.json"] if name != "stl" else sorted((runs / "stl").glob("*/history.json"))
        for hf in hist_files:
            if not hf.exists():
                continue
            h = json.loads(hf.read_text())
            label = name if name != "stl" else f"stl/{hf.parent.name}"
            ep = [r["epoch"] for r in h]
            axes[0].plot(ep, [r["train_ce"] for r in h], label=label)
            axes[1].plot(ep, [r["val_score"] for r in h], label=label)
    axes[0].set_title("train CE (class-weighted)")
    axes[1].set_title("val score: mean over tasks of (ACC+AUC)/2")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_curves_png(runs: list[Path], path: Path) -> None:
    """`history_curves_png` of runs from their history.json, each labelled by its folder name."""
    history_curves_png({Path(run).name: json.loads((Path(run) / "history.json").read_text()) for run in runs}, path)


def history_curves_png(histories: dict[str, list[dict]], path: Path) -> None:
    """Curves per labelled training history: train loss (CE and transfer), val score, val ACC per task and
    training throughput per epoch."""
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), dpi=80)
    for name, h in histories.items():
        ep = [r["epoch"] for r in h]
        axes[0].plot(ep, [r["train_ce"] for r in h], label=f"{name} CE")
        if any(r["train_kd"] for r in h):
            axes[0].plot(ep, [r["train_kd"] for r in h], "--", label=f"{name} transfer")
        axes[1].plot(ep, [r["val_score"] for r in h], label=name)
        for t in h[0]["val"]:
            axes[2].plot(ep, [r["val"][t]["acc"] for r in h], label=f"{name} {t}")
        axes[3].plot(ep, [r.get("images_per_second", float("nan")) for r in h], label=name)
    titles = ("train loss", "val score: mean (ACC+AUC)/2", "val ACC per task", "training images/s")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def confusion_png(test: dict, title: str, path: Path) -> None:
    fig, axes = plt.subplots(1, len(test), figsize=(3.2 * len(test), 3.2), dpi=80)
    for ax, (tid, m) in zip(np.atleast_1d(axes), test.items(), strict=True):
        cm = np.array(m["confusion"])
        ax.imshow(cm, cmap="Blues")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_title(f"{tid} (ACC {m['acc']:.3f})", fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(range(cm.shape[1]))
        ax.set_yticks(range(cm.shape[0]))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def render(ev: dict, costs: dict, runs: Path, package: Path | None) -> str:
    tasks = list(next(iter(ev.values()))["test"].keys()) if ev else []
    head = "| method | " + " | ".join(f"{t} ACC | {t} AUC" for t in tasks) + " | mean ACC | mean AUC |"
    sep = "| --- " * (2 * len(tasks) + 3) + "|"
    rows = [head, sep]
    for name in ORDER:
        if name not in ev:
            continue
        test = ev[name]["test"]
        cells = []
        for t in tasks:
            cells += [f"{test[t]['acc']:.3f}", f"{test[t]['auc']:.3f}"] if t in test else ["–", "–"]
        accs = [test[t]["acc"] for t in tasks if t in test]
        aucs = [test[t]["auc"] for t in tasks if t in test]
        rows.append(f"| {LABELS[name]} | " + " | ".join(cells) + f" | {np.mean(accs):.3f} | {np.mean(aucs):.3f} |")
    ref = [TASKS[t].reference_acc for t in tasks]
    cells = []
    for r in ref:
        cells += [f"{r:.3f}", "–"]
    rows.append("| MedMNIST v2 ResNet-18 (28), published | " + " | ".join(cells) + f" | {np.mean(ref):.3f} | – |")
    lines = ["### Test accuracy (official test split; checkpoint chosen on val)", "", *rows, ""]

    lines += ["Validation scores of the selected checkpoints (best epoch):", ""]
    for name in ORDER:
        if name in ev:
            v = ev[name]["val"]
            vs = ", ".join(f"{t} {m['acc']:.3f}/{m['auc']:.3f}" for t, m in v.items())
            lines.append(f"- {name}: val ACC/AUC {vs}; best epoch {ev[name]['best_epoch']}")
    lines.append("")

    lines += ["### Cost per deployed expert", "", "| model | parameters | MACs per 28x28 image |",
              "| --- | --- | --- |"]
    s, t = costs["student"], costs["teacher"]
    lines.append(f"| LoRKD / MTL / STL expert (ShuffleNetV2 x1.0, 28 px, 2-class head) | {s['params']:,} | "
                 f"{s['macs'] / 1e6:.1f} M |")
    lines.append(f"| Teacher (ResNet-18, 2-class head) | {t['params']:,} | {t['macs'] / 1e6:.1f} M |")
    lines.append("")
    if package and Path(package).exists():
        pkg = Path(package)
        experts = sorted((pkg / "experts").glob("*.safetensors"))
        lines.append(f"Package `{pkg.as_posix()}`: {_dir_size(pkg) / 1e6:.2f} MB in all; `student.onnx` "
                     f"{(pkg / 'student.onnx').stat().st_size / 1e6:.2f} MB; per expert file "
                     + ", ".join(f"{e.stem} {e.stat().st_size / 1e3:.0f} kB" for e in experts)
                     + " (factors + head). Storing one full student per task instead would cost "
                     f"{(pkg / 'student.onnx').stat().st_size / 1e6:.2f} MB per task.")
        lines.append("")

    timings = runs / "timings.json"
    lines += ["### Wall times (this 2-core CPU, shared with other jobs; one torch thread per run)", "",
              "| run | seconds (training + per-epoch val) |", "| --- | --- |"]
    for name in ORDER:
        if name in ev:
            lines.append(f"| {name} | {ev[name]['wall_seconds']:.0f} |")
    if timings.exists():
        tm = json.loads(timings.read_text())
        if "features" in tm:
            lines.append(f"| teacher features (train images + flips) | {tm['features']:.0f} |")
        for k in ("report", "package"):
            if k in tm:
                lines.append(f"| {k} stage | {tm[k]:.0f} |")
    wall = runs / "wall.json"
    if wall.exists():
        w = json.loads(wall.read_text())
        lines.append(f"| everything above, two lanes in parallel (wall clock) | {w['training_wall_seconds']:.0f} |")
        if w.get("note"):
            lines += ["", w["note"]]
    lines.append("")
    lines += parity_section(runs / "parity.json",
                            "### Parity of the shipped package (full test split, onnxruntime CPU vs PyTorch EKS)")
    lines += ["![training curves](figures/training_curves.png)", "",
              "![LoRKD confusion matrices](figures/confusion_lorkd.png)", ""]
    for name in ORDER:
        if name != "lorkd" and name in ev:
            lines.append(f"Confusion matrices for {name}: `figures/confusion_{name}.png`.")
    lines.append("")
    return "\n".join(lines)


def write_report(runs: Path, readme: Path, figures: Path, data_dir: Path | None = None,
                 package: str | Path | None = None) -> dict:
    runs, figures = Path(runs), Path(figures)
    figures.mkdir(parents=True, exist_ok=True)
    ev = evaluate_runs(runs, data_dir)
    if not ev:
        raise SystemExit(f"no finished runs under {runs}")
    (runs / "evaluation.json").write_text(json.dumps({"runs": ev}, indent=1))
    costs = model_costs(runs, data_dir)
    curves_png(runs, figures / "training_curves.png")
    for name, rec in ev.items():
        confusion_png(rec["test"], f"{name}: test confusion matrices", figures / f"confusion_{name}.png")
    section = render(ev, costs, runs, Path(package) if package else None)
    write_results_section(Path(readme), section)
    print(section)
    return ev
