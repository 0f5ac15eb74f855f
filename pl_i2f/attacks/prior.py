"""The prior-aware (MAP) gradient-inversion attack, preset ``map``: the attacker :mod:`pl_i2f.calibrated` prices.

It knows the Gaussian prior N(μ, Σ_x) of the data and the noise on the sample's released gradient (the shared
threat model, :class:`~pl_i2f.threat.SampleNoise`), and maximises the posterior

    ‖ĝ(x) − g‖²_{Σ_n⁻¹} + (x − μ)ᵀΣ_x⁻¹(x − μ),      ĝ(x) = clip_C(∇θL(x)) (DP-SGD) or ∇θL(x),

in the whitened variable x = μ + Σ_x^{1/2} z (so the prior term is ‖z‖², a singular Σ_x needs no inverse and
pixels the attacker knows stay at their mean), started from the data mean (z = 0), by L-BFGS with a strong
Wolfe line search. The objective is multiplied by s² (the noise scale), so s = 0 (no noise) is pure gradient
matching from the mean. Noise along a basis only (σ_iso = 0) weighs the directions outside it
:data:`NOISELESS_WEIGHT` times the least noisy one (they carry no noise: matching them is a constraint).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from pl_i2f.attacks.inputs import idlg_label
from pl_i2f.attacks.result import AttackResult
from pl_i2f.calibrated import GaussianPrior
from pl_i2f.errors import ConfigError
from pl_i2f.gradients import LossFn, as_flat, batch_loss_fn, eval_mode, trainable_parameters
from pl_i2f.threat import SampleNoise

MAP_PRESET = "map"  # invert(..., preset="map", prior=..., noise=...) routes here
NOISELESS_WEIGHT = 1e6  # weight of noiseless directions relative to the least noisy one (σ_iso = 0)


def noise_weighted_sq(r: Tensor, noise: SampleNoise) -> Tensor:
    """s²·‖r‖²_{Σ_n⁻¹} for residuals r (…, d_θ): ‖r‖² − Σₖ aₖ/(1+aₖ)(vₖᵀr)² (Woodbury, a = extra/s²) with
    s = ``noise.std``; plain ‖r‖² for isotropic noise or none."""
    sq = r.pow(2).sum(-1)
    if noise.basis is None:
        return sq
    v = noise.basis.to(r)
    extra = noise.extra_variance.to(r)
    proj = (r @ v).pow(2)
    if noise.std > 0:
        a = extra / noise.std ** 2
        return sq - (proj * (a / (1 + a))).sum(-1)
    floor = float(extra[extra > 0].min()) if bool((extra > 0).any()) else 1.0
    inside = (proj * (floor / extra.clamp_min(floor / NOISELESS_WEIGHT))).sum(-1)
    return NOISELESS_WEIGHT * (sq - proj.sum(-1)) + inside


def noise_scale_sq(noise: SampleNoise) -> float:
    """s² of :func:`noise_weighted_sq`'s scaling: std², or, with noise only along a basis, its least variance."""
    if noise.std > 0 or noise.basis is None:
        return noise.std ** 2
    extra = noise.extra_variance
    return float(extra[extra > 0].min()) if bool((extra > 0).any()) else 0.0


def map_attack(
    model: nn.Module,
    target_grad: Tensor | Sequence[Tensor],
    labels: Tensor | None,
    input_shape: Sequence[int],
    prior: GaussianPrior,
    noise: SampleNoise | float = 0.0,
    *,
    iterations: int = 50,
    lbfgs_max_iter: int = 20,
    tolerance_change: float = 1e-12,
    tolerance_grad: float = 1e-10,
    max_evaluations: int | None = None,
    max_seconds: float | None = None,
    loss_fn: LossFn | None = None,
    progress_callback: Callable[[int, float], bool | None] | None = None,
) -> AttackResult:
    """Reconstruct one sample (or a batch, each with the prior) from its released gradient; see the module
    docstring. ``noise``: a :class:`SampleNoise` or an isotropic std; ``labels`` None: iDLG's (batch of 1).
    Returns an :class:`AttackResult` with ``stop_reason`` ``converged`` when L-BFGS met its tolerances before
    ``iterations`` outer steps. ``max_evaluations`` / ``max_seconds`` cap the whole attack, checked before every
    evaluation (``budget_evaluations`` / ``budget_time``: the iterate so far is returned)."""
    if not isinstance(noise, SampleNoise):
        noise = SampleNoise(std=float(noise), source="explicit")
    if iterations < 1 or lbfgs_max_iter < 1:
        raise ConfigError(f"map attack iterations and lbfgs_max_iter must be >= 1, got {iterations}, {lbfgs_max_iter}")
    start = time.perf_counter()
    params = {name: p.requires_grad_() for name, p in trainable_parameters(model).items()}  # detached copies
    if not params:
        raise ConfigError("the attacked model has no trainable parameters")
    ref = next(iter(params.values()))
    target = as_flat(target_grad, params).detach().to(ref)
    if labels is None:
        labels = idlg_label(model, target)
    labels = torch.as_tensor(labels).to(device=ref.device, dtype=torch.long)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (int(labels.shape[0]), *shape)
    d = math.prod(shape[1:])
    if prior.dim != d:
        raise ConfigError(f"the prior has {prior.dim} values, the attacked input {d}")
    mean = prior.mean.to(ref)
    root = prior.sqrt().to(ref)  # dense Σ_x^{1/2}: the attack is for d_x where the exact estimator runs
    s2 = noise_scale_sq(noise)
    loss = batch_loss_fn(model, loss_fn)
    z = torch.zeros(shape[0], d, dtype=ref.dtype, device=ref.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([z], lr=1.0, max_iter=lbfgs_max_iter, history_size=100,
                                  tolerance_change=tolerance_change, tolerance_grad=tolerance_grad,
                                  line_search_fn="strong_wolfe")
    state = {"evaluations": 0, "match": math.inf, "total": math.inf}
    history: list[tuple[int, float]] = []

    def objective() -> Tensor:
        if max_evaluations is not None and state["evaluations"] >= max_evaluations:
            raise StopIteration("budget_evaluations")
        if max_seconds is not None and time.perf_counter() - start >= max_seconds:
            raise StopIteration("budget_time")
        state["evaluations"] += 1
        x = (mean + z @ root).reshape(shape)
        grads = torch.autograd.grad(loss(params, x, labels), list(params.values()), create_graph=True)
        pred = torch.cat([g.reshape(-1) for g in grads])
        if noise.clip_norm is not None:
            pred = pred * torch.clamp(noise.clip_norm / pred.norm(), max=1.0)
        match = noise_weighted_sq(pred - target, noise)
        total = match + s2 * z.pow(2).sum()
        z.grad = torch.autograd.grad(total, z)[0]
        state["match"], state["total"] = float(match.detach()), float(total.detach())
        return total

    stop_reason, failed, reason, steps = "budget_iterations", False, None, 0
    with eval_mode(model), torch.enable_grad():
        try:
            for steps in range(1, iterations + 1):
                before = state["evaluations"]
                optimizer.step(objective)
                history.append((steps, state["total"]))
                if not math.isfinite(state["total"]):
                    failed, reason, stop_reason = True, "the MAP objective became NaN/inf", "diverged"
                    break
                if progress_callback is not None and progress_callback(steps, state["total"]):
                    stop_reason = "callback"
                    break
                if state["evaluations"] - before < lbfgs_max_iter:  # torch's tolerances ended the inner loop
                    stop_reason = "converged"
                    break
        except StopIteration as exc:
            stop_reason = str(exc)
    x = (mean + z.detach() @ root).reshape(shape)
    if not bool(torch.isfinite(x).all()):
        x = mean.expand(shape[0], d).reshape(shape).clone()
    return AttackResult(
        x=x.detach(), labels=labels, objective=state["total"], gradient_distance=state["match"], iterations=steps,
        seconds=time.perf_counter() - start, evaluations=state["evaluations"], failed=failed, reason=reason,
        stop_reason=stop_reason, history=history,
        threat_model={"preset": "map", "labels_known": True, "prior": "gaussian", "noise_source": noise.source,
                      "noise_std": noise.std, "clip_norm": noise.clip_norm, "model_mode": "eval",
                      "batch_size": shape[0], "input_shape": list(shape), "gradient": "released"},
        config={"iterations": iterations, "lbfgs_max_iter": lbfgs_max_iter, "tolerance_change": tolerance_change,
                "tolerance_grad": tolerance_grad, "init": "prior_mean"},
    )
