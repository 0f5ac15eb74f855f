"""Your own LightningModule and DataLoaders, with pl_i2f's leakage monitor, attack audit and trade-off tracker.

A small conv net on scikit-learn's 8×8 digits, trained with plain SGD: nothing here comes from pl_i2f except the
three callbacks. The monitor is told the noise the training would release (``--noise-std``, on one sample's own
gradient); without it the leakage is reported per unit of noise, with the σ that would hold the expected
reconstruction error at a target.

    python examples/own_module.py            # a few epochs, logs under ./own_module_logs
    python examples/own_module.py --fast     # a short run (the test runs this)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from pl_i2f.callbacks import AttackAudit, I2FMonitor, TradeoffTracker


class DigitsNet(pl.LightningModule):
    """A user's classifier: its layers sit on the LightningModule itself (no ``model`` attribute)."""

    def __init__(self, lr: float = 0.1):
        super().__init__()
        self.lr = lr
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.tanh(self.conv(x)), 2)  # tanh: smooth, so the input-gradient Jacobian is informative
        return self.fc(x.flatten(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's digits as [0, 1] images of 1×8×8, split 80/20."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    full = TensorDataset(x, y)
    n_val = len(full) // 5
    train, val = random_split(full, [len(full) - n_val, n_val], generator=torch.Generator().manual_seed(seed))
    return train, val


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="a short run: 2 epochs of 40 steps, small audit")
    parser.add_argument("--out", default="own_module_logs", help="log directory (CSV)")
    parser.add_argument("--noise-std", type=float, default=0.01,
                        help="Gaussian noise std on one sample's own gradient, as the training would release it")
    args = parser.parse_args(argv)
    pl.seed_everything(0, workers=True)
    train, val = digits()
    train_loader = DataLoader(train, batch_size=32, shuffle=True)
    val_loader = DataLoader(val, batch_size=256)
    epochs, steps = (2, 40) if args.fast else (10, None)
    callbacks = [
        # probes: 16 held-out validation samples (seeded); pixels: the data range [0, 1]
        I2FMonitor(probe=val, probe_size=16, noise_std=args.noise_std, every_n_steps=20, first_step=2,
                   max_overhead=None if args.fast else 0.1),
        AttackAudit(probe=val, noise_std=args.noise_std, every_n_epochs=1, n_samples=2,
                    attack={"preset": "dlg", "iterations": 20 if args.fast else 300}),
        TradeoffTracker(dirpath=args.out),
    ]
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=steps, callbacks=callbacks,
                         logger=CSVLogger(args.out, name="own_module"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10)
    trainer.fit(DigitsNet(), train_loader, val_loader)
    print(f"leakage logged at steps {callbacks[0].steps_logged}; metrics in {trainer.logger.log_dir}")
    return Path(trainer.logger.log_dir)


if __name__ == "__main__":
    main()
