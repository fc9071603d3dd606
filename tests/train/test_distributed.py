"""DDP with 2 CPU processes (gloo): k steps equal single-process training on the concatenated batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from helpers import ROOT

from manualbp.train import run

BATCH = 16  # per process; the single-process twin trains on batches of 2 x 16


def config(batch_size: int, backend: str = "manual") -> dict:
    return {
        "data": {"name": "digits"},
        "dtype": "float64",
        "model": {"hidden": [32], "activation": "tanh"},
        "optim": {"name": "sgd", "lr": 0.2, "batch_size": batch_size, "momentum": 0.9},
        "stopping": {"max_epochs": 1, "max_steps": 12},
        "backend": backend,
        "logger": {"name": "none"},
        "progress": False,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, backend: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    result = run({**config(BATCH, backend), "output_dir": out})  # the same dir: rank 0 alone writes it
    torch.save({"state": result.model.state_dict(), "metrics": result.metrics}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("backend", ["manual", pytest.param("autograd", marks=pytest.mark.slow)])
def test_two_process_ddp_equals_single_process_on_the_concatenated_batch(tmp_path, backend):
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(out), backend), nprocs=2, join=True)
    single = run({**config(2 * BATCH, backend)})
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert single.metrics["steps"] == ranks[0]["metrics"]["steps"] == 12
    for key, expected in single.model.state_dict().items():
        for r in range(2):
            torch.testing.assert_close(ranks[r]["state"][key], expected, rtol=1e-12, atol=1e-13)
    # the weights moved: the comparison is not between two untrained nets
    assert (
        ranks[0]["state"]["0.weight"]
        - run(
            {**config(2 * BATCH, backend), "optim": {"name": "sgd", "lr": 1e-9, "batch_size": 32}}
        ).model.state_dict()["0.weight"]
    ).abs().max() > 1e-3
    # rank 0 alone wrote the run's files
    assert (out / "metrics.json").exists() and (out / "checkpoint.pt").exists()


def test_distributed_needs_a_rendezvous(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="launch with torchrun"):
        run(config(BATCH))


@pytest.mark.slow
def test_torchrun_launches_experiments_train(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(ROOT / "experiments" / "train.py"),
        "data=iris",
        "stopping.max_epochs=3",
        "logger=none",
        "progress=false",
        f"hydra.run.dir={tmp_path}/run",
    ]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("status: completed") == 2  # both ranks finish; rank 0 wrote the files
    assert (tmp_path / "run" / "metrics.json").exists()
