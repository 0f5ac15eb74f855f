"""``trainer=ddp`` on CPU (gloo, 2 processes via torchrun) for none / gaussian / dpsgd: replicas keep identical
weights, the run equals the single-process run of the same seed (same global batches, same noise: DP-SGD's
is added once, on rank 0), ε is accounted once for the global batch, and the rank-0 callbacks (leakage
monitor, trade-off tracker, checkpoints) run without deadlocks. The leakage autopilot under DDP: rank 0
decides σ from its evaluations, every rank applies the same σ at the same step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import AUTOPILOT, COMMON, DEFENSES, PREEMPT_AT, Record

import train
from conftest import ROOT, compose_config
from pl_i2f.autopilot import LeakageTargetSchedule, epsilon_after
from pl_i2f.checkpoint import batches_into_epoch, load_checkpoint
from pl_i2f.preemption import EXIT_PREEMPTED

NAMES = ("none", "gaussian", "dpsgd")
RUNS = (*NAMES, "autopilot", "autopilot_preempted")  # what the torchrun fixture trains


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "ddp_worker.py"), str(out), ",".join(RUNS)],
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
    assert "leakage/expected_pixel_rmse" in ranks[0]["metrics"]
    assert (ddp_runs / name / "summary.json").exists()
    assert (ddp_runs / name / "checkpoints" / "last.ckpt").exists()


def test_only_rank_zero_prints_the_run_summary(ddp_runs):
    titles = [line for line in (ddp_runs / "torchrun.log").read_text().splitlines() if "pl_i2f run summary" in line]
    assert len(titles) == len(RUNS)  # one per run (the preempted one prints it once, when resumed)
    assert all(line.startswith("[rank0]") for line in titles), titles


def _segments(sigmas: list[float], q: float) -> list[tuple[float, float, int]]:
    """An Opacus accountant's history for one step per σ: runs of equal (σ, q) merged, as the accountant does."""
    history: list[tuple[float, float, int]] = []
    for sigma in sigmas:
        if history and history[-1][:2] == (sigma, q):
            history[-1] = (sigma, q, history[-1][2] + 1)
        else:
            history.append((sigma, q, 1))
    return history


def test_ddp_autopilot_decides_on_rank_zero_and_every_rank_applies_the_same_sigma(ddp_runs):
    ranks = [torch.load(ddp_runs / "autopilot" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    weights = [r["weights"] for r in ranks]
    assert weights[0] and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # replicas agree

    decisions = [r["defense"]["schedule"]["decisions"] for r in ranks]
    assert decisions[0] == decisions[1]  # rank 1 holds rank 0's decisions, step for step
    assert any(d["applied"] and d["measured_step"] >= 0 and d["sigma"] != AUTOPILOT["sigma_max"] for d in decisions[0])
    histories = [[tuple(h) for h in r["defense"]["accountant"]["history"]] for r in ranks]
    assert histories[0] == histories[1]

    # a single-process replay of the same decisions: σ at every step, as the accountant recorded it
    replay = LeakageTargetSchedule.from_config(dict(AUTOPILOT))
    replay.load_state_dict(ranks[0]["defense"]["schedule"])
    steps = sum(n for _, _, n in histories[0])
    q = histories[0][0][1]
    expected = _segments([replay.sigma_at(t) for t in range(steps)], q)
    assert histories[0] == expected and len(expected) > 1  # σ changed during the run
    # ε counted once: one accountant step per global batch at the global rate q, on every rank
    epsilon = epsilon_after(expected, 0.0, q, 0, delta=1e-5)
    for rank in ranks:
        assert rank["metrics"]["privacy/epsilon"] == pytest.approx(epsilon, rel=1e-6)  # logged as float32
    assert (ddp_runs / "autopilot" / "summary.json").exists()


def test_ddp_autopilot_preempted_on_rank_zero_stops_every_rank_and_resumes_bitwise(ddp_runs):
    ranks = [torch.load(ddp_runs / "autopilot_preempted" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    reference = torch.load(ddp_runs / "autopilot" / "rank0.pt", weights_only=True)
    assert [r["exit_code"] for r in ranks] == [EXIT_PREEMPTED, EXIT_PREEMPTED]  # rank 1 stopped with rank 0
    last = load_checkpoint(ddp_runs / "autopilot_preempted" / "interrupted" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == PREEMPT_AT + 1 and batches_into_epoch(last) > 0  # after the signalled step
    for rank in ranks:  # each replica of the resumed run is the uninterrupted DDP run, bit for bit
        assert all(torch.equal(rank["weights"][k], v) for k, v in reference["weights"].items())
        assert rank["defense"]["schedule"]["decisions"] == reference["defense"]["schedule"]["decisions"]
        assert rank["defense"]["accountant"]["history"] == reference["defense"]["accountant"]["history"]
        assert rank["metrics"]["privacy/epsilon"] == reference["metrics"]["privacy/epsilon"]
