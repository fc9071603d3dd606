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
callables, their outputs and the first- and second-order gradients of their inputs (nested in lists, tuples
and dicts, positional or keyword, real or complex).

A row is ``ok`` when every element satisfies ``|actual - expected| <= atol + rtol * |expected|``, the rule of
``torch.testing.assert_close``, with its default tolerances for the dtype unless given. ``max_rel_err`` is
the largest absolute error divided by the reference's largest magnitude; ``exact`` means bit-for-bit equal.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union, cast
from unittest import mock

import torch
import torch.nn.functional as TF
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_unflatten

from .. import functional as F
from ..autograd import MLPFunction
from ..nn import MLP, CrossEntropyLoss, MSELoss, SquaredErrorLoss

__all__ = [
    "ACTIVATION_DERIVATIVES",
    "ConfigResult",
    "DTYPES",
    "Explanation",
    "ExplainStep",
    "ExplainValue",
    "FiniteDifferenceRow",
    "LOW_PRECISION_FACTOR",
    "MatrixResult",
    "available_devices",
    "explain",
    "verify_matrix",
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

    ``compared`` is False when the two could not be compared at all (shapes differ, outputs missing): the
    errors are then nan (None in :meth:`to_dict`, "-" in tables), not a number. For a compared row, as
    ``torch.testing.assert_close`` reports it: ``mismatched`` of ``numel`` elements are outside the
    tolerance, and the element of greatest absolute error is at ``worst_index``, where the value under
    test is ``worst_value``, the reference ``worst_reference`` and the tolerance ``allowed``.
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
    compared: bool = True
    worst_index: Optional[tuple[int, ...]] = None
    worst_value: Optional[Union[float, complex]] = None
    worst_reference: Optional[Union[float, complex]] = None
    allowed: Optional[float] = None
    mismatched: Optional[int] = None
    numel: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "max_abs_err": _json_float(self.max_abs_err) if self.compared else None,
            "max_rel_err": _json_float(self.max_rel_err) if self.compared else None,
            "exact": self.exact,
            "ok": self.ok,
        }
        if self.formula:
            d["formula"] = self.formula
        if self.note:
            d["note"] = self.note
        if self.mismatched is not None:
            d["mismatched"], d["numel"] = self.mismatched, self.numel
        if self.worst_index is not None:
            d["worst_index"] = list(self.worst_index)
            d["worst_value"] = _json_number(self.worst_value)
            d["worst_reference"] = _json_number(self.worst_reference)
            d["allowed"] = _json_number(self.allowed)
        return d

    def describe(self) -> str:
        """Why the row fails, in ``torch.testing.assert_close``'s words (empty for a row that is ok)."""
        if self.ok:
            return ""
        if not self.compared:
            return f"{self.name}: not compared, {self.note}"
        head = f"{self.name}: " + (f"{self.note}; " if self.note else "")
        if not self.numel:
            return head.rstrip("; ")
        assert self.mismatched is not None and self.allowed is not None
        return (
            f"{head}Mismatched elements: {self.mismatched} / {self.numel} ({100 * self.mismatched / self.numel:.1f}%)\n"
            f"    Greatest absolute difference: {_fmt_number(self.max_abs_err)} at index {self.worst_index} "
            f"(up to {self.allowed:.3g} allowed): {_fmt_number(self.worst_value)} vs "
            f"{_fmt_number(self.worst_reference)} (reference)"
        )


def _verdict(row: Row) -> str:
    """The table's ok column: ok, FAIL (note), or skipped (note) for a row not compared but not failed."""
    word = "ok" if row.ok and row.compared else ("skipped" if row.ok else "FAIL")
    return word + (f" ({row.note})" if row.note and word != "ok" else "")


def _json_number(x: Optional[Union[float, complex]]) -> Union[None, float, str, list]:
    """A float as :func:`_json_float` writes it, a complex number as [real, imag]."""
    if isinstance(x, complex):
        return [_json_float(x.real), _json_float(x.imag)]
    return None if x is None else _json_float(x)


def _fmt_number(x: Optional[Union[float, complex]]) -> str:
    return "-" if x is None else format(x, ".8g")


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
        """The largest error of the rows that were compared (a shape mismatch has none)."""
        return max((r.max_abs_err for r in self.rows if r.compared), default=0.0)

    @property
    def max_rel_err(self) -> float:
        return max((r.max_rel_err for r in self.rows if r.compared), default=0.0)

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
                fmt_err(r.max_abs_err) if r.compared else "-",
                fmt_err(r.max_rel_err) if r.compared else "-",
                "yes" if r.exact else "no",
                _verdict(r),
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


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    """A complex dtype's real counterpart (whose tolerances it takes, as in ``torch.testing.assert_close``)."""
    return dtype.to_real() if dtype.is_complex else dtype


def _widened(actual: Tensor, expected: Tensor) -> tuple[Tensor, Tensor]:
    """Both on the CPU in float64, or complex128 where either is complex (the imaginary part is kept)."""
    wide = torch.complex128 if actual.is_complex() or expected.is_complex() else torch.float64
    return actual.detach().to("cpu", wide), expected.detach().to("cpu", wide)


def _elementwise(a: Tensor, e: Tensor, rtol: float, atol: float, relative_to_max: bool) -> dict[str, Any]:
    """The errors of ``a`` against ``e`` (same shape, not empty): largest, where, and how many are too large."""
    diff = (a - e).abs()
    scale = float(e.abs().max())
    allowed = atol + rtol * (torch.full_like(diff, scale) if relative_to_max else e.abs())
    has_nan = bool(diff.isnan().any())
    max_abs = math.nan if has_nan else float(diff.max())
    flat = int(torch.argmax(diff.nan_to_num(nan=math.inf)))
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), e.shape))
    mismatched = int((~(diff <= allowed)).sum())  # a nan is a mismatch
    return {
        "max_abs_err": max_abs,
        "max_rel_err": max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf),
        "ok": mismatched == 0,
        "worst_index": index,
        "worst_value": a.reshape(-1)[flat].item(),
        "worst_reference": e.reshape(-1)[flat].item(),
        "allowed": float(allowed.reshape(-1)[flat]),
        "mismatched": mismatched,
        "numel": e.numel(),
    }


def compare_tensors(
    name: str,
    actual: Optional[Tensor],
    expected: Optional[Tensor],
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    formula: str = "",
    relative_to_max: bool = False,
) -> Row:
    """Compare two tensors into a :class:`Row` (None stands for "no gradient", i.e. zeros).

    ``ok``: every element within ``atol + rtol * |expected|`` (``torch.testing.assert_close``'s rule), or
    with ``relative_to_max`` within ``atol + rtol * max |expected|`` (for low precision, where elements
    near zero carry the rounding of the large ones). Complex tensors compare as complex numbers
    (``|actual - expected|`` is the modulus), with the tolerances of their real dtype.

    Returns:
        A :class:`Row` with the largest errors, the worst element (index, both values, its tolerance) and
        the count of mismatched elements; for shapes that differ, a row with ``compared=False``, nan
        errors and the note "shape (a) vs reference (b)".
    """
    note = ""
    if actual is None and expected is None:
        return Row(name, (), 0.0, 0.0, True, True, formula, "no gradient on either side")
    if actual is None or expected is None:
        present = actual if actual is not None else expected
        assert present is not None
        note = "no gradient from the " + ("manual side" if actual is None else "reference")
        actual = torch.zeros_like(present) if actual is None else actual
        expected = torch.zeros_like(present) if expected is None else expected
    d_rtol, d_atol = default_tolerances(_real_dtype(actual.dtype), _real_dtype(expected.dtype))
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    shape = tuple(expected.shape)
    if actual.shape != expected.shape:
        note = f"shape {tuple(actual.shape)} vs reference {shape}"
        return Row(name, shape, math.nan, math.nan, False, False, formula, note, actual, expected, compared=False)
    exact = actual.dtype == expected.dtype and bool(torch.equal(actual, expected)) and not note
    if expected.numel() == 0:
        return Row(name, shape, 0.0, 0.0, exact, True, formula, note, actual, expected, mismatched=0, numel=0)
    errors = _elementwise(*_widened(actual, expected), rtol, atol, relative_to_max)
    if actual.dtype != expected.dtype:
        note = note or f"dtype {actual.dtype} vs reference {expected.dtype}"
    note = "" if errors["ok"] else note
    return Row(name, shape, exact=exact, formula=formula, note=note, value=actual, reference=expected, **errors)


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
    relative_to_max: bool = False,
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
        relative_to_max: judge each row by its largest error against its largest magnitude instead
            (see :func:`compare_tensors`); for bfloat16/float16.

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
    pairs = [pair for pair in _match_parameters(model, reference) if pair[1].requires_grad]  # frozen: no gradient
    display = _parameter_names(model)
    m_loss, m_out, m_gx, m_grads = _run(model, [p for _, p, _ in pairs], manual_loss, input, target)
    r_loss, r_out, r_gx, r_grads = _run(reference, [q for _, _, q in pairs], native_loss, input, target)
    rows = [
        compare_tensors("L", m_loss, r_loss, rtol, atol, relative_to_max=relative_to_max),
        compare_tensors("o", m_out, r_out, rtol, atol, relative_to_max=relative_to_max),
    ]
    for (name, _, _), gm, gr in zip(pairs, m_grads, r_grads):
        rows.append(compare_tensors(f"dL/d{display[name]}", gm, gr, rtol, atol, relative_to_max=relative_to_max))
    if m_gx is not None or r_gx is not None:
        rows.append(compare_tensors("dL/dx", m_gx, r_gx, rtol, atol, relative_to_max=relative_to_max))
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
    if not isinstance(model, MLP):
        raise TypeError(f"model must be a manualbp.MLP, got {type(model).__name__}")
    for value, name in ((input, "input"), (target, "target")):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    manual_loss, native_loss = _loss_pair(loss, reduction)
    x, y = _flatten_batch(model, input, target)
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
        return compare_tensors(name, actual, expected, rtol, atol, formula, relative_to_max)

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


def _leaf_names(fn: Callable, args: Sequence[object], kwargs: dict[str, object]) -> list[str]:
    """A name for each leaf of ``(args, kwargs)``, in ``tree_flatten`` order: the parameter's name (or
    input[i]) or the keyword, then the path inside it, as in ``xs[1]`` or ``d['w']``."""
    positional = _input_names(fn, len(args))
    names = []
    for path, _ in tree_flatten_with_path((tuple(args), kwargs))[0]:
        top, key, *inner = path
        base = positional[key.idx] if top.idx == 0 else str(key.key)  # type: ignore[attr-defined]
        names.append(base + "".join(str(k) for k in inner))
    return names


def _differentiable(t: object) -> bool:
    return isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex()) and t.requires_grad


def _clone_leaves(leaves: Sequence[object]) -> list[object]:
    return [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t for t in leaves]


def _no_gradient_error(leaves: Sequence[object], names: Sequence[str]) -> ValueError:
    tensors = [f"{n} ({t.dtype})" for n, t in zip(names, leaves) if isinstance(t, Tensor)]
    have = "the tensors are " + ", ".join(tensors) if tensors else "there is no tensor among them"
    return ValueError(
        f"inputs: no floating-point or complex input requires grad, so there is no gradient to compare ({have}); "
        "call .requires_grad_() on the inputs whose gradients to check"
    )


def _random_like(t: Tensor, gen: torch.Generator) -> Tensor:
    """Seeded standard normal values of ``t``'s shape, dtype and device (complex normal for a complex ``t``)."""
    wide = torch.complex128 if t.is_complex() else torch.float64
    return torch.randn(t.shape, generator=gen, dtype=wide).to(t.device, t.dtype)


def _vjp(
    outs: Sequence[Tensor], cotangents: Sequence[Optional[Tensor]], wrt: Sequence[Tensor], create_graph: bool = False
) -> list[Optional[Tensor]]:
    """The gradients of ``sum_k <cotangent_k, out_k>`` with respect to ``wrt`` (None where unused)."""
    pairs = [
        (o, v.to(o.dtype)) for o, v in zip(outs, cotangents) if v is not None and o.requires_grad and o.shape == v.shape
    ]
    if not pairs:
        return [None] * len(wrt)
    grads = torch.autograd.grad(
        [o for o, _ in pairs], wrt, [v for _, v in pairs], allow_unused=True, create_graph=create_graph
    )
    return list(grads)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _delayed_error(grads: list[Optional[Tensor]]) -> Optional[str]:
    """The message of a ``once_differentiable`` backward's error node, if a gradient has one: autograd only
    raises it when the node is on a path it follows, and from the inputs it is not."""
    for g in grads:
        node = None if g is None else g.grad_fn
        if node is not None and type(node).__name__ == "Error":
            try:
                node(torch.ones_like(g))
            except RuntimeError as e:
                return _first_line(e)
    return None


def _hvp(
    grads: list[Optional[Tensor]], wrt: list[Tensor], directions: list[Tensor]
) -> Union[list[Optional[Tensor]], str]:
    """The gradients of ``sum_i Re <grad_i, u_i>`` with respect to ``wrt``: second order, through the double
    backward; the error's first line where that is unavailable."""
    terms = [(g.conj() * u).real.sum() for g, u in zip(grads, directions) if g is not None and g.requires_grad]
    if not terms:
        return [None] * len(wrt)  # the gradients do not depend on the inputs: no second order
    error = _delayed_error(grads)
    if error is not None:
        return error
    try:
        return list(torch.autograd.grad(sum(terms), wrt, allow_unused=True))
    except RuntimeError as e:
        return _first_line(e)


def _second_order_rows(
    names: list[str], mine: Union[list, str], theirs: Union[list, str], rtol: Optional[float], atol: Optional[float]
) -> list[Row]:
    """The ``grad^2`` rows; where a side has no double backward, rows that say so (a failure for ``fn``,
    skipped for the reference)."""
    if not isinstance(mine, str) and not isinstance(theirs, str):
        return [compare_tensors(f"grad^2 {n}", a, b, rtol, atol) for n, a, b in zip(names, mine, theirs)]
    if isinstance(theirs, str):
        note, ok = f"reference_fn has no double backward ({theirs})", True
    else:
        note, ok = f"fn has no double backward ({mine}); order=1 compares first order only", False
    return [Row(f"grad^2 {n}", (), math.nan, math.nan, False, ok, note=note, compared=False) for n in names]


def _count_row(count: int, expected: int) -> Row:
    note = f"{count} vs {expected} outputs"
    return Row("outputs", (expected,), math.nan, math.nan, False, False, note=note, compared=False)


def compare_callables(
    fn: Callable[..., Any],
    reference_fn: Callable[..., Any],
    /,
    *inputs: Any,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    seed: int = 0,
    order: int = 2,
    **kwargs: Any,
) -> GradReport:
    """Run ``fn`` and ``reference_fn`` forward and backward on copies of the inputs; compare everything.

    Compared: every output, and the gradient of every floating or complex input tensor that requires grad,
    found inside lists, tuples and dicts too. The backward starts from a fixed random cotangent for each
    output (seeded by ``seed``, the same on both sides; complex for a complex output), so a gradient that
    happens to hold for an all-ones cotangent (a softmax, a sum) is still tested. With ``order=2`` the
    gradients are taken with ``create_graph=True`` and differentiated once more: the gradient of
    ``sum_i Re <grad_i, u_i>`` (random ``u_i``) with respect to each input, which exercises the double
    backward, so a backward that ``.detach()``-es or is not differentiable is caught.

    Args:
        fn: the callable under test (for example ``MyFunction.apply``).
        reference_fn: the reference.
        inputs, kwargs: the positional and keyword arguments of both (``rtol``, ``atol``, ``seed`` and
            ``order`` are this function's own); non-tensors are passed through unchanged.
        rtol, atol: tolerances (default: ``torch.testing.assert_close``'s for the dtype).
        seed: seeds the cotangents and the second-order directions.
        order: 2 (default) compares first- and second-order gradients, 1 first order only.

    Returns:
        A :class:`GradReport`: rows ``output`` (or ``output[k]``), ``grad NAME`` and, for order 2,
        ``grad^2 NAME``, where NAME is the parameter's name or the keyword with the path inside it
        (``grad xs[1]``, ``grad d['w']``). A reference without double backward gives skipped
        ``grad^2`` rows; an ``fn`` without it, failing ones.

    Raises:
        TypeError: ``fn`` or ``reference_fn`` is not callable, or returns something other than a tensor or
            a tuple/list of tensors.
        ValueError: no input requires grad, or ``order`` is not 1 or 2.
    """
    for what, f in (("fn", fn), ("reference_fn", reference_fn)):
        if not callable(f):
            raise TypeError(f"{what} must be callable, got {type(f).__name__}")
    if order not in (1, 2):
        raise ValueError(f"order: expected 1 (gradients) or 2 (and second order), got {order!r}")
    leaves, spec = tree_flatten((tuple(inputs), kwargs))
    names = _leaf_names(fn, inputs, kwargs)
    wrt = [i for i, t in enumerate(leaves) if _differentiable(t)]
    if not wrt:
        raise _no_gradient_error(leaves, names)
    mine, theirs = _clone_leaves(leaves), _clone_leaves(leaves)
    outs_a = _call(fn, mine, spec, "fn")
    outs_b = _call(reference_fn, theirs, spec, "reference_fn")
    rows = [_count_row(len(outs_a), len(outs_b))] if len(outs_a) != len(outs_b) else []
    if not rows:
        single = len(outs_a) == 1
        for k, (a, b) in enumerate(zip(outs_a, outs_b)):
            rows.append(compare_tensors("output" if single else f"output[{k}]", a.detach(), b.detach(), rtol, atol))
        leaves_a, leaves_b = [cast(Tensor, mine[i]) for i in wrt], [cast(Tensor, theirs[i]) for i in wrt]
        rows += _gradient_rows(outs_a, outs_b, leaves_a, leaves_b, [names[i] for i in wrt], order, seed, rtol, atol)
    dtypes = [_real_dtype(t.dtype) for t in outs_b if t.is_floating_point() or t.is_complex()] or [torch.float64]
    d_rtol, d_atol = default_tolerances(*dtypes)
    title = f"{getattr(fn, '__name__', type(fn).__name__)} vs {getattr(reference_fn, '__name__', type(reference_fn).__name__)}"
    return GradReport(title, rows, d_rtol if rtol is None else rtol, d_atol if atol is None else atol)


def _call(f: Callable[..., Any], leaves: list[object], spec: Any, what: str) -> list[Tensor]:
    args, kwargs = tree_unflatten(leaves, spec)
    return _as_tensor_list(f(*args, **kwargs), what)


def _gradient_rows(
    outs_a: list[Tensor],
    outs_b: list[Tensor],
    leaves_a: list[Tensor],
    leaves_b: list[Tensor],
    names: list[str],
    order: int,
    seed: int,
    rtol: Optional[float],
    atol: Optional[float],
) -> list[Row]:
    """The ``grad`` rows (and for order 2 the ``grad^2`` rows) of :func:`compare_callables`."""
    gen = torch.Generator().manual_seed(_COTANGENT_SEED + seed)
    cotangents = [_random_like(b, gen) if b.is_floating_point() or b.is_complex() else None for b in outs_b]
    for v in cotangents:  # order 2: so that a once_differentiable backward marks its gradients (_delayed_error)
        if v is not None:
            v.requires_grad_(order == 2)
    grads_a = _vjp(outs_a, cotangents, leaves_a, create_graph=order == 2)
    grads_b = _vjp(outs_b, cotangents, leaves_b, create_graph=order == 2)
    rows = [compare_tensors(f"grad {n}", ga, gb, rtol, atol) for n, ga, gb in zip(names, grads_a, grads_b)]
    if order == 2:
        directions = [_random_like(t, gen) for t in leaves_b]
        second_a, second_b = _hvp(grads_a, leaves_a, directions), _hvp(grads_b, leaves_b, directions)
        rows += _second_order_rows(names, second_a, second_b, rtol, atol)
    return rows


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
        return (
            f"finite differences, float64 (eps={self.eps:g}, atol={self.atol:g}, rtol={self.rtol:g})\n{table}\n"
            f"{self.verdict()}"
        )

    def verdict(self) -> str:
        """PASS or FAIL, torch's two verdicts, and the inputs whose own numbers fail (which can fail while
        both verdicts pass: ``fast_mode`` projections, or gradcheck's looser reading of the tolerance)."""
        gg = "not run" if self.gradgradcheck is None else ("passed" if self.gradgradcheck else "FAILED")
        gc = "passed" if self.gradcheck else "FAILED"
        text = f"{'PASS' if self.ok else 'FAIL'}: gradcheck {gc}, gradgradcheck {gg}"
        bad = [r.name for r in self.rows if not r.ok]
        if bad:
            inputs = "1 input's numbers exceed" if len(bad) == 1 else f"{len(bad)} inputs' numbers exceed"
            joint = ", but " if self.gradcheck and self.gradgradcheck is not False else "; "
            text += f"{joint}{inputs} atol + rtol * |numerical|: {', '.join(bad)}"
        return text

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
    inside the ``with`` block; the formula is restored on exit. Names: see :data:`BUGS`. Inside the block
    ``MANUALBP_NATIVE=off``: the compiled twins of ``MLPFunction`` and ``CrossEntropyFunction``
    (``manualbp/csrc/module.cpp``) repeat the formulas' kernels and would not see a patched formula.
    """
    if name is None:
        yield
        return
    if name not in BUGS:
        raise ValueError(f"bug must be one of {', '.join(map(repr, BUGS))}, got {name!r}")
    with mock.patch.dict(os.environ, {"MANUALBP_NATIVE": "off"}):
        with _inject_bug(name):
            yield


@contextlib.contextmanager
def _inject_bug(name: str) -> Iterator[None]:
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


# --------------------------------------------------------------------------------------------------
# The verification matrix behind `manualbp verify`
# --------------------------------------------------------------------------------------------------
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def available_devices() -> list[str]:
    """ "cpu", and "cuda" where a CUDA device is visible."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclass
class ConfigResult:
    """One configuration of the matrix: its comparison with autograd, its trace, its finite differences."""

    activation: str
    loss: str
    depth: int
    dtype: str
    device: str
    grad: Optional[GradReport] = None
    trace: Optional[TraceReport] = None
    finite_differences: Optional[FiniteDifferenceReport] = None
    error: Optional[str] = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        if self.error is not None:
            return False
        reports = [r for r in (self.grad, self.trace, self.finite_differences) if r is not None]
        return all(r.ok for r in reports)

    @property
    def name(self) -> str:
        return f"{self.activation}/{self.loss}/depth {self.depth}/{self.dtype}/{self.device}"

    @property
    def autograd_rows(self) -> list[Row]:
        return [r for rep in (self.grad, self.trace) if rep is not None for r in rep.rows]

    def to_dict(self) -> dict[str, Any]:
        return {
            "activation": self.activation,
            "loss": self.loss,
            "depth": self.depth,
            "dtype": self.dtype,
            "device": self.device,
            "ok": self.ok,
            "error": self.error,
            "seconds": round(self.seconds, 4),
            "autograd": None if self.grad is None else self.grad.to_dict(),
            "trace": None if self.trace is None else self.trace.to_dict(),
            "finite_differences": None if self.finite_differences is None else self.finite_differences.to_dict(),
        }


@dataclass
class MatrixResult:
    """All configurations of :func:`verify_matrix`; ``str()`` is one table row per configuration."""

    results: list[ConfigResult]
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def failures(self) -> list[ConfigResult]:
        return [r for r in self.results if not r.ok]

    def table(self) -> str:
        headers = [
            "activation",
            "loss",
            "depth",
            "dtype",
            "device",
            "autograd max abs",
            "max rel",
            "bit-exact",
            "fd64 max abs",
            "fd64 2nd order",
            "result",
        ]
        body = []
        for r in self.results:
            rows = r.autograd_rows
            fd = r.finite_differences
            gg = None if fd is None else fd.grad_grad_max_abs_diff
            body.append(
                [
                    r.activation,
                    r.loss,
                    str(r.depth),
                    r.dtype,
                    r.device,
                    fmt_err(max((x.max_abs_err for x in rows), default=0.0)) if rows else "-",
                    fmt_err(max((x.max_rel_err for x in rows), default=0.0)) if rows else "-",
                    f"{sum(x.exact for x in rows)}/{len(rows)}" if rows else "-",
                    "-" if fd is None else fmt_err(fd.max_abs_diff),
                    "-" if gg is None else fmt_err(gg),
                    "PASS" if r.ok else ("ERROR: " + (r.error or "") if r.error else "FAIL: " + self._why(r)),
                ]
            )
        return format_table(headers, body, "llrllrrrrrl")

    @staticmethod
    def _why(r: ConfigResult) -> str:
        bad = [x.name for x in r.autograd_rows if not x.ok]
        if r.finite_differences is not None and not r.finite_differences.ok:
            bad += [f"fd {x.name}" for x in r.finite_differences.rows if not x.ok] or ["fd"]
        unique = list(dict.fromkeys(bad))
        return ", ".join(unique[:4]) + (", ..." if len(unique) > 4 else "")

    def summary(self) -> str:
        n = len(self.results)
        if self.ok:
            against = "native autograd"
            if self.settings.get("finite_differences", True):
                against += " and float64 finite differences"
            return f"PASS: {n}/{n} configurations match {against} ({self.seconds:.1f} s)"
        bad = self.failures()
        names = ", ".join(r.name for r in bad[:3]) + (", ..." if len(bad) > 3 else "")
        return f"FAIL: {len(bad)} of {n} configurations differ ({names}) ({self.seconds:.1f} s)"

    def __str__(self) -> str:
        return f"{self.table()}\n{self.summary()}"

    def to_dict(self) -> dict[str, Any]:
        from .. import __version__

        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "manualbp": __version__,
            "torch": torch.__version__,
            "settings": self.settings,
            "configurations": [r.to_dict() for r in self.results],
        }


def _make_target(loss: str, n: int, out_features: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> Tensor:
    if loss == "cross_entropy":
        return torch.randint(0, out_features, (n,), generator=gen).to(device)
    return torch.randn(n, out_features, generator=gen, dtype=torch.float64).to(device, dtype)


def _check_choices(values: Sequence[Any], allowed: Sequence[Any], name: str) -> list[Any]:
    values = list(values)
    if not values:
        raise ValueError(f"{name}: expected at least one of {', '.join(map(str, allowed))}, got none")
    for v in values:
        if v not in allowed:
            raise ValueError(f"{name}: expected values from {', '.join(map(str, allowed))}, got {v!r}")
    return values


def _run_config(
    activation: str,
    loss: str,
    depth: int,
    dtype_name: str,
    device: str,
    *,
    in_features: int,
    width: int,
    out_features: int,
    batch: int,
    seed: int,
) -> tuple[GradReport, TraceReport]:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(seed)
    model = MLP(in_features, [width] * depth, out_features, activation, dtype=torch.float64)
    model.to(device=device, dtype=dtype)  # the same weights (rounded) in every dtype
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, in_features, generator=gen, dtype=torch.float64).to(device, dtype)
    y = _make_target(loss, batch, out_features, dtype, device, gen)
    grad, tr = compare(model, x, y, loss), trace(model, x, y, loss)
    if dtype in (torch.bfloat16, torch.float16):
        # Two half-precision computations differ by their rounding, which a bias summed over a batch can make
        # large next to the result; judge both against the float64 truth instead.
        model64 = model.to(torch.float64)
        y64 = y.to(torch.float64) if y.is_floating_point() else y
        truth = trace(model64, x.to(torch.float64), y64, loss)
        for report in (grad, tr):
            _judge_against_truth(report, truth, torch.finfo(dtype).eps)
    return grad, tr


#: A half-precision row passes when the manual value's error against float64 is at most this many times the
#: native value's error, plus this many machine epsilons of the quantity's largest magnitude.
LOW_PRECISION_FACTOR = 4.0


def _judge_against_truth(report: Report, truth: TraceReport, eps: float) -> None:
    """Re-judge low-precision rows: the manual error against float64 within a factor of native autograd's."""
    k = LOW_PRECISION_FACTOR
    for row in report.rows:
        if row.value is None or row.reference is None or row.value.shape != row.reference.shape:
            continue
        t = truth[row.name].reference.detach().to("cpu", torch.float64)
        manual = float((row.value.detach().to("cpu", torch.float64) - t).abs().max()) if t.numel() else 0.0
        native = float((row.reference.detach().to("cpu", torch.float64) - t).abs().max()) if t.numel() else 0.0
        scale = float(t.abs().max()) if t.numel() else 0.0
        row.ok = manual <= k * native + k * eps * scale
        row.note = "" if row.ok else f"error vs float64: manual {manual:.1e}, native {native:.1e}"
    report.meta["judged"] = f"against float64: manual error <= {k:g} x native + {k:g} eps x scale"


def _run_fd(activation: str, loss: str, depth: int, device: str, **kw: int) -> FiniteDifferenceReport:
    torch.manual_seed(kw["seed"])
    model = MLP(kw["in_features"], [kw["width"]] * depth, kw["out_features"], activation, dtype=torch.float64)
    model.to(device)
    gen = torch.Generator().manual_seed(kw["seed"] + 1)
    x = torch.randn(kw["batch"], kw["in_features"], generator=gen, dtype=torch.float64).to(device)
    y = _make_target(loss, kw["batch"], kw["out_features"], torch.float64, device, gen)
    return finite_difference_check(model, x, target=y, loss=loss, fast_mode=True)


@contextlib.contextmanager
def _full_precision_matmul() -> Iterator[None]:
    """TF32 off on CUDA while comparing (restored afterwards)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def verify_matrix(
    activations: Sequence[str] = ("sigmoid", "tanh", "relu", "leaky_relu", "identity"),
    losses: Sequence[str] = LOSSES,
    depths: Sequence[int] = (1, 2),
    dtypes: Sequence[str] = ("float64", "float32"),
    devices: Optional[Sequence[str]] = None,
    *,
    finite_differences: bool = True,
    in_features: int = 3,
    width: int = 4,
    out_features: int = 3,
    batch: int = 4,
    seed: int = 0,
    bug: Optional[str] = None,
    progress: Optional[Callable[[ConfigResult], None]] = None,
) -> MatrixResult:
    """Every configuration (activations x losses x depths x dtypes x devices): :func:`compare` and
    :func:`trace` against native autograd, and :func:`finite_difference_check` of the float64 model.

    ``depth`` is the number of hidden layers (0 is a linear model). The finite-difference check runs once per
    (activation, loss, depth, device), in float64, on the same weights. An exception inside one configuration
    marks it as an error and the matrix goes on. ``bug`` injects one of :data:`BUGS` (a testing hook);
    ``progress`` is called after each configuration.
    """
    activations = _check_choices(activations, sorted(F.ACTIVATIONS), "activations")
    losses = _check_choices(losses, LOSSES, "losses")
    dtypes = _check_choices(dtypes, list(DTYPES), "dtypes")
    devices = available_devices() if devices is None else list(devices)
    for d in devices:
        if d not in available_devices() and not (d.startswith("cuda:") and torch.cuda.is_available()):
            raise ValueError(f"devices: {d!r} is not available here (available: {', '.join(available_devices())})")
    if not devices:
        raise ValueError(f"devices: expected at least one of {', '.join(available_devices())}, got none")
    if not depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in depths):
        raise ValueError(f"depths: expected integers >= 0 (hidden layers), got {list(depths)}")
    sizes = {"in_features": in_features, "width": width, "out_features": out_features, "batch": batch}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    kw = {**sizes, "seed": seed}
    fd_cache: dict[tuple, FiniteDifferenceReport] = {}
    results: list[ConfigResult] = []
    start = _now()
    with _full_precision_matmul(), inject_bug(bug):
        for device in devices:
            for depth in depths:
                for activation in activations:
                    for loss in losses:
                        for dtype_name in dtypes:
                            t0 = _now()
                            result = ConfigResult(activation, loss, depth, dtype_name, device)
                            try:
                                result.grad, result.trace = _run_config(
                                    activation, loss, depth, dtype_name, device, **kw
                                )
                                key = (activation, loss, depth, device)
                                if finite_differences:
                                    if key not in fd_cache:
                                        fd_cache[key] = _run_fd(activation, loss, depth, device, **kw)
                                    result.finite_differences = fd_cache[key]
                            except Exception as exc:  # one broken configuration must not hide the others
                                result.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                            result.seconds = _now() - t0
                            results.append(result)
                            if progress is not None:
                                progress(result)
    settings = {
        "activations": activations,
        "losses": losses,
        "depths": list(depths),
        "dtypes": dtypes,
        "devices": devices,
        "finite_differences": finite_differences,
        "bug": bug,
        **kw,
    }
    return MatrixResult(results, _now() - start, settings)


def _now() -> float:
    import time

    return time.perf_counter()


# --------------------------------------------------------------------------------------------------
# explain: the worked example of the notes, every scalar, on a tiny network
# --------------------------------------------------------------------------------------------------
_SIGMA_PRIME = {
    "sigmoid": "{a} (1 - {a})",
    "tanh": "(1 - {a}^2)",
    "relu": "[{a} > 0]",
    "leaky_relu": "([{a} > 0] + s [{a} <= 0])",
    "identity": "1",
}


@dataclass
class ExplainValue:
    """One scalar: its name with 1-based indices (``dL/dw2_12``), the manual value, autograd's, the check."""

    name: str
    index: tuple[int, ...]
    value: float
    autograd: Optional[float] = None
    ok: Optional[bool] = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "index": list(self.index),
            "value": self.value,
            "autograd": self.autograd,
            "ok": self.ok,
        }


@dataclass
class ExplainStep:
    """One line of the notes: the quantity with its formula, and its value for every index."""

    section: str  # "given", "forward" or "backward"
    quantity: str
    formula: str
    values: list[ExplainValue]

    def to_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "quantity": self.quantity,
            "formula": self.formula,
            "values": [v.to_dict() for v in self.values],
        }


@dataclass
class Explanation:
    """Result of :func:`explain`; render with :meth:`to_text`, :meth:`to_markdown` or :meth:`to_dict`."""

    widths: list[int]
    activation: str
    loss: str
    seed: int
    steps: list[ExplainStep]
    trace: TraceReport

    @property
    def ok(self) -> bool:
        return all(v.ok is not False for s in self.steps for v in s.values)

    def _header(self) -> str:
        return (
            f"manualbp explain: network {'-'.join(map(str, self.widths))}, activation {self.activation}, "
            f"loss {self.loss}, seed {self.seed} (float64; inputs and weights rounded to 2 decimals)"
        )

    def _verdict(self) -> str:
        values = [v for s in self.steps for v in s.values if v.ok is not None]
        bad = [v for v in values if not v.ok]
        if not bad:
            return f"all {len(values)} computed values match native autograd"
        names = ", ".join(v.name for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
        return f"{len(bad)} of {len(values)} computed values differ from native autograd: {names}"

    def to_text(self, check: str = "✓", cross: str = "✗") -> str:
        titles = {
            "given": "given (the example, and the weights)",
            "forward": "1. forward pass",
            "backward": "2. backward pass",
        }
        lines = [self._header(), ""]
        section = None
        for step in self.steps:
            if step.section != section:
                if section is not None:
                    lines.append("")
                section = step.section
                lines.append(titles[section])
            if step.section == "given":
                groups: dict[int, list[ExplainValue]] = {}
                for v in step.values:
                    groups.setdefault(v.index[0] if len(v.index) > 1 else 0, []).append(v)
                note = f"   ({step.formula})" if step.formula else ""
                for k, group in enumerate(groups.values()):
                    vals = "  ".join(f"{v.name} = {v.value:+.2f}" for v in group)
                    label = f"{step.quantity}:" if k == 0 else ""
                    lines.append(f"  {label.ljust(len(step.quantity) + 1)} {vals}" + (note if k == 0 else ""))
                continue
            lines.append(f"  {step.quantity} = {step.formula}")
            width = max(len(v.name) for v in step.values)
            for v in step.values:
                mark = check if v.ok else f"{cross} autograd gives {_num(v.autograd)}"
                lines.append(f"      {v.name.ljust(width)} = {_num(v.value)}  {mark}")
        lines += ["", self._verdict()]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        titles = {"given": "Given", "forward": "1. Forward pass", "backward": "2. Backward pass"}
        lines = [f"**{self._header()}**"]
        section = None
        for step in self.steps:
            if step.section != section:
                section = step.section
                lines += ["", f"### {titles[section]}", ""]
                if section == "given":
                    lines += ["| quantity | values |", "|---|---|"]
                else:
                    lines += ["| quantity | formula | value | autograd | check |", "|---|---|---|---|---|"]
            if step.section == "given":
                vals = ", ".join(f"`{v.name}` = {v.value:+.2f}" for v in step.values)
                lines.append(f"| `{step.quantity}` | {vals} |")
                continue
            for k, v in enumerate(step.values):
                formula = f"`{step.quantity} = {step.formula}`" if k == 0 else ""
                mark = "✓" if v.ok else "✗"
                lines.append(f"| `{v.name}` | {formula} | {_num(v.value)} | {_num(v.autograd)} | {mark} |")
        lines += ["", self._verdict()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "widths": self.widths,
            "activation": self.activation,
            "loss": self.loss,
            "seed": self.seed,
            "ok": self.ok,
            "steps": [s.to_dict() for s in self.steps],
        }


def _num(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:+.6f}" if abs(x) >= 1e-4 else f"{x:+.4e}"


def _sub(indices: Sequence[int]) -> str:
    """1-based subscript digits: 12 for (1, 2), or 1,12 when an index has two digits."""
    return ("," if any(i > 9 for i in indices) else "").join(str(i) for i in indices)


def explain(
    widths: Sequence[int] = (2, 3, 2),
    activation: str = "sigmoid",
    loss: str = "squared_error",
    seed: int = 0,
) -> Explanation:
    """One forward and backward pass of a tiny network, every scalar of the notes' worked example.

    ``widths`` are the layer sizes (input, hidden..., output); with one hidden layer the names are the notes'
    (z_i, a_i, o_k, w1_ij, w2_ki, b1_i, b2_k), deeper networks use superscripts (z^l_i, a^l_i, w^l_ij).
    Inputs, targets and weights are drawn with ``seed`` and rounded to two decimals so that a student can
    redo the arithmetic. Each value comes from :func:`trace` (manualbp.functional's formulas) and carries
    its check against native autograd.
    """
    widths = list(widths) if isinstance(widths, (list, tuple)) else widths
    if (
        not isinstance(widths, list)
        or len(widths) < 2
        or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths)
    ):
        raise ValueError(f"widths: expected at least two positive integers (input, hidden..., output), got {widths!r}")
    if activation not in F.ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(sorted(F.ACTIVATIONS))}, got {activation!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    torch.manual_seed(seed)
    model = MLP(widths[0], widths[1:-1], widths[-1], activation, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p * 100) / 100)
    gen = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(1, widths[0], generator=gen, dtype=torch.float64) * 100) / 100
    if loss == "cross_entropy":
        y = torch.randint(0, widths[-1], (1,), generator=gen)
        y_vec = TF.one_hot(y, widths[-1]).to(torch.float64)
    else:
        y = torch.round(torch.randn(1, widths[-1], generator=gen, dtype=torch.float64) * 100) / 100
        y_vec = y
    report = trace(model, x, y, loss)
    n_layers = len(widths) - 1
    notes_style = n_layers == 2

    def unit(lyr: int) -> str:  # the index letter of a layer's units
        return "k" if lyr == n_layers else "i"

    def prev(lyr: int) -> str:  # the index letter of a layer's inputs
        return "j" if lyr == 1 or lyr < n_layers else "i"

    def w(lyr: int) -> str:
        return f"w{lyr}" if notes_style else f"w^{lyr}"

    def b(lyr: int) -> str:
        return f"b{lyr}" if notes_style else f"b^{lyr}"

    def z(lyr: int) -> str:
        return "o" if lyr == n_layers else ("z" if notes_style else f"z^{lyr}")

    def a(lyr: int) -> str:
        return "x" if lyr == 0 else ("a" if notes_style else f"a^{lyr}")

    def elements(base: str, t: Tensor, checked: Optional[Tensor] = None) -> list[ExplainValue]:
        """One value per element; a (1, n) per-example tensor (the batch of one) is indexed by n only."""
        t = t.detach()
        if t.dim() == 2 and t.shape[0] == 1 and not base.startswith(("w", "dL/dw")):
            t = t[0]
        ref = None if checked is None else checked.detach().reshape(t.shape)
        out = []
        shape = tuple(t.shape)
        flat = t.reshape(-1)
        for k in range(flat.numel()):
            index = tuple(int(i) + 1 for i in _unravel(k, shape))
            name = f"{base}_{_sub(index)}" if index else base
            value = float(flat[k])
            if ref is None:
                out.append(ExplainValue(name, index, value))
            else:
                r = float(ref.reshape(-1)[k])
                ok = abs(value - r) <= report.atol + report.rtol * abs(r)
                out.append(ExplainValue(name, index, value, r, ok))
        return out

    def row(name: str) -> tuple[Tensor, Tensor]:
        rw = report[name]
        assert rw.value is not None and rw.reference is not None
        return rw.value, rw.reference

    steps: list[ExplainStep] = []
    steps.append(ExplainStep("given", "x_j", "", elements("x", x)))
    target_note = (
        f"class {int(y[0]) + 1} of {widths[-1]}: y_k = 1 for k = {int(y[0]) + 1}" if loss == "cross_entropy" else ""
    )
    steps.append(ExplainStep("given", "y_k", target_note, elements("y", y_vec)))
    for lyr, lin in enumerate(model.linears, start=1):
        steps.append(ExplainStep("given", f"{w(lyr)}_{unit(lyr)}{prev(lyr)}", "", elements(w(lyr), lin.weight)))
        steps.append(ExplainStep("given", f"{b(lyr)}_{unit(lyr)}", "", elements(b(lyr), lin.bias)))
    # forward
    for lyr in range(1, n_layers + 1):
        u, p = unit(lyr), prev(lyr)
        formula = f"sum_{p} {w(lyr)}_{u}{p} {a(lyr - 1)}_{p} + {b(lyr)}_{u}"
        tr_name = "o" if lyr == n_layers else f"z^{lyr}"
        steps.append(ExplainStep("forward", f"{z(lyr)}_{u}", formula, elements(z(lyr), *row(tr_name))))
        if lyr < n_layers:
            steps.append(
                ExplainStep(
                    "forward",
                    f"{a(lyr)}_{u}",
                    f"sigma({z(lyr)}_{u}),  sigma = {activation}",
                    elements(a(lyr), *row(f"a^{lyr}")),
                )
            )
    K = widths[-1]
    loss_formula = {
        "squared_error": "1/2 sum_k (o_k - y_k)^2",
        "mse": f"1/K sum_k (o_k - y_k)^2,  K = {K}",
        "cross_entropy": "sum_k -y_k log yhat_k,  yhat_k = e^(o_k) / sum_j e^(o_j)",
    }[loss]
    if loss == "cross_entropy":  # the notes' predicted distribution, softmax of the logits
        o_manual, o_native = row("o")
        yhat = ExplainStep(
            "forward",
            "yhat_k",
            "e^(o_k) / sum_j e^(o_j)",
            elements("yhat", F.softmax(o_manual), torch.softmax(o_native, dim=-1)),
        )
        steps.append(yhat)
        loss_formula = "sum_k -y_k log yhat_k"
    steps.append(ExplainStep("forward", "L", loss_formula, elements("L", *row("L"))))
    # backward
    steps.append(ExplainStep("backward", "dL/dL", "1  (base case)", elements("dL/dL", *row("dL/dL"))))
    grad_o = {"squared_error": "o_k - y_k", "mse": "2 (o_k - y_k) / K", "cross_entropy": "yhat_k - y_k"}[loss]
    steps.append(ExplainStep("backward", "dL/do_k", f"dL/dL * ({grad_o})", elements("dL/do", *row("dL/do"))))
    for lyr in range(n_layers, 0, -1):
        u, p = unit(lyr), prev(lyr)
        g = f"dL/d{z(lyr)}_{u}"
        steps.append(
            ExplainStep(
                "backward",
                f"dL/d{w(lyr)}_{u}{p}",
                f"{g} * {a(lyr - 1)}_{p}",
                elements(f"dL/d{w(lyr)}", *row(f"dL/dW^{lyr}")),
            )
        )
        steps.append(ExplainStep("backward", f"dL/d{b(lyr)}_{u}", g, elements(f"dL/d{b(lyr)}", *row(f"dL/db^{lyr}"))))
        if lyr > 1:
            lower = lyr - 1
            steps.append(
                ExplainStep(
                    "backward",
                    f"dL/d{a(lower)}_{p}",
                    f"sum_{u} {g} * {w(lyr)}_{u}{p}",
                    elements(f"dL/d{a(lower)}", *row(f"dL/da^{lower}")),
                )
            )
            a_sym = f"{a(lower)}_{p}"
            deriv = _SIGMA_PRIME[activation].format(a=f"({a_sym})" if "^" in a_sym else a_sym)
            zl = "z" if notes_style else f"z^{lower}"
            steps.append(
                ExplainStep(
                    "backward",
                    f"dL/d{zl}_{p}",
                    f"dL/d{a(lower)}_{p} * sigma'({zl}_{p}) = dL/d{a(lower)}_{p} * {deriv}",
                    elements(f"dL/d{zl}", *row(f"dL/dz^{lower}")),
                )
            )
    return Explanation(widths, activation, loss, seed, steps, report)


def _unravel(k: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        out.append(k % n)
        k //= n
    return tuple(reversed(out))


from .conformance import CHECKS, ConformanceReport, PropertyRow, check_function  # noqa: E402

__all__ += ["CHECKS", "ConformanceReport", "PropertyRow", "check_function"]

from .intermediates import (  # noqa: E402
    IntermediateReport,
    IntermediateRow,
    Recorder,
    assert_intermediates_match,
    record,
)

__all__ += ["IntermediateReport", "IntermediateRow", "Recorder", "assert_intermediates_match", "record"]
