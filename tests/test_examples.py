"""The runnable examples, end to end (shortened with --fast), from a fresh venv after a non-editable
``pip install .``: what a user who installs the package and copies an example gets."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
from fresh_venv import ROOT, clean_env, make_venv, pip_install, source_copy

EXAMPLE_TIMEOUT = 420  # seconds per example: a few dozen training steps and ~10 leakage evaluations on CPU

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The python of a fresh venv with this repository installed (not editable)."""
    directory = tmp_path_factory.mktemp("examples")
    python = make_venv(directory / "venv")
    pip_install(python, source_copy(directory))
    return python


def run_example(python: Path, name: str, out: Path, *args: str) -> list[dict[str, str]]:
    """Run ``examples/<name>`` outside the repository; return the rows of its CSV log."""
    result = subprocess.run([str(python), str(ROOT / "examples" / name), "--fast", "--out", str(out), *args],
                            cwd=out.parent, env=clean_env(), capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT)
    assert result.returncode == 0, result.stderr[-4000:]
    (metrics,) = out.rglob("metrics.csv")
    with metrics.open() as handle:
        return list(csv.DictReader(handle))


def logged(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """{step: value} of a metric in a CSVLogger file."""
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def test_own_module_example_logs_leakage_and_audit(installed, tmp_path):
    rows = run_example(installed, "own_module.py", tmp_path / "own", "--noise-std", "0.02")
    leakage = logged(rows, "leakage/expected_pixel_rmse")
    assert len(leakage) >= 5 and all(v > 0 for v in leakage.values())
    assert set(logged(rows, "leakage/noise_std").values()) == {0.02}
    assert logged(rows, "audit/rmse") and logged(rows, "audit/predicted_pixel_rmse")
    assert (tmp_path / "own" / "summary.json").exists()


def test_opacus_example_reads_the_dp_optimizer_and_the_accountant(installed, tmp_path):
    sigma, clip = 1.1, 0.5
    rows = run_example(installed, "opacus_lightning.py", tmp_path / "dp", "--noise-multiplier", str(sigma),
                       "--max-grad-norm", str(clip))
    leakage = logged(rows, "leakage/expected_pixel_rmse")
    assert len(leakage) >= 5
    noise = logged(rows, "leakage/noise_std")
    assert set(noise) == set(leakage)
    assert all(v == pytest.approx(sigma * clip, rel=1e-9) for v in noise.values())  # σ·C on one sample's gradient
    epsilon = logged(rows, "privacy/epsilon")
    values = [epsilon[s] for s in sorted(epsilon)]
    assert len(values) >= 2 and values[0] > 0 and values == sorted(values)
