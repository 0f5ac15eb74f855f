"""The chain route of the explicit per-sample Jacobians (:mod:`pl_i2f.influence.chain`, batched matrix products)
against the generic route (``vmap`` over ``torch.func`` forward-over-reverse products), interleaved: the Jacobians
alone and a whole exact evaluation of the monitor (``leakage_report`` with ``Calibrated(route="exact")``), on the
default run's network (lenet_zhu, bundled digits 1x16x16, on the data's 60-direction span and on all 256 input
directions) untrained and after ``--train-steps`` SGD steps, and on the MLP. Each candidate runs once per round
in rotating order; medians of ``--repeats`` rounds after one warm-up. Measures and prints markdown; asserts nothing.

    python benchmarks/bench_chain.py --threads 1 --repeats 7
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from bench_product import interleaved, trained  # the same interleaving and SGD warm-up as the product benchmark
from torch import nn

from pl_i2f import calibrated as cal
from pl_i2f.data import DigitsDataModule
from pl_i2f.influence import settings
from pl_i2f.influence.jacobian import per_sample_jacobians
from pl_i2f.leakage import Calibrated, LeakageOptions, leakage_report
from pl_i2f.models import build_model
from pl_i2f.prior import value_scale
from pl_i2f.threat import SampleNoise


def routed(fn: Callable[[], object], chain: bool) -> Callable[[], object]:
    def run() -> object:
        previous, settings.CHAIN_PRODUCTS = settings.CHAIN_PRODUCTS, chain
        try:
            return fn()
        finally:
            settings.CHAIN_PRODUCTS = previous

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--probes", default="1,8,32")
    parser.add_argument("--train-steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dm = DigitsDataModule()
    dm.prepare_data()
    dm.setup("fit")
    prior, scale = dm.data_prior(), value_scale(dm.std, (1, 16, 16))
    span = cal.prior_support(prior)[0].T.float().contiguous()
    x_all, y_all = dm.probe_batch(32)
    torch.manual_seed(0)
    networks = {
        "lenet_zhu, untrained": build_model("lenet_zhu", (1, 16, 16), 10, init="xavier_uniform").eval(),
        f"lenet_zhu, {args.train_steps} SGD steps": trained(
            build_model("lenet_zhu", (1, 16, 16), 10, init="xavier_uniform"), args.train_steps),
        "mlp (256-256), untrained": build_model("mlp", (1, 16, 16), 10).eval(),
    }
    options = LeakageOptions(prior=prior, value_scale=scale, clipping_norm=1.0, batch_size=64, pixel_std=dm.std)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
          "\n")
    print("| network | what | probes | generic (ms) | chain (ms) | generic / chain | max relative difference |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for name, model in networks.items():
        for n in (int(p) for p in args.probes.split(",")):
            x, y = x_all[:n], y_all[:n]
            work = {
                "Jacobians on the span (60)": lambda x=x, y=y, model=model: _span_jacobians(model, x, y, span),
                "Jacobians on every direction (256)": lambda x=x, y=y, model=model: per_sample_jacobians(model, x, y),
                "exact evaluation (leakage_report)": lambda x=x, y=y, model=model: leakage_report(
                    model, x, y, SampleNoise(std=0.0), options, Calibrated(route="exact")),
            }
            for what, fn in work.items():
                if what.startswith("Jacobians on every") and n > 8:
                    continue
                t = interleaved({"generic": routed(fn, False), "chain": routed(fn, True)}, args.repeats)
                print(f"| {name} | {what} | {n} | {t['generic'] * 1e3:.1f} | {t['chain'] * 1e3:.1f} | "
                      f"{t['generic'] / t['chain']:.2f} | {_difference(routed(fn, False)(), routed(fn, True)())} |",
                      flush=True)
    print(f"\nload after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def _span_jacobians(model: nn.Module, x: torch.Tensor, y: torch.Tensor, span: torch.Tensor) -> tuple:
    from pl_i2f.influence.jacobian import iter_per_sample_jacobians

    chunks = [(c.jacobians.clone(), c.gradients.clone()) for c in iter_per_sample_jacobians(model, x, y,
                                                                                            tangents=span)]
    return torch.cat([j for j, _ in chunks]), torch.cat([g for _, g in chunks])


def _difference(a: object, b: object) -> str:
    if isinstance(a, tuple):
        return f"{max(float((p - q).norm() / q.norm()) for p, q in zip(a, b, strict=True)):.1e}"
    keys = ("expected_attack_psnr", "lambda_min", "sigma_for_target")
    return ", ".join(f"{k} {abs(a.scalars[k] - b.scalars[k]) / max(abs(b.scalars[k]), 1e-300):.1e}" for k in keys
                     if k in a.scalars and k in b.scalars)


if __name__ == "__main__":
    main()
