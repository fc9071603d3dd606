"""``run_many``: K run configs trained as one batched model, each reported as its own run.

The configs may differ in ``seed``, ``init``, ``optim`` (lr, momentum, nesterov, weight_decay, betas, eps),
``lr_schedule``, ``stopping``, ``output_dir``, ``logger``, ``progress`` and the hidden widths ``model.hidden``
(at one depth: the trainer pads each layer to the widest model and masks the padded units, which change
nothing); everything else (data, depth, activations, bias, dtype, device, loss, optimizer, batch size) must be
equal (:func:`group_key`). Each config keeps its own
initialization (:func:`manualbp.init.initialize` with its seed), data split and batch order (its seed, as
:func:`manualbp.train.run` draws them), learning-rate schedule and stopping rules
(``manualbp.train.schedules``/``stopping``, the very objects ``run`` uses); a model whose rules fire is
frozen while the others go on. Each run writes ``config.json``, ``history.csv``, ``metrics.json`` and a
finished ``checkpoint.pt`` into its own ``output_dir`` in ``run``'s format, so ``report.py`` reads them as
ordinary runs (and ``run`` on the same config returns the stored result).

Each run's logger (W&B) gets its history when that run ends (one W&B run per config, in the configured
group). Not supported: an optimizer other than SGD, Adam and AdamW (a clear error); resuming a group killed mid-way
(the finished runs' directories are complete; the rest rerun from the start).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from ..registry import LOSS_REGISTRY
from ..train import loop as _loop
from ..train import sinks as _sinks
from ..train.config import resolve_config
from ..train.data import load_dataset
from ..train.loop import build_model, resolve_loss
from ..train.output import HistoryFile, json_safe, save_atomic, write_json
from ..train.schedules import build_schedule
from ..train.stopping import StopContext, build_stopping
from .backend import trainer_kwargs
from .vectorized import VectorizedTrainer

__all__ = ["run_many", "group_key", "unsupported", "VARYING_KEYS"]

#: top-level config keys that may differ inside one vectorized group
VARYING_KEYS = ("seed", "init", "optim", "lr_schedule", "stopping", "output_dir", "logger", "progress", "backend")
#: history.csv of each run is brought up to date every this many epochs (and when the run ends)
HISTORY_EVERY = 10
#: optim keys that may differ (the rest, batch_size and name, must agree)
VARYING_OPTIM = ("lr", "momentum", "nesterov", "weight_decay", "dampening", "betas", "eps")


def unsupported(config: Any) -> Optional[str]:
    """Why a config cannot train in a vectorized group (None when it can): an optimizer other than SGD, Adam and
    AdamW (or an option of theirs the trainer lacks: amsgrad, maximize), or a ``metrics`` measurement
    (sharpness, activations), which the per-model path takes."""
    return _unsupported(resolve_config(config))


def _unsupported(cfg: dict) -> Optional[str]:
    """:func:`unsupported` of a resolved config."""
    try:
        trainer_kwargs(cfg["optim"], "vectorized")
    except ValueError as error:
        return f"{error} (the vectorized trainer runs SGD with momentum, Nesterov, weight decay, and Adam / AdamW)"
    on = [name for name, value in cfg["metrics"].items() if value is not None]
    if on:
        return f"metrics.{on[0]} is measured on the ordinary path only"
    return None


def group_key(config: Any) -> str:
    """A string equal for configs that can train together in one vectorized group."""
    return _group_key(resolve_config(config))


def _group_key(cfg: dict) -> str:
    """:func:`group_key` of a resolved config. The hidden widths are not in it, their number (the depth) is:
    models of one depth but other widths train together, padded to the widest (:class:`VectorizedTrainer`)."""
    fixed = {k: v for k, v in cfg.items() if k not in VARYING_KEYS}
    fixed["optim"] = {k: v for k, v in cfg["optim"].items() if k not in VARYING_OPTIM}
    model = dict(cfg["model"])
    hidden = model.pop("hidden")
    depth = len(hidden) if isinstance(hidden, (list, tuple)) else 1  # an int is one hidden layer
    act = model["activation"]
    model["activation"] = [act] * depth if isinstance(act, str) else list(act)  # "tanh" = ["tanh"] * depth
    fixed["model"] = {**model, "depth": depth}
    return json.dumps(json_safe(fixed), sort_keys=True, default=str)


def _eval_model(out: Tensor, y: Tensor, loss: str, task: str) -> tuple[Tensor, Tensor]:
    """Per-model (loss, score) for outputs (K, N, C) against targets y (K, N[, C]): two (K,) tensors."""
    per_item = LOSS_REGISTRY[loss].forward(out, y, "none")  # (K, N) or (K, N, C): what "mean" averages
    losses = per_item.flatten(1).mean(1).to(torch.float64)
    if task == "classification":
        score = (out.argmax(-1) == y).to(torch.float64).mean(-1)
    else:
        o, t = out.to(torch.float64), y.to(torch.float64)
        ss_res = (t - o).pow(2).sum(1)
        ss_tot = (t - t.mean(1, keepdim=True)).pow(2).sum(1)
        r2 = torch.where(
            ss_tot > 0,
            1 - ss_res / torch.where(ss_tot > 0, ss_tot, 1.0),
            torch.where(ss_res > 0, torch.zeros_like(ss_res), torch.ones_like(ss_res)),
        )
        score = r2.mean(-1)
    return losses, score


def run_many(configs: Sequence[Any]) -> list[_loop.RunResult]:
    """Train the configs as one vectorized group; returns one :class:`~manualbp.train.RunResult` each.

    The steps: :class:`_Group` (the data of each seed, the K models as one :class:`VectorizedTrainer`, each
    run's schedule and stopping rules), then epochs (:meth:`_Group.epoch`: the steps of every live model, the
    evaluation of all K at once, each run's record and rules) until every run has finished
    (:meth:`_Group.finish`: its result, files and logger).

    Raises ValueError if the configs cannot share one batched model (see :func:`group_key`).
    """
    cfgs = [resolve_config(c) for c in configs]
    if not cfgs:
        return []
    reasons = [r for r in map(_unsupported, cfgs) if r]
    if reasons:
        raise ValueError(f"run_many: {reasons[0]}")
    if len({_group_key(c) for c in cfgs}) != 1:
        raise ValueError(
            "run_many: the configs differ in more than seed/init/optim lr-momentum-weight_decay/"
            "lr_schedule/stopping/hidden widths; group them with manualbp.fast.sweep.group_key"
        )
    group = _Group(cfgs)
    with group.trainer.threads(group.bs):  # small groups on one CPU thread, as backend=fused runs
        while not all(group.finished):
            group.epoch()
    return group.results  # type: ignore[return-value]


class _Group:
    """K runs trained as one batched model: their data, trainer, rules and where each stands."""

    def __init__(self, cfgs: list[dict[str, Any]]) -> None:
        self.cfgs = cfgs
        first = cfgs[0]
        self.K = K = len(cfgs)
        self.device = device = _loop.resolve_device(first["device"])
        dtype = getattr(torch, first["dtype"])
        self._load_data(first, [c["seed"] for c in cfgs], dtype)
        data0, n = self.data0, self.n
        self.bs = bs = n if first["optim"]["batch_size"] == "full" else min(first["optim"]["batch_size"], n)
        self.steps_per_epoch = math.ceil(n / bs)
        models, self.stoppings, self.schedules, self.shuffles = [], [], [], []
        for c in cfgs:
            model = build_model(c["model"], data0.in_features, data0.out_features, dtype, c["init"], c["seed"])
            models.append(model.to(device))
            st = build_stopping(c["stopping"])
            st.device_type = device.type
            self.stoppings.append(st)
            self.schedules.append(build_schedule(c["lr_schedule"], c["optim"]["lr"], self.steps_per_epoch, st.max_epochs))
            self.shuffles.append(torch.Generator().manual_seed(c["seed"] + 1))
        self.trainer = _trainer(models, self.loss, [trainer_kwargs(c["optim"], "vectorized") for c in cfgs])
        self.n_layers = len(models[0].linears)
        self.histories: list[list[dict[str, Any]]] = [[] for _ in range(K)]
        self.decisions: list[Optional[tuple[str, str]]] = [None] * K
        self.finished = [False] * K
        self.best_params: list[Optional[list[Tensor]]] = [None] * K
        self.steps = [0] * K
        self.last_lr: list[Optional[float]] = [None] * K
        self.results: list[Optional[_loop.RunResult]] = [None] * K
        self.epoch_count, self.elapsed = 0, 0.0
        self.stop_norms: dict[int, list[float]] = {}
        self.ar = torch.arange(K, device=device).unsqueeze(1)
        for c in cfgs:
            if c["output_dir"]:
                os.makedirs(c["output_dir"], exist_ok=True)
                write_json(os.path.join(c["output_dir"], "config.json"), c)
        self.history_files = [
            HistoryFile(os.path.join(c["output_dir"], "history.csv")) if c["output_dir"] else None for c in cfgs
        ]
        self.step_limits = [s.has_step_limits for s in self.stoppings]
        self.limits = [s.step_loss_limit for s in self.stoppings]  # None until a model's initial loss is known
        self.step_wise_lr = [s.changes_within_epoch for s in self.schedules]
        self.every = [s.check_every for s in self.stoppings]  # 1: the divergence check reads every step's loss
        self.eval_splits = {name: self.splits[name] for name in ("train", "val") if self.splits[name][0].shape[-2] > 0}

    def _load_data(self, first: dict[str, Any], seeds: list[int], dtype: torch.dtype) -> None:
        """Each seed's split (one shared set when all seeds agree), stacked (K, ...) when they differ."""
        datasets = {s: load_dataset(first["data"], s, dtype, self.device) for s in dict.fromkeys(seeds)}
        self.datasets, self.seeds = datasets, seeds
        self.data0 = data0 = datasets[seeds[0]]
        self.loss = resolve_loss(first["loss"], data0)
        self.task = data0.task
        self.score = "accuracy" if self.task == "classification" else "r2"
        self.shared = len(datasets) == 1

        def stack(attr: str) -> Tensor:
            if self.shared:
                return getattr(data0, attr)
            return torch.stack([getattr(datasets[s], attr) for s in seeds])

        self.x_tr, self.y_tr = stack("x_train"), stack("y_train")
        self.splits = {s: (stack(f"x_{s}"), stack(f"y_{s}")) for s in ("train", "val", "test")}
        self.n = data0.n_train
        if any(d.n_train != self.n for d in datasets.values()):
            raise ValueError("run_many: the seeds give different training-set sizes")

    def _set_lrs(self, live: list[int], first_step: bool) -> None:
        """Every live model's rate at the epoch's first step, then only the step-wise schedules'."""
        new_lrs = list(self.last_lr)
        for k in live if first_step else (k for k in live if self.step_wise_lr[k]):
            new_lrs[k] = self.schedules[k].lr(self.steps[k], self.epoch_count)
        if new_lrs != self.last_lr:
            self.trainer.set_lr([v if v is not None else 0.0 for v in new_lrs])
            self.last_lr = new_lrs

    def _batch(self, perm: Optional[Tensor], b: int) -> tuple[Tensor, Tensor]:
        if perm is None:
            return self.x_tr, self.y_tr
        idx = perm[:, b * self.bs : (b + 1) * self.bs]
        if self.shared:
            return self.x_tr[idx[0]], self.y_tr[idx[0]]  # one batch order (one seed) for all
        return self.x_tr[self.ar, idx], self.y_tr[self.ar, idx]

    def _check_steps(self, losses: Tensor, live: list[int], count: int, seen: list[int], now: float) -> list[int]:
        """The per-step rules of the live models after a step; returns the models still live."""
        need = [self.stoppings[k].needs_step_loss(self.steps[k]) for k in live]
        values = losses.tolist() if any(need) else None  # one host sync for all K models
        stopped = False
        for k, needed in zip(live, need):
            self.steps[k] += 1
            seen[k] += count
            if not self.step_limits[k]:  # skip the calls that cannot fire (64 per step add up)
                if not needed:
                    continue  # check_step(None, ...): nothing to check
                limit = self.limits[k]
                if limit is not None and values[k] < limit:  # type: ignore[index]
                    continue  # a finite loss below the divergence limit
            self.decisions[k] = self.stoppings[k].check_step(
                values[k] if needed else None,  # type: ignore[index]
                StopContext(self.epoch_count, self.steps[k], now),
            )
            self.limits[k] = self.stoppings[k].step_loss_limit
            if self.decisions[k] is not None:  # its last gradient is this step's: keep its norms
                norms = self.trainer.grad_norms().items()
                self.stop_norms[k] = [v[k].item() for nm, v in norms if nm.endswith("weight")]
                self.trainer.stop(k)
                stopped = True
        return [k for k in live if self.decisions[k] is None] if stopped else live

    def _steps(self, live: list[int], t0: float) -> tuple[Tensor, list[int]]:
        """One epoch of steps for the live models: the summed losses (K,) and the examples each saw."""
        K, n, bs, trainer = self.K, self.n, self.bs, self.trainer
        running = torch.zeros(K, dtype=torch.float64, device=self.device)
        seen = [0] * K
        perms = [torch.randperm(n, generator=g).to(self.device) if bs < n else None for g in self.shuffles]
        perm = torch.stack(perms) if bs < n else None  # (K, n)
        quiet: Optional[bool] = None
        for b in range(self.steps_per_epoch):
            if not live:
                break
            self._set_lrs(live, b == 0)
            xb, yb = self._batch(perm, b)
            losses = trainer.step(xb, yb)
            count = xb.shape[-2]
            if len(live) == K:
                running.add_(losses, alpha=count)
            else:
                running.add_(torch.where(trainer.active, losses.to(torch.float64), 0.0), alpha=count)
            if quiet is None:  # can a step's check fire only through the loss, read every step?
                quiet = all(self.every[k] == 1 and not self.step_limits[k] and self.limits[k] is not None for k in live)
            if quiet:  # then, with every live loss finite and below its limit, no check can fire: skip them
                values = losses.tolist()  # one host sync for all K models
                if all(values[k] < self.limits[k] for k in live):  # type: ignore[operator]
                    for k in live:
                        self.steps[k] += 1
                        seen[k] += count
                    continue
            quiet = None  # a check runs below: limits or live models may change
            live = self._check_steps(losses, live, count, seen, self.elapsed + time.perf_counter() - t0)
        return running, seen

    def _evaluate(self, running: Tensor, seen: list[int]) -> tuple[dict, dict, list[str], list[float]]:
        """The epoch's evaluation (train and val, as run()): all K models at once, one host sync."""
        names, values = [], []
        for name, (xs, ys) in self.eval_splits.items():
            out = self.trainer.predict(xs)
            lo, sc = _eval_model(out, ys if not self.shared else ys.expand(self.K, *ys.shape), self.loss, self.task)
            names.append(name)
            values += [lo, sc]
        norms = self.trainer.grad_norms()
        weight_names = [nm for nm in norms if nm.endswith("weight")]
        table = torch.stack([*values, *(norms[nm].to(torch.float64) for nm in weight_names), running]).tolist()
        evals = {name: (table[2 * i], table[2 * i + 1]) for i, name in enumerate(names)}
        norm_values = {nm: table[2 * len(names) + i] for i, nm in enumerate(weight_names)}
        run_loss = [r / max(c, 1) for r, c in zip(table[-1], seen)]
        return evals, norm_values, weight_names, run_loss

    def _record(self, k: int, evals: dict, norm_values: dict, weight_names: list[str], run_loss: list[float]) -> dict[str, Any]:
        score = self.score
        record: dict[str, Any] = {"epoch": self.epoch_count, "step": self.steps[k], "train_loss_running": run_loss[k]}
        for name in ("train", "val"):
            if name in evals:
                record[f"{name}_loss"], record[f"{name}_{score}"] = evals[name][0][k], evals[name][1][k]
            else:
                record[f"{name}_loss"] = record[f"{name}_{score}"] = None
        record["lr"] = self.last_lr[k]
        gl = self.stop_norms.get(k) or [norm_values[nm][k] for nm in weight_names]
        for i, g in enumerate(gl, 1):
            record[f"grad_norm_{i}"] = g
        record["grad_norm"] = math.sqrt(sum(g * g for g in gl)) if len(gl) == self.n_layers else math.nan
        record["wall_time_s"] = self.elapsed
        return record

    def _decide(self, k: int, record: dict[str, Any]) -> None:
        """Run k's per-epoch rules on its record (after a per-step decision they still track the best epoch)."""
        st = self.stoppings[k]
        ctx = StopContext(self.epoch_count, self.steps[k], self.elapsed)
        if self.decisions[k] is None:
            self.schedules[k].observe(record["val_loss" if self.data0.n_val else "train_loss"])
            self.decisions[k] = st.check(record, ctx)
        elif self.decisions[k][0] != "diverged":  # type: ignore[index]
            st.check(record, ctx)
        if st.improved and st.restore_best:
            self.best_params[k] = [p.clone() for p in self.trainer.parameters_of(k)]

    def epoch(self) -> None:
        """One epoch of every run still going: steps, evaluation, records, rules; finished runs are written."""
        t0 = time.perf_counter()
        active_at_start = [not f and self.decisions[k] is None for k, f in enumerate(self.finished)]
        running, seen = self._steps([k for k in range(self.K) if active_at_start[k]], t0)
        self.epoch_count += 1
        evals, norm_values, weight_names, run_loss = self._evaluate(running, seen)
        self.elapsed += time.perf_counter() - t0
        for k in range(self.K):
            if not active_at_start[k]:
                continue
            record = self._record(k, evals, norm_values, weight_names, run_loss)
            self._decide(k, record)
            self.histories[k].append(record)
            if self.history_files[k] and (self.decisions[k] is not None or self.epoch_count % HISTORY_EVERY == 0):
                self.history_files[k].update(self.histories[k])
            if self.decisions[k] is not None:
                self.trainer.stop(k)
                self.finish(k)

    def _final_metrics(self, k: int, model: Any, restored: bool) -> dict[str, Any]:
        c, st, score = self.cfgs[k], self.stoppings[k], self.score
        status, reason = self.decisions[k]  # type: ignore[misc]
        metrics: dict[str, Any] = {"status": status, "stop_reason": reason, "stop_message": st.message}
        d = self.datasets[c["seed"]]
        for name, (xs, ys) in (("test", (d.x_test, d.y_test)), ("train", (d.x_train, d.y_train)), ("val", (d.x_val, d.y_val))):
            if xs.shape[0] == 0:
                metrics[f"{name}_loss"] = metrics[f"{name}_{score}"] = None
                continue
            with torch.no_grad():
                out = model(xs)
            lo, sc = _eval_model(out.unsqueeze(0), ys.unsqueeze(0), self.loss, self.task)
            metrics[f"{name}_loss"], metrics[f"{name}_{score}"] = lo.item(), sc.item()
        metrics.update(
            {
                "n_train": d.n_train, "n_val": d.n_val, "n_test": d.n_test, "epochs": self.epoch_count,
                "steps": self.steps[k], "wall_time_s": self.elapsed, "best_epoch": st.best_epoch,
                "restored_best": restored, "loss": self.loss, "backend": "vectorized", "vectorized_group_size": self.K,
            }
        )  # fmt: skip
        if d.label_noise:
            metrics.update({"label_noise": d.label_noise, "labels_changed": d.labels_changed})
        return metrics

    def finish(self, k: int) -> None:
        """Run k's result: its weights (the best epoch's where asked), metrics, files and logger."""
        c, st = self.cfgs[k], self.stoppings[k]
        status, reason = self.decisions[k]  # type: ignore[misc]
        restored = False
        params = [p.clone() for p in self.trainer.parameters_of(k)]
        if status != "diverged" and st.restore_best and self.best_params[k] is not None and st.best_epoch != self.epoch_count:
            params = self.best_params[k]  # type: ignore[assignment]
            restored = True
        model = self.trainer.model(k)
        with torch.no_grad():
            for dst, src in zip(model.flat_parameters(), params):
                dst.copy_(src)
        metrics = self._final_metrics(k, model, restored)
        result = _loop.stored_result(status, reason, metrics, model, c["model"])
        out_dir = c["output_dir"]
        if out_dir:
            write_json(os.path.join(out_dir, "metrics.json"), metrics)
            state = {
                "version": _loop.CHECKPOINT_VERSION, "config": c, "epoch": self.epoch_count, "step": self.steps[k],
                "elapsed": self.elapsed, "history": self.histories[k], "result": result,
            }  # fmt: skip
            save_atomic(state, os.path.join(out_dir, _loop.CHECKPOINT))
        # the run's own logger (W&B: its own run, grouped as configured), replayed once the run has ended
        sink = _sinks.build_sink(c["logger"], c, out_dir)
        for record in self.histories[k]:
            sink.log(record, record["epoch"])
        sink.summary(metrics)
        sink.finish(status)
        self.results[k] = _loop.RunResult(status, reason, metrics, self.histories[k], c, out_dir, model)
        self.finished[k] = True


def _trainer(models: list, loss: str, opts: list[dict[str, Any]]) -> VectorizedTrainer:
    """One VectorizedTrainer for the K models with each one's optimizer settings (the optimizer and
    dampening must agree)."""
    dampening = {o.get("dampening", 0.0) for o in opts}
    if len(dampening) != 1:
        raise ValueError("run_many: optim.dampening must be equal across the group")
    optimizers = {o["optimizer"] for o in opts}
    if len(optimizers) != 1:
        raise ValueError(f"run_many: one optimizer per group, got {sorted(optimizers)}")
    return VectorizedTrainer(
        models,
        loss,
        optimizer=optimizers.pop(),
        lr=[o["lr"] for o in opts],
        momentum=[o.get("momentum", 0.0) for o in opts],
        weight_decay=[o.get("weight_decay", 0.0) for o in opts],
        nesterov=[bool(o.get("nesterov", False)) for o in opts],
        dampening=dampening.pop(),
        betas=[o.get("betas", (0.9, 0.999)) for o in opts],
        eps=[o.get("eps", 1e-8) for o in opts],
    )
