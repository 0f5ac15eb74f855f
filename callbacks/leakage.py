"""I2FMonitor: the I²F leakage estimate of a fixed held-out probe batch, logged all through training."""

from __future__ import annotations

import copy
import functools
import math
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from pl_i2f import leakage as lk
from pl_i2f import monitoring as mon
from pl_i2f.errors import ConfigError
from pl_i2f.influence import InfluenceWarning
from pl_i2f.influence.results import renamed
from pl_i2f.sources import NoiseSource, ProbeSpec, SourceOptions, Sources, analysis_network, copy_network, network_of

from ._logging import log_leakage_media, log_scalars_at_step, wandb_run, warn_once


class I2FMonitor(Callback):
    """Estimate, all through training, how well a gradient-inversion attacker could rebuild each probe sample
    from the gradient the run's defense releases.

    **When**: at step 0, at ``first_step``·``growth``^k below ``every_n_steps`` (leakage changes fastest early),
    at every multiple of ``every_n_steps``, and on the final weights —
    :class:`pl_i2f.monitoring.DenseEarlySchedule` (17 evaluations in the default 1,200-step digits run).

    **What**: on the weights that produce step t's released gradient (the final evaluation on the weights
    training ends with), for ``probe_size`` fixed held-out samples (``datamodule.probe_batch``), each its own
    private input: the scalars of :class:`pl_i2f.leakage.LeakageReport` under ``leakage/`` (headline
    ``expected_i2f_pixel_rmse``, with ε = ``relative_damping`` × median λ_max; ``noise_multiplier_for_target`` at
    the defense's ``max_grad_norm``, else ``clipping_norm``), ``lambda_min`` and ``condition_number`` at the first
    and last evaluation (exact spectra of ``exact_spectrum_probes`` probes). With W&B and
    ``log_per_sample_media``: a per-sample histogram at every evaluation, per-class table, bar chart and the
    worst samples' images at the first and last.

    **How cheaply** (``method="lanczos"``): :class:`pl_i2f.leakage.WarmBasis`, a Lanczos basis of
    ``lanczos_steps`` vectors per probe, fresh at the first evaluation, then warm-started from the previous one
    (two block products). ``"slq"``/``"exact"``: :class:`pl_i2f.leakage.FullPrecision` (several times the cost).

    **Budget** (``max_overhead`` × the training time; ``None``: no limit): planned by
    :class:`pl_i2f.monitoring.EvaluationPlanner` — every evaluation priced before it runs and reduced (no exact
    spectra, fewer probes, a smaller basis; the log says how) or skipped when it does not fit; the final weights
    are always evaluated. The step-0 evaluation runs on a snapshot after ``warmup_steps`` steps.

    **Any LightningModule and data** (:mod:`pl_i2f.sources`): probes from ``probe`` (an ``(x, y)`` pair, or a
    held-out Dataset/DataLoader: ``probe_size`` samples, seeded) or this package's datamodule; the network is the
    module's ``model`` attribute or the module itself; the loss the module's ``loss_fn``/``criterion`` or
    ``loss_fn``; the noise this package's defense, else an Opacus ``DPOptimizer`` on the trainer (σ·C on one
    sample's clipped gradient, read at every evaluation), else ``noise_std`` (on one sample's own gradient) or
    ``noise_multiplier`` × ``max_grad_norm``, else none; the pixel scale ``pixel_std``, the datamodule's std or
    the probes' range; the prior ``prior``, the datamodule's or one estimated from the probes.

    Analysis never touches training: hook-free model copies under DP-SGD, eval-mode functional calls, its own
    seeded generator (reseeded per step, so a resumed run measures the same noise draws).
    """

    METHODS = mon.MONITOR_METHODS

    def __init__(self, per_sample: bool | None = None, spectrum_samples: int | None = None,
                 samples: int | None = None, *, probe: ProbeSpec | None = None, loss_fn: Any = None,
                 noise_std: float | None = None, noise_multiplier: float | None = None,
                 max_grad_norm: float | None = None, pixel_std: float | None = None, prior: Any = None,
                 **settings: Any):
        """``settings``: the fields of :class:`pl_i2f.monitoring.MonitorSettings`, readable as attributes; the
        keyword-only arguments say where probes, loss, noise, pixel scale and prior come from outside this
        package's app (:class:`pl_i2f.sources.SourceOptions`)."""
        super().__init__()
        self.options = SourceOptions("I2FMonitor", probe, loss_fn, noise_std, noise_multiplier, max_grad_norm,
                                     pixel_std, prior)
        self._sources: Sources | None = None
        # the old spellings mixed up probes and noise draws; configs may still set them
        for new, old, value in (("exact_spectrum_probes", "spectrum_samples", spectrum_samples),
                                ("noise_draws", "samples", samples)):
            if value is not None:
                settings[new] = renamed(new, settings.get(new, getattr(mon.MonitorSettings, new)), old, value)
        if per_sample is not None:
            warnings.warn("I2FMonitor(per_sample=...) is deprecated; use log_per_sample_media (what it switches: "
                          "the per-sample W&B histogram, per-class table and worst-sample images)",
                          DeprecationWarning, stacklevel=2)
            settings["log_per_sample_media"] = per_sample
        try:
            self.settings = mon.MonitorSettings(**settings)
        except TypeError as exc:
            raise ConfigError(f"I2FMonitor: {exc}") from exc
        self.schedule = self.settings.schedule()
        # progress (saved with checkpoints)
        self.last_step = -1
        self.evaluations = self.reduced = self.skipped = 0
        self.seconds = 0.0
        self.steps_logged: list[int] = []
        self.history: list[dict[str, float]] = []  # {"step": s, **scalars} per evaluation (small; checkpointed)
        self.planner = mon.EvaluationPlanner(self.max_overhead, self.schedule, lanczos_steps=self.lanczos_steps,
                                         exact_spectrum_probes=self.exact_spectrum_probes)
        self.last_report: lk.LeakageReport | None = None
        # this fit
        self._probe: tuple[Tensor, Tensor] | None = None
        self._basis: Tensor | None = None  # (p, k, d_x): the Lanczos basis of the first p probes, last evaluation
        self._pending: lk.Snapshot | None = None
        self._decided_step = -1
        self._reductions: set[str] = set()
        self._warned: set[str] = set()  # kinds of engine warning already shown this run

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("settings")
        if settings is not None and name in mon.MonitorSettings.__dataclass_fields__:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}")

    @property
    def per_sample(self) -> bool:
        """Deprecated alias of :attr:`log_per_sample_media`."""
        warnings.warn("I2FMonitor.per_sample is deprecated; use log_per_sample_media", DeprecationWarning,
                      stacklevel=2)
        return self.log_per_sample_media

    @property
    def cost(self) -> mon.PlanCost:
        return self.planner.cost

    @functools.cached_property
    def state_key(self) -> str:
        # Lightning reads it around every hook call (thousands of times a run): built once
        return self._generate_state_key(every_n_steps=self.every_n_steps, probe_size=self.probe_size)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._sources = self.options.sources(trainer, pl_module, self.probe_size, self.seed)
            self._probe = self._sources.probe

    def noise_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> NoiseSource:
        """The training's noise, read now (an Opacus optimizer exists only once optimizers are configured, and
        its σ may follow a schedule): :func:`pl_i2f.sources.resolve_noise`."""
        return self.options.noise(trainer, pl_module)

    def _snapshot(self, pl_module: pl.LightningModule, step: int, copy_weights: bool = False) -> lk.Snapshot:
        """The network's weights at ``step`` (hook-free; a copy with ``copy_weights``) and the noise there."""
        network, model = network_of(pl_module), analysis_network(pl_module)
        if copy_weights and model is network:
            model = copy_network(model)
        return lk.Snapshot(step=step, model=model,
                           noise=lk.noise_of(self.noise_source(pl_module.trainer, pl_module), step, model))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the budget counts this fit call (a resumed run starts a new one); the share logged is the whole run's
        total = trainer.estimated_stepping_batches
        # the autopilot may have set the overhead and the schedule for this run
        self.planner.max_overhead, self.planner.schedule = self.max_overhead, self.schedule
        self.planner.start_fit(trainer.global_step, int(total) if math.isfinite(total) else None)
        self._pending = None

    def _spend(self, seconds: float) -> None:
        self.seconds += seconds
        self.planner.charge(seconds)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or self._probe is None:
            return
        self.planner.record_training(step)
        if self._pending is not None and self.planner.steps_done(step) >= self.warmup_steps:
            pending, self._pending = self._pending, None
            self._evaluate_within_budget(pl_module, pending)
        if step in (self._decided_step, self.last_step) or not self.schedule.due(step):
            return
        self._decided_step = step  # once per step (several batches share one under gradient accumulation)
        budget = self.planner.budget
        if not budget.unlimited and budget.train_steps == 0 and self._pending is None:
            # nothing measured yet this fit: evaluate this step's weights once seconds per step are known
            start = self.planner.clock()
            self._pending = self._snapshot(pl_module, step, copy_weights=True)
            self._spend(self.planner.clock() - start)  # the copy counts against the budget too
        else:
            self._evaluate_within_budget(pl_module, self._snapshot(pl_module, step))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._probe is None:
            return
        self.planner.record_training(trainer.global_step)
        if self._pending is not None:  # training ended within the warm-up
            pending, self._pending = self._pending, None
            self._evaluate_within_budget(pl_module, pending)
        step = trainer.global_step
        if step != self.last_step:  # the final weights, always evaluated
            weights = self._snapshot(pl_module, step)
            self._evaluate_within_budget(pl_module, weights, final=True)
        rank_zero_info("I2FMonitor: " + self.planner.summary(self.evaluations, len(set(self.steps_logged)),
                                                             self.seconds, self.reduced, self.skipped,
                                                             self.last_step if self.evaluations else None))

    # -- evaluation -----------------------------------------------------------------------------------
    def _full_plan(self, model: nn.Module, final: bool) -> mon.EvaluationPlan:
        x, _ = self._probe
        return self.planner.full_plan(
            len(x), None if self._basis is None else tuple(self._basis.shape[:2]),
            spectra_possible=x[0].numel() <= lk.EXACT_MAX_DIM, first=self.evaluations == 0 and self.skipped == 0,
            final=final, spectrum_cost=lambda count: lk.spectrum_products(model, x[0].numel(), count))

    def _evaluate_within_budget(self, pl_module: pl.LightningModule, snapshot: lk.Snapshot,
                                final: bool = False) -> None:
        planner, trainer = self.planner, pl_module.trainer
        full = self._full_plan(snapshot.model, final)
        first = None
        if planner.needs_pricing:
            # nothing priced yet: the first probe's evaluation is its own price (a large model's first product is
            # then a step of the evaluation, not a timing thrown away); then the vmapped path, if cheap enough
            stop, seen = planner.first_stop(snapshot.step, final)
            first = self._run(pl_module, snapshot, mon.EvaluationPlan(probes=1, steps=full.steps), stop=stop)
            planner.cheap = planner.batched_worth_pricing(min(seen, default=math.inf))
            if planner.cheap:  # price the vmapped path (several probes) on real products
                self._spend(lk.price_batched_products(planner, snapshot.model, *self._probe, pl_module.device))
        reserve = planner.spectra_reserve(final, self._full_plan(snapshot.model, final=True))
        decision = planner.decide(snapshot.step, full, final=final, probes=len(self._probe[0]),
                                  stored_probes=None if self._basis is None else len(self._basis),
                                  first=None if first is None else first[1], first_fit=planner.budget.left() >= 0,
                                  reserve=reserve)
        if decision.keep_first:
            self._finish(trainer, *first, decision.full, final)  # the priced probe is this evaluation
        elif decision.plan is None:
            self.skipped += 1
            rank_zero_warn(f"I2FMonitor: {planner.skip_message(snapshot.step, full)}")
        else:
            single = mon.PlanCost.is_single(decision.plan) and not planner.budget.unlimited
            stop = planner.allowance_stop(snapshot.step, final) if single else None
            self._finish(trainer, *self._run(pl_module, snapshot, decision.plan, stop=stop), decision.full, final)

    def _run(self, pl_module: pl.LightningModule, snapshot: lk.Snapshot, plan: mon.EvaluationPlan,
             stop: Any = None) -> tuple[lk.LeakageReport, mon.EvaluationPlan]:
        """Measure ``plan`` on the snapshot (timed and charged; the products it really ran priced): the report and
        the plan really run (a budgeted fresh basis may stop early)."""
        start = self.planner.clock()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InfluenceWarning)
            report = self.measure(pl_module.trainer, pl_module, snapshot.step, model=snapshot.model,
                                  noise=snapshot.noise, plan=plan, stop=stop)
        warn_once(caught, InfluenceWarning, self._warned, "I2FMonitor")
        elapsed = self.planner.clock() - start
        self._spend(elapsed)
        ran = plan if report.basis is None else self.planner.observe(
            plan, report.basis.products, report.basis.warm, elapsed, report.seconds.get("spectra", 0.0))
        return report, ran

    def _finish(self, trainer: pl.Trainer, report: lk.LeakageReport, ran: mon.EvaluationPlan, full: mon.EvaluationPlan,
                final: bool) -> None:
        """Log an evaluation's report and record it (its logging counts against the budget too)."""
        how = ran.reduced_from(full)
        self.reduced += bool(how)
        if how and how not in self._reductions:  # each kind of reduction said once
            self._reductions.add(how)
            rank_zero_info(f"I2FMonitor: step {report.step} evaluated on {how}, to stay within {self.max_overhead:.0%} "
                           "overhead (later reductions of this kind are counted, not repeated)")
        start = self.planner.clock()
        media = self.evaluations == 0 or final
        log_scalars_at_step(trainer, report.scalars, "leakage", step=report.step)
        if self.log_per_sample_media and wandb_run(trainer) is not None:
            log_leakage_media(trainer, report, self._probe[0], torch.arange(len(report.labels)), tables=media,
                              to_pixels=self._sources.pixels.to_pixels)
        seconds = self.planner.clock() - start
        self._spend(seconds)
        if not media:  # the routine logging every evaluation pays (tables and images: first and last only)
            self.cost.logging.observe(1, 1, seconds)
        self.last_step = max(self.last_step, report.step)
        self.steps_logged.append(report.step)
        self.history.append({"step": report.step, **report.scalars})
        self.evaluations += 1
        self.last_report = report

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                model: nn.Module | None = None, noise: Any = None,
                plan: mon.EvaluationPlan | None = None, stop: Any = None) -> lk.LeakageReport:
        """The leakage report of the probes at ``step`` (library call; no logging): on ``model`` (default: the
        module's current one) under ``noise`` (default: the defense's at ``step``), as ``plan`` says (default:
        every probe, exact spectra as at a first evaluation); ``stop``: :class:`pl_i2f.leakage.WarmBasis`'s."""
        x, y = self._probe
        device, defense = pl_module.device, self.noise_source(trainer, pl_module)
        model = analysis_network(pl_module) if model is None else model
        plan = self._full_plan(model, final=True) if plan is None else plan
        index = torch.arange(min(plan.probes, len(x)))  # the first plan.probes of the fixed probe batch
        xs, ys = x[index].to(device), y[index].to(device)
        options = lk.LeakageOptions(
            pixel_std=self._sources.pixels.std, damping=self.damping,
            relative_damping=self.relative_damping, exact_spectrum_probes=plan.spectra, worst_k=self.worst_k,
            noise_draws=self.noise_draws, target_pixel_rmse=self.target_pixel_rmse,
            clipping_norm=float(getattr(defense, "max_grad_norm", None) or self.clipping_norm),
            batch_size=self._batch_size(trainer, defense))
        if self.method != "lanczos":
            estimator = lk.FullPrecision(method=self.method)
        else:
            stored = self._basis
            warm = plan.warm and stored is not None and len(stored) >= len(index) > 1
            basis = stored[: len(index), : plan.steps] if warm else None  # leading rows: the smaller Krylov basis
            estimator = lk.WarmBasis(steps=self.lanczos_steps if warm else plan.steps, basis=basis, stop=stop,
                                  min_steps=mon.MIN_LANCZOS_STEPS, clock=self.planner.clock)
        noise = lk.noise_of(defense, step, model) if noise is None else noise
        report = lk.leakage_report(model, xs, ys, noise, options, estimator, step=step, clock=self.planner.clock,
                                generator=torch.Generator(device=device).manual_seed(self.seed + step))
        if report.basis is not None:
            self._basis = lk.merge_basis(self._basis, report.basis.basis)
        return report

    @staticmethod
    def _batch_size(trainer: pl.Trainer, defense: Any) -> int | None:
        expected = getattr(defense, "expected_batch_size", None)
        return int(expected) if expected else getattr(trainer.datamodule, "batch_size", None)

    _STATE = ("last_step", "evaluations", "reduced", "skipped", "seconds", "steps_logged", "history")

    def state_dict(self) -> dict[str, Any]:
        # the warm-start basis: a resumed run's next evaluation then measures what the uninterrupted run's did
        # (the leakage autopilot sets σ from it)
        return {**{name: copy.copy(getattr(self, name)) for name in self._STATE},
                "cost": self.cost.state_dict(), "planner": self.planner.state_dict(), "basis": self._basis}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in self._STATE:
            setattr(self, name, copy.copy(state_dict.get(name, getattr(self, name))))
        self.planner.load_state_dict({"cost": state_dict.get("cost", {}), **state_dict.get("planner", {})})
        self._basis = state_dict.get("basis", self._basis)
