"""The references a manual model is held against: the named losses (:data:`LOSSES`), each as the manual loss
module and a native PyTorch reference (:func:`_loss_pair`), and the pairing of a model's parameters with its
reference's (:func:`_match_parameters`), with their display names in the notes' notation (W^l, b^l).
"""

from __future__ import annotations

from typing import Callable, Union

from torch import Tensor, nn

from .. import functional as F
from ..nn import MLP, make_loss
from ..registry import LOSS_REGISTRY

__all__ = ["LOSSES"]

#: The named losses: every registered one (``manualbp.registry``, a live view: iterate it for the names), the
#: built-in "cross_entropy" (fused softmax + cross-entropy on logits), "squared_error" (the notes'
#: 1/2 sum_k (o_k - y_k)^2 per example) and "mse" (PyTorch's mean squared error) first.
LOSSES = LOSS_REGISTRY


LossArg = Union[str, Callable[[Tensor, Tensor], Tensor]]


def _native_squared_error(output: Tensor, target: Tensor, reduction: str) -> Tensor:
    per_example = 0.5 * ((output - target) ** 2).sum(-1)  # the notes' 1/2 sum_k (o_k - y_k)^2
    if reduction == "mean":
        return per_example.mean()
    return per_example.sum() if reduction == "sum" else per_example


_native_cross_entropy = F._torch_cross_entropy  # the registry's reference of "cross_entropy"


def _check_loss(loss: object, reduction: object) -> None:
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))} or a callable, got {loss!r}")
    elif not callable(loss):
        raise TypeError(f"loss must be a name ({', '.join(LOSSES)}) or a callable, got {type(loss).__name__}")
    if reduction not in F.REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, F.REDUCTIONS))}, got {reduction!r}")


def _loss_pair(loss: LossArg, reduction: str) -> tuple[Callable, Callable]:
    """(manual loss, native reference loss); a callable loss serves both sides."""
    _check_loss(loss, reduction)
    if callable(loss):
        return loss, loss
    reference = LOSS_REGISTRY[loss].torch_reference()  # PyTorch's own ops (a registered loss: its forward)
    return make_loss(loss, reduction), lambda o, y: reference(o, y, reduction)


def _parameter_names(model: nn.Module) -> dict[str, str]:
    """Display names: W^l / b^l for a manualbp MLP (the notes' superscripts), the state_dict key otherwise."""
    names = {n: f"[{n}]" for n, _ in model.named_parameters()}
    if isinstance(model, MLP):
        for k, (n, _) in enumerate(model.named_parameters()):
            layer = k // 2 + 1 if model.bias else k + 1
            is_bias = model.bias and k % 2 == 1
            names[n] = f"{'b' if is_bias else 'W'}^{layer}"
    return names


def _match_parameters(model: nn.Module, reference: nn.Module) -> list[tuple[str, Tensor, Tensor]]:
    """Pairs (name, model parameter, reference parameter): by name when the names agree, else by order."""
    mine = list(model.named_parameters())
    theirs = list(reference.named_parameters())
    if [n for n, _ in mine] != [n for n, _ in theirs]:
        by_name = dict(theirs)
        if set(by_name) == {n for n, _ in mine}:
            theirs = [(n, by_name[n]) for n, _ in mine]
        elif len(mine) != len(theirs) or any(p.shape != q.shape for (_, p), (_, q) in zip(mine, theirs)):
            raise ValueError(
                "reference: its parameters do not match the model's: model has "
                f"{[(n, tuple(p.shape)) for n, p in mine]}, reference has {[(n, tuple(p.shape)) for n, p in theirs]}"
            )
    return [(n, p, q) for (n, p), (_, q) in zip(mine, theirs)]
