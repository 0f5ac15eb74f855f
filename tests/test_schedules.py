"""Noise schedules: pure functions of the step, exact formulas, clear errors."""

from __future__ import annotations

import math

import pytest

from pl_i2f.defenses import NoiseSchedule, build
from pl_i2f.errors import ConfigError


def test_formulas_per_step():
    lin = NoiseSchedule("linear", final=0.5, horizon=10)
    assert lin(2.0, 0) == 2.0
    assert lin(2.0, 5) == pytest.approx(1.5)
    assert lin(2.0, 10) == pytest.approx(1.0)
    assert lin(2.0, 50) == pytest.approx(1.0)  # held at `final` past the horizon
    cos = NoiseSchedule("cosine", final=0.0, horizon=10)
    assert cos(1.0, 0) == pytest.approx(1.0)
    assert cos(1.0, 5) == pytest.approx(0.5)
    assert cos(1.0, 10) == pytest.approx(0.0, abs=1e-12)
    assert NoiseSchedule("exponential", gamma=0.9)(1.0, 3) == pytest.approx(0.9**3)
    step = NoiseSchedule("step", gamma=0.5, step_size=4)
    assert [step(1.0, t) for t in (0, 3, 4, 8, 11)] == [1.0, 1.0, 0.5, 0.25, 0.25]
    assert NoiseSchedule()(0.7, 123) == 0.7


def test_epoch_progress_and_binding():
    s = NoiseSchedule("step", by="epoch", gamma=0.5, step_size=1).bind(total_steps=30, steps_per_epoch=10)
    assert [s(1.0, t) for t in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    lin = NoiseSchedule("linear", by="epoch", final=0.0).bind(total_steps=30, steps_per_epoch=10)
    assert lin.horizon == 3  # the whole run, in epochs
    assert lin(1.0, 15) == pytest.approx(1 - 1 / 3)
    # pure: the same step always gives the same value (resume is exact)
    assert [lin(1.0, t) for t in range(30)] == [lin(1.0, t) for t in range(30)]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"name": "sawtooth"}, "unknown noise schedule 'sawtooth'"),
        ({"name": "linear", "by": "minute"}, "unknown noise schedule unit"),
        ({"name": "exponential", "gamma": 0.0}, "gamma must be"),
        ({"name": "linear", "final": -1.0}, "final must be"),
        ({"name": "step", "step_size": 0}, "step_size must be"),
        ({"name": "constant", "warmup": 3}, "unknown options"),
    ],
)
def test_bad_schedules_are_one_line_errors(config, message):
    with pytest.raises(ConfigError, match=message) as info:
        NoiseSchedule.from_config(config)
    assert "\n" not in str(info.value)


def test_unbound_linear_needs_a_horizon():
    with pytest.raises(ConfigError, match="horizon"):
        NoiseSchedule("linear").factor(3)


def test_defense_uses_schedule():
    d = build("gaussian", sigma=0.2, schedule={"name": "exponential", "gamma": 0.5})
    assert d.sigma_at(0) == pytest.approx(0.2)
    assert d.sigma_at(2) == pytest.approx(0.05)
    assert d.metrics(2) == {"defense/sigma": pytest.approx(0.05)}
    assert math.isclose(d.noise_std(2), 0.05)


def test_unknown_schedule_through_the_train_config(make_cfg):
    import train

    cfg = make_cfg(["defense=gaussian", "noise_schedule=linear", "noise_schedule.name=sawtooth"])
    with pytest.raises(ConfigError, match="unknown noise schedule") as info:
        train.run(cfg)
    assert "\n" not in str(info.value)
