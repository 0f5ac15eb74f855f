"""Reconstruction metrics: how close an attack's images are to the private originals.

Conventions (``DESIGN.md``): images are de-normalised to [0, 1] and clamped before any metric; PSNR is
torchmetrics' with ``data_range=1`` computed **per image, then averaged**; SSIM is torchmetrics'
Gaussian SSIM (σ 1.5, 11x11); ``rmse`` is √(mean squared pixel error) in [0, 1] space. A batch of
reconstructions is first matched to the originals by a Hungarian assignment on per-pair MSE (the
attacker does not know the order), so every metric is invariant to the order of the reconstructions.

Entry point for callbacks::

    metrics = reconstruction_metrics(result.x, x_private, denormalize=datamodule.denormalize)
    # {"mse": …, "rmse": …, "psnr": …, "ssim": …}   (+ "lpips" when asked for and available)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from pl_i2f.errors import ConfigError

#: A perfect reconstruction has infinite PSNR; capping it keeps means and logs finite.
PSNR_CAP = 100.0

Denormalize = Callable[[Tensor], Tensor]


def to_unit_range(
    x: Tensor,
    denormalize: Denormalize | None = None,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Images as (B, C, H, W) in [0, 1]: through ``denormalize``, or ``x * std + mean``, or as they are.

    Always clamped to [0, 1] (the pixel range the metrics assume).
    """
    x = x.detach()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ConfigError(f"images must be (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    if denormalize is not None and (mean is not None or std is not None):
        raise ConfigError("pass either denormalize or mean/std, not both")
    if denormalize is not None:
        x = denormalize(x)
    elif mean is not None or std is not None:
        if mean is None or std is None:
            raise ConfigError("mean and std go together")
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
        x = x * s + m
    return x.float().clamp(0.0, 1.0)


def pairwise_mse(recon: Tensor, original: Tensor) -> Tensor:
    """(B, B) matrix of MSE between reconstruction i and original j (images already in [0, 1])."""
    r = recon.reshape(recon.shape[0], -1)
    o = original.reshape(original.shape[0], -1)
    return torch.cdist(r.double(), o.double()).pow(2) / r.shape[1]


def match(recon: Tensor, original: Tensor) -> Tensor:
    """Hungarian matching: ``perm`` such that ``recon[perm[j]]`` is the reconstruction of ``original[j]``.

    Minimises the summed per-pair MSE (``scipy.optimize.linear_sum_assignment``). Images in [0, 1].
    """
    if recon.shape != original.shape:
        raise ConfigError(f"reconstruction shape {tuple(recon.shape)} differs from original {tuple(original.shape)}")
    cost = pairwise_mse(recon, original).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = torch.empty(len(cols), dtype=torch.long)
    perm[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return perm.to(recon.device)


def _ssim_per_image(recon: Tensor, original: Tensor) -> Tensor:
    # torchmetrics reflect-pads by half its 11x11 window, which needs more than 5 pixels a side
    if min(recon.shape[-2:]) <= 5:
        raise ConfigError(f"SSIM needs images larger than 5x5, got {tuple(recon.shape[-2:])}")
    return structural_similarity_index_measure(recon, original, data_range=1.0, reduction="none")


def _lpips_weights_file(net: str) -> Path | None:
    """Where torchvision keeps the LPIPS backbone's ImageNet weights, if they are there."""
    import torchvision

    enum = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}[net]
    url = getattr(torchvision.models, enum).DEFAULT.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    return path if path.is_file() else None


_LPIPS_NOTED: set[str] = set()


def lpips_per_image(recon: Tensor, original: Tensor, net: str = "alex") -> Tensor | None:
    """LPIPS (torchmetrics) per image for images in [0, 1], or ``None`` with a one-line note when the
    backbone's weights are not in the local torch hub cache (nothing is ever downloaded)."""
    if net not in ("alex", "vgg", "squeeze"):
        raise ConfigError(f"unknown LPIPS net {net!r}; valid: alex, squeeze, vgg")
    try:
        available = _lpips_weights_file(net) is not None
    except Exception:  # no torchvision, or an unknown weights enum: treat as unavailable
        available = False
    if not available:
        if net not in _LPIPS_NOTED:  # one note per process, not one per call
            _LPIPS_NOTED.add(net)
            warnings.warn(f"LPIPS skipped: {net} backbone weights not in {torch.hub.get_dir()}/checkpoints",
                          stacklevel=3)
        return None
    from torchmetrics.functional.image.lpips import learned_perceptual_image_patch_similarity as lpips

    if recon.shape[1] == 1:  # LPIPS backbones take RGB: repeat grey channels
        recon, original = recon.expand(-1, 3, -1, -1), original.expand(-1, 3, -1, -1)
    return torch.stack([
        lpips(r[None], o[None], net_type=net, normalize=True) for r, o in zip(recon, original)
    ]).reshape(-1)


def per_image_metrics(
    recon: Tensor,
    original: Tensor,
    denormalize: Denormalize | None = None,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
    matched: bool = True,
    lpips: bool = False,
    lpips_net: str = "alex",
) -> dict[str, Tensor]:
    """Per-image metrics as (B,) tensors, in the originals' order, plus ``order`` (the matching).

    ``order[j]`` is the index of the reconstruction paired with original ``j`` (identity when
    ``matched=False``). Keys: ``mse``, ``rmse``, ``psnr`` (capped at :data:`PSNR_CAP`), ``ssim``,
    ``order``, and ``lpips`` when requested and available.
    """
    r = to_unit_range(recon, denormalize, mean, std)
    o = to_unit_range(original, denormalize, mean, std).to(r.device)
    if r.shape != o.shape:
        raise ConfigError(f"reconstruction shape {tuple(r.shape)} differs from original {tuple(o.shape)}")
    order = match(r, o) if matched else torch.arange(r.shape[0], device=r.device)
    r = r[order]
    mse = (r - o).pow(2).flatten(1).mean(dim=1)
    psnr = peak_signal_noise_ratio(r, o, data_range=1.0, reduction="none", dim=(1, 2, 3))
    out = {
        "mse": mse,
        "rmse": mse.sqrt(),
        "psnr": psnr.reshape(-1).clamp(max=PSNR_CAP),
        "ssim": _ssim_per_image(r, o).reshape(-1),
        "order": order,
    }
    if lpips:
        value = lpips_per_image(r, o, lpips_net)
        if value is not None:
            out["lpips"] = value
    return out


def reconstruction_metrics(
    recon: Tensor,
    original: Tensor,
    denormalize: Denormalize | None = None,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
    matched: bool = True,
    lpips: bool = False,
    lpips_net: str = "alex",
) -> dict[str, float]:
    """Batch reconstruction metrics as floats: ``mse``, ``rmse``, ``psnr``, ``ssim`` (+ ``lpips``).

    Args:
        recon, original: (B, C, H, W) or (C, H, W), in the model's input space if ``denormalize`` or
            ``mean``/``std`` are given (else already in [0, 1]).
        denormalize: e.g. ``datamodule.denormalize``; or give the per-channel ``mean`` and ``std``.
        matched: Hungarian-match reconstructions to originals first (default; order-invariant).
        lpips: also LPIPS, when the backbone's weights are available locally (else a one-line note).

    ``mse`` is the mean over all pixels of the batch and ``rmse = √mse``; ``psnr`` and ``ssim`` are
    per-image values averaged (PSNR capped at :data:`PSNR_CAP` dB so a perfect match stays finite).
    """
    per = per_image_metrics(recon, original, denormalize, mean, std, matched, lpips, lpips_net)
    mse = float(per["mse"].mean())
    out = {"mse": mse, "rmse": mse**0.5, "psnr": float(per["psnr"].mean()), "ssim": float(per["ssim"].mean())}
    if "lpips" in per:
        out["lpips"] = float(per["lpips"].mean())
    return out
