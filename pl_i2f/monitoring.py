"""When the leakage monitor evaluates, and how big an evaluation a run can afford (pure; no Lightning).

Objects the :class:`callbacks.I2FMonitor` callback drives, unit-tested without a Trainer:

* :class:`DenseEarlySchedule` — step 0, then geometrically spaced steps (leakage changes fastest early in
  training), then every ``every_n_steps`` steps, and always the run's final step.
* :class:`ProductCost` — what one batched per-sample JJᵀ product costs, ``seconds ≈ a + b·vectors``, fitted on
  products actually run (an evaluation is a sequence of such products, so its cost is counted in products
  and priced with this fit). The fixed part ``a`` dominates small models (vmap and autograd overhead), the
  per-vector part ``b`` large ones; both are measured, so neither is guessed.
* :class:`EvaluationPlan` — the products of one evaluation: a fresh Lanczos run (``steps`` products of
  ``probes`` vectors), a warm-started one (two block products of ``probes × steps`` vectors), and optionally
  the exact spectra of a few probes.
* :class:`OverheadBudget` — ``max_overhead`` × this fit's training time, the training time *measured*
  (seconds per optimizer step so far × the fit's steps). The budget left is shared out over the evaluations
  still scheduled; an evaluation that does not fit its share is *reduced* (no exact spectra, fewer probes,
  fewer Lanczos steps — :meth:`OverheadBudget.plan`), and skipped only when even the smallest plan cannot fit
  what is left. Training seconds and product seconds are measured on the same machine at nearly the same
  time, so machine load scales both and cancels in the decision.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
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


class ProductCost:
    """Seconds of one batched JJᵀ product as ``a + b·vectors``, least squares over the products observed
    (``observe(calls, vectors, seconds)`` for a run of ``calls`` products with ``vectors`` in all). With a
    single product size observed the fixed part cannot be separated: ``b`` is then seconds/vectors (a = 0),
    which over-predicts larger products of an overhead-bound model — the safe side."""

    def __init__(self, window: int = 16):
        self.window = window
        self.observations: list[tuple[float, float, float]] = []  # (calls, vectors, seconds)

    @property
    def known(self) -> bool:
        return bool(self.observations)

    def observe(self, calls: float, vectors: float, seconds: float) -> None:
        if calls > 0 and vectors > 0 and seconds >= 0:
            self.observations = [*self.observations, (float(calls), float(vectors), float(seconds))][-self.window:]

    def coefficients(self) -> tuple[float, float]:
        """(a, b): seconds per product and per vector, both >= 0."""
        if not self.observations:
            raise ValueError("no product observed yet")
        obs = self.observations
        sizes = {round(v / c, 6) for c, v, _ in obs}
        if len(sizes) == 1:
            return 0.0, sum(s for *_, s in obs) / sum(v for _, v, _ in obs)
        # minimise Σ (a·c + b·v − s)² with a, b >= 0 (2×2 normal equations, clipped)
        scc = sum(c * c for c, _, _ in obs)
        svv = sum(v * v for _, v, _ in obs)
        scv = sum(c * v for c, v, _ in obs)
        scs = sum(c * s for c, _, s in obs)
        svs = sum(v * s for _, v, s in obs)
        det = scc * svv - scv * scv
        a = (scs * svv - svs * scv) / det if det > 0 else 0.0
        b = (svs * scc - scs * scv) / det if det > 0 else 0.0
        if a < 0:
            a, b = 0.0, svs / svv
        elif b < 0:
            a, b = scs / scc, 0.0
        return a, b

    def predict(self, calls: float, vectors: float) -> float:
        a, b = self.coefficients()
        return a * calls + b * vectors

    def price(self, plan: EvaluationPlan) -> float:
        """Seconds of ``plan``'s products."""
        return self.predict(*plan.products())

    def state_dict(self) -> dict[str, Any]:
        return {"observations": [list(o) for o in self.observations]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.observations = [tuple(o) for o in state.get("observations", [])]  # type: ignore[misc]


@dataclass(frozen=True)
class EvaluationPlan:
    """One evaluation: ``probes`` samples, a Lanczos basis of ``steps`` vectors each — built fresh
    (``steps`` sequential products of ``probes`` vectors) or ``warm`` from the previous evaluation's basis
    (two block products of ``probes × steps`` vectors) — and the exact spectra of ``spectra`` probes
    (``spectrum_products`` products of ``spectrum_vectors`` vectors in all, given by the caller)."""

    probes: int
    steps: int
    warm: bool = False
    spectra: int = 0
    spectrum_products: int = 0
    spectrum_vectors: int = 0

    def products(self) -> tuple[int, int]:
        """(products, vectors) of the plan."""
        calls, vectors = (2, 2 * self.probes * self.steps) if self.warm else (self.steps, self.probes * self.steps)
        if self.spectra:
            calls, vectors = calls + self.spectrum_products, vectors + self.spectrum_vectors
        return calls, vectors

    def reduced_from(self, full: EvaluationPlan) -> str:
        """What this plan leaves out against ``full``, in words ('' when nothing)."""
        parts = []
        if self.probes < full.probes:
            parts.append(f"{self.probes} of {full.probes} probes")
        if self.steps < full.steps:
            parts.append(f"a {self.steps}-vector Lanczos basis instead of {full.steps}")
        if full.spectra and not self.spectra:
            parts.append("no exact spectra")
        return ", ".join(parts)


def reductions(full: EvaluationPlan, min_steps: int = 4, keep_probes: int = 1) -> list[EvaluationPlan]:
    """The plans an evaluation may shrink to, largest first. With ``keep_probes`` = 1: without the exact
    spectra, then the probes halved down to one, then the Lanczos basis halved down to ``min_steps`` vectors
    (lower precision). With ``keep_probes`` > 1 (the monitor's 8): the probes halved down to ``keep_probes``
    with the exact spectra kept (λ_min and the condition number come only from the first and last evaluation),
    then without them, then the basis halved down to 4 vectors at that many probes (several samples at lower
    precision tell more about the mean than one sample at high precision), then the probes halved down to
    one, then the basis down to ``min_steps``. A warm plan stays warm while it has several probes (its basis
    truncated to the first probes and rows: the leading rows of a Krylov basis are the smaller Krylov basis);
    one probe starts afresh (through the plain autograd operator, where sequential Lanczos steps cost what a
    block of them does)."""
    plans = [full]

    def shrunk(base: EvaluationPlan, probes: int, steps: int) -> EvaluationPlan:
        return replace(base, probes=probes, steps=steps, warm=base.warm and probes > 1,
                       spectra=min(base.spectra, probes))

    probes, steps = full.probes, full.steps
    keep = max(1, min(keep_probes, probes))
    if keep > 1:
        while probes > keep:
            probes = max(keep, probes // 2)
            plans.append(shrunk(full, probes, steps))
    base = replace(full, spectra=0)
    if full.spectra:
        plans.append(shrunk(base, probes, steps))
    while keep > 1 and steps > max(min_steps, 4):
        steps = max(min_steps, 4, steps // 2)
        plans.append(shrunk(base, probes, steps))
    while probes > 1:
        probes = max(1, probes // 2)
        plans.append(shrunk(base, probes, steps))
    while steps > min_steps:
        steps = max(min_steps, steps // 2)
        plans.append(shrunk(base, 1, steps))
    return plans


class PlanCost:
    """What a plan costs on the two paths an evaluation takes, each fitted on its own products:

    * ``batched`` — several probes through the vmapped per-sample operator (``seconds ≈ a·products +
      b·vectors``; overhead-bound on small models, so a block of vectors costs little more than one);
    * ``single`` — one probe through the plain autograd operator: one recorded graph per evaluation, then
      sequential Lanczos steps (``seconds ≈ a·evaluations + b·steps``; 2.5–4× cheaper a product than vmap);
    * ``spectra`` — seconds per probe of an exact spectrum (its Jacobian, :func:`pl_i2f.influence.warm.exact_spectra`);
      until one is measured, priced as ``spectrum_vectors`` batched vectors.

    A path not measured yet is priced ``inf`` (never planned blind). ``logging``: an evaluation's logging,
    added to every plan."""

    PATHS = ("batched", "single", "spectra", "logging")

    def __init__(self) -> None:
        self.batched = ProductCost()
        self.single = ProductCost()
        self.spectra = ProductCost()
        self.logging = ProductCost()  # seconds of an evaluation's logging (scalars, W&B histogram), per evaluation

    @property
    def known(self) -> bool:
        return self.batched.known or self.single.known

    @staticmethod
    def is_single(plan: EvaluationPlan) -> bool:
        return plan.probes == 1 and not plan.warm

    def price(self, plan: EvaluationPlan) -> float:
        core = replace(plan, spectra=0)
        if self.is_single(plan):
            seconds = self.single.predict(1, plan.steps) if self.single.known else math.inf
        else:
            seconds = self.batched.price(core) if self.batched.known else math.inf
        if plan.spectra:
            if self.spectra.known:
                seconds += self.spectra.predict(1, plan.spectra)
            elif self.batched.known:
                seconds += self.batched.predict(plan.spectrum_products, plan.spectrum_vectors)
            else:
                seconds = math.inf
        return seconds + (self.logging.predict(0, 1) if self.logging.known else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name).state_dict() for name in self.PATHS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "observations" in state:  # a checkpoint from before the paths were priced apart: the vmapped path
            state = {"batched": state}
        for name in self.PATHS:
            getattr(self, name).load_state_dict(state.get(name, {}))


class OverheadBudget:
    """The monitor's share of a fit's time, from measured seconds.

    ``record_training(steps, seconds)``: optimizer steps done in this fit and the training seconds they took
    (wall time minus the monitor's own). ``charge(seconds)``: the monitor's own time (evaluations, timing,
    snapshots). The budget is ``max_overhead`` × seconds-per-step × ``total_steps``; ``share(step)`` what is
    left over the evaluations still scheduled. ``due(step)`` is the schedule; ``affordable(cost, step)``
    whether a cost fits; ``plan(step, full, cost)`` the largest :func:`reductions` plan that fits (``None``:
    skip). ``max_overhead=None``: no limit.
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

    def record_training(self, steps: int, seconds: float) -> None:
        self.train_steps, self.train_seconds = max(0, int(steps)), max(0.0, float(seconds))

    def charge(self, seconds: float) -> None:
        self.spent += max(0.0, float(seconds))

    def due(self, step: int) -> bool:
        return self.schedule.due(step, self.total_steps)

    @property
    def unlimited(self) -> bool:
        return self.max_overhead is None

    def training_estimate(self) -> float | None:
        """This fit's training seconds: measured seconds per step × its steps (None before any step)."""
        if self.train_steps <= 0:
            return None
        total = self.train_steps if self.total_steps is None else max(self.total_steps, self.train_steps)
        return self.train_seconds / self.train_steps * total

    def total(self) -> float:
        """Seconds the monitor may spend in this fit (inf without a limit, 0 before any training step)."""
        if self.max_overhead is None:
            return math.inf
        estimate = self.training_estimate()
        return 0.0 if estimate is None else self.max_overhead * estimate

    def left(self) -> float:
        return self.total() - self.spent

    def share(self, step: int) -> float:
        """The evaluation at ``step``'s share: what is left over the evaluations still scheduled."""
        if self.total_steps is None:
            return self.left()
        return self.left() / max(1, self.schedule.remaining(step, self.total_steps))

    def affordable(self, cost: float, step: int, final: bool = False) -> bool:
        """Whether ``cost`` seconds fit the evaluation at ``step`` (the final one may use all that is left)."""
        if self.unlimited:
            return True
        return cost <= (self.left() if final else self.share(step))

    def plan(self, step: int, full: EvaluationPlan, cost: ProductCost | PlanCost, final: bool = False,
             min_steps: int = 4, later_steps: int | None = None, keep_probes: int = 1,
             reserve: float = 0.0) -> EvaluationPlan | None:
        """The largest :func:`reductions` plan whose cost, plus the warm-started evaluations still scheduled
        after it at the same size (a basis of ``later_steps`` vectors when given), fits what is left — a fresh
        first evaluation is an investment that makes the later ones cheap, so it is planned with them; else
        the smallest plan if it fits with only the final evaluation reserved (reduced rather than skipped);
        else ``None`` (skip). ``reserve``: seconds held back for something later (the final evaluation's exact
        spectra), given up before the smallest plan is."""
        if self.unlimited:
            return full
        later = 0 if final or self.total_steps is None else self.schedule.remaining(step, self.total_steps) - 1
        plans = reductions(full, min_steps, keep_probes)
        for plan in plans:
            if cost.price(plan) + self._later_cost(plan, cost, later_steps) * later + reserve <= self.left():
                return plan
        smallest = plans[-1]
        reserve = 0.0 if final else self._later_cost(smallest, cost, None)
        return smallest if cost.price(smallest) + reserve <= self.left() else None

    @staticmethod
    def _later_cost(plan: EvaluationPlan, cost: ProductCost | PlanCost, later_steps: int | None) -> float:
        """What one later evaluation at ``plan``'s size costs: warm-started (two block products of a basis of
        ``later_steps`` vectors) or fresh, whichever is cheaper — warm wins on overhead-bound models (lenet_zhu
        on CPU), fresh on compute-bound ones (resnet18 on CPU, where two blocks of k vectors cost 2k)."""
        if isinstance(cost, PlanCost) and plan.probes == 1:  # one probe always starts afresh (see reductions)
            return cost.price(replace(plan, warm=False, spectra=0))
        warm_steps = plan.steps if later_steps is None else max(plan.steps, later_steps)
        warm = cost.price(replace(plan, warm=True, spectra=0, steps=warm_steps))
        fresh = cost.price(replace(plan, warm=False, spectra=0))
        return min(warm, fresh)

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": asdict(self.schedule)}


MONITOR_METHODS = ("lanczos", "slq", "exact")
INTEGER_MINIMA = {"lanczos_steps": 2, "exact_spectrum_probes": 0, "worst_k": 0, "warmup_steps": 1, "noise_draws": 1}


@dataclass
class MonitorSettings:
    """The leakage monitor's settings (:class:`callbacks.I2FMonitor`'s keyword arguments), checked on
    construction: a one-line ConfigError names a bad one."""

    every_n_steps: int = 100
    first_step: int = 10
    growth: float = 2.0
    probe_size: int | None = None  # None: the datamodule's probe batch
    damping: float = 0.0
    relative_damping: float = 0.01
    log_per_sample_media: bool = True
    method: str = "lanczos"
    lanczos_steps: int = 16
    exact_spectrum_probes: int = 2
    worst_k: int = 5
    max_overhead: float | None = 0.1  # the monitor's time as a fraction of the training time; None: no limit
    warmup_steps: int = 3
    noise_draws: int = 32
    target_pixel_rmse: float = 0.1  # = pl_i2f.leakage.DEFAULT_TARGET_PIXEL_RMSE (≈ 20 dB PSNR)
    clipping_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        who = "I2FMonitor"
        try:
            OverheadBudget(self.max_overhead, self.schedule())
        except ValueError as exc:
            raise ConfigError(f"{who}: {exc}") from exc
        for name in ("damping", "relative_damping"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{who}.{name} must be a finite number >= 0, got {value}")
        if self.method not in MONITOR_METHODS:
            raise ConfigError(f"{who}.method must be one of {', '.join(MONITOR_METHODS)}, got {self.method!r}")
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


# The planner's numbers, each with its reason.
MIN_LANCZOS_STEPS = 2  # the last resort before skipping: one probe, a 2-vector basis (λ_max and a rough trace)
KEEP_PROBES = 8  # shrink the basis (down to 4 vectors) before evaluating fewer probes than this
FRESH_BASIS_DIVISOR = 2  # a fresh basis starts at half the full size; warm starts double it up to the full size
CALIBRATION_CHAINS = (1, 4)  # vectors per probe of the products that price the vmapped path: two sizes separate
#                              its fixed and per-vector parts (an overhead-bound model: 4 vectors ≈ 1.3× one)
CALIBRATION_PROBES = KEEP_PROBES  # those products run on the probe count the vmapped evaluations use
VMAP_PRODUCT_RATIO = 4  # a vmapped product costs up to this many plain products per vector (measured: lenet_zhu
#                         less, resnet18 on CPU 2.5×), so pricing from one plain product stays on the safe side
CALIBRATION_SHARE = 4  # a timing product may take at most this fraction (1/4) of the budget left


@dataclass(frozen=True)
class Decision:
    """What the planner decided for one evaluation: ``plan`` to run (``None``: skip), or ``keep_first`` — the
    single-probe evaluation that priced the products is this evaluation; ``full`` the plan asked for."""

    plan: EvaluationPlan | None
    full: EvaluationPlan
    keep_first: bool = False


class EvaluationPlanner:
    """How big each of the monitor's evaluations may be, from the schedule, the measured costs and the training
    time — pure: time comes from the injected ``clock`` (seconds), products' seconds from the caller's
    ``observe``; no Trainer, no model.

    Per fit: :meth:`start_fit` (the fit's first step and total steps), :meth:`record_training` at each
    training step (the training seconds are the clock's minus the monitor's own, :meth:`charge`). Per
    evaluation: :meth:`full_plan` (what an unlimited run would do), then — while nothing is priced —
    :meth:`first_stop` bounds a single-probe evaluation that is its own price, and :meth:`calibration_due`
    says which vmapped products to time; :meth:`decide` returns the :class:`Decision`. The budget is a
    ceiling: every plan is priced before it runs, the smallest final evaluation stays reserved until the
    final step, and the final evaluation always runs (at the smallest size when nothing larger fits).
    ``training_seconds`` and ``spent_seconds`` sum over every fit of the run (a resumed run's share is over
    its whole training time)."""

    def __init__(self, max_overhead: float | None, schedule: DenseEarlySchedule, *, lanczos_steps: int = 16,
                 exact_spectrum_probes: int = 2, clock: Callable[[], float] = time.perf_counter):
        self.max_overhead = max_overhead
        self.schedule = schedule
        self.lanczos_steps = lanczos_steps
        self.exact_spectrum_probes = exact_spectrum_probes
        self.clock = clock
        self.cost = PlanCost()
        self.budget = OverheadBudget(max_overhead, schedule)
        self.earlier_training = 0.0  # training seconds of the run's earlier fits (restored from a checkpoint)
        self.earlier_spent = 0.0
        self._started = 0.0
        self._start_step = 0
        self._rate_origin: tuple[float, float] | None = None
        self.cheap = False  # the single-probe pricing found the vmapped path cheap enough to price

    # -- the fit's training time --------------------------------------------------------------------------
    def start_fit(self, step: int, total_steps: int | None) -> None:
        """A fit begins at ``step`` and ends at ``total_steps`` (None: unknown): a fresh budget for it."""
        self.budget = OverheadBudget(self.max_overhead, self.schedule, total_steps)
        self._started, self._start_step, self._rate_origin = self.clock(), step, None

    def record_training(self, step: int) -> None:
        """Training reached ``step``: seconds per step from the end of the fit's first step on (its one-off
        costs — the first batch's loading and allocations — would inflate the rate and with it the budget)."""
        steps, now = step - self._start_step, self.clock()
        if steps >= 1 and self._rate_origin is None:
            self._rate_origin = (now, self.budget.spent)
        if steps < 2 or self._rate_origin is None:
            self.budget.record_training(steps, now - self._started - self.budget.spent)
        else:
            origin, spent = self._rate_origin
            self.budget.record_training(steps - 1, now - origin - (self.budget.spent - spent))

    def charge(self, seconds: float) -> None:
        self.budget.charge(seconds)

    def steps_done(self, step: int) -> int:
        return step - self._start_step

    @property
    def training_seconds(self) -> float:
        """Training seconds of the whole run so far (earlier fits and this one)."""
        return self.earlier_training + self.budget.train_seconds

    @property
    def spent_seconds(self) -> float:
        return self.earlier_spent + self.budget.spent

    # -- plans --------------------------------------------------------------------------------------------
    @property
    def needs_pricing(self) -> bool:
        return not self.budget.unlimited and not self.cost.known

    def full_plan(self, probes: int, stored: tuple[int, int] | None, *, spectra_possible: bool, first: bool,
                  final: bool, spectrum_cost: Callable[[int], tuple[int, int]] | None = None) -> EvaluationPlan:
        """Every one of ``probes`` probes, starting with a fresh basis of half ``lanczos_steps`` vectors (it grows
        to the full size over the next warm-started evaluations) — or, once a basis exists (``stored``: its
        probes and vectors), the probes it covers (a reduced first evaluation fixes the subset: the same samples
        every time keep the curve comparable and warm). One probe always starts afresh (the plain autograd
        operator: sequential steps cost what a block does). Exact spectra at the first and the final evaluation
        (``spectrum_cost(count)``: their (products, vectors))."""
        warm = stored is not None and stored[0] > 1
        probes = probes if stored is None else stored[0]
        steps = stored[1] if warm else max(MIN_LANCZOS_STEPS, self.lanczos_steps // FRESH_BASIS_DIVISOR)
        spectra = self.exact_spectrum_probes if (final or first) and spectra_possible else 0
        spectra = min(spectra, probes)
        calls, vectors = spectrum_cost(spectra) if spectra and spectrum_cost is not None else (0, 0)
        return EvaluationPlan(probes=probes, steps=steps, warm=warm, spectra=spectra, spectrum_products=calls,
                              spectrum_vectors=vectors)

    def allowance(self, step: int, final: bool) -> float:
        """Seconds this evaluation may take: its share of what is left (all of it for the final one)."""
        return self.budget.left() if final else self.budget.share(step)

    def batched_worth_pricing(self, single_step: float) -> bool:
        """Whether the vmapped path is cheap enough to price: ``CALIBRATION_PROBES`` probes' product, at up to
        ``VMAP_PRODUCT_RATIO`` plain products per vector, within 1/``CALIBRATION_SHARE`` of the budget left."""
        return VMAP_PRODUCT_RATIO * CALIBRATION_PROBES * single_step <= self.budget.left() / CALIBRATION_SHARE

    def first_stop(self, step: int, final: bool) -> tuple[Callable[[int, float, float], bool], list[float]]:
        """The stop rule of the single-probe evaluation that prices the products (``(steps, seconds so far,
        seconds of the last step) → stop``): before a step that would end past the evaluation's allowance, or
        as soon as the model looks cheap enough for several probes (then it is evaluated on them). Returns the
        rule and the list of step seconds it sees."""
        allowance, seen = self.allowance(step, final), []

        def stop(steps: int, elapsed: float, last: float) -> bool:
            seen.append(last)
            return elapsed + last > allowance or self.batched_worth_pricing(last)

        return stop, seen

    def calibration_due(self, probes: int, chains: int) -> bool:
        """Whether to time a vmapped product of ``probes`` × ``chains`` vectors: priced within
        1/``CALIBRATION_SHARE`` of what is left (a first one always, once the path is worth pricing)."""
        batched = self.cost.batched
        return not (batched.known and batched.predict(1, probes * chains) > self.budget.left() / CALIBRATION_SHARE)

    def spectra_reserve(self, final: bool, final_plan: EvaluationPlan) -> float:
        """Seconds held back for the final evaluation's exact spectra (``final_plan``'s: λ_min and the condition
        number at the end of training), priced like any plan's; nothing at the final evaluation."""
        if final or final_plan.spectra == 0 or self.budget.unlimited:
            return 0.0
        probe = replace(final_plan, probes=1, steps=1, warm=False)
        extra = self.cost.price(probe) - self.cost.price(replace(probe, spectra=0))
        return extra if math.isfinite(extra) else 0.0

    def decide(self, step: int, full: EvaluationPlan, *, final: bool, probes: int, stored_probes: int | None,
               first: EvaluationPlan | None, first_fit: bool, reserve: float = 0.0) -> Decision:
        """The evaluation at ``step``: the largest plan that fits what is left with the evaluations still to come
        (:meth:`OverheadBudget.plan`); a wider fresh start when an earlier evaluation fixed fewer than
        ``KEEP_PROBES`` of the ``probes`` probes and more now fit; the single-probe pricing run (``first``,
        ``first_fit``: it ended within the budget) kept when nothing larger is worth its price; at the final
        step the smallest plan when nothing fits (never skipped)."""
        if self.budget.unlimited:
            return Decision(full, full)
        options = dict(final=final, min_steps=MIN_LANCZOS_STEPS, keep_probes=KEEP_PROBES, reserve=reserve)
        plan = self.budget.plan(step, full, self.cost, **options)
        if stored_probes is not None and stored_probes < min(KEEP_PROBES, probes):
            more = replace(full, probes=probes, steps=max(MIN_LANCZOS_STEPS, self.lanczos_steps // FRESH_BASIS_DIVISOR),
                           warm=False)
            upgrade = self.budget.plan(step, more, self.cost, **options)
            if upgrade is not None and upgrade.probes > (0 if plan is None else plan.probes):
                plan, full = upgrade, more
        kept = first is not None and first_fit  # done work is not thrown away
        if kept and plan is not None and PlanCost.is_single(plan) and plan.steps > first.steps:
            kept = not self.cheap  # stopped early only because more probes looked affordable: a longer run fits
        if kept and (plan is None or (PlanCost.is_single(plan) and not plan.spectra)):
            return Decision(first, full, keep_first=True)
        if plan is None and final:
            plan = reductions(full, MIN_LANCZOS_STEPS, KEEP_PROBES)[-1]  # the final weights are always evaluated
        return Decision(plan, full)

    def allowance_stop(self, step: int, final: bool) -> Callable[[int, float, float], bool]:
        """The stop rule of a single-probe fresh basis: before a step that would end past the allowance."""
        allowance = self.allowance(step, final)
        return lambda steps, elapsed, last: elapsed + last > allowance

    def observe(self, plan: EvaluationPlan, products: tuple[int, int], warm: bool, seconds: float,
                spectra_seconds: float) -> EvaluationPlan:
        """Price the products an evaluation of ``plan`` really ran (``products``: (calls, vectors) of its basis,
        ``seconds`` in all, ``spectra_seconds`` of them on exact spectra); returns the plan really run (a budgeted
        fresh basis may have stopped early)."""
        ran = plan if warm else replace(plan, steps=products[0])
        core = seconds - spectra_seconds
        if PlanCost.is_single(ran):
            self.cost.single.observe(1, products[0], core)
        else:
            self.cost.batched.observe(*products, core)
        if plan.spectra and spectra_seconds > 0:
            self.cost.spectra.observe(1, plan.spectra, spectra_seconds)
        return ran

    def skip_message(self, step: int, full: EvaluationPlan) -> str:
        smallest = self.cost.price(replace(full, probes=1, steps=MIN_LANCZOS_STEPS, warm=False, spectra=0))
        return (f"skipped the evaluation of step {step}: even one probe with a {MIN_LANCZOS_STEPS}-vector Lanczos "
                f"basis is predicted at {smallest:.2f}s, which with the final evaluation's reserved does not fit "
                f"the {max(self.budget.left(), 0):.2f}s left of max_overhead={self.max_overhead:g} × "
                f"{self.budget.training_estimate() or 0:.1f}s of training. Raise max_overhead (null: no limit), "
                "train longer, or use a GPU.")

    def summary(self, evaluations: int, steps: int, seconds: float, reduced: int, skipped: int,
                last_step: int | None) -> str:
        """The end-of-fit line: evaluations, the monitor's seconds and their share of the whole run's training
        time (earlier fits of a resumed run included), and the step the last leakage was measured at."""
        training = self.training_seconds
        share = f" ({seconds / training:.1%} of {training:.1f}s training)" if training > 0 else ""
        limit = f" to stay within {self.max_overhead:.0%} overhead" if self.max_overhead is not None else ""
        measured = f"; leakage last measured at step {last_step}" if last_step is not None else ""
        return (f"{evaluations} evaluations at {steps} steps in {seconds:.1f}s{share}; {reduced} reduced, "
                f"{skipped} skipped{limit}{measured}")

    def state_dict(self) -> dict[str, Any]:
        return {"cost": self.cost.state_dict(), "training_seconds": self.training_seconds,
                "spent_seconds": self.spent_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cost.load_state_dict(state.get("cost", {}))
        self.earlier_training = float(state.get("training_seconds", 0.0))
        self.earlier_spent = float(state.get("spent_seconds", 0.0))
