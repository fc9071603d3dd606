"""``nn.Module`` front: drop-in layers, activations, losses and the MLP, backed by ``manualbp.autograd``.

Each module validates its input (clear ``ValueError``/``TypeError`` naming the argument) and then calls
the matching hand-derived Function. Under ``torch.autocast`` the modules cast as native PyTorch does
(linear layers to the autocast dtype, losses to float32), with the casts recorded by autograd so
float32 parameters get float32 gradients.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad as _forward_ad
from torch.nn.utils import skip_init

from . import _checks as C
from . import native as _native_ext
from .autograd import (
    ACTIVATION_FUNCTIONS,
    LOSS_FUNCTIONS,
    CrossEntropyFunction,
    LinearFunction,
    MLPFunction,
    MSELossFunction,
    SoftmaxFunction,
    SquaredErrorLossFunction,
    _is_wrapped,
    _transforms_active,
    apply_function,
)
from .registry import ACTIVATION_REGISTRY, LOSS_REGISTRY

__all__ = [
    "Linear",
    "Sigmoid",
    "Tanh",
    "ReLU",
    "LeakyReLU",
    "Identity",
    "Softmax",
    "SquaredErrorLoss",
    "MSELoss",
    "CrossEntropyLoss",
    "MLP",
    "make_activation",
    "make_loss",
    "RegisteredActivation",
    "RegisteredLoss",
    "TorchActivation",
]


#: Is autocast on for any device type? One cheap call on the common path instead of a device lookup per
#: module call (torch.compile constant-folds it); older torch without it asks about the device each time.
_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


_is_compiling = torch.compiler.is_compiling
_torch_function_mode_enabled = torch._C._is_torch_function_mode_enabled
_tracing_state = torch._C._get_tracing_state
_Parameter = nn.Parameter


def _native_eligible(input: object, others) -> bool:
    """May the compiled autograd nodes (``manualbp/csrc/module.cpp``) stand in for the Python Functions?

    Only in plain eager mode: no torch.compile (checked by the caller, first), no torch.func transform and no
    functorch-wrapped tensor, no autocast (the Python path does its casts), no torch function mode, no
    forward-mode AD level (C++ nodes have no jvp), no jit tracing, and plain tensors or parameters only
    (a subclass may override what the Python Function dispatches). This runs on every call: cheap checks only.
    """
    if (
        _any_autocast_enabled()
        or _transforms_active()
        or _torch_function_mode_enabled()
        or _forward_ad._current_level >= 0
        or _tracing_state() is not None
        or type(input) is not Tensor
        or _is_wrapped(input)
    ):
        return False
    for t in others:  # a plain loop: cheaper than any() over a generator
        if (type(t) is not _Parameter and type(t) is not Tensor) or _is_wrapped(t):
            return False
    return True


def _call(function, *args):
    """``function.apply(*args)``; under ``torch.jit.trace`` (and so the TorchScript-based ONNX exporter) the
    Function's own ``forward``, whose ATen ops the tracer records.

    A tracer cannot record a Python ``autograd.Function`` (the graph would hold an unsavable Python call, and the
    ONNX exporter would keep a fragment of it), so a traced graph runs the same forward formulas of
    ``manualbp.functional`` as plain ops; its backward is then autograd's, not the hand-derived one.
    """
    if _tracing_state() is not None:
        return function.forward(*args)
    return apply_function(function, *args)


_module_globals = torch.nn.modules.module


def _global_hooks() -> bool:
    """Are module hooks registered for every module (``torch.nn.modules.module.register_module_forward_hook``...)?"""
    g = _module_globals
    return bool(
        g._global_forward_hooks
        or g._global_forward_pre_hooks
        or g._global_backward_hooks
        or g._global_backward_pre_hooks
    )


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type == "meta":  # autocast has no meta dispatch key; shapes only
        return None
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(value, dtype: torch.dtype):
    """Autocast's rule for its lower-precision ops: floating tensors other than float64 go to ``dtype``."""
    if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.to(dtype)
    return value


def _apply_autocast(function, *args):
    """``function.apply(*args)``, with autocast's casts done explicitly (and differentiably) first.

    Inside the Function autocast is off, so its forward and backward run in the cast dtype as the
    native ops would, and the casts in the graph give float32 parameters float32 gradients.
    """
    if not _any_autocast_enabled():  # one cheap call on the common path, before asking per device
        return _call(function, *args)
    device_type = args[0].device.type
    dtype = _autocast_dtype(device_type)
    if dtype is None:
        return _call(function, *args)
    with torch.autocast(device_type, enabled=False):
        return _call(function, *[_cast(a, dtype) for a in args])


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------
class Linear(nn.Module):
    r"""z = x W^T + b with the hand-derived backward; a drop-in for ``torch.nn.Linear``.

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        bias: if False, the layer learns no additive bias. Default: True.

    Shape:
        - Input: (*, in_features). Output: (*, out_features).

    Example:
        >>> m = Linear(20, 30)
        >>> m(torch.randn(128, 20)).shape
        torch.Size([128, 30])
    """

    __constants__ = ["in_features", "out_features"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.in_features = C.check_positive_int(in_features, "in_features")
        self.out_features = C.check_positive_int(out_features, "out_features")
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The same initialization as ``torch.nn.Linear``: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor) -> Tensor:
        C.check_features(input, self.in_features, self.weight)
        return _apply_autocast(LinearFunction, input, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def to_torch(self, share: bool = False) -> nn.Linear:
        """The equivalent ``nn.Linear``, drawing nothing from the random number generator.

        ``share=True`` gives it these very parameters (training one trains the other); otherwise copies.
        """
        weight, bias = self.weight, self.bias  # a parametrized weight: the tensor its parametrization computes
        linear = skip_init(
            nn.Linear, self.in_features, self.out_features, bias is not None, device=weight.device, dtype=weight.dtype
        )
        for name, value in (("weight", weight), ("bias", bias)):
            if value is None:
                continue
            if share:
                if not isinstance(value, nn.Parameter):
                    raise ValueError(f"share=True: the layer's {name} is computed (parametrized), not a parameter")
                setattr(linear, name, value)
            else:
                with torch.no_grad():
                    getattr(linear, name).copy_(value)
        return linear

    def __prepare_scriptable__(self) -> nn.Linear:
        """``torch.jit.script`` compiles ``nn.Linear`` with these very parameters (a Python Function cannot be
        scripted, so the scripted layer's backward is autograd's)."""
        return self.to_torch(share=True)


class _Activation(nn.Module):
    name: str = ""
    negative_slope: float = 0.0

    def _args(self) -> tuple:
        return (self.negative_slope,) if ACTIVATION_REGISTRY[self.name].takes_slope else ()

    def forward(self, input: Tensor) -> Tensor:
        C.check_tensor(input, "input")
        C.check_floating(input, "input")
        return _call(ACTIVATION_FUNCTIONS[self.name], input, *self._args())

    @property
    def spec(self) -> tuple[str, float]:
        """``(name, negative_slope)`` as :class:`~manualbp.autograd.MLPFunction` takes it."""
        return (self.name, self.negative_slope)

    def to_torch(self) -> nn.Module:
        """The equivalent ``torch.nn`` activation module (``nn.Sigmoid``, ``nn.LeakyReLU(slope)``, ...)."""
        return _to_torch_activation(self.spec)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` compiles the equivalent ``torch.nn`` activation."""
        return self.to_torch()


class Sigmoid(_Activation):
    """a = 1 / (1 + exp(-z)); backward a (1 - a) from the saved output."""

    name = "sigmoid"


class Tanh(_Activation):
    """a = tanh(z); backward 1 - a^2 from the saved output."""

    name = "tanh"


class ReLU(_Activation):
    """a = max(z, 0); backward [a > 0] from the saved output."""

    name = "relu"


class Identity(_Activation):
    """a = z."""

    name = "identity"


class LeakyReLU(_Activation):
    """a = z for z > 0, negative_slope * z otherwise (negative_slope >= 0)."""

    name = "leaky_relu"

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.negative_slope = C.check_negative_slope(negative_slope)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class Softmax(nn.Module):
    """yhat = softmax(o) over the last dimension (the unfused path of the notes)."""

    def forward(self, input: Tensor) -> Tensor:
        C.check_tensor(input, "input")
        C.check_floating(input, "input")
        return _call(SoftmaxFunction, input)


_ACTIVATION_MODULES: dict[str, type[_Activation]] = {
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "identity": Identity,
}
_TORCH_ACTIVATIONS: dict[type, str] = {
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.Identity: "identity",
}


class RegisteredActivation(_Activation):
    """The module of an activation registered with :func:`manualbp.register_activation`: its per-op Function
    (the spec's forward, and its backward from the saved output)."""

    def __init__(self, name: str, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.name = ACTIVATION_REGISTRY[name].name
        self.negative_slope = C.check_negative_slope(negative_slope)

    def extra_repr(self) -> str:
        return repr(self.name)


class TorchActivation(nn.Module):
    """A registered activation's reference for ``MLP.to_torch()``: its forward formula under plain autograd
    (the derivative autograd takes of it, not the registered backward)."""

    def __init__(self, name: str, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.name, self.negative_slope = ACTIVATION_REGISTRY[name].name, float(negative_slope)

    def forward(self, input: Tensor) -> Tensor:
        return ACTIVATION_REGISTRY[self.name].forward(input, self.negative_slope)

    def extra_repr(self) -> str:
        return repr(self.name)


def make_activation(name: str, negative_slope: float = 0.01) -> _Activation:
    """The activation module called ``name``: one of the registry's (``manualbp.registry.activation_names()``)."""
    spec = ACTIVATION_REGISTRY[name]  # an unknown name: "activation must be one of ..."
    if name == "leaky_relu":
        return LeakyReLU(negative_slope)
    if name in _ACTIVATION_MODULES:
        return _ACTIVATION_MODULES[name]()
    return RegisteredActivation(spec.name, negative_slope)


def _to_torch_activation(spec: tuple[str, float]) -> nn.Module:
    name, slope = spec
    if name == "leaky_relu":
        return nn.LeakyReLU(slope)
    if name in _ACTIVATION_MODULES:
        return next(cls for cls, n in _TORCH_ACTIVATIONS.items() if n == name)()
    make = ACTIVATION_REGISTRY[name].torch_module
    return make(slope) if make is not None else TorchActivation(name, slope)


def _sequential_activation(k: int, m: nn.Module) -> tuple[str, float]:
    """``(name, negative_slope)`` of module ``k`` of an ``nn.Sequential`` given to :meth:`MLP.from_torch`."""
    if isinstance(m, _Activation):
        name, slope = m.spec
    elif isinstance(m, TorchActivation):
        name, slope = m.name, m.negative_slope
    elif type(m) in _TORCH_ACTIVATIONS:
        name = _TORCH_ACTIVATIONS[type(m)]
        slope = getattr(m, "negative_slope", 0.0)
    else:
        raise ValueError(
            f"sequential[{k}]: expected one of nn.Sigmoid, nn.Tanh, nn.ReLU, nn.LeakyReLU, "
            f"nn.Identity, got {type(m).__name__}"
        )
    if name == "leaky_relu":
        C.check_negative_slope(slope, f"sequential[{k}].negative_slope")
    return name, slope


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
class _Loss(nn.Module):
    _function: type = None  # type: ignore[assignment]
    _check = staticmethod(C.check_regression_loss)

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = C.check_reduction(reduction)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        self._check(input, target, self.reduction)
        dtype = _autocast_dtype(input.device.type) if _any_autocast_enabled() else None
        if dtype is not None and input.dtype in (torch.float16, torch.bfloat16):
            input = input.float()  # autocast runs losses in float32, as PyTorch's losses do
            if target.is_floating_point():
                target = target.float()
        return _call(self._function, input, target, self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class SquaredErrorLoss(_Loss):
    """The notes' regression loss L = 1/2 sum_k (o_k - y_k)^2 per example, so dL/do_k = o_k - y_k.

    Args:
        reduction: "mean" (average over examples), "sum" or "none" (one value per example).

    Shape:
        - input: (*, K); target: (*, K), floating; output: scalar, or (*) for "none".
    """

    _function = SquaredErrorLossFunction


class MSELoss(_Loss):
    """PyTorch's ``nn.MSELoss`` (mean over every element), with the hand-derived backward 2 (o - y) / numel.

    Against :class:`SquaredErrorLoss`: "sum" is 2x, "mean" is 2/K x the notes' loss.
    """

    _function = MSELossFunction


class CrossEntropyLoss(_Loss):
    """Fused softmax + cross-entropy on logits, as ``nn.CrossEntropyLoss``; dL/do = softmax(o) - y.

    Shape:
        - input: (*, C) logits; target: class indices (*) of an integer dtype, or probabilities (*, C).
    """

    _function = CrossEntropyFunction
    _check = staticmethod(C.check_classification_loss)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        try:
            if not _is_compiling() and type(target) is Tensor and not target.is_floating_point():
                native = _native_ext.load()  # class indices: the compiled node where it is eligible
                if native is not None and _native_eligible(input, (target,)):
                    self._check(input, target, self.reduction)
                    return native.cross_entropy(input, target, self.reduction)
            return super().forward(input, target)
        except IndexError:  # on CPU the loss kernel checks the class range itself: say it as the pre-check would
            try:
                C.check_class_range(target, input.shape[-1])
            except ValueError as e:
                raise e from None
            raise


class RegisteredLoss(_Loss):
    """The module of a loss registered with :func:`manualbp.register_loss`: its Function, from the spec."""

    def __init__(self, name: str, reduction: str = "mean") -> None:
        super().__init__(reduction)
        spec = LOSS_REGISTRY[name]
        self.name = spec.name
        self._function = LOSS_FUNCTIONS[spec.name]
        if spec.targets == "classes":
            self._check = C.check_classification_loss

    def extra_repr(self) -> str:
        return f"{self.name!r}, reduction={self.reduction!r}"


_LOSS_MODULES: dict[str, type[_Loss]] = {
    "cross_entropy": CrossEntropyLoss,
    "squared_error": SquaredErrorLoss,
    "mse": MSELoss,
}


def make_loss(name: str, reduction: str = "mean") -> _Loss:
    """The loss module called ``name``: one of the registry's (``manualbp.registry.loss_names()``)."""
    spec = LOSS_REGISTRY[name]  # an unknown name: "loss must be one of ..."
    if name in _LOSS_MODULES:
        return _LOSS_MODULES[name](reduction)
    return RegisteredLoss(spec.name, reduction)


# --------------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    r"""A multi-layer perceptron whose backward is the hand-derived two-pass algorithm, in one Function.

    Layers: z^l = W^l a^{l-1} + b^l, a^l = sigma(z^l) for each hidden layer, o = W^L a^{L-1} + b^L.
    ``state_dict()`` has exactly the keys and shapes of the equivalent
    ``nn.Sequential(nn.Linear, act, ..., nn.Linear)`` ("0.weight", "0.bias", "2.weight", ...), so weights
    load both ways with ``strict=True``; see :meth:`to_torch` and :meth:`from_torch`.

    Args:
        in_features: size of each input sample.
        hidden_features: width of each hidden layer: an int, or a sequence (may be empty: a linear model).
        out_features: size of each output (classes or regression targets).
        activation: "sigmoid", "tanh", "relu", "leaky_relu" or "identity", or one name per hidden layer.
        bias: whether every layer has a bias. Default: True.
        negative_slope: slope of leaky_relu for z < 0 (>= 0). Default: 0.01.

    Shape:
        - Input: (*, in_features). Output: (*, out_features).

    Example:
        >>> model = MLP(64, [64], 10, activation="sigmoid")
        >>> loss = CrossEntropyLoss()(model(torch.randn(32, 64)), torch.randint(0, 10, (32,)))
        >>> loss.backward()  # the hand-derived two-pass algorithm fills every .grad
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Union[int, Sequence[int]],
        out_features: int,
        activation: Union[str, Sequence[str]] = "sigmoid",
        bias: bool = True,
        negative_slope: float = 0.01,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.in_features = C.check_positive_int(in_features, "in_features")
        self.out_features = C.check_positive_int(out_features, "out_features")
        hidden = C.check_int_list(hidden_features, "hidden_features")
        if isinstance(activation, str):
            names = [activation] * len(hidden)
        elif isinstance(activation, Sequence):
            names = list(activation)
            if len(names) != len(hidden):
                raise ValueError(
                    f"activation: expected one name per hidden layer ({len(hidden)}), got {len(names)}: {names}"
                )
        else:
            raise TypeError(f"activation must be a name or a list of names, got {type(activation).__name__}")
        acts = [make_activation(n, negative_slope) for n in names]
        widths = [self.in_features, *hidden, self.out_features]
        self.bias = bool(bias)
        index = 0
        for layer in range(len(widths) - 1):
            self.add_module(str(index), Linear(widths[layer], widths[layer + 1], bias, device, dtype))
            index += 1
            if layer < len(hidden):
                self.add_module(str(index), acts[layer])
                index += 1

    # -- structure ---------------------------------------------------------------------------------
    @property
    def linears(self) -> list[Linear]:
        """The Linear layers, input to output."""
        return [m for m in self._modules.values() if isinstance(m, Linear)]

    @property
    def activations(self) -> list[_Activation]:
        """The activation modules, one per hidden layer."""
        return [m for m in self._modules.values() if isinstance(m, _Activation)]

    @property
    def hidden_features(self) -> list[int]:
        return [lin.out_features for lin in self.linears[:-1]]

    @property
    def activation_specs(self) -> tuple[tuple[str, float], ...]:
        """``(name, negative_slope)`` per hidden layer, as :class:`~manualbp.autograd.MLPFunction` takes it."""
        return tuple((m.name, m.negative_slope) for m in self._modules.values() if isinstance(m, _Activation))

    def flat_parameters(self) -> list[Tensor]:
        """(W1, b1, W2, b2, ...) with bias, (W1, W2, ...) without: MLPFunction's parameter order.

        A parametrized weight (``torch.nn.utils.parametrize``) is the tensor its parametrization computes now.
        """
        params: list[Tensor] = []
        for lin in self.linears:
            params += (lin.weight, lin.bias) if self.bias else (lin.weight,)
        return params

    def reset_parameters(self) -> None:
        for lin in self.linears:
            lin.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
            f"out_features={self.out_features}, bias={self.bias}"
        )

    # -- a stack of layers, as nn.Sequential -------------------------------------------------------
    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __getitem__(self, idx: Union[int, slice]) -> Union[nn.Module, nn.Sequential]:
        """``model[0]`` is the first Linear, ``model[-1]`` the last; a slice is an ``nn.Sequential`` of the
        same (shared) modules, as ``nn.Sequential`` slices."""
        modules = list(self._modules.items())
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(modules[idx]))
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise TypeError(f"index must be an int or a slice, got {type(idx).__name__}")
        if not -len(modules) <= idx < len(modules):
            raise IndexError(f"index {idx} is out of range for an MLP of {len(modules)} modules")
        return modules[idx][1]

    # -- forward -----------------------------------------------------------------------------------
    def _function_args(self) -> Optional[list]:
        """MLPFunction's arguments after the input: activation specs, bias, then the flat parameters.

        One pass over the submodules (this runs on every forward): the same values as
        :attr:`activation_specs` and :meth:`flat_parameters`, read afresh so a replaced parameter or a
        changed negative_slope is always seen. A parametrized weight or bias is read through the module
        attribute (its parametrization runs, differentiably). None when a submodule has hooks: they must run.
        """
        specs = []
        args: list = [None, self.bias]
        bias = self.bias
        for m in self._modules.values():
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return None
            if isinstance(m, Linear):
                p = m._parameters
                if "weight" in p:
                    args.append(p["weight"])
                    if bias:
                        args.append(p["bias"] if "bias" in p else m.bias)
                else:  # torch.nn.utils.parametrize moved it into m.parametrizations
                    args += (m.weight, m.bias) if bias else (m.weight,)
            elif isinstance(m, _Activation):
                specs.append((m.name, m.negative_slope))
        args[0] = tuple(specs)
        return args

    def _outputs(self, input: Tensor) -> Sequence[Tensor]:
        """MLPFunction's outputs for ``input``: o, then a^1 .. a^{L-1} (from its compiled twin where eligible)."""
        args = self._function_args()
        if args is None or _global_hooks():
            return self._layer_by_layer(input)
        C.check_features(input, self.in_features, args[2])
        if not _is_compiling():
            native = _native_ext.load()
            if native is not None:
                params = args[2:]
                if _native_eligible(input, params) and all(ACTIVATION_REGISTRY[n].native for n, _ in args[0]):
                    return native.mlp(input, args[0], args[1], params)  # C++ kernels: the built-in names only
        return _apply_autocast(MLPFunction, input, *args)

    def _layer_by_layer(self, input: Tensor) -> Sequence[Tensor]:
        """The same outputs through each submodule's own call, so that module hooks run where they are
        registered (forward, forward pre-, full backward hooks; Opacus, pruning, old-style spectral_norm).

        Each layer is its hand-derived per-op Function (LinearFunction, the activation's Function); the
        numbers equal the one-Function path's (``tests/nn/test_interop.py`` pins them).
        """
        from . import _opacus

        _opacus.register_if_loaded()
        hidden = []
        x = input
        for m in self._modules.values():
            x = m(x)
            if isinstance(m, _Activation):
                hidden.append(x.reshape(-1, x.shape[-1]))  # (N, width), as MLPFunction returns it
        return (x, *hidden)

    def forward_with_hidden(self, input: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Like :meth:`forward`, also returning the hidden activations a^1 .. a^{L-1}, each (N, width)."""
        output, *hidden = self._outputs(input)
        return output, hidden

    def forward(self, input: Tensor) -> Tensor:
        return self._outputs(input)[0]

    # -- interop with torch.nn ---------------------------------------------------------------------
    def to_torch(self, share: bool = False) -> nn.Sequential:
        """The equivalent ``nn.Sequential`` of ``nn.Linear`` and activation modules.

        Copies the weights without drawing from the random number generator (so code seeded alike before and
        after stays alike); ``share=True`` gives it these very parameters instead of copies.
        """
        return nn.Sequential(*(m.to_torch(share) if isinstance(m, Linear) else m.to_torch() for m in self))

    def __prepare_scriptable__(self) -> nn.Sequential:
        """``torch.jit.script(model)`` compiles the equivalent ``nn.Sequential`` holding these very parameters.

        TorchScript cannot run a Python ``autograd.Function``: the scripted module's forward is the same
        math in ATen ops and its backward is autograd's (``torch.jit.trace`` records the same ops).
        """
        return self.to_torch(share=True)

    @classmethod
    def from_torch(cls, sequential: nn.Module) -> MLP:
        """Build an MLP from ``nn.Sequential(nn.Linear, act, nn.Linear, ..., nn.Linear)``, copying weights.

        Supported activations: nn.Sigmoid, nn.Tanh, nn.ReLU, nn.LeakyReLU (negative_slope >= 0),
        nn.Identity (and manualbp's own). Every Linear must have a bias, or none may.
        """
        if not isinstance(sequential, nn.Sequential):
            raise TypeError(f"sequential must be an nn.Sequential, got {type(sequential).__name__}")
        mods = list(sequential)
        if len(mods) % 2 == 0:
            raise ValueError(
                "sequential: expected Linear, activation, Linear, ..., Linear (an odd number of modules), "
                f"got {len(mods)} modules"
            )
        linears = []
        names: list[str] = []
        slopes: list[float] = []
        for k, m in enumerate(mods):
            if k % 2 == 0:
                if type(m) not in (nn.Linear, Linear):
                    raise ValueError(f"sequential[{k}]: expected nn.Linear, got {type(m).__name__}")
                linears.append(m)
            else:
                name, slope = _sequential_activation(k, m)
                names.append(name)
                slopes.append(slope)
        for k in range(1, len(linears)):
            if linears[k].in_features != linears[k - 1].out_features:
                raise ValueError(
                    f"sequential[{2 * k}]: in_features={linears[k].in_features} does not match the previous "
                    f"Linear's out_features={linears[k - 1].out_features}"
                )
        has_bias = {lin.bias is not None for lin in linears}
        if len(has_bias) != 1:
            raise ValueError("sequential: every Linear must have a bias, or none may (mixed bias is not supported)")
        first = linears[0].weight
        model = cls(  # on the meta device: no random draw for weights that are overwritten at once
            linears[0].in_features,
            [lin.out_features for lin in linears[:-1]],
            linears[-1].out_features,
            activation=names,
            bias=has_bias.pop(),
            device="meta",
            dtype=first.dtype,
        ).to_empty(device=first.device)
        for act, slope in zip(model.activations, slopes):
            act.negative_slope = float(slope)
        model.load_state_dict(sequential.state_dict(), strict=True)
        return model
