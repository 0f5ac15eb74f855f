"""User-facing errors: one clear line each, printed without a traceback by ``train.py``."""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid (unknown name, out-of-range number, impossible combination)."""


class CheckpointError(ConfigError):
    """A checkpoint cannot be used: missing, truncated or corrupted, not a checkpoint, unsafe to unpickle,
    or trained with another model or defense."""


class DataUnavailableError(RuntimeError):
    """A dataset's files are absent and could not be downloaded."""


def _named_parameters(fn: Callable[..., Any]) -> set[str]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_options(fn: Callable[..., Any], options: Mapping[str, Any], what: str, *args: Any,
                  forwards_to: Callable[..., Any] | None = None) -> None:
    """A one-line :class:`ConfigError` when ``options`` (after the positional ``args``) do not fit ``fn``'s
    signature (unknown or missing names). Checked before the call, so a TypeError raised *inside* ``fn`` (a
    bug) keeps its traceback instead of being reported as a bad option. ``forwards_to``: where ``fn`` passes
    its ``**kwargs`` (a base class), whose names are then the only other ones accepted."""
    try:
        inspect.signature(fn).bind(*args, **options)
    except TypeError as exc:
        raise ConfigError(f"{what} got bad options {sorted(options)}: {exc}") from None
    if forwards_to is not None:
        accepted = (_named_parameters(fn) | _named_parameters(forwards_to)) - {"self"}
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ConfigError(f"{what} got unknown options {unknown}; valid: {', '.join(sorted(accepted))}")


def unknown_name(kind: str, name: str, valid: object) -> ConfigError:
    """The error for a name that is not in a registry, listing the valid names."""
    return ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(sorted(valid))}")


# Exceptions Hydra and OmegaConf raise for a malformed command line or config (matched by the defining
# package, so this module needs neither installed).
_CONFIG_PACKAGES = ("hydra.", "omegaconf.")


def is_config_exception(exc: BaseException) -> bool:
    """Whether ``exc`` is a user error raised while composing the config (Hydra / OmegaConf), or ours."""
    if isinstance(exc, (ConfigError, DataUnavailableError)):
        return True
    return any(type(e).__module__.startswith(_CONFIG_PACKAGES) for e in (exc, exc.__cause__) if e is not None)


_UNEXPECTED_ARGUMENT = re.compile(r"Error in call to target '([\w.]+)'.*unexpected keyword argument '(\w+)'"
                                  r"(?:.*\nfull_key: ([\w.]+))?", re.S)


def unexpected_argument(text: str, key: str | None = None) -> str | None:
    """Hydra's "Error in call to target …: TypeError(… unexpected keyword argument 'x')" (e.g. from
    ``+trainer.max_epoch=1``) → one line naming the config key, the argument and the closest valid one
    (``key``: the config node's key when the message does not carry Hydra's ``full_key``)."""
    match = _UNEXPECTED_ARGUMENT.search(text)
    if not match:
        return None
    target, name, full_key = match.groups()
    key = full_key or key
    module, _, attr = target.rpartition(".")
    try:
        valid = sorted(_named_parameters(getattr(importlib.import_module(module), attr)) - {"self"})
    except (ImportError, AttributeError, TypeError, ValueError):  # not importable here: no suggestion
        valid = []
    where = f"{key}.{name}" if key else name
    close = difflib.get_close_matches(name, valid, n=1)
    hint = (f"; did you mean {key + '.' if key else ''}{close[0]}?" if close
            else f"; valid: {', '.join(valid)}" if valid else "")
    return f"unknown argument {where}: {attr} takes no argument {name!r}{hint}"


def one_line(exc: BaseException) -> str:
    """A config exception's message on one line: Hydra's "Available options" lists joined with commas,
    OmegaConf's ``full_key``/``object_type`` context and Hydra's stack-trace hint dropped; an unknown argument
    of an instantiated object named with the closest valid one."""
    text = str(exc)
    unexpected = unexpected_argument(text)
    if unexpected:
        return unexpected
    if exc.__cause__ is not None and type(exc.__cause__).__module__.startswith(_CONFIG_PACKAGES):
        text = f"{text}\n{exc.__cause__}"
    lines = [line.strip() for line in text.splitlines()]
    kept: list[str] = []
    options: list[str] = []
    for line in lines:
        if not line or re.match(r"^(full_key|object_type|reference_type|Set the environment variable|Config search "
                                 r"path|provider=)", line):
            continue
        if line.startswith("Available options in"):
            kept.append(line.rstrip(":").lower().replace("available options", "available options"))
            continue
        if kept and kept[-1].startswith("available options") and re.fullmatch(r"[\w./-]+", line):
            options.append(line)
            continue
        if line.startswith("In '") and "':" in line:  # "In 'train': Could not find ..." → drop the prefix
            line = line.split("': ", 1)[-1]
        kept.append(line)
    if options:
        kept = [k + ": " + ", ".join(options) if k.startswith("available options") else k for k in kept]
    message = "; ".join(k.rstrip(".") for k in dict.fromkeys(kept))  # Hydra repeats the cause's text sometimes
    return message or type(exc).__name__
