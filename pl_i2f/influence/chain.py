"""Per-sample Jacobian columns J_i t of x ↦ ∇_θ L(x) for chain networks, by batched matrix products
(forward-over-reverse written out layer by layer).

The generic route (``vmap`` of ``torch.func`` over probes and tangents,
:func:`pl_i2f.influence.jacobian.iter_per_sample_jacobians`) gives every probe its own weight gradient of every
convolution, which the batching rules run as grouped convolution backward passes: slow kernels on a CPU for
small feature maps. Here the same columns come from GEMMs. With z = layer(a) and δ = ∂L/∂z, a layer's weight
gradient is the bilinear B(a, δ) (δaᵀ for a linear layer, Σ_p δ_p ⊗ unfold(a)_p for a convolution), so its
tangent along t is B(ȧ, δ) + B(a, δ̇): the forward pass carries the activations' tangents ȧ, the backward
pass the deltas' tangents δ̇, and for a convolution B(ȧ, δ) contracts ȧ with δ spread by the layer's
unfolding operator (a fixed 0/1 tensor) — no unfolding of the tangents, no transposed convolutions (each
convolution's transpose is its dense matrix, built once per set of weights). The columns are those of the
generic route up to float32 rounding (tested against it).

Covered (:func:`chain_of`): a network whose traced graph (``torch.fx``) is a chain of ``Conv2d`` (one group,
zero padding), ``Linear`` on flat features, ``Flatten``, ``Identity``/``Dropout`` (analysis runs in eval
mode) and elementwise activations, ending in logits, without hooks, every parameter used once, under mean
cross-entropy with class labels. Anything else — pooling, normalisation, residual connections, another
loss — gets ``None``, and the caller takes the generic route.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pl_i2f.influence.settings import CHAIN_MAX_OPERATOR_NUMBERS

__all__ = ["Chain", "ChainProducts", "chain_of", "note_copy"]

AFFINE = (nn.Conv2d, nn.Linear)
ROOM_ON_CPU = 4  # a reused buffer's size on a CPU, in multiples of the first request (ChainProducts._buffer)
PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten)  # linear, no parameters
GENERIC_ACTIVATIONS = (nn.ELU, nn.GELU, nn.SiLU, nn.Softplus, nn.Mish, nn.CELU, nn.SELU)


@dataclass(frozen=True)
class Chain:
    """The network as a chain: its modules in order, each one's input shape (one sample), each trainable
    parameter's offset in the flat gradient (``named_parameters`` order), d_θ, and whether some trainable
    parameter is outside the chain (its rows are zero)."""

    modules: tuple[nn.Module, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    offsets: dict[int, int]  # id(parameter) -> offset
    size: int
    unused: bool
    workspace: dict[str, Tensor] = field(default_factory=dict, compare=False, repr=False)


def _is_cross_entropy(loss_fn: Callable | None) -> bool:
    from pl_i2f.gradients import default_loss

    if loss_fn is None or loss_fn is default_loss or loss_fn is F.cross_entropy:
        return True
    return (type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None and loss_fn.label_smoothing == 0
            and loss_fn.reduction in ("mean", "sum"))


def _is_activation(module: nn.Module) -> bool:
    if isinstance(module, nn.LeakyReLU | nn.ReLU | nn.Sigmoid | nn.Tanh):
        return True
    return isinstance(module, GENERIC_ACTIVATIONS)


def _supported(module: nn.Module) -> bool:
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return False
    if isinstance(module, nn.Conv2d):
        return (module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
                and type(module) is nn.Conv2d)
    if isinstance(module, nn.Linear):
        return type(module) is nn.Linear
    return isinstance(module, PASS_THROUGH) or _is_activation(module)


_CHAINS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_COPIES: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()  # copy → its original
_TEMPLATES: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()  # original → traced by name


@dataclass(frozen=True)
class _Template:
    """A :class:`Chain` by module and parameter names (holding no module), to serve other copies of a network."""

    names: tuple[str, ...]
    input_shapes: tuple[tuple[int, ...], ...]
    offsets: dict[str, int]  # parameter name -> offset
    size: int
    unused: bool
    workspace: dict[str, Tensor]

    @classmethod
    def of(cls, chain: Chain, model: nn.Module) -> _Template:
        module_names = {id(m): n for n, m in model.named_modules()}
        param_names = {id(p): n for n, p in model.named_parameters()}
        return cls(tuple(module_names[id(m)] for m in chain.modules), chain.input_shapes,
                   {param_names[i]: at for i, at in chain.offsets.items()}, chain.size, chain.unused, chain.workspace)

    def bind(self, model: nn.Module) -> Chain:
        named, params = dict(model.named_modules()), dict(model.named_parameters())
        return Chain(tuple(named[n] for n in self.names), self.input_shapes,
                     {id(params[n]): at for n, at in self.offsets.items()}, self.size, self.unused,
                     workspace=self.workspace)


def note_copy(copy: nn.Module, original: nn.Module) -> None:
    """``copy`` is a deep copy of ``original`` with the same forward (the hook-free copies analysis makes of an
    Opacus model at every evaluation, the monitor's copy of the step-0 weights): :func:`chain_of` then serves the
    copy, the original and every other copy of it from one trace, bound to each one's modules by name, with the
    same reused buffers — no trace and no fresh buffers for each."""
    _COPIES[copy] = weakref.ref(original)
    _TEMPLATES.setdefault(original, {})


def chain_of(model: nn.Module, sample_shape: tuple[int, ...], loss_fn: Callable | None = None) -> Chain | None:
    """``model`` as a :class:`Chain` for inputs of ``sample_shape``, or None where :class:`ChainProducts` cannot
    run it (see the module's docstring). Remembered per model, and per original for copies noted with
    :func:`note_copy` (tracing takes milliseconds; an evaluation calls it once)."""
    if not _is_cross_entropy(loss_fn):
        return None
    signature = (tuple(sample_shape), tuple((id(p), p.requires_grad, tuple(p.shape)) for p in model.parameters()))
    known = _CHAINS.setdefault(model, {})
    if signature not in known:
        known.clear()  # parameters replaced or frozen since: trace again
        known[signature] = _traced_or_bound(model, tuple(sample_shape))
    return known[signature]


def _traced_or_bound(model: nn.Module, sample_shape: tuple[int, ...]) -> Chain | None:
    """A copy noted with :func:`note_copy` and its original share one trace (a template kept with the original);
    any other model is traced."""
    reference = _COPIES.get(model)
    original = reference() if reference is not None else model
    if original is None:  # the original is gone: this copy on its own
        original = model
    hooked = any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules())
    if hooked or (original is model and model not in _TEMPLATES):  # (hooks: the generic route, as traced)
        return _trace(model, sample_shape)
    by_name = (sample_shape, tuple((n, p.requires_grad, tuple(p.shape)) for n, p in model.named_parameters()))
    templates = _TEMPLATES.setdefault(original, {})
    if by_name not in templates:
        templates.clear()
        chain = _trace(model, sample_shape)
        templates[by_name] = None if chain is None else _Template.of(chain, model)  # None: not a chain
        return chain
    template = templates[by_name]
    return None if template is None else template.bind(model)


def _trace(model: nn.Module, sample_shape: tuple[int, ...]) -> Chain | None:
    if model._forward_hooks or model._forward_pre_hooks:
        return None
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # any model fx cannot trace takes the generic route
        return None
    named, modules, previous = dict(model.named_modules()), [], None
    for node in graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                return None
            previous = node
        elif node.op == "output":
            if node.args[0] is not previous:
                return None
        elif (node.op == "call_module" and len(node.args) == 1 and not node.kwargs and node.args[0] is previous
              and _supported(named[node.target])):
            modules.append(named[node.target])
            previous = node
        else:
            return None
    used = [p for m in modules for p in m.parameters(recurse=False)]
    if not used or len({id(p) for p in used}) != len(used):
        return None
    trainable = [p for p in model.parameters() if p.requires_grad]
    offsets, at = {}, 0
    for p in trainable:
        offsets[id(p)] = at
        at += p.numel()
    shapes, h = [], torch.zeros(1, *sample_shape, device=used[0].device, dtype=used[0].dtype)
    with torch.no_grad():
        for m in modules:
            shapes.append(tuple(h.shape[1:]))
            if (isinstance(m, nn.Conv2d) and h.dim() != 4) or (isinstance(m, nn.Linear) and h.dim() != 2):
                return None
            try:
                out = m(h)
            except RuntimeError:  # the generic route reports the mismatch
                return None
            if isinstance(m, nn.Conv2d) and _operator_numbers(m, shapes[-1], tuple(out.shape[1:])) > \
                    CHAIN_MAX_OPERATOR_NUMBERS:
                return None
            h = out
    if h.dim() != 2:
        return None
    unused = bool({id(p) for p in trainable} - {id(p) for p in used})
    return Chain(tuple(modules), tuple(shapes), offsets, at, unused)


def _operator_numbers(m: nn.Conv2d, shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> int:
    kernel = math.prod(m.kernel_size)
    positions_in, positions_out = math.prod(shape_in[1:]), math.prod(shape_out[1:])
    return max(math.prod(shape_in) * math.prod(shape_out), positions_in * positions_out * kernel)


@functools.lru_cache(maxsize=64)
def _unfolding(size_in: tuple[int, int], kernel: tuple[int, int], dilation: tuple[int, int],
               padding: tuple[int, int], stride: tuple[int, int], device: torch.device,
               dtype: torch.dtype) -> Tensor:
    """U (P, Q·k): U[p, q·k + j] = 1 where input position q feeds output position p at kernel offset j."""
    h, w = size_in
    eye = torch.eye(h * w, device=device, dtype=dtype).reshape(h * w, 1, h, w)
    u = F.unfold(eye, kernel, dilation=dilation, padding=padding, stride=stride)  # (Q, k, P)
    return u.permute(2, 0, 1).reshape(u.shape[2], -1).contiguous()


def _activation_terms(m: nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """φ(z), φ'(z), φ''(z) of an elementwise activation: closed forms where common, else forward-mode products
    along ones (on a copy: an in-place module must not overwrite z)."""
    if isinstance(m, nn.Sigmoid):
        s = torch.sigmoid(z)
        d1 = s * (1 - s)
        return s, d1, d1 * (1 - 2 * s)
    if isinstance(m, nn.Tanh):
        t = torch.tanh(z)
        d1 = 1 - t * t
        return t, d1, -2 * t * d1
    if isinstance(m, nn.ReLU | nn.LeakyReLU):
        slope = m.negative_slope if isinstance(m, nn.LeakyReLU) else 0.0
        positive = z > 0
        d1 = torch.where(positive, z.new_ones(()), z.new_full((), slope))  # the slope in z's precision
        return z * d1, d1, torch.zeros_like(z)
    ones = torch.ones_like(z)

    def first(u: Tensor) -> tuple[Tensor, Tensor]:
        return torch.func.jvp(lambda v: m(v.clone()), (u,), (ones,))

    (value, d1), (_, d2) = torch.func.jvp(first, (z,), (ones,))
    return value, d1, d2


class ChainProducts:
    """Per-sample gradients and Jacobian columns on the chain's current weights: what does not depend on the
    probes (each convolution's dense matrix) is formed here, once; build one per set of weights and call
    :meth:`columns` per block of probes and tangents.

    ``reuse``: the columns, the gradients and the temporaries live in buffers kept with the chain (one model's
    cache entry) and reused by every later call — each call's results are overwritten by the next, so the caller
    must consume them first. Megabyte buffers allocated afresh are mapped and zero-filled by the kernel at
    their first touch, which costs as much as the products here."""

    def __init__(self, chain: Chain, reuse: bool = False):
        self.chain, self.reuse = chain, reuse
        self.first_affine = next(i for i, m in enumerate(chain.modules) if isinstance(m, AFFINE))
        with torch.no_grad():
            self.dense = {id(m): _dense(m, shape) for m, shape in zip(chain.modules, chain.input_shapes, strict=True)
                          if isinstance(m, nn.Conv2d)}
        # a convolution's output shape is the next module's input (the chain ends in logits, never a convolution)
        self.out_shapes = {id(m): chain.input_shapes[i + 1] for i, m in enumerate(chain.modules)
                           if isinstance(m, nn.Conv2d)}

    def _buffer(self, name: str, shape: tuple[int, ...], like: Tensor, zero: bool = False) -> Tensor:
        """A tensor of ``shape`` (``like``'s dtype and device): fresh, or the workspace's (see ``reuse``)."""
        if not self.reuse:
            return like.new_zeros(shape) if zero else like.new_empty(shape)
        size, buffer = math.prod(shape), self.chain.workspace.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != like.dtype or buffer.device != like.device:
            # room to grow: an evaluation of more probes then touches only the new probes' pages, where a buffer
            # allocated afresh faults in every page again. A CPU maps memory at first touch, so room costs
            # nothing until used (4× what is asked); elsewhere twice the last size
            grown = 2 * buffer.numel() if buffer is not None and buffer.dtype == like.dtype else 0
            room = ROOM_ON_CPU * size if like.device.type == "cpu" else size
            buffer = self.chain.workspace[name] = like.new_empty(max(room, grown))
        out = buffer[:size].view(shape)
        return out.zero_() if zero else out

    def reserve(self, probes: int, tangents: int, like: Tensor) -> None:
        """Touch the reused buffers of ``probes`` probes along ``tangents`` tangents now (a warm-up's work), so
        that their first touch is not part of the first evaluation of that many probes (and of its price)."""
        size = self.chain.size
        # a convolution's temporaries hold a weight's worth of numbers per probe and tangent
        weight = max((m.weight.numel() for m in self.chain.modules if isinstance(m, nn.Conv2d)), default=0)
        self._buffer("columns", (probes, tangents, size), like, zero=True)
        self._buffer("gradients", (probes, size), like, zero=True)
        if weight:
            self._buffer("own", (probes * tangents * weight,), like, zero=True)
            self._buffer("moved", (probes * tangents * weight,), like, zero=True)

    def _linear_part(self, m: nn.Module, v: Tensor) -> Tensor:
        """The layer without its bias on ``v`` (batch, r, in...) → (batch, r, out...)."""
        if isinstance(m, nn.Linear):
            return v @ m.weight.T
        matrix = self.dense[id(m)]
        out = v.reshape(-1, matrix.shape[1]) @ matrix.T
        return out.reshape(*v.shape[:2], m.out_channels, -1)

    def _affine(self, m: nn.Module, h: Tensor) -> Tensor:
        """The layer on the probes ``h`` (n, in...): a convolution as a GEMM with its dense matrix (a library
        convolution picks and compiles its kernel for every new batch size: every new probe count)."""
        if isinstance(m, nn.Linear):
            return m(h)
        matrix = self.dense[id(m)]
        out = (h.reshape(h.shape[0], -1) @ matrix.T).reshape(h.shape[0], m.out_channels, -1)
        if m.bias is not None:
            out = out + m.bias.detach()[:, None]
        return out.reshape(h.shape[0], *self.out_shapes[id(m)])

    def _adjoint(self, m: nn.Module, v: Tensor, shape_in: tuple[int, ...]) -> Tensor:
        """The transpose of the layer's linear part on ``v`` (batch, out...) → (batch, in...)."""
        if isinstance(m, nn.Linear):
            return v @ m.weight
        return (v.reshape(v.shape[0], -1) @ self.dense[id(m)]).reshape(v.shape[0], *shape_in)

    def columns(self, x: Tensor, y: Tensor, tangents: Tensor) -> tuple[Tensor, Tensor]:
        """``(g, columns)`` of probes ``x`` (n, ...) with class labels ``y`` (n,) along ``tangents`` (r, ...) shared
        by the probes: gradients g_i (n, d_θ) and columns J_i t_j (n, r, d_θ)."""
        chain, r, n = self.chain, tangents.shape[0], x.shape[0]
        g = self._buffer("gradients", (n, chain.size), x, zero=chain.unused)
        cols = self._buffer("columns", (n, r, chain.size), x, zero=chain.unused)
        with torch.no_grad():
            # the tangents are one batch row, shared by the probes
            h, dh, saved = x, tangents.reshape(1, r, *x.shape[1:]).contiguous(), []
            for m in chain.modules:
                shape_out = None
                if isinstance(m, AFFINE):
                    saved.append((h, dh, None))
                    h, dh = self._affine(m, h), self._linear_part(m, dh)
                    shape_out = h.shape[1:]
                elif _is_activation(m):
                    value, d1, d2 = _activation_terms(m, h)
                    saved.append((h, dh, (d1, d2)))
                    h, dh = value, d1.unsqueeze(1) * dh
                else:  # Identity, Dropout in eval mode, Flatten: the same linear map on the tangents
                    saved.append((h, dh, None))
                    h = m(h)
                    shape_out = h.shape[1:]
                if shape_out is not None:
                    dh = dh.reshape(dh.shape[0], r, *shape_out)
            # δ = ∂L/∂logits = softmax − onehot, and its tangent (diag p − ppᵀ) ż
            p = torch.softmax(h, dim=1)
            delta = p.clone()
            delta[torch.arange(n, device=x.device), y] -= 1
            ddelta = p.unsqueeze(1) * (dh - (p.unsqueeze(1) * dh).sum(-1, keepdim=True))
            for index in range(len(chain.modules) - 1, -1, -1):
                m, (a, da, derivatives) = chain.modules[index], saved[index]
                shape_in = chain.input_shapes[index]
                if isinstance(m, AFFINE):
                    self._parameter_rows(m, a, da, delta, ddelta, g, cols, first=index == self.first_affine)
                    if index == self.first_affine:
                        break  # no parameters before it
                    delta = self._adjoint(m, delta, shape_in)
                    ddelta = self._adjoint(m, ddelta.reshape(n * r, -1), shape_in).reshape(n, r, *shape_in)
                elif derivatives is not None:
                    d1, d2 = derivatives
                    ddelta = d1.unsqueeze(1) * ddelta + (d2 * delta).unsqueeze(1) * da
                    delta = d1 * delta
                else:
                    delta, ddelta = delta.reshape(n, *shape_in), ddelta.reshape(n, r, *shape_in)
        return g, cols

    def _parameter_rows(self, m: nn.Module, a: Tensor, da: Tensor, delta: Tensor, ddelta: Tensor, g: Tensor,
                        cols: Tensor, first: bool = False) -> None:
        """The layer's rows of g_i = B(a, δ) and of J_i t = B(ȧ, δ) + B(a, δ̇), each written once into its slice
        of ``g`` and ``cols`` (``first``: the chain's first layer with parameters)."""
        n, r = ddelta.shape[:2]
        w, b, offsets = m.weight, m.bias, self.chain.offsets
        if isinstance(m, nn.Linear):
            if w.requires_grad:
                at, k = offsets[id(w)], w.numel()
                torch.mul(delta.unsqueeze(2), a.unsqueeze(1), out=g[:, at: at + k].view(n, *w.shape))
                rows = cols[:, :, at: at + k].view(n, r, *w.shape)
                torch.mul(ddelta.unsqueeze(3), a.reshape(n, 1, 1, -1), out=rows)
                rows.addcmul_(delta.reshape(n, 1, -1, 1), da.unsqueeze(2))
            bias, bias_tangent = delta, ddelta
        else:
            c_out, c_in = w.shape[:2]
            kernel = w.shape[2] * w.shape[3]
            p_out, q_in = delta.shape[2] * delta.shape[3], a.shape[2] * a.shape[3]
            if w.requires_grad:
                at, k = offsets[id(w)], w.numel()
                unfolded = F.unfold(a, w.shape[2:], dilation=m.dilation, padding=m.padding, stride=m.stride)
                unfolded = unfolded.transpose(1, 2)  # (n, P, i·k)
                g[:, at: at + k] = (delta.reshape(n, c_out, p_out) @ unfolded).reshape(n, k)
                # B(a, δ̇): δ̇ (n, r·o, P) against the probe's unfolded input (n, P, i·k)
                own = torch.matmul(ddelta.reshape(n, r * c_out, p_out), unfolded,
                                   out=self._buffer("own", (n, r * c_out, c_in * kernel), a))
                target = cols[:, :, at: at + k].view(n, r, c_out, c_in * kernel)
                if da.shape[0] == 1 and (n > 1 or first):
                    # B(ȧ, δ) with ȧ the probes' shared tangents (the first layer): δ (n·o, P) against the tangents'
                    # own unfolding (P, r·i·k), formed once for every probe. With one probe, deeper layers take the
                    # spread below: unfolding r tangents there costs more than spreading one δ
                    shared = F.unfold(da[0], w.shape[2:], dilation=m.dilation, padding=m.padding, stride=m.stride)
                    shared = shared.permute(2, 0, 1).reshape(p_out, r * c_in * kernel)
                    moved = (delta.reshape(n * c_out, p_out) @ shared).view(n, c_out, r, c_in * kernel)
                    torch.add(own.view(n, r, c_out, c_in * kernel), moved.transpose(1, 2), out=target)
                else:
                    # B(ȧ, δ): δ spread by the unfolding, K (n, Q, o·k), then ȧ (r·i, Q) against it
                    u = _unfolding(tuple(a.shape[2:]), tuple(w.shape[2:]), m.dilation, m.padding, m.stride,
                                   a.device, a.dtype)
                    spread = (delta.reshape(n * c_out, p_out) @ u).reshape(n, c_out, q_in, kernel)
                    spread = spread.permute(0, 2, 1, 3).reshape(n, q_in, c_out * kernel)
                    moved = torch.matmul(da.reshape(n, r * c_in, q_in), spread,
                                         out=self._buffer("moved", (n, r * c_in, c_out * kernel), a))
                    torch.add(own.view(n, r, c_out, c_in, kernel),
                              moved.view(n, r, c_in, c_out, kernel).transpose(2, 3),
                              out=target.view(n, r, c_out, c_in, kernel))
            bias = delta.reshape(n, c_out, p_out).sum(-1)
            bias_tangent = ddelta.reshape(n, r, c_out, p_out).sum(-1)
        if b is not None and b.requires_grad:
            at = offsets[id(b)]
            g[:, at: at + b.numel()] = bias
            cols[:, :, at: at + b.numel()] = bias_tangent


def _dense(m: nn.Conv2d, shape_in: tuple[int, ...]) -> Tensor:
    """The convolution's matrix (o·P, i·Q) from its unfolding operator: M[o p, i q] = Σ_j W[o, i, j] U[p, q, j]."""
    w = m.weight.detach()
    c_out, c_in = w.shape[:2]
    u = _unfolding(tuple(shape_in[1:]), tuple(w.shape[2:]), m.dilation, m.padding, m.stride, w.device, w.dtype)
    p_out, q_in = u.shape[0], math.prod(shape_in[1:])
    kernel = u.shape[1] // q_in
    dense = w.reshape(c_out * c_in, kernel) @ u.reshape(p_out * q_in, kernel).T  # (o·i, P·Q)
    return dense.view(c_out, c_in, p_out, q_in).permute(0, 2, 1, 3).reshape(c_out * p_out, c_in * q_in)
