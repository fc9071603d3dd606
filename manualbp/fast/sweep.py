"""``run_many``: K run configs trained as one batched model, each reported as its own run.

The configs may differ in ``seed``, ``init``, ``optim`` (lr, momentum, nesterov, weight_decay),
``lr_schedule``, ``stopping``, ``output_dir``, ``logger`` and ``progress``; everything else (data, model,
dtype, device, loss, batch size) must be equal (:func:`group_key`). Each config keeps its own
initialization (:func:`manualbp.init.initialize` with its seed), data split and batch order (its seed, as
:func:`manualbp.train.run` draws them), learning-rate schedule and stopping rules
(``manualbp.train.schedules``/``stopping``, the very objects ``run`` uses); a model whose rules fire is
frozen while the others go on. Each run writes ``config.json``, ``history.csv``, ``metrics.json`` and a
finished ``checkpoint.pt`` into its own ``output_dir`` in ``run``'s format, so ``report.py`` reads them as
ordinary runs (and ``run`` on the same config returns the stored result).

Each run's logger (W&B) gets its history when that run ends (one W&B run per config, in the configured
group). Not supported: an optimizer other than SGD (a clear error); resuming a group killed mid-way
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

from .. import functional as F
from ..train import loop as _loop
from ..train import sinks as _sinks
from ..train.config import resolve_config
from ..train.data import load_dataset
from ..train.loop import build_model, resolve_loss
from ..train.output import HistoryFile, json_safe, save_atomic, write_json
from ..train.schedules import build_schedule
from ..train.stopping import StopContext, build_stopping
from .backend import sgd_kwargs
from .vectorized import VectorizedTrainer

__all__ = ["run_many", "group_key", "unsupported", "VARYING_KEYS"]

#: top-level config keys that may differ inside one vectorized group
VARYING_KEYS = ("seed", "init", "optim", "lr_schedule", "stopping", "output_dir", "logger", "progress", "backend")
#: history.csv of each run is brought up to date every this many epochs (and when the run ends)
HISTORY_EVERY = 10
#: optim keys that may differ (the rest, batch_size and name, must agree)
VARYING_OPTIM = ("lr", "momentum", "nesterov", "weight_decay", "dampening")


def unsupported(config: Any) -> Optional[str]:
    """Why a config cannot train in a vectorized group (None when it can): an optimizer other than SGD, or a
    ``metrics`` measurement (sharpness, activations), which the per-model path takes."""
    cfg = resolve_config(config)
    if str(cfg["optim"].get("name", "")).lower() != "sgd":
        return f"optim.name={cfg['optim']['name']!r}: the vectorized trainer runs SGD only (momentum, Nesterov, weight decay)"
    on = [name for name, value in cfg["metrics"].items() if value is not None]
    if on:
        return f"metrics.{on[0]} is measured on the ordinary path only"
    return None


def group_key(config: Any) -> str:
    """A string equal for configs that can train together in one vectorized group."""
    return _group_key(resolve_config(config))


def _group_key(cfg: dict) -> str:
    """:func:`group_key` of a resolved config."""
    fixed = {k: v for k, v in cfg.items() if k not in VARYING_KEYS}
    fixed["optim"] = {k: v for k, v in cfg["optim"].items() if k not in VARYING_OPTIM}
    return json.dumps(json_safe(fixed), sort_keys=True, default=str)


def _eval_model(out: Tensor, y: Tensor, loss: str, task: str) -> tuple[Tensor, Tensor]:
    """Per-model (loss, score) for outputs (K, N, C) against targets y (K, N[, C]): two (K,) tensors."""
    per_item = {"cross_entropy": F.cross_entropy, "squared_error": F.squared_error_loss, "mse": F.mse_loss}[loss](
        out, y, "none"
    )
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

    Raises ValueError if the configs cannot share one batched model (see :func:`group_key`).
    """
    cfgs = [resolve_config(c) for c in configs]
    if not cfgs:
        return []
    keys = {_group_key(c) for c in cfgs}
    if len(keys) != 1:
        raise ValueError(
            "run_many: the configs differ in more than seed/init/optim lr-momentum-weight_decay/"
            "lr_schedule/stopping; group them with manualbp.fast.sweep.group_key"
        )
    reasons = [r for r in map(unsupported, cfgs) if r]
    if reasons:
        raise ValueError(f"run_many: {reasons[0]}")
    first = cfgs[0]
    K = len(cfgs)
    device = _loop.resolve_device(first["device"])
    dtype = getattr(torch, first["dtype"])
    seeds = [c["seed"] for c in cfgs]
    datasets = {s: load_dataset(first["data"], s, dtype, device) for s in dict.fromkeys(seeds)}
    data0 = datasets[seeds[0]]
    loss = resolve_loss(first["loss"], data0)
    task = data0.task
    score = "accuracy" if task == "classification" else "r2"
    shared = len(datasets) == 1

    def stack(attr: str) -> Tensor:
        if shared:
            return getattr(datasets[seeds[0]], attr)
        return torch.stack([getattr(datasets[s], attr) for s in seeds])

    x_tr, y_tr = stack("x_train"), stack("y_train")
    splits = {s: (stack(f"x_{s}"), stack(f"y_{s}")) for s in ("train", "val", "test")}
    n = data0.n_train
    if any(d.n_train != n for d in datasets.values()):
        raise ValueError("run_many: the seeds give different training-set sizes")

    mc = first["model"]
    models, stoppings, schedules, shuffles = [], [], [], []
    bs = n if first["optim"]["batch_size"] == "full" else min(first["optim"]["batch_size"], n)
    steps_per_epoch = math.ceil(n / bs)
    opts = [sgd_kwargs(c["optim"], "vectorized") for c in cfgs]
    for c in cfgs:
        model = build_model(mc, data0.in_features, data0.out_features, dtype, c["init"], c["seed"])
        models.append(model.to(device))
        st = build_stopping(c["stopping"])
        st.device_type = device.type
        stoppings.append(st)
        schedules.append(build_schedule(c["lr_schedule"], c["optim"]["lr"], steps_per_epoch, st.max_epochs))
        shuffles.append(torch.Generator().manual_seed(c["seed"] + 1))
    dampening = {o.get("dampening", 0.0) for o in opts}
    if len(dampening) != 1:
        raise ValueError("run_many: optim.dampening must be equal across the group")
    trainer = VectorizedTrainer(
        models,
        loss,
        lr=[o["lr"] for o in opts],
        momentum=[o.get("momentum", 0.0) for o in opts],
        weight_decay=[o.get("weight_decay", 0.0) for o in opts],
        nesterov=[bool(o.get("nesterov", False)) for o in opts],
        dampening=dampening.pop(),
    )
    n_layers = len(models[0].linears)
    plateau = "val_loss" if data0.n_val else "train_loss"
    histories: list[list[dict[str, Any]]] = [[] for _ in range(K)]
    decisions: list[Optional[tuple[str, str]]] = [None] * K
    finished = [False] * K
    best_params: list[Optional[list[Tensor]]] = [None] * K
    steps = [0] * K
    last_lr: list[Optional[float]] = [None] * K
    results: list[Optional[_loop.RunResult]] = [None] * K
    epoch, elapsed = 0, 0.0
    stop_norms: dict[int, list[float]] = {}
    ar = torch.arange(K, device=device).unsqueeze(1)
    for c in cfgs:
        if c["output_dir"]:
            os.makedirs(c["output_dir"], exist_ok=True)
            write_json(os.path.join(c["output_dir"], "config.json"), c)

    def finish(k: int) -> None:
        c = cfgs[k]
        status, reason = decisions[k]  # type: ignore[misc]
        st = stoppings[k]
        restored = False
        params = [p.clone() for p in trainer.parameters_of(k)]
        if status != "diverged" and st.restore_best and best_params[k] is not None and st.best_epoch != epoch:
            params = best_params[k]  # type: ignore[assignment]
            restored = True
        model = trainer.model(k)
        with torch.no_grad():
            for dst, src in zip(model.flat_parameters(), params):
                dst.copy_(src)
        metrics: dict[str, Any] = {"status": status, "stop_reason": reason, "stop_message": st.message}
        d = datasets[c["seed"]]
        for name, (xs, ys) in (
            ("test", (d.x_test, d.y_test)),
            ("train", (d.x_train, d.y_train)),
            ("val", (d.x_val, d.y_val)),
        ):
            if xs.shape[0] == 0:
                metrics[f"{name}_loss"] = metrics[f"{name}_{score}"] = None
                continue
            with torch.no_grad():
                out = model(xs)
            lo, sc = _eval_model(out.unsqueeze(0), ys.unsqueeze(0), loss, task)
            metrics[f"{name}_loss"], metrics[f"{name}_{score}"] = lo.item(), sc.item()
        metrics.update(
            {
                "n_train": d.n_train,
                "n_val": d.n_val,
                "n_test": d.n_test,
                "epochs": epoch,
                "steps": steps[k],
                "wall_time_s": elapsed,
                "best_epoch": st.best_epoch,
                "restored_best": restored,
                "loss": loss,
                "backend": "vectorized",
                "vectorized_group_size": K,
            }
        )
        result = _loop.stored_result(status, reason, metrics, model, mc)
        out_dir = c["output_dir"]
        if out_dir:
            write_json(os.path.join(out_dir, "metrics.json"), metrics)
            state = {
                "version": _loop.CHECKPOINT_VERSION,
                "config": c,
                "epoch": epoch,
                "step": steps[k],
                "elapsed": elapsed,
                "history": histories[k],
                "result": result,
            }
            save_atomic(state, os.path.join(out_dir, _loop.CHECKPOINT))
        # the run's own logger (W&B: its own run, grouped as configured), replayed once the run has ended
        sink = _sinks.build_sink(c["logger"], c, out_dir)
        for record in histories[k]:
            sink.log(record, record["epoch"])
        sink.summary(metrics)
        sink.finish(status)
        results[k] = _loop.RunResult(status, reason, metrics, histories[k], c, out_dir, model)
        finished[k] = True

    history_files = [
        HistoryFile(os.path.join(c["output_dir"], "history.csv")) if c["output_dir"] else None for c in cfgs
    ]

    step_limits = [s.has_step_limits for s in stoppings]
    limits = [s.step_loss_limit for s in stoppings]  # None until a model's initial loss is known
    step_wise_lr = [s.changes_within_epoch for s in schedules]
    every = [s.check_every for s in stoppings]  # 1: the divergence check reads every step's loss
    quiet: Optional[bool] = None
    eval_splits = {name: splits[name] for name in ("train", "val") if splits[name][0].shape[-2] > 0}
    while not all(finished):
        t0 = time.perf_counter()
        running = torch.zeros(K, dtype=torch.float64, device=device)
        seen = [0] * K
        active_at_start = [not f and decisions[k] is None for k, f in enumerate(finished)]
        live = [k for k in range(K) if active_at_start[k]]
        perms = [torch.randperm(n, generator=g).to(device) if bs < n else None for g in shuffles]
        perm = torch.stack(perms) if bs < n else None  # (K, n)
        for b in range(steps_per_epoch):
            if not live:
                break
            # the learning rates: every live model's at the epoch's first step, then only the step-wise ones'
            new_lrs = list(last_lr)
            for k in live if b == 0 else (k for k in live if step_wise_lr[k]):
                new_lrs[k] = schedules[k].lr(steps[k], epoch)
            if new_lrs != last_lr:
                trainer.set_lr([v if v is not None else 0.0 for v in new_lrs])
                last_lr = new_lrs
            if perm is not None:
                idx = perm[:, b * bs : (b + 1) * bs]
                if shared:
                    xb, yb = x_tr[idx[0]], y_tr[idx[0]]  # one batch order (one seed) for all
                else:
                    xb, yb = x_tr[ar, idx], y_tr[ar, idx]
            else:
                xb, yb = x_tr, y_tr
            losses = trainer.step(xb, yb)
            count = xb.shape[-2]
            if len(live) == K:
                running.add_(losses, alpha=count)
            else:
                running.add_(torch.where(trainer.active, losses.to(torch.float64), 0.0), alpha=count)
            if quiet is None:  # can a step's check fire only through the loss, read every step?
                quiet = all(every[k] == 1 and not step_limits[k] and limits[k] is not None for k in live)
            if quiet:  # then, with every live loss finite and below its limit, no check can fire: skip them
                values = losses.tolist()  # one host sync for all K models
                if all(values[k] < limits[k] for k in live):  # type: ignore[operator]
                    for k in live:
                        steps[k] += 1
                        seen[k] += count
                    continue
            quiet = None  # a check runs below: limits or live models may change
            need = [stoppings[k].needs_step_loss(steps[k]) for k in live]
            values = losses.tolist() if any(need) else None  # one host sync for all K models
            now = elapsed + time.perf_counter() - t0
            stopped = False
            for k, needed in zip(live, need):
                steps[k] += 1
                seen[k] += count
                if not step_limits[k]:  # skip the calls that cannot fire (64 per step add up)
                    if not needed:
                        continue  # check_step(None, ...): nothing to check
                    limit = limits[k]
                    if limit is not None and values[k] < limit:  # type: ignore[index]
                        continue  # a finite loss below the divergence limit
                decisions[k] = stoppings[k].check_step(
                    values[k] if needed else None,  # type: ignore[index]
                    StopContext(epoch, steps[k], now),
                )
                limits[k] = stoppings[k].step_loss_limit
                if decisions[k] is not None:  # its last gradient is this step's: keep its norms
                    stop_norms[k] = [v[k].item() for nm, v in trainer.grad_norms().items() if nm.endswith("weight")]
                    trainer.stop(k)
                    stopped = True
            if stopped:
                live = [k for k in live if decisions[k] is None]
        epoch += 1
        # the epoch's evaluation (train and val, as run()): all K models at once, one host sync
        names, values_ = [], []
        for name, (xs, ys) in eval_splits.items():
            out = trainer.predict(xs)
            lo, sc = _eval_model(out, ys if not shared else ys.expand(K, *ys.shape), loss, task)
            names.append(name)
            values_ += [lo, sc]
        norms = trainer.grad_norms()
        weight_names = [nm for nm in norms if nm.endswith("weight")]
        table = torch.stack([*values_, *(norms[nm].to(torch.float64) for nm in weight_names), running]).tolist()
        evals = {name: (table[2 * i], table[2 * i + 1]) for i, name in enumerate(names)}
        norm_values = {nm: table[2 * len(names) + i] for i, nm in enumerate(weight_names)}
        run_loss = [r / max(c, 1) for r, c in zip(table[-1], seen)]
        elapsed += time.perf_counter() - t0
        for k in range(K):
            if not active_at_start[k]:
                continue
            record: dict[str, Any] = {"epoch": epoch, "step": steps[k], "train_loss_running": run_loss[k]}
            for name in ("train", "val"):
                if name in evals:
                    record[f"{name}_loss"], record[f"{name}_{score}"] = evals[name][0][k], evals[name][1][k]
                else:
                    record[f"{name}_loss"] = record[f"{name}_{score}"] = None
            record["lr"] = last_lr[k]
            gl = stop_norms.get(k) or [norm_values[nm][k] for nm in weight_names]
            for i, g in enumerate(gl, 1):
                record[f"grad_norm_{i}"] = g
            record["grad_norm"] = math.sqrt(sum(g * g for g in gl)) if len(gl) == n_layers else math.nan
            record["wall_time_s"] = elapsed
            st = stoppings[k]
            ctx = StopContext(epoch, steps[k], elapsed)
            if decisions[k] is None:
                schedules[k].observe(record[plateau])
                decisions[k] = st.check(record, ctx)
            elif decisions[k][0] != "diverged":  # type: ignore[index]
                st.check(record, ctx)
            if st.improved and st.restore_best:
                best_params[k] = [p.clone() for p in trainer.parameters_of(k)]
            histories[k].append(record)
            if history_files[k] and (decisions[k] is not None or epoch % HISTORY_EVERY == 0):
                history_files[k].update(histories[k])
            if decisions[k] is not None:
                trainer.stop(k)
                finish(k)
    return results  # type: ignore[return-value]
