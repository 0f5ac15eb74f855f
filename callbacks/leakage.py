"""I2FMonitor: the I²F leakage estimate of a fixed held-out probe batch, logged while training."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info

from callbacks._logging import log_media, log_scalars_at_step, wandb_run
from pl_i2f.errors import ConfigError
from pl_i2f.leakage import LeakageReport, mean_pixel_std, measure_leakage


class I2FMonitor(Callback):
    """Estimate, at step 0 and every ``every_n_steps`` optimizer steps, how well a gradient-inversion attacker
    could rebuild each probe sample from the gradient the run's defense releases at that step.

    Measured before the update of step t, on the weights that produce step t's released gradient, on
    ``probe_size`` fixed held-out validation samples (``datamodule.probe_batch``; never a training batch),
    each its own private input. Logs under ``leakage/``: ``expected_i2f`` (input-space norm),
    ``expected_i2f_rmse`` and ``expected_i2f_pixel_rmse`` (per pixel; the latter on the [0, 1] scale of an
    attack's RMSE), ``lower_bound`` (‖Jδ‖/λ_max), ``lambda_max``, ``lambda_min``, ``condition_number``,
    ``unfairness_p90_p10``, ``unfairness_cv``, ``worst_k_pixel_rmse``; with W&B also a histogram of the
    per-sample errors, a per-class table and bar chart, and the worst samples' images. ``method="slq"``
    (default) estimates by Lanczos quadrature and takes λ_min/condition number from the exact spectra of the
    first ``spectrum_samples`` probes; ``method="exact"`` forms every probe's JJᵀ (about 7x the cost).

    Cost control: ``max_overhead`` (fraction of training wall time, default 0.1) defers a due evaluation
    until the time spent measuring is within that fraction of the time spent training; step 0 always runs.
    Analysis never touches training: hook-free model copy under DP-SGD, eval-mode functional calls, its own
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
        self.samples = samples
        self.seed = seed
        self.last_step = -1
        self.evaluations = 0
        self.deferred = 0
        self.seconds = 0.0
        self.last_report: LeakageReport | None = None
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self._train_started = 0.0
        self._session_seconds = 0.0

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
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "probe_batch"):
            raise ConfigError("I2FMonitor needs a pl_i2f datamodule (one with probe_batch())")
        if not hasattr(pl_module, "defense"):
            raise ConfigError("I2FMonitor needs a module with a `defense` (pl_i2f.module.ClassifierModule)")
        if stage == "fit":
            self._probe = datamodule.probe_batch(self.probe_size)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_started = time.perf_counter()
        self._session_seconds = 0.0  # the overhead budget counts this fit call only (resume included)

    def _due(self, step: int) -> bool:
        """Step 0 and every ``every_n_steps``; deferred (to the next multiple) while over the time budget."""
        if step == self.last_step or step % self.every_n_steps:
            return False
        if self.max_overhead is None or self._session_seconds == 0:
            return True
        training = time.perf_counter() - self._train_started - self._session_seconds
        if self._session_seconds > self.max_overhead * training:
            self.deferred += 1
            return False
        return True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or self._probe is None or not self._due(step):
            return
        start = time.perf_counter()
        report = self.measure(trainer, pl_module, step)
        self._log(trainer, pl_module, report)
        elapsed = time.perf_counter() - start
        self.seconds += elapsed
        self._session_seconds += elapsed
        self.last_step = step
        self.evaluations += 1
        self.last_report = report

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> LeakageReport:
        """The leakage report of the probe batch at ``step`` (library call; no logging)."""
        x, y = self._probe
        device = pl_module.device
        return measure_leakage(
            pl_module.model, x.to(device), y.to(device), pl_module.defense, step,
            pixel_std=mean_pixel_std(trainer.datamodule), damping=self.damping,
            relative_damping=self.relative_damping, method=self.method,
            spectrum_samples=self.spectrum_samples, worst_k=self.worst_k, samples=self.samples,
            generator=torch.Generator(device=device).manual_seed(self.seed + step),
        )

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: LeakageReport) -> None:
        log_scalars_at_step(trainer, report.scalars, "leakage")
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
                wandb.Image(img, caption=f"probe {i} (class {int(y[i])}): rmse {v:.3g}")
                for img, (i, v) in zip(images, report.worst)
            ],
        })

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.evaluations:
            rank_zero_info(
                f"I2FMonitor: {self.evaluations} evaluations in {self.seconds:.1f}s"
                + (f", {self.deferred} deferred to stay within {self.max_overhead:.0%} overhead"
                   if self.deferred else "")
            )

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "evaluations": self.evaluations, "deferred": self.deferred,
                "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict["last_step"]
        self.evaluations = state_dict["evaluations"]
        self.deferred = state_dict.get("deferred", 0)
        self.seconds = state_dict.get("seconds", 0.0)
