"""Learning-rate schedules against torch.optim.lr_scheduler (stepped once an epoch) and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from manualbp.train.schedules import build_schedule

STEPS = 5  # steps per epoch
EPOCHS = 30


def torch_lrs(make, epochs=EPOCHS, base=0.1, metrics=None):
    """The lr torch's scheduler gives each epoch (scheduler.step() after each epoch)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    sched = make(opt)
    out = []
    for e in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(metrics[e]) if metrics is not None else sched.step()
    return out


def ours(cfg, epochs=EPOCHS, base=0.1, max_epochs=EPOCHS):
    s = build_schedule(cfg, base, STEPS, max_epochs)
    lrs = []
    for e in range(epochs):
        per_step = {s.lr(e * STEPS + k, e) for k in range(STEPS)}
        assert len(per_step) == 1, "an epoch-interval schedule must hold the lr within an epoch"
        lrs.append(per_step.pop())
    return lrs


@pytest.mark.parametrize(
    "cfg, make",
    [
        ({"name": "constant"}, lambda o: torch.optim.lr_scheduler.ConstantLR(o, factor=1.0)),
        ({"name": "step", "step_size": 7, "gamma": 0.5}, lambda o: torch.optim.lr_scheduler.StepLR(o, 7, 0.5)),
        ({"name": "exponential", "gamma": 0.9}, lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9)),
        (
            {"name": "cosine", "eta_min": 0.001},
            lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=EPOCHS, eta_min=0.001),
        ),
        ({"name": "cosine", "t_max": 10}, lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10)),
    ],
    ids=["constant", "step", "exponential", "cosine", "cosine_tmax"],
)
def test_matches_torch_schedulers(cfg, make):
    expected = torch_lrs(make, epochs=10 if cfg.get("t_max") else EPOCHS)
    got = ours(cfg, epochs=len(expected))
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_inverse_time_hand_computed():
    got = ours({"name": "inverse_time", "k": 0.5}, epochs=5)
    assert got == pytest.approx([0.1, 0.1 / 1.5, 0.1 / 2, 0.1 / 2.5, 0.1 / 3], rel=1e-15)
    s = build_schedule({"name": "inverse_time", "k": 0.01, "interval": "step"}, 0.2, STEPS, 10)
    assert [s.lr(t, t // STEPS) for t in (0, 1, 100)] == pytest.approx([0.2, 0.2 / 1.01, 0.2 / 2], rel=1e-15)


@pytest.mark.parametrize("mode_metric", ["min", "max"])
def test_reduce_on_plateau_matches_torch(mode_metric):
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(60, generator=gen, dtype=torch.float64).tolist()
    # a metric that improves, plateaus, improves a little, plateaus
    metric = [1.0 / (1 + e) + 0.01 * n if e < 20 else 0.05 + 0.001 * n for e, n in enumerate(noise)]
    if mode_metric == "max":
        metric = [-m for m in metric]
    params = {"factor": 0.5, "patience": 3, "threshold": 1e-3, "cooldown": 2, "min_lr": 1e-4, "mode": mode_metric}
    expected = torch_lrs(
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(
            o, mode=mode_metric, factor=0.5, patience=3, threshold=1e-3, cooldown=2, min_lr=1e-4
        ),
        epochs=60,
        metrics=metric,
    )
    s = build_schedule({"name": "reduce_on_plateau", **params}, 0.1, STEPS, 60)
    got = []
    for e in range(60):
        got.append(s.lr(e * STEPS, e))
        s.observe(metric[e])
    assert got == pytest.approx(expected, rel=1e-12)
    assert min(got) < 0.1  # it did reduce


def test_linear_warmup_then_schedule():
    """warmup_steps=4: lr = (s + 1) / 4 * eta0 for s < 4, then the schedule's clock starts at 0."""
    s = build_schedule(
        {"name": "step", "step_size": 2, "gamma": 0.1, "interval": "step", "warmup_steps": 4}, 1.0, 5, 10
    )
    got = [s.lr(k, k // 5) for k in range(9)]
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01], rel=1e-15)
    s = build_schedule({"name": "constant", "warmup_epochs": 1, "warmup_start_factor": 0.0}, 0.5, 5, 10)
    assert [s.lr(k, 0) for k in range(6)] == pytest.approx([0.0, 0.125, 0.25, 0.375, 0.5, 0.5], abs=1e-15)
    # epoch clock after a one-epoch warm-up: exponential decays from the first epoch after it
    s = build_schedule({"name": "exponential", "gamma": 0.5, "warmup_epochs": 1}, 1.0, 5, 10)
    assert [s.lr(5 * e, e) for e in range(1, 4)] == pytest.approx([1.0, 0.5, 0.25], rel=1e-15)


def test_state_dict_round_trip():
    cfg = {"name": "reduce_on_plateau", "patience": 1, "factor": 0.5}
    a = build_schedule(cfg, 0.1, STEPS, 10)
    for m in (1.0, 1.0, 1.0, 1.0):
        a.observe(m)
    b = build_schedule(cfg, 0.1, STEPS, 10)
    b.load_state_dict(a.state_dict())
    assert b.lr(0, 0) == a.lr(0, 0) < 0.1
    a.observe(1.0)
    b.observe(1.0)
    assert a.state_dict() == b.state_dict()
    build_schedule({"name": "constant"}, 0.1, STEPS, 10).observe(1.0)  # a no-op for the others


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"name": "linear"}, "lr_schedule.name must be one of"),
        ({"name": "step", "gama": 0.1}, "unknown config key 'lr_schedule.gama'"),
        ({"name": "step", "step_size": 0}, "lr_schedule.step_size must be a positive integer"),
        ({"name": "exponential", "gamma": 1.5}, r"lr_schedule.gamma must be a number in \(0, 1\]"),
        ({"name": "constant", "interval": "batch"}, "lr_schedule.interval must be 'epoch' or 'step'"),
        ({"name": "constant", "warmup_steps": 2, "warmup_epochs": 1}, "not both"),
        ({"name": "reduce_on_plateau", "factor": 1.0}, r"lr_schedule.factor must be a number in \(0, 1\)"),
    ],
)
def test_bad_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_schedule(cfg, 0.1, STEPS, 10)


def test_bad_base_lr():
    with pytest.raises(ValueError, match="optim.lr must be a positive number, got -1"):
        build_schedule({"name": "constant"}, -1, STEPS, 10)
    assert math.isfinite(build_schedule({"name": "cosine"}, 0.1, STEPS, 1).lr(100, 20))
