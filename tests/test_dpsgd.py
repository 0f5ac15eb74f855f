"""DP-SGD through Opacus: ε equals an independent accountant, schedules are replayed, release = Opacus."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from pl_i2f import defenses
from pl_i2f.data import build_datamodule
from pl_i2f.defenses import NoiseSchedule
from pl_i2f.errors import ConfigError
from pl_i2f.models import build_model

DP = ["defense=dpsgd", "data.size=8", "data.batch_size=32", "+trainer.limit_val_batches=1",
      "+trainer.limit_test_batches=1"]


def digits_sample_rate() -> float:
    dm = build_datamodule("digits", size=8, batch_size=32, seed=42, poisson_sampling=True)
    return dm.sample_rate


def test_logged_epsilon_equals_independent_accountant(run_training):
    metrics = run_training([*DP, "defense.noise_multiplier=1.0", "+trainer.limit_train_batches=5"])
    acc = RDPAccountant()
    for _ in range(5):
        acc.step(noise_multiplier=1.0, sample_rate=digits_sample_rate())
    expected = acc.get_epsilon(1e-5)
    assert metrics["privacy/epsilon"] == pytest.approx(expected, abs=1e-6)
    assert metrics["privacy/epsilon"] > 0


def test_schedule_is_logged_per_step_and_replayed_by_the_accountant(run_training, tmp_path):
    steps = 6
    metrics = run_training([*DP, "defense.noise_multiplier=2.0", "noise_schedule=linear", "noise_schedule.final=0.5",
                            f"+trainer.limit_train_batches={steps}", "trainer.log_every_n_steps=1", "logger=csv"])
    schedule = NoiseSchedule("linear", final=0.5, horizon=steps)
    sigmas = [schedule(2.0, t) for t in range(steps)]
    with open(next(Path(tmp_path).rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["defense/sigma"]) for r in rows if r.get("defense/sigma")]
    assert logged == pytest.approx(sigmas)
    acc = RDPAccountant()
    for s in sigmas:
        acc.step(noise_multiplier=s, sample_rate=digits_sample_rate())
    assert metrics["privacy/epsilon"] == pytest.approx(acc.get_epsilon(1e-5), abs=1e-6)
    assert any(r.get("privacy/epsilon") for r in rows)


def _opacus_setup(seed: int, noise_shape: str = "isotropic"):
    torch.manual_seed(0)
    model = build_model("lenet_zhu", (1, 8, 8), 10)
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,)))
    loader = DataLoader(data, batch_size=16)
    d = defenses.build("dpsgd", noise_multiplier=0.7, max_grad_norm=0.05, seed=seed, noise_shape=noise_shape)
    module = SimpleNamespace(model=model, global_step=0)
    if noise_shape == "anisotropic":
        d.anisotropic.set_reference(data.tensors[0][:2], data.tensors[1][:2])  # public reference batch
    d.setup(module, SimpleNamespace(train_dataloader=lambda: loader, poisson_sampling=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    return d, module, model, optimizer, data


def test_release_equals_opacus_optimizer():
    d, module, model, optimizer, data = _opacus_setup(seed=11)
    dp_optimizer = d.configure_optimizer(module, optimizer)
    assert d.expected_batch_size == 16 and d.sample_rate == pytest.approx(0.25)
    x, y = data.tensors[0][:13], data.tensors[1][:13]  # Poisson batches vary in size; B stays the expected one
    # the analysis on the hooked model (it uses a hook-free copy) before training touches anything
    released = d.release(model, x, y, step=0, generator=torch.Generator().manual_seed(11))
    dp_optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    d.perturb_gradients_(model, 0)
    dp_optimizer.step()
    opacus_grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(released, opacus_grad, rtol=1e-4, atol=1e-7)
    # and the noise part is the sampler's: (release - clipped mean) matches the sampler's draw
    sampler = d.noise_sampler(0)
    noise = sampler(torch.Generator().manual_seed(11))
    assert float(noise.std()) == pytest.approx(0.7 * 0.05 / 16, rel=0.05)
    assert d.noise_std(0) == pytest.approx(0.7 * 0.05 / 16)


def test_configure_twice_does_not_hook_twice():
    d, module, model, optimizer, _ = _opacus_setup(seed=0)
    d.configure_optimizer(module, optimizer)
    first = len(model.autograd_grad_sample_hooks)
    d.configure_optimizer(module, torch.optim.SGD(model.parameters(), lr=0.0))
    assert len(model.autograd_grad_sample_hooks) == first
    assert defenses.has_opacus_hooks(model) and not defenses.has_opacus_hooks(defenses.analysis_model(model))


def test_anisotropic_dp_keeps_the_isotropic_floor():
    d, module, model, optimizer, data = _opacus_setup(seed=3, noise_shape="anisotropic")
    dp_optimizer = d.configure_optimizer(module, optimizer)
    assert type(dp_optimizer).__name__ == "AnisotropicDPOptimizer"
    d.perturb_gradients_(model, 0)  # computes the directions
    v = d.anisotropic.vectors
    sampler = d.noise_sampler(0)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sampler(g) for _ in range(400)]) * 16 / (0.7 * 0.05)  # in units of σC on the sum
    along = draws @ v.T  # variance along every direction >= 1 (floor) ...
    assert float(along.var(0).min()) > 0.8
    null = torch.randn(v.shape[1], generator=g)
    null = null - v.T @ (v @ null)
    null = null / null.norm()
    assert float((draws @ null).var()) == pytest.approx(1.0, rel=0.2)  # ... and exactly 1 off the span
    x, y = data.tensors[0][:16], data.tensors[1][:16]
    dp_optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    dp_optimizer.step()  # the optimizer subclass runs through Opacus


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["++trainer.gradient_clip_val=1.0"], "gradient_clip_val"),
        (["++trainer.accumulate_grad_batches=2"], "accumulate_grad_batches"),
        (["model=convnet", "model.width=4"], "BatchNorm layers"),
        (["defense.noise_multiplier=null", "defense.target_epsilon=1e-9"], "unreachable"),
        (["defense.max_grad_norm=0"], "max_grad_norm"),
    ],
)
def test_bad_dp_configs_are_one_line_errors(make_cfg, overrides, message):
    import train

    with pytest.raises(ConfigError, match=message) as info:
        train.run(make_cfg([*DP, "+trainer.limit_train_batches=2", *overrides]))
    assert "\n" not in str(info.value)


def test_fix_model_and_target_epsilon(run_training):
    metrics = run_training([*DP, "model=convnet", "model.width=4", "defense.fix_model=true",
                            "defense.noise_multiplier=null", "defense.target_epsilon=3.0", "defense.accountant=prv",
                            "+trainer.limit_train_batches=3"])
    assert 2.5 < metrics["privacy/epsilon"] <= 3.0 + 0.05


def test_checkpoint_resume_continues_epsilon_and_noise(make_cfg, tmp_path):
    import train

    common = [*DP, "+trainer.limit_train_batches=3", "trainer.enable_checkpointing=true"]
    straight = train.run(make_cfg([*common, "trainer.max_epochs=2"]))
    first = train.run(make_cfg([*common, "trainer.max_epochs=1"]))
    ckpt = sorted(Path(tmp_path).rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    state = torch.load(ckpt, weights_only=False)["defense"]
    assert sum(n for _, _, n in state["accountant"]["history"]) == 3
    assert "generator" in state  # the noise stream continues where it stopped
    resumed = train.run(make_cfg([*common, "trainer.max_epochs=2", f"ckpt_path='{ckpt}'"]))
    assert resumed["privacy/epsilon"] == pytest.approx(straight["privacy/epsilon"], abs=1e-9)
    assert first["privacy/epsilon"] < resumed["privacy/epsilon"]


def test_prv_accountant_matches_opacus():
    acc = PRVAccountant()
    for _ in range(10):
        acc.step(noise_multiplier=1.0, sample_rate=0.05)
    d = defenses.build("dpsgd", accountant="prv")
    d.engine.accountant.history = list(acc.history)
    assert d.epsilon() == pytest.approx(acc.get_epsilon(1e-5), abs=1e-6)
