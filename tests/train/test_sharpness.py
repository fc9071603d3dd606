"""Sharpness (the top Hessian eigenvalue of the training loss) through the manual module's double backward,
held against torch.func.hessian of the native twin; the run-time tracker (metrics.sharpness)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF

import manualbp
from manualbp.hessian import hvp_operator, lanczos, sharpness
from manualbp.train import run
from manualbp.train.metrics import check_metrics_cfg


def _native_loss(name, o, y):
    if name == "cross_entropy":
        return TF.cross_entropy(o, y)
    if name == "mse":
        return TF.mse_loss(o, y)
    return 0.5 * ((o - y) ** 2).sum(-1).mean()


def _native_hessian_eigenvalues(model, x, y, loss):
    """The exact spectrum: torch.func.hessian of the native twin's loss as a function of all parameters."""
    net = model.to_torch()
    named = list(net.named_parameters())
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(flat):
        params, i = {}, 0
        for name, p in named:
            params[name] = flat[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        return _native_loss(loss, torch.func.functional_call(net, params, (x,)), y)

    return torch.linalg.eigvalsh(torch.func.hessian(f)(flat0)).flip(0)


@pytest.mark.parametrize(
    "loss, activation", [("cross_entropy", "tanh"), ("squared_error", "sigmoid"), ("mse", "relu"), ("cross_entropy", "leaky_relu")]
)
def test_sharpness_matches_torch_func_hessian(loss, activation):
    torch.manual_seed(0)
    model = manualbp.MLP(4, [6, 5], 3, activation=activation, dtype=torch.float64)
    x = torch.randn(20, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (20,)) if loss == "cross_entropy" else torch.randn(20, 3, dtype=torch.float64)
    exact = _native_hessian_eigenvalues(model, x, y, loss)
    result = sharpness(model, x, y, loss, k=3)
    assert result.converged
    for got, want in zip(result.eigenvalues, exact[:3].tolist()):
        assert abs(got - want) <= 1e-6 * abs(want), (result.eigenvalues, exact[:3])
    assert result.lr_bound == pytest.approx(2 / exact[0].item(), rel=1e-6)
    assert result.loss == pytest.approx(_native_loss(loss, model(x), y).item(), rel=1e-12)


def test_hvp_is_the_hessian_times_v_through_the_manual_backward():
    torch.manual_seed(1)
    model = manualbp.MLP(3, [4], 2, activation="sigmoid", dtype=torch.float64)
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 2, (7,))
    matvec, n, _ = hvp_operator(model, x, y)
    assert n == sum(p.numel() for p in model.parameters())
    H = torch.stack([matvec(e) for e in torch.eye(n, dtype=torch.float64)])
    assert torch.allclose(H, H.T, atol=1e-12)  # symmetric: a Hessian
    exact = _native_hessian_eigenvalues(model, x, y, "cross_entropy")
    assert torch.allclose(torch.linalg.eigvalsh(H).flip(0), exact, atol=1e-10)
    # the products come from MLPFunction's hand-derived backward, differentiated once more
    with pytest.raises(ValueError, match="loss must be one of"):
        hvp_operator(model, x, y, "hinge")


def test_lanczos_on_a_known_matrix_and_its_arguments():
    torch.manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    spectrum = torch.linspace(-3, 5, 30, dtype=torch.float64)
    A = q @ torch.diag(spectrum) @ q.T
    top, used, converged = lanczos(lambda v: A @ v, 30, k=2, iters=30)
    assert converged and used <= 30
    assert top == pytest.approx([5.0, spectrum[-2].item()], rel=1e-10)
    with pytest.raises(ValueError, match="k must be between 1"):
        lanczos(lambda v: A @ v, 30, k=0)


def test_metrics_config_validation():
    assert check_metrics_cfg({"sharpness": None}) == {"sharpness": None, "activations": None}
    assert check_metrics_cfg({"sharpness": True})["sharpness"]["every"] == 1
    for bad, message in [
        ({"sharpness": {"every": 0}}, "metrics.sharpness.every must be a positive integer"),
        ({"sharpness": {"evry": 2}}, "unknown config key 'metrics.sharpness.evry'"),
        ({"sharpness": {"tol": 2}}, r"metrics.sharpness.tol must be a number in \(0, 1\)"),
        ({"sharpness": {"dtype": "half"}}, "metrics.sharpness.dtype must be"),
        ({"hessian": 1}, "unknown config key 'metrics.hessian'"),
        ({"activations": {"percentiles": [2, 101]}}, "metrics.activations.percentiles must be a list"),
        ({"activations": {"examples": 0}}, "metrics.activations.examples must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_metrics_cfg(bad)
    with pytest.raises(ValueError, match="metrics.sharpness.every"):
        run({"metrics": {"sharpness": {"every": -1}}, "progress": False})


BASE = {
    "data": {"name": "iris"},
    "model": {"hidden": [8], "activation": "tanh"},
    "optim": {"lr": 0.1, "batch_size": "full"},
    "stopping": {"max_epochs": 6},
    "dtype": "float64",
    "progress": False,
}


def test_tracker_logs_sharpness_every_k_epochs_into_history_and_metrics():
    result = run({**BASE, "metrics": {"sharpness": {"every": 2, "top_k": 2}}})
    logged = [h["sharpness"] for h in result.history]  # every row has the columns, None between measurements
    assert [v is not None for v in logged] == [False, True, False, True, False, True]
    assert all(h["sharpness"] >= h["sharpness_2"] > 0 for h in result.history if h["sharpness"] is not None)
    assert result.metrics["sharpness_final"] == result.history[-1]["sharpness"]
    # at initialization: the same number sharpness() gives on the untrained model
    data = manualbp.train.load_dataset(BASE["data"], 0, torch.float64)
    from manualbp.train.loop import build_model

    model = build_model(run({**BASE, "stopping": {"max_epochs": 1}}).config["model"], data.in_features, data.out_features, torch.float64, {"name": "xavier_uniform"}, 0)
    assert result.metrics["sharpness_init"] == pytest.approx(sharpness(model, data.x_train, data.y_train).value, rel=1e-9)
    assert "sharpness" not in run(BASE).history[0]  # off by default


@pytest.mark.parametrize("backend", ["autograd", "fused"])
def test_tracker_reads_every_backends_live_weights(backend):
    manual = run({**BASE, "metrics": {"sharpness": True}})
    other = run({**BASE, "backend": backend, "metrics": {"sharpness": True}})
    for a, b in zip(manual.history, other.history):
        assert b["sharpness"] == pytest.approx(a["sharpness"], rel=1e-8)


def test_subset_and_resume(tmp_path):
    sub = run({**BASE, "metrics": {"sharpness": {"subset": 20}}})
    full = run({**BASE, "metrics": {"sharpness": True}})
    assert sub.history[0]["sharpness"] != full.history[0]["sharpness"]
    cfg = {**BASE, "metrics": {"sharpness": True}, "output_dir": str(tmp_path / "run"), "checkpoint_every_s": 0}
    first = run({**cfg, "stopping": {"max_epochs": 6}})
    again = run({**cfg, "stopping": {"max_epochs": 6}})  # the stored result, without training
    assert again.metrics["sharpness_init"] == first.metrics["sharpness_init"] == full.metrics["sharpness_init"]
    assert math.isfinite(first.metrics["sharpness_final"])


def test_activation_tracker_per_layer_statistics_on_a_fixed_batch():
    from manualbp.studies import saturation
    from manualbp.train.metrics import saturated

    cfg = {**BASE, "model": {"hidden": [8, 6], "activation": "sigmoid"}, "metrics": {"activations": {"examples": 10}}}
    result = run(cfg)
    data = manualbp.train.load_dataset(BASE["data"], 0, torch.float64)
    model = result.model
    _, hidden = model.forward_with_hidden(data.x_val[:10])
    last = result.history[-1]
    for layer, a in enumerate(hidden, 1):
        assert last[f"act_mean_{layer}"] == pytest.approx(a.mean().item(), rel=1e-9)
        assert last[f"act_p98_{layer}"] == pytest.approx(torch.quantile(a.reshape(-1), 0.98).item(), rel=1e-9)
        assert last[f"act_p2_{layer}"] <= last[f"act_mean_{layer}"] <= last[f"act_p98_{layer}"]
    assert [last[f"saturated_{k}"] for k in (1, 2)] == saturation(model, data.x_val[:10])
    assert "act_mean_1_init" in result.metrics and result.metrics["act_mean_1_init"] != last["act_mean_1"]
    # the saturation rule: below 1% of the derivative's peak
    a = torch.tensor([0.001, 0.5, 0.9999])
    assert saturated("sigmoid", a).tolist() == [True, False, True]
    assert saturated("tanh", torch.tensor([0.999, 0.0])).tolist() == [True, False]
    assert saturated("relu", torch.tensor([0.0, 1.0])).tolist() == [True, False]


def test_measurements_survive_a_resume(tmp_path, monkeypatch):
    """A run stopped after epoch 2 and resumed from its checkpoint ends with the same history and *_init metrics."""
    from manualbp.train import loop

    cfg = {**BASE, "metrics": {"sharpness": True, "activations": True}, "checkpoint_every_s": 0}
    whole = run({**cfg, "output_dir": str(tmp_path / "whole")})
    calls = {"n": 0}
    original = loop.Measurements.after_epoch

    def stop_after_two(self, epoch, model):
        if epoch == 3 and calls["n"] == 0:
            calls["n"] += 1
            raise KeyboardInterrupt  # killed during epoch 3, after the checkpoint of epoch 2
        return original(self, epoch, model)

    monkeypatch.setattr(loop.Measurements, "after_epoch", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run({**cfg, "output_dir": str(tmp_path / "resumed")})
    resumed = run({**cfg, "output_dir": str(tmp_path / "resumed")})
    for key in ("sharpness_init", "sharpness_final", "act_mean_1_init"):
        assert resumed.metrics[key] == whole.metrics[key]
    assert [h["sharpness"] for h in resumed.history] == [h["sharpness"] for h in whole.history]


def test_measuring_does_not_change_the_trajectory():
    cfg = {**BASE, "optim": {"lr": 0.5, "batch_size": 16}, "dtype": "float32"}
    plain = run(cfg)
    measured = run({**cfg, "metrics": {"sharpness": True, "activations": True}})
    assert [h["train_loss"] for h in measured.history] == [h["train_loss"] for h in plain.history]
    assert measured.metrics["test_accuracy"] == plain.metrics["test_accuracy"]
