"""The reproducible pipeline: teacher -> teacher features -> LoRKD, ablation, MTL, STL -> report -> package."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from .data import load_config_tasks
from .export import export_package
from .metrics import evaluate
from .package import sha256_file
from .train import TrainConfig, load_trained, teacher_features, train_run


def save_checkpoint_copy(run: Path, dest: Path) -> dict:
    """Copy a run's selected checkpoint (weights + config only) next to the package, for parity checks in CI."""
    dest.mkdir(parents=True, exist_ok=True)
    ck = torch.load(Path(run) / "best.pt", map_location="cpu", weights_only=False)
    torch.save({k: ck[k] for k in ("model", "epoch", "config", "tasks")}, dest / "best.pt")
    shutil.copyfile(Path(run) / "config.json", dest / "config.json")
    for p in dest.iterdir():
        p.chmod(0o644)
    return {"path": dest.as_posix(), "sha256": sha256_file(dest / "best.pt")}


DEFAULT_DESCRIPTION = (
    "LoRKD experts (ShuffleNetV2 x1.0 at 28 px, rank-4 EKS convs) for BreastMNIST, PneumoniaMNIST and "
    "RetinaMNIST, decomposed from a ResNet-18 teacher trained on the three tasks."
)


def export_from_run(run: Path, out: Path, data_dir: Path | None = None, metrics_file: Path | None = None,
                    extra_provenance: dict | None = None, checkpoint_out: Path | None = None,
                    name: str = "medmnist-lorkd", description: str | None = None,
                    readme_notes: str | None = None) -> dict:
    """Export the best checkpoint of a LoRKD run; test metrics are measured here (or read from metrics_file).

    With `checkpoint_out`, the PyTorch checkpoint is copied there and its sha256 recorded in the provenance.
    """
    cfg = json.loads((Path(run) / "config.json").read_text())
    tasks = load_config_tasks(cfg, data_dir)
    student = load_trained(Path(run), tasks)
    if description is None:
        description = describe(cfg, tasks)
    if metrics_file:
        metrics = json.loads(Path(metrics_file).read_text())
    else:
        test = evaluate(student, tasks, "test")
        metrics = {k: {"test_acc": v["acc"], "test_auc": v["auc"]} for k, v in test.items()}
    best = torch.load(Path(run) / "best.pt", map_location="cpu", weights_only=False)
    summary_path = Path(run) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    prov = {"config": cfg, "run": {"best_epoch": best.get("epoch"), **summary}, **(extra_provenance or {})}
    if checkpoint_out:
        prov["pytorch_checkpoint"] = save_checkpoint_copy(Path(run), Path(checkpoint_out))
    manifest = export_package(
        student, tasks, Path(out), name=name, description=description,
        metrics=metrics, provenance=prov,
        readme=_package_readme(cfg, metrics, best.get("epoch"), name, readme_notes),
    )
    for p in Path(out).rglob("*"):
        if p.is_file():
            p.chmod(0o644)
    return manifest


def describe(cfg: dict, tasks) -> str:
    """Package description from the run's config (the shipped run's wording for the default configuration)."""
    if not cfg.get("arch") and list(cfg["tasks"]) == ["breast", "pneumonia", "retina"] and not cfg.get("task_sources"):
        return DEFAULT_DESCRIPTION
    arch = cfg.get("arch") or "shufflenet_v2_x1_0"
    names = ", ".join(td.spec.name for td in tasks)
    return (f"LoRKD experts ({arch} at {cfg.get('image_size', 28)} px, rank-{cfg['rank']} EKS layers) for: {names}.")


def _package_readme(cfg: dict, metrics: dict, epoch, name: str = "medmnist-lorkd", notes: str | None = None) -> str:
    lines = [
        f"# {name}",
        "",
        "Servable lorkd package (format: `models/FORMAT.md`, version 1), written by `lorkd-train export`.",
        f"Student `{cfg.get('arch') or 'shufflenet_v2_x1_0 (28 px)'}`, mode `{cfg['mode']}`, {cfg['epochs']} epochs, "
        f"best val checkpoint: epoch {epoch}.",
        "",
        "| task | test ACC | test AUC |",
        "| --- | --- | --- |",
    ]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v.get('test_acc', float('nan')):.3f} | {v.get('test_auc', float('nan')):.3f} |")
    if notes:
        lines += ["", notes]
    lines += ["", "See `models/README.md` for how it was made, baselines and parity figures.", ""]
    return "\n".join(lines)


def _claim(run: Path) -> bool:
    """Atomically claim a run folder for this process (stale claims of dead processes are taken over)."""
    run.mkdir(parents=True, exist_ok=True)
    claim = run / ".claim"
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            try:
                pid = int(claim.read_text() or "0")
                os.kill(pid, 0)
                return False  # held by a live process
            except (ValueError, ProcessLookupError, FileNotFoundError):
                claim.unlink(missing_ok=True)
            except PermissionError:
                return False
    return False


STAGES = ("teacher", "features", "lorkd", "lorkd_nokd", "mtl", "stl", "report", "package")


def run_pipeline(config: Path, runs: Path, package: Path, data_dir: Path | None = None,
                 only: list[str] | None = None, progress: bool = True) -> None:
    """Run (or resume) every stage. The config JSON has a `common` TrainConfig block and one block per run."""
    spec = json.loads(Path(config).read_text())
    common = spec.get("common", {})
    runs = Path(runs)
    runs.mkdir(parents=True, exist_ok=True)
    timings_path = runs / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    feats = runs / "teacher_features.pt"

    def cfg_for(name: str, **extra) -> TrainConfig:
        d = {**common, **spec.get(name, {}), **extra}
        return TrainConfig.from_dict(d)

    def stage(name: str, fn) -> None:
        if only and name not in only:
            return
        t0 = time.time()
        print(f"=== stage {name}", flush=True)
        fn()
        dt = time.time() - t0
        # two pipeline processes may share the runs folder (reproduce.sh lanes): merge with the file's latest
        latest = json.loads(timings_path.read_text()) if timings_path.exists() else {}
        latest[name] = latest.get(name, 0.0) + dt if name not in ("report", "package") else dt
        timings_path.write_text(json.dumps(latest, indent=1))
        timings.update(latest)
        print(f"=== stage {name} took {dt:.0f}s", flush=True)

    def done(run: Path, cfg: TrainConfig) -> bool:
        s = run / "summary.json"
        return s.exists() and json.loads(s.read_text()).get("epochs") == cfg.epochs

    def train(name: str, mode: str, **extra):
        cfg = cfg_for(name, mode=mode, **extra)
        tasks = load_config_tasks(cfg, data_dir)
        if mode == "stl":
            # same budget per task as the multi-task runs: member t draws its task's share of an epoch
            sizes = torch.tensor([float(len(td.labels["train"])) for td in tasks])
            shares = sizes.pow(cfg.task_power) / sizes.pow(cfg.task_power).sum()
            # two pipeline lanes may both reach STL: each member is claimed by one live process
            for td, share in zip(tasks, shares.tolist(), strict=True):
                member = runs / name / td.spec.id
                mcfg = TrainConfig.from_dict({**cfg.to_dict(), "epoch_draws": round(share * float(sizes.sum()))})
                if not done(member, mcfg) and _claim(member):
                    try:
                        train_run(mcfg, [td], member, progress)
                    finally:
                        (member / ".claim").unlink(missing_ok=True)
        elif not done(runs / name, cfg):
            train_run(cfg, tasks, runs / name, progress)

    def features():
        if feats.exists():
            return
        cfg = cfg_for("teacher", mode="teacher")
        torch.set_num_threads(cfg.num_threads)
        tasks = load_config_tasks(cfg, data_dir)
        teacher_features(load_trained(runs / "teacher", tasks), tasks, feats, progress=progress)

    def report():
        from .report import write_report

        write_report(runs, Path("models/README.md"), Path("models/figures"), data_dir, package)

    def pack():
        metrics = None
        ev = runs / "evaluation.json"
        extra = {"wall_seconds": json.loads(timings_path.read_text()) if timings_path.exists() else {}}
        if ev.exists():
            e = json.loads(ev.read_text())
            metrics_path = runs / "lorkd_metrics.json"
            metrics_path.write_text(json.dumps(
                {k: {"test_acc": v["acc"], "test_auc": v["auc"]} for k, v in e["runs"]["lorkd"]["test"].items()}))
            metrics = metrics_path
            extra["evaluation"] = {name: {k: {"test_acc": v["acc"], "test_auc": v["auc"]}
                                          for k, v in r["test"].items()} for name, r in e["runs"].items()}
        export_from_run(runs / "lorkd", package, data_dir, metrics, extra,
                        checkpoint_out=Path("models/checkpoints") / Path(package).name)

    stage("teacher", lambda: train("teacher", "teacher"))
    stage("features", features)
    stage("lorkd", lambda: train("lorkd", "lorkd", teacher_features=str(feats)))
    stage("lorkd_nokd", lambda: train("lorkd_nokd", "lorkd_nokd"))
    stage("mtl", lambda: train("mtl", "mtl"))
    stage("stl", lambda: train("stl", "stl"))
    stage("report", report)
    stage("package", pack)
