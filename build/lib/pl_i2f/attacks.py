"""Gradient-inversion attacks: rebuild a private batch from the gradient that training released.

One configurable attack covers the usual family; named presets pick the published settings:

=======================  ==========================================================================
preset                   what it is
=======================  ==========================================================================
``dlg``                  Deep Leakage from Gradients (Zhu et al., 2019): squared L2 distance of
                         gradients, L-BFGS (lr 1), ``randn`` init, no box, no prior.
``inverting_gradients``  Inverting Gradients (Geiping et al., 2020): 1 − cosine similarity over all
                         layers jointly, Adam on **signed** gradients (lr 0.1) with MultiStepLR at
                         3/8, 5/8, 7/8 of the iterations, box constraint, total variation.
``gradinversion``        GradInversion (Yin et al., 2021) / DeepInversion prior: L2 (or cosine)
                         matching plus the BatchNorm-statistics prior, TV and an image-norm prior,
                         Adam (lr 0.1), box constraint. (The paper's multi-seed group consistency
                         term is not implemented.)
=======================  ==========================================================================

Entry point: :func:`invert` (``invert(model, target_grad, labels, input_shape, preset="dlg",
**overrides) -> AttackResult``). Every key of :class:`AttackConfig` is an override; the Hydra group
``conf/attack/`` holds the same keys.

Conventions (``DESIGN.md``): the attacker runs the model **in eval mode** through
:mod:`pl_i2f.gradients` (BatchNorm uses running statistics); the model is never changed — no
``.grad`` is left on its parameters, no buffer is updated, every ``training`` flag is restored — and
nothing is drawn from the global RNG (dummy data comes from a ``torch.Generator`` seeded with
``seed``).

Shapes: ``input_shape`` is ``(B, C, H, W)``, or ``(C, H, W)`` with the batch size taken from
``labels`` (or the ``batch_size`` override, default 1 when the labels are to be recovered).

Budgets and stopping (what ends an attack is :attr:`AttackResult.stop_reason`, one of
:data:`STOP_REASONS`; its cost is :attr:`AttackResult.evaluations`, one evaluation = the objective and
its input gradient, i.e. one forward pass and a double backward):

* ``iterations`` counts optimizer steps. Adam evaluates once per step. L-BFGS follows DLG's semantics:
  each of the ``iterations`` *outer* steps runs torch's ``LBFGS.step`` with up to ``lbfgs_max_iter``
  (20) inner iterations, ending an inner loop early on torch's tolerances (|Δobjective| or max |step|
  ≤ ``lbfgs_tolerance_change``, max |gradient| ≤ ``lbfgs_tolerance_grad``). The points visited are the
  original DLG loop's, point by point; the evaluation torch repeats at the start of every step (the
  point where the previous step ended) is served from a cache, so it costs nothing.
* L-BFGS stops as ``converged`` when a step makes no move (gradient below tolerance or no descent
  direction left): its state is then unchanged, so the original loop would stand still for every
  remaining step. Easy cases finish early; hard ones get up to ``iterations × lbfgs_max_iter`` moves.
* ``max_evaluations`` and ``max_seconds`` cap the whole attack (all restarts); they are checked before
  every evaluation (``budget_evaluations``, ``budget_time``). ``progress_callback(iteration, objective)``
  is called every ``progress_every`` steps and may stop the attack by returning ``True``.
* The box projection is applied after every step.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pl_i2f.errors import ConfigError, unknown_name
from pl_i2f.gradients import LossFn, as_flat, batch_loss_fn, eval_mode, trainable_parameters, unflatten

OBJECTIVES = ("l2", "cosine")
OPTIMIZERS = ("adam", "lbfgs")
INITS = ("randn", "rand", "zeros")
LABEL_MODES = ("auto", "known", "idlg", "optimize")
LINE_SEARCHES = (None, "strong_wolfe")
#: :attr:`AttackResult.stop_reason` values. ``converged``: L-BFGS made no further move (torch's
#: tolerances; it would stay put for every further step) or Adam's objective reached a plateau after the
#: last learning-rate decay; ``budget_*``: the iteration, evaluation or wall-clock budget ran out;
#: ``callback``: ``progress_callback`` returned True; ``diverged``: NaN/inf (``failed=True``).
STOP_REASONS = ("converged", "budget_iterations", "budget_evaluations", "budget_time", "callback", "diverged")

Bounds = tuple[float | Tensor, float | Tensor]


@dataclass(frozen=True)
class AttackConfig:
    """Every hyperparameter of the attack; each field is an override of :func:`invert`.

    Defaults are DLG's; presets (:data:`PRESETS`) change some of them.
    """

    # -- objective -------------------------------------------------------------------------------
    objective: str = "l2"  #: ``l2``: Σ w (∇θL(x) − g)²;  ``cosine``: 1 − <∇θL(x), g>_w / (‖∇θL(x)‖_w ‖g‖_w)
    #: Per-layer weights of the matching term: one float per trainable parameter tensor (in
    #: ``model.parameters()`` order) or ``{parameter name: weight}`` (others weigh 1). ``None``: all 1.
    layer_weights: Sequence[float] | Mapping[str, float] | None = None
    # -- regularisers (weights; 0 turns one off) -------------------------------------------------
    tv: float = 0.0  #: total variation: mean |horizontal| + mean |vertical| neighbour differences
    l2: float = 0.0  #: image norm prior: mean over images of ‖x_i‖₂ (DeepInversion's ``loss_l2``)
    bn: float = 0.0  #: BatchNorm prior: Σ_layers ‖μ_l(x) − running_mean_l‖₂ + ‖σ²_l(x) − running_var_l‖₂
    # -- optimisation ----------------------------------------------------------------------------
    optimizer: str = "lbfgs"  #: ``adam`` or ``lbfgs``
    lr: float = 1.0
    signed: bool = False  #: Adam on the sign of the input gradient (Inverting Gradients)
    lr_schedule: bool = False  #: Adam only: lr ×0.1 at 3/8, 5/8, 7/8 of the iterations (or at a plateau)
    #: Adam only: a plateau is ``patience`` iterations in which the best objective did not fall by more than
    #: ``plateau_rtol`` (relative). It brings the next lr decay forward; after the last decay (or without
    #: ``lr_schedule``) it ends the attack as converged. ``None``: no plateau stop (fixed schedule).
    patience: int | None = None
    plateau_rtol: float = 1e-3
    #: Optimizer steps per restart. Adam: one evaluation each. L-BFGS: DLG's *outer* steps, each up to
    #: ``lbfgs_max_iter`` inner iterations (see the module docstring).
    iterations: int = 300
    #: L-BFGS inner iterations per step (torch's ``max_iter``; DLG's 20). An inner loop also ends on
    #: torch's tolerances (``lbfgs_tolerance_change``, ``lbfgs_tolerance_grad``).
    lbfgs_max_iter: int = 20
    lbfgs_tolerance_change: float = 1e-9  #: torch's ``tolerance_change``: |Δobjective| or max |step|
    lbfgs_tolerance_grad: float = 1e-7  #: torch's ``tolerance_grad``: max |∂objective/∂x|
    max_evaluations: int | None = None  #: cap on gradient evaluations for the whole attack (all restarts)
    max_seconds: float | None = None  #: wall-clock budget for the whole attack (all restarts)
    restarts: int = 1  #: independent runs from fresh dummy data; the lowest final objective wins
    lbfgs_history: int = 100
    lbfgs_line_search: str | None = None  #: ``None`` (DLG) or ``"strong_wolfe"``
    # -- dummy data ------------------------------------------------------------------------------
    init: str = "randn"  #: ``randn`` (normalised space), ``rand`` (uniform in ``bounds``, else [0,1)), ``zeros``
    seed: int = 0  #: seeds the attack's own ``torch.Generator`` (dummy data and dummy labels)
    #: Valid normalised pixel range ``(lo, hi)``: floats or tensors broadcastable to ``(C, 1, 1)``,
    #: e.g. ``datamodule.pixel_bounds()``.
    bounds: Bounds | None = None
    #: Box constraint: project onto ``bounds`` after every step (``True`` requires ``bounds``). Off for
    #: DLG: projecting behind L-BFGS's back spoils its curvature pairs (36–41 dB instead of ~90 dB on digits).
    box: bool = False
    # -- threat model ----------------------------------------------------------------------------
    #: ``known`` (labels given, the paper's setting), ``idlg`` (analytic, batch 1), ``optimize`` (DLG's
    #: joint soft-label optimisation), ``auto``: known if given, else idlg for batch 1, else optimize.
    label_mode: str = "auto"
    batch_size: int | None = None  #: batch size when ``input_shape`` is (C, H, W) and no labels are given
    loss_fn: LossFn | None = None  #: the training loss (default: mean cross-entropy)
    # -- reporting -------------------------------------------------------------------------------
    progress: bool = True  #: tqdm progress bar
    history_every: int = 10  #: record the objective every this many iterations (0: never)
    #: Called as ``progress_callback(iteration, objective)`` every ``progress_every`` iterations (steps done
    #: so far over all restarts, the latest objective); returning ``True`` stops the attack
    #: (``stop_reason="callback"``). Not part of the loggable config.
    progress_callback: Callable[[int, float], bool | None] | None = None
    progress_every: int = 10

    def validate(self) -> None:
        """Raise :class:`ConfigError` with one line for the first invalid value."""
        if self.objective not in OBJECTIVES:
            raise unknown_name("attack objective", self.objective, OBJECTIVES)
        if self.optimizer not in OPTIMIZERS:
            raise unknown_name("attack optimizer", self.optimizer, OPTIMIZERS)
        if self.init not in INITS:
            raise unknown_name("attack init", self.init, INITS)
        if self.label_mode not in LABEL_MODES:
            raise unknown_name("attack label_mode", self.label_mode, LABEL_MODES)
        if self.lbfgs_line_search not in LINE_SEARCHES:
            raise ConfigError(
                f"attack lbfgs_line_search must be null or 'strong_wolfe', got {self.lbfgs_line_search!r}"
            )
        for name in ("tv", "l2", "bn"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"attack regulariser weight {name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"attack lr must be > 0, got {self.lr!r}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ConfigError(f"attack iterations must be an integer >= 0, got {self.iterations!r}")
        if not isinstance(self.restarts, int) or self.restarts < 1:
            raise ConfigError(f"attack restarts must be an integer >= 1, got {self.restarts!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"attack max_seconds must be > 0 or null, got {self.max_seconds!r}")
        if self.max_evaluations is not None and (not isinstance(self.max_evaluations, int)
                                                 or self.max_evaluations < 1):
            raise ConfigError(f"attack max_evaluations must be an integer >= 1 or null, got {self.max_evaluations!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise ConfigError(f"attack patience must be an integer >= 1 or null, got {self.patience!r}")
        if not (isinstance(self.plateau_rtol, (int, float)) and 0 <= self.plateau_rtol < 1):
            raise ConfigError(f"attack plateau_rtol must be in [0, 1), got {self.plateau_rtol!r}")
        if not isinstance(self.lbfgs_max_iter, int) or self.lbfgs_max_iter < 1:
            raise ConfigError(f"attack lbfgs_max_iter must be an integer >= 1, got {self.lbfgs_max_iter!r}")
        for name in ("lbfgs_tolerance_change", "lbfgs_tolerance_grad"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"attack {name} must be a finite number >= 0, got {value!r}")
        if self.progress_callback is not None and not callable(self.progress_callback):
            raise ConfigError(f"attack progress_callback must be callable or None, got {self.progress_callback!r}")
        if not isinstance(self.progress_every, int) or self.progress_every < 1:
            raise ConfigError(f"attack progress_every must be an integer >= 1, got {self.progress_every!r}")
        if not isinstance(self.lbfgs_history, int) or self.lbfgs_history < 1:
            raise ConfigError(f"attack lbfgs_history must be an integer >= 1, got {self.lbfgs_history!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise ConfigError(f"attack batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.history_every, int) or self.history_every < 0:
            raise ConfigError(f"attack history_every must be an integer >= 0, got {self.history_every!r}")
        if self.box and self.bounds is None:
            raise ConfigError(
                "the attack's box constraint needs bounds=(lo, hi), the valid normalised pixel range "
                "(e.g. datamodule.pixel_bounds()), or box=False"
            )


#: Named presets: overrides of :class:`AttackConfig`'s defaults. ``iterations`` are budgets, not costs:
#: DLG's 300 outer L-BFGS steps, Inverting Gradients' 24,000 (batches) with a plateau stop.
PRESETS: dict[str, dict[str, Any]] = {
    "dlg": {"box": False},
    "inverting_gradients": {
        "objective": "cosine",
        "optimizer": "adam",
        "lr": 0.1,
        "signed": True,
        "lr_schedule": True,
        "box": True,
        # Geiping et al. use 1e-1 to 1e-4 depending on the model; on the small sigmoid LeNet a
        # smaller weight keeps TV from dominating once the cosine term reaches ~1e-5.
        "tv": 1e-4,
        # Geiping's budget is 24,000 iterations for batches (their 4,800 is for one image); a plateau of
        # 500 iterations (best objective not 1% lower) brings each lr decay forward and ends the attack
        # after the last one. Batch of 4 digits: ~5,500 iterations, 33 dB (4,800 fixed: ~21 dB).
        "iterations": 24000,
        "patience": 500,
        "plateau_rtol": 0.01,
    },
    "gradinversion": {
        "objective": "l2",
        "optimizer": "adam",
        "lr": 0.1,
        "lr_schedule": True,
        "box": True,
        "tv": 1e-4,
        "l2": 1e-6,
        "bn": 1e-2,
        "iterations": 24000,  # a budget for batches; the plateau stop ends easy cases early (as above)
        "patience": 500,
        "plateau_rtol": 0.01,
    },
}

CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(AttackConfig))


def attack_config(preset: str = "dlg", **overrides: Any) -> AttackConfig:
    """The resolved, validated configuration of ``preset`` with ``overrides`` applied."""
    if preset not in PRESETS:
        raise unknown_name("attack preset", preset, PRESETS)
    for key in overrides:
        if key not in CONFIG_KEYS:
            raise unknown_name("attack option", key, CONFIG_KEYS)
    config = AttackConfig(**{**PRESETS[preset], **overrides})
    config.validate()
    return config


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


# --- inputs ---------------------------------------------------------------------------------------

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


def _total_variation(x: Tensor) -> Tensor:
    """Anisotropic TV as in Inverting Gradients: mean |Δ_w x| + mean |Δ_h x|."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


# --- the attack -----------------------------------------------------------------------------------

def invert(
    model: nn.Module,
    target_grad: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
    labels: Tensor | None,
    input_shape: Sequence[int],
    preset: str = "dlg",
    **overrides: Any,
) -> AttackResult:
    """Reconstruct the batch whose gradient is ``target_grad`` by gradient matching.

    Args:
        model: the model whose gradient was released (left unchanged; run in eval mode).
        target_grad: the **released** gradient (after the defense) — a flat θ-vector ordered like
            ``parameters_to_vector(model.parameters())``, a per-parameter list, or a name → tensor dict.
        labels: (B,) class indices the threat model grants, or ``None`` to recover them
            (``label_mode``: iDLG for batch 1, joint soft-label optimisation otherwise).
        input_shape: ``(B, C, H, W)``, or ``(C, H, W)`` with B from ``labels`` / ``batch_size``.
        preset: ``dlg``, ``inverting_gradients`` or ``gradinversion`` (see :data:`PRESETS`).
        **overrides: any :class:`AttackConfig` field (``iterations``, ``lr``, ``tv``, ``bounds``, ``seed`` …).
            For callers with a time budget (e.g. an audit):

            * ``max_seconds`` (float | None): wall-clock budget for the whole attack, checked before every
              evaluation; when it runs out the best iterate so far is returned with
              ``stop_reason="budget_time"``.
            * ``max_evaluations`` (int | None): the same as a cap on gradient evaluations
              (``"budget_evaluations"``).
            * ``progress_callback`` (``Callable[[int, float], bool | None]``): called every
              ``progress_every`` (10) optimizer steps with the steps done so far (over all restarts) and
              the latest objective; returning ``True`` ends the attack (``"callback"``).

    Returns:
        An :class:`AttackResult`; ``failed=True`` (never an exception) when the optimisation diverges.
        ``result.stop_reason`` says what ended it (:data:`STOP_REASONS`: ``converged`` or a budget, the
        callback, or ``diverged``); ``result.evaluations`` is its cost in gradient evaluations and
        ``result.iterations`` in optimizer steps (L-BFGS: outer steps).
    """
    config = attack_config(preset, **overrides)
    start = time.perf_counter()
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
        warnings.warn("attack bn prior requested but the model has no BatchNorm layers; prior skipped", stacklevel=2)
    if use_bn and any(m.running_mean is None for m in bn_layers):
        raise ConfigError("attack bn prior needs BatchNorm layers that track running statistics")

    # keys follow conf/train.yaml's threat_model (labels_known, bn_statistics_known, model_mode, batch_size)
    threat_model = {
        "preset": preset,
        "labels_known": label_mode == "known",
        "labels": {"known": "known", "idlg": "recovered (iDLG)", "optimize": "optimized (DLG)"}[label_mode],
        "bn_statistics_known": use_bn,
        "batch_size": batch,
        "input_shape": list(shape),
        "model_mode": "eval",
        "box": box,
        "gradient": "released",
        "gradient_norm": float(target.norm()),
    }
    resolved = {k: getattr(config, k) for k in CONFIG_KEYS
                if k not in ("loss_fn", "bounds", "layer_weights", "progress_callback")}
    resolved.update(label_mode=label_mode, preset=preset)

    attack = _Attack(model, params, target, weights, labels, shape, bounds if box else None, bounds,
                     bn_layers if use_bn else [], label_mode == "optimize", config)
    result = attack.run(start, preset)
    result.threat_model = threat_model
    result.config = resolved
    return result


class _StepDecay:
    """Adam's learning rate: Geiping et al.'s step decay (×0.1 at 3/8, 5/8 and 7/8 of the iterations,
    as ``MultiStepLR``), where a plateau of the best objective brings the next decay forward; a plateau
    with no decay left means converged."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: AttackConfig):
        n = config.iterations
        self.optimizer = optimizer
        self.base_lr = config.lr
        self.milestones = sorted({max(1, round(n * f)) for f in (3 / 8, 5 / 8, 7 / 8)}) if config.lr_schedule else []
        self.decays = 0
        self.patience = config.patience
        self.rtol = config.plateau_rtol
        self.best = self.reference = math.inf
        self.since_improvement = 0

    def _plateau(self, objective: float) -> bool:
        # as ReduceLROnPlateau's relative threshold: progress is measured from the best value at the
        # last improvement, so a slow but steady decline still counts
        self.best = min(self.best, objective)
        if not self.best >= self.reference * (1 - self.rtol):
            self.reference, self.since_improvement = self.best, 0
            return False
        self.since_improvement += 1
        return self.patience is not None and self.since_improvement >= self.patience

    def step(self, steps_done: int, objective: float) -> bool:
        """After optimizer step ``steps_done`` (1-based) whose objective was ``objective``: decay the lr
        when due; return True when the attack has converged."""
        plateau = self._plateau(objective)
        if self.decays < len(self.milestones) and (plateau or steps_done >= self.milestones[self.decays]):
            self.decays += 1
            for group in self.optimizer.param_groups:
                group["lr"] = self.base_lr * 0.1**self.decays
            self.reference, self.since_improvement = self.best, 0
            return False
        return plateau


class _Attack:
    """One attack's state: the objective and the optimisation loop with restarts and budgets."""

    def __init__(self, model, params, target, weights, labels, shape, box_bounds, bounds, bn_layers,
                 optimize_labels, config: AttackConfig):
        self.model = model
        self.params = params
        self.param_list = list(params.values())
        self.target = target
        # Per-layer terms: the target is kept split like the parameters, so no d_θ-long vector is ever
        # concatenated (on resnet18 the cat, its backward and the elementwise passes cost ~25% of a step).
        self.targets = list(unflatten(target, params).values())
        self.weights = weights if weights is not None else [1.0] * len(self.targets)
        self.labels = labels
        self.shape = shape
        self.box_bounds = box_bounds
        self.bounds = bounds
        self.bn_layers = bn_layers
        self.optimize_labels = optimize_labels
        self.config = config
        self.loss = batch_loss_fn(model, config.loss_fn)
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.target_sq = sum(w * t.pow(2).sum() for w, t in zip(self.weights, self.targets))  # ‖g‖²_w, fixed
        self.num_classes: int | None = None
        self.bn_stats: list[tuple[Tensor, Tensor]] = []

    # -- objective ---------------------------------------------------------------------------------
    def _matching(self, grads: Sequence[Tensor | None]) -> Tensor:
        """l2: Σ_l w_l ‖∇_l − g_l‖²;  cosine: 1 − Σ_l w_l <∇_l, g_l> / √(Σ_l w_l ‖∇_l‖² · Σ_l w_l ‖g_l‖²)."""
        pairs = [(w, d, t) for w, d, t in zip(self.weights, grads, self.targets) if w != 0]
        if self.config.objective == "l2":
            # a parameter the loss does not reach has gradient 0: its term is ‖g_l‖²
            return sum(w * ((d - t) if d is not None else t).pow(2).sum() for w, d, t in pairs)
        dot = sum(w * (d * t).sum() for w, d, t in pairs if d is not None)
        dd = sum(w * d.pow(2).sum() for w, d, t in pairs if d is not None)
        # clamp (not +eps) keeps the gradient finite if the dummy gradient is exactly zero
        return 1 - dot / (dd * self.target_sq).clamp_min(1e-30).sqrt()

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
            match = self._matching(grads)
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

    # -- dummy data --------------------------------------------------------------------------------
    def _init(self, ref: Tensor) -> Tensor:
        g = self.generator
        if self.config.init == "zeros":
            x = torch.zeros(self.shape)
        elif self.config.init == "randn":
            x = torch.randn(self.shape, generator=g)
        else:
            x = torch.rand(self.shape, generator=g)
        # drawn on the CPU generator then moved: the same seed gives the same init on every device
        x = x.to(device=ref.device, dtype=ref.dtype)
        if self.config.init == "rand" and self.bounds is not None:
            lo, hi = self.bounds
            x = lo + (hi - lo) * x
        return self._project(x)

    def _project(self, x: Tensor) -> Tensor:
        if self.box_bounds is None:
            return x
        lo, hi = self.box_bounds
        return torch.maximum(torch.minimum(x, hi), lo)

    # -- loop --------------------------------------------------------------------------------------
    def run(self, start: float, preset: str) -> AttackResult:
        cfg = self.config
        ref = self.param_list[0]
        hooks = [m.register_forward_hook(self._bn_hook) for m in self.bn_layers]
        self.start = start
        self.evaluations = 0
        total_iters = 0
        failed, reason, stop_reason = False, None, "budget_iterations"
        best: dict[str, Any] | None = None
        history: list[tuple[int, float]] = []
        bar = tqdm(total=cfg.iterations * cfg.restarts, desc=f"attack[{preset}]", disable=not cfg.progress,
                   leave=False)
        try:
            if not bool(torch.isfinite(self.target).all()):
                raise _Diverged("the released gradient contains NaN/inf")
            with eval_mode(self.model):
                if self.optimize_labels:
                    with torch.no_grad():
                        self.num_classes = self.model(torch.zeros(1, *self.shape[1:], device=ref.device,
                                                                  dtype=ref.dtype)).shape[-1]
                for restart in range(cfg.restarts):
                    trial = self._run_restart(restart, total_iters, history, bar)
                    total_iters += trial["iterations"]
                    if best is None or trial["total"] < best["total"]:
                        best = trial
                    stop_reason = trial["stop_reason"]
                    if trial["reason"] is not None:
                        failed, reason = True, trial["reason"]
                        break
                    if stop_reason in ("budget_evaluations", "budget_time", "callback"):
                        break  # whole-attack budgets: no further restarts
        except _Diverged as exc:  # the target itself was not finite: nothing was optimised
            failed, reason, stop_reason = True, str(exc), "diverged"
        finally:
            for h in hooks:
                h.remove()
            bar.close()
        if best is None:  # only when the target was not finite: return the (finite) initial dummy data
            x = self._init(ref)
            labels = self.labels if self.labels is not None else torch.zeros(self.shape[0], dtype=torch.long)
            best = {"x": x, "labels": labels, "match": math.inf, "total": math.inf, "restart": 0}
        return AttackResult(
            x=best["x"],
            labels=best["labels"].detach().to(torch.long),
            objective=float(best["total"]),
            gradient_distance=float(best["match"]),
            iterations=total_iters,
            seconds=time.perf_counter() - start,
            evaluations=self.evaluations,
            failed=failed,
            reason=reason,
            stop_reason=stop_reason,
            restart=best["restart"],
            history=history,
        )

    def _check_budgets(self) -> None:
        """Raise :class:`_Stop` before an evaluation that the evaluation or time budget does not allow."""
        cfg = self.config
        if cfg.max_evaluations is not None and self.evaluations >= cfg.max_evaluations:
            raise _Stop("budget_evaluations")
        if cfg.max_seconds is not None and time.perf_counter() - self.start > cfg.max_seconds:
            raise _Stop("budget_time")

    def _run_restart(self, restart: int, done: int, history: list, bar) -> dict[str, Any]:
        """One optimisation from fresh dummy data; returns its best finite iterate and why it stopped."""
        cfg = self.config
        x = self._init(self.param_list[0]).requires_grad_()
        init = x.detach().clone()
        label_logits = None
        if self.optimize_labels:
            label_logits = torch.randn(self.shape[0], self.num_classes, generator=self.generator)
            label_logits = label_logits.to(x).requires_grad_()
        variables = [x] if label_logits is None else [x, label_logits]
        best: dict[str, Any] = {"total": math.inf, "match": math.inf, "restart": restart}
        iteration = 0
        # The objective and input gradients at the last evaluated point, keyed by the variables' version
        # counters (every in-place change bumps them): torch's L-BFGS re-evaluates the point where its
        # previous step ended at the start of every step; the cache makes that repeat free.
        cache: dict[str, Any] = {"versions": None}

        def versions() -> tuple[int, ...]:
            return tuple(v._version for v in variables)

        def record(match: Tensor, total: Tensor) -> None:
            """Keep the best finite iterate; a non-finite objective or gradient ends the attack."""
            finite = torch.isfinite(total) & torch.isfinite(x.grad).all()
            if label_logits is not None:
                finite = finite & torch.isfinite(label_logits.grad).all()
            if not bool(finite):
                raise _Diverged(f"objective or its gradient became NaN/inf at iteration {done + iteration}")
            value = float(total)
            if value < best["total"]:
                best.update(total=value, match=float(match), x=x.detach().clone(),
                            labels=self._labels_now(label_logits))

        def closure() -> Tensor:
            if cache["versions"] == versions():
                for v, g in zip(variables, cache["grads"]):
                    v.grad = g.clone()
                return cache["total"]
            self._check_budgets()
            match, total = self.evaluate(x, label_logits)
            self.evaluations += 1
            record(match, total)
            cache.update(versions=versions(), total=total, grads=[v.grad.clone() for v in variables])
            return total

        if cfg.optimizer == "adam":
            opt = torch.optim.Adam(variables, lr=cfg.lr)
            sched = _StepDecay(opt, cfg)
        else:
            opt = torch.optim.LBFGS(variables, lr=cfg.lr, max_iter=cfg.lbfgs_max_iter,
                                    max_eval=cfg.lbfgs_max_iter * 5 // 4,  # torch's default for max_eval
                                    tolerance_grad=cfg.lbfgs_tolerance_grad,
                                    tolerance_change=cfg.lbfgs_tolerance_change,
                                    history_size=cfg.lbfgs_history, line_search_fn=cfg.lbfgs_line_search)
            sched = None

        stop_reason, reason = "budget_iterations", None
        try:
            for iteration in range(cfg.iterations):
                if cfg.optimizer == "adam":
                    total = closure()
                    if cfg.signed:
                        x.grad.sign_()
                    opt.step()
                    if sched.step(iteration + 1, float(total)):
                        stop_reason = "converged"
                        break
                else:
                    before = versions()
                    total = opt.step(closure)
                    if versions() == before:
                        # No move: the gradient is below tolerance_grad or there is no descent direction
                        # left. The state is unchanged, so every further step would stop at the same place.
                        stop_reason = "converged"
                        break
                if self.box_bounds is not None:
                    with torch.no_grad():
                        x.copy_(self._project(x))
                bar.update(1)
                steps = done + iteration + 1
                if cfg.history_every and iteration % cfg.history_every == 0:
                    history.append((done + iteration, float(total)))
                    bar.set_postfix_str(f"objective {float(total):.3g}", refresh=False)
                if self._callback_says_stop(steps, total):
                    stop_reason = "callback"
                    break
            else:
                iteration = cfg.iterations
            if stop_reason in ("converged", "callback"):
                iteration += 1  # the step it stopped at counts
            # the last step's end point may not have been evaluated yet (free if it has)
            closure()
        except _Stop as stop:
            stop_reason = stop.args[0]
        except _Diverged as exc:
            reason, stop_reason = str(exc), "diverged"
        if "x" not in best:  # diverged at the very first evaluation: fall back to the (finite) init
            best.update(x=init, labels=self._labels_now(label_logits))
        return {**best, "iterations": iteration, "stop_reason": stop_reason, "reason": reason}

    def _callback_says_stop(self, steps: int, total: Tensor) -> bool:
        cfg = self.config
        if cfg.progress_callback is None or steps % cfg.progress_every:
            return False
        return bool(cfg.progress_callback(steps, float(total)))

    def _labels_now(self, label_logits: Tensor | None) -> Tensor:
        if label_logits is None:
            return self.labels.detach().clone()
        return label_logits.detach().argmax(dim=-1)
