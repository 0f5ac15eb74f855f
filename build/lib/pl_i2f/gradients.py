"""Functional gradients of a classifier's loss: the single definition of "the gradient of a batch".

Every analysis in pl_i2f (the I²F engine, the attacks, the defenses' ``release``) evaluates the model
through these helpers so that they agree on

* which parameters count: the *trainable* ones, in ``model.parameters()`` order — the same order as
  ``torch.nn.utils.parameters_to_vector(p for p in model.parameters() if p.requires_grad)``;
* how the model is run: functionally (``torch.func.functional_call``) with detached parameters and
  buffers, **as in eval mode** (BatchNorm uses running statistics, dropout is off);
* the loss: mean cross-entropy with the true labels unless a ``loss_fn`` is given.

None of them changes the model: no ``.grad`` is written, no buffer is updated, the ``training`` flags
are restored, and nothing is drawn from the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

LossFn = Callable[[Tensor, Tensor], Tensor]
ParamDict = dict[str, Tensor]


def default_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy with the true labels (hard labels, or soft labels as probabilities)."""
    return F.cross_entropy(logits, y)


def trainable_parameters(model: nn.Module) -> ParamDict:
    """Detached trainable parameters by name, in ``model.parameters()`` order."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def frozen_state(model: nn.Module) -> ParamDict:
    """Detached buffers and non-trainable parameters: what a functional call holds fixed."""
    state = {name: b.detach() for name, b in model.named_buffers()}
    state.update({name: p.detach() for name, p in model.named_parameters() if not p.requires_grad})
    return state


def flatten(tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """Concatenate tensors (a dict in its insertion order, or a sequence) into one flat vector."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return torch.cat([t.reshape(-1) for t in values])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> ParamDict:
    """Split a flat vector into tensors shaped like ``like`` (inverse of :func:`flatten`)."""
    expected = sum(t.numel() for t in like.values())
    if vector.dim() != 1 or vector.numel() != expected:
        raise ValueError(f"expected a flat vector of {expected} elements, got shape {tuple(vector.shape)}")
    out: ParamDict = {}
    offset = 0
    for name, t in like.items():
        out[name] = vector[offset : offset + t.numel()].view_as(t)
        offset += t.numel()
    return out


def as_flat(vector: Tensor | Mapping[str, Tensor] | Sequence[Tensor], like: Mapping[str, Tensor]) -> Tensor:
    """Accept a θ-space vector as a flat tensor, a name → tensor dict, or a per-parameter list."""
    if isinstance(vector, Tensor):
        flat = vector.reshape(-1)
    elif isinstance(vector, Mapping):
        missing = set(like) - set(vector)
        if missing:
            raise ValueError(f"θ-vector dict lacks parameters: {', '.join(sorted(missing))}")
        flat = flatten([vector[name] for name in like])
    else:
        flat = flatten(list(vector))
    expected = sum(t.numel() for t in like.values())
    if flat.numel() != expected:
        raise ValueError(f"θ-vector has {flat.numel()} elements, the model has {expected} trainable ones")
    return flat


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own ``training`` flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def batch_loss_fn(model: nn.Module, loss_fn: LossFn | None = None) -> Callable[[ParamDict, Tensor, Tensor], Tensor]:
    """``(params, x, y) ↦ L(x, θ)``: the model run functionally with its frozen state held fixed.

    Call it inside :func:`eval_mode`; ``functional_call`` honours each module's ``training`` flag.
    """
    loss = loss_fn or default_loss
    state = frozen_state(model)

    def fn(params: ParamDict, x: Tensor, y: Tensor) -> Tensor:
        return loss(functional_call(model, {**state, **params}, (x,)), y)

    return fn


def loss_gradient(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn | None = None) -> ParamDict:
    """∇_θ L(x, θ) by name, computed functionally in eval mode (the clean gradient g₀)."""
    with eval_mode(model):
        return grad(batch_loss_fn(model, loss_fn))(trainable_parameters(model), x, y)


def flat_gradient(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn | None = None) -> Tensor:
    """∇_θ L(x, θ) as one flat vector ordered like ``parameters_to_vector(trainable params)``."""
    return flatten(loss_gradient(model, x, y, loss_fn))


def per_sample_gradients(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn | None = None) -> Tensor:
    """Per-sample gradients ∇_θ L(x_i, θ) as a (B, d_θ) matrix (``torch.func.vmap``, eval mode)."""
    fn = batch_loss_fn(model, loss_fn)

    def one(params: ParamDict, xi: Tensor, yi: Tensor) -> Tensor:
        return flatten(grad(fn)(params, xi.unsqueeze(0), yi.unsqueeze(0)))

    with eval_mode(model):
        return torch.func.vmap(one, in_dims=(None, 0, 0))(trainable_parameters(model), x, y)
