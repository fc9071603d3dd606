"""Composition with PyTorch: double backward, torch.func, autocast, torch.compile, saved memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from helpers import rel_err
from torch.func import functional_call, grad, vmap

import manualbp
from manualbp.nn import CrossEntropyLoss, MSELoss

D = torch.float64
ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu", "identity"]


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "leaky_relu"])
def test_double_backward_matches_native(activation):
    """Hessian-vector products (create_graph=True through the manual backward) equal native ones."""
    torch.manual_seed(0)
    model = manualbp.MLP(4, [6, 5], 3, activation=activation, dtype=D)
    native = model.to_torch()
    x, y = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    vs = [torch.randn_like(p) for p in model.parameters()]
    hvps = []
    for net, loss_fn in ((model, CrossEntropyLoss()), (native, torch.nn.CrossEntropyLoss())):
        params = list(net.parameters())
        grads = torch.autograd.grad(loss_fn(net(x), y), params, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vs))
        hvps.append(torch.autograd.grad(dot, params))
    for a, b in zip(*hvps):
        assert rel_err(a, b) <= 1e-10
    assert max(h.abs().max() for h in hvps[0]) > 1e-6  # the second derivative is not trivially zero


def test_gradgradcheck_through_module_and_loss():
    torch.manual_seed(0)
    model = manualbp.MLP(3, [4], 2, activation="tanh", dtype=D)
    y = torch.randn(5, 2, dtype=D)
    x = torch.randn(5, 3, dtype=D, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: MSELoss()(model(t), y), (x,))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_per_sample_gradients_with_vmap(activation):
    torch.manual_seed(0)
    model = manualbp.MLP(5, [6], 3, activation=activation, dtype=D)
    native = model.to_torch()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(9, 5, dtype=D), torch.randint(0, 3, (9,))

    def manual_loss(p, xi, yi):
        return CrossEntropyLoss()(functional_call(model, p, (xi,)), yi)

    def native_loss(p, xi, yi):
        return TF.cross_entropy(functional_call(native, p, (xi,)), yi)

    mine = vmap(grad(manual_loss), in_dims=(None, 0, 0))(params, x, y)
    ref = vmap(grad(native_loss), in_dims=(None, 0, 0))(params, x, y)
    for k in ref:
        assert mine[k].shape == (9, *params[k].shape)
        assert rel_err(mine[k], ref[k]) <= 1e-12
    # per-sample gradients differ between samples (the test would notice a broadcast bug)
    assert (mine["0.weight"][0] - mine["0.weight"][1]).abs().max() > 0


@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_autocast_cpu_bfloat16_behaves_as_native(activation):
    torch.manual_seed(0)
    model = manualbp.MLP(8, [16], 4, activation=activation)
    native = model.to_torch()
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    results = []
    for net, loss_fn in ((model, CrossEntropyLoss()), (native, torch.nn.CrossEntropyLoss())):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
            loss = loss_fn(out, y)
        loss.backward()
        results.append((out, loss, [p.grad for p in net.parameters()]))
    (o1, l1, g1), (o2, l2, g2) = results
    assert o1.dtype == o2.dtype == torch.bfloat16
    assert l1.dtype == l2.dtype == torch.float32
    assert rel_err(o1, o2) < 2e-2 and rel_err(l1, l2) < 2e-2
    for a, b in zip(g1, g2):
        assert a.dtype == b.dtype == torch.float32
        assert rel_err(a, b) < 5e-2


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_saved_tensor_bytes_not_above_native(activation):
    """Bytes saved for backward (unique storages) are no more than native autograd saves."""
    torch.manual_seed(0)
    model = manualbp.MLP(32, [64, 64], 10, activation=activation)
    native = model.to_torch()
    x = torch.randn(128, 32)

    def saved_bytes(net):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(x)
        out.sum().backward()
        return sum(storages.values())

    mine, ref = saved_bytes(model), saved_bytes(native)
    assert 0 < mine <= ref, (mine, ref)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = manualbp.MLP(6, [8, 8], 3, activation="tanh", dtype=D)
    compiled = torch.compile(model, fullgraph=True)
    x, y = torch.randn(10, 6, dtype=D), torch.randint(0, 3, (10,))
    grads = []
    for net in (compiled, model):
        model.zero_grad()
        xi = x.clone().requires_grad_(True)
        CrossEntropyLoss()(net(xi), y).backward()
        grads.append([xi.grad] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert rel_err(a, b) <= 1e-12


# --------------------------------------------------------------------------------------------------
# torch.compile of a whole training step, loss included, for every loss (issue 19, item 5)
# --------------------------------------------------------------------------------------------------
def _native_squared_error(output, target, reduction):
    per_example = 0.5 * ((output - target) ** 2).sum(-1)  # the notes' 1/2 sum_k (o_k - y_k)^2
    return per_example.mean() if reduction == "mean" else per_example.sum()


#: loss name -> (manualbp loss class, native loss function, target maker)
COMPILE_LOSSES = {
    "cross_entropy_indices": (
        manualbp.CrossEntropyLoss,
        lambda o, y, r: TF.cross_entropy(o, y, reduction=r),
        lambda n, k: torch.randint(0, k, (n,)),
    ),
    "cross_entropy_probabilities": (
        manualbp.CrossEntropyLoss,
        lambda o, y, r: TF.cross_entropy(o, y, reduction=r),
        lambda n, k: torch.randn(n, k, dtype=D).softmax(-1),
    ),
    "mse": (manualbp.MSELoss, lambda o, y, r: TF.mse_loss(o, y, reduction=r), lambda n, k: torch.randn(n, k, dtype=D)),
    "squared_error": (manualbp.SquaredErrorLoss, _native_squared_error, lambda n, k: torch.randn(n, k, dtype=D)),
}


def _compiled_step_matches_native(loss_name, reduction, backend, fullgraph=True):
    """compile(loss_fn(model(x), y)), then backward: loss and every gradient equal nn.Sequential's eager step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    loss_cls, native_loss, make_target = COMPILE_LOSSES[loss_name]
    model = manualbp.MLP(6, [8, 5], 3, activation="tanh", dtype=D)
    native = model.to_torch()
    loss_fn = loss_cls(reduction=reduction)
    x, y = torch.randn(10, 6, dtype=D), make_target(10, 3)

    @torch.compile(backend=backend, fullgraph=fullgraph)
    def step(x, y):
        return loss_fn(model(x), y)

    loss = step(x, y)
    loss.backward()
    ref = native_loss(native(x), y, reduction)
    ref.backward()
    assert rel_err(loss, ref) <= 1e-12
    for (name, p), q in zip(model.named_parameters(), native.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-12, name
        assert p.grad.abs().max() > 0, name


@pytest.mark.parametrize("loss_name", list(COMPILE_LOSSES))
def test_torch_compile_of_loss_eager_backend(loss_name):
    """Dynamo traces the whole step, loss included (the quick backend; fails where dynamo cannot trace a loss)."""
    _compiled_step_matches_native(loss_name, "mean", backend="eager")


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", list(COMPILE_LOSSES))
@pytest.mark.parametrize(("backend", "reduction"), [("aot_eager", "mean"), ("aot_eager", "sum"), ("inductor", "mean")])
def test_torch_compile_of_loss_matches_native(loss_name, reduction, backend):
    _compiled_step_matches_native(loss_name, reduction, backend)


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", list(COMPILE_LOSSES))
def test_torch_compile_of_training_step_with_sgd(loss_name):
    """Forward, backward and an SGD step in one compiled function (graph breaks allowed at backward):
    three steps of it end with the parameters of three native steps."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    loss_cls, native_loss, make_target = COMPILE_LOSSES[loss_name]
    model = manualbp.MLP(6, [8], 3, activation="sigmoid", dtype=D)
    native = model.to_torch()
    x, y = torch.randn(10, 6, dtype=D), make_target(10, 3)
    loss_fn = loss_cls()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    native_opt = torch.optim.SGD(native.parameters(), lr=0.5, momentum=0.9)

    @torch.compile(backend="aot_eager")
    def step(x, y):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        loss = step(x, y)
        native_opt.zero_grad()
        ref = native_loss(native(x), y, "mean")
        ref.backward()
        native_opt.step()
        assert rel_err(loss, ref) <= 1e-10
    for (name, p), q in zip(model.named_parameters(), native.parameters()):
        assert rel_err(p, q) <= 1e-10, name
