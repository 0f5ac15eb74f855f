"""Defenses: registry, release = what training applies, noise statistics, anisotropic vs Gaussian I²F."""

from __future__ import annotations

import pytest
import torch

from pl_i2f import defenses
from pl_i2f.data import build_datamodule
from pl_i2f.errors import ConfigError
from pl_i2f.gradients import flat_gradient
from pl_i2f.models import build_model


@pytest.fixture(scope="module")
def digits8():
    dm = build_datamodule("digits", size=8, batch_size=32, probe_size=8, seed=0)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def lenet8(digits8):
    torch.manual_seed(0)
    return build_model("lenet_zhu", digits8.input_shape, 10)


def d_theta(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_build_registry_and_unknown_name():
    assert set(defenses.DEFENSES) == {"none", "gaussian", "anisotropic", "pruning", "dpsgd"}
    assert isinstance(defenses.build("none"), defenses.Defense)
    with pytest.raises(ConfigError, match="unknown defense 'laplace'"):
        defenses.build("laplace")
    with pytest.raises(ConfigError, match="bad options"):
        defenses.build("gaussian", sigma=0.1, colour="blue")


def test_a_bug_inside_a_constructor_keeps_its_traceback(monkeypatch):
    """Options are checked against the constructor's signature; a TypeError raised *inside* it is a bug, not a
    bad option, and must surface as itself."""
    with pytest.raises(ConfigError, match="bad options"):
        defenses.build("anisotropic", sigma=0.1, colour="blue")  # the shape options are checked too

    def broken_init(self, *args, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(defenses.AnisotropicNoise, "__init__", broken_init)
    with pytest.raises(TypeError, match="unsupported operand"):
        defenses.build("anisotropic", sigma=0.1)


def test_none_releases_the_clean_gradient(digits8, lenet8):
    x, y = digits8.probe_batch(8)
    d = defenses.build("none")
    torch.testing.assert_close(d.release(lenet8, x, y), flat_gradient(lenet8, x, y))
    assert d.noise_sampler(0, model=lenet8) is None


def test_gaussian_noise_std_matches_sigma(digits8, lenet8):
    x, y = digits8.probe_batch(8)
    sigma = 0.05
    d = defenses.build("gaussian", sigma=sigma)
    clean = flat_gradient(lenet8, x, y)
    g = torch.Generator().manual_seed(3)
    deltas = torch.stack([d.release(lenet8, x, y, step=0, generator=g) - clean for _ in range(20)])
    assert deltas.shape == (20, d_theta(lenet8))
    assert abs(float(deltas.std()) / sigma - 1) < 0.02
    assert abs(float(deltas.mean())) < 0.01 * sigma * 5
    # the sampler draws the same distribution, from the caller's generator only
    sampler = d.noise_sampler(0, model=lenet8)
    a = sampler(torch.Generator().manual_seed(1))
    b = sampler(torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert abs(float(torch.stack([sampler(g) for _ in range(20)]).std()) / sigma - 1) < 0.02
    assert d.noise_std(0) == sigma


def test_gaussian_clip_bounds_the_released_norm(digits8, lenet8):
    x, y = digits8.probe_batch(8)
    clean = flat_gradient(lenet8, x, y)
    c = float(clean.norm()) / 4
    released = defenses.build("gaussian", sigma=0.0, clip=c).release(lenet8, x, y)
    assert float(released.norm()) == pytest.approx(c, rel=1e-4)
    torch.testing.assert_close(released / released.norm(), clean / clean.norm())


def test_training_applies_release_transform(digits8, lenet8):
    """perturb_gradients_ (training) and release (analysis) are the same map: same seed, same result."""
    x, y = digits8.probe_batch(8)
    d = defenses.build("gaussian", sigma=0.1, seed=7)
    d.setup(lenet8, None)
    model = build_model("lenet_zhu", digits8.input_shape, 10)
    model.load_state_dict(lenet8.state_dict())
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    d.perturb_gradients_(model, step=0)
    trained = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    analysed = d.release(lenet8, x, y, step=0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(trained, analysed, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_pruning_keeps_largest_entries(digits8, lenet8, scope):
    x, y = digits8.probe_batch(8)
    clean = flat_gradient(lenet8, x, y)
    released = defenses.build("pruning", ratio=0.75, scope=scope).release(lenet8, x, y)
    sizes = [p.numel() for p in lenet8.parameters()]
    for c, r in zip(torch.split(clean, sizes), torch.split(released, sizes)):
        kept = r != 0
        if scope == "per_layer":
            assert int(kept.sum()) == c.numel() - int(0.75 * c.numel())
            if (~kept).any():
                assert float(c[kept].abs().min()) >= float(c[~kept].abs().max())
        torch.testing.assert_close(r[kept], c[kept])
    kept = released != 0
    if scope == "global":
        assert int(kept.sum()) == clean.numel() - int(0.75 * clean.numel())
        assert float(clean[kept].abs().min()) >= float(clean[~kept].abs().max())
    assert defenses.build("pruning", ratio=0.5).noise_sampler(0, model=lenet8) is None


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("gaussian", {"sigma": -0.1}, "sigma .* must be a finite number >= 0"),
        ("anisotropic", {"sigma": -1.0}, "sigma .* must be a finite number >= 0"),
        ("gaussian", {"sigma": 0.1, "clip": 0.0}, "clip .* must be a positive"),
        ("dpsgd", {"noise_multiplier": -1.0}, "noise_multiplier must be a finite number >= 0"),
        ("dpsgd", {"max_grad_norm": 0.0}, "max_grad_norm .* must be a positive"),
        ("dpsgd", {"accountant": "moments"}, "unknown privacy accountant 'moments'"),
        ("dpsgd", {"delta": 1.5}, "delta must be in"),
        ("pruning", {"ratio": 1.0}, "ratio"),
        ("pruning", {"scope": "per_channel"}, "unknown pruning scope"),
        ("gaussian", {"schedule": {"name": "sawtooth"}}, "unknown noise schedule 'sawtooth'"),
    ],
)
def test_bad_input_is_a_one_line_config_error(name, params, message):
    with pytest.raises(ConfigError, match=message) as info:
        defenses.build(name, **params)
    assert "\n" not in str(info.value)


def test_anisotropic_same_energy_and_twice_the_heldout_i2f(digits8, lenet8):
    """Equal energy E‖δ‖² as Gaussian (2%), and on held-out samples (not in the reference batch) the expected
    I²F is >= 2x the Gaussian one. 8x8 digits, lenet_zhu, 8 reference + 8 held-out samples."""
    from pl_i2f import influence

    x, y = digits8.probe_batch(16)
    held_x, held_y, ref_x, ref_y = x[:8], y[:8], x[8:], y[8:]
    sigma = 0.01
    d = defenses.build("anisotropic", sigma=sigma)
    d.refresh(lenet8, ref_x, ref_y)
    sampler = d.noise_sampler(0)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sampler(g) for _ in range(3000)])
    energy = float(draws.pow(2).sum(1).mean())
    assert abs(energy / (sigma**2 * d_theta(lenet8)) - 1) < 0.02
    op = influence.GradientJacobian(lenet8, held_x, held_y)
    gaussian = influence.expected_i2f(op, noise_std=sigma)
    shaped = influence.expected_i2f(op, noise_sampler=sampler, noise_draws=128,
                                    generator=torch.Generator().manual_seed(1))
    assert float(shaped.value) >= 2 * float(gaussian.value)
    # the baseline it beats is the same-σ Gaussian defense, through its own sampler
    iso_sampler = defenses.build("gaussian", sigma=sigma).noise_sampler(0, model=lenet8)
    iso = influence.expected_i2f(op, noise_sampler=iso_sampler, noise_draws=64,
                                 generator=torch.Generator().manual_seed(1))
    assert float(iso.value) == pytest.approx(float(gaussian.value), rel=0.1)


def test_anisotropic_state_round_trips_through_a_checkpoint(digits8, lenet8):
    """Directions, weights, reference batch and the training generator are restored exactly."""
    x, y = digits8.probe_batch(4)
    d = defenses.build("anisotropic", sigma=0.02, refresh_every=5, seed=1)
    d.refresh(lenet8, x, y, step=3)
    d.training_generator("cpu").manual_seed(123)
    state = d.state_dict()
    e = defenses.build("anisotropic", sigma=0.02, refresh_every=5, seed=1)
    e.load_state_dict(state)
    assert "vectors" not in state["anisotropic"] and e.noise.vectors is None  # rebuilt, not stored
    e.noise.maybe_refresh(lenet8, 4)  # same refresh window: the directions of step 3, rebuilt from its weights
    assert e.noise.refreshed_at == 3 and torch.equal(e.noise.vectors, d.noise.vectors)
    a = d.noise_sampler(4)(torch.Generator().manual_seed(5))
    b = e.noise_sampler(4)(torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(d.training_generator("cpu").get_state(), e.training_generator("cpu").get_state())
