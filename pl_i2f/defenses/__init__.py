"""Defenses: what the released gradient is. ``build(name, **params)`` is the entry point."""

from __future__ import annotations

from typing import Any

from pl_i2f.defenses.base import Defense, NoiseSampler
from pl_i2f.errors import ConfigError, unknown_name

DEFENSES: dict[str, type[Defense]] = {"none": Defense}


def build(name: str, **params: Any) -> Defense:
    """Build a registered defense by name with its parameters."""
    if name not in DEFENSES:
        raise unknown_name("defense", name, DEFENSES)
    try:
        return DEFENSES[name](**params)
    except TypeError as exc:
        raise ConfigError(f"defense {name!r} got bad options {sorted(params)}: {exc}") from None


__all__ = ["DEFENSES", "Defense", "NoiseSampler", "build"]
