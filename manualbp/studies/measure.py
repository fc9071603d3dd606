"""Measurements at initialization: the quantities the results studies need that the training loop does not record.

Nothing here draws or writes markdown. :func:`initial_state` rebuilds a run's network at step 0 exactly as
:func:`manualbp.train.run` does; on it:

- :func:`initial_grad_norms`: each layer's weight-gradient norm at step 0 (one forward/backward of the
  initialized network on the whole training split), the vanishing/exploding picture of Glorot & Bengio.
- :func:`saturation`: per hidden layer, the fraction of saturated units at step 0.
- :func:`hessian_lambda_max`: the largest Hessian eigenvalue of the training loss, by power iteration on
  Hessian-vector products computed by double backward through the manual module; gradient descent on a
  quadratic diverges above ``2 / lambda_max`` (LeCun et al., "Efficient BackProp").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from ..hessian import LOSS_MODULES, hvp_operator, stable_rate
from ..nn import MLP
from ..train.config import resolve_config
from ..train.data import Dataset, load_dataset
from ..train.loop import build_model

__all__ = ["LOSSES", "InitialState", "initial_state", "initial_grad_norms", "saturation", "LambdaMax", "hessian_lambda_max"]


#: loss name -> the hand-derived loss module (manualbp.hessian's table, the one the Hessian is taken of)
LOSSES: Mapping[str, Callable[[], torch.nn.Module]] = LOSS_MODULES


@dataclass
class InitialState:
    """The network of a run at step 0, its data and its loss (the name, as the run resolved it)."""

    model: MLP
    data: Dataset
    loss: str


def initial_state(config: Any, dtype: Optional[torch.dtype] = None) -> InitialState:
    """Rebuild the initialized network of the run ``config`` describes: same data split, same weights.

    Mirrors :func:`manualbp.train.run` (data by ``seed``, the constructor under ``fork_rng``, then
    :func:`manualbp.init.initialize` with ``torch.Generator().manual_seed(seed)``), on the CPU.
    ``dtype`` (e.g. float64 for the Hessian) converts the model and the features after the draw.
    """
    cfg = resolve_config(config)
    run_dtype = getattr(torch, cfg["dtype"])
    data = load_dataset(cfg["data"], cfg["seed"], run_dtype, "cpu")
    mc = cfg["model"]
    model = build_model(mc, data.in_features, data.out_features, run_dtype, cfg["init"], cfg["seed"])
    loss = cfg["loss"]
    if loss == "auto":
        loss = "cross_entropy" if data.task == "classification" else "squared_error"
    if dtype is not None:
        model = model.to(dtype)
        data.x_train = data.x_train.to(dtype)
        if data.task == "regression":
            data.y_train = data.y_train.to(dtype)
    return InitialState(model, data, loss)


def initial_grad_norms(model: MLP, input: Tensor, target: Tensor, loss: str = "cross_entropy") -> list[float]:
    """Each layer's weight-gradient norm ||dL/dW^l|| for one forward/backward of ``model`` on the batch.

    Uses the manual module's hand-derived backward; the model's ``.grad`` fields are left untouched.
    """
    weights = [lin.weight for lin in model.linears]
    value = LOSSES[loss]()(model(input), target)
    grads = torch.autograd.grad(value, weights)
    return [float(torch.linalg.vector_norm(g.to(torch.float64))) for g in grads]


def saturation(model: MLP, input: Tensor) -> list[float]:
    """Per hidden layer, the fraction of units (over examples) whose activation derivative is below 1% of its peak.

    sigmoid: a (1 - a) < 0.0025 (|z| > 6); tanh: 1 - a^2 < 0.01 (|z| > 3); relu (and others): a == 0 (no
    gradient passes); see :func:`manualbp.train.metrics.saturated`. Saturated units pass almost no gradient
    back: the picture behind "N(0, 1) saturates".
    """
    from ..train.metrics import saturated

    with torch.no_grad():
        _, hidden = model.forward_with_hidden(input)
    return [float(saturated(name, a, slope).to(torch.float64).mean()) for a, (name, slope) in zip(hidden, model.activation_specs)]


@dataclass
class LambdaMax:
    """Result of :func:`hessian_lambda_max`: the eigenvalue estimate, the loss, and the iteration count."""

    value: float
    loss: float
    iterations: int
    converged: bool

    @property
    def lr_bound(self) -> float:
        """2 / lambda_max: the largest stable step of gradient descent on the local quadratic model."""
        return stable_rate(self.value)


def hessian_lambda_max(
    model: torch.nn.Module,
    input: Tensor,
    target: Tensor,
    loss: str = "cross_entropy",
    iters: int = 200,
    tol: float = 1e-6,
    seed: int = 0,
) -> LambdaMax:
    """Largest Hessian eigenvalue of the mean loss w.r.t. all parameters, by power iteration.

    Each iteration is one Hessian-vector product H v = d/dtheta (grad L . v), computed by double backward
    (``torch.autograd.grad`` with ``create_graph=True``) through the module's own backward; for
    :class:`manualbp.MLP` that differentiates the hand-derived two-pass formulas. The estimate is the
    Rayleigh quotient v^T H v of the unit iterate; iteration stops when it changes by less than
    ``tol`` (relative) or after ``iters`` products. Power iteration finds the eigenvalue of largest
    magnitude; when that one is negative, a second iteration on H - lambda I (shifted) finds the largest.

    Args:
        model: the network (its parameters are the Hessian's variables).
        input, target: the batch the loss is taken over (the whole training split for the LR study).
        loss: "cross_entropy", "squared_error" or "mse" (reduction "mean").
        iters: the most Hessian-vector products.
        tol: relative change of the estimate between iterations that counts as converged.
        seed: seeds the random start vector.

    Example:
        >>> model = manualbp.MLP(4, [5], 3, dtype=torch.float64)
        >>> hessian_lambda_max(model, torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))).value
    """
    # the one Hessian-vector product (double backward through the module) of manualbp.hessian
    matvec, _, value = hvp_operator(model, input, target, loss)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    v = torch.cat([torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device).reshape(-1) for p in params])
    v0 = v / torch.linalg.vector_norm(v)
    estimate, converged, it = _power_iteration(matvec, v0, 0.0, iters, tol)
    if math.isfinite(estimate) and estimate < 0:
        # the dominant eigenvalue is negative: H - estimate I is positive semi-definite with top eigenvalue
        # lambda_max - estimate, so a second, shifted iteration finds the largest (algebraic) eigenvalue
        estimate, converged, more = _power_iteration(matvec, v0, estimate, iters, tol)
        it += more
    return LambdaMax(estimate, value, it, converged)


def _power_iteration(
    matvec: Callable[[Tensor], Tensor], v0: Tensor, shift: float, iters: int, tol: float
) -> tuple[float, bool, int]:
    """Dominant eigenvalue of H - shift I (shift 0: H itself), plus shift, from the unit vector ``v0``;
    whether it converged, and the number of products taken."""
    v, estimate, converged, it = v0, math.nan, False, 0
    for it in range(1, iters + 1):
        hv = matvec(v)
        if shift:
            hv = hv - shift * v
        new = float(torch.dot(hv, v))  # Rayleigh quotient v^T (H - shift) v, |v| = 1
        if not math.isfinite(new):
            break
        if it > 1 and abs(new - estimate) <= tol * abs(new):
            estimate, converged = new, True
            break
        estimate = new
        v = hv.detach() / torch.linalg.vector_norm(hv)
    return estimate + shift, converged, it
