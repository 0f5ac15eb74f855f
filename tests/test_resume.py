"""Exact resume of DP-SGD: a run interrupted (exception mid-epoch; SIGKILL of the process) and resumed from
``last.ckpt`` ends with the same ε and bitwise the same weights as an uninterrupted run of the same seed
(CPU, deterministic). Also: last.ckpt is written every epoch, a finished run is not re-trained, and unusable
checkpoints give one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import train
from conftest import ROOT, compose_config
from pl_i2f.checkpoint import SafeCheckpointIO, completed_epochs, load_checkpoint
from pl_i2f.errors import CheckpointError

EPOCHS = 3
# tiny DP-SGD run: 120 training samples, expected batch 30 → 4 Poisson steps per epoch
RUN = [
    f"trainer.max_epochs={EPOCHS}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
    "trainer.deterministic=true", "logger=none", "callbacks=default", "~callbacks.i2f_monitor",
    "~callbacks.progress_bar", "data=fake", "data.input_shape=[1,6,6]", "data.num_samples=200",
    "data.batch_size=30", "data.probe_size=4", "model=mlp", "model.hidden=[8]", "optim=sgd", "optim.lr=0.05",
    "defense=dpsgd", "defense.noise_multiplier=1.2", "seed=7",
]


class CrashAt(pl.Callback):
    """Raise (or SIGKILL the process) before training batch ``step`` (a global step inside an epoch)."""

    def __init__(self, step: int, kill: bool = False):
        self.step, self.kill = step, kill

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"simulated crash at step {self.step}")


def _run(out: Path, *extra: str) -> dict[str, float]:
    return train.run(compose_config([*RUN, *extra], out))


def _final(out: Path) -> tuple[dict[str, torch.Tensor], float, int]:
    ckpt = load_checkpoint(out / "checkpoints" / "last.ckpt")
    history = ckpt["defense"]["accountant"]["history"]
    return ckpt["state_dict"], history, ckpt["global_step"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, _run(out)


def _assert_same_run(out: Path, metrics: dict[str, float], reference: tuple[Path, dict[str, float]]) -> None:
    ref_out, ref_metrics = reference
    weights, history, step = _final(out)
    ref_weights, ref_history, ref_step = _final(ref_out)
    assert step == ref_step == 4 * EPOCHS
    assert history == ref_history  # the accountant saw the same (σ, q, steps)
    assert metrics["privacy/epsilon"] == ref_metrics["privacy/epsilon"] > 0
    assert weights.keys() == ref_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], ref_weights[key]), key
    assert metrics["test/acc"] == ref_metrics["test/acc"]


def test_last_checkpoint_is_written_every_epoch(uninterrupted):
    out, _ = uninterrupted
    last = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert completed_epochs(last) == EPOCHS and last["global_step"] == 4 * EPOCHS
    assert not list((out / "checkpoints").glob(".*.tmp"))  # atomic saves leave no temporary files


def test_exception_mid_epoch_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    crash = ["+callbacks.crash._target_=test_resume.CrashAt", "+callbacks.crash.step=6"]  # epoch 2, batch 3
    with pytest.raises(RuntimeError, match="simulated crash at step 6"):
        _run(tmp_path, *crash)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert completed_epochs(load_checkpoint(last)) == 1  # what survives: the end of epoch 1
    resumed = tmp_path / "resumed"
    metrics = _run(resumed, f"ckpt_path={last}")
    _assert_same_run(resumed, metrics, uninterrupted)


def test_sigkill_between_checkpoints_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    killed = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT / "tests")}
    result = subprocess.run(
        [sys.executable, "train.py", *RUN, f"hydra.run.dir={killed}",
         "+callbacks.crash._target_=test_resume.CrashAt", "+callbacks.crash.step=9", "+callbacks.crash.kill=true"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    last = killed / "checkpoints" / "last.ckpt"
    assert completed_epochs(load_checkpoint(last)) == 2  # killed in epoch 3: one epoch lost at most
    resumed = tmp_path / "resumed"
    metrics = _run(resumed, f"ckpt_path={last}")
    _assert_same_run(resumed, metrics, uninterrupted)


def test_resuming_a_finished_run_says_so_and_does_not_train(tmp_path, uninterrupted, caplog):
    out, ref_metrics = uninterrupted
    with caplog.at_level("INFO", logger="pl_i2f"):
        metrics = _run(tmp_path, f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}")
    assert "run already finished" in caplog.text and f"completed {EPOCHS} of trainer.max_epochs={EPOCHS}" in caplog.text
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # nothing trained, nothing saved
    assert metrics["test/acc"] == ref_metrics["test/acc"]  # tested on the checkpoint's weights


@pytest.mark.parametrize("overrides", [["defense=gaussian"], ["model.hidden=[9]"]])
def test_checkpoint_of_another_defense_or_model_is_refused(tmp_path, uninterrupted, overrides):
    out, _ = uninterrupted
    base = [o for o in RUN if not o.startswith("defense")]
    if "defense" not in overrides[0]:
        base += ["defense=dpsgd"]
    cfg = compose_config([*base, *overrides, f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}"], tmp_path)
    what = "defense=dpsgd, this run has defense=gaussian" if "defense" in overrides[0] else "another model (shape"
    with pytest.raises(CheckpointError, match=what.replace("(", r"\(")):
        train.run(cfg)


# -- safe loading ---------------------------------------------------------------------------------------------
class Payload:
    """A pickled object whose unpickling would run code (``__reduce__``)."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.fixture
def good_checkpoint(uninterrupted) -> Path:
    return uninterrupted[0] / "checkpoints" / "last.ckpt"


def test_checkpoints_load_with_weights_only(good_checkpoint):
    state = torch.load(good_checkpoint, weights_only=True)  # what SafeCheckpointIO does: no allow-list needed
    assert state["state_dict"] and "epoch" in state


@pytest.mark.parametrize(("make", "message"), [
    (lambda p, good: p.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2]), "is truncated or corrupted"),
    (lambda p, good: p.write_bytes(b""), "is empty (0 bytes)"),
    (lambda p, good: p.write_bytes(os.urandom(4096)), "cannot be read as a PyTorch checkpoint"),
    (lambda p, good: torch.save({"state_dict": {}, "pytorch-lightning_version": "2", "x": Payload()}, p),
     "refusing to load checkpoint"),
    (lambda p, good: torch.save({"weight": torch.zeros(2)}, p), "is not a Lightning checkpoint of a pl_i2f run"),
    (lambda p, good: torch.save(torch.nn.Linear(2, 2), p), "refusing to load checkpoint"),
])
def test_unusable_checkpoints_give_one_line(tmp_path, good_checkpoint, make, message):
    path = tmp_path / "bad.ckpt"
    make(path, good_checkpoint)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError):  # the trainer's loader is the same function
        SafeCheckpointIO().load_checkpoint(path)


def test_unsafe_checkpoint_is_refused_by_the_cli_with_exit_2(tmp_path, monkeypatch, capsys):
    from test_bad_input import _cli_in_process

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2", "x": Payload()}, bad)
    code, err = _cli_in_process(tmp_path, [f"ckpt_path={bad}"], monkeypatch, capsys)
    assert code == 2 and "refusing to load checkpoint" in err and "Traceback" not in err


def test_atomic_save_keeps_the_old_file_when_saving_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):  # noqa: B017 - any pickling failure
        SafeCheckpointIO().save_checkpoint({"a": lambda: None}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
