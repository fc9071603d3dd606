"""trace: every intermediate of the two-pass algorithm, in the notes' notation.

:func:`trace` compares every intermediate (z^l, a^l, o, L, dL/dL = 1, dL/do, dL/dW^l, dL/db^l, dL/da^l,
dL/dz^l), the manual value from ``manualbp.functional`` against native autograd's (``retain_grad`` on the
twin's intermediates), each row with its formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .. import functional as F
from ..nn import MLP
from ..registry import ACTIVATION_REGISTRY, LOSS_REGISTRY, View
from .references import LossArg, _loss_pair
from .reports import Row, TraceReport, compare_tensors, default_tolerances

__all__ = ["ACTIVATION_DERIVATIVES", "trace"]

#: sigma'(z) written from the saved output a, as functional.py computes it (a live view of the registry's specs).
ACTIVATION_DERIVATIVES = View(ACTIVATION_REGISTRY, lambda spec: spec.sigma_prime("a"))


def _prev(layer: int) -> str:
    """The input of layer ``layer``: x for the first, a^{l-1} above it."""
    return "x" if layer == 1 else f"a^{layer - 1}"


def _reduction_note(loss: str, reduction: str) -> str:
    if reduction == "mean":
        return " (mean over examples)" if loss != "mse" else ""
    return f" ({reduction} over examples)"


def _flatten_batch(model: MLP, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """(*, in) -> (N, in) with the target to match, as MLPFunction flattens the batch."""
    if input.dim() == 0 or input.shape[-1] != model.in_features:
        raise ValueError(
            f"input: expected shape (*, {model.in_features}) (in_features={model.in_features}), got {tuple(input.shape)}"
        )
    lead = input.shape[:-1]
    x = input.reshape(-1, model.in_features)
    y = target
    if target.shape[: len(lead)] == lead:
        y = target.reshape(x.shape[0], *target.shape[len(lead) :])
    return x, y


@dataclass
class _ManualPass:
    """The manual side: ``manualbp.functional``'s forward with pre-activations, loss, dL/dL, dL/do and backward."""

    forward: F.MLPForward
    loss: Tensor
    base: Tensor
    grad_o: Tensor
    grads: F.MLPGradients

    @property
    def o(self) -> Tensor:
        return self.forward.output


@dataclass
class _NativePass:
    """The reference side: native autograd on the twin, every intermediate retained (zs without o)."""

    twin: nn.Sequential
    x: Tensor
    zs: list[Tensor]
    acts: list[Tensor]
    o: Tensor
    loss: Tensor


def _check_trace_args(model: object, input: object, target: object) -> None:
    """TypeErrors naming ``model``, ``input`` or ``target`` when they are not an MLP and tensors."""
    if not isinstance(model, MLP):
        raise TypeError(f"model must be a manualbp.MLP, got {type(model).__name__}")
    for value, name in ((input, "input"), (target, "target")):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _manual_pass(model: MLP, x: Tensor, y: Tensor, loss: LossArg, manual_loss: Any, reduction: str) -> _ManualPass:
    """The formulas of manualbp.functional, nothing else (dL/do by autograd only for a callable loss)."""
    specs = model.activation_specs
    weights = [lin.weight.detach() for lin in model.linears]
    biases = [lin.bias.detach() if model.bias else None for lin in model.linears]
    with torch.no_grad():
        forward = F.mlp_forward(x.detach(), weights, biases, specs, return_pre_activations=True)
        o = forward.output
    if isinstance(loss, str):
        with torch.no_grad():
            m_loss = manual_loss(o, y)  # validates o and y, then the functional forward
            base = torch.ones_like(m_loss)  # dL/dL = 1, the base case
            grad_o = LOSS_REGISTRY[loss].backward(base, o, y, reduction)[0]
    else:
        o_leaf = o.detach().requires_grad_(True)
        m_loss = loss(o_leaf, y)
        base = torch.ones_like(m_loss)
        (grad_o,) = torch.autograd.grad(m_loss, o_leaf, base)
        m_loss = m_loss.detach()
    with torch.no_grad():
        grads = F.mlp_backward(grad_o, x.detach(), weights, forward.hidden, specs, return_intermediates=True)
    return _ManualPass(forward, m_loss, base, grad_o, grads)


def _native_pass(model: MLP, x: Tensor, y: Tensor, native_loss: Any) -> _NativePass:
    """Native autograd on ``model.to_torch()``, module by module, with ``retain_grad()`` on every z, a, o and L."""
    twin = model.to_torch()
    x_ref = x.detach().clone().requires_grad_(True)
    h = x_ref
    zs: list[Tensor] = []
    acts: list[Tensor] = []
    for module in twin:
        h = module(h)
        if isinstance(module, nn.Identity):
            h = h.view_as(h)  # its own node, so z and a keep separate gradients
        h.retain_grad()
        (zs if isinstance(module, nn.Linear) else acts).append(h)
    o_ref = zs.pop()
    r_loss = native_loss(o_ref, y)
    r_loss.retain_grad()
    r_loss.backward(torch.ones_like(r_loss))
    return _NativePass(twin, x_ref, zs, acts, o_ref, r_loss)


def _forward_rows(model: MLP, m: _ManualPass, r: _NativePass, cmp: Callable[..., Row], loss_formula: str) -> list[Row]:
    """z^l, a^l of each hidden layer, then o and L."""
    n_layers = len(model.linears)
    rows: list[Row] = []
    for layer in range(1, n_layers):
        name, _ = model.activation_specs[layer - 1]
        formula = f"W^{layer} {_prev(layer)} + b^{layer}"
        rows.append(cmp(f"z^{layer}", m.forward.pre_activations[layer - 1], r.zs[layer - 1], formula))
        rows.append(cmp(f"a^{layer}", m.forward.hidden[layer - 1], r.acts[layer - 1], f"{name}(z^{layer})"))
    rows.append(cmp("o", m.o, r.o, f"W^{n_layers} {_prev(n_layers)} + b^{n_layers}"))
    rows.append(cmp("L", m.loss, r.loss, loss_formula))
    return rows


def _backward_rows(model: MLP, m: _ManualPass, r: _NativePass, cmp: Callable[..., Row]) -> list[Row]:
    """From the last layer down: dL/dW^l, dL/db^l, dL/da^{l-1}, dL/dz^{l-1}; finally dL/dx."""
    n_layers = len(model.linears)
    twin_linears = [mod for mod in r.twin if isinstance(mod, nn.Linear)]
    g = m.grads
    rows: list[Row] = []
    for layer in range(n_layers, 0, -1):
        below = "o" if layer == n_layers else f"z^{layer}"
        lin = twin_linears[layer - 1]
        formula = f"(dL/d{below})^T {_prev(layer)}"
        rows.append(cmp(f"dL/dW^{layer}", g.grad_weights[layer - 1], lin.weight.grad, formula))
        if model.bias:
            rows.append(cmp(f"dL/db^{layer}", g.grad_biases[layer - 1], lin.bias.grad, f"sum_n dL/d{below}"))
        if layer > 1:
            h_idx = layer - 2
            act_name, _ = model.activation_specs[h_idx]
            formula = f"dL/d{below} W^{layer}"
            rows.append(cmp(f"dL/da^{layer - 1}", g.grad_hidden[h_idx], r.acts[h_idx].grad, formula))
            formula = f"dL/da^{layer - 1} * {ACTIVATION_DERIVATIVES[act_name]}"
            rows.append(cmp(f"dL/dz^{layer - 1}", g.grad_pre_activations[h_idx], r.zs[h_idx].grad, formula))
    rows.append(cmp("dL/dx", g.grad_input, r.x.grad, "dL/dz^1 W^1" if n_layers > 1 else "dL/do W^1"))
    return rows


def trace(
    model: MLP,
    input: Tensor,
    target: Tensor,
    loss: LossArg = "cross_entropy",
    *,
    reduction: str = "mean",
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    relative_to_max: bool = False,
) -> TraceReport:
    """Every intermediate of the two-pass algorithm, the manual value against native autograd's.

    The manual side runs ``manualbp.functional`` (``mlp_forward`` with the pre-activations, the loss's
    hand-derived backward from dL/dL = 1, ``mlp_backward`` with its intermediates); the reference runs
    ``model.to_torch()`` module by module with ``retain_grad()`` on every z^l, a^l, o and L.

    Rows, in the order of the notes: forward z^l, a^l (each hidden layer), o, L; backward dL/dL, dL/do,
    then from the last layer down dL/dW^l, dL/db^l, dL/da^{l-1}, dL/dz^{l-1}; finally dL/dx. Layers are
    numbered from 1 (x = a^0); with one hidden layer these are the notes' z_i, a_i, o_k, w^2_ki, ...

    Args:
        model: a :class:`manualbp.MLP`.
        input: x of shape (*, in_features); leading dimensions are flattened into the batch N.
        target: as for the loss (class indices or probabilities for cross-entropy).
        loss: "cross_entropy", "squared_error", "mse", or a callable ``loss(o, y)``; for a callable, dL/do
            comes from autograd on that callable (there is no hand-derived formula for it).
        reduction: "mean", "sum" or "none" (then dL/dL = 1 for every example).

    Example:
        >>> report = trace(MLP(2, [3], 2), torch.randn(1, 2), torch.randn(1, 2), loss="squared_error")
        >>> report["dL/dz^1"].ok
        True
    """
    _check_trace_args(model, input, target)
    manual_loss, native_loss = _loss_pair(loss, reduction)
    x, y = _flatten_batch(model, input, target)
    m = _manual_pass(model, x, y, loss, manual_loss, reduction)
    r = _native_pass(model, x, y, native_loss)

    def cmp(name: str, actual: Optional[Tensor], expected: Optional[Tensor], formula: str) -> Row:
        return compare_tensors(name, actual, expected, rtol, atol, formula, relative_to_max)

    lname = loss if isinstance(loss, str) else "callable"
    spec = LOSS_REGISTRY.get(lname)  # a callable loss: no spec
    loss_formula, grad_o_formula = (spec.formula, spec.gradient) if spec else ("loss(o, y)", "autograd of the given loss")
    note = _reduction_note(lname, reduction) if isinstance(loss, str) else ""
    rows = _forward_rows(model, m, r, cmp, loss_formula + note)
    rows.append(cmp("dL/dL", m.base, r.loss.grad, "1 (base case)"))
    rows.append(cmp("dL/do", m.grad_o, r.o.grad, grad_o_formula + (note if lname != "mse" else "")))
    rows += _backward_rows(model, m, r, cmp)
    d_rtol, d_atol = default_tolerances(m.o.dtype)
    meta = {"loss": lname, "reduction": reduction, "dtype": m.o.dtype, "device": m.o.device, "batch": x.shape[0]}
    report_rtol, report_atol = d_rtol if rtol is None else rtol, d_atol if atol is None else atol
    return TraceReport("two-pass trace, manual vs native autograd", rows, report_rtol, report_atol, meta)
