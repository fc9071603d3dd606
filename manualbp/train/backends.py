"""Training backends: what one optimizer step means for the loop, behind one small interface.

A backend is built as ``cls(model, loss, optim_cfg)`` from a :class:`manualbp.MLP` (already
initialized, on the training device), a loss name ("cross_entropy", "squared_error", "mse") and the
``optim`` config, and provides:

- ``step(x, y) -> Tensor``: forward, backward and parameter update for one batch; the detached loss.
- ``set_lr(lr)``: the learning rate for the next steps (the loop owns the schedule).
- ``predict(x) -> Tensor``: output logits with no graph, for evaluation.
- ``grad_norms() -> list[float]``: each layer's weight-gradient norm ||dL/dW^l|| of the last step.
- ``state_dict()``/``load_state_dict(sd)``: weights and optimizer state, for checkpoints.
- ``model``: the manual MLP holding the current weights.
- ``extra_metrics() -> dict``: backend-specific numbers (for "both": the drift between the twins).
- optional ``prepare(x, y) -> (x', y')``: the training set in the form ``step`` takes, called once per run
  (``fused``: a column of ones and one-hot targets); the loop then passes rows of ``x'``/``y'`` to ``step``.
- optional ``step_many(x, y, batch_size) -> Tensor``: the steps ``step`` would take on consecutive batches of
  ``batch_size`` rows (the last may be smaller) in one call, returning each batch's loss, shape (batches,).
  The loop uses it for whole epochs when no per-step rule needs it in between (no step-level stopping,
  learning rate fixed within the epoch, no DDP); it rewinds with ``state_dict``/``load_state_dict`` and
  replays the epoch step by step when the divergence check would have fired within it.
- optional ``threads(batch_size)``: a context manager that ``run`` holds for the whole run (the fused backend
  runs small steps, and so the whole run, on one CPU thread).

Registered: "manual" (the hand-derived Function), "autograd" (the native ``nn.Sequential`` twin),
"both" (the two in lockstep). Other backends plug in with :func:`register_backend`.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from typing import Any, Callable, Mapping, Union

import torch
from torch import Tensor, nn

from ..autograd import LOSS_FUNCTIONS
from ..nn import MLP
from ..registry import LOSS_REGISTRY
from .defaults import DEFAULTS, is_number
from .distributed import wrap as wrap_distributed

__all__ = [
    "BACKENDS",
    "register_backend",
    "ManualBackend",
    "AutogradBackend",
    "BothBackend",
    "build_optimizer",
    "check_optim_cfg",
    "resolve_optimizer",
    "rel_diff",
]

class _Registry(dict):
    """Backend name -> class. A ``"module:Class"`` string registers a backend lazily: its module is imported
    the first time the backend is looked up, so importing ``manualbp.train`` does not import the fast paths."""

    def __getitem__(self, name: str) -> type:
        value = super().__getitem__(name)
        if isinstance(value, str):
            module, _, attr = value.partition(":")
            value = getattr(importlib.import_module(module), attr)
            super().__setitem__(name, value)
        return value

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return self[name] if name in self else default

    def values(self) -> list[type]:  # type: ignore[override]
        return [self[k] for k in self]

    def items(self) -> list[tuple[str, type]]:  # type: ignore[override]
        return [(k, self[k]) for k in self]


BACKENDS: dict[str, type] = _Registry()


def register_backend(name: str, cls: Union[type, str]) -> Union[type, str]:
    """Make ``backend: name`` build ``cls(model, loss, optim_cfg)``; ``cls`` may be a ``"module:Class"`` string,
    imported on first use. Returns ``cls`` (usable as a decorator factory)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty string, got {name!r}")
    if isinstance(cls, str) and (":" not in cls or cls.startswith(":") or cls.endswith(":")):
        raise ValueError(f"backend {name!r}: a lazy backend is named 'module:Class', got {cls!r}")
    BACKENDS[name] = cls  # type: ignore[assignment]
    return cls


# --------------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------------
_ALIASES = {"sgd": "torch.optim.SGD", "adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW"}
_LOOP_KEYS = ("name", "batch_size")


def resolve_optimizer(name: object) -> type:
    """The ``torch.optim.Optimizer`` subclass that ``optim.name`` names (sgd, adam, adamw, or an import path)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"optim.name must be 'sgd', 'adam', 'adamw' or an import path like 'torch.optim.RMSprop', got {name!r}")
    path = _ALIASES.get(name.lower(), name)
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr) if module_name else None
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(
            f"optim.name must be 'sgd', 'adam', 'adamw' or the import path of a torch.optim.Optimizer "
            f"(e.g. 'torch.optim.RMSprop'), got {name!r}"
        )
    return cls


def _optimizer_kwargs(cfg: Mapping[str, Any], cls: type) -> dict[str, Any]:
    accepted = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {}
    for key, value in cfg.items():
        if key in _LOOP_KEYS:
            continue
        if key not in accepted or key in ("self", "params"):
            if key in DEFAULTS["optim"] and value == DEFAULTS["optim"][key]:
                continue  # an SGD default left in place when another optimizer is chosen
            raise ValueError(
                f"optim.{key} is not an argument of {cls.__module__}.{cls.__name__} "
                f"(it takes {', '.join(k for k in accepted if k not in ('self', 'params'))})"
            )
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    if cls is torch.optim.SGD:
        kwargs.setdefault("dampening", 0.0)  # the notes' momentum: buffer = grad on the first step
    return kwargs


def check_optim_cfg(cfg: object) -> tuple[type, dict[str, Any]]:
    """Validate an ``optim`` config; returns (optimizer class, its keyword arguments)."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"optim must be a mapping, got {type(cfg).__name__}")
    cls = resolve_optimizer(cfg.get("name"))
    lr = cfg.get("lr")
    if not (is_number(lr) and lr > 0):
        raise ValueError(f"optim.lr must be a positive number, got {lr!r}")
    bs = cfg.get("batch_size", 32)
    if bs != "full" and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
        raise ValueError(f"optim.batch_size must be a positive integer or 'full', got {bs!r}")
    for key in ("momentum", "weight_decay"):
        if key in cfg and not (is_number(cfg[key]) and cfg[key] >= 0):
            raise ValueError(f"optim.{key} must be a number >= 0, got {cfg[key]!r}")
    if "nesterov" in cfg and not isinstance(cfg["nesterov"], bool):
        raise TypeError(f"optim.nesterov must be true or false, got {cfg['nesterov']!r}")
    if cfg.get("nesterov") and not cfg.get("momentum"):
        raise ValueError("optim.nesterov needs optim.momentum > 0")
    kwargs = _optimizer_kwargs(cfg, cls)
    if cls is torch.optim.SGD and set(kwargs) <= {"lr", "momentum", "dampening", "weight_decay", "nesterov"}:
        # checked here without building one: the first torch.optim construction in a process imports
        # torch._dynamo (about 2 s), which the fused and vectorized backends never need
        dampening = kwargs["dampening"]
        if not is_number(dampening):
            raise ValueError(f"optim.dampening must be a number, got {dampening!r}")
        if kwargs.get("nesterov") and dampening != 0:
            raise ValueError("optim: SGD with nesterov needs optim.dampening = 0")
        return cls, kwargs
    try:  # let the optimizer check its own arguments now, not after the data is loaded
        cls([torch.zeros(1, requires_grad=True)], **kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"optim: {cls.__name__} rejects its arguments {kwargs}: {e}") from None
    return cls, kwargs


def build_optimizer(params: list[Tensor], optim_cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimizer of ``optim_cfg`` over ``params``. "sgd" is ``torch.optim.SGD`` with dampening 0:
    theta <- theta - lr * grad (momentum 0), exactly the notes' update."""
    cls, kwargs = check_optim_cfg(optim_cfg)
    return cls(params, **kwargs)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------
def manual_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The hand-derived loss Function of the registered loss ``name`` (targets are validated once, when the
    data set is loaded)."""
    fn = LOSS_FUNCTIONS[name]
    return lambda output, target: fn.apply(output, target, "mean")


def native_loss(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The same loss written with PyTorch's own ops (the autograd twin's): the registry's reference."""
    reference = LOSS_REGISTRY[name].torch_reference()
    return lambda output, target: reference(output, target, "mean")


def rel_diff(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """max over tensors of max|a - b| / max|b| (the absolute error where b is all zero); a 0-d tensor."""
    out = []
    for x, y in zip(a, b):
        err = (x - y).abs().max()
        scale = y.abs().max()
        out.append(torch.where(scale > 0, err / torch.where(scale > 0, scale, 1.0), err))
    return torch.stack(out).max()


# --------------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------------
class _Backend:
    """Shared plumbing: an optimizer over ``self.params`` (W1, b1, W2, b2, ...)."""

    name = ""
    params: list[Tensor]
    weights: list[Tensor]
    optimizer: torch.optim.Optimizer

    def _forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        loss = self._forward_backward(x, y)
        self.optimizer.step()
        return loss

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def grad_norms(self) -> list[float]:
        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in self.weights]
        return torch.stack(
            [
                torch.linalg.vector_norm(g.float() if g.dtype in (torch.float16, torch.bfloat16) else g).to(
                    torch.float64
                )
                for g in grads
            ]
        ).tolist()

    def extra_metrics(self) -> dict[str, float]:
        return {}


class ManualBackend(_Backend):
    """The manual MLP: forward and the hand-derived two-pass backward in one Function, then ``optimizer.step``."""

    name = "manual"

    def __init__(self, model: MLP, loss: str, optim_cfg: Mapping[str, Any]) -> None:
        if not isinstance(model, MLP):
            raise TypeError(f"model must be a manualbp.MLP, got {type(model).__name__}")
        self.model = model
        self.forward_module: nn.Module = model  # DistributedDataParallel(model) under torchrun
        self.loss_name = loss
        self.loss_fn = manual_loss(loss)
        self.params = model.flat_parameters()
        self.weights = [lin.weight for lin in model.linears]
        self.optimizer = build_optimizer(self.params, optim_cfg)

    def _forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        for p in self.params:
            p.grad = None
        loss = self.loss_fn(self.forward_module(x), y)
        loss.backward()
        return loss.detach()

    def distribute(self, info: Any) -> None:
        """Train under DistributedDataParallel (gradients averaged over ranks)."""
        self.forward_module = wrap_distributed(self.model, info)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.model(x)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class AutogradBackend(_Backend):
    """The native twin: ``model.to_torch()`` (nn.Linear and nn activations), PyTorch's losses, autograd."""

    name = "autograd"

    def __init__(self, model: MLP, loss: str, optim_cfg: Mapping[str, Any]) -> None:
        if not isinstance(model, MLP):
            raise TypeError(f"model must be a manualbp.MLP, got {type(model).__name__}")
        self._manual = model
        self.net: nn.Sequential = model.to_torch()
        self.forward_net: nn.Module = self.net  # DistributedDataParallel(net) under torchrun
        self.loss_name = loss
        self.loss_fn = native_loss(loss)
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        self.params = [
            t for lin in linears for t in ((lin.weight, lin.bias) if lin.bias is not None else (lin.weight,))
        ]
        self.weights = [lin.weight for lin in linears]
        self.optimizer = build_optimizer(self.params, optim_cfg)

    @property
    def model(self) -> MLP:
        """The manual MLP, refreshed with the native net's current weights."""
        self._manual.load_state_dict(self.net.state_dict())
        return self._manual

    def _forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        for p in self.params:
            p.grad = None
        loss = self.loss_fn(self.forward_net(x), y)
        loss.backward()
        return loss.detach()

    def distribute(self, info: Any) -> None:
        """Train under DistributedDataParallel (gradients averaged over ranks)."""
        self.forward_net = wrap_distributed(self.net, info)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return self.net(x)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class BothBackend:
    """Manual and autograd in lockstep: the same initial weights, the same batches, the same optimizer.

    Every step records the largest relative difference max|g_manual - g_native| / max|g_native| over the
    parameter gradients, and the same for the parameters after the update; :meth:`extra_metrics` reports
    the largest of each over the run (``max_grad_rel_diff``, ``max_param_rel_diff``) and the current
    parameter difference (``param_rel_diff``). The maxima stay on the device (no per-step sync).
    Evaluation, ``model`` and the returned loss are the manual twin's.
    """

    name = "both"

    def __init__(self, model: MLP, loss: str, optim_cfg: Mapping[str, Any]) -> None:
        self.manual = ManualBackend(model, loss, optim_cfg)
        self.native = AutogradBackend(copy.deepcopy(model), loss, optim_cfg)
        dev, dt = model.linears[0].weight.device, torch.float64
        self._max_grad = torch.zeros((), device=dev, dtype=dt)
        self._max_param = torch.zeros((), device=dev, dtype=dt)
        self._last_param = torch.zeros((), device=dev, dtype=dt)

    @property
    def model(self) -> MLP:
        return self.manual.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.manual.optimizer

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        loss = self.manual._forward_backward(x, y)
        self.native._forward_backward(x, y)
        g = rel_diff([p.grad for p in self.manual.params], [p.grad for p in self.native.params]).to(torch.float64)
        self._max_grad = torch.maximum(self._max_grad, g)
        self.manual.optimizer.step()
        self.native.optimizer.step()
        with torch.no_grad():
            d = rel_diff(self.manual.params, self.native.params).to(torch.float64)
        self._last_param = d
        self._max_param = torch.maximum(self._max_param, d)
        return loss

    def set_lr(self, lr: float) -> None:
        self.manual.set_lr(lr)
        self.native.set_lr(lr)

    def predict(self, x: Tensor) -> Tensor:
        return self.manual.predict(x)

    def grad_norms(self) -> list[float]:
        return self.manual.grad_norms()

    def extra_metrics(self) -> dict[str, float]:
        vals = torch.stack([self._max_grad, self._max_param, self._last_param]).tolist()
        return {"max_grad_rel_diff": vals[0], "max_param_rel_diff": vals[1], "param_rel_diff": vals[2]}

    def state_dict(self) -> dict[str, Any]:
        return {
            "manual": self.manual.state_dict(),
            "native": self.native.state_dict(),
            "max_grad": self._max_grad.clone(),
            "max_param": self._max_param.clone(),
            "last_param": self._last_param.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.manual.load_state_dict(state["manual"])
        self.native.load_state_dict(state["native"])
        dev = self._max_grad.device
        self._max_grad = state["max_grad"].to(dev)
        self._max_param = state["max_param"].to(dev)
        self._last_param = state["last_param"].to(dev)


register_backend("manual", ManualBackend)
register_backend("autograd", AutogradBackend)
register_backend("both", BothBackend)
register_backend("fused", "manualbp.fast.backend:FusedBackend")  # the engine-free trainer, imported when used
