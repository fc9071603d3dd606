"""explain: the worked example of the notes, every scalar, on a tiny network.

:func:`explain` runs one forward and backward pass of a tiny float64 network with weights rounded to two
decimals and names every scalar as the notes do (z_i, a_i, o_k, dL/dw2_ki, ...), each value from
:func:`~manualbp.verify.trace` with its check against native autograd (:class:`Explanation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor

from .. import functional as F
from ..nn import MLP
from ..registry import ACTIVATION_REGISTRY, LOSS_REGISTRY
from .references import LOSSES
from .reports import TraceReport
from .tracing import trace

__all__ = ["ExplainStep", "ExplainValue", "Explanation", "explain"]

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


def _check_explain_args(widths: Sequence[int], activation: str, loss: str) -> list[int]:
    """The layer sizes as a list, after checking ``widths``, ``activation`` and ``loss`` (each error names its argument)."""
    widths = list(widths) if isinstance(widths, (list, tuple)) else widths
    if (
        not isinstance(widths, list)
        or len(widths) < 2
        or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths)
    ):
        raise ValueError(f"widths: expected at least two positive integers (input, hidden..., output), got {widths!r}")
    if activation not in F.ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(F.ACTIVATIONS)}, got {activation!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    return widths


def _rounded_example(widths: list[int], activation: str, loss: str, seed: int) -> tuple[MLP, Tensor, Tensor, Tensor]:
    """The float64 network, input x, target y and target vector y_k of the example, all rounded to two decimals.

    ``y`` is what the loss takes (class indices for cross-entropy), ``y_vec`` the notes' y_k (one-hot there).
    """
    torch.manual_seed(seed)
    model = MLP(widths[0], widths[1:-1], widths[-1], activation, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p * 100) / 100)
    gen = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(1, widths[0], generator=gen, dtype=torch.float64) * 100) / 100
    if LOSS_REGISTRY[loss].targets == "classes":
        y = torch.randint(0, widths[-1], (1,), generator=gen)
        y_vec = TF.one_hot(y, widths[-1]).to(torch.float64)
    else:
        y = torch.round(torch.randn(1, widths[-1], generator=gen, dtype=torch.float64) * 100) / 100
        y_vec = y
    return model, x, y, y_vec


@dataclass
class _Names:
    """The notes' symbols for a network of ``n_layers`` layers: with one hidden layer (two layers) the notes'
    own (z_i, a_i, o_k, w1_ij, w2_ki), deeper networks with superscripts (z^l_i, a^l_i, w^l_ij)."""

    n_layers: int

    @property
    def notes_style(self) -> bool:
        return self.n_layers == 2

    def unit(self, lyr: int) -> str:
        """The index letter of a layer's units."""
        return "k" if lyr == self.n_layers else "i"

    def prev(self, lyr: int) -> str:
        """The index letter of a layer's inputs."""
        return "j" if lyr == 1 or lyr < self.n_layers else "i"

    def w(self, lyr: int) -> str:
        return f"w{lyr}" if self.notes_style else f"w^{lyr}"

    def b(self, lyr: int) -> str:
        return f"b{lyr}" if self.notes_style else f"b^{lyr}"

    def z(self, lyr: int) -> str:
        return "o" if lyr == self.n_layers else ("z" if self.notes_style else f"z^{lyr}")

    def a(self, lyr: int) -> str:
        return "x" if lyr == 0 else ("a" if self.notes_style else f"a^{lyr}")


@dataclass
class _Values:
    """The scalars of a quantity: from a tensor, or from a row of the trace with autograd's value beside it."""

    report: TraceReport

    def elements(self, base: str, t: Tensor, checked: Optional[Tensor] = None) -> list[ExplainValue]:
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
                ok = abs(value - r) <= self.report.atol + self.report.rtol * abs(r)
                out.append(ExplainValue(name, index, value, r, ok))
        return out

    def row(self, name: str) -> tuple[Tensor, Tensor]:
        """The manual value and autograd's of the trace row ``name``."""
        rw = self.report[name]
        assert rw.value is not None and rw.reference is not None
        return rw.value, rw.reference

    def traced(self, base: str, name: str) -> list[ExplainValue]:
        """The elements of the trace row ``name``, each checked against autograd."""
        return self.elements(base, *self.row(name))


def _given_steps(
    model: MLP, x: Tensor, y: Tensor, y_vec: Tensor, loss: str, n: _Names, v: _Values
) -> list[ExplainStep]:
    """The example (x_j, y_k) and every weight and bias."""
    out_features = y_vec.shape[-1]
    target_note = (
        f"class {int(y[0]) + 1} of {out_features}: y_k = 1 for k = {int(y[0]) + 1}" if loss == "cross_entropy" else ""
    )
    steps = [
        ExplainStep("given", "x_j", "", v.elements("x", x)),
        ExplainStep("given", "y_k", target_note, v.elements("y", y_vec)),
    ]
    for lyr, lin in enumerate(model.linears, start=1):
        steps.append(
            ExplainStep("given", f"{n.w(lyr)}_{n.unit(lyr)}{n.prev(lyr)}", "", v.elements(n.w(lyr), lin.weight))
        )
        steps.append(ExplainStep("given", f"{n.b(lyr)}_{n.unit(lyr)}", "", v.elements(n.b(lyr), lin.bias)))
    return steps


def _forward_steps(activation: str, loss: str, out_features: int, n: _Names, v: _Values) -> list[ExplainStep]:
    """The forward pass: z (and a) of every layer, o, yhat for cross-entropy, and L."""
    steps = []
    for lyr in range(1, n.n_layers + 1):
        u, p = n.unit(lyr), n.prev(lyr)
        formula = f"sum_{p} {n.w(lyr)}_{u}{p} {n.a(lyr - 1)}_{p} + {n.b(lyr)}_{u}"
        tr_name = "o" if lyr == n.n_layers else f"z^{lyr}"
        steps.append(ExplainStep("forward", f"{n.z(lyr)}_{u}", formula, v.traced(n.z(lyr), tr_name)))
        if lyr < n.n_layers:
            formula = f"sigma({n.z(lyr)}_{u}),  sigma = {activation}"
            steps.append(ExplainStep("forward", f"{n.a(lyr)}_{u}", formula, v.traced(n.a(lyr), f"a^{lyr}")))
    loss_formula = {  # the built-in losses in the worked example's words; any other: the registry's text
        "squared_error": "1/2 sum_k (o_k - y_k)^2",
        "mse": f"1/K sum_k (o_k - y_k)^2,  K = {out_features}",
        "cross_entropy": "sum_k -y_k log yhat_k,  yhat_k = e^(o_k) / sum_j e^(o_j)",
    }.get(loss, LOSS_REGISTRY[loss].formula)
    if loss == "cross_entropy":  # the notes' predicted distribution, softmax of the logits
        o_manual, o_native = v.row("o")
        yhat = v.elements("yhat", F.softmax(o_manual), torch.softmax(o_native, dim=-1))
        steps.append(ExplainStep("forward", "yhat_k", "e^(o_k) / sum_j e^(o_j)", yhat))
        loss_formula = "sum_k -y_k log yhat_k"
    steps.append(ExplainStep("forward", "L", loss_formula, v.traced("L", "L")))
    return steps


def _backward_steps(activation: str, loss: str, n: _Names, v: _Values) -> list[ExplainStep]:
    """The backward pass: dL/dL, dL/do, then from the last layer down the weight, bias, a and z gradients."""
    grad_o = {"squared_error": "o_k - y_k", "mse": "2 (o_k - y_k) / K", "cross_entropy": "yhat_k - y_k"}.get(
        loss, LOSS_REGISTRY[loss].gradient
    )
    steps = [
        ExplainStep("backward", "dL/dL", "1  (base case)", v.traced("dL/dL", "dL/dL")),
        ExplainStep("backward", "dL/do_k", f"dL/dL * ({grad_o})", v.traced("dL/do", "dL/do")),
    ]
    for lyr in range(n.n_layers, 0, -1):
        u, p = n.unit(lyr), n.prev(lyr)
        g = f"dL/d{n.z(lyr)}_{u}"
        w_grad = v.traced(f"dL/d{n.w(lyr)}", f"dL/dW^{lyr}")
        steps.append(ExplainStep("backward", f"dL/d{n.w(lyr)}_{u}{p}", f"{g} * {n.a(lyr - 1)}_{p}", w_grad))
        steps.append(ExplainStep("backward", f"dL/d{n.b(lyr)}_{u}", g, v.traced(f"dL/d{n.b(lyr)}", f"dL/db^{lyr}")))
        if lyr > 1:
            steps += _hidden_backward_steps(activation, lyr, n, v)
    return steps


def _hidden_backward_steps(activation: str, lyr: int, n: _Names, v: _Values) -> list[ExplainStep]:
    """dL/da and dL/dz of the hidden layer below layer ``lyr``: the sum over ``lyr``'s units, then sigma'."""
    u, p, lower = n.unit(lyr), n.prev(lyr), lyr - 1
    g = f"dL/d{n.z(lyr)}_{u}"
    a_sym = f"{n.a(lower)}_{p}"
    deriv = ACTIVATION_REGISTRY[activation].sigma_prime(f"({a_sym})" if "^" in a_sym else a_sym)  # sigma' from a
    zl = "z" if n.notes_style else f"z^{lower}"
    return [
        ExplainStep(
            "backward",
            f"dL/d{n.a(lower)}_{p}",
            f"sum_{u} {g} * {n.w(lyr)}_{u}{p}",
            v.traced(f"dL/d{n.a(lower)}", f"dL/da^{lower}"),
        ),
        ExplainStep(
            "backward",
            f"dL/d{zl}_{p}",
            f"dL/d{n.a(lower)}_{p} * sigma'({zl}_{p}) = dL/d{n.a(lower)}_{p} * {deriv}",
            v.traced(f"dL/d{zl}", f"dL/dz^{lower}"),
        ),
    ]


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
    widths = _check_explain_args(widths, activation, loss)
    model, x, y, y_vec = _rounded_example(widths, activation, loss, seed)
    report = trace(model, x, y, loss)
    names, values = _Names(len(widths) - 1), _Values(report)
    steps = _given_steps(model, x, y, y_vec, loss, names, values)
    steps += _forward_steps(activation, loss, widths[-1], names, values)
    steps += _backward_steps(activation, loss, names, values)
    return Explanation(widths, activation, loss, seed, steps, report)


def _unravel(k: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for n in reversed(shape):
        out.append(k % n)
        k //= n
    return tuple(reversed(out))
