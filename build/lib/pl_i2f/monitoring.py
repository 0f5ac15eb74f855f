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
from dataclasses import asdict, dataclass, replace
from typing import Any


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
