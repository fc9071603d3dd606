"""The run configuration: defaults, deep merge, and validation that names the offending key.

``resolve_config(config)`` turns what a user or Hydra passes to :func:`manualbp.train.run` (a plain dict
or an OmegaConf ``DictConfig``, possibly partial) into a plain nested dict: the user's values merged onto
:data:`DEFAULTS`, every key checked. A misspelt key or a bad value raises a ``ValueError``/``TypeError``
naming it (``"optim.lr must be a positive number, got -1"``) before any data is loaded.

Imports flow one way: :mod:`~manualbp.train.defaults` (the default tree and number checks) imports nothing of
``manualbp.train``; each group module (``data``, ``schedules``, ``stopping``, ``backends``, ``metrics``, ``sinks``)
imports only that and validates its own sub-tree; this module imports them all.

Sub-trees whose keys depend on a chosen name (``init`` parameters, ``lr_schedule`` parameters, ``data``
parameters of a synthetic set, extra keyword arguments of an optimizer) are checked by the module that
owns them (``manualbp.init``, ``schedules``, ``data``, ``backends``), which :func:`validate` calls.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from .. import init as _init
from ..registry import activation_names
from . import backends, data, metrics, schedules, sinks, stopping
from .defaults import DEFAULTS, DTYPES, is_number, loss_choices
from .defaults import positive_int as _positive_int

__all__ = ["DEFAULTS", "resolve_config", "deep_merge", "to_plain", "validate", "is_number"]

def to_plain(config: object) -> Any:
    """A plain nested dict from a dict or an OmegaConf container (resolving interpolations)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        DictConfig = ListConfig = ()  # type: ignore[assignment,misc]
    if DictConfig and isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return {k: to_plain(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_plain(v) for v in config]
    return config


def deep_merge(base: dict, override: Mapping) -> dict:
    """``base`` updated by ``override`` recursively (mappings merge; anything else, incl. None, replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _check_keys(tree: Mapping, reference: Mapping, where: str) -> None:
    for key in tree:
        if not isinstance(key, str):
            raise TypeError(f"{where}: config keys must be strings, got {key!r}")
        if key not in reference:
            prefix = f"{where}." if where else ""
            raise ValueError(
                f"unknown config key '{prefix}{key}'; known keys{' of ' + where if where else ''}: "
                f"{', '.join(sorted(reference))}"
            )


def resolve_config(config: object = None) -> dict[str, Any]:
    """The full, validated configuration: ``config`` deep-merged onto :data:`DEFAULTS`."""
    if config is None:
        config = {}
    plain = to_plain(config)
    if not isinstance(plain, Mapping):
        raise TypeError(f"config must be a mapping (dict or OmegaConf DictConfig), got {type(config).__name__}")
    _check_keys(plain, DEFAULTS, "")
    for key in ("data", "init", "optim", "lr_schedule", "logger"):
        # a bare name is accepted for the named sub-trees: init: kaiming_normal, data: iris
        if isinstance(plain.get(key), str):
            plain = {**plain, key: {"name": plain[key]}}
    # a named sub-tree that switches name does not inherit the default's scheme-specific keys, and a
    # given stopping set replaces the default rules (stopping: {max_epochs: 50} means max_epochs alone)
    merged = deep_merge(DEFAULTS, {k: v for k, v in plain.items() if k not in ("init", "lr_schedule", "logger", "stopping")})
    if isinstance(plain.get("stopping"), Mapping):
        merged["stopping"] = {"max_epochs": DEFAULTS["stopping"]["max_epochs"], **copy.deepcopy(plain["stopping"])}
    for key in ("init", "lr_schedule", "logger"):
        if key in plain:
            value = plain[key]
            if isinstance(value, Mapping) and "name" not in value:
                value = deep_merge(DEFAULTS[key], value)
            merged[key] = copy.deepcopy(value)
    validate(merged)
    return merged


def validate(cfg: dict[str, Any]) -> None:
    """Check a merged config; raises ``ValueError``/``TypeError`` naming the first bad key."""
    _check_run_keys(cfg)
    check_model_cfg(cfg["model"])
    if not isinstance(cfg["backend"], str) or cfg["backend"] not in backends.BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(backends.BACKENDS)}, got {cfg['backend']!r}")

    data.check_data_cfg(cfg["data"])
    _init.check_init_cfg(cfg["init"], "init")
    backends.check_optim_cfg(cfg["optim"])
    schedules.check_schedule_cfg(cfg["lr_schedule"])
    stopping.check_stopping_cfg(cfg["stopping"])
    sinks.check_logger_cfg(cfg["logger"])
    metrics.check_metrics_cfg(cfg["metrics"])


def _check_run_keys(cfg: dict[str, Any]) -> None:
    """The top-level keys: seed, device, dtype, progress, checkpoint_every_s, output_dir, loss."""
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise ValueError(f"seed must be an integer >= 0, got {cfg['seed']!r}")
    device = cfg["device"]
    if not isinstance(device, str) or not (
        device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if cfg["dtype"] not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg['dtype']!r}")
    if not isinstance(cfg["progress"], bool):
        raise TypeError(f"progress must be true or false, got {cfg['progress']!r}")
    if not is_number(cfg["checkpoint_every_s"]) or cfg["checkpoint_every_s"] < 0:
        raise ValueError(
            f"checkpoint_every_s must be a number of seconds >= 0 (0: every epoch), got {cfg['checkpoint_every_s']!r}"
        )
    if cfg["output_dir"] is not None and not isinstance(cfg["output_dir"], str):
        raise TypeError(f"output_dir must be a path string or null, got {type(cfg['output_dir']).__name__}")
    if cfg["loss"] not in loss_choices():  # auto, or a name of the loss registry
        raise ValueError(f"loss must be one of {', '.join(loss_choices())}, got {cfg['loss']!r}")


def check_model_cfg(model: object) -> None:
    """The ``model`` group: hidden widths, one registered activation per hidden layer, bias, negative_slope."""
    if not isinstance(model, Mapping):
        raise TypeError(f"model must be a mapping, got {type(model).__name__}")
    _check_keys(model, {"hidden": 0, "activation": 0, "bias": 0, "negative_slope": 0}, "model")
    hidden = model["hidden"]
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = [hidden]
    if not isinstance(hidden, (list, tuple)):
        raise TypeError(f"model.hidden must be a list of layer widths, got {type(hidden).__name__}")
    for k, width in enumerate(hidden):
        _positive_int(width, f"model.hidden[{k}]")
    act = model["activation"]
    names = activation_names()  # the activation registry's names: the one list
    acts = [act] * len(hidden) if isinstance(act, str) else act
    if not isinstance(acts, (list, tuple)):
        raise TypeError(f"model.activation must be a name or a list of names, got {type(act).__name__}")
    if len(acts) != len(hidden):
        raise ValueError(f"model.activation: expected one name per hidden layer ({len(hidden)}), got {len(acts)}")
    for k, a in enumerate(acts):
        if a not in names:
            raise ValueError(
                f"model.activation{'' if isinstance(act, str) else f'[{k}]'} must be one of "
                f"{', '.join(names)}, got {a!r}"
            )
    if not isinstance(model["bias"], bool):
        raise TypeError(f"model.bias must be true or false, got {model['bias']!r}")
    slope = model.get("negative_slope", 0.01)
    if not (is_number(slope) and slope >= 0):
        raise ValueError(f"model.negative_slope must be a number >= 0, got {slope!r}")
