"""Preemption: SIGINT, SIGTERM or SIGUSR1 to a DP-SGD run mid-epoch → it finishes the step, writes one
resumable ``last.ckpt``, exits 75; resuming gives bitwise the weights and the ε of the uninterrupted run, and
the run summary says where it was interrupted and resumed. Plus the pure helpers of ``pl_i2f.preemption``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from test_resume import EPOCHS, RUN, _assert_same_run, _run

from conftest import ROOT
from pl_i2f.checkpoint import batches_into_epoch, completed_epochs, load_checkpoint, prepare_resume
from pl_i2f.data import EpochPoissonSampler, EpochShuffleSampler
from pl_i2f.errors import ConfigError
from pl_i2f.preemption import (
    EXIT_PREEMPTED,
    Interruptions,
    position_loader,
    requeue_command,
    requeued_checkpoint,
    signal_numbers,
)

STEPS_PER_EPOCH = 4
SIGNAL_STEPS = random.Random(25).sample(range(1, STEPS_PER_EPOCH * EPOCHS - 1), 3)  # never the final step


POLL = 0.05  # seconds between checks while a test waits on another process


class PauseAt(pl.Callback):
    """At the start of training step ``step``: write the step to ``marker`` and wait (up to ``timeout`` s) until
    the preemption callback has received a signal, so the signal lands inside that step, whatever the load."""

    def __init__(self, step: int, marker: str, polls: int = 6000):
        self.step, self.marker, self.polls = step, Path(marker), polls

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self._pause(trainer)

    def _pause(self, trainer):
        preemption = next(c for c in trainer.callbacks if type(c).__name__ == "PreemptionCheckpoint")
        self.marker.write_text(str(self.step))
        for _ in range(self.polls):  # a bounded wait by count (POLL seconds each), not by reading a clock
            if preemption.received is not None:
                break
            time.sleep(POLL)


class PauseInValidation(PauseAt):
    """As :class:`PauseAt`, in the first validation batch after training step ``step`` (a signal that Lightning
    turns into its own ``SIGTERMException`` mid-validation, before the preemption callback's next check)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pass

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking and trainer.global_step == self.step and batch_idx == 0:
            self._pause(trainer)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, _run(out)


def _interrupt(run_dir: Path, step: int, signum: signal.Signals, pause: str = "PauseAt",
               *extra: str) -> subprocess.CompletedProcess:
    """``python train.py`` (the RUN config) in a subprocess, sent ``signum`` once it has started ``step``."""
    marker = run_dir.parent / f"{run_dir.name}.step"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT / "tests")}
    process = subprocess.Popen(
        [sys.executable, "train.py", *RUN, f"hydra.run.dir={run_dir}",
         f"+callbacks.pause._target_=test_preemption.{pause}", f"+callbacks.pause.step={step}",
         f"+callbacks.pause.marker={marker}", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for _ in range(10_000):  # bounded by count (POLL seconds each): the run reaches the step or ends
            if marker.exists() or process.poll() is not None:
                break
            time.sleep(POLL)
        assert marker.exists(), "the run never reached the step"
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize(("signum", "step"), zip((signal.SIGINT, signal.SIGTERM, signal.SIGUSR1), SIGNAL_STEPS))
def test_signal_mid_epoch_checkpoints_once_and_resumes_bitwise(tmp_path, uninterrupted, signum, step):
    run_dir = tmp_path / "interrupted"
    result = _interrupt(run_dir, step, signum)
    assert result.returncode == EXIT_PREEMPTED, result.stderr[-3000:]

    log = (run_dir / "train.log").read_text()
    assert log.count(f"PreemptionCheckpoint: {signum.name} received; stopped after step {step + 1}") == 1, log[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert [p.name for p in checkpoints.glob("last*")] == ["last.ckpt"]  # one resumable checkpoint, no temp file
    assert not list(run_dir.rglob("hpc_ckpt_*.ckpt"))  # Lightning's in-handler SLURM save did not run
    last = load_checkpoint(checkpoints / "last.ckpt")
    assert last["global_step"] == step + 1  # the step in progress was finished, nothing after it
    assert completed_epochs(last) == (step + 1) // STEPS_PER_EPOCH
    assert batches_into_epoch(last) == (step + 1) % STEPS_PER_EPOCH
    assert len(last["defense"]["accountant"]["history"]) > 0

    resumed = tmp_path / "resumed"
    metrics = _run(resumed, f"ckpt_path={checkpoints / 'last.ckpt'}")
    _assert_same_run(resumed, metrics, uninterrupted)

    summary = json.loads((resumed / "summary.json").read_text())["preemption"]
    assert summary == {"times_interrupted": 1, "interrupted_at_steps": [step + 1], "signals": [signum.name],
                       "times_resumed": 1, "resumed_at_steps": [step + 1]}


def test_sigterm_during_validation_is_lightnings_stop_checkpointed_the_same_way(tmp_path, uninterrupted):
    run_dir = tmp_path / "interrupted"
    step = STEPS_PER_EPOCH  # validation after epoch 1, in batches of 8 (several: Lightning stops after the first)
    result = _interrupt(run_dir, step, signal.SIGTERM, "PauseInValidation", "data.eval_batch_size=8")
    assert result.returncode == EXIT_PREEMPTED, result.stderr[-3000:]
    assert "PreemptionCheckpoint: SIGTERM received" in (run_dir / "train.log").read_text()
    last = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert last["global_step"] == step and completed_epochs(last) == 0  # inside epoch 1's validation
    resumed = tmp_path / "resumed"
    metrics = _run(resumed, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    _assert_same_run(resumed, metrics, uninterrupted)


def test_uninterrupted_summary_says_so(uninterrupted):
    out, _ = uninterrupted
    summary = json.loads((out / "summary.json").read_text())["preemption"]
    assert summary["times_interrupted"] == summary["times_resumed"] == 0


def test_resume_message_names_the_step_of_a_mid_epoch_checkpoint(tmp_path, uninterrupted):
    out, _ = uninterrupted
    last = load_checkpoint(out / "checkpoints" / "last.ckpt")
    loops = last["loops"]["fit_loop"]
    loops["epoch_progress"]["current"]["started"] = loops["epoch_progress"]["current"]["processed"] + 1
    loops["epoch_loop.batch_progress"]["current"]["processed"] = 2
    torch.save(last, tmp_path / "mid.ckpt")
    model = torch.nn.Module()
    plan = prepare_resume(tmp_path / "mid.ckpt", model, "dpsgd", EPOCHS + 1)
    assert f"at step {last['global_step']} (epoch {EPOCHS}, after batch 2)" in plan.message and not plan.finished


# -- pure helpers --------------------------------------------------------------------------------------------
class _Loader:
    """The attributes of a DataLoader that position_loader reads."""

    def __init__(self, batch_sampler, num_workers: int = 0):
        self.batch_sampler, self.num_workers, self.persistent_workers = batch_sampler, num_workers, False
        self.sampler = getattr(batch_sampler, "sampler", batch_sampler)


def test_position_loader_skips_the_consumed_poisson_batches_of_the_same_epoch():
    sampler = EpochPoissonSampler(50, 0.2, 5, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    fresh = EpochPoissonSampler(50, 0.2, 5, seed=3)
    assert position_loader(_Loader(fresh), epoch=2, batches=3)
    assert list(fresh) == full[3:]
    assert list(fresh) == full  # once: the next epoch pass is whole again


def test_position_loader_skips_the_consumed_shuffled_batches_of_the_same_epoch():
    from torch.utils.data import BatchSampler

    sampler = EpochShuffleSampler(23, seed=1, rank=1, world_size=2)
    sampler.set_epoch(4)
    full = list(BatchSampler(sampler, 5, drop_last=False))
    fresh = BatchSampler(EpochShuffleSampler(23, seed=1, rank=1, world_size=2), 5, drop_last=False)
    assert position_loader(_Loader(fresh), epoch=4, batches=1)
    assert list(fresh) == full[1:]


def test_position_loader_leaves_a_foreign_loader_alone():
    from torch.utils.data import BatchSampler, SequentialSampler

    assert not position_loader(_Loader(BatchSampler(SequentialSampler(range(8)), 2, False)), epoch=1, batches=1)


def test_interruptions_round_trip_through_their_state():
    log = Interruptions()
    log.interrupt(7, 1, "SIGTERM")
    log.resume(7, 1)
    copy = Interruptions()
    copy.load_state_dict(log.state_dict())
    assert copy.summary() == {"times_interrupted": 1, "interrupted_at_steps": [7], "signals": ["SIGTERM"],
                              "times_resumed": 1, "resumed_at_steps": [7]}


def test_slurm_requeue_command_and_requeued_checkpoint(tmp_path):
    assert requeue_command({}) is None
    assert requeue_command({"SLURM_JOB_ID": "123"}) == ["scontrol", "requeue", "123"]
    array = {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "120", "SLURM_ARRAY_TASK_ID": "4"}
    assert requeue_command(array)[-1] == "120_4"
    assert requeue_command({"SLURM_JOB_ID": "1; rm -rf /"}) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert requeued_checkpoint(tmp_path, {"SLURM_RESTART_COUNT": "1"}) is None  # nothing to resume yet
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert requeued_checkpoint(tmp_path, {}) is None  # a first run starts fresh
    assert requeued_checkpoint(tmp_path, {"SLURM_RESTART_COUNT": "2"}) == str(last)


def test_unknown_preemption_signal_is_one_line():
    from callbacks.preemption import PreemptionCheckpoint

    assert signal_numbers(["TERM", "SIGUSR1"]) == [signal.SIGTERM, signal.SIGUSR1]
    with pytest.raises(ConfigError, match="preemption signal 'SIGHUP' is not one of SIGINT, SIGTERM, SIGUSR1"):
        PreemptionCheckpoint(signals=["SIGHUP"])


def test_slurm_launcher_signals_usr1_and_allows_requeue(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf
    from submitit.slurm.slurm import _make_sbatch_string

    from conftest import CONF

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm_ddp"], return_hydra_config=True)
    node = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    script = _make_sbatch_string(command="python train.py", folder=str(tmp_path), signal_delay_s=node["signal_delay_s"],
                                 additional_parameters=node["additional_parameters"]).splitlines()
    assert [line for line in script if line.startswith("#SBATCH --signal")] == ["#SBATCH --signal=USR1@90"]
    assert "#SBATCH --requeue" in script
