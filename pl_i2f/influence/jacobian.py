"""Explicit per-sample Jacobians J_i = ∂(∇_θ L(x_i))/∂x_i (d_θ × d_x) and their x-side Grams G_i = J_iᵀJ_i.

For a small input (d_x ≤ ~1024) an explicit J_i is a modest d_θ × d_x matrix, and with G_i in hand every
spectral quantity of the sample (λ_max, λ_min, Σ f(λ), the σ that holds an error at a target) is a small
eigen-problem instead of a Krylov run. One call forms them for a batch of probes: ``vmap`` over the probes
of forward-mode products of x ↦ ∇_θ L(x) along the d_x unit tangents (forward-over-reverse: d_x tangents
per probe, where reverse-over-reverse would need d_θ ≫ d_x rows), the per-sample gradient g_i coming out of
the same primal computation. Probes and tangents are taken in blocks of about ``max_numbers`` numbers
(probes × tangents × d_θ), so memory stays bounded whatever the batch.

The model runs in eval mode (BatchNorm on its running statistics, dropout off) through
:func:`pl_i2f.gradients.batch_loss_fn`, like every other analysis path; models carrying Opacus hooks must
be passed through :func:`pl_i2f.defenses.base.analysis_model` first (``torch.func`` cannot run them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from pl_i2f.gradients import LossFn, batch_loss_fn, eval_mode, flatten
from pl_i2f.influence import settings
from pl_i2f.influence.chain import Chain, ChainProducts, chain_of
from pl_i2f.influence.per_sample import per_sample_batch
from pl_i2f.influence.settings import EXACT_BLOCK_NUMBERS
from pl_i2f.threat import clipped_gram

__all__ = ["JacobianChunk", "PerSampleGrams", "chain_route", "gram_terms", "iter_per_sample_jacobians",
           "per_sample_grams", "per_sample_jacobians"]

MAX_JACOBIAN_NUMBERS = 1 << 28
"""Largest single-probe Jacobian (d_θ × d_x numbers) the explicit route forms; beyond it (a ResNet on CIFAR
images: 11 M × 3,072) the matrix-free products of :mod:`pl_i2f.influence.per_sample` are the only option."""


@dataclass
class JacobianChunk:
    """Probes ``start:start + n`` of the batch: ``jacobians`` (n, d_θ, d_x) and ``gradients`` (n, d_θ)."""

    start: int
    jacobians: Tensor
    gradients: Tensor


@dataclass
class PerSampleGrams:
    """``grams`` (N, d_x, d_x) G_i = J_iᵀJ_i (of the clipped gradient when a clipping norm was given) and
    ``gradients`` (N, d_θ) the unclipped per-sample gradients g_i, in the order of the batch."""

    grams: Tensor
    gradients: Tensor


def iter_per_sample_jacobians(model: nn.Module, x: Tensor, y: Tensor, *, loss_fn: LossFn | None = None,
                              max_numbers: int = EXACT_BLOCK_NUMBERS,
                              tangents: Tensor | None = None, reuse_buffers: bool = False) -> Iterator[JacobianChunk]:
    """Every probe's J_i (d_θ × d_x) and g_i, a chunk of probes at a time (see :class:`JacobianChunk`).

    ``tangents`` (r, d_x), rows shared by every probe: J_i Tᵀ (d_θ × r) instead — the Jacobian on a subspace
    of inputs (e.g. the span the data varies in), r forward-mode products per probe instead of d_x.

    ``reuse_buffers``: a chain network's chunks (:mod:`pl_i2f.influence.chain`) share buffers kept between calls
    for the same model — each chunk is overwritten by the next one, and by the next call.

    A chunk holds as many probes as fit in ``max_numbers`` numbers (at least one); a probe whose own
    Jacobian exceeds it is built from tangent blocks of that size. Consume each chunk before the next one to
    keep memory at one chunk."""
    if max_numbers < 1:
        raise ValueError(f"max_numbers must be >= 1, got {max_numbers}")
    params, xs, ys = per_sample_batch(model, x, y)
    N, d_x = xs.shape[0], xs[0].numel()
    d_theta = sum(p.numel() for p in params.values())
    loss = batch_loss_fn(model, loss_fn)
    if tangents is None:
        eye = torch.eye(d_x, dtype=xs.dtype, device=xs.device).reshape(d_x, *xs.shape[1:])
    else:
        if tangents.dim() != 2 or tangents.shape[1] != d_x or tangents.shape[0] < 1:
            raise ValueError(f"tangents must be (r, d_x = {d_x}) with r >= 1, got {tuple(tangents.shape)}")
        eye = tangents.to(dtype=xs.dtype, device=xs.device).reshape(-1, *xs.shape[1:])
    columns_count = eye.shape[0]
    if d_theta * columns_count > MAX_JACOBIAN_NUMBERS:
        raise ValueError(f"an explicit per-sample Jacobian of d_θ × {columns_count} = {d_theta} × {columns_count} "
                         f"numbers is too large (limit {MAX_JACOBIAN_NUMBERS}); use the matrix-free products of "
                         "pl_i2f.influence")

    def columns(xi: Tensor, yi: Tensor, tangents: Tensor) -> tuple[Tensor, Tensor]:
        def g1(z: Tensor) -> Tensor:
            return flatten(grad(loss)(params, z.unsqueeze(0), yi.unsqueeze(0)))

        g, cols = vmap(lambda t: jvp(g1, (xi,), (t,)))(tangents)
        return g[0], cols  # the primal g_i, the same along every tangent (as torch.func.jacfwd's aux)

    per_probe = d_theta * columns_count
    probes = max(1, min(N, max_numbers // per_probe))
    block = columns_count if per_probe <= max_numbers else max(1, max_numbers // d_theta)
    batched = vmap(columns, in_dims=(0, 0, None))
    chain = chain_route(model, xs, ys, loss_fn)
    if chain is not None:  # the same columns by batched matrix products (a chain network's fast route)
        reuse = reuse_buffers and block == columns_count  # one call per chunk: nothing to concatenate
        batched = ChainProducts(chain, reuse=reuse).columns
    with eval_mode(model):
        for s in range(0, N, probes):
            xc, yc = xs[s: s + probes], ys[s: s + probes]
            g, cols = None, []
            for t in range(0, columns_count, block):
                g, c = batched(xc, yc, eye[t: t + block])  # (n, d_θ), (n, block, d_θ)
                cols.append(c)
            J = (cols[0] if len(cols) == 1 else torch.cat(cols, 1)).transpose(1, 2)
            yield JacobianChunk(s, J, g)


def chain_route(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn | None = None) -> Chain | None:
    """The chain :func:`iter_per_sample_jacobians` runs ``model`` as on the batch ``(x, y)`` (integer class labels;
    soft labels take the generic route), or None: the generic route, also whenever
    ``pl_i2f.influence.settings.CHAIN_PRODUCTS`` is off."""
    labels = y.dim() == 1 and not y.is_floating_point() and not y.is_complex() and bool((y >= 0).all())
    return chain_of(model, tuple(x.shape[1:]), loss_fn) if settings.CHAIN_PRODUCTS and labels else None


def per_sample_jacobians(model: nn.Module, x: Tensor, y: Tensor, *, loss_fn: LossFn | None = None,
                         max_numbers: int = EXACT_BLOCK_NUMBERS) -> tuple[Tensor, Tensor]:
    """All probes' J_i as one (N, d_θ, d_x) tensor and their gradients g_i (N, d_θ). Holds N·d_θ·d_x numbers:
    for many probes prefer :func:`iter_per_sample_jacobians` or :func:`per_sample_grams`."""
    chunks = list(iter_per_sample_jacobians(model, x, y, loss_fn=loss_fn, max_numbers=max_numbers))
    return torch.cat([c.jacobians for c in chunks]), torch.cat([c.gradients for c in chunks])


def gram_terms(jacobians: Tensor, gradients: Tensor, dtype: torch.dtype | None = torch.float64
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Every probe's G_i = J_iᵀJ_i (n, r, r), J_iᵀg_i (n, r) and ‖g_i‖ (n,) from a chunk's ``jacobians``
    (n, d_θ, r) and ``gradients`` (n, d_θ), accumulated in ``dtype`` (``None``: the Jacobians' own).

    One product per probe: the Gram of [J_i g_i], whose last row is J_iᵀg_i (‖g_i‖ is taken from g_i itself, as
    every other path does: clipping compares it with C). The probes are converted a few at a time into one buffer
    reused for all of them: a whole chunk's float64 copy is tens of megabytes that the allocator maps afresh (and
    the kernel zero-fills) at every call — it used to cost more than the products."""
    n, d, r = jacobians.shape
    dtype = dtype or jacobians.dtype
    out = torch.empty(n, r + 1, r + 1, dtype=dtype, device=jacobians.device)
    # a few probes a product: one per CPU thread (a batched product runs them side by side), all at once on a GPU
    # (whose allocator keeps its memory)
    k = n if jacobians.is_cuda else max(1, min(n, torch.get_num_threads()))
    rows = torch.empty(k, r + 1, d, dtype=dtype, device=jacobians.device)
    for s in range(0, n, k):
        block = rows[: min(k, n - s)]
        block[:, :r].copy_(jacobians[s: s + k].transpose(1, 2))
        block[:, r].copy_(gradients[s: s + k])
        torch.bmm(block, block.transpose(1, 2), out=out[s: s + k])
    grams = out[:, :r, :r]
    return (grams + grams.transpose(1, 2)) / 2, out[:, r, :r].clone(), gradients.to(dtype).norm(dim=1)


def per_sample_grams(model: nn.Module, x: Tensor, y: Tensor, *, loss_fn: LossFn | None = None,
                     clipping_norm: float | None = None, dtype: torch.dtype | None = torch.float64,
                     max_numbers: int = EXACT_BLOCK_NUMBERS) -> PerSampleGrams:
    """Every probe's x-side Gram G_i = J_iᵀJ_i (N, d_x, d_x) and gradient g_i, one chunk of Jacobians alive
    at a time. Its eigenvalues are those of J_iJ_iᵀ in the engine's convention (the same nonzero spectrum).

    ``dtype``: the precision of the Gram's accumulation (``None``: the model's). Float64 by default: J_i
    itself is accurate to float32 rounding relative to its largest singular value, but squaring it in float32
    leaves every eigenvalue below ~1e-6·λ_max to rounding, and the monitor's Jacobians are conditioned past
    that (see docs/benchmarks.md, "The headline leakage number", on the numerical rank).

    ``clipping_norm`` C: the Jacobian of the *clipped* gradient clip(g_i) = g_i·min(1, C/‖g_i‖), the one
    DP-SGD releases: where ‖g_i‖ > C it is (C/‖g_i‖)(I − ĝ_iĝ_iᵀ)J_i, whose Gram is
    (C/‖g_i‖)²(G_i − u_iu_iᵀ) with u_i = J_iᵀĝ_i (:func:`pl_i2f.threat.clipped_gram`); elsewhere clipping
    is the identity."""
    if clipping_norm is not None and not clipping_norm > 0:
        raise ValueError(f"clipping_norm must be > 0, got {clipping_norm}")
    grams, grads = [], []
    for chunk in iter_per_sample_jacobians(model, x, y, loss_fn=loss_fn, max_numbers=max_numbers):
        G, jtg, norm = gram_terms(chunk.jacobians, chunk.gradients, dtype)
        if clipping_norm is not None:
            G = clipped_gram(G, jtg, norm, clipping_norm)
        grams.append(G)
        grads.append(chunk.gradients)
    return PerSampleGrams(torch.cat(grams), torch.cat(grads))
