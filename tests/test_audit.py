"""AttackAudit: its schedule, time budget and progress output, the prior-aware attack it runs by default on what the
shared threat model releases, and the headline it compares with (its media: test_callbacks.py)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import train
from callbacks import AttackAudit
from pl_i2f import calibrated as cal
from pl_i2f import prior as prior_module
from pl_i2f.attacks import PRESETS
from pl_i2f.errors import ConfigError
from pl_i2f.gradients import flat_gradient
from pl_i2f.models import build_model
from pl_i2f.sources import NoiseSource
from pl_i2f.threat import SampleNoise

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


def test_the_prior_aware_attack_is_the_default(make_cfg):
    assert AttackAudit().preset == "map"
    assert make_cfg(["callbacks=audit"]).callbacks.attack_audit.attack.preset == "map"


def test_a_bad_map_option_fails_at_setup(make_cfg):
    with pytest.raises(ConfigError, match="attack preset 'map' got bad options"):
        fit(make_cfg([*SHORT, "+attack.lr=0.1"]))


def audit_metrics(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("audit/")}


def test_the_audit_compares_the_attack_with_the_headline_under_noise(make_cfg):
    """Gaussian noise σ = 0.01 on the mean of the batch: the MAP attack sees one sample's gradient plus noise Bσ;
    the audit logs the attack's and the predicted PSNR (pooled from the mean MSE, as the RMSE), their gap in dB,
    and how many attacks converged; the prediction is the monitor's exact posterior for the same samples."""
    audit, trainer = fit(make_cfg([*SHORT, "attack.iterations=10", "defense=gaussian", "defense.sigma=0.01"]))
    m = audit_metrics(trainer)
    batch = trainer.datamodule.batch_size
    assert m["audit/noise_std"] == pytest.approx(0.01 * batch)
    assert m["audit/psnr"] == pytest.approx(-20 * math.log10(m["audit/rmse"]), rel=1e-5)
    assert m["audit/predicted_psnr"] == pytest.approx(-20 * math.log10(m["audit/predicted_pixel_rmse"]), rel=1e-5)
    assert m["audit/gap_db"] == pytest.approx(m["audit/predicted_psnr"] - m["audit/psnr"], abs=1e-4)
    assert 0 <= m["audit/converged"] <= 2 and m["audit/failed"] == 0
    assert m["audit/predicted_psnr"] >= m["audit/prior_psnr"]  # never worse than guessing the mean
    assert not {"audit/rmse_over_predicted", "audit/per_unit_noise"} & set(m)
    # the headline for the same samples, recomputed here from the library under the same noise and prior
    module, dm = trainer.lightning_module, trainer.datamodule
    x, y = audit._sources.probe[0][:2], audit._sources.probe[1][:2]
    noise = SampleNoise(std=0.01 * batch)
    spectrum = cal.exact_posteriors(module.model, x, y, noise, dm.data_prior(),
                                    value_scale=prior_module.value_scale(dm.std, dm.input_shape))
    assert m["audit/predicted_psnr"] == pytest.approx(float(spectrum.psnr()), abs=1e-3)
    pairs = audit.pairs
    assert [p["sample"] for p in pairs] == [0, 1] and all(isinstance(p["converged"], bool) for p in pairs)
    for p in pairs:
        assert p["gap_db"] == pytest.approx(p["predicted_psnr"] - p["attack_psnr"])


def test_the_audit_ranks_samples_only_under_noise_and_with_enough_of_them(make_cfg):
    noisy = [*SHORT, "attack.iterations=3", "defense=gaussian", "defense.sigma=0.01"]
    _, few = fit(make_cfg([*noisy, "callbacks.attack_audit.n_samples=3"]))
    assert "audit/rank_correlation" not in few.callback_metrics
    _, enough = fit(make_cfg([*noisy, "callbacks.attack_audit.n_samples=5"]))
    assert -1 <= float(enough.callback_metrics["audit/rank_correlation"]) <= 1


def test_without_noise_the_audit_logs_no_gap_and_no_ranking(make_cfg):
    """No noise: the gradient determines each probe to first order (predicted error 0, PSNR ∞), so only the
    attack's own PSNR is meaningful: no gap, no rank correlation."""
    audit, trainer = fit(make_cfg([*SHORT, "attack.iterations=3", "callbacks.attack_audit.n_samples=5"]))
    m = audit_metrics(trainer)
    assert all("gap_db" not in p and "predicted_psnr" not in p for p in audit.pairs)
    assert m["audit/noise_std"] == 0 and m["audit/predicted_pixel_rmse"] == pytest.approx(0.0, abs=1e-6)
    assert "audit/psnr" in m and m["audit/determined_fraction"] == 1.0
    assert not {"audit/gap_db", "audit/predicted_psnr", "audit/rank_correlation"} & set(m)


def test_dpsgd_releases_the_clipped_gradient_plus_sigma_c():
    """The attacker's target under DP-SGD: clip_C(gᵢ) + N(0, σ²C²I) on the sample's own gradient (drawn from the
    audit's generator), not the batch mean's σC/B."""
    torch.manual_seed(0)
    model = build_model("lenet_zhu", (1, 8, 8), 10).eval()
    x, y = torch.randn(1, 1, 8, 8), torch.tensor([3])
    g = flat_gradient(model, x, y)
    clip = 0.5 * float(g.norm())
    plain = AttackAudit._release(NoiseSource(), SampleNoise(std=0.0, clip_norm=clip), model, x, y, 0,
                                 torch.Generator().manual_seed(1))
    assert float(plain.norm()) == pytest.approx(clip, rel=1e-5)
    assert torch.allclose(plain, g * clip / g.norm(), rtol=1e-4, atol=1e-7)
    noisy = AttackAudit._release(NoiseSource(), SampleNoise(std=2.0 * clip, clip_norm=clip), model, x, y, 0,
                                 torch.Generator().manual_seed(1))
    delta = noisy - plain
    assert float(delta.std()) == pytest.approx(2.0 * clip, rel=0.05)  # σC per coordinate, no 1/B


def test_the_map_attack_keeps_the_audits_time_share():
    """A spent share (``max_seconds`` 0): the MAP attack stops before its first evaluation with the prior's mean."""
    from pl_i2f.attacks import invert

    torch.manual_seed(0)
    model = build_model("lenet_zhu", (1, 8, 8), 10).eval()
    x, y = torch.randn(1, 1, 8, 8), torch.tensor([3])
    prior = cal.isotropic_prior(torch.full((64,), 0.5), 1.0)
    result = invert(model, flat_gradient(model, x, y), y, (1, 8, 8), preset="map", prior=prior, noise=0.1,
                    max_seconds=0.0)
    assert result.stop_reason == "budget_time" and result.evaluations == 0
    assert torch.allclose(result.x.reshape(-1).double(), prior.mean)


def test_beyond_exact_inputs_the_audit_logs_the_attack_only(make_cfg):
    """3×32×32 inputs (3,072 values) are past the exact estimate: the audit attacks and says nothing it cannot
    compute per audit (no predicted PSNR, no gap)."""
    short = [o for o in SHORT if not o.startswith("data.size")]
    _, trainer = fit(make_cfg([*short, "data=fake", "model=mlp", "attack.iterations=2", "defense=gaussian",
                               "defense.sigma=0.01", "callbacks.attack_audit.n_samples=1",
                               "callbacks.attack_audit.max_seconds=null"]))
    m = audit_metrics(trainer)
    assert {"audit/psnr", "audit/rmse", "audit/converged"} <= set(m)
    assert not {"audit/predicted_psnr", "audit/gap_db", "audit/predicted_pixel_rmse"} & set(m)
