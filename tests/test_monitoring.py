"""The monitor's pure schedule/budget objects (no Trainer) and its cheap evaluation against full precision."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch

from pl_i2f.monitoring import DenseEarlySchedule, EvaluationPlan, OverheadBudget, ProductCost, reductions

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


def test_plan_counts_products():
    fresh = EvaluationPlan(probes=8, steps=16)
    warm = EvaluationPlan(probes=8, steps=16, warm=True, spectra=2, spectrum_products=1, spectrum_vectors=512)
    assert fresh.products() == (16, 128)
    assert warm.products() == (2 + 1, 2 * 128 + 512)
    plans = reductions(warm)
    assert plans[0] == warm and plans[1].spectra == 0
    assert [p.probes for p in plans[2:6]] == [4, 2, 1, 1][: len(plans[2:6])]
    assert plans[-1].probes == 1 and plans[-1].steps == 4 and not plans[-1].warm
    assert "4 of 8 probes" in plans[2].reduced_from(warm) and "no exact spectra" in plans[1].reduced_from(warm)


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
    assert budget.share(0) == pytest.approx(5.0 / 17)
    assert budget.affordable(0.2, 0) and not budget.affordable(0.5, 0) and budget.affordable(4.9, 1200, final=True)
    assert OverheadBudget(None, DenseEarlySchedule()).left() == math.inf


def test_plan_is_full_when_affordable_reduced_when_not_and_skipped_last():
    cost = overhead_bound_cost()
    full = EvaluationPlan(probes=32, steps=8, spectra=2, spectrum_products=1, spectrum_vectors=512)
    roomy = OverheadBudget(0.1, DenseEarlySchedule(), total_steps=1200)
    roomy.record_training(3, 3 * 1.0)  # slow steps: a large budget
    assert roomy.plan(0, full, cost, later_steps=16) == full
    tight = OverheadBudget(0.1, DenseEarlySchedule(), total_steps=1200)
    tight.record_training(3, 3 * 0.04)  # 4.8 s for 17 evaluations: a fresh start plus 16 warm ones
    plan = tight.plan(0, full, cost, later_steps=16)
    assert plan is not None and plan != full and plan.spectra == 0
    later = cost.predict(*EvaluationPlan(plan.probes, 16, warm=True).products()) * 16
    assert cost.predict(*plan.products()) + later <= tight.left()  # fits with the later evaluations
    broke = OverheadBudget(0.1, DenseEarlySchedule(), total_steps=1200)
    broke.record_training(3, 3 * 1e-4)
    assert broke.plan(0, full, cost) is None  # not even one probe: skip (the caller warns)
    assert OverheadBudget(None, DenseEarlySchedule()).plan(0, full, cost) == full


def test_plan_does_not_depend_on_machine_load():
    """Load that slows training and products alike leaves the decision unchanged (both are measured)."""
    full = EvaluationPlan(probes=32, steps=8)
    plans = []
    for slowdown in (1.0, 3.0, 10.0):
        cost = ProductCost()
        for vectors in (1, 8, 64):
            cost.observe(1, vectors, slowdown * (0.02 + 0.0005 * vectors))
        budget = OverheadBudget(0.1, DenseEarlySchedule(), total_steps=1200)
        budget.record_training(3, slowdown * 3 * 0.015)
        plans.append(budget.plan(0, full, cost, later_steps=16))
    assert plans[0] is not None and plans[0] == plans[1] == plans[2]


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
        errors[step] = report.scalars["expected_i2f"] / float(exact.expected_i2f.mean()) - 1
        assert report.scalars["damping"] == pytest.approx(exact.damping, rel=0.05)  # Ritz λ_max
    assert warm[0] is False and all(warm[1:])
    assert max(abs(e) for e in errors.values()) < 0.05, errors


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
        report = measure_leakage(model, x, y, GaussianDefense(sigma=sigma), 0, worst_k=0,
                                 generator=torch.Generator().manual_seed(0))
        expected = (-20 * torch.log10(report.pixel_rmse.double().clamp(max=1.0))).mean()
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
    one = measure_leakage(model, x[:1], y[:1], GaussianDefense(sigma=0.1), 0, generator=torch.Generator())
    three = measure_leakage(model, x, y, GaussianDefense(sigma=0.1), 0, generator=torch.Generator())
    assert "unfairness_cv" not in one.scalars and "unfairness_p90_p10" not in one.scalars
    assert three.scalars["unfairness_cv"] > 0 and three.scalars["unfairness_p90_p10"] >= 1


# --- the two paths, priced apart; reductions that keep probes; the self-limiting fresh basis -----------------


def test_plan_cost_prices_each_path_on_its_own_products_and_never_blind():
    from pl_i2f.monitoring import PlanCost

    cost = PlanCost()
    single = EvaluationPlan(probes=1, steps=4)
    several = EvaluationPlan(probes=8, steps=4, warm=True)
    assert math.isinf(cost.price(single)) and math.isinf(cost.price(several))  # nothing measured: not planned
    cost.single.observe(1, 4, 2.0)  # one probe through the plain operator: 0.5 s a Lanczos step (resnet18-like)
    assert cost.price(single) == pytest.approx(2.0) and math.isinf(cost.price(several))
    cost.batched.observe(1, 8, 0.09)
    cost.batched.observe(1, 32, 0.10)  # overhead-bound: fixed part dominates
    assert cost.price(several) == pytest.approx(2 * (0.0867 + 32 * 0.000417), rel=0.01)
    spectra = EvaluationPlan(probes=8, steps=4, warm=True, spectra=2, spectrum_products=1, spectrum_vectors=256)
    assert cost.price(spectra) > cost.price(several)  # priced on the batched fit until one is timed
    cost.spectra.observe(1, 2, 0.3)
    assert cost.price(spectra) == pytest.approx(cost.price(several) + 0.3)
    restored = PlanCost()
    restored.load_state_dict(cost.state_dict())
    assert restored.price(spectra) == pytest.approx(cost.price(spectra))


def test_reductions_keep_eight_probes_and_the_spectra_before_the_basis():
    full = EvaluationPlan(probes=32, steps=8, spectra=2, spectrum_products=1, spectrum_vectors=256)
    plans = reductions(full, min_steps=2, keep_probes=8)
    sizes = [(p.probes, p.steps, p.spectra) for p in plans]
    assert sizes == [(32, 8, 2), (16, 8, 2), (8, 8, 2), (8, 8, 0), (8, 4, 0), (4, 4, 0), (2, 4, 0), (1, 4, 0),
                     (1, 2, 0)]
    warm = reductions(EvaluationPlan(probes=8, steps=16, warm=True), min_steps=2, keep_probes=8)
    assert all(p.warm for p in warm if p.probes > 1) and not any(p.warm for p in warm if p.probes == 1)


def test_fresh_basis_stops_where_its_caller_says_but_not_below_the_minimum(digits_run):
    """The solver reads no clock: ``keep_going`` ends a fresh basis; WarmBasis turns a (timed) stop rule into it,
    never below ``min_steps``. Time comes from an injected clock."""
    from pl_i2f.gradients import eval_mode
    from pl_i2f.influence import PerSampleOperator
    from pl_i2f.influence.damping import Damping
    from pl_i2f.influence.warm import basis_leakage
    from pl_i2f.leakage import LeakageOptions, NoiseModel, WarmBasis, leakage_report

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
    report = leakage_report(model, x[:2], y[:2], NoiseModel(std=1.0, sampler=None, per_unit=True),
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
    from pl_i2f.defenses import build as build_defense
    from pl_i2f.influence import PerSampleOperator

    dm, kept, x, y = digits_run
    built: list[int] = []

    class Counted(PerSampleOperator):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(leakage, "PerSampleOperator", Counted)
    defense = build_defense(name=defense_name, **({"sigma": 0.01} if defense_name != "none" else {}))
    if defense_name == "anisotropic":
        defense.noise.set_reference_from(dm)
    report = leakage.monitor_leakage(kept[100], x, y, defense, 100, exact_spectrum_probes=2, noise_draws=4)
    assert len(built) == 1 and "lambda_min" in report.scalars
    leakage.monitor_leakage(kept[100], x, y, defense, 100, basis=report.basis.basis, noise_draws=4)
    assert len(built) == 2
    leakage.measure_leakage(kept[100], x[:2], y[:2], defense, 100, noise_draws=4)
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
    undamped = undamped_leakage(model, x[:3], y[:3], defense, 400, pixel_std=pixel_std)
    model64 = copy.deepcopy(model).double()
    for i in range(3):
        op = GradientJacobian(model64, x[i: i + 1].double(), y[i: i + 1])
        singular = torch.linalg.svdvals(jacfwd(op._grad_of_x)(op.x).reshape(op.d_theta, op.d_x))
        expected = sigma * float((1 / singular**2).sum().sqrt()) / math.sqrt(op.d_x) * pixel_std
        assert float(undamped[i]) == pytest.approx(expected, rel=1e-6)
    damped = measure_leakage(model, x[:3], y[:3], defense, 400, pixel_std=pixel_std, method="exact")
    assert bool((undamped >= damped.pixel_rmse).all())
    assert undamped_leakage(model, x[:3], y[:3], defense, 400, exact_max_dim=100) is None  # 256 values > 100
    anisotropic = build_defense(name="anisotropic", sigma=sigma, reference_size=2)
    anisotropic.noise.set_reference(x[6:], y[6:])
    assert undamped_leakage(model, x[:3], y[:3], anisotropic, 400) is None


# --- the planner, on explicit numbers (no Trainer, an injected clock) ------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_planner_measures_training_from_the_second_step_and_prices_plans():
    from pl_i2f.monitoring import EvaluationPlanner

    clock = FakeClock()
    planner = EvaluationPlanner(0.1, DenseEarlySchedule(), lanczos_steps=16, exact_spectrum_probes=2, clock=clock)
    planner.start_fit(0, 1200)
    clock.now = 0.5  # the first step's one-off costs (loading, allocations) are left out of the rate
    planner.record_training(1)
    clock.now = 0.7
    planner.record_training(3)  # two steps of 0.1 s
    assert planner.budget.train_steps == 2 and planner.budget.train_seconds == pytest.approx(0.2)
    assert planner.budget.total() == pytest.approx(0.1 * 0.1 * 1200)  # 12 s for the monitor
    full = planner.full_plan(8, None, spectra_possible=True, first=True, final=False,
                             spectrum_cost=lambda count: (1, 128 * count))
    assert full == EvaluationPlan(probes=8, steps=8, warm=False, spectra=2, spectrum_products=1, spectrum_vectors=256)
    assert planner.needs_pricing
    stop, seen = planner.first_stop(0, final=False)  # share of step 0: 12 s over 17 evaluations
    assert not stop(2, 0.2, 0.1) and stop(9, 0.6, 0.2)  # 0.8 s would pass the 0.71 s share
    assert seen == [0.1, 0.2]
    planner.cost.batched.observe(1, 8, 0.1)
    planner.cost.batched.observe(1, 32, 0.16)  # 0.08 s a product + 0.0025 s a vector
    planner.cost.spectra.observe(1, 2, 0.3)
    decision = planner.decide(0, full, final=False, probes=8, stored_probes=None, first=None, first_fit=False)
    assert decision.plan == full  # 0.72 s now, later warm evaluations at 0.08·2 + 0.0025·2·8·8 = 0.48 s each


def test_planner_always_runs_the_final_evaluation():
    from pl_i2f.monitoring import EvaluationPlanner

    clock = FakeClock()
    planner = EvaluationPlanner(1e-6, DenseEarlySchedule(), clock=clock)
    planner.start_fit(0, 100)
    clock.now = 1.0
    planner.record_training(3)
    planner.cost.batched.observe(1, 8, 1.0)
    planner.cost.single.observe(1, 4, 1.0)
    full = planner.full_plan(8, (8, 16), spectra_possible=False, first=False, final=False)
    assert planner.decide(50, full, final=False, probes=8, stored_probes=8, first=None, first_fit=False).plan is None
    final = planner.decide(100, full, final=True, probes=8, stored_probes=8, first=None, first_fit=False)
    assert final.plan is not None and final.plan.probes == 1 and final.plan.steps == 2  # the smallest plan


def simulated_run(load: Callable[[int], float], train_load: Callable[[int], float] | None = None, total: int = 1200,
                  max_overhead: float = 0.1):
    """Drive the planner through a run as I2FMonitor does, every cost from a model of a machine whose load
    multiplies each of the monitor's seconds (``load(step)``) and each training second (``train_load``, default
    the same), on an injected clock: (monitor seconds, training seconds, evaluated steps)."""
    train_load = load if train_load is None else train_load
    from pl_i2f.monitoring import (
        CALIBRATION_CHAINS,
        CALIBRATION_PROBES,
        EvaluationPlanner,
        PlanCost,
    )

    clock = FakeClock()
    planner = EvaluationPlanner(max_overhead, DenseEarlySchedule(), lanczos_steps=16, exact_spectrum_probes=2,
                                clock=clock)
    planner.start_fit(0, total)
    evaluated, basis = [], None
    step_cost, single_cost, spectra_cost = 0.015, 0.02, 0.25  # lenet_zhu on digits, seconds on an idle core

    def batched_cost(calls: int, vectors: int) -> float:
        return 0.08 * calls + 0.002 * vectors

    def spend(seconds: float) -> None:
        clock.now += seconds
        planner.charge(seconds)

    def run(plan: EvaluationPlan, step: int, stop=None) -> EvaluationPlan:
        slow = load(step)
        if PlanCost.is_single(plan):
            steps, elapsed = 0, 0.0
            while steps < plan.steps:
                steps, elapsed = steps + 1, elapsed + single_cost * slow
                if stop is not None and steps >= 2 and stop(steps, elapsed, single_cost * slow):
                    break
            seconds, products = elapsed, (steps, steps)
        else:
            products = (2, 2 * plan.probes * plan.steps) if plan.warm else (plan.steps, plan.probes * plan.steps)
            seconds = batched_cost(*products) * slow
        spectra = plan.spectra * spectra_cost * slow
        spend(seconds + spectra)
        return planner.observe(plan, products, plan.warm, seconds + spectra, spectra)

    def evaluate(step: int, final: bool) -> None:
        nonlocal basis
        full = planner.full_plan(8, basis, spectra_possible=True, first=not evaluated, final=final,
                                 spectrum_cost=lambda count: (1, 128 * count))
        first = None
        if planner.needs_pricing:
            stop, seen = planner.first_stop(step, final)
            first = run(EvaluationPlan(probes=1, steps=full.steps), step, stop)
            planner.cheap = planner.batched_worth_pricing(min(seen, default=math.inf))
            for chains in CALIBRATION_CHAINS if planner.cheap else ():
                if planner.calibration_due(CALIBRATION_PROBES, chains):
                    seconds = batched_cost(1, CALIBRATION_PROBES * chains) * load(step)
                    spend(seconds)
                    planner.cost.batched.observe(1, CALIBRATION_PROBES * chains, seconds)
        decision = planner.decide(step, full, final=final, probes=8, stored_probes=None if basis is None else basis[0],
                                  first=first, first_fit=planner.budget.left() >= 0,
                                  reserve=planner.spectra_reserve(final, planner.full_plan(
                                      8, basis, spectra_possible=True, first=False, final=True,
                                      spectrum_cost=lambda count: (1, 128 * count))))
        if decision.keep_first:
            ran = first
        elif decision.plan is None:
            return
        else:
            ran = run(decision.plan, step, planner.allowance_stop(step, final) if PlanCost.is_single(decision.plan)
                      else None)
        if ran.probes > 1:
            basis = (ran.probes, min(16, 2 * ran.steps) if ran.warm else ran.steps)
        evaluated.append(step)

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
        clock.now += step_cost * train_load(step)
    planner.record_training(total)
    evaluate(total, True)
    return planner.spent_seconds, planner.training_seconds, evaluated


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
    spent, training, evaluated = simulated_run(load, train_load)
    assert spent <= 0.1 * training, (spent, training)
    assert evaluated[-1] == 1200 and len(evaluated) >= 10


def test_resumed_run_reports_its_share_over_the_whole_run():
    """A run resumed from a checkpoint: the monitor's seconds (checkpointed) over the training seconds of every
    fit, not of the resumed fit alone."""
    from pl_i2f.monitoring import EvaluationPlanner

    clock = FakeClock()
    first = EvaluationPlanner(0.1, DenseEarlySchedule(), clock=clock)
    first.start_fit(0, 1200)
    clock.now = 0.02
    first.record_training(1)  # the first step's one-off costs are left out
    clock.now = 20.0
    first.record_training(1000)
    resumed = EvaluationPlanner(0.1, DenseEarlySchedule(), clock=clock)
    resumed.load_state_dict(first.state_dict())
    resumed.start_fit(1000, 1200)
    clock.now += 0.02
    resumed.record_training(1001)
    clock.now += 3.98
    resumed.record_training(1200)
    assert resumed.training_seconds == pytest.approx(19.98 + 3.98)
    line = resumed.summary(17, 17, 2.0, 0, 0, 1200)
    assert "(8.3% of 24.0s training)" in line and line.endswith("leakage last measured at step 1200")
