"""StudyReport: a Hydra callback that runs ``python -m pl_i2f.report <sweep dir>`` when a study's sweep ends.

The training studies (``experiment=init_study``, ``defense_comparison``, ``tradeoff_dpsgd``) list it under
``hydra.callbacks``, so one command trains every job and then writes the study's figures (PNG) and numbers
(CSV/JSON) into the multirun directory, plus one combined W&B run when the jobs logged to W&B.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("pl_i2f")


class StudyReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from pl_i2f.report import main

        sweep_dir = str(config.hydra.sweep.dir)
        log.info("study report for %s", sweep_dir)
        main([sweep_dir])
