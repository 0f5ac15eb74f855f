"""The training studies (init_study, defense_comparison, tradeoff_dpsgd): their smoke versions end to end
(``python train.py experiment=<study>_smoke``: the sweep, then the report's figures and numbers), and their
analyses on hand-made runs whose answer is known."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from pl_i2f.studies.training import TRAINING_STUDIES, TrainingRun, load_training_runs, report_training_studies


def run_study(tmp_path: Path, experiment: str, *overrides: str) -> Path:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "train.py", f"experiment={experiment}", f"paths.log_dir={tmp_path}",
                           *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    sweeps = sorted(tmp_path.glob("*/multiruns/*"))
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000, path


def test_init_study_smoke_end_to_end(tmp_path):
    sweep = run_study(tmp_path, "init_study_smoke", "logger=none")
    records = rows(sweep / "init_study.csv")
    runs = [r for r in records if r["kind"] == "run"]
    assert sorted(r["init"] for r in runs) == ["uniform", "xavier_uniform"]
    for run in runs:
        assert float(run["leakage_init"]) > 0 and float(run["leakage_end"]) > 0  # step 0 was evaluated
        assert 0 <= float(run["val_acc"]) <= 1
        curve = [r for r in records if r["kind"] == "evaluation" and r["run"] == run["run"]]
        assert len(curve) >= 3 and int(curve[0]["step"]) == 0
    summary = json.loads((sweep / "init_study.json").read_text())
    assert set(summary["per_init"]) == {"uniform", "xavier_uniform"} and summary["runs"] == 2
    for name in ("init_study_curves.png", "init_study_accuracy_vs_leakage.png"):
        assert_png(sweep / name)
    assert not (sweep / "wandb").exists()  # logger=none: the report makes no W&B run either


def test_defense_comparison_smoke_end_to_end(tmp_path):
    sweep = run_study(tmp_path, "defense_comparison_smoke", "logger=none")
    records = {r["defense"]: r for r in rows(sweep / "defense_comparison.csv")}
    assert set(records) == {"none", "gaussian", "anisotropic", "pruning", "dpsgd"}
    for name, row in records.items():
        assert float(row["audit_rmse"]) >= 0, row  # every job was attacked at its end
        noisy = name in ("gaussian", "anisotropic", "dpsgd")
        assert (row["i2f_pixel_rmse"] != "") == noisy, row  # no noise: no expected error an attacker sees
        assert (row["epsilon"] != "") == (name == "dpsgd"), row
        # a percentile ratio of the probes' expected errors needs them positive: no noise (and the anisotropic
        # defense's span_fraction=1, whose unnoised remainder is seen exactly) gives 0 errors and no ratio
        spread = row["unfairness_p90_p10"]
        if name in ("gaussian", "dpsgd"):
            assert float(spread) >= 1, row
        elif not noisy:
            assert spread == "", row
        assert json.loads(row["per_class"])
    # the attack recovers the undefended digit far better than any noisy one
    assert float(records["none"]["audit_rmse"]) < min(float(records[n]["audit_rmse"]) for n in ("gaussian", "dpsgd"))
    summary = json.loads((sweep / "defense_comparison.json").read_text())
    assert set(summary["at_matched_accuracy"]) == set(records)
    assert_png(sweep / "defense_comparison.png")
    assert_png(sweep / "defense_comparison_unfairness.png")


def test_tradeoff_dpsgd_smoke_end_to_end_with_one_combined_wandb_run(tmp_path):
    sweep = run_study(tmp_path, "tradeoff_dpsgd_smoke")
    runs = [r for r in rows(sweep / "tradeoff_dpsgd.csv") if r["kind"] == "run"]
    assert [float(r["noise_multiplier"]) for r in runs] == [1.0, 4.0]
    low, high = runs
    assert float(high["epsilon"]) < float(low["epsilon"])  # more noise, less privacy spent
    assert float(high["i2f_pixel_rmse"]) > float(low["i2f_pixel_rmse"])  # and a larger expected error
    epochs = [r for r in rows(sweep / "tradeoff_dpsgd.csv") if r["kind"] == "epoch"]
    assert len(epochs) == 4
    assert_png(sweep / "tradeoff_dpsgd.png")
    assert (sweep / "tradeoff.png").exists()
    combined = list((sweep / "wandb").glob("offline-run-*"))
    assert len(combined) == 1, combined
    # redrawn from the finished directory into another folder, W&B off
    out = tmp_path / "redrawn"
    from pl_i2f.report import main

    main([str(sweep), "--out", str(out), "--wandb", "off"])
    assert_png(out / "tradeoff_dpsgd.png")
    assert (out / "tradeoff_dpsgd.json").exists() and not (out / "wandb").exists()


# --- analyses on hand-made runs -------------------------------------------------------------------


def make_run(tmp_path: Path, name: str, task: str, final: dict, defense: dict | None = None, init: str = "default",
             seed: int = 0, evaluations: list | None = None, points: list | None = None) -> Path:
    job = tmp_path / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "resolved_config.yaml").write_text(
        f"task_name: {task}\nseed: {seed}\nmodel:\n  init: {init}\nlogger: null\n")
    (job / "summary.json").write_text(json.dumps({"final": final, "defense": defense or {"name": "none"},
                                                  "points": points or [], "steps": 100}))
    if evaluations is not None:
        (job / "leakage.json").write_text(json.dumps({"evaluations": evaluations}))
    return job


def test_init_study_prefers_the_init_that_leaks_less_at_equal_accuracy(tmp_path):
    # without a defense the expected error is 0: inits compare by the noise they need for the target.
    # a, b equally accurate, b leaks less (needs less σ); c needs least but is far less accurate
    for i, (init, acc, end) in enumerate([("a", 0.95, 3.0), ("b", 0.94, 1.0), ("c", 0.60, 0.2)]):
        for seed in (0, 1):
            make_run(tmp_path, f"{i}{seed}", "init_study", {"val/acc": acc + seed / 1000}, init=init, seed=seed,
                     evaluations=[{"step": 0, "sigma_for_target": end / 2, "expected_pixel_rmse": 0.0},
                                  {"step": 100, "sigma_for_target": end, "expected_pixel_rmse": 0.0}])
    (result,) = report_training_studies(tmp_path)
    assert result.summary["privacy_preferred"] == ["b", "a"]
    assert result.summary["ratio_end_worst_to_best_at_equal_accuracy"] == pytest.approx(3.0)
    assert result.summary["per_init"]["a"]["leakage_init"]["mean"] == pytest.approx(1.5)
    assert result.summary["per_init"]["b"]["seeds"] == 2


def test_old_runs_without_leakage_record_use_the_summary_points(tmp_path):
    points = [{"epoch": 0, "step": 10, "val_acc": 0.5, "leakage": 2.0, "leakage_step": 0},
              {"epoch": 1, "step": 20, "val_acc": 0.8, "leakage": 4.0, "leakage_step": 20}]
    make_run(tmp_path, "0", "init_study", {"val/acc": 0.8}, init="orthogonal", points=points)
    (run,) = load_training_runs(tmp_path)
    assert run.curve() == [(0, 2.0), (20, 4.0)]
    (result,) = report_training_studies(tmp_path)
    row = next(r for r in result.records if r["kind"] == "run")
    # those runs logged the paper's per-unit-σ figure, not the noise each init needs: nothing to compare
    assert (row["leakage_init"], row["leakage_end"]) == (None, None)
    assert result.summary["ratio_end_worst_to_best_at_equal_accuracy"] is None
    assert all(f.exists() for f in result.figures)


def test_defense_comparison_names_the_winner_at_each_accuracy(tmp_path):
    specs = [("none", {"name": "none"}, 0.97, None, 0.01, None),
             ("g1", {"name": "gaussian", "sigma": 0.01}, 0.95, 0.2, 0.30, None),
             ("g2", {"name": "gaussian", "sigma": 0.1}, 0.78, 2.0, 0.55, None),
             ("p", {"name": "pruning", "ratio": 0.9}, 0.93, None, 0.10, None),
             ("d", {"name": "dpsgd", "noise_multiplier": 1.0}, 0.85, 1.0, 0.60, 5.0)]
    for name, defense, acc, i2f, attack, eps in specs:
        final = {"val/acc": acc, "audit/rmse": attack, "leakage/expected_pixel_rmse": i2f or 7.0}
        if eps:
            final["privacy/epsilon"] = eps
        per_unit = 1.0 if i2f is None else 0.0
        make_run(tmp_path, name, "defense_comparison", final, defense=defense, evaluations=[
            {"step": 100, "expected_pixel_rmse": i2f or 7.0, "per_unit_noise": per_unit,
             "unfairness_p90_p10": 1.5, "unfairness_cv": 0.2, "per_class": {"0": 1.0, "1": 2.0}}])
    (result,) = report_training_studies(tmp_path)
    winners = result.summary["winners_by_accuracy_floor"]
    assert winners["0.9"]["by_attack_rmse"]["label"] == "gaussian σ=0.01"
    assert winners["0.8"]["by_attack_rmse"]["label"] == "dpsgd z=1"
    assert winners["0.7"]["by_i2f_pixel_rmse"]["label"] == "gaussian σ=0.1"
    by_label = {r["label"]: r for r in result.records}
    assert by_label["pruning ratio=0.9"]["i2f_pixel_rmse"] is None  # per unit σ: not an attacker's error
    # matched accuracy: the highest accuracy every defense reaches = min(0.95, 0.93, 0.85)
    assert result.summary["matched_accuracy"] == pytest.approx(0.85)
    assert result.summary["at_matched_accuracy"]["gaussian"]["label"] == "gaussian σ=0.1"


def test_report_dispatches_by_task_name_and_ignores_plain_runs(tmp_path):
    make_run(tmp_path / "a", "0", "train", {"val/acc": 0.9})
    assert report_training_studies(tmp_path / "a") == []
    assert {"init_study", "defense_comparison", "tradeoff_dpsgd", "noise_grid"} <= set(TRAINING_STUDIES)
    run = TrainingRun(tmp_path, {"final": {}}, {"task_name": "noise_grid"})
    assert run.task_name == "noise_grid"


def test_shipped_study_configs_compose():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import train  # noqa: F401  (registers the cwd resolver)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for study in ("init_study", "defense_comparison", "tradeoff_dpsgd"):
            for name in (study, f"{study}_smoke"):
                cfg = compose(config_name="train", overrides=[f"experiment={name}"], return_hydra_config=True)
                assert cfg.task_name == study and cfg.hydra.mode.name == "MULTIRUN"
                assert "study_report" in cfg.hydra.callbacks and cfg.hydra.sweeper.params
    GlobalHydra.instance().clear()
