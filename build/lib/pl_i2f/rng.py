"""Explicit random draws for analysis code: a caller's ``torch.Generator`` or a fixed-seed one, never the
global RNG. Shared by the I²F engine and the defenses' noise samplers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_SEED = 0


def analysis_generator(generator: torch.Generator | None, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator an analysis call draws from: the caller's, or a fresh one seeded ``DEFAULT_SEED`` on
    ``device`` (so results are reproducible and the global RNG is untouched)."""
    if generator is not None:
        return generator
    return torch.Generator(device=device).manual_seed(DEFAULT_SEED)


def randn(shape: int | Sequence[int], generator: torch.Generator, like: Tensor) -> Tensor:
    """Standard normals of ``shape`` drawn from ``generator`` (on its device), in ``like``'s dtype and device."""
    size = (shape,) if isinstance(shape, int) else tuple(shape)
    return torch.randn(size, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def rademacher(shape: Sequence[int], generator: torch.Generator, like: Tensor) -> Tensor:
    """Independent ±1 entries of ``shape`` drawn from ``generator``, in ``like``'s dtype and device."""
    r = torch.randint(0, 2, tuple(shape), generator=generator, device=generator.device)
    return (2 * r - 1).to(device=like.device, dtype=like.dtype)
