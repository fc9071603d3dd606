"""CUDA variants: run where a GPU is visible, skip otherwise (TF32 is off, see conftest)."""

from __future__ import annotations

import pytest
import torch
from helpers import native_loss, rel_err

import manualbp
from manualbp.nn import CrossEntropyLoss, MSELoss, SquaredErrorLoss

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
LOSSES = {"cross_entropy": CrossEntropyLoss, "mse": MSELoss, "squared_error": SquaredErrorLoss}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "leaky_relu", "identity"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_cuda_matches_native(dtype, tol, activation, loss):
    torch.manual_seed(0)
    model = manualbp.MLP(12, [32, 16], 5, activation=activation, dtype=dtype, device="cuda")
    native = model.to_torch()
    x = torch.randn(64, 12, dtype=dtype, device="cuda")
    y = (
        torch.randint(0, 5, (64,), device="cuda")
        if loss == "cross_entropy"
        else torch.randn(64, 5, dtype=dtype, device="cuda")
    )
    results = []
    for net, manual in ((model, True), (native, False)):
        xi = x.clone().requires_grad_(True)
        out = net(xi)
        value = LOSSES[loss]()(out, y) if manual else native_loss(loss, out, y, "mean")
        value.backward()
        results.append([value, out, xi.grad, *[p.grad for p in net.parameters()]])
    for a, b in zip(*results):
        assert a.device.type == "cuda"
        assert rel_err(a, b) <= tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_behaves_as_native(dtype):
    torch.manual_seed(0)
    model = manualbp.MLP(16, [32], 4, activation="relu", device="cuda")
    native = model.to_torch()
    x, y = torch.randn(64, 16, device="cuda"), torch.randint(0, 4, (64,), device="cuda")
    results = []
    for net, loss_fn in ((model, CrossEntropyLoss()), (native, torch.nn.CrossEntropyLoss())):
        with torch.autocast("cuda", dtype=dtype):
            out = net(x)
            loss = loss_fn(out, y)
        loss.backward()
        results.append((out, loss, [p.grad for p in net.parameters()]))
    (o1, l1, g1), (o2, l2, g2) = results
    assert o1.dtype == o2.dtype == dtype
    assert l1.dtype == l2.dtype == torch.float32
    for a, b in zip(g1, g2):
        assert a.dtype == b.dtype == torch.float32
        assert rel_err(a, b) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_parameters(dtype):
    torch.manual_seed(0)
    model = manualbp.MLP(16, [32], 4, activation="tanh", device="cuda", dtype=dtype)
    native = model.to_torch()
    x, y = torch.randn(64, 16, device="cuda", dtype=dtype), torch.randint(0, 4, (64,), device="cuda")
    CrossEntropyLoss()(model(x), y).backward()
    torch.nn.functional.cross_entropy(native(x), y).backward()
    for p, q in zip(model.parameters(), native.parameters()):
        assert p.grad.dtype == dtype
        assert rel_err(p.grad, q.grad) < 3e-2


def test_cuda_double_backward_and_vmap():
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    model = manualbp.MLP(5, [6], 3, activation="sigmoid", dtype=torch.float64, device="cuda")
    native = model.to_torch()
    x, y = torch.randn(7, 5, dtype=torch.float64, device="cuda"), torch.randint(0, 3, (7,), device="cuda")
    params = {k: v.detach() for k, v in model.named_parameters()}
    mine = vmap(grad(lambda p, a, b: CrossEntropyLoss()(functional_call(model, p, (a,)), b)), in_dims=(None, 0, 0))(
        params, x, y
    )
    ref = vmap(
        grad(lambda p, a, b: torch.nn.functional.cross_entropy(functional_call(native, p, (a,)), b)),
        in_dims=(None, 0, 0),
    )(params, x, y)
    for k in ref:
        assert rel_err(mine[k], ref[k]) <= 1e-12
    xi = x.clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: CrossEntropyLoss()(model(t), y), (xi,))


@pytest.mark.slow
def test_cuda_compile():
    torch.manual_seed(0)
    model = manualbp.MLP(6, [8], 3, activation="tanh", device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(10, 6, device="cuda")
    out = compiled(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for a, p in zip(grads, model.parameters()):
        assert rel_err(a, p.grad) <= 1e-5
