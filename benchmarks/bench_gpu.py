"""The leakage monitor on a GPU: LeNet-Zhu on 1x16x16 (the default digits model), ResNet-18 on 3x32x32 and
ResNet-152 on 3x224x224 inputs. Measures and prints a markdown table (``--out FILE``: also written there, with a
header naming torch, the device and the date); asserts nothing. Without CUDA it prints one line and exits 0.

    PYTHONPATH=. python benchmarks/bench_gpu.py --out gpu.md          # every model, 32 probes, on cuda
    python benchmarks/bench_gpu.py --models resnet18 --probes 8
    # CPU smoke run:
    python benchmarks/bench_gpu.py --device cpu --models lenet_zhu,resnet18 --probes 2 --steps 2 --repeats 1 --ranks 4

Needs torch, torchvision and the library only (no Opacus, W&B or Hydra). Per model (random images, 10 classes,
untrained weights, float32, the backend's default TF32 settings, which the header states):

* one training step: forward, backward and an SGD step on a batch of ``--batch`` images;
* one calibrated evaluation (the monitor's headline, :func:`pl_i2f.leakage.leakage_report` with
  :class:`~pl_i2f.leakage.Calibrated`) of ``--probes`` probes under Gaussian noise of std 1 on the sample's
  gradient, isotropic prior τ² = 1 (the random images' own variance), clipping norm 1 for the noise multiplier:
  the Nyström sketch at ranks 64 (``NYSTROM_RANK``) and 16 (``--ranks``) for the ResNets (inputs beyond
  ``EXACT_MAX_DIM``), the exact route for LeNet-Zhu;
* the paper's monitor evaluation (:func:`pl_i2f.leakage.monitor_leakage`, :class:`~pl_i2f.leakage.WarmBasis`):
  fresh (a Lanczos basis of ``--steps`` sequential vmapped products) and warm-started from that basis (two block
  products of ``--steps`` vectors per probe, the monitor's usual evaluation);
* λ_max products per second: one vmapped per-sample JᵢJᵢᵀ product (``PerSampleOperator.gram``, one vector per
  probe) — the Lanczos unit of the per-sample λ_max — counted in probe-products;
* I²F products per second: one JJᵀ product of the batch operator (``GradientJacobian.gram``, the CG unit of the
  batch I²F, x₀ = the whole probe batch).

Per-probe measurements run the probes in calls of as many as fit in device memory (each probe is its own
private input, so the calls do the work of one call over all probes): the first call tries a size from
the free memory, a call that runs out of memory is retried with half as many, and the table says the probe count
and the call size. "products / s" counts per-probe vector products: one per probe for the λ_max product, r + 8
per probe for a sketch of rank r, d_x Jacobian columns per probe for the exact route, the basis steps for WarmBasis;
for the I²F product, batch products. Times are medians of up to ``--repeats`` runs after one warm-up call, with
``torch.cuda.synchronize`` around each. ``--budget-seconds`` bounds the whole run: a measurement measures fewer
probes or fewer runs where its share does not fit (the table says so), and once the budget is spent the rest are
reported as skipped. A measurement that fails (out of memory at one probe per call, or any other error) is
reported with its error and the rest continues.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pl_i2f.defenses import build as build_defense
from pl_i2f.influence import GradientJacobian, PerSampleOperator
from pl_i2f.leakage import NYSTROM_PROBES, NYSTROM_RANK, Calibrated, LeakageOptions, leakage_report, monitor_leakage
from pl_i2f.models import build_model
from pl_i2f.threat import SampleNoise

MODELS = {"lenet_zhu": (1, 16, 16), "resnet18": (3, 32, 32), "resnet152": (3, 224, 224)}
# The calibrated route measured per model: the exact one where the monitor takes it, else the sketch at each rank.
EXACT_ROUTE = {"lenet_zhu": True, "resnet18": False, "resnet152": False}
SKETCH_PROBES = NYSTROM_PROBES  # Hutchinson vectors per probe of the sketch's residual trace
NOISE_STD = 1.0
PRIOR_VARIANCE = 1.0  # the random images are standard normal
# A first guess of the memory a per-sample product holds per probe and vector, in copies of the parameters (its
# tangents and adjoints of the parameter gradient and of the activations; measured on the CPU: 2–4 for these
# ResNets). Only picks the first call size; a call that runs out of memory is retried with half as many probes.
PARAM_COPIES = 4
MEMORY_SHARE = 0.6  # of the free device memory the first call size aims at


@dataclass
class Row:
    model: str
    what: str
    probes: str = ""
    runs: int = 0
    seconds: float | None = None
    per_probe: float | None = None
    rate: float | None = None
    note: str = ""


class Bench:
    """Times measurements against one wall-clock budget; failures and skips become rows."""

    def __init__(self, device: torch.device, repeats: int, budget: float, measurements: int):
        self.device, self.repeats = device, repeats
        self.started = time.perf_counter()
        self.deadline = self.started + budget
        self.left = measurements  # measurements still to run, to share the remaining budget
        self.rows: list[Row] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def share(self) -> float:
        """This measurement's share of the remaining budget: twice the even split, so the heavy ones can run."""
        return min(self.remaining(), 2 * self.remaining() / max(1, self.left))

    def timed(self, fn: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def runs(self, fn: Callable[[], object], first: float, share: float) -> list[float]:
        """Up to ``repeats`` timed runs while the next one (as long as the last) fits in ``share``."""
        times: list[float] = []
        began, last = time.perf_counter(), first
        while len(times) < self.repeats:
            if last > self.remaining() or (times and time.perf_counter() - began + last > share):
                break
            last = self.timed(fn)
            times.append(last)
        return times

    def measure(self, row: Row, run: Callable[[Row], None]) -> None:
        """``run(row)`` fills the row; a failure is reported in it; past the budget it is skipped."""
        self.left -= 1
        if self.remaining() <= 0:
            row.note = "skipped: budget spent"
        else:
            try:
                run(row)
            except Exception as err:  # one failed measurement must not end the run
                if out_of_memory(err):
                    print(f"bench_gpu: {row.model}, {row.what}: {one_line(err)}", file=sys.stderr)
                    row.note = "out of device memory"
                else:
                    traceback.print_exc(file=sys.stderr)
                    row.note = f"failed: {one_line(err)}"
            finally:
                free_memory(self.device)
        self.rows.append(row)
        print(format_row(row), flush=True)

    def whole(self, row: Row, fn: Callable[[], object], rate: Callable[[float], float] | None = None) -> None:
        """A measurement that runs as one call: warm-up, then the timed runs."""

        def run(r: Row) -> None:
            first = self.timed(fn)
            times = self.runs(fn, first, self.share())
            finish(r, times, first, rate)

        self.measure(row, run)

    def per_probe(self, row: Row, probes: int, vectors: int, cap: Callable[[int], int],
                  call: Callable[[int, int], object], products: int) -> None:
        """A measurement over ``probes`` probes run in calls of ``c`` probes (``call(start, stop)``): the first
        call size from ``cap(vectors)``, halved while a call runs out of memory; that first call is the warm-up,
        and the probes measured are cut to what its time says fits in this measurement's share."""

        def run(r: Row) -> None:
            c = max(1, min(probes, cap(vectors)))
            while True:
                try:
                    first = self.timed(functools.partial(call, 0, c))
                    break
                except Exception as err:  # out of memory is retried smaller, the rest re-raised
                    if c == 1 or not out_of_memory(err):
                        r.probes = f"calls of {c}"
                        raise
                free_memory(self.device)  # here, not in the handler: its traceback still holds the tensors
                c = max(1, c // 2)
            share = self.share()
            fits = max(1, int(share / max(first, 1e-9))) * c  # the warm-up included one-off costs: cautious
            measured = min(probes, fits)
            calls = [(s, min(s + c, measured)) for s in range(0, measured, c)]
            r.probes = f"{measured}" + (f" of {probes}" if measured < probes else "") + \
                (f" (calls of {c})" if c < measured else "")

            def every() -> None:
                for s, e in calls:
                    call(s, e)

            times = self.runs(every, first * len(calls), share)
            finish(r, times, first, None)
            done = measured if times else min(c, probes)  # only the warm-up call ran: its time covers c probes
            if not times:
                r.probes = f"{done}" + (f" of {probes}" if done < probes else "")
            r.per_probe = r.seconds / done
            r.rate = products / r.per_probe

        self.measure(row, run)


def finish(row: Row, times: list[float], first: float, rate: Callable[[float], float] | None) -> None:
    row.runs = len(times)
    if times:
        row.seconds = statistics.median(times)
    else:
        row.seconds = first
        row.note = "warm-up call only (includes one-off costs): budget"
    if rate is not None:
        row.rate = rate(row.seconds)


def out_of_memory(err: BaseException) -> bool:
    """Out of device memory, also as cuDNN / cuBLAS report it (a RuntimeError naming a failed allocation)."""
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text


def one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:160] if text else ''}".replace("|", "/")


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def call_cap(device: torch.device, model: nn.Module, probes: int) -> Callable[[int], int]:
    """The first call size (probes) for a per-sample product of ``vectors`` vectors per probe: all probes on the
    CPU; on a GPU, as many as a rough memory model fits in a share of the free memory."""
    if device.type != "cuda":
        return lambda vectors: probes
    d_theta = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def cap(vectors: int) -> int:
        free = torch.cuda.mem_get_info(device)[0]
        return max(1, int(MEMORY_SHARE * free // (4 * PARAM_COPIES * d_theta * (vectors + 1))))

    return cap


def routes(name: str, ranks: list[int]) -> list[tuple[str, int | None]]:
    """The calibrated evaluations measured for a model: (route, sketch rank)."""
    return [("exact", None)] if EXACT_ROUTE[name] else [("sketch", r) for r in ranks]


def plan(models: list[str], ranks: list[int]) -> int:
    """How many measurements the run has (for sharing the budget)."""
    return sum(6 + len(routes(m, ranks)) for m in models)


def bench_model(bench: Bench, name: str, probes: int, batch: int, steps: int, ranks: list[int]) -> None:
    device = bench.device
    shape = MODELS[name]
    label = f"{name} ({'x'.join(str(s) for s in shape)})"
    gen = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)
    model = build_model(name, shape, 10).to(device)
    x_train = torch.randn(batch, *shape, generator=gen).to(device)
    y_train = torch.randint(0, 10, (batch,), generator=gen).to(device)
    x = torch.randn(probes, *shape, generator=gen).to(device)
    y = torch.randint(0, 10, (probes,), generator=gen).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def train_step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x_train), y_train).backward()
        opt.step()

    bench.whole(Row(label, "one training step", probes=f"batch {batch}"), train_step)
    model.eval()
    opt.zero_grad(set_to_none=True)
    cap = call_cap(device, model, probes)
    noise = SampleNoise(std=NOISE_STD, source="gaussian")
    options = LeakageOptions(prior=PRIOR_VARIANCE, clipping_norm=1.0)

    for route, rank in routes(name, ranks):
        estimator = Calibrated(route=route, probes=SKETCH_PROBES, **({} if rank is None else {"rank": rank}))
        if route == "sketch":
            what = f"calibrated evaluation, Nyström sketch rank {rank} + {SKETCH_PROBES} trace vectors"
            vectors = rank + SKETCH_PROBES
        else:
            what = "calibrated evaluation, exact route (explicit per-probe Jacobians)"
            vectors = x[0].numel()

        def calibrated(s: int, e: int, estimator: Calibrated = estimator) -> object:
            return leakage_report(model, x[s:e], y[s:e], noise, options, estimator,
                                  generator=torch.Generator(device).manual_seed(0))  # as the monitor seeds it

        bench.per_probe(Row(label, what), probes, vectors, cap, calibrated, vectors)

    none = build_defense("none")
    bases: dict[int, torch.Tensor] = {}

    def fresh(s: int, e: int) -> None:
        bases[s] = monitor_leakage(model, x[s:e], y[s:e], none, 0, steps=steps).basis.basis

    bench.per_probe(Row(label, f"monitor evaluation (WarmBasis), fresh: {steps} sequential products"),
                    probes, 1, cap, fresh, steps)

    def warm(s: int, e: int) -> None:
        basis = torch.cat([bases[k] for k in sorted(bases)])[s:e]
        monitor_leakage(model, x[s:e], y[s:e], none, 1, basis=basis, steps=steps)

    if bases:
        covered = sum(b.shape[0] for b in bases.values())
        bench.per_probe(Row(label, f"monitor evaluation (WarmBasis), warm: 2 block products × {steps} vectors"),
                        covered, steps, cap, warm, 2 * steps)
    else:
        def no_basis(r: Row) -> None:
            r.note = "skipped: no fresh basis to start from"

        bench.measure(Row(label, "monitor evaluation (WarmBasis), warm"), no_basis)
    bases.clear()

    v = torch.randn(probes, 1, x[0].numel(), generator=gen).to(device)
    operators: dict[tuple[int, int], PerSampleOperator] = {}

    def lambda_max_product(s: int, e: int) -> object:
        if (s, e) not in operators:  # built once per call size, as the monitor builds it once per evaluation
            operators[(s, e)] = PerSampleOperator(model, x[s:e], y[s:e])
        return operators[(s, e)].gram(v[s:e])

    bench.per_probe(Row(label, "λ_max product: vmapped JᵢJᵢᵀ, 1 vector per probe"), probes, 1, cap,
                    lambda_max_product, 1)
    operators.clear()
    b = torch.randn(x.shape, generator=gen).to(device)
    batch_op = GradientJacobian(model, x, y)
    bench.whole(Row(label, f"I²F product: JJᵀ b of the {probes}-image batch", probes=f"{probes}"),
                lambda: batch_op.gram(b), rate=lambda sec: 1 / sec)


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if value == 0 or (abs(value) >= 10 ** -digits and abs(value) < 1e6):
        return f"{value:.{digits}f}" if abs(value) < 100 else f"{value:.1f}"
    return f"{value:.3g}"


TABLE_HEAD = ("| model (input) | measurement | probes | runs | median (s) | per probe (s) | products / s | note |\n"
              "|---|---|---|---|---|---|---|---|")


def format_row(r: Row) -> str:
    return (f"| {r.model} | {r.what} | {r.probes} | {r.runs} | {fmt(r.seconds)} | {fmt(r.per_probe)} | "
            f"{fmt(r.rate, 1)} | {r.note} |")


def header(device: torch.device, args: argparse.Namespace) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        label = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, " \
                f"cuDNN {torch.backends.cudnn.version()}"
        try:  # the legacy flags; a torch that only keeps the newer precision settings still gets its table
            tf32 = f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}"
        except (AttributeError, RuntimeError):
            tf32 = "TF32: see the torch defaults"
    else:
        label, tf32 = f"cpu ({torch.get_num_threads()} threads)", "TF32: n/a"
    return (f"torch {torch.__version__}; device {label}; {tf32}; {when}\n"
            f"models {args.models}; {args.probes} probes; training batch {args.batch}; WarmBasis {args.steps} steps; "
            f"sketch ranks {args.ranks}; median of up to {args.repeats} runs after a warm-up; "
            f"budget {args.budget_seconds:.0f} s; "
            f"noise std {NOISE_STD}, prior τ² {PRIOR_VARIANCE}, float32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="lenet_zhu,resnet18,resnet152")
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="WarmBasis Lanczos basis vectors per probe")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", default=f"{NYSTROM_RANK},16", help="Nyström sketch ranks (inputs > EXACT_MAX_DIM)")
    parser.add_argument("--budget-seconds", type=float, default=210.0,
                        help="wall-clock bound of the measurements; the rest are reported as skipped")
    parser.add_argument("--out", default=None, help="also write the header and the table to this file")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device available; nothing measured (use --device cpu for a smoke run)")
        sys.exit(0)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        sys.exit(f"bench_gpu: unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r]
    except ValueError:
        sys.exit(f"bench_gpu: --ranks must be comma-separated integers, got {args.ranks!r}")
    if min([args.probes, args.batch, args.steps, args.repeats, *ranks], default=0) < 1 or not args.budget_seconds > 0:
        sys.exit("bench_gpu: --probes, --batch, --steps, --repeats, --ranks and --budget-seconds must be positive")
    device = torch.device(args.device)
    head = header(device, args)
    print(head + "\n\n" + TABLE_HEAD, flush=True)
    bench = Bench(device, args.repeats, args.budget_seconds, plan(models, ranks))
    for name in models:
        try:
            bench_model(bench, name, args.probes, args.batch, args.steps, ranks)
        except Exception as err:  # a model's set-up failed: the next model still runs
            traceback.print_exc(file=sys.stderr)
            bench.rows.append(Row(name, "set-up", note=f"failed: {one_line(err)}"))
        free_memory(device)
    total = time.perf_counter() - bench.started
    table = "\n".join([TABLE_HEAD, *(format_row(r) for r in bench.rows)])
    footer = f"measured in {total:.0f} s"
    if device.type == "cuda":
        footer += f"; peak device memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    print(f"\n{footer}", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(f"# bench_gpu\n\n{head}\n\n{table}\n\n{footer}\n")
        print(f"bench_gpu: wrote {args.out}")


if __name__ == "__main__":
    main()
