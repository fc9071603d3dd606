"""hydra/sweeper=vectorized: the user's ordinary multirun, grouped, equals the same sweep run the ordinary way."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMON = ["logger=none", "progress=false", "stopping.max_epochs=3", "dtype=float64", "init=xavier_uniform,normal"]


def _sweep(tmp_path, name, extra):
    out = tmp_path / name
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), "-m", *COMMON, *extra, f"hydra.sweep.dir={out}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout + proc.stderr


def test_sweeper_is_discovered():
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    assert "VectorizedSweeper" in [p.__name__ for p in Plugins.instance().discover(Sweeper)]


@pytest.mark.slow
def test_vectorized_sweep_equals_ordinary_sweep(tmp_path):
    extra = ["optim.lr=0.05,0.5", "optim.name=sgd,adam"]
    fast, log = _sweep(tmp_path, "vectorized", ["hydra/sweeper=vectorized", *extra])
    assert "vectorized group of 4 jobs" in log  # the 4 SGD jobs; the 4 Adam jobs run as ordinary jobs
    ref, _ = _sweep(tmp_path, "ordinary", ["backend=manual", *extra])
    for job in range(8):
        a = json.loads((fast / str(job) / "metrics.json").read_text())
        b = json.loads((ref / str(job) / "metrics.json").read_text())
        assert a["status"] == b["status"] and a["epochs"] == b["epochs"]
        assert abs(a["test_loss"] - b["test_loss"]) <= 1e-10 * max(1.0, abs(b["test_loss"])), job
        assert (fast / str(job) / ".hydra" / "overrides.yaml").exists()
        assert (fast / str(job) / "history.csv").exists()
    backends = {json.loads((fast / str(j) / "metrics.json").read_text())["backend"] for j in range(8)}
    assert backends == {"vectorized", "manual"}
