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

Modules: :mod:`~pl_i2f.attacks.config` (hyperparameters and presets), :mod:`~pl_i2f.attacks.inputs` (the
released gradient, shapes, bounds, labels), :mod:`~pl_i2f.attacks.objective` (matching term and priors),
:mod:`~pl_i2f.attacks.loop` (optimisation, restarts, budgets), :mod:`~pl_i2f.attacks.result` and
:mod:`~pl_i2f.attacks.api` (:func:`invert`).
"""

from pl_i2f.attacks.api import invert
from pl_i2f.attacks.config import (
    CONFIG_KEYS,
    INITS,
    LABEL_MODES,
    LINE_SEARCHES,
    OBJECTIVES,
    OPTIMIZERS,
    PRESETS,
    STOP_REASONS,
    AttackConfig,
    Bounds,
    attack_config,
)
from pl_i2f.attacks.inputs import AttackInputs, idlg_label
from pl_i2f.attacks.loop import _StepDecay as _StepDecay  # the tests drive the lr schedule directly
from pl_i2f.attacks.objective import Objective
from pl_i2f.attacks.prior import MAP_PRESET, map_attack
from pl_i2f.attacks.result import AttackResult

__all__ = [
    "CONFIG_KEYS",
    "INITS",
    "LABEL_MODES",
    "LINE_SEARCHES",
    "MAP_PRESET",
    "OBJECTIVES",
    "OPTIMIZERS",
    "PRESETS",
    "STOP_REASONS",
    "AttackConfig",
    "AttackInputs",
    "AttackResult",
    "Bounds",
    "Objective",
    "attack_config",
    "idlg_label",
    "invert",
    "map_attack",
]
