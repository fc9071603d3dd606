"""Study 5: the MNIST-1D baseline (:func:`baseline_section`)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from ..report import Job, markdown_table
from .document import Section
from .figures import _plt, _save
from .sweeps import _finite

__all__ = ["baseline_section"]


def _model_name(j: Job) -> str:
    """The row label: the MLP's widths and activation, or logistic regression (no hidden layer)."""
    hidden = j.get("model.hidden") or []
    return (
        "logistic regression (no hidden layer)"
        if not hidden
        else f"MLP {'-'.join(str(h) for h in hidden)} {j.get('model.activation')}"
    )


def _baseline_groups(jobs: list[Job]) -> dict[str, list[Job]]:
    """The runs (seeds) of each model."""
    groups: dict[str, list[Job]] = defaultdict(list)
    for j in jobs:
        groups[_model_name(j)].append(j)
    return groups


def _baseline_table(groups: dict[str, list[Job]]) -> tuple[str, dict[str, float]]:
    """Per model: test accuracy per seed, mean, std, epochs, and the paper's figure; also the mean per model."""
    header = ["model", "seeds", "test accuracy per seed", "mean", "std", "epochs (best epoch)", "paper"]
    rows, means = [], {}
    for n, js in sorted(groups.items(), key=lambda kv: kv[0].startswith("logistic")):
        js = sorted(js, key=lambda j: int(j.get("seed", 0)))
        accs = [float(j.metrics["test_accuracy"]) for j in js if _finite(j.metrics.get("test_accuracy"))]
        mean = sum(accs) / len(accs) if accs else math.nan
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
        means[n] = mean
        rows.append(
            [
                n,
                ",".join(str(j.get("seed", 0)) for j in js),
                ", ".join(f"{a:.3f}" for a in accs),
                f"{mean:.3f}",
                f"{std:.3f}",
                ", ".join(f"{j.metrics.get('epochs')} ({j.metrics.get('best_epoch')})" for j in js),
                "about 0.32" if n.startswith("logistic") else "about 0.68",
            ]
        )
    return markdown_table(header, rows), means


def _baseline_figure(groups: dict[str, list[Job]], path: Path) -> str:
    """Validation (solid) and training (dotted) accuracy against epoch of each model's first seed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for k, (n, js) in enumerate(sorted(groups.items(), key=lambda kv: kv[0].startswith("logistic"))):
        j = min(js, key=lambda j: int(j.get("seed", 0)))
        ax.plot(
            [h["epoch"] for h in j.history],
            [h["val_accuracy"] for h in j.history],
            color=f"C{k}",
            label=f"{n}: validation",
        )
        ax.plot(
            [h["epoch"] for h in j.history],
            [h["train_accuracy"] for h in j.history],
            color=f"C{k}",
            ls=":",
            label=f"{n}: train",
        )
    ax.axhline(0.68, color="gray", ls="--", lw=0.8)
    ax.axhline(0.32, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    ax.set_title("MNIST-1D (seed 0); dashed: the paper's 0.68 and 0.32")
    return _save(fig, path)


def baseline_section(jobs: list[Job], img: Path, prefix: str = "results_mnist1d") -> Section:
    """Test accuracy per seed and its mean for the MLP and the zero-hidden-layer (logistic) model."""
    groups = _baseline_groups(jobs)
    table, means = _baseline_table(groups)
    figs = [_baseline_figure(groups, img / f"{prefix}.png")]
    md = [table, "", f"![MNIST-1D learning curves](img/{prefix}.png)"]
    sec = Section("\n".join(md), figs)
    sec.means = means  # type: ignore[attr-defined]
    return sec
