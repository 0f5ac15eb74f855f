"""The one set of option checks: each raises a one-line :class:`~pl_i2f.errors.ConfigError` naming the option.

Shared by config validation (:mod:`pl_i2f.validation`), the attack's configuration
(:class:`pl_i2f.attacks.AttackConfig`), the autopilot's options and the callbacks' constructors, so that a limit
reads the same wherever it is checked. Torch-free.
"""

from __future__ import annotations

import math
from typing import Any

from pl_i2f.errors import ConfigError, unknown_name


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_int(key: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    """An integer >= ``minimum`` (``None`` allowed when ``optional``)."""
    if value is None and optional:
        return
    if not is_int(value) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}{' or null' if optional else ''}, got {value!r}")


def require_number(key: str, value: Any, *, low: float | None = None, high: float | None = None,
                   low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """A finite number within the given bounds (``None`` allowed when ``optional``)."""
    if value is None and optional:
        return
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    bound_text = " and ".join(bounds)
    if not is_number(value) or not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number {bound_text}{' (or null)' if optional else ''}, "
                          f"got {value!r}".replace("  ", " "))
    if (low is not None and (value < low or (low_open and value == low))) or (
            high is not None and (value > high or (high_open and value == high))):
        raise ConfigError(f"{key} must be {bound_text}, got {value!r}")


def require_name(kind: str, value: Any, valid: tuple[str, ...] | Any, key: str | None = None) -> None:
    """The library's "unknown <kind> '<value>'; valid: …" line, followed by the option's key."""
    if value not in valid:
        raise ConfigError(f"{unknown_name(kind, str(value), valid)}{f' ({key})' if key else ''}")


def require_bool(key: str, value: Any) -> None:
    """``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
