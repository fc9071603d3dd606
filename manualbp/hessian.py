"""The training loss's Hessian, through double backward of the hand-derived backward: products and sharpness.

``sharpness`` is the largest eigenvalue of the Hessian of the mean training loss with respect to all
parameters (Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability",
ICLR 2021). Gradient descent with rate eta is stable on the local quadratic model only while
sharpness < 2 / eta.

- :func:`hvp_operator`: v -> H v, one Hessian-vector product per call, d/dtheta (grad L . v) by
  ``torch.autograd.grad`` of the gradient (``create_graph=True``). For :class:`manualbp.MLP` and its losses that
  differentiates the hand-derived two-pass formulas (``MLPFunction``'s and the loss Functions' backward).
- :func:`lanczos`: the top-k eigenvalues of a symmetric operator by the Lanczos iteration with full
  reorthogonalization (what ``scipy.sparse.linalg.eigsh`` runs, and Cohen et al. use), stopping when each
  Ritz value's residual bound |beta_j s_j| is below ``tol`` x |theta|.
- :func:`sharpness`: both, on a model and a batch (float64 copy by default), timed.

The training loop records it every ``metrics.sharpness.every`` epochs when ``metrics: sharpness`` is on (see
``manualbp.train.metrics``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from .nn import make_loss
from .registry import LOSS_REGISTRY, View

__all__ = ["LOSS_MODULES", "Sharpness", "hvp_operator", "lanczos", "sharpness", "stable_rate"]

#: loss name -> the hand-derived loss module (reduction "mean") whose Hessian is taken: every registered loss
#: (a live view of ``manualbp.registry``).
LOSS_MODULES: Mapping[str, Callable[[], torch.nn.Module]] = View(LOSS_REGISTRY, lambda spec: partial(make_loss, spec.name))


def hvp_operator(
    model: torch.nn.Module, input: Tensor, target: Tensor, loss: str = "cross_entropy"
) -> tuple[Callable[[Tensor], Tensor], int, float]:
    """``(matvec, n, loss value)``: ``matvec(v)`` is H v for a flat vector ``v`` of the ``n`` parameters that
    require grad (in ``model.parameters()`` order), H the Hessian of the mean loss on ``(input, target)``."""
    if loss not in LOSS_MODULES:
        raise ValueError(f"loss must be one of {', '.join(LOSS_MODULES)}, got {loss!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: no parameter requires grad, so the Hessian has no variables")
    value = LOSS_MODULES[loss]()(model(input), target)
    grads = torch.autograd.grad(value, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])

    def matvec(v: Tensor) -> Tensor:
        hv = torch.autograd.grad(flat, params, grad_outputs=v, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv])

    return matvec, flat.numel(), float(value.detach())


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    n: int,
    k: int = 1,
    iters: int = 40,
    tol: float = 1e-8,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: Optional[torch.device] = None,
) -> tuple[list[float], int, bool]:
    """The ``k`` largest eigenvalues of the symmetric ``n x n`` operator ``matvec`` (descending), the number
    of products used, and whether every one converged (residual bound <= ``tol`` x |eigenvalue|)."""
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the operator's size {n}, got {k}")
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    basis = [q / torch.linalg.vector_norm(q)]
    alphas: list[float] = []
    betas: list[float] = []
    top: list[float] = []
    for j in range(min(iters, n)):
        w = matvec(basis[j])
        alphas.append(float(torch.dot(w, basis[j])))
        Q = torch.stack(basis)
        for _ in range(2):  # full reorthogonalization, twice ("twice is enough")
            w = w - Q.T @ (Q @ w)
        beta = float(torch.linalg.vector_norm(w))
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        top = theta.flip(0)[:k].tolist()
        residual = (beta * S[-1, :].abs()).flip(0)[:k]
        converged = len(top) == k and bool((residual <= tol * theta.flip(0)[:k].abs().clamp_min(1e-300)).all())
        if converged or beta <= 1e-12 * max(1.0, max(abs(a) for a in alphas)):
            return top, j + 1, converged or len(top) == k  # an invariant subspace: the Ritz values are exact
        betas.append(beta)
        basis.append(w / beta)
    return top, len(alphas), False


@dataclass
class Sharpness:
    """Result of :func:`sharpness`: the top eigenvalues (descending), the loss, the cost."""

    eigenvalues: list[float]
    loss: float
    iterations: int
    converged: bool
    seconds: float

    @property
    def value(self) -> float:
        return self.eigenvalues[0]

    @property
    def lr_bound(self) -> float:
        return stable_rate(self.value)


def stable_rate(lambda_max: float) -> float:
    """2 / lambda_max: the largest stable rate of gradient descent on the local quadratic model (inf when the
    curvature is not positive)."""
    return 2.0 / lambda_max if lambda_max > 0 else math.inf


def sharpness(
    model: torch.nn.Module,
    input: Tensor,
    target: Tensor,
    loss: str = "cross_entropy",
    k: int = 1,
    iters: int = 40,
    tol: float = 1e-8,
    seed: int = 0,
    dtype: Optional[torch.dtype] = torch.float64,
) -> Sharpness:
    """The top-``k`` Hessian eigenvalues of the mean loss of ``model`` on ``(input, target)``.

    Args:
        model: the network; with ``dtype`` set, a copy in that dtype is used (the model is left alone).
        input, target: the batch (the whole training split, or a fixed subset of it).
        loss: "cross_entropy", "squared_error" or "mse".
        k, iters, tol, seed: of :func:`lanczos` (its products are Hessian-vector products).
        dtype: the precision of the computation (default float64); None uses the model's own.

    Example:
        >>> model = manualbp.MLP(4, [5], 3, dtype=torch.float64)
        >>> sharpness(model, torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))).value
    """
    start = time.perf_counter()
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
        input = input.to(dtype)
        target = target.to(dtype) if target.is_floating_point() else target
    with torch.enable_grad():
        matvec, n, value = hvp_operator(model, input, target, loss)
        p = next(model.parameters())
        eigs, used, converged = lanczos(matvec, n, k, iters, tol, seed, p.dtype, p.device)
    return Sharpness(eigs, value, used, converged, time.perf_counter() - start)
