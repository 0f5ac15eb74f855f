"""Whole-run wall time with the default leakage callbacks over the same run without them, and how often the
monitor logged leakage.

    python benchmarks/bench_overhead.py                 # both scenarios, 2 repeats each
    python benchmarks/bench_overhead.py --scenarios digits --repeats 3
    python benchmarks/bench_overhead.py --scenarios resnet18 --repeats 1
    python benchmarks/bench_overhead.py --scenarios digits --pairs 5   # only the whole-run wall ratio

"With" is ``callbacks=default`` (checkpointing, progress bar, I2FMonitor, TradeoffTracker); "without" drops
the monitor and the tracker (``~callbacks.i2f_monitor ~callbacks.tradeoff_tracker``) so both runs do the
same checkpointing and logging. Each run is a fresh ``python train.py`` process (imports, W&B offline init
and all), alternating with/without so drifting machine load hits both. Also reported: the median of the
paired ratios (each "with" over the "without" run next to it) and the monitor's own time as it logs it
(``I2FMonitor: N evaluations at K steps in X s (Y% of T s training)``) over its own measured training time —
on a shared VM whole-run times of one configuration can vary by ±30%, and the monitor's own seconds show what
it costs without that noise — and the number of distinct steps with ``leakage/expected_pixel_rmse`` in the W&B run
(step 0 and the final step included), with the probes each evaluation covered and the steps with exact
spectra. Prints a markdown table; measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import math
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
    "gaussian": ("default digits run under defense=gaussian (σ 0.01)", ["defense=gaussian"]),
    "dpsgd": ("digits under defense=dpsgd, 3 epochs (the README's DP-SGD recipe)",
              ["defense=dpsgd", "trainer.max_epochs=3"]),
    "anisotropic": ("digits under defense=anisotropic defense.sigma=0.01, 30 epochs",
                    ["defense=anisotropic", "defense.sigma=0.01"]),
    "anisotropic2": ("digits under defense=anisotropic defense.sigma=0.01, 2 epochs",
                     ["defense=anisotropic", "defense.sigma=0.01", "trainer.max_epochs=2"]),
    "resnet18": (
        "resnet18, CIFAR-size fake data (3x32x32), 2 epochs",
        ["data=fake", "data.input_shape=[3,32,32]", "model=resnet18", "optim=sgd", "trainer.max_epochs=2"],
    ),
}
WITHOUT = ["~callbacks.i2f_monitor", "~callbacks.tradeoff_tracker"]


MONITOR_LINE = re.compile(r"I2FMonitor: (\d+) evaluations at (\d+) steps in ([0-9.]+)s"
                          r"(?: \(([0-9.]+)% of ([0-9.]+)s training\))?; (\d+) reduced, (\d+) skipped")


def leakage_steps(run_root: Path) -> tuple[list[int], list[int], list[int]]:
    """Distinct steps with leakage/expected_pixel_rmse in the offline W&B run under ``run_root``, the probes evaluated
    at each, and the steps with exact spectra (leakage/lambda_min)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from wandb_offline import offline_runs, read_offline_run

    runs = offline_runs(run_root)
    if not runs:
        return [], [], []
    run = read_offline_run(runs[0])
    rows = {int(r["trainer/global_step"]): r for r in run.history if "leakage/expected_pixel_rmse" in r}
    steps = sorted(rows)
    spectra = sorted(int(r["trainer/global_step"]) for r in run.history if "leakage/lambda_min" in r)
    return steps, [int(rows[s].get("leakage/probes", 0)) for s in steps], spectra


def timed_run(overrides: list[str]) -> dict:
    """Wall seconds of one ``python train.py`` process, the monitor's log line, and the leakage steps logged."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "train.py", f"paths.log_dir={tmp}", "trainer.enable_progress_bar=false", *overrides],
            cwd=ROOT, env=env, check=True, capture_output=True, text=True,
        )
        wall = time.perf_counter() - start
        steps, probes, spectra = leakage_steps(Path(tmp))
    found = MONITOR_LINE.search(done.stdout + done.stderr)
    out = {"wall": wall, "monitor": 0.0, "training": math.nan, "steps": steps, "probes": probes, "spectra": spectra,
           "reduced": 0, "skipped": 0}
    if found:
        out.update(monitor=float(found.group(3)), training=float(found.group(5) or "nan"),
                   reduced=int(found.group(6)), skipped=int(found.group(7)))
        if found.group(4):  # the monitor's own share, from unrounded seconds (the line rounds them to 0.1 s)
            out["share"] = float(found.group(4)) / 100
    reductions = re.findall(r"I2FMonitor: step \d+ evaluated on ([^,]+(?:, [^,]+)*?), to stay within", done.stdout
                            + done.stderr)
    out["how"] = "; ".join(dict.fromkeys(reductions))
    return out


def paired_wall_ratio(overrides: list[str], pairs: int) -> tuple[float, list[float]]:
    """Median over ``pairs`` interleaved pairs of the whole-run wall ratio with/without the leakage callbacks,
    and each pair's ratio. The order inside a pair alternates (with first, then without first) so a load that
    drifts across the measurement weighs on both sides alike; everything the callbacks do in the process (the
    monitor, the tracker, their W&B media writes) is inside the "with" wall time."""
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    ratios = []
    for i in range(pairs):
        walls = {}
        order = [True, False] if i % 2 == 0 else [False, True]
        for watched in order:
            walls[watched] = timed_run(overrides if watched else overrides + WITHOUT)["wall"]
        ratios.append(walls[True] / walls[False])
        print(f"pair {i + 1}: with {walls[True]:.1f}s, without {walls[False]:.1f}s, ratio {ratios[-1]:.3f}", flush=True)
    return statistics.median(ratios), ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="digits,resnet18")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=None,
                        help="only the whole-run wall ratio with/without callbacks: median of this many "
                             "interleaved pairs (>= 5 for a figure to report)")
    args = parser.parse_args()
    if args.pairs is not None and args.pairs < 1:
        parser.error(f"--pairs must be >= 1, got {args.pairs}")
    if args.pairs is not None:
        load_before = os.getloadavg()
        results = []
        for name in args.scenarios.split(","):
            label, overrides = SCENARIOS[name]
            results.append((label, *paired_wall_ratio(overrides, args.pairs)))
        print(f"\nload average before: {load_before[0]:.2f}, after: {os.getloadavg()[0]:.2f}\n")
        print("| scenario | pairs | median paired wall ratio (with / without callbacks) | each pair |")
        print("|---|---|---|---|")
        for label, median, ratios in results:
            print(f"| {label} | {len(ratios)} | {median:.3f} | {', '.join(f'{r:.3f}' for r in ratios)} |")
        return
    rows = []
    load_before = os.getloadavg()
    for name in args.scenarios.split(","):
        label, overrides = SCENARIOS[name]
        with_runs, without_times = [], []
        for i in range(args.repeats):
            order = [(True, overrides), (False, overrides + WITHOUT)]
            for watched, ov in order if i % 2 == 0 else order[::-1]:
                run = timed_run(ov)
                if watched:
                    with_runs.append(run)
                    print(f"{name}: with {run['wall']:.1f}s (monitor {run['monitor']:.2f}s of "
                          f"{run['training']:.1f}s training, {run.get('share', math.nan):.1%}; leakage at "
                          f"{len(run['steps'])} steps "
                          f"{run['steps'][:3]}..{run['steps'][-1:]}; {run['reduced']} reduced, "
                          f"{run['skipped']} skipped{'; ' + run['how'] if run['how'] else ''})", flush=True)
                    print(f"    probes per evaluation {run['probes']}; exact spectra at steps {run['spectra']}",
                          flush=True)
                else:
                    without_times.append(run["wall"])
                    print(f"{name}: without {run['wall']:.1f}s", flush=True)
        w = statistics.median(r["wall"] for r in with_runs)
        wo = statistics.median(without_times)
        paired = statistics.median(r["wall"] / b for r, b in zip(with_runs, without_times))
        share = statistics.median(r.get("share", r["monitor"] / r["training"]) for r in with_runs)
        steps = statistics.median(len(r["steps"]) for r in with_runs)
        ends = all(r["steps"][:1] == [0] for r in with_runs)
        probes = [r["probes"] or [0] for r in with_runs]
        coverage = (f"{statistics.median(statistics.median(p) for p in probes):g} / "
                    f"{statistics.median(p[0] for p in probes):g} / {statistics.median(p[-1] for p in probes):g}")
        spectra = statistics.median(len(r["spectra"]) for r in with_runs)
        rows.append((label, w, wo, w / wo, paired, statistics.median(r["monitor"] for r in with_runs), share, steps,
                     ends, sum(r["skipped"] for r in with_runs), coverage, spectra))
    print(f"\nload average before: {load_before[0]:.2f}, after: {os.getloadavg()[0]:.2f}\n")
    print("| scenario | with callbacks (s) | without (s) | ratio of medians | median paired ratio | monitor's own "
          "time (s) | monitor / training | leakage steps logged | step 0 logged | skipped | probes: median / first "
          "/ last | steps with exact spectra |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, w, wo, ratio, paired, monitor, share, steps, ends, skipped, coverage, spectra in rows:
        print(f"| {label} | {w:.1f} | {wo:.1f} | {ratio:.3f} | {paired:.3f} | {monitor:.2f} | {share:.1%} | "
              f"{steps:g} | {'yes' if ends else 'no'} | {skipped} | {coverage} | {spectra:g} |")


if __name__ == "__main__":
    main()
