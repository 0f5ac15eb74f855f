"""I2FMonitor: the I²F leakage estimate of a fixed held-out probe batch, logged all through training."""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from pl_i2f.errors import ConfigError
from pl_i2f.influence import InfluenceWarning, per_sample_product_seconds
from pl_i2f.influence.results import renamed
from pl_i2f.influence.warm import BasisLeakage
from pl_i2f.leakage import (
    DEFAULT_TARGET_PIXEL_RMSE,
    EXACT_MAX_DIM,
    LeakageReport,
    NoiseModel,
    measure_leakage,
    monitor_leakage,
    spectrum_products,
)
from pl_i2f.monitoring import DenseEarlySchedule, EvaluationPlan, OverheadBudget, PlanCost
from pl_i2f.sources import (
    NoiseSource,
    ProbeSpec,
    SourceOptions,
    Sources,
    analysis_network,
    copy_network,
    network_of,
)

from ._logging import log_media, log_scalars_at_step, wandb_image, wandb_run


@functools.cache
def _warm_up_transforms() -> None:
    """torch.func's one-off set-up (~0.2 s per process), paid on a tiny model so that it does not count as
    the price of a product (and costs a large model nothing)."""
    tiny = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    per_sample_product_seconds(tiny, torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))


@dataclass
class _Snapshot:
    """What an evaluation needs, frozen at its step: the weights (a hook-free copy) and the defense's noise."""

    step: int
    model: nn.Module
    noise: NoiseModel


@dataclass
class _Done:
    """A measured evaluation, not yet logged: its report, the plan it really ran, the probes and its seconds."""

    report: LeakageReport
    plan: EvaluationPlan
    index: Tensor
    seconds: float


class I2FMonitor(Callback):
    """Estimate, all through training, how well a gradient-inversion attacker could rebuild each probe sample
    from the gradient the run's defense releases.

    **When**: at step 0, at ``first_step``·``growth``^k below ``every_n_steps`` (leakage changes fastest early),
    at every multiple of ``every_n_steps``, and on the final weights (the run's last step) —
    :class:`pl_i2f.monitoring.DenseEarlySchedule`. The default digits run (1,200 steps) gets 17 evaluations.

    **What**: measured on the weights that produce step t's released gradient (before the update of step t;
    the final evaluation on the weights training ends with), on ``probe_size`` fixed held-out validation
    samples (``datamodule.probe_batch``), each its own private input. Logs under ``leakage/``:
    ``expected_i2f`` (input-space norm), ``expected_i2f_rmse``, ``expected_i2f_pixel_rmse`` (the headline: the
    expected reconstruction RMSE on [0, 1] pixels, the undamped-as-possible I²F with ε = ``relative_damping``
    × median λ_max), its standard error ``expected_i2f_pixel_rmse_stderr`` and ``relative_stderr``,
    ``expected_attack_psnr`` (the PSNR that error implies; not for ``defense=none``), ``sigma_for_target``
    (the isotropic Gaussian σ per gradient coordinate that would bring the expected pixel RMSE to
    ``target_pixel_rmse``) and
    ``noise_multiplier_for_target`` (the same as a DP-SGD noise multiplier at the run's clipping norm — the
    defense's ``max_grad_norm``, else ``clipping_norm`` — and batch size), ``lower_bound`` (‖Jδ‖/λ_max),
    ``lambda_max``, ``unfairness_p90_p10``, ``unfairness_cv``, ``worst_k_pixel_rmse``, ``probes`` (how many were
    evaluated), ``warm_started``; at the first and last evaluation also ``lambda_min`` and
    ``condition_number`` (exact spectra of ``exact_spectrum_probes`` probes). With W&B and
    ``log_per_sample_media``: a histogram of the per-sample errors at every evaluation, and at the first and
    last the per-class table and bar chart and the worst samples' images.

    **How cheaply** (``method="lanczos"``, default): one Lanczos basis of ``lanczos_steps`` vectors per probe
    from one Rademacher vector, built fresh at the first evaluation and then warm-started from the previous
    evaluation's basis (two block products instead of ``lanczos_steps`` sequential ones;
    :func:`pl_i2f.leakage.basis_leakage`). ``method="slq"`` or ``"exact"``: the full-precision
    :func:`pl_i2f.leakage.measure_leakage` at every evaluation (several times the cost).

    **Budget** (``max_overhead``, fraction of the training time; ``None``: no limit): the monitor's own time
    (evaluations, timing, the step-0 weight copy) is held within ``max_overhead`` × this fit's training time,
    measured as seconds per step so far × the fit's steps (:class:`pl_i2f.monitoring.OverheadBudget`). The
    step-0 evaluation runs on a snapshot of the initial weights after ``warmup_steps`` training steps, once
    seconds per step are known; an evaluation's cost is predicted by counting its products and pricing them
    with a fit of the products already run (:class:`pl_i2f.monitoring.ProductCost`). An evaluation that does
    not fit what is left — its own cost plus the warm-started evaluations still scheduled at its size — is
    reduced: no exact spectra, then fewer probes (the first p of the probe batch, kept from then on: the same
    samples keep the curve comparable and the basis warm), then a smaller Lanczos basis; the log says how.
    It is skipped only when even one probe at the smallest basis cannot fit what is left.

    **Any LightningModule and data** (:mod:`pl_i2f.sources`): probes from ``probe`` (an ``(x, y)`` pair, or a
    held-out Dataset/DataLoader: ``probe_size`` samples, seeded) or this package's datamodule; the network is the
    module's ``model`` attribute or the module itself; the loss the module's ``loss_fn``/``criterion`` or
    ``loss_fn`` (mean cross-entropy or equal to it); the noise this package's defense, else an Opacus
    ``DPOptimizer`` on the trainer (σ·C on one sample's clipped gradient, read at every evaluation), else
    ``noise_std`` (on one sample's own gradient) or ``noise_multiplier`` × ``max_grad_norm``, else none (per unit
    σ); the pixel scale ``pixel_std``, the datamodule's std or the probes' range; the prior ``prior``, the
    datamodule's ``prior()`` or one estimated from the probes.

    Analysis never touches training: hook-free model copies under DP-SGD, eval-mode functional calls, its own
    seeded generator (reseeded per step, so a resumed run measures the same noise draws).
    """

    METHODS = ("lanczos", "slq", "exact")

    def __init__(
        self,
        every_n_steps: int = 100,
        first_step: int = 10,
        growth: float = 2.0,
        probe_size: int | None = None,
        damping: float = 0.0,
        relative_damping: float = 0.01,
        log_per_sample_media: bool = True,
        method: str = "lanczos",
        lanczos_steps: int = 16,
        exact_spectrum_probes: int = 2,
        worst_k: int = 5,
        max_overhead: float | None = 0.1,
        warmup_steps: int = 3,
        noise_draws: int = 32,
        target_pixel_rmse: float = DEFAULT_TARGET_PIXEL_RMSE,
        clipping_norm: float = 1.0,
        seed: int = 0,
        per_sample: bool | None = None,
        spectrum_samples: int | None = None,
        samples: int | None = None,
        probe: ProbeSpec | None = None,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        noise_std: float | None = None,
        noise_multiplier: float | None = None,
        max_grad_norm: float | None = None,
        pixel_std: float | None = None,
        prior: Any = None,
    ):
        super().__init__()
        # -- any LightningModule and data (pl_i2f.sources resolves them at setup) --
        self.options = SourceOptions("I2FMonitor", probe, loss_fn, noise_std, noise_multiplier, max_grad_norm,
                                     pixel_std, prior)
        self._sources: Sources | None = None
        # -- end of the drop-in arguments --
        # the old spellings mixed up probes and noise draws; configs may still set them
        exact_spectrum_probes = renamed("exact_spectrum_probes", exact_spectrum_probes, "spectrum_samples",
                                        spectrum_samples)
        noise_draws = renamed("noise_draws", noise_draws, "samples", samples)
        if per_sample is not None:
            warnings.warn("I2FMonitor(per_sample=...) is deprecated; use log_per_sample_media (what it switches: "
                          "the per-sample W&B histogram, per-class table and worst-sample images)",
                          DeprecationWarning, stacklevel=2)
            log_per_sample_media = per_sample
        try:
            self.schedule = DenseEarlySchedule(every_n_steps, first_step, growth)
            OverheadBudget(max_overhead, self.schedule)
        except ValueError as exc:
            raise ConfigError(f"I2FMonitor: {exc}") from exc
        for name, value in (("damping", damping), ("relative_damping", relative_damping)):
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"I2FMonitor.{name} must be a finite number >= 0, got {value}")
        if method not in self.METHODS:
            raise ConfigError(f"I2FMonitor.method must be one of {', '.join(self.METHODS)}, got {method!r}")
        for name, value, low in (("lanczos_steps", lanczos_steps, 2),
                                 ("exact_spectrum_probes", exact_spectrum_probes, 0),
                                 ("worst_k", worst_k, 0), ("warmup_steps", warmup_steps, 1),
                                 ("noise_draws", noise_draws, 1)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"I2FMonitor.{name} must be an integer >= {low}, got {value!r}")
        if probe_size is not None and probe_size < 1:
            raise ConfigError(f"I2FMonitor.probe_size must be >= 1 or null, got {probe_size}")
        if not (0 < target_pixel_rmse < math.inf):
            raise ConfigError(f"I2FMonitor.target_pixel_rmse must be > 0, got {target_pixel_rmse}")
        if not (0 < clipping_norm < math.inf):
            raise ConfigError(f"I2FMonitor.clipping_norm must be > 0, got {clipping_norm}")
        self.every_n_steps = every_n_steps
        self.probe_size = probe_size
        self.damping = damping
        self.relative_damping = relative_damping
        self.log_per_sample_media = log_per_sample_media
        self.method = method
        self.lanczos_steps = lanczos_steps
        self.exact_spectrum_probes = exact_spectrum_probes
        self.worst_k = worst_k
        self.max_overhead = max_overhead
        self.warmup_steps = warmup_steps
        self.noise_draws = noise_draws
        self.target_pixel_rmse = target_pixel_rmse
        self.clipping_norm = clipping_norm
        self.seed = seed
        # progress (saved with checkpoints)
        self.last_step = -1
        self.evaluations = 0
        self.reduced = 0
        self.skipped = 0
        self.seconds = 0.0
        self.steps_logged: list[int] = []
        self.history: list[dict[str, float]] = []  # {"step": s, **scalars} per evaluation (small; checkpointed)
        self.cost = PlanCost()
        self.last_report: LeakageReport | None = None
        # this fit
        self.budget = OverheadBudget(max_overhead, self.schedule)
        self._probe: tuple[Tensor, Tensor] | None = None
        self._basis: Tensor | None = None  # (p, k, d_x): the Lanczos basis of the first p probes, last evaluation
        self._pending: _Snapshot | None = None
        self._decided_step = -1
        self._train_started = 0.0
        self._start_step = 0
        self._rate_origin: tuple[float, float] | None = None  # (time, monitor seconds) after the fit's first step
        self._cheap = False  # the first evaluation found the model cheap enough to price several probes
        self._reductions: set[str] = set()
        self._warned: set[str] = set()  # kinds of engine warning already shown this run
        self._last_index = torch.arange(0)
        self._last_fit: BasisLeakage | None = None

    @property
    def per_sample(self) -> bool:
        """Deprecated alias of :attr:`log_per_sample_media`."""
        warnings.warn("I2FMonitor.per_sample is deprecated; use log_per_sample_media", DeprecationWarning,
                      stacklevel=2)
        return self.log_per_sample_media

    @functools.cached_property
    def state_key(self) -> str:
        # Lightning reads it around every hook call (~7,500 times in the default run): built once
        return self._generate_state_key(every_n_steps=self.every_n_steps, probe_size=self.probe_size)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._sources = self.options.sources(trainer, pl_module, self.probe_size, self.seed)
            self._probe = self._sources.probe

    def noise_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> NoiseSource:
        """The training's noise, read now (an Opacus optimizer exists only once optimizers are configured, and
        its σ may follow a schedule): :func:`pl_i2f.sources.resolve_noise`."""
        return self.options.noise(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the overhead budget counts this fit call only (a resumed run starts a new one)
        self._train_started = time.perf_counter()
        self._start_step = trainer.global_step
        self._rate_origin = None
        total = trainer.estimated_stepping_batches
        self.budget = OverheadBudget(self.max_overhead, self.schedule,
                                     int(total) if math.isfinite(total) else None)
        self._pending = None

    # -- small named predicates ---------------------------------------------------------------------
    def _is_first_evaluation(self) -> bool:
        return self.evaluations == 0 and self.skipped == 0

    def _needs_timing(self) -> bool:
        return self.budget.unlimited is False and not self.cost.known

    def _warmed_up(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step - self._start_step >= self.warmup_steps

    def _due_now(self, step: int) -> bool:
        return step not in (self._decided_step, self.last_step) and self.schedule.due(step)

    # -- bookkeeping ----------------------------------------------------------------------------------
    def _spend(self, seconds: float) -> None:
        self.seconds += seconds
        self.budget.charge(seconds)

    def _record_training(self, trainer: pl.Trainer) -> None:
        steps, now = trainer.global_step - self._start_step, time.perf_counter()
        if steps >= 1 and self._rate_origin is None:
            # from the end of the first step on: its one-off costs (the first batch's loading and allocations,
            # 2x the later steps on digits) would inflate the rate and with it the budget
            self._rate_origin = (now, self.budget.spent)
        if steps < 2 or self._rate_origin is None:
            self.budget.record_training(steps, now - self._train_started - self.budget.spent)
        else:
            origin, spent = self._rate_origin
            self.budget.record_training(steps - 1, now - origin - (self.budget.spent - spent))

    # -- hooks ----------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or self._probe is None:
            return
        self._record_training(trainer)
        if self._pending is not None and self._warmed_up(trainer):
            pending, self._pending = self._pending, None
            self._evaluate_within_budget(trainer, pl_module, pending)
        if not self._due_now(step):
            return
        self._decided_step = step  # once per step (several batches share one under gradient accumulation)
        if self.budget.unlimited:
            self._evaluate(trainer, pl_module, self._freeze(pl_module, step, copy_weights=False), self._full_plan())
        elif self.budget.train_steps == 0 and self._pending is None:
            # nothing measured yet this fit: evaluate this step's weights once seconds per step are known
            start = time.perf_counter()
            self._pending = self._freeze(pl_module, step, copy_weights=True)
            self._spend(time.perf_counter() - start)  # the copy counts against the budget too
        else:
            self._evaluate_within_budget(trainer, pl_module, self._freeze(pl_module, step, copy_weights=False))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or self._probe is None:
            return
        self._record_training(trainer)
        if self._pending is not None:  # training ended within the warm-up
            pending, self._pending = self._pending, None
            self._evaluate_within_budget(trainer, pl_module, pending)
        step = trainer.global_step
        if step != self.last_step:  # the final weights, always on the schedule
            self._evaluate_within_budget(trainer, pl_module, self._freeze(pl_module, step, copy_weights=False),
                                         final=True)
        training = self.budget.train_seconds
        share = f" ({self.seconds / training:.1%} of {training:.1f}s training)" if training > 0 else ""
        rank_zero_info(
            f"I2FMonitor: {self.evaluations} evaluations at {len(set(self.steps_logged))} steps in "
            f"{self.seconds:.1f}s{share}; {self.reduced} reduced, {self.skipped} skipped"
            + (f" to stay within {self.max_overhead:.0%} overhead" if self.max_overhead is not None else "")
        )

    # -- evaluation -----------------------------------------------------------------------------------
    def _freeze(self, pl_module: pl.LightningModule, step: int, copy_weights: bool) -> _Snapshot:
        network = network_of(pl_module)
        model = analysis_network(pl_module)  # hook-free (a copy already) under DP-SGD
        if copy_weights and model is network:
            model = copy_network(model)
        noise = NoiseModel.of(self.noise_source(pl_module.trainer, pl_module), step, model)
        return _Snapshot(step=step, model=model, noise=noise)

    def _full_plan(self, final: bool = False, model: nn.Module | None = None) -> EvaluationPlan:
        """Every probe, starting with a fresh basis of half ``lanczos_steps`` vectors (it grows to the full
        size over the next warm-started evaluations) — or, once a basis exists, the probes it covers (a reduced
        first evaluation fixes the subset: the same samples every time keep the curve comparable and warm).
        One probe always starts afresh (the plain autograd operator: sequential steps cost what a block does)."""
        x, _ = self._probe
        stored = self._basis
        warm = stored is not None and len(stored) > 1
        probes = len(x) if stored is None else len(stored)
        steps = stored.shape[1] if warm else max(2, self.lanczos_steps // 2)
        exact_possible = x[0].numel() <= EXACT_MAX_DIM
        spectra = self.exact_spectrum_probes if (final or self._is_first_evaluation()) and exact_possible else 0
        spectra = min(spectra, probes)
        calls, vectors = spectrum_products(model, x[0].numel(), spectra) if spectra and model is not None else (0, 0)
        return EvaluationPlan(probes=probes, steps=steps, warm=warm, spectra=spectra,
                              spectrum_products=calls, spectrum_vectors=vectors)

    CALIBRATION_CHAINS = (1, 4)  # vectors per probe of the products that price the vmapped path
    MIN_LANCZOS_STEPS = 2  # the last resort before skipping: one probe, a 2-vector basis (λ_max and a rough trace)
    KEEP_PROBES = 8  # shrink the basis (down to 4 vectors) before evaluating fewer probes than this

    def _final_spectra_reserve(self, model: nn.Module, final: bool) -> float:
        """Seconds held back for the final evaluation's exact spectra (λ_min and the condition number at the
        end of training), priced like any plan's; nothing once at the final evaluation or without spectra."""
        x, _ = self._probe
        count = min(self.exact_spectrum_probes, len(x))
        if final or count == 0 or x[0].numel() > EXACT_MAX_DIM or self.budget.unlimited:
            return 0.0
        calls, vectors = spectrum_products(model, x[0].numel(), count)
        probe = EvaluationPlan(probes=1, steps=1, spectra=count, spectrum_products=calls, spectrum_vectors=vectors)
        extra = self.cost.price(probe) - self.cost.price(replace(probe, spectra=0))
        return extra if math.isfinite(extra) else 0.0

    def _allowance(self, step: int, final: bool) -> float:
        """Seconds this evaluation may take: its share of what is left (all of it for the final one)."""
        return self.budget.left() if final else self.budget.share(step)

    def _batched_worth_pricing(self, single_step: float) -> bool:
        """Whether the vmapped path is cheap enough to price: 8 probes' product, at up to 4× a plain product
        per vector (lenet_zhu: less; resnet18 on CPU: 2.5×), within a quarter of the budget left."""
        return 4 * 8 * single_step <= self.budget.left() / 4

    def _time_batched_products(self, model: nn.Module, device: torch.device, single_step: float) -> None:
        """Price the vmapped path (several probes) on real products of 8 probes × 1 and × 4 vectors — the sizes
        its evaluations use — when the single-probe evaluation just run says it is cheap enough
        (:meth:`_batched_worth_pricing`), the second only if the first predicts it within a quarter of what is
        left. Two sizes separate the fixed and per-vector parts (an overhead-bound model, lenet_zhu on CPU:
        4 vectors cost about 1.3× one); a compute-bound model (resnet18 on CPU) times none and stays on the
        single-probe path."""
        if not self._batched_worth_pricing(single_step):
            return
        x, y = self._probe
        start = time.perf_counter()
        _warm_up_transforms()  # torch.func's one-off set-up, on a two-parameter model: not a price
        probes = min(8, len(x))
        for chains in self.CALIBRATION_CHAINS:
            batched = self.cost.batched
            if batched.known and batched.predict(1, probes * chains) > self.budget.left() / 4:
                break
            seconds = per_sample_product_seconds(model, x[:probes].to(device), y[:probes].to(device), chains)
            batched.observe(1, probes * chains, seconds)
        self._spend(time.perf_counter() - start)

    def _evaluate_within_budget(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: _Snapshot,
                                final: bool = False) -> None:
        full = self._full_plan(final, snapshot.model)
        first: _Done | None = None
        if self._needs_timing():
            # nothing priced yet: the first probe's evaluation is its own price — run through the plain operator,
            # its Lanczos steps stop at what this evaluation's share of the budget allows (a large model's first
            # product is then a step of the evaluation, not a timing thrown away); then the vmapped path is
            # priced if cheap enough to matter
            single = EvaluationPlan(probes=1, steps=full.steps)
            steps_seen: list[float] = []

            def cheap_enough_for_more_probes(steps: int, seconds: float) -> bool:
                # a model this cheap will be evaluated on several probes: stop this one at the minimum
                steps_seen.append(seconds)
                return self._batched_worth_pricing(seconds)

            first = self._run(trainer, pl_module, snapshot, single, self._allowance(snapshot.step, final),
                              stop=cheap_enough_for_more_probes)
            self._cheap = self._batched_worth_pricing(min(steps_seen, default=math.inf))
            self._time_batched_products(snapshot.model, pl_module.device, min(steps_seen, default=math.inf))
        reserve = self._final_spectra_reserve(snapshot.model, final)
        plan = self.budget.plan(snapshot.step, full, self.cost, final=final, min_steps=self.MIN_LANCZOS_STEPS,
                                keep_probes=self.KEEP_PROBES, reserve=reserve)
        if self._basis is not None and len(self._basis) < min(self.KEEP_PROBES, len(self._probe[0])):
            # an earlier evaluation fixed fewer probes than wanted (its budget was estimated from the first
            # steps only): start afresh on more probes as soon as they fit with the evaluations still to come
            more = replace(full, probes=len(self._probe[0]), steps=max(2, self.lanczos_steps // 2), warm=False)
            upgrade = self.budget.plan(snapshot.step, more, self.cost, final=final,
                                       min_steps=self.MIN_LANCZOS_STEPS, keep_probes=self.KEEP_PROBES,
                                       reserve=reserve)
            if upgrade is not None and upgrade.probes > (0 if plan is None else plan.probes):
                plan, full = upgrade, more
        kept = first is not None and self.budget.left() >= 0  # it fit what was left: done work is not thrown away
        if kept and plan is not None and PlanCost.is_single(plan) and plan.steps > first.plan.steps:
            kept = not self._cheap  # stopped early only because more probes looked affordable: a longer run fits
        if kept and (plan is None or (PlanCost.is_single(plan) and not plan.spectra)):
            self._finish(trainer, snapshot, first, full, final)  # the priced probe is this evaluation
            return
        if plan is None:
            self.skipped += 1
            smallest = replace(full, probes=1, steps=self.MIN_LANCZOS_STEPS, warm=False, spectra=0)
            with_final = "" if final else " with the final evaluation's reserved"
            rank_zero_warn(
                f"I2FMonitor: skipped the evaluation of step {snapshot.step}: even one probe with a "
                f"{self.MIN_LANCZOS_STEPS}-vector Lanczos basis is predicted at {self.cost.price(smallest):.2f}s, "
                f"which{with_final} does not fit the {max(self.budget.left(), 0):.2f}s left of "
                f"max_overhead={self.max_overhead:g} × {self.budget.training_estimate() or 0:.1f}s of training. "
                "Raise max_overhead (null: no limit), train longer, or use a GPU."
            )
            return
        allowance = self._allowance(snapshot.step, final) if PlanCost.is_single(plan) else None
        self._finish(trainer, snapshot, self._run(trainer, pl_module, snapshot, plan, allowance), full, final)

    def _note_reduction(self, step: int, done: _Done, full: EvaluationPlan) -> None:
        how = done.plan.reduced_from(full)
        if not how:
            return
        self.reduced += 1
        if how not in self._reductions:
            self._reductions.add(how)
            rank_zero_info(f"I2FMonitor: step {step} evaluated on {how}, to stay within "
                           f"{self.max_overhead:.0%} overhead (later reductions of this kind are counted, "
                           "not repeated here)")

    def _warn_once(self, caught: list[warnings.WarningMessage]) -> None:
        """Pass the engine's warnings on (e.g. an ill-conditioned J falling back to the damped estimate), each
        kind once per run: the same fallback at every evaluation would bury the log."""
        for record in caught:
            if not issubclass(record.category, InfluenceWarning):
                warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
                continue
            kind = f"{record.category.__name__}:{record.filename}:{record.lineno}"
            if kind in self._warned:
                continue
            self._warned.add(kind)
            rank_zero_warn(f"I2FMonitor: {record.message} (warnings of this kind are shown once per run)",
                           category=record.category)

    def _subset(self, plan: EvaluationPlan) -> Tensor:
        """The probes of a (possibly reduced) plan: the first ``plan.probes`` of the fixed probe batch."""
        return torch.arange(min(plan.probes, len(self._probe[0])))

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: _Snapshot, plan: EvaluationPlan,
             max_seconds: float | None = None, stop: Callable[[int, float], bool] | None = None) -> _Done:
        """Measure ``plan`` on the snapshot (timed and charged; the products it really ran priced)."""
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InfluenceWarning)
            report = self.measure(trainer, pl_module, snapshot.step, model=snapshot.model, noise=snapshot.noise,
                                  plan=plan, max_seconds=max_seconds, stop=stop)
        self._warn_once(caught)
        elapsed = time.perf_counter() - start
        self._spend(elapsed)
        done = _Done(report=report, plan=plan, index=self._last_index, seconds=elapsed)
        fit = self._last_fit
        if fit is not None:
            spectra_seconds = fit.spectra_seconds
            core = elapsed - spectra_seconds
            if not fit.warm:  # what was really run: a budgeted fresh basis may have stopped early
                done.plan = replace(plan, steps=fit.products[0])
            if PlanCost.is_single(done.plan):
                self.cost.single.observe(1, fit.products[0], core)
            else:
                self.cost.batched.observe(*fit.products, core)
            if plan.spectra and spectra_seconds > 0:
                self.cost.spectra.observe(1, plan.spectra, spectra_seconds)
        return done

    def _finish(self, trainer: pl.Trainer, snapshot: _Snapshot, done: _Done, full: EvaluationPlan,
                final: bool) -> None:
        """Log an evaluation's report and record it (its logging counts against the budget too)."""
        if done.plan != full:
            self._note_reduction(snapshot.step, done, full)
        start = time.perf_counter()
        report = done.report
        self._last_index = done.index
        media = self.evaluations == 0 or final
        self._log(trainer, report, media=media)
        seconds = time.perf_counter() - start
        self._spend(seconds)
        if not media:  # the routine logging every evaluation pays (tables and images: first and last only)
            self.cost.logging.observe(1, 1, seconds)
        self.last_step = max(self.last_step, snapshot.step)
        self.steps_logged.append(snapshot.step)
        self.history.append({"step": snapshot.step, **report.scalars})
        self.evaluations += 1
        self.last_report = report

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, snapshot: _Snapshot,
                  plan: EvaluationPlan, final: bool = False) -> None:
        self._finish(trainer, snapshot, self._run(trainer, pl_module, snapshot, plan), plan, final)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int,
                model: nn.Module | None = None, noise: NoiseModel | None = None,
                plan: EvaluationPlan | None = None, max_seconds: float | None = None,
                stop: Callable[[int, float], bool] | None = None) -> LeakageReport:
        """The leakage report of the probes at ``step`` (library call; no logging): on ``model`` (default: the
        module's current one) under ``noise`` (default: the defense's at ``step``), as ``plan`` says (default:
        every probe, exact spectra as at a first evaluation); a fresh basis stops growing before a product that
        would end past ``max_seconds``."""
        x, y = self._probe
        device = pl_module.device
        model = network_of(pl_module) if model is None else model
        plan = self._full_plan(final=True, model=model) if plan is None else plan
        index = self._subset(plan)
        self._last_index, self._last_fit = index, None
        xs, ys = x[index].to(device), y[index].to(device)
        defense = self.noise_source(trainer, pl_module)
        common = dict(
            pixel_std=self._sources.pixels.std, damping=self.damping,
            relative_damping=self.relative_damping, exact_spectrum_probes=plan.spectra, worst_k=self.worst_k,
            noise_draws=self.noise_draws, generator=torch.Generator(device=device).manual_seed(self.seed + step),
            noise=noise, target_pixel_rmse=self.target_pixel_rmse,
            clipping_norm=float(getattr(defense, "max_grad_norm", None) or self.clipping_norm),
            batch_size=self._batch_size(trainer, defense),
        )
        if self.method != "lanczos":
            return measure_leakage(model, xs, ys, defense, step, method=self.method, **common)
        stored = self._basis
        warm = plan.warm and stored is not None and len(stored) >= len(index) > 1
        basis = stored[: len(index), : plan.steps] if warm else None  # leading rows: the smaller Krylov basis
        report, fit = monitor_leakage(model, xs, ys, defense, step, basis=basis,
                                      steps=self.lanczos_steps if warm else plan.steps,
                                      max_seconds=max_seconds, min_steps=self.MIN_LANCZOS_STEPS, stop=stop,
                                      **common)
        self._last_fit = fit
        self._keep_basis(fit.basis)
        return report

    def _keep_basis(self, new: Tensor) -> None:
        """Store the basis for the next evaluation: it replaces the stored one when it covers as many probes;
        a reduced evaluation (fewer probes) updates their rows when the sizes agree and otherwise leaves the
        stored basis as it was (an older start for those probes, not a smaller probe set for the rest of the run)."""
        stored = self._basis
        if stored is None or len(new) >= len(stored):
            self._basis = new
        elif new.shape[1:] == stored.shape[1:]:
            self._basis = torch.cat([new, stored[len(new):]])

    @staticmethod
    def _batch_size(trainer: pl.Trainer, defense: Any) -> int | None:
        expected = getattr(defense, "expected_batch_size", None)
        return int(expected) if expected else getattr(trainer.datamodule, "batch_size", None)

    def _log(self, trainer: pl.Trainer, report: LeakageReport, media: bool) -> None:
        log_scalars_at_step(trainer, report.scalars, "leakage", step=report.step)
        if not self.log_per_sample_media or wandb_run(trainer) is None:
            return
        import wandb

        values = report.pixel_rmse.detach().cpu().double().numpy()
        payload: dict[str, Any] = {"leakage/per_sample_histogram": wandb.Histogram(values)}
        if media:  # tables and images are files: first and last evaluation only
            per_class = wandb.Table(columns=["class", "expected_pixel_rmse"],
                                    data=[[c, v] for c, v in sorted(report.per_class.items())])
            x, _ = self._probe
            worst = self._last_index[[i for i, _ in report.worst]]
            images = self._sources.pixels.to_pixels(x[worst].cpu()) if len(worst) else []
            payload.update({
                "leakage/per_class": per_class,
                "leakage/per_class_bar": wandb.plot.bar(per_class, "class", "expected_pixel_rmse",
                                                        title="expected reconstruction RMSE per class"),
                "leakage/worst_samples": [
                    wandb_image(img, caption=f"probe (class {int(report.labels[i])}): rmse {v:.3g}")
                    for img, (i, v) in zip(images, report.worst)
                ],
            })
        log_media(trainer, payload, step=report.step)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step, "evaluations": self.evaluations, "reduced": self.reduced,
                "skipped": self.skipped, "seconds": self.seconds, "steps_logged": list(self.steps_logged),
                "cost": self.cost.state_dict(), "history": list(self.history),
                # the warm-start basis: a resumed run's next evaluation then measures what the uninterrupted
                # run's did (the leakage autopilot sets σ from it)
                "basis": self._basis}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict["last_step"]
        self.evaluations = state_dict["evaluations"]
        self.reduced = state_dict.get("reduced", 0)
        self.skipped = state_dict.get("skipped", 0)
        self.seconds = state_dict.get("seconds", 0.0)
        self.steps_logged = list(state_dict.get("steps_logged", []))
        self.cost.load_state_dict(state_dict.get("cost", {}))
        self.history = list(state_dict.get("history", []))
        self._basis = state_dict.get("basis", self._basis)
