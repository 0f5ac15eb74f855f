"""The ``Defense`` contract: one object that perturbs training **and** describes what it releases.

"What the attacker sees" is defined once, here: :meth:`Defense.release` is the gradient an honest-but-curious
server observes for a batch at a given step. Training applies the same transformation
(:meth:`Defense.perturb_gradients_` on the model's ``.grad`` between backward and the optimizer step, or, for
DP-SGD, Opacus' ``DPOptimizer`` whose noise level the defense sets each step), and the leakage estimator
draws the defense's own noise through :meth:`Defense.noise_sampler`.

What callers rely on (the leakage monitor, the attack audit, tests):

* ``release(model, x, y, step=0, generator=None)`` → flat θ-vector g = T_t(x, y) ordered like
  ``parameters_to_vector`` of the trainable parameters (the gradient, clipped/pruned/noised as at step t);
* ``noise_sampler(step, model=None)`` → ``None`` (no noise) or a callable ``sampler(generator) -> δ``
  drawing one flat θ-vector exactly as the defense adds it to the *averaged* gradient at step t;
* ``noise_std(step)`` → the per-coordinate std when that noise is isotropic Gaussian, else ``None`` (lets
  the estimator use its exact isotropic path).

RNG discipline: training noise comes from the defense's own ``torch.Generator`` (seeded by ``seed``; its
state is saved in checkpoints); analysis calls draw only from the generator they are given (a fixed-seed
one when ``None``), never from the global RNG.

Models carrying Opacus per-sample-gradient hooks (DP-SGD training with ``wrap_model=False``) break
``torch.func``; every analysis call therefore runs on :func:`analysis_model`, a hook-free copy with the
current weights (the model itself when it carries no hooks).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pl_i2f.errors import ConfigError
from pl_i2f.gradients import flat_gradient
from pl_i2f.rng import analysis_generator
from pl_i2f.threat import NoiseSampler as NoiseSampler  # re-exported: defenses name it

if TYPE_CHECKING:
    from pl_i2f.threat import SampleNoise


# Attributes Opacus' GradSampleHooks leave on modules and parameters (see opacus/grad_sample).
_OPACUS_MODULE_ATTRS = ("autograd_grad_sample_hooks", "activations", "ft_compute_sample_grad")
_OPACUS_PARAM_ATTRS = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample")
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def has_opacus_hooks(model: nn.Module) -> bool:
    """Whether Opacus' per-sample-gradient hooks are attached to ``model`` (or a submodule)."""
    return any(hasattr(m, "autograd_grad_sample_hooks") for m in model.modules())


def analysis_model(model: nn.Module) -> nn.Module:
    """``model`` itself, or — when it carries Opacus hooks — a hook-free deep copy with the same weights.

    ``torch.func`` transforms fail on Opacus' forward/backward hooks, and analysis must not feed activations
    into the training hooks either. The copy is made without copying the hooks (their dicts are mapped to
    empty ones) nor Opacus' per-parameter buffers (``grad_sample`` …), so it is cheap and exact.
    """
    if not has_opacus_hooks(model):
        return model
    memo: dict[int, Any] = {}
    for m in model.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(m, attr, None)
            if hooks is not None:
                memo[id(hooks)] = OrderedDict() if isinstance(hooks, OrderedDict) else type(hooks)()
        for attr in _OPACUS_MODULE_ATTRS:
            if attr in m.__dict__:
                memo[id(m.__dict__[attr])] = None
    for p in model.parameters():
        for attr in _OPACUS_PARAM_ATTRS:
            value = p.__dict__.get(attr)
            if value is not None:
                memo[id(value)] = None
    clone = copy.deepcopy(model, memo)
    for m in clone.modules():
        for attr in _OPACUS_MODULE_ATTRS:
            m.__dict__.pop(attr, None)
    for p in clone.parameters():
        for attr in _OPACUS_PARAM_ATTRS:
            p.__dict__.pop(attr, None)
        p.grad = None
    from pl_i2f.influence.chain import note_copy  # (deferred: the engine imports the defenses' helpers)

    note_copy(clone, model)  # the next copy's chain is this one's, bound by name: no trace per evaluation
    return clone


def trainable_sizes(model: nn.Module) -> list[int]:
    """Number of scalars of each trainable parameter, in ``model.parameters()`` order."""
    return [p.numel() for p in model.parameters() if p.requires_grad]


def check_sigma(value: float | None, what: str) -> None:
    """One-line error for a negative or non-finite noise level."""
    if value is not None and not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{what} must be a finite number >= 0, got {value}")


def check_clip(value: float | None, what: str) -> None:
    """One-line error for a clipping norm that is not a positive finite number."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{what} must be a positive finite number (or null for no clipping), got {value}")


def run_length(module: Any, datamodule: Any | None) -> tuple[int | None, int | None]:
    """(optimizer steps per epoch, total optimizer steps) of the run being set up, or ``None`` where the
    trainer does not fix it (no trainer, no datamodule, unbounded epochs)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None or datamodule is None or not hasattr(datamodule, "train_set"):
        return None, None
    from pl_i2f.data import steps_per_epoch

    batches = steps_per_epoch(datamodule)
    limit = trainer.limit_train_batches
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif limit is not None:
        batches = max(1, int(batches * float(limit)))
    per_epoch = max(1, batches // max(1, int(trainer.accumulate_grad_batches or 1)))
    if trainer.max_steps is not None and trainer.max_steps > 0:
        total = int(trainer.max_steps)
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            total = min(total, per_epoch * int(trainer.max_epochs))
        return per_epoch, total
    if trainer.max_epochs is None or trainer.max_epochs < 0:
        return per_epoch, None
    return per_epoch, per_epoch * int(trainer.max_epochs)


class Defense:
    """No defense: the clean averaged gradient is released. Base class of every defense.

    Subclasses change :meth:`transform` (how a clean averaged gradient becomes the released one) and, when
    they add noise, :meth:`noise_sampler`; training and analysis then agree by construction. DP-SGD, whose
    clipping needs per-sample gradients, overrides :meth:`release` and :meth:`configure_optimizer` instead.
    """

    name = "none"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._pending_generator_state: Tensor | None = None
        self._sizes: list[int] | None = None
        self._model_ref: nn.Module | None = None
        self.steps_per_epoch: int | None = None
        self.total_steps: int | None = None
        self.batch_size: int | None = None

    # -- training side ---------------------------------------------------------------------------
    def setup(self, module: Any, datamodule: Any | None) -> None:
        """Called from ``LightningModule.setup`` (every stage; must be idempotent), before optimizers are
        configured and before a checkpoint's state is loaded. Records the parameter layout and run length."""
        model = getattr(module, "model", module)
        self._model_ref = model
        self._sizes = trainable_sizes(model)
        self.batch_size = getattr(datamodule, "batch_size", None)  # B: noise σ on the mean is Bσ on a sample
        spe, total = run_length(module, datamodule)
        if spe is not None:
            self.steps_per_epoch, self.total_steps = spe, total

    def configure_optimizer(self, module: Any, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Return the optimizer training should use (DP-SGD wraps it; others return it unchanged)."""
        return optimizer

    def transform(self, gradient: Tensor, step: int, generator: torch.Generator | None = None,
                  sizes: Sequence[int] | None = None) -> Tensor:
        """Map the clean averaged gradient (flat θ-vector) to the released one at ``step``. ``sizes`` are
        the per-parameter lengths of the flat vector (needed by per-layer operations)."""
        return gradient

    def perturb_gradients_(self, model: nn.Module, step: int) -> None:
        """Training hook between backward and the optimizer step: apply :meth:`transform` in place to the
        ``.grad`` of the trainable parameters, with noise from the defense's own generator."""
        params = [p for p in model.parameters() if p.requires_grad]
        if not params or any(p.grad is None for p in params) or type(self).transform is Defense.transform:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        released = self.transform(flat, step, self.training_generator(flat.device), [p.numel() for p in params])
        torch.nn.utils.vector_to_parameters(released, [p.grad for p in params])

    def training_generator(self, device: torch.device | str) -> torch.Generator:
        """The defense's own generator for training noise, on ``device`` (created on first use from
        ``seed``, or from the state a checkpoint restored)."""
        device = torch.device(device)
        if self._generator is None or self._generator.device.type != device.type:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
            if self._pending_generator_state is not None:
                self._generator.set_state(self._pending_generator_state.clone())
                self._pending_generator_state = None
        return self._generator

    def metrics(self, step: int) -> dict[str, float]:
        """Scalars describing optimizer step ``step`` (the one just taken), e.g. ``defense/sigma``."""
        return {}

    def epoch_metrics(self) -> dict[str, float]:
        """Scalars to log at the end of every training epoch and of training (``privacy/epsilon``)."""
        return {}

    # -- analysis side ---------------------------------------------------------------------------
    def release(self, model: nn.Module, x: Tensor, y: Tensor, step: int = 0,
                generator: torch.Generator | None = None) -> Tensor:
        """The gradient an attacker observes for batch ``(x, y)`` at ``step``: T_t(∇_θ L(x, y)), a flat
        θ-vector ordered like ``parameters_to_vector(model.parameters())`` (trainable parameters), computed
        in eval mode on a hook-free view of ``model`` (see :func:`analysis_model`)."""
        net = analysis_model(model)
        g = flat_gradient(net, x, y)
        return self.transform(g, step, analysis_generator(generator), trainable_sizes(net))

    def noise_sampler(self, step: int, model: nn.Module | None = None) -> NoiseSampler | None:
        """A callable ``sampler(generator) -> δ`` drawing one perturbation (flat θ-vector) as the defense
        adds it to the averaged gradient at ``step``; ``None`` when the defense adds no noise. ``model`` gives
        the parameter layout when the defense was not set up for training."""
        return None

    def noise_std(self, step: int) -> float | None:
        """Per-coordinate std of the added noise when it is isotropic Gaussian N(0, σ²I), else ``None``."""
        return 0.0 if self.noise_sampler(step) is None else None

    def sample_noise(self, step: int, model: nn.Module | None = None, *, batch_size: int | None = None,
                     batch_of_one: bool = False) -> SampleNoise:
        """The noise on one sample's own gradient at ``step`` under the shared threat model
        (:mod:`pl_i2f.threat`); none for a defense that adds no noise."""
        from pl_i2f.threat import SampleNoise  # threat imports this module

        return SampleNoise(source=self.name, batch_of_one=batch_of_one)

    def _sample_batch(self, batch_size: int | None, batch_of_one: bool) -> int:
        """B relative to which noise on the mean gradient protects one sample (1 with ``batch_of_one``)."""
        if batch_of_one:
            return 1
        b = batch_size if batch_size is not None else self.batch_size
        if b is None:
            raise ConfigError(f"defense {self.name!r}: the training batch size is unknown; pass batch_size= (or "
                              "batch_of_one=True for a single sample's gradient)")
        if b < 1:
            raise ConfigError(f"batch_size must be >= 1, got {b}")
        return int(b)

    def describe(self) -> dict[str, Any]:
        """Parameters for the run's config and threat model."""
        return {"name": self.name}

    # -- helpers ---------------------------------------------------------------------------------
    def _layout(self, model: nn.Module | None) -> list[int]:
        if model is not None:
            return trainable_sizes(model)
        if self._sizes is None:
            raise ValueError(f"defense {self.name!r} does not know the parameter layout yet: pass model= "
                             "(or set it up for training first)")
        return list(self._sizes)

    def _like(self, model: nn.Module | None) -> Tensor:
        net = model if model is not None else self._model_ref
        p = next((q for q in net.parameters() if q.requires_grad), None) if net is not None else None
        return torch.empty(0) if p is None else torch.empty(0, dtype=p.dtype, device=p.device)

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must carry to resume the defense exactly (generator state, accountant …)."""
        state: dict[str, Any] = {"name": self.name}
        schedule = getattr(self, "schedule", None)
        if hasattr(schedule, "state_dict"):  # an adaptive noise schedule (leakage_target): its σ history
            state["schedule"] = schedule.state_dict()
        if self._generator is not None:
            state["generator"] = self._generator.get_state()
        elif self._pending_generator_state is not None:
            state["generator"] = self._pending_generator_state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (called before optimizers are configured)."""
        if state.get("name", self.name) != self.name:
            raise ConfigError(f"checkpoint was trained with defense {state.get('name')!r}, not {self.name!r}")
        schedule = getattr(self, "schedule", None)
        if "schedule" in state and hasattr(schedule, "load_state_dict"):
            schedule.load_state_dict(state["schedule"])
        if "generator" in state:
            gen_state = torch.as_tensor(state["generator"]).cpu()
            if self._generator is not None:
                self._generator.set_state(gen_state)
            else:
                self._pending_generator_state = gen_state
