"""Benchmark: training-step time, saved memory and end-to-end training against native autograd.

    python scripts/bench.py                 # the full grid (add --compile for the torch.compile rows)
    python scripts/bench.py --quick         # a reduced grid (about two minutes on 2 CPU cores)
    python scripts/bench.py --device cuda --out bench-out

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
"""

from __future__ import annotations

import argparse
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
    sync(device)
    return (time.perf_counter() - t0) / inner


def calibrate(fn: Callable[[], object], device: torch.device, target_s: float) -> int:
    """Steps per measurement so that one measurement takes about ``target_s``."""
    for _ in range(3):
        fn()
    t = time_inner(fn, 3, device)
    return max(1, min(2000, int(target_s / max(t, 1e-7))))


def interleaved(
    contenders: dict[str, Callable[[], object]], device: torch.device, repeats: int, target_s: float
) -> dict[str, dict[str, float]]:
    """Median seconds per call of each contender and its median ratio to "native" over interleaved rounds."""
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
        contenders: dict[str, Callable[[], object]] = {
            "native": make_step(native, nn.CrossEntropyLoss(), x, y),
            "manual": make_step(manual, manualbp.CrossEntropyLoss(), x, y),
            # the batch prepared once (ones column, one-hot targets), then one step per call from Python
            "fused": functools.partial(fused.step_prepared, *fused.prepare(x, y)),
        }
        per_config = {}
        if native_kernels.load() is not None:
            # the module's Python Functions instead of their compiled twins (the drop-in path without C++)
            contenders["manual-python"] = python_functions(make_step(manual, manualbp.CrossEntropyLoss(), x, y))
            # as backend=fused trains: step_many, here 8 consecutive batches in one call (the loop in C++)
            xs, ys = fused.prepare(x.repeat(8, 1), y.repeat(8))
            contenders["fused-epoch"] = functools.partial(fused.step_many, xs, ys, batch)
            per_config["fused-epoch"] = 8
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
        for k in ks if (args.quick is False or name == grid[0][0]) else []:
            if not vectorized_fits(k, in_f, hidden, out_f, batch, budget):
                continue
            models = []
            for s in range(k):
                torch.manual_seed(s)
                models.append(manualbp.MLP(in_f, hidden, out_f, activation="sigmoid", device=device, dtype=dtype))
            vt = VectorizedTrainer(models, "cross_entropy", lr=torch.linspace(0.001, 0.1, k).tolist())
            contenders[f"vectorized-{k}"] = lambda vt=vt, x=x, y=y: vt.step(x, y)
            per_config[f"vectorized-{k}"] = k
            del models
        print(f"{name}: timing {', '.join(contenders)}", flush=True)
        result = interleaved(contenders, device, args.repeats, args.target)
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
            rows.append(row)
            print(
                f"  {label:16s} {t * 1e6:10.1f} us/config  x{row['ratio_native']:.3f} native  "
                f"{row['gflops']:7.2f} GFLOP/s  x{row['ratio_floor']:.2f} floor",
                flush=True,
            )
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

    def record(label, seconds, acc, configs=1):
        if isinstance(seconds, list):  # repeated measurements: the median
            seconds = statistics.median(seconds)
        row = {
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
        f"Machine: {m['device']}; torch {m['torch']}; {m['threads']} threads; {m['date']}; "
        f"GEMM rate {report['gemm_gflops']:.1f} GFLOP/s ({report['dtype']}); compiled kernels "
        f"(manualbp.native): {'yes' if m.get('compiled_kernels') else 'no'}.",
        "",
        "| size | contender | time / config | x native | GFLOP/s | x FLOP floor |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["grid"]:
        lines.append(
            f"| {r['size']} | {r['contender']} | {r['time_per_config_s'] * 1e6:.1f} us | {r['ratio_native']:.3f} | "
            f"{r['gflops']:.2f} | {r['ratio_floor']:.2f} |"
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
            rb = r["per_config_s"] / base["per_config_s"] if base else float("nan")
            rs = r["per_config_s"] / skl["per_config_s"] if skl else float("nan")
            lines.append(
                f"| {r['contender']} | {r['wall_s']:.3f} s | {r['per_config_s']:.3f} s | "
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when visible)")
    p.add_argument("--quick", action="store_true", help="reduced grid (about two minutes on 2 CPU cores)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile rows (slow to compile on CPU)")
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
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default=None, help="directory for bench.json and bench.md")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 9
    if args.e2e_repeats is None:
        args.e2e_repeats = 1 if args.quick else 3
    if args.target is None:
        args.target = 0.03 if args.quick else 0.08
    if args.threads:
        torch.set_num_threads(args.threads)
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
