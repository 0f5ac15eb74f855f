"""Studies: the smoke version of each runs end to end, writes sane numbers and readable files, and its
figures can be redrawn from the run directory; the Hydra entry composes and runs them."""

from __future__ import annotations

import json
import math
import statistics
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
from pl_i2f.studies.i2f_vs_attack import NOISE_KINDS
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
    # one row per model x noise kind x sample x σ
    assert len(result.records) == 2 * 2 * config["samples"] * len(config["sigmas"])
    assert {r["model"] for r in result.records} == {"untrained", "trained"}
    assert {r["noise"] for r in result.records} == set(NOISE_KINDS)
    meta = json.loads(result.summary_path.read_text())
    assert meta["study"] == "i2f_vs_attack" and meta["config"]["smoke"] is True and meta["seconds"] > 0
    assert len(load_records(result.records_path)) == len(result.records)
    assert [p.name for p in result.figures] == ["i2f_vs_attack.png"]
    assert_png(result.figures[0])


def test_i2f_vs_attack_pools_psnr_from_the_mean_mse(i2f_vs_attack_run):
    """A setting's PSNR is 20·log10(1/RMSE) of the mean over its samples of the per-sample pixel MSE, and the gap
    is headline − MAP."""
    records, table = i2f_vs_attack_run.records, i2f_vs_attack_run.summary["settings"]
    assert len(table) == 2 * 2 * len(i2f_vs_attack_run.config["sigmas"])
    row = table[0]
    mine = [r for r in records if (r["model"], r["noise"], r["sigma"]) == (row["model"], row["noise"], row["sigma"])]
    for key in ("headline", "map", "dlg", "damped"):
        mse = sum(r[f"mse_{key}"] for r in mine) / len(mine)
        assert row[f"psnr_{key}"] == pytest.approx(-10 * math.log10(mse))
    assert row["gap_db"] == pytest.approx(row["psnr_headline"] - row["psnr_map"])


def test_i2f_vs_attack_predictions_are_sane(i2f_vs_attack_run):
    for r in i2f_vs_attack_run.records:
        # the Gaussian-prior attacker never does worse than guessing the mean
        assert 0 < r["mse_headline"] <= r["mse_prior"] * (1 + 1e-9), r
        # the damped form only shrinks the undamped error, the bound bounds it
        assert r["mse_damped"] <= r["mse_undamped"] * (1 + 1e-9)
        assert r["mse_lower_bound"] <= r["mse_undamped"] * (1 + 1e-9)
        assert r["noise_std"] == pytest.approx(r["sigma"] * (r["clip_norm"] if r["noise"] == "dpsgd" else 1.0))
    # more noise, a larger expected error (monotone in σ), for each sample
    for key in {(r["model"], r["noise"], r["sample"]) for r in i2f_vs_attack_run.records}:
        rows = sorted((r for r in i2f_vs_attack_run.records if (r["model"], r["noise"], r["sample"]) == key),
                      key=lambda r: r["sigma"])
        errors = [r["mse_headline"] for r in rows]
        assert errors == sorted(errors)


def test_i2f_vs_attack_headline_tracks_the_prior_aware_attack(i2f_vs_attack_run):
    """Even the smoke budget (20 L-BFGS steps on 8x8 digits) puts the MAP attack within 3 dB of the headline in
    every setting, and the verdict is computed from the table."""
    summary = i2f_vs_attack_run.summary
    for verdict in summary["by_model"].values():
        assert verdict["settings"] == 2 * len(i2f_vs_attack_run.config["sigmas"])
        assert verdict["within_3db_share"] == 1.0 and verdict["median_abs_gap_db"] <= 3.0
        assert set(verdict["acceptance"]) == {"median_abs_gap_le_2db", "share_within_3db_ge_0.8"}
    gaps = [abs(r["gap_db"]) for r in summary["settings"]]
    assert summary["overall"]["median_abs_gap_db"] == pytest.approx(statistics.median(gaps))
    assert summary["models"]["trained"]["epochs"] == 1 and 0 <= summary["models"]["trained"]["val_acc"] <= 1
    assert summary["models"]["trained"]["clip_norm"] > 0


def test_i2f_vs_attack_refuses_an_unknown_noise_kind(tmp_path):
    with pytest.raises(ConfigError, match="unknown noise kind 'laplace'"):
        run_study("i2f_vs_attack", tmp_path, smoke=True, noise=["laplace"])


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
