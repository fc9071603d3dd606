"""Gradient equivalence: the hand-derived backward against native autograd and finite differences.

Three checks, each returning a report (one row per quantity, with its largest errors) instead of a bool:

- :func:`compare`: a model and its native twin (``model.to_torch()`` or any ``reference`` module) on the
  same batch: the loss, the output, every parameter gradient and the input gradient.
- :func:`trace`: every intermediate of the two-pass algorithm, named as in the notes (z^l, a^l, o, L,
  dL/dL = 1, dL/do, dL/dW^l, dL/db^l, dL/da^l, dL/dz^l), the manual value from ``manualbp.functional``
  against native autograd's (``retain_grad`` on the twin's intermediates).
- :func:`finite_difference_check`: float64 ``gradcheck`` and ``gradgradcheck`` of a model or function,
  with the largest numerical-versus-analytical difference for each input.

:func:`compare_callables` is the engine of :func:`manualbp.testing.assert_gradients_match`: any pair of
callables, their outputs and the first- and second-order gradients of their inputs (nested in lists, tuples
and dicts, positional or keyword, real or complex).

A row is ``ok`` when every element satisfies ``|actual - expected| <= atol + rtol * |expected|``, the rule of
``torch.testing.assert_close``, with its default tolerances for the dtype unless given. ``max_rel_err`` is
the largest absolute error divided by the reference's largest magnitude; ``exact`` means bit-for-bit equal.

The package, one module per idea, each readable alone; a module imports only from those above it:

- :mod:`~manualbp.verify.reports`: :class:`Row`, :class:`Report` and its kinds, :func:`compare_tensors`,
  tolerances, tables;
- :mod:`~manualbp.verify.references`: the named losses and their native references, parameter matching;
- :mod:`~manualbp.verify.comparison`: :func:`compare` and :func:`compare_callables`;
- :mod:`~manualbp.verify.tracing`: :func:`trace`;
- :mod:`~manualbp.verify.finite_differences`: :func:`finite_difference_check`;
- :mod:`~manualbp.verify.bugs`: :data:`BUGS`, the :data:`CATALOGUE` and :func:`inject_bug`;
- :mod:`~manualbp.verify.mutation`: :func:`mutation_matrix`, every bug against every path (``manualbp verify --bugs``);
- :mod:`~manualbp.verify.matrix`: :func:`verify_matrix` (``manualbp verify``);
- :mod:`~manualbp.verify.explanation`: :func:`explain` (``manualbp explain``);
- :mod:`~manualbp.verify.conformance`: :func:`check_function`, a custom Function's properties;
- :mod:`~manualbp.verify.intermediates`: :func:`record`, your own backprop gradient by gradient.

(``comparison``, ``tracing`` and ``explanation``, not ``compare``, ``trace`` and ``explain``: a submodule named
like the function it holds would be shadowed by it on the package.)
"""

from __future__ import annotations

from .bugs import BUGS, CATALOGUE, PATHS, Bug, inject_bug, python_paths
from .comparison import compare, compare_callables
from .conformance import CHECKS, ConformanceReport, PropertyRow, check_function
from .explanation import ExplainStep, ExplainValue, Explanation, explain
from .finite_differences import FiniteDifferenceReport, FiniteDifferenceRow, finite_difference_check
from .intermediates import IntermediateReport, IntermediateRow, Recorder, assert_intermediates_match, record
from .matrix import DTYPES, LOW_PRECISION_FACTOR, ConfigResult, MatrixResult, available_devices, verify_matrix
from .mutation import MutationResult, mutation_matrix
from .references import LOSSES
from .reports import GradReport, Report, Row, TraceReport, compare_tensors, default_tolerances, format_table
from .tracing import ACTIVATION_DERIVATIVES, trace

# isort: split
# Not in __all__ but importable from the package as before: LossArg, fmt_err, and the private helpers that other
# modules and tests have imported from it (written "x as x", the explicit re-export).
from .comparison import _COTANGENT_SEED as _COTANGENT_SEED
from .comparison import _as_tensor_list as _as_tensor_list
from .comparison import _delayed_error as _delayed_error
from .comparison import _first_line as _first_line
from .comparison import _input_names as _input_names
from .comparison import _vjp as _vjp
from .finite_differences import _analytical_jacobians as _analytical_jacobians
from .finite_differences import _numerical_jacobian as _numerical_jacobian
from .references import LossArg as LossArg
from .references import _native_cross_entropy as _native_cross_entropy
from .references import _native_squared_error as _native_squared_error
from .reports import _json_float as _json_float
from .reports import fmt_err as fmt_err

__all__ = [
    "ACTIVATION_DERIVATIVES",
    "ConfigResult",
    "DTYPES",
    "Explanation",
    "ExplainStep",
    "ExplainValue",
    "FiniteDifferenceRow",
    "LOW_PRECISION_FACTOR",
    "MatrixResult",
    "available_devices",
    "explain",
    "verify_matrix",
    "LOSSES",
    "Row",
    "Report",
    "GradReport",
    "TraceReport",
    "FiniteDifferenceReport",
    "compare",
    "compare_callables",
    "compare_tensors",
    "default_tolerances",
    "finite_difference_check",
    "format_table",
    "inject_bug",
    "BUGS",
    "Bug",
    "CATALOGUE",
    "PATHS",
    "MutationResult",
    "mutation_matrix",
    "python_paths",
    "trace",
    "CHECKS",
    "ConformanceReport",
    "PropertyRow",
    "check_function",
    "IntermediateReport",
    "IntermediateRow",
    "Recorder",
    "assert_intermediates_match",
    "record",
]
