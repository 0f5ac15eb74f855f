"""Model registry and initialisation schemes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pl_i2f.errors import ConfigError
from pl_i2f.models import INIT_SCHEMES, MODELS, build_model, init_weights

# small inputs keep the resnets quick; each model sees the shape it is usually used with
SHAPES = {
    "lenet_zhu": (1, 16, 16),
    "lenet5": (1, 16, 16),
    "convnet": (3, 16, 16),
    "mlp": (1, 8, 8),
    "resnet18": (3, 16, 16),
    "resnet152": (3, 16, 16),
}


def layers_with_weights(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_and_takes_one_step(name):
    shape = SHAPES[name]
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes=5)
    x, y = torch.randn(4, *shape), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert model(x).shape == (4, 5)
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("name", ["lenet_zhu", "lenet5", "convnet", "mlp"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (2, 20, 12)])
def test_small_models_adapt_to_any_input_shape(name, shape):
    model = build_model(name, shape, num_classes=3)
    assert model(torch.zeros(2, *shape)).shape == (2, 3)


def test_lenet_zhu_is_the_dlg_network():
    model = build_model("lenet_zhu", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)]
    assert all(c.out_channels == 12 and c.kernel_size == (5, 5) for c in convs)
    assert all(isinstance(m, nn.Sigmoid) for m in model.body if not isinstance(m, (nn.Conv2d, nn.Flatten)))
    assert model.fc.in_features == 768  # the DLG paper's 32x32 configuration


def test_resnet_small_input_stem():
    small = build_model("resnet18", (1, 28, 28), 10)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.in_channels == 1
    assert isinstance(small.maxpool, nn.Identity)
    large = build_model("resnet18", (3, 96, 96), 10)
    assert large.conv1.kernel_size == (7, 7)


def test_pretrained_without_weights_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ConfigError, match=r"pretrained weights .* model.pretrained=false"):
        build_model("resnet18", (3, 32, 32), 10, pretrained=True)


@pytest.mark.parametrize("a", [0.5, 0.1])
def test_uniform_bounds_every_weight_and_bias(a):
    torch.manual_seed(0)
    model = build_model("lenet_zhu", (1, 16, 16), 10, init="uniform", init_kwargs={"a": a})
    tensors = [p for layer in layers_with_weights(model) for p in (layer.weight, layer.bias)]
    assert len(tensors) == 8
    for p in tensors:
        assert p.abs().max() <= a
    pooled = torch.cat([p.detach().flatten() for p in tensors])
    assert pooled.abs().max() > 0.99 * a  # drawn over the whole range, not just inside it
    assert float(pooled.std()) == pytest.approx(a / 3**0.5, rel=0.05)


def test_normal_draws_weights_and_biases():
    model = build_model("mlp", (1, 8, 8), 10, init="normal", init_kwargs={"std": 0.05})
    weights = torch.cat([layer.weight.flatten() for layer in layers_with_weights(model)])
    biases = torch.cat([layer.bias.flatten() for layer in layers_with_weights(model)])
    assert float(weights.std()) == pytest.approx(0.05, rel=0.05)
    assert float(biases.std()) == pytest.approx(0.05, rel=0.2)


def test_orthogonal_gives_orthogonal_rows():
    model = build_model("lenet_zhu", (1, 16, 16), 10, init="orthogonal")
    for layer in layers_with_weights(model):
        w = layer.weight.reshape(layer.weight.shape[0], -1)
        if w.shape[0] <= w.shape[1]:
            assert torch.allclose(w @ w.T, torch.eye(w.shape[0]), atol=1e-5)
        else:
            assert torch.allclose(w.T @ w, torch.eye(w.shape[1]), atol=1e-5)
        assert torch.count_nonzero(layer.bias) == 0


@pytest.mark.parametrize(
    ("scheme", "std_of"),
    [
        ("kaiming_normal", lambda fan_in, fan_out: (2 / fan_in) ** 0.5),
        ("kaiming_uniform", lambda fan_in, fan_out: (2 / fan_in) ** 0.5),
        ("xavier_normal", lambda fan_in, fan_out: (2 / (fan_in + fan_out)) ** 0.5),
        ("xavier_uniform", lambda fan_in, fan_out: (2 / (fan_in + fan_out)) ** 0.5),
    ],
)
def test_fan_based_schemes_have_their_variance(scheme, std_of):
    model = build_model("mlp", (1, 16, 16), 10, init=scheme, hidden=[512])
    layer = model.net[1]  # 256 -> 512
    assert float(layer.weight.std()) == pytest.approx(std_of(256, 512), rel=0.05)
    assert torch.count_nonzero(layer.bias) == 0


def test_norm_layers_keep_identity_under_every_scheme():
    for scheme in INIT_SCHEMES:
        model = build_model("convnet", (3, 8, 8), 10, init=scheme, width=4)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert torch.equal(m.weight, torch.ones_like(m.weight))
                assert torch.equal(m.bias, torch.zeros_like(m.bias))


def test_init_is_reproducible_with_a_generator():
    a = build_model("lenet_zhu", (1, 16, 16), 10)
    b = build_model("lenet_zhu", (1, 16, 16), 10)
    init_weights(a, "uniform", generator=torch.Generator().manual_seed(3))
    init_weights(b, "uniform", generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_bad_names_and_options_list_what_is_valid():
    with pytest.raises(ConfigError, match=r"unknown model 'vgg'; valid: .*lenet_zhu.*resnet18"):
        build_model("vgg", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"unknown init scheme 'he'; valid: .*orthogonal"):
        build_model("mlp", (1, 8, 8), 10, init="he")
    with pytest.raises(ConfigError, match="uniform init bound"):
        build_model("mlp", (1, 8, 8), 10, init="uniform", init_kwargs={"a": -1})
    with pytest.raises(ConfigError, match="bad options"):
        build_model("mlp", (1, 8, 8), 10, depth=3)
    with pytest.raises(ConfigError, match="unknown activation"):
        build_model("mlp", (1, 8, 8), 10, activation="swishy")


def test_bad_options_are_config_errors_but_a_bug_inside_keeps_its_traceback(monkeypatch):
    with pytest.raises(ConfigError, match="model 'mlp' got bad options"):
        build_model("mlp", (1, 8, 8), 10, depth_of_field=3)
    with pytest.raises(ConfigError, match="init scheme 'uniform' got bad options"):
        build_model("mlp", (1, 8, 8), 10, init="uniform", init_kwargs={"b": 1.0})

    def broken_uniform(model, a=0.5, generator=None):
        raise TypeError("unsupported operand type(s) for *: 'Tensor' and 'str'")

    monkeypatch.setitem(INIT_SCHEMES, "uniform", broken_uniform)
    with pytest.raises(TypeError, match="unsupported operand"):
        build_model("mlp", (1, 8, 8), 10, init="uniform")
