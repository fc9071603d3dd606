"""An engine-free fused trainer: forward, hand-derived backward and the SGD update in one pass.

No autograd graph is recorded and nothing is allocated per step. Each layer's weight and bias live in one
``(out, in + 1)`` block ``[W | b]`` (the model's ``weight`` and ``bias`` parameters become views of it, so
the model stays usable as a module and sees every update), every activation buffer carries a column of
ones, and so the two passes of the notes become, per layer, one matmul forward, one matmul back, and one
in-place ``addmm_`` that is at once dL/dW = (dL/dz)^T a_prev, dL/db = sum_n dL/dz and W -= lr dL/dW.
The activation derivatives are the kernels of ``manualbp.functional``'s ``*_backward`` (written in place);
cross-entropy's dL/do is softmax(o) sum_k y_k - y (softmax(o) - y for one-hot or normalized targets; one
kernel, which yields its negative), the squared errors' o - y, the reduction's 1/N and that sign folded into
the step size. Momentum, dampening, nesterov and weight decay (``torch.optim.SGD``, ``buf = grad`` on the first
step) and Adam / AdamW (``optimizer="adam"`` / ``"adamw"``) are the steps of :mod:`manualbp.optim_steps`, the one
source of the update formulas, applied to the dL/d[W | b] blocks.

It is the same math as ``MLP`` + ``torch.optim.SGD`` (or ``Adam`` / ``AdamW``) step for step (float64: the trajectories agree to
about 1e-12 after a full run; ``tests/fast/test_fused.py``), without the graph bookkeeping, the Python
``Function`` calls, per-step input validation, allocations or the optimizer's per-parameter loop.
:meth:`FusedTrainer.prepare` appends the ones column and one-hot encodes the targets once per data set;
:meth:`FusedTrainer.step_prepared` then trains on slices of the result, and :meth:`FusedTrainer.step_many`
runs a whole epoch of consecutive batches in one call (what ``backend: fused`` does): in C++ where
``manualbp.native`` is built (``manualbp/csrc/fused.cpp``, the same kernels in the same order, so the same
numbers bit for bit), else in Python.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import optim_steps as O
from ..autograd import join_params
from ..native import load as native_kernels
from ..nn import MLP
from ..registry import ACTIVATION_REGISTRY, LOSS_REGISTRY
from ._losses import resolve_loss

__all__ = ["FusedTrainer", "step_flops"]

_aten = torch.ops.aten

def output_grad_into(loss_name: str, out: Tensor, target: Tensor, grad: Tensor, dim: int) -> None:
    """dL/do up to the step's ``scale`` (:func:`loss_scales`) into ``grad``: the loss spec's in-place form
    (``Loss.grad_into``: for cross-entropy ``out`` holds log softmax(o) and ``grad`` gets y - softmax(o) sum_k y_k;
    for the squared errors o - y). ``dim`` is the class dimension."""
    LOSS_REGISTRY[loss_name].grad_into(out, target, grad, dim)


def spec_loss_into(loss_name: str, reduction: str, out: Tensor, target: Tensor, grad: Tensor) -> Tensor:
    """A loss without fused kernels (no ``Loss.grad_into``: a registered one), from its registry spec: returns L
    and writes dL/do (its backward, the reduction's factor included; :func:`loss_scales` is then (1, 1))."""
    spec = LOSS_REGISTRY[loss_name]
    grad.copy_(spec.backward(out.new_ones(()), out, target, reduction)[0])  # dL/do, (n, out)
    return spec.forward(out, target, reduction).detach()


def block_grad_into(dest: Tensor, grad_t: Tensor, below: Tensor, alpha: float, beta: float, bias: bool) -> None:
    """dest = beta dest + alpha (dL/dz)^T [a_prev | 1], one ``addmm_`` (``baddbmm_`` for K stacked models):
    at once dL/dW = (dL/dz)^T a_prev and, on the ones column (``bias``), dL/db = sum_n dL/dz; with dest the
    block [W | b] and alpha = -lr scale it is the SGD step itself."""
    if dest.dim() == 2:
        dest.addmm_(grad_t, below, beta=beta, alpha=alpha)
    else:
        dest.baddbmm_(grad_t, below, beta=beta, alpha=alpha)


def forward_into(
    matmul: Callable[..., Tensor], h: Tensor, blocks_t: list[Tensor], activations: Any, buf: Any,
    masks: Optional[list[Tensor]] = None,
) -> None:  # fmt: skip
    """The forward pass into ``buf``: z^l = [a^{l-1} | 1] [W^l | b^l]^T, a^l = sigma(z^l) (written into the
    view ``buf.a[l]`` of ``buf.act[l]`` = [a^l | 1]), o = [a^{L-1} | 1] [W^L | b^L]^T. ``h`` is [x | 1];
    ``matmul`` is ``torch.mm`` for one model, ``torch.bmm`` for K stacked ones. ``masks``: 0/1 columns per
    hidden layer, a^l = m^l sigma(z^l) (padded units, as ``functional.mlp_forward``'s ``masks``)."""
    for k, (name, slope) in enumerate(activations):
        matmul(h, blocks_t[k], out=buf.z[k])
        ACTIVATION_REGISTRY[name].forward_into(buf.z[k], buf.a[k], slope)  # a^l = sigma(z^l), the registry's
        if masks is not None:
            buf.a[k].mul_(masks[k])  # a^l = m^l sigma(z^l): a padded unit's a is 0
        h = buf.act[k]
    matmul(h, blocks_t[-1], out=buf.out)


def backprop_into(matmul: Callable[..., Tensor], buf: Any, k: int, weights: list[Tensor], activations: Any) -> None:
    """One layer down (block k is layer l = k + 1): dL/da^{l-1} = dL/dz^l W^l into ``buf.grad[k - 1]``, then
    dL/dz^{l-1} = dL/da^{l-1} sigma' in place, from the saved a^{l-1}."""
    matmul(buf.grad[k], weights[k], out=buf.grad[k - 1])
    name, slope = activations[k - 1]
    ACTIVATION_REGISTRY[name].backward_(buf.grad[k - 1], buf.a[k - 1], slope)  # g sigma'(z), the registry's


def loss_scales(loss_name: str, reduction: str, n: int, classes: int) -> tuple[float, float]:
    """``(loss_scale, scale)`` of a batch of ``n`` rows: the loss is loss_scale * (the step's dot product)
    and dL/do is scale * (the step's output gradient buffer), as both fast trainers compute them:

    - cross-entropy: dot = sum y log softmax(o), buffer = y - softmax(o) sum_k y_k (torch's log-softmax
      backward kernel on y), so both scales are -1;
    - squared errors: dot = |o - y|^2, buffer = o - y: the notes' 1/2 sum_k (0.5, 1), mse (1, 2);

    over the reduction: "mean" divides by the rows (mse: by the elements, the spec's ``mean_over``). A loss
    without fused kernels (:func:`spec_loss_into`) has (1, 1)."""
    spec = LOSS_REGISTRY[loss_name]
    if spec.fused_scales is None:
        return 1.0, 1.0
    loss_scale, scale = spec.fused_scales  # the spec's: cross-entropy (-1, -1), squared error (0.5, 1), mse (1, 2)
    if reduction == "mean":
        count = n if spec.mean_over == "examples" else n * classes
        loss_scale, scale = loss_scale / count, scale / count
    return loss_scale, scale


@contextlib.contextmanager
def single_threaded(flops: float, threshold: float, device: torch.device) -> Iterator[None]:
    """One CPU thread for work of ``flops`` a step below ``threshold``, the caller's thread count back after.

    A small step's GEMMs are microseconds long; splitting them over threads costs more than it saves
    (64-64-10 batch 32 on 2 cores: 113 us a step on one thread, 178 us on two; the two cross between
    7 and 39 MFLOP a step), and on a loaded machine idle OpenMP threads stall far worse. ``torch.set_num_threads``
    is process-wide: while the step runs, other Python threads of the process see one thread too. Both fast
    trainers use it (``single_thread_flops``).
    """
    threads = torch.get_num_threads()
    if threads == 1 or flops >= threshold or device.type != "cpu":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def step_flops(n: int, widths: list[int], bias: bool) -> int:
    """One step's floating-point operations on ``n`` rows: 2 n (in + bias) out per layer forward, twice that back."""
    return 6 * n * sum((a + int(bias)) * b for a, b in zip(widths[:-1], widths[1:]))


class _Buffers:
    """Every intermediate of one step for a batch of ``n`` rows, allocated once and reused."""

    def __init__(self, n: int, widths: list[int], bias: bool, like: Tensor, loss_name: str, reduction: str) -> None:
        new = lambda *shape: torch.empty(*shape, dtype=like.dtype, device=like.device)  # noqa: E731
        extra = int(bias)
        self.z = [new(n, w) for w in widths[1:-1]]  # pre-activations z^l of the hidden layers
        self.act = [new(n, w + extra) for w in widths[1:-1]]  # [a^l | 1]
        for a in self.act:
            if bias:
                a[:, -1] = 1
        self.a = [a[:, : a.shape[1] - extra] for a in self.act]  # a^l (views)
        self.grad = [new(n, w) for w in widths[1:]]  # dL/dz^l / scale (last: dL/do / scale)
        self.grad_t = [g.t() for g in self.grad]
        self.out = new(n, widths[-1])  # o, then log softmax(o) for cross-entropy
        self.out_flat = self.out.view(-1)
        self.go_flat = self.grad[-1].view(-1)
        self.loss_scale, self.scale = loss_scales(loss_name, reduction, n, widths[-1])
        self.flops = step_flops(n, widths, bias)
        self.loss_scale_t = torch.tensor(self.loss_scale, dtype=like.dtype, device=like.device)

    def native_args(self) -> tuple:
        """These buffers as the C++ step loop takes them (``manualbp/csrc/fused.cpp``)."""
        return self.z, self.act, self.a, self.grad, self.out, self.scale


class FusedTrainer:
    """Train a :class:`manualbp.MLP` with SGD, Adam or AdamW, engine-free, updating its parameters in place.

    Args:
        model: the MLP. Its ``weight``/``bias`` parameters are re-pointed at views of one ``[W | b]``
            block per layer, which every step updates in place (``model`` stays usable as a module;
            after moving the model or replacing its parameters, build a new trainer).
        loss: "cross_entropy", "mse", "squared_error" or a matching loss module (manualbp's or torch's).
        optimizer: "sgd" (``torch.optim.SGD``), "adam" (``torch.optim.Adam``) or "adamw" (``torch.optim.AdamW``,
            decoupled weight decay); the steps of :mod:`manualbp.optim_steps`.
        lr, weight_decay: as the optimizer's (weight decay defaults to 0 for all three).
        momentum, dampening, nesterov: as ``torch.optim.SGD`` (SGD only).
        betas, eps: as ``torch.optim.Adam`` (Adam and AdamW only; amsgrad and maximize are not implemented).

    Example:
        >>> model = MLP(64, [64], 10)
        >>> trainer = FusedTrainer(model, "cross_entropy", lr=0.1)
        >>> loss = trainer.step(torch.randn(32, 64), torch.randint(0, 10, (32,)))
    """

    #: CPU steps (and predictions) of fewer floating-point operations than this run on one thread (see
    #: :meth:`_threads`); 0 keeps torch's thread count throughout.
    single_thread_flops: float = 16e6

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
        optimizer: str = "sgd",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if not isinstance(model, MLP):
            raise TypeError(f"model must be a manualbp.MLP, got {type(model).__name__}")
        self.optimizer = O.check_optimizer(optimizer)
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if self.optimizer != "sgd" and (momentum or dampening or nesterov):
            raise ValueError(f"momentum, dampening and nesterov are SGD's; optimizer={self.optimizer!r} takes betas")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas) or eps < 0:
            raise ValueError(f"betas must be two numbers in [0, 1) and eps >= 0, got betas={betas!r}, eps={eps!r}")
        self.model = model
        self.loss_name, self.reduction = resolve_loss(loss)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.dampening = float(dampening)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.steps = 0
        self.sgd_state = O.SGDState()  # the momentum buffers (SGD)
        self.adam_state = O.AdamState()  # the moments and the step count (Adam, AdamW)
        self._bind()

    def _bind(self) -> None:
        """One ``[W | b]`` block per layer; the model's parameters become views of it (same values)."""
        model = self.model
        self.bias = model.bias
        self.activations = model.activation_specs
        self.widths = [model.in_features] + [lin.out_features for lin in model.linears]
        self.blocks: list[Tensor] = []
        with torch.no_grad():
            for lin in model.linears:
                w = lin.weight.detach()
                if self.bias:
                    block = torch.cat([w, lin.bias.detach().unsqueeze(1)], 1)
                    lin.weight.data = block[:, :-1]
                    lin.bias.data = block[:, -1]
                else:
                    block = w.contiguous()
                    lin.weight.data = block
                self.blocks.append(block)
        self.blocks_t = [b.t() for b in self.blocks]  # z = [a_prev | 1] [W | b]^T
        self.weights = [b[:, :-1] if self.bias else b for b in self.blocks]  # W^l (views)
        self.biases = [b[:, -1] if self.bias else None for b in self.blocks]  # b^l (views)
        self._buffers: dict[int, _Buffers] = {}
        self._grad_blocks: Optional[list[Tensor]] = None
        self._last: Optional[tuple[_Buffers, Tensor]] = None

    # -- data -----------------------------------------------------------------------------------------
    def prepare(self, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(input, target)`` in the form :meth:`step_prepared` takes, for a whole data set at once.

        The input gains a column of ones (with bias) and the model's dtype; class indices become one-hot
        rows. Rows of the result (any slice, any permutation) are valid batches.
        """
        block = self.blocks[0]
        if input.dim() != 2 or input.shape[1] != self.widths[0]:
            raise ValueError(f"input must have shape (N, {self.widths[0]}), got {tuple(input.shape)}")
        if input.device != block.device or target.device != block.device:
            raise ValueError(f"input and target must be on {block.device}, got {input.device} and {target.device}")
        n, c = input.shape[0], self.widths[-1]
        if n == 0 and self.reduction == "mean":
            raise ValueError("input: a mean loss over 0 examples is undefined (got an empty batch)")
        input, target = input.detach(), target.detach()
        x = input.to(block.dtype)
        if self.bias:
            x = torch.cat([x, x.new_ones(n, 1)], 1)
        if self.loss_name == "cross_entropy" and not target.is_floating_point():
            if target.shape != (n,):
                raise ValueError(f"target (class indices) must have shape ({n},), got {tuple(target.shape)}")
            if n and (int(target.min()) < 0 or int(target.max()) >= c):
                raise ValueError(f"target holds class indices outside [0, {c - 1}]")
            t = torch.nn.functional.one_hot(target.long(), c).to(block.dtype)
        else:
            if target.shape != (n, c):
                raise ValueError(f"target must have shape ({n}, {c}), got {tuple(target.shape)}")
            t = target.to(block.dtype)
        return x.contiguous(), t.contiguous()

    # -- the step ------------------------------------------------------------------------------------
    def step(self, input: Tensor, target: Tensor) -> Tensor:
        """One optimizer step on a batch; returns the batch loss (detached, before the update)."""
        return self.step_prepared(*self.prepare(input, target))

    def step_prepared(self, input: Tensor, target: Tensor) -> Tensor:
        """One optimizer step on a batch of :meth:`prepare`'s output; returns the batch loss (before the update)."""
        buf = self._buffers_for(input.shape[0])
        with self._threads(buf.flops):
            return self._step(buf, input, target, target.view(-1)).mul_(buf.loss_scale_t)

    def step_many(self, input: Tensor, target: Tensor, batch_size: int) -> Tensor:
        """Consecutive optimizer steps on the batches of ``batch_size`` rows of :meth:`prepare`'s output.

        Rows ``b * batch_size`` to ``(b + 1) * batch_size - 1`` are batch ``b`` (the last one may be smaller),
        as one :meth:`step_prepared` call each would take them, with the same result. Returns the batch
        losses, each before its update, as one tensor of shape ``(number of batches,)``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if target.dim() != 2 or input.dim() != 2 or input.shape[0] != target.shape[0]:
            raise ValueError(
                "input and target must be prepare()'s output, (N, features) and (N, outputs) with the same N, "
                f"got {tuple(input.shape)} and {tuple(target.shape)}"
            )
        n, c = target.shape
        if n == 0:
            raise ValueError("input: step_many needs at least one row (got an empty data set)")
        batches = -(-n // batch_size)
        full = self._buffers_for(min(batch_size, n))
        last = self._buffers_for(n - (batches - 1) * batch_size) if n % batch_size else full
        native = native_kernels()
        with self._threads(full.flops):
            if native is not None and self._compiled():  # the loop below, called from C++: same kernels, same order
                adam = self.adam_state
                losses, buffers, exp_avg, exp_avg_sq = native.fused_step_many(
                    self.blocks, self.weights, self.activations, self.loss_name, self.lr, self.momentum,
                    self.dampening, self.weight_decay, self.nesterov, self.momentum_buffers or [],
                    [] if self._plain else self._gradient_blocks(), self.optimizer, *self.betas, self.eps,
                    adam.exp_avg or [], adam.exp_avg_sq or [], int(adam.step), input, target, batch_size,
                    *full.native_args(), *last.native_args(),
                )  # fmt: skip
                self.momentum_buffers = buffers or None
                if self.optimizer != "sgd":
                    self.adam_state = O.AdamState(exp_avg, exp_avg_sq, int(adam.step) + batches)
                self._last = (last, input[(batches - 1) * batch_size :])
                self.steps += batches
            else:
                xs, ys = input.split(batch_size), target.split(batch_size)
                ts = target.view(-1).split(batch_size * c)
                dots = [self._step(full, xs[b], ys[b], ts[b]) for b in range(batches - 1)]
                dots.append(self._step(last, xs[-1], ys[-1], ts[-1]))
                losses = torch.stack(dots)
        if last is full:
            return losses.mul_(full.loss_scale_t)
        return losses.mul_(torch.stack([full.loss_scale_t] * (batches - 1) + [last.loss_scale_t]))

    def _threads(self, flops: float) -> ContextManager[None]:
        """One CPU thread for work below :attr:`single_thread_flops` (:func:`single_threaded`)."""
        return single_threaded(flops, self.single_thread_flops, self.blocks[0].device)

    def _compiled(self) -> bool:
        """May the C++ loop run this model? Only for the formulas it has (the registry's ``native`` specs);
        anything else (a registered activation or loss) runs the Python loop, the documented fallback."""
        loss = LOSS_REGISTRY[self.loss_name]
        return loss.native and loss.grad_into is not None and all(ACTIVATION_REGISTRY[n].native for n, _ in self.activations)

    @property
    def _fused_loss(self) -> bool:
        """Has the loss its in-place form (``Loss.grad_into``)? Else the step takes the spec's backward."""
        return LOSS_REGISTRY[self.loss_name].grad_into is not None

    @property
    def _plain(self) -> bool:
        """Plain SGD: the step updates [W | b] in its gradient's matmul and never materialises dL/d[W | b]."""
        return self.optimizer == "sgd" and self.momentum == 0 and self.weight_decay == 0

    @property
    def momentum_buffers(self) -> Optional[list[Tensor]]:
        """SGD's momentum buffers, one per [W | b] block (None before the first step with momentum)."""
        return self.sgd_state.momentum_buffers

    @momentum_buffers.setter
    def momentum_buffers(self, buffers: Optional[list[Tensor]]) -> None:
        self.sgd_state.momentum_buffers = buffers

    def _gradient_blocks(self) -> list[Tensor]:
        """The dL/d[W | b] buffers a step with momentum or weight decay fills (the C++ loop too), made once."""
        if self._grad_blocks is None:
            self._grad_blocks = [torch.empty_like(b) for b in self.blocks]
        return self._grad_blocks

    def _buffers_for(self, n: int) -> _Buffers:
        buf = self._buffers.get(n)
        if buf is None:
            buf = self._buffers[n] = _Buffers(n, self.widths, self.bias, self.blocks[0], self.loss_name, self.reduction)
        return buf

    def _step(self, buf: _Buffers, input: Tensor, target: Tensor, target_flat: Tensor) -> Tensor:
        """One step on a prepared batch (``target_flat``: ``target.view(-1)``); returns the loss / loss_scale."""
        blocks = self.blocks
        # no grad mode needed: blocks, buffers and prepared data never require grad, so no graph is built
        forward_into(torch.mm, input, self.blocks_t, self.activations, buf)
        # the loss (up to buf.loss_scale) and dL/do (up to buf.scale)
        if self.loss_name == "cross_entropy":  # L_n = -sum_k y_k log softmax(o)_k
            torch.log_softmax(buf.out, 1, out=buf.out)
            loss = torch.dot(buf.out_flat, target_flat)
            # y - softmax(o) sum_k y_k = -dL/do (torch's log-softmax backward kernel, on dL/d log softmax = y)
            output_grad_into(self.loss_name, buf.out, target, buf.grad[-1], 1)
        elif self._fused_loss:  # squared errors: dL/do = o - y (notes: 1/2 sum_k) or 2 (o - y) (mse), over the reduction
            output_grad_into(self.loss_name, buf.out, target, buf.grad[-1], 1)
            loss = torch.dot(buf.go_flat, buf.go_flat)
        else:  # a registered loss: its spec's forward and backward
            loss = spec_loss_into(self.loss_name, self.reduction, buf.out, target, buf.grad[-1])
        scale = buf.scale
        # backward, top layer first (block k is layer l = k + 1): dL/da^{l-1} = dL/dz^l W^l, dL/dz^{l-1} = dL/da^{l-1} sigma'
        plain = self._plain
        grad_blocks = None if plain else self._gradient_blocks()
        for k in range(len(blocks) - 1, -1, -1):
            below = buf.act[k - 1] if k else input  # [a^{l-1} | 1]
            if k:
                backprop_into(torch.mm, buf, k, self.weights, self.activations)
            if plain:  # [W | b] -= lr dL/d[W | b] = lr scale grad^T [a^{l-1} | 1], one kernel
                block_grad_into(blocks[k], buf.grad_t[k], below, -self.lr * scale, 1.0, self.bias)
            else:  # dL/d[W | b] = scale grad^T [a^{l-1} | 1]
                block_grad_into(grad_blocks[k], buf.grad_t[k], below, scale, 0.0, self.bias)  # type: ignore[index]
        if grad_blocks is not None:
            self._update(grad_blocks)
        self._last = (buf, input)
        self.steps += 1
        return loss

    def _update(self, grads: list[Tensor]) -> None:
        """The optimizer step on the blocks from dL/d[W | b] (``grads`` stays the raw gradient, for grad_norms):
        :func:`manualbp.optim_steps.sgd_step_` or :func:`~manualbp.optim_steps.adam_step_`."""
        if self.optimizer == "sgd":
            O.sgd_step_(
                self.blocks, grads, self.sgd_state, lr=self.lr, momentum=self.momentum, dampening=self.dampening,
                weight_decay=self.weight_decay, nesterov=self.nesterov,
            )  # fmt: skip
        else:
            O.adam_step_(
                self.blocks, grads, self.adam_state, lr=self.lr, betas=self.betas, eps=self.eps,
                weight_decay=self.weight_decay, decoupled=self.optimizer == "adamw",
            )  # fmt: skip

    # -- the rest of the backend contract ---------------------------------------------------------------
    @property
    def last_grads(self) -> Optional[list[Tensor]]:
        """The last step's [dL/dW1, dL/db1, ...] (as ``p.grad`` would hold them), or None before a step."""
        if self._last is None:
            return None
        if self._grad_blocks is not None and not self._plain:
            blocks = self._grad_blocks
        else:  # the plain step never materialises them: dL/d[W | b] = scale grad^T [a^{l-1} | 1]
            buf, input = self._last
            below = [input] + buf.act[: len(self.blocks) - 1]
            blocks = [torch.mm(g_t, a).mul_(buf.scale) for g_t, a in zip(buf.grad_t, below)]
        if not self.bias:
            return list(blocks)
        return join_params([b[:, :-1] for b in blocks], [b[:, -1] for b in blocks], True)

    def set_lr(self, lr: float) -> None:
        self.lr = float(lr)

    def predict(self, input: Tensor) -> Tensor:
        """The model's output o for ``input`` (no graph)."""
        flops = 2 * input.shape[0] * sum(b.numel() for b in self.blocks)  # the forward's matmuls
        with torch.no_grad(), self._threads(flops):
            return F.mlp_forward(input, self.weights, self.biases, self.activations).output

    def grad_norms(self) -> dict[str, float]:
        """L2 norm of the last step's gradient dL/dp (as p.grad holds it) per parameter, keyed like state_dict."""
        grads = self.last_grads
        if grads is None:
            return {}
        names = [n for n, _ in self.model.named_parameters()]
        norms = torch.stack(torch._foreach_norm(grads)).tolist()
        return dict(zip(names, norms))

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {k: v.clone() for k, v in self.model.state_dict().items()},
            "lr": self.lr,
            "steps": self.steps,
            "momentum_buffers": self.sgd_state.state_dict()["momentum_buffers"],
            "adam_state": self.adam_state.state_dict() if self.optimizer != "sgd" else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self._bind()
        self.lr = float(state["lr"])
        self.steps = int(state["steps"])
        self.sgd_state = O.SGDState.from_state_dict({"momentum_buffers": state.get("momentum_buffers")})
        self.adam_state = O.AdamState.from_state_dict(state.get("adam_state"))
