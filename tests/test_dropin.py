"""The callbacks in anyone's Lightning project: sources resolved from explicit arguments, an Opacus DPOptimizer
or this package's module; one import path from an installed wheel; bad arguments are one-line errors."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from fresh_venv import ROOT, build_wheel, clean_env, make_venv, pip_install
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import train
from callbacks import AttackAudit, I2FMonitor, TradeoffTracker
from pl_i2f.errors import ConfigError
from pl_i2f.leakage import mean_pixel_std, noise_of
from pl_i2f.sources import (
    DataPrior,
    data_prior,
    resolve_noise,
    resolve_pixels,
    resolve_prior,
    resolve_probe,
)
from pl_i2f.threat import SampleNoise


class UserModule(pl.LightningModule):
    """A LightningModule that is not ours: its network under another attribute name, its own training step."""

    def __init__(self, net: nn.Module, lr: float = 0.1):
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def small_net(classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, classes))


def probes(n: int = 6, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % classes


def fit(module: pl.LightningModule, callbacks: list, steps: int, tmp_path: Path, loader: DataLoader | None = None,
        ) -> pl.Trainer:
    x, y = probes(32)
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path)
    trainer.fit(module, loader or DataLoader(TensorDataset(x, y), batch_size=8))
    return trainer


# -- the app and a user's module agree ---------------------------------------------------------------------
APP = ["data.size=8", "trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.deterministic=true",
       "defense=gaussian", "defense.sigma=0.05"]
APP_MONITOR = ["callbacks=default", "~callbacks.progress_bar", "~callbacks.model_checkpoint",
               "~callbacks.last_checkpoint", "~callbacks.leakage_autopilot", "~callbacks.tradeoff_tracker",
               "callbacks.i2f_monitor.max_overhead=null"]


def test_user_module_matches_the_apps_monitor_on_the_same_weights_and_probes(make_cfg, tmp_path, one_thread):
    """The app (our module, datamodule and gaussian defense) and a user's module given the same noise explicitly
    — the app defense's own description, :func:`resolve_noise` — the same probes and pixel scale: the same
    leakage numbers, at step 0 of a fit on weights trained for a few steps first."""
    datamodule, module, trainer = train.build(make_cfg([*APP, "trainer.limit_train_batches=5"]))
    trainer.fit(module, datamodule=datamodule)  # trained weights (no monitor)
    trained = copy.deepcopy(module.model)

    cfg = make_cfg([*APP, *APP_MONITOR, "trainer.max_steps=1"])
    datamodule, app, trainer = train.build(cfg)
    app.model.load_state_dict(trained.state_dict())
    trainer.fit(app, datamodule=datamodule)
    ours = next(cb for cb in trainer.callbacks if isinstance(cb, I2FMonitor))

    equivalent = resolve_noise(app, trainer).sample_noise(0)
    assert equivalent.isotropic and equivalent.std > 0
    x, y = datamodule.probe_batch()
    theirs = I2FMonitor(probe=(x, y), noise_std=equivalent.std, pixel_std=mean_pixel_std(datamodule),
                        prior=datamodule.data_prior(), seed=cfg.seed, max_overhead=None)
    fit(UserModule(copy.deepcopy(trained)), [theirs], 1, tmp_path, datamodule.train_dataloader())

    assert ours.history[0]["step"] == theirs.history[0]["step"] == 0
    a, b = ours.history[0], theirs.history[0]
    # the same noise on the sample's gradient (Bσ = the user's noise_std): the same numbers, DP-SGD's noise
    # multiplier included; sigma_for_target is σ on the mean of B in the app, on the sample (B = 1) for the user
    assert equivalent.std == pytest.approx(datamodule.batch_size * app.defense.sigma_at(0))
    keys = set(a) - {"sigma_for_target"}
    assert keys == set(b) - {"sigma_for_target"}
    assert {"expected_pixel_rmse", "expected_attack_psnr", "prior_psnr", "noise_multiplier_for_target"} <= keys
    for key in sorted(keys):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-12), key
    assert b["sigma_for_target"] == pytest.approx(a["sigma_for_target"] * datamodule.batch_size, rel=1e-5)


# -- sources ---------------------------------------------------------------------------------------------
def test_dataset_probes_are_seeded_and_a_loader_gives_its_datasets():
    x, y = probes(40)
    data = TensorDataset(x, y)
    first, again = resolve_probe(data, None, 8, 3, "I2FMonitor"), resolve_probe(data, None, 8, 3, "I2FMonitor")
    other = resolve_probe(data, None, 8, 4, "I2FMonitor")
    loader = resolve_probe(DataLoader(data, batch_size=5, shuffle=True), None, 8, 3, "I2FMonitor")
    assert first[0].shape == (8, 1, 8, 8) and torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert torch.equal(first[0], loader[0])
    datamodule = SimpleNamespace(probe_batch=lambda size: (x[:size], y[:size]))
    assert torch.equal(resolve_probe(None, datamodule, 4, 0, "I2FMonitor")[0], x[:4])
    with pytest.raises(ConfigError, match="needs probes"):
        resolve_probe(None, None, 4, 0, "I2FMonitor")


def test_opacus_noise_is_sigma_times_c_read_at_every_evaluation():
    from opacus.optimizers import DPOptimizer

    net = small_net()
    optimizer = DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), noise_multiplier=1.1, max_grad_norm=0.5,
                            expected_batch_size=32)
    trainer = SimpleNamespace(optimizers=[SimpleNamespace(_optimizer=optimizer)])  # as Lightning wraps it
    source = resolve_noise(UserModule(net), trainer, noise_std=3.0)  # the optimizer wins over explicit noise
    assert source.sample_noise(0) == SampleNoise(std=1.1 * 0.5, clip_norm=0.5, source="opacus")
    assert noise_of(source, 0, net).std == pytest.approx(0.55)
    optimizer.noise_multiplier = 2.0  # a schedule changes σ: the next evaluation sees it
    assert noise_of(source, 7, net).std == pytest.approx(1.0)
    assert source.max_grad_norm == 0.5


def test_explicit_noise_and_no_noise():
    module = UserModule(small_net())
    trainer = SimpleNamespace(optimizers=[])
    assert resolve_noise(module, trainer, noise_multiplier=2.0, max_grad_norm=0.25).sample_noise(0).std == 0.5
    assert resolve_noise(module, trainer, noise_std=0.3).noise_std(0) == 0.3
    none = resolve_noise(module, trainer)
    assert none.sample_noise(0).is_zero and noise_of(none, 0, module.net).is_zero


def test_released_gradient_is_clipped_and_noised_from_the_generator():
    net = small_net()
    x, y = probes(1)
    source = resolve_noise(UserModule(net), SimpleNamespace(optimizers=[]), noise_multiplier=0.0, max_grad_norm=1e-3)
    clipped = source.release(net, x, y)
    assert clipped.norm() == pytest.approx(1e-3, rel=1e-3)
    noisy = resolve_noise(UserModule(net), SimpleNamespace(optimizers=[]), noise_std=0.1)
    draws = [noisy.release(net, x, y, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_pixel_scale_and_prior():
    x = torch.linspace(0, 2, 64).view(1, 1, 8, 8).repeat(3, 1, 1, 1)
    scale = resolve_pixels(None, x)
    assert scale.std == pytest.approx(0.5) and scale.to_pixels(x).max() == 1 and scale.to_pixels(x).min() == 0
    assert resolve_pixels(None, x, pixel_std=0.2).std == 0.2
    assert resolve_pixels(SimpleNamespace(std=(0.3, 0.5)), x).std == pytest.approx(0.4)
    prior = resolve_prior(None, None, x + torch.arange(3.0).view(3, 1, 1, 1))
    assert isinstance(prior, DataPrior) and prior.variance == pytest.approx(1.0)
    assert torch.allclose(prior.mean, x[0] + 1)
    assert resolve_prior(lambda data: len(data), None, x) == 3  # a callable of the probe inputs
    assert resolve_prior(None, SimpleNamespace(prior=lambda: "datamodule's"), x) == "datamodule's"
    assert data_prior(x).variance == pytest.approx(0.0)


# -- bad arguments: one line naming the argument ---------------------------------------------------------
@pytest.mark.parametrize("cls", [I2FMonitor, AttackAudit])
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"probe": (torch.zeros(4), torch.zeros(4, dtype=torch.long))}, r"probe: x must be a non-empty batch"),
    ({"probe": (torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.long))}, r"probe: y must hold one label"),
    ({"probe": (torch.zeros(2, 1, 8, 8), torch.tensor([0.5, 1.0]))}, r"probe: y must hold class indices"),
    ({"probe": "digits"}, r"probe must be an \(x, y\) pair"),
    ({"noise_std": -0.1}, r"noise_std must be a finite number >= 0"),
    ({"noise_multiplier": -1.0, "max_grad_norm": 1.0}, r"noise_multiplier must be a finite number >= 0"),
    ({"noise_multiplier": 1.0}, r"noise_multiplier needs max_grad_norm"),
    ({"max_grad_norm": 0.0, "noise_multiplier": 1.0}, r"max_grad_norm must be a positive"),
    ({"pixel_std": -1.0}, r"pixel_std must be a positive"),
    ({"loss_fn": "ce"}, r"loss_fn must be a callable"),
])
def test_bad_arguments_fail_at_construction(cls, kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        cls(**kwargs)
    assert "\n" not in str(info.value) and cls.__name__ in str(info.value)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"probe": (probes(4)[0], torch.tensor([0, 1, 2, 12]))}, r"label 12 is out of range for a model with 10"),
    ({"probe": probes(4), "loss_fn": lambda z, y: F.cross_entropy(z, y, reduction="none")},
     r"loss_fn must return a scalar"),
    ({"probe": probes(4), "loss_fn": lambda z, y: F.nll_loss(z, y)}, r"loss_fn: the leakage estimate"),
    ({}, r"needs probes: pass probe="),
])
@pytest.mark.parametrize("cls", [I2FMonitor, AttackAudit])
def test_bad_arguments_fail_at_setup(cls, kwargs, message):
    callback = cls(**kwargs)
    with pytest.raises(ConfigError, match=message) as info:
        callback.setup(SimpleNamespace(datamodule=None), UserModule(small_net()), "fit")
    assert "\n" not in str(info.value)


def test_tracker_arguments_are_checked():
    with pytest.raises(ConfigError, match=r"TradeoffTracker.delta must be in \(0, 1\)"):
        TradeoffTracker(delta=2.0)
    with pytest.raises(ConfigError, match=r"TradeoffTracker.privacy_engine must be an Opacus PrivacyEngine"):
        TradeoffTracker(privacy_engine=object())


# -- the three callbacks on a user's module ----------------------------------------------------------------
def test_callbacks_run_on_a_user_module_with_a_dataset_probe(tmp_path, one_thread):
    x, y = probes(32)
    held_out = TensorDataset(x, y)
    monitor = I2FMonitor(probe=held_out, probe_size=4, every_n_steps=2, first_step=1, max_overhead=None,
                         noise_std=0.05)
    audit = AttackAudit(probe=DataLoader(held_out, batch_size=4), n_samples=1, every_n_epochs=1,
                        noise_std=0.05, attack={"preset": "dlg", "iterations": 3})
    tracker = TradeoffTracker(dirpath=str(tmp_path))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, callbacks=[monitor, audit, tracker], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp_path)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    trainer.fit(UserModule(small_net()), loader, loader)
    assert monitor.steps_logged == [0, 1, 2, 4]
    assert all(h["noise_std"] == pytest.approx(0.05) for h in monitor.history)
    assert audit.audits == 1 and len(audit.pairs) == 1
    summary = json.loads(tracker.summary_path.read_text())
    assert summary["defense"]["source"] == "explicit" or summary["defense"]["name"] == "none"
    assert summary["final"]["leakage/expected_pixel_rmse"] == pytest.approx(monitor.history[-1][
        "expected_pixel_rmse"], rel=1e-6)


# -- packaging -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_installed_wheel_has_one_import_path(tmp_path):
    wheel = build_wheel(tmp_path)
    python = make_venv(tmp_path / "venv")
    pip_install(python, wheel)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, env=clean_env()).stdout.strip()
    probe = """
import importlib.metadata as md, importlib.util as u, json
from pl_i2f.callbacks import AttackAudit, I2FMonitor, TradeoffTracker
import pl_i2f.callbacks as c
spec = u.find_spec("callbacks")
files = [str(f) for f in md.files("pl-i2f")]
print(json.dumps({"module": c.__file__, "callbacks": spec.origin if spec else None, "files": files,
                  "monitor": I2FMonitor.__module__}))
"""
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env=clean_env(), timeout=120)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["module"].startswith(site) and seen["monitor"] == "pl_i2f.callbacks.leakage"
    assert "pl_i2f/callbacks/leakage.py" in seen["files"]
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "pl_i2f").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= set(seen["files"])  # every package of the library
    assert not any(f.startswith("callbacks/") for f in seen["files"])  # nothing generic in site-packages
    # an editable install of an older checkout in the base environment may still map `callbacks`; never this one
    assert seen["callbacks"] is None or not seen["callbacks"].startswith(site)


def test_directional_noise_draws_follow_its_covariance():
    """The Monte Carlo fallback (the paper's engine estimators) draws the covariance the exact route uses."""
    basis = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(0)))[0]
    noise = SampleNoise(std=0.1, basis=basis, extra_variance=torch.tensor([4.0, 9.0]))
    assert not noise.isotropic and not noise.per_unit
    draw = noise.draws()
    draws = torch.stack([draw(torch.Generator().manual_seed(i)) for i in range(4000)])
    covariance = draws.T @ draws / len(draws)
    expected = 0.01 * torch.eye(6) + basis @ torch.diag(torch.tensor([4.0, 9.0])) @ basis.T
    assert torch.allclose(covariance, expected, atol=0.6)
    assert not torch.allclose(covariance, 0.01 * torch.eye(6), atol=0.6)  # the directional part is there
