"""The prior-aware (MAP) attack: exact on a linear-Gaussian model, pure matching without noise, the prior's mean
under overwhelming noise, known pixels kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pl_i2f import calibrated as cal
from pl_i2f.attacks import invert
from pl_i2f.attacks.prior import map_attack, noise_weighted_sq
from pl_i2f.errors import ConfigError
from pl_i2f.gradients import flat_gradient
from pl_i2f.threat import SampleNoise

D = torch.float64
SHAPE = (1, 4, 4)


def _prior(seed: int = 0, zeros: int = 0) -> cal.GaussianPrior:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 16, generator=gen, dtype=D)
    cov = a @ a.T / 16 + 0.05 * torch.eye(16, dtype=D)
    if zeros:
        keep = torch.ones(16, dtype=D)
        keep[:zeros] = 0
        cov = keep[:, None] * cov * keep[None, :]
    return cal.covariance_prior(torch.randn(16, generator=gen, dtype=D) * 0.3, cov)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def test_linear_gaussian_map_is_the_posterior_mean():
    # loss = w·x: ∇_w = x, so J = I and the MAP is μ + Σ(Σ + σ²I)⁻¹(g − μ) exactly
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1, bias=False)).double()
    prior = _prior(1)
    x = torch.randn(1, *SHAPE, dtype=D, generator=torch.Generator().manual_seed(2))
    sigma = 0.4
    g = x.reshape(-1) + sigma * torch.randn(16, dtype=D, generator=torch.Generator().manual_seed(3))
    res = map_attack(model, g, torch.zeros(1, dtype=torch.long), SHAPE, prior, sigma,
                     loss_fn=lambda logits, y: logits.sum())
    cov = prior.covariance()
    want = prior.mean + cov @ torch.linalg.solve(cov + sigma**2 * torch.eye(16, dtype=D), g - prior.mean)
    torch.testing.assert_close(res.x.reshape(-1), want, rtol=0, atol=1e-6)  # to L-BFGS tolerance
    assert res.converged


def test_without_noise_matching_recovers_the_input_from_the_mean():
    model = _mlp()
    prior = _prior(4)
    x = (prior.mean + 0.3 * torch.randn(16, dtype=D, generator=torch.Generator().manual_seed(5))).reshape(1, *SHAPE)
    y = torch.tensor([1])
    res = map_attack(model, flat_gradient(model, x, y), y, SHAPE, prior, 0.0, iterations=100)
    assert (res.x - x).abs().max() < 1e-4
    assert not any(p.grad is not None for p in model.parameters())  # the model is left untouched


def test_overwhelming_noise_returns_the_prior_mean():
    model = _mlp()
    prior = _prior(6)
    x = torch.randn(1, *SHAPE, dtype=D, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0])
    res = map_attack(model, flat_gradient(model, x, y), y, SHAPE, prior, 1e4)
    torch.testing.assert_close(res.x.reshape(-1), prior.mean, rtol=0, atol=1e-4)


def test_known_pixels_stay_at_their_mean():
    model = _mlp()
    prior = _prior(8, zeros=5)
    x = torch.randn(1, *SHAPE, dtype=D, generator=torch.Generator().manual_seed(9))
    y = torch.tensor([2])
    res = map_attack(model, flat_gradient(model, x, y), y, SHAPE, prior, 0.05)
    torch.testing.assert_close(res.x.reshape(-1)[:5], prior.mean[:5], rtol=0, atol=1e-12)


def test_noise_weighted_residual_is_the_mahalanobis_norm():
    gen = torch.Generator().manual_seed(10)
    v = torch.linalg.qr(torch.randn(12, 3, generator=gen, dtype=D))[0]
    extra = torch.tensor([0.3, 2.0, 9.0], dtype=D)
    noise = SampleNoise(std=0.5, basis=v, extra_variance=extra)
    r = torch.randn(4, 12, generator=gen, dtype=D)
    cov = 0.25 * torch.eye(12, dtype=D) + v @ torch.diag(extra) @ v.T
    want = 0.25 * (r * torch.linalg.solve(cov, r.T).T).sum(-1)
    torch.testing.assert_close(noise_weighted_sq(r, noise), want, rtol=1e-10, atol=0)


def test_bad_prior_size_is_one_line():
    with pytest.raises(ConfigError, match="prior has"):
        map_attack(_mlp(), torch.zeros(163, dtype=D), torch.tensor([0]), SHAPE, cal.isotropic_prior(0.0, 1.0, dim=9))


def test_invert_routes_the_map_preset():
    model = _mlp()
    prior = _prior(11)
    x = torch.randn(1, *SHAPE, dtype=D, generator=torch.Generator().manual_seed(12))
    g = flat_gradient(model, x, torch.tensor([1]))
    direct = map_attack(model, g, None, SHAPE, prior, 0.01)  # labels by iDLG
    routed = invert(model, g, None, SHAPE, preset="map", prior=prior, noise=0.01)
    torch.testing.assert_close(routed.x, direct.x)
    assert routed.labels.tolist() == [1] and routed.threat_model["preset"] == "map"
    with pytest.raises(ConfigError, match="needs prior"):
        invert(model, g, None, SHAPE, preset="map")
    with pytest.raises(ConfigError, match="bad options"):
        invert(model, g, None, SHAPE, preset="map", prior=prior, lr=0.1)
