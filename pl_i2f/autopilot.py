"""Leakage autopilot: the noise level set, evaluation by evaluation, by the leakage the monitor measured.

The user states the privacy they want in attack terms — "no gradient-matching attacker should rebuild the
protected probe samples better than ``target_psnr`` dB" — and :class:`LeakageTargetSchedule` (the
``leakage_target`` noise schedule) turns each leakage measurement into the σ for the steps ahead.

**Why the required σ is closed-form.** For Gaussian noise of scale σ (the ``gaussian`` std, the
``anisotropic`` energy scale, DP-SGD's noise multiplier: the monitor's noise model is that scale times a fixed
shape), the expected I²F reconstruction error of every probe is linear in σ, so its expected attack PSNR is
PSNR_i(σ) = PSNR_i(σ_m) − 20·log10(σ / σ_m) for the σ_m it was measured under. Any statistic of the probes'
PSNRs that shifts with them — a quantile, the mean of the k most exposed — shifts the same way, and the σ that
brings the protected statistic P to the aim A is

    σ_required = σ_m · 10^((P − A) / 20),     A = target_psnr − margin,

where the safety margin is z standard errors of the measurement, in dB: margin = z · (20 / ln 10) · s/m with
s/m the relative standard error of the probes' mean pixel RMSE (what the monitor logs as
``relative_stderr``; it includes the trace estimator's own noise).

**Held until the next evaluation** (:meth:`LeakageTargetSchedule.planned_sigma`): leakage per unit σ grows
as the model trains (on digits about 100× over the first 200 steps) and its reading jitters by ±2 dB between
evaluations, so σ is planned for the interval ahead: the largest requirement of the last ``memory``
measurements, and, when the requirement rose since the previous measurement, its log-linear trend extended to
the next evaluation (at most ``max_extrapolation``×). ``extra_margin_db`` (1 dB) is added to the margin.

**What is then applied** (:func:`next_sigma`): σ_required limited to at most ``max_increase`` × and at
least 1/``max_decrease`` × the σ in force (rate limit; not on the first measurement, which replaces the
initial guess rather than a measurement), then to [``sigma_min``, ``sigma_max``], then raised
to the ε-cap floor when DP-SGD runs with ``target_epsilon`` (:func:`epsilon_floor`: the smallest constant σ
for the remaining steps that keeps the run's final ε within the cap — the cap wins over ``sigma_max``).
σ is **held** between evaluations (set once, at the planned level).

**Pure.** The schedule's σ history is a function of the recorded measurements (their steps, the σ they were
taken under, the probes' pixel RMSEs) and of the ε floors, all kept in :meth:`LeakageTargetSchedule.state_dict`,
so a resumed run continues with the same σ at every step.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from scipy.optimize import brentq

from pl_i2f.errors import ConfigError, unknown_name
from pl_i2f.privacy import epsilon_after as epsilon_after  # ε accounting lives in pl_i2f.privacy
from pl_i2f.privacy import epsilon_floor as epsilon_floor

DB_PER_LN = 20.0 / math.log(10.0)  # dB of PSNR per unit of relative RMSE change (d PSNR = −20/ln10 · dm/m)
PROTECT = ("quantile", "worst_k")
DEFENSES = ("gaussian", "anisotropic", "dpsgd")


def target_pixel_rmse(target_psnr: float) -> float:
    """The [0, 1]-pixel RMSE an attack scores at ``target_psnr`` dB: 10^(−PSNR/20) (data range 1)."""
    return 10.0 ** (-float(target_psnr) / 20.0)


def probe_psnr(pixel_rmse: Sequence[float]) -> list[float]:
    """Each probe's expected attack PSNR, −20·log10(RMSE), *not* clamped at 0 dB: the linear estimate keeps
    its exact scaling with σ (:func:`pl_i2f.leakage.attack_psnr` clamps for display)."""
    values = [float(v) for v in pixel_rmse]
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ValueError(f"pixel RMSEs must be positive and finite, got {values}")
    return [-20.0 * math.log10(v) for v in values]


def protected_psnr(psnr: Sequence[float], protect: str = "quantile", q: float = 0.9, worst_k: int = 1) -> float:
    """The statistic the autopilot holds at the target: the ``q``-quantile of the probes' PSNRs
    (``quantile``: q = 0.9 protects 90% of them), or the mean PSNR of the ``worst_k`` most exposed probes."""
    if protect == "quantile":
        return float(np.quantile(psnr, q))  # linear interpolation between order statistics
    if protect == "worst_k":
        top = sorted(psnr, reverse=True)[: max(1, int(worst_k))]
        return sum(top) / len(top)
    raise unknown_name("autopilot protect mode", protect, PROTECT)


def margin_db(pixel_rmse: Sequence[float], z: float) -> float:
    """z standard errors of the measurement, in dB: z · (20/ln 10) · (stderr of the mean RMSE / mean)."""
    values = [float(v) for v in pixel_rmse]
    if z == 0 or len(values) < 2:
        return 0.0
    relative = statistics.stdev(values) / math.sqrt(len(values)) / statistics.fmean(values)
    return float(z) * DB_PER_LN * relative


def required_sigma(sigma_measured: float, protected: float, target_psnr: float, margin: float = 0.0) -> float:
    """σ_m · 10^((P − (target − margin)) / 20): the σ at which the protected PSNR P lands ``margin`` dB below
    the target (PSNR falls by 20·log10 of the factor σ grows by)."""
    if not sigma_measured > 0:
        raise ValueError(f"the σ a measurement was taken under must be > 0, got {sigma_measured}")
    return float(sigma_measured) * 10.0 ** ((protected - (target_psnr - margin)) / 20.0)


def required_scale(psnr_at: Callable[[float], Sequence[float]], aim: float, protect: str = "quantile",
                   q: float = 0.9, worst_k: int = 1, lo: float = 1e-12, hi: float = 1e12) -> float:
    """The noise scale s at which the protected statistic of the probes' PSNRs ``psnr_at(s)`` reaches ``aim`` —
    for the calibrated (prior-aware) estimate, whose PSNR is monotone in s but not linear in log s (it saturates
    at the prior's): bisection on log s. ``hi`` when even the largest scale does not bring it down to the aim
    (the prior alone beats the target), ``lo`` when the smallest already does."""
    def gap(log_s: float) -> float:
        return protected_psnr(list(psnr_at(math.exp(log_s))), protect, q, worst_k) - aim

    a, b = math.log(lo), math.log(hi)
    if gap(a) <= 0:
        return lo
    if gap(b) >= 0:
        return hi
    return math.exp(brentq(gap, a, b, xtol=1e-10))


def next_sigma(required: float, current: float, *, sigma_min: float, sigma_max: float, max_increase: float,
               max_decrease: float, floor: float | None = None) -> tuple[float, str]:
    """(σ to apply, what limited it): ``required`` rate-limited around ``current``, clipped to
    [``sigma_min``, ``sigma_max``], then raised to ``floor`` (the ε cap; it wins over ``sigma_max``).
    The reason is ``""`` when σ = ``required``, else ``rate``, ``sigma_min``, ``sigma_max`` or ``epsilon_cap``."""
    sigma, reason = required, ""
    if sigma > current * max_increase:
        sigma, reason = current * max_increase, "rate"
    elif sigma < current / max_decrease:
        sigma, reason = current / max_decrease, "rate"
    if sigma < sigma_min:
        sigma, reason = sigma_min, "sigma_min"
    elif sigma > sigma_max:
        sigma, reason = sigma_max, "sigma_max"
    if floor is not None and sigma < floor:
        sigma, reason = floor, "epsilon_cap"
    return float(sigma), reason


@dataclass
class Decision:
    """One autopilot update: the measurement it read and the σ it set from ``effective_step`` on."""

    measured_step: int
    effective_step: int
    sigma_measured: float
    sigma: float
    probes: int = 0
    protected_psnr: float = math.nan
    margin_db: float = 0.0
    sigma_required: float = math.nan
    predicted_psnr: float = math.nan
    floor: float | None = None
    limited_by: str = ""
    applied: bool = True  # False: recorded only (the final evaluation, or too few probes to act on)

    def meets(self, target_psnr: float, tolerance_db: float = 0.0) -> bool:
        """Whether the protected probes' measured PSNR was within ``target + tolerance``."""
        return self.protected_psnr <= target_psnr + tolerance_db


@dataclass
class LeakageTargetSchedule:
    """``noise_schedule=leakage_target``: σ set from the leakage monitor's measurements (module docstring).

    σ values are in the defense's own unit (``gaussian``/``anisotropic``: ``defense.sigma``'s absolute std per
    coordinate; ``dpsgd``: the noise multiplier). ``sigma_min``/``sigma_max`` ``None``: σ₀/100 and 100·σ₀ of the
    defense's configured σ₀; ``initial_sigma`` ``None``: ``sigma_max`` (the most protection allowed, until the
    first measurement says how much is needed).
    """

    target_psnr: float = 20.0
    protect: str = "quantile"
    quantile: float = 0.9
    worst_k: int = 1
    sigma_min: float | None = None
    sigma_max: float | None = None
    initial_sigma: float | None = None
    max_increase: float | None = None
    max_decrease: float = 2.0
    z: float = 1.0
    extra_margin_db: float = 1.0
    memory: int = 2
    extrapolate: bool = True
    max_extrapolation: float = 4.0
    min_probes: int = 8
    target_epsilon: float | None = None
    monitor_max_overhead: float | None = None
    monitor_every_n_steps: int | None = 50
    name: str = "leakage_target"
    base: float | None = None  # the defense's σ₀ (filled in by bind)
    decisions: list[Decision] = field(default_factory=list)

    adaptive = True  # a schedule that callbacks update (NoiseSchedule.from_config passes it through)

    def __post_init__(self) -> None:
        check_leakage_target_options(asdict(self))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> LeakageTargetSchedule:
        known = {f.name for f in fields(cls)} - {"base", "decisions"}
        extra = set(config) - known
        if extra:
            raise ConfigError(f"noise_schedule=leakage_target got unknown options {sorted(extra)}; valid: "
                              f"{sorted(known)}")
        return cls(**dict(config))

    # -- the NoiseSchedule interface the defenses call -----------------------------------------------
    def bind(self, *, total_steps: int | None, steps_per_epoch: int | None,
             base: float | None = None) -> LeakageTargetSchedule:
        """Fill in the defense's σ₀; returns ``self`` (callbacks update this object). The run's length is not
        needed: σ follows the measurements, not the progress (the arguments keep NoiseSchedule's interface)."""
        if base is not None:
            self.base = float(base)
        return self

    def _bound(self, value: float | None, factor: float) -> float:
        if value is not None:
            return float(value)
        if self.base is None or not self.base > 0:
            raise ConfigError("noise_schedule=leakage_target needs sigma_min and sigma_max, or a defense σ₀ > 0 "
                              "to derive them from (defense.sigma / defense.noise_multiplier)")
        return self.base * factor

    @property
    def lower(self) -> float:
        return self._bound(self.sigma_min, 0.01)

    @property
    def upper(self) -> float:
        return self._bound(self.sigma_max, 100.0)

    @property
    def initial(self) -> float:
        return float(self.initial_sigma) if self.initial_sigma is not None else self.upper

    def sigma_at(self, step: int) -> float:
        """σ in force at optimizer step ``step``: the last applied decision effective at or before it."""
        applied = [d for d in self.decisions if d.applied]
        i = bisect.bisect_right([d.effective_step for d in applied], int(step))
        return applied[i - 1].sigma if i else self.initial

    def __call__(self, base: float, step: int) -> float:
        if self.base is None:
            self.base = float(base)
        return self.sigma_at(step)

    def factor(self, step: int) -> float:
        return self.sigma_at(step) / self.base if self.base else math.nan

    # -- updates -------------------------------------------------------------------------------------
    @property
    def last_measured_step(self) -> int:
        measured = [d.measured_step for d in self.decisions if d.measured_step >= 0]
        return max(measured) if measured else -1

    def planned_sigma(self, required: float, measured_step: int, next_evaluation: int | None) -> float:
        """The σ to hold until the next evaluation, before limits: the largest requirement of the last
        ``memory`` measurements (this one included: one low reading does not drop the protection), and — with
        ``extrapolate`` — this one grown along its upward trend since the previous measurement, log-linearly
        to ``next_evaluation``, by at most ``max_extrapolation``×."""
        usable = [d for d in self.measured() if d.probes >= self.min_probes and d.measured_step < measured_step]
        recent = [d.sigma_required for d in usable[-(self.memory - 1):]] if self.memory > 1 else []
        planned = max([required, *recent])
        if self.extrapolate and usable and next_evaluation is not None and next_evaluation > measured_step:
            previous = usable[-1]
            if required > previous.sigma_required and measured_step > previous.measured_step:
                rate = math.log(required / previous.sigma_required) / (measured_step - previous.measured_step)
                growth = min(math.exp(rate * (next_evaluation - measured_step)), self.max_extrapolation)
                planned = max(planned, required * growth)
        return planned

    def observe(self, measured_step: int, effective_step: int, pixel_rmse: Sequence[float],
                floor: float | None = None, apply: bool = True, next_evaluation: int | None = None,
                psnr_at: Callable[[float], Sequence[float]] | None = None, scale: float = 0.0) -> Decision:
        """Record a measurement (the probes' expected pixel RMSEs at ``measured_step``, under the σ then in
        force) and, when ``apply`` and there are at least ``min_probes`` probes, set σ from
        ``effective_step`` on (``next_evaluation``: the step of the monitor's next evaluation, for the
        extrapolation). ``psnr_at(s)``: the probes' PSNRs at noise scale s (the calibrated estimate, measured at
        ``scale`` > 0 ∝ σ): σ_required is then solved on it (:func:`required_scale`) instead of the linear
        closed form. Returns the decision."""
        sigma_measured = self.sigma_at(measured_step)
        current = self.sigma_at(effective_step)
        values = [float(v) for v in pixel_rmse]
        psnr = probe_psnr(values)
        protected = protected_psnr(psnr, self.protect, self.quantile, self.worst_k)
        margin = margin_db(values, self.z) + self.extra_margin_db
        if psnr_at is not None and scale > 0:
            aim = self.target_psnr - margin
            required = sigma_measured * required_scale(psnr_at, aim, self.protect, self.quantile,
                                                       self.worst_k) / scale
        else:
            required = required_sigma(sigma_measured, protected, self.target_psnr, margin)
        enough = len(values) >= self.min_probes
        if apply and enough:
            # the first measurement replaces a guess (the initial σ), not a measurement: no rate limit on it
            first = not any(d.applied and d.measured_step >= 0 for d in self.decisions)
            planned = self.planned_sigma(required, measured_step, next_evaluation)
            sigma, reason = next_sigma(planned, current, sigma_min=self.lower, sigma_max=self.upper,
                                       max_increase=math.inf if first or self.max_increase is None
                                       else self.max_increase,
                                       max_decrease=math.inf if first else self.max_decrease, floor=floor)
        else:
            sigma, reason = current, ("" if enough else "too_few_probes")
        decision = Decision(
            measured_step=int(measured_step), effective_step=int(effective_step), sigma_measured=sigma_measured,
            sigma=sigma, probes=len(values), protected_psnr=protected, margin_db=margin, sigma_required=required,
            predicted_psnr=protected - 20.0 * math.log10(sigma / sigma_measured), floor=floor, limited_by=reason,
            applied=bool(apply and enough),
        )
        self.decisions.append(decision)
        return decision

    def enforce_floor(self, effective_step: int, floor: float) -> Decision | None:
        """Raise σ to ``floor`` from ``effective_step`` on when the σ in force is below it (the ε cap before the
        first measurement); ``None`` when nothing changes."""
        current = self.sigma_at(effective_step)
        if current >= floor:
            return None
        decision = Decision(measured_step=-1, effective_step=int(effective_step), sigma_measured=current,
                            sigma=float(floor), floor=float(floor), limited_by="epsilon_cap")
        self.decisions.append(decision)
        return decision

    def measured(self) -> list[Decision]:
        """The decisions that read a measurement (one per monitor evaluation consumed)."""
        return [d for d in self.decisions if d.measured_step >= 0]

    def fraction_meeting(self, tolerance_db: float = 1.0) -> float:
        """Share of the measurements whose protected PSNR was ≤ target + ``tolerance_db``."""
        measured = self.measured()
        return sum(d.meets(self.target_psnr, tolerance_db) for d in measured) / len(measured) if measured else math.nan

    # -- checkpointing and description ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base, "decisions": [asdict(d) for d in self.decisions]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("base") is not None:
            self.base = float(state["base"])
        self.decisions = [Decision(**d) for d in state.get("decisions", [])]

    def describe(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "decisions"}
        out["decisions"] = len(self.decisions)
        return out


def check_leakage_target_options(options: Mapping[str, Any]) -> None:
    """One-line :class:`ConfigError` for an impossible ``leakage_target`` option (also used torch-free by
    :mod:`pl_i2f.validation`, which passes the plain config mapping)."""

    def number(key: str, low: float, *, strict: bool = True, optional: bool = False) -> float | None:
        value = options.get(key)
        if key not in options or (value is None and optional):
            return None
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (value <= low if strict else value < low):
            bound = f"{'>' if strict else '>='} {low:g}"
            raise ConfigError(f"noise_schedule.{key} must be a finite number {bound}"
                              f"{' (or null)' if optional else ''}, got {value!r}")
        return float(value)

    number("target_psnr", 0.0)
    protect = options.get("protect", "quantile")
    if protect not in PROTECT:
        raise unknown_name("noise_schedule.protect", str(protect), PROTECT)
    q = number("quantile", 0.0, strict=False)
    if q is not None and q > 1:
        raise ConfigError(f"noise_schedule.quantile must be in [0, 1], got {q}")
    for key, low in (("worst_k", 1), ("min_probes", 2), ("memory", 1)):
        value = options.get(key, low)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"noise_schedule.{key} must be an integer >= {low}, got {value!r}")
    lo = number("sigma_min", 0.0, optional=True)
    hi = number("sigma_max", 0.0, optional=True)
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"noise_schedule.sigma_min={lo} is above noise_schedule.sigma_max={hi}")
    number("initial_sigma", 0.0, optional=True)
    number("max_increase", 1.0, strict=False, optional=True)
    number("max_decrease", 1.0, strict=False)
    number("max_extrapolation", 1.0, strict=False)
    number("z", 0.0, strict=False)
    number("extra_margin_db", 0.0, strict=False)
    if "monitor_every_n_steps" in options and options["monitor_every_n_steps"] is not None:
        value = options["monitor_every_n_steps"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"noise_schedule.monitor_every_n_steps must be an integer >= 1 or null, got {value!r}")
    if not isinstance(options.get("extrapolate", True), bool):
        raise ConfigError(f"noise_schedule.extrapolate must be true or false, got {options['extrapolate']!r}")
    number("target_epsilon", 0.0, optional=True)
    number("monitor_max_overhead", 0.0, optional=True)


__all__ = [
    "Decision",
    "LeakageTargetSchedule",
    "check_leakage_target_options",
    "epsilon_after",
    "epsilon_floor",
    "margin_db",
    "next_sigma",
    "probe_psnr",
    "protected_psnr",
    "required_sigma",
    "target_pixel_rmse",
]
