"""Preemption and requeue: the pure parts (no Trainer) of stopping a run on a signal and resuming it exactly.

:class:`callbacks.PreemptionCheckpoint` turns SIGINT, SIGTERM or SIGUSR1 into a clean stop after the current
optimizer step, an atomically written mid-epoch ``last.ckpt`` and the exit code :data:`EXIT_PREEMPTED`. What
it needs from the library:

* :func:`position_loader`: a resumed run's training loader continues at the same epoch *and batch* as the
  interrupted one. Lightning restores its loop counters but restarts a plain ``DataLoader`` at its first
  batch; pl_i2f's samplers (``pl_i2f.data``) draw each epoch's order from ``seed + epoch`` and take a ``skip``
  count, so the batches consumed before the checkpoint are drawn (Poisson draws included) but not loaded.
* :class:`Interruptions`: when a run was interrupted and resumed (for the run summary), checkpointed with it.
* :func:`requeue_command` and :func:`requeued_checkpoint`: a SLURM job that stopped on SIGUSR1 (the
  time-limit warning, ``#SBATCH --signal=USR1@90``) requeues itself, and the requeued job resumes from its
  own ``last.ckpt``.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# EX_TEMPFAIL of sysexits.h ("temporary failure; the user is invited to retry"): the run stopped on a signal
# and wrote a checkpoint to resume from. Distinct from 0 (finished), 1 (error) and 2 (configuration error).
EXIT_PREEMPTED = 75
SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")
CHECKPOINT_NAME = "last.ckpt"


def signal_numbers(names: Iterable[str]) -> list[signal.Signals]:
    """The signals named (``"SIGTERM"`` or ``"TERM"``); ValueError naming the valid ones otherwise."""
    out = []
    for name in names:
        full = name if str(name).startswith("SIG") else f"SIG{name}"
        if full not in SIGNALS:
            raise ValueError(f"preemption signal {name!r} is not one of {', '.join(SIGNALS)}")
        out.append(signal.Signals[full])
    return out


def _samplers(loader: Any) -> list[Any]:
    """The loader's sampler objects that order its data (batch sampler, and the sampler inside it)."""
    found = []
    for obj in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        for candidate in (obj, getattr(obj, "sampler", None)):
            if candidate is not None and all(candidate is not f for f in found):
                found.append(candidate)
    return found


def position_loader(loader: Any, epoch: int, batches: int) -> bool:
    """Make ``loader``'s next pass the one of ``epoch``, starting after its first ``batches`` batches.

    Works for loaders whose order is set by ``set_epoch`` and that leave out ``skip`` items on their next pass
    (pl_i2f's ``EpochShuffleSampler`` counts samples, the batch-drawing ``EpochPoissonSampler`` batches).
    A loader with worker processes has already handed its first indices to them: it is iterated again, which
    restarts a persistent-worker loader's own iterator (the one Lightning holds) with the new position.
    Returns ``False`` (nothing changed) for a loader without such a sampler."""
    samplers = _samplers(loader)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if hasattr(batch_sampler, "skip"):  # draws whole batches itself
        batch_sampler.skip = int(batches)
    elif hasattr(getattr(batch_sampler, "sampler", None), "skip") and getattr(batch_sampler, "batch_size", None):
        batch_sampler.sampler.skip = int(batches) * int(batch_sampler.batch_size)
    else:
        return False
    for sampler in samplers:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(int(epoch))
    if getattr(loader, "num_workers", 0) > 0 and getattr(loader, "persistent_workers", False):
        iter(loader)
    return True


@dataclass
class Interruptions:
    """When a run stopped on a signal (``interrupted``: step, epoch, signal) and when it was resumed from a
    checkpoint (``resumed``: step, epoch); checkpointed with the run, summarised in ``summary.json``."""

    interrupted: list[dict[str, Any]] = field(default_factory=list)
    resumed: list[dict[str, Any]] = field(default_factory=list)

    def interrupt(self, step: int, epoch: int, signal_name: str) -> None:
        self.interrupted.append({"step": int(step), "epoch": int(epoch), "signal": str(signal_name)})

    def resume(self, step: int, epoch: int) -> None:
        self.resumed.append({"step": int(step), "epoch": int(epoch)})

    def summary(self) -> dict[str, Any]:
        """How many times and at which optimizer steps the run was interrupted and resumed."""
        return {
            "times_interrupted": len(self.interrupted),
            "interrupted_at_steps": [e["step"] for e in self.interrupted],
            "signals": [e["signal"] for e in self.interrupted],
            "times_resumed": len(self.resumed),
            "resumed_at_steps": [e["step"] for e in self.resumed],
        }

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.interrupted = [dict(e) for e in state.get("interrupted", [])]
        self.resumed = [dict(e) for e in state.get("resumed", [])]


def slurm_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """This SLURM job's id (``<array job>_<task>`` for an array task), ``None`` outside SLURM."""
    env = os.environ if env is None else env
    array_job = env.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{env.get('SLURM_ARRAY_TASK_ID', '')}" if array_job else env.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9]+(_[0-9]+)?", job) else None


def requeue_command(env: Mapping[str, str] | None = None) -> list[str] | None:
    """``scontrol requeue <job>`` for this SLURM job (what Lightning's ``SLURMEnvironment(auto_requeue=True)``
    runs on its requeue signal), ``None`` outside SLURM."""
    job = slurm_job_id(env)
    return ["scontrol", "requeue", job] if job else None


def requeued_checkpoint(output_dir: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> str | None:
    """The checkpoint a requeued SLURM job resumes from: ``<output_dir>/checkpoints/last.ckpt`` when SLURM says
    the job was restarted (``SLURM_RESTART_COUNT`` > 0) and the file exists; ``None`` otherwise."""
    env = os.environ if env is None else env
    try:
        restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return None
    path = Path(output_dir) / "checkpoints" / CHECKPOINT_NAME
    return str(path) if restarts > 0 and path.is_file() else None


__all__ = [
    "CHECKPOINT_NAME",
    "EXIT_PREEMPTED",
    "SIGNALS",
    "Interruptions",
    "position_loader",
    "requeue_command",
    "requeued_checkpoint",
    "signal_numbers",
    "slurm_job_id",
]
