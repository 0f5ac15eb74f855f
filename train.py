"""Train a classifier through a privacy defense while leakage callbacks watch it.

    python train.py                                  # lenet_zhu on the embedded digits, offline W&B
    python train.py model=convnet optim=sgd trainer.max_epochs=5
    python train.py -m defense=dpsgd defense.noise_multiplier=0.5,1.0,2.0

Thin on purpose: compose the config, build objects, fit, test, summarise. Everything else lives in
``pl_i2f`` (library) and ``callbacks`` (Lightning callbacks).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar

from callbacks._logging import wandb_run
from pl_i2f import defenses
from pl_i2f.data import build_datamodule
from pl_i2f.errors import ConfigError, DataUnavailableError
from pl_i2f.models import build_model
from pl_i2f.module import ClassifierModule

log = logging.getLogger("pl_i2f")


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group that names a ``_target_`` (callbacks, loggers)."""
    if not group:
        return []
    try:
        return [hydra.utils.instantiate(entry) for entry in group.values() if isinstance(entry, DictConfig)
                and "_target_" in entry]
    except InstantiationException as exc:  # a callback's own argument check: one line, not a traceback
        if isinstance(exc.__cause__, ConfigError):
            raise exc.__cause__ from None
        raise


def _plain(node: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, ClassifierModule, pl.Trainer]:
    """Build datamodule, module (model + defense + optimizer settings) and trainer from the config."""
    datamodule = build_datamodule(**_plain(cfg.data))
    model = build_model(**_plain(cfg.model), input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
    defense = defenses.build(**_plain(cfg.defense))
    module = ClassifierModule(model, datamodule.num_classes, defense=defense, **_plain(cfg.optim))
    callbacks = _instantiate_group(cfg.get("callbacks"))
    # `trainer.enable_progress_bar=false` / `enable_checkpointing=false` switch the configured ones off
    # instead of failing on the conflict with the callbacks group
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not cfg.trainer.get("enable_checkpointing", True):
        callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
    loggers = _instantiate_group(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, module, trainer


def _run_config(cfg: DictConfig, datamodule: Any, module: ClassifierModule) -> dict[str, Any]:
    """The resolved config plus what the run derived: data sizes, parameter count, defense."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["derived"] = {
        "data": datamodule.describe(),
        "num_parameters": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
        "defense": module.defense.describe(),
    }
    return config


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit and test as the config says; return the final metrics (``val/acc``, ``test/acc`` …)."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module, trainer = build(cfg)
    datamodule.setup("fit")
    for logger in trainer.loggers:
        logger.log_hyperparams(_run_config(cfg, datamodule, module))

    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
    if cfg.get("test", True):
        trainer.test(module, datamodule=datamodule, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    _print_summary(cfg, metrics, trainer)
    _finish_wandb(trainer)
    return metrics


def _print_summary(cfg: DictConfig, metrics: dict[str, float], trainer: pl.Trainer) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="pl_i2f run summary", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    shown = [k for k in sorted(metrics) if not k.endswith("_step") and "/" in k]
    for key in shown:
        table.add_row(key, f"{metrics[key]:.4f}")
    console = Console(stderr=False)
    console.print(table)
    console.print(f"outputs: {cfg.paths.output_dir}")
    run = wandb_run(trainer)
    if run is not None:
        run_dir = Path(run.dir).parent
        if cfg.logger.wandb.get("offline", True):
            console.print(f"offline W&B run: {run_dir}  (upload: wandb sync {run_dir})")
        else:
            console.print(f"W&B run: {getattr(run, 'url', run_dir)}")


def _finish_wandb(trainer: pl.Trainer) -> None:
    """Close this job's W&B run so the next multirun job starts its own."""
    if wandb_run(trainer) is not None:
        import wandb

        wandb.finish()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    except (ConfigError, DataUnavailableError) as exc:
        # a configuration mistake is one line, not a traceback wall
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective else None


if __name__ == "__main__":
    main()
