"""Faults lose nothing: resume after SIGKILL, a crash during a checkpoint save, unwritable output dirs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT

from manualbp.train import run

SMALL = {
    "data": {"name": "iris"},
    "model": {"hidden": [8]},
    "stopping": {"max_epochs": 6},
    "progress": False,
    "checkpoint_every_s": 0,  # a checkpoint each epoch: the faults below hit a run that has several
}


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "wall_time_s"}


def test_unwritable_output_dir_is_a_clear_error_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=r"output_dir .*a_file/run.* cannot be written"):
        run({**SMALL, "output_dir": str(blocker / "run")})


def test_crash_during_checkpoint_save_resumes_from_the_previous_one(tmp_path, monkeypatch):
    reference = run({**SMALL, "output_dir": str(tmp_path / "ref")})
    real_save = torch.save
    calls = {"n": 0}

    def crashing_save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th checkpoint: write half a file, then die
            with open(path, "wb") as fh:
                fh.write(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt("killed while saving")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crashing_save)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run({**SMALL, "output_dir": str(out)})
    monkeypatch.setattr(torch, "save", real_save)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3  # the last complete checkpoint survived the crash
    resumed = run({**SMALL, "output_dir": str(out)})
    assert comparable(resumed.metrics) == comparable(reference.metrics)
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in reference.history]
    import csv

    rows = list(csv.DictReader((out / "history.csv").open()))  # appended per epoch, rewritten after the resume
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    assert [float(r["train_loss"]) for r in rows] == [h["train_loss"] for h in reference.history]


def _train_cmd() -> list[str]:
    return [
        sys.executable,
        str(ROOT / "experiments" / "train.py"),
        "data=digits",
        "checkpoint_every_s=0",
        "model.hidden=[128,128]",
        "stopping=max_epochs",
        "stopping.max_epochs=12",
        "logger=none",
        "progress=false",
    ]


@pytest.mark.slow
def test_sigkill_then_same_command_resumes_to_identical_metrics(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    ref_dir.mkdir()
    run_dir.mkdir()
    done = subprocess.run(_train_cmd(), cwd=ref_dir, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    proc = subprocess.Popen(_train_cmd(), cwd=run_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        files = list((run_dir / "outputs").glob("*/history.csv")) if (run_dir / "outputs").exists() else []
        if files and len(files[0].read_text().splitlines()) >= 4:  # header + 3 epochs
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (job,) = list((run_dir / "outputs").iterdir())
    assert not (job / "metrics.json").exists(), "the run finished before it could be killed"
    again = subprocess.run(_train_cmd(), cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resuming from the checkpoint" in again.stdout
    (ref_job,) = list((ref_dir / "outputs").iterdir())
    assert ref_job.name == job.name  # the same command names the same directory
    a = json.loads((job / "metrics.json").read_text())
    b = json.loads((ref_job / "metrics.json").read_text())
    assert comparable(a) == comparable(b)


@pytest.mark.slow
def test_faulty_sweep_keeps_every_run_and_wandb_record(tmp_path):
    """One job diverges, one raises, the rest are normal: each job that ran has metrics.json and its W&B run."""
    from manualbp.report import make_report
    from manualbp.train.wandb_sink import find_runs, read_offline_run

    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "train.py"),
        "-m",
        "data=iris,file",
        "optim.lr=0.1,1000000",
        "stopping.max_epochs=3",
        "progress=false",
        f"hydra.sweep.dir={sweep}",
    ]
    done = subprocess.run(
        cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 1 and "2 job(s) of the sweep failed" in done.stderr
    status = {p.parent.name: json.loads(p.read_text())["status"] for p in sweep.glob("*/metrics.json")}
    assert status == {"0": "completed", "1": "diverged", "2": "failed", "3": "failed"}
    for job in ("0", "1"):  # the jobs that ran have their W&B runs, with every epoch and the final status
        (wandb_run,) = find_runs(sweep / job)
        logged = read_offline_run(wandb_run)
        assert logged["summary"]["status"] == status[job] and len(logged["history"]) >= 1
        assert logged["group"] == f"{sweep.parent.name}_{sweep.name}" and logged["exit_code"] == 0
    report = make_report(sweep)
    assert [j.name for j in report.failed] == ["2", "3"] and "data.path" in report.markdown
