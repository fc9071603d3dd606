"""The training loop: the notes' "while not a stopping criterion: pick examples, compute L, theta <- theta - eta grad L".

:func:`run` turns a config (see :mod:`manualbp.train.config`) into a trained model and a
:class:`RunResult`. Data stay on the device as tensors; each epoch draws one permutation, gathers the
epoch's rows once and splits them into batches; the batch losses stay tensors, so a step costs no host
sync beyond the divergence check's (``stopping.divergence.check_every``); evaluation runs once an epoch.
A backend with ``step_many`` (``fused``) trains a whole epoch in one call when no per-step rule needs the
loop in between, and the epoch is replayed step by step if the divergence check would have fired in it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import functional as F
from ..init import initialize
from ..nn import MLP
from . import distributed as _dist
from . import sinks as _sinks
from .backends import BACKENDS
from .config import resolve_config
from .data import Dataset, load_dataset
from .metrics import Measurements
from .output import HistoryFile, check_writable, save_atomic, write_json
from .schedules import build_schedule
from .stopping import StopContext, build_stopping

__all__ = [
    "run",
    "build_model",
    "RunResult",
    "evaluate",
    "resolve_device",
    "resolve_loss",
    "CHECKPOINT",
    "NON_SEMANTIC_KEYS",
]

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 2  # 2: the fused backend keeps one momentum buffer per [W | b] block
#: config keys that may change between an interrupted run and its resumption
NON_SEMANTIC_KEYS = ("progress", "logger", "output_dir", "checkpoint_every_s")


@dataclass
class RunResult:
    """What :func:`run` returns.

    Attributes:
        status: "completed" (a max_epochs/max_steps cap ran out), "stopped" (another rule fired) or
            "diverged".
        stop_reason: the rule that ended the run ("max_epochs", "early_stopping", "divergence", ...).
        metrics: final numbers: ``test_/val_/train_`` ``loss`` and ``accuracy`` (``r2`` for regression),
            ``n_train, n_val, n_test, epochs, steps, wall_time_s``, and the backend's extra metrics.
        history: one dict per epoch.
        config: the resolved configuration.
        output_dir: where the files are, or None.
        model: the trained :class:`manualbp.MLP` (the weights the metrics were computed with: the best
            epoch's under a stopping rule's ``restore_best``), on the training device.
    """

    status: str
    stop_reason: str
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    output_dir: Optional[str] = None
    model: Optional[MLP] = None


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; "cuda"/"cuda:N" must be available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device is {name!r} but no CUDA device is available (torch.cuda.is_available() is False)")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device is {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device(name)


def resolve_loss(name: str, data: Dataset) -> str:
    """The loss a run trains with: ``auto`` is cross_entropy for classification, squared_error for regression;
    a loss that does not fit the data set's task is an error naming both."""
    if name == "auto":
        return "cross_entropy" if data.task == "classification" else "squared_error"
    if data.task == "classification" and name != "cross_entropy":
        raise ValueError(
            f"loss {name!r} needs regression targets; data set {data.name!r} is a classification set "
            "(use loss: cross_entropy or auto)"
        )
    if data.task == "regression" and name == "cross_entropy":
        raise ValueError(
            f"loss 'cross_entropy' needs class labels; data set {data.name!r} is a regression set "
            "(use loss: squared_error, mse or auto)"
        )
    return name


def _loss_value(loss: str, output: Tensor, target: Tensor) -> Tensor:
    fn = {"cross_entropy": F.cross_entropy, "squared_error": F.squared_error_loss, "mse": F.mse_loss}[loss]
    return fn(output, target, "mean")


def _score(task: str, output: Tensor, target: Tensor) -> Tensor:
    """Accuracy for classification; R^2 (averaged over outputs, as sklearn's r2_score) for regression."""
    if task == "classification":
        return (output.argmax(-1) == target).to(torch.float64).mean()
    o, t = output.to(torch.float64), target.to(torch.float64)
    ss_res = (t - o).pow(2).sum(0)
    ss_tot = (t - t.mean(0)).pow(2).sum(0)
    r2 = torch.where(
        ss_tot > 0,
        1 - ss_res / torch.where(ss_tot > 0, ss_tot, 1.0),
        torch.where(ss_res > 0, torch.zeros_like(ss_res), torch.ones_like(ss_res)),
    )
    return r2.mean()


def evaluate(
    backend: Any, loss: str, task: str, splits: Mapping[str, tuple[Tensor, Tensor]]
) -> dict[str, Optional[float]]:
    """``{split}_loss`` and ``{split}_accuracy`` (or ``_r2``) for each (x, y) split; None for an empty split."""
    score = "accuracy" if task == "classification" else "r2"
    keys: list[str] = []
    values: list[Tensor] = []
    out: dict[str, Optional[float]] = {}
    for name, (x, y) in splits.items():
        if x.shape[0] == 0:
            out[f"{name}_loss"] = out[f"{name}_{score}"] = None
            continue
        o = backend.predict(x)
        keys += [f"{name}_loss", f"{name}_{score}"]
        values += [_loss_value(loss, o, y).to(torch.float64), _score(task, o, y)]
    if values:
        out.update(zip(keys, torch.stack(values).tolist()))  # one host sync
    return out


def _clone(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    return obj


def _semantic(cfg: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in NON_SEMANTIC_KEYS}


def _first_difference(a: Any, b: Any, where: str = "") -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            d = _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else key)
            if d:
                return d
        return None
    return None if a == b else (where or "<root>")


def _load_checkpoint(path: str) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error for the user
        raise ValueError(f"output_dir: cannot read the checkpoint {path!r} (weights_only): {e}") from None
    if not isinstance(state, dict) or "version" not in state:
        raise ValueError(f"output_dir: {path!r} is not a manualbp checkpoint (version {CHECKPOINT_VERSION})")
    version = state["version"]
    # version 1 differs only in the fused backend's optimizer state: finished runs and other backends read fine
    readable = version == CHECKPOINT_VERSION or (
        version == 1 and (state.get("result") is not None or state.get("config", {}).get("backend") != "fused")
    )
    if not readable:
        raise ValueError(
            f"output_dir: {path!r} was written by another manualbp (checkpoint version {state['version']!r}, "
            f"this one reads version {CHECKPOINT_VERSION}); use another output_dir, or delete the checkpoint"
        )
    return state


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj


def build_model(
    model_cfg: Mapping[str, Any],
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    init_cfg: Optional[Mapping[str, Any]] = None,
    seed: int = 0,
) -> MLP:
    """A run's MLP from its ``model`` config, initialized by ``init_cfg`` from ``seed`` when given.

    The constructor's default init runs under a forked RNG (it must not advance the global RNG), and the
    scheme draws from a CPU generator seeded by ``seed``, so the same config gives the same weights on any
    device and in any caller (``run``, ``run_many``, the studies).
    """
    with torch.random.fork_rng(devices=[]):
        model = MLP(
            in_features,
            model_cfg["hidden"],
            out_features,
            activation=model_cfg["activation"],
            bias=model_cfg["bias"],
            negative_slope=model_cfg.get("negative_slope", 0.01),
            dtype=dtype,
        )
    if init_cfg is not None:
        initialize(model, init_cfg, torch.Generator().manual_seed(seed))
    return model


def stored_result(
    status: str, stop_reason: str, metrics: dict[str, Any], model: MLP, model_cfg: Mapping[str, Any]
) -> dict[str, Any]:
    """A finished run's record in its checkpoint: enough to return the result and rebuild the model."""
    arch = {
        "in_features": model.in_features,
        "hidden": list(model.hidden_features),
        "out_features": model.out_features,
        "activation": [spec[0] for spec in model.activation_specs],
        "bias": model.bias,
        "negative_slope": model_cfg.get("negative_slope", 0.01),
    }
    return {
        "status": status,
        "stop_reason": stop_reason,
        "metrics": metrics,
        "arch": arch,
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def run(config: Any = None) -> RunResult:
    """Train an MLP as ``config`` says and return a :class:`RunResult` (see :func:`_run` for the details).

    On CUDA the run uses ``torch.use_deterministic_algorithms`` (warn-only where an op has no
    deterministic kernel) with ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, so a seed gives the same run twice;
    the process's previous setting is restored afterwards.
    """
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        return _run(config)
    finally:
        # only when a CUDA run changed it: the call imports torch._inductor (about 2 s the first time)
        if (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) != previous:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _run(config: Any = None) -> RunResult:
    """Train an MLP as ``config`` says and return a :class:`RunResult`.

    Args:
        config: a nested mapping (plain dict or OmegaConf ``DictConfig``) with any of the keys
            ``seed, device, dtype, data, model, loss, init, optim, lr_schedule, stopping, backend,
            logger, progress, output_dir``; missing keys take :data:`~manualbp.train.config.DEFAULTS`.

    With ``output_dir`` set, the run writes ``config.json``, ``history.csv`` (each epoch),
    ``metrics.json`` (at the end) and ``checkpoint.pt`` (atomically, after the first epoch that ends
    ``checkpoint_every_s`` seconds of training after the last one; 0: every epoch; and at the end). The same config with
    the same ``output_dir`` resumes from the checkpoint, and returns the stored result without training
    when the run had already finished.

    Example:
        >>> result = run({"data": {"name": "iris"}, "stopping": {"max_epochs": 20}, "progress": False})
        >>> result.status, round(result.metrics["test_accuracy"], 2)
    """
    cfg = resolve_config(config)
    out_dir = cfg["output_dir"]
    if out_dir:
        check_writable(out_dir)
    ckpt_path = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    saved: Optional[dict[str, Any]] = None
    if ckpt_path and os.path.exists(ckpt_path):
        saved = _load_checkpoint(ckpt_path)
        diff = _first_difference(_semantic(saved["config"]), _semantic(cfg))
        if diff:
            raise ValueError(
                f"output_dir {out_dir!r} holds a run with a different config (first difference at {diff!r}); "
                "use another output_dir, or the same config to resume"
            )
        if saved.get("result") is not None:
            r = saved["result"]
            arch = r["arch"]
            model = build_model(arch, arch["in_features"], arch["out_features"], getattr(torch, cfg["dtype"]))
            model.load_state_dict(r["model_state"])
            return RunResult(r["status"], r["stop_reason"], r["metrics"], saved["history"], cfg, out_dir, model)

    device = resolve_device(cfg["device"])
    dinfo, device = _dist.setup(device)  # torchrun: this rank's process group and device
    if device.type == "cuda":  # reproducible CUDA runs (cuBLAS needs its workspace pinned for that)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    dtype = getattr(torch, cfg["dtype"])
    seed = cfg["seed"]
    data = load_dataset(cfg["data"], seed, dtype, device)
    loss = resolve_loss(cfg["loss"], data)
    stopping = build_stopping(cfg["stopping"])
    stopping.device_type = device.type
    score = "accuracy" if data.task == "classification" else "r2"
    for monitor in stopping.monitors:
        if not monitor.endswith(("_loss", f"_{score}")):
            raise ValueError(
                f"stopping: monitor {monitor!r} does not exist for a {data.task} set (use *_loss or *_{score})"
            )
        if monitor.startswith("val_") and data.n_val == 0:
            raise ValueError(
                f"stopping: monitor {monitor!r} needs a validation split, but data.val_fraction is 0 "
                "(set data.val_fraction > 0, or monitor a train_* metric, or turn the rule off with null)"
            )

    measurements = Measurements(cfg["metrics"], loss, data, seed)
    mc = cfg["model"]
    model = build_model(mc, data.in_features, data.out_features, dtype, cfg["init"], seed).to(device)
    backend = BACKENDS[cfg["backend"]](model, loss, cfg["optim"])
    if dinfo.enabled:
        if not hasattr(backend, "distribute"):
            raise ValueError(f"backend {cfg['backend']!r} does not support distributed training; use manual or autograd")
        backend.distribute(dinfo)

    n = data.n_train
    # bs: the global batch (under DDP each rank trains on its 1/world shard of it: batch_size per rank)
    per_rank = cfg["optim"]["batch_size"]
    bs = n if per_rank == "full" else min(per_rank * dinfo.world, n)
    steps_per_epoch = math.ceil(n / bs)
    schedule = build_schedule(cfg["lr_schedule"], cfg["optim"]["lr"], steps_per_epoch, stopping.max_epochs)
    plateau_monitor = "val_loss" if data.n_val else "train_loss"
    shuffle = torch.Generator().manual_seed(seed + 1)
    epoch, step, elapsed = 0, 0, 0.0
    history: list[dict[str, Any]] = []
    if saved is not None:
        epoch, step, elapsed = saved["epoch"], saved["step"], saved["elapsed"]
        history = saved["history"]
        backend.load_state_dict(_to_device(saved["backend"], device))
        schedule.load_state_dict(saved["schedule"])
        stopping.load_state_dict(_to_device(saved["stopping"], device))
        measurements.load_state_dict(saved.get("metrics", {}))
        shuffle.set_state(saved["rng"]["shuffle"])
        torch.set_rng_state(saved["rng"]["torch"])
        if saved["rng"].get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])

    writer = out_dir if dinfo.is_main else None  # under DDP, rank 0 alone writes files and checkpoints
    history_file = HistoryFile(os.path.join(out_dir, "history.csv")) if out_dir else None
    if writer:
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, "config.json"), cfg)

    def save_checkpoint(result: Optional[dict[str, Any]] = None) -> None:
        if not ckpt_path or not dinfo.is_main:
            return
        state = {
            "version": CHECKPOINT_VERSION,
            "config": cfg,
            "epoch": epoch,
            "step": step,
            "elapsed": elapsed,
            "history": history,
            "backend": backend.state_dict(),
            "schedule": schedule.state_dict(),
            "stopping": stopping.state_dict(),
            "metrics": measurements.state_dict(),
            "rng": {
                "shuffle": shuffle.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "result": result,
        }
        save_atomic(state, ckpt_path)

    x_tr, y_tr = data.x_train, data.y_train
    # a backend may want the training set in its own form (fused: a ones column, one-hot targets), once
    x_fit, y_fit = backend.prepare(x_tr, y_tr) if hasattr(backend, "prepare") else (x_tr, y_tr)
    eval_splits = {"train": (x_tr, y_tr), "val": (data.x_val, data.y_val)}
    n_layers = len(model.linears)
    sink = _sinks.build_sink(cfg["logger"] if dinfo.is_main else {"name": "none"}, cfg, out_dir)
    status = "failed"
    bar = tqdm(
        total=stopping.max_epochs,
        initial=epoch,
        desc=f"{data.name} {cfg['backend']}",
        unit="epoch",
        disable=None if cfg["progress"] and dinfo.is_main else True,  # None: quiet when not a terminal
        leave=False,
    )
    # a backend may pick the CPU threads for the whole run (fused: one thread where a step is microseconds,
    # so that no small op of the loop's, its evaluation or its shuffle pays OpenMP's fork and join)
    threads = contextlib.ExitStack()
    if hasattr(backend, "threads"):
        threads.enter_context(backend.threads(bs))
    if saved is None:
        measurements.at_start(backend.model)  # sharpness and activations at initialization, before the first step
    try:
        decision = None
        last_lr: Optional[float] = None
        saved_at = elapsed  # training seconds at the last checkpoint
        # a whole epoch in one backend call where no per-step rule needs the loop between steps
        whole_epochs = (
            hasattr(backend, "step_many")
            and not dinfo.enabled
            and not stopping.has_step_limits
            and not schedule.changes_within_epoch
        )
        full_counts = torch.tensor(
            [bs] * (steps_per_epoch - 1) + [n - (steps_per_epoch - 1) * bs], dtype=torch.float64, device=device
        )
        while decision is None:
            t0 = time.perf_counter()
            if bs < n:  # this epoch's order, gathered once; batch b is rows b*bs .. (b+1)*bs-1 of it
                perm = torch.randperm(n, generator=shuffle).to(device)
                x_epoch, y_epoch = x_fit.index_select(0, perm), y_fit.index_select(0, perm)
            else:
                x_epoch, y_epoch = x_fit, y_fit
            losses: Optional[Tensor] = None
            if whole_epochs:
                lr = schedule.lr(step, epoch)
                if lr != last_lr:
                    backend.set_lr(lr)
                    last_lr = lr
                rewind = backend.state_dict()
                losses = backend.step_many(x_epoch, y_epoch, bs)
                if stopping.fires_within(losses, step):  # replay the epoch step by step: stop where that stops
                    backend.load_state_dict(rewind)
                    losses = None
                else:
                    step += steps_per_epoch
                    counts, seen = full_counts, n
            if losses is None:
                batch_losses, batch_counts = [], []
                for xb, yb in zip(x_epoch.split(bs), y_epoch.split(bs)):
                    lr = schedule.lr(step, epoch)
                    if lr != last_lr:
                        backend.set_lr(lr)
                        last_lr = lr
                    if dinfo.enabled:  # this rank's shard of the global batch
                        xb, yb = xb.tensor_split(dinfo.world)[dinfo.rank], yb.tensor_split(dinfo.world)[dinfo.rank]
                    batch_loss = backend.step(xb, yb)
                    batch_losses.append(batch_loss)
                    batch_counts.append(xb.shape[0])
                    step += 1
                    check_loss = batch_loss if stopping.needs_step_loss(step - 1) else None
                    now = elapsed + time.perf_counter() - t0
                    if dinfo.enabled:  # every rank must take the same decision: the mean loss, rank 0's clock
                        check_loss, now = _dist.reduce_step(batch_loss, now, dinfo)
                    decision = stopping.check_step(check_loss, StopContext(epoch, step, now))
                    if decision is not None:
                        break
                losses = torch.stack(batch_losses)
                counts, seen = torch.tensor(batch_counts, dtype=torch.float64, device=device), sum(batch_counts)
            running = torch.dot(losses.to(torch.float64), counts)  # the epoch's summed training loss, no host sync
            epoch += 1
            record: dict[str, Any] = {"epoch": epoch, "step": step}
            if dinfo.enabled:
                totals = _dist.all_sum(torch.stack([running, running.new_tensor(float(seen))]), dinfo)
                running, seen = totals[0], int(totals[1].item())
            record["train_loss_running"] = (running / max(seen, 1)).item()
            record.update(evaluate(backend, loss, data.task, eval_splits))
            record["lr"] = last_lr
            norms = backend.grad_norms()
            for k, g in enumerate(norms, 1):
                record[f"grad_norm_{k}"] = g
            record["grad_norm"] = math.sqrt(sum(g * g for g in norms)) if len(norms) == n_layers else math.nan
            record.update(backend.extra_metrics())
            elapsed += time.perf_counter() - t0
            record["wall_time_s"] = elapsed
            record.update(measurements.after_epoch(epoch, backend.model))  # not counted as training time
            if decision is None:
                schedule.observe(record[plateau_monitor])
                decision = stopping.check(record, StopContext(epoch, step, elapsed))
            elif decision[0] != "diverged":  # a per-step rule fired; still track the best epoch
                stopping.check(record, StopContext(epoch, step, elapsed))
            if stopping.improved and stopping.restore_best:
                stopping.best_state = _clone(backend.state_dict())
            history.append(record)
            sink.log(record, epoch)
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['train_loss']:.4f}",
                **{score[:3]: f"{record.get(f'val_{score}') or record[f'train_{score}']:.4f}"},
            )
            if writer:
                history_file.update(history)
            if decision is None and (elapsed - saved_at >= cfg["checkpoint_every_s"]):
                save_checkpoint()
                saved_at = elapsed

        status, stop_reason = decision
        extra = backend.extra_metrics()  # before any restore: the drift over the whole run
        restored = False
        if (
            status != "diverged"
            and stopping.restore_best
            and stopping.best_state is not None
            and stopping.best_epoch != epoch
        ):
            backend.load_state_dict(_to_device(stopping.best_state, device))
            restored = True
        metrics: dict[str, Any] = {"status": status, "stop_reason": stop_reason, "stop_message": stopping.message}
        final = evaluate(backend, loss, data.task, {"test": (data.x_test, data.y_test), **eval_splits})
        metrics.update(final)
        metrics.update(
            {
                "n_train": data.n_train,
                "n_val": data.n_val,
                "n_test": data.n_test,
                "epochs": epoch,
                "steps": step,
                "wall_time_s": elapsed,
                "best_epoch": stopping.best_epoch,
                "restored_best": restored,
                "loss": loss,
                "backend": cfg["backend"],
            }
        )
        if data.label_noise:
            metrics.update({"label_noise": data.label_noise, "labels_changed": data.labels_changed})
        metrics.update(extra)
        metrics.update(measurements.summary())
        final_model = backend.model
        result = stored_result(status, stop_reason, metrics, final_model, mc)
        if writer:
            write_json(os.path.join(out_dir, "metrics.json"), metrics)
            save_checkpoint(result)
        sink.summary(metrics)
    except BaseException:
        bar.close()
        sink.finish("failed")
        raise
    finally:
        threads.close()
    bar.close()
    sink.finish(status)
    return RunResult(status, stop_reason, metrics, history, cfg, out_dir, final_model)
