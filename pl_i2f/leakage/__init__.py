"""What the leakage monitor and the attack audit measure, per probe sample, under the one threat model.

Each probe sample is its own private input x₀ (batch size 1: an attacker who sees one sample's contribution
to the release, everything else known — :mod:`pl_i2f.threat`), and the noise is the defense's own
:class:`~pl_i2f.threat.SampleNoise` at the step: DP-SGD σC on the *clipped* gradient, Gaussian σ on the mean
of B as Bσ on the sample's gradient, anisotropic its covariance, none nothing.

**The headline** (:class:`Calibrated`): the prior-aware expected error of a Gaussian-prior attacker
(:mod:`pl_i2f.calibrated`), exact from explicit Jacobians for inputs of at most :data:`EXACT_MAX_DIM` values
(:func:`~pl_i2f.calibrated.exact_posteriors`), a Nyström sketch with a stated error beyond. Summaries: the
pooled pixel RMSE sqrt(mean over probes of each probe's per-pixel MSE) and the PSNR 20·log10(1/RMSE) of that
same mean; the prior's PSNR (guessing the mean) and the gain over it; σ / noise multiplier for a target RMSE.

**The paper's quantities** (secondary, keys under ``paper/``): the undamped I²F σ·√(Σ1/λᵢ) (the unbiased
attacker's error) and its lower bound σ·√(tr JᵀJ)/λ_max (never above it: Σ1/λ ≥ tr/λ_max²), from the same
spectra; :class:`WarmBasis`, :class:`FullPrecision` and :class:`ExactSpectra` keep the damped and undamped
engine figures for reproducing the paper (with no noise they are per unit σ).

One road: :func:`leakage_report` builds the per-sample operator (:class:`PerSampleOperator`) once and hands it
to an estimator, which returns an :class:`Estimate`; the report and its summaries follow.
"""

from __future__ import annotations

from pl_i2f.leakage.api import (
    calibrated_leakage,
    leakage_report,
    mean_pixel_std,
    measure_leakage,
    monitor_leakage,
    reserve_buffers,
    undamped_leakage,
    warm_up_transforms,
)
from pl_i2f.leakage.estimators import (
    Calibrated,
    ExactSpectra,
    FullPrecision,
    WarmBasis,
)
from pl_i2f.leakage.report import (
    CONVERGED_RESIDUAL,
    DEFAULT_TARGET_PIXEL_RMSE,
    EXACT_MAX_DIM,
    LANCZOS_CHAINS,
    LEAKAGE_KEYS,
    MONITOR_CHAINS,
    MONITOR_LAMBDA_TOL,
    NYSTROM_PROBES,
    NYSTROM_RANK,
    ROUTES,
    SKETCH_TARGET_MAX_DB,
    Estimate,
    Estimator,
    LeakageOptions,
    LeakageReport,
    NoiseLike,
    Posterior,
    Snapshot,
    SpectrumEnds,
    attack_psnr,
    noise_of,
    pooled_pixel_rmse,
    scale_for_target,
    unfairness,
)

__all__ = [
    "CONVERGED_RESIDUAL",
    "DEFAULT_TARGET_PIXEL_RMSE",
    "EXACT_MAX_DIM",
    "LANCZOS_CHAINS",
    "LEAKAGE_KEYS",
    "MONITOR_CHAINS",
    "MONITOR_LAMBDA_TOL",
    "NYSTROM_PROBES",
    "NYSTROM_RANK",
    "ROUTES",
    "SKETCH_TARGET_MAX_DB",
    "Calibrated",
    "Estimate",
    "Estimator",
    "ExactSpectra",
    "FullPrecision",
    "LeakageOptions",
    "LeakageReport",
    "NoiseLike",
    "Posterior",
    "Snapshot",
    "SpectrumEnds",
    "WarmBasis",
    "attack_psnr",
    "calibrated_leakage",
    "leakage_report",
    "mean_pixel_std",
    "measure_leakage",
    "monitor_leakage",
    "noise_of",
    "pooled_pixel_rmse",
    "reserve_buffers",
    "scale_for_target",
    "undamped_leakage",
    "unfairness",
    "warm_up_transforms",
]
