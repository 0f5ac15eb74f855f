"""Small helpers shared by the callbacks: finding the W&B run, logging media on the step axis."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only


def wandb_run(trainer: pl.Trainer) -> Any | None:
    """The W&B run of the trainer's ``WandbLogger``, or ``None`` when W&B is not logging."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    return None


@rank_zero_only
def log_media(trainer: pl.Trainer, payload: dict[str, Any]) -> None:
    """Log W&B media/tables on the same step axis as scalars (``trainer/global_step``)."""
    run = wandb_run(trainer)
    if run is not None and payload:
        run.log({**payload, "trainer/global_step": trainer.global_step})


def log_scalars(pl_module: pl.LightningModule, scalars: dict[str, float], prefix: str) -> None:
    """Epoch-level scalars through ``pl_module.log`` (rank zero only; no collectives), for epoch-end hooks."""
    pl_module.log_dict(
        {f"{prefix}/{k}": float(v) for k, v in scalars.items()},
        on_step=False, on_epoch=True, rank_zero_only=True, sync_dist=False,
    )


def log_scalars_at_step(trainer: pl.Trainer, scalars: dict[str, float], prefix: str) -> None:
    """Scalars of a sparse, step-scheduled event (every N steps, step 0 included), at exactly that step.

    ``pl_module.log(on_step=True)`` is throttled to ``log_every_n_steps`` and would file an evaluation
    made at step 0 under a later step (or drop it), so these go to every logger directly, and into
    ``trainer.callback_metrics`` so that other callbacks (tracker, checkpointing) see them too.
    """
    metrics = {f"{prefix}/{k}": float(v) for k, v in scalars.items()}
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
    _to_loggers(trainer, metrics)


@rank_zero_only
def _to_loggers(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
