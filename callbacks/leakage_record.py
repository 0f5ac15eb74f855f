"""LeakageRecord: the leakage monitor's whole curve on disk, for the training studies' analysis.

``summary.json`` (TradeoffTracker) keeps one leakage value per epoch; the studies need every evaluation the
:class:`callbacks.I2FMonitor` made (step 0 included: the leakage at initialisation), its unfairness scalars and
its per-class and per-sample values. This callback reads them off the monitor and writes ``leakage.json`` into
the run directory at the end of fit; ``pl_i2f.studies.training`` reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only

from pl_i2f.runs import LEAKAGE_FILE

from .leakage import I2FMonitor


class LeakageRecord(Callback):
    """After every monitor evaluation keep ``{"step", scalars…, "per_class", "pixel_rmse", "labels"}``; write
    them as ``leakage.json`` (into ``dirpath``, default the trainer's ``default_root_dir``) at the end of fit.

    Must come after the I2FMonitor in the callback list (the monitor's final evaluation runs in its own
    ``on_train_end``). Without a monitor it writes nothing.
    """

    def __init__(self, dirpath: str | None = None):
        super().__init__()
        self.dirpath = dirpath
        self.evaluations: list[dict[str, Any]] = []
        self._seen = 0

    @staticmethod
    def _monitor(trainer: pl.Trainer) -> I2FMonitor | None:
        return next((c for c in trainer.callbacks if isinstance(c, I2FMonitor)), None)

    def _collect(self, trainer: pl.Trainer) -> None:
        monitor = self._monitor(trainer)
        if monitor is None or monitor.evaluations <= self._seen or monitor.last_report is None:
            return
        report = monitor.last_report
        self._seen = monitor.evaluations
        self.evaluations.append({
            "step": int(report.step),
            **report.scalars,
            "per_class": {str(k): v for k, v in sorted(report.per_class.items())},
            "pixel_rmse": report.pixel_rmse.detach().double().cpu().tolist(),
            "labels": report.labels.detach().cpu().tolist(),
        })

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._collect(trainer)

    @rank_zero_only
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collect(trainer)
        monitor = self._monitor(trainer)
        if monitor is None:
            return
        directory = Path(self.dirpath or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"evaluations": sorted(self.evaluations, key=lambda e: e["step"]),
                   "monitor_seconds": monitor.seconds, "reduced": monitor.reduced, "skipped": monitor.skipped}
        (directory / LEAKAGE_FILE).write_text(json.dumps(payload, indent=1, default=float))

    def state_dict(self) -> dict[str, Any]:
        return {"evaluations": list(self.evaluations), "seen": self._seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.evaluations = list(state_dict.get("evaluations", []))
        self._seen = int(state_dict.get("seen", 0))
