"""The calibrated estimate's CUDA paths against the CPU, on the default model and data: lenet_zhu on the bundled
digits with their data prior (the exact route on the data's span), under Gaussian noise, DP-SGD's clipped
gradient, no noise, and the anisotropic defense's covariance. Prints, per case, the largest relative difference
of the per-probe expected errors (CUDA vs CPU, both float64 algebra on float32 Jacobians) and the seconds of one
evaluation on each device. Measures, asserts nothing; without CUDA it prints one line and exits 0.

    PYTHONPATH=. python benchmarks/gpu_paths.py --probes 32
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from pl_i2f.data import DigitsDataModule
from pl_i2f.defenses.anisotropic import AnisotropicDefense
from pl_i2f.leakage import Calibrated, LeakageOptions, leakage_report
from pl_i2f.models import build_model
from pl_i2f.prior import value_scale
from pl_i2f.threat import SampleNoise


def seconds(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_paths: no CUDA device here; nothing to compare")
        return
    torch.manual_seed(0)
    dm = DigitsDataModule()
    dm.prepare_data()
    dm.setup("fit")
    prior, scale = dm.data_prior(), value_scale(dm.std, (1, 16, 16))
    x = torch.stack([dm.val_set[i][0] for i in range(args.probes)])
    y = torch.tensor([dm.val_set[i][1] for i in range(args.probes)])
    ref = torch.stack([dm.val_set[args.probes + i][0] for i in range(8)])
    ref_y = torch.tensor([dm.val_set[args.probes + i][1] for i in range(8)])
    model = build_model("lenet_zhu", (1, 16, 16), 10)
    options = LeakageOptions(prior=prior, value_scale=scale, clipping_norm=1.0, batch_size=32)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}; lenet_zhu, {args.probes} digits probes, "
          f"data prior of rank {Calibrated.exact_columns(prior, 256)} of 256\n")
    print("| noise | CPU s / evaluation | CUDA s / evaluation | max relative difference of per-probe errors |")
    print("|---|---|---|---|")
    for name in ("gaussian", "dpsgd", "none", "anisotropic"):
        results = {}
        for device in (torch.device("cpu"), torch.device("cuda")):
            net = model.to(device)
            if name == "anisotropic":
                defense = AnisotropicDefense(sigma=0.01)
                defense.noise.set_reference(ref.to(device), ref_y.to(device))
                noise = defense.sample_noise(0, net, batch_size=32)
            else:
                noise = {"gaussian": SampleNoise(std=0.3), "dpsgd": SampleNoise(std=1.0, clip_norm=1.0),
                         "none": SampleNoise()}[name]
            xs, ys = x.to(device), y.to(device)
            evaluation = functools.partial(leakage_report, net, xs, ys, noise, options, Calibrated(route="exact"))
            t, report = seconds(evaluation, device, args.repeats)
            results[device.type] = (t, report.posterior.error(0.05).cpu())
        cpu, cuda = results["cpu"][1], results["cuda"][1]
        diff = float(((cpu - cuda).abs() / cpu.abs().clamp_min(1e-30)).max())
        print(f"| {name} | {results['cpu'][0]:.3f} | {results['cuda'][0]:.3f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
