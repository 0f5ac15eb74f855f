"""Small helpers shared by the callbacks: finding the W&B run, logging media on the step axis."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from pl_i2f.module import log_at_step


def wandb_run(trainer: pl.Trainer) -> Any | None:
    """The W&B run of the trainer's ``WandbLogger``, or ``None`` when W&B is not logging."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    return None


@rank_zero_only
def log_media(trainer: pl.Trainer, payload: dict[str, Any], step: int | None = None) -> None:
    """Log W&B media/tables on the same step axis as scalars (``trainer/global_step``; default: now)."""
    run = wandb_run(trainer)
    if run is not None and payload:
        run.log({**payload, "trainer/global_step": trainer.global_step if step is None else step})


def log_scalars(pl_module: pl.LightningModule, scalars: dict[str, float], prefix: str) -> None:
    """Epoch-level scalars through ``pl_module.log`` (rank zero only; no collectives), for epoch-end hooks."""
    pl_module.log_dict(
        {f"{prefix}/{k}": float(v) for k, v in scalars.items()},
        on_step=False, on_epoch=True, rank_zero_only=True, sync_dist=False,
    )


def log_scalars_at_step(trainer: pl.Trainer, scalars: dict[str, float], prefix: str, step: int | None = None) -> None:
    """Scalars of a sparse, step-scheduled event (every N steps, step 0 included), filed at exactly that step
    (default: now; see :func:`pl_i2f.module.log_at_step` for why not ``pl_module.log``)."""
    log_at_step(trainer, {f"{prefix}/{k}": float(v) for k, v in scalars.items()}, step)
