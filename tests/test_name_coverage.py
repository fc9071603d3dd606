"""Every registered activation and loss reaches every execution path, or the path says it does not.

The names come from the formula tables of ``manualbp.functional`` (``ACTIVATIONS``; the fast paths' ``LOSSES``);
each path is run with each name, so a path that forgets a name (a new activation added to ``functional`` but
not to the C++ kernels, the fused tables or the config checks) fails here.
"""

from __future__ import annotations

import pytest
import torch

import manualbp
from manualbp import autograd as A
from manualbp import functional as F
from manualbp import native
from manualbp.fast import _losses as fast_losses
from manualbp.fast import fused
from manualbp.fast.fused import FusedTrainer
from manualbp.fast.vectorized import VectorizedTrainer
from manualbp.hessian import LOSS_MODULES
from manualbp.train import resolve_config
from manualbp.train.defaults import LOSSES as CONFIG_LOSSES
from manualbp.train.metrics import saturated
from manualbp.verify.explanation import _SIGMA_PRIME
from manualbp.verify.references import LOSSES as VERIFY_LOSSES
from manualbp.verify.tracing import ACTIVATION_DERIVATIVES

ACTS = list(F.ACTIVATIONS)
LOSS_NAMES = list(fast_losses.LOSSES)


def test_the_tables_name_the_same_activations_and_losses():
    assert set(A.ACTIVATION_FUNCTIONS) == set(ACTS)
    assert set(fused._FORWARD) == set(fused._BACKWARD) == set(ACTS)
    assert set(ACTIVATION_DERIVATIVES) == set(_SIGMA_PRIME) == set(ACTS)
    assert set(LOSS_MODULES) == set(VERIFY_LOSSES) == set(CONFIG_LOSSES) - {"auto"} == set(LOSS_NAMES)


def _model(activation: str) -> manualbp.MLP:
    torch.manual_seed(0)
    return manualbp.MLP(4, [5, 3], 2, activation=activation, negative_slope=0.1, dtype=torch.float64)


def _target(loss: str, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 2, (n,), generator=g) if loss == "cross_entropy" else torch.randn(n, 2, generator=g, dtype=torch.float64)


def _same_step(stepped: manualbp.MLP, fresh: manualbp.MLP, loss: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """One SGD step of the fused and of the vectorized trainer from ``fresh``'s weights equals ``stepped``'s."""
    fused_model = _clone(fresh)
    FusedTrainer(fused_model, loss, lr=0.1).step(x, y)
    vectorized = VectorizedTrainer([_clone(fresh)], loss, lr=0.1)
    vectorized.step(x.unsqueeze(0), y.unsqueeze(0))
    for name, model in (("fused", fused_model), ("vectorized", vectorized.model(0))):
        for a, b in zip(model.parameters(), stepped.parameters()):
            assert torch.allclose(a, b, atol=1e-12), (name, loss)


def _clone(model: manualbp.MLP) -> manualbp.MLP:
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("activation", ACTS)
def test_every_activation_on_every_path(activation):
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = _model(activation)
    reference = model.to_torch()(x)
    specs, params = model.activation_specs, list(model.parameters())
    # the whole-network Function, the per-layer Functions (hooks route through them), the C++ node
    assert torch.allclose(A.MLPFunction.apply(x, specs, True, *params)[0], reference, atol=1e-12)
    hooked = _model(activation)
    hooked[0].register_forward_hook(lambda m, i, o: None)
    assert torch.allclose(hooked(x), reference, atol=1e-12)
    ext = native.load()
    if ext is not None:
        assert torch.allclose(ext.mlp(x, specs, True, params)[0], reference, atol=1e-12)
    # the fused and vectorized trainers: one SGD step each, equal to the manual module's step
    y = _target("cross_entropy")
    manual = _model(activation)
    opt = torch.optim.SGD(manual.parameters(), lr=0.1)
    manualbp.CrossEntropyLoss()(manual(x), y).backward()
    opt.step()
    _same_step(manual, _model(activation), "cross_entropy", x, y)
    # the config checks and the saturation rule know it
    assert resolve_config({"model": {"activation": activation}})["model"]["activation"] == activation
    saturated(activation, torch.rand(3, dtype=torch.float64))


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_every_loss_on_every_path(loss):
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = _target(loss)
    manual = _model("tanh")
    opt = torch.optim.SGD(manual.parameters(), lr=0.1)
    LOSS_MODULES[loss]()(manual(x), y).backward()
    opt.step()
    _same_step(manual, _model("tanh"), loss, x, y)
    task = "classification" if loss == "cross_entropy" else "regression"
    data = {"name": "iris"} if task == "classification" else {"name": "diabetes"}
    assert resolve_config({"data": data, "loss": loss})["loss"] == loss


_TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def test_the_optimizer_tables_name_the_same_optimizers():
    from manualbp import optim_steps
    from manualbp.fast.backend import _ARGUMENTS

    assert set(_TORCH_OPTIMIZERS) == set(optim_steps.OPTIMIZERS) == set(_ARGUMENTS)


@pytest.mark.parametrize("optimizer", list(_TORCH_OPTIMIZERS))
def test_every_optimizer_on_every_fast_path(optimizer, monkeypatch):
    """Each optimizer of manualbp.optim_steps on the fused trainer (Python step; C++ loop where built) and the
    vectorized trainer: three steps equal torch.optim's on the module, and the config accepts the name."""
    kwargs = {"lr": 0.05, "weight_decay": 0.01, **({"momentum": 0.9} if optimizer == "sgd" else {"betas": (0.8, 0.95)})}
    x = torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = _target("cross_entropy", 12)
    manual = _model("tanh")
    opt = _TORCH_OPTIMIZERS[optimizer](manual.parameters(), **kwargs)
    for xb, yb in zip(x.split(4), y.split(4)):
        opt.zero_grad()
        manualbp.CrossEntropyLoss()(manual(xb), yb).backward()
        opt.step()
    paths = {}
    for mode in ("off", "require") if native.load() is not None else ("off",):
        monkeypatch.setenv("MANUALBP_NATIVE", mode)
        fused_model = _clone(_model("tanh"))
        trainer = FusedTrainer(fused_model, "cross_entropy", optimizer=optimizer, **kwargs)
        trainer.step_many(*trainer.prepare(x, y), 4)
        paths[f"fused-{mode}"] = fused_model
    vectorized = VectorizedTrainer([_clone(_model("tanh"))], "cross_entropy", optimizer=optimizer, **kwargs)
    for xb, yb in zip(x.split(4), y.split(4)):
        vectorized.step(xb, yb)
    paths["vectorized"] = vectorized.model(0)
    for name, model in paths.items():
        for a, b in zip(model.parameters(), manual.parameters()):
            assert torch.allclose(a, b, atol=1e-12, rtol=0), (name, optimizer)
    assert resolve_config({"optim": {"name": optimizer, "lr": 0.01}})["optim"]["name"] == optimizer
