"""scripts/bench.py runs end to end on a tiny setting and writes its JSON and markdown (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import ROOT

import manualbp


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_step_flops_and_saved_bytes_helpers():
    bench = _load_bench()
    assert bench.step_flops(64, [64], 10, 32) == 3 * (2 * 32 * 64 * 64 + 2 * 32 * 64 * 10)
    model = manualbp.MLP(8, [16], 4)
    import torch

    assert bench.saved_bytes(model, torch.randn(5, 8)) <= bench.saved_bytes(model.to_torch(), torch.randn(5, 8))


@pytest.mark.slow
def test_bench_quick_writes_report(tmp_path, monkeypatch):
    bench = _load_bench()
    monkeypatch.setattr(bench, "QUICK_GRID", bench.GRID[:1])
    monkeypatch.setattr(bench, "limit_threads", lambda t: None)  # the test process keeps its threads and CPUs
    argv = ["--quick", "--epochs", "1", "--repeats", "1", "--target", "0.001", "--threads", "1", "--out", str(tmp_path)]
    report = bench.main(argv)
    data = json.loads((tmp_path / "bench.json").read_text())
    expected = {"native", "manual", "fused", "vectorized-8"}
    if manualbp.native.load() is not None:  # the Python Functions beside the compiled nodes; the C++ epoch loop
        expected |= {"manual-python", "fused-epoch"}
    assert {r["contender"] for r in data["grid"]} >= expected
    assert data["machine"]["compiled_kernels"] == (manualbp.native.load() is not None)
    assert all(r["ratio"] <= 1.0 for r in data["saved"])
    assert "| digits" not in (tmp_path / "bench.md").read_text()
    assert report["digits"][0]["test_accuracy"] > 0


# ---------------------------------------------------------------------------------------------------
# The anchors (issue 18): each contender runs on a tiny size and its own correctness check holds
# ---------------------------------------------------------------------------------------------------
def _tiny(seed: int = 0, batch: int = 6):
    import torch

    torch.manual_seed(seed)
    model = manualbp.MLP(5, [7, 6], 3, activation="sigmoid").to_torch()
    return model, torch.randn(batch, 5), torch.randint(0, 3, (batch,))


def test_func_ensemble_gradients_and_update_equal_per_model_autograd():
    import torch

    bench = _load_bench()
    models = [_tiny(seed)[0] for seed in range(3)]
    _, x, y = _tiny()
    lrs = [0.1, 0.5, 1.0]
    step = bench.func_ensemble_step(models, x, y, lrs)
    grads = step.grads()
    losses = step()
    for i, (model, lr) in enumerate(zip(models, lrs)):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert torch.allclose(losses[i], loss.detach(), atol=1e-6)
        for name, p in model.named_parameters():
            assert torch.allclose(grads[name][i], p.grad, atol=1e-6), name
            assert torch.allclose(step.params[name][i], p.detach() - lr * p.grad, atol=1e-6), name


def test_anchor_rows_say_jax_is_missing(monkeypatch):
    bench = _load_bench()
    monkeypatch.setattr(bench, "load_jax", lambda: None)
    _, x, y = _tiny()
    anchors = bench.Anchors({}, {})
    anchors.ensemble([_tiny(s)[0] for s in range(2)], x, y, [0.1, 0.2])
    assert set(anchors.contenders) == {"func-ensemble-2"} and anchors.refs["func-ensemble-2"] == "vectorized-2"
    assert anchors.missing == {"jax-vmap-2": bench.JAX_MISSING}
    report = {
        "machine": {"device": "cpu", "torch": "x", "threads": 1, "date": "today"},
        "gemm_gflops": 1.0,
        "dtype": "float32",
        "grid": [{"size": "tiny", "contender": "jax-vmap-2", "note": bench.JAX_MISSING}],
        "saved": [],
    }
    assert f"| tiny | jax-vmap-2 | {bench.JAX_MISSING} |" in bench.markdown(report)


def test_summary_table_has_one_column_per_thread_count():
    bench = _load_bench()
    grid = [
        {"size": "s", "contender": "fused", "time_per_config_s": 1.0},
        {"size": "s", "contender": "jax-jit-step", "ref": "fused", "ratio_ref": 1.25},
        {"size": "s", "contender": "jax-vmap-8", "note": bench.JAX_MISSING},
    ]
    runs = [{"machine": {"threads": t}, "grid": grid, "digits": []} for t in (1, 2)]
    text = bench.summary_markdown(runs)
    assert "| size | anchor | manualbp row | 1 thread(s) | 2 thread(s) |" in text
    assert "| s | jax-jit-step | fused | 1.250 | 1.250 |" in text
    assert f"| s | jax-vmap-8 |  | {bench.JAX_MISSING} | {bench.JAX_MISSING} |" in text


def test_limit_threads_holds_torch_blas_and_xla_to_one_thread():
    import os
    import subprocess
    import sys

    code = (
        "import importlib.util, os, torch\n"
        f"spec = importlib.util.spec_from_file_location('bench', {str(ROOT / 'scripts' / 'bench.py')!r})\n"
        "b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n"
        "b.limit_threads(1)\n"
        "print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'], len(os.sched_getaffinity(0)))\n"
        "print(os.environ['XLA_FLAGS'])\n"
    )
    env = {**os.environ, "XLA_FLAGS": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    first, flags = out.strip().splitlines()
    assert first == "1 1 1"
    assert "--xla_cpu_multi_thread_eigen=false" in flags and "intra_op_parallelism_threads=1" in flags


def test_jax_loss_equals_torch_after_three_steps():
    pytest.importorskip("jax")
    bench = _load_bench()
    model, x, y = _tiny()
    mine, ref = bench.jax_losses(bench.load_jax(), model, x, y, lr=0.5, steps=3)
    assert len(mine) == 3 and mine[0] != mine[2]  # it trained
    assert max(abs(a - b) for a, b in zip(mine, ref)) < 1e-5


def test_jax_step_scan_and_vmap_contenders_agree_with_each_other():
    pytest.importorskip("jax")
    import numpy as np

    bench = _load_bench()
    jax = bench.load_jax()
    model, x, y = _tiny()
    runs = bench.jax_step_contenders(jax, model, x, y, 0.5, 4)
    step, scan = runs["jax-jit-step"], runs["jax-scan-epoch"]  # each has run once (its compile call)
    losses = [float(step.loss)]
    for _ in range(3):
        step()
        losses.append(float(step.loss))
    step.sync()
    assert np.allclose(np.asarray(scan.loss), losses, atol=1e-6)  # scan: 4 steps on the same batch
    models = [_tiny(s)[0] for s in range(3)]
    vmap = bench.jax_vmap_contender(jax, models, x, y, [0.1, 0.5, 1.0])
    for i, (m, lr) in enumerate(zip(models, [0.1, 0.5, 1.0])):
        alone, _ = bench.jax_losses(jax, m, x, y, lr, steps=1)
        assert abs(float(vmap.loss[i]) - alone[0]) < 1e-6


def test_jax_digits_epochs_follow_the_bare_loops_batches():
    pytest.importorskip("jax")
    import numpy as np
    import torch

    bench = _load_bench()
    model, x, y = _tiny(batch=70)  # two batches of 32 and one of 6 per epoch
    ref = bench.copy.deepcopy(model)
    params, seconds, compile_s = bench.jax_digits_epochs(bench.load_jax(), model, x, y, 2, 0.5, 32)
    assert seconds > 0 and compile_s > 0
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        perm = torch.randperm(70, generator=g)
        for i in range(0, 70, 32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(x[perm[i : i + 32]]), y[perm[i : i + 32]]).backward()
            opt.step()
    linears = [m for m in ref if isinstance(m, torch.nn.Linear)]
    for (w, b), lin in zip(params, linears):
        assert np.allclose(np.asarray(w), lin.weight.detach().T.numpy(), atol=1e-5)
        assert np.allclose(np.asarray(b), lin.bias.detach().numpy(), atol=1e-5)


@pytest.mark.slow  # torch.compile: tens of seconds on a small CPU
def test_compile_native_step_trains_like_eager():
    import torch

    bench = _load_bench()
    model, x, y = _tiny()
    step, compile_s = bench.compile_native_step(bench.copy.deepcopy(model), x, y, lr=0.5)
    eager = bench.make_step(model, torch.nn.CrossEntropyLoss(), x, y, lr=0.5)
    losses = [eager().item()]  # the compiled step took its first step while compiling
    assert compile_s > 0
    for _ in range(2):
        compiled, reference = step().item(), eager().item()
        assert abs(compiled - reference) < 1e-5
        losses.append(reference)
    assert losses[0] != losses[-1]  # it trained
    for name, p in model.named_parameters():  # three steps each
        assert torch.allclose(step.params[name], p.detach(), atol=1e-5)
