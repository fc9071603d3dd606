"""The results studies: quantities the sweeps do not record, and the tables and figures of ``docs/results.md``.

Five studies reproduce classic findings (see ``docs/results.md``); each is a preset in ``conf/experiment/``
run with ``python experiments/train.py -m experiment=NAME``, and ``scripts/results.py`` turns the sweeps'
output directories into the document with :func:`write_results`. Nothing here trains: it reads
``metrics.json``/``history.csv`` (through :func:`manualbp.report.collect_jobs`) and, where a study needs the
network at initialization, rebuilds it exactly as :func:`manualbp.train.run` does (:func:`initial_state`).

What is where (imports flow up this list; the four at the bottom import none of the others):

- ``init_sections``, ``lr_sections``, ``stopping_sections``, ``batch_sections``, ``baseline_sections``,
  ``dynamics``: one ``*_section`` builder per study (the table, the figure and the markdown of each), with the
  helpers only that study uses (``dynamics``: the edge-of-stability and saturation studies; also importable as
  :mod:`manualbp.dynamics`).
- ``measure``: the measurements at initialization, :func:`initial_state`, :func:`initial_grad_norms`,
  :func:`saturation` and :func:`hessian_lambda_max` (no plotting, no markdown).
- ``sweeps``: :func:`load_sweep`, the per-job helpers (:func:`override`, :func:`epochs_to`, ``_lr``,
  ``_batch``, ``_finite``) and the sweep's times (:func:`sweep_runtime`, :func:`sweep_wall_time`).
- ``document``: :class:`Section`, :class:`Study`, the cell formatting ``_f`` and value ordering ``_ordered``,
  :func:`read_sections` and :func:`write_results`.
- ``figures``: ``_plt`` (matplotlib on Agg) and ``_save``.

Every name is re-exported here, so ``manualbp.studies.X`` keeps working for the scripts and the tests.
A name is looked up in the module that defines it: to patch one for a section builder, patch it there
(e.g. ``manualbp.studies.init_sections.initial_state``), not here.
"""

from __future__ import annotations

# re-exports (hence noqa F401): every name the scripts and tests reach as manualbp.studies.X
from .baseline_sections import baseline_section  # noqa: F401
from .batch_sections import batch_section  # noqa: F401
from .document import STUDIES, Section, Study, _f, _ordered, read_sections, write_results  # noqa: F401
from .figures import _plt, _save  # noqa: F401
from .init_sections import INIT_LABELS, depth_section, init_section  # noqa: F401
from .lr_sections import _unstable, lr_section  # noqa: F401
from .measure import LOSSES, InitialState, LambdaMax, hessian_lambda_max, initial_grad_norms, initial_state, saturation  # noqa: F401
from .stopping_sections import (  # noqa: F401
    FIRING_RULES,
    PRECHELT_NAMES,
    RULE_ORDER,
    SEED_HEADER,
    CriterionStats,
    _criteria_table,
    _ends_at_best,
    _mean,
    _min_val,
    _rule_order,
    _seed_rows,
    _stopping_figure,
    _tradeoff_figure,
    criterion_stats,
    rule_label,
    stopping_section,
)
from .sweeps import _batch, _finite, _lr, epochs_to, load_sweep, override, sweep_runtime, sweep_wall_time  # noqa: F401

__all__ = [
    "InitialState",
    "LambdaMax",
    "initial_state",
    "initial_grad_norms",
    "saturation",
    "hessian_lambda_max",
    "STUDIES",
    "write_results",
]
