"""Gradient equivalence: the hand-derived backward against native autograd and finite differences.

Three checks, each returning a report (one row per quantity, with its largest errors) instead of a bool:

- :func:`compare`: a model and its native twin (``model.to_torch()`` or any ``reference`` module) on the
  same batch: the loss, the output, every parameter gradient and the input gradient.
- :func:`trace`: every intermediate of the two-pass algorithm, named as in the notes (z^l, a^l, o, L,
  dL/dL = 1, dL/do, dL/dW^l, dL/db^l, dL/da^l, dL/dz^l), the manual value from ``manualbp.functional``
  against native autograd's (``retain_grad`` on the twin's intermediates).
- :func:`finite_difference_check`: float64 ``gradcheck`` and ``gradgradcheck`` of a model or function,
  with the largest numerical-versus-analytical difference for each input.

:func:`compare_callables` is the engine of :func:`manualbp.testing.assert_gradients_match`: any pair of
callables, outputs and input gradients.

A row is ``ok`` when every element satisfies ``|actual - expected| <= atol + rtol * |expected|``, the rule of
``torch.testing.assert_close``, with its default tolerances for the dtype unless given. ``max_rel_err`` is
the largest absolute error divided by the reference's largest magnitude; ``exact`` means bit-for-bit equal.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from . import functional as F
from .autograd import MLPFunction
from .nn import MLP, CrossEntropyLoss, MSELoss, SquaredErrorLoss

__all__ = [
    "LOSSES",
    "Row",
    "Report",
    "GradReport",
    "TraceReport",
    "FiniteDifferenceReport",
    "compare",
    "compare_callables",
    "compare_tensors",
    "default_tolerances",
    "finite_difference_check",
    "format_table",
    "inject_bug",
    "BUGS",
    "trace",
]

#: The named losses: "cross_entropy" (fused softmax + cross-entropy on logits), "squared_error"
#: (the notes' 1/2 sum_k (o_k - y_k)^2 per example) and "mse" (PyTorch's mean squared error).
LOSSES = ("cross_entropy", "squared_error", "mse")

# torch.testing.assert_close's defaults (rtol, atol) by dtype; other dtypes compare exactly.
_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}

# Cotangents come from their own seed stream, never equal to a tensor the caller drew with torch.manual_seed(seed)
# (a cotangent equal to the input makes v^T x symmetric and hides a transposed weight gradient).
_COTANGENT_SEED = 1_000_003

LossArg = Union[str, Callable[[Tensor, Tensor], Tensor]]


def default_tolerances(*dtypes: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` of ``torch.testing.assert_close`` for these dtypes (the loosest of them)."""
    pairs = [_TOLERANCES.get(d, (0.0, 0.0)) for d in dtypes] or [(0.0, 0.0)]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


# --------------------------------------------------------------------------------------------------
# Rows and reports
# --------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One compared quantity.

    ``value`` and ``reference`` keep the two tensors (not in :meth:`to_dict`); ``note`` says why a row
    could not be compared element by element (shape mismatch, a missing gradient).
    """

    name: str
    shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float
    exact: bool
    ok: bool
    formula: str = ""
    note: str = ""
    value: Optional[Tensor] = field(default=None, repr=False, compare=False)
    reference: Optional[Tensor] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "max_abs_err": _json_float(self.max_abs_err),
            "max_rel_err": _json_float(self.max_rel_err),
            "exact": self.exact,
            "ok": self.ok,
        }
        if self.formula:
            d["formula"] = self.formula
        if self.note:
            d["note"] = self.note
        return d


def _json_float(x: float) -> Union[float, str]:
    """JSON has no inf/nan: write them as strings."""
    return x if math.isfinite(x) else str(x)


def fmt_err(x: float) -> str:
    """An error for a table: 0 as "0", others in 2-digit scientific notation."""
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.2e}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: Optional[str] = None) -> str:
    """A plain aligned text table; ``align`` has one "l" or "r" per column (default: all left)."""
    align = align or "l" * len(headers)
    widths = [max([len(h)] + [len(r[c]) for r in rows]) for c, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align)]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


@dataclass
class Report:
    """Rows of compared quantities; ``ok`` when every row is. ``str()`` is an aligned table."""

    title: str
    rows: list[Row]
    rtol: float
    atol: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def max_abs_err(self) -> float:
        return max((r.max_abs_err for r in self.rows), default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max((r.max_rel_err for r in self.rows), default=0.0)

    @property
    def n_exact(self) -> int:
        return sum(r.exact for r in self.rows)

    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]

    def __getitem__(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row named {name!r}; rows: {', '.join(r.name for r in self.rows)}")

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def table(self, rows: Optional[Sequence[Row]] = None) -> str:
        rows = self.rows if rows is None else rows
        with_formula = any(r.formula for r in rows)
        headers = ["quantity", "shape", "max abs err", "max rel err", "exact", "ok"]
        align = "llrrll"
        if with_formula:
            headers.append("formula")
            align += "l"
        body = []
        for r in rows:
            cells = [
                r.name,
                "x".join(map(str, r.shape)) or "scalar",
                fmt_err(r.max_abs_err),
                fmt_err(r.max_rel_err),
                "yes" if r.exact else "no",
                "ok" if r.ok else "FAIL" + (f" ({r.note})" if r.note else ""),
            ]
            if with_formula:
                cells.append(r.formula)
            body.append(cells)
        return format_table(headers, body, align)

    def summary(self) -> str:
        verdict = "PASS" if self.ok else f"FAIL ({len(self.failures())} of {len(self.rows)} quantities differ)"
        return (
            f"{verdict}: largest abs err {fmt_err(self.max_abs_err)}, largest rel err {fmt_err(self.max_rel_err)}, "
            f"{self.n_exact}/{len(self.rows)} bit-for-bit (rtol={self.rtol:g}, atol={self.atol:g})"
        )

    def __str__(self) -> str:
        head = self.title
        if self.meta:
            head += " (" + ", ".join(f"{k}={v}" for k, v in self.meta.items()) + ")"
        return f"{head}\n{self.table()}\n{self.summary()}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "ok": self.ok,
            "rtol": self.rtol,
            "atol": self.atol,
            "max_abs_err": _json_float(self.max_abs_err),
            "max_rel_err": _json_float(self.max_rel_err),
            "n_exact": self.n_exact,
            "meta": {k: str(v) if isinstance(v, (torch.dtype, torch.device)) else v for k, v in self.meta.items()},
            "rows": [r.to_dict() for r in self.rows],
        }


class GradReport(Report):
    """Result of :func:`compare` and :func:`compare_callables`: outputs and gradients, manual vs reference."""


class TraceReport(Report):
    """Result of :func:`trace`: every intermediate of the two-pass algorithm, manual vs native autograd."""


def compare_tensors(
    name: str,
    actual: Optional[Tensor],
    expected: Optional[Tensor],
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    formula: str = "",
) -> Row:
    """Compare two tensors into a :class:`Row` (None stands for "no gradient", i.e. zeros)."""
    note = ""
    if actual is None and expected is None:
        return Row(name, (), 0.0, 0.0, True, True, formula, "no gradient on either side")
    if actual is None or expected is None:
        present = actual if actual is not None else expected
        assert present is not None
        note = "no gradient from the " + ("manual side" if actual is None else "reference")
        actual = torch.zeros_like(present) if actual is None else actual
        expected = torch.zeros_like(present) if expected is None else expected
    d_rtol, d_atol = default_tolerances(actual.dtype, expected.dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    shape = tuple(expected.shape)
    if actual.shape != expected.shape:
        note = f"shape {tuple(actual.shape)} vs reference {shape}"
        return Row(name, shape, math.inf, math.inf, False, False, formula, note, actual, expected)
    exact = actual.dtype == expected.dtype and bool(torch.equal(actual, expected)) and not note
    if expected.numel() == 0:
        return Row(name, shape, 0.0, 0.0, exact, True, formula, note, actual, expected)
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    diff = (a - e).abs()
    if bool(diff.isnan().any()):
        max_abs = math.nan
    else:
        max_abs = float(diff.max())
    scale = float(e.abs().max())
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    ok = bool((diff <= atol + rtol * e.abs()).all()) and not (math.isnan(max_abs))
    if actual.dtype != expected.dtype:
        note = note or f"dtype {actual.dtype} vs reference {expected.dtype}"
    return Row(name, shape, max_abs, max_rel, exact, ok, formula, note if not ok else "", actual, expected)


# --------------------------------------------------------------------------------------------------
# Losses: the manual module and a native reference for each name
# --------------------------------------------------------------------------------------------------
def _native_squared_error(output: Tensor, target: Tensor, reduction: str) -> Tensor:
    per_example = 0.5 * ((output - target) ** 2).sum(-1)  # the notes' 1/2 sum_k (o_k - y_k)^2
    if reduction == "mean":
        return per_example.mean()
    return per_example.sum() if reduction == "sum" else per_example


def _native_cross_entropy(output: Tensor, target: Tensor, reduction: str) -> Tensor:
    logits = output.reshape(-1, output.shape[-1])
    tgt = target.reshape(-1, output.shape[-1]) if target.is_floating_point() else target.reshape(-1)
    loss = TF.cross_entropy(logits, tgt, reduction=reduction)
    return loss.reshape(output.shape[:-1]) if reduction == "none" else loss


def _check_loss(loss: object, reduction: object) -> None:
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))} or a callable, got {loss!r}")
    elif not callable(loss):
        raise TypeError(f"loss must be a name ({', '.join(LOSSES)}) or a callable, got {type(loss).__name__}")
    if reduction not in F.REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, F.REDUCTIONS))}, got {reduction!r}")


def _loss_pair(loss: LossArg, reduction: str) -> tuple[Callable, Callable]:
    """(manual loss, native reference loss); a callable loss serves both sides."""
    _check_loss(loss, reduction)
    if callable(loss):
        return loss, loss
    manual = {"cross_entropy": CrossEntropyLoss, "squared_error": SquaredErrorLoss, "mse": MSELoss}[loss](reduction)
    native = {
        "cross_entropy": lambda o, y: _native_cross_entropy(o, y, reduction),
        "squared_error": lambda o, y: _native_squared_error(o, y, reduction),
        "mse": lambda o, y: TF.mse_loss(o, y, reduction=reduction),
    }[loss]
    return manual, native


# --------------------------------------------------------------------------------------------------
# compare: a model against its native twin
# --------------------------------------------------------------------------------------------------
def _parameter_names(model: nn.Module) -> dict[str, str]:
    """Display names: W^l / b^l for a manualbp MLP (the notes' superscripts), the state_dict key otherwise."""
    names = {n: f"[{n}]" for n, _ in model.named_parameters()}
    if isinstance(model, MLP):
        for k, (n, _) in enumerate(model.named_parameters()):
            layer = k // 2 + 1 if model.bias else k + 1
            is_bias = model.bias and k % 2 == 1
            names[n] = f"{'b' if is_bias else 'W'}^{layer}"
    return names


def _match_parameters(model: nn.Module, reference: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """Pairs (name, model parameter, reference parameter): by name when the names agree, else by order."""
    mine = list(model.named_parameters())
    theirs = list(reference.named_parameters())
    if [n for n, _ in mine] != [n for n, _ in theirs]:
        by_name = dict(theirs)
        if set(by_name) == {n for n, _ in mine}:
            theirs = [(n, by_name[n]) for n, _ in mine]
        elif len(mine) != len(theirs) or any(p.shape != q.shape for (_, p), (_, q) in zip(mine, theirs)):
            raise ValueError(
                "reference: its parameters do not match the model's: model has "
                f"{[(n, tuple(p.shape)) for n, p in mine]}, reference has {[(n, tuple(p.shape)) for n, p in theirs]}"
            )
    return [(n, p, q) for (n, p), (_, q) in zip(mine, theirs)]


def _run(module: nn.Module, params: Sequence[Tensor], loss_fn: Callable, input: Tensor, target: Tensor):
    """Forward, loss and gradients (of params and a fresh copy of input) without touching any ``.grad``."""
    x = input.detach().clone()
    wrt = list(params)
    if x.is_floating_point():
        x.requires_grad_(True)
        wrt = [x, *wrt]
    output = module(x)
    loss = loss_fn(output, target)
    grads = torch.autograd.grad(loss, wrt, torch.ones_like(loss), allow_unused=True)
    grad_input = grads[0] if x.requires_grad else None
    return loss.detach(), output.detach(), grad_input, list(grads[1:] if x.requires_grad else grads)


def compare(
    model: nn.Module,
    input: Tensor,
    target: Tensor,
    loss: LossArg = "cross_entropy",
    reference: Optional[nn.Module] = None,
    *,
    reduction: str = "mean",
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
) -> GradReport:
    """Run ``model`` and its native twin on one batch; compare the loss, output and every gradient.

    Args:
        model: the module under test (a :class:`manualbp.MLP`, or any module when ``reference`` is given).
        input: a batch for the model; its gradient is compared when it is floating.
        target: the loss's target (class indices or probabilities for cross-entropy, values otherwise).
        loss: "cross_entropy", "squared_error", "mse" (the manual loss module on the model's side, PyTorch's
            ops on the reference's) or a callable ``loss(output, target)`` used on both sides.
        reference: the module to compare against; default ``model.to_torch()``. Parameters are paired by
            name (state_dict keys), or by order when the names differ and the shapes agree.
        reduction: the named loss's reduction ("mean", "sum", "none": then the gradient of the sum).
        rtol, atol: per-element tolerances; default ``torch.testing.assert_close``'s for the dtype.

    Returns:
        A :class:`GradReport` with rows L, o, dL/d<each parameter>, dL/dx. Nothing is written to ``.grad``.

    Example:
        >>> model = MLP(4, [5], 3)
        >>> compare(model, torch.randn(6, 4), torch.randint(0, 3, (6,))).ok
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if reference is None:
        if not hasattr(model, "to_torch"):
            raise TypeError(
                f"reference: {type(model).__name__} has no to_torch(); pass the module to compare with as reference="
            )
        reference = model.to_torch()
    elif not isinstance(reference, nn.Module):
        raise TypeError(f"reference must be an nn.Module, got {type(reference).__name__}")
    for value, name in ((input, "input"), (target, "target")):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    manual_loss, native_loss = _loss_pair(loss, reduction)
    pairs = _match_parameters(model, reference)
    display = _parameter_names(model)
    m_loss, m_out, m_gx, m_grads = _run(model, [p for _, p, _ in pairs], manual_loss, input, target)
    r_loss, r_out, r_gx, r_grads = _run(reference, [q for _, _, q in pairs], native_loss, input, target)
    rows = [
        compare_tensors("L", m_loss, r_loss, rtol, atol),
        compare_tensors("o", m_out, r_out, rtol, atol),
    ]
    for (name, _, _), gm, gr in zip(pairs, m_grads, r_grads):
        rows.append(compare_tensors(f"dL/d{display[name]}", gm, gr, rtol, atol))
    if m_gx is not None or r_gx is not None:
        rows.append(compare_tensors("dL/dx", m_gx, r_gx, rtol, atol))
    d_rtol, d_atol = default_tolerances(m_out.dtype, r_out.dtype)
    meta = {
        "loss": loss if isinstance(loss, str) else getattr(loss, "__name__", type(loss).__name__),
        "reduction": reduction,
        "dtype": m_out.dtype,
        "device": m_out.device,
    }
    return GradReport(
        f"{type(model).__name__} vs {type(reference).__name__}",
        rows,
        d_rtol if rtol is None else rtol,
        d_atol if atol is None else atol,
        meta,
    )


# --------------------------------------------------------------------------------------------------
# trace: every intermediate of the two-pass algorithm, in the notes' notation
# --------------------------------------------------------------------------------------------------
_LOSS_FORMULAS = {
    "squared_error": ("1/2 sum_k (o_k - y_k)^2", "o - y"),
    "mse": ("mean over all elements of (o - y)^2", "2 (o - y) / numel"),
    "cross_entropy": ("-sum_k y_k log softmax(o)_k", "softmax(o) - y"),
}
_LOSS_BACKWARD = {
    "squared_error": F.squared_error_loss_backward,
    "mse": F.mse_loss_backward,
    "cross_entropy": F.cross_entropy_backward,
}
#: sigma'(z) written from the saved output a, as functional.py computes it.
ACTIVATION_DERIVATIVES = {
    "sigmoid": "a (1 - a)",
    "tanh": "(1 - a^2)",
    "relu": "[a > 0]",
    "leaky_relu": "([a > 0] + s [a <= 0])",
    "identity": "1",
}


def _prev(layer: int) -> str:
    """The input of layer ``layer``: x for the first, a^{l-1} above it."""
    return "x" if layer == 1 else f"a^{layer - 1}"


def _reduction_note(loss: str, reduction: str) -> str:
    if reduction == "mean":
        return " (mean over examples)" if loss != "mse" else ""
    return f" ({reduction} over examples)"


def _flatten_batch(model: MLP, input: Tensor, target: Tensor, loss: LossArg) -> tuple[Tensor, Tensor]:
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


def trace(
    model: MLP,
    input: Tensor,
    target: Tensor,
    loss: LossArg = "cross_entropy",
    *,
    reduction: str = "mean",
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
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
    if not isinstance(model, MLP):
        raise TypeError(f"model must be a manualbp.MLP, got {type(model).__name__}")
    for value, name in ((input, "input"), (target, "target")):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    manual_loss, native_loss = _loss_pair(loss, reduction)
    x, y = _flatten_batch(model, input, target, loss)
    specs = model.activation_specs
    n_layers = len(model.linears)
    last = n_layers  # the output layer's superscript
    weights = [lin.weight.detach() for lin in model.linears]
    biases = [lin.bias.detach() if model.bias else None for lin in model.linears]

    # Manual: the formulas of manualbp.functional, nothing else.
    with torch.no_grad():
        forward = F.mlp_forward(x.detach(), weights, biases, specs, return_pre_activations=True)
        o = forward.output
    if isinstance(loss, str):
        with torch.no_grad():
            m_loss = manual_loss(o, y)  # validates o and y, then the functional forward
            base = torch.ones_like(m_loss)  # dL/dL = 1, the base case
            grad_o = _LOSS_BACKWARD[loss](base, o, y, reduction)[0]
    else:
        o_leaf = o.detach().requires_grad_(True)
        m_loss = loss(o_leaf, y)
        base = torch.ones_like(m_loss)
        (grad_o,) = torch.autograd.grad(m_loss, o_leaf, base)
        m_loss = m_loss.detach()
    with torch.no_grad():
        grads = F.mlp_backward(grad_o, x.detach(), weights, forward.hidden, specs, return_intermediates=True)

    # Native autograd on the twin, every intermediate retained.
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

    def cmp(name: str, actual: Optional[Tensor], expected: Optional[Tensor], formula: str) -> Row:
        return compare_tensors(name, actual, expected, rtol, atol, formula)

    lname = loss if isinstance(loss, str) else "callable"
    loss_formula, grad_o_formula = _LOSS_FORMULAS.get(lname, ("loss(o, y)", "autograd of the given loss"))
    note = _reduction_note(lname, reduction) if isinstance(loss, str) else ""
    rows: list[Row] = []
    for layer in range(1, n_layers):
        name, _ = specs[layer - 1]
        rows.append(
            cmp(
                f"z^{layer}", forward.pre_activations[layer - 1], zs[layer - 1], f"W^{layer} {_prev(layer)} + b^{layer}"
            )
        )
        rows.append(cmp(f"a^{layer}", forward.hidden[layer - 1], acts[layer - 1], f"{name}(z^{layer})"))
    rows.append(cmp("o", o, o_ref, f"W^{last} {_prev(last)} + b^{last}"))
    rows.append(cmp("L", m_loss, r_loss, loss_formula + note))
    rows.append(cmp("dL/dL", base, r_loss.grad, "1 (base case)"))
    rows.append(cmp("dL/do", grad_o, o_ref.grad, grad_o_formula + (note if lname != "mse" else "")))
    twin_linears = [m for m in twin if isinstance(m, nn.Linear)]
    for layer in range(n_layers, 0, -1):
        below = "o" if layer == n_layers else f"z^{layer}"
        lin = twin_linears[layer - 1]
        rows.append(
            cmp(f"dL/dW^{layer}", grads.grad_weights[layer - 1], lin.weight.grad, f"(dL/d{below})^T {_prev(layer)}")
        )
        if model.bias:
            rows.append(cmp(f"dL/db^{layer}", grads.grad_biases[layer - 1], lin.bias.grad, f"sum_n dL/d{below}"))
        if layer > 1:
            h_idx = layer - 2
            act_name, _ = specs[h_idx]
            rows.append(cmp(f"dL/da^{layer - 1}", grads.grad_hidden[h_idx], acts[h_idx].grad, f"dL/d{below} W^{layer}"))
            rows.append(
                cmp(
                    f"dL/dz^{layer - 1}",
                    grads.grad_pre_activations[h_idx],
                    zs[h_idx].grad,
                    f"dL/da^{layer - 1} * {ACTIVATION_DERIVATIVES[act_name]}",
                )
            )
    rows.append(cmp("dL/dx", grads.grad_input, x_ref.grad, "dL/dz^1 W^1" if n_layers > 1 else "dL/do W^1"))
    d_rtol, d_atol = default_tolerances(o.dtype)
    meta = {"loss": lname, "reduction": reduction, "dtype": o.dtype, "device": o.device, "batch": x.shape[0]}
    return TraceReport(
        "two-pass trace, manual vs native autograd",
        rows,
        d_rtol if rtol is None else rtol,
        d_atol if atol is None else atol,
        meta,
    )


# --------------------------------------------------------------------------------------------------
# compare_callables: any pair of callables (the engine of testing.assert_gradients_match)
# --------------------------------------------------------------------------------------------------
def _as_tensor_list(out: object, what: str) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(isinstance(t, Tensor) for t in out):
        return list(out)
    raise TypeError(f"{what} must return a tensor or a tuple/list of tensors, got {type(out).__name__}")


def _input_names(fn: Callable, count: int) -> list[str]:
    """The positional parameter names of ``fn`` where they can be read, else input[i]."""
    names = [f"input[{i}]" for i in range(count)]
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
        fn = owner.forward  # MyFunction.apply: name the arguments after forward's
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return names
    if params and params[0].name == "ctx":
        params = params[1:]
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= count and not any(p.kind == p.VAR_POSITIONAL for p in params[:count]):
        return positional[:count]
    return names


def _clone_inputs(inputs: Sequence[object]) -> list[object]:
    return [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t for t in inputs]


def compare_callables(
    fn: Callable[..., Any],
    reference_fn: Callable[..., Any],
    *inputs: Any,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    seed: int = 0,
) -> GradReport:
    """Run ``fn`` and ``reference_fn`` forward and backward on copies of ``inputs``; compare everything.

    Compared: every output, and the gradient of every floating input that requires grad. The backward
    starts from a fixed random cotangent for each output (seeded by ``seed``, the same on both sides), so
    a gradient that happens to hold for an all-ones cotangent (a softmax, a sum) is still tested.
    Non-tensor inputs are passed through unchanged.
    """
    if not callable(fn) or not callable(reference_fn):
        bad = "fn" if not callable(fn) else "reference_fn"
        raise TypeError(f"{bad} must be callable, got {type(fn if bad == 'fn' else reference_fn).__name__}")
    wrt = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad]
    names = _input_names(fn, len(inputs))
    mine, theirs = _clone_inputs(inputs), _clone_inputs(inputs)
    outs_a = _as_tensor_list(fn(*mine), "fn")
    outs_b = _as_tensor_list(reference_fn(*theirs), "reference_fn")
    rows: list[Row] = []
    if len(outs_a) != len(outs_b):
        rows.append(
            Row(
                "outputs",
                (len(outs_b),),
                math.inf,
                math.inf,
                False,
                False,
                note=f"{len(outs_a)} vs {len(outs_b)} outputs",
            )
        )
        outs_a = outs_b = []
    single = len(outs_a) == 1
    for k, (a, b) in enumerate(zip(outs_a, outs_b)):
        rows.append(compare_tensors("output" if single else f"output[{k}]", a.detach(), b.detach(), rtol, atol))
    if wrt:
        gen = torch.Generator().manual_seed(_COTANGENT_SEED + seed)
        cotangents = [
            torch.randn(b.shape, generator=gen, dtype=torch.float64).to(b.device, b.dtype)
            if b.is_floating_point()
            else None
            for b in outs_b
        ]

        def grads(outs: list[Tensor], args: list[object]) -> list[Optional[Tensor]]:
            pairs = [
                (o, v.to(o.dtype))
                for o, v in zip(outs, cotangents)
                if v is not None and o.requires_grad and o.shape == v.shape
            ]
            leaves = [args[i] for i in wrt]
            if not pairs:
                return [None] * len(wrt)
            return list(torch.autograd.grad([o for o, _ in pairs], leaves, [v for _, v in pairs], allow_unused=True))  # type: ignore[arg-type]

        for i, ga, gb in zip(wrt, grads(outs_a, mine), grads(outs_b, theirs)):
            rows.append(compare_tensors(f"grad {names[i]}", ga, gb, rtol, atol))
    dtypes = [t.dtype for t in outs_b if t.is_floating_point()] or [torch.float64]
    d_rtol, d_atol = default_tolerances(*dtypes)
    title = f"{getattr(fn, '__name__', type(fn).__name__)} vs {getattr(reference_fn, '__name__', type(reference_fn).__name__)}"
    return GradReport(title, rows, d_rtol if rtol is None else rtol, d_atol if atol is None else atol)


# --------------------------------------------------------------------------------------------------
# finite_difference_check: float64 gradcheck and gradgradcheck, with the numbers
# --------------------------------------------------------------------------------------------------
@dataclass
class FiniteDifferenceRow:
    """One input: the largest |numerical - analytical| Jacobian entry, first and second order."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    max_rel_diff: float
    grad_grad_max_abs_diff: Optional[float]
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        gg = self.grad_grad_max_abs_diff
        return {
            "name": self.name,
            "shape": list(self.shape),
            "max_abs_diff": _json_float(self.max_abs_diff),
            "max_rel_diff": _json_float(self.max_rel_diff),
            "grad_grad_max_abs_diff": None if gg is None else _json_float(gg),
            "ok": self.ok,
        }


@dataclass
class FiniteDifferenceReport:
    """Result of :func:`finite_difference_check`.

    ``gradcheck`` / ``gradgradcheck`` are the verdicts of ``torch.autograd.gradcheck`` and
    ``gradgradcheck`` (None when not run); each row gives, for one input, the largest difference between
    the central-difference Jacobian and the analytical one (through the backward under test), and for
    second order the same for the Jacobian of a vector-Jacobian product (through the double backward).
    """

    rows: list[FiniteDifferenceRow]
    gradcheck: bool
    gradgradcheck: Optional[bool]
    eps: float
    atol: float
    rtol: float

    @property
    def ok(self) -> bool:
        return self.gradcheck and self.gradgradcheck is not False and all(r.ok for r in self.rows)

    @property
    def max_abs_diff(self) -> float:
        return max((r.max_abs_diff for r in self.rows), default=0.0)

    @property
    def grad_grad_max_abs_diff(self) -> Optional[float]:
        values = [r.grad_grad_max_abs_diff for r in self.rows if r.grad_grad_max_abs_diff is not None]
        return max(values) if values else None

    def __getitem__(self, name: str) -> FiniteDifferenceRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no input named {name!r}; inputs: {', '.join(r.name for r in self.rows)}")

    def __str__(self) -> str:
        body = [
            [
                r.name,
                "x".join(map(str, r.shape)) or "scalar",
                fmt_err(r.max_abs_diff),
                fmt_err(r.max_rel_diff),
                "-" if r.grad_grad_max_abs_diff is None else fmt_err(r.grad_grad_max_abs_diff),
                "ok" if r.ok else "FAIL",
            ]
            for r in self.rows
        ]
        table = format_table(
            ["input", "shape", "max |num - ana|", "rel", "2nd order max |num - ana|", "ok"], body, "llrrrl"
        )
        gg = "not run" if self.gradgradcheck is None else ("passed" if self.gradgradcheck else "FAILED")
        verdict = "PASS" if self.ok else "FAIL"
        return (
            f"finite differences, float64 (eps={self.eps:g}, atol={self.atol:g}, rtol={self.rtol:g})\n{table}\n"
            f"{verdict}: gradcheck {'passed' if self.gradcheck else 'FAILED'}, gradgradcheck {gg}"
        )

    def to_dict(self) -> dict[str, Any]:
        gg = self.grad_grad_max_abs_diff
        return {
            "ok": self.ok,
            "gradcheck": self.gradcheck,
            "gradgradcheck": self.gradgradcheck,
            "eps": self.eps,
            "atol": self.atol,
            "rtol": self.rtol,
            "max_abs_diff": _json_float(self.max_abs_diff),
            "grad_grad_max_abs_diff": None if gg is None else _json_float(gg),
            "rows": [r.to_dict() for r in self.rows],
        }


def _flat(out: object) -> Tensor:
    """All floating outputs, flattened and concatenated (the rows of the Jacobian)."""
    tensors = [t for t in _as_tensor_list(out, "the function") if t.is_floating_point()]
    return torch.cat([t.reshape(-1) for t in tensors])


def _numerical_jacobian(f: Callable[..., Tensor], args: list, i: int, eps: float, requires_grad: bool) -> Tensor:
    """Central differences (f(x + eps e_k) - f(x - eps e_k)) / 2 eps, one column per element of args[i]."""
    base = args[i].detach()
    columns = []
    for k in range(base.numel()):
        values = []
        for sign in (1.0, -1.0):
            shifted = base.clone()
            shifted.view(-1)[k] += sign * eps
            values.append(f(*args[:i], shifted.requires_grad_(requires_grad), *args[i + 1 :]).detach())
        columns.append((values[0] - values[1]) / (2 * eps))
    return torch.stack(columns, dim=1) if columns else base.new_zeros(0, 0)


def _analytical_jacobians(f: Callable[..., Tensor], args: list, idx: list[int]) -> list[Tensor]:
    """Rows of the Jacobian by the backward under test (``torch.autograd.functional.jacobian``)."""

    def of_selected(*selected: Tensor) -> Tensor:
        full = list(args)
        for i, t in zip(idx, selected):
            full[i] = t
        return f(*full)

    jac = torch.autograd.functional.jacobian(of_selected, tuple(args[i].detach() for i in idx))
    return [j.reshape(j.shape[0], -1) for j in jac]


def _diff(numerical: Tensor, analytical: Tensor, atol: float, rtol: float) -> tuple[float, float, bool]:
    if numerical.numel() == 0:
        return 0.0, 0.0, True
    d = (numerical - analytical).abs()
    max_abs = float(d.max())
    scale = float(analytical.abs().max())
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    ok = bool((d <= atol + rtol * numerical.abs()).all())  # gradcheck's criterion
    return max_abs, rel, ok


def finite_difference_check(
    fn: Union[nn.Module, Callable[..., Any]],
    *inputs: Any,
    target: Optional[Tensor] = None,
    loss: Optional[LossArg] = None,
    reduction: str = "mean",
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    grad_grad: bool = True,
    fast_mode: bool = False,
    seed: int = 0,
) -> FiniteDifferenceReport:
    """Float64 ``gradcheck`` and ``gradgradcheck`` of a model or a function, with the numbers.

    Args:
        fn: an ``nn.Module`` (checked in a float64 copy, with respect to its input and every parameter,
            through ``torch.func.functional_call``) or a function of tensors (floating inputs are cast to
            float64; those that require grad are checked).
        inputs: for a module, its one input; for a function, its positional arguments.
        target, loss: for a module, check ``loss(module(input), target)`` instead of the output; ``loss`` is
            a name ("cross_entropy", "squared_error", "mse": manualbp's hand-derived losses) or a callable.
        eps, atol, rtol: as ``torch.autograd.gradcheck`` takes them.
        grad_grad: also run ``gradgradcheck`` and the second-order differences (double backward).
        fast_mode: run gradcheck/gradgradcheck in their fast mode (random projections); the per-input
            numbers are full Jacobians either way.
        seed: seeds the cotangent of the second-order check.

    Returns:
        A :class:`FiniteDifferenceReport`: the verdicts and, per input, the largest difference.
    """
    if isinstance(fn, nn.Module):
        if len(inputs) != 1 or not isinstance(inputs[0], Tensor):
            raise ValueError(f"inputs: a module is checked on one input tensor, got {len(inputs)} inputs")
        if not inputs[0].is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got {inputs[0].dtype}")
        module = copy.deepcopy(fn).to(torch.float64)
        named = list(module.named_parameters())
        keys = [n for n, _ in named]
        display = _parameter_names(fn)
        loss_fn = None
        if loss is not None:
            if target is None:
                raise ValueError("target: a loss needs a target, got None")
            loss_fn = _loss_pair(loss, reduction)[0]
            target = target.to(torch.float64) if target.is_floating_point() else target

        def f(x: Tensor, *params: Tensor) -> Tensor:
            if isinstance(module, MLP):  # the same Function the module calls, minus the per-call checks
                out = MLPFunction.apply(x, module.activation_specs, module.bias, *params)[0]
            else:
                out = torch.func.functional_call(module, dict(zip(keys, params)), (x,))
            return loss_fn(out, target) if loss_fn is not None else out

        args: list[Any] = [inputs[0].detach().to(torch.float64).requires_grad_(True)]
        args += [p.detach().clone().requires_grad_(True) for _, p in named]
        names = ["x", *(display[n] for n in keys)]
        func: Callable[..., Any] = f
    else:
        if not callable(fn):
            raise TypeError(f"fn must be an nn.Module or a callable, got {type(fn).__name__}")
        args = [
            t.detach().to(torch.float64).requires_grad_(t.requires_grad)
            if isinstance(t, Tensor) and t.is_floating_point()
            else t
            for t in inputs
        ]
        names = _input_names(fn, len(inputs))
        func = fn
    idx = [i for i, t in enumerate(args) if isinstance(t, Tensor) and t.requires_grad]
    if not idx:
        raise ValueError("inputs: no floating-point input requires grad, so there is no gradient to check")

    passed = torch.autograd.gradcheck(
        func, tuple(args), eps=eps, atol=atol, rtol=rtol, raise_exception=False, fast_mode=fast_mode
    )
    passed_gg: Optional[bool] = None
    if grad_grad:
        passed_gg = torch.autograd.gradgradcheck(
            func, tuple(args), eps=eps, atol=atol, rtol=rtol, raise_exception=False, fast_mode=fast_mode
        )

    def flat_f(*a: Any) -> Tensor:
        return _flat(func(*a))

    with torch.no_grad():
        numerical = [_numerical_jacobian(flat_f, args, i, eps, False) for i in idx]
    analytical = _analytical_jacobians(flat_f, args, idx)
    second: list[Optional[tuple[float, float, bool]]] = [None] * len(idx)
    if grad_grad:
        gen = torch.Generator().manual_seed(_COTANGENT_SEED + seed)
        cotangent = torch.randn(flat_f(*args).shape, generator=gen, dtype=torch.float64)

        def vjp(*a: Any) -> Tensor:  # v^T J, through the backward under test; its Jacobian needs double backward
            with torch.enable_grad():
                out = flat_f(*a)
                leaves = [a[i] for i in idx]
                gs = torch.autograd.grad(out, leaves, cotangent.to(out.device), create_graph=True, allow_unused=True)
            return torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1) for g, t in zip(gs, leaves)])

        numerical2 = [_numerical_jacobian(vjp, args, i, eps, True) for i in idx]
        analytical2 = _analytical_jacobians(vjp, args, idx)
        second = [_diff(n, a, atol, rtol) for n, a in zip(numerical2, analytical2)]
    rows = []
    for k, i in enumerate(idx):
        max_abs, rel, ok = _diff(numerical[k], analytical[k], atol, rtol)
        s = second[k]
        rows.append(
            FiniteDifferenceRow(
                names[i], tuple(args[i].shape), max_abs, rel, None if s is None else s[0], ok and (s is None or s[2])
            )
        )
    return FiniteDifferenceReport(rows, bool(passed), None if passed_gg is None else bool(passed_gg), eps, atol, rtol)


# --------------------------------------------------------------------------------------------------
# Deliberate bugs, to show (and test) that the checks catch them
# --------------------------------------------------------------------------------------------------
#: name -> what the injected bug does to the hand-derived backward.
BUGS = {
    "sigmoid_missing_derivative": "sigmoid's backward returns dL/da, missing its a (1 - a) factor",
    "weight_grad_transposed": "dL/dW is computed transposed, (dL/dz)^T a_prev -> (a_prev^T dL/dz) reshaped to (out, in)",
}


@contextlib.contextmanager
def inject_bug(name: Optional[str]) -> Iterator[None]:
    """Temporarily break one formula of ``manualbp.functional`` (a testing hook; ``None`` does nothing).

    Everything built on the formulas (``MLPFunction``, the per-op Functions, :func:`trace`) sees the bug
    inside the ``with`` block; the formula is restored on exit. Names: see :data:`BUGS`.
    """
    if name is None:
        yield
        return
    if name not in BUGS:
        raise ValueError(f"bug must be one of {', '.join(map(repr, BUGS))}, got {name!r}")
    if name == "sigmoid_missing_derivative":
        saved = F.ACTIVATIONS["sigmoid"]

        def sigmoid_backward_without_derivative(grad_output: Tensor, output: Tensor) -> Tensor:
            return grad_output  # BUG: the a (1 - a) factor is missing

        F.ACTIVATIONS["sigmoid"] = (saved[0], sigmoid_backward_without_derivative)
        try:
            yield
        finally:
            F.ACTIVATIONS["sigmoid"] = saved
        return
    original = F.linear_backward

    def linear_backward_transposed(grad_output: Tensor, input: Tensor, weight: Tensor, **kwargs: bool):
        grad_input, grad_weight, grad_bias = original(grad_output, input, weight, **kwargs)
        if grad_weight is not None:
            grad_weight = grad_weight.T.reshape(grad_weight.shape)  # BUG: a_prev^T dL/dz, forced into (out, in)
        return grad_input, grad_weight, grad_bias

    F.linear_backward = linear_backward_transposed  # type: ignore[assignment]
    try:
        yield
    finally:
        F.linear_backward = original  # type: ignore[assignment]
