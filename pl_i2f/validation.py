"""Validate a run's configuration before anything heavy happens: one :class:`ConfigError` line naming the option.

:func:`validate_config` takes the plain mapping of a resolved config (``OmegaConf.to_container(cfg,
resolve=True)``; no Hydra or OmegaConf needed here) and checks every option a user may set: types, ranges
(no NaN/inf, no zero or negative sizes, no Lightning "forever"), names, unknown keys of the defense, and
combinations that cannot work (DP-SGD on BatchNorm without the fix, both a noise multiplier and a target ε,
a noise multiplier of 0 — unbounded ε —, a label-requiring attack under a threat model without labels).
It imports nothing heavy (no torch), so ``train.py`` can call it before building anything: a
configuration error then costs a second and leaves nothing behind.

:func:`check_against_data` runs once the datamodule knows its split sizes (probe sizes vs. the validation
split). Removing the run folder of a failed start is :func:`pl_i2f.runs.discard_run_dir`.

Names, defaults and limits come from :mod:`pl_i2f.registry`, the checks from :mod:`pl_i2f.checks` (both
torch-free, shared with the factories and the callbacks).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pl_i2f.checks import is_int as _is_int
from pl_i2f.checks import require_bool, require_int, require_name, require_number
from pl_i2f.errors import ConfigError
from pl_i2f.registry import (
    ACCOUNTANTS,
    ACTIVATIONS,
    AUDIT_INT_OPTIONS,
    BATCHNORM_MODELS,
    DATASETS,
    DEFENSE_OPTIONS,
    INIT_SCHEMES,
    LR_SCHEDULERS,
    MODELS,
    MONITOR_DEFAULTS,
    MONITOR_INT_OPTIONS,
    NOISE_SCHEDULES,
    NOISE_SHAPES,
    NOISY_DEFENSES,
    OPTIMIZERS,
    PRUNING_SCOPES,
    SCHEDULE_UNITS,
)

__all__ = ["check_against_data", "require_bool", "require_int", "require_name", "require_number", "validate_config"]


def _section(cfg: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    node = cfg.get(key)
    if node is None:
        return {}
    if not isinstance(node, Mapping):
        raise ConfigError(f"{key} must be a config group (a mapping), got {node!r}")
    return node


# -- groups --------------------------------------------------------------------------------------------------
def _check_trainer(trainer: Mapping[str, Any]) -> None:
    max_steps = trainer.get("max_steps", -1)
    if max_steps is not None and max_steps != -1:
        require_int("trainer.max_steps", max_steps, 1)
    bounded_by_steps = max_steps not in (None, -1)
    max_epochs = trainer.get("max_epochs")
    if max_epochs is None and not bounded_by_steps:
        raise ConfigError("trainer.max_epochs must be set (an integer >= 1) unless trainer.max_steps is")
    forever_by_steps = bounded_by_steps and max_epochs == -1
    if max_epochs is not None and not forever_by_steps and (not _is_int(max_epochs) or max_epochs < 1):
        hint = " (-1, Lightning's 'train forever', needs trainer.max_steps)" if max_epochs == -1 else ""
        raise ConfigError(f"trainer.max_epochs must be an integer >= 1{hint}, got {max_epochs!r}")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = trainer.get(key)
        if value is None:
            continue
        minimum = 1 if key == "limit_train_batches" else 0
        if _is_int(value):
            require_int(f"trainer.{key}", value, minimum)
        else:
            require_number(f"trainer.{key}", value, low=0.0, high=1.0, low_open=True)
    for key in ("log_every_n_steps", "accumulate_grad_batches"):
        if key in trainer:
            require_int(f"trainer.{key}", trainer[key], 1)
    if trainer.get("check_val_every_n_epoch") is not None:
        require_int("trainer.check_val_every_n_epoch", trainer["check_val_every_n_epoch"], 1)
    require_number("trainer.gradient_clip_val", trainer.get("gradient_clip_val"), low=0.0, optional=True)
    devices = trainer.get("devices", 1)
    if not (devices == "auto" or (_is_int(devices) and (devices >= 1 or devices == -1))
            or (isinstance(devices, (list, tuple)) and devices)):
        raise ConfigError(f"trainer.devices must be an integer >= 1, -1, 'auto' or a list of ids, got {devices!r}")
    several = (_is_int(devices) and devices != 1) or (isinstance(devices, (list, tuple)) and len(devices) > 1) or (
        _is_int(trainer.get("num_nodes", 1)) and trainer.get("num_nodes", 1) > 1)
    if several and trainer.get("use_distributed_sampler", True):
        raise ConfigError(f"trainer.devices={devices} needs trainer=ddp (the datamodule splits each global batch over "
                          "the processes itself; Lightning's distributed sampler must be off)")
    deterministic = trainer.get("deterministic", False)
    if deterministic not in (True, False, "warn", None):
        raise ConfigError(f"trainer.deterministic must be true, false or 'warn', got {deterministic!r}")


def _check_optim(optim: Mapping[str, Any]) -> None:
    require_name("optimizer", optim.get("optimizer", "sgd"), OPTIMIZERS, "optim.optimizer")
    require_number("optim.lr", optim.get("lr"), low=0.0, low_open=True)
    require_number("optim.momentum", optim.get("momentum", 0.0), low=0.0, high=1.0, high_open=True)
    require_number("optim.weight_decay", optim.get("weight_decay", 0.0), low=0.0)
    require_name("LR scheduler", optim.get("scheduler", "none"), LR_SCHEDULERS, "optim.scheduler")
    if "step_size" in optim:
        require_int("optim.step_size", optim["step_size"], 1)
    if "gamma" in optim:
        require_number("optim.gamma", optim["gamma"], low=0.0, low_open=True)


def _check_data(data: Mapping[str, Any]) -> None:
    require_name("dataset", data.get("name"), DATASETS, "data.name")
    require_int("data.batch_size", data.get("batch_size"), 1)
    for key, minimum in (("eval_batch_size", 1), ("probe_size", 1), ("num_workers", 0), ("size", 4),
                         ("num_classes", 2), ("num_samples", 3), ("val_size", 1)):
        if key in data:
            require_int(f"data.{key}", data[key], minimum)
    for key in ("val_fraction", "test_fraction"):
        if key in data:
            require_number(f"data.{key}", data[key], low=0.0, high=1.0, low_open=True, high_open=True)
    if data.get("val_fraction", 0) + data.get("test_fraction", 0) >= 1:
        raise ConfigError("data.val_fraction + data.test_fraction must be < 1")
    if "noise" in data:
        require_number("data.noise", data["noise"], low=0.0)
    shape = data.get("input_shape")
    if shape is not None and (not isinstance(shape, (list, tuple)) or len(shape) != 3
                              or not all(_is_int(s) and s >= 1 for s in shape)):
        raise ConfigError(f"data.input_shape must be three positive integers [C, H, W], got {shape!r}")
    if "download" in data:
        require_bool("data.download", data["download"])


def _check_model(model: Mapping[str, Any]) -> None:
    require_name("model", model.get("name"), MODELS, "model.name")
    require_name("init scheme", model.get("init", "default"), INIT_SCHEMES, "model.init")
    if "activation" in model:
        require_name("activation", model["activation"], ACTIVATIONS, "model.activation")
    if "width" in model:
        require_int("model.width", model["width"], 1)
    hidden = model.get("hidden")
    if hidden is not None and (not isinstance(hidden, (list, tuple)) or not all(_is_int(h) and h >= 1
                                                                               for h in hidden)):
        raise ConfigError(f"model.hidden must be a list of positive integers, got {hidden!r}")
    if "init_kwargs" in model and not isinstance(model["init_kwargs"], Mapping):
        raise ConfigError(f"model.init_kwargs must be a mapping, got {model['init_kwargs']!r}")


def _check_schedule(schedule: Any, key: str) -> None:
    if schedule is None or isinstance(schedule, str):
        if isinstance(schedule, str):
            require_name("noise schedule", schedule, NOISE_SCHEDULES, key)
        return
    if not isinstance(schedule, Mapping):
        raise ConfigError(f"{key} must be a noise schedule mapping, got {schedule!r}")
    require_name("noise schedule", schedule.get("name", "constant"), NOISE_SCHEDULES, f"{key}.name")
    if schedule.get("name") == "leakage_target":
        from pl_i2f.autopilot import check_leakage_target_options  # torch-free

        check_leakage_target_options(schedule)
        return
    require_name("noise schedule unit", schedule.get("by", "step"), SCHEDULE_UNITS, f"{key}.by")
    if "final" in schedule:
        require_number(f"{key}.final", schedule["final"], low=0.0)
    if "gamma" in schedule:
        require_number(f"{key}.gamma", schedule["gamma"], low=0.0, low_open=True)
    if "step_size" in schedule:
        require_int(f"{key}.step_size", schedule["step_size"], 1)
    if schedule.get("horizon") is not None:
        require_int(f"{key}.horizon", schedule["horizon"], 1)


def _check_defense(defense: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    name = defense.get("name")
    require_name("defense", name, tuple(DEFENSE_OPTIONS), "defense.name")
    unknown = sorted(set(defense) - set(DEFENSE_OPTIONS[name]))
    if unknown:
        raise ConfigError(f"unknown option defense.{unknown[0]} for defense={name}; valid: "
                          f"{', '.join(k for k in DEFENSE_OPTIONS[name] if k != 'name')}")
    if "seed" in defense:
        require_int("defense.seed", defense["seed"], 0)
    if "schedule" in defense:
        _check_schedule(defense["schedule"], "noise_schedule")
    if name in ("gaussian", "anisotropic"):
        require_number("defense.sigma", defense.get("sigma", 0.01), low=0.0)
        require_number("defense.clip", defense.get("clip"), low=0.0, low_open=True, optional=True)
    if name == "anisotropic":
        if defense.get("directions") is not None:
            require_int("defense.directions", defense["directions"], 1)
        for key in ("power", "damping"):
            if key in defense:
                require_number(f"defense.{key}", defense[key], low=0.0)
        require_number("defense.relative_damping", defense.get("relative_damping"), low=0.0, optional=True)
        if "span_fraction" in defense:
            require_number("defense.span_fraction", defense["span_fraction"], low=0.0, high=1.0)
        for key in ("refresh_every", "reference_size"):
            if key in defense:
                require_int(f"defense.{key}", defense[key], 1)
    if name == "pruning":
        require_number("defense.ratio (fraction of gradient entries pruned)", defense.get("ratio", 0.9),
                       low=0.0, high=1.0, high_open=True)
        require_name("pruning scope", defense.get("scope", "global"), PRUNING_SCOPES, "defense.scope")
    if name == "dpsgd":
        _check_dpsgd(defense, cfg)


def _check_dpsgd(defense: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    sigma, target = defense.get("noise_multiplier"), defense.get("target_epsilon")
    if sigma is not None and target is not None:
        raise ConfigError(f"defense.noise_multiplier={sigma} and defense.target_epsilon={target} are both set; "
                          "give one (set the other to null)")
    if sigma is None and target is None:
        raise ConfigError("defense=dpsgd needs defense.noise_multiplier or defense.target_epsilon")
    if target is not None:
        require_number("defense.target_epsilon", target, low=0.0, low_open=True)
    else:
        require_number("defense.noise_multiplier", sigma, low=0.0)
        if sigma == 0:
            raise ConfigError("defense.noise_multiplier=0 adds no noise: ε is unbounded (no privacy); use a "
                              "noise multiplier > 0, a target_epsilon, or defense=none")
    require_number("defense.max_grad_norm (DP-SGD per-sample clipping norm)", defense.get("max_grad_norm", 1.0),
                   low=0.0, low_open=True)
    require_number("defense.delta", defense.get("delta", 1e-5), low=0.0, high=1.0, low_open=True, high_open=True)
    require_name("privacy accountant", defense.get("accountant", "rdp"), ACCOUNTANTS, "defense.accountant")
    require_name("DP-SGD noise shape", defense.get("noise_shape", "isotropic"), NOISE_SHAPES,
                 "defense.noise_shape")
    for key in ("poisson_sampling", "fix_model"):
        if key in defense:
            require_bool(f"defense.{key}", defense[key])
    if "reconstruction_baseline" in defense:
        require_number("defense.reconstruction_baseline (κ)", defense["reconstruction_baseline"], low=0.0, high=1.0,
                       low_open=True, high_open=True)
    if defense.get("expected_batch_size") is not None:
        require_int("defense.expected_batch_size", defense["expected_batch_size"], 1)
    model = _section(cfg, "model")
    has_batchnorm = model.get("name") in BATCHNORM_MODELS or (model.get("name") == "convnet"
                                                               and model.get("batchnorm", True))
    if has_batchnorm and not defense.get("fix_model", False):
        raise ConfigError(f"defense=dpsgd cannot train model={model.get('name')}'s BatchNorm layers per sample; "
                          "set defense.fix_model=true (Opacus: BatchNorm → GroupNorm)"
                          + (" or model.batchnorm=false" if model.get("name") == "convnet" else ""))
    trainer = _section(cfg, "trainer")
    if trainer.get("gradient_clip_val") not in (None, 0, 0.0):
        raise ConfigError(f"defense=dpsgd clips each sample's gradient inside Opacus; unset "
                          f"trainer.gradient_clip_val (got {trainer['gradient_clip_val']}) and use "
                          "defense.max_grad_norm")
    if trainer.get("accumulate_grad_batches", 1) != 1:
        raise ConfigError("defense=dpsgd does not support trainer.accumulate_grad_batches > 1 (Opacus accounts "
                          "one Poisson batch per step); raise data.batch_size instead")


def _check_callbacks(callbacks: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    monitor = callbacks.get("i2f_monitor")
    if isinstance(monitor, Mapping):
        key = "callbacks.i2f_monitor"
        for option, (default, minimum) in MONITOR_INT_OPTIONS.items():
            require_int(f"{key}.{option}", monitor.get(option, default), minimum, optional=default is None)
        require_number(f"{key}.max_overhead", monitor.get("max_overhead", MONITOR_DEFAULTS["max_overhead"]), low=0.0,
                       low_open=True, optional=True)
    audit = callbacks.get("attack_audit")
    if isinstance(audit, Mapping):
        for option, (default, minimum) in AUDIT_INT_OPTIONS.items():
            require_int(f"callbacks.attack_audit.{option}", audit.get(option, default), minimum)
        attack = audit.get("attack") if isinstance(audit.get("attack"), Mapping) else {}
        threat = audit.get("threat_model") or cfg.get("threat_model") or {}
        if attack.get("label_mode") == "known" and threat.get("labels_known") is False:
            raise ConfigError("attack.label_mode=known needs labels, but threat_model.labels_known=false; use "
                              "attack.label_mode=auto (iDLG per sample) or grant the labels")
        if "iterations" in attack:
            require_int("attack.iterations", attack["iterations"], 0)
        if "lr" in attack:
            require_number("attack.lr", attack["lr"], low=0.0, low_open=True)


def _check_autopilot(cfg: Mapping[str, Any]) -> None:
    """``noise_schedule=leakage_target``: a noisy defense, the monitor and the autopilot callback, and an ε cap
    only where there is an ε."""
    defense = _section(cfg, "defense")
    schedule = defense.get("schedule", cfg.get("noise_schedule"))
    if not isinstance(schedule, Mapping) or schedule.get("name") != "leakage_target":
        return
    name = defense.get("name")
    if name not in NOISY_DEFENSES:
        raise ConfigError(f"noise_schedule=leakage_target sets the noise of defense=gaussian, anisotropic or dpsgd; "
                          f"defense={name} has no noise to set")
    callbacks = _section(cfg, "callbacks")
    for key, what in (("i2f_monitor", "the leakage monitor, which measures what σ is set from"),
                      ("leakage_autopilot", "the callback that sets σ")):
        if not isinstance(callbacks.get(key), Mapping):
            raise ConfigError(f"noise_schedule=leakage_target needs callbacks.{key} ({what}); use callbacks=default "
                              "or callbacks=audit")
    if name == "dpsgd" and defense.get("target_epsilon") is not None:
        raise ConfigError("noise_schedule=leakage_target sets σ from measured leakage, so defense.target_epsilon "
                          "cannot calibrate it; give defense.noise_multiplier and cap ε with "
                          "noise_schedule.target_epsilon")
    if schedule.get("target_epsilon") is not None and name != "dpsgd":
        raise ConfigError(f"noise_schedule.target_epsilon caps DP-SGD's ε; defense={name} has no ε")


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` (one line, naming the option) for the first invalid option of a resolved
    run config given as plain containers; return ``None`` when the config can run."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"the config must be a mapping, got {type(cfg).__name__}")
    if "seed" in cfg:
        require_int("seed", cfg["seed"], 0)
    for key in ("train", "test"):
        if key in cfg:
            require_bool(key, cfg[key])
    _check_trainer(_section(cfg, "trainer"))
    _check_optim(_section(cfg, "optim"))
    _check_data(_section(cfg, "data"))
    _check_model(_section(cfg, "model"))
    if "noise_schedule" in cfg:
        _check_schedule(cfg["noise_schedule"], "noise_schedule")
    _check_defense(_section(cfg, "defense"), cfg)
    threat = _section(cfg, "threat_model")
    if "labels_known" in threat:
        require_bool("threat_model.labels_known", threat["labels_known"])
    if "model_mode" in threat:
        require_name("model mode", threat["model_mode"], ("eval", "train"), "threat_model.model_mode")
    _check_callbacks(_section(cfg, "callbacks"), cfg)
    _check_autopilot(cfg)
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None:
        path = Path(str(ckpt)).expanduser()
        if not path.exists():
            raise ConfigError(f"ckpt_path={ckpt} does not exist")
        if not path.is_file():
            raise ConfigError(f"ckpt_path={ckpt} is not a file; give a .ckpt file (e.g. {ckpt}/last.ckpt)")


def check_against_data(cfg: Mapping[str, Any], val_size: int, train_size: int) -> None:
    """Options bounded by the split sizes, once the datamodule knows them."""
    data = _section(cfg, "data")
    if data.get("probe_size", 1) > val_size:
        raise ConfigError(f"data.probe_size={data['probe_size']} exceeds the validation split ({val_size} samples)")
    callbacks = _section(cfg, "callbacks")
    monitor = callbacks.get("i2f_monitor")
    if isinstance(monitor, Mapping) and (monitor.get("probe_size") or 0) > val_size:
        raise ConfigError(f"callbacks.i2f_monitor.probe_size={monitor['probe_size']} exceeds the validation split "
                          f"({val_size} samples)")
    audit = callbacks.get("attack_audit")
    if isinstance(audit, Mapping) and audit.get("n_samples", 0) > val_size:
        raise ConfigError(f"callbacks.attack_audit.n_samples={audit['n_samples']} exceeds the validation split "
                          f"({val_size} samples)")
    if data.get("batch_size", 1) > train_size:
        raise ConfigError(f"data.batch_size={data['batch_size']} is larger than the {data.get('name')} train split "
                          f"({train_size} samples)")

