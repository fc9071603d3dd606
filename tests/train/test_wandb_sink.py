"""W&B sink: offline by default, read back without a server; online without a server falls back in bounded time."""

from __future__ import annotations

import time

import pytest

wandb = pytest.importorskip("wandb")

from manualbp.train.wandb_sink import WandbSink, find_runs, read_offline_run  # noqa: E402


def log_three_epochs(sink):
    for epoch in range(1, 4):
        sink.log(
            {"epoch": epoch, "train_loss": 1.0 / epoch, "grad_norms": [0.5 / epoch, 0.25 / epoch], "note": "x"},
            step=epoch,
        )
    sink.summary({"test_accuracy": 0.97, "status_text": "ok"})
    sink.finish("completed")
    wandb.teardown()  # flush the run file before reading it back in this process


def test_offline_run_reads_back(tmp_path):
    sink = WandbSink({"name": "wandb", "group": "sweep-1", "run_name": "init=zeros"}, {"optim": {"lr": 0.1}}, tmp_path)
    assert sink.mode == "offline" and not sink.fell_back
    log_three_epochs(sink)
    runs = find_runs(tmp_path)
    assert len(runs) == 1 and "offline-run-" in runs[0]
    run = read_offline_run(runs[0])
    assert run["group"] == "sweep-1" and run["name"] == "init=zeros" and run["project"] == "manualbp"
    assert run["config"] == {"optim": {"lr": 0.1}}
    assert [h["train_loss"] for h in run["history"]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert run["history"][1]["grad_norms_1"] == pytest.approx(0.125)
    assert "note" not in run["history"][0]
    assert run["summary"]["test_accuracy"] == 0.97 and run["summary"]["status"] == "completed"
    assert run["exit_code"] == 0


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"name": "wandb", "mode": "cloud"}, "logger.mode must be one of"),
        ({"name": "wandb", "init_timeout": 0}, "logger.init_timeout must be a positive number"),
        ({"name": "wandb", "projekt": "x"}, r"logger: unknown key\(s\) \['projekt'\]"),
    ],
)
def test_bad_logger_config(tmp_path, cfg, message):
    with pytest.raises(ValueError, match=message):
        WandbSink(cfg, {}, tmp_path)


@pytest.mark.slow
def test_online_without_server_falls_back_offline_in_bounded_time(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match="logging offline instead"):
        sink = WandbSink({"name": "wandb", "mode": "online", "init_timeout": 3}, {"a": 1}, tmp_path)
    assert time.monotonic() - start < 60
    assert sink.fell_back
    log_three_epochs(sink)
    run = read_offline_run(find_runs(tmp_path)[0])
    assert len(run["history"]) == 3 and run["summary"]["test_accuracy"] == 0.97
