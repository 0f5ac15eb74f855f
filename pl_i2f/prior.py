"""The attacker's Gaussian prior on the input: the data's mean and covariance in the model's input space (full up
to :data:`FULL_COVARIANCE_MAX_DIM` values, probabilistic PCA beyond), formed once per datamodule or estimated
from samples; the prior-aware estimator (:mod:`pl_i2f.calibrated`) and the MAP attack share it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pl_i2f.errors import ConfigError

#: Inputs of at most this many values get a full data covariance; beyond, probabilistic PCA (top
#: ``PRIOR_RANK`` eigen-directions + one isotropic variance for the rest, whose square root stays closed-form).
FULL_COVARIANCE_MAX_DIM = 4096
PRIOR_RANK = 256
DTYPE = torch.float64  # spectra span many decades: every computation here is float64


@dataclass(frozen=True)
class GaussianPrior:
    """N(mean, Σ_x) on flattened inputs, Σ_x = Q diag(eigenvalues) Qᵀ + rest·(I − QQᵀ).

    Full covariance: Q is d × d and ``rest`` unused (0). Probabilistic PCA (d > :data:`FULL_COVARIANCE_MAX_DIM`):
    Q is d × r and ``rest`` the mean of the other eigenvalues. Isotropic τ²I: Q is d × 0 and ``rest`` = τ².
    """

    mean: Tensor  # (d,)
    basis: Tensor  # (d, r), orthonormal columns
    eigenvalues: Tensor  # (r,), >= 0
    rest: float = 0.0

    @property
    def dim(self) -> int:
        return int(self.mean.numel())

    @property
    def trace(self) -> float:
        """tr Σ_x: the squared error of guessing the mean (in the model's input space)."""
        return float(self.eigenvalues.sum()) + self.rest * (self.dim - self.basis.shape[1])

    @property
    def variance(self) -> float:
        """τ², the mean per-value variance tr Σ_x / d."""
        return self.trace / self.dim

    @property
    def norm(self) -> float:
        """‖Σ_x‖₂, the largest variance along any direction."""
        top = float(self.eigenvalues.max()) if self.eigenvalues.numel() else 0.0
        return max(top, self.rest if self.basis.shape[1] < self.dim else 0.0)

    def _power(self, v: Tensor, p: float) -> Tensor:
        """Σ_x^p applied to the columns of ``v`` (d × m); p = 1/2 or 1 (no inverse, so a singular Σ_x is fine)."""
        q = self.basis.to(v)
        coef = q.T @ v
        out = q @ (self.eigenvalues.to(v).clamp_min(0).pow(p)[:, None] * coef)
        if self.rest and q.shape[1] < self.dim:
            out = out + self.rest ** p * (v - q @ coef)
        return out

    def sqrt_apply(self, v: Tensor) -> Tensor:
        """Σ_x^{1/2} v (columns of v)."""
        return self._power(v, 0.5)

    def apply(self, v: Tensor) -> Tensor:
        """Σ_x v (columns of v)."""
        return self._power(v, 1.0)

    def diagonal(self) -> Tensor:
        """The per-value variances diag Σ_x (d,)."""
        q = self.basis
        inside = q.pow(2).sum(1)
        return (q.pow(2) * self.eigenvalues.clamp_min(0)).sum(1) + self.rest * (1 - inside)

    def covariance(self) -> Tensor:
        """The dense d × d Σ_x (float64)."""
        return self.apply(torch.eye(self.dim, dtype=DTYPE))

    def sqrt(self) -> Tensor:
        """The dense d × d Σ_x^{1/2} (float64)."""
        return self.sqrt_apply(torch.eye(self.dim, dtype=DTYPE))

    def isotropic(self) -> GaussianPrior:
        """The same mean with τ²I, τ² = tr Σ_x / d (the weaker attacker of the τ² form)."""
        return isotropic_prior(self.mean, self.variance)


def isotropic_prior(mean: Tensor | float, variance: float, dim: int | None = None) -> GaussianPrior:
    """N(mean, τ²I): ``mean`` a (d,) tensor, or a scalar with ``dim`` given."""
    if not (variance >= 0 and math.isfinite(variance)):
        raise ConfigError(f"prior_variance must be a finite number >= 0, got {variance}")
    if not isinstance(mean, Tensor):
        if dim is None:
            raise ConfigError("isotropic_prior needs dim= when the mean is a scalar")
        mean = torch.full((dim,), float(mean), dtype=DTYPE)
    mean = mean.detach().reshape(-1).to(DTYPE)
    return GaussianPrior(mean=mean, basis=torch.zeros(mean.numel(), 0, dtype=DTYPE),
                         eigenvalues=torch.zeros(0, dtype=DTYPE), rest=float(variance))


def covariance_prior(mean: Tensor, covariance: Tensor, rank: int | None = None) -> GaussianPrior:
    """N(mean, Σ_x) from a dense covariance; ``rank`` keeps the top eigen-directions (PPCA remainder)."""
    d = mean.numel()
    if covariance.shape != (d, d):
        raise ConfigError(f"covariance must be {d} x {d} for a mean of {d} values, got {tuple(covariance.shape)}")
    cov = covariance.detach().to(DTYPE)
    e, q = torch.linalg.eigh((cov + cov.T) / 2)
    e = e.clamp_min(0)
    rest = 0.0
    if rank is not None and rank < d:
        rest = float(e[: d - rank].mean())
        e, q = e[d - rank:], q[:, d - rank:]
    return GaussianPrior(mean=mean.detach().reshape(-1).to(DTYPE), basis=q, eigenvalues=e, rest=rest)


def estimate_prior(samples: Tensor, *, full: bool | None = None, rank: int = PRIOR_RANK) -> GaussianPrior:
    """The Gaussian prior of a tensor of inputs (n, …) in the model's input space: their mean and covariance.

    ``full`` (default: d ≤ :data:`FULL_COVARIANCE_MAX_DIM`) keeps the full sample covariance (from fewer samples
    than values, as the directions they span: the same covariance, exactly); otherwise
    probabilistic PCA with ``rank`` directions (from a thin SVD of the centred samples, never a d × d matrix)
    and the mean of the remaining variance; ``full=False`` with ``rank=0`` gives τ²I.
    """
    if samples.dim() < 2 or samples.shape[0] < 2:
        raise ConfigError(f"estimate_prior needs at least 2 samples (n, ...), got shape {tuple(samples.shape)}")
    x = samples.detach().reshape(samples.shape[0], -1).to(DTYPE)
    n, d = x.shape
    mean = x.mean(0)
    xc = x - mean
    full = d <= FULL_COVARIANCE_MAX_DIM if full is None else full
    if full and n <= d:  # rank < n: the samples' thin SVD is the whole covariance (n²d work, not a d × d eigh)
        _, sv, vh = torch.linalg.svd(xc, full_matrices=False)
        return GaussianPrior(mean=mean, basis=vh.T.contiguous(), eigenvalues=sv.pow(2) / (n - 1))
    if full:
        return covariance_prior(mean, xc.T @ xc / (n - 1))
    total = float(xc.pow(2).sum()) / (n - 1)
    if rank <= 0:
        return isotropic_prior(mean, total / d)
    _, sv, vh = torch.linalg.svd(xc, full_matrices=False)
    r = min(rank, int(sv.numel()), d - 1)
    e = sv[:r].pow(2) / (n - 1)
    rest = max(total - float(e.sum()), 0.0) / (d - r)
    return GaussianPrior(mean=mean, basis=vh[:r].T.contiguous(), eigenvalues=e, rest=rest)


PPCA_MAX_SAMPLES = 10_000  # samples the PPCA prior's thin SVD uses (a full covariance streams every sample)


def prior_from_dataset(dataset: torch.utils.data.Dataset, *, max_samples: int | None = None, batch_size: int = 512,
                       full: bool | None = None, rank: int = PRIOR_RANK) -> GaussianPrior:
    """:func:`estimate_prior` over a dataset of ``(x, y)`` items (the first ``max_samples`` when set).

    The full covariance streams the data (sum and Σxxᵀ in float64: d² memory, never n × d); PPCA takes a thin
    SVD of at most :data:`PPCA_MAX_SAMPLES` samples."""
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    d = int(dataset[0][0].numel())
    full = d <= FULL_COVARIANCE_MAX_DIM if full is None else full
    if not full:
        n = min(n, PPCA_MAX_SAMPLES)
    in_memory = _inputs_in_memory(dataset, n)
    if in_memory is not None:  # a tensor dataset: its inputs in batches, without a loader's per-item calls
        batches = [(in_memory[s: s + batch_size],) for s in range(0, n, batch_size)]
    else:
        batches = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    if not full or n <= d:  # PPCA, or fewer samples than values (a d × d covariance would be mostly zeros)
        xs = torch.cat([batch[0].reshape(batch[0].shape[0], -1).to(DTYPE) for batch in batches])
        return estimate_prior(xs, full=full, rank=rank)
    if n < 2:
        raise ConfigError(f"a data prior needs at least 2 samples, the dataset has {n}")
    total = torch.zeros(d, dtype=DTYPE)
    outer = torch.zeros(d, d, dtype=DTYPE)
    for batch in batches:
        x = batch[0].reshape(batch[0].shape[0], -1).to(DTYPE)
        total += x.sum(0)
        outer += x.T @ x
    mean = total / n
    return covariance_prior(mean, (outer - n * torch.outer(mean, mean)) / (n - 1))


def _inputs_in_memory(dataset: torch.utils.data.Dataset, n: int) -> Tensor | None:
    """The first ``n`` inputs of a ``TensorDataset`` (or of a ``Subset`` of one) as one tensor, else None."""
    indices = None
    if isinstance(dataset, torch.utils.data.Subset):
        dataset, indices = dataset.dataset, torch.as_tensor(list(dataset.indices[:n]), dtype=torch.long)
    if not isinstance(dataset, torch.utils.data.TensorDataset):
        return None
    inputs = dataset.tensors[0]
    return inputs[:n] if indices is None else inputs[indices]


def value_scale(std: Sequence[float], input_shape: Sequence[int]) -> Tensor:
    """The per-value std of a (C, H, W) input (the datamodule's per-channel normalisation), flattened: multiplying
    normalised errors by it gives [0, 1]-pixel errors, exactly per channel."""
    c = int(input_shape[0])
    if len(std) not in (1, c):
        raise ConfigError(f"{len(std)} channel stds for an input with {c} channels")
    per_channel = torch.as_tensor(list(std) * (c if len(std) == 1 else 1), dtype=DTYPE)
    return per_channel.repeat_interleave(int(math.prod(input_shape[1:])))
