"""The leakage monitor's evaluation: per-sample λ_max, trace and expected I²F from one Lanczos basis per
sample, built fresh or warm-started from the previous evaluation's basis.

Why: on a CPU the per-sample products are overhead-bound for small models — one vmapped JᵢJᵢᵀ product of
8 samples × 1 vector costs about as much as 8 × 12 (lenet_zhu on digits: ~150 ms against ~300 ms on the
project's loaded 2-core machine) — so a fresh Lanczos run of k sequential products costs ~k/2 times a pair
of block products. The Jacobian moves slowly between evaluations, so the previous evaluation's Krylov
basis, extended by its image under the new operator, holds nearly all of the new Krylov space.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from pl_i2f.gradients import eval_mode, flatten
from pl_i2f.influence.estimator import f_damped
from pl_i2f.influence.krylov import Lanczos
from pl_i2f.influence.operator import GradientJacobian
from pl_i2f.influence.per_sample import PerSampleGram, _per_sample_batch
from pl_i2f.influence.settings import EXACT_BLOCK_NUMBERS
from pl_i2f.rng import analysis_generator, rademacher

__all__ = ["BasisLeakage", "basis_leakage", "exact_spectra"]


@dataclass
class BasisLeakage:
    """Per-sample leakage from a Lanczos basis per sample (:func:`basis_leakage`). All (N,) tensors:
    ``lambda_max`` (Ritz value, a lower bound) and ``lambda_max_residual`` its residual norm;
    ``trace`` tr(JᵢJᵢᵀ) (Hutchinson, one Rademacher vector); ``unit_i2f_sq`` E‖I²Fᵢ‖² under isotropic noise
    of σ = 1 (Gauss quadrature of f(λ) = λ/(λ+ε)² from that vector, × d_x); ``basis`` (N, k, d_x) the
    Krylov basis to warm-start the next evaluation from; ``damping`` ε used; ``products`` (calls, vectors)."""

    lambda_max: Tensor
    lambda_max_residual: Tensor
    trace: Tensor
    unit_i2f_sq: Tensor
    basis: Tensor
    damping: float
    products: tuple[int, int]
    warm: bool
    spectra_seconds: float = 0.0  # set by the caller that adds exact spectra (pl_i2f.leakage.monitor_leakage)


def _orthonormal_complement(Z: Tensor, V: Tensor) -> Tensor:
    """Rows of Z (..., k, n) made orthonormal and orthogonal to the orthonormal rows of V (..., m, n)."""
    for _ in range(2):
        Z = Z - (Z @ V.transpose(-1, -2)) @ V
    Q = torch.linalg.qr(Z.transpose(-1, -2)).Q.transpose(-1, -2)
    for _ in range(2):  # a (numerically) invariant V leaves Z ~ 0: QR's arbitrary columns need it again
        Q = Q - (Q @ V.transpose(-1, -2)) @ V
    return torch.linalg.qr(Q.transpose(-1, -2)).Q.transpose(-1, -2)


def basis_leakage(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    steps: int = 16,
    basis: Tensor | None = None,
    damping: float = 0.0,
    relative_damping: float = 0.01,
    generator: torch.Generator | None = None,
    max_seconds: float | None = None,
    min_steps: int = 2,
    stop: Callable[[int, float], bool] | None = None,
) -> BasisLeakage:
    """Per-sample λ_max, trace and unit-noise expected I²F from one Lanczos basis per sample — the
    monitor's cheap evaluation, fresh or warm-started from the previous evaluation's basis.

    Fresh (``basis=None``): ``steps`` Lanczos steps from one Rademacher vector bᵢ per sample (``steps``
    sequential products). Warm (``basis`` (N, k, d_x) from a previous call on nearby weights, first row
    bᵢ/‖bᵢ‖): two block products instead — A V, then A on the part of A V outside span V — and
    Rayleigh–Ritz on the 2k-dimensional span; the Gauss quadrature from bᵢ on that span stands in for the
    Lanczos one (the Jacobian moves slowly between evaluations, so the old Krylov space plus its image under
    the new operator holds nearly all of the new one). Two products instead of k: on an overhead-bound model
    (lenet_zhu on CPU, where one vmapped product of 8 samples × 12 vectors costs about two of 8 × 1) an
    evaluation costs ~3.5× less; the next basis is the Krylov basis of the projected matrix from bᵢ (no
    product), of up to ``steps`` vectors (a basis of k < ``steps`` vectors grows to min(2k, ``steps``), so a
    short fresh start reaches full size in a few evaluations). Its leading rows are the smaller Krylov basis,
    so a warm start may use only the first rows (a reduced evaluation). Measured against exact spectra along
    a digits run: within 5% (tests/test_monitoring.py). (A one-product variant — A on the stored basis and
    its previous image together — lags the Jacobian by one evaluation and was 20% off at step 80 of that
    run: the second product is what keeps the estimate within 5%.)
    ε = ``damping`` + ``relative_damping`` · median λ_max, as :func:`per_sample_leakage`.

    ``max_seconds`` (fresh runs): stop the Lanczos run before a step that would end past this many seconds
    (each step predicted to take as long as the one before), after at least ``min_steps`` steps — the first
    products of a run are its own price, so an evaluation whose cost is not known yet (the first one of a
    large model) does what fits instead of timing a product and throwing it away. ``stop(steps, seconds of
    the last step)``: the caller's own reason to stop there (also after ``min_steps``).
    """
    params, xs, ys = _per_sample_batch(model, x, y)
    ref = next(iter(params.values()))
    N, n = xs.shape[0], xs[0].numel()
    steps = max(1, min(int(steps), n))
    gen = analysis_generator(generator, ref.device)
    like = torch.empty(0, dtype=ref.dtype, device=ref.device)
    if basis is not None and (basis.shape[0] != N or basis.shape[-1] != n or basis.shape[1] > n):
        basis = None  # another probe set or input size: start afresh
    with eval_mode(model):
        if N == 1:
            # one probe: the plain autograd operator, no vmap — 2.5x cheaper a product on resnet18 on CPU
            # (4 s against 10 s on the loaded 2-core machine), 4x on lenet_zhu (20 ms against 80 ms)
            single = GradientJacobian(model, xs, ys)
            gram = single._apply_flat
        else:
            gram = PerSampleGram(model, xs, ys, None, None).gram
        if basis is None:
            lz = Lanczos(gram, rademacher((N, 1, n), gen, like), steps, gen)
            started = time.perf_counter()
            while not lz.done:
                before = time.perf_counter()
                lz.step()
                now = time.perf_counter()
                if lz.steps >= min_steps and (
                        (max_seconds is not None and now - started + (now - before) > max_seconds)
                        or (stop is not None and stop(lz.steps, now - before))):
                    break
            m = lz.steps
            off = lz.beta[:, 0, : m - 1]
            T = torch.diag_embed(lz.alpha[:, 0, :m]) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
            theta, S = torch.linalg.eigh(T)
            last = lz.beta[:, 0, m - 1] if m < n else torch.zeros_like(theta[:, 0])
            resid = last.abs() * S[:, m - 1, -1].abs()
            products = (m, N * m)
            next_basis = lz.Q[:, 0, :m, :]
        else:
            V = basis.to(device=ref.device, dtype=ref.dtype)
            k = V.shape[1]
            W = gram(V)
            U = _orthonormal_complement(W - (V @ W.transpose(-1, -2)) @ V, V)
            W2 = gram(U)
            B = torch.cat([V, U], 1)
            AB = torch.cat([W, W2], 1)
            T = B @ AB.transpose(-1, -2)
            T = (T + T.transpose(-1, -2)) / 2
            theta, S = torch.linalg.eigh(T)
            top = S[:, :, -1]  # (N, 2k) coefficients of the top Ritz vector
            resid = (torch.einsum("nk,nkd->nd", top, AB) - theta[:, -1:] * torch.einsum("nk,nkd->nd", top, B)).norm(
                dim=-1)
            products = (2, 2 * N * k)
            # next basis: the Krylov basis of the projected matrix from e₁ (= bᵢ), mapped back; no product
            e1 = torch.zeros(N, 1, T.shape[-1], dtype=T.dtype, device=T.device)
            e1[..., 0] = 1
            small = Lanczos(lambda v: v @ T, e1, min(2 * k, steps), gen)  # the basis grows up to `steps`
            while not small.done:
                small.step()
            next_basis = small.Q[:, 0, : small.steps, :] @ B
    lam_max = theta[:, -1]
    eps = float(damping) + relative_damping * float(lam_max.median())
    weights = S[:, 0, :] ** 2  # the start vector bᵢ/‖bᵢ‖ is the first basis row
    f = f_damped(theta, eps, -1.0 if eps > 0 else 1e-12 * float(lam_max.max()))
    return BasisLeakage(
        lambda_max=lam_max,
        lambda_max_residual=resid,
        trace=n * T[:, 0, 0],
        unit_i2f_sq=n * (weights * f).sum(-1),
        basis=next_basis.detach(),
        damping=eps,
        products=products,
        warm=basis is not None,
    )


def exact_spectra(model: nn.Module, x: Tensor, y: Tensor, block_numbers: int = EXACT_BLOCK_NUMBERS) -> Tensor:
    """Every eigenvalue of each sample's JᵢJᵢᵀ (N, d_x), ascending, from its explicit Jacobian: the d_x
    columns Jᵢeⱼ (θ-space) as forward-mode products of x ↦ ∇_θℓ, vmapped over the columns and the samples,
    then the eigenvalues of the d_x × d_x Gram matrix of those columns. A column is one forward-mode product,
    where a JJᵀ product is a forward and a reverse one: about half the cost of forming JJᵀ from d_x products
    (:meth:`PerSampleGram.dense_gram`). Columns are taken in blocks of about ``block_numbers`` numbers
    (samples × columns × d_θ)."""
    params, xs, ys = _per_sample_batch(model, x, y)
    loss = PerSampleGram(model, xs, ys, None, None).loss
    N, n = xs.shape[0], xs[0].numel()
    d_theta = sum(p.numel() for p in params.values())
    eye = torch.eye(n, dtype=xs.dtype, device=xs.device).reshape(n, *xs.shape[1:])

    def columns(xi: Tensor, yi: Tensor, tangents: Tensor) -> Tensor:
        def g1(z: Tensor) -> Tensor:
            return flatten(grad(loss)(params, z.unsqueeze(0), yi.unsqueeze(0)))

        return vmap(lambda t: jvp(g1, (xi,), (t,))[1])(tangents)

    block = max(1, min(n, block_numbers // max(1, N * d_theta)))
    gram_blocks = torch.zeros(N, n, n, dtype=xs.dtype, device=xs.device)
    with eval_mode(model):
        cols = [vmap(columns, in_dims=(0, 0, None))(xs, ys, eye[s: s + block]) for s in range(0, n, block)]
    for i, ci in enumerate(cols):
        for j, cj in enumerate(cols[: i + 1]):
            g = ci @ cj.transpose(-1, -2)  # (N, block_i, block_j)
            si, sj = i * block, j * block
            gram_blocks[:, si: si + ci.shape[1], sj: sj + cj.shape[1]] = g
            gram_blocks[:, sj: sj + cj.shape[1], si: si + ci.shape[1]] = g.transpose(-1, -2)
    return torch.linalg.eigvalsh(gram_blocks.double()).to(xs.dtype)
