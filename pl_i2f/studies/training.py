"""The training studies' analysis: read finished ``train.py`` jobs back, dispatch them to their study by
``task_name``, write each study's numbers (CSV/JSON) and figures (PNG).

A training study is a sweep of ordinary training jobs (``python train.py experiment=init_study``); each job's
folder holds ``summary.json`` (TradeoffTracker: final metrics, one point per epoch), ``leakage.json``
(LeakageRecord: every leakage evaluation, per class and per sample; absent in runs made before it existed)
and Hydra's ``.hydra/`` (the job's config and overrides). :func:`report_training_studies` groups the jobs
below a directory by their ``task_name`` and hands each group to the study module registered for it in
:data:`pl_i2f.registry.TRAINING_STUDIES`. A study module provides::

    NAME: str                                          # the files' prefix: <NAME>.csv, <NAME>.json, <NAME>_*.png
    analyse(runs: list[TrainingRun]) -> tuple[list[dict], dict]    # rows and summary
    plot(records: list[dict], summary: dict, out_dir: Path) -> list[Path]

A new study registers its module in :mod:`pl_i2f.registry` under the ``task_name`` its experiment config sets.
No Hydra, no W&B here (``pl_i2f.report``'s command line adds W&B).
"""

from __future__ import annotations

import csv
import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pl_i2f.registry import MULTIRUN_STUDIES, TRAINING_STUDIES
from pl_i2f.runs import HEADLINE as HEADLINE  # re-exported: the study modules read runs through here
from pl_i2f.runs import LEAKAGE_FILE as LEAKAGE_FILE
from pl_i2f.runs import TrainingRun as TrainingRun
from pl_i2f.runs import finite as finite
from pl_i2f.runs import load_runs
from pl_i2f.runs import task_name as folder_task_name


def load_training_runs(root: str | Path) -> list[TrainingRun]:
    """Every job below ``root`` with a ``summary.json`` (:func:`pl_i2f.runs.load_runs`)."""
    return load_runs(Path(root))


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


def report_multirun_studies(root: str | Path, out: str | Path | None = None) -> list[Path]:
    """Report ``root`` with the multirun study registered for its ``task_name``; returns the figures written."""
    name = folder_task_name(Path(root)) or ""
    figures: list[Path] = []
    for prefix, module in MULTIRUN_STUDIES.items():
        if name.startswith(prefix):
            figures += importlib.import_module(module).report(Path(root), Path(out) if out is not None else None)
    return figures


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
