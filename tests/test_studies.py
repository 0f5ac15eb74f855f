"""Studies: the smoke version of each runs end to end, writes sane numbers and readable files, and its
figures can be redrawn from the run directory; the Hydra entry composes and runs them."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf, open_dict
from scipy.stats import spearmanr

from pl_i2f.errors import ConfigError
from pl_i2f.report import main as report_main
from pl_i2f.studies import STUDIES, run_study, study_module
from pl_i2f.studies.common import load_records
from pl_i2f.studies.eigen_directions import pick_directions
from pl_i2f.studies.i2f_vs_attack import PREDICTORS
from pl_i2f.studies.stats import spearman

CONF = Path(__file__).resolve().parents[1] / "conf"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: many tiny kernels, fastest on one thread


@pytest.fixture(scope="module")
def i2f_vs_attack_run(tmp_path_factory):
    return run_study("i2f_vs_attack", tmp_path_factory.mktemp("i2f_vs_attack"), smoke=True)


@pytest.fixture(scope="module")
def eigen_run(tmp_path_factory):
    return run_study("eigen_directions", tmp_path_factory.mktemp("eigen_directions"), smoke=True)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000, path


# --- i2f_vs_attack ------------------------------------------------------------------------------------------

def test_i2f_vs_attack_smoke_writes_every_row_and_file(i2f_vs_attack_run):
    result = i2f_vs_attack_run
    config = result.config
    # 2 models x 3 samples x (σ = 0 and 3 σ) x 2 attacks x 1 draw
    assert len(result.records) == 2 * config["samples"] * (1 + config["num_sigmas"]) * 2
    assert {r["model"] for r in result.records} == {"untrained", "trained"}
    assert {r["attack"] for r in result.records} == {"dlg", "inverting_gradients"}
    meta = json.loads(result.summary_path.read_text())
    assert meta["study"] == "i2f_vs_attack" and meta["config"]["smoke"] is True and meta["seconds"] > 0
    assert len(load_records(result.records_path)) == len(result.records)
    assert [p.name for p in result.figures] == [f"i2f_vs_attack_{k}.png" for k in ("error_vs_sigma", "ratio", "rank")]
    for figure in result.figures:
        assert_png(figure)


def test_i2f_vs_attack_predictions_are_sane(i2f_vs_attack_run):
    noisy = [r for r in i2f_vs_attack_run.records if r["sigma"] > 0]
    assert noisy
    for r in noisy:
        for p in PREDICTORS:
            assert math.isfinite(r[f"pred_{p}"]) and r[f"pred_{p}"] > 0, (p, r)
        # the bound is a bound, and damping only shrinks the solution
        assert r["pred_lower_bound"] <= r["pred_undamped"] * (1 + 1e-6)
        assert r["pred_paper"] <= r["pred_monitor"] * (1 + 1e-6) <= r["pred_undamped"] * (1 + 1e-6) ** 2
        assert r["lambda_max"] >= r["lambda_min"] > 0
        assert math.isfinite(r["error"]) and r["error"] >= 0
    # I²F is linear in δ = σ z: prediction / σ is one number per (model, sample, draw)
    for model in ("untrained", "trained"):
        rows = [r for r in noisy if r["model"] == model and r["sample"] == 0 and r["attack"] == "dlg"]
        unit = {round(r["pred_undamped"] / r["sigma"], 6) for r in rows}
        assert len(unit) == 1


def test_i2f_vs_attack_summary_matches_scipy(i2f_vs_attack_run):
    records, summary = i2f_vs_attack_run.records, i2f_vs_attack_run.summary
    case = summary["cases"]["untrained/dlg"]
    rows = [r for r in records if r["model"] == "untrained" and r["attack"] == "dlg" and r["sigma"] > 0]
    mine = sorted((r for r in rows if r["sample"] == 0), key=lambda r: r["sigma"])
    expected = spearmanr([r["error"] for r in mine], [r["pred_undamped"] for r in mine]).statistic
    assert case["predictors"]["undamped"]["rho_sigma_per_sample"]["0"] == pytest.approx(expected)
    sigma = mine[1]["sigma"]
    at = sorted((r for r in rows if r["sigma"] == sigma), key=lambda r: r["sample"])
    expected = spearmanr([r["error"] for r in at], [r["grad_norm"] for r in at]).statistic
    assert case["baselines"]["grad_norm"]["rho_samples_by_sigma"][str(sigma)] == pytest.approx(expected)
    ratios = sorted(r["error"] / r["pred_undamped"] for r in rows)
    assert case["predictors"]["undamped"]["median_ratio"] == pytest.approx(ratios[len(ratios) // 2])
    for key in summary["cases"]:
        assert summary["cases"][key]["best_predictor"] in PREDICTORS
        assert set(summary["cases"][key]["acceptance"]) == {"rho_sigma_every_sample_ge_0.9",
                                                            "median_abs_ratio_minus_1_le_0.3"}
    assert summary["models"]["trained"]["epochs"] == 1 and 0 <= summary["models"]["trained"]["val_acc"] <= 1


def test_i2f_vs_attack_untrained_dlg_follows_the_prediction(i2f_vs_attack_run):
    """Even the smoke budget (40 L-BFGS steps on 8x8 digits) puts DLG on the untrained LeNet near x₀ + I²F(δ):
    its error grows with σ for every sample and is within a factor 2 of the undamped prediction."""
    case = i2f_vs_attack_run.summary["cases"]["untrained/dlg"]
    assert case["predictors"]["undamped"]["rho_sigma_min"] == pytest.approx(1.0)
    assert 0.5 <= case["predictors"]["undamped"]["median_ratio"] <= 2.0
    # the paper's ε = 1 over-damps a spectrum far below 1: its prediction is much too small
    assert case["predictors"]["paper"]["median_ratio"] > 5


# --- eigen_directions --------------------------------------------------------------------------------------

def test_eigen_directions_smoke(eigen_run):
    result = eigen_run
    rows = result.records
    assert len(rows) == 1 * 4 * 2  # samples x directions x signs
    for r in rows:
        assert r["v_norm"] == pytest.approx(1.0, abs=1e-6)  # right singular vectors are unit vectors
        assert r["predicted"] == pytest.approx(r["alpha"] / math.sqrt(r["eigenvalue"]))
        assert math.isfinite(r["error"]) and r["error"] > 0
    lams = sorted({r["eigenvalue"] for r in rows})
    assert lams[-1] == pytest.approx(rows[0]["lambda_max"]) and lams[-1] / lams[0] > 10  # spans the spectrum
    stats = result.summary["attacks"]["dlg"]
    assert stats["rho_error_vs_eigenvalue"] == pytest.approx(
        spearmanr([r["eigenvalue"] for r in rows], [r["error"] for r in rows]).statistic)
    assert stats["rho_error_vs_eigenvalue"] < 0  # smaller eigenvalue, larger error
    assert_png(result.figures[0])


def test_pick_directions_spreads_over_the_spectrum():
    lam = torch.logspace(-8, 0, 100, dtype=torch.float64)
    picked = pick_directions(lam, 5, 1e-6)
    assert picked[0] == int(torch.nonzero(lam > 1e-6).flatten()[0]) and picked[-1] == 99
    assert len(set(picked)) == 5 and picked == sorted(picked)


# --- framework ---------------------------------------------------------------------------------------------

def test_spearman_handles_degenerate_input():
    assert math.isnan(spearman([1, 2], [1, 2]))
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 35]) == pytest.approx(1.0)
    assert spearman([1, 2, float("nan"), 4], [4, 3, 0, 1]) == pytest.approx(-1.0)


def test_unknown_study_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown study 'nope'"):
        study_module("nope")


def test_report_redraws_study_figures(eigen_run, tmp_path, capsys):
    for figure in eigen_run.figures:
        figure.unlink()
    report_main([str(eigen_run.out_dir)])
    assert_png(eigen_run.figures[0])
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_study_yaml_lists_the_library_defaults(name):
    yaml = OmegaConf.to_container(OmegaConf.load(CONF / "study" / f"{name}.yaml"), resolve=True)
    assert yaml["name"] == name and yaml["smoke"] is False
    assert yaml["params"] == asdict(study_module(name).Config())
    smoke = OmegaConf.load(CONF / "study" / f"{name}_smoke.yaml")
    assert smoke.smoke is True


def test_study_entry_runs_the_smoke_version(tmp_path):
    import study

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="studies", overrides=["study=eigen_directions_smoke", "logger=none",
                                                        "study.params.directions=3"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    assert cfg.study.smoke is True and cfg.task_name == "eigen_directions"
    result = study.run(cfg)
    # the smoke settings hold except what was overridden
    assert result.config["smoke"] is True and result.config["directions"] == 3 and result.config["workers"] == 1
    assert (tmp_path / "eigen_directions.csv").is_file() and (tmp_path / "eigen_directions.png").is_file()
    with pytest.raises(ConfigError, match="unknown eigen_directions parameter"):
        study.changed_params("eigen_directions", {"nope": 1})


def test_interrupted_units_resume_from_the_journal(tmp_path):
    from pl_i2f.studies.common import run_units

    journal, calls = tmp_path / "study.units.jsonl", []

    def flaky(unit):
        calls.append(unit)
        if unit == 2 and len(calls) == 3:
            raise KeyboardInterrupt  # the run is stopped while unit 2 is in progress
        return [{"unit": unit, "value": unit * 1.5}]

    with pytest.raises(KeyboardInterrupt):
        run_units(flaky, [0, 1, 2, 3], workers=1, journal=journal, key="k")
    rows = run_units(flaky, [0, 1, 2, 3], workers=1, journal=journal, key="k")
    assert calls == [0, 1, 2, 2, 3]  # units 0 and 1 were not run again
    assert rows == [{"unit": u, "value": u * 1.5} for u in range(4)]
    # another configuration starts over
    run_units(flaky, [0, 1], workers=1, journal=journal, key="other")
    assert calls[-2:] == [0, 1]
