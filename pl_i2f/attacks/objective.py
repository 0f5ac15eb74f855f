"""The attack's objective: gradient matching (l2 or cosine, per-layer weights) plus the image priors (total
variation, image norm, BatchNorm statistics), and its gradient with respect to the dummy data."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from pl_i2f.attacks.config import AttackConfig
from pl_i2f.attacks.inputs import AttackInputs
from pl_i2f.gradients import batch_loss_fn, unflatten


def _total_variation(x: Tensor) -> Tensor:
    """Anisotropic TV as in Inverting Gradients: mean |Δ_w x| + mean |Δ_h x|."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


class Objective:
    """The attack objective at given dummy data (and dummy label logits when labels are optimised)."""

    def __init__(self, inputs: AttackInputs, config: AttackConfig):
        self.config = config
        self.params = inputs.params
        self.param_list = list(inputs.params.values())
        # Per-layer terms: the target is kept split like the parameters, so no d_θ-long vector is ever
        # concatenated (on resnet18 the cat, its backward and the elementwise passes cost ~25% of a step).
        self.targets = list(unflatten(inputs.target, inputs.params).values())
        self.weights = inputs.weights if inputs.weights is not None else [1.0] * len(self.targets)
        self.labels = inputs.labels
        self.bn_layers = inputs.bn_layers
        self.loss = batch_loss_fn(inputs.model, config.loss_fn)
        self.target_sq = sum(w * t.pow(2).sum() for w, t in zip(self.weights, self.targets))  # ‖g‖²_w, fixed
        self.bn_stats: list[tuple[Tensor, Tensor]] = []

    def matching(self, grads: Sequence[Tensor | None]) -> Tensor:
        """l2: Σ_l w_l ‖∇_l − g_l‖²;  cosine: 1 − Σ_l w_l <∇_l, g_l> / √(Σ_l w_l ‖∇_l‖² · Σ_l w_l ‖g_l‖²)."""
        pairs = [(w, d, t) for w, d, t in zip(self.weights, grads, self.targets) if w != 0]
        if self.config.objective == "l2":
            # a parameter the loss does not reach has gradient 0: its term is ‖g_l‖²
            return sum(w * ((d - t) if d is not None else t).pow(2).sum() for w, d, t in pairs)
        dot = sum(w * (d * t).sum() for w, d, t in pairs if d is not None)
        dd = sum(w * d.pow(2).sum() for w, d, t in pairs if d is not None)
        # clamp (not +eps) keeps the gradient finite if the dummy gradient is exactly zero
        return 1 - dot / (dd * self.target_sq).clamp_min(1e-30).sqrt()

    def hook_batchnorm(self) -> list[RemovableHandle]:
        """Record the batch statistics entering each BatchNorm layer of the prior; remove the handles after."""
        return [m.register_forward_hook(self._bn_hook) for m in self.bn_layers]

    def _bn_hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        h = inputs[0]
        dims = [0, *range(2, h.dim())]
        self.bn_stats.append((h.mean(dims), h.var(dims, unbiased=False)))

    def _bn_prior(self) -> Tensor:
        norm = torch.linalg.vector_norm
        return sum(
            norm(mean - m.running_mean) + norm(var - m.running_var)
            for m, (mean, var) in zip(self.bn_layers, self.bn_stats)
        )

    def _soft_labels(self, label_logits: Tensor | None) -> Tensor:
        return self.labels if label_logits is None else F.softmax(label_logits, dim=-1)

    def evaluate(self, x: Tensor, label_logits: Tensor | None, need_grad: bool = True) -> tuple[Tensor, Tensor]:
        """(matching term, full objective) at ``x``; with ``need_grad`` also sets ``x.grad`` (and labels')."""
        cfg = self.config
        self.bn_stats.clear()
        with torch.enable_grad():
            loss = self.loss(self.params, x, self._soft_labels(label_logits))
            grads = torch.autograd.grad(loss, self.param_list, create_graph=need_grad, allow_unused=True)
            match = self.matching(grads)
            total = match
            if cfg.tv > 0:
                total = total + cfg.tv * _total_variation(x)
            if cfg.l2 > 0:
                total = total + cfg.l2 * torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).mean()
            if self.bn_layers:
                total = total + cfg.bn * self._bn_prior()
            if need_grad:
                inputs = [x] if label_logits is None else [x, label_logits]
                if not total.requires_grad:  # e.g. a zero target with no path to x: nothing to follow
                    grads_in = [torch.zeros_like(t) for t in inputs]
                else:
                    grads_in = torch.autograd.grad(total, inputs, allow_unused=True)
                for t, g in zip(inputs, grads_in):
                    t.grad = torch.zeros_like(t) if g is None else g.detach()
        return match.detach(), total.detach()
