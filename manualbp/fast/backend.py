"""``backend: fused`` for :func:`manualbp.train.run`: the engine-free :class:`FusedTrainer` behind the
loop's backend interface (``cls(model, loss, optim_cfg)``, step/set_lr/predict/grad_norms/state_dict)."""

from __future__ import annotations

import inspect
from typing import Any, ContextManager, Mapping

import torch
from torch import Tensor

from ..nn import MLP
from ..train.backends import check_optim_cfg, register_backend
from .fused import FusedTrainer, step_flops

__all__ = ["FusedBackend", "sgd_kwargs", "trainer_kwargs"]

#: the trainers' arguments of each optimizer (the rest of torch.optim's only choose an implementation)
_ARGUMENTS = {
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
    "adam": ("lr", "betas", "eps", "weight_decay"),
    "adamw": ("lr", "betas", "eps", "weight_decay"),
}


def trainer_kwargs(optim_cfg: Mapping[str, Any], backend: str) -> dict[str, Any]:
    """The fast trainers' optimizer arguments (``optimizer`` and lr, momentum, ... or betas, eps, ...) of an
    ``optim`` config: SGD, Adam or AdamW (the steps of :mod:`manualbp.optim_steps`); anything else, or an
    option they do not implement (amsgrad, maximize, differentiable), is a clear error naming the key."""
    cls, kwargs = check_optim_cfg(optim_cfg)
    if cls is torch.optim.SGD:
        name = "sgd"
    elif cls is torch.optim.AdamW or (cls is torch.optim.Adam and kwargs.get("decoupled_weight_decay")):
        name = "adamw"
    elif cls is torch.optim.Adam:
        name = "adam"
    else:
        raise ValueError(
            f"backend={backend} implements SGD, Adam and AdamW (optim.name=sgd, adam or adamw), "
            f"got optim.name={optim_cfg.get('name')!r}"
        )
    for key in ("amsgrad", "maximize", "differentiable"):
        if kwargs.get(key):
            raise ValueError(f"backend={backend}: optim.{key} is not supported")
    out = {k: kwargs[k] for k in _ARGUMENTS[name] if k in kwargs}
    if name != "sgd":  # torch.optim's defaults where the config leaves them out (AdamW's weight decay too)
        defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()}
        out = {**{k: defaults[k] for k in _ARGUMENTS[name]}, **out}
        out["betas"] = tuple(float(b) for b in out["betas"])
    return {"optimizer": name, **out}


def sgd_kwargs(optim_cfg: Mapping[str, Any], backend: str) -> dict[str, Any]:
    """The SGD arguments (lr, momentum, dampening, weight_decay, nesterov) of an SGD ``optim`` config (another
    optimizer is a clear error); :func:`trainer_kwargs` takes Adam and AdamW too."""
    kwargs = trainer_kwargs(optim_cfg, backend)
    if kwargs.pop("optimizer") != "sgd":
        raise ValueError(f"sgd_kwargs: optim.name={optim_cfg.get('name')!r} is not SGD (use trainer_kwargs)")
    return kwargs


class FusedBackend:
    """Forward, hand-derived backward and the optimizer step (SGD, Adam or AdamW) in one engine-free pass
    (:class:`FusedTrainer`).

    The same formulas and the same update as ``backend: manual``, so the runs agree (float64: to about
    1e-12; ``tests/fast/test_fused.py``).
    """

    name = "fused"

    def __init__(self, model: MLP, loss: str, optim_cfg: Mapping[str, Any]) -> None:
        self.trainer = FusedTrainer(model, loss, **trainer_kwargs(optim_cfg, "fused"))
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
