"""The console script: `manualbp verify` and `manualbp explain`, against values computed another way."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF

import manualbp
from manualbp import verify as V
from manualbp.cli import build_parser, main

SMALL = ["--activations", "sigmoid,relu", "--losses", "squared_error", "--depths", "1", "--dtypes", "float64"]


def test_verify_small_matrix_passes_and_writes_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert main(["verify", *SMALL, "--json", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["activation", "loss", "depth", "dtype", "device"]
    rows = [line for line in out if line.startswith(("sigmoid", "relu"))]
    assert len(rows) == 2 and all(line.rstrip().endswith("PASS") for line in rows)
    assert re.match(r"PASS: 2/2 configurations match native autograd and float64 finite differences", out[-2])
    data = json.loads(path.read_text())
    assert data["ok"] is True and len(data["configurations"]) == 2
    config = data["configurations"][0]
    assert (config["activation"], config["loss"], config["depth"], config["dtype"]) == (
        "sigmoid",
        "squared_error",
        1,
        "float64",
    )
    assert config["finite_differences"]["gradcheck"] is True

    # The JSON's numbers against an independent run of the same configuration (same seeds as the CLI).
    torch.manual_seed(0)
    model = manualbp.MLP(3, [4], 3, "sigmoid", dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    twin = model.to_torch()
    manualbp.SquaredErrorLoss()(model(x), y).backward()
    (0.5 * ((twin(x) - y) ** 2).sum(-1)).mean().backward()
    rows_by_name = {r["name"]: r for r in config["autograd"]["rows"]}
    for k, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
        name = f"dL/d{'b' if k % 2 else 'W'}^{k // 2 + 1}"
        assert rows_by_name[name]["max_abs_err"] == (p.grad - q.grad).abs().max().item()
    # The table's column is the largest error over the configuration's rows.
    all_rows = config["autograd"]["rows"] + config["trace"]["rows"]
    largest = max(r["max_abs_err"] for r in all_rows)
    assert rows[0].split()[5] == V.fmt_err(largest)


@pytest.mark.parametrize("bug", ["sigmoid_missing_derivative", "weight_grad_transposed"])
def test_verify_exits_1_on_an_injected_bug(bug, capsys):
    assert main(["verify", *SMALL, "--no-finite-differences", "--inject-bug", bug]) == 1
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("sigmoid", "relu"))}
    assert "FAIL" in lines["sigmoid"]
    assert "dL/dW^1" in lines["sigmoid"]
    if bug == "sigmoid_missing_derivative":
        assert lines["relu"].rstrip().endswith("PASS")  # the bug lives in sigmoid's backward only
    else:
        assert "FAIL" in lines["relu"]
    assert out.splitlines()[-1].startswith("FAIL:")
    # and the hook leaves nothing behind
    assert V.verify_matrix(["sigmoid"], ["mse"], [1], ["float64"], finite_differences=False).ok


def test_verify_core_function_catches_a_broken_module(monkeypatch):
    """Without the hook: a broken backward patched into the library is caught by the matrix and by FD."""
    from manualbp import registry

    monkeypatch.setenv("MANUALBP_NATIVE", "off")  # a patched formula runs on the Python Functions only
    spec = registry.activation_spec("tanh")  # the registry's spec: 1 - a instead of 1 - a^2
    broken = registry.replaced(spec, backward=lambda g, a, s: g * (1 - a), backward_=lambda g, a, s: g.mul_(1 - a))
    monkeypatch.setitem(registry.ACTIVATION_REGISTRY, "tanh", broken)
    result = V.verify_matrix(["tanh"], ["cross_entropy"], [1], ["float64"])
    assert not result.ok
    config = result.results[0]
    assert not config.finite_differences.ok and not config.grad.ok
    assert {r.name for r in config.trace.failures()} >= {"dL/dz^1", "dL/dW^1"}
    assert config.trace["dL/da^1"].ok


@pytest.mark.parametrize(
    "argv, message",
    [
        (["verify", "--depths", "x"], "argument --depths: expected comma-separated ints, got 'x'"),
        (["verify", "--activations", "softplus"], "activations: expected values from"),
        (
            ["verify", "--dtypes", "float8"],
            "dtypes: expected values from float64, float32, bfloat16, float16, got 'float8'",
        ),
        (["verify", "--depths", "-1"], "depths: expected integers >= 0"),
        (["verify", "--devices", "tpu"], "devices: 'tpu' is not available here"),
        (["verify", "--width", "0"], "width must be a positive integer, got 0"),
        (["explain", "--widths", "3"], "widths: expected at least two positive integers"),
        (["explain", "--widths", "2,0,2"], "widths: expected at least two positive integers"),
        (["explain", "--loss", "hinge"], "argument --loss: invalid choice: 'hinge'"),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_clear_line(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_console_script_is_quiet_on_stderr_when_not_a_terminal():
    out = subprocess.run(
        [sys.executable, "-m", "manualbp.cli", "verify", "--activations", "relu", "--losses", "mse", "--depths", "1"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stderr.splitlines() if "numpy" not in line.lower() and line.strip()] == []
    assert out.stdout.splitlines()[-1].startswith("PASS: 2/2")


# --------------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------------
NOTES_ORDER = [
    "z_i",
    "a_i",
    "o_k",
    "L",
    "dL/dL",
    "dL/do_k",
    "dL/dw2_ki",
    "dL/db2_k",
    "dL/da_i",
    "dL/dz_i",
    "dL/dw1_ij",
    "dL/db1_i",
]


def test_explain_text_follows_the_notes(capsys):
    assert main(["explain"]) == 0
    out = capsys.readouterr().out
    heads = [
        line.split(" = ")[0].strip()
        for line in out.splitlines()
        if line.startswith("  ") and not line.startswith("      ")
    ]
    heads = [h for h in heads if not h.endswith(":") and ":" not in h]
    assert heads == NOTES_ORDER
    assert "  dL/dz_i = dL/da_i * sigma'(z_i) = dL/da_i * a_i (1 - a_i)" in out
    assert "  dL/do_k = dL/dL * (o_k - y_k)" in out
    assert out.count("✓") == 3 + 3 + 2 + 1 + 1 + 2 + 6 + 2 + 3 + 3 + 6 + 3
    assert out.rstrip().endswith("all 35 computed values match native autograd")


@pytest.mark.parametrize("loss", ["squared_error", "mse", "cross_entropy"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_explain_json_values_recomputed_by_hand(loss, activation, capsys):
    """Recompute every value of the worked example with Python floats from the printed (rounded) givens."""
    assert main(["explain", "--format", "json", "--loss", loss, "--activation", activation, "--seed", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    vals = {v["name"]: v for step in data["steps"] for v in step["values"]}
    g = {name: v["value"] for name, v in vals.items()}
    x = [g["x_1"], g["x_2"]]
    y = [g["y_1"], g["y_2"]]
    sigma, dsigma = {
        "sigmoid": (lambda t: 1 / (1 + math.exp(-t)), lambda a: a * (1 - a)),
        "tanh": (math.tanh, lambda a: 1 - a * a),
        "relu": (lambda t: max(t, 0.0), lambda a: float(a > 0)),
    }[activation]
    z = [sum(g[f"w1_{i}{j}"] * x[j - 1] for j in (1, 2)) + g[f"b1_{i}"] for i in (1, 2, 3)]
    a = [sigma(t) for t in z]
    o = [sum(g[f"w2_{k}{i}"] * a[i - 1] for i in (1, 2, 3)) + g[f"b2_{k}"] for k in (1, 2)]
    if loss == "squared_error":
        L, do = 0.5 * sum((o[k] - y[k]) ** 2 for k in range(2)), [o[k] - y[k] for k in range(2)]
    elif loss == "mse":
        L, do = sum((o[k] - y[k]) ** 2 for k in range(2)) / 2, [2 * (o[k] - y[k]) / 2 for k in range(2)]
    else:
        e = [math.exp(t) for t in o]
        yhat = [t / sum(e) for t in e]
        L, do = -sum(y[k] * math.log(yhat[k]) for k in range(2)), [yhat[k] - y[k] for k in range(2)]
        assert vals["yhat_1"]["value"] == pytest.approx(yhat[0], abs=1e-12)
    da = [sum(do[k - 1] * g[f"w2_{k}{i}"] for k in (1, 2)) for i in (1, 2, 3)]
    dz = [da[i] * dsigma(a[i]) for i in range(3)]
    expected = {"L": L, "dL/dL": 1.0}
    expected.update({f"z_{i + 1}": z[i] for i in range(3)} | {f"a_{i + 1}": a[i] for i in range(3)})
    expected.update({f"o_{k + 1}": o[k] for k in range(2)} | {f"dL/do_{k + 1}": do[k] for k in range(2)})
    expected.update({f"dL/dw2_{k}{i}": do[k - 1] * a[i - 1] for k in (1, 2) for i in (1, 2, 3)})
    expected.update({f"dL/db2_{k}": do[k - 1] for k in (1, 2)} | {f"dL/da_{i + 1}": da[i] for i in range(3)})
    expected.update({f"dL/dz_{i + 1}": dz[i] for i in range(3)} | {f"dL/db1_{i + 1}": dz[i] for i in range(3)})
    expected.update({f"dL/dw1_{i}{j}": dz[i - 1] * x[j - 1] for i in (1, 2, 3) for j in (1, 2)})
    for name, value in expected.items():
        assert vals[name]["value"] == pytest.approx(value, rel=1e-10, abs=1e-12), name
        assert vals[name]["autograd"] == pytest.approx(value, rel=1e-10, abs=1e-12), name
        assert vals[name]["ok"] is True
    assert data["ok"] is True
    # the givens are the rounded numbers a student can type in
    assert all(round(vals[n]["value"], 2) == vals[n]["value"] for n in ("x_1", "w1_11", "b2_2"))
    if loss == "cross_entropy":
        assert sorted([g["y_1"], g["y_2"]]) == [0.0, 1.0]


def test_explain_marks_an_injected_bug(capsys):
    assert main(["explain", "--inject-bug", "sigmoid_missing_derivative"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    marked = {line.split(" = ")[0].strip(): line for line in lines if line.startswith("      ")}
    assert marked["dL/da_1"].rstrip().endswith("✓")
    assert "✗ autograd gives" in marked["dL/dz_1"] and "✗" in marked["dL/dw1_11"]
    assert "✗" not in marked["dL/dw2_11"]
    assert re.search(r"12 of 35 computed values differ from native autograd: dL/dz_1", out)


def test_explain_markdown_and_deeper_widths(capsys):
    assert main(["explain", "--format", "markdown", "--widths", "2,3,3,2", "--activation", "tanh"]) == 0
    out = capsys.readouterr().out
    assert "### 1. Forward pass" in out and "### 2. Backward pass" in out
    assert "| `z^2_1` | `z^2_i = sum_j w^2_ij a^1_j + b^2_i` |" in out
    assert "`dL/dw^3_ki = dL/do_k * a^2_i`" in out
    assert "`dL/dz^1_j = dL/da^1_j * sigma'(z^1_j) = dL/da^1_j * (1 - (a^1_j)^2)`" in out
    assert out.count("| ✓ |") == 59 and "✗" not in out


def test_explain_library_matches_trace_and_native_softmax():
    e = V.explain((2, 3, 2), "sigmoid", "cross_entropy", seed=1)
    yhat = [v.value for s in e.steps if s.quantity == "yhat_k" for v in s.values]
    o = e.trace["o"].reference[0]
    assert yhat == pytest.approx(TF.softmax(o, -1).tolist(), abs=1e-15)
    assert e.ok and e.trace.ok


@pytest.mark.parametrize("bug", sorted(set(V.BUGS) - {"sigmoid_missing_derivative", "weight_grad_transposed"}))
def test_every_catalogue_name_is_an_inject_bug_choice(bug):
    """--inject-bug takes every name of the catalogue (the run itself: test_verify_exits_1_on_an_injected_bug)."""
    args = build_parser().parse_args(["verify", "--inject-bug", bug])
    assert args.inject_bug == bug and not args.bugs


@pytest.mark.slow
def test_verify_bugs_prints_the_mutation_matrix(capsys):
    assert main(["verify", "--bugs"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    for path in V.PATHS:
        assert path in lines
    reached = sum(V.CATALOGUE[b].reach("module") is None for b in V.CATALOGUE)
    assert f"{reached} of {reached}" in lines["module"]
    from manualbp.verify import mutation as M

    native = M._native_not_run() is None  # the compiled paths are checked where the extension is built
    assert (f"{reached} of {reached}" if native else "0 of 0") in lines["module-native"]
    assert out.rstrip().splitlines()[-1].startswith("PASS")
