"""The mutation catalogue reaches the compiled paths: inject_bug's runtime switch in manualbp/csrc.

With the extension on (``MANUALBP_NATIVE`` untouched), an injected bug changes the C++ module nodes' gradients
and the C++ fused loop's trajectory, to the same wrong value as the bug's Python patch computes on the Python
path; the switch alone (no Python patch) does it for every bug with a C++ site; every catalogue bug either has
a code in the extension's table or is listed in ``KERNEL_FREE``; the switch is reset on exit.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch import nn

from manualbp import native
from manualbp import nn as mnn
from manualbp.fast import FusedTrainer
from manualbp.verify import bugs as B
from manualbp.verify import mutation as M

pytestmark = pytest.mark.skipif(
    native.mode() == "off" or native.load() is None,
    reason="manualbp's compiled kernels are off (MANUALBP_NATIVE=off) or could not be built: no C++ path to break",
)

_MODULE_BUGS = sorted(name for name, bug in B.CATALOGUE.items() if bug.reach("module-native") is None)
_FUSED_BUGS = sorted(name for name, bug in B.CATALOGUE.items() if bug.reach("fused-native") is None)


def _module_grads(name: str | None, python: bool = False, setting: str | None = None) -> list[torch.Tensor]:
    """dL/dx and every dL/dp of the mutation matrix's MLP in the setting of bug ``setting or name``, one
    backward, under ``name``."""
    s = M._setting(B.CATALOGUE[setting or name] if (setting or name) else None)
    model = M._model(s["activation"], 0)
    x, y = M._data(s["loss"], M._BATCH)
    x.requires_grad_(True)
    with B.python_paths() if python else contextlib.nullcontext(), B.inject_bug(name):
        out = model(x)
        if s["loss"] == "softmax":
            loss = -mnn.Softmax()(out).gather(1, y.unsqueeze(1)).log().mean()
        else:
            loss = M._manual_loss(s["loss"], s["reduction"])(out, y)
        loss.backward()
    assert ("MLPNode" in out.grad_fn.name()) != python  # the C++ node ran, or the Python Function
    return [x.grad] + [p.grad for p in model.parameters()]


def _fused_trajectory(name: str | None, sgd: dict, python: bool = False, setting: str | None = None) -> list:
    """The fused trainer's parameters after three step_many steps in the bug's setting, under ``name``."""
    s = M._setting(B.CATALOGUE[setting or name] if (setting or name) else None)
    x, y = M._data(s["loss"], M._BATCH * M._STEPS)
    trainer = FusedTrainer(M._model(s["activation"], 0), M._manual_loss(s["loss"], s["reduction"]), lr=0.1, **sgd)
    with B.python_paths() if python else M._native_calls("fused_step_many") as calls, B.inject_bug(name):
        trainer.step_many(*trainer.prepare(x, y), M._BATCH)
    assert python or calls["fused_step_many"] == 1  # the C++ loop ran
    return [p.detach().clone() for p in trainer.model.flat_parameters()]


def _sgd_of(name: str) -> list[dict]:
    optim = M._setting(B.CATALOGUE[name])["optim"]
    return [M._SGD[optim]] if optim != "plain" else [{}, M._WITH_STATE]


def _close(a: list, b: list) -> bool:
    return all(torch.allclose(u, v, rtol=1e-10, atol=1e-12) for u, v in zip(a, b, strict=True))


def test_every_catalogue_bug_with_a_kernel_site_has_a_code_and_the_codes_are_the_extensions():
    codes = native.bug_codes()
    assert set(codes) == set(B.CATALOGUE) - set(B.KERNEL_FREE)  # no bug with a C++ site lacks a code
    assert set(B.KERNEL_FREE) <= set(B.CATALOGUE)
    assert sorted(codes.values()) == list(range(1, len(codes) + 1))  # 0 is "no bug"
    module = native.load()
    with pytest.raises(ValueError, match=rf"set_bug: code must be in \[0, {len(codes)}\], got {len(codes) + 1}"):
        module.set_bug(len(codes) + 1)  # one past the last code
    assert module.active_bug() == 0


def test_inject_bug_sets_the_switch_and_resets_it_on_exit_and_on_an_exception():
    module, codes = native.load(), native.bug_codes()
    with B.inject_bug("tanh_derivative_plus"):
        assert module.active_bug() == codes["tanh_derivative_plus"]
        with B.inject_bug("bias_grad_mean"):  # nested: the kernels see the innermost
            assert module.active_bug() == codes["bias_grad_mean"]
        assert module.active_bug() == codes["tanh_derivative_plus"]
        with B.inject_bug("mse_missing_factor_two"):  # no C++ site: the kernels stay right
            assert module.active_bug() == 0
    assert module.active_bug() == 0
    with pytest.raises(KeyError):
        with B.inject_bug("weight_decay_sign"):
            assert module.active_bug() == codes["weight_decay_sign"]
            raise KeyError("inside the block")
    assert module.active_bug() == 0


def test_a_bug_set_before_the_build_is_applied_when_the_extension_loads(monkeypatch):
    module = native.load()
    monkeypatch.setattr(native, "_loaded", [None])  # as if the extension were not loaded yet
    assert native.set_bug("relu_derivative_ones") is None
    assert module.active_bug() == 0  # nothing loaded to switch
    native._switch(module)  # what _built does after building
    assert module.active_bug() == native.bug_codes()["relu_derivative_ones"]
    native.set_bug(None)
    native._switch(module)
    assert module.active_bug() == 0


@pytest.mark.parametrize("name", ["tanh_derivative_plus", "cross_entropy_grad_sign"])
def test_an_activation_and_a_loss_bug_flip_the_compiled_module_and_fused_loop(name):
    """MANUALBP_NATIVE stays on: the C++ module's gradients and the C++ fused loop's trajectory change."""
    assert native.mode() != "off"
    clean, broken = _module_grads(None, setting=name), _module_grads(name)
    assert not _close(broken, clean)
    assert _close(_module_grads(None, setting=name), clean)  # restored on exit
    sgd = _sgd_of(name)[0]
    clean_run, broken_run = _fused_trajectory(None, sgd, setting=name), _fused_trajectory(name, sgd)
    assert not _close(broken_run, clean_run)


@pytest.mark.parametrize("name", _MODULE_BUGS)
def test_the_compiled_module_computes_each_bug_as_its_python_patch_does(name):
    broken = _module_grads(name)
    assert _close(broken, _module_grads(name, python=True))
    assert not _close(broken, _clean_module(name))  # and it is wrong (native autograd on the twin)


def _clean_module(name: str) -> list:
    s = M._setting(B.CATALOGUE[name])
    model = M._model(s["activation"], 0)
    x, y = M._data(s["loss"], M._BATCH)
    x.requires_grad_(True)
    twin = model.to_torch()  # the reference: native autograd, float64
    out = twin(x)
    if s["loss"] == "softmax":
        loss = -nn.functional.softmax(out, -1).gather(1, y.unsqueeze(1)).log().mean()
    else:
        loss = M._torch_loss(s["loss"], s["reduction"])(out, y)
    loss.backward()
    return [x.grad] + [p.grad for p in twin.parameters()]


@pytest.mark.parametrize("name", _FUSED_BUGS)
def test_the_compiled_fused_loop_computes_each_bug_as_its_python_patch_does(name):
    for sgd in _sgd_of(name):
        broken = _fused_trajectory(name, sgd)
        assert _close(broken, _fused_trajectory(name, sgd, python=True)), sgd
    s = M._setting(B.CATALOGUE[name])
    x, y = M._data(s["loss"], M._BATCH * M._STEPS)
    expected = [M._reference_steps(M._model(s["activation"], 0), s, sgd, x, y) for sgd in _sgd_of(name)]
    runs = [_fused_trajectory(name, sgd) for sgd in _sgd_of(name)]
    assert any(M._differ(run, ref) for run, ref in zip(runs, expected))  # and it is wrong (torch.optim.SGD)


@pytest.mark.parametrize("name", sorted(B.CATALOGUE))
def test_the_switch_alone_breaks_exactly_the_bugs_with_a_kernel_site(name):
    """No Python patch: native.set_bug only. A bug with a C++ site changes a compiled path; one in KERNEL_FREE
    changes neither (its formula is read from Python there)."""
    module_path = B.CATALOGUE[name].reach("module-native") is None
    fused_path = B.CATALOGUE[name].reach("fused-native") is None
    configs = _sgd_of(name) if fused_path else []
    clean_m = _module_grads(None, setting=name) if module_path else None
    clean_f = [_fused_trajectory(None, sgd, setting=name) for sgd in configs]
    previous = native.set_bug(name)
    try:
        changed_m = module_path and not _close(_module_grads(None, setting=name), clean_m)
        changed_f = any(not _close(_fused_trajectory(None, sgd, setting=name), r) for sgd, r in zip(configs, clean_f))
    finally:
        native.set_bug(previous)
    has_site = name not in B.KERNEL_FREE
    assert changed_m == (module_path and has_site)
    assert changed_f == (fused_path and has_site and name not in _SCALE_FROM_PYTHON)


#: the C++ fused loop takes the reduction's factor from fast.fused.loss_scales (the C++ module's cross-entropy
#: node computes it itself): these two bugs reach fused-native through their Python patch only
_SCALE_FROM_PYTHON = {"mean_reduction_missing_1_over_n", "sum_reduction_divided_by_n"}


def test_inject_bug_leaves_manualbp_native_on():
    before = os.environ.get("MANUALBP_NATIVE")
    with B.inject_bug("sigmoid_missing_derivative"):
        assert os.environ.get("MANUALBP_NATIVE") == before and native.load() is not None
        model = M._model("sigmoid", 0)
        assert "MLPNode" in model(torch.randn(2, 3, dtype=torch.float64)).grad_fn.name()
