"""The compiled autograd nodes of manualbp/csrc/module.cpp equal the Python Functions bit for bit.

``manualbp.MLP`` and ``manualbp.CrossEntropyLoss`` (class indices) run C++ nodes in plain eager mode and the
Python ``MLPFunction``/``CrossEntropyFunction`` elsewhere (``MANUALBP_NATIVE=off``, torch.func, autocast,
...). Both must give the same outputs, losses, gradients, saved tensors and errors.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import manualbp
from manualbp import native

pytestmark = pytest.mark.skipif(
    native.mode() == "off" or native.load() is None,
    reason="manualbp's compiled kernels are off (MANUALBP_NATIVE=off) or could not be built: nothing to compare",
)

ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu", "identity"]
DEPTHS = {0: [], 1: [5], 2: [5, 4]}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
SHAPES = [(7,), (2, 3), ()]  # leading dimensions of the input: 2-D, 3-D and 1-D input
REDUCTIONS = ["mean", "sum", "none"]
MLP_NODE, CE_NODE = "MLPNode", "CrossEntropyNode"


@contextlib.contextmanager
def python_path(monkeypatch):
    """The Python Functions (MANUALBP_NATIVE=off) inside the block."""
    with monkeypatch.context() as m:
        m.setenv("MANUALBP_NATIVE", "off")
        yield


def _model(activation="sigmoid", bias=True, hidden=(5, 4), dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return manualbp.MLP(6, list(hidden), 3, activation=activation, bias=bias, negative_slope=0.07, dtype=dtype)


def _step(model, x, target, reduction):
    """Forward, loss and backward; returns every tensor that must agree and the two grad_fn names."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = model(x)
    loss = manualbp.CrossEntropyLoss(reduction)(out, target)
    loss.sum().backward()
    tensors = [out, loss, x.grad, *(p.grad for p in model.parameters())]
    return tensors, out.grad_fn.name(), loss.grad_fn.name()


def _assert_bitwise(actual, expected):
    assert len(actual) == len(expected)
    for k, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None, k
            continue
        assert a.shape == e.shape and a.dtype == e.dtype, (k, a.shape, e.shape)
        assert torch.equal(a, e), f"tensor {k} differs: max |diff| {(a - e).abs().max().item()}"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bitwise_equal_to_python_path(monkeypatch, activation, bias, depth, dtype):
    model = _model(activation, bias, DEPTHS[depth], dtype)
    g = torch.Generator().manual_seed(1)
    for shape in SHAPES:
        x = torch.randn(*shape, 6, dtype=dtype, generator=g)
        target = torch.randint(0, 3, shape, generator=g)
        for reduction in REDUCTIONS:
            native_out, mlp_node, ce_node = _step(model, x, target, reduction)
            assert MLP_NODE in mlp_node and CE_NODE in ce_node
            with python_path(monkeypatch):
                python_out, mlp_node, ce_node = _step(model, x, target, reduction)
            assert mlp_node == "MLPFunctionBackward" and ce_node == "CrossEntropyFunctionBackward"
            _assert_bitwise(native_out, python_out)


@pytest.mark.parametrize("frozen", ["input", "first", "last", "biases", "weights", "all-but-input"])
def test_partial_requires_grad_bitwise(monkeypatch, frozen):
    """What is saved and computed depends on which inputs need a gradient (MLPFunction.setup_context's rule)."""

    def run():
        model = _model("tanh", True, (5, 4, 3))
        params = list(model.parameters())
        frozen_params = {
            "input": [],
            "first": params[:2],
            "last": params[-2:],
            "biases": params[1::2],
            "weights": params[0::2],
            "all-but-input": params,
        }[frozen]
        for p in frozen_params:
            p.requires_grad_(False)
        x = torch.randn(2, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        x.requires_grad_(frozen != "input")
        target = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
            out = model(x)
            loss = manualbp.CrossEntropyLoss()(out, target)
        loss.backward()
        return [out, loss, x.grad, *(p.grad for p in params)], saved, out.grad_fn.name()

    native_out, native_saved, name = run()
    assert MLP_NODE in name
    with python_path(monkeypatch):
        python_out, python_saved, _ = run()
    _assert_bitwise(native_out, python_out)
    assert native_saved == python_saved


def test_saved_tensors_hooks_see_the_same_bytes(monkeypatch):
    def run():
        model = _model("sigmoid", True, (5, 4), torch.float32)
        x = torch.randn(8, 6)
        packed: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.nbytes) or t, lambda t: t):
            loss = manualbp.CrossEntropyLoss()(model(x), torch.arange(8) % 3)
        loss.backward()
        return packed

    native_packed = run()
    with python_path(monkeypatch):
        python_packed = run()
    assert native_packed == python_packed
    assert len(native_packed) == 9  # x, W2, W3, a1, a2; logits, target, log yhat, count


def test_hidden_outputs_and_undefined_grads_bitwise(monkeypatch):
    """Gradients arriving at the hidden activations (forward_with_hidden), and at them alone."""

    def run(use_output: bool):
        model = _model("relu", True, (5, 4))
        x = torch.randn(7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
        out, hidden = model.forward_with_hidden(x)
        loss = (hidden[0] ** 2).sum() + hidden[1].sin().sum()
        if use_output:
            loss = loss + manualbp.CrossEntropyLoss()(out, torch.arange(7) % 3)
        loss.backward()
        return [out, *hidden, x.grad, *(p.grad for p in model.parameters())], out.grad_fn.name()

    for use_output in (True, False):
        native_out, name = run(use_output)
        assert MLP_NODE in name
        with python_path(monkeypatch):
            python_out, _ = run(use_output)
        _assert_bitwise(native_out, python_out)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_double_backward_against_native_autograd(monkeypatch, activation):
    """Hessian-vector products through the C++ nodes: equal to native autograd, and to the Python path."""
    model = _model(activation, True, (5, 4))
    reference = model.to_torch()
    x = torch.randn(2, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    target = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])

    def hvp(net, loss_fn):
        params = list(net.parameters())
        loss = loss_fn(net(x), target)
        grads = torch.autograd.grad(loss, [x, *params], create_graph=True)
        norm = sum((g * g.detach().cos()).sum() for g in grads)  # v = cos(g), a non-trivial direction
        return torch.autograd.grad(norm, [x, *params]), net(x).grad_fn.name()

    manual, name = hvp(model, manualbp.CrossEntropyLoss())
    assert MLP_NODE in name
    native_hvp, _ = hvp(reference, lambda o, t: nn.functional.cross_entropy(o.reshape(-1, 3), t.reshape(-1)))
    for m, n in zip(manual, native_hvp):
        torch.testing.assert_close(m, n, rtol=1e-10, atol=1e-12)
    with python_path(monkeypatch):
        python_hvp, _ = hvp(model, manualbp.CrossEntropyLoss())
    _assert_bitwise(list(manual), list(python_hvp))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradgradcheck_through_the_compiled_nodes(reduction):
    model = _model("tanh", True, (4,))
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    target = torch.tensor([0, 2, 1, 1, 0])
    params = tuple(model.parameters())

    def f(x, *ps):
        out = torch.func.functional_call(model, dict(zip([n for n, _ in model.named_parameters()], ps)), (x,))
        return manualbp.CrossEntropyLoss(reduction)(out, target)

    assert MLP_NODE in model(x).grad_fn.name()
    assert torch.autograd.gradcheck(f, (x, *params))
    assert torch.autograd.gradgradcheck(f, (x, *params))


def _spy(monkeypatch):
    """Count the calls of the compiled nodes."""
    module = native.load()
    calls = {"mlp": 0, "cross_entropy": 0}
    for name in calls:
        original = getattr(module, name)

        def spy(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(module, name, spy)
    return calls


def test_python_path_under_torch_func(monkeypatch):
    model = _model("sigmoid", True, (5,))
    params = dict(model.named_parameters())
    x = torch.randn(4, 6, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 0])
    names = []

    def loss_fn(p, x):
        out = torch.func.functional_call(model, p, (x,))
        names.append(out.grad_fn.name())
        return manualbp.CrossEntropyLoss()(out, target)

    calls = _spy(monkeypatch)
    grads = torch.func.grad(loss_fn)(params, x)
    per_example = torch.func.vmap(lambda xi: model(xi.unsqueeze(0)).squeeze(0))(x)
    assert calls == {"mlp": 0, "cross_entropy": 0}
    assert "MLPFunction" in names[0]
    eager = manualbp.CrossEntropyLoss()(model(x), target)  # eager again: the compiled nodes
    eager.backward()
    assert calls == {"mlp": 1, "cross_entropy": 1}
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(per_example, model(x), rtol=1e-12, atol=1e-14)


class _Subclass(torch.Tensor):
    pass


class _PassThroughMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("context", ["off", "autocast", "forward_ad", "subclass", "torch_function_mode"])
def test_ineligible_contexts_use_the_python_functions(monkeypatch, context):
    model = _model("tanh", True, (5,), torch.float32)
    x = torch.randn(4, 6)
    target = torch.tensor([0, 1, 2, 0])
    calls = _spy(monkeypatch)
    with contextlib.ExitStack() as stack:
        if context == "off":
            stack.enter_context(python_path(monkeypatch))
        elif context == "autocast":
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        elif context == "forward_ad":
            stack.enter_context(torch.autograd.forward_ad.dual_level())
        elif context == "subclass":
            x = x.as_subclass(_Subclass)
        else:
            stack.enter_context(_PassThroughMode())
        out = model(x)
        loss = manualbp.CrossEntropyLoss()(out, target)
    assert calls == {"mlp": 0, "cross_entropy": 0}
    assert "MLPFunction" in out.grad_fn.name() or "MLPFunction" in str(out.grad_fn.next_functions)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bad", [3, 17, -1, -100])
def test_bad_class_index_same_error(monkeypatch, reduction, bad, dtype):
    x = torch.randn(4, 3, dtype=dtype, requires_grad=True)
    target = torch.tensor([0, 1, bad, 2])

    def error():
        with pytest.raises(ValueError) as info:
            manualbp.CrossEntropyLoss(reduction)(x, target)
        return str(info.value)

    message = error()
    assert f"class index {bad} is out of range" in message
    with python_path(monkeypatch):
        assert error() == message


@pytest.mark.parametrize(
    "case",
    ["wrong-features", "integer-input", "dtype-mismatch", "target-shape", "target-float-dtype", "bool-target"],
)
def test_bad_input_same_error(monkeypatch, case):
    model = _model(dtype=torch.float32)
    x = torch.randn(4, 6)
    logits = torch.randn(4, 3)
    target = torch.tensor([0, 1, 2, 0])
    call = {
        "wrong-features": lambda: model(torch.randn(4, 5)),
        "integer-input": lambda: model(torch.ones(4, 6, dtype=torch.int64)),
        "dtype-mismatch": lambda: model(x.double()),
        "target-shape": lambda: manualbp.CrossEntropyLoss()(logits, target[:3]),
        "target-float-dtype": lambda: manualbp.CrossEntropyLoss()(logits, torch.rand(4, 3, dtype=torch.float64)),
        "bool-target": lambda: manualbp.CrossEntropyLoss()(logits, target > 0),
    }[case]

    def error():
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        return type(info.value), str(info.value)

    expected = error()
    with python_path(monkeypatch):
        assert error() == expected


def test_sgd_training_bitwise(monkeypatch):
    def train():
        model = _model("sigmoid", True, (8,), torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        g = torch.Generator().manual_seed(11)
        x, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)
        losses = []
        for step in range(6):
            xb, yb = x[step * 8 : step * 8 + 8], y[step * 8 : step * 8 + 8]
            opt.zero_grad()
            loss = manualbp.CrossEntropyLoss()(model(xb), yb)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return [*losses, *model.parameters()]

    native_run = train()
    with python_path(monkeypatch):
        python_run = train()
    _assert_bitwise(native_run, python_run)


def test_switching_at_runtime(monkeypatch):
    model = _model()
    x = torch.randn(3, 6, dtype=torch.float64)
    assert MLP_NODE in model(x).grad_fn.name()
    with python_path(monkeypatch):
        assert model(x).grad_fn.name() == "MLPFunctionBackward"
    assert MLP_NODE in model(x).grad_fn.name()


def test_soft_targets_stay_on_the_python_function():
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.softmax(torch.randn(4, 3, dtype=torch.float64), -1)
    assert manualbp.CrossEntropyLoss()(logits, target).grad_fn.name() == "CrossEntropyFunctionBackward"


@pytest.mark.parametrize("case", ["empty-sum", "empty-none", "non-contiguous", "checkpoint", "no-grad"])
def test_edge_cases_bitwise(monkeypatch, case):
    def run():
        model = _model("leaky_relu", True, (5, 4))
        g = torch.Generator().manual_seed(9)
        reduction = {"empty-sum": "sum", "empty-none": "none"}.get(case, "mean")
        if case.startswith("empty"):
            x, target = torch.randn(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
        else:
            x = torch.randn(6, 4, 5, dtype=torch.float64, generator=g).transpose(0, 2)[:, ::2]  # (5, 2, 6)
            target = torch.randint(0, 3, (5, 2), generator=g)
        x.requires_grad_()
        if case == "no-grad":
            with torch.no_grad():
                return [model(x), manualbp.CrossEntropyLoss()(model(x), target)]
        if case == "checkpoint":
            out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
        else:
            out = model(x)
        loss = manualbp.CrossEntropyLoss(reduction)(out, target)
        loss.sum().backward()
        return [out, loss, x.grad, *(p.grad for p in model.parameters())]

    native_out = run()
    with python_path(monkeypatch):
        python_out = run()
    _assert_bitwise(native_out, python_out)


@pytest.mark.slow
def test_torch_compile_runs_the_python_functions(monkeypatch):
    model = _model("tanh", True, (5,))
    x, target = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    calls = _spy(monkeypatch)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    assert calls["mlp"] == 0
    torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-14)
    assert manualbp.CrossEntropyLoss()(out, target).grad_fn is not None
