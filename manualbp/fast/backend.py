"""``backend: fused`` for :func:`manualbp.train.run`: the engine-free :class:`FusedTrainer` behind the
loop's backend interface (``cls(model, loss, optim_cfg)``, step/set_lr/predict/grad_norms/state_dict)."""

from __future__ import annotations

from typing import Any, ContextManager, Mapping

import torch
from torch import Tensor

from ..nn import MLP
from ..train.backends import check_optim_cfg, register_backend
from .fused import FusedTrainer, step_flops

__all__ = ["FusedBackend", "sgd_kwargs"]


def sgd_kwargs(optim_cfg: Mapping[str, Any], backend: str) -> dict[str, Any]:
    """The SGD arguments (lr, momentum, dampening, weight_decay, nesterov) of an ``optim`` config.

    The fast backends implement torch.optim.SGD's update only; another optimizer is a clear error.
    """
    cls, kwargs = check_optim_cfg(optim_cfg)
    if cls is not torch.optim.SGD:
        raise ValueError(
            f"backend={backend} implements SGD only (optim.name=sgd), got optim.name={optim_cfg.get('name')!r}"
        )
    if kwargs.get("maximize") or kwargs.get("differentiable"):
        raise ValueError(f"backend={backend}: optim.maximize and optim.differentiable are not supported")
    return {k: kwargs[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov") if k in kwargs}


class FusedBackend:
    """Forward, hand-derived backward and the SGD update in one engine-free pass (:class:`FusedTrainer`).

    The same formulas and the same update as ``backend: manual``, so the runs agree (float64: to about
    1e-12; ``tests/test_fused_backend.py``).
    """

    name = "fused"

    def __init__(self, model: MLP, loss: str, optim_cfg: Mapping[str, Any]) -> None:
        self.trainer = FusedTrainer(model, loss, **sgd_kwargs(optim_cfg, "fused"))
        self.model = model

    def prepare(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The training set as :meth:`step` takes it (ones column, one-hot targets), once per run."""
        return self.trainer.prepare(x, y)

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One step on rows of :meth:`prepare`'s output."""
        return self.trainer.step_prepared(x, y)

    def step_many(self, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
        """A whole epoch: consecutive steps on batches of ``batch_size`` rows of :meth:`prepare`'s output."""
        return self.trainer.step_many(x, y, batch_size)

    def threads(self, batch_size: int) -> ContextManager[None]:
        """The run's CPU threads: one where a step of ``batch_size`` rows is under the trainer's
        ``single_thread_flops`` (the whole run then, its evaluation and shuffles too), else torch's."""
        return self.trainer._threads(step_flops(batch_size, self.trainer.widths, self.trainer.bias))

    def set_lr(self, lr: float) -> None:
        self.trainer.set_lr(lr)

    def predict(self, x: Tensor) -> Tensor:
        return self.trainer.predict(x)

    def grad_norms(self) -> list[float]:
        """Each layer's ||dL/dW^l|| of the last step (zeros before the first step)."""
        grads = self.trainer.last_grads
        if grads is None:
            return [0.0] * len(self.trainer.weights)
        weights = grads[0::2] if self.model.bias else grads
        return torch.stack(torch._foreach_norm(weights)).to(torch.float64).tolist()

    def extra_metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return self.trainer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.trainer.load_state_dict(dict(state))


register_backend("fused", FusedBackend)
