"""Metric sinks: where a run's per-epoch history and final summary go besides its own files.

``build_sink(logger_cfg, config, output_dir)``: ``name: none`` gives a no-op sink; ``name: wandb``
imports ``manualbp.train.wandb_sink.WandbSink`` lazily (so wandb is only imported when asked for) and
builds ``WandbSink(logger_cfg, config, output_dir)``. A sink has ``log(metrics, step)`` (once an epoch,
with the history record), ``summary(metrics)`` and ``finish(status)``; the loop calls ``finish`` in a
``finally`` (status "failed" when the run raised).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol

__all__ = ["Sink", "NullSink", "build_sink", "check_logger_cfg", "SINKS"]

SINKS = ("none", "wandb")


class Sink(Protocol):
    def log(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def summary(self, metrics: Mapping[str, Any]) -> None: ...

    def finish(self, status: str) -> None: ...


class NullSink:
    """Logs nothing."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def summary(self, metrics: Mapping[str, Any]) -> None:
        pass

    def finish(self, status: str) -> None:
        pass


def check_logger_cfg(cfg: object) -> None:
    if not isinstance(cfg, Mapping):
        raise TypeError(f"logger must be a mapping with a 'name', got {type(cfg).__name__}")
    name = cfg.get("name")
    if name not in SINKS:
        raise ValueError(f"logger.name must be one of {', '.join(SINKS)}, got {name!r}")
    if name == "none":
        extra = [k for k in cfg if k != "name"]
        if extra:
            raise ValueError(f"unknown config key 'logger.{extra[0]}' for logger 'none' (it takes only name)")


def build_sink(logger_cfg: Mapping[str, Any], config: Mapping[str, Any], output_dir: Optional[str]) -> Sink:
    """The sink ``logger_cfg`` names (see the module docstring)."""
    check_logger_cfg(logger_cfg)
    if logger_cfg["name"] == "wandb":
        from .wandb_sink import WandbSink  # provided separately; imports wandb

        return WandbSink(logger_cfg, config, output_dir)
    return NullSink()
