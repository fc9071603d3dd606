"""Study 3: stopping rules and Prechelt's criteria (:func:`stopping_section`, :func:`criterion_stats`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..report import Job, markdown_table
from .document import Section, _f, _ordered
from .figures import _plt, _save
from .sweeps import _finite

__all__ = ["RULE_ORDER", "PRECHELT_NAMES", "FIRING_RULES", "SEED_HEADER", "CriterionStats", "rule_label", "criterion_stats", "stopping_section"]


RULE_ORDER = ["max_epochs", "early_stopping", "relative_improvement", "grad_norm_below"]


#: Prechelt's criteria (gl, pq, up) and the parameter that names each, as in his tables: GL_alpha, PQ_alpha, UP_s
PRECHELT_NAMES = (("gl", "GL", "alpha"), ("pq", "PQ", "alpha"), ("up", "UP", "s"))


FIRING_RULES = ("early_stopping", "GL", "PQ", "UP")


def rule_label(job: Job) -> str:
    """The job's stopping rule as the tables name it: Prechelt's GL_alpha / PQ_alpha / UP_s, else the rule name."""
    rules = job.get("stopping", {}) or {}
    for key, name, param in PRECHELT_NAMES:
        p = rules.get(key)
        if isinstance(p, Mapping) and p.get("enabled", True) is not False:
            return f"{name}_{float(p[param]):g}"
    return job.stopping_label


def _rule_order(labels: Sequence[str]) -> list[str]:
    prechelt = sorted(
        (v for v in set(labels) if v[:3] in ("GL_", "PQ_", "UP_")), key=lambda v: ("GLPQUP".index(v[:2]), float(v[3:]))
    )
    return _ordered(list(labels), RULE_ORDER + prechelt)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _min_val(hist: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    return min(hist, key=lambda h: h["val_loss"] if _finite(h.get("val_loss")) else math.inf)


def _seed_rows(rules: list[str], seeds: list[int], cell: Mapping[tuple[str, int], Job]) -> list[list[str]]:
    rows = []
    for r in rules:
        for s in seeds:
            j = cell.get((r, s))
            if j is None or not j.history:
                continue
            ref = cell.get(("max_epochs", s))
            best = _min_val(ref.history if ref is not None and ref.history else j.history)
            used = int(j.metrics.get("epochs", len(j.history)))
            at_stop = j.history[-1]
            rows.append(
                [
                    r,
                    str(s),
                    str(j.metrics.get("stop_reason")),
                    str(used),
                    str(best["epoch"]),
                    f"{used - int(best['epoch']):+d}",
                    str(j.metrics.get("best_epoch") if j.metrics.get("restored_best") else "-"),
                    _f(at_stop["val_loss"] - best["val_loss"]),
                    _f(at_stop.get("train_accuracy")),
                    _f(j.metrics.get("test_accuracy")),
                    _f(j.metrics.get("test_loss")),
                ]
            )
    return rows


SEED_HEADER = [
    "rule",
    "seed",
    "stop reason",
    "epochs used",
    "best epoch (min val loss)",
    "epochs past best",
    "restored epoch",
    "val loss at last epoch - min",
    "train acc at last epoch",
    "test acc at stop",
    "test loss at stop",
]


@dataclass
class CriterionStats:
    """One criterion's means over seeds (Prechelt's tables: training time and test error per criterion)."""

    rule: str
    epochs: float
    test_accuracy: float
    n: int
    fired: int  # runs the rule itself ended (not the max_epochs cap)
    at_best: int = 0  # runs that end on the weights of the epoch of lowest validation loss of their max_epochs run

    @property
    def test_error(self) -> float:
        return 1.0 - self.test_accuracy


def _ends_at_best(job: Job, ref: Optional[Job]) -> bool:
    """Whether the job ends on the weights of the epoch of lowest validation loss of the seed's max_epochs run."""
    if ref is None or not ref.history:
        return False
    end = job.metrics.get("best_epoch") if job.metrics.get("restored_best") else job.metrics.get("epochs")
    return end == _min_val(ref.history)["epoch"]


def criterion_stats(rules: list[str], cell: Mapping[tuple[str, int], Job]) -> dict[str, CriterionStats]:
    """Per rule: mean epochs used and test accuracy over the seeds, how many runs the rule stopped, and how many
    end on the weights of the seed's lowest validation loss."""
    out = {}
    for r in rules:
        js = [(j, cell.get(("max_epochs", seed))) for (rule, seed), j in cell.items() if rule == r]
        if js:
            out[r] = CriterionStats(
                r,
                _mean([float(j.metrics.get("epochs", len(j.history))) for j, _ in js]),
                _mean([float(j.metrics.get("test_accuracy")) for j, _ in js]),
                len(js),
                sum(1 for j, _ in js if j.metrics.get("stop_reason") not in ("max_epochs", "max_steps")),
                sum(1 for j, ref in js if _ends_at_best(j, ref)),
            )
    return out


def _criteria_table(stats: Mapping[str, CriterionStats]) -> str:
    """Prechelt's comparison: each criterion's epochs and test error, and both relative to the fastest criterion."""
    firing = [st for st in stats.values() if st.rule.startswith(FIRING_RULES)]
    fastest = min(firing, key=lambda st: st.epochs, default=None)
    header = [
        "criterion",
        "runs it stopped",
        "runs ending on the min-val-loss epoch",
        "mean epochs used",
        "epochs / fastest's",
        "mean test acc",
        "mean test error",
        "test error / fastest's",
    ]
    rows = []
    for st in stats.values():
        rel = fastest is not None and st.rule.startswith(FIRING_RULES)
        rows.append(
            [
                st.rule,
                f"{st.fired}/{st.n}",
                f"{st.at_best}/{st.n}",
                _f(st.epochs, 1),
                _f(st.epochs / fastest.epochs, 2) if rel else "-",
                _f(st.test_accuracy),
                _f(st.test_error),
                _f(st.test_error / fastest.test_error, 3) if rel else "-",
            ]
        )
    return markdown_table(header, rows)


def _stopping_figure(rules: list[str], cell: Mapping[tuple[str, int], Job], seed: int, title: str, path: Path):
    ref = cell.get(("max_epochs", seed))
    if ref is None or not ref.history:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    ep = [h["epoch"] for h in ref.history]
    axes[0].plot(ep, [h["train_loss"] for h in ref.history], label="train loss")
    axes[0].plot(ep, [h["val_loss"] for h in ref.history], label="validation loss")
    axes[0].set_yscale("log")
    axes[1].plot(ep, [h["train_accuracy"] for h in ref.history], label="train accuracy")
    axes[1].plot(ep, [h["val_accuracy"] for h in ref.history], label="validation accuracy")
    axes[0].legend(fontsize=7, loc="lower left")
    for k, r in enumerate(rules):
        j = cell.get((r, seed))
        if j is not None and r != "max_epochs":
            for ax in axes:
                ax.axvline(
                    int(j.metrics.get("epochs", 0)),
                    color=f"C{(k + 2) % 10}",
                    ls=("--", "-.", ":")[k % 3],
                    lw=1,
                    label=f"stop: {r}" if ax is axes[1] else None,
                )
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[1].set_ylim(0, 1.02)  # room below the curves for the legend
    axes[1].legend(fontsize=6, loc="lower right", ncol=3)
    fig.suptitle(f"{title}, the max_epochs run (seed {seed}), with each rule's stopping epoch")
    return _save(fig, path)


def _tradeoff_figure(stats: Mapping[str, CriterionStats], title: str, path: Path):
    """Prechelt's trade-off: mean test accuracy against mean epochs used, one point per criterion."""
    if not stats:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    markers = {"GL": "o", "PQ": "s", "UP": "^"}
    for k, st in enumerate(stats.values()):
        ax.scatter(st.epochs, st.test_accuracy, color=f"C{k % 10}", marker=markers.get(st.rule[:2], "D"), label=st.rule)
    ax.set_xlabel("mean epochs used")
    ax.set_ylabel("mean test accuracy")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"{title}: test accuracy vs training time per criterion", fontsize=9)
    return _save(fig, path)


def stopping_section(jobs: list[Job], img: Path, prefix: str = "results_stopping", title: str = "MNIST-1D") -> Section:
    """Per rule and seed: epochs used, test accuracy at the stop, gap to the best (lowest validation loss) epoch;
    per criterion (Prechelt's tables): mean epochs and test error, each relative to the fastest criterion."""
    seeds = sorted({int(j.get("seed", 0)) for j in jobs})
    rules = _rule_order([rule_label(j) for j in jobs])
    cell = {(rule_label(j), int(j.get("seed", 0))): j for j in jobs}
    stats = criterion_stats(rules, cell)
    figs = [
        f
        for f in (
            _stopping_figure(rules, cell, seeds[0], title, img / f"{prefix}.png"),
            _tradeoff_figure(stats, title, img / f"{prefix}_tradeoff.png"),
        )
        if f
    ]
    md = [
        "Each rule runs on the same seed's trajectory (training is deterministic, so the runs agree epoch for epoch "
        "until one stops); the best epoch is the one with the lowest validation loss in that seed's max_epochs run. "
        "Test accuracy and loss are those of the weights the run ends with: early stopping and Prechelt's criteria "
        'restore the weights of their best epoch (`restore_best: true`, the default; column "restored epoch"), the '
        "other rules keep the last epoch's.",
        "",
        markdown_table(SEED_HEADER, _seed_rows(rules, seeds, cell)),
        "",
        f"Per criterion, means over seeds {', '.join(map(str, seeds))} (as Prechelt's tables: training time and test "
        "error, each also relative to the fastest criterion that stops on its own):",
        "",
        _criteria_table(stats),
        "",
        *[f"![{title}: {f}](img/{f})" for f in figs],
    ]
    sec = Section("\n".join(md), figs)
    sec.summary = {r: (st.test_accuracy, st.epochs) for r, st in stats.items()}  # type: ignore[attr-defined]
    sec.stats = stats  # type: ignore[attr-defined]
    return sec
