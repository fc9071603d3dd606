"""manualbp.optim_steps against torch.optim (float64, ~20 steps): SGD with every option, Adam and AdamW with and
without weight decay, on per-parameter lists (numbers as hyperparameters) and on K stacked models
(per-model tensors (K, 1, 1) as hyperparameters)."""

from __future__ import annotations

import pytest
import torch

from manualbp import optim_steps as O

D = torch.float64
STEPS = 20
SHAPES = [(5, 4), (5,), (3, 5)]


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, dtype=D, generator=g) for s in SHAPES]


def _grads(step, seed=0):
    """A different, seeded gradient per step (never zeros, never all equal)."""
    g = torch.Generator().manual_seed(1000 * seed + step + 1)
    return [torch.randn(*s, dtype=D, generator=g) for s in SHAPES]


def _reference(cls, params, seed, **kwargs):
    """``params`` after STEPS steps of ``cls`` (torch.optim) on the seeded gradients."""
    ps = [p.clone().requires_grad_(True) for p in params]
    opt = cls(ps, **kwargs)
    for t in range(STEPS):
        for p, g in zip(ps, _grads(t, seed)):
            p.grad = g
        opt.step()
    return [p.detach() for p in ps], opt


def _close(actual, expected, tol=1e-12):
    for a, e in zip(actual, expected):
        assert (a - e).abs().max().item() <= tol * (1 + e.abs().max().item())


SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.1, weight_decay=0.05),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.8, dampening=0.3),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.02, momentum=0.7, dampening=0.2, weight_decay=1e-2),
    dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-2),
]
ADAM_CASES = [
    ("adam", dict(lr=0.01)),
    ("adam", dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6)),
    ("adam", dict(lr=0.01, weight_decay=0.1)),
    ("adamw", dict(lr=0.01, weight_decay=0.1)),
    ("adamw", dict(lr=0.03, betas=(0.5, 0.9), weight_decay=0.5)),
    ("adamw", dict(lr=0.01, weight_decay=0.0)),
]
TORCH = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=lambda k: ",".join(k))
def test_sgd_step_equals_torch_sgd(kwargs):
    params = _params()
    expected, opt = _reference(torch.optim.SGD, params, 0, **kwargs)
    state = O.SGDState()
    ps = [p.clone() for p in params]
    for t in range(STEPS):
        O.sgd_step_(ps, _grads(t), state, **kwargs)
    _close(ps, expected)
    if kwargs.get("momentum"):
        _close(state.momentum_buffers, [opt.state[p]["momentum_buffer"] for p in opt.param_groups[0]["params"]])
    else:
        assert state.momentum_buffers is None
    assert max((p - q).abs().max().item() for p, q in zip(ps, params)) > 1e-2  # the steps moved the parameters


@pytest.mark.parametrize("name,kwargs", ADAM_CASES, ids=lambda v: v if isinstance(v, str) else ",".join(v))
def test_adam_step_equals_torch_adam_and_adamw(name, kwargs):
    params = _params()
    expected, opt = _reference(TORCH[name], params, 0, **kwargs)
    state = O.AdamState()
    ps = [p.clone() for p in params]
    for t in range(STEPS):
        O.adam_step_(ps, _grads(t), state, decoupled=name == "adamw", **{"weight_decay": 0.0, **kwargs})
    _close(ps, expected)
    torch_state = [opt.state[p] for p in opt.param_groups[0]["params"]]
    _close(state.exp_avg, [s["exp_avg"] for s in torch_state])
    _close(state.exp_avg_sq, [s["exp_avg_sq"] for s in torch_state])
    assert state.step == STEPS == int(torch_state[0]["step"])
    assert max((p - q).abs().max().item() for p, q in zip(ps, params)) > 1e-2


def test_adam_and_adamw_differ_with_weight_decay():
    """Coupled (L2 in the gradient) and decoupled decay are different updates: the flag is not ignored."""
    out = []
    for decoupled in (False, True):
        ps = _params()
        state = O.AdamState()
        for t in range(3):
            O.adam_step_(ps, _grads(t), state, lr=0.01, weight_decay=0.5, decoupled=decoupled)
        out.append(ps)
    assert max((a - b).abs().max().item() for a, b in zip(*out)) > 1e-4


K = 3


def _stacked(per_model):
    """K models' parameter lists -> one (K, *shape) tensor per parameter."""
    return [torch.stack([ps[i] for ps in per_model]) for i in range(len(per_model[0]))]


def _per_model(values):
    return torch.tensor(values, dtype=D).view(-1, 1, 1)


def _stacked_grads(t):
    return _stacked([_grads(t, seed) for seed in range(K)])


def _as_3d(tensors):
    """(K, n) biases as (K, 1, n), as VectorizedTrainer holds them, so (K, 1, 1) hyperparameters broadcast."""
    return [t.unsqueeze(1) if t.dim() == 2 else t for t in tensors]


def test_sgd_step_on_k_stacked_models_with_per_model_hyperparameters():
    lrs, moms, wds, nest = [0.1, 0.05, 0.02], [0.9, 0.5, 0.9], [0.0, 1e-2, 0.1], [True, False, False]
    params = [_params(seed) for seed in range(K)]
    expected = [
        _reference(torch.optim.SGD, params[k], k, lr=lrs[k], momentum=moms[k], weight_decay=wds[k], nesterov=nest[k])[0]
        for k in range(K)
    ]
    ps = _as_3d(_stacked(params))
    state = O.SGDState()
    for t in range(STEPS):
        O.sgd_step_(
            ps, _as_3d(_stacked_grads(t)), state, lr=_per_model(lrs), momentum=_per_model(moms),
            weight_decay=_per_model(wds), nesterov=torch.tensor(nest).view(-1, 1, 1),
        )  # fmt: skip
    for k in range(K):
        _close([p[k].reshape(e.shape) for p, e in zip(ps, expected[k])], expected[k])


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_step_on_k_stacked_models_with_per_model_hyperparameters(name):
    lrs, b1, b2, eps, wds = [0.01, 0.03, 0.002], [0.9, 0.8, 0.5], [0.999, 0.9, 0.99], [1e-8, 1e-6, 1e-3], [0.0, 0.1, 0.5]
    params = [_params(seed) for seed in range(K)]
    expected = [
        _reference(TORCH[name], params[k], k, lr=lrs[k], betas=(b1[k], b2[k]), eps=eps[k], weight_decay=wds[k])[0]
        for k in range(K)
    ]
    ps = _as_3d(_stacked(params))
    state = O.AdamState(step=torch.zeros(K, 1, 1, dtype=D))
    for t in range(STEPS):
        O.adam_step_(
            ps, _as_3d(_stacked_grads(t)), state, lr=_per_model(lrs), betas=(_per_model(b1), _per_model(b2)),
            eps=_per_model(eps), weight_decay=_per_model(wds), decoupled=name == "adamw",
        )  # fmt: skip
    for k in range(K):
        _close([p[k].reshape(e.shape) for p, e in zip(ps, expected[k])], expected[k])
    assert state.step.view(-1).tolist() == [STEPS] * K


def test_the_two_forms_are_one_formula():
    """A number and a (1, 1, 1) tensor as the hyperparameter give the same step (the two branches of _plus,
    _where and the bias corrections)."""

    def as_tensor(key, value):
        if key == "betas":
            return tuple(_per_model([b]) for b in value)
        return torch.tensor(value).view(1, 1, 1) if key == "nesterov" else _per_model([value])

    for step, kwargs in (
        (O.sgd_step_, dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)),
        (O.sgd_step_, dict(lr=0.1, momentum=0.5, dampening=0.2)),
        (O.adam_step_, dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
        (O.adam_step_, dict(lr=0.01, weight_decay=0.1, decoupled=True)),
    ):
        numbers = _as_3d(_stacked([_params()]))  # one model: (1, out, in), (1, 1, out)
        tensors = [p.clone() for p in numbers]
        tensor_kwargs = {k: v if k in ("dampening", "decoupled") else as_tensor(k, v) for k, v in kwargs.items()}
        adam = step is O.adam_step_
        s1 = O.AdamState() if adam else O.SGDState()
        s2 = O.AdamState(step=torch.zeros(1, 1, 1, dtype=D)) if adam else O.SGDState()
        for t in range(5):
            grads = _as_3d(_stacked([_grads(t)]))
            step(numbers, grads, s1, **kwargs)
            step(tensors, grads, s2, **tensor_kwargs)
        _close(tensors, numbers, tol=1e-14)
        assert max((p - q).abs().max().item() for p, q in zip(numbers, _as_3d(_stacked([_params()])))) > 1e-3


def test_state_dicts_round_trip_and_load_weights_only(tmp_path):
    ps = _params()
    sgd, adam = O.SGDState(), O.AdamState()
    O.sgd_step_([p.clone() for p in ps], _grads(0), sgd, lr=0.1, momentum=0.9)
    O.adam_step_([p.clone() for p in ps], _grads(0), adam, lr=0.1)
    torch.save({"sgd": sgd.state_dict(), "adam": adam.state_dict()}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    sgd2, adam2 = O.SGDState.from_state_dict(loaded["sgd"]), O.AdamState.from_state_dict(loaded["adam"])
    assert all(torch.equal(a, b) for a, b in zip(sgd2.momentum_buffers, sgd.momentum_buffers))
    assert all(torch.equal(a, b) for a, b in zip(adam2.exp_avg_sq, adam.exp_avg_sq)) and adam2.step == 1
    assert O.SGDState.from_state_dict(None).momentum_buffers is None and O.AdamState.from_state_dict(None).step == 0


def test_check_optimizer_names_the_argument():
    assert O.check_optimizer("AdamW") == "adamw"
    with pytest.raises(ValueError, match="optimizer must be one of 'sgd', 'adam', 'adamw', got 'rmsprop'"):
        O.check_optimizer("rmsprop")
