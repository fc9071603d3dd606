"""run_many: K run configs as one batched model, each equal to run() of that config alone (float64)."""

from __future__ import annotations

import json
import os

import pytest

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
