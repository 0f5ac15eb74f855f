"""Whole-run wall time with the default leakage callbacks over the same run without them.

    python benchmarks/bench_overhead.py                 # both scenarios, 2 repeats each
    python benchmarks/bench_overhead.py --scenarios digits --repeats 3

"With" is ``callbacks=default`` (checkpointing, progress bar, I2FMonitor, TradeoffTracker); "without" drops
the monitor and the tracker (``~callbacks.i2f_monitor ~callbacks.tradeoff_tracker``) so both runs do the
same checkpointing and logging. Each run is a fresh ``python train.py`` process (imports, W&B offline init
and all), alternating with/without so drifting machine load hits both. Also reported: the median of the
paired ratios (each "with" over the "without" run next to it) and the monitor's own time as it logs it
(``I2FMonitor: N evaluations in X s``) over the median "without" run — on a shared VM whole-run times of one
configuration can vary by ±30%, and the monitor's own seconds show what it costs without that noise. Prints a
markdown table; measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCENARIOS = {
    "digits": ("default digits run (lenet_zhu, 30 epochs)", []),
    "resnet18": (
        "resnet18, CIFAR-size fake data (3x32x32), 1 epoch",
        ["data=fake", "data.input_shape=[3,32,32]", "model=resnet18", "optim=sgd", "trainer.max_epochs=1"],
    ),
}
WITHOUT = ["~callbacks.i2f_monitor", "~callbacks.tradeoff_tracker"]


def timed_run(overrides: list[str]) -> tuple[float, float]:
    """Wall seconds of one ``python train.py`` process, and the monitor's own seconds from its log line."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "train.py", f"paths.log_dir={tmp}", "trainer.enable_progress_bar=false", *overrides],
            cwd=ROOT, env=env, check=True, capture_output=True, text=True,
        )
        wall = time.perf_counter() - start
    found = re.search(r"I2FMonitor: \d+ evaluations in ([0-9.]+)s", done.stdout + done.stderr)
    return wall, float(found.group(1)) if found else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="digits,resnet18")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()
    for name in args.scenarios.split(","):
        label, overrides = SCENARIOS[name]
        with_times, without_times, monitor_times = [], [], []
        for i in range(args.repeats):
            order = [(with_times, overrides), (without_times, overrides + WITHOUT)]
            for times, ov in order if i % 2 == 0 else order[::-1]:
                wall, monitor = timed_run(ov)
                times.append(wall)
                if times is with_times:
                    monitor_times.append(monitor)
                print(f"{name}: {'with' if times is with_times else 'without'} {wall:.1f}s"
                      + (f" (monitor {monitor:.1f}s)" if times is with_times else ""), flush=True)
        w, wo = statistics.median(with_times), statistics.median(without_times)
        paired = statistics.median(a / b for a, b in zip(with_times, without_times))
        rows.append((label, w, wo, w / wo, paired, statistics.median(monitor_times)))
    print(f"\nload average before: {load_before[0]:.2f}, after: {os.getloadavg()[0]:.2f}\n")
    print("| scenario | with callbacks (s) | without (s) | ratio of medians | median paired ratio | monitor's own "
          "time (s) | 1 + monitor / without |")
    print("|---|---|---|---|---|---|---|")
    for label, w, wo, ratio, paired, monitor in rows:
        print(f"| {label} | {w:.1f} | {wo:.1f} | {ratio:.3f} | {paired:.3f} | {monitor:.1f} | {1 + monitor / wo:.3f} |")


if __name__ == "__main__":
    main()
