"""Training: data sets, learning-rate schedules, stopping rules, backends, and the loop that ties them.

Entry point: :func:`run` (``manualbp.train.run(config) -> RunResult``); :func:`lr_find` runs a
learning-rate range test on the same config (``manualbp.train.lr_find(config) -> LRFinderResult``). The pieces are usable alone:
:func:`~manualbp.train.data.load_dataset`, :func:`~manualbp.train.schedules.build_schedule`,
:func:`~manualbp.train.stopping.build_stopping`, :data:`~manualbp.train.backends.BACKENDS` /
:func:`~manualbp.train.backends.register_backend`, :func:`~manualbp.train.sinks.build_sink`.
"""

from .backends import BACKENDS, register_backend
from .config import DEFAULTS, resolve_config
from .data import Dataset, load_dataset
from .loop import RunResult, evaluate, run
from .lr_finder import LRFinderResult, lr_find
from .schedules import build_schedule
from .sinks import build_sink
from .stopping import StopContext, build_stopping

__all__ = [
    "run",
    "RunResult",
    "DEFAULTS",
    "resolve_config",
    "Dataset",
    "load_dataset",
    "build_schedule",
    "build_stopping",
    "StopContext",
    "BACKENDS",
    "register_backend",
    "build_sink",
    "evaluate",
    "lr_find",
    "LRFinderResult",
]
