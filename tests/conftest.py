"""Shared fixtures: compose the Hydra config like ``train.py`` does, with outputs in a temp dir; test markers.

Every test gets one kind marker, applied here so no test file has to move: ``e2e`` when it (or a fixture it uses)
starts a subprocess or trains end to end (``train.run``/``build`` + ``fit``, a study's smoke run), ``unit``
otherwise. ``slow`` marks the tests measured over 60 s (:data:`SLOW`). ``pytest -m "not slow"`` is the quick
suite, ``pytest -m unit`` the quickest.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
sys.path.insert(0, str(ROOT))  # train.py lives at the repository root
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Overrides that keep a test run small and quiet; tests add their own after these.
FAST = [
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_checkpointing=false",
    "callbacks=none",
    "logger=none",
]


# What makes a test end to end, in its own source or a fixture's: a subprocess, or a whole training run.
_E2E = re.compile(r"subprocess|runpy|sys\.executable|train\.(run|main|build|cli)\b|run_training|\.fit\(|run_study\(|"
                  r"trainer\.(fit|test)\(")
#: Tests measured over 60 s (``pytest --durations``, one file at a time, on the shared 2-core machine), as
#: ``file::name`` (parameters ignored).
SLOW = frozenset({
    "test_train.py::test_default_run_reaches_95_percent_and_writes_an_offline_wandb_run",
})
#: Module-scoped fixtures measured over 60 s: every test using one is slow (deselecting only the first user would
#: just move the cost to the next).
SLOW_FIXTURES = frozenset({"i2f_vs_attack_run"})


def _source(obj: object) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _is_e2e(item: pytest.Item) -> bool:
    own = _source(getattr(item, "function", None))
    module = getattr(item, "module", None)
    # the test's own source, the module's helpers it calls (one level), the fixtures it uses
    helpers = {name for name in re.findall(r"\b(\w+)\(", own) if inspect.isfunction(getattr(module, name, None))}
    sources = [own, *(_source(getattr(module, name)) for name in helpers)]
    fixtures = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for name, defs in fixtures.items():
        if name in ("make_cfg", "tmp_path", "one_thread", "attack_clock"):  # composing a config is not a run
            continue
        sources += [_source(d.func) for d in defs if getattr(d, "baseid", "") != ""]
    return any(_E2E.search(text) for text in sources)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: an in-process test of one piece (applied by tests/conftest.py)")
    config.addinivalue_line("markers", "e2e: starts a subprocess or trains end to end (applied by tests/conftest.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.e2e if _is_e2e(item) else pytest.mark.unit)
        if f"{Path(item.fspath).name}::{item.originalname}" in SLOW or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The ``train`` config with ``overrides``, its outputs under ``output_dir``; sets HydraConfig
    so ``${hydra:...}`` interpolations resolve as they do under ``@hydra.main``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
        cfg.paths.data_dir = str(output_dir / "data")
        cfg.paths.root_dir = str(ROOT)
        del cfg.hydra
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path):
    """``make_cfg(["model=mlp", ...], fast=True)`` → a composed config writing under ``tmp_path``."""

    def factory(overrides: list[str] | None = None, fast: bool = True) -> DictConfig:
        return compose_config([*(FAST if fast else []), *(overrides or [])], tmp_path)

    return factory


@pytest.fixture
def run_training(make_cfg):
    """``run_training([...overrides])`` → metrics dict from ``train.run``."""
    import train

    def runner(overrides: list[str] | None = None, fast: bool = True) -> dict[str, float]:
        return train.run(make_cfg(overrides, fast=fast))

    return runner


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: attacks and studies are many tiny kernels, fastest on one thread (and they
    do not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TickingClock:
    """A clock that advances ``tick`` seconds every time it is read (and counts the readings)."""

    def __init__(self, tick: float = 1.0):
        self.tick, self.now, self.reads = tick, 0.0, 0

    def __call__(self) -> float:
        self.reads += 1
        self.now += self.tick
        return self.now


@pytest.fixture
def attack_clock(monkeypatch) -> TickingClock:
    """The attacks' clock (``pl_i2f.attacks.loop.clock``) replaced by a :class:`TickingClock` of 1 s per reading:
    a time budget is then tested by how many evaluations fit into it, whatever the machine's speed or load."""
    from pl_i2f.attacks import loop

    clock = TickingClock()
    monkeypatch.setattr(loop, "clock", clock)
    return clock
