"""What a run leaves on disk: atomic text and JSON files, the growing ``history.csv``, the writability check.

Used by the training loop (:func:`manualbp.train.run`), the vectorized sweep (``manualbp.fast.sweep``) and
the learning-rate finder, so every run directory has the same files written the same way:
``config.json`` and ``metrics.json`` (:func:`write_json`: non-finite floats as JSON-safe values, replaced
atomically), ``history.csv`` (:class:`HistoryFile`: appended row by row, rewritten whole when its columns
change), ``checkpoint.pt`` (:func:`save_atomic`).
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Mapping, Optional

__all__ = [
    "HistoryFile",
    "atomic_write_text",
    "check_writable",
    "csv_row",
    "json_safe",
    "save_atomic",
    "write_history",
    "write_json",
]


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN as None and infinities as "inf"/"-inf" (JSON has neither), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def check_writable(out_dir: str) -> None:
    """Fail at start, not after the first epoch, when ``output_dir`` cannot be created or written."""
    probe = os.path.join(out_dir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"output_dir {out_dir!r} cannot be written: {e.strerror or e}") from None


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def csv_row(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in rec.items()}


def write_history(path: str, history: list[dict[str, Any]]) -> None:
    """Rewrite ``history.csv`` whole, atomically."""
    columns: list[str] = []
    for rec in history:
        columns += [k for k in rec if k not in columns]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for rec in history:
            w.writerow(csv_row(rec))
    os.replace(tmp, path)


class HistoryFile:
    """``history.csv`` kept up to date with a run's history: rewritten whole on the first write of a process
    (the checkpoint's history is the truth after a resume) or when the columns change; otherwise the rows
    added since the last update are appended (rewriting a growing file every epoch costs O(epochs^2))."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.columns: Optional[list[str]] = None
        self.written = 0  # rows of the history already in the file

    def update(self, history: list[dict[str, Any]]) -> None:
        new = history[self.written :]
        if self.columns is None or any(list(r) != self.columns for r in new):
            write_history(self.path, history)
            columns = list(history[0])
            self.columns = columns if all(list(r) == columns for r in history) else None
        else:
            with open(self.path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns)
                for rec in new:
                    writer.writerow(csv_row(rec))
        self.written = len(history)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON (:func:`json_safe`), atomically."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2) + "\n")


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through a temporary file and a rename (a checkpoint is whole or absent)."""
    import torch

    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)
