"""AttackAudit's schedule, time budget and progress output (its metrics and media: test_callbacks.py)."""

from __future__ import annotations

import logging

import pytest

import train
from callbacks import AttackAudit
from pl_i2f.attacks import PRESETS
from pl_i2f.errors import ConfigError

SHORT = [
    "data.size=8", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1", "callbacks=audit", "~callbacks.progress_bar", "~callbacks.model_checkpoint",
    "~callbacks.i2f_monitor", "callbacks.attack_audit.n_samples=2",
]


def fit(cfg):
    datamodule, module, trainer = train.build(cfg)
    trainer.fit(module, datamodule=datamodule)
    return next(cb for cb in trainer.callbacks if isinstance(cb, AttackAudit)), trainer


def test_a_run_shorter_than_the_schedule_is_audited_at_the_end(make_cfg, caplog):
    caplog.set_level(logging.INFO)
    audit, trainer = fit(make_cfg([*SHORT, "attack.iterations=5"]))  # every_n_epochs=5 > 1 epoch
    assert audit.audits == 1 and audit.last_epoch == 0
    assert "audit/rmse" in trainer.callback_metrics
    assert "every 5 epochs and after the last one" in caplog.text


def test_no_audit_is_said_out_loud(make_cfg):
    with pytest.warns(UserWarning, match="no audit will run"):
        audit, _ = fit(make_cfg([*SHORT, "attack.iterations=5", "callbacks.attack_audit.at_end=false"]))
    assert audit.audits == 0


def test_the_audit_keeps_to_its_time_budget_and_reports_progress(make_cfg, caplog, attack_clock):
    """Inverting Gradients' full iteration budget against a 60 s audit budget, on an attack clock that advances 1 s
    per reading (one reading per evaluation): both samples stop on time, with what they have, and the console hears
    about every step of the way."""
    caplog.set_level(logging.INFO)
    audit, trainer = fit(make_cfg([*SHORT, "attack=inverting_gradients", "callbacks.attack_audit.max_seconds=60",
                                   "callbacks.attack_audit.progress_seconds=0"]))
    assert audit.audits == 1
    assert float(trainer.callback_metrics["audit/out_of_time"]) == 2
    assert float(trainer.callback_metrics["audit/failed"]) == 0
    budget = PRESETS["inverting_gradients"]["iterations"]
    assert f"AttackAudit: sample 1/2, iteration 10/{budget}" in caplog.text
    assert caplog.text.count("(budget_time)") == 2
    assert attack_clock.reads > 40  # the budget was spent in clock readings, i.e. evaluations, not in real time


def test_the_audit_budget_is_split_over_the_samples_left():
    audit = AttackAudit(max_seconds=100.0)
    assert audit._seconds_for_sample(0.0, 0, 4, None) == pytest.approx(25.0)
    assert audit._seconds_for_sample(60.0, 2, 4, None) == pytest.approx(20.0)  # 40 s left, 2 samples
    assert audit._seconds_for_sample(0.0, 0, 4, 5.0) == 5.0  # the attack's own, smaller budget
    assert audit._seconds_for_sample(200.0, 3, 4, None) == pytest.approx(1e-3)  # spent: stop at once
    assert AttackAudit(max_seconds=None)._seconds_for_sample(0.0, 0, 4, None) is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"every_n_epochs": 0}, "every_n_epochs"), ({"n_samples": 0}, "n_samples"),
    ({"max_seconds": 0}, "max_seconds"), ({"progress_seconds": -1}, "progress_seconds"),
])
def test_bad_audit_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AttackAudit(**kwargs)


def test_the_audit_reports_how_far_the_attack_is_from_the_prediction(make_cfg):
    """``audit/rmse_over_predicted``: the attack's RMSE over the I²F prediction for the same samples (under noise:
    without it the prediction is per unit σ and no ratio is logged, see test_newcomer)."""
    _, trainer = fit(make_cfg([*SHORT, "attack.iterations=5", "defense=gaussian", "defense.sigma=0.01"]))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("audit/")}
    assert metrics["audit/per_unit_noise"] == 0
    assert metrics["audit/predicted_pixel_rmse"] > 0
    assert metrics["audit/rmse_over_predicted"] == pytest.approx(
        metrics["audit/rmse"] / metrics["audit/predicted_pixel_rmse"], rel=1e-5)
    # beside it the undamped, attack-calibrated estimate; damping only lowers the estimated error
    assert metrics["audit/undamped_pixel_rmse"] >= metrics["audit/predicted_pixel_rmse"] > 0
    assert metrics["audit/rmse_over_undamped"] == pytest.approx(
        metrics["audit/rmse"] / metrics["audit/undamped_pixel_rmse"], rel=1e-5)
