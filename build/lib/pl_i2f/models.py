"""Classifier architectures used in the gradient-leakage literature, and their initialisation schemes.

All models take images shaped ``(B, C, H, W)`` and return logits; each adapts to any input size and
channel count given at construction. ``build_model(name, input_shape, num_classes, init=...)`` is the
one entry point; ``MODELS`` and ``INIT_SCHEMES`` list the valid names.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from pl_i2f.errors import ConfigError, check_options, unknown_name

InputShape = tuple[int, int, int]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "elu": nn.ELU,
}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise unknown_name("activation", name, _ACTIVATIONS)
    return _ACTIVATIONS[name]()


def _flat_features(body: nn.Module, input_shape: InputShape) -> int:
    """Size of ``body``'s flattened output for one input, found by a forward pass on zeros."""
    with torch.no_grad():
        was_training = body.training
        body.eval()
        n = body(torch.zeros(1, *input_shape)).numel()
        body.train(was_training)
    return n


class LeNetZhu(nn.Module):
    """The DLG network (Zhu et al., 2019): three 5x5 convolutions of 12 channels with strides 2, 2, 1,
    sigmoid activations, and one linear layer. Twice differentiable everywhere, which DLG relies on."""

    def __init__(self, input_shape: InputShape, num_classes: int, width: int = 12, activation: str = "sigmoid"):
        super().__init__()
        channels = input_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, kernel_size=5, padding=2, stride=2),
            _activation(activation),
            nn.Conv2d(width, width, kernel_size=5, padding=2, stride=2),
            _activation(activation),
            nn.Conv2d(width, width, kernel_size=5, padding=2, stride=1),
            _activation(activation),
            nn.Flatten(),
        )
        self.fc = nn.Linear(_flat_features(self.body, input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class LeNet5(nn.Module):
    """LeCun's LeNet-5 with ReLU and max-pooling (6 and 16 channels, then 120-84-classes)."""

    def __init__(self, input_shape: InputShape, num_classes: int, activation: str = "relu"):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(input_shape[0], 6, kernel_size=5, padding=2),
            _activation(activation),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5, padding=2),
            _activation(activation),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(_flat_features(self.body, input_shape), 120),
            _activation(activation),
            nn.Linear(120, 84),
            _activation(activation),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ConvNet(nn.Module):
    """The "ConvNet" of Inverting Gradients (Geiping et al., 2020), scaled by ``width``: three
    conv-(BatchNorm)-activation stages with 2x2 pooling after the second and third, then linear."""

    def __init__(
        self,
        input_shape: InputShape,
        num_classes: int,
        width: int = 32,
        batchnorm: bool = True,
        activation: str = "relu",
    ):
        super().__init__()
        if width < 1:
            raise ConfigError(f"convnet width must be >= 1, got {width}")
        layers: list[nn.Module] = []
        channels = input_shape[0]
        for i, out in enumerate((width, 2 * width, 4 * width)):
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=not batchnorm))
            if batchnorm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(_activation(activation))
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            channels = out
        layers.append(nn.Flatten())
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(_flat_features(self.body, input_shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


class MLP(nn.Module):
    """A fully connected network on flattened images."""

    def __init__(
        self,
        input_shape: InputShape,
        num_classes: int,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
    ):
        super().__init__()
        sizes = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in itertools.pairwise(sizes):
            layers += [nn.Linear(a, b), _activation(activation)]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _resnet(
    depth: int,
    input_shape: InputShape,
    num_classes: int,
    small_input: bool | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """A torchvision ResNet. ``small_input`` (default: images of at most 64 pixels a side) swaps the
    7x7/2 stem and max-pool for a 3x3/1 convolution, the usual CIFAR adaptation."""
    import torchvision

    factory = {18: torchvision.models.resnet18, 152: torchvision.models.resnet152}[depth]
    weights_enum = {18: torchvision.models.ResNet18_Weights, 152: torchvision.models.ResNet152_Weights}[depth]
    if pretrained:
        try:
            model = factory(weights=weights_enum.DEFAULT)
        except Exception as exc:
            raise ConfigError(
                f"resnet{depth} pretrained weights are neither in the torch hub cache "
                f"({torch.hub.get_dir()}) nor downloadable ({type(exc).__name__}: {exc}); "
                "copy the torchvision checkpoint there or set model.pretrained=false"
            ) from None
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        model = factory(num_classes=num_classes)
    channels, height, width = input_shape
    if small_input is None:
        small_input = max(height, width) <= 64
    if small_input:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def resnet18(input_shape: InputShape, num_classes: int, small_input: bool | None = None, pretrained: bool = False):
    return _resnet(18, input_shape, num_classes, small_input, pretrained)


def resnet152(input_shape: InputShape, num_classes: int, small_input: bool | None = None, pretrained: bool = False):
    return _resnet(152, input_shape, num_classes, small_input, pretrained)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet_zhu": LeNetZhu,
    "lenet5": LeNet5,
    "convnet": ConvNet,
    "mlp": MLP,
    "resnet18": resnet18,
    "resnet152": resnet152,
}


# --- initialisation -----------------------------------------------------------------------------

def _weighted_layers(model: nn.Module) -> list[nn.Module]:
    """Convolutions and linear layers: the layers every scheme initialises (norm layers keep 1/0)."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]


def _init_uniform(model: nn.Module, a: float = 0.5, generator: torch.Generator | None = None) -> None:
    if a <= 0:
        raise ConfigError(f"uniform init bound a must be > 0, got {a}")
    for m in _weighted_layers(model):
        for p in (m.weight, m.bias):
            if p is not None:
                nn.init.uniform_(p, -a, a, generator=generator)


def _init_normal(model: nn.Module, std: float = 0.1, generator: torch.Generator | None = None) -> None:
    if std <= 0:
        raise ConfigError(f"normal init std must be > 0, got {std}")
    for m in _weighted_layers(model):
        for p in (m.weight, m.bias):
            if p is not None:
                nn.init.normal_(p, 0.0, std, generator=generator)


def _weights_then_zero_bias(init: Callable[..., torch.Tensor]) -> Callable[..., None]:
    """A scheme that draws weights with ``init`` and sets biases to zero (the usual convention)."""

    def scheme(model: nn.Module, generator: torch.Generator | None = None, **kwargs: float) -> None:
        for m in _weighted_layers(model):
            init(m.weight, **kwargs, generator=generator)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    return scheme


def _init_default(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """PyTorch's own initialisation: leave the freshly built model as it is."""


INIT_SCHEMES: dict[str, Callable[..., None]] = {
    "default": _init_default,
    "uniform": _init_uniform,
    "normal": _init_normal,
    "kaiming_uniform": _weights_then_zero_bias(nn.init.kaiming_uniform_),
    "kaiming_normal": _weights_then_zero_bias(nn.init.kaiming_normal_),
    "xavier_uniform": _weights_then_zero_bias(nn.init.xavier_uniform_),
    "xavier_normal": _weights_then_zero_bias(nn.init.xavier_normal_),
    "orthogonal": _weights_then_zero_bias(nn.init.orthogonal_),
}


def init_weights(model: nn.Module, scheme: str = "default", generator: torch.Generator | None = None, **kwargs):
    """Initialise ``model`` in place with a named scheme and return it.

    ``uniform`` (``a``, default 0.5) and ``normal`` (``std``, default 0.1) draw weights **and** biases —
    the DLG convention; the others (``kaiming_*``, ``xavier_*``: ``gain``/``mode``/``nonlinearity``;
    ``orthogonal``: ``gain``) draw weights and zero the biases. Normalisation layers keep weight 1 and
    bias 0 under every scheme.
    """
    if scheme not in INIT_SCHEMES:
        raise unknown_name("init scheme", scheme, INIT_SCHEMES)
    check_options(INIT_SCHEMES[scheme], kwargs, f"init scheme {scheme!r}", model)
    INIT_SCHEMES[scheme](model, generator=generator, **kwargs)
    return model


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    init: str = "default",
    init_kwargs: dict | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model for ``input_shape = (C, H, W)`` and ``num_classes``, then initialise it."""
    if name not in MODELS:
        raise unknown_name("model", name, MODELS)
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    if init not in INIT_SCHEMES:  # checked before building: a resnet152 takes a while
        raise unknown_name("init scheme", init, INIT_SCHEMES)
    shape = tuple(int(s) for s in input_shape)
    check_options(MODELS[name], kwargs, f"model {name!r}", shape, int(num_classes))
    model = MODELS[name](shape, int(num_classes), **kwargs)
    return init_weights(model, init, **(init_kwargs or {}))
