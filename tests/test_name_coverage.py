"""Registry x execution path: every registered activation and loss reaches every path, or its documented fallback.

The names come from ``manualbp.registry`` -- the built-in ones and one activation and one loss registered from
outside the package (``helpers.extra_formulas``: softplus and log-cosh, which the compiled kernels do not have, so
the C++ paths must fall back to Python for them). Each path is run with each name against a reference computed
another way (autograd of ``to_torch()``, ``torch.optim.SGD`` on the module), so a path that forgets a name fails.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import EXTRA_ACTIVATION, EXTRA_LOSS, extra_formulas

import manualbp
from manualbp import autograd as A
from manualbp import functional as F
from manualbp import native, registry
from manualbp.fast import _losses as fast_losses
from manualbp.fast.fused import FusedTrainer
from manualbp.fast.vectorized import VectorizedTrainer
from manualbp.hessian import LOSS_MODULES
from manualbp.init import initialize
from manualbp.nn import make_loss
from manualbp.train import resolve_config
from manualbp.train.defaults import loss_choices
from manualbp.train.metrics import saturated
from manualbp.verify import ACTIVATION_DERIVATIVES, LOSSES, compare, explain, trace

ACTS = [*registry.activation_names(), EXTRA_ACTIVATION]
LOSS_NAMES = [*registry.loss_names(), EXTRA_LOSS]


@pytest.fixture(autouse=True)
def _extra():
    with extra_formulas():
        yield


def test_every_table_is_the_registry():
    assert list(registry.ACTIVATION_REGISTRY) == ACTS
    assert list(registry.LOSS_REGISTRY) == LOSS_NAMES
    for table in (F.ACTIVATIONS, A.ACTIVATION_FUNCTIONS, ACTIVATION_DERIVATIVES):
        assert list(table) == ACTS
    for table in (A.LOSS_FUNCTIONS, fast_losses.LOSSES, LOSS_MODULES, LOSSES):
        assert list(table) == LOSS_NAMES
    assert loss_choices() == ("auto", *LOSS_NAMES)
    # the texts are the specs' (what trace and explain print)
    assert ACTIVATION_DERIVATIVES["sigmoid"] == "a (1 - a)"
    assert ACTIVATION_DERIVATIVES[EXTRA_ACTIVATION] == "(1 - e^{-a})"
    assert registry.activation_spec(EXTRA_ACTIVATION).sigma_prime("a^1") == "(1 - e^{-a^1})"  # explain's text


def _model(activation: str) -> manualbp.MLP:
    torch.manual_seed(0)
    return manualbp.MLP(4, [5, 3], 2, activation=activation, negative_slope=0.1, dtype=torch.float64)


def _target(loss: str, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if registry.loss_spec(loss).targets == "classes":
        return torch.randint(0, 2, (n,), generator=g)
    return torch.randn(n, 2, generator=g, dtype=torch.float64)


def _same_step(stepped: manualbp.MLP, fresh: manualbp.MLP, loss: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """One SGD step of the fused trainer (its Python step and its epoch call, in C++ where the extension has
    the formulas, else its Python loop) and of the vectorized trainer equals ``stepped``'s."""
    fused_step, fused_epoch = copy.deepcopy(fresh), copy.deepcopy(fresh)
    FusedTrainer(fused_step, loss, lr=0.1).step(x, y)
    trainer = FusedTrainer(fused_epoch, loss, lr=0.1)
    trainer.step_many(*trainer.prepare(x, y), batch_size=len(x))
    vectorized = VectorizedTrainer([copy.deepcopy(fresh)], loss, lr=0.1)
    vectorized.step(x.unsqueeze(0), y.unsqueeze(0))
    for name, model in (("fused", fused_step), ("fused-epoch", fused_epoch), ("vectorized", vectorized.model(0))):
        for a, b in zip(model.parameters(), stepped.parameters()):
            assert torch.allclose(a, b, atol=1e-12), (name, loss)


@pytest.mark.parametrize("activation", ACTS)
def test_every_activation_on_every_path(activation):
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = _model(activation)
    reference = model.to_torch()(x)
    specs, params = model.activation_specs, list(model.parameters())
    # the whole-network Function, the per-layer Functions (hooks route through them), the module's own call
    # (the C++ node where the kernels have the activation, else its documented fallback, the Python Function)
    assert torch.allclose(A.MLPFunction.apply(x, specs, True, *params)[0], reference, atol=1e-12)
    hooked = _model(activation)
    hooked[0].register_forward_hook(lambda m, i, o: None)
    assert torch.allclose(hooked(x), reference, atol=1e-12)
    assert torch.allclose(model(x), reference, atol=1e-12)
    ext = native.load()
    if ext is not None and registry.activation_spec(activation).native:
        assert torch.allclose(ext.mlp(x, specs, True, params)[0], reference, atol=1e-12)
    # gradients against autograd of the torch twin, per parameter and per intermediate
    y = _target("cross_entropy")
    assert compare(_model(activation), x, y, loss="cross_entropy").ok
    assert trace(_model(activation), x, y, loss="cross_entropy").ok
    # the fused and vectorized trainers: one SGD step each, equal to the manual module's step
    manual = _model(activation)
    opt = torch.optim.SGD(manual.parameters(), lr=0.1)
    manualbp.CrossEntropyLoss()(manual(x), y).backward()
    opt.step()
    _same_step(manual, _model(activation), "cross_entropy", x, y)
    # the config checks, the init gains and the saturation rule know it
    assert resolve_config({"model": {"activation": activation}})["model"]["activation"] == activation
    initialize(_model(activation), {"name": "xavier_uniform", "gain": "auto"})
    initialize(_model(activation), "kaiming_normal")
    saturated(activation, torch.rand(3, dtype=torch.float64))
    assert explain([2, 2, 2], activation=activation).ok


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_every_loss_on_every_path(loss):
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = _target(loss)
    manual = _model("tanh")
    opt = torch.optim.SGD(manual.parameters(), lr=0.1)
    make_loss(loss)(manual(x), y).backward()
    opt.step()
    _same_step(manual, _model("tanh"), loss, x, y)
    assert compare(_model("tanh"), x, y, loss=loss).ok
    assert trace(_model("tanh"), x, y, loss=loss).ok
    assert explain([2, 2, 2], activation="tanh", loss=loss).ok
    LOSS_MODULES[loss]()(_model("tanh")(x), y)
    task = "classification" if registry.loss_spec(loss).targets == "classes" else "regression"
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
        fused_model = copy.deepcopy(_model("tanh"))
        trainer = FusedTrainer(fused_model, "cross_entropy", optimizer=optimizer, **kwargs)
        trainer.step_many(*trainer.prepare(x, y), 4)
        paths[f"fused-{mode}"] = fused_model
    vectorized = VectorizedTrainer([copy.deepcopy(_model("tanh"))], "cross_entropy", optimizer=optimizer, **kwargs)
    for xb, yb in zip(x.split(4), y.split(4)):
        vectorized.step(xb, yb)
    paths["vectorized"] = vectorized.model(0)
    for name, model in paths.items():
        for a, b in zip(model.parameters(), manual.parameters()):
            assert torch.allclose(a, b, atol=1e-12, rtol=0), (name, optimizer)
    assert resolve_config({"optim": {"name": optimizer, "lr": 0.01}})["optim"]["name"] == optimizer
