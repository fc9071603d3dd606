"""manualbp.native and the compiled code of manualbp/csrc against the Python paths, bit for bit.

The extension: it builds here, reads ``MANUALBP_NATIVE`` on each call, switches off cleanly, warns once and falls
back when a build fails, rebuilds on a changed header, and its fused epoch (csrc/fused.cpp, steps.h) equals the
Python loop for every activation, loss, SGD option and Adam / AdamW.

The compiled autograd nodes of csrc/module.cpp: ``manualbp.MLP`` and ``manualbp.CrossEntropyLoss`` (class
indices) run C++ nodes in plain eager mode and the Python ``MLPFunction``/``CrossEntropyFunction`` elsewhere
(``MANUALBP_NATIVE=off``, torch.func, autocast, ...). Both must give the same outputs, losses, gradients, saved
tensors and errors; those tests (``@compiled_nodes``) skip where the kernels are off or could not be built.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import manualbp
from manualbp import native
from manualbp.fast import FusedTrainer

requires_native = pytest.mark.skipif(
    shutil.which("c++") is None, reason="no C++ compiler: manualbp runs its Python paths only"
)
# the tests of the compiled autograd nodes: nothing to compare where the kernels are off or did not build
compiled_nodes = pytest.mark.skipif(
    native.mode() == "off" or native.load() is None,
    reason="manualbp's compiled kernels are off (MANUALBP_NATIVE=off) or could not be built: nothing to compare",
)


@requires_native
def test_the_extension_builds_where_a_compiler_is():
    # a broken build must fail here, not quietly slow everything down
    if native.mode() == "off":
        pytest.skip("MANUALBP_NATIVE=off: the Python paths were asked for")
    module = native.load()
    assert module is not None
    assert hasattr(module, "fused_step_many")


def test_mode_reads_the_environment_each_call(monkeypatch):
    monkeypatch.setenv("MANUALBP_NATIVE", "off")
    assert native.mode() == "off" and native.load() is None and not native.available()
    for spelling, meaning in (("0", "off"), ("False", "off"), ("1", "require"), ("", "auto"), (" AUTO ", "auto")):
        monkeypatch.setenv("MANUALBP_NATIVE", spelling)
        assert native.mode() == meaning
    monkeypatch.setenv("MANUALBP_NATIVE", "sometimes")
    with pytest.raises(ValueError, match="MANUALBP_NATIVE must be one of auto, off, require, got 'sometimes'"):
        native.load()


def test_a_failed_build_warns_once_and_falls_back_or_raises_when_required(monkeypatch):
    monkeypatch.setattr(native, "_built", lambda: (None, OSError("no compiler here")))
    monkeypatch.setattr(native, "_warned", [])
    monkeypatch.setattr(native, "_last", [object(), None])  # forget the answer remembered for "auto"
    monkeypatch.setenv("MANUALBP_NATIVE", "auto")
    with pytest.warns(RuntimeWarning, match="compiled kernels are unavailable.*no compiler here.*MANUALBP_NATIVE=off"):
        assert native.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert native.load() is None
    # the trainers still train, on the Python paths
    model = manualbp.MLP(5, [4], 3)
    trainer = FusedTrainer(model, lr=0.1)
    x, y = trainer.prepare(torch.randn(10, 5), torch.randint(0, 3, (10,)))
    assert trainer.step_many(x, y, 4).shape == (3,)
    monkeypatch.setenv("MANUALBP_NATIVE", "require")
    with pytest.raises(RuntimeError, match="MANUALBP_NATIVE=require but manualbp's extension could not be built"):
        native.load()


def test_build_directory_is_per_torch_and_python_version(monkeypatch, tmp_path):
    monkeypatch.delenv("MANUALBP_NATIVE_DIR", raising=False)
    default = native.build_directory()
    assert torch.__version__.replace("+", "-") in str(default) and f"py{sys.version_info[0]}" in default.name
    monkeypatch.setenv("MANUALBP_NATIVE_DIR", str(tmp_path))
    assert native.build_directory() == tmp_path
    assert {p.name for p in native.sources()} >= {"bindings.cpp", "fused.cpp", "module.cpp"}


def test_a_changed_header_rebuilds(monkeypatch, tmp_path):
    # torch's loader rebuilds when a listed source or a flag changes; a header reaches it through the flag
    from torch.utils import cpp_extension

    flags = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, sources, **kw: flags.append(kw["extra_cflags"]) or "module")
    source = tmp_path / "csrc"
    source.mkdir()
    for name in ("native.h", "fused.cpp"):
        (source / name).write_text("// " + name)
    monkeypatch.setattr(native, "_SOURCE_DIR", source)
    monkeypatch.setenv("MANUALBP_NATIVE_DIR", str(tmp_path / "build"))
    native._build(verbose=False)
    (source / "native.h").write_text("// changed")
    native._build(verbose=False)
    assert len(flags) == 2 and flags[0] != flags[1]
    assert [f for f in flags[1] if f.startswith("-DMANUALBP_SOURCES=")] == [f"-DMANUALBP_SOURCES={native.sources_hash()}"]


def test_command_line_reports_off_without_building():
    env = {**__import__("os").environ, "MANUALBP_NATIVE": "off"}
    out = subprocess.run([sys.executable, "-m", "manualbp.native"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "MANUALBP_NATIVE=off, nothing to build" in out.stdout


def _twin_trainers(activation, loss, dtype, bias, hidden):
    torch.manual_seed(3)
    a = manualbp.MLP(7, list(hidden), 4, activation=activation, bias=bias, negative_slope=0.2, dtype=dtype)
    b = manualbp.MLP(7, list(hidden), 4, activation=activation, bias=bias, negative_slope=0.2, dtype=dtype)
    b.load_state_dict(a.state_dict())
    return FusedTrainer(a, loss, lr=0.3), FusedTrainer(b, loss, lr=0.3)


def _epochs(trainer, x, y, batch, epochs, monkeypatch, mode):
    monkeypatch.setenv("MANUALBP_NATIVE", mode)
    x, y = trainer.prepare(x, y)
    return [trainer.step_many(x, y, batch) for _ in range(epochs)]


@requires_native
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "leaky_relu", "identity"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "squared_error"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fused_epoch_in_cpp_equals_the_python_loop_bit_for_bit(monkeypatch, activation, loss, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(53, 7, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (53,), generator=g) if loss == "cross_entropy" else torch.randn(53, 4, generator=g, dtype=dtype)
    for bias, hidden, batch in ((True, (9, 6), 8), (False, (5,), 53), (True, (), 16)):  # 7 batches + 5 rows, 1 batch
        cpp, python = _twin_trainers(activation, loss, dtype, bias, hidden)
        cpp_losses = _epochs(cpp, x, y, batch, 3, monkeypatch, "require")
        python_losses = _epochs(python, x, y, batch, 3, monkeypatch, "off")
        for a, b in zip(cpp_losses, python_losses):
            assert torch.equal(a, b)
        for (name, a), b in zip(cpp.model.state_dict().items(), python.model.state_dict().values()):
            assert torch.equal(a, b), name
        assert all(torch.equal(a, b) for a, b in zip(cpp.last_grads, python.last_grads))
        assert cpp.steps == python.steps == 3 * -(-53 // batch)
        # and the weights moved: the comparison is not of two untouched models
        assert not torch.equal(cpp.blocks[0], _twin_trainers(activation, loss, dtype, bias, hidden)[0].blocks[0])


@requires_native
@pytest.mark.parametrize(
    "optim",
    [
        dict(momentum=0.9),
        dict(momentum=0.8, dampening=0.3, weight_decay=1e-2),
        dict(momentum=0.9, nesterov=True),
        dict(weight_decay=0.05),
        dict(optimizer="adam", betas=(0.8, 0.95)),
        dict(optimizer="adam", weight_decay=1e-2, eps=1e-6),
        dict(optimizer="adamw", weight_decay=0.1),
    ],
)
def test_fused_epoch_in_cpp_with_momentum_and_weight_decay_equals_the_python_loop(monkeypatch, optim):
    """SGD with state and Adam / AdamW: csrc/steps.h against manualbp/optim_steps.py, bit for bit."""
    g = torch.Generator().manual_seed(1)
    x, soft = torch.randn(40, 7, generator=g, dtype=torch.float64), torch.rand(40, 4, generator=g, dtype=torch.float64)
    models = []
    for _ in range(2):
        torch.manual_seed(5)
        models.append(manualbp.MLP(7, [6, 5], 4, activation="tanh", dtype=torch.float64))
    cpp, python = (FusedTrainer(m, "cross_entropy", lr=0.2, **optim) for m in models)
    # soft targets whose rows need not sum to 1; 3 epochs: the momentum buffers start, then carry over
    for a, b in zip(_epochs(cpp, x, soft, 16, 3, monkeypatch, "require"), _epochs(python, x, soft, 16, 3, monkeypatch, "off")):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(cpp.blocks, python.blocks))
    assert all(torch.equal(a, b) for a, b in zip(cpp.last_grads, python.last_grads))
    if optim.get("momentum"):
        assert all(torch.equal(a, b) for a, b in zip(cpp.momentum_buffers, python.momentum_buffers))
    else:
        assert cpp.momentum_buffers is None and python.momentum_buffers is None
    if optim.get("optimizer"):  # Adam's moments and step count come back from C++ as Python's
        assert cpp.adam_state.step == python.adam_state.step == 9
        for a, b in zip(cpp.adam_state.exp_avg + cpp.adam_state.exp_avg_sq, python.adam_state.exp_avg + python.adam_state.exp_avg_sq):
            assert torch.equal(a, b)
    # the optimizer state carries over between the loops: an epoch in C++ after Python's equals Python's
    python.load_state_dict(cpp.state_dict())  # the same start for both again
    mixed = _epochs(python, x, soft, 16, 1, monkeypatch, "off") + _epochs(python, x, soft, 16, 1, monkeypatch, "require")
    pure = _epochs(cpp, x, soft, 16, 2, monkeypatch, "off")
    assert all(torch.equal(a, b) for a, b in zip(mixed, pure))
    assert all(torch.equal(a, b) for a, b in zip(cpp.blocks, python.blocks))


def test_a_killed_builds_lock_is_removed_and_a_live_one_kept(monkeypatch, tmp_path):
    import os

    from torch.utils import cpp_extension

    loaded = []
    monkeypatch.setattr(cpp_extension, "load", lambda name, sources, **kw: loaded.append(kw["build_directory"]) or "module")
    monkeypatch.setenv("MANUALBP_NATIVE_DIR", str(tmp_path))
    lock = tmp_path / "lock"
    lock.write_text("")
    assert native._build(verbose=False) == "module" and lock.exists()  # a build in progress elsewhere: wait for it
    old = lock.stat().st_mtime - native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="removing a stale build lock"):
        native._build(verbose=False)
    assert not lock.exists() and loaded == [str(tmp_path)] * 2


# --------------------------------------------------------------------------------------------------
# The compiled autograd nodes of csrc/module.cpp against the Python Functions
# --------------------------------------------------------------------------------------------------
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


@compiled_nodes
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


@compiled_nodes
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


@compiled_nodes
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


@compiled_nodes
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


@compiled_nodes
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


@compiled_nodes
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


@compiled_nodes
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


@compiled_nodes
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


@compiled_nodes
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


@compiled_nodes
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


@compiled_nodes
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


@compiled_nodes
def test_switching_at_runtime(monkeypatch):
    model = _model()
    x = torch.randn(3, 6, dtype=torch.float64)
    assert MLP_NODE in model(x).grad_fn.name()
    with python_path(monkeypatch):
        assert model(x).grad_fn.name() == "MLPFunctionBackward"
    assert MLP_NODE in model(x).grad_fn.name()


@compiled_nodes
def test_soft_targets_stay_on_the_python_function():
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    target = torch.softmax(torch.randn(4, 3, dtype=torch.float64), -1)
    assert manualbp.CrossEntropyLoss()(logits, target).grad_fn.name() == "CrossEntropyFunctionBackward"


@compiled_nodes
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


@compiled_nodes
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
