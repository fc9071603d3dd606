"""Models of one depth but different hidden widths, trained as one padded batched model (VectorizedTrainer,
run_many, hydra/sweeper=vectorized): each equals training it alone (float64), the padded entries stay exactly 0."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, rel_err

import manualbp
from manualbp.fast import VectorizedTrainer
from manualbp.fast.sweep import group_key, run_many
from manualbp.registry import ACTIVATION_REGISTRY
from manualbp.train import run

D = torch.float64
HIDDEN = [[8, 4], [16, 7], [5, 9], [16, 9]]  # the widest model per layer differs: every layer is padded somewhere
OPTIMIZERS = {
    "plain-sgd": ("sgd", dict(lr=[0.3, 0.1, 0.5, 0.2])),  # the fused step
    "momentum-wd": ("sgd", dict(lr=[0.1, 0.05, 0.2, 0.1], momentum=[0.9, 0.0, 0.5, 0.9], weight_decay=[1e-2, 0, 1e-3, 0.1])),
    "adam": ("adam", dict(lr=[0.01, 0.003, 0.02, 0.005], betas=[(0.9, 0.999), (0.8, 0.99), (0.5, 0.9), (0.9, 0.9)], weight_decay=[0, 1e-2, 0.1, 0])),
    "adamw": ("adamw", dict(lr=[0.01, 0.003, 0.02, 0.005], eps=[1e-8, 1e-6, 1e-8, 1e-3], weight_decay=[0.1, 1e-2, 0, 0.5])),
}  # fmt: skip


def _models(hidden=HIDDEN, activation="sigmoid", bias=True):
    out = []
    for k, h in enumerate(hidden):
        torch.manual_seed(200 + k)
        out.append(manualbp.MLP(6, h, 3, activation=activation, bias=bias, dtype=D))
    return out


def _clone(model):
    acts = [a.name for a in model.activations]
    twin = manualbp.MLP(6, model.hidden_features, 3, activation=acts, bias=model.bias, dtype=D)
    twin.load_state_dict(model.state_dict())
    return twin


def _one(opts, k):
    """Model k's own optimizer settings out of the per-model lists."""
    return {name: v[k] if isinstance(v, list) else v for name, v in opts.items()}


def _torch_optimizer(name, params, opts):
    return {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name](params, **opts)


def _padding(trainer):
    """Per stacked parameter a bool mask of its padded entries (outside every model's own rows and columns)."""
    pads = [torch.ones_like(p, dtype=torch.bool) for p in trainer.params]
    for k in range(trainer.K):
        for pad, own in zip(pads, trainer.parameters_of(k)):
            view = pad[k, 0] if own.dim() == 1 else pad[k]
            view[tuple(slice(0, n) for n in own.shape)] = False
    assert sum(int(pad.sum()) for pad in pads) > 0
    return pads


def _assert_padding_zero(trainer, pads):
    """The padded entries of the parameters, the last gradients and the optimizer state (each per parameter)."""
    if trainer.optimizer == "sgd":
        states = [trainer.sgd_state.momentum_buffers or []]
    else:
        states = [trainer.adam_state.exp_avg, trainer.adam_state.exp_avg_sq]
    for tensors in (trainer.params, trainer.last_grads, *states):
        for t, pad in zip(tensors, pads):
            assert bool((t[pad] == 0).all()), "a padded entry moved"


@pytest.mark.parametrize("case", list(OPTIMIZERS))
@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])  # sigmoid(0) = 1/2: the padded units need their mask
def test_padded_widths_equal_each_model_trained_alone(case, activation):
    """K models of widths [8, 4], [16, 7], [5, 9], [16, 9] in one padded trainer: every step's loss and the final
    weights equal each model trained alone with MLP + torch.optim and in its own K=1 trainer (1e-10); model 2
    stops half-way; every padded weight, gradient and optimizer-state entry stays exactly 0."""
    name, opts = OPTIMIZERS[case]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 6, dtype=D, generator=g), torch.randint(0, 3, (96,), generator=g)
    models = _models(activation=activation)
    refs = [_clone(m) for m in models]
    ref_opts = [_torch_optimizer(name, r.parameters(), _one(opts, k)) for k, r in enumerate(refs)]
    alone = [VectorizedTrainer([_clone(m)], optimizer=name, **_one(opts, k)) for k, m in enumerate(models)]
    trainer = VectorizedTrainer(models, "cross_entropy", optimizer=name, **opts)
    assert trainer.masks is not None and trainer.widths == [6, 16, 9, 3]
    pads = _padding(trainer)
    for epoch in range(6):
        if epoch == 3:
            trainer.stop(2)
        for i in range(0, 96, 32):
            xb, yb = x[i : i + 32], y[i : i + 32]
            losses = trainer.step(xb, yb)
            _assert_padding_zero(trainer, pads)
            for k, (ref, opt) in enumerate(zip(refs, ref_opts)):
                if k == 2 and epoch >= 3:
                    continue
                assert abs(losses[k].item() - alone[k].step(xb, yb).item()) <= 1e-10
                opt.zero_grad()
                ref_loss = manualbp.CrossEntropyLoss()(ref(xb), yb)
                ref_loss.backward()
                opt.step()
                assert abs(losses[k].item() - ref_loss.item()) <= 1e-10 * max(1.0, abs(ref_loss.item())), (k, epoch)
    for k, ref in enumerate(refs):
        mine = trainer.model(k)
        assert mine.hidden_features == HIDDEN[k]
        for p, q, r in zip(mine.parameters(), ref.parameters(), alone[k].model(0).parameters()):
            assert p.shape == q.shape and rel_err(p, q) <= 1e-10 and rel_err(p, r) <= 1e-10, k
    out = trainer.predict(x)
    for k, ref in enumerate(refs):
        assert rel_err(out[k], ref(x).detach()) <= 1e-10
    assert (trainer.weights[0][1] - trainer.weights[0][3]).abs().max() > 1e-3  # the models really differ


@pytest.mark.parametrize("momentum", [0.0, 0.9])  # 0: the fused step
def test_padded_widths_per_model_batches_no_bias_relu_and_state_dict(momentum):
    """Per-model batches (K, N, in), no bias, relu, mse; grad norms of the padded stacks equal each model's own;
    the state_dict round trip resumes exactly and refuses another set of widths."""
    hidden = [[3], [11], [7]]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 40, 6, dtype=D, generator=g), torch.randn(3, 40, 3, dtype=D, generator=g)
    models = _models(hidden, "relu", bias=False)
    refs = [_clone(m) for m in models]
    opts = [torch.optim.SGD(r.parameters(), lr=0.05, momentum=momentum) for r in refs]
    trainer = VectorizedTrainer(models, "mse", lr=0.05, momentum=momentum)
    for i in range(0, 40, 8):
        trainer.step(x[:, i : i + 8], y[:, i : i + 8])
        for k, (ref, opt) in enumerate(zip(refs, opts)):
            opt.zero_grad()
            manualbp.MSELoss()(ref(x[k, i : i + 8]), y[k, i : i + 8]).backward()
            opt.step()
    norms = trainer.grad_norms()
    for k, ref in enumerate(refs):
        for p, q in zip(trainer.parameters_of(k), ref.parameters()):
            assert p.shape == q.shape and rel_err(p, q) <= 1e-10
        for (name, q), norm in zip(ref.named_parameters(), norms.values()):
            assert abs(norm[k].item() - q.grad.norm().item()) <= 1e-10, name
    state = trainer.state_dict()
    trainer.step(x[:, :8], y[:, :8])
    after = [p.clone() for p in trainer.params]
    trainer.load_state_dict(state)
    trainer.step(x[:, :8], y[:, :8])
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, after))
    other = VectorizedTrainer(_models([[3], [11], [8]], "relu", bias=False), "mse", lr=0.05)
    with pytest.raises(ValueError, match="hidden widths"):
        other.load_state_dict(state)


def test_padding_errors_name_the_argument():
    with pytest.raises(ValueError, match="another architecture"):  # another depth
        VectorizedTrainer(_models([[8], [8, 4]]), lr=0.1)
    with pytest.raises(ValueError, match="eps: models of different hidden widths"):  # Adam's 0 / 0 on a padded entry
        VectorizedTrainer(_models(), lr=0.1, optimizer="adam", eps=[1e-8, 0.0, 1e-8, 1e-8])
    VectorizedTrainer(_models([[8]] * 2), lr=0.1, optimizer="adam", eps=0.0)  # one width: nothing padded, allowed
    spec = ACTIVATION_REGISTRY["tanh"]
    old = ACTIVATION_REGISTRY.swap(dataclasses.replace(spec, backward=lambda g, a, s: g / a))  # sigma' = 1/a
    try:
        with pytest.raises(ValueError, match="activation 'tanh' has no finite derivative at output 0"):
            VectorizedTrainer(_models(activation="tanh"), lr=0.1)
    finally:
        ACTIVATION_REGISTRY.swap(old)


# -- run_many and the sweeper -------------------------------------------------------------------------------
BASE = {"data": {"name": "digits"}, "dtype": "float64", "progress": False, "init": {"name": "xavier_uniform"}}
RUN_OPTIM = {
    "sgd": {"name": "sgd", "lr": 0.2, "batch_size": 64},  # plain: the fused step
    "adam": {"name": "adam", "lr": 0.01, "batch_size": 64, "weight_decay": 1e-3},
}


def _run_cfg(hidden, seed, optim, stopping):
    return {**BASE, "model": {"hidden": hidden, "activation": "sigmoid", "bias": True}, "seed": seed,
            "optim": RUN_OPTIM[optim], "stopping": stopping}  # fmt: skip


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_run_many_over_widths_equals_each_run_alone(tmp_path, optim):
    """hidden [8] and [16], two seeds each, one early-stopped: one group; each equals run() alone (float64)."""
    configs = [
        _run_cfg([8], 0, optim, {"max_epochs": 4}),
        _run_cfg([16], 0, optim, {"max_epochs": 4}),
        _run_cfg(8, 1, optim, {"max_epochs": 2}),  # an int is one hidden layer
        _run_cfg([16], 1, optim, {"max_epochs": 4, "early_stopping": {"patience": 1}}),
    ]
    assert len({group_key(c) for c in configs}) == 1
    results = run_many([dict(c, output_dir=str(tmp_path / f"v{i}")) for i, c in enumerate(configs)])
    for i, (c, v) in enumerate(zip(configs, results)):
        r = run(dict(c, backend="manual" if optim == "sgd" else "autograd"))
        assert (v.status, v.stop_reason, v.metrics["epochs"], v.metrics["steps"]) == (
            r.status, r.stop_reason, r.metrics["epochs"], r.metrics["steps"]
        )  # fmt: skip
        assert v.model.hidden_features == r.model.hidden_features
        for p, q in zip(v.model.parameters(), r.model.parameters()):
            assert p.shape == q.shape and (p - q).abs().max().item() <= 1e-10 * max(1.0, q.abs().max().item()), i
        assert len(v.history) == len(r.history)
        for a, b in zip(v.history, r.history):
            for key in ("train_loss", "val_loss", "train_accuracy", "grad_norm", "train_loss_running"):
                assert abs(a[key] - b[key]) <= 1e-10 * max(1.0, abs(b[key])), (i, key)
        for key in ("test_loss", "test_accuracy", "train_loss", "val_loss"):
            assert abs(v.metrics[key] - r.metrics[key]) <= 1e-10 * max(1.0, abs(r.metrics[key])), (i, key)
        assert v.metrics["vectorized_group_size"] == 4
        stored = json.loads((tmp_path / f"v{i}" / "config.json").read_text())
        assert stored["model"]["hidden"] == c["model"]["hidden"]  # its own widths, as given
    assert results[2].metrics["epochs"] == 2 and results[0].metrics["epochs"] == 4


def test_group_key_groups_widths_not_depths_activations_or_optimizers():
    base = _run_cfg([8], 0, "sgd", {"max_epochs": 2})
    with_model = lambda **m: {**base, "model": {**base["model"], **m}}  # noqa: E731
    assert group_key(base) == group_key(with_model(hidden=[64])) == group_key(with_model(activation=["sigmoid"]))
    assert group_key(with_model(hidden=[8, 8])) == group_key(with_model(hidden=[32, 4]))
    for other in (with_model(hidden=[8, 8]), with_model(hidden=[]), with_model(activation="tanh"),
                  with_model(bias=False), {**base, "optim": RUN_OPTIM["adam"]}):  # fmt: skip
        assert group_key(other) != group_key(base)




def test_sweeper_groups_optimizers_by_widths_with_no_fallback(tmp_path):
    """optim=sgd,adam x model.hidden=[8],[16] x seed=0,1 through the CLI: two vectorized groups of 4 (one per
    optimizer), no ordinary job, each job's metrics equal to the ordinary sweep's."""
    common = ["logger=none", "progress=false", "stopping.max_epochs=2", "dtype=float64", "optim=sgd,adam",
              "model.hidden=[8],[16]", "seed=0,1"]  # fmt: skip

    def sweep(name, extra):
        out = tmp_path / name
        cmd = [sys.executable, str(ROOT / "experiments" / "train.py"), "-m", *common, *extra, f"hydra.sweep.dir={out}"]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out, proc.stdout + proc.stderr

    fast, log = sweep("vectorized", ["hydra/sweeper=vectorized"])
    assert log.count("vectorized group of 4 jobs") == 2 and "ordinary job" not in log, log[-3000:]
    ref, _ = sweep("ordinary", [])
    for job in range(8):
        a = json.loads((fast / str(job) / "metrics.json").read_text())
        b = json.loads((ref / str(job) / "metrics.json").read_text())
        assert a["backend"] == "vectorized" and a["vectorized_group_size"] == 4
        assert a["status"] == b["status"] and a["epochs"] == b["epochs"]
        assert abs(a["test_loss"] - b["test_loss"]) <= 1e-10 * max(1.0, abs(b["test_loss"])), job
