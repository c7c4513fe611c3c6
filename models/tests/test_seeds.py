"""Issue 13: transfer-loss variants, target diagnostics, the multi-seed flow (select on val, report with paired
bootstrap, package, parity) on tiny synthetic tasks; the vectorised bootstrap AUC against sklearn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lorkd import seeds as S
from lorkd.bootstrap import paired_bootstrap, weighted_auc
from lorkd.train import TrainConfig, random_shift, train_run

SOURCES = {"alpha": {"path": "alpha.npz", "labels": ["no", "yes"], "channels": 1},
           "beta": {"path": "beta.npz", "labels": ["a", "b", "c"], "channels": 3}}
TINY = dict(tasks=["alpha", "beta"], task_sources=SOURCES, width="tiny", epochs=2, batch_size=8,
            max_batches_per_epoch=2, lr=0.01, num_threads=1, beta=1.0, temperature=4.0)


def test_weighted_auc_matches_sklearn_with_ties_and_resamples():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    s = np.round(rng.random(80), 1)  # ties
    probs = np.stack([1 - s, s], 1)
    assert weighted_auc(y, probs, np.ones((1, 80)))[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    y5, p5 = rng.integers(0, 5, 120), rng.dirichlet(np.ones(5), 120)
    idx = rng.integers(0, 120, 120)
    w = np.bincount(idx, minlength=120)[None].astype(float)
    assert weighted_auc(y5, p5, w)[0] == pytest.approx(roc_auc_score(y5[idx], p5[idx], multi_class="ovr"), abs=1e-12)


def test_paired_bootstrap_is_zero_for_identical_methods_and_signs_a_better_one():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    good = np.stack([1 - y, y], 1) * 0.8 + 0.1
    noise = rng.dirichlet(np.ones(2), 60)
    same = paired_bootstrap({"t": y}, {"t": noise[None]}, {"t": noise[None]}, resamples=300)
    assert same["t"]["acc"]["lo"] == same["t"]["acc"]["hi"] == 0.0
    res = paired_bootstrap({"t": y}, {"t": good[None]}, {"t": np.stack([noise, noise])}, resamples=300)
    assert res["t"]["acc"]["lo"] > 0 and res["mean"]["auc"]["diff"] > 0


def test_random_shift_translates_each_image():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    y = random_shift(x, torch.tensor([[0, 0], [1, -1]]))
    assert torch.equal(y[0], x[0])
    assert torch.equal(y[1, :, 1:, :4], x[1, :, :4, 1:])


@pytest.mark.parametrize("variant", ["teacher_proj", "fitnets", "logits"])
def test_kd_variants_train_and_log_diagnostics(tmp_path, data_dir, tasks, variant):
    n = sum(len(td.labels["train"]) for td in tasks)
    path = tmp_path / "tf.pt"
    torch.save({"tasks": [td.spec.id for td in tasks], "features": torch.randn(n, 2, 32).half(),
                "logits": torch.randn(n, 2, 3)}, path)
    cfg = TrainConfig(mode="lorkd", width="tiny", epochs=2, batch_size=8, max_batches_per_epoch=2, lr=0.01,
                      beta=1.0, teacher_features=str(path), kd_variant=variant, augment="shift")
    train_run(cfg, tasks, tmp_path / variant, progress=False)
    hist = json.loads((tmp_path / variant / "history.json").read_text())
    assert all(h["train_kd"] > 0 for h in hist)
    diag = hist[-1]["kd_diag"]
    assert hist[0]["kd_diag_init"].keys() == diag.keys()
    if variant == "teacher_proj":
        assert 0 < diag["target_entropy_rel"] <= 1 and diag["target_kl_uniform"] >= 0
        assert -1 <= diag["cos_target_student"] <= 1 and diag["target_spread_tv"] >= 0
    elif variant == "fitnets":
        assert diag["mse"] > 0
    else:
        assert 0 <= diag["argmax_agreement"] <= 1


def test_seeds_flow_selects_on_val_reports_and_ships(tmp_path, data_dir):
    spec = {"common": TINY, "teacher": {"epochs": 1, "max_batches_per_epoch": 1},
            "lorkd": {"kd_variant": "teacher_proj"}, "lorkd_logits": {"kd_variant": "logits"},
            "lorkd_nokd": {"beta": 0.0}, "mtl": {}, "stl": {}, "variants": ["lorkd", "lorkd_logits"],
            "probes": {"cw1": {"class_weight_power": 1.0}}, "seeds": [0, 1],
            "mtl_cw1": {"mode": "mtl", "class_weight_power": 1.0}, "baselines": ["mtl_cw1"]}
    runs = tmp_path / "runs"
    S.train_teacher(spec, runs, data_dir)
    blob = torch.load(runs / "teacher_features.pt")
    assert blob["logits"].shape[:2] == blob["features"].shape[:2] and blob["logits"].shape[2] == 3
    for name in ("lorkd", "lorkd_logits", "lorkd_nokd", "mtl", "stl"):
        S.train_name(spec, runs, name, 0, data_dir)
    sel = S.select_variant(spec, runs)
    assert sel["selected"] == max(sel["val_scores"], key=sel["val_scores"].get)
    for name in ("selected", "lorkd_nokd", "mtl", "stl"):
        S.train_name(spec, runs, name, 1, data_dir)
    for seed in (0, 1):  # a baseline with a probe's settings gets a row and a bootstrap comparison
        S.train_name(spec, runs, "mtl_cw1", seed, data_dir)
    S.train_name(spec, runs, "probe_cw1", 0, data_dir)
    S.train_name(spec, runs, "probe_cw1", 1, data_dir)  # a probe on several seeds gets a row in the seed table
    assert json.loads((S.run_dir(runs, "probe_cw1", 0) / "config.json").read_text())["class_weight_power"] == 1.0
    assert (S.run_dir(runs, "stl", 1) / "beta" / "best.pt").exists()
    # a controlled pair from one runs folder: a minus b on val (with the seed-noise margin) and on test
    pair = S.compare_runs(runs, "probe_cw1", "mtl_cw1", [0, 1], data_dir, resamples=200)
    ev_a = [S.eval_run(S.run_dir(runs, "probe_cw1", s), data_dir) for s in (0, 1)]
    assert pair["val"]["probe_cw1"] == [r["val_score"] for r in ev_a]
    assert pair["val"]["gain"] == pytest.approx(np.mean(pair["val"]["probe_cw1"]) - np.mean(pair["val"]["mtl_cw1"]))
    assert pair["val"]["margin"] > 0
    assert pair["per_seed"]["probe_cw1"]["1"]["alpha"]["auc"] == ev_a[1]["test"]["alpha"]["auc"]
    assert pair["test"]["probe_cw1"]["beta"]["acc"] == pytest.approx(np.mean([r["test"]["beta"]["acc"] for r in ev_a]))
    assert pair["bootstrap"]["mean"]["acc"]["diff"] == pytest.approx(
        pair["test"]["probe_cw1"]["mean"]["acc"] - pair["test"]["mtl_cw1"]["mean"]["acc"])
    same = S.compare_runs(runs, "mtl_cw1", "mtl_cw1", [0, 1], data_dir, resamples=50)
    assert same["val"]["gain"] == 0
    assert same["bootstrap"]["mean"]["auc"]["lo"] == 0 == same["bootstrap"]["mean"]["auc"]["hi"]
    adopted = S.select_recipe(spec, runs)  # the variant or a probe trained on every seed, on mean val
    assert set(adopted["recipe_val_scores"]) == {sel["selected"], "probe_cw1"}
    gain = adopted["recipe_val_scores"]["probe_cw1"] - adopted["recipe_val_scores"][sel["selected"]]
    assert adopted["recipe"] == ("probe_cw1" if gain > adopted["recipe_checks"]["probe_cw1"][0]["margin"]
                                 else sel["selected"])
    pkg = tmp_path / "pkg"
    shipped = S.package_selected(spec, runs, pkg, data_dir, checkpoints=tmp_path / "ck")
    assert shipped["variant"] == sel["selected"] and shipped["recipe"] == adopted["recipe"]
    assert (pkg / "manifest.json").exists()
    assert S.parity_selected(runs, pkg, data_dir)
    # the teacher's distillation targets travel with the checkpoint: the same student trains from them elsewhere
    kept = tmp_path / "ck" / "pkg" / "teacher_features.pt"
    teacher = json.loads((pkg / "manifest.json").read_text())["provenance"]["teacher"]
    assert teacher["sha256"] == S.sha256_file(runs / "teacher_features.pt") == S.sha256_file(kept)
    assert (teacher["seed"], teacher["val_score"]) == (0, json.loads(
        (runs / "teacher" / "summary.json").read_text())["best_val_score"])
    assert "distilled from the teacher of seed 0" in shipped["note"]
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "seeds").mkdir(parents=True)
    shutil.copyfile(runs / "seeds" / "selection.json", elsewhere / "seeds" / "selection.json")
    shutil.copyfile(kept, elsewhere / "teacher_features.pt")
    S.train_name(spec, elsewhere, shipped["recipe"], shipped["seed"], data_dir)
    again = torch.load(S.run_dir(elsewhere, shipped["recipe"], shipped["seed"]) / "best.pt")["model"]
    for k, v in torch.load(S.run_dir(runs, shipped["recipe"], shipped["seed"]) / "best.pt")["model"].items():
        assert torch.equal(v, again[k]), k
    readme, figs, records = tmp_path / "README.md", tmp_path / "figs", tmp_path / "records"
    S.write_seeds_report(spec, runs, readme, figs, pkg, data_dir, resamples=200, records=records)
    text = readme.read_text()
    assert "LoRKD minus stl" in text and "Transfer-loss ablation" in text and "per-task" in text
    assert "| LoRKD minus mtl_cw1 |" in text and "| mtl_cw1 | 2 |" in text and "above mtl_cw1:" in text
    assert "Student-side collapse" in text and "- lorkd_logits: " in text
    assert f"| **{S._label(adopted['recipe'], spec)}** | 2 | " in text  # the shipped recipe is the main row
    assert "| probe_cw1 | 2 | " in text or adopted["recipe"] == "probe_cw1"
    assert "Parity of the shipped package" in text and "Mixed-task graph (`student_eks.onnx`)" in text
    assert (figs / S.SEEDS_FIGURE).exists() and (figs / S.COLLAPSE_FIGURE).exists()
    ev = json.loads((runs / "seeds" / "evaluation.json").read_text())
    assert set(ev["runs"]["mtl"]) == {"0", "1"} and "stl" in ev["bootstrap"]
    assert (records / "selection.json").exists() and (records / "evaluation.json").exists()
    # a name's committed records stand in for its runs when named so (`NAME@record`): the same pair, to the digit
    by_record = S.compare_runs(runs, "probe_cw1@record", "mtl_cw1", [0, 1], data_dir, resamples=200, records=records)
    assert by_record["val"]["probe_cw1@record"] == pair["val"]["probe_cw1"]
    assert by_record["bootstrap"]["mean"]["acc"] == pair["bootstrap"]["mean"]["acc"]
    with pytest.raises(SystemExit, match="no record"):
        S.compare_runs(runs, "probe_cw1@record", "mtl_cw1", [0, 1], data_dir, resamples=10, records=None)
    bare = tmp_path / "bare"  # a record without its kept outputs cannot enter the paired bootstrap
    for seed in (0, 1):
        kept = json.loads(S.record_path(records, "probe_cw1", seed).read_text())
        S.record_path(bare, "probe_cw1", seed).parent.mkdir(parents=True, exist_ok=True)
        S.record_path(bare, "probe_cw1", seed).write_text(json.dumps({k: v for k, v in kept.items() if k != "probs"}))
    with pytest.raises(SystemExit, match="kept outputs"):
        S.compare_runs(runs, "probe_cw1@record", "mtl_cw1", [0, 1], data_dir, resamples=10, records=bare)
    assert S.record_path(records, "stl", 1).exists() and S.record_path(records, sel["selected"], 0, ".bn").exists()

    # a fresh clone has the records but no runs: the report rebuilds the same tables from them
    (records / "runs" / "lorkd_logits" / "seed0.json").unlink()  # a run whose outputs were not kept: metrics only
    again = tmp_path / "README-records.md"
    S.write_seeds_report(spec, tmp_path / "no-runs", again, tmp_path / "figs2", pkg, data_dir, resamples=200,
                         records=records)
    text2 = again.read_text()
    table = text.split("### Paired bootstrap")[0].split("Multi-seed test results")[1]
    assert table == text2.split("### Paired bootstrap")[0].split("Multi-seed test results")[1]
    # the bootstrap from the kept softmax outputs matches the one from the checkpoints
    boot2 = json.loads((records / "evaluation.json").read_text())["bootstrap"]
    for other, res in ev["bootstrap"].items():
        for t, by_metric in res.items():
            for m, r in by_metric.items():
                assert boot2[other][t][m] == r
    assert "| lorkd_logits † | 0 |" in text2 and "| lorkd_logits † |" not in text
    assert "training_curves.png" in text2 and (tmp_path / "figs2" / "training_curves.png").exists()
    assert "Parity of the shipped package" in text2 and "per-task" in text2


def test_recipe_is_adopted_only_beyond_the_seed_noise(tmp_path, monkeypatch):
    runs = tmp_path
    (runs / "seeds").mkdir()
    (runs / "seeds" / "selection.json").write_text(json.dumps({"selected": "lorkd_fitnets"}))
    spec = {"seeds": [0, 1, 2], "probes": {"small": {}, "big": {}, "partial": {}}}
    vals = {"lorkd_fitnets": [0.84, 0.82, 0.83], "probe_small": [0.845, 0.825, 0.835],
            "probe_big": [0.87, 0.86, 0.865], "probe_partial": [0.99, None, None]}
    monkeypatch.setattr(S, "_val_score", lambda run: vals[run.parent.name][int(run.name[4:])])
    rec = S.select_recipe(spec, runs)
    assert "probe_partial" not in rec["recipe_val_scores"]  # not trained on every seed: does not compete
    big = rec["recipe_checks"]["probe_big"][0]
    assert rec["recipe"] == "probe_big" and big["against"] == "lorkd_fitnets" and big["gain"] > big["margin"] > 0
    vals["probe_big"] = [0.85, 0.81, 0.84]  # best mean, but inside the seed noise: the variant stays
    rec = S.select_recipe(spec, runs)
    assert list(rec["recipe_checks"]) == ["probe_small", "probe_big"] and rec["recipe"] == "lorkd_fitnets"
    assert json.loads((runs / "seeds" / "selection.json").read_text())["recipe"] == "lorkd_fitnets"


def test_a_probe_built_on_a_probe_must_beat_it_too(tmp_path, monkeypatch):
    runs = tmp_path
    (runs / "seeds").mkdir()
    (runs / "seeds" / "selection.json").write_text(json.dumps({"selected": "lorkd_fitnets"}))
    spec = {"seeds": [0, 1, 2], "probes": {"a": {"x": 1}, "b": {"y": 0}, "ab": {"x": 1, "y": 0}}}
    assert S._probe_extends(spec, "probe_ab", "probe_a") and not S._probe_extends(spec, "probe_a", "probe_ab")
    vals = {"lorkd_fitnets": [0.80, 0.81, 0.82], "probe_a": [0.84, 0.85, 0.86], "probe_b": [0.80, 0.81, 0.83],
            "probe_ab": [0.845, 0.855, 0.865]}
    monkeypatch.setattr(S, "_val_score", lambda run: vals[run.parent.name][int(run.name[4:])])
    rec = S.select_recipe(spec, runs)
    # ab is best and far above the variant, but only +0.005 over a (margin 0.008): a is adopted instead
    assert list(rec["recipe_checks"])[0] == "probe_ab" and rec["recipe"] == "probe_a"
    assert [c["against"] for c in rec["recipe_checks"]["probe_ab"]] == ["lorkd_fitnets", "probe_a", "probe_b"]
    assert "probe_ab +0.0450 vs lorkd_fitnets" in S.recipe_sentence(rec)
    vals["probe_ab"] = [0.87, 0.88, 0.89]
    assert S.select_recipe(spec, runs)["recipe"] == "probe_ab"


def test_one_teacher_adopt_compares_only_this_folders_runs_against_the_current_recipe(tmp_path, monkeypatch):
    runs, records = tmp_path / "runs", tmp_path / "records"
    (runs / "seeds").mkdir(parents=True)
    (runs / "seeds" / "selection.json").write_text(json.dumps(
        {"selected": "lorkd_fitnets", "recipe": "probe_a", "recipe_checks": {"probe_a": []}}))
    spec = {"seeds": [0, 1, 2], "probes": {"a": {"x": 1}, "b": {"y": 1}, "tbn": {"x": 1, "task_bn": True},
                                           "old": {"x": 1, "z": 1}}}
    # probe_a scored higher with another teacher; that record must not enter this folder's decision
    records.mkdir()
    for seed, v in enumerate([0.95, 0.96, 0.97]):
        S.record_path(records, "probe_a", seed).parent.mkdir(parents=True, exist_ok=True)
        S.record_path(records, "probe_a", seed).write_text(json.dumps({"val_score": v}))
    vals = {"lorkd_fitnets": [None] * 3, "probe_a": [0.82, 0.83, 0.84], "probe_b": [0.99, 0.99, 0.98],
            "probe_tbn": [0.85, 0.86, 0.87], "probe_old": [None, None, None]}
    monkeypatch.setattr(S, "_val_score", lambda run: vals[run.parent.name][int(run.name[4:])])
    rec = S.select_recipe(spec, runs, records, one_teacher=True)
    # probe_b is not built on the current recipe (not tried); the variant is not trained here (not needed)
    assert set(rec["recipe_val_scores"]) == {"probe_a", "probe_tbn"} and rec["recipe"] == "probe_tbn"
    assert [c["against"] for c in rec["recipe_checks"]["probe_tbn"]] == ["probe_a"]
    assert rec["recipe_previous"]["recipe"] == "probe_a" and rec["recipe_one_teacher"]
    assert "against the current recipe retrained with one teacher" in S.recipe_sentence(rec)
    # a rerun keeps the decision that made the recipe (adopting probe_tbn), not the rerun's own input
    again = S.select_recipe(spec, runs, records, one_teacher=True)
    assert again["recipe"] == "probe_tbn" and again["recipe_previous"]["recipe"] == "probe_tbn"
    assert again["recipe_previous"]["recipe_checks"] == rec["recipe_checks"]
    assert S.select_recipe(spec, runs, records, one_teacher=True)["recipe_previous"] == again["recipe_previous"]
    # an earlier decision with its numbers is quoted after the new one
    check = {"against": "lorkd_fitnets", "gain": 0.02, "margin": 0.01}
    rec["recipe_previous"] = {"recipe": "probe_a", "recipe_seeds": [0, 1, 2], "recipe_val_scores": {"probe_a": 0.9},
                              "recipe_checks": {"probe_a": [check]}}
    assert "adopted before that by: mean val score over seeds [0, 1, 2]: probe_a 0.9000" in S.recipe_sentence(rec)
    assert "probe_a +0.0200 vs lorkd_fitnets (margin 0.0100) -> adopted" in S.recipe_sentence(rec)
    (runs / "seeds" / "selection.json").write_text(json.dumps({"selected": "lorkd_fitnets", "recipe": "probe_a"}))
    vals["probe_tbn"] = [0.83, 0.82, 0.85]  # inside the seed noise: the current recipe stays
    assert S.select_recipe(spec, runs, records, one_teacher=True)["recipe"] == "probe_a"
    # while the recipe is still the variant, every probe is built on it
    (runs / "seeds" / "selection.json").write_text(json.dumps({"selected": "lorkd_fitnets"}))
    vals["lorkd_fitnets"] = [0.80, 0.81, 0.82]
    rec = S.select_recipe(spec, runs, records, one_teacher=True)
    assert set(rec["recipe_val_scores"]) == {"lorkd_fitnets", "probe_a", "probe_b", "probe_tbn"}
    assert rec["recipe"] == "probe_b"
    (runs / "seeds" / "selection.json").write_text(json.dumps({"selected": "lorkd_fitnets", "recipe": "probe_a"}))
    vals["probe_a"] = [None] * 3  # the current recipe not retrained here: no decision at all
    with pytest.raises(SystemExit, match="in this runs folder"):
        S.select_recipe(spec, runs, records, one_teacher=True)


def test_adopt_on_a_fresh_clone_reads_the_committed_records(tmp_path):
    records, runs = tmp_path / "records", tmp_path / "runs"
    records.mkdir()
    (records / "selection.json").write_text(json.dumps({"selected": "lorkd_fitnets"}))
    spec = {"seeds": [0, 1], "probes": {"cw0": {"class_weight_power": 0.0}}}
    for name, scores in {"lorkd_fitnets": [0.80, 0.81], "probe_cw0": [0.90, 0.91]}.items():
        for seed, v in enumerate(scores):
            S.record_path(records, name, seed).parent.mkdir(parents=True, exist_ok=True)
            S.record_path(records, name, seed).write_text(json.dumps({"val_score": v}))
    rec = S.select_recipe(spec, runs, records)
    assert rec["recipe"] == "probe_cw0" and rec["recipe_val_scores"]["lorkd_fitnets"] == 0.805
    assert json.loads((runs / "seeds" / "selection.json").read_text())["recipe"] == "probe_cw0"
    with pytest.raises(SystemExit):  # a probe is never trained on a guessed variant
        S.run_config(spec, "probe_cw0", 0, tmp_path / "elsewhere")


def test_cross_validation_trains_per_fold_pools_out_of_fold_and_adopts(tmp_path, data_dir):
    spec = {"common": TINY, "teacher": {"epochs": 1, "max_batches_per_epoch": 1}, "lorkd": {},
            "variants": ["lorkd"], "probes": {"cw1": {"class_weight_power": 1.0}}, "seeds": [0]}
    runs, records = tmp_path / "runs", tmp_path / "records"
    records.mkdir()
    (records / "selection.json").write_text(json.dumps({"selected": "lorkd"}))
    for k in range(2):
        fold_spec, fold_runs = S.prepare_fold(spec, runs, records, 2, k)
        assert fold_runs == S.cv_fold_runs(runs, k) and S.selected(fold_runs) == "lorkd"
        S.train_teacher(fold_spec, fold_runs, data_dir)
        for name in ("lorkd", "probe_cw1"):
            S.train_name(fold_spec, fold_runs, name, 0, data_dir)
        cfg = json.loads((S.run_dir(fold_runs, "probe_cw1", 0) / "config.json").read_text())
        assert (cfg["cv_folds"], cfg["cv_fold"], cfg["class_weight_power"]) == (2, k, 1.0)
    with pytest.raises(SystemExit):
        S.prepare_fold(spec, runs, records, 2, 2)
    res = S.cv_compare(runs, ["lorkd", "probe_cw1"], 2, data_dir=data_dir, resamples=200)
    assert res["pool"] == {"alpha": 32, "beta": 32}  # train 24 + val 8 of each synthetic task
    # the out-of-fold score is the selection score of each image's answer from the run that did not train on it
    folds = [S.cv_val_logits(S.run_dir(S.cv_fold_runs(runs, k), "lorkd", 0), data_dir) for k in range(2)]
    labels, logits = S.out_of_fold(folds)
    expected = S.selection_score({t: S.task_metrics(labels[t], logits[t]) for t in labels})
    assert res["scores"]["lorkd"] == pytest.approx(expected)
    check = res["checks"]["probe_cw1"]
    assert check["gain"] == pytest.approx(res["scores"]["probe_cw1"] - res["scores"]["lorkd"])
    assert check["bootstrap"]["mean"]["score"]["diff"] == pytest.approx(check["gain"])
    assert len(check["fold_gains"]) == 2 and check["se_images"] >= 0
    beats = check["gain"] > max(check["se_images"], check["se_folds"])
    assert res["decision"] == ("probe_cw1" if beats else "lorkd")
    assert set(res["test"]["probe_cw1"]["per_seed"]["lorkd"]) == {"0", "1"}  # the fold runs' test numbers
    teachers = [S.eval_run(S.cv_fold_runs(runs, k) / "teacher", data_dir)["test"]["beta"]["acc"] for k in range(2)]
    assert res["teacher_test"]["beta"]["acc"] == pytest.approx(np.mean(teachers))
    rec = S.adopt_cv(runs, records, res)
    assert rec["recipe"] == res["decision"] and rec["recipe_cv"]["pool"] == res["pool"]
    assert "bootstrap" not in rec["recipe_cv"]["checks"]["probe_cw1"]
    assert "cross-validated on train+val (2 folds" in S.recipe_sentence(rec)
    assert json.loads((runs / "seeds" / "selection.json").read_text()) == rec
    assert S.adopt_cv(runs, records, res) == rec  # a rerun changes nothing
    table = "\n".join(S.cv_rows(rec["recipe_cv"]))
    assert "| lorkd | " in table and f"| probe_cw1 | {res['scores']['probe_cw1']:.4f} | " in table
    # the folds must partition train+val
    with pytest.raises(ValueError, match="partition"):
        S.out_of_fold([folds[0], folds[0]])


def test_a_cross_validated_adoption_keeps_the_decision_it_replaces(tmp_path, monkeypatch):
    runs = tmp_path
    (runs / "seeds").mkdir()
    seeds_decision = {"recipe": "probe_a", "recipe_val_scores": {"probe_a": 0.85, "probe_b": 0.84},
                      "recipe_seeds": [0, 1, 2], "recipe_one_teacher": True,
                      "recipe_checks": {"probe_b": [{"against": "probe_a", "gain": -0.01, "margin": 0.01}]}}
    (runs / "seeds" / "selection.json").write_text(json.dumps({"selected": "lorkd", **seeds_decision}))
    check = {"gain": 0.02, "se_images": 0.004, "se_folds": 0.006, "interval": [0.01, 0.03], "fold_gains": [0.02] * 5}
    result = {"folds": 5, "seed": 0, "base": "probe_a", "pool": {"t": 100}, "scores": {"probe_a": 0.8, "probe_b": 0.82},
              "metrics": {}, "decision": "probe_b", "rule": S.CV_RULE,
              "checks": {"probe_b": {**check, "bootstrap": {}}}}
    rec = S.adopt_cv(runs, None, result)
    assert rec["recipe"] == "probe_b" and rec["recipe_previous"] == seeds_decision
    assert "recipe_checks" not in rec and S.recipe(rec) == "probe_b"
    rec["recipe_cv"]["metrics"] = {n: {"t": {"acc": 0.5, "auc": 0.6, "n": 100}} for n in result["scores"]}
    assert "| probe_b | 0.8200 | 50.00 / 60.00 | +0.0200 | 0.0040, 0.0060 | **adopted** |" in S.cv_rows(
        rec["recipe_cv"])
    text = S.recipe_sentence(rec)
    assert text.startswith("cross-validated on train+val (5 folds") and "probe_b +0.0200" in text
    assert "-> adopted; the recipe before that: mean val score over seeds [0, 1, 2]" in text
    assert S.adopt_cv(runs, None, result)["recipe_previous"] == seeds_decision  # a rerun keeps the history
    with pytest.raises(SystemExit, match="not the current recipe"):
        S.adopt_cv(runs, None, {**result, "base": "probe_c"})
    # a later one-teacher adoption on top of the cross-validated recipe moves that decision into the history
    spec = {"seeds": [0, 1, 2], "probes": {"b": {"x": 1}, "bc": {"x": 1, "y": 1}}}
    vals = {"probe_b": [0.80, 0.81, 0.82], "probe_bc": [0.90, 0.91, 0.92]}
    monkeypatch.setattr(S, "_val_score", lambda run: vals.get(run.parent.name, [None] * 3)[int(run.name[4:])])
    rec = S.select_recipe(spec, runs, None, one_teacher=True)
    assert rec["recipe"] == "probe_bc" and "recipe_cv" not in rec
    assert rec["recipe_previous"]["recipe_cv"]["decision"] == "probe_b"
    assert "the recipe was adopted before that by: cross-validated on train+val" in S.recipe_sentence(rec)


def test_a_second_cross_validation_that_changes_the_recipe_keeps_the_first_in_the_history(tmp_path):
    runs = tmp_path
    (runs / "seeds").mkdir()
    check = {"gain": -0.003, "se_images": 0.005, "se_folds": 0.004, "interval": [-0.01, 0.01], "fold_gains": [0.0] * 5}
    first = {"folds": 5, "seed": 0, "base": "probe_a", "pool": {"t": 100}, "scores": {"probe_a": 0.8, "probe_b": 0.79},
             "metrics": {}, "decision": "probe_a", "rule": S.CV_RULE, "checks": {"probe_b": check}}
    seeds_decision = {"recipe": "probe_a", "recipe_val_scores": {"probe_a": 0.85}, "recipe_seeds": [0, 1, 2],
                      "recipe_checks": {}}
    (runs / "seeds" / "selection.json").write_text(json.dumps({"selected": "lorkd", **seeds_decision,
                                                                "recipe_cv": first}))
    second = {**first, "scores": {"probe_a": 0.8, "probe_n": 0.82}, "decision": "probe_n",
              "checks": {"probe_n": {**check, "gain": 0.02, "bootstrap": {}}}}
    rec = S.adopt_cv(runs, None, second)
    assert rec["recipe"] == "probe_n" and rec["recipe_cv"]["decision"] == "probe_n"
    # the same base but other names is a new comparison, not a rerun: the first one is kept, with the seeds' decision
    assert rec["recipe_previous"] == {**seeds_decision, "recipe_cv": first}
    text = S.recipe_sentence(rec)
    assert "probe_n +0.0200" in text and "the recipe before that: mean val score over seeds" in text
    assert text.endswith("probe_b -0.0030 (standard errors: images 0.0050, folds 0.0040) -> not adopted")
    assert S.adopt_cv(runs, None, second) == rec  # a rerun of the second changes nothing
    # a third comparison that keeps the recipe records nothing: the one that chose it stays
    third = {**second, "base": "probe_n", "scores": {"probe_n": 0.82, "probe_m": 0.81}, "decision": "probe_n"}
    assert S.adopt_cv(runs, None, third) == rec
    assert json.loads((runs / "seeds" / "selection.json").read_text()) == rec


def _cv_result(seed: int, fold_scores: dict[str, list[float]], se_images: float) -> dict:
    """A single-seed `cv_compare` result with what `cv_pool` reads (out-of-fold score = mean of the fold scores)."""
    scores = {n: float(np.mean(f)) for n, f in fold_scores.items()}
    base, probe = list(fold_scores)
    return {"folds": len(fold_scores[base]), "seed": seed, "runs": f"r{seed}", "base": base, "names": [base, probe],
            "pool": {"t": 100}, "scores": scores, "fold_scores": fold_scores,
            "metrics": {n: {"t": {"acc": s, "auc": s + 0.1, "n": 100}} for n, s in scores.items()},
            "checks": {probe: {"gain": scores[probe] - scores[base], "se_images": se_images, "se_folds": 0.001}},
            "decision": base, "test": {probe: {"seed": seed}}, "teacher_test": {"t": {"acc": 0.7}}, "rule": S.CV_RULE}


def test_cv_pool_judges_a_close_call_on_the_mean_of_the_seeds_gains(tmp_path):
    # seed 0 gains +0.003 out of fold, seed 1 +0.0025: pooled gain +0.00275
    r0 = _cv_result(0, {"a": [0.80, 0.80, 0.80, 0.80], "b": [0.804, 0.804, 0.804, 0.800]}, 0.001)
    r1 = _cv_result(1, {"a": [0.81, 0.81, 0.81, 0.81], "b": [0.812, 0.812, 0.812, 0.814]}, 0.003)
    pooled = S.cv_pool([r0, r1])
    assert pooled["seeds"] == [0, 1] and S.cv_seeds(pooled) == [0, 1] and S.cv_seeds(r0) == [0]
    check = pooled["checks"]["b"]
    assert check["gain"] == pytest.approx(0.00275)
    assert check["seed_gains"] == [r0["checks"]["b"]["gain"], r1["checks"]["b"]["gain"]]
    assert check["fold_gains"] == pytest.approx([0.003, 0.003, 0.003, 0.002])  # per fold, averaged over the seeds
    assert check["se_folds"] == pytest.approx(np.std([0.003, 0.003, 0.003, 0.002], ddof=1) / 2)
    assert check["se_images"] == pytest.approx(0.002)  # the mean of the seeds' standard errors
    assert pooled["decision"] == "b"  # 0.00275 > max(0.002, 0.00025)
    assert pooled["scores"]["b"] == pytest.approx(np.mean([r0["scores"]["b"], r1["scores"]["b"]]))
    assert pooled["metrics"]["b"]["t"]["acc"] == pytest.approx(pooled["scores"]["b"])
    assert set(pooled["test"]) == {"0", "1"} and pooled["rule"] == S.CV_POOLED_RULE
    assert pooled["same_fold_teachers"]
    assert not S.cv_pool([r0, {**r1, "teacher_test": {"t": {"acc": 0.6}}}])["same_fold_teachers"]
    assert "seeds 0, 1 (pooled)" in S.cv_sentence(pooled) and "seed 0, every" in S.cv_sentence(r0)
    # a second seed whose images are noisier keeps the recipe: 0.00275 < mean(0.001, 0.006)
    r1_noisy = {**r1, "checks": {"b": {**r1["checks"]["b"], "se_images": 0.006}}}
    assert S.cv_pool([r0, r1_noisy])["decision"] == "a"
    with pytest.raises(ValueError, match="names"):
        S.cv_pool([r0, {**r1, "names": ["a", "c"]}])
    with pytest.raises(ValueError, match="twice"):
        S.cv_pool([r0, {**r1, "seed": 0}])
    with pytest.raises(ValueError, match="pooled one"):
        S.cv_pool([r0, pooled])
    with pytest.raises(ValueError, match="two"):
        S.cv_pool([r0])
    # adopted, the pooled decision is recorded with its seeds, and the report says so
    (tmp_path / "seeds").mkdir()
    (tmp_path / "seeds" / "selection.json").write_text(json.dumps({"selected": "lorkd", "recipe": "a"}))
    rec = S.adopt_cv(tmp_path, None, pooled)
    assert rec["recipe"] == "b" and rec["recipe_cv"]["seeds"] == [0, 1] and "seed" not in rec["recipe_cv"]
    assert "seeds 0, 1 (pooled)" in S.recipe_sentence(rec)


def test_a_teacher_of_another_seed_gets_a_runs_folder_of_its_own(tmp_path, data_dir):
    spec = {"common": TINY, "teacher": {"epochs": 1, "max_batches_per_epoch": 1}}
    S.train_teacher(spec, tmp_path / "t0", data_dir)
    S.train_teacher(spec, tmp_path / "t1", data_dir, seed=1)
    seeds = [json.loads((tmp_path / t / "teacher" / "config.json").read_text())["seed"] for t in ("t0", "t1")]
    assert seeds == [0, 1]
    w0, w1 = (torch.load(tmp_path / t / "teacher_features.pt")["features"] for t in ("t0", "t1"))
    assert not torch.equal(w0, w1)  # another initialisation and order, another teacher
    with pytest.raises(SystemExit, match="seed 1, not 0"):
        S.train_teacher(spec, tmp_path / "t1", data_dir)  # its students would distil from the wrong teacher
    for name, score in (("a", 0.84), ("b", 0.86), ("c", 0.86)):  # the package's teacher: best val, a tie the earlier
        (tmp_path / name / "teacher").mkdir(parents=True)
        (tmp_path / name / "teacher" / "summary.json").write_text(json.dumps({"best_val_score": score}))
    assert S.best_teacher([tmp_path / n for n in ("a", "b", "c")]) == tmp_path / "b"
    assert S.best_teacher([tmp_path / n for n in ("c", "a", "b")]) == tmp_path / "c"
    with pytest.raises(SystemExit, match="no finished teacher"):
        S.best_teacher([tmp_path / "t0", tmp_path / "none"])
    records = tmp_path / "records"
    ev = S.collect(spec, tmp_path / "t1", data_dir, records)
    assert list(ev["teacher"]) == [1]  # recorded as teacher seed 1, next to (never over) the seed-0 teacher's
    assert (records / "runs" / "teacher" / "seed1.json").exists()
    assert not (records / "runs" / "teacher" / "seed0.json").exists()


def test_scale_epochs_multiplies_every_epoch_count_and_keeps_the_warm_up():
    spec = {"common": {"epochs": 10, "warmup_epochs": 0.5}, "teacher": {"epochs": 8}, "mtl": {},
            "probes": {"long": {"epochs": 12}, "cw1": {"class_weight_power": 1.0}}, "variants": ["lorkd"]}
    long = S.scale_epochs(spec, 3)
    assert (long["common"]["epochs"], long["teacher"]["epochs"], long["probes"]["long"]["epochs"]) == (30, 24, 36)
    assert long["common"]["warmup_epochs"] == 0.5 and long["probes"]["cw1"] == {"class_weight_power": 1.0}
    assert spec["common"]["epochs"] == 10 and spec["teacher"]["epochs"] == 8  # the config itself is untouched
    with pytest.raises(SystemExit):
        S.scale_epochs(spec, 0)


def test_longer_schedule_trains_its_own_teacher_and_is_judged_on_val(tmp_path, data_dir):
    spec = {"common": TINY, "teacher": {"epochs": 1, "max_batches_per_epoch": 1}, "lorkd": {}, "mtl": {},
            "variants": ["lorkd"], "probes": {"cw1": {"class_weight_power": 1.0}}, "seeds": [0, 1]}
    runs, records = tmp_path / "runs", tmp_path / "records"
    records.mkdir()
    (records / "selection.json").write_text(json.dumps({"selected": "lorkd"}))
    (runs / "seeds").mkdir(parents=True)
    (runs / "seeds" / "selection.json").write_text(json.dumps({"selected": "lorkd"}))
    S.train_teacher(spec, runs, data_dir)
    long_spec, long_runs = S.prepare_budget(spec, runs, records, 2)
    assert long_runs == S.budget_runs(runs, 2) and S.selected(long_runs) == "lorkd"
    S.train_teacher(long_spec, long_runs, data_dir)
    for seed in (0, 1):
        for name in ("probe_cw1", "mtl"):
            S.train_name(spec, runs, name, seed, data_dir)
            S.train_name(long_spec, long_runs, name, seed, data_dir)
    assert json.loads((long_runs / "teacher" / "summary.json").read_text())["epochs"] == 2
    cfg = json.loads((S.run_dir(long_runs, "probe_cw1", 1) / "config.json").read_text())
    assert (cfg["epochs"], cfg["class_weight_power"]) == (4, 1.0)
    assert cfg["teacher_features"] == str(long_runs / "teacher_features.pt")  # distilled from its own teacher
    # the base-budget runs come from this machine, or from the committed records when it has none
    res = S.budget_compare(runs, records, 2, ["probe_cw1", "mtl"], [0, 1], data_dir, resamples=200)
    base = [S.eval_run(S.run_dir(runs, "probe_cw1", s), data_dir)["val_score"] for s in (0, 1)]
    long = [S.eval_run(S.run_dir(long_runs, "probe_cw1", s), data_dir)["val_score"] for s in (0, 1)]
    c = res["per_name"]["probe_cw1"]
    assert c["val"]["base"] == base and c["val"]["long"] == long
    assert c["val"]["gain"] == pytest.approx(np.mean(long) - np.mean(base))
    assert c["val"]["margin"] == pytest.approx(S._se_of_difference(long, base))
    assert c["longer_wins"] == (c["val"]["gain"] > c["val"]["margin"])
    assert c["bootstrap"]["mean"]["acc"]["diff"] == pytest.approx(
        c["test"]["long"]["mean"]["acc"] - c["test"]["base"]["mean"]["acc"])
    assert res["epochs"]["mtl"] == [4, 4] and res["teacher"]["long"]["epochs"] == 2
    assert res["teacher"]["base"]["epochs"] == 1
    against = res["recipe_against"]["mtl"]
    assert against["test"]["probe_cw1"]["mean"]["auc"] == pytest.approx(c["test"]["long"]["mean"]["auc"])
    text = "\n".join(S.budget_section(res))
    assert "| probe_cw1 | 2x | 2 | " in text and "| teacher (seed 0) | 2x (2 epochs) | 1 |" in text
    assert "| 2x: probe_cw1 minus mtl |" in text and "| mtl: 2x minus 1x |" in text
    assert "'seed" not in text and S._epochs_text({"alpha": 3, "beta": 4}) == "alpha 3, beta 4"
    for name in ("probe_cw1", "mtl", "teacher"):  # from records alone, as on a fresh clone
        for seed in ((0,) if name == "teacher" else (0, 1)):
            run = runs / "teacher" if name == "teacher" else S.run_dir(runs, name, seed)
            S.save_record(S.eval_run(run, data_dir), S.record_path(records, name, seed))
    shutil.rmtree(runs / "seeds" / "probe_cw1")
    again = S.budget_compare(runs, records, 2, ["probe_cw1", "mtl"], [0, 1], data_dir, resamples=200)
    assert again["per_name"]["probe_cw1"]["val"] == c["val"]
    with pytest.raises(SystemExit, match="neither a run"):
        S.budget_compare(runs, None, 2, ["probe_cw1"], [0, 1], data_dir, resamples=50)
    with pytest.raises(SystemExit, match="not trained at x2 yet: probe_cw1 seed 2, mtl seed 2 "):
        S.budget_compare(runs, records, 2, ["probe_cw1", "mtl"], [0, 2], data_dir, resamples=50)
    # a variant re-selected after the longer runs were made: they stay on the variant they were built on
    (runs / "seeds" / "selection.json").write_text(json.dumps({"selected": "lorkd_nokd"}))
    with pytest.raises(SystemExit, match="was built on the variant lorkd"):
        S.prepare_budget(spec, runs, records, 2)
    assert S.selected(long_runs) == "lorkd"


def test_a_refined_run_is_compared_with_itself_before_refinement(tmp_path, data_dir):
    spec = {"common": {**TINY, "beta": 0.0}, "nokd_refine": {"mode": "lorkd_nokd", "refine_epochs": 2}, "seeds": [0, 1]}
    runs = tmp_path / "runs"
    for seed in (0, 1):
        S.train_name(spec, runs, "nokd_refine", seed, data_dir)
    pair = S.compare_runs(runs, "nokd_refine", "nokd_refine@stage1", [0, 1], data_dir, resamples=100)
    for seed, before in zip((0, 1), pair["val"]["nokd_refine@stage1"], strict=True):
        summary = json.loads((S.run_dir(runs, "nokd_refine", seed) / "summary.json").read_text())
        assert before == pytest.approx(summary["stage1_val_score"])  # the first stage's selected checkpoint
    # each task keeps its best refine epoch or the checkpoint it started from: never worse on val, seed by seed
    assert all(a >= b for a, b in zip(pair["val"]["nokd_refine"], pair["val"]["nokd_refine@stage1"], strict=True))
    assert len(pair["refine_task_epochs"]["nokd_refine"]) == 2
    assert "nokd_refine@stage1" not in pair["refine_task_epochs"]
    with pytest.raises(SystemExit, match="@stage1"):
        S.compare_runs(runs, "nokd_refine", "nokd_refine@last", [0], data_dir, resamples=10)


def test_an_averaged_runs_raw_side_is_compared_with_no_extra_run(tmp_path, data_dir):
    spec = {"common": {**TINY, "beta": 0.0, "mode": "lorkd_nokd"}, "plain": {}, "avg": {"ema_decay": 0.9},
            "seeds": [0, 1]}
    runs = tmp_path / "runs"
    for seed in (0, 1):
        for name in ("plain", "avg"):
            S.train_name(spec, runs, name, seed, data_dir)
    # the raw side of the averaged runs is the plain runs: the same val scores, best epochs and test outputs
    same = S.compare_runs(runs, "avg@raw", "plain", [0, 1], data_dir, resamples=50)
    assert same["val"]["avg@raw"] == same["val"]["plain"] and same["val"]["gain"] == 0
    assert same["best_epoch"]["avg@raw"] == same["best_epoch"]["plain"]
    assert same["bootstrap"]["mean"]["auc"]["diff"] == 0 == same["bootstrap"]["mean"]["acc"]["diff"]
    pair = S.compare_runs(runs, "avg", "avg@raw", [0, 1], data_dir, resamples=50)
    assert pair["val"]["avg@raw"] == same["val"]["plain"]


def test_a_refined_probe_never_competes_for_the_recipe_on_val(tmp_path):
    runs = tmp_path / "runs"
    spec = {"common": TINY, "lorkd": {}, "variants": ["lorkd"], "seeds": [0, 1],
            "probes": {"cw1": {"class_weight_power": 1.0}, "cw1_refine": {"refine_epochs": 3}}}
    (runs / "seeds").mkdir(parents=True)
    (runs / "seeds" / "selection.json").write_text(json.dumps({"selected": "lorkd", "val_scores": {"lorkd": 0.8},
                                                               "seeds": [0]}))
    for name, scores in (("lorkd", (0.80, 0.81)), ("probe_cw1", (0.90, 0.91)), ("probe_cw1_refine", (0.99, 0.98))):
        for seed, score in enumerate(scores):
            S.run_dir(runs, name, seed).mkdir(parents=True)
            (S.run_dir(runs, name, seed) / "summary.json").write_text(json.dumps({"best_val_score": score}))
    rec = S.select_recipe(spec, runs)
    assert rec["recipe"] == "probe_cw1" and set(rec["recipe_val_scores"]) == {"lorkd", "probe_cw1"}


def test_cli_cv_results_records_a_stored_comparison_without_its_fold_runs(tmp_path, capsys):
    from lorkd.cli import main

    (tmp_path / "seeds").mkdir()
    (tmp_path / "seeds" / "selection.json").write_text(json.dumps({"selected": "lorkd", "recipe": "a"}))
    r0 = _cv_result(0, {"a": [0.80, 0.80, 0.80, 0.80], "b": [0.804, 0.804, 0.804, 0.800]}, 0.001)
    r1 = _cv_result(1, {"a": [0.81, 0.81, 0.81, 0.81], "b": [0.812, 0.812, 0.812, 0.814]}, 0.003)
    files = [tmp_path / "r0.json", tmp_path / "r1.json"]
    for f, r in zip(files, (r0, r1), strict=True):
        f.write_text(json.dumps(r))
    base = ["seeds", "cv", "--runs", str(tmp_path), "--records", ""]
    # one file: taken as it is (its decision kept the recipe: nothing changes)
    assert main([*base, "--results", str(files[0]), "--out", str(tmp_path / "one.json")]) == 0
    assert json.loads((tmp_path / "one.json").read_text()) == r0
    # two files: pooled, and --adopt records the pooled decision
    assert main([*base, "--results", *map(str, files), "--adopt", "--out", str(tmp_path / "pooled.json")]) == 0
    assert json.loads((tmp_path / "pooled.json").read_text()) == json.loads(json.dumps(S.cv_pool([r0, r1])))
    rec = json.loads((tmp_path / "seeds" / "selection.json").read_text())
    assert rec["recipe"] == "b" and rec["recipe_cv"]["seeds"] == [0, 1]
    assert "recipe: b (cross-validated" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not both"):
        main([*base, "--results", str(files[0]), "--names", "a", "b"])


def test_every_committed_cross_validation_decides_by_its_rule_and_the_recipe_is_the_last_adopted():
    """The committed cross-validations (`results/seeds/cv*.json`) are decisions the package rests on: each one's
    decision follows from its own recorded scores and standard errors by the rule (`cv_decision`, which `cv` and
    `cv_pool` decide with), and the committed selection's recipe is the decision of the cross-validation it
    records."""
    results = Path(__file__).resolve().parents[1] / "results" / "seeds"
    files = sorted(results.glob("cv*.json"))
    assert len(files) >= 5
    for f in files:
        cv = json.loads(f.read_text())
        for p, c in cv["checks"].items():
            assert c["gain"] == pytest.approx(cv["scores"][p] - cv["scores"][cv["base"]], abs=1e-12), f.name
            assert len(c["fold_gains"]) == cv["folds"], f.name
        assert cv["decision"] == S.cv_decision(cv["base"], cv["scores"], cv["checks"]), f.name
    sel = json.loads((results / "selection.json").read_text())
    assert sel["recipe"] == sel["recipe_cv"]["decision"]
    # the thirteenth and fourteenth passes paired their probes with the ninth pass's own runs (retrained bitwise, as
    # their README sections say): the same fold teachers and the same per-fold scores of the recipe, to the last digit
    ninth = json.loads((results / "cv-ema.json").read_text())
    for name in ("cv-share-neg-ema.json", "cv-ema-r4.json"):
        later = json.loads((results / name).read_text())
        assert later["teacher_test"] == ninth["teacher_test"], name
        assert later["fold_scores"]["probe_share_cw0_ema"] == ninth["fold_scores"]["probe_share_cw0_ema"], name
