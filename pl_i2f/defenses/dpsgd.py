"""``dpsgd``: DP-SGD with Opacus (Abadi et al. 2016), made a Lightning-friendly :class:`Defense`.

Mechanism at step t on a Poisson-sampled batch (each training sample joins independently with rate q):

    g = ( Σᵢ clip_C(∇θ ℓ(xᵢ)) + z ) / B,   clip_C(v) = v · min(1, C / (‖v‖ + 1e-6)),   z ~ N(0, σ_t² C² I)

with C = ``max_grad_norm``, σ_t = σ₀ · f(t) the noise multiplier from the noise schedule and B Opacus'
*expected* batch size (q·N, truncated). The noise on the averaged gradient is therefore N(0, (σ_t C / B)² I):
that is what :meth:`DPSGDDefense.noise_sampler` draws and what :meth:`DPSGDDefense.release` adds.

Training: ``PrivacyEngine.make_private(..., wrap_model=False)`` inside ``configure_optimizers`` attaches
Opacus' per-sample-gradient hooks to the LightningModule's network and wraps its optimizer in a
``DPOptimizer`` (clipping + noise + accountant hook). The datamodule's ``train_dataloader`` returns Opacus'
``DPDataLoader`` (``data.poisson_sampling``, switched on in :meth:`DPSGDDefense.setup`). Before every step
the defense sets ``optimizer.noise_multiplier = σ_t``, and Opacus' accountant records the σ actually used, so
ε (``privacy/epsilon``, logged every epoch and at the end) follows the schedule. σ₀ is either given
(``noise_multiplier``) or calibrated from ``target_epsilon`` for the planned number of steps (Opacus'
``get_noise_multiplier`` for a constant schedule; for other schedules a bisection on σ₀ over Opacus'
accountant replaying the schedule).

``noise_shape=anisotropic`` keeps the isotropic N(0, σ_t²C²I) (so every direction's std is ≥ σ_t C and the
reported ε stays valid: adding independent, data-independent noise is post-processing) and adds extra
noise along directions from a public reference batch (see :mod:`pl_i2f.defenses.anisotropic`), through a
``DPOptimizer`` subclass overriding ``add_noise`` injected via ``PrivacyEngine._prepare_optimizer``.

Pitfalls handled: Lightning's ``gradient_clip_val`` (clips the already-summed ``.grad`` that Opacus
overwrites) and ``accumulate_grad_batches > 1`` (breaks Opacus' per-step accounting) are rejected;
BatchNorm is replaced by ``ModuleValidator.fix`` when ``fix_model=true`` and otherwise rejected naming the
layers; re-entering ``configure_optimizers`` removes the previous hooks before attaching new ones; analysis
runs on a hook-free copy of the network (``torch.func`` fails on hooked modules).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pl_i2f.defenses.anisotropic import AnisotropicNoise
from pl_i2f.defenses.base import (
    Defense,
    NoiseSampler,
    analysis_generator,
    analysis_model,
    check_clip,
    check_sigma,
    trainable_sizes,
)
from pl_i2f.defenses.schedules import NoiseSchedule
from pl_i2f.errors import ConfigError, unknown_name
from pl_i2f.gradients import per_sample_gradients
from pl_i2f.privacy import (
    DEFAULT_RECONSTRUCTION_BASELINE,
    calibrate_noise_multiplier,
    check_baseline,
    epsilon_of_history,
    reconstruction_bound_from_history,
)
from pl_i2f.registry import ACCOUNTANTS as ACCOUNTANTS
from pl_i2f.registry import NOISE_SHAPES as NOISE_SHAPES

if TYPE_CHECKING:
    from pl_i2f.threat import SampleNoise


def opacus_noise(sizes: list[int], shapes: list[torch.Size] | None, std: float, generator: torch.Generator,
                 like: Tensor) -> Tensor:
    """Gaussian noise drawn exactly as ``DPOptimizer.add_noise`` does: one ``torch.normal(0, std, p.shape)``
    per parameter, in parameter order, from ``generator`` — so the same seed gives the same noise."""
    if std == 0:
        return torch.zeros(sum(sizes), dtype=like.dtype, device=like.device)
    shapes = shapes or [torch.Size([n]) for n in sizes]
    draws = [torch.normal(mean=0.0, std=std, size=tuple(s), generator=generator, device=generator.device,
                          dtype=like.dtype).reshape(-1) for s in shapes]
    return torch.cat(draws).to(like.device)


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _dp_optimizer_class(base: type) -> type:
    """A subclass of Opacus' optimizer class ``base`` whose ``add_noise`` adds the anisotropic extra."""

    class AnisotropicDPOptimizer(base):  # type: ignore[misc, valid-type]
        """Opacus ``add_noise`` (isotropic N(0, σ²C²) per coordinate of the clipped sum) plus
        σ C · (anisotropic extra) along the defense's directions, from the same generator."""

        anisotropic: AnisotropicNoise | None = None

        def add_noise(self) -> None:
            super().add_noise()
            if self.anisotropic is None or self.noise_multiplier == 0:
                return
            params = list(self.params)
            like = params[0].grad
            extra = self.anisotropic.extra(self.generator or torch.Generator(device=like.device), like)
            extra = extra * (self.noise_multiplier * self.max_grad_norm)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = p.grad + extra[offset: offset + n].view_as(p.grad)
                offset += n

    return AnisotropicDPOptimizer


def privacy_engine(accountant: str, anisotropic: AnisotropicNoise | None) -> Any:
    """Opacus' ``PrivacyEngine`` with an ``accountant`` (``rdp``/``prv``) whose ``_prepare_optimizer`` injects the
    anisotropic ``DPOptimizer`` subclass when ``anisotropic`` is given."""
    from opacus import PrivacyEngine

    class Engine(PrivacyEngine):
        def _prepare_optimizer(self, **kwargs: Any) -> Any:
            optimizer = super()._prepare_optimizer(**kwargs)
            if anisotropic is None:
                return optimizer
            optimizer.__class__ = _dp_optimizer_class(type(optimizer))
            optimizer.anisotropic = anisotropic
            return optimizer

    with warnings.catch_warnings():  # "secure RNG turned off": by design, the run is seeded
        warnings.simplefilter("ignore")
        return Engine(accountant=accountant, secure_mode=False)


class DPSGDDefense(Defense):
    """Opacus DP-SGD; see the module docstring for the mechanism and what is released."""

    name = "dpsgd"

    def __init__(
        self,
        noise_multiplier: float | None = 1.0,
        max_grad_norm: float = 1.0,
        delta: float = 1e-5,
        target_epsilon: float | None = None,
        accountant: str = "rdp",
        poisson_sampling: bool = True,
        fix_model: bool = False,
        noise_shape: str = "isotropic",
        anisotropic: Mapping[str, Any] | None = None,
        schedule: NoiseSchedule | Mapping[str, Any] | str | None = None,
        expected_batch_size: int | None = None,
        reconstruction_baseline: float = DEFAULT_RECONSTRUCTION_BASELINE,
        seed: int = 0,
    ):
        super().__init__(seed=seed)
        if target_epsilon is not None:
            if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
                raise ConfigError(f"defense.target_epsilon must be a positive finite number, got {target_epsilon}")
        elif noise_multiplier is None:
            raise ConfigError("defense=dpsgd needs defense.noise_multiplier or defense.target_epsilon")
        check_sigma(noise_multiplier, "defense.noise_multiplier")
        check_clip(max_grad_norm, "defense.max_grad_norm (DP-SGD per-sample clipping norm)")
        if max_grad_norm is None:
            raise ConfigError("defense.max_grad_norm must be set for DP-SGD (per-sample clipping bounds sensitivity)")
        if not (0 < delta < 1):
            raise ConfigError(f"defense.delta must be in (0, 1), got {delta}")
        if accountant not in ACCOUNTANTS:
            raise unknown_name("privacy accountant", accountant, ACCOUNTANTS)
        if noise_shape not in NOISE_SHAPES:
            raise unknown_name("DP-SGD noise shape", noise_shape, NOISE_SHAPES)
        if expected_batch_size is not None and expected_batch_size < 1:
            raise ConfigError(f"defense.expected_batch_size must be >= 1, got {expected_batch_size}")
        self.noise_multiplier = None if noise_multiplier is None else float(noise_multiplier)
        self.target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self.max_grad_norm = float(max_grad_norm)
        self.delta = float(delta)
        self.accountant = accountant
        self.poisson_sampling = bool(poisson_sampling)
        self.fix_model = bool(fix_model)
        self.noise_shape = noise_shape
        self.schedule = NoiseSchedule.from_config(schedule)
        if getattr(self.schedule, "adaptive", False) and self.target_epsilon is not None:
            raise ConfigError("noise_schedule=leakage_target sets σ from measured leakage, so defense.target_epsilon "
                              "cannot calibrate it; give defense.noise_multiplier and cap ε with "
                              "noise_schedule.target_epsilon")
        self.expected_batch_size = expected_batch_size
        self.reconstruction_baseline = check_baseline(reconstruction_baseline)
        self.sample_rate: float | None = None
        self.anisotropic = AnisotropicNoise(**(anisotropic or {})) if noise_shape == "anisotropic" else None
        self.engine = privacy_engine(accountant, self.anisotropic)
        self._hooks: Any = None
        self._optimizer: Any = None
        self._datamodule: Any = None
        self._shapes: list[torch.Size] | None = None
        self._calibrated: float | None = None  # σ₀ found for target_epsilon (saved in checkpoints)
        self._validated = False  # ModuleValidator ran (setup is called once per stage)

    # -- training ----------------------------------------------------------------------------------
    def setup(self, module: Any, datamodule: Any | None) -> None:
        trainer = getattr(module, "_trainer", None)
        if trainer is not None:
            clip = trainer.gradient_clip_val
            if clip not in (None, 0, 0.0):
                raise ConfigError(f"defense=dpsgd clips each sample's gradient inside Opacus; unset "
                                  f"trainer.gradient_clip_val (got {clip}) and use defense.max_grad_norm")
            if int(trainer.accumulate_grad_batches or 1) > 1:
                raise ConfigError("defense=dpsgd does not support trainer.accumulate_grad_batches > 1 (Opacus "
                                  "accounts one Poisson batch per step); raise data.batch_size instead")
        model = getattr(module, "model", None)
        if isinstance(model, nn.Module) and not self._validated:
            module.model = self._validate(model)
            self._validated = True
        super().setup(module, datamodule)
        self._shapes = [p.shape for p in module.model.parameters() if p.requires_grad] if model is not None else None
        self.schedule = self.schedule.bind(total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                                           base=self.noise_multiplier)
        if datamodule is not None:
            self._datamodule = datamodule
            if self.poisson_sampling:
                if not hasattr(datamodule, "poisson_sampling"):
                    raise ConfigError(f"defense=dpsgd needs a datamodule with Poisson sampling; "
                                      f"{type(datamodule).__name__} has none")
                datamodule.poisson_sampling = True
        if self.anisotropic is not None and datamodule is not None:
            self.anisotropic.set_reference_from(datamodule)

    def _validate(self, model: nn.Module) -> nn.Module:
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model, strict=False)
        if not errors:
            return model
        if self.fix_model:
            fixed = ModuleValidator.fix(model)
            remaining = ModuleValidator.validate(fixed, strict=False)
            if remaining:
                raise ConfigError(f"defense=dpsgd: Opacus cannot fix the model: {remaining[0]}")
            return fixed
        bad = [name or type(m).__name__ for name, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        what = f"BatchNorm layers {', '.join(bad)}" if bad else str(errors[0]).splitlines()[0]
        raise ConfigError(f"defense=dpsgd: the model has layers DP-SGD cannot train per sample ({what}); set "
                          "defense.fix_model=true to let Opacus replace them (BatchNorm → GroupNorm)")

    def configure_optimizer(self, module: Any, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        model: nn.Module = module.model
        if self._hooks is not None:  # re-entered (a second fit, LR finder …): never hook the model twice
            self._hooks.cleanup()
            self._hooks = None
        if self._datamodule is None:
            raise ConfigError("defense=dpsgd needs the trainer's datamodule (Poisson sampling, sample rate)")
        loader = self._datamodule.train_dataloader()
        sample_rate = 1.0 / len(loader)  # what make_private (and so the accountant) uses
        base = self.base_noise_multiplier(sample_rate)
        like = next(p for p in model.parameters() if p.requires_grad)
        step = int(getattr(module, "global_step", 0) or 0)
        hooks, dp_optimizer, _ = self.engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.schedule(base, step),
            max_grad_norm=self.max_grad_norm,
            poisson_sampling=False,  # the datamodule already returns Opacus' DPDataLoader
            noise_generator=self.training_generator(like.device),
            wrap_model=False,
            grad_sample_mode="hooks",
        )
        hooks.forbid_grad_accumulation()  # what make_private does under Poisson sampling
        self.expected_batch_size = int(dp_optimizer.expected_batch_size)  # of the global batch
        world_size = _world_size()
        if world_size > 1:
            # Opacus' distributed recipe (make_private only detects it on a DDP-wrapped module; Lightning wraps
            # the LightningModule): each rank clips its share of the Poisson batch, rank 0 adds the noise, the
            # clipped sums are all-reduced, and the accountant steps once per global batch at rate q.
            dp_optimizer = self.engine._prepare_optimizer(
                optimizer=dp_optimizer.original_optimizer, noise_multiplier=dp_optimizer.noise_multiplier,
                max_grad_norm=self.max_grad_norm, expected_batch_size=self.expected_batch_size / world_size,
                noise_generator=self.training_generator(like.device), distributed=True, grad_sample_mode="hooks")
            dp_optimizer.attach_step_hook(self.engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        self._hooks, self._optimizer = hooks, dp_optimizer
        self.sample_rate = sample_rate
        if not self.poisson_sampling:
            warnings.warn("defense.poisson_sampling=false: ε assumes Poisson sampling and is only approximate",
                          stacklevel=2)
        return dp_optimizer

    def base_noise_multiplier(self, sample_rate: float | None = None) -> float:
        """σ₀: the configured noise multiplier, or the one calibrated (once) for ``target_epsilon``."""
        if self.noise_multiplier is not None and self.target_epsilon is None:
            return self.noise_multiplier
        if self._calibrated is None:
            q = sample_rate if sample_rate is not None else self.sample_rate
            if q is None or self.total_steps is None:
                raise ConfigError("defense.target_epsilon needs a run of known length (trainer.max_epochs or "
                                  "max_steps) and a datamodule")
            self._calibrated = calibrate_noise_multiplier(self.target_epsilon, self.delta, q, self.total_steps,
                                                          self.schedule, self.accountant)
        return float(self._calibrated)

    def sigma_at(self, step: int) -> float:
        """σ_t, the noise multiplier at ``step``."""
        return self.schedule(self.base_noise_multiplier(), step)

    def perturb_gradients_(self, model: nn.Module, step: int) -> None:
        """Opacus clips and noises inside ``optimizer.step``; here only set σ_t (and refresh directions)."""
        if self._optimizer is None:
            return
        self._optimizer.noise_multiplier = self.sigma_at(step)
        if self.anisotropic is not None:
            self.anisotropic.maybe_refresh(analysis_model(model), step)

    def epsilon(self) -> float:
        """ε spent so far at ``delta`` (Opacus accountant over the recorded (σ_t, q) history)."""
        return epsilon_of_history(self.engine.accountant.history, self.delta, self.accountant)

    def metrics(self, step: int) -> dict[str, float]:
        return {"defense/sigma": self.sigma_at(step)}

    def reconstruction_bound(self) -> float:
        """Bound on any reconstruction attack's success so far (Hayes et al. 2023, μ-GDP view of the recorded
        (σ_t, q) history; :mod:`pl_i2f.privacy`), for an attack whose baseline success is
        ``reconstruction_baseline``."""
        return reconstruction_bound_from_history(self.engine.accountant.history, self.reconstruction_baseline,
                                                 poisson=self.poisson_sampling)

    def epoch_metrics(self) -> dict[str, float]:
        return {"privacy/epsilon": self.epsilon(), "privacy/reconstruction_bound": self.reconstruction_bound()}

    # -- analysis ----------------------------------------------------------------------------------
    def _batch_size(self, fallback: int | None) -> int:
        if self.expected_batch_size is not None:
            return int(self.expected_batch_size)
        if fallback is None:
            raise ValueError("DP-SGD's expected batch size is unknown: set defense.expected_batch_size or set "
                             "the defense up for training first")
        return int(fallback)

    def _noise(self, step: int, model: nn.Module | None, generator: torch.Generator, batch_size: int) -> Tensor:
        """z / B with z drawn like Opacus (plus the anisotropic extra), on the averaged gradient."""
        sizes = self._layout(model)
        shapes = [p.shape for p in model.parameters() if p.requires_grad] if model is not None else self._shapes
        like = self._like(model)
        sigma = self.sigma_at(step)
        z = opacus_noise(sizes, shapes, sigma * self.max_grad_norm, generator, like)
        if self.anisotropic is not None and sigma > 0:
            z = z + sigma * self.max_grad_norm * self.anisotropic.extra(generator, like)
        return z / batch_size

    def release(self, model: nn.Module, x: Tensor, y: Tensor, step: int = 0,
                generator: torch.Generator | None = None) -> Tensor:
        """(Σᵢ clip_C(∇θℓ(xᵢ)) + z) / B exactly as Opacus' optimizer forms it (same clipping formula, same
        per-parameter noise draws from ``generator``), with per-sample gradients in eval mode on a hook-free
        copy. B is the training run's expected batch size (``len(x)`` if the defense never trained)."""
        net = analysis_model(model)
        per_sample = per_sample_gradients(net, x, y)
        norms = per_sample.norm(dim=1)
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        summed = factors @ per_sample
        noise = self._noise(step, net, analysis_generator(generator), 1)
        return (summed + noise) / self._batch_size(len(x))

    def noise_sampler(self, step: int, model: nn.Module | None = None,
                      batch_size: int | None = None) -> NoiseSampler | None:
        """Draws z/B, z ~ N(0, σ_t²C² I) (+ anisotropic extra): DP-SGD's noise on the averaged gradient at the
        current σ_t, B the expected batch size (``batch_size`` overrides it)."""
        if self.sigma_at(step) == 0:
            return None
        b = batch_size if batch_size is not None else self._batch_size(None)
        net = analysis_model(model) if model is not None else None
        return lambda generator: self._noise(step, net, generator, b)

    def noise_std(self, step: int) -> float | None:
        if self.anisotropic is not None:
            return None
        return self.sigma_at(step) * self.max_grad_norm / self._batch_size(None)

    def sample_noise(self, step: int, model: nn.Module | None = None, *, batch_size: int | None = None,
                     batch_of_one: bool = False) -> SampleNoise:
        """clip_C(gᵢ) + N(0, σ_t²C²I) (+ the anisotropic extra) on one sample's own gradient: the view ε takes,
        independent of the batch size (``batch_size`` and ``batch_of_one`` change nothing here)."""
        from pl_i2f.threat import SampleNoise

        std = self.sigma_at(step) * self.max_grad_norm
        if self.anisotropic is None or std == 0:
            return SampleNoise(std=std, clip_norm=self.max_grad_norm, source=self.name, batch_of_one=batch_of_one)
        if self.anisotropic.vectors is None:
            if model is None:
                raise ValueError("anisotropic noise has no directions yet: pass model= or call refresh(model)")
            self.anisotropic.ensure_directions(analysis_model(model), step)
        _, basis, extra = self.anisotropic.covariance(std, self.anisotropic.dp_extra_energy)
        return SampleNoise(std=std, clip_norm=self.max_grad_norm, basis=basis, extra_variance=extra,
                           source=self.name, batch_of_one=batch_of_one)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "noise_multiplier": self.noise_multiplier, "target_epsilon": self.target_epsilon,
            "max_grad_norm": self.max_grad_norm, "delta": self.delta, "accountant": self.accountant,
            "poisson_sampling": self.poisson_sampling, "noise_shape": self.noise_shape,
            "schedule": self.schedule.describe(), "reconstruction_baseline": self.reconstruction_baseline,
            "seed": self.seed,
        }
        if self.anisotropic is not None:
            out["anisotropic"] = self.anisotropic.describe()
        return out

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["accountant"] = dict(self.engine.accountant.state_dict())
        state["calibrated_noise_multiplier"] = self._calibrated
        if self.anisotropic is not None:
            state["anisotropic"] = self.anisotropic.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "accountant" in state:
            self.engine.accountant.load_state_dict(state["accountant"])
        if state.get("calibrated_noise_multiplier") is not None:
            self._calibrated = float(state["calibrated_noise_multiplier"])
        if self.anisotropic is not None and "anisotropic" in state:
            self.anisotropic.load_state_dict(state["anisotropic"])


__all__ = ["DPSGDDefense", "calibrate_noise_multiplier", "opacus_noise", "trainable_sizes"]
