"""Utility and leakage of the defenses on the embedded digits; writes ``benchmarks/results/defenses.md``.

    python benchmarks/utility_table.py                 # both sections (CPU, ~15-30 min on 2 busy cores)
    python benchmarks/utility_table.py utility --epochs 15
    python benchmarks/utility_table.py ratio           # anisotropic vs Gaussian expected I²F only

* ``utility``: final val accuracy of lenet_zhu (relu) on 16x16 digits (Adam, lr 0.005, cosine, batch 32)
  for none / gaussian / anisotropic / dpsgd at two noise levels each, trained through ``train.run`` exactly
  as ``python train.py`` does (the override list of every row is printed in the table).
* ``ratio``: √E‖I²F‖² on 8 held-out probe samples under the ``anisotropic`` defense's noise (directions from
  8 *other* validation samples) divided by the same for the ``gaussian`` defense at the same σ (equal energy),
  lenet_zhu at initialisation, via ``influence.expected_i2f`` with each defense's ``noise_sampler``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("WANDB_MODE", "offline")

# relu: the sigmoid DLG network barely moves off chance in a few CPU epochs on the digits
BASE = ["data=digits", "model=lenet_zhu", "model.activation=relu", "optim=adam", "callbacks=none", "logger=none",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.enable_checkpointing=false", "seed=0"]
ROWS: list[tuple[str, list[str]]] = [
    ("none", ["defense=none"]),
    ("gaussian σ=0.01", ["defense=gaussian", "defense.sigma=0.01"]),
    ("gaussian σ=0.03", ["defense=gaussian", "defense.sigma=0.03"]),
    ("anisotropic σ=0.01", ["defense=anisotropic", "defense.sigma=0.01"]),
    ("anisotropic σ=0.03", ["defense=anisotropic", "defense.sigma=0.03"]),
    ("dpsgd σ=0.5, C=1", ["defense=dpsgd", "defense.noise_multiplier=0.5"]),
    ("dpsgd σ=1.0, C=1", ["defense=dpsgd", "defense.noise_multiplier=1.0"]),
]


def utility(epochs: int) -> list[str]:
    import train
    from conftest import compose_config

    lines = [f"### Utility: final val accuracy, lenet_zhu (relu) on 16x16 digits, Adam, {epochs} epochs",
             "", f"`python benchmarks/utility_table.py utility --epochs {epochs}`", "",
             "| defense | val/acc | test/acc | ε (δ=1e-5) | time | overrides |", "|---|---|---|---|---|---|"]
    for label, overrides in ROWS:
        start = time.time()
        cfg = compose_config([*BASE, f"trainer.max_epochs={epochs}", *overrides], Path(tempfile.mkdtemp()))
        m = train.run(cfg)
        eps = f"{m['privacy/epsilon']:.2f}" if "privacy/epsilon" in m else "—"
        row = (f"| {label} | {m['val/acc']:.3f} | {m['test/acc']:.3f} | {eps} | {time.time() - start:.0f}s | "
               f"`{' '.join(overrides)}` |")
        print(row, flush=True)
        lines.append(row)
    return lines


def ratio(size: int = 16, reference: int = 8, held_out: int = 8, sigma: float = 0.01) -> list[str]:
    import torch

    from pl_i2f import defenses, influence
    from pl_i2f.data import build_datamodule
    from pl_i2f.models import build_model

    torch.manual_seed(0)
    dm = build_datamodule("digits", size=size, batch_size=32, probe_size=held_out, seed=0)
    dm.setup("fit")
    model = build_model("lenet_zhu", dm.input_shape, 10)
    x, y = dm.probe_batch(held_out + reference)
    hx, hy, rx, ry = x[:held_out], y[:held_out], x[held_out:], y[held_out:]
    op = influence.GradientJacobian(model, hx, hy)
    lines = [f"### Anisotropic vs Gaussian at equal energy: lenet_zhu (init), {size}x{size} digits, "
             f"{reference} reference + {held_out} held-out samples, σ={sigma}", "",
             "`python benchmarks/utility_table.py ratio`", "",
             "| estimator damping ε | defense options | √E‖I²F‖² gaussian | anisotropic | ratio | energy ratio |",
             "|---|---|---|---|---|---|"]
    variants = [
        ("0 (engine fallback)", {}),
        ("0 (engine fallback)", {"power": 0.0}),
        ("0 (engine fallback)", {"power": 0.5}),
        ("1 (paper)", {"damping": 1.0}),
    ]
    cache: dict[str, tuple] = {}
    for label, options in variants:
        eps = 1.0 if "paper" in label else 0.0
        d = defenses.build("anisotropic", sigma=sigma, **options)
        d.noise.set_reference(rx, ry)
        if "dirs" not in cache:
            d.refresh(model)
            cache["dirs"] = (d.noise.eigenvalues, d.noise.vectors)
        else:  # same directions, new weights: skip the d_x-product recomputation
            lam, v = cache["dirs"]
            d.noise.eigenvalues, d.noise.vectors = lam, v
            d.noise.weights = d.noise._weights(lam, d.noise.effective_damping(float(lam.max()), rx.numel(), v.dtype))
            d.noise.refreshed_at = 0
        sampler = d.noise_sampler(0)
        g = torch.Generator().manual_seed(0)
        energy = float(torch.stack([sampler(g).pow(2).sum() for _ in range(500)]).mean())
        energy /= sigma**2 * sum(p.numel() for p in model.parameters())
        gauss = influence.expected_i2f(op, noise_std=sigma, damping=eps)
        shaped = influence.expected_i2f(op, noise_sampler=sampler, damping=eps, noise_draws=128,
                                        generator=torch.Generator().manual_seed(1))
        opts = ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults (power=1, gain-matched)"
        row = (f"| {label} | {opts} | {float(gauss.value):.4g} | {float(shaped.value):.4g} ± "
               f"{float(shaped.stderr):.2g} | **{float(shaped.value / gauss.value):.2f}x** | {energy:.3f} |")
        print(row, flush=True)
        lines.append(row)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="all", choices=("all", "utility", "ratio"))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "defenses.md")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    sections: list[str] = ["# Defenses on the digits", ""]
    if args.what in ("all", "ratio"):
        sections += [*ratio(), ""]
    if args.what in ("all", "utility"):
        sections += [*utility(args.epochs), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.what != "all" and args.out.exists():  # keep the other section of an earlier run
        old = args.out.read_text().split("### ")
        keep = [f"### {part}" for part in old[1:] if part.startswith("Utility" if args.what == "ratio" else "Aniso")]
        sections += keep
    args.out.write_text("\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
