"""The I²F engine: the operator J = ∂²L/∂x∂θ, its spectrum, the Inversion Influence Function and the
expected reconstruction error under a defense's noise (Zhang et al., NeurIPS 2023, arXiv 2309.13016).

Notation (``DESIGN.md``): a private batch x₀ is one vector of d_x = B·C·H·W numbers, θ are the d_θ trainable
parameters, L(x, θ) the loss (mean cross-entropy with the true labels unless ``loss_fn`` is given) evaluated
**as in eval mode**. J is d_x × d_θ:

* ``J δ``  = ∂/∂x ⟨∇_θL(x), δ⟩ (θ-space → x-space): a vector-Jacobian product of x ↦ ∇_θL(x);
* ``Jᵀ b`` = d/dt ∇_θL(x + t b) = ∂/∂θ ⟨∇ₓL(x), b⟩ (x-space → θ-space), by symmetry of the mixed partials:
  a vector-Jacobian product of θ ↦ ∇ₓL. Single vectors go through one recorded graph of both first
  derivatives; batches of vectors use ``vmap`` over ``torch.func`` (``jvp`` over ``grad`` for Jᵀ);
* ``JJᵀ`` is d_x × d_x, so every eigen-problem is solved on the **input side** (same nonzero spectrum as
  JᵀJ, which is d_θ × d_θ).

I²F(δ) = (JJᵀ + εI)⁻¹ J δ is the first-order shift of an L2 gradient-matching attacker's reconstruction when
the released gradient is g₀ + δ, so ‖I²F(δ)‖ estimates the attacker's reconstruction error. With the
eigen-decomposition JJᵀ = Σ λᵢ uᵢuᵢᵀ (J = U S Vᵀ, sᵢ = √λᵢ) and M = (JJᵀ + εI)⁻¹ J:

* bounds: ‖Jδ‖ / (λ_max + ε) ≤ ‖I²F(δ)‖ ≤ ‖Jδ‖ / (λ_min + ε) (the paper plots the lower one with ε = 0);
* isotropic noise δ ~ N(0, σ² I_θ): E‖I²F(δ)‖² = σ² tr(M Mᵀ) = σ² tr((JJᵀ+εI)⁻¹ JJᵀ (JJᵀ+εI)⁻¹)
  = σ² Σᵢ λᵢ / (λᵢ + ε)², which is σ² Σᵢ 1/λᵢ when ε = 0 (and the sum runs over the nonzero λᵢ only: the
  null space of JJᵀ receives nothing from Jδ);
* E‖Jδ‖² = σ² tr(JJᵀ) = σ² Σᵢ λᵢ, so the "expected lower bound" reported here is √E‖Jδ‖² / (λ_max + ε);
* any other noise (DP-SGD, anisotropic, pruning residuals) enters as a sampler and is averaged by Monte Carlo.

Everything is matrix-free over autograd / ``torch.func`` products, built on :mod:`pl_i2f.gradients` (so the
loss, the parameter order and the eval-mode convention are those of the rest of the library).

Modules, in reading order (each depends only on those above it; ``docs/engine.md`` walks through them):

* :mod:`~pl_i2f.influence.settings` — tolerances, iteration limits, rounding floors, as named constants;
* :mod:`~pl_i2f.influence.results` — the result dataclasses, the warnings, the noise-sampler type;
* :mod:`~pl_i2f.influence.damping` — ε as one value object: "undamped, else damped with a warning";
* :mod:`~pl_i2f.influence.krylov` — Lanczos, CG, quadrature, deflated trace over any ``apply`` (no model);
* :mod:`~pl_i2f.influence.operator` — :class:`GradientJacobian`, the products J δ, Jᵀ b, JJᵀ b;
* :mod:`~pl_i2f.influence.spectrum` — eigenpairs of JJᵀ, the dense matrix, J's right singular vectors;
* :mod:`~pl_i2f.influence.estimator` — the one expected-error estimator, for N problems at once;
* :mod:`~pl_i2f.influence.solve` — :func:`i2f` and its bounds;
* :mod:`~pl_i2f.influence.expected` — :func:`expected_i2f` (the estimator with N = 1);
* :mod:`~pl_i2f.influence.per_sample` — :func:`per_sample_leakage` (the estimator with N = batch, ``vmap``).

Nothing here changes the model: no ``.grad`` is written, no buffer is updated, the ``training`` flags are
restored, and randomness comes from an explicit ``torch.Generator`` (a fixed-seed one by default), never
from the global RNG.
"""

from pl_i2f.influence.damping import Damping
from pl_i2f.influence.expected import expected_i2f
from pl_i2f.influence.operator import GradientJacobian
from pl_i2f.influence.per_sample import per_sample_leakage, per_sample_product_seconds
from pl_i2f.influence.results import (
    ConvergenceWarning,
    ExpectedI2F,
    I2FResult,
    InfluenceWarning,
    NoiseSampler,
    PerSampleLeakage,
    Spectrum,
    ThetaVector,
)
from pl_i2f.influence.solve import i2f, i2f_lower_bound, i2f_upper_bound
from pl_i2f.influence.spectrum import gram_matrix, right_singular_vectors, row_space, spectrum, top_eigenvalue

__all__ = [
    "ConvergenceWarning",
    "Damping",
    "ExpectedI2F",
    "GradientJacobian",
    "I2FResult",
    "InfluenceWarning",
    "NoiseSampler",
    "PerSampleLeakage",
    "Spectrum",
    "ThetaVector",
    "expected_i2f",
    "gram_matrix",
    "i2f",
    "i2f_lower_bound",
    "i2f_upper_bound",
    "per_sample_leakage",
    "per_sample_product_seconds",
    "right_singular_vectors",
    "row_space",
    "spectrum",
    "top_eigenvalue",
]
