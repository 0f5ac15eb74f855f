"""What the engine takes and returns: the noise-sampler and θ-vector types, the result dataclasses and the
warning classes."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

ThetaVector = Tensor | Mapping[str, Tensor] | Sequence[Tensor]
NoiseSampler = Callable[[torch.Generator], ThetaVector]
"""Draws the defense's perturbation δ: called as ``sampler(generator)``, returns one θ-space vector (flat,
ordered like ``parameters_to_vector`` of the trainable parameters, or a name → tensor dict) or a batch of
draws as an (s, d_θ) tensor. It must draw only from the generator it is given."""


class InfluenceWarning(UserWarning):
    """JJᵀ is rank-deficient or too ill-conditioned for the requested (undamped) computation."""


class ConvergenceWarning(InfluenceWarning):
    """An iterative solver (Lanczos, CG, stochastic Lanczos quadrature) stopped before its tolerance."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` attributed to the first caller outside this package, however deep the call."""
    frame, level = sys._getframe(1), 2  # stacklevel 2 is the caller of warn_caller()
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _PACKAGE_DIR:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


T = TypeVar("T")


def renamed(new_name: str, new_value: T, old_name: str, old_value: T | None) -> T:
    """The value of a renamed keyword: the deprecated spelling wins when given, with a FutureWarning."""
    if old_value is None:
        return new_value
    warn_caller(f"{old_name}= is deprecated and will be removed; use {new_name}=", FutureWarning)
    return old_value


@dataclass
class Spectrum:
    """Eigenpairs of JJᵀ from Lanczos. ``eigenvalues`` (k,) sorted (descending for ``largest``, ascending
    for ``smallest``); ``eigenvectors`` (k, *x.shape), orthonormal x-side vectors uᵢ; ``residuals`` (k,)
    ‖JJᵀuᵢ − λᵢuᵢ‖ (a bound on each eigenvalue's absolute error); ``converged`` whether every residual met
    the tolerance; ``iterations`` the Lanczos steps (= JJᵀ products) used."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: bool
    iterations: int
    which: str


@dataclass
class I2FResult:
    """I²F(δ) = (JJᵀ + εI)⁻¹ J δ by conjugate gradients from zero. ``vector`` is x-shaped; ``residual`` is
    the true relative residual ‖Jδ − (JJᵀ+εI) z‖ / ‖Jδ‖; ``damping`` the ε actually used (it differs from
    the requested one only after an :class:`InfluenceWarning`); ``jdelta_norm`` = ‖Jδ‖."""

    vector: Tensor
    residual: float
    iterations: int
    converged: bool
    damping: float
    jdelta_norm: float

    @property
    def norm(self) -> float:
        """‖I²F(δ)‖: the predicted reconstruction error."""
        return float(self.vector.norm())


@dataclass
class ExpectedI2F:
    """√E‖I²F(δ)‖² over the noise. ``rmse`` = value / √d_x (per-pixel RMSE scale, comparable with an
    attack's RMSE in the same normalisation as x); ``stderr`` the standard error of ``value`` (0 for the exact
    path); ``method`` one of ``exact`` (dense eigenvalues), ``slq`` (stochastic Lanczos quadrature),
    ``monte_carlo``; ``noise_draws`` the Monte Carlo draws and ``probes`` the SLQ probe vectors (0 where the
    method uses none); ``damping`` the ε actually used."""

    value: Tensor
    rmse: Tensor
    stderr: Tensor
    method: str
    noise_draws: int
    probes: int
    damping: float
    d_x: int

    @property
    def samples(self) -> int:
        """Deprecated: ``noise_draws`` (Monte Carlo) or ``probes`` (SLQ), which this one name used to mean."""
        warn_caller("ExpectedI2F.samples is deprecated; read noise_draws or probes", FutureWarning)
        return self.noise_draws if self.method == "monte_carlo" else self.probes


@dataclass
class PerSampleLeakage:
    """Per-sample leakage, each sample i being its own private input x₀ (J_i of its own loss).

    All fields are (N,) tensors (or ``None`` when not computed):
    ``lambda_max`` λ_max(J_iJ_iᵀ); ``lambda_min`` λ_min (``method="exact"`` only);
    ``trace`` tr(J_iJ_iᵀ) (exact, or SLQ/Hutchinson estimate);
    ``expected_jdelta`` √E‖J_iδ‖²; ``lower_bound`` √E‖J_iδ‖² / (λ_max + ε);
    ``expected_i2f`` √E‖I²F_i(δ)‖²; ``expected_i2f_rmse`` that divided by √(C·H·W);
    ``converged`` whether λ_max met its tolerance; ``labels`` the y used.
    """

    lambda_max: Tensor
    lambda_min: Tensor | None
    trace: Tensor | None
    expected_jdelta: Tensor | None
    lower_bound: Tensor | None
    expected_i2f: Tensor | None
    expected_i2f_rmse: Tensor | None
    converged: Tensor
    iterations: int
    method: str
    damping: float
    labels: Tensor
