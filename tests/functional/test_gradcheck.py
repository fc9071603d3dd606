"""Float64 finite differences: gradcheck and gradgradcheck for every op and for MLPFunction."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from manualbp import autograd as A

D = torch.float64


def rand(*shape, requires_grad=True, gen=None):
    return torch.randn(*shape, dtype=D, generator=gen).requires_grad_(requires_grad)


def check(fn, inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-5)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias):
    torch.manual_seed(0)
    b = rand(3) if bias else None
    check(
        lambda x, w, *b: A.LinearFunction.apply(x, w, b[0] if b else None),
        (rand(4, 5), rand(3, 5), *([b] if bias else [])),
    )


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "relu", "leaky_relu", "identity"])
def test_activation(name):
    torch.manual_seed(0)
    x = rand(4, 6)
    with torch.no_grad():  # keep away from relu's kink, where finite differences are meaningless
        x += 0.2 * torch.sign(x)
    fn = A.ACTIVATION_FUNCTIONS[name]
    args = (0.1,) if name == "leaky_relu" else ()
    check(lambda t: fn.apply(t, *args), (x,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fn", [A.SquaredErrorLossFunction, A.MSELossFunction], ids=["squared_error", "mse"])
def test_regression_losses(fn, reduction):
    torch.manual_seed(0)
    check(lambda o, y: fn.apply(o, y, reduction), (rand(4, 3), rand(4, 3)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_class_indices(reduction):
    torch.manual_seed(0)
    y = torch.randint(0, 5, (6,))
    check(lambda o: A.CrossEntropyFunction.apply(o, y, reduction), (rand(6, 5),))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_probabilities(reduction):
    torch.manual_seed(0)
    y = torch.softmax(torch.randn(6, 5, dtype=D), -1).requires_grad_(True)
    check(lambda o, t: A.CrossEntropyFunction.apply(o, t, reduction), (rand(6, 5), y))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_unnormalized_probabilities_and_3d_indices(reduction):
    """Soft targets whose rows do not sum to 1 (dL/do = yhat sum_j y_j - y), and (*, C) logits with (*) indices."""
    torch.manual_seed(0)
    y = (2 * torch.rand(6, 5, dtype=D)).requires_grad_(True)
    check(lambda o, t: A.CrossEntropyFunction.apply(o, t, reduction), (rand(6, 5), y))
    idx = torch.randint(0, 5, (2, 3))
    check(lambda o: A.CrossEntropyFunction.apply(o, idx, reduction), (rand(2, 3, 5),))


def test_softmax_and_cross_entropy_on_probabilities():
    torch.manual_seed(0)
    check(A.SoftmaxFunction.apply, (rand(4, 5),))
    p = torch.softmax(torch.randn(4, 5, dtype=D), -1).requires_grad_(True)
    y = torch.softmax(torch.randn(4, 5, dtype=D), -1).requires_grad_(True)
    check(lambda a, b: A.CrossEntropyOnProbabilitiesFunction.apply(a, b, "mean"), (p, y))


@pytest.mark.parametrize(
    "specs",
    [
        (),
        (("sigmoid", 0.0),),
        (("tanh", 0.0), ("sigmoid", 0.0)),
        (("relu", 0.0), ("leaky_relu", 0.1), ("identity", 0.0)),
    ],
    ids=["linear", "sigmoid", "tanh-sigmoid", "relu-leaky-identity"],
)
@pytest.mark.parametrize("bias", [True, False])
def test_mlp_function(specs, bias):
    torch.manual_seed(0)
    widths = [4] + [5] * len(specs) + [3]
    params = []
    for i in range(len(widths) - 1):
        params.append(rand(widths[i + 1], widths[i]))
        if bias:
            params.append(rand(widths[i + 1]))
    x = rand(6, 4)

    def output_only(x, *p):
        return A.MLPFunction.apply(x, specs, bias, *p)[0]

    def with_hidden(x, *p):  # gradients arriving at the hidden outputs too
        out = A.MLPFunction.apply(x, specs, bias, *p)
        return tuple(out)

    check(output_only, (x, *params))
    check(with_hidden, (x, *params))


# The activations' backward runs one fused ATen kernel each; pin every kernel to the plain formula of the
# notes (values, and the derivatives that double backward takes through it), on outputs a of the right range.
PLAIN_ACTIVATION_BACKWARD = {
    "sigmoid": (lambda g, a: g * a * (1 - a), lambda z: torch.sigmoid(z)),
    "tanh": (lambda g, a: g * (1 - a * a), lambda z: torch.tanh(z)),
    "relu": (lambda g, a: g * (a > 0).to(g.dtype), lambda z: torch.relu(z)),
    "leaky_relu": (lambda g, a: torch.where(a > 0, g, g * 0.1), lambda z: torch.where(z > 0, z, 0.1 * z)),
    "identity": (lambda g, a: g, lambda z: z),
}


@pytest.mark.parametrize("name", sorted(PLAIN_ACTIVATION_BACKWARD))
def test_activation_backward_kernel_is_the_plain_formula(name):
    from manualbp import functional as F

    torch.manual_seed(0)
    plain, forward = PLAIN_ACTIVATION_BACKWARD[name]
    z = torch.randn(7, 9, dtype=D)
    z[0, :3] = 0.0  # relu's and leaky_relu's a = 0 edge: both sides give the [a <= 0] branch
    a = forward(z).requires_grad_(True)
    g = rand(7, 9)
    slope = (0.1,) if name == "leaky_relu" else ()
    mine = F.activation_backward(name, g, a, *slope)
    ref = plain(g, a)
    torch.testing.assert_close(mine, ref, rtol=1e-15, atol=1e-15)
    assert torch.equal(F.activation(name, z, *slope), forward(z))
    # first-order derivatives of dL/dz with respect to dL/da and to a: what double backward uses
    v = torch.randn(7, 9, dtype=D)
    d_mine = torch.autograd.grad(mine, (g, a), v, allow_unused=True, materialize_grads=True)
    d_ref = torch.autograd.grad(ref, (g, a), v, allow_unused=True, materialize_grads=True)
    for x, y in zip(d_mine, d_ref):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_kind", ["indices", "probabilities"])
def test_cross_entropy_backward_kernels_are_the_plain_formula(reduction, target_kind):
    """cross_entropy_backward runs ATen's nll_loss_backward and _log_softmax_backward_data; pin them to the
    plain dL/do = scale (yhat sum_j y_j - y) (values, and the first derivatives double backward takes)."""
    from manualbp import functional as F

    torch.manual_seed(0)
    o = rand(6, 5)
    idx = torch.randint(0, 5, (6,))
    idx[0] = 4  # the last class too
    y = torch.nn.functional.one_hot(idx, 5).to(D) if target_kind == "indices" else 2 * torch.rand(6, 5, dtype=D)
    target = idx if target_kind == "indices" else y
    g = rand(6) if reduction == "none" else rand(())
    scale = {"mean": g / 6, "sum": g, "none": g.unsqueeze(-1)}[reduction]
    ref = scale * (torch.softmax(o, -1) * y.sum(-1, keepdim=True) - y)
    mine, grad_target = F.cross_entropy_backward(g, o, target, reduction)
    torch.testing.assert_close(mine, ref, rtol=1e-14, atol=1e-15)
    if target_kind == "probabilities":
        torch.testing.assert_close(grad_target, -scale * torch.log_softmax(o, -1), rtol=1e-14, atol=1e-15)
    else:
        assert grad_target is None
    v = torch.randn(6, 5, dtype=D)
    d_mine = torch.autograd.grad(mine, (g, o), v)
    d_ref = torch.autograd.grad(ref, (g, o), v)
    for x, r in zip(d_mine, d_ref):
        torch.testing.assert_close(x, r, rtol=1e-13, atol=1e-14)
    # a plain number as dL_total/dL (the vectorized trainer's base case) gives the same
    if reduction != "none":
        torch.testing.assert_close(
            F.cross_entropy_backward(1.5, o.detach(), target, reduction)[0], (ref / g * 1.5).detach()
        )


@pytest.mark.parametrize("name", sorted(PLAIN_ACTIVATION_BACKWARD))
def test_mlp_forward_in_place_activations_keep_what_is_asked_for(name):
    """mlp_forward applies each activation in place on its fresh z unless the pre-activations are asked for."""
    from manualbp import functional as F

    torch.manual_seed(0)
    x = torch.randn(5, 4, dtype=D)
    weights = [torch.randn(6, 4, dtype=D), torch.randn(3, 6, dtype=D)]
    biases = [torch.randn(6, dtype=D), torch.randn(3, dtype=D)]
    specs = ((name, 0.1),)
    before = [t.clone() for t in (x, *weights, *biases)]
    plain = F.mlp_forward(x, weights, biases, specs)
    traced = F.mlp_forward(x, weights, biases, specs, return_pre_activations=True)
    z = x @ weights[0].T + biases[0]
    torch.testing.assert_close(traced.pre_activations[0], z, rtol=0, atol=1e-14)  # z itself, not sigma(z)
    a = PLAIN_ACTIVATION_BACKWARD[name][1](z)
    for result in (plain, traced):
        torch.testing.assert_close(result.hidden[0], a, rtol=0, atol=1e-14)
        torch.testing.assert_close(result.output, a @ weights[1].T + biases[1], rtol=0, atol=1e-13)
    assert all(torch.equal(t, b) for t, b in zip((x, *weights, *biases), before))  # inputs untouched
