"""Redraw the figures of finished study runs: ``python -m pl_i2f.report DIR`` calls :func:`redraw_studies`.

Every ``<study>.json`` below DIR written by :func:`pl_i2f.studies.common.save_result` is found, its CSV rows are
read back, re-analysed with the current code and plotted again (next to the JSON, or under ``out``).
"""

from __future__ import annotations

import json
from pathlib import Path

from pl_i2f.studies import STUDIES, study_module
from pl_i2f.studies.common import RESULT_SUFFIX, load_records


def find_study_results(root: str | Path) -> list[Path]:
    """The study result files (``<study>.json`` naming a known study and its CSV) below ``root``."""
    found = []
    for name in STUDIES:
        for path in sorted(Path(root).rglob(f"{name}{RESULT_SUFFIX}")):
            try:
                meta = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if meta.get("study") == name and (path.parent / meta.get("records_file", "")).is_file():
                found.append(path)
    return found


def redraw_studies(root: str | Path, out: str | Path | None = None) -> list[Path]:
    """Re-analyse and redraw every study run below ``root``; returns the figures written."""
    figures: list[Path] = []
    results = find_study_results(root)
    for path in results:
        meta = json.loads(path.read_text())
        module = study_module(meta["study"])
        records = load_records(path.parent / meta["records_file"])
        target = Path(out) / path.parent.relative_to(root) if out is not None and len(results) > 1 else (
            Path(out) if out is not None else path.parent)
        figures += module.plot(records, module.analyse(records), target)
    for figure in figures:
        print(f"wrote {figure}")
    return figures
