"""AttackAudit: an occasional real gradient-inversion attack on what the defense releases."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.model_helpers import is_overridden

from pl_i2f.attacks import MAP_PRESET, attack_config, invert, map_attack
from pl_i2f.calibrated import exact_posteriors, psnr
from pl_i2f.errors import ConfigError, check_options
from pl_i2f.leakage import EXACT_MAX_DIM
from pl_i2f.metrics import PSNR_CAP, per_image_metrics
from pl_i2f.report import format_number
from pl_i2f.sources import (
    NoiseSource,
    ProbeSpec,
    SourceOptions,
    Sources,
    analysis_network,
    gaussian_prior,
)
from pl_i2f.studies.stats import spearman
from pl_i2f.threat import SampleNoise

from ._logging import log_media, log_scalars, wandb_image, wandb_run


def pooled_psnr(mse: torch.Tensor) -> float:
    """20·log10(1/RMSE) of the mean of per-sample [0, 1]-pixel MSEs, capped at :data:`PSNR_CAP` (an exact
    reconstruction)."""
    mean = float(mse.double().mean())
    return PSNR_CAP if mean <= 0 else min(float(psnr(math.sqrt(mean))), PSNR_CAP)


class AttackAudit(Callback):
    """Every ``every_n_epochs`` epochs (after validation) — and after the last epoch when ``at_end``, so that
    a run shorter than ``every_n_epochs`` is audited too — attack the **released** gradient of each of
    ``n_samples`` probe samples with the configured attack, and compare with the headline leakage estimate for
    the same samples.

    What the attacker sees is the shared threat model (:mod:`pl_i2f.threat`): one sample's own gradient plus the
    noise the run's defense puts on it — DP-SGD clip_C(gᵢ) + N(0, σ²C²I), Gaussian noise σ on the mean of B
    gᵢ + N(0, B²σ²I), anisotropic noise with its own covariance — drawn from the audit's seeded generator. A
    defense without noise (``none``, ``pruning``) releases its own transform of the sample's gradient.

    The default attack is the prior-aware MAP attack (preset ``map``, :func:`pl_i2f.attacks.map_attack`): the
    same Gaussian prior as the estimate (the datamodule's data prior — full covariance where the input is small
    enough — or the callback's ``prior``), the same noise, started from the data mean. It is the attacker the
    headline models, so the gap below measures the estimate, not a weak optimiser. DLG and Inverting Gradients
    (``attack=dlg``, ``attack=inverting_gradients``) start from random noise and know no prior.

    Without a validation loop (a module with no ``validation_step``) the audit runs after training epochs instead.

    One audit takes at most ``max_seconds`` (null: no limit), split evenly over the samples; an attack that
    runs out of its share stops with what it has (counted in ``audit/out_of_time``). Progress reaches the
    console (and ``train.log``) every ``progress_seconds``.

    Logs, as means over the audited samples (PSNRs pooled: 20·log10(1/RMSE) of the mean per-sample MSE on
    [0, 1] pixels, so ``audit/psnr`` and ``audit/rmse`` agree):

    * ``audit/psnr``, ``audit/rmse``, ``audit/ssim`` — the attack's reconstruction against the original;
    * ``audit/predicted_psnr``, ``audit/predicted_pixel_rmse`` — the headline for the same samples
      (:func:`pl_i2f.calibrated.exact_posteriors`, the code the leakage monitor runs), and ``audit/prior_psnr``
      (guessing the data mean) — for inputs of at most :data:`pl_i2f.leakage.EXACT_MAX_DIM` values; beyond, the
      audit logs the attack only and the monitor's (sketched) headline is the prediction to compare with. The
      attack's MSE is that of the displayed [0, 1]-clamped reconstruction, the prediction's unclamped;
    * ``audit/gap_db`` — predicted − attack PSNR: > 0 the attack did worse than the Gaussian-prior attacker is
      expected to, < 0 better. Logged, with ``audit/predicted_psnr``, only under noise: without it a sample the
      gradient determines has predicted error 0 (PSNR ∞), so ``audit/determined_fraction`` (the share of such
      samples) is logged instead and only the attack's own PSNR is meaningful;
    * ``audit/converged``, ``audit/failed``, ``audit/out_of_time`` — how many attacks converged (the optimiser
      met its tolerances before its budget), diverged, or ran out of time; ``audit/noise_std`` the noise on one
      sample's gradient; ``audit/seconds``;
    * ``audit/rank_correlation`` — Spearman ρ between the predicted and the attack's per-sample MSE over every
      noisy sample audited so far: does the estimate rank the samples' vulnerability as the real attack does
      (1: same order, 0: unrelated)? Logged only under noise (without it the predicted errors are 0 or ties)
      and from :attr:`MIN_RANK_PAIRS` samples on (fewer samples take so few values that ρ says nothing).

    With W&B an image grid (originals above reconstructions), a per-sample table (step, sample, label, attack
    and predicted PSNR, gap, converged) and a predicted-vs-attack PSNR scatter plot.

    ``attack`` is a preset name or a mapping ``{preset: ..., <overrides>}`` (the ``conf/attack`` group);
    ``threat_model`` decides whether the attacker gets the labels and BatchNorm statistics.

    Works with any LightningModule and data, as :class:`callbacks.leakage.I2FMonitor` does (the same ``probe``,
    ``loss_fn``, ``noise_std``/``noise_multiplier``/``max_grad_norm``, ``pixel_std`` and ``prior`` arguments;
    :mod:`pl_i2f.sources`): the attacked samples are the first ``n_samples`` probes.
    """

    MIN_RANK_PAIRS = 5  #: fewer noisy samples than this: no rank correlation (n=3 takes 4 values)

    def __init__(
        self,
        every_n_epochs: int = 5,
        attack: str | Mapping[str, Any] = MAP_PRESET,
        n_samples: int = 4,
        threat_model: Mapping[str, Any] | None = None,
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
        self.preset = str(spec.pop("preset", MAP_PRESET))
        self.overrides = spec
        self.every_n_epochs = every_n_epochs
        self.n_samples = n_samples
        self.threat_model = dict(threat_model or {"labels_known": True, "bn_statistics_known": False})
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
        if self.preset == MAP_PRESET:
            x = self._sources.probe[0]
            check_options(map_attack, {"prior": None, "noise": None, **self.overrides}, "attack preset 'map'",
                          None, None, None, tuple(x.shape[1:]))
            self.iterations = int(self.overrides.get("iterations", 50))
            return
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
        source = self.options.noise(trainer, pl_module)
        step, epoch = trainer.global_step, trainer.current_epoch
        model = analysis_network(pl_module)
        x, y = (t[: self.n_samples].to(pl_module.device) for t in self._sources.probe)
        noise = source.sample_noise(step, model)
        prior = gaussian_prior(self._sources.prior, x[0].numel())  # the monitor's prior
        lo, hi = pixels.bounds()
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed + step)
        n = len(y)
        budget = f", {self.max_seconds:g}s budget" if self.max_seconds else ""
        rank_zero_info(f"AttackAudit: attacking {n} probe samples at step {step} ({self.preset}{budget})")
        recons, failed, out_of_time, converged = [], 0, 0, []
        for i in range(n):
            released = self._release(source, noise, model, x[i : i + 1], y[i : i + 1], step, generator)
            labels = y[i : i + 1] if self.threat_model.get("labels_known", True) else None
            if self.preset == MAP_PRESET:
                options = {"prior": prior, "noise": noise, "loss_fn": self._sources.loss, **self.overrides}
            else:
                options = {"bounds": (lo.to(x), hi.to(x)), "seed": self.seed + i, **self.overrides}
            options["progress_callback"] = self._progress(i, n, start)
            seconds = self._seconds_for_sample(time.perf_counter() - start, i, n, options.get("max_seconds"))
            if seconds is not None:
                options["max_seconds"] = seconds
            result = invert(model, released, labels, tuple(x.shape[1:]), preset=self.preset, **options)
            recons.append(result.x.to(x))
            failed += int(result.failed)
            out_of_time += int(result.stop_reason == "budget_time")
            converged.append(bool(result.converged))
            rank_zero_info(f"AttackAudit: sample {i + 1}/{n} done in {result.seconds:.1f}s, {result.iterations} "
                           f"iterations ({result.stop_reason})")
        recon = torch.cat(recons)
        # batch size 1 per attack: each reconstruction belongs to its own sample, no matching needed
        per = per_image_metrics(recon, x, denormalize=pixels.to_pixels, matched=False)
        attack_mse = per["mse"]
        attack_psnr = pooled_psnr(attack_mse)
        scalars = {
            "psnr": attack_psnr,
            "rmse": float(attack_mse.mean().sqrt()),
            "ssim": float(per["ssim"].mean()),
            "converged": float(sum(converged)),
            "failed": float(failed),
            "out_of_time": float(out_of_time),
            "noise_std": float(noise.std),
        }
        spectrum = None
        if x[0].numel() <= EXACT_MAX_DIM:  # beyond, only the monitor's sketch predicts (too slow per audit here)
            spectrum = exact_posteriors(model, x, y, noise, prior, value_scale=pixels.value_scale(x.shape[1:]),
                                        loss_fn=self._sources.loss)
            predicted_mse = spectrum.mse().to(attack_mse)
            predicted_psnr = pooled_psnr(predicted_mse)
            scalars["predicted_pixel_rmse"] = float(predicted_mse.mean().sqrt())
            scalars["prior_psnr"] = spectrum.prior_psnr()
            if noise.is_zero:  # to first order the gradient pins each determined sample down: error 0, PSNR ∞
                scalars["determined_fraction"] = spectrum.determined_fraction()
            else:
                scalars["predicted_psnr"] = predicted_psnr
                scalars["gap_db"] = predicted_psnr - attack_psnr
        for i in range(n):
            pair = {"epoch": epoch, "step": step, "sample": i, "label": int(y[i]),
                    "attack_psnr": pooled_psnr(attack_mse[i : i + 1]), "attack_mse": float(attack_mse[i]),
                    "converged": converged[i], "noise_std": float(noise.std), "noisy": not noise.is_zero}
            if spectrum is not None:
                pair["predicted_mse"] = float(predicted_mse[i])
                if not noise.is_zero:  # without noise the prediction is exact recovery: no finite PSNR, no gap
                    pair["predicted_psnr"] = pooled_psnr(predicted_mse[i : i + 1])
                    pair["gap_db"] = pair["predicted_psnr"] - pair["attack_psnr"]
            self.pairs.append(pair)
        scalars["seconds"] = time.perf_counter() - start
        ranked = [p for p in self.pairs if p.get("noisy") and "predicted_mse" in p]
        if len(ranked) >= self.MIN_RANK_PAIRS:
            scalars["rank_correlation"] = spearman([p["predicted_mse"] for p in ranked],
                                                   [p["attack_mse"] for p in ranked])
        log_scalars(pl_module, scalars, "audit")
        self._log_media(trainer, pixels.to_pixels(x.cpu()), pixels.to_pixels(recon.cpu()))
        self.audits += 1
        self.last_epoch = epoch
        return scalars

    @staticmethod
    def _release(source: NoiseSource, noise: SampleNoise, model: torch.nn.Module, x: torch.Tensor,
                 y: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
        """One sample's released gradient under the shared threat model: clipped (DP-SGD) plus the noise on the
        sample's own gradient; without noise or clipping the defense's own transform (pruning)."""
        if noise.is_zero and noise.clip_norm is None:
            return source.release(model, x, y, step=step, generator=generator)
        return NoiseSource(noise).release(model, x, y, step=step, generator=generator)

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
        columns = ["step", "sample", "label", "attack_psnr", "predicted_psnr", "gap_db", "converged"]
        rows = [[p.get(c) for c in columns] for p in self.pairs]
        media = {
            "audit/reconstructions": wandb_image(grid, caption="top: originals, bottom: reconstructions"),
            "audit/samples": wandb.Table(columns=columns, data=rows),
        }
        compared = [row for row in rows if row[columns.index("predicted_psnr")] is not None]
        if compared:
            media["audit/calibration"] = wandb.plot.scatter(
                wandb.Table(columns=columns, data=compared), "predicted_psnr", "attack_psnr",
                title="predicted vs attack PSNR (dB, [0, 1] pixels)")
        log_media(trainer, media)

    def state_dict(self) -> dict[str, Any]:
        return {"pairs": list(self.pairs), "audits": self.audits, "last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pairs = list(state_dict["pairs"])
        self.audits = state_dict["audits"]
        self.last_epoch = state_dict.get("last_epoch", -1)
