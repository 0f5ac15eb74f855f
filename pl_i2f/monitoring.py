"""When the leakage monitor evaluates, and on how many probes a run can afford (pure; no Lightning).

Objects the :class:`callbacks.I2FMonitor` callback drives, unit-tested without a Trainer:

* :class:`DenseEarlySchedule` — step 0, then geometrically spaced steps (leakage changes fastest early in
  training), then every ``every_n_steps`` steps, and always the run's final step.
* :class:`ProductCost` (:mod:`pl_i2f.monitor_cost`) — what an evaluation of p probes costs, ``seconds ≈ a + b·p``,
  fitted on evaluations actually run (the calibrated estimate forms each probe's explicit Jacobian: a fixed part
  per call, a part per probe; both measured, neither guessed).
* :class:`OverheadBudget` — ``max_overhead`` × this fit's training time, the training time *measured*
  (seconds per optimizer step so far × the fit's steps); everything the caller spends is charged to it.
* :class:`Plan` — how one evaluation runs: its probes and route, exact Grams or a rank-r Nyström sketch from one
  block product (priced apart: :meth:`EvaluationPlanner.plan` sketches the middle evaluations where exact
  Grams for ``AIM_PROBES`` probes do not fit).
* :class:`EvaluationPlanner` — how many probes each evaluation covers: the most whose cost, with every
  evaluation still scheduled at that size, fits what is left of the budget (the budget is spent evenly, not
  hoarded); fewer only where all cannot fit (the callback then rotates through the probes); the final
  evaluation always runs. Training seconds and evaluation seconds are measured on the same machine at nearly
  the same time, so machine load scales both and cancels in the decision.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pl_i2f.monitor_cost import PRICE_DECAY, ProductCost, _weighted_line  # noqa: F401  (re-exported)
from pl_i2f.monitor_settings import (  # noqa: F401  (re-exported: the monitor's settings and schedule)
    INTEGER_MINIMA,
    RETIRED_SETTINGS,
    DenseEarlySchedule,
    MonitorSettings,
    OverheadBudget,
)

NO_SKETCH_FOR_NOISE = "no sketch for this noise (a covariance, or none)"
NO_SKETCH_FOR_CHAIN = "a sketch costs more on this network"

SPEND_FRACTION = 0.95  # of the budget planned: the training time is a projection, and a price a fit
FINAL_RESERVE = 0.02  # of the budget kept back at the final evaluation: the training time is known by then
# ... and at least this share of the final's least evaluation (one probe and its tables): in a budget of tens of ms
# (the DP-SGD recipe's 15 steps) an evaluation's price and its media writes vary by more than FINAL_RESERVE
FINAL_PRICE_SHARE = 0.25
# of the reserve a middle evaluation may plan with to reach AIM_PROBES (exact Grams); before the fit's first epoch has
# ended, all of it, for the final's keep-back too: the training time projected then lacks every epoch's end
# (validation, checkpoints: 5-9% of the default run's training time)
AIM_RESERVE_SHARE = 0.5
AIM_PROBES = 8  # an evaluation's aim: per-sample leakage varies widely across samples, so fewer is a noisy figure
SKETCH_RANKS = (32, 16, 8)  # the middle evaluations' Nyström ranks, the largest that fits first
SKETCH_RESIDUAL = 8  # Hutchinson vectors per probe for the sketch's residual (its stated bounds)
SECOND_PRICE_SHARE = 0.25  # of the budget left, at most, for pricing a second evaluation size (wants_second_price)


@dataclass(frozen=True)
class Plan:
    """How an evaluation runs: ``count`` probes (0: skipped) by the calibrated estimate's ``route`` — "exact"
    (explicit per-probe Jacobians) or "sketch" (a rank-``rank`` Nyström sketch per probe from one block product,
    ``residual`` vectors for its bounds); ``note`` says why a sketch was not taken where one was wanted."""

    count: int
    route: str | None = "exact"  # None: the estimator's own choice (exact up to its exact_max_dim, a sketch beyond)
    rank: int = 0  # a sketch's rank (route None: 0 is the estimator's own, NYSTROM_RANK)
    residual: int = 0
    note: str = ""
    what_if: bool = True  # the clipped spectrum for DP-SGD's noise multiplier (the ends' and unlimited runs' only)

    def estimator_options(self) -> dict[str, Any]:
        """Keyword arguments of :class:`pl_i2f.leakage.Calibrated` for this plan. Without ``what_if``, and always in
        a sketch, no clipped spectrum for the noise multiplier of a run that does not clip (a sketch of it is off by
        up to 2× and costs a quarter of the evaluation; exactly, it is a second eigendecomposition per probe, about
        a tenth of an evaluation): the first and final evaluations report it, and a run without a budget."""
        if self.route == "sketch":
            return {"route": "sketch", "rank": self.rank, "probes": self.residual, "clip_for_target": False}
        ranked = {"rank": self.rank, "probes": self.residual} if self.route is None and self.rank else {}
        return {"route": self.route, "clip_for_target": self.what_if, **ranked}

    def describe(self) -> str:
        if self.route == "sketch" or (self.route is None and self.rank):
            return f"rank-{self.rank} Nyström sketch"
        return ("exact Grams" if self.route == "exact" else "calibrated estimate") + (
            f"; {self.note}" if self.note else "")


@dataclass(frozen=True)
class Coverage:
    """Which probes an evaluation measures: ``count`` of the ``total``, starting at ``start`` and wrapping
    around (all of them when ``count == total``)."""

    start: int
    count: int
    total: int

    def indices(self) -> list[int]:
        return [(self.start + i) % self.total for i in range(self.count)]

    def describe(self) -> str:
        if self.count >= self.total:
            return f"all {self.total} probes"
        last = (self.start + self.count - 1) % self.total
        return f"{self.count} of {self.total} probes (#{self.start}–#{last}, rotating)"


class EvaluationPlanner:
    """How many probes each of the monitor's evaluations covers, from the schedule, the measured costs and the
    training time — pure: time comes from the injected ``clock`` (seconds), an evaluation's seconds from the
    caller's :meth:`observe`; no Trainer, no model.

    Per fit: :meth:`start_fit` (the fit's first step and total steps), :meth:`record_training` at each
    training step (the training seconds are the clock's minus the monitor's own, :meth:`charge`). Per
    evaluation: :meth:`probes_for` — while no evaluation is priced, one probe (the first evaluation prices
    itself); then the most probes p with price(p) × (evaluations still scheduled) within what is left, so the
    whole budget is spent evenly; at the final step at least one probe (never skipped). Where not even one
    probe per evaluation fits, evaluations are spread evenly over those still scheduled and the others skipped
    (0), the final one's kept back; each that runs covers the most probes that keep as many affordable (one where
    the cost is per probe, many where it is mostly fixed). ``training_seconds`` and
    ``spent_seconds`` sum over every fit of the run (a resumed run's share is over its whole training time)."""

    def __init__(self, max_overhead: float | None, schedule: DenseEarlySchedule, *,
                 clock: Callable[[], float] = time.perf_counter):
        self.max_overhead = max_overhead
        self.schedule = schedule
        self.clock = clock
        self.cost = ProductCost()
        self.budget = OverheadBudget(max_overhead, schedule)
        self.earlier_training = 0.0  # training seconds of the run's earlier fits (restored from a checkpoint)
        self.earlier_spent = 0.0
        self._started = 0.0
        self._start_step = 0
        self._rate_origin: tuple[float, float] | None = None
        self._credit = 0.0  # share of single-probe evaluations earned but not yet run (see probes_for)
        self.sketch_cost = ProductCost()  # a sketch's seconds over its probe-vectors (probes × (rank + residual))
        self.final_logging = 0.0  # seconds the final evaluation's logging will take (the caller's estimate)
        self.overhead = 0.0  # seconds an evaluation takes beside its estimate (planning, logging): the latest seen
        self.epoch_ended = False  # whether this fit has ended an epoch (its projection then holds the epoch's end)

    # -- the fit's training time --------------------------------------------------------------------------
    def start_fit(self, step: int, total_steps: int | None) -> None:
        """A fit begins at ``step`` and ends at ``total_steps`` (None: unknown): a fresh budget for it."""
        self.budget = OverheadBudget(self.max_overhead, self.schedule, total_steps)
        self._started, self._start_step, self._rate_origin = self.clock(), step, None
        self.epoch_ended = False

    def record_training(self, step: int) -> None:
        """Training reached ``step``: seconds per step from the end of the fit's first step on; the first step's
        own seconds (its one-off costs — the first batch's loading, allocations, a defense's first refresh) count
        once as training time, not as a rate that would inflate the budget of every later step."""
        steps, now = step - self._start_step, self.clock()
        if steps >= 1 and self._rate_origin is None:
            self._rate_origin = (now, self.budget.spent)
        if steps < 2 or self._rate_origin is None:
            self.budget.record_training(steps, now - self._started - self.budget.spent)
        else:
            origin, spent = self._rate_origin
            self.budget.record_training(steps - 1, now - origin - (self.budget.spent - spent),
                                        one_off_seconds=origin - self._started - spent, one_off_steps=1)

    def charge(self, seconds: float) -> None:
        self.budget.charge(seconds)

    def note_epoch_end(self) -> None:
        """The fit ended an epoch: the training time projected from here on holds its validation and checkpoints."""
        self.epoch_ended = True

    def note_overhead(self, seconds: float) -> None:
        """An evaluation took ``seconds`` beside its estimate (its planning, logging, console line): every later
        evaluation is priced with as much on top (:meth:`price`)."""
        self.overhead = max(0.0, float(seconds))

    def steps_done(self, step: int) -> int:
        return step - self._start_step

    @property
    def training_seconds(self) -> float:
        """Training seconds of the whole run so far (earlier fits and this one)."""
        return self.earlier_training + self.budget.measured_seconds

    @property
    def spent_seconds(self) -> float:
        return self.earlier_spent + self.budget.spent

    # -- probes per evaluation ----------------------------------------------------------------------------
    @property
    def needs_pricing(self) -> bool:
        return not self.budget.unlimited and not self.cost.known

    def wants_second_price(self) -> bool:
        """After the first price (one probe): whether to price two probes too, separating an evaluation's fixed
        part from its part per probe — with one size seen the fit charges everything per probe, which keeps a
        call-overhead-bound evaluation (a small model on a GPU) at one probe for good. Only where two probes cost
        at most ``SECOND_PRICE_SHARE`` of what is left of the budget."""
        sizes = {round(v / c, 6) for c, v, _ in self.cost.observations}
        return (not self.budget.unlimited and len(sizes) == 1 and
                2 * self.price(1) <= SECOND_PRICE_SHARE * max(self._left(), 0.0))

    def price(self, probes: int) -> float:
        """Predicted seconds of an exact evaluation of ``probes`` probes, its logging included."""
        return self.cost.predict(1, probes) + self.overhead if self.cost.known else math.inf

    def probes_for(self, step: int, probes: int, *, final: bool) -> int:
        """Probes the evaluation at ``step`` covers (0: skip), of ``probes``."""
        if self.budget.unlimited:
            return probes
        if not self.cost.known:
            return 1  # the first evaluation prices itself on one probe
        evaluations = 1 if final else self.budget.remaining(step)
        pool = self._left(final)  # the middle evaluations' own; all of them with the final's part of it counted in:
        left = pool if final else pool + self._final_release()
        for count in range(probes, 0, -1):
            if self.price(count) * evaluations <= left and self.price(count) * (evaluations - 1) <= pool:
                return count
        if final:
            return 1  # the final weights are always evaluated
        if not self._spread(left, evaluations, self.price(1)):
            return 0
        # a spread evaluation may cost what leaves as many of them affordable: more probes where an evaluation's
        # cost is mostly fixed (a small model on a GPU), one where it is mostly per probe
        allowance = left / max(1, math.floor(left / self.price(1)))
        return next(c for c in range(probes, 0, -1) if c == 1 or self.price(c) <= allowance)

    def _spread(self, left: float, evaluations: int, unit: float) -> bool:
        """Not even one smallest evaluation (``unit`` seconds) each: such evaluations spread evenly over those still
        scheduled (a credit of the affordable share per evaluation), one kept back for the final step."""
        affordable = left / unit - 1
        self._credit += min(1.0, max(affordable, 0.0) / max(1, evaluations - 1))
        if self._credit >= 1 - 1e-9 and affordable >= 1:
            self._credit -= 1
            return True
        return False

    def sketch_price(self, probes: int, rank: int, dim: int) -> float:
        """Predicted seconds of a rank-``rank`` sketch of ``probes`` probes of ``dim`` input values. Before any
        sketch is priced: the exact price of as many probes as its products make up (an explicit Jacobian is
        ``dim`` products of the same network), so the first sketch is planned from a measured price too."""
        vectors = probes * (rank + SKETCH_RESIDUAL)
        if self.sketch_cost.known:
            return self.sketch_cost.predict(1, vectors) + self.overhead
        return self.price(max(1, math.ceil(vectors / max(dim, 1))))

    def _left(self, final: bool = False) -> float:
        """Seconds to plan with: the budget left but for a reserve against a projected training time and fitted
        prices (``SPEND_FRACTION``). At the final evaluation the training time is measured, not projected, and no
        later price can be off: only its reserve is kept (:meth:`_final_reserve`), and the final's logging
        (``final_logging``)."""
        if final:
            return self.budget.left() - self._final_reserve() - self._tables()
        return self.budget.left() - (1 - SPEND_FRACTION) * self.budget.total()

    def _final_reserve(self) -> float:
        """What the final evaluation keeps back: ``FINAL_RESERVE`` of the budget, or ``FINAL_PRICE_SHARE`` of its least
        evaluation where more (a small budget: a few milliseconds of jitter are a share of it)."""
        least = self.price(1) + self._tables() if self.cost.known else 0.0
        return max(FINAL_RESERVE * self.budget.total(), FINAL_PRICE_SHARE * least)

    def _tables(self) -> float:
        """What the final evaluation's logging takes beyond an evaluation's usual overhead (already in its price)."""
        return max(0.0, self.final_logging - self.overhead)

    def _final_release(self) -> float:
        """What the final evaluation will have beyond :meth:`_left` of now: the reserve it no longer needs (it keeps
        its own, :meth:`_final_reserve`), less its logging. The middle evaluations keep back the final's probes from
        both."""
        if self.budget.total_steps is None:
            return 0.0
        return (1 - SPEND_FRACTION) * self.budget.total() - self._final_reserve() - self._tables()

    def plan(self, step: int, probes: int, *, final: bool, first: bool = False, dim: int = 0,
             sketch: bool = False, no_sketch: str = NO_SKETCH_FOR_NOISE) -> Plan:
        """How the evaluation at ``step`` runs, of ``probes`` probes with ``dim`` input values each (0: the route is
        not the planner's to choose — the estimator's own, inputs beyond its exact range sketched anyway). Without
        ``sketch`` (the noise or the caller does not allow one), and always for the first and final evaluations:
        exact, :meth:`probes_for`, the first and final evaluations up to ``AIM_PROBES`` where every middle one keeps a
        probe (:meth:`_ends_first`). With it, a middle evaluation: exact on the most probes that fit every
        evaluation still scheduled (with the final's exact probes kept back: up to ``AIM_PROBES``, as many as the
        least sketch of every middle one leaves, and a probe of slack where that fits) where that is ``AIM_PROBES``
        or more, else the sketch on the most
        probes (then the largest rank) that fits them all where that covers more probes than exact Grams would,
        else exact; the first sketch prices itself (``AIM_PROBES`` at the smallest rank, where that fits
        once); where not even a one-probe sketch fits every one, the cheaper of one exact probe and an
        ``AIM_PROBES`` sketch, spread evenly (the others skipped). Priorities: no skips, then the ends, then
        ``AIM_PROBES`` everywhere, then more probes, then a larger rank. ``no_sketch``: why there is no sketch
        (the note of a middle evaluation below ``AIM_PROBES``)."""
        if self.budget.unlimited or not self.cost.known or final or first or not sketch or dim < 1:
            count = self.probes_for(step, probes, final=final)
            if not (self.budget.unlimited or not self.cost.known or final):
                count = self._ends_first(step, probes, count, first)
            fallback = not (sketch or final or self.needs_pricing or self.budget.unlimited) and dim > 0
            fallback = fallback and count < min(AIM_PROBES, probes)
            what_if = self.budget.unlimited or not self.cost.known or final or first
            if dim < 1:  # inputs beyond the exact range, every evaluation sketched (see route_plan)
                return self.route_plan(count, None, what_if=what_if)
            return Plan(count, "exact", note=no_sketch if fallback else "", what_if=what_if)
        aim, evaluations, left = min(AIM_PROBES, probes), self.budget.remaining(step), self._left()
        least = self.sketch_price(1, SKETCH_RANKS[-1], dim)  # the least sketch a middle evaluation can be
        middle = max(evaluations - 1, 1)  # this one and the others before the final
        room, end, slack = left + self._final_release(), 0, 0.0
        if self.budget.total_steps is not None:  # the final's exact probes kept back: up to the aim, after the least
            spare = room - middle * least  # sketch of every middle one
            end = next((c for c in range(aim, 1, -1) if self.price(c) <= spare), 1)
            room -= self.price(end)
            slack = self.price(end + 1) - self.price(end)  # a probe more where it fits: later costs may drift up

        # exact on the most probes that fit every middle evaluation (in their own pool, never the final's reserve),
        # the final on at least as many as this one
        def fitting(extra: float) -> int:
            return next((c for c in range(probes, 0, -1) if self.price(c) * middle <= left
                         and self.price(c) * middle + self.price(max(c, end)) - self.price(end) + extra <= room), 0)

        plain, kept = fitting(0.0), fitting(slack)  # the route is chosen on the plain count, the slack kept if it fits
        exact = max(kept, aim) if plain >= aim else (kept or plain)
        if plain >= aim:
            return Plan(exact, what_if=False)
        if not self.sketch_cost.known and self.sketch_price(aim, SKETCH_RANKS[-1], dim) <= room:
            return Plan(aim, "sketch", SKETCH_RANKS[-1], SKETCH_RESIDUAL)  # the first sketch prices itself
        for count in range(probes, plain, -1):  # a sketch only where it covers more probes than exact Grams
            for rank in SKETCH_RANKS:
                if self.sketch_price(count, rank, dim) * middle <= room:
                    return Plan(count, "sketch", rank, SKETCH_RESIDUAL)
        if plain:
            return Plan(exact, what_if=False)
        # not even a one-probe sketch each: the cheaper of one exact probe and a sketch of the aim, spread evenly
        one, least = self.price(1), self.sketch_price(aim, SKETCH_RANKS[-1], dim)
        if not self._spread(left, evaluations, min(one, least)):
            return Plan(0)
        return Plan(1, what_if=False) if one <= least else Plan(aim, "sketch", SKETCH_RANKS[-1], SKETCH_RESIDUAL)

    def route_plan(self, count: int, route: str | None, *, what_if: bool = True) -> Plan:
        """The plan of an evaluation by a ``route`` the planner does not choose (the first evaluation's price, or
        inputs beyond the exact range: ``route`` None). Under a budget, inputs beyond the exact range are
        sketched at the smallest rank (``SKETCH_RANKS[-1]``, its stated bounds logged): the estimator's own rank
        (``NYSTROM_RANK``) costs several times as much (a ResNet-18 probe on a CPU: ≈ 22 s against ≈ 4), every
        evaluation at one rank keeps their prices comparable; without a budget, the estimator's own."""
        if route is None and not self.budget.unlimited:
            return Plan(count, None, SKETCH_RANKS[-1], SKETCH_RESIDUAL, what_if=what_if)
        return Plan(count, route, what_if=what_if)

    def _ends_first(self, step: int, probes: int, even: int, first: bool) -> int:
        """Exact evaluations only: the first and final evaluations get up to ``AIM_PROBES`` probes (their spectra
        and the run's summary come from them) where every other evaluation still keeps one probe; ``even`` (the
        even share, :meth:`probes_for`) otherwise and wherever it is larger. A middle evaluation keeps back the
        final's share (from what the final will have, :meth:`_final_release`) and, where that still fits, one probe
        more (evaluations late in a run may cost more than the fit predicts): the most probes whose price over the
        middle ones still scheduled leaves it; ``AIM_PROBES`` where the middle ones' own pool falls short of it by no
        more than ``AIM_RESERVE_SHARE`` of the reserve and the final's share still fits; before the fit's first epoch
        has ended (:attr:`epoch_ended`), where both fit with the whole reserve: the training time projected then lacks
        the epoch-end work (validation, checkpoints), which the later projections hold."""
        evaluations, left = self.budget.remaining(step), self._left() + self._final_release()
        if self.budget.total_steps is None or evaluations < 2:
            return even
        aim, ends = min(AIM_PROBES, probes), 2 if first else 1
        end = next((c for c in range(aim, 0, -1)
                    if ends * self.price(c) + (evaluations - ends) * self.price(1) <= left), 0)
        if first:
            return max(even, end)
        pool = self._left()  # the middle evaluations spend their own pool, never the final's reserve

        def fits(count: int, pool: float, slack: int, final_extra: float = 0.0) -> bool:
            spent = self.price(count) * (evaluations - 1)
            return spent <= pool and spent + self.price(max(count, end) + slack) <= left + final_extra

        # a probe of slack for the final (against cost drift: it keeps its own reserve unspent), dropped only where
        # nothing fits with it; the aim from part of the reserve (a projection early in a run misses epoch-end work)
        # where the final's share still fits: the ends come first — before the first epoch's end, from all of it
        count = next((c for c in range(probes, 0, -1) if fits(c, pool, 1)), 0)
        reserve = (1 - SPEND_FRACTION) * self.budget.total()
        if count < aim and (fits(aim, pool + AIM_RESERVE_SHARE * reserve, 1) or
                            (not self.epoch_ended and fits(aim, pool + reserve, 0, reserve))):
            return aim
        return count or next((c for c in range(probes, 0, -1) if fits(c, pool, 0)), 0) or even

    def observe(self, probes: int, seconds: float, plan: Plan | None = None) -> None:
        """An evaluation of ``probes`` probes (by ``plan``'s route; default exact) took ``seconds`` (its estimate,
        not its logging)."""
        if plan is not None and plan.route == "sketch":
            self.sketch_cost.observe(1, probes * (plan.rank + plan.residual), seconds)
        else:
            self.cost.observe(1, probes, seconds)

    def skip_message(self, step: int) -> str:
        one, left = self.price(1), max(self.budget.left(), 0.0)
        return (f"skipped the evaluation of step {step}: one probe is predicted at {one:.2f}s, and the {left:.2f}s "
                f"left of max_overhead={self.max_overhead:g} × {self.budget.training_estimate() or 0:.1f}s of training "
                f"cover about {max(int(left / one) - 1, 0) if one > 0 else 0} of the "
                f"{max(self.budget.remaining(step) - 1, 0)} evaluations still scheduled before the final one, spread "
                "evenly (later skips are counted, not repeated). Raise max_overhead (null: no limit), train longer, "
                "or use a GPU.")

    def summary(self, evaluations: int, steps: int, seconds: float, reduced: int, skipped: int,
                last_step: int | None) -> str:
        """The end-of-fit line: evaluations, the monitor's seconds and their share of the whole run's training
        time (earlier fits of a resumed run included), and the step the last leakage was measured at."""
        training = self.training_seconds
        share = f" ({seconds / training:.1%} of {training:.1f}s training)" if training > 0 else ""
        limit = f" to stay within {self.max_overhead:.0%} overhead" if self.max_overhead is not None else ""
        measured = f"; leakage last measured at step {last_step}" if last_step is not None else ""
        return (f"{evaluations} evaluations at {steps} steps in {seconds:.1f}s{share}; {reduced} reduced, {skipped} "
                f"skipped{limit}{measured}")

    def state_dict(self) -> dict[str, Any]:
        return {"cost": self.cost.state_dict(), "sketch_cost": self.sketch_cost.state_dict(),
                "training_seconds": self.training_seconds, "spent_seconds": self.spent_seconds,
                "final_logging": self.final_logging, "overhead": self.overhead}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cost = state.get("cost", {})
        self.cost.load_state_dict(cost if "observations" in cost else {})
        self.sketch_cost.load_state_dict(state.get("sketch_cost", {}))
        self.earlier_training = float(state.get("training_seconds", 0.0))
        self.earlier_spent = float(state.get("spent_seconds", 0.0))
        self.final_logging = float(state.get("final_logging", 0.0))
        self.overhead = float(state.get("overhead", 0.0))
