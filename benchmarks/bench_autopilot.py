"""Leakage autopilot vs constant noise on digits: accuracy, ε, fraction of evaluations meeting the target,
audited DLG PSNR.

    python benchmarks/bench_autopilot.py                     # ~20 min on a loaded 2-core machine
    python benchmarks/bench_autopilot.py --epochs 4 --dp-epochs 10   # quicker

Gaussian: the autopilot (``noise_schedule=leakage_target``, target ``--target`` dB) against the smallest
constant σ that meets the same target over the whole run. That σ is found from the autopilot's own
measurements: the largest σ it found required (``sigma_required``, margins included) is the first candidate,
run as a constant; then a ``--factor`` (1.5×) grid search — down while ≥ 90% of the run's evaluations meet
target + 1 dB, up while they do not — until the meeting/failing boundary is bracketed (at most ``--tries``
runs); ``--refine`` adds one run at the geometric mean of the bracket. To continue an earlier search without
rerunning what it measured: ``--skip-autopilot --start-sigma S`` starts the grid at S, and ``--append`` adds the
new rows to ``--out`` as a section instead of replacing it, e.g.

    python benchmarks/bench_autopilot.py --skip-autopilot --skip-dp --start-sigma 0.007106 --factor 2 \
        --tries 6 --refine --append
DP-SGD: the autopilot (floor ``--dp-sigma-min``) against the constant noise multiplier that spends the same
final ε over the same steps (Opacus' ``get_noise_multiplier``).

Every run measures the protected PSNR the same way: the constant runs use ``leakage_target`` with
``sigma_min = sigma_max = initial_sigma`` = the constant, so σ never moves but the autopilot callback records
each evaluation. Each run is a fresh ``python train.py`` process (CSV logger, audit once at the end on 2
samples).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pl_i2f.checkpoint import load_checkpoint  # noqa: E402


def run(name: str, overrides: list[str], out: Path) -> dict:
    """One training run; its final metrics, fraction meeting, σ range from the checkpoint."""
    run_dir = out / name
    cmd = [sys.executable, "train.py", *overrides, "logger=csv", "trainer.enable_progress_bar=false",
           "callbacks=audit", "callbacks.attack_audit.every_n_epochs=1000", "callbacks.attack_audit.n_samples=2",
           "callbacks.attack_audit.max_seconds=60", "callbacks.i2f_monitor.log_per_sample_media=false",
           f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    last: dict[str, float] = {}
    for path in run_dir.rglob("metrics.csv"):
        for row in csv.DictReader(path.open()):
            last.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    decisions = ckpt["defense"]["schedule"]["decisions"]
    measured = [d for d in decisions if d["measured_step"] >= 0]
    target = float(next(o.split("=")[1] for o in overrides if o.startswith("noise_schedule.target_psnr=")))
    applied = [d["sigma"] for d in decisions if d["applied"]]
    return {
        "name": name, "seconds": seconds, "val_acc": last.get("val/acc"), "test_acc": last.get("test/acc"),
        "epsilon": last.get("privacy/epsilon"), "audit_psnr": last.get("audit/psnr"),
        "fraction": sum(d["protected_psnr"] <= target + 1 for d in measured) / max(1, len(measured)),
        "evaluations": len(measured), "sigma_min": min(applied, default=float("nan")),
        "sigma_max": max(applied, default=float("nan")),
        "max_required": max((d["sigma_required"] for d in measured if d["probes"] >= 8), default=float("nan")),
        "history": ckpt["defense"].get("accountant", {}).get("history"), "steps": ckpt["global_step"],
    }


def pinned(sigma: float) -> list[str]:
    return [f"noise_schedule.sigma_min={sigma}", f"noise_schedule.sigma_max={sigma}",
            f"noise_schedule.initial_sigma={sigma}"]


def row(label: str, r: dict) -> str:
    eps = f"{r['epsilon']:.2f}" if r["epsilon"] is not None else "—"
    audit = f"{r['audit_psnr']:.1f}" if r["audit_psnr"] is not None else "—"
    return (f"| {label} | {r['sigma_min']:.4g}–{r['sigma_max']:.4g} | {r['val_acc']:.3f} | {r['test_acc']:.3f} | "
            f"{eps} | {r['fraction']:.0%} ({r['evaluations']}) | {audit} | {r['seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--dp-epochs", type=int, default=20)
    parser.add_argument("--target", type=float, default=20.0)
    parser.add_argument("--dp-target", type=float, default=50.0)
    parser.add_argument("--dp-sigma-min", type=float, default=0.8)
    parser.add_argument("--tries", type=int, default=4, help="most constant-σ runs in the grid search")
    parser.add_argument("--factor", type=float, default=1.5, help="grid step of the constant-σ search")
    parser.add_argument("--start-sigma", type=float, default=None,
                        help="first constant σ (default: the autopilot's largest required σ)")
    parser.add_argument("--refine", action="store_true",
                        help="once bracketed, one more run at the geometric mean of the bracket")
    parser.add_argument("--skip-autopilot", action="store_true",
                        help="gaussian: run only the constant search (needs --start-sigma)")
    parser.add_argument("--skip-dp", action="store_true")
    parser.add_argument("--append", action="store_true", help="append the rows to --out instead of replacing it")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "autopilot.md")
    args = parser.parse_args()
    if args.factor <= 1:
        parser.error("--factor must be > 1")
    if args.skip_autopilot and args.start_sigma is None:
        parser.error("--skip-autopilot needs --start-sigma")
    load_before = os.getloadavg()
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_autopilot_") as tmp:
        out = Path(tmp)
        common = ["defense=gaussian", f"trainer.max_epochs={args.epochs}", "noise_schedule=leakage_target",
                  f"noise_schedule.target_psnr={args.target}", "seed=0"]
        if not args.skip_autopilot:
            auto = run("gaussian_autopilot", common, out)
            rows.append(row(f"gaussian, autopilot (target {args.target:g} dB)", auto))
            print(rows[-1], flush=True)

        def constant(sigma: float, attempt: int | str) -> bool:
            const = run(f"gaussian_constant_{attempt}", [*common, *pinned(sigma)], out)
            meets = const["fraction"] >= 0.9
            rows.append(row(f"gaussian, constant σ = {sigma:.4g}{' (meets)' if meets else ''}", const))
            print(rows[-1], flush=True)
            return meets

        # the smallest constant σ meeting the target at >= 90% of evaluations, on a geometric grid: start at the
        # largest σ the autopilot found required (or --start-sigma); step down while it meets, up while it does not
        sigma = args.start_sigma if args.start_sigma is not None else auto["max_required"]
        direction, smallest, largest_failing = None, None, None
        for attempt in range(args.tries):
            meets = constant(sigma, attempt)
            if meets:
                smallest = sigma if smallest is None else min(smallest, sigma)
            else:
                largest_failing = sigma if largest_failing is None else max(largest_failing, sigma)
            step = 1 / args.factor if meets else args.factor
            if direction is not None and step != direction:
                break  # bracketed: the smallest meeting σ on the grid is known
            direction, sigma = step, sigma * step
        if args.refine and smallest is not None and largest_failing is not None:
            between = (smallest * largest_failing) ** 0.5
            if constant(between, "refine"):
                smallest = between
            else:
                largest_failing = between
        bracket = (f"{largest_failing:.4g} fails, {smallest:.4g} meets" if smallest and largest_failing
                   else f"not bracketed; smallest meeting: {smallest:.4g}" if smallest else "none met")
        search = "one run" if args.tries == 1 else f"{args.factor:g}× grid{', refined' if args.refine else ''}"
        rows.append(f"| smallest constant σ meeting the target ({search}) | {bracket} | | | | | | |")
        if not args.skip_dp:
            from opacus.accountants.utils import get_noise_multiplier

            dp = ["defense=dpsgd", "defense.noise_multiplier=2.0", f"trainer.max_epochs={args.dp_epochs}",
                  "noise_schedule=leakage_target", f"noise_schedule.target_psnr={args.dp_target}",
                  f"noise_schedule.sigma_min={args.dp_sigma_min}", "noise_schedule.sigma_max=20.0", "seed=0"]
            dp_auto = run("dpsgd_autopilot", dp, out)
            rows.append(row(f"dpsgd, autopilot (target {args.dp_target:g} dB, floor {args.dp_sigma_min:g})", dp_auto))
            print(rows[-1], flush=True)
            q = dp_auto["history"][0][1]
            sigma_c = float(get_noise_multiplier(target_epsilon=dp_auto["epsilon"], target_delta=1e-5, sample_rate=q,
                                                 steps=dp_auto["steps"], accountant="rdp", epsilon_tolerance=0.001))
            dp_const = run("dpsgd_constant", [*[o for o in dp if not o.startswith("noise_schedule.sigma_")],
                                              *pinned(sigma_c)], out)
            rows.append(row(f"dpsgd, constant σ = {sigma_c:.4g} (same final ε)", dp_const))
            print(rows[-1], flush=True)
    load_after = os.getloadavg()
    header = ["| run | σ over training | val acc | test acc | ε | evaluations ≤ target + 1 dB | audited DLG PSNR (dB) "
              "| seconds |", "|---|---|---|---|---|---|---|---|"]
    command = " ".join(["python benchmarks/bench_autopilot.py", *sys.argv[1:]])
    load = (f"Load average {load_before[0]:.1f} before, {load_after[0]:.1f} after. "
            f"{time.strftime('%Y-%m-%d %H:%M')}.")
    if args.append:
        text = "\n".join(["", f"## `{command}`", "",
                          f"Digits, lenet_zhu, {args.epochs} epochs. {load}", "", *header, *rows, ""])
        with args.out.open("a") as handle:
            handle.write(text)
    else:
        text = "\n".join([
            "# Leakage autopilot benchmark", "",
            f"`{command}` (digits, lenet_zhu; DP-SGD: the dpsgd recipe). {load}", "",
            *header, *rows, "",
        ])
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
