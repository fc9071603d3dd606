"""Optional per-run measurements beyond loss and accuracy: the ``metrics`` config.

``metrics.sharpness`` (off: null) records the top Hessian eigenvalue(s) of the training loss (see
:mod:`manualbp.hessian`) every ``every`` epochs (with ``optim.batch_size: full`` an epoch is one step), on
the training split or a fixed random ``subset`` of it, into the history (``sharpness``, ``sharpness_2`` ...
for ``top_k`` > 1, ``sharpness_s`` its cost in seconds, not counted in ``wall_time_s``), W&B, and the
run's metrics (``sharpness_init`` before the first step, ``sharpness_final`` at the last measurement).

====================  =========  ==============================================================
key                   default    meaning
====================  =========  ==============================================================
every                 1          epochs between measurements
subset                null       examples of the training split used (seeded); null: all of them
top_k                 1          how many of the largest eigenvalues
iters                 40         most Lanczos steps (Hessian-vector products) per measurement
tol                   1e-6       relative residual at which an eigenvalue counts as converged
dtype                 float64    precision of the measurement (a copy of the model), or "run"
====================  =========  ==============================================================
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from .config import _positive_int, is_number

__all__ = ["SHARPNESS_DEFAULTS", "SharpnessTracker", "check_metrics_cfg"]

SHARPNESS_DEFAULTS: dict[str, Any] = {"every": 1, "subset": None, "top_k": 1, "iters": 40, "tol": 1e-6, "dtype": "float64"}


def check_metrics_cfg(cfg: object) -> dict[str, Any]:
    """Validate a ``metrics`` config; returns it with the defaults of each measurement that is on."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"metrics must be a mapping, got {type(cfg).__name__}")
    for key in cfg:
        if key != "sharpness":
            raise ValueError(f"unknown config key 'metrics.{key}'; known keys: sharpness")
    value = cfg.get("sharpness")
    if value is None or value is False:
        return {"sharpness": None}
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        raise TypeError(f"metrics.sharpness must be a mapping of its parameters, true, or null, got {value!r}")
    for key in value:
        if key not in SHARPNESS_DEFAULTS:
            raise ValueError(f"unknown config key 'metrics.sharpness.{key}'; known keys: {', '.join(SHARPNESS_DEFAULTS)}")
    params = {**SHARPNESS_DEFAULTS, **value}
    for key in ("every", "top_k", "iters"):
        _positive_int(params[key], f"metrics.sharpness.{key}")
    _positive_int(params["subset"], "metrics.sharpness.subset (or null)", allow_none=True)
    if not (is_number(params["tol"]) and 0 < params["tol"] < 1):
        raise ValueError(f"metrics.sharpness.tol must be a number in (0, 1), got {params['tol']!r}")
    if params["dtype"] not in ("float64", "float32", "run"):
        raise ValueError(f"metrics.sharpness.dtype must be 'float64', 'float32' or 'run', got {params['dtype']!r}")
    return {"sharpness": params}


class SharpnessTracker:
    """The sharpness measurements of one run (a no-op when ``metrics.sharpness`` is off)."""

    def __init__(self, cfg: Mapping[str, Any], loss: str, x: Tensor, y: Tensor, seed: int) -> None:
        self.params: Optional[dict[str, Any]] = check_metrics_cfg(cfg)["sharpness"]
        self.loss = loss
        self.initial: Optional[float] = None
        self.last: Optional[float] = None
        if self.params is not None and self.params["subset"] is not None and self.params["subset"] < x.shape[0]:
            gen = torch.Generator().manual_seed(seed + 7)
            rows = torch.randperm(x.shape[0], generator=gen)[: self.params["subset"]].to(x.device)
            x, y = x.index_select(0, rows), y.index_select(0, rows)
        self.x, self.y = x, y

    @property
    def on(self) -> bool:
        return self.params is not None

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        """The history entries of one measurement: sharpness (, sharpness_2, ...), sharpness_s."""
        from ..hessian import sharpness

        assert self.params is not None
        dtype = None if self.params["dtype"] == "run" else getattr(torch, self.params["dtype"])
        p = self.params
        result = sharpness(model, self.x, self.y, self.loss, p["top_k"], p["iters"], p["tol"], dtype=dtype)
        record = {"sharpness" if k == 0 else f"sharpness_{k + 1}": v for k, v in enumerate(result.eigenvalues)}
        record["sharpness_s"] = result.seconds
        self.last = result.value
        return record

    def at_start(self, model: torch.nn.Module) -> None:
        """Before the first step (not on a resumed run): ``sharpness_init``."""
        if self.on and self.initial is None:
            self.initial = self.measure(model)["sharpness"]

    def after_epoch(self, epoch: int, model: torch.nn.Module) -> dict[str, float]:
        if not self.on or epoch % self.params["every"] != 0:  # type: ignore[index]
            return {}
        return self.measure(model)

    def summary(self) -> dict[str, Optional[float]]:
        return {"sharpness_init": self.initial, "sharpness_final": self.last} if self.on else {}

    def state_dict(self) -> dict[str, Optional[float]]:
        return {"initial": self.initial, "last": self.last}

    def load_state_dict(self, state: Mapping[str, Optional[float]]) -> None:
        self.initial, self.last = state.get("initial"), state.get("last")
