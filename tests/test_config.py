"""Every config group option composes, and the composed config builds."""

from __future__ import annotations

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
