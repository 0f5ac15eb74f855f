"""I2FMonitor: the I²F leakage estimate of a fixed held-out probe batch, logged while training."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from callbacks._logging import log_media, log_scalars_at_step, wandb_image, wandb_run
from pl_i2f.defenses.base import analysis_model
from pl_i2f.errors import ConfigError
from pl_i2f.leakage import LeakageReport, NoiseModel, estimate_leakage_seconds, mean_pixel_std, measure_leakage


@dataclass
class _Snapshot:
    """What an evaluation needs, frozen at its step: the weights (a hook-free copy) and the defense's noise."""

    step: int
    model: nn.Module
    noise: NoiseModel


class I2FMonitor(Callback):
    """Estimate, at step 0 and every ``every_n_steps`` optimizer steps, how well a gradient-inversion attacker
    could rebuild each probe sample from the gradient the run's defense releases at that step.

    Measured on the weights that produce step t's released gradient (before the update of step t), on
    ``probe_size`` fixed held-out validation samples (``datamodule.probe_batch``; never a training batch),
    each its own private input. Logs under ``leakage/``: ``expected_i2f`` (input-space norm),
    ``expected_i2f_rmse`` and ``expected_i2f_pixel_rmse`` (per pixel; the latter on the [0, 1] scale of an
    attack's RMSE), ``lower_bound`` (‖Jδ‖/λ_max), ``lambda_max``, ``lambda_min``, ``condition_number``,
    ``unfairness_p90_p10``, ``unfairness_cv``, ``worst_k_pixel_rmse``; with W&B also a histogram of the
    per-sample errors, a per-class table and bar chart, and the worst samples' images. ``method="slq"``
    (default) estimates by Lanczos quadrature and takes λ_min/condition number from the exact spectra of the
    first ``spectrum_samples`` probes; ``method="exact"`` forms every probe's JJᵀ (about 7x the cost).

    Cost control, ``max_overhead`` (fraction of the training time, default 0.1; ``None``: every scheduled
    evaluation, at once):

    * The step-0 evaluation runs on a snapshot of the initial weights (and the defense's noise at step 0)
      after ``warmup_steps`` training steps, once the run's training time T̂ can be extrapolated from them
      (``trainer.estimated_stepping_batches``). Its cost is predicted first
      (:func:`pl_i2f.leakage.estimate_leakage_seconds`, which times a few JJᵀ products); it runs, and is
      logged at step 0, only if it fits ``max_overhead`` × T̂. Otherwise it is skipped with a warning that
      gives the numbers — e.g. resnet18 on CPU, where one evaluation of 16 CIFAR-size probes takes minutes.
    * A later evaluation runs at its step only if the time spent so far plus its predicted cost (the last
      measured one) stays within ``max_overhead`` × the training time so far; otherwise it is deferred to the
      next multiple of ``every_n_steps``.

    Analysis never touches training: hook-free model copies under DP-SGD, eval-mode functional calls, its own
    seeded generator (reseeded per step, so a resumed run measures the same noise draws).
    """

    def __init__(
        self,
        every_n_steps: int = 200,
        probe_size: int | None = None,
        damping: float = 0.0,
        relative_damping: float = 0.01,
        per_sample: bool = True,
        method: str = "slq",
        spectrum_samples: int = 4,
        worst_k: int = 5,
        max_overhead: float | None = 0.1,
        warmup_steps: int = 3,
        samples: int = 32,
        seed: int = 0,
    ):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.probe_size = probe_size
        self.damping = damping
        self.relative_damping = relative_damping
        self.per_sample = per_sample
        self.method = method
        self.spectrum_samples = spectrum_samples
        self.worst_k = worst_k
        self.max_overhead = max_overhead
        self.warmup_steps = warmup_steps
        self.samples = samples
        self.seed = seed
        self.last_step = -1
        self.evaluations = 0
        self.deferred = 0
        self.skipped = 0
        self.seconds = 0.0
        self.last_report: LeakageReport | None = None
        self.expected_seconds: float | None = None  # predicted, then measured, cost of one evaluation
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pending: _Snapshot | None = None
        self._decided_step = -1
        self._train_started = 0.0
        self._session_seconds = 0.0
        self._start_step = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, probe_size=self.probe_size)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.every_n_steps < 1:
            raise ConfigError(f"I2FMonitor.every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.damping < 0 or self.relative_damping < 0:
            raise ConfigError(f"I2FMonitor damping must be >= 0, got {self.damping} and {self.relative_damping}")
        if self.method not in ("exact", "slq"):
            raise ConfigError(f"I2FMonitor.method must be slq or exact, got {self.method!r}")
        if self.max_overhead is not None and self.max_overhead <= 0:
            raise ConfigError(f"I2FMonitor.max_overhead must be > 0 or null, got {self.max_overhead}")
        if self.warmup_steps < 1:
            raise ConfigError(f"I2FMonitor.warmup_steps must be >= 1, got {self.warmup_steps}")
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "probe_batch"):
            raise ConfigError("I2FMonitor needs a pl_i2f datamodule (one with probe_batch())")
        if not hasattr(pl_module, "defense"):
            raise ConfigError("I2FMonitor needs a module with a `defense` (pl_i2f.module.ClassifierModule)")
        if stage == "fit":
            self._probe = datamodule.probe_batch(self.probe_size)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the overhead budget counts this fit call only (a resumed run starts a new one)
        self._train_started = time.perf_counter()
        self._session_seconds = 0.0
        self._start_step = trainer.global_step
        self._pending = None

    # -- scheduling --------------------------------------------------------------------------------
    def _training_seconds(self) -> float:
        return time.perf_counter() - self._train_started - self._session_seconds

    def _estimated_training_seconds(self, trainer: pl.Trainer) -> float:
        """T̂: this fit's training time, extrapolated from the steps so far (the time so far if unbounded)."""
        done = trainer.global_step - self._start_step
        total = trainer.estimated_stepping_batches - self._start_step
        elapsed = self._training_seconds()
        return elapsed * total / done if done > 0 and math.isfinite(total) and total > done else elapsed

    def _spend(self, seconds: float) -> None:
        self.seconds += seconds
        self._session_seconds += seconds

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or self._probe is None:
            return
        if self._pending is not None and step - self._start_step >= self.warmup_steps:
            pending, self._pending = self._pending, None
            self._evaluate_if_affordable(trainer, pl_module, pending)
        if step != self._decided_step and step != self.last_step and step % self.every_n_steps == 0:
            self._decided_step = step  # once per step (several batches share one under gradient accumulation)
            if self.max_overhead is None:
                self._evaluate(trainer, pl_module, self._freeze(pl_module, step, copy_weights=False))
            elif self.expected_seconds is None and self._pending is None:
                # the first evaluation of this fit: its cost is unknown, and so is the run's length
                start = time.perf_counter()
                self._pending = self._freeze(pl_module, step, copy_weights=True)
                self._spend(time.perf_counter() - start)  # the copy counts against the budget too
            elif (self.expected_seconds is not None and self._session_seconds + self.expected_seconds
                  <= self.max_overhead * self._training_seconds()):
                self._evaluate(trainer, pl_module, self._freeze(pl_module, step, copy_weights=False))
            else:
                self.deferred += 1

    def _freeze(self, pl_module: pl.LightningModule, step: int, copy_weights: bool) -> _Snapshot:
        model = analysis_model(pl_module.model)  # hook-free (a copy already) under DP-SGD
        if copy_weights and model is pl_module.model:
            model = copy.deepcopy(model)
        return _Snapshot(step=step, model=model, noise=NoiseModel.of(pl_module.defense, step, model))

    def _evaluate_if_affordable(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                snapshot: _Snapshot) -> None:
        budget = self.max_overhead * self._estimated_training_seconds(trainer) - self._session_seconds
        x, y = self._probe
        device = pl_module.device
        predicted, calibration, extrapolated = estimate_leakage_seconds(
            snapshot.model, x.to(device), y.to(device), spectrum_samples=self.spectrum_samples,
            affordable=budget / 4,
        )
        self._spend(calibration)
        if self.expected_seconds is None:
            self.expected_seconds = predicted
        if predicted <= budget - calibration:
            self._evaluate(trainer, pl_module, snapshot)
            return
        self.skipped += 1
        rank_zero_warn(
            f"I2FMonitor: skipped the evaluation of step {snapshot.step}: {len(y)} probes are predicted to take "
            f"{'up to ' if extrapolated else ''}{predicted:.1f}s, more than the {budget:.1f}s left of "
            f"max_overhead={self.max_overhead:g} × the "
            f"estimated {self._estimated_training_seconds(trainer):.0f}s of training (measuring the cost took "
            f"{calibration:.1f}s). Lower probe_size, raise max_overhead (null: no limit), train longer, or use "
            "a GPU."
        )

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: _Snapshot) -> None:
        start = time.perf_counter()
        report = self.measure(trainer, pl_module, snapshot.step, model=snapshot.model, noise=snapshot.noise)
        self._log(trainer, report)
        elapsed = time.perf_counter() - start
        self._spend(elapsed)
        self.expected_seconds = elapsed
        self.last_step = max(self.last_step, snapshot.step)
        self.evaluations += 1
        self.last_report = report

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                model: nn.Module | None = None, noise: NoiseModel | None = None) -> LeakageReport:
        """The leakage report of the probe batch at ``step`` (library call; no logging): on ``model`` (default:
        the module's current one) under ``noise`` (default: the defense's at ``step``)."""
        x, y = self._probe
        device = pl_module.device
        return measure_leakage(
            pl_module.model if model is None else model, x.to(device), y.to(device), pl_module.defense, step,
            pixel_std=mean_pixel_std(trainer.datamodule), damping=self.damping,
            relative_damping=self.relative_damping, method=self.method,
            spectrum_samples=self.spectrum_samples, worst_k=self.worst_k, samples=self.samples,
            generator=torch.Generator(device=device).manual_seed(self.seed + step), noise=noise,
        )

    def _log(self, trainer: pl.Trainer, report: LeakageReport) -> None:
        log_scalars_at_step(trainer, report.scalars, "leakage", step=report.step)
        if not self.per_sample or wandb_run(trainer) is None:
            return
        import wandb

        values = report.pixel_rmse.detach().cpu().double().numpy()
        per_class = wandb.Table(columns=["class", "expected_pixel_rmse"],
                                data=[[c, v] for c, v in sorted(report.per_class.items())])
        x, y = self._probe
        images = trainer.datamodule.denormalize(x[[i for i, _ in report.worst]].cpu())
        log_media(trainer, {
            "leakage/per_sample_histogram": wandb.Histogram(values),
            "leakage/per_class": per_class,
            "leakage/per_class_bar": wandb.plot.bar(per_class, "class", "expected_pixel_rmse",
                                                    title="expected reconstruction RMSE per class"),
            "leakage/worst_samples": [
                wandb_image(img, caption=f"probe {i} (class {int(y[i])}): rmse {v:.3g}")
                for img, (i, v) in zip(images, report.worst)
            ],
        }, step=report.step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self._pending is not None:  # training ended within the warm-up: its length is now known exactly
            pending, self._pending = self._pending, None
            self._evaluate_if_affordable(trainer, pl_module, pending)
        if self.evaluations or self.skipped:
            rank_zero_info(
                f"I2FMonitor: {self.evaluations} evaluations in {self.seconds:.1f}s"
                + (f", {self.skipped} skipped and {self.deferred} deferred to stay within "
                   f"{self.max_overhead:.0%} overhead" if self.deferred or self.skipped else "")
            )

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "evaluations": self.evaluations, "deferred": self.deferred,
                "skipped": self.skipped, "seconds": self.seconds, "expected_seconds": self.expected_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict["last_step"]
        self.evaluations = state_dict["evaluations"]
        self.deferred = state_dict.get("deferred", 0)
        self.skipped = state_dict.get("skipped", 0)
        self.seconds = state_dict.get("seconds", 0.0)
        self.expected_seconds = state_dict.get("expected_seconds")
