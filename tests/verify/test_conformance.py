"""check_function: every property row catches the defect it names, and correct Functions pass every row.

The held-out defects: wrong math for a non-trivial cotangent only, gradients for inputs that do not need
them (and work spent on them), a tensor kept on ctx, a returned view of an input, an in-place change
without mark_dirty, a wrong vmap rule, breaking on a zero-size batch, computing in float32, a backward that
detaches. Each is reported by the row that names it.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import README
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from manualbp.verify import CHECKS, check_function

NO_COMPILE = ["torch.compile"]  # a few seconds each; the compile row has its own tests below


# ---------------------------------------------------------------- correct Functions (PyTorch docs' examples)
class LinearFunction(Function):
    """The PyTorch documentation's LinearFunction, forward + setup_context style."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias):
        output = input.mm(weight.t())
        if bias is not None:
            output += bias.unsqueeze(0).expand_as(output)
        return output

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias = inputs
        ctx.save_for_backward(input, weight, bias)
        ctx.save_for_forward(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad_output.mm(weight)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_output.t().mm(input)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_output.sum(0)
        return grad_input, grad_weight, grad_bias

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t):
        input, weight, _ = ctx.saved_tensors
        out = torch.zeros(input.shape[0], weight.shape[0], dtype=input.dtype, device=input.device)
        if input_t is not None:
            out = out + input_t.mm(weight.t())
        if weight_t is not None:
            out = out + input.mm(weight_t.t())
        if bias_t is not None:
            out = out + bias_t
        return out


class Exp(Function):
    """The PyTorch documentation's Exp (old style: forward takes ctx)."""

    @staticmethod
    def forward(ctx, i):
        result = i.exp()
        ctx.save_for_backward(result)
        return result

    @staticmethod
    def backward(ctx, grad_output):
        (result,) = ctx.saved_tensors
        return grad_output * result


class Softmax(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(z):
        return torch.softmax(z, dim=-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        return s * (g - (g * s).sum(-1, keepdim=True))


class MaxNorm(Function):
    """x / max |x|: correct, and needs a non-empty input by nature of the max (see the zero-size defect)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        flat = x.reshape(-1)
        if flat.numel() == 0:
            return x.clone()
        return x / flat.abs().max()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        flat = x.reshape(-1)
        if flat.numel() == 0:
            return g.clone()
        m = flat.abs().argmax()
        c = flat[m].abs()
        grad = g / c
        correction = torch.zeros_like(flat).index_fill(0, m.reshape(1), 1.0) * flat[m].sign() * (g * x).sum() / c**2
        return grad - correction.reshape(x.shape)


# ---------------------------------------------------------------- defective variants
class SoftmaxRightForOnes(Softmax):
    """Right for an all-ones cotangent (both sides are 0), wrong for any other."""

    @staticmethod
    def backward(ctx, g):
        (s,) = ctx.saved_tensors
        return s * (g - g.mean(-1, keepdim=True))


class LinearAllGrads(LinearFunction):
    """Ignores needs_input_grad: returns every gradient."""

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias = ctx.saved_tensors
        return grad_output.mm(weight), grad_output.t().mm(input), grad_output.sum(0)


class LinearWastes(LinearFunction):
    """Returns None where not needed, but computes every gradient anyway."""

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, bias = ctx.saved_tensors
        grads = grad_output.mm(weight), grad_output.t().mm(input), grad_output.sum(0)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


class ExpOnCtx(Function):
    """Keeps its result as a ctx attribute instead of save_for_backward."""

    @staticmethod
    def forward(ctx, i):
        ctx.result = i.exp()
        return ctx.result

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output * ctx.result


class Flatten(Function):
    """Returns a view of its input."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.reshape(-1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shape = inputs[0].shape

    @staticmethod
    def backward(ctx, g):
        return g.reshape(ctx.shape)


class DoubleInPlaceUnmarked(Function):
    """Doubles its input in place without mark_dirty."""

    @staticmethod
    def forward(ctx, x):
        x.mul_(2)
        return x * 1

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class DoubleInPlace(Function):
    """Doubles its input in place, marked dirty: correct."""

    @staticmethod
    def forward(ctx, x):
        ctx.mark_dirty(x)
        return x.mul_(2)

    @staticmethod
    def backward(ctx, g):
        return 2 * g


class SquareWrongVmap(Function):
    """Its vmap rule claims the batch dimension is 1 where it is where the input's was."""

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g

    @staticmethod
    def vmap(info, in_dims, x):
        return SquareWrongVmap.apply(x), 1


class SquareNoVmap(SquareWrongVmap):
    vmap = Function.vmap


class MaxNormNoEmpty(MaxNorm):
    """MaxNorm without its guard for an empty input."""

    @staticmethod
    def forward(x):
        return x / x.reshape(-1).abs().amax()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        flat = x.reshape(-1)
        m = flat.abs().argmax()
        c = flat[m].abs()
        correction = torch.zeros_like(flat).index_fill(0, m.reshape(1), 1.0) * flat[m].sign() * (g * x).sum() / c**2
        return g / c - correction.reshape(x.shape)


class ExpFloat32(Function):
    """Computes in float32 whatever the input's dtype."""

    @staticmethod
    def forward(ctx, i):
        result = i.float().exp().to(i.dtype)
        ctx.save_for_backward(result)
        return result

    @staticmethod
    def backward(ctx, grad_output):
        (result,) = ctx.saved_tensors
        return (grad_output.float() * result.float()).to(grad_output.dtype)


class ExpDetached(Exp):
    """A backward that detaches: first order right, no second order."""

    @staticmethod
    def backward(ctx, grad_output):
        (result,) = ctx.saved_tensors
        return grad_output * result.detach()


class ExpOnce(Exp):
    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (result,) = ctx.saved_tensors
        return grad_output * result


class SortWithIndices(Function):
    """Two outputs, the indices marked non-differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        values, indices = torch.sort(x, dim=-1)
        return values, indices

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx, g_values, g_indices):
        (indices,) = ctx.saved_tensors
        return torch.zeros_like(g_values).scatter(-1, indices, g_values)


def _x(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)


def _linear_inputs():
    return _x(5, 3), _x(4, 3, seed=1), _x(4, seed=2)


def _failed(report):
    return {r.name for r in report if r.status == "fail"}


# ---------------------------------------------------------------- the correct versions pass every row
@pytest.mark.parametrize(
    "fn, inputs",
    [
        (LinearFunction, _linear_inputs),
        (Exp, lambda: (_x(5, 3),)),
        (Softmax, lambda: (_x(5, 4),)),
        (MaxNorm, lambda: (_x(5, 3),)),
        (DoubleInPlace, lambda: (_x(5, 3),)),
        (SortWithIndices, lambda: (_x(5, 4),)),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_correct_functions_pass_every_row(fn, inputs):
    report = check_function(fn, *inputs(), skip=NO_COMPILE)
    assert report.ok, str(report)
    assert list(CHECKS)[:3] == [r.name for r in report][:3]


def test_every_row_of_a_full_function_passes_none_skipped_but_cuda_and_reference():
    report = check_function(LinearFunction, *_linear_inputs())
    skipped = {r.name for r in report if r.status == "skip"}
    assert report.ok and skipped <= {"cuda", "reference", "non-differentiable outputs", "torch.compile"}, str(report)
    assert report["gradcheck"].error < 1e-8 and "largest at d output[" in report["gradcheck"].detail
    assert report["gradgradcheck"].error < 1e-8
    assert report["forward AD (jvp)"].status == "pass"
    assert "custom jvp" in report["torch.compile"].detail  # dynamo's limit, said as such
    without_jvp = type("LinearNoJvp", (LinearFunction,), {"jvp": Function.jvp})
    compiled = check_function(without_jvp, *_linear_inputs(), checks=["runs", "torch.compile"])
    assert compiled["torch.compile"].status == "pass", str(compiled)


# ---------------------------------------------------------------- each defect, by the row that names it
@pytest.mark.parametrize(
    "fn, inputs, row, words",
    [
        (SoftmaxRightForOnes, lambda: (_x(5, 4),), "random cotangents", "<v, J u>"),
        (SoftmaxRightForOnes, lambda: (_x(5, 4),), "gradcheck", "largest at d output["),
        (LinearAllGrads, _linear_inputs, "needs_input_grad", "returned a gradient for"),
        (LinearWastes, _linear_inputs, "needs_input_grad", "FLOPs"),
        (ExpOnCtx, lambda: (_x(5, 3),), "saved tensors", "ctx.result holds a tensor"),
        (Flatten, lambda: (_x(5, 3),), "aliasing", "output aliases input x"),
        (DoubleInPlaceUnmarked, lambda: (_x(5, 3),), "aliasing", "in place without ctx.mark_dirty"),
        (SquareWrongVmap, lambda: (_x(5, 3),), "vmap", "shape"),
        (MaxNormNoEmpty, lambda: (_x(5, 3),), "zero-size batch", "batch of 0"),
        (ExpFloat32, lambda: (_x(5, 3),), "float64 throughout", "torch.float32"),
        (ExpDetached, lambda: (_x(5, 3),), "gradgradcheck", "largest at d grad i["),
    ],
    ids=lambda v: getattr(v, "__name__", v if isinstance(v, str) else ""),
)
def test_each_defect_is_reported_by_its_row(fn, inputs, row, words):
    report = check_function(fn, *inputs(), skip=NO_COMPILE)
    assert not report.ok
    assert report[row].status == "fail", str(report)
    assert words in report[row].detail, report[row].detail
    assert report[row].hint, "a failing row says how to fix it"
    assert report[row].name in str(report) and "how to fix" in str(report)


def test_defects_leave_the_other_rows_alone():
    """A defect fails its own rows, not everything: the report points at the problem."""
    assert _failed(check_function(ExpOnCtx, _x(5, 3), skip=NO_COMPILE)) == {"saved tensors"}
    assert _failed(check_function(LinearAllGrads, *_linear_inputs(), skip=NO_COMPILE)) == {"needs_input_grad"}
    assert _failed(check_function(MaxNormNoEmpty, _x(5, 3), skip=NO_COMPILE)) == {"zero-size batch"}
    assert _failed(check_function(Flatten, _x(5, 3), skip=NO_COMPILE)) == {"aliasing"}
    # float32 arithmetic also spoils central differences in float64, which the cotangent check sees
    assert "float64 throughout" in _failed(check_function(ExpFloat32, _x(5, 3), skip=NO_COMPILE))


def test_skips_say_what_is_missing():
    old_style = check_function(Exp, _x(5, 3), checks=["runs", "vmap", "func.grad", "forward AD (jvp)"])
    assert old_style["vmap"].status == "skip" and "setup_context" in old_style["vmap"].detail
    assert old_style["forward AD (jvp)"].status == "skip" and "defines no jvp" in old_style["forward AD (jvp)"].detail
    no_rule = check_function(SquareNoVmap, _x(5, 3), checks=["runs", "vmap"])
    assert no_rule["vmap"].status == "skip"
    assert "define a vmap staticmethod or set generate_vmap_rule = True" in no_rule["vmap"].detail
    once = check_function(ExpOnce, _x(5, 3), checks=["runs", "gradgradcheck"])
    assert once["gradgradcheck"].status == "skip" and "once_differentiable" in once["gradgradcheck"].detail


def test_a_callable_built_on_functions_is_checked_through_them():
    report = check_function(lambda x, w: Exp.apply(LinearFunction.apply(x, w, None)), _x(5, 3), _x(4, 3, seed=1), skip=NO_COMPILE)
    assert "Exp" in report["runs"].detail and "LinearFunction" in report["runs"].detail
    assert report.ok, str(report)
    bad = check_function(lambda x: ExpOnCtx.apply(x) * 2, _x(5, 3), checks=["runs", "saved tensors"])
    assert bad["saved tensors"].status == "fail"


def test_reference_row():
    good = check_function(Softmax, _x(5, 4), checks=["runs", "reference"], reference=lambda z: torch.softmax(z, -1))
    assert good["reference"].status == "pass" and good["reference"].error < 1e-12
    bad = check_function(Softmax, _x(5, 4), checks=["runs", "reference"], reference=lambda z: torch.softmax(z, 0))
    assert bad["reference"].status == "fail" and "output" in bad["reference"].detail


def test_compile_row_catches_what_dynamo_cannot_trace():
    class ItemScale(Function):
        @staticmethod
        def forward(ctx, x):
            ctx.scale = float(x.detach().abs().max())  # a Python float read from data: a graph break
            return x * ctx.scale

        @staticmethod
        def backward(ctx, g):
            return g * ctx.scale

    report = check_function(ItemScale, _x(5, 3), checks=["runs", "torch.compile"])
    assert report["torch.compile"].status == "fail", str(report)
    assert check_function(Exp, _x(5, 3), checks=["runs", "torch.compile"]).ok


def test_report_formats_json_and_assert_form():
    report = check_function(ExpOnCtx, _x(5, 3), skip=NO_COMPILE)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and [r["property"] for r in data["rows"]] == [r.name for r in report]
    with pytest.raises(AssertionError, match="saved tensors") as info:
        report.raise_if_failed()
    assert "ctx.save_for_backward" in str(info.value) and "property" in str(info.value)
    assert check_function(Exp, _x(5, 3), checks=["runs", "gradcheck"]).raise_if_failed().ok


def test_bad_arguments():
    with pytest.raises(ValueError, match="sample_inputs: no floating-point input requires grad"):
        check_function(Exp, torch.randn(3))
    with pytest.raises(ValueError, match="checks: unknown properties"):
        check_function(Exp, _x(3), checks=["gradchek"])
    with pytest.raises(ValueError, match="batched"):
        check_function(Exp, _x(3, 2), batched=[3])
    with pytest.raises(TypeError, match="fn: expected an autograd.Function subclass or a callable"):
        check_function(42, _x(3))


def test_the_check_list_is_complete():
    """Removing a check fails here (and in the defect tests that read its row)."""
    assert list(CHECKS) == [
        "runs", "gradcheck", "random cotangents", "gradgradcheck", "forward AD (jvp)", "vmap", "func.grad",
        "func.jacrev", "torch.compile", "non-contiguous", "zero-size batch", "broadcast", "float64 throughout",
        "float32 vs float64", "cuda", "needs_input_grad", "saved tensors", "aliasing", "non-differentiable outputs",
        "reference",
    ]  # fmt: skip


# ---------------------------------------------------------------- manualbp's own Functions
from manualbp.verify.conformance import builtin_subjects, summary_table  # noqa: E402

BUILTIN = builtin_subjects()


@pytest.mark.parametrize("name, fn, inputs, options", BUILTIN, ids=[s[0] for s in BUILTIN])
def test_manualbps_own_functions_conform(name, fn, inputs, options):
    """Every per-op Function, loss, MLPFunction, the C++ twins and the module, each against PyTorch's ops
    too (the reference row); the compile row in the slow tier."""
    skip = {"torch.compile": "slow tier", **options.get("skip", {})}
    report = check_function(fn, *inputs, **{**options, "skip": skip})
    assert report.ok, str(report)
    assert report["reference"].status == "pass" and report["gradcheck"].status == "pass"
    python_function = not name.startswith("native") and name != "MLP (the module)"
    for prop in ("forward AD (jvp)", "vmap", "func.grad", "func.jacrev"):
        assert report[prop].status == ("pass" if python_function else report[prop].status), (prop, str(report))


@pytest.mark.slow
@pytest.mark.parametrize("name, fn, inputs, options", BUILTIN, ids=[s[0] for s in BUILTIN])
def test_manualbps_own_functions_compile(name, fn, inputs, options):
    report = check_function(fn, *inputs, checks=["runs", "torch.compile"], **{k: v for k, v in options.items() if k != "reference"})
    assert report.ok, str(report)


def test_summary_table_lists_failures_and_skips():
    reports = [("Exp", check_function(Exp, _x(3, 2), checks=["runs", "vmap"])), ("ExpOnCtx", check_function(ExpOnCtx, _x(3, 2), checks=["runs", "saved tensors"]))]
    text = summary_table(reports, markdown=True)
    assert "| Exp | 1/2 | - | vmap |" in text and "| ExpOnCtx | 1/2 | saved tensors | - |" in text


# ---------------------------------------------------------------- the command line
def _cli(capsys, *argv):
    from manualbp.cli import main

    code = main(list(argv))
    return code, capsys.readouterr()


def test_cli_checks_a_function_from_a_file(capsys, tmp_path):
    source = tmp_path / "my_ops.py"
    source.write_text(open(__file__).read())
    code, out = _cli(capsys, "check", f"{source}:ExpOnCtx", "--shapes", "5x3", "--skip", "torch.compile")
    assert code == 1 and "saved tensors" in out.out and "FAIL" in out.out and "how to fix" in out.out
    code, out = _cli(capsys, "check", f"{source}:LinearFunction", "--shapes", "5x3,4x3,4", "--skip", "torch.compile", "--format", "json")
    assert code == 0 and json.loads(out.out)["ok"] is True
    code, out = _cli(capsys, "check", "manualbp.autograd:MSELossFunction", "--shapes", "4x3,4x3:nograd", "--args", "'sum'", "--checks", "runs,gradcheck,needs-input-grad")
    assert code == 0 and "needs_input_grad" in out.out, out.out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["check", "nosuchmodule_xyz:F", "--shapes", "3"], "No module named"),
        (["check", "manualbp.autograd:Nope", "--shapes", "3"], "has no attribute 'Nope'"),
        (["check", "manualbp.autograd", "--shapes", "3"], "expected module.path:Name"),
        (["check", "manualbp.autograd:SigmoidFunction", "--shapes", "3y"], "--shapes: expected tokens"),
        (["check", "manualbp.autograd:SigmoidFunction", "--shapes", "3", "--skip", "gradchek"], "unknown properties"),
        (["check", "manualbp.autograd:SigmoidFunction"], "--shapes"),
        (["check", "manualbp.autograd:MSELossFunction", "--shapes", "3,3", "--args", "mean("], "--args: expected"),
    ],
)
def test_cli_bad_input_is_one_clear_line(capsys, argv, message):
    code, out = _cli(capsys, *argv)
    assert code == 2 and message in out.err and "Traceback" not in out.err


def test_cli_builtin_table(capsys, monkeypatch):
    import manualbp.verify.conformance as conformance

    monkeypatch.setattr(conformance, "builtin_subjects", lambda seed=0: BUILTIN[:2])
    code, out = _cli(capsys, "check", "--builtin", "--skip", "torch.compile", "--format", "markdown")
    assert code == 0 and "| LinearFunction | " in out.out and "| - | torch.compile, " in out.out, out.out


# ---------------------------------------------------------------- pytest: plain `pytest`, the plugin auto-loaded
pytest_plugins = ["pytester"]

USER_SUITE = '''
import torch
from torch.autograd import Function


class Exp(Function):
    @staticmethod
    def forward(ctx, i):
        result = i.exp()
        ctx.save_for_backward(result)
        return result

    @staticmethod
    def backward(ctx, grad_output):
        (result,) = ctx.saved_tensors
        return grad_output * result


class ExpOnCtx(Exp):
    @staticmethod
    def forward(ctx, i):
        ctx.result = i.exp()
        return ctx.result

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output * ctx.result


def test_exp_conforms(manualbp_verify):
    manualbp_verify.assert_function_conforms(Exp, torch.randn(4, 3, dtype=torch.float64, requires_grad=True), skip=["torch.compile"])


def test_exp_on_ctx_conforms(manualbp_verify):
    manualbp_verify.assert_function_conforms(ExpOnCtx, torch.randn(4, 3, dtype=torch.float64, requires_grad=True), skip=["torch.compile"])
'''


def test_conformance_from_a_plain_pytest_run(pytester, monkeypatch):
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    pytester.makepyfile(test_user=USER_SUITE)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*1 of 20 properties fail*", "*saved tensors*FAIL*ctx.result holds a tensor*", "*how to fix:*"])
    assert "def assert_function_conforms" not in result.stdout.str()  # the user's line, not the helper's source


def test_readme_check_function_example_runs(capsys):
    import re

    readme = README.read_text()
    block = re.search(r"<!-- check-function-example -->\s*```python\n(.*?)```", readme, re.S)
    assert block, "README lost its check_function example"
    exec(compile(block.group(1), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"needs_input_grad +FAIL .*returned a gradient for bias", out), out
    assert re.search(r"saved tensors +FAIL .*ctx.result holds a tensor", out), out
    assert out.count(", 1 failed, ") == 2  # 13 passed, 6 skipped (11, 8) here; the cuda row passes on a GPU


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_cuda_row_runs_on_a_gpu():
    report = check_function(LinearFunction, *_linear_inputs(), checks=["runs", "cuda"])
    assert report["cuda"].status == "pass" and "cuda vs cpu" in report["cuda"].detail, str(report)
