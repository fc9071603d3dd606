"""The optimizer steps, each formula written once: SGD (as ``torch.optim.SGD``) and Adam / AdamW (as
``torch.optim.Adam`` / ``torch.optim.AdamW`` with ``amsgrad=False``, ``maximize=False``).

Pure math, layered like :mod:`manualbp.functional`: plain tensors in, parameters and state updated in
place; no autograd, no ``nn``, nothing of ``manualbp.train``. Every fast path reads these functions:

- :class:`~manualbp.fast.FusedTrainer` (one model): a list of per-parameter tensors, hyperparameters
  Python numbers;
- :class:`~manualbp.fast.VectorizedTrainer` (K models): stacked ``(K, out, in)`` tensors, hyperparameters
  (lr, momentum, weight decay, betas, eps) per-model tensors of shape ``(K, 1, 1)`` that broadcast over them.

The same lines serve both: each formula is one small function below (so that
:func:`manualbp.verify.inject_bug` breaks it once for every Python path) written with ops that take a number
or a broadcasting tensor alike (:func:`_plus` picks ``add(alpha=a)`` or ``addcmul(a, x)`` for ``t + a x``).
``manualbp/csrc/steps.h`` is the C++ twin (the fused trainer's C++ loop), line for line.

A per-model tensor counts as "on" (weight decay, momentum, nesterov flags): pass ``0.0`` / ``False`` where no
model uses the feature, and the step skips it, as torch.optim does for a zero.

The updates, per parameter p with gradient g (dL/dp):

- SGD: g <- g + wd p; buf <- g on the first step, else m buf + (1 - d) g; g <- g + m buf (nesterov) or buf;
  p <- p - lr g.
- Adam: t <- t + 1; g <- g + wd p (Adam) or p <- (1 - lr wd) p (AdamW, decoupled); m <- beta1 m + (1 - beta1) g;
  v <- beta2 v + (1 - beta2) g^2; p <- p - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "OPTIMIZERS",
    "SGDState",
    "AdamState",
    "sgd_step_",
    "adam_step_",
    "weight_decayed",
    "momentum_update_",
    "nesterov_direction",
    "decoupled_decay_",
    "adam_moments_",
    "bias_corrections",
    "adam_update_",
    "check_optimizer",
]

#: The optimizers the fast paths implement (``optimizer=`` of the trainers).
OPTIMIZERS = ("sgd", "adam", "adamw")

Hyper = Union[float, Tensor]  # a number (one model) or a per-model tensor (K, 1, 1)


def check_optimizer(name: object) -> str:
    """``name`` lower-cased if it is one of :data:`OPTIMIZERS`, else a ValueError naming ``optimizer``."""
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {name!r}")
    return name.lower()


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------
@dataclass
class SGDState:
    """SGD's state: one momentum buffer per parameter, None until the first step with momentum."""

    momentum_buffers: Optional[list[Tensor]] = None

    def tensors(self) -> list[Tensor]:
        """Every tensor the step updates in place."""
        return list(self.momentum_buffers or [])

    def state_dict(self) -> dict[str, Any]:
        """Plain lists of cloned tensors (loads with ``torch.load(weights_only=True)``)."""
        return {"momentum_buffers": _cloned(self.momentum_buffers)}

    @classmethod
    def from_state_dict(cls, state: Optional[dict[str, Any]]) -> SGDState:
        return cls(_cloned((state or {}).get("momentum_buffers")))


@dataclass
class AdamState:
    """Adam's state: the moments m (``exp_avg``) and v (``exp_avg_sq``), one per parameter (None until the
    first step, which makes them zeros), and the step count t: an int, or a per-model tensor (K, 1, 1)."""

    exp_avg: Optional[list[Tensor]] = None
    exp_avg_sq: Optional[list[Tensor]] = None
    step: Union[int, Tensor] = 0

    def tensors(self) -> list[Tensor]:
        """Every tensor the step updates in place (the step count too where it is a tensor)."""
        count = [self.step] if isinstance(self.step, Tensor) else []
        return list(self.exp_avg or []) + list(self.exp_avg_sq or []) + count

    def state_dict(self) -> dict[str, Any]:
        step = self.step.clone() if isinstance(self.step, Tensor) else int(self.step)
        return {"exp_avg": _cloned(self.exp_avg), "exp_avg_sq": _cloned(self.exp_avg_sq), "step": step}

    @classmethod
    def from_state_dict(cls, state: Optional[dict[str, Any]]) -> AdamState:
        state = state or {}
        step = state.get("step", 0)
        step = step.clone() if isinstance(step, Tensor) else int(step)
        return cls(_cloned(state.get("exp_avg")), _cloned(state.get("exp_avg_sq")), step)


def _cloned(tensors: Optional[Sequence[Tensor]]) -> Optional[list[Tensor]]:
    return None if tensors is None else [t.clone() for t in tensors]


# --------------------------------------------------------------------------------------------------
# The formulas, one function each
# --------------------------------------------------------------------------------------------------
def _on(value: Any) -> bool:
    """A feature is on for a nonzero number and for any per-model tensor."""
    return isinstance(value, Tensor) or bool(value)


def _plus(t: Tensor, a: Hyper, x: Tensor, inplace: bool = False) -> Tensor:
    """t + a x (into ``t`` with ``inplace``), ``a`` a number or a tensor broadcasting over ``x``."""
    if isinstance(a, Tensor):
        return t.addcmul_(a, x) if inplace else torch.addcmul(t, a, x)
    return t.add_(x, alpha=a) if inplace else torch.add(t, x, alpha=a)


def _direction(grad: Tensor, buf: Tensor, momentum: Hyper, nesterov: Union[bool, Tensor]) -> Tensor:
    """SGD's step direction: Nesterov's look-ahead where ``nesterov`` holds (a bool, or a per-model bool
    tensor), else the buffer."""
    if isinstance(nesterov, Tensor):
        return torch.where(nesterov, nesterov_direction(grad, buf, momentum), buf)
    return nesterov_direction(grad, buf, momentum) if nesterov else buf


def weight_decayed(grad: Tensor, param: Tensor, weight_decay: Hyper) -> Tensor:
    """L2 weight decay folded into the gradient (SGD, Adam): a new tensor."""
    return _plus(grad, weight_decay, param)  # g + wd p


def momentum_update_(buf: Tensor, grad: Tensor, momentum: Hyper, dampening: float) -> None:
    """The momentum buffer after the first step, in place."""
    _plus(buf.mul_(momentum), 1 - dampening, grad, inplace=True)  # buf = m buf + (1 - d) g


def nesterov_direction(grad: Tensor, buf: Tensor, momentum: Hyper) -> Tensor:
    """Nesterov's look-ahead direction: a new tensor."""
    return _plus(grad, momentum, buf)  # g + m buf


def decoupled_decay_(param: Tensor, lr: Hyper, weight_decay: Hyper) -> None:
    """AdamW's decoupled weight decay, in place, before the moments."""
    param.mul_(1 - lr * weight_decay)  # p = (1 - lr wd) p


def adam_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, beta1: Hyper, beta2: Hyper) -> None:
    """Adam's running moments, in place."""
    exp_avg.lerp_(grad, 1 - beta1)  # m = beta1 m + (1 - beta1) g
    _plus(exp_avg_sq.mul_(beta2), 1 - beta2, grad * grad, inplace=True)  # v = beta2 v + (1 - beta2) g^2


def bias_corrections(beta1: Hyper, beta2: Hyper, step: Union[int, Tensor]) -> tuple[Hyper, Hyper]:
    """(1 - beta1^t, 1 - beta2^t): the moments' bias corrections at step t (>= 1)."""
    return 1 - beta1**step, 1 - beta2**step  # c1 = 1 - beta1^t, c2 = 1 - beta2^t


def adam_update_(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, lr: Hyper, c1: Hyper, c2: Hyper, eps: Hyper) -> None:
    """Adam's parameter update from the moments and their bias corrections, in place (eps outside the sqrt)."""
    denom = (exp_avg_sq.sqrt() / c2**0.5).add_(eps)  # sqrt(v / c2) + eps
    _plus(param, -lr / c1, exp_avg / denom, inplace=True)  # p = p - lr (m / c1) / (sqrt(v / c2) + eps)


# --------------------------------------------------------------------------------------------------
# The steps
# --------------------------------------------------------------------------------------------------
def sgd_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: SGDState,
    *,
    lr: Hyper,
    momentum: Hyper = 0.0,
    dampening: float = 0.0,
    weight_decay: Hyper = 0.0,
    nesterov: Union[bool, Tensor] = False,
) -> None:
    """One ``torch.optim.SGD`` step of ``params`` in place (``buf = g`` on the first step with momentum).

    ``grads`` stay the raw dL/dp (weight decay makes new tensors). A per-model ``nesterov`` (a bool tensor
    (K, 1, 1)) takes the look-ahead where it is True and the buffer elsewhere; a model whose momentum is 0
    gets buf = 0 buf + (1 - d) g, which is g for d = 0.
    """
    first = _on(momentum) and state.momentum_buffers is None
    if first:
        state.momentum_buffers = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if _on(weight_decay):
            g = weight_decayed(g, p, weight_decay)  # g + wd p
        if _on(momentum):
            if first:
                buf = g.clone()  # buf = g (first step)
                state.momentum_buffers.append(buf)  # type: ignore[union-attr]
            else:
                buf = state.momentum_buffers[i]  # type: ignore[index]
                momentum_update_(buf, g, momentum, dampening)  # buf = m buf + (1 - d) g
            g = _direction(g, buf, momentum, nesterov)  # g + m buf (nesterov), or buf
        _plus(p, -lr, g, inplace=True)  # p = p - lr g


def adam_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: AdamState,
    *,
    lr: Hyper,
    betas: tuple[Hyper, Hyper] = (0.9, 0.999),
    eps: Hyper = 1e-8,
    weight_decay: Hyper = 0.0,
    decoupled: bool = False,
) -> None:
    """One ``torch.optim.Adam`` step (``decoupled=True``: ``torch.optim.AdamW``'s) of ``params`` in place.

    The moments start at zero on the first step (where ``state`` has none); the step count goes up by one
    (in place where it is a tensor). ``grads`` stay the raw dL/dp.
    """
    beta1, beta2 = betas
    if state.exp_avg is None or state.exp_avg_sq is None:
        state.exp_avg = [torch.zeros_like(p) for p in params]
        state.exp_avg_sq = [torch.zeros_like(p) for p in params]
    state.step += 1  # t = t + 1
    c1, c2 = bias_corrections(beta1, beta2, state.step)  # 1 - beta1^t, 1 - beta2^t
    for p, g, m, v in zip(params, grads, state.exp_avg, state.exp_avg_sq):
        if _on(weight_decay):
            if decoupled:
                decoupled_decay_(p, lr, weight_decay)  # p = (1 - lr wd) p
            else:
                g = weight_decayed(g, p, weight_decay)  # g + wd p
        adam_moments_(m, v, g, beta1, beta2)  # m, v = beta m + (1 - beta) g, g^2
        adam_update_(p, m, v, lr, c1, c2, eps)  # p = p - lr m_hat / (sqrt(v_hat) + eps)
