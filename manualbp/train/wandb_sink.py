"""Weights & Biases metric sink: offline by default, online on request with a bounded offline fallback.

The training loop builds it through ``manualbp.train.sinks.build_sink`` when ``logger.name`` is "wandb":

```
logger: {name: wandb, mode: offline, project: manualbp, entity: null, group: null, run_name: null,
         job_type: train, tags: [], dir: null, init_timeout: 30}
```

``mode: offline`` (the default) needs no network; ``wandb sync <run dir>`` uploads later. ``mode: online``
that cannot reach the server (or has no API key) falls back to offline after at most ``init_timeout``
seconds, so a run never hangs and loses no metric. :func:`read_offline_run` reads an offline run back
(config, per-step history, summary, exit code) without a server, for tests and for users.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import warnings
from pathlib import Path
from typing import Any, Optional, Union

MODES = ("offline", "online", "disabled")
LOGGER_KEYS = {
    "name",
    "mode",
    "project",
    "entity",
    "group",
    "run_name",
    "job_type",
    "tags",
    "dir",
    "init_timeout",
    "notes",
}


def _scalars(metrics: dict) -> dict:
    """Only numbers go to W&B history (lists such as per-layer norms are expanded to name_i)."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (int, float)):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{key}_{i}": v for i, v in enumerate(value)})
    return out


class WandbSink:
    """Logs a run's per-epoch metrics, summary and final status to W&B.

    Args:
        logger_cfg: the ``logger`` mapping (see the module docstring).
        config: the resolved run configuration (logged as the W&B config).
        output_dir: the run's directory; W&B's files go under ``<output_dir>/wandb`` unless ``logger.dir``
            is set, so every job of a sweep keeps its own W&B run beside its metrics.
    """

    def __init__(self, logger_cfg: dict, config: dict, output_dir: Optional[Union[str, Path]] = None) -> None:
        unknown = set(logger_cfg) - LOGGER_KEYS
        if unknown:
            raise ValueError(f"logger: unknown key(s) {sorted(unknown)}; expected some of {sorted(LOGGER_KEYS)}")
        mode = logger_cfg.get("mode", "offline") or "offline"
        if mode not in MODES:
            raise ValueError(f"logger.mode must be one of {', '.join(MODES)}, got {mode!r}")
        timeout = logger_cfg.get("init_timeout", 30)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"logger.init_timeout must be a positive number of seconds, got {timeout!r}")
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # imported here: slow, and only needed when W&B logging is on

        self._wandb = wandb
        directory = logger_cfg.get("dir") or output_dir or os.getcwd()
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.kwargs = {
            "project": logger_cfg.get("project") or "manualbp",
            "entity": logger_cfg.get("entity"),
            "group": logger_cfg.get("group"),
            "name": logger_cfg.get("run_name"),
            "job_type": logger_cfg.get("job_type") or "train",
            "tags": list(logger_cfg.get("tags") or []),
            "notes": logger_cfg.get("notes"),
            "config": config,
            "dir": str(directory),
        }
        self.fell_back = False
        self.run = self._init(mode, float(timeout))
        self.mode = self.run.settings.mode if hasattr(self.run, "settings") else mode

    def _init(self, mode: str, timeout: float):
        wandb = self._wandb
        settings = wandb.Settings(init_timeout=timeout, silent=True)
        if mode != "online":
            return wandb.init(mode=mode, settings=settings, **self.kwargs)
        try:
            return wandb.init(mode="online", settings=settings, **self.kwargs)
        except Exception as exc:  # unreachable server, no API key, timeout: keep every metric offline
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            warnings.warn(
                f"W&B online mode failed ({message}); logging offline instead. Upload later with `wandb sync`.",
                RuntimeWarning,
                stacklevel=3,
            )
            self.fell_back = True
            return wandb.init(mode="offline", settings=wandb.Settings(silent=True), **self.kwargs)

    @property
    def run_dir(self) -> str:
        """The W&B run's directory (the folder ``wandb sync`` takes)."""
        return str(Path(self.run.dir).parent)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_scalars(metrics), step=step)

    def summary(self, metrics: dict) -> None:
        self.run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})

    def finish(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=0 if status in ("completed", "stopped", "diverged") else 1)


# --------------------------------------------------------------------------------------------------
# Reading an offline run back (the .wandb file is a LevelDB-style log of protobuf records).
# --------------------------------------------------------------------------------------------------
_BLOCK = 32768
_HEADER = 7  # ":W&B" + magic (2 bytes) + version (1 byte)


def _records(path: Union[str, Path]):
    raw = Path(path).read_bytes()
    if raw[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file (bad header)")
    pos, pending = _HEADER, b""
    while pos + 7 <= len(raw):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data = raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # full record
            yield data
        elif kind == 2:  # first fragment
            pending = data
        elif kind == 3:  # middle
            pending += data
        elif kind == 4:  # last
            yield pending + data
            pending = b""
        elif kind == 0 and length == 0:
            continue


def read_offline_run(run_dir: Union[str, Path]) -> dict:
    """Read a W&B run directory (``.../wandb/offline-run-*``) without a server.

    Returns ``{"id", "project", "group", "name", "config", "history": [per-step dicts], "summary", "exit_code"}``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    files = glob.glob(os.path.join(str(run_dir), "run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"run_dir: no run-*.wandb file in {run_dir}")
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "exit_code": None}
    for data in _records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(id=rec.run.run_id, project=rec.run.project, group=rec.run.run_group, name=rec.run.display_name)
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            for item in rec.summary.update:
                if item.key:
                    out["summary"][item.key] = json.loads(item.value_json)
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    out["config"].pop("_wandb", None)
    return out


def find_runs(directory: Union[str, Path]) -> list[str]:
    """W&B run directories below ``directory`` (offline and online ones)."""
    found = glob.glob(os.path.join(str(directory), "**", "wandb", "*run-*"), recursive=True)
    return sorted(p for p in found if os.path.isdir(p))


__all__ = ["WandbSink", "read_offline_run", "find_runs", "LOGGER_KEYS", "MODES"]
