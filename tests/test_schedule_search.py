"""schedule_search: the Optuna search of DP-SGD noise schedules at a fixed ε.

End to end on the smoke version (3 trials, 2 epochs of 8x8 digits): every trial meets the privacy constraint,
the best one too, the constant baselines ran at every learning rate, and the analysis writes its table and
figure (also through ``python -m pl_i2f.report``). Then the analysis on hand-made runs (an infeasible and a
failed trial) and the search-space hook on a real Optuna study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from pl_i2f.defenses.schedules import NoiseSchedule
from pl_i2f.studies import schedule_search

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs the [sweep] extra")
optuna = pytest.importorskip("optuna")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline",
       "HYDRA_FULL_ERROR": "1"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("schedule_search")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "hparams_search=schedule_search_smoke",
                           f"paths.log_dir={logs}"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = sorted((logs / "schedule_search_smoke" / "multiruns").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def test_smoke_search_meets_the_privacy_constraint(smoke_run, tmp_path):
    summary = schedule_search.analyze(smoke_run, tmp_path)
    rows = json.loads((tmp_path / "schedule_search_trials.json").read_text())
    assert summary["trials"] == len(rows) == 3
    assert not summary["failed"] and not summary["infeasible"]
    target = summary["target_epsilon"]
    assert target == 3.0
    for row in rows:  # each trial's final logged ε within the tolerance of the target, and not far below it
        assert row["status"] == "ok" and row["feasible"]
        assert 0.9 * target <= row["epsilon"] <= target * (1 + 1e-3), row
    best = summary["best"]
    assert best["feasible"] and best["epsilon"] <= target * (1 + 1e-3)
    assert best["val_acc"] == max(r["val_acc"] for r in rows)
    # Optuna's own pick is the same trial, and it is feasible
    assert summary["optuna"]["best_value"] == pytest.approx(best["val_acc"])
    assert summary["optuna"]["best_trial_feasible"] is True
    # the constant schedule ran at both learning rates of the smoke grid: the baseline had the full lr search
    assert {r["lr"] for r in rows if r["schedule"] == "constant"} == {0.5, 1.0}
    constant = summary["best_constant"]
    assert summary["val_acc_gain_over_constant"] == pytest.approx(best["val_acc"] - constant["val_acc"])
    assert summary["val_acc_gain_over_constant"] >= 0
    for row in rows:
        if row["schedule"] != "constant":
            assert 0.25 * 0.999 <= row["end_ratio"] <= 2.0 * 1.001, row
    assert (tmp_path / "schedule_search.png").stat().st_size > 10_000
    assert (tmp_path / "schedule_search_trials.csv").read_text().count("\n") == 4


def test_report_dispatches_to_the_schedule_search_analysis(smoke_run, tmp_path):
    from pl_i2f import report

    report.main([str(smoke_run), "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "schedule_search.json").read_text())
    assert summary["best"]["feasible"] and (tmp_path / "schedule_search.png").exists()
    assert (tmp_path / "tradeoff.md").exists()  # the generic trade-off table is still written


def _fake_job(root: Path, number: int, schedule: dict, lr: float, val: float | None, epsilon: float,
              seed: int = 42) -> None:
    job = root / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"task_name": "schedule_search", "seed": 42,
                                                                 "defense": {"target_epsilon": 3.0}}))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"noise_schedule={schedule['name']}",
                                                                    f"optim.lr={lr}"]))
    if val is None:  # a failed trial: Hydra made the folder, the run wrote no summary
        return
    points = [{"epoch": e, "step": 5 * (e + 1), "val_acc": val * (e + 1) / 3, "epsilon": epsilon * (e + 1) / 3}
              for e in range(3)]
    summary = {"final": {"val/acc": val, "test/acc": val - 0.01, "privacy/epsilon": epsilon}, "epochs": 3,
               "steps": 15, "points": points,
               "defense": {"name": "dpsgd", "target_epsilon": 3.0, "schedule": {"by": "epoch", "steps_per_epoch": 5,
                                                                                **schedule}},
               "run_config": {"lr": lr, "seed": seed}}
    (job / "summary.json").write_text(json.dumps(summary))


def test_an_infeasible_trial_is_reported_and_never_best(tmp_path):
    _fake_job(tmp_path, 0, {"name": "constant"}, 0.5, 0.80, 2.999)
    _fake_job(tmp_path, 1, {"name": "linear", "final": 0.5, "horizon": 2}, 0.5, 0.95, 3.2)  # over budget
    _fake_job(tmp_path, 2, {"name": "cosine", "final": 0.4, "horizon": 2}, 0.5, 0.85, 3.0)
    _fake_job(tmp_path, 3, {"name": "step", "gamma": 0.5, "step_size": 1}, 1.0, None, 0.0)
    (tmp_path / "optimization_results.yaml").write_text(yaml.safe_dump(
        {"name": "optuna", "best_params": {"noise_schedule": "linear", "optim.lr": 0.5}, "best_value": 0.95}))
    assert schedule_search.is_schedule_search(tmp_path)
    summary = schedule_search.analyze(tmp_path)
    assert summary["infeasible"] == [1] and summary["failed"] == [3]
    assert summary["best"]["number"] == 2 and summary["best_constant"]["number"] == 0
    assert summary["val_acc_gain_over_constant"] == pytest.approx(0.05)
    assert summary["optuna"]["best_trial_feasible"] is False  # Optuna's pick broke the constraint: said so
    assert summary["best"]["end_ratio"] == pytest.approx(0.4)   # cosine reaches `final` at its horizon
    assert (tmp_path / "schedule_search.png").exists()
    assert summary["best_non_constant"]["number"] == 2 and summary["non_constant_val_acc_gain"] == pytest.approx(0.05)
    assert "noise_schedule=cosine" in summary["rerun_commands"]["best_non_constant"]


def test_search_space_spans_the_same_end_ratios_for_every_shape():
    """The hook on a real Optuna study, as the sweeper calls it: trial 0 enqueues the constant schedule at every
    lr of the grid; every other shape's option is drawn so that σ_last / σ_first lies in end_ratio."""
    from optuna.distributions import CategoricalDistribution

    epochs, low, high = 10, 0.25, 2.0
    cfg = {"trainer": {"max_epochs": epochs}, "noise_schedule": {"name": "constant", "by": "epoch"},
           "optim": {"lr": 0.5}, "schedule_search": {"end_ratio": [low, high], "constant_baselines": True}}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    shapes = CategoricalDistribution(list(schedule_search.SHAPES))
    rates = CategoricalDistribution([0.25, 0.5, 1.0])
    seen = []
    for _ in range(40):
        trial = study.ask()
        trial._suggest("noise_schedule", shapes)  # what the sweeper does with hydra.sweeper.params
        trial._suggest("optim.lr", rates)
        schedule_search.search_space(cfg, trial)
        params = dict(trial.params)
        seen.append(params)
        study.tell(trial, 0.5)
        shape = params["noise_schedule"]
        if shape == "constant":
            continue
        options = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("noise_schedule.")}
        schedule = NoiseSchedule(name=shape, by="epoch", **options).bind(total_steps=5 * epochs, steps_per_epoch=5)
        ratio = schedule.factor(5 * epochs - 1) / schedule.factor(0)
        assert low * 0.999 <= ratio <= high * 1.001, (params, ratio)
    assert {p["optim.lr"] for p in seen[1:4] if p["noise_schedule"] == "constant"} | (
        {seen[0]["optim.lr"]} if seen[0]["noise_schedule"] == "constant" else set()) == {0.25, 0.5, 1.0}
    assert all(p["noise_schedule"] == "constant" for p in seen[1:3])
    assert {p["noise_schedule"] for p in seen} == set(schedule_search.SHAPES)


def test_seed_reruns_compare_the_two_configurations_paired_by_seed(tmp_path):
    search, reruns = tmp_path / "search", tmp_path / "seeds"
    _fake_job(search, 0, {"name": "constant"}, 0.5, 0.90, 2.99)
    _fake_job(search, 1, {"name": "cosine", "final": 0.4, "horizon": 2}, 0.5, 0.88, 3.0)
    for number, (seed, constant_acc, cosine_acc) in enumerate([(1, 0.90, 0.86), (2, 0.92, 0.90), (3, 0.91, 0.88)]):
        _fake_job(reruns / "constant", number, {"name": "constant"}, 0.5, constant_acc, 2.99, seed=seed)
        _fake_job(reruns / "cosine", number, {"name": "cosine", "final": 0.4, "horizon": 2}, 0.5, cosine_acc, 3.0,
                  seed=seed)
    _fake_job(reruns / "other", 0, {"name": "cosine", "final": 0.4, "horizon": 2}, 1.0, 0.99, 3.0, seed=1)  # other lr
    summary = schedule_search.analyze(search, seed_runs=[reruns / "constant", reruns / "cosine", reruns / "other"])
    seeds = summary["seeds"]
    assert seeds["constant"]["seeds"] == [1, 2, 3] and seeds["best_non_constant"]["seeds"] == [1, 2, 3]
    assert seeds["constant"]["val_acc"]["mean"] == pytest.approx(0.91)
    assert seeds["val_acc_gain"] == pytest.approx(-0.03)
    assert seeds["paired"]["val_acc"]["differences"] == pytest.approx([-0.04, -0.02, -0.03])
    assert seeds["paired"]["val_acc"]["std"] == pytest.approx(0.01)
