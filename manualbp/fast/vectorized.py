"""K models that share an architecture, trained at once as one batched model.

Weights are stacked to (K, out, in) and biases to (K, 1, out), so the formulas of ``manualbp.functional``
(``mlp_forward``/``mlp_backward``, the losses' backward) run unchanged on all K models with batched
matmuls. Each model keeps its own initial weights, learning rate, momentum, weight decay, nesterov flag and
an active flag: an inactive (stopped) model is frozen, its parameters and momentum buffer no longer
change, while the others go on. The update is ``torch.optim.SGD``'s, per model, so each model's
trajectory equals training it alone (float64: to about 1e-10; ``tests/test_vectorized.py``).

Inputs may be shared, ``x`` (N, in) and ``y`` (N,) for all models, or per model, ``x`` (K, N, in) and
``y`` (K, N) (for example when each model's seed picks its own batch order).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from ..autograd import join_params
from ..nn import MLP
from ._losses import LOSSES, resolve_loss

__all__ = ["VectorizedTrainer"]

Scalars = Union[float, Sequence[float], Tensor]


class VectorizedTrainer:
    """Train K same-architecture MLPs with SGD as one batched model (engine-free).

    Args:
        models: K :class:`manualbp.MLP` of one architecture (their weights are copied and stacked).
        loss: "cross_entropy", "mse", "squared_error" or a matching loss module.
        lr, momentum, weight_decay: one value for all models or one per model.
        nesterov: one flag or one per model. dampening: one value (as ``torch.optim.SGD``).

    Example:
        >>> models = [MLP(64, [64], 10) for _ in range(8)]
        >>> trainer = VectorizedTrainer(models, "cross_entropy", lr=[0.01 * (k + 1) for k in range(8)])
        >>> losses = trainer.step(torch.randn(32, 64), torch.randint(0, 10, (32,)))  # (8,)
    """

    def __init__(
        self,
        models: Sequence[MLP],
        loss: Union[str, nn.Module] = "cross_entropy",
        *,
        lr: Scalars,
        momentum: Scalars = 0.0,
        weight_decay: Scalars = 0.0,
        nesterov: Union[bool, Sequence[bool]] = False,
        dampening: float = 0.0,
    ) -> None:
        models = list(models)
        if not models or not all(isinstance(m, MLP) for m in models):
            raise TypeError("models must be a non-empty sequence of manualbp.MLP")
        first = models[0]
        shapes = [[tuple(p.shape) for p in m.flat_parameters()] for m in models]
        for k, m in enumerate(models):
            if shapes[k] != shapes[0] or m.activation_specs != first.activation_specs or m.bias != first.bias:
                raise ValueError(f"models[{k}] has another architecture than models[0]: {m} vs {first}")
        self.K = len(models)
        self.template = first
        self.bias = first.bias
        self.activations = first.activation_specs
        self.loss_name, self.reduction = resolve_loss(loss)
        self._loss_forward, self._loss_backward = LOSSES[self.loss_name]
        with torch.no_grad():
            layers = [m.flat_parameters() for m in models]
            stacked = [torch.stack([ps[i].detach() for ps in layers]) for i in range(len(layers[0]))]
        if self.bias:
            self.weights = stacked[0::2]  # (K, out, in)
            self.biases: list[Optional[Tensor]] = [b.unsqueeze(1) for b in stacked[1::2]]  # (K, 1, out)
            self.params = join_params(self.weights, self.biases, True)
        else:
            self.weights = stacked
            self.biases = [None] * len(stacked)
            self.params = list(stacked)
        ref = self.weights[0]
        self.dampening = float(dampening)
        self.lr = self._per_model(lr, "lr")
        self.momentum = self._per_model(momentum, "momentum")
        self.weight_decay = self._per_model(weight_decay, "weight_decay")
        self._has_weight_decay = bool((self.weight_decay != 0).any())
        nest = [bool(nesterov)] * self.K if isinstance(nesterov, bool) else [bool(v) for v in nesterov]
        if len(nest) != self.K:
            raise ValueError(f"nesterov: expected one flag or {self.K}, got {len(nest)}")
        self.nesterov = torch.tensor(nest, device=ref.device).view(-1, 1, 1)
        if bool((self.nesterov.view(-1) & (self.momentum.view(-1) <= 0)).any()) or (any(nest) and dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self.active = torch.ones(self.K, dtype=torch.bool, device=ref.device)
        self._all_active = True
        self._any_momentum = bool((self.momentum != 0).any())
        self._any_nesterov = any(nest)
        self._all_nesterov = all(nest)
        self.steps = torch.zeros(self.K, dtype=torch.long, device=ref.device)  # steps taken, per model
        self.momentum_buffers: Optional[list[Tensor]] = None
        self.last_grads: Optional[list[Tensor]] = None

    def _per_model(self, value: Scalars, name: str) -> Tensor:
        ref = self.weights[0]
        t = torch.as_tensor(value, dtype=ref.dtype).to(ref.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(self.K).clone()
        if t.numel() != self.K:
            raise ValueError(f"{name}: expected one value or {self.K} (one per model), got {t.numel()}")
        if bool((t < 0).any()):
            raise ValueError(f"{name} must be >= 0, got {t.tolist()}")
        return t.view(-1, 1, 1)

    # -- the step ------------------------------------------------------------------------------------
    def _targets(self, output: Tensor, target: Tensor) -> Tensor:
        per_model_dims = output.dim() - 1 if target.is_floating_point() else output.dim() - 2
        if target.dim() == per_model_dims:  # shared by all models: broadcast a model dimension
            return target.expand(self.K, *target.shape)
        return target

    def gradients(self, input: Tensor, target: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(per-model losses (K,), [dL/dW1, dL/db1, ...] stacked) for one batch; no graph."""
        with torch.no_grad():
            fwd = F.mlp_forward(input, self.weights, self.biases, self.activations)  # o: (K, N, out)
            out = fwd.output
            y = self._targets(out, target)
            per_item = self._loss_forward(out, y, "none")  # (K, N) or (K, N, C) for mse
            dims = tuple(range(1, per_item.dim()))
            losses = per_item.mean(dims) if self.reduction == "mean" else per_item.sum(dims)
            # "mean" is d(mean)/d(item) = 1/count per model; the "sum" formula with that base case gives it
            count = out.shape[1] * (out.shape[2] if self.loss_name == "mse" else 1)
            base = 1.0 / count if self.reduction == "mean" else 1.0
            grad_o = self._loss_backward(base, out, y, "sum")[0]  # dL/do per model, (K, N, out)
            grads = F.mlp_backward(
                grad_o,
                input,
                self.weights,
                fwd.hidden,
                self.activations,
                needs_input_grad=False,
                needs_bias_grad=[self.bias] * len(self.weights),
            )
        return losses, join_params(grads.grad_weights, grads.grad_biases, self.bias)

    def step(self, input: Tensor, target: Tensor) -> Tensor:
        """One SGD step of every active model; returns the per-model batch losses (K,) before the update."""
        losses, grads = self.gradients(input, target)
        with torch.no_grad():
            self._update(grads)
        return losses

    def _update(self, grads: list[Tensor]) -> None:
        # torch.optim.SGD per model k: g = g + wd_k p; buf = g (first step) or m_k buf + (1 - d) g;
        # g = g + m_k buf (nesterov_k) or buf (m_k != 0) or g; p -= lr_k g; nothing moves where inactive.
        # (For m_k = 0 the buffer is 0 * buf + g = g, so one formula serves every model.)
        self.last_grads = grads
        if self._any_momentum and self.momentum_buffers is None:
            self.momentum_buffers = [torch.empty_like(p) for p in self.params]
            first = True
        else:
            first = False
        all_active = self._all_active
        neg_lr = -self.lr
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if self._has_weight_decay:
                g = torch.addcmul(g, p, self.weight_decay)  # g + wd p
            direction = g
            if self._any_momentum:
                buf = self.momentum_buffers[i]  # type: ignore[index]
                if first:
                    buf.copy_(g)
                elif self.dampening:
                    buf.mul_(self.momentum).add_(g, alpha=1 - self.dampening)
                else:
                    buf.mul_(self.momentum).add_(g)
                direction = buf
                if self._any_nesterov:
                    ahead = torch.addcmul(g, self.momentum, buf)  # g + m buf
                    direction = ahead if self._all_nesterov else torch.where(self.nesterov, ahead, buf)
            if all_active:
                p.addcmul_(direction, neg_lr)  # p - lr g
            else:
                p.copy_(torch.where(self.active.view(-1, 1, 1), torch.addcmul(p, direction, neg_lr), p))
        self.steps += self.active  # on the device: no host sync per step

    # -- per-model state -------------------------------------------------------------------------------
    def set_lr(self, lr: Scalars) -> None:
        """Set every model's learning rate (one value or one per model)."""
        self.lr = self._per_model(lr, "lr")

    def set_active(self, active: Union[Sequence[bool], Tensor]) -> None:
        """Which models still train; a stopped model (False) is frozen from the next step on."""
        self.active = torch.as_tensor(active, dtype=torch.bool).to(self.active.device).reshape(self.K)
        self._all_active = bool(self.active.all())

    def stop(self, k: int) -> None:
        """Freeze model k."""
        self.active[k] = False
        self._all_active = False

    def predict(self, input: Tensor) -> Tensor:
        """Every model's output for ``input``: (K, N, out)."""
        with torch.no_grad():
            return F.mlp_forward(input, self.weights, self.biases, self.activations).output

    def grad_norms(self) -> dict[str, Tensor]:
        """Per-parameter L2 norm of the last step's gradient, one value per model: name -> (K,)."""
        if self.last_grads is None:
            return {}
        names = [n for n, _ in self.template.named_parameters()]
        return {n: g.flatten(1).norm(dim=1) for n, g in zip(names, self.last_grads)}

    def parameters_of(self, k: int) -> list[Tensor]:
        """Model k's parameters (W1, b1, W2, ...), shaped as in the MLP (views into the stacks)."""
        return [p[k, 0] if self.bias and i % 2 == 1 else p[k] for i, p in enumerate(self.params)]

    def model(self, k: int) -> MLP:
        """A copy of model k as a standalone :class:`manualbp.MLP` with its current weights."""
        t = self.template
        m = MLP(
            t.in_features,
            t.hidden_features,
            t.out_features,
            activation=[a[0] for a in self.activations],
            bias=self.bias,
            device=self.weights[0].device,
            dtype=self.weights[0].dtype,
        )
        for act, (_, slope) in zip(m.activations, self.activations):
            act.negative_slope = slope
        with torch.no_grad():
            for dst, src in zip(m.flat_parameters(), self.parameters_of(k)):
                dst.copy_(src)
        return m

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": [p.clone() for p in self.params],
            "momentum_buffers": None if self.momentum_buffers is None else [b.clone() for b in self.momentum_buffers],
            "lr": self.lr.clone(),
            "active": self.active.clone(),
            "steps": self.steps.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for p, q in zip(self.params, state["params"]):
                p.copy_(q)
        buffers = state["momentum_buffers"]
        self.momentum_buffers = None if buffers is None else [b.clone() for b in buffers]
        self.lr = state["lr"].clone()
        self.active = state["active"].clone()
        self._all_active = bool(self.active.all())
        self.steps = state["steps"].clone()
