"""The training studies' analysis: read finished ``train.py`` jobs back, dispatch them to their study by
``task_name``, write each study's numbers (CSV/JSON) and figures (PNG).

A training study is a sweep of ordinary training jobs (``python train.py experiment=init_study``); each job's
folder holds ``summary.json`` (TradeoffTracker: final metrics, one point per epoch), ``leakage.json``
(LeakageRecord: every leakage evaluation, per class and per sample; absent in runs made before it existed)
and Hydra's ``.hydra/`` (the job's config and overrides). :func:`report_training_studies` groups the jobs
below a directory by their ``task_name`` and hands each group to the study module registered for it in
:data:`TRAINING_STUDIES`. A study module provides::

    NAME: str                                          # the files' prefix: <NAME>.csv, <NAME>.json, <NAME>_*.png
    analyse(runs: list[TrainingRun]) -> tuple[list[dict], dict]    # rows and summary
    plot(records: list[dict], summary: dict, out_dir: Path) -> list[Path]

A new study registers its module here under the ``task_name`` its experiment config sets.
No Hydra, no W&B here (``pl_i2f.report``'s command line adds W&B).
"""

from __future__ import annotations

import csv
import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from pl_i2f.report import SUMMARY_FILE

LEAKAGE_FILE = "leakage.json"  # written by callbacks.leakage_record.LeakageRecord
HEADLINE = "expected_pixel_rmse"

#: task_name → module of the study that analyses those runs (``noise_grid``: the older name of the DP-SGD
#: trade-off sweep, ``hparams_search=noise_grid``, read by the same analysis)
TRAINING_STUDIES: dict[str, str] = {
    "init_study": "pl_i2f.studies.init_study",
    "defense_comparison": "pl_i2f.studies.defense_comparison",
    "tradeoff_dpsgd": "pl_i2f.studies.tradeoff_dpsgd",
    "noise_grid": "pl_i2f.studies.tradeoff_dpsgd",
}


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


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def load_training_runs(root: str | Path) -> list[TrainingRun]:
    """Every job below ``root`` with a ``summary.json``, with its config (``.hydra/resolved_config.yaml``, else
    ``.hydra/config.yaml``), overrides and ``leakage.json`` when present; sorted by path."""
    runs = []
    for path in sorted(Path(root).rglob(SUMMARY_FILE)):
        directory = path.parent
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        config: dict[str, Any] = {}
        for name in ("resolved_config.yaml", "config.yaml"):
            loaded = _read_yaml(directory / ".hydra" / name)
            if isinstance(loaded, dict):
                config = loaded
                break
        overrides = _read_yaml(directory / ".hydra" / "overrides.yaml") or []
        evaluations: list[dict[str, Any]] = []
        if (directory / LEAKAGE_FILE).is_file():
            try:
                evaluations = json.loads((directory / LEAKAGE_FILE).read_text()).get("evaluations", [])
            except (OSError, json.JSONDecodeError):
                evaluations = []
        runs.append(TrainingRun(directory, summary, config, [str(o) for o in overrides],
                                sorted(evaluations, key=lambda e: e["step"])))
    return runs


def study_for(task_name: str | None) -> ModuleType | None:
    """The analysis module registered for ``task_name`` (``None``: not a training study)."""
    module = TRAINING_STUDIES.get(task_name or "")
    return importlib.import_module(module) if module else None


@dataclass
class TrainingStudyResult:
    name: str
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    out_dir: Path
    files: list[Path]
    figures: list[Path]


def write_records(records: list[dict[str, Any]], path: Path) -> Path:
    """Rows as CSV: the union of their keys as columns (nested values as JSON text)."""
    columns = list(dict.fromkeys(k for row in records for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in records:
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in row.items()})
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def report_training_studies(root: str | Path, out: str | Path | None = None) -> list[TrainingStudyResult]:
    """Analyse every training study below ``root``: one group per ``task_name`` with a registered study, its
    files written into ``out`` (default ``root``; a subfolder per study when ``root`` holds several)."""
    root = Path(root)
    groups: dict[str, list[TrainingRun]] = {}
    for run in load_training_runs(root):
        if run.task_name in TRAINING_STUDIES:
            groups.setdefault(run.task_name, []).append(run)
    results = []
    for task_name, runs in sorted(groups.items()):
        module = study_for(task_name)
        assert module is not None
        target = Path(out) if out is not None else root
        if len(groups) > 1:
            target = target / task_name
        target.mkdir(parents=True, exist_ok=True)
        records, summary = module.analyse(runs)
        summary = {"study": module.NAME, "task_name": task_name, "runs": len(runs), **summary}
        csv_path = write_records(records, target / f"{module.NAME}.csv")
        json_path = target / f"{module.NAME}.json"
        figures = module.plot(records, summary, target)
        summary["figures"] = [f.name for f in figures]
        summary["records_file"] = csv_path.name
        json_path.write_text(json.dumps(_json_safe(summary), indent=2))
        results.append(TrainingStudyResult(module.NAME, records, summary, target, [csv_path, json_path], figures))
    return results


# --- small statistics and plotting helpers shared by the study modules ----------------------------


def mean_and_spread(values: list[float]) -> tuple[float, float, float]:
    """``(mean, min, max)`` of the finite values (NaNs when there are none)."""
    values = [v for v in values if finite(v)]
    if not values:
        return math.nan, math.nan, math.nan
    return sum(values) / len(values), min(values), max(values)


def std(values: list[float]) -> float:
    values = [v for v in values if finite(v)]
    if len(values) < 2:
        return 0.0 if values else math.nan
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
