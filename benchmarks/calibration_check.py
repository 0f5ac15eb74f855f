"""Scratch validation: the prior-aware estimator (pl_i2f.calibrated, exact from an explicit Jacobian) against the
MAP attack with the same prior (attack preset ``map``), on digits 16×16 with lenet_zhu, untrained and trained.

Threat model: Gaussian noise σ on one sample's own gradient (batch of one), σ over several decades. For each
(weights, σ, prior) setting: the predicted PSNR (pooled: mean over samples of the per-sample pixel MSE) and the
attack's PSNR pooled the same way, and their gap in dB. Prints a table and the median |gap| / share within 3 dB;
``--out`` writes the rows as JSON.

    python benchmarks/calibration_check.py --samples 4 --steps 300 --out benchmarks/results/calibration_check.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from pl_i2f import calibrated as cal
from pl_i2f import prior as prior_module
from pl_i2f.attacks import invert
from pl_i2f.data import build_datamodule
from pl_i2f.gradients import batch_loss_fn, flatten, trainable_parameters
from pl_i2f.models import build_model


def train(model: torch.nn.Module, dm, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    done = 0
    while done < steps:
        for x, y in dm.train_dataloader():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                return


def jacobians(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample released gradients g (P, d_θ) and their Jacobians J = ∂g/∂x (P, d_θ, d_x), float64."""
    params = trainable_parameters(model)
    fn = batch_loss_fn(model)
    shape = x.shape[1:]

    def grad_of(v: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return flatten(torch.func.grad(fn)(params, v.reshape(1, *shape), yi[None]))

    gs, js = [], []
    for xi, yi in zip(x, y):
        gs.append(grad_of(xi.reshape(-1), yi).detach())
        js.append(torch.func.jacfwd(lambda v, yi=yi: grad_of(v, yi))(xi.reshape(-1)).detach())
    return torch.stack(gs), torch.stack(js)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    ap.add_argument("--priors", nargs="+", default=["full", "isotropic"])
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--weights", nargs="+", default=["untrained", "trained"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    dm = build_datamodule("digits")
    full_prior = dm.data_prior()
    priors = {"full": full_prior, "isotropic": full_prior.isotropic()}
    scale = prior_module.value_scale(dm.std, dm.input_shape)
    x, y = dm.probe_batch(args.samples)
    x = x.double()
    rows = []
    for weights in args.weights:
        torch.manual_seed(args.seed)
        model = build_model("lenet_zhu", dm.input_shape, dm.num_classes)
        if weights == "trained":
            train(model, dm, args.steps, args.seed)
        model = model.double().eval()
        t0 = time.perf_counter()
        g, j = jacobians(model, x, y)
        print(f"[{weights}] Jacobians {tuple(j.shape)} in {time.perf_counter() - t0:.0f}s", flush=True)
        gen = torch.Generator().manual_seed(args.seed)
        for name in args.priors:
            prior = priors[name]
            spec = cal.posterior_spectrum(j.transpose(-1, -2) @ j, prior, value_scale=scale)
            for sigma in args.sigmas:
                mses, converged = [], 0
                for i in range(len(x)):
                    released = g[i] + sigma * torch.randn(g.shape[1], generator=gen, dtype=torch.float64)
                    res = invert(model, released, y[i:i + 1], dm.input_shape, preset="map", prior=prior,
                                 noise=sigma, iterations=args.iterations)
                    mses.append(float(((res.x[0] - x[i]).reshape(-1) * scale).pow(2).mean()))
                    converged += res.converged
                attack = -10 * math.log10(sum(mses) / len(mses))
                predicted = float(spec.psnr(sigma))
                row = {"weights": weights, "prior": name, "sigma": sigma, "predicted_psnr": predicted,
                       "attack_psnr": attack, "gap_db": predicted - attack, "prior_psnr": spec.prior_psnr(),
                       "converged": converged, "samples": len(x)}
                rows.append(row)
                print(f"{weights:9s} {name:9s} σ={sigma:8.0e} predicted {predicted:6.2f} attack {attack:6.2f} "
                      f"gap {predicted - attack:+6.2f} dB (prior {spec.prior_psnr():.2f}, converged "
                      f"{converged}/{len(x)})", flush=True)
    for name in args.priors:
        gaps = [abs(r["gap_db"]) for r in rows if r["prior"] == name]
        within = sum(gap <= 3 for gap in gaps)
        print(f"{name}: median |gap| {statistics.median(gaps):.2f} dB, {within}/{len(gaps)} settings within 3 dB")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
