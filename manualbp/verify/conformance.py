"""Conformance of a custom ``torch.autograd.Function``: every property a Function's users rely on, no reference needed.

:func:`check_function` runs a Function (or a callable built on one) through the checks of :data:`CHECKS`, in
order, and returns a :class:`ConformanceReport`: one row per property, ``pass``, ``fail`` or ``skip`` (with
the reason), the largest error where there is a number, and a one-line hint how to fix a failure.

What ``gradcheck`` and ``torch.library.opcheck`` leave out, and a custom Function gets wrong most often, is
here too: gradients returned for inputs that do not need them, tensors kept on ``ctx`` (which
``saved_tensors_hooks`` and ``save_on_cpu`` never see), outputs that alias inputs, non-contiguous,
zero-size and broadcast (stride-0) inputs, computing in float32 inside a float64 run, and the transforms
(``torch.func.vmap``/``grad``/``jacrev``, forward-mode AD, ``torch.compile(fullgraph=True)``).

Every numerical check runs in float64 on copies of the sample inputs; the cotangents and directions are
seeded random tensors (never all ones: a backward that is right only for a ones cotangent is caught).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union
from unittest import mock

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd import forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .comparison import (
    _COTANGENT_SEED,
    _as_tensor_list,
    _delayed_error,
    _first_line,
    _input_names,
    _random_like,
    _vjp,
    compare_callables,
)
from .finite_differences import _analytical_jacobians, _numerical_jacobian
from .reports import _json_float, compare_tensors, fmt_err, format_table

__all__ = ["CHECKS", "ConformanceReport", "PropertyRow", "builtin_subjects", "check_function", "summary_table"]

PASS, FAIL, SKIP = "pass", "fail", "skip"


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
@dataclass
class PropertyRow:
    """One property: ``status`` is "pass", "fail" or "skip"; ``error`` the largest error where one was
    measured; ``detail`` what was measured or where it went wrong; ``hint`` how to fix a failure (or
    what a skip would need)."""

    name: str
    status: str
    error: Optional[float] = None
    detail: str = ""
    hint: str = ""

    @property
    def ok(self) -> bool:
        return self.status != FAIL

    def to_dict(self) -> dict[str, Any]:
        return {
            "property": self.name,
            "status": self.status,
            "error": None if self.error is None else _json_float(self.error),
            "detail": self.detail,
            "hint": self.hint,
        }


def _short(text: str, width: int = 120) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


@dataclass
class ConformanceReport:
    """Result of :func:`check_function`; ``ok`` when no row fails (skipped rows say why they were skipped)."""

    title: str
    rows: list[PropertyRow]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def failures(self) -> list[PropertyRow]:
        return [r for r in self.rows if not r.ok]

    def __getitem__(self, name: str) -> PropertyRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no property named {name!r}; properties: {', '.join(r.name for r in self.rows)}")

    def __iter__(self) -> Iterator[PropertyRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def table(self, rows: Optional[Sequence[PropertyRow]] = None) -> str:
        body = [
            [r.name, r.status.upper() if r.status == FAIL else r.status, "-" if r.error is None else fmt_err(r.error), _short(r.detail)]
            for r in (self.rows if rows is None else rows)
        ]
        return format_table(["property", "result", "max error", "detail"], body, "llrl")

    def summary(self) -> str:
        counts = {s: sum(r.status == s for r in self.rows) for s in (PASS, FAIL, SKIP)}
        verdict = "PASS" if self.ok else "FAIL"
        return f"{verdict}: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped"

    def hints(self) -> str:
        return "\n".join(f"  {r.name}: {r.hint}" for r in self.failures() if r.hint)

    def __str__(self) -> str:
        text = f"{self.title}\n{self.table()}\n{self.summary()}"
        hints = self.hints()
        return text + (f"\nhow to fix:\n{hints}" if hints else "")

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "ok": self.ok, "meta": self.meta, "rows": [r.to_dict() for r in self.rows]}

    def raise_if_failed(self) -> ConformanceReport:
        """The report itself when nothing fails; else AssertionError with the table and the hints."""
        __tracebackhide__ = True
        if not self.ok:
            raise AssertionError(f"{len(self.failures())} of {len(self.rows)} properties fail\n{self}")
        return self


# --------------------------------------------------------------------------------------------------
# The subject: what is called, on which inputs, and the Function classes it applies
# --------------------------------------------------------------------------------------------------
@dataclass
class _Subject:
    fn: Callable[..., Any]
    name: str
    args: list[Any]
    wrt: list[int]  # positions of the inputs whose gradients are checked
    names: list[str]
    batched: list[int]  # positions of the inputs that carry the batch dimension (dim 0)
    classes: list[type] = field(default_factory=list)  # the autograd.Function classes the call applies
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def inputs(self, dtype: Optional[torch.dtype] = torch.float64, device: Optional[str] = None, requires=None) -> list:
        """Fresh leaf copies of the sample inputs: floating ones cast to ``dtype`` (None keeps theirs),
        requiring grad at ``requires`` (default: the checked inputs)."""
        requires = self.wrt if requires is None else requires
        out: list[Any] = []
        for i, a in enumerate(self.args):
            if not isinstance(a, Tensor):
                out.append(a)
                continue
            t = a.detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if device is not None:
                t = t.to(device)
            out.append(t.clone().requires_grad_(i in requires))
        return out

    def call(self, args: Sequence[Any]) -> list[Tensor]:
        if self.options.get("in_place"):  # a Function that writes into its inputs gets non-leaf copies
            args = [a.clone() if isinstance(a, Tensor) and a.requires_grad else a for a in args]
        return _as_tensor_list(self.fn(*args), "fn")

    def tupled(self, *args: Any) -> tuple[Tensor, ...]:
        """The call as a function of the inputs returning a tuple (for gradcheck and the transforms)."""
        return tuple(self.call(args))

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(_COTANGENT_SEED + self.seed + offset)

    def cotangents(self, outs: Sequence[Tensor], offset: int = 0) -> list[Optional[Tensor]]:
        """A seeded random cotangent for each differentiable output (None for the others)."""
        gen = self.generator(offset)
        return [_random_like(o, gen) if o.requires_grad and o.is_floating_point() else None for o in outs]

    def forward_backward(self, args: Sequence[Any], offset: int = 0) -> tuple[list[Tensor], list[Optional[Tensor]]]:
        """Outputs (detached) and the gradients of the checked inputs for the seeded cotangents."""
        outs = self.call(args)
        grads = _vjp(outs, self.cotangents(outs, offset), [args[i] for i in self.wrt])
        return [o.detach() for o in outs], grads


def _custom_nodes(outs: Sequence[Tensor]) -> list[Any]:
    """The nodes (each a ctx) of custom autograd.Functions in the graph behind ``outs``, in the order met."""
    nodes, seen = [], set()
    stack = [o.grad_fn for o in outs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if getattr(type(node), "_forward_cls", None) is not None:
            nodes.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return nodes


def _function_classes(outs: Sequence[Tensor]) -> list[type]:
    """The custom autograd.Function classes applied to make ``outs``."""
    return list(dict.fromkeys(type(node)._forward_cls for node in _custom_nodes(outs)))


def _function_nodes(outs: Sequence[Tensor], classes: Sequence[type]) -> list[Any]:
    return [node for node in _custom_nodes(outs) if type(node)._forward_cls in classes]


def _overrides(cls: type, name: str) -> bool:
    return getattr(cls, name, None) is not getattr(Function, name, None)


def _functorch_support(classes: Sequence[type], transform: str) -> Optional[str]:
    """Why ``transform`` cannot run these Functions (None when it can)."""
    for cls in classes:
        if not _overrides(cls, "setup_context"):
            return (
                f"not supported: {cls.__name__}.forward takes ctx; torch.func transforms need forward(*inputs) "
                "plus a setup_context(ctx, inputs, output) staticmethod"
            )
        if transform in ("vmap", "jacrev") and not (getattr(cls, "generate_vmap_rule", False) or _overrides(cls, "vmap")):
            return f"not supported: {cls.__name__} has no vmap rule; define a vmap staticmethod or set generate_vmap_rule = True"
    return None


# --------------------------------------------------------------------------------------------------
# Comparing lists of tensors
# --------------------------------------------------------------------------------------------------
def _worst(
    names: Sequence[str], actual: Sequence[Optional[Tensor]], expected: Sequence[Optional[Tensor]], rtol: float, atol: float
) -> PropertyRow:
    """A pass/fail row from element-wise comparisons (``atol + rtol * |expected|``); the detail names the
    worst quantity and element."""
    rows = [compare_tensors(n, a, e, rtol, atol) for n, a, e in zip(names, actual, expected)]
    bad = [r for r in rows if not r.ok]
    compared = [r for r in rows if r.compared]
    error = max((r.max_abs_err for r in compared), default=0.0)
    if not bad:
        return PropertyRow("", PASS, error, f"{len(rows)} quantities within atol={atol:g}, rtol={rtol:g}")
    r = bad[0]
    if not r.compared:
        return PropertyRow("", FAIL, None, f"{r.name}: {r.note}")
    where = f"{r.name} at {list(r.worst_index or ())}: {r.worst_value:.8g} vs {r.worst_reference:.8g}"
    return PropertyRow("", FAIL, error, f"{len(bad)} of {len(rows)} differ; worst {where}")


def _output_names(outs: Sequence[Tensor]) -> list[str]:
    return ["output"] if len(outs) == 1 else [f"output[{k}]" for k in range(len(outs))]


def _grad_names(s: _Subject) -> list[str]:
    return [f"grad {s.names[i]}" for i in s.wrt]


def _same_results(s: _Subject, got, want, rtol: float = 1e-10, atol: float = 1e-12) -> PropertyRow:
    (outs_a, grads_a), (outs_b, grads_b) = got, want
    return _worst(_output_names(outs_b) + _grad_names(s), [*outs_a, *grads_a], [*outs_b, *grads_b], rtol, atol)


# --------------------------------------------------------------------------------------------------
# The checks: each takes the subject and returns one row (its name filled in by check_function)
# --------------------------------------------------------------------------------------------------
def _check_runs(s: _Subject) -> PropertyRow:
    args = s.inputs(dtype=None)
    try:
        outs = s.call(args)
    except RuntimeError as e:
        if "leaf Variable that requires grad has been used in an in-place operation" not in str(e):
            raise
        s.options["in_place"] = True  # it modifies an input (mark_dirty): every check passes it a copy
        outs = s.call(args)
    s.classes = s.classes or _function_classes(outs)
    if not any(o.requires_grad for o in outs):
        return PropertyRow(
            "", FAIL, None, "no output requires grad", "return the result of MyFunction.apply(...), not a detached copy"
        )
    grads = _vjp(outs, s.cotangents(outs), [args[i] for i in s.wrt])
    if len(s.classes) == 1 and all(n == f"input[{i}]" for i, n in enumerate(s.names)):
        s.names = _input_names(s.classes[0].forward, len(s.args))  # a wrapper's *args: name them after forward's
    found = ", ".join(c.__name__ for c in s.classes) or "none (plain autograd ops or C++ nodes)"
    given = sum(g is not None for g in grads)
    return PropertyRow("", PASS, None, f"forward and backward ran; Functions: {found}; {given}/{len(grads)} gradients")


def _locate(outs: Sequence[Tensor], out_names: Sequence[str], s: _Subject, i: int, row: int, col: int) -> str:
    """'d output[idx] / d name[idx]' for an entry of the Jacobian of the flattened, concatenated ``outs``."""
    k = 0
    while row >= outs[k].numel():
        row -= outs[k].numel()
        k += 1
    out_idx = [int(v) for v in torch.unravel_index(torch.tensor(row), outs[k].shape)] if outs[k].dim() else []
    in_idx = [int(v) for v in torch.unravel_index(torch.tensor(col), s.args[i].shape)] if s.args[i].dim() else []
    return f"d {out_names[k]}{out_idx} / d {s.names[i]}{in_idx}"


def _jacobian_gap(
    s: _Subject, f: Callable[..., list[Tensor]], args: list, out_names: Sequence[str], second_order: bool = False
) -> tuple[float, str, bool]:
    """The largest |numerical - analytical| entry of the Jacobians of ``f`` (a list of tensors) with respect
    to the checked inputs, where it is, and whether every entry is within gradcheck's tolerance."""
    eps, atol, rtol = 1e-6, 1e-5, 1e-3  # gradcheck's defaults
    outs = [o.detach() for o in f(*args)]

    def flat(*a: Any) -> Tensor:
        return torch.cat([o.reshape(-1) for o in f(*a)])

    with torch.set_grad_enabled(second_order):  # the second order differentiates a backward: inputs need grad
        numerical = [_numerical_jacobian(flat, args, i, eps, second_order) for i in s.wrt]
    analytical = _analytical_jacobians(flat, args, s.wrt)
    worst, where, ok = 0.0, "", True
    for i, n, a in zip(s.wrt, numerical, analytical):
        if n.numel() == 0:
            continue
        d = (n - a).abs()
        ok = ok and bool((d <= atol + rtol * n.abs()).all())
        k = int(d.argmax())
        if float(d.reshape(-1)[k]) >= worst:
            worst = float(d.reshape(-1)[k])
            r, c = divmod(k, d.shape[1])
            where = f"{_locate(outs, out_names, s, i, r, c)}: analytical {float(a[r, c]):.8g} vs numerical {float(n[r, c]):.8g}"
    return worst, f"largest at {where}" if where else "no elements", ok


def _too_large(s: _Subject, args: list) -> bool:
    return sum(args[i].numel() for i in s.wrt) > s.options["max_jacobian_numel"]


def _check_gradcheck(s: _Subject) -> PropertyRow:
    """Float64 gradcheck, and the largest |numerical - analytical| Jacobian entry with where it is."""
    args = s.inputs()
    passed = torch.autograd.gradcheck(s.tupled, tuple(args), raise_exception=False)
    if _too_large(s, args):
        return PropertyRow("", PASS if passed else FAIL, None, "torch.autograd.gradcheck (inputs too large for the numbers)")

    def floating(*a: Any) -> list[Tensor]:
        return [o for o in s.call(a) if o.is_floating_point()]

    worst, where, ok = _jacobian_gap(s, floating, args, _output_names(floating(*args)))
    status = PASS if passed and ok else FAIL
    hint = "" if status == PASS else "backward's formula is wrong where shown (a transpose, a missing factor or sum)"
    return PropertyRow("", status, worst, where, hint)


def _check_gradgradcheck(s: _Subject) -> PropertyRow:
    """Float64 gradgradcheck, and the largest gap of the Jacobian of J^T v (through the double backward)."""
    args = s.inputs()
    outs = s.call(args)
    cotangents = [None if v is None else v.requires_grad_(True) for v in s.cotangents(outs)]
    error = _delayed_error(_vjp(outs, cotangents, [args[i] for i in s.wrt], create_graph=True))
    if error is not None and "once_differentiable" in error:
        return PropertyRow("", SKIP, None, "backward is @once_differentiable: no double backward, by design")
    try:
        passed = torch.autograd.gradgradcheck(s.tupled, tuple(args), raise_exception=False)
    except RuntimeError as e:
        return PropertyRow("", FAIL, None, _first_line(e), "write backward with differentiable torch ops")
    hint = "" if passed else "backward must be built from differentiable ops (no .detach(), .data, numpy or in-place)"
    if _too_large(s, args):
        return PropertyRow("", PASS if passed else FAIL, None, "torch.autograd.gradgradcheck (inputs too large for the numbers)", hint)

    def vjp(*a: Any) -> list[Tensor]:
        with torch.enable_grad():
            outs = s.call(a)
            grads = _vjp(outs, s.cotangents(outs, offset=600), [a[i] for i in s.wrt], create_graph=True)
        return [torch.zeros_like(a[i]) if g is None else g for i, g in zip(s.wrt, grads)]

    worst, where, ok = _jacobian_gap(s, vjp, args, _grad_names(s), second_order=True)
    return PropertyRow("", PASS if passed and ok else FAIL, worst, where, hint)


def _directional(s: _Subject, args: list, directions: Sequence[Tensor], eps: float = 1e-6) -> list[Tensor]:
    """Central differences of every output along ``directions`` (one per checked input)."""
    sides = []
    for sign in (1.0, -1.0):
        shifted = list(args)
        for i, u in zip(s.wrt, directions):
            shifted[i] = args[i].detach() + sign * eps * u
        with torch.no_grad():
            sides.append(s.call(shifted))
    return [(p - m) / (2 * eps) for p, m in zip(*sides)]


def _check_cotangents(s: _Subject) -> PropertyRow:
    """<J^T v, u> through the backward against <v, J u> by central differences, for random u and v."""
    worst = 0.0
    for trial in range(3):
        args = s.inputs()
        outs = s.call(args)
        vs = s.cotangents(outs, offset=100 + trial)
        gen = s.generator(200 + trial)
        us = [_random_like(args[i], gen) for i in s.wrt]
        grads = _vjp(outs, vs, [args[i] for i in s.wrt])
        lhs = sum(float((g * u).sum()) for g, u in zip(grads, us) if g is not None)
        jus = _directional(s, args, us)
        rhs = sum(float((v * ju).sum()) for v, ju in zip(vs, jus) if v is not None)
        err = abs(lhs - rhs) / max(abs(lhs), abs(rhs), 1.0)
        worst = max(worst, err)
        if err > 1e-6:
            return PropertyRow(
                "", FAIL, err, f"trial {trial}: <grad, u> = {lhs:.10g} but <v, J u> = {rhs:.10g}",
                "the backward holds for some cotangents only: use grad_output element-wise, not its sum or mean",
            )
    return PropertyRow("", PASS, worst, "3 random (u, v): <J^T v, u> = <v, J u> by central differences, float64")


def _check_forward_ad(s: _Subject) -> PropertyRow:
    missing = [c.__name__ for c in s.classes if not _overrides(c, "jvp")]
    if missing or not s.classes:
        why = f"{', '.join(missing)} defines no jvp" if missing else "no autograd.Function in the call"
        return PropertyRow("", SKIP, None, f"{why} (forward-mode AD unsupported)", "define jvp and ctx.save_for_forward")
    args = s.inputs(requires=[])
    gen = s.generator(300)
    us = [_random_like(args[i], gen) for i in s.wrt]
    with fwAD.dual_level(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated")  # inside torch's forward AD
        duals = list(args)
        for i, u in zip(s.wrt, us):
            duals[i] = fwAD.make_dual(args[i], u)
        tangents = [fwAD.unpack_dual(o).tangent for o in s.call(duals)]
    expected = _directional(s, args, us)
    tangents = [torch.zeros_like(e) if t is None else t for t, e in zip(tangents, expected)]
    row = _worst([f"J u, {n}" for n in _output_names(expected)], tangents, expected, 1e-5, 1e-7)
    row.detail = "jvp against central differences: " + row.detail
    row.hint = "" if row.ok else "jvp's formula is wrong (it must be the derivative of forward along the tangents)"
    return row


def _stack_inputs(s: _Subject, args: list, batch: int) -> tuple[list[list], list[Any], tuple]:
    """``batch`` perturbed copies of the checked inputs: per-copy argument lists, the stacked arguments
    and vmap's ``in_dims``."""
    gen = s.generator(400)
    copies = [list(args) for _ in range(batch)]
    for b in range(batch):
        for i in s.wrt:
            copies[b][i] = args[i].detach() * (1 + 0.05 * _random_like(args[i], gen))  # keeps signs (a probability stays one)
    stacked = [torch.stack([c[i] for c in copies]) if i in s.wrt else a for i, a in enumerate(args)]
    in_dims = tuple(0 if i in s.wrt else None for i in range(len(args)))
    return copies, stacked, in_dims


def _transform_failure(e: Exception, hint: str) -> PropertyRow:
    """A failed row for an error under a torch.func transform; a skip where the transform cannot run the
    call at all (a C++ ``torch::autograd::Function``, which functorch does not support)."""
    if "C++ torch::autograd::Function with functorch" in str(e):
        return PropertyRow("", SKIP, None, "not supported: a C++ torch::autograd::Function under torch.func transforms")
    return PropertyRow("", FAIL, None, _first_line(e), hint)


def _check_vmap(s: _Subject) -> PropertyRow:
    why = _functorch_support(s.classes, "vmap")
    if why:
        return PropertyRow("", SKIP, None, why)
    args = s.inputs(requires=[])
    copies, stacked, in_dims = _stack_inputs(s, args, 3)
    try:
        got = _as_tensor_list(torch.func.vmap(s.tupled, in_dims=in_dims)(*stacked), "fn")
    except Exception as e:  # noqa: BLE001 - any failure under the transform is the finding
        return _transform_failure(e, "the forward must be vmap-able: no .item(), numpy, or data-dependent Python control flow; or write a vmap staticmethod")
    with torch.no_grad():
        per_copy = [s.call(c) for c in copies]
    want = [torch.stack([p[k] for p in per_copy]) for k in range(len(per_copy[0]))]
    row = _worst(_output_names(want), [g.detach() for g in got], want, 1e-10, 1e-12)
    row.detail = "vmap over 3 stacked inputs vs one call each: " + row.detail
    row.hint = "" if row.ok else "the vmap rule maps the batch dimension wrongly (check out_dims)"
    return row


def _scalar(s: _Subject, offset: int) -> Callable[..., Tensor]:
    """sum_k <v_k, out_k> for fixed random v_k: a scalar function of the inputs."""

    def f(*a: Any) -> Tensor:
        outs = s.call(a)
        gen = s.generator(offset)
        return sum((o * _random_like(o, gen)).sum() for o in outs if o.is_floating_point())  # type: ignore[return-value]

    return f


def _check_func_grad(s: _Subject) -> PropertyRow:
    why = _functorch_support(s.classes, "grad")
    if why:
        return PropertyRow("", SKIP, None, why)
    f = _scalar(s, 500)
    try:
        got = torch.func.grad(f, argnums=tuple(s.wrt))(*s.inputs(requires=[]))
    except Exception as e:  # noqa: BLE001
        return _transform_failure(e, "setup_context must save what backward needs; backward must use torch ops only")
    args = s.inputs()
    want = torch.autograd.grad(f(*args), [args[i] for i in s.wrt], allow_unused=True)
    row = _worst(_grad_names(s), list(got), list(want), 1e-10, 1e-12)
    row.detail = "torch.func.grad vs autograd: " + row.detail
    return row


def _check_jacrev(s: _Subject) -> PropertyRow:
    why = _functorch_support(s.classes, "jacrev")
    if why:
        return PropertyRow("", SKIP, None, why)

    def flat(*a: Any) -> Tensor:
        return torch.cat([o.reshape(-1) for o in s.call(a) if o.is_floating_point()])

    args = s.inputs(requires=[])
    try:
        got = torch.func.jacrev(flat, argnums=tuple(s.wrt))(*args)
    except Exception as e:  # noqa: BLE001
        return _transform_failure(e, "backward runs under vmap in jacrev: use batch-agnostic torch ops")
    want = _analytical_jacobians(flat, args, s.wrt)
    got = [g.reshape(w.shape) for g, w in zip(got, want)]
    row = _worst([f"d/d {s.names[i]}" for i in s.wrt], got, want, 1e-10, 1e-12)
    row.detail = "torch.func.jacrev vs autograd's Jacobian: " + row.detail
    return row


def _check_compile(s: _Subject) -> PropertyRow:
    backend = s.options["compile_backend"]
    if backend is None:
        return PropertyRow("", SKIP, None, "compile_backend=None")
    import torch._dynamo

    torch._dynamo.reset()  # a fresh cache: no earlier graph of this wrapper, no recompile limit reached
    compiled = torch.compile(s.fn, fullgraph=True, backend=backend)
    sub = _Subject(compiled, s.name, s.args, s.wrt, s.names, s.batched, s.classes, s.seed, s.options)
    try:
        got = sub.forward_backward(s.inputs())
    except Exception as e:  # noqa: BLE001
        if "custom jvp" in str(e):  # a limit of torch.compile, not a defect of the Function
            why = "dynamo does not trace a Function that defines jvp ('Unsupported custom jvp')"
            return PropertyRow("", SKIP, None, why, "under compile apply a twin without jvp, as manualbp.autograd.apply_function does")
        return PropertyRow("", FAIL, None, _first_line(e), "dynamo must trace forward and backward: no ctx attributes read from outputs, no .item(), no global state")
    finally:
        torch._dynamo.reset()
    row = _same_results(s, got, s.forward_backward(s.inputs()))
    row.detail = f"torch.compile(fullgraph=True, backend={backend!r}) forward and backward vs eager: " + row.detail
    return row


def _noncontiguous(t: Tensor) -> Tensor:
    """The same values in a non-contiguous layout (every other element of a wider tensor), differentiable."""
    if t.dim() == 0 or t.numel() < 2:
        return t
    return torch.stack([t, torch.zeros_like(t)], dim=-1).select(-1, 0)


def _check_noncontiguous(s: _Subject) -> PropertyRow:
    want = s.forward_backward(s.inputs())
    args = s.inputs()
    views = [_noncontiguous(a) if isinstance(a, Tensor) else a for a in args]
    try:
        outs = s.call(views)
        vs = [None if v is None else _noncontiguous(v) for v in s.cotangents(outs)]
        grads = _vjp(outs, vs, [args[i] for i in s.wrt])
    except Exception as e:  # noqa: BLE001
        return PropertyRow("", FAIL, None, _first_line(e), "use .reshape, not .view, or call .contiguous() on inputs and grad_output")
    row = _same_results(s, ([o.detach() for o in outs], grads), want)
    row.detail = "non-contiguous inputs and cotangents vs contiguous: " + row.detail
    return row


def _check_zero_size(s: _Subject) -> PropertyRow:
    if not s.batched:
        return PropertyRow("", SKIP, None, "no input with a batch dimension (pass batched=[...])")
    args = s.inputs()
    sliced = [a[:0] if i in s.batched else a for i, a in enumerate(args)]
    try:
        outs = s.call(sliced)
        grads = _vjp(outs, s.cotangents(outs), [args[i] for i in s.wrt])
    except Exception as e:  # noqa: BLE001
        return PropertyRow("", FAIL, None, f"batch of 0: {_first_line(e)}", "guard reductions over the batch (max, min, division by its size) for an empty batch")
    bad = [f"{s.names[i]}: {tuple(g.shape)}" for i, g in zip(s.wrt, grads) if g is not None and g.shape != args[i].shape]
    if bad:
        return PropertyRow("", FAIL, None, "gradient shapes differ from the inputs': " + ", ".join(bad))
    shapes = ", ".join(str(tuple(o.shape)) for o in outs)
    return PropertyRow("", PASS, None, f"batch of 0 along dim 0 of {', '.join(s.names[i] for i in s.batched)}: outputs {shapes}")


def _check_broadcast(s: _Subject) -> PropertyRow:
    targets = [i for i in s.batched if i in s.wrt and s.args[i].shape[0] > 1]
    if not targets:
        return PropertyRow("", SKIP, None, "no checked input with a batch dimension of 2 or more")
    small = {i: s.args[i].detach()[:1].to(torch.float64).clone().requires_grad_(True) for i in targets}

    def run(expand: Callable[[Tensor, torch.Size], Tensor]):
        args = s.inputs()
        leaves = [small[i] if i in small else args[i] for i in s.wrt]
        for i in targets:
            args[i] = expand(small[i], s.args[i].shape)
        outs = s.call(args)
        return [o.detach() for o in outs], _vjp(outs, s.cotangents(outs), leaves)

    want = run(lambda t, shape: t.expand(shape).clone())
    try:
        got = run(lambda t, shape: t.expand(shape))
    except Exception as e:  # noqa: BLE001
        return PropertyRow("", FAIL, None, _first_line(e), "do not write into inputs; a broadcast (stride-0) input shares memory across rows")
    row = _same_results(s, got, want)
    row.detail = f"stride-0 (expanded) {', '.join(s.names[i] for i in targets)} vs a contiguous copy: " + row.detail
    return row


class _LowPrecision(TorchDispatchMode):
    """Records the ops whose floating outputs are below float64 (in a run where every input is float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
                self.found.append(f"{func} -> {t.dtype} ({self.phase})")
        return out


def _check_float64(s: _Subject) -> PropertyRow:
    args = s.inputs()
    mode = _LowPrecision()
    with mode:
        outs = s.call(args)
        mode.phase = "backward"
        grads = _vjp(outs, s.cotangents(outs), [args[i] for i in s.wrt])
    wrong = [f"{n}: {o.dtype}" for n, o in zip(_output_names(outs), outs) if o.is_floating_point() and o.dtype != torch.float64]
    wrong += [f"grad {s.names[i]}: {g.dtype}" for i, g in zip(s.wrt, grads) if g is not None and g.dtype != torch.float64]
    if mode.found or wrong:
        what = (mode.found[:2] + wrong)[:3]
        return PropertyRow("", FAIL, None, "float64 inputs, but " + "; ".join(what), "compute in the inputs' dtype: no .float(), no dtype=torch.float32 for new tensors (use x.new_* or dtype=x.dtype)")
    return PropertyRow("", PASS, None, "every op of forward and backward computed in float64")


def _check_float32(s: _Subject) -> PropertyRow:
    want = s.forward_backward(s.inputs(torch.float64))
    try:
        outs, grads = s.forward_backward(s.inputs(torch.float32))
    except Exception as e:  # noqa: BLE001
        return PropertyRow("", FAIL, None, f"float32: {_first_line(e)}", "do not hard-code float64")
    got = [o.to(torch.float64) for o in outs], [None if g is None else g.to(torch.float64) for g in grads]
    names = _output_names(outs) + _grad_names(s)
    rows = [compare_tensors(n, a, e, 1e-4, 1e-4, relative_to_max=True) for n, a, e in zip(names, [*got[0], *got[1]], [*want[0], *want[1]])]
    worst = max((r.max_rel_err for r in rows if r.compared), default=0.0)
    bad = [r.name for r in rows if not r.ok]
    if bad:
        return PropertyRow("", FAIL, worst, f"float32 far from float64 in {', '.join(bad)}", "avoid cancellation (subtract the max before exp, use log1p/expm1)")
    return PropertyRow("", PASS, worst, "float32 outputs and gradients within 1e-4 of float64 (relative to the largest)")


def _check_cuda(s: _Subject) -> PropertyRow:
    if not torch.cuda.is_available():
        return PropertyRow("", SKIP, None, "no CUDA device visible")
    want = s.forward_backward(s.inputs())
    try:
        outs, grads = s.forward_backward(s.inputs(device="cuda"))
    except Exception as e:  # noqa: BLE001
        return PropertyRow("", FAIL, None, f"cuda: {_first_line(e)}", "create new tensors on the inputs' device (x.new_*, device=x.device)")
    got = [o.cpu() for o in outs], [None if g is None else g.cpu() for g in grads]
    row = _same_results(s, got, want, rtol=1e-9, atol=1e-11)
    row.detail = "cuda vs cpu, float64: " + row.detail
    return row


@contextlib.contextmanager
def _recording_backward(classes: Sequence[type], log: list) -> Iterator[None]:
    """Patch each class's backward (or vjp) to log (class, needs_input_grad, returned gradients)."""
    with contextlib.ExitStack() as stack:
        for cls in classes:
            attr = "vjp" if _overrides(cls, "vjp") else "backward"
            original = getattr(cls, attr)

            def recording(ctx: Any, *grads: Any, _cls: type = cls, _original: Callable = original) -> Any:
                result = _original(ctx, *grads)
                log.append((_cls, tuple(ctx.needs_input_grad), result if isinstance(result, tuple) else (result,)))
                return result

            stack.enter_context(mock.patch.object(cls, attr, staticmethod(recording)))
        yield


def _backward_flops(s: _Subject, requires: Sequence[int], log: list) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    args = s.inputs(requires=list(requires))
    outs = s.call(args)
    counter = FlopCounterMode(display=False)
    with counter, _recording_backward(s.classes, log):
        _vjp(outs, s.cotangents(outs), [args[i] for i in requires])
    return counter.get_total_flops()


def _returned_unneeded(log: list) -> list[str]:
    """From the logged backward calls: the gradients returned for inputs whose needs_input_grad was False."""
    found = []
    for cls, needs, returned in log:
        names = _input_names(cls.forward, len(needs))
        found += [
            f"{cls.__name__}.backward returned a gradient for {names[p]} although ctx.needs_input_grad[{p}] is False"
            for p, (need, g) in enumerate(zip(needs, returned))
            if not need and isinstance(g, Tensor)
        ]
    return sorted(set(found))


def _check_needs_input_grad(s: _Subject) -> PropertyRow:
    """No gradient returned for an input that does not require one, and (where FlopCounterMode sees the
    work: matmuls) less work when fewer gradients are needed."""
    floating = [i for i, a in enumerate(s.args) if isinstance(a, Tensor) and a.is_floating_point()]
    if len(floating) < 2 or (not s.classes and len(s.wrt) < 2):
        return PropertyRow("", SKIP, None, "one floating input only: nothing can be left without a gradient")
    log: list = []
    all_flops = _backward_flops(s, s.wrt, log)
    wasted = []
    for i in s.wrt if len(s.wrt) > 1 else []:
        flops = _backward_flops(s, [i], log)
        if all_flops > 0 and flops >= all_flops:
            wasted.append(f"{flops} FLOPs with only {s.names[i]} requiring grad, as many as with all")
    extra = _returned_unneeded(log)
    if extra:
        return PropertyRow("", FAIL, None, extra[0], "return None for inputs with ctx.needs_input_grad[i] False, and skip computing them")
    if wasted:
        return PropertyRow("", FAIL, None, wasted[0], "skip the work for gradients not needed: if ctx.needs_input_grad[i]: ...")
    seen = "None returned where not needed; " if s.classes else "(C++ node: returned gradients not observable) "
    return PropertyRow("", PASS, None, f"{seen}backward FLOPs {all_flops} with all inputs, fewer with any one alone")


def _tensors_in(value: Any) -> int:
    return sum(isinstance(t, Tensor) for t in tree_flatten(value)[0])


def _check_saved_tensors(s: _Subject) -> PropertyRow:
    packed = []
    args = s.inputs()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        outs = s.call(args)
    held = [f"ctx.{k}" for node in _function_nodes(outs, s.classes) for k, v in vars(node).items() if _tensors_in(v)]
    if held:
        return PropertyRow("", FAIL, None, f"{', '.join(sorted(set(held)))} holds a tensor: saved_tensors_hooks and save_on_cpu miss it", "save tensors with ctx.save_for_backward(...) and read them back with ctx.saved_tensors")
    want = s.forward_backward(s.inputs())
    with torch.autograd.graph.save_on_cpu():
        got = s.forward_backward(s.inputs())
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        cloned = s.forward_backward(s.inputs())
    row = _same_results(s, got, want, 0.0, 0.0)
    other = _same_results(s, cloned, want, 0.0, 0.0)
    if not row.ok or not other.ok:
        return PropertyRow("", FAIL, None, f"with saved tensors packed by hooks: {(row if not row.ok else other).detail}", "backward must read saved tensors through ctx.saved_tensors only")
    return PropertyRow("", PASS, None, f"{len(packed)} tensors through saved_tensors_hooks, none on ctx; save_on_cpu and cloning hooks give equal gradients")


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    sa, sb = a.untyped_storage(), b.untyped_storage()
    return sa.nbytes() > 0 and sa.data_ptr() == sb.data_ptr()


def _check_aliasing(s: _Subject) -> PropertyRow:
    leaves = s.inputs()
    args = [a.clone() if isinstance(a, Tensor) and a.requires_grad else a for a in leaves]  # in-place allowed
    versions = [a._version if isinstance(a, Tensor) else None for a in args]
    outs = s.call(args)
    found, dirty = [], []
    for name, o in zip(_output_names(outs), outs):
        for i, a in enumerate(args):
            if isinstance(a, Tensor) and o is a:
                dirty.append(s.names[i])
            elif isinstance(a, Tensor) and _shares_memory(o, a):
                found.append(f"{name} aliases input {s.names[i]}")
    for i, a in enumerate(args):
        if isinstance(a, Tensor) and a._version != versions[i] and s.names[i] not in dirty:
            found.append(f"forward modified {s.names[i]} in place without ctx.mark_dirty")
    if found:
        return PropertyRow("", FAIL, None, "; ".join(found), "return a new tensor (x.clone()), or modify the input in place and ctx.mark_dirty(x)")
    note = f"; {', '.join(dirty)} modified in place and marked dirty" if dirty else ""
    return PropertyRow("", PASS, None, "no output shares memory with an input" + note)


def _check_non_differentiable(s: _Subject) -> PropertyRow:
    args = s.inputs()
    outs = s.call(args)
    marked = [(n, o) for n, o in zip(_output_names(outs), outs) if not o.requires_grad]
    if not marked:
        return PropertyRow("", SKIP, None, "every output is differentiable")
    wrong = [n for n, o in marked if o.grad_fn is not None]
    if wrong:
        return PropertyRow("", FAIL, None, f"{', '.join(wrong)} has a grad_fn but does not require grad")
    try:
        _vjp(outs, s.cotangents(outs), [args[i] for i in s.wrt])
    except Exception as e:  # noqa: BLE001
        return PropertyRow("", FAIL, None, _first_line(e), "backward gets zeros (or None with ctx.set_materialize_grads(False)) for non-differentiable outputs")
    return PropertyRow("", PASS, None, f"{', '.join(n for n, _ in marked)}: no grad_fn; backward ran without their gradients")


def _check_reference(s: _Subject) -> PropertyRow:
    reference = s.options.get("reference")
    if reference is None:
        return PropertyRow("", SKIP, None, "no reference= given")
    report = compare_callables(s.tupled, reference, *s.inputs(), order=s.options.get("reference_order", 2))
    bad = report.failures()
    detail = f"{len(report.rows)} quantities, {report.n_exact} bit-for-bit"
    if bad:
        return PropertyRow("", FAIL, report.max_abs_err, f"{len(bad)} differ: {bad[0].describe().splitlines()[0]}", "see compare_callables(fn, reference, ...) for every row")
    return PropertyRow("", PASS, report.max_abs_err, detail + " (outputs, gradients, second order)")


#: property name -> check, in the order they run and print. ``check_function(..., checks=[...])`` or
#: ``skip=[...]`` take these names.
CHECKS: dict[str, Callable[[_Subject], PropertyRow]] = {
    "runs": _check_runs,
    "gradcheck": _check_gradcheck,
    "random cotangents": _check_cotangents,
    "gradgradcheck": _check_gradgradcheck,
    "forward AD (jvp)": _check_forward_ad,
    "vmap": _check_vmap,
    "func.grad": _check_func_grad,
    "func.jacrev": _check_jacrev,
    "torch.compile": _check_compile,
    "non-contiguous": _check_noncontiguous,
    "zero-size batch": _check_zero_size,
    "broadcast": _check_broadcast,
    "float64 throughout": _check_float64,
    "float32 vs float64": _check_float32,
    "cuda": _check_cuda,
    "needs_input_grad": _check_needs_input_grad,
    "saved tensors": _check_saved_tensors,
    "aliasing": _check_aliasing,
    "non-differentiable outputs": _check_non_differentiable,
    "reference": _check_reference,
}


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------
def _resolve(fn: Any) -> tuple[Callable[..., Any], str, list[type]]:
    if isinstance(fn, type) and issubclass(fn, Function):
        return fn.apply, fn.__name__, [fn]
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, type) and issubclass(owner, Function):
        return fn, owner.__name__, [owner]
    if not callable(fn):
        raise TypeError(f"fn: expected an autograd.Function subclass or a callable, got {type(fn).__name__}")
    return fn, getattr(fn, "__name__", type(fn).__name__), []


def _key(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def property_names(names: Sequence[str], what: str) -> list[str]:
    """The :data:`CHECKS` names meant by ``names`` (case, spaces and punctuation ignored: "forward-ad-jvp")."""
    if isinstance(names, str):
        raise TypeError(f"{what}: expected a list of property names, got the string {names!r}")
    keys = {_key(n): n for n in CHECKS}
    unknown = [n for n in names if _key(n) not in keys]
    if unknown:
        raise ValueError(f"{what}: unknown properties {unknown}; expected names from {list(CHECKS)}")
    return [keys[_key(n)] for n in names]


def _selected(checks: Optional[Sequence[str]], skip: Sequence[str]) -> list[str]:
    wanted = list(CHECKS) if checks is None else property_names(checks, "checks")
    property_names(skip, "skip")
    return [n for n in CHECKS if n in wanted]


def _batched(args: Sequence[Any], batched: Optional[Sequence[int]]) -> list[int]:
    tensors = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
    if batched is not None:
        bad = [i for i in batched if i not in tensors or args[i].dim() == 0]
        if bad:
            raise ValueError(f"batched: positions {bad} are not tensor inputs with a dimension 0 (tensor inputs: {tensors})")
        return list(batched)
    if not tensors or args[tensors[0]].dim() == 0:
        return []
    n = args[tensors[0]].shape[0]
    return [i for i in tensors if args[i].dim() > 0 and args[i].shape[0] == n]


def _property_rows(subject: _Subject, checks: Optional[Sequence[str]], skip: Union[Sequence[str], dict[str, str]]) -> list[PropertyRow]:
    """One row per selected property: a skip row for one left out (with the caller's reason) or after a failed
    sample call, else the check's own row (a check that raises is a failed row with its error)."""
    rows: list[PropertyRow] = []
    reasons = dict(zip(property_names(list(skip), "skip"), skip.values())) if isinstance(skip, dict) else {}
    left_out = set(property_names(list(skip), "skip"))
    for prop in _selected(checks, list(skip)):
        if prop in left_out:
            reason = reasons.get(prop, "skipped by the caller (skip=...)")
            rows.append(PropertyRow(prop, SKIP, None, reason))
            continue
        if rows and rows[0].status == FAIL:
            rows.append(PropertyRow(prop, SKIP, None, "the sample call failed"))
            continue
        try:
            row = CHECKS[prop](subject)
        except Exception as e:  # noqa: BLE001 - a check that errors is a failed property, reported with its error
            row = PropertyRow("", FAIL, None, f"{type(e).__name__}: {_first_line(e)}")
        row.name = prop
        rows.append(row)
    return rows


def check_function(
    fn: Union[type, Callable[..., Any]],
    *sample_inputs: Any,
    reference: Optional[Callable[..., Any]] = None,
    checks: Optional[Sequence[str]] = None,
    skip: Union[Sequence[str], dict[str, str]] = (),
    batched: Optional[Sequence[int]] = None,
    compile_backend: Optional[str] = "aot_eager",
    seed: int = 0,
    max_jacobian_numel: int = 2048,
) -> ConformanceReport:
    """Run every conformance check of :data:`CHECKS` on a custom autograd.Function; no reference needed.

    Args:
        fn: an ``autograd.Function`` subclass (called as ``fn.apply``), ``MyFunction.apply``, or any callable
            built on Functions (the classes it applies are found in its graph).
        sample_inputs: positional inputs. Floating tensors that require grad are the ones checked; other
            tensors (integer targets, floats that do not require grad) and non-tensors are passed through.
        reference: optional callable computing the same thing another way; adds the ``reference`` row
            (outputs, gradients and second order, as :func:`manualbp.verify.compare_callables`).
        checks, skip: run only these properties / leave these out (names of :data:`CHECKS`); ``skip`` may map
            each name to the reason, shown in its row (a left-out property is a ``skip`` row, not absent).
        batched: positions of the inputs whose dim 0 is the batch (for the zero-size and broadcast checks);
            default: the tensors whose dim 0 equals the first tensor input's.
        compile_backend: the ``torch.compile`` backend of the compile check ("aot_eager" traces forward and
            backward; "inductor" also generates code; None skips it). The check resets dynamo's cache.
        seed: seeds the random cotangents and directions.
        max_jacobian_numel: above this many checked input elements, the gradcheck row gives the verdict
            without the numbers (each element costs two forward calls).

    Returns:
        A :class:`ConformanceReport` (``print`` it; ``.to_dict()`` for JSON; ``.raise_if_failed()``).

    Raises:
        TypeError: ``fn`` is neither a Function class nor callable.
        ValueError: no floating input requires grad, or an unknown property name or a bad ``batched``.
    """
    call, name, classes = _resolve(fn)
    args = list(sample_inputs)
    wrt = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point() and a.requires_grad]
    if not wrt:
        raise ValueError("sample_inputs: no floating-point input requires grad; call .requires_grad_() on those to check")
    names = _input_names(classes[0].forward if classes else call, len(args))
    options = {"reference": reference, "compile_backend": compile_backend, "max_jacobian_numel": max_jacobian_numel}
    subject = _Subject(call, name, args, wrt, names, _batched(args, batched), classes, seed, options)
    rows = _property_rows(subject, checks, skip)
    shapes = ", ".join(f"{names[i]}: {'x'.join(map(str, a.shape)) or 'scalar'}" for i, a in enumerate(args) if isinstance(a, Tensor))
    meta = {"function": name, "inputs": shapes, "seed": seed}
    return ConformanceReport(f"check_function({name}) on {shapes}", rows, meta)



# --------------------------------------------------------------------------------------------------
# manualbp's own Functions, as the test suite and `manualbp check --builtin` run them
# --------------------------------------------------------------------------------------------------
_BuiltinSubject = tuple[str, Callable[..., Any], tuple, dict[str, Any]]
#: the activations of the builtin MLPFunction subject (two hidden layers)
_MLP_ACTIVATIONS = (("tanh", 0.01), ("sigmoid", 0.01))


class _Draws:
    """Seeded float64 sample inputs, drawn in turn from one generator: the order of the draws fixes every subject's
    inputs, so the helpers of :func:`builtin_subjects` draw in the order the list is built."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, grad: bool = True) -> Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64).requires_grad_(grad)


def _via(function: type) -> Callable[..., Any]:
    """``function`` applied through ``apply_function``, as the modules apply it, named after the Function."""
    from .. import autograd as A

    def call(*args: Any) -> Any:
        return A.apply_function(function, *args)

    call.__name__ = function.__name__
    return call


def _functional(module: torch.nn.Module) -> Callable[..., Tensor]:
    """``module`` as a function of its input and its parameters (``torch.func.functional_call``)."""
    names = [n for n, _ in module.named_parameters()]

    def call(i: Tensor, *params: Tensor) -> Tensor:
        return torch.func.functional_call(module, dict(zip(names, params)), (i,))

    return call


def _native_mlp(i: Tensor, *params: Tensor) -> Tensor:
    """The reference of the builtin MLPFunction subject: tanh then sigmoid hidden layers, PyTorch's ops."""
    import torch.nn.functional as TF

    for k in range(0, len(params) - 2, 2):
        i = (torch.tanh, torch.sigmoid)[k // 2](TF.linear(i, params[k], params[k + 1]))
    return TF.linear(i, params[-2], params[-1])


def _op_subjects(x: _Draws) -> list[_BuiltinSubject]:
    """LinearFunction and every activation Function, against PyTorch's op."""
    import torch.nn.functional as TF

    from .. import autograd as A

    native_acts = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "leaky_relu": TF.leaky_relu, "identity": lambda z: z * 1}
    subjects = [("LinearFunction", _via(A.LinearFunction), (x(6, 4), x(3, 4), x(3)), {"reference": TF.linear})]
    for name, function in A.ACTIVATION_FUNCTIONS.items():
        inputs = (x(6, 4), 0.1) if name == "leaky_relu" else (x(6, 4),)
        subjects.append((function.__name__, _via(function), inputs, {"reference": native_acts[name]}))
    return subjects


def _loss_subjects(x: _Draws, labels: Tensor, soft: Tensor, probs: Tensor) -> list[_BuiltinSubject]:
    """The loss Functions and SoftmaxFunction, against PyTorch's losses."""
    import torch.nn.functional as TF

    from .. import autograd as A
    from .references import _native_cross_entropy, _native_squared_error

    return [
        ("SquaredErrorLossFunction", _via(A.SquaredErrorLossFunction), (x(6, 3), x(6, 3, grad=False), "mean"), {"reference": _native_squared_error}),
        ("MSELossFunction", _via(A.MSELossFunction), (x(6, 3), x(6, 3, grad=False), "mean"), {"reference": lambda o, t, r: TF.mse_loss(o, t, reduction=r)}),
        ("CrossEntropyFunction (class indices)", _via(A.CrossEntropyFunction), (x(6, 3), labels, "mean"), {"reference": _native_cross_entropy}),
        ("CrossEntropyFunction (probabilities)", _via(A.CrossEntropyFunction), (x(6, 3), soft, "sum"), {"reference": _native_cross_entropy}),
        ("SoftmaxFunction", _via(A.SoftmaxFunction), (x(6, 3),), {"reference": lambda z: torch.softmax(z, -1)}),
        ("CrossEntropyOnProbabilitiesFunction", _via(A.CrossEntropyOnProbabilitiesFunction), (probs, labels, "mean"), {"reference": lambda p, t, r: TF.nll_loss(torch.log(p), t, reduction=r)}),
    ]


def _native_subjects(ext: Any, x: _Draws, labels: Tensor, mlp_params: Callable[[], tuple]) -> list[_BuiltinSubject]:
    """The compiled (C++) twins, eager-only (torch.compile is skipped, with the reason)."""
    import torch.nn.functional as TF

    acts = _MLP_ACTIVATIONS
    eager_only = {"torch.compile": "a C++ node is eager-only: under torch.compile the modules apply the Python Function"}
    return [
        ("native.mlp (C++ node)", lambda i, *p: ext.mlp(i, acts, True, list(p))[0], (x(6, 4), *mlp_params()), {"batched": [0], "skip": eager_only, "reference": _native_mlp}),
        ("native.cross_entropy (C++ node)", lambda o, t: ext.cross_entropy(o, t, "mean"), (x(6, 3), labels), {"skip": eager_only, "reference": lambda o, t: TF.cross_entropy(o, t)}),
    ]


def builtin_subjects(seed: int = 0) -> list[tuple[str, Callable[..., Any], tuple, dict[str, Any]]]:
    """``(name, fn, sample_inputs, check_function keywords)`` for every Function of manualbp: the per-op
    Functions, the losses, the whole-network MLPFunction, the compiled (C++) twins where the extension is
    built, and ``MLP`` itself, each with PyTorch's own ops as ``reference``. The Functions are called
    through ``apply_function``, as the modules call them (under torch.compile it applies the twin without jvp)."""
    from .. import autograd as A
    from .. import native
    from ..nn import MLP

    x = _Draws(seed)
    labels = torch.randint(0, 3, (6,), generator=x.gen)
    soft = torch.softmax(torch.randn(6, 3, generator=x.gen, dtype=torch.float64), -1)
    probs = torch.softmax(x(6, 3, grad=False), -1).requires_grad_(True)
    model = MLP(4, [5, 4], 3, activation="tanh").double()
    mlp_params = lambda: tuple(x(*p.shape) for p in model.parameters())  # noqa: E731
    subjects = _op_subjects(x) + _loss_subjects(x, labels, soft, probs)
    mlp_function = lambda i, *p: _via(A.MLPFunction)(i, _MLP_ACTIVATIONS, True, *p)[0]  # noqa: E731
    subjects.append(("MLPFunction", mlp_function, (x(6, 4), *mlp_params()), {"batched": [0], "reference": _native_mlp}))
    ext = native.load()
    if ext is not None:
        subjects += _native_subjects(ext, x, labels, mlp_params)
    subjects.append(("MLP (the module)", _functional(model), (x(6, 4), *mlp_params()), {"batched": [0], "reference": _functional(model.to_torch())}))
    return subjects


def summary_table(reports: Sequence[tuple[str, ConformanceReport]], markdown: bool = False) -> str:
    """One line per checked Function: how many properties passed, which failed, which were skipped."""
    headers = ["Function", "passed", "failed", "skipped"]
    body = []
    for name, report in reports:
        failed = [r.name for r in report if r.status == FAIL]
        skipped = [r.name for r in report if r.status == SKIP]
        body.append([name, f"{len(report) - len(failed) - len(skipped)}/{len(report)}", ", ".join(failed) or "-", ", ".join(skipped) or "-"])
    if not markdown:
        return format_table(headers, body)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def parse_input_spec(spec: str, gen: torch.Generator) -> Tensor:
    """One ``manualbp check --shapes`` token: ``8x3`` (float64, requires grad), ``8x3:nograd`` (float64),
    ``8:int10`` (int64 in [0, 10)), ``scalar`` (a 0-d float64 that requires grad)."""
    shape_text, _, kind = spec.partition(":")
    try:
        shape = () if shape_text == "scalar" else tuple(int(d) for d in shape_text.split("x"))
    except ValueError:
        raise ValueError(f"--shapes: expected tokens like 8x3, 8x3:nograd, 8:int10 or scalar, got {spec!r}") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"--shapes: sizes must be >= 0, got {spec!r}")
    if kind.startswith("int"):
        high = int(kind[3:] or 2)
        return torch.randint(0, high, shape, generator=gen)
    if kind not in ("", "nograd"):
        raise ValueError(f"--shapes: expected the suffix :nograd or :intK, got {spec!r}")
    return torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(kind == "")
