"""TradeoffTracker: one utility-privacy point per epoch, and the run summary sweep reports read."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only

from callbacks._logging import log_media, wandb_run
from callbacks.audit import AttackAudit
from pl_i2f.report import SUMMARY_FILE


def _metric(trainer: pl.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


class TradeoffTracker(Callback):
    """After each training epoch (validation included) record ``(epoch, step, val_acc, epsilon, leakage,
    audit_rmse)`` — ε when the defense is DP-SGD, the leakage monitor's latest estimate, the audit's RMSE
    when an audit ran this epoch — and log the points as a W&B table with utility-vs-epoch,
    utility-vs-leakage and utility-vs-ε plots at the end of training (and every ``log_every_n_epochs``
    epochs when set: each logged table is a file, so the default keeps a run's media small). At the end of fit
    (and again after test) write
    ``summary.json`` into ``dirpath`` (default: the trainer's ``default_root_dir``, the run directory):
    final utility, leakage, ε, the points, and ``run_config`` (model, data, defense, threat model …).
    """

    def __init__(
        self,
        run_config: Mapping[str, Any] | None = None,
        utility_key: str = "val/acc",
        leakage_key: str = "leakage/expected_i2f_pixel_rmse",
        epsilon_key: str = "privacy/epsilon",
        audit_key: str = "audit/rmse",
        dirpath: str | None = None,
        log_every_n_epochs: int | None = None,
    ):
        super().__init__()
        self.run_config = dict(run_config or {})
        self.utility_key = utility_key
        self.leakage_key = leakage_key
        self.epsilon_key = epsilon_key
        self.audit_key = audit_key
        self.dirpath = dirpath
        self.log_every_n_epochs = log_every_n_epochs
        self.points: list[dict[str, Any]] = []
        self.summary_path: Path | None = None
        self._fit_final: dict[str, float] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        audit_fresh = any(isinstance(cb, AttackAudit) and cb.last_epoch == epoch for cb in trainer.callbacks)
        point = {
            "epoch": epoch,
            "step": trainer.global_step,
            "val_acc": _metric(trainer, self.utility_key),
            "epsilon": _metric(trainer, self.epsilon_key),
            "leakage": _metric(trainer, self.leakage_key),
            "audit_rmse": _metric(trainer, self.audit_key) if audit_fresh else None,
        }
        self.points = [p for p in self.points if p["epoch"] != epoch] + [point]
        if self.log_every_n_epochs and (epoch + 1) % self.log_every_n_epochs == 0:
            self._log_table(trainer)

    @rank_zero_only
    def _log_table(self, trainer: pl.Trainer) -> None:
        if wandb_run(trainer) is None:
            return
        import wandb

        columns = ["epoch", "step", "val_acc", "epsilon", "leakage", "audit_rmse"]
        table = wandb.Table(columns=columns, data=[[p[c] for c in columns] for p in self.points])
        payload = {
            "tradeoff/points": table,
            "tradeoff/utility_vs_epoch": wandb.plot.line(table, "epoch", "val_acc", title="utility per epoch"),
        }
        if any(p["leakage"] is not None for p in self.points):
            payload["tradeoff/utility_vs_leakage"] = wandb.plot.scatter(
                table, "leakage", "val_acc", title="utility vs expected reconstruction RMSE (I²F)")
        if any(p["epsilon"] is not None for p in self.points):
            payload["tradeoff/utility_vs_epsilon"] = wandb.plot.scatter(table, "epsilon", "val_acc",
                                                                        title="utility vs ε")
        log_media(trainer, payload)

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The run summary: final metrics, the points, and the run's essentials."""
        # after `test`, callback_metrics hold only test metrics: keep what fit ended with
        final = {key: _metric(trainer, key) for key in
                 (self.utility_key, "test/acc", self.epsilon_key, self.leakage_key, self.audit_key)}
        final = {**self._fit_final, **{k: v for k, v in final.items() if v is not None}}
        datamodule = trainer.datamodule
        return {
            "final": final,
            "epochs": len(self.points),
            "steps": trainer.global_step,
            "points": self.points,
            "defense": pl_module.defense.describe() if hasattr(pl_module, "defense") else {"name": "none"},
            "data": datamodule.describe() if hasattr(datamodule, "describe") else {},
            "run_config": self.run_config,
        }

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = Path(self.dirpath or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.summary_path = directory / SUMMARY_FILE
        self.summary_path.write_text(json.dumps(self.summary(trainer, pl_module), indent=2, default=str))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_table(trainer)
        self._write(trainer, pl_module)
        self._fit_final = self.summary(trainer, pl_module)["final"]

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"points": list(self.points)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = list(state_dict["points"])
