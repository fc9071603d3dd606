"""The learning-rate finder (manualbp.train.lr_find): schedule, smoothing, divergence, suggestions, CLI."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from helpers import README

from manualbp.cli import main
from manualbp.train import lr_find
from manualbp.train.backends import ManualBackend
from manualbp.train.lr_finder import (
    LRFinderResult,
    exponential_lrs,
    smooth_losses,
    suggest_lr,
    suggest_min10,
    suggest_steep,
    suggest_valley,
)

IRIS = {"data": "iris", "model": {"hidden": [8]}, "optim": {"batch_size": 16}, "progress": False}


@pytest.fixture
def seen_lrs(monkeypatch):
    """The rate each ManualBackend step actually ran with (read from the optimizer, not from the result)."""
    lrs: list[float] = []
    step = ManualBackend.step

    def spy(self, x, y):
        lrs.append(self.optimizer.param_groups[0]["lr"])
        return step(self, x, y)

    monkeypatch.setattr(ManualBackend, "step", spy)
    return lrs


def test_schedule_is_exponential_from_min_to_max(seen_lrs):
    result = lr_find(IRIS, min_lr=1e-5, max_lr=3.0, num_steps=25, diverge_factor=None)
    expected = np.logspace(np.log10(1e-5), np.log10(3.0), 25)
    assert result.status == "completed" and len(result.lrs) == 25
    np.testing.assert_allclose(seen_lrs, expected, rtol=1e-12)
    np.testing.assert_allclose(result.lrs, expected, rtol=1e-12)
    assert seen_lrs[0] == 1e-5 and seen_lrs[-1] == 3.0  # the ends exactly
    ratios = np.asarray(seen_lrs[1:]) / np.asarray(seen_lrs[:-1])
    np.testing.assert_allclose(ratios, (3.0 / 1e-5) ** (1 / 24), rtol=1e-12)
    assert exponential_lrs(1e-5, 3.0, 25) == result.lrs
    assert exponential_lrs(0.1, 10.0, 3) == pytest.approx([0.1, 1.0, 10.0], rel=1e-15)


def test_smoothing_matches_a_hand_computation():
    # beta 0.5: avg = 0.5, 1.25, 2.125; / (1 - 0.5^k) = 1, 1.25/0.75, 2.125/0.875
    assert smooth_losses([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 17 / 7], rel=1e-15)
    assert smooth_losses([4.0, 1.0], 0.0) == [4.0, 1.0]
    result = lr_find(IRIS, num_steps=30, smoothing=0.9, max_lr=1.0)
    losses = np.asarray(result.losses)
    # the bias-corrected EMA as a weighted mean: sum_j beta^(k-j) (1 - beta) l_j / (1 - beta^(k+1))
    expected = [
        sum(0.9 ** (k - j) * 0.1 * losses[j] for j in range(k + 1)) / (1 - 0.9 ** (k + 1)) for k in range(len(losses))
    ]
    np.testing.assert_allclose(result.smoothed, expected, rtol=1e-12)
    assert result.smoothed[0] == result.losses[0]
    assert np.std(np.diff(result.smoothed)) < np.std(np.diff(result.losses))  # it does smooth


def test_divergence_stops_the_run():
    cfg = {"data": "digits", "model": {"activation": "relu"}, "optim": {"batch_size": 32}, "progress": False}
    result = lr_find(cfg, min_lr=1e-3, max_lr=1e4, num_steps=60)
    assert result.status == "diverged"
    k = result.diverged_at
    assert k is not None and k < 59 and len(result.lrs) == len(result.losses) == k + 1
    assert f"diverged at step {k}" in result.stop_reason
    s = result.smoothed
    last_ok = all(s[i] <= 4.0 * min(s[: i + 1]) for i in range(k))
    assert last_ok and (not math.isfinite(s[k]) or s[k] > 4.0 * min(s))
    # a looser factor lets the run go further
    looser = lr_find(cfg, min_lr=1e-3, max_lr=1e4, num_steps=60, diverge_factor=50.0)
    assert looser.diverged_at is None or looser.diverged_at > k


def test_non_finite_loss_stops_even_without_a_factor():
    cfg = {"data": "digits", "model": {"activation": "relu"}, "optim": {"batch_size": "full"}, "progress": False}
    result = lr_find(cfg, min_lr=1.0, max_lr=1e12, num_steps=40, diverge_factor=None)
    assert result.status == "diverged" and not math.isfinite(result.losses[-1])
    assert all(math.isfinite(v) for v in result.losses[:-1])
    assert result.suggestion is not None and result.suggestion < result.lrs[-1]


LRS = [10.0**e for e in range(-6, 3)]  # 9 rates, one per decade


def test_steep_on_hand_made_curves():
    assert suggest_steep(LRS, [5, 5, 4, 1, 0.9, 0.8, 0.7, 2, 9]) == (2, LRS[2])  # drop 3 between 2 and 3
    # slope against log(lr): a drop of 1 over a tiny log-step beats a drop of 2 over a decade
    lrs = [1e-3, 1e-2, 1.1e-2, 1e-1]
    assert suggest_steep(lrs, [3.0, 1.0, 0.0, -0.5]) == (1, 1e-2)


def test_valley_on_hand_made_curves():
    # longest decreasing run: indices 0..6 (lds[6] = 7); fastai's start = 6 - 7 = -1, len 7:
    # index = -1 + int(7/3) + int(7/6) = 2
    losses = [3.0, 2.9, 2.5, 2.0, 1.5, 1.0, 0.8, 1.5, 3.0]
    assert suggest_valley(LRS, losses) == (2, LRS[2])
    # a noisy plateau then a long descent: the valley is in the descent, not on the plateau
    losses = [2.0, 2.1, 2.0, 2.1, 1.9, 1.6, 1.2, 0.8, 0.5, 0.3, 0.2, 0.6]
    lrs = [10.0 ** (e / 2) for e in range(-10, 2)]
    k, lr = suggest_valley(lrs, losses)
    assert 5 <= k <= 8 and lr == lrs[k]


def test_min10_on_hand_made_curves():
    assert suggest_min10(LRS, [5, 4, 3, 2, 1, 0.5, 2, 9, 9]) == (5, LRS[5] / 10)


def test_suggest_lr_trims_like_fastai():
    lrs = [10.0 ** (e / 10) for e in range(-60, 40)]  # 100 points
    losses = [1.0] * 100
    losses[3] = -5.0  # inside the first tenth: skipped
    losses[97] = -5.0  # inside the last five: skipped
    losses[50] = 0.0
    assert suggest_lr(lrs, losses, "min10") == (50, lrs[50] / 10)
    losses[60] = float("nan")  # the curve is cut at the first non-finite loss
    losses[70] = -9.0
    assert suggest_lr(lrs, losses, "min10") == (50, lrs[50] / 10)
    assert suggest_lr(lrs, [float("nan")] * 100, "steep") == (None, None)
    with pytest.raises(ValueError, match="suggestion must be one of"):
        suggest_lr(lrs, losses, "median")


def test_the_suggestion_is_the_chosen_rule_on_the_smoothed_curve():
    result = lr_find(IRIS, num_steps=40, max_lr=1.0, suggestion="valley")
    assert result.method == "valley" and result.suggestion == suggest_lr(result.lrs, result.smoothed, "valley")[1]
    assert set(result.suggestions) == {"steep", "valley", "min10"}
    assert result.suggestions["steep"] == suggest_lr(result.lrs, result.smoothed, "steep")[1]


def test_deterministic_per_seed():
    a = lr_find({**IRIS, "seed": 3}, num_steps=30, max_lr=1.0)
    b = lr_find({**IRIS, "seed": 3}, num_steps=30, max_lr=1.0)
    c = lr_find({**IRIS, "seed": 4}, num_steps=30, max_lr=1.0)
    assert a.losses == b.losses and a.suggestions == b.suggestions
    assert a.losses != c.losses


@pytest.mark.parametrize("batch_size", [16, "full"])
def test_manual_and_autograd_give_the_same_curve_in_float64(batch_size):
    cfg = {**IRIS, "dtype": "float64", "optim": {"batch_size": batch_size, "momentum": 0.9}}
    manual = lr_find({**cfg, "backend": "manual"}, num_steps=40, max_lr=3.0)
    native = lr_find({**cfg, "backend": "autograd"}, num_steps=40, max_lr=3.0)
    assert len(manual.losses) == len(native.losses) > 10
    torch.testing.assert_close(torch.tensor(manual.losses), torch.tensor(native.losses), rtol=1e-10, atol=1e-12)
    assert manual.suggestions == pytest.approx(native.suggestions, rel=1e-10)


def test_fused_backend_runs_the_same_test():
    cfg = {**IRIS, "dtype": "float64"}
    fused = lr_find({**cfg, "backend": "fused"}, num_steps=30, max_lr=1.0)
    manual = lr_find(cfg, num_steps=30, max_lr=1.0)
    torch.testing.assert_close(torch.tensor(fused.losses), torch.tensor(manual.losses), rtol=1e-9, atol=1e-12)


def test_config_is_not_mutated():
    cfg = {"data": {"name": "iris"}, "model": {"hidden": [8], "activation": "tanh"}, "optim": {"batch_size": 8, "lr": 0.5}}
    before = copy.deepcopy(cfg)
    result = lr_find(cfg, num_steps=10, progress=False)
    assert cfg == before
    assert result.config["optim"]["lr"] == 0.5  # the resolved config, the finder's own copy
    result.config["model"]["hidden"].append(3)
    assert cfg == before


def test_result_to_dict_table_and_plot(tmp_path):
    result = lr_find(IRIS, num_steps=20, max_lr=1.0)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["lrs"] == result.lrs and d["status"] == "completed" and d["suggestion"] == result.suggestion
    marks = {"2/lambda_max": 0.5, "along training": [0.4, 0.3]}
    table = result.table(marks)
    assert "suggestion: steep *" in table and "2/lambda_max" in table and "along training [1]" in table
    assert f"{0.5 / result.suggestion:.3g}" in table
    path = tmp_path / "sub" / "lr.png"
    ax = result.plot(path, marks=marks)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ax.get_xscale() == "log"
    labels = ax.get_legend_handles_labels()[1]
    assert any(label.startswith("steep:") for label in labels) and any("2/lambda_max" in label for label in labels)
    with pytest.raises(ValueError, match="marks"):
        result.table({"bad": -1.0})
    assert isinstance(result, LRFinderResult)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_lr": 1.0, "max_lr": 1.0}, "min_lr must be below max_lr"),
        ({"min_lr": 0.0}, "min_lr must be a positive number"),
        ({"max_lr": float("inf")}, "max_lr must be a positive number"),
        ({"num_steps": 1}, "num_steps must be an integer >= 2"),
        ({"num_steps": 10.0}, "num_steps must be an integer >= 2"),
        ({"suggestion": "median"}, "suggestion must be one of steep, valley, min10"),
        ({"smoothing": 1.0}, r"smoothing must be a number in \[0, 1\)"),
        ({"diverge_factor": 0.5}, "diverge_factor must be a number > 1"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lr_find(IRIS, **kwargs)


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="optim.batch_size"):
        lr_find({"optim": {"batch_size": 0}})


def test_cli_prints_the_suggestion_and_writes_plot_and_json(tmp_path, capsys):
    plot, out = tmp_path / "lr.png", tmp_path / "lr.json"
    argv = ["lr-find", "data=iris", "--steps", "30", "model.hidden=[8]", "optim.batch_size=16", "progress=false"]
    argv += ["--max-lr", "1", "--suggestion", "valley", "--plot", str(plot), "--json", str(out)]
    argv += ["--mark", "2/lambda_max=0.5"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    expected = lr_find(IRIS, num_steps=30, max_lr=1.0, suggestion="valley")
    assert f"suggested learning rate (valley): {expected.suggestion}" in text
    assert "hidden [8]" in text and "batch 16" in text and "2/lambda_max" in text
    assert plot.read_bytes()[:4] == b"\x89PNG"
    data = json.loads(out.read_text())
    assert data["losses"] == expected.losses and data["marks"] == {"2/lambda_max": 0.5}


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--min-lr", "2", "--max-lr", "1"], "min_lr must be below max_lr"),
        (["optim.bogus=1"], "optim.bogus"),
        (["model.hidden=[8"], "cannot parse the value"),
        (["nokey"], "expected KEY=VALUE"),
        (["model=1", "model.hidden=2"], "already set"),
        (["--steps", "1"], "num_steps"),
        (["--mark", "x"], "--mark"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, match, capsys):
    assert main(["lr-find", "data=iris", "--steps", "5", *argv]) == 2  # a repeated --steps: the last one counts
    err = capsys.readouterr().err.strip()
    assert err.startswith("manualbp lr-find: error:") and match in err and "\n" not in err


def test_readme_recipe_runs(tmp_path, monkeypatch, capsys):
    import re

    text = README.read_text()
    block = re.search(r"<!-- readme-lr-find -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README's lr_find recipe is missing"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {})
    assert (tmp_path / "lr_find.png").stat().st_size > 0
    assert "suggestion: steep *" in capsys.readouterr().out


def test_cli_bad_option_after_an_override_is_argparse_style(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["lr-find", "data=iris", "--steps", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "manualbp lr-find: error: argument --steps: invalid int value: 'x'"
