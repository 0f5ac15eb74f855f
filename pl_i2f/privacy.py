"""Privacy accounting in one place: ε of a (σ, q, steps) history, calibrating σ₀ to a target ε, the autopilot's
ε-cap floor, and DP-SGD's guarantee in reconstruction terms.

**ε.** Every ε of the project comes from a fresh Opacus accountant (RDP or PRV) replaying a *history* of
``(noise_multiplier, sample_rate, steps)`` segments (:func:`epsilon_of_history`), the form Opacus' accountants keep
in ``accountant.history``: a run's logged ε, the ε a noise schedule will spend (:func:`calibrate_noise_multiplier`)
and the ε a run will have spent if σ is held from now on (:func:`epsilon_after`, :func:`epsilon_floor`). Opacus is
imported inside the functions, so importing this module stays torch-free (config validation reads it).

**Reconstruction bound.**
Hayes, Mahloujifar & Balle (2023, "Bounding training data reconstruction in DP-SGD") show that for a
mechanism whose privacy is described by a trade-off function f, any reconstruction attack whose success
probability without seeing the model is κ (the *baseline*: e.g. 1/n for a target drawn uniformly from n
candidates) succeeds with probability at most 1 − f(κ). For μ-Gaussian DP, f(α) = Φ(Φ⁻¹(1 − α) − μ), so

    P[reconstruction succeeds] ≤ Φ(Φ⁻¹(κ) + μ).

The μ of a DP-SGD run comes from the central-limit view of Bu et al. (2020), which Opacus implements for
one constant (σ, q) segment (``opacus.accountants.analysis.gdp``); a run with a noise schedule is a sequence
of segments, and μ-GDP composes as μ = √(Σ μ_seg²). The CLT view is an approximation that is accurate for
many steps at small sampling rates and can underestimate the privacy cost for few steps (Opacus warns
about this too); ε from the RDP/PRV accountant remains the rigorous guarantee, and the bound is reported
beside it, not instead of it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from scipy.stats import norm

from pl_i2f.errors import ConfigError

#: Default baseline κ: an attacker who must single out the right one of 100 equally likely candidates.
DEFAULT_RECONSTRUCTION_BASELINE = 0.01


def smallest_sigma(fits: Callable[[float], bool], rtol: float = 1e-4, ceiling: float = 1e6) -> float:
    """The smallest noise level σ (to ``rtol``, rounded up) with ``fits(σ)``, for a ``fits`` that holds from some
    σ on (ε falls as σ grows): doubling from 1, then bisection keeping the fitting end. ``inf`` when not even
    ``ceiling`` fits. Serves DP-SGD's calibration of σ₀ to a target ε and the autopilot's ε-cap floor."""
    low, high = 0.0, 1.0
    while not fits(high):
        low, high = high, 2.0 * high
        if high > ceiling:
            return math.inf
    while high - low > rtol * high:
        mid = (low + high) / 2.0
        if fits(mid):
            high = mid
        else:
            low = mid
    return high


History = Sequence[tuple[float, float, int]]  #: ``(noise_multiplier, sample_rate, steps)`` segments, as Opacus keeps


class _Schedule(Protocol):
    """What calibration reads of a noise schedule (:class:`pl_i2f.defenses.schedules.NoiseSchedule`)."""

    name: str

    def factor(self, step: int) -> float: ...


def epsilon_of_history(history: History, delta: float, accountant: str = "rdp") -> float:
    """ε at ``delta`` that a fresh Opacus accountant (``rdp`` or ``prv``) computes for ``history``; 0 when empty."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta))


def schedule_history(base: float, factors: Iterable[float], sample_rate: float) -> list[tuple[float, float, int]]:
    """The history Opacus' accountant records for steps at σ_t = ``base`` · f(t): equal consecutive σ merge into
    one segment, as ``accountant.step`` merges them."""
    return [(sigma, sample_rate, len(list(run))) for sigma, run in itertools.groupby(base * f for f in factors)]


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               schedule: _Schedule, accountant: str) -> float:
    """σ₀ such that the schedule σ_t = σ₀ f(t) over ``steps`` steps spends ``target_epsilon`` (Opacus'
    ``get_noise_multiplier`` for a constant schedule, else a bisection over the accountant replaying it)."""
    def unreachable() -> ConfigError:
        return ConfigError(f"defense.target_epsilon={target_epsilon} is unreachable with delta={delta}, sample rate "
                           f"{sample_rate:.4g} and {steps} steps (it would need a noise multiplier above 1e6)")

    if schedule.name == "constant":
        from opacus.accountants.utils import get_noise_multiplier

        try:
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=accountant))
        except ValueError:
            raise unreachable() from None

    factors = [schedule.factor(t) for t in range(steps)]
    base = smallest_sigma(lambda sigma: epsilon_of_history(schedule_history(sigma, factors, sample_rate), delta,
                                                           accountant) <= target_epsilon)
    if math.isinf(base):
        raise unreachable()
    return base


def epsilon_after(history: History, sigma: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "rdp") -> float:
    """ε at ``delta`` of an Opacus accountant ``history`` followed by ``steps`` steps at ``sigma`` — a fresh Opacus
    accountant, so it is the number the run will log."""
    history = [tuple(h) for h in history]
    if steps > 0:
        history.append((float(sigma), float(sample_rate), int(steps)))
    return epsilon_of_history(history, delta, accountant)


def epsilon_floor(history: History, sample_rate: float, remaining_steps: int, target_epsilon: float, delta: float,
                  accountant: str = "rdp", rtol: float = 1e-4) -> float:
    """The smallest σ (to ``rtol``, rounded up) such that ``history`` plus ``remaining_steps`` steps at σ spends at
    most ``target_epsilon`` (the autopilot's ε cap); 0 when nothing remains, ``inf`` when the history alone
    exceeds it."""
    if remaining_steps <= 0:
        return 0.0
    if history and epsilon_of_history(history, delta, accountant) > target_epsilon:
        return math.inf

    def fits(sigma: float) -> bool:
        return epsilon_after(history, sigma, sample_rate, remaining_steps, delta, accountant) <= target_epsilon

    return smallest_sigma(fits, rtol=rtol)


def check_baseline(baseline: float) -> float:
    """``baseline`` (κ) as a float in (0, 1), or a one-line :class:`ConfigError`."""
    if not (isinstance(baseline, int | float) and 0.0 < float(baseline) < 1.0):
        raise ConfigError(f"reconstruction baseline κ must be a probability in (0, 1), got {baseline!r}")
    return float(baseline)


def _segment_mu(noise_multiplier: float, sample_rate: float, steps: int, poisson: bool) -> float:
    if steps <= 0 or sample_rate <= 0:
        return 0.0
    if noise_multiplier <= 0 or 1.0 / noise_multiplier**2 > 700:  # exp overflows: no privacy left
        return math.inf
    from opacus.accountants.analysis.gdp import compute_mu_poisson, compute_mu_uniform

    compute = compute_mu_poisson if poisson else compute_mu_uniform
    return float(compute(steps=steps, noise_multiplier=noise_multiplier, sample_rate=sample_rate))


def gdp_mu(history: Iterable[tuple[float, float, int]], poisson: bool = True) -> float:
    """μ of the whole run under the CLT view, from Opacus' accountant history.

    ``history`` holds ``(noise_multiplier, sample_rate, steps)`` segments (``accountant.history`` of Opacus'
    RDP, PRV and GDP accountants has exactly this form); segments compose as μ = √(Σ μ_seg²).
    """
    total = 0.0
    for noise_multiplier, sample_rate, steps in history:
        mu = _segment_mu(float(noise_multiplier), float(sample_rate), int(steps), poisson)
        if math.isinf(mu):
            return math.inf
        total += mu * mu
    return math.sqrt(total)


def reconstruction_bound(mu: float, baseline: float = DEFAULT_RECONSTRUCTION_BASELINE) -> float:
    """Upper bound Φ(Φ⁻¹(κ) + μ) on the success probability of any reconstruction attack under μ-GDP.

    ``baseline`` is κ, the attack's success probability without access to the model. μ = 0 gives κ (the
    model reveals nothing), μ → ∞ gives 1.
    """
    kappa = check_baseline(baseline)
    if not mu >= 0:
        raise ValueError(f"μ must be non-negative, got {mu}")
    if math.isinf(mu):
        return 1.0
    return float(norm.cdf(norm.ppf(kappa) + mu))


def reconstruction_bound_from_history(history: Iterable[tuple[float, float, int]],
                                      baseline: float = DEFAULT_RECONSTRUCTION_BASELINE,
                                      poisson: bool = True) -> float:
    """:func:`reconstruction_bound` for the μ of an Opacus accountant ``history`` (see :func:`gdp_mu`)."""
    return reconstruction_bound(gdp_mu(history, poisson), baseline)


__all__ = [
    "DEFAULT_RECONSTRUCTION_BASELINE",
    "calibrate_noise_multiplier",
    "check_baseline",
    "epsilon_after",
    "epsilon_floor",
    "epsilon_of_history",
    "gdp_mu",
    "reconstruction_bound",
    "reconstruction_bound_from_history",
    "schedule_history",
    "smallest_sigma",
]


DEFAULT_DELTA = 1e-5  # Opacus' examples' δ for ε when neither the callback nor the module names one


def find_privacy_engine(pl_module: Any, explicit: Any = None) -> Any | None:
    """``explicit`` when given, else the module's ``privacy_engine`` attribute (Opacus' Lightning example keeps
    it there); ``None`` when there is none."""
    if explicit is not None:
        return explicit
    try:
        from opacus import PrivacyEngine
    except ImportError:
        return None
    engine = getattr(pl_module, "privacy_engine", None)
    return engine if isinstance(engine, PrivacyEngine) else None


def opacus_epsilon(engine: Any, delta: float) -> float | None:
    """ε spent so far by ``engine``'s accountant at ``delta`` (``None`` before the first step)."""
    if engine is None or len(getattr(engine.accountant, "history", [None])) == 0:
        return None
    value = float(engine.get_epsilon(delta))
    return value if math.isfinite(value) else None
