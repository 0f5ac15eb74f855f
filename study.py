"""Run one analysis study (no training loop) and keep its raw numbers and figures.

    python study.py study=i2f_vs_attack                    # does I²F predict the real attack?
    python study.py study=eigen_directions                 # noise along single singular directions of J
    python study.py study=i2f_vs_attack study.smoke=true   # the seconds-long version the tests run
    python study.py study=i2f_vs_attack study.params.samples=12 logger=none

Thin on purpose: compose the config, call ``pl_i2f.studies``, log to W&B. Everything lands in the run
directory (``logs/<study>/runs/<date>_<time>/``): ``<study>.csv`` (one row per measurement), ``<study>.json``
(config, summary, seconds), ``<study>_*.png``, and the offline W&B run. Redraw the figures of a finished run
with ``python -m pl_i2f.report <run dir>``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from pl_i2f.errors import ConfigError
from pl_i2f.resolvers import register_resolvers
from pl_i2f.studies import StudyResult, run_study, study_module

register_resolvers()  # ${cwd:} in conf/paths, as for train.py

log = logging.getLogger("pl_i2f")


def changed_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The params that differ from the study's defaults, so ``study.smoke=true`` keeps its own settings
    for everything the user did not override."""
    module = study_module(name)
    unknown = sorted(set(params) - set(asdict(module.Config())))
    if unknown:
        raise ConfigError(f"unknown {name} parameter(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(sorted(asdict(module.Config())))}")
    defaults = asdict(module.Config())
    return {k: v for k, v in params.items() if v != defaults[k]}


def _flat(prefix: str, value: Any, out: dict[str, float]) -> dict[str, float]:
    """Scalars of a nested summary as ``prefix/key/...`` → float (for W&B's summary)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}/{k}", v, out)
    elif isinstance(value, (bool, int, float)):
        out[prefix] = float(value)
    return out


def log_to_wandb(cfg: DictConfig, result: StudyResult) -> None:
    """One W&B run per study: the summary's scalars, the raw rows as a table, the figures as images."""
    settings = cfg.logger.get("wandb") if cfg.get("logger") else None
    if not settings:
        return
    import wandb

    run = wandb.init(project=settings.project, name=settings.get("name"), group=settings.get("group") or None,
                     tags=list(settings.get("tags") or []), job_type=cfg.task_name, dir=str(settings.save_dir),
                     mode="offline" if settings.get("offline", True) else "online",
                     config=OmegaConf.to_container(cfg.study, resolve=True))
    run.summary.update(_flat(result.name, result.summary, {}) | {f"{result.name}/seconds": result.seconds})
    if result.records:
        columns = list(dict.fromkeys(k for row in result.records for k in row))
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in result.records])
        run.log({f"{result.name}/records": table})
    run.log({f"{result.name}/{p.stem}": wandb.Image(str(p)) for p in result.figures})
    print(f"offline W&B run: {Path(run.dir).parent}" if settings.get("offline", True) else f"W&B run: {run.url}")
    wandb.finish()


def run(cfg: DictConfig) -> StudyResult:
    import torch

    torch.set_num_threads(int(cfg.get("threads", 1)))
    params = OmegaConf.to_container(cfg.study.params, resolve=True) or {}
    result = run_study(cfg.study.name, cfg.paths.output_dir, smoke=bool(cfg.study.smoke),
                       **changed_params(cfg.study.name, params))
    print(f"{result.name}: {len(result.records)} rows in {result.seconds:.0f} s → {result.out_dir}")
    for path in [result.records_path, result.summary_path, *result.figures]:
        print(f"  {path.name}")
    log_to_wandb(cfg, result)
    return result


@hydra.main(version_base="1.3", config_path="conf", config_name="studies")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
