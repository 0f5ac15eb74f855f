"""Benchmarks of the I²F engine (pl_i2f.influence). Measures and prints markdown tables; asserts nothing.

Sections (``--sections``, default all):

* ``budget``  per-sample λ_max + expected lower bound (and the full call with the expected I²F) for the 32
              probe digits (1x16x16) on ``lenet_zhu``; accuracy of the fast (SLQ) estimates against the exact
              per-sample path.
* ``vmap``    the same per-sample call vectorised with ``vmap`` vs a Python loop calling it one sample at a
              time (same algorithm and settings).
* ``eigsh``   λ_max(JJᵀ): our x-side Lanczos over ``torch.func`` products vs the paper's released approach
              (θ-side ``scipy.sparse.linalg.eigsh(k=1, which="LM")`` over double-backward products with numpy
              round trips, ported from ``utils.max_eigen_val`` of illidanlab/inversion-influence-function), at
              the same relative tolerance (ours stopping on the residual as ARPACK does, and on the eigenvalue's
              error estimate), with the achieved relative error against a float64 reference; then
              single products timed alternately (paper's JᵀJ v, our JJᵀ b, our one-off setup) and the speed-up
              they predict, to show where the end-to-end ratio comes from.

Timings are medians of ``--repeats`` runs after one warm-up. ``uptime`` load is printed: on a shared machine
two OpenMP threads can be many times slower than one (spin-waiting), so compare ``--threads 1`` and ``2``.

    python benchmarks/bench_influence.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from pl_i2f.data import build_datamodule
from pl_i2f.influence import GradientJacobian, per_sample_leakage, spectrum
from pl_i2f.models import build_model


def load() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (first-call overhead of torch.func transforms)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a.double() - b.double()) / b.double()).abs()


# --- the paper's approach -------------------------------------------------------------------------


def paper_max_eigen_val(model: nn.Module, img: torch.Tensor, label: torch.Tensor, tol: float) -> tuple[float, int]:
    """A faithful port of ``max_eigen_val`` from the paper's released ``utils.py``: JᵀJ on the θ side, each
    product two forward passes and two double-backward passes (``torch.autograd.grad(create_graph=True)``),
    flattened through numpy inside a ``LinearOperator``, solved by ARPACK ``eigsh(k=1)`` (which="LM").
    Only ``tol`` is added (theirs is ARPACK's default, machine precision) so both sides stop at the same
    relative residual. Returns λ_max and the number of products."""
    mv, dim, count = paper_product(model, img, label)
    op = LinearOperator((dim, dim), matvec=mv, dtype=np.float32 if img.dtype == torch.float32 else np.float64)
    vals = eigsh(op, k=1, which="LM", tol=tol, return_eigenvectors=False)
    return float(vals[0]), count[0]


def paper_product(model: nn.Module, img: torch.Tensor, label: torch.Tensor) -> tuple[object, int, list[int]]:
    """The θ-side product v ↦ JᵀJ v of the paper's ``max_eigen_val`` (numpy in, numpy out), its dimension, and
    a call counter."""
    criterion = nn.CrossEntropyLoss()
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    dim = int(np.sum(sizes))
    img = img.clone().requires_grad_(True)
    count = [0]

    def jvp(outputs, inputs1, inputs2, v):
        gradient = torch.autograd.grad(outputs, inputs2, create_graph=True, retain_graph=True)
        elemwise = 0
        for g_elem, v_elem in zip(gradient, v):
            elemwise += torch.sum(g_elem * v_elem)
        return torch.autograd.grad(elemwise, inputs1)

    def two_jvp(v):
        model.zero_grad()
        loss = criterion(model(img), label)
        jvp1 = jvp(loss, [img], params, v)  # J v, x-space
        loss = criterion(model(img), label)
        return jvp(loss, params, [img], [t.detach() for t in jvp1])  # Jᵀ(J v), θ-space

    def mv(v):
        count[0] += 1
        v_t = torch.from_numpy(np.asarray(v).reshape(-1)).to(img.device)
        chunks = [c.reshape(s).requires_grad_(True) for c, s in zip(torch.split(v_t, sizes), shapes)]
        ret = two_jvp(chunks)
        return torch.cat([r.reshape(-1) for r in ret]).data.cpu().numpy()

    return mv, dim, count


# --- sections -------------------------------------------------------------------------------------


def probe_digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model("lenet_zhu", (1, 16, 16), 10, init="uniform")
    x, y = build_datamodule("digits").probe_batch(32)
    return model, x, y


def section_budget(args) -> None:
    model, x, y = probe_digits()
    sigma = args.sigma
    rows = []
    configs = [
        ("λ_max + expected lower bound", {"noise_std": sigma, "damping": args.damping, "expected": False}),
        (f"… + expected I²F (ε={args.damping:g})", {"noise_std": sigma, "damping": args.damping}),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = per_sample_leakage(model, x, y, noise_std=sigma, damping=args.damping, method="exact")
        for label, kw in configs:
            t, res = timed(lambda kw=kw: per_sample_leakage(model, x, y, probes=args.probes, **kw), args.repeats)
            errs = {
                "λ_max": rel_err(res.lambda_max, exact.lambda_max).max(),
                "lower bound": rel_err(res.lower_bound, exact.lower_bound).median(),
            }
            if res.expected_i2f is not None:
                errs["expected I²F"] = rel_err(res.expected_i2f, exact.expected_i2f).median()
            err = ", ".join(f"{k} {float(v):.1e}" for k, v in errs.items())
            rows.append((label, f"{t:.2f}", res.iterations, err))
        t_exact, _ = timed(lambda: per_sample_leakage(model, x, y, noise_std=sigma, damping=args.damping,
                                                      method="exact"), 1)
    print(f"\n### Per-sample budget: 32 probe digits (1x16x16), lenet_zhu, σ={sigma:g}, ε={args.damping:g}, "
          f"probes={args.probes}\n")
    print("| call | time (s) | Lanczos steps | rel. error vs exact (λ_max: max; others: median) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")
    print(f"| exact per-sample path (d_x products per sample, gives λ_min) | {t_exact:.2f} | — | reference |")


def section_vmap(args) -> None:
    model, x, y = probe_digits()
    kw = {"noise_std": args.sigma, "expected": False, "probes": args.probes}

    def loop():
        return torch.cat([per_sample_leakage(model, x[i : i + 1], y[i : i + 1], **kw).lambda_max for i in range(32)])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_vmap, res = timed(lambda: per_sample_leakage(model, x, y, **kw), args.repeats)
        t_loop, lam_loop = timed(loop, max(1, args.repeats // 2))
    diff = float(rel_err(res.lambda_max, lam_loop).max())
    print("\n### vmap vs Python loop: per-sample λ_max + expected lower bound, batch 32, lenet_zhu\n")
    print("| variant | time (s) | speed-up |")
    print("|---|---|---|")
    print(f"| Python loop over 32 samples | {t_loop:.2f} | 1.0x |")
    print(f"| one vmapped call | {t_vmap:.2f} | {t_loop / t_vmap:.1f}x |")
    print(f"\nmax relative difference of λ_max between the two: {diff:.1e}")


def section_eigsh(args) -> None:
    cases = []
    model, x, y = probe_digits()
    cases.append(("lenet_zhu, 32 digits 1x16x16", model, x, y))
    if not args.skip_resnet:
        torch.manual_seed(0)
        rn = build_model("resnet18", (3, 32, 32), 10)
        xr = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        cases.append(("resnet18, one 3x32x32 image", rn, xr, torch.tensor([3])))
    print(f"\n### λ_max(JJᵀ): x-side Lanczos vs the paper's θ-side eigsh (tol={args.tol:g}, float32)\n")
    print("| model (d_x, d_θ) | method | time (s) | products | ms / product | λ_max | rel. error | residual/λ "
          "| speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    costs = []
    for name, model, x, y in cases:
        model.eval()
        ref_model = copy.deepcopy(model).double()
        ref = spectrum(GradientJacobian(ref_model, x.double(), y), 1, tol=1e-10).eigenvalues[0]
        op_dims = GradientJacobian(model, x, y)
        methods = {
            "paper": lambda model=model, x=x, y=y: paper_max_eigen_val(model, x, y, args.tol),
            "residual": lambda model=model, x=x, y=y: spectrum(GradientJacobian(model, x, y), 1, tol=args.tol),
            "eigenvalue": lambda model=model, x=x, y=y: spectrum(GradientJacobian(model, x, y), 1, tol=args.tol,
                                                                 stop="eigenvalue"),
        }
        reps = 1 if "resnet" in name else args.repeats
        times, outs = interleaved(methods, reps)
        lam_p, n_p = outs["paper"]
        t_paper = times["paper"]
        dims = f"{name} ({op_dims.d_x}, {op_dims.d_theta})"
        e_p = float(rel_err(torch.tensor(lam_p), ref))
        print(f"| {dims} | paper: θ-side eigsh, ARPACK residual ≤ tol·λ | {t_paper:.2f} | {n_p} | "
              f"{1e3 * t_paper / n_p:.0f} | {lam_p:.6g} | {e_p:.1e} | ≤ {args.tol:g} (ARPACK) | 1.0x |")
        for key, label in (("residual", "residual ≤ tol·λ (ARPACK's criterion)"),
                           ("eigenvalue", "est. error of λ ≤ tol·λ (`stop=\"eigenvalue\"`)")):
            s, t = outs[key], times[key]
            # ms / product = total time / products (ours includes building the cached graphs, amortised).
            # residual/λ: the Lanczos estimate ours stopped on; ARPACK stops on the same estimate ≤ tol·|λ|.
            print(f"| {dims} | ours: x-side Lanczos, {label} | {t:.2f} | {s.iterations} | "
                  f"{1e3 * t / s.iterations:.0f} | {float(s.eigenvalues[0]):.6g} | "
                  f"{float(rel_err(s.eigenvalues[0], ref)):.1e} | {float(s.residuals[0] / s.eigenvalues[0].abs()):.1e} "
                  f"| {t_paper / t:.1f}x |")
        costs.append((name, *product_costs(model, x, y, reps), n_p, outs["residual"].iterations,
                      outs["eigenvalue"].iterations))
    # Where the speed-up comes from: (paper's products × its cost) / (our setup + our products × their cost).
    print("\n| model | paper product (ms) | our JJᵀ b (ms) | our setup (ms) | cost ratio | steps (paper vs ours: "
          "residual, eigenvalue stop) | predicted |")
    print("|---|---|---|---|---|---|---|")
    for name, p_ms, o_ms, s_ms, n_p, n_r, n_e in costs:
        print(f"| {name} | {p_ms:.1f} | {o_ms:.1f} | {s_ms:.1f} | {p_ms / o_ms:.2f} | {n_p} vs {n_r}, {n_e} | "
              f"{n_p * p_ms / (s_ms + n_r * o_ms):.1f}x, {n_p * p_ms / (s_ms + n_e * o_ms):.1f}x |")


def interleaved(methods: dict, reps: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds and last output of each method, run alternately (one warm-up each) so that load drifts
    on a shared machine hit all of them alike."""
    outs = {key: fn() for key, fn in methods.items()}
    times: dict[str, list[float]] = {key: [] for key in methods}
    for _ in range(reps):
        for key, fn in methods.items():
            t0 = time.perf_counter()
            outs[key] = fn()
            times[key].append(time.perf_counter() - t0)
    return {key: statistics.median(ts) for key, ts in times.items()}, outs


def product_costs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int) -> tuple[float, float, float]:
    """Median ms of one paper product (JᵀJ v with numpy round trips), one of ours (JJᵀ b on the cached graph),
    and building our operator's graph (once per λ_max), timed alternately so load drifts hit all three."""
    mv, dim, _ = paper_product(model, x, y)
    v = np.random.default_rng(0).standard_normal(dim).astype(np.float32)
    b = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    op = GradientJacobian(model, x, y)
    op.gram(b), mv(v)  # warm-up (the first gram also records the cached graph)
    times: dict[str, list[float]] = {"paper": [], "ours": [], "setup": []}
    for _ in range(max(3, 3 * reps)):
        for key, fn in (("paper", lambda: mv(v)), ("ours", lambda: op.gram(b)),
                        ("setup", lambda: GradientJacobian(model, x, y).gradient)):
            t0 = time.perf_counter()
            fn()
            times[key].append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times["paper"]), statistics.median(times["ours"]), statistics.median(times["setup"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="budget,vmap,eigsh")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sigma", type=float, default=0.01, help="isotropic gradient-noise std")
    parser.add_argument("--damping", type=float, default=1.0, help="ε for the expected I²F (paper default 1)")
    parser.add_argument("--probes", type=int, default=4, help="Lanczos chains per sample")
    parser.add_argument("--tol", type=float, default=1e-6,
                        help="relative tolerance for λ_max (ARPACK residual; ours: residual, eigenvalue error)")
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU count {os.cpu_count()}, "
          f"load before: {load()}")
    for name in args.sections.split(","):
        {"budget": section_budget, "vmap": section_vmap, "eigsh": section_eigsh}[name.strip()](args)
    print(f"\nload after: {load()}")


if __name__ == "__main__":
    main()
