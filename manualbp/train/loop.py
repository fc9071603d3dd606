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

from ..init import initialize
from ..nn import MLP
from ..registry import LOSS_REGISTRY
from . import distributed as _dist
from . import sinks as _sinks
from .backends import BACKENDS
from .config import resolve_config
from .data import Dataset, load_dataset
from .metrics import Measurements
from .output import HistoryFile, check_writable, save_atomic, write_json
from .schedules import build_schedule
from .stopping import Decision, StopContext, build_stopping

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
    a loss whose targets (the registry's ``Loss.targets``) do not fit the data set's task is an error naming both."""
    if name == "auto":
        return "cross_entropy" if data.task == "classification" else "squared_error"
    spec = LOSS_REGISTRY[name]
    if data.task == "classification" and spec.targets != "classes":
        raise ValueError(
            f"loss {name!r} needs regression targets; data set {data.name!r} is a classification set "
            f"(use loss: auto or one taking class labels: {', '.join(_losses_for('classes'))})"
        )
    if data.task == "regression" and spec.targets == "classes":
        raise ValueError(
            f"loss {name!r} needs class labels; data set {data.name!r} is a regression set "
            f"(use loss: auto or one of {', '.join(_losses_for('values'))})"
        )
    return name


def _losses_for(targets: str) -> list[str]:
    return [n for n, spec in LOSS_REGISTRY.items() if spec.targets == targets]


def _loss_value(loss: str, output: Tensor, target: Tensor) -> Tensor:
    return LOSS_REGISTRY[loss].forward(output, target, "mean")


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
            logger, progress, output_dir, metrics``; missing keys take :data:`~manualbp.train.config.DEFAULTS`.

    With ``output_dir`` set, the run writes ``config.json``, ``history.csv`` (each epoch),
    ``metrics.json`` (at the end) and ``checkpoint.pt`` (atomically, after the first epoch that ends
    ``checkpoint_every_s`` seconds of training after the last one; 0: every epoch; and at the end). The same config with
    the same ``output_dir`` resumes from the checkpoint, and returns the stored result without training
    when the run had already finished.

    The steps, in order: :func:`_saved_run` (a checkpoint to resume, or a finished run's result),
    :class:`_Training` (data, model, backend, schedule, rules), then its :meth:`~_Training.train` (epochs until
    a rule fires) and :meth:`~_Training.finish` (restore the best epoch, evaluate, write the result).

    Example:
        >>> result = run({"data": {"name": "iris"}, "stopping": {"max_epochs": 20}, "progress": False})
        >>> result.status, round(result.metrics["test_accuracy"], 2)
    """
    cfg = resolve_config(config)
    saved, finished = _saved_run(cfg)
    if finished is not None:
        return finished
    training = _Training(cfg, saved)
    with training.threads():
        return training.finish(training.train())


def _saved_run(cfg: dict[str, Any]) -> tuple[Optional[dict[str, Any]], Optional[RunResult]]:
    """The checkpoint in ``output_dir`` (None without one) and, when that run had finished, its stored result."""
    out_dir = cfg["output_dir"]
    if out_dir:
        check_writable(out_dir)
    ckpt_path = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    if not ckpt_path or not os.path.exists(ckpt_path):
        return None, None
    saved = _load_checkpoint(ckpt_path)
    diff = _first_difference(_semantic(saved["config"]), _semantic(cfg))
    if diff:
        raise ValueError(
            f"output_dir {out_dir!r} holds a run with a different config (first difference at {diff!r}); "
            "use another output_dir, or the same config to resume"
        )
    if saved.get("result") is None:
        return saved, None
    r = saved["result"]
    arch = r["arch"]
    model = build_model(arch, arch["in_features"], arch["out_features"], getattr(torch, cfg["dtype"]))
    model.load_state_dict(r["model_state"])
    return saved, RunResult(r["status"], r["stop_reason"], r["metrics"], saved["history"], cfg, out_dir, model)


def _check_monitors(stopping: Any, data: Dataset) -> None:
    """Every metric a stopping rule monitors exists for this data set (and its validation split)."""
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


class _Training:
    """One run, from its resolved config (and the checkpoint it resumes from): everything :func:`_run` needs
    between its steps. ``epoch``, ``step``, ``elapsed`` and ``history`` are where the run stands."""

    def __init__(self, cfg: dict[str, Any], saved: Optional[dict[str, Any]]) -> None:
        self.cfg = cfg
        self.out_dir = cfg["output_dir"]
        self.ckpt_path = os.path.join(self.out_dir, CHECKPOINT) if self.out_dir else None
        device = resolve_device(cfg["device"])
        self.dinfo, self.device = _dist.setup(device)  # torchrun: this rank's process group and device
        if self.device.type == "cuda":  # reproducible CUDA runs (cuBLAS needs its workspace pinned for that)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        dtype, seed = getattr(torch, cfg["dtype"]), cfg["seed"]
        self.data = data = load_dataset(cfg["data"], seed, dtype, self.device)
        self.loss = resolve_loss(cfg["loss"], data)
        self.stopping = build_stopping(cfg["stopping"])
        self.stopping.device_type = self.device.type
        _check_monitors(self.stopping, data)
        self.measurements = Measurements(cfg["metrics"], self.loss, data, seed)
        model = build_model(cfg["model"], data.in_features, data.out_features, dtype, cfg["init"], seed).to(self.device)
        self.n_layers = len(model.linears)
        self.backend = BACKENDS[cfg["backend"]](model, self.loss, cfg["optim"])
        if self.dinfo.enabled:
            if not hasattr(self.backend, "distribute"):
                raise ValueError(f"backend {cfg['backend']!r} does not support distributed training; use manual or autograd")
            self.backend.distribute(self.dinfo)
        n = data.n_train
        # bs: the global batch (under DDP each rank trains on its 1/world shard of it: batch_size per rank)
        per_rank = cfg["optim"]["batch_size"]
        self.bs = n if per_rank == "full" else min(per_rank * self.dinfo.world, n)
        self.steps_per_epoch = math.ceil(n / self.bs)
        self.schedule = build_schedule(cfg["lr_schedule"], cfg["optim"]["lr"], self.steps_per_epoch, self.stopping.max_epochs)
        self.shuffle = torch.Generator().manual_seed(seed + 1)
        self.epoch, self.step, self.elapsed = 0, 0, 0.0
        self.history: list[dict[str, Any]] = []
        self.last_lr: Optional[float] = None
        if saved is not None:
            self._resume(saved)
        self.writer = self.out_dir if self.dinfo.is_main else None  # under DDP, rank 0 alone writes files
        self.history_file = HistoryFile(os.path.join(self.out_dir, "history.csv")) if self.out_dir else None
        if self.writer:
            os.makedirs(self.out_dir, exist_ok=True)
            write_json(os.path.join(self.out_dir, "config.json"), cfg)
        self.sink = _sinks.build_sink(cfg["logger"] if self.dinfo.is_main else {"name": "none"}, cfg, self.out_dir)
        if saved is None:
            self.measurements.at_start(self.backend)  # sharpness and activations before the first step

    def threads(self) -> contextlib.AbstractContextManager:
        """The run's CPU threads: a backend may pick them for the whole run (fused: one thread where a step is
        microseconds, so that no small op of the loop's, its evaluation or its shuffle pays OpenMP's fork and join)."""
        if hasattr(self.backend, "threads"):
            return self.backend.threads(self.bs)
        return contextlib.nullcontext()

    def _resume(self, saved: dict[str, Any]) -> None:
        self.epoch, self.step, self.elapsed = saved["epoch"], saved["step"], saved["elapsed"]
        self.history = saved["history"]
        self.backend.load_state_dict(_to_device(saved["backend"], self.device))
        self.schedule.load_state_dict(saved["schedule"])
        self.stopping.load_state_dict(_to_device(saved["stopping"], self.device))
        self.measurements.load_state_dict(saved.get("metrics", {}))
        self.shuffle.set_state(saved["rng"]["shuffle"])
        torch.set_rng_state(saved["rng"]["torch"])
        if saved["rng"].get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])

    def save_checkpoint(self, result: Optional[dict[str, Any]] = None) -> None:
        if not self.ckpt_path or not self.dinfo.is_main:
            return
        state = {
            "version": CHECKPOINT_VERSION,
            "config": self.cfg,
            "epoch": self.epoch,
            "step": self.step,
            "elapsed": self.elapsed,
            "history": self.history,
            "backend": self.backend.state_dict(),
            "schedule": self.schedule.state_dict(),
            "stopping": self.stopping.state_dict(),
            "metrics": self.measurements.state_dict(),
            "rng": {
                "shuffle": self.shuffle.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "result": result,
        }
        save_atomic(state, self.ckpt_path)

    def _set_lr(self) -> None:
        lr = self.schedule.lr(self.step, self.epoch)
        if lr != self.last_lr:
            self.backend.set_lr(lr)
            self.last_lr = lr

    def _whole_epochs(self) -> bool:
        """Whether a whole epoch can run in one backend call: no per-step rule needs the loop in between."""
        return (
            hasattr(self.backend, "step_many")
            and not self.dinfo.enabled
            and not self.stopping.has_step_limits
            and not self.schedule.changes_within_epoch
        )

    def _epoch_in_one_call(self, x_epoch: Tensor, y_epoch: Tensor) -> Optional[Tensor]:
        """The epoch's step losses from ``step_many``; None (and the state rewound) when the divergence check
        would have fired within it, so that the epoch is replayed step by step and stops where that stops."""
        self._set_lr()
        rewind = self.backend.state_dict()
        losses = self.backend.step_many(x_epoch, y_epoch, self.bs)
        if self.stopping.fires_within(losses, self.step):
            self.backend.load_state_dict(rewind)
            return None
        self.step += self.steps_per_epoch
        return losses

    def _epoch_step_by_step(self, x_epoch: Tensor, y_epoch: Tensor, t0: float) -> tuple[Tensor, list[int], Decision]:
        """The epoch's steps one by one, each checked by the per-step rules: losses, batch sizes, decision."""
        batch_losses, batch_counts, decision = [], [], None
        for xb, yb in zip(x_epoch.split(self.bs), y_epoch.split(self.bs)):
            self._set_lr()
            if self.dinfo.enabled:  # this rank's shard of the global batch
                xb, yb = xb.tensor_split(self.dinfo.world)[self.dinfo.rank], yb.tensor_split(self.dinfo.world)[self.dinfo.rank]
            batch_loss = self.backend.step(xb, yb)
            batch_losses.append(batch_loss)
            batch_counts.append(xb.shape[0])
            self.step += 1
            check_loss = batch_loss if self.stopping.needs_step_loss(self.step - 1) else None
            now = self.elapsed + time.perf_counter() - t0
            if self.dinfo.enabled:  # every rank must take the same decision: the mean loss, rank 0's clock
                check_loss, now = _dist.reduce_step(batch_loss, now, self.dinfo)
            decision = self.stopping.check_step(check_loss, StopContext(self.epoch, self.step, now))
            if decision is not None:
                break
        return torch.stack(batch_losses), batch_counts, decision

    def _train_epoch(self) -> tuple[float, Decision]:
        """One epoch of steps: its mean training loss (as trained, over the examples seen) and a per-step decision."""
        n = self.data.n_train
        if self.bs < n:  # this epoch's order, gathered once; batch b is rows b*bs .. (b+1)*bs-1 of it
            perm = torch.randperm(n, generator=self.shuffle).to(self.device)
            x_epoch, y_epoch = self.x_fit.index_select(0, perm), self.y_fit.index_select(0, perm)
        else:
            x_epoch, y_epoch = self.x_fit, self.y_fit
        losses = self._epoch_in_one_call(x_epoch, y_epoch) if self._whole_epochs() else None
        decision: Decision = None
        if losses is not None:
            counts, seen = self.full_counts, n
        else:
            losses, batch_counts, decision = self._epoch_step_by_step(x_epoch, y_epoch, self.t0)
            counts = torch.tensor(batch_counts, dtype=torch.float64, device=self.device)
            seen = sum(batch_counts)
        running = torch.dot(losses.to(torch.float64), counts)  # the epoch's summed training loss, no host sync
        if self.dinfo.enabled:
            totals = _dist.all_sum(torch.stack([running, running.new_tensor(float(seen))]), self.dinfo)
            running, seen = totals[0], int(totals[1].item())
        return (running / max(seen, 1)).item(), decision

    def _record(self, running_loss: float) -> dict[str, Any]:
        """The epoch's history record: losses and scores, rate, gradient norms, the backend's and the
        measurements' entries, training time."""
        record: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "train_loss_running": running_loss}
        record.update(evaluate(self.backend, self.loss, self.data.task, self.eval_splits))
        record["lr"] = self.last_lr
        norms = self.backend.grad_norms()
        for k, g in enumerate(norms, 1):
            record[f"grad_norm_{k}"] = g
        record["grad_norm"] = math.sqrt(sum(g * g for g in norms)) if len(norms) == self.n_layers else math.nan
        record.update(self.backend.extra_metrics())
        self.elapsed += time.perf_counter() - self.t0
        record["wall_time_s"] = self.elapsed
        record.update(self.measurements.after_epoch(self.epoch, self.backend))  # not counted as training time
        return record

    def _decide(self, record: dict[str, Any], decision: Decision) -> Decision:
        """The per-epoch rules on the record (after a per-step decision they still track the best epoch)."""
        if decision is None:
            plateau_monitor = "val_loss" if self.data.n_val else "train_loss"
            self.schedule.observe(record[plateau_monitor])
            decision = self.stopping.check(record, StopContext(self.epoch, self.step, self.elapsed))
        elif decision[0] != "diverged":
            self.stopping.check(record, StopContext(self.epoch, self.step, self.elapsed))
        if self.stopping.improved and self.stopping.restore_best:
            self.stopping.best_state = _clone(self.backend.state_dict())
        return decision

    def train(self) -> tuple[str, str]:
        """Epochs until a stopping rule fires: ``(status, stop_reason)``."""
        x_tr, y_tr = self.data.x_train, self.data.y_train
        # a backend may want the training set in its own form (fused: a ones column, one-hot targets), once
        self.x_fit, self.y_fit = self.backend.prepare(x_tr, y_tr) if hasattr(self.backend, "prepare") else (x_tr, y_tr)
        self.eval_splits = {"train": (x_tr, y_tr), "val": (self.data.x_val, self.data.y_val)}
        n, bs = self.data.n_train, self.bs
        self.full_counts = torch.tensor(
            [bs] * (self.steps_per_epoch - 1) + [n - (self.steps_per_epoch - 1) * bs], dtype=torch.float64, device=self.device
        )
        score = "accuracy" if self.data.task == "classification" else "r2"
        bar = tqdm(
            total=self.stopping.max_epochs,
            initial=self.epoch,
            desc=f"{self.data.name} {self.cfg['backend']}",
            unit="epoch",
            disable=None if self.cfg["progress"] and self.dinfo.is_main else True,  # None: quiet off a terminal
            leave=False,
        )
        try:
            decision: Decision = None
            saved_at = self.elapsed  # training seconds at the last checkpoint
            while decision is None:
                self.t0 = time.perf_counter()
                running_loss, decision = self._train_epoch()
                self.epoch += 1
                record = self._record(running_loss)
                decision = self._decide(record, decision)
                self.history.append(record)
                self.sink.log(record, self.epoch)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{record['train_loss']:.4f}",
                    **{score[:3]: f"{record.get(f'val_{score}') or record[f'train_{score}']:.4f}"},
                )
                if self.writer:
                    self.history_file.update(self.history)
                if decision is None and (self.elapsed - saved_at >= self.cfg["checkpoint_every_s"]):
                    self.save_checkpoint()
                    saved_at = self.elapsed
            return decision
        except BaseException:
            self.sink.finish("failed")
            raise
        finally:
            bar.close()

    def finish(self, decision: tuple[str, str]) -> RunResult:
        """Restore the best epoch where a rule asks for it, evaluate on every split, write and log the result."""
        status, stop_reason = decision
        try:
            extra = self.backend.extra_metrics()  # before any restore: the drift over the whole run
            stopping, restored = self.stopping, False
            if status != "diverged" and stopping.restore_best and stopping.best_state is not None and stopping.best_epoch != self.epoch:
                self.backend.load_state_dict(_to_device(stopping.best_state, self.device))
                restored = True
            data = self.data
            metrics: dict[str, Any] = {"status": status, "stop_reason": stop_reason, "stop_message": stopping.message}
            metrics.update(evaluate(self.backend, self.loss, data.task, {"test": (data.x_test, data.y_test), **self.eval_splits}))
            metrics.update(
                {
                    "n_train": data.n_train, "n_val": data.n_val, "n_test": data.n_test, "epochs": self.epoch,
                    "steps": self.step, "wall_time_s": self.elapsed, "best_epoch": stopping.best_epoch,
                    "restored_best": restored, "loss": self.loss, "backend": self.cfg["backend"],
                }
            )  # fmt: skip
            if data.label_noise:
                metrics.update({"label_noise": data.label_noise, "labels_changed": data.labels_changed})
            metrics.update(extra)
            metrics.update(self.measurements.summary())
            final_model = self.backend.model
            result = stored_result(status, stop_reason, metrics, final_model, self.cfg["model"])
            if self.writer:
                write_json(os.path.join(self.out_dir, "metrics.json"), metrics)
                self.save_checkpoint(result)
            self.sink.summary(metrics)
        except BaseException:
            self.sink.finish("failed")
            raise
        self.sink.finish(status)
        return RunResult(status, stop_reason, metrics, self.history, self.cfg, self.out_dir, final_model)
