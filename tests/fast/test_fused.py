"""The fused trainer (manualbp.fast.FusedTrainer) and the fused backend of manualbp.train.run (float64).

The trainer's trajectory equals the module trained with torch.optim.SGD / Adam / AdamW; ``backend=fused`` through
``run`` equals ``backend=manual`` (and Adam's equals ``backend=autograd``), resumes after a kill, trains whole
epochs in one call unless a step rule needs the loop, and stops where the manual run stops.
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

import manualbp
from manualbp import native
from manualbp.fast import FusedTrainer
from manualbp.train import BACKENDS, run

D = torch.float64
LOSS_MODULES = {
    "cross_entropy": manualbp.CrossEntropyLoss,
    "mse": manualbp.MSELoss,
    "squared_error": manualbp.SquaredErrorLoss,
}


def _data(n=150, d=6, c=3, loss="cross_entropy", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=D, generator=g)
    y = torch.randint(0, c, (n,), generator=g) if loss == "cross_entropy" else torch.randn(n, c, dtype=D, generator=g)
    return x, y


def _twins(activation="sigmoid", bias=True, hidden=(10, 7)):
    torch.manual_seed(1)
    a = manualbp.MLP(6, list(hidden), 3, activation=activation, bias=bias, dtype=D)
    b = manualbp.MLP(6, list(hidden), 3, activation=activation, bias=bias, dtype=D)
    b.load_state_dict(a.state_dict())
    return a, b


def _run_both(trainer, ref, opt, loss_fn, x, y, epochs=15, batch=32):
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            fused_loss = trainer.step(x[idx], y[idx])
            opt.zero_grad()
            ref_loss = loss_fn(ref(x[idx]), y[idx])
            ref_loss.backward()
            assert abs(fused_loss.item() - ref_loss.item()) <= 1e-12 * max(1.0, abs(ref_loss.item()))
            opt.step()


@pytest.mark.parametrize(
    "activation,loss,optim",
    [
        ("sigmoid", "cross_entropy", dict(lr=0.1)),
        ("tanh", "cross_entropy", dict(lr=0.05, momentum=0.9)),
        ("relu", "mse", dict(lr=0.02, momentum=0.8, weight_decay=1e-3)),
        ("leaky_relu", "squared_error", dict(lr=0.01, momentum=0.9, nesterov=True)),
        ("identity", "cross_entropy", dict(lr=0.05, momentum=0.5, dampening=0.1, weight_decay=1e-2)),
    ],
)
def test_trajectory_equals_module_with_torch_sgd(activation, loss, optim):
    model, ref = _twins(activation)
    x, y = _data(loss=loss)
    trainer = FusedTrainer(model, loss, **optim)
    _run_both(trainer, ref, torch.optim.SGD(ref.parameters(), **optim), LOSS_MODULES[loss](), x, y)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p, q) <= 1e-12
    # the run moved the weights (the comparison is not between two untouched models)
    torch.manual_seed(1)
    init = manualbp.MLP(6, [10, 7], 3, activation=activation, dtype=D)
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), init.parameters())) > 1e-3


@pytest.mark.parametrize(
    "optimizer,optim",
    [
        ("adam", dict(lr=0.01)),
        ("adam", dict(lr=0.005, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)),
        ("adamw", dict(lr=0.01, weight_decay=0.1)),
        ("adamw", dict(lr=0.02, betas=(0.5, 0.9))),
    ],
)
def test_adam_trajectory_equals_module_with_torch_adam(optimizer, optim):
    """The Python step's Adam / AdamW (manualbp.optim_steps) against MLP + torch.optim.Adam / AdamW alone."""
    model, ref = _twins("tanh")
    x, y = _data(loss="mse")
    trainer = FusedTrainer(model, "mse", optimizer=optimizer, **optim)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    _run_both(trainer, ref, cls(ref.parameters(), **{"weight_decay": 0.0, **optim}), manualbp.MSELoss(), x, y, epochs=5)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p, q) <= 1e-12
    assert trainer.adam_state.step == trainer.steps == 25 and trainer.momentum_buffers is None
    torch.manual_seed(1)
    init = manualbp.MLP(6, [10, 7], 3, activation="tanh", dtype=D)
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), init.parameters())) > 1e-2


def test_no_bias_sum_reduction_and_torch_loss_module():
    model, ref = _twins("tanh", bias=False, hidden=(9,))
    x, y = _data()
    trainer = FusedTrainer(model, torch.nn.CrossEntropyLoss(reduction="sum"), lr=0.01, momentum=0.9)
    opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    _run_both(trainer, ref, opt, manualbp.CrossEntropyLoss("sum"), x, y, epochs=5)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p, q) <= 1e-12


def test_grad_norms_predict_set_lr_and_resume():
    model, ref = _twins("sigmoid")
    x, y = _data()
    trainer = FusedTrainer(model, "cross_entropy", lr=0.1, momentum=0.9)
    trainer.step(x[:32], y[:32])
    ref_loss = manualbp.CrossEntropyLoss()(ref(x[:32]), y[:32])
    ref_loss.backward()
    norms = trainer.grad_norms()
    assert list(norms) == [n for n, _ in ref.named_parameters()]
    for name, p in ref.named_parameters():
        assert abs(norms[name] - p.grad.norm().item()) <= 1e-12 * p.grad.norm().item()
    torch.testing.assert_close(trainer.predict(x), model(x).detach(), rtol=0, atol=0)
    # resume from a state_dict: the continued run equals the uninterrupted one
    state = trainer.state_dict()
    trainer.set_lr(0.05)
    for i in range(32, 128, 32):
        trainer.step(x[i : i + 32], y[i : i + 32])
    expected = [p.detach().clone() for p in model.parameters()]
    other, _ = _twins("sigmoid")
    resumed = FusedTrainer(other, "cross_entropy", lr=0.1, momentum=0.9)
    resumed.load_state_dict(state)
    resumed.set_lr(0.05)
    for i in range(32, 128, 32):
        resumed.step(x[i : i + 32], y[i : i + 32])
    for p, q in zip(other.parameters(), expected):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)


def test_bad_arguments():
    model, _ = _twins()
    with pytest.raises(TypeError, match="manualbp.MLP"):
        FusedTrainer(torch.nn.Linear(2, 2), lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Nesterov"):
        FusedTrainer(model, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="reduction"):
        FusedTrainer(model, manualbp.CrossEntropyLoss("none"), lr=0.1)
    with pytest.raises(ValueError, match="loss must be one of"):
        FusedTrainer(model, "hinge", lr=0.1)
    with pytest.raises(ValueError, match="optimizer must be one of 'sgd', 'adam', 'adamw', got 'rmsprop'"):
        FusedTrainer(model, lr=0.1, optimizer="rmsprop")
    with pytest.raises(ValueError, match="momentum, dampening and nesterov are SGD's"):
        FusedTrainer(model, lr=0.1, optimizer="adam", momentum=0.9)
    with pytest.raises(ValueError, match="betas must be two numbers in"):
        FusedTrainer(model, lr=0.1, optimizer="adam", betas=(1.0, 0.9))


def test_parameters_are_views_of_the_blocks_and_prepare_checks_its_input():
    model, ref = _twins("tanh")
    trainer = FusedTrainer(model, "cross_entropy", lr=0.1)
    x, y = _data()
    trainer.step(x[:32], y[:32])
    # the model saw the update through its own parameters, and still round-trips through nn.Sequential
    assert any((p - q).abs().max() > 0 for p, q in zip(model.parameters(), ref.parameters()))
    seq = model.to_torch()
    seq.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(seq(x), model(x), rtol=1e-12, atol=1e-12)
    # prepared rows in any order train exactly like the raw batch
    twin, _ = _twins("tanh")
    twin.load_state_dict(model.state_dict())
    other = FusedTrainer(twin, "cross_entropy", lr=0.1)
    xp, yp = other.prepare(x, y)
    assert xp.shape == (150, 7) and bool((xp[:, -1] == 1).all()) and yp.shape == (150, 3)
    order = torch.randperm(150, generator=torch.Generator().manual_seed(3))[:32]
    l1, l2 = trainer.step(x[order], y[order]), other.step_prepared(xp[order], yp[order])
    assert l1.item() == l2.item()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match=r"input must have shape \(N, 6\)"):
        trainer.prepare(x[:, :5], y)
    with pytest.raises(ValueError, match="outside"):
        trainer.prepare(x, y + 5)
    with pytest.raises(ValueError, match="target"):
        trainer.prepare(x, y[:3])
    with pytest.raises(ValueError, match="0 examples"):
        trainer.prepare(x[:0], y[:0])


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "squared_error"])
def test_step_many_takes_exactly_the_steps_of_step_prepared(loss):
    # one call per epoch (what backend=fused does) = one step_prepared per batch, bit for bit, last batch ragged
    model, twin = _twins()
    a = FusedTrainer(model, loss, lr=0.1, momentum=0.5 if loss == "mse" else 0.0)
    b = FusedTrainer(twin, loss, lr=0.1, momentum=0.5 if loss == "mse" else 0.0)
    x, y = _data(loss=loss)
    xp, yp = a.prepare(x, y)
    for _ in range(3):
        losses = a.step_many(xp, yp, 32)  # 150 rows: 4 batches of 32, then 22
        expected = [b.step_prepared(xp[i : i + 32], yp[i : i + 32]) for i in range(0, 150, 32)]
        assert losses.shape == (5,) and torch.equal(losses, torch.stack(expected))
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
    assert a.steps == b.steps == 15
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            a.step_many(xp, yp, bad)
    with pytest.raises(ValueError, match="at least one row"):
        a.step_many(xp[:0], yp[:0], 32)
    with pytest.raises(ValueError, match=r"must be prepare\(\)'s output"):
        a.step_many(xp, yp[:, 0], 32)  # 1-d targets (class indices, say), not prepared
    with pytest.raises(ValueError, match=r"must be prepare\(\)'s output"):
        a.step_many(xp[:10], yp, 32)


def test_soft_targets_whose_rows_do_not_sum_to_one_get_the_exact_gradient():
    # dL/do = softmax(o) sum_k y_k - y: softmax(o) - y only holds for distributions
    model, ref = _twins()
    trainer = FusedTrainer(model, "cross_entropy", lr=0.1)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = _data()[0][:40]
    y = torch.rand(40, 3, dtype=D, generator=torch.Generator().manual_seed(5)) * 2  # rows sum to 0..6
    for i in range(0, 40, 16):
        fused_loss = trainer.step(x[i : i + 16], y[i : i + 16])
        opt.zero_grad()
        loss = manualbp.CrossEntropyLoss()(ref(x[i : i + 16]), y[i : i + 16])
        loss.backward()
        opt.step()
        assert abs(fused_loss.item() - loss.item()) <= 1e-12
    native = torch.nn.functional.cross_entropy(ref.to_torch()(x), y)  # the reference agrees with torch's own
    assert abs(native.item() - manualbp.CrossEntropyLoss()(ref(x), y).item()) <= 1e-12
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p, q) <= 1e-12


@pytest.mark.parametrize("kernels", ["python", "cpp"])
def test_small_steps_run_on_one_thread_and_the_thread_count_comes_back(monkeypatch, kernels):
    model, _ = _twins()
    trainer = FusedTrainer(model, "cross_entropy", lr=0.1)
    x, y = _data()
    xp, yp = trainer.prepare(x, y)
    seen = []

    def spy(original):
        def wrapper(*args):
            seen.append(torch.get_num_threads())
            return original(*args)

        return wrapper

    monkeypatch.setattr(FusedTrainer, "_step", spy(FusedTrainer._step))
    if kernels == "python":
        monkeypatch.setenv("MANUALBP_NATIVE", "off")
    else:  # step_many's epoch loop runs in C++ (step_prepared stays in Python)
        if native.load() is None:
            pytest.skip("manualbp's compiled kernels are not built here")
        monkeypatch.setattr(native.load(), "fused_step_many", spy(native.load().fused_step_many))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer.step_many(xp, yp, 32)  # a few kFLOP a step: one thread
        trainer.step_prepared(xp[:32], yp[:32])
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        trainer.single_thread_flops = 0  # off: torch's count for every step
        trainer.step_many(xp, yp, 32)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# backend=fused through manualbp.train.run against backend=manual / autograd
# --------------------------------------------------------------------------------------------------


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


def _killed_and_resumed(cfg: dict, tmp_path, monkeypatch):
    """(the run of ``cfg`` killed in its third epoch and run again, the same run uninterrupted)."""
    from manualbp.fast.backend import FusedBackend

    cfg = {**cfg, "output_dir": str(tmp_path / "killed")}
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
    return run(cfg), full


def test_fused_run_resumes_after_a_kill(tmp_path, monkeypatch):
    resumed, full = _killed_and_resumed(_cfg("fused", momentum=0.9), tmp_path, monkeypatch)
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
    optim = {"name": "adamw", "lr": 0.01, "batch_size": 64, "weight_decay": 0.1}
    resumed, full = _killed_and_resumed({**_cfg("fused"), "optim": optim}, tmp_path, monkeypatch)
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
