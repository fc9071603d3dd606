"""Deliberate bugs, to show (and test) that the checks catch them.

:data:`BUGS` names them; :func:`inject_bug` breaks one formula of ``manualbp.functional`` inside a ``with``
block (patching the module's attributes, so that every path built on the formulas sees it) and restores it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional
from unittest import mock

from torch import Tensor

from .. import functional as F

__all__ = ["BUGS", "inject_bug"]

#: name -> what the injected bug does to the hand-derived backward.
BUGS = {
    "sigmoid_missing_derivative": "sigmoid's backward returns dL/da, missing its a (1 - a) factor",
    "weight_grad_transposed": "dL/dW is computed transposed, (dL/dz)^T a_prev -> (a_prev^T dL/dz) reshaped to (out, in)",
}


@contextlib.contextmanager
def inject_bug(name: Optional[str]) -> Iterator[None]:
    """Temporarily break one formula of ``manualbp.functional`` (a testing hook; ``None`` does nothing).

    Everything built on the formulas (``MLPFunction``, the per-op Functions, :func:`trace`) sees the bug
    inside the ``with`` block; the formula is restored on exit. Names: see :data:`BUGS`. Inside the block
    ``MANUALBP_NATIVE=off``: the compiled twins of ``MLPFunction`` and ``CrossEntropyFunction``
    (``manualbp/csrc/module.cpp``) repeat the formulas' kernels and would not see a patched formula.
    """
    if name is None:
        yield
        return
    if name not in BUGS:
        raise ValueError(f"bug must be one of {', '.join(map(repr, BUGS))}, got {name!r}")
    with mock.patch.dict(os.environ, {"MANUALBP_NATIVE": "off"}):
        with _inject_bug(name):
            yield


@contextlib.contextmanager
def _inject_bug(name: str) -> Iterator[None]:
    if name == "sigmoid_missing_derivative":
        saved = F.ACTIVATIONS["sigmoid"]

        def sigmoid_backward_without_derivative(grad_output: Tensor, output: Tensor) -> Tensor:
            return grad_output  # BUG: the a (1 - a) factor is missing

        F.ACTIVATIONS["sigmoid"] = (saved[0], sigmoid_backward_without_derivative)
        try:
            yield
        finally:
            F.ACTIVATIONS["sigmoid"] = saved
        return
    original = F.linear_backward

    def linear_backward_transposed(grad_output: Tensor, input: Tensor, weight: Tensor, **kwargs: bool):
        grad_input, grad_weight, grad_bias = original(grad_output, input, weight, **kwargs)
        if grad_weight is not None:
            grad_weight = grad_weight.T.reshape(grad_weight.shape)  # BUG: a_prev^T dL/dz, forced into (out, in)
        return grad_input, grad_weight, grad_bias

    F.linear_backward = linear_backward_transposed  # type: ignore[assignment]
    try:
        yield
    finally:
        F.linear_backward = original  # type: ignore[assignment]
