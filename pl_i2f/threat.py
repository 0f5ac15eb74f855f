"""The one threat model every leakage number, the audit, σ-for-target and the DP bound share.

The attacker sees **one sample's contribution** to what training releases, with everything else known. So
the noise that protects sample i is the release's noise measured relative to that sample's own gradient gᵢ:

* DP-SGD (Opacus): the mean (Σⱼ clip_C(gⱼ) + N(0, σ²C²I)) / B, i.e. clip_C(gᵢ) + N(0, σ²C²I) on the
  sample's own, **clipped** gradient — the view the ε accounting takes;
* Gaussian noise σ on the mean gradient of a batch of B: gᵢ + N(0, B²σ²I);
* anisotropic noise: the same with its covariance σ²(stuff along the defense's own directions);
* no noise: exact recovery to first order; only the σ needed for a target is meaningful.

DLG's federated "batch of one" (noise σ on a single sample's gradient, no 1/B) is a named option
(``batch_of_one=True``), never the silent default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pl_i2f.errors import ConfigError
from pl_i2f.rng import randn

#: draws one flat θ-vector of a defense's noise from the given generator
NoiseSampler = Callable[[torch.Generator], Tensor]


@dataclass(frozen=True)
class SampleNoise:
    """The noise on one sample's own gradient under the shared threat model.

    Covariance ``std² I + basis · diag(extra_variance) · basisᵀ`` (``basis`` a d_θ × k matrix with
    orthonormal columns, ``extra_variance`` k values ≥ 0), added to the sample's gradient, which is first
    clipped to norm ``clip_norm`` when that is set (DP-SGD). ``sampler`` draws the same noise when the
    covariance is not known in closed form (Monte Carlo fallback). ``source`` says where the description came
    from ("none", "gaussian", "dpsgd", "anisotropic", "opacus", "explicit", …), for logs.
    """

    std: float = 0.0
    clip_norm: float | None = None
    basis: Tensor | None = None
    extra_variance: Tensor | None = None
    sampler: NoiseSampler | None = None
    source: str = "none"
    batch_of_one: bool = False

    def __post_init__(self) -> None:
        if not self.std >= 0:
            raise ConfigError(f"noise std must be >= 0, got {self.std}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"clip_norm must be > 0 when set, got {self.clip_norm}")
        if (self.basis is None) != (self.extra_variance is None):
            raise ConfigError("SampleNoise needs basis and extra_variance together")

    @property
    def isotropic(self) -> bool:
        """True when the covariance is std²·I (no directional part, no sampler-only noise)."""
        return self.basis is None and self.sampler is None

    @property
    def is_zero(self) -> bool:
        """True when nothing is added: the gradient pins the input down to first order."""
        return self.std == 0 and self.basis is None and self.sampler is None

    @property
    def per_unit(self) -> bool:
        """The paper's estimators need a σ: with no noise they report per unit σ (σ = 1 stands in)."""
        return self.is_zero

    def draws(self, like: Tensor | None = None) -> NoiseSampler:
        """Draws of this noise as flat θ-vectors: its own ``sampler`` when it has one, else std·N(0, I) plus the
        directional part; ``like`` (any θ-vector) gives the size when only ``std`` is set."""
        if self.sampler is not None:
            return self.sampler
        if self.basis is None and like is None:
            raise ValueError("isotropic noise needs the model (its number of parameters) to draw from")
        std, basis, extra = self.std, self.basis, self.extra_variance

        def draw(generator: torch.Generator) -> Tensor:
            ref = basis if basis is not None else like
            delta = std * randn(ref.shape[0] if basis is not None else ref.numel(), generator, ref)
            if basis is not None:
                scale = extra.to(basis).clamp_min(0).sqrt()
                delta = delta + basis @ (scale * randn(len(scale), generator, basis))
            return delta

        return draw


NO_NOISE = SampleNoise()


# -- what DP-SGD releases: the clipped gradient, and so its Jacobian --------------------------------------
def clipped_jacobian(jacobian: Tensor, gradient: Tensor, clip: float) -> Tensor:
    """The Jacobian of clip_C(g) = g·min(1, C/‖g‖): (C/‖g‖)(I − ĝĝᵀ)J where ‖g‖ > C, J otherwise.

    ``jacobian`` (…, d_θ, d_x), ``gradient`` (…, d_θ) the unclipped per-sample gradient."""
    norm = gradient.norm(dim=-1, keepdim=True)
    unit = gradient / norm.clamp_min(torch.finfo(gradient.dtype).tiny)
    projected = jacobian - unit[..., :, None] * (unit[..., None, :] @ jacobian)
    clipped = (norm > clip)[..., None]
    return torch.where(clipped, (clip / norm)[..., None] * projected, jacobian)


def clipped_gram(gram: Tensor, jtg: Tensor, grad_norm: Tensor, clip: float) -> Tensor:
    """G_c = (C/‖g‖)²(G − vvᵀ), v = Jᵀg/‖g‖, where ‖g‖ > C; G otherwise. Needs only the x-side Gram
    G = JᵀJ (…, d_x, d_x), Jᵀg (…, d_x) and ‖g‖ (…), so a Gram-only engine can price DP-SGD's clipping."""
    norm = torch.as_tensor(grad_norm, dtype=gram.dtype, device=gram.device)
    v = jtg / norm[..., None].clamp_min(torch.finfo(gram.dtype).tiny)
    projected = (clip / norm)[..., None, None] ** 2 * (gram - v[..., :, None] * v[..., None, :])
    return torch.where((norm > clip)[..., None, None], projected, gram)
