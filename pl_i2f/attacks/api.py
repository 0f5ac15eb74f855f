"""The attack's entry point, :func:`invert`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from pl_i2f.attacks import loop
from pl_i2f.attacks.config import CONFIG_KEYS, attack_config
from pl_i2f.attacks.inputs import prepare_inputs
from pl_i2f.attacks.prior import MAP_PRESET, map_attack
from pl_i2f.attacks.result import AttackResult
from pl_i2f.errors import ConfigError, check_options


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
        preset: ``dlg``, ``inverting_gradients`` or ``gradinversion`` (see :data:`PRESETS`), or ``map``: the
            prior-aware MAP attack (:func:`pl_i2f.attacks.prior.map_attack`; overrides ``prior=`` a
            :class:`~pl_i2f.calibrated.GaussianPrior`, ``noise=`` a :class:`~pl_i2f.threat.SampleNoise` or std,
            and its own options).
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
    if preset == MAP_PRESET:
        if "prior" not in overrides:
            raise ConfigError("attack preset 'map' needs prior= (e.g. datamodule.data_prior())")
        check_options(map_attack, overrides, "attack preset 'map'", model, target_grad, labels, input_shape)
        return map_attack(model, target_grad, labels, input_shape, **overrides)
    config = attack_config(preset, **overrides)
    start = loop.clock()
    inputs = prepare_inputs(model, target_grad, labels, input_shape, config)
    label_mode, shape = inputs.label_mode, inputs.shape
    # keys follow conf/train.yaml's threat_model (labels_known, bn_statistics_known, model_mode, batch_size)
    threat_model = {
        "preset": preset,
        "labels_known": label_mode == "known",
        "labels": {"known": "known", "idlg": "recovered (iDLG)", "optimize": "optimized (DLG)"}[label_mode],
        "bn_statistics_known": bool(inputs.bn_layers),
        "batch_size": shape[0],
        "input_shape": list(shape),
        "model_mode": "eval",
        "box": bool(config.box),
        "gradient": "released",
        "gradient_norm": float(inputs.target.norm()),
    }
    resolved = {k: getattr(config, k) for k in CONFIG_KEYS
                if k not in ("loss_fn", "bounds", "layer_weights", "progress_callback")}
    resolved.update(label_mode=label_mode, preset=preset)

    result = loop._Attack(inputs, config).run(start, preset)
    result.threat_model = threat_model
    result.config = resolved
    return result
