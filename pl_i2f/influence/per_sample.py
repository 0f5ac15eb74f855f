"""Per-sample leakage: every sample of a batch as its own private input x₀ = x[i], all at once with ``vmap``.

Sample i has its own J_i = ∂²ℓ(x_i, y_i)/∂x∂θ (d_x = C·H·W). :class:`PerSampleOperator` gives the N operators
J_iJ_iᵀ as one problem set of the shared estimator (:mod:`pl_i2f.influence.estimator`), so the numbers are
those of :func:`~pl_i2f.influence.expected_i2f` on each sample alone, computed in one batched run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from pl_i2f.gradients import LossFn, batch_loss_fn, eval_mode, flatten, trainable_parameters
from pl_i2f.influence.damping import Damping, check_nonnegative
from pl_i2f.influence.estimator import (
    dense_quadrature,
    draw_noise,
    expected_squares,
    root_mean_square,
    slq_quadrature,
)
from pl_i2f.influence.krylov import check_stop
from pl_i2f.influence.operator import GradientJacobian
from pl_i2f.influence.results import ConvergenceWarning, NoiseSampler, PerSampleLeakage, renamed, warn_caller
from pl_i2f.influence.settings import EXACT_BLOCK_NUMBERS, cg_maxiter
from pl_i2f.rng import analysis_generator, rademacher

METHODS = ("slq", "exact")


def per_sample_batch(model: nn.Module, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The trainable parameters and the batch, validated and moved to the parameters' device and dtype."""
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


class PerSampleOperator:
    """The per-sample operators of one batch, built once per evaluation and shared by every estimator: each
    sample's J_iJ_iᵀ at once, (N, p, n) → (N, p, n), ``vmap`` over samples (outer) and vectors (inner, sharing
    the sample's primal computation), in chunks of ``chunk_size`` samples; the products J_iδ for shared δ's;
    the dense J_iJ_iᵀ; and, for one sample, the plain autograd operator (:meth:`lanczos_apply`).

    The batch is validated and moved to the parameters' device and dtype here (``xs``, ``ys``); products run
    under the model's eval mode only inside an ``eval_mode(model)`` block, which the caller holds."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn | None = None,
                 chunk_size: int | None = None):
        params, self.x, self.y = per_sample_batch(model, x, y)
        self.model = model
        self.params = params
        self.like = torch.empty(0, dtype=self.x.dtype, device=self.x.device)  # dtype and device of every vector
        self.loss = batch_loss_fn(model, loss_fn)
        self.loss_fn = loss_fn
        self.sample_shape = tuple(x.shape[1:])
        self.N, self.n = self.x.shape[0], self.x[0].numel()
        self.d_theta = sum(p.numel() for p in params.values())
        self.chunk = self.N if chunk_size is None else max(1, int(chunk_size))
        self._single: GradientJacobian | None = None
        params, loss = self.params, self.loss

        def g1(xi: Tensor, yi: Tensor) -> Tensor:
            return flatten(grad(loss)(params, xi.unsqueeze(0), yi.unsqueeze(0)))

        def gram1(xi: Tensor, yi: Tensor, bi: Tensor) -> Tensor:
            fn = lambda z: g1(z, yi)  # noqa: E731 — a closure over the sample's label
            v = jvp(fn, (xi,), (bi,))[1]
            return vjp(fn, xi)[1](v)[0]

        def mat1(xi: Tensor, yi: Tensor, di: Tensor) -> Tensor:
            return vjp(lambda z: g1(z, yi), xi)[1](di)[0]

        def columns(xi: Tensor, yi: Tensor, tangents: Tensor) -> Tensor:
            return vmap(lambda t: jvp(lambda z: g1(z, yi), (xi,), (t,))[1])(tangents)

        inner = (None, None, 0)
        self._grads = vmap(g1)
        self._mat = vmap(mat1)  # a different δ per sample
        self._gram = vmap(vmap(gram1, in_dims=inner))
        self._mat_shared = vmap(vmap(mat1, in_dims=inner), in_dims=(0, 0, None))  # same δ's for every sample
        self._columns = vmap(columns, in_dims=(0, 0, None))  # Jacobian columns Jᵢeⱼ, the same eⱼ for every sample

    def _chunks(self, fn: Callable, v: Tensor, shared: bool = False) -> Tensor:
        out = []
        for s in range(0, self.N, self.chunk):
            e = s + self.chunk
            out.append(fn(self.x[s:e], self.y[s:e], v if shared else v[s:e]))
        return torch.cat(out)

    def gram(self, v: Tensor) -> Tensor:  # (N, p, n) → (N, p, n)
        N, p, n = v.shape
        out = self._chunks(self._gram, v.reshape(N, p, *self.sample_shape))
        return out.reshape(N, p, n)

    def lanczos_apply(self) -> Callable[[Tensor], Tensor]:
        """The product a per-sample Lanczos run uses: :meth:`gram`, or for one sample the plain autograd operator
        (one recorded graph, no vmap: several times cheaper a product on CPU)."""
        if self.N > 1:
            return self.gram
        if self._single is None:
            self._single = GradientJacobian(self.model, self.x, self.y)
        return self._single._apply_flat

    def dense_gram(self) -> Tensor:  # (N, n, n), from n products per sample
        N, n = self.N, self.n
        eye = torch.eye(n, dtype=self.x.dtype, device=self.x.device)
        # Columns per call bounded so the (samples × columns × d_θ) intermediate stays ~EXACT_BLOCK_NUMBERS numbers.
        step = max(1, min(n, EXACT_BLOCK_NUMBERS // max(1, min(N, self.chunk) * self.d_theta)))
        cols = [self.gram(eye[s : s + step].unsqueeze(0).expand(N, -1, -1).contiguous()) for s in range(0, n, step)]
        A = torch.cat(cols, dim=1)
        return (A + A.transpose(-1, -2)) / 2

    def gradients(self) -> Tensor:  # (N, d_θ): every sample's own gradient gᵢ
        return torch.cat([self._grads(self.x[s: s + self.chunk], self.y[s: s + self.chunk])
                          for s in range(0, self.N, self.chunk)])

    def transpose_apply(self, d: Tensor) -> Tensor:  # (N, d_θ) → (N, n): Jᵢᵀdᵢ, one δ per sample
        out = self._chunks(self._mat, d)
        return out.reshape(out.shape[0], -1)

    def matvec_shared(self, deltas: Tensor) -> Tensor:  # (s, d_θ) → (N, s, n)
        out = self._chunks(self._mat_shared, deltas, shared=True)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def jacobian_columns(self, count: int, start: int, stop: int) -> Tensor:
        """Columns ``start`` … ``stop`` − 1 of the first ``count`` samples' Jacobians, (count, columns, d_θ):
        one forward-mode product each."""
        eye = torch.eye(self.n, dtype=self.x.dtype, device=self.x.device).reshape(self.n, *self.sample_shape)
        return self._columns(self.x[:count], self.y[:count], eye[start:stop])


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
    noise_draws: int = 32,
    tol: float = 1e-4,
    stop: str = "eigenvalue",
    slq_tol: float = 1e-2,
    maxiter: int = 64,
    chunk_size: int | None = None,
    rcond: float | None = None,
    generator: torch.Generator | None = None,
    samples: int | None = None,
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
    (Monte Carlo over ``noise_draws`` draws; the expected I²F then needs one batched CG per draw and sample).
    ``lower_bound`` = √E‖J_iδ‖² / (λ_max + ε). ``expected=False`` skips the expected I²F.

    ``relative_damping`` = ρ adds ρ·median_i λ_max,i to ε: a damping on the spectrum's own scale, for models
    whose λ are far from 1 (a sigmoid LeNet at initialisation has λ_max ~ 1e-5, where ε = 1 would swamp
    everything); it also removes the low bias of undamped SLQ, whose quadrature misses the smallest λ.
    One ε serves the whole batch (reported in ``damping``). ``samples`` is the deprecated name of ``noise_draws``.
    """
    noise_draws = renamed("noise_draws", noise_draws, "samples", samples)
    if probes < 1:
        raise ValueError("probes and noise_draws must be >= 1")
    operator = PerSampleOperator(model, x, y, loss_fn, chunk_size)
    with eval_mode(model):
        return operator_leakage(operator, noise_std, noise_sampler, damping, relative_damping=relative_damping,
                                method=method, expected=expected, chains=probes, noise_draws=noise_draws, tol=tol,
                                stop=stop, slq_tol=slq_tol, maxiter=maxiter, rcond=rcond, generator=generator)


def operator_leakage(
    problems: PerSampleOperator,
    noise_std: float | None = None,
    noise_sampler: NoiseSampler | None = None,
    damping: float = 0.0,
    *,
    relative_damping: float = 0.0,
    method: str = "slq",
    expected: bool = True,
    chains: int = 4,
    noise_draws: int = 32,
    tol: float = 1e-4,
    stop: str = "eigenvalue",
    slq_tol: float = 1e-2,
    maxiter: int = 64,
    rcond: float | None = None,
    generator: torch.Generator | None = None,
) -> PerSampleLeakage:
    """:func:`per_sample_leakage` on an operator already built (the arguments are that function's, ``chains``
    its ``probes``: Lanczos chains per sample); the caller holds the model in eval mode."""
    if method not in METHODS:
        raise ValueError(f"method must be 'slq' or 'exact', got {method!r}")
    if noise_std is not None and noise_sampler is not None:
        raise ValueError("give at most one of noise_std and noise_sampler")
    if noise_std is not None:
        check_nonnegative(noise_std, "noise_std")
    if chains < 1 or noise_draws < 1:
        raise ValueError("probes and noise_draws must be >= 1")
    check_stop(stop)
    params, like = problems.params, problems.like
    N, n = problems.N, problems.n
    damp = Damping.request(damping, relative=relative_damping, d_x=n, dtype=like.dtype, caller="per_sample_leakage",
                           rcond=rcond)
    gen = analysis_generator(generator, like.device)

    # The defense's draws come first from the generator, so they are the same whatever the method.
    deltas = draw_noise(noise_sampler, params, noise_draws, like, gen) if noise_sampler is not None else None
    if method == "exact":
        quadrature = dense_quadrature(problems.dense_gram())
    else:
        watch = damp if expected and noise_std is not None else None
        quadrature = slq_quadrature(problems.gram, rademacher((N, chains, n), gen, like), lambda_tol=tol,
                                    quad_tol=slq_tol, maxiter=maxiter, stop=stop, generator=gen, watch=watch)
        if not bool(quadrature.converged.all()):
            warn_caller(
                f"per-sample λ_max: {int((~quadrature.converged).sum())} of {N} samples did not reach tol={tol:g} "
                f"in {quadrature.steps} Lanczos steps",
                ConvergenceWarning,
            )
    lam_max = quadrature.lambda_max
    trace = quadrature.trace()
    expected_jdelta = lower = exp_i2f = None
    epsilon = damp.at(lam_max)
    if noise_std is not None or deltas is not None:
        jdeltas = None if deltas is None else problems.matvec_shared(deltas)  # (N, s, n)
        if jdeltas is None:
            expected_jdelta = noise_std * trace.clamp_min(0).sqrt()
        else:
            expected_jdelta = jdeltas.pow(2).sum(-1).mean(-1).sqrt()
        if expected:
            squares, epsilon = expected_squares(problems, quadrature, damp, isotropic=jdeltas is None,
                                                jdeltas=jdeltas, cg_maxiter=cg_maxiter(n),
                                                lambda_max=lambda: float(lam_max.max()))
            exp_i2f = root_mean_square(squares)[0]
            if noise_std is not None:
                exp_i2f = noise_std * exp_i2f
        lower = expected_jdelta / (lam_max + epsilon)

    return PerSampleLeakage(
        lambda_max=lam_max,
        lambda_min=quadrature.lambda_min,
        trace=trace,
        expected_jdelta=expected_jdelta,
        lower_bound=lower,
        expected_i2f=exp_i2f,
        expected_i2f_rmse=None if exp_i2f is None else exp_i2f / math.sqrt(n),
        converged=quadrature.converged,
        iterations=quadrature.steps,
        method=method,
        damping=epsilon,
        labels=problems.y,
    )
