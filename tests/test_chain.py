"""The chain networks' per-sample Jacobians by batched matrix products (pl_i2f.influence.chain) against the generic
torch.func route and reverse-mode jacrev, and which networks fall back to the generic route."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pl_i2f.influence import settings
from pl_i2f.influence.chain import chain_of
from pl_i2f.influence.jacobian import iter_per_sample_jacobians, per_sample_grams, per_sample_jacobians
from pl_i2f.models import MLP, LeNet5, LeNetZhu


def _strided() -> nn.Module:
    """Every convolution option the route handles: strides, dilation, uneven padding, no bias, several activations,
    dropout and flatten between linear layers."""
    return nn.Sequential(nn.Conv2d(2, 5, 3, padding=(1, 2), stride=(2, 1), dilation=(1, 2), bias=False), nn.GELU(),
                         nn.Conv2d(5, 4, 2), nn.Softplus(), nn.Flatten(), nn.Dropout(0.3), nn.Linear(160, 10),
                         nn.LeakyReLU(0.1), nn.Linear(10, 10))


NETWORKS = {
    "lenet_zhu": (lambda: LeNetZhu((1, 16, 16), 10), (1, 16, 16)),
    "lenet_zhu tanh, RGB": (lambda: LeNetZhu((3, 12, 12), 10, activation="tanh"), (3, 12, 12)),
    "mlp relu": (lambda: MLP((1, 8, 8), 10, hidden=(32, 16)), (1, 8, 8)),
    "strided, dilated, unbiased": (_strided, (2, 11, 9)),
}


def _routes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
    """(J, g) of every probe by the chain route (True) and by the generic torch.func route (False)."""
    out = {}
    for chain in (True, False):
        previous, settings.CHAIN_PRODUCTS = settings.CHAIN_PRODUCTS, chain
        try:
            chunks = [(c.jacobians.clone(), c.gradients.clone()) for c in iter_per_sample_jacobians(model, x, y, **kw)]
        finally:
            settings.CHAIN_PRODUCTS = previous
        out[chain] = torch.cat([j for j, _ in chunks]), torch.cat([g for _, g in chunks])
    return out


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chain_route_matches_the_generic_route(name: str, dtype: torch.dtype):
    torch.manual_seed(0)
    build, shape = NETWORKS[name]
    model = build().to(dtype)
    assert chain_of(model, shape) is not None
    x, y = torch.randn(3, *shape, dtype=dtype), torch.tensor([0, 3, 9])
    tangents = torch.randn(7, x[0].numel(), dtype=dtype)
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    for kw in ({}, {"tangents": tangents}, {"tangents": tangents, "max_numbers": 2 * 7 * 1000, "reuse_buffers": True}):
        routes = _routes(model, x, y, **kw)
        assert routes[True][0].shape == routes[False][0].shape
        assert _relative(routes[True][0], routes[False][0]) <= tol, kw
        assert _relative(routes[True][1], routes[False][1]) <= tol, kw
    one = _routes(model, x[:1], y[:1], tangents=tangents)  # one probe: deeper layers spread δ, not the tangents
    assert _relative(one[True][0], one[False][0]) <= tol


class _WithSpare(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.spare = _strided(), nn.Linear(3, 3)  # the spare layer is registered, never called

    def forward(self, x):
        return self.body(x)


def test_tangent_blocks_and_frozen_or_unused_parameters():
    """A probe's columns split in blocks of tangents (one call each); a frozen layer has no rows; a trainable
    parameter outside the chain has zero rows in both routes."""
    torch.manual_seed(1)
    model = _WithSpare().double()
    model.body[2].weight.requires_grad_(False)
    x, y = torch.randn(2, 2, 11, 9, dtype=torch.float64), torch.tensor([1, 2])
    assert chain_of(model, (2, 11, 9)) is not None
    d_theta = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for max_numbers in (1 << 25, d_theta * 5):  # all 198 columns at once; blocks of 5 tangents
        routes = _routes(model, x, y, max_numbers=max_numbers, reuse_buffers=True)
        assert routes[True][0].shape == (2, d_theta, 198)
        assert _relative(routes[True][0], routes[False][0]) <= 1e-12
        assert float(routes[True][0][:, -12:].abs().max()) == 0.0  # the spare layer's rows


def test_reused_buffers_are_overwritten_by_the_next_chunk_and_copies_are_not():
    torch.manual_seed(2)
    model, x, y = LeNetZhu((1, 8, 8), 10), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    d_theta = sum(p.numel() for p in model.parameters())
    chunks = list(iter_per_sample_jacobians(model, x, y, max_numbers=d_theta * 64, reuse_buffers=True))
    assert len(chunks) == 4 and chunks[0].jacobians.data_ptr() == chunks[3].jacobians.data_ptr()
    J, _ = per_sample_jacobians(model, x, y, max_numbers=d_theta * 64)  # no reuse: four distinct probes
    assert _relative(J[3], chunks[0].jacobians[0]) < 1e-6 and _relative(J[0], J[3]) > 0.1
    settings_grams = per_sample_grams(model, x, y).grams
    previous, settings.CHAIN_PRODUCTS = settings.CHAIN_PRODUCTS, False
    try:
        generic = per_sample_grams(model, x, y).grams
    finally:
        settings.CHAIN_PRODUCTS = previous
    assert _relative(settings_grams, generic) < 1e-5


def test_reused_buffers_keep_room_to_grow_so_more_probes_are_not_a_fresh_buffer():
    from pl_i2f.influence.chain import ROOM_ON_CPU, ChainProducts

    torch.manual_seed(3)
    model, x, y = LeNetZhu((1, 8, 8), 10), torch.randn(8, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    chain, tangents = chain_of(model, (1, 8, 8)), torch.eye(64).reshape(64, 1, 8, 8)
    storage = {}
    for n in (1, 2, ROOM_ON_CPU, ROOM_ON_CPU + 1, 2 * ROOM_ON_CPU):
        ChainProducts(chain, reuse=True).columns(x[:n], y[:n], tangents)
        storage[n] = chain.workspace["columns"].data_ptr()
    assert storage[1] == storage[2] == storage[ROOM_ON_CPU]  # room for ROOM_ON_CPU probes from the first call
    assert storage[ROOM_ON_CPU + 1] != storage[1] and storage[2 * ROOM_ON_CPU] == storage[ROOM_ON_CPU + 1]


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.flat, self.layer, self.act = nn.Flatten(), nn.Linear(16, 16), nn.Tanh()

    def forward(self, x):
        return self.layer(self.act(self.layer(self.flat(x))))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.flat, self.layer = nn.Flatten(), nn.Linear(16, 16)

    def forward(self, x):
        h = self.flat(x)
        return h + self.layer(h)


def _hooked() -> nn.Module:
    model = MLP((1, 4, 4), 10, hidden=(8,))
    model.net[1].register_forward_hook(lambda module, inputs, output: output * 2)
    return model


@pytest.mark.parametrize("build, loss", [
    (lambda: LeNet5((1, 16, 16), 10), None),  # max-pooling
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(576, 10)), None),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, groups=1, padding="same"), nn.Flatten(), nn.Linear(1024, 10)), None),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(1024, 10)),
     None),
    (lambda: _Shared(), None),
    (lambda: _Residual(), None),
    (_hooked, None),
    (lambda: MLP((1, 16, 16), 10), nn.CrossEntropyLoss(label_smoothing=0.1)),
    (lambda: MLP((1, 16, 16), 10), lambda logits, y: F.mse_loss(logits, F.one_hot(y, 10).float())),
])
def test_other_networks_and_losses_take_the_generic_route(build, loss):
    shape = (1, 4, 4) if isinstance(build(), (_Shared, _Residual)) or build is _hooked else (1, 16, 16)
    assert chain_of(build(), shape, loss) is None


def test_cross_entropy_spellings_and_soft_labels():
    model = MLP((1, 4, 4), 10, hidden=(8,))
    for loss in (None, F.cross_entropy, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")):
        assert chain_of(model, (1, 4, 4), loss) is not None
    # soft labels are cross-entropy too, but the chain route takes class indices: same columns by the generic route
    x, soft = torch.randn(2, 1, 4, 4), torch.softmax(torch.randn(2, 10), 1)
    routes = _routes(model, x, soft)
    assert torch.equal(routes[True][0], routes[False][0])


def test_a_replaced_parameter_is_traced_again():
    model = MLP((1, 4, 4), 10, hidden=(8,))
    first = chain_of(model, (1, 4, 4))
    assert chain_of(model, (1, 4, 4)) is first  # remembered
    model.net[1].weight = nn.Parameter(model.net[1].weight.detach().clone())
    again = chain_of(model, (1, 4, 4))
    assert again is not first and id(model.net[1].weight) in again.offsets


def test_analysis_copies_of_an_opacus_model_share_one_trace_and_its_buffers(monkeypatch: pytest.MonkeyPatch):
    from opacus import GradSampleModule

    import pl_i2f.influence.chain as chain_module
    from pl_i2f.defenses.base import analysis_model

    torch.manual_seed(0)
    hooked = LeNetZhu((1, 16, 16), 10)
    GradSampleModule(hooked)  # Opacus' per-sample hooks on the network itself (DP-SGD's wrap_model=False)
    x, y = torch.randn(3, 1, 16, 16), torch.tensor([0, 4, 9])
    first = analysis_model(hooked)
    assert chain_of(hooked, (1, 16, 16)) is None  # Opacus' hooks: the generic route
    traced = chain_of(first, (1, 16, 16))
    assert traced is not None
    with torch.no_grad():  # a training step later: other weights, a fresh copy of them
        for p in hooked.parameters():
            p.add_(0.1 * torch.randn_like(p))
    second = analysis_model(hooked)
    monkeypatch.setattr(chain_module, "_trace", lambda *a: pytest.fail("a noted copy was traced again"))
    bound = chain_of(second, (1, 16, 16))
    assert bound.workspace is traced.workspace
    assert all(any(m is n for n in second.modules()) for m in bound.modules)  # the second copy's own layers
    routes = _routes(second, x, y, reuse_buffers=True)
    assert _relative(routes[True][0], routes[False][0]) < 2e-6
    assert _relative(routes[True][1], routes[False][1]) < 2e-6


def test_the_monitors_copy_of_a_network_and_the_network_share_one_trace(monkeypatch: pytest.MonkeyPatch):
    import pl_i2f.influence.chain as chain_module
    from pl_i2f.sources import copy_network

    torch.manual_seed(4)
    network = LeNetZhu((1, 16, 16), 10)
    snapshot = copy_network(network)  # the step-0 weights, evaluated first
    traced = chain_of(snapshot, (1, 16, 16))
    monkeypatch.setattr(chain_module, "_trace", lambda *a: pytest.fail("the network was traced again"))
    bound = chain_of(network, (1, 16, 16))
    assert bound.workspace is traced.workspace and all(any(m is n for n in network.modules()) for m in bound.modules)
    x, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 7])
    routes = _routes(network, x, y, reuse_buffers=True)
    assert _relative(routes[True][0], routes[False][0]) < 2e-6


def test_the_warm_up_reserves_the_first_evaluations_buffers():
    """The first evaluation of several probes finds its buffers allocated and touched by the warm-up (their first
    touch is a one-off cost, not the price of those probes)."""
    from pl_i2f.influence.chain import ChainProducts
    from pl_i2f.leakage import warm_up_transforms

    torch.manual_seed(5)
    model, x, y = LeNetZhu((1, 8, 8), 10), torch.randn(8, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    warm_up_transforms(model, x, y, route="exact", prior=1.0, reserve=8)
    chain = chain_of(model, (1, 8, 8))
    reserved = {name: (t.data_ptr(), t.numel()) for name, t in chain.workspace.items()}
    assert reserved["columns"][1] >= 8 * 64 * chain.size
    ChainProducts(chain, reuse=True).columns(x, y, torch.eye(64).reshape(64, 1, 8, 8))
    assert {name: (t.data_ptr(), t.numel()) for name, t in chain.workspace.items()} == reserved  # nothing reallocated
