"""The per-intermediate comparer (manualbp.verify.intermediates) on a makemore-style MLP written here.

The model is Karpathy's "becoming a backprop ninja" network: embedding C[Xb], concat, linear, batchnorm
(Bessel-corrected variance, running statistics under no_grad), tanh, linear, cross-entropy written out; the
manual backward is the exercise's, with bugs seeded one step at a time.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as TF
from helpers import README

from manualbp.verify.intermediates import IntermediateReport, assert_intermediates_match, record

pytest_plugins = ["pytester"]

VOCAB, BLOCK, N_EMBD, N_HIDDEN, BATCH = 27, 3, 10, 64, 32
DT = torch.float64


def make_params(seed: int = 42) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=DT) * scale).requires_grad_()

    p = {
        "C": randn(VOCAB, N_EMBD),
        "W1": randn(N_EMBD * BLOCK, N_HIDDEN, scale=(5 / 3) / (N_EMBD * BLOCK) ** 0.5),
        "b1": randn(N_HIDDEN, scale=0.1),  # useless beside batchnorm, but it is in the exercise
        "W2": randn(N_HIDDEN, VOCAB, scale=0.1),
        "b2": randn(VOCAB, scale=0.1),
        "bngain": (1.0 + 0.1 * torch.randn(1, N_HIDDEN, generator=g, dtype=DT)).requires_grad_(),
        "bnbias": randn(1, N_HIDDEN, scale=0.1),
    }
    p["Xb"] = torch.randint(0, VOCAB, (BATCH, BLOCK), generator=g)
    p["Yb"] = torch.randint(0, VOCAB, (BATCH,), generator=g)
    p["bnmean_running"] = torch.zeros(1, N_HIDDEN, dtype=DT)
    p["bnvar_running"] = torch.ones(1, N_HIDDEN, dtype=DT)
    return p


def forward(p: dict[str, torch.Tensor]):
    """The exercise's forward under record(); returns the recorder and the frame's variables."""
    C, W1, b1, W2, b2, bngain, bnbias = (p[k] for k in ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias"))
    Xb, Yb = p["Xb"], p["Yb"]
    bnmean_running, bnvar_running = p["bnmean_running"], p["bnvar_running"]
    n = Xb.shape[0]
    with record() as rec:
        emb = C[Xb]
        embcat = emb.view(emb.shape[0], -1)
        hprebn = embcat @ W1 + b1
        bnmeani = 1 / n * hprebn.sum(0, keepdim=True)
        bndiff = hprebn - bnmeani
        bndiff2 = bndiff**2
        bnvar = 1 / (n - 1) * (bndiff2).sum(0, keepdim=True)  # Bessel's correction (n-1)
        bnvar_inv = (bnvar + 1e-5) ** -0.5
        bnraw = bndiff * bnvar_inv
        hpreact = bngain * bnraw + bnbias
        with torch.no_grad():
            bnmean_running = 0.999 * bnmean_running + 0.001 * bnmeani
            bnvar_running = 0.999 * bnvar_running + 0.001 * bnvar
        h = torch.tanh(hpreact)
        logits = h @ W2 + b2
        logit_maxes = logits.max(1, keepdim=True).values
        norm_logits = logits - logit_maxes
        counts = norm_logits.exp()
        counts_sum = counts.sum(1, keepdims=True)
        counts_sum_inv = counts_sum**-1
        probs = counts * counts_sum_inv
        logprobs = probs.log()
        loss = -logprobs[range(n), Yb].mean()
    p["bnmean_running"], p["bnvar_running"] = bnmean_running, bnvar_running
    return rec, dict(locals())


def backward(v: dict, bug: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The exercise's manual backward, every d<name>, from the forward's variables ``v``."""
    with torch.no_grad():
        return _backward(**v, bug=bug)


def _backward(*, n, Xb, Yb, C, W1, W2, bngain, emb, embcat, hprebn, bndiff, bndiff2, bnvar, bnvar_inv, bnraw,
              h, logits, counts, counts_sum, counts_sum_inv, probs, logprobs, bug, **_):  # fmt: skip
    dlogprobs = torch.zeros_like(logprobs)
    dlogprobs[range(n), Yb] = -1.0 / n
    dprobs = (1.0 / probs) * dlogprobs
    dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)
    if "counts_sum_inv_sign" in bug:
        dcounts_sum_inv = -dcounts_sum_inv
    dcounts = counts_sum_inv * dprobs
    dcounts_sum = (-(counts_sum**-2)) * dcounts_sum_inv
    if "counts_second_branch" not in bug:
        dcounts = dcounts + torch.ones_like(counts) * dcounts_sum
    dnorm_logits = counts * dcounts
    dlogits = dnorm_logits.clone()
    dlogit_maxes = (-dnorm_logits).sum(1, keepdim=True)
    dlogits += TF.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes
    dh = dlogits @ W2.T
    dW2 = dlogits.T @ h if "W2_transpose" in bug else h.T @ dlogits
    db2 = dlogits.mean(0) if "b2_mean" in bug else dlogits.sum(0)
    dhpreact = ((1.0 - h) if "tanh_derivative" in bug else (1.0 - h**2)) * dh
    dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
    dbnraw = bngain * dhpreact
    dbnbias = dhpreact.sum(0, keepdim=True)
    dbndiff = bnvar_inv * dbnraw
    dbnvar_inv = (bndiff * dbnraw).sum(0, keepdim=True)
    dbnvar = (-0.5 * (bnvar + 1e-5) ** -1.5) * dbnvar_inv
    bessel = n if "bessel" in bug else n - 1
    dbndiff2 = (1.0 / bessel) * torch.ones_like(bndiff2) * dbnvar
    dbndiff = dbndiff + (2 * bndiff) * dbndiff2
    dhprebn = dbndiff.clone()
    dbnmeani = (-dbndiff).sum(0, keepdim=True)
    if "bnmeani_branch" not in bug:  # hprebn is used twice: by bnmeani and by bndiff
        dhprebn += 1.0 / n * (torch.ones_like(hprebn) * dbnmeani)
    dembcat = dhprebn @ W1.T
    dW1 = embcat.T @ dhprebn
    db1 = dhprebn.sum(0)  # ~1e-18: batchnorm makes b1 useless (a bug here would hide under atol)
    demb = dembcat.view(emb.shape)
    dC = torch.zeros_like(C)
    if "C_overwrite" in bug:  # dC[ix] = ... keeps only the last use of a repeated character
        dC[Xb.reshape(-1)] = demb.reshape(-1, N_EMBD)
    else:
        dC.index_add_(0, Xb.reshape(-1), demb.reshape(-1, N_EMBD))
    return {k: val for k, val in locals().items() if k.startswith("d") and isinstance(val, torch.Tensor)}


FORWARD_NAMES = [
    "C", "emb", "embcat", "W1", "hprebn", "b1", "bnmeani", "bndiff", "bndiff2", "bnvar", "bnvar_inv", "bnraw",
    "bngain", "hpreact", "bnbias", "h", "logits", "W2", "b2", "logit_maxes", "norm_logits", "counts",
    "counts_sum", "counts_sum_inv", "probs", "logprobs", "loss",
]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    p = make_params()
    rec, v = forward(p)
    return p, rec, v


def test_records_every_intermediate_in_forward_order(model):
    p, rec, v = model
    # W1 is read by the matmul that makes the (temporary) embcat @ W1, after embcat exists; b1 after it
    assert set(rec.names) == set(FORWARD_NAMES)
    order = rec.names
    for a, b in [("C", "emb"), ("emb", "embcat"), ("hpreact", "h"), ("h", "logits"), ("logprobs", "loss")]:
        assert order.index(a) < order.index(b)
    assert all(rec[name] is v[name] for name in FORWARD_NAMES)
    # the running statistics were updated (under no_grad) and are not intermediates with a gradient
    assert not torch.equal(p["bnmean_running"], torch.zeros(1, N_HIDDEN, dtype=DT))
    assert torch.allclose(v["bnvar_running"], 0.999 + 0.001 * v["bnvar"].detach())
    assert "bnmean_running" not in rec.names and "bnvar_running" not in rec.names


def test_correct_backward_all_ok(model):
    p, rec, v = model
    report = rec.compare(v["loss"], backward(v))
    assert isinstance(report, IntermediateReport)
    assert report.ok, str(report)
    assert report.first_wrong is None and report.bug_sites == []
    assert [r.name for r in report.rows] == [n for n in rec.names if n != "loss"]  # the loss: only if given
    assert all(r.given and r.affects_loss and r.ok for r in report.rows)
    assert report.n_exact_given >= 5  # float64: several bit-for-bit (dlogprobs, dprobs, db2, ...)
    assert "PASS" in str(report) and "first wrong" not in str(report)
    assert report.to_dict()["first_wrong"] is None
    # no .grad side effects; the graph is kept for a later backward
    assert p["W1"].grad is None
    v["loss"].backward(retain_graph=True)
    assert torch.allclose(p["W1"].grad, backward(v)["dW1"])
    p["W1"].grad = None


# (bug, the step where it is seeded, intermediates downstream of it that must stay right)
BUGS = [
    ("bessel", "bndiff2", ["bnvar", "bnvar_inv", "bnraw", "hpreact", "h", "logits"]),
    ("counts_sum_inv_sign", "counts_sum_inv", ["probs", "logprobs"]),
    ("counts_second_branch", "counts", ["counts_sum", "counts_sum_inv", "probs"]),
    ("tanh_derivative", "hpreact", ["h", "logits", "W2", "b2", "probs"]),
    ("W2_transpose", "W2", ["h", "logits", "hpreact", "C"]),
    ("b2_mean", "b2", ["logits", "h", "W2", "C"]),
    ("bnmeani_branch", "hprebn", ["bnmeani", "bndiff", "bnraw", "hpreact"]),
    ("C_overwrite", "C", ["emb", "embcat", "W1", "hprebn"]),
]


@pytest.mark.parametrize("bug,site,right", BUGS, ids=[b[0] for b in BUGS])
def test_seeded_bug_points_at_its_step(model, bug, site, right):
    p, rec, v = model
    report = rec.compare(v["loss"], backward(v, (bug,)))
    assert not report.ok
    assert report.first_wrong == site, str(report)
    assert report.bug_sites == [site], str(report)
    assert not report[site].ok and report[site].site
    for name in right:
        assert report[name].ok, (name, str(report))
    assert f"first wrong: d{site} (" in str(report)


def test_bug_upstream_of_a_wrong_gradient_is_a_site_too(model):
    """Two bugs on one path: dhpreact is wrong anyway (its dh is), yet its own step is wrong too."""
    p, rec, v = model
    report = rec.compare(v["loss"], backward(v, ("counts_sum_inv_sign", "tanh_derivative")))
    assert report.bug_sites == ["counts_sum_inv", "hpreact"], str(report)
    assert report.first_wrong == "counts_sum_inv"
    assert not report["h"].ok and not report["h"].site  # wrong, but only because dlogits is
    assert "bug sites (backward order): dcounts_sum_inv, dhpreact" in str(report)


def test_two_independent_bugs_both_reported(model):
    p, rec, v = model
    report = rec.compare(v["loss"], backward(v, ("W2_transpose", "bessel")))
    assert report.bug_sites == ["W2", "bndiff2"], str(report)
    assert report.first_wrong == "W2"


def test_shape_mismatch_is_a_failed_row(model):
    p, rec, v = model
    report = rec.compare(v["loss"], backward(v, ("W2_transpose",)))
    row = report["W2"]
    assert not row.ok and not row.compared
    assert "shape (27, 64) vs autograd (64, 27)" in row.note
    assert "shape (27, 64) vs autograd (64, 27)" in str(report)


def test_first_wrong_in_backward_order_even_when_downstream_errors_are_within_tolerance():
    """Errors each within tolerance downstream can cancel into a wrong gradient upstream: still a bug site."""
    t = torch.randn(5, dtype=DT, requires_grad=True)
    with record() as rec:
        s1 = 1e3 * t
        s2 = 1e3 * t
        loss = s1.sum() - s2.sum()  # dL/dt = 0 exactly
    ds1 = torch.full_like(t, 1 + 5e-8)  # within float64's rtol of 1
    ds2 = -torch.ones_like(t)
    dt = 1e3 * ds1 + 1e3 * ds2  # the right step applied to ds1, ds2: 5e-5, far from 0
    report = rec.compare(loss, locals())
    assert report["s1"].ok and report["s2"].ok and report["t"].local_ok
    assert not report.ok and report.first_wrong == "t" and report.bug_sites == ["t"]


def test_missing_gradients_are_listed(model):
    p, rec, v = model
    grads = backward(v)
    del grads["dbndiff2"], grads["dbnvar_inv"]
    report = rec.compare(v["loss"], grads)
    assert report.ok  # missing gradients are listed, not failed
    assert report.not_given == ["bndiff2", "bnvar_inv"]
    assert "not given (2): dbndiff2, dbnvar_inv" in str(report)
    assert not report["bndiff2"].given and report["bndiff2"].local_ok is None


def test_missing_gradient_between_a_bug_and_its_consumers(model):
    """The bug sits in a step whose result was not given: the first given gradient past it is blamed."""
    p, rec, v = model
    grads = backward(v, ("bessel",))
    del grads["dbndiff2"]
    report = rec.compare(v["loss"], grads)
    assert report.first_wrong == "bndiff" and report.bug_sites == ["bndiff"], str(report)


def test_unknown_name_is_a_value_error(model):
    p, rec, v = model
    grads = backward(v)
    grads["dhpreakt"] = grads["dhpreact"]
    with pytest.raises(ValueError, match=r"no recorded intermediate named 'dhpreakt'; recorded: C, emb, "):
        rec.compare(v["loss"], grads)


def test_bad_arguments(model):
    p, rec, v = model
    with pytest.raises(ValueError, match="no manual gradient for any recorded tensor"):
        rec.compare(v["loss"], {})
    with pytest.raises(ValueError, match="one-element tensor"):
        rec.compare(v["logits"], backward(v))
    with pytest.raises(TypeError, match=r"grads\['dh'\]: expected a tensor, got list"):
        rec.compare(v["loss"], {"dh": [1.0]})
    with pytest.raises(ValueError, match="two gradients for 'h'"):
        g = backward(v)["dh"]
        rec.compare(v["loss"], {"h": g, "dh": g})


def test_keys_without_d_prefix(model):
    p, rec, v = model
    grads = {k[1:]: g for k, g in backward(v, ("tanh_derivative",)).items() if k[1:] in rec.names}
    assert rec.compare(v["loss"], grads).first_wrong == "hpreact"


def test_locals_convention_and_a_toy_function():
    """Not manualbp, not the MLP: any code, gradients found as d<name> in locals()."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g, dtype=DT, requires_grad=True)
    w = torch.randn(4, 3, generator=g, dtype=DT, requires_grad=True)

    def toy(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (x @ w).sin()

    with record() as rec:
        s = toy(x, w)  # the temporary x @ w is inside toy: dropped, s is recorded
        q = s * s
        loss = q.sum()
    assert rec.names == ["x", "w", "s", "q", "loss"]
    with torch.no_grad():
        dq = torch.ones_like(q)
        ds = 2 * s * dq
        dz = torch.cos(x @ w) * ds
        dw = x.T @ dz
        dx = dz @ w.T
    assert rec.compare(loss, locals()).ok
    dw = dw + 1e-3  # a gradient off by 1e-3 everywhere is not "approx"
    report = rec.compare(loss, locals())
    assert not report.ok and report.first_wrong == "w"
    assert report["w"].exact is False and report["w"].ok is False
    assert report["w"].max_abs_err == pytest.approx(1e-3, rel=1e-6)
    assert report["x"].ok and report["s"].ok


def test_a_manualbp_module_and_a_freed_graph():
    """A custom autograd.Function (manualbp's MLP): its input, read inside the Function, is recorded too."""
    import manualbp

    model = manualbp.MLP(4, [5], 3, activation="tanh").double()
    x = torch.randn(8, 4, dtype=DT, requires_grad=True)
    with record() as rec:
        out = model(x)
        loss = out.square().sum()
    assert rec.names == ["x", "out", "loss"]
    dout = 2 * out.detach()
    (dx,) = torch.autograd.grad(model.to_torch()(x), x, dout)  # the native twin's input gradient
    assert rec.compare(loss, locals()).ok
    assert rec.compare(loss, {"out": dout, "x": dx * 1.5}).first_wrong == "x"
    loss.backward()
    with pytest.raises(RuntimeError, match="graph of loss was freed"):
        rec.compare(loss, locals())


def test_collect_false_explicit_names_only():
    x = torch.randn(6, dtype=DT, requires_grad=True)
    with record(collect=False) as rec:
        a = rec("a", x.exp())
        b = a * 3  # not named: not recorded
        loss = rec("L", b.sum())
    rec("x", x)  # naming after the block works too
    assert rec.names == ["a", "L", "x"]
    with torch.no_grad():
        da = 3 * torch.ones_like(a)
        report = rec.compare(loss, {"a": da, "x": da * a, "L": torch.ones(())})
    assert report.ok and [r.name for r in report.rows] == ["a", "L", "x"]
    # an in-block explicit name may be used with collect=True too, and rename a collected tensor
    with record() as rec2:
        y = rec2("logits", x * 2)
        loss2 = y.square().sum()
    assert rec2.names == ["x", "logits", "loss2"] and rec2["loss2"] is loss2
    rec2("scores", y)  # renaming
    assert rec2.names == ["x", "scores", "loss2"]
    with pytest.raises(ValueError, match="does not require grad"):
        rec2("z", torch.zeros(3))


def test_temporaries_and_inplace_ops():
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    with record(temporaries=True) as rec:
        y = x * 2
        z = x.exp()
        y += z  # in place: y now holds a later value, made after z
        loss = (y.tanh().T ** 2).sum()
    names = rec.names
    assert names[:3] == ["x", "z", "y"] and names[-1] == "loss"
    assert [n.split(" ")[1] for n in names if n.startswith("#")] == ["tanh", "T", "pow"]
    with torch.no_grad():
        t = torch.tanh(y)
        dy = 2 * t * (1 - t**2)
        dz = dy.clone()
        dx = 2 * dy + dz * z
    report = rec.compare(loss, {"y": dy, "z": dz, "x": dx})
    assert report.ok and set(report.not_given) == {n for n in names if n.startswith("#")}
    bad = rec.compare(loss, {"y": dy * 1.01, "z": dz * 1.01, "x": dx * 1.01})  # only dy's step is wrong
    assert bad.first_wrong == "y" and bad.bug_sites == ["y"], str(bad)


def test_tensor_that_does_not_affect_the_loss():
    x = torch.randn(4, dtype=DT, requires_grad=True)
    with record() as rec:
        side = x.exp()  # computed, unused by the loss
        loss = (x * 3).sum()
    assert rec["side"] is side
    ok = rec.compare(loss, {"x": torch.full_like(x, 3.0), "side": torch.zeros_like(x)})
    assert ok.ok and not ok["side"].affects_loss and "does not affect the loss" in str(ok)
    bad = rec.compare(loss, {"x": torch.full_like(x, 3.0), "side": torch.ones_like(x)})
    assert not bad.ok and bad.first_wrong == "side"
    assert "does not affect the loss: should be zero" in str(bad)
    assert rec.compare(loss, {"x": torch.full_like(x, 3.0)}).not_given == ["side"]


def test_compare_inside_the_block_is_refused():
    x = torch.randn(3, requires_grad=True)
    with record() as rec:
        loss = (x * x).sum()
        with pytest.raises(RuntimeError, match="after the `with record"):
            rec.compare(loss, {"x": 2 * x})


def test_assert_form_raises_with_the_table(model):
    p, rec, v = model
    assert assert_intermediates_match(rec, v["loss"], backward(v)).ok
    with pytest.raises(AssertionError) as info:
        assert_intermediates_match(rec, v["loss"], backward(v, ("tanh_derivative",)))
    msg = str(info.value)
    assert "gradient" in msg and "approx" in msg and "max diff" in msg
    assert "dhpreact" in msg and "first wrong: dhpreact" in msg and "Mismatched elements" in msg
    with pytest.raises(AssertionError, match="first wrong: dhpreact"):
        rec.compare(v["loss"], backward(v, ("tanh_derivative",))).raise_if_failed()


def test_to_dict(model):
    p, rec, v = model
    d = rec.compare(v["loss"], backward(v, ("bessel",))).to_dict()
    assert d["ok"] is False and d["first_wrong"] == "bndiff2" and d["bug_sites"] == ["bndiff2"]
    row = next(r for r in d["rows"] if r["name"] == "bndiff2")
    assert row["site"] is True and row["ok"] is False and row["given"] is True


def test_float32_tolerances():
    """float32: assert_close's float32 tolerances, and a 1e-3 error still fails."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=g, requires_grad=True)
    with record() as rec:
        h = torch.tanh(x)
        loss = (h * h).mean()
    with torch.no_grad():
        dh = 2 * h / h.numel()
        dx = (1 - h**2) * dh
    assert rec.compare(loss, locals()).ok
    dx = dx * 1.001
    assert rec.compare(loss, locals()).first_wrong == "x"




def test_readme_example_runs(capsys):
    block = re.search(r"<!-- intermediates-example -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README lost its intermediates example"
    exec(compile(block.group(1), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "first wrong: dhpreact" in out


# ---------------------------------------------------------------- from the command line and from pytest
NINJA_SCRIPT = '''
import torch
import torch.nn.functional as F

g = torch.Generator().manual_seed(0)
X, Y = torch.randn(32, 30, generator=g, dtype=torch.float64), torch.randint(0, 27, (32,), generator=g)
W1 = (0.2 * torch.randn(30, 64, generator=g, dtype=torch.float64)).requires_grad_()
W2 = (0.1 * torch.randn(64, 27, generator=g, dtype=torch.float64)).requires_grad_()
hpreact = X @ W1
h = torch.tanh(hpreact)
logits = h @ W2
loss = F.cross_entropy(logits, Y)
for t in [hpreact, h, logits]:
    t.retain_grad()
loss.backward()  # as the notebook does; the command keeps the graph for its own comparison

# the manual backward, in grad mode as in the notebook
dlogits = (F.softmax(logits, 1) - F.one_hot(Y, 27)) / 32
dW2 = h.T @ dlogits
dh = dlogits @ W2.T
dhpreact = BUG * dh
dW1 = X.T @ dhpreact
'''


@pytest.mark.parametrize("bug, code, first", [("(1 - h**2)", 0, None), ("(1 - h)", 1, "dhpreact")])
def test_check_intermediates_command(tmp_path, capsys, bug, code, first):
    from manualbp.cli import main

    script = tmp_path / "ninja.py"
    script.write_text(NINJA_SCRIPT.replace("BUG", bug))
    assert main(["check-intermediates", str(script)]) == code
    out = capsys.readouterr().out
    assert "dhpreact" in out and "dlogits" in out and "ddlogits" not in out, out
    if first:
        assert f"first wrong: {first}" in out
    assert main(["check-intermediates", str(script), "--loss", "nope"]) == 2
    assert "--loss: the script has no tensor named 'nope'" in capsys.readouterr().err


PYTEST_USER = '''
import torch


def test_my_backprop(manualbp_verify):
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    with manualbp_verify.record() as rec:
        z = x @ W
        a = torch.sigmoid(z)
        loss = a.sum()
    da = torch.ones_like(a)
    dz = da * a.detach() * (1 - a.detach()) * WRONG
    dW = x.T @ dz
    manualbp_verify.assert_intermediates_match(rec, loss, locals())
'''


@pytest.mark.parametrize("wrong, outcome", [("1", "passed"), ("2", "failed")])
def test_intermediates_from_a_plain_pytest_run(pytester, monkeypatch, wrong, outcome):
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    pytester.makepyfile(test_user=PYTEST_USER.replace("WRONG", wrong))
    result = pytester.runpytest()
    result.assert_outcomes(**{outcome: 1})
    if outcome == "failed":
        result.stdout.fnmatch_lines(["*first wrong: dz*"])
