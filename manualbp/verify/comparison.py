"""compare: a model against its native twin; compare_callables: any pair of callables.

:func:`compare` runs a model and its native twin (``model.to_torch()`` or any ``reference`` module) on the same
batch and compares the loss, the output, every parameter gradient and the input gradient.

:func:`compare_callables` is the engine of :func:`manualbp.testing.assert_gradients_match`: any pair of
callables, their outputs and the first- and second-order gradients of their inputs (nested in lists, tuples
and dicts, positional or keyword, real or complex), from seeded random cotangents.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional, Sequence, Union, cast

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_unflatten

from .references import LossArg, _loss_pair, _match_parameters, _parameter_names
from .reports import GradReport, Row, _real_dtype, compare_tensors, default_tolerances

__all__ = ["compare", "compare_callables"]

# Cotangents come from their own seed stream, never equal to a tensor the caller drew with torch.manual_seed(seed)
# (a cotangent equal to the input makes v^T x symmetric and hides a transposed weight gradient).
_COTANGENT_SEED = 1_000_003


# --------------------------------------------------------------------------------------------------
# compare: a model against its native twin
# --------------------------------------------------------------------------------------------------
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


def _checked_reference(model: object, input: object, target: object, reference: Optional[nn.Module]) -> nn.Module:
    """The module :func:`compare` runs against (default ``model.to_torch()``), after checking every argument's type."""
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
    return reference


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
    reference = _checked_reference(model, input, target, reference)
    manual_loss, native_loss = _loss_pair(loss, reduction)
    pairs = [pair for pair in _match_parameters(model, reference) if pair[1].requires_grad]  # frozen: no gradient
    display = _parameter_names(model)
    m_loss, m_out, m_gx, m_grads = _run(model, [p for _, p, _ in pairs], manual_loss, input, target)
    r_loss, r_out, r_gx, r_grads = _run(reference, [q for _, _, q in pairs], native_loss, input, target)

    def cmp(name: str, actual: Optional[Tensor], expected: Optional[Tensor]) -> Row:
        return compare_tensors(name, actual, expected, rtol, atol, relative_to_max=relative_to_max)

    rows = [cmp("L", m_loss, r_loss), cmp("o", m_out, r_out)]
    rows += [cmp(f"dL/d{display[name]}", gm, gr) for (name, _, _), gm, gr in zip(pairs, m_grads, r_grads)]
    if m_gx is not None or r_gx is not None:
        rows.append(cmp("dL/dx", m_gx, r_gx))
    d_rtol, d_atol = default_tolerances(m_out.dtype, r_out.dtype)
    meta = {"loss": _callable_name(loss) if not isinstance(loss, str) else loss, "reduction": reduction}
    meta.update(dtype=m_out.dtype, device=m_out.device)
    title = f"{type(model).__name__} vs {type(reference).__name__}"
    return GradReport(title, rows, d_rtol if rtol is None else rtol, d_atol if atol is None else atol, meta)


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
    _check_callables(fn, reference_fn, order)
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
        rows = _output_rows(outs_a, outs_b, rtol, atol)
        leaves_a, leaves_b = [cast(Tensor, mine[i]) for i in wrt], [cast(Tensor, theirs[i]) for i in wrt]
        rows += _gradient_rows(outs_a, outs_b, leaves_a, leaves_b, [names[i] for i in wrt], order, seed, rtol, atol)
    dtypes = [_real_dtype(t.dtype) for t in outs_b if t.is_floating_point() or t.is_complex()] or [torch.float64]
    d_rtol, d_atol = default_tolerances(*dtypes)
    title = f"{_callable_name(fn)} vs {_callable_name(reference_fn)}"
    return GradReport(title, rows, d_rtol if rtol is None else rtol, d_atol if atol is None else atol)


def _check_callables(fn: object, reference_fn: object, order: object) -> None:
    """TypeError when ``fn`` or ``reference_fn`` is not callable, ValueError when ``order`` is not 1 or 2."""
    for what, f in (("fn", fn), ("reference_fn", reference_fn)):
        if not callable(f):
            raise TypeError(f"{what} must be callable, got {type(f).__name__}")
    if order not in (1, 2):
        raise ValueError(f"order: expected 1 (gradients) or 2 (and second order), got {order!r}")


def _callable_name(f: Callable[..., Any]) -> str:
    """The name a report title gives a callable: its ``__name__``, else its type's."""
    return getattr(f, "__name__", type(f).__name__)


def _output_rows(outs_a: list[Tensor], outs_b: list[Tensor], rtol: Optional[float], atol: Optional[float]) -> list[Row]:
    """One row per output pair: ``output`` for a single output, ``output[k]`` for several."""
    single = len(outs_a) == 1
    return [
        compare_tensors("output" if single else f"output[{k}]", a.detach(), b.detach(), rtol, atol)
        for k, (a, b) in enumerate(zip(outs_a, outs_b))
    ]


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
