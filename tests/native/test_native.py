"""manualbp.native: the compiled kernels build here, switch off cleanly, and equal the Python paths bit for bit."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import manualbp
from manualbp import native
from manualbp.fast import FusedTrainer

requires_native = pytest.mark.skipif(
    shutil.which("c++") is None, reason="no C++ compiler: manualbp runs its Python paths only"
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
