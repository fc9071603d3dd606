"""manualbp.verify and manualbp.testing, each checked against values computed another way.

Here: compare, trace and the report rows; devices and the default matrix (slow); manualbp.verify's own modules,
whose imports flow one way; the bug catalogue and the mutation matrix; ``manualbp.testing.assert_gradients_match``
and ``manualbp.verify.finite_difference_check`` on correct Functions and on deliberately wrong ones.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as TF
from helpers import README, native_loss
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import manualbp
from manualbp import autograd as A
from manualbp import verify as V
from manualbp.testing import assert_gradients_match

D = torch.float64


class _BrokenSigmoidFunction(torch.autograd.Function):
    """A deliberately wrong custom Function: the backward forgets sigmoid's a (1 - a) factor."""

    @staticmethod
    def forward(ctx, z):
        return torch.sigmoid(z)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output  # BUG: missing a (1 - a)


class BrokenSigmoid(nn.Module):
    def forward(self, z):
        return _BrokenSigmoidFunction.apply(z)


def _batch(loss, n=6, in_features=4, out_features=3, dtype=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g, dtype=dtype)
    if loss == "cross_entropy":
        y = torch.randint(0, out_features, (n,), generator=g)
    else:
        y = torch.randn(n, out_features, generator=g, dtype=dtype)
    return x, y


def _independent_grads(module, x, y, loss_fn):
    """Gradients by plain .backward() on leaves: the reference computed another way than verify's."""
    module.zero_grad()
    x = x.clone().requires_grad_(True)
    out = module(x)
    L = loss_fn(out, y)
    L.backward()
    return L.detach(), out.detach(), [p.grad.clone() for p in module.parameters()], x.grad.clone()


@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error", "mse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compare_rows_match_independent_errors(loss, dtype):
    torch.manual_seed(1)
    model = manualbp.MLP(4, [5, 5], 3, activation="tanh", dtype=dtype)
    x, y = _batch(loss, dtype=dtype)
    report = V.compare(model, x, y, loss)
    twin = model.to_torch()
    mm = _independent_grads(
        model,
        x,
        y,
        {
            "cross_entropy": manualbp.CrossEntropyLoss(),
            "squared_error": manualbp.SquaredErrorLoss(),
            "mse": manualbp.MSELoss(),
        }[loss],
    )
    r = _independent_grads(twin, x, y, lambda o, t: native_loss(loss, o, t, "mean"))
    names = ["L", "o", "dL/dW^1", "dL/db^1", "dL/dW^2", "dL/db^2", "dL/dW^3", "dL/db^3", "dL/dx"]
    assert [row.name for row in report] == names
    manual = [mm[0], mm[1], *mm[2], mm[3]]
    native = [r[0], r[1], *r[2], r[3]]
    rtol, atol = {torch.float64: (1e-7, 1e-7), torch.float32: (1.3e-6, 1e-5)}[dtype]
    assert (report.rtol, report.atol) == (rtol, atol)
    for row, a, e in zip(report, manual, native):
        diff = (a.double() - e.double()).abs()
        assert row.shape == tuple(e.shape)
        assert row.max_abs_err == pytest.approx(diff.max().item(), rel=1e-12, abs=0)
        scale = e.double().abs().max().item()
        assert row.max_rel_err == pytest.approx(diff.max().item() / scale, rel=1e-12, abs=0)
        assert row.exact == torch.equal(a, e)
        assert row.ok == torch.allclose(a.double(), e.double(), rtol=rtol, atol=atol)
        assert row.ok
    assert report.ok
    assert report.max_abs_err == max(row.max_abs_err for row in report)
    assert model.linears[0].weight.grad is not None  # set above by the independent run only
    assert report.meta["loss"] == loss and report.meta["dtype"] == dtype


def test_compare_leaves_grad_untouched():
    model = manualbp.MLP(4, [5], 3, dtype=D)
    x, y = _batch("cross_entropy")
    V.compare(model, x, y)
    assert all(p.grad is None for p in model.parameters())


def test_compare_reference_with_other_weights_fails():
    torch.manual_seed(0)
    model = manualbp.MLP(4, [5], 3, dtype=D)
    other = manualbp.MLP(4, [5], 3, dtype=D).to_torch()  # same architecture, different weights
    x, y = _batch("cross_entropy")
    report = V.compare(model, x, y, reference=other)
    assert not report.ok
    assert not report["o"].ok and not report["L"].ok
    assert report["o"].max_abs_err == pytest.approx((model(x) - other(x)).abs().max().item())


def test_compare_catches_a_broken_custom_function_in_the_reference():
    torch.manual_seed(0)
    model = manualbp.MLP(4, [5], 3, dtype=D)
    broken = nn.Sequential(nn.Linear(4, 5, dtype=D), BrokenSigmoid(), nn.Linear(5, 3, dtype=D))
    broken.load_state_dict(model.state_dict())
    x, y = _batch("cross_entropy")
    report = V.compare(model, x, y, reference=broken)
    assert not report.ok
    # The bug sits below layer 2: forward and layer 2's gradients agree, everything under the sigmoid does not.
    assert {r.name for r in report.failures()} == {"dL/dW^1", "dL/db^1", "dL/dx"}
    for name in ("L", "o", "dL/dW^2", "dL/db^2"):
        assert report[name].ok and report[name].max_abs_err < 1e-12
    text = str(report)
    assert "FAIL (3 of 7 quantities differ)" in text


def test_compare_callable_loss_and_reduction():
    torch.manual_seed(0)
    model = manualbp.MLP(4, [5], 3, dtype=D)
    x, y = _batch("squared_error")

    def huber(o, t):
        return TF.huber_loss(o, t)

    assert V.compare(model, x, y, huber).ok
    assert V.compare(model, x, y, "squared_error", reduction="sum").ok
    xc, yc = _batch("cross_entropy")
    none = V.compare(model, xc, yc, "cross_entropy", reduction="none")
    assert none.ok and none["L"].shape == (6,)


def test_compare_bad_arguments():
    model = manualbp.MLP(4, [5], 3, dtype=D)
    x, y = _batch("cross_entropy")
    with pytest.raises(ValueError, match=r"loss must be one of .*'cross_entropy'.*got 'hinge'"):
        V.compare(model, x, y, "hinge")
    with pytest.raises(ValueError, match="reduction must be one of"):
        V.compare(model, x, y, reduction="avg")
    with pytest.raises(TypeError, match="reference: Sequential has no to_torch"):
        V.compare(model.to_torch(), x, y)
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        V.compare(model, [1.0], y)
    with pytest.raises(ValueError, match="reference: its parameters do not match"):
        V.compare(model, x, y, reference=nn.Sequential(nn.Linear(4, 3, dtype=D)))


def test_compare_pairs_parameters_by_order_when_names_differ():
    torch.manual_seed(0)
    model = manualbp.MLP(4, [5], 3, dtype=D)
    seq = model.to_torch()
    renamed = nn.Sequential()
    renamed.add_module("first", seq[0])
    renamed.add_module("act", seq[1])
    renamed.add_module("last", seq[2])
    x, y = _batch("cross_entropy")
    assert V.compare(model, x, y, reference=renamed).ok


def test_compare_tensors_rules():
    a = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    row = V.compare_tensors("q", a, a.clone())
    assert row.exact and row.ok and row.max_abs_err == 0 and row.max_rel_err == 0
    shifted = a + torch.tensor([0.0, 0.0, 0.03], dtype=D)
    row = V.compare_tensors("q", shifted, a, rtol=0.0, atol=0.01)
    assert not row.ok and row.max_abs_err == pytest.approx(0.03) and row.max_rel_err == pytest.approx(0.01)
    assert V.compare_tensors("q", shifted, a, rtol=0.01, atol=0.0).ok  # 0.03 <= 0.01 * 3
    row = V.compare_tensors("q", a.reshape(3, 1), a)
    assert (
        not row.ok and not row.compared and math.isnan(row.max_abs_err) and "shape (3, 1) vs reference (3,)" in row.note
    )
    row = V.compare_tensors("q", None, a)
    assert not row.ok and "no gradient from the manual side" in row.note
    assert V.compare_tensors("q", None, torch.zeros(3)).ok
    nan = V.compare_tensors("q", torch.tensor([math.nan]), torch.tensor([1.0]))
    assert not nan.ok and math.isnan(nan.max_abs_err)
    assert V.default_tolerances(torch.float32, torch.float64) == (1.3e-6, 1e-5)
    assert V.default_tolerances(torch.int64) == (0.0, 0.0)


@pytest.mark.parametrize("seed", range(5))
def test_compare_tensors_ok_agrees_with_assert_close(seed):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(50, generator=g)
    a = e + torch.randn(50, generator=g) * 10.0 ** -(seed + 3)
    try:
        torch.testing.assert_close(a, e)
        expected = True
    except AssertionError:
        expected = False
    assert V.compare_tensors("q", a, e).ok == expected


def test_report_rendering_and_json():
    torch.manual_seed(0)
    model = manualbp.MLP(4, [5], 3, dtype=D)
    x, y = _batch("cross_entropy")
    report = V.compare(model, x, y)
    lines = str(report).splitlines()
    header = lines[1]
    assert header.split() == ["quantity", "shape", "max", "abs", "err", "max", "rel", "err", "exact", "ok"]
    col = header.index("exact")
    assert all(line[col:].split()[0] in ("yes", "no") for line in lines[3:-1])  # aligned column
    assert lines[-1].startswith("PASS: largest abs err")
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ok"] is True and [r["name"] for r in d["rows"]] == [r.name for r in report]
    assert d["rows"][2]["max_abs_err"] == report.rows[2].max_abs_err
    assert d["meta"]["dtype"] == "torch.float64"
    with pytest.raises(KeyError, match=r"no row named 'dL/dW\^9'"):
        report["dL/dW^9"]


# --------------------------------------------------------------------------------------------------
# trace
# --------------------------------------------------------------------------------------------------
def test_trace_values_are_the_notes_formulas():
    """One hidden layer, the notes' network: every traced value against a numpy-free hand computation."""
    torch.manual_seed(3)
    model = manualbp.MLP(2, [3], 2, activation="sigmoid", dtype=D)
    x = torch.tensor([[0.5, -1.0]], dtype=D)
    y = torch.tensor([[1.0, 0.0]], dtype=D)
    report = V.trace(model, x, y, loss="squared_error")
    W1, b1 = model.linears[0].weight.detach(), model.linears[0].bias.detach()
    W2, b2 = model.linears[1].weight.detach(), model.linears[1].bias.detach()
    xs, ys = x[0].tolist(), y[0].tolist()
    z = [sum(W1[i, j].item() * xs[j] for j in range(2)) + b1[i].item() for i in range(3)]
    a = [1 / (1 + math.exp(-zi)) for zi in z]
    o = [sum(W2[k, i].item() * a[i] for i in range(3)) + b2[k].item() for k in range(2)]
    L = 0.5 * sum((o[k] - ys[k]) ** 2 for k in range(2))
    do = [o[k] - ys[k] for k in range(2)]
    dw2 = [[do[k] * a[i] for i in range(3)] for k in range(2)]
    da = [sum(do[k] * W2[k, i].item() for k in range(2)) for i in range(3)]
    dz = [da[i] * a[i] * (1 - a[i]) for i in range(3)]
    dw1 = [[dz[i] * xs[j] for j in range(2)] for i in range(3)]
    expected = {
        "z^1": [z],
        "a^1": [a],
        "o": [o],
        "L": L,
        "dL/dL": 1.0,
        "dL/do": [do],
        "dL/dW^2": dw2,
        "dL/db^2": do,
        "dL/da^1": [da],
        "dL/dz^1": [dz],
        "dL/dW^1": dw1,
        "dL/db^1": dz,
    }
    names = [
        "z^1",
        "a^1",
        "o",
        "L",
        "dL/dL",
        "dL/do",
        "dL/dW^2",
        "dL/db^2",
        "dL/da^1",
        "dL/dz^1",
        "dL/dW^1",
        "dL/db^1",
        "dL/dx",
    ]
    assert [r.name for r in report] == names
    for name, value in expected.items():
        row = report[name]
        want = torch.tensor(value, dtype=D)
        torch.testing.assert_close(row.value, want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(row.reference, want, rtol=1e-12, atol=1e-14)
        assert row.ok
    assert report["dL/dz^1"].formula == "dL/da^1 * a (1 - a)"
    assert report["dL/do"].formula.startswith("o - y")
    assert report.ok


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "leaky_relu", "identity"])
@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error", "mse"])
def test_trace_agrees_for_every_activation_and_loss(activation, loss):
    torch.manual_seed(0)
    model = manualbp.MLP(4, [5, 4], 3, activation=activation, dtype=D)
    x, y = _batch(loss)
    report = V.trace(model, x, y, loss)
    assert report.ok, str(report)
    expected = ["z^1", "a^1", "z^2", "a^2", "o", "L", "dL/dL", "dL/do", "dL/dW^3", "dL/db^3", "dL/da^2", "dL/dz^2"]
    expected += ["dL/dW^2", "dL/db^2", "dL/da^1", "dL/dz^1", "dL/dW^1", "dL/db^1", "dL/dx"]
    assert [r.name for r in report] == expected
    # the trace's parameter gradients are the module's own (MLPFunction) to the last bit
    loss_module = {
        "cross_entropy": manualbp.CrossEntropyLoss(),
        "squared_error": manualbp.SquaredErrorLoss(),
        "mse": manualbp.MSELoss(),
    }[loss]
    loss_module(model(x), y).backward()
    for k, lin in enumerate(model.linears, start=1):
        assert torch.equal(report[f"dL/dW^{k}"].value, lin.weight.grad)
        assert torch.equal(report[f"dL/db^{k}"].value, lin.bias.grad)


def test_trace_batch_shapes_reductions_and_callable_loss():
    torch.manual_seed(0)
    model = manualbp.MLP(4, [5], 3, bias=False, dtype=D)
    x = torch.randn(2, 3, 4, dtype=D)
    y = torch.randint(0, 3, (2, 3))
    report = V.trace(model, x, y, "cross_entropy", reduction="sum")
    assert report.ok and report["z^1"].shape == (6, 5) and "dL/db^1" not in [r.name for r in report]
    assert V.trace(model, x, y, "cross_entropy", reduction="none").ok
    yr = torch.randn(2, 3, 3, dtype=D)
    r = V.trace(model, x, yr, lambda o, t: ((o - t).abs() ** 3).mean())
    assert r.ok and r["dL/do"].formula == "autograd of the given loss"


def test_trace_bad_arguments():
    with pytest.raises(TypeError, match="model must be a manualbp.MLP, got Sequential"):
        V.trace(nn.Sequential(nn.Linear(2, 2)), torch.randn(1, 2), torch.randn(1, 2))
    model = manualbp.MLP(4, [5], 3)
    with pytest.raises(ValueError, match=r"input: expected shape \(\*, 4\)"):
        V.trace(model, torch.randn(2, 5), torch.randint(0, 3, (2,)))
    with pytest.raises(ValueError, match="target: class index 7 is out of range"):
        V.trace(model, torch.randn(2, 4), torch.tensor([0, 7]))


def test_trace_localizes_an_injected_bug():
    """With sigmoid's derivative missing, the first backward row that fails is dL/dz^1, not dL/da^1."""
    torch.manual_seed(0)
    model = manualbp.MLP(4, [5], 3, activation="sigmoid", dtype=D)
    x, y = _batch("squared_error")
    with V.inject_bug("sigmoid_missing_derivative"):
        report = V.trace(model, x, y, "squared_error")
    assert [r.name for r in report.failures()] == ["dL/dz^1", "dL/dW^1", "dL/db^1", "dL/dx"]
    assert report["dL/da^1"].ok
    assert V.trace(model, x, y, "squared_error").ok  # restored on exit
    with V.inject_bug("weight_grad_transposed"):
        report = V.trace(model, x, y, "squared_error")
    assert [r.name for r in report.failures()] == ["dL/dW^2", "dL/dW^1"]
    with pytest.raises(ValueError, match="bug must be one of"):
        with V.inject_bug("nope"):
            pass


# --------------------------------------------------------------------------------------------------
# Devices, and the whole default matrix (slow)
# --------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compare_and_trace_on_cuda(dtype):
    torch.manual_seed(0)
    model = manualbp.MLP(4, [5, 5], 3, activation="tanh", dtype=dtype, device="cuda")
    x, y = _batch("cross_entropy", dtype=dtype)
    x, y = x.cuda(), y.cuda()
    report = V.compare(model, x, y)
    assert report.ok and report.meta["device"].type == "cuda", str(report)
    assert V.trace(model, x, y).ok
    result = V.verify_matrix(["sigmoid"], ["mse"], [1], ["float64", "float32", "float16"], ["cuda"])
    assert result.ok, str(result)


@pytest.mark.slow
def test_default_matrix_passes():
    result = V.verify_matrix()
    assert result.ok, str(result)
    assert len(result.results) == 5 * 3 * 2 * 2 * len(V.available_devices())
    worst = max(r.max_rel_err for c in result.results for r in c.autograd_rows if c.dtype == "float64")
    assert worst < 1e-13


def test_readme_verify_example_runs(capsys):
    import re

    text = README.read_text()
    block = re.search(r"<!-- verify-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its Verify example"
    exec(compile(block.group(1), "README.md", "exec"), {})
    assert "dL/dz^1" in capsys.readouterr().out


def test_compare_skips_frozen_parameters():
    torch.manual_seed(0)
    model = manualbp.MLP(4, [5], 3, dtype=D)
    model.linears[0].weight.requires_grad_(False)
    x, y = _batch("cross_entropy")
    report = V.compare(model, x, y)
    assert report.ok and "dL/dW^1" not in [r.name for r in report] and "dL/db^1" in [r.name for r in report]


@settings(max_examples=15)
@given(
    widths=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    activation=st.sampled_from(["sigmoid", "tanh", "relu", "leaky_relu", "identity"]),
    loss=st.sampled_from(["cross_entropy", "squared_error", "mse"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    batch=st.integers(1, 5),
    bias=st.booleans(),
)
def test_property_compare_and_trace_agree_in_float64(widths, activation, loss, reduction, batch, bias):
    torch.manual_seed(0)
    model = manualbp.MLP(widths[0], widths[1:-1], widths[-1], activation=activation, bias=bias, dtype=D)
    x, y = _batch(loss, n=batch, in_features=widths[0], out_features=widths[-1])
    report = V.compare(model, x, y, loss, reduction=reduction)
    assert report.ok, str(report)
    assert report.max_rel_err < 1e-12
    tr = V.trace(model, x, y, loss, reduction=reduction)
    assert tr.ok, str(tr)
    assert len(tr) == 2 * (len(widths) - 2) + 4 + (1 + bias) * (len(widths) - 1) + 2 * (len(widths) - 2) + 1


# The package, one module per idea; a module may import only those before it (imports flow one way).
VERIFY_MODULES = [
    "reports",
    "references",
    "comparison",
    "tracing",
    "finite_differences",
    "bugs",
    "matrix",
    "mutation",
    "explanation",
    "conformance",
    "intermediates",
]

_IMPORT_ALONE = """
import importlib, json, sys, types
sys.path.insert(0, {root!r})
import manualbp
loaded = {{}}
for name in {modules!r}:
    for key in [k for k in sys.modules if k == "manualbp.verify" or k.startswith("manualbp.verify.")]:
        del sys.modules[key]
    stub = types.ModuleType("manualbp.verify")  # the package without its __init__: the module's own imports only
    stub.__path__ = [{package!r}]
    sys.modules["manualbp.verify"] = stub
    module = importlib.import_module("manualbp.verify." + name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, (name, missing)
    loaded[name] = sorted(k.rsplit(".", 1)[1] for k in sys.modules if k.startswith("manualbp.verify."))
print(json.dumps(loaded))
"""


def test_each_verify_module_imports_alone_and_only_what_comes_before_it():
    """In a fresh interpreter, each submodule loaded without the package's __init__: no cycle, its __all__
    resolves, and it pulls in only the modules before it in VERIFY_MODULES."""
    import pathlib
    import subprocess
    import sys

    package = pathlib.Path(V.__file__).resolve().parent
    on_disk = sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")
    assert on_disk == sorted(VERIFY_MODULES)
    code = _IMPORT_ALONE.format(root=str(package.parent.parent), package=str(package), modules=VERIFY_MODULES)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    for k, name in enumerate(VERIFY_MODULES):
        assert name in loaded[name]
        assert set(loaded[name]) <= set(VERIFY_MODULES[: k + 1]), (name, loaded[name])


def test_verify_modules_import_one_way_even_inside_functions():
    """Every ``from .x import`` (module level or inside a function) names a module before its own."""
    import ast
    import pathlib

    package = pathlib.Path(V.__file__).resolve().parent
    for k, name in enumerate(VERIFY_MODULES):
        tree = ast.parse((package / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module in VERIFY_MODULES[:k], f"{name} imports from .{node.module or ''}"


def test_verify_all_resolves_and_names_the_submodules_api():
    for name in V.__all__:
        assert getattr(V, name) is not None, name
    assert len(set(V.__all__)) == len(V.__all__)
    import importlib

    exported = set(V.__all__)
    for module_name in VERIFY_MODULES:
        module = importlib.import_module(f"manualbp.verify.{module_name}")
        for name in module.__all__:
            if name in exported:
                assert getattr(V, name) is getattr(module, name), (module_name, name)
    # the functions, not the submodules of (nearly) the same name
    assert callable(V.compare) and callable(V.trace) and callable(V.explain)


# --------------------------------------------------------------------------------------------------
# The bug catalogue and the mutation matrix
# --------------------------------------------------------------------------------------------------
from manualbp.verify import mutation as M  # noqa: E402

_MODULE_BUGS = [name for name, bug in V.CATALOGUE.items() if bug.reach("module") is None]


def _native() -> bool:
    """Whether the compiled paths can be checked here (the extension builds and MANUALBP_NATIVE is not off)."""
    return M._native_not_run() is None


def test_the_catalogue_covers_every_formula():
    assert len(V.CATALOGUE) >= 20 and set(V.BUGS) == set(V.CATALOGUE)
    settings = [bug.setting for bug in V.CATALOGUE.values()]
    assert {s["activation"] for s in settings if "activation" in s} == set(manualbp.functional.ACTIVATIONS)
    assert {"cross_entropy", "mse", "squared_error", "softmax"} <= {s["loss"] for s in settings if "loss" in s}
    assert {"momentum", "nesterov", "weight_decay", "adam"} <= {s["optim"] for s in settings if "optim" in s}
    for bug in V.CATALOGUE.values():
        assert bug.formula and bug.description
        # a compiled path runs the formulas of its Python twin: n/a on one exactly where n/a on the other
        assert bug.reach("module-native") == bug.reach("module")
        assert bug.reach("fused-native") == bug.reach("fused")


@pytest.mark.parametrize("name", _MODULE_BUGS)
def test_each_bug_breaks_its_formula_on_the_module_and_is_caught(name):
    """Not a no-op: with the bug the module's check (compare, trace, the per-op Functions) fails; without it
    (the same setting, before and after the block) it passes."""
    setting = M._setting(V.CATALOGUE[name])
    assert M._check_module(setting)
    with V.inject_bug(name):
        assert not M._check_module(setting)
    assert M._check_module(setting)  # restored on exit


@pytest.mark.parametrize("name", sorted(set(V.CATALOGUE) - set(_MODULE_BUGS)))
def test_each_optimizer_bug_is_caught_on_the_fused_python_path(name):
    setting = M._setting(V.CATALOGUE[name])
    with V.inject_bug(name):
        assert not M._check_fused(setting)
    assert M._check_fused(setting)


def test_inject_bug_restores_every_patched_copy_and_leaves_the_native_switch_alone(monkeypatch):
    from manualbp import optim_steps
    from manualbp.fast import _losses, fused

    monkeypatch.delenv("MANUALBP_NATIVE", raising=False)
    from manualbp import registry

    tables = [dict(registry.ACTIVATION_REGISTRY), dict(registry.LOSS_REGISTRY), dict(_losses.LOSSES)]
    functions = [manualbp.functional.linear_backward, fused.loss_scales, fused.block_grad_into]
    steps = ["weight_decayed", "momentum_update_", "nesterov_direction", "bias_corrections"]
    methods = [getattr(optim_steps, name) for name in steps]
    for name in V.CATALOGUE:
        with V.inject_bug(name):
            assert "MANUALBP_NATIVE" not in __import__("os").environ
            assert manualbp.native._bug[0] == name  # the extension's switch (tests/native/test_native_bugs.py)
    assert manualbp.native._bug[0] is None
    assert tables == [dict(registry.ACTIVATION_REGISTRY), dict(registry.LOSS_REGISTRY), dict(_losses.LOSSES)]
    assert functions == [manualbp.functional.linear_backward, fused.loss_scales, fused.block_grad_into]
    assert methods == [getattr(optim_steps, name) for name in steps]


def test_mutation_matrix_on_a_subset_and_its_errors():
    result = V.mutation_matrix(["tanh_derivative_plus", "momentum_not_decayed"], ["module", "fused", "fused-native"])
    assert result.ok
    assert result.cells[("tanh_derivative_plus", "module")] == "caught"
    assert result.cells[("momentum_not_decayed", "module")].startswith("n/a")
    assert result.cells[("momentum_not_decayed", "fused")] == "caught"
    native_cell = result.cells[("tanh_derivative_plus", "fused-native")]
    assert native_cell == "caught" if _native() else native_cell.startswith("not run")
    text = str(result)
    assert "2 of 2" in text and text.endswith("every path")
    with pytest.raises(ValueError, match="not in the catalogue"):
        V.mutation_matrix(["nope"])
    with pytest.raises(ValueError, match="paths"):
        V.mutation_matrix(paths=["gpu"])


def test_mutation_matrix_says_not_run_where_the_extension_cannot_be_built(monkeypatch):
    monkeypatch.setattr(manualbp.native, "_built", lambda: (None, OSError("no compiler here")))
    monkeypatch.setattr(manualbp.native, "_last", [object(), None])  # forget the answers remembered per setting
    result = V.mutation_matrix(["tanh_derivative_plus"], ["module", "module-native", "fused-native"])
    assert result.ok and result.reached("module") == ["tanh_derivative_plus"]
    for path in ("module-native", "fused-native"):
        assert result.reached(path) == []
        assert result.cells[("tanh_derivative_plus", path)].startswith("not run: the C++ extension could not be built")
    assert "no compiler here" in str(result)
    monkeypatch.setenv("MANUALBP_NATIVE", "off")
    result = V.mutation_matrix(["tanh_derivative_plus"], ["fused-native"])
    assert result.cells[("tanh_derivative_plus", "fused-native")] == (
        "not run: MANUALBP_NATIVE=off (the compiled paths were switched off)"
    )


def test_mutation_matrix_reports_a_missed_bug(monkeypatch):
    monkeypatch.setitem(M.__dict__, "inject_bug", lambda name: V.inject_bug(None))  # every bug a no-op
    result = V.mutation_matrix(["relu_derivative_ones"], ["module"])
    assert not result.ok and result.missed() == [("relu_derivative_ones", "module")]
    assert "MISSED relu_derivative_ones on module" in str(result)


def test_mutation_matrix_fails_loudly_when_the_baseline_fails(monkeypatch):
    monkeypatch.setattr(M, "_check_module", lambda setting: False)
    with pytest.raises(RuntimeError, match="fails without any bug"):
        V.mutation_matrix(["relu_derivative_ones"], ["module"])


@pytest.mark.slow
def test_the_mutation_matrix_catches_every_reached_bug_on_every_path():
    result = V.mutation_matrix()
    assert result.ok, str(result)
    for path in ("module", "fused", "vectorized", "vectorized-sgd"):
        assert result.reached(path)
        assert result.caught(path) == result.reached(path)
    for path in ("module-native", "fused-native"):  # the compiled paths, where the extension is built
        assert result.caught(path) == result.reached(path)
        twin = path.removesuffix("-native")
        assert result.reached(path) == (result.reached(twin) if _native() else []), str(result)


# --------------------------------------------------------------------------------------------------
# manualbp.testing.assert_gradients_match and manualbp.verify.finite_difference_check: more wrong Functions
# (and _BrokenSigmoidFunction above) for them to catch
# --------------------------------------------------------------------------------------------------
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
        assert_gradients_match(_BrokenSigmoidFunction.apply, torch.sigmoid, x)
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
