"""Benchmark: training-step time, saved memory and end-to-end training against native autograd.

    python scripts/bench.py                 # the full grid, with 1 and then 2 threads (--threads 1,2)
    python scripts/bench.py --quick         # a reduced grid (several minutes on 2 CPU cores: compiles)
    python scripts/bench.py --threads 1 --no-anchors --device cuda --out bench-out

Every time is a median over ``--repeats`` rounds; in each round the contenders of one size run one after
the other (interleaved), and a ratio is the median over rounds of (contender / native autograd) measured
in the same round, so a noisy shared machine moves both sides together. The FLOP floor of a step is its
FLOPs (forward 2*N*in*out per layer, backward twice that) over the GEMM rate measured in the same run.
On CUDA every measurement is bracketed by ``torch.cuda.synchronize()`` and TF32 is off.

Rows (per grid size): ``native`` (nn.Sequential + torch.optim.SGD), ``manual`` (manualbp.MLP +
manualbp.CrossEntropyLoss + torch.optim.SGD: the drop-in path, on the compiled nodes where manualbp.native
is built), ``manual-python`` (the same with MANUALBP_NATIVE=off: the Python Functions), ``fused``
(manualbp.fast.FusedTrainer.step_prepared, one step per call), ``fused-epoch`` (step_many over 8 batches,
as backend=fused trains: the loop in C++; per step),
``compile-native``/``compile-manual`` (torch.compile of each model; with --compile), ``vectorized-K``
(manualbp.fast.VectorizedTrainer, time per configuration = one step of K models / K).
End to end (digits, 64-64-10 sigmoid, SGD lr 0.1, batch 32, 100 epochs): scikit-learn's MLPClassifier,
a bare native autograd loop, the manual module loop, backend=autograd and backend=fused through
manualbp.train.run (evaluation, history, checkpoints), and 64 configurations with VectorizedTrainer.

Anchors (issue 18; ``--no-anchors`` skips them): what a user choosing a fast small-MLP trainer would try,
timed in the same rounds as the rows above, each also as a same-round ratio to the manualbp row it competes
with (``x manualbp row``): ``compile-native-step`` (the whole native step, forward, loss, backward by
torch.func.grad_and_value and the SGD update, as one torch.compile graph; compile time reported apart) and
``jax-jit-step`` (one jitted SGD step) against ``fused``; ``jax-scan-epoch`` (lax.scan over 8 batches in one
jit, per step) against ``fused-epoch``; ``func-ensemble-K`` (torch.func.stack_module_state + vmap of
grad_and_value(functional_call), the update on the stacked parameters) and ``jax-vmap-K`` (jit(vmap(step)))
against ``vectorized-K``, with the same K inits and learning rates. The JAX rows start from the torch model's
init (float32, the same batch), their first call (trace and compile) is reported apart, and each size checks
that JAX's losses over 3 steps equal torch's (``|loss - torch|``). Digits end to end gains ``jax lax.scan
epochs``: one jit per epoch, the bare loop's init, batches and order. Without jax (``pip install -e
.[bench]``) the JAX rows read "n/a: jax not installed".

Threads: ``--threads 1,2`` (the default) runs the whole bench once per count, each in a fresh process that
holds torch (set_num_threads), BLAS (OMP/OpenBLAS/MKL variables, threadpoolctl) and XLA (XLA_FLAGS
--xla_cpu_multi_thread_eigen / intra_op_parallelism_threads, and the CPU affinity mask, which jax 0.10's
CPU client sizes its pool from) to that count before jax is imported; one table per count, and a summary of
the anchors per count on top. torch.compile's inductor cache is a fresh directory per process (compile
times are cold).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable

import torch
from torch import nn

import manualbp
from manualbp import native as native_kernels
from manualbp.fast import FusedTrainer, VectorizedTrainer

GRID = [  # (name, in, hidden, out, batch)
    ("64-64-10 b32", 64, [64], 10, 32),
    ("784-256-10 b256", 784, [256], 10, 256),
    ("784-1024-1024-10 b1024", 784, [1024, 1024], 10, 1024),
    ("256-8x256-10 b256", 256, [256] * 8, 10, 256),
]
QUICK_GRID = GRID[:2] + [GRID[3]]
ACTIVATIONS = ["sigmoid", "tanh", "relu", "leaky_relu", "identity"]


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_inner(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    getattr(fn, "sync", lambda: None)()  # an asynchronous contender (JAX) finishes its queued calls
    sync(device)
    return (time.perf_counter() - t0) / inner


def calibrate(fn: Callable[[], object], device: torch.device, target_s: float) -> int:
    """Steps per measurement so that one measurement takes about ``target_s``."""
    for _ in range(3):
        fn()
    t = time_inner(fn, 3, device)
    return max(1, min(2000, int(target_s / max(t, 1e-7))))


def interleaved(
    contenders: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    target_s: float,
    refs: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Median seconds per call of each contender and its median ratio to "native" over interleaved rounds;
    for a contender named in ``refs``, also its median same-round ratio to that other contender."""
    inner = {k: calibrate(f, device, target_s) for k, f in contenders.items()}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(repeats):
        for k, f in contenders.items():
            times[k].append(time_inner(f, inner[k], device))
    out = {}
    base = times.get("native")
    for k, ts in times.items():
        row = {"time_s": statistics.median(ts), "min_s": min(ts)}
        if base is not None:
            row["ratio_native"] = statistics.median(a / b for a, b in zip(ts, base))
        ref = (refs or {}).get(k)
        if ref in times:
            row["ratio_ref"] = statistics.median(a / b for a, b in zip(ts, times[ref]))
        out[k] = row
    return out


def gemm_rate(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """Achieved matmul FLOP/s at a square size (median over repeats)."""
    n = 2048 if device.type == "cpu" and not quick else (1024 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    fn = lambda: torch.mm(a, b, out=c)  # noqa: E731
    inner = calibrate(fn, device, 0.2)
    ts = [time_inner(fn, inner, device) for _ in range(5)]
    return 2 * n**3 / statistics.median(ts)


def step_flops(in_f: int, hidden: list[int], out_f: int, batch: int) -> float:
    widths = [in_f, *hidden, out_f]
    fwd = sum(2 * batch * a * b for a, b in zip(widths[:-1], widths[1:]))
    return 3 * fwd  # forward + backward (twice the forward)


# --------------------------------------------------------------------------------------------------
# Module-level rows
# --------------------------------------------------------------------------------------------------
def make_step(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.01):
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def python_functions(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` with ``MANUALBP_NATIVE=off``: the module runs its Python autograd Functions."""

    def wrapped():
        previous = os.environ.get("MANUALBP_NATIVE")
        os.environ["MANUALBP_NATIVE"] = "off"
        try:
            return step()
        finally:
            if previous is None:
                del os.environ["MANUALBP_NATIVE"]
            else:
                os.environ["MANUALBP_NATIVE"] = previous

    return wrapped


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    return sum(storages.values())


def vectorized_fits(k: int, in_f: int, hidden: list[int], out_f: int, batch: int, budget: float) -> bool:
    widths = [in_f, *hidden, out_f]
    params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    acts = batch * sum(widths[1:])
    return k * (4 * params + 4 * acts) * 4 <= budget  # params, grads, buffers, activations (+ temporaries)


# --------------------------------------------------------------------------------------------------
# Anchors: what a user choosing a fast small-MLP trainer would try instead (issue 18)
# --------------------------------------------------------------------------------------------------
JAX_MISSING = "n/a: jax not installed"


def limit_threads(threads: int) -> None:
    """One thread count for every library of this process; call it before jax is first imported.

    torch: ``set_num_threads``; BLAS (scikit-learn's numpy): the OMP/OpenBLAS/MKL variables, read when the
    library loads; XLA: ``--xla_cpu_multi_thread_eigen`` and ``intra_op_parallelism_threads``, and the CPU
    affinity mask, which XLA's CPU client sizes its thread pool from (with the flags alone jax 0.10 still kept
    four pool threads busy on a 1-thread setting)."""
    torch.set_num_threads(threads)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    try:  # numpy's BLAS is loaded already (torch imports numpy): cap its pool where it runs
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:
        pass
    multi = "true" if threads > 1 else "false"
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen={multi} intra_op_parallelism_threads={threads}"
    ).strip()
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if threads < len(cpus):
            os.sched_setaffinity(0, set(cpus[:threads]))


def load_jax():
    """The jax module, or None where it is not installed (every JAX row then reads "n/a: jax not installed")."""
    try:
        import jax
    except ImportError:
        return None
    return jax


def jax_mlp(jax):
    """The bench MLP in JAX (sigmoid hidden layers, mean cross-entropy) and its plain SGD step."""
    jnp = jax.numpy

    def loss(params, x, y):
        h = x
        for i, (w, b) in enumerate(params):
            h = h @ w + b
            if i < len(params) - 1:
                h = jax.nn.sigmoid(h)
        logp = jax.nn.log_softmax(h, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    def step(params, x, y, lr):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), value

    return loss, step


def jax_params(jax, models: list[nn.Module]):
    """Each Linear's (W^T, b) copied from torch models into float32 JAX arrays; several models stack on axis 0."""
    layers = [[m for m in model.modules() if isinstance(m, nn.Linear)] for model in models]

    def arr(ts):
        a = torch.stack([t.detach().cpu().float() for t in ts]).numpy()
        return jax.numpy.asarray(a if len(models) > 1 else a[0])

    return [(arr([ls[i].weight.T for ls in layers]), arr([ls[i].bias for ls in layers])) for i in range(len(layers[0]))]


class JaxRun:
    """A timed JAX contender: each call advances the state by one jitted call (dispatched asynchronously, as
    a user's loop runs it); ``sync`` waits for the result, once per measurement, like ``torch.cuda.synchronize``."""

    def __init__(self, jax, fn, state, *args):
        self.jax, self.fn, self.state, self.args = jax, fn, state, args
        t0 = time.perf_counter()
        self()
        self.sync()
        self.compile_s = time.perf_counter() - t0  # the first call traces and compiles

    def __call__(self):
        self.state, self.loss = self.fn(self.state, *self.args)

    def sync(self):
        self.jax.block_until_ready(self.state)


def jax_step_contenders(jax, native: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, epoch_steps: int):
    """``jax-jit-step`` (one jitted SGD step a call) and ``jax-scan-epoch`` (``lax.scan`` over ``epoch_steps``
    batches inside one jit; the bench divides by the steps) from the torch model's init, on the same batch."""
    _, step = jax_mlp(jax)
    jnp = jax.numpy
    xj, yj = jnp.asarray(x.cpu().numpy()), jnp.asarray(y.cpu().numpy())
    jit_step = jax.jit(lambda p, x, y: step(p, x, y, lr), donate_argnums=0)

    def epoch(params, xs, ys):
        return jax.lax.scan(lambda p, xy: step(p, xy[0], xy[1], lr), params, (xs, ys))

    xs, ys = jnp.stack([xj] * epoch_steps), jnp.stack([yj] * epoch_steps)
    return {
        "jax-jit-step": JaxRun(jax, jit_step, jax_params(jax, [native]), xj, yj),
        "jax-scan-epoch": JaxRun(jax, jax.jit(epoch, donate_argnums=0), jax_params(jax, [native]), xs, ys),
    }


def jax_vmap_contender(jax, models: list[nn.Module], x: torch.Tensor, y: torch.Tensor, lrs: list[float]) -> JaxRun:
    """``jax-vmap-K``: jit(vmap(step)) over K stacked models, each with its own learning rate, on one batch."""
    _, step = jax_mlp(jax)
    jnp = jax.numpy
    many = jax.jit(jax.vmap(step, in_axes=(0, None, None, 0)), donate_argnums=0)
    xj, yj = jnp.asarray(x.cpu().numpy()), jnp.asarray(y.cpu().numpy())
    return JaxRun(jax, many, jax_params(jax, models), xj, yj, jnp.asarray(lrs, dtype=jnp.float32))


def jax_losses(jax, native: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int = 3):
    """(JAX losses, torch losses) over ``steps`` SGD steps from the same init on the same batch: the JAX
    anchor's correctness check (they agree to about 1e-6 in float32)."""
    _, step = jax_mlp(jax)
    params = jax_params(jax, [native])
    xj, yj = jax.numpy.asarray(x.cpu().numpy()), jax.numpy.asarray(y.cpu().numpy())
    mine = []
    for _ in range(steps):
        params, loss = jax.jit(step)(params, xj, yj, lr)
        mine.append(float(loss))
    model = copy.deepcopy(native)
    torch_step = make_step(model, nn.CrossEntropyLoss(), x, y, lr=lr)
    return mine, [torch_step().item() for _ in range(steps)]


def compile_native_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.01):
    """``compile-native-step``: the whole native training step as one ``torch.compile`` graph: forward and
    cross-entropy of the ``nn.Sequential`` (``functional_call``), the backward (``torch.func.grad_and_value``)
    and the SGD update, returning new parameters (as ``jax-jit-step`` does; one graph, no graph break).
    Compiling the module with ``opt.step()`` compiled apart was slower than eager at 64-64-10 (two graphs, the
    optimizer's graph break and guards on every parameter). Returns (step, seconds of the first call: the
    trace and compile, reported apart from the steady-state step); ``step.params`` are the current parameters."""
    from torch.func import functional_call, grad_and_value

    base = copy.deepcopy(model).to("meta")

    def loss(params, x, y):
        return nn.functional.cross_entropy(functional_call(base, params, (x,)), y)

    def sgd(params, x, y):
        grads, value = grad_and_value(loss)(params, x, y)
        return {k: p - lr * grads[k] for k, p in params.items()}, value

    compiled = torch.compile(sgd)

    def step():
        step.params, value = compiled(step.params, x, y)
        return value

    step.params = {k: p.detach().clone() for k, p in model.named_parameters()}
    t0 = time.perf_counter()
    step()
    return step, time.perf_counter() - t0


def func_ensemble_step(models: list[nn.Module], x: torch.Tensor, y: torch.Tensor, lrs: list[float]):
    """``func-ensemble-K``: torch.func model ensembling, ``stack_module_state`` of K native models,
    ``vmap(grad_and_value(loss of functional_call))`` over them, and the SGD update on the stacked parameters
    (each model's learning rate as a broadcast column). ``step.params`` are the stacked parameters and
    ``step.grads()`` the gradients of the current state (for the check against per-model autograd)."""
    from torch.func import functional_call, grad_and_value, stack_module_state, vmap

    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p, b, x, y):
        return nn.functional.cross_entropy(functional_call(base, (p, b), (x,)), y)

    batched = vmap(grad_and_value(loss), in_dims=(0, 0, None, None))
    rate = torch.tensor(lrs, dtype=x.dtype, device=x.device)
    rates = {k: rate.view(-1, *[1] * (v.dim() - 1)) for k, v in params.items()}

    def step():
        grads, losses = batched(params, buffers, x, y)
        with torch.no_grad():
            for k, p in params.items():
                p.addcmul_(rates[k], grads[k], value=-1)
        return losses

    step.params = params
    step.grads = lambda: batched(params, buffers, x, y)[0]
    return step


def jax_digits_epochs(jax, model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int):
    """JAX end to end: one jitted call per epoch, ``lax.scan`` over its shuffled batches (the last, smaller
    batch one more step in the same jit), the shuffles drawn from torch's generator seeded 1 as in the bare
    autograd loop (the same batches in the same order). Returns (params, seconds, compile seconds apart)."""
    _, step = jax_mlp(jax)
    jnp = jax.numpy
    n = x.shape[0]
    full = n // batch * batch

    def epoch(params, xj, yj, perm):
        xb, yb = xj[perm], yj[perm]
        xs, ys = xb[:full].reshape(n // batch, batch, -1), yb[:full].reshape(n // batch, batch)
        params, _ = jax.lax.scan(lambda p, b: step(p, b[0], b[1], lr), params, (xs, ys))
        if full < n:
            params, _ = step(params, xb[full:], yb[full:], lr)
        return params

    run = jax.jit(epoch, donate_argnums=0)
    xj, yj = jnp.asarray(x.cpu().numpy()), jnp.asarray(y.cpu().numpy())
    t0 = time.perf_counter()
    jax.block_until_ready(run(jax_params(jax, [model]), xj, yj, jnp.arange(n)))
    compile_s = time.perf_counter() - t0
    params = jax_params(jax, [model])
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for _ in range(epochs):
        params = run(params, xj, yj, jnp.asarray(torch.randperm(n, generator=g).numpy()))
    jax.block_until_ready(params)
    return params, time.perf_counter() - t0, compile_s


def jax_accuracy(jax, params, x: torch.Tensor, y: torch.Tensor) -> float:
    h = jax.numpy.asarray(x.cpu().numpy())
    for i, (w, b) in enumerate(params):
        h = h @ w + b
        h = jax.nn.sigmoid(h) if i < len(params) - 1 else h
    return float((jax.numpy.argmax(h, -1) == jax.numpy.asarray(y.cpu().numpy())).mean())


class Anchors:
    """The anchor rows of one grid size: contenders to time, their steps per call, the manualbp row each is
    compared with, extra fields (compile seconds, correctness checks) and rows that cannot run (and why)."""

    def __init__(self, contenders: dict, per_config: dict):
        self.contenders, self.per_config = contenders, per_config
        self.refs: dict[str, str] = {}
        self.extra: dict[str, dict] = {}
        self.missing: dict[str, str] = {}

    def add(self, label: str, fn, ref: str, steps: int = 1, **extra) -> None:
        self.contenders[label], self.per_config[label], self.refs[label] = fn, steps, ref
        self.extra[label] = {k: v for k, v in extra.items() if v is not None}

    def single(self, native: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> None:
        """compile-native-step, jax-jit-step, jax-scan-epoch (beside fused / fused-epoch)."""
        epoch_ref = "fused-epoch" if "fused-epoch" in self.contenders else "fused"
        try:
            step, seconds = compile_native_step(copy.deepcopy(native), x, y, lr)
            self.add("compile-native-step", step, "fused", compile_s=seconds)
        except Exception as e:  # noqa: BLE001 - a compile failure is reported, not fatal
            self.missing["compile-native-step"] = f"n/a: {type(e).__name__}: {str(e)[:80]}"
        jax = load_jax() if x.device.type == "cpu" else None
        if jax is None:
            note = JAX_MISSING if x.device.type == "cpu" else "n/a: the JAX rows run on CPU only"
            self.missing.update({"jax-jit-step": note, "jax-scan-epoch": note})
            return
        mine, ref = jax_losses(jax, native, x, y, lr)
        check = max(abs(a - b) for a, b in zip(mine, ref))
        runs = jax_step_contenders(jax, native, x, y, lr, EPOCH_STEPS)
        self.add("jax-jit-step", runs["jax-jit-step"], "fused", compile_s=runs["jax-jit-step"].compile_s, check=check)
        run = runs["jax-scan-epoch"]
        self.add("jax-scan-epoch", run, epoch_ref, EPOCH_STEPS, compile_s=run.compile_s, check=check)

    def ensemble(self, models: list[nn.Module], x: torch.Tensor, y: torch.Tensor, lrs: list[float]) -> None:
        """func-ensemble-K and jax-vmap-K beside vectorized-K (the same K inits and learning rates)."""
        k = len(models)
        self.add(f"func-ensemble-{k}", func_ensemble_step(models, x, y, lrs), f"vectorized-{k}", k)
        jax = load_jax() if x.device.type == "cpu" else None
        if jax is None:
            self.missing[f"jax-vmap-{k}"] = JAX_MISSING if x.device.type == "cpu" else "n/a: CPU only"
            return
        run = jax_vmap_contender(jax, models, x, y, lrs)
        self.add(f"jax-vmap-{k}", run, f"vectorized-{k}", k, compile_s=run.compile_s)


EPOCH_STEPS = 8  # batches per fused-epoch / jax-scan-epoch call


def bench_grid(args, device: torch.device, dtype: torch.dtype, rate: float) -> list[dict]:
    rows = []
    grid = QUICK_GRID if args.quick else GRID
    ks = [8, 64] if args.quick else [8, 64, 256]
    budget = (torch.cuda.get_device_properties(device).total_memory * 0.5) if device.type == "cuda" else 6e9
    for name, in_f, hidden, out_f, batch in grid:
        torch.manual_seed(0)
        x = torch.randn(batch, in_f, device=device, dtype=dtype)
        y = torch.randint(0, out_f, (batch,), device=device)
        manual = manualbp.MLP(in_f, hidden, out_f, activation="sigmoid", device=device, dtype=dtype)
        native = manual.to_torch()
        fused_model = manualbp.MLP(in_f, hidden, out_f, activation="sigmoid", device=device, dtype=dtype)
        fused_model.load_state_dict(manual.state_dict())
        fused = FusedTrainer(fused_model, "cross_entropy", lr=0.01)
        anchor_init = copy.deepcopy(native)  # the anchors start from the same init as every other row
        contenders: dict[str, Callable[[], object]] = {
            "native": make_step(native, nn.CrossEntropyLoss(), x, y),
            "manual": make_step(manual, manualbp.CrossEntropyLoss(), x, y),
            # the batch prepared once (ones column, one-hot targets), then one step per call from Python
            "fused": functools.partial(fused.step_prepared, *fused.prepare(x, y)),
        }
        per_config = {}
        anchors = Anchors(contenders, per_config)
        if native_kernels.load() is not None:
            # the module's Python Functions instead of their compiled twins (the drop-in path without C++)
            contenders["manual-python"] = python_functions(make_step(manual, manualbp.CrossEntropyLoss(), x, y))
            # as backend=fused trains: step_many, here 8 consecutive batches in one call (the loop in C++)
            xs, ys = fused.prepare(x.repeat(EPOCH_STEPS, 1), y.repeat(EPOCH_STEPS))
            contenders["fused-epoch"] = functools.partial(fused.step_many, xs, ys, batch)
            per_config["fused-epoch"] = EPOCH_STEPS
        if args.compile:
            for label, model, lf in (
                ("compile-native", manual.to_torch(), nn.CrossEntropyLoss()),
                ("compile-manual", manualbp.MLP.from_torch(manual.to_torch()), manualbp.CrossEntropyLoss()),
            ):
                try:
                    step = make_step(torch.compile(model), lf, x, y)
                    step()
                    contenders[label] = step
                except Exception as e:  # noqa: BLE001 - a compile failure is reported, not fatal
                    print(f"  {label} skipped: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
        if args.anchors:
            anchors.single(anchor_init, x, y, 0.01)
        for k in ks if (args.quick is False or name == grid[0][0]) else []:
            if not vectorized_fits(k, in_f, hidden, out_f, batch, budget):
                continue
            models = []
            for s in range(k):
                torch.manual_seed(s)
                models.append(manualbp.MLP(in_f, hidden, out_f, activation="sigmoid", device=device, dtype=dtype))
            lrs = torch.linspace(0.001, 0.1, k).tolist()
            vt = VectorizedTrainer(models, "cross_entropy", lr=lrs)
            contenders[f"vectorized-{k}"] = lambda vt=vt, x=x, y=y: vt.step(x, y)
            per_config[f"vectorized-{k}"] = k
            if args.anchors:  # the same K inits and learning rates
                anchors.ensemble([m.to_torch() for m in models], x, y, lrs)
            del models
        print(f"{name}: timing {', '.join(contenders)}", flush=True)
        result = interleaved(contenders, device, args.repeats, args.target, anchors.refs)
        flops = step_flops(in_f, hidden, out_f, batch)
        floor = flops / rate
        for label, r in result.items():
            k = per_config.get(label, 1)
            t = r["time_s"] / k
            row = {
                "size": name,
                "contender": label,
                "time_per_config_s": t,
                "step_time_s": r["time_s"],
                "k": k,
                "ratio_native": r.get("ratio_native", float("nan")) / k,
                "gflops": flops / t / 1e9,
                "floor_s": floor,
                "ratio_floor": t / floor,
            }
            ref = anchors.refs.get(label)
            if ref is not None and "ratio_ref" in r:  # same-round ratio per configuration (or per step)
                row["ref"] = ref
                row["ratio_ref"] = r["ratio_ref"] * per_config.get(ref, 1) / k
            row.update(anchors.extra.get(label, {}))
            rows.append(row)
            print(
                f"  {label:19s} {t * 1e6:10.1f} us/config  x{row['ratio_native']:.3f} native  "
                f"{row['gflops']:7.2f} GFLOP/s  x{row['ratio_floor']:.2f} floor"
                + (f"  x{row['ratio_ref']:.3f} {ref}" if "ratio_ref" in row else "")
                + (f"  (compile {row['compile_s']:.2f} s)" if "compile_s" in row else "")
                + (f"  |loss - torch| {row['check']:.1e}" if "check" in row else ""),
                flush=True,
            )
        for label, note in anchors.missing.items():
            rows.append({"size": name, "contender": label, "note": note})
            print(f"  {label:19s} {note}", flush=True)
    return rows


def bench_saved(device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    for act in ACTIVATIONS:
        torch.manual_seed(0)
        manual = manualbp.MLP(784, [256, 256], 10, activation=act, device=device, dtype=dtype)
        native = manual.to_torch()
        x = torch.randn(256, 784, device=device, dtype=dtype)
        mine, ref = saved_bytes(manual, x), saved_bytes(native, x)
        rows.append({"activation": act, "manual_bytes": mine, "native_bytes": ref, "ratio": mine / ref})
    return rows


# --------------------------------------------------------------------------------------------------
# End to end: digits
# --------------------------------------------------------------------------------------------------
def bench_digits(args, device: torch.device) -> list[dict]:
    from manualbp.train import run
    from manualbp.train.data import load_dataset

    epochs = args.epochs
    data = load_dataset({"name": "digits", "val_fraction": 0.1, "test_fraction": 0.2}, 0, torch.float32, device)
    x, y, xt, yt = data.x_train, data.y_train, data.x_test, data.y_test
    n = x.shape[0]
    rows = []

    def record(label, seconds, acc, configs=1, **extra):
        if isinstance(seconds, list):  # repeated measurements: the median
            seconds = statistics.median(seconds)
        row = {
            **extra,
            "contender": label,
            "wall_s": seconds,
            "configs": configs,
            "per_config_s": seconds / configs,
            "per_example_epoch_us": seconds / configs / (n * epochs) * 1e6,
            "test_accuracy": acc,
        }
        rows.append(row)
        print(f"  {label:28s} {seconds:8.3f} s  ({row['per_config_s']:.3f} s/config)  test acc {acc:.4f}", flush=True)

    def accuracy(out, target):
        return (out.argmax(-1) == target).double().mean().item()

    def loop(model, loss_fn):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(epochs):
            perm = torch.randperm(n, generator=g).to(device)
            for i in range(0, n, 32):
                idx = perm[i : i + 32]
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
        sync(device)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            return seconds, accuracy(model(xt), yt)

    print(f"digits end to end: {n} training examples, {epochs} epochs, 64-64-10 sigmoid, SGD lr 0.1 batch 32")
    for label, make in (
        ("bare native autograd loop", lambda m: (m.to_torch(), nn.CrossEntropyLoss())),
        ("manual module loop", lambda m: (m, manualbp.CrossEntropyLoss())),
    ):
        times, acc = [], 0.0
        for _ in range(args.e2e_repeats):
            torch.manual_seed(0)
            model, loss_fn = make(manualbp.MLP(64, [64], 10, activation="sigmoid", device=device))
            seconds, acc = loop(model, loss_fn)
            times.append(seconds)
        record(label, times, acc)

    base = {
        "data": {"name": "digits"},
        "device": str(device),
        "stopping": {"max_epochs": epochs, "early_stopping": None},
        "init": {"name": "torch_default"},
        "progress": False,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("autograd", "fused"):
            times = []
            for r in range(args.e2e_repeats):
                cfg = {**base, "backend": backend, "output_dir": os.path.join(tmp, f"{backend}{r}")}
                t0 = time.perf_counter()
                result = run(cfg)
                times.append(time.perf_counter() - t0)
            record(f"run(backend={backend})", times, result.metrics["test_accuracy"])

    jax = load_jax() if args.anchors else None
    if jax is not None:  # the bare loop's init, batches and order; the compile timed apart
        times, compiles = [], []
        for _ in range(args.e2e_repeats):
            torch.manual_seed(0)
            model = manualbp.MLP(64, [64], 10, activation="sigmoid").to_torch()
            params, seconds, compile_s = jax_digits_epochs(jax, model, x, y, epochs, 0.1, 32)
            times.append(seconds)
            compiles.append(compile_s)
        acc = jax_accuracy(jax, params, xt, yt)
        record("jax lax.scan epochs (jit)", times, acc, compile_s=statistics.median(compiles))
    elif args.anchors:
        rows.append({"contender": "jax lax.scan epochs (jit)", "note": JAX_MISSING})
        print(f"  jax lax.scan epochs (jit)    {JAX_MISSING}", flush=True)

    k = 64
    models = []
    for s in range(k):
        torch.manual_seed(s)
        models.append(manualbp.MLP(64, [64], 10, activation="sigmoid", device=device))
    lrs = torch.logspace(-2, 0, k).tolist()
    vt = VectorizedTrainer(models, "cross_entropy", lr=lrs)
    g = torch.Generator().manual_seed(1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(0, n, 32):
            idx = perm[i : i + 32]
            vt.step(x[idx], y[idx])
    sync(device)
    seconds = time.perf_counter() - t0
    accs = (vt.predict(xt).argmax(-1) == yt).double().mean(-1)
    record(f"vectorized K={k} (lr sweep; best acc)", seconds, accs.max().item(), configs=k)
    try:
        import warnings

        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier

        clf = MLPClassifier(
            hidden_layer_sizes=(64,),
            activation="logistic",
            solver="sgd",
            learning_rate_init=0.1,
            momentum=0.0,
            nesterovs_momentum=False,
            batch_size=32,
            alpha=0.0,
            max_iter=epochs,
            tol=0.0,
            n_iter_no_change=10**9,
            shuffle=True,
            random_state=0,
        )
        xn, yn = x.cpu().numpy(), y.cpu().numpy()
        times = []
        for _ in range(args.e2e_repeats):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                t0 = time.perf_counter()
                clf.fit(xn, yn)
                times.append(time.perf_counter() - t0)
        record("scikit-learn MLPClassifier", times, float(clf.score(xt.cpu().numpy(), yt.cpu().numpy())))
    except ImportError:
        print("  scikit-learn missing: row skipped")

    return rows


# --------------------------------------------------------------------------------------------------
# End to end through the command line: a 64-configuration sweep, vectorized against ordinary jobs
# --------------------------------------------------------------------------------------------------
#: the 64 jobs of each ``--cli-grid``: the sweep overrides, and the issue and target the ratio is held to
CLI_GRIDS = {
    "lrs": (  # 8 inits x 8 learning rates (SGD)
        [
            "init=xavier_uniform,xavier_normal,kaiming_uniform,kaiming_normal,lecun_uniform,lecun_normal,normal,orthogonal",
            "optim.lr=0.01,0.02,0.05,0.1,0.2,0.3,0.5,1.0",
        ],
        "issue 6 target: <= 0.10",
    ),
    "widths": (  # 2 optimizers x 4 hidden widths x 8 seeds: one padded group per optimizer
        ["optim=sgd,adam", "model.hidden=[16],[32],[64],[128]", "seed=0,1,2,3,4,5,6,7"],
        "issue 18 target: <= 0.15",
    ),
}


def bench_cli_sweep(args) -> list[dict]:
    """``experiments/train.py -m`` over the 64 jobs of ``--cli-grid`` (8 inits x 8 learning rates, or
    optim=sgd,adam x 4 widths x 8 seeds) x ``--epochs`` epochs: wall time of hydra/sweeper=vectorized
    against the same sweep as ordinary jobs with backend=autograd (start-up, evaluation and output writing
    included)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    grid, target = CLI_GRIDS[args.cli_grid]
    common = [
        "logger=none",
        "progress=false",
        f"stopping.max_epochs={args.epochs}",
        "stopping.early_stopping=null",
        *grid,
        f"device={args.device if args.device != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')}",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, label, extra in (
            ("vectorized", "sweep: hydra/sweeper=vectorized", ["hydra/sweeper=vectorized"]),
            ("ordinary", "sweep: ordinary jobs, backend=autograd", ["backend=autograd"]),
        ):
            out = os.path.join(tmp, name)
            cmd = [sys.executable, os.path.join(root, "experiments", "train.py"), "-m", *common, *extra]
            cmd.append(f"hydra.sweep.dir={out}")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if proc.returncode != 0:
                print(f"  {label} failed: {proc.stderr[-500:]}", file=sys.stderr)
                continue
            accs = []
            for job in os.listdir(out):
                path = os.path.join(out, job, "metrics.json")
                if os.path.exists(path):
                    with open(path) as f:
                        accs.append(json.load(f).get("test_accuracy") or 0.0)
            rows.append({"contender": label, "wall_s": seconds, "jobs": len(accs), "best_test_accuracy": max(accs)})
            print(f"  {label:40s} {seconds:8.1f} s  {len(accs)} jobs  best test acc {max(accs):.4f}", flush=True)
    if len(rows) == 2:
        ratio = rows[0]["wall_s"] / rows[1]["wall_s"]
        print(f"  vectorized / ordinary wall time: {ratio:.3f} ({target})", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "compiled_kernels": native_kernels.load() is not None,
        "jax": getattr(load_jax(), "__version__", None),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpus_allowed": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        info["device"] = f"{cpu}, {os.cpu_count()} cores"
    return info


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['device']}; torch {m['torch']}; jax {m.get('jax') or 'not installed'}; {m['threads']} "
        f"threads (CPUs allowed: {m.get('cpus_allowed', '?')}; XLA_FLAGS {m.get('xla_flags') or 'unset'}); {m['date']}; "
        f"GEMM rate {report['gemm_gflops']:.1f} GFLOP/s ({report['dtype']}); compiled kernels "
        f"(manualbp.native): {'yes' if m.get('compiled_kernels') else 'no'}.",
        "",
        "| size | contender | time / config | x native | GFLOP/s | x FLOP floor | x manualbp row | compile |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in report["grid"]:
        if "note" in r:  # an anchor that could not run here
            lines.append(f"| {r['size']} | {r['contender']} | {r['note']} | | | | | |")
            continue
        ref = f"{r['ratio_ref']:.3f} ({r['ref']})" if "ratio_ref" in r else ""
        comp = f"{r['compile_s']:.2f} s" if "compile_s" in r else ""
        lines.append(
            f"| {r['size']} | {r['contender']} | {r['time_per_config_s'] * 1e6:.1f} us | {r['ratio_native']:.3f} | "
            f"{r['gflops']:.2f} | {r['ratio_floor']:.2f} | {ref} | {comp} |"
        )
    lines += ["", "| activation | manual saved bytes | native saved bytes | ratio |", "|---|---:|---:|---:|"]
    for r in report["saved"]:
        lines.append(f"| {r['activation']} | {r['manual_bytes']} | {r['native_bytes']} | {r['ratio']:.3f} |")
    if report.get("digits"):
        base = next((r for r in report["digits"] if r["contender"] == "bare native autograd loop"), None)
        skl = next((r for r in report["digits"] if r["contender"].startswith("scikit")), None)
        lines += [
            "",
            f"digits end to end ({report['epochs']} epochs):",
            "",
            "| contender | wall time | per config | us / example / epoch | x bare autograd | x scikit-learn | test accuracy |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["digits"]:
            if "note" in r:
                lines.append(f"| {r['contender']} | {r['note']} | | | | | |")
                continue
            rb = r["per_config_s"] / base["per_config_s"] if base else float("nan")
            rs = r["per_config_s"] / skl["per_config_s"] if skl else float("nan")
            name = r["contender"] + (f" (+{r['compile_s']:.2f} s compile, apart)" if "compile_s" in r else "")
            lines.append(
                f"| {name} | {r['wall_s']:.3f} s | {r['per_config_s']:.3f} s | "
                f"{r['per_example_epoch_us']:.2f} | {rb:.3f} | {rs:.3f} | {r['test_accuracy']:.4f} |"
            )
    if report.get("cli_sweep"):
        rows = report["cli_sweep"]
        base = rows[-1]["wall_s"] if len(rows) == 2 else float("nan")
        lines += [
            "",
            f"command-line sweep, 64 configurations ({report.get('cli_grid', 'lrs')} grid) x {report['epochs']} epochs"
            " (digits):",
            "",
            "| sweep | wall time | jobs | x ordinary autograd sweep | best test accuracy |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['contender']} | {r['wall_s']:.1f} s | {r['jobs']} | {r['wall_s'] / base:.3f} | "
                f"{r['best_test_accuracy']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def per_thread_runs(argv: list[str], threads: list[int], out: str | None) -> dict:
    """The bench once per thread count, each in a fresh process (XLA's thread count is fixed when jax is
    imported); every row of one count runs interleaved in its process. One report: ``runs``, one per count."""
    import subprocess

    rest, skip = [], False
    for a in argv:  # the same arguments without --threads / --out
        if skip:
            skip = False
        elif a in ("--threads", "--out"):
            skip = True
        elif not a.startswith(("--threads=", "--out=")):
            rest.append(a)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in threads:
            child = os.path.join(tmp, str(t))
            print(f"=== {t} thread(s) ===", flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), *rest, "--threads", str(t), "--out", child]
            env = {**os.environ, **{v: str(t) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
            subprocess.run(cmd, check=True, env=env)
            with open(os.path.join(child, "bench.json")) as f:
                runs.append(json.load(f))
    report = {"machine": {**runs[0]["machine"], "threads": threads}, "runs": runs}
    md = (
        summary_markdown(runs)
        + "\n"
        + "\n".join(f"### {r['machine']['threads']} thread(s)\n\n" + markdown(r) for r in runs)
    )
    print()
    print(md)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "bench.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(out, "bench.md"), "w") as f:
            f.write(md)
        print(f"wrote {out}/bench.json and {out}/bench.md")
    return report


def summary_markdown(runs: list[dict]) -> str:
    """The anchors against the manualbp row each is compared with (same-round ratios), one column per thread
    count; below 1 the anchor is faster. Digits end to end: each row per configuration / run(backend=fused)."""
    counts = [r["machine"]["threads"] for r in runs]
    head = " | ".join(f"{t} thread(s)" for t in counts)
    lines = [
        "Anchors / manualbp (time per configuration, same round; < 1: the anchor is faster):",
        "",
        f"| size | anchor | manualbp row | {head} |",
        "|---|---|---|" + "---:|" * len(counts),
    ]
    keys = [(r["size"], r["contender"]) for r in runs[0]["grid"] if "ref" in r or "note" in r]
    for size, label in keys:
        cells, ref = [], ""
        for run in runs:
            row = next((r for r in run["grid"] if (r["size"], r["contender"]) == (size, label)), {})
            ref = row.get("ref", ref)
            cells.append(f"{row['ratio_ref']:.3f}" if "ratio_ref" in row else row.get("note", "n/a"))
        lines.append(f"| {size} | {label} | {ref} | " + " | ".join(cells) + " |")
    if all(r.get("digits") for r in runs):
        lines += ["", "Digits end to end, per configuration / run(backend=fused):", ""]
        lines += [f"| contender | {head} |", "|---|" + "---:|" * len(counts)]
        for label in [r["contender"] for r in runs[0]["digits"]]:
            cells = []
            for run in runs:
                fused = next((r for r in run["digits"] if r["contender"] == "run(backend=fused)"), None)
                row = next((r for r in run["digits"] if r["contender"] == label), {})
                ok = fused is not None and "per_config_s" in row
                cells.append(f"{row['per_config_s'] / fused['per_config_s']:.3f}" if ok else row.get("note", "n/a"))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when visible)")
    p.add_argument("--quick", action="store_true", help="reduced grid (about two minutes on 2 CPU cores)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile rows (slow to compile on CPU)")
    p.add_argument(
        "--no-anchors", dest="anchors", action="store_false", help="skip the torch.compile, torch.func and JAX rows"
    )
    p.add_argument("--no-digits", action="store_true", help="skip the end-to-end digits rows")
    p.add_argument("--epochs", type=int, default=100, help="epochs of the end-to-end digits rows")
    p.add_argument("--e2e-repeats", type=int, default=None, help="repeats of each end-to-end row (median)")
    p.add_argument("--cli-sweep", action="store_true", help="also time a 64-job command-line sweep both ways (minutes)")
    p.add_argument("--only-cli-sweep", action="store_true", help="only the command-line sweep rows")
    p.add_argument(
        "--cli-grid", choices=sorted(CLI_GRIDS), default="lrs",
        help="the command-line sweep's 64 jobs: lrs (8 inits x 8 lrs) or widths (optim=sgd,adam x 4 widths x 8 seeds)",
    )  # fmt: skip
    p.add_argument(
        "--sections", default=None, help="comma-separated subset of grid,saved,digits,cli (default: all that apply)"
    )
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds per size")
    p.add_argument("--target", type=float, default=None, help="seconds per measurement")
    p.add_argument(
        "--threads",
        default="1,2",
        help="thread counts, comma-separated (default 1,2): each a fresh process with torch, BLAS and XLA held to "
        "that many threads, every row of the run in it; one count runs in this process",
    )
    p.add_argument("--out", default=None, help="directory for bench.json and bench.md")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 9
    if args.e2e_repeats is None:
        args.e2e_repeats = 1 if args.quick else 3
    if args.target is None:
        args.target = 0.03 if args.quick else 0.08
    threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    if len(threads) > 1:
        return per_thread_runs(sys.argv[1:] if argv is None else argv, threads, args.out)
    if threads:
        limit_threads(threads[0])  # before jax is imported (the first JAX row imports it)
    # torch.compile's compile time measured cold: an inductor cache of this run only
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        import atexit
        import shutil

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="manualbp-bench-inductor-")
        atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(dev)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = torch.float32
    info = machine(device)
    print(f"device: {info['device']}  torch {info['torch']}  threads {info['threads']}", flush=True)
    rate = gemm_rate(device, dtype, args.quick)
    print(f"GEMM rate: {rate / 1e9:.1f} GFLOP/s", flush=True)
    only = args.only_cli_sweep
    if args.sections:
        chosen = set(args.sections.split(","))
        only = False
        args.no_digits = "digits" not in chosen
        args.cli_sweep = "cli" in chosen
    else:
        chosen = {"grid", "saved"} if not only else set()
    report = {
        "machine": info,
        "dtype": str(dtype).replace("torch.", ""),
        "gemm_gflops": rate / 1e9,
        "quick": args.quick,
        "epochs": args.epochs,
        "cli_grid": args.cli_grid,
        "grid": bench_grid(args, device, dtype, rate) if "grid" in chosen else [],
        "saved": bench_saved(device, dtype) if "saved" in chosen else [],
        "digits": [] if args.no_digits or only else bench_digits(args, device),
        "cli_sweep": bench_cli_sweep(args) if args.cli_sweep or only else [],
    }
    md = markdown(report)
    print()
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(args.out, "bench.md"), "w") as f:
            f.write(md)
        print(f"wrote {args.out}/bench.json and {args.out}/bench.md")
    return report


if __name__ == "__main__":
    main()
