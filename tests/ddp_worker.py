"""Run by ``tests/test_ddp.py`` under ``torchrun --nproc_per_node=2``: one tiny ``trainer=ddp`` run per defense
named on the command line (CPU, gloo), through ``train.run`` as ``python train.py`` builds it. Every rank
writes its final weights, its ε and the batches it saw to ``<out>/<defense>/rank<r>.pt``. ``<name>_preempted``:
that run signalled on rank 0 mid-epoch (it exits 75), then resumed from its ``last.ckpt``."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train.py

import train
from conftest import compose_config
from pl_i2f.sampling import leave_process_group

COMMON = [
    "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false", "logger=csv", "callbacks=default", "~callbacks.progress_bar",
    "callbacks.i2f_monitor.every_n_steps=4", "callbacks.i2f_monitor.max_overhead=null",
    "callbacks.i2f_monitor.worst_k=0",
    "data=fake", "data.input_shape=[1,6,6]", "data.num_samples=200", "data.batch_size=30", "data.probe_size=4",
    "model=mlp", "model.hidden=[8]", "optim=sgd", "optim.lr=0.05", "seed=3",
]
DEFENSES = {"none": ["defense=none"], "gaussian": ["defense=gaussian", "defense.sigma=0.05"],
            "dpsgd": ["defense=dpsgd", "defense.noise_multiplier=1.0"]}
# the leakage autopilot under DDP: σ re-planned from every rank-0 evaluation (every 2 steps, all 4 probes)
AUTOPILOT = {"target_psnr": 28.0, "sigma_min": 0.01, "sigma_max": 8.0, "min_probes": 4, "monitor_every_n_steps": 2}
DEFENSES["autopilot"] = [*DEFENSES["dpsgd"], "noise_schedule=leakage_target",
                         *(f"noise_schedule.{k}={v}" for k, v in AUTOPILOT.items())]


class Record(pl.Callback):
    """Remembers the rank-local batch sizes (each rank trains on its own share), the final weights and the
    defense's final state (its accountant's history, an adaptive schedule's decisions)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.defense: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.append(len(batch[1]))

    def on_train_end(self, trainer, pl_module):
        self.weights = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.defense = pl_module.defense.state_dict()


class SignalRankZero(pl.Callback):
    """Send SIGUSR1 to rank 0's process only, at the start of training step ``step`` (a preemption that one
    rank sees: the others must stop after the same step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and trainer.is_global_zero:
            os.kill(os.getpid(), signal.SIGUSR1)


PREEMPT_AT = 5  # "<defense>_preempted": that run signalled at this step on rank 0, then resumed


def _run(cfg, *callbacks: pl.Callback) -> dict:
    """``train.run(cfg)`` with ``callbacks`` first in the trainer's list."""
    original_build = train.build

    def build(cfg):
        datamodule, module, trainer = original_build(cfg)
        trainer.callbacks[:0] = list(callbacks)
        return datamodule, module, trainer

    train.build = build
    try:
        return train.run(cfg)
    finally:
        train.build = original_build


def main(out: Path, names: list[str]) -> None:
    torch.set_num_threads(1)
    # train.py logs its summary through the root logger (Hydra configures it in a real run)
    logging.basicConfig(level=logging.INFO, format=f"[rank{os.environ.get('RANK', 0)}] %(message)s")
    for name in names:
        overrides = [*COMMON, *DEFENSES[name.removesuffix("_preempted")]]
        exit_code = None
        if name.endswith("_preempted"):
            interrupted = out / name / "interrupted"
            try:
                _run(compose_config(overrides, interrupted), SignalRankZero(PREEMPT_AT))
            except SystemExit as stop:
                exit_code = stop.code
            overrides.append(f"ckpt_path={interrupted / 'checkpoints' / 'last.ckpt'}")
        recorder = Record()
        metrics = _run(compose_config(overrides, out / name), recorder)
        rank = int(os.environ.get("RANK", 0))
        torch.save({"metrics": metrics, "batch_sizes": recorder.sizes, "weights": recorder.weights,
                    "defense": recorder.defense, "world_size": torch.distributed.get_world_size(),
                    "exit_code": exit_code}, out / name / f"rank{rank}.pt")


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), sys.argv[2].split(","))
    finally:
        leave_process_group()  # as train.py does: no gloo group left alive at exit
