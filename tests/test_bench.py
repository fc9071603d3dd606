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
    report = bench.main(["--quick", "--epochs", "1", "--repeats", "1", "--target", "0.001", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench.json").read_text())
    expected = {"native", "manual", "fused", "vectorized-8"}
    if manualbp.native.load() is not None:  # the Python Functions beside the compiled nodes; the C++ epoch loop
        expected |= {"manual-python", "fused-epoch"}
    assert {r["contender"] for r in data["grid"]} >= expected
    assert data["machine"]["compiled_kernels"] == (manualbp.native.load() is not None)
    assert all(r["ratio"] <= 1.0 for r in data["saved"])
    assert "| digits" not in (tmp_path / "bench.md").read_text()
    assert report["digits"][0]["test_accuracy"] > 0
