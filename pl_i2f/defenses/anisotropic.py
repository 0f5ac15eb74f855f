"""``anisotropic``: Gaussian noise shaped by the spectrum of J = ∂²L/∂x∂θ on a public reference batch.

Why (I²F, ``DESIGN.md``): with J = U S Vᵀ, noise of size α along a right singular vector vᵢ moves an L2
gradient-matching attacker's reconstruction by α·sᵢ/(sᵢ² + ε) (α/sᵢ undamped), while noise in the null space
of J moves it not at all. Isotropic noise N(0, σ²I) spends most of its energy σ²d_θ in that null space
(J has rank ≤ d_x ≪ d_θ). Shaping the same energy into J's row space — and, within it, toward the directions
that move the reconstruction most — raises the attacker's expected error at equal noise energy.

The private batch's J is unknown to the defender, so the directions come from a **public reference batch**
(validation samples disjoint from the leakage probe, by default): its right singular vectors vᵢ and singular
values sᵢ = √λᵢ, recomputed with the I²F engine every ``refresh_every`` steps at the current weights.

Noise (per unit σ; the defense multiplies by σ_t from the schedule):

    δ = √(1 − f) · z  +  √(f · d_θ) · Σᵢ √wᵢ ζᵢ vᵢ ,     z ~ N(0, I_θ),  ζ ~ N(0, I_k),  Σᵢ wᵢ = 1

so E‖δ‖² = (1 − f)·d_θ + f·d_θ = d_θ: exactly the energy of the ``gaussian`` defense with the same σ.

Choices (options) and rationale:

* ``span_fraction`` f (default 1.0): the share of the energy placed in the reference row space. A held-out
  sample's row space overlaps the reference one only partly; whatever stays isotropic still protects
  directions the reference batch does not span. 1.0 maximises the measured gain; lower it for robustness
  when the reference batch is small or unlike the private data.
* weights wᵢ ∝ gᵢ^``power``, gᵢ = λᵢ/(λᵢ + ε)²: the reference batch's expected I²F per unit noise energy
  along vᵢ (1/λᵢ undamped — "toward small eigenvalues"). ``power`` = 1 (default) spends energy in
  proportion to that gain rather than all of it on the argmax (optimal for the reference batch alone, but
  those few near-null directions are specific to the reference images and transfer poorly); ``power`` = 0
  is uniform over the span. ε must match the damping of the estimator/attacker being defended against: it
  is ``damping`` (absolute, the estimator's ε) + ``relative_damping``·λ_max, and ``relative_damping=null``
  means the I²F engine's own "undamped" fallback rcond·λ_max (rcond = d_x · machine epsilon). At equal energy
  the gain-matched weights beat both uniform weights over the span and ``power`` 0.5, and mismatched damping
  can do worse than uniform: match it to the estimator (measurements: ``benchmarks/results/defenses.md``).
* ``directions`` k: keep the k smallest (``which=smallest``) or largest eigen-directions; ``null`` keeps
  every numerically nonzero one (λᵢ > ``rcond``·λ_max). Dense (explicit Jᵀ, d_x products) when the
  reference batch has d_x ≤ ``dense_max_dim``, else Lanczos — both the engine's ``influence.row_space``.

Used on its own (``defense=anisotropic``, not DP) and as the extra noise of ``dpsgd.noise_shape=anisotropic``,
where the isotropic σC floor is kept and the directions get ``dp_extra_energy``·d_θ (per unit σC) on top.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from pl_i2f.defenses.base import Defense, NoiseSampler, analysis_model
from pl_i2f.defenses.gaussian import NoisyDefense, clip_norm
from pl_i2f.defenses.schedules import NoiseSchedule
from pl_i2f.errors import ConfigError, check_options, unknown_name
from pl_i2f.rng import randn

if TYPE_CHECKING:
    from pl_i2f.threat import SampleNoise

WHICH = ("smallest", "largest")
FLOAT64_BASIS_NUMBERS = 1 << 25  # largest direction set kept as a float64 copy for the leakage estimate


def reference_row_space(model: nn.Module, x: Tensor, y: Tensor, *, dense_max_dim: int = 2048,
                        k: int | None = None, which: str = "smallest", rcond: float = 1e-10,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Eigenvalues λᵢ of JJᵀ (ascending) and the θ-space right singular vectors vᵢ = Jᵀuᵢ/√λᵢ (rows) of the
    reference batch's J, keeping λᵢ > rcond·λ_max, then the k ``which`` ones: the I²F engine's
    :func:`~pl_i2f.influence.row_space` (dense for d_x ≤ ``dense_max_dim``, else Lanczos, which needs k)."""
    from pl_i2f import influence

    op = influence.GradientJacobian(analysis_model(model), x, y)
    if op.d_x > dense_max_dim and k is None:
        raise ConfigError(f"anisotropic.directions must be set when the reference batch has d_x={op.d_x} > "
                          f"dense_max_dim={dense_max_dim} (Lanczos finds k directions)")
    return influence.row_space(op, k, which, rcond=rcond, dense_max_dim=dense_max_dim, generator=generator)


class AnisotropicNoise:
    """The directions (state) and the shaped noise; shared by ``anisotropic`` and DP-SGD's anisotropic mode.
    See the module docstring for the distribution and the meaning of each option."""

    def __init__(
        self,
        directions: int | None = None,
        which: str = "smallest",
        power: float = 1.0,
        damping: float = 0.0,
        relative_damping: float | None = None,
        span_fraction: float = 1.0,
        refresh_every: int = 100,
        reference_size: int = 8,
        reference: str = "val",
        dense_max_dim: int = 2048,
        rcond: float = 1e-10,
        dp_extra_energy: float = 1.0,
    ):
        if directions is not None and directions < 1:
            raise ConfigError(f"anisotropic.directions must be >= 1 (or null for all), got {directions}")
        if which not in WHICH:
            raise unknown_name("anisotropic.which", which, WHICH)
        if not (power >= 0 and math.isfinite(power)):
            raise ConfigError(f"anisotropic.power must be a finite number >= 0, got {power}")
        if not (damping >= 0 and math.isfinite(damping)):
            raise ConfigError(f"anisotropic.damping must be a finite number >= 0, got {damping}")
        if relative_damping is not None and not (relative_damping >= 0 and math.isfinite(relative_damping)):
            raise ConfigError(f"anisotropic.relative_damping must be a finite number >= 0, got {relative_damping}")
        if not (0 <= span_fraction <= 1):
            raise ConfigError(f"anisotropic.span_fraction must be in [0, 1], got {span_fraction}")
        if refresh_every < 1:
            raise ConfigError(f"anisotropic.refresh_every must be >= 1, got {refresh_every}")
        if reference_size < 1:
            raise ConfigError(f"anisotropic.reference_size must be >= 1, got {reference_size}")
        if reference not in ("val",):
            raise unknown_name("anisotropic.reference source", reference, ("val",))
        if not (dp_extra_energy >= 0 and math.isfinite(dp_extra_energy)):
            raise ConfigError(f"anisotropic.dp_extra_energy must be a finite number >= 0, got {dp_extra_energy}")
        self.directions = directions
        self.which = which
        self.power = float(power)
        self.damping = float(damping)
        self.relative_damping = None if relative_damping is None else float(relative_damping)
        self.span_fraction = float(span_fraction)
        self.refresh_every = int(refresh_every)
        self.reference_size = int(reference_size)
        self.reference = reference
        self.dense_max_dim = int(dense_max_dim)
        self.rcond = float(rcond)
        self.dp_extra_energy = float(dp_extra_energy)
        self.x_ref: Tensor | None = None
        self.y_ref: Tensor | None = None
        self.eigenvalues: Tensor | None = None  # λᵢ of the reference JJᵀ, ascending
        self.vectors: Tensor | None = None  # (k, d_θ) orthonormal rows
        self._basis64: Tensor | None = None  # their float64 transpose, for the leakage estimate (see covariance)
        self.weights: Tensor | None = None  # wᵢ, sum 1
        self.refreshed_at: int | None = None
        # the model's weights at the last refresh (on the CPU): the checkpoint carries these (d_θ values)
        # instead of the k × d_θ directions, which a resume rebuilds from them bit for bit
        self.refresh_weights: dict[str, Tensor] | None = None

    # -- reference batch and directions ----------------------------------------------------------
    def set_reference(self, x: Tensor, y: Tensor) -> None:
        """Use ``(x, y)`` as the public reference batch."""
        self.x_ref, self.y_ref = x.detach().clone(), y.detach().clone()

    def set_reference_from(self, datamodule: Any) -> None:
        """The ``reference_size`` validation samples right after the leakage probe in the datamodule's fixed
        probe order: public (held-out from training) and disjoint from the probe batch the monitor analyses."""
        if self.x_ref is not None:
            return
        if not hasattr(datamodule, "probe_batch"):
            raise ConfigError(f"anisotropic noise needs a reference batch; {type(datamodule).__name__} has no "
                              "probe_batch()")
        probe = int(getattr(datamodule, "probe_size", 0))
        x, y = datamodule.probe_batch(probe + self.reference_size)
        self.set_reference(x[probe:], y[probe:])

    def refresh(self, model: nn.Module, step: int = 0) -> None:
        """Recompute the directions and weights on the reference batch at the model's current weights."""
        if self.x_ref is None or self.y_ref is None:
            raise ValueError("anisotropic noise has no reference batch: call set_reference(x, y) first")
        self._directions(model)
        self.refresh_weights = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}
        self.refreshed_at = int(step)

    def _directions(self, model: nn.Module) -> None:
        """λᵢ, vᵢ and wᵢ on the reference batch at ``model``'s weights (deterministic: same weights, same bits)."""
        device = next(model.parameters()).device
        lam, v = reference_row_space(model, self.x_ref.to(device), self.y_ref.to(device),
                                     dense_max_dim=self.dense_max_dim, k=self.directions, which=self.which,
                                     rcond=self.rcond)
        self.eigenvalues, self.vectors, self._basis64 = lam, v, None
        eps = self.effective_damping(float(lam.max()), self.x_ref.numel(), v.dtype)
        self.weights = self._weights(lam, eps)

    def rebuild(self, model: nn.Module) -> bool:
        """After loading a checkpoint: recompute the directions of the last refresh on a copy of ``model`` holding
        that refresh's weights. False when there is nothing to rebuild from (no refresh yet)."""
        if self.vectors is not None:
            return True
        if self.refresh_weights is None or self.x_ref is None:
            return False
        at_refresh = copy.deepcopy(analysis_model(model))
        at_refresh.load_state_dict(self.refresh_weights)
        self._directions(at_refresh)
        return True

    def effective_damping(self, lam_max: float, d_x: int, dtype: torch.dtype) -> float:
        """ε used in the weights: ``damping`` + ``relative_damping``·λ_max, where ``relative_damping=None`` means
        the I²F engine's own undamped fallback rcond = d_x·(machine epsilon of dtype) (numpy's rank threshold),
        so that "undamped" means the same thing here and in ``influence.expected_i2f``."""
        from pl_i2f.influence.settings import default_rcond

        rel = self.relative_damping if self.relative_damping is not None else default_rcond(d_x, dtype)
        return self.damping + rel * lam_max

    def _weights(self, lam: Tensor, eps: float) -> Tensor:
        """wᵢ ∝ gᵢ^power, gᵢ = λᵢ / (λᵢ + ε)² — the reference batch's expected I²F per unit noise energy along vᵢ
        (1/λᵢ undamped) — normalised to sum 1 (in float64: λ spans many decades)."""
        lam = lam.double()
        w = (lam / (lam + eps).pow(2)).pow(self.power)
        return (w / w.sum()).float()

    def ensure_directions(self, model: nn.Module, step: int) -> None:
        """Directions in force for an analysis at ``step``: those of the last refresh (rebuilt after a resume),
        else a refresh now. Every "no directions yet" path goes through here, so a resumed run never refreshes
        off its schedule (which would change the noise of the steps that follow)."""
        if not self.rebuild(model):
            self.refresh(model, step)

    def maybe_refresh(self, model: nn.Module, step: int) -> None:
        """Refresh when entering a new ``refresh_every`` window (a pure function of the step, so a resumed
        run refreshes at the same steps; the checkpoint carries the directions in between)."""
        window = step // self.refresh_every
        if self.refreshed_at is None or self.refreshed_at // self.refresh_every != window:
            self.refresh(model, step)
        else:
            self.ensure_directions(model, step)

    # -- noise -------------------------------------------------------------------------------------
    def _span_part(self, generator: torch.Generator, like: Tensor) -> Tensor:
        """Σᵢ √wᵢ ζᵢ vᵢ (energy 1 in expectation)."""
        if self.vectors is None or self.weights is None:
            raise ValueError("anisotropic noise has no directions yet: call refresh(model) first")
        v = self.vectors.to(like.device, like.dtype)
        zeta = randn(v.shape[0], generator, like)
        return (zeta * self.weights.to(like.device, like.dtype).sqrt()) @ v

    def shaped(self, generator: torch.Generator, like: Tensor) -> Tensor:
        """One draw of δ/σ: √(1−f) z + √(f d_θ) Σᵢ √wᵢ ζᵢ vᵢ, with E‖δ/σ‖² = d_θ."""
        d = self.vectors.shape[1] if self.vectors is not None else 0
        out = math.sqrt(self.span_fraction * d) * self._span_part(generator, like)
        if self.span_fraction < 1:
            out = out + math.sqrt(1 - self.span_fraction) * randn(d, generator, like)
        return out

    def extra(self, generator: torch.Generator, like: Tensor) -> Tensor:
        """DP-SGD's extra noise per unit σC: √(dp_extra_energy · d_θ) Σᵢ √wᵢ ζᵢ vᵢ (on top of the isotropic
        floor, which already gives every direction std ≥ σC)."""
        if self.dp_extra_energy == 0:
            return torch.zeros(self.vectors.shape[1] if self.vectors is not None else 0, dtype=like.dtype,
                               device=like.device)
        d = self.vectors.shape[1] if self.vectors is not None else 0
        return math.sqrt(self.dp_extra_energy * d) * self._span_part(generator, like)

    def covariance(self, std: float, energy: float | None = None) -> tuple[float, Tensor, Tensor]:
        """The covariance of ``std`` · :meth:`shaped` (``energy`` None) or of ``std`` · :meth:`extra` (``energy`` =
        ``dp_extra_energy``, no isotropic part) as (isotropic std, basis d_θ × k, extra variances k):
        std²[(1−f)I + f·d_θ·V W Vᵀ] → (std√(1−f), Vᵀ, std² f d_θ w), resp. (0, Vᵀ, std² e d_θ w)."""
        if self.vectors is None or self.weights is None:
            raise ValueError("anisotropic noise has no directions yet: call refresh(model) first")
        d = self.vectors.shape[1]
        w = self.weights.double()
        basis = self._float64_basis()
        if energy is None:
            return std * math.sqrt(1 - self.span_fraction), basis, std ** 2 * self.span_fraction * d * w
        return 0.0, basis, std ** 2 * energy * d * w

    def _float64_basis(self) -> Tensor:
        """Vᵀ for the leakage estimate, which works in float64: converted once per refresh (not at every
        evaluation) while the copy stays under FLOAT64_BASIS_NUMBERS numbers, else the directions themselves."""
        if self.vectors.numel() > FLOAT64_BASIS_NUMBERS:
            return self.vectors.T
        if self._basis64 is None:
            self._basis64 = self.vectors.T.to(torch.float64)
        return self._basis64

    def describe(self) -> dict[str, Any]:
        return {"directions": self.directions, "which": self.which, "power": self.power, "damping": self.damping,
                "relative_damping": self.relative_damping,
                "span_fraction": self.span_fraction, "refresh_every": self.refresh_every,
                "reference_size": self.reference_size, "reference": self.reference,
                "dp_extra_energy": self.dp_extra_energy,
                "kept_directions": None if self.vectors is None else int(self.vectors.shape[0])}

    def state_dict(self) -> dict[str, Any]:
        """The reference batch, the step of the last refresh and the model's weights then — not the directions
        (k × d_θ: 64 MB for lenet_zhu on 8 digits), which :meth:`rebuild` recomputes from them."""
        return {"x_ref": self.x_ref, "y_ref": self.y_ref, "refreshed_at": self.refreshed_at,
                "refresh_weights": self.refresh_weights}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.eigenvalues = self.vectors = self.weights = self._basis64 = None  # rebuilt from refresh_weights
        # checkpoints written before the directions were rebuilt on resume still carry them: used as they are
        for key in ("x_ref", "y_ref", "eigenvalues", "vectors", "weights", "refreshed_at", "refresh_weights"):
            if key in state:
                setattr(self, key, state[key])


class AnisotropicDefense(NoisyDefense):
    """Optional clipping of the averaged gradient, then σ_t · (anisotropic noise of energy d_θ); same σ and
    schedule semantics as ``gaussian``, so E‖δ‖² is identical. Options of the shape: see
    :class:`AnisotropicNoise` (passed as keyword arguments)."""

    name = "anisotropic"

    def __init__(self, sigma: float = 0.01, clip: float | None = None,
                 schedule: NoiseSchedule | Mapping[str, Any] | str | None = None, seed: int = 0, **shape: Any):
        super().__init__(sigma=sigma, clip=clip, schedule=schedule, seed=seed)
        check_options(AnisotropicNoise, shape, "defense 'anisotropic'")
        self.noise = AnisotropicNoise(**shape)

    def setup(self, module: Any, datamodule: Any | None) -> None:
        super().setup(module, datamodule)
        if datamodule is not None:
            self.noise.set_reference_from(datamodule)

    def refresh(self, model: nn.Module, x: Tensor | None = None, y: Tensor | None = None, step: int = 0) -> None:
        """(Re)compute the directions on ``model`` — on the reference batch ``(x, y)`` if given."""
        if x is not None and y is not None:
            self.noise.set_reference(x, y)
        self.noise.refresh(model, step)

    def perturb_gradients_(self, model: nn.Module, step: int) -> None:
        if self.sigma_at(step) > 0:
            self.noise.maybe_refresh(model, step)
        super().perturb_gradients_(model, step)

    def transform(self, gradient: Tensor, step: int, generator: torch.Generator | None = None,
                  sizes: Sequence[int] | None = None) -> Tensor:
        g = clip_norm(gradient, self.clip)
        sigma = self.sigma_at(step)
        if sigma == 0:
            return g
        gen = generator if generator is not None else self.training_generator(gradient.device)
        return g + sigma * self.noise.shaped(gen, g)

    def noise_sampler(self, step: int, model: nn.Module | None = None) -> NoiseSampler | None:
        """Draws σ_t · δ with the directions currently in force (refreshed on ``model`` if none yet)."""
        sigma = self.sigma_at(step)
        if sigma == 0:
            return None
        if self.noise.vectors is None:
            if model is None:
                raise ValueError("anisotropic noise has no directions yet: pass model= or call refresh(model)")
            self.noise.ensure_directions(model, step)
        like = self._like(model)
        noise = copy.copy(self.noise)  # a snapshot: a later refresh (new tensors) does not change this sampler
        return lambda generator: sigma * noise.shaped(generator, like)

    def noise_std(self, step: int) -> float | None:
        return 0.0 if self.sigma_at(step) == 0 else None

    def sample_noise(self, step: int, model: nn.Module | None = None, *, batch_size: int | None = None,
                     batch_of_one: bool = False) -> SampleNoise:
        """Bσ_t · (shaped noise) on one sample's gradient (B the batch, 1 with ``batch_of_one``), in closed form:
        (Bσ_t)²[(1−f)I + f·d_θ·V W Vᵀ] as isotropic std + basis + extra variances (batch-level clip: see
        :meth:`GaussianDefense.sample_noise`)."""
        from pl_i2f.threat import SampleNoise

        b = self._sample_batch(batch_size, batch_of_one)
        sigma = b * self.sigma_at(step)
        if sigma == 0:
            return SampleNoise(source=self.name, batch_of_one=batch_of_one)
        if self.noise.vectors is None:
            if model is None:
                raise ValueError("anisotropic noise has no directions yet: pass model= or call refresh(model)")
            self.noise.ensure_directions(model, step)
        std, basis, extra = self.noise.covariance(sigma)
        return SampleNoise(std=std, basis=basis, extra_variance=extra, source=self.name, batch_of_one=batch_of_one)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.noise.describe()}

    def state_dict(self) -> dict[str, Any]:
        return {**Defense.state_dict(self), "anisotropic": self.noise.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        Defense.load_state_dict(self, state)
        if "anisotropic" in state:
            self.noise.load_state_dict(state["anisotropic"])
