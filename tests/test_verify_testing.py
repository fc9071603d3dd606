"""manualbp.testing.assert_gradients_match and manualbp.verify.finite_difference_check."""

from __future__ import annotations

import pytest
import torch

import manualbp
from manualbp import autograd as A
from manualbp import verify as V
from manualbp.testing import assert_gradients_match

D = torch.float64


class SigmoidMissingDerivative(torch.autograd.Function):
    """A deliberately wrong custom Function: sigmoid whose backward forgets a (1 - a)."""

    @staticmethod
    def forward(ctx, z):
        return torch.sigmoid(z)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output  # BUG


class LinearTransposedWeightGrad(torch.autograd.Function):
    """A deliberately wrong custom Function: y = x W^T whose weight gradient is transposed (square W)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.T

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g @ w, (g.T @ x).T  # BUG: dL/dW = g^T x, not its transpose


class ScaledCube(torch.autograd.Function):
    """x^3 with a backward 1 % too large: small enough to need the numbers, not just a verdict."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * x**2 * 1.01  # BUG: 1 % off


def _x(*shape, seed=0, dtype=D):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_(True)


# --------------------------------------------------------------------------------------------------
# assert_gradients_match
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_correct_manual_functions_pass(dtype):
    x, w, b = _x(5, 4, dtype=dtype), _x(3, 4, seed=1, dtype=dtype), _x(3, seed=2, dtype=dtype)
    report = assert_gradients_match(A.LinearFunction.apply, torch.nn.functional.linear, x, w, b)
    first = ["grad input", "grad weight", "grad bias"]
    assert report.ok and [r.name for r in report] == ["output", *first, *(f"grad^2 {n[5:]}" for n in first)]
    assert report["grad^2 input"].numel == 20 and report["grad^2 bias"].note == "no gradient on either side"
    assert_gradients_match(A.SigmoidFunction.apply, torch.sigmoid, x)
    assert_gradients_match(A.SoftmaxFunction.apply, lambda t: torch.softmax(t, -1), x)
    # several outputs, a non-tensor argument, an input that needs no gradient
    y = torch.randint(0, 4, (5,))
    assert_gradients_match(
        lambda o, t, r: A.CrossEntropyFunction.apply(o, t, r),
        lambda o, t, r: torch.nn.functional.cross_entropy(o, t, reduction=r),
        x,
        y,
        "sum",
    )
    specs = (("tanh", 0.0),)
    params = [
        _x(6, 4, seed=3, dtype=dtype),
        _x(6, seed=4, dtype=dtype),
        _x(2, 6, seed=5, dtype=dtype),
        _x(2, seed=6, dtype=dtype),
    ]

    def reference(inp, *p):
        a = torch.tanh(inp @ p[0].T + p[1])
        return a @ p[2].T + p[3], a

    assert_gradients_match(lambda inp, *p: A.MLPFunction.apply(inp, specs, True, *p), reference, x, *params)


def test_missing_sigmoid_derivative_is_caught_with_a_table():
    x = _x(4, 3)
    with pytest.raises(AssertionError) as info:
        assert_gradients_match(SigmoidMissingDerivative.apply, torch.sigmoid, x)
    message = str(info.value)
    assert message.startswith("gradients do not match: 2 of 3 quantities differ")  # grad z and grad^2 z
    lines = message.splitlines()
    assert lines[1].split()[:2] == ["quantity", "shape"]
    assert lines[3].split()[:2] == ["grad", "z"] and "4x3" in lines[3] and "FAIL" in lines[3]
    assert "output" not in message.split("\n", 1)[1]  # only mismatching quantities are listed
    # the reported error is the true largest error, computed here another way
    a = torch.sigmoid(x.detach())
    v = torch.randn(4, 3, generator=torch.Generator().manual_seed(V._COTANGENT_SEED), dtype=D)
    expected = (v - v * a * (1 - a)).abs().max().item()
    assert f"{expected:.2e}" in lines[3]


def test_transposed_weight_gradient_is_caught():
    x, w = _x(5, 4), _x(4, 4, seed=1)
    with pytest.raises(AssertionError, match="2 of 5 quantities differ") as info:
        assert_gradients_match(LinearTransposedWeightGrad.apply, lambda a, b: a @ b.T, x, w)
    # dL/dW transposed, and so d/dx of <dL/dW, u_W>; dL/dx and its derivative are right
    assert "grad w " in str(info.value) and "grad^2 x " in str(info.value)
    assert "grad x " not in str(info.value) and "grad^2 w " not in str(info.value)
    with pytest.raises(AssertionError, match="1 of 3 quantities differ"):
        assert_gradients_match(LinearTransposedWeightGrad.apply, lambda a, b: a @ b.T, x, w, order=1)


def test_tolerances_default_by_dtype_and_override():
    x = _x(6, dtype=torch.float32)

    def off(t):
        return t * (1 + 5e-6)  # 5e-6 relative: outside float32's default rtol 1.3e-6 (|t| large enough)

    big = (x.detach() * 100).requires_grad_(True)
    with pytest.raises(AssertionError, match=r"rtol=1.3e-06, atol=1e-05"):
        assert_gradients_match(off, lambda t: t, big)
    assert_gradients_match(off, lambda t: t, big, rtol=1e-5, atol=0)


def test_bad_arguments():
    with pytest.raises(TypeError, match="fn must be callable, got int"):
        assert_gradients_match(3, torch.sin, _x(2))
    with pytest.raises(TypeError, match="reference_fn must return a tensor"):
        assert_gradients_match(torch.sin, lambda t: "no", _x(2))


def test_output_count_mismatch_fails():
    with pytest.raises(AssertionError, match="1 vs 2 outputs"):
        assert_gradients_match(lambda t: t, lambda t: (t, t), _x(2))


class CubeDetachedBackward(torch.autograd.Function):
    """x^3 whose backward is right but .detach()-es: its double backward is silently zero."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * x.detach() ** 2  # BUG for second order


class CubeOnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 3 * x**2


class ComplexSquare(torch.autograd.Function):
    """z^2 for complex z: PyTorch's convention gives grad_input = grad_output * conj(dz^2/dz)."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return z * z

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g * (2 * z).conj()


class ComplexSquareNoConj(ComplexSquare):
    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return g * 2 * z  # BUG: the conjugate is missing


def test_a_detached_backward_fails_at_second_order():
    x = _x(4, 3)
    with pytest.raises(AssertionError, match="1 of 3 quantities differ") as info:
        assert_gradients_match(CubeDetachedBackward.apply, lambda t: t**3, x)
    assert "grad^2 x" in str(info.value) and "no gradient from the manual side" in str(info.value)
    report = V.compare_callables(CubeDetachedBackward.apply, lambda t: t**3, x)
    assert report["grad x"].ok and not report["grad^2 x"].ok
    # the second order is d/dx <3 x^2 v, u> = 6 x v u, computed here by hand
    gen = torch.Generator().manual_seed(V._COTANGENT_SEED)
    v, u = torch.randn(4, 3, generator=gen, dtype=D), torch.randn(4, 3, generator=gen, dtype=D)
    torch.testing.assert_close(report["grad^2 x"].reference, 6 * x.detach() * v * u)
    assert [r.name for r in assert_gradients_match(CubeDetachedBackward.apply, lambda t: t**3, x, order=1)] == [
        "output",
        "grad x",
    ]
    with pytest.raises(ValueError, match="order: expected 1"):
        assert_gradients_match(CubeDetachedBackward.apply, lambda t: t**3, x, order=3)


def test_a_missing_double_backward_is_a_row_not_a_crash():
    x = _x(5)
    with pytest.raises(AssertionError, match=r"grad\^2 x: not compared, fn has no double backward") as info:
        assert_gradients_match(CubeOnceDifferentiable.apply, lambda t: t**3, x)
    assert "order=1 compares first order only" in str(info.value)
    assert_gradients_match(CubeOnceDifferentiable.apply, lambda t: t**3, x, order=1)
    report = assert_gradients_match(lambda t: t**3, CubeOnceDifferentiable.apply, x)  # reference lacks it
    row = report["grad^2 t"]
    assert row.ok and not row.compared and row.note.startswith("reference_fn has no double backward")
    assert "skipped (reference_fn has no double backward" in report.table()


def test_inputs_inside_lists_tuples_and_dicts_are_compared():
    def good(xs, d, scale):
        return xs[0] * d["w"] + torch.tanh(xs[1][0]) * scale

    def broken(xs, d, scale):
        return xs[0] * d["w"].detach() + torch.tanh(xs[1][0]) * scale  # no gradient reaches d['w']

    xs, d = [_x(3), (_x(3, seed=1),)], {"w": _x(3, seed=2), "note": "not a tensor"}
    report = assert_gradients_match(good, good, xs, d, 2.0)
    assert [r.name for r in report][:4] == ["output", "grad xs[0]", "grad xs[1][0]", "grad d['w']"]
    with pytest.raises(AssertionError, match=r"3 of 7 quantities differ") as info:
        assert_gradients_match(broken, good, xs, d, 2.0)
    # dL/dw and the second order through it (d/dxs[0] of <dL/dw, u> too); nothing of xs[1][0]
    failed = [line.split()[:2] for line in str(info.value).splitlines()[3:6]]
    assert failed == [["grad", "d['w']"], ["grad^2", "xs[0]"], ["grad^2", "d['w']"]]


def test_keyword_arguments_are_passed_and_their_gradients_compared():
    x, w = _x(5, 4), _x(3, 4, seed=1)
    report = assert_gradients_match(
        lambda x, weight: A.LinearFunction.apply(x, weight, None),
        lambda x, weight: x @ weight.T,
        x,
        weight=w,
    )
    assert "grad weight" in [r.name for r in report] and "grad^2 weight" in [r.name for r in report]
    with pytest.raises(AssertionError, match="grad weight"):
        assert_gradients_match(lambda x, weight: x @ weight.T, lambda x, weight: x @ (2 * weight).T, x, weight=w)


def test_complex_inputs_keep_their_imaginary_part():
    z = torch.randn(4, 3, dtype=torch.complex128, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    report = assert_gradients_match(ComplexSquare.apply, lambda t: t * t, z)
    assert [r.name for r in report] == ["output", "grad z", "grad^2 z"]
    assert report["grad z"].value.is_complex() and report.rtol == 1e-7  # complex128 takes float64's tolerances
    with pytest.raises(AssertionError, match="grad z"):
        assert_gradients_match(ComplexSquareNoConj.apply, lambda t: t * t, z)
    with pytest.raises(AssertionError, match="output"):  # the outputs differ only in their imaginary parts
        assert_gradients_match(lambda t: t.conj() * 1, lambda t: t * 1, z)
    row = V.compare_tensors("q", torch.tensor([1 + 2j]), torch.tensor([1 - 2j]))
    assert not row.ok and row.max_abs_err == pytest.approx(4.0) and row.to_dict()["worst_value"] == [1.0, 2.0]


def test_no_input_requiring_grad_is_an_error_not_a_pass():
    x = _x(3).detach()
    with pytest.raises(
        ValueError, match=r"inputs: no floating-point or complex input requires grad.*t \(torch.float64\)"
    ):
        assert_gradients_match(lambda t: t * 2, lambda t: t * 3, x)
    with pytest.raises(ValueError, match="there is no tensor among them"):
        assert_gradients_match(lambda n: torch.ones(n), lambda n: torch.ones(n), 3)


def test_a_shape_mismatch_says_so_and_is_not_an_error_of_inf():
    x = _x(4)
    with pytest.raises(AssertionError) as info:
        assert_gradients_match(lambda t: t[:3] * 2, lambda t: t * 2, x)
    message = str(info.value)
    assert "output: not compared, shape (3,) vs reference (4,)" in message and "inf" not in message
    row = V.compare_callables(lambda t: t[:3] * 2, lambda t: t * 2, x, order=1)["output"]
    assert not row.compared and row.to_dict()["max_abs_err"] is None
    output_line = next(line for line in message.splitlines() if line.startswith("output "))
    assert output_line.split()[1:4] == ["4", "-", "-"]


def test_the_message_gives_the_worst_element_and_the_mismatch_count():
    x = _x(3, 4)
    bump = torch.zeros(3, 4, dtype=D)
    bump[1, 2], bump[0, 0], bump[2, 3] = 0.5, 1e-3, -1e-3
    with pytest.raises(AssertionError) as info:
        assert_gradients_match(lambda t: t + bump, lambda t: t * 1, x)
    message = str(info.value)
    e = x.detach()[1, 2].item()
    allowed = 1e-7 + 1e-7 * abs(e)
    assert "output: Mismatched elements: 3 / 12 (25.0%)" in message
    assert (
        f"Greatest absolute difference: {0.5:.8g} at index (1, 2) (up to {allowed:.3g} allowed): "
        f"{e + 0.5:.8g} vs {e:.8g} (reference)"
    ) in message
    d = V.compare_callables(lambda t: t + bump, lambda t: t * 1, x, order=1)["output"].to_dict()
    assert d["mismatched"] == 3 and d["numel"] == 12 and d["worst_index"] == [1, 2]
    assert d["worst_value"] == pytest.approx(e + 0.5) and d["worst_reference"] == e
    row = V.Row("q", (2,), 0.1, 0.1, False, False, "", "", None, None)  # positional construction still works
    assert row.compared and row.mismatched is None


# --------------------------------------------------------------------------------------------------
# finite_difference_check
# --------------------------------------------------------------------------------------------------
def test_finite_differences_numbers_for_a_known_error():
    x = _x(5)
    report = V.finite_difference_check(ScaledCube.apply, x, grad_grad=False)
    assert not report.ok and report.gradcheck is False and report.gradgradcheck is None
    row = report["x"]
    expected = (0.01 * 3 * x.detach() ** 2).abs().max().item()  # |analytical - true derivative|, on the diagonal
    assert row.max_abs_diff == pytest.approx(expected, rel=1e-4)
    assert row.max_rel_diff == pytest.approx(expected / (3.03 * x.detach() ** 2).abs().max().item(), rel=1e-4)
    good = V.finite_difference_check(lambda t: t**3, x)
    assert good.ok and good.gradcheck and good.gradgradcheck
    assert good["t"].max_abs_diff < 1e-8 and good["t"].grad_grad_max_abs_diff < 1e-8


@pytest.mark.parametrize("loss", [None, "cross_entropy", "squared_error"])
def test_finite_differences_of_the_mlp(loss):
    torch.manual_seed(0)
    model = manualbp.MLP(3, [4], 2, activation="tanh", dtype=torch.float32)  # checked in a float64 copy
    x = torch.randn(3, 3)
    y = torch.randint(0, 2, (3,)) if loss == "cross_entropy" else torch.randn(3, 2)
    report = V.finite_difference_check(model, x, target=y if loss else None, loss=loss, fast_mode=True)
    assert report.ok, str(report)
    assert [r.name for r in report.rows] == ["x", "W^1", "b^1", "W^2", "b^2"]
    assert report["W^1"].shape == (4, 3)
    assert model.linears[0].weight.dtype == torch.float32  # the model itself is untouched
    text = str(report)
    assert "PASS: gradcheck passed, gradgradcheck passed" in text


def test_finite_differences_catch_an_injected_bug_below_the_output_layer():
    torch.manual_seed(0)
    model = manualbp.MLP(3, [4], 2, activation="sigmoid", dtype=D)
    x = torch.randn(3, 3, dtype=D)
    with V.inject_bug("sigmoid_missing_derivative"):
        report = V.finite_difference_check(model, x, fast_mode=True)
    assert not report.ok and not report.gradcheck
    assert [r.name for r in report.rows if not r.ok] == ["x", "W^1", "b^1"]
    d = report.to_dict()
    assert d["ok"] is False and d["rows"][0]["name"] == "x"


def test_finite_differences_bad_arguments():
    model = manualbp.MLP(3, [4], 2)
    with pytest.raises(ValueError, match="a module is checked on one input tensor, got 2 inputs"):
        V.finite_difference_check(model, torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="target: a loss needs a target"):
        V.finite_difference_check(model, torch.randn(1, 3), loss="mse")
    with pytest.raises(ValueError, match="no floating-point input requires grad"):
        V.finite_difference_check(torch.sin, torch.randn(3))


def test_finite_differences_summary_names_what_failed():
    row = V.FiniteDifferenceRow
    rows = [row("x", (3,), 1e-9, 1e-9, 1e-9, True), row("W", (2, 3), 2e-3, 1e-3, None, False)]
    report = V.FiniteDifferenceReport(rows, True, True, 1e-6, 1e-5, 1e-3)
    last = str(report).splitlines()[-1]
    assert (
        last
        == "FAIL: gradcheck passed, gradgradcheck passed, but 1 input's numbers exceed atol + rtol * |numerical|: W"
    )
    report.gradcheck = False
    assert report.verdict().startswith("FAIL: gradcheck FAILED, gradgradcheck passed; 1 input's numbers exceed")
    rows[1].ok = True
    assert report.verdict() == "FAIL: gradcheck FAILED, gradgradcheck passed"
