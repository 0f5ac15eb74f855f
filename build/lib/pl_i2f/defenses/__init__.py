"""Defenses: what the released gradient is. ``build(name, **params)`` is the entry point.

=============== ====================================================================================
``none``        the clean averaged gradient
``gaussian``    optional clipping of the averaged gradient + N(0, σ_t² I)                (not DP)
``anisotropic`` same energy as ``gaussian``, shaped by a public reference batch's J spectrum (not DP)
``pruning``     gradient magnitude pruning (global or per layer)
``dpsgd``       Opacus DP-SGD: per-sample clipping + N(0, σ_t² C²) on the sum, ε accounted (rdp/prv)
=============== ====================================================================================

Every defense exposes ``release(model, x, y, step=0, generator=None)`` (the flat θ-vector an attacker
observes) and ``noise_sampler(step)`` (``None`` or ``sampler(generator) -> δ``); see
:class:`pl_i2f.defenses.base.Defense`.
"""

from __future__ import annotations

from typing import Any

from pl_i2f.defenses.anisotropic import AnisotropicDefense, AnisotropicNoise
from pl_i2f.defenses.base import Defense, NoiseSampler, analysis_model, has_opacus_hooks
from pl_i2f.defenses.dpsgd import DPSGDDefense
from pl_i2f.defenses.gaussian import GaussianDefense
from pl_i2f.defenses.pruning import PruningDefense
from pl_i2f.defenses.schedules import SCHEDULES, NoiseSchedule
from pl_i2f.errors import check_options, unknown_name

DEFENSES: dict[str, type[Defense]] = {
    "none": Defense,
    "gaussian": GaussianDefense,
    "anisotropic": AnisotropicDefense,
    "pruning": PruningDefense,
    "dpsgd": DPSGDDefense,
}


def build(name: str, **params: Any) -> Defense:
    """Build a registered defense by name with its parameters (a Hydra ``conf/defense`` node's contents)."""
    if name not in DEFENSES:
        raise unknown_name("defense", name, DEFENSES)
    check_options(DEFENSES[name], params, f"defense {name!r}")
    return DEFENSES[name](**params)


__all__ = [
    "DEFENSES",
    "SCHEDULES",
    "AnisotropicDefense",
    "AnisotropicNoise",
    "DPSGDDefense",
    "Defense",
    "GaussianDefense",
    "NoiseSampler",
    "NoiseSchedule",
    "PruningDefense",
    "analysis_model",
    "build",
    "has_opacus_hooks",
]
