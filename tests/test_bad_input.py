"""Malformed configs and inputs: each fails fast with one line naming the option, exit code 2, no run left.

The table runs through ``train.cli()`` in-process (the same code path as ``python train.py``: Hydra's
composition, validation, building, the error handler) so its 45 rows stay cheap; two rows also run as real
subprocesses to pin the exit code and stderr of the command line.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import ROOT
from pl_i2f import registry, runs, validation
from pl_i2f.errors import ConfigError, one_line

# Each row: extra overrides, a substring of the one error line. The base overrides keep a run that wrongly
# passes validation short (one epoch, four batches) instead of hanging the suite.
BASE = ["logger=none", "callbacks=none", "trainer.enable_progress_bar=false", "trainer.max_epochs=1",
        "trainer.limit_train_batches=4", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]

TABLE: list[tuple[list[str], str]] = [
    # unknown names in every config group
    (["model=vgg"], "Could not find 'model/vgg'; available options in 'model': convnet"),
    (["data=imagenet"], "Could not find 'data/imagenet'"),
    (["defense=foo"], "Could not find 'defense/foo'"),
    (["optim=rmsprop"], "Could not find 'optim/rmsprop'"),
    (["noise_schedule=warp"], "Could not find 'noise_schedule/warp'"),
    (["trainer=tpu9"], "Could not find 'trainer/tpu9'"),
    (["callbacks=everything"], "Could not find 'callbacks/everything'"),
    (["logger=neptune"], "Could not find 'logger/neptune'"),
    (["attack=magic"], "Could not find 'attack/magic'"),
    (["experiment=nope"], "Could not find 'experiment/nope'"),
    (["model.name=vgg"],
     "unknown model 'vgg'; valid: convnet, lenet5, lenet_zhu, mlp, resnet152, resnet18"),
    (["defense.name=foo"], "unknown defense 'foo'; valid: anisotropic, dpsgd, gaussian, none, pruning"),
    (["defense=dpsgd", "defense.accountant=gdp"],
     "unknown privacy accountant 'gdp'; valid: prv, rdp (defense.accountant)"),
    # typo'd keys
    (["defense=gaussian", "defense.sigmaa=1"], "Could not override 'defense.sigmaa'"),
    (["defense=gaussian", "+defense.sigmaa=1"], "unknown option defense.sigmaa for defense=gaussian; valid: sigma"),
    # wrong types
    (["trainer.max_epochs=abc"], "trainer.max_epochs must be an integer >= 1, got 'abc'"),
    (["trainer.max_epochs=1.5"], "trainer.max_epochs must be an integer >= 1, got 1.5"),
    (["data.batch_size=abc"], "data.batch_size must be an integer >= 1, got 'abc'"),
    (["defense=dpsgd", "defense.fix_model=maybe"], "defense.fix_model must be true or false"),
    (["data.batch_size=${nope}"], "nope"),
    # negative / zero / NaN / inf numbers
    (["trainer.max_epochs=-1"], "trainer.max_epochs must be an integer >= 1 (-1, Lightning's 'train forever'"),
    (["trainer.max_epochs=0"], "trainer.max_epochs must be an integer >= 1, got 0"),
    (["trainer.limit_train_batches=0"], "trainer.limit_train_batches must be an integer >= 1, got 0"),
    (["optim.lr=inf"], "optim.lr must be a finite number > 0, got inf"),
    (["optim.lr=nan"], "optim.lr must be a finite number > 0, got nan"),
    (["optim.lr=-0.1"], "optim.lr must be > 0, got -0.1"),
    (["optim.momentum=1.5"], "optim.momentum must be >= 0 and < 1, got 1.5"),
    (["data.batch_size=0"], "data.batch_size must be an integer >= 1, got 0"),
    (["data.batch_size=-4"], "data.batch_size must be an integer >= 1, got -4"),
    (["defense=gaussian", "defense.sigma=-1"], "defense.sigma must be >= 0, got -1"),
    (["defense=gaussian", "defense.sigma=nan"], "defense.sigma must be a finite number >= 0, got nan"),
    (["defense=dpsgd", "defense.noise_multiplier=-1"], "defense.noise_multiplier must be >= 0, got -1"),
    (["defense=dpsgd", "defense.noise_multiplier=0"], "defense.noise_multiplier=0 adds no noise: ε is unbounded"),
    (["defense=dpsgd", "defense.max_grad_norm=0"], "defense.max_grad_norm (DP-SGD per-sample clipping norm) must be"),
    (["defense=dpsgd", "defense.max_grad_norm=inf"], "defense.max_grad_norm (DP-SGD per-sample clipping norm) must"),
    (["defense=dpsgd", "defense.noise_multiplier=null", "defense.target_epsilon=-1"],
     "defense.target_epsilon must be > 0, got -1"),
    (["defense=dpsgd", "defense.delta=1"], "defense.delta must be > 0 and < 1, got 1"),
    (["defense=dpsgd", "defense.delta=1.5"], "defense.delta must be > 0 and < 1, got 1.5"),
    (["defense=pruning", "defense.ratio=1.5"], "defense.ratio (fraction of gradient entries pruned) must be >= 0"),
    (["defense=pruning", "defense.ratio=-0.1"], "defense.ratio (fraction of gradient entries pruned) must be >= 0"),
    (["noise_schedule=linear", "defense=gaussian", "noise_schedule.final=-1"], "noise_schedule.final must be >= 0"),
    (["data.probe_size=0"], "data.probe_size must be an integer >= 1, got 0"),
    (["data.probe_size=100000"], "data.probe_size=100000 exceeds the validation split (270 samples)"),
    (["callbacks=default", "callbacks.i2f_monitor.probe_size=0"], "callbacks.i2f_monitor.probe_size must be an"),
    (["callbacks=default", "callbacks.i2f_monitor.probe_size=5000"],
     "callbacks.i2f_monitor.probe_size=5000 exceeds the validation split (270 samples)"),
    (["data=fake", "data.noise=nan"], "data.noise must be a finite number >= 0, got nan"),
    (["data.batch_size=4096"], "data.batch_size=4096 is larger than the digits train split (1257 samples)"),
    # incompatible combinations
    (["defense=dpsgd", "defense.noise_multiplier=1.5", "defense.target_epsilon=3"],
     "defense.noise_multiplier=1.5 and defense.target_epsilon=3 are both set"),
    (["defense=dpsgd", "model=convnet"], "defense=dpsgd cannot train model=convnet's BatchNorm layers per sample"),
    (["defense=dpsgd", "trainer.gradient_clip_val=1.0"], "unset trainer.gradient_clip_val"),
    (["trainer.devices=2"], "trainer.devices=2 needs trainer=ddp"),
    (["callbacks=audit", "attack=dlg", "threat_model.labels_known=false", "attack.label_mode=known"],
     "attack.label_mode=known needs labels, but threat_model.labels_known=false"),
    # missing files
    (["data=mnist", "data.download=false", "data.root={tmp}/no_such_dir"], "mnist files not found under"),
    (["ckpt_path={tmp}/missing.ckpt"], "missing.ckpt does not exist"),
    (["ckpt_path={tmp}"], "is not a file; give a .ckpt file"),
]


def _cli_in_process(tmp_path: Path, overrides: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``python train.py ...`` without a new interpreter: train.py runs as ``__main__`` (imports are cached)."""
    GlobalHydra.instance().clear()
    rows = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    argv = [str(ROOT / "train.py"), f"paths.log_dir={tmp_path / 'logs'}", *BASE, *rows]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.chdir(ROOT)
    try:
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    finally:
        GlobalHydra.instance().clear()
        _drop_file_handlers(tmp_path)
    return info.value.code, capsys.readouterr().err


def _drop_file_handlers(tmp_path: Path) -> None:
    """Close the log-file handlers Hydra's job logging left on the root logger under ``tmp_path``: a later test's
    logging would reopen a closed one, and fail once pytest (another session's, too) has removed the directory."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler) and handler.baseFilename.startswith(str(tmp_path)):
            root.removeHandler(handler)
            handler.close()


def _assert_no_run_left(tmp_path: Path) -> None:
    assert not list(tmp_path.rglob("summary.json"))
    assert not [h for h in logging.getLogger().handlers  # nor a log file left open (see _drop_file_handlers)
                if isinstance(h, logging.FileHandler) and h.baseFilename.startswith(str(tmp_path))]
    runs = tmp_path / "logs" / "train" / "runs"
    assert not runs.exists() or not any(runs.iterdir()), sorted(runs.iterdir())


@pytest.mark.parametrize(("overrides", "message"), TABLE, ids=[" ".join(o) for o, _ in TABLE])
def test_bad_input_fails_fast_with_one_line(tmp_path, monkeypatch, capsys, overrides, message):
    code, err = _cli_in_process(tmp_path, overrides, monkeypatch, capsys)
    assert code == 2, err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err
    assert message in error_lines[0], error_lines[0]
    assert "Traceback" not in err
    _assert_no_run_left(tmp_path)


def test_the_table_is_large_enough():
    assert len(TABLE) >= 30


def test_missing_data_root_is_not_created(tmp_path, monkeypatch, capsys):
    root = tmp_path / "no_such_dir"
    code, _ = _cli_in_process(tmp_path, ["data=mnist", "data.download=false", f"data.root={root}"], monkeypatch,
                              capsys)
    assert code == 2 and not root.exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["defense=gaussian", "defense.sigmaa=1"], "Could not override 'defense.sigmaa'"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs must be an integer >= 1, got 'abc'"),
])
def test_command_line_exit_code_and_single_line(tmp_path, overrides, message):
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run([sys.executable, "train.py", f"paths.log_dir={tmp_path / 'logs'}", *BASE, *overrides],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {result.stderr.strip()[7:]}"]
    assert message in result.stderr and "Traceback" not in result.stderr + result.stdout
    _assert_no_run_left(tmp_path)


# -- the library side -------------------------------------------------------------------------------------------
def test_validation_imports_no_torch():
    code = "import sys, pl_i2f.validation; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_the_registry_names_what_the_factories_build():
    """Every name is defined once, in pl_i2f.registry: the factories implement exactly those names."""
    from pl_i2f import defenses, models
    from pl_i2f.attacks import PRESETS
    from pl_i2f.data import DATAMODULES
    from pl_i2f.defenses.dpsgd import ACCOUNTANTS
    from pl_i2f.module import OPTIMIZERS, SCHEDULERS
    from pl_i2f.studies import STUDIES
    from pl_i2f.studies.training import TRAINING_STUDIES

    assert set(registry.MODELS) == set(models.MODELS)
    assert set(registry.INIT_SCHEMES) == set(models.INIT_SCHEMES)
    assert set(registry.ACTIVATIONS) == set(models._ACTIVATIONS)
    assert set(registry.DATASETS) == set(DATAMODULES)
    assert set(registry.DEFENSES) == set(defenses.DEFENSES)
    assert set(registry.NOISE_SCHEDULES) == set(defenses.SCHEDULES)
    assert set(registry.ACCOUNTANTS) == set(ACCOUNTANTS)
    assert set(registry.OPTIMIZERS) == set(OPTIMIZERS) and set(registry.LR_SCHEDULERS) == set(SCHEDULERS)
    assert set(registry.ATTACK_PRESETS) == {*PRESETS, "map"}  # map: the prior-aware attack, its own loop
    assert STUDIES is registry.STUDIES and TRAINING_STUDIES is registry.TRAINING_STUDIES
    studies = (registry.STUDIES, registry.TRAINING_STUDIES, registry.MULTIRUN_STUDIES)
    for module in {m for table in studies for m in table.values()}:
        assert importlib.util.find_spec(module) is not None, module


def test_validation_accepts_exactly_the_registered_names(make_cfg):
    base = OmegaConf.to_container(make_cfg([], fast=False), resolve=True)
    for group, names in (("model", registry.MODELS), ("data", registry.DATASETS)):
        for name in names:
            cfg = {**base, group: {**base[group], "name": name}, "defense": {"name": "none"}}
            validation.validate_config(cfg)
        with pytest.raises(ConfigError, match=f"unknown .* 'nope'.*{group}.name"):
            validation.validate_config({**base, group: {**base[group], "name": "nope"}})
    for name in registry.DEFENSES:
        options = {"noise_multiplier": 1.0} if name == "dpsgd" else {}
        validation.validate_config({**base, "defense": {"name": name, **options}})
    with pytest.raises(ConfigError, match="unknown defense 'nope'"):
        validation.validate_config({**base, "defense": {"name": "nope"}})


def test_validation_defaults_and_limits_are_the_callbacks_own():
    """The defaults validation assumes are the callbacks' signature defaults, and the least value validation
    accepts is the least the callback accepts."""
    import dataclasses
    import inspect

    from callbacks import AttackAudit, I2FMonitor
    from pl_i2f.monitoring import MonitorSettings

    def defaults(cls: type) -> dict[str, object]:
        if cls is I2FMonitor:  # its settings are MonitorSettings' fields, passed through **settings
            return {f.name: f.default for f in dataclasses.fields(MonitorSettings)}
        return {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()}

    for cls, table, key in ((I2FMonitor, registry.MONITOR_INT_OPTIONS, "i2f_monitor"),
                            (AttackAudit, registry.AUDIT_INT_OPTIONS, "attack_audit")):
        params = defaults(cls)
        for option, (default, minimum) in table.items():
            assert params[option] == default, (cls.__name__, option)
            cls(**{option: minimum})  # the least value validation accepts: the callback accepts it too
            with pytest.raises(ConfigError, match=option):
                cls(**{option: minimum - 1})
            with pytest.raises(ConfigError, match=f"callbacks.{key}.{option}"):
                validation.validate_config({"callbacks": {key: {option: minimum - 1}}, "trainer": {"max_epochs": 1},
                                            "optim": {"lr": 0.1}, "data": {"name": "digits", "batch_size": 8},
                                            "model": {"name": "mlp"}, "defense": {"name": "none"}})
    params = defaults(I2FMonitor)
    for option, default in registry.MONITOR_DEFAULTS.items():
        assert params[option] == default, option


@pytest.mark.parametrize("name", ["gaussian", "anisotropic", "pruning", "dpsgd"])
def test_defense_option_lists_match_the_constructors(name):
    import inspect

    from pl_i2f import defenses
    from pl_i2f.defenses.anisotropic import AnisotropicNoise

    cls = defenses.DEFENSES[name]
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "shape"}
    if name == "anisotropic":
        params |= set(inspect.signature(AnisotropicNoise.__init__).parameters) - {"self"}
    assert set(validation.DEFENSE_OPTIONS[name]) - {"name"} == params


def test_every_shipped_config_validates(make_cfg):
    """The defaults and every experiment config pass (validation rejects nothing a user is meant to run), and
    together they exercise every defense."""
    defenses = set()
    for overrides in ([], ["defense=dpsgd"], ["defense=gaussian"], ["defense=anisotropic"], ["defense=pruning"],
                      ["experiment=digits_dpsgd"], ["experiment=digits_anisotropic"], ["callbacks=audit"],
                      ["experiment=cifar10_resnet18"], ["experiment=init_study"], ["trainer=ddp"],
                      ["data=fake", "model=mlp"], ["model=convnet", "defense=dpsgd", "defense.fix_model=true"]):
        plain = OmegaConf.to_container(make_cfg(overrides, fast=False), resolve=True)
        assert validation.validate_config(plain) is None, overrides
        defenses.add(plain["defense"]["name"])
    assert defenses == set(registry.DEFENSES)


def test_images_with_nan_are_rejected():
    from pl_i2f.data import FakeDataModule

    class NaNData(FakeDataModule):
        def _build_splits(self):
            train, val, test = super()._build_splits()
            train.dataset.tensors[0][3, 0, 0, 0] = float("nan")
            return train, val, test

    dm = NaNData(input_shape=(1, 4, 4), num_samples=50, batch_size=4, probe_size=2)
    with pytest.raises(ConfigError, match=r"fake train images hold NaN/inf pixels \(1 samples, first at index 3\)"):
        dm.setup()


def test_one_line_flattens_hydra_messages():
    class FakeHydraError(Exception):
        pass

    FakeHydraError.__module__ = "hydra.errors"
    exc = FakeHydraError("In 'train': Could not find 'model/vgg'\n\nAvailable options in 'model':\n\tconvnet\n\tmlp\n"
                         "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf")
    assert one_line(exc) == "Could not find 'model/vgg'; available options in 'model': convnet, mlp"
    assert "\n" not in one_line(exc)


def test_discard_run_dir_keeps_results(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({}, run / "checkpoints" / "last.ckpt")
    assert not runs.discard_run_dir(run) and run.exists()
    empty = tmp_path / "empty_run"
    (empty / ".hydra").mkdir(parents=True)
    assert runs.discard_run_dir(empty) and not empty.exists()


def test_leakage_scalars_are_never_nan_or_inf():
    """A defense whose noise has no single std (a sampler only) used to report noise_std = NaN."""
    import math

    from pl_i2f.leakage import measure_leakage
    from pl_i2f.models import build_model
    from pl_i2f.threat import SampleNoise

    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 3, 3), num_classes=3, hidden=[4])
    d_theta = sum(p.numel() for p in model.parameters())
    sampler_only = SampleNoise(sampler=lambda g: 0.1 * torch.randn(d_theta, generator=g), source="explicit")
    x, y = torch.randn(3, 1, 3, 3), torch.tensor([0, 1, 2])
    report = measure_leakage(model, x, y, sampler_only, 0, worst_k=0, exact_spectrum_probes=2,
                             generator=torch.Generator().manual_seed(0))
    assert report.scalars and all(math.isfinite(v) for v in report.scalars.values()), report.scalars
    assert "noise_std" not in report.scalars and "expected_i2f_pixel_rmse" in report.scalars
