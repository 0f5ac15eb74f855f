"""I2FMonitor: the prior-aware leakage estimate of a fixed held-out probe batch, logged all through training."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import statistics
import warnings
from collections.abc import Iterator
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
from pl_i2f.sources import (
    NoiseSource,
    ProbeSpec,
    SourceOptions,
    Sources,
    analysis_network,
    copy_network,
    gaussian_prior,
    network_of,
)

from ._logging import leakage_media, log_scalars_at_step, wandb_run, warn_once


class I2FMonitor(Callback):
    """Estimate, all through training, how well a gradient-inversion attacker with a Gaussian prior of the data
    could rebuild each probe sample from the gradient the run's defense releases.

    **When**: at step 0, at ``first_step``·``growth``^k below ``every_n_steps`` (leakage changes fastest early),
    at every multiple of ``every_n_steps``, and on the final weights —
    :class:`pl_i2f.monitoring.DenseEarlySchedule` (17 evaluations in the default 1,200-step digits run).

    **What**: on the weights that produce step t's released gradient, for ``probe_size`` fixed held-out samples
    (``datamodule.probe_batch``), each its own private input under the one threat model (:mod:`pl_i2f.threat`:
    the defense's :meth:`~pl_i2f.defenses.Defense.sample_noise` — DP-SGD σC on the clipped gradient, Gaussian Bσ,
    anisotropic its covariance; ``batch_of_one``: DLG's setting): the keys of :data:`pl_i2f.leakage.LEAKAGE_KEYS`
    under ``leakage/``, headline ``expected_attack_psnr`` (:class:`pl_i2f.leakage.Calibrated`: exact for inputs of
    up to 1,024 values, with λ_min and the condition number; a Nyström sketch beyond — rank 8 under a budget — and
    where the budget needs it). With W&B and ``log_per_sample_media``: a per-sample histogram at every evaluation,
    per-class table, bar chart and the worst samples' images at the first and last.

    **Budget** (``max_overhead`` × the training time; ``None``: no limit; every second of the monitor's hooks counts
    against it — set-up, evaluations, logging, console lines): :class:`pl_i2f.monitoring.EvaluationPlanner`
    prices every evaluation before it runs and covers as many probes as fit every evaluation still scheduled —
    exact (on the data's span where the prior is singular), sketched where the noise is isotropic and a sketch
    fits more (:class:`pl_i2f.monitoring.Plan`); where not all fit, a rotating subset (each probe's last-measured
    step in :attr:`probe_steps`). The final weights are always evaluated; step 0 on a snapshot after ``warmup_steps``.
    A console line at the first and final evaluations and where the route or the coverage changes.

    **Any LightningModule and data** (:mod:`pl_i2f.sources`): probes from ``probe`` (an ``(x, y)`` pair, or a
    held-out Dataset/DataLoader: ``probe_size`` samples, seeded) or this package's datamodule; the network is the
    module's ``model`` attribute or the module itself; the loss the module's ``loss_fn``/``criterion`` or
    ``loss_fn``; the noise this package's defense, else an Opacus ``DPOptimizer`` on the trainer (σ·C on one
    sample's clipped gradient, read at every evaluation), else ``noise_std`` (on one sample's own gradient) or
    ``noise_multiplier`` × ``max_grad_norm``, else none; the pixel scale ``pixel_std``, the datamodule's std or
    the probes' range; the prior ``prior``, the datamodule's data prior or one estimated from the probes.

    Analysis never touches training: hook-free model copies under DP-SGD, eval-mode functional calls, its own
    seeded generator (reseeded per step).
    """

    def __init__(self, per_sample: bool | None = None, *, probe: ProbeSpec | None = None, loss_fn: Any = None,
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
        retired = sorted(set(settings) & set(mon.RETIRED_SETTINGS))
        if retired:  # configs may still set the damped Lanczos estimate's knobs
            warnings.warn(f"I2FMonitor: {', '.join(retired)} no longer used (the calibrated estimate is exact and "
                          "undamped)", DeprecationWarning, stacklevel=2)
            settings = {k: v for k, v in settings.items() if k not in retired}
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
        self.last_step, self.evaluations, self.reduced, self.skipped, self.seconds = -1, 0, 0, 0, 0.0
        self.steps_logged: list[int] = []
        self.history: list[dict[str, float]] = []  # {"step": s, **scalars} per evaluation (small; checkpointed)
        self.probe_steps: list[int] = []  # each probe's last-measured step (-1: not yet)
        self.cursor = 0  # where the next rotating subset starts
        self.planner = mon.EvaluationPlanner(self.max_overhead, self.schedule)
        self.last_report: lk.LeakageReport | None = None
        # this fit
        self._probe: tuple[Tensor, Tensor] | None = None
        self._pending: lk.Snapshot | None = None
        self._decided_step = -1
        self._setup_seconds = 0.0  # the sources' set-up (probes, data prior), charged when the fit's budget starts
        self._line_kind: tuple | None = None  # what the last console line described (see _shows_line)
        self._measured = 0.0  # seconds of the estimates themselves (the rest of an evaluation is its overhead)
        self._quiet_until = 0  # the hook has nothing to do before this step (the next evaluation's)
        self._defense_seconds = 0.0  # the defense's work inside the monitor's hooks (not charged: see _charging)
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

    cost = property(lambda self: self.planner.cost)

    @functools.cached_property
    def state_key(self) -> str:
        # Lightning reads it around every hook call (thousands of times a run): built once
        return self._generate_state_key(every_n_steps=self.every_n_steps, probe_size=self.probe_size)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            start = self.planner.clock()
            self._sources = self.options.sources(trainer, pl_module, self.probe_size, self.seed)
            self._probe = self._sources.probe
            if len(self.probe_steps) != len(self._probe[0]):
                self.probe_steps = [-1] * len(self._probe[0])
            self._setup_seconds = self.planner.clock() - start  # the probes and the data prior: charged to the fit

    def noise_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> NoiseSource:
        """The training's noise, read now (an Opacus optimizer exists only once optimizers are configured, and
        its σ may follow a schedule): :func:`pl_i2f.sources.resolve_noise`."""
        return self.options.noise(trainer, pl_module, batch_of_one=self.batch_of_one)

    def _snapshot(self, pl_module: pl.LightningModule, step: int, copy_weights: bool = False) -> lk.Snapshot:
        """The network's weights at ``step`` (hook-free; a copy with ``copy_weights``) and the noise there."""
        network, model, start = network_of(pl_module), analysis_network(pl_module), self.planner.clock()
        if copy_weights and model is network:  # the copy counts against the budget
            model = copy_network(model)
            self._spend(self.planner.clock() - start)
        began = self.planner.clock()
        noise = lk.noise_of(self.noise_source(pl_module.trainer, pl_module), step, model)
        self._defense_seconds += self.planner.clock() - began  # the defense's work (its refresh): training time
        return lk.Snapshot(step=step, model=model, noise=noise)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the budget counts this fit call (a resumed run starts a new one); the share logged is the whole run's
        total = trainer.estimated_stepping_batches
        # the autopilot may have set the overhead and the schedule for this run
        self.planner.max_overhead, self.planner.schedule = self.max_overhead, self.schedule
        self.planner.start_fit(trainer.global_step, int(total) if math.isfinite(total) else None)
        self._pending, self._line_kind, self._quiet_until = None, None, 0
        self._spend(self._setup_seconds)
        self._setup_seconds = 0.0

    def _spend(self, seconds: float) -> None:
        self.seconds += seconds
        self.planner.charge(seconds)

    def _spend_on(self, work: Any, *args: Any, **kwargs: Any) -> None:
        """Run ``work`` and charge its seconds now (the plan that follows it in the same hook sees them spent)."""
        start = self.planner.clock()
        work(*args, **kwargs)
        self._spend(self.planner.clock() - start)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if step < self._quiet_until or self._probe is None or not trainer.is_global_zero:
            return  # nothing due before then (the steps' seconds are read at the next evaluation)
        with self._charging():
            self._at_step(trainer, pl_module, step)
        if self._pending is None and self.planner.steps_done(step) >= 1:  # the rate's origin is taken at step 1
            self._quiet_until = self.schedule.next_due(step + 1, self.planner.budget.total_steps)

    @contextlib.contextmanager
    def _charging(self) -> Iterator[None]:
        """Charge what a hook takes beyond the seconds it charges itself: the planning, the console lines and the
        bookkeeping count against the budget too, not only the timed evaluations. The defense's own work done
        there (its noise at the step: the anisotropic refresh) is training time, not the monitor's."""
        start, charged, defense = self.planner.clock(), self.seconds, self._defense_seconds
        try:
            yield
        finally:
            ours = self.planner.clock() - start - (self.seconds - charged) - (self._defense_seconds - defense)
            self._spend(max(0.0, ours))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.planner.note_epoch_end()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # the training seconds are read at evaluations only: bring the saved state's up to this step
        if trainer.training and self._probe is not None and self.state_key in checkpoint.get("callbacks", {}):
            self.planner.record_training(trainer.global_step)
            checkpoint["callbacks"][self.state_key] = self.state_dict()

    def _at_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
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
            self._pending = self._snapshot(pl_module, step, copy_weights=True)
        else:
            self._evaluate_within_budget(pl_module, self._snapshot(pl_module, step))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._probe is None:
            return
        with self._charging():
            self.planner.record_training(trainer.global_step)
            if self._pending is not None:  # training ended within the warm-up
                pending, self._pending = self._pending, None
                self._evaluate_within_budget(pl_module, pending)
            step = trainer.global_step
            if step != self.last_step:  # the final weights, always evaluated
                self._evaluate_within_budget(pl_module, self._snapshot(pl_module, step), final=True)
        counts = [int(h.get("probes", 0)) for h in self.history] or [0]
        rank_zero_info(f"I2FMonitor: {self.planner.summary(self.evaluations, len(set(self.steps_logged)), self.seconds, self.reduced, self.skipped, self.last_step if self.evaluations else None)}; probes per evaluation: median {statistics.median(counts):g}, first {counts[0]}, last {counts[-1]} of {len(self._probe[0])}")  # noqa: E501

    # -- evaluation -----------------------------------------------------------------------------------
    def _evaluate_within_budget(self, pl_module: pl.LightningModule, snapshot: lk.Snapshot,
                                final: bool = False) -> None:
        start, measured, evaluations = self.planner.clock(), self._measured, self.evaluations
        self._evaluate(pl_module, snapshot, final)
        if self.evaluations > evaluations and evaluations > 0 and not final:  # (the tables' evaluations: apart)
            self.planner.note_overhead(self.planner.clock() - start - (self._measured - measured))

    def _evaluate(self, pl_module: pl.LightningModule, snapshot: lk.Snapshot, final: bool) -> None:
        planner, total, d = self.planner, len(self._probe[0]), self._probe[0][0].numel()
        prior = gaussian_prior(self._sources.prior, d)  # dim: products per exact probe; 0: all sketched (d_x > 1024)
        dim = lk.Calibrated.exact_columns(prior, d) if d <= lk.EXACT_MAX_DIM else 0
        sketch, report, route = lk.Calibrated.can_sketch(snapshot.noise) and dim > 0, None, "exact" if dim else None
        no_sketch = mon.NO_SKETCH_FOR_NOISE
        if sketch and lk.Calibrated.exact_by_chain(snapshot.model, *self._probe, loss_fn=self._sources.loss):
            sketch, no_sketch = False, mon.NO_SKETCH_FOR_CHAIN
        if planner.needs_pricing:  # the first evaluation prices itself on one probe (one-off set-ups charged, unpriced)
            self._spend_on(lk.warm_up_transforms, snapshot.model, *self._probe, route=route or "sketch",
                           loss_fn=self._sources.loss, prior=prior, reserve=1)
            report = self._run(pl_module, snapshot, mon.Coverage(self.cursor, 1, total), planner.route_plan(1, route))
        replan = functools.partial(planner.plan, snapshot.step, total, final=final, first=self.evaluations == 0,
                                   dim=dim, sketch=sketch, no_sketch=no_sketch)
        if (plan := replan()).count <= 1 and report is not None and total > 1 and planner.wants_second_price():
            report = self._run(pl_module, snapshot, mon.Coverage(self.cursor, 2, total), planner.route_plan(2, route))
            plan = replan()  # two sizes priced: the evaluation's fixed part told from its part per probe
        if report is not None and plan.count <= report.coverage.count:
            return self._finish(pl_module.trainer, report, final)
        if (count := plan.count) == 0:
            self.skipped += 1
            if self.skipped == 1:
                rank_zero_warn(f"I2FMonitor: {planner.skip_message(snapshot.step)}")
            return None
        if report is not None and route == "exact":  # the buffers of the first evaluation and of the ends' aim (the
            # final's), touched apart from their prices (a run that can afford one probe at step 0 never gets here)
            self._spend_on(lk.reserve_buffers, snapshot.model, *self._probe, self._sources.loss, prior=prior,
                           probes=max(count, min(mon.AIM_PROBES, total)))
        coverage = mon.Coverage(0 if count >= total else self.cursor, count, total)
        return self._finish(pl_module.trainer, self._run(pl_module, snapshot, coverage, plan), final)

    def _run(self, pl_module: pl.LightningModule, snapshot: lk.Snapshot, coverage: mon.Coverage, plan: mon.Plan) -> Any:
        """Measure ``coverage``'s probes on the snapshot by ``plan``'s route (timed, charged and priced)."""
        start = self.planner.clock()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InfluenceWarning)
            report = self.measure(pl_module.trainer, pl_module, snapshot.step, model=snapshot.model,
                                  noise=snapshot.noise, coverage=coverage, plan=plan)
        warn_once(caught, InfluenceWarning, self._warned, "I2FMonitor")
        elapsed = self.planner.clock() - start
        self._spend(elapsed)
        self._measured += elapsed
        self.planner.observe(coverage.count, elapsed, plan)
        return report

    def _finish(self, trainer: pl.Trainer, report: lk.LeakageReport, final: bool) -> None:
        """Log an evaluation's report and record it (its logging counts against the budget too)."""
        coverage = report.coverage
        if coverage.count < coverage.total:
            self.reduced += 1
            self.cursor = (coverage.start + coverage.count) % coverage.total
        for i in coverage.indices():
            self.probe_steps[i] = report.step
        measured = [s for s in self.probe_steps if s >= 0]
        report.scalars["oldest_probe_step"] = float(min(measured))
        start, how = self.planner.clock(), report.plan.describe()
        if self._shows_line((coverage.count >= coverage.total, how), final):
            rank_zero_info(f"I2FMonitor: step {report.step} evaluated on {coverage.describe()} ({how})")
        media = self.evaluations == 0 or final
        payload = None
        if self.log_per_sample_media and wandb_run(trainer) is not None:
            payload = leakage_media(report, self._probe[0], torch.tensor(coverage.indices()), tables=media,
                                    to_pixels=self._sources.pixels.to_pixels)
        log_scalars_at_step(trainer, report.scalars, "leakage", step=report.step, media=payload)
        self._spend(seconds := self.planner.clock() - start)
        if media and not final:  # the final evaluation logs as much: what the planner keeps back for it
            self.planner.final_logging = seconds
        self.last_step = max(self.last_step, report.step)
        self.steps_logged.append(report.step)
        self.history.append({"step": report.step, **report.scalars})
        self.evaluations += 1
        self.last_report = report

    def _shows_line(self, kind: tuple, final: bool) -> bool:
        """A console line for the first and final evaluations and wherever the route changes or the coverage turns
        from all probes to a rotating subset or back (a line through a console-capturing logger costs about what a
        probe does; every evaluation's count is in the logged ``leakage/probes`` and ``leakage/oldest_probe_step``)."""
        shown, self._line_kind = kind != self._line_kind or final, kind
        return shown

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                model: nn.Module | None = None, noise: Any = None,
                coverage: mon.Coverage | None = None, plan: mon.Plan | None = None) -> lk.LeakageReport:
        """The leakage report of the probes at ``step`` (library call; no logging): on ``model`` (default: the
        module's current one) under ``noise`` (a :class:`pl_i2f.threat.SampleNoise`; default: the training's at
        ``step``), on ``coverage``'s probes (default: all), by ``plan``'s route (default: exact)."""
        x, y = self._probe
        device, source = pl_module.device, self.noise_source(trainer, pl_module)
        model = analysis_network(pl_module) if model is None else model
        coverage = mon.Coverage(0, len(x), len(x)) if coverage is None else coverage
        index = torch.tensor(coverage.indices())
        xs, ys = x[index].to(device), y[index].to(device)
        pixels = self._sources.pixels
        options = lk.LeakageOptions(
            pixel_std=pixels.std, prior=gaussian_prior(self._sources.prior, x[0].numel()),
            value_scale=pixels.value_scale(x.shape[1:]), worst_k=self.worst_k,
            target_pixel_rmse=self.target_pixel_rmse, clipping_norm=float(source.max_grad_norm or self.clipping_norm),
            batch_size=self._batch_size(trainer, source))
        noise = lk.noise_of(source, step, model) if noise is None else noise
        generator = torch.Generator(device).manual_seed(self.seed + step)
        plan = mon.Plan(len(index), None) if plan is None else plan  # None: exact up to 1,024 values, a sketch beyond
        report = lk.leakage_report(model, xs, ys, noise, options, lk.Calibrated(**plan.estimator_options()), step=step,
                                   generator=generator, loss_fn=self._sources.loss, clock=self.planner.clock)
        report.coverage, report.plan = coverage, plan
        return report

    @staticmethod
    def _batch_size(trainer: pl.Trainer, source: Any) -> int | None:
        expected = getattr(source, "expected_batch_size", None) or getattr(getattr(source, "defense", None),
                                                                           "batch_size", None)
        return int(expected) if expected else getattr(trainer.datamodule, "batch_size", None)

    _STATE = ("last_step", "evaluations", "reduced", "skipped", "seconds", "steps_logged", "history",
              "probe_steps", "cursor")

    def state_dict(self) -> dict[str, Any]:
        return {**{name: copy.copy(getattr(self, name)) for name in self._STATE}, "planner": self.planner.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name in self._STATE:
            setattr(self, name, copy.copy(state_dict.get(name, getattr(self, name))))
        self.planner.load_state_dict(state_dict.get("planner", {}))
