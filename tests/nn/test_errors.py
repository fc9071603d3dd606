"""Bad input: a ValueError/TypeError naming the argument, the expected and the actual, before arithmetic."""

from __future__ import annotations

import pytest
import torch

import manualbp
from manualbp.nn import CrossEntropyLoss, MSELoss, SquaredErrorLoss


@pytest.fixture
def model():
    return manualbp.MLP(4, [5], 3)


def test_wrong_feature_size(model):
    with pytest.raises(ValueError, match=r"input: expected shape \(\*, 4\).*got \(2, 7\)"):
        model(torch.randn(2, 7))


def test_zero_dim_input(model):
    with pytest.raises(ValueError, match="input: expected shape"):
        model(torch.tensor(1.0))


def test_integer_input(model):
    with pytest.raises(TypeError, match=r"input must be a floating-point tensor.*torch.int64"):
        model(torch.ones(2, 4, dtype=torch.long))


def test_not_a_tensor(model):
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        model([[1.0, 2.0, 3.0, 4.0]])


def test_dtype_mismatch(model):
    with pytest.raises(TypeError, match=r"input has dtype torch.float64 but the weights have dtype torch.float32"):
        model(torch.randn(2, 4, dtype=torch.float64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch(model):
    with pytest.raises(ValueError, match=r"input is on cuda:0 but the weights are on cpu"):
        model(torch.randn(2, 4, device="cuda"))


def test_device_mismatch_meta(model):
    """Checked without a GPU: a tensor on the meta device is on another device than the weights."""
    with pytest.raises(ValueError, match=r"input is on meta but the weights are on cpu"):
        model(torch.randn(2, 4, device="meta"))


def test_class_index_out_of_range():
    with pytest.raises(ValueError, match=r"target: class index 3 is out of range for C=3"):
        CrossEntropyLoss()(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"class index -1"):
        CrossEntropyLoss()(torch.randn(2, 3), torch.tensor([-1, 0]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bad", [3, -1, -100, 2**40])
def test_class_index_out_of_range_every_path(reduction, dtype, bad):
    """On CPU the loss kernel checks the range itself (no pre-check): the same ValueError for every bad index,
    -100 included (torch's ignore_index: never skipped silently), for every reduction, dtype, shape and
    integer dtype of the targets."""
    x = torch.randn(2, 4, 3, dtype=dtype)
    for target in (torch.tensor([[0, 1, 2, bad], [2, 1, 0, 0]]), torch.tensor([[0, bad, 2, 1], [0, 0, 0, 0]])):
        for t, inp in ((target, x), (target[0], x[0]), (target.int() if abs(bad) < 2**31 else target, x)):
            with pytest.raises(ValueError, match=rf"target: class index {bad} is out of range for C=3") as info:
                CrossEntropyLoss(reduction)(inp, t)
            error = info.value  # raised before the kernel, or from its IndexError, which is not shown beneath it
            assert error.__context__ is None or error.__suppress_context__


def test_functional_cross_entropy_never_skips_a_target_where_the_kernel_checks():
    from manualbp import functional as F

    x = torch.randn(3, 3)
    assert F.kernel_checks_class_range(x, "mean") and F.kernel_checks_class_range(x, "sum")
    assert not F.kernel_checks_class_range(x, "none") and not F.kernel_checks_class_range(x.bfloat16(), "mean")
    assert not F.kernel_checks_class_range(x.to("meta"), "mean")
    for reduction in ("mean", "sum"):
        for bad in (-100, -1, 3):
            with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
                F.cross_entropy(x, torch.tensor([0, bad, 1]), reduction)
    good = torch.tensor([0, 2, 1])
    torch.testing.assert_close(F.cross_entropy(x, good), torch.nn.functional.cross_entropy(x, good), rtol=0, atol=0)


def test_class_target_shape():
    with pytest.raises(ValueError, match=r"target: class indices must have shape \(2,\).*got \(2, 1\)"):
        CrossEntropyLoss()(torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.long))


def test_probability_target_shape_and_dtype():
    with pytest.raises(ValueError, match=r"target: probabilities must have the shape of input \(2, 3\)"):
        CrossEntropyLoss()(torch.randn(2, 3), torch.rand(2, 4))
    with pytest.raises(TypeError, match=r"target has dtype torch.float64 but input has dtype torch.float32"):
        CrossEntropyLoss()(torch.randn(2, 3), torch.rand(2, 3, dtype=torch.float64))


def test_bool_target():
    with pytest.raises(TypeError, match=r"target must hold class indices"):
        CrossEntropyLoss()(torch.randn(2, 3), torch.tensor([True, False]))


@pytest.mark.parametrize("loss_cls", [SquaredErrorLoss, MSELoss])
def test_regression_target_shape_and_dtype(loss_cls):
    with pytest.raises(ValueError, match=r"target: expected shape \(4, 1\).*got \(4,\).*unsqueeze"):
        loss_cls()(torch.randn(4, 1), torch.randn(4))
    with pytest.raises(TypeError, match=r"target must be a floating-point tensor.*torch.int64"):
        loss_cls()(torch.randn(4, 1), torch.ones(4, 1, dtype=torch.long))


def test_integer_logits():
    with pytest.raises(TypeError, match="input must be a floating-point"):
        CrossEntropyLoss()(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1]))


def test_bad_reduction():
    with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"):
        CrossEntropyLoss("avg")


@pytest.mark.parametrize("loss_cls", [SquaredErrorLoss, MSELoss, CrossEntropyLoss])
def test_empty_batch_mean_is_an_error_sum_is_zero(loss_cls):
    o = torch.randn(0, 3)
    y = torch.zeros(0, dtype=torch.long) if loss_cls is CrossEntropyLoss else torch.randn(0, 3)
    with pytest.raises(ValueError, match="empty batch"):
        loss_cls()(o, y)
    assert loss_cls("sum")(o, y).item() == 0.0
    assert loss_cls("none")(o, y).numel() == 0


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        ({"in_features": 0}, ValueError, "in_features must be a positive integer"),
        ({"hidden_features": [4, -1]}, ValueError, r"hidden_features\[1\] must be a positive integer"),
        ({"hidden_features": "64"}, TypeError, "hidden_features must be an int or a sequence"),
        ({"activation": "gelu"}, ValueError, "activation must be one of"),
        ({"activation": ["relu"]}, ValueError, r"one name per hidden layer \(2\)"),
        ({"activation": "leaky_relu", "negative_slope": -0.1}, ValueError, "negative_slope must be a number >= 0"),
    ],
)
def test_constructor_errors(kwargs, exc, message):
    args = {"in_features": 4, "hidden_features": [4, 4], "out_features": 2}
    args.update(kwargs)
    with pytest.raises(exc, match=message):
        manualbp.MLP(**args)
