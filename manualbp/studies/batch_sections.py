"""Study 4: single-example SGD vs mini-batch vs full batch (:func:`batch_section`)."""

from __future__ import annotations

from pathlib import Path

from ..report import Job, markdown_table
from .document import Section, _f, _ordered
from .figures import _plt, _save
from .sweeps import _batch, _lr, epochs_to

__all__ = ["batch_section"]


def _batch_table(batches: list[str], lrs: list[float], cell: dict[tuple[str, float], Job]) -> tuple[str, dict[str, Job]]:
    """Final test accuracy per batch size and rate, and the best rate's speed; also each batch size's best run (by
    final validation accuracy, among those that did not diverge)."""
    header = [
        "batch",
        *[f"lr {lr:g}" for lr in lrs],
        "best lr",
        "steps/epoch",
        "epochs to 90% val",
        "seconds to 90% val",
        "s/epoch",
    ]
    rows, best = [], {}
    for b in batches:
        cands = [cell[(b, lr)] for lr in lrs if (b, lr) in cell and cell[(b, lr)].status != "diverged"]
        if cands:
            best[b] = max(cands, key=lambda j: (j.history[-1].get("val_accuracy") or 0) if j.history else 0)
        row = [b]
        for lr in lrs:
            j = cell.get((b, lr))
            row.append(
                "-" if j is None else ("diverged" if j.status == "diverged" else _f(j.metrics.get("test_accuracy")))
            )
        j = best.get(b)
        if j is not None:
            e = epochs_to(j, "val_accuracy", 0.9)
            t = next((h["wall_time_s"] for h in j.history if h.get("val_accuracy", 0) >= 0.9), None)
            spe = j.metrics["steps"] / j.metrics["epochs"]
            row += [
                f"{_lr(j):g}",
                f"{spe:.0f}",
                str(e) if e else "never",
                _f(t, 2) if t else "never",
                _f(j.metrics["wall_time_s"] / j.metrics["epochs"], 3),
            ]
        else:
            row += ["-"] * 5
        rows.append(row)
    return markdown_table(header, rows), best


def _batch_figure(best: dict[str, Job], path: Path) -> str:
    """Validation accuracy against epochs and against wall time, one line per batch size at its best rate."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for b, j in best.items():
        label = (
            "single-example SGD" if b == "1" else "full-batch GD" if b == "full" else f"mini-batch {b}"
        ) + f" (lr {_lr(j):g})"
        axes[0].plot([h["epoch"] for h in j.history], [h["val_accuracy"] for h in j.history], label=label)
        axes[1].plot([h["wall_time_s"] for h in j.history], [h["val_accuracy"] for h in j.history], label=label)
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("wall time (s, shared 2-core CPU)")
    axes[1].set_xscale("log")
    axes[0].set_ylabel("validation accuracy")
    axes[0].legend(fontsize=8)
    fig.suptitle("Digits, 64 sigmoid units: each batch size at its best rate")
    return _save(fig, path)


def batch_section(jobs: list[Job], img: Path, prefix: str = "results_batch") -> Section:
    """Accuracy against epochs and against wall time, each batch size at its best rate."""
    batches = _ordered([_batch(j) for j in jobs], ["1", "32", "full"])
    lrs = sorted({_lr(j) for j in jobs})
    cell = {(_batch(j), _lr(j)): j for j in jobs}
    table, best = _batch_table(batches, lrs, cell)
    figs = [_batch_figure(best, img / f"{prefix}.png")]
    md = [
        "Final test accuracy per batch size and rate, and the best rate's speed (by final validation accuracy):",
        "",
        table,
        "",
        f"![accuracy vs epochs and wall time](img/{prefix}.png)",
    ]
    sec = Section("\n".join(md), figs)
    sec.best = best  # type: ignore[attr-defined]
    return sec
