"""The training module: losses, optimizers and the DP-SGD corner of Poisson sampling."""

from __future__ import annotations

import pytest
import torch

from pl_i2f.errors import ConfigError
from pl_i2f.models import build_model
from pl_i2f.module import ClassifierModule


def test_dpsgd_survives_empty_poisson_batches(run_training):
    """Batch size 1 on ~36 samples: about a third of Poisson batches are empty; each still takes a
    (noise-only) step instead of crashing Opacus' optimizer."""
    metrics = run_training([
        "data=fake", "data.num_samples=60", "data.input_shape=[1,8,8]", "data.batch_size=1", "data.probe_size=4",
        "model=mlp", "defense=dpsgd", "seed=3",
    ])
    assert metrics["privacy/epsilon"] > 0


def test_empty_batch_gives_a_zero_loss_with_a_graph():
    module = ClassifierModule(build_model("mlp", (1, 4, 4), 3), num_classes=3)
    loss = module.training_step((torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.long)), 0)
    assert loss.item() == 0.0 and loss.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": 0.0}, "optim.lr must be > 0"), ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
     ({"scheduler": "poly"}, "unknown LR scheduler"), ({"momentum": 1.0}, "momentum")],
)
def test_bad_optimizer_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ClassifierModule(build_model("mlp", (1, 4, 4), 3), num_classes=3, **kwargs)
