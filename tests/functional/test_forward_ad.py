"""Forward-mode AD (issue 19, item 6): every Function's hand-derived jvp against native torch.

Dual numbers (``torch.autograd.forward_ad``), ``torch.func.jvp``, ``jacfwd``, ``hessian`` and
``gradcheck(check_forward_ad=True)``, in float64 with random tangents. These run the Python Functions of
``manualbp.autograd``: ``manualbp.nn`` hands a call to its C++ nodes only outside forward mode and torch.func.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as TF
from helpers import native_loss, rel_err
from torch.func import functional_call, hessian, jacfwd, jacrev

import manualbp
from manualbp import autograd as A

D = torch.float64
ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu", "identity"]
SLOPE = 0.2
NATIVE_ACTIVATIONS = {
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "leaky_relu": lambda z: TF.leaky_relu(z, SLOPE),
    "identity": lambda z: z * 1,
}


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def _tangents_by_dual_numbers(fn, primals, tangents):
    with fwAD.dual_level():
        args = [p if t is None else fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        return [fwAD.unpack_dual(o).tangent for o in _outputs(fn(*args))]


def _tangents_by_func_jvp(fn, primals, tangents):
    """torch.func.jvp over the arguments that have a tangent; the others are constants."""
    idx = [i for i, t in enumerate(tangents) if t is not None]

    def restricted(*args):
        full = list(primals)
        for i, a in zip(idx, args):
            full[i] = a
        return fn(*full)

    _, out = torch.func.jvp(restricted, tuple(primals[i] for i in idx), tuple(tangents[i] for i in idx))
    return list(_outputs(out))


def assert_jvp_matches(manual, native, primals, tangents):
    """Both forward-mode APIs give the manual Function the native tangents (None: zero), which are not all 0."""
    for method in (_tangents_by_dual_numbers, _tangents_by_func_jvp):
        mine, ref = method(manual, primals, tangents), method(native, primals, tangents)
        assert len(mine) == len(ref)
        assert any(r is not None and r.abs().max() > 1e-8 for r in ref)
        for k, (a, b) in enumerate(zip(mine, ref)):
            if b is None:
                assert a is None or a.abs().max() == 0, (method.__name__, k)
                continue
            assert a is not None and a.shape == b.shape, (method.__name__, k)
            assert rel_err(a, b) <= 1e-12, (method.__name__, k)


def _randn(*shape):
    return torch.randn(*shape, dtype=D)


# --------------------------------------------------------------------------------------------------
# One Function at a time: dual numbers and torch.func.jvp against native ops
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tangent_of", ["all", "input", "weight", "bias"])
def test_linear_jvp(bias, tangent_of):
    torch.manual_seed(0)
    primals = [_randn(2, 3, 4), _randn(5, 4), _randn(5) if bias else None]
    if tangent_of == "bias" and not bias:
        tangent_of = "weight"  # no bias: the weight's tangent alone
    tangents = [
        _randn(*p.shape) if p is not None and tangent_of in ("all", name) else None
        for p, name in zip(primals, ("input", "weight", "bias"))
    ]
    assert_jvp_matches(A.LinearFunction.apply, TF.linear, primals, tangents)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_jvp(activation):
    torch.manual_seed(0)
    function = A.ACTIVATION_FUNCTIONS[activation]
    extra = (SLOPE,) if activation == "leaky_relu" else ()
    x = _randn(3, 4, 5)
    assert_jvp_matches(lambda z: function.apply(z, *extra), NATIVE_ACTIVATIONS[activation], [x], [_randn(3, 4, 5)])


def test_softmax_jvp():
    torch.manual_seed(0)
    assert_jvp_matches(A.SoftmaxFunction.apply, lambda o: torch.softmax(o, -1), [_randn(3, 4, 5)], [_randn(3, 4, 5)])


def _native_cross_entropy_on_probabilities(p, y, reduction):
    y = y if y.is_floating_point() else TF.one_hot(y, p.shape[-1]).to(p.dtype)
    per_example = -(y * p.log()).sum(-1)
    return {"mean": per_example.mean, "sum": per_example.sum, "none": lambda: per_example}[reduction]()


#: loss -> (Function, native reference, input maker, target makers by kind)
LOSSES = {
    "squared_error": (A.SquaredErrorLossFunction, lambda o, y, r: native_loss("squared_error", o, y, r)),
    "mse": (A.MSELossFunction, lambda o, y, r: native_loss("mse", o, y, r)),
    "cross_entropy": (A.CrossEntropyFunction, lambda o, y, r: native_loss("cross_entropy", o, y, r)),
    "cross_entropy_on_probabilities": (A.CrossEntropyOnProbabilitiesFunction, _native_cross_entropy_on_probabilities),
}
LOSS_CASES = [
    ("squared_error", "regression"),
    ("mse", "regression"),
    ("cross_entropy", "indices"),
    ("cross_entropy", "probabilities"),
    ("cross_entropy_on_probabilities", "indices"),
    ("cross_entropy_on_probabilities", "probabilities"),
]


def _loss_primals(loss, target_kind, shape=(3, 4, 5)):
    output = _randn(*shape)
    if loss == "cross_entropy_on_probabilities":
        output = output.softmax(-1)  # probabilities yhat
    if target_kind == "indices":
        return output, torch.randint(0, shape[-1], shape[:-1])
    target = _randn(*shape)
    return output, (target.softmax(-1) if target_kind == "probabilities" else target)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    ("loss", "target_kind", "tangent_of"),
    [
        (loss, kind, tangent_of)
        for loss, kind in LOSS_CASES
        for tangent_of in (["input"] if kind == "indices" else ["input", "target", "both"])  # indices: no tangent
    ],
)
def test_loss_jvp(loss, target_kind, tangent_of, reduction):
    torch.manual_seed(0)
    function, native = LOSSES[loss]
    output, target = _loss_primals(loss, target_kind)
    tangents = [
        _randn(*output.shape) if tangent_of in ("input", "both") else None,
        _randn(*target.shape) if tangent_of in ("target", "both") else None,
    ]
    assert_jvp_matches(
        lambda o, y: function.apply(o, y, reduction), lambda o, y: native(o, y, reduction), [output, target], tangents
    )


def _native_mlp(activations, bias):
    """(o, a^1 .. a^{L-1}) as MLPFunction returns them, from native ops: hidden as rows (N, width)."""

    def forward(x, *params):
        weights, biases = A.split_params(params, bias)
        a, hidden = x.reshape(-1, x.shape[-1]), []
        for (name, _), w, b in zip(activations, weights, biases):
            a = NATIVE_ACTIVATIONS[name](TF.linear(a, w, b))
            hidden.append(a)
        o = TF.linear(a, weights[-1], biases[-1])
        return (o.reshape(*x.shape[:-1], o.shape[-1]), *hidden)

    return forward


def _mlp_primals(widths, bias):
    params = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        params.append(_randn(fan_out, fan_in))
        if bias:
            params.append(_randn(fan_out))
    return [_randn(2, 3, widths[0]), *params]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tangent_of", ["all", "input", "last_weight", "first_params"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_mlp_function_jvp_of_every_output(depth, tangent_of, bias):
    """Tangents of o and of every hidden activation, with tangents on all inputs or only on some."""
    torch.manual_seed(0)
    widths = [4, 6, 5, 3][:depth] + [3]
    activations = (("tanh", 0.01), ("leaky_relu", SLOPE))[: depth - 1]
    primals = _mlp_primals(widths, bias)
    per_layer = 2 if bias else 1
    chosen = {
        "all": range(len(primals)),
        "input": [0],
        "last_weight": [len(primals) - per_layer],
        "first_params": range(1, 1 + per_layer),
    }[tangent_of]
    tangents = [_randn(*p.shape) if i in chosen else None for i, p in enumerate(primals)]
    assert_jvp_matches(
        lambda x, *p: A.MLPFunction.apply(x, activations, bias, *p), _native_mlp(activations, bias), primals, tangents
    )


# --------------------------------------------------------------------------------------------------
# gradcheck with forward mode, on the Functions
# --------------------------------------------------------------------------------------------------
def _gradcheck_cases():
    torch.manual_seed(0)
    x = _randn(2, 3, 4).requires_grad_()
    yield "linear", A.LinearFunction.apply, (x, _randn(5, 4).requires_grad_(), _randn(5).requires_grad_())
    for name in ACTIVATIONS:
        extra = (SLOPE,) if name == "leaky_relu" else ()
        yield name, (lambda f, e: lambda z: f.apply(z, *e))(A.ACTIVATION_FUNCTIONS[name], extra), (x,)
    yield "softmax", A.SoftmaxFunction.apply, (x,)
    for loss, kind in LOSS_CASES:
        output, target = _loss_primals(loss, kind)
        target = target.requires_grad_() if target.is_floating_point() else target
        for reduction in ("mean", "none"):
            fn = (lambda f, r: lambda o, y: f.apply(o, y, r))(LOSSES[loss][0], reduction)
            yield f"{loss}-{kind}-{reduction}", fn, (output.requires_grad_(), target)
    widths, activations = [4, 5, 6, 3], (("sigmoid", 0.01), ("leaky_relu", SLOPE))
    for bias in (True, False):
        primals = [p.requires_grad_() for p in _mlp_primals(widths, bias)]
        fn = (lambda b: lambda xx, *p: A.MLPFunction.apply(xx, activations, b, *p))(bias)
        yield f"mlp-bias={bias}", fn, tuple(primals)


@pytest.mark.parametrize(("name", "fn", "inputs"), [pytest.param(*case, id=case[0]) for case in _gradcheck_cases()])
def test_gradcheck_with_forward_ad(name, fn, inputs):
    # identity returns its input as-is: the vmap rule torch.func generates for a vmap over the tangents of dual
    # numbers made outside it returns a tangent that is no view, which autograd rejects (jacfwd is fine, below)
    batched = name != "identity"
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True, check_batched_forward_grad=batched)


# --------------------------------------------------------------------------------------------------
# The module: jacfwd, hessian, forward mode and backward together
# --------------------------------------------------------------------------------------------------
def _model(depth, activation, bias):
    hidden = [6, 5][: depth - 1]
    return manualbp.MLP(4, hidden, 3, activation=activation, bias=bias, dtype=D)


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_jacfwd_of_module_matches_native_and_jacrev(activation, depth, bias):
    """jacfwd of manualbp.MLP on a 3-D input, w.r.t. the input and the parameters, equals jacfwd of
    model.to_torch() and jacrev of manualbp.MLP."""
    torch.manual_seed(0)
    model = _model(depth, activation, bias)
    native = model.to_torch()
    x, params = _randn(2, 3, 4), _params(model)

    def run(net):
        return lambda p, x: functional_call(net, p, (x,))

    for argnums in (0, 1):
        mine = jacfwd(run(model), argnums=argnums)(params, x)
        ref = jacfwd(run(native), argnums=argnums)(params, x)
        rev = jacrev(run(model), argnums=argnums)(params, x)
        for a, b, c in zip(*(t.values() if isinstance(t, dict) else [t] for t in (mine, ref, rev))):
            assert rel_err(a, b) <= 1e-12 and rel_err(a, c) <= 1e-12
            assert b.abs().max() > 0


HESSIAN_LOSSES = {
    "cross_entropy_indices": (manualbp.CrossEntropyLoss, "cross_entropy", lambda: torch.randint(0, 3, (2, 3))),
    "cross_entropy_probabilities": (manualbp.CrossEntropyLoss, "cross_entropy", lambda: _randn(2, 3, 3).softmax(-1)),
    "mse": (manualbp.MSELoss, "mse", lambda: _randn(2, 3, 3)),
    "squared_error": (manualbp.SquaredErrorLoss, "squared_error", lambda: _randn(2, 3, 3)),
}


@pytest.mark.parametrize("loss", list(HESSIAN_LOSSES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_hessian_of_loss_matches_native(activation, loss):
    """torch.func.hessian of loss(model(x), y) w.r.t. the input and w.r.t. the parameters equals native."""
    torch.manual_seed(0)
    model = _model(3, activation, True)
    native = model.to_torch()
    loss_cls, native_name, make_target = HESSIAN_LOSSES[loss]
    x, y, params = _randn(2, 3, 4), make_target(), _params(model)

    def manual_loss(p, x):
        return loss_cls()(functional_call(model, p, (x,)), y)

    def reference_loss(p, x):
        return native_loss(native_name, functional_call(native, p, (x,)), y, "mean")

    for argnums in (0, 1):
        mine, ref = (
            hessian(manual_loss, argnums=argnums)(params, x),
            hessian(reference_loss, argnums=argnums)(params, x),
        )
        if argnums == 1:
            mine, ref = {"x": {"x": mine}}, {"x": {"x": ref}}
        for k in ref:
            for j in ref[k]:
                assert rel_err(mine[k][j], ref[k][j]) <= 1e-10, (k, j)
        assert max(h.abs().max() for row in ref.values() for h in row.values()) > 1e-6


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_dual_numbers_and_backward_together(activation):
    """Under a forward-mode level the module's output carries the native tangent, and backward through the
    same graph still gives native gradients (the Functions save for both)."""
    torch.manual_seed(0)
    model = _model(3, activation, True)
    native = model.to_torch()
    x, t, y = _randn(2, 3, 4), _randn(2, 3, 4), torch.randint(0, 3, (2, 3))
    results = []
    for net, loss_fn in ((model, manualbp.CrossEntropyLoss()), (native, None)):
        with fwAD.dual_level():
            out = net(fwAD.make_dual(x, t))
            loss = loss_fn(out, y) if loss_fn else native_loss("cross_entropy", out, y, "mean")
            tangents = (fwAD.unpack_dual(out).tangent, fwAD.unpack_dual(loss).tangent)
            loss.backward()
        results.append((*tangents, *[p.grad for p in net.parameters()]))
    for a, b in zip(*results):
        assert rel_err(a, b) <= 1e-12


def test_plain_backward_saves_nothing_for_forward_mode():
    """Outside a forward-mode level the Functions keep no references for jvp (saved memory as before)."""
    torch.manual_seed(0)
    model = _model(3, "tanh", True)
    x = _randn(8, 4)
    outputs = [
        A.MLPFunction.apply(x, model.activation_specs, True, *model.flat_parameters())[0],
        A.SigmoidFunction.apply(x.requires_grad_()),
        A.CrossEntropyFunction.apply(x, torch.randint(0, 4, (8,)), "mean"),
    ]
    for out in outputs:
        assert out.grad_fn is not None
        assert getattr(out.grad_fn, "saved_for_forward", None) is None
