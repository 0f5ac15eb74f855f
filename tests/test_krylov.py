"""Direct tests of the Krylov solvers (``pl_i2f.influence.krylov``) on explicit symmetric matrices, in float64:
no model, no autograd — ``apply`` is a matrix product."""

from __future__ import annotations

import math

import pytest
import torch

from pl_i2f.influence import krylov

DT = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def psd(eigenvalues: list[float] | torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A = Q diag(λ) Qᵀ with a random orthogonal Q; returns A and Q."""
    lam = torch.as_tensor(eigenvalues, dtype=DT)
    q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=gen(seed), dtype=DT))
    return (q * lam) @ q.T, q


def matmul(A: torch.Tensor):
    return lambda v: v @ A  # A symmetric: (..., n) @ A = (A v) for each row


def test_repeated_eigenvalues_are_all_found_by_restarts():
    """A Krylov space holds one copy of each distinct eigenvalue: a single chain breaks down after 4 steps on a
    matrix with 4 distinct eigenvalues, restarts, and after n steps T's eigenvalues are A's, multiplicities
    included."""
    lam = [5.0, 5.0, 5.0, 2.0, 2.0, 1.0, 0.5, 0.5]
    A, _ = psd(lam, seed=1)
    lz = krylov.Lanczos(matmul(A), torch.randn(8, generator=gen(2), dtype=DT), 8, gen(3))
    while not lz.done:
        lz.step()
    # the first 4 steps span the components on the 4 distinct eigenvalues: an invariant subspace (to rounding,
    # which then seeds the next direction like an explicit restart does)
    assert float(lz.beta[3]) < 1e-10 * 5 and float(lz.beta[:3].min()) > 0.1
    theta, _, resid = lz.ritz()
    torch.testing.assert_close(theta, torch.tensor(sorted(lam), dtype=DT), rtol=0, atol=1e-12)
    assert float(resid.abs().max()) == 0.0  # n steps: T is exact
    Q = lz.Q[:8]
    torch.testing.assert_close(Q @ Q.T, torch.eye(8, dtype=DT), rtol=0, atol=1e-12)


def test_breakdown_restarts_orthogonally_and_keeps_t_exact():
    """A start vector inside a 2-dimensional invariant subspace breaks down at step 2 (β₂ = 0); the chain goes
    on from a fresh vector orthogonal to the basis, T = QᵀAQ keeps holding (block diagonal), and the
    quadrature of the start vector only sees the first block."""
    A, q = psd([4.0, 3.0, 2.0, 1.0, 0.25, 0.1], seed=4)
    v0 = q[:, 0] + 2 * q[:, 1]  # components on the eigenvalues 4 and 3 only
    lz = krylov.Lanczos(matmul(A), v0, 6, gen(5))
    for _ in range(4):
        lz.step()
    assert float(lz.beta[1]) == 0.0 and float(lz.beta[0]) > 0 and float(lz.beta[2]) > 0
    Q = lz.Q[:4]
    torch.testing.assert_close(Q @ Q.T, torch.eye(4, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(Q @ A @ Q.T, lz.tridiagonal(), rtol=0, atol=1e-12)
    theta, w = krylov.gauss_quadrature(lz)
    u = v0 / v0.norm()
    for f in (lambda t: t, lambda t: 1 / t, lambda t: t.exp()):  # uᵀf(A)u, exact on the invariant subspace
        lam, U = torch.linalg.eigh(A)
        assert abs(float((w * f(theta)).sum()) - float(u @ (U * f(lam)) @ U.T @ u)) < 1e-12
    # the restarted block is trusted only once it has converged at the wanted end
    assert krylov.last_block_converged(lz, "largest", 1e-8, theta[-1]) is False
    while not lz.done:
        lz.step()
    assert krylov.last_block_converged(lz, "largest", 1e-8, theta[-1]) is True


def test_top_lanczos_batched_over_problems_and_chains():
    """λ_max of three different matrices at once, two chains each, to the requested relative accuracy."""
    mats = [psd(torch.cat([torch.linspace(0.01, top / 2, 29), torch.tensor([top])]), seed=s)[0]
            for s, top in ((6, 3.0), (7, 10.0), (8, 0.5))]
    stacked = torch.stack(mats)  # (3, n, n)

    def apply(v):  # (3, p, n)
        return torch.einsum("bpn,bnm->bpm", v, stacked)

    v0 = torch.randn(3, 2, 30, generator=gen(9), dtype=DT)
    lz, lam, conv = krylov.top_lanczos(apply, v0, 1e-10, 30, gen(10))
    assert bool(conv.all()) and lz.steps < 30
    torch.testing.assert_close(lam, torch.tensor([3.0, 10.0, 0.5], dtype=DT), rtol=1e-9, atol=0)


def test_cg_on_a_singular_psd_system():
    """A = BBᵀ of rank 5 in 12 dimensions. For b in range(A), CG from zero stays in the range and converges to
    the minimum-norm solution A⁺b; damped, to (A + εI)⁻¹b; undamped with b outside the range it cannot
    converge, and says so."""
    B = torch.randn(12, 5, generator=gen(11), dtype=DT)
    A = B @ B.T
    b = A @ torch.randn(12, generator=gen(12), dtype=DT)
    z, its, rel, broken = krylov.cg(matmul(A), b.unsqueeze(0), 0.0, 1e-12, 50)
    assert not bool(broken.any()) and float(rel[0]) <= 1e-12 and int(its[0]) <= 6
    torch.testing.assert_close(z[0], torch.linalg.pinv(A) @ b, rtol=1e-8, atol=1e-10)
    z, _, rel, _ = krylov.cg(matmul(A), b.unsqueeze(0), 0.3, 1e-12, 50)
    torch.testing.assert_close(z[0], torch.linalg.solve(A + 0.3 * torch.eye(12, dtype=DT), b), rtol=1e-9, atol=0)
    outside = torch.randn(12, generator=gen(13), dtype=DT)
    z, _, rel, broken = krylov.cg(matmul(A), outside.unsqueeze(0), 0.0, 1e-12, 50)
    assert bool(broken.any()) or float(rel[0]) > 1e-6


def test_deflated_trace_is_unbiased_and_beats_hutchinson():
    """Over many independent Rademacher starts the deflated estimate averages to tr(A) (within 4 standard
    errors), with far less variance than plain Hutchinson on a spectrum dominated by a few eigenvalues; with
    the whole space spanned it is exact."""
    n = 40
    lam = torch.cat([torch.tensor([50.0, 20.0, 10.0]), torch.linspace(0.01, 1.0, n - 3)]).to(DT)
    A, _ = psd(lam, seed=14)
    g = gen(15)
    runs = 300
    deflated, plain = [], []
    for _ in range(runs):
        v0 = (2 * torch.randint(0, 2, (4, n), generator=g) - 1).to(DT)
        lz = krylov.Lanczos(matmul(A), v0, 4, g)
        while not lz.done:
            lz.step()
        deflated.append(float(krylov.deflated_trace(lz)))
        plain.append(float((v0 @ A * v0).sum(-1).mean()))
    deflated_t, plain_t = torch.tensor(deflated), torch.tensor(plain)
    truth = float(lam.sum())
    se = float(deflated_t.std()) / math.sqrt(runs)
    assert abs(float(deflated_t.mean()) - truth) < 4 * se
    assert float(deflated_t.std()) < 0.2 * float(plain_t.std())
    lz = krylov.Lanczos(matmul(A), v0, n, g)
    while not lz.done:
        lz.step()
    torch.testing.assert_close(lz.alpha.sum(-1), torch.full((4,), truth, dtype=DT), rtol=1e-10, atol=0)  # tr T = tr A
    assert abs(float(krylov.deflated_trace(lz)) - truth) < 1e-10 * truth


def test_convergence_tests_honour_tol_and_gap():
    theta = torch.tensor([1.0, 2.0, 4.0], dtype=DT)
    resid = torch.tensor([1e-3, 1e-3, 1e-3], dtype=DT)
    err = krylov.ritz_value_error(theta, resid)
    torch.testing.assert_close(err, resid.square() / torch.tensor([1.0, 1.0, 2.0], dtype=DT))
    assert not bool(krylov.ritz_converged(theta, resid, theta[-1], 1e-6, 10, top=True).any())
    assert bool(krylov.ritz_converged(theta, err, theta[-1], 1e-6, 10, top=True).all())
    with pytest.raises(ValueError, match="stop must be"):
        krylov.check_stop("value")
