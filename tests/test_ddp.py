"""``trainer=ddp`` on CPU (gloo, 2 processes via torchrun) for none / gaussian / dpsgd: replicas keep identical
weights, the run equals the single-process run of the same seed (same global batches, same noise: DP-SGD's
is added once, on rank 0), ε is accounted once for the global batch, and the rank-0 callbacks (leakage
monitor, trade-off tracker, checkpoints) run without deadlocks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import COMMON, DEFENSES, Record

import train
from conftest import ROOT, compose_config

NAMES = ("none", "gaussian", "dpsgd")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "ddp_worker.py"), str(out), ",".join(NAMES)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (out / "torchrun.log").write_text(result.stdout + result.stderr)
    return out


def _single_process(tmp_path: Path, name: str) -> tuple[dict[str, float], Record]:
    record = Record()
    original = train.build

    def build(cfg):
        datamodule, module, trainer = original(cfg)
        trainer.callbacks.insert(0, record)
        return datamodule, module, trainer

    # the reference needs no leakage monitor (it never touches training: tests/test_callbacks.py)
    overrides = [o for o in COMMON if o not in ("trainer=ddp", "trainer.devices=2") and "i2f_monitor" not in o]
    overrides.append("~callbacks.i2f_monitor")
    try:
        train.build = build
        metrics = train.run(compose_config([*overrides, *DEFENSES[name]], tmp_path))
    finally:
        train.build = original
    return metrics, record


@pytest.mark.parametrize("name", NAMES)
def test_ddp_replicas_agree_and_match_the_single_process_run(ddp_runs, tmp_path, name):
    ranks = [torch.load(ddp_runs / name / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    weights = [r["weights"] for r in ranks]
    assert weights[0] and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # replicas agree

    metrics, single = _single_process(tmp_path, name)
    # each rank trained on its share of every global batch: together, the single run's batches
    assert [a + b for a, b in zip(ranks[0]["batch_sizes"], ranks[1]["batch_sizes"])] == single.sizes
    if name != "dpsgd":
        assert set(ranks[0]["batch_sizes"]) == {15}  # data.batch_size=30 is the global batch
    for key, value in single.weights.items():  # same batches, same noise: the same run up to summation order
        torch.testing.assert_close(weights[0][key], value, rtol=0, atol=1e-6)
    assert not torch.equal(weights[0]["net.1.weight"], torch.zeros_like(weights[0]["net.1.weight"]))
    if name == "dpsgd":  # accounted once for the global batch (rate q, one step per global batch)
        assert ranks[0]["metrics"]["privacy/epsilon"] == pytest.approx(metrics["privacy/epsilon"], rel=1e-9)
        assert ranks[1]["metrics"]["privacy/epsilon"] == pytest.approx(metrics["privacy/epsilon"], rel=1e-9)
    # the rank-0 callbacks ran: leakage estimates logged, one trade-off summary, last.ckpt per epoch
    assert "leakage/expected_i2f" in ranks[0]["metrics"]
    assert (ddp_runs / name / "summary.json").exists()
    assert (ddp_runs / name / "checkpoints" / "last.ckpt").exists()


def test_only_rank_zero_prints_the_run_summary(ddp_runs):
    titles = [line for line in (ddp_runs / "torchrun.log").read_text().splitlines() if "pl_i2f run summary" in line]
    assert len(titles) == len(NAMES)  # one per run
    assert all(line.startswith("[rank0]") for line in titles), titles
