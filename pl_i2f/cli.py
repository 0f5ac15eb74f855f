"""What ``train.py`` does between composing the config and exiting: check, build, fit, test, summarise.

Functions of the resolved config as a plain mapping (``OmegaConf.to_container(cfg, resolve=True)``): no Hydra,
OmegaConf or W&B import here. Hydra's ``instantiate`` (callbacks, loggers, the trainer) is passed in by
``train.py``; the W&B run, when there is one, is passed in as an object.
"""

from __future__ import annotations

import copy
import io
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pl_i2f.errors import ConfigError, unexpected_argument
from pl_i2f.validation import check_against_data, validate_config

if TYPE_CHECKING:  # torch and Lightning take seconds to import: only after the config is checked
    import pytorch_lightning as pl

    from pl_i2f.module import ClassifierModule

#: ``instantiate(node, **kwargs)``: builds the object a config node names by ``_target_`` (Hydra's).
Instantiate = Callable[..., Any]

log = logging.getLogger("pl_i2f")


def check_config(config: Mapping[str, Any]) -> None:
    """Fail fast, before torch is imported: every option's type, range, name and combination."""
    validate_config(config)


def warn_ineffective(config: Mapping[str, Any]) -> None:
    """Say so when a setting the user changed has nothing to act on in this configuration."""
    threat = config.get("threat_model") or {}
    if not threat.get("labels_known", True) and "attack_audit" not in (config.get("callbacks") or {}):
        log.warning("threat_model.labels_known=false changes only the attack audit, which is off (add "
                    "callbacks=audit); the leakage monitor's I²F estimate always assumes known labels")


def instantiate_named(instantiate: Instantiate, key: str, node: Mapping[str, Any], **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)``, with an unknown argument reported as one line naming ``key.argument``
    and the closest valid one (plain mappings carry no config key of their own)."""
    try:
        return instantiate(node, **kwargs)
    except Exception as exc:
        message = unexpected_argument(f"{exc}\n{exc.__cause__ or ''}", key)
        if message is None:
            raise
        raise ConfigError(message) from None  # the one line says it all


def instantiate_group(name: str, group: Mapping[str, Any] | None, instantiate: Instantiate) -> list[Any]:
    """Instantiate every entry of the config group ``name`` that names a ``_target_`` (callbacks, loggers)."""
    if not group:
        return []
    try:
        return [instantiate_named(instantiate, f"{name}.{key}", entry) for key, entry in group.items()
                if isinstance(entry, Mapping) and "_target_" in entry]
    except Exception as exc:  # a callback's own argument check: one line, not a traceback
        if isinstance(exc.__cause__, ConfigError):
            raise exc.__cause__ from None
        raise


def build(config: Mapping[str, Any], instantiate: Instantiate) -> tuple[pl.LightningDataModule, ClassifierModule,
                                                                      pl.Trainer]:
    """Build datamodule, module (model + defense + optimizer settings) and trainer from the config."""
    from pytorch_lightning.callbacks import Checkpoint, ProgressBar

    from pl_i2f import defenses
    from pl_i2f.checkpoint import SafeCheckpointIO
    from pl_i2f.data import build_datamodule
    from pl_i2f.models import build_model
    from pl_i2f.module import ClassifierModule

    datamodule = build_datamodule(**config["data"])
    model_options = dict(config["model"])
    # the config lists every scheme's options (so `model.init_kwargs.a=0.5` needs no `+`); null: not given
    model_options["init_kwargs"] = {k: v for k, v in (model_options.get("init_kwargs") or {}).items()
                                    if v is not None}
    model = build_model(**model_options, input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
    defense = defenses.build(**config["defense"])
    module = ClassifierModule(model, datamodule.num_classes, defense=defense, **config["optim"])
    callbacks = instantiate_group("callbacks", config.get("callbacks"), instantiate)
    # `trainer.enable_progress_bar=false` / `enable_checkpointing=false` switch the configured ones off
    # instead of failing on the conflict with the callbacks group
    if not config["trainer"].get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not config["trainer"].get("enable_checkpointing", True):
        callbacks = [c for c in callbacks if not isinstance(c, Checkpoint)]  # ModelCheckpoint, preemption
    loggers = instantiate_group("logger", config.get("logger"), instantiate)
    trainer = instantiate_named(instantiate, "trainer", config["trainer"], callbacks=callbacks, logger=loggers or False,
                          plugins=[SafeCheckpointIO()])  # weights_only loading, atomic saving
    return datamodule, module, trainer


def run_config(config: Mapping[str, Any], datamodule: Any, module: ClassifierModule) -> dict[str, Any]:
    """The resolved config plus what the run derived: data sizes, parameter count, defense."""
    out = copy.deepcopy(dict(config))
    out["derived"] = {
        "data": datamodule.describe(),
        "num_parameters": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
        "defense": module.defense.describe(),
    }
    return out


def fit_and_test(config: Mapping[str, Any], datamodule: pl.LightningDataModule, module: ClassifierModule,
                 trainer: pl.Trainer) -> dict[str, float]:
    """Fit (resuming from ``ckpt_path``) and test as the config says; return the final scalar metrics."""
    import torch

    from pl_i2f.checkpoint import prepare_resume
    from pl_i2f.preemption import requeued_checkpoint

    datamodule.setup("fit")
    check_against_data(config, len(datamodule.val_set), len(datamodule.train_set))
    # a requeued SLURM job resumes from its own last checkpoint
    ckpt_path = config.get("ckpt_path") or requeued_checkpoint(config["paths"]["output_dir"])
    resume = prepare_resume(ckpt_path, module.model, module.defense.name, config["trainer"].get("max_epochs"))
    if resume.message:
        log.info("%s", resume.message)
    for logger in trainer.loggers:
        logger.log_hyperparams(run_config(config, datamodule, module))

    if config.get("train", True) and not resume.finished:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
    if config.get("test", True):
        trainer.test(module, datamodule=datamodule, verbose=False, ckpt_path=resume.path if resume.finished else None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    return metrics


def summary_text(metrics: Mapping[str, float], output_dir: str, wandb_run: Any = None, offline: bool = True) -> str:
    """The final metrics as a table, and where the outputs are (the run folder, the W&B run)."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from pl_i2f.report import format_number

    table = Table(title="pl_i2f run summary", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    # Lightning's per-step copies ("…_step") are left out, not the step a leakage number was measured at
    for key in sorted(k for k in metrics if (not k.endswith("_step") or k.endswith("measured_at_step")) and "/" in k):
        table.add_row(key, format_number(metrics[key]))
    # rendered to text once and logged, so the console and train.log show the same table
    console = Console(file=io.StringIO(), width=100, record=True)
    console.print(table)
    lines = [console.export_text().rstrip(), f"outputs: {output_dir}"]
    if wandb_run is not None:
        run_dir = Path(wandb_run.dir).parent
        if offline:
            lines.append(f"offline W&B run: {run_dir}\n  upload: wandb sync {run_dir}")
        else:
            lines.append(f"W&B run: {getattr(wandb_run, 'url', run_dir)}")
    return "\n".join(lines)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """A warning as ``file:line: Category: message``, without the echoed source line (for most of ours that is
    just ``rank_zero_warn(``)."""
    return f"{filename}:{lineno}: {category.__name__}: {message}"


def log_to_the_run_log() -> None:
    """Send Lightning's messages and Python warnings through the root logger, which Hydra has pointed at the
    console and ``<output_dir>/train.log``: the file then holds what the console showed (bar the progress bar
    and W&B's own terminal lines)."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logger = logging.getLogger(name)
        # Lightning adds its own stderr handler and stops propagation when imported before logging is set up
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True
    logging.captureWarnings(True)
    warnings.formatwarning = _one_line_warning
