"""The monitor's per-sample product: what one evaluation costs today against the explicit per-sample Jacobians
and Grams of :mod:`pl_i2f.influence.jacobian`. Measures and prints markdown tables; asserts nothing.

    python benchmarks/bench_product.py                       # threads 1 and 2, lenet_zhu digits + resnet18
    python benchmarks/bench_product.py --threads 1 --repeats 5 --sections lenet

Sections (``--sections``):

* ``lenet``   lenet_zhu on the digits probes (1x16x16, the default run's model), untrained (xavier_uniform) and
              trained-ish (``--train-steps`` SGD steps on digits), 8 and 32 probes. Candidates, each run once per
              repeat in rotating order (interleaved) and reported as the median and as a ratio to the first row
              of its group:
              *old* — one middle evaluation of the monitor today (:func:`pl_i2f.leakage.monitor_leakage`,
              warm-started from the previous basis, 16 vectors: two vmapped block products), a fresh one (16
              sequential products), the block products alone (``PerSampleOperator.gram`` with 1 and 16 vectors per
              probe), and the exact spectra the first/last evaluation adds (``warm.exact_spectra``);
              *new* — all J_i and g_i (``per_sample_jacobians``), the Grams G_i = J_iᵀJ_i accumulated in float64
              (default) or float32, with ``eigvalsh`` (exact spectra), and the same with one probe per call (to
              show the per-call overhead), and ``torch.compile`` of the product (reported, falls back to eager).
              Accuracy: λ_min / λ_max of each route against the same Grams of a float64 copy of the model.
* ``vectors`` lenet_zhu (untrained) on 8 and 32 probes: one vmapped block product against its vectors per probe
              (1–16): what a warm evaluation (two block products of k vectors) costs for a smaller basis.
* ``resnet``  resnet18 on 3x32x32 fake data (d_x = 3,072): the explicit route's size (refused), and one
              matrix-free JᵢJᵢᵀ product (1 and 4 probes, one vector) for comparison.

Timings are medians of ``--repeats`` after one warm-up; ``uptime`` load is printed before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from pl_i2f.data import build_datamodule
from pl_i2f.defenses import build as build_defense
from pl_i2f.influence.jacobian import per_sample_grams, per_sample_jacobians
from pl_i2f.influence.per_sample import PerSampleOperator
from pl_i2f.influence.warm import exact_spectra
from pl_i2f.leakage import monitor_leakage
from pl_i2f.models import build_model


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def interleaved(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each candidate; one warm-up each, then ``repeats`` rounds in rotating order."""
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    names = list(candidates)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def trained(model: nn.Module, steps: int, seed: int = 0) -> nn.Module:
    """``steps`` plain SGD steps on digits (batch 32, lr 0.5): weights past the loss plateau, as mid-run."""
    dm = build_datamodule("digits", seed=seed)
    dm.setup("fit")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    done = 0
    model.train()
    while done < steps:
        for x, y in dm.train_dataloader():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    model.eval()
    return model


def spectra_new(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None,
                max_numbers: int | None = None) -> torch.Tensor:
    kw = {} if max_numbers is None else {"max_numbers": max_numbers}
    return torch.linalg.eigvalsh(per_sample_grams(model, x, y, dtype=dtype, **kw).grams.double())


def relerr(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((a.double() - ref) / ref.abs()).abs().median())


def compile_attempt(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> str:
    """torch.compile of the product; the first call's seconds and the eager ratio, or why it cannot compile."""
    fn = torch.compile(lambda a, b: per_sample_jacobians(model, a, b))
    start = time.perf_counter()
    try:
        fn(x, y)
    except Exception as exc:  # the fallback is the eager product: report why
        first = str(exc).strip().splitlines()[0][:160]
        return f"failed after {time.perf_counter() - start:.1f} s ({type(exc).__name__}: {first}); eager product used"
    compile_s = time.perf_counter() - start
    t = interleaved({"compiled": lambda: fn(x, y), "eager": lambda: per_sample_jacobians(model, x, y)}, 3)
    return f"compiled in {compile_s:.1f} s; compiled/eager {t['compiled'] / t['eager']:.2f}"


def evaluation_candidates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, basis: torch.Tensor,
                          op: PerSampleOperator, v1: torch.Tensor, v16: torch.Tensor
                          ) -> dict[str, Callable[[], object]]:
    none = build_defense("none")
    return {
        "old: monitor evaluation, warm (2 block products × 16 vectors)":
            lambda: monitor_leakage(model, x, y, none, 1, basis=basis, steps=16),
        "old: monitor evaluation, fresh (16 sequential products)": lambda: monitor_leakage(model, x, y, none, 1,
                                                                                           steps=16),
        "old: one vmapped JᵢJᵢᵀ product, 1 vector per probe": lambda: op.gram(v1),
        "old: one vmapped JᵢJᵢᵀ product, 16 vectors per probe": lambda: op.gram(v16),
    }


def spectra_candidates(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                       per_probe: int) -> dict[str, Callable[[], object]]:
    return {
        "old: exact spectra (warm.exact_spectra)": lambda: exact_spectra(model, x, y),
        "new: J_i and g_i (per_sample_jacobians)": lambda: per_sample_jacobians(model, x, y),
        "new: Grams float64 + eigvalsh": lambda: spectra_new(model, x, y, torch.float64),
        "new: Grams float32 + eigvalsh": lambda: spectra_new(model, x, y, None),
        "new: Grams float64 + eigvalsh, one probe per call":
            lambda: spectra_new(model, x, y, torch.float64, max_numbers=per_probe),
    }


def lenet_section(threads: list[int], repeats: int, train_steps: int, compile_too: bool) -> None:
    x_all, y_all = build_datamodule("digits").probe_batch(32)
    none = build_defense("none")
    torch.manual_seed(0)
    untrained = build_model("lenet_zhu", (1, 16, 16), 10, init="xavier_uniform").eval()
    torch.manual_seed(0)
    trained_model = trained(build_model("lenet_zhu", (1, 16, 16), 10, init="xavier_uniform"), train_steps)
    d_theta = sum(p.numel() for p in untrained.parameters())
    print(f"\n## lenet_zhu, digits 1x16x16 (d_θ = {d_theta}, d_x = 256)\n")
    acc_rows, notes = [], []
    print("| weights | probes | threads | candidate | median (ms) | ratio to the group's first row |")
    print("|---|---|---|---|---|---|", flush=True)
    for weights, model in (("untrained", untrained), (f"trained {train_steps} steps", trained_model)):
        for n in (8, 32):
            x, y = x_all[:n], y_all[:n]
            _, fit = monitor_leakage(model, x, y, none, 0, steps=16)
            basis = fit.basis
            v1, v16 = torch.randn(n, 1, 256), torch.randn(n, 16, 256)
            op = PerSampleOperator(model, x, y, None, None)
            per_probe = d_theta * 256
            for th in threads:
                torch.set_num_threads(th)
                evals = interleaved(evaluation_candidates(model, x, y, basis, op, v1, v16), repeats)
                spectra = interleaved(spectra_candidates(model, x, y, per_probe), repeats)
                for group in (evals, spectra):
                    first = next(iter(group.values()))
                    for name, sec in group.items():
                        print(f"| {weights} | {n} | {th} | {name} | {sec * 1e3:.1f} | {sec / first:.2f} |", flush=True)
            torch.set_num_threads(threads[0])
            ref = spectra_new(_double(model), x.double(), y, torch.float64)
            for name, lam in (("old exact_spectra (float32 Gram)", exact_spectra(model, x, y)),
                              ("new Grams float64", spectra_new(model, x, y, torch.float64)),
                              ("new Grams float32", spectra_new(model, x, y, None))):
                acc_rows.append((weights, n, name, relerr(lam[:, -1], ref[:, -1]), relerr(lam[:, 0], ref[:, 0]),
                                 float((ref[:, -1] / ref[:, 0]).median())))
        if compile_too:
            notes.append(f"{weights}, 8 probes: torch.compile of per_sample_jacobians "
                         f"{compile_attempt(model, x_all[:8], y_all[:8])}")
    print("\nAccuracy against the Grams of a float64 copy of the model (median over probes of |relative error|):\n")
    print("| weights | probes | route | λ_max | λ_min | median λ_max/λ_min |")
    print("|---|---|---|---|---|---|")
    for weights, n, name, emax, emin, cond in acc_rows:
        print(f"| {weights} | {n} | {name} | {emax:.1e} | {emin:.1e} | {cond:.1e} |")
    for note in notes:
        print(f"\n{note}")


def vectors_section(threads: list[int], repeats: int) -> None:
    x_all, y_all = build_datamodule("digits").probe_batch(32)
    torch.manual_seed(0)
    model = build_model("lenet_zhu", (1, 16, 16), 10, init="xavier_uniform").eval()
    print("\n## lenet_zhu: one vmapped JᵢJᵢᵀ block product against its vectors per probe\n")
    print("| threads | probes | vectors per probe | median (ms) | ms per probe-vector |")
    print("|---|---|---|---|---|")
    for th in threads:
        torch.set_num_threads(th)
        for n in (8, 32):
            op = PerSampleOperator(model, x_all[:n], y_all[:n], None, None)
            t = interleaved({k: partial(op.gram, torch.randn(n, k, 256)) for k in (1, 2, 4, 8, 16)}, repeats)
            for k, sec in t.items():
                print(f"| {th} | {n} | {k} | {sec * 1e3:.1f} | {sec * 1e3 / (n * k):.2f} |")


def _double(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).double()


def resnet_section(threads: list[int], repeats: int) -> None:
    torch.set_num_threads(threads[0])
    dm = build_datamodule("fake", input_shape=(3, 32, 32), num_classes=10)
    x_all, y_all = dm.probe_batch(4)
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 32, 32), 10).eval()
    d_theta = sum(p.numel() for p in model.parameters())
    print(f"\n## resnet18, fake 3x32x32 (d_θ = {d_theta}, d_x = 3072), {threads[0]} thread(s)\n")
    try:
        per_sample_jacobians(model, x_all[:1], y_all[:1])
        refused = "formed (unexpected)"
    except ValueError as exc:
        refused = f"refused: {exc}"
    print(f"explicit per-sample Jacobian: {refused}\n")
    ops = {n: PerSampleOperator(model, x_all[:n], y_all[:n], None, None) for n in (1, 4)}
    vs = {n: torch.randn(n, 1, 3072) for n in (1, 4)}
    t = interleaved({f"one vmapped JᵢJᵢᵀ product, {n} probe(s) × 1 vector": (lambda n=n: ops[n].gram(vs[n]))
                     for n in (1, 4)}, repeats)
    print("| candidate | median (s) | per probe (s) |")
    print("|---|---|---|")
    for name, sec in t.items():
        n = 4 if "4 probe" in name else 1
        print(f"| {name} | {sec:.2f} | {sec / n:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--sections", default="lenet,resnet")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile attempt")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    print(f"torch {torch.__version__}; load average before: {load()}")
    sections = args.sections.split(",")
    if "lenet" in sections:
        lenet_section(threads, args.repeats, args.train_steps, not args.no_compile)
    if "vectors" in sections:
        vectors_section(threads, args.repeats)
    if "resnet" in sections:
        resnet_section(threads, max(1, args.repeats // 2))
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
