"""DP's reconstruction bound (Hayes, Mahloujifar & Balle 2023) against its μ-GDP closed form."""

from __future__ import annotations

import itertools
import math

import pytest
from scipy.stats import norm

from pl_i2f.errors import ConfigError
from pl_i2f.privacy import gdp_mu, reconstruction_bound, reconstruction_bound_from_history


def closed_form_mu(sigma: float, q: float, steps: int) -> float:
    return q * math.sqrt(steps * (math.exp(sigma**-2) - 1.0))


@pytest.mark.parametrize("kappa", [1e-3, 0.01, 0.3])
@pytest.mark.parametrize("mu", [0.0, 0.25, 1.0, 3.0])
def test_bound_equals_gdp_closed_form(mu, kappa):
    assert reconstruction_bound(mu, kappa) == pytest.approx(norm.cdf(norm.ppf(kappa) + mu), rel=1e-12)


def test_bound_limits():
    assert reconstruction_bound(0.0, 0.05) == pytest.approx(0.05)
    assert reconstruction_bound(math.inf, 0.05) == 1.0
    assert reconstruction_bound(40.0, 0.05) == pytest.approx(1.0)


def test_mu_of_one_segment_is_the_clt_formula():
    assert gdp_mu([(1.1, 0.01, 500)]) == pytest.approx(closed_form_mu(1.1, 0.01, 500), rel=1e-12)


def test_segments_compose_as_root_sum_of_squares():
    """A schedule's μ: splitting a constant run into segments changes nothing; distinct σ add in quadrature."""
    whole = gdp_mu([(1.0, 0.02, 300)])
    split = gdp_mu([(1.0, 0.02, 100), (1.0, 0.02, 200)])
    assert split == pytest.approx(whole, rel=1e-12)
    mixed = gdp_mu([(0.8, 0.02, 100), (2.0, 0.02, 200)])
    expected = math.sqrt(closed_form_mu(0.8, 0.02, 100) ** 2 + closed_form_mu(2.0, 0.02, 200) ** 2)
    assert mixed == pytest.approx(expected, rel=1e-12)


def test_bound_falls_as_noise_grows():
    sigmas = [0.6, 0.8, 1.0, 1.5, 2.0, 4.0, 8.0]
    bounds = [reconstruction_bound_from_history([(s, 0.02, 500)], 0.01) for s in sigmas]
    assert all(a > b for a, b in itertools.pairwise(bounds))
    assert bounds[-1] > 0.01  # never below the baseline


def test_no_noise_means_no_guarantee_and_no_steps_means_baseline():
    assert reconstruction_bound_from_history([(0.0, 0.02, 10)], 0.01) == 1.0
    assert reconstruction_bound_from_history([(0.05, 0.02, 10)], 0.01) == 1.0  # exp(1/σ²) overflows
    assert reconstruction_bound_from_history([], 0.01) == pytest.approx(0.01)


@pytest.mark.parametrize("kappa", [0.0, 1.0, -0.1, float("nan"), "a"])
def test_bad_baseline_is_a_config_error(kappa):
    with pytest.raises(ConfigError, match="baseline"):
        reconstruction_bound(1.0, kappa)


def test_dpsgd_run_logs_the_bound_of_its_own_history(run_training):
    """The logged bound is the closed form at the run's (σ, q, T): an independent recomputation agrees."""
    from pl_i2f.data import build_datamodule

    steps = 5
    metrics = run_training(["defense=dpsgd", "data.size=8", "data.batch_size=32", "+trainer.limit_val_batches=1",
                            "+trainer.limit_test_batches=1", "defense.noise_multiplier=1.0",
                            f"+trainer.limit_train_batches={steps}"])
    q = build_datamodule("digits", size=8, batch_size=32, seed=42, poisson_sampling=True).sample_rate
    expected = norm.cdf(norm.ppf(0.01) + closed_form_mu(1.0, q, steps))
    assert metrics["privacy/reconstruction_bound"] == pytest.approx(expected, rel=1e-6)  # logged as float32
    assert 0.01 < metrics["privacy/reconstruction_bound"] < 1.0
