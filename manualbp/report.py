"""Sweep reports: gather every job of a Hydra multirun into a table and plots.

``python experiments/report.py multirun/2026-11-26/06-00-00`` (a thin wrapper around :func:`make_report`)
reads each job directory (``metrics.json``, ``history.csv``, ``config.json`` or ``.hydra/config.yaml``,
``.hydra/overrides.yaml``), and writes into ``<sweep>/report/``:

- ``report.md`` and ``report.csv``: one row per configuration, with status and stop reason (failed and
  diverged jobs included, with their error);
- ``learning_curves.png``: validation loss and accuracy (or R^2) per epoch, one panel per init;
- ``lr_init_heatmap.png``: final test accuracy (or test loss) for each learning rate x init;
- ``grad_norms.png``: per-layer gradient norms over training, one panel per init (vanishing gradients);
- ``stop_epochs.png``: the epoch each run stopped at, per stopping rule.

It works on partial sweeps: a job still running or killed shows as "incomplete", one that raised as "failed".
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["Job", "collect_jobs", "make_report", "markdown_table", "ReportResult"]


@dataclass
class Job:
    """One job of a sweep, as found on disk."""

    path: Path
    overrides: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def status(self) -> str:
        return str(self.metrics.get("status", "incomplete"))

    @property
    def task(self) -> str:
        if any(k.endswith("_r2") for k in self.metrics) or any("val_r2" in h for h in self.history[:1]):
            return "regression"
        return "classification"

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def stopping_label(self) -> str:
        rules = self.get("stopping", {}) or {}
        active = sorted(k for k, v in rules.items() if k != "max_epochs" and v not in (None, False))
        return "+".join(active) if active else "max_epochs"


def _read_overrides(path: Path) -> list[str]:
    file = path / ".hydra" / "overrides.yaml"
    if not file.exists():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.to_container(OmegaConf.load(file))]  # type: ignore[union-attr]


def _read_config(path: Path) -> dict:
    if (path / "config.json").exists():
        return json.loads((path / "config.json").read_text())
    file = path / ".hydra" / "config.yaml"
    if file.exists():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(file)
        return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]
    return {}


def _number(text: str) -> Any:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _read_history(path: Path) -> list[dict]:
    file = path / "history.csv"
    if not file.exists():
        return []
    with file.open(newline="") as fh:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def collect_jobs(sweep_dir: Union[str, Path]) -> list[Job]:
    """Every job directory below ``sweep_dir`` (a Hydra multirun dir, or a single run's dir)."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep_dir: {root} is not a directory")
    candidates = {p.parent.parent for p in root.glob("**/.hydra/overrides.yaml")}
    candidates |= {p.parent for p in root.glob("**/metrics.json")}
    candidates = {c for c in candidates if "report" not in c.relative_to(root).parts}
    jobs = []
    for path in sorted(candidates, key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(root).parts]):
        metrics = {}
        if (path / "metrics.json").exists():
            try:
                metrics = json.loads((path / "metrics.json").read_text())
            except json.JSONDecodeError as exc:
                metrics = {"status": "failed", "error": f"unreadable metrics.json: {exc}"}
        jobs.append(Job(path, _read_overrides(path), _read_config(path), metrics, _read_history(path)))
    return jobs


# --------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------
def _override_keys(jobs: list[Job], varying: bool = True) -> list[str]:
    """Override keys of the sweep: those whose value differs between jobs (or, varying=False, the rest)."""
    keys: list[str] = []
    for job in jobs:
        for o in job.overrides:
            key = o.split("=", 1)[0].lstrip("+~")
            if key not in keys and not key.startswith("hydra"):
                keys.append(key)
    values = {k: {_override_value(j, k) for j in jobs} for k in keys}
    return [k for k in keys if (len(values[k]) > 1) == varying]


def _override_value(job: Job, key: str) -> str:
    for o in job.overrides:
        k, _, v = o.partition("=")
        if k.lstrip("+~") == key:
            return v
    return ""


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def _table(jobs: list[Job]) -> tuple[list[str], list[list[str]]]:
    keys = _override_keys(jobs)
    regression = any(j.task == "regression" for j in jobs)
    score = "test_r2" if regression else "test_accuracy"
    metric_cols = [score, "test_loss", "val_loss", "epochs", "steps", "wall_time_s"]
    optional = ("max_grad_rel_diff", "max_param_rel_diff", "sharpness_init", "sharpness_final", "labels_changed")
    extra = [c for c in optional if any(c in j.metrics for j in jobs)]  # the columns some run of the sweep has
    header = ["job", *keys, "status", "stop_reason", *metric_cols, *extra, "error"]
    rows = []
    for job in jobs:
        error = str(job.metrics.get("error", "")).splitlines()[0] if job.metrics.get("error") else ""
        if job.status == "incomplete":
            error = error or "no metrics.json (still running, or killed)"
        rows.append(
            [
                job.name,
                *[_override_value(job, k) for k in keys],
                job.status,
                _fmt(job.metrics.get("stop_reason")),
                *[_fmt(job.metrics.get(c)) for c in metric_cols],
                *[_fmt(job.metrics.get(c)) for c in extra],
                error,
            ]
        )
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """An aligned markdown table (a header row and string cells)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, rule, *body])


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------
def _label(job: Job, skip: str, keys: Optional[list[str]] = None) -> str:
    """The job's varying overrides (``keys``), without those starting with ``skip``."""
    parts = [o for o in job.overrides if not o.split("=", 1)[0].lstrip("+~").startswith(skip)]
    if keys is not None:
        parts = [o for o in parts if o.split("=", 1)[0].lstrip("+~") in keys]
    return ", ".join(parts) or job.name


def _by_init(jobs: list[Job]) -> dict[str, list[Job]]:
    groups: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        groups[str(job.get("init.name", "default"))].append(job)
    return dict(groups)


def _plot_learning_curves(jobs: list[Job], out: Path, plt) -> Optional[Path]:
    with_history = [j for j in jobs if j.history]
    if not with_history:
        return None
    groups = _by_init(with_history)
    varying = _override_keys(jobs)
    regression = with_history[0].task == "regression"
    second = "val_r2" if regression else "val_accuracy"
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 7), squeeze=False, sharex=True)
    for col, (init, group) in enumerate(groups.items()):
        for job in group:
            epochs = [h.get("epoch") for h in job.history]
            style = "--" if job.status == "diverged" else "-"
            axes[0][col].plot(epochs, [h.get("val_loss") for h in job.history], style, label=_label(job, "init", varying))
            axes[1][col].plot(epochs, [h.get(second) for h in job.history], style)
        axes[0][col].set_title(f"init = {init}")
        axes[0][col].set_yscale("log")
        axes[0][col].set_ylabel("validation loss")
        axes[1][col].set_ylabel("validation R^2" if regression else "validation accuracy")
        axes[1][col].set_xlabel("epoch")
        axes[0][col].legend(fontsize=7, loc="upper right")
    fig.suptitle("Learning curves by weight initialization (dashed: diverged)")
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_heatmap(jobs: list[Job], out: Path, plt) -> Optional[Path]:
    inits = sorted({str(j.get("init.name")) for j in jobs if j.get("init.name") is not None})
    lrs = sorted({float(j.get("optim.lr")) for j in jobs if isinstance(j.get("optim.lr"), (int, float))})
    if len(inits) < 1 or len(lrs) < 2:
        return None
    regression = any(j.task == "regression" for j in jobs)
    key = "test_loss" if regression else "test_accuracy"
    cells: dict[tuple[int, int], list[float]] = defaultdict(list)
    notes: dict[tuple[int, int], str] = {}
    for job in jobs:
        if job.get("init.name") is None or not isinstance(job.get("optim.lr"), (int, float)):
            continue
        cell = (inits.index(str(job.get("init.name"))), lrs.index(float(job.get("optim.lr"))))
        value = job.metrics.get(key)
        if job.status in ("failed", "incomplete"):
            notes[cell] = job.status
        elif job.status == "diverged":
            notes[cell] = "diverged"
        elif isinstance(value, (int, float)) and math.isfinite(value):
            cells[cell].append(float(value))
    import numpy as np

    grid = np.full((len(inits), len(lrs)), np.nan)
    for (r, c), values in cells.items():
        grid[r, c] = sum(values) / len(values)
    fig, ax = plt.subplots(figsize=(1.3 * len(lrs) + 3, 0.6 * len(inits) + 2))
    image = ax.imshow(grid, cmap="viridis" if not regression else "viridis_r", aspect="auto")
    ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_yticks(range(len(inits)), inits)
    ax.set_xlabel("learning rate (optim.lr)")
    ax.set_ylabel("initialization")
    for r in range(len(inits)):
        for c in range(len(lrs)):
            text = notes.get((r, c)) if np.isnan(grid[r, c]) else f"{grid[r, c]:.3f}"
            if text:
                ax.text(
                    c,
                    r,
                    text,
                    ha="center",
                    va="center",
                    color="red" if np.isnan(grid[r, c]) else ("black" if image.norm(grid[r, c]) > 0.6 else "white"),
                    fontsize=8,
                )
    fig.colorbar(image, ax=ax, label=f"final {key.replace('_', ' ')}")
    ax.set_title(f"Final {key.replace('_', ' ')}: learning rate x init (mean over seeds)")
    fig.tight_layout()
    path = out / "lr_init_heatmap.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grad_columns(job: Job) -> list[str]:
    return [k for k in (job.history[0] if job.history else {}) if k.startswith("grad_norm_") and k[10:].isdigit()]


def _plot_grad_norms(jobs: list[Job], out: Path, plt) -> Optional[Path]:
    with_norms = [j for j in jobs if _grad_columns(j)]
    if not with_norms:
        return None
    groups = _by_init(with_norms)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False, sharey=True)
    for col, (init, group) in enumerate(groups.items()):
        ax = axes[0][col]
        job = group[0]  # the first configuration of this init: one line per layer
        for column in _grad_columns(job):
            values = [h.get(column) for h in job.history]
            ax.plot(
                [h.get("epoch") for h in job.history],
                [v if isinstance(v, (int, float)) and v > 0 else float("nan") for v in values],
                label=column.replace("grad_norm_", "layer "),
            )
        ax.set_yscale("log")
        ax.set_title(f"init = {init}\n({_label(job, 'init', _override_keys(jobs))})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("weight-gradient norm ||dL/dW|| (0 not drawn)")
    fig.suptitle("Per-layer gradient norms over training (vanishing / exploding gradients)")
    fig.tight_layout()
    path = out / "grad_norms.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_stop_epochs(jobs: list[Job], out: Path, plt) -> Optional[Path]:
    finished = [j for j in jobs if isinstance(j.metrics.get("epochs"), (int, float))]
    if not finished:
        return None
    groups: dict[str, list[Job]] = defaultdict(list)
    for job in finished:
        groups[job.stopping_label].append(job)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.8 * len(groups) + 2), 3.8))
    for i, (_rule, group) in enumerate(sorted(groups.items())):
        epochs = [j.metrics["epochs"] for j in group]
        colors = ["tab:red" if j.status == "diverged" else "tab:blue" for j in group]
        xs = [i + 0.08 * ((k % 5) - 2) for k in range(len(epochs))]
        ax.scatter(xs, epochs, c=colors, alpha=0.7)
        ax.hlines(sum(epochs) / len(epochs), i - 0.3, i + 0.3, color="black")
    ax.set_xticks(range(len(groups)), sorted(groups), rotation=15)
    ax.set_xlabel("stopping rule(s)")
    ax.set_ylabel("epoch at stop")
    ax.set_title("When each run stopped\n(bar: mean; red: diverged)", fontsize=10)
    fig.tight_layout()
    path = out / "stop_epochs.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class ReportResult:
    """What :func:`make_report` wrote."""

    jobs: list[Job]
    markdown: str
    files: list[Path]

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if j.status in ("failed", "incomplete")]


def make_report(
    sweep_dir: Union[str, Path], out_dir: Optional[Union[str, Path]] = None, wandb_logger: Optional[dict] = None
) -> ReportResult:
    """Write the table and plots of a sweep into ``out_dir`` (default ``<sweep_dir>/report``).

    ``wandb_logger``: a ``logger`` mapping (see ``manualbp.train.wandb_sink``) to also log the table and
    plots as one W&B run (job_type "report").
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = collect_jobs(sweep_dir)
    if not jobs:
        raise ValueError(f"sweep_dir: no job directories (with .hydra/ or metrics.json) below {sweep_dir}")
    out = Path(out_dir) if out_dir else Path(sweep_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    header, rows = _table(jobs)
    counts = defaultdict(int)
    for job in jobs:
        counts[job.status] += 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    common = [f"{k}={_override_value(jobs[0], k)}" for k in _override_keys(jobs, varying=False)]
    shared = f"Common to every job: {' '.join(common)}\n\n" if common else ""
    markdown = (
        f"# Sweep report: {Path(sweep_dir).resolve()}\n\n{len(jobs)} jobs: {summary}\n\n"
        f"{shared}{markdown_table(header, rows)}\n"
    )
    files = [out / "report.md", out / "report.csv"]
    files[0].write_text(markdown)
    with files[1].open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    for plot in (_plot_learning_curves, _plot_heatmap, _plot_grad_norms, _plot_stop_epochs):
        path = plot(jobs, out, plt)
        if path is not None:
            files.append(path)
    if wandb_logger is not None:
        _log_to_wandb(wandb_logger, header, rows, files, out, Path(sweep_dir).name)
    return ReportResult(jobs, markdown, files)


def _log_to_wandb(
    logger_cfg: dict, header: list[str], rows: list[list[str]], files: list[Path], out: Path, group: str
) -> None:
    from .train.wandb_sink import WandbSink

    cfg = {"name": "wandb", "job_type": "report", "group": group, "run_name": f"report-{group}", **logger_cfg}
    sink = WandbSink(cfg, {"sweep": group}, out)
    wandb = sink._wandb
    payload: dict[str, Any] = {"sweep_table": wandb.Table(columns=header, data=rows)}
    payload.update({p.stem: wandb.Image(str(p)) for p in files if p.suffix == ".png"})
    sink.run.log(payload)
    sink.finish("completed")


def main_cli(argv: Optional[list[str]] = None) -> int:
    """``python experiments/report.py SWEEP_DIR [--out DIR] [--wandb]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Gather a sweep's jobs into a table (markdown, CSV) and plots.")
    parser.add_argument("sweep_dir", help="a Hydra multirun directory, e.g. multirun/2026-11-26/06-00-00")
    parser.add_argument("--out", default=None, help="where to write the report (default: SWEEP_DIR/report)")
    parser.add_argument("--wandb", action="store_true", help="also log the table and plots to W&B (offline)")
    args = parser.parse_args(argv)
    try:
        result = make_report(
            args.sweep_dir, args.out, {"mode": os.environ.get("WANDB_MODE", "offline")} if args.wandb else None
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"report: error: {exc}")
        return 2
    print(result.markdown)
    print("wrote:", *[str(p) for p in result.files], sep="\n  ")
    if result.failed:
        print(f"{len(result.failed)} job(s) failed or are incomplete:")
        for job in result.failed:
            print(f"  {job.path}: {job.metrics.get('error', 'no metrics.json (still running, or killed)')}")
    return 0
