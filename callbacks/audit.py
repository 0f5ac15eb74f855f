"""AttackAudit: an occasional real gradient-inversion attack on what the defense releases."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.model_helpers import is_overridden

from pl_i2f.attacks import attack_config, invert
from pl_i2f.errors import ConfigError
from pl_i2f.leakage import measure_leakage, undamped_leakage
from pl_i2f.metrics import per_image_metrics
from pl_i2f.report import format_number
from pl_i2f.sources import (
    ProbeSpec,
    SourceOptions,
    Sources,
    analysis_network,
)
from pl_i2f.studies.stats import spearman

from ._logging import log_media, log_scalars, wandb_image, wandb_run


class AttackAudit(Callback):
    """Every ``every_n_epochs`` epochs (after validation) — and after the last epoch when ``at_end``, so that
    a run shorter than ``every_n_epochs`` is audited too — attack the **released** gradient of each of
    ``n_samples`` probe samples (batch size 1, the gradient ``defense.release`` gives at the current step)
    with the configured attack, and compare with the I²F prediction for the same samples.

    Without a validation loop (a module with no ``validation_step``) the audit runs after training epochs instead.

    One audit takes at most ``max_seconds`` (null: no limit), split evenly over the samples; an attack that
    runs out of its share stops with what it has (counted in ``audit/out_of_time``). Progress reaches the
    console (and ``train.log``) every ``progress_seconds``.

    Logs ``audit/rmse``, ``audit/psnr``, ``audit/ssim`` (reconstruction vs original, [0, 1] pixels),
    ``audit/predicted_pixel_rmse`` (I²F, damped as the monitor's), ``audit/rmse_over_predicted`` (attack RMSE /
    prediction, same samples), for inputs of ≤ 1,024 values under isotropic noise also
    ``audit/undamped_pixel_rmse`` and ``audit/rmse_over_undamped`` (the undamped I²F from exact float64
    spectra: the attack-calibrated estimate, :func:`pl_i2f.leakage.undamped_leakage`), ``audit/per_unit_noise``,
    ``audit/failed``, ``audit/out_of_time``, ``audit/seconds`` and ``audit/rank_correlation``: Spearman ρ between
    the predicted and the attack's RMSE over every audited sample so far — does the estimator rank the samples'
    vulnerability as the real attack does (1: same order, 0: unrelated)? Logged from
    :attr:`MIN_RANK_PAIRS` samples on. With W&B an image grid (originals above reconstructions) and a
    predicted-vs-actual scatter plot.

    A defense without noise (``none``, ``pruning``) has predictions per unit σ (σ = 1 stands in;
    ``audit/per_unit_noise`` 1): the attack, which sees no noise, is not on that scale, so neither ratio is logged
    and those samples do not enter the rank correlation (the attack's error is then its optimisation residue,
    which I²F does not model).

    ``attack`` is a preset name or a mapping ``{preset: ..., <invert overrides>}`` (the ``conf/attack`` group);
    ``threat_model`` decides whether the attacker gets the labels and BatchNorm statistics.

    Works with any LightningModule and data, as :class:`callbacks.leakage.I2FMonitor` does (the same ``probe``,
    ``loss_fn``, ``noise_std``/``noise_multiplier``/``max_grad_norm``, ``pixel_std`` and ``prior`` arguments;
    :mod:`pl_i2f.sources`): the attacked samples are the first ``n_samples`` probes; without this package's
    defense the released gradient is the sample's own, clipped to C under Opacus, plus its noise.
    """

    MIN_RANK_PAIRS = 5  #: fewer samples than this: a rank correlation says nothing (n=3 takes 4 values)

    def __init__(
        self,
        every_n_epochs: int = 5,
        attack: str | Mapping[str, Any] = "dlg",
        n_samples: int = 4,
        threat_model: Mapping[str, Any] | None = None,
        damping: float = 0.0,
        relative_damping: float = 0.01,
        seed: int = 0,
        max_seconds: float | None = 120.0,
        at_end: bool = True,
        progress_seconds: float = 10.0,
        probe: ProbeSpec | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        noise_std: float | None = None,
        noise_multiplier: float | None = None,
        max_grad_norm: float | None = None,
        pixel_std: float | None = None,
        prior: Any = None,
    ):
        super().__init__()
        self.options = SourceOptions("AttackAudit", probe, loss_fn, noise_std, noise_multiplier, max_grad_norm,
                                     pixel_std, prior)
        self._sources: Sources | None = None
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ConfigError(f"AttackAudit.every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ConfigError(f"AttackAudit.n_samples must be an integer >= 1, got {n_samples!r}")
        if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
            raise ConfigError(f"AttackAudit.max_seconds must be > 0 or null, got {max_seconds!r}")
        if not (isinstance(progress_seconds, (int, float)) and progress_seconds >= 0):
            raise ConfigError(f"AttackAudit.progress_seconds must be >= 0, got {progress_seconds!r}")
        spec = {"preset": attack} if isinstance(attack, str) else dict(attack)
        self.preset = str(spec.pop("preset", "dlg"))
        self.overrides = spec
        self.every_n_epochs = every_n_epochs
        self.n_samples = n_samples
        self.threat_model = dict(threat_model or {"labels_known": True, "bn_statistics_known": False})
        self.damping = damping
        self.relative_damping = relative_damping
        self.seed = seed
        self.max_seconds = max_seconds
        self.at_end = at_end
        self.progress_seconds = progress_seconds
        self.iterations = 0  # the attack's iteration budget, for progress messages (set in setup)
        self.pairs: list[dict[str, float]] = []
        self.audits = 0
        self.last_epoch = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(preset=self.preset, n_samples=self.n_samples)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._sources = self.options.sources(trainer, pl_module, self.n_samples, self.seed)
        # unknown preset/option or impossible settings: one clear line now, not at the first audit
        config = attack_config(self.preset, **{"bounds": self._sources.pixels.bounds(), **self.overrides})
        if config.bn > 0 and not self.threat_model.get("bn_statistics_known", False):
            raise ConfigError(
                f"attack {self.preset!r} uses the BatchNorm prior but threat_model.bn_statistics_known is false"
            )
        self.iterations = config.iterations * config.restarts

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epochs = trainer.max_epochs
        budget = f"at most {self.max_seconds:g}s per audit" if self.max_seconds else "no time limit"
        when = f"every {self.every_n_epochs} epochs" + (" and after the last one" if self.at_end else "")
        rank_zero_info(f"AttackAudit: {self.preset} on {self.n_samples} probe samples {when} ({budget})")
        if epochs is not None and 0 < epochs < self.every_n_epochs and not self.at_end:
            rank_zero_warn(f"AttackAudit: every_n_epochs={self.every_n_epochs} > trainer.max_epochs={epochs} "
                           "and at_end=false: no audit will run")

    def _due(self, trainer: pl.Trainer, epoch: int) -> bool:
        """On the schedule, or the last epoch when ``at_end`` (so a short run is audited too)."""
        if epoch == self.last_epoch:
            return False
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        return (epoch + 1) % self.every_n_epochs == 0 or (self.at_end and last)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        if self._due(trainer, trainer.current_epoch):
            self.audit(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a module without a validation loop is audited at the end of its training epochs instead
        if is_overridden("validation_step", pl_module) or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if self._due(trainer, trainer.current_epoch):
            self.audit(trainer, pl_module)

    def audit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Attack the probe samples now; log and remember the (predicted, actual) pairs."""
        start = time.perf_counter()
        pixels = self._sources.pixels
        noise = self.options.noise(trainer, pl_module)
        step, epoch = trainer.global_step, trainer.current_epoch
        model = analysis_network(pl_module)
        x, y = (t[: self.n_samples].to(pl_module.device) for t in self._sources.probe)
        lo, hi = pixels.bounds()
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed + step)
        n = len(y)
        budget = f", {self.max_seconds:g}s budget" if self.max_seconds else ""
        rank_zero_info(f"AttackAudit: attacking {n} probe samples at step {step} ({self.preset}{budget})")
        recons, failed, out_of_time = [], 0, 0
        for i in range(n):
            released = noise.release(model, x[i : i + 1], y[i : i + 1], step=step, generator=generator)
            labels = y[i : i + 1] if self.threat_model.get("labels_known", True) else None
            options = {"bounds": (lo.to(x), hi.to(x)), "seed": self.seed + i, **self.overrides,
                       "progress_callback": self._progress(i, n, start)}
            seconds = self._seconds_for_sample(time.perf_counter() - start, i, n, options.get("max_seconds"))
            if seconds is not None:
                options["max_seconds"] = seconds
            result = invert(model, released, labels, tuple(x.shape[1:]), preset=self.preset, **options)
            recons.append(result.x.to(x))
            failed += int(result.failed)
            out_of_time += int(result.stop_reason == "budget_time")
            rank_zero_info(f"AttackAudit: sample {i + 1}/{n} done in {result.seconds:.1f}s, {result.iterations} "
                           f"iterations ({result.stop_reason})")
        recon = torch.cat(recons)
        # batch size 1 per attack: each reconstruction belongs to its own sample, no matching needed
        per = per_image_metrics(recon, x, denormalize=pixels.to_pixels, matched=False)
        report = measure_leakage(
            model, x, y, noise, step, pixel_std=pixels.std, damping=self.damping,
            relative_damping=self.relative_damping, worst_k=0, exact_spectrum_probes=0, generator=generator,
        )
        predicted, per_unit = report.pixel_rmse, report.noise.per_unit
        undamped = undamped_leakage(model, x, y, noise, step, pixel_std=pixels.std)
        actual = per["rmse"]
        for i in range(len(y)):
            self.pairs.append({"epoch": epoch, "step": step, "sample": i, "label": int(y[i]),
                               "predicted_pixel_rmse": float(predicted[i]), "attack_rmse": float(actual[i]),
                               "per_unit_noise": per_unit,
                               **({} if undamped is None else {"undamped_pixel_rmse": float(undamped[i])})})
        scalars = {
            "rmse": float(actual.mean()),
            "psnr": float(per["psnr"].mean()),
            "ssim": float(per["ssim"].mean()),
            "predicted_pixel_rmse": float(predicted.mean()),
            "failed": float(failed),
            "out_of_time": float(out_of_time),
            "per_unit_noise": float(per_unit),
            "seconds": time.perf_counter() - start,
        }
        ranked = [p for p in self.pairs if not p.get("per_unit_noise", False)]
        if len(ranked) >= self.MIN_RANK_PAIRS:
            scalars["rank_correlation"] = spearman([p["predicted_pixel_rmse"] for p in ranked],
                                                   [p["attack_rmse"] for p in ranked])
        if not per_unit and float(predicted.mean()) > 0:  # 1 = the attack did what I²F predicted
            scalars["rmse_over_predicted"] = float(actual.mean()) / float(predicted.mean())
        if undamped is not None:  # the attack-calibrated estimate beside the (damped) monitoring one
            scalars["undamped_pixel_rmse"] = float(undamped.mean())
            if not per_unit and float(undamped.mean()) > 0:
                scalars["rmse_over_undamped"] = float(actual.mean()) / float(undamped.mean())
        log_scalars(pl_module, scalars, "audit")
        self._log_media(trainer, pixels.to_pixels(x.cpu()), pixels.to_pixels(recon.cpu()))
        self.audits += 1
        self.last_epoch = epoch
        return scalars

    def _seconds_for_sample(self, elapsed: float, i: int, n: int, own: float | None) -> float | None:
        """Sample ``i``'s share of what is left of the audit's ``max_seconds`` after ``elapsed`` seconds (and at
        most the attack's own ``max_seconds``): an even split, so a slow sample cannot starve the later ones."""
        if self.max_seconds is None:
            return own
        share = max(self.max_seconds - elapsed, 0.0) / (n - i)
        share = max(share, 1e-3)  # spent: the attack then stops at its first check, with what it has
        return share if own is None else min(own, share)

    def _progress(self, i: int, n: int, start: float) -> Callable[[int, float], bool]:
        """The attack's progress callback: one console line every ``progress_seconds``."""
        last = [time.perf_counter()]

        def report(iteration: int, objective: float) -> bool:
            now = time.perf_counter()
            if now - last[0] >= self.progress_seconds:
                last[0] = now
                rank_zero_info(f"AttackAudit: sample {i + 1}/{n}, iteration {iteration}/{self.iterations}, "
                               f"objective {format_number(objective)}, {now - start:.0f}s into the audit")
            return False

        return report

    def _log_media(self, trainer: pl.Trainer, originals: torch.Tensor, recon: torch.Tensor) -> None:
        if wandb_run(trainer) is None:
            return
        import wandb
        from torchvision.utils import make_grid

        grid = make_grid(torch.cat([originals, recon]), nrow=len(originals), padding=1, pad_value=1.0)
        columns = ["predicted_pixel_rmse", "attack_rmse", "epoch", "label"]
        table = wandb.Table(columns=columns, data=[[p[c] for c in columns] for p in self.pairs])
        log_media(trainer, {
            "audit/reconstructions": wandb_image(grid, caption="top: originals, bottom: reconstructions"),
            "audit/calibration": wandb.plot.scatter(table, "predicted_pixel_rmse", "attack_rmse",
                                                    title="I²F prediction vs attack RMSE"),
        })

    def state_dict(self) -> dict[str, Any]:
        return {"pairs": list(self.pairs), "audits": self.audits, "last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pairs = list(state_dict["pairs"])
        self.audits = state_dict["audits"]
        self.last_epoch = state_dict.get("last_epoch", -1)
