"""The mutation matrix: every bug of the catalogue against every execution path, caught or missed.

For each bug x path, :func:`mutation_matrix` injects the bug (:func:`~manualbp.verify.inject_bug`) and runs
the path's check; a check that still passes missed the bug, a hole in the suite. The checks:

- ``module``: :func:`~manualbp.verify.compare` and :func:`~manualbp.verify.trace` of an MLP against native
  autograd on its twin, and ``compare`` once more with a global module hook set (so the MLP runs layer by
  layer through the per-op Functions); for softmax, ``compare`` of MLP + :class:`manualbp.nn.Softmax` under
  a cross-entropy on probabilities. Python paths (``MANUALBP_NATIVE=off`` for the check).
- ``fused``, ``vectorized``, ``vectorized-sgd``: three optimizer steps (batches of 5 rows) of the trainer
  against the same steps of ``torch.optim.SGD`` (``torch.optim.Adam`` for an Adam bug) on ``model.to_torch()``
  in float64; the parameters after them must
  agree to 1e-10. The fused trainer runs ``step_many`` on its Python path (``MANUALBP_NATIVE=off``), with the
  bug's optimizer settings and, for a bug outside the optimizer, also plain SGD (its one-kernel update) and
  momentum with weight decay (its gradient blocks). The vectorized trainer trains K = 2 models: plain SGD
  (``vectorized``, its fused step) or with momentum and weight decay or Adam (``vectorized-sgd``).
- ``module-native``: ``compare`` of the MLP on its C++ autograd nodes (``manualbp/csrc/module.cpp``; the
  class-index cross-entropy on its C++ node too) against native autograd, ``MANUALBP_NATIVE=require``; the
  check counts the calls into the extension and raises if the C++ nodes did not run. (``trace`` and the
  per-op Functions are Python on every path: they belong to ``module``.)
- ``fused-native``: the fused check with ``step_many``'s C++ loop (``manualbp/csrc/fused.cpp``,
  ``MANUALBP_NATIVE=require``), which must run (counted likewise).

The bug reaches the C++ sites through the extension's runtime switch (:func:`~manualbp.verify.inject_bug`
sets it). Where the extension cannot be built, or ``MANUALBP_NATIVE=off`` asks for no compiled code, the two
native paths are "not run" (with the reason), not counted as reached.

Each bug's check uses the setting where its formula matters (its activation, loss, reduction, optimizer;
batch > 1, two hidden layers, random weights, class indices or random targets). A baseline run of every
check without a bug must pass first: otherwise the matrix means nothing, and it raises.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence
from unittest import mock

import torch
from torch import Tensor, nn

from .. import native as _native
from .. import nn as mnn
from ..nn import MLP
from .bugs import CATALOGUE, NATIVE_PATHS, PATHS, Bug, inject_bug, python_paths
from .comparison import compare
from .tracing import trace

__all__ = ["MutationResult", "mutation_matrix"]

CAUGHT, MISSED = "caught", "missed"
NOT_RUN = "not run"
_DTYPE = torch.float64
_TOLERANCE = 1e-10
_BATCH, _STEPS = 5, 3
#: the trainers' optimizer arguments per setting (``optimizer`` picks the torch.optim reference; default SGD)
_SGD = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "weight_decay": {"momentum": 0.9, "weight_decay": 0.1},
    "adam": {"optimizer": "adam", "betas": (0.8, 0.95)},
}
_TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
_WITH_STATE = {"momentum": 0.9, "weight_decay": 0.01}  # momentum and weight decay on, for a bug outside them


@dataclass
class MutationResult:
    """``cells[(bug, path)]``: "caught", "missed" or the reason the bug does not reach the path."""

    bugs: list[str]
    paths: list[str]
    cells: dict[tuple[str, str], str] = field(default_factory=dict)
    seconds: float = 0.0

    def reached(self, path: str) -> list[str]:
        return [b for b in self.bugs if self.cells[(b, path)] in (CAUGHT, MISSED)]

    def caught(self, path: str) -> list[str]:
        return [b for b in self.bugs if self.cells[(b, path)] == CAUGHT]

    def missed(self, path: Optional[str] = None) -> list[tuple[str, str]]:
        paths = self.paths if path is None else [path]
        return [(b, p) for p in paths for b in self.bugs if self.cells[(b, p)] == MISSED]

    @property
    def ok(self) -> bool:
        """Every bug caught on every path it reaches."""
        return not self.missed()

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "bugs": self.bugs,
            "paths": self.paths,
            "cells": {f"{b} @ {p}": v for (b, p), v in self.cells.items()},
            "summary": {p: {"caught": len(self.caught(p)), "reached": len(self.reached(p))} for p in self.paths},
        }

    def table(self) -> str:
        """One line per path: caught of reached, and what does not reach it."""
        lines = [f"{'path':<16} {'caught':>14}   not reached"]
        for p in self.paths:
            reached, caught = self.reached(p), self.caught(p)
            reasons: dict[str, int] = {}
            for b in self.bugs:
                cell = self.cells[(b, p)]
                if cell not in (CAUGHT, MISSED):
                    reasons[cell] = reasons.get(cell, 0) + 1
            rest = "; ".join(f"{n} ({why})" for why, n in reasons.items()) or "-"
            lines.append(f"{p:<16} {f'{len(caught)} of {len(reached)}':>14}   {rest}")
        return "\n".join(lines)

    def __str__(self) -> str:
        head = (
            f"mutation matrix: {len(self.bugs)} bugs x {len(self.paths)} paths "
            f"(baseline passed on every path; {self.seconds:.1f} s)"
        )
        lines = [head, self.table()]
        not_run = {self.cells[(b, p)] for p in NATIVE_PATHS if p in self.paths for b in self.bugs}
        lines += [cell for cell in sorted(not_run) if cell.startswith(NOT_RUN)]
        for b, p in self.missed():
            lines.append(f"MISSED {b} on {p}: {CATALOGUE[b].description}")
        lines.append("PASS: every reached bug caught on every path" if self.ok else f"FAIL: {len(self.missed())} missed")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The settings and data
# --------------------------------------------------------------------------------------------------
def _setting(bug: Optional[Bug]) -> dict[str, Any]:
    s = {"activation": "tanh", "loss": "cross_entropy", "reduction": "mean", "optim": "plain"}
    if bug is not None:
        s.update(bug.setting)
    return s


def _model(activation: str, seed: int) -> MLP:
    torch.manual_seed(seed)
    model = MLP(3, [4, 4], 3, activation=activation, negative_slope=0.2, dtype=_DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)  # larger weights: saturation and negative pre-activations where the formulas differ
    return model


def _data(loss: str, rows: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, generator=gen, dtype=_DTYPE)
    if loss in ("cross_entropy", "softmax"):
        return x, torch.randint(0, 3, (rows,), generator=gen)
    return x, torch.randn(rows, 3, generator=gen, dtype=_DTYPE)


def _torch_loss(loss: str, reduction: str) -> Callable[[Tensor, Tensor], Tensor]:
    if loss == "cross_entropy":
        return lambda o, y: nn.functional.cross_entropy(o, y, reduction=reduction)
    if loss == "mse":
        return lambda o, y: nn.functional.mse_loss(o, y, reduction=reduction)
    per_example = lambda o, y: 0.5 * ((o - y) ** 2).sum(-1)  # noqa: E731
    return lambda o, y: per_example(o, y).mean() if reduction == "mean" else per_example(o, y).sum()


def _manual_loss(loss: str, reduction: str) -> nn.Module:
    kinds = {"cross_entropy": mnn.CrossEntropyLoss, "mse": mnn.MSELoss, "squared_error": mnn.SquaredErrorLoss}
    return kinds[loss](reduction=reduction)


def _reference_steps(model: MLP, s: dict, sgd: dict, x: Tensor, y: Tensor) -> list[Tensor]:
    twin = model.to_torch()
    kwargs = {k: v for k, v in sgd.items() if k != "optimizer"}
    opt = _TORCH_OPTIMIZERS[sgd.get("optimizer", "sgd")](twin.parameters(), lr=0.1, **kwargs)
    loss_fn = _torch_loss(s["loss"], s["reduction"])
    for xb, yb in zip(x.split(_BATCH), y.split(_BATCH)):
        opt.zero_grad()
        loss_fn(twin(xb), yb).backward()
        opt.step()
    return [p.detach() for p in twin.parameters()]


def _differ(actual: Sequence[Tensor], expected: Sequence[Tensor]) -> bool:
    return any(
        a.shape != e.shape or not bool(((a - e).abs() <= _TOLERANCE * (1 + e.abs().max())).all())
        for a, e in zip(actual, expected)
    )


# --------------------------------------------------------------------------------------------------
# The checks: True when the check passes (no difference found)
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _native_calls(*names: str) -> Iterator[dict[str, int]]:
    """``MANUALBP_NATIVE=require`` inside the block, and how often each of the extension's ``names`` ran."""
    with mock.patch.dict(os.environ, {"MANUALBP_NATIVE": "require"}):
        module = _native.load()
        calls = dict.fromkeys(names, 0)

        def counting(name: str) -> Callable:
            original = getattr(module, name)

            def call(*args: Any, **kwargs: Any) -> Any:
                calls[name] += 1
                return original(*args, **kwargs)

            return call

        with contextlib.ExitStack() as stack:
            for name in names:
                stack.enter_context(mock.patch.object(module, name, counting(name)))
            yield calls


def _ran_native(path: str, calls: dict[str, int]) -> None:
    idle = [name for name, n in calls.items() if n == 0]
    if idle:
        raise RuntimeError(f"mutation matrix: the {path} check never called the extension's {', '.join(idle)}")


def _module_compare(s: dict, model: MLP, x: Tensor, y: Tensor) -> bool:
    """``compare`` of the MLP (with a softmax on top for the softmax bugs) against native autograd."""
    if s["loss"] == "softmax":  # the unfused path: softmax, then cross-entropy on the probabilities
        nll = lambda p, t: -p.gather(1, t.unsqueeze(1)).log().mean()  # noqa: E731
        mine, ref = nn.Sequential(model, mnn.Softmax()), nn.Sequential(model.to_torch(), nn.Softmax(-1))
        return compare(mine, x, y, nll, reference=ref).ok
    return compare(model, x, y, s["loss"], reduction=s["reduction"]).ok


def _check_module_native(s: dict) -> bool:
    model = _model(s["activation"], 0)
    x, y = _data(s["loss"], _BATCH)
    names = ("mlp", "cross_entropy") if s["loss"] == "cross_entropy" else ("mlp",)
    with _native_calls(*names) as calls:
        ok = _module_compare(s, model, x, y)
    _ran_native("module-native", calls)
    return ok


def _check_module(s: dict) -> bool:
    model = _model(s["activation"], 0)
    x, y = _data(s["loss"], _BATCH)
    with python_paths():
        ok = _module_compare(s, model, x, y)
        if s["loss"] == "softmax":
            return ok
        ok = trace(model, x, y, s["loss"], reduction=s["reduction"]).ok and ok
        hook = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
        try:  # a global hook: the MLP runs layer by layer, through the per-op Functions
            ok = compare(model, x, y, s["loss"], reduction=s["reduction"]).ok and ok
        finally:
            hook.remove()
    return ok


def _check_fused(s: dict, native: bool = False) -> bool:
    """The fused trainer's steps against torch.optim.SGD's: its Python loop, or (``native``) the C++ one."""
    from ..fast import FusedTrainer

    configs = [_SGD[s["optim"]]] if s["optim"] != "plain" else [{}, _WITH_STATE]
    x, y = _data(s["loss"], _BATCH * _STEPS)
    ok = True
    for sgd in configs:
        model = _model(s["activation"], 0)
        expected = _reference_steps(model, s, sgd, x, y)
        trainer = FusedTrainer(copy.deepcopy(model), _manual_loss(s["loss"], s["reduction"]), lr=0.1, **sgd)
        with _native_calls("fused_step_many") if native else python_paths() as calls:
            trainer.step_many(*trainer.prepare(x, y), _BATCH)
        if native:
            _ran_native("fused-native", calls)
        ok = ok and not _differ([p.detach() for p in trainer.model.flat_parameters()], expected)
    return ok


def _check_vectorized(s: dict, sgd: dict) -> bool:
    from ..fast import VectorizedTrainer

    x, y = _data(s["loss"], _BATCH * _STEPS)
    models = [_model(s["activation"], seed) for seed in (0, 1)]
    expected = [_reference_steps(m, s, sgd, x, y) for m in models]
    trainer = VectorizedTrainer(
        [copy.deepcopy(m) for m in models], _manual_loss(s["loss"], s["reduction"]), lr=0.1, **sgd
    )
    for xb, yb in zip(x.split(_BATCH), y.split(_BATCH)):
        trainer.step(xb, yb)
    return not any(_differ(trainer.parameters_of(k), expected[k]) for k in range(len(models)))


def _check(path: str, s: dict) -> bool:
    if path == "module":
        return _check_module(s)
    if path == "module-native":
        return _check_module_native(s)
    if path == "fused":
        return _check_fused(s)
    if path == "fused-native":
        return _check_fused(s, native=True)
    if path == "vectorized":
        return _check_vectorized(s, {})
    if path == "vectorized-sgd":
        return _check_vectorized(s, _SGD[s["optim"]] if s["optim"] != "plain" else _WITH_STATE)
    raise ValueError(f"no check for path {path!r}")


def mutation_matrix(bugs: Optional[Sequence[str]] = None, paths: Optional[Sequence[str]] = None) -> MutationResult:
    """Every bug (default: the whole :data:`~manualbp.verify.bugs.CATALOGUE`) against every path (default:
    :data:`~manualbp.verify.bugs.PATHS`): caught, missed, or why it does not reach the path.

    Raises:
        ValueError: an unknown bug or path name.
        RuntimeError: a check fails without any bug (the baseline): the matrix would mean nothing.
    """
    import time

    bugs = list(CATALOGUE) if bugs is None else list(bugs)
    paths = list(PATHS) if paths is None else list(paths)
    for name in bugs:
        if name not in CATALOGUE:
            raise ValueError(f"bugs: {name!r} is not in the catalogue ({', '.join(CATALOGUE)})")
    for path in paths:
        if path not in PATHS:
            raise ValueError(f"paths: {path!r} is not one of {', '.join(PATHS)}")
    start = time.perf_counter()
    result = MutationResult(bugs, paths)
    baseline: dict[tuple[str, tuple], bool] = {}
    not_run = _native_not_run() if any(p in NATIVE_PATHS for p in paths) else None
    for name in bugs:
        bug = CATALOGUE[name]
        for path in paths:
            reason = bug.reach(path) or (not_run if path in NATIVE_PATHS else None)
            if reason is not None:
                result.cells[(name, path)] = reason
                continue
            s = _setting(bug)
            key = (path, tuple(sorted(s.items())))
            if key not in baseline:
                baseline[key] = _check(path, s)
                if not baseline[key]:
                    raise RuntimeError(
                        f"mutation matrix: the {path} check fails without any bug (setting {s}); "
                        "fix the path or the check first, the matrix means nothing until it passes"
                    )
            with inject_bug(name):
                passed = _check(path, s)
            result.cells[(name, path)] = MISSED if passed else CAUGHT
    result.seconds = time.perf_counter() - start
    return result


def _native_not_run() -> Optional[str]:
    """Why the compiled paths cannot be checked here (None: they can; building the extension if needed)."""
    if _native.mode() == "off":
        return f"{NOT_RUN}: MANUALBP_NATIVE=off (the compiled paths were switched off)"
    try:
        with mock.patch.dict(os.environ, {"MANUALBP_NATIVE": "require"}):
            _native.load()
    except RuntimeError as error:
        return f"{NOT_RUN}: the C++ extension could not be built here ({str(error)[:200]})"
    return None
