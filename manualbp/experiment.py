"""Hydra glue: one job of ``experiments/train.py`` -> :func:`manualbp.train.run`, with its files.

The entry point stays thin (``@hydra.main`` + :func:`train_job`); everything a job does beyond
``run(config)`` lives here: the W&B run's group and name from the sweep, a ``metrics.json`` with
status "failed" and the error when a job raises (so ``report.py`` lists it), and the printed headline.

Errors: a failing single run prints one line (``error: ValueError: data.path ...``) and exits 1; in a
multirun the failing job is recorded and the sweep goes on, and :class:`SweepFailureReport` (a Hydra
callback in ``conf/train.yaml``) lists the failed jobs at the end and exits 1. Set ``MANUALBP_TRACEBACK=1``
(or Hydra's ``HYDRA_FULL_ERROR=1``) to get the full traceback instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

try:  # Hydra is a dependency; the callback base class only matters when Hydra loads this module
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[assignment,misc]

log = logging.getLogger("manualbp")


def run_dirname(override_dirname: str) -> str:
    """A single run's directory name from its overrides ("default" for none), so the same command finds
    the same directory again: a killed run resumes, a finished one returns its stored result."""
    return override_dirname.replace("/", "_") or "default"


def _register_resolvers() -> None:
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover
        return
    OmegaConf.register_new_resolver("run_dirname", run_dirname, replace=True)


_register_resolvers()

__all__ = ["train_job", "objective", "headline", "prepare_config", "SweepFailureReport"]


def prepare_config(cfg: Any) -> dict:
    """The composed Hydra config as the plain dict ``run`` takes, with output_dir and W&B naming filled in."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    config: dict = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    hydra_cfg = HydraConfig.get()
    if not config.get("output_dir"):
        config["output_dir"] = hydra_cfg.runtime.output_dir
    logger = config.get("logger") or {}
    if logger.get("name") == "wandb":
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        if not logger.get("group") and multirun:
            sweep = Path(hydra_cfg.sweep.dir)
            logger["group"] = f"{sweep.parent.name}_{sweep.name}" if sweep.parent.name else sweep.name
        if not logger.get("run_name"):
            logger["run_name"] = hydra_cfg.job.override_dirname or (
                "default" if not multirun else f"job{hydra_cfg.job.num}"
            )
    return config


def objective(result: Any, config: dict) -> float:
    """The monitored metric (early stopping's monitor, else validation loss), for sweepers to minimize."""
    rules = config.get("stopping") or {}
    monitor = (rules.get("early_stopping") or {}).get("monitor", "val_loss") if isinstance(rules, dict) else "val_loss"
    value = result.metrics.get(monitor, result.metrics.get("val_loss"))
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return math.inf
    return -float(value) if "accuracy" in monitor or "r2" in monitor else float(value)


def headline(result: Any, output_dir: Optional[str]) -> str:
    """One paragraph a user reads at the end of a run."""
    m = result.metrics
    score = "test_r2" if "test_r2" in m else "test_accuracy"
    parts = [f"status: {result.status}" + (f" ({result.stop_reason})" if result.stop_reason else "")]
    parts.append(
        f"epochs: {m.get('epochs')}  steps: {m.get('steps')}  wall time: {m.get('wall_time_s', float('nan')):.1f} s"
    )
    parts.append(
        f"{score}: {m.get(score, float('nan')):.4f}  test_loss: {m.get('test_loss', float('nan')):.4f}  "
        f"val_loss: {m.get('val_loss', float('nan')):.4f}"
    )
    if "max_grad_rel_diff" in m:
        parts.append(
            f"manual vs autograd: max grad rel diff {m['max_grad_rel_diff']:.2e}, "
            f"max param rel diff {m.get('max_param_rel_diff', float('nan')):.2e}"
        )
    if output_dir:
        names = ("metrics.json", "history.csv", "config.json", "checkpoint.pt", "wandb/")
        present = [n for n in names if (Path(output_dir) / n.rstrip("/")).exists()]
        parts.append(f"results: {output_dir} ({', '.join(present)})")
    return "\n".join(parts)


def _write_failure(output_dir: Optional[str], exc: BaseException) -> None:
    if not output_dir:
        return
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        record = {
            "status": "failed",
            "stop_reason": None,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        }
        tmp = Path(output_dir) / "metrics.json.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, Path(output_dir) / "metrics.json")
    except OSError:
        pass  # the output dir itself is the problem; the raised error says so


def _announce_existing(output_dir: Optional[str]) -> None:
    """Say so when this job's directory already holds a finished run (stored result) or a checkpoint (resume)."""
    if not output_dir or not (Path(output_dir) / "checkpoint.pt").exists():
        return
    metrics = Path(output_dir) / "metrics.json"
    try:
        status = json.loads(metrics.read_text()).get("status") if metrics.exists() else None
    except (OSError, json.JSONDecodeError):
        status = None
    if status in ("completed", "stopped", "diverged"):
        print(f"{output_dir} holds a finished run: showing its stored result (delete the directory, or pass "
              "hydra.run.dir=..., to train again)", flush=True)
    else:
        print(f"resuming from the checkpoint in {output_dir}", flush=True)


def _want_traceback() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("MANUALBP_TRACEBACK", "HYDRA_FULL_ERROR"))


def train_job(cfg: Any) -> float:
    """Run one configured training job; returns the objective (see :func:`objective`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .train import run

    config = prepare_config(cfg)
    _announce_existing(config.get("output_dir"))
    try:
        result = run(config)
    except Exception as exc:
        _write_failure(config.get("output_dir"), exc)
        if _want_traceback():
            raise
        message = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("job %s failed: %s", HydraConfig.get().job.num, message)
            return math.inf  # the sweep goes on; SweepFailureReport lists this job at the end
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(headline(result, config.get("output_dir")), flush=True)
    return objective(result, config)


class SweepFailureReport(Callback):
    """Hydra callback: after a multirun, list the jobs that failed and exit with status 1 if any did."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        failed = []
        for metrics in sorted(sweep.glob("*/metrics.json")):
            try:
                record = json.loads(metrics.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if record.get("status") == "failed":
                failed.append((metrics.parent, record.get("error", "")))
        if failed:
            print(f"{len(failed)} job(s) of the sweep failed:", file=sys.stderr)
            for path, error in failed:
                print(f"  {path}: {error}", file=sys.stderr)
            print(f"the other jobs finished; see: python experiments/report.py {sweep}", file=sys.stderr, flush=True)
            sys.exit(1)
