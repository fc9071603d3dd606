"""The drop-in module inside real PyTorch code: each case runs the same code on ``model.to_torch()`` and compares.

ONNX export, module hooks, parametrizations, Opacus, TorchScript, ``nn.Sequential`` habits, seeded factories,
skorch and Lightning. Third-party packages are optional test dependencies (the ``interop`` extra): a test
whose package is missing skips with the reason.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import manualbp
from manualbp.autograd import LinearFunction

D = torch.float64
ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu", "identity"]


def _pair(activation="tanh", widths=(8, [7, 5], 3), dtype=D, seed=0):
    torch.manual_seed(seed)
    model = manualbp.MLP(widths[0], widths[1], widths[2], activation=activation, dtype=dtype)
    return model, model.to_torch()


def _grads(net, x, y, loss=TF.cross_entropy):
    net.zero_grad()
    out = net(x)
    loss(out, y).backward()
    return out.detach(), [p.grad.clone() for p in net.parameters()]


def _assert_same_step(model, native, x, y, exact=False):
    out_m, g_m = _grads(model, x, y)
    out_n, g_n = _grads(native, x, y)
    check = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-10, atol=1e-12))
    assert check(out_m, out_n)
    assert len(g_m) == len(g_n) and all(check(a, b) for a, b in zip(g_m, g_n))


# --------------------------------------------------------------------------------------------------
# 1. ONNX export (TorchScript-based exporter) and 7. TorchScript
# --------------------------------------------------------------------------------------------------
def test_onnx_export_legacy_writes_the_whole_network():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, native = _pair(dtype=torch.float32)
    x = torch.randn(4, 8)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, dynamo=False, input_names=["x"], output_names=["o"])
    graph = onnx.load_from_string(f.getvalue()).graph
    assert [n.op_type for n in graph.node] == ["Gemm", "Tanh", "Gemm", "Tanh", "Gemm"]
    session = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    x2 = torch.randn(4, 8)  # not the export's example input
    (out,) = session.run(None, {"x": x2.numpy()})
    assert out.shape == (4, 3)
    torch.testing.assert_close(torch.from_numpy(out), native(x2).detach(), rtol=1e-5, atol=1e-6)


def test_jit_trace_records_aten_ops_and_saves():
    model, native = _pair()
    x = torch.randn(5, 8, dtype=D)
    traced = torch.jit.trace(model, x)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x2 = torch.randn(3, 8, dtype=D)
    assert torch.equal(loaded(x2), model(x2))
    assert "MLPFunction" not in str(traced.graph) and "aten::linear" in str(traced.graph)
    # a trace leaves the eager module on its hand-derived path
    assert model(x2).grad_fn is not None and "Linear" not in type(model(x2).grad_fn).__name__


def test_jit_script_compiles_the_equivalent_sequential_with_the_same_parameters():
    model, native = _pair(activation="leaky_relu")
    model.activations[0].negative_slope = 0.2
    native = model.to_torch()
    scripted = torch.jit.script(model)
    x = torch.randn(6, 8, dtype=D)
    torch.testing.assert_close(scripted(x), native(x), rtol=0, atol=0)
    with torch.no_grad():  # the very parameters: a change to the module shows in the scripted one
        model[0].weight.mul_(2.0)
    assert torch.allclose(scripted(x), model(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    assert buffer.tell() > 0
    for layer in (model[0], model[1]):  # the single layers script too
        torch.jit.script(layer)


# --------------------------------------------------------------------------------------------------
# 2. Module hooks
# --------------------------------------------------------------------------------------------------
def _record(log, tag):
    def hook(module, *args):
        log.append((tag, type(module).__name__))

    return hook


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_hooks_and_pre_hooks_fire_as_on_native(activation):
    model, native = _pair(activation)
    logs = {}
    for name, net in (("manual", model), ("native", native)):
        log = logs[name] = []
        for k, m in enumerate(net):
            m.register_forward_pre_hook(_record(log, f"pre{k}"))
            m.register_forward_hook(_record(log, f"fwd{k}"))
    x, y = torch.randn(5, 8, dtype=D), torch.randint(0, 3, (5,))
    _assert_same_step(model, native, x, y)
    assert (
        [t for t, _ in logs["manual"]]
        == [t for t, _ in logs["native"]]
        == [f"{w}{k}" for k in range(5) for w in ("pre", "fwd")]
    )


def test_pre_hook_that_changes_the_input_changes_the_output():
    model, native = _pair()
    for net in (model, native):
        net[0].register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    x, y = torch.randn(5, 8, dtype=D), torch.randint(0, 3, (5,))
    _assert_same_step(model, native, x, y)
    assert not torch.allclose(model(x), manualbp.MLP.from_torch(nn.Sequential(*native))(x))


def test_forward_hook_captures_features_and_can_replace_the_output():
    model, native = _pair("sigmoid")
    features = {}
    model[1].register_forward_hook(lambda m, i, o: features.setdefault("a1", o))
    model[2].register_forward_hook(lambda m, i, o: o + 1.0)
    native[2].register_forward_hook(lambda m, i, o: o + 1.0)
    x, y = torch.randn(5, 8, dtype=D), torch.randint(0, 3, (5,))
    _assert_same_step(model, native, x, y)
    assert torch.equal(features["a1"], torch.sigmoid(native[0](x)).detach())


def test_full_backward_hooks_see_the_same_gradients():
    model, native = _pair("tanh")
    seen = {"manual": [], "native": []}
    for name, net in (("manual", model), ("native", native)):
        for m in (net[0], net[1], net[4]):
            m.register_full_backward_hook(lambda mod, gi, go, log=seen[name]: log.append(go[0].clone()))
    x, y = torch.randn(5, 8, dtype=D), torch.randint(0, 3, (5,))
    _assert_same_step(model, native, x, y)
    assert len(seen["manual"]) == len(seen["native"]) == 3
    for a, b in zip(seen["manual"], seen["native"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_global_module_hooks_fire_per_layer():
    model, native = _pair()
    counts = {"manual": 0, "native": 0}
    x = torch.randn(3, 8, dtype=D)
    for name, net in (("manual", model), ("native", native)):

        def hook(m, i, o, name=name):
            counts[name] += 1

        handle = nn.modules.module.register_module_forward_hook(hook)
        try:
            out = net(x)
        finally:
            handle.remove()
        assert out.shape == (3, 3)
    assert counts["manual"] == counts["native"] == 6  # five layers and the network itself


def test_removing_the_hooks_returns_to_the_one_function_path():
    model, _ = _pair()
    x = torch.randn(3, 8, dtype=D)
    handle = model[0].register_forward_hook(lambda m, i, o: None)
    assert type(model(x).grad_fn).__name__ == "LinearFunctionBackward"  # layer by layer
    handle.remove()
    assert type(model(x).grad_fn).__name__ != "LinearFunctionBackward"  # the whole network in one node


def test_prune_masks_the_weight_through_its_pre_hook():
    model, native = _pair()
    for net in (model, native):
        torch.manual_seed(3)
        prune.random_unstructured(net[2], "weight", amount=0.5)
    assert torch.equal(model[2].weight, native[2].weight) and bool((model[2].weight == 0).any())
    x, y = torch.randn(5, 8, dtype=D), torch.randint(0, 3, (5,))
    _assert_same_step(model, native, x, y)


# --------------------------------------------------------------------------------------------------
# 3. Parametrizations
# --------------------------------------------------------------------------------------------------
class _Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).mT


def _apply_weight_norm(layer):
    parametrizations.weight_norm(layer)


def _apply_orthogonal(layer):
    parametrizations.orthogonal(layer)


def _apply_spectral(layer):
    torch.manual_seed(7)  # spectral_norm draws its power-iteration vector
    parametrizations.spectral_norm(layer)


def _apply_old_spectral(layer):
    torch.manual_seed(7)
    torch.nn.utils.spectral_norm(layer)  # the older pre-hook form


def _apply_symmetric(layer):
    parametrize.register_parametrization(layer, "weight", _Symmetric())


@pytest.mark.parametrize(
    "apply",
    [_apply_weight_norm, _apply_orthogonal, _apply_spectral, _apply_old_spectral, _apply_symmetric],
    ids=["weight_norm", "orthogonal", "spectral_norm", "spectral_norm_prehook", "custom"],
)
def test_parametrized_layers_match_native_gradients(apply):
    model, native = _pair(widths=(6, [6, 6], 3))
    for net in (model, native):
        apply(net[2])
        net.eval()  # spectral_norm: no power-iteration update, so both read the same u
    x, y = torch.randn(5, 6, dtype=D), torch.randint(0, 3, (5,))
    _assert_same_step(model, native, x, y)
    names = sorted(n for n, _ in model.named_parameters())
    assert names == sorted(n for n, _ in native.named_parameters())
    assert any("orig" in n or "original" in n for n in names)


def test_parametrized_model_trains_with_the_one_function_path():
    model, native = _pair(widths=(6, [6], 3))
    for net in (model, native):
        parametrizations.weight_norm(net[0])
    x, y = torch.randn(9, 6, dtype=D), torch.randint(0, 3, (9,))
    assert type(model(x).grad_fn).__name__ != "LinearFunctionBackward"  # still one node for the network
    opts = [torch.optim.SGD(n.parameters(), lr=0.5, momentum=0.9) for n in (model, native)]
    for _ in range(3):
        for net, opt in zip((model, native), opts):
            opt.zero_grad()
            TF.cross_entropy(net(x), y).backward()
            opt.step()
    torch.testing.assert_close(model(x), native(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.to_torch()(x), native(x), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# 4. Opacus
# --------------------------------------------------------------------------------------------------
def _dp_step(make, mode):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(24, 6), torch.randint(0, 3, (24,)))
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(data, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=0.0,
            max_grad_norm=0.5,  # small enough that clipping acts
            grad_sample_mode=mode,
            poisson_sampling=False,
        )
    samples = []
    for x, y in loader:
        optimizer.zero_grad()
        TF.cross_entropy(model(x), y).backward()
        samples = [p.grad_sample.clone() for p in model.parameters()]
        optimizer.step()
    return samples, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_opacus_per_sample_gradients_and_dp_step_match_native(mode):
    pytest.importorskip("opacus")
    torch.manual_seed(1)
    base = manualbp.MLP(6, [5], 3, activation="tanh")
    mine = _dp_step(lambda: copy.deepcopy(base), mode)
    ref = _dp_step(base.to_torch, mode)
    for a, b in zip(mine[0] + mine[1], ref[0] + ref[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert mine[0][0].shape == (8, 5, 6)  # one dL/dW^1 per example


def test_opacus_hooks_mode_uses_the_hand_derived_per_example_formula():
    pytest.importorskip("opacus")
    from opacus import GradSampleModule

    from manualbp import _opacus

    _opacus.register()
    assert GradSampleModule.GRAD_SAMPLERS[manualbp.Linear] is _opacus.compute_linear_grad_sample
    layer = manualbp.Linear(4, 3, dtype=D)
    a, g = torch.randn(5, 4, dtype=D), torch.randn(5, 3, dtype=D)
    out = _opacus.compute_linear_grad_sample(layer, [a], g)
    for n in range(5):  # each example's own dL/dW = outer(dL/dz_n, a_n), dL/db = dL/dz_n
        torch.testing.assert_close(out[layer.weight][n], torch.outer(g[n], a[n]))
        torch.testing.assert_close(out[layer.bias][n], g[n])


def test_opacus_expanded_weights_mode_refuses_clearly():
    pytest.importorskip("opacus")
    with pytest.raises(TypeError, match="grad_sample_mode='hooks'"):
        _dp_step(lambda: manualbp.MLP(6, [5], 3), "ew")


# --------------------------------------------------------------------------------------------------
# 8. nn.Sequential habits and 9. seeded factories
# --------------------------------------------------------------------------------------------------
def test_indexing_length_and_iteration_as_sequential():
    model, native = _pair("leaky_relu")
    assert len(model) == len(native) == 5
    assert [type(m).__name__ for m in model] == ["Linear", "LeakyReLU", "Linear", "LeakyReLU", "Linear"]
    assert model[0] is model.linears[0] and model[-1] is model.linears[-1] and model[1] is model.activations[0]
    head = model[:2]
    assert isinstance(head, nn.Sequential) and list(head) == [model[0], model[1]]
    x = torch.randn(4, 8, dtype=D)
    torch.testing.assert_close(head(x), native[:2](x), rtol=0, atol=0)
    torch.testing.assert_close(model[2:](head(x)), model(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(IndexError, match="out of range"):
        model[5]
    with pytest.raises(TypeError, match="int or a slice"):
        model["0"]


def test_to_torch_and_from_torch_draw_nothing_from_the_rng():
    torch.manual_seed(0)
    model = manualbp.MLP(8, [7], 3)
    state = torch.get_rng_state()
    native = model.to_torch()
    back = manualbp.MLP.from_torch(native)
    assert torch.equal(torch.get_rng_state(), state)
    x = torch.randn(2, 8)
    assert torch.equal(back(x), model(x)) and torch.equal(native(x), model(x))


def test_seeded_manual_and_native_factories_initialize_alike():
    """Seeded alike, a factory through manualbp and a native one give the same weights and leave the same RNG."""

    def manual():
        torch.manual_seed(0)
        net = manualbp.MLP(8, [7, 5], 3, activation="relu").to_torch()
        return net, torch.get_rng_state()

    def native():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
        return net, torch.get_rng_state()

    (a, state_a), (b, state_b) = manual(), native()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(state_a, state_b)  # whatever is drawn next (shuffles, dropout, data) is drawn alike


# --------------------------------------------------------------------------------------------------
# Libraries that already worked: skorch, Lightning
# --------------------------------------------------------------------------------------------------
def test_skorch_fits_like_native():
    skorch = pytest.importorskip("skorch")
    torch.manual_seed(0)
    X = torch.randn(64, 8).numpy()
    y = (X[:, 0] > 0).astype("int64")
    results = []
    for module in (manualbp.MLP(8, [6], 2, activation="tanh"),):
        for net_module in (module, module.to_torch()):
            torch.manual_seed(1)
            clf = skorch.NeuralNetClassifier(
                copy.deepcopy(net_module),
                criterion=nn.CrossEntropyLoss,
                max_epochs=3,
                lr=0.1,
                batch_size=16,
                train_split=None,
                verbose=0,
            )
            clf.fit(X, y)
            results.append(clf.predict_proba(X))
    torch.testing.assert_close(torch.from_numpy(results[0]), torch.from_numpy(results[1]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_lightning_trains_like_native(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    class Task(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, batch, _):
            x, y = batch
            return TF.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    base = manualbp.MLP(8, [6], 3, activation="tanh")
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    finals = []
    for net in (copy.deepcopy(base), base.to_torch()):
        task = Task(net)
        trainer = pl.Trainer(
            max_epochs=2,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            gradient_clip_val=0.5,
            default_root_dir=tmp_path,
        )
        trainer.fit(task, DataLoader(data, batch_size=16))
        finals.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_layer_by_layer_path_runs_the_hand_derived_layers(monkeypatch):
    """With hooks the network runs through LinearFunction (not autograd's linear) for every layer."""
    calls = []
    original = LinearFunction.backward

    def spy(ctx, grad_output):
        calls.append(tuple(grad_output.shape))
        return original(ctx, grad_output)

    monkeypatch.setattr(LinearFunction, "backward", staticmethod(spy))
    model, native = _pair()
    model[0].register_forward_hook(lambda m, i, o: None)
    x, y = torch.randn(5, 8, dtype=D), torch.randint(0, 3, (5,))
    _assert_same_step(model, native, x, y)
    assert calls == [(5, 3), (5, 5), (5, 7)]


@pytest.mark.slow
def test_torch_export_and_dynamo_onnx_export_match_native():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, native = _pair(dtype=torch.float32)
    x, x2 = torch.randn(4, 8), torch.randn(4, 8)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x2), native(x2), rtol=1e-6, atol=1e-6)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    f = io.BytesIO()
    onnx.save(program.model_proto, f)
    session = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    (out,) = session.run(None, {name: x2.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), native(x2).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "loss_fn, target",
    [
        (manualbp.CrossEntropyLoss(), torch.tensor([0, 2, 1, 1])),
        (manualbp.MSELoss(), torch.randn(4, 3)),
        (manualbp.SquaredErrorLoss(reduction="sum"), torch.randn(4, 3)),
    ],
    ids=["cross_entropy", "mse", "squared_error"],
)
def test_jit_trace_of_model_and_loss_saves_and_matches(loss_fn, target):
    model, native = _pair(dtype=torch.float32)
    x = torch.randn(4, 8)

    class Step(nn.Module):  # a module, so that the trace takes the parameters as parameters
        def __init__(self):
            super().__init__()
            self.model, self.loss_fn = model, loss_fn

        def forward(self, inp, tgt):
            return self.loss_fn(self.model(inp), tgt)

    step = Step()
    traced = torch.jit.trace(step, (x, target))
    assert "PythonOp" not in str(traced.graph)
    expected = loss_fn(model(x), target)
    loss = traced(x, target)
    torch.testing.assert_close(loss, expected)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
