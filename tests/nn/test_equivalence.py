"""The manual MLP equals native autograd on an nn.Sequential holding the same weights."""

from __future__ import annotations

import pytest
import torch
from helpers import native_loss, rel_err
from hypothesis import given
from hypothesis import strategies as st

import manualbp
from manualbp.nn import CrossEntropyLoss, MSELoss, SquaredErrorLoss

LOSSES = {"cross_entropy": CrossEntropyLoss, "mse": MSELoss, "squared_error": SquaredErrorLoss}
ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu", "identity"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_target(loss: str, shape: tuple, n_out: int, dtype: torch.dtype, soft: bool, gen: torch.Generator):
    if loss == "cross_entropy":
        if soft:
            return torch.softmax(torch.randn(*shape, n_out, generator=gen, dtype=dtype), -1)
        return torch.randint(0, n_out, shape, generator=gen)
    return torch.randn(*shape, n_out, generator=gen, dtype=dtype)


def run_both(model, loss: str, reduction: str, x: torch.Tensor, target: torch.Tensor):
    """Forward + backward through the manual model and its native twin; returns the quantities to compare."""
    native = model.to_torch()
    results = []
    for net, manual in ((model, True), (native, False)):
        xi = x.detach().clone().requires_grad_(True)
        out = net(xi)
        loss_value = LOSSES[loss](reduction)(out, target) if manual else native_loss(loss, out, target, reduction)
        (loss_value.sum() if reduction == "none" else loss_value).backward()
        results.append(
            {
                "loss": loss_value.detach(),
                "output": out.detach(),
                "input.grad": xi.grad,
                **{f"{n}.grad": p.grad for n, p in net.named_parameters()},
            }
        )
    return results


@given(
    depth=st.integers(0, 4),
    widths=st.lists(st.integers(1, 9), min_size=6, max_size=6),
    batch=st.integers(1, 12),
    activation=st.lists(st.sampled_from(ACTIVATIONS), min_size=4, max_size=4),
    loss=st.sampled_from(sorted(LOSSES)),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    bias=st.booleans(),
    soft=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_mlp_matches_native_autograd(depth, widths, batch, activation, loss, reduction, dtype, bias, soft, seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    in_f, *hidden, out_f = widths[: depth + 2]
    out_f = max(out_f, 2)
    model = manualbp.MLP(in_f, hidden, out_f, activation=activation[:depth], bias=bias, dtype=dtype)
    x = torch.randn(batch, in_f, generator=gen, dtype=dtype)
    target = make_target(loss, (batch,), out_f, dtype, soft, gen)
    mine, ref = run_both(model, loss, reduction, x, target)
    assert mine.keys() == ref.keys()
    for key in ref:
        assert mine[key].shape == ref[key].shape, key
        assert mine[key].dtype == ref[key].dtype, key
        assert rel_err(mine[key], ref[key]) <= TOL[dtype], (key, rel_err(mine[key], ref[key]))


@pytest.mark.parametrize("shape", [(7,), (3, 7), (2, 3, 7)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_input_of_any_leading_shape(shape, loss):
    torch.manual_seed(0)
    model = manualbp.MLP(7, [5, 4], 3, activation="tanh", dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64)
    target = make_target(loss, shape[:-1], 3, torch.float64, False, torch.Generator().manual_seed(1))
    mine, ref = run_both(model, loss, "mean", x, target)
    assert mine["output"].shape == (*shape[:-1], 3)
    for key in ref:
        assert rel_err(mine[key], ref[key]) <= 1e-12, key


def test_non_contiguous_input_and_grad_output():
    torch.manual_seed(0)
    model = manualbp.MLP(6, [5], 4, activation="sigmoid", dtype=torch.float64)
    native = model.to_torch()
    base = torch.randn(6, 10, dtype=torch.float64)
    x = base.T[::2]  # (5, 6), neither contiguous nor dense
    assert not x.is_contiguous()
    grad_out = torch.randn(4, 5, dtype=torch.float64).T  # non-contiguous dL/do
    grads = []
    for net in (model, native):
        xi = x.detach().requires_grad_(True)
        net.zero_grad()
        net(xi).backward(grad_out)
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    for a, b in zip(*grads):
        assert rel_err(a, b) <= 1e-12


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bfloat16_close_to_native(activation):
    torch.manual_seed(0)
    model = manualbp.MLP(8, [16], 4, activation=activation, dtype=torch.bfloat16)
    native = model.to_torch()
    x = torch.randn(32, 8, dtype=torch.bfloat16)
    y = torch.randint(0, 4, (32,))
    CrossEntropyLoss()(model(x), y).backward()
    torch.nn.functional.cross_entropy(native(x), y).backward()
    for p, q in zip(model.parameters(), native.parameters()):
        assert p.grad.dtype == torch.bfloat16
        assert rel_err(p.grad, q.grad) < 5e-2


def test_single_layer_linear_units():
    """manualbp.Linear alone equals nn.Linear in value and every gradient."""
    torch.manual_seed(0)
    lin = manualbp.Linear(5, 3, dtype=torch.float64)
    ref = torch.nn.Linear(5, 3, dtype=torch.float64)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    g = torch.randn(4, 2, 3, dtype=torch.float64)
    outs = []
    for m in (lin, ref):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        out.backward(g)
        outs.append((out, xi.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*outs):
        assert rel_err(a, b) <= 1e-14


def test_training_with_torch_optim_tracks_native():
    """A few SGD-with-momentum steps through torch.optim keep manual and native weights together."""
    torch.manual_seed(0)
    model = manualbp.MLP(10, [16, 16], 3, activation="relu", dtype=torch.float64)
    native = model.to_torch()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, native)]
    x, y = torch.randn(64, 10, dtype=torch.float64), torch.randint(0, 3, (64,))
    initial = torch.nn.functional.cross_entropy(native(x), y).item()
    for _ in range(50):
        for m, opt, lf in zip((model, native), opts, (CrossEntropyLoss(), torch.nn.CrossEntropyLoss())):
            opt.zero_grad()
            lf(m(x), y).backward()
            opt.step()
    for p, q in zip(model.parameters(), native.parameters()):
        assert rel_err(p, q) <= 1e-10
    assert torch.nn.functional.cross_entropy(model(x), y).item() < 0.8 * initial


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("frozen", [(), (0,), (1,), (2,), (0, 1), (0, 1, 2), "biases"])
def test_frozen_parameters_and_input_grad_match_native(frozen, input_grad, bias):
    """MLPFunction saves and computes only what is needed: every pattern of requires_grad, against native."""
    if frozen == "biases" and not bias:
        pytest.skip("no biases to freeze")
    torch.manual_seed(0)
    model = manualbp.MLP(5, [6, 4], 3, activation=["tanh", "sigmoid"], bias=bias, dtype=torch.float64)
    native = model.to_torch()
    for net in (model, native):
        lins = [m for m in net.modules() if isinstance(m, (torch.nn.Linear, manualbp.Linear))]
        for k, lin in enumerate(lins):
            if frozen == "biases":
                lin.bias.requires_grad_(False)
            elif k in frozen:
                lin.weight.requires_grad_(False)
                if bias:
                    lin.bias.requires_grad_(False)
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    grads = []
    for net, loss_fn in ((model, CrossEntropyLoss()), (native, torch.nn.CrossEntropyLoss())):
        xi = x.clone().requires_grad_(input_grad)
        out = loss_fn(net(xi), y)
        if not out.requires_grad:  # everything frozen and no input gradient: nothing to differentiate
            grads.append([])
            continue
        out.backward()
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    assert len(grads[0]) == len(grads[1])
    for mine, ref in zip(*grads):
        assert (mine is None) == (ref is None)
        if ref is not None:
            torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)
