"""Multi-seed experiments (issue 13, "accuracy you can trust"): several seeds of LoRKD, its transfer-loss variants,
LoRKD without transfer, MTL and STL at one budget; selection of the transfer variant on validation; Breast/Retina
probes; mean +- std tables, paired bootstrap intervals, spread figures; the shipped package from the chosen run.

Layout under a runs folder R: R/teacher (seed 0), R/teacher_features.pt (features + logits),
R/seeds/<name>/seed<k> (STL: R/seeds/stl/seed<k>/<task>), R/seeds/selection.json, R/seeds/evaluation.json, and
R/cv/fold<k> (one cross-validation fold on train+val: its own teacher and runs, in the same layout).
The runs folder is not committed; the report keeps what it measured of every run (metrics, test softmax outputs,
histories, BN probes) as records under a committed folder (models/results/seeds/runs/<name>/seed<k>.json) and
builds from those records every run that is not on this machine, so a fresh clone can rebuild the report.
The config is a pipeline config (`common` + one block per name) with extra keys: `variants` (the
transfer-loss variants selected among on seed 0's val score), `probes` ({name: overrides} trained on top of
the selected variant, for the Breast/Retina questions), `seeds`, `labels` (row names) and `baselines` (more
baseline blocks, e.g. MTL and STL with a probe's sampling, that get rows and bootstrap comparisons).
"""

from __future__ import annotations

import base64
import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .bootstrap import paired_bootstrap
from .data import TaskData, load_config_tasks, task_tensor
from .metrics import evaluate, predict, selection_score, task_metrics
from .package import sha256_file
from .train import MODES, TrainConfig, load_trained, teacher_features, train_run


def load_spec(config: Path) -> dict:
    return json.loads(Path(config).read_text())


def run_dir(runs: Path, name: str, seed: int) -> Path:
    return Path(runs) / "seeds" / name / f"seed{seed}"


def selected(runs: Path) -> str | None:
    p = Path(runs) / "seeds" / "selection.json"
    return json.loads(p.read_text())["selected"] if p.exists() else None


def recipe(selection: dict) -> str:
    """The shipped recipe of a selection record: the probe adopted on top of the variant, else the variant."""
    return selection.get("recipe") or selection["selected"]


def block(spec: dict, name: str, runs: Path) -> dict:
    """The config block of a run name; `selected` is the variant chosen on val, `probe_<key>` a probe on top of it."""
    if name == "selected":
        sel = selected(runs)
        if sel is None:
            raise SystemExit("no selection yet: run the `select` stage after seed 0 of the variants")
        return block(spec, sel, runs)
    if name.startswith("probe_"):
        key = name[len("probe_"):]
        base = selected(runs)
        if base is None:  # never guess the variant a probe is built on
            raise SystemExit(f"{name} is built on the selected variant, and {runs}/seeds has no selection.json: "
                             "run the `select` stage, or copy the committed models/results/seeds/selection.json")
        return {**block(spec, base, runs), **spec.get("probes", {})[key]}
    if name not in spec and name not in MODES:
        raise SystemExit(f"no config block {name!r}")
    return dict(spec.get(name, {}))


def run_config(spec: dict, name: str, seed: int, runs: Path) -> TrainConfig:
    d = {**spec.get("common", {}), **block(spec, name, runs), "seed": seed}
    d.setdefault("mode", name if name in MODES else "lorkd")
    if d["mode"] == "lorkd" and d.get("beta", 0) > 0:
        d["teacher_features"] = str(Path(runs) / "teacher_features.pt")
    return TrainConfig.from_dict(d)


def resolve(names: list[str], runs: Path) -> list[str]:
    return [selected(runs) if n == "selected" else n for n in names]


def _done(run: Path, cfg: TrainConfig) -> bool:
    s = run / "summary.json"
    return s.exists() and json.loads(s.read_text()).get("epochs") == cfg.epochs


def train_name(spec: dict, runs: Path, name: str, seed: int, data_dir: Path | None = None,
               progress: bool = False) -> None:
    """Train (or resume, or skip when finished) one name at one seed. STL: one member per task, each with its
    task's share of the multi-task draws (same budget per task as the multi-task runs)."""
    name = resolve([name], runs)[0]
    cfg = run_config(spec, name, seed, runs)
    tasks = load_config_tasks(cfg, data_dir)
    out = run_dir(runs, name, seed)
    if cfg.mode == "stl":
        sizes = torch.tensor([float(len(td.labels["train"])) for td in tasks])
        shares = sizes.pow(cfg.task_power) / sizes.pow(cfg.task_power).sum()
        for td, share in zip(tasks, shares.tolist(), strict=True):
            mcfg = TrainConfig.from_dict({**cfg.to_dict(), "epoch_draws": round(share * float(sizes.sum()))})
            if not _done(out / td.spec.id, mcfg):
                train_run(mcfg, [td], out / td.spec.id, progress)
    elif not _done(out, cfg):
        train_run(cfg, tasks, out, progress)


def train_teacher(spec: dict, runs: Path, data_dir: Path | None = None, progress: bool = False,
                  seed: int = 0) -> None:
    """Train (or resume, or skip when finished) the one teacher of a runs folder, with the given seed (0 unless a
    pass compares teachers: each teacher seed gets a runs folder of its own, since every student in a folder
    distils from its teacher)."""
    cfg = TrainConfig.from_dict({**spec.get("common", {}), **spec.get("teacher", {}), "mode": "teacher",
                                 "seed": seed})
    tasks = load_config_tasks(cfg, data_dir)
    if (Path(runs) / "teacher" / "config.json").exists() and (other := teacher_seed(runs)) != seed:
        raise SystemExit(f"{Path(runs) / 'teacher'} holds the teacher of seed {other}, not {seed}: one teacher per "
                         "runs folder (give this seed its own --runs)")
    if not _done(Path(runs) / "teacher", cfg):
        train_run(cfg, tasks, Path(runs) / "teacher", progress)
    feats = Path(runs) / "teacher_features.pt"
    if not feats.exists() or "logits" not in torch.load(feats, map_location="cpu"):
        torch.set_num_threads(cfg.num_threads)
        teacher_features(load_trained(Path(runs) / "teacher", tasks), tasks, feats, progress=progress)


def teacher_seed(runs: Path) -> int:
    """The seed of a runs folder's teacher (its record is teacher/seed<S>.json)."""
    return int(json.loads((Path(runs) / "teacher" / "config.json").read_text()).get("seed", 0))


def best_teacher(folders: list[Path]) -> Path:
    """The runs folder whose teacher has the best val score (the package's teacher is a choice made on val like
    any other; a tie keeps the earlier folder). A folder without a finished teacher is refused."""
    scores = {Path(f): _val_score(Path(f) / "teacher") for f in folders}
    if missing := [f.as_posix() for f, v in scores.items() if v is None]:
        raise SystemExit(f"no finished teacher in {', '.join(missing)}")
    return max(scores, key=scores.__getitem__)


def _val_score(run: Path) -> float | None:
    s = run / "summary.json"
    if s.exists():
        return json.loads(s.read_text())["best_val_score"]
    members = sorted(run.glob("*/summary.json"))
    return float(np.mean([json.loads(m.read_text())["best_val_score"] for m in members])) if members else None


def select_variant(spec: dict, runs: Path, seeds: tuple[int, ...] = (0,)) -> dict:
    """Choose the transfer variant with the best mean val score (seeds given; never test) and record it."""
    scores = {}
    for v in spec["variants"]:
        vals = [_val_score(run_dir(runs, v, s)) for s in seeds]
        if any(x is None for x in vals):
            raise SystemExit(f"variant {v} has no finished run for seeds {seeds}")
        scores[v] = float(np.mean(vals))
    sel = max(scores, key=scores.get)
    rec = {"selected": sel, "val_scores": scores, "seeds": list(seeds),
           "rule": "best mean over tasks of (val ACC + val AUC) / 2 at the val-selected epoch"}
    (Path(runs) / "seeds").mkdir(parents=True, exist_ok=True)
    (Path(runs) / "seeds" / "selection.json").write_text(json.dumps(rec, indent=1))
    return rec


def _probe_extends(spec: dict, p: str, q: str) -> bool:
    """Whether probe p is built on probe q: p sets every setting q sets, to the same value, and more."""
    a, b = spec.get("probes", {}).get(p[len("probe_"):]), spec.get("probes", {}).get(q[len("probe_"):])
    return a is not None and b is not None and b.items() < a.items()


def _recorded_val_score(records: Path | None, metrics_only: dict, name: str, seed: int) -> float | None:
    """A run's val score from its committed record, else from `metrics_only_records` (loaded once by the caller);
    a fresh clone has no runs folder."""
    if records is None:
        return None
    f = record_path(records, name, seed)
    if f.exists():
        return json.loads(f.read_text()).get("val_score")
    return metrics_only.get(name, {}).get(seed, {}).get("val_score")


def _se_of_difference(a: list[float], b: list[float]) -> float:
    n = len(a)
    return float(np.sqrt(np.var(a, ddof=1) / n + np.var(b, ddof=1) / n)) if n > 1 else 0.0


def select_recipe(spec: dict, runs: Path, records: Path | None = None, one_teacher: bool = False) -> dict:
    """Second choice on val (never test): keep the selected variant or adopt a probe on top of it. Only names trained
    on every one of the config's seeds compete (val scores from the runs folder, else from the committed records).
    Probes are tried best mean val score first; one is adopted only if it beats the variant, and every probe it is
    built on (a probe whose settings it contains), by more than the standard error of each difference
    (sqrt(s_a^2/n + s_b^2/n) over the seeds), since on 78 Breast and 120 Retina val images a smaller gain is seed
    noise; an added setting has to pay for itself. Recorded in the selection file, so that the report's main row
    and the package follow it.

    `one_teacher`: a runs folder holds one teacher, and the same recipe distilled from two teachers scored 0.8486
    and 0.8296 (models/README.md), more than any probe's gain; so only runs of this folder compete (records never),
    the base is the current recipe retrained here, and only probes built on it are tried, each against it and the
    probes it is built on that were trained here. The decision this replaces is kept as `recipe_previous`.

    A probe with per-task refinement (`refine_epochs`) never competes: its val score is, per task, the best of its
    refine epochs and of the checkpoint it started from, so it is never below that checkpoint's by construction,
    and val cannot judge it against runs scored once (`seeds compare NAME NAME@stage1` reports it)."""
    path = Path(runs) / "seeds" / "selection.json"
    kept = seeds_file(runs, records, "selection.json")  # a fresh clone: the committed copy
    if not kept.exists():
        raise SystemExit("no selection yet: run the `select` stage first")
    rec = json.loads(kept.read_text())
    seeds = spec["seeds"]
    vals: dict[str, list[float]] = {}
    metrics_only = metrics_only_records(records) if records is not None and not one_teacher else {}
    base = recipe(rec) if one_teacher else rec["selected"]
    refined = {f"probe_{k}" for k, o in spec.get("probes", {}).items() if o.get("refine_epochs")}
    for name in [rec["selected"]] + [f"probe_{k}" for k in spec.get("probes", {}) if f"probe_{k}" not in refined]:
        v = [_val_score(run_dir(runs, name, s)) for s in seeds]
        if not one_teacher:
            v = [x if x is not None else _recorded_val_score(records, metrics_only, name, s)
                 for x, s in zip(v, seeds, strict=True)]
        # one teacher: the base, and probes built on it (every probe is built on the variant)
        on_base = name == base or not base.startswith("probe_") or _probe_extends(spec, name, base)
        if all(x is not None for x in v) and (not one_teacher or on_base):
            vals[name] = v
    if base not in vals:
        raise SystemExit(f"{base} is not trained on every seed {seeds}" + (" in this runs folder" if one_teacher
                                                                            else ""))
    scores = {k: float(np.mean(v)) for k, v in vals.items()}
    probes = sorted((k for k in scores if k != base), key=scores.get, reverse=True)
    checks: dict[str, list[dict]] = {}
    adopted = base
    for p in probes:
        against = [base] + [q for q in probes if _probe_extends(spec, p, q)]
        checks[p] = [{"against": q, "gain": scores[p] - scores[q], "margin": _se_of_difference(vals[p], vals[q])}
                     for q in against]
        if all(c["gain"] > c["margin"] for c in checks[p]):
            adopted = p
            break
    for stale in ("recipe_best_probe", "recipe_gain", "recipe_margin", "recipe_unexportable"):  # older rules' fields
        rec.pop(stale, None)
    if one_teacher:
        # `recipe_previous` is the decision that made the current recipe. A one-teacher decision that kept its
        # base (a rerun, or a pass that adopted nothing) did not, so its own `recipe_previous` stays.
        last = rec.get("recipe_previous", {})
        if not (rec.get("recipe_one_teacher") and last.get("recipe") == rec.get("recipe")):
            rec["recipe_previous"] = {k: rec[k] for k in ("recipe", "recipe_val_scores", "recipe_seeds",
                                                          "recipe_checks", "recipe_rule", "recipe_one_teacher",
                                                          "recipe_cv") if k in rec}
    if rec.get("recipe_cv", {}).get("decision", adopted) != adopted:
        rec.pop("recipe_cv")  # a cross-validated decision about another recipe no longer describes this one
    rule = ("probes trained on every seed, best mean val score first: the first that beats the variant and every "
            "probe it is built on by more than the standard error of each difference is adopted; else the variant")
    if one_teacher:
        rule = ("one teacher (every run of one runs folder): probes built on the current recipe, trained on every "
                "seed, best mean val score first: the first that beats the current recipe and every probe it is "
                "built on by more than the standard error of each difference is adopted; else the current recipe")
    rec.update({"recipe": adopted, "recipe_val_scores": scores, "recipe_seeds": list(seeds), "recipe_checks": checks,
                "recipe_rule": rule, "recipe_one_teacher": one_teacher})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1))
    return rec


# ----------------------------------------------------------------------------------------- cross-validation


def cv_fold_runs(runs: Path, fold: int) -> Path:
    """R/cv/fold<k>: one fold's runs folder (its own teacher, trained on that fold's train part)."""
    return Path(runs) / "cv" / f"fold{fold}"


def _copy_selection(runs: Path, records: Path | None, out: Path) -> None:
    """Give a sub-experiment's runs folder the selection record of R (or the committed one), so that `selected`
    and `probe_<key>` names resolve to the same settings there; refuse once R selects another variant than the
    folder was built on."""
    sel = seeds_file(runs, records, "selection.json")
    target = out / "seeds" / "selection.json"
    if sel.exists() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(sel.read_text())
    elif sel.exists() and json.loads(sel.read_text())["selected"] != selected(out):
        # the folder's runs were built on the variant of its copy: resolving names on another would mix the two
        raise SystemExit(f"{out} was built on the variant {selected(out)}, and {sel} now selects "
                         f"{json.loads(sel.read_text())['selected']}: train the new variant in a new runs folder")


def prepare_fold(spec: dict, runs: Path, records: Path | None, folds: int, fold: int) -> tuple[dict, Path]:
    """The spec and runs folder of one cross-validation fold: every run of it (teacher included) trains on the
    other folds of train+val and selects its checkpoint on this one. The fold folder gets the selection record
    of R (or the committed one), so that `probe_<key>` names resolve to the same settings as on the official
    split."""
    if not 0 <= fold < folds:
        raise SystemExit(f"--fold {fold} outside 0..{folds - 1}")
    fold_spec = copy.deepcopy(spec)
    fold_spec["common"] = {**spec.get("common", {}), "cv_folds": folds, "cv_fold": fold}
    out = cv_fold_runs(runs, fold)
    _copy_selection(runs, records, out)
    return fold_spec, out


def budget_runs(runs: Path, factor: int) -> Path:
    """R/budget<F>x: the runs folder of the schedule F times as long (its own teacher)."""
    return Path(runs) / f"budget{factor}x"


def scale_epochs(spec: dict, factor: int) -> dict:
    """The spec with every epoch count (common, teacher and any block that sets one) multiplied by `factor`. The
    warm-up stays as long in steps: it exists to start SGD gently, not to fill a share of the schedule."""
    if factor < 1:
        raise SystemExit(f"--budget {factor}: the factor is a whole number >= 1")
    out = copy.deepcopy(spec)
    blocks = [out.get("common", {}), *(v for k, v in out.items() if k != "common" and isinstance(v, dict)),
              *out.get("probes", {}).values()]
    for b in blocks:
        if isinstance(b, dict) and "epochs" in b:
            b["epochs"] = int(b["epochs"]) * factor
    return out


def prepare_budget(spec: dict, runs: Path, records: Path | None, factor: int) -> tuple[dict, Path]:
    """The spec and runs folder of a longer schedule: every epoch count times `factor`, in R/budget<F>x with its
    own teacher (trained on the longer schedule too) and the selection record of R, so names mean the same
    settings as at the base budget apart from the schedule."""
    out = budget_runs(runs, factor)
    _copy_selection(runs, records, out)
    return scale_epochs(spec, factor), out


def cv_val_logits(run: Path, data_dir: Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{task: (pool indices, labels, logits)} of a fold run's best checkpoint on its own val fold."""
    cfg = json.loads((Path(run) / "config.json").read_text())
    if not cfg.get("cv_folds"):
        raise SystemExit(f"{run} was not trained on a cross-validation fold")
    tasks = load_config_tasks(cfg, data_dir)
    model = load_trained(Path(run), tasks)
    return {td.spec.id: (td.pool_index["val"], td.labels["val"], predict(model, td, t, "val"))
            for t, td in enumerate(tasks)}


def out_of_fold(fold_logits: list[dict]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Pool the folds' val outputs ({task: (pool indices, labels, logits)} per fold) into one output per image of
    train+val: (labels, logits) per task, in pool order. Every pool image must be val in exactly one fold."""
    labels, logits = {}, {}
    for t in fold_logits[0]:
        idx = np.concatenate([f[t][0] for f in fold_logits])
        if not np.array_equal(np.sort(idx), np.arange(len(idx))):
            raise ValueError(f"{t}: the folds' val parts do not partition train+val once each")
        order = np.argsort(idx)
        labels[t] = np.concatenate([f[t][1] for f in fold_logits])[order]
        logits[t] = np.concatenate([f[t][2] for f in fold_logits])[order]
    return labels, logits


def _oof_score(labels: dict[str, np.ndarray], logits: dict[str, np.ndarray]) -> tuple[float, dict]:
    metrics = {t: task_metrics(labels[t], logits[t]) for t in labels}
    return selection_score(metrics), {t: {k: m[k] for k in ("acc", "auc", "n")} for t, m in metrics.items()}


def cv_compare(runs: Path, names: list[str], folds: int, seed: int = 0, data_dir: Path | None = None,
               resamples: int = 10_000) -> dict:
    """Cross-validated choice on train+val (never test): the first name is the base (the current recipe), the others
    probes, each trained on every fold (R/cv/fold<k>, one teacher per fold). Every train+val image is judged once,
    by the run that did not train on it (out of fold; MedMNIST: 624 Breast, 5,232 Pneumonia and 1,200 Retina
    images, against 78, 524 and 120 on the official val split). Probes are tried best out-of-fold score first;
    one is adopted if its gain over the base exceeds both standard errors: the paired bootstrap's over the images,
    and that of the mean of the per-fold gains (each fold has its own teacher, so this one carries training
    noise). Test numbers (means over the fold runs, paired bootstrap) are reported, never used."""
    base, probes = names[0], names[1:]
    fold_runs = {n: [run_dir(cv_fold_runs(runs, k), n, seed) for k in range(folds)] for n in names}
    per_fold = {n: [cv_val_logits(r, data_dir) for r in rs] for n, rs in fold_runs.items()}
    pooled = {n: out_of_fold(f) for n, f in per_fold.items()}
    labels = pooled[base][0]
    scores, metrics = {}, {}
    for n in names:
        if any(not np.array_equal(pooled[n][0][t], labels[t]) for t in labels):
            raise ValueError(f"{n} was not cross-validated on the folds of {base}")
        scores[n], metrics[n] = _oof_score(*pooled[n])
    fold_scores = {n: [_oof_score({t: f[t][1] for t in f}, {t: f[t][2] for t in f})[0] for f in per_fold[n]]
                   for n in names}
    probs = {n: {t: _softmax(pooled[n][1][t])[None] for t in labels} for n in names}
    checks = {}  # best out-of-fold score first, the order the rule tries them in
    for p in sorted(probes, key=scores.get, reverse=True):
        boot = paired_bootstrap(labels, probs[p], probs[base], resamples=resamples, seed=13, score=True)
        fold_gains = [a - b for a, b in zip(fold_scores[p], fold_scores[base], strict=True)]
        se_folds = float(np.std(fold_gains, ddof=1) / np.sqrt(folds))
        gain = scores[p] - scores[base]
        checks[p] = {"gain": gain, "se_images": boot["mean"]["score"]["se"], "se_folds": se_folds,
                     "interval": [boot["mean"]["score"]["lo"], boot["mean"]["score"]["hi"]],
                     "fold_gains": fold_gains, "bootstrap": boot}
    adopted = cv_decision(base, scores, checks)
    test = {p: _test_pair({n: {k: eval_run(r, data_dir) for k, r in enumerate(fold_runs[n])} for n in (p, base)},
                          p, base, resamples) for p in probes}
    # the fold teachers' own test numbers: how far the teacher, at the same budget, is from the references
    teachers = [eval_run(cv_fold_runs(runs, k) / "teacher", data_dir) for k in range(folds)
                if (cv_fold_runs(runs, k) / "teacher" / "best.pt").exists()]
    teacher_test = {t: {m: float(np.mean([r["test"][t][m] for r in teachers])) for m in ("acc", "auc")}
                    for t in labels} if len(teachers) == folds else None
    return {"folds": folds, "seed": seed, "runs": str(runs), "base": base, "names": names,
            "pool": {t: int(len(y)) for t, y in labels.items()},
            "scores": scores, "metrics": metrics, "fold_scores": fold_scores, "checks": checks,
            "decision": adopted, "test": test, "teacher_test": teacher_test,
            "rule": CV_RULE}


def cv_decision(base: str, scores: dict[str, float], checks: dict[str, dict]) -> str:
    """The rule of a cross-validation, from its scores and per-probe checks (gain, se_images, se_folds): probes are
    tried best out-of-fold score first, and the first whose gain exceeds both standard errors is adopted; else the
    base. Shared by `cv_compare`, `cv_pool` and the test that re-reads the committed decisions."""
    for p in sorted(checks, key=scores.get, reverse=True):
        c = checks[p]
        if c["gain"] > max(c["se_images"], c["se_folds"]):
            return p
    return base


CV_RULE = ("cross-validation on train+val, one teacher per fold: probes on the current recipe, best out-of-fold "
           "score first; the first whose gain over the recipe exceeds both the images' bootstrap standard error and "
           "the standard error of the mean per-fold gain is adopted; else the current recipe")

CV_POOLED_RULE = (CV_RULE + "; pooled over seeds: the gain is the mean of the seeds' gains, the images' standard "
                  "error the mean of the seeds' (an upper bound of the mean's, the seeds sharing the images), the "
                  "folds' that of the per-fold gains averaged over the seeds")


def cv_seeds(cv: dict) -> list[int]:
    """The seeds of the fold runs a cross-validation result judged: one (`cv`) or several (`cv_pool`)."""
    return list(cv["seeds"]) if "seeds" in cv else [cv["seed"]]


def cv_seeds_text(cv: dict) -> str:
    """ "seed 0", or "seeds 0, 1 (pooled)" for a pooled result."""
    seeds = cv_seeds(cv)
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))} (pooled)"


def cv_pool(results: list[dict]) -> dict:
    """Pool cross-validation results of the same comparison (same folds, base, names and images) that differ only in
    the seed of the fold runs, so that a close call is judged on more than one training run per fold without
    keeping every seed's runs on one machine (each result keeps what the rule needs). Per name: the out-of-fold
    score and metrics are the means over the seeds. Per probe: the gain is the mean of the seeds' gains; the images'
    standard error is the mean of the seeds' (the seeds are judged on the same images, so their errors correlate;
    whatever the correlation, the standard deviation of a mean is at most the mean of the standard deviations); the
    folds' standard error is that of the per-fold gains averaged over the seeds (the fold stays the unit: its
    teacher is shared by the seeds when they ran on the same fold teachers, which `same_fold_teachers` records).
    The rule is the one of `cv_compare`. Test numbers stay per seed."""
    if len(results) < 2:
        raise ValueError("cv_pool: at least two results (one per seed)")
    first = results[0]
    if any("seeds" in r for r in results):
        raise ValueError("cv_pool: pool the seeds' own results, not a pooled one (every seed weighs the same)")
    seeds = [r["seed"] for r in results]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"cv_pool: a seed appears twice ({seeds})")
    for r in results[1:]:
        for k in ("folds", "base", "names", "pool"):
            if r[k] != first[k]:
                raise ValueError(f"cv_pool: the results differ in {k} ({first[k]} vs {r[k]}): not the same comparison")
    names, base, folds = first["names"], first["base"], first["folds"]
    tasks = list(first["pool"])

    def mean(xs: list[float]) -> float:
        return float(np.mean(xs))

    scores = {n: mean([r["scores"][n] for r in results]) for n in names}
    metrics = {n: {t: {"acc": mean([r["metrics"][n][t]["acc"] for r in results]),
                       "auc": mean([r["metrics"][n][t]["auc"] for r in results]),
                       "n": first["metrics"][n][t]["n"]} for t in tasks} for n in names}
    fold_scores = {n: [mean([r["fold_scores"][n][k] for r in results]) for k in range(folds)] for n in names}
    checks = {}
    for p in sorted(names[1:], key=scores.get, reverse=True):
        fold_gains = [a - b for a, b in zip(fold_scores[p], fold_scores[base], strict=True)]
        se_folds = float(np.std(fold_gains, ddof=1) / np.sqrt(folds))
        se_images = mean([r["checks"][p]["se_images"] for r in results])
        gain = scores[p] - scores[base]
        checks[p] = {"gain": gain, "se_images": se_images, "se_folds": se_folds, "fold_gains": fold_gains,
                     "seed_gains": [r["checks"][p]["gain"] for r in results]}
    adopted = cv_decision(base, scores, checks)
    return {"folds": folds, "seeds": seeds, "runs": [r["runs"] for r in results], "base": base, "names": names,
            "pool": first["pool"], "scores": scores, "metrics": metrics, "fold_scores": fold_scores,
            "checks": checks, "decision": adopted, "test": {str(r["seed"]): r["test"] for r in results},
            "teacher_test": first.get("teacher_test"),
            # whether every seed ran on the same five fold teachers (a machine that does not retrain them bitwise
            # gives other ones): with other teachers the per-fold gains average over teachers as well as seeds
            "same_fold_teachers": all(r.get("teacher_test") == first.get("teacher_test") for r in results),
            "rule": CV_POOLED_RULE}


def adopt_cv(runs: Path, records: Path | None, result: dict) -> dict:
    """Record a cross-validated decision in the selection file: the recipe becomes the decision, and the decision
    it replaces is kept as `recipe_previous`."""
    kept = seeds_file(runs, records, "selection.json")
    if not kept.exists():
        raise SystemExit("no selection yet: run the `select` stage first")
    rec = json.loads(kept.read_text())
    # the same comparison again (same base, same names): its decision is the recipe already, and history stays
    last = rec.get("recipe_cv", {})
    rerun = last.get("base") == result["base"] and set(last.get("scores", {})) == set(result["scores"])
    if recipe(rec) != result["base"] and not rerun:
        raise SystemExit(f"the cross-validation's base {result['base']} is not the current recipe {recipe(rec)}")
    if last and not rerun and result["decision"] == recipe(rec):
        # a new comparison that keeps the recipe changes nothing to record: the selection file keeps the
        # cross-validation that did decide (this one lives in `cv --out`), rather than losing it to this one
        return rec
    summary = {k: result[k] for k in ("folds", "seed", "seeds", "base", "pool", "scores", "metrics", "decision", "rule")
               if k in result}
    summary["checks"] = {p: {k: v for k, v in c.items() if k != "bootstrap"} for p, c in result["checks"].items()}
    if not rerun and result["decision"] != recipe(rec):
        # a new comparison that changes the recipe: every record of how the old one was chosen (an earlier
        # cross-validation that kept it included) goes into the history
        fields = ("recipe", "recipe_val_scores", "recipe_seeds", "recipe_checks", "recipe_rule", "recipe_one_teacher",
                  "recipe_cv", "recipe_previous")
        rec["recipe_previous"] = {k: rec.pop(k) for k in fields if k in rec}
    rec["recipe"] = result["decision"]
    rec["recipe_cv"] = summary
    path = Path(runs) / "seeds" / "selection.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1))
    return rec


def cv_rows(cv: dict) -> list[str]:
    """The report's table of a cross-validated decision: out-of-fold val metrics per name, gains and their errors."""
    tasks = list(cv["pool"])
    rows = ["| name | out-of-fold score | " + " | ".join(f"{t} ACC / AUC" for t in tasks)
            + " | gain over the recipe | standard error: images, folds | decision |", "| --- " * (5 + len(tasks)) + "|"]
    for name, score in cv["scores"].items():
        m = cv["metrics"][name]
        cells = [f"{100 * m[t]['acc']:.2f} / {100 * m[t]['auc']:.2f}" for t in tasks]
        c = cv["checks"].get(name)
        check = (f"{c['gain']:+.4f} | {c['se_images']:.4f}, {c['se_folds']:.4f}" if c else "– | –")
        verdict = "**adopted**" if name == cv["decision"] != cv["base"] else (
            "kept (the recipe)" if name == cv["base"] == cv["decision"] else
            "the recipe before" if name == cv["base"] else "not adopted")
        rows.append(f"| {name} | {score:.4f} | " + " | ".join(cells) + f" | {check} | {verdict} |")
    return rows


def cv_pool_text(cv: dict) -> str:
    """The out-of-fold images per task, e.g. "624 breast, 5,232 pneumonia, 1,200 retina"."""
    return ", ".join(f"{n:,} {t}" for t, n in cv["pool"].items())


def cv_sentence(cv: dict) -> str:
    """The cross-validated decision in one sentence for the report."""
    tried = "; ".join(
        f"{p} {c['gain']:+.4f} (standard errors: images {c['se_images']:.4f}, folds {c['se_folds']:.4f}) -> "
        f"{'adopted' if p == cv['decision'] else 'not adopted'}" for p, c in cv["checks"].items())
    return (f"cross-validated on train+val ({cv['folds']} folds, one teacher per fold, {cv_seeds_text(cv)}, every "
            f"image judged once out of fold: {cv_pool_text(cv)}): out-of-fold scores "
            + ", ".join(f"{k} {v:.4f}" for k, v in cv["scores"].items()) + f"; against {cv['base']}: {tried}")


def _base_record(runs: Path, records: Path | None, name: str, seed: int, data_dir: Path | None) -> dict:
    """One run at the base budget: evaluated from R/seeds when this machine has it, else its committed record."""
    run = Path(runs) / "teacher" if name == "teacher" else run_dir(runs, name, seed)
    if _finished(run):
        return eval_run(run, data_dir)
    rec = record_path(records, name, seed) if records is not None else None
    if rec is None or not rec.exists():
        raise SystemExit(f"{name} seed {seed}: neither a run in {runs} nor a record in {records}")
    return load_record(rec)


def budget_compare(runs: Path, records: Path | None, factor: int, names: list[str], seeds: list[int],
                   data_dir: Path | None = None, resamples: int = 10_000) -> dict:
    """The schedule `factor` times as long (R/budget<F>x, its own teacher) against the base budget, name by name.

    Val decides, as for a probe: the longer schedule of a name wins if its mean val score over the seeds beats the
    base's by more than the standard error of the difference. Each side has its own teacher, so the difference
    also carries teacher noise, which one teacher per side cannot measure; the report says so. Test numbers are
    reported: each side's means, the paired bootstrap of long minus base (the same test images), and, at the long
    budget, the first name (the recipe) minus every other name."""
    long_runs = budget_runs(runs, factor)
    missing = [f"{n} seed {s}" for n in names for s in seeds if not _finished(run_dir(long_runs, n, s))]
    if missing or not _finished(long_runs / "teacher"):
        raise SystemExit(f"not trained at x{factor} yet: {', '.join(missing) or 'the teacher'} (`seeds teacher|train "
                         f"--budget {factor}`)")
    recs = {n: {s: _base_record(runs, records, n, s, data_dir) for s in seeds} for n in names}
    long = {n: {s: eval_run(run_dir(long_runs, n, s), data_dir) for s in seeds} for n in names}
    per_name = {}
    for n in names:
        val = {"base": [float(r["val_score"]) for r in recs[n].values()],
               "long": [float(r["val_score"]) for r in long[n].values()]}
        gain = float(np.mean(val["long"]) - np.mean(val["base"]))
        margin = _se_of_difference(val["long"], val["base"])
        pair = _test_pair({"long": long[n], "base": recs[n]}, "long", "base", resamples)
        per_name[n] = {"val": {**val, "gain": gain, "margin": margin}, "longer_wins": gain > margin, **pair}
    teacher = {"base": _base_record(runs, records, "teacher", 0, data_dir),
               "long": eval_run(long_runs / "teacher", data_dir)}
    tasks = list(teacher["long"]["test"])
    base_name = names[0]
    against = {b: _test_pair(long, base_name, b, resamples) for b in names[1:]}
    return {"factor": factor, "seeds": list(seeds), "runs": str(long_runs), "names": names,
            "epochs": {n: [int(r["config"]["epochs"]) for r in long[n].values() if "config" in r] for n in names},
            "per_name": per_name,
            "teacher": {k: {"val_score": float(r["val_score"]), "best_epoch": r["best_epoch"],
                            "epochs": int(r["config"]["epochs"]) if "config" in r else None,
                            "test": {t: {m: float(r["test"][t][m]) for m in ("acc", "auc")} for t in tasks}}
                        for k, r in teacher.items()},
            "recipe_against": against, "rule": BUDGET_RULE}


BUDGET_RULE = ("a name's longer schedule wins if its mean val score over the seeds beats the base budget's by more "
               "than the standard error of the difference (sqrt(s_a^2/n + s_b^2/n)); each side has its own teacher")


def budget_rows(b: dict) -> list[str]:
    """The report's table of the longer schedule: val score and test means per name and budget."""
    tasks = list(b["teacher"]["long"]["test"])
    rows = ["| name | schedule | seeds | mean val score | " + " | ".join(f"test {t} ACC / AUC" for t in tasks)
            + " | test mean ACC / AUC | best epochs | val gain (standard error) |", "| --- " * (7 + len(tasks)) + "|"]

    def cells(test: dict) -> str:
        return " | ".join(f"{100 * test[t]['acc']:.2f} / {100 * test[t]['auc']:.2f}" for t in tasks + ["mean"])

    for n, c in b["per_name"].items():
        v = c["val"]
        for side in ("base", "long"):
            epochs = (f"{b['factor']}x" if side == "long" else "1x")
            gain = (f"{v['gain']:+.4f} ({v['margin']:.4f}) -> {'longer wins' if c['longer_wins'] else 'no gain'}"
                    if side == "long" else "–")
            best = "; ".join(_epochs_text(e) for e in c["best_epoch"][side])
            rows.append(f"| {n} | {epochs} | {len(v[side])} | {np.mean(v[side]):.4f} | {cells(c['test'][side])} | "
                        f"{best} | {gain} |")
    for side in ("base", "long"):
        t = b["teacher"][side]
        test = {**t["test"], "mean": {m: float(np.mean([t["test"][k][m] for k in tasks])) for m in ("acc", "auc")}}
        rows.append(f"| teacher (seed 0) | {b['factor'] if side == 'long' else 1}x ({t['epochs']} epochs) | 1 | "
                    f"{t['val_score']:.4f} | {cells(test)} | {_epochs_text(t['best_epoch'])} | – |")
    return rows


def _epochs_text(best: dict | int) -> str:
    """A run's best epoch: the number, or per member for STL ("breast 7, pneumonia 10, retina 5")."""
    if not isinstance(best, dict):
        return str(best)
    return str(next(iter(best.values()))) if len(best) == 1 else ", ".join(f"{k} {v}" for k, v in best.items())


def budget_boot_rows(b: dict) -> list[str]:
    """Paired bootstrap lines of the longer schedule: long minus base per name, then the recipe minus the others
    at the long budget (test, percentage points, 95 % interval)."""
    tasks = list(b["teacher"]["long"]["test"])

    def fmt(boot: dict) -> str:
        return " | ".join(f"{100 * d['diff']:+.2f} [{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"
                          for d in (boot[t][m] for t in tasks + ["mean"] for m in ("acc", "auc")))

    rows = ["| comparison | " + " | ".join(f"{t} ACC | {t} AUC" for t in tasks + ["mean"]) + " |",
            "| --- " * (3 + 2 * len(tasks)) + "|"]
    for n, c in b["per_name"].items():
        rows.append(f"| {n}: {b['factor']}x minus 1x | {fmt(c['bootstrap'])} |")
    for o, c in b["recipe_against"].items():
        rows.append(f"| {b['factor']}x: {b['names'][0]} minus {o} | {fmt(c['bootstrap'])} |")
    return rows


def budget_section(b: dict) -> list[str]:
    """The report's paragraph on the longer schedule: the table, the targets at that budget, the bootstrap."""
    recipe_name = b["names"][0]
    long_test = b["per_name"][recipe_name]["test"]["long"]
    hits = [f"{t} {m.upper()} {mu:.2f} vs {ref:.2f} ({'met' if mu >= ref else 'MISSED'})"
            for t, m, mu, ref in anchor_checks(long_test)]
    others = [f"{o} {100 * c['test'][o]['mean']['acc']:.2f}" for o, c in b["recipe_against"].items()]
    lines = [f"Longer schedule (`seeds budget`; every epoch count x{b['factor']} in `{Path(b['runs']).name}`, its "
             f"own teacher; seeds {b['seeds']}; {b['rule']}):", ""]
    lines += budget_rows(b)
    lines += ["", f"At x{b['factor']}, {recipe_name} against {TARGET_ANCHOR}: " + "; ".join(hits)
              + f". Mean test ACC over tasks: {recipe_name} {100 * long_test['mean']['acc']:.2f}, "
              + ", ".join(others) + ".", "",
              "Paired bootstrap (test, percentage points, 95 % interval; seeds averaged per resample):", ""]
    lines += budget_boot_rows(b)
    return lines


# ----------------------------------------------------------------------------------------------- evaluation


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits).float(), dim=1).numpy()


def eval_run(run: Path, data_dir: Path | None = None, cache: bool = True, which: str = "best.pt") -> dict:
    """Val and test metrics of a run's best checkpoint and its test softmax outputs (cached in the run folder).

    A run is a multi-task run folder or an STL seed folder of per-task members. `which` names another checkpoint
    of the run (stage1_best.pt: a refined run before its refinement; raw_best.pt: an averaged run's raw weights)."""
    run = Path(run)
    members = [run] if (run / which).exists() else sorted(p for p in run.iterdir() if (p / which).exists())
    if not members:
        raise FileNotFoundError(f"no finished run in {run}")
    cache_file = run / ("eval_cache.pt" if which == "best.pt" else f"eval_cache_{Path(which).stem}.pt")
    newest = max((m / which).stat().st_mtime for m in members)
    if cache and cache_file.exists() and cache_file.stat().st_mtime > newest:
        return torch.load(cache_file, weights_only=False)
    rec: dict = {"val": {}, "test": {}, "probs": {}, "best_epoch": {}, "wall_seconds": 0.0, "history": {}}
    for m in members:
        cfg = json.loads((m / "config.json").read_text())
        rec.setdefault("config", cfg)
        if cfg["mode"] == "stl":  # an STL member is trained on its own task (the folder name)
            cfg = {**cfg, "tasks": [m.name]}
        tasks = load_config_tasks(cfg, data_dir)
        model = load_trained(m, tasks, which)
        for t, td in enumerate(tasks):
            logits = predict(model, td, t, "test")
            # logit_std: spread of the answers over images (0 = the expert answers every image alike: collapsed)
            rec["test"][td.spec.id] = {**task_metrics(td.labels["test"], logits), "labels": td.labels["test"],
                                       "logit_std": float(logits.std(0).mean())}
            rec["probs"][td.spec.id] = _softmax(logits)
        rec["val"].update(evaluate(model, tasks, "val"))
        s = json.loads((m / "summary.json").read_text()) if (m / "summary.json").exists() else {}
        rec["best_epoch"][m.name] = s.get("raw_best_epoch" if which == "raw_best.pt" else "best_epoch")
        if which == "best.pt" and "refine_task_epochs" in s:
            rec["refine_task_epochs"] = s["refine_task_epochs"]
        rec["wall_seconds"] += s.get("wall_seconds") or 0.0
        h = m / "history.json"
        rec["history"][m.name] = json.loads(h.read_text()) if h.exists() else []
    rec["val_score"] = selection_score(rec["val"])
    if cache:
        torch.save(rec, cache_file)
    return rec


def _fresh_bn_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` in training mode whose BatchNorm running statistics restart as a cumulative average."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None
    return m.train()


@torch.no_grad()
def per_task_bn(model: nn.Module, td: TaskData, t: int, batch_size: int = 256) -> nn.Module:
    """A copy of `model` whose BatchNorm running statistics are re-estimated on task t's training images only
    (cumulative average over one pass, the task's own routing), i.e. what per-task BN statistics would give."""
    m = _fresh_bn_copy(model)
    x = task_tensor(td, "train")
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size]
        if len(xb) < 2:
            continue
        m(xb, torch.full((len(xb),), t, dtype=torch.long))
    return m.eval()


@torch.no_grad()
def mixed_bn(model: nn.Module, tasks: list[TaskData], task_power: float, seed: int = 0,
             batch_size: int = 128) -> nn.Module:
    """Control for `per_task_bn`: the same one-pass re-estimation on mixed-task batches drawn as in training
    (task share ~ n_t ** task_power, one epoch of draws, each sample through its own expert)."""
    from .data import MultiTaskDataset, task_balanced_weights

    m = _fresh_bn_copy(model)
    train = MultiTaskDataset(tasks, "train")
    g = torch.Generator().manual_seed(seed)
    order = torch.multinomial(task_balanced_weights(train.t, task_power), len(train), replacement=True, generator=g)
    for s in range(0, len(order) - 1, batch_size):
        idx = order[s:s + batch_size]
        m(train.x[idx], train.t[idx])
    return m.eval()


def bn_probe(run: Path, data_dir: Path | None = None, control: bool = False) -> dict:
    """Shared vs per-task BN statistics for every task of a multi-task run: {task: {split: {shared, per_task}}};
    with `control`, also the shared statistics re-estimated the same way on mixed batches (`mixed`)."""
    cfg = json.loads((Path(run) / "config.json").read_text())
    tasks = load_config_tasks(cfg, data_dir)
    model = load_trained(Path(run), tasks)
    mixed = mixed_bn(model, tasks, cfg["task_power"]) if control else None
    out = {}
    for t, td in enumerate(tasks):
        m2 = per_task_bn(model, td, t)
        out[td.spec.id] = {}
        for split in ("val", "test"):
            a = task_metrics(td.labels[split], predict(model, td, t, split))
            b = task_metrics(td.labels[split], predict(m2, td, t, split))
            out[td.spec.id][split] = {"shared": {"acc": a["acc"], "auc": a["auc"]},
                                      "per_task": {"acc": b["acc"], "auc": b["auc"]}}
            if mixed is not None:
                c = task_metrics(td.labels[split], predict(mixed, td, t, split))
                out[td.spec.id][split]["mixed"] = {"acc": c["acc"], "auc": c["auc"]}
    return out


# ----------------------------------------------------------------------------------------------- report

# Published anchors (test split, 28 px, %): MedMNIST+ ResNet-18 end to end (3 seeds, mean, std), the best 28-px
# model per task in MedMNIST+, and MedMNIST v2's ResNet-18 (28).
ANCHORS = {
    "MedMNIST+ ResNet-18 (28), 3 seeds": {"breast": (83.97, 1.81, 87.61, 1.16), "pneumonia": (83.12, 1.10, 95.01, 0.30),
                                          "retina": (52.33, 2.37, 70.41, 0.55)},
    "MedMNIST+ best 28-px model per task": {"breast": (86.54, None, 89.08, None),
                                            "pneumonia": (86.59, None, 97.29, None),
                                            "retina": (54.25, None, 75.35, None)},
    "MedMNIST v2 ResNet-18 (28)": {"breast": (86.3, None, 90.1, None), "pneumonia": (85.4, None, 94.4, None),
                                   "retina": (52.4, None, 71.7, None)},
}
TARGET_ANCHOR = "MedMNIST+ ResNet-18 (28), 3 seeds"
LABELS = {"lorkd": "LoRKD, teacher-side projection (a)", "lorkd_fitnets": "LoRKD, FitNets student-side projection (b)",
          "lorkd_logits": "LoRKD, teacher-head logit KD (c)", "lorkd_nokd": "LoRKD w/o transfer loss",
          "mtl": "MTL (shared ShuffleNetV2, per-task heads)", "stl": "STL (one ShuffleNetV2 per task)",
          "teacher": "Teacher ResNet-18 (multi-task)"}
SEEDS_FIGURE = "seeds_spread.png"
COLLAPSE_FIGURE = "kd_collapse.png"


def _label(name: str, spec: dict) -> str:
    return spec.get("labels", {}).get(name) or LABELS.get(name) or name


# the files of a runs folder's seeds/ that the records folder keeps a copy of (the report falls back to them)
KEPT_FILES = ("selection.json", "shipped.json", "parity.json", "budget.json")


def record_path(records: Path, name: str, seed: int, kind: str = "") -> Path:
    return Path(records) / "runs" / name / f"seed{seed}{kind}.json"


def save_record(rec: dict, path: Path) -> None:
    """An eval_run record as JSON; float arrays (the softmax outputs) exactly, as base64 float32 (~19 kB a run)."""

    def plain(o):
        if isinstance(o, np.ndarray):
            if o.dtype.kind == "f":
                a = np.ascontiguousarray(o, dtype="<f4")
                return {"float32_b64": base64.b64encode(a.tobytes()).decode(), "shape": list(a.shape)}
            return o.tolist()
        if isinstance(o, dict):
            return {k: plain(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [plain(v) for v in o]
        if isinstance(o, np.generic):
            return o.item()
        return o

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plain(rec), separators=(",", ":")))


def load_record(path: Path) -> dict:
    rec = json.loads(Path(path).read_text())
    rec["probs"] = {t: np.frombuffer(base64.b64decode(v["float32_b64"]), dtype="<f4").reshape(v["shape"])
                    for t, v in rec.get("probs", {}).items()}
    for m in rec["test"].values():
        if "labels" in m:
            m["labels"] = np.asarray(m["labels"], dtype=np.int64)
    return rec


def metrics_only_records(records: Path) -> dict:
    """{name: {seed: record}} from a committed evaluation.json: test/val ACC and AUC, val score and best epoch of
    runs whose outputs were not kept (runs of an earlier release of the report); rows only, no bootstrap."""
    f = Path(records) / "evaluation.json"
    if not f.exists():
        return {}
    out: dict = {}
    for name, seeds in json.loads(f.read_text())["runs"].items():
        for seed, r in seeds.items():
            out.setdefault(name, {})[int(seed)] = {**r, "probs": {}, "history": {}, "outputs_kept": False}
    return out


def seeds_file(runs: Path, records: Path | None, name: str) -> Path:
    """R/seeds/<name> when this machine has it, else the committed copy in the records folder."""
    p = Path(runs) / "seeds" / name
    return p if p.exists() or records is None else Path(records) / name


def _finished(run: Path) -> bool:
    """A run that finished training: its summary, or for STL one summary per member."""
    if (run / "summary.json").exists():
        return True
    members = [p for p in run.iterdir() if p.is_dir()] if run.is_dir() else []
    return bool(members) and all((m / "summary.json").exists() for m in members)


def collect(spec: dict, runs: Path, data_dir: Path | None = None, records: Path | None = None) -> dict:
    """{name: {seed: eval_run record}} for every finished run under R/seeds, plus the teacher (at its seed).

    With `records`, every run evaluated here is saved there, and runs not on this machine come from the saved
    records (then, for runs not even recorded, metrics only from the committed evaluation.json)."""
    out: dict = {}
    root = Path(runs) / "seeds"
    for ndir in sorted(p for p in root.glob("*") if p.is_dir()):
        for sdir in sorted(ndir.glob("seed*")):
            if _finished(sdir):
                out.setdefault(ndir.name, {})[int(sdir.name[4:])] = eval_run(sdir, data_dir)
    if (Path(runs) / "teacher" / "best.pt").exists():
        out["teacher"] = {teacher_seed(runs): eval_run(Path(runs) / "teacher", data_dir)}
    if records is None:
        return out
    for name, recs in out.items():
        for seed, rec in recs.items():
            save_record(rec, record_path(records, name, seed))
    for f in sorted((Path(records) / "runs").glob("*/seed*.json")):
        if f.stem[4:].isdigit() and int(f.stem[4:]) not in out.get(f.parent.name, {}):
            out.setdefault(f.parent.name, {})[int(f.stem[4:])] = load_record(f)
    for name, recs in metrics_only_records(records).items():
        for seed, rec in recs.items():
            out.setdefault(name, {}).setdefault(seed, rec)
    return {name: dict(sorted(recs.items())) for name, recs in out.items()}


def _stats(recs: dict, task: str | None, metric: str) -> tuple[float, float, list[float]]:
    """(mean, sample std, per-seed values) over seeds; task None = mean over tasks per seed."""
    vals = []
    for r in recs.values():
        if task is None:
            vals.append(float(np.mean([m[metric] for m in r["test"].values()])))
        else:
            vals.append(float(r["test"][task][metric]))
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan"), vals


def compare_runs(runs: Path, a: str, b: str, seeds: list[int], data_dir: Path | None = None,
                 resamples: int = 10_000, records: Path | None = None) -> dict:
    """A controlled pair: two names trained in one runs folder (one teacher, the same seeds), a minus b.

    Why: CPU training is not bitwise repeatable across machines, so a probe trained with a retrained teacher cannot
    be judged against records made with another; retraining its base next to it can. Val decides (gain against
    the standard error of the difference, as `adopt`); test means and the paired bootstrap are reported.
    `NAME@stage1` is a refined run (`refine_epochs`) before its refinement: the pair is then exact, one run each.
    `NAME@raw` is an averaged run's raw weights at their own best epoch (`raw_best.pt`): the run without averaging,
    from the same training (averaging only reads the weights), so `NAME@raw` against NAME costs no extra run.
    `NAME@record` is NAME's committed record in `records` (outputs kept by the report), for runs trained elsewhere
    with this folder's teacher: nothing here can check that, so the caller names it and says how it knows (e.g.
    the teacher and one of the runs retrained here bitwise)."""

    def record(name: str, seed: int) -> dict:
        base, _, stage = name.partition("@")
        if stage == "record":
            path = record_path(records, base, seed) if records is not None else None
            rec = load_record(path) if path is not None and path.exists() else None
            if rec is None or not rec["probs"]:  # a metrics-only record cannot enter the paired bootstrap
                raise SystemExit(f"{name} seed {seed}: no record with kept outputs in {records}")
            return rec
        which = {"": "best.pt", "stage1": "stage1_best.pt", "raw": "raw_best.pt"}.get(stage)
        if which is None:
            raise SystemExit(f"{name}: the checkpoint suffixes are @stage1 (a refined run before refinement), @raw "
                             "(an averaged run's raw weights) and @record (the committed record)")
        return eval_run(run_dir(runs, base, seed), data_dir, which=which)

    recs = {n: {s: record(n, s) for s in seeds} for n in (a, b)}
    val = {n: [float(r["val_score"]) for r in recs[n].values()] for n in (a, b)}
    # each refined name's per-task refine epochs, seed by seed
    refined = {n: [r["refine_task_epochs"] for r in recs[n].values()] for n in (a, b)
               if all("refine_task_epochs" in r for r in recs[n].values())}
    return {
        "a": a, "b": b, "seeds": list(seeds), "runs": str(runs),
        "val": {**val, "gain": float(np.mean(val[a]) - np.mean(val[b])), "margin": _se_of_difference(val[a], val[b])},
        **_test_pair(recs, a, b, resamples),
        **({"refine_task_epochs": refined} if refined else {}),
    }


def _test_pair(recs: dict, a: str, b: str, resamples: int) -> dict:
    """Test means of two names over their runs (seeds or folds), each run's own test numbers, and the paired
    bootstrap of a minus b (runs averaged per resample)."""
    tasks = list(next(iter(recs[a].values()))["test"])
    test = {n: {t: {m: _stats(recs[n], t, m)[0] for m in ("acc", "auc")} for t in tasks + [None]}
            for n in (a, b)}
    labels = {t: next(iter(recs[a].values()))["test"][t]["labels"] for t in tasks}
    probs = {n: {t: np.stack([r["probs"][t] for r in recs[n].values()]) for t in tasks} for n in (a, b)}
    return {
        "test": {n: {("mean" if t is None else t): v for t, v in test[n].items()} for n in (a, b)},
        "best_epoch": {n: [r["best_epoch"] for r in recs[n].values()] for n in (a, b)},
        # each run's own test numbers: the pair's runs folder is not committed, so this is their record
        "per_seed": {n: {str(s): {t: {m: float(r["test"][t][m]) for m in ("acc", "auc")} for t in tasks}
                         for s, r in recs[n].items()} for n in (a, b)},
        "bootstrap": paired_bootstrap(labels, probs[a], probs[b], resamples=resamples, seed=13),
    }


def _pm(mean: float, std: float | None) -> str:
    if std is None or std != std:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def main_names(sel: str) -> list[str]:
    return [sel, "lorkd_nokd", "mtl", "stl"]


def seed_table(ev: dict, names: list[str], tasks: list[str], spec: dict, sel: str) -> list[str]:
    head = "| method | seeds | " + " | ".join(f"{t} ACC | {t} AUC" for t in tasks) + " | mean ACC | mean AUC |"
    rows = [head, "| --- " * (2 * len(tasks) + 4) + "|"]
    for name in names:
        if name not in ev:
            continue
        recs = ev[name]
        cells = []
        for t in tasks:
            for m in ("acc", "auc"):
                mu, sd, _ = _stats(recs, t, m)
                cells.append(_pm(100 * mu, 100 * sd))
        for m in ("acc", "auc"):
            mu, sd, _ = _stats(recs, None, m)
            cells.append(_pm(100 * mu, 100 * sd))
        lab = _label(name, spec)
        rows.append(f"| {'**' + lab + '**' if name == sel else lab} | {len(recs)} | "
                    + " | ".join(cells) + " |")
    for aname, a in ANCHORS.items():
        if not all(t in a for t in tasks):
            continue
        cells = []
        for t in tasks:
            acc, accs, auc, aucs = a[t]
            cells += [_pm(acc, accs), _pm(auc, aucs)]
        cells += [f"{np.mean([a[t][0] for t in tasks]):.2f}", f"{np.mean([a[t][2] for t in tasks]):.2f}"]
        rows.append(f"| {aname} (published) | {3 if '3 seeds' in aname else '–'} | " + " | ".join(cells) + " |")
    return rows


def anchor_checks(means: dict) -> list[tuple[str, str, float, float]]:
    """(task, metric, mean %, reference %) of every task and metric the target anchor has; `means` maps
    task -> {"acc", "auc"} as fractions. Met when the mean is at least the reference."""
    a = ANCHORS[TARGET_ANCHOR]
    return [(t, m, 100 * means[t][m], a[t][k]) for t in means if t in a for m, k in (("acc", 0), ("auc", 2))]


def targets(ev: dict, sel: str, tasks: list[str], extra: tuple[str, ...] = ()) -> list[str]:
    means = {t: {m: _stats(ev[sel], t, m)[0] for m in ("acc", "auc")} for t in tasks}
    lines = [f"- {t} {m.upper()}: LoRKD {mu:.2f} vs {ref:.2f} -> {'met' if mu >= ref else 'MISSED'} "
             f"({mu - ref:+.2f} points)" for t, m, mu, ref in anchor_checks(means)]
    lm = 100 * _stats(ev[sel], None, "acc")[0]
    for b in ("stl", "mtl", *extra):
        if b in ev:
            bm = 100 * _stats(ev[b], None, "acc")[0]
            lines.append(f"- mean ACC over tasks above {b.upper() if b in MODES else b}: {lm:.2f} vs {bm:.2f} -> "
                         f"{'met' if lm > bm else 'MISSED'} ({lm - bm:+.2f} points)")
    return lines


def _kept_mark(rec: dict) -> str:
    """' †' for a run reported from metrics only (its outputs were not kept), else ''."""
    return " †" if rec.get("outputs_kept") is False else ""


def per_seed_rows(ev: dict, names: list[str], tasks: list[str]) -> list[str]:
    rows = ["| run | seed | " + " | ".join(f"{t} ACC/AUC" for t in tasks) + " | mean ACC | mean AUC | val score | "
            "best epoch |", "| --- " * (len(tasks) + 6) + "|"]
    for name in names:
        for seed, r in sorted(ev.get(name, {}).items()):
            cells = [f"{100 * r['test'][t]['acc']:.1f} / {100 * r['test'][t]['auc']:.1f}" for t in tasks]
            ma = 100 * np.mean([r["test"][t]["acc"] for t in tasks])
            mu = 100 * np.mean([r["test"][t]["auc"] for t in tasks])
            be = r["best_epoch"]
            be = next(iter(be.values())) if len(be) == 1 else ", ".join(f"{k} {v}" for k, v in be.items())
            rows.append(f"| {name}{_kept_mark(r)} | {seed} | " + " | ".join(cells) + f" | {ma:.1f} | {mu:.1f} | "
                        f"{r['val_score']:.4f} | {be} |")
    if any(r.get("outputs_kept") is False for recs in ev.values() for r in recs.values()):
        rows += ["", "† metrics kept from an earlier run of this report whose test outputs and histories were not "
                 "kept (no bootstrap, recall or diagnostics for it)."]
    return rows


def _diag_series(rec: dict) -> list[dict]:
    h = next(iter(rec["history"].values()), [])
    return [e["kd_diag"] for e in h if "kd_diag" in e]


def _diag_init(rec: dict) -> dict | None:
    h = next(iter(rec["history"].values()), [])
    return h[0].get("kd_diag_init") if h else None


def collapse_rows(ev: dict, spec: dict) -> list[str]:
    rows = []
    for name in spec["variants"]:
        for seed, r in sorted(ev.get(name, {}).items()):
            series = _diag_series(r)
            if not series:
                if r.get("outputs_kept") is False:
                    rows.append(f"- {name} seed {seed}: † (history not kept; its figures are quoted in "
                                "'Three seeds and a sound transfer loss' below)")
                continue
            init = _diag_init(r) or {}
            be = next(iter(r["best_epoch"].values()))
            best = series[be - 1] if be and be <= len(series) else series[-1]
            keys = list(series[-1])
            fmt = "; ".join(f"{k} {init.get(k, float('nan')):.3f} -> {best[k]:.3f} (best epoch) -> "
                            f"{series[-1][k]:.3f} (last)" for k in keys)
            rows.append(f"- {name} seed {seed}: {fmt}")
    rows += ["", "Student-side collapse: spread of each expert's test logits over images (std, mean over classes; "
             "about 0 = one constant answer for every image), seed 0:", ""]
    for name in [*spec["variants"], "lorkd_nokd"]:
        r = ev.get(name, {}).get(0)
        if r is not None and all("logit_std" in m for m in r["test"].values()):
            rows.append(f"- {name}: " + ", ".join(f"{t} {m['logit_std']:.3g}" for t, m in r["test"].items()))
    return rows


def collapse_png(ev: dict, spec: dict, path: Path) -> bool:
    """The diagnostics of variant (a) per epoch; False (and an existing figure left alone) when no run of (a) here
    or in the records kept its history."""
    if not any(_diag_series(r) for r in ev.get("lorkd", {}).values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), dpi=80)
    for seed, r in sorted(ev.get("lorkd", {}).items()):
        series = _diag_series(r)
        init = _diag_init(r)
        if not series:
            continue
        xs = list(range(0 if init else 1, len(series) + 1))
        pts = ([init] if init else []) + series
        axes[0].plot(xs, [d["target_entropy_rel"] for d in pts], "o-", label=f"target, seed {seed}")
        axes[0].plot(xs, [d["student_entropy_rel"] for d in pts], "x--", label=f"student, seed {seed}")
        axes[1].plot(xs, [d["target_spread_tv"] for d in pts], "o-", label=f"seed {seed}")
        axes[2].plot(xs, [d["cos_target_student"] for d in pts], "o-", label=f"seed {seed}")
    titles = ("entropy of softmax(./T) / log D (1 = uniform)", "target spread over images (TV to mean)",
              "cosine(P f_t, f_s)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch (0 = init)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle("variant (a): teacher-side trainable projection P, diagnostics on 1,024 fixed training images",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def spread_png(ev: dict, names: list[str], tasks: list[str], spec: dict, path: Path) -> None:
    """Per-seed test points (and their mean) per method, task and metric, with the MedMNIST+ ResNet-18 band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in names if n in ev]
    cols = tasks + ["mean"]
    # long run names: the panels widen with the number of methods and the labels slant, so that none overlap
    fig, axes = plt.subplots(2, len(cols), figsize=(max(3.3, 0.45 * len(names)) * len(cols), 7), dpi=80)
    a = ANCHORS[TARGET_ANCHOR]
    for i, m in enumerate(("acc", "auc")):
        for j, t in enumerate(cols):
            ax = axes[i, j]
            for k, name in enumerate(names):
                _, _, vals = _stats(ev[name], None if t == "mean" else t, m)
                vals = [100 * v for v in vals]
                ax.scatter([k] * len(vals), vals, s=22, alpha=0.8)
                ax.hlines(np.mean(vals), k - 0.3, k + 0.3, color="black", lw=1.5)
            if all(x in a for x in tasks):
                if t != "mean":
                    mu, sd = a[t][0 if m == "acc" else 2], a[t][1 if m == "acc" else 3]
                else:
                    mu = float(np.mean([a[x][0 if m == "acc" else 2] for x in tasks]))
                    sd = None
                ax.axhline(mu, color="tab:red", ls="--", lw=1, label="MedMNIST+ ResNet-18 mean")
                if sd:
                    ax.axhspan(mu - sd, mu + sd, color="tab:red", alpha=0.08)
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([n.replace("lorkd_", "") for n in names], fontsize=7, rotation=40, ha="right",
                               rotation_mode="anchor")
            ax.set_title(f"{t} test {m.upper()} (%)", fontsize=9)
            ax.grid(alpha=0.3)
    if axes[0, 0].get_legend_handles_labels()[0]:
        axes[0, 0].legend(fontsize=6)
    fig.suptitle("per-seed test points (dots), mean over seeds (bar)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bootstrap_rows(ev: dict, sel: str, tasks: list[str], resamples: int = 10_000,
                   extra: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    labels = {t: next(iter(ev[sel].values()))["test"][t]["labels"] for t in tasks}
    probs = {n: {t: np.stack([r["probs"][t] for _, r in sorted(ev[n].items())]) for t in tasks}
             for n in ev if n != "teacher" and all(t in next(iter(ev[n].values()))["probs"] for t in tasks)}
    rows = ["| comparison | " + " | ".join(f"{t} ACC | {t} AUC" for t in tasks) + " | mean ACC | mean AUC |",
            "| --- " * (2 * len(tasks) + 3) + "|"]
    res_all = {}
    for other in ("stl", "mtl", "lorkd_nokd", *extra):
        if other not in probs or sel not in probs:
            continue
        res = paired_bootstrap(labels, probs[sel], probs[other], resamples=resamples, seed=13)
        res_all[other] = res
        cells = []
        for t in tasks + ["mean"]:
            for m in ("acc", "auc"):
                r = res[t][m]
                cells.append(f"{100 * r['diff']:+.2f} [{100 * r['lo']:+.2f}, {100 * r['hi']:+.2f}]")
        rows.append(f"| LoRKD minus {other} | " + " | ".join(cells) + " |")
    return rows, res_all


def bn_rows(spec: dict, runs: Path, ev: dict, names: list[str], data_dir: Path | None,
            seeds: tuple[int, ...] = (0,), records: Path | None = None) -> tuple[list[str], dict]:
    """Shared vs per-task re-estimated BN statistics (and the mixed-batch re-estimation as the control), per task,
    val and test, mean over `seeds` (seed 0 by default: each probe is a few forward passes over the training set).
    A run not on this machine takes its probe from the records folder."""
    res: dict = {}
    for name in names:
        for seed in [s for s in sorted(ev.get(name, {})) if s in seeds]:
            run = run_dir(runs, name, seed)
            kept = record_path(records, name, seed, ".bn") if records is not None else None
            if (run / "best.pt").exists():
                cache = run / "bn_probe.json"
                stale = not cache.exists() or cache.stat().st_mtime < (run / "best.pt").stat().st_mtime
                if stale or "mixed" not in next(iter(json.loads(cache.read_text()).values()))["val"]:
                    cache.write_text(json.dumps(bn_probe(run, data_dir, control=True), indent=1))
                if kept is not None:
                    kept.parent.mkdir(parents=True, exist_ok=True)
                    kept.write_text(cache.read_text())
            elif kept is not None and kept.exists():
                cache = kept
            else:
                continue
            res.setdefault(name, {})[seed] = json.loads(cache.read_text())
    rows = ["| run (seeds) | task | split | ACC: shared / mixed re-estimated / per-task | "
            "AUC: shared / mixed re-estimated / per-task |", "| --- | --- | --- | --- | --- |"]
    for name, by_seed in res.items():
        tasks = list(next(iter(by_seed.values())))
        for t in tasks:
            for split in ("val", "test"):
                cells = []
                for m in ("acc", "auc"):
                    v = [100 * np.mean([r[t][split][k][m] for r in by_seed.values()])
                         for k in ("shared", "mixed", "per_task")]
                    cells.append(f"{v[0]:.1f} / {v[1]:.1f} / {v[2]:.1f}")
                rows.append(f"| {name} ({', '.join(map(str, by_seed))}) | {t} | {split} | " + " | ".join(cells) + " |")
    return rows, res


def probe_rows(spec: dict, ev: dict, tasks: list[str], sel: str) -> list[str]:
    rows = ["| run (seed 0) | change vs the selected variant | val score | " + " | ".join(
        f"val {t} ACC/AUC" for t in tasks) + " | " + " | ".join(f"test {t} ACC/AUC" for t in tasks) + " |",
        "| --- " * (3 + 2 * len(tasks)) + "|"]
    items = [(sel, "—")] + [(f"probe_{k}", json.dumps(v)) for k, v in spec.get("probes", {}).items()]
    for name, change in items:
        r = ev.get(name, {}).get(0)
        if r is None:
            continue
        vc = [f"{100 * r['val'][t]['acc']:.1f} / {100 * r['val'][t]['auc']:.1f}" for t in tasks]
        tc = [f"{100 * r['test'][t]['acc']:.1f} / {100 * r['test'][t]['auc']:.1f}" for t in tasks]
        rows.append(f"| {name}{_kept_mark(r)} | `{change}` | {r['val_score']:.4f} | " + " | ".join(vc + tc) + " |")
    return rows


def recall_rows(ev: dict, names: list[str], tasks: list[str]) -> list[str]:
    rows = ["| run | task | per-class recall on test (confusion summed over seeds) | predicted share per class |",
            "| --- | --- | --- | --- |"]
    for name in names:
        if name not in ev:
            continue
        for t in tasks:
            kept = [r for r in ev[name].values() if "confusion" in r["test"][t]]
            if not kept:
                continue
            cm = np.sum([np.array(r["test"][t]["confusion"]) for r in kept], axis=0)
            rec = cm.diagonal() / np.maximum(cm.sum(1), 1)
            pred = cm.sum(0) / cm.sum()
            rows.append(f"| {name} | {t} | " + ", ".join(f"{c}: {v:.2f}" for c, v in enumerate(rec)) + " | "
                        + ", ".join(f"{v:.2f}" for v in pred) + " |")
    return rows


def has_recipe_decision(selection: dict) -> bool:
    """Whether `adopt` (on seeds) or `cv --adopt` (on folds) has decided the recipe."""
    return "recipe_val_scores" in selection or "recipe_cv" in selection


def recipe_sentence(selection: dict) -> str:
    """How the shipped recipe was chosen, with the numbers of the `adopt` stage and of `cv --adopt`."""
    cv = selection.get("recipe_cv")
    if cv is not None:
        if "recipe_val_scores" not in selection:  # the cross-validation replaced the seeds' decision
            previous = selection.get("recipe_previous", {})
            before = f"; the recipe before that: {recipe_sentence(previous)}" if has_recipe_decision(previous) else ""
            return cv_sentence(cv) + before
        rest = {k: v for k, v in selection.items() if k != "recipe_cv"}
        return recipe_sentence(rest) + "; then " + cv_sentence(cv)
    scores = ", ".join(f"{k} {v:.4f}" for k, v in selection["recipe_val_scores"].items())
    checks = selection["recipe_checks"]
    if not checks:
        return f"mean val score over seeds {selection['recipe_seeds']}: {scores}; no probe trained on every seed"
    tried = []
    for p, cs in checks.items():
        vs = ", ".join(f"{c['gain']:+.4f} vs {c['against']} (margin {c['margin']:.4f})" for c in cs)
        tried.append(f"{p} {vs} -> {'adopted' if p == selection['recipe'] else 'not adopted'}")
    base = "the current recipe retrained with one teacher" if selection.get("recipe_one_teacher") else "the variant"
    previous = selection.get("recipe_previous", {})
    before = (f"; the recipe was adopted before that by: {recipe_sentence(previous)}"
              if (previous.get("recipe_checks") and previous.get("recipe_seeds")) or "recipe_cv" in previous else "")
    return (f"mean val score over seeds {selection['recipe_seeds']}: {scores}; probes in order of val score, each "
            f"against {base} and the probes it is built on, margin = standard error of the difference: "
            + "; ".join(tried) + before)


def write_seeds_report(spec: dict, runs: Path, readme: Path, figures: Path, package: Path | None,
                       data_dir: Path | None = None, resamples: int = 10_000, records: Path | None = None) -> dict:
    """The Results section of `readme`, its figures, and R/seeds/evaluation.json. With `records`, what it measured
    of every run is kept there too (with the selection, shipping and parity files), and runs that are not on this
    machine are reported from those records."""
    from .report import confusion_png, history_curves_png, parity_section, write_results_section

    t0 = time.time()
    runs, figures = Path(runs), Path(figures)
    figures.mkdir(parents=True, exist_ok=True)
    (runs / "seeds").mkdir(parents=True, exist_ok=True)
    if records is not None:
        Path(records).mkdir(parents=True, exist_ok=True)
        for name in KEPT_FILES:
            if (runs / "seeds" / name).exists():
                (Path(records) / name).write_text((runs / "seeds" / name).read_text())
    ev = collect(spec, runs, data_dir, records)
    sp = seeds_file(runs, records, "selection.json")
    selection = json.loads(sp.read_text()) if sp.exists() else {"selected": spec["variants"][0]}
    # sel: the transfer variant chosen on seed 0; main: the shipped recipe (sel, or a probe adopted on all seeds)
    sel, main = selection["selected"], recipe(selection)
    if main not in ev:
        raise SystemExit(f"no finished run of {main}")
    tasks = list(next(iter(ev[main].values()))["test"])
    extra = tuple(spec.get("baselines", []))
    names = main_names(main) + [n for n in extra if n in ev]
    teacher_seeds = sorted(ev.get("teacher", {})) or [0]  # the seeds of the teachers recorded
    lines = ["### Multi-seed test results (official test split, %, mean ± sample std over seeds; "
             "checkpoint chosen on val)", ""]
    lines += [f"Schedule: students {spec['common'].get('epochs')} epochs, teacher "
              f"{spec.get('teacher', {}).get('epochs')} epochs (seed{'s' if len(teacher_seeds) > 1 else ''} "
              f"{', '.join(map(str, teacher_seeds))}); seeds {spec.get('seeds')}. "
              f"Transfer variant: {sel} (chosen on seed-0 val score, see the ablation); shipped recipe: **{main}**"
              + (f" ({recipe_sentence(selection)})" if has_recipe_decision(selection) else "") + ".", ""]
    # a probe trained on several seeds gets its own row, and so does the variant when a probe was adopted over it
    seeded_probes = [f"probe_{k}" for k in spec.get("probes", {})
                     if len(ev.get(f"probe_{k}", {})) > 1 and f"probe_{k}" not in names]
    seeded_probes += [sel] if sel != main else []
    lines += seed_table(ev, names + seeded_probes + ["teacher"], tasks, spec, main)
    if "recipe_cv" in selection:
        cv = selection["recipe_cv"]
        lines += ["", f"Cross-validated choice of the recipe (`seeds cv`; train+val in {cv['folds']} stratified "
                  f"folds, each fold's teacher and runs trained on the other folds, {cv_seeds_text(cv)}; every "
                  f"train+val image judged once, out of fold: {cv_pool_text(cv)} images; test never used):", ""]
        lines += cv_rows(cv)
    budget = seeds_file(runs, records, "budget.json")
    if budget.exists():
        lines += [""] + budget_section(json.loads(budget.read_text()))
    lines += ["", f"Targets (LoRKD mean over seeds vs {TARGET_ANCHOR}; mean ACC over tasks vs STL and MTL):", ""]
    lines += targets(ev, main, tasks, extra)
    lines += ["", "![per-seed spread](figures/" + SEEDS_FIGURE + ")", ""]
    spread_png(ev, names + ["teacher"], tasks, spec, figures / SEEDS_FIGURE)

    rows, boot = bootstrap_rows(ev, main, tasks, resamples, extra)
    lines += ["### Paired bootstrap, LoRKD minus baseline (test, percentage points, 95 % interval)", "",
              f"{resamples:,} resamples of the test images with replacement (numpy default_rng(13)), the same "
              "resample for both methods (paired); each method's seeds are averaged per resample (ACC: per-image "
              "correctness averaged over seeds; AUC: mean of the per-seed AUCs). Tasks are resampled "
              "independently; the mean column is the mean of the three tasks' differences. The interval covers "
              "test-set sampling with the trained seeds held fixed, not training noise beyond these seeds.", ""]
    lines += rows + [""]

    ablation = [v for v in spec["variants"]] + ["lorkd_nokd"]
    lines += ["### Transfer-loss ablation (seed 0; selection on val score, never test)", ""]
    lines += ["| variant | settings | val score | val mean ACC | test " + " | test ".join(
        f"{t} ACC/AUC" for t in tasks) + " | test mean ACC / AUC |", "| --- " * (5 + len(tasks)) + "|"]
    for name in ablation:
        r = ev.get(name, {}).get(0)
        if r is None:
            continue
        b = {**spec.get(name, {})}
        setting = ", ".join(f"{k}={v}" for k, v in b.items()) or "defaults"
        vm = 100 * np.mean([r["val"][t]["acc"] for t in tasks])
        tc = [f"{100 * r['test'][t]['acc']:.1f} / {100 * r['test'][t]['auc']:.1f}" for t in tasks]
        ma = 100 * np.mean([r["test"][t]["acc"] for t in tasks])
        mu = 100 * np.mean([r["test"][t]["auc"] for t in tasks])
        star = " (selected)" if name == sel else ""
        lines.append(f"| {name}{_kept_mark(r)}{star} | {setting} | {r['val_score']:.4f} | {vm:.1f} | " + " | ".join(tc)
                     + f" | {ma:.1f} / {mu:.1f} |")
    if sp.exists():
        s = json.loads(sp.read_text())
        lines += ["", f"Selection record: {json.dumps(s['val_scores'])} -> `{s['selected']}`."]
    lines += ["", "Transfer-target diagnostics (1,024 fixed training images, no flip; init -> best epoch -> last "
              "epoch). `target_entropy_rel` = entropy of softmax(P f_t / T) / log 1024 (1 = uniform), "
              "`target_kl_uniform` = KL to uniform (nats), `target_spread_tv` = mean total variation between an "
              "image's target and the mean target (0 = the same target for every image), `student_entropy_rel` the "
              "same entropy for softmax(f_s / T), `cos_target_student` the cosine of P f_t and f_s; FitNets: cosine "
              "and MSE of Q f_s to the standardised teacher feature; logits: argmax agreement and KL at T:", ""]
    lines += collapse_rows(ev, spec) + [""]
    if collapse_png(ev, spec, figures / COLLAPSE_FIGURE):
        lines += ["![collapse diagnostics](figures/" + COLLAPSE_FIGURE + ")", ""]

    lines += ["### Breast and Retina probes", "",
              "Per-task BatchNorm statistics, measured post hoc without retraining: the running statistics of a "
              "trained run are re-estimated on one task's training images only (one pass, cumulative average, "
              "that task's expert), then that task is evaluated (`per-task`); the control re-estimates them the "
              "same way on mixed-task batches drawn as in training (`mixed`); `shared` = the trained running "
              "statistics. The package format is unchanged by this probe.", ""]
    rows, _ = bn_rows(spec, runs, ev, [main], data_dir, records=records)
    lines += rows + ["", "Training probes (seed 0, on top of the selected variant; compared on val):", ""]
    lines += probe_rows(spec, ev, tasks, sel) + ["", "Class balance of the errors:", ""]
    lines += recall_rows(ev, [main, "stl", "mtl"], [t for t in tasks if t in ("breast", "retina")]) + [""]

    every = names + [v for v in spec["variants"]] + [f"probe_{k}" for k in spec.get("probes", {})] + ["teacher"]
    lines += ["### Every run", ""] + per_seed_rows(ev, list(dict.fromkeys(every)), tasks) + [""]

    costs = expert_costs(next(r["config"] for r in ev[sel].values() if "config" in r), data_dir)
    s, t = costs["student"], costs["teacher"]
    lines += ["### Cost per deployed expert", "", "| model | parameters | MACs per 28x28 image |",
              "| --- | --- | --- |",
              f"| LoRKD / MTL / STL expert (ShuffleNetV2 x1.0, 28 px, 2-class head) | {s['params']:,} | "
              f"{s['macs'] / 1e6:.1f} M |", f"| Teacher (ResNet-18, 2-class head) | {t['params']:,} | "
              f"{t['macs'] / 1e6:.1f} M |", ""]
    shipped = seeds_file(runs, records, "shipped.json")
    if shipped.exists():
        sh = json.loads(shipped.read_text())
        lines += ["### Shipped package", "", sh["note"], ""]
    if package and Path(package).exists():
        pkg = Path(package)
        experts = sorted((pkg / "experts").glob("*.safetensors"))
        size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
        lines += [f"Package `{pkg.as_posix()}`: {size / 1e6:.2f} MB in all; `student.onnx` "
                  f"{(pkg / 'student.onnx').stat().st_size / 1e6:.2f} MB; per expert file "
                  + ", ".join(f"{e.stem} {e.stat().st_size / 1e3:.0f} kB" for e in experts) + " (factors + head).", ""]
    lines += parity_section(seeds_file(runs, records, "parity.json"),
                            "Parity of the shipped package (full test split, onnxruntime CPU vs PyTorch EKS):")

    lines += ["### Wall times (2-core CPU; one torch thread per run, two runs in parallel as in `reproduce.sh`)", "",
              "| run | seeds | seconds per seed (training + per-epoch val), mean |", "| --- | --- | --- |"]
    for name, recs in sorted(ev.items()):  # the same order whether a run came from this machine or a record
        walls = [r["wall_seconds"] for r in recs.values() if r.get("wall_seconds")]
        if walls:
            lines.append(f"| {name} | {len(walls)} | {np.mean(walls):.0f} |")
    wall = runs / "wall.json"  # written by models/reproduce.sh when its two training lanes end
    if wall.exists():
        lines.append(f"| all training, two lanes in parallel (wall clock) | – | "
                     f"{json.loads(wall.read_text())['training_wall_seconds']:.0f} |")
    lines.append("")

    # figures: curves of seed 0, confusion matrices of the shipped run and of seed 0 of the others
    curves = {n: next(iter(ev[n][0]["history"].values())) for n in [main, "lorkd_nokd", "mtl"]
              if ev.get(n, {}).get(0, {}).get("history")}
    if curves:
        history_curves_png(curves, figures / "training_curves.png")
        lines += ["![training curves, seed 0](figures/training_curves.png)", ""]
    ship_seed = json.loads(shipped.read_text())["seed"] if shipped.exists() else 0
    if ship_seed in ev.get(main, {}):
        confusion_png(ev[main][ship_seed]["test"], f"LoRKD ({main}, seed {ship_seed}, shipped): test confusion",
                      figures / "confusion_lorkd.png")
        lines += ["![LoRKD confusion matrices](figures/confusion_lorkd.png)", ""]
    for name in ("lorkd_nokd", "mtl", "stl", "teacher"):
        if 0 in ev.get(name, {}):
            confusion_png(ev[name][0]["test"], f"{name} (seed 0): test confusion", figures / f"confusion_{name}.png")
            lines.append(f"Confusion matrices for {name} (seed 0): `figures/confusion_{name}.png`.")
    lines.append("")
    section = "\n".join(lines)
    write_results_section(Path(readme), section)
    summary = {name: {str(seed): {"val": {t: {k: r["val"][t][k] for k in ("acc", "auc")} for t in r["val"]},
                                  "test": {t: {k: r["test"][t][k] for k in ("acc", "auc")} for t in r["test"]},
                                  "val_score": r["val_score"], "best_epoch": r["best_epoch"],
                                  **({"outputs_kept": False} if r.get("outputs_kept") is False else {})}
                      for seed, r in recs.items()} for name, recs in ev.items()}
    evaluation = json.dumps({"runs": summary, "bootstrap": boot, "selected": sel, "recipe": main}, indent=1)
    (runs / "seeds" / "evaluation.json").write_text(evaluation)
    if records is not None:
        (Path(records) / "evaluation.json").write_text(evaluation)
    print(section)
    print(f"report took {time.time() - t0:.0f}s")
    return ev


def expert_costs(config: dict, data_dir: Path | None = None) -> dict:
    """Parameters and MACs of one deployed expert (backbone + a 2-class head) and of the teacher."""
    from .models import DeployStudent, Teacher, count_params_macs
    from .train import build_model

    cfg = TrainConfig.from_dict(config)
    student = build_model(cfg.with_overrides(["mode=mtl"]), load_config_tasks(cfg, data_dir))
    p, macs = count_params_macs(DeployStudent(student.cfg).eval().net)
    f = student.cfg.feature_dim
    teacher = Teacher((2,), cfg.teacher_arch, cfg.teacher_stem_stride).eval()
    tp, tmacs = count_params_macs(teacher)
    return {"student": {"params": p + 2 * f + 2, "macs": macs + 2 * f},
            "teacher": {"params": tp + 2 * teacher.feature_dim + 2, "macs": tmacs + 2 * teacher.feature_dim}}


def best_seed(runs: Path, name: str) -> tuple[int, dict]:
    scores = {}
    for sdir in sorted((Path(runs) / "seeds" / name).glob("seed*")):
        v = _val_score(sdir)
        if v is not None:
            scores[int(sdir.name[4:])] = v
    return max(scores, key=scores.get), scores


def package_selected(spec: dict, runs: Path, package: Path, data_dir: Path | None = None,
                     checkpoints: Path = Path("models/checkpoints")) -> dict:
    """Export the seed with the best val score of the shipped recipe (the selected variant, or the probe `adopt`
    chose over it), its test metrics measured here."""
    from .pipeline import export_from_run

    sel_rec = json.loads((runs / "seeds" / "selection.json").read_text()) if (
        runs / "seeds" / "selection.json").exists() else {"selected": spec["variants"][0]}
    sel = recipe(sel_rec)
    seed, scores = best_seed(runs, sel)
    run = run_dir(runs, sel, seed)
    rec = eval_run(run, data_dir)
    metrics = {t: {"test_acc": m["acc"], "test_auc": m["auc"]} for t, m in rec["test"].items()}
    mfile = runs / "seeds" / "shipped_metrics.json"
    mfile.write_text(json.dumps(metrics, indent=1))
    vs = ", ".join(f"{k} {v:.4f}" for k, v in sel_rec.get("val_scores", {}).items())
    adopted = f"; probes on top of it ({recipe_sentence(sel_rec)}): recipe `{sel}`" if (
        has_recipe_decision(sel_rec)) else ""
    teacher = keep_teacher_targets(runs, run, Path(checkpoints) / Path(package).name)
    distilled = (f"; distilled from the teacher of seed {teacher['seed']} (val score {teacher['val_score']:.4f})"
                 if teacher and "seed" in teacher else "")
    note = (f"`{Path(package).as_posix()}` is `{run.as_posix()}`: the transfer variant `{sel_rec['selected']}` was "
            f"chosen on seed 0's val score among {spec['variants']} ({vs}){adopted}; "
            f"of its seeds the one with the best val score was exported (val scores "
            f"{', '.join(f'seed {k} {v:.4f}' for k, v in sorted(scores.items()))} -> seed {seed}). Its test "
            f"ACC/AUC: " + ", ".join(f"{t} {m['test_acc']:.3f}/{m['test_auc']:.3f}" for t, m in metrics.items())
            + f"{distilled}. No test number was used for any choice.")
    extra = {"teacher": teacher} if teacher else {}
    extra |= {"selection": {**sel_rec, "shipped_seed": seed, "seed_val_scores": scores,
                           "rule": "variant: best seed-0 val score; recipe: the variant or a probe on it, best "
                                   "mean val score over seeds, a close call decided by cross-validation on "
                                   "train+val (recipe_cv); seed: best val score of that recipe"}}
    export_from_run(run, Path(package), data_dir, mfile, extra,
                    checkpoint_out=Path(checkpoints) / Path(package).name,
                    readme_notes=note.replace(f"`{run.as_posix()}`", f"run `{sel}` seed {seed}"))
    shipped = {"run": run.as_posix(), "variant": sel_rec["selected"], "recipe": sel, "seed": seed,
               "val_scores": scores, "note": note}
    (runs / "seeds" / "shipped.json").write_text(json.dumps(shipped, indent=1))
    return shipped


def keep_teacher_targets(runs: Path, run: Path, dest: Path) -> dict | None:
    """Copy the distillation targets a run learnt from (its teacher's features and logits) next to the package's
    checkpoint and describe that teacher, so the package's recipe can be retrained with the same teacher on any
    machine (a teacher retrains bitwise only on the CPU type it was trained on). None for a run without a teacher."""
    feats = json.loads((Path(run) / "config.json").read_text()).get("teacher_features")
    if not feats or not Path(feats).exists():
        return None
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(feats, dest / "teacher_features.pt")
    (dest / "teacher_features.pt").chmod(0o644)
    out = {"features": (dest / "teacher_features.pt").as_posix(), "sha256": sha256_file(dest / "teacher_features.pt")}
    summary = Path(runs) / "teacher" / "summary.json"
    if summary.exists():  # a folder seeded with committed targets has no teacher run
        sm = json.loads(summary.read_text())
        out |= {"seed": teacher_seed(runs), "val_score": sm["best_val_score"], "best_epoch": sm.get("best_epoch")}
    return out


def parity_selected(runs: Path, package: Path, data_dir: Path | None = None) -> bool:
    from .parity import package_parity

    sh = json.loads((Path(runs) / "seeds" / "shipped.json").read_text())
    run = Path(sh["run"])
    cfg = json.loads((run / "config.json").read_text())
    tasks = load_config_tasks(cfg, data_dir)
    student = load_trained(run, tasks)
    res = package_parity(Path(package), student, tasks, "test", progress=False)
    (Path(runs) / "seeds" / "parity.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    ok = res["max_abs_err"] <= 1e-4 and res["argmax_agreement"] == 1.0 and res["switch_max_abs_err"] <= 1e-5
    print("PARITY OK" if ok else "PARITY FAILED")
    return ok

