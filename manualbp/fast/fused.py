"""An engine-free fused trainer: forward, hand-derived backward and the SGD update in one pass.

No autograd graph is recorded: the step runs under ``torch.no_grad`` and calls the formulas of
``manualbp.functional`` (``mlp_forward``, the loss's backward, ``mlp_backward``) directly, then applies
``torch.optim.SGD``'s update (weight decay, momentum with ``buf = grad`` on the first step, dampening,
nesterov) in place with ``torch._foreach_*`` ops on the model's own parameter storage. It is the same math
as ``MLP`` + ``torch.optim.SGD`` step for step, so the trajectories agree (float64: to about 1e-12 after a
full run; ``tests/test_fused.py``), without the graph bookkeeping, the Python ``Function`` calls, input
validation per step or the optimizer's per-parameter Python loop.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from ..autograd import join_params
from ..nn import MLP
from ._losses import LOSSES, resolve_loss

__all__ = ["FusedTrainer"]


class FusedTrainer:
    """Train a :class:`manualbp.MLP` with SGD, engine-free, updating its parameters in place.

    Args:
        model: the MLP; its parameters are updated in place (``model`` stays usable as a module).
        loss: "cross_entropy", "mse", "squared_error" or a matching loss module (manualbp's or torch's).
        lr, momentum, dampening, weight_decay, nesterov: as ``torch.optim.SGD``.

    Example:
        >>> model = MLP(64, [64], 10)
        >>> trainer = FusedTrainer(model, "cross_entropy", lr=0.1)
        >>> loss = trainer.step(torch.randn(32, 64), torch.randint(0, 10, (32,)))
    """

    def __init__(
        self,
        model: MLP,
        loss: Union[str, nn.Module] = "cross_entropy",
        *,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        if not isinstance(model, MLP):
            raise TypeError(f"model must be a manualbp.MLP, got {type(model).__name__}")
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self.model = model
        self.loss_name, self.reduction = resolve_loss(loss)
        self._loss_forward, self._loss_backward = LOSSES[self.loss_name]
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.dampening = float(dampening)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        self.steps = 0
        self._bind()
        self.momentum_buffers: Optional[list[Tensor]] = None
        self.last_grads: Optional[list[Tensor]] = None

    def _bind(self) -> None:
        """Detached views of the model's parameters (same storage): in-place updates need no autograd checks."""
        params = [p.detach() for p in self.model.flat_parameters()]
        self.params = params
        self.weights = params[0::2] if self.model.bias else params
        self.biases = params[1::2] if self.model.bias else [None] * len(params)
        self.activations = self.model.activation_specs

    # -- the step ------------------------------------------------------------------------------------
    def gradients(self, input: Tensor, target: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(loss, [dL/dW1, dL/db1, ...]) for one batch: forward, loss and the two-pass backward, no graph."""
        with torch.no_grad():
            fwd = F.mlp_forward(input, self.weights, self.biases, self.activations)  # o and a^1 .. a^{L-1}
            loss = self._loss_forward(fwd.output, target, self.reduction)
            grad_o = self._loss_backward(1.0, fwd.output, target, self.reduction)[0]  # dL/do (base case 1)
            grads = F.mlp_backward(
                grad_o,
                input,
                self.weights,
                fwd.hidden,
                self.activations,
                needs_input_grad=False,
                needs_bias_grad=[self.model.bias] * len(self.weights),
            )
        return loss, join_params(grads.grad_weights, grads.grad_biases, self.model.bias)

    def step(self, input: Tensor, target: Tensor) -> Tensor:
        """One SGD step on a batch; returns the batch loss (detached, before the update)."""
        loss, grads = self.gradients(input, target)
        with torch.no_grad():
            self._update(grads)
        return loss

    def _update(self, grads: list[Tensor]) -> None:
        # torch.optim.SGD, per parameter: g = g + wd p; buf = g (first step) or m buf + (1 - d) g;
        # g = g + m buf (nesterov) or buf; p -= lr g. ``grads`` itself stays the raw dL/dp (for grad_norms).
        params = self.params
        self.last_grads = grads
        if self.weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        if self.momentum != 0:
            if self.momentum_buffers is None:
                self.momentum_buffers = [g.clone() for g in grads]
            else:
                torch._foreach_mul_(self.momentum_buffers, self.momentum)
                torch._foreach_add_(self.momentum_buffers, grads, alpha=1 - self.dampening)
            if self.nesterov:
                direction = torch._foreach_add(grads, self.momentum_buffers, alpha=self.momentum)
            else:
                direction = self.momentum_buffers
        else:
            direction = grads
        torch._foreach_add_(params, direction, alpha=-self.lr)
        self.steps += 1

    # -- the rest of the backend contract ---------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        self.lr = float(lr)

    def predict(self, input: Tensor) -> Tensor:
        """The model's output o for ``input`` (no graph)."""
        with torch.no_grad():
            return F.mlp_forward(input, self.weights, self.biases, self.activations).output

    def grad_norms(self) -> dict[str, float]:
        """L2 norm of the last step's gradient dL/dp (as p.grad holds it) per parameter, keyed like state_dict."""
        if self.last_grads is None:
            return {}
        names = [n for n, _ in self.model.named_parameters()]
        norms = torch.stack(torch._foreach_norm(self.last_grads)).tolist()
        return dict(zip(names, norms))

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "lr": self.lr,
            "steps": self.steps,
            "momentum_buffers": None if self.momentum_buffers is None else [b.clone() for b in self.momentum_buffers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self._bind()
        self.lr = float(state["lr"])
        self.steps = int(state["steps"])
        buffers = state.get("momentum_buffers")
        self.momentum_buffers = None if buffers is None else [b.clone() for b in buffers]
