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

from pl_i2f.errors import ConfigError
from pl_i2f.module import log_at_step
from pl_i2f.report import SUMMARY_FILE
from pl_i2f.sources import DEFAULT_DELTA, find_dp_optimizer, find_privacy_engine, opacus_epsilon, resolve_noise

from ._logging import log_media, wandb_run
from .preemption import PreemptionCheckpoint


def _metric(trainer: pl.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


class TradeoffTracker(Callback):
    """After each training epoch (validation included) record a point ``(epoch, step, val_acc, epsilon,
    leakage, leakage_step, audit_rmse)``:

    * ``epsilon``: the privacy spent *after* this epoch (read from the defense, so epoch 0 has one and the
      last point carries the final ε — the module logs it only after the callbacks' epoch-end hooks). In a
      project that trains with Opacus (a ``DPOptimizer`` on the trainer) ε comes from the accountant of
      ``privacy_engine`` — by default the module's ``privacy_engine`` attribute, where Opacus' own Lightning
      example keeps it — at ``delta`` (default: the module's ``delta`` attribute, else 1e-5), and the tracker
      logs it as ``privacy/epsilon`` after every epoch and at the end of training;
    * ``leakage`` and ``leakage_step``: the leakage monitor's estimate measured nearest to the point's step,
      and the step it was measured at (an evaluation scheduled at the epoch boundary runs at the next
      epoch's first batch: the points are completed at the end of training from every value seen) — a value
      is never repeated as if it were new, its step says where it comes from;
    * ``audit_rmse``: the audit's RMSE when a new one was logged since the previous point (read from
      ``trainer.callback_metrics``; no dependence on the audit callback's class).

    The points are logged as a W&B table with utility-vs-epoch, utility-vs-leakage and utility-vs-ε plots at
    the end of training (and every ``log_every_n_epochs`` epochs when set: each logged table is a file, so
    the default keeps a run's media small). At the end of fit (and again after test) ``summary.json`` is
    written into ``dirpath`` (default: the trainer's ``default_root_dir``, the run directory): final
    utility, leakage, ε, the points, and ``run_config`` (model, data, defense, threat model …).
    """

    def __init__(
        self,
        run_config: Mapping[str, Any] | None = None,
        utility_key: str = "val/acc",
        leakage_key: str = "leakage/expected_pixel_rmse",
        leakage_step_key: str = "leakage/measured_at_step",
        epsilon_key: str = "privacy/epsilon",
        audit_key: str = "audit/rmse",
        dirpath: str | None = None,
        log_every_n_epochs: int | None = None,
        privacy_engine: Any = None,
        delta: float | None = None,
    ):
        super().__init__()
        if delta is not None and not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ConfigError(f"TradeoffTracker.delta must be in (0, 1), got {delta!r}")
        if privacy_engine is not None and not hasattr(privacy_engine, "get_epsilon"):
            raise ConfigError(f"TradeoffTracker.privacy_engine must be an Opacus PrivacyEngine, got "
                              f"{type(privacy_engine).__name__}")
        self.privacy_engine = privacy_engine
        self.delta = delta
        if log_every_n_epochs is not None and log_every_n_epochs < 1:
            raise ConfigError(f"TradeoffTracker.log_every_n_epochs must be >= 1 or null, got {log_every_n_epochs}")
        for name, key in (("utility_key", utility_key), ("leakage_key", leakage_key),
                          ("leakage_step_key", leakage_step_key), ("epsilon_key", epsilon_key),
                          ("audit_key", audit_key)):
            if not isinstance(key, str) or "/" not in key:
                raise ConfigError(f"TradeoffTracker.{name} must be a metric name like 'val/acc', got {key!r}")
        self.run_config = dict(run_config or {})
        self.utility_key = utility_key
        self.leakage_key = leakage_key
        self.leakage_step_key = leakage_step_key
        self.epsilon_key = epsilon_key
        self.audit_key = audit_key
        self.dirpath = dirpath
        self.log_every_n_epochs = log_every_n_epochs
        self.points: list[dict[str, Any]] = []
        self.leakage_seen: dict[int, float] = {}  # measured step -> value, as the monitor logged them
        self.summary_path: Path | None = None
        self._fit_final: dict[str, float] = {}
        self._last_audit: float | None = None
        self._metrics: Mapping[str, Any] | None = None  # trainer.callback_metrics as of this epoch's start
        self._last_step_value: Any = None

    def _see_leakage(self, trainer: pl.Trainer, metrics: Mapping[str, Any] | None = None) -> None:
        """Record the leakage value last logged and the step it was measured at. ``metrics``: the dict
        ``trainer.callback_metrics`` returned earlier this epoch (the per-batch path: that property re-reduces
        every logged metric on each call, ~0.25 ms a batch on digits, while the monitor's values are written
        straight into the same dict); a tensor already seen (the same object) is not converted again."""
        metrics = trainer.callback_metrics if metrics is None else metrics
        step_value = metrics.get(self.leakage_step_key)
        if step_value is None or step_value is self._last_step_value:
            return
        value = metrics.get(self.leakage_key)
        if value is None:
            return
        self._last_step_value = step_value
        value, step = float(value), float(step_value)
        if not (math.isnan(value) or math.isnan(step)):
            self.leakage_seen[int(step)] = value

    def _nearest_leakage(self, step: int) -> tuple[float | None, int | None]:
        if not self.leakage_seen:
            return None, None
        nearest = min(self.leakage_seen, key=lambda s: (abs(s - step), -s))
        return self.leakage_seen[nearest], nearest

    def _epsilon(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        defense = getattr(pl_module, "defense", None)
        if defense is not None:
            value = defense.epoch_metrics().get(self.epsilon_key)
            if value is not None and not math.isnan(float(value)):
                return float(value)
        value = self._opacus_epsilon(trainer, pl_module)
        return value if value is not None else _metric(trainer, self.epsilon_key)

    def _opacus_epsilon(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        """ε from the Opacus accountant when the trainer steps a ``DPOptimizer`` and a PrivacyEngine is found."""
        if getattr(pl_module, "defense", None) is not None or find_dp_optimizer(trainer) is None:
            return None
        delta = self.delta if self.delta is not None else float(getattr(pl_module, "delta", None) or DEFAULT_DELTA)
        return opacus_epsilon(find_privacy_engine(pl_module, self.privacy_engine), delta)

    def _log_opacus_epsilon(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = self._opacus_epsilon(trainer, pl_module)
        if value is not None:
            log_at_step(trainer, {self.epsilon_key: value})

    def _fresh_audit(self, trainer: pl.Trainer) -> float | None:
        value = _metric(trainer, self.audit_key)
        if value is None or value == self._last_audit:
            return None
        self._last_audit = value
        return value

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics = trainer.callback_metrics  # the same dict all epoch (Lightning replaces it between runs)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._see_leakage(trainer, self._metrics)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._see_leakage(trainer)
        self._log_opacus_epsilon(trainer, pl_module)
        epoch, step = trainer.current_epoch, trainer.global_step
        leakage, leakage_step = self._nearest_leakage(step)
        point = {
            "epoch": epoch,
            "step": step,
            "val_acc": _metric(trainer, self.utility_key),
            "epsilon": self._epsilon(trainer, pl_module),
            "leakage": leakage,
            "leakage_step": leakage_step,
            "audit_rmse": self._fresh_audit(trainer),
        }
        self.points = [p for p in self.points if p["epoch"] != epoch] + [point]
        if self.log_every_n_epochs and (epoch + 1) % self.log_every_n_epochs == 0:
            self._log_table(trainer)

    def _complete_points(self) -> None:
        """Every point gets the leakage measured nearest to it, now that all evaluations are known."""
        for point in self.points:
            point["leakage"], point["leakage_step"] = self._nearest_leakage(point["step"])

    @rank_zero_only
    def _log_table(self, trainer: pl.Trainer) -> None:
        if wandb_run(trainer) is None:
            return
        import wandb

        columns = ["epoch", "step", "val_acc", "epsilon", "leakage", "leakage_step", "audit_rmse"]
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
        preemption = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
        return {
            "final": final,
            "epochs": len(self.points),
            "steps": trainer.global_step,
            "points": self.points,
            "defense": resolve_noise(pl_module, trainer).describe(),
            "data": datamodule.describe() if hasattr(datamodule, "describe") else {},
            "run_config": self.run_config,
            # times and steps the run stopped on a signal and was resumed (absent without the callback)
            **({"preemption": preemption.interruptions.summary()} if preemption is not None else {}),
        }

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        directory = Path(self.dirpath or trainer.default_root_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.summary_path = directory / SUMMARY_FILE
        self.summary_path.write_text(json.dumps(self.summary(trainer, pl_module), indent=2, default=str))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the monitor's final evaluation is logged in its own on_train_end: callbacks run in list order,
        # and the monitor comes first in the default config (the tracker reads what it logged)
        self._see_leakage(trainer)
        self._log_opacus_epsilon(trainer, pl_module)
        self._complete_points()
        self._log_table(trainer)
        self._write(trainer, pl_module)
        self._fit_final = self.summary(trainer, pl_module)["final"]

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"points": list(self.points), "leakage_seen": dict(self.leakage_seen), "last_audit": self._last_audit}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = list(state_dict["points"])
        self.leakage_seen = {int(k): v for k, v in state_dict.get("leakage_seen", {}).items()}
        self._last_audit = state_dict.get("last_audit")
