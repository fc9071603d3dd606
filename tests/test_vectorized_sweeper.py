"""hydra/sweeper=vectorized: the user's ordinary multirun, grouped, equals the same sweep run the ordinary way."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT

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


def test_job_composer_equals_hydra_compose(tmp_path):
    """The sweeper composes once per distinct set of config-group overrides; each job's config (hydra node
    included) must equal Hydra's own per-job composition."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    import manualbp.experiment  # noqa: F401 - registers the run_dirname resolver
    from hydra_plugins.manualbp_vectorized_sweeper.vectorized_sweeper import JobComposer

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(ROOT / "conf")))
    master = loader.load_configuration(
        "train",
        ["hydra/sweeper=vectorized", f"hydra.sweep.dir={tmp_path}", "hydra.job.chdir=false", "logger=none"],
        RunMode.MULTIRUN,
    )
    jobs = [
        ["logger=none", "init=normal", "optim.lr=0.3"],
        ["logger=none", "init=normal", "optim.lr=0.05", "seed=3"],
        ["logger=none", "init=orthogonal", "optim.lr=0.3", "~stopping.early_stopping"],
        ["logger=none", "init=normal", "lr_schedule=cosine", "lr_schedule.eta_min=0.01", "+optim.dampening=0.1"],
        ["logger=none", "experiment=lr_study", "optim.lr=0.2", "model.hidden=[32,16]"],
        ["logger=none", "init=normal", "optim.lr=0.1", "model.activation=tanh"],
        ["logger=none", "init=normal", "no_such_key=1"],  # an error: Hydra's own compose raises it
    ]
    composer = JobComposer(loader, master)
    for overrides in jobs[:-1]:
        fast = composer(overrides)
        ref = loader.load_sweep_config(master, overrides)
        assert OmegaConf.to_yaml(fast) == OmegaConf.to_yaml(ref), overrides
        assert OmegaConf.to_container(fast, resolve=False) == OmegaConf.to_container(ref, resolve=False)
        assert fast.hydra.job.override_dirname == ref.hydra.job.override_dirname
    assert composer.composed == 4  # init=normal, init=orthogonal, init=normal + lr_schedule=cosine, experiment
    with pytest.raises(Exception, match="no_such_key"):
        composer(jobs[-1])


@pytest.mark.slow
def test_vectorized_sweep_equals_ordinary_sweep(tmp_path):
    extra = ["optim.lr=0.05,0.5", "optim.name=sgd,adam"]
    fast, log = _sweep(tmp_path, "vectorized", ["hydra/sweeper=vectorized", *extra])
    assert log.count("vectorized group of 4 jobs") == 2  # the 4 SGD jobs and the 4 Adam jobs
    ref, _ = _sweep(tmp_path, "ordinary", ["backend=manual", *extra])
    for job in range(8):
        a = json.loads((fast / str(job) / "metrics.json").read_text())
        b = json.loads((ref / str(job) / "metrics.json").read_text())
        assert a["status"] == b["status"] and a["epochs"] == b["epochs"]
        assert abs(a["test_loss"] - b["test_loss"]) <= 1e-10 * max(1.0, abs(b["test_loss"])), job
        assert (fast / str(job) / ".hydra" / "overrides.yaml").exists()
        assert (fast / str(job) / "history.csv").exists()
    backends = {json.loads((fast / str(j) / "metrics.json").read_text())["backend"] for j in range(8)}
    assert backends == {"vectorized"}  # Adam groups too (they used to fall back to ordinary jobs)
