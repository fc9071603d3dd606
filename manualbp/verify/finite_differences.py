"""finite_difference_check: float64 gradcheck and gradgradcheck, with the numbers.

:func:`finite_difference_check` runs ``torch.autograd.gradcheck`` and ``gradgradcheck`` on a model or a
function in float64, and for each input the largest difference between the central-difference Jacobian and
the analytical one (through the backward under test), first and second order
(:class:`FiniteDifferenceReport`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..autograd import MLPFunction
from ..nn import MLP
from .comparison import _COTANGENT_SEED, _as_tensor_list, _input_names
from .references import LossArg, _loss_pair, _parameter_names
from .reports import _json_float, fmt_err, format_table

__all__ = ["FiniteDifferenceReport", "FiniteDifferenceRow", "finite_difference_check"]


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


_Subject = tuple[Callable[..., Any], list[Any], list[str]]  # the function checked, its float64 arguments, their names


def _module_subject(
    fn: nn.Module, inputs: tuple[Any, ...], target: Optional[Tensor], loss: Optional[LossArg], reduction: str
) -> _Subject:
    """A float64 copy of the module as a function of its input and every parameter (then of the loss, if any)."""
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
    return f, args, ["x", *(display[n] for n in keys)]


def _function_subject(fn: Callable[..., Any], inputs: tuple[Any, ...]) -> _Subject:
    """The function itself, its floating inputs cast to float64 (keeping their requires_grad)."""
    if not callable(fn):
        raise TypeError(f"fn must be an nn.Module or a callable, got {type(fn).__name__}")
    args = [
        t.detach().to(torch.float64).requires_grad_(t.requires_grad)
        if isinstance(t, Tensor) and t.is_floating_point()
        else t
        for t in inputs
    ]
    return fn, args, _input_names(fn, len(inputs))


def _torch_verdicts(
    func: Callable[..., Any], args: list[Any], grad_grad: bool, **options: Any
) -> tuple[bool, Optional[bool]]:
    """``torch.autograd.gradcheck``'s verdict and ``gradgradcheck``'s (None when ``grad_grad`` is off)."""
    passed = torch.autograd.gradcheck(func, tuple(args), raise_exception=False, **options)
    passed_gg: Optional[bool] = None
    if grad_grad:
        passed_gg = torch.autograd.gradgradcheck(func, tuple(args), raise_exception=False, **options)
    return bool(passed), None if passed_gg is None else bool(passed_gg)


def _second_order_diffs(
    flat_f: Callable[..., Tensor], args: list[Any], idx: list[int], eps: float, atol: float, rtol: float, seed: int
) -> list[tuple[float, float, bool]]:
    """Per checked input, the differences of the Jacobian of a seeded vector-Jacobian product v^T J (the double
    backward) between central differences and the analytical one."""
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
    return [_diff(n, a, atol, rtol) for n, a in zip(numerical2, analytical2)]


def _difference_rows(
    func: Callable[..., Any],
    subject: _Subject,
    idx: list[int],
    grad_grad: bool,
    eps: float,
    atol: float,
    rtol: float,
    seed: int,
) -> list[FiniteDifferenceRow]:
    """One row per checked input: first-order differences, and second-order ones when ``grad_grad``."""
    _, args, names = subject

    def flat_f(*a: Any) -> Tensor:
        return _flat(func(*a))

    with torch.no_grad():
        numerical = [_numerical_jacobian(flat_f, args, i, eps, False) for i in idx]
    analytical = _analytical_jacobians(flat_f, args, idx)
    second: list[Optional[tuple[float, float, bool]]] = [None] * len(idx)
    if grad_grad:
        second = list(_second_order_diffs(flat_f, args, idx, eps, atol, rtol, seed))
    rows = []
    for k, i in enumerate(idx):
        max_abs, rel, ok = _diff(numerical[k], analytical[k], atol, rtol)
        s = second[k]
        rows.append(
            FiniteDifferenceRow(
                names[i], tuple(args[i].shape), max_abs, rel, None if s is None else s[0], ok and (s is None or s[2])
            )
        )
    return rows


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
        subject = _module_subject(fn, inputs, target, loss, reduction)
    else:
        subject = _function_subject(fn, inputs)
    func, args, _ = subject
    idx = [i for i, t in enumerate(args) if isinstance(t, Tensor) and t.requires_grad]
    if not idx:
        raise ValueError("inputs: no floating-point input requires grad, so there is no gradient to check")
    options = {"eps": eps, "atol": atol, "rtol": rtol, "fast_mode": fast_mode}
    passed, passed_gg = _torch_verdicts(func, args, grad_grad, **options)
    rows = _difference_rows(func, subject, idx, grad_grad, eps, atol, rtol, seed)
    return FiniteDifferenceReport(rows, passed, passed_gg, eps, atol, rtol)
