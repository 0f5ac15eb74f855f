"""DP-SGD with Opacus the way Opacus' own Lightning example does it, watched by pl_i2f's callbacks.

The module keeps a ``PrivacyEngine`` and calls ``make_private`` in ``configure_optimizers``; the data module is
wrapped in Opacus' ``DPLightningDataModule`` (Poisson sampling). Nothing is told to the callbacks about the
noise: the leakage monitor finds the ``DPOptimizer`` on the trainer and reads its noise multiplier σ and
clipping norm C at every evaluation (the noise on one sample's own clipped gradient is σ·C, logged as
``leakage/noise_std``), and the trade-off tracker logs ``privacy/epsilon`` from the engine's accountant.

    python examples/opacus_lightning.py                # a few epochs, logs under ./opacus_lightning_logs
    python examples/opacus_lightning.py --fast         # a short run (the test runs this)
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.lightning import DPLightningDataModule
from pytorch_lightning.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from pl_i2f.callbacks import AttackAudit, I2FMonitor, TradeoffTracker


class DigitsData(pl.LightningDataModule):
    """scikit-learn's digits as [0, 1] images of 1×8×8, split 80/20."""

    def __init__(self, batch_size: int = 64, seed: int = 0):
        super().__init__()
        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        full = TensorDataset(x, torch.tensor(data.target, dtype=torch.long))
        n_val = len(full) // 5
        self.train_set, self.val_set = random_split(full, [len(full) - n_val, n_val],
                                                    generator=torch.Generator().manual_seed(seed))
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class LitDPDigits(pl.LightningModule):
    """Opacus' ``LitSampleConvNetClassifier`` pattern, sized for 8×8 digits."""

    def __init__(self, lr: float = 0.5, delta: float = 1e-5, noise_multiplier: float = 1.0,
                 max_grad_norm: float = 1.0):
        super().__init__()
        self.lr = lr
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)
        self.delta = delta
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.privacy_engine = PrivacyEngine()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.tanh(self.conv(x)), 2)
        return self.fc(x.flatten(1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0)
        data_loader = self.trainer.datamodule.train_dataloader()
        if hasattr(self, "dp"):
            self.dp["model"].remove_hooks()
        dp_model, optimizer, _ = self.privacy_engine.make_private(
            module=self, optimizer=optimizer, data_loader=data_loader, noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm, poisson_sampling=isinstance(data_loader, DPDataLoader),
        )
        self.dp = {"model": dp_model}
        return optimizer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/acc", (logits.argmax(1) == y).float().mean())


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a short run: 2 epochs of 30 steps, small audit")
    parser.add_argument("--out", default="opacus_lightning_logs", help="log directory (CSV)")
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    args = parser.parse_args(argv)
    # Opacus' per-sample hooks fire on the first layer, whose input never needs a gradient: torch says so each step
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
    pl.seed_everything(0, workers=True)
    data = DigitsData()
    callbacks = [
        I2FMonitor(probe=data.val_set, probe_size=16, every_n_steps=20, first_step=2,
                   max_overhead=None if args.fast else 0.1),
        AttackAudit(probe=data.val_set, every_n_epochs=1, n_samples=2,
                    attack={"preset": "dlg", "iterations": 20 if args.fast else 300}),
        TradeoffTracker(dirpath=args.out),
    ]
    epochs, steps = (2, 30) if args.fast else (10, None)
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=steps, callbacks=callbacks,
                         logger=CSVLogger(args.out, name="opacus_lightning"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10)
    model = LitDPDigits(noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm)
    trainer.fit(model, DPLightningDataModule(data))
    print(f"leakage logged at steps {callbacks[0].steps_logged}; ε = {callbacks[2].points[-1]['epsilon']:.3g}; "
          f"metrics in {trainer.logger.log_dir}")
    return Path(trainer.logger.log_dir)


if __name__ == "__main__":
    main()
