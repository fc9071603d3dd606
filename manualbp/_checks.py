"""Input validation shared by the public API: clear errors naming the argument, raised before arithmetic."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.nn import Parameter

from .functional import REDUCTIONS, kernel_checks_class_range

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def is_tracing(*tensors: Tensor) -> bool:
    """True under torch.compile or a torch.func transform, where value-dependent checks cannot run."""
    if torch.compiler.is_compiling():
        return True
    for t in tensors:  # a plain loop: cheaper than any() over a generator on this per-call path
        if _is_wrapped(t):
            return True
    return False


def check_tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(t: Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )


def check_features(input: object, in_features: int, weight: Tensor, name: str = "input") -> Tensor:
    """A layer's input: a floating tensor of shape (*, in_features) matching the weight's device and dtype."""
    if type(weight) is not Parameter and type(weight) is not Tensor:
        check_not_expanded(weight)
    if not isinstance(input, Tensor):
        check_tensor(input, name)
    t: Tensor = input  # type: ignore[assignment]
    dtype = t.dtype
    if not dtype.is_floating_point:
        check_floating(t, name)
    shape = t.shape
    if not shape or shape[-1] != in_features:
        raise ValueError(
            f"{name}: expected shape (*, {in_features}) (last dimension = in_features = {in_features}), got {_shape(t)}"
        )
    if t.device != weight.device:
        check_same_device(t, name, weight, "the weights")
    if dtype != weight.dtype:
        raise TypeError(
            f"{name} has dtype {dtype} but the weights have dtype {weight.dtype}; "
            f"convert one of them (for example model.to({dtype}) or {name}.to({weight.dtype}))"
        )
    return t


def check_not_expanded(weight: Tensor) -> None:
    """torch's ExpandedWeights (Opacus's ``grad_sample_mode="ew"``) only see their own ops, not a Function."""
    from torch.nn.utils._expanded_weights import ExpandedWeight

    if isinstance(weight, ExpandedWeight):
        raise TypeError(
            "weight: torch's ExpandedWeights (Opacus grad_sample_mode='ew') cannot see inside manualbp's "
            "hand-derived autograd.Function; use grad_sample_mode='hooks' (Opacus's default: per-example "
            "gradients from manualbp's formula) or 'functorch'"
        )


def check_same_device(t: Tensor, name: str, other: Tensor, other_name: str) -> None:
    if t.device != other.device:
        verb = "are" if other_name.endswith("s") else "is"
        raise ValueError(f"{name} is on {t.device} but {other_name} {verb} on {other.device}; move them to one device")


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def _check_not_empty_mean(input: Tensor, reduction: str, examples: int) -> None:
    if reduction == "mean" and examples == 0:
        raise ValueError(
            f"input: an empty batch (shape {_shape(input)}) has no mean; "
            "use reduction='sum' (gives 0) or reduction='none' (gives an empty tensor)"
        )


def check_regression_loss(input: object, target: object, reduction: object) -> None:
    """Squared-error losses: floating input (*, K) and a floating target of the very same shape."""
    check_reduction(reduction)
    i = check_tensor(input, "input")
    t = check_tensor(target, "target")
    check_floating(i, "input")
    if i.dim() == 0:
        raise ValueError("input: expected shape (*, K) with at least one dimension, got a 0-d tensor")
    if not t.is_floating_point():
        raise TypeError(f"target must be a floating-point tensor for a regression loss, got {t.dtype}")
    if t.shape != i.shape:
        hint = ""
        if t.shape == i.shape[:-1]:
            hint = " (add the output dimension with target.unsqueeze(-1))"
        raise ValueError(f"target: expected shape {_shape(i)} (the shape of input), got {_shape(t)}{hint}")
    check_same_device(t, "target", i, "input")
    if t.dtype != i.dtype:
        raise TypeError(f"target has dtype {t.dtype} but input has dtype {i.dtype}; they must match")
    _check_not_empty_mean(i, reduction, i.shape[:-1].numel())  # type: ignore[arg-type]


def check_classification_loss(input: object, target: object, reduction: object) -> None:
    """Cross-entropy: floating logits (*, C); class indices (*) of an integer dtype in [0, C), or
    probabilities (*, C) of input's dtype.

    The range of class indices is checked here only where the loss kernel does not reject a bad index
    itself (see ``functional.kernel_checks_class_range``); ``manualbp.nn.CrossEntropyLoss`` turns the
    kernel's ``IndexError`` into the same ``ValueError`` (:func:`check_class_range`)."""
    # The helpers raise the errors; on the happy path each condition is tested inline (this runs per call).
    if reduction not in REDUCTIONS:
        check_reduction(reduction)
    if not isinstance(input, Tensor):
        check_tensor(input, "input")
    if not isinstance(target, Tensor):
        check_tensor(target, "target")
    i: Tensor = input  # type: ignore[assignment]
    t: Tensor = target  # type: ignore[assignment]
    dtype, target_dtype, shape = i.dtype, t.dtype, i.shape
    if not dtype.is_floating_point:
        check_floating(i, "input")
    if not shape:
        raise ValueError("input: expected logits of shape (*, C) with at least one dimension, got a 0-d tensor")
    if t.device != i.device:
        check_same_device(t, "target", i, "input")
    n_classes = shape[-1]
    if n_classes == 0:
        raise ValueError(f"input: the class dimension C (the last) must be at least 1, got shape {_shape(i)}")
    if target_dtype.is_floating_point:
        if t.shape != shape:
            raise ValueError(
                f"target: probabilities must have the shape of input {_shape(i)}, got {_shape(t)} "
                f"(class indices must have shape {tuple(shape[:-1])} and an integer dtype)"
            )
        if target_dtype != dtype:
            raise TypeError(f"target has dtype {target_dtype} but input has dtype {dtype}; they must match")
    elif target_dtype is torch.bool or target_dtype.is_complex:
        raise TypeError(f"target must hold class indices (an integer dtype) or probabilities, got {target_dtype}")
    else:
        if t.shape != shape[:-1]:
            raise ValueError(
                f"target: class indices must have shape {tuple(shape[:-1])} (input's shape without the "
                f"class dimension C={n_classes}), got {_shape(t)}"
            )
        # On CPU the loss kernel itself rejects an out-of-range index (manualbp.nn.CrossEntropyLoss turns
        # its IndexError into this function's ValueError): no separate pass over the targets, no sync.
        if t.numel() and not t.is_meta and not kernel_checks_class_range(i, reduction) and not is_tracing(t):
            check_class_range(t, n_classes)
    if reduction == "mean":
        _check_not_empty_mean(i, reduction, shape[:-1].numel())


def check_class_range(target: Tensor, n_classes: int) -> None:
    """Class indices in [0, n_classes): a ValueError naming the first extreme out of range (one pass, one sync)."""
    extremes = torch.aminmax(target)
    low, high = int(extremes.min), int(extremes.max)
    if low < 0 or high >= n_classes:
        bad = low if low < 0 else high
        raise ValueError(f"target: class index {bad} is out of range for C={n_classes} classes [0, {n_classes})")


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_int_list(values: object, name: str) -> list[int]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {type(values).__name__}")
    return [check_positive_int(v, f"{name}[{k}]") for k, v in enumerate(values)]


def check_negative_slope(value: object, name: str = "negative_slope") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(
            f"{name} must be a number >= 0 (the derivative is read from the saved output, "
            f"which needs a > 0 exactly when z > 0), got {value!r}"
        )
    return float(value)
