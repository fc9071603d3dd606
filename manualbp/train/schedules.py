"""Learning-rate schedules: the notes' eta as a function of training time.

The loop asks ``schedule.lr(step, epoch)`` before every step and sets it on the backend
(``backend.set_lr``); the learning rate never lives inside a ``torch.optim.lr_scheduler``.
``step`` counts optimizer steps from 0, ``epoch`` counts epochs from 0.

``lr_schedule.name`` and its parameters (t is the schedule's clock: the epoch, or the step with
``interval: step``; eta0 is ``optim.lr``):

=================  =====================================================  ==========================================
name               eta(t)                                                 parameters (defaults)
=================  =====================================================  ==========================================
constant           eta0                                                   -
step               eta0 * gamma ** floor(t / step_size)                   step_size (10), gamma (0.1)
exponential        eta0 * gamma ** t                                      gamma (0.95)
inverse_time       eta0 / (1 + k t)                                       k (0.01)
cosine             eta_min + (eta0 - eta_min) (1 + cos(pi t / T)) / 2     t_max (T; default: max_epochs or the steps
                                                                          of max_epochs), eta_min (0)
reduce_on_plateau  eta0 * factor ** (number of plateaus seen)             factor (0.1), patience (10), threshold
                                                                          (1e-4), threshold_mode (rel), mode (min),
                                                                          cooldown (0), min_lr (0)
=================  =====================================================  ==========================================

Common parameters: ``interval`` (epoch | step; default epoch, as torch's schedulers stepped once an epoch)
and a linear warm-up before any of them: ``warmup_steps`` or ``warmup_epochs`` (0), starting from
``warmup_start_factor * eta0`` (default 1 / warm-up length) and rising to eta0 on the last warm-up step;
the schedule's clock starts when the warm-up ends. reduce_on_plateau follows
``torch.optim.lr_scheduler.ReduceLROnPlateau`` (its ``observe`` gets the monitored validation metric once
an epoch; ``mode: max`` for an accuracy).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from .defaults import is_number

__all__ = ["Schedule", "build_schedule", "check_schedule_cfg", "SCHEDULES"]

_PARAMS: dict[str, dict[str, Any]] = {
    "constant": {},
    "step": {"step_size": 10, "gamma": 0.1},
    "exponential": {"gamma": 0.95},
    "inverse_time": {"k": 0.01},
    "cosine": {"t_max": None, "eta_min": 0.0},
    "reduce_on_plateau": {
        "factor": 0.1,
        "patience": 10,
        "threshold": 1e-4,
        "threshold_mode": "rel",
        "mode": "min",
        "cooldown": 0,
        "min_lr": 0.0,
    },
}
_COMMON: dict[str, Any] = {"interval": "epoch", "warmup_steps": 0, "warmup_epochs": 0, "warmup_start_factor": None}
SCHEDULES = tuple(_PARAMS)


def _bad(key: str, what: str, value: object) -> ValueError:
    return ValueError(f"lr_schedule.{key} must be {what}, got {value!r}")


def check_schedule_cfg(cfg: object) -> dict[str, Any]:
    """Validate an ``lr_schedule`` config; returns it with every default filled in."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"lr_schedule must be a mapping with a 'name', got {type(cfg).__name__}")
    name = cfg.get("name")
    if name not in _PARAMS:
        raise ValueError(f"lr_schedule.name must be one of {', '.join(SCHEDULES)}, got {name!r}")
    allowed = {**_COMMON, **_PARAMS[name]}
    for key in cfg:
        if key != "name" and key not in allowed:
            raise ValueError(
                f"unknown config key 'lr_schedule.{key}' for schedule {name!r}; it takes {', '.join(allowed)}"
            )
    out = {"name": name, **allowed, **{k: v for k, v in cfg.items() if k != "name"}}
    if out["interval"] not in ("epoch", "step"):
        raise _bad("interval", "'epoch' or 'step'", out["interval"])
    for key in ("warmup_steps", "warmup_epochs", "cooldown", "patience"):
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 0):
            raise _bad(key, "an integer >= 0", out[key])
    if out["warmup_steps"] and out["warmup_epochs"]:
        raise ValueError("lr_schedule: set warmup_steps or warmup_epochs, not both")
    wsf = out["warmup_start_factor"]
    if wsf is not None and not (is_number(wsf) and 0 <= wsf <= 1):
        raise _bad("warmup_start_factor", "a number in [0, 1]", wsf)
    if name == "step":
        if isinstance(out["step_size"], bool) or not isinstance(out["step_size"], int) or out["step_size"] < 1:
            raise _bad("step_size", "a positive integer", out["step_size"])
    if "gamma" in out and not (is_number(out["gamma"]) and 0 < out["gamma"] <= 1):
        raise _bad("gamma", "a number in (0, 1]", out["gamma"])
    if "k" in out and not (is_number(out["k"]) and out["k"] >= 0):
        raise _bad("k", "a number >= 0", out["k"])
    if name == "cosine":
        if out["t_max"] is not None and (
            isinstance(out["t_max"], bool) or not isinstance(out["t_max"], int) or out["t_max"] < 1
        ):
            raise _bad("t_max", "a positive integer or null", out["t_max"])
    for key in ("eta_min", "min_lr", "threshold"):
        if key in out and not (is_number(out[key]) and out[key] >= 0):
            raise _bad(key, "a number >= 0", out[key])
    if name == "reduce_on_plateau":
        if not (is_number(out["factor"]) and 0 < out["factor"] < 1):
            raise _bad("factor", "a number in (0, 1)", out["factor"])
        if out["mode"] not in ("min", "max"):
            raise _bad("mode", "'min' or 'max'", out["mode"])
        if out["threshold_mode"] not in ("rel", "abs"):
            raise _bad("threshold_mode", "'rel' or 'abs'", out["threshold_mode"])
    return out


class Schedule:
    """eta(step, epoch) for one run. Build it with :func:`build_schedule`."""

    def __init__(self, cfg: Mapping[str, Any], base_lr: float, steps_per_epoch: int, max_epochs: int) -> None:
        self.cfg = check_schedule_cfg(cfg)
        if not (is_number(base_lr) and base_lr > 0):
            raise ValueError(f"optim.lr must be a positive number, got {base_lr!r}")
        self.name = self.cfg["name"]
        self.base_lr = float(base_lr)
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.max_epochs = int(max_epochs)
        self.warmup = self.cfg["warmup_steps"] or self.cfg["warmup_epochs"] * self.steps_per_epoch
        wsf = self.cfg["warmup_start_factor"]
        self.warmup_start = (1.0 / self.warmup if self.warmup else 1.0) if wsf is None else float(wsf)
        # reduce_on_plateau state (as torch.optim.lr_scheduler.ReduceLROnPlateau keeps it)
        self.scale = 1.0
        self.best = math.inf if self.cfg.get("mode", "min") == "min" else -math.inf
        self.num_bad = 0
        self.cooldown_counter = 0

    # -- the clock ---------------------------------------------------------------------------------
    @property
    def changes_within_epoch(self) -> bool:
        """Whether :meth:`lr` may differ between the steps of one epoch (a per-step interval or a warmup);
        when not, a loop may ask it once per epoch."""
        return self.cfg["interval"] != "epoch" or self.warmup != 0

    def _t(self, step: int, epoch: int) -> int:
        s = step - self.warmup
        if self.cfg["interval"] == "step":
            return s
        if self.warmup == 0:
            return epoch
        return s // self.steps_per_epoch

    def _main(self, t: int) -> float:
        c, eta0 = self.cfg, self.base_lr
        if self.name == "constant":
            return eta0
        if self.name == "step":
            return eta0 * c["gamma"] ** (t // c["step_size"])
        if self.name == "exponential":
            return eta0 * c["gamma"] ** t
        if self.name == "inverse_time":
            return eta0 / (1.0 + c["k"] * t)
        if self.name == "cosine":
            t_max = c["t_max"]
            if t_max is None:
                total = self.max_epochs if c["interval"] == "epoch" else self.max_epochs * self.steps_per_epoch
                t_max = max(
                    total - (self.warmup if c["interval"] == "step" else self.warmup // self.steps_per_epoch), 1
                )
            t = min(t, t_max)
            return c["eta_min"] + (eta0 - c["eta_min"]) * (1 + math.cos(math.pi * t / t_max)) / 2
        # reduce_on_plateau
        return max(eta0 * self.scale, c["min_lr"])

    def lr(self, step: int, epoch: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based) taken during epoch ``epoch`` (0-based)."""
        if step < self.warmup:
            # linear from warmup_start * eta to eta over steps 0 .. warmup-1 ((s + 1) / warmup by default)
            target = self._main(0)
            if self.warmup == 1:
                return target
            return target * (self.warmup_start + (1.0 - self.warmup_start) * step / (self.warmup - 1))
        return self._main(self._t(step, epoch))

    # -- reduce_on_plateau -------------------------------------------------------------------------
    def _is_better(self, value: float) -> bool:
        c = self.cfg
        if c["mode"] == "min":
            ref = self.best * (1 - c["threshold"]) if c["threshold_mode"] == "rel" else self.best - c["threshold"]
            return value < ref
        ref = self.best * (1 + c["threshold"]) if c["threshold_mode"] == "rel" else self.best + c["threshold"]
        return value > ref

    def observe(self, val_metric: float) -> None:
        """Feed the monitored metric once an epoch (reduce_on_plateau; a no-op for the other schedules)."""
        if self.name != "reduce_on_plateau":
            return
        value = float(val_metric)
        if self._is_better(value):
            self.best = value
            self.num_bad = 0
        else:
            self.num_bad += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad = 0
        if self.num_bad > self.cfg["patience"]:
            self.scale *= self.cfg["factor"]
            self.cooldown_counter = self.cfg["cooldown"]
            self.num_bad = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "best": self.best,
            "num_bad": self.num_bad,
            "cooldown_counter": self.cooldown_counter,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.best = float(state["best"])
        self.num_bad = int(state["num_bad"])
        self.cooldown_counter = int(state["cooldown_counter"])


def build_schedule(cfg: Mapping[str, Any], base_lr: float, steps_per_epoch: int, max_epochs: int) -> Schedule:
    """The schedule ``cfg`` names, for a run of ``max_epochs`` epochs of ``steps_per_epoch`` steps."""
    return Schedule(cfg, base_lr, steps_per_epoch, max_epochs)
