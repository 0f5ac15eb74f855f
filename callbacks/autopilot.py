"""LeakageAutopilot: after each leakage-monitor evaluation, set the defense's σ for the steps ahead."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from pl_i2f.autopilot import Decision, LeakageTargetSchedule, epsilon_floor
from pl_i2f.errors import ConfigError

from ._logging import log_scalars_at_step
from .leakage import I2FMonitor

#: Why the σ in force differs from ``autopilot/sigma_required``: ``autopilot/limited_by/<key>``.
WHY_SIGMA_DIFFERS = {
    "rate": "the rate limit (noise_schedule.max_increase / max_decrease per evaluation)",
    "sigma_min": "the lower bound noise_schedule.sigma_min",
    "sigma_max": "the upper bound noise_schedule.sigma_max",
    "epsilon_cap": "the ε cap (noise_schedule.target_epsilon) needs at least this σ",
    "too_few_probes": "too few probes to act on (noise_schedule.min_probes): σ held",
    "recorded_only": "the final evaluation: recorded, nothing left to apply it to",
    "planned": "held above this requirement by recent ones (noise_schedule.memory) or the upward trend "
               "(noise_schedule.extrapolate)",
}
TARGET_TOLERANCE_DB = 1.0  # as fraction_meeting_target: within 1 dB of the target counts as met


def why_sigma_differs(decision: Decision) -> str:
    """The :data:`WHY_SIGMA_DIFFERS` key for a decision whose σ is not its ``sigma_required`` ("" when equal)."""
    if decision.limited_by:
        return decision.limited_by
    if not decision.applied and decision.measured_step >= 0:
        return "recorded_only"
    if math.isfinite(decision.sigma_required) and not math.isclose(decision.sigma, decision.sigma_required,
                                                                     rel_tol=1e-9):
        return "planned"
    return ""


def calibrated(report: Any) -> dict[str, Any]:
    """The calibrated estimate's PSNR of every probe as a function of the noise scale (monotone; σ_required is
    solved on it) and the scale it was measured at — nothing for a report without one."""
    posterior = getattr(report, "posterior", None)
    if posterior is None:
        return {}

    def psnr_at(scale: float) -> list[float]:
        rmse = (posterior.error(scale) / posterior.dim).clamp_min(1e-300).sqrt()
        return (-20 * torch.log10(rmse)).tolist()

    return {"psnr_at": psnr_at, "scale": float(posterior.scale)}


class LeakageAutopilot(Callback):
    """Drive ``noise_schedule=leakage_target``: read the :class:`I2FMonitor`'s latest report, let the
    schedule (:class:`pl_i2f.autopilot.LeakageTargetSchedule`) decide σ, log. Inactive (a no-op) for every
    other noise schedule, so it sits in the default callbacks.

    **When.** In ``on_before_optimizer_step`` of step t — after the monitor's ``on_train_batch_start`` of the
    same step, whatever the callback order, and before the module hands σ_t to the defense — a report newer
    than the last one consumed sets σ from step t on; σ is held until the next report. The monitor's final
    evaluation (after the last step) is recorded and logged, not applied.

    **Logs.** At the measured step: ``leakage/protected_attack_psnr`` (the protected probes' expected attack
    PSNR under the σ in force then). At the step σ changes: ``autopilot/sigma`` (the σ now in force),
    ``autopilot/sigma_required`` (before limits), ``autopilot/margin_db``, ``autopilot/predicted_protected_psnr``
    (at the new σ), ``autopilot/target_met`` (1 when the measured protected PSNR was within target + 1 dB),
    ``autopilot/limited`` (1 when a bound, the rate limit or the ε cap moved σ off the required value) and
    ``autopilot/limited_by/<why>`` (1 for the reason σ differs from ``sigma_required``, 0 for the others; the
    reasons: :data:`WHY_SIGMA_DIFFERS`), and under an ε cap ``autopilot/epsilon_floor``. ``defense/sigma`` (the
    module's, every step) shows σ over training. At the end: ``autopilot/fraction_meeting_target`` (within 1 dB)
    and a console line saying whether the last measurement met the target and why σ differs from the required one.

    **Monitor.** The controller needs every probe: it sets the monitor's ``max_overhead`` to the schedule's
    ``monitor_max_overhead`` (default ``null``: no limit, so evaluations are never reduced to fewer probes) for
    this run only, and ignores (holds σ, logs ``autopilot/too_few_probes``) any report on fewer than
    ``min_probes`` probes.

    **DDP.** The monitor measures on rank 0 only, so rank 0 decides and broadcasts (through the strategy) the
    decision, and whether the ε cap stops training, at every optimizer step; every rank appends the same
    decision to its schedule and applies the same σ from the same step, so the replicas stay identical and each
    rank's accountant — counting the global batch once — holds the same history. A resumed run reloads the
    decisions from the checkpoint on every rank.

    **ε cap** (DP-SGD, ``noise_schedule.target_epsilon``): every applied σ is at least the smallest constant σ
    that keeps the run's final ε within the cap if held to the end (:func:`pl_i2f.autopilot.epsilon_floor`, from
    the Opacus accountant's recorded history), and so is σ before the first measurement. The cap therefore holds
    by induction; if the history alone already exceeds it (a cap below what was spent before resuming), training
    stops.
    """

    def __init__(self) -> None:
        super().__init__()
        self._monitor: I2FMonitor | None = None
        self._warned_probes = False

    # -- small named predicates -----------------------------------------------------------------------
    @staticmethod
    def schedule_of(pl_module: pl.LightningModule) -> LeakageTargetSchedule | None:
        schedule = getattr(getattr(pl_module, "defense", None), "schedule", None)
        return schedule if isinstance(schedule, LeakageTargetSchedule) else None

    def _new_report(self, schedule: LeakageTargetSchedule) -> Any:
        report = self._monitor.last_report if self._monitor is not None else None
        return report if report is not None and report.step > schedule.last_measured_step else None

    # -- hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        schedule = self.schedule_of(pl_module)
        if schedule is None or stage != "fit":
            return
        monitors = [c for c in trainer.callbacks if isinstance(c, I2FMonitor)]
        if not monitors:
            raise ConfigError("noise_schedule=leakage_target needs the leakage monitor (callbacks.i2f_monitor): it "
                              "measures the leakage the autopilot sets σ from")
        if schedule.target_epsilon is not None and getattr(pl_module.defense, "name", "") != "dpsgd":
            raise ConfigError("noise_schedule.target_epsilon caps DP-SGD's ε; it needs defense=dpsgd")
        self._monitor = monitors[0]
        every = schedule.monitor_every_n_steps
        if every is not None and every != self._monitor.every_n_steps:
            # denser evaluations: σ is re-planned at each one (the monitor's checkpoint key keeps its own value)
            self._monitor.schedule = replace(self._monitor.schedule, every_n_steps=every)
            rank_zero_info(f"LeakageAutopilot: the leakage monitor evaluates every {every} steps for this run")
        if self._monitor.max_overhead != schedule.monitor_max_overhead:
            self._monitor.max_overhead = schedule.monitor_max_overhead  # read by the monitor's on_train_start
            rank_zero_info(f"LeakageAutopilot: the leakage monitor's max_overhead set to "
                           f"{schedule.monitor_max_overhead} for this run (the controller needs every probe)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedule = self.schedule_of(pl_module)
        if schedule is None:
            return

        def decide() -> Decision | None:
            floor = self._epsilon_floor(trainer, pl_module, schedule, trainer.global_step)
            return schedule.enforce_floor(trainer.global_step, floor) if floor is not None else None

        decision = self._decided_on_rank_zero(trainer, schedule, decide)
        if decision is not None:
            self._log_decision(trainer, decision, schedule)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        schedule = self.schedule_of(pl_module)
        if schedule is None:
            return
        step = trainer.global_step

        def decide() -> Decision | None:
            report = self._new_report(schedule)
            if report is None:
                return None
            floor = self._epsilon_floor(trainer, pl_module, schedule, step)
            return schedule.observe(report.step, step, report.pixel_rmse.detach().double().cpu().tolist(),
                                    floor=floor, apply=not trainer.should_stop,
                                    next_evaluation=self._next_evaluation(step, pl_module), **calibrated(report))

        decision = self._decided_on_rank_zero(trainer, schedule, decide)
        if decision is None:
            return
        self._log_decision(trainer, decision, schedule)
        if decision.limited_by == "too_few_probes" and not self._warned_probes:
            self._warned_probes = True
            rank_zero_warn(f"LeakageAutopilot: the monitor evaluated {decision.probes} probes, fewer than "
                           f"noise_schedule.min_probes={schedule.min_probes}; σ is held at {decision.sigma:.4g} "
                           "(raise data.probe_size or lower min_probes)")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        schedule = self.schedule_of(pl_module)
        if schedule is None:
            return

        def decide() -> Decision | None:
            report = self._new_report(schedule)
            if report is None:
                return None
            # the final weights' evaluation: recorded, nothing left to apply it to
            return schedule.observe(report.step, trainer.global_step,
                                    report.pixel_rmse.detach().double().cpu().tolist(), apply=False)

        decision = self._decided_on_rank_zero(trainer, schedule, decide)
        if decision is not None:
            self._log_decision(trainer, decision, schedule)
        fraction = schedule.fraction_meeting(1.0)
        if math.isfinite(fraction):
            log_scalars_at_step(trainer, {"fraction_meeting_target": fraction}, "autopilot")
            rank_zero_info(f"LeakageAutopilot: {len(schedule.measured())} evaluations, {fraction:.0%} with the "
                           f"protected probes within target+1 dB ({schedule.target_psnr:g} dB); final σ "
                           f"{schedule.sigma_at(trainer.global_step):.4g}")
        last = schedule.measured()[-1] if schedule.measured() else None
        if last is not None:
            met = last.meets(schedule.target_psnr, TARGET_TOLERANCE_DB)
            why = why_sigma_differs(last)
            rank_zero_info(
                f"LeakageAutopilot: last measurement (step {last.measured_step}): protected PSNR "
                f"{last.protected_psnr:.1f} dB, target {schedule.target_psnr:g} dB "
                f"{'met' if met else 'NOT met'}; σ {last.sigma:.4g} vs required {last.sigma_required:.4g}"
                + (f" ({WHY_SIGMA_DIFFERS[why]})" if why else ""))

    # -- helpers --------------------------------------------------------------------------------------
    @staticmethod
    def _decided_on_rank_zero(trainer: pl.Trainer, schedule: LeakageTargetSchedule,
                              decide: Callable[[], Decision | None]) -> Decision | None:
        """``decide()`` (which records its decision in the schedule) on rank 0, the same decision recorded on
        every other rank, and rank 0's ``should_stop`` (the ε cap) on all of them. A collective under DDP:
        every rank calls it at the same hook of the same step."""
        if trainer.world_size == 1:
            return decide()
        decision = decide() if trainer.is_global_zero else None
        payload = trainer.strategy.broadcast(
            {"decision": asdict(decision) if decision is not None else None, "stop": trainer.should_stop}, src=0)
        if not trainer.is_global_zero:
            trainer.should_stop = trainer.should_stop or payload["stop"]
            if payload["decision"] is not None:
                decision = Decision(**payload["decision"])
                schedule.decisions.append(decision)
        return decision

    def _next_evaluation(self, step: int, pl_module: pl.LightningModule) -> int | None:
        """The monitor's next evaluation step after ``step`` (the run's last step at the latest)."""
        total = getattr(pl_module.defense, "total_steps", None)
        if total is None or step >= total:
            return None
        return next((s for s in self._monitor.schedule.steps(total) if s > step), total)

    def _epsilon_floor(self, trainer: pl.Trainer, pl_module: pl.LightningModule, schedule: LeakageTargetSchedule,
                       step: int) -> float | None:
        """The ε cap's σ floor from ``step`` to the end (``None`` without a cap)."""
        if schedule.target_epsilon is None:
            return None
        defense = pl_module.defense
        total = defense.total_steps
        if total is None or defense.sample_rate is None:
            raise ConfigError("noise_schedule.target_epsilon needs a run of known length (trainer.max_epochs or "
                              "max_steps) under defense=dpsgd")
        history = list(defense.engine.accountant.history)
        floor = epsilon_floor(history, defense.sample_rate, total - step, schedule.target_epsilon, defense.delta,
                              defense.accountant)
        if math.isinf(floor):
            rank_zero_warn(f"LeakageAutopilot: ε already spent exceeds noise_schedule.target_epsilon="
                           f"{schedule.target_epsilon}; stopping training")
            trainer.should_stop = True
            return None
        return floor

    @staticmethod
    def _log_decision(trainer: pl.Trainer, decision: Decision, schedule: LeakageTargetSchedule) -> None:
        if decision.measured_step >= 0:
            log_scalars_at_step(trainer, {"protected_attack_psnr": decision.protected_psnr}, "leakage",
                                step=decision.measured_step)
        scalars = {"sigma": decision.sigma}
        if decision.measured_step >= 0:
            scalars.update(sigma_required=decision.sigma_required, margin_db=decision.margin_db,
                           predicted_protected_psnr=decision.predicted_psnr,
                           limited=float(decision.limited_by != ""),
                           too_few_probes=float(decision.limited_by == "too_few_probes"),
                           target_met=float(decision.meets(schedule.target_psnr, TARGET_TOLERANCE_DB)))
        why = why_sigma_differs(decision)
        scalars.update({f"limited_by/{key}": float(key == why) for key in WHY_SIGMA_DIFFERS})
        if decision.floor is not None:
            scalars["epsilon_floor"] = decision.floor
        log_scalars_at_step(trainer, {k: v for k, v in scalars.items() if math.isfinite(v)}, "autopilot",
                            step=decision.effective_step)
