"""backend=fused through manualbp.train.run matches backend=manual (float64), with resume."""

from __future__ import annotations

import pytest

from manualbp.train import BACKENDS, run


def _cfg(backend, **optim):
    return {
        "data": {"name": "digits"},
        "dtype": "float64",
        "backend": backend,
        "optim": {"name": "sgd", "lr": 0.1, "batch_size": 64, **optim},
        "stopping": {"max_epochs": 4, "early_stopping": None},
        "progress": False,
        "checkpoint_every_s": 0,
    }


@pytest.mark.parametrize("optim", [{}, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}])
def test_fused_run_equals_manual_run(optim):
    assert "fused" in BACKENDS
    a, b = run(_cfg("manual", **optim)), run(_cfg("fused", **optim))
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert (p - q).abs().max().item() <= 1e-12 * max(1.0, q.abs().max().item())
    for ra, rb in zip(a.history, b.history):
        assert abs(ra["train_loss"] - rb["train_loss"]) <= 1e-12
        assert abs(ra["grad_norm_1"] - rb["grad_norm_1"]) <= 1e-10
    assert a.metrics["test_accuracy"] == b.metrics["test_accuracy"]


def test_fused_run_resumes_after_a_kill(tmp_path, monkeypatch):
    from manualbp.fast.backend import FusedBackend

    cfg = {**_cfg("fused", momentum=0.9), "output_dir": str(tmp_path / "killed")}
    full = run({**cfg, "output_dir": str(tmp_path / "full")})
    original, calls = FusedBackend.step, {"n": 0}

    def dying_step(self, x, y):
        calls["n"] += 1
        if calls["n"] > 45:  # in the third epoch: the checkpoint of epoch 2 is on disk
            raise KeyboardInterrupt
        return original(self, x, y)

    monkeypatch.setattr(FusedBackend, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(FusedBackend, "step", original)
    resumed = run(cfg)
    assert resumed.metrics["epochs"] == full.metrics["epochs"] == 4
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        assert (p - q).abs().max().item() == 0.0


def test_fused_rejects_adam():
    with pytest.raises(ValueError, match="SGD only"):
        run({**_cfg("fused"), "optim": {"name": "adam", "lr": 0.01}})
