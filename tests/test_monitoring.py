"""The monitor's pure schedule/budget objects (no Trainer) and its cheap evaluation against full precision."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch

from conftest import TickingClock
from pl_i2f.monitoring import Coverage, DenseEarlySchedule, OverheadBudget, ProductCost

# --- schedule ---------------------------------------------------------------------------------------


def test_default_schedule_is_dense_early_and_ends_on_the_final_step():
    schedule = DenseEarlySchedule()  # every 100, first 10, growth 2
    steps = schedule.steps(1200)  # the default digits run: 30 epochs x 40 steps
    assert steps == [0, 10, 20, 40, 80, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1100, 1200]
    assert len(steps) >= 15
    assert [s for s in range(1201) if schedule.due(s, 1200)] == steps
    assert schedule.steps(57) == [0, 10, 20, 40, 57] and schedule.remaining(20, 57) == 3
    assert DenseEarlySchedule(every_n_steps=3, first_step=10).steps(12) == [0, 3, 6, 9, 12]


@pytest.mark.parametrize("bad", [{"every_n_steps": 0}, {"first_step": 0}, {"growth": 1.0}])
def test_schedule_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        DenseEarlySchedule(**bad)


# --- product cost --------------------------------------------------------------------------------------


def test_product_cost_separates_fixed_and_per_vector_parts():
    cost = ProductCost()
    for vectors in (1, 8, 64):
        cost.observe(1, vectors, 0.08 + 0.002 * vectors)  # overhead-bound, like lenet_zhu under vmap
    a, b = cost.coefficients()
    assert a == pytest.approx(0.08) and b == pytest.approx(0.002)
    assert cost.predict(16, 16 * 32) == pytest.approx(16 * 0.08 + 0.002 * 512)
    one_size = ProductCost()
    one_size.observe(1, 1, 0.5)  # compute-bound, timed at one vector only: linear, the safe side
    assert one_size.coefficients() == (0.0, 0.5) and one_size.predict(2, 64) == pytest.approx(32.0)
    restored = ProductCost()
    restored.load_state_dict(cost.state_dict())
    assert restored.coefficients() == pytest.approx(cost.coefficients())


def test_product_cost_follows_the_latest_prices_where_the_cost_drifts():
    cost = ProductCost()
    for _ in range(2):  # the first evaluations of a run: cold memory, 8 ms + 4 ms a probe
        cost.observe(1, 8, 0.040)
        cost.observe(1, 4, 0.024)
    for _ in range(3):  # later: 4 ms + 3 ms a probe
        cost.observe(1, 8, 0.028)
        cost.observe(1, 4, 0.016)
    # an unweighted fit predicts 8 probes at 0.0328 s (17% over); the latest prices weigh most in the level
    assert cost.predict(1, 8) == pytest.approx(0.028, rel=0.08)
    restored = ProductCost()
    restored.load_state_dict(cost.state_dict())
    assert restored.predict(1, 8) == pytest.approx(cost.predict(1, 8))


def test_one_evaluation_slowed_by_a_passing_load_does_not_price_the_next_ones_dear():
    """The fixed part is the weighted median of what each evaluation left over: one evaluation taking 45 ms where
    its like take 26 leaves the next price near 26 (a weighted mean: 32, a probe or two fewer at every evaluation
    planned on it); three in a row at 34 ms are a new level, and the price follows."""
    cost = ProductCost()
    cost.observe(1, 1, 0.0095)  # the first evaluation's one-probe price
    for _ in range(5):
        cost.observe(1, 8, 0.026)
        cost.observe(1, 7, 0.0236)
    cost.observe(1, 8, 0.045)
    assert cost.predict(1, 8) == pytest.approx(0.026, rel=0.03)
    for _ in range(3):
        cost.observe(1, 8, 0.034)
    assert cost.predict(1, 8) == pytest.approx(0.034, rel=0.03)


def test_product_cost_keeps_a_part_per_probe_when_the_latest_sizes_are_close_and_noisy():
    from pl_i2f.monitoring import PRICE_DECAY, _weighted_line

    cost = ProductCost()
    # the one-probe price, then evaluations of 7-9 probes, the latest 7-probe ones slowed by load
    observations = [(1, 0.008), (8, 0.033), *[(8, 0.025), (9, 0.027)] * 4, (9, 0.025), (7, 0.029), (8, 0.026),
                    (9, 0.025), (7, 0.028)]
    for probes, seconds in observations:
        cost.observe(1, probes, seconds)
    # fitted on the latest alone, the slope is negative, clipped to 0: 32 probes would cost what 8 do
    weights = [PRICE_DECAY ** (len(observations) - 1 - i) for i in range(len(observations))]
    assert _weighted_line(cost.observations, weights)[1] == 0
    b = cost.coefficients()[1]
    assert b > 0.002 and cost.predict(1, 32) > 2.5 * cost.predict(1, 8)  # with b = 0: the same price


# --- budget ---------------------------------------------------------------------------------------------


def overhead_bound_cost() -> ProductCost:
    cost = ProductCost()
    for vectors in (1, 8, 64):
        cost.observe(1, vectors, 0.1 + 0.001 * vectors)
    return cost


def test_budget_is_a_fraction_of_the_measured_training_time():
    budget = OverheadBudget(0.1, DenseEarlySchedule(), total_steps=1200)
    assert budget.total() == 0 and budget.training_estimate() is None  # nothing measured yet
    budget.record_training(steps=3, seconds=0.15)  # 50 ms per step
    assert budget.training_estimate() == pytest.approx(60.0) and budget.total() == pytest.approx(6.0)
    budget.charge(1.0)
    assert budget.left() == pytest.approx(5.0)
    assert budget.remaining(0) == 17 and budget.remaining(1200) == 1
    assert OverheadBudget(None, DenseEarlySchedule()).left() == math.inf


def test_first_step_one_off_seconds_count_once_as_training_time():
    """A defense's first refresh (seconds, in the fit's first step) is training time: counted once in the budget,
    not extrapolated over every step as a rate, and not dropped either (a short run would then get no budget)."""
    from pl_i2f.monitoring import EvaluationPlanner

    clock = FakeClock()
    planner = EvaluationPlanner(0.1, DenseEarlySchedule(), clock=clock)
    planner.start_fit(0, 80)
    planner.record_training(0)
    clock.now = 3.5  # step 0: the anisotropic directions' refresh
    planner.record_training(1)
    clock.now += 0.01 * 9  # then 10 ms a step
    planner.record_training(10)
    assert planner.budget.training_estimate() == pytest.approx(3.5 + 0.01 * 79)
    assert planner.training_seconds == pytest.approx(3.59)
    planner.charge(0.2)
    clock.now += 0.2 + 0.01 * 10  # an evaluation, then ten more steps: the monitor's seconds are not training
    planner.record_training(20)
    assert planner.training_seconds == pytest.approx(3.69)


# --- the cheap evaluation against full precision ---------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run():
    """lenet_zhu (Xavier) trained with Adam on digits, weights kept along the way (the default run's model)."""
    from pl_i2f.data import build_datamodule
    from pl_i2f.models import build_model

    dm = build_datamodule("digits", seed=0)
    dm.setup("fit")
    torch.manual_seed(0)
    model = build_model("lenet_zhu", (1, 16, 16), 10, init="xavier_uniform")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    keep, kept, step = (0, 10, 20, 40, 80, 100, 200, 300, 400), {}, 0
    kept[0] = copy.deepcopy(model)
    while step < keep[-1]:
        for xb, yb in dm.train_dataloader():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            step += 1
            if step in keep:
                kept[step] = copy.deepcopy(model)
            if step >= keep[-1]:
                break
    x, y = dm.probe_batch(8)
    return dm, kept, x, y


def test_monitoring_estimate_agrees_with_full_precision_along_a_run(digits_run):
    """The warm-started chain of evaluations (as the monitor runs them) against exact spectra on the same
    weights: the mean expected I²F within 5% at every checkpoint."""
    from pl_i2f.defenses import build as build_defense
    from pl_i2f.influence import per_sample_leakage
    from pl_i2f.leakage import monitor_leakage

    _, kept, x, y = digits_run
    defense = build_defense(name="none")
    basis, errors, warm = None, {}, []
    for step, model in kept.items():
        report = monitor_leakage(model, x, y, defense, step, basis=basis, steps=16 if basis is not None else 8)
        basis = report.basis.basis
        warm.append(report.basis.warm)
        exact = per_sample_leakage(model, x, y, noise_std=1.0, relative_damping=0.01, method="exact")
        errors[step] = float(report.per_sample.expected_i2f.mean()) / float(exact.expected_i2f.mean()) - 1
        assert report.scalars["damping"] == pytest.approx(exact.damping, rel=0.05)  # Ritz λ_max
    assert warm[0] is False and all(warm[1:])
    assert max(abs(e) for e in errors.values()) < 0.05, errors


def test_calibrated_sketch_agrees_with_the_exact_headline_along_a_run(digits_run):
    """The matrix-free route (the Nyström sketch used beyond 1,024 input values) against the exact route on the
    same weights all along a run: the exact value inside the sketch's stated bounds at every checkpoint (its
    midpoint within 5% on the untrained weights; trained weights spread the spectrum and widen the bounds,
    which the monitor logs as error_half_width_db)."""
    from pl_i2f.calibrated import prior_from_dataset
    from pl_i2f.leakage import Calibrated, LeakageOptions, leakage_report, mean_pixel_std
    from pl_i2f.threat import SampleNoise

    dm, kept, x, y = digits_run
    prior = prior_from_dataset(dm.train_set)
    options = LeakageOptions(prior=prior, pixel_std=mean_pixel_std(dm), worst_k=0)
    errors = {}
    for step, model in kept.items():
        noise = SampleNoise(std=0.05 * float(model(x).abs().mean()), source="gaussian")
        exact = leakage_report(model, x, y, noise, options, Calibrated(), step=step)
        sketch = leakage_report(model, x, y, noise, options, Calibrated(exact_max_dim=0, rank=128), step=step,
                                generator=torch.Generator().manual_seed(0))
        lo, hi = sketch.posterior.bounds()
        value = exact.posterior.error()
        assert bool((value >= lo * (1 - 1e-6)).all() and (value <= hi * (1 + 1e-6)).all()), step
        errors[step] = sketch.scalars["expected_pixel_rmse"] / exact.scalars["expected_pixel_rmse"] - 1
    assert abs(errors[0]) < 0.05, errors  # untrained: the sketch captures the spectrum


def test_sigma_for_target_reaches_the_target_through_the_engine(digits_run):
    """Gaussian noise of the σ the monitor names, drawn and pushed through the engine (dense spectra, Monte
    Carlo over the draws), gives the target expected pixel RMSE within 5%."""
    from pl_i2f.defenses import build as build_defense
    from pl_i2f.influence import per_sample_leakage
    from pl_i2f.leakage import mean_pixel_std, monitor_leakage

    dm, kept, x, y = digits_run
    model, target = kept[100], 0.05
    report = monitor_leakage(model, x, y, build_defense(name="none"), 100, pixel_std=mean_pixel_std(dm),
                                target_pixel_rmse=target, steps=16)
    sigma = report.scalars["sigma_for_target"]
    d_theta = sum(p.numel() for p in model.parameters())

    def gaussian(generator: torch.Generator) -> torch.Tensor:
        return sigma * torch.randn(64, d_theta, generator=generator)

    noisy = per_sample_leakage(model, x, y, noise_sampler=gaussian, noise_draws=256, relative_damping=0.01,
                               method="exact", generator=torch.Generator().manual_seed(1))
    pixel = noisy.expected_i2f_rmse * mean_pixel_std(dm)
    assert float(pixel.mean()) == pytest.approx(target, rel=0.05)


def test_sigma_for_target_within_a_factor_two_of_the_real_dlg_attack():
    """On the DLG setting (lenet_zhu, uniform ±0.5 init, one digit, labels known) the undamped estimate's σ
    for a 0.03 pixel RMSE makes DLG's reconstruction land within a factor 2 of 0.03 (measured: 0.026-0.029)."""
    from pl_i2f.attacks import invert
    from pl_i2f.data import build_datamodule
    from pl_i2f.defenses import build as build_defense
    from pl_i2f.gradients import flat_gradient
    from pl_i2f.leakage import mean_pixel_std, monitor_leakage
    from pl_i2f.metrics import reconstruction_metrics
    from pl_i2f.models import build_model

    dm = build_datamodule("digits")
    x, y = dm.probe_batch(1)
    torch.manual_seed(0)
    model = build_model("lenet_zhu", (1, 16, 16), 10, init="uniform")
    target = 0.03
    report = monitor_leakage(model, x, y, build_defense(name="none"), 0, pixel_std=mean_pixel_std(dm),
                                target_pixel_rmse=target, relative_damping=0.0, steps=16)
    sigma = report.scalars["sigma_for_target"]
    released = flat_gradient(model, x, y)
    released = released + sigma * torch.randn(released.shape, generator=torch.Generator().manual_seed(0))
    result = invert(model, released, y, x.shape, preset="dlg", iterations=200, progress=False)
    rmse = reconstruction_metrics(result.x, x, denormalize=dm.denormalize)["rmse"]
    assert target / 2 < rmse < 2 * target, rmse


def test_i2f_converged_is_judged_on_the_true_residual():
    """Found by the cross-check: an undamped float32 solve used to report converged=True (CG's recursive
    residual met tol 1e-8) beside a true residual of ~1e-5, without a warning."""
    from pl_i2f.influence import ConvergenceWarning, GradientJacobian, i2f
    from pl_i2f.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet_zhu", (1, 8, 8), 10, init="uniform")
    x, y = torch.randn(1, 1, 8, 8), torch.tensor([3])
    op = GradientJacobian(model, x, y)
    delta = torch.randn(op.d_theta, generator=torch.Generator().manual_seed(0))
    with pytest.warns(ConvergenceWarning, match="relative residual"):
        result = i2f(op, delta, tol=1e-8)
    assert result.residual > 1e-8 and result.converged is False
    loose = i2f(op, delta, tol=max(10 * result.residual, 1e-3))
    assert loose.converged is True and loose.residual <= max(10 * result.residual, 1e-3)


def test_expected_attack_psnr_is_an_attack_score_only_where_there_is_noise():
    """Gaussian noise: the mean of per-probe PSNRs of the expected pixel RMSE, never below 0 dB (a [0, 1]
    reconstruction is within RMSE 1). No noise (values per unit σ): no PSNR, and σ for the target instead."""
    from pl_i2f.defenses import Defense, GaussianDefense
    from pl_i2f.leakage import measure_leakage
    from pl_i2f.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 3, 3), num_classes=3, hidden=[4])
    x, y = torch.randn(3, 1, 3, 3), torch.tensor([0, 1, 2])
    for sigma in (1e-4, 10.0):
        report = measure_leakage(model, x, y, GaussianDefense(sigma=sigma), 0, worst_k=0, batch_size=1,
                                 generator=torch.Generator().manual_seed(0))
        expected = -20 * torch.log10(report.pixel_rmse.double().pow(2).mean().sqrt().clamp(max=1.0))
        assert report.scalars["expected_attack_psnr"] == pytest.approx(float(expected))
        assert report.scalars["expected_attack_psnr"] >= 0
    report = measure_leakage(model, x, y, Defense(), 0, worst_k=0, generator=torch.Generator().manual_seed(0))
    assert "expected_attack_psnr" not in report.scalars and report.scalars["sigma_for_target"] > 0


def test_one_probe_reports_no_unfairness():
    """Unfairness is a spread over probes: a reduced one-probe evaluation has none to report."""
    from pl_i2f.defenses import GaussianDefense
    from pl_i2f.leakage import measure_leakage
    from pl_i2f.models import build_model

    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 3, 3), num_classes=3, hidden=[4])
    x, y = torch.randn(3, 1, 3, 3), torch.tensor([0, 1, 2])
    one = measure_leakage(model, x[:1], y[:1], GaussianDefense(sigma=0.1), 0, generator=torch.Generator(), batch_size=1)
    three = measure_leakage(model, x, y, GaussianDefense(sigma=0.1), 0, generator=torch.Generator(), batch_size=1)
    assert "unfairness_cv" not in one.scalars and "unfairness_p90_p10" not in one.scalars
    assert three.scalars["unfairness_cv"] > 0 and three.scalars["unfairness_p90_p10"] >= 1


# --- the two paths, priced apart; reductions that keep probes; the self-limiting fresh basis -----------------


def test_fresh_basis_stops_where_its_caller_says_but_not_below_the_minimum(digits_run):
    """The solver reads no clock: ``keep_going`` ends a fresh basis; WarmBasis turns a (timed) stop rule into it,
    never below ``min_steps``. Time comes from an injected clock."""
    from pl_i2f.gradients import eval_mode
    from pl_i2f.influence import PerSampleOperator
    from pl_i2f.influence.damping import Damping
    from pl_i2f.influence.warm import basis_leakage
    from pl_i2f.leakage import LeakageOptions, WarmBasis, leakage_report
    from pl_i2f.threat import SampleNoise

    _, kept, x, y = digits_run
    model = kept[0]
    damping = Damping.request(0.0, relative=0.01, d_x=256, dtype=torch.float32, caller="test")
    with eval_mode(model):
        operator = PerSampleOperator(model, x[:2], y[:2])
        stopped = basis_leakage(operator, damping, steps=8, keep_going=lambda steps: steps < 3)
        full = basis_leakage(operator, damping, steps=8)
    assert stopped.products == (3, 6) and stopped.basis.shape[1] == 3 and full.products == (8, 16)
    ticks = iter(range(1000))
    seen: list[tuple[int, float, float]] = []

    def over_budget(steps: int, elapsed: float, last: float) -> bool:
        seen.append((steps, elapsed, last))
        return True  # nothing fits: the basis stops at the minimum

    estimator = WarmBasis(steps=8, stop=over_budget, min_steps=2, clock=lambda: float(next(ticks)))
    report = leakage_report(model, x[:2], y[:2], SampleNoise(),
                            LeakageOptions(), estimator)
    assert report.basis.products == (2, 4) and seen == [(2, 2.0, 1.0)]  # one tick per step


def test_exact_spectra_from_the_jacobian_match_the_dense_gram(digits_run):
    from pl_i2f.gradients import eval_mode
    from pl_i2f.influence import PerSampleOperator, per_sample_leakage
    from pl_i2f.influence.warm import exact_spectra

    _, kept, x, y = digits_run
    with eval_mode(kept[100]):
        eigenvalues = exact_spectra(PerSampleOperator(kept[100], x[:2], y[:2]), block_numbers=1 << 20)  # many blocks
    dense = per_sample_leakage(kept[100], x[:2], y[:2], method="exact", expected=False)
    assert torch.allclose(eigenvalues[:, -1], dense.lambda_max, rtol=1e-4)
    assert torch.allclose(eigenvalues[:, 0], dense.lambda_min, rtol=1e-2, atol=1e-6 * float(dense.lambda_max.max()))


@pytest.mark.parametrize("defense_name", ["none", "anisotropic"])
def test_one_evaluation_builds_the_per_sample_operator_once(digits_run, monkeypatch, defense_name):
    """A default monitor evaluation — basis, Monte Carlo over an anisotropic sampler's draws, exact spectra — and a
    full-precision one each build the per-sample operator once and share it."""
    import pl_i2f.leakage as leakage
    import pl_i2f.leakage.api  # noqa: F401  (leakage.api: where leakage_report builds the operator)
    from pl_i2f.defenses import build as build_defense
    from pl_i2f.influence import PerSampleOperator

    dm, kept, x, y = digits_run
    built: list[int] = []

    class Counted(PerSampleOperator):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(leakage.api, "PerSampleOperator", Counted)  # where leakage_report builds it
    defense = build_defense(name=defense_name, **({"sigma": 0.01} if defense_name != "none" else {}))
    if defense_name == "anisotropic":
        defense.noise.set_reference_from(dm)
    report = leakage.monitor_leakage(kept[100], x, y, defense, 100, exact_spectrum_probes=2, noise_draws=4,
                                     batch_size=1)
    assert len(built) == 1 and "lambda_min" in report.scalars
    leakage.monitor_leakage(kept[100], x, y, defense, 100, basis=report.basis.basis, noise_draws=4, batch_size=1)
    assert len(built) == 2
    leakage.measure_leakage(kept[100], x[:2], y[:2], defense, 100, noise_draws=4, batch_size=1)
    assert len(built) == 3


def test_undamped_leakage_equals_dense_float64_algebra_on_trained_weights(digits_run):
    """The audit's attack-calibrated estimate: σ·√(Σ 1/sᵢ²)/√d_x·pixel_std per sample, sᵢ the singular values of
    Jᵢ (explicit, float64), on weights trained for 400 steps (JJᵀ's condition number ~10⁶, beyond float32's rank
    threshold d_x·u ≈ 3·10⁻⁵); it is
    never below the damped headline, and it is not computed where it cannot be exact."""
    from torch.func import jacfwd

    from pl_i2f.defenses import build as build_defense
    from pl_i2f.influence.operator import GradientJacobian
    from pl_i2f.leakage import measure_leakage, undamped_leakage

    _, kept, x, y = digits_run
    model, sigma, pixel_std = kept[400], 0.01, 0.37
    defense = build_defense(name="gaussian", sigma=sigma)
    undamped = undamped_leakage(model, x[:3], y[:3], defense, 400, pixel_std=pixel_std, batch_size=1)
    model64 = copy.deepcopy(model).double()
    for i in range(3):
        op = GradientJacobian(model64, x[i: i + 1].double(), y[i: i + 1])
        singular = torch.linalg.svdvals(jacfwd(op._grad_of_x)(op.x).reshape(op.d_theta, op.d_x))
        expected = sigma * float((1 / singular**2).sum().sqrt()) / math.sqrt(op.d_x) * pixel_std
        assert float(undamped[i]) == pytest.approx(expected, rel=1e-6)
    damped = measure_leakage(model, x[:3], y[:3], defense, 400, pixel_std=pixel_std, method="exact", batch_size=1)
    assert bool((undamped >= damped.pixel_rmse).all())
    # 256 values > 100
    assert undamped_leakage(model, x[:3], y[:3], defense, 400, exact_max_dim=100, batch_size=1) is None
    anisotropic = build_defense(name="anisotropic", sigma=sigma, reference_size=2)
    anisotropic.noise.set_reference(x[6:], y[6:])
    assert undamped_leakage(model, x[:3], y[:3], anisotropic, 400, batch_size=1) is None


# --- the planner, on explicit numbers (no Trainer, an injected clock) ------------------------------------------


def FakeClock() -> TickingClock:
    """A clock that reads ``now`` and moves only when a test sets it."""
    return TickingClock(tick=0.0)


def simulated_run(load: Callable[[int], float], train_load: Callable[[int], float] | None = None, total: int = 1200,
                  max_overhead: float = 0.1, probe_seconds: float = 0.01):
    """Drive the planner through a run as I2FMonitor does, every cost from a model of a machine whose load
    multiplies each of the monitor's seconds (``load(step)``) and each training second (``train_load``, default
    the same), on an injected clock: (monitor seconds, training seconds, evaluated steps, probes per evaluation)."""
    train_load = load if train_load is None else train_load
    from pl_i2f.monitoring import EvaluationPlanner

    clock = FakeClock()
    planner = EvaluationPlanner(max_overhead, DenseEarlySchedule(), clock=clock)
    planner.start_fit(0, total)
    evaluated, counts = [], []
    step_cost = 0.015  # lenet_zhu on digits, seconds a training step on an idle core

    def run(probes: int, step: int) -> None:
        seconds = (0.005 + probe_seconds * probes) * load(step)
        clock.now += seconds
        planner.charge(seconds)
        planner.observe(probes, seconds)

    def evaluate(step: int, final: bool) -> None:
        if planner.needs_pricing:
            run(1, step)
            count = planner.probes_for(step, 32, final=final)
            if count <= 1:
                evaluated.append(step), counts.append(1)
                return
        count = planner.probes_for(step, 32, final=final)
        if count:
            run(count, step)
            evaluated.append(step), counts.append(count)

    drive(planner, evaluate, total, lambda step: setattr(clock, "now", clock.now + step_cost * train_load(step)))
    return planner.spent_seconds, planner.training_seconds, evaluated, counts


def drive(planner, evaluate: Callable[[int, bool], None], total: int, train: Callable[[int], None]) -> None:
    """The monitor's hooks over a run of ``total`` steps: the step-0 evaluation after 3 warm-up steps, every due
    step, then the final one (``train(step)`` advances the clock by a training step)."""
    pending = None
    for step in range(total):
        planner.record_training(step)
        if pending is not None and step >= 3:
            evaluate(pending, False)
            pending = None
        if planner.budget.due(step):
            if planner.budget.train_steps == 0:
                pending = step
            else:
                evaluate(step, False)
        train(step)
    planner.record_training(total)
    evaluate(total, True)


@pytest.mark.parametrize(("load", "train_load"), [
    (lambda step: 1.0, None),  # an idle machine
    (lambda step: 3.0, None),  # a CPU hog on the other core all along
    (lambda step: 1.0 if step < 400 else 4.0, None),  # a hog arriving mid-run
    (lambda step: 4.0, lambda step: 1.5),  # the monitor's multi-threaded products slowed more than training
], ids=["idle", "loaded", "load-arrives", "monitor-slowed-more"])
def test_loaded_machine_keeps_the_budget_and_evaluates_the_final_step(load, train_load):
    """A CPU hog, simulated on an injected clock: the monitor's share of the training time stays within
    max_overhead and the final weights are evaluated. (The budget is a projection of the training time from the
    rate so far: a machine whose load *leaves* early in a run makes the projection, and so the budget, too large
    for the steps already taken; the final share is then over.)"""
    spent, training, evaluated, _ = simulated_run(load, train_load)
    assert spent <= 0.1 * training, (spent, training)
    assert evaluated[-1] == 1200 and len(evaluated) >= 10


def test_planner_spends_the_whole_budget_evenly_over_the_evaluations():
    """Probes per evaluation come from the budget left over every evaluation still scheduled: a cheap probe
    gives all 32 everywhere, a dearer one fewer but the same number at every evaluation (not a thinner plan
    late), and the share spent approaches the limit instead of stopping at half."""
    spent, training, evaluated, counts = simulated_run(lambda step: 1.0, probe_seconds=0.001)
    assert (len(evaluated) == 17 and counts == [1] + [32] * 16) or counts[1:] == [32] * 16, counts
    spent, training, evaluated, counts = simulated_run(lambda step: 1.0, probe_seconds=0.01)
    assert len(evaluated) == 17 and min(counts[1:]) >= 8 and spent >= 0.07 * training, (counts, spent, training)
    assert spent <= 0.1 * training


def test_planner_always_runs_the_final_evaluation():
    from pl_i2f.monitoring import EvaluationPlanner

    clock = FakeClock()
    planner = EvaluationPlanner(1e-6, DenseEarlySchedule(), clock=clock)
    planner.start_fit(0, 100)
    clock.now = 1.0
    planner.record_training(3)
    planner.observe(8, 1.0)
    assert planner.probes_for(50, 8, final=False) == 0  # skipped: nothing fits
    assert planner.probes_for(100, 8, final=True) == 1  # the final weights: at the smallest size


def test_coverage_rotates_and_says_what_it_covered():
    part = Coverage(start=30, count=4, total=32)
    assert part.indices() == [30, 31, 0, 1] and "4 of 32 probes" in part.describe()
    assert Coverage(0, 32, 32).describe() == "all 32 probes"


def test_resumed_run_reports_its_share_over_the_whole_run():
    """A run resumed from a checkpoint: the monitor's seconds (checkpointed) over the training seconds of every
    fit, not of the resumed fit alone."""
    from pl_i2f.monitoring import EvaluationPlanner

    clock = FakeClock()
    first = EvaluationPlanner(0.1, DenseEarlySchedule(), clock=clock)
    first.start_fit(0, 1200)
    clock.now = 0.02
    first.record_training(1)  # the first step's one-off costs: counted once, not as the rate
    clock.now = 20.0
    first.record_training(1000)
    resumed = EvaluationPlanner(0.1, DenseEarlySchedule(), clock=clock)
    resumed.load_state_dict(first.state_dict())
    resumed.start_fit(1000, 1200)
    clock.now += 0.02
    resumed.record_training(1001)
    clock.now += 3.98
    resumed.record_training(1200)
    assert resumed.training_seconds == pytest.approx(20.0 + 4.0)
    line = resumed.summary(17, 17, 2.0, 0, 0, 1200)
    assert "(8.3% of 24.0s training)" in line and line.endswith("leakage last measured at step 1200")


def test_summary_psnr_is_that_of_the_summary_rmse():
    """The headline PSNR is 20·log10(1/RMSE) of the summary RMSE itself (both from the mean over probes of each
    probe's per-pixel MSE), so the two can never disagree in direction."""
    from pl_i2f.calibrated import isotropic_prior
    from pl_i2f.leakage import Calibrated, LeakageOptions, leakage_report
    from pl_i2f.models import build_model
    from pl_i2f.threat import SampleNoise

    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 3, 3), num_classes=3, hidden=[16])
    x, y = torch.randn(4, 1, 3, 3), torch.tensor([0, 1, 2, 0])
    options = LeakageOptions(prior=isotropic_prior(0.0, 0.5, dim=9), pixel_std=0.3, batch_size=8)
    for std in (1e-3, 0.1, 10.0):
        scalars = leakage_report(model, x, y, SampleNoise(std=std), options, Calibrated()).scalars
        assert scalars["expected_attack_psnr"] == pytest.approx(-20 * math.log10(scalars["expected_pixel_rmse"]))
        assert scalars["prior_psnr"] == pytest.approx(-20 * math.log10(scalars["prior_pixel_rmse"]))
        assert scalars["gain_over_prior_db"] >= -1e-9 and scalars["noise_std"] == std
    none = leakage_report(model, x, y, SampleNoise(), options, Calibrated()).scalars
    assert "noise_std" not in none and not any(k.startswith("paper/") for k in none)
    assert none["determined_fraction"] == 1 and none["expected_pixel_rmse"] == 0  # exact recovery, no PSNR
    assert "expected_attack_psnr" not in none and none["sigma_for_target"] > 0


def test_every_logged_key_is_documented(digits_run):
    """Each key a calibrated report logs (DP-SGD-like clipped noise, a gaussian one, none) has its line in
    LEAKAGE_KEYS, which the README's key table is written from."""
    from pl_i2f.leakage import LEAKAGE_KEYS, calibrated_leakage, mean_pixel_std
    from pl_i2f.threat import SampleNoise

    dm, kept, x, y = digits_run
    for noise in (SampleNoise(std=0.5, clip_norm=1.0), SampleNoise(std=0.05), SampleNoise()):
        report = calibrated_leakage(kept[100], x[:3], y[:3], noise, 100, prior=dm.data_prior(),
                                    pixel_std=mean_pixel_std(dm), batch_size=64, clipping_norm=1.0)
        assert set(report.scalars) <= set(LEAKAGE_KEYS), set(report.scalars) - set(LEAKAGE_KEYS)


def planned_run(exact_probe: float, sketch_seconds: Callable[[int, int], float], *, sketch: bool = True,
                total: int = 1200, probes: int = 32, dim: int = 256):
    """Drive :meth:`EvaluationPlanner.plan` through a run as I2FMonitor does, on an injected clock: exact
    evaluations cost ``exact_probe`` per probe, a sketch ``sketch_seconds(probes, rank)``; (plans, monitor seconds,
    training seconds)."""
    from pl_i2f.monitoring import EvaluationPlanner, Plan

    clock = FakeClock()
    planner = EvaluationPlanner(0.1, DenseEarlySchedule(), clock=clock)
    planner.start_fit(0, total)
    plans: list[Plan] = []

    def run(plan: Plan) -> None:
        seconds = exact_probe * plan.count if plan.route == "exact" else sketch_seconds(plan.count, plan.rank)
        clock.now += seconds
        planner.charge(seconds)
        planner.observe(plan.count, seconds, plan)

    def evaluate(step: int, final: bool) -> None:
        first = not plans
        if planner.needs_pricing:
            run(Plan(1))
        plan = planner.plan(step, probes, final=final, first=first, dim=dim, sketch=sketch)
        if first and plan.count <= 1:
            plans.append(Plan(1))
            return
        if plan.count:
            run(plan)
        plans.append(plan)

    drive(planner, evaluate, total, lambda step: setattr(clock, "now", clock.now + 0.015))
    return plans, planner.spent_seconds, planner.training_seconds


def test_middle_evaluations_are_sketched_where_exact_fits_one_probe():
    """Exact Grams priced so that about one probe per evaluation fits, a rank-8 sketch of 8 probes far less: the
    middle evaluations are sketched on >= 8 probes, none skipped, the first and final exact, within the budget."""
    def sketch_seconds(probes: int, rank: int) -> float:
        return 0.002 + 0.0002 * probes * (rank + 8)

    plans, spent, training = planned_run(0.08, sketch_seconds)
    assert len(plans) == 17 and min(p.count for p in plans) >= 1, plans
    middle = plans[1:-1]
    assert all(p.route == "sketch" and p.count >= 8 and p.rank >= 8 for p in middle), middle
    assert plans[0].route == plans[-1].route == "exact" and plans[-1].count >= 1
    assert spent <= 0.1 * training, (spent, training)


def test_a_sketch_is_taken_only_where_it_covers_more_probes_than_exact_grams():
    """Exact Grams at 20 ms a probe (about 5 fit each evaluation), a sketch dearer per probe: once the first
    sketch has priced itself, every middle evaluation is exact on more probes than a sketch would cover."""
    plans, spent, training = planned_run(0.02, lambda probes, rank: 0.004 + 0.02 * probes * (rank + 8) / 16)
    middle = plans[1:-1]
    sketched = [p for p in middle if p.route == "sketch"]
    assert len(sketched) <= 1, middle  # the one that priced the sketch
    assert all(p.count >= 3 for p in middle if p.route == "exact") and plans[0].route == "exact", plans
    assert spent <= 0.1 * training, (spent, training)


def test_without_a_sketch_the_middle_evaluations_stay_exact_and_say_why():
    """Noise with a covariance, or none (no sketch): exact on fewer probes, the plan saying why."""
    plans, spent, training = planned_run(0.08, lambda probes, rank: 0.001, sketch=False)
    middle = [p for p in plans[1:-1] if p.count]
    assert middle and all(p.route == "exact" and p.count < 8 for p in middle), middle
    assert all("no sketch for this noise" in p.describe() for p in middle)
    assert spent <= 0.1 * training, (spent, training)


def test_cheap_exact_grams_need_no_sketch():
    """Where exact Grams for 8 probes fit every evaluation, every evaluation is exact."""
    plans, spent, training = planned_run(0.001, lambda probes, rank: 0.0001)
    assert all(p.route == "exact" for p in plans) and min(p.count for p in plans[1:]) >= 8, plans
    assert spent <= 0.1 * training, (spent, training)


def test_exact_only_runs_give_the_ends_the_aim_first():
    """No sketch and probes too dear for 8 everywhere: the first and final evaluations (their spectra and the run's
    summary) get 8 probes while every middle one keeps at least one, within the budget; with cheap probes the
    ends get at least the even share."""
    plans, spent, training = planned_run(0.04, lambda probes, rank: 0.001, sketch=False)
    assert len(plans) == 17 and plans[0].count >= 8 and plans[-1].count >= 8, plans
    assert all(1 <= p.count < 8 for p in plans[1:-1]), plans
    assert spent <= 0.1 * training, (spent, training)
    plans, spent, training = planned_run(0.001, lambda probes, rank: 0.0001, sketch=False)
    assert min(p.count for p in plans[1:]) >= 8 and plans[-1].count >= plans[1].count, plans


def test_a_tight_budget_still_keeps_the_final_evaluation_its_share():
    """Five evaluations (80 steps) and probes too dear for a probe of slack: the middle ones keep one probe each
    and the final gets more than any of them, within the budget (the slack gives way, not the keep-back)."""
    plans, spent, training = planned_run(0.006, lambda probes, rank: 1.0, sketch=False, total=80)
    assert len(plans) == 5 and all(p.count >= 1 for p in plans), plans
    assert plans[-1].count > max(p.count for p in plans[1:-1]) and plans[0].count > 1, plans
    assert spent <= 0.1 * training, (spent, training)


def test_the_clipped_what_if_spectrum_is_computed_at_the_ends_only():
    """DP-SGD's noise multiplier for a run that does not clip comes from a second spectrum per probe: under a budget
    the first and final evaluations compute it and the middle ones do not (whether exact or sketched); without a
    budget every evaluation does."""
    from pl_i2f.monitoring import EvaluationPlanner, Plan

    for sketch in (False, True):
        plans, _, _ = planned_run(0.001, lambda probes, rank: 0.0001, sketch=sketch)
        assert plans[0].what_if and plans[-1].what_if, plans
        assert not any(p.estimator_options()["clip_for_target"] for p in plans[1:-1]), plans
        assert plans[0].estimator_options()["clip_for_target"] and plans[-1].estimator_options()["clip_for_target"]
    unlimited = EvaluationPlanner(None, DenseEarlySchedule())
    unlimited.start_fit(0, 1200)
    assert unlimited.plan(300, 32, final=False, dim=60, sketch=True).estimator_options()["clip_for_target"]
    assert Plan(8, "sketch", 8, 8).estimator_options()["clip_for_target"] is False


def test_inputs_beyond_the_exact_range_are_sketched_at_the_smallest_rank_under_a_budget():
    """Inputs of more than EXACT_MAX_DIM values (no exact route: ``dim`` 0): under a budget the first price and
    every evaluation are rank-SKETCH_RANKS[-1] sketches (the estimator's own rank 64 costs several times as much),
    their prices comparable; without a budget the estimator's own rank."""
    from pl_i2f.monitoring import SKETCH_RANKS, SKETCH_RESIDUAL, EvaluationPlanner, Plan

    clock = FakeClock()
    planner = EvaluationPlanner(0.1, DenseEarlySchedule(), clock=clock)
    planner.start_fit(0, 1200)
    first = planner.route_plan(1, None)
    assert (first.route, first.rank, first.residual) == (None, SKETCH_RANKS[-1], SKETCH_RESIDUAL)
    assert first.estimator_options() == {"route": None, "clip_for_target": True, "rank": SKETCH_RANKS[-1],
                                         "probes": SKETCH_RESIDUAL}
    assert "rank-8 Nyström sketch" in first.describe()
    for step in (1, 900):  # 0.1 s a step: a 12 s budget
        clock.now = 0.1 * step
        planner.record_training(step)
    planner.observe(1, 0.01, first)
    planner.observe(2, 0.02, first)
    middle = planner.plan(900, 32, final=False, dim=0, sketch=False)
    final = planner.plan(1200, 32, final=True, dim=0, sketch=False)
    for plan in (middle, final):
        assert plan.count >= 1 and (plan.route, plan.rank) == (None, SKETCH_RANKS[-1]), plan
    assert not middle.estimator_options()["clip_for_target"] and final.estimator_options()["clip_for_target"]
    assert planner.route_plan(1, "exact") == Plan(1, "exact")
    unlimited = EvaluationPlanner(None, DenseEarlySchedule())
    unlimited.start_fit(0, 1200)
    own = unlimited.plan(300, 32, final=False, dim=0)
    assert (own.count, own.route, own.rank) == (32, None, 0) and "rank" not in own.estimator_options()


def test_sketched_runs_keep_the_final_evaluation_at_least_the_middle_ones():
    """With a sketch allowed: exact Grams cheap enough for every evaluation give the final weights at least as
    many probes as any middle one; dearer ones leave the final its 8 exact probes beside sketched middles."""
    plans, spent, _ = planned_run(0.006, lambda probes, rank: 0.002 + 0.0004 * probes * (rank + 8))
    assert all(p.route == "exact" for p in plans) and plans[-1].count >= max(p.count for p in plans[1:-1]), plans
    plans, spent, training = planned_run(0.08, lambda probes, rank: 0.002 + 0.0002 * probes * (rank + 8))
    assert plans[-1].route == "exact" and plans[-1].count >= 8, plans
    assert spent <= 0.1 * training


def test_the_next_due_step_is_the_first_scheduled_one_at_or_after_a_step():
    schedule = DenseEarlySchedule(every_n_steps=100, first_step=10, growth=2.0)
    steps = schedule.steps(1234)
    assert all(schedule.next_due(s, 1234) == min(t for t in steps if t >= s) for s in range(0, 1235))
    assert schedule.next_due(1235, 1234) == 1300 and schedule.next_due(41) == 80  # past the end: the next multiple


def test_the_final_evaluation_spends_the_reserve_the_middle_ones_keep():
    """The middle evaluations plan within SPEND_FRACTION of the budget (the training time is a projection, and
    prices a fit); at the final one the training time is measured and no later price can be off: it keeps only
    FINAL_RESERVE and what its logging will take."""
    from pl_i2f.monitoring import FINAL_RESERVE, SPEND_FRACTION, EvaluationPlanner

    def planner_with(left_share: float, final_logging: float = 0.0) -> EvaluationPlanner:
        clock = FakeClock()
        planner = EvaluationPlanner(0.1, DenseEarlySchedule(), clock=clock)
        planner.start_fit(0, 1200)
        clock.now = 120.0  # 0.1 s a step: a 12 s budget, all of it measured
        planner.record_training(1200)
        planner.observe(1, 0.01)
        planner.observe(2, 0.02)  # 0.01 s a probe, nothing fixed
        planner.charge(12.0 * (1 - left_share))
        planner.final_logging = final_logging
        return planner

    planner = planner_with(0.06)  # 0.72 s left
    middle = planner.probes_for(1100, 200, final=False)
    final = planner.probes_for(1200, 200, final=True)
    assert final == round(12.0 * (0.06 - FINAL_RESERVE) / 0.01)  # 48 probes
    assert middle <= round(12.0 * (0.06 - (1 - SPEND_FRACTION)) / 0.01) < final  # the middle one within its pool
    assert planner_with(0.06, final_logging=0.1).probes_for(1200, 200, final=True) == final - 10


def test_a_small_budget_keeps_a_share_of_the_final_evaluations_own_cost_back():
    """A budget of tens of milliseconds (15 steps), one-probe evaluations of 9 ms and 10 ms of tables at the end:
    2% of the budget is about a millisecond, less than such an evaluation varies by, so the final keeps back a
    quarter of its least evaluation and a middle one that would leave it less is not run; a large budget keeps 2%."""
    from pl_i2f.monitoring import FINAL_PRICE_SHARE, FINAL_RESERVE, EvaluationPlanner

    def planner_with(left: float, seconds_per_step: float, total: int) -> EvaluationPlanner:
        clock = FakeClock()
        planner = EvaluationPlanner(0.1, DenseEarlySchedule(), clock=clock)
        planner.start_fit(0, total)
        for step in (1, 10):
            clock.now = seconds_per_step * step
            planner.record_training(step)
        planner.observe(1, 0.009)
        planner.final_logging = 0.010  # its tables
        planner.charge(planner.budget.total() - left)
        return planner

    small = planner_with(0.031, 0.04, 15)  # a 60 ms budget, 31 ms of it left: the middle one and the final
    assert small._final_reserve() == pytest.approx(FINAL_PRICE_SHARE * 0.019)
    assert small._final_reserve() > FINAL_RESERVE * small.budget.total()
    assert small.probes_for(10, 32, final=False) == 0  # 9 ms each leaves the final less than its own reserve
    assert small.probes_for(15, 32, final=True) == 1
    large = planner_with(5.0, 0.04, 12000)
    assert large._final_reserve() == pytest.approx(FINAL_RESERVE * large.budget.total())


def _planned_short_of_the_aim(monkeypatch, share: float, epoch_ended: bool, final_logging: float = 0.0) -> int:
    """The probes of a middle evaluation at step 900 of 1,200 whose own pool (0.225 s for 3 middle evaluations at
    0.01 s a probe) falls a little short of AIM_PROBES each; ``final_logging`` shrinks what the final will have."""
    from pl_i2f import monitoring
    from pl_i2f.monitoring import SPEND_FRACTION, EvaluationPlanner

    monkeypatch.setattr(monitoring, "AIM_RESERVE_SHARE", share)
    clock = FakeClock()
    planner = EvaluationPlanner(0.1, DenseEarlySchedule(), clock=clock)
    planner.start_fit(0, 1200)
    for step in (1, 900):  # 0.1 s a step: a 12 s budget
        clock.now = 0.1 * step
        planner.record_training(step)
    if epoch_ended:
        planner.note_epoch_end()
    planner.observe(1, 0.01)
    planner.observe(2, 0.02)  # 0.01 s a probe
    planner.final_logging = final_logging
    planner.charge(12.0 - (1 - SPEND_FRACTION) * 12.0 - 0.225)  # a pool of 0.225 s for 3 middle evaluations
    return planner.plan(900, 32, final=False, dim=64).count


def test_a_middle_evaluation_short_of_the_aim_reaches_it_from_part_of_the_reserve(monkeypatch):
    """Exact Grams, the middle evaluations' pool a little short of AIM_PROBES each: the aim, planned from part of
    the reserve (a projection made before the first epoch's end lacks its validation and checkpoints); without
    that share, one probe fewer."""
    assert _planned_short_of_the_aim(monkeypatch, 0.5, epoch_ended=True) == 8
    assert _planned_short_of_the_aim(monkeypatch, 0.0, epoch_ended=True) == 7


def test_before_the_first_epoch_ends_the_aim_may_take_the_whole_reserve(monkeypatch):
    """The final's keep-back short too (its tables leave it little of the reserve): after an epoch has ended the
    middle evaluation keeps it and falls below the aim; before, when the projected training time still lacks every
    epoch's end, the aim is planned with the whole reserve for both; a fresh fit starts without an epoch ended."""
    assert _planned_short_of_the_aim(monkeypatch, 0.5, epoch_ended=True, final_logging=0.3) < 8
    assert _planned_short_of_the_aim(monkeypatch, 0.5, epoch_ended=False, final_logging=0.3) == 8
    from pl_i2f.monitoring import EvaluationPlanner

    planner = EvaluationPlanner(0.1, DenseEarlySchedule())
    planner.note_epoch_end()
    planner.start_fit(0, 1200)
    assert not planner.epoch_ended


def test_an_evaluations_price_includes_its_overhead():
    """What an evaluation costs beside its estimate (planning, logging, its console line) is priced with it."""
    from pl_i2f.monitoring import EvaluationPlanner

    planner = EvaluationPlanner(0.1, DenseEarlySchedule(), clock=FakeClock())
    planner.observe(1, 0.010)
    planner.observe(4, 0.025)
    before = planner.price(4)
    planner.note_overhead(0.003)
    assert planner.price(4) == pytest.approx(before + 0.003) and planner.price(1) == pytest.approx(0.013)
    restored = EvaluationPlanner(0.1, DenseEarlySchedule(), clock=FakeClock())
    restored.load_state_dict(planner.state_dict())
    assert restored.price(4) == pytest.approx(planner.price(4))


def test_a_call_larger_than_any_seen_is_priced_no_cheaper_than_the_latest_line():
    """Load arriving mid-run multiplies every cost by 4: a slope fitted on every observation alike still holds
    much of the unloaded one, and a call twice the largest seen would be priced well under what it costs. Beyond
    the sizes seen the price is no cheaper than the line of the latest observations; within them, the fit."""
    from pl_i2f.monitoring import ProductCost

    def seconds(probes: int, load: float) -> float:
        return (0.005 + 0.01 * probes) * load

    cost = ProductCost()
    for probes in (6, 9, 9, 10, 9, 9, 10, 9):
        cost.observe(1, probes, seconds(probes, 1.0))
    for probes in (10, 12, 11, 14, 13):
        cost.observe(1, probes, seconds(probes, 4.0))
    a, b = cost.coefficients()
    assert a + 23 * b < 0.9 * seconds(23, 4.0)  # the fit alone: cheap
    assert cost.predict(1, 23) >= 0.93 * seconds(23, 4.0)
    assert cost.predict(1, 12) == pytest.approx(a + 12 * b)


def test_a_second_price_separates_the_fixed_part_of_an_evaluation():
    """One size seen, the fit charges everything per probe: a call-overhead-bound evaluation (0.1 s whatever its
    probes, a small model on a GPU) would stay at one probe. Where two probes are cheap against the budget left,
    a second size is priced and the fit then knows that 32 probes cost little more than one."""
    from pl_i2f.monitoring import EvaluationPlanner

    clock = FakeClock()
    planner = EvaluationPlanner(0.1, DenseEarlySchedule(), clock=clock)
    planner.start_fit(0, 1200)
    for step in (1, 2, 3):  # 0.1 s a step: a 120 s run, a 12 s budget
        clock.now = 0.1 * step
        planner.record_training(step)
    assert not planner.wants_second_price()  # nothing priced yet
    planner.observe(1, 0.100)
    assert planner.wants_second_price() and planner.price(32) == pytest.approx(3.2)
    planner.observe(2, 0.102)
    assert not planner.wants_second_price()  # two sizes seen
    assert planner.price(32) == pytest.approx(0.098 + 32 * 0.002)
    tight = EvaluationPlanner(0.1, DenseEarlySchedule(), clock=FakeClock())
    tight.start_fit(0, 100)
    for step in (1, 2, 3):  # 0.01 s a step: a 1 s run, 0.1 s of budget, two probes at 0.1 s would take it all
        tight.clock.now = 0.01 * step
        tight.record_training(step)
    tight.observe(1, 0.100)
    assert not tight.wants_second_price()


@pytest.mark.parametrize(("fixed", "per_probe", "expected"), [(0.1, 0.0, 32), (0.0, 0.1, 1)],
                         ids=["cost-mostly-fixed", "cost-per-probe"])
def test_spread_evaluations_cover_the_most_probes_that_keep_as_many_affordable(fixed, per_probe, expected):
    """Not every evaluation fits: those spread over the run each cover as many probes as cost no more than the
    budget left shared over the evaluations it affords — all 32 where an evaluation's cost is fixed, one where
    it is per probe — and the share spent stays within the limit."""
    from pl_i2f.monitoring import EvaluationPlanner

    clock = FakeClock()
    planner = EvaluationPlanner(0.1, DenseEarlySchedule(), clock=clock)
    planner.start_fit(0, 1200)
    for size in (1, 2):
        planner.observe(size, fixed + per_probe * size)
    counts = []
    for step in range(1201):
        clock.now += 0.005  # 6 s of training: 0.6 s of budget, 17 evaluations of >= 0.1 s do not all fit
        planner.record_training(step)
        if planner.budget.due(step):
            count = planner.probes_for(step, 32, final=step == 1200)
            if count:
                counts.append(count)
                planner.charge(fixed + per_probe * count)
                clock.now += fixed + per_probe * count
    assert 2 <= len(counts) < 17 and set(counts[:-1]) == {expected}, counts
    spent, training = planner.spent_seconds, planner.training_seconds  # on the injected clock
    assert spent <= 0.1 * training, (spent, training)
