"""Leakage callbacks: non-interference, offline W&B content, resume, DP-SGD noise."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import train
from callbacks import AttackAudit, I2FMonitor, TradeoffTracker
from conftest import TickingClock
from wandb_offline import offline_runs, read_offline_run

# A short digits run (8x8 inputs keep every analysis cheap) with every callback firing at least twice.
SMALL = [
    "data.size=8",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.deterministic=true",
]
CALLBACKS = [
    "callbacks=audit",
    "~callbacks.progress_bar",
    "~callbacks.model_checkpoint",
    "callbacks.i2f_monitor.every_n_steps=3",
    "callbacks.i2f_monitor.max_overhead=null",
    "callbacks.attack_audit.every_n_epochs=1",
    "callbacks.attack_audit.n_samples=2",
    "attack.iterations=15",
]


def final_weights(cfg) -> list[torch.Tensor]:
    datamodule, module, trainer = train.build(cfg)
    trainer.fit(module, datamodule=datamodule)
    return [p.detach().clone() for p in module.model.parameters()], trainer


@pytest.mark.parametrize("budget", ["max_overhead=null", "max_overhead=1000"])
def test_callbacks_do_not_change_training(make_cfg, budget):
    """Same seed, with and without all three callbacks: bitwise identical final weights — evaluating at once
    (no budget) or, under a budget, the step-0 evaluation on a snapshot after the warm-up steps, the products
    timed and the later evaluations warm-started."""
    import pytorch_lightning as pl

    pl.seed_everything(7)
    plain, _ = final_weights(make_cfg([*SMALL, "seed=7"]))
    pl.seed_everything(7)
    watched, trainer = final_weights(make_cfg([*SMALL, *CALLBACKS, f"callbacks.i2f_monitor.{budget}", "seed=7"]))
    kinds = {type(cb) for cb in trainer.callbacks}
    assert {I2FMonitor, AttackAudit, TradeoffTracker} <= kinds
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, I2FMonitor))
    audit = next(cb for cb in trainer.callbacks if isinstance(cb, AttackAudit))
    assert monitor.evaluations == 5 and audit.audits == 2  # steps 0, 3, 6, 9 and the final 12; epochs 0, 1
    assert monitor.steps_logged == [0, 3, 6, 9, 12] and monitor.skipped == 0
    assert all(torch.equal(a, b) for a, b in zip(plain, watched))


def test_offline_wandb_run_holds_leakage_audit_and_media(make_cfg, tmp_path):
    cfg = make_cfg([*SMALL, *CALLBACKS, "logger=wandb"])
    train.run(cfg)
    (run_dir,) = offline_runs(tmp_path)
    run = read_offline_run(run_dir)
    for key in ("leakage/expected_pixel_rmse", "leakage/prior_psnr", "leakage/prior_pixel_rmse",
                "leakage/determined_fraction", "leakage/sigma_for_target", "leakage/noise_multiplier_for_target",
                "leakage/expected_pixel_rmse_stderr", "leakage/probes", "leakage/oldest_probe_step",
                "leakage/lambda_max", "leakage/lambda_min", "leakage/condition_number",
                "leakage/unfairness_cv",
                "audit/rmse", "audit/psnr", "audit/ssim", "audit/predicted_pixel_rmse", "audit/noise_std",
                "audit/determined_fraction"):
        assert key in run.history_keys, key
    # no noise: the gradient determines the probes (predicted PSNR ∞), so no gap to the attack and no ranking;
    # every probe's expected error is exactly 0 (on the data's span), so no percentile ratio of them either
    assert not {"audit/rank_correlation", "audit/gap_db", "audit/predicted_psnr",
                "leakage/unfairness_p90_p10", "leakage/expected_attack_psnr"} & set(run.history_keys)
    # defense=none (σ = 0): no noise level and no per-unit-σ figure (the paper's keys need a noise)
    assert not {k for k in run.history_keys if k.startswith("leakage/paper/")} | (
        {"leakage/noise_std"} & set(run.history_keys))
    # media are nested records in the log: <key>/_type
    assert run.summary["leakage/per_sample_histogram/_type"] == "histogram"
    assert run.summary["leakage/per_class/_type"] == "table-file"
    assert run.summary["leakage/worst_samples/_type"] == "images/separated"
    assert run.summary["audit/reconstructions/_type"] == "image-file"
    files = " ".join(run.files)
    assert "media/images/audit/reconstructions" in files and "media/table/leakage/per_class" in files
    # the trade-off table is logged at train end; W&B's "files" and "summary" records for it can lag behind the
    # run's close on a loaded machine, so check the logged row and the file on disk (what `wandb sync` uploads)
    assert "table-file" in [row["tradeoff/points/_type"] for row in run.history if "tradeoff/points/_type" in row]
    assert list((run_dir / "files" / "media" / "table" / "tradeoff").glob("points*.table.json"))
    # leakage rows share the trainer's step axis, starting at the initialisation (step 0)
    steps = [row["trainer/global_step"] for row in run.history if "leakage/lambda_max" in row]
    assert steps[0] == 0 and steps == sorted(steps) and steps[-1] == 12  # the final step too
    # exact spectra (explicit Jacobians) at every evaluation, the first and last included
    spectra = [row["trainer/global_step"] for row in run.history if "leakage/lambda_min" in row]
    assert spectra == steps
    assert run.config["threat_model"]["labels_known"] is True
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"val/acc", "test/acc", "leakage/expected_pixel_rmse", "audit/rmse"} <= set(summary["final"])
    assert summary["run_config"]["threat_model"]["batch_size"] == cfg.data.batch_size
    assert len(summary["points"]) == 2 and summary["points"][1]["audit_rmse"] is not None
    # each point carries the leakage measured nearest to it, and where: epoch ends at steps 6 and 12
    assert [(p["step"], p["leakage_step"]) for p in summary["points"]] == [(6, 6), (12, 12)]


def test_callback_state_survives_checkpoint_resume(make_cfg, tmp_path):
    first = make_cfg([*SMALL, *CALLBACKS])
    datamodule, module, trainer = train.build(first)
    trainer.fit(module, datamodule=datamodule)
    ckpt = tmp_path / "two_epochs.ckpt"
    trainer.save_checkpoint(ckpt)
    audit = next(cb for cb in trainer.callbacks if isinstance(cb, AttackAudit))
    tracker = next(cb for cb in trainer.callbacks if isinstance(cb, TradeoffTracker))
    pairs, points = list(audit.pairs), list(tracker.points)
    assert len(pairs) == 4 and len(points) == 2

    resumed_cfg = make_cfg([*SMALL, *CALLBACKS, "trainer.max_epochs=3"])
    datamodule, module, trainer = train.build(resumed_cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt))
    audit = next(cb for cb in trainer.callbacks if isinstance(cb, AttackAudit))
    tracker = next(cb for cb in trainer.callbacks if isinstance(cb, TradeoffTracker))
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, I2FMonitor))
    assert audit.pairs[:4] == pairs and len(audit.pairs) == 6  # continued, not restarted
    assert tracker.points[:2] == points and [p["epoch"] for p in tracker.points] == [0, 1, 2]
    assert monitor.evaluations == 7  # 0, 3, 6, 9, 12 before the checkpoint; then 15 and the final 18
    assert monitor.steps_logged == [0, 3, 6, 9, 12, 15, 18]  # the schedule continues, step 12 is not redone


@pytest.mark.parametrize("sigmas", [(0.5, 2.0)])
def test_monitor_uses_dpsgd_noise_at_the_current_sigma(make_cfg, sigmas):
    """Under DP-SGD the monitor's noise is σC on the sample's clipped gradient (the view ε takes), and more σ means
    more expected error."""
    logged = []
    for sigma in sigmas:
        cfg = make_cfg([*SMALL, *CALLBACKS, "defense=dpsgd", f"defense.noise_multiplier={sigma}",
                        "defense.max_grad_norm=1.0", "trainer.max_epochs=1"])
        datamodule, module, trainer = train.build(cfg)
        trainer.fit(module, datamodule=datamodule)
        monitor = next(cb for cb in trainer.callbacks if isinstance(cb, I2FMonitor))
        report = monitor.last_report
        expected_std = sigma * 1.0  # σC, independent of the batch
        assert report.noise.std == pytest.approx(expected_std, rel=1e-6) and report.noise.clip_norm == 1.0
        assert float(trainer.callback_metrics["leakage/noise_std"]) == pytest.approx(expected_std, rel=1e-6)
        logged.append(float(trainer.callback_metrics["leakage/expected_pixel_rmse"]))
    assert logged[1] > logged[0]


def test_bad_callback_settings_fail_clearly(make_cfg):
    from pl_i2f.errors import ConfigError

    # at construction, not when fit starts — also through the config (train.py unwraps Hydra's error)
    with pytest.raises(ConfigError, match="every_n_steps must be >= 1"):
        I2FMonitor(every_n_steps=0)
    for bad, match in (({"worst_k": -1}, "worst_k"), ({"max_overhead": 0}, "max_overhead"),
                       ({"target_pixel_rmse": 0}, "target_pixel_rmse"), ({"warmup_steps": 0}, "warmup_steps"),
                       ({"growth": 1.0}, "growth"), ({"clipping_norm": -1}, "clipping_norm")):
        with pytest.raises(ConfigError, match=match):
            I2FMonitor(**bad)
    with pytest.raises(ConfigError, match="log_every_n_epochs"):
        TradeoffTracker(log_every_n_epochs=0)
    with pytest.raises(ConfigError, match="every_n_steps must be >= 1"):
        train.build(make_cfg([*SMALL, *CALLBACKS, "callbacks.i2f_monitor.every_n_steps=0"]))
    cfg = make_cfg([*SMALL, *CALLBACKS, "attack=gradinversion"])
    with pytest.raises(ConfigError, match="bn_statistics_known is false"):
        final_weights(cfg)


def test_per_sample_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="log_per_sample_media"):
        monitor = I2FMonitor(per_sample=False)
    assert monitor.log_per_sample_media is False
    with pytest.warns(DeprecationWarning):
        assert monitor.per_sample is False


def monitor_run(make_cfg, *overrides: str) -> I2FMonitor:
    import pytorch_lightning as pl

    pl.seed_everything(3)
    cfg = make_cfg([*SMALL, *CALLBACKS, "seed=3", "callbacks.i2f_monitor.every_n_steps=1000",
                    "callbacks.i2f_monitor.first_step=1000", *overrides])
    _, trainer = final_weights(cfg)
    return next(cb for cb in trainer.callbacks if isinstance(cb, I2FMonitor))


def test_budgeted_step0_evaluation_uses_the_initial_weights(make_cfg):
    """Under a budget the step-0 evaluation runs after the warm-up steps, on a snapshot: the same numbers as
    evaluating at step 0 directly, filed under step 0."""
    at_once = monitor_run(make_cfg)
    later = monitor_run(make_cfg, "callbacks.i2f_monitor.max_overhead=1000", "callbacks.i2f_monitor.warmup_steps=4")
    assert at_once.evaluations == later.evaluations == 2 and later.skipped == 0  # step 0 and the final step
    assert at_once.steps_logged == later.steps_logged == [0, 12]
    assert later.history[0] == at_once.history[0] and later.history[0]["step"] == 0
    assert later.cost.known  # priced from the products it really ran


def test_unaffordable_evaluations_shrink_to_one_probe_and_the_final_one_runs(make_cfg):
    """A budget nothing fits: the first evaluation prices itself on one probe (small by construction), later
    ones are skipped with a warning, and the final weights are always evaluated, on one probe."""
    with pytest.warns(UserWarning, match=r"skipped the evaluation of step 3: one probe is predicted"):
        monitor = monitor_run(make_cfg, "callbacks.i2f_monitor.max_overhead=1e-9", "data.probe_size=8",
                              "callbacks.i2f_monitor.every_n_steps=3")
    assert monitor.steps_logged == [0, 12] and monitor.skipped == 3  # steps 3, 6 and 9
    assert [h["probes"] for h in monitor.history] == [1, 1] and monitor.probe_steps[:2] == [0, 12]


def test_engine_warnings_reach_the_log_once_per_kind():
    """The damped fallback warns at every evaluation in the engine; the monitor shows each kind once per run."""
    from callbacks._logging import warn_once
    from pl_i2f.influence import ConvergenceWarning, InfluenceWarning

    monitor = I2FMonitor()

    def record(message: str, category: type[Warning], line: int) -> warnings.WarningMessage:
        return warnings.WarningMessage(message, category, "pl_i2f/leakage.py", line)

    fallback = [record(f"JJᵀ is singular at step {s}; damped with ε = 1e-9", InfluenceWarning, 120) for s in range(4)]
    with pytest.warns(InfluenceWarning) as shown:
        warn_once(fallback, InfluenceWarning, monitor._warned, "I2FMonitor")
        warn_once([*fallback, record("CG reached only 1e-3", ConvergenceWarning, 140)], InfluenceWarning,
                  monitor._warned, "I2FMonitor")
    messages = [str(w.message) for w in shown if issubclass(w.category, InfluenceWarning)]
    assert len(messages) == 2
    assert "step 0" in messages[0] and "shown once per run" in messages[0]
    assert "CG reached" in messages[1]
    with pytest.warns(UserWarning, match="not the engine's"):  # other warnings pass through untouched
        warn_once([record("not the engine's", UserWarning, 7)], InfluenceWarning, monitor._warned, "I2FMonitor")


def test_retired_monitor_options_warn_and_are_ignored():
    """The damped Lanczos estimate's knobs (``method``, ``lanczos_steps``, ``relative_damping``, …) mean nothing
    to the exact calibrated estimate: configs that still set them get a warning, not an error."""
    with pytest.warns(DeprecationWarning, match="lanczos_steps, method no longer used"):
        monitor = I2FMonitor(method="lanczos", lanczos_steps=8)
    assert not hasattr(monitor.settings, "lanczos_steps")


def test_monitor_headline_equals_exact_posteriors_on_the_same_weights(make_cfg):
    """The logged headline is :func:`pl_i2f.calibrated.exact_posteriors` on the final weights, the defense's
    sample noise (gaussian: Bσ), the datamodule's prior and per-channel pixel scale — to 1e-6 — and its PSNR is
    20·log10(1/RMSE) of the same pooled MSE."""
    from pl_i2f.calibrated import exact_posteriors
    from pl_i2f.prior import value_scale

    cfg = make_cfg([*SMALL, *CALLBACKS, "defense=gaussian", "trainer.max_epochs=1", "~callbacks.attack_audit"])
    datamodule, module, trainer = train.build(cfg)
    trainer.fit(module, datamodule=datamodule)
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, I2FMonitor))
    report = monitor.last_report
    x, y = monitor._probe
    noise = module.defense.sample_noise(trainer.global_step, module.model)
    assert noise.std == pytest.approx(datamodule.batch_size * module.defense.sigma_at(trainer.global_step))
    spectrum = exact_posteriors(module.model, x, y, noise, datamodule.data_prior(),
                                value_scale=value_scale(datamodule.std, x.shape[1:]))
    rmse = float((spectrum.error() / spectrum.dim).mean().sqrt())
    assert report.scalars["expected_pixel_rmse"] == pytest.approx(rmse, rel=1e-6)
    assert report.scalars["expected_attack_psnr"] == pytest.approx(-20 * math.log10(rmse), rel=1e-6)
    assert report.scalars["prior_psnr"] == pytest.approx(spectrum.prior_psnr(), rel=1e-6)
    assert report.scalars["probes"] == len(x)


def test_anisotropic_run_logs_leakage_at_every_scheduled_step_from_its_covariance(make_cfg):
    """The anisotropic defense's noise reaches the estimator as its covariance (no Monte Carlo draws): leakage at
    every scheduled step, the last included."""
    cfg = make_cfg([*SMALL, *CALLBACKS, "defense=anisotropic", "defense.reference_size=2",
                    "~callbacks.attack_audit"])
    datamodule, module, trainer = train.build(cfg)
    trainer.fit(module, datamodule=datamodule)
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, I2FMonitor))
    assert len(monitor.steps_logged) >= 5 and monitor.steps_logged[-1] == trainer.global_step
    assert monitor.last_report.noise.basis is not None and monitor.skipped == 0
    assert all("expected_pixel_rmse" in h and "prior_psnr" in h for h in monitor.history)


def overhead_bound_run(make_cfg, monkeypatch, second_price: bool) -> I2FMonitor:
    """A run on an injected clock: 0.2 s a training step, 0.1 s an evaluation whatever its probes (a small model
    on a GPU: launch-bound), an evaluation due at every step and a budget for fewer; ``second_price`` False: the
    planner never prices a second size."""
    import pytorch_lightning as pl

    from pl_i2f.monitoring import EvaluationPlanner

    clock = TickingClock(tick=0.0)  # moved only by the training steps and evaluations below

    class Tick(pl.Callback):
        def on_train_batch_end(self, *args) -> None:
            clock.now += 0.2

    measure = I2FMonitor.measure

    def fixed_cost_measure(self, *args, **kwargs):
        clock.now += 0.1
        return measure(self, *args, **kwargs)

    monkeypatch.setattr(I2FMonitor, "measure", fixed_cost_measure)
    if not second_price:
        monkeypatch.setattr(EvaluationPlanner, "wants_second_price", lambda self: False)
    cfg = make_cfg([*SMALL, *CALLBACKS, "~callbacks.attack_audit", "callbacks.i2f_monitor.every_n_steps=1",
                    "callbacks.i2f_monitor.first_step=1000", "callbacks.i2f_monitor.max_overhead=0.48",
                    "callbacks.i2f_monitor.log_per_sample_media=false"])
    datamodule, module, trainer = train.build(cfg)
    trainer.callbacks.append(Tick())
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, I2FMonitor))
    monitor.planner.clock = clock
    trainer.fit(module, datamodule=datamodule)
    return monitor


def test_overhead_bound_evaluations_price_a_second_size_and_cover_more_probes(make_cfg, monkeypatch):
    """One probe priced, a fixed-cost evaluation looks as dear per probe as it is in all, and the run stays at one
    probe; a second size (two probes) tells the fixed part apart, and the same budget then covers many probes."""
    without = overhead_bound_run(make_cfg, monkeypatch, second_price=False)
    monkeypatch.undo()
    with_second = overhead_bound_run(make_cfg, monkeypatch, second_price=True)
    sizes = sorted({int(vectors) for _, vectors, _ in with_second.planner.cost.observations})
    assert sizes[:2] == [1, 2] and with_second.history[0]["probes"] > 1, with_second.history
    assert without.history[0]["probes"] == 1, without.history
    assert sum(h["probes"] for h in with_second.history) > 2 * sum(h["probes"] for h in without.history)
    for monitor in (without, with_second):
        share = monitor.seconds / monitor.planner.training_seconds  # both on the injected clock
        assert monitor.steps_logged[-1] == 12 and share <= 0.48


def test_everything_the_monitor_does_counts_against_its_budget(make_cfg, monkeypatch):
    """On an injected clock moved by the training steps and by what the monitor does: its seconds are the sources'
    set-up (probes, data prior), every estimate and every console line (the end-of-fit summary, printed after
    the count, aside), not the defense's noise it reads at each evaluation (a refresh is training's work). Its
    hook reads no clock at a step where nothing is due, and prints a line at the first and final evaluations only
    while what they cover and how stays the same."""
    import pytorch_lightning as pl

    import callbacks.leakage as leakage_callback
    from pl_i2f.sources import SourceOptions

    clock, ended = TickingClock(tick=0.0), {}

    class Tick(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            clock.now += 0.2
            ended[trainer.global_step] = clock.reads  # after the monitor's hook of the step before

    measure, sources, info = I2FMonitor.measure, SourceOptions.sources, leakage_callback.rank_zero_info
    noise_of, measured, lines, refreshed = leakage_callback.lk.noise_of, [], [], []

    def refreshed_noise(*args, **kwargs):  # the defense's work at the step (an anisotropic refresh): not the monitor's
        clock.now += 0.5
        refreshed.append(1)
        return noise_of(*args, **kwargs)

    def timed_measure(self, *args, **kwargs):
        clock.now += 0.01
        measured.append(1)
        return measure(self, *args, **kwargs)

    def timed_sources(self, *args, **kwargs):
        clock.now += 0.05
        return sources(self, *args, **kwargs)

    def timed_info(message, *args, **kwargs):
        clock.now += 0.003
        lines.append(message)
        return info(message, *args, **kwargs)

    monkeypatch.setattr(I2FMonitor, "measure", timed_measure)
    monkeypatch.setattr(SourceOptions, "sources", timed_sources)
    monkeypatch.setattr(leakage_callback, "rank_zero_info", timed_info)
    monkeypatch.setattr(leakage_callback.lk, "noise_of", refreshed_noise)
    cfg = make_cfg([*SMALL, *CALLBACKS, "~callbacks.attack_audit", "callbacks.i2f_monitor.log_per_sample_media=false"])
    datamodule, module, trainer = train.build(cfg)
    trainer.callbacks.append(Tick())
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, I2FMonitor))
    monitor.planner.clock = clock
    trainer.fit(module, datamodule=datamodule)
    evaluated = [m for m in lines if "evaluated on" in m]
    assert len(measured) == monitor.evaluations == len(refreshed) == 5 and len(evaluated) == 2, lines
    assert "step 0 " in evaluated[0] and f"step {trainer.global_step} " in evaluated[1]
    assert monitor.seconds == pytest.approx(0.05 + 0.01 * len(measured) + 0.003 * len(evaluated))
    due = set(monitor.schedule.steps(trainer.global_step))
    quiet = [g for g in range(2, trainer.global_step) if g not in due]
    assert quiet and all(ended[g + 1] == ended[g] for g in quiet), ended


def test_a_checkpoint_holds_the_training_seconds_up_to_its_step():
    """Training seconds are read at evaluations; a checkpoint between two holds them up to its own step."""
    from types import SimpleNamespace

    monitor = I2FMonitor()
    clock = TickingClock(tick=0.0)
    monitor.planner.clock, monitor._probe = clock, (torch.zeros(1), torch.zeros(1))
    monitor.planner.start_fit(0, 100)
    clock.now = 0.1
    monitor.planner.record_training(1)
    clock.now = 5.0  # 49 steps later, no evaluation due
    checkpoint = {"callbacks": {monitor.state_key: monitor.state_dict()}}
    assert checkpoint["callbacks"][monitor.state_key]["planner"]["training_seconds"] == pytest.approx(0.1)
    monitor.on_save_checkpoint(SimpleNamespace(training=True, global_step=50), None, checkpoint)
    assert checkpoint["callbacks"][monitor.state_key]["planner"]["training_seconds"] == pytest.approx(5.0)


@pytest.mark.parametrize("chain", [True, False])
def test_a_chain_network_is_never_sketched_where_another_would_be(make_cfg, monkeypatch, chain: bool):
    """Gaussian noise (a sketch can bound it), exact Grams priced dear per probe on an injected clock: the planner
    sketches middle evaluations of a network off the chain route, never those of one on it (whose exact Grams
    measure cheaper than the smallest sketch); the logged note says why."""
    import pytorch_lightning as pl

    from pl_i2f.influence import settings
    from pl_i2f.monitoring import NO_SKETCH_FOR_CHAIN

    monkeypatch.setattr(settings, "CHAIN_PRODUCTS", chain)  # off: the same network takes the torch.func route
    clock = TickingClock(tick=0.0)

    class Tick(pl.Callback):
        def on_train_batch_end(self, *args) -> None:
            clock.now += 0.2

    measure, plans = I2FMonitor.measure, []

    def priced_measure(self, *args, coverage=None, plan=None, **kwargs):
        clock.now += 0.01 + 0.04 * coverage.count
        plans.append(plan)
        return measure(self, *args, coverage=coverage, plan=plan, **kwargs)

    monkeypatch.setattr(I2FMonitor, "measure", priced_measure)
    cfg = make_cfg([*SMALL, *CALLBACKS, "~callbacks.attack_audit", "defense=gaussian",
                    "callbacks.i2f_monitor.every_n_steps=2", "callbacks.i2f_monitor.first_step=1000",
                    "callbacks.i2f_monitor.max_overhead=0.5", "callbacks.i2f_monitor.log_per_sample_media=false"])
    datamodule, module, trainer = train.build(cfg)
    trainer.callbacks.append(Tick())
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, I2FMonitor))
    monitor.planner.clock = clock
    trainer.fit(module, datamodule=datamodule)
    sketched = [p for p in plans if p.route == "sketch"]
    if chain:
        assert not sketched and any(NO_SKETCH_FOR_CHAIN in p.describe() for p in plans), plans
    else:
        assert sketched, plans


def test_inputs_beyond_the_exact_range_are_sketched_at_the_smallest_rank_in_a_run(make_cfg, monkeypatch):
    """3 × 20 × 20 inputs (1,200 values: beyond the exact range) under a budget: every evaluation, the first price
    included, is a rank-8 sketch (the logged ``sketch_rank``), not the estimator's own rank 64."""
    measure, plans = I2FMonitor.measure, []

    def recorded(self, *args, plan=None, **kwargs):
        plans.append(plan)
        return measure(self, *args, plan=plan, **kwargs)

    monkeypatch.setattr(I2FMonitor, "measure", recorded)
    cfg = make_cfg(["data=fake", "data.input_shape=[3,20,20]", "data.num_samples=60", "data.batch_size=20",
                    "data.probe_size=2", "model=mlp", "model.hidden=[8]", "trainer.max_epochs=2",
                    "defense=gaussian", "callbacks=audit", "~callbacks.progress_bar",
                    "~callbacks.model_checkpoint", "~callbacks.attack_audit", "callbacks.i2f_monitor.max_overhead=1000",
                    "callbacks.i2f_monitor.warmup_steps=1",
                    "callbacks.i2f_monitor.log_per_sample_media=false"])
    _, trainer = final_weights(cfg)
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, I2FMonitor))
    assert plans and all(p.route is None and p.rank == 8 for p in plans), plans
    assert monitor.history and all(h["sketch_rank"] == 8 for h in monitor.history), monitor.history
