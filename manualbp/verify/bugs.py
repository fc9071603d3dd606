"""Deliberate bugs, to show (and test) that the checks catch them: the mutation catalogue.

:data:`CATALOGUE` holds one :class:`Bug` per formula of the hand-derived backward and the optimizer steps
(every activation derivative, every loss gradient and its reduction factor, softmax, dL/dW, dL/db, dL/da_prev,
momentum, Nesterov, weight decay, Adam's bias correction); :data:`BUGS` is its ``name -> description`` view. :func:`inject_bug`
breaks one formula inside a ``with`` block, on every Python path at once, and restores it on exit. It patches
the formula where each path reads it:

- the activation's spec in ``manualbp.registry`` (its backward and in-place form), which every path reads: the
  module's Python Functions, :func:`~manualbp.verify.trace`, the fused and vectorized trainers;
- ``manualbp.functional`` (``linear_backward``, the losses' backward, ``softmax_backward``): the module's Python
  Functions (``manualbp.autograd``: ``MLPFunction`` and the per-op Functions), and, through the registry's loss
  specs (which call them by name), trace and the vectorized trainer's general step;
- the fast trainers' fused kernels: ``manualbp.fast.fused`` (``output_grad_into``, ``loss_scales``,
  ``block_grad_into``, ``backprop_into``, ``FusedTrainer``'s update methods: the fused trainer's Python path
  and the vectorized trainer's plain-SGD step) and ``VectorizedTrainer._reduction_factor``;
- ``manualbp.optim_steps`` (``weight_decayed``, ``momentum_update_``, ``nesterov_direction``,
  ``bias_corrections``): the one source of the optimizer steps, which the fused trainer's Python path and the
  vectorized trainer's momentum / weight-decay / Adam step both call.

The compiled paths, ``manualbp/csrc/module.cpp`` (the module's C++ nodes, which ``manualbp.nn`` uses where
the extension is built and eligible) and ``manualbp/csrc/fused.cpp`` (``FusedTrainer.step_many``'s C++
loop), repeat the kernels: inside the block they stay on (nothing here sets ``MANUALBP_NATIVE``) and
``inject_bug`` sets the extension's runtime switch (:func:`manualbp.native.set_bug`; reset on exit, also on
an exception), so each C++ formula site computes the same wrong value as the Python patch. The name -> code
table is the extension's (:func:`manualbp.native.bug_codes`, from ``csrc/native.h``'s one list);
:data:`KERNEL_FREE` names the bugs without a C++ site and where the compiled paths read that formula instead
(the Python loss and softmax modules, ``loss_scales``): the Python patch reaches them there. To see a bug on
the Python path of the module or the fused trainer, run it explicitly (:func:`python_paths`).
The module trains with ``torch.optim``: the optimizer bugs do not apply to it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional
from unittest import mock

import torch
from torch import Tensor

from .. import functional as F
from .. import native as _native
from ..registry import ACTIVATION_REGISTRY, replaced

__all__ = ["BUGS", "CATALOGUE", "KERNEL_FREE", "PATHS", "Bug", "inject_bug", "python_paths"]

#: The execution paths, in the order the mutation matrix prints them: name -> what runs there.
PATHS = {
    "module": "MLP through its Python Functions (MLPFunction; per-op Functions when module hooks are set)",
    "module-native": "MLP through the C++ autograd nodes (manualbp/csrc/module.cpp)",
    "fused": "FusedTrainer, Python step (manualbp/fast/fused.py)",
    "fused-native": "FusedTrainer.step_many's C++ loop (manualbp/csrc/fused.cpp)",
    "vectorized": "VectorizedTrainer, plain SGD (the fused step batched over K models)",
    "vectorized-sgd": "VectorizedTrainer with momentum/weight decay or Adam (functional's formulas batched over K)",
}
#: The compiled paths: an injected bug reaches them through the extension's runtime switch.
NATIVE_PATHS = ("module-native", "fused-native")
_NO_OPTIMIZER = "n/a: the module has no hand-written optimizer (it trains with torch.optim)"
_NO_SOFTMAX = "n/a: no separate softmax (cross-entropy's dL/do is fused)"
_PLAIN_SGD = "n/a: plain SGD only (no momentum, weight decay or Adam on this path)"


@dataclass(frozen=True)
class Bug:
    """One deliberate bug: ``formula`` the formula it breaks (as the notes write it), ``description`` what the
    broken code computes instead; ``setting`` the configuration where the formula matters (activation, loss,
    reduction, optimizer: what the mutation matrix trains with); ``na`` the paths without this formula, with
    the reason."""

    name: str
    formula: str
    description: str
    setting: dict[str, Any] = field(default_factory=dict)
    na: dict[str, str] = field(default_factory=dict)

    def reach(self, path: str) -> Optional[str]:
        """None where the bug reaches ``path``, else the reason it does not."""
        return self.na.get(path)


_OPTIMIZER_NA = {"module": _NO_OPTIMIZER, "module-native": _NO_OPTIMIZER, "vectorized": _PLAIN_SGD}
_SOFTMAX_NA = {path: _NO_SOFTMAX for path in ("fused", "fused-native", "vectorized", "vectorized-sgd")}


def _bug(name: str, formula: str, description: str, na: Optional[dict] = None, **setting: Any) -> Bug:
    return Bug(name, formula, description, setting, na or {})


#: Every bug, one per formula (the names are stable: tests and the README use them).
CATALOGUE: dict[str, Bug] = {
    b.name: b
    for b in [
        # activation derivatives, from the saved output a
        _bug("sigmoid_missing_derivative", "dL/dz = dL/da * a (1 - a)", "dL/dz = dL/da: the a (1 - a) factor is missing", activation="sigmoid"),  # noqa: E501
        _bug("tanh_derivative_plus", "dL/dz = dL/da * (1 - a^2)", "dL/dz = dL/da * (1 + a^2)", activation="tanh"),
        _bug("relu_derivative_ones", "dL/dz = dL/da * [a > 0]", "dL/dz = dL/da * [a >= 0]: the gradient passes where z <= 0", activation="relu"),  # noqa: E501
        _bug("leaky_relu_slope_missing", "dL/dz = dL/da * ([a > 0] + s [a <= 0])", "dL/dz = dL/da * [a > 0]: the slope s is dropped", activation="leaky_relu"),  # noqa: E501
        _bug("identity_derivative_masked", "dL/dz = dL/da", "dL/dz = dL/da * [a > 0]: relu's mask on a linear layer", activation="identity"),  # noqa: E501
        # the losses' dL/do
        _bug("cross_entropy_grad_sign", "dL/do = softmax(o) - y", "dL/do = y - softmax(o)", loss="cross_entropy"),
        _bug("cross_entropy_missing_softmax", "dL/do = softmax(o) - y", "dL/do = -y: the softmax term is missing", loss="cross_entropy"),  # noqa: E501
        _bug("softmax_over_batch", "dL/do = softmax(o) - y, softmax over the classes k", "softmax taken over the batch (each class normalized over the examples)", loss="cross_entropy"),  # noqa: E501
        _bug("softmax_backward_missing_sum", "dL/do_k = yhat_k (dL/dyhat_k - sum_j dL/dyhat_j yhat_j)", "dL/do_k = yhat_k dL/dyhat_k: the softmax Jacobian's off-diagonal term is missing", _SOFTMAX_NA, loss="softmax"),  # noqa: E501
        _bug("squared_error_grad_doubled", "dL/do = o - y (L = 1/2 sum_k (o_k - y_k)^2)", "dL/do = 2 (o - y): mse's factor on the notes' loss", loss="squared_error"),  # noqa: E501
        _bug("mse_missing_factor_two", "dL/do = 2 (o - y) / numel", "dL/do = (o - y) / numel: the 2 is missing", loss="mse"),
        _bug("mse_mean_over_examples", "dL/do = 2 (o - y) / (N K) (mean over every element)", "dL/do = 2 (o - y) / N: mean over the examples only", loss="mse"),  # noqa: E501
        _bug("mean_reduction_missing_1_over_n", "dL/dL_n = 1/N for reduction='mean'", "dL/dL_n = 1: the mean is differentiated as a sum", loss="cross_entropy"),  # noqa: E501
        _bug("sum_reduction_divided_by_n", "dL/dL_n = 1 for reduction='sum'", "dL/dL_n = 1/N: the sum is differentiated as a mean", loss="cross_entropy", reduction="sum"),  # noqa: E501
        # the linear layer
        _bug("weight_grad_transposed", "dL/dW = (dL/dz)^T a_prev, (out, in)", "dL/dW computed transposed, a_prev^T dL/dz forced into (out, in)"),  # noqa: E501
        _bug("bias_grad_not_summed", "dL/db = sum_n dL/dz_n", "dL/db = dL/dz_1: the first example's only, not summed over the batch"),  # noqa: E501
        _bug("bias_grad_mean", "dL/db = sum_n dL/dz_n", "dL/db = 1/N sum_n dL/dz_n: averaged over the batch instead of summed"),  # noqa: E501
        _bug("input_grad_missing", "dL/da_prev = dL/dz W", "dL/da_prev = 0: backpropagation stops at each layer"),
        _bug("input_grad_weight_transposed", "dL/da_prev = dL/dz W", "dL/da_prev = dL/dz (W^T forced into (out, in))"),
        # the SGD update (torch.optim.SGD's)
        _bug("weight_decay_sign", "g = dL/dp + wd p", "g = dL/dp - wd p", _OPTIMIZER_NA, optim="weight_decay"),
        _bug("momentum_not_decayed", "buf = m buf + (1 - d) g", "buf = buf + (1 - d) g: the momentum factor m is missing", _OPTIMIZER_NA, optim="momentum"),  # noqa: E501
        _bug("nesterov_missing_momentum_factor", "direction = g + m buf", "direction = g + buf", _OPTIMIZER_NA, optim="nesterov"),  # noqa: E501
        # the Adam update (torch.optim.Adam's)
        _bug("adam_bias_correction_missing", "m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t)", "m_hat = m, v_hat = v: no 1 - beta^t bias correction", _OPTIMIZER_NA, optim="adam"),  # noqa: E501
    ]
}

#: The bugs whose formula has no site in the C++ kernels: name -> where the compiled paths read it instead (there
#: the Python patch reaches them). Every other catalogue bug has a code in :func:`manualbp.native.bug_codes`.
_SQUARED_ERRORS = (
    "the C++ module has no squared-error node (manualbp.nn's loss module runs its Python Function), and the C++ "
    "fused loop takes dL/do's factor from fast.fused.loss_scales"
)
KERNEL_FREE: dict[str, str] = {
    "softmax_backward_missing_sum": "no C++ softmax: manualbp.nn.Softmax runs its Python Function on every path",
    "squared_error_grad_doubled": _SQUARED_ERRORS,
    "mse_missing_factor_two": _SQUARED_ERRORS,
    "mse_mean_over_examples": _SQUARED_ERRORS,
}

#: name -> what the injected bug does to the hand-derived backward (the catalogue's descriptions).
BUGS: dict[str, str] = {name: f"{bug.description} (right: {bug.formula})" for name, bug in CATALOGUE.items()}


@contextlib.contextmanager
def python_paths() -> Iterator[None]:
    """``MANUALBP_NATIVE=off`` inside the block: the module and the fused trainer take their Python paths
    (the ones an injected bug reaches)."""
    with mock.patch.dict(os.environ, {"MANUALBP_NATIVE": "off"}):
        yield


@contextlib.contextmanager
def inject_bug(name: Optional[str]) -> Iterator[None]:
    """Temporarily break one formula on every path (a testing hook; ``None`` does nothing).

    Inside the ``with`` block every Python copy of the formula is broken (see the module docstring for the
    list) and the compiled kernels compute the same wrong value (the extension's switch, set where it is loaded
    or built in the block); everything is restored on exit, also on an exception. In nested blocks the kernels
    see the innermost bug. Names: see :data:`CATALOGUE`.
    """
    if name is None:
        yield
        return
    if name not in CATALOGUE:
        raise ValueError(f"bug must be one of {', '.join(map(repr, CATALOGUE))}, got {name!r}")
    with contextlib.ExitStack() as stack:
        for patch in _PATCHES[name]():
            stack.enter_context(patch)
        previous = _native.set_bug(name)  # the C++ sites (manualbp/csrc), one switch
        stack.callback(_native.set_bug, previous)
        yield


# --------------------------------------------------------------------------------------------------
# The patches, one list per bug
# --------------------------------------------------------------------------------------------------
def _fast() -> tuple[Any, Any]:
    from ..fast import fused, vectorized

    return fused, vectorized


def _wrap_attr(owner: Any, attr: str, make: Callable[[Callable], Callable]) -> Any:
    return mock.patch.object(owner, attr, make(getattr(owner, attr)))


@contextlib.contextmanager
def _swapped(registry: Any, spec: Any) -> Iterator[None]:
    """``spec`` in place of the registered spec of its name inside the block (the old one back on exit)."""
    old = registry.swap(spec)
    try:
        yield
    finally:
        registry.swap(old)


def _activation_patches(name: str, broken: Callable[[Tensor, Tensor, float], Tensor]) -> list:
    """``broken(dL/da, a, slope)`` -> the wrong dL/dz, in the activation's registry spec: its backward and its
    in-place form, which every path reads (the module's Functions, the fused and vectorized trainers)."""
    spec = ACTIVATION_REGISTRY[name]

    def backward(grad_output: Tensor, output: Tensor, negative_slope: float) -> Tensor:
        return broken(grad_output, output, negative_slope)

    def backward_(g: Tensor, a: Tensor, s: float) -> None:
        g.copy_(broken(g, a, s))

    return [_swapped(ACTIVATION_REGISTRY, replaced(spec, backward=backward, backward_=backward_))]


def _loss_input_patches(names: tuple[str, ...], broken: Callable[[Tensor, Tensor, str, str], Tensor]) -> list:
    """``broken(dL/do, o, reduction, loss)`` -> the wrong dL/do, in the losses' backward of functional and in
    the tables that read them (the registry's loss specs, whose backward looks them up by name). For
    cross-entropy ``o`` is log softmax(o) (the formula's root, ``cross_entropy_backward_from_log_probs``)."""
    attrs = {
        "squared_error": "squared_error_loss_backward",
        "mse": "mse_loss_backward",
        "cross_entropy": "cross_entropy_backward_from_log_probs",
    }
    patches = []
    for loss in names:
        original = getattr(F, attrs[loss])

        def wrapped(grad_output, input, target, reduction="mean", *rest, _original=original, _loss=loss):
            grad_input, grad_target = _original(grad_output, input, target, reduction, *rest)
            return broken(grad_input, input, reduction, _loss), grad_target

        # the registry's specs call these by their global names, so every path reading the registry sees it
        patches.append(mock.patch.object(F, attrs[loss], wrapped))
    return patches


def _count(input: Tensor, loss: str) -> int:
    """The examples of a loss's input (*, K), or its elements for mse: what "mean" divides by."""
    return input.numel() if loss == "mse" else input.shape[:-1].numel()


def _loss_scales_patch(broken: Callable[[str, str, int, int, float], float]) -> Any:
    """``broken(loss, reduction, n, classes, scale)`` -> the wrong dL/do scale of the fast trainers' step."""
    fused = _fast()[0]
    original = fused.loss_scales

    def loss_scales(loss_name: str, reduction: str, n: int, classes: int) -> tuple[float, float]:
        loss_scale, scale = original(loss_name, reduction, n, classes)
        return loss_scale, broken(loss_name, reduction, n, classes, scale)

    return mock.patch.object(fused, "loss_scales", loss_scales)


def _reduction_factor_patch(broken: Callable[[Any, Tensor, float], float]) -> Any:
    """The vectorized momentum step's own reduction factor (d reduced / d summed loss, per model)."""
    vectorized = _fast()[1]
    original = vectorized.VectorizedTrainer._reduction_factor

    def factor(self: Any, out: Tensor) -> float:
        return broken(self, out, original(self, out))

    return mock.patch.object(vectorized.VectorizedTrainer, "_reduction_factor", factor)


def _output_grad_patch(broken: Callable[[str, Tensor, Tensor, Tensor, int, Callable], None]) -> Any:
    fused = _fast()[0]
    original = fused.output_grad_into

    def output_grad_into(loss_name: str, out: Tensor, target: Tensor, grad: Tensor, dim: int) -> None:
        broken(loss_name, out, target, grad, dim, original)

    return mock.patch.object(fused, "output_grad_into", output_grad_into)


def _linear_patches(
    weight: Optional[Callable[[Tensor], Tensor]] = None,
    bias: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    input_weight: Optional[Callable[[Tensor], Tensor]] = None,
) -> list:
    """dL/dW -> ``weight(dL/dW)``; dL/db -> ``bias(dL/db, dL/dz as (rows, out) or (K, rows, out))``; dL/da_prev
    computed from ``input_weight(W)`` instead of W: in functional.linear_backward, and in the fused step's
    block gradient (``block_grad_into``) and backprop (``backprop_into``)."""
    fused = _fast()[0]
    original = F.linear_backward

    def linear_backward(grad_output, input, weight_, **needs):
        grad_input, grad_weight, grad_bias = original(grad_output, input, weight_, **needs)
        if input_weight is not None and grad_input is not None:
            grad_input = original(
                grad_output, input, input_weight(weight_), needs_weight_grad=False, needs_bias_grad=False
            )[0]
        if weight is not None and grad_weight is not None:
            grad_weight = weight(grad_weight)
        if bias is not None and grad_bias is not None:
            rows = grad_output if weight_ is not None and weight_.dim() == 3 else grad_output.reshape(-1, grad_output.shape[-1])
            grad_bias = bias(grad_bias, rows)
        return grad_input, grad_weight, grad_bias

    patches = [mock.patch.object(F, "linear_backward", linear_backward)]
    if weight is not None or bias is not None:
        block_original = fused.block_grad_into

        def block_grad_into(dest, grad_t, below, alpha, beta, has_bias):
            before = dest.clone() if beta != 0 else torch.zeros_like(dest)
            block_original(dest, grad_t, below, alpha, beta, has_bias)
            delta = dest - before  # alpha dL/d[W | b]
            if weight is not None:
                w = delta[..., :-1] if has_bias else delta
                w.copy_(weight(w.clone()))
            if bias is not None and has_bias:
                rows = (grad_t * alpha).transpose(-1, -2)  # alpha dL/dz, (rows, out) or (K, rows, out)
                delta[..., -1] = bias(delta[..., -1].clone(), rows).reshape(delta[..., -1].shape)
            dest.copy_(before + delta)

        patches.append(mock.patch.object(fused, "block_grad_into", block_grad_into))
    if input_weight is not None:
        backprop_original = fused.backprop_into

        def backprop_into(matmul, buf, k, weights, activations):
            broken = list(weights)
            broken[k] = input_weight(weights[k])
            backprop_original(matmul, buf, k, broken, activations)

        patches.append(mock.patch.object(fused, "backprop_into", backprop_into))
    return patches


def _transposed(w: Tensor) -> Tensor:
    return w.mT.reshape(w.shape)  # the transpose, forced into the original (out, in) shape


def _first_row(grad_bias: Tensor, rows: Tensor) -> Tensor:
    first = rows[..., 0, :]  # dL/dz of the first example, (out,) or (K, out)
    return first.reshape(grad_bias.shape)


def _mean_rows(grad_bias: Tensor, rows: Tensor) -> Tensor:
    return grad_bias / rows.shape[-2]


def _optim_step_patch(name: str, make: Callable[[Callable], Callable]) -> Any:
    """``manualbp.optim_steps.<name>`` replaced by ``make(original)``: every path's optimizer step reads it."""
    from .. import optim_steps

    return _wrap_attr(optim_steps, name, make)


def _sign_flipped_ce(loss_name, out, target, grad, dim, original):
    original(loss_name, out, target, grad, dim)
    if loss_name == "cross_entropy":
        grad.neg_()  # the buffer is -dL/do / |scale|: flipping it flips dL/do


def _missing_softmax_ce(loss_name, out, target, grad, dim, original):
    original(loss_name, out, target, grad, dim)
    if loss_name == "cross_entropy":
        grad.copy_(target)  # y: dL/do = -y


def _batch_softmax_ce(loss_name, out, target, grad, dim, original):
    if loss_name == "cross_entropy":
        out = torch.log_softmax(out, dim - 1)  # normalized over the examples
    original(loss_name, out, target, grad, dim)


def _misreduced(value: Any, reduction: str, count: int, mean: bool) -> Any:
    """The reduction bug on one path's ``value`` (its gradient, or the factor it is scaled by): with ``mean``
    a mean differentiated as a sum (x count), else a sum differentiated as a mean (/ count)."""
    if mean and reduction == "mean":
        return value * count
    if not mean and reduction == "sum":
        return value / count
    return value


def _reduction_scale(mean: bool):
    """Fused: mean differentiated as a sum (``mean=True``) or sum as a mean."""

    def broken(loss_name, reduction, n, classes, scale):
        return _misreduced(scale, reduction, n * classes if loss_name == "mse" else n, mean)

    return broken


def _reduction_vectorized(mean: bool):
    def broken(self, out, factor):
        count = out.shape[1] * (out.shape[2] if self.loss_name == "mse" else 1)
        return _misreduced(factor, self.reduction, count, mean)

    return broken


def _reduction_module(mean: bool):
    def broken(grad_input, input, reduction, loss):
        return _misreduced(grad_input, reduction, _count(input, loss), mean)

    return broken


def _ce_root_patch(rewrite: Callable[..., tuple]) -> Any:
    """cross_entropy_backward_from_log_probs(grad_output, log_probs, target, reduction, count) recomputed
    from ``rewrite(original, args...)``."""
    original = F.cross_entropy_backward_from_log_probs

    def wrapped(grad_output, log_probs, target, reduction="mean", count=None):
        return rewrite(original, grad_output, log_probs, target, reduction, count)

    return mock.patch.object(F, "cross_entropy_backward_from_log_probs", wrapped)


def _ce_without_softmax(original, grad_output, log_probs, target, reduction, count):
    grad_input, grad_target = original(grad_output, log_probs, target, reduction, count)
    no_softmax = original(grad_output, torch.full_like(log_probs, -torch.inf), target, reduction, count)[0]
    return no_softmax.reshape(grad_input.shape), grad_target  # -y scale: exp(-inf) = 0 drops softmax's term


def _ce_batch_softmax(original, grad_output, log_probs, target, reduction, count):
    grad_input, grad_target = original(grad_output, log_probs, target, reduction, count)
    broken = original(grad_output, torch.log_softmax(log_probs, -2), target, reduction, count)[0]
    return broken.reshape(grad_input.shape), grad_target


def _patches_for(name: str) -> list:
    """The patches of bug ``name``: its formula broken where each Python path reads it."""
    patches = _activation_and_loss_patches(name)
    return patches if patches is not None else _layer_and_step_patches(name)


def _activation_and_loss_patches(name: str) -> Optional[list]:
    """The activation derivatives' and the losses' bugs (None for any other name)."""
    if name == "sigmoid_missing_derivative":
        return _activation_patches("sigmoid", lambda g, a, s: g.clone())
    if name == "tanh_derivative_plus":
        return _activation_patches("tanh", lambda g, a, s: g * (1 + a * a))
    if name == "relu_derivative_ones":
        return _activation_patches("relu", lambda g, a, s: g * (a >= 0).to(g.dtype))
    if name == "leaky_relu_slope_missing":
        return _activation_patches("leaky_relu", lambda g, a, s: g * (a > 0).to(g.dtype))
    if name == "identity_derivative_masked":
        return _activation_patches("identity", lambda g, a, s: g * (a > 0).to(g.dtype))
    if name == "cross_entropy_grad_sign":
        return _loss_input_patches(("cross_entropy",), lambda g, o, r, loss: -g) + [_output_grad_patch(_sign_flipped_ce)]
    if name == "cross_entropy_missing_softmax":
        return [_ce_root_patch(_ce_without_softmax), _output_grad_patch(_missing_softmax_ce)]
    if name == "softmax_over_batch":
        return [_ce_root_patch(_ce_batch_softmax), _output_grad_patch(_batch_softmax_ce)]
    if name == "softmax_backward_missing_sum":
        return [mock.patch.object(F, "softmax_backward", lambda grad_output, output: output * grad_output)]
    if name == "squared_error_grad_doubled":
        return _loss_input_patches(("squared_error",), lambda g, o, r, loss: 2 * g) + [
            _loss_scales_patch(lambda loss, r, n, c, s: 2 * s if loss == "squared_error" else s)
        ]
    if name == "mse_missing_factor_two":
        return _loss_input_patches(("mse",), lambda g, o, r, loss: g / 2) + [
            _loss_scales_patch(lambda loss, r, n, c, s: s / 2 if loss == "mse" else s)
        ]
    if name == "mse_mean_over_examples":
        return _loss_input_patches(("mse",), lambda g, o, r, loss: g * o.shape[-1] if r == "mean" else g) + [
            _loss_scales_patch(lambda loss, r, n, c, s: s * c if loss == "mse" and r == "mean" else s),
            _reduction_factor_patch(
                lambda self, out, f: f * out.shape[2] if self.loss_name == "mse" and self.reduction == "mean" else f
            ),
        ]
    if name in ("mean_reduction_missing_1_over_n", "sum_reduction_divided_by_n"):
        mean = name.startswith("mean")
        return _loss_input_patches(("squared_error", "mse", "cross_entropy"), _reduction_module(mean)) + [
            _wrap_attr(F, "cross_entropy_on_probabilities_backward", lambda original: _probabilities(original, mean)),
            _loss_scales_patch(_reduction_scale(mean)),
            _reduction_factor_patch(_reduction_vectorized(mean)),
        ]
    return None


def _layer_and_step_patches(name: str) -> list:
    """The linear layer's and the optimizer steps' bugs."""
    if name == "weight_grad_transposed":
        return _linear_patches(weight=_transposed)
    if name == "bias_grad_not_summed":
        return _linear_patches(bias=_first_row)
    if name == "bias_grad_mean":
        return _linear_patches(bias=_mean_rows)
    if name == "input_grad_missing":
        return _linear_patches(input_weight=torch.zeros_like)
    if name == "input_grad_weight_transposed":
        return _linear_patches(input_weight=_transposed)
    if name == "weight_decay_sign":  # g - wd p = 2 g - (g + wd p)
        return [_optim_step_patch("weight_decayed", lambda original: lambda g, p, wd: 2 * g - original(g, p, wd))]
    if name == "momentum_not_decayed":
        return [_optim_step_patch("momentum_update_", _not_decayed)]
    if name == "nesterov_missing_momentum_factor":  # g + buf = (g + m buf) + (1 - m) buf
        return [
            _optim_step_patch(
                "nesterov_direction", lambda original: lambda g, buf, m: original(g, buf, m) + (1 - m) * buf
            )
        ]
    if name == "adam_bias_correction_missing":
        return [_optim_step_patch("bias_corrections", lambda original: lambda beta1, beta2, step: (1.0, 1.0))]
    raise AssertionError(f"no patches for {name!r}")  # pragma: no cover (every catalogue name has them)


def _probabilities(original: Callable, mean: bool) -> Callable:
    def wrapped(grad_output, input, target, reduction="mean"):
        grad_input, grad_target = original(grad_output, input, target, reduction)
        return _reduction_module(mean)(grad_input, input, reduction, "cross_entropy"), grad_target

    return wrapped


def _not_decayed(original: Callable) -> Callable:
    def update(buf, g, momentum, dampening):
        old = buf.clone()
        original(buf, g, momentum, dampening)
        buf.add_(old * (1 - momentum))  # + (1 - m) buf: buf + (1 - d) g

    return update


_PATCHES: dict[str, Callable[[], list]] = {name: (lambda name=name: _patches_for(name)) for name in CATALOGUE}
