"""Every leakage number the monitor, the audit and the studies log, as JSON: run it on two checkouts and diff
(``python benchmarks/compare_leakage_numbers.py out.json``; ``--against old.json`` prints the largest relative
difference). A refactor of the leakage path must leave these bitwise equal or within 1e-12 relative."""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path.cwd()
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def numbers(report) -> dict[str, float]:
    return {**report.scalars, "per_sample": [float(v) for v in report.pixel_rmse.detach().double()]}


def digits_models() -> tuple[object, dict[int, torch.nn.Module], torch.Tensor, torch.Tensor]:
    from pl_i2f.data import build_datamodule
    from pl_i2f.models import build_model

    dm = build_datamodule("digits", seed=0)
    dm.setup("fit")
    torch.manual_seed(0)
    model = build_model("lenet_zhu", (1, 16, 16), 10, init="xavier_uniform")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    kept, step = {0: copy.deepcopy(model)}, 0
    while step < 300:
        for xb, yb in dm.train_dataloader():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            step += 1
            if step == 300:
                break
    kept[300] = copy.deepcopy(model)
    x, y = dm.probe_batch(8)
    return dm, kept, x, y


def library_numbers() -> dict[str, object]:
    from pl_i2f.defenses import build as build_defense
    from pl_i2f.leakage import mean_pixel_std, measure_leakage, monitor_leakage, undamped_leakage

    dm, kept, x, y = digits_models()
    pixel = mean_pixel_std(dm)
    defenses = {"none": build_defense(name="none"), "gaussian": build_defense(name="gaussian", sigma=0.01),
                "anisotropic": build_defense(name="anisotropic", sigma=0.01)}
    defenses["anisotropic"].noise.set_reference_from(dm)
    out: dict[str, object] = {}
    for step, model in kept.items():
        for name, defense in defenses.items():
            key = f"{step}/{name}"
            basis = None
            for i in range(2):  # fresh (with exact spectra), then warm-started, as the monitor runs them
                report = monitor_leakage(model, x, y, defense, step, basis=basis, steps=16 if i else 8,
                                              pixel_std=pixel, exact_spectrum_probes=2 if i == 0 else 0,
                                              generator=torch.Generator().manual_seed(step), clipping_norm=1.0,
                                              batch_size=32)
                out_basis = report[1] if isinstance(report, tuple) else report.basis  # the old API returned a pair
                report = report[0] if isinstance(report, tuple) else report
                basis = out_basis.basis
                out[f"monitor/{key}/{i}"] = numbers(report)
            one = monitor_leakage(model, x[:1], y[:1], defense, step, steps=8, pixel_std=pixel)
            out[f"monitor1/{key}"] = numbers(one[0] if isinstance(one, tuple) else one)
            for method in ("slq", "exact"):
                out[f"measure/{key}/{method}"] = numbers(measure_leakage(
                    model, x, y, defense, step, pixel_std=pixel, method=method,
                    generator=torch.Generator().manual_seed(1)))
            # the audit's prediction
            out[f"audit/{key}"] = numbers(measure_leakage(
                model, x[:3], y[:3], defense, step, pixel_std=pixel, damping=0.0, relative_damping=0.01,
                worst_k=0, exact_spectrum_probes=0, generator=torch.Generator().manual_seed(2)))
            undamped = undamped_leakage(model, x[:3], y[:3], defense, step, pixel_std=pixel)
            out[f"undamped/{key}"] = None if undamped is None else [float(v) for v in undamped]
    return out


def trainer_numbers() -> dict[str, object]:
    """The monitor's and the audit's logged values along a short unbudgeted run (deterministic plans)."""
    import pytorch_lightning as pl
    from test_callbacks import CALLBACKS, SMALL

    import train
    from callbacks import AttackAudit, I2FMonitor
    from conftest import FAST, compose_config

    out: dict[str, object] = {}
    for defense in ("defense=none", "defense=gaussian"):
        pl.seed_everything(3)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose_config([*FAST, *SMALL, *CALLBACKS, "seed=3", defense], Path(tmp))
            datamodule, module, trainer = train.build(cfg)
            trainer.fit(module, datamodule=datamodule)
        monitor = next(cb for cb in trainer.callbacks if isinstance(cb, I2FMonitor))
        audit = next(cb for cb in trainer.callbacks if isinstance(cb, AttackAudit))
        out[f"trainer/{defense}/monitor"] = monitor.history
        out[f"trainer/{defense}/audit"] = [{k: v for k, v in p.items() if k != "attack_rmse"} for p in audit.pairs]
    return out


def flat(value: object, prefix: str = "") -> dict[str, float]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--against")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {**library_numbers(), **trainer_numbers()}
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.against:
        old, new = flat(json.loads(Path(args.against).read_text())), flat(result)
        missing = sorted(set(old) ^ set(new))
        worst, where, equal = 0.0, "", 0
        for key in set(old) & set(new):
            a, b = old[key], new[key]
            if a == b:
                equal += 1
                continue
            if isinstance(a, float) and isinstance(b, float) and not (math.isnan(a) and math.isnan(b)):
                rel = abs(a - b) / max(abs(a), 1e-300)
                if rel > worst:
                    worst, where = rel, key
            else:
                worst, where = math.inf, key
        print(f"{len(old)} old / {len(new)} new numbers; {equal} bitwise equal; keys only on one side: "
              f"{missing[:10]}; largest relative difference {worst:.3g} at {where or '-'}")


if __name__ == "__main__":
    main()
