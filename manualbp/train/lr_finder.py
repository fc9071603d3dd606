"""A learning-rate finder: Smith's learning-rate range test, as fastai's ``lr_find`` and Lightning's tuner run it.

:func:`lr_find` trains the network a config describes (the same config as :func:`manualbp.train.run`, the
same data split, initial weights, backend and optimizer) for one short throwaway run of ``num_steps``
minibatch steps whose rate grows exponentially from ``min_lr`` to ``max_lr``, records the loss against the
rate, and suggests a rate from the curve. What it follows:

- the range test: L. N. Smith, "Cyclical Learning Rates for Training Neural Networks" (2017), section 3.3;
- the schedule, ``mode="exponential"`` of Lightning's ``Tuner.lr_find`` and fastai's ``SchedExp``:
  ``lr_k = min_lr * (max_lr / min_lr) ** (k / (num_steps - 1))``, k = 0 .. num_steps - 1, so the first step
  takes ``min_lr`` and the last ``max_lr`` exactly (``num_steps`` plays Lightning's ``num_training``);
- the recorded loss: each step's minibatch loss (before its update), smoothed by an exponential moving
  average with bias correction, ``avg_k = beta avg_{k-1} + (1 - beta) loss_k``,
  ``smoothed_k = avg_k / (1 - beta^(k+1))`` with ``beta = 0.98`` (fastai's ``AvgSmoothLoss``, Lightning's
  ``_LRCallback``);
- the stop: when the smoothed loss exceeds ``diverge_factor`` (4, Lightning's ``early_stop_threshold``,
  fastai's ``stop_div``) times the best smoothed loss so far, or the loss is not finite;
- the suggestions, on the smoothed curve without its first ``num_steps // 10`` and last 5 points, cut at the
  first non-finite value (fastai's ``lr_find``):

  * ``"steep"``: the rate where the loss falls fastest against log(lr): the left end of the steepest
    forward difference ``(s_{k+1} - s_k) / (log lr_{k+1} - log lr_k)`` (fastai's ``steep``; Lightning's
    ``suggestion()`` takes the same steepest point but differentiates against lr itself);
  * ``"valley"``: fastai's ``valley`` (its default suggestion since fastai 2.5): the longest decreasing run
    of the loss (longest decreasing subsequence) and the point ``int(len/3) + int(len/6)`` (about half way)
    down it;
  * ``"min10"``: the rate at the minimum of the loss, divided by 10 (fastai's ``minimum``, the rule of the
    fastai course: "one order of magnitude before the minimum").

Unlike fastai and Lightning, nothing is restored afterwards: the run builds its own model from the config and
throws it away; the caller's config is never modified.

Example:
    >>> from manualbp.train import lr_find
    >>> result = lr_find({"data": "digits", "optim": {"batch_size": 32}, "progress": False})
    >>> result.suggestion, result.status
    >>> result.plot("lr_find.png", marks={"2/lambda_max": 0.58})
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .backends import BACKENDS
from .config import resolve_config
from .data import load_dataset
from .defaults import is_number
from .loop import build_model, resolve_device, resolve_loss
from .output import json_safe

__all__ = [
    "lr_find",
    "LRFinderResult",
    "SUGGESTIONS",
    "suggest_lr",
    "suggest_steep",
    "suggest_valley",
    "suggest_min10",
    "exponential_lrs",
    "smooth_losses",
]

Marks = Mapping[str, Union[float, Sequence[float]]]


# --------------------------------------------------------------------------------------------------
# The schedule and the smoothing
# --------------------------------------------------------------------------------------------------
def exponential_lrs(min_lr: float, max_lr: float, num_steps: int) -> list[float]:
    """``min_lr * (max_lr / min_lr) ** (k / (num_steps - 1))`` for k = 0 .. num_steps - 1 (ends exactly at max_lr)."""
    _check_range(min_lr, max_lr, num_steps)
    ratio = max_lr / min_lr
    lrs = [min_lr * ratio ** (k / (num_steps - 1)) for k in range(num_steps)]
    lrs[0], lrs[-1] = float(min_lr), float(max_lr)
    return lrs


def smooth_losses(losses: Sequence[float], beta: float = 0.98) -> list[float]:
    """The bias-corrected exponential moving average of ``losses`` (fastai's ``AvgSmoothLoss``; beta 0: the losses)."""
    _check_smoothing(beta)
    out, avg = [], 0.0
    for k, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (k + 1)))
    return out


# --------------------------------------------------------------------------------------------------
# The suggestions (each returns an index into lrs and the suggested rate)
# --------------------------------------------------------------------------------------------------
def suggest_steep(lrs: Sequence[float], losses: Sequence[float]) -> tuple[int, float]:
    """fastai's ``steep``: the left end of the steepest descent of loss against log(lr)."""
    if len(lrs) < 2:
        raise ValueError(f"steep needs at least 2 points, got {len(lrs)}")
    slopes = [(losses[k + 1] - losses[k]) / (math.log(lrs[k + 1]) - math.log(lrs[k])) for k in range(len(lrs) - 1)]
    k = min(range(len(slopes)), key=slopes.__getitem__)
    return k, float(lrs[k])


def suggest_valley(lrs: Sequence[float], losses: Sequence[float]) -> tuple[int, float]:
    """fastai's ``valley``: the longest decreasing run of the loss and a point about half way down it.

    As fastai: ``lds[i]`` is the length of the longest strictly decreasing subsequence ending at i; the valley
    is the ``lds[end]`` points before the ``end`` with the largest ``lds``; the index is
    ``start + int(len / 3) + int(len / 6)`` with ``len = end - start``.
    """
    n = len(losses)
    if n < 1:
        raise ValueError("valley needs at least 1 point, got 0")
    lds = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[end] < lds[i]:
                end = i
                start = end - lds[end]
    sections = (end - start) / 3
    k = max(0, min(n - 1, start + int(sections) + int(sections / 2)))
    return k, float(lrs[k])


def suggest_min10(lrs: Sequence[float], losses: Sequence[float]) -> tuple[int, float]:
    """fastai's ``minimum``: the rate at the smallest loss, divided by 10 (the index is the minimum's)."""
    if len(lrs) < 1:
        raise ValueError("min10 needs at least 1 point, got 0")
    k = min(range(len(losses)), key=losses.__getitem__)
    return k, float(lrs[k]) / 10


#: name -> function(lrs, losses) -> (index, rate)
SUGGESTIONS: dict[str, Callable[[Sequence[float], Sequence[float]], tuple[int, float]]] = {
    "steep": suggest_steep,
    "valley": suggest_valley,
    "min10": suggest_min10,
}


def suggest_lr(
    lrs: Sequence[float],
    losses: Sequence[float],
    method: str = "steep",
    skip_begin: Optional[int] = None,
    skip_end: int = 5,
) -> tuple[Optional[int], Optional[float]]:
    """A suggested rate from a (smoothed) range-test curve, as fastai's ``lr_find`` picks it.

    The curve is cut at its first non-finite loss, then its first ``skip_begin`` (default: a tenth of the
    points) and last ``skip_end`` points are left out; where that leaves too few points, the finite curve is
    used whole. Returns ``(index into lrs, rate)``, or ``(None, None)`` when no finite point is left.
    """
    _check_suggestion(method)
    if len(lrs) != len(losses):
        raise ValueError(f"lrs and losses must have the same length, got {len(lrs)} and {len(losses)}")
    n = next((k for k, v in enumerate(losses) if not math.isfinite(v)), len(losses))
    begin = len(lrs) // 10 if skip_begin is None else skip_begin
    lo, hi = begin, n - skip_end
    if hi - lo < 2:
        lo, hi = 0, n
    if hi - lo < 1 or (method == "steep" and hi - lo < 2):
        return None, None
    k, lr = SUGGESTIONS[method](list(lrs[lo:hi]), list(losses[lo:hi]))
    return lo + k, lr


# --------------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------------
@dataclass
class LRFinderResult:
    """What :func:`lr_find` returns.

    Attributes:
        lrs, losses, smoothed: per step taken, the rate, the minibatch loss (before the update) and its
            bias-corrected moving average.
        suggestion: the rate ``method`` suggests (None when the curve has no finite point to suggest from).
        method: the suggestion rule ("steep", "valley" or "min10").
        suggestions: every rule's rate, for comparison.
        status: "completed" (all ``num_steps`` steps ran) or "diverged".
        stop_reason: a sentence: "completed 100 steps" or "diverged at step k: ...".
        diverged_at: the step (0-based) at which the run stopped, or None.
        min_lr, max_lr, num_steps, smoothing, diverge_factor: the range test's settings.
        batch_size: the rows per step (the training split's size for "full").
        config: the resolved run config the finder trained.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: Optional[float]
    method: str
    suggestions: dict[str, Optional[float]]
    status: str
    stop_reason: str
    diverged_at: Optional[int]
    min_lr: float
    max_lr: float
    num_steps: int
    smoothing: float
    diverge_factor: Optional[float]
    batch_size: int
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def suggestion_index(self) -> Optional[int]:
        """The step whose rate the suggestion marks (for min10: the minimum's step)."""
        return suggest_lr(self.lrs, self.smoothed, self.method)[0]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe data (non-finite floats as null / "inf")."""
        return json_safe(asdict(self))

    def table(self, marks: Optional[Marks] = None) -> str:
        """A markdown table: each rule's suggested rate (the chosen one starred) and each marked rate, with
        its ratio to the suggestion."""
        from ..report import markdown_table

        rows = []
        for name, lr in self.suggestions.items():
            star = " *" if name == self.method else ""
            rows.append([f"suggestion: {name}{star}", _fmt(lr), _ratio(lr, self.suggestion)])
        for label, value in _marks(marks):
            rows.append([label, _fmt(value), _ratio(value, self.suggestion)])
        return markdown_table(["rate", "value", "/ suggestion"], rows)

    def plot(
        self,
        path: Optional[Union[str, os.PathLike]] = None,
        *,
        marks: Optional[Marks] = None,
        ax: Any = None,
        title: Optional[str] = None,
        color: str = "C0",
    ) -> Any:
        """Loss against rate (log x): the raw minibatch losses faint, the smoothed curve, the suggestion as a
        point and ``marks`` (label -> a rate or a list of rates, e.g. ``{"2/lambda_max at init": 0.58,
        "sweep best": 4.64, "2/lambda_max along training": [...]}``) as vertical lines.

        Writes ``path`` when given (and closes the figure); returns the axes.
        """
        import matplotlib

        if path is not None and ax is None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(6.4, 4.0))
        ax.plot(self.lrs, self.losses, color=color, alpha=0.25, lw=0.8, label="loss of each step's batch")
        ax.plot(self.lrs, self.smoothed, color=color, lw=1.6, label=f"smoothed (beta {self.smoothing:g})")
        k = self.suggestion_index
        if self.suggestion is not None and k is not None:
            y = self.smoothed[k] if self.method != "min10" else _interp_log(self.lrs, self.smoothed, self.suggestion)
            ax.plot([self.suggestion], [y], "o", color="red", ms=7, label=f"{self.method}: {_fmt(self.suggestion)}")
        styles = ["--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3))]
        mark_colors = ["C3", "C2", "C4", "C5", "C6"]
        seen: dict[str, int] = {}
        for label, value in _marks(marks):
            base = label.split(" [")[0]
            i = seen.setdefault(base, len(seen))
            ax.axvline(
                value,
                color=mark_colors[i % len(mark_colors)],
                ls=styles[i % len(styles)],
                lw=1.1,
                label=f"{base}: {_fmt(value)}" if " [" not in label else None,
            )
        finite = [v for v in self.smoothed + self.losses if math.isfinite(v)]
        if finite:
            lo, first = min(finite), self.smoothed[0]
            ax.set_ylim(lo - 0.05 * abs(lo), max(first, lo) * 1.6 + 1e-12 if math.isfinite(first) else None)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.set_title(title or f"LR range test ({self.stop_reason})", fontsize=10)
        ax.legend(fontsize=7)
        if own and path is not None:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            fig.tight_layout()
            fig.savefig(path, dpi=90)
            plt.close(fig)
        return ax


def _fmt(x: Optional[float]) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}"


def _ratio(x: Optional[float], ref: Optional[float]) -> str:
    if x is None or ref is None or not (math.isfinite(x) and math.isfinite(ref)) or ref == 0:
        return "-"
    return f"{x / ref:.3g}"


def _marks(marks: Optional[Marks]) -> list[tuple[str, float]]:
    """(label, rate) pairs; a list of rates gives labels "name [i]" after the first."""
    out: list[tuple[str, float]] = []
    for label, value in (marks or {}).items():
        values = [value] if is_number(value) else list(value)  # type: ignore[arg-type]
        for i, v in enumerate(values):
            if not (is_number(v) and v > 0):
                raise ValueError(f"marks[{label!r}] must be positive rates, got {v!r}")
            out.append((label if i == 0 else f"{label} [{i}]", float(v)))
    return out


def _interp_log(lrs: Sequence[float], ys: Sequence[float], x: float) -> float:
    import numpy as np

    return float(np.interp(math.log(x), np.log(np.asarray(lrs)), np.asarray(ys)))


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------
def _check_range(min_lr: object, max_lr: object, num_steps: object) -> None:
    if not (is_number(min_lr) and min_lr > 0):  # type: ignore[operator]
        raise ValueError(f"min_lr must be a positive number, got {min_lr!r}")
    if not (is_number(max_lr) and max_lr > 0):  # type: ignore[operator]
        raise ValueError(f"max_lr must be a positive number, got {max_lr!r}")
    if min_lr >= max_lr:  # type: ignore[operator]
        raise ValueError(f"min_lr must be below max_lr, got min_lr={min_lr!r} >= max_lr={max_lr!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")


def _check_smoothing(beta: object) -> None:
    if not (is_number(beta) and 0 <= beta < 1):  # type: ignore[operator]
        raise ValueError(f"smoothing must be a number in [0, 1) (0: no smoothing), got {beta!r}")


def _check_suggestion(method: object) -> None:
    if method not in SUGGESTIONS:
        raise ValueError(f"suggestion must be one of {', '.join(SUGGESTIONS)}, got {method!r}")


# --------------------------------------------------------------------------------------------------
# The range test
# --------------------------------------------------------------------------------------------------
def lr_find(
    config: Any = None,
    *,
    min_lr: float = 1e-6,
    max_lr: float = 10.0,
    num_steps: int = 100,
    smoothing: float = 0.98,
    diverge_factor: Optional[float] = 4.0,
    suggestion: str = "steep",
    progress: Optional[bool] = None,
) -> LRFinderResult:
    """Smith's learning-rate range test on the run ``config`` describes; see the module docstring.

    Args:
        config: what :func:`manualbp.train.run` takes (dict or ``DictConfig``): ``data``, ``model``, ``init``,
            ``optim`` (its ``batch_size``; momentum, weight decay, another optimizer: kept; its ``lr`` is
            replaced by the schedule), ``backend``, ``seed``, ``dtype``, ``device``, ``loss``. The stopping
            rules, schedule, logger and ``output_dir`` are validated and otherwise ignored. Not modified.
        min_lr, max_lr: the first and the last step's rate (``min_lr < max_lr``).
        num_steps: minibatch steps (>= 2); the batches are drawn as ``run`` draws them (an epoch's
            permutation from ``seed + 1``, then the next epoch's), so batch 32 on digits is about 36 steps an
            epoch and "full" is gradient descent.
        smoothing: beta of the bias-corrected moving average of the loss (0 <= beta < 1; 0: none).
        diverge_factor: stop when the smoothed loss exceeds this times its best (> 1; None: only a non-finite
            loss stops the run).
        suggestion: "steep", "valley" or "min10" (all three are in ``result.suggestions``).
        progress: a tqdm bar (quiet when stderr is not a terminal); default: the config's ``progress``.

    Returns:
        :class:`LRFinderResult`.
    """
    _check_range(min_lr, max_lr, num_steps)
    _check_smoothing(smoothing)
    if diverge_factor is not None and not (is_number(diverge_factor) and diverge_factor > 1):
        raise ValueError(f"diverge_factor must be a number > 1 or None, got {diverge_factor!r}")
    _check_suggestion(suggestion)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be true, false or None, got {progress!r}")
    cfg = resolve_config(config)  # a merged deep copy: the caller's config is never touched

    # the data, the model and the backend exactly as run() builds them
    device = resolve_device(cfg["device"])
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _range_test(cfg, device, min_lr, max_lr, num_steps, smoothing, diverge_factor, suggestion, progress)
    finally:
        if (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ) != previous:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _batches(cfg: dict[str, Any], device: torch.device) -> tuple[Any, Any, int, Iterator[tuple[Tensor, Tensor]]]:
    """The run's data, backend and batch size, and its batches in run()'s order (an endless iterator)."""
    dtype, seed = getattr(torch, cfg["dtype"]), cfg["seed"]
    data = load_dataset(cfg["data"], seed, dtype, device)
    loss = resolve_loss(cfg["loss"], data)
    model = build_model(cfg["model"], data.in_features, data.out_features, dtype, cfg["init"], seed).to(device)
    backend = BACKENDS[cfg["backend"]](model, loss, cfg["optim"])
    n = data.n_train
    bs = n if cfg["optim"]["batch_size"] == "full" else min(cfg["optim"]["batch_size"], n)
    # a backend may want the training set in its own form (fused: a ones column, one-hot targets), once
    x_fit, y_fit = backend.prepare(data.x_train, data.y_train) if hasattr(backend, "prepare") else (data.x_train, data.y_train)
    shuffle = torch.Generator().manual_seed(seed + 1)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            if bs < n:
                perm = torch.randperm(n, generator=shuffle).to(device)
                xe, ye = x_fit.index_select(0, perm), y_fit.index_select(0, perm)
            else:
                xe, ye = x_fit, y_fit
            yield from zip(xe.split(bs), ye.split(bs))

    return data, backend, bs, batches()


def _divergence(k: int, lr: float, value: float, s: float, best: float, diverge_factor: Optional[float]) -> Optional[str]:
    """Why the range test stops at step ``k`` (None to go on): a non-finite loss, or the smoothed loss above
    ``diverge_factor`` x its best (Lightning's early_stop_threshold)."""
    if not math.isfinite(value) or not math.isfinite(s):
        return f"diverged at step {k}: the loss is {value} at lr {lr:.3g}"
    if diverge_factor is not None and s > diverge_factor * min(best, s):
        return f"diverged at step {k}: smoothed loss {s:.4g} > {diverge_factor:g} x its best {min(best, s):.4g} (lr {lr:.3g})"
    return None


def _range_test(
    cfg: dict[str, Any],
    device: torch.device,
    min_lr: float,
    max_lr: float,
    num_steps: int,
    smoothing: float,
    diverge_factor: Optional[float],
    method: str,
    progress: Optional[bool],
) -> LRFinderResult:
    data, backend, bs, batches = _batches(cfg, device)
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    avg, best = 0.0, math.inf
    status, reason, diverged_at = "completed", f"completed {num_steps} steps", None
    show = cfg["progress"] if progress is None else progress
    bar = tqdm(
        total=num_steps, desc=f"lr-find {data.name} {cfg['backend']}", unit="step", disable=None if show else True, leave=False
    )
    threads = backend.threads(bs) if hasattr(backend, "threads") else contextlib.nullcontext()
    try:
        with threads:
            for k, ((xb, yb), lr) in enumerate(zip(batches, exponential_lrs(min_lr, max_lr, num_steps))):
                backend.set_lr(lr)
                value = float(backend.step(xb, yb))
                avg = smoothing * avg + (1 - smoothing) * value
                s = avg / (1 - smoothing ** (k + 1))  # fastai's bias-corrected moving average
                lrs.append(lr)
                losses.append(value)
                smoothed.append(s)
                bar.update(1)
                stop = _divergence(k, lr, value, s, best, diverge_factor)
                if stop is not None:
                    status, diverged_at, reason = "diverged", k, stop
                    break
                best = min(best, s)
                bar.set_postfix(lr=f"{lr:.2e}", loss=f"{s:.4f}")
    finally:
        bar.close()
    suggestions = {name: suggest_lr(lrs, smoothed, name)[1] for name in SUGGESTIONS}
    return LRFinderResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggestion=suggestions[method],
        method=method,
        suggestions=suggestions,
        status=status,
        stop_reason=reason,
        diverged_at=diverged_at,
        min_lr=float(min_lr),
        max_lr=float(max_lr),
        num_steps=num_steps,
        smoothing=float(smoothing),
        diverge_factor=None if diverge_factor is None else float(diverge_factor),
        batch_size=bs,
        config=cfg,
    )
