"""The LightningModule that trains a classifier through a defense.

The defense sits on the one "released gradient" path: after ``backward`` and before the optimizer
step, :meth:`pl_i2f.defenses.Defense.perturb_gradients_` turns the clean gradient into what the
defense releases (DP-SGD instead wraps the optimizer in ``configure_optimizers``). Nothing else in
the training loop knows which defense is active.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from pl_i2f.defenses import Defense
from pl_i2f.errors import ConfigError, unknown_name
from pl_i2f.registry import LR_SCHEDULERS as SCHEDULERS
from pl_i2f.registry import OPTIMIZERS as OPTIMIZERS


def log_at_step(trainer: pl.Trainer, metrics: dict[str, float], step: int | None = None,
                media: dict[str, Any] | None = None) -> None:
    """Send scalars to every logger at ``step`` (default: the current ``global_step``), now, and into
    ``callback_metrics``; ``media`` (W&B objects: histograms, tables, images) go to a W&B logger only, in the
    same record as the scalars (each W&B call costs about as much as the record it writes).

    For sparse events (an evaluation every N steps, step 0 included — possibly computed a few steps later on
    a snapshot of that step's weights; values at the end of training): ``LightningModule.log(on_step=True)``
    only reaches the loggers every ``log_every_n_steps`` and would file such a value under a later step, and
    it is not allowed at all in ``on_train_end``.
    """
    trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in metrics.items()})
    if trainer.is_global_zero:
        from pytorch_lightning.loggers import WandbLogger

        values = {k: float(v) for k, v in metrics.items()}
        for logger in trainer.loggers:
            with_media = {**values, **media} if media and isinstance(logger, WandbLogger) else values
            logger.log_metrics(with_media, step=trainer.global_step if step is None else step)


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classifier with accuracy metrics, a configurable optimizer/LR schedule and a defense.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc`` and whatever
    the defense reports (``privacy/epsilon``, ``defense/sigma`` …).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        defense: Defense | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        scheduler: str = "none",
        step_size: int = 10,
        gamma: float = 0.1,
        milestones: tuple[int, ...] = (),
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise unknown_name("optimizer", optimizer, OPTIMIZERS)
        if scheduler not in SCHEDULERS:
            raise unknown_name("LR scheduler", scheduler, SCHEDULERS)
        if not lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {weight_decay}")
        if not 0 <= momentum < 1:
            raise ConfigError(f"optim.momentum must be in [0, 1), got {momentum}")
        self.save_hyperparameters(ignore=["model", "defense"])
        self.model = model
        self.defense = defense if defense is not None else Defense()
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self.model(x)
        if len(y) == 0:
            # Poisson sampling (DP-SGD) can draw an empty batch. It still takes a step: zero gradient plus the
            # defense's noise, as the privacy accountant assumes. (A mean over nothing would be NaN.)
            return logits.sum() * 0.0
        loss = F.cross_entropy(logits, y)
        accuracy(logits.detach(), y)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss.detach(), on_step=on_step, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test", self.test_acc)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            # Opacus' per-sample hooks on the first layer fire with no input requiring a gradient (the images
            # never do): torch warns on every step that this is the case, which is exactly what Opacus expects
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed "
                                    "with respect to module outputs", category=UserWarning)
            super().backward(loss, *args, **kwargs)

    # -- the defense's hook points -------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # May replace self.model (DP-SGD's ModuleValidator.fix), so it runs before optimizers and restores.
        self.defense.setup(self, getattr(self.trainer, "datamodule", None))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # global_step = index of the step about to be taken: the defense's noise level for this update.
        self.defense.perturb_gradients_(self.model, self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = self.defense.metrics(max(self.global_step - 1, 0))  # the step just taken
        if metrics:
            self.log_dict(metrics, on_step=True, on_epoch=False)

    def on_train_epoch_end(self) -> None:
        metrics = self.defense.epoch_metrics()
        if metrics:
            self.log_dict(metrics, on_step=False, on_epoch=True)

    def on_train_end(self) -> None:
        # self.log is not allowed here: write the final values (ε after the last step) to the loggers.
        metrics = self.defense.epoch_metrics()
        if metrics:
            log_at_step(self.trainer, metrics)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["defense"] = self.defense.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "defense" in checkpoint:
            self.defense.load_state_dict(checkpoint["defense"])

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        optimizer = self.defense.configure_optimizer(self, optimizer)
        scheduler = self._scheduler(optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
        hp = self.hparams
        if hp.scheduler == "cosine":
            epochs = max(1, int(self.trainer.max_epochs or 1)) if self._trainer is not None else 1
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        if hp.scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.step_size, gamma=hp.gamma)
        if hp.scheduler == "multistep":
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(hp.milestones), gamma=hp.gamma)
        return None
