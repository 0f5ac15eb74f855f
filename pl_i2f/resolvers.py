"""The OmegaConf resolvers the configs use, registered in one place for every entry point (``train.py``,
``study.py``). OmegaConf only: the library still knows nothing about Hydra."""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def register_resolvers() -> None:
    """Register ``${cwd:}`` (the launch directory, for ``paths.root_dir``). Hydra's ``${hydra:runtime.cwd}`` is
    unset while a multirun launcher resolves ``hydra.sweep.dir``, so sweeps would crash on it; this resolver
    works in both places. Idempotent: safe to call from every entry point and test."""
    OmegaConf.register_new_resolver("cwd", os.getcwd, replace=True)
