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

``metrics.activations`` (off: null) records, per hidden layer l, the mean and the ``percentiles`` (default
2nd and 98th) of the activations a^l over a fixed batch of ``examples`` validation examples (training ones
when there is no validation split), and the fraction of saturated units (:func:`saturated`), every ``every``
epochs: ``act_mean_l``, ``act_p2_l``, ``act_p98_l``, ``saturated_l`` (Glorot & Bengio 2010, Figure 2); the
run's metrics get the same at initialization as ``*_init``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ..registry import ACTIVATION_REGISTRY
from .defaults import is_number
from .defaults import positive_int as _positive_int

__all__ = [
    "ACTIVATIONS_DEFAULTS",
    "ActivationTracker",
    "Measurements",
    "SHARPNESS_DEFAULTS",
    "SharpnessTracker",
    "check_metrics_cfg",
    "saturated",
]

SHARPNESS_DEFAULTS: dict[str, Any] = {"every": 1, "subset": None, "top_k": 1, "iters": 40, "tol": 1e-6, "dtype": "float64"}
ACTIVATIONS_DEFAULTS: dict[str, Any] = {"every": 1, "examples": 300, "percentiles": [2, 98]}
_MEASUREMENTS = {"sharpness": SHARPNESS_DEFAULTS, "activations": ACTIVATIONS_DEFAULTS}


def _params(cfg: Mapping[str, Any], name: str) -> Optional[dict[str, Any]]:
    """One measurement's parameters with its defaults (None when off); unknown keys are errors."""
    value = cfg.get(name)
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        raise TypeError(f"metrics.{name} must be a mapping of its parameters, true, or null, got {value!r}")
    defaults = _MEASUREMENTS[name]
    for key in value:
        if key not in defaults:
            raise ValueError(f"unknown config key 'metrics.{name}.{key}'; known keys: {', '.join(defaults)}")
    return {**defaults, **value}


def check_metrics_cfg(cfg: object) -> dict[str, Any]:
    """Validate a ``metrics`` config; returns {measurement: parameters with defaults, or None when off}."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"metrics must be a mapping, got {type(cfg).__name__}")
    for key in cfg:
        if key not in _MEASUREMENTS:
            raise ValueError(f"unknown config key 'metrics.{key}'; known keys: {', '.join(_MEASUREMENTS)}")
    out = {name: _params(cfg, name) for name in _MEASUREMENTS}
    sharp, acts = out["sharpness"], out["activations"]
    if sharp is not None:
        for key in ("every", "top_k", "iters"):
            _positive_int(sharp[key], f"metrics.sharpness.{key}")
        _positive_int(sharp["subset"], "metrics.sharpness.subset (or null)", allow_none=True)
        if not (is_number(sharp["tol"]) and 0 < sharp["tol"] < 1):
            raise ValueError(f"metrics.sharpness.tol must be a number in (0, 1), got {sharp['tol']!r}")
        if sharp["dtype"] not in ("float64", "float32", "run"):
            raise ValueError(f"metrics.sharpness.dtype must be 'float64', 'float32' or 'run', got {sharp['dtype']!r}")
    if acts is not None:
        for key in ("every", "examples"):
            _positive_int(acts[key], f"metrics.activations.{key}")
        pct = acts["percentiles"]
        if not isinstance(pct, (list, tuple)) or not all(is_number(q) and 0 <= q <= 100 for q in pct):
            raise ValueError(f"metrics.activations.percentiles must be a list of numbers in [0, 100], got {pct!r}")
    return out


def saturated(activation: str, a: Tensor, negative_slope: float = 0.01) -> Tensor:
    """Where a unit is saturated: its activation derivative sigma', from its output a (the registry's backward),
    is at most 1% of the derivative's peak (sigmoid: a (1 - a) <= 0.0025, i.e. |z| >= 6; tanh: 1 - a^2 <= 0.01,
    |z| >= 3; relu: a <= 0; leaky_relu with the default slope 0.01: a <= 0, the leak only); identity never."""
    spec = ACTIVATION_REGISTRY[activation]
    derivative = spec.backward(torch.ones_like(a), a, negative_slope)  # sigma'(z) read from a
    return derivative <= 0.01 * _derivative_peak(spec, negative_slope)


@functools.lru_cache(maxsize=64)
def _derivative_peak(spec: Any, negative_slope: float) -> float:
    """max over z in [-20, 20] of sigma'(z) (0.25 for sigmoid, 1 for tanh and relu), from the spec's formulas."""
    z = torch.linspace(-20, 20, 4001, dtype=torch.float64)  # z = 0 is on the grid
    return float(spec.backward(torch.ones_like(z), spec.forward(z, negative_slope), negative_slope).max())


class ActivationTracker:
    """Per-layer activation statistics on a fixed batch (a no-op when ``metrics.activations`` is off)."""

    def __init__(self, params: Optional[dict[str, Any]], x: Tensor) -> None:
        self.params = params  # metrics.activations with its defaults (check_metrics_cfg), or None: off
        self.x = x[: self.params["examples"]] if self.params is not None else x
        self.initial: dict[str, float] = {}
        self._keys: Optional[list[str]] = None

    @property
    def on(self) -> bool:
        return self.params is not None

    def measure(self, model: Any) -> dict[str, float]:
        assert self.params is not None
        pct = self.params["percentiles"]
        q = torch.tensor([p / 100 for p in pct], dtype=torch.float64)
        record: dict[str, float] = {}
        with torch.no_grad():
            _, hidden = model.forward_with_hidden(self.x)
        for layer, (a, (name, slope)) in enumerate(zip(hidden, model.activation_specs), 1):
            a = a.to(torch.float64)
            record[f"act_mean_{layer}"] = float(a.mean())
            for p, v in zip(pct, torch.quantile(a.reshape(-1), q).tolist()):
                record[f"act_p{p:g}_{layer}"] = v
            record[f"saturated_{layer}"] = float(saturated(name, a, slope).to(torch.float64).mean())
        self._keys = list(record)
        return record

    def at_start(self, model: Any) -> None:
        if self.params is not None and not self.initial:
            self.initial = self.measure(model)

    def after_epoch(self, epoch: int, model: Any) -> dict[str, Optional[float]]:
        if self.params is None:
            return {}
        if epoch % self.params["every"] == 0 or self._keys is None:
            record = self.measure(model)
            return record if epoch % self.params["every"] == 0 else dict.fromkeys(record)
        return dict.fromkeys(self._keys)  # the same columns in every row

    def summary(self) -> dict[str, float]:
        return {f"{k}_init": v for k, v in self.initial.items()}

    def state_dict(self) -> dict[str, float]:
        return dict(self.initial)

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.initial = dict(state)


class SharpnessTracker:
    """The sharpness measurements of one run (a no-op when ``metrics.sharpness`` is off)."""

    def __init__(self, params: Optional[dict[str, Any]], loss: str, x: Tensor, y: Tensor, seed: int) -> None:
        self.params = params  # metrics.sharpness with its defaults (check_metrics_cfg), or None: off
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

    def after_epoch(self, epoch: int, model: torch.nn.Module) -> dict[str, Optional[float]]:
        """The history entries after ``epoch``: measured every ``every`` epochs, None in between (the same
        columns in every row, so ``history.csv`` grows by appending)."""
        if not self.on:
            return {}
        assert self.params is not None
        if epoch % self.params["every"] != 0:
            keys = ["sharpness", *(f"sharpness_{k}" for k in range(2, self.params["top_k"] + 1)), "sharpness_s"]
            return dict.fromkeys(keys)
        return self.measure(model)

    def summary(self) -> dict[str, Optional[float]]:
        return {"sharpness_init": self.initial, "sharpness_final": self.last} if self.on else {}

    def state_dict(self) -> dict[str, Optional[float]]:
        return {"initial": self.initial, "last": self.last}

    def load_state_dict(self, state: Mapping[str, Optional[float]]) -> None:
        self.initial, self.last = state.get("initial"), state.get("last")


class Measurements:
    """Every ``metrics`` measurement of one run, as the training loop drives them: before the first step,
    after each epoch (history entries), at the end (``metrics.json`` entries), and in the checkpoint."""

    def __init__(self, cfg: Mapping[str, Any], loss: str, data: Any, seed: int) -> None:
        params = check_metrics_cfg(cfg)  # once: each tracker takes its own part, defaults filled in
        self.sharpness = SharpnessTracker(params["sharpness"], loss, data.x_train, data.y_train, seed)
        self.activations = ActivationTracker(params["activations"], data.x_val if data.n_val else data.x_train)

    @property
    def on(self) -> bool:
        return self.sharpness.on or self.activations.on

    def at_start(self, backend: Any) -> None:
        """Before the first step. ``backend.model`` is read only when a measurement is on (for the autograd
        backend reading it copies the native net's weights into the manual module)."""
        if self.on:
            model = backend.model
            self.sharpness.at_start(model)
            self.activations.at_start(model)

    def after_epoch(self, epoch: int, backend: Any) -> dict[str, Optional[float]]:
        if not self.on:
            return {}
        model = backend.model
        return {**self.sharpness.after_epoch(epoch, model), **self.activations.after_epoch(epoch, model)}

    def summary(self) -> dict[str, Optional[float]]:
        return {**self.sharpness.summary(), **self.activations.summary()}

    def state_dict(self) -> dict[str, Any]:
        return {"sharpness": self.sharpness.state_dict(), "activations": self.activations.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sharpness.load_state_dict(state.get("sharpness", {}))
        self.activations.load_state_dict(state.get("activations", {}))
