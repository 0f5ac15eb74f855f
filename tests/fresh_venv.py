"""A fresh virtual environment with this repository installed (not editable), for tests of what users get.

``--system-site-packages`` so torch, Lightning and Opacus are not reinstalled (and no network is needed), and
no pip of its own: ``python -m pip`` there runs this interpreter's pip (and setuptools, not the old copy a
fresh venv bundles) and installs into the venv. The build runs without isolation when setuptools is
importable here (offline), with it otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT = 300  # seconds: a build and an install, no downloads


def _pip_options() -> list[str]:
    offline = importlib.util.find_spec("setuptools") is not None
    return ["--no-deps", "--quiet", *(["--no-build-isolation"] if offline else [])]


def python_of(directory: Path) -> Path:
    return directory / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def make_venv(directory: Path) -> Path:
    """A venv at ``directory`` that sees this interpreter's packages; returns its python."""
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(directory)
    return python_of(directory)


def source_copy(out: Path) -> Path:
    """A copy of the repository's sources under ``out``: setuptools builds in the source tree (``build/``,
    ``*.egg-info``), which must not land in the checkout."""
    skip = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "outputs", "multirun", "logs",
                                  "wandb", "data", ".venv", "lightning_logs", ".pytest_cache", ".ruff_cache")
    return Path(shutil.copytree(ROOT, out.resolve() / "source", ignore=skip))


def build_wheel(out: Path) -> Path:
    """``pip wheel`` of (a copy of) the repository into ``out``; returns the wheel."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", *_pip_options(), str(source_copy(out)), "-w", str(out)],
                   check=True, timeout=INSTALL_TIMEOUT, cwd=out)
    (wheel,) = out.glob("pl_i2f-*.whl")
    return wheel


def pip_install(python: Path, target: str | Path) -> None:
    """Install ``target`` (a wheel or the repository: a non-editable install) into the venv of ``python``."""
    subprocess.run([str(python), "-m", "pip", "install", *_pip_options(), str(target)], check=True,
                   timeout=INSTALL_TIMEOUT, cwd=python.parent)


def clean_env() -> dict[str, str]:
    """The environment for a subprocess in the venv: no PYTHONPATH (it would put the repository back)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline")
    return env
