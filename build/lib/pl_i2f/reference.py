"""Published attack loops exactly as their authors ran them, to hold ``pl_i2f.attacks`` against (tests,
benchmarks). Not for use as attacks: they have no budgets, stops or bounds."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class OriginalDLG:
    """The DLG loop of Zhu et al. (2019), labels known: ``torch.optim.LBFGS`` with lr 1 and torch's defaults (up
    to 20 inner iterations per outer step), squared-L2 matching of the gradient ``target``, from ``start``.
    :meth:`step` takes one outer step; ``evaluations`` counts closure calls (torch repeats one per step)."""

    def __init__(self, model: nn.Module, target: Sequence[Tensor], labels: Tensor, start: Tensor):
        self.model, self.target, self.labels = model, list(target), labels
        self.dummy = start.detach().clone().requires_grad_()
        self.optimizer = torch.optim.LBFGS([self.dummy], lr=1)
        self.evaluations = 0

    def _closure(self) -> Tensor:
        self.evaluations += 1
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(self.dummy), self.labels)
        grads = torch.autograd.grad(loss, list(self.model.parameters()), create_graph=True)
        diff = sum(((g - t) ** 2).sum() for g, t in zip(grads, self.target))
        diff.backward()
        return diff

    def step(self) -> None:
        self.optimizer.step(self._closure)

    @property
    def x(self) -> Tensor:
        return self.dummy.detach()


__all__ = ["OriginalDLG"]
