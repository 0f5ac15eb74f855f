"""Seconds per 1,000 attack iterations for each preset on lenet_zhu and resnet18 (CPU or CUDA).

    python benchmarks/bench_attacks.py                       # both models, all presets
    python benchmarks/bench_attacks.py --models lenet_zhu --iterations 1000

lenet_zhu attacks one 1x16x16 digit (uniform ±0.5 init, the DLG setting) and also reports the PSNR
reached; resnet18 attacks one 3x32x32 generated image (small-input stem) for ``--resnet-iterations``
steps, extrapolated linearly to 1,000. One iteration is one optimizer step (see ``pl_i2f.attacks``).
Prints a markdown table; measures only, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import torch

from pl_i2f.attacks import PRESETS, invert
from pl_i2f.data import build_datamodule
from pl_i2f.gradients import flat_gradient
from pl_i2f.metrics import reconstruction_metrics
from pl_i2f.models import build_model


def setting(model_name: str, device: torch.device):
    """(model, x0, y0, datamodule) for one benchmarked model."""
    torch.manual_seed(0)
    if model_name == "lenet_zhu":
        dm = build_datamodule("digits")
        model = build_model("lenet_zhu", (1, 16, 16), 10, init="uniform")
    else:
        dm = build_datamodule("fake", input_shape=(3, 32, 32))
        model = build_model(model_name, (3, 32, 32), 10)
    x0, y0 = dm.probe_batch(1)
    return model.to(device), x0.to(device), y0.to(device), dm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet_zhu", "resnet18"])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--iterations", type=int, default=1000, help="iterations on lenet_zhu")
    parser.add_argument("--resnet-iterations", type=int, default=200, help="iterations on resnet models")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no oversubscription)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # gradinversion on lenet_zhu (no BatchNorm) runs without its BN prior: the table's "BN prior" column says so
    warnings.filterwarnings("ignore", message="attack bn prior requested")
    device = torch.device(args.device)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}, "
          f"{args.threads} thread(s), {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"at start")
    print()
    print("| model | preset | BN prior | iterations run | seconds | sec / 1000 iters | PSNR (dB) |")
    print("|---|---|---|---|---|---|---|")
    for model_name in args.models:
        model, x0, y0, dm = setting(model_name, device)
        target = flat_gradient(model, x0, y0)
        n = args.iterations if model_name == "lenet_zhu" else args.resnet_iterations
        lo, hi = dm.pixel_bounds()
        bounds = (lo.to(device), hi.to(device))
        for preset in args.presets:
            kwargs = dict(bounds=bounds, progress=False)
            invert(model, target, y0, x0.shape, preset=preset, iterations=2, **kwargs)  # warm-up: one-time costs
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = invert(model, target, y0, x0.shape, preset=preset, iterations=n, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            psnr = reconstruction_metrics(result.x, x0, denormalize=dm.denormalize)["psnr"]
            per_1000 = seconds / max(result.iterations, 1) * 1000
            note = "" if n >= 1000 else f" (extrapolated from {result.iterations})"
            bn = "yes" if result.threat_model["bn_statistics_known"] else "no"
            print(f"| {model_name} | {preset} | {bn} | {result.iterations}{' FAILED' if result.failed else ''} | "
                  f"{seconds:.1f} | {per_1000:.1f}{note} | {psnr:.1f} |", flush=True)
    load = os.getloadavg()
    print()
    print(f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
