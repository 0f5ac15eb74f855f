"""Where the callbacks find what they measure, in any Lightning project: the probes, the loss, the noise the
training releases, the prior and the pixel scale — from explicit arguments, from an Opacus ``DPOptimizer`` on
the trainer, from this package's own module and datamodule when those are used, or from the probe data.

Pure: no Trainer hooks, no logging, no W&B or Hydra; a trainer and module are only read. Every check raises a
one-line :class:`pl_i2f.errors.ConfigError` naming the argument (``what`` is the caller's name, e.g.
``"I2FMonitor"``).

The noise follows the shared threat model (:mod:`pl_i2f.threat`): under Opacus' DP-SGD one sample's own clipped
gradient carries N(0, σ²C²), so an Opacus run is described as ``SampleNoise(std=σ·C, clip_norm=C)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from pl_i2f.defenses.base import analysis_model, has_opacus_hooks
from pl_i2f.errors import ConfigError
from pl_i2f.gradients import LossFn, default_loss
from pl_i2f.leakage import mean_pixel_std
from pl_i2f.noise_sources import (  # noqa: F401  (re-exported: the callbacks' one place for their sources)
    DefenseNoise,
    NoiseSource,
    OpacusNoise,
    check_noise,
    find_dp_optimizer,
    resolve_noise,
    unwrap_optimizer,
)
from pl_i2f.prior import GaussianPrior, isotropic_prior, value_scale

Probe = tuple[Tensor, Tensor]
ProbeSpec = tuple[Tensor, Tensor] | Dataset | DataLoader
DEFAULT_PROBES = 32  # as many as our datamodules' default probe batch


# -- probes ---------------------------------------------------------------------------------------------
def check_probe(probe: Any, what: str) -> None:
    """At construction: ``probe`` is ``None``, a Dataset/DataLoader, or an ``(x, y)`` pair of tensors with
    one integer label per input (x of at least 2 dims: samples first)."""
    if probe is None or isinstance(probe, (Dataset, DataLoader)):
        return
    if not (isinstance(probe, (tuple, list)) and len(probe) == 2 and all(isinstance(t, Tensor) for t in probe)):
        raise ConfigError(f"{what}.probe must be an (x, y) pair of tensors, a Dataset or a DataLoader, "
                          f"got {type(probe).__name__}")
    x, y = probe
    if x.dim() < 2 or len(x) == 0:
        raise ConfigError(f"{what}.probe: x must be a non-empty batch (samples first), got shape {tuple(x.shape)}")
    if y.dim() != 1 or len(y) != len(x):
        raise ConfigError(f"{what}.probe: y must hold one label per sample ({len(x)}), got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or (len(y) and int(y.min()) < 0):
        raise ConfigError(f"{what}.probe: y must hold class indices >= 0, got {y.dtype} {y[:4].tolist()}")


def _from_dataset(data: Dataset | DataLoader, size: int, seed: int, what: str) -> Probe:
    """``size`` samples of one seeded permutation of the dataset (the first ``size`` of it: the same samples
    in every run with the same seed)."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ConfigError(f"{what}.probe: the dataset is empty")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(size, n)]
    samples = [dataset[int(i)] for i in order]
    try:
        xs = torch.stack([torch.as_tensor(s[0]) for s in samples])
        ys = torch.as_tensor([int(s[1]) for s in samples])
    except (TypeError, IndexError, ValueError) as exc:
        raise ConfigError(f"{what}.probe: dataset items must be (input, label) pairs ({exc})") from exc
    return xs, ys


def resolve_probe(probe: ProbeSpec | None, datamodule: Any, size: int | None, seed: int, what: str) -> Probe:
    """The probe batch: explicit tensors (their first ``size``), a Dataset/DataLoader (``size`` held-out samples,
    default 32, seeded), or the datamodule's ``probe_batch(size)`` (this package's datamodules)."""
    if isinstance(probe, (tuple, list)):
        x, y = probe
        x, y = (x[:size], y[:size]) if size is not None else (x, y)
    elif probe is not None:
        x, y = _from_dataset(probe, size or DEFAULT_PROBES, seed, what)
    elif datamodule is not None and hasattr(datamodule, "probe_batch"):
        x, y = datamodule.probe_batch(size)
    else:
        raise ConfigError(f"{what} needs probes: pass probe=(x, y), a held-out Dataset or DataLoader, or use a "
                          "datamodule with probe_batch()")
    check_probe((x, y), what)
    return x.detach().clone(), y.detach().clone().long()


def network_of(pl_module: nn.Module) -> nn.Module:
    """The network the leakage is measured on: the module's ``model`` attribute when it is one (this package's
    module, Opacus' Lightning example), else the LightningModule itself (its ``forward``)."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def copy_network(network: nn.Module) -> nn.Module:
    """A deep copy of ``network`` with its weights; a LightningModule's trainer is shared, not copied."""
    from pl_i2f.influence.chain import note_copy

    trainer = getattr(network, "_trainer", None)
    clone = copy.deepcopy(network, {} if trainer is None else {id(trainer): trainer})
    note_copy(clone, network)  # the copy and the network share one chain trace and its buffers
    return clone


def analysis_network(pl_module: nn.Module) -> nn.Module:
    """:func:`pl_i2f.defenses.base.analysis_model` of :func:`network_of`: the network, or its hook-free copy when
    Opacus hooks sit on it. A LightningModule that is itself the network (Opacus' example wraps ``self``) is
    copied without its trainer."""
    network = network_of(pl_module)
    if network is not pl_module or not has_opacus_hooks(network) or "_trainer" not in network.__dict__:
        return analysis_model(network)
    trainer = network.__dict__["_trainer"]
    network.__dict__["_trainer"] = None  # not part of the network: the copy must not clone the trainer
    try:
        return analysis_model(network)
    finally:
        network.__dict__["_trainer"] = trainer


def check_labels(pl_module: nn.Module, probe: Probe, what: str) -> Tensor:
    """The network's logits on the probes (eval mode, no gradient); a label outside its classes is an error."""
    x, y = probe
    net = analysis_network(pl_module)
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        with torch.no_grad():
            logits = net(x[:2].to(device))
    finally:
        for m, flag in flags:
            m.training = flag
    if logits.dim() != 2:
        raise ConfigError(f"{what}: the model must return (batch, classes) logits, got shape {tuple(logits.shape)}")
    classes = logits.shape[1]
    if int(y.max()) >= classes:
        raise ConfigError(f"{what}.probe: label {int(y.max())} is out of range for a model with {classes} outputs")
    return logits


# -- loss ----------------------------------------------------------------------------------------------
def resolve_loss(pl_module: Any, loss_fn: LossFn | None) -> LossFn:
    """``loss_fn`` when given; else the module's own (an attribute ``loss_fn`` or ``criterion`` holding a
    callable ``(logits, y) -> scalar``); else mean cross-entropy (what this package's module trains with)."""
    if loss_fn is not None:
        return loss_fn
    for name in ("loss_fn", "criterion"):
        own = getattr(pl_module, name, None)
        if callable(own):
            return own
    return default_loss


def check_loss(loss: LossFn, logits: Tensor, y: Tensor, what: str) -> None:
    """The loss must map (logits, labels) to one finite scalar."""
    try:
        value = loss(logits, y.to(logits.device))
    except Exception as exc:  # any failure of the user's callable is a configuration error here
        raise ConfigError(f"{what}.loss_fn failed on the probe logits: {type(exc).__name__}: {exc}") from exc
    if not isinstance(value, Tensor) or value.numel() != 1 or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ConfigError(f"{what}.loss_fn must return a scalar (reduce over the batch), got {shape}")


def is_cross_entropy(loss: LossFn, logits: Tensor, y: Tensor) -> bool:
    """Whether ``loss`` is mean cross-entropy on these logits and on a perturbed copy of them."""
    if loss is default_loss:
        return True
    shifted = logits + torch.linspace(-1.0, 1.0, logits.numel(), device=logits.device).view_as(logits)
    y = y[: len(logits)].to(logits.device)
    return all(torch.allclose(loss(z, y).double(), default_loss(z, y).double(), rtol=1e-6, atol=1e-8)
               for z in (logits, shifted))


# -- pixels and prior ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PixelScale:
    """Model-input units → [0, 1] pixels: ``std`` scales an input-space error to pixels, ``bounds`` are the valid
    inputs (an attack's box), ``to_pixels`` maps inputs to [0, 1] images."""

    std: float
    lo: Tensor
    hi: Tensor
    datamodule: Any = None

    def bounds(self) -> tuple[Tensor, Tensor]:
        if self.datamodule is not None and hasattr(self.datamodule, "pixel_bounds"):
            return self.datamodule.pixel_bounds()
        return self.lo, self.hi

    def value_scale(self, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """The per-value std (d,) that turns an input-space error into pixels: exact per channel for this
        package's datamodules, ``std`` everywhere otherwise."""
        std = getattr(self.datamodule, "std", None)
        if isinstance(std, (tuple, list)) and std and len(shape) == 3:
            return value_scale(std, shape)
        return torch.full((math.prod(shape),), float(self.std), dtype=torch.float64)

    def to_pixels(self, x: Tensor) -> Tensor:
        if self.datamodule is not None and hasattr(self.datamodule, "denormalize"):
            return self.datamodule.denormalize(x)
        lo, hi = self.lo.to(x), self.hi.to(x)
        return ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)


def check_positive(value: float | None, name: str, what: str) -> None:
    """An optional argument that must be a positive finite number."""
    if value is not None and not (isinstance(value, (int, float)) and 0 < value < math.inf):
        raise ConfigError(f"{what}.{name} must be a positive finite number, got {value!r}")


def resolve_pixels(datamodule: Any, x: Tensor, pixel_std: float | None = None) -> PixelScale:
    """``pixel_std`` when given; else the datamodule's (its per-channel ``std`` averaged, this package's
    datamodules); else the probe data's range taken as [0, 1] pixels (std = 1/(max − min))."""
    lo, hi = x.detach().min().cpu(), x.detach().max().cpu()
    if pixel_std is not None:
        std = float(pixel_std)
    elif isinstance(getattr(datamodule, "std", None), (tuple, list)) and datamodule.std:
        std = mean_pixel_std(datamodule)
    else:
        std = 1.0 / max(float(hi - lo), 1e-12)
    owned = datamodule if hasattr(datamodule, "denormalize") else None
    return PixelScale(std=std, lo=lo, hi=hi, datamodule=owned)


@dataclass(frozen=True)
class DataPrior:
    """A Gaussian prior estimated from data: the per-value ``mean`` (one input's shape) and the mean per-value
    variance ``variance`` (τ²)."""

    mean: Tensor
    variance: float


def data_prior(x: Tensor) -> DataPrior:
    """The prior of the probe data itself (a few samples: a rough τ²; a datamodule's is better)."""
    flat = x.detach().double().flatten(1)
    variance = float(flat.var(dim=0, unbiased=len(flat) > 1).mean()) if len(flat) > 1 else float(flat.var())
    return DataPrior(mean=x.detach().mean(0), variance=variance)


PriorEstimate = Callable[[Tensor], Any]


def resolve_prior(prior: Any, datamodule: Any, x: Tensor, estimate: PriorEstimate = data_prior) -> Any:
    """``prior`` when given (an object, or a callable of the probe inputs); else the datamodule's (its
    ``data_prior()``: this package's, the training inputs' mean and covariance; or ``prior()``); else
    ``estimate(x)`` from the probe data."""
    if prior is not None:
        return prior(x) if callable(prior) and not isinstance(prior, nn.Module) else prior
    for name in ("data_prior", "prior"):
        own = getattr(datamodule, name, None)
        if callable(own):
            return own()
    return estimate(x)


def gaussian_prior(prior: Any, dim: int) -> GaussianPrior:
    """A resolved prior as the :class:`~pl_i2f.calibrated.GaussianPrior` the calibrated estimate takes: itself, a
    :class:`DataPrior` (mean, τ²I), or a number τ² (zero mean)."""
    if isinstance(prior, GaussianPrior):
        return prior
    if isinstance(prior, DataPrior):
        return isotropic_prior(prior.mean.reshape(-1), prior.variance)
    if isinstance(prior, (int, float)):
        return isotropic_prior(0.0, float(prior), dim=dim)
    raise ConfigError(f"prior must be a GaussianPrior, a DataPrior or a variance τ², got {type(prior).__name__}")


# -- everything a callback measures with ------------------------------------------------------------------
@dataclass(frozen=True)
class Sources:
    """What a callback resolved at ``setup``: the probe batch, the loss, the pixel scale and the prior."""

    probe: Probe
    loss: LossFn
    pixels: PixelScale
    prior: Any


def resolve_sources(trainer: Any, pl_module: Any, what: str, *, probe: ProbeSpec | None = None,
                    size: int | None = None, seed: int = 0, loss_fn: LossFn | None = None,
                    pixel_std: float | None = None, prior: Any = None,
                    estimate_prior: PriorEstimate = data_prior) -> Sources:
    """Resolve and check a callback's probes, loss, pixel scale and prior (see the functions above). The loss
    must be mean cross-entropy (or equal to it): the leakage estimate differentiates that loss."""
    datamodule = getattr(trainer, "datamodule", None)
    x, y = resolve_probe(probe, datamodule, size, seed, what)
    logits = check_labels(pl_module, (x, y), what)
    loss = resolve_loss(pl_module, loss_fn)
    check_loss(loss, logits, y[: len(logits)], what)
    if not is_cross_entropy(loss, logits, y):
        raise ConfigError(f"{what}.loss_fn: the leakage estimate differentiates mean cross-entropy, and this loss "
                          "differs from it on the probes")
    return Sources(probe=(x, y), loss=loss, pixels=resolve_pixels(datamodule, x, pixel_std),
                   prior=resolve_prior(prior, datamodule, x, estimate_prior))


@dataclass(frozen=True)
class SourceOptions:
    """A callback's drop-in arguments, checked at construction (one line naming the argument); :meth:`sources`
    resolves them at ``setup``, :meth:`noise` at each evaluation. ``what`` names the callback in errors."""

    what: str
    probe: ProbeSpec | None = None
    loss_fn: LossFn | None = None
    noise_std: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    pixel_std: float | None = None
    prior: Any = None

    def __post_init__(self) -> None:
        check_probe(self.probe, self.what)
        check_noise(self.noise_std, self.noise_multiplier, self.max_grad_norm, self.what)
        check_positive(self.pixel_std, "pixel_std", self.what)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ConfigError(f"{self.what}.loss_fn must be a callable (logits, labels) -> scalar, "
                              f"got {self.loss_fn!r}")

    def sources(self, trainer: Any, pl_module: Any, size: int | None, seed: int) -> Sources:
        return resolve_sources(trainer, pl_module, self.what, probe=self.probe, size=size, seed=seed,
                               loss_fn=self.loss_fn, pixel_std=self.pixel_std, prior=self.prior)

    def noise(self, trainer: Any, pl_module: Any, *, batch_of_one: bool = False) -> NoiseSource:
        return resolve_noise(pl_module, trainer, self.noise_std, self.noise_multiplier, self.max_grad_norm,
                             batch_of_one=batch_of_one)
