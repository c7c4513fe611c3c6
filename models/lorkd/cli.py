"""Command line: `lorkd-train <command>`; see `lorkd-train -h` and models/README.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .data import DEFAULT_TASKS, load_config_tasks


def _load_cfg(args):
    from .train import TrainConfig

    cfg = TrainConfig()
    if getattr(args, "config", None):
        d = json.loads(Path(args.config).read_text())
        if "common" in d:  # a pipeline config: common block + the block of this mode
            mode = args.mode or d["common"].get("mode", "lorkd")
            d = {**d["common"], **d.get(mode, {}), "mode": mode}
        cfg = TrainConfig.from_dict(d)
    if getattr(args, "mode", None):
        cfg = cfg.with_overrides([f"mode={args.mode}"])
    return cfg.with_overrides(args.set or [])


def cmd_train(args) -> int:
    from .dist import device_for_rank, init_from_env
    from .train import train_run

    cfg = _load_cfg(args)
    if init_from_env():  # under torchrun: DDP, NCCL on GPUs, gloo on CPUs
        cfg = cfg.with_overrides([f"device={device_for_rank(cfg.device)}"])
    tasks = load_config_tasks(cfg, args.data_dir)
    out = Path(args.out)
    if cfg.mode == "stl":
        for td in tasks:
            train_run(cfg, [td], out / td.spec.id, progress=not args.no_progress)
    else:
        train_run(cfg, tasks, out, progress=not args.no_progress)
    return 0


def cmd_teacher_features(args) -> int:
    from .train import load_trained, teacher_features

    torch.set_num_threads(args.threads)
    if args.teacher_run and args.tasks:  # that teacher's features for a subset (or other set) of tasks
        from .add_task import load_teacher_run
        from .data import load_tasks

        tasks = load_tasks(args.tasks, args.data_dir)
        teacher_features(load_teacher_run(Path(args.teacher_run)), tasks, Path(args.out))
    elif args.teacher_run:  # the multi-task teacher trained by this toolkit (the default)
        cfg = json.loads((Path(args.teacher_run) / "config.json").read_text())
        tasks = load_config_tasks(cfg, args.data_dir)
        teacher = load_trained(Path(args.teacher_run), tasks)
        teacher_features(teacher, tasks, Path(args.out))
    else:  # your own foundation model: torchvision/timm by name, weights from a local file
        from .teacher import IMAGENET_MEAN, IMAGENET_STD, external_teacher_features, load_teacher

        if not (args.arch and args.checkpoint and args.config):
            raise SystemExit("teacher-features: give --teacher-run, or --arch, --checkpoint and --config")
        tasks = load_config_tasks(_load_cfg(args), args.data_dir)
        teacher = load_teacher(args.arch, args.checkpoint)
        external_teacher_features(teacher, tasks, Path(args.out), args.image_size,
                                  tuple(args.mean or IMAGENET_MEAN), tuple(args.std or IMAGENET_STD))
    print(f"wrote {args.out}")
    return 0


def cmd_export(args) -> int:
    from .pipeline import export_from_run

    manifest = export_from_run(Path(args.run), Path(args.out), args.data_dir, metrics_file=args.metrics,
                               checkpoint_out=Path(args.checkpoint_out) if args.checkpoint_out else None,
                               name=args.name or Path(args.out).name, description=args.description)
    affine = sum(1 for L in manifest["layers"] if L.get("role"))
    extra = f" and {affine // 2} per-task BatchNorms (scale and shift layers)" if affine else ""
    print(f"wrote {args.out}: {len(manifest['tasks'])} experts, {len(manifest['layers']) - affine} decomposed "
          f"layers{extra}")
    return 0


def cmd_parity(args) -> int:
    from .parity import package_parity
    from .train import load_trained

    torch.set_num_threads(args.threads)
    cfg = json.loads((Path(args.run) / "config.json").read_text())
    tasks = load_config_tasks(cfg, args.data_dir)
    student = load_trained(Path(args.run), tasks, args.checkpoint)
    res = package_parity(Path(args.package), student, tasks, args.split, progress=True)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    ok = res["max_abs_err"] <= 1e-4 and res["argmax_agreement"] == 1.0 and res["switch_max_abs_err"] <= 1e-5
    if "eks" in res:  # the mixed-task graph, tasks alone and shuffled together
        ok = ok and res["eks"]["max_abs_err"] <= 1e-4 and res["eks"]["argmax_agreement"] == 1.0
    print("PARITY OK" if ok else "PARITY FAILED")
    return 0 if ok else 1


def cmd_add_task(args) -> int:
    from .add_task import add_task

    if args.source and args.source_file:
        raise SystemExit("add-task: give --source or --source-file, not both")
    source = json.loads(Path(args.source_file).read_text() if args.source_file else args.source or "null")
    torch.set_num_threads(args.threads)
    rec = add_task(Path(args.package), args.task, Path(args.run or f"models/runs/add-task/{args.task}"),
                   source=source, checkpoint=Path(args.checkpoint) if args.checkpoint else None,
                   data_dir=args.data_dir, teacher_run=Path(args.teacher_run) if args.teacher_run else None,
                   teacher_features_file=Path(args.teacher_features) if args.teacher_features else None,
                   overrides=args.set, golden_per_task=args.golden, replace=args.replace,
                   progress=not args.no_progress)
    m, par = rec["metrics"], rec["parity"]
    print(f"added {args.task} to {args.package}: test ACC {m['test_acc']:.3f} AUC {m['test_auc']:.3f}, "
          f"parity max {par['max_abs_err']:.2e}, expert file {rec['bytes_added']['expert']} bytes, "
          f"{rec['run']['total_seconds']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(rec, indent=1))
    return 0


def cmd_export_merged(args) -> int:
    from .package import merged_expert_onnx

    merged_expert_onnx(Path(args.package), args.task, Path(args.out))
    print(f"wrote {args.out}")
    return 0


def cmd_export_eks(args) -> int:
    from .eks_graph import export_eks

    entry = export_eks(Path(args.package), rank=args.rank)
    print(f"wrote {args.package}/{entry['file']}: rank {entry['rank']}, bank_width {entry['bank_width']}, "
          f"{len(entry['segments'])} segments")
    return 0


def cmd_bench_eks(args) -> int:
    from .bench_eks import bench_eks

    res = bench_eks(Path(args.package), experts=args.experts, batches=args.batch, threads=args.threads,
                    rounds=args.rounds, variants=args.variants, opt_levels=args.opt_level)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


def cmd_verify(args) -> int:
    from .package import load_package

    manifest = load_package(Path(args.package))
    print(f"{args.package}: format {manifest['format_version']}, {len(manifest['files'])} files verified")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    write_report(Path(args.runs), Path(args.readme), Path(args.figures), args.data_dir, args.package)
    return 0


def cmd_pipeline(args) -> int:
    from .pipeline import run_pipeline

    run_pipeline(Path(args.config), Path(args.runs), Path(args.package), args.data_dir,
                 only=args.only, progress=not args.no_progress)
    return 0


def cmd_seeds(args) -> int:
    """Multi-seed experiments (lorkd.seeds): teacher | train | select | adopt | report | package | parity | compare
    | cv | budget (teacher and train take --fold K to train on a cross-validation fold, --budget F to train on a
    schedule F times as long)."""
    from . import seeds as S

    spec = S.load_spec(Path(args.config))
    runs = Path(args.runs)
    if args.budget is not None and args.stage in ("teacher", "train"):
        spec, runs = S.prepare_budget(spec, runs, Path(args.records) if args.records else None, args.budget)
    if args.fold is not None and args.stage in ("teacher", "train"):
        spec, runs = S.prepare_fold(spec, runs, Path(args.records) if args.records else None, args.folds, args.fold)
    if args.stage == "teacher":
        if args.seeds and len(args.seeds) > 1:
            raise SystemExit("seeds teacher: one --seeds value (one teacher per runs folder)")
        S.train_teacher(spec, runs, args.data_dir, progress=not args.no_progress,
                        seed=args.seeds[0] if args.seeds else 0)
    elif args.stage == "train":
        for seed in args.seeds or spec["seeds"]:
            for name in args.names or ["selected", "lorkd_nokd", "mtl", "stl"]:
                print(f"=== {name} seed {seed}", flush=True)
                S.train_name(spec, runs, name, seed, args.data_dir, progress=not args.no_progress)
    elif args.stage == "select":
        print(json.dumps(S.select_variant(spec, runs), indent=1))
    elif args.stage == "adopt":
        print(json.dumps(S.select_recipe(spec, runs, Path(args.records) if args.records else None,
                                         one_teacher=args.one_teacher), indent=1))
    elif args.stage == "report":
        S.write_seeds_report(spec, runs, Path(args.readme), Path(args.figures), Path(args.package), args.data_dir,
                             resamples=args.resamples, records=Path(args.records) if args.records else None)
    elif args.stage == "package":
        print(json.dumps(S.package_selected(spec, runs, Path(args.package), args.data_dir), indent=1))
    elif args.stage == "parity":
        return 0 if S.parity_selected(runs, Path(args.package), args.data_dir) else 1
    elif args.stage == "compare":
        if len(args.names or []) != 2:
            raise SystemExit("compare: --names A B (A minus B, both trained in --runs on every --seeds)")
        res = S.compare_runs(runs, args.names[0], args.names[1], args.seeds or spec["seeds"], args.data_dir,
                             resamples=args.resamples, records=Path(args.records) if args.records else None)
        _write_result(res, args.out)
    elif args.stage == "budget":
        if args.budget is None or not args.names:
            raise SystemExit("budget: --budget F --names RECIPE [BASELINE ...], each trained with `train --budget F` "
                             "on every --seeds")
        res = S.budget_compare(runs, Path(args.records) if args.records else None, args.budget, args.names,
                               args.seeds or spec["seeds"], args.data_dir, resamples=args.resamples)
        (runs / "seeds").mkdir(parents=True, exist_ok=True)
        (runs / "seeds" / "budget.json").write_text(json.dumps(res, indent=1) + "\n")
        _write_result(res, args.out)
    elif args.stage == "cv" and args.results:
        if args.names:
            raise SystemExit("cv: --results FILE... (stored results) or --names BASE PROBE... (computed), not both")
        # results written earlier by `cv --out`: one is taken as it is, several (one comparison at other seeds) are
        # pooled, and the pooled result decides; either way nothing is recomputed, so no fold run need be here
        results = [json.loads(Path(f).read_text()) for f in args.results]
        res = results[0] if len(results) == 1 else S.cv_pool(results)
        _write_result(res, args.out)
        print(f"decision: {res['decision']} ({S.cv_sentence(res)})")
        if args.adopt:
            _adopt_cv(runs, args, res)
    elif args.stage == "cv":
        if len(args.names or []) < 2:
            raise SystemExit("cv: --names BASE PROBE [PROBE ...] (the current recipe first), each trained with "
                             "`train --fold K` on every fold")
        seed = (args.seeds or [0])[0]
        res = S.cv_compare(runs, args.names, args.folds, seed, args.data_dir, resamples=args.resamples)
        _write_result(res, args.out)
        if args.adopt:
            _adopt_cv(runs, args, res)
    return 0


def _adopt_cv(runs: Path, args: argparse.Namespace, res: dict) -> None:
    """`seeds cv --adopt`: record a cross-validated decision and say whether it changed the recipe."""
    from . import seeds as S

    rec = S.adopt_cv(runs, Path(args.records) if args.records else None, res)
    if rec["recipe_cv"]["scores"] == res["scores"]:
        print(f"recipe: {rec['recipe']} ({S.cv_sentence(rec['recipe_cv'])})")
    else:
        print(f"recipe: {rec['recipe']}, kept; the selection file keeps the cross-validation that chose it")


def _write_result(res: dict, out: str | None) -> None:
    text = json.dumps(res, indent=1)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)


def cmd_plot(args) -> int:
    from .report import run_curves_png

    out = Path(args.out or Path(args.run[0]) / "curves.png")
    run_curves_png([Path(r) for r in args.run], out)
    print(f"wrote {out}")
    return 0


def cmd_bench_infer(args) -> int:
    from .bench import bench_infer

    res = bench_infer(args.package, rounds=args.rounds, threads=args.threads)
    for p, v in res.items():
        print(f"{p}: " + ", ".join(f"{k} {ms:.2f} ms" for k, ms in v.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


def cmd_synthetic_data(args) -> int:
    from .synthetic import write_synthetic

    print(f"wrote {write_synthetic(Path(args.out), args.size, args.arch)}")
    return 0


def cmd_bench_train(args) -> int:
    from .bench import bench, bench_loop

    if args.loop:
        res = bench_loop(args.variants, rounds=args.rounds, batches=args.steps, data_dir=args.data_dir)
        for k, v in res.items():
            print(f"{k:12s} train {v['train_img_s']:7.1f} img/s, with val evaluation {v['with_eval_img_s']:7.1f} "
                  f"(medians of {len(v['all'])})")
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
        return 0

    res = bench(args.variants, rounds=args.rounds, steps=args.steps, batch=args.batch_size,
                image_size=args.image_size, threads=args.threads)
    for k, v in res.items():
        print(f"{k:12s} {v['median_img_s']:7.1f} img/s (median of {len(v['all'])})  {v['name']}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lorkd-train", description=__doc__)
    p.add_argument("--data-dir", default=None, help="MedMNIST npz folder (default ../shared/data/medmnist)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("train", help="train one model: teacher | lorkd | lorkd_nokd | mtl | stl")
    s.add_argument("--mode", choices=["teacher", "lorkd", "lorkd_nokd", "mtl", "stl"])
    s.add_argument("--config", help="JSON file with TrainConfig keys")
    s.add_argument("--set", nargs="*", help="override config keys: key=value")
    s.add_argument("--out", required=True, help="run folder (resumes from its last.pt)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("teacher-features", help="precompute pooled teacher features (image and its flip)")
    s.add_argument("--teacher-run", help="a teacher trained by `train --mode teacher`")
    s.add_argument("--tasks", nargs="+", help="with --teacher-run: these MedMNIST tasks instead of the teacher's own "
                                              "(e.g. the students of a leave-one-out run)")
    s.add_argument("--arch", help="or your own teacher: torchvision:<name> | timm:<name> (e.g. torchvision:resnet50)")
    s.add_argument("--checkpoint", help="its local weights file (state dict; nothing is downloaded)")
    s.add_argument("--config", help="the student's config (tasks, data sources, image size)")
    s.add_argument("--set", nargs="*", help="override config keys: key=value")
    s.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    s.add_argument("--image-size", type=int, default=224, help="the teacher's input size")
    s.add_argument("--mean", type=float, nargs=3, help="the teacher's normalisation (default ImageNet)")
    s.add_argument("--std", type=float, nargs=3)
    s.add_argument("--out", required=True)
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(func=cmd_teacher_features)

    s = sub.add_parser("export", help="export a trained LoRKD run as a servable package (FORMAT.md)")
    s.add_argument("--run", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--metrics", help="evaluation JSON to copy test metrics and provenance from")
    s.add_argument("--checkpoint-out", help="also copy the PyTorch checkpoint here (for parity tests in CI)")
    s.add_argument("--name", help="package name (default: the --out folder name)")
    s.add_argument("--description", help="package description (default: from the run's config)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("parity", help="ORT package vs PyTorch EKS on a full split, and the switch rule")
    s.add_argument("--run", required=True)
    s.add_argument("--package", required=True)
    s.add_argument("--checkpoint", default="best.pt")
    s.add_argument("--split", default="test")
    s.add_argument("--out")
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(func=cmd_parity)

    s = sub.add_parser("add-task", help="train one new task's factors and head against a package's frozen "
                                       "student and add its expert (the other experts' files stay untouched)")
    s.add_argument("--package", required=True, help="the package to add the expert to (changed in place)")
    s.add_argument("--task", required=True, help="new task id (URL segment and file stem)")
    s.add_argument("--source", help='its data source as JSON, e.g. \'{"type": "folder", "path": "/data/skin", '
                                    '"channels": 3}\' (none: the MedMNIST npz of that id in --data-dir)')
    s.add_argument("--source-file", help="or that JSON in a file")
    s.add_argument("--checkpoint", help="the package's PyTorch student (best.pt with config.json beside it; "
                                        "default: provenance.pytorch_checkpoint of the manifest)")
    s.add_argument("--teacher-run", help="teacher trained by `train --mode teacher`: transfer loss on")
    s.add_argument("--teacher-features", help="or precomputed teacher features of this one task "
                                              "(`teacher-features`): transfer loss on")
    s.add_argument("--set", nargs="*", help="override training keys (default: the base student's config with "
                                            "optimizer=adamw lr=0.002 batch_size=64 epochs=5 epoch_draws=2048)")
    s.add_argument("--run", help="training run folder, resumable (default models/runs/add-task/<task>)")
    s.add_argument("--golden", type=int, default=4, help="golden test images for the new task")
    s.add_argument("--replace", action="store_true", help="retrain a task that is already in the package")
    s.add_argument("--out", help="write the task's provenance record (metrics, parity, times) here as JSON")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_add_task)

    s = sub.add_parser("export-merged", help="one task as a standalone plain ONNX (W_t and head baked in)")
    s.add_argument("--package", required=True)
    s.add_argument("--task", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_export_merged)

    s = sub.add_parser("export-eks", help="add the mixed-task graph student_eks.onnx (+ manifest.model.eks) to a "
                                         "package (idempotent)")
    s.add_argument("--package", required=True)
    s.add_argument("--rank", type=int, help="bank rank (default: the package's lora.rank)")
    s.set_defaults(func=cmd_export_eks)

    s = sub.add_parser("bench-eks", help="onnxruntime CPU throughput: merged expert vs mixed-task EKS graph, "
                                        "interleaved rounds, medians")
    s.add_argument("--package", required=True)
    s.add_argument("--experts", type=int, default=1000, help="random experts in the bank")
    s.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    s.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    s.add_argument("--rounds", type=int, default=15)
    s.add_argument("--variants", nargs="+", default=None, help="graph variants of lorkd.eks_graph.VARIANTS "
                   "(default: naive stem interleave fused-all final)")
    s.add_argument("--opt-level", nargs="+", default=["all"], help="ORT graph optimisation levels: all, extended")
    s.add_argument("--out", help="write the JSON result here")
    s.set_defaults(func=cmd_bench_eks)

    s = sub.add_parser("verify", help="validate a package's manifest and checksums")
    s.add_argument("--package", required=True)
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("report", help="evaluate all runs on the test split; write the README table and figures")
    s.add_argument("--runs", default="models/runs")
    s.add_argument("--readme", default="models/README.md")
    s.add_argument("--figures", default="models/figures")
    s.add_argument("--package", default="models/medmnist-lorkd")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("pipeline", help="teacher -> features -> LoRKD + baselines -> report -> package (resumable)")
    s.add_argument("--config", default="models/configs/medmnist.json")
    s.add_argument("--runs", default="models/runs")
    s.add_argument("--package", default="models/medmnist-lorkd")
    s.add_argument("--only", nargs="*", help="run only these stages")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_pipeline)

    s = sub.add_parser("seeds", help="multi-seed experiments: teacher | train | select | adopt | report | package | "
                                     "parity | compare | cv | budget (resumable; models/reproduce.sh runs them in "
                                     "order)")
    s.add_argument("stage", choices=["teacher", "train", "select", "adopt", "report", "package", "parity", "compare",
                                     "cv", "budget"])
    s.add_argument("--config", default="models/configs/medmnist-seeds.json")
    s.add_argument("--runs", default="models/runs")
    s.add_argument("--names", nargs="*", help="train: config block names (selected = the variant chosen on val, "
                                              "probe_<key> = a probe on top of it; "
                                              "default: selected lorkd_nokd mtl stl); compare: A B; cv: the "
                                              "current recipe, then the probes; budget: the recipe, then the "
                                              "baselines")
    s.add_argument("--seeds", nargs="*", type=int, help="train, compare: seeds (default: the config's seeds); cv: "
                                                         "the seed of the fold runs (default 0); teacher: the "
                                                         "teacher's seed (default 0)")
    s.add_argument("--readme", default="models/README.md")
    s.add_argument("--figures", default="models/figures")
    s.add_argument("--package", default="models/medmnist-lorkd")
    s.add_argument("--resamples", type=int, default=10_000)
    s.add_argument("--records", default="models/results/seeds",
                   help="report: committed folder that keeps what was measured of every run (and reports the runs "
                        "that are not on this machine from it); '' = none")
    s.add_argument("--out", help="compare, cv, budget: also write the result (JSON) here")
    s.add_argument("--adopt", action="store_true", help="cv: record the decision in the selection file (the recipe "
                                                        "becomes the decision)")
    s.add_argument("--one-teacher", action="store_true",
                   help="adopt: only runs of --runs (one teacher) compete; the base is the current recipe retrained "
                        "there, and only probes built on it are tried")
    s.add_argument("--results", nargs="*", help="cv: instead of computing a comparison, take the one written earlier "
                                                "by `cv --out` (several: the same comparison at different seeds, "
                                                "pooled; the pooled result decides)")
    s.add_argument("--folds", type=int, default=5, help="cross-validation on train+val: number of folds")
    s.add_argument("--fold", type=int, help="teacher, train: train in R/cv/fold<K> (that fold is val, the others "
                                            "train; test untouched) instead of on the official split")
    s.add_argument("--budget", type=int, help="teacher, train: train in R/budget<F>x with every epoch count F "
                                              "times the config's (its own teacher); budget: compare it with R")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_seeds)

    s = sub.add_parser("plot", help="training curves of runs (loss, val, img/s) from their history.json")
    s.add_argument("--run", nargs="+", required=True)
    s.add_argument("--out", help="PNG path (default <first run>/curves.png)")
    s.set_defaults(func=cmd_plot)

    s = sub.add_parser("bench-infer", help="onnxruntime CPU latency of packages side by side (batch 1 and 32)")
    s.add_argument("--package", nargs="+", required=True)
    s.add_argument("--rounds", type=int, default=7)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out")
    s.set_defaults(func=cmd_bench_infer)

    s = sub.add_parser("synthetic-data", help="tiny synthetic folder-of-images dataset + its training config")
    s.add_argument("--out", required=True)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--arch", default="shufflenet_v2_x0_5")
    s.set_defaults(func=cmd_synthetic_data)

    s = sub.add_parser("bench-train", help="training throughput, variants interleaved, medians (README figures)")
    s.add_argument("--variants", nargs="+", default=["plain", "lorkd-mask", "lorkd"])
    s.add_argument("--rounds", type=int, default=7)
    s.add_argument("--steps", type=int, default=5)
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--image-size", type=int, default=28)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--loop", action="store_true",
                   help="time the real training loop (real data, val evaluation) instead of bare steps; "
                        "--steps = batches per epoch")
    s.add_argument("--out", help="write the JSON result here")
    s.set_defaults(func=cmd_bench_train)

    args = p.parse_args(argv)
    if args.data_dir:
        args.data_dir = Path(args.data_dir)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["main", "DEFAULT_TASKS"]
