"""Train a classifier through a privacy defense while leakage callbacks watch it.

    python train.py                                  # lenet_zhu on the embedded digits, offline W&B
    python train.py model=convnet optim=sgd trainer.max_epochs=5
    python train.py -m defense=dpsgd defense.noise_multiplier=0.5,1.0,2.0

Thin on purpose: compose the config, build objects, fit, test, summarise. Everything else lives in
``pl_i2f`` (library) and ``callbacks`` (Lightning callbacks).
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from pl_i2f.errors import ConfigError, is_config_exception, one_line, unknown_name
from pl_i2f.runs import RESOLVED_CONFIG, discard_run_dir
from pl_i2f.validation import check_against_data, validate_config

if TYPE_CHECKING:  # torch, Lightning and W&B take seconds to import: only after the config is checked
    import pytorch_lightning as pl

    from pl_i2f.module import ClassifierModule

CONF_DIR = Path(__file__).resolve().parent / "conf"

# The launch directory, for `paths.root_dir`. Hydra's ${hydra:runtime.cwd} is unset while a multirun
# launcher resolves `hydra.sweep.dir`, so sweeps would crash on it; this resolver works in both places.
OmegaConf.register_new_resolver("cwd", os.getcwd, replace=True)

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


# -- checks that need no torch: a typo is reported in a second, not after the heavy imports ----------
def _group_names(group: str) -> set[str]:
    """The ``name`` every option of a config group sets (conf/<group>/*.yaml; a ``_global_`` option sets
    ``<group>.name``)."""
    names = set()
    for path in (CONF_DIR / group).glob("*.yaml"):
        node = OmegaConf.load(path)
        if path.read_text().startswith("# @package _global_"):
            node = node.get(group, {})
        name = node.get("name")
        if name is not None:
            names.add(str(name))
    return names


def check_config(cfg: DictConfig) -> None:
    """Fail fast, before torch is imported, on the mistakes that need no model to detect: names that no
    config option provides and impossible optimizer numbers. (The library checks everything again.)"""
    for group, kind in (("model", "model"), ("data", "dataset"), ("defense", "defense")):
        name = cfg[group].get("name")
        valid = _group_names(group)
        if valid and name not in valid:
            raise unknown_name(kind, str(name), valid)
    lr = cfg.optim.get("lr")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {lr}")
    momentum = cfg.optim.get("momentum", 0.0)
    if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {momentum}")
    validate_config(OmegaConf.to_container(cfg, resolve=True))  # every option: types, ranges, combinations


def warn_ineffective(cfg: DictConfig) -> None:
    """Say so when a setting the user changed has nothing to act on in this configuration."""
    threat = cfg.get("threat_model") or {}
    if not threat.get("labels_known", True) and "attack_audit" not in (cfg.get("callbacks") or {}):
        log.warning("threat_model.labels_known=false changes only the attack audit, which is off (add "
                    "callbacks=audit); the leakage monitor's I²F estimate always assumes known labels")


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, ClassifierModule, pl.Trainer]:
    """Build datamodule, module (model + defense + optimizer settings) and trainer from the config."""
    from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar

    from callbacks._logging import quiet_known_warnings
    from pl_i2f import defenses
    from pl_i2f.checkpoint import SafeCheckpointIO
    from pl_i2f.data import build_datamodule
    from pl_i2f.models import build_model
    from pl_i2f.module import ClassifierModule

    quiet_known_warnings()
    datamodule = build_datamodule(**_plain(cfg.data))
    model_options = _plain(cfg.model)
    # the config lists every scheme's options (so `model.init_kwargs.a=0.5` needs no `+`); null: not given
    model_options["init_kwargs"] = {k: v for k, v in (model_options.get("init_kwargs") or {}).items()
                                    if v is not None}
    model = build_model(**model_options, input_shape=datamodule.input_shape, num_classes=datamodule.num_classes)
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
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      plugins=[SafeCheckpointIO()])  # weights_only loading, atomic saving
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
    check_config(cfg)
    warn_ineffective(cfg)
    import pytorch_lightning as pl
    import torch

    from pl_i2f.checkpoint import prepare_resume

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module, trainer = build(cfg)
    datamodule.setup("fit")
    check_against_data(_plain(cfg), len(datamodule.val_set), len(datamodule.train_set))
    resume = prepare_resume(cfg.get("ckpt_path"), module.model, module.defense.name, cfg.trainer.max_epochs)
    if resume.message:
        log.info("%s", resume.message)
    for logger in trainer.loggers:
        logger.log_hyperparams(_run_config(cfg, datamodule, module))

    if cfg.get("train", True) and not resume.finished:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
    if cfg.get("test", True):
        trainer.test(module, datamodule=datamodule, verbose=False, ckpt_path=resume.path if resume.finished else None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    _print_summary(cfg, metrics, trainer)
    _finish_wandb(trainer)
    return metrics


def _print_summary(cfg: DictConfig, metrics: dict[str, float], trainer: pl.Trainer) -> None:
    """The final metrics as a table, and where the outputs are: on the console and in the run's log file (once:
    on rank zero under DDP)."""
    if not trainer.is_global_zero:
        return
    from rich.console import Console
    from rich.table import Table

    from callbacks._logging import wandb_run
    from pl_i2f.report import format_number

    table = Table(title="pl_i2f run summary", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    shown = [k for k in sorted(metrics) if not k.endswith("_step") and "/" in k]
    for key in shown:
        table.add_row(key, format_number(metrics[key]))
    # rendered to text once and logged, so the console and train.log show the same table
    console = Console(file=io.StringIO(), width=100, record=True)
    console.print(table)
    lines = [console.export_text().rstrip(), f"outputs: {cfg.paths.output_dir}"]
    run = wandb_run(trainer)
    if run is not None:
        run_dir = Path(run.dir).parent
        if cfg.logger.wandb.get("offline", True):
            lines.append(f"offline W&B run: {run_dir}\n  upload: wandb sync {run_dir}")
        else:
            lines.append(f"W&B run: {getattr(run, 'url', run_dir)}")
    log.info("\n".join(lines))


def _finish_wandb(trainer: pl.Trainer) -> None:
    """Close this job's W&B run so the next multirun job starts its own."""
    from callbacks._logging import wandb_run

    if wandb_run(trainer) is not None:
        import wandb

        wandb.finish()


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """A warning as ``file:line: Category: message``, without the echoed source line (for most of ours that is
    just ``rank_zero_warn(``)."""
    return f"{filename}:{lineno}: {category.__name__}: {message}"


def _log_to_the_run_log() -> None:
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


def _save_resolved_config(cfg: DictConfig) -> None:
    """``.hydra/config.yaml`` keeps the ``${...}`` interpolations; save the values this run used beside it."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is None:  # hydra.output_subdir=null: the user asked for no .hydra folder
        return
    hydra_dir = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
    hydra_dir.mkdir(parents=True, exist_ok=True)
    (hydra_dir / RESOLVED_CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    _log_to_the_run_log()
    try:
        _save_resolved_config(cfg)
        metrics = run(cfg)
    except Exception as exc:
        if not is_config_exception(exc):
            raise
        # a configuration mistake is one line, not a traceback wall, and leaves no run directory behind
        print(f"error: {one_line(exc)}", file=sys.stderr)
        discard_run_dir(cfg.paths.output_dir, cfg.paths.root_dir)
        sys.exit(2)
    objective = cfg.get("optimized_metric")
    return metrics.get(objective) if objective else None


def cli() -> None:
    """``python train.py``: Hydra's own config errors (unknown group option, typo'd key) are one line, exit 2."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises them instead of printing a stack-trace hint
    try:
        main()
    except Exception as exc:
        if not is_config_exception(exc):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
