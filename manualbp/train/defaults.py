"""The default run configuration and the number checks every config group uses.

This module imports nothing of ``manualbp.train``: the group modules (data, schedules, stopping, backends,
metrics, sinks) read their defaults and checks here, and :mod:`manualbp.train.config` (which merges and
validates a whole config) imports them, so data flows one way.
"""

from __future__ import annotations

import math
from typing import Any

from ..registry import loss_names

__all__ = ["DEFAULTS", "DTYPES", "is_number", "loss_choices", "positive_int"]

#: The whole configuration tree with its defaults. ``run({})`` trains this.
DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",
    "dtype": "float32",
    "progress": True,
    "output_dir": None,
    "checkpoint_every_s": 10.0,
    "data": {
        "name": "digits",
        "path": None,
        "target": None,
        "val_fraction": 0.1,
        "test_fraction": 0.2,
    },
    "model": {"hidden": [64], "activation": "sigmoid", "bias": True},
    "loss": "auto",
    "init": {"name": "xavier_uniform"},
    "optim": {"name": "sgd", "lr": 0.1, "batch_size": 32, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0},
    "lr_schedule": {"name": "constant"},
    "stopping": {
        "max_epochs": 100,
        "early_stopping": {"patience": 10, "min_delta": 0.0, "monitor": "val_loss", "restore_best": True},
    },
    "backend": "manual",
    "logger": {"name": "none"},
    "metrics": {"sharpness": None, "activations": None},
}



def loss_choices() -> tuple[str, ...]:
    """What ``loss:`` may be: ``auto`` (by the data set's task) or any registered loss (``manualbp.registry``)."""
    return ("auto", *loss_names())


DTYPES = ("float32", "float64", "bfloat16", "float16")


def is_number(value: object) -> bool:
    """A real, finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(value: object, where: str, allow_none: bool = False) -> None:
    """Raise ValueError naming ``where`` unless ``value`` is an int > 0 (or None, with ``allow_none``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where} must be a positive integer, got {value!r}")
