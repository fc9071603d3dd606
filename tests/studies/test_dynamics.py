"""The training-dynamics sections (edge of stability, saturation) and their findings, on fake sweeps whose
numbers are chosen so that each verdict can be worked out by hand (and flips when the numbers do)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import fake_job, results_script

from manualbp import dynamics as D
from manualbp import studies as S


def _job(root: Path, num: int, overrides: list[str], config: dict, metrics: dict, history: list[dict]) -> None:
    fake_job(root, num, overrides, config, {"status": "completed", "wall_time_s": 1.0, **metrics}, history)


def _eos_sweep(root: Path, hover: bool = True) -> Path:
    """eta 0.2 (2/eta = 10): sharpness 2 -> 10 by step 40, then within 9-11 to step 100 (if hover); eta 0.1 never
    reaches 20. Sharpness every 5 steps, blank in between; the loss falls, rising every 10th step after 40."""
    sweep = root / "eos_study"
    for num, lr in enumerate([0.1, 0.2]):
        history = []
        for step in range(1, 101):
            if lr == 0.2:
                sharp = 2 + 8 * step / 40 if step <= 40 else ((9.5 if step % 10 else 10.5) if hover else 5.0)
            else:
                sharp = 2 + 0.1 * step
            loss = 2.0 / step + (0.01 if step > 40 and step % 10 == 0 else 0.0)
            history.append({"epoch": step, "train_loss": loss, "sharpness": sharp if step % 5 == 0 else None})
        _job(sweep, num, [f"optim.lr={lr}"], {"optim": {"lr": lr}}, {"sharpness_init": 2.0, "epochs": 100}, history)
    return sweep


def test_eos_table_and_findings_from_a_known_trajectory(tmp_path):
    jobs = S.load_sweep(_eos_sweep(tmp_path))
    sec = D.eos_section(jobs, tmp_path / "img", title="fake")
    fast = next(r for r in sec.runs if r.lr == 0.2)
    # 9 >= 0.9 x 10 first at step 35; the last measurement >= 0.8 x 10 is at step 100: the window is 35-100
    w = D.window(fast)
    assert fast.first_reach() == 35 and (w.first, w.last, w.in_band) == (35, 100, 1.0)
    assert w.mean_ratio == pytest.approx((9 + 10 + 6 * 9.5 + 6 * 10.5) / 14 / 10)  # steps 35, 40, then 45-100
    row = next(line for line in sec.markdown.splitlines() if line.startswith("| 0.200"))
    assert "65 (35-100)" in row and "| 1.00 " in row
    assert fast.loss_rises(35, 100) == pytest.approx(6 / 65)  # steps 50, 60, ..., 100 rose
    slow = next(r for r in sec.runs if r.lr == 0.1)
    assert slow.first_reach() is None and D.window(slow) is None
    results = results_script()
    text = results.eos_findings(sec, jobs)
    assert fast.sharpening() == (5, 3.0, 50, 10.5)  # the largest rise: from step 5 to step 50
    assert "Progressive sharpening (the sharpness rises by 25% or more during training): **reproduced** (2 of 2" in text
    assert "The edge of stability" in text and "**reproduced** (1 of 1" in text
    # no hovering: the sharpness drops far below 2/eta after reaching it
    flat = S.load_sweep(_eos_sweep(tmp_path / "flat", hover=False))
    assert "**not reproduced** (0 of 1 runs that reached 2/eta" in results.eos_findings(D.eos_section(flat, tmp_path / "img"), flat)
    assert (tmp_path / "img" / "results_eos.png").stat().st_size > 1000


def test_sharpening_is_the_largest_rise_between_an_early_fall_and_a_late_one():
    r = D.EosRun(None, 0.2, [0, 10, 20, 30, 40, 50], [25, 20, 8, 9, 12, 2])  # type: ignore[arg-type]
    assert r.sharpening() == (20, 8, 40, 12)  # not the fall from 25 (init) or 20, nor the late fall to 2


def test_window_runs_from_first_reach_to_the_last_time_at_the_edge():
    r = D.EosRun(None, 0.2, [0, 10, 20, 30, 40, 50, 60, 70], [2, 9, 13, 8.5, 9, 10.5, 8.1, 3])  # type: ignore[arg-type]
    w = D.window(r)
    assert (w.first, w.last) == (10, 60)  # 13 (1.3 x) is an excursion inside the window, 3 at step 70 is after it
    assert w.in_band == pytest.approx(5 / 6) and w.mean_ratio == pytest.approx((9 + 13 + 8.5 + 9 + 10.5 + 8.1) / 60)


def _saturation_sweep(root: Path) -> Path:
    sweep = root / "saturation_study"
    num = 0
    for act in ("sigmoid", "tanh"):
        for init in ("torch_default", "xavier_uniform"):
            history, init_metrics = [], {}
            for epoch in range(0, 31):
                rec = {"epoch": epoch, "train_loss": 1.0}
                for layer in (1, 2):
                    stuck = act == "sigmoid" and init == "torch_default" and layer == 2
                    mean = 0.5 - (0.48 * min(epoch, 5) / 5 if stuck else 0.0)
                    rec[f"act_mean_{layer}"] = mean
                    rec[f"act_p2_{layer}"] = mean - 0.01
                    rec[f"act_p98_{layer}"] = mean + (0.01 if stuck else 0.4)
                    # tanh standard: layer 1 reaches 10% saturation at epoch 10, layer 2 at 20; normalized: both at 5
                    start = (10 * layer) if init == "torch_default" else 5
                    rec[f"saturated_{layer}"] = 0.2 if act == "tanh" and epoch >= start else 0.0
                if epoch == 0:
                    init_metrics = {f"{k}_init": v for k, v in rec.items() if k not in ("epoch", "train_loss")}
                else:
                    history.append(rec)
            config = {"model": {"activation": act, "hidden": [8, 8]}, "init": {"name": init}, "seed": 0}
            overrides = [f"model.activation={act}", f"init={'standard' if init == 'torch_default' else init}", "seed=0"]
            _job(sweep, num, overrides, config, {"test_accuracy": 0.1 if act == "sigmoid" and init == "torch_default" else 0.5, **init_metrics}, history)
            num += 1
    return sweep


def test_saturation_section_and_findings(tmp_path):
    jobs = S.load_sweep(_saturation_sweep(tmp_path))
    sec = D.saturation_section(jobs, tmp_path / "img")
    row = next(line for line in sec.markdown.splitlines() if line.startswith("| sigmoid    | standard   | 2"))
    assert "0.020 (5)" in row and "0.030" in row  # lowest mean at epoch 5; 98th percentile at the end
    text = results_script().saturation_findings(sec, jobs)
    assert "driven to saturation at 0 under the standard init and not under the normalized one: **reproduced**" in text
    assert "layers 1-2: 10, 20" in text and "one after the other from the first" in text and "**reproduced**; under the normalized init they reach it together (epochs 5, 5)" in text


def test_results_only_eos_study_writes_its_section(tmp_path):
    multirun = tmp_path / "multirun"
    _eos_sweep(multirun)
    out = tmp_path / "docs" / "results.md"
    out.parent.mkdir()
    out.write_text("# Results\n\n## 1. Initialization x activation\n\nkept\n")
    assert results_script().main(["--multirun", str(multirun), "--out", str(out), "--only", "eos_study"]) == 0
    text = out.read_text()
    assert "## 6. Sharpness and the edge of stability" in text and "kept" in text
    assert "*Not run yet: no finished jobs in" in text and "eos_study_mse" in text  # the parts not run say so
    assert "experiment=eos_study progress=false" in text
