"""Assertions for test suites: check a custom ``autograd.Function`` (or any callable) against a reference.

Example:
    >>> import torch
    >>> from manualbp.testing import assert_gradients_match
    >>> x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    >>> assert_gradients_match(MySigmoid.apply, torch.sigmoid, x)  # doctest: +SKIP

The pytest plugin (``manualbp.pytest_plugin``, loaded automatically once manualbp is installed) gives the
same helper to tests through its ``manualbp_verify`` fixture.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from .verify import GradReport, compare_callables

__all__ = ["assert_gradients_match"]


def assert_gradients_match(
    fn: Callable[..., Any],
    reference_fn: Callable[..., Any],
    *inputs: Any,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    seed: int = 0,
) -> GradReport:
    """Assert that ``fn`` and ``reference_fn`` agree forward and backward on ``inputs``.

    Both run on their own copies of the inputs; compared are every output and the gradient of every
    floating input that requires grad, after a backward from the same seeded random cotangent. Each element
    must satisfy ``|actual - expected| <= atol + rtol * |expected|``.

    Args:
        fn: the callable under test (for example ``MyFunction.apply``).
        reference_fn: the reference (for example the same math in native PyTorch ops).
        inputs: positional arguments for both; non-tensors are passed through.
        rtol, atol: tolerances; default ``torch.testing.assert_close``'s for the outputs' dtype
            (float64: 1e-7, 1e-7; float32: 1.3e-6, 1e-5; bfloat16: 1.6e-2, 1e-5; float16: 1e-3, 1e-5).
        seed: seeds the random cotangents.

    Returns:
        The :class:`~manualbp.verify.GradReport`, when everything matches.

    Raises:
        AssertionError: with a table of the quantities that differ (name, shape, largest errors).
    """
    __tracebackhide__ = True  # pytest: a failing test shows this message, not this function's source
    report = compare_callables(fn, reference_fn, *inputs, rtol=rtol, atol=atol, seed=seed)
    if not report.ok:
        failures = report.failures()
        raise AssertionError(
            f"gradients do not match: {len(failures)} of {len(report.rows)} quantities differ "
            f"({report.title}, rtol={report.rtol:g}, atol={report.atol:g})\n{report.table(failures)}"
        )
    return report
