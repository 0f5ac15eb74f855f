"""The attack's configuration: every hyperparameter (:class:`AttackConfig`), its checks, and the named
presets (:data:`PRESETS`, resolved by :func:`attack_config`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from pl_i2f.checks import require_int, require_name, require_number
from pl_i2f.errors import ConfigError, unknown_name
from pl_i2f.gradients import LossFn

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
        require_name("attack objective", self.objective, OBJECTIVES)
        require_name("attack optimizer", self.optimizer, OPTIMIZERS)
        require_name("attack init", self.init, INITS)
        require_name("attack label_mode", self.label_mode, LABEL_MODES)
        if self.lbfgs_line_search not in LINE_SEARCHES:
            raise ConfigError(
                f"attack lbfgs_line_search must be null or 'strong_wolfe', got {self.lbfgs_line_search!r}"
            )
        for name in ("tv", "l2", "bn"):
            require_number(f"attack regulariser weight {name}", getattr(self, name), low=0.0)
        require_number("attack lr", self.lr, low=0.0, low_open=True)
        require_int("attack iterations", self.iterations, 0)
        require_int("attack restarts", self.restarts, 1)
        require_number("attack max_seconds", self.max_seconds, low=0.0, low_open=True, optional=True)
        require_int("attack max_evaluations", self.max_evaluations, 1, optional=True)
        require_int("attack patience", self.patience, 1, optional=True)
        require_number("attack plateau_rtol", self.plateau_rtol, low=0.0, high=1.0, high_open=True)
        require_int("attack lbfgs_max_iter", self.lbfgs_max_iter, 1)
        for name in ("lbfgs_tolerance_change", "lbfgs_tolerance_grad"):
            require_number(f"attack {name}", getattr(self, name), low=0.0)
        if self.progress_callback is not None and not callable(self.progress_callback):
            raise ConfigError(f"attack progress_callback must be callable or None, got {self.progress_callback!r}")
        require_int("attack progress_every", self.progress_every, 1)
        require_int("attack lbfgs_history", self.lbfgs_history, 1)
        require_int("attack batch_size", self.batch_size, 1, optional=True)
        require_int("attack history_every", self.history_every, 0)
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
    require_name("attack preset", preset, PRESETS)
    for key in overrides:
        if key not in CONFIG_KEYS:
            raise unknown_name("attack option", key, CONFIG_KEYS)
    config = AttackConfig(**{**PRESETS[preset], **overrides})
    config.validate()
    return config

