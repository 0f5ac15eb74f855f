"""A run's folder: its layout, the names of its files, reading a finished run back, and removing a failed start's.

A ``train.py`` job writes into its output folder (``paths.output_dir``)::

    summary.json            TradeoffTracker: final metrics, the run's config, one point per epoch
    leakage.json            LeakageRecord: every leakage evaluation, per class and per sample
    .hydra/config.yaml      Hydra: the composed config (``${...}`` interpolations kept)
    .hydra/resolved_config.yaml   train.py: the same with every interpolation filled in
    .hydra/overrides.yaml   Hydra: the command-line overrides
    *.ckpt                  checkpoints

and a multirun folder holds one such folder per job (``0/``, ``1/`` …) beside Hydra's ``multirun.yaml``.
:func:`load_runs` is the one reader of finished runs (the report and the studies read through it).
A leaf: only the standard library and YAML, so every layer can import it.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SUMMARY_FILE = "summary.json"  #: written by callbacks.tradeoff.TradeoffTracker
LEAKAGE_FILE = "leakage.json"  #: written by callbacks.leakage_record.LeakageRecord
HYDRA_DIR = ".hydra"
CONFIG_FILE = "config.yaml"  #: Hydra's composed config, interpolations kept
RESOLVED_CONFIG = "resolved_config.yaml"  #: beside Hydra's config.yaml, every ${...} filled in (train.py)
OVERRIDES_FILE = "overrides.yaml"
MULTIRUN_FILE = "multirun.yaml"  #: Hydra's, in a multirun folder
#: The headline leakage number of an evaluation: the I²F expected reconstruction RMSE on [0, 1] pixels.
HEADLINE = "expected_pixel_rmse"


def finite(value: Any) -> bool:
    """A real, finite number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_yaml(path: Path) -> Any:
    """The YAML document at ``path``; ``None`` when it is missing or unreadable."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None


def read_json(path: Path) -> Any:
    """The JSON document at ``path``; ``None`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_summary(directory: Path) -> dict[str, Any] | None:
    """A run's ``summary.json`` (``None``: the run wrote none, e.g. it failed)."""
    summary = read_json(Path(directory) / SUMMARY_FILE)
    return summary if isinstance(summary, dict) else None


def read_config(directory: Path, resolved: bool = True) -> dict[str, Any]:
    """A job's config from ``.hydra/``: the resolved one (when ``resolved`` and present), else Hydra's own;
    ``{}`` when neither is there."""
    names = (RESOLVED_CONFIG, CONFIG_FILE) if resolved else (CONFIG_FILE,)
    for name in names:
        loaded = read_yaml(Path(directory) / HYDRA_DIR / name)
        if isinstance(loaded, dict):
            return loaded
    return {}


def read_overrides(directory: Path) -> list[str]:
    """A job's command-line overrides (``.hydra/overrides.yaml``), as ``key=value`` strings."""
    return [str(o) for o in (read_yaml(Path(directory) / HYDRA_DIR / OVERRIDES_FILE) or [])]


def read_evaluations(directory: Path) -> list[dict[str, Any]]:
    """The leakage evaluations of ``leakage.json``, by step (``[]`` in runs made without LeakageRecord)."""
    payload = read_json(Path(directory) / LEAKAGE_FILE)
    evaluations = payload.get("evaluations", []) if isinstance(payload, dict) else []
    return sorted(evaluations, key=lambda e: e["step"])


@dataclass
class TrainingRun:
    """One finished training job, as its files describe it."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # leakage.json, by step

    @property
    def task_name(self) -> str | None:
        return self.config.get("task_name")

    @property
    def final(self) -> dict[str, Any]:
        return self.summary.get("final", {})

    @property
    def defense(self) -> dict[str, Any]:
        return self.summary.get("defense") or {"name": "none"}

    @property
    def points(self) -> list[dict[str, Any]]:
        return self.summary.get("points", [])

    def setting(self, *keys: str) -> Any:
        """A value of the run's config (``setting("model", "init")``), else of summary's ``run_config``."""
        for source in (self.config, self.summary.get("run_config", {})):
            node: Any = source
            for key in keys:
                node = node.get(key) if isinstance(node, dict) else None
            if node is not None:
                return node
        return None

    def curve(self, key: str = HEADLINE) -> list[tuple[int, float]]:
        """``(step, value)`` of every leakage evaluation: from ``leakage.json``, else (older runs) the distinct
        measurements the summary's per-epoch points carry (``leakage_step``)."""
        if self.evaluations:
            return [(int(e["step"]), float(e[key])) for e in self.evaluations if finite(e.get(key))]
        if key != HEADLINE:
            return []
        seen = {int(p["leakage_step"]): float(p["leakage"]) for p in self.points
                if p.get("leakage_step") is not None and finite(p.get("leakage"))}
        return sorted(seen.items())

    def at_step(self, step: int, key: str = HEADLINE) -> float | None:
        values = dict(self.curve(key))
        return values.get(step)

    def first(self, key: str = HEADLINE) -> tuple[int, float] | None:
        curve = self.curve(key)
        return curve[0] if curve else None

    def last_evaluation(self) -> dict[str, Any]:
        return self.evaluations[-1] if self.evaluations else {}


def load_run(directory: Path) -> TrainingRun | None:
    """The run in ``directory`` with its config, overrides and leakage evaluations; ``None`` without a summary."""
    directory = Path(directory)
    summary = read_summary(directory)
    if summary is None:
        return None
    return TrainingRun(directory, summary, read_config(directory), read_overrides(directory),
                       read_evaluations(directory))


def load_runs(root: Path) -> list[TrainingRun]:
    """Every run below ``root`` (``root`` itself included) that wrote a ``summary.json``, sorted by path."""
    runs = (load_run(path.parent) for path in sorted(Path(root).rglob(SUMMARY_FILE)))
    return [run for run in runs if run is not None]


def job_dirs(run_dir: Path) -> list[Path]:
    """A multirun's job folders (those Hydra made: a ``.hydra`` folder or a summary), by job number; a single
    run's folder is its own job."""
    run_dir = Path(run_dir)
    jobs = {p.parent for p in run_dir.glob(f"*/{HYDRA_DIR}")} | {p.parent for p in run_dir.glob(f"*/{SUMMARY_FILE}")}
    if (run_dir / SUMMARY_FILE).exists():
        jobs.add(run_dir)
    return sorted(jobs, key=lambda p: (int(p.name) if p.name.isdigit() else 10**9, str(p)))


def task_name(run_dir: Path) -> str | None:
    """The ``task_name`` of a run or multirun folder (Hydra's ``multirun.yaml``, else its first job's config)."""
    run_dir = Path(run_dir)
    configs = [read_yaml(run_dir / MULTIRUN_FILE)] + [read_config(job) for job in job_dirs(run_dir)[:1]]
    for config in configs:
        if isinstance(config, dict) and config.get("task_name"):
            return str(config["task_name"])
    return None


def discard_run_dir(output_dir: str | Path | None, launch_dir: str | Path | None = None) -> bool:
    """Remove a run directory a failed start created (Hydra makes it before the task runs), so no half-written
    run is left behind to be read as a result. Refuses the launch directory itself and any directory holding a
    checkpoint or a ``summary.json`` (those are results). Returns whether it removed something."""
    if not output_dir:
        return False
    path = Path(output_dir).resolve()
    if not path.is_dir() or (launch_dir is not None and path == Path(launch_dir).resolve()) or path == Path.cwd():
        return False
    if any(path.rglob("*.ckpt")) or any(path.rglob(SUMMARY_FILE)):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True
