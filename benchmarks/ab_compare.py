"""Interleaved A/B timing of ``benchmarks/bench_influence.py`` between two checkouts of the project.

Each run is a separate process (``PYTHONPATH`` = that checkout, 1 intra-op thread), alternating A, B, A, B …
so that load drifts on a shared machine hit both alike. The "time (s)" cell of every table row is collected
and the medians per row and checkout are printed as a markdown table with the load averages.

    python benchmarks/ab_compare.py /path/to/old_checkout . --pairs 3 -- --sections budget,vmap,eigsh --skip-resnet
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
from collections import defaultdict


def table_times(output: str) -> dict[str, float]:
    """Row label → seconds, from every markdown table of the benchmark's output with a "time (s)" column."""
    times: dict[str, float] = {}
    column = None
    for line in output.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "time (s)" in cells:
            column = cells.index("time (s)")
        elif column is not None and not set(cells[0]) <= set("-: "):
            with contextlib.suppress(ValueError, IndexError):  # a row without a number in that column
                times[" / ".join(cells[:column])] = float(cells[column])
    return times


def run(checkout: str, bench_args: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(checkout), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    script = os.path.join(checkout, "benchmarks", "bench_influence.py")
    out = subprocess.run([sys.executable, script, "--threads", "1", *bench_args], env=env, cwd=checkout,
                         capture_output=True, text=True, check=True).stdout
    return table_times(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="checkout A (e.g. the old code)")
    parser.add_argument("b", help="checkout B (e.g. this one)")
    parser.add_argument("--pairs", type=int, default=3)
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    bench_args = argv[split + 1 :]  # for bench_influence.py
    samples: dict[str, dict[str, list[float]]] = {"A": defaultdict(list), "B": defaultdict(list)}
    loads = [os.getloadavg()]
    for _ in range(args.pairs):
        for name, checkout in (("A", args.a), ("B", args.b)):
            for row, t in run(checkout, bench_args).items():
                samples[name][row].append(t)
        loads.append(os.getloadavg())
    print(f"A = {args.a}, B = {args.b}; {args.pairs} interleaved pairs, medians of the runs' own medians\n")
    print("| row | A (s) | B (s) | B / A |")
    print("|---|---|---|---|")
    for row, a_times in samples["A"].items():
        b_times = samples["B"].get(row)
        if not b_times:
            continue
        a, b = statistics.median(a_times), statistics.median(b_times)
        print(f"| {row} | {a:.3f} | {b:.3f} | {b / a:.2f} |")
    print("\nload average (1/5/15 min) before and after each pair: "
          + "; ".join(" / ".join(f"{v:.2f}" for v in load) for load in loads))


if __name__ == "__main__":
    main()
