"""User-facing errors: one clear line each, printed without a traceback by ``train.py``."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid (unknown name, out-of-range number, impossible combination)."""


class DataUnavailableError(RuntimeError):
    """A dataset's files are absent and could not be downloaded."""


def unknown_name(kind: str, name: str, valid: object) -> ConfigError:
    """The error for a name that is not in a registry, listing the valid names."""
    return ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")
