"""The prior-aware expected error (pl_i2f.calibrated) against dense float64 algebra on explicit Jacobians."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pl_i2f import calibrated as cal
from pl_i2f import prior as prior_module
from pl_i2f import sketch as sketch_module
from pl_i2f.errors import ConfigError
from pl_i2f.threat import SampleNoise

D = torch.float64


def _jac(p: int, d_theta: int, d_x: int, seed: int = 0, decay: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    j = torch.randn(p, d_theta, d_x, generator=gen, dtype=D)
    return j * torch.logspace(0, -decay, d_x, dtype=D)  # a spread of singular values


def _spd(d: int, seed: int = 1, zeros: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=gen, dtype=D)
    cov = a @ a.T / d + 0.1 * torch.eye(d, dtype=D)
    if zeros:
        keep = torch.ones(d, dtype=D)
        keep[:zeros] = 0  # pixels the attacker knows: zero variance
        cov = keep[:, None] * cov * keep[None, :]
    return cov


def _kalman(j: torch.Tensor, cov_x: torch.Tensor, cov_n: torch.Tensor) -> torch.Tensor:
    """tr(Σ − ΣJᵀ(JΣJᵀ + Σ_n)⁻¹JΣ): the posterior covariance's trace, valid for a singular prior."""
    out = []
    for jj in j:
        s = jj @ cov_x @ jj.T + cov_n
        out.append(torch.trace(cov_x - cov_x @ jj.T @ torch.linalg.solve(s, jj @ cov_x)))
    return torch.stack(out)


@pytest.mark.parametrize("sigma", [1e-3, 0.1, 3.0])
def test_isotropic_equals_dense(sigma):
    j = _jac(3, 20, 8)
    tau2 = 0.4
    spec = cal.posterior_spectrum(j.transpose(-1, -2) @ j, tau2, scale=sigma)
    dense = torch.stack([torch.trace(torch.linalg.inv(jj.T @ jj / sigma**2 + torch.eye(8, dtype=D) / tau2))
                         for jj in j])
    lam = torch.linalg.eigvalsh(j.transpose(-1, -2) @ j)
    closed = (sigma**2 * tau2 / (sigma**2 + tau2 * lam)).sum(-1)
    torch.testing.assert_close(spec.error(), dense, rtol=1e-6, atol=0)
    torch.testing.assert_close(spec.error(), closed, rtol=1e-6, atol=0)
    e = cal.expected_error(j, SampleNoise(std=sigma), tau2)
    torch.testing.assert_close(e, dense, rtol=1e-6, atol=0)


@pytest.mark.parametrize("sigma", [1e-2, 0.5])
def test_full_covariance_equals_dense(sigma):
    j = _jac(2, 15, 10, seed=3)
    cov = _spd(10)
    prior = cal.covariance_prior(torch.zeros(10, dtype=D), cov)
    spec = cal.posterior_spectrum(j.transpose(-1, -2) @ j, prior, scale=sigma)
    dense = torch.stack([torch.trace(torch.linalg.inv(jj.T @ jj / sigma**2 + torch.linalg.inv(cov))) for jj in j])
    torch.testing.assert_close(spec.error(), dense, rtol=1e-6, atol=0)
    # a dense covariance tensor works as the prior too, and pixel scaling is exact per value
    scale = torch.linspace(0.5, 2.0, 10, dtype=D)
    spec_px = cal.posterior_spectrum(j.transpose(-1, -2) @ j, cov, scale=sigma, value_scale=scale)
    post = [torch.linalg.inv(jj.T @ jj / sigma**2 + torch.linalg.inv(cov)) for jj in j]
    dense_px = torch.stack([torch.trace(torch.diag(scale) @ c @ torch.diag(scale)) for c in post])
    torch.testing.assert_close(spec_px.error(), dense_px, rtol=1e-6, atol=0)


def test_singular_prior_equals_dense():
    j = _jac(2, 12, 9, seed=4)
    cov = _spd(9, zeros=3)
    sigma = 0.2
    spec = cal.posterior_spectrum(j.transpose(-1, -2) @ j, cov, scale=sigma)
    dense = _kalman(j, cov, sigma**2 * torch.eye(12, dtype=D))
    torch.testing.assert_close(spec.error(), dense, rtol=1e-6, atol=1e-12)
    assert float(spec.prior_error()[0]) == pytest.approx(float(torch.trace(cov)), rel=1e-9)


def _basis(d_theta: int, k: int, seed: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d_theta, k, generator=gen, dtype=D))[0]


def test_anisotropic_woodbury_equals_dense():
    j = _jac(2, 14, 6, seed=6)
    v = _basis(14, 4)
    extra = torch.tensor([0.5, 3.0, 0.0, 10.0], dtype=D)
    noise = SampleNoise(std=0.3, basis=v, extra_variance=extra)
    cov_n = 0.09 * torch.eye(14, dtype=D) + v @ torch.diag(extra) @ v.T
    tau2 = 0.7
    got = cal.expected_error(j, noise, tau2)
    dense = torch.stack([torch.trace(torch.linalg.inv(jj.T @ torch.linalg.solve(cov_n, jj)
                                                      + torch.eye(6, dtype=D) / tau2)) for jj in j])
    torch.testing.assert_close(got, dense, rtol=1e-6, atol=0)
    # the same spectrum at another scale: Σ_n scales with s²
    spec = cal.posterior_spectrum(cal.noise_gram(j, noise), tau2)
    dense2 = torch.stack([torch.trace(torch.linalg.inv(jj.T @ torch.linalg.solve(4 * cov_n, jj)
                                                       + torch.eye(6, dtype=D) / tau2)) for jj in j])
    torch.testing.assert_close(spec.error(0.6), dense2, rtol=1e-6, atol=0)


def test_noise_only_in_span_leaves_other_directions_exact():
    # σ_iso = 0: outside span(V) the gradient is noiseless; the limit of a vanishing isotropic part
    j = _jac(2, 8, 10, seed=7)  # d_θ < d_x: the noiseless directions cannot determine x alone
    v = _basis(8, 3, seed=8)
    extra = torch.tensor([0.2, 1.0, 5.0], dtype=D)
    cov = _spd(10, seed=9)
    got = cal.expected_error(j, SampleNoise(std=0.0, basis=v, extra_variance=extra), cal.covariance_prior(
        torch.zeros(10, dtype=D), cov))
    eps = 1e-7
    dense = _kalman(j, cov, eps**2 * torch.eye(8, dtype=D) + v @ torch.diag(extra) @ v.T)
    torch.testing.assert_close(got, dense, rtol=1e-6, atol=1e-10)
    assert (got > 0).all()


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _flat_grad_fn(model: nn.Module, y: torch.Tensor):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def grad_of_x(x: torch.Tensor) -> torch.Tensor:
        def loss(p):
            out = torch.func.functional_call(model, p, (x[None],))
            return nn.functional.cross_entropy(out, y[None])

        g = torch.func.grad(loss)(params)
        return torch.cat([t.reshape(-1) for t in g.values()])

    return grad_of_x


def test_clipped_jacobian_matches_jacrev_of_the_clipped_gradient():
    model = _tiny_model()
    x = torch.randn(6, dtype=D, generator=torch.Generator().manual_seed(1))
    grad_fn = _flat_grad_fn(model, torch.tensor(1))
    g = grad_fn(x)
    j = torch.func.jacrev(grad_fn)(x)
    for clip in (0.5 * float(g.norm()), 2.0 * float(g.norm())):  # clipped, and below the threshold
        def clipped(x_, c=clip):
            gg = grad_fn(x_)
            return gg * torch.clamp(c / gg.norm(), max=1.0)

        want = torch.func.jacrev(clipped)(x)
        got = cal.clipped_jacobian(j[None], g[None], clip)[0]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
        gram = cal.clipped_gram((j.T @ j)[None], (j.T @ g)[None], g.norm()[None], clip)[0]
        torch.testing.assert_close(gram, want.T @ want, rtol=1e-6, atol=1e-12)
        # DP-SGD: noise σC on the clipped gradient
        sigma = 0.7
        e = cal.expected_error(j[None], SampleNoise(std=sigma * clip, clip_norm=clip), 0.3, gradient=g[None])
        dense = torch.trace(torch.linalg.inv(want.T @ want / (sigma * clip) ** 2 + torch.eye(6, dtype=D) / 0.3))
        assert float(e[0]) == pytest.approx(float(dense), rel=1e-6)
        # DP-SGD with the anisotropic extra along a basis: Woodbury on the clipped Jacobian
        v = _basis(j.shape[0], 3, seed=21)
        extra = torch.tensor([0.5, 2.0, 8.0], dtype=D) * (sigma * clip) ** 2
        noise = SampleNoise(std=sigma * clip, clip_norm=clip, basis=v, extra_variance=extra)
        cov_n = (sigma * clip) ** 2 * torch.eye(j.shape[0], dtype=D) + v @ torch.diag(extra) @ v.T
        e = cal.expected_error(j[None], noise, 0.3, gradient=g[None])
        dense = torch.trace(torch.linalg.inv(want.T @ torch.linalg.solve(cov_n, want) + torch.eye(6, dtype=D) / 0.3))
        assert float(e[0]) == pytest.approx(float(dense), rel=1e-6)


def test_monotone_in_sigma_over_random_jacobians():
    sigmas = torch.logspace(-6, 4, 60, dtype=D)
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        d_x = int(torch.randint(2, 12, (1,), generator=gen))
        d_theta = int(torch.randint(1, 20, (1,), generator=gen))
        j = torch.randn(2, d_theta, d_x, generator=gen, dtype=D) * torch.rand(d_x, generator=gen, dtype=D) ** 3
        cov = _spd(d_x, seed=seed, zeros=seed % 3 if d_x > 3 else 0)
        spec = cal.posterior_spectrum(j.transpose(-1, -2) @ j, cov)
        err = spec.error(sigmas)  # (S, P)
        assert (err[1:] >= err[:-1] * (1 - 1e-12)).all()
        assert (err <= spec.prior_error()[None] * (1 + 1e-12)).all()


def test_limits():
    j = _jac(3, 30, 7, seed=11)
    gram = j.transpose(-1, -2) @ j
    cov = _spd(7, seed=12)
    spec = cal.posterior_spectrum(gram, cov)
    sigma = 1e-5
    lam = torch.linalg.eigvalsh(gram)
    undamped = sigma**2 * (1 / lam).sum(-1)  # full-rank G, isotropic I²F: the unbiased attacker
    spec_iso = cal.posterior_spectrum(gram, 0.5)
    torch.testing.assert_close(spec_iso.error(sigma), undamped, rtol=1e-6, atol=0)
    torch.testing.assert_close(spec.error(sigma), undamped, rtol=1e-4, atol=0)  # prior irrelevant at σ → 0
    torch.testing.assert_close(spec.error(1e8), torch.trace(cov).expand(3), rtol=1e-6, atol=0)
    assert spec.error(0.0).abs().max() == 0 and spec.determined_fraction() == 1.0
    # rank-deficient G: the unobserved directions keep their prior variance at σ = 0
    thin = cal.posterior_spectrum(_jac(2, 3, 7).transpose(-1, -2) @ _jac(2, 3, 7), 0.5)
    assert thin.determined_fraction() == 0.0
    torch.testing.assert_close(thin.error(0.0), torch.full((2,), 4 * 0.5, dtype=D), rtol=1e-9, atol=0)


def test_psnr_is_of_the_pooled_mse():
    spec = cal.posterior_spectrum(_jac(4, 10, 5, seed=13).transpose(-1, -2) @ _jac(4, 10, 5, seed=13), 0.2, scale=0.1)
    mse = spec.error() / 5
    assert float(spec.rmse()) == pytest.approx(float(mse.mean().sqrt()), rel=1e-12)
    assert float(spec.psnr()) == pytest.approx(-10 * math.log10(float(mse.mean())), rel=1e-12)
    assert spec.prior_psnr() == pytest.approx(-10 * math.log10(0.2), rel=1e-12)


def test_sigma_for_target_round_trip():
    j = _jac(3, 25, 8, seed=14)
    spec = cal.posterior_spectrum(j.transpose(-1, -2) @ j, 0.5)
    for target in (1e-3, 0.05, 0.3):
        s = cal.sigma_for_target(spec, target)
        assert float(spec.rmse(s)) == pytest.approx(target, rel=1e-6)
        b = cal.sigma_for_target(spec, target, noise_per_unit=64)  # noise on the mean of 64
        assert b * 64 == pytest.approx(s, rel=1e-9)
    assert cal.sigma_for_target(spec, 0.8) == math.inf  # the prior's own RMSE is √0.5 ≈ 0.71
    assert cal.noise_multiplier_for_target(spec, 0.05, clip=2.0) == pytest.approx(
        cal.sigma_for_target(spec, 0.05) / 2.0, rel=1e-12)
    with pytest.raises(ConfigError):
        cal.sigma_for_target(spec, -1.0)


@pytest.mark.parametrize("prior_kind", ["iso", "full"])
def test_nystrom_brackets_the_exact_error(prior_kind):
    d, p = 60, 2
    gen = torch.Generator().manual_seed(15)
    q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=D))[0]
    lam = torch.logspace(3, -6, d, dtype=D)  # fast decay: the sketch captures the top
    gram = torch.stack([q @ torch.diag(lam * (1 + 0.1 * i)) @ q.T for i in range(p)])
    prior = cal.isotropic_prior(0.0, 0.3, dim=d) if prior_kind == "iso" else cal.covariance_prior(
        torch.zeros(d, dtype=D), _spd(d, seed=16))
    exact = cal.posterior_spectrum(gram, prior)
    sk = sketch_module.nystrom_spectrum(lambda v: gram @ v, d, rank=25, prior=prior, probes=30, generator=gen)
    for s in (1e-4, 1e-2, 1.0, 10.0):
        lo, hi = sk.bounds(s)
        want = exact.error(s)
        slack = sk.prior_norm * 3 * sk.residual_stderr / s**2  # the residual trace is a stochastic estimate
        assert (want <= hi * (1 + 1e-9)).all()
        assert (want >= lo - slack - 1e-9).all()
        assert ((sk.error(s) - want).abs() <= sk.half_width(s) + slack + 1e-9).all()
    # full rank: the sketch is exact
    full = sketch_module.nystrom_spectrum(lambda v: gram @ v, d, rank=d, prior=prior, probes=4, generator=gen)
    torch.testing.assert_close(full.error(0.1), exact.error(0.1), rtol=1e-6, atol=1e-9)


def test_estimate_prior_full_and_ppca():
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(200, 3, 4, 4, generator=gen, dtype=D) * torch.linspace(0.1, 2, 48, dtype=D).reshape(3, 4, 4)
    full = cal.estimate_prior(x)
    torch.testing.assert_close(full.covariance(), torch.cov(x.reshape(200, -1).T), rtol=1e-9, atol=1e-12)
    ppca = cal.estimate_prior(x, full=False, rank=5)
    assert ppca.trace == pytest.approx(full.trace, rel=1e-9)
    torch.testing.assert_close(ppca.diagonal().sum(), torch.tensor(ppca.trace, dtype=D), rtol=1e-9, atol=0)
    torch.testing.assert_close(ppca.sqrt() @ ppca.sqrt(), ppca.covariance(), rtol=1e-9, atol=1e-12)
    assert cal.estimate_prior(x, full=False, rank=0).basis.shape[1] == 0
    with pytest.raises(ConfigError):
        cal.estimate_prior(x[:1])


def test_value_scale_per_channel():
    s = prior_module.value_scale((0.5, 0.25), (2, 2, 2))
    assert s.tolist() == [0.5] * 4 + [0.25] * 4
    with pytest.raises(ConfigError):
        prior_module.value_scale((0.5, 0.25, 0.1), (2, 2, 2))


def test_defenses_describe_their_sample_noise():
    from pl_i2f.defenses import build as build_defense

    gauss = build_defense("gaussian", sigma=0.01)
    assert gauss.sample_noise(0, batch_size=64).std == pytest.approx(0.64)
    assert gauss.sample_noise(0, batch_of_one=True).std == pytest.approx(0.01)
    with pytest.raises(ConfigError):
        gauss.sample_noise(0)  # the batch is unknown before setup: never a silent batch of one
    dp = build_defense("dpsgd", noise_multiplier=1.5, max_grad_norm=2.0)
    noise = dp.sample_noise(0)
    assert noise.std == pytest.approx(3.0) and noise.clip_norm == 2.0
    assert build_defense("none").sample_noise(0).is_zero


def test_anisotropic_covariance_matches_its_draws():
    from pl_i2f.defenses.anisotropic import AnisotropicNoise

    for f in (1.0, 0.6):
        noise = AnisotropicNoise(span_fraction=f, dp_extra_energy=2.0)
        noise.vectors = _basis(6, 2, seed=20).T.float().contiguous()
        noise.weights = torch.tensor([0.25, 0.75])
        gen = torch.Generator().manual_seed(0)
        like = torch.empty(0)
        for energy, draw in ((None, noise.shaped), (2.0, noise.extra)):
            std, basis, extra = noise.covariance(0.5, energy)
            want = std**2 * torch.eye(6, dtype=D) + basis.double() @ torch.diag(extra) @ basis.double().T
            draws = torch.stack([0.5 * draw(gen, like) for _ in range(20000)]).double()
            torch.testing.assert_close(draws.T @ draws / len(draws), want, rtol=0, atol=0.05 * float(want.max()))


def test_prior_from_dataset_streams_the_same_covariance():
    gen = torch.Generator().manual_seed(22)
    x = torch.rand(300, 1, 3, 3, generator=gen, dtype=D)
    ds = torch.utils.data.TensorDataset(x, torch.zeros(300, dtype=torch.long))
    streamed = cal.prior_from_dataset(ds, batch_size=64)
    direct = cal.estimate_prior(x)
    torch.testing.assert_close(streamed.covariance(), direct.covariance(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(streamed.mean, direct.mean, rtol=1e-12, atol=0)
    ppca = cal.prior_from_dataset(ds, full=False, rank=2)
    assert ppca.basis.shape == (9, 2) and ppca.trace == pytest.approx(direct.trace, rel=1e-9)


def test_a_full_prior_from_fewer_samples_than_values_is_the_same_covariance():
    """Fewer samples than values (as generated CIFAR-size data: 512 of 3,072): the samples' thin SVD, never a d × d
    matrix, gives the sample covariance exactly, and the same data span."""
    gen = torch.Generator().manual_seed(24)
    x = torch.rand(40, 2, 6, 6, generator=gen, dtype=D)  # 40 samples of 72 values
    ds = torch.utils.data.TensorDataset(x, torch.zeros(40, dtype=torch.long))
    for prior in (cal.estimate_prior(x, full=True), cal.prior_from_dataset(ds, full=True, batch_size=16)):
        assert prior.basis.shape == (72, 40) and prior.rest == 0
        torch.testing.assert_close(prior.covariance(), torch.cov(x.reshape(40, -1).T), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(prior.sqrt() @ prior.sqrt(), prior.covariance(), rtol=1e-9, atol=1e-12)
        dense = cal.covariance_prior(prior.mean, torch.cov(x.reshape(40, -1).T))
        assert cal.prior_support(prior)[1].numel() == cal.prior_support(dense)[1].numel() == 39


class _Items(torch.utils.data.Dataset):
    """A dataset read item by item (no tensors to take at once), over the same samples."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i]


def test_prior_from_a_tensor_dataset_or_its_subset_equals_the_prior_read_item_by_item():
    """A TensorDataset (or a Subset of one) is read as one tensor, any other dataset through a loader: the same
    prior, in the same batches, either way."""
    gen = torch.Generator().manual_seed(23)
    ds = torch.utils.data.TensorDataset(torch.rand(200, 1, 3, 3, generator=gen, dtype=D), torch.zeros(200))
    subset = torch.utils.data.Subset(ds, list(range(150, 20, -3)))
    for dataset in (ds, subset):
        for full in (True, False):
            fast = cal.prior_from_dataset(dataset, batch_size=32, full=full, rank=3, max_samples=40)
            slow = cal.prior_from_dataset(_Items(dataset), batch_size=32, full=full, rank=3, max_samples=40)
            torch.testing.assert_close(fast.covariance(), slow.covariance(), rtol=0, atol=0)
            torch.testing.assert_close(fast.mean, slow.mean, rtol=0, atol=0)


# -- exact_posteriors: explicit Jacobians of a real network -------------------------------------------
def _net_and_probes(n: int = 3):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    x = torch.randn(n, 1, 3, 4, dtype=D)
    y = torch.arange(n) % 4
    return net, x, y


def _jacobians(net, x, y):
    from pl_i2f.influence.jacobian import per_sample_jacobians

    j, g = per_sample_jacobians(net, x, y)
    return j.double(), g.double()


def test_exact_posteriors_equals_dense_algebra_and_batches_probes():
    net, x, y = _net_and_probes(5)
    cov = _spd(12, seed=3)
    prior = cal.covariance_prior(torch.zeros(12, dtype=D), cov)
    sigma = 0.05
    spec = cal.exact_posteriors(net, x, y, SampleNoise(std=sigma), prior, max_numbers=2 * 12 * 100)  # 2 chunks+
    j, _ = _jacobians(net, x, y)
    dense = _kalman(j, cov, sigma**2 * torch.eye(j.shape[1], dtype=D))
    torch.testing.assert_close(spec.error(), dense, rtol=1e-6, atol=0)
    assert spec.mu.shape == (5, 12)


def test_exact_posteriors_dpsgd_clipped_gram_and_noise_sigma_c_by_hand():
    net, x, y = _net_and_probes(3)
    j, g = _jacobians(net, x, y)
    clip = 0.5 * float(g.norm(dim=1).min())  # every probe clipped
    sigma, tau2 = 1.3, 0.7
    spec = cal.exact_posteriors(net, x, y, SampleNoise(std=sigma * clip, clip_norm=clip), tau2)
    hand = []
    for jj, gg in zip(j, g):
        norm = gg.norm()
        unit = gg / norm
        jc = clip / norm * (jj - torch.outer(unit, unit @ jj))  # d clip_C(g)/dx = (C/‖g‖)(I − ĝĝᵀ)J
        hand.append(torch.trace(torch.linalg.inv(jc.T @ jc / (sigma * clip) ** 2 + torch.eye(12, dtype=D) / tau2)))
    torch.testing.assert_close(spec.error(), torch.stack(hand), rtol=1e-6, atol=0)


def test_exact_posteriors_anisotropic_covariance_by_woodbury():
    net, x, y = _net_and_probes(2)
    j, _ = _jacobians(net, x, y)
    d_theta = j.shape[1]
    basis = torch.linalg.qr(torch.randn(d_theta, 3, dtype=D))[0]
    extra = torch.tensor([0.5, 2.0, 0.0], dtype=D)
    noise = SampleNoise(std=0.1, basis=basis, extra_variance=extra, source="anisotropic")
    spec = cal.exact_posteriors(net, x, y, noise, 0.3)
    cov_n = 0.01 * torch.eye(d_theta, dtype=D) + basis @ torch.diag(extra) @ basis.T
    dense = _kalman(j, 0.3 * torch.eye(12, dtype=D), cov_n)
    torch.testing.assert_close(spec.error(), dense, rtol=1e-6, atol=0)


def _small_net_and_probes(d_x: int = 36, probes: int = 4):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(d_x, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return net, torch.randn(probes, 1, 6, 6, dtype=D), torch.randint(0, 3, (probes,))


@pytest.mark.parametrize("clip", [None, 0.5])
def test_sketch_route_brackets_the_exact_route_on_small_inputs(clip):
    """route='sketch' on inputs the exact route also takes (d_x <= 1024): the exact error inside the sketch's stated
    bounds per probe, the clipped Gram's too; at full rank the bounds close on the exact value."""
    from pl_i2f.leakage import Calibrated, LeakageOptions, leakage_report

    net, x, y = _small_net_and_probes()
    noise = SampleNoise(std=0.05, clip_norm=clip)
    options = LeakageOptions(prior=0.2, clipping_norm=1.0, worst_k=0)
    exact = leakage_report(net, x, y, noise, options, Calibrated(route="exact"))
    for rank in (8, 36):
        sketch = leakage_report(net, x, y, noise, options, Calibrated(route="sketch", rank=rank, probes=16))
        lo, hi = sketch.posterior.bounds()
        value = exact.posterior.error()
        assert bool((value >= lo * (1 - 1e-6)).all() and (value <= hi * (1 + 1e-6)).all()), rank
        assert sketch.scalars["sketch_rank"] == rank and "error_half_width_db" in sketch.scalars
        assert "lambda_min" not in sketch.scalars  # the sketch has no exact spectrum
    assert sketch.scalars["error_half_width_db"] < 1e-3
    assert sketch.scalars["expected_attack_psnr"] == pytest.approx(exact.scalars["expected_attack_psnr"], abs=1e-3)


def test_sketch_route_makes_one_product_call_for_both_sketches(monkeypatch):
    """Without DP-SGD the sketch also prices the clipped Gram (noise multiplier for the target): the same vectors,
    so one block product serves the sketch, its residual and the clipped sketch."""
    from pl_i2f.influence.per_sample import PerSampleOperator
    from pl_i2f.leakage import Calibrated, LeakageOptions, leakage_report

    calls = []
    gram = PerSampleOperator.gram
    monkeypatch.setattr(PerSampleOperator, "gram", lambda self, v: calls.append(v.shape) or gram(self, v))
    net, x, y = _small_net_and_probes()
    report = leakage_report(net, x, y, SampleNoise(std=0.05), LeakageOptions(prior=0.2, clipping_norm=1.0),
                            Calibrated(route="sketch", rank=36, probes=4))
    assert calls == [(4, 40, 36)]
    assert "noise_multiplier_for_target" in report.scalars


def test_sketch_route_rejects_a_covariance_and_bad_routes():
    from pl_i2f.leakage import Calibrated, LeakageOptions, leakage_report

    net, x, y = _small_net_and_probes()
    d_theta = sum(p.numel() for p in net.parameters())
    basis = torch.linalg.qr(torch.randn(d_theta, 3, dtype=D))[0]
    noise = SampleNoise(std=0.1, basis=basis, extra_variance=torch.ones(3, dtype=D), source="anisotropic")
    assert not Calibrated.can_sketch(noise) and Calibrated.can_sketch(SampleNoise(std=1.0, clip_norm=1.0))
    assert not Calibrated.can_sketch(SampleNoise())  # no noise: the sketch's lower bound is 0 by construction
    with pytest.raises(ConfigError, match="isotropic"):
        leakage_report(net, x, y, noise, LeakageOptions(prior=0.2), Calibrated(route="sketch"))
    with pytest.raises(ConfigError, match="route"):
        Calibrated(route="lanczos")


def test_sketch_logs_sigma_for_target_only_where_its_bounds_there_are_tight():
    """A rank-2 sketch of 36 values: its σ-for-target sits where its bounds are wide, so it is not logged; at full
    rank the bounds close and it is, equal to the exact route's."""
    from pl_i2f.leakage import Calibrated, LeakageOptions, leakage_report

    net, x, y = _small_net_and_probes()
    options = LeakageOptions(prior=0.2, worst_k=0, target_pixel_rmse=0.05)
    noise = SampleNoise(std=0.05)
    exact = leakage_report(net, x, y, noise, options, Calibrated(route="exact"))
    small = leakage_report(net, x, y, noise, options, Calibrated(route="sketch", rank=2, probes=4))
    full = leakage_report(net, x, y, noise, options, Calibrated(route="sketch", rank=36, probes=4))
    assert "sigma_for_target" not in small.scalars and "expected_attack_psnr" in small.scalars
    assert full.scalars["sigma_for_target"] == pytest.approx(exact.scalars["sigma_for_target"], rel=1e-3)


def test_nystrom_survives_a_core_that_rounding_leaves_indefinite():
    """Products a little below PSD (as float32 rounding leaves a clipped Gram G − uuᵀ that cancels its largest
    direction): the sketch takes a larger shift for that probe instead of failing its Cholesky factorisation."""
    d, gen = 20, torch.Generator().manual_seed(3)
    a = torch.randn(d, 3, generator=gen, dtype=D)
    gram = a @ a.T - 1e-6 * torch.eye(d, dtype=D)  # rank 3, the rest 1e-6 below zero
    sk = sketch_module.nystrom_spectrum(lambda v: gram @ v, d, rank=8, prior=1.0, scale=0.1, probes=4, generator=gen)
    assert bool(torch.isfinite(sk.mu).all()) and bool((sk.mu >= 0).all())
    top = torch.linalg.eigvalsh(a @ a.T)[-3:]
    assert torch.allclose(sk.mu[0].sort().values[-3:], top, rtol=1e-3)


# -- the data span: a singular prior's Jacobians on the directions the data vary in ------------------------
def _singular_prior(d: int = 12, rank: int = 5, seed: int = 4) -> tuple[torch.Tensor, cal.GaussianPrior]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank, generator=gen, dtype=D)
    cov = a @ a.T / rank  # rank 5 of 12: inputs vary in 5 directions only (e.g. small images upsampled)
    return cov, cal.covariance_prior(torch.zeros(d, dtype=D), cov)


def test_prior_support_finds_the_span_and_none_for_full_rank_priors():
    cov, prior = _singular_prior()
    basis, variances = cal.prior_support(prior)
    assert basis.shape == (12, 5) and variances.shape == (5,)
    torch.testing.assert_close(basis @ torch.diag(variances) @ basis.T, cov, rtol=1e-9, atol=1e-12)
    assert cal.prior_support(cal.covariance_prior(torch.zeros(12, dtype=D), _spd(12))) is None
    assert cal.prior_support(cal.isotropic_prior(0.0, 0.3, dim=12)) is None


@pytest.mark.parametrize("noise", [
    SampleNoise(std=0.05),
    SampleNoise(),
    SampleNoise(std=0.4, clip_norm=0.05),
], ids=["gaussian", "none", "dpsgd"])
def test_span_route_equals_the_full_route_and_dense_algebra(noise):
    net, x, y = _net_and_probes(4)
    cov, prior = _singular_prior()
    scale = torch.linspace(0.5, 2.0, 12, dtype=D)  # a per-value pixel scale
    full, full_clip = cal.exact_posterior_pair(net, x, y, noise, prior, clip=0.1, value_scale=scale, span=False)
    span, span_clip = cal.exact_posterior_pair(net, x, y, noise, prior, clip=0.1, value_scale=scale)
    assert span.mu.shape == (4, 5) and full.mu.shape == (4, 12)  # 5 forward-mode products per probe, not 12
    assert span.dim == full.dim == 12
    for s in (1e-3, 0.05, 1.0):
        torch.testing.assert_close(span.error(s), full.error(s), rtol=1e-6, atol=1e-14)
        torch.testing.assert_close(span_clip.error(s), full_clip.error(s), rtol=1e-6, atol=1e-14)
    if noise.std > 0 and noise.clip_norm is None:
        j, _ = _jacobians(net, x, y)
        scaled_cov = scale[:, None] * cov * scale[None, :]
        d_theta = j.shape[1]
        dense = _kalman(j / scale[None, None, :], scaled_cov, noise.std ** 2 * torch.eye(d_theta, dtype=D))
        torch.testing.assert_close(span.error(), dense, rtol=1e-6, atol=0)
    # without noise: every direction of the span determined, error exactly 0 (no rounding of the unseen ones)
    assert float(span.error(0.0).abs().max()) == 0.0
    torch.testing.assert_close(span.prior_error(), full.prior_error(), rtol=1e-9, atol=0)


def test_span_route_anisotropic_covariance_and_noiseless_directions():
    net, x, y = _net_and_probes(3)
    _, prior = _singular_prior()
    d_theta = sum(p.numel() for p in net.parameters())
    basis = torch.linalg.qr(torch.randn(d_theta, 4, dtype=D, generator=torch.Generator().manual_seed(2)))[0]
    for std in (0.1, 0.0):  # 0: only the span of the basis carries noise, the rest is observed exactly
        noise = SampleNoise(std=std, basis=basis, extra_variance=torch.tensor([0.5, 2.0, 1.0, 0.3], dtype=D))
        full = cal.exact_posteriors(net, x, y, noise, prior, span=False)
        span = cal.exact_posteriors(net, x, y, noise, prior)
        assert span.mu.shape[-1] == 5
        torch.testing.assert_close(span.error(), full.error(), rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(span.error(10.0), full.error(10.0), rtol=1e-6, atol=1e-12)


def test_exact_columns_prices_the_span():
    from pl_i2f.leakage import Calibrated

    _, prior = _singular_prior()
    assert Calibrated.exact_columns(prior, 12) == 5
    assert Calibrated.exact_columns(0.3, 12) == 12
    assert Calibrated.exact_columns(cal.isotropic_prior(0.0, 0.3, dim=12), 12) == 12
