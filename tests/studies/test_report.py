"""report.py: a sweep's jobs become a table and plots; failed, diverged and incomplete jobs are listed."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from manualbp.report import collect_jobs, main_cli, make_report


def make_job(root: Path, num: int, overrides: list[str], config: dict, metrics: dict | None, epochs: int = 5):
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "config.json").write_text(json.dumps(config))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
        with (job / "history.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(
                fh, ["epoch", "train_loss", "val_loss", "val_accuracy", "lr", "grad_norm_0", "grad_norm_1"]
            )
            writer.writeheader()
            for e in range(1, epochs + 1):
                writer.writerow(
                    {
                        "epoch": e,
                        "train_loss": 1 / e,
                        "val_loss": 1.2 / e,
                        "val_accuracy": 1 - 0.5 / e,
                        "lr": config["optim"]["lr"],
                        "grad_norm_0": 0.01 / e,
                        "grad_norm_1": 0.1 / e,
                    }
                )
    return job


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun" / "2026-11-26" / "06-00-00"
    k = 0
    for init in ("zeros", "xavier_uniform"):
        for lr in (0.01, 0.1, 10.0):
            cfg = {
                "init": {"name": init},
                "optim": {"lr": lr},
                "stopping": {"max_epochs": 5, "early_stopping": {"patience": 2}},
            }
            over = [f"init={init}", f"optim.lr={lr}"]
            if lr == 10.0 and init == "xavier_uniform":
                metrics = {
                    "status": "diverged",
                    "stop_reason": "divergence: non-finite loss",
                    "epochs": 2,
                    "test_accuracy": 0.1,
                    "test_loss": float("nan"),
                }
                make_job(root, k, over, cfg, metrics, epochs=2)
            elif lr == 10.0:
                metrics = {"status": "failed", "error": "FileNotFoundError: data.path '/nope.npz' does not exist"}
                make_job(root, k, over, cfg, None)
                (root / str(k) / "metrics.json").write_text(json.dumps(metrics))
            else:
                acc = 0.1 if init == "zeros" else 0.9 + lr / 10
                metrics = {
                    "status": "completed",
                    "stop_reason": "max_epochs",
                    "epochs": 5,
                    "steps": 50,
                    "test_accuracy": acc,
                    "test_loss": 1 - acc,
                    "val_loss": 0.3,
                    "wall_time_s": 1.0,
                }
                make_job(root, k, over, cfg, metrics)
            k += 1
    # a job that was killed before writing anything
    make_job(
        root,
        k,
        ["init=xavier_uniform", "optim.lr=1.0"],
        {"init": {"name": "xavier_uniform"}, "optim": {"lr": 1.0}, "stopping": {"max_epochs": 5}},
        None,
    )
    return root


def test_collects_every_job_in_numeric_order(sweep):
    jobs = collect_jobs(sweep)
    assert [j.name for j in jobs] == [str(i) for i in range(7)]
    assert [j.status for j in jobs] == [
        "completed",
        "completed",
        "failed",
        "completed",
        "completed",
        "diverged",
        "incomplete",
    ]
    assert jobs[0].history[-1]["epoch"] == 5 and jobs[0].history[0]["grad_norm_1"] == pytest.approx(0.1)


def test_table_lists_status_reason_and_errors(sweep):
    result = make_report(sweep)
    md = (sweep / "report" / "report.md").read_text()
    assert "7 jobs: 4 completed, 1 diverged, 1 failed, 1 incomplete" in md
    assert "FileNotFoundError: data.path '/nope.npz' does not exist" in md
    assert "divergence: non-finite loss" in md
    assert "no metrics.json (still running, or killed)" in md
    rows = list(csv.DictReader((sweep / "report" / "report.csv").open()))
    assert rows[1]["init"] == "zeros" and rows[1]["optim.lr"] == "0.1" and rows[1]["test_accuracy"] == "0.1"
    assert rows[4]["test_accuracy"] == "0.91"
    assert {p.name for p in result.files} >= {
        "learning_curves.png",
        "lr_init_heatmap.png",
        "grad_norms.png",
        "stop_epochs.png",
    }
    assert [j.name for j in result.failed] == ["2", "6"]


def test_plots_are_real_pngs(sweep):
    result = make_report(sweep)
    for path in result.files:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_cli_prints_table_and_failures(sweep, capsys):
    assert main_cli([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "| job" in out and "2 job(s) failed or are incomplete" in out


def test_cli_clear_error_for_missing_dir(tmp_path, capsys):
    assert main_cli([str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().out


def test_empty_dir_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no job directories"):
        make_report(tmp_path)


def test_table_has_the_sharpness_columns_when_a_run_measured_it(tmp_path):
    make_job(tmp_path, 0, ["optim.lr=0.1"], {"optim": {"lr": 0.1}}, {"status": "completed", "test_accuracy": 0.9, "sharpness_init": 2.5, "sharpness_final": 9.75})
    make_job(tmp_path, 1, ["optim.lr=0.2"], {"optim": {"lr": 0.2}}, {"status": "completed", "test_accuracy": 0.8})
    make_report(tmp_path)
    rows = list(csv.DictReader((tmp_path / "report" / "report.csv").open()))
    assert rows[0]["sharpness_init"] == "2.5" and rows[0]["sharpness_final"] == "9.75" and rows[1]["sharpness_final"] == ""
    plain = tmp_path / "plain"
    make_job(plain, 0, ["optim.lr=0.1"], {"optim": {"lr": 0.1}}, {"status": "completed", "test_accuracy": 0.9})
    make_report(plain)
    assert "sharpness_init" not in (plain / "report" / "report.csv").read_text()
