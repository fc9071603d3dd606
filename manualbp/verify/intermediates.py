"""Check your own backprop, intermediate by intermediate, against autograd (the "backprop ninja" check).

Run any forward once under :func:`record`, compute your manual gradients, and compare them all at once::

    with record() as rec:                       # every tensor that requires grad is seen as it is made
        emb = C[Xb]
        ...
        loss = -logprobs[range(n), Yb].mean()
    # ... your manual backward: dlogprobs, dprobs, ..., dhpreact, ..., dC ...
    report = rec.compare(loss, locals())        # the gradient of each recorded ``x`` is your ``dx``
    print(report)                               # gradient, shape, exact, approx, max diff; and the bug site

No ``retain_grad``, no ``backward``: autograd's gradient of ``loss`` with respect to every recorded tensor is
taken with :func:`torch.autograd.grad` (``retain_graph=True``, so you may still call ``loss.backward()``;
no ``.grad`` is written, no hook is left behind).

Which tensors are recorded:

- with ``collect=True`` (the default), every floating tensor that requires grad and is produced by a torch
  operation inside the ``with`` block (``C[Xb]``, ``@``, ``.sum``, ``**-0.5``, ``F.cross_entropy``, in-place
  ops...), and every tensor requiring grad that a torch operation in the block reads (parameters such as
  ``C``, ``W1``, ``bngain``; the input of a custom ``autograd.Function``, read in its forward). At the end of the block each is named by the local variable of the code that entered the
  ``with`` that holds it (``hpreact``). A tensor no such variable holds (a temporary inside an expression,
  or an intermediate of a function called in the block) is dropped, unless ``temporaries=True``: then it
  is kept under the name of the operation that made it (``#12 sum``). Tensors made under ``torch.no_grad()``
  (running statistics) do not require grad and are not recorded.
- ``rec("name", tensor)`` records (or renames) a tensor explicitly, inside the block or after it, and
  returns it; with ``collect=False`` only those are recorded.

Write the manual backward after the block (or under ``torch.no_grad()``): in the block, a gradient computed
from tensors that require grad would be recorded as an intermediate. Each row keeps both gradients,
``row.value`` (yours) and ``row.reference`` (autograd's).

Forward order is the order of creation (a tensor read but not made in the block: when it was first read).
The backward pass meets them in the reverse order.

Where the bug is. A wrong gradient makes every gradient computed from it wrong too, so most of a table can
be red for a single mistake. :class:`IntermediateReport` names the *bug sites*: a recorded tensor ``x``
whose manual gradient ``dx`` is wrong (differs from autograd's) although the step that computes it was given
what it needs: precisely, ``dx`` also differs from the gradient autograd computes for ``x`` when every other
recorded tensor's gradient is replaced by your manual one (a second backward pass with tensor hooks), i.e.
from what a correct step would have made of your gradients downstream (toward the loss). ``first_wrong`` is
the first wrong gradient in backward order: every gradient a backward pass computes before it is right, so
it is always a bug site. Two independent mistakes give two sites, even when one lies upstream of the other.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, fields
from types import FrameType
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .reports import Report, Row, compare_tensors, default_tolerances, fmt_err, format_table

__all__ = [
    "IntermediateReport",
    "IntermediateRow",
    "Recorder",
    "assert_intermediates_match",
    "record",
]


def _tensors(obj: Any) -> Iterator[Tensor]:
    """The tensors in an op's arguments or outputs (nested in tuples, lists, dicts, return types)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _recordable(t: Tensor) -> bool:
    return t.requires_grad and (t.is_floating_point() or t.is_complex())


def _op_name(func: Any) -> str:
    """``tanh``, ``matmul``, ``getitem``; a property such as ``.T`` by its own name."""
    name = getattr(func, "__name__", "") or type(func).__name__
    if name == "__get__":  # a property of Tensor: the descriptor it belongs to has the name
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name.strip("_") or name


def _inplace(func: Any) -> bool:
    """``add_``, ``__iadd__``...: the op writes into its first argument and returns it."""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or (name.startswith("__i") and name != "__index__")


class _Mode(TorchFunctionMode):
    """Sees every torch function and Tensor method called in the block, with its arguments and outputs."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        made = list(_tensors(out))
        if made:  # an op that makes tensors (not a read of .shape): what it reads, then what it makes
            op = _op_name(func)
            for t in _tensors((args, kwargs)):
                if _recordable(t):  # read inside a custom Function's forward too, where outputs do not
                    self.recorder._see(t, "input", moved=False)
            for t in made:
                if _recordable(t):  # not under no_grad (running statistics)
                    self.recorder._see(t, op, moved=_inplace(func))
        return out


@dataclass
class _Entry:
    tensor: Tensor
    op: str  # the op that made it, or "input" for a tensor first seen as an argument
    order: int
    name: Optional[str] = None  # given with rec(name, t)


@dataclass
class IntermediateRow(Row):
    """One recorded tensor's gradient, manual against autograd (a :class:`~manualbp.verify.Row`).

    ``name`` is the recorded tensor's name (``hpreact``); its gradient is shown as ``dhpreact``. Beyond the
    :class:`Row` fields: ``given`` (a manual gradient was passed), ``affects_loss`` (autograd has a gradient:
    False for a tensor the loss does not depend on, where the manual gradient must be zero or absent),
    ``site`` (a bug site, see the module docstring), ``local_ok`` (the manual gradient against what a correct
    step makes of the manual gradients downstream; None where not given), ``op`` (what made the tensor:
    ``tanh``, ``getitem``, or ``input`` for one only read in the block) and ``order`` (forward order).
    """

    given: bool = True
    affects_loss: bool = True
    site: bool = False
    local_ok: Optional[bool] = None
    op: str = ""
    order: int = 0

    @property
    def grad_name(self) -> str:
        return "d" + self.name if self.name.isidentifier() else f"d({self.name})"

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update(given=self.given, affects_loss=self.affects_loss, site=self.site, local_ok=self.local_ok)
        d.update(op=self.op, order=self.order)
        return d


@dataclass
class IntermediateReport(Report):
    """Every recorded intermediate's gradient in forward order, manual against autograd.

    ``ok`` when every manual gradient given matches (``torch.testing.assert_close``'s rule, default
    tolerances for the dtype); intermediates with no manual gradient are listed in ``not_given`` and do not
    fail the report. ``bug_sites`` are the names of the bug sites in backward order (from the loss back) and
    ``first_wrong`` the first of them (None when ok); see the module docstring for what a bug site is.
    ``str()`` is the table (gradient, shape, exact, approx, max diff, note) with the verdict, the first-wrong
    pointer and the missing gradients; ``to_dict()`` is JSON-ready.
    """

    bug_sites: list[str] = field(default_factory=list)

    @property
    def first_wrong(self) -> Optional[str]:
        return self.bug_sites[0] if self.bug_sites else None

    @property
    def not_given(self) -> list[str]:
        return [r.name for r in self.rows if not r.given]

    @property
    def wrong(self) -> list[str]:
        """Every intermediate whose gradient differs from autograd's, in forward order."""
        return [r.name for r in self.rows if not r.ok]

    def _note(self, r: IntermediateRow) -> str:
        if not r.given:
            return "not given" + ("" if r.affects_loss else " (does not affect the loss)")
        if not r.affects_loss:
            return "does not affect the loss" + ("" if r.ok else ": should be zero")
        if r.ok:
            return ""
        where = "<- first wrong (bug site)" if r.name == self.first_wrong else ("<- bug site" if r.site else "")
        why = r.note if not r.compared else ""
        return "; ".join(x for x in (where, why) if x) or "follows from a wrong gradient downstream"

    def table(self, rows: Optional[list[IntermediateRow]] = None) -> str:  # type: ignore[override]
        rows = self.rows if rows is None else rows
        body = []
        for r in rows:
            compared = r.given and r.compared
            body.append(
                [
                    r.grad_name,
                    "x".join(map(str, r.shape)) or "scalar",
                    str(r.exact) if compared else "-",
                    str(r.ok) if compared else "-",
                    fmt_err(r.max_abs_err) if compared else "-",
                    self._note(r),
                ]
            )
        return format_table(["gradient", "shape", "exact", "approx", "max diff", "note"], body, "llllrl")

    def summary(self) -> str:
        given = [r for r in self.rows if r.given]
        tol = f"rtol={self.rtol:g}, atol={self.atol:g}"
        if self.ok:
            lines = [
                f"PASS: {len(given)}/{len(given)} manual gradients match autograd "
                f"({self.n_exact_given}/{len(given)} bit-for-bit; {tol})"
            ]
        else:
            bad = [r for r in given if not r.ok]
            sites = ", ".join("d" + s if s.isidentifier() else f"d({s})" for s in self.bug_sites)
            lines = [
                f"FAIL: {len(bad)} of {len(given)} manual gradients differ from autograd ({tol}); "
                f"bug site{'s' if len(self.bug_sites) > 1 else ''} (backward order): {sites}"
            ]
            first = self[self.first_wrong] if self.first_wrong else None
            if first is not None:
                detail = first.note if not first.compared else f"max diff {fmt_err(first.max_abs_err)}"
                lines.append(
                    f"first wrong: {first.grad_name} ({'x'.join(map(str, first.shape)) or 'scalar'}, {detail}): "
                    f"every gradient a backward pass computes before it is right, so the bug is in the step "
                    f"that computes {first.grad_name}"
                )
        missing = [r.grad_name for r in self.rows if not r.given]
        if missing:
            lines.append(f"not given ({len(missing)}): {', '.join(missing)}")
        return "\n".join(lines)

    @property
    def n_exact_given(self) -> int:
        return sum(r.exact for r in self.rows if r.given and r.compared)

    def raise_if_failed(self) -> IntermediateReport:
        """Raise AssertionError with the table and the first-wrong pointer unless ok; return self."""
        __tracebackhide__ = True  # pytest: a failing test shows this message, not this function's source
        if not self.ok:
            details = "\n".join(r.describe() for r in self.rows if r.given and not r.ok)
            raise AssertionError(f"manual gradients do not match autograd\n{self}\n\n{details}")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update(first_wrong=self.first_wrong, bug_sites=list(self.bug_sites), not_given=self.not_given)
        return d


class Recorder:
    """Records the tensors of a forward pass; :meth:`compare` checks manual gradients of them all.

    Made by :func:`record` (see the module docstring for what is recorded and how it is named). Call it,
    ``rec("name", tensor)``, to record or name a tensor explicitly; ``rec.names`` lists the recorded names in
    forward order and ``rec["name"]`` gives a recorded tensor.
    """

    def __init__(
        self, *, collect: bool = True, temporaries: bool = False, namespace: Optional[Mapping[str, Any]] = None
    ) -> None:
        self.collect = collect
        self.temporaries = temporaries
        self.namespace = namespace  # names tensors by these variables instead of the entering frame's locals
        self._entries: dict[int, _Entry] = {}  # id(tensor) -> entry (the entry keeps the tensor alive)
        self._counter = 0
        self._mode: Optional[_Mode] = None
        self._frame: Optional[FrameType] = None
        self._named: dict[str, _Entry] = {}
        self._done = False

    # -- recording ---------------------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        if self._mode is not None or self._done:
            raise RuntimeError("a Recorder records one forward: make a new one with record()")
        self._frame = sys._getframe(1)  # the code that wrote `with record() as rec:`
        if self.collect:
            self._mode = _Mode(self)
            self._mode.__enter__()
        else:
            self._mode = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        frame, self._frame = self._frame, None
        self._done = True
        local_names: dict[int, str] = {}
        variables = self.namespace if self.namespace is not None else (frame.f_locals if frame is not None else {})
        if self.collect:
            for var, value in variables.items():
                if isinstance(value, Tensor):
                    local_names.setdefault(id(value), var)
        del frame
        taken = set(self._named)
        for key, e in sorted(self._entries.items(), key=lambda kv: kv[1].order):
            if e.name is not None:
                continue
            var = local_names.get(key)
            if var is not None and var not in taken:
                e.name = var
            elif self.temporaries:
                e.name = f"#{e.order} {e.op}"
            else:
                del self._entries[key]
                continue
            taken.add(e.name)
            self._named[e.name] = e

    def _see(self, t: Tensor, op: str, moved: bool) -> None:
        e = self._entries.get(id(t))
        if e is None or moved:
            self._counter += 1
            if e is None:
                self._entries[id(t)] = _Entry(t, op, self._counter)
            else:  # an in-place op: the tensor now holds a later value of the forward
                e.op, e.order = op, self._counter

    def __call__(self, name: str, tensor: Tensor) -> Tensor:
        """Record ``tensor`` under ``name`` (explicitly, collecting or not) and return it."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"rec(name, tensor): name must be a non-empty str, got {name!r}")
        if not isinstance(tensor, Tensor):
            raise TypeError(f"rec({name!r}, tensor): expected a tensor, got {type(tensor).__name__}")
        if not _recordable(tensor):
            raise ValueError(
                f"rec({name!r}, tensor): the tensor does not require grad (or is not floating point), so it "
                "has no gradient to check"
            )
        other = self._named.get(name)
        if other is not None and other.tensor is not tensor:
            raise ValueError(f"rec({name!r}, tensor): the name {name!r} is already recorded for another tensor")
        e = self._entries.get(id(tensor))
        if e is None:
            self._counter += 1
            e = self._entries[id(tensor)] = _Entry(tensor, "input" if tensor.is_leaf else "named", self._counter)
        if e.name is not None and e.name != name:
            self._named.pop(e.name, None)
        e.name = name
        self._named[name] = e
        return tensor

    def forget(self, name: str) -> None:
        """Stop recording ``name`` (for example a gradient ``dx`` computed in grad mode, which was recorded
        as if it were an intermediate)."""
        e = self._named.pop(name, None)
        if e is None:
            raise KeyError(f"nothing recorded as {name!r}; recorded: {', '.join(self.names)}")
        self._entries.pop(id(e.tensor), None)

    @property
    def names(self) -> list[str]:
        """The recorded names, in forward order."""
        return [e.name for e in sorted(self._named.values(), key=lambda e: e.order) if e.name is not None]

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._named:
            raise KeyError(f"nothing recorded as {name!r}; recorded: {', '.join(self.names)}")
        return self._named[name].tensor

    def __repr__(self) -> str:
        return f"Recorder({len(self._named)} tensors: {', '.join(self.names)})"

    # -- comparing ---------------------------------------------------------------------------------
    def _manual(self, grads: Mapping[str, Any]) -> dict[str, Tensor]:
        """The manual gradient of each recorded name, from a dict of names or a namespace (``locals()``)."""
        if not isinstance(grads, Mapping):
            raise TypeError(f"grads must be a dict of gradients or locals(), got {type(grads).__name__}")
        recorded = {id(e.tensor) for e in self._named.values()}
        namespace = any(isinstance(v, Tensor) and id(v) in recorded for v in grads.values())
        out: dict[str, Tensor] = {}
        if namespace:  # the ninja convention: the gradient of `x` is the variable `dx`
            for name in self._named:
                g = grads.get("d" + name)
                if isinstance(g, Tensor):
                    out[name] = g
            return out
        unknown = []
        for key, g in grads.items():
            name = key if key in self._named else (key[1:] if key.startswith("d") and key[1:] in self._named else None)
            if name is None:
                unknown.append(key)
                continue
            if name in out:
                raise ValueError(f"grads: two gradients for {name!r} (keys {name!r} and {'d' + name!r})")
            if not isinstance(g, Tensor):
                raise TypeError(f"grads[{key!r}]: expected a tensor, got {type(g).__name__}")
            out[name] = g
        if unknown:
            raise ValueError(
                f"grads: no recorded intermediate named {', '.join(map(repr, unknown))}; recorded: "
                f"{', '.join(self.names)} (keys are these names, or with a 'd' in front; or pass locals())"
            )
        return out

    def compare(
        self,
        loss: Tensor,
        grads: Mapping[str, Any],
        *,
        rtol: Optional[float] = None,
        atol: Optional[float] = None,
    ) -> IntermediateReport:
        """Compare manual gradients of the recorded tensors with autograd's gradients of ``loss``.

        Args:
            loss: the scalar the gradients are of (one element, requires grad).
            grads: ``{name: gradient}`` keyed by recorded name (``"hpreact"``, or ``"dhpreact"``); or a
                namespace holding the recorded tensors themselves, such as ``locals()``: then the gradient
                of each recorded ``x`` is its entry ``dx`` (the backprop-ninja convention), other entries
                are ignored.
            rtol, atol: tolerances; default ``torch.testing.assert_close``'s for each gradient's dtype.

        Returns:
            An :class:`IntermediateReport`: one row per recorded tensor in forward order (the loss itself only
            when its gradient is given), the bug sites and ``first_wrong``.

        Raises:
            RuntimeError: called inside the ``with`` block, or after the graph of ``loss`` was freed.
            ValueError: a key of ``grads`` names no recorded tensor (the message lists the recorded names),
                ``loss`` is not a scalar that requires grad, or no gradient at all was given.
            TypeError: a gradient in a dict is not a tensor.
        """
        if self._mode is not None:
            raise RuntimeError("compare() after the `with record()` block, not inside it")
        _check_loss(loss)
        manual = self._manual(grads)
        if not manual:
            raise ValueError(
                f"no manual gradient for any recorded tensor (recorded: {', '.join(self.names)}); pass "
                "{name: gradient} or locals() holding d<name> for each"
            )
        entries = sorted(
            (e for e in self._named.values() if e.tensor is not loss or e.name in manual), key=lambda e: e.order
        )
        truth = _autograd_gradients(loss, [e.tensor for e in entries])
        local = _local_expectations(loss, entries, manual)
        rows = [_row(e, true, manual, local, rtol, atol) for e, true in zip(entries, truth)]
        wrong = [r for r in reversed(rows) if r.given and not r.ok]  # backward order
        sites = [r for r in wrong if r is wrong[0] or r.local_ok is False]
        for r in sites:
            r.site = True
        d_rtol, d_atol = default_tolerances(*[g.dtype for g in manual.values()], loss.dtype)
        return IntermediateReport(
            title="manual gradients vs autograd, intermediate by intermediate",
            rows=rows,
            rtol=d_rtol if rtol is None else rtol,
            atol=d_atol if atol is None else atol,
            meta={"loss": f"{loss.item():.6g}"},
            bug_sites=[r.name for r in sites],
        )


def _check_loss(loss: object) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError(
            f"loss must be a one-element tensor that requires grad, got "
            f"{type(loss).__name__ if not isinstance(loss, Tensor) else tuple(loss.shape)}"
        )


def _autograd_gradients(loss: Tensor, tensors: list[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Autograd's gradient of ``loss`` for each tensor (None where it does not affect the loss); the graph kept."""
    try:
        return torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
    except RuntimeError as e:
        if "second time" not in str(e):
            raise
        raise RuntimeError(
            "the graph of loss was freed (by loss.backward() or autograd.grad without retain_graph=True): "
            "call compare() before, or backward(retain_graph=True)"
        ) from e


def _row(
    e: _Entry,
    true: Optional[Tensor],
    manual: dict[str, Tensor],
    local: dict[str, Tensor],
    rtol: Optional[float],
    atol: Optional[float],
) -> IntermediateRow:
    """One recorded tensor's row: the manual gradient against autograd's, and against what a correct step
    would make of the manual gradients downstream (``local_ok``: False marks a bug site)."""
    assert e.name is not None
    common = {"affects_loss": true is not None, "op": e.op, "order": e.order}
    if e.name not in manual:
        shape = tuple(e.tensor.shape)
        return IntermediateRow(
            e.name, shape, math.nan, math.nan, False, True, note="not given", compared=False, reference=true,
            given=False, **common,
        )  # fmt: skip
    row = compare_tensors(e.name, manual[e.name], true, rtol, atol)
    if row.note.startswith("shape"):
        row.note = row.note.replace("reference", "autograd")
    local_row = compare_tensors(e.name, manual[e.name], local.get(e.name), rtol, atol)
    return IntermediateRow(**{f.name: getattr(row, f.name) for f in fields(Row)}, local_ok=local_row.ok, **common)


def _local_expectations(loss: Tensor, entries: list[_Entry], manual: dict[str, Tensor]) -> dict[str, Tensor]:
    """For each recorded tensor with a manual gradient: its gradient when every other such tensor's gradient
    flowing further back is replaced by the manual one (what correct steps make of the manual gradients).

    One backward pass with a tensor hook on each: the hook keeps the gradient that arrives and hands the
    manual one on upstream (autograd's own where the manual one has another shape). The hooks are removed.
    """
    arrived: dict[str, Tensor] = {}
    handles = []

    def hook_for(name: str, t: Tensor):  # noqa: ANN202
        def hook(g: Tensor) -> Tensor:
            arrived[name] = g.detach().clone()
            m = manual[name]
            return m.detach().to(g) if m.shape == g.shape else g

        return hook

    checked = [e for e in entries if e.name in manual]
    try:
        for e in checked:
            assert e.name is not None
            handles.append(e.tensor.register_hook(hook_for(e.name, e.tensor)))
        torch.autograd.grad(loss, [e.tensor for e in checked], retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return arrived


def record(
    *, collect: bool = True, temporaries: bool = False, namespace: Optional[Mapping[str, Any]] = None
) -> Recorder:
    """A :class:`Recorder` to use as ``with record() as rec:`` around a forward pass.

    Args:
        collect: record every tensor that requires grad made or read by a torch op in the block (named by the
            local variables of the code that entered the block). False: only those named with ``rec(name, t)``.
        temporaries: also keep collected tensors that no local variable holds, named ``#<order> <op>``.
        namespace: name the tensors by this mapping's variables (read when the block ends) instead of the
            entering code's locals (``manualbp check-intermediates`` passes a script's globals).

    Example::

        with record() as rec:
            h = torch.tanh(x @ W1 + b1)
            loss = (h @ W2).square().mean()
        dh = ...; dW2 = ...; dW1 = ...
        rec.compare(loss, locals()).raise_if_failed()
    """
    return Recorder(collect=collect, temporaries=temporaries, namespace=namespace)


def assert_intermediates_match(
    recorder: Recorder,
    loss: Tensor,
    grads: Mapping[str, Any],
    *,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
) -> IntermediateReport:
    """:meth:`Recorder.compare`, raising AssertionError (the table, the bug site) unless every gradient matches.

    Returns the :class:`IntermediateReport` when it does.
    """
    __tracebackhide__ = True  # pytest: a failing test shows this message, not this function's source
    return recorder.compare(loss, grads, rtol=rtol, atol=atol).raise_if_failed()
