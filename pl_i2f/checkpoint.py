"""Checkpoints: safe loading (``weights_only=True``), one-line errors for unusable files, atomic saving.

A checkpoint is data the user may have downloaded; unpickling it must not run code. Everything here loads
with ``torch.load(weights_only=True)``: tensors, containers and primitives only (what a pl_i2f checkpoint
holds: weights, optimizer and scheduler states, loop counters, the defense's generator state and Opacus
accountant history, callbacks' states). Anything else is refused with one line naming the file.

:class:`SafeCheckpointIO` is the Lightning ``CheckpointIO`` plugin ``train.py`` gives the trainer: it loads
as above (so ``trainer.fit(ckpt_path=...)`` never unpickles arbitrary objects) and saves atomically (a
temporary file in the same directory, flushed to disk, then renamed over the target), so a run killed while
saving leaves the previous ``last.ckpt`` intact.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins import TorchCheckpointIO
from torch import nn

from pl_i2f.errors import CheckpointError

LIGHTNING_KEYS = ("state_dict", "pytorch-lightning_version")


def _describe_load_failure(path: Path, exc: BaseException) -> str:
    text = str(exc)
    culprit = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if culprit:
        return (f"refusing to load checkpoint {path}: it holds Python objects beyond tensors and plain data "
                f"({culprit.group(1)}); only checkpoints written by pl_i2f/Lightning load safely (weights_only)")
    with open(path, "rb") as f:
        head = f.read(64)
    looks_like_torch = head[:4] in (b"PK\x03\x04", b"\x80\x02\x8a\x0a")  # zip archive / legacy format
    decoded = head.decode(errors="replace")
    body = decoded[:-3] if len(head) == 64 else decoded  # (a character cut at the 64th byte is no evidence)
    # text where every character read is (random bytes whose first line happens to be printable are not)
    textual = "\ufffd" not in body and all(c.isprintable() or c.isspace() for c in body)
    first = decoded.strip().splitlines()[0][:40] if head.strip() else ""
    if not looks_like_torch and first and textual:  # notes, a config, a log …
        return (f"ckpt_path {path} is not a checkpoint (a text file starting {first!r}); give a .ckpt from a "
                "run's checkpoints/ directory")
    if looks_like_torch or isinstance(exc, (EOFError, zipfile.BadZipFile)) or any(
            s in text for s in ("central directory", "unexpected EOF", "Ran out of input")):
        return f"checkpoint {path} is truncated or corrupted ({type(exc).__name__}); use an earlier checkpoint"
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"checkpoint {path} cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {first[:160]})"


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint safely (``weights_only=True``); :class:`CheckpointError` with one line for
    a missing, truncated, corrupted, unsafe or foreign file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"ckpt_path={path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"ckpt_path={path} is a directory; give a .ckpt file (e.g. {path}/last.ckpt)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): truncated or corrupted")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile,
            AttributeError, ImportError, TypeError, KeyError, IndexError) as exc:
        raise CheckpointError(_describe_load_failure(path, exc)) from None
    if not isinstance(checkpoint, Mapping) or not all(k in checkpoint for k in LIGHTNING_KEYS):
        what = f"keys {sorted(map(str, checkpoint))[:5]}" if isinstance(checkpoint, Mapping) else type(
            checkpoint).__name__
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint of a pl_i2f run ({what}); give "
                              "a .ckpt from a run's checkpoints/ directory")
    return dict(checkpoint)


def check_compatible(checkpoint: Mapping[str, Any], model: nn.Module, defense_name: str, path: str = "") -> None:
    """:class:`CheckpointError` when the checkpoint was trained with another network (parameter names or
    shapes differ from ``model``'s; the LightningModule stores them under ``model.``) or another defense."""
    where = f"checkpoint {path}" if path else "checkpoint"
    saved_defense = (checkpoint.get("defense") or {}).get("name", "none")
    if saved_defense != defense_name:
        raise CheckpointError(f"{where} was trained with defense={saved_defense}, this run has "
                              f"defense={defense_name}; resume with the defense it was trained with")
    state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    # parameters only: Opacus' fix_model swaps BatchNorm (with running-stat buffers) for GroupNorm at setup
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    missing = sorted(set(expected) - set(state))
    shapes = [f"{n}: {tuple(state[n].shape)} vs {expected[n]}" for n in expected
              if n in state and tuple(state[n].shape) != expected[n]]
    if missing or shapes:
        detail = f"missing {', '.join(missing[:3])}" if missing else f"shape {shapes[0]}"
        raise CheckpointError(f"{where} was trained with another model ({detail}); resume with the model and "
                              "data options it was trained with")


def completed_epochs(checkpoint: Mapping[str, Any]) -> int:
    """Training epochs finished when the checkpoint was written (an end-of-epoch checkpoint counts its own
    epoch: Lightning marks it processed before ``on_train_epoch_end``, completed only after)."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return int(checkpoint.get("epoch", 0))


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` that loads with :func:`load_checkpoint` and saves atomically."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: str | os.PathLike[str], map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location or "cpu")


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` that never leaves a partial file at ``path`` (temporary file + rename)."""
    SafeCheckpointIO().save_checkpoint(obj, path)


def batches_into_epoch(checkpoint: Mapping[str, Any]) -> int:
    """Training batches of the unfinished epoch done when the checkpoint was written (a mid-epoch checkpoint,
    e.g. on preemption); 0 for an end-of-epoch checkpoint."""
    try:
        loop = checkpoint["loops"]["fit_loop"]
        epoch = loop["epoch_progress"]["current"]
        if epoch["started"] <= epoch["processed"]:
            return 0
        return int(loop["epoch_loop.batch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        return 0


class ResumePlan:
    """What ``ckpt_path`` means for this run: ``path`` (``None``: start fresh), ``completed`` epochs (and
    ``batches`` into the next one, for a mid-epoch checkpoint), and ``finished`` (nothing left to train under
    ``max_epochs``) with a one-line ``message`` saying so."""

    def __init__(self, path: str | None, completed: int = 0, max_epochs: int | None = None, batches: int = 0,
                 step: int | None = None):
        self.path, self.completed, self.max_epochs, self.batches = path, completed, max_epochs, batches
        self.finished = path is not None and max_epochs is not None and max_epochs > 0 and completed >= max_epochs
        self.message = (f"run already finished: {path} completed {completed} of trainer.max_epochs={max_epochs} "
                        "epochs; nothing to train (raise trainer.max_epochs to continue it); testing it")
        if not self.finished:
            where = (f"at step {step} (epoch {completed}, after batch {batches})" if batches
                     else f"after epoch {completed}")
            self.message = f"resuming {path} {where}" if path else ""


def prepare_resume(path: str | os.PathLike[str] | None, model: nn.Module, defense_name: str,
                   max_epochs: int | None) -> ResumePlan:
    """Check ``ckpt_path`` before training: loads safely, matches model and defense, counts finished epochs
    (:class:`CheckpointError` with one line otherwise)."""
    if path is None:
        return ResumePlan(None)
    checkpoint = load_checkpoint(path)
    check_compatible(checkpoint, model, defense_name, str(path))
    return ResumePlan(str(path), completed_epochs(checkpoint), max_epochs, batches_into_epoch(checkpoint),
                      checkpoint.get("global_step"))
