"""The leakage monitor on a GPU: ResNet-18 on 3x32x32 and ResNet-152 on 3x224x224 inputs. Measures and prints a
markdown table; asserts nothing. Without CUDA it prints one line and exits 0.

    python benchmarks/bench_gpu.py                         # both models, 32 probes, on cuda
    python benchmarks/bench_gpu.py --models resnet18 --probes 8
    python benchmarks/bench_gpu.py --device cpu --models resnet18 --probes 2 --steps 2 --repeats 1  # smoke

Per model (random images, 10 classes, untrained weights, float32):

* one training step: forward, backward and an SGD step on a batch of ``--batch`` images;
* one monitor evaluation of ``--probes`` probes (:func:`pl_i2f.leakage.monitor_leakage`): fresh (a Lanczos basis
  of ``--steps`` sequential vmapped products) and warm-started from that basis (two block products of
  ``--steps`` vectors per probe, the monitor's usual evaluation);
* λ_max products per second: one vmapped per-sample JᵢJᵢᵀ product (``PerSampleGram.gram``, one vector per
  probe) — the Lanczos unit of the per-sample λ_max — counted in probe-products;
* I²F products per second: one JJᵀ product of the batch operator (``GradientJacobian.gram``, the CG unit of the
  batch I²F, x₀ = the whole probe batch).

Times are medians of ``--repeats`` after one warm-up, with ``torch.cuda.synchronize`` around each. A measurement
that runs out of device memory is reported as such and the rest continues.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from pl_i2f.defenses import build as build_defense
from pl_i2f.influence import GradientJacobian
from pl_i2f.influence.per_sample import PerSampleGram
from pl_i2f.leakage import monitor_leakage
from pl_i2f.models import build_model

MODELS = {"resnet18": (3, 32, 32), "resnet152": (3, 224, 224)}


def timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def median_seconds(fn: Callable[[], object]) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return median_seconds


def attempt(what: str, fn: Callable[[], float]) -> tuple[str, float | None]:
    """Run one measurement; out-of-memory becomes a row saying so instead of ending the benchmark."""
    try:
        return what, fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return f"{what} (out of device memory)", None


def bench_model(name: str, device: torch.device, probes: int, batch: int, steps: int, repeats: int) -> list[tuple]:
    shape = MODELS[name]
    gen = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)
    model = build_model(name, shape, 10).to(device)
    x_train = torch.randn(batch, *shape, generator=gen).to(device)
    y_train = torch.randint(0, 10, (batch,), generator=gen).to(device)
    x = torch.randn(probes, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (probes,), generator=gen).to(device)
    median_seconds = timer(device, repeats)
    rows: list[tuple] = []
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train_step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x_train), y_train).backward()
        opt.step()

    what, sec = attempt(f"one training step (batch {batch})", lambda: median_seconds(train_step))
    rows.append((name, what, sec, None))
    model.eval()
    none = build_defense("none")
    state: dict = {}

    def fresh() -> None:
        state["fit"] = monitor_leakage(model, x, y, none, 0, steps=steps)[1]

    what, sec = attempt(f"monitor evaluation, {probes} probes, fresh ({steps} products)",
                        lambda: median_seconds(fresh))
    rows.append((name, what, sec, None))
    if "fit" in state:
        basis = state["fit"].basis
        what, sec = attempt(f"monitor evaluation, {probes} probes, warm (2 block products × {basis.shape[1]} vectors)",
                            lambda: median_seconds(lambda: monitor_leakage(model, x, y, none, 1, basis=basis,
                                                                           steps=steps)))
        rows.append((name, what, sec, None))
    op = PerSampleGram(model, x, y, None, None)
    v = torch.randn(probes, 1, x[0].numel(), generator=gen).to(device)
    what, sec = attempt(f"λ_max product: vmapped JᵢJᵢᵀ, {probes} probes × 1 vector",
                        lambda: median_seconds(lambda: op.gram(v)))
    rows.append((name, what, sec, None if sec is None else probes / sec))
    batch_op = GradientJacobian(model, x, y)
    b = torch.randn(x.shape, generator=gen).to(device)
    what, sec = attempt(f"I²F product: JJᵀ b of the {probes}-image batch", lambda: median_seconds(
        lambda: batch_op.gram(b)))
    rows.append((name, what, sec, None if sec is None else 1 / sec))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="resnet18,resnet152")
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="Lanczos basis vectors per probe")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device available; nothing measured (use --device cpu for a smoke run)")
        sys.exit(0)
    device = torch.device(args.device)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        sys.exit(f"bench_gpu: unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {label}\n")
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, device, args.probes, args.batch, args.steps, args.repeats)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous model's tensors are gone with its function's frame
    print("| model (input) | measurement | median (s) | products / s |")
    print("|---|---|---|---|")
    for name, what, sec, rate in rows:
        shape = "x".join(str(s) for s in MODELS[name])
        print(f"| {name} ({shape}) | {what} | {'—' if sec is None else f'{sec:.4f}'} | "
              f"{'' if rate is None else f'{rate:.1f}'} |")


if __name__ == "__main__":
    main()
