"""Every name a configuration may give, defined once: models, datasets, defenses, schedules, attacks, studies,
and the defaults and lower limits of the callbacks' options.

Torch-free, so config validation (:mod:`pl_i2f.validation`) reads it before anything heavy is imported; the
factories (``pl_i2f.models.MODELS``, ``pl_i2f.data.DATAMODULES``, ``pl_i2f.defenses.DEFENSES``,
``pl_i2f.attacks.PRESETS``, the study modules) implement exactly these names, which
``tests/test_bad_input.py`` checks, together with the callbacks' signatures against the option tables below.
"""

from __future__ import annotations

from typing import Any

# -- the model and the data -------------------------------------------------------------------------------------
MODELS = ("convnet", "lenet5", "lenet_zhu", "mlp", "resnet152", "resnet18")
BATCHNORM_MODELS = ("resnet18", "resnet152")  # convnet: when model.batchnorm is true
INIT_SCHEMES = ("default", "kaiming_normal", "kaiming_uniform", "normal", "orthogonal", "uniform", "xavier_normal",
                "xavier_uniform")
ACTIVATIONS = ("elu", "gelu", "relu", "sigmoid", "tanh")
DATASETS = ("cifar10", "cifar100", "digits", "fake", "fashion_mnist", "mnist")

# -- training ---------------------------------------------------------------------------------------------------
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULERS = ("none", "cosine", "step", "multistep")

# -- defenses ---------------------------------------------------------------------------------------------------
FIXED_SCHEDULES = ("constant", "linear", "exponential", "step", "cosine")
NOISE_SCHEDULES = (*FIXED_SCHEDULES, "leakage_target")  # every noise schedule a config may give
SCHEDULE_UNITS = ("step", "epoch")
ACCOUNTANTS = ("rdp", "prv")
NOISE_SHAPES = ("isotropic", "anisotropic")
PRUNING_SCOPES = ("global", "per_layer")
# Options each defense accepts (its constructor's parameters, ``name`` included).
_NOISY = ("name", "sigma", "clip", "schedule", "seed")
DEFENSE_OPTIONS: dict[str, tuple[str, ...]] = {
    "none": ("name", "seed"),
    "gaussian": _NOISY,
    "anisotropic": (*_NOISY, "directions", "which", "power", "damping", "relative_damping", "span_fraction",
                    "refresh_every", "reference_size", "reference", "dense_max_dim", "rcond", "dp_extra_energy"),
    "pruning": ("name", "ratio", "scope", "seed"),
    "dpsgd": ("name", "noise_multiplier", "target_epsilon", "max_grad_norm", "delta", "accountant",
              "poisson_sampling", "fix_model", "noise_shape", "anisotropic", "schedule", "expected_batch_size",
              "reconstruction_baseline", "seed"),
}
DEFENSES = tuple(DEFENSE_OPTIONS)
NOISY_DEFENSES = ("gaussian", "anisotropic", "dpsgd")  # those whose σ a noise schedule (or the autopilot) sets

# -- attacks and leakage ----------------------------------------------------------------------------------------
ATTACK_PRESETS = ("map", "dlg", "inverting_gradients", "gradinversion")

#: ``callbacks.I2FMonitor``'s integer options: name → (default, least value). The damped Lanczos estimate's
#: settings (``method``, ``lanczos_steps``, ``relative_damping`` …) are retired: accepted with a deprecation warning.
MONITOR_INT_OPTIONS: dict[str, tuple[int | None, int]] = {
    "every_n_steps": (100, 1),
    "first_step": (10, 1),
    "probe_size": (None, 1),
    "worst_k": (5, 0),
    "warmup_steps": (3, 1),
}
#: ``callbacks.I2FMonitor``'s other defaults that validation reads.
MONITOR_DEFAULTS: dict[str, Any] = {"max_overhead": 0.1}
#: ``callbacks.AttackAudit``'s integer options: name → (default, least value).
AUDIT_INT_OPTIONS: dict[str, tuple[int, int]] = {"every_n_epochs": (5, 1), "n_samples": (4, 1)}

# -- studies ----------------------------------------------------------------------------------------------------
#: analysis studies (``python study.py study=<name>``): name → module
STUDIES: dict[str, str] = {
    "i2f_vs_attack": "pl_i2f.studies.i2f_vs_attack",
    "eigen_directions": "pl_i2f.studies.eigen_directions",
}
#: training studies, by the ``task_name`` of their jobs → the module that analyses them (``noise_grid``: the older
#: name of the DP-SGD trade-off sweep, ``hparams_search=noise_grid``, read by the same analysis)
TRAINING_STUDIES: dict[str, str] = {
    "init_study": "pl_i2f.studies.init_study",
    "defense_comparison": "pl_i2f.studies.defense_comparison",
    "tradeoff_dpsgd": "pl_i2f.studies.tradeoff_dpsgd",
    "noise_grid": "pl_i2f.studies.tradeoff_dpsgd",
}
#: studies that read a whole multirun folder (failed jobs and the sweeper's own results too), by the prefix of its
#: ``task_name`` → module with ``report(run_dir, out) -> list[Path]``
MULTIRUN_STUDIES: dict[str, str] = {
    "schedule_search": "pl_i2f.studies.schedule_search",
}
