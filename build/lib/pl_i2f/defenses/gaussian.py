"""``gaussian``: optional clipping of the averaged gradient, then isotropic noise N(0, σ_t² I).

Released gradient g = clip_C(ḡ) + δ with ḡ the batch-mean gradient, clip_C(ḡ) = ḡ · min(1, C/‖ḡ‖) when
``clip`` = C is set, δ ~ N(0, σ_t² I_θ) and σ_t = ``sigma`` · f(t) from the noise schedule. σ is an absolute
std per coordinate of the averaged gradient (no privacy accounting: this is not DP, since the batch-level
clipping bounds the batch's contribution, not one sample's). E‖δ‖² = σ_t² d_θ is the energy the
``anisotropic`` defense matches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pl_i2f.defenses.base import (
    Defense,
    NoiseSampler,
    check_clip,
    check_sigma,
)
from pl_i2f.defenses.schedules import NoiseSchedule
from pl_i2f.rng import randn


def clip_norm(gradient: Tensor, clip: float | None) -> Tensor:
    """ḡ · min(1, C/‖ḡ‖) (unchanged when ``clip`` is None)."""
    if clip is None:
        return gradient
    norm = gradient.norm()
    return gradient * torch.clamp(clip / (norm + 1e-12), max=1.0)


class NoisyDefense(Defense):
    """Shared by the noisy non-DP defenses: base σ, schedule, optional clipping, training generator."""

    def __init__(self, sigma: float = 0.01, clip: float | None = None,
                 schedule: NoiseSchedule | Mapping[str, Any] | str | None = None, seed: int = 0):
        super().__init__(seed=seed)
        check_sigma(sigma, f"defense.sigma ({self.name})")
        check_clip(clip, f"defense.clip ({self.name})")
        self.sigma = float(sigma)
        self.clip = None if clip is None else float(clip)
        self.schedule = NoiseSchedule.from_config(schedule)

    def setup(self, module: Any, datamodule: Any | None) -> None:
        super().setup(module, datamodule)
        self.schedule = self.schedule.bind(total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                                           base=self.sigma)

    def sigma_at(self, step: int) -> float:
        """σ_t: the noise std per coordinate of the averaged gradient at ``step``."""
        return self.schedule(self.sigma, step)

    def metrics(self, step: int) -> dict[str, float]:
        return {"defense/sigma": self.sigma_at(step)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "sigma": self.sigma, "clip": self.clip, "schedule": self.schedule.describe(),
                "seed": self.seed}


class GaussianDefense(NoisyDefense):
    """Clip the averaged gradient to ``clip`` (optional), add N(0, σ_t² I). See the module docstring."""

    name = "gaussian"

    def _noise(self, step: int, n: int, generator: torch.Generator, like: Tensor) -> Tensor:
        return self.sigma_at(step) * randn(n, generator, like)

    def transform(self, gradient: Tensor, step: int, generator: torch.Generator | None = None,
                  sizes: Sequence[int] | None = None) -> Tensor:
        g = clip_norm(gradient, self.clip)
        if self.sigma_at(step) == 0:
            return g
        gen = generator if generator is not None else self.training_generator(gradient.device)
        return g + self._noise(step, g.numel(), gen, g)

    def noise_sampler(self, step: int, model: nn.Module | None = None) -> NoiseSampler | None:
        if self.sigma_at(step) == 0:
            return None
        n = sum(self._layout(model))
        like = self._like(model)
        return lambda generator: self._noise(step, n, generator, like)

    def noise_std(self, step: int) -> float | None:
        return self.sigma_at(step)
