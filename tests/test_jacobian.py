"""Explicit per-sample Jacobians and Grams (pl_i2f.influence.jacobian) against torch.func.jacrev and dense algebra."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, jacrev

from pl_i2f.gradients import batch_loss_fn, eval_mode, flatten, per_sample_gradients, trainable_parameters
from pl_i2f.influence.jacobian import (
    iter_per_sample_jacobians,
    per_sample_grams,
    per_sample_jacobians,
)


def _bn_convnet() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 5 * 5, 4)).double()
    bn = model[1]
    bn.running_mean.copy_(torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
    bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5], dtype=torch.float64))
    model.train()  # the analysis must still use the running statistics
    return model


def _batch(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 5, 5, generator=gen, dtype=torch.float64), torch.arange(n) % 4


def _reference_jacobian(model: nn.Module, xi: torch.Tensor, yi: torch.Tensor, clip: float | None = None):
    """J_i by reverse-over-reverse (θ rows), a different route than the forward-mode product under test."""
    params, loss = trainable_parameters(model), batch_loss_fn(model)

    def g(z: torch.Tensor) -> torch.Tensor:
        out = flatten(grad(loss)(params, z.unsqueeze(0), yi.unsqueeze(0)))
        return out if clip is None else out * torch.clamp(clip / out.norm(), max=1.0)

    with eval_mode(model):
        return jacrev(g)(xi).reshape(sum(p.numel() for p in params.values()), -1)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    return float((a - b).norm() / b.norm()) <= tol


@pytest.mark.parametrize("max_numbers", [1 << 25, 300, 1])  # one call; a probe per chunk; tangent blocks of 1
def test_jacobians_and_gradients_match_jacrev(max_numbers: int):
    model = _bn_convnet()
    x, y = _batch()
    J, g = per_sample_jacobians(model, x, y, max_numbers=max_numbers)
    d_theta = sum(p.numel() for p in model.parameters())
    assert J.shape == (5, d_theta, 25) and g.shape == (5, d_theta)
    for i in range(5):
        assert _close(J[i], _reference_jacobian(model, x[i], y[i]))
    assert _close(g, per_sample_gradients(model, x, y))
    assert model.training and all(m.training for m in model.modules())  # flags restored
    assert all(p.grad is None for p in model.parameters())


def test_chunks_cover_the_batch_in_order():
    model = _bn_convnet()
    x, y = _batch(7)
    d_theta = sum(p.numel() for p in model.parameters())
    chunks = list(iter_per_sample_jacobians(model, x, y, max_numbers=2 * d_theta * 25))
    assert [c.start for c in chunks] == [0, 2, 4, 6]
    assert [c.jacobians.shape[0] for c in chunks] == [2, 2, 2, 1]
    J, _ = per_sample_jacobians(model, x, y)
    assert _close(torch.cat([c.jacobians for c in chunks]), J, 1e-12)


@pytest.mark.parametrize("max_numbers", [1 << 25, 1])  # one call; tangent blocks of 1
def test_tangents_give_the_jacobian_on_a_subspace(max_numbers: int):
    model = _bn_convnet()
    x, y = _batch(3)
    tangents = torch.linalg.qr(torch.randn(25, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))[0].T
    chunks = list(iter_per_sample_jacobians(model, x, y, tangents=tangents, max_numbers=max_numbers))
    on_span = torch.cat([c.jacobians for c in chunks])
    full, _ = per_sample_jacobians(model, x, y)
    assert on_span.shape == (3, full.shape[1], 4)
    assert _close(on_span, full @ tangents.T, 1e-10)
    with pytest.raises(ValueError, match="tangents must be"):
        next(iter_per_sample_jacobians(model, x, y, tangents=torch.zeros(4, 24, dtype=torch.float64)))


def test_grams_match_dense_algebra_and_spectrum():
    model = _bn_convnet()
    x, y = _batch()
    out = per_sample_grams(model, x, y, max_numbers=400)
    for i in range(5):
        J = _reference_jacobian(model, x[i], y[i])
        assert _close(out.grams[i], J.T @ J)
        # same nonzero spectrum as the θ-side J Jᵀ
        lam = torch.linalg.eigvalsh(out.grams[i])
        top = torch.linalg.eigvalsh(J @ J.T)[-25:]
        assert _close(lam, top)
    assert out.grams.dtype == torch.float64


def test_clipped_grams_match_the_jacobian_of_the_clipped_gradient():
    model = _bn_convnet()
    x, y = _batch()
    norms = per_sample_gradients(model, x, y).norm(dim=1)
    clip = float(norms.median())  # some probes clipped, some not
    assert bool((norms > clip).any()) and bool((norms <= clip).any())
    out = per_sample_grams(model, x, y, clipping_norm=clip)
    for i in range(5):
        J = _reference_jacobian(model, x[i], y[i], clip=clip)
        assert _close(out.grams[i], J.T @ J)


def test_float32_model_grams_accumulate_in_the_requested_dtype():
    model = _bn_convnet().float()
    x, y = _batch()
    f64 = per_sample_grams(model, x, y)
    f32 = per_sample_grams(model, x, y, dtype=None)
    assert f64.grams.dtype == torch.float64 and f32.grams.dtype == torch.float32
    assert _close(f32.grams.double(), f64.grams, 1e-5)


def test_bad_input_is_one_line_error():
    model = _bn_convnet()
    x, y = _batch()
    with pytest.raises(ValueError, match="one entry per sample"):
        per_sample_jacobians(model, x, y[:2])
    with pytest.raises(ValueError, match="clipping_norm"):
        per_sample_grams(model, x, y, clipping_norm=0.0)
    with pytest.raises(ValueError, match="max_numbers"):
        per_sample_jacobians(model, x, y, max_numbers=0)
    big = nn.Sequential(nn.Flatten(), nn.Linear(25, 1 << 20)).double()
    with pytest.raises(ValueError, match="too large"):
        per_sample_jacobians(big, x, torch.zeros(5, dtype=torch.long))
