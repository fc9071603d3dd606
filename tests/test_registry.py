"""The formula registries: a new activation and a new loss registered from outside the package work everywhere.

The registration goes through the public API (``manualbp.register_activation`` / ``register_loss``) with nothing
else edited; training with them through ``manualbp.train.run`` on the manual, fused and both backends and through
the vectorized sweep matches ``backend: autograd`` (autograd of the forward formulas) in float64.
"""

from __future__ import annotations

import pytest
import torch
from helpers import EXTRA_ACTIVATION, EXTRA_LOSS, extra_formulas

import manualbp
from manualbp import registry, verify
from manualbp.autograd import ACTIVATION_FUNCTIONS, LOSS_FUNCTIONS
from manualbp.fast.sweep import run_many
from manualbp.train import run


@pytest.fixture
def extra():
    with extra_formulas():
        yield


def _cfg(backend: str, **over) -> dict:
    cfg = {
        "data": {"name": "diabetes"},
        "model": {"hidden": [8], "activation": EXTRA_ACTIVATION},
        "loss": EXTRA_LOSS,
        "dtype": "float64",
        "device": "cpu",
        "progress": False,
        "optim": {"lr": 0.05, "batch_size": 64},
        "stopping": {"max_epochs": 3, "early_stopping": None},
        "backend": backend,
        "seed": 3,
    }
    cfg.update(over)
    return cfg


def test_registered_formulas_train_through_every_backend_like_autograd(extra):
    reference = run(_cfg("autograd"))
    assert reference.status == "completed"
    results = {b: run(_cfg(b)) for b in ("manual", "fused", "both")}
    results["vectorized"] = run_many([_cfg("manual")])[0]
    want = [h["train_loss"] for h in reference.history]
    assert want[-1] < want[0]  # it learns
    for backend, result in results.items():
        got = [h["train_loss"] for h in result.history]
        assert got == pytest.approx(want, rel=1e-10, abs=1e-12), backend
        for p, q in zip(result.model.parameters(), reference.model.parameters()):
            assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), backend


def test_registered_formulas_pass_gradcheck_and_double_backward(extra):
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    fn = ACTIVATION_FUNCTIONS[EXTRA_ACTIVATION]
    assert torch.autograd.gradcheck(fn.apply, (z,))
    assert torch.autograd.gradgradcheck(fn.apply, (z,))
    y = torch.randn(5, 3, dtype=torch.float64)
    loss = LOSS_FUNCTIONS[EXTRA_LOSS]
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(lambda o, r=reduction: loss.apply(o, y, r), (z,))
        assert torch.autograd.gradgradcheck(lambda o, r=reduction: loss.apply(o, y, r), (z,))


def test_a_registered_activation_is_a_module_with_a_torch_twin(extra):
    model = manualbp.MLP(3, [4], 2, activation=EXTRA_ACTIVATION, dtype=torch.float64)
    assert "RegisteredActivation('softplus')" in repr(model)
    twin = model.to_torch()
    back = manualbp.MLP.from_torch(twin)
    x = torch.randn(5, 3, dtype=torch.float64)
    assert torch.allclose(back(x), model(x)) and back.activation_specs == model.activation_specs
    report = verify.compare(model, x, torch.randn(5, 2, dtype=torch.float64), loss=EXTRA_LOSS)
    assert report.ok


def test_a_wrong_registered_derivative_is_caught(extra):
    """The checks are not fooled by a registration: a backward that is not the forward's derivative fails."""
    spec = registry.activation_spec(EXTRA_ACTIVATION)
    registry.ACTIVATION_REGISTRY[EXTRA_ACTIVATION] = registry.replaced(
        spec, backward=lambda g, a, s: g * a, backward_=lambda g, a, s: g.mul_(a)
    )
    model = manualbp.MLP(3, [4], 2, activation=EXTRA_ACTIVATION, dtype=torch.float64)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    assert not verify.compare(model, x, y, loss="squared_error").ok
    assert not verify.finite_difference_check(model, x, target=y, loss="squared_error").ok


def test_registration_errors_name_the_argument(extra):
    with pytest.raises(ValueError, match="activation 'softplus' is already registered"):
        manualbp.register_activation(EXTRA_ACTIVATION, torch.tanh, lambda g, a: g, formula="a", derivative="1")
    with pytest.raises(ValueError, match="name: expected a name made of letters"):
        manualbp.register_activation("soft plus", torch.tanh, lambda g, a: g, formula="a", derivative="1")
    with pytest.raises(TypeError, match="backward must be callable"):
        manualbp.register_activation("x1", torch.tanh, None, formula="a", derivative="1")
    with pytest.raises(ValueError, match="derivative: expected the formula as text"):
        manualbp.register_activation("x1", torch.tanh, lambda g, a: g, formula="a", derivative="")
    with pytest.raises(ValueError, match="targets must be one of classes, values, got 'labels'"):
        manualbp.register_loss("x2", lambda o, y, r: o, lambda g, o, y, r: g, formula="L", gradient="g", targets="labels")
    with pytest.raises(ValueError, match="activation must be one of sigmoid, tanh, relu, leaky_relu, identity, softplus"):
        manualbp.MLP(2, [2], 2, activation="swish")
    with pytest.raises(ValueError, match="loss must be one of auto, cross_entropy, squared_error, mse, log_cosh"):
        run({"loss": "huber"})
    assert "x1" not in registry.ACTIVATION_REGISTRY and "x2" not in registry.LOSS_REGISTRY


def test_a_loss_that_does_not_fit_the_data_is_refused(extra):
    with pytest.raises(ValueError, match="loss 'log_cosh' needs regression targets; data set 'iris'"):
        run(_cfg("manual", data={"name": "iris"}))


def test_a_registered_class_label_loss_is_refused_by_the_fast_trainers_with_the_reason(extra):
    nll = lambda o, y, r: torch.nn.functional.cross_entropy(o, y, reduction=r)  # noqa: E731
    manualbp.register_loss(
        "my_ce", nll, lambda g, o, y, r: g * (torch.softmax(o, -1) - torch.nn.functional.one_hot(y, o.shape[-1])) / len(o),
        formula="-log softmax(o)_y", gradient="softmax(o) - y", targets="classes",
    )
    try:
        from manualbp.fast import FusedTrainer

        with pytest.raises(ValueError, match="loss 'my_ce' takes class labels: the fast trainers run a registered"):
            FusedTrainer(manualbp.MLP(3, [4], 2), "my_ce", lr=0.1)
        assert run({"data": {"name": "iris"}, "loss": "my_ce", "progress": False, "stopping": {"max_epochs": 1}}).status
    finally:
        registry.LOSS_REGISTRY.remove("my_ce")
