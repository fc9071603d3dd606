"""Reading a sweep: its finished jobs, what each job was given, and how long the sweep took.

:func:`load_sweep` reads a sweep directory (through :func:`manualbp.report.collect_jobs`); the per-job helpers
read a job's overrides (:func:`override`), its history (:func:`epochs_to`) and its rate and batch size;
:func:`sweep_runtime` and :func:`sweep_wall_time` are the sweep's training and wall-clock seconds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

from ..report import Job, collect_jobs

__all__ = ["override", "epochs_to", "load_sweep", "sweep_runtime", "sweep_wall_time"]


def override(job: Job, key: str, default: str = "") -> str:
    """The value ``key`` was given on the job's command line (its Hydra override), else ``default``."""
    for o in job.overrides:
        k, _, v = o.partition("=")
        if k.lstrip("+~") == key:
            return v
    return default


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


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
