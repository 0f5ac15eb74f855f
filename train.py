"""Train a classifier through a privacy defense while leakage callbacks watch it.

    python train.py                                  # lenet_zhu on the embedded digits, offline W&B
    python train.py model=convnet optim=sgd trainer.max_epochs=5
    python train.py -m defense=dpsgd defense.noise_multiplier=0.5,1.0,2.0

Thin on purpose: compose the config, build, fit, test, summarise. The steps are :mod:`pl_i2f.cli` (library) and
``callbacks`` (Lightning callbacks); here is only what needs Hydra.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from pl_i2f import cli as steps
from pl_i2f.errors import is_config_exception, one_line
from pl_i2f.resolvers import register_resolvers
from pl_i2f.runs import RESOLVED_CONFIG, discard_run_dir
from pl_i2f.sampling import leave_process_group

if TYPE_CHECKING:  # torch, Lightning and W&B take seconds to import: only after the config is checked
    import pytorch_lightning as pl

    from pl_i2f.module import ClassifierModule

register_resolvers()  # ${cwd:} and the others the configs use (shared with study.py)

log = logging.getLogger("pl_i2f")


def _plain(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def check_config(cfg: DictConfig) -> None:
    """Fail fast, before torch is imported, on any invalid option (:func:`pl_i2f.validation.validate_config`)."""
    steps.check_config(_plain(cfg))


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, ClassifierModule, pl.Trainer]:
    """Build datamodule, module (model + defense + optimizer settings) and trainer from the config."""
    from callbacks._logging import quiet_known_warnings

    quiet_known_warnings()
    return steps.build(_plain(cfg), hydra.utils.instantiate)


def run(cfg: DictConfig) -> dict[str, float]:
    """Fit and test as the config says; return the final metrics (``val/acc``, ``test/acc`` …)."""
    config = _plain(cfg)
    steps.check_config(config)
    steps.warn_ineffective(config)
    import pytorch_lightning as pl

    from callbacks._logging import wandb_run

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module, trainer = build(cfg)
    metrics = steps.fit_and_test(config, datamodule, module, trainer)
    run = wandb_run(trainer)
    if trainer.is_global_zero:  # once under DDP: the console and the run's train.log
        offline = (config.get("logger") or {}).get("wandb", {}).get("offline", True)
        log.info("%s", steps.summary_text(metrics, config["paths"]["output_dir"], run, offline))
    if run is not None:
        run.finish()  # this job's W&B run: the next multirun job starts its own
    return metrics


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
    steps.log_to_the_run_log()
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
    finally:
        leave_process_group()  # trainer=ddp: every job of the command done (a multirun's too)


if __name__ == "__main__":
    cli()
