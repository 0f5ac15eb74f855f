"""Small helpers shared by the callbacks: finding the W&B run, logging media on the step axis, a W&B logger
without the deprecated ``anonymous`` setting, and quieting third-party notices that are not the user's concern."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger
from pytorch_lightning.utilities import rank_zero_only
from torch import Tensor

from pl_i2f.module import log_at_step


def wandb_run(trainer: pl.Trainer) -> Any | None:
    """The W&B run of the trainer's ``WandbLogger``, or ``None`` when W&B is not logging."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    return None


def wandb_image(image: Tensor, caption: str | None = None) -> Any:
    """A ``wandb.Image`` of a C×H×W image with pixels in [0, 1]. (``wandb.Image`` casts a float tensor straight
    to uint8, so [0, 1] pixels would all become 0: a black image.)"""
    import wandb

    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    array = pixels.squeeze(-1).numpy() if pixels.shape[-1] == 1 else pixels.numpy()
    return wandb.Image(array, caption=caption)


@rank_zero_only
def log_media(trainer: pl.Trainer, payload: dict[str, Any], step: int | None = None) -> None:
    """Log W&B media/tables on the same step axis as scalars (``trainer/global_step``; default: now)."""
    run = wandb_run(trainer)
    if run is not None and payload:
        run.log({**payload, "trainer/global_step": trainer.global_step if step is None else step})


def log_scalars(pl_module: pl.LightningModule, scalars: dict[str, float], prefix: str) -> None:
    """Epoch-level scalars through ``pl_module.log`` (rank zero only; no collectives), for epoch-end hooks."""
    pl_module.log_dict(
        {f"{prefix}/{k}": float(v) for k, v in scalars.items()},
        on_step=False, on_epoch=True, rank_zero_only=True, sync_dist=False,
    )


def log_scalars_at_step(trainer: pl.Trainer, scalars: dict[str, float], prefix: str, step: int | None = None,
                        media: dict[str, Any] | None = None) -> None:
    """Scalars of a sparse, step-scheduled event (every N steps, step 0 included), filed at exactly that step
    (default: now; see :func:`pl_i2f.module.log_at_step` for why not ``pl_module.log``), with W&B ``media``
    (full keys) in the same W&B record."""
    log_at_step(trainer, {f"{prefix}/{k}": float(v) for k, v in scalars.items()}, step, media=media)


def warn_once(caught: list[warnings.WarningMessage], category: type[Warning], seen: set[str], who: str) -> None:
    """Pass caught warnings on, those of ``category`` (the engine's, e.g. an ill-conditioned J falling back to
    the damped estimate) each kind once per run (``seen``): the same fallback at every evaluation would bury
    the log."""
    from pytorch_lightning.utilities import rank_zero_warn

    for record in caught:
        if not issubclass(record.category, category):
            warnings.warn_explicit(record.message, record.category, record.filename, record.lineno)
            continue
        kind = f"{record.category.__name__}:{record.filename}:{record.lineno}"
        if kind not in seen:
            seen.add(kind)
            rank_zero_warn(f"{who}: {record.message} (warnings of this kind are shown once per run)",
                           category=record.category)


def leakage_media(report: Any, probes: Tensor, index: Tensor, tables: bool, to_pixels: Any) -> dict[str, Any]:
    """The per-sample leakage media of a :class:`pl_i2f.leakage.LeakageReport` on the probe samples
    ``probes[index]`` (``to_pixels`` maps model inputs to [0, 1] images), as W&B objects by key: a histogram of
    the per-sample errors (of two probes or more: one value has no distribution, and its scalar is logged anyway),
    and with ``tables`` (files: first and last evaluation only) the per-class table and bar chart and the worst
    samples' images."""
    import wandb

    values = report.pixel_rmse.detach().cpu().double().numpy()
    payload: dict[str, Any] = {"leakage/per_sample_histogram": wandb.Histogram(values)} if len(values) > 1 else {}
    if tables:
        per_class = wandb.Table(columns=["class", "expected_pixel_rmse"],
                                data=[[c, v] for c, v in sorted(report.per_class.items())])
        worst = index[[i for i, _ in report.worst]]
        images = to_pixels(probes[worst].cpu()) if len(worst) else []
        payload.update({
            "leakage/per_class": per_class,
            "leakage/per_class_bar": wandb.plot.bar(per_class, "class", "expected_pixel_rmse",
                                                    title="expected reconstruction RMSE per class"),
            "leakage/worst_samples": [
                wandb_image(img, caption=f"probe (class {int(report.labels[i])}): rmse {v:.3g}")
                for img, (i, v) in zip(images, report.worst)
            ],
        })
    return payload


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` minus the ``anonymous=None`` it always passes to ``wandb.init``: wandb >= 0.19
    warns on every run that the setting "has no effect" even when nobody set it."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


_ADVERT = _DropMessages("💡 Tip: For seamless cloud")  # Lightning's LitLogger / LitModels advertisements


def quiet_known_warnings() -> None:
    """Silence, each by its exact message and origin, the notices every run printed that say nothing about the
    user's run: Lightning's advertisements for LitLogger and LitModels, Lightning's use of torch's deprecated
    ``LeafSpec`` and the ``torch.jit.script`` deprecation that importing torch's forward-mode decompositions
    (the first ``jvp`` of the I²F engine) triggers. Safe to call again (pytest resets warning filters)."""
    from lightning_utilities.core import rank_zero

    if _ADVERT not in rank_zero.log.filters:
        rank_zero.log.addFilter(_ADVERT)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"pytorch_lightning\.utilities\._pytree")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        import torch._decomp.decompositions_for_jvp  # noqa: F401  (scripts a few functions at import)
