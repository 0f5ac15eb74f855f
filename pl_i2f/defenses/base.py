"""The ``Defense`` contract: one object that perturbs training **and** describes what it releases.

"What the attacker sees" is defined once, here: :meth:`Defense.release` is the gradient an honest-
but-curious server observes for a batch at a given step. Training applies the same transformation
(:meth:`Defense.perturb_gradients_` on the model's ``.grad`` between backward and the optimizer
step, or an optimizer wrapper such as Opacus' ``DPOptimizer``), and the leakage estimator draws the
defense's own noise through :meth:`Defense.noise_sampler`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pl_i2f.gradients import flat_gradient

NoiseSampler = Callable[[torch.Generator], Tensor]


class Defense:
    """No defense: the clean averaged gradient is released. Base class of every defense."""

    name = "none"

    # -- training side ---------------------------------------------------------------------------
    def setup(self, module: Any, datamodule: Any | None) -> None:
        """Called once the module and datamodule are known (before optimizers are configured)."""

    def configure_optimizer(self, module: Any, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Return the optimizer training should use (DP-SGD wraps it; others return it unchanged)."""
        return optimizer

    def transform(self, gradient: Tensor, step: int, generator: torch.Generator | None = None) -> Tensor:
        """Map the clean averaged gradient (flat θ-vector) to the released one at ``step``."""
        return gradient

    def perturb_gradients_(self, model: nn.Module, step: int) -> None:
        """Apply :meth:`transform` in place to the ``.grad`` of the trainable parameters."""
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not params or type(self).transform is Defense.transform:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        released = self.transform(flat, step, self.training_generator(flat.device))
        torch.nn.utils.vector_to_parameters(released, [p.grad for p in params])

    def training_generator(self, device: torch.device) -> torch.Generator | None:
        """The generator training noise is drawn from (``None``: the defense draws nothing)."""
        return None

    def metrics(self, step: int) -> dict[str, float]:
        """Scalars to log (``privacy/epsilon``, ``defense/sigma`` …) at ``step``."""
        return {}

    # -- analysis side ---------------------------------------------------------------------------
    def release(self, model: nn.Module, x: Tensor, y: Tensor, step: int = 0,
                generator: torch.Generator | None = None) -> Tensor:
        """The gradient an attacker observes for batch ``(x, y)`` at ``step``, as a flat θ-vector
        ordered like ``parameters_to_vector(model.parameters())`` (trainable parameters)."""
        return self.transform(flat_gradient(model, x, y), step, generator)

    def noise_sampler(self, step: int) -> NoiseSampler | None:
        """A callable drawing one perturbation δ (flat θ-vector) as the defense adds it at ``step``;
        ``None`` when the defense adds no noise."""
        return None

    def describe(self) -> dict[str, Any]:
        """Parameters for the run's config and threat model."""
        return {"name": self.name}

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
