"""Noise schedules: σ_t = σ₀ · f(progress), a pure function of the training step.

Every noisy defense (``gaussian``, ``anisotropic``, ``dpsgd``) asks its schedule for the noise level of step
t; nothing is stateful, so a resumed run (same config, restored ``global_step``) reproduces σ_t exactly and
Opacus' accountant, which records the σ actually used at each step, can be replayed from the schedule alone.

Progress is counted in optimizer steps (``by: step``) or in whole epochs (``by: epoch``: epoch =
⌊t / steps_per_epoch⌋, so σ stays constant within an epoch). With τ the progress and T the horizon (in the
same unit; ``horizon: null`` means the whole run, filled in from the trainer):

=============  =====================================================================  ==============
``constant``   f = 1                                                                  —
``linear``     f = 1 + (final − 1) · min(τ/T, 1)                                      ``final``
``cosine``     f = final + (1 − final) · (1 + cos(π · min(τ/T, 1))) / 2               ``final``
``exponential`` f = gamma^τ                                                           ``gamma``
``step``       f = gamma^⌊τ / step_size⌋                                              ``gamma, step_size``
=============  =====================================================================  ==============

``final`` is the multiplier of σ₀ reached at the horizon (``final < 1`` anneals the noise, ``> 1`` grows it).

``leakage_target`` is the one schedule that is not a function of the step alone: σ is set at each leakage
monitor evaluation from what it measured (:class:`pl_i2f.autopilot.LeakageTargetSchedule`, driven by the
``LeakageAutopilot`` callback); its history is a function of the recorded measurements and is checkpointed
with the defense, so resume stays exact. :meth:`NoiseSchedule.from_config` returns that class for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pl_i2f.errors import ConfigError, unknown_name
from pl_i2f.registry import FIXED_SCHEDULES as FIXED_SCHEDULES
from pl_i2f.registry import NOISE_SCHEDULES as SCHEDULES  # noqa: F401  (every name a config may give)
from pl_i2f.registry import SCHEDULE_UNITS as UNITS


@dataclass(frozen=True)
class NoiseSchedule:
    """σ_t = σ₀ · f(τ); see the module docstring for f. Immutable: the horizon and steps per epoch are set
    with :meth:`bind` (a new object), once the trainer is known."""

    name: str = "constant"
    by: str = "step"
    final: float = 1.0
    gamma: float = 1.0
    step_size: int = 1
    horizon: int | None = None
    steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.name not in FIXED_SCHEDULES:
            raise unknown_name("noise schedule", self.name, FIXED_SCHEDULES)
        if self.by not in UNITS:
            raise unknown_name("noise schedule unit (noise_schedule.by)", self.by, UNITS)
        if not (self.final >= 0 and math.isfinite(self.final)):
            raise ConfigError(f"noise_schedule.final must be a finite number >= 0, got {self.final}")
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ConfigError(f"noise_schedule.gamma must be a finite number > 0, got {self.gamma}")
        if int(self.step_size) != self.step_size or self.step_size < 1:
            raise ConfigError(f"noise_schedule.step_size must be an integer >= 1, got {self.step_size}")
        if self.horizon is not None and self.horizon < 1:
            raise ConfigError(f"noise_schedule.horizon must be >= 1 (or null for the whole run), got {self.horizon}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ConfigError(f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}")

    @classmethod
    def from_config(cls, config: NoiseSchedule | Mapping[str, Any] | str | None) -> Any:
        """From a ``conf/noise_schedule`` node (a dict with ``name`` and its options), a name, or ``None``
        (constant). ``name: leakage_target`` gives a :class:`pl_i2f.autopilot.LeakageTargetSchedule`."""
        if config is None:
            return cls()
        if isinstance(config, NoiseSchedule) or getattr(config, "adaptive", False):
            return config
        if isinstance(config, str):
            config = {"name": config}
        if isinstance(config, Mapping) and config.get("name") == "leakage_target":
            from pl_i2f.autopilot import LeakageTargetSchedule

            return LeakageTargetSchedule.from_config({k: v for k, v in config.items() if k != "name"})
        if not isinstance(config, Mapping):
            raise ConfigError(f"noise schedule must be a mapping with a name, got {type(config).__name__}")
        known = {"name", "by", "final", "gamma", "step_size", "horizon", "steps_per_epoch"}
        extra = set(config) - known
        if extra:
            raise ConfigError(f"noise schedule got unknown options {sorted(extra)}; valid: {sorted(known)}")
        return cls(**dict(config))

    def bind(self, *, total_steps: int | None, steps_per_epoch: int | None,
             base: float | None = None) -> NoiseSchedule:
        """A copy with the run's length filled in where the config left it open (``horizon: null``). ``base``
        (the defense's σ₀) is not needed by these schedules; ``leakage_target`` uses it for its default bounds."""
        spe = self.steps_per_epoch or steps_per_epoch
        horizon = self.horizon
        if horizon is None and total_steps is not None:
            horizon = total_steps if self.by == "step" else max(1, math.ceil(total_steps / max(1, spe or 1)))
        return NoiseSchedule(self.name, self.by, self.final, self.gamma, self.step_size, horizon, spe)

    def progress(self, step: int) -> int:
        """τ: the step, or the epoch it belongs to."""
        if self.by == "step":
            return int(step)
        if self.steps_per_epoch is None:
            raise ConfigError("noise_schedule.by=epoch needs steps_per_epoch (bind the schedule to a run first)")
        return int(step) // self.steps_per_epoch

    def factor(self, step: int) -> float:
        """f(τ) at optimizer step ``step`` (0-based)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        tau = self.progress(step)
        if self.name == "constant":
            return 1.0
        if self.name == "exponential":
            return float(self.gamma**tau)
        if self.name == "step":
            return float(self.gamma ** (tau // int(self.step_size)))
        if self.horizon is None:
            raise ConfigError(f"noise schedule {self.name!r} needs a horizon (set noise_schedule.horizon, or "
                              "bind it to a run with a known length)")
        frac = min(tau / self.horizon, 1.0)
        if self.name == "linear":
            return 1.0 + (self.final - 1.0) * frac
        return self.final + (1.0 - self.final) * (1.0 + math.cos(math.pi * frac)) / 2.0  # cosine

    def __call__(self, base: float, step: int) -> float:
        """σ_t = base · f(τ)."""
        return float(base) * self.factor(step)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "by": self.by, "final": self.final, "gamma": self.gamma,
                "step_size": self.step_size, "horizon": self.horizon, "steps_per_epoch": self.steps_per_epoch}
