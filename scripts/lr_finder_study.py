"""Regenerate docs/lr_finder.md and docs/img/lr_finder.png: the LR finder next to 2/lambda_max and the sweep's best rate.

    python experiments/train.py -m experiment=lr_study progress=false   # the learning-rate sweep (optional)
    python scripts/lr_finder_study.py                                   # reads multirun/lr_study

On the learning-rate study's problem (docs/results.md section 2: digits, one hidden layer of 64, sigmoid, tanh
and relu, xavier uniform, plain SGD, full batch and batch 32), for each setting: the range test's suggested
rates (manualbp.train.lr_find with its defaults), 2/lambda_max at initialization
(manualbp.studies.hessian_lambda_max on the whole training split, float64, the same initial network) and the
best rate of the sweep (the lowest final training loss among the stable runs of the 13 rates). Without the
sweep's directory the script runs the 13 rates itself with the preset's settings (``--epochs``, default 50).

Room for "2/lambda_max along training": with ``--sharpness-key KEY``, a history column of the sweep's runs
holding lambda_max per epoch (the sharpness tracker's), 2/KEY of the best run is drawn beside the others.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from manualbp import studies as S
from manualbp.report import markdown_table
from manualbp.train import lr_find, run
from manualbp.train.lr_finder import LRFinderResult, suggest_lr

ROOT = Path(__file__).resolve().parents[1]
ACTIVATIONS = ("sigmoid", "tanh", "relu")
BATCHES = ("full", "32")
#: conf/experiment/lr_study.yaml's rates
RATES = (0.001, 0.00215, 0.00464, 0.01, 0.0215, 0.0464, 0.1, 0.215, 0.464, 1.0, 2.15, 4.64, 10.0)


def _batch_value(b: str) -> Any:
    return b if b == "full" else int(b)


def base_config(activation: str, batch: str) -> dict[str, Any]:
    """The lr study's run (its preset over the train defaults), without the rate."""
    return {
        "data": {"name": "digits"},
        "model": {"hidden": [64], "activation": activation},
        "init": {"name": "xavier_uniform"},
        "optim": {"name": "sgd", "batch_size": _batch_value(batch)},
        "progress": False,
    }


class Cell:
    """One (activation, batch) setting: the sweep's best rate, its stable/unstable rates, and 2/lambda_max."""

    def __init__(self) -> None:
        self.best_lr: Optional[float] = None
        self.best_loss: Optional[float] = None
        self.unstable: list[float] = []
        self.config: dict[str, Any] = {}
        self.along: list[float] = []


def _initial_loss(config: Any) -> float:
    st = S.initial_state(config)
    with torch.no_grad():
        return float(S.LOSSES[st.loss]()(st.model(st.data.x_train), st.data.y_train))


def from_sweep(jobs: list[Any], sharpness_key: Optional[str]) -> dict[tuple[str, str], Cell]:
    cells: dict[tuple[str, str], Cell] = {}
    init_loss: dict[str, float] = {}
    for j in jobs:
        a, b = str(j.get("model.activation")), S._batch(j)
        cell = cells.setdefault((a, b), Cell())
        if not cell.config:
            cell.config = {k: v for k, v in j.config.items() if k not in ("output_dir", "logger")}
            cell.config["progress"] = False
        if a not in init_loss:
            init_loss[a] = _initial_loss(j.config)
        loss = j.metrics.get("train_loss")
        if S._unstable(j, init_loss[a]):
            cell.unstable.append(S._lr(j))
        elif cell.best_loss is None or loss < cell.best_loss:
            cell.best_lr, cell.best_loss = S._lr(j), loss
            if sharpness_key:
                cell.along = [
                    2.0 / h[sharpness_key]
                    for h in j.history
                    if S._finite(h.get(sharpness_key)) and h[sharpness_key] > 0
                ]
    return cells


def from_runs(epochs: int) -> dict[tuple[str, str], Cell]:
    """The sweep's 13 rates, run here (same preset: divergence factor 10 checked each epoch)."""
    cells: dict[tuple[str, str], Cell] = {}
    for a in ACTIVATIONS:
        for b in BATCHES:
            cell = cells.setdefault((a, b), Cell())
            cell.config = base_config(a, b)
            initial: Optional[float] = None
            for lr in RATES:
                cfg = {**cell.config, "optim": {**cell.config["optim"], "lr": lr}}
                cfg["stopping"] = {"max_epochs": epochs, "divergence": {"factor": 10.0, "check_every": 1}}
                r = run(cfg)
                if initial is None:
                    initial = _initial_loss(cfg)
                loss = r.metrics.get("train_loss")
                if r.status == "diverged" or not S._finite(loss) or loss >= initial:
                    cell.unstable.append(lr)
                elif cell.best_loss is None or loss < cell.best_loss:
                    cell.best_lr, cell.best_loss = lr, loss
    return cells


def _f(x: Optional[float]) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _ratio(x: Optional[float], y: Optional[float]) -> Optional[float]:
    return x / y if x is not None and y is not None and y > 0 and math.isfinite(y) else None


def _span(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return f"{lo:.2g}x" if f"{lo:.2g}" == f"{hi:.2g}" else f"{lo:.2g}x to {hi:.2g}x"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default=str(ROOT / "multirun" / "lr_study"), help="the lr_study sweep directory")
    parser.add_argument("--epochs", type=int, default=50, help="epochs per rate when the sweep is run here")
    parser.add_argument("--out", default=str(ROOT / "docs" / "lr_finder.md"))
    parser.add_argument("--img", default=None, help="figure directory (default: img/ beside --out)")
    parser.add_argument("--sharpness-key", default=None, help="history column with lambda_max along training")
    parser.add_argument("--hessian-iters", type=int, default=200)
    args = parser.parse_args(argv)
    out = Path(args.out)
    img = Path(args.img) if args.img else out.parent / "img"
    t0 = time.perf_counter()

    jobs = S.load_sweep(args.sweep)
    if jobs:
        cells = from_sweep(jobs, args.sharpness_key)
        epochs = max(int(j.get("stopping.max_epochs") or 0) for j in jobs)
        wall = S.sweep_wall_time(jobs)
        source = (
            f"the sweep `{Path(args.sweep).relative_to(ROOT) if Path(args.sweep).is_relative_to(ROOT) else args.sweep}` "
            f"({len(jobs)} runs, {epochs} epochs each" + (f", {wall / 60:.1f} min wall time" if wall else "") + ")"
        )
        metrics = " metrics=sharpness" if args.sharpness_key == "sharpness" else ""
        sweep_cmd = f"python experiments/train.py -m experiment=lr_study{metrics} progress=false\n"
    else:
        print(f"no sweep at {args.sweep}: running the 13 rates here ({args.epochs} epochs)", file=sys.stderr)
        cells = from_runs(args.epochs)
        epochs = args.epochs
        source = f"the 13 rates run by this script ({args.epochs} epochs each, the preset's divergence rule)"
        sweep_cmd = ""

    # 2/lambda_max at initialization: one per activation (the init depends neither on the rate nor the batch)
    lam: dict[str, S.LambdaMax] = {}
    for a in ACTIVATIONS:
        st = S.initial_state(cells[(a, BATCHES[0])].config, dtype=torch.float64)
        lam[a] = S.hessian_lambda_max(st.model, st.data.x_train, st.data.y_train, st.loss, iters=args.hessian_iters)

    finder: dict[tuple[str, str], LRFinderResult] = {}
    for key, cell in cells.items():
        finder[key] = lr_find(cell.config)
    defaults = next(iter(finder.values()))

    header = [
        "activation",
        "batch",
        "steep",
        "valley",
        "min10",
        "steep, unsmoothed",
        "finder stop",
        "2/lambda_max at init",
        "sweep best rate",
        "steep / best",
        "steep / (2/lambda_max)",
        "best / (2/lambda_max)",
        "2/lambda_max along the best run: end (range)",
    ]
    rows = []
    ratios: dict[str, dict[str, list[float]]] = {b: {"best": [], "lam": [], "valley": [], "min10": []} for b in BATCHES}
    edge = []
    raw_steep: dict[tuple[str, str], Optional[float]] = {}
    for a in ACTIVATIONS:
        for b in BATCHES:
            r, cell, bound = finder[(a, b)], cells[(a, b)], lam[a].lr_bound
            s = r.suggestions
            raw = suggest_lr(r.lrs, r.losses, "steep")[1]
            raw_steep[(a, b)] = raw
            rb, rl = _ratio(s["steep"], cell.best_lr), _ratio(s["steep"], bound)
            for name, value in (("best", rb), ("lam", rl)):
                if value is not None:
                    ratios[b][name].append(value)
            for name in ("valley", "min10"):
                value = _ratio(s[name], cell.best_lr)
                if value is not None:
                    ratios[b][name].append(value)
            if cell.best_lr == max(RATES):
                edge.append(f"{a} {'full batch' if b == 'full' else 'batch ' + b}")
            stop = "completed" if r.status == "completed" else f"diverged at step {r.diverged_at} (lr {r.lrs[-1]:.3g})"
            rows.append(
                [
                    a,
                    b,
                    _f(s["steep"]),
                    _f(s["valley"]),
                    _f(s["min10"]),
                    _f(raw),
                    stop,
                    _f(bound),
                    _f(cell.best_lr) + (" (grid edge)" if cell.best_lr == max(RATES) else ""),
                    _f(rb),
                    _f(rl),
                    _f(_ratio(cell.best_lr, bound)),
                    f"{_f(cell.along[-1])} ({_f(min(cell.along))}-{_f(max(cell.along))})" if cell.along else "-",
                ]
            )

    # the figure: one panel per setting, the three rates marked
    plt = S._plt()
    fig, axes = plt.subplots(len(ACTIVATIONS), len(BATCHES), figsize=(11, 3.3 * len(ACTIVATIONS)), squeeze=False)
    for i, a in enumerate(ACTIVATIONS):
        for c, b in enumerate(BATCHES):
            cell = cells[(a, b)]
            marks: dict[str, Any] = {"2/lambda_max at init": lam[a].lr_bound}
            if cell.best_lr is not None:
                marks["sweep best"] = cell.best_lr
            if cell.along:
                marks["2/lambda_max along training"] = cell.along
            title = f"{a}, {'full batch (gradient descent)' if b == 'full' else 'batch ' + b}"
            finder[(a, b)].plot(ax=axes[i][c], marks=marks, title=title, color=f"C{i}")
    fig.suptitle(
        "LR range test (digits, one hidden layer of 64; red dot: the steep suggestion) vs 2/lambda_max and the sweep's best",
        fontsize=10,
    )
    figure = S._save(fig, img / "lr_finder.png")

    # findings, from the numbers
    findings = []
    for b in BATCHES:
        name = "Full-batch gradient descent" if b == "full" else f"With batch {b}"
        best_lam = [_ratio(cells[(a, b)].best_lr, lam[a].lr_bound) for a in ACTIVATIONS]
        findings.append(
            f"{name}: the steep suggestion is {_span(ratios[b]['best'])} the sweep's best rate and "
            f"{_span(ratios[b]['lam'])} 2/lambda_max at initialization (the best rate itself is "
            f"{_span([x for x in best_lam if x is not None])} 2/lambda_max); valley gives {_span(ratios[b]['valley'])} "
            f"and min10 {_span(ratios[b]['min10'])} the best rate."
        )
    full = [finder[(a, "full")] for a in ACTIVATIONS]
    shift = [_ratio(r.suggestions["steep"], raw_steep[(a, "full")]) for a, r in zip(ACTIVATIONS, full)]
    completed = [r for r in finder.values() if r.status == "completed"]
    at_end = sum(1 for r in completed if suggest_lr(r.lrs, r.smoothed, "min10")[0] == len(r.lrs) - 6)
    findings.append(
        f"The smoothing lags: with beta {defaults.smoothing:g} the moving average spans about "
        f"{1 / (1 - defaults.smoothing):.0f} steps, {math.log10(defaults.max_lr / defaults.min_lr) * (1 / (1 - defaults.smoothing)) / (defaults.num_steps - 1):.1f} "
        f"decades of rate, so on the noiseless full-batch curves the smoothed steep point sits {_span([x for x in shift if x is not None])} "
        f"the unsmoothed one; and in {at_end} of the {len(completed)} settings whose range test completed the smoothed "
        "minimum is the last point kept (the loss still falls where the range ends), so min10 is set by max_lr there, "
        "not by the curve."
    )
    along = {k: c for k, c in cells.items() if c.along and c.best_lr}
    if along:
        end = [c.best_lr / c.along[-1] for c in along.values()]
        first = [c.best_lr / c.along[0] for c in along.values()]
        findings.append(
            f"Along training (the sharpness tracker, `metrics=sharpness`, on the best run of each setting) 2/lambda_max "
            f"moves: the best rate is {_span(first)} 2/lambda_max after the first epoch and {_span(end)} it at the end. "
            "A rate above 2/lambda_max at initialization is not unstable for long: the sharpness falls below 2/eta "
            "within a few steps (docs/results.md, section 6), so neither 2/lambda_max at initialization nor a short "
            "range test sees the rate gradient descent can sustain."
        )
    if edge:
        findings.append(
            f"For {', '.join(edge)} the best rate is the grid's largest (10): the sweep's optimum may lie beyond it, so "
            "there the suggestion's ratio to the best rate is an upper bound."
        )
    seconds = time.perf_counter() - t0
    argv_text = " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    command = (
        "```bash\n" + sweep_cmd + f"python scripts/lr_finder_study.py{(' ' + argv_text) if argv_text else ''}\n" + "```"
    )
    md = [
        "# Learning-rate finder vs 2/lambda_max vs the sweep's best rate",
        "",
        "Smith's learning-rate range test (`manualbp.train.lr_find`, as fastai's `lr_find` and Lightning's "
        "`Tuner.lr_find` run it) on the learning-rate study's problem ([results](results.md), section 2): digits, one "
        "hidden layer of 64, xavier uniform, plain SGD, for full batch and batch 32. The finder uses its defaults: "
        f"{defaults.num_steps} steps from {defaults.min_lr:g} to {defaults.max_lr:g}, exponentially; the loss smoothed "
        f"with beta {defaults.smoothing:g} (bias-corrected); stop when the smoothed loss exceeds "
        f"{defaults.diverge_factor:g} x its best. Suggestions on the smoothed curve without its first tenth and last 5 "
        "points (fastai's trimming): steep (the steepest descent against log lr), valley (fastai's default) and min10 "
        "(the minimum's rate / 10). Beside them: 2/lambda_max of the training loss at initialization "
        "(`manualbp.studies.hessian_lambda_max`, the whole training split, float64, the same initial network) and "
        f"the best rate of {source}: the lowest final training loss among the runs that neither diverged nor ended "
        "above the initial loss.",
        "",
        command,
        "",
        f"Generated by `scripts/lr_finder_study.py` in {seconds:.0f} s (excluding the sweep). Nothing here is typed by hand.",
        "",
        markdown_table(header, rows),
        "",
        f"![LR range test vs 2/lambda_max and the sweep's best rate](img/{figure})",
        "",
        "Findings (computed from the numbers above):",
        "",
        *[f"- {line}" for line in findings],
        "",
        (
            "2/lambda_max along training: the sweep's runs measured the sharpness every epoch "
            "(`python experiments/train.py -m experiment=lr_study metrics=sharpness`); 2/sharpness of the best run is the "
            "fourth marked rate in the figure."
            if along
            else "2/lambda_max along training: run the sweep with `metrics=sharpness` and pass `--sharpness-key sharpness` "
            "to mark 2/sharpness of the best run (`LRFinderResult.plot(marks=...)` and `.table(marks=...)` take any rates)."
        ),
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md))
    print(f"wrote {out} and {img / figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
