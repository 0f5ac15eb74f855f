"""Attacks at full strength: the ``dlg`` preset against the original DLG loop, and Inverting Gradients
on a batch, on digits (CPU or CUDA). Measures only, asserts nothing; prints markdown tables.

    python benchmarks/bench_attacks.py --sections dlg              # dlg preset vs original DLG, batch 1 and 4
    python benchmarks/bench_attacks.py --sections ig --seeds 0      # inverting_gradients, batch 4
    python benchmarks/bench_attacks.py --sections labels             # iDLG / joint labels, 20 digits
    python benchmarks/bench_attacks.py --sections speed              # seconds per 1,000 evaluations

Setting (every section): ``lenet_zhu`` with uniform ±0.5 init (the DLG setting), labels known, no
defense. Seed ``s`` seeds the model's initialisation and the attack's start, and picks the digits: the
single digit ``probe[s]`` and the batch ``probe[4s:4s+4]`` of the fixed held-out probe set.

``dlg``: the original DLG loop, re-implemented faithfully — ``torch.optim.LBFGS([dummy], lr=1)`` with
torch's defaults (20 inner iterations, tolerances 1e-7 / 1e-9), 300 outer ``step(closure)`` calls, the
closure computing ``sum((∇θL(dummy) − g)²)`` over the parameter tensors and ``.backward()`` — from the
same starting images as the preset, in the same process, interleaved with it (the order alternates by
seed). Evaluations are closure calls (original) and :attr:`AttackResult.evaluations` (preset). A
forward pre-hook on the model records every evaluated point and its time, which gives the evaluations
and seconds until the matched PSNR first reaches ``--target-db`` (40 dB) for both the same way. The
original returns its last iterate, the preset its best one; "PSNR" is the matched PSNR of what each
returns ([0, 1] pixels, per image then mean, capped at 100 dB).

``ig``: the ``inverting_gradients`` preset at its defaults (bounds from the datamodule) on the batch of
4, with evaluations and seconds to reach ``--ig-target-db`` (25 dB).

``labels``: labels unknown, on ``--label-digits`` single digits (one model, seed 0): iDLG's analytic
label and DLG's joint label optimisation at the ``dlg`` preset's defaults.

``speed``: seconds per 1,000 evaluations of each preset on one digit (and resnet18 with ``--models``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from pl_i2f.attacks import PRESETS, idlg_label, invert
from pl_i2f.data import build_datamodule
from pl_i2f.gradients import flat_gradient
from pl_i2f.metrics import reconstruction_metrics
from pl_i2f.models import build_model
from pl_i2f.reference import OriginalDLG


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def digits_setting(seed: int, batch: int):
    """(model, x0, y0, datamodule) for one seed: lenet_zhu (uniform init) and `batch` probe digits."""
    dm = build_datamodule("digits")
    x, y = dm.probe_batch(4 * 3 + 4)
    first = seed if batch == 1 else 4 * seed
    torch.manual_seed(seed)
    model = build_model("lenet_zhu", (1, 16, 16), 10, init="uniform")
    return model, x[first : first + batch], y[first : first + batch], dm


class Trace:
    """Every point the model is evaluated at (a forward pre-hook) with its time since ``start``."""

    def __init__(self, model: torch.nn.Module):
        self.points: list[torch.Tensor] = []
        self.times: list[float] = []
        self.start = time.perf_counter()
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.times.append(time.perf_counter() - self.start)
        self.points.append(args[0].detach().clone())

    def close(self) -> None:
        self.handle.remove()

    def first_reaching(self, x0: torch.Tensor, dm, target_db: float) -> tuple[int | None, float | None]:
        """(evaluations, seconds) until the matched PSNR of an evaluated point first reaches target_db."""
        for i, point in enumerate(self.points):
            if fast_psnr(point, x0, dm) >= target_db:
                return i + 1, self.times[i]
        return None, None


def fast_psnr(recon: torch.Tensor, x0: torch.Tensor, dm) -> float:
    """Matched PSNR ([0, 1] pixels, Hungarian on MSE, per image, capped at 100 dB): the metric's definition
    without SSIM, cheap enough to run on every evaluated point."""
    a = dm.denormalize(recon).clamp(0, 1).flatten(1)
    b = dm.denormalize(x0).clamp(0, 1).flatten(1)
    mse = ((a[:, None] - b[None]) ** 2).mean(-1)
    rows, cols = linear_sum_assignment(mse.numpy())
    per = mse[rows, cols].clamp_min(1e-10)
    return float((10 * torch.log10(1 / per)).clamp(max=100).mean())


def original_dlg(model, target: list[torch.Tensor], y0, start: torch.Tensor, outer_steps: int = 300):
    """The DLG loop (Zhu et al., 2019; labels known): L-BFGS lr 1, torch's defaults, 300 outer steps."""
    loop = OriginalDLG(model, target, y0, start)
    for _ in range(outer_steps):
        loop.step()
    return loop.x, loop.evaluations


def run_dlg(seeds: list[int], batches: list[int], target_db: float) -> None:
    print(f"### dlg preset vs the original DLG loop (load average {load()} at start)")
    print()
    print("| batch | seed | method | PSNR (dB) | evaluations | outer steps | seconds | stop | "
          f"evals to {target_db:g} dB | s to {target_db:g} dB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for batch in batches:
        for seed in seeds:
            model, x0, y0, dm = digits_setting(seed, batch)
            target = list(torch.autograd.grad(F.cross_entropy(model(x0), y0), model.parameters()))
            start = invert(model, target, y0, x0.shape, preset="dlg", seed=seed, iterations=0, progress=False).x
            order = ("original", "preset") if seed % 2 == 0 else ("preset", "original")
            for method in order:
                trace = Trace(model)
                t0 = time.perf_counter()
                if method == "original":
                    recon, evaluations = original_dlg(model, target, y0, start)
                    steps, stop = 300, "300 steps"
                else:
                    result = invert(model, target, y0, x0.shape, preset="dlg", seed=seed, progress=False)
                    recon, evaluations, steps, stop = result.x, result.evaluations, result.iterations, \
                        result.stop_reason
                seconds = time.perf_counter() - t0
                trace.close()
                if method == "preset":
                    assert torch.equal(trace.points[0], start)  # the same start as the original's
                psnr = reconstruction_metrics(recon, x0, denormalize=dm.denormalize)["psnr"]
                n_to, s_to = trace.first_reaching(x0, dm, target_db)
                rows.append({"batch": batch, "seed": seed, "method": method, "psnr": psnr,
                             "evaluations": evaluations, "seconds": seconds})
                print(f"| {batch} | {seed} | {method} | {psnr:.1f} | {evaluations} | {steps} | {seconds:.1f} | "
                      f"{stop} | {n_to if n_to else '—'} | {f'{s_to:.1f}' if s_to else '—'} |", flush=True)
    print()
    print("| batch | method | median PSNR (dB) | median evaluations | median seconds |")
    print("|---|---|---|---|---|")
    for batch in batches:
        for method in ("original", "preset"):
            sel = [r for r in rows if r["batch"] == batch and r["method"] == method]
            print(f"| {batch} | {method} | {statistics.median(r['psnr'] for r in sel):.1f} | "
                  f"{statistics.median(r['evaluations'] for r in sel):.0f} | "
                  f"{statistics.median(r['seconds'] for r in sel):.1f} |")
    print(f"\nload average at end {load()}\n", flush=True)


def run_ig(seeds: list[int], target_db: float, batch: int = 4) -> None:
    print(f"### inverting_gradients preset at its defaults, batch {batch} (load average {load()} at start)")
    print()
    print(f"| seed | PSNR (dB) | iterations | evaluations | seconds | stop | evals to {target_db:g} dB | "
          f"s to {target_db:g} dB |")
    print("|---|---|---|---|---|---|---|---|")
    psnrs = []
    for seed in seeds:
        model, x0, y0, dm = digits_setting(seed, batch)
        target = flat_gradient(model, x0, y0)
        trace = Trace(model)
        result = invert(model, target, y0, x0.shape, preset="inverting_gradients", bounds=dm.pixel_bounds(),
                        seed=seed, progress=False)
        trace.close()
        psnr = reconstruction_metrics(result.x, x0, denormalize=dm.denormalize)["psnr"]
        psnrs.append(psnr)
        n_to, s_to = trace.first_reaching(x0, dm, target_db)
        del trace
        print(f"| {seed} | {psnr:.1f} | {result.iterations} | {result.evaluations} | {result.seconds:.1f} | "
              f"{result.stop_reason} | {n_to if n_to else '—'} | {f'{s_to:.1f}' if s_to else '—'} |", flush=True)
    print(f"\nmedian PSNR {statistics.median(psnrs):.1f} dB; load average at end {load()}\n", flush=True)


def run_labels(n_digits: int) -> None:
    """iDLG and DLG's joint label optimisation (dlg preset defaults) on single digits, labels unknown."""
    print(f"### label recovery on {n_digits} single digits (load average {load()} at start)")
    print()
    dm = build_datamodule("digits")
    x, y = dm.probe_batch(n_digits)
    torch.manual_seed(0)
    model = build_model("lenet_zhu", (1, 16, 16), 10, init="uniform")
    idlg = joint = 0
    evaluations, psnrs, stops = [], [], {}
    for i in range(n_digits):
        x0, y0 = x[i : i + 1], y[i : i + 1]
        target = flat_gradient(model, x0, y0)
        idlg += int(idlg_label(model, target).item() == int(y0))
        result = invert(model, target, None, x0.shape, label_mode="optimize", seed=i, progress=False)
        joint += int(result.labels.tolist() == y0.tolist())
        evaluations.append(result.evaluations)
        psnrs.append(reconstruction_metrics(result.x, x0, denormalize=dm.denormalize)["psnr"])
        stops[result.stop_reason] = stops.get(result.stop_reason, 0) + 1
    print("| method | labels recovered | median evaluations | median PSNR (dB) | stop reasons |")
    print("|---|---|---|---|---|")
    print(f"| iDLG (analytic) | {idlg}/{n_digits} | 0 | — | — |")
    print(f"| dlg preset, joint label optimisation | {joint}/{n_digits} | {statistics.median(evaluations):.0f} | "
          f"{statistics.median(psnrs):.1f} | {', '.join(f'{k} {v}' for k, v in stops.items())} |")
    print(f"\nload average at end {load()}\n", flush=True)


def run_speed(models: list[str], presets: list[str], evaluations: int, resnet_evaluations: int,
              device: torch.device) -> None:
    print(f"### seconds per 1,000 evaluations (load average {load()} at start)")
    print()
    print("| model | preset | BN prior | evaluations | seconds | sec / 1000 evaluations |")
    print("|---|---|---|---|---|---|")
    for model_name in models:
        torch.manual_seed(0)
        if model_name == "lenet_zhu":
            dm = build_datamodule("digits")
            model = build_model("lenet_zhu", (1, 16, 16), 10, init="uniform")
        else:
            dm = build_datamodule("fake", input_shape=(3, 32, 32))
            model = build_model(model_name, (3, 32, 32), 10)
        x0, y0 = (t.to(device) for t in dm.probe_batch(1))
        model = model.to(device)
        target = flat_gradient(model, x0, y0)
        n = evaluations if model_name == "lenet_zhu" else resnet_evaluations
        lo, hi = dm.pixel_bounds()
        for preset in presets:
            # a fixed evaluation budget with no early stop: the cost of one evaluation is what is measured
            kwargs = dict(bounds=(lo.to(device), hi.to(device)), progress=False, iterations=10**6,
                          lbfgs_tolerance_change=0.0, lbfgs_tolerance_grad=0.0, patience=None)
            invert(model, target, y0, x0.shape, preset=preset, max_evaluations=2, **kwargs)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = invert(model, target, y0, x0.shape, preset=preset, max_evaluations=n, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            bn = "yes" if result.threat_model["bn_statistics_known"] else "no"
            print(f"| {model_name} | {preset} | {bn} | {result.evaluations} | {seconds:.1f} | "
                  f"{seconds / max(result.evaluations, 1) * 1000:.1f} |", flush=True)
    print(f"\nload average at end {load()}\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["dlg"], choices=["dlg", "ig", "labels", "speed"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4], help="dlg section batch sizes")
    parser.add_argument("--target-db", type=float, default=40.0, help="dlg (L2) PSNR threshold")
    parser.add_argument("--ig-target-db", type=float, default=25.0, help="inverting_gradients (cosine) threshold")
    parser.add_argument("--label-digits", type=int, default=20, help="labels section: single digits")
    parser.add_argument("--models", nargs="+", default=["lenet_zhu"], help="speed section models")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--evaluations", type=int, default=1000, help="speed section, lenet_zhu")
    parser.add_argument("--resnet-evaluations", type=int, default=100, help="speed section, resnet models")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no oversubscription)")
    parser.add_argument("--device", default="cpu", help="speed section only")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="attack bn prior requested")  # gradinversion on lenet_zhu
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
          f"{os.cpu_count()} cores, load average {load()} at start\n")
    if "dlg" in args.sections:
        run_dlg(args.seeds, args.batches, args.target_db)
    if "ig" in args.sections:
        run_ig(args.seeds, args.ig_target_db)
    if "labels" in args.sections:
        run_labels(args.label_digits)
    if "speed" in args.sections:
        run_speed(args.models, args.presets, args.evaluations, args.resnet_evaluations, torch.device(args.device))


if __name__ == "__main__":
    main()
