"""backend=fused through manualbp.train.run matches backend=manual (float64), with resume."""

from __future__ import annotations

import pytest
import torch

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
    original, calls = FusedBackend.step_many, {"n": 0}

    def dying_epoch(self, x, y, batch_size):
        calls["n"] += 1
        if calls["n"] > 2:  # the third epoch: the checkpoint of epoch 2 is on disk
            raise KeyboardInterrupt
        return original(self, x, y, batch_size)

    monkeypatch.setattr(FusedBackend, "step_many", dying_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(FusedBackend, "step_many", original)
    resumed = run(cfg)
    assert resumed.metrics["epochs"] == full.metrics["epochs"] == 4
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        assert (p - q).abs().max().item() == 0.0


@pytest.mark.parametrize(
    "optim",
    [
        {"name": "adam", "lr": 0.01, "batch_size": 64},
        {"name": "adam", "lr": 0.005, "batch_size": 64, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 1e-2},
        {"name": "adamw", "lr": 0.01, "batch_size": 64, "weight_decay": 0.1},
    ],
    ids=["adam", "adam-l2", "adamw"],
)
@pytest.mark.parametrize("native_mode", ["off", "auto"])  # the Python step and (where built) the C++ loop
def test_fused_adam_run_equals_autograd_run(optim, native_mode, monkeypatch):
    """optim=adam / adamw: the fused trainer's Adam (manualbp.optim_steps, csrc/steps.h) against
    torch.optim.Adam / AdamW on the native autograd twin, whole runs in float64."""
    monkeypatch.setenv("MANUALBP_NATIVE", native_mode)
    a, b = run({**_cfg("autograd"), "optim": optim}), run({**_cfg("fused"), "optim": optim})
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert (p - q).abs().max().item() <= 1e-11 * max(1.0, q.abs().max().item())
    for ra, rb in zip(a.history, b.history):
        assert abs(ra["train_loss"] - rb["train_loss"]) <= 1e-11
    first = run({**_cfg("fused"), "stopping": {"max_epochs": 1, "early_stopping": None}, "optim": optim})
    assert max((p - q).abs().max().item() for p, q in zip(first.model.parameters(), b.model.parameters())) > 1e-3


def test_fused_rejects_what_it_does_not_implement():
    with pytest.raises(ValueError, match="implements SGD, Adam and AdamW"):
        run({**_cfg("fused"), "optim": {"name": "torch.optim.RMSprop", "lr": 0.01}})
    with pytest.raises(ValueError, match="optim.amsgrad is not supported"):
        run({**_cfg("fused"), "optim": {"name": "adam", "lr": 0.01, "amsgrad": True}})


def test_fused_adam_run_resumes_after_a_kill(tmp_path, monkeypatch):
    """Adam's moments and step count go through the checkpoint: a killed run resumes to the same numbers."""
    from manualbp.fast.backend import FusedBackend

    optim = {"name": "adamw", "lr": 0.01, "batch_size": 64, "weight_decay": 0.1}
    cfg = {**_cfg("fused"), "optim": optim, "output_dir": str(tmp_path / "killed")}
    full = run({**cfg, "output_dir": str(tmp_path / "full")})
    original, calls = FusedBackend.step_many, {"n": 0}

    def dying_epoch(self, x, y, batch_size):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return original(self, x, y, batch_size)

    monkeypatch.setattr(FusedBackend, "step_many", dying_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(FusedBackend, "step_many", original)
    resumed = run(cfg)
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        assert (p - q).abs().max().item() == 0.0


def _steps_taken(monkeypatch):
    """Count the backend's step and step_many calls."""
    from manualbp.fast.backend import FusedBackend

    calls = {"step": 0, "step_many": 0}
    for name in calls:
        original = getattr(FusedBackend, name)

        def counted(self, *args, _name=name, _original=original):
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(FusedBackend, name, counted)
    return calls


def test_fused_run_trains_whole_epochs_in_one_call_unless_a_step_rule_needs_the_loop(monkeypatch):
    calls = _steps_taken(monkeypatch)
    run(_cfg("fused"))  # 4 epochs of ceil(1257 / 64) = 20 steps: one call each
    assert calls == {"step": 0, "step_many": 4}
    for extra in (
        {"stopping": {"max_epochs": 4, "max_steps": 50, "early_stopping": None}},
        {"lr_schedule": {"name": "cosine", "interval": "step"}},
    ):
        calls.update(step=0, step_many=0)
        run({**_cfg("fused"), **extra})
        assert calls["step_many"] == 0 and calls["step"] > 0


@pytest.mark.parametrize("factor", [None, 1.5])
def test_fused_whole_epochs_stop_at_the_step_where_divergence_fires(factor, monkeypatch):
    # lr 1 on diabetes diverges inside an epoch (a loss above 1.5 x the first at step 2; inf at step 7 of
    # 5-step epochs): the whole-epoch path rewinds and replays that epoch step by step, so the run stops
    # where backend=manual stops, with the same weights, step count and message
    calls = _steps_taken(monkeypatch)
    cfg = {
        **_cfg("fused"),
        "data": {"name": "diabetes"},
        "loss": "mse",
        "model": {"activation": "relu"},
        "optim": {"name": "sgd", "lr": 1.0, "batch_size": 64},
        "stopping": {"max_epochs": 4, "early_stopping": None, "divergence": {"factor": factor}},
    }
    a, b = run({**cfg, "backend": "manual"}), run(cfg)
    assert b.status == a.status == "diverged"
    assert b.metrics["steps"] == a.metrics["steps"] == (2 if factor else 7)
    assert b.metrics["stop_message"] == a.metrics["stop_message"]
    assert b.metrics["epochs"] == a.metrics["epochs"]
    assert calls["step_many"] == b.metrics["epochs"] and calls["step"] == 2  # the replayed epoch's steps
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p.isfinite(), q.isfinite())
        assert (p - q).nan_to_num(0, 0, 0).abs().max().item() <= 1e-9 * max(
            1.0, q.nan_to_num(0, 0, 0).abs().max().item()
        )
    assert [r["train_loss_running"] for r in a.history] == pytest.approx(
        [r["train_loss_running"] for r in b.history], rel=1e-9, nan_ok=True
    )


@pytest.mark.parametrize("hidden,expected", [([16], 1), ([1024, 1024], 2)])
def test_a_small_fused_run_holds_one_thread_throughout_and_gives_the_count_back(monkeypatch, hidden, expected):
    from manualbp.train import loop

    seen = []
    original = loop.evaluate

    def spy(*args, **kwargs):  # the loop's own evaluation: outside the trainer's step and predict
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # 16 hidden: about 0.3 MFLOP a step, one thread; 1024 x 1024 at batch 64: about 0.4 GFLOP, two
        cfg = {**_cfg("fused"), "dtype": "float32", "model": {"hidden": hidden}, "stopping": {"max_epochs": 1}}
        run(cfg)
        assert set(seen) == {expected} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
