"""Study 2: learning rate and the 2 / lambda_max boundary (:func:`lr_section`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..report import Job, markdown_table
from .document import Section, _f, _ordered
from .figures import _plt, _save
from .measure import LambdaMax, hessian_lambda_max, initial_state
from .sweeps import _batch, _finite, _lr

__all__ = ["lr_section"]


def _unstable(job: Job, initial_loss: Optional[float]) -> bool:
    """Diverged, or ended with a training loss not below the loss at initialization."""
    if job.status == "diverged":
        return True
    final = job.metrics.get("train_loss")
    if not _finite(final):
        return True
    return initial_loss is not None and final >= initial_loss


Cell = dict[tuple[str, str, float], Job]  # (activation, batch size, rate) -> the run


def _lr_cells(jobs: list[Job]) -> tuple[list[str], list[str], list[float], Cell]:
    """The activations, batch sizes and rates in the tables' order, and each (activation, batch, rate)'s run."""
    acts = _ordered([str(j.get("model.activation")) for j in jobs], ["sigmoid", "tanh", "relu"])
    batches = _ordered([_batch(j) for j in jobs], ["full", "1", "8", "16", "32", "64", "128"])
    lrs = sorted({_lr(j) for j in jobs})
    cell = {(str(j.get("model.activation")), _batch(j), _lr(j)): j for j in jobs}
    return acts, batches, lrs, cell


def _lambda_max_at_init(jobs: list[Job], acts: list[str], hessian_iters: int) -> dict[str, LambdaMax]:
    """lambda_max at initialization, per activation (the init does not depend on the rate or the batch)."""
    lam: dict[str, LambdaMax] = {}
    for a in acts:
        j = next(j for j in jobs if str(j.get("model.activation")) == a)
        st = initial_state(j.config, dtype=torch.float64)
        lam[a] = hessian_lambda_max(st.model, st.data.x_train, st.data.y_train, st.loss, iters=hessian_iters)
    return lam


def _loss_table(acts: list[str], batches: list[str], lrs: list[float], cell: Cell) -> str:
    """Final training loss per activation, batch size and rate (``div@E``: diverged at epoch E)."""
    header = ["activation", "batch", *[_f(lr, 4).rstrip("0").rstrip(".") if lr < 1e4 else str(lr) for lr in lrs]]
    rows = []
    for a in acts:
        for b in batches:
            row = [a, b]
            for lr in lrs:
                j = cell.get((a, b, lr))
                if j is None:
                    row.append("-")
                elif j.status == "diverged":
                    row.append(f"div@{j.metrics.get('epochs')}")
                else:
                    row.append(_f(j.metrics.get("train_loss")))
            rows.append(row)
    return markdown_table(header, rows)


def _boundary_table(
    acts: list[str], batches: list[str], lrs: list[float], cell: Cell, lam: Mapping[str, LambdaMax]
) -> tuple[str, dict[tuple[str, str], Optional[float]], dict[tuple[str, str], Optional[float]]]:
    """The observed divergence boundary against 2 / lambda_max; also, per (activation, batch), the first unstable
    rate and the largest stable rate below it."""
    bheader = [
        "activation",
        "batch",
        "lambda_max at init",
        "power iterations",
        "predicted 2/lambda_max",
        "largest stable rate",
        "smallest unstable rate",
        "observed / predicted",
    ]
    brows = []
    boundary: dict[tuple[str, str], Optional[float]] = {}
    largest_stable: dict[tuple[str, str], Optional[float]] = {}
    for a in acts:
        for b in batches:
            l0 = lam[a].loss
            stable = [lr for lr in lrs if (a, b, lr) in cell and not _unstable(cell[(a, b, lr)], l0)]
            unstable = [lr for lr in lrs if (a, b, lr) in cell and _unstable(cell[(a, b, lr)], l0)]
            first_bad = min((lr for lr in unstable if lr > (min(stable) if stable else 0)), default=None)
            last_ok = max((lr for lr in stable if first_bad is None or lr < first_bad), default=None)
            boundary[(a, b)] = first_bad
            largest_stable[(a, b)] = last_ok
            pred = lam[a].lr_bound
            ratio = "-"
            if first_bad is not None and last_ok is not None and math.isfinite(pred):
                ratio = f"{last_ok / pred:.2g} to {first_bad / pred:.2g}"
            brows.append(
                [
                    a,
                    b,
                    _f(lam[a].value),
                    f"{lam[a].iterations}{'' if lam[a].converged else ' (not converged)'}",
                    _f(pred),
                    _f(last_ok),
                    _f(first_bad) if first_bad else "none up to 10",
                    ratio,
                ]
            )
    return markdown_table(bheader, brows), boundary, largest_stable


def _lr_figure(
    jobs: list[Job],
    acts: list[str],
    batches: list[str],
    lrs: list[float],
    cell: Cell,
    lam: Mapping[str, LambdaMax],
    title: Optional[str],
    path: Path,
) -> str:
    """One panel per batch size: final training loss against the rate (x: diverged), 2/lambda_max dashed."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(batches), figsize=(max(7.0, 5 * len(batches)), 3.9), sharey=True, squeeze=False)
    colors = dict(zip(acts, ["C0", "C1", "C2", "C3", "C4"]))
    for c, b in enumerate(batches):
        ax = axes[0][c]
        for a in acts:
            xs, ys, dx, dy = [], [], [], []
            for lr in lrs:
                j = cell.get((a, b, lr))
                if j is None:
                    continue
                loss = j.metrics.get("train_loss")
                if j.status == "diverged" or not _finite(loss):
                    dx.append(lr)
                    dy.append(30.0)
                else:
                    xs.append(lr)
                    ys.append(loss)
            ax.plot(xs, ys, "o-", color=colors[a], label=f"{a}", ms=4)
            ax.plot(dx, dy, "x", color=colors[a], ms=8)
            ax.axvline(lam[a].lr_bound, color=colors[a], ls="--", lw=1)
        ax.axhline(lam[acts[0]].loss, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title("full-batch gradient descent" if b == "full" else f"SGD, batch {b}")
    axes[0][0].set_ylabel("final training loss (x: diverged)")
    axes[0][0].legend(fontsize=8, title="dashed: 2/lambda_max", title_fontsize=7)
    epochs = max(int(j.get("stopping.max_epochs") or 0) for j in jobs)
    data = jobs[0].get("data.name")
    fig.suptitle(
        title or f"Final training loss after {epochs} epochs vs learning rate ({data}, one hidden layer)", fontsize=11
    )
    return _save(fig, path)


def lr_section(
    jobs: list[Job], img: Path, prefix: str = "results_lr", hessian_iters: int = 200, title: Optional[str] = None
) -> Section:
    """Final training loss per rate; observed full-batch divergence boundary vs 2 / lambda_max at init."""
    acts, batches, lrs, cell = _lr_cells(jobs)
    lam = _lambda_max_at_init(jobs, acts, hessian_iters)
    boundary_table, boundary, largest_stable = _boundary_table(acts, batches, lrs, cell, lam)
    figs = [_lr_figure(jobs, acts, batches, lrs, cell, lam, title, img / f"{prefix}.png")]
    md = [
        "Final training loss per learning rate (`div@E`: diverged at epoch E, i.e. the loss exceeded 10x its first "
        "step's or became NaN/inf):",
        "",
        _loss_table(acts, batches, lrs, cell),
        "",
        "The divergence boundary. lambda_max is the largest Hessian eigenvalue of the training loss (whole training "
        "split, float64) at initialization, by power iteration on Hessian-vector products computed by double backward "
        "through the manual module (`manualbp.studies.hessian_lambda_max`). A rate counts as unstable when its run "
        "diverged or ended with a training loss at or above the loss at initialization; the observed boundary lies "
        "between the largest stable rate below the first unstable one and that first unstable rate (the grid has "
        "three rates per decade).",
        "",
        boundary_table,
        "",
        f"![final loss vs learning rate](img/{prefix}.png)",
    ]
    sec = Section("\n".join(md), figs)
    sec.lam = lam  # type: ignore[attr-defined]
    sec.boundary = boundary  # type: ignore[attr-defined]
    sec.largest_stable = largest_stable  # type: ignore[attr-defined]
    return sec
