"""Gradient-inversion attacks: recovery on digits (acceptance), labels, noise, threat model, robustness."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.utils import parameters_to_vector

from pl_i2f.attacks import PRESETS, AttackResult, _StepDecay, attack_config, idlg_label, invert
from pl_i2f.data import build_datamodule
from pl_i2f.errors import ConfigError
from pl_i2f.gradients import flat_gradient
from pl_i2f.metrics import reconstruction_metrics
from pl_i2f.models import build_model
from pl_i2f.reference import OriginalDLG

CONF_ATTACK = Path(__file__).resolve().parents[1] / "conf" / "attack"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: many tiny kernels, fastest on one thread


@pytest.fixture(scope="module")
def digits():
    dm = build_datamodule("digits")
    x, y = dm.probe_batch(50)
    return dm, x, y


def lenet(seed: int = 0):
    """The DLG setting: lenet_zhu with uniform ±0.5 weights and biases."""
    torch.manual_seed(seed)
    return build_model("lenet_zhu", (1, 16, 16), 10, init="uniform")


def psnr_of(result: AttackResult, x0, dm) -> float:
    return reconstruction_metrics(result.x, x0, denormalize=dm.denormalize)["psnr"]


# --- acceptance -----------------------------------------------------------------------------------

def test_dlg_recovers_one_digit(digits):
    dm, x, y = digits
    model = lenet()
    x0, y0 = x[:1], y[:1]
    result = invert(model, flat_gradient(model, x0, y0), y0, x0.shape, preset="dlg", progress=False)
    assert not result.failed
    assert psnr_of(result, x0, dm) >= 40.0
    # DLG's budget is 300 outer steps of up to 20 evaluations; this easy case converges well before
    # (the previous preset spent exactly 300 evaluations on it)
    assert result.stop_reason == "converged" and result.converged
    assert result.iterations < 300 and result.evaluations < 300
    assert result.threat_model["labels"] == "known" and result.threat_model["labels_known"] is True
    assert result.threat_model["model_mode"] == "eval"


def test_inverting_gradients_recovers_one_digit(digits):
    dm, x, y = digits
    model = lenet()
    x0, y0 = x[1:2], y[1:2]
    lo, hi = dm.pixel_bounds()
    # the preset's budget and schedule, with a shorter plateau (25 iterations instead of 500) to keep it cheap
    result = invert(model, flat_gradient(model, x0, y0), y0, x0.shape[1:], preset="inverting_gradients",
                    patience=25, bounds=(lo, hi), progress=False)
    assert not result.failed
    assert psnr_of(result, x0, dm) >= 25.0
    # the plateau stop ended it long before the 24,000-iteration budget (one evaluation per iteration,
    # plus the end point)
    assert result.stop_reason == "converged" and result.iterations < 500
    assert result.evaluations == result.iterations + 1
    # the box constraint holds
    assert bool((result.x >= lo - 1e-6).all() and (result.x <= hi + 1e-6).all())


def test_idlg_recovers_labels_of_50_digits(digits):
    _, x, y = digits
    model = lenet()
    recovered = torch.cat([idlg_label(model, flat_gradient(model, x[i : i + 1], y[i : i + 1])) for i in range(50)])
    assert recovered.tolist() == y.tolist()
    # the same through invert, without labels (label_mode auto -> iDLG for batch 1)
    for i in range(3):
        result = invert(model, flat_gradient(model, x[i : i + 1], y[i : i + 1]), None, x.shape[1:],
                        iterations=0, progress=False)
        assert result.labels.tolist() == [int(y[i])]
        assert result.threat_model["labels"] == "recovered (iDLG)" and result.threat_model["labels_known"] is False


def test_batch_of_four_matched_metrics_ignore_order(digits):
    dm, x, y = digits
    model = lenet()
    x0, y0 = x[:4], y[:4]
    result = invert(model, flat_gradient(model, x0, y0), y0, x0.shape, max_evaluations=150, progress=False)
    assert result.x.shape == x0.shape
    base = reconstruction_metrics(result.x, x0, denormalize=dm.denormalize)
    perm = torch.tensor([2, 0, 3, 1])
    shuffled = reconstruction_metrics(result.x[perm], x0, denormalize=dm.denormalize)
    assert shuffled == pytest.approx(base, rel=1e-6, abs=1e-9)
    unmatched = reconstruction_metrics(result.x[perm], x0, denormalize=dm.denormalize, matched=False)
    assert unmatched["mse"] > base["mse"] * 1.5  # the shuffle does matter without matching


def test_gradient_noise_increases_rmse_monotonically(digits):
    """The basis of the I²F-vs-attack study: a noisier released gradient, a worse reconstruction."""
    dm, x, y = digits
    model = lenet()
    levels = [0.0, 0.03, 0.3, 1.0]  # noise std relative to the gradient's per-coordinate RMS
    mean_rmse = []
    for level in levels:
        rmses = []
        for i in range(2):
            x0, y0 = x[i : i + 1], y[i : i + 1]
            g0 = flat_gradient(model, x0, y0)
            noise = torch.randn(g0.shape, generator=torch.Generator().manual_seed(100 + i))
            released = g0 + level * g0.pow(2).mean().sqrt() * noise
            result = invert(model, released, y0, x0.shape, max_evaluations=200, progress=False)
            assert not result.failed
            rmses.append(reconstruction_metrics(result.x, x0, denormalize=dm.denormalize)["rmse"])
        mean_rmse.append(sum(rmses) / len(rmses))
    assert all(a < b for a, b in itertools.pairwise(mean_rmse)), mean_rmse
    assert mean_rmse[0] < 1e-3


# --- threat model and model safety ---------------------------------------------------------------

def bn_convnet():
    torch.manual_seed(0)
    model = build_model("convnet", (1, 16, 16), 10, width=4)
    with torch.no_grad():  # non-trivial running statistics, as after some training
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def test_attack_leaves_model_and_global_rng_untouched(digits):
    _, x, y = digits
    model = bn_convnet()
    model.train()
    model.fc.eval()  # a mixed set of flags must come back as it was
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    target = flat_gradient(model, x[:2], y[:2])
    rng = torch.get_rng_state()
    result = invert(model, target, y[:2], x.shape[1:], preset="gradinversion", iterations=5, box=False,
                    progress=False)
    assert result.threat_model["bn_statistics_known"] is True
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())  # the BN hooks were removed


def test_bn_prior_matches_running_statistics(digits):
    """At the initial dummy data, the BN term equals Σ ‖μ − running_mean‖ + ‖σ² − running_var‖."""
    _, x, y = digits
    model = bn_convnet()
    target = flat_gradient(model, x[:2], y[:2])
    kw = dict(iterations=0, progress=False, seed=3)
    without = invert(model, target, y[:2], x.shape[1:], bn=0.0, **kw)
    with_bn = invert(model, target, y[:2], x.shape[1:], bn=1.0, **kw)
    assert torch.equal(without.x, with_bn.x)
    expected, hooks = [], []
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            def hook(mod, inputs, out):
                h = inputs[0]
                mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
                expected.append(float((mean - mod.running_mean).norm() + (var - mod.running_var).norm()))
            hooks.append(m.register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        model(with_bn.x)
    for h in hooks:
        h.remove()
    assert len(expected) == 3
    assert with_bn.objective - without.objective == pytest.approx(sum(expected), rel=1e-4)


@pytest.mark.parametrize("objective", ["l2", "cosine"])
def test_objective_formula_with_layer_weights(digits, objective):
    _, x, y = digits
    model = lenet()
    x0, y0 = x[:1], y[:1]
    target = flat_gradient(model, x0, y0)
    weights = [0.5, 0.0, 2.0, 1.0, 1.0, 1.0, 3.0, 1.0]
    result = invert(model, target, y0, x0.shape, objective=objective, layer_weights=weights, iterations=0,
                    progress=False)
    d = flat_gradient(model, result.x, y0)
    w = torch.cat([torch.full((p.numel(),), wi) for wi, p in zip(weights, model.parameters())])
    if objective == "l2":
        expected = (w * (d - target) ** 2).sum()
    else:
        expected = 1 - (w * d * target).sum() / ((w * d * d).sum().sqrt() * (w * target * target).sum().sqrt())
    assert result.gradient_distance == pytest.approx(float(expected), rel=1e-4)
    # the mapping form means the same thing
    names = [n for n, _ in model.named_parameters()]
    again = invert(model, target, y0, x0.shape, objective=objective, iterations=0, progress=False,
                   layer_weights={n: w_ for n, w_ in zip(names, weights) if w_ != 1.0})
    assert again.gradient_distance == pytest.approx(result.gradient_distance, rel=1e-6)


def test_target_gradient_formats_and_frozen_parameters(digits):
    _, x, y = digits
    model = lenet()
    x0, y0 = x[:1], y[:1]
    flat = flat_gradient(model, x0, y0)
    per_param = list(torch.split(flat, [p.numel() for p in model.parameters()]))
    kw = dict(max_evaluations=3, progress=False)
    a = invert(model, flat, y0, x0.shape, **kw)
    b = invert(model, per_param, y0, x0.shape, **kw)
    assert torch.equal(a.x, b.x)
    # a frozen first layer: the released vector may cover all parameters or only the trainable ones
    model.body[0].weight.requires_grad_(False)
    g = flat_gradient(model, x0, y0)
    full = torch.zeros(sum(p.numel() for p in model.parameters()))
    full[model.body[0].weight.numel():] = g
    c = invert(model, g, y0, x0.shape, **kw)
    d = invert(model, full, y0, x0.shape, **kw)
    assert torch.equal(c.x, d.x)
    assert parameters_to_vector(model.parameters()).numel() == full.numel()


@pytest.mark.parametrize("index", [0, 2, 3])
def test_label_optimisation_recovers_single_label(digits, index):
    """DLG's joint label optimisation at the dlg preset's defaults (a subset of the 20/20 benchmark)."""
    dm, x, y = digits
    model = lenet()
    x0, y0 = x[index : index + 1], y[index : index + 1]
    result = invert(model, flat_gradient(model, x0, y0), None, x0.shape, label_mode="optimize", progress=False)
    assert result.threat_model["labels"] == "optimized (DLG)"
    assert result.labels.tolist() == y0.tolist()
    assert psnr_of(result, x0, dm) > 25
    assert result.converged


def test_unknown_labels_for_a_batch_are_optimised(digits):
    _, x, y = digits
    model = lenet()
    result = invert(model, flat_gradient(model, x[:3], y[:3]), None, x.shape[1:], batch_size=3, iterations=2,
                    progress=False)
    assert result.labels.shape == (3,)
    assert result.x.shape == (3, 1, 16, 16)
    assert result.threat_model["labels"] == "optimized (DLG)"


# --- budgets, divergence, restarts ---------------------------------------------------------------

def test_dlg_visits_the_original_loops_points_without_repeating_evaluations(digits):
    """The dlg preset = DLG's loop (torch L-BFGS lr 1, 20 inner iterations per outer step, squared-L2
    gradient matching) point by point; the evaluation torch repeats at each step's start is free, and
    the attack ends where the original would stand still."""
    _, x, y = digits
    model = lenet()
    x0, y0 = x[:1], y[:1]
    target = torch.autograd.grad(F.cross_entropy(model(x0), y0), list(model.parameters()))
    seen: list[torch.Tensor] = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        ours = invert(model, list(target), y0, x0.shape, preset="dlg", progress=False)
        ours_points, seen[:] = list(seen), []
        dummy = invert(model, list(target), y0, x0.shape, preset="dlg", iterations=0, progress=False).x
        seen.clear()
        original = OriginalDLG(model, target, y0, dummy)
        for _ in range(ours.iterations):  # as many outer steps as ours took
            original.step()
        end = original.x.clone()
        for _ in range(3):  # the original stands still from here on
            original.step()
        assert torch.equal(original.x, end)
        calls = original.evaluations
    finally:
        hook.remove()
    distinct = [p for i, p in enumerate(seen) if i == 0 or not torch.equal(p, seen[i - 1])]
    assert ours.stop_reason == "converged"
    assert calls == len(seen) > len(distinct) + 3  # the original repeats evaluations ...
    assert ours.evaluations == len(ours_points) == len(distinct)  # ... ours does not
    assert ours.evaluations > ours.iterations  # several inner iterations per outer step
    for a, b in zip(ours_points, distinct):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_evaluation_budget_and_progress_callback(digits):
    _, x, y = digits
    model = lenet()
    target = flat_gradient(model, x[:2], y[:2])
    capped = invert(model, target, y[:2], x.shape[1:], max_evaluations=37, progress=False)
    assert capped.stop_reason == "budget_evaluations" and capped.evaluations == 37 and not capped.converged

    calls: list[tuple[int, float]] = []

    def progress(iteration: int, objective: float) -> bool:
        calls.append((iteration, objective))
        return len(calls) == 3  # stop at the third call

    kw = dict(preset="inverting_gradients", box=False, lr_schedule=False, iterations=1000, progress=False)
    stopped = invert(model, target, y[:2], x.shape[1:], progress_callback=progress, progress_every=5, **kw)
    assert [i for i, _ in calls] == [5, 10, 15]
    assert all(math.isfinite(v) for _, v in calls)
    assert stopped.stop_reason == "callback" and stopped.iterations == 15
    assert stopped.evaluations == 16  # 15 steps and the end point
    full = invert(model, target, y[:2], x.shape[1:], **{**kw, "iterations": 15})
    assert full.stop_reason == "budget_iterations" and full.evaluations == 16
    assert torch.equal(full.x, stopped.x)
    with pytest.raises(ConfigError, match="progress_callback must be callable"):
        invert(model, target, y[:2], x.shape[1:], progress_callback=3, **kw)


def test_divergence_returns_failed_result_with_finite_best_iterate(digits):
    dm, x, y = digits
    model = lenet()
    x0, y0 = x[:1], y[:1]
    calls = {"n": 0}

    def poisoned_loss(logits, target):
        calls["n"] += 1
        loss = F.cross_entropy(logits, target)
        return loss * math.nan if calls["n"] > 5 else loss

    result = invert(model, flat_gradient(model, x0, y0), y0, x0.shape, preset="inverting_gradients", box=False,
                    iterations=50, loss_fn=poisoned_loss, progress=False)
    assert result.failed and result.stop_reason == "diverged"
    assert "NaN/inf" in result.reason
    assert result.iterations == 5
    assert bool(torch.isfinite(result.x).all()) and math.isfinite(result.objective)
    metrics = reconstruction_metrics(result.x, x0, denormalize=dm.denormalize)
    assert all(math.isfinite(v) for v in metrics.values())


def test_non_finite_released_gradient_fails_cleanly(digits):
    _, x, y = digits
    model = lenet()
    target = flat_gradient(model, x[:1], y[:1])
    target[7] = math.inf
    result = invert(model, target, y[:1], x.shape[1:], progress=False)
    assert result.failed and result.iterations == 0
    assert "released gradient" in result.reason
    assert bool(torch.isfinite(result.x).all())


def test_step_decay_plateau_brings_decays_forward_then_converges():
    """Geiping's milestones at 3/8, 5/8, 7/8 of 800 iterations (300, 500, 700); a plateau (the best not
    1% below its value at the last improvement for 20 steps) brings the next decay forward; a slow steady
    fall is not a plateau; a plateau after the last decay is convergence."""
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([param], lr=0.1)
    schedule = _StepDecay(optimizer, attack_config("inverting_gradients", box=False, iterations=800, patience=20,
                                                   plateau_rtol=0.01))
    lrs, stopped_at = [], None
    objective = 1.0
    for step in range(1, 801):
        if step <= 100:
            objective *= 0.999  # -0.1% a step: 1% every 11 steps, never 20 steps without
        elif 130 < step <= 600:
            objective *= 0.995  # 1% every 3 steps
        if schedule.step(step, objective):
            stopped_at = step
            break
        lrs.append(optimizer.param_groups[0]["lr"])
    decays = [i + 1 for i in range(1, len(lrs)) if lrs[i] < lrs[i - 1]]
    # last improvement at 100 -> plateau at 120 (decay 1, used from step 121); progress from 131 on, so
    # decay 2 waits for its milestone (500); last improvement at 599 -> plateau at 619 (decay 3), and
    # 20 more steps without progress: converged at 639
    assert decays == [120, 500, 619] and stopped_at == 639
    assert lrs[-1] == pytest.approx(1e-4)
    # without patience it is MultiStepLR's schedule exactly
    optimizer = torch.optim.Adam([param], lr=0.1)
    fixed = _StepDecay(optimizer, attack_config("inverting_gradients", box=False, iterations=800, patience=None))
    reference = torch.optim.lr_scheduler.MultiStepLR(torch.optim.Adam([param], lr=0.1), [300, 500, 700], 0.1)
    for step in range(1, 801):
        assert not fixed.step(step, 1.0)
        reference.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0])


def test_wall_clock_budget_stops_the_attack(digits, attack_clock):
    """The time budget against a clock that advances 1 s per reading: the start, then one reading before every
    evaluation. 10.5 s allow 10 evaluations; the 11th reading is past the budget."""
    _, x, y = digits
    model = lenet()
    result = invert(model, flat_gradient(model, x[:1], y[:1]), y[:1], x.shape[1:], preset="inverting_gradients",
                    box=False, iterations=1_000_000, max_seconds=10.5, progress=False)
    assert result.stop_reason == "budget_time" and not result.failed
    assert result.evaluations == 10 and result.iterations == 10
    assert result.seconds == 12.0  # the start, 11 budget checks, the end: the result reports the attack's clock


def test_restarts_keep_the_best_objective_and_seed_is_deterministic(digits):
    _, x, y = digits
    model = lenet()
    target = flat_gradient(model, x[:1], y[:1])
    kw = dict(preset="inverting_gradients", box=False, iterations=20, progress=False)
    one = invert(model, target, y[:1], x.shape[1:], **kw)
    again = invert(model, target, y[:1], x.shape[1:], **kw)
    assert torch.equal(one.x, again.x)
    three = invert(model, target, y[:1], x.shape[1:], restarts=3, **kw)
    assert three.objective <= one.objective
    assert three.iterations == 60
    other_seed = invert(model, target, y[:1], x.shape[1:], seed=1, **kw)
    assert not torch.equal(one.x, other_seed.x)


@pytest.mark.parametrize("init", ["randn", "rand", "zeros"])
def test_inits(digits, init):
    dm, x, y = digits
    model = lenet()
    lo, hi = dm.pixel_bounds()
    result = invert(model, flat_gradient(model, x[:1], y[:1]), y[:1], x.shape[1:], init=init, bounds=(lo, hi),
                    iterations=0, progress=False)
    if init == "zeros":
        assert torch.equal(result.x, torch.zeros_like(result.x))
    elif init == "rand":  # uniform inside the valid pixel range
        assert bool((result.x >= lo).all() and (result.x <= hi).all())
    else:
        assert float(result.x.std()) > 0.5


# --- configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dlg", "inverting_gradients", "gradinversion"])
def test_hydra_attack_configs_are_accepted_by_invert(digits, name):
    dm, x, y = digits
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_ATTACK / f"{name}.yaml"))
    preset = cfg.pop("preset")
    assert preset == name and name in PRESETS
    cfg["iterations"] = 2
    model = bn_convnet() if name == "gradinversion" else lenet()
    result = invert(model, flat_gradient(model, x[:1], y[:1]), y[:1], x.shape[1:], preset=preset,
                    bounds=dm.pixel_bounds(), **cfg)
    assert result.iterations == 2 and not result.failed
    # the yaml states the preset's own values
    resolved = attack_config(preset, bounds=dm.pixel_bounds())
    for key, value in cfg.items():
        if key not in ("iterations", "progress"):
            assert getattr(resolved, key) == value, key


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "nope"}, "unknown attack preset"),
        ({"objective": "l1"}, "unknown attack objective"),
        ({"optimizer": "sgd"}, "unknown attack optimizer"),
        ({"init": "ones"}, "unknown attack init"),
        ({"learning_rate": 0.1}, "unknown attack option"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"box": True}, "needs bounds"),
        ({"layer_weights": [1.0, 2.0]}, "layer_weights has 2 entries"),
        ({"layer_weights": {"nope.weight": 1.0}}, "unknown parameters"),
        ({"bounds": (1.0, -1.0)}, "lo < hi"),
    ],
)
def test_bad_options_raise_one_line_config_errors(digits, kwargs, message):
    _, x, y = digits
    model = lenet()
    with pytest.raises(ConfigError, match=message):
        invert(model, flat_gradient(model, x[:1], y[:1]), y[:1], x.shape[1:], progress=False, **kwargs)


def test_bad_shapes_raise_config_errors(digits):
    _, x, y = digits
    model = lenet()
    g = flat_gradient(model, x[:1], y[:1])
    with pytest.raises(ConfigError, match="target_grad does not match"):
        invert(model, g[:-1], y[:1], x.shape[1:], progress=False)
    with pytest.raises(ConfigError, match="input_shape"):
        invert(model, g, y[:1], (16, 16), progress=False)
    with pytest.raises(ConfigError, match="2 labels for a batch of 1"):
        invert(model, g, y[:2], (1, 1, 16, 16), progress=False)
    with pytest.raises(ConfigError, match="batch size 1 only"):
        invert(model, g, None, (2, 1, 16, 16), label_mode="idlg", progress=False)
    with pytest.raises(ConfigError, match="needs labels"):
        invert(model, g, None, (1, 16, 16), label_mode="known", progress=False)
