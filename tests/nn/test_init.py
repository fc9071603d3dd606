"""manualbp.init: every scheme draws PyTorch's own distribution (same generator, same numbers) and has
the bounds and moments its formula says; biases separately; errors name the key."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import manualbp
from manualbp.init import SCHEMES, initialize


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def big_model(activation="relu"):
    # wide layers so that sample moments are tight: 400 -> 300 -> 200 -> 10
    return manualbp.MLP(400, [300, 200], 10, activation=activation, dtype=torch.float64)


@pytest.mark.parametrize(
    "cfg, reference",
    [
        ({"name": "xavier_uniform"}, lambda w, g, nl: nn.init.xavier_uniform_(w, generator=g)),
        ({"name": "xavier_normal"}, lambda w, g, nl: nn.init.xavier_normal_(w, generator=g)),
        ({"name": "xavier_uniform", "gain": 2.5}, lambda w, g, nl: nn.init.xavier_uniform_(w, gain=2.5, generator=g)),
        (
            {"name": "xavier_normal", "gain": "auto"},
            lambda w, g, nl: nn.init.xavier_normal_(w, gain=nn.init.calculate_gain(nl), generator=g),
        ),
        ({"name": "kaiming_uniform"}, lambda w, g, nl: nn.init.kaiming_uniform_(w, nonlinearity=nl, generator=g)),
        ({"name": "kaiming_normal"}, lambda w, g, nl: nn.init.kaiming_normal_(w, nonlinearity=nl, generator=g)),
        (
            {"name": "kaiming_normal", "mode": "fan_out"},
            lambda w, g, nl: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity=nl, generator=g),
        ),
        ({"name": "normal", "std": 0.3}, lambda w, g, nl: nn.init.normal_(w, 0.0, 0.3, generator=g)),
        ({"name": "uniform", "a": 0.2}, lambda w, g, nl: nn.init.uniform_(w, -0.2, 0.2, generator=g)),
        ({"name": "orthogonal"}, lambda w, g, nl: nn.init.orthogonal_(w, generator=g)),
        ({"name": "torch_default"}, lambda w, g, nl: nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)),
    ],
    ids=lambda v: v.get("name", "") + str(v.get("gain", v.get("mode", ""))) if isinstance(v, dict) else "",
)
def test_same_draw_as_torch_nn_init(cfg, reference):
    """With the same generator the scheme gives exactly torch.nn.init's numbers, layer by layer, with the
    nonlinearity that follows each layer (the output layer is 'linear')."""
    model = manualbp.MLP(20, [16, 12], 5, activation=["relu", "tanh"], dtype=torch.float64)
    initialize(model, {**cfg, "bias": "zeros"}, gen(3))
    g = gen(3)
    for lin, nl in zip(model.linears, ["relu", "tanh", "linear"]):
        w = torch.empty_like(lin.weight)
        reference(w, g, nl)
        torch.testing.assert_close(lin.weight.detach(), w, rtol=0, atol=0)
        assert torch.count_nonzero(lin.bias) == 0


def test_moments_and_bounds():
    """Bounds and standard deviations from the formulas (not from torch), on 400x300 weights."""
    model = big_model("relu")
    w1_shape = (300, 400)  # fan_out, fan_in

    def first(cfg):
        initialize(model, cfg, gen(1))
        return model.linears[0].weight.detach()

    fan_in, fan_out = w1_shape[1], w1_shape[0]
    bound = math.sqrt(6 / (fan_in + fan_out))
    w = first("xavier_uniform")
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    w = first("xavier_normal")
    assert abs(w.std().item() - math.sqrt(2 / (fan_in + fan_out))) < 0.01 * math.sqrt(2 / (fan_in + fan_out))
    assert abs(w.mean().item()) < 0.01 * w.std().item()
    w = first("kaiming_normal")  # relu layer: std sqrt(2 / fan_in)
    assert abs(w.std().item() - math.sqrt(2 / fan_in)) < 0.01 * math.sqrt(2 / fan_in)
    w = first("kaiming_uniform")  # bound sqrt(2) sqrt(3 / fan_in)
    kb = math.sqrt(2) * math.sqrt(3 / fan_in)
    assert w.abs().max() <= kb and w.abs().max() > 0.99 * kb
    w = first("lecun_normal")
    assert abs(w.std().item() - 1 / math.sqrt(fan_in)) < 0.01 / math.sqrt(fan_in)
    w = first("lecun_uniform")
    lb = math.sqrt(3 / fan_in)
    assert w.abs().max() <= lb and w.abs().max() > 0.99 * lb
    w = first({"name": "normal", "std": 0.01, "mean": 0.5})
    assert abs(w.mean().item() - 0.5) < 1e-3 and abs(w.std().item() - 0.01) < 1e-4
    w = first({"name": "uniform", "a": 0.3})
    assert w.abs().max() <= 0.3 and abs(w.std().item() - 0.3 / math.sqrt(3)) < 0.002
    w = first("torch_default")  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    tb = 1 / math.sqrt(fan_in)
    assert w.abs().max() <= tb and w.abs().max() > 0.99 * tb
    w = first({"name": "orthogonal", "gain": 2.0})  # 300 x 400: rows orthogonal, norm gain
    torch.testing.assert_close(w @ w.T, 4.0 * torch.eye(300, dtype=w.dtype), atol=1e-10, rtol=0)
    assert torch.count_nonzero(first("zeros")) == 0
    assert torch.all(first({"name": "constant", "value": 0.25}) == 0.25)


def test_kaiming_gain_follows_each_layers_activation():
    """kaiming std = calculate_gain(activation after the layer) / sqrt(fan_in); leaky_relu uses the model's slope."""
    model = manualbp.MLP(
        500, [400, 400, 400], 300, activation=["sigmoid", "tanh", "leaky_relu"], negative_slope=0.2, dtype=torch.float64
    )
    initialize(model, "kaiming_normal", gen(0))
    expected = [1.0, 5 / 3, math.sqrt(2 / (1 + 0.2**2)), 1.0]
    for lin, gain in zip(model.linears, expected):
        std = gain / math.sqrt(lin.in_features)
        assert abs(lin.weight.std().item() - std) < 0.01 * std


def test_bias_schemes():
    model = manualbp.MLP(50, [40], 30, dtype=torch.float64)
    initialize(model, {"name": "xavier_uniform"}, gen(0))
    assert all(torch.count_nonzero(lin.bias) == 0 for lin in model.linears)  # zeros by default
    initialize(model, {"name": "xavier_uniform", "bias": {"name": "constant", "value": 0.1}}, gen(0))
    assert all(torch.all(lin.bias == 0.1) for lin in model.linears)
    initialize(model, {"name": "torch_default"}, gen(0))  # nn.Linear's bias too
    for lin in model.linears:
        b = 1 / math.sqrt(lin.in_features)
        assert lin.bias.abs().max() <= b and torch.unique(lin.bias).numel() == lin.out_features
    initialize(model, {"name": "zeros", "bias": {"name": "normal", "std": 2.0}}, gen(0))
    assert model.linears[0].bias.std() > 1.0


def test_torch_default_matches_nn_linear_draw():
    """torch_default with the global RNG draws exactly what nn.Linear does (weight, then bias)."""
    torch.manual_seed(7)
    ref = nn.Linear(13, 9, dtype=torch.float64)
    model = manualbp.MLP(13, [], 9, dtype=torch.float64)
    torch.manual_seed(7)
    initialize(model, "torch_default")
    torch.testing.assert_close(model.linears[0].weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.linears[0].bias, ref.bias, rtol=0, atol=0)


def test_sequential_and_mlp_agree_and_generator_reproduces():
    model = manualbp.MLP(10, [8, 6], 3, activation="relu")
    seq = model.to_torch()
    initialize(model, "kaiming_uniform", gen(5))
    initialize(seq, "kaiming_uniform", gen(5))
    for a, b in zip(model.state_dict().values(), seq.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    again = manualbp.MLP(10, [8, 6], 3, activation="relu")
    initialize(again, "kaiming_uniform", gen(5))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    initialize(again, "kaiming_uniform", gen(6))
    assert not torch.equal(model.linears[0].weight, again.linears[0].weight)


def test_every_scheme_is_listed_and_runs():
    model = manualbp.MLP(6, [5], 4)
    for name in SCHEMES:
        initialize(model, name, gen(0))
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "cfg, match, exc",
    [
        ({"name": "glorot"}, "init.name must be one of", ValueError),
        ({"name": "normal", "gain": 2}, "init.gain is not a parameter of init scheme 'normal'", ValueError),
        ({"name": "normal", "std": -1}, "init.std must be a number >= 0, got -1", ValueError),
        ({"name": "kaiming_normal", "mode": "fan_avg"}, "init.mode must be 'fan_in' or 'fan_out'", ValueError),
        ({"name": "xavier_uniform", "gain": "big"}, "init.gain must be a positive number or 'auto'", ValueError),
        ({"name": "zeros", "bias": {"name": "xavier_uniform"}}, "init.bias.name must be one of", ValueError),
        (3, "init must be a scheme name or a mapping", TypeError),
    ],
)
def test_bad_config_names_the_key(cfg, match, exc):
    with pytest.raises(exc, match=match):
        initialize(manualbp.MLP(3, [2], 2), cfg)


def test_bad_model_type():
    with pytest.raises(TypeError, match="model must be a manualbp.MLP or an nn.Sequential"):
        initialize(nn.Linear(2, 2), "zeros")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_draws_the_float32_numbers_rounded(dtype):
    half = manualbp.MLP(12, [10], 4, dtype=dtype)
    full = manualbp.MLP(12, [10], 4, dtype=torch.float32)
    for name in SCHEMES:
        initialize(half, {"name": name, "bias": "torch_default"}, gen(2))
        initialize(full, {"name": name, "bias": "torch_default"}, gen(2))
        for a, b in zip(half.parameters(), full.parameters()):
            assert a.dtype == dtype and torch.equal(a, b.to(dtype))
