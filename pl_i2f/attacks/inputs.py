"""The attack's inputs: the released gradient, the batch shape, the pixel box, per-layer weights and the
labels the threat model grants or recovers (iDLG), checked and gathered into :class:`AttackInputs`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pl_i2f.attacks.config import AttackConfig, Bounds
from pl_i2f.errors import ConfigError
from pl_i2f.gradients import as_flat, trainable_parameters, unflatten


@dataclass(frozen=True)
class AttackInputs:
    """Everything one attack works on, checked against the model and the configuration."""

    model: nn.Module
    params: dict[str, Tensor]  #: the trainable parameters, by name
    target: Tensor  #: the released gradient, flat over ``params``
    weights: list[float] | None  #: per-parameter weights of the matching term (``None``: all 1)
    labels: Tensor | None  #: (B,) known or recovered labels; ``None`` when they are optimised
    shape: tuple[int, ...]  #: (B, C, H, W) of the dummy data
    box_bounds: tuple[Tensor, Tensor] | None  #: the box projected onto after every step (``None``: no box)
    bounds: tuple[Tensor, Tensor] | None  #: the valid pixel range, (C, 1, 1) each (``rand`` init)
    bn_layers: list[nn.Module]  #: BatchNorm layers of the prior (empty: no prior)
    optimize_labels: bool  #: DLG's joint soft-label optimisation
    label_mode: str  #: ``known``, ``idlg`` or ``optimize`` (``auto`` resolved)


def _released_gradient(model: nn.Module, target_grad: Any, params: Mapping[str, Tensor]) -> Tensor:
    """The released gradient as a flat vector over the trainable parameters.

    Accepts what :func:`pl_i2f.gradients.as_flat` accepts; a vector or list that also covers frozen
    parameters (``parameters_to_vector(model.parameters())`` of a partly frozen model) is cut down to
    the trainable entries.
    """
    all_params = list(model.named_parameters())
    n_all = sum(p.numel() for _, p in all_params)
    n_train = sum(p.numel() for p in params.values())
    if n_all != n_train:
        if isinstance(target_grad, Tensor) and target_grad.numel() == n_all:
            pieces = torch.split(target_grad.reshape(-1), [p.numel() for _, p in all_params])
            target_grad = [t for t, (_, p) in zip(pieces, all_params) if p.requires_grad]
        elif isinstance(target_grad, (list, tuple)) and len(target_grad) == len(all_params) != len(params):
            target_grad = [t for t, (_, p) in zip(target_grad, all_params) if p.requires_grad]
    try:
        flat = as_flat(target_grad, params)
    except ValueError as exc:
        raise ConfigError(f"target_grad does not match the model: {exc}") from None
    ref = next(iter(params.values()))
    return flat.detach().to(device=ref.device, dtype=ref.dtype)


def _batch_shape(input_shape: Sequence[int], labels: Tensor | None, batch_size: int | None) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise ConfigError(f"attack input_shape must be (B, C, H, W) or (C, H, W) of positive sizes, got {shape}")
    if len(shape) == 3:
        shape = ((int(labels.shape[0]) if labels is not None else batch_size or 1), *shape)
    if labels is not None and int(labels.shape[0]) != shape[0]:
        raise ConfigError(f"attack got {labels.shape[0]} labels for a batch of {shape[0]} (input_shape {shape})")
    if batch_size is not None and batch_size != shape[0]:
        raise ConfigError(f"attack batch_size={batch_size} contradicts input_shape/labels batch {shape[0]}")
    return shape


def _bounds(bounds: Bounds, channels: int, ref: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ConfigError(f"attack bounds must be a pair (lo, hi), got {bounds!r}")
    lo, hi = (torch.as_tensor(b, dtype=ref.dtype).to(ref.device) for b in bounds)
    try:
        lo = torch.broadcast_to(lo.reshape(-1, 1, 1) if lo.dim() == 1 else lo, (channels, 1, 1))
        hi = torch.broadcast_to(hi.reshape(-1, 1, 1) if hi.dim() == 1 else hi, (channels, 1, 1))
    except RuntimeError:
        raise ConfigError(
            f"attack bounds must be floats or tensors broadcastable to ({channels}, 1, 1), "
            f"got shapes {tuple(lo.shape)} and {tuple(hi.shape)}"
        ) from None
    if not bool((lo < hi).all()):
        raise ConfigError("attack bounds need lo < hi in every channel")
    return lo, hi


def _layer_weights(weights: Any, params: Mapping[str, Tensor]) -> list[float] | None:
    """One weight per trainable parameter tensor (``None`` when all are 1)."""
    if weights is None:
        return None
    names = list(params)
    if isinstance(weights, Mapping):
        unknown = set(weights) - set(names)
        if unknown:
            raise ConfigError(f"attack layer_weights name unknown parameters: {', '.join(sorted(unknown))}")
        per_param = [float(weights.get(n, 1.0)) for n in names]
    else:
        per_param = [float(w) for w in weights]
        if len(per_param) != len(names):
            raise ConfigError(
                f"attack layer_weights has {len(per_param)} entries; the model has {len(names)} trainable tensors"
            )
    if any(not (math.isfinite(w) and w >= 0) for w in per_param) or not any(w > 0 for w in per_param):
        raise ConfigError("attack layer_weights must be finite, >= 0, and not all 0")
    return per_param


def idlg_label(model: nn.Module, target_grad: Any) -> Tensor:
    """iDLG (Zhao et al., 2020): the label of a **single** sample from the released gradient.

    With cross-entropy, the last linear layer's weight gradient is (p − onehot(y)) hᵀ; for non-negative
    features h (after sigmoid/ReLU) only the true class's row sums to a negative number. The last
    layer is the last trainable 2-D parameter (e.g. ``fc.weight``). Returns a (1,) long tensor.
    """
    params = trainable_parameters(model)
    grads = unflatten(_released_gradient(model, target_grad, params), params)
    matrices = [g for g in grads.values() if g.dim() == 2]
    if not matrices:
        raise ConfigError("iDLG label recovery needs a final linear layer (a trainable 2-D weight)")
    return matrices[-1].sum(dim=1).argmin().reshape(1).to(torch.long)


def prepare_inputs(
    model: nn.Module, target_grad: Any, labels: Tensor | None, input_shape: Sequence[int], config: AttackConfig,
) -> AttackInputs:
    """Check the inputs of :func:`pl_i2f.attacks.invert` against ``model`` and ``config`` and resolve the label
    mode (``auto``; iDLG recovers a single sample's label here)."""
    params = {name: p.requires_grad_() for name, p in trainable_parameters(model).items()}
    if not params:
        raise ConfigError("the attacked model has no trainable parameters")
    ref = next(iter(params.values()))
    target = _released_gradient(model, target_grad, params)
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.dtype.is_floating_point:
            raise ConfigError(f"attack labels must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}")
        labels = labels.to(device=ref.device, dtype=torch.long)
    shape = _batch_shape(input_shape, labels, config.batch_size)
    batch = shape[0]
    weights = _layer_weights(config.layer_weights, params)
    box = bool(config.box)
    bounds = _bounds(config.bounds, shape[1], ref) if config.bounds is not None else None

    label_mode = config.label_mode
    if label_mode == "auto":
        label_mode = "known" if labels is not None else ("idlg" if batch == 1 else "optimize")
    if label_mode == "known" and labels is None:
        raise ConfigError("attack label_mode='known' needs labels; pass labels or label_mode='idlg'/'optimize'")
    if label_mode == "idlg":
        if batch != 1:
            raise ConfigError(f"iDLG label recovery works for batch size 1 only, got {batch}")
        labels = idlg_label(model, target)

    bn_layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    use_bn = config.bn > 0 and bool(bn_layers)
    if config.bn > 0 and not bn_layers:
        # stacklevel 3: the caller of invert
        warnings.warn("attack bn prior requested but the model has no BatchNorm layers; prior skipped", stacklevel=3)
    if use_bn and any(m.running_mean is None for m in bn_layers):
        raise ConfigError("attack bn prior needs BatchNorm layers that track running statistics")
    return AttackInputs(
        model=model, params=params, target=target, weights=weights, labels=labels, shape=shape,
        box_bounds=bounds if box else None, bounds=bounds, bn_layers=bn_layers if use_bn else [],
        optimize_labels=label_mode == "optimize", label_mode=label_mode,
    )
