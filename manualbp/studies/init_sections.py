"""Study 1: initialization x activation (:func:`init_section`), and deep ReLU nets at several depths
(:func:`depth_section`)."""

from __future__ import annotations

import math
from pathlib import Path

from ..report import Job, markdown_table
from .document import Section, _f, _ordered
from .figures import _plt, _save
from .measure import initial_grad_norms, initial_state, saturation
from .sweeps import _finite, epochs_to, override

__all__ = ["INIT_LABELS", "init_section", "depth_section"]


INIT_LABELS = {
    "zeros": "zeros",
    "normal": "N(0, 0.01)",
    "normal_wide": "N(0, 1)",
    "uniform": "U(-0.05, 0.05)",
    "xavier_uniform": "xavier (uniform)",
    "kaiming_normal": "kaiming (normal)",
    "lecun_normal": "lecun (normal)",
}


Cell = dict[tuple[str, str], Job]  # (init, activation) -> the run


def _init_cells(jobs: list[Job]) -> tuple[list[str], list[str], Cell]:
    """The activations and inits in the tables' order, and each (init, activation)'s run."""
    acts = _ordered(
        [override(j, "model.activation", str(j.get("model.activation"))) for j in jobs], ["sigmoid", "tanh", "relu"]
    )
    inits = _ordered([override(j, "init", str(j.get("init.name"))) for j in jobs], list(INIT_LABELS))
    cell = {
        (
            override(j, "init", str(j.get("init.name"))),
            override(j, "model.activation", str(j.get("model.activation"))),
        ): j
        for j in jobs
    }
    return acts, inits, cell


def _init_accuracy_table(acts: list[str], inits: list[str], cell: Cell) -> str:
    """Per init: final test accuracy per activation, then the first epoch with 90% validation accuracy."""
    header = ["init", *[f"{a}: test acc" for a in acts], *[f"{a}: epochs to 90%" for a in acts]]
    rows = []
    for i in inits:
        row = [INIT_LABELS.get(i, i)]
        for a in acts:
            j = cell.get((i, a))
            acc = j.metrics.get("test_accuracy") if j else None
            row.append(_f(acc) if j and j.status != "diverged" else ("diverged" if j else "-"))
        for a in acts:
            j = cell.get((i, a))
            e = epochs_to(j, "val_accuracy", 0.9) if j else None
            row.append(str(e) if e is not None else "never")
        rows.append(row)
    return markdown_table(header, rows)


def _init_measurements(
    acts: list[str], inits: list[str], cell: Cell
) -> tuple[dict[tuple[str, str], list[float]], dict[tuple[str, str], list[float]]]:
    """Step-0 per-layer gradient norms and saturated fractions of each run's initialized network."""
    norms: dict[tuple[str, str], list[float]] = {}
    sat: dict[tuple[str, str], list[float]] = {}
    for i in inits:
        for a in acts:
            j = cell.get((i, a))
            if j is not None and j.config:
                st = initial_state(j.config)
                norms[(i, a)] = initial_grad_norms(st.model, st.data.x_train, st.data.y_train, st.loss)
                sat[(i, a)] = saturation(st.model, st.data.x_train)
    return norms, sat


def _grad_norm_table(
    acts: list[str], inits: list[str], norms: dict[tuple[str, str], list[float]], sat: dict[tuple[str, str], list[float]]
) -> str:
    """Per activation and init: each layer's step-0 gradient norm, first over last, and the saturated fractions."""
    n_layers = max((len(v) for v in norms.values()), default=0)
    gheader = [
        "init",
        "activation",
        *[f"layer {k}" for k in range(1, n_layers + 1)],
        "layer 1 / last",
        "saturated units, layers 1..4",
    ]
    grows = []
    for a in acts:
        for i in inits:
            if (i, a) in norms:
                g = norms[(i, a)]
                ratio = g[0] / g[-1] if g[-1] > 0 else math.nan
                grows.append(
                    [
                        INIT_LABELS.get(i, i),
                        a,
                        *[f"{x:.1e}" for x in g],
                        _f(ratio) if math.isfinite(ratio) else "-",
                        " ".join(f"{x:.2f}" for x in sat[(i, a)]),
                    ]
                )
    return markdown_table(gheader, grows)


def _grad_norm_figure(acts: list[str], inits: list[str], norms: dict[tuple[str, str], list[float]], path: Path) -> str:
    """One panel per activation: ||dL/dW^l|| at step 0 against the layer, one line per init (log scale)."""
    n_layers = max((len(v) for v in norms.values()), default=0)
    plt = _plt()
    fig, axes = plt.subplots(1, len(acts), figsize=(4.2 * len(acts), 3.8), sharey=True, squeeze=False)
    floor = 1e-20
    for c, a in enumerate(acts):
        ax = axes[0][c]
        for i in inits:
            if (i, a) in norms:
                g = [max(x, floor) for x in norms[(i, a)]]
                ax.plot(range(1, len(g) + 1), g, "o-", label=INIT_LABELS.get(i, i), ms=4)
        ax.set_yscale("log")
        ax.set_title(f"{a}")
        ax.set_xlabel("layer (1 = input side)")
        ax.set_xticks(range(1, n_layers + 1))
    axes[0][0].set_ylabel("||dL/dW|| at step 0 (0 drawn at 1e-20)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Per-layer weight-gradient norms of the initialized network (digits, 5 weight layers)")
    return _save(fig, path)


def _accuracy_heatmap(acts: list[str], inits: list[str], cell: Cell, path: Path) -> str:
    """Final test accuracy, init x activation, as a heatmap with each cell's value written in it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    grid = [
        [(cell[(i, a)].metrics.get("test_accuracy") or math.nan) if (i, a) in cell else math.nan for a in acts]
        for i in inits
    ]
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for r in range(len(inits)):
        for c in range(len(acts)):
            v = grid[r][c]
            ax.text(
                c,
                r,
                "-" if math.isnan(v) else f"{v:.2f}",
                ha="center",
                va="center",
                color="w" if v < 0.6 else "k",
                fontsize=9,
            )
    ax.set_xticks(range(len(acts)), acts)
    ax.set_yticks(range(len(inits)), [INIT_LABELS.get(i, i) for i in inits])
    ax.set_title("Final test accuracy (digits, 4 hidden layers)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def init_section(jobs: list[Job], img: Path, prefix: str = "results_init") -> Section:
    """Final test accuracy, epochs to 90% validation accuracy, and step-0 per-layer gradient norms."""
    acts, inits, cell = _init_cells(jobs)
    norms, sat = _init_measurements(acts, inits, cell)
    figs = []
    if norms:
        figs.append(_grad_norm_figure(acts, inits, norms, img / f"{prefix}_grad_norms.png"))
        figs.append(_accuracy_heatmap(acts, inits, cell, img / f"{prefix}_accuracy.png"))
    md = [
        'Final test accuracy after the run, and the first epoch whose validation accuracy reaches 90% ("never": not within the run):',
        "",
        _init_accuracy_table(acts, inits, cell),
        "",
        "Per-layer weight-gradient norms ||dL/dW^l|| of the initialized network (step 0: one forward/backward "
        "of the manual MLP on the whole training split, computed by `manualbp.studies.initial_grad_norms`), and the "
        "fraction of saturated hidden units at step 0 (`manualbp.studies.saturation`: sigmoid a(1-a) < 0.0025, "
        "tanh 1-a^2 < 0.01, relu a = 0):",
        "",
        _grad_norm_table(acts, inits, norms, sat),
        "",
        f"![per-layer gradient norms at step 0](img/{prefix}_grad_norms.png)",
        f"![final test accuracy](img/{prefix}_accuracy.png)",
    ]
    sec = Section("\n".join(md), figs)
    sec.saturation = sat  # type: ignore[attr-defined]
    sec.grad_norms = norms  # type: ignore[attr-defined]
    return sec


def depth_section(jobs: list[Job], img: Path, prefix: str = "results_depth") -> Section:
    """Deep ReLU nets: test accuracy per depth and init, validation accuracy curves."""

    def depth(j: Job) -> int:
        return len(j.get("model.hidden") or [])

    depths = sorted({depth(j) for j in jobs})
    inits = _ordered([str(j.get("init.name")) for j in jobs], list(INIT_LABELS))
    cell = {(str(j.get("init.name")), depth(j)): j for j in jobs}
    header = [
        "hidden layers",
        *[f"{INIT_LABELS.get(i, i)}: test acc" for i in inits],
        *[f"{INIT_LABELS.get(i, i)}: layer-1 grad norm, epoch 1" for i in inits],
    ]
    rows = []
    for d in depths:
        row = [str(d)]
        for i in inits:
            j = cell.get((i, d))
            row.append(_f(j.metrics.get("test_accuracy")) if j else "-")
        for i in inits:
            j = cell.get((i, d))
            row.append(
                f"{j.history[0]['grad_norm_1']:.1e}"
                if j and j.history and _finite(j.history[0].get("grad_norm_1"))
                else "-"
            )
        rows.append(row)
    plt = _plt()
    fig, axes = plt.subplots(1, len(depths), figsize=(3.8 * len(depths), 3.4), sharey=True, squeeze=False)
    for c, d in enumerate(depths):
        ax = axes[0][c]
        for i in inits:
            j = cell.get((i, d))
            if j and j.history:
                ax.plot(
                    [h["epoch"] for h in j.history],
                    [h["val_accuracy"] for h in j.history],
                    "o-",
                    ms=3,
                    label=INIT_LABELS.get(i, i),
                )
        ax.set_title(f"{d} hidden ReLU layers of 64")
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("validation accuracy")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Deep ReLU nets, SGD lr 0.01: kaiming trains, xavier stalls")
    figs = [_save(fig, img / f"{prefix}.png")]
    md = [markdown_table(header, rows), "", f"![deep ReLU: validation accuracy by depth](img/{prefix}.png)"]
    return Section("\n".join(md), figs)
