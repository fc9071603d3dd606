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
from .verify.conformance import ConformanceReport, check_function

__all__ = ["assert_function_conforms", "assert_gradients_match"]


def assert_gradients_match(
    fn: Callable[..., Any],
    reference_fn: Callable[..., Any],
    /,
    *inputs: Any,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    seed: int = 0,
    order: int = 2,
    **kwargs: Any,
) -> GradReport:
    """Assert that ``fn`` and ``reference_fn`` agree forward and backward, to second order, on the inputs.

    Both run on their own copies of the inputs; compared are every output, the gradient of every floating
    or complex input tensor that requires grad (inside lists, tuples and dicts too) after a backward from
    the same seeded random cotangent, and (``order=2``) the gradient of those gradients in a random
    direction, through the double backward. Each element must satisfy
    ``|actual - expected| <= atol + rtol * |expected|``. See :func:`manualbp.verify.compare_callables`.

    Args:
        fn: the callable under test (for example ``MyFunction.apply``).
        reference_fn: the reference (for example the same math in native PyTorch ops).
        inputs, kwargs: positional and keyword arguments for both; non-tensors are passed through.
            ``rtol``, ``atol``, ``seed`` and ``order`` are this function's own keywords.
        rtol, atol: tolerances; default ``torch.testing.assert_close``'s for the outputs' dtype
            (float64: 1e-7, 1e-7; float32: 1.3e-6, 1e-5; bfloat16: 1.6e-2, 1e-5; float16: 1e-3, 1e-5;
            complex dtypes those of their real dtype).
        seed: seeds the random cotangents and second-order directions.
        order: 2 (default) also checks the double backward (rows ``grad^2 NAME``); 1 first order only
            (for an ``fn`` whose backward is not meant to be differentiated).

    Returns:
        The :class:`~manualbp.verify.GradReport`, when everything matches.

    Raises:
        AssertionError: with a table of the quantities that differ (name, shape, largest errors) and, for
            each, as ``torch.testing.assert_close`` puts it, the number of mismatched elements and the
            worst element's index, both values there and the tolerance; or the two shapes where they differ.
        ValueError: no input requires grad (nothing would be compared), or a bad ``order``.
        TypeError: ``fn`` or ``reference_fn`` is not callable or does not return tensors.
    """
    __tracebackhide__ = True  # pytest: a failing test shows this message, not this function's source
    report = compare_callables(fn, reference_fn, *inputs, rtol=rtol, atol=atol, seed=seed, order=order, **kwargs)
    if not report.ok:
        failures = report.failures()
        details = "\n".join(r.describe() for r in failures)
        raise AssertionError(
            f"gradients do not match: {len(failures)} of {len(report.rows)} quantities differ "
            f"({report.title}, rtol={report.rtol:g}, atol={report.atol:g})\n{report.table(failures)}\n\n{details}"
        )
    return report


def assert_function_conforms(fn: Any, /, *sample_inputs: Any, **options: Any) -> ConformanceReport:
    """Assert that a custom autograd.Function passes every conformance property on these inputs.

    See :func:`manualbp.verify.check_function` for the properties and ``options`` (``reference=``,
    ``checks=``, ``skip=``, ``batched=``, ``compile_backend=``, ``seed=``).

    Returns:
        The :class:`~manualbp.verify.ConformanceReport`, when no property fails (skips are allowed).

    Raises:
        AssertionError: with the report's table and, for each failing property, the hint how to fix it.
    """
    __tracebackhide__ = True
    return check_function(fn, *sample_inputs, **options).raise_if_failed()
