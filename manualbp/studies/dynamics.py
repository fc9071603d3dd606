"""Training-dynamics studies of docs/results.md: the edge of stability and saturation along training.

Tables and figures from sweeps whose runs logged ``metrics.sharpness`` (the top Hessian eigenvalue of the
training loss, :mod:`manualbp.hessian`) or ``metrics.activations`` (per-layer activation statistics); the
prose that states what they show is computed in ``scripts/results.py``.

- :func:`eos_section`: Cohen et al. (ICLR 2021), Figure 1: training loss and sharpness against step for
  full-batch gradient descent at several rates, with the 2 / eta line of each; the table of when sharpness
  reaches 2 / eta and what it does afterwards.
- :func:`eos_digits_section`: the learning-rate study's full-batch runs with the sharpness measured.
- :func:`saturation_section`: Glorot & Bengio (AISTATS 2010), Figure 2: per layer, the mean and the 2nd-98th
  percentiles of the activations over training, for two initializations; and the saturated fractions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..report import Job, markdown_table
from .document import Section, _f, _ordered
from .figures import _plt, _save
from .sweeps import _lr

__all__ = ["EosRun", "eos_digits_section", "eos_runs", "eos_section", "Window", "saturation_runs", "saturation_section", "window"]


def _num(value: Any) -> Optional[float]:
    """A history cell as a float (None for a blank: an epoch without a measurement)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------------
# Edge of stability
# --------------------------------------------------------------------------------------------------
@dataclass
class EosRun:
    """One run's sharpness trajectory and the numbers the tables and findings read."""

    job: Job
    lr: float
    steps: list[int]  # steps (= epochs, full batch) with a sharpness measurement
    sharpness: list[float]
    loss_steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    @property
    def bound(self) -> float:
        return 2.0 / self.lr

    @property
    def initial(self) -> float:
        return float(self.job.metrics.get("sharpness_init") or math.nan)

    def first_reach(self, fraction: float = 0.9) -> Optional[int]:
        """The first step after initialization at which sharpness >= fraction x 2/eta (None if never; a start
        above 2/eta is not the edge of stability, the first steps then bring the sharpness down)."""
        return next((s for s, v in zip(self.steps, self.sharpness) if s > 0 and v >= fraction * self.bound), None)

    def sharpening(self) -> tuple[int, float, int, float]:
        """Progressive sharpening: the largest rise of the sharpness after initialization, ``(step, value)`` of
        its low and of its high (low before high). A start above 2/eta first falls and, with cross-entropy, the
        sharpness falls again late in training: neither is the sharpening phase, which this finds between them."""
        measured = [(s, v) for s, v in zip(self.steps, self.sharpness) if s > 0]
        best, low = (0, 0), 0
        for k in range(1, len(measured)):
            if measured[k][1] / measured[low][1] > measured[best[1]][1] / measured[best[0]][1]:
                best = (low, k)
            if measured[k][1] < measured[low][1]:
                low = k
        return (*measured[best[0]], *measured[best[1]])

    def ratios_after(self, step: int) -> list[float]:
        return [v / self.bound for s, v in zip(self.steps, self.sharpness) if s >= step]

    def loss_at(self, step: int) -> float:
        return next(v for s, v in zip(self.loss_steps, self.losses) if s >= step)

    def loss_rises(self, first: int, last: int) -> float:
        """The fraction of steps from ``first`` to ``last`` at which the training loss went up (a non-monotone
        descent)."""
        span = [v for s, v in zip(self.loss_steps, self.losses) if first <= s <= last]
        ups = sum(b > a for a, b in zip(span, span[1:]))
        return ups / max(len(span) - 1, 1)


def eos_runs(jobs: list[Job]) -> list[EosRun]:
    runs = []
    for j in sorted(jobs, key=_lr):
        measured = [(int(h["epoch"]), _num(h.get("sharpness"))) for h in j.history]
        pairs = [(s, v) for s, v in measured if v is not None]
        losses = [(int(h["epoch"]), _num(h.get("train_loss"))) for h in j.history]
        runs.append(
            EosRun(
                j,
                _lr(j),
                [0] + [s for s, _ in pairs],
                [float(j.metrics.get("sharpness_init") or math.nan)] + [v for _, v in pairs],
                [s for s, v in losses if v is not None],
                [v for _, v in losses if v is not None],
            )
        )
    return runs


@dataclass
class Window:
    """Where a run sits at the edge of stability: from the first measurement with sharpness >= 0.9 x 2/eta to
    the last one with sharpness >= 0.8 x 2/eta (after it the sharpness has left for good)."""

    first: int
    last: int
    in_band: float  # share of the window's measurements within 0.8-1.2 x 2/eta
    mean_ratio: float  # mean sharpness / (2/eta) over the window

    @property
    def steps(self) -> int:
        return self.last - self.first


def window(r: EosRun, low: float = 0.8, high: float = 1.2) -> Optional[Window]:
    """The run's :class:`Window` (None when the sharpness never reaches 0.9 x 2/eta)."""
    reach = r.first_reach()
    if reach is None:
        return None
    last = max(s for s, v in zip(r.steps, r.sharpness) if s >= reach and v >= low * r.bound)
    ratios = [v / r.bound for s, v in zip(r.steps, r.sharpness) if reach <= s <= last]
    return Window(reach, last, sum(low <= q <= high for q in ratios) / len(ratios), sum(ratios) / len(ratios))


def _eos_row(r: EosRun) -> list[str]:
    w = window(r)
    return [
        _f(r.lr, 3),
        _f(r.bound, 3),
        _f(r.initial, 3),
        _f(max(r.sharpness), 3),
        "never" if w is None else f"{w.steps} ({w.first}-{w.last})",
        "-" if w is None else _f(w.in_band, 2),
        "-" if w is None else _f(w.mean_ratio, 3),
        "-" if w is None else f"{_f(r.loss_at(w.first), 4)} -> {_f(r.loss_at(w.last), 4)}",
        "-" if w is None else _f(r.loss_rises(w.first, w.last), 3),
        _f(r.sharpness[-1] / r.bound, 3),
        _f(r.losses[-1] if r.losses else math.nan, 4),
        r.job.status,
    ]


def eos_section(jobs: list[Job], img: Path, prefix: str = "results_eos", title: str = "") -> Section:
    """The table and Cohen et al.'s Figure 1 (loss and sharpness against step, 2/eta dashed) for one sweep."""
    runs = eos_runs(jobs)
    header = [
        "eta", "2/eta", "sharpness at init", "max sharpness", "at the edge: steps (from-to)",
        "share within 0.8-1.2 x 2/eta", "mean sharpness / (2/eta)", "training loss over it",
        "share of its steps the loss rose", "final sharpness / (2/eta)", "final training loss", "status",
    ]  # fmt: skip
    table = markdown_table(header, [_eos_row(r) for r in runs])
    plt = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    for k, r in enumerate(runs):
        color = f"C{k}"
        top.plot(r.loss_steps, r.losses, color=color, label=f"eta = {r.lr:g}")
        bottom.plot(r.steps, r.sharpness, color=color, marker=".", markersize=3)
        bottom.axhline(r.bound, color=color, linestyle="--", linewidth=1)
    top.set_yscale("log")
    top.set_ylabel("training loss")
    top.legend()
    bottom.set_ylabel("sharpness (top Hessian eigenvalue)")
    bottom.set_xlabel("step (full-batch gradient descent)")
    bottom.set_ylim(0, 1.25 * max(r.bound for r in runs if r.bound < 3 * max(r.sharpness)))
    top.set_title(f"{title}: dashed lines are 2 / eta" if title else "dashed lines are 2 / eta")
    name = _save(fig, img / f"{prefix}.png")
    markdown = f"{table}\n\n![training loss and sharpness against step]({img.name}/{name})"
    section = Section(markdown, [name])
    section.runs = runs  # type: ignore[attr-defined]  # for the findings
    return section


def eos_digits_section(jobs: list[Job], img: Path, prefix: str = "results_eos_digits") -> Section:
    """The learning-rate study's full-batch runs: how far above 2/lambda_max at init each rate is, and where
    the sharpness went."""
    acts = _ordered([str(j.get("model.activation")) for j in jobs], ["sigmoid", "tanh", "relu"])
    header = [
        "activation", "eta", "2/eta", "sharpness at init", "eta / (2 / sharpness at init)",
        "max sharpness", "final sharpness", "share of steps with sharpness > 2/eta", "last step above 2/eta",
        "final train loss", "status",
    ]  # fmt: skip
    rows, by_act = [], {}
    for a in acts:
        runs = eos_runs([j for j in jobs if str(j.get("model.activation")) == a])
        by_act[a] = runs
        for r in runs:
            above = [s for s, v in zip(r.steps[1:], r.sharpness[1:]) if v > r.bound]
            rows.append(
                [a, _f(r.lr, 3), _f(r.bound, 3), _f(r.initial, 3), _f(r.lr * r.initial / 2, 2),
                 _f(max(r.sharpness), 3), _f(r.sharpness[-1], 3), _f(len(above) / max(len(r.steps) - 1, 1), 2),
                 str(above[-1]) if above else "-", _f(r.losses[-1] if r.losses else math.nan, 4), r.job.status]
            )  # fmt: skip
    plt = _plt()
    fig, axes = plt.subplots(1, len(acts), figsize=(5 * len(acts), 3.8), squeeze=False)
    for ax, a in zip(axes[0], acts):
        for k, r in enumerate(by_act[a]):
            ax.plot(r.steps, [v / r.bound for v in r.sharpness], color=f"C{k}", label=f"eta = {r.lr:g}")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"digits, {a}: sharpness / (2 / eta)")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    name = _save(fig, img / f"{prefix}.png")
    section = Section(f"{markdown_table(header, rows)}\n\n![sharpness over 2/eta]({img.name}/{name})", [name])
    section.by_act = by_act  # type: ignore[attr-defined]
    return section


# --------------------------------------------------------------------------------------------------
# Saturation
# --------------------------------------------------------------------------------------------------
def _layers(job: Job) -> int:
    return len(job.get("model.hidden") or [])


def _series(job: Job, key: str) -> tuple[list[int], list[float]]:
    """Epoch 0 (from the metrics' ``*_init``) then every measured epoch of ``key`` (e.g. ``act_mean_4``)."""
    epochs, values = [0], [float(job.metrics.get(f"{key}_init", math.nan))]
    for h in job.history:
        v = _num(h.get(key))
        if v is not None:
            epochs.append(int(h["epoch"]))
            values.append(v)
    return epochs, values


def saturation_runs(jobs: list[Job]) -> dict[tuple[str, str], list[Job]]:
    """(activation, init name) -> the runs (seeds), in the study's order."""
    out: dict[tuple[str, str], list[Job]] = {}
    for j in sorted(jobs, key=lambda j: (str(j.get("model.activation")), str(j.get("init.name")), int(j.get("seed", 0)))):
        out.setdefault((str(j.get("model.activation")), _init_label(j)), []).append(j)
    return out


def _init_label(job: Job) -> str:
    return "standard" if str(job.get("init.name")) == "torch_default" else "normalized"


def _mean(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else math.nan


def saturation_section(jobs: list[Job], img: Path, prefix: str = "results_saturation") -> Section:
    """Per activation x init, per layer: the mean activation at init, its extreme over training and at the end,
    the saturated fraction at the end; and Glorot & Bengio's Figure 2 (mean with a 2-98 percentile band)."""
    groups = saturation_runs(jobs)
    header = ["activation", "init", "layer", "mean at init", "lowest mean (epoch)", "mean at end", "98th pct at end",
              "saturated at end", "test acc"]  # fmt: skip
    rows = []
    for (act, init), runs in groups.items():
        for layer in range(1, _layers(runs[0]) + 1):
            first = runs[0]
            epochs, means = _series(first, f"act_mean_{layer}")
            low = min(range(len(means)), key=lambda i: means[i])
            rows.append(
                [act, init, str(layer), _f(means[0], 3), f"{_f(means[low], 3)} ({epochs[low]})", _f(means[-1], 3),
                 _f(_series(first, f"act_p98_{layer}")[1][-1], 3),
                 _f(_mean([_series(j, f"saturated_{layer}")[1][-1] for j in runs]), 3),
                 _f(_mean([float(j.metrics.get("test_accuracy", math.nan)) for j in runs]), 3)]
            )  # fmt: skip
    plt = _plt()
    keys = list(groups)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False, sharey=False)
    for ax, key in zip(axes[0], keys):
        job = groups[key][0]
        for layer in range(1, _layers(job) + 1):
            epochs, mean = _series(job, f"act_mean_{layer}")
            _, lo = _series(job, f"act_p2_{layer}")
            _, hi = _series(job, f"act_p98_{layer}")
            ax.plot(epochs, mean, color=f"C{layer - 1}", label=f"layer {layer}")
            ax.fill_between(epochs, lo, hi, color=f"C{layer - 1}", alpha=0.15)
        ax.set_title(f"{key[0]}, {key[1]} init (seed {job.get('seed', 0)})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("activation: mean, 2nd-98th percentile")
        ax.legend(fontsize=7)
    name = _save(fig, img / f"{prefix}.png")
    section = Section(f"{markdown_table(header, rows)}\n\n![activations per layer over training]({img.name}/{name})", [name])
    section.groups = groups  # type: ignore[attr-defined]
    return section
