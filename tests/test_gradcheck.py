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
