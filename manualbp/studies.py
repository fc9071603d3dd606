"""The results studies: quantities the sweeps do not record, and the tables and figures of ``docs/results.md``.

Five studies reproduce classic findings (see ``docs/results.md``); each is a preset in ``conf/experiment/``
run with ``python experiments/train.py -m experiment=NAME``, and ``scripts/results.py`` turns the sweeps'
output directories into the document with :func:`write_results`. Nothing here trains: it reads
``metrics.json``/``history.csv`` (through :func:`manualbp.report.collect_jobs`) and, where a study needs the
network at initialization, rebuilds it exactly as :func:`manualbp.train.run` does (:func:`initial_state`).

Two measurements live here because the training loop does not make them:

- :func:`initial_grad_norms`: each layer's weight-gradient norm at step 0 (one forward/backward of the
  initialized network on the whole training split), the vanishing/exploding picture of Glorot & Bengio.
- :func:`hessian_lambda_max`: the largest Hessian eigenvalue of the training loss, by power iteration on
  Hessian-vector products computed by double backward through the manual module; gradient descent on a
  quadratic diverges above ``2 / lambda_max`` (LeCun et al., "Efficient BackProp").
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .nn import MLP, CrossEntropyLoss, MSELoss, SquaredErrorLoss
from .report import Job, collect_jobs, markdown_table
from .train.config import resolve_config
from .train.data import Dataset, load_dataset
from .train.loop import build_model

__all__ = [
    "InitialState",
    "LambdaMax",
    "initial_state",
    "initial_grad_norms",
    "saturation",
    "hessian_lambda_max",
    "STUDIES",
    "write_results",
]

LOSSES: dict[str, Callable[[], torch.nn.Module]] = {
    "cross_entropy": CrossEntropyLoss,
    "squared_error": SquaredErrorLoss,
    "mse": MSELoss,
}


# --------------------------------------------------------------------------------------------------
# Measurements at initialization
# --------------------------------------------------------------------------------------------------
@dataclass
class InitialState:
    """The network of a run at step 0, its data and its loss (the name, as the run resolved it)."""

    model: MLP
    data: Dataset
    loss: str


def initial_state(config: Any, dtype: Optional[torch.dtype] = None) -> InitialState:
    """Rebuild the initialized network of the run ``config`` describes: same data split, same weights.

    Mirrors :func:`manualbp.train.run` (data by ``seed``, the constructor under ``fork_rng``, then
    :func:`manualbp.init.initialize` with ``torch.Generator().manual_seed(seed)``), on the CPU.
    ``dtype`` (e.g. float64 for the Hessian) converts the model and the features after the draw.
    """
    cfg = resolve_config(config)
    run_dtype = getattr(torch, cfg["dtype"])
    data = load_dataset(cfg["data"], cfg["seed"], run_dtype, "cpu")
    mc = cfg["model"]
    model = build_model(mc, data.in_features, data.out_features, run_dtype, cfg["init"], cfg["seed"])
    loss = cfg["loss"]
    if loss == "auto":
        loss = "cross_entropy" if data.task == "classification" else "squared_error"
    if dtype is not None:
        model = model.to(dtype)
        data.x_train = data.x_train.to(dtype)
        if data.task == "regression":
            data.y_train = data.y_train.to(dtype)
    return InitialState(model, data, loss)


def initial_grad_norms(model: MLP, input: Tensor, target: Tensor, loss: str = "cross_entropy") -> list[float]:
    """Each layer's weight-gradient norm ||dL/dW^l|| for one forward/backward of ``model`` on the batch.

    Uses the manual module's hand-derived backward; the model's ``.grad`` fields are left untouched.
    """
    weights = [lin.weight for lin in model.linears]
    value = LOSSES[loss]()(model(input), target)
    grads = torch.autograd.grad(value, weights)
    return [float(torch.linalg.vector_norm(g.to(torch.float64))) for g in grads]


def saturation(model: MLP, input: Tensor) -> list[float]:
    """Per hidden layer, the fraction of units (over examples) whose activation derivative is below 1% of its peak.

    sigmoid: a (1 - a) < 0.0025 (|z| > 6); tanh: 1 - a^2 < 0.01 (|z| > 3); relu (and others): a == 0 (no
    gradient passes); see :func:`manualbp.train.metrics.saturated`. Saturated units pass almost no gradient
    back: the picture behind "N(0, 1) saturates".
    """
    from .train.metrics import saturated

    with torch.no_grad():
        _, hidden = model.forward_with_hidden(input)
    return [float(saturated(name, a).to(torch.float64).mean()) for a, (name, *_rest) in zip(hidden, model.activation_specs)]


@dataclass
class LambdaMax:
    """Result of :func:`hessian_lambda_max`: the eigenvalue estimate, the loss, and the iteration count."""

    value: float
    loss: float
    iterations: int
    converged: bool

    @property
    def lr_bound(self) -> float:
        """2 / lambda_max: the largest stable step of gradient descent on the local quadratic model."""
        return 2.0 / self.value if self.value > 0 else math.inf


def hessian_lambda_max(
    model: torch.nn.Module,
    input: Tensor,
    target: Tensor,
    loss: str = "cross_entropy",
    iters: int = 200,
    tol: float = 1e-6,
    seed: int = 0,
) -> LambdaMax:
    """Largest Hessian eigenvalue of the mean loss w.r.t. all parameters, by power iteration.

    Each iteration is one Hessian-vector product H v = d/dtheta (grad L . v), computed by double backward
    (``torch.autograd.grad`` with ``create_graph=True``) through the module's own backward; for
    :class:`manualbp.MLP` that differentiates the hand-derived two-pass formulas. The estimate is the
    Rayleigh quotient v^T H v of the unit iterate; iteration stops when it changes by less than
    ``tol`` (relative) or after ``iters`` products. Power iteration finds the eigenvalue of largest
    magnitude; when that one is negative, a second iteration on H - lambda I (shifted) finds the largest.

    Args:
        model: the network (its parameters are the Hessian's variables).
        input, target: the batch the loss is taken over (the whole training split for the LR study).
        loss: "cross_entropy", "squared_error" or "mse" (reduction "mean").
        iters: the most Hessian-vector products.
        tol: relative change of the estimate between iterations that counts as converged.
        seed: seeds the random start vector.

    Example:
        >>> model = manualbp.MLP(4, [5], 3, dtype=torch.float64)
        >>> hessian_lambda_max(model, torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))).value
    """
    from .hessian import hvp_operator  # the one Hessian-vector product (double backward through the module)

    matvec, _, value = hvp_operator(model, input, target, loss)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    v = torch.cat([torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device).reshape(-1) for p in params])
    v0 = v / torch.linalg.vector_norm(v)

    def power(shift: float) -> tuple[float, bool, int]:
        """Dominant eigenvalue of H - shift I (shift 0: H itself), plus shift."""
        v, estimate, converged, it = v0, math.nan, False, 0
        for it in range(1, iters + 1):
            hv = matvec(v)
            if shift:
                hv = hv - shift * v
            new = float(torch.dot(hv, v))  # Rayleigh quotient v^T (H - shift) v, |v| = 1
            if not math.isfinite(new):
                break
            if it > 1 and abs(new - estimate) <= tol * abs(new):
                estimate, converged = new, True
                break
            estimate = new
            v = hv.detach() / torch.linalg.vector_norm(hv)
        return estimate + shift, converged, it

    estimate, converged, it = power(0.0)
    if math.isfinite(estimate) and estimate < 0:
        # the dominant eigenvalue is negative: H - estimate I is positive semi-definite with top eigenvalue
        # lambda_max - estimate, so a second, shifted iteration finds the largest (algebraic) eigenvalue
        estimate, converged, more = power(estimate)
        it += more
    return LambdaMax(estimate, value, it, converged)


# --------------------------------------------------------------------------------------------------
# Helpers over sweeps
# --------------------------------------------------------------------------------------------------
def override(job: Job, key: str, default: str = "") -> str:
    """The value ``key`` was given on the job's command line (its Hydra override), else ``default``."""
    for o in job.overrides:
        k, _, v = o.partition("=")
        if k.lstrip("+~") == key:
            return v
    return default


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        if math.isinf(x):
            return "inf"
        return f"{x:.{digits}f}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"
    return str(x)


def epochs_to(job: Job, key: str, threshold: float) -> Optional[int]:
    """The first epoch whose ``key`` (e.g. val_accuracy) reaches ``threshold``, or None."""
    for h in job.history:
        if _finite(h.get(key)) and h[key] >= threshold:
            return int(h["epoch"])
    return None


def _lr(job: Job) -> float:
    return float(job.get("optim.lr"))


def _batch(job: Job) -> str:
    return str(job.get("optim.batch_size"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path.name


@dataclass
class Section:
    """One study's part of the document: markdown text plus the figure files it wrote."""

    markdown: str
    figures: list[str]


# --------------------------------------------------------------------------------------------------
# Study 1: initialization x activation (+ deep ReLU at depth 10/20/30)
# --------------------------------------------------------------------------------------------------
INIT_LABELS = {
    "zeros": "zeros",
    "normal": "N(0, 0.01)",
    "normal_wide": "N(0, 1)",
    "uniform": "U(-0.05, 0.05)",
    "xavier_uniform": "xavier (uniform)",
    "kaiming_normal": "kaiming (normal)",
    "lecun_normal": "lecun (normal)",
}


def _ordered(values: Sequence[str], order: Sequence[str]) -> list[str]:
    known = [v for v in order if v in values]
    return known + sorted(v for v in set(values) if v not in order)


def init_section(jobs: list[Job], img: Path, prefix: str = "results_init") -> Section:
    """Final test accuracy, epochs to 90% validation accuracy, and step-0 per-layer gradient norms."""
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
    header = ["init", *[f"{a}: test acc" for a in acts], *[f"{a}: epochs to 90%" for a in acts]]
    rows = []
    norms: dict[tuple[str, str], list[float]] = {}
    sat: dict[tuple[str, str], list[float]] = {}
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
        for a in acts:
            j = cell.get((i, a))
            if j is not None and j.config:
                st = initial_state(j.config)
                norms[(i, a)] = initial_grad_norms(st.model, st.data.x_train, st.data.y_train, st.loss)
                sat[(i, a)] = saturation(st.model, st.data.x_train)
    # gradient-norm table (step 0) and figure
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
    plt = _plt()
    figs = []
    if norms:
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
        figs.append(_save(fig, img / f"{prefix}_grad_norms.png"))
        # accuracy heatmap
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
        figs.append(_save(fig, img / f"{prefix}_accuracy.png"))
    md = [
        'Final test accuracy after the run, and the first epoch whose validation accuracy reaches 90% ("never": not within the run):',
        "",
        markdown_table(header, rows),
        "",
        "Per-layer weight-gradient norms ||dL/dW^l|| of the initialized network (step 0: one forward/backward "
        "of the manual MLP on the whole training split, computed by `manualbp.studies.initial_grad_norms`), and the "
        "fraction of saturated hidden units at step 0 (`manualbp.studies.saturation`: sigmoid a(1-a) < 0.0025, "
        "tanh 1-a^2 < 0.01, relu a = 0):",
        "",
        markdown_table(gheader, grows),
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


# --------------------------------------------------------------------------------------------------
# Study 2: learning rate and the 2 / lambda_max boundary
# --------------------------------------------------------------------------------------------------
def _unstable(job: Job, initial_loss: Optional[float]) -> bool:
    """Diverged, or ended with a training loss not below the loss at initialization."""
    if job.status == "diverged":
        return True
    final = job.metrics.get("train_loss")
    if not _finite(final):
        return True
    return initial_loss is not None and final >= initial_loss


def lr_section(
    jobs: list[Job], img: Path, prefix: str = "results_lr", hessian_iters: int = 200, title: Optional[str] = None
) -> Section:
    """Final training loss per rate; observed full-batch divergence boundary vs 2 / lambda_max at init."""
    acts = _ordered([str(j.get("model.activation")) for j in jobs], ["sigmoid", "tanh", "relu"])
    batches = _ordered([_batch(j) for j in jobs], ["full", "1", "8", "16", "32", "64", "128"])
    lrs = sorted({_lr(j) for j in jobs})
    cell = {(str(j.get("model.activation")), _batch(j), _lr(j)): j for j in jobs}
    # lambda_max at initialization, per activation (the init does not depend on the rate or the batch)
    lam: dict[str, LambdaMax] = {}
    for a in acts:
        j = next(j for j in jobs if str(j.get("model.activation")) == a)
        st = initial_state(j.config, dtype=torch.float64)
        lam[a] = hessian_lambda_max(st.model, st.data.x_train, st.data.y_train, st.loss, iters=hessian_iters)
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
    figs = [_save(fig, img / f"{prefix}.png")]
    md = [
        "Final training loss per learning rate (`div@E`: diverged at epoch E, i.e. the loss exceeded 10x its first "
        "step's or became NaN/inf):",
        "",
        markdown_table(header, rows),
        "",
        "The divergence boundary. lambda_max is the largest Hessian eigenvalue of the training loss (whole training "
        "split, float64) at initialization, by power iteration on Hessian-vector products computed by double backward "
        "through the manual module (`manualbp.studies.hessian_lambda_max`). A rate counts as unstable when its run "
        "diverged or ended with a training loss at or above the loss at initialization; the observed boundary lies "
        "between the largest stable rate below the first unstable one and that first unstable rate (the grid has "
        "three rates per decade).",
        "",
        markdown_table(bheader, brows),
        "",
        f"![final loss vs learning rate](img/{prefix}.png)",
    ]
    sec = Section("\n".join(md), figs)
    sec.lam = lam  # type: ignore[attr-defined]
    sec.boundary = boundary  # type: ignore[attr-defined]
    sec.largest_stable = largest_stable  # type: ignore[attr-defined]
    return sec


# --------------------------------------------------------------------------------------------------
# Study 3: stopping rules
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Study 4: single-example SGD vs mini-batch vs full batch
# --------------------------------------------------------------------------------------------------
def batch_section(jobs: list[Job], img: Path, prefix: str = "results_batch") -> Section:
    """Accuracy against epochs and against wall time, each batch size at its best rate."""
    batches = _ordered([_batch(j) for j in jobs], ["1", "32", "full"])
    lrs = sorted({_lr(j) for j in jobs})
    cell = {(_batch(j), _lr(j)): j for j in jobs}
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
    figs = [_save(fig, img / f"{prefix}.png")]
    md = [
        "Final test accuracy per batch size and rate, and the best rate's speed (by final validation accuracy):",
        "",
        markdown_table(header, rows),
        "",
        f"![accuracy vs epochs and wall time](img/{prefix}.png)",
    ]
    sec = Section("\n".join(md), figs)
    sec.best = best  # type: ignore[attr-defined]
    return sec


# --------------------------------------------------------------------------------------------------
# Study 5: MNIST-1D baseline
# --------------------------------------------------------------------------------------------------
def baseline_section(jobs: list[Job], img: Path, prefix: str = "results_mnist1d") -> Section:
    """Test accuracy per seed and its mean for the MLP and the zero-hidden-layer (logistic) model."""

    def name(j: Job) -> str:
        hidden = j.get("model.hidden") or []
        return (
            "logistic regression (no hidden layer)"
            if not hidden
            else f"MLP {'-'.join(str(h) for h in hidden)} {j.get('model.activation')}"
        )

    groups: dict[str, list[Job]] = defaultdict(list)
    for j in jobs:
        groups[name(j)].append(j)
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
    figs = [_save(fig, img / f"{prefix}.png")]
    md = [markdown_table(header, rows), "", f"![MNIST-1D learning curves](img/{prefix}.png)"]
    sec = Section("\n".join(md), figs)
    sec.means = means  # type: ignore[attr-defined]
    return sec


# --------------------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------------------
@dataclass
class Study:
    """A study of ``docs/results.md``: its preset(s), title, prose and table/figure builder."""

    key: str
    title: str
    presets: tuple[str, ...]
    intro: str
    build: Callable[..., Section]
    findings: str = ""


STUDIES: list[Study] = []  # filled by scripts/results.py's text (kept beside the numbers it describes)


def load_sweep(path: Union[str, Path]) -> list[Job]:
    """Finished jobs (with metrics.json and history) of the sweep at ``path``; [] when it does not exist."""
    p = Path(path)
    if not p.is_dir():
        return []
    return [j for j in collect_jobs(p) if j.metrics and j.status not in ("failed", "incomplete")]


def sweep_runtime(jobs: list[Job]) -> float:
    """Sum of the jobs' training wall time (seconds; excludes start-up and W&B)."""
    return sum(float(j.metrics.get("wall_time_s") or 0) for j in jobs)


def sweep_wall_time(jobs: list[Job]) -> Optional[float]:
    """Seconds from the sweep's start (its multirun.yaml) to its last metrics.json, from file times; None if unknown."""
    if not jobs:
        return None
    root = jobs[0].path.parent
    start = root / "multirun.yaml"
    ends = [(j.path / "metrics.json").stat().st_mtime for j in jobs if (j.path / "metrics.json").exists()]
    if not start.exists() or not ends:
        return None
    return max(ends) - start.stat().st_mtime


def read_sections(path: Union[str, Path]) -> dict[str, str]:
    """The ``## title`` sections of a results document written by :func:`write_results` (title -> body)."""
    sections: dict[str, str] = {}
    title = None
    for line in Path(path).read_text().splitlines(keepends=True):
        if line.startswith("## "):
            title = line[3:].strip()
            sections[title] = ""
        elif title is not None:
            sections[title] += line
    return {t: body.strip() for t, body in sections.items()}


def write_results(sections: Mapping[str, str], out: Union[str, Path], header: str = "# Results\n") -> Path:
    """Write ``header`` then each titled section (already rendered markdown) to ``out``."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        header.rstrip()
        + "\n\n"
        + "\n\n".join(f"## {title}\n\n{body.strip()}" for title, body in sections.items())
        + "\n"
    )
    path.write_text(text)
    return path
