"""Kept for ``from manualbp import dynamics``: the training-dynamics studies now live in :mod:`manualbp.studies.dynamics`.

Re-exports that module's names (public, and the private helpers ``scripts/results.py`` reads). A name is looked up
in :mod:`manualbp.studies.dynamics`: patch it there.
"""

from __future__ import annotations

from .studies.dynamics import (  # noqa: F401
    EosRun,
    Window,
    __all__,
    _eos_row,
    _init_label,
    _layers,
    _lr,
    _mean,
    _num,
    _series,
    eos_digits_section,
    eos_runs,
    eos_section,
    saturation_runs,
    saturation_section,
    window,
)
