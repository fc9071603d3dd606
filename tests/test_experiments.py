"""Hydra configs and experiments/train.py: every option composes into a tree run() accepts; real runs and sweeps."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from manualbp.train.config import resolve_config

CONF = ROOT / "conf"
GROUPS = ["data", "model", "init", "optim", "lr_schedule", "stopping", "backend", "logger", "metrics"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(overrides: list[str], hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_cfg)


def as_run_config(cfg) -> dict:
    container = OmegaConf.to_container(cfg, resolve=False)
    container.pop("hydra", None)
    container["output_dir"] = None  # ${hydra:runtime.output_dir} only resolves inside a job
    return container


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_is_valid_for_run(group, option):
    overrides = [f"{group}={option}"] + (["data.path=x.npz"] if (group, option) == ("data", "file") else [])
    config = resolve_config(as_run_config(composed(overrides)))
    if group == "backend":
        assert config["backend"] == option
    elif group == "stopping":
        assert config["stopping"]["max_epochs"] == 100
    elif group == "metrics":
        assert option == "none" or config["metrics"][option] is not None
    elif (group, option) == ("init", "standard"):  # Glorot & Bengio's standard init: nn.Linear's weights, zero biases
        assert config["init"] == {"name": "torch_default", "bias": "zeros"}
    elif group not in ("model",):
        assert config[group]["name"] in (option, "sgd", "normal")


@pytest.mark.parametrize("preset", options("experiment"))
def test_every_experiment_preset_composes(preset):
    cfg = composed([f"experiment={preset}"], hydra_cfg=True)
    assert cfg.hydra.sweeper.params or preset == "mnist1d_mlp"
    resolve_config(as_run_config(cfg))


def test_default_tree_is_runs_tree():
    cfg = as_run_config(composed([]))
    assert set(cfg) == {"seed", "device", "dtype", "data", "model", "loss", "init", "optim", "lr_schedule", "stopping", "backend", "logger", "progress", "output_dir", "checkpoint_every_s", "metrics"}
    assert cfg["metrics"] == {"sharpness": None, "activations": None}
    assert as_run_config(composed(["metrics=sharpness"]))["metrics"]["sharpness"]["every"] == 1
    assert cfg["data"]["name"] == "digits" and cfg["model"]["hidden"] == [64] and cfg["init"]["name"] == "xavier_uniform"
    assert cfg["optim"]["lr"] == 0.1 and cfg["optim"]["batch_size"] == 32 and cfg["backend"] == "manual"
    assert cfg["logger"]["name"] == "wandb" and cfg["logger"]["mode"] == "offline"
    assert "early_stopping" in cfg["stopping"]


def test_stopping_rules_combine_and_max_epochs_overrides():
    cfg = as_run_config(composed(["stopping=[early_stopping,grad_norm_below]", "stopping.max_epochs=7"]))
    assert set(cfg["stopping"]) == {"max_epochs", "early_stopping", "grad_norm_below"}
    assert cfg["stopping"]["max_epochs"] == 7
    only = resolve_config(as_run_config(composed(["stopping=max_epochs"])))
    assert "early_stopping" not in only["stopping"]


def test_misspelt_key_fails_at_compose_time():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="lrr"):
        composed(["optim.lrr=0.1"])


def test_wrong_type_fails_before_training():
    with pytest.raises((ValueError, TypeError), match="optim.lr"):
        resolve_config(as_run_config(composed(["optim.lr=fast"])))


@pytest.mark.parametrize("launcher, key, value", [("slurm", "partition", None), ("slurm_cpu", "gpus_per_node", 0), ("local_parallel", "n_jobs", 2)])
def test_launcher_presets_compose(launcher, key, value):
    cfg = composed([f"hydra/launcher={launcher}"], hydra_cfg=True)
    assert cfg.hydra.launcher[key] == value
    assert "submitit" in cfg.hydra.launcher._target_ or "joblib" in cfg.hydra.launcher._target_


def test_optuna_lr_search_preset_composes():
    cfg = composed(["hydra/sweeper=lr_search"], hydra_cfg=True)
    assert "optuna" in cfg.hydra.sweeper._target_.lower()
    assert cfg.hydra.sweeper.params["optim.lr"].startswith("tag(log")


def train(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_single_run_writes_its_files_and_wandb_run(tmp_path):
    out = train(["progress=false", "stopping.max_epochs=3", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "run"
    assert "status: completed" in out.stdout and f"results: {run_dir}" in out.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 3 and 0.5 < metrics["test_accuracy"] <= 1
    rows = list(csv.DictReader((run_dir / "history.csv").open()))
    assert [int(float(r["epoch"])) for r in rows] == [1, 2, 3]
    assert (run_dir / "config.json").exists() and (run_dir / ".hydra" / "config.yaml").exists()
    from manualbp.train.wandb_sink import find_runs, read_offline_run

    runs = find_runs(run_dir)
    assert len(runs) == 1
    logged = read_offline_run(runs[0])
    assert [h["epoch"] for h in logged["history"]] == [1, 2, 3]
    assert logged["summary"]["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert logged["config"]["optim"]["lr"] == 0.1 and logged["exit_code"] == 0


def test_single_run_error_is_one_line(tmp_path):
    out = train(["data=file", "data.path=/nonexistent/data.npz", "logger=none", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error: ") and "/nonexistent/data.npz" in out.stderr
    assert "Traceback" not in out.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_multirun_keeps_going_past_divergence_and_failure_and_reports(tmp_path):
    sweep = tmp_path / "sweep"
    out = train(
        ["-m", "data=iris,file", "optim.lr=0.1,1000000", "logger=none", "progress=false", "stopping.max_epochs=3", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    assert out.returncode == 1, out.stdout + out.stderr  # failures are reported at the end
    assert "2 job(s) of the sweep failed" in out.stderr
    statuses = {p.parent.name: json.loads(p.read_text())["status"] for p in sweep.glob("*/metrics.json")}
    assert statuses == {"0": "completed", "1": "diverged", "2": "failed", "3": "failed"}
    from manualbp.report import make_report

    report = make_report(sweep)
    assert [j.name for j in report.failed] == ["2", "3"]
    assert "data.path" in report.markdown


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local_parallel", "submitit_local"])
def test_sweep_through_parallel_launchers(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    args = ["-m", f"hydra/launcher={launcher}", "init=zeros,xavier_uniform", "data=iris", "stopping.max_epochs=3", "logger=none", "progress=false", f"hydra.sweep.dir={sweep}"]
    if launcher == "submitit_local":
        args += ["hydra.launcher.timeout_min=5", "hydra.launcher.cpus_per_task=1"]
    out = train(args, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    statuses = sorted(json.loads(p.read_text())["status"] for p in sweep.glob("*/metrics.json"))
    assert statuses == ["completed", "completed"]


@pytest.mark.slow
def test_optuna_learning_rate_search_runs(tmp_path):
    sweep = tmp_path / "sweep"
    out = train(
        ["-m", "hydra/sweeper=lr_search", "hydra.sweeper.n_trials=3", "data=iris", "stopping.max_epochs=3", "logger=none", "progress=false", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(list(sweep.glob("*/metrics.json"))) == 3
    best = (sweep / "optimization_results.yaml").read_text()
    assert "optim.lr" in best and "best_value" in best


@pytest.mark.slow
def test_report_logs_to_wandb(tmp_path):
    wandb = pytest.importorskip("wandb")
    sweep = tmp_path / "sweep"
    out = train(["-m", "init=zeros,xavier_uniform", "optim.lr=0.1,1.0", "data=iris", "stopping.max_epochs=3", "logger=none", "progress=false", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert out.returncode == 0, out.stderr
    from manualbp.report import make_report
    from manualbp.train.wandb_sink import find_runs, read_offline_run

    make_report(sweep, wandb_logger={"mode": "offline"})
    wandb.teardown()
    runs = find_runs(sweep / "report")
    assert len(runs) == 1
    logged = read_offline_run(runs[0])
    assert logged["config"] == {"sweep": "sweep"} and logged["summary"]["status"] == "completed"
    logged_names = {key.split("/")[0] for key in logged["history"][0]}  # media are logged as nested records
    assert {"lr_init_heatmap", "learning_curves", "grad_norms", "stop_epochs", "sweep_table"} <= logged_names
    assert logged["history"][0]["sweep_table/nrows"] == 4
