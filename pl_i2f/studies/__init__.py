"""Studies: ready experiments that answer one question each and write raw numbers (CSV/JSON) and figures (PNG).

    python study.py study=i2f_vs_attack            # Hydra entry at the repository root (+ W&B offline)
    python study.py study=eigen_directions study.smoke=true

From Python, ``run_study("i2f_vs_attack", out_dir, smoke=True, samples=4)``. Each study module has ``Config``
(its parameters and defaults), ``SMOKE`` (the overrides of its seconds-long version), ``run(out_dir, smoke,
**params)``, ``analyse(records)`` and ``plot(records, summary, out_dir)`` (used again by
``python -m pl_i2f.report DIR`` to redraw the figures of a finished run).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

from pl_i2f.errors import unknown_name
from pl_i2f.registry import STUDIES  # study name → module (imported on use: each pulls in the attacks and I²F)
from pl_i2f.studies.common import StudyResult

__all__ = ["STUDIES", "StudyResult", "run_study", "study_module"]


def study_module(name: str) -> ModuleType:
    """The module of study ``name`` (one-line ``ConfigError`` for an unknown name)."""
    if name not in STUDIES:
        raise unknown_name("study", name, STUDIES)
    return importlib.import_module(STUDIES[name])


def run_study(name: str, out_dir: str | Path, smoke: bool = False, **params: Any) -> StudyResult:
    """Run study ``name`` with its defaults (or its smoke settings) overridden by ``params``."""
    return study_module(name).run(out_dir, smoke=smoke, **params)
