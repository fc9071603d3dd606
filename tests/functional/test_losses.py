"""Losses: equal to PyTorch's, the notes' 1/2 convention pinned, stable, and the chain rule shown."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from helpers import rel_err

from manualbp import functional as F
from manualbp.autograd import CrossEntropyOnProbabilitiesFunction, SoftmaxFunction
from manualbp.nn import CrossEntropyLoss, MSELoss, Softmax, SquaredErrorLoss

D = torch.float64
REDUCTIONS = ["mean", "sum", "none"]


def value_and_grads(loss_fn, o, y):
    o = o.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(y.is_floating_point())
    value = loss_fn(o, y)
    g = torch.randn(value.shape, dtype=value.dtype, generator=torch.Generator().manual_seed(7))  # generic dL/dL
    value.backward(g)
    return value.detach(), o.grad, y.grad


def assert_same(mine, ref, tol=1e-13):
    for a, b in zip(mine, ref):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) <= tol


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(5,), (8, 5), (2, 4, 5)])
def test_mse_equals_torch(reduction, shape):
    torch.manual_seed(0)
    o, y = torch.randn(*shape, dtype=D), torch.randn(*shape, dtype=D)
    assert_same(
        value_and_grads(MSELoss(reduction), o, y),
        value_and_grads(lambda a, b: TF.mse_loss(a, b, reduction=reduction), o, y),
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_squared_error_is_the_notes_half_convention(reduction):
    torch.manual_seed(0)
    n, k = 8, 5
    o, y = torch.randn(n, k, dtype=D), torch.randn(n, k, dtype=D)
    # the notes' formula written out with plain loops
    per_example = torch.tensor([0.5 * sum((o[i, j] - y[i, j]) ** 2 for j in range(k)) for i in range(n)], dtype=D)
    expected = {"mean": per_example.mean(), "sum": per_example.sum(), "none": per_example}[reduction]
    assert rel_err(SquaredErrorLoss(reduction)(o, y), expected) <= 1e-14
    # dL/do_k = o_k - y_k (times 1/N for the mean)
    o_req = o.clone().requires_grad_(True)
    SquaredErrorLoss(reduction)(o_req, y).sum().backward()
    assert rel_err(o_req.grad, (o - y) / (n if reduction == "mean" else 1)) <= 1e-14


def test_squared_error_vs_mse_factor_pinned():
    torch.manual_seed(0)
    o, y = torch.randn(8, 5, dtype=D), torch.randn(8, 5, dtype=D)
    assert torch.allclose(MSELoss("sum")(o, y), 2 * SquaredErrorLoss("sum")(o, y), rtol=1e-14)
    assert torch.allclose(MSELoss("mean")(o, y), 2 / 5 * SquaredErrorLoss("mean")(o, y), rtol=1e-14)
    assert torch.allclose(MSELoss("none")(o, y).sum(-1), 2 * SquaredErrorLoss("none")(o, y), rtol=1e-14)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_kind", ["indices", "one_hot", "soft", "unnormalized"])
def test_cross_entropy_equals_torch(reduction, target_kind):
    torch.manual_seed(0)
    o = torch.randn(7, 4, dtype=D) * 3
    idx = torch.randint(0, 4, (7,))
    y = {
        "indices": idx,
        "one_hot": TF.one_hot(idx, 4).to(D),
        "soft": torch.softmax(torch.randn(7, 4, dtype=D), -1),
        "unnormalized": torch.rand(7, 4, dtype=D),
    }[target_kind]
    mine = value_and_grads(CrossEntropyLoss(reduction), o, y)
    ref = value_and_grads(lambda a, b: TF.cross_entropy(a, b, reduction=reduction), o, y)
    assert_same(mine, ref, 1e-13)


def test_cross_entropy_unbatched_and_3d():
    torch.manual_seed(0)
    o1, y1 = torch.randn(4, dtype=D), torch.tensor(2)
    assert_same(value_and_grads(CrossEntropyLoss(), o1, y1), value_and_grads(TF.cross_entropy, o1, y1))
    o3, y3 = torch.randn(2, 3, 4, dtype=D), torch.randint(0, 4, (2, 3))
    ref = TF.cross_entropy(o3.reshape(-1, 4), y3.reshape(-1))
    assert rel_err(CrossEntropyLoss()(o3, y3), ref) <= 1e-14


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_stable_for_huge_logits(dtype):
    o = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4 - 1, 1e4]], dtype=dtype, requires_grad=True)
    y = torch.tensor([0, 1])
    loss = CrossEntropyLoss("none")(o, y)
    assert torch.isfinite(loss).all()
    assert torch.allclose(loss, TF.cross_entropy(o.detach(), y, reduction="none"))
    loss.sum().backward()
    assert torch.isfinite(o.grad).all()
    assert torch.allclose(o.grad, torch.softmax(o.detach(), -1) - TF.one_hot(y, 3).to(dtype), atol=1e-6)


def test_chain_rule_unfused_equals_fused():
    """softmax then the notes' -sum y log yhat, each with its own backward, gives softmax(o) - y."""
    torch.manual_seed(0)
    o = torch.randn(6, 5, dtype=D)
    y = torch.randint(0, 5, (6,))
    o1 = o.clone().requires_grad_(True)
    unfused = CrossEntropyOnProbabilitiesFunction.apply(SoftmaxFunction.apply(o1), y, "mean")
    unfused.backward()
    o2 = o.clone().requires_grad_(True)
    fused = CrossEntropyLoss()(o2, y)
    fused.backward()
    assert rel_err(unfused, fused) <= 1e-14
    assert rel_err(o1.grad, o2.grad) <= 1e-13
    assert rel_err(o2.grad, (torch.softmax(o, -1) - TF.one_hot(y, 5).to(D)) / 6) <= 1e-14
    assert rel_err(Softmax()(o), torch.softmax(o, -1)) <= 1e-15


def test_cross_entropy_gradient_rows_sum_to_zero():
    torch.manual_seed(0)
    o = torch.randn(9, 6, dtype=D, requires_grad=True)
    CrossEntropyLoss("sum")(o, torch.randint(0, 6, (9,))).backward()
    assert o.grad.sum(-1).abs().max() < 1e-14
    assert o.grad.abs().min() > 0  # not trivially zero


@pytest.mark.parametrize("loss_cls", [SquaredErrorLoss, MSELoss])
def test_regression_gradient_zero_at_target(loss_cls):
    y = torch.randn(5, 3, dtype=D)
    o = y.clone().requires_grad_(True)
    loss = loss_cls()(o, y)
    loss.backward()
    assert loss.item() == 0 and o.grad.abs().max().item() == 0
    o2 = (y + 0.1).requires_grad_(True)
    loss_cls()(o2, y).backward()
    assert o2.grad.abs().min() > 0


@pytest.mark.parametrize("reduction", ["none"])
@pytest.mark.parametrize("loss_cls", [SquaredErrorLoss, MSELoss, CrossEntropyLoss])
def test_backward_is_linear_in_grad_output(loss_cls, reduction):
    torch.manual_seed(0)
    o = torch.randn(6, 4, dtype=D, requires_grad=True)
    y = torch.randint(0, 4, (6,)) if loss_cls is CrossEntropyLoss else torch.randn(6, 4, dtype=D)
    value = loss_cls(reduction)(o, y)
    g1, g2 = torch.randn_like(value), torch.randn_like(value)
    (d1,) = torch.autograd.grad(value, o, g1, retain_graph=True)
    (d2,) = torch.autograd.grad(value, o, g2, retain_graph=True)
    (d12,) = torch.autograd.grad(value, o, 2.5 * g1 - 0.5 * g2)
    assert rel_err(d12, 2.5 * d1 - 0.5 * d2) <= 1e-13


def test_mlp_backward_is_linear_in_grad_output():
    import manualbp

    torch.manual_seed(0)
    model = manualbp.MLP(5, [7, 6], 3, activation="tanh", dtype=D)
    x = torch.randn(4, 5, dtype=D, requires_grad=True)
    out = model(x)
    params = [x, *model.parameters()]
    g1, g2 = torch.randn_like(out), torch.randn_like(out)
    d1 = torch.autograd.grad(out, params, g1, retain_graph=True)
    d2 = torch.autograd.grad(out, params, g2, retain_graph=True)
    d12 = torch.autograd.grad(out, params, 3 * g1 + g2)
    for a, b, c in zip(d1, d2, d12):
        assert rel_err(c, 3 * a + b) <= 1e-13


def test_functional_formulas_match_the_notes_elementwise():
    """mlp_backward's intermediates equal the notes' scalar formulas, written out index by index."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, dtype=D)
    w1, b1 = torch.randn(4, 3, dtype=D), torch.randn(4, dtype=D)
    w2, b2 = torch.randn(2, 4, dtype=D), torch.randn(2, dtype=D)
    y = torch.randn(1, 2, dtype=D)
    fwd = F.mlp_forward(x, [w1, w2], [b1, b2], [("sigmoid", 0.0)], return_pre_activations=True)
    o, (a,), (z,) = fwd.output[0], fwd.hidden, fwd.pre_activations
    grads = F.mlp_backward(o[None] - y, x, [w1, w2], [a], [("sigmoid", 0.0)], return_intermediates=True)
    a, z, xs = a[0], z[0], x[0]
    dl_do = [o[k] - y[0, k] for k in range(2)]  # dL/do_k = o_k - y_k
    for k in range(2):
        for i in range(4):
            assert abs(grads.grad_weights[1][k, i] - dl_do[k] * a[i]) < 1e-15  # dL/dw2_ki = dL/do_k a_i
        assert abs(grads.grad_biases[1][k] - dl_do[k]) < 1e-15  # dL/db2_k = dL/do_k
    for i in range(4):
        dl_da = sum(dl_do[k] * w2[k, i] for k in range(2))  # dL/da_i = sum_k dL/do_k w2_ki
        assert abs(grads.grad_hidden[0][0, i] - dl_da) < 1e-15
        sig = torch.sigmoid(z[i])
        dl_dz = dl_da * sig * (1 - sig)  # dL/dz_i = dL/da_i sigma'(z_i)
        assert abs(grads.grad_pre_activations[0][0, i] - dl_dz) < 1e-14
        for j in range(3):
            assert abs(grads.grad_weights[0][i, j] - dl_dz * xs[j]) < 1e-14  # dL/dw1_ij = dL/dz_i x_j
        assert abs(grads.grad_biases[0][i] - dl_dz) < 1e-14  # dL/db1_i = dL/dz_i


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(7, 4), (2, 3, 4), (4,)])
def test_cross_entropy_reused_log_probs_equal_recomputed(reduction, shape):
    """The backward reuses the forward's log yhat when it builds no graph, and recomputes it from the saved
    input when it does (double backward): both give the same bits, equal to torch's cross_entropy."""
    torch.manual_seed(0)
    o = torch.randn(*shape)
    y = torch.randint(0, 4, shape[:-1]).int()
    grads = []
    for create_graph in (False, True):
        oi = o.clone().requires_grad_(True)
        loss = CrossEntropyLoss(reduction)(oi, y)
        assert not hasattr(loss, "_manualbp_cross_entropy")  # handed from forward to setup_context, not kept
        grads.append(torch.autograd.grad(loss.sum(), oi, create_graph=create_graph)[0])
    assert torch.equal(grads[0], grads[1].detach())
    ref_o = o.reshape(-1, 4).clone().requires_grad_(True)
    ref = TF.cross_entropy(ref_o, y.reshape(-1).long(), reduction=reduction)
    ref.sum().backward()
    assert torch.equal(grads[0], ref_o.grad.reshape(shape))


def test_cross_entropy_in_place_change_of_logits_still_detected():
    o = torch.randn(5, 3, requires_grad=True)
    logits = o * 2
    loss = CrossEntropyLoss()(logits, torch.tensor([0, 1, 2, 1, 0]))
    logits.add_(1.0)  # the backward would read stale logits: autograd's version check must still fire
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_cross_entropy_backward_twice_with_retain_graph():
    o = torch.randn(5, 3, requires_grad=True)
    loss = CrossEntropyLoss("sum")(o, torch.tensor([0, 1, 2, 1, 0]))
    loss.backward(retain_graph=True)
    first = o.grad.clone()
    loss.backward()
    assert torch.equal(o.grad, 2 * first)


def test_cross_entropy_vmap_over_targets_only():
    """torch.func with only the targets batched (logits shared): the forward sees a plain input tensor."""
    from torch.func import grad, vmap

    torch.manual_seed(0)
    o, targets = torch.randn(4, 3, dtype=D), torch.randint(0, 3, (5, 4))
    loss = CrossEntropyLoss()
    values = vmap(loss, in_dims=(None, 0))(o, targets)
    grads = vmap(grad(loss), in_dims=(None, 0))(o, targets)
    for k, t in enumerate(targets):
        assert rel_err(values[k], TF.cross_entropy(o, t)) <= 1e-14
        assert rel_err(grads[k], grad(TF.cross_entropy)(o, t)) <= 1e-14


def test_cross_entropy_saves_what_its_backward_reuses_through_saved_tensor_hooks():
    # the forward's log yhat is saved like any saved tensor: offloading / checkpointing hooks see it
    logits = torch.randn(6, 4, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = CrossEntropyLoss()(logits, target)
    assert (6, 4) in shapes and shapes.count((6, 4)) == 2  # the logits and log yhat
    loss.backward()
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, target), logits)[0]
    torch.testing.assert_close(logits.grad, expected)
