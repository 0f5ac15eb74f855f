"""The monitor's pure schedule/budget objects (no Trainer) and its cheap evaluation against full precision."""

from __future__ import annotations

import copy
import math

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
        report, fit = monitor_leakage(model, x, y, defense, step, basis=basis, steps=16 if basis is not None else 8)
        basis = fit.basis
        warm.append(fit.warm)
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
    report, _ = monitor_leakage(model, x, y, build_defense(name="none"), 100, pixel_std=mean_pixel_std(dm),
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
    report, _ = monitor_leakage(model, x, y, build_defense(name="none"), 0, pixel_std=mean_pixel_std(dm),
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


def test_fresh_basis_stops_at_its_time_limit_but_not_below_the_minimum(digits_run):
    from pl_i2f.influence.warm import basis_leakage

    _, kept, x, y = digits_run
    limited = basis_leakage(kept[0], x[:2], y[:2], steps=8, max_seconds=0.0, min_steps=2)
    assert limited.products == (2, 4) and limited.basis.shape[1] == 2
    stopped = basis_leakage(kept[0], x[:2], y[:2], steps=8, stop=lambda steps, seconds: steps >= 3)
    assert stopped.products[0] == 3
    full = basis_leakage(kept[0], x[:2], y[:2], steps=8)
    assert full.products == (8, 16)


def test_exact_spectra_from_the_jacobian_match_the_dense_gram(digits_run):
    from pl_i2f.influence import per_sample_leakage
    from pl_i2f.influence.warm import exact_spectra

    _, kept, x, y = digits_run
    eigenvalues = exact_spectra(kept[100], x[:2], y[:2], block_numbers=1 << 20)  # several column blocks
    dense = per_sample_leakage(kept[100], x[:2], y[:2], method="exact", expected=False)
    assert torch.allclose(eigenvalues[:, -1], dense.lambda_max, rtol=1e-4)
    assert torch.allclose(eigenvalues[:, 0], dense.lambda_min, rtol=1e-2, atol=1e-6 * float(dense.lambda_max.max()))


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
