"""Sweeps through Hydra's submitit launcher (the [sweep] extra): a 2-job DP-SGD sweep end to end with
``hydra/launcher=submitit_local`` (the same code path as SLURM, jobs as local processes), and the SLURM launcher
configs composed with a user's overrides (no cluster needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import CONF, ROOT

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the [sweep] extra")
pytest.importorskip("submitit", reason="needs the [sweep] extra")

TINY = ["defense=dpsgd", "data.size=8", "trainer.max_epochs=1", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
        "~callbacks.i2f_monitor", "~callbacks.progress_bar", "logger=none"]


def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
         "task_name=submitit_smoke", f"paths.log_dir={tmp_path}", *TINY, "defense.noise_multiplier=1.0,4.0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep,) = (tmp_path / "submitit_smoke" / "multiruns").iterdir()
    summaries = {}
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        summaries[summary["defense"]["noise_multiplier"]] = summary
        assert summary["epochs"] == 1 and summary["final"]["val/acc"] is not None
        assert "pl_i2f run summary" in (sweep / job / "train.log").read_text()
    assert set(summaries) == {1.0, 4.0}
    # each job really ran its own sweep point: more noise, less privacy spent
    assert summaries[4.0]["final"]["privacy/epsilon"] < summaries[1.0]["final"]["privacy/epsilon"]
    assert len(list((sweep / ".submitit").glob("*/*_log.out"))) == 2  # submitit's own per-job logs


@pytest.mark.parametrize(("launcher", "overrides", "expected"), [
    ("slurm", ["hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30"],
     {"partition": "gpu", "timeout_min": 30, "gpus_per_node": 1, "tasks_per_node": 1, "nodes": 1}),
    ("slurm_ddp", ["trainer=ddp", "trainer.devices=4", "hydra.launcher.nodes=2", "trainer.num_nodes=2"],
     {"gpus_per_node": 4, "tasks_per_node": 4, "nodes": 2}),
])
def test_slurm_launcher_configs_compose(launcher, overrides, expected):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hydra/launcher={launcher}",
                                                       *overrides], return_hydra_config=True)
    node = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert node["_target_"].endswith("SlurmLauncher")
    assert {k: node[k] for k in expected} == expected
    if launcher == "slurm_ddp":  # one SLURM task per device, as Lightning's SLURM environment expects
        assert node["tasks_per_node"] == cfg.trainer.devices and node["nodes"] == cfg.trainer.num_nodes
