"""The noise a training run releases, read in any Lightning project: this package's defense, an Opacus
``DPOptimizer`` found on the trainer, or explicit numbers — each described under the shared threat model
(:mod:`pl_i2f.threat`) at the step it is asked about.

Pure: a trainer and module are only read; every check raises a one-line :class:`pl_i2f.errors.ConfigError`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from pl_i2f.defenses.base import NoiseSampler, analysis_model
from pl_i2f.errors import ConfigError
from pl_i2f.gradients import flat_gradient
from pl_i2f.rng import analysis_generator
from pl_i2f.threat import NO_NOISE, SampleNoise


def _theta_like(model: nn.Module | None) -> Tensor | None:
    if model is None:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)


class NoiseSource:
    """What the training releases, read at each evaluation: :meth:`sample_noise` (the shared threat model's
    description) and, for the estimator and the audit today, the analysis side of a
    :class:`pl_i2f.defenses.Defense` — ``noise_std``, ``noise_sampler``, ``release``, ``max_grad_norm``,
    ``expected_batch_size`` — so it is passed wherever a defense is."""

    name = "none"
    #: the batch size that turns a σ-for-target into a noise multiplier (σ·B/C); 1 on the per-sample scale
    expected_batch_size: int | None = 1

    def __init__(self, noise: SampleNoise = NO_NOISE):
        self._noise = noise

    @property
    def max_grad_norm(self) -> float | None:
        return self.sample_noise(0).clip_norm

    def sample_noise(self, step: int, model: nn.Module | None = None) -> SampleNoise:
        return self._noise

    def noise_std(self, step: int) -> float | None:
        noise = self.sample_noise(step)
        return float(noise.std) if noise.isotropic else None

    def noise_sampler(self, step: int, model: nn.Module | None = None) -> NoiseSampler | None:
        noise = self.sample_noise(step, model)
        return None if noise.is_zero else noise.draws(_theta_like(model))

    def release(self, model: nn.Module, x: Tensor, y: Tensor, step: int = 0,
                generator: torch.Generator | None = None) -> Tensor:
        """One sample's released gradient under the threat model: its gradient, clipped to ``clip_norm`` when
        set, plus the noise (drawn from ``generator``)."""
        noise = self.sample_noise(step, model)
        g = flat_gradient(analysis_model(model), x, y)
        if noise.clip_norm is not None:
            g = g * (noise.clip_norm / (g.norm() + 1e-6)).clamp(max=1.0)  # Opacus' clipping factor
        if noise.is_zero:
            return g
        return g + noise.draws(g)(analysis_generator(generator, g.device)).to(g)

    def describe(self) -> dict[str, Any]:
        noise = self.sample_noise(0)
        return {"name": self.name, "noise_std": noise.std, "clip_norm": noise.clip_norm, "source": noise.source}


class DefenseNoise(NoiseSource):
    """This package's defense, read as its own description (the app's numbers, unchanged)."""

    def __init__(self, defense: Any, batch_of_one: bool = False):
        super().__init__()
        self.defense = defense
        self.name = defense.name
        self.batch_of_one = batch_of_one

    @property
    def max_grad_norm(self) -> float | None:
        return getattr(self.defense, "max_grad_norm", None)

    @property
    def expected_batch_size(self) -> int | None:  # type: ignore[override]
        return getattr(self.defense, "expected_batch_size", None)

    def sample_noise(self, step: int, model: nn.Module | None = None) -> SampleNoise:
        """The defense's own :meth:`pl_i2f.defenses.Defense.sample_noise` (DP-SGD: σC on the clipped gradient;
        Gaussian on the mean of B: Bσ; anisotropic: its covariance), ``batch_of_one`` as the source was built."""
        return self.defense.sample_noise(step, model, batch_of_one=self.batch_of_one)

    def noise_std(self, step: int) -> float | None:
        return self.defense.noise_std(step)

    def noise_sampler(self, step: int, model: nn.Module | None = None) -> NoiseSampler | None:
        return self.defense.noise_sampler(step, model)

    def release(self, model: nn.Module, x: Tensor, y: Tensor, step: int = 0,
                generator: torch.Generator | None = None) -> Tensor:
        return self.defense.release(model, x, y, step=step, generator=generator)

    def describe(self) -> dict[str, Any]:
        return self.defense.describe()


class OpacusNoise(NoiseSource):
    """An Opacus ``DPOptimizer``: σ (``noise_multiplier``), C (``max_grad_norm``) read at every call, so a noise
    schedule that changes the optimizer's σ is followed."""

    name = "opacus"

    def __init__(self, optimizer: Any):
        super().__init__()
        self.optimizer = optimizer

    def sample_noise(self, step: int, model: nn.Module | None = None) -> SampleNoise:
        sigma, clip = float(self.optimizer.noise_multiplier), float(self.optimizer.max_grad_norm)
        return SampleNoise(std=sigma * clip, clip_norm=clip, source="opacus")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "noise_multiplier": float(self.optimizer.noise_multiplier),
                "max_grad_norm": float(self.optimizer.max_grad_norm),
                "expected_batch_size": self.optimizer.expected_batch_size}


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer under Lightning's ``LightningOptimizer`` wrapper (``_optimizer``)."""
    seen = 0
    while hasattr(optimizer, "_optimizer") and seen < 8:
        optimizer, seen = optimizer._optimizer, seen + 1
    return optimizer


def find_dp_optimizer(trainer: Any) -> Any | None:
    """The trainer's Opacus ``DPOptimizer``, or ``None`` (also when Opacus is not installed)."""
    try:
        from opacus.optimizers import DPOptimizer
    except ImportError:
        return None
    for optimizer in getattr(trainer, "optimizers", None) or []:
        inner = unwrap_optimizer(optimizer)
        if isinstance(inner, DPOptimizer):
            return inner
    return None


def check_noise(noise_std: float | None, noise_multiplier: float | None, max_grad_norm: float | None,
                what: str) -> None:
    """At construction: the explicit noise arguments (σ ≥ 0 finite; a multiplier needs its clipping norm)."""
    for name, value in (("noise_std", noise_std), ("noise_multiplier", noise_multiplier)):
        if value is not None and not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
            raise ConfigError(f"{what}.{name} must be a finite number >= 0, got {value!r}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and 0 < max_grad_norm < math.inf):
        raise ConfigError(f"{what}.max_grad_norm must be a positive finite number, got {max_grad_norm!r}")
    if noise_std is not None and noise_multiplier is not None:
        raise ConfigError(f"{what}: give noise_std or noise_multiplier, not both")
    if noise_multiplier is not None and max_grad_norm is None:
        raise ConfigError(f"{what}.noise_multiplier needs max_grad_norm (the clipping norm C: σ = multiplier·C)")


def resolve_noise(pl_module: Any, trainer: Any, noise_std: float | None = None,
                  noise_multiplier: float | None = None, max_grad_norm: float | None = None, *,
                  batch_of_one: bool = False) -> NoiseSource:
    """In order: this package's defense on the module; an Opacus ``DPOptimizer`` on the trainer; explicit
    ``noise_std`` (on one sample's own gradient) or ``noise_multiplier`` × ``max_grad_norm``; else no noise
    (the estimates are per unit σ and the σ-for-target keys say what would be needed)."""
    from pl_i2f.defenses import Defense

    defense = getattr(pl_module, "defense", None)
    if isinstance(defense, Defense):
        return DefenseNoise(defense, batch_of_one=batch_of_one)
    optimizer = find_dp_optimizer(trainer)
    if optimizer is not None:
        return OpacusNoise(optimizer)
    if noise_multiplier is not None:
        source = NoiseSource(SampleNoise(std=noise_multiplier * max_grad_norm, clip_norm=max_grad_norm,
                                         source="explicit"))
    elif noise_std is not None:
        source = NoiseSource(SampleNoise(std=float(noise_std), clip_norm=max_grad_norm, source="explicit"))
    else:
        return NoiseSource(NO_NOISE)
    source.name = "explicit"
    return source

