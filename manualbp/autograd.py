"""``torch.autograd.Function`` classes whose backward is the hand-derived math of ``manualbp.functional``.

All use the ``forward`` + ``setup_context`` style, so they work with ``torch.func`` (``generate_vmap_rule``)
and ``torch.compile``. Each backward is written with differentiable ops on saved inputs and outputs only
(never on intermediates stored on ``ctx``), so double backward (``create_graph=True``) is correct.
Each also has a ``jvp`` (forward-mode AD: ``torch.autograd.forward_ad``, ``torch.func.jvp``, ``jacfwd``,
``hessian``) from the matching ``*_jvp`` of ``manualbp.functional``; what it reads is saved for forward
only while a forward-mode level is open, so plain training saves nothing more.

:class:`MLPFunction` is the whole network in one Function: its backward is the notes' two-pass algorithm,
one sweep over all layers. To keep double backward correct it returns the hidden activations a^l as extra
outputs (PyTorch's "Double Backward with Custom Functions" recipe for intermediates); ``manualbp.nn.MLP``
hands only the first output, o, to the user.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd import forward_ad as _forward_ad

from . import functional as F
from .registry import ACTIVATION_REGISTRY, LOSS_REGISTRY

__all__ = [
    "LinearFunction",
    "SigmoidFunction",
    "TanhFunction",
    "ReLUFunction",
    "LeakyReLUFunction",
    "IdentityFunction",
    "ACTIVATION_FUNCTIONS",
    "LOSS_FUNCTIONS",
    "SquaredErrorLossFunction",
    "MSELossFunction",
    "CrossEntropyFunction",
    "SoftmaxFunction",
    "CrossEntropyOnProbabilitiesFunction",
    "MLPFunction",
    "split_params",
    "join_params",
    "apply_function",
]

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_transforms_active = torch._C._are_functorch_transforms_active
_tracing_state = torch._C._get_tracing_state


def apply_function(function: type[Function], *args: Any) -> Any:
    """``function.apply(*args)`` without its per-call Python overhead where that overhead does nothing.

    ``Function.apply`` binds the arguments to ``forward``'s signature with ``inspect`` on every call (to
    fill default values; our forwards have none), which costs more than a small MLP's whole forward pass.
    In eager mode with no ``torch.func`` transform active and no leftover functorch wrapper among the
    arguments this calls the C++ ``apply`` directly; under a transform it is exactly ``function.apply(*args)``.
    Under ``torch.compile`` it applies the Function's twin without ``jvp`` (``function.apply_compiled``, which
    every Function of this module has; see :func:`_without_jvp`): dynamo cannot trace a Function that defines one.
    """
    if torch.compiler.is_compiling():
        return function.apply_compiled(*args)
    if _transforms_active():
        return function.apply(*args)
    for a in args:  # a plain loop: a generator expression costs more than the checks themselves
        if isinstance(a, Tensor) and _is_wrapped(a):
            return function.apply(*args)
    return super(Function, function).apply(*args)  # torch._C._FunctionBase.apply


def _save(ctx: Any, *tensors: Optional[Tensor]) -> None:
    """``save_for_backward(*tensors)``, and while a forward-mode AD level is open (``forward_ad.dual_level``,
    which ``torch.func.jvp``/``jacfwd``/``hessian`` open too) ``save_for_forward`` of the same tensors for ``jvp``.

    The same tuple for both: functorch's generated vmap rule keeps one set of batch dimensions per ctx, which
    the later of the two saves would overwrite. Outside forward mode ctx keeps nothing more.
    """
    ctx.save_for_backward(*tensors)
    if _forward_ad._current_level >= 0:
        ctx.save_for_forward(*tensors)


class LinearFunction(Function):
    """z = input @ weight.T + bias. ``apply(input, weight, bias)``; bias may be None."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return F.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        input, weight, _ = inputs
        _save(ctx, input, weight)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):  # type: ignore[override]
        input, weight = ctx.saved_tensors
        return F.linear_backward(
            grad_output,
            input,
            weight,
            needs_input_grad=ctx.needs_input_grad[0],
            needs_weight_grad=ctx.needs_input_grad[1],
            needs_bias_grad=ctx.needs_input_grad[2],
        )

    @staticmethod
    def jvp(ctx: Any, input_t: Optional[Tensor], weight_t: Optional[Tensor], bias_t: Optional[Tensor]):  # type: ignore[override]
        input, weight = ctx.saved_tensors
        return F.linear_jvp(input, weight, input_t, weight_t, bias_t)  # dz = da_prev W^T + a_prev dW^T + db


def _make_function(class_name: str, doc: str, forward, setup_context, backward, jvp) -> type[Function]:
    """A forward + setup_context style Function class (vmap rule generated) from four plain functions."""
    return type(
        class_name,
        (Function,),
        {
            "__doc__": doc,
            "__module__": __name__,
            "generate_vmap_rule": True,
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
        },
    )


def _activation_function(name: str, class_name: str) -> type[Function]:
    """One Function per activation; extra apply arguments (leaky_relu's negative_slope) are constants."""

    def forward(input: Tensor, *args: float) -> Tensor:
        output = F.activation(name, input, *args)
        # a fresh tensor, never the input itself (identity): an output that aliases an input shares its memory,
        # and an in-place change of one would change the other (verify.check_function's aliasing row)
        return output.clone() if output is input else output

    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.args = inputs[1:]
        ctx.saves_output = ACTIVATION_REGISTRY[name].saves_output  # identity's derivative needs nothing saved
        if ctx.saves_output:
            _save(ctx, output)

    def backward(ctx: Any, grad_output: Tensor):
        output = ctx.saved_tensors[0] if ctx.saves_output else grad_output
        return (F.activation_backward(name, grad_output, output, *ctx.args), *([None] * len(ctx.args)))

    def jvp(ctx: Any, input_t: Tensor, *args_t: None) -> Tensor:
        if not ctx.saves_output:  # da = dz (identity), as a fresh tensor like the forward's output
            return F.activation_jvp(name, input_t, input_t).clone()
        return F.activation_jvp(name, input_t, ctx.saved_tensors[0], *ctx.args)  # da = sigma'(z) * dz

    slope = ", negative_slope" if ACTIVATION_REGISTRY[name].takes_slope else ""
    doc = f"a = {name}(z) with the hand-derived backward from the saved output. ``apply(input{slope})``."
    return _make_function(class_name, doc, forward, setup_context, backward, jvp)


class _FunctionTable(Mapping):
    """name -> the Function of every registered activation (or loss), made on first use from the registry:
    a formula registered with ``manualbp.register_activation`` gets its Function with no other edit."""

    def __init__(self, registry: Mapping, make: Callable[[str], type[Function]]) -> None:
        self._registry, self._make, self._made = registry, make, {}

    def __getitem__(self, name: str) -> type[Function]:
        function = self._made.get(name)
        if function is None:
            self._registry[name]  # an unknown name: the registry's error, listing the names
            function = self._made[name] = self._make(name)
            if "_apply_compiled" in globals() and "apply_compiled" not in vars(function):  # made after import
                function.apply_compiled = _apply_compiled(_without_jvp(function))  # type: ignore[attr-defined]
        return function

    def __iter__(self):
        return iter(self._registry)

    def __len__(self) -> int:
        return len(self._registry)

    def __contains__(self, name: object) -> bool:
        return name in self._registry


def _activation_class_name(name: str) -> str:
    builtin = {"relu": "ReLU", "leaky_relu": "LeakyReLU"}
    return builtin.get(name, "".join(part.capitalize() for part in name.split("_"))) + "Function"


#: name -> the per-op Function of each registered activation (``apply(input[, negative_slope])``).
ACTIVATION_FUNCTIONS: Mapping[str, type[Function]] = _FunctionTable(
    ACTIVATION_REGISTRY, lambda name: _activation_function(name, _activation_class_name(name))
)
SigmoidFunction = ACTIVATION_FUNCTIONS["sigmoid"]
TanhFunction = ACTIVATION_FUNCTIONS["tanh"]
ReLUFunction = ACTIVATION_FUNCTIONS["relu"]
LeakyReLUFunction = ACTIVATION_FUNCTIONS["leaky_relu"]
IdentityFunction = ACTIVATION_FUNCTIONS["identity"]


def _loss_function(rules: Callable[[], tuple[Callable, Callable, Optional[Callable]]], class_name: str, doc: str) -> type[Function]:
    """A loss Function ``apply(input, target, reduction)`` from ``rules() -> (forward, backward, jvp)``.

    ``rules`` is called at each use, so that a formula patched where it is looked up (the registry's spec, or
    ``manualbp.functional``: ``manualbp.verify.inject_bug``) reaches this Function too. ``backward(dL/dL, o, y,
    reduction)`` returns (dL/do, dL/dy); a None ``jvp`` means no forward-mode rule."""

    def forward(input: Tensor, target: Tensor, reduction: str) -> Tensor:
        return rules()[0](input, target, reduction)

    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        input, target, reduction = inputs
        _save(ctx, input, target)
        ctx.reduction = reduction

    def backward(ctx: Any, grad_output: Tensor):
        input, target = ctx.saved_tensors
        grad_input, grad_target = rules()[1](grad_output, input, target, ctx.reduction)
        return (
            grad_input if ctx.needs_input_grad[0] else None,
            grad_target if ctx.needs_input_grad[1] else None,
            None,
        )

    def jvp(ctx: Any, input_t: Optional[Tensor], target_t: Optional[Tensor], _: None) -> Optional[Tensor]:
        rule = rules()[2]
        if rule is None:
            raise NotImplementedError(f"{class_name}: this loss has no jvp rule (forward-mode AD)")
        input, target = ctx.saved_tensors
        return rule(input, target, input_t, target_t, ctx.reduction)  # dL

    return _make_function(class_name, doc, forward, setup_context, backward, jvp)


def _registered_loss_function(name: str, class_name: Optional[str] = None) -> type[Function]:
    """The Function of the registered loss ``name``: its spec's forward, backward and jvp, read from the registry
    at each call. ``apply(input, target, reduction)``."""
    spec = LOSS_REGISTRY[name]
    doc = f"L = {spec.formula}, dL/do = {spec.gradient}. ``apply(input, target, reduction)``."

    def rules() -> tuple[Callable, Callable, Optional[Callable]]:
        current = LOSS_REGISTRY[name]
        return current.forward, current.backward, current.jvp

    return _loss_function(rules, class_name or _activation_class_name(name).replace("Function", "LossFunction"), doc)


SquaredErrorLossFunction = _registered_loss_function("squared_error", "SquaredErrorLossFunction")
MSELossFunction = _registered_loss_function("mse", "MSELossFunction")


_CE_SAVED = "_manualbp_cross_entropy"  # forward -> setup_context, on the loss tensor for an instant


class CrossEntropyFunction(Function):
    """Fused softmax + cross-entropy on logits; dL/do = softmax(o) - y. ``apply(input, target, reduction)``.

    For class indices in eager mode the forward hands log yhat and the example count it computed to the
    backward, which then runs only the two kernels of the formula; where the backward must build a graph
    (double backward) or under torch.compile / torch.func it recomputes log yhat from the saved input,
    differentiably.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, target: Tensor, reduction: str) -> Tensor:  # type: ignore[override]
        if (
            target.is_floating_point()
            or torch.compiler.is_compiling()
            or _transforms_active()
            or _is_wrapped(input)
            or _tracing_state() is not None  # jit.trace calls forward alone (nn._call): no setup_context follows
        ):
            return F.cross_entropy(input, target, reduction)
        loss, log_probs, count = F.class_cross_entropy(input, target, reduction)
        setattr(loss, _CE_SAVED, (log_probs, count))  # setup_context takes them off at once
        return loss

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        input, target, reduction = inputs
        # under torch.compile the forward took the plain path (nothing to take off), and dynamo cannot trace
        # a tensor's __dict__
        reused = () if torch.compiler.is_compiling() else output.__dict__.pop(_CE_SAVED, ())
        # saved like any saved tensor (saved_tensors_hooks see them); read only where no graph is built
        _save(ctx, input, target, *reused)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):  # type: ignore[override]
        input, target, *reused = ctx.saved_tensors  # input unpacked even when unused: in-place changes raise
        if reused and not torch.is_grad_enabled():  # no graph to build: reuse the forward's log yhat and count
            log_probs, count = reused
            grad_input, grad_target = F.cross_entropy_backward_from_log_probs(
                grad_output, log_probs, target, ctx.reduction, count
            )
            if grad_input.dim() != input.dim():
                grad_input = grad_input.reshape(input.shape)  # rows (N, K) -> (*, K)
        else:
            grad_input, grad_target = F.cross_entropy_backward(grad_output, input, target, ctx.reduction)
        needs = ctx.needs_input_grad
        return (grad_input if needs[0] else None, grad_target if needs[1] else None, None)

    @staticmethod
    def jvp(ctx: Any, input_t: Optional[Tensor], target_t: Optional[Tensor], _: None) -> Optional[Tensor]:  # type: ignore[override]
        input, target, *reused = ctx.saved_tensors
        log_probs = reused[0] if reused else None  # the forward's log yhat where it kept it
        return F.cross_entropy_jvp(input, target, input_t, target_t, ctx.reduction, log_probs)  # dL


CrossEntropyOnProbabilitiesFunction = _loss_function(
    lambda: (F.cross_entropy_on_probabilities, F.cross_entropy_on_probabilities_backward, F.cross_entropy_on_probabilities_jvp),
    "CrossEntropyOnProbabilitiesFunction",
    "The notes' unfused L = sum_k -y_k log yhat_k on probabilities. ``apply(input, target, reduction)``.",
)


class SoftmaxFunction(Function):
    """yhat = softmax(o) over the last dimension; backward from the saved output. ``apply(input)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor) -> Tensor:
        return F.softmax(input)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        _save(ctx, output)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):  # type: ignore[override]
        (output,) = ctx.saved_tensors
        return F.softmax_backward(grad_output, output)

    @staticmethod
    def jvp(ctx: Any, input_t: Tensor) -> Tensor:  # type: ignore[override]
        (output,) = ctx.saved_tensors
        return F.softmax_jvp(input_t, output)  # dyhat = yhat * (do - sum_j yhat_j do_j)


def split_params(params: Sequence[Tensor], bias: bool) -> tuple[list[Tensor], list[Optional[Tensor]]]:
    """(W1, b1, W2, b2, ...) -> ([W1, W2, ...], [b1, b2, ...]); without bias (W1, W2, ...) -> (Ws, [None]*L)."""
    if bias:
        return list(params[0::2]), list(params[1::2])
    return list(params), [None] * len(params)


def join_params(weights: Sequence[Optional[Tensor]], biases: Sequence[Optional[Tensor]], bias: bool) -> list:
    """The inverse of :func:`split_params`: (W1, b1, W2, b2, ...) with bias, (W1, W2, ...) without."""
    if bias:
        return [t for pair in zip(weights, biases) for t in pair]
    return list(weights)


def _param_needs(needs: Sequence[bool], bias: bool, n_layers: int) -> tuple[list[bool], list[bool]]:
    """MLPFunction's needs_input_grad for its parameters -> (weights' flags, biases' flags)."""
    if bias:
        return list(needs[0::2]), list(needs[1::2])
    return list(needs), [False] * n_layers


class MLPFunction(Function):
    """The whole MLP in one Function; backward is the notes' two-pass algorithm.

    ``apply(input, activations, bias, *params)`` where ``activations`` is a tuple of
    ``(name, negative_slope)`` pairs, one per hidden layer, ``bias`` says whether ``params`` interleaves
    biases (W1, b1, W2, b2, ...) or holds weights only, and ``input`` has shape (*, in_features).

    Returns ``(o, a_1, ..., a_{L-1})``: the output of shape (*, out_features) and each hidden
    activation of shape (N, width) with N the flattened batch. Saved for backward: the input, the
    weights and the hidden activations (never the pre-activations).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(input: Tensor, activations: tuple, bias: bool, *params: Tensor):  # type: ignore[override]
        weights, biases = split_params(params, bias)
        if input.dim() == 2:
            result = F.mlp_forward(input, weights, biases, activations)
            return (result.output, *result.hidden)
        x = input.reshape(-1, input.shape[-1])  # (N, in)
        result = F.mlp_forward(x, weights, biases, activations)
        # (*, out), as a fresh tensor rather than a view of the rows (what torch's matmul returns for (*, in) too):
        # forward mode asks a view output's tangent for a layout that vmap over the tangents cannot give
        output = torch.ops.aten._unsafe_view(result.output, (*input.shape[:-1], result.output.shape[-1]))
        return (output, *result.hidden)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        input, bias = inputs[0], inputs[2]
        weights = inputs[3::2] if bias else inputs[3:]
        needs = ctx.needs_input_grad
        ctx.all_params = all(needs[3:])
        # Save only what the backward will read, as native autograd does: x for dL/dW^1; W^l when a
        # gradient must pass below layer l; a^l for dL/dW^{l+1} or for sigma' on the way down.
        if _forward_ad._current_level >= 0:  # the jvp reads x, every W^l and every a^l (saved for both)
            _save(ctx, input, *weights, *output[1:])
        elif ctx.all_params:  # training: every parameter needs its gradient, so all but W^1 pass one down
            ctx.save_for_backward(input, weights[0] if needs[0] else None, *weights[1:], *output[1:])
        else:
            needs_w, needs_b = _param_needs(needs[3:], bias, len(weights))
            below = F.needs_below(needs[0], needs_w, needs_b)
            ctx.save_for_backward(
                input if needs_w[0] else None,
                *[w if below[k] else None for k, w in enumerate(weights)],
                *[a if (needs_w[k + 1] or below[k + 1]) else None for k, a in enumerate(output[1:])],
            )
        ctx.activations = inputs[1]
        ctx.bias = bias
        ctx.n_layers = len(weights)
        ctx.input_shape = input.shape
        ctx.input_dim = input.dim()
        ctx.out_features = weights[-1].shape[0]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, grad_output: Optional[Tensor], *grad_hidden: Optional[Tensor]):  # type: ignore[override]
        n_layers = ctx.n_layers
        saved = ctx.saved_tensors
        input, weights, hidden = saved[0], saved[1 : 1 + n_layers], saved[1 + n_layers :]
        needs = ctx.needs_input_grad
        for g in grad_hidden:
            if g is not None:  # a hidden activation was used downstream too (double backward)
                if grad_output is None:  # only hidden activations were: dL/do = 0, (N, out)
                    grad_output = g.new_zeros(g.shape[0], ctx.out_features)
                break
        else:  # the usual case: only o was used downstream
            grad_hidden = None  # type: ignore[assignment]
            if grad_output is None:  # nothing was: every gradient is zero
                return (None,) * len(needs)
        input_dim = ctx.input_dim
        if input_dim != 2:  # (*, in) and (*, out) -> rows (N, in) and (N, out)
            grad_output = grad_output.reshape(-1, grad_output.shape[-1])
            if input is not None:
                input = input.reshape(-1, input.shape[-1])
        if ctx.all_params:  # every weight (mlp_backward's default), and every bias if there are biases
            needs_w, needs_b = None, (None if ctx.bias else [False] * n_layers)
        else:
            needs_w, needs_b = _param_needs(needs[3:], ctx.bias, n_layers)
        grads = F.mlp_backward(
            grad_output,  # dL/do, (N, out)
            input,  # type: ignore[arg-type]
            weights,
            hidden,
            ctx.activations,
            grad_hidden=grad_hidden,
            needs_input_grad=needs[0],
            needs_weight_grad=needs_w,
            needs_bias_grad=needs_b,
        )
        grad_input = grads.grad_input
        if grad_input is not None and input_dim != 2:
            grad_input = grad_input.reshape(ctx.input_shape)
        return (grad_input, None, None, *join_params(grads.grad_weights, grads.grad_biases, ctx.bias))

    @staticmethod
    def jvp(ctx: Any, input_t: Optional[Tensor], activations_t: None, bias_t: None, *params_t: Optional[Tensor]):  # type: ignore[override]
        """Tangents (do, da^1, ..., da^{L-1}) of every output from dx, dW^l, db^l (None: zero)."""
        n_layers = ctx.n_layers
        saved = ctx.saved_tensors
        input, weights, hidden = saved[0], saved[1 : 1 + n_layers], saved[1 + n_layers :]
        if ctx.input_dim != 2:  # (*, in) -> rows (N, in)
            input = input.reshape(-1, input.shape[-1])
            if input_t is not None:
                input_t = input_t.reshape(input.shape)
        weights_t, biases_t = split_params(params_t, ctx.bias)
        output_t, hidden_t = F.mlp_jvp(input, weights, hidden, ctx.activations, input_t, weights_t, biases_t)
        if ctx.input_dim != 2:  # o depends on every input, so some tangent reached it: never None
            output_t = output_t.reshape(*ctx.input_shape[:-1], ctx.out_features)  # rows (N, out) -> (*, out)
        # a^l below every tangent has a zero one; autograd takes no None for a forward-differentiable output
        return (output_t, *[torch.zeros_like(a) if t is None else t for t, a in zip(hidden_t, hidden)])


_BUILTIN_LOSS_FUNCTIONS: dict[str, type[Function]] = {
    "cross_entropy": CrossEntropyFunction,
    "squared_error": SquaredErrorLossFunction,
    "mse": MSELossFunction,
}
#: name -> the Function of each registered loss (``apply(input, target, reduction)``): the built-in ones'
#: own classes, a registered one's made from its spec.
LOSS_FUNCTIONS: Mapping[str, type[Function]] = _FunctionTable(
    LOSS_REGISTRY, lambda name: _BUILTIN_LOSS_FUNCTIONS.get(name) or _registered_loss_function(name)
)


def _without_jvp(function: type[Function]) -> type[Function]:
    """``function`` with ``jvp`` reset to ``Function.jvp``, for torch.compile.

    Dynamo graph-breaks on (and with ``fullgraph=True`` rejects) any ``autograd.Function`` with a custom ``jvp``,
    whatever the mode, and a compiled graph has no forward-mode AD anyway. Forward, setup_context and backward
    are inherited, so compiled and eager code run the same formulas.
    """
    return type(function.__name__, (function,), {"__module__": __name__, "jvp": staticmethod(Function.jvp)})


def _apply_compiled(twin: type[Function]) -> staticmethod:
    """A staticmethod ``apply_compiled(*args)`` = ``twin.apply(*args)``: dynamo traces a Function class's
    staticmethods (not its other attributes, nor a dict keyed by it), so this is how it reaches the twin."""

    def apply_compiled(*args: Any) -> Any:
        return twin.apply(*args)

    return staticmethod(apply_compiled)


for _function in (
    LinearFunction,
    *ACTIVATION_FUNCTIONS.values(),
    SquaredErrorLossFunction,
    MSELossFunction,
    CrossEntropyFunction,
    SoftmaxFunction,
    CrossEntropyOnProbabilitiesFunction,
    MLPFunction,
):
    _function.apply_compiled = _apply_compiled(_without_jvp(_function))  # type: ignore[attr-defined]
