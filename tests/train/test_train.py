"""The training loop: run() end to end, the reference points in fast qualitative form, the lockstep
"both" backend, reproducibility, checkpoints and resume, files, sinks, and config errors."""

from __future__ import annotations

import copy
import json
import math
import sys
import types

import pytest
import torch
from helpers import README
from omegaconf import OmegaConf

import manualbp
from manualbp.train import BACKENDS, DEFAULTS, register_backend, run
from manualbp.train import sinks as sinks_module
from manualbp.train.backends import AutogradBackend, ManualBackend


def cfg(**kw):
    """A quick run: no progress bar, no early stopping, no validation split unless asked for."""
    base = {
        "progress": False,
        "checkpoint_every_s": 0,
        "data": {"name": "digits", "val_fraction": 0.0},
        "stopping": {"max_epochs": 3, "early_stopping": None},
    }
    for key, value in kw.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


def strip_times(history):
    return [{k: v for k, v in h.items() if "time" not in k} for h in history]


# -- reference points (fast versions; the full ones are in the slow tier) ------------------------------
def test_default_network_learns_digits():
    r = run(cfg(stopping={"max_epochs": 8}))
    assert r.status == "completed" and r.stop_reason == "max_epochs"
    assert r.metrics["test_accuracy"] > 0.9
    assert r.metrics["n_train"] + r.metrics["n_test"] == 1797 and r.metrics["n_val"] == 0
    assert r.metrics["epochs"] == 8 and r.metrics["steps"] == 8 * math.ceil(r.metrics["n_train"] / 32)
    h = r.history
    assert [e["epoch"] for e in h] == list(range(1, 9))
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert {
        "train_loss",
        "val_loss",
        "train_accuracy",
        "val_accuracy",
        "lr",
        "grad_norm_1",
        "grad_norm_2",
        "wall_time_s",
    } <= set(h[0])


def test_zero_init_stays_at_chance_and_symmetric():
    r = run(cfg(init={"name": "zeros"}, stopping={"max_epochs": 4}))
    assert r.metrics["test_accuracy"] < 0.2
    # why: every hidden unit gets the same gradient, so the rows of W1 stay identical (symmetry never breaks)
    w1, w2 = r.model.linears[0].weight, r.model.linears[1].weight
    assert torch.equal(w1, w1[:1].expand_as(w1)) and w1.abs().max() > 0
    assert torch.equal(w2, w2[:, :1].expand_as(w2))


def test_small_init_stalls_deep_sigmoid_while_xavier_learns():
    deep = {"hidden": [64, 64]}
    small = run(cfg(model=deep, init={"name": "normal", "std": 0.01}, stopping={"max_epochs": 6}))
    xavier = run(cfg(model=deep, init={"name": "xavier_uniform"}, stopping={"max_epochs": 6}))
    assert small.metrics["test_accuracy"] < 0.2 < 0.7 < xavier.metrics["test_accuracy"]
    # vanishing gradients: the first layer's gradient is orders of magnitude below xavier's
    assert small.history[0]["grad_norm_1"] < 1e-2 * xavier.history[0]["grad_norm_1"]


# -- backends -----------------------------------------------------------------------------------------
def test_both_backend_float64_drift_is_roundoff():
    r = run(cfg(backend="both", dtype="float64", stopping={"max_epochs": 6}))  # 6 x 45 = 270 steps
    assert r.metrics["steps"] >= 250
    assert 0 <= r.metrics["max_grad_rel_diff"] < 1e-10
    assert 0 <= r.metrics["max_param_rel_diff"] < 1e-10
    assert "max_grad_rel_diff" in r.history[-1]


def test_both_backend_float32_drift_is_reported():
    r = run(cfg(backend="both", stopping={"max_epochs": 2}))
    # reported, and small; it may be exactly 0: the manual cross-entropy backward runs the very ATen kernels
    # autograd runs (nll_loss_backward, _log_softmax_backward_data), so float32 need not drift at all
    assert "max_grad_rel_diff" in r.history[-1]
    assert 0 <= r.metrics["max_grad_rel_diff"] < 1e-3
    assert 0 <= r.metrics["max_param_rel_diff"] < 1e-4


def test_manual_and_autograd_backends_agree():
    a = run(cfg(backend="manual", dtype="float64"))
    b = run(cfg(backend="autograd", dtype="float64"))
    for ha, hb in zip(a.history, b.history):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-10)
        assert ha["grad_norm_1"] == pytest.approx(hb["grad_norm_1"], rel=1e-8)
    assert a.metrics["test_accuracy"] == b.metrics["test_accuracy"]


@pytest.mark.parametrize("backend_cls", [ManualBackend, AutogradBackend])
@pytest.mark.parametrize("momentum, nesterov, wd", [(0.0, False, 0.0), (0.9, False, 0.01), (0.9, True, 0.0)])
def test_sgd_is_the_notes_update(backend_cls, momentum, nesterov, wd):
    """theta <- theta - eta (g + wd theta), with momentum buffer b = g on the first step, then mu b + g
    (dampening 0), Nesterov g + mu b: torch.optim.SGD's semantics, computed here by hand."""
    torch.manual_seed(0)
    model = manualbp.MLP(5, [4], 3, dtype=torch.float64)
    ref = [p.detach().clone() for p in model.flat_parameters()]
    native = model.to_torch()
    backend = backend_cls(
        model,
        "cross_entropy",
        {"name": "sgd", "lr": 0.3, "momentum": momentum, "nesterov": nesterov, "weight_decay": wd},
    )
    bufs = [None] * len(ref)
    for _ in range(3):
        x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
        for p, r in zip(native.parameters(), ref):
            p.data.copy_(r)
        native.zero_grad()
        torch.nn.functional.cross_entropy(native(x), y).backward()
        for i, (p, r) in enumerate(zip(native.parameters(), ref)):
            g = p.grad + wd * r
            if momentum:
                bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + g
                g = g + momentum * bufs[i] if nesterov else bufs[i]
            ref[i] = r - 0.3 * g
        backend.step(x, y)
        for p, r in zip(backend.model.flat_parameters(), ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)


def test_batch_size_one_and_full():
    one = run(cfg(data={"name": "iris"}, optim={"batch_size": 1}, stopping={"max_epochs": 2}))
    assert one.metrics["steps"] == 2 * one.metrics["n_train"]
    full = run(cfg(data={"name": "iris"}, optim={"batch_size": "full", "lr": 0.5}, stopping={"max_epochs": 5}))
    assert full.metrics["steps"] == 5


def test_other_optimizers_by_name_and_import_path(tmp_path):
    adam_cfg = cfg(data={"name": "iris"}, optim={"name": "adam", "lr": 0.01, "betas": [0.8, 0.99]})
    adam = run({**adam_cfg, "output_dir": str(tmp_path)})
    rms = run(cfg(data={"name": "iris"}, optim={"name": "torch.optim.RMSprop", "lr": 0.01, "alpha": 0.9}))
    assert adam.status == rms.status == "completed"
    assert run({**adam_cfg, "output_dir": str(tmp_path)}).metrics == adam.metrics  # Adam's state loads weights_only
    with pytest.raises(ValueError, match="optim.momentum is not an argument of torch.optim.adam.Adam"):
        run(cfg(optim={"name": "adam", "momentum": 0.9}))
    with pytest.raises(ValueError, match="optim.name must be 'sgd', 'adam', 'adamw' or the import path"):
        run(cfg(optim={"name": "torch.optim.NoSuch"}))


def test_registered_backend_is_used():
    calls = []

    class Counting(ManualBackend):
        def step(self, x, y):
            calls.append(x.shape[0])
            return super().step(x, y)

    register_backend("counting_test", Counting)
    try:
        r = run(cfg(data={"name": "iris"}, backend="counting_test", stopping={"max_epochs": 1}))
    finally:
        del BACKENDS["counting_test"]
    assert sum(calls) == r.metrics["n_train"]


# -- schedules, stopping and divergence inside the loop ---------------------------------------------
def test_schedule_drives_the_optimizer_lr():
    r = run(
        cfg(
            data={"name": "iris"},
            lr_schedule={"name": "step", "step_size": 1, "gamma": 0.5},
            stopping={"max_epochs": 4},
        )
    )
    assert [h["lr"] for h in r.history] == [0.1, 0.05, 0.025, 0.0125]


def test_per_step_rules_inside_the_loop(tmp_path):
    r = run(cfg(data={"name": "iris"}, stopping={"max_epochs": 50, "max_steps": 10}, output_dir=str(tmp_path)))
    assert (r.status, r.stop_reason, r.metrics["steps"], r.metrics["epochs"]) == ("completed", "max_steps", 10, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "config.json", "history.csv", "metrics.json"]
    t = run(cfg(data={"name": "iris"}, stopping={"max_epochs": 10**6, "time_budget": 0.3}))
    assert (t.status, t.stop_reason) == ("stopped", "time_budget") and t.metrics["wall_time_s"] < 5


def test_divergence_ends_the_run_with_its_history():
    r = run(
        cfg(data={"name": "diabetes"}, model={"activation": "relu"}, optim={"lr": 1e4}, stopping={"max_epochs": 20})
    )
    assert r.status == "diverged" and r.stop_reason == "divergence"
    assert len(r.history) >= 1 and r.metrics["epochs"] < 20


def test_early_stopping_restores_the_best_epoch():
    r = run(
        cfg(
            data={"name": "iris", "val_fraction": 0.2},
            optim={"lr": 0.5},
            stopping={"max_epochs": 200, "early_stopping": {"patience": 3, "min_delta": 0.0}},
        )
    )
    assert r.status == "stopped" and r.stop_reason == "early_stopping"
    best = r.metrics["best_epoch"]
    assert best == min(r.history, key=lambda h: h["val_loss"])["epoch"]
    assert r.metrics["epochs"] == best + 3 and r.metrics["restored_best"]
    assert r.metrics["val_loss"] == r.history[best - 1]["val_loss"]  # metrics are the best epoch's weights


def test_regression_reports_r2_like_sklearn():
    from sklearn.metrics import r2_score

    from manualbp.train.loop import _score

    r = run(cfg(data={"name": "diabetes", "val_fraction": 0.1}, optim={"lr": 0.01}, stopping={"max_epochs": 5}))
    assert {"test_r2", "val_r2", "train_r2", "test_loss"} <= set(r.metrics) and "test_accuracy" not in r.metrics
    assert 0.2 < r.metrics["test_r2"] < 1
    y, p = torch.randn(40, 3, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    assert _score("regression", p, y).item() == pytest.approx(r2_score(y.numpy(), p.numpy()), rel=1e-12)


# -- reproducibility, files and resume ---------------------------------------------------------------
def test_same_seed_bit_identical_history_other_seed_differs():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = run(cfg(data={"name": "iris", "val_fraction": 0.2}, seed=4))
    assert torch.equal(before, torch.get_rng_state())  # a fresh run leaves the global RNG alone
    torch.manual_seed(999)  # ... and does not depend on it
    b = run(cfg(data={"name": "iris", "val_fraction": 0.2}, seed=4))
    c = run(cfg(data={"name": "iris", "val_fraction": 0.2}, seed=5))
    assert strip_times(a.history) == strip_times(b.history)
    assert strip_times(a.history) != strip_times(c.history)


class Interrupt(Exception):
    pass


def test_resume_is_bit_identical(tmp_path, monkeypatch):
    config = cfg(
        data={"name": "digits", "val_fraction": 0.1},
        optim={"momentum": 0.9, "lr": 0.05},
        lr_schedule={"name": "reduce_on_plateau", "patience": 1, "factor": 0.5},
        stopping={"max_epochs": 6, "early_stopping": {"patience": 4}},
    )
    whole = run(config)

    finished = []

    class FailingSink(sinks_module.NullSink):
        def log(self, metrics, step):
            if step == 3:
                raise Interrupt("killed after epoch 3")

        def finish(self, status):
            finished.append(status)

    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(sinks_module, "build_sink", lambda *a: FailingSink())
        with pytest.raises(Interrupt):
            run({**config, "output_dir": out})
    assert finished == ["failed"]
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["result"] is None  # the last checkpoint: epoch 2 (3 was never saved)

    resumed = run({**config, "output_dir": out})
    assert strip_times(resumed.history) == strip_times(whole.history)
    keep = [k for k in whole.metrics if "time" not in k]
    assert {k: resumed.metrics[k] for k in keep} == {k: whole.metrics[k] for k in keep}

    # a finished run returns its stored result without training again
    with monkeypatch.context() as m:
        m.setattr(ManualBackend, "step", lambda *a: (_ for _ in ()).throw(AssertionError("retrained")))
        again = run({**config, "output_dir": out, "progress": False})
    assert again.metrics == resumed.metrics and again.status == resumed.status
    for a, b in zip(again.model.state_dict().values(), whole.model.state_dict().values()):
        assert torch.equal(a, b)

    # the files
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == whole.status and metrics["test_accuracy"] == whole.metrics["test_accuracy"]
    rows = (tmp_path / "run" / "history.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(whole.history) and rows[0].startswith("epoch,step,")
    saved_cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved_cfg["optim"]["momentum"] == 0.9 and saved_cfg["stopping"]["max_epochs"] == 6

    with pytest.raises(ValueError, match="different config .*'optim.lr'"):
        run({**config, "output_dir": out, "optim": {"lr": 0.2}})


def test_omegaconf_config_and_bare_names():
    conf = OmegaConf.create(
        {
            "progress": False,
            "data": "iris",
            "init": "kaiming_normal",
            "optim": {"lr": 0.2},
            "stopping": {"max_epochs": 2, "early_stopping": None},
            "lr_schedule": "cosine",
        }
    )
    r = run(conf)
    assert r.config["data"]["name"] == "iris" and r.config["init"] == {"name": "kaiming_normal"}
    assert r.config["lr_schedule"] == {"name": "cosine"} and r.metrics["epochs"] == 2


def test_wandb_sink_is_imported_lazily_and_finished(monkeypatch):
    events = []

    class FakeWandbSink:
        def __init__(self, logger_cfg, config, output_dir):
            events.append(("init", logger_cfg["project"], config["seed"], output_dir))

        def log(self, metrics, step):
            events.append(("log", step))

        def summary(self, metrics):
            events.append(("summary", metrics["status"]))

        def finish(self, status):
            events.append(("finish", status))

    fake = types.ModuleType("manualbp.train.wandb_sink")
    fake.WandbSink = FakeWandbSink
    monkeypatch.setitem(sys.modules, "manualbp.train.wandb_sink", fake)
    run(
        cfg(
            data={"name": "iris"},
            logger={"name": "wandb", "project": "p", "mode": "offline"},
            stopping={"max_epochs": 2},
        )
    )
    assert events == [("init", "p", 0, None), ("log", 1), ("log", 2), ("summary", "completed"), ("finish", "completed")]


def test_progress_bar_quiet_when_asked(capsys):
    run(cfg(data={"name": "iris"}, stopping={"max_epochs": 1}))
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


# -- errors at start ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, match, exc",
    [
        ({"optim": {"lr": -1}}, "optim.lr must be a positive number, got -1", ValueError),
        ({"optim": {"lrr": 0.1}}, "optim.lrr is not an argument of torch.optim.sgd.SGD", ValueError),
        ({"optimizer": {}}, "unknown config key 'optimizer'", ValueError),
        ({"model": {"hiden": [3]}}, "unknown config key 'model.hiden'", ValueError),
        ({"model": {"activation": "swish"}}, "model.activation must be one of", ValueError),
        ({"model": {"hidden": [64, 0]}}, r"model.hidden\[1\] must be a positive integer", ValueError),
        ({"backend": "fast"}, "backend must be one of", ValueError),
        ({"dtype": "float8"}, "dtype must be one of", ValueError),
        ({"device": "tpu"}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'", ValueError),
        ({"loss": "hinge"}, "loss must be one of", ValueError),
        ({"loss": "mse"}, "loss 'mse' needs regression targets", ValueError),
        ({"optim": {"batch_size": 0}}, "optim.batch_size must be a positive integer or 'full'", ValueError),
        ({"optim": {"nesterov": True}}, "optim.nesterov needs optim.momentum > 0", ValueError),
        ({"logger": {"name": "tensorboard"}}, "logger.name must be one of", ValueError),
        ({"stopping": {"early_stopping": {"patience": 2}}}, "monitor 'val_loss' needs a validation split", ValueError),
        (
            {"stopping": {"early_stopping": {"monitor": "val_r2"}}, "data": {"val_fraction": 0.1}},
            "monitor 'val_r2' does not exist for a classification set",
            ValueError,
        ),
        ({"seed": -3}, "seed must be an integer >= 0", ValueError),
        ({"progress": "yes"}, "progress must be true or false", TypeError),
        (["not", "a", "mapping"], "config must be a mapping", TypeError),
    ],
)
def test_bad_config_fails_at_start(bad, match, exc, monkeypatch):
    monkeypatch.setattr(ManualBackend, "step", lambda *a: (_ for _ in ()).throw(AssertionError("trained")))
    config = bad if not isinstance(bad, dict) else cfg(**bad)
    with pytest.raises(exc, match=match):
        run(config)


def test_defaults_are_the_issue_tree():
    d = copy.deepcopy(DEFAULTS)
    assert d["data"]["name"] == "digits" and d["model"] == {"hidden": [64], "activation": "sigmoid", "bias": True}
    assert d["init"]["name"] == "xavier_uniform" and d["optim"]["lr"] == 0.1 and d["optim"]["batch_size"] == 32
    assert d["stopping"]["max_epochs"] == 100 and d["stopping"]["early_stopping"]["monitor"] == "val_loss"
    assert (d["backend"], d["loss"], d["logger"]["name"], d["device"]) == ("manual", "auto", "none", "auto")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_run_matches_cpu_start():
    torch.backends.cuda.matmul.allow_tf32 = False
    gpu = run(cfg(device="cuda", dtype="float64", data={"name": "iris"}, backend="both"))
    cpu = run(cfg(device="cpu", dtype="float64", data={"name": "iris"}, backend="both"))
    assert gpu.metrics["max_grad_rel_diff"] < 1e-10
    assert gpu.history[0]["train_loss"] == pytest.approx(cpu.history[0]["train_loss"], rel=1e-9)


def test_readme_training_example_runs(capsys):
    import re

    text = README.read_text()
    block = re.search(r"<!-- readme-train-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its training example"
    exec(compile(block.group(1), "README.md", "exec"), {})
    status, reason, acc, drift = capsys.readouterr().out.split()
    assert status in ("completed", "stopped") and float(acc) > 0.8 and float(drift) < 1e-3


def test_checkpoint_interval_and_resume_across_unsaved_epochs(tmp_path, monkeypatch):
    """With checkpoint_every_s, epochs between checkpoints are not saved; a kill there reruns the lost
    epochs (here all: no checkpoint yet) to the same result, and history.csv ends with each epoch once."""
    config = cfg(stopping={"max_epochs": 5, "early_stopping": None}, checkpoint_every_s=3600.0)
    whole = run(config)
    saves = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, *a, **k: (saves.append(obj["epoch"]), real_save(obj, *a, **k)))
    run({**config, "output_dir": str(tmp_path / "hour")})
    assert saves == [5]  # only the finished run: an hour of training never passed

    def dying_log(self, metrics, step):
        if step == 4:
            raise Interrupt("killed after epoch 4")

    out = str(tmp_path / "killed")
    saves.clear()
    with monkeypatch.context() as m:
        m.setattr(sinks_module.NullSink, "log", dying_log)
        with pytest.raises(Interrupt):
            run({**config, "output_dir": out})
    assert saves == [] and (tmp_path / "killed" / "history.csv").exists()
    resumed = run({**config, "output_dir": out})  # epochs 1..5 again
    assert strip_times(resumed.history) == strip_times(whole.history)
    for a, b in zip(resumed.model.state_dict().values(), whole.model.state_dict().values()):
        assert torch.equal(a, b)
    rows = (tmp_path / "killed" / "history.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5"]
    with pytest.raises(ValueError, match="checkpoint_every_s"):
        run({**config, "checkpoint_every_s": -1})


def test_checkpoint_of_another_version_is_a_clear_error(tmp_path):
    config = {**cfg(), "output_dir": str(tmp_path / "run")}
    (tmp_path / "run").mkdir()
    torch.save({"version": 7, "config": {}}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint version 7, this one reads version 2"):
        run(config)
    # version 1 (before the fused backend's [W | b] blocks) resumes for the other backends, not for fused
    torch.save({"version": 1, "config": {"backend": "fused"}, "result": None}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint version 1"):
        run(config)
    torch.save([1, 2], tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(ValueError, match="is not a manualbp checkpoint"):
        run(config)
    # a version-1 checkpoint of a manual run resumes
    out = str(tmp_path / "v1")
    run({**config, "output_dir": out, "stopping": {"max_epochs": 1, "early_stopping": None}})
    state = torch.load(tmp_path / "v1" / "checkpoint.pt", weights_only=True)
    torch.save({**state, "version": 1}, tmp_path / "v1" / "checkpoint.pt")
    again = run({**config, "output_dir": out, "stopping": {"max_epochs": 1, "early_stopping": None}})
    assert again.metrics["epochs"] == 1
