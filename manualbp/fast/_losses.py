"""Loss resolution shared by the fast trainers: a loss module or name -> the functional formulas."""

from __future__ import annotations

from typing import Callable, Mapping, Union

from torch import Tensor, nn

from .. import nn as mnn
from ..registry import LOSS_REGISTRY, View

__all__ = ["LOSSES", "resolve_loss"]

#: name -> (forward, backward) of every registered loss (a live view of ``manualbp.registry``); backward
#: returns (dL/do, dL/dy).
LOSSES: Mapping[str, tuple[Callable[..., Tensor], Callable[..., tuple]]] = View(
    LOSS_REGISTRY, lambda spec: (spec.forward, spec.backward)
)

_MODULES = {
    mnn.CrossEntropyLoss: "cross_entropy",
    nn.CrossEntropyLoss: "cross_entropy",
    mnn.MSELoss: "mse",
    nn.MSELoss: "mse",
    mnn.SquaredErrorLoss: "squared_error",
}


def resolve_loss(loss: Union[str, nn.Module], reduction: str = "mean") -> tuple[str, str]:
    """``(name, reduction)`` for a loss given as a name or a module (manualbp's or torch's own).

    Only the scalar reductions ("mean", "sum") make sense for training. torch's CrossEntropyLoss is
    accepted only with its defaults (no weight, no label smoothing, ignore_index unused).
    """
    if isinstance(loss, str):
        name = {"ce": "cross_entropy", "cross_entropy": "cross_entropy", "mse": "mse"}.get(loss, loss)
    elif type(loss) in _MODULES or isinstance(loss, mnn.RegisteredLoss):
        name = loss.name if isinstance(loss, mnn.RegisteredLoss) else _MODULES[type(loss)]
        reduction = loss.reduction
        if isinstance(loss, nn.CrossEntropyLoss) and (loss.weight is not None or loss.label_smoothing != 0):
            raise ValueError("loss: the fast trainers support CrossEntropyLoss without weight or label_smoothing")
    else:
        raise TypeError(f"loss must be one of {list(LOSSES)} or a matching loss module, got {type(loss).__name__}")
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {name!r}")
    spec = LOSS_REGISTRY[name]
    if spec.targets == "classes" and spec.grad_into is None:
        raise ValueError(
            f"loss {name!r} takes class labels: the fast trainers run a registered loss with targets='values' "
            "only (through its backward); train it with backend manual, autograd or both"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss reduction must be 'mean' or 'sum' for training, got {reduction!r}")
    return name, reduction
