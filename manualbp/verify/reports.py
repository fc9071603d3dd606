"""Rows and reports: one compared quantity (:class:`Row`), a table of them (:class:`Report`, with
:class:`GradReport` and :class:`TraceReport`), and :func:`compare_tensors`, which turns two tensors into a row.

A row is ``ok`` when every element satisfies ``|actual - expected| <= atol + rtol * |expected|``, the rule of
``torch.testing.assert_close``, with its default tolerances for the dtype (:func:`default_tolerances`) unless
given. Also the plain-text table (:func:`format_table`, :func:`fmt_err`) and the JSON number helpers the other
reports share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["GradReport", "Report", "Row", "TraceReport", "compare_tensors", "default_tolerances", "fmt_err", "format_table"]

# torch.testing.assert_close's defaults (rtol, atol) by dtype; other dtypes compare exactly.
_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
}


def default_tolerances(*dtypes: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` of ``torch.testing.assert_close`` for these dtypes (the loosest of them)."""
    pairs = [_TOLERANCES.get(d, (0.0, 0.0)) for d in dtypes] or [(0.0, 0.0)]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


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
