"""Vectorized sweeps: K run configs trained as one batched model, each equal to run() of that config alone.

``run_many`` (manualbp.fast.sweep) groups compatible configs and each run equals ``run()`` of it alone (float64);
``hydra/sweeper=vectorized`` (hydra_plugins) turns the user's ordinary multirun into such groups, and equals the
same sweep run the ordinary way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from manualbp.fast.sweep import group_key, run_many
from manualbp.train import run

BASE = {
    "data": {"name": "digits"},
    "dtype": "float64",
    "optim": {"name": "sgd", "lr": 0.1, "batch_size": 64},
    "stopping": {"max_epochs": 4},
    "progress": False,
}


def _cfg(seed, init, lr, momentum, schedule, stopping):
    return {
        **BASE,
        "seed": seed,
        "init": {"name": init},
        "optim": {**BASE["optim"], "lr": lr, "momentum": momentum},
        "lr_schedule": {"name": schedule},
        "stopping": stopping,
    }


CONFIGS = [
    _cfg(0, "xavier_uniform", 0.1, 0.0, "constant", {"max_epochs": 4, "early_stopping": None}),
    _cfg(1, "kaiming_normal", 0.05, 0.9, "cosine", {"max_epochs": 4, "early_stopping": {"patience": 1}}),
    _cfg(0, "normal", 0.3, 0.0, "step", {"max_epochs": 2}),
    _cfg(2, "lecun_uniform", 0.2, 0.5, "exponential", {"max_epochs": 4, "max_steps": 30}),
    # learning rates that change within an epoch: a warmup, a per-step interval
    {
        **_cfg(0, "orthogonal", 0.2, 0.0, "cosine", {"max_epochs": 3}),
        "lr_schedule": {"name": "cosine", "warmup_steps": 7},
    },
    {
        **_cfg(1, "xavier_normal", 0.1, 0.9, "step", {"max_epochs": 3}),
        "lr_schedule": {"name": "step", "interval": "step", "step_size": 5, "gamma": 0.8},
    },
]


@pytest.mark.parametrize("plain", [False, True], ids=["with-momentum", "plain-sgd"])  # plain: the fused step
@pytest.mark.parametrize("same_seed", [False, True])
def test_each_run_equals_run_alone(tmp_path, same_seed, plain):
    configs = [dict(c, seed=0) if same_seed else c for c in CONFIGS]
    if plain:
        configs = [dict(c, optim={**c["optim"], "momentum": 0.0}) for c in configs]
    results = run_many([dict(c, output_dir=str(tmp_path / f"v{i}")) for i, c in enumerate(configs)])
    for i, (c, v) in enumerate(zip(configs, results)):
        r = run(dict(c, backend="manual"))
        assert (v.status, v.stop_reason, v.metrics["epochs"], v.metrics["steps"]) == (
            r.status,
            r.stop_reason,
            r.metrics["epochs"],
            r.metrics["steps"],
        )
        for p, q in zip(v.model.parameters(), r.model.parameters()):
            assert (p - q).abs().max().item() <= 1e-10 * max(1.0, q.abs().max().item()), i
        assert len(v.history) == len(r.history)
        for a, b in zip(v.history, r.history):
            assert set(a) == set(b)
            for key in ("train_loss", "val_loss", "train_accuracy", "lr", "grad_norm", "train_loss_running"):
                assert abs(a[key] - b[key]) <= 1e-10 * max(1.0, abs(b[key])), (i, key)
        assert v.metrics["test_accuracy"] == r.metrics["test_accuracy"]
        out = tmp_path / f"v{i}"
        assert {"config.json", "history.csv", "metrics.json", "checkpoint.pt"} <= set(os.listdir(out))
        assert json.loads((out / "metrics.json").read_text())["status"] == r.status
        # run() on the finished output_dir returns the stored result without training
        again = run(dict(c, output_dir=str(out)))
        assert again.metrics["test_accuracy"] == v.metrics["test_accuracy"]


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_runs_equal_autograd_runs_alone(name):
    """optim=adam / adamw in a vectorized group (per-model lr, betas, eps, weight decay; one model stops
    early) equals each config trained alone with torch.optim.Adam / AdamW on the autograd backend."""
    configs = [
        {**c, "optim": {"name": name, "batch_size": 64, **optim}}
        for c, optim in zip(
            CONFIGS[:3],
            [
                {"lr": 0.01},
                {"lr": 0.003, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 1e-2},
                {"lr": 0.02, "betas": [0.5, 0.9], "weight_decay": 0.1},
            ],
        )
    ]
    assert len({group_key(c) for c in configs}) == 1
    results = run_many(configs)
    for i, (c, v) in enumerate(zip(configs, results)):
        r = run(dict(c, backend="autograd"))
        assert (v.status, v.stop_reason, v.metrics["epochs"], v.metrics["steps"]) == (
            r.status, r.stop_reason, r.metrics["epochs"], r.metrics["steps"]
        )  # fmt: skip
        for p, q in zip(v.model.parameters(), r.model.parameters()):
            assert (p - q).abs().max().item() <= 1e-10 * max(1.0, q.abs().max().item()), i
        for a, b in zip(v.history, r.history):
            assert abs(a["train_loss"] - b["train_loss"]) <= 1e-10 * max(1.0, abs(b["train_loss"])), i
    assert results[2].metrics["epochs"] == 2 and results[0].metrics["epochs"] == 4  # one stopped, the rest went on


def test_group_key_and_incompatible_configs():
    assert group_key(CONFIGS[0]) == group_key(CONFIGS[1])
    other = {**CONFIGS[0], "model": {"hidden": [32], "activation": "tanh", "bias": True}}
    assert group_key(other) != group_key(CONFIGS[0])
    with pytest.raises(ValueError, match="differ"):
        run_many([CONFIGS[0], other])
    with pytest.raises(ValueError, match="implements SGD, Adam and AdamW"):
        run_many([{**CONFIGS[0], "optim": {"name": "torch.optim.RMSprop", "lr": 0.01, "batch_size": 64}}])
    adam = {**CONFIGS[0], "optim": {"name": "adam", "lr": 0.01, "batch_size": 64}}
    assert group_key(adam) != group_key(CONFIGS[0])  # one optimizer per group
    with pytest.raises(ValueError, match="one optimizer per group"):
        from manualbp.fast.sweep import _trainer

        _trainer([], "cross_entropy", [{"optimizer": "sgd", "lr": 0.1}, {"optimizer": "adam", "lr": 0.1}])
    # a measurement along training is not taken by the vectorized path: refused, never silently dropped
    from manualbp.fast.sweep import unsupported

    measured = {**CONFIGS[0], "metrics": {"sharpness": True}}
    assert unsupported(CONFIGS[0]) is None and "metrics.sharpness" in unsupported(measured)
    with pytest.raises(ValueError, match="metrics.sharpness is measured on the ordinary path only"):
        run_many([measured])


def test_models_that_diverge_stop_at_the_step_a_run_alone_stops():
    # diabetes + relu + lr 1 diverges within epochs (loss > 1.5 x the first at step 2; inf at step 7);
    # run_many skips the per-model check_step calls that cannot fire, so this pins that it still fires
    base = {
        **BASE,
        "data": {"name": "diabetes"},
        "loss": "mse",
        "model": {"activation": "relu"},
        "optim": {"name": "sgd", "lr": 1.0, "batch_size": 64},
    }
    configs = [
        {**base, "stopping": {"max_epochs": 4, "early_stopping": None, "divergence": {"factor": factor}}}
        for factor in (None, 1.5)
    ]
    configs.append({**base, "optim": {**base["optim"], "lr": 0.01}, "stopping": {"max_epochs": 4}})
    for v, c in zip(run_many(configs), configs):
        r = run(dict(c, backend="manual"))
        assert (v.status, v.metrics["steps"], v.metrics["stop_message"]) == (
            r.status,
            r.metrics["steps"],
            r.metrics["stop_message"],
        )
    assert [v.metrics["steps"] for v in run_many(configs)] == [7, 2, 20]


# --------------------------------------------------------------------------------------------------
# hydra/sweeper=vectorized: the user's ordinary multirun, grouped, against the same sweep run the ordinary way
# --------------------------------------------------------------------------------------------------
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
