"""Stopping rules: the notes' "while not a stopping criterion", composable and recorded.

``stopping`` config: ``max_epochs`` (always present, a cap) and one key per optional rule; a rule set to
null (or false) is off. The first rule to fire wins; its name is the run's ``stop_reason``.

=====================  ==============================================================  =========
rule                   fires when                                                      status
=====================  ==============================================================  =========
divergence             a step loss is NaN/inf (always on), or above ``factor`` x the   diverged
                       first step's loss (default 1e4: an exploded run; null turns
                       the factor check off; ``divergence: {factor: 100}``); also a
                       non-finite epoch train/val loss. ``check_every`` (auto: 1 on
                       CPU, 100 on CUDA) spaces the per-step reads (host syncs)
loss_below             ``monitor`` (train_loss | val_loss) < ``value``                  stopped
grad_norm_below        the total weight-gradient norm of the epoch's last step          stopped
                       < ``value``
early_stopping         ``monitor`` (val_loss, val_accuracy, ...) has not improved by    stopped
                       more than ``min_delta`` for ``patience`` epochs; with
                       ``restore_best`` the run ends on the best epoch's weights
gl                     Prechelt's GL_alpha: the generalization loss                     stopped
                       GL(t) = 100 (E_va(t) / E_opt(t) - 1) > ``alpha`` (default 2),
                       E_opt(t) the lowest E_va up to t; ``gl: 5`` sets alpha
pq                     Prechelt's PQ_alpha: at the end of a strip of ``strip``          stopped
                       (default 5) epochs, GL(t) / P_k(t) > ``alpha`` (default 1),
                       P_k(t) = 1000 (sum E_tr / (k min E_tr) - 1) over the strip
up                     Prechelt's UP_s: E_va rose over ``s`` (default 3) successive     stopped
                       strips of ``strip`` (default 5) epochs, E_va(t) > E_va(t - k)
                       at each strip's end (the first comparison is at t = 2k)
relative_improvement   scikit-learn's MLP rule: the monitored loss did not fall below   stopped
                       best - ``tol`` for more than ``n_iter_no_change`` epochs
time_budget            ``seconds`` of training wall time have passed                    stopped
max_steps              ``max_steps`` optimizer steps are done                           completed
max_epochs             ``max_epochs`` epochs are done                                   completed
=====================  ==============================================================  =========

Per-step checks (:meth:`StoppingRules.check_step`): divergence of the step loss, time_budget, max_steps.
Per-epoch checks (:meth:`StoppingRules.check`): everything, on the epoch's history record.

Prechelt's criteria ("Early Stopping - But When?", 1998): E_va is the rule's ``monitor`` read as an error
(``val_loss`` by default; an accuracy or r2 monitor is read as 1 - its value), E_tr the epoch's ``train_loss``.
A strip of length k is epochs n+1 .. n+k with n divisible by k, so strips end at epochs k, 2k, ...
Each of early_stopping, gl, pq and up takes ``restore_best`` (default true): the run ends on the weights of
the epoch with the best monitored value (for gl, pq, up: the epoch of E_opt). The first of those rules (in the
table's order) with ``restore_best`` keeps the best epoch; two of them with ``restore_best`` must monitor the
same metric.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

from torch import Tensor

from .defaults import is_number

__all__ = [
    "StoppingRules",
    "StopContext",
    "build_stopping",
    "check_stopping_cfg",
    "generalization_loss",
    "training_progress",
    "RULES",
]

_RULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "max_steps": {},
    "loss_below": {"value": None, "monitor": "train_loss"},
    "grad_norm_below": {"value": None},
    "early_stopping": {"patience": 10, "min_delta": 0.0, "monitor": "val_loss", "restore_best": True, "mode": "auto"},
    "gl": {"alpha": 2.0, "monitor": "val_loss", "restore_best": True},
    "pq": {"alpha": 1.0, "strip": 5, "monitor": "val_loss", "restore_best": True},
    "up": {"s": 3, "strip": 5, "monitor": "val_loss", "restore_best": True},
    "relative_improvement": {"tol": 1e-4, "n_iter_no_change": 10, "monitor": "train_loss"},
    "time_budget": {"seconds": None},
    "divergence": {"factor": 1e4, "check_every": "auto"},
}
RULES = ("max_epochs", *_RULE_DEFAULTS)
# a bare number is accepted for these rules: loss_below: 0.01, time_budget: 60, max_steps: 500
_SCALAR_KEY = {
    "loss_below": "value",
    "grad_norm_below": "value",
    "time_budget": "seconds",
    "gl": "alpha",
    "pq": "alpha",
    "up": "s",
}
#: the rules that track a best epoch and may restore its weights (``restore_best``), in the order they are asked
BEST_RULES = ("early_stopping", "gl", "pq", "up")
PRECHELT = ("gl", "pq", "up")
MONITORS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "train_r2", "val_r2")


def _err(key: str, what: str, value: object) -> ValueError:
    return ValueError(f"stopping.{key} must be {what}, got {value!r}")


def _positive_int(value: object, least: int = 1) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= least


def _check_prechelt(rule: str, params: Mapping[str, Any]) -> None:
    """The parameters of gl, pq, up (alpha > 0; strip: pq >= 2 (P_1 is always 0), up >= 1; s >= 1)."""
    where = f"{rule}."
    if rule in ("gl", "pq") and not (is_number(params["alpha"]) and params["alpha"] > 0):
        raise _err(where + "alpha", "a positive number", params["alpha"])
    if rule == "up" and not _positive_int(params["s"]):
        raise _err(where + "s", "a positive integer (the number of successive strips)", params["s"])
    if "strip" in params and not _positive_int(params["strip"], 2 if rule == "pq" else 1):
        least = (
            "an integer >= 2 (a strip of 1 epoch has no training progress)" if rule == "pq" else "a positive integer"
        )
        raise _err(where + "strip", least, params["strip"])


def _check_restore_best(out: Mapping[str, Any]) -> None:
    """The run restores one best epoch: the rules that restore must monitor the same metric."""
    for rule in BEST_RULES:
        if rule in out and not isinstance(out[rule]["restore_best"], bool):
            raise _err(f"{rule}.restore_best", "true or false", out[rule]["restore_best"])
    restoring = [r for r in BEST_RULES if r in out and out[r]["restore_best"]]
    monitors = {out[r]["monitor"] for r in restoring}
    if len(monitors) > 1:
        which = ", ".join(f"{r} ({out[r]['monitor']})" for r in restoring)
        raise ValueError(
            f"stopping: restore_best is on for {which}, which monitor different metrics; a run restores one best "
            "epoch: monitor the same metric, or set restore_best: false on all but one"
        )


def _rule_params(rule: str, value: object, defaults: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """A rule's config entry (true, a bare number, or a mapping) as its parameters with defaults, or None when
    it is off (``enabled: false``); an unknown parameter is an error naming it."""
    if value is True:
        value = {}
    if rule in _SCALAR_KEY and is_number(value):
        value = {_SCALAR_KEY[rule]: value}
    if not isinstance(value, Mapping):
        raise TypeError(f"stopping.{rule} must be a mapping of its parameters or null, got {value!r}")
    if value.get("enabled", True) is False:
        return None
    params = dict(defaults)
    for key, v in value.items():
        if key == "enabled":
            continue
        if key not in defaults:
            raise ValueError(f"unknown config key 'stopping.{rule}.{key}'; {rule} takes {', '.join(defaults)}")
        params[key] = v
    return params


def _check_early_stopping(params: Mapping[str, Any]) -> None:
    """patience a positive integer, min_delta >= 0, mode auto/min/max."""
    p = params["patience"]
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise _err("early_stopping.patience", "a positive integer", p)
    if not (is_number(params["min_delta"]) and params["min_delta"] >= 0):
        raise _err("early_stopping.min_delta", "a number >= 0", params["min_delta"])
    if params["mode"] not in ("auto", "min", "max"):
        raise _err("early_stopping.mode", "'auto', 'min' or 'max'", params["mode"])


def _check_relative_improvement(params: Mapping[str, Any]) -> None:
    """n_iter_no_change a positive integer, tol >= 0."""
    n = params["n_iter_no_change"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise _err("relative_improvement.n_iter_no_change", "a positive integer", n)
    if not (is_number(params["tol"]) and params["tol"] >= 0):
        raise _err("relative_improvement.tol", "a number >= 0", params["tol"])


def _check_divergence(params: Mapping[str, Any]) -> None:
    """factor > 1 or null, check_every a positive integer or 'auto'."""
    f = params["factor"]
    if f is not None and not (is_number(f) and f > 1):
        raise _err("divergence.factor", "a number > 1 or null (non-finite losses only)", f)
    ce = params["check_every"]
    if ce != "auto" and (isinstance(ce, bool) or not isinstance(ce, int) or ce < 1):
        raise _err("divergence.check_every", "a positive integer or 'auto'", ce)


def _check_rule(rule: str, params: Mapping[str, Any]) -> None:
    """The parameters of one rule that is on: its threshold, its monitor, then its own parameters."""
    where = f"{rule}."
    if rule in ("loss_below", "grad_norm_below"):
        if not (is_number(params["value"]) and params["value"] > 0):
            raise _err(where + "value", "a positive number", params["value"])
    if rule == "time_budget" and not (is_number(params["seconds"]) and params["seconds"] > 0):
        raise _err(where + "seconds", "a positive number", params["seconds"])
    if "monitor" in params:
        allowed = ("train_loss", "val_loss") if rule in ("loss_below", "relative_improvement") else MONITORS
        if params["monitor"] not in allowed:
            raise _err(where + "monitor", f"one of {', '.join(allowed)}", params["monitor"])
    if rule == "early_stopping":
        _check_early_stopping(params)
    if rule in PRECHELT:
        _check_prechelt(rule, params)
    if rule == "relative_improvement":
        _check_relative_improvement(params)
    if rule == "divergence":
        _check_divergence(params)


def check_stopping_cfg(cfg: object) -> dict[str, Any]:
    """Validate a ``stopping`` config; returns {rule: params} for the rules that are on (with defaults)."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"stopping must be a mapping, got {type(cfg).__name__}")
    for key in cfg:
        if key not in RULES:
            raise ValueError(f"unknown config key 'stopping.{key}'; known rules: {', '.join(RULES)}")
    out: dict[str, Any] = {}
    me = cfg.get("max_epochs")
    if isinstance(me, bool) or not isinstance(me, int) or me < 1:
        raise _err("max_epochs", "a positive integer (it is always the cap)", me)
    out["max_epochs"] = me
    for rule, defaults in _RULE_DEFAULTS.items():
        value = cfg.get(rule)
        if value is None or value is False:
            continue
        if rule == "max_steps":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _err("max_steps", "a positive integer or null", value)
            out[rule] = value
            continue
        params = _rule_params(rule, value, defaults)
        if params is None:
            continue
        _check_rule(rule, params)
        out[rule] = params
    _check_restore_best(out)
    out.setdefault("divergence", dict(_RULE_DEFAULTS["divergence"]))  # non-finite losses always end a run
    return out


def generalization_loss(error: float, opt: float) -> float:
    """Prechelt's GL(t) = 100 (E_va(t) / E_opt(t) - 1), in percent; with E_opt = 0: 0 if E_va is 0, else inf."""
    if opt <= 0:
        return 0.0 if error <= opt else math.inf
    return 100.0 * (error / opt - 1.0)


def training_progress(strip: Sequence[float]) -> float:
    """Prechelt's P_k(t) = 1000 (sum E_tr / (k min E_tr) - 1) over a strip's k training errors (per mille)."""
    low = min(strip)
    if low <= 0:
        return 0.0 if max(strip) <= low else math.inf
    return 1000.0 * (sum(strip) / (len(strip) * low) - 1.0)


def _error(record: Mapping[str, Any], monitor: str) -> float:
    """E_va from a monitor: a loss as it is, an accuracy or r2 as 1 - its value."""
    value = float(record[monitor])
    return value if monitor.endswith("_loss") else 1.0 - value


@dataclass
class _Prechelt:
    """The running quantities of one of Prechelt's criteria over the epochs so far (its checkpointed state)."""

    opt: float = math.inf  # E_opt: the lowest E_va so far
    opt_epoch: Optional[int] = None
    strip: list[float] = field(default_factory=list)  # pq: E_tr of the last k epochs
    last_end: Optional[float] = None  # up: E_va at the last end-of-strip epoch
    rises: int = 0  # up: successive strips whose E_va rose


@dataclass
class StopContext:
    """Where the run stands when a rule is asked: epochs and steps done, training seconds so far."""

    epoch: int = 0
    step: int = 0
    elapsed_s: float = 0.0


Decision = Optional[tuple[str, str]]
#: a rule's verdict on an epoch before it is fired: (status, rule, message), or None
_Stop = Optional[tuple[str, str, str]]


class StoppingRules:
    """The composed rules of one run. Build with :func:`build_stopping`.

    Attributes:
        rules: {rule: params} of the rules that are on.
        message: a human-readable account of the rule that fired (empty until one does).
        improved: True right after an epoch that improved the best-epoch rule's monitor (the loop then
            stores ``best_state`` when :attr:`restore_best`).
        best_rule: the rule whose best epoch the run keeps: the first of early_stopping, gl, pq, up with
            ``restore_best``, else the first of them that is on, else None.
        best_state: the backend state of the best epoch, or None.
        best_epoch: that epoch (1-based), or None.
        prechelt: {rule: its running state} for gl, pq, up.
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.rules = check_stopping_cfg(cfg)
        self.max_epochs: int = self.rules["max_epochs"]
        self.max_steps: Optional[int] = self.rules.get("max_steps")
        self.message = ""
        self.improved = False
        self.best_state: Optional[dict] = None
        self.best_epoch: Optional[int] = None
        self.initial_loss: Optional[float] = None
        es = self.rules.get("early_stopping")
        self.es_mode = None
        if es is not None:
            mode = es["mode"]
            self.es_mode = ("min" if es["monitor"].endswith("loss") else "max") if mode == "auto" else mode
        self.es_best = math.inf if self.es_mode != "max" else -math.inf
        self.es_wait = 0
        self.es_best_epoch: Optional[int] = None
        self.prechelt = {rule: _Prechelt() for rule in PRECHELT if rule in self.rules}
        on = [r for r in BEST_RULES if r in self.rules]
        self.best_rule: Optional[str] = next((r for r in on if self.rules[r]["restore_best"]), on[0] if on else None)
        self.ri_best = math.inf
        self.ri_count = 0

    @property
    def restore_best(self) -> bool:
        """Whether the run ends on the best epoch's weights (the :attr:`best_rule` has ``restore_best``)."""
        return self.best_rule is not None and bool(self.rules[self.best_rule]["restore_best"])

    @property
    def monitors(self) -> set[str]:
        """The history keys the rules read (the loop checks they exist before training)."""
        return {p["monitor"] for p in self.rules.values() if isinstance(p, dict) and "monitor" in p}

    def _fire(self, status: str, rule: str, message: str) -> tuple[str, str]:
        self.message = message
        return status, rule

    # -- per step ----------------------------------------------------------------------------------
    #: the device type the run trains on; ``check_every: auto`` reads every step's loss on CPU (free) and
    #: every 100th on an accelerator (each read is a host sync). The loop sets it.
    device_type: str = "cpu"

    @property
    def check_every(self) -> int:
        ce = self.rules["divergence"]["check_every"]
        if ce == "auto":
            return 1 if self.device_type == "cpu" else 100
        return ce

    @property
    def has_step_limits(self) -> bool:
        """Whether :meth:`check_step` can fire without a loss (time_budget or max_steps is set)."""
        return self.max_steps is not None or self.rules.get("time_budget") is not None

    def needs_step_loss(self, step: int) -> bool:
        """Whether :meth:`check_step` will read the loss at this (0-based) step (a host sync off the CPU)."""
        return self.initial_loss is None or step % self.check_every == 0

    @property
    def step_loss_limit(self) -> Optional[float]:
        """Once the initial loss is known: the step loss from which on :meth:`check_step`'s divergence rule
        fires (``factor`` x the initial loss, or inf; a NaN or inf loss fires too). None before that."""
        if self.initial_loss is None:
            return None
        factor = self.rules["divergence"]["factor"]
        return math.inf if factor is None else factor * self.initial_loss

    def check_step(self, loss: Union[float, Tensor, None], context: StopContext) -> Decision:
        """After each optimizer step: divergence of the step loss, time_budget, max_steps.

        ``loss`` may be None on steps where :meth:`needs_step_loss` is False.
        """
        if loss is not None:
            decision = self._check_step_loss(float(loss), context.step)
            if decision is not None:
                return decision
        tb = self.rules.get("time_budget")
        if tb is not None and context.elapsed_s >= tb["seconds"]:
            return self._fire(
                "stopped", "time_budget", f"time budget of {tb['seconds']} s used up after step {context.step}"
            )
        if self.max_steps is not None and context.step >= self.max_steps:
            return self._fire("completed", "max_steps", f"reached max_steps={self.max_steps}")
        return None

    def fires_within(self, losses: Tensor, first_step: int) -> bool:
        """Whether :meth:`check_step` would fire on one of these consecutive steps' losses.

        ``losses[i]`` is the loss of (0-based) step ``first_step + i``, each read where
        :meth:`needs_step_loss` says; for a loop that has run those steps in one go, with no time_budget or
        max_steps (:attr:`has_step_limits` False). Records the initial loss as :meth:`check_step` does.
        One host sync.
        """
        for i, value in enumerate(losses.tolist()):
            if self.needs_step_loss(first_step + i) and self._check_step_loss(value, first_step + i + 1) is not None:
                return True
        return False

    def _check_step_loss(self, value: float, step: int) -> Decision:
        """The divergence rule on the training loss after ``step`` (1-based) steps."""
        if not math.isfinite(value):
            return self._fire("diverged", "divergence", f"non-finite training loss ({value}) at step {step}")
        if self.initial_loss is None:
            self.initial_loss = value
        if value > self.step_loss_limit:  # type: ignore[operator]
            return self._fire(
                "diverged",
                "divergence",
                f"training loss {value:.4g} at step {step} exceeds {self.rules['divergence']['factor']} x the "
                f"initial loss {self.initial_loss:.4g}",
            )
        return None

    # -- per epoch ---------------------------------------------------------------------------------
    def check(self, record: Mapping[str, Any], context: StopContext) -> Decision:
        """After each epoch, on its history record. Returns (status, stop_reason) or None.

        A non-finite loss ends the run at once. Otherwise every rule is asked (early stopping, gl, pq, up and
        relative_improvement update their state on every epoch, so the best epoch is tracked even when another
        rule fires); the first that fires, in the table's order, wins; then time_budget, max_steps, max_epochs.
        """
        self.improved = False
        for key in ("train_loss", "val_loss"):
            value = record.get(key)
            if value is not None and not math.isfinite(value):
                return self._fire("diverged", "divergence", f"non-finite {key} ({value}) after epoch {context.epoch}")
        new_best: set[str] = set()
        stops = [
            *self._threshold_stops(record),
            self._early_stopping_stop(record, context.epoch, new_best),
            *(self._prechelt_stop(rule, record, context.epoch, new_best) for rule in self.prechelt),
            self._relative_improvement_stop(record),
        ]
        if self.best_rule in new_best:
            self.improved = True
            self.best_epoch = context.epoch
        first = next((stop for stop in stops if stop is not None), None)
        if first is not None:
            return self._fire(*first)
        return self._limit_stop(context)

    def _threshold_stops(self, record: Mapping[str, Any]) -> list[_Stop]:
        """loss_below and grad_norm_below on this epoch's record."""
        stops: list[_Stop] = [None, None]
        lb = self.rules.get("loss_below")
        if lb is not None and record[lb["monitor"]] < lb["value"]:
            stops[0] = ("stopped", "loss_below", f"{lb['monitor']} {record[lb['monitor']]:.4g} < {lb['value']}")
        gn = self.rules.get("grad_norm_below")
        if gn is not None and record["grad_norm"] < gn["value"]:
            stops[1] = ("stopped", "grad_norm_below", f"gradient norm {record['grad_norm']:.4g} < {gn['value']}")
        return stops

    def _early_stopping_stop(self, record: Mapping[str, Any], epoch: int, new_best: set[str]) -> _Stop:
        """Update early stopping's best value and patience count with this epoch (always, so that best_state
        tracks the best epoch even if another rule fires); a stop once patience is used up."""
        es = self.rules.get("early_stopping")
        if es is None:
            return None
        value = record[es["monitor"]]
        if self.es_mode == "min":
            better = value < self.es_best - es["min_delta"]
        else:
            better = value > self.es_best + es["min_delta"]
        if better:
            self.es_best = value
            self.es_wait = 0
            self.es_best_epoch = epoch
            new_best.add("early_stopping")
            return None
        self.es_wait += 1
        if self.es_wait < es["patience"]:
            return None
        return (
            "stopped",
            "early_stopping",
            f"{es['monitor']} did not improve on {self.es_best:.6g} (epoch {self.es_best_epoch}) by more "
            f"than {es['min_delta']} for {es['patience']} epochs",
        )

    def _prechelt_stop(self, rule: str, record: Mapping[str, Any], epoch: int, new_best: set[str]) -> _Stop:
        """gl, pq or up, updated with this epoch (always, like early stopping)."""
        message = self._check_prechelt(rule, record, epoch, new_best)
        return ("stopped", rule, message) if message else None

    def _relative_improvement_stop(self, record: Mapping[str, Any]) -> _Stop:
        """sklearn.neural_network.MLP*'s _update_no_improvement_count (without its early_stopping)."""
        ri = self.rules.get("relative_improvement")
        if ri is None:
            return None
        value = record[ri["monitor"]]
        if value > self.ri_best - ri["tol"]:
            self.ri_count += 1
        else:
            self.ri_count = 0
        if value < self.ri_best:
            self.ri_best = value
        if self.ri_count <= ri["n_iter_no_change"]:
            return None
        return (
            "stopped",
            "relative_improvement",
            f"{ri['monitor']} did not improve by more than tol={ri['tol']} for "
            f"{ri['n_iter_no_change']} consecutive epochs",
        )

    def _limit_stop(self, context: StopContext) -> Decision:
        """The end of an epoch that no rule stopped: time_budget, max_steps, max_epochs."""
        tb = self.rules.get("time_budget")
        if tb is not None and context.elapsed_s >= tb["seconds"]:
            return self._fire("stopped", "time_budget", f"time budget of {tb['seconds']} s used up")
        if self.max_steps is not None and context.step >= self.max_steps:
            return self._fire("completed", "max_steps", f"reached max_steps={self.max_steps}")
        if context.epoch >= self.max_epochs:
            return self._fire("completed", "max_epochs", f"reached max_epochs={self.max_epochs}")
        return None

    def _check_prechelt(self, rule: str, record: Mapping[str, Any], epoch: int, new_best: set[str]) -> Optional[str]:
        """Update gl/pq/up's state with this epoch; the account of why it fires, or None."""
        p, st = self.rules[rule], self.prechelt[rule]
        e = _error(record, p["monitor"])
        if e < st.opt:
            st.opt, st.opt_epoch = e, epoch
            new_best.add(rule)
        gl = generalization_loss(e, st.opt)
        if rule == "gl":
            if gl <= p["alpha"]:
                return None
            return (
                f"GL = {gl:.4g} > alpha = {p['alpha']} after epoch {epoch}: {p['monitor']} error {e:.6g} against "
                f"its minimum {st.opt:.6g} (epoch {st.opt_epoch})"
            )
        k = p["strip"]
        if rule == "pq":
            st.strip = [*st.strip, float(record["train_loss"])][-k:]  # E_tr of epochs t-k+1 .. t
        if epoch % k:  # not the end of a strip
            return None
        if rule == "pq":
            progress = training_progress(st.strip)
            quotient = gl / progress if progress > 0 else (math.inf if gl > 0 else 0.0)
            if quotient <= p["alpha"]:
                return None
            return (
                f"GL / P_{k} = {gl:.4g} / {progress:.4g} = {quotient:.4g} > alpha = {p['alpha']} at the end of the "
                f"strip of epochs {epoch - k + 1}-{epoch}"
            )
        rose = st.last_end is not None and e > st.last_end
        st.rises = st.rises + 1 if rose else 0
        st.last_end = e
        if st.rises < p["s"]:
            return None
        return (
            f"{p['monitor']} error rose over {p['s']} successive strips of {k} epochs (epochs "
            f"{epoch - k * p['s']}, ..., {epoch}): UP_{p['s']}"
        )

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "initial_loss": self.initial_loss,
            "es_best": self.es_best,
            "es_wait": self.es_wait,
            "ri_best": self.ri_best,
            "ri_count": self.ri_count,
            "es_best_epoch": self.es_best_epoch,
            "prechelt": {rule: asdict(st) for rule, st in self.prechelt.items()},
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "message": self.message,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.initial_loss = state["initial_loss"]
        self.es_best = float(state["es_best"])
        self.es_wait = int(state["es_wait"])
        self.ri_best = float(state["ri_best"])
        self.ri_count = int(state["ri_count"])
        self.best_epoch = state["best_epoch"]
        self.es_best_epoch = state.get("es_best_epoch", self.best_epoch)
        for rule, st in state.get("prechelt", {}).items():
            if rule in self.prechelt:
                self.prechelt[rule] = _Prechelt(**{**st, "strip": [float(v) for v in st["strip"]]})
        self.best_state = state["best_state"]
        self.message = state.get("message", "")


def build_stopping(cfg: Mapping[str, Any]) -> StoppingRules:
    """The composed stopping rules of a ``stopping`` config."""
    return StoppingRules(cfg)
