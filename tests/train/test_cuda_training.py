"""CUDA runs: deterministic for a seed, and equal to the CPU run within float64 round-off (skip without a GPU)."""

from __future__ import annotations

import pytest
import torch

from manualbp.train import run

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
CFG = {"data": {"name": "digits"}, "model": {"hidden": [64, 64]}, "stopping": {"max_epochs": 4}, "progress": False}


@pytest.mark.parametrize("backend", ["manual", "autograd"])
def test_cuda_run_is_deterministic(backend):
    a = run({**CFG, "device": "cuda", "backend": backend})
    b = run({**CFG, "device": "cuda", "backend": backend})
    strip = lambda h: [{k: v for k, v in r.items() if k != "wall_time_s"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert not torch.are_deterministic_algorithms_enabled()  # the process's setting is restored


def test_cuda_float64_run_matches_cpu():
    cfg = {**CFG, "dtype": "float64"}
    gpu, cpu = run({**cfg, "device": "cuda"}), run({**cfg, "device": "cpu"})
    for key in ("train_loss", "val_loss", "test_loss"):
        assert gpu.metrics[key] == pytest.approx(cpu.metrics[key], rel=1e-9)
