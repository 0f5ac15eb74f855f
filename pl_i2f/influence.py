"""The I²F engine: the operator J = ∂²L/∂x∂θ, its spectrum, the Inversion Influence Function and the
expected reconstruction error under a defense's noise (Zhang et al., NeurIPS 2023, arXiv 2309.13016).

Notation (``DESIGN.md``): a private batch x₀ is one vector of d_x = B·C·H·W numbers, θ are the d_θ trainable
parameters, L(x, θ) the loss (mean cross-entropy with the true labels unless ``loss_fn`` is given) evaluated
**as in eval mode**. J is d_x × d_θ:

* ``J δ``  = ∂/∂x ⟨∇_θL(x), δ⟩ (θ-space → x-space): a vector-Jacobian product of x ↦ ∇_θL(x);
* ``Jᵀ b`` = d/dt ∇_θL(x + t b) = ∂/∂θ ⟨∇ₓL(x), b⟩ (x-space → θ-space), by symmetry of the mixed partials:
  a vector-Jacobian product of θ ↦ ∇ₓL. Single vectors go through one recorded graph of both first
  derivatives; batches of vectors use ``vmap`` over ``torch.func`` (``jvp`` over ``grad`` for Jᵀ);
* ``JJᵀ`` is d_x × d_x, so every eigen-problem is solved on the **input side** (same nonzero spectrum as
  JᵀJ, which is d_θ × d_θ).

I²F(δ) = (JJᵀ + εI)⁻¹ J δ is the first-order shift of an L2 gradient-matching attacker's reconstruction when
the released gradient is g₀ + δ, so ‖I²F(δ)‖ estimates the attacker's reconstruction error. With the
eigen-decomposition JJᵀ = Σ λᵢ uᵢuᵢᵀ (J = U S Vᵀ, sᵢ = √λᵢ) and M = (JJᵀ + εI)⁻¹ J:

* bounds: ‖Jδ‖ / (λ_max + ε) ≤ ‖I²F(δ)‖ ≤ ‖Jδ‖ / (λ_min + ε) (the paper plots the lower one with ε = 0);
* isotropic noise δ ~ N(0, σ² I_θ): E‖I²F(δ)‖² = σ² tr(M Mᵀ) = σ² tr((JJᵀ+εI)⁻¹ JJᵀ (JJᵀ+εI)⁻¹)
  = σ² Σᵢ λᵢ / (λᵢ + ε)², which is σ² Σᵢ 1/λᵢ when ε = 0 (and the sum runs over the nonzero λᵢ only: the
  null space of JJᵀ receives nothing from Jδ);
* E‖Jδ‖² = σ² tr(JJᵀ) = σ² Σᵢ λᵢ, so the "expected lower bound" reported here is √E‖Jδ‖² / (λ_max + ε);
* any other noise (DP-SGD, anisotropic, pruning residuals) enters as a sampler and is averaged by Monte Carlo.

Everything is matrix-free over autograd / ``torch.func`` products, built on :mod:`pl_i2f.gradients` (so the
loss, the parameter order and the eval-mode convention are those of the rest of the library). Lanczos (with full
reorthogonalisation) and conjugate gradients are written here, batched over leading dimensions, so one
implementation serves a batch operator, several probe vectors and per-sample (``vmap``) operators alike.

Nothing here changes the model: no ``.grad`` is written, no buffer is updated, the ``training`` flags are
restored, and randomness comes from an explicit ``torch.Generator`` (a fixed-seed one by default), never
from the global RNG.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from pl_i2f.gradients import (
    LossFn,
    ParamDict,
    as_flat,
    batch_loss_fn,
    eval_mode,
    flatten,
    trainable_parameters,
)

__all__ = [
    "ConvergenceWarning",
    "ExpectedI2F",
    "GradientJacobian",
    "I2FResult",
    "InfluenceWarning",
    "NoiseSampler",
    "PerSampleLeakage",
    "Spectrum",
    "expected_i2f",
    "gram_matrix",
    "i2f",
    "i2f_lower_bound",
    "i2f_upper_bound",
    "per_sample_leakage",
    "per_sample_product_seconds",
    "right_singular_vectors",
    "spectrum",
    "top_eigenvalue",
]

ThetaVector = Tensor | Mapping[str, Tensor] | Sequence[Tensor]
NoiseSampler = Callable[[torch.Generator], ThetaVector]
"""Draws the defense's perturbation δ: called as ``sampler(generator)``, returns one θ-space vector (flat,
ordered like ``parameters_to_vector`` of the trainable parameters, or a name → tensor dict) or a batch of
draws as an (s, d_θ) tensor. It must draw only from the generator it is given."""


class InfluenceWarning(UserWarning):
    """JJᵀ is rank-deficient or too ill-conditioned for the requested (undamped) computation."""


class ConvergenceWarning(InfluenceWarning):
    """An iterative solver (Lanczos, CG, stochastic Lanczos quadrature) stopped before its tolerance."""


# --- the operator ---------------------------------------------------------------------------------


class _Linearised:
    """The mixed second derivatives of L at (x₀, θ), as one recorded autograd graph that every product
    re-traverses.

    One backward pass with ``create_graph=True`` gives both first derivatives, g = ∇_θL and gₓ = ∇ₓL, with
    their graphs. J = ∂²L/∂x∂θ is the mixed block of the Hessian of L, so (symmetry of mixed partials)

    * J δ  = ∂⟨g, δ⟩/∂x  — one backward pass through g's graph;
    * Jᵀ b = ∂⟨gₓ, b⟩/∂θ — one backward pass through gₓ's graph ("double vjp" with the roles of x and θ
      swapped). This is the transpose the paper's code uses (inside its θ-side product); it needs only second
      derivatives, like J δ, and shares the recorded forward/backward with it.

    Why not ``torch.func`` for single vectors: a ``torch.func.vjp`` closure back-propagates with
    ``create_graph=True`` on every call (so it can be transformed again), recording a graph it never uses,
    and ``jvp`` over ``grad`` re-runs the forward and backward passes (primal *and* tangent) for every Jᵀ b.
    (A ``torch.func.vjp`` *of that vjp closure* is worse still: 5.4 s per Jᵀ b on resnet18, against 0.53 s
    for jvp over grad and ~0.25 s here, since it differentiates through the graph the closure records.)
    Measured on lenet_zhu (32 digits, 1 thread): JJᵀ b 24-28 → 13-15 ms, building the graph 6-7 ms.
    For several vectors at once the vmapped torch.func products are faster and are kept
    (``GradientJacobian.*_batch``). Entries of a gradient that do not depend on the other variable (an unused
    parameter, a structurally zero block) contribute zero rows/columns and are skipped.
    """

    def __init__(self, loss: Callable[[ParamDict, Tensor, Tensor], Tensor], params: ParamDict, x: Tensor,
                 y: Tensor):
        self.shapes = [p.shape for p in params.values()]
        self.sizes = [p.numel() for p in params.values()]
        with torch.enable_grad():
            # Fresh leaves: the model's parameters are never marked, and no .grad is ever written
            # (``torch.autograd.grad`` only returns gradients).
            self.x = x.detach().requires_grad_(True)
            self.leaves = [p.detach().requires_grad_(True) for p in params.values()]
            value = loss(dict(zip(params, self.leaves)), self.x, y)
            *grads, gx = torch.autograd.grad(value, [*self.leaves, self.x], create_graph=True, allow_unused=True,
                                             materialize_grads=True)
        self.g0 = flatten([g.detach() for g in grads])
        self.live = [i for i, g in enumerate(grads) if g.requires_grad]  # the entries with a graph (to x)
        self.g = [grads[i] for i in self.live]
        self.gx = gx if gx.requires_grad else None

    def matvec(self, delta: Tensor) -> Tensor:
        """J δ for a flat δ (d_θ,) → x-shaped."""
        if not self.g:
            return torch.zeros_like(self.x)
        pieces = delta.split(self.sizes)
        cot = [pieces[i].view(self.shapes[i]) for i in self.live]
        out = torch.autograd.grad(self.g, self.x, cot, retain_graph=True, allow_unused=True)[0]
        return torch.zeros_like(self.x) if out is None else out

    def _rmatvec_parts(self, b: Tensor) -> list[Tensor | None]:
        if self.gx is None:
            return [None] * len(self.sizes)
        return list(torch.autograd.grad(self.gx, self.leaves, b, retain_graph=True, allow_unused=True))

    def rmatvec(self, b: Tensor) -> Tensor:
        """Jᵀ b for an x-shaped b → flat (d_θ,)."""
        parts = self._rmatvec_parts(b)
        return torch.cat([b.new_zeros(n) if t is None else t.reshape(n) for t, n in zip(parts, self.sizes)])

    def gram(self, b: Tensor) -> Tensor:
        """JJᵀ b for an x-shaped b, passing Jᵀ b between the two passes per parameter, never as one flat vector
        (on resnet18, flattening the 11 M-entry Jᵀ b and splitting it again made the product 0.53 s, not 0.37 s)."""
        if not self.g:
            return torch.zeros_like(self.x)
        parts = self._rmatvec_parts(b)
        cot = [torch.zeros(self.shapes[i], dtype=b.dtype, device=b.device) if parts[i] is None else parts[i]
               for i in self.live]
        out = torch.autograd.grad(self.g, self.x, cot, retain_graph=True, allow_unused=True)[0]
        return torch.zeros_like(self.x) if out is None else out


class GradientJacobian:
    """J = ∂²L/∂x∂θ (d_x × d_θ) of ``model`` at the batch ``(x, y)``, as products only.

    The model is evaluated functionally (``torch.func.functional_call``) with detached parameters and
    buffers, as if in eval mode; the model itself is never changed. The operator is a snapshot: if the
    model's parameters or buffers are modified in place afterwards (an optimizer step, a BatchNorm update),
    every product raises ``RuntimeError`` — build a new operator.

    x-space vectors have the shape of ``x`` (a flat d_x vector is accepted too); θ-space vectors are flat
    tensors ordered like ``torch.nn.utils.parameters_to_vector`` over the trainable parameters, or a
    name → tensor dict. Everything runs in the dtype and on the device of the model's parameters.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn | None = None):
        params = trainable_parameters(model)
        if not params:
            raise ValueError("the model has no trainable parameters: J is empty")
        ref = next(iter(params.values()))
        if not ref.is_floating_point():
            raise TypeError(f"trainable parameters must be floating point, got {ref.dtype}")
        if not isinstance(x, Tensor) or x.dim() < 1 or x.numel() == 0:
            raise ValueError("x must be a non-empty batch tensor shaped (B, ...)")
        if not isinstance(y, Tensor) or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must be a tensor with one entry per sample: x has {x.shape[0]}, y has shape "
                             f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
        self.model = model
        self.dtype = ref.dtype
        self.device = ref.device
        self.x = x.detach().to(device=self.device, dtype=self.dtype)
        self.y = y.detach().to(self.device, dtype=self.dtype if y.is_floating_point() else y.dtype)
        self.loss_fn = loss_fn
        self._params: ParamDict = params
        self._loss = batch_loss_fn(model, loss_fn)
        # Detached tensors share their version counter with the originals: an in-place update of the model
        # after this point is detected (the cached graph below would otherwise be silently stale).
        self._watched = [*params.values(), *(b.detach() for b in model.buffers())]
        self._versions = [t._version for t in self._watched]
        self.x_shape: tuple[int, ...] = tuple(self.x.shape)
        self.d_x = self.x.numel()
        self.d_theta = sum(p.numel() for p in params.values())
        self._lin: _Linearised | None = None
        self._vjp_fn: Callable | None = None  # torch.func's closure, for the vmapped (batched) J δ only
        # How Jᵀ b is computed: "vjp" (∂⟨∇ₓL, b⟩/∂θ through the cached graph, the fast default) or "jvp"
        # (``jvp`` over ``grad``, a fallback should the former raise). Fixed on first use.
        self._transpose = "vjp"
        self._transpose_tried = False

    # -- internals -------------------------------------------------------------------------------
    def _check_fresh(self) -> None:
        if any(t._version != v for t, v in zip(self._watched, self._versions)):
            raise RuntimeError(
                "the model's parameters or buffers changed in place since this GradientJacobian was built; "
                "build a new operator for the current model"
            )

    def _grad_of_x(self, x: Tensor) -> Tensor:
        """x ↦ ∇_θ L(x, θ) as a flat vector (the map whose Jacobian is Jᵀ)."""
        return flatten(grad(self._loss)(self._params, x, self.y))

    def _linearised(self) -> _Linearised:
        # The first backward pass (with its graph) is shared by every product: built once, on first use.
        if self._lin is None:
            with eval_mode(self.model):
                self._lin = _Linearised(self._loss, self._params, self.x, self.y)
        return self._lin

    def _reverse(self) -> Callable:
        # Batched J δ: ``vmap`` over torch.func's vjp closure beats autograd's ``is_grads_batched`` on the cached
        # graph (~2x at k = 32 on lenet_zhu) and a loop of single products (4.3 vs 8 ms per vector at k = 4..16).
        # Built once, on first batched use.
        if self._vjp_fn is None:
            with eval_mode(self.model):
                self._vjp_fn = vjp(self._grad_of_x, self.x)[1]
        return self._vjp_fn

    def _rmatvec(self, b: Tensor) -> Tensor:
        lin = self._linearised()
        if self._transpose == "vjp":
            if self._transpose_tried:
                return lin.rmatvec(b)
            try:
                out = lin.rmatvec(b)
            except (RuntimeError, NotImplementedError):
                # Defensive: should the recorded graph fail for Jᵀ b (an op whose double-backward formula is
                # incomplete), forward-over-reverse needs forward-mode formulas instead. Decided once per operator.
                self._transpose = "jvp"
            else:
                self._transpose_tried = True
                return out
        self._transpose_tried = True
        with eval_mode(self.model):
            return jvp(self._grad_of_x, (self.x,), (b,))[1]

    def _x_vector(self, b: Tensor, batched: bool) -> Tensor:
        """An x-space vector (x-shaped or flat) or a batch of them ((k, *x.shape) or (k, d_x)), reshaped."""
        b = torch.as_tensor(b).to(device=self.device, dtype=self.dtype)
        if batched:
            if b.dim() < 1 or b.shape[0] == 0 or b.numel() != b.shape[0] * self.d_x:
                raise ValueError(f"expected a batch of x-space vectors shaped (k, {self.d_x}) or (k, *{self.x_shape}), "
                                 f"got {tuple(b.shape)}")
            return b.reshape(b.shape[0], *self.x_shape)
        if b.numel() != self.d_x:
            raise ValueError(f"x-space vector has {b.numel()} elements, expected d_x = {self.d_x} (x: {self.x_shape})")
        return b.reshape(self.x_shape)

    def _theta_vector(self, delta: ThetaVector) -> Tensor:
        return as_flat(delta, self._params).to(device=self.device, dtype=self.dtype)

    # -- products --------------------------------------------------------------------------------
    @property
    def gradient(self) -> Tensor:
        """g₀ = ∇_θ L(x₀, θ), the clean gradient, flat (a by-product of the first backward pass)."""
        self._check_fresh()
        return self._linearised().g0

    def matvec(self, delta: ThetaVector) -> Tensor:
        """J δ (θ-space → x-space), shaped like x: the vector-Jacobian product of x ↦ ∇_θL(x) with δ."""
        self._check_fresh()
        return self._linearised().matvec(self._theta_vector(delta).detach())

    def rmatvec(self, b: Tensor) -> Tensor:
        """Jᵀ b (x-space → θ-space), flat: d/dt ∇_θL(x + t b) = ∂⟨∇ₓL(x), b⟩/∂θ (mixed partials commute)."""
        self._check_fresh()
        return self._rmatvec(self._x_vector(b, batched=False).detach())

    def gram(self, b: Tensor) -> Tensor:
        """JJᵀ b (x-space → x-space), shaped like x."""
        if self._transpose == "vjp" and self._transpose_tried:  # the cached graph is known to work here
            self._check_fresh()
            return self._linearised().gram(self._x_vector(b, batched=False).detach())
        return self.matvec(self.rmatvec(b))

    def matvec_batch(self, deltas: Tensor) -> Tensor:
        """J δ for a batch of θ-vectors (k, d_θ) → (k, *x.shape), vectorised with ``vmap``."""
        self._check_fresh()
        deltas = torch.as_tensor(deltas).to(device=self.device, dtype=self.dtype)
        if deltas.dim() != 2 or deltas.shape[1] != self.d_theta:
            raise ValueError(f"expected a (k, {self.d_theta}) batch of θ-vectors, got {tuple(deltas.shape)}")
        if deltas.shape[0] == 1:  # one vector: the cached graph, no vmap
            return self.matvec(deltas[0]).unsqueeze(0)
        fn = self._reverse()
        return vmap(lambda d: fn(d)[0])(deltas)

    def rmatvec_batch(self, bs: Tensor) -> Tensor:
        """Jᵀ b for a batch of x-space vectors (k, *x.shape) or (k, d_x) → (k, d_θ)."""
        self._check_fresh()
        bs = self._x_vector(bs, batched=True)
        if bs.shape[0] == 1:  # one vector: the cached graph, no vmap
            return self.rmatvec(bs[0]).unsqueeze(0)
        # Several vectors: vmap of forward-over-reverse shares the primal computation between them; on lenet_zhu
        # it beats a loop of cached-graph products from k ≈ 8 (4.6 vs 6.7 ms per vector at k = 16) and loses
        # little below (6.0 vs 4.9 at k = 4), so one rule for all k ≥ 2 keeps this simple.
        with eval_mode(self.model):
            return vmap(lambda t: jvp(self._grad_of_x, (self.x,), (t,))[1])(bs)

    def gram_batch(self, bs: Tensor) -> Tensor:
        """JJᵀ b for a batch of x-space vectors (k, *x.shape) or (k, d_x) → (k, *x.shape)."""
        bs = self._x_vector(bs, batched=True)
        if bs.shape[0] == 1:  # one chain: skip vmap's batching rules
            return self.gram(bs[0]).unsqueeze(0)
        return self.matvec_batch(self.rmatvec_batch(bs))

    def _apply_flat(self, v: Tensor) -> Tensor:
        """(..., d_x) → (..., d_x): JJᵀ on flat vectors with any leading batch shape (for the solvers)."""
        lead = v.shape[:-1]
        return self.gram_batch(v.reshape(-1, self.d_x)).reshape(*lead, self.d_x)

    def __repr__(self) -> str:
        return f"GradientJacobian(d_x={self.d_x}, d_theta={self.d_theta}, x={self.x_shape}, dtype={self.dtype})"


# --- result objects -------------------------------------------------------------------------------


@dataclass
class Spectrum:
    """Eigenpairs of JJᵀ from Lanczos. ``eigenvalues`` (k,) sorted (descending for ``largest``, ascending
    for ``smallest``); ``eigenvectors`` (k, *x.shape), orthonormal x-side vectors uᵢ; ``residuals`` (k,)
    ‖JJᵀuᵢ − λᵢuᵢ‖ (a bound on each eigenvalue's absolute error); ``converged`` whether every residual met
    the tolerance; ``iterations`` the Lanczos steps (= JJᵀ products) used."""

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    converged: bool
    iterations: int
    which: str


@dataclass
class I2FResult:
    """I²F(δ) = (JJᵀ + εI)⁻¹ J δ by conjugate gradients from zero. ``vector`` is x-shaped; ``residual`` is
    the true relative residual ‖Jδ − (JJᵀ+εI) z‖ / ‖Jδ‖; ``damping`` the ε actually used (it differs from
    the requested one only after an :class:`InfluenceWarning`); ``jdelta_norm`` = ‖Jδ‖."""

    vector: Tensor
    residual: float
    iterations: int
    converged: bool
    damping: float
    jdelta_norm: float

    @property
    def norm(self) -> float:
        """‖I²F(δ)‖: the predicted reconstruction error."""
        return float(self.vector.norm())


@dataclass
class ExpectedI2F:
    """√E‖I²F(δ)‖² over the noise. ``rmse`` = value / √d_x (per-pixel RMSE scale, comparable with an
    attack's RMSE in the same normalisation as x); ``stderr`` the standard error of ``value`` (0 for the exact
    path); ``method`` one of ``exact`` (dense eigenvalues), ``slq`` (stochastic Lanczos quadrature),
    ``monte_carlo``; ``samples`` probes or draws; ``damping`` the ε actually used."""

    value: Tensor
    rmse: Tensor
    stderr: Tensor
    method: str
    samples: int
    damping: float
    d_x: int


@dataclass
class PerSampleLeakage:
    """Per-sample leakage, each sample i being its own private input x₀ (J_i of its own loss).

    All fields are (N,) tensors (or ``None`` when not computed):
    ``lambda_max`` λ_max(J_iJ_iᵀ); ``lambda_min`` λ_min (``method="exact"`` only);
    ``trace`` tr(J_iJ_iᵀ) (exact, or SLQ/Hutchinson estimate);
    ``expected_jdelta`` √E‖J_iδ‖²; ``lower_bound`` √E‖J_iδ‖² / (λ_max + ε);
    ``expected_i2f`` √E‖I²F_i(δ)‖²; ``expected_i2f_rmse`` that divided by √(C·H·W);
    ``converged`` whether λ_max (and the estimates) met their tolerance; ``labels`` the y used.
    """

    lambda_max: Tensor
    lambda_min: Tensor | None
    trace: Tensor | None
    expected_jdelta: Tensor | None
    lower_bound: Tensor | None
    expected_i2f: Tensor | None
    expected_i2f_rmse: Tensor | None
    converged: Tensor
    iterations: int
    method: str
    damping: float
    labels: Tensor


# --- shared numerical machinery -------------------------------------------------------------------


def _generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    # A fixed-seed private generator by default: results are reproducible and the global RNG is untouched.
    if generator is not None:
        return generator
    return torch.Generator(device=device).manual_seed(0)


def _randn(shape: Sequence[int], like: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(*shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def _rademacher(shape: Sequence[int], like: Tensor, generator: torch.Generator) -> Tensor:
    r = torch.randint(0, 2, tuple(shape), generator=generator, device=generator.device)
    return (2 * r - 1).to(device=like.device, dtype=like.dtype)


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


class _Lanczos:
    """Lanczos on a symmetric operator ``apply: (..., n) → (..., n)``, batched over the leading dims of the
    start vectors, with full reorthogonalisation (two classical Gram–Schmidt passes, "twice is enough").

    Without reorthogonalisation Ritz values come back as spurious copies ("ghosts") after convergence; with
    it, T = QᵀAQ holds to rounding and the run can go up to n steps. On breakdown (an invariant subspace is
    found, e.g. a repeated eigenvalue or rank deficiency) the chain continues from a fresh random vector
    orthogonal to Q with β = 0, so T becomes block diagonal and multiplicities are found too. Blocks after the
    first carry no weight in e₁, so quadrature over the start vector stays correct.
    """

    def __init__(self, apply: Callable[[Tensor], Tensor], v0: Tensor, max_steps: int, generator: torch.Generator):
        self.apply = apply
        self.generator = generator
        self.n = v0.shape[-1]
        self.batch = tuple(v0.shape[:-1])
        self.m_max = max(1, min(int(max_steps), self.n))
        # The basis grows on demand (doubling): most runs stop after a handful of steps, and zero-filling the
        # full (max_steps + 1) × n basis up front cost ~5% of a whole λ_max run on lenet_zhu (d_x = 8192).
        self.Q = v0.new_zeros(*self.batch, min(self.m_max + 1, 16), self.n)
        self.alpha = v0.new_zeros(*self.batch, self.m_max)
        self.beta = v0.new_zeros(*self.batch, self.m_max)
        self.scale = v0.new_zeros(self.batch)
        norm = v0.norm(dim=-1, keepdim=True)
        if (norm == 0).any():
            raise ValueError("Lanczos start vector is zero")
        self.Q[..., 0, :] = v0 / norm
        self.steps = 0

    @property
    def done(self) -> bool:
        return self.steps >= self.m_max

    def step(self) -> None:
        j = self.steps
        q = self.Q[..., j, :]
        w = self.apply(q)
        if not torch.isfinite(w).all():
            raise FloatingPointError("a JJᵀ product returned non-finite values (check the model and the input)")
        basis = self.Q[..., : j + 1, :]
        self.alpha[..., j] = (w * q).sum(-1)
        for _ in range(2):
            w = w - torch.einsum("...k,...kn->...n", torch.einsum("...kn,...n->...k", basis, w), basis)
        b = w.norm(dim=-1)
        self.scale = torch.maximum(self.scale, torch.maximum(self.alpha[..., j].abs(), b))
        self.steps = j + 1
        if self.steps == self.n:  # the whole space is spanned: T is exact, the residual is zero
            return
        broken = b <= 16 * _eps(w.dtype) * math.sqrt(self.n) * self.scale
        self.beta[..., j] = torch.where(broken, torch.zeros_like(b), b)
        if self.steps == self.m_max:
            return
        if broken.any():
            r = _randn(w.shape, w, self.generator)
            for _ in range(2):
                r = r - torch.einsum("...k,...kn->...n", torch.einsum("...kn,...n->...k", basis, r), basis)
            w = torch.where(broken.unsqueeze(-1), r, w)
            b = w.norm(dim=-1)
        if j + 1 >= self.Q.shape[-2]:
            grown = self.Q.new_zeros(*self.batch, min(self.m_max + 1, 2 * self.Q.shape[-2]), self.n)
            grown[..., : j + 1, :] = self.Q
            self.Q = grown
        self.Q[..., j + 1, :] = w / b.unsqueeze(-1)

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values θ (ascending, (..., m)), eigenvectors S of T ((..., m, m)) and residual norms
        ‖A yᵢ − θᵢ yᵢ‖ = β_m |S[m−1, i]| ((..., m))."""
        m = self.steps
        a = self.alpha[..., :m]
        off = self.beta[..., : m - 1]
        T = torch.diag_embed(a) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        theta, S = torch.linalg.eigh(T)
        last = self.beta[..., m - 1] if m < self.n else torch.zeros_like(a[..., 0])
        resid = last.unsqueeze(-1).abs() * S[..., m - 1, :].abs()
        return theta, S, resid

    def vectors(self, S: Tensor) -> Tensor:
        """Ritz vectors for the columns of S: (..., k) columns → (..., k, n)."""
        return torch.einsum("...mk,...mn->...kn", S, self.Q[..., : S.shape[-2], :])


def _check_schedule(step: int) -> bool:
    # Ritz values are cheap for small T but not free for T of several hundred: check every step early,
    # then about every 5% of the steps taken.
    return step <= 30 or step % max(1, step // 20) == 0


def _converged(theta: Tensor, resid: Tensor, theta_max: Tensor, tol: float, n: int, top: bool = False) -> Tensor:
    # Relative residual ‖r‖ ≤ tol·|θ| (the ARPACK criterion) bounds each eigenvalue's relative error by tol;
    # the floor is what rounding in the products allows at all (otherwise λ ≈ 0 could never converge).
    eps = _eps(theta.dtype)
    rel_floor = 64 * eps * math.sqrt(n)
    if top:
        # The largest eigenvalues are not near zero: there the generous floor above (6.9e-4 relative in float32
        # at d_x = 8192) would silently loosen the caller's tol — λ_max "at tol 1e-6" would stop at a 1e-4
        # residual. Honour tol down to a few ulps (8·eps, ~1e-6 in float32) and keep the old floor as a cap.
        rel_floor = min(rel_floor, max(tol, 8 * eps))
    return resid <= torch.maximum(tol * theta.abs(), rel_floor * theta_max.abs())


def _value_error(theta: Tensor, resid: Tensor) -> Tensor:
    """A posteriori error estimate of each Ritz value: min(‖r‖, ‖r‖²/gap) with gap the distance to the nearest
    other Ritz value (Kato–Temple / Parlett's gap theorem; the Ritz gap stands in for the unknown true gap, as
    in Saad's and Parlett's texts). An eigenvalue's error is quadratic in its residual, so a λ_max to 1e-7
    needs a residual of only ~3e-4·λ when λ₁/λ₂ ≈ 2."""
    if theta.shape[-1] < 2:
        return resid
    diff = (theta.unsqueeze(-1) - theta.unsqueeze(-2)).abs()
    diff = diff + torch.diag_embed(torch.full_like(theta, math.inf))
    gap = diff.amin(-1)
    return torch.minimum(resid, resid.square() / gap.clamp_min(torch.finfo(theta.dtype).tiny))


def _check_stop(stop: str) -> None:
    if stop not in ("residual", "eigenvalue"):
        raise ValueError(f"stop must be 'residual' or 'eigenvalue', got {stop!r}")


def _last_block_converged(lz: _Lanczos, which: str, tol: float, theta_max: Tensor) -> bool:
    """After a breakdown the Krylov space is (numerically) invariant, but rounding can have dropped a weak
    eigen-component from it — typically a small eigenvalue of a cluster. So the wanted end is trusted only
    once the block started from the fresh random vector (which sees the whole orthogonal complement) has
    converged at that end too: then the complement holds nothing more extreme. Unbatched runs only."""
    m = lz.steps
    if m >= lz.n:
        return True
    if float(lz.beta[m - 1]) == 0.0:  # broke down on the last step: the complement is still unexplored
        return False
    zeros = (lz.beta[: m - 1] == 0).nonzero()
    start = int(zeros[-1]) + 1 if zeros.numel() else 0
    if start == 0:
        return True
    a = lz.alpha[start:m]
    off = lz.beta[start : m - 1]
    theta, S = torch.linalg.eigh(torch.diag(a) + torch.diag(off, 1) + torch.diag(off, -1))
    i = 0 if which == "smallest" else -1
    resid = lz.beta[m - 1].abs() * S[-1, i].abs()
    return bool(_converged(theta[i], resid, theta_max, tol, lz.n, top=which == "largest"))


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    m = theta.shape[-1]
    idx = torch.arange(m - 1, m - 1 - k, -1) if which == "largest" else torch.arange(k)
    return idx.to(theta.device)


def _default_rcond(n: int, dtype: torch.dtype) -> float:
    # Numerical rank threshold, as in numpy's matrix_rank: eigenvalues of JJᵀ below n·eps·λ_max are
    # indistinguishable from zero given the rounding of the products themselves.
    return n * _eps(dtype)


def _fallback_damping(
    damping: float,
    lam_max: float,
    lam_min: float | None,
    d_x: int,
    d_theta: int,
    dtype: torch.dtype,
    rcond: float | None,
    what: str,
    reason: str | None = None,
) -> float:
    """The ε to use: ``damping`` when positive; otherwise, if JJᵀ is (numerically) singular, warn and use
    ε = rcond·λ_max so the answer is finite (the damped solution ≈ the pseudo-inverse one on every direction
    with λᵢ ≫ ε)."""
    if damping < 0 or not math.isfinite(damping):
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    if damping > 0:
        return float(damping)
    rcond = _default_rcond(d_x, dtype) if rcond is None else float(rcond)
    if reason is None:
        if d_x > d_theta:
            reason = f"d_x = {d_x} > d_θ = {d_theta}, so JJᵀ has at least {d_x - d_theta} zero eigenvalues"
        elif lam_min is not None and lam_min <= rcond * lam_max:
            reason = f"λ_min/λ_max = {lam_min / lam_max:.3g} <= rcond = {rcond:.3g} (numerically singular)"
    if reason is None:
        return 0.0
    eps_used = rcond * lam_max if lam_max > 0 else 1.0
    warnings.warn(
        f"{what}: JJᵀ is rank-deficient or ill-conditioned ({reason}); the undamped I²F is not defined "
        f"there, so damping ε = rcond·λ_max = {eps_used:.3g} is used. Pass damping > 0 (paper default 1) "
        "to choose it yourself.",
        InfluenceWarning,
        stacklevel=3,
    )
    return float(eps_used)


def _cg(
    apply: Callable[[Tensor], Tensor], b: Tensor, damping: float, tol: float, maxiter: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Conjugate gradients for (A + εI) z = b from z = 0, batched over the leading dims of b (..., n).

    Returns z, the iterations per system, the recursive relative residual, and a breakdown flag (non-positive
    or non-finite curvature pᵀ(A+εI)p: A is not positive definite on the Krylov space, i.e. singular)."""
    z = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(-1)
    bnorm = rr.sqrt()
    target = tol * bnorm
    active = bnorm > 0
    its = torch.zeros(b.shape[:-1], dtype=torch.long, device=b.device)
    broken = torch.zeros(b.shape[:-1], dtype=torch.bool, device=b.device)
    for _ in range(maxiter):
        if not active.any():
            break
        ap = apply(p) + damping * p
        curv = (p * ap).sum(-1)
        bad = active & (~torch.isfinite(curv) | (curv <= 0))
        broken |= bad
        active &= ~bad
        step = torch.where(active, rr / torch.where(active, curv, torch.ones_like(curv)), torch.zeros_like(rr))
        z = z + step.unsqueeze(-1) * p
        r = r - step.unsqueeze(-1) * ap
        rr_new = (r * r).sum(-1)
        its += active.long()
        still = active & (rr_new.sqrt() > target)
        coef = torch.where(still, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = torch.where(still.unsqueeze(-1), r + coef.unsqueeze(-1) * p, p)
        rr = torch.where(active, rr_new, rr)
        active = still
    rel = rr.sqrt() / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    return z, its, rel, broken


def _top_lanczos(
    apply: Callable[[Tensor], Tensor],
    v0: Tensor,
    tol: float,
    maxiter: int,
    generator: torch.Generator,
    min_steps: int = 1,
    extra_stop: Callable[[_Lanczos], bool] | None = None,
    stop: str = "residual",
) -> tuple[_Lanczos, Tensor, Tensor]:
    """Run Lanczos until λ_max of every chain's group converges. ``v0`` is (..., p, n): p independent chains
    per problem; a problem's λ_max is the largest Ritz value over its chains (every Ritz value is a lower
    bound on λ_max, so the maximum is the best one). ``stop`` as in :func:`spectrum`. Returns the run,
    λ_max (...) and converged (...)."""
    lz = _Lanczos(apply, v0, maxiter, generator)
    lam = conv = None
    while not lz.done:
        lz.step()
        if lz.steps < min_steps or not (_check_schedule(lz.steps) or lz.done):
            continue
        theta, _, resid = lz.ritz()
        if stop == "eigenvalue":
            resid = _value_error(theta, resid)
        top, top_res = theta[..., -1], resid[..., -1]  # (..., p)
        best = top.argmax(-1, keepdim=True)
        lam = top.gather(-1, best).squeeze(-1)
        res = top_res.gather(-1, best).squeeze(-1)
        conv = _converged(lam, res, lam, tol, lz.n, top=True)
        if bool(conv.all()) and (extra_stop is None or extra_stop(lz)):
            break
    if lam is None:  # only when the loop never checked (cannot happen with min_steps <= maxiter)
        theta, _, resid = lz.ritz()
        lam = theta[..., -1].amax(-1)
        conv = torch.ones_like(lam, dtype=torch.bool)
    return lz, lam, conv


def _slq_weights(lz: _Lanczos) -> tuple[Tensor, Tensor]:
    """Gauss quadrature nodes θ and weights τ² = S[0, :]² of every chain (uᵀf(A)u ≈ Σ τ² f(θ) for unit u)."""
    theta, S, _ = lz.ritz()
    return theta, S[..., 0, :] ** 2


def _deflated_trace(lz: _Lanczos, n: int) -> Tensor:
    """tr(A) from p ≥ 2 independent Lanczos chains per problem (lz batch (..., p)), Hutch++-style, with no
    product beyond those Lanczos already made.

    Chain c's Krylov basis Q_c (m vectors, QᵀAQ = T_c) deflates the top of the spectrum exactly:
    tr(A) = tr(T_c) + tr(P_c A P_c), P_c = I − Q_cQ_cᵀ. The remainder is estimated with the other chains'
    start vectors b_s (Rademacher, independent of Q_c): b_sᵀP_cAP_cb_s = b_sᵀAb_s − 2 (Ab_s)ᵀQ_c a + aᵀT_c a
    with a = Q_cᵀb_s, where Ab_s = ‖b_s‖(α₁q₁ + β₁q₂) is chain s's first step. Averaged over c and s ≠ c it
    is unbiased, and its variance is that of the *deflated* spectrum, far below plain Hutchinson's when a
    few eigenvalues carry much of the trace (as for J_iJ_iᵀ)."""
    m = lz.steps
    Q = lz.Q[..., :m, :]  # (..., p, m, n)
    p = Q.shape[-3]
    a1 = lz.alpha[..., 0]
    rn = math.sqrt(n)
    ab = rn * (a1.unsqueeze(-1) * lz.Q[..., 0, :] + lz.beta[..., 0].unsqueeze(-1) * lz.Q[..., 1, :])
    b = rn * lz.Q[..., 0, :]
    off = lz.beta[..., : m - 1]
    T = torch.diag_embed(lz.alpha[..., :m]) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    a = torch.einsum("...cmn,...sn->...csm", Q, b)
    g = torch.einsum("...cmn,...sn->...csm", Q, ab)
    quad = torch.einsum("...csm,...cmk,...csk->...cs", a, T, a)
    rest = (n * a1).unsqueeze(-2) - 2 * (g * a).sum(-1) + quad  # (..., c, s)
    mask = ~torch.eye(p, dtype=torch.bool, device=Q.device)
    rest_mean = (rest * mask).sum(-1) / (p - 1)
    trT = lz.alpha[..., :m].sum(-1)  # (..., c)
    return (trT + rest_mean).mean(-1)


def _f_damped(theta: Tensor, damping: float, floor: float) -> Tensor:
    """f(λ) = λ / (λ + ε)²: E‖I²F‖² = σ² tr f(JJᵀ). Nodes below ``floor`` count as zero eigenvalues
    (they receive nothing from Jδ), which keeps 1/λ finite in the undamped case."""
    lam = theta.clamp_min(0)
    keep = lam > floor
    safe = torch.where(keep, lam, torch.ones_like(lam))
    return torch.where(keep, safe / (safe + damping) ** 2, torch.zeros_like(lam))


# --- spectrum -------------------------------------------------------------------------------------


def _check_op(op: GradientJacobian) -> None:
    for attr in ("_apply_flat", "d_x", "x_shape", "dtype", "device"):
        if not hasattr(op, attr):
            raise TypeError(f"expected a GradientJacobian (or an object with its interface), got {type(op).__name__}")


def spectrum(
    op: GradientJacobian,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float = 1e-8,
    maxiter: int | None = None,
    generator: torch.Generator | None = None,
    warn: bool = True,
    stop: str = "residual",
) -> Spectrum:
    """The k largest or smallest eigenvalues λᵢ of JJᵀ (d_x × d_x) and their x-side eigenvectors uᵢ.

    Lanczos with full reorthogonalisation on the input-side operator, started from a Gaussian vector drawn
    from ``generator``. With ``stop="residual"`` (default) a Ritz pair is converged when ‖JJᵀu − λu‖ ≤ tol·|λ|
    (ARPACK's criterion; it bounds the relative error of λ by tol, and of u by tol·|λ|/gap). The error of λ
    itself is ~ residual²/gap, far smaller: when only the eigenvalues matter, ``stop="eigenvalue"`` stops once
    the estimated error min(‖r‖, ‖r‖²/gap) ≤ tol·|λ|, with the gap to the nearest other Ritz value (Parlett's
    gap theorem) — fewer products for the same accuracy of λ (on lenet_zhu, λ_max to float32 rounding in 6
    products instead of 8), but the eigenvectors are then only as good as the residual. ``maxiter`` caps
    the JJᵀ products (default min(d_x, max(300, 20k))); at d_x steps the result is exact. Not meeting the
    tolerance gives a :class:`ConvergenceWarning` (unless ``warn=False``) and ``converged=False``.

    Limitation of single-vector Lanczos: a Krylov space holds one copy of each distinct eigenvalue, so a
    repeated eigenvalue is found as many times as the run breaks down and restarts (exact for d_x steps);
    before that, multiplicities can be under-counted — e.g. the (d_x − d_θ)-fold zero eigenvalue of a
    rank-deficient JJᵀ shows up once among the smallest. Extreme *values* are unaffected.
    """
    _check_op(op)
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if not isinstance(k, int) or k < 1 or k > op.d_x:
        raise ValueError(f"k must be an integer in [1, d_x = {op.d_x}], got {k}")
    n = op.d_x
    maxiter = min(n, max(300, 20 * k)) if maxiter is None else int(maxiter)
    if maxiter < k:
        raise ValueError(f"maxiter = {maxiter} < k = {k}")
    _check_stop(stop)
    gen = _generator(generator, op.device)
    v0 = _randn((n,), torch.empty(0, dtype=op.dtype, device=op.device), gen)
    lz = _Lanczos(op._apply_flat, v0, maxiter, gen)
    top = which == "largest"

    def is_converged(theta: Tensor, resid: Tensor) -> bool:
        idx = _select(theta, k, which)
        err = resid if stop == "residual" else _value_error(theta, resid)
        return bool(_converged(theta[idx], err[idx], theta[-1], tol, n, top).all()) and _last_block_converged(
            lz, which, tol, theta[-1]
        )

    converged = False
    while not lz.done:
        lz.step()
        if lz.steps < k or not (_check_schedule(lz.steps) or lz.done):
            continue
        theta, S, resid = lz.ritz()
        if is_converged(theta, resid):
            converged = True
            break
    theta, S, resid = lz.ritz()
    idx = _select(theta, k, which)
    converged = converged or is_converged(theta, resid)
    vecs = lz.vectors(S[:, idx])
    if not converged and warn:
        warnings.warn(
            f"Lanczos did not converge to tol={tol:g} for the {k} {which} eigenvalue(s) of JJᵀ in {lz.steps} "
            f"steps (max residual/|λ| = {float((resid[idx] / theta[idx].abs().clamp_min(1e-300)).max()):.2e}); "
            "raise maxiter or tol",
            ConvergenceWarning,
            stacklevel=2,
        )
    return Spectrum(
        eigenvalues=theta[idx],
        eigenvectors=vecs.reshape(k, *op.x_shape),
        residuals=resid[idx],
        converged=converged,
        iterations=lz.steps,
        which=which,
    )


def top_eigenvalue(
    op: GradientJacobian,
    *,
    tol: float = 1e-8,
    maxiter: int | None = None,
    generator: torch.Generator | None = None,
    stop: str = "eigenvalue",
) -> Tensor:
    """λ_max(JJᵀ) = ‖J‖₂² (0-dim tensor) by Lanczos to relative error ~tol. Only the value is returned, so the
    default stops on the eigenvalue's error estimate (``stop="eigenvalue"``); ``stop="residual"`` is ARPACK's
    stricter criterion. See :func:`spectrum` for both and for the warnings."""
    return spectrum(op, 1, "largest", tol=tol, maxiter=maxiter, generator=generator, stop=stop).eigenvalues[0]


def right_singular_vectors(
    op: GradientJacobian,
    k: int,
    which: str = "smallest",
    *,
    tol: float = 1e-8,
    maxiter: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Singular values sᵢ = √λᵢ of J and its θ-space right singular vectors vᵢ = Jᵀuᵢ / sᵢ as a (k, d_θ)
    tensor (rows orthonormal, ordered like ``spectrum``'s ``which``).

    Noise of size α along vᵢ moves the attacker's reconstruction by α/sᵢ (to first order): the ``smallest``
    directions protect the most per unit of noise. Only the row space of J is reachable this way; noise in
    the null space of J (dimension ≥ d_θ − d_x) buys no first-order privacy at all. A zero singular value
    (rank-deficient JJᵀ) has no right singular vector: its row is returned as zeros, with a warning.
    """
    spec = spectrum(op, k, which, tol=tol, maxiter=maxiter, generator=generator)
    lam = spec.eigenvalues
    lam_max = float(lam[0]) if which == "largest" else _lambda_max_loose(op, generator)
    floor = _default_rcond(op.d_x, op.dtype) * lam_max
    s = lam.clamp_min(0).sqrt()
    v = op.rmatvec_batch(spec.eigenvectors.reshape(k, -1))
    zero = lam <= floor
    if zero.any():
        warnings.warn(
            f"{int(zero.sum())} of the requested singular values of J are numerically zero (JJᵀ is "
            "rank-deficient); their θ-space rows are returned as zeros",
            InfluenceWarning,
            stacklevel=2,
        )
    v = torch.where(zero.unsqueeze(-1), torch.zeros_like(v), v / torch.where(zero, torch.ones_like(s), s).unsqueeze(-1))
    return s, v


def gram_matrix(op: GradientJacobian, chunk_size: int | None = 256) -> Tensor:
    """The dense d_x × d_x matrix JJᵀ from d_x products (``vmap`` over the identity, ``chunk_size`` columns
    at a time), symmetrised. For small d_x only: it costs d_x products and d_x² memory."""
    _check_op(op)
    n = op.d_x
    chunk = n if chunk_size is None else max(1, int(chunk_size))
    eye = torch.eye(n, dtype=op.dtype, device=op.device)
    cols = [op._apply_flat(eye[i : i + chunk]) for i in range(0, n, chunk)]
    a = torch.cat(cols)
    return (a + a.T) / 2


# --- I²F and its bounds ---------------------------------------------------------------------------


def _lambda_max_loose(op: GradientJacobian, generator: torch.Generator | None) -> float:
    # Only a scale for rank thresholds and fallback damping: 1e-3 relative accuracy is plenty.
    return float(spectrum(op, 1, "largest", tol=1e-3, generator=generator, warn=False).eigenvalues[0])


def i2f(
    op: GradientJacobian,
    delta: ThetaVector,
    damping: float = 0.0,
    *,
    tol: float = 1e-8,
    maxiter: int | None = None,
    rcond: float | None = None,
    generator: torch.Generator | None = None,
) -> I2FResult:
    """I²F(δ) = (JJᵀ + εI)⁻¹ J δ (x-shaped) by conjugate gradients started from zero.

    JJᵀ is symmetric positive semi-definite and Jδ lies in its range, so CG from zero stays in the range and
    converges to the minimum-norm solution. CG stops when the relative residual ≤ ``tol`` (default maxiter
    min(max(2·d_x, 50), 2000) products). With ε = 0 and a rank-deficient (d_x > d_θ) or numerically singular
    JJᵀ (CG breakdown, no convergence, non-finite values) an :class:`InfluenceWarning` is issued and the
    system is re-solved with ε = rcond·λ_max (rcond default d_x·machine-eps), so the answer is always finite.
    """
    _check_op(op)
    gen = generator
    jd = op.matvec(delta).reshape(-1)
    if not torch.isfinite(jd).all():
        raise FloatingPointError("J δ is not finite: check δ and the model")
    n = op.d_x
    maxiter = min(max(2 * n, 50), 2000) if maxiter is None else int(maxiter)
    eps = float(damping)
    if eps < 0 or not math.isfinite(eps):
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    if eps == 0 and n > op.d_theta:
        eps = _fallback_damping(0.0, _lambda_max_loose(op, gen), None, n, op.d_theta, op.dtype, rcond, "i2f")
    z, its, rel, broken = _cg(op._apply_flat, jd.unsqueeze(0), eps, tol, maxiter)
    ok = bool(torch.isfinite(z).all()) and not bool(broken.any()) and float(rel[0]) <= tol
    if not ok and eps == 0:
        why = "CG broke down (non-positive curvature)" if bool(broken.any()) else (
            "CG did not converge" if torch.isfinite(z).all() else "CG produced non-finite values")
        eps = _fallback_damping(0.0, _lambda_max_loose(op, gen), None, n, op.d_theta, op.dtype, rcond, "i2f", why)
        z, its, rel, broken = _cg(op._apply_flat, jd.unsqueeze(0), eps, tol, maxiter)
    z = z[0]
    true_rel = float((jd - op._apply_flat(z.unsqueeze(0))[0] - eps * z).norm() / jd.norm().clamp_min(1e-300))
    converged = float(rel[0]) <= tol and not bool(broken.any())
    if not converged:
        warnings.warn(
            f"CG for I²F stopped at relative residual {true_rel:.2e} after {int(its[0])} iterations (tol={tol:g})",
            ConvergenceWarning,
            stacklevel=2,
        )
    return I2FResult(
        vector=z.reshape(op.x_shape),
        residual=true_rel,
        iterations=int(its[0]),
        converged=converged,
        damping=eps,
        jdelta_norm=float(jd.norm()),
    )


def i2f_lower_bound(
    op: GradientJacobian,
    delta: ThetaVector,
    damping: float = 0.0,
    *,
    lambda_max: float | Tensor | None = None,
    tol: float = 1e-8,
    generator: torch.Generator | None = None,
) -> Tensor:
    """‖Jδ‖ / (λ_max(JJᵀ) + ε) ≤ ‖I²F(δ)‖ — with ε = 0 the quantity the paper plots. Pass ``lambda_max`` to
    reuse an eigenvalue already computed."""
    _check_op(op)
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    lam = top_eigenvalue(op, tol=tol, generator=generator) if lambda_max is None else torch.as_tensor(lambda_max)
    return op.matvec(delta).norm() / (lam.to(op.dtype) + damping)


def i2f_upper_bound(
    op: GradientJacobian,
    delta: ThetaVector,
    damping: float = 0.0,
    *,
    lambda_min: float | Tensor | None = None,
    tol: float = 1e-8,
    maxiter: int | None = None,
    rcond: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """‖Jδ‖ / (λ_min(JJᵀ) + ε) ≥ ‖I²F(δ)‖. λ_min comes from Lanczos (slow to converge when JJᵀ is
    ill-conditioned; pass ``lambda_min`` if known). Undamped with a singular JJᵀ: warning, damped answer."""
    _check_op(op)
    if lambda_min is None:
        lam_min = float(spectrum(op, 1, "smallest", tol=tol, maxiter=maxiter, generator=generator).eigenvalues[0])
    else:
        lam_min = float(lambda_min)
    eps = float(damping)
    if eps == 0:
        lam_max = _lambda_max_loose(op, generator)
        eps = _fallback_damping(0.0, lam_max, lam_min, op.d_x, op.d_theta, op.dtype, rcond, "i2f_upper_bound")
    return op.matvec(delta).norm() / (max(lam_min, 0.0) + eps)


# --- expected error -------------------------------------------------------------------------------


def _draw(sampler: NoiseSampler, op_params: ParamDict, d_theta: int, count: int, like: Tensor,
          generator: torch.Generator) -> Tensor:
    """``count`` draws from the sampler as a (count, d_θ) tensor in the operator's dtype/device."""
    draws: list[Tensor] = []
    total = 0
    while total < count:
        out = sampler(generator)
        if isinstance(out, Tensor) and out.dim() == 2 and out.shape[1] == d_theta:
            batch = out
        else:
            batch = as_flat(out, op_params).reshape(1, -1)
        batch = batch.to(device=like.device, dtype=like.dtype)
        draws.append(batch)
        total += batch.shape[0]
    return torch.cat(draws)[:count]


def _mean_sd(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and its standard error along the last dim."""
    s = values.shape[-1]
    mean = values.mean(-1)
    se = values.std(-1) / math.sqrt(s) if s > 1 else torch.full_like(mean, float("nan"))
    return mean, se


def _sqrt_with_se(mean_sq: Tensor, se_sq: Tensor) -> tuple[Tensor, Tensor]:
    # √ of a mean of squares and its standard error by the delta method: se(√m) = se(m) / (2√m).
    root = mean_sq.clamp_min(0).sqrt()
    return root, se_sq / (2 * root.clamp_min(1e-300))


def expected_i2f(
    op: GradientJacobian,
    noise_std: float | None = None,
    noise_sampler: NoiseSampler | None = None,
    damping: float = 0.0,
    *,
    samples: int = 64,
    method: str = "auto",
    probes: int = 16,
    exact_max_dim: int = 2048,
    tol: float = 1e-4,
    maxiter: int | None = None,
    rcond: float | None = None,
    generator: torch.Generator | None = None,
) -> ExpectedI2F:
    """√E‖I²F(δ)‖², the expected reconstruction error, and its per-pixel (RMSE) scale value/√d_x.

    * Isotropic Gaussian δ ~ N(0, σ² I_θ) (``noise_std`` = σ): E‖I²F‖² = σ² tr(MMᵀ), M = (JJᵀ+εI)⁻¹J, i.e.
      σ² Σᵢ λᵢ/(λᵢ+ε)² (σ² Σᵢ 1/λᵢ undamped). ``method="exact"`` (the default when d_x ≤ ``exact_max_dim``)
      forms JJᵀ with d_x products and uses its eigenvalues; ``"slq"`` estimates the trace by stochastic
      Lanczos quadrature with ``probes`` Rademacher vectors, one Lanczos chain each (batched), stopped when
      every chain's quadrature changes by < ``tol`` relatively. Undamped SLQ needs the small end of the
      spectrum resolved (≈√κ steps); prefer ε > 0 or the exact path there.
    * Any noise (``noise_sampler``, see :data:`NoiseSampler`; DP-SGD, anisotropic...): Monte Carlo over
      ``samples`` draws, √mean‖I²F(δ_s)‖². With the dense eigen-decomposition available (small d_x) each draw
      costs one J δ product; otherwise one batched CG solve per draw.

    Undamped and singular JJᵀ: :class:`InfluenceWarning` and ε = rcond·λ_max (the answer stays finite).
    """
    _check_op(op)
    if (noise_std is None) == (noise_sampler is None):
        raise ValueError("give exactly one of noise_std (isotropic Gaussian σ) and noise_sampler")
    if noise_std is not None and (noise_std < 0 or not math.isfinite(noise_std)):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
    if method not in ("auto", "exact", "slq", "monte_carlo"):
        raise ValueError(f"method must be auto, exact, slq or monte_carlo, got {method!r}")
    if damping < 0 or not math.isfinite(damping):
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    n = op.d_x
    gen = _generator(generator, op.device)
    like = torch.empty(0, dtype=op.dtype, device=op.device)
    dense = method == "exact" or (method in ("auto", "monte_carlo") and n <= exact_max_dim)
    if method == "slq" and noise_std is None:
        raise ValueError("method='slq' applies to isotropic noise (noise_std); use a sampler with monte_carlo")

    lam = U = None
    if dense:
        lam, U = torch.linalg.eigh(gram_matrix(op))
        lam_max = float(lam[-1])
        eps = _fallback_damping(float(damping), lam_max, float(lam[0]), n, op.d_theta, op.dtype, rcond,
                                "expected_i2f")
        floor = _default_rcond(n, op.dtype) * lam_max if rcond is None else float(rcond) * lam_max

    if noise_std is not None and dense:
        assert lam is not None
        total = _f_damped(lam, eps, floor if eps == 0 else -1.0).sum()
        value = noise_std * total.sqrt()
        return ExpectedI2F(value, value / math.sqrt(n), torch.zeros_like(value), "exact", 0, eps, n)

    if noise_std is not None:  # stochastic Lanczos quadrature
        maxiter = min(n, 300) if maxiter is None else int(maxiter)
        v0 = _rademacher((probes, n), like, gen)
        state: dict = {"prev": None, "stable": False}

        def quad_stable(lz: _Lanczos) -> bool:
            theta, w = _slq_weights(lz)
            est = (w * _f_damped(theta, float(damping), -1.0 if damping > 0 else 0.0)).sum(-1)
            prev = state["prev"]
            state["stable"] = prev is not None and bool(((est - prev).abs() <= tol * est.abs()).all())
            state["prev"] = est
            return state["stable"]

        lz, lam_max_t, _ = _top_lanczos(op._apply_flat, v0, 1e-3, maxiter, gen, min_steps=2, extra_stop=quad_stable)
        theta, w = _slq_weights(lz)
        lam_max = float(lam_max_t)
        lam_min_ritz = float(theta[theta > 0].min()) if (theta > 0).any() else 0.0
        eps = _fallback_damping(float(damping), lam_max, lam_min_ritz, n, op.d_theta, op.dtype, rcond, "expected_i2f")
        floor = _default_rcond(n, op.dtype) * lam_max if rcond is None else float(rcond) * lam_max
        per_probe = n * (w * _f_damped(theta, eps, floor if eps == 0 else -1.0)).sum(-1)  # Hutchinson terms
        if not state["stable"] and lz.steps < n:
            warnings.warn(
                f"stochastic Lanczos quadrature did not stabilise to tol={tol:g} in {lz.steps} steps; the "
                "undamped estimate is biased low when small eigenvalues are unresolved (use damping > 0)",
                ConvergenceWarning,
                stacklevel=2,
            )
        mean, se = _mean_sd(per_probe)
        root, se_root = _sqrt_with_se(mean, se)
        value = noise_std * root
        return ExpectedI2F(value, value / math.sqrt(n), noise_std * se_root, "slq", probes, eps, n)

    # Monte Carlo over the sampler's draws
    assert noise_sampler is not None
    deltas = _draw(noise_sampler, op._params, op.d_theta, samples, like, gen)
    jd = op.matvec_batch(deltas).reshape(samples, n)
    if dense:
        assert lam is not None and U is not None
        keep = lam > (floor if eps == 0 else -1.0)  # undamped: numerically-zero eigenvalues receive nothing
        inv = torch.where(keep, 1.0 / (lam + eps).clamp_min(1e-300), torch.zeros_like(lam))
        sq = ((jd @ U) * inv).pow(2).sum(-1)  # ‖U diag(1/(λ+ε)) Uᵀ Jδ‖²
    else:
        maxit = min(max(2 * n, 50), 2000) if maxiter is None else int(maxiter)
        eps = float(damping)
        if eps == 0 and n > op.d_theta:
            eps = _fallback_damping(0.0, _lambda_max_loose(op, gen), None, n, op.d_theta, op.dtype, rcond,
                                    "expected_i2f")
        z, _, rel, broken = _cg(op._apply_flat, jd, eps, 1e-6, maxit)
        if eps == 0 and (bool(broken.any()) or not torch.isfinite(z).all() or bool((rel > 1e-6).any())):
            eps = _fallback_damping(0.0, _lambda_max_loose(op, gen), None, n, op.d_theta, op.dtype, rcond,
                                    "expected_i2f", "CG did not converge undamped")
            z, _, rel, _ = _cg(op._apply_flat, jd, eps, 1e-6, maxit)
        if bool((rel > 1e-6).any()):
            warnings.warn(f"CG reached only relative residual {float(rel.max()):.2e} for some draws",
                          ConvergenceWarning, stacklevel=2)
        sq = z.pow(2).sum(-1)
    mean, se = _mean_sd(sq)
    value, se_root = _sqrt_with_se(mean, se)
    return ExpectedI2F(value, value / math.sqrt(n), se_root, "monte_carlo", samples, eps, n)


# --- per-sample analysis --------------------------------------------------------------------------


class _PerSampleGram:
    """JJᵀ of every sample's own loss at once: (N, p, n) → (N, p, n), ``vmap`` over samples (outer) and
    probe vectors (inner, sharing the sample's primal computation), in chunks of ``chunk_size`` samples."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn | None, chunk_size: int | None):
        self.params = trainable_parameters(model)
        self.loss = batch_loss_fn(model, loss_fn)
        self.x, self.y = x, y
        self.sample_shape = tuple(x.shape[1:])
        self.chunk = x.shape[0] if chunk_size is None else max(1, int(chunk_size))
        params, loss = self.params, self.loss

        def g1(xi: Tensor, yi: Tensor) -> Tensor:
            return flatten(grad(loss)(params, xi.unsqueeze(0), yi.unsqueeze(0)))

        def gram1(xi: Tensor, yi: Tensor, bi: Tensor) -> Tensor:
            fn = lambda z: g1(z, yi)  # noqa: E731 — a closure over the sample's label
            v = jvp(fn, (xi,), (bi,))[1]
            return vjp(fn, xi)[1](v)[0]

        def rmat1(xi: Tensor, yi: Tensor, bi: Tensor) -> Tensor:
            return jvp(lambda z: g1(z, yi), (xi,), (bi,))[1]

        def mat1(xi: Tensor, yi: Tensor, di: Tensor) -> Tensor:
            return vjp(lambda z: g1(z, yi), xi)[1](di)[0]

        inner = (None, None, 0)
        self._gram = vmap(vmap(gram1, in_dims=inner))
        self._rmat = vmap(vmap(rmat1, in_dims=inner))
        self._mat_shared = vmap(vmap(mat1, in_dims=inner), in_dims=(0, 0, None))  # same δ's for every sample

    def _chunks(self, fn: Callable, v: Tensor, shared: bool = False) -> Tensor:
        out = []
        for s in range(0, self.x.shape[0], self.chunk):
            e = s + self.chunk
            out.append(fn(self.x[s:e], self.y[s:e], v if shared else v[s:e]))
        return torch.cat(out)

    def gram(self, v: Tensor) -> Tensor:  # (N, p, n) → (N, p, n)
        N, p, n = v.shape
        out = self._chunks(self._gram, v.reshape(N, p, *self.sample_shape))
        return out.reshape(N, p, n)

    def matvec_shared(self, deltas: Tensor) -> Tensor:  # (s, d_θ) → (N, s, n)
        out = self._chunks(self._mat_shared, deltas, shared=True)
        return out.reshape(out.shape[0], out.shape[1], -1)


def _per_sample_batch(model: nn.Module, x: Tensor, y: Tensor) -> tuple[ParamDict, Tensor, Tensor]:
    """The trainable parameters and the batch, validated and moved to their device and dtype."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    ref = next(iter(params.values()))
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError("x must be a batch (N, ...) with at least one sample")
    if not isinstance(y, Tensor) or y.shape[0] != x.shape[0]:
        raise ValueError("y must have one entry per sample of x")
    xs = x.detach().to(device=ref.device, dtype=ref.dtype)
    ys = y.detach().to(ref.device, dtype=ref.dtype if y.is_floating_point() else y.dtype)
    return params, xs, ys


def per_sample_product_seconds(model: nn.Module, x: Tensor, y: Tensor, chains: int = 1,
                               loss_fn: LossFn | None = None) -> float:
    """Wall time of one Lanczos step of :func:`per_sample_leakage` on the samples ``x``: one vmapped JᵢJᵢᵀ
    product for every sample and ``chains`` vectors each (one call, so the first one of a process includes
    one-off allocation costs). The unit a caller scales to predict an evaluation's cost before running it."""
    params, xs, ys = _per_sample_batch(model, x, y)
    ref = next(iter(params.values()))
    gen = torch.Generator(device=ref.device).manual_seed(0)  # never the global RNG
    v = _rademacher((xs.shape[0], chains, xs[0].numel()), torch.empty(0, dtype=ref.dtype, device=ref.device), gen)
    sync = torch.cuda.synchronize if ref.device.type == "cuda" else (lambda device=None: None)
    with eval_mode(model):
        op = _PerSampleGram(model, xs, ys, loss_fn, None)
        sync(ref.device)
        start = time.perf_counter()
        op.gram(v)
        sync(ref.device)
        return time.perf_counter() - start


def per_sample_leakage(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    noise_std: float | None = None,
    noise_sampler: NoiseSampler | None = None,
    damping: float = 0.0,
    *,
    relative_damping: float = 0.0,
    loss_fn: LossFn | None = None,
    method: str = "slq",
    expected: bool = True,
    probes: int = 4,
    samples: int = 32,
    tol: float = 1e-4,
    stop: str = "eigenvalue",
    slq_tol: float = 1e-2,
    maxiter: int = 64,
    chunk_size: int | None = None,
    rcond: float | None = None,
    generator: torch.Generator | None = None,
) -> PerSampleLeakage:
    """Leakage of every sample treated as its own private input x₀ = x[i] (J_i = ∂²ℓ(x_i, y_i)/∂x∂θ, one
    image, d_x = C·H·W), vectorised with ``torch.func.vmap`` (``chunk_size`` samples per call bounds memory).

    ``method="slq"`` (default, fast; what the training-time monitor uses): ``probes`` Lanczos chains per
    sample from Rademacher vectors, all samples and chains batched in one run, until every sample's
    λ_max has an estimated relative error ≤ ``tol`` (``stop="eigenvalue"``, see :func:`spectrum`; or relative
    residual ≤ ``tol`` with ``stop="residual"``) and (when ``expected``) the quadratures change by < ``slq_tol``
    (at most ``maxiter`` steps). λ_max is the best Ritz value over the chains; tr(J_iJ_iᵀ) and
    tr f(J_iJ_iᵀ), f(λ) = λ/(λ+ε)², are the chains' Gauss quadratures averaged (Hutchinson over ``probes``).
    ``method="exact"``: form each J_iJ_iᵀ (d_x products per sample) and use its eigenvalues (gives λ_min).

    Noise (optional; without it only λ_max and the trace are returned): ``noise_std`` = σ for isotropic
    δ ~ N(0, σ²I_θ), where E‖J_iδ‖² = σ² tr(J_iJ_iᵀ) and E‖I²F_i‖² = σ² Σ λ/(λ+ε)²; or ``noise_sampler``
    (Monte Carlo over ``samples`` draws; the expected I²F then needs one batched CG per draw and sample).
    ``lower_bound`` = √E‖J_iδ‖² / (λ_max + ε). ``expected=False`` skips the expected I²F.

    ``relative_damping`` = ρ adds ρ·median_i λ_max,i to ε: a damping on the spectrum's own scale, for models
    whose λ are far from 1 (a sigmoid LeNet at initialisation has λ_max ~ 1e-5, where ε = 1 would swamp
    everything); it also removes the low bias of undamped SLQ, whose quadrature misses the smallest λ.
    One ε serves the whole batch (reported in ``damping``).
    """
    if method not in ("slq", "exact"):
        raise ValueError(f"method must be 'slq' or 'exact', got {method!r}")
    if noise_std is not None and noise_sampler is not None:
        raise ValueError("give at most one of noise_std and noise_sampler")
    if noise_std is not None and (noise_std < 0 or not math.isfinite(noise_std)):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
    if damping < 0 or not math.isfinite(damping):
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    if relative_damping < 0 or not math.isfinite(relative_damping):
        raise ValueError(f"relative_damping must be a finite number >= 0, got {relative_damping}")
    if probes < 1 or samples < 1:
        raise ValueError("probes and samples must be >= 1")
    _check_stop(stop)
    params, xs, ys = _per_sample_batch(model, x, y)
    ref = next(iter(params.values()))
    N = xs.shape[0]
    n = xs[0].numel()
    d_theta = sum(p.numel() for p in params.values())
    gen = _generator(generator, ref.device)
    like = torch.empty(0, dtype=ref.dtype, device=ref.device)
    want_noise = noise_std is not None or noise_sampler is not None

    # The defense's draws come first from the generator, so they are the same whatever the method.
    deltas = _draw(noise_sampler, params, d_theta, samples, like, gen) if noise_sampler is not None else None
    with eval_mode(model):
        op = _PerSampleGram(model, xs, ys, loss_fn, chunk_size)
        lam_min = None
        if method == "exact":
            eye = torch.eye(n, dtype=ref.dtype, device=ref.device)
            # Columns per call bounded so the (samples × columns × d_θ) intermediate stays ~2^25 numbers.
            step = max(1, min(n, (1 << 25) // max(1, min(N, op.chunk) * d_theta)))
            cols = [op.gram(eye[s : s + step].unsqueeze(0).expand(N, -1, -1).contiguous()) for s in range(0, n, step)]
            A = torch.cat(cols, dim=1)
            A = (A + A.transpose(-1, -2)) / 2
            lam_all, U_all = torch.linalg.eigh(A)  # (N, n) ascending
            lam_max, lam_min = lam_all[:, -1], lam_all[:, 0]
            trace = lam_all.sum(-1)
            converged = torch.ones(N, dtype=torch.bool, device=ref.device)
            iterations = n
            theta, weights = lam_all.unsqueeze(1), None  # exact "quadrature": all eigenvalues, weight 1
        else:
            v0 = _rademacher((N, probes, n), like, gen)
            state: dict = {"prev": None}

            def quad_stable(lz: _Lanczos) -> bool:
                # Stop only once each chain's quadrature of f(λ) = λ/(λ+ε)² has settled (when it is wanted).
                if not (expected and noise_std is not None):
                    return True
                th, w = _slq_weights(lz)
                eps_now = float(damping) + relative_damping * float(th.amax(dim=(-1, -2)).median())
                est = (w * _f_damped(th, eps_now, -1.0 if eps_now > 0 else 0.0)).sum(-1)
                prev, state["prev"] = state["prev"], est
                return prev is not None and bool(((est - prev).abs() <= slq_tol * est.abs()).all())

            lz, lam_max, converged = _top_lanczos(op.gram, v0, tol, maxiter, gen, min_steps=2, extra_stop=quad_stable,
                                                  stop=stop)
            theta, weights = _slq_weights(lz)  # (N, p, m)
            # tr(J_iJ_iᵀ): deflated (Hutch++-style) from the chains when there are two or more, else Hutchinson.
            trace = _deflated_trace(lz, n) if probes > 1 and lz.steps < n else n * (weights * theta).sum(-1).mean(-1)
            iterations = lz.steps
            if not bool(converged.all()):
                warnings.warn(
                    f"per-sample λ_max: {int((~converged).sum())} of {N} samples did not reach tol={tol:g} in "
                    f"{lz.steps} Lanczos steps",
                    ConvergenceWarning,
                    stacklevel=2,
                )

        expected_jdelta = lower = exp_i2f = None
        eps = float(damping) + relative_damping * float(lam_max.median())
        if want_noise:
            if noise_std is not None:
                expected_jdelta = noise_std * trace.clamp_min(0).sqrt()
            else:
                assert deltas is not None
                jd = op.matvec_shared(deltas)  # (N, s, n)
                expected_jdelta = jd.pow(2).sum(-1).mean(-1).sqrt()
            if eps == 0:
                # Undamped per-sample I²F needs every J_iJ_iᵀ nonsingular: check the smallest eigenvalue seen.
                lo = lam_min if lam_min is not None else theta.clamp_min(0).amin(dim=(-1, -2))
                rc = _default_rcond(n, ref.dtype) if rcond is None else float(rcond)
                bad = (lo <= rc * lam_max) | torch.tensor(n > d_theta)
                if expected and bool(bad.any()):
                    eps = _fallback_damping(0.0, float(lam_max.max()), 0.0, n, d_theta, ref.dtype, rcond,
                                            "per_sample_leakage",
                                            f"{int(bad.sum())} of {N} samples have a numerically singular J_iJ_iᵀ")
            lower = expected_jdelta / (lam_max + eps)
            if expected:
                rc = _default_rcond(n, ref.dtype) if rcond is None else float(rcond)
                floor = (rc * lam_max).reshape(N, *([1] * (theta.dim() - 1))) if eps == 0 else -1.0
                if noise_std is not None:
                    fvals = _f_damped(theta, eps, 0.0) if eps > 0 else torch.where(
                        theta > floor, 1.0 / theta.clamp_min(1e-300), torch.zeros_like(theta))
                    # exact: every eigenvalue with weight 1; SLQ: n · mean over chains of Σ τ² f(θ)
                    tr_f = fvals.sum(-1).squeeze(-1) if weights is None else n * (weights * fvals).sum(-1).mean(-1)
                    exp_i2f = noise_std * tr_f.clamp_min(0).sqrt()
                else:
                    if method == "exact":
                        inv = torch.where(lam_all > floor if eps == 0 else torch.ones_like(lam_all, dtype=torch.bool),
                                          1.0 / (lam_all + eps).clamp_min(1e-300), torch.zeros_like(lam_all))
                        coeff = torch.einsum("nsk,nkj->nsj", jd, U_all) * inv.unsqueeze(1)
                        sq = coeff.pow(2).sum(-1)
                    else:
                        z, _, rel, broken = _cg(op.gram, jd, eps, 1e-6, min(max(2 * n, 50), 2000))
                        if bool(broken.any()) or bool((rel > 1e-6).any()):
                            warnings.warn(
                                f"per-sample CG reached only relative residual {float(rel.max()):.2e}",
                                ConvergenceWarning,
                                stacklevel=2,
                            )
                        sq = z.pow(2).sum(-1)
                    exp_i2f = sq.mean(-1).sqrt()

    return PerSampleLeakage(
        lambda_max=lam_max,
        lambda_min=lam_min,
        trace=trace,
        expected_jdelta=expected_jdelta,
        lower_bound=lower,
        expected_i2f=exp_i2f,
        expected_i2f_rmse=None if exp_i2f is None else exp_i2f / math.sqrt(n),
        converged=converged,
        iterations=iterations,
        method=method,
        damping=eps,
        labels=ys,
    )
