"""Pure math: every op's forward and its hand-derived backward, side by side.

No autograd, no ``nn.Parameter``, no state: plain tensors in, tensors out. The notation follows the
seed notes (CS 725): ``z = W a_prev + b`` (pre-activation), ``a = sigma(z)`` (activation), ``o`` the
output pre-activation (logits), ``L`` the loss. A weight has shape ``(out_features, in_features)`` as in
``torch.nn.Linear``; batches are rows, so in code ``z = a_prev @ W.T + b``.

Every ``*_backward`` takes ``grad_output`` (dL/d(output)) and returns dL/d(input) (and parameter
gradients where the op has parameters). The backward formulas are written with differentiable torch ops
on their arguments only, so that the autograd Functions built on them (``manualbp.autograd``) support
double backward.

Every ``*_jvp`` is the forward-mode twin (``torch.autograd.Function.jvp``): it takes the tangents of the
inputs (``input_t`` = do, dx, dW, ...; None means zero) and returns the tangent of the output. The tangent
of a quantity q is written dq in the comments.

Activation derivatives are taken from the saved *output*, never the pre-activation:
sigmoid' = a (1 - a), tanh' = 1 - a^2, relu' = [a > 0], leaky_relu' = [a > 0] + slope [a <= 0].
Each such product is one fused ATen kernel (``aten.sigmoid_backward`` computes exactly
dL/da * (1 - a) * a, and so on): one pass over the activation instead of two or three, the very kernels
native autograd runs, differentiable again for double backward. The formula is in the comment on the
line; ``tests/functional/test_gradcheck.py`` pins every kernel against the plain formula.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from . import registry as _registry

_aten = torch.ops.aten
_torch_linear = torch.nn.functional.linear

__all__ = [
    "linear",
    "linear_backward",
    "linear_per_example_grads",
    "linear_jvp",
    "sigmoid",
    "sigmoid_backward",
    "tanh",
    "tanh_backward",
    "relu",
    "relu_backward",
    "leaky_relu",
    "leaky_relu_backward",
    "identity",
    "identity_backward",
    "ACTIVATIONS",
    "activation",
    "activation_backward",
    "activation_jvp",
    "squared_error_loss",
    "squared_error_loss_backward",
    "squared_error_loss_jvp",
    "mse_loss",
    "mse_loss_backward",
    "mse_loss_jvp",
    "cross_entropy",
    "cross_entropy_backward",
    "class_cross_entropy",
    "cross_entropy_backward_from_log_probs",
    "cross_entropy_jvp",
    "kernel_checks_class_range",
    "softmax",
    "softmax_backward",
    "softmax_jvp",
    "cross_entropy_on_probabilities",
    "cross_entropy_on_probabilities_backward",
    "cross_entropy_on_probabilities_jvp",
    "mlp_forward",
    "mlp_backward",
    "mlp_jvp",
    "needs_below",
    "MLPForward",
    "MLPGradients",
    "REDUCTIONS",
]

REDUCTIONS = ("mean", "sum", "none")


def _add(*terms: Optional[Tensor]) -> Optional[Tensor]:
    """The sum of the terms that are not None (a None tangent is zero); None when every one is."""
    total = None
    for term in terms:
        if term is not None:
            total = term if total is None else total + term
    return total


# --------------------------------------------------------------------------------------------------
# Linear: z = W a_prev + b
# --------------------------------------------------------------------------------------------------
def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """z = a_prev W^T + b for a batch of rows; ``input`` (*, in), ``weight`` (out, in) -> (*, out)."""
    if weight.dim() == 2:  # z_i = sum_j w_ij x_j + b_i: torch's linear, one addmm kernel for rows (N, in)
        return _torch_linear(input, weight, bias)  # (*, out)
    if weight.dim() == 3 and bias is not None and input.dim() in (2, 3):  # K stacked models, one kernel
        batch = input if input.dim() == 3 else input.expand(weight.shape[0], *input.shape)
        return torch.baddbmm(bias, batch, weight.mT)  # z = a_prev W^T + b per model, (K, N, out)
    z = input @ weight.mT  # z_i = sum_j w_ij x_j, (*, out)
    if bias is not None:
        z = z + bias  # + b_i
    return z


def linear_backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor,
    *,
    needs_input_grad: bool = True,
    needs_weight_grad: bool = True,
    needs_bias_grad: bool = True,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``linear``: returns (grad_input, grad_weight, grad_bias); None where not needed.

    ``grad_output`` is dL/dz of shape (*, out), ``input`` a_prev of shape (*, in) (only read for
    grad_weight), ``weight`` (out, in) (only read for grad_input).
    """
    if grad_output.dim() == 2 and (weight is None or weight.dim() == 2):  # a batch of rows (N, out)
        return (
            grad_output.mm(weight) if needs_input_grad else None,  # dL/da_j = sum_i dL/dz_i w_ij, (N, in)
            grad_output.t().mm(input) if needs_weight_grad else None,  # dL/dw_ij = dL/dz_i a_j, (out, in)
            grad_output.sum(0) if needs_bias_grad else None,  # dL/db_i = dL/dz_i, summed over the batch, (out,)
        )
    grad_input = grad_weight = grad_bias = None
    if weight is not None and weight.dim() == 3:
        # K stacked models: grad_output (K, N, out), input (K or 1, N, in), weight (K, out, in)
        if needs_input_grad:
            grad_input = grad_output @ weight  # dL/da_j = sum_i dL/dz_i w_ij, (K, N, in)
        if needs_weight_grad:
            grad_weight = grad_output.mT @ input  # dL/dw_ij = dL/dz_i a_j, (K, out, in)
        if needs_bias_grad:
            grad_bias = grad_output.sum(-2, keepdim=True)  # dL/db_i = sum_n dL/dz_i, (K, 1, out)
        return grad_input, grad_weight, grad_bias
    g = grad_output if grad_output.dim() == 2 else grad_output.reshape(-1, grad_output.shape[-1])  # dL/dz, (N, out)
    if needs_input_grad:
        grad_input = g.mm(weight)  # dL/da_j = sum_i dL/dz_i w_ij, (N, in)
        if grad_output.dim() != 2:
            grad_input = grad_input.reshape(*grad_output.shape[:-1], weight.shape[1])  # (*, in)
    if needs_weight_grad:
        a = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])
        grad_weight = g.t().mm(a)  # dL/dw_ij = dL/dz_i a_j, (out, in)
    if needs_bias_grad:
        grad_bias = g.sum(0)  # dL/db_i = dL/dz_i, summed over the batch, (out,)
    return grad_input, grad_weight, grad_bias


def linear_per_example_grads(
    grad_output: Tensor, input: Tensor, needs_bias_grad: bool = True
) -> tuple[Tensor, Optional[Tensor]]:
    """Each example's own dL_n/dW and dL_n/db (what Opacus and per-sample clipping need), not their sum.

    ``grad_output`` is dL/dz of shape (N, *, out), ``input`` a_prev of shape (N, *, in); extra middle dims
    (a sequence) are summed within each example, as ``linear_backward`` sums over the whole batch.
    """
    g = grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])  # dL/dz, (N, T, out)
    a = input.reshape(input.shape[0], -1, input.shape[-1]).to(g.dtype)  # a_prev, (N, T, in)
    grad_weight = g.mT @ a  # dL_n/dw_ij = sum_t dL/dz_ni a_nj, (N, out, in): the notes' outer product per example
    grad_bias = g.sum(1) if needs_bias_grad else None  # dL_n/db_i = sum_t dL/dz_ni, (N, out)
    return grad_weight, grad_bias


def linear_jvp(
    input: Tensor,
    weight: Tensor,
    input_t: Optional[Tensor],
    weight_t: Optional[Tensor] = None,
    bias_t: Optional[Tensor] = None,
) -> Optional[Tensor]:
    """Tangent of ``linear``: dz = da_prev W^T + a_prev dW^T + db, (*, out); None where every tangent is None.

    ``input`` a_prev (*, in) (only read for dW), ``weight`` W (out, in) (only read for da_prev).
    """
    z_t = _add(
        linear(input_t, weight) if input_t is not None else None,  # da_prev W^T, (*, out)
        linear(input, weight_t) if weight_t is not None else None,  # a_prev dW^T, (*, out)
    )
    if bias_t is None:
        return z_t
    if z_t is None:  # db alone, broadcast over the batch, (*, out) (one weight (out, in))
        return bias_t.expand(*input.shape[:-1], bias_t.shape[-1])
    return z_t + bias_t  # + db


# --------------------------------------------------------------------------------------------------
# Activations a = sigma(z); backward from the saved output a.
# --------------------------------------------------------------------------------------------------
def sigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """a = 1 / (1 + exp(-z)); ``inplace`` overwrites z with a (for a z nothing else reads)."""
    return torch.sigmoid_(input) if inplace else torch.sigmoid(input)


def sigmoid_backward(grad_output: Tensor, output: Tensor) -> Tensor:
    return _aten.sigmoid_backward.default(grad_output, output)  # dL/dz = dL/da * a (1 - a), like z (one kernel)


def tanh(input: Tensor, inplace: bool = False) -> Tensor:
    """a = tanh(z)."""
    return torch.tanh_(input) if inplace else torch.tanh(input)


def tanh_backward(grad_output: Tensor, output: Tensor) -> Tensor:
    return _aten.tanh_backward.default(grad_output, output)  # dL/dz = dL/da * (1 - a^2), like z (one kernel)


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """a = max(z, 0)."""
    return torch.relu_(input) if inplace else torch.relu(input)


def relu_backward(grad_output: Tensor, output: Tensor) -> Tensor:
    return _aten.threshold_backward.default(grad_output, output, 0)  # dL/dz = dL/da * [a > 0], like z (one kernel)


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """a = z if z > 0 else negative_slope * z (negative_slope >= 0, so a > 0 exactly when z > 0)."""
    return torch.nn.functional.leaky_relu(input, negative_slope, inplace)


def leaky_relu_backward(grad_output: Tensor, output: Tensor, negative_slope: float = 0.01) -> Tensor:
    # dL/dz = dL/da * ([a > 0] + slope [a <= 0]), like z (one kernel; True: a is the saved output)
    return _aten.leaky_relu_backward.default(grad_output, output, negative_slope, True)


def identity(input: Tensor, inplace: bool = False) -> Tensor:
    """a = z (a linear 'activation')."""
    return input


def identity_backward(grad_output: Tensor, output: Tensor) -> Tensor:
    return grad_output  # dL/dz = dL/da, like z


def _gain(nonlinearity: str) -> Callable[[float], float]:
    return lambda slope: torch.nn.init.calculate_gain(nonlinearity, slope if nonlinearity == "leaky_relu" else None)


# The registry entries (``manualbp.registry``): each activation once, in the internal convention (the slope s
# last, read by leaky_relu only), with its in-place forms for the fast trainers: ``forward_into(z, out, s)``
# writes a = sigma(z) into out (out is z: the in-place op, which vmap and jit.trace support; out= is not) and ``backward_(g, a, s)`` does g <- g sigma'(z) in place
# from the saved output, the very kernels of the ``*_backward`` above written into g.
for _spec in (
    _registry.Activation(
        "sigmoid", lambda z, s: sigmoid(z), lambda g, a, s: sigmoid_backward(g, a),
        "a = 1 / (1 + e^{-z})", "{a} (1 - {a})",
        lambda z, out, s: sigmoid(z, inplace=True) if out is z else torch.sigmoid(z, out=out),  # a = 1 / (1 + e^-z)
        lambda g, a, s: _aten.sigmoid_backward.grad_input(g, a, grad_input=g),  # g a (1 - a)
        _gain("sigmoid"), native=True,
    ),
    _registry.Activation(
        "tanh", lambda z, s: tanh(z), lambda g, a, s: tanh_backward(g, a),
        "a = tanh(z)", "(1 - {a}^2)",
        lambda z, out, s: tanh(z, inplace=True) if out is z else torch.tanh(z, out=out),  # a = tanh(z)
        lambda g, a, s: _aten.tanh_backward.grad_input(g, a, grad_input=g),  # g (1 - a^2)
        _gain("tanh"), native=True,
    ),
    _registry.Activation(
        "relu", lambda z, s: relu(z), lambda g, a, s: relu_backward(g, a),
        "a = max(z, 0)", "[{a} > 0]",
        lambda z, out, s: relu(z, inplace=True) if out is z else torch.clamp_min(z, 0, out=out),  # a = max(z, 0)
        lambda g, a, s: _aten.threshold_backward.grad_input(g, a, 0, grad_input=g),  # g [a > 0]
        _gain("relu"), native=True,
    ),
    _registry.Activation(
        "leaky_relu", lambda z, s: leaky_relu(z, s), leaky_relu_backward,
        "a = z if z > 0 else s z", "([{a} > 0] + s [{a} <= 0])",
        lambda z, out, s: leaky_relu(z, s, True) if out is z else torch._C._nn.leaky_relu(z, s, out=out),  # z or s z
        lambda g, a, s: _aten.leaky_relu_backward.grad_input(g, a, s, True, grad_input=g),  # g ([a > 0] + s [a <= 0])
        _gain("leaky_relu"), takes_slope=True, native=True,
    ),
    _registry.Activation(
        "identity", lambda z, s: identity(z), lambda g, a, s: g,
        "a = z", "1",
        lambda z, out, s: out if out is z else out.copy_(z),  # a = z
        lambda g, a, s: None,  # g 1
        _gain("linear"), native=True, saves_output=False,
    ),
):  # fmt: skip
    _registry.add_builtin_activation(_spec)


#: name -> (forward, backward-from-output) of every registered activation (a live view of the registry).
#: The functions take the negative slope last: ``forward(z, s)``, ``backward(dL/da, a, s)``.
ACTIVATIONS: Mapping[str, tuple[Callable[..., Tensor], Callable[..., Tensor]]] = _registry.View(
    _registry.ACTIVATION_REGISTRY, lambda spec: (spec.forward, spec.backward)
)


def activation(name: str, input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """Apply the registered activation called ``name``; ``inplace`` overwrites ``input`` with a."""
    spec = _registry.ACTIVATION_REGISTRY[name]
    if inplace:
        spec.forward_into(input, input, negative_slope)
        return input
    return spec.forward(input, negative_slope)


def activation_backward(name: str, grad_output: Tensor, output: Tensor, negative_slope: float = 0.01) -> Tensor:
    """dL/dz from dL/da and the saved output a of the registered activation called ``name``."""
    return _registry.ACTIVATION_REGISTRY[name].backward(grad_output, output, negative_slope)


def activation_jvp(
    name: str, input_t: Optional[Tensor], output: Tensor, negative_slope: float = 0.01
) -> Optional[Tensor]:
    """da from the tangent dz and the saved output a of the activation called ``name``.

    An elementwise activation has a diagonal Jacobian diag(sigma'(z)), so its JVP da = sigma'(z) * dz is its VJP
    applied to the tangent: the registry's backward, with sigma' read from the saved output a as there.
    """
    if input_t is None:
        return None
    return activation_backward(name, input_t, output, negative_slope)  # da = sigma'(z) * dz, like z


# --------------------------------------------------------------------------------------------------
# Losses. ``input`` is the network output o of shape (*, K); "examples" are the leading dimensions.
# ``grad_output`` is dL_total/dL: a scalar for "mean"/"sum", one value per reduced element for "none".
# --------------------------------------------------------------------------------------------------
def _reduce(per_item: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    return per_item


def _expand_grad(grad_output: Tensor, reduction: str, count: int) -> Tensor:
    """d(reduced)/d(per-item) times grad_output, shaped to broadcast against the per-item tensor."""
    if reduction == "mean":
        return grad_output / count  # d mean / d L_n = 1/N
    return grad_output  # "sum": 1; "none": grad_output is already per item


def squared_error_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """The notes' regression loss: L_n = 1/2 sum_k (o_k - y_k)^2 for each example n.

    "mean" averages L_n over the examples (leading dims), "sum" sums them, "none" returns L_n (shape ``*``).
    Compared with :func:`mse_loss` (PyTorch's convention): sum reductions differ by a factor 2,
    mean reductions by 2 / K.
    """
    per_example = 0.5 * ((input - target) ** 2).sum(-1)  # L_n = 1/2 sum_k (o_k - y_k)^2, (*)
    return _reduce(per_example, reduction)


def squared_error_loss_backward(
    grad_output: Tensor, input: Tensor, target: Tensor, reduction: str = "mean"
) -> tuple[Tensor, Tensor]:
    """Returns (dL/do, dL/dy). dL/do_k = o_k - y_k (the notes' formula), scaled by the reduction."""
    count = input.shape[:-1].numel()  # examples: every dimension but the last
    scale = _expand_grad(grad_output, reduction, count)
    if reduction == "none":
        scale = scale.unsqueeze(-1)  # one factor per example, broadcast over k
    grad_input = (input - target) * scale  # dL/do_k = o_k - y_k, (*, K)
    return grad_input, -grad_input  # dL/dy_k = -(o_k - y_k)


def squared_error_loss_jvp(
    input: Tensor, target: Tensor, input_t: Optional[Tensor], target_t: Optional[Tensor], reduction: str = "mean"
) -> Optional[Tensor]:
    """Tangent of :func:`squared_error_loss`: dL_n = sum_k (o_k - y_k) (do_k - dy_k), then reduced like L_n."""
    diff_t = _add(input_t, -target_t if target_t is not None else None)  # do - dy, (*, K)
    if diff_t is None:
        return None
    return _reduce(((input - target) * diff_t).sum(-1), reduction)  # dL_n = sum_k (o_k - y_k)(do_k - dy_k), (*)


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """PyTorch's convention: (o - y)^2 per element; "mean" averages over every element."""
    per_element = (input - target) ** 2  # (o - y)^2, like input
    return _reduce(per_element, reduction)


def mse_loss_backward(
    grad_output: Tensor, input: Tensor, target: Tensor, reduction: str = "mean"
) -> tuple[Tensor, Tensor]:
    """Returns (dL/do, dL/dy). dL/do = 2 (o - y), divided by the element count for "mean"."""
    scale = _expand_grad(grad_output, reduction, input.numel())
    grad_input = 2 * (input - target) * scale  # dL/do = 2 (o - y), like input
    return grad_input, -grad_input


def mse_loss_jvp(
    input: Tensor, target: Tensor, input_t: Optional[Tensor], target_t: Optional[Tensor], reduction: str = "mean"
) -> Optional[Tensor]:
    """Tangent of :func:`mse_loss`: d(o - y)^2 = 2 (o - y) (do - dy) per element, then reduced."""
    diff_t = _add(input_t, -target_t if target_t is not None else None)  # do - dy, like input
    if diff_t is None:
        return None
    return _reduce(2 * (input - target) * diff_t, reduction)  # 2 (o - y)(do - dy), like input


def _log_softmax(input: Tensor) -> Tensor:
    # log yhat_k = (o_k - m) - log sum_j exp(o_j - m) with m = max_j o_j: no overflow, and exact shifts.
    # m is a constant of the formula (the result does not depend on it), so it carries no gradient.
    shifted = input - input.detach().amax(dim=-1, keepdim=True)
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def _target_distribution(input: Tensor, target: Tensor) -> Tensor:
    """Class indices (*,) -> one-hot (*, K) in input's dtype; probabilities pass through."""
    if target.is_floating_point():
        return target
    classes = torch.arange(input.shape[-1], device=input.device)
    return (target.unsqueeze(-1) == classes).to(input.dtype)  # y_k = [k = target], (*, K)


#: ``reduction`` -> the enum of ATen's loss kernels (``torch.nn._reduction.get_enum``).
_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}
#: The one target value ATen's nll_loss kernels skip (``ignore_index``) instead of rejecting as out of bounds.
_IGNORE_INDEX = -100
_nll_loss_forward = _aten.nll_loss_forward.default
_nll_loss_backward = _aten.nll_loss_backward.default
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_transforms_active = torch._C._are_functorch_transforms_active


def kernel_checks_class_range(input: Tensor, reduction: str) -> bool:
    """Does :func:`cross_entropy` itself reject every class index outside [0, C) for this ``input``?

    On CPU ATen's nll_loss kernel raises ``IndexError`` for an out-of-range target, except for its
    ``ignore_index`` -100, which it skips; :func:`cross_entropy` catches that one from the count of examples
    the kernel returns, which is exact for "mean" and "sum" in float32 and float64. Elsewhere (a GPU,
    where a bad index is a device-side assert; "none"; float16/bfloat16; torch.compile and torch.func)
    the targets must be checked beforehand (``manualbp.nn.CrossEntropyLoss`` does).
    """
    return (
        reduction != "none"
        and input.is_cpu
        and (input.dtype is torch.float32 or input.dtype is torch.float64)
        and not torch.compiler.is_compiling()
        and not _transforms_active()
        and not _is_wrapped(input)
    )


def class_cross_entropy(input: Tensor, target: Tensor, reduction: str = "mean") -> tuple[Tensor, Tensor, Tensor]:
    """:func:`cross_entropy` for class indices, with what its backward can reuse.

    Returns ``(loss, log_probs, count)``: the loss, log yhat = log softmax(o) as rows (N, C), and the number
    of examples the kernel counted as a 0-d tensor of input's dtype (what
    :func:`cross_entropy_backward_from_log_probs` takes).
    """
    # L_n = -log yhat_{y_n}: ATen's stable log-softmax, then nll_loss picks -log yhat at each target (and
    # sums or averages): the two kernels torch.nn.functional.cross_entropy runs.
    index = target if target.dtype == torch.int64 else target.long()
    log_probs = torch.log_softmax(input, dim=-1)  # log yhat, (*, K)
    if input.dim() != 2:  # (N, C) for the kernel
        log_probs, index = log_probs.reshape(-1, input.shape[-1]), index.reshape(-1)
    loss, count = _nll_loss_forward(log_probs, index, None, _REDUCTION_ENUM[reduction], _IGNORE_INDEX)
    if kernel_checks_class_range(input, reduction) and count.item() != index.shape[0]:
        raise IndexError(f"Target {_IGNORE_INDEX} is out of bounds.")  # the kernel skipped it: ATen's words
    if reduction == "none" and input.dim() != 2:
        loss = loss.reshape(target.shape)  # (*)
    return loss, log_probs, count


def cross_entropy(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Fused softmax + cross-entropy on logits o: L_n = -sum_k y_k log softmax(o)_k.

    ``target`` holds class indices (shape ``*``, an integer dtype) or probabilities (shape ``(*, K)``,
    floating). "mean" divides by the number of examples, as ``torch.nn.functional.cross_entropy`` does.
    Numerically stable through log-sum-exp. A class index outside [0, C) raises ``IndexError`` where
    :func:`kernel_checks_class_range` says so; unlike ``torch.nn.functional.cross_entropy`` no index is
    ever skipped silently there (-100 included).
    """
    if not target.is_floating_point():
        return class_cross_entropy(input, target, reduction)[0]
    per_example = -(target * _log_softmax(input)).sum(-1)  # L_n = -sum_k y_k log yhat_k, (*)
    return _reduce(per_example, reduction)


def cross_entropy_backward(
    grad_output: Tensor, input: Tensor, target: Tensor, reduction: str = "mean"
) -> tuple[Tensor, Optional[Tensor]]:
    """Returns (dL/do, dL/dy); dL/dy is None for class-index targets.

    dL/do_k = yhat_k * sum_j y_j - y_k, which is the familiar softmax(o) - y when y is a distribution,
    times the reduction's factor (1/N for "mean", each example's ``grad_output`` for "none").
    The formula is :func:`cross_entropy_backward_from_log_probs`, given log yhat = log softmax(o).
    """
    grad_input, grad_target = cross_entropy_backward_from_log_probs(
        grad_output, torch.log_softmax(input, dim=-1), target, reduction
    )
    if grad_input.dim() != input.dim():  # class indices: rows (N, K) -> (*, K)
        grad_input = grad_input.reshape(input.shape)
    return grad_input, grad_target


def cross_entropy_backward_from_log_probs(
    grad_output: Tensor, log_probs: Tensor, target: Tensor, reduction: str = "mean", count: Optional[Tensor] = None
) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`cross_entropy_backward` from log yhat = log softmax(o) (*, K), as the forward computed it.

    Written as g = dL/d(log yhat) = -y * scale, then dL/do = g - yhat * sum_k g_k (the chain rule through
    log softmax: d log yhat_j / d o_k = [j = k] - yhat_k), which is ATen's one-kernel
    ``_log_softmax_backward_data(g, log yhat)``; for class indices g itself is ``nll_loss_backward``'s one
    kernel (zero, and -scale at each target class), and dL/do comes as rows (N, K). ``count`` is the number
    of examples N as a 0-d tensor of log_probs' dtype (:func:`class_cross_entropy` returns it; made here
    when None). ``tests/functional/test_gradcheck.py`` pins both kernels against the plain formula.
    """
    if not target.is_floating_point():
        index = target if target.dtype == torch.int64 else target.long()
        if log_probs.dim() != 2:
            log_probs = log_probs.reshape(-1, log_probs.shape[-1])  # (N, K)
        if index.dim() != 1:
            index = index.reshape(-1)  # (N,)
        if not isinstance(grad_output, Tensor):  # a plain number: dL_total/dL
            grad_output = log_probs.new_full((), grad_output)
        if count is None:  # d mean / d L_n = 1/N: nll_loss_backward divides by this "total weight" ("mean" only)
            count = log_probs.new_full((), log_probs.shape[0]) if reduction == "mean" else log_probs.new_ones(())
        if reduction == "none" and grad_output.dim() != 1:
            grad_output = grad_output.reshape(-1)  # one factor per example, (N,)
        # dL/dlog yhat_k = -y_k * scale: zero, and -scale at the target class of each row, (N, K)
        g = _nll_loss_backward(grad_output, log_probs, index, None, _REDUCTION_ENUM[reduction], _IGNORE_INDEX, count)
        return torch._log_softmax_backward_data(g, log_probs, -1, log_probs.dtype), None  # yhat - y, (N, K)
    count = log_probs.shape[:-1].numel()  # examples: every dimension but the last
    scale = _expand_grad(grad_output, reduction, count)
    if reduction == "none":
        scale = scale.unsqueeze(-1)
    neg_scale = -scale
    g = target * neg_scale  # dL/dlog yhat_k = -y_k * scale, (*, K)
    grad_input = torch._log_softmax_backward_data(g, log_probs, -1, log_probs.dtype)  # yhat sum_j y_j - y, (*, K)
    grad_target = log_probs * neg_scale  # dL/dy_k = -log yhat_k, (*, K)
    return grad_input, grad_target


def cross_entropy_jvp(
    input: Tensor,
    target: Tensor,
    input_t: Optional[Tensor],
    target_t: Optional[Tensor],
    reduction: str = "mean",
    log_probs: Optional[Tensor] = None,
) -> Optional[Tensor]:
    """Tangent of :func:`cross_entropy`: dL_n = sum_k (yhat_k sum_j y_j - y_k) do_k - sum_k log yhat_k dy_k.

    From L_n = -sum_k y_k log yhat_k and d log yhat_k = do_k - sum_j yhat_j do_j. Class indices are one-hot y
    with no tangent (``target_t`` is ignored). ``log_probs`` is log yhat = log softmax(o) where the forward
    kept it (rows (N, K) or (*, K)); recomputed from ``input`` when None.
    """
    if log_probs is None:
        log_probs = torch.log_softmax(input, dim=-1)  # log yhat, (*, K)
    log_probs = log_probs.reshape(input.shape)
    if not target.is_floating_point():
        target_t = None  # class indices carry no tangent
    y = _target_distribution(input, target)  # y_k, (*, K)
    per_example = _add(
        # sum_k (yhat_k sum_j y_j - y_k) do_k, (*)
        ((log_probs.exp() * y.sum(-1, keepdim=True) - y) * input_t).sum(-1) if input_t is not None else None,
        -(log_probs * target_t).sum(-1) if target_t is not None else None,  # - sum_k log yhat_k dy_k, (*)
    )
    return None if per_example is None else _reduce(per_example, reduction)


def _torch_cross_entropy(input: Tensor, target: Tensor, reduction: str) -> Tensor:
    """PyTorch's own ``cross_entropy`` on (*, K) logits (the reference the hand-derived one is held against)."""
    logits = input.reshape(-1, input.shape[-1])
    tgt = target.reshape(-1, input.shape[-1]) if target.is_floating_point() else target.reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits, tgt, reduction=reduction)
    return loss.reshape(input.shape[:-1]) if reduction == "none" else loss


# The registry entries of the losses (``manualbp.registry``). Each backward is looked up on this module by name
# at each call, so that a formula patched here (``manualbp.verify.inject_bug``) reaches every path reading the
# registry. ``native``: the fast trainers' fused kernels and the C++ loop have the loss.
for _spec in (
    _registry.Loss(
        "cross_entropy", lambda o, y, r: cross_entropy(o, y, r), lambda g, o, y, r: cross_entropy_backward(g, o, y, r),
        "-sum_k y_k log softmax(o)_k", "softmax(o) - y", targets="classes", mean_over="examples",
        reference=_torch_cross_entropy,
        jvp=lambda o, y, do, dy, r: cross_entropy_jvp(o, y, do, dy, r), native=True,
        # in place, from out = log softmax(o): y - softmax(o) sum_k y_k = -dL/do (torch's log-softmax backward
        # kernel on dL/d log softmax = y); the loss is -(sum y log softmax(o)): both scales -1
        grad_into=lambda out, y, grad, dim: torch._log_softmax_backward_data(y, out, dim, out.dtype, out=grad),
        fused_scales=(-1.0, -1.0),
    ),
    _registry.Loss(
        "squared_error", lambda o, y, r: squared_error_loss(o, y, r),
        lambda g, o, y, r: squared_error_loss_backward(g, o, y, r),
        "1/2 sum_k (o_k - y_k)^2", "o - y", targets="values", mean_over="examples",
        jvp=lambda o, y, do, dy, r: squared_error_loss_jvp(o, y, do, dy, r), native=True,
        grad_into=lambda out, y, grad, dim: torch.sub(out, y, out=grad),  # o - y; L = 1/2 |o - y|^2: (0.5, 1)
        fused_scales=(0.5, 1.0),
    ),
    _registry.Loss(
        "mse", lambda o, y, r: mse_loss(o, y, r), lambda g, o, y, r: mse_loss_backward(g, o, y, r),
        "mean over all elements of (o - y)^2", "2 (o - y) / numel", targets="values", mean_over="elements",
        reference=lambda o, y, r: torch.nn.functional.mse_loss(o, y, reduction=r),
        jvp=lambda o, y, do, dy, r: mse_loss_jvp(o, y, do, dy, r), native=True,
        grad_into=lambda out, y, grad, dim: torch.sub(out, y, out=grad),  # o - y; L = |o - y|^2, dL/do = 2 (o - y)
        fused_scales=(1.0, 2.0),
    ),
):  # fmt: skip
    _registry.add_builtin_loss(_spec)


def softmax(input: Tensor) -> Tensor:
    """yhat_k = exp(o_k) / sum_j exp(o_j), over the last dimension (stable)."""
    return _log_softmax(input).exp()


def softmax_backward(grad_output: Tensor, output: Tensor) -> Tensor:
    # dL/do_k = sum_j dL/dyhat_j yhat_j ([j = k] - yhat_k) = yhat_k (dL/dyhat_k - sum_j dL/dyhat_j yhat_j)
    return output * (grad_output - (grad_output * output).sum(-1, keepdim=True))


def softmax_jvp(input_t: Optional[Tensor], output: Tensor) -> Optional[Tensor]:
    """dyhat from do and the saved output yhat. The Jacobian d yhat_j / d o_k = yhat_j ([j = k] - yhat_k) is
    symmetric, so the JVP is :func:`softmax_backward` applied to the tangent."""
    if input_t is None:
        return None
    return softmax_backward(input_t, output)  # dyhat_k = yhat_k (do_k - sum_j yhat_j do_j), (*, K)


def cross_entropy_on_probabilities(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """The notes' unfused loss on probabilities yhat: L_n = sum_k -y_k log yhat_k.

    ``input`` are probabilities (for example ``softmax(o)``); ``target`` class indices or probabilities.
    """
    y = _target_distribution(input, target)
    per_example = -(y * torch.log(input)).sum(-1)  # L_n = -sum_k y_k log yhat_k, (*)
    return _reduce(per_example, reduction)


def cross_entropy_on_probabilities_backward(
    grad_output: Tensor, input: Tensor, target: Tensor, reduction: str = "mean"
) -> tuple[Tensor, Optional[Tensor]]:
    """Returns (dL/dyhat, dL/dy). dL/dyhat_k = -y_k / yhat_k."""
    count = input.shape[:-1].numel()  # examples: every dimension but the last
    scale = _expand_grad(grad_output, reduction, count)
    if reduction == "none":
        scale = scale.unsqueeze(-1)
    y = _target_distribution(input, target)
    grad_input = -y / input * scale  # dL/dyhat_k = -y_k / yhat_k, (*, K)
    grad_target = -torch.log(input) * scale if target.is_floating_point() else None
    return grad_input, grad_target


def cross_entropy_on_probabilities_jvp(
    input: Tensor, target: Tensor, input_t: Optional[Tensor], target_t: Optional[Tensor], reduction: str = "mean"
) -> Optional[Tensor]:
    """Tangent of :func:`cross_entropy_on_probabilities`: dL_n = -sum_k (y_k / yhat_k) dyhat_k - sum_k log yhat_k dy_k."""
    if not target.is_floating_point():
        target_t = None  # class indices carry no tangent
    per_example = _add(
        # - sum_k (y_k / yhat_k) dyhat_k, (*)
        -(_target_distribution(input, target) / input * input_t).sum(-1) if input_t is not None else None,
        -(torch.log(input) * target_t).sum(-1) if target_t is not None else None,  # - sum_k log yhat_k dy_k, (*)
    )
    return None if per_example is None else _reduce(per_example, reduction)


# --------------------------------------------------------------------------------------------------
# The whole MLP: the notes' two-pass algorithm.
# --------------------------------------------------------------------------------------------------
@dataclass
class MLPForward:
    """Result of :func:`mlp_forward` on a batch of rows.

    ``output`` is o (N, out); ``hidden`` the activations a^1 .. a^{L-1} (each (N, width));
    ``pre_activations`` z^1 .. z^{L-1} when asked for (otherwise empty).
    """

    output: Tensor
    hidden: list[Tensor]
    pre_activations: list[Tensor] = field(default_factory=list)


@dataclass
class MLPGradients:
    """Result of :func:`mlp_backward`.

    ``grad_weights[l]``/``grad_biases[l]`` are dL/dW and dL/db of layer l (0-based; None where not asked),
    ``grad_input`` dL/dx (None where not asked). With ``return_intermediates`` also
    ``grad_hidden[l]`` = dL/da of hidden layer l and ``grad_pre_activations[l]`` = dL/dz of layer l
    (the last entry is dL/do).
    """

    grad_input: Optional[Tensor]
    grad_weights: list[Optional[Tensor]]
    grad_biases: list[Optional[Tensor]]
    grad_hidden: list[Tensor] = field(default_factory=list)
    grad_pre_activations: list[Tensor] = field(default_factory=list)


def mlp_forward(
    input: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Optional[Tensor]],
    activations: Sequence[tuple[str, float]],
    *,
    return_pre_activations: bool = False,
    masks: Optional[Sequence[Tensor]] = None,
) -> MLPForward:
    """Forward pass: z^l = W^l a^{l-1} + b^l, a^l = sigma_l(z^l), o = W^L a^{L-1} + b^L.

    Args:
        input: x of shape (N, in_features).
        weights: W^1 .. W^L, each (out, in).
        biases: b^1 .. b^L (entries may be None).
        activations: one ``(name, negative_slope)`` per hidden layer (L - 1 of them).
        masks: optional 0/1 column masks, one per hidden layer (broadcast against a^l): a^l = m^l sigma_l(z^l).
            Padded units (zero rows and columns of the weights, mask 0) then add nothing forward and get exactly
            zero gradients from :func:`mlp_backward` (dL/dW^{l+1}_{:j} = g^T a_j = 0, dL/da_j = g W_{:j} = 0).
    """
    a = input
    hidden: list[Tensor] = []
    pre: list[Tensor] = []
    inplace = not return_pre_activations  # a overwrites z, a fresh tensor nothing else reads: one buffer a layer
    for layer, (name, slope) in enumerate(activations):
        z = linear(a, weights[layer], biases[layer])  # z_i = sum_j w_ij a_j + b_i
        a = activation(name, z, slope, inplace)  # a_i = sigma(z_i)
        if masks is not None:
            a = a * masks[layer]  # a_i = m_i sigma(z_i): a padded unit's a_i is 0
        hidden.append(a)
        if return_pre_activations:
            pre.append(z)
    output = linear(a, weights[-1], biases[-1])  # o_k = sum_i w_ki a_i + b_k
    return MLPForward(output, hidden, pre)


def needs_below(
    needs_input_grad: bool, needs_weight_grad: Sequence[bool], needs_bias_grad: Sequence[bool]
) -> list[bool]:
    """For each layer l: does the input or any parameter of a layer below l need a gradient?

    Layer l's backward must pass dL/da^{l-1} down only then; it decides which weights (W^l is needed for
    dL/da^{l-1} only) and activations must be saved for backward, as native autograd decides.
    """
    below = [needs_input_grad]
    for w, b in zip(needs_weight_grad[:-1], needs_bias_grad[:-1]):
        below.append(below[-1] or w or b)
    return below


def _needs(
    n_layers: int,
    needs_input_grad: bool,
    needs_weight_grad: Optional[Sequence[bool]],
    needs_bias_grad: Optional[Sequence[bool]],
) -> tuple[Sequence[bool], Sequence[bool], list[bool]]:
    """(needs_weight_grad, needs_bias_grad, below) per layer, None meaning every layer; ``below[l]``: does
    anything under layer l need dL/da^{l-1} (:func:`needs_below`)."""
    if needs_weight_grad is None:  # every weight needs its gradient: only layer 0 may keep dL/dx to itself
        below = [needs_input_grad] + [True] * (n_layers - 1)
        return [True] * n_layers, needs_bias_grad or [True] * n_layers, below
    needs_bias_grad = needs_bias_grad or [True] * n_layers
    return needs_weight_grad, needs_bias_grad, needs_below(needs_input_grad, needs_weight_grad, needs_bias_grad)


def mlp_backward(
    grad_output: Tensor,
    input: Tensor,
    weights: Sequence[Tensor],
    hidden: Sequence[Tensor],
    activations: Sequence[tuple[str, float]],
    *,
    grad_hidden: Optional[Sequence[Optional[Tensor]]] = None,
    needs_input_grad: bool = True,
    needs_weight_grad: Optional[Sequence[bool]] = None,
    needs_bias_grad: Optional[Sequence[bool]] = None,
    return_intermediates: bool = False,
) -> MLPGradients:
    """Backward pass of the two-pass algorithm, one sweep from the output layer down.

    Starts from ``grad_output`` = dL/do (N, out) and, for each layer from the last:
    dL/dW = (dL/dz)^T a_prev, dL/db = sum_n dL/dz, dL/da_prev = dL/dz W, dL/dz_prev = dL/da_prev * sigma'
    (sigma' from the saved activation a_prev). ``grad_hidden`` adds extra gradients arriving directly at
    a hidden activation (used for double backward; None entries mean zero).
    """
    n_layers = len(weights)
    needs_weight_grad, needs_bias_grad, below = _needs(n_layers, needs_input_grad, needs_weight_grad, needs_bias_grad)
    grad_weights: list[Optional[Tensor]] = [None] * n_layers
    grad_biases: list[Optional[Tensor]] = [None] * n_layers
    grad_hidden_out: list[Tensor] = [None] * (n_layers - 1)  # type: ignore[list-item]
    grad_pre: list[Tensor] = [None] * n_layers  # type: ignore[list-item]
    grad_input = None
    g = grad_output  # dL/do: the base case dL/dL = 1 times dL/do
    for layer in range(n_layers - 1, -1, -1):
        a_prev = hidden[layer - 1] if layer > 0 else input
        if return_intermediates:
            grad_pre[layer] = g
        grad_a, grad_weights[layer], grad_biases[layer] = linear_backward(
            g,
            a_prev,
            weights[layer],
            needs_input_grad=below[layer],
            needs_weight_grad=needs_weight_grad[layer],
            needs_bias_grad=needs_bias_grad[layer],
        )
        if layer == 0 or not below[layer]:  # nothing further down needs a gradient
            grad_input = grad_a if layer == 0 else None
            break
        # Drop each buffer as soon as it is read for the last time, as autograd's engine does: the next
        # allocation of the same size can then reuse it (fresh large buffers cost page faults).
        g = None  # type: ignore[assignment]
        if grad_hidden is not None and grad_hidden[layer - 1] is not None:
            grad_a = grad_a + grad_hidden[layer - 1]  # a gradient arriving directly at a_prev (double backward)
        if return_intermediates:
            grad_hidden_out[layer - 1] = grad_a
        name, slope = activations[layer - 1]
        g = activation_backward(name, grad_a, a_prev, slope)  # dL/dz = dL/da * sigma'(z), from a
        grad_a = None  # type: ignore[assignment]
    return MLPGradients(
        grad_input,
        grad_weights,
        grad_biases,
        grad_hidden_out if return_intermediates else [],
        grad_pre if return_intermediates else [],
    )


def mlp_jvp(
    input: Tensor,
    weights: Sequence[Tensor],
    hidden: Sequence[Tensor],
    activations: Sequence[tuple[str, float]],
    input_t: Optional[Tensor],
    weights_t: Sequence[Optional[Tensor]],
    biases_t: Sequence[Optional[Tensor]],
) -> tuple[Optional[Tensor], list[Optional[Tensor]]]:
    """Forward mode through the whole MLP: one sweep up the layers, beside the forward pass's own.

    From dx (N, in) and the tangents dW^l, db^l (None entries are zero), with the saved input x, weights W^l
    and activations a^l: dz^l = da^{l-1} W^l^T + a^{l-1} dW^l^T + db^l, da^l = sigma_l'(z^l) * dz^l (sigma' from
    a^l), do = dz^L. Returns (do (N, out), [da^1 .. da^{L-1}] (each (N, width))); None where a tangent is zero.
    """
    a_prev, a_t = input, input_t  # a^0 = x, da^0 = dx
    hidden_t: list[Optional[Tensor]] = []
    for layer, (name, slope) in enumerate(activations):
        z_t = linear_jvp(a_prev, weights[layer], a_t, weights_t[layer], biases_t[layer])  # dz^l, (N, width)
        a_prev = hidden[layer]
        a_t = activation_jvp(name, z_t, a_prev, slope)  # da^l = sigma'(z^l) * dz^l, (N, width)
        hidden_t.append(a_t)
    output_t = linear_jvp(a_prev, weights[-1], a_t, weights_t[-1], biases_t[-1])  # do = dz^L, (N, out)
    return output_t, hidden_t
