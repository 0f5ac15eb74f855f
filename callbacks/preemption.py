"""PreemptionCheckpoint: on SIGINT, SIGTERM or SIGUSR1 finish the step, write a resumable checkpoint, exit 75."""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from pl_i2f.checkpoint import SafeCheckpointIO
from pl_i2f.errors import ConfigError
from pl_i2f.preemption import (
    CHECKPOINT_NAME,
    EXIT_PREEMPTED,
    SIGNALS,
    Interruptions,
    position_loader,
    requeue_command,
    signal_numbers,
)


class Preempted(SIGTERMException):
    """Raised after the step in which a preemption signal arrived; Lightning's own ``SIGTERMException`` (a
    ``SystemExit``), so callbacks that checkpoint on it (``OnExceptionCheckpoint``) see it too."""


class PreemptionCheckpoint(Checkpoint):
    """Stop cleanly on a signal and leave a checkpoint that resumes bitwise.

    **When.** The signal handler only records the signal. After the optimizer step in progress (the end of
    ``on_train_batch_end``; at the last batch of an epoch, after that epoch's validation and end-of-epoch
    hooks) training stops; under DDP the ranks agree at every step (any rank's signal stops all of them at the
    same step). SIGTERM is also read from Lightning's own handler (``trainer.received_sigterm``), and a
    ``SIGTERMException`` Lightning raises itself (a signal during validation) is checkpointed the same way. A
    second Ctrl-C stops at once, without a checkpoint. A signal after the last step lets the run finish.

    **What.** ``<dirpath>/last.ckpt`` (the file the per-epoch checkpoint also writes, so one path resumes
    either), written once, by rank 0, atomically through the trainer's checkpoint IO (``train.py``'s
    ``SafeCheckpointIO``): weights, optimizer, defense with its noise generator and accountant, loop position
    (epoch and batch), callbacks' states. On resume the training loader is put at the same batch of the same
    epoch (:func:`pl_i2f.preemption.position_loader`). Then the process exits with
    :data:`pl_i2f.preemption.EXIT_PREEMPTED` (75).

    **SLURM.** Installed before Lightning registers its handlers, so with ``SLURMEnvironment(auto_requeue=True)``
    Lightning leaves SIGUSR1 (``--signal=USR1@90``) to this callback instead of writing its ``hpc_ckpt`` from
    inside the signal handler (mid-step). After the checkpoint, rank 0 requeues the job (``scontrol requeue``,
    as Lightning does) when ``requeue`` and the signal was SIGUSR1; the requeued job resumes from ``last.ckpt``
    (``train.py``, :func:`pl_i2f.preemption.requeued_checkpoint`).
    """

    def __init__(self, dirpath: str | None = None, signals: list[str] | tuple[str, ...] = SIGNALS,
                 requeue: bool = True) -> None:
        super().__init__()
        try:
            self.signals = signal_numbers(signals)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.dirpath = dirpath
        self.requeue = bool(requeue)
        self.interruptions = Interruptions()
        self.received: str | None = None  # the first signal's name, set by the handler
        self._previous: dict[signal.Signals, Any] = {}
        self._saved = False
        self._resuming = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key()  # one per trainer; a resumed run may write elsewhere

    # -- signal handlers --------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":  # Ctrl-C twice: the user wants out now
            self._restore_handlers()
            raise KeyboardInterrupt
        if self.received is None:
            self.received = name

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCheckpoint: not in the main thread, signals are left to their handlers")
            return
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # -- hooks ------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.received, self._saved = None, False
            self._install_handlers()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._resuming = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._resuming:
            return
        self._resuming = False
        self.interruptions.resume(trainer.global_step, trainer.current_epoch)
        loop = trainer.fit_loop
        batches = loop.epoch_loop.batch_progress.current.processed if loop.restarted_mid_epoch else 0
        if batches >= trainer.num_training_batches:  # stopped after the epoch's last batch (in its validation):
            batches = 0  # the restored epoch fetches nothing, the next pass is a whole epoch
        loaders = trainer.train_dataloader
        loaders = list(loaders.values()) if isinstance(loaders, dict) else (
            list(loaders) if isinstance(loaders, list | tuple) else [loaders])
        positioned = [position_loader(dl, loop.epoch_progress.current.processed, batches) for dl in loaders]
        if batches and not all(positioned):
            rank_zero_warn("PreemptionCheckpoint: the training loader has no sampler that can skip batches; the "
                           "resumed epoch starts its data order again")
        rank_zero_info(f"PreemptionCheckpoint: resumed at step {trainer.global_step} (epoch {trainer.current_epoch}"
                       f"{f', after batch {batches}' if batches else ''})")

    def _stop_requested(self, trainer: pl.Trainer) -> bool:
        # every rank takes part at every step, so all of them stop after the same one
        local = self.received is not None or trainer.received_sigterm
        return trainer.strategy.reduce_boolean_decision(local, all=False)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        last_step = 0 < trainer.max_steps <= trainer.global_step
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or last_step:
            return  # the epoch's validation and end-of-epoch hooks first: on_train_epoch_end decides
        if self._stop_requested(trainer):
            raise Preempted(EXIT_PREEMPTED)

    @staticmethod
    def _training_done(trainer: pl.Trainer) -> bool:
        # (fit_loop.done would also do: it marks the epoch completed early and logs "max_epochs reached")
        max_epochs = trainer.fit_loop.max_epochs
        epochs_done = max_epochs is not None and max_epochs >= 0 and (
            trainer.fit_loop.epoch_progress.current.processed >= max_epochs)
        return epochs_done or 0 < trainer.max_steps <= trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._training_done(trainer):
            if self.received is not None:
                rank_zero_info(f"PreemptionCheckpoint: {self.received} after the last step: finishing the run")
            return
        if self._stop_requested(trainer):
            raise Preempted(EXIT_PREEMPTED)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and not self._saved:
                self._checkpoint(trainer, self.received or "SIGTERM")
                exception.code = EXIT_PREEMPTED
        finally:
            self._restore_handlers()

    # -- the checkpoint -------------------------------------------------------------------------------
    def path(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints") / CHECKPOINT_NAME

    def _checkpoint(self, trainer: pl.Trainer, signal_name: str) -> None:
        self.interruptions.interrupt(trainer.global_step, trainer.current_epoch, signal_name)
        path = self.path(trainer)
        if not isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO):
            rank_zero_warn("PreemptionCheckpoint: the trainer's checkpoint IO is not pl_i2f's SafeCheckpointIO; "
                           "the checkpoint is written by it, not atomically")
        trainer.save_checkpoint(path)  # rank 0 writes, every rank waits for it
        self._saved = True
        batch = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        rank_zero_info(f"PreemptionCheckpoint: {signal_name} received; stopped after step {trainer.global_step} "
                       f"(epoch {trainer.current_epoch}, batch {batch}); checkpoint {path}; resume with "
                       f"ckpt_path={path}; exit code {EXIT_PREEMPTED}")
        if signal_name == "SIGUSR1" and self.requeue and trainer.is_global_zero:
            self._requeue()

    @staticmethod
    def _requeue() -> None:
        command = requeue_command()
        if command is None:
            return
        try:
            result = subprocess.call(command)
        except FileNotFoundError:  # scontrol only on the shell's PATH (what Lightning falls back to as well)
            result = subprocess.call(" ".join(command), shell=True)
        if result == 0:
            rank_zero_info(f"PreemptionCheckpoint: requeued SLURM job {command[-1]}")
        else:
            rank_zero_warn(f"PreemptionCheckpoint: requeuing SLURM job {command[-1]} failed (exit code {result})")

    # -- checkpointing ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"interruptions": self.interruptions.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.interruptions.load_state_dict(state_dict.get("interruptions", {}))
