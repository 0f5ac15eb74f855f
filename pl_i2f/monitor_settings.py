"""The leakage monitor's settings (:class:`MonitorSettings`, validated once) and when it evaluates
(:class:`DenseEarlySchedule`) within what budget (:class:`OverheadBudget`): pure, no Trainer."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pl_i2f.errors import ConfigError


@dataclass(frozen=True)
class DenseEarlySchedule:
    """Evaluation steps: 0; ``first_step``·``growth``^k below ``every_n_steps``; every multiple of
    ``every_n_steps``; and the final step of the run (``total_steps``: the weights training ends with)."""

    every_n_steps: int = 100
    first_step: int = 10
    growth: float = 2.0

    def __post_init__(self) -> None:
        if self.every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {self.every_n_steps}")
        if self.first_step < 1:
            raise ValueError(f"first_step must be >= 1, got {self.first_step}")
        if not self.growth > 1:
            raise ValueError(f"growth must be > 1, got {self.growth}")

    def early_steps(self) -> list[int]:
        steps: list[int] = []
        s = float(self.first_step)
        while round(s) < self.every_n_steps:
            if not steps or round(s) > steps[-1]:
                steps.append(round(s))
            s *= self.growth
        return steps

    def due(self, step: int, total_steps: int | None = None) -> bool:
        """Whether ``step`` is an evaluation step (``total_steps``, the run's final step, always is)."""
        if step < 0:
            return False
        return step == 0 or step % self.every_n_steps == 0 or step == total_steps or step in self.early_steps()

    def next_due(self, step: int, total_steps: int | None = None) -> int:
        """The first evaluation step at or after ``step``."""
        step = max(step, 0)
        regular = -(-step // self.every_n_steps) * self.every_n_steps  # the next multiple of every_n_steps
        later = [s for s in self.early_steps() if s >= step]
        return min([regular, *later, *([total_steps] if total_steps is not None and total_steps >= step else [])])

    def steps(self, total_steps: int) -> list[int]:
        """Every evaluation step of a run of ``total_steps`` optimizer steps, the final one included."""
        if total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {total_steps}")
        early = [s for s in self.early_steps() if s < total_steps]
        regular = range(self.every_n_steps, total_steps, self.every_n_steps)
        return sorted({0, *early, *regular, total_steps})

    def remaining(self, step: int, total_steps: int) -> int:
        """How many evaluation steps are >= ``step`` (this one included)."""
        return sum(1 for s in self.steps(total_steps) if s >= step)


class OverheadBudget:
    """The monitor's share of a fit's time, from measured seconds.

    ``record_training(steps, seconds)``: optimizer steps done in this fit and the training seconds they took
    (wall time minus the monitor's own); ``one_off_seconds`` of ``one_off_steps`` steps measured apart (the first
    step's set-ups — the first batch's loading, a defense's first refresh: training time, counted once, never
    extrapolated as a rate). ``charge(seconds)``: the monitor's own time (evaluations, snapshots, logging). The
    budget is ``max_overhead`` × (the one-off seconds + seconds-per-step × the other steps of ``total_steps``);
    ``left()`` what remains. ``max_overhead=None``: no limit.
    """

    def __init__(self, max_overhead: float | None, schedule: DenseEarlySchedule, total_steps: int | None = None):
        if max_overhead is not None and not (max_overhead > 0 and math.isfinite(max_overhead)):
            raise ValueError(f"max_overhead must be a finite number > 0 or None, got {max_overhead}")
        self.max_overhead = max_overhead
        self.schedule = schedule
        self.total_steps = total_steps
        self.spent = 0.0
        self.train_steps = 0
        self.train_seconds = 0.0
        self.one_off_steps = 0
        self.one_off_seconds = 0.0

    def record_training(self, steps: int, seconds: float, one_off_seconds: float = 0.0, one_off_steps: int = 0) -> None:
        self.train_steps, self.train_seconds = max(0, int(steps)), max(0.0, float(seconds))
        self.one_off_steps, self.one_off_seconds = max(0, int(one_off_steps)), max(0.0, float(one_off_seconds))

    @property
    def measured_seconds(self) -> float:
        """This fit's training seconds so far (the one-off ones included)."""
        return self.one_off_seconds + self.train_seconds

    def charge(self, seconds: float) -> None:
        self.spent += max(0.0, float(seconds))

    def due(self, step: int) -> bool:
        return self.schedule.due(step, self.total_steps)

    @property
    def unlimited(self) -> bool:
        return self.max_overhead is None

    def training_estimate(self) -> float | None:
        """This fit's training seconds: the one-off seconds + measured seconds per step × its other steps (None
        before any step)."""
        if self.train_steps <= 0:
            return None
        done = self.train_steps + self.one_off_steps
        total = done if self.total_steps is None else max(self.total_steps, done)
        return self.one_off_seconds + self.train_seconds / self.train_steps * (total - self.one_off_steps)

    def total(self) -> float:
        """Seconds the monitor may spend in this fit (inf without a limit, 0 before any training step)."""
        if self.max_overhead is None:
            return math.inf
        estimate = self.training_estimate()
        return 0.0 if estimate is None else self.max_overhead * estimate

    def left(self) -> float:
        return self.total() - self.spent

    def remaining(self, step: int) -> int:
        """Evaluations still scheduled from ``step`` on (this one included); 1 when the run's length is unknown."""
        return 1 if self.total_steps is None else max(1, self.schedule.remaining(step, self.total_steps))

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": asdict(self.schedule)}


INTEGER_MINIMA = {"worst_k": 0, "warmup_steps": 1}
RETIRED_SETTINGS = ("damping", "relative_damping", "method", "lanczos_steps", "exact_spectrum_probes", "noise_draws",
                    "spectrum_samples", "samples")  # the damped Lanczos estimate's knobs: the headline needs none


@dataclass
class MonitorSettings:
    """The leakage monitor's settings (:class:`callbacks.I2FMonitor`'s keyword arguments), checked on
    construction: a one-line ConfigError names a bad one."""

    every_n_steps: int = 100
    first_step: int = 10
    growth: float = 2.0
    probe_size: int | None = None  # None: the datamodule's probe batch
    log_per_sample_media: bool = True
    worst_k: int = 5
    max_overhead: float | None = 0.1  # the monitor's time as a fraction of the training time; None: no limit
    warmup_steps: int = 3
    batch_of_one: bool = False  # DLG's federated setting: noise on one sample's gradient, no 1/B
    target_pixel_rmse: float = 0.1  # = pl_i2f.leakage.DEFAULT_TARGET_PIXEL_RMSE (≈ 20 dB PSNR)
    clipping_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        who = "I2FMonitor"
        try:
            OverheadBudget(self.max_overhead, self.schedule())
        except ValueError as exc:
            raise ConfigError(f"{who}: {exc}") from exc
        for name, low in INTEGER_MINIMA.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{who}.{name} must be an integer >= {low}, got {value!r}")
        if self.probe_size is not None and self.probe_size < 1:
            raise ConfigError(f"{who}.probe_size must be >= 1 or null, got {self.probe_size}")
        if not (0 < self.target_pixel_rmse < math.inf):
            raise ConfigError(f"{who}.target_pixel_rmse must be > 0, got {self.target_pixel_rmse}")
        if not (0 < self.clipping_norm < math.inf):
            raise ConfigError(f"{who}.clipping_norm must be > 0, got {self.clipping_norm}")

    def schedule(self) -> DenseEarlySchedule:
        return DenseEarlySchedule(self.every_n_steps, self.first_step, self.growth)
