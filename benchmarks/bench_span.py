"""What the exact calibrated estimate costs per probe on the data's span against every input direction: lenet_zhu
(untrained) on bundled-digits probes, the explicit Jacobians J·T (forward-mode products along the rows of T) and
their float64 Gram, for T = the identity (256 directions) and T = the digits prior's support (60 directions: 8×8
images upsampled to 16×16), and an end-to-end evaluation (`leakage_report`, `Calibrated(route="exact")`, span on
and off). Times are the minimum of ``--repeats`` after a warm-up, per probe; measures, asserts nothing.

    PYTHONPATH=. python benchmarks/bench_span.py --threads 1 --probes 1,8,32
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.func import grad, jvp, vmap

from pl_i2f import calibrated as cal
from pl_i2f.data import DigitsDataModule
from pl_i2f.gradients import batch_loss_fn, eval_mode, flatten
from pl_i2f.influence.per_sample import per_sample_batch
from pl_i2f.leakage import Calibrated, LeakageOptions, leakage_report
from pl_i2f.models import build_model
from pl_i2f.prior import value_scale
from pl_i2f.threat import SampleNoise


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probes", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(p) for p in args.probes.split(",")]
    dm = DigitsDataModule()
    dm.prepare_data()
    dm.setup("fit")
    prior, scale = dm.data_prior(), value_scale(dm.std, (1, 16, 16))
    basis, _ = cal.prior_support(prior)
    model = build_model("lenet_zhu", (1, 16, 16), 10)
    n = max(sizes)
    x = torch.stack([dm.train_set[i][0] for i in range(n)])
    y = torch.tensor([dm.train_set[i][1] for i in range(n)])
    params, xs, ys = per_sample_batch(model, x, y)
    loss = batch_loss_fn(model, None)

    def jacobians(tangents: torch.Tensor):
        def columns(xi, yi):
            def g1(z):
                return flatten(grad(loss)(params, z.unsqueeze(0), yi.unsqueeze(0)))

            g, cols = vmap(lambda t: jvp(g1, (xi,), (t,)))(tangents)
            return g[0], cols

        return vmap(columns)

    directions = {"every direction (256)": torch.eye(256).reshape(256, 1, 16, 16),
                  f"data span ({basis.shape[1]})": basis.T.float().reshape(-1, 1, 16, 16).contiguous()}
    options = LeakageOptions(prior=prior, value_scale=scale, clipping_norm=1.0, batch_size=32)
    print(f"torch {torch.__version__}, {args.threads} thread(s)\n")
    print("| directions | probes | Jacobians + float64 Gram, ms / probe | evaluation (leakage_report), ms / probe |")
    print("|---|---|---|---|")
    with eval_mode(model):
        for name, tangents in directions.items():
            fn, span = jacobians(tangents), name.startswith("data")
            for p in sizes:
                def gram(p=p, fn=fn):
                    _, cols = fn(xs[:p], ys[:p])
                    j = cols.double()
                    return j @ j.transpose(1, 2)

                def evaluation(p=p, span=span):
                    return leakage_report(model, x[:p], y[:p], SampleNoise(std=0.3), options, Calibrated(
                        route="exact", span=span))

                print(f"| {name} | {p} | {best(gram, args.repeats) / p * 1e3:.2f} | "
                      f"{best(evaluation, args.repeats) / p * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
