"""What an attack returns (:class:`AttackResult`) and the loop's internal stop signals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class AttackResult:
    """What an attack produced, and under which threat model.

    ``x`` is always finite: on divergence it is the best finite iterate (or the initial dummy data).
    """

    x: Tensor  #: the reconstruction, (B, C, H, W) in the model's (normalised) input space, detached
    labels: Tensor  #: (B,) labels used or recovered (argmax of the soft labels when optimised)
    objective: float  #: the full attack objective (matching + regularisers) at ``x``
    gradient_distance: float  #: the gradient-matching term alone (l2 or 1 − cosine) at ``x``
    iterations: int  #: optimizer steps taken, summed over restarts (L-BFGS: outer steps)
    seconds: float  #: wall-clock time of the whole attack
    #: Gradient evaluations (objective and its input gradient: one forward and a double backward),
    #: summed over restarts — the attack's cost unit; L-BFGS takes up to ``lbfgs_max_iter`` per step.
    evaluations: int = 0
    failed: bool = False  #: the objective or its gradient became NaN/inf (or the target was not finite)
    reason: str | None = None  #: why it failed, one line
    #: What ended the attack (the last restart): one of :data:`STOP_REASONS`.
    stop_reason: str = "budget_iterations"
    restart: int = 0  #: index of the restart whose result was kept
    threat_model: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  #: resolved hyperparameters (loggable values)
    history: list[tuple[int, float]] = field(default_factory=list)  #: (iteration, objective), sparse

    def summary(self) -> dict[str, float]:
        """Scalars to log (``audit/…``): objective, gradient_distance, iterations, seconds, failed."""
        return {
            "objective": self.objective,
            "gradient_distance": self.gradient_distance,
            "iterations": float(self.iterations),
            "evaluations": float(self.evaluations),
            "seconds": self.seconds,
            "failed": float(self.failed),
            "converged": float(self.converged),
        }

    @property
    def converged(self) -> bool:
        """The attack stopped because it converged, not because a budget or the callback ended it."""
        return self.stop_reason == "converged"


class _Diverged(RuntimeError):
    """Internal: the objective or its gradient stopped being finite."""


class _Stop(Exception):
    """Internal: a budget or the progress callback ends the attack; ``args[0]`` is the stop reason."""

