"""``pruning``: gradient magnitude pruning (Zhu et al. 2019's "gradient sparsification" defense).

The released gradient keeps the largest-magnitude entries of the averaged gradient ḡ and zeroes the rest:
g = m ⊙ ḡ with m ∈ {0,1}^d_θ. ``ratio`` ∈ [0, 1) is the fraction zeroed — over all parameters at once
(``scope=global``: keep the top ⌈(1−ratio)·d_θ⌉ |ḡᵢ|) or within each parameter tensor (``scope=per_layer``).
Deterministic: no noise is drawn, so :meth:`noise_sampler` is ``None``; the perturbation δ = (m − 1) ⊙ ḡ
depends on the batch and is what :meth:`release` − clean gradient gives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pl_i2f.defenses.base import Defense
from pl_i2f.errors import ConfigError, unknown_name
from pl_i2f.registry import PRUNING_SCOPES as SCOPES


def magnitude_mask(values: Tensor, ratio: float) -> Tensor:
    """Boolean mask keeping the ⌈(1−ratio)·n⌉ largest |values| (ties broken by ``topk``'s order)."""
    n = values.numel()
    keep = n - math.floor(ratio * n)
    mask = torch.zeros(n, dtype=torch.bool, device=values.device)
    if keep > 0:
        mask[values.abs().topk(keep, sorted=False).indices] = True
    return mask


class PruningDefense(Defense):
    """Zero the ``ratio`` smallest-magnitude gradient entries, globally or per parameter tensor."""

    name = "pruning"

    def __init__(self, ratio: float = 0.9, scope: str = "global", seed: int = 0):
        super().__init__(seed=seed)
        if not (0 <= ratio < 1):
            raise ConfigError(f"defense.ratio (fraction of gradient entries pruned) must be in [0, 1), got {ratio}")
        if scope not in SCOPES:
            raise unknown_name("pruning scope", scope, SCOPES)
        self.ratio = float(ratio)
        self.scope = scope

    def transform(self, gradient: Tensor, step: int, generator: torch.Generator | None = None,
                  sizes: Sequence[int] | None = None) -> Tensor:
        if self.ratio == 0:
            return gradient
        if self.scope == "global" or sizes is None:
            if self.scope == "per_layer":
                raise ValueError("per_layer pruning needs the parameter sizes of the flat gradient")
            return gradient * magnitude_mask(gradient, self.ratio)
        if sum(sizes) != gradient.numel():
            raise ValueError(f"parameter sizes sum to {sum(sizes)}, the gradient has {gradient.numel()} entries")
        chunks = torch.split(gradient, list(sizes))
        return torch.cat([c * magnitude_mask(c, self.ratio) for c in chunks])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "ratio": self.ratio, "scope": self.scope}
