"""K models that share an architecture (their hidden widths may differ), trained at once as one batched model.

Each layer's weights and biases are stacked into one (K, out, in + 1) block ``[W | b]``, with the weights
(K, out, in) and biases (K, 1, out) as views of it. Models of one depth but different hidden widths are
zero-padded to the widest model per layer, and each hidden activation is multiplied by a per-model 0/1
column mask after the activation (a = m sigma(z); sigmoid(0) is 1/2, not 0): a padded unit then adds
nothing forward, and its gradients (dL/dW_{:j} = g^T a_j = 0, dL/da_j = g W_{:j} = 0), momentum buffers
and Adam moments stay exactly 0, so a padded model trains as it would alone. Plain SGD (no momentum or weight decay in the group)
takes :class:`~manualbp.fast.FusedTrainer`'s engine-free step with a model dimension: per layer one batched
matmul forward, one back and one in-place ``baddbmm_`` that is the gradient and the update at once, each
model's learning rate folded into its output gradient. With momentum or weight decay the formulas of
``manualbp.functional`` (``mlp_forward``/``mlp_backward``, the losses' backward) run unchanged on all K
models with batched matmuls, and the optimizer step follows: ``torch.optim.SGD``'s or (``optimizer="adam"`` /
``"adamw"``) ``torch.optim.Adam``'s / ``AdamW``'s, the steps of :mod:`manualbp.optim_steps` with per-model
hyperparameters (K, 1, 1). Each model keeps its own initial weights, learning rate, momentum, weight decay,
nesterov flag, betas, eps and an active flag: an inactive (stopped) model is frozen, its parameters and
optimizer state no longer change, while the others go on. The update is per model, so each model's
trajectory equals training it alone (float64: to about 1e-10; ``tests/fast/test_vectorized.py``).

Inputs may be shared, ``x`` (N, in) and ``y`` (N,) for all models, or per model, ``x`` (K, N, in) and
``y`` (K, N) (for example when each model's seed picks its own batch order).
"""

from __future__ import annotations

from typing import Any, ContextManager, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import optim_steps as O
from ..autograd import join_params
from ..nn import MLP
from ..registry import ACTIVATION_REGISTRY, LOSS_REGISTRY
from . import fused as _fused
from ._losses import LOSSES, resolve_loss
from .fused import forward_into

__all__ = ["VectorizedTrainer"]

Scalars = Union[float, Sequence[float], Tensor]


class VectorizedTrainer:
    """Train K MLPs of one architecture with SGD, Adam or AdamW as one batched model (engine-free).

    Args:
        models: K :class:`manualbp.MLP` of one depth, activations, bias, in and out features; their hidden
            widths may differ (the weights are copied and stacked, zero-padded to the widest per layer).
        loss: "cross_entropy", "mse", "squared_error" or a matching loss module.
        lr, momentum, weight_decay: one value for all models or one per model.
        nesterov: one flag or one per model. dampening: one value (as ``torch.optim.SGD``).
        optimizer: "sgd", "adam" or "adamw" (one for all models; momentum, dampening and nesterov are SGD's).
        betas: one pair ``(beta1, beta2)`` for all models or K pairs, one per model (Adam, AdamW).
        eps: one value or one per model (Adam, AdamW).

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
        optimizer: str = "sgd",
        betas: Union[Sequence[float], Sequence[Sequence[float]], Tensor] = (0.9, 0.999),
        eps: Scalars = 1e-8,
    ) -> None:
        models = list(models)
        if not models or not all(isinstance(m, MLP) for m in models):
            raise TypeError("models must be a non-empty sequence of manualbp.MLP")
        first = models[0]
        arch = lambda m: (m.in_features, len(m.linears), m.out_features, m.activation_specs, m.bias)  # noqa: E731
        for k, m in enumerate(models):
            if arch(m) != arch(first):
                raise ValueError(
                    f"models[{k}] has another architecture than models[0] (only the hidden widths may differ): {m} vs {first}"
                )
        self.K = len(models)
        self.template = first
        self.bias = first.bias
        self.activations = first.activation_specs
        self.hidden = [list(m.hidden_features) for m in models]  # each model's own hidden widths
        self.loss_name, self.reduction = resolve_loss(loss)
        self._loss_forward, self._loss_backward = LOSSES[self.loss_name]
        # one (K, out, in + 1) block [W | b] per layer, zero-padded to the widest model; W (K, out, in) and
        # b (K, 1, out) are views
        self.blocks = _stack_padded(models)
        if self.bias:
            self.weights = [blk[:, :, :-1] for blk in self.blocks]
            self.biases: list[Optional[Tensor]] = [blk[:, :, -1].unsqueeze(1) for blk in self.blocks]
            self.params = join_params(self.weights, self.biases, True)
        else:
            self.weights = list(self.blocks)
            self.biases = [None] * len(self.blocks)
            self.params = list(self.blocks)
        self.masks = _hidden_masks(self.hidden, self.blocks[0])  # None when every model has the same widths
        self.blocks_t = [blk.transpose(1, 2) for blk in self.blocks]
        self.widths = [first.in_features] + [w.shape[1] for w in self.weights]
        ref = self.weights[0]
        self._set_optimizer(optimizer, lr, momentum, weight_decay, nesterov, dampening, betas, eps)
        self.active = torch.ones(self.K, dtype=torch.bool, device=ref.device)
        self._all_active = True
        self.steps = torch.zeros(self.K, dtype=torch.long, device=ref.device)  # steps taken, per model
        self._grads: Optional[list[Tensor]] = None  # the last step's gradients, where materialized
        self._last: Optional[tuple[_Buffers, Tensor]] = None  # the fused step's (buffers, [x | 1])
        self._buffers: dict[tuple[int, bool], _Buffers] = {}
        self._predict_buffers: dict[tuple[int, bool], _Buffers] = {}  # forward-only, per (rows, shared input)
        if self.masks is not None:
            self._check_padding()

    def _check_padding(self) -> None:
        """Padded units stay exactly zero only where each step leaves a zero weight with a zero gradient at 0:
        sigma'(0) read from the masked output a = 0 must be finite (0 * sigma' = 0), and Adam's update
        m / (sqrt(v) + eps) of a zero gradient is 0 / eps, which needs eps > 0."""
        zero = self.weights[0].new_zeros(1)
        for name, slope in self.activations:
            if not bool(torch.isfinite(ACTIVATION_REGISTRY[name].backward(zero + 1, zero, slope)).all()):
                raise ValueError(
                    f"models of different hidden widths: activation {name!r} has no finite derivative at output 0,"
                    " so its padded units cannot be masked; train the widths in separate trainers"
                )
        if self.optimizer != "sgd" and bool((self.eps == 0).any()):
            raise ValueError(
                f"eps: models of different hidden widths need eps > 0 with {self.optimizer!r} (a padded entry's "
                f"update would be 0 / 0), got {self.eps.view(-1).tolist()}"
            )

    def _set_optimizer(
        self, optimizer: str, lr: Scalars, momentum: Scalars, weight_decay: Scalars,
        nesterov: Union[bool, Sequence[bool]], dampening: float, betas: Any, eps: Scalars,
    ) -> None:  # fmt: skip
        """The optimizer, its per-model hyperparameters (K, 1, 1) and its empty state, each checked."""
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
        self.optimizer = O.check_optimizer(optimizer)
        if self.optimizer != "sgd" and (bool((self.momentum != 0).any()) or any(nest) or dampening != 0):
            raise ValueError(f"momentum, dampening and nesterov are SGD's; optimizer={self.optimizer!r} takes betas")
        self.beta1, self.beta2 = self._betas(betas)
        self.eps = self._per_model(eps, "eps")
        self.sgd_state = O.SGDState()  # the momentum buffers (SGD)
        self.adam_state = O.AdamState(step=torch.zeros(self.K, 1, 1, dtype=ref.dtype, device=ref.device))
        self._any_momentum = bool((self.momentum != 0).any())
        self._any_nesterov = any(nest)
        self._all_nesterov = all(nest)

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

    def _betas(self, betas: Any) -> tuple[Tensor, Tensor]:
        """(beta1, beta2), each (K, 1, 1), from one pair or K pairs; each in [0, 1)."""
        ref = self.weights[0]
        t = torch.as_tensor(betas, dtype=ref.dtype).to(ref.device)
        if t.shape == (2,):
            t = t.expand(self.K, 2)
        if t.shape != (self.K, 2):
            raise ValueError(
                f"betas: expected one pair (beta1, beta2) or {self.K} pairs (one per model), got shape {tuple(t.shape)}"
            )
        if bool(((t < 0) | (t >= 1)).any()):
            raise ValueError(f"betas must be in [0, 1), got {t.tolist()}")
        return t[:, 0].reshape(-1, 1, 1).clone(), t[:, 1].reshape(-1, 1, 1).clone()

    @property
    def momentum_buffers(self) -> Optional[list[Tensor]]:
        """SGD's momentum buffers, stacked over the models (None before the first step with momentum)."""
        return self.sgd_state.momentum_buffers

    # -- the step ------------------------------------------------------------------------------------
    def _targets(self, output: Tensor, target: Tensor) -> Tensor:
        per_model_dims = output.dim() - 1 if target.is_floating_point() else output.dim() - 2
        if target.dim() == per_model_dims:  # shared by all models: broadcast a model dimension
            return target.expand(self.K, *target.shape)
        return target

    def gradients(self, input: Tensor, target: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(per-model losses (K,), [dL/dW1, dL/db1, ...] stacked) for one batch; no graph."""
        with torch.no_grad():
            fwd = F.mlp_forward(input, self.weights, self.biases, self.activations, masks=self.masks)  # (K, N, out)
            out = fwd.output
            y = self._targets(out, target)
            per_item = self._loss_forward(out, y, "none")  # (K, N) or (K, N, C) for mse
            dims = tuple(range(1, per_item.dim()))
            losses = per_item.mean(dims) if self.reduction == "mean" else per_item.sum(dims)
            # "mean" is d(mean)/d(item) = 1/count per model; the "sum" formula with that base case gives it
            base = self._reduction_factor(out)
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

    def _reduction_factor(self, out: Tensor) -> float:
        """d(reduced loss)/d(summed loss) of one model: 1/count for "mean" (rows, or elements for mse), 1 for "sum"."""
        count = out.shape[1] * (out.shape[2] if LOSS_REGISTRY[self.loss_name].mean_over == "elements" else 1)
        return 1.0 / count if self.reduction == "mean" else 1.0

    def step(self, input: Tensor, target: Tensor) -> Tensor:
        """One optimizer step of every active model; returns the per-model batch losses (K,) before the update.

        Plain SGD on a loss with fused kernels takes the fused step; anything else (momentum, weight decay,
        Adam, a registered loss) takes :meth:`gradients` (functional's sweep batched over K) and :meth:`_update`."""
        plain = self.optimizer == "sgd" and not (self._any_momentum or self._has_weight_decay)
        if plain and LOSS_REGISTRY[self.loss_name].grad_into is not None:  # the loss has its in-place form
            with torch.no_grad():
                return self._fused_step(input, target)
        losses, grads = self.gradients(input, target)
        with torch.no_grad():
            self._update(grads)
        return losses

    def _fused_step(self, input: Tensor, target: Tensor) -> Tensor:
        """Plain SGD as :class:`~manualbp.fast.FusedTrainer` takes it, K models at once: per layer one
        batched matmul forward, one back and one in-place ``baddbmm_`` that is dL/d[W | b] and the update.
        Each model's step size -lr_k * scale multiplies its output gradient before the update matmul."""
        shared = input.dim() == 2
        n = input.shape[-2]
        buf = self._buffers.get((n, shared))
        if buf is None:
            buf = self._buffers[(n, shared)] = _Buffers(self, n, shared)
        if tuple(input.shape) != tuple(buf.x_in.shape):
            raise ValueError(f"input must have shape {tuple(buf.x_in.shape)}, got {tuple(input.shape)}")
        buf.x_in.copy_(input)
        if self.loss_name == "cross_entropy" and not target.is_floating_point():
            if tuple(target.shape) != tuple(buf.y.shape[:-1]):
                raise ValueError(
                    f"target (class indices) must have shape {tuple(buf.y.shape[:-1])}, got {tuple(target.shape)}"
                )
            buf.y.zero_().scatter_(-1, target.unsqueeze(-1), 1)  # one-hot rows (out-of-range: torch's error)
        elif tuple(target.shape) != tuple(buf.y.shape):
            raise ValueError(f"target must have shape {tuple(buf.y.shape)}, got {tuple(target.shape)}")
        else:
            buf.y.copy_(target)
        blocks, acts, K = self.blocks, self.activations, self.K
        forward_into(torch.bmm, buf.x_k, self.blocks_t, acts, buf, self.masks)
        # per-model loss (up to buf.loss_scale) and dL/do (up to buf.scale), as FusedTrainer
        if self.loss_name == "cross_entropy":
            torch.log_softmax(buf.out, -1, out=buf.out)
            dots = torch.mv(buf.out.view(K, -1), buf.y.view(-1)) if shared else _rowdot(buf.out, buf.y)
            _fused.output_grad_into(self.loss_name, buf.out, buf.y_k, buf.grad[-1], 2)
        else:
            _fused.output_grad_into(self.loss_name, buf.out, buf.y_k, buf.grad[-1], 2)
            dots = _rowdot(buf.grad[-1], buf.grad[-1])
        step = self.lr * -buf.scale  # (K, 1, 1); frozen models take no step (masked: 0 * inf would be nan)
        inactive = None if self._all_active else ~self.active.view(-1, 1, 1)
        # backward, top layer first: dL/da^{l-1} = dL/dz^l W^l (before W^l moves), dL/dz^{l-1} = dL/da^{l-1} sigma'
        for k in range(len(blocks) - 1, -1, -1):
            if k:
                _fused.backprop_into(torch.bmm, buf, k, self.weights, acts)
            torch.mul(buf.grad[k], step, out=buf.stepped[k])
            if inactive is not None:
                buf.stepped[k].masked_fill_(inactive, 0)
            below = buf.act[k - 1] if k else buf.x_k  # [a^{l-1} | 1]
            # [W | b] -= lr_k dL/d[W | b]
            _fused.block_grad_into(blocks[k], buf.stepped[k].transpose(1, 2), below, 1.0, 1.0, self.bias)
        self._last, self._grads = (buf, buf.x_k), None
        self.steps += self.active
        return dots.mul_(buf.loss_scale)

    def _update(self, grads: list[Tensor]) -> None:
        """The optimizer step of :mod:`manualbp.optim_steps` with the per-model hyperparameters (K, 1, 1); a
        frozen model's parameters and optimizer state are put back after it (nothing of it moves)."""
        self._grads, self._last = grads, None
        state: Any = self.sgd_state if self.optimizer == "sgd" else self.adam_state
        kept = None if self._all_active else [(t, t.clone()) for t in self.params + state.tensors()]
        decay = self.weight_decay if self._has_weight_decay else 0.0  # 0.0: no model decays, skip it
        if self.optimizer == "sgd":
            nesterov = True if self._all_nesterov else self.nesterov if self._any_nesterov else False
            O.sgd_step_(
                self.params, grads, state, lr=self.lr, momentum=self.momentum if self._any_momentum else 0.0,
                dampening=self.dampening, weight_decay=decay, nesterov=nesterov,
            )  # fmt: skip
        else:
            O.adam_step_(
                self.params, grads, state, lr=self.lr, betas=(self.beta1, self.beta2), eps=self.eps,
                weight_decay=decay, decoupled=self.optimizer == "adamw",
            )  # fmt: skip
        if kept is not None:
            frozen = ~self.active.view(-1, 1, 1)
            for t, before in kept:
                t.copy_(torch.where(frozen, before, t))
        self.steps += self.active  # on the device: no host sync per step

    # -- per-model state -------------------------------------------------------------------------------
    #: steps of fewer FLOPs than this (all K models together) run on one CPU thread (:meth:`threads`), as the
    #: fused trainer's; 0 keeps torch's thread count.
    single_thread_flops: float = _fused.FusedTrainer.single_thread_flops

    def threads(self, batch_size: int) -> ContextManager[None]:
        """One CPU thread while a step of ``batch_size`` rows (K models) is under :attr:`single_thread_flops`
        (``fast.fused.single_threaded``): ``run_many`` holds it for the whole group run."""
        flops = self.K * _fused.step_flops(batch_size, self.widths, self.bias)
        return _fused.single_threaded(flops, self.single_thread_flops, self.blocks[0].device)

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
        """Every model's output for ``input`` (N, in), shared, or (K, N, in): (K, N, out)."""
        if (
            input.dim() not in (2, 3)
            or input.shape[-1] != self.widths[0]
            or (input.dim() == 3 and len(input) != self.K)
        ):
            raise ValueError(
                f"input must have shape (N, {self.widths[0]}) or ({self.K}, N, {self.widths[0]}), got {tuple(input.shape)}"
            )
        key = (input.shape[-2], input.dim() == 2)
        buf = self._predict_buffers.get(key)
        if buf is None:  # kept: a sweep predicts on the same train and val shapes every epoch
            buf = self._predict_buffers[key] = _Buffers(self, *key, forward_only=True)
        with torch.no_grad():
            buf.x_in.copy_(input)
            forward_into(torch.bmm, buf.x_k, self.blocks_t, self.activations, buf, self.masks)
            return buf.out.clone()

    @property
    def last_grads(self) -> Optional[list[Tensor]]:
        """The last step's [dL/dW1, dL/db1, ...] stacked over the models, or None before a step."""
        if self._grads is not None or self._last is None:
            return self._grads
        buf, x = self._last  # the fused step never materializes them: dL/d[W | b] = scale grad^T [a^{l-1} | 1]
        below = [x] + buf.act[: len(self.blocks) - 1]
        blocks = [torch.bmm(g.transpose(1, 2), a).mul_(buf.scale) for g, a in zip(buf.grad, below)]
        if not self.bias:
            return blocks
        return join_params([b[:, :, :-1] for b in blocks], [b[:, :, -1].unsqueeze(1) for b in blocks], True)

    def grad_norms(self) -> dict[str, Tensor]:
        """Per-parameter L2 norm of the last step's gradient, one value per model: name -> (K,)."""
        if self.last_grads is None:
            return {}
        names = [n for n, _ in self.template.named_parameters()]
        return {n: g.flatten(1).norm(dim=1) for n, g in zip(names, self.last_grads)}

    def parameters_of(self, k: int) -> list[Tensor]:
        """Model k's parameters (W1, b1, W2, ...), shaped as in its own MLP (views into the padded stacks)."""
        widths = [self.widths[0], *self.hidden[k], self.widths[-1]]
        out: list[Tensor] = []
        for i, w in enumerate(self.weights):
            out.append(w[k, : widths[i + 1], : widths[i]])
            if self.bias:
                out.append(self.biases[i][k, 0, : widths[i + 1]])  # type: ignore[index]
        return out

    def model(self, k: int) -> MLP:
        """A copy of model k as a standalone :class:`manualbp.MLP` with its current weights (its own widths)."""
        t = self.template
        m = MLP(
            t.in_features,
            self.hidden[k],
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
        """The trainer's state: the stacked parameters and optimizer state (padded to the widest model where the
        widths differ; :meth:`parameters_of` and :meth:`model` give each model's own), rates, flags, steps."""
        return {
            "hidden": [list(h) for h in self.hidden],
            "params": [p.clone() for p in self.params],
            "momentum_buffers": self.sgd_state.state_dict()["momentum_buffers"],
            "adam_state": self.adam_state.state_dict() if self.optimizer != "sgd" else None,
            "lr": self.lr.clone(),
            "active": self.active.clone(),
            "steps": self.steps.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        hidden = state.get("hidden", self.hidden)
        if hidden != self.hidden:
            raise ValueError(f"state: saved for models of hidden widths {hidden}, this trainer's are {self.hidden}")
        with torch.no_grad():
            for p, q in zip(self.params, state["params"]):
                p.copy_(q)
        self.sgd_state = O.SGDState.from_state_dict({"momentum_buffers": state["momentum_buffers"]})
        if state.get("adam_state") is not None:
            self.adam_state = O.AdamState.from_state_dict(state["adam_state"])
        self.lr = state["lr"].clone()
        self.active = state["active"].clone()
        self._all_active = bool(self.active.all())
        self.steps = state["steps"].clone()


def _stack_padded(models: list[MLP]) -> list[Tensor]:
    """Per layer one (K, out, in [+ 1]) block [W | b] of the K models, each zero-padded to the widest model's
    out and in (the bias column last): a narrower model's extra rows and columns are exact zeros."""
    blocks = []
    with torch.no_grad():
        for i in range(len(models[0].linears)):
            lins = [m.linears[i] for m in models]
            rows, cols = max(lin.out_features for lin in lins), max(lin.in_features for lin in lins)
            block = lins[0].weight.new_zeros(len(lins), rows, cols + int(models[0].bias))
            for k, lin in enumerate(lins):
                block[k, : lin.out_features, : lin.in_features] = lin.weight.detach()
                if lin.bias is not None:
                    block[k, : lin.out_features, -1] = lin.bias.detach()
            blocks.append(block)
    return blocks


def _hidden_masks(hidden: list[list[int]], like: Tensor) -> Optional[list[Tensor]]:
    """Per hidden layer a (K, 1, width) 0/1 mask of each model's own units (None if all widths agree)."""
    if all(h == hidden[0] for h in hidden):
        return None
    masks = []
    for layer in range(len(hidden[0])):
        widths = torch.tensor([h[layer] for h in hidden], device=like.device)
        units = torch.arange(max(widths.tolist()), device=like.device)
        masks.append((units < widths.view(-1, 1)).to(like.dtype).unsqueeze(1))
    return masks


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum over everything but the model dimension of a * b: (K, ...) x (K, ...) -> (K,)."""
    K = a.shape[0]
    return torch.bmm(a.reshape(K, 1, -1), b.reshape(K, -1, 1)).view(K)


class _Buffers:
    """Every intermediate of the fused step for K models and a batch of ``n`` rows, allocated once."""

    def __init__(self, trainer: VectorizedTrainer, n: int, shared: bool, forward_only: bool = False) -> None:
        like, K, widths, extra = trainer.blocks[0], trainer.K, trainer.widths, int(trainer.bias)
        new = lambda *shape: torch.empty(*shape, dtype=like.dtype, device=like.device)  # noqa: E731

        def with_ones(*shape: int) -> Tensor:
            t = new(*shape[:-1], shape[-1] + extra)
            if extra:
                t[..., -1] = 1
            return t

        lead = () if shared else (K,)
        self.x = with_ones(*lead, n, widths[0])  # [x | 1], shared by all models or one per model
        self.x_in = self.x[..., : widths[0]]
        self.x_k = self.x.expand(K, n, widths[0] + extra)
        self.z = [new(K, n, w) for w in widths[1:-1]]  # pre-activations z^l
        self.act = [with_ones(K, n, w) for w in widths[1:-1]]  # [a^l | 1]
        self.a = [a[..., : a.shape[-1] - extra] for a in self.act]  # a^l (views)
        self.out = new(K, n, widths[-1])  # o, then log softmax(o) for cross-entropy
        if forward_only:
            return
        self.y = new(*lead, n, widths[-1])  # targets: one-hot rows for class indices
        self.y_k = self.y.expand(K, n, widths[-1])
        self.grad = [new(K, n, w) for w in widths[1:]]  # dL/dz^l / scale (last: dL/do / scale)
        self.stepped = [new(K, n, w) for w in widths[1:]]  # -lr_k dL/dz^l: what the update matmul takes
        self.loss_scale, self.scale = _fused.loss_scales(trainer.loss_name, trainer.reduction, n, widths[-1])
