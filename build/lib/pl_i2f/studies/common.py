"""What every study shares: results on disk (JSON + CSV), figures (PNG), the probe models, one attack run
measured in the I²F's own units, rank correlations, and a small process pool.

A study writes into its output directory:

* ``<name>.csv``  — the raw numbers, one row per measurement (read back by :func:`load_records`);
* ``<name>.json`` — ``{"study", "config", "summary", "seconds", "records_file", "figures"}``; the file that
  :mod:`pl_i2f.studies.report` looks for to redraw figures from a finished run;
* ``<name>_*.png`` — its figures.

No Hydra, no W&B here: ``study.py`` at the repository root adds both.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, is_dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pl_i2f.attacks import invert
from pl_i2f.data import ImageDataModule
from pl_i2f.metrics import reconstruction_metrics
from pl_i2f.models import build_model

RESULT_SUFFIX = ".json"
log = logging.getLogger("pl_i2f")


# --- results ----------------------------------------------------------------------------------------


@dataclass
class StudyResult:
    """A finished study: its rows, its summary and the files written for it."""

    name: str
    config: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    seconds: float
    out_dir: Path
    figures: list[Path] = field(default_factory=list)

    @property
    def records_path(self) -> Path:
        return self.out_dir / f"{self.name}.csv"

    @property
    def summary_path(self) -> Path:
        return self.out_dir / f"{self.name}{RESULT_SUFFIX}"


def _plain(value: Any) -> Any:
    """JSON-safe copy: tensors and numpy scalars to floats/lists, non-finite floats to None, paths to str."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Tensor):
        return _plain(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_result(result: StudyResult) -> StudyResult:
    """Write the rows (CSV) and the summary (JSON) into ``result.out_dir``."""
    result.out_dir.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in result.records:
        keys += [k for k in row if k not in keys]
    with result.records_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(result.records)
    result.summary_path.write_text(json.dumps(_plain({
        "study": result.name,
        "config": result.config,
        "summary": result.summary,
        "seconds": result.seconds,
        "records_file": result.records_path.name,
        "figures": [p.name for p in result.figures],
    }), indent=2, ensure_ascii=False) + "\n")
    return result


def _parse(value: str) -> Any:
    if value == "":
        return None
    if value in ("True", "False"):
        return value == "True"
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


def load_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a study CSV, numbers parsed back to int/float."""
    with Path(path).open(newline="") as fh:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


# --- statistics -------------------------------------------------------------------------------------


def median(values: Iterable[float]) -> float:
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


# --- models -----------------------------------------------------------------------------------------


def accuracy(model: nn.Module, datamodule: ImageDataModule, split: str = "val") -> float:
    """Top-1 accuracy of ``model`` on a split of the datamodule (eval mode, no grad)."""
    dataset = datamodule.val_set if split == "val" else datamodule.test_set
    loader = torch.utils.data.DataLoader(dataset, batch_size=512)
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for xb, yb in loader:
            correct += int((model(xb).argmax(1) == yb).sum())
            total += len(yb)
    model.train(was_training)
    return correct / max(total, 1)


def probe_model(datamodule: ImageDataModule, name: str = "lenet_zhu", init: str = "uniform", epochs: int = 0,
                lr: float = 1e-3, seed: int = 0, **model_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """A model at initialisation (``epochs=0``) or trained for ``epochs`` epochs of plain Adam on the
    datamodule's training split (seeded; no defense), in eval mode. Returns it with a description
    (init, epochs, validation accuracy)."""
    datamodule.setup("fit")
    with torch.random.fork_rng():  # seeded init and shuffling, the caller's global RNG left as it was
        torch.manual_seed(seed)
        model = build_model(name, datamodule.input_shape, datamodule.num_classes, init=init, **model_kwargs)
        if epochs > 0:
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
            model.train()
            for _ in range(epochs):
                for xb, yb in datamodule.train_dataloader():
                    optimizer.zero_grad(set_to_none=True)
                    F.cross_entropy(model(xb), yb).backward()
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    info = {"model": name, "init": init, "epochs": epochs, "lr": lr, "seed": seed,
            "val_acc": accuracy(model, datamodule)}
    return model, info


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 copy for the I²F engine: undamped solves on ill-conditioned JJᵀ need the extra precision."""
    return copy.deepcopy(model).double().eval()


# --- one attack ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackSpec:
    """One attack of a study: a preset of :func:`pl_i2f.attacks.invert` with an explicit iteration budget
    (``overrides`` go to ``invert`` as they are)."""

    preset: str
    iterations: int
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, name: str, spec: dict[str, Any] | int) -> AttackSpec:
        if isinstance(spec, int):
            return cls(preset=name, iterations=spec)
        spec = dict(spec)
        return cls(preset=spec.pop("preset", name), iterations=int(spec.pop("iterations")), overrides=spec)


def attack_error(model: nn.Module, released: Tensor, x0: Tensor, y0: Tensor, attack: AttackSpec,
                 datamodule_stats: tuple[Sequence[float], Sequence[float]], seed: int = 0) -> dict[str, Any]:
    """Run ``attack`` on the released gradient of the single sample ``x0`` (labels known) and measure it.

    ``error`` is ‖x̂ − x₀‖₂ in the model's (normalised) input space, unclamped: the quantity ‖I²F(δ)‖
    predicts. ``pixel_rmse`` / ``psnr`` are the usual [0, 1]-pixel metrics (clamped, as an auditor reports).
    """
    mean, std = datamodule_stats
    overrides = dict(attack.overrides)
    if overrides.get("box", attack.preset != "dlg") and "bounds" not in overrides:
        m = torch.tensor(mean).view(-1, 1, 1)
        s = torch.tensor(std).view(-1, 1, 1)
        overrides["bounds"] = ((0 - m) / s, (1 - m) / s)
    result = invert(model, released, y0, x0.shape, preset=attack.preset, iterations=attack.iterations,
                    seed=seed, progress=False, **overrides)
    metrics = reconstruction_metrics(result.x, x0, mean=mean, std=std, matched=False)
    return {
        "error": float((result.x - x0).norm()),
        "pixel_rmse": metrics["rmse"],
        "psnr": metrics["psnr"],
        "attack_seconds": result.seconds,
        "attack_failed": bool(result.failed),
        "gradient_distance": result.gradient_distance,
    }


# --- parallel work ----------------------------------------------------------------------------------


def _one_thread() -> None:
    torch.set_num_threads(1)


def _read_journal(journal: Path, key: str) -> dict[int, list[dict[str, Any]]]:
    """Units finished by an earlier, interrupted run with the same ``key`` (empty if none or another key)."""
    if not journal.is_file():
        return {}
    lines = journal.read_text().splitlines()
    try:
        if not lines or json.loads(lines[0]).get("key") != key:
            return {}
        entries = [json.loads(line) for line in lines[1:] if line.strip()]
    except json.JSONDecodeError:  # a line cut by the interruption: keep the complete ones
        entries = []
        for line in lines[1:]:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return {int(e["unit"]): e["rows"] for e in entries}


def run_units(fn: Callable[[Any], list[dict[str, Any]]], units: Sequence[Any], workers: int,
              journal: Path | None = None, key: str = "") -> list[dict[str, Any]]:
    """``fn`` over independent work units, in ``workers`` forked processes (1: in this process), one torch
    thread each; rows come back in the units' order. The attacks' many tiny kernels scale with processes,
    not threads.

    With a ``journal`` file, every finished unit's rows are appended to it, and a rerun with the same
    ``key`` (the study's configuration) skips the units already there: an interrupted study resumes.
    """
    workers = max(1, min(int(workers), len(units), os.cpu_count() or 1))
    start = time.perf_counter()
    done: dict[int, list[dict[str, Any]]] = {}
    if journal is not None:
        done = {i: rows for i, rows in _read_journal(journal, key).items() if i < len(units)}
        if done:
            log.info("resuming: %d of %d units already in %s", len(done), len(units), journal)
        journal.parent.mkdir(parents=True, exist_ok=True)
        with journal.open("w") as fh:  # rewrite: the header and the complete entries only
            fh.write(json.dumps({"key": key}) + "\n")
            for index, rows in sorted(done.items()):
                fh.write(json.dumps({"unit": index, "rows": rows}) + "\n")
    todo = [i for i in range(len(units)) if i not in done]

    def progress(index: int, rows: list[dict[str, Any]]) -> None:
        done[index] = rows
        if journal is not None:
            with journal.open("a") as fh:
                fh.write(json.dumps({"unit": index, "rows": _plain(rows)}) + "\n")
        log.info("unit %d/%d done (%d rows, %.0f s)", len(done), len(units), len(rows), time.perf_counter() - start)

    if workers == 1 or len(todo) <= 1:
        for index in todo:
            progress(index, fn(units[index]))
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=get_context("fork"),
                                 initializer=_one_thread) as pool:
            futures = {pool.submit(fn, units[index]): index for index in todo}
            for future in as_completed(futures):
                progress(futures[future], future.result())
    return [row for index in range(len(units)) for row in done[index]]


def config_key(config: Any, smoke: bool) -> str:
    """A stable text key of a study's configuration (for resuming from a journal)."""
    return json.dumps(_plain({"config": config, "smoke": smoke}), sort_keys=True)


def run_study_units(name: str, unit: Callable[[Any], list[dict[str, Any]]], units: Sequence[Any], config: Any,
                    smoke: bool, out_dir: Path, started: float, analyse: Callable[[list[dict[str, Any]]], dict],
                    plot: Callable[..., list[Path]], **summary_extra: Any) -> StudyResult:
    """The common tail of an analysis study: run its units (journalled in ``<name>.units.jsonl``, so an
    interrupted run resumes where it stopped), analyse and plot the records, save everything and drop the
    journal. ``summary_extra`` is added to the analysis summary; ``started`` is the study's perf_counter start."""
    journal = out_dir / f"{name}.units.jsonl"
    records = run_units(unit, units, config.workers, journal=journal, key=config_key(config, smoke))
    summary = analyse(records) | summary_extra
    result = StudyResult(name, asdict(config) | {"smoke": smoke}, records, summary, 0.0, out_dir)
    result.figures = plot(records, summary, out_dir)
    result.seconds = time.perf_counter() - started
    save_result(result)
    journal.unlink(missing_ok=True)
    return result
