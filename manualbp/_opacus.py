"""Opacus support: per-example gradients of ``manualbp.Linear`` from the hand-derived formula.

Opacus (differential privacy) computes each example's gradient with a per-layer "grad sampler" looked up by
the layer's type. ``register()`` adds manualbp's: dL_n/dW = (dL/dz_n)^T a_prev_n, dL_n/db = dL/dz_n
(``functional.linear_per_example_grads``). It runs by itself the first time an MLP with module hooks runs
(Opacus's hooks) while Opacus is imported, so ``PrivacyEngine.make_private(module=manualbp.MLP(...))`` works
with no extra line; call it yourself for a bare ``manualbp.Linear``.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

from . import functional as F

__all__ = ["register", "register_if_loaded", "compute_linear_grad_sample"]

_registered = False


def compute_linear_grad_sample(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict:
    """Opacus's grad-sampler signature: {parameter: per-example gradient of shape (N, *parameter.shape)}."""
    bias = layer.bias is not None and layer.bias.requires_grad
    grad_weight, grad_bias = F.linear_per_example_grads(backprops, activations[0], needs_bias_grad=bias)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = grad_weight
    if bias:
        out[layer.bias] = grad_bias
    return out


def register() -> None:
    """Register manualbp's grad sampler for ``manualbp.Linear`` with Opacus (imports opacus)."""
    global _registered
    from opacus.grad_sample import register_grad_sampler

    from .nn import Linear

    register_grad_sampler(Linear)(compute_linear_grad_sample)
    _registered = True


def register_if_loaded() -> None:
    """:func:`register`, once, if the program has imported Opacus (never imports it itself)."""
    if not _registered and "opacus" in sys.modules:
        register()
