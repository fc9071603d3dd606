"""The drop-in contract: state_dict interop with nn.Sequential, to_torch/from_torch, parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import manualbp
from manualbp.nn import LeakyReLU


def test_state_dict_keys_and_shapes_equal_sequential():
    model = manualbp.MLP(64, [32, 16], 10, activation=["relu", "tanh"])
    seq = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 10))
    mine, ref = model.state_dict(), seq.state_dict()
    assert list(mine) == list(ref) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert all(mine[k].shape == ref[k].shape for k in ref)


def test_weights_load_both_ways_strict():
    torch.manual_seed(0)
    model = manualbp.MLP(5, [4], 3)
    seq = nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3))
    model.load_state_dict(seq.state_dict(), strict=True)
    x = torch.randn(6, 5)
    assert torch.equal(model(x), seq(x))
    seq2 = nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3))
    seq2.load_state_dict(manualbp.MLP(5, [4], 3).state_dict(), strict=True)


@pytest.mark.parametrize("bias", [True, False])
def test_to_torch_and_from_torch_round_trip(bias):
    torch.manual_seed(0)
    model = manualbp.MLP(
        5, [4, 6], 3, activation=["leaky_relu", "identity"], bias=bias, negative_slope=0.2, dtype=torch.float64
    )
    seq = model.to_torch()
    assert isinstance(seq[1], nn.LeakyReLU) and seq[1].negative_slope == 0.2
    assert isinstance(seq[3], nn.Identity)
    x = torch.randn(7, 5, dtype=torch.float64)
    assert torch.allclose(seq(x), model(x), rtol=1e-14, atol=1e-14)
    back = manualbp.MLP.from_torch(seq)
    assert back.activation_specs == model.activation_specs
    assert back.bias == bias
    assert torch.equal(back(x), model(x))
    # a copy, not shared storage
    with torch.no_grad():
        seq[0].weight.add_(1)
    assert not torch.equal(back[0].weight if hasattr(back, "__getitem__") else back.linears[0].weight, seq[0].weight)


def test_from_torch_per_layer_slopes():
    seq = nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(0.1), nn.Linear(4, 4), nn.LeakyReLU(0.3), nn.Linear(4, 2))
    model = manualbp.MLP.from_torch(seq)
    assert model.activation_specs == (("leaky_relu", 0.1), ("leaky_relu", 0.3))
    x = torch.randn(5, 3)
    assert torch.allclose(model(x), seq(x))


@pytest.mark.parametrize(
    "seq, message",
    [
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU()), "odd number"),
        (nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)), r"sequential\[1\].*GELU"),
        (nn.Sequential(nn.Conv1d(3, 4, 1), nn.ReLU(), nn.Linear(4, 2)), r"sequential\[0\].*Conv1d"),
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(5, 2)), r"in_features=5.*out_features=4"),
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False)), "bias"),
        (nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(-0.5), nn.Linear(4, 2)), "negative_slope"),
    ],
    ids=["even", "gelu", "conv", "dims", "mixed-bias", "negative-slope"],
)
def test_from_torch_rejects_what_it_cannot_represent(seq, message):
    with pytest.raises(ValueError, match=message):
        manualbp.MLP.from_torch(seq)


def test_from_torch_rejects_non_sequential():
    with pytest.raises(TypeError, match="nn.Sequential"):
        manualbp.MLP.from_torch(nn.Linear(3, 4))


def test_zero_hidden_layers_is_a_linear_model():
    model = manualbp.MLP(4, [], 3)
    assert list(model.state_dict()) == ["0.weight", "0.bias"]
    seq = model.to_torch()
    assert len(seq) == 1
    x = torch.randn(2, 4)
    assert torch.allclose(model(x), seq(x))


def test_default_init_matches_nn_linear_bounds():
    torch.manual_seed(0)
    model = manualbp.MLP(100, [50], 10)
    lin = model.linears[0]
    bound = 1 / 100**0.5
    assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
    assert lin.bias.abs().max() <= bound
    torch.manual_seed(0)
    ref = nn.Linear(100, 50)
    torch.manual_seed(0)
    mine = manualbp.Linear(100, 50)
    assert torch.equal(ref.weight, mine.weight) and torch.equal(ref.bias, mine.bias)


def test_repr_and_properties():
    model = manualbp.MLP(8, 16, 2, activation="leaky_relu", negative_slope=0.05)
    assert model.hidden_features == [16]
    assert "hidden_features=[16]" in repr(model) and "negative_slope=0.05" in repr(model)
    assert isinstance(model.activations[0], LeakyReLU)
    assert len(model.flat_parameters()) == 4


def test_module_moves_with_to_and_trains_with_adam():
    torch.manual_seed(0)
    model = manualbp.MLP(4, [8], 2, activation="tanh").to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = torch.randn(32, 4, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    first = None
    for _ in range(50):
        opt.zero_grad()
        loss = manualbp.CrossEntropyLoss()(model(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_empty_batch_gives_empty_output_and_zero_gradients():
    model = manualbp.MLP(4, [3], 2)
    out = model(torch.randn(0, 4))
    assert out.shape == (0, 2)
    manualbp.CrossEntropyLoss("sum")(out, torch.zeros(0, dtype=torch.long)).backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
