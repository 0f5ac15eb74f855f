"""The damping ε of (JJᵀ + εI)⁻¹ and the rule for "undamped, else damped with a warning".

I²F undamped (ε = 0) is defined only when JJᵀ is nonsingular. When it is not — d_x > d_θ, a smallest
eigenvalue at rounding level, or CG breaking down — the engine warns (:class:`InfluenceWarning`) and uses
ε = rcond·λ_max instead, so every answer is finite (the damped solution ≈ the pseudo-inverse one on every
direction with λᵢ ≫ ε). One :class:`Damping` carries the caller's request through every path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pl_i2f.influence.results import InfluenceWarning, warn_caller
from pl_i2f.influence.settings import default_rcond


def check_nonnegative(value: float, name: str) -> float:
    """``value`` as a float, or a ValueError naming ``name`` if it is negative or not finite."""
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


@dataclass(frozen=True)
class Damping:
    """ε = ``epsilon`` + ``relative``·median λ_max, and ``rcond``: eigenvalues ≤ rcond·λ_max count as zero.

    ``caller`` names the public function in warnings. Build it with :meth:`request` (validates, fills rcond)."""

    epsilon: float
    relative: float
    rcond: float
    caller: str

    @classmethod
    def request(cls, epsilon: float, *, d_x: int, dtype: torch.dtype, caller: str, relative: float = 0.0,
                rcond: float | None = None) -> Damping:
        return cls(
            epsilon=check_nonnegative(epsilon, "damping"),
            relative=check_nonnegative(relative, "relative_damping"),
            rcond=default_rcond(d_x, dtype) if rcond is None else float(rcond),
            caller=caller,
        )

    def at(self, lambda_max: Tensor) -> float:
        """The ε before any fallback, given every problem's λ_max (the relative part uses their median)."""
        if self.relative == 0:
            return self.epsilon
        return self.epsilon + self.relative * float(lambda_max.median())

    def zero_floor(self, lambda_max: Tensor | float) -> Tensor | float:
        """Eigenvalues at or below this count as zero: rcond·λ_max."""
        return self.rcond * lambda_max

    def node_floor(self, epsilon: float, lambda_max: Tensor) -> Tensor | float:
        """Quadrature nodes at or below this receive nothing from Jδ: the zero floor undamped (keeps 1/λ
        finite), none (−1) when damped. Shaped (N, 1, 1) for N problems' (N, p, m) nodes."""
        return self.zero_floor(lambda_max).reshape(-1, 1, 1) if epsilon == 0 else -1.0

    def fallback(self, lambda_max: float, reason: str) -> float:
        """Warn that JJᵀ is singular for ``reason`` and return the ε used instead: rcond·λ_max."""
        fallback_epsilon = self.rcond * lambda_max if lambda_max > 0 else 1.0
        warn_caller(
            f"{self.caller}: JJᵀ is rank-deficient or ill-conditioned ({reason}); the undamped I²F is not "
            f"defined there, so damping ε = rcond·λ_max = {fallback_epsilon:.3g} is used. Pass damping > 0 (paper "
            "default 1) to choose it yourself.",
            InfluenceWarning,
        )
        return float(fallback_epsilon)

    def resolve(self, d_x: int, d_theta: int, lambda_max: Tensor | Callable[[], float],
                lambda_min: Tensor | None = None) -> float:
        """The ε to use for N problems: ``at(λ_max)`` when positive; else, when some JJᵀ is singular (d_x > d_θ,
        or λ_min ≤ rcond·λ_max), the warned fallback; else 0. ``lambda_max`` may be a callable, evaluated only
        when a fallback scale is needed (it may cost a Lanczos run)."""
        epsilon = self.epsilon if callable(lambda_max) else self.at(lambda_max)
        if epsilon > 0:
            return epsilon
        reason = None
        if d_x > d_theta:
            reason = f"d_x = {d_x} > d_θ = {d_theta}, so JJᵀ has at least {d_x - d_theta} zero eigenvalues"
        elif lambda_min is not None and not callable(lambda_max):
            singular = lambda_min <= self.zero_floor(lambda_max)
            if bool(singular.any()):
                if singular.numel() == 1:
                    ratio = float(lambda_min.reshape(-1)[0] / lambda_max.reshape(-1)[0])
                    reason = f"λ_min/λ_max = {ratio:.3g} <= rcond = {self.rcond:.3g} (numerically singular)"
                else:
                    reason = f"{int(singular.sum())} of {singular.numel()} samples have a numerically singular JJᵀ"
        if reason is None:
            return 0.0
        scale = lambda_max() if callable(lambda_max) else float(lambda_max.max())
        return self.fallback(scale, reason)
