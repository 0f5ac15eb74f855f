"""Every config group option composes, and the composed config builds."""

from __future__ import annotations

import re

import pytest

from conftest import CONF

GROUPS = ["data", "model", "optim", "trainer", "logger", "callbacks", "defense", "noise_schedule", "attack"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    ("group", "option"),
    [(group, option) for group in GROUPS for option in options(group)],
)
def test_every_group_option_composes(make_cfg, group, option):
    cfg = make_cfg([f"{group}={option}"], fast=False)
    assert cfg.seed == 42
    assert cfg.threat_model.batch_size == cfg.data.batch_size


@pytest.mark.parametrize("option", options("experiment"))
def test_every_experiment_composes(make_cfg, option):
    cfg = make_cfg([f"experiment={option}"], fast=False)
    assert cfg.task_name


@pytest.mark.parametrize("option", options("hparams_search"))
def test_every_hparams_search_composes(make_cfg, option):
    try:
        cfg = make_cfg([f"hparams_search={option}"], fast=False)
    except Exception as exc:  # an optional sweeper plugin ([sweep] extra) may be absent
        if "sweeper" in str(exc).lower() or "Could not find" in str(exc):
            pytest.skip(f"{option} needs the [sweep] extra: {exc}")
        raise
    assert cfg.optimized_metric


def test_defaults_are_the_documented_ones(make_cfg):
    cfg = make_cfg(fast=False)
    assert cfg.data.name == "digits"
    assert cfg.model.name == "lenet_zhu"
    assert "wandb" in cfg.logger and cfg.logger.wandb.offline is True
    assert cfg.defense.name == "none"


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group}/ is empty"


def test_conf_offers_only_registered_names():
    """Every option of conf/model, conf/data and conf/defense sets a name of pl_i2f.registry (the one list that
    validation and the factories read)."""
    from omegaconf import OmegaConf

    from pl_i2f import registry

    for group, names in (("model", registry.MODELS), ("data", registry.DATASETS), ("defense", registry.DEFENSES)):
        offered = set()
        for path in (CONF / group).glob("*.yaml"):
            node = OmegaConf.load(path)
            if path.read_text().startswith("# @package _global_"):
                node = node.get(group, {})
            if node.get("name") is not None:
                offered.add(str(node.name))
        assert offered and offered <= set(names), (group, offered - set(names))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["model.name=vgg"], "unknown model 'vgg'"), (["data.name=imagenet"], "unknown dataset 'imagenet'"),
     (["defense.name=dp"], "unknown defense 'dp'"), (["optim.lr=-0.1"], "optim.lr must be > 0, got -0.1"),
     (["optim.lr=.inf"], "optim.lr must be a finite number > 0"),
     (["optim.momentum=1.0"], "optim.momentum must be >= 0 and < 1")],
)
def test_fast_check_rejects_before_any_import(make_cfg, overrides, message):
    import train
    from pl_i2f.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        train.check_config(make_cfg(overrides))
    train.check_config(make_cfg())  # the defaults pass


def test_init_kwargs_need_no_plus(make_cfg):
    cfg = make_cfg(["model.init=uniform", "model.init_kwargs.a=0.5"])
    assert cfg.model.init_kwargs.a == 0.5


def test_sweep_dir_resolves_where_the_launcher_needs_it():
    """A multirun launcher resolves hydra.sweep.dir before any job has set HydraConfig: the old
    ${hydra:runtime.cwd} crashed every README sweep there."""
    import os

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    import train  # noqa: F401  (registers the cwd resolver, as running train.py does)

    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hparams_search=noise_grid"], return_hydra_config=True)
    assert str(cfg.hydra.sweep.dir).startswith(os.path.join(os.getcwd(), "logs", "noise_grid", "multiruns"))


def test_dpsgd_is_a_whole_recipe_and_the_user_choice_wins(make_cfg):
    cfg = make_cfg(["defense=dpsgd"], fast=False)
    assert (cfg.model.name, cfg.model.activation) == ("lenet_zhu", "tanh")
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.5, 0.9)
    assert cfg.data.batch_size == 256 and cfg.defense.max_grad_norm == 1.0
    mine = make_cfg(["defense=dpsgd", "optim=adam", "model=mlp", "data.batch_size=64"], fast=False)
    assert (mine.optim.optimizer, mine.model.name, mine.data.batch_size) == ("adam", "mlp", 64)
    budget = make_cfg(["experiment=digits_dpsgd"], fast=False)
    assert budget.defense.noise_multiplier is None and budget.defense.target_epsilon == 3.0
    assert budget.model.activation == "tanh"
