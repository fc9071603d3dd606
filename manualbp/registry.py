"""The formula registries: one spec per activation and per loss, read by every layer and every path.

An activation or a loss is written once, as a spec here (``manualbp.functional`` registers the built-in ones
beside their formulas), and every consumer reads the spec by name at call time: the module's Functions
(``manualbp.autograd``, ``manualbp.nn``), the fused and vectorized trainers (through the in-place forms),
``manualbp.verify`` (trace, explain, the matrix: the text formulas), ``manualbp.init`` (the gains), the
training config and the CLI (the name lists). Modelled on PyTorch's ``tools/autograd/derivatives.yaml``: one
entry per op, every consumer derived from it.

Register your own with :func:`register_activation` / :func:`register_loss` (also ``manualbp.register_*``):

    >>> import torch, manualbp
    >>> manualbp.register_activation(
    ...     "softplus", forward=torch.nn.functional.softplus,
    ...     backward=lambda g, a: g * -torch.expm1(-a),  # dL/dz = dL/da * sigmoid(z) = dL/da (1 - e^{-a})
    ...     formula="a = log(1 + e^z)", derivative="(1 - e^{-{a}})")  # doctest: +SKIP

It then works in ``MLP(activation="softplus")``, ``manualbp.verify.compare/trace/explain`` and every training
backend; the compiled paths (C++ kernels for the built-in names only, ``native=True``) run the Python path
for it, which is their documented fallback. A registered activation's derivative must be a function of the
saved output a (as the notes' are); a registered loss's targets are ``"values"`` (regression, shaped like
the output) or ``"classes"`` (class indices).

Internally every activation callable takes the negative slope as a last argument (only ``leaky_relu`` reads
it), so that no path branches on the name: ``forward(z, s)``, ``backward(dL/da, a, s)``,
``forward_into(z, out, s)`` (``out`` may be ``z``: in place), ``backward_(g, a, s)`` (g <- g sigma', in place).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import Tensor

__all__ = [
    "Activation",
    "Loss",
    "ACTIVATION_REGISTRY",
    "LOSS_REGISTRY",
    "register_activation",
    "register_loss",
    "activation_spec",
    "loss_spec",
    "activation_names",
    "loss_names",
    "LOSS_TARGETS",
    "View",
    "MEAN_OVER",
]

LOSS_TARGETS = ("classes", "values")
MEAN_OVER = ("examples", "elements")


@dataclass(frozen=True)
class Activation:
    """One activation a = sigma(z): its forward, its derivative from the saved output, and their in-place forms.

    ``formula`` is a = ... and ``derivative`` sigma'(z) as a function of the output, both in the notes'
    notation; ``derivative`` holds ``{a}`` where the output's symbol goes (``"{a} (1 - {a})"``).
    ``gain(slope)`` is the init gain (``torch.nn.init.calculate_gain``'s value; 1 where none is known).
    ``native``: the compiled kernels (``manualbp/csrc/native.h``) have it; ``saves_output``: its derivative
    reads a (identity's does not). ``torch_module(slope)`` builds the equivalent ``torch.nn`` module (None: a
    module that runs ``forward`` under plain autograd, the independent reference)."""

    name: str
    forward: Callable[[Tensor, float], Tensor]
    backward: Callable[[Tensor, Tensor, float], Tensor]
    formula: str
    derivative: str
    forward_into: Callable[[Tensor, Tensor, float], Any]
    backward_: Callable[[Tensor, Tensor, float], Any]
    gain: Callable[[float], float]
    takes_slope: bool = False
    native: bool = False
    saves_output: bool = True
    torch_module: Optional[Callable[[float], torch.nn.Module]] = None

    def sigma_prime(self, a: str = "a") -> str:
        """The derivative's text with ``a`` as the output's symbol: ``a (1 - a)``, ``(1 - (a^1)^2)``."""
        return self.derivative.replace("{a}", a)


@dataclass(frozen=True)
class Loss:
    """One loss L(o, y): ``forward(o, y, reduction)`` and ``backward(dL_total/dL, o, y, reduction)`` ->
    ``(dL/do, dL/dy or None)`` with the reduction's factor, ``reduction`` one of "mean", "sum", "none".

    ``formula``/``gradient``: L and dL/do in the notes' notation; ``targets``: "classes" (class indices) or
    "values" (shaped like o); ``mean_over``: what "mean" divides by, the "examples" (leading dimensions) or
    every "element"; ``reference(o, y, reduction)``: the same loss written with PyTorch's own ops, for the
    autograd twin and ``verify`` (for a registered loss its forward, which autograd then differentiates);
    ``jvp(o, y, do, dy, reduction)`` the forward-mode rule, or None; ``native``: the fast trainers' kernels
    (the C++ loop) have it, else they take the spec's backward. ``grad_into(out, y, grad, dim)`` is the fast
    trainers' in-place form: dL/do, up to ``fused_scales``' scale and the reduction's factor, written into ``grad``
    (``dim`` the class dimension; for cross-entropy ``out`` holds log softmax(o)); ``fused_scales`` =
    ``(loss_scale, scale)``: the batch loss is loss_scale times the trainers' dot product, dL/do is scale times
    ``grad`` (``fast.fused.loss_scales``). Both None: the fast trainers take ``backward``."""

    name: str
    forward: Callable[[Tensor, Tensor, str], Tensor]
    backward: Callable[[Tensor, Tensor, Tensor, str], tuple[Tensor, Optional[Tensor]]]
    formula: str
    gradient: str
    targets: str = "values"
    mean_over: str = "examples"
    reference: Optional[Callable[[Tensor, Tensor, str], Tensor]] = None
    jvp: Optional[Callable[..., Optional[Tensor]]] = None
    native: bool = False
    grad_into: Optional[Callable[[Tensor, Tensor, Tensor, int], Any]] = None
    fused_scales: Optional[tuple[float, float]] = None

    def torch_reference(self) -> Callable[[Tensor, Tensor, str], Tensor]:
        """The reference (PyTorch ops): ``reference``, else ``forward`` (autograd differentiates the formula)."""
        return self.reference if self.reference is not None else self.forward

    def count(self, input: Tensor) -> int:
        """What "mean" divides by for an output ``input`` of shape (*, K): examples or elements."""
        return input.numel() if self.mean_over == "elements" else input.shape[:-1].numel()


class UnknownName(KeyError, ValueError):
    """An unregistered name: a ValueError for users (the message lists the names), a KeyError for Mapping.get."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Registry(Mapping[str, Any]):
    """name -> spec, in registration order; a read-only mapping with a clear error for an unknown name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._specs: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        try:
            return self._specs[name]
        except (KeyError, TypeError):
            raise UnknownName(f"{self.kind} must be one of {', '.join(self._specs)}, got {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __setitem__(self, name: str, spec: Any) -> None:
        """Redefine a registered name (``monkeypatch.setitem`` works); the spec's name must match."""
        if getattr(spec, "name", None) != name:
            raise ValueError(f"{self.kind} {name!r}: expected a spec named {name!r}, got {spec!r}")
        self[name]
        self._specs[name] = spec

    def add(self, spec: Any, replace: bool) -> Any:
        if spec.name in self._specs and not replace:
            raise ValueError(f"{self.kind} {spec.name!r} is already registered (pass replace=True to redefine it)")
        self._specs[spec.name] = spec
        return spec

    def remove(self, name: str) -> None:
        """Unregister ``name`` (a registered user formula; tests use it to clean up)."""
        self[name]
        del self._specs[name]

    def swap(self, spec: Any) -> Any:
        """Replace the spec of an already registered name; returns the old one (``verify.inject_bug``)."""
        old = self[spec.name]
        self[spec.name] = spec
        return old


class View(Mapping[str, Any]):
    """A live read-only view of a registry: name -> ``get(spec)``, for the tables the layers offered before
    the registries (``functional.ACTIVATIONS``, ``verify.ACTIVATION_DERIVATIVES``, ...): a name registered
    later is in it, and a spec swapped by ``verify.inject_bug`` is what it returns."""

    def __init__(self, registry: Mapping[str, Any], get: Callable[[Any], Any]) -> None:
        self._registry, self._get = registry, get

    def __getitem__(self, name: str) -> Any:
        return self._get(self._registry[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry)

    def __len__(self) -> int:
        return len(self._registry)

    def __contains__(self, name: object) -> bool:
        return name in self._registry


#: name -> :class:`Activation`
ACTIVATION_REGISTRY: _Registry = _Registry("activation")
#: name -> :class:`Loss`
LOSS_REGISTRY: _Registry = _Registry("loss")


def activation_spec(name: str) -> Activation:
    """The spec of the activation called ``name`` (a ValueError listing the registered names otherwise)."""
    return ACTIVATION_REGISTRY[name]


def loss_spec(name: str) -> Loss:
    """The spec of the loss called ``name`` (a ValueError listing the registered names otherwise)."""
    return LOSS_REGISTRY[name]


def activation_names() -> tuple[str, ...]:
    """Every registered activation, in registration order (the one list configs, CLI and verify offer)."""
    return tuple(ACTIVATION_REGISTRY)


def loss_names() -> tuple[str, ...]:
    """Every registered loss, in registration order."""
    return tuple(LOSS_REGISTRY)


def _check_registration(name: object, forward: object, backward: object, texts: dict[str, object]) -> None:
    """What both registrations check: the name, the two callables and the formulas' texts (each error names
    its argument)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name: expected a name made of letters, digits and underscores, got {name!r}")
    for value, what in ((forward, "forward"), (backward, "backward")):
        if not callable(value):
            raise TypeError(f"{what} must be callable, got {type(value).__name__}")
    for what, text in texts.items():
        if not isinstance(text, str) or not text:
            raise ValueError(f"{what}: expected the formula as text, got {text!r}")


def _with_slope(fn: Callable[..., Any], takes_slope: bool) -> Callable[..., Any]:
    """The internal convention: every activation callable takes the slope last (ignored unless it reads it)."""
    if takes_slope:
        return fn
    return lambda *args: fn(*args[:-1])


def register_activation(
    name: str,
    forward: Callable[..., Tensor],
    backward: Callable[..., Tensor],
    *,
    formula: str,
    derivative: str,
    forward_into: Optional[Callable[..., Any]] = None,
    backward_: Optional[Callable[..., Any]] = None,
    gain: float = 1.0,
    takes_slope: bool = False,
    torch_module: Optional[Callable[[float], torch.nn.Module]] = None,
    replace: bool = False,
) -> Activation:
    """Register a new activation; every path and every check picks it up by ``name``.

    Args:
        name: the name configs, ``MLP(activation=...)`` and the CLI use.
        forward: ``forward(z) -> a`` with torch ops (``forward(z, negative_slope)`` if ``takes_slope``).
        backward: ``backward(dL/da, a) -> dL/dz`` from the saved output a (differentiable torch ops, so that
            double backward works; ``backward(dL/da, a, negative_slope)`` if ``takes_slope``).
        formula: a = ... in the notes' notation, e.g. ``"a = log(1 + e^z)"``.
        derivative: sigma'(z) from the output, with ``{a}`` for the output, e.g. ``"(1 - e^{-{a}})"``.
        forward_into, backward_: optional in-place forms for the fast trainers, ``forward_into(z, out)``
            (``out`` may be ``z``) and ``backward_(g, a)`` (g <- g sigma'); derived from forward/backward if
            omitted (one more temporary per layer and step).
        gain: the init gain for ``gain: auto`` and the kaiming schemes (default 1).
        torch_module: ``torch_module(negative_slope) -> nn.Module``, the equivalent torch module for
            ``MLP.to_torch()`` (default: a module running ``forward`` under autograd).
        replace: redefine an already registered name.
    """
    _check_registration(name, forward, backward, {"formula": formula, "derivative": derivative})
    if not (isinstance(gain, (int, float)) and not isinstance(gain, bool) and gain > 0):
        raise ValueError(f"gain must be a positive number, got {gain!r}")
    fwd, bwd = _with_slope(forward, takes_slope), _with_slope(backward, takes_slope)
    into = _with_slope(forward_into, takes_slope) if forward_into is not None else _copy_into(fwd)
    inplace = _with_slope(backward_, takes_slope) if backward_ is not None else _backward_inplace(bwd)
    spec = Activation(
        name, fwd, bwd, formula, derivative, into, inplace, lambda slope: float(gain),
        takes_slope=takes_slope, torch_module=torch_module,
    )  # fmt: skip
    return ACTIVATION_REGISTRY.add(spec, replace)


def _copy_into(forward: Callable[..., Tensor]) -> Callable[..., Any]:
    return lambda z, out, s: out.copy_(forward(z, s))  # a = sigma(z) into out


def _backward_inplace(backward: Callable[..., Tensor]) -> Callable[..., Any]:
    return lambda g, a, s: g.copy_(backward(g, a, s))  # g <- g sigma'(z)


def add_builtin_activation(spec: Activation) -> Activation:
    """``manualbp.functional``'s registration of a built-in spec (already in the internal convention)."""
    return ACTIVATION_REGISTRY.add(spec, replace=False)


def register_loss(
    name: str,
    forward: Callable[[Tensor, Tensor, str], Tensor],
    backward: Callable[..., Any],
    *,
    formula: str,
    gradient: str,
    targets: str = "values",
    mean_over: str = "examples",
    reference: Optional[Callable[[Tensor, Tensor, str], Tensor]] = None,
    jvp: Optional[Callable[..., Optional[Tensor]]] = None,
    replace: bool = False,
) -> Loss:
    """Register a new loss; every path and every check picks it up by ``name``.

    Args:
        name: the name configs (``loss: NAME``), ``manualbp.nn.make_loss`` and ``verify`` use.
        forward: ``forward(o, y, reduction) -> L`` with torch ops; ``reduction`` is "mean" (over what
            ``mean_over`` says), "sum" or "none" (one value per example).
        backward: ``backward(dL_total/dL, o, y, reduction) -> dL/do`` (or ``(dL/do, dL/dy)``), the
            reduction's factor included; differentiable torch ops.
        formula, gradient: L and dL/do as text in the notes' notation.
        targets: "values" (regression targets shaped like o) or "classes" (class indices). The fast trainers
            run registered "values" losses through ``backward``; a "classes" loss trains on ``backend:
            manual`` / ``autograd`` / ``both``.
        mean_over: "examples" or "elements": what reduction "mean" divides by.
        reference: the loss with PyTorch's own ops, if different from ``forward``.
        jvp: ``jvp(o, y, do, dy, reduction) -> dL`` for forward-mode AD (optional).
    """
    _check_registration(name, forward, backward, {"formula": formula, "gradient": gradient})
    if targets not in LOSS_TARGETS:
        raise ValueError(f"targets must be one of {', '.join(LOSS_TARGETS)}, got {targets!r}")
    if mean_over not in MEAN_OVER:
        raise ValueError(f"mean_over must be one of {', '.join(MEAN_OVER)}, got {mean_over!r}")

    def pair(grad_output: Tensor, input: Tensor, target: Tensor, reduction: str) -> tuple[Tensor, Optional[Tensor]]:
        result = backward(grad_output, input, target, reduction)
        return result if isinstance(result, tuple) else (result, None)

    spec = Loss(name, forward, pair, formula, gradient, targets, mean_over, reference, jvp)
    return LOSS_REGISTRY.add(spec, replace)


def add_builtin_loss(spec: Loss) -> Loss:
    """``manualbp.functional``'s registration of a built-in spec."""
    return LOSS_REGISTRY.add(spec, replace=False)


def replaced(spec: Any, **changes: Any) -> Any:
    """A copy of ``spec`` with ``changes`` (``dataclasses.replace``), for :meth:`_Registry.swap`."""
    return dataclasses.replace(spec, **changes)
