"""The operator J = ∂²L/∂x∂θ of a model at a batch, as products only (no model knowledge leaves this module).

J δ (θ-space → x-space) and Jᵀ b (x-space → θ-space) are second derivatives of the loss L(x, θ), evaluated
as in eval mode. Single vectors re-traverse one recorded autograd graph of both first derivatives
(:class:`_Linearised`); batches of vectors use ``vmap`` over ``torch.func``. See the package docstring for the
notation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from pl_i2f.gradients import (
    LossFn,
    ParamDict,
    as_flat,
    batch_loss_fn,
    eval_mode,
    flatten,
    trainable_parameters,
)
from pl_i2f.influence.results import ThetaVector


class _Linearised:
    """The mixed second derivatives of L at (x₀, θ), as one recorded autograd graph that every product
    re-traverses.

    One backward pass with ``create_graph=True`` gives both first derivatives, g = ∇_θL and gₓ = ∇ₓL, with
    their graphs. J = ∂²L/∂x∂θ is the mixed block of the Hessian of L, so (symmetry of mixed partials)

    * J δ  = ∂⟨g, δ⟩/∂x  — one backward pass through g's graph;
    * Jᵀ b = ∂⟨gₓ, b⟩/∂θ — one backward pass through gₓ's graph ("double vjp" with the roles of x and θ
      swapped). This is the transpose the paper's code uses (inside its θ-side product); it needs only second
      derivatives, like J δ, and shares the recorded forward/backward with it.

    Why not ``torch.func`` for single vectors: a ``torch.func.vjp`` closure back-propagates with
    ``create_graph=True`` on every call (so it can be transformed again), recording a graph it never uses,
    and ``jvp`` over ``grad`` re-runs the forward and backward passes (primal *and* tangent) for every Jᵀ b;
    this graph roughly halves the cost of JJᵀ b (measurements: ``benchmarks/results/influence.md``, "Design
    measurements"). For several vectors at once the vmapped torch.func products are faster and are kept
    (``GradientJacobian.*_batch``). Entries of a gradient that do not depend on the other variable (an unused
    parameter, a structurally zero block) contribute zero rows/columns and are skipped.
    """

    def __init__(self, loss: Callable[[ParamDict, Tensor, Tensor], Tensor], params: ParamDict, x: Tensor,
                 y: Tensor):
        self.shapes = [p.shape for p in params.values()]
        self.sizes = [p.numel() for p in params.values()]
        with torch.enable_grad():
            # Fresh leaves: the model's parameters are never marked, and no .grad is ever written
            # (``torch.autograd.grad`` only returns gradients).
            self.x = x.detach().requires_grad_(True)
            self.leaves = [p.detach().requires_grad_(True) for p in params.values()]
            value = loss(dict(zip(params, self.leaves)), self.x, y)
            *grads, gx = torch.autograd.grad(value, [*self.leaves, self.x], create_graph=True, allow_unused=True,
                                             materialize_grads=True)
        self.g0 = flatten([g.detach() for g in grads])
        self.live = [i for i, g in enumerate(grads) if g.requires_grad]  # the entries with a graph (to x)
        self.g = [grads[i] for i in self.live]
        self.gx = gx if gx.requires_grad else None

    def matvec(self, delta: Tensor) -> Tensor:
        """J δ for a flat δ (d_θ,) → x-shaped."""
        if not self.g:
            return torch.zeros_like(self.x)
        pieces = delta.split(self.sizes)
        cot = [pieces[i].view(self.shapes[i]) for i in self.live]
        out = torch.autograd.grad(self.g, self.x, cot, retain_graph=True, allow_unused=True)[0]
        return torch.zeros_like(self.x) if out is None else out

    def _rmatvec_parts(self, b: Tensor) -> list[Tensor | None]:
        if self.gx is None:
            return [None] * len(self.sizes)
        return list(torch.autograd.grad(self.gx, self.leaves, b, retain_graph=True, allow_unused=True))

    def rmatvec(self, b: Tensor) -> Tensor:
        """Jᵀ b for an x-shaped b → flat (d_θ,)."""
        parts = self._rmatvec_parts(b)
        return torch.cat([b.new_zeros(n) if t is None else t.reshape(n) for t, n in zip(parts, self.sizes)])

    def gram(self, b: Tensor) -> Tensor:
        """JJᵀ b for an x-shaped b, passing Jᵀ b between the two passes per parameter, never as one flat vector
        (flattening and splitting an 11 M-entry Jᵀ b again is measurably slower on resnet18)."""
        if not self.g:
            return torch.zeros_like(self.x)
        parts = self._rmatvec_parts(b)
        cot = [torch.zeros(self.shapes[i], dtype=b.dtype, device=b.device) if parts[i] is None else parts[i]
               for i in self.live]
        out = torch.autograd.grad(self.g, self.x, cot, retain_graph=True, allow_unused=True)[0]
        return torch.zeros_like(self.x) if out is None else out


class GradientJacobian:
    """J = ∂²L/∂x∂θ (d_x × d_θ) of ``model`` at the batch ``(x, y)``, as products only.

    The model is evaluated functionally (``torch.func.functional_call``) with detached parameters and
    buffers, as if in eval mode; the model itself is never changed. The operator is a snapshot: if the
    model's parameters or buffers are modified in place afterwards (an optimizer step, a BatchNorm update),
    every product raises ``RuntimeError`` — build a new operator.

    x-space vectors have the shape of ``x`` (a flat d_x vector is accepted too); θ-space vectors are flat
    tensors ordered like ``torch.nn.utils.parameters_to_vector`` over the trainable parameters, or a
    name → tensor dict. Everything runs in the dtype and on the device of the model's parameters.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn | None = None):
        params = trainable_parameters(model)
        if not params:
            raise ValueError("the model has no trainable parameters: J is empty")
        ref = next(iter(params.values()))
        if not ref.is_floating_point():
            raise TypeError(f"trainable parameters must be floating point, got {ref.dtype}")
        if not isinstance(x, Tensor) or x.dim() < 1 or x.numel() == 0:
            raise ValueError("x must be a non-empty batch tensor shaped (B, ...)")
        if not isinstance(y, Tensor) or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must be a tensor with one entry per sample: x has {x.shape[0]}, y has shape "
                             f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
        self.model = model
        self.dtype = ref.dtype
        self.device = ref.device
        self.x = x.detach().to(device=self.device, dtype=self.dtype)
        self.y = y.detach().to(self.device, dtype=self.dtype if y.is_floating_point() else y.dtype)
        self.loss_fn = loss_fn
        self._params: ParamDict = params
        self._loss = batch_loss_fn(model, loss_fn)
        # Detached tensors share their version counter with the originals: an in-place update of the model
        # after this point is detected (the cached graph below would otherwise be silently stale).
        self._watched = [*params.values(), *(b.detach() for b in model.buffers())]
        self._versions = [t._version for t in self._watched]
        self.x_shape: tuple[int, ...] = tuple(self.x.shape)
        self.d_x = self.x.numel()
        self.d_theta = sum(p.numel() for p in params.values())
        self._lin: _Linearised | None = None
        self._vjp_fn: Callable | None = None  # torch.func's closure, for the vmapped (batched) J δ only

    # -- internals -------------------------------------------------------------------------------
    def _check_fresh(self) -> None:
        if any(t._version != v for t, v in zip(self._watched, self._versions)):
            raise RuntimeError(
                "the model's parameters or buffers changed in place since this GradientJacobian was built; "
                "build a new operator for the current model"
            )

    def _grad_of_x(self, x: Tensor) -> Tensor:
        """x ↦ ∇_θ L(x, θ) as a flat vector (the map whose Jacobian is Jᵀ)."""
        return flatten(grad(self._loss)(self._params, x, self.y))

    def _linearised(self) -> _Linearised:
        # The first backward pass (with its graph) is shared by every product: built once, on first use.
        if self._lin is None:
            with eval_mode(self.model):
                self._lin = _Linearised(self._loss, self._params, self.x, self.y)
        return self._lin

    def _reverse(self) -> Callable:
        # Batched J δ: ``vmap`` over torch.func's vjp closure beats both autograd's ``is_grads_batched`` on the
        # cached graph and a loop of single products (benchmarks/results/influence.md). Built once, on first use.
        if self._vjp_fn is None:
            with eval_mode(self.model):
                self._vjp_fn = vjp(self._grad_of_x, self.x)[1]
        return self._vjp_fn

    def _x_vector(self, b: Tensor, batched: bool) -> Tensor:
        """An x-space vector (x-shaped or flat) or a batch of them ((k, *x.shape) or (k, d_x)), reshaped."""
        b = torch.as_tensor(b).to(device=self.device, dtype=self.dtype)
        if batched:
            if b.dim() < 1 or b.shape[0] == 0 or b.numel() != b.shape[0] * self.d_x:
                raise ValueError(f"expected a batch of x-space vectors shaped (k, {self.d_x}) or (k, *{self.x_shape}), "
                                 f"got {tuple(b.shape)}")
            return b.reshape(b.shape[0], *self.x_shape)
        if b.numel() != self.d_x:
            raise ValueError(f"x-space vector has {b.numel()} elements, expected d_x = {self.d_x} (x: {self.x_shape})")
        return b.reshape(self.x_shape)

    def _theta_vector(self, delta: ThetaVector) -> Tensor:
        return as_flat(delta, self._params).to(device=self.device, dtype=self.dtype)

    # -- products --------------------------------------------------------------------------------
    @property
    def gradient(self) -> Tensor:
        """g₀ = ∇_θ L(x₀, θ), the clean gradient, flat (a by-product of the first backward pass)."""
        self._check_fresh()
        return self._linearised().g0

    def matvec(self, delta: ThetaVector) -> Tensor:
        """J δ (θ-space → x-space), shaped like x: the vector-Jacobian product of x ↦ ∇_θL(x) with δ."""
        self._check_fresh()
        return self._linearised().matvec(self._theta_vector(delta).detach())

    def rmatvec(self, b: Tensor) -> Tensor:
        """Jᵀ b (x-space → θ-space), flat: d/dt ∇_θL(x + t b) = ∂⟨∇ₓL(x), b⟩/∂θ (mixed partials commute)."""
        self._check_fresh()
        return self._linearised().rmatvec(self._x_vector(b, batched=False).detach())

    def gram(self, b: Tensor) -> Tensor:
        """JJᵀ b (x-space → x-space), shaped like x."""
        self._check_fresh()
        return self._linearised().gram(self._x_vector(b, batched=False).detach())

    def matvec_batch(self, deltas: Tensor) -> Tensor:
        """J δ for a batch of θ-vectors (k, d_θ) → (k, *x.shape), vectorised with ``vmap``."""
        self._check_fresh()
        deltas = torch.as_tensor(deltas).to(device=self.device, dtype=self.dtype)
        if deltas.dim() != 2 or deltas.shape[1] != self.d_theta:
            raise ValueError(f"expected a (k, {self.d_theta}) batch of θ-vectors, got {tuple(deltas.shape)}")
        if deltas.shape[0] == 1:  # one vector: the cached graph, no vmap
            return self.matvec(deltas[0]).unsqueeze(0)
        fn = self._reverse()
        return vmap(lambda d: fn(d)[0])(deltas)

    def rmatvec_batch(self, bs: Tensor) -> Tensor:
        """Jᵀ b for a batch of x-space vectors (k, *x.shape) or (k, d_x) → (k, d_θ)."""
        self._check_fresh()
        bs = self._x_vector(bs, batched=True)
        if bs.shape[0] == 1:  # one vector: the cached graph, no vmap
            return self.rmatvec(bs[0]).unsqueeze(0)
        # Several vectors: vmap of forward-over-reverse shares the primal computation between them; it beats a
        # loop of cached-graph products from k ≈ 8 and loses little below, so one rule for all k ≥ 2.
        with eval_mode(self.model):
            return vmap(lambda t: jvp(self._grad_of_x, (self.x,), (t,))[1])(bs)

    def gram_batch(self, bs: Tensor) -> Tensor:
        """JJᵀ b for a batch of x-space vectors (k, *x.shape) or (k, d_x) → (k, *x.shape)."""
        bs = self._x_vector(bs, batched=True)
        if bs.shape[0] == 1:  # one chain: skip vmap's batching rules
            return self.gram(bs[0]).unsqueeze(0)
        return self.matvec_batch(self.rmatvec_batch(bs))

    def _apply_flat(self, v: Tensor) -> Tensor:
        """(..., d_x) → (..., d_x): JJᵀ on flat vectors with any leading batch shape (for the solvers)."""
        lead = v.shape[:-1]
        return self.gram_batch(v.reshape(-1, self.d_x)).reshape(*lead, self.d_x)

    def __repr__(self) -> str:
        return f"GradientJacobian(d_x={self.d_x}, d_theta={self.d_theta}, x={self.x_shape}, dtype={self.dtype})"
