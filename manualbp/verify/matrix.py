"""The verification matrix behind ``manualbp verify``.

:func:`verify_matrix` runs every configuration (activations x losses x depths x dtypes x devices):
:func:`~manualbp.verify.compare` and :func:`~manualbp.verify.trace` against native autograd, and
:func:`~manualbp.verify.finite_difference_check` of the float64 model; half precision is judged against the
float64 truth (:data:`LOW_PRECISION_FACTOR`). Results in :class:`ConfigResult` and :class:`MatrixResult`.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from ..nn import MLP
from ..registry import LOSS_REGISTRY, activation_names, loss_names
from .bugs import inject_bug, python_paths
from .comparison import compare
from .finite_differences import FiniteDifferenceReport, finite_difference_check
from .reports import GradReport, Report, Row, TraceReport, fmt_err, format_table
from .tracing import trace

__all__ = ["ConfigResult", "DTYPES", "LOW_PRECISION_FACTOR", "MatrixResult", "available_devices", "verify_matrix"]

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def available_devices() -> list[str]:
    """ "cpu", and "cuda" where a CUDA device is visible."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclass
class ConfigResult:
    """One configuration of the matrix: its comparison with autograd, its trace, its finite differences."""

    activation: str
    loss: str
    depth: int
    dtype: str
    device: str
    grad: Optional[GradReport] = None
    trace: Optional[TraceReport] = None
    finite_differences: Optional[FiniteDifferenceReport] = None
    error: Optional[str] = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        if self.error is not None:
            return False
        reports = [r for r in (self.grad, self.trace, self.finite_differences) if r is not None]
        return all(r.ok for r in reports)

    @property
    def name(self) -> str:
        return f"{self.activation}/{self.loss}/depth {self.depth}/{self.dtype}/{self.device}"

    @property
    def autograd_rows(self) -> list[Row]:
        return [r for rep in (self.grad, self.trace) if rep is not None for r in rep.rows]

    def to_dict(self) -> dict[str, Any]:
        return {
            "activation": self.activation,
            "loss": self.loss,
            "depth": self.depth,
            "dtype": self.dtype,
            "device": self.device,
            "ok": self.ok,
            "error": self.error,
            "seconds": round(self.seconds, 4),
            "autograd": None if self.grad is None else self.grad.to_dict(),
            "trace": None if self.trace is None else self.trace.to_dict(),
            "finite_differences": None if self.finite_differences is None else self.finite_differences.to_dict(),
        }


@dataclass
class MatrixResult:
    """All configurations of :func:`verify_matrix`; ``str()`` is one table row per configuration."""

    results: list[ConfigResult]
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def failures(self) -> list[ConfigResult]:
        return [r for r in self.results if not r.ok]

    def table(self) -> str:
        headers = [
            "activation",
            "loss",
            "depth",
            "dtype",
            "device",
            "autograd max abs",
            "max rel",
            "bit-exact",
            "fd64 max abs",
            "fd64 2nd order",
            "result",
        ]
        body = []
        for r in self.results:
            rows = r.autograd_rows
            fd = r.finite_differences
            gg = None if fd is None else fd.grad_grad_max_abs_diff
            body.append(
                [
                    r.activation,
                    r.loss,
                    str(r.depth),
                    r.dtype,
                    r.device,
                    fmt_err(max((x.max_abs_err for x in rows), default=0.0)) if rows else "-",
                    fmt_err(max((x.max_rel_err for x in rows), default=0.0)) if rows else "-",
                    f"{sum(x.exact for x in rows)}/{len(rows)}" if rows else "-",
                    "-" if fd is None else fmt_err(fd.max_abs_diff),
                    "-" if gg is None else fmt_err(gg),
                    "PASS" if r.ok else ("ERROR: " + (r.error or "") if r.error else "FAIL: " + self._why(r)),
                ]
            )
        return format_table(headers, body, "llrllrrrrrl")

    @staticmethod
    def _why(r: ConfigResult) -> str:
        bad = [x.name for x in r.autograd_rows if not x.ok]
        if r.finite_differences is not None and not r.finite_differences.ok:
            bad += [f"fd {x.name}" for x in r.finite_differences.rows if not x.ok] or ["fd"]
        unique = list(dict.fromkeys(bad))
        return ", ".join(unique[:4]) + (", ..." if len(unique) > 4 else "")

    def summary(self) -> str:
        n = len(self.results)
        if self.ok:
            against = "native autograd"
            if self.settings.get("finite_differences", True):
                against += " and float64 finite differences"
            return f"PASS: {n}/{n} configurations match {against} ({self.seconds:.1f} s)"
        bad = self.failures()
        names = ", ".join(r.name for r in bad[:3]) + (", ..." if len(bad) > 3 else "")
        return f"FAIL: {len(bad)} of {n} configurations differ ({names}) ({self.seconds:.1f} s)"

    def __str__(self) -> str:
        return f"{self.table()}\n{self.summary()}"

    def to_dict(self) -> dict[str, Any]:
        from .. import __version__

        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "manualbp": __version__,
            "torch": torch.__version__,
            "settings": self.settings,
            "configurations": [r.to_dict() for r in self.results],
        }


def _make_target(loss: str, n: int, out_features: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> Tensor:
    if LOSS_REGISTRY[loss].targets == "classes":
        return torch.randint(0, out_features, (n,), generator=gen).to(device)
    return torch.randn(n, out_features, generator=gen, dtype=torch.float64).to(device, dtype)


def _check_choices(values: Sequence[Any], allowed: Sequence[Any], name: str) -> list[Any]:
    values = list(values)
    if not values:
        raise ValueError(f"{name}: expected at least one of {', '.join(map(str, allowed))}, got none")
    for v in values:
        if v not in allowed:
            raise ValueError(f"{name}: expected values from {', '.join(map(str, allowed))}, got {v!r}")
    return values


def _run_config(
    activation: str,
    loss: str,
    depth: int,
    dtype_name: str,
    device: str,
    *,
    in_features: int,
    width: int,
    out_features: int,
    batch: int,
    seed: int,
) -> tuple[GradReport, TraceReport]:
    dtype = DTYPES[dtype_name]
    torch.manual_seed(seed)
    model = MLP(in_features, [width] * depth, out_features, activation, dtype=torch.float64)
    model.to(device=device, dtype=dtype)  # the same weights (rounded) in every dtype
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, in_features, generator=gen, dtype=torch.float64).to(device, dtype)
    y = _make_target(loss, batch, out_features, dtype, device, gen)
    grad, tr = compare(model, x, y, loss), trace(model, x, y, loss)
    if dtype in (torch.bfloat16, torch.float16):
        # Two half-precision computations differ by their rounding, which a bias summed over a batch can make
        # large next to the result; judge both against the float64 truth instead.
        model64 = model.to(torch.float64)
        y64 = y.to(torch.float64) if y.is_floating_point() else y
        truth = trace(model64, x.to(torch.float64), y64, loss)
        for report in (grad, tr):
            _judge_against_truth(report, truth, torch.finfo(dtype).eps)
    return grad, tr


#: A half-precision row passes when the manual value's error against float64 is at most this many times the
#: native value's error, plus this many machine epsilons of the quantity's largest magnitude.
LOW_PRECISION_FACTOR = 4.0


def _judge_against_truth(report: Report, truth: TraceReport, eps: float) -> None:
    """Re-judge low-precision rows: the manual error against float64 within a factor of native autograd's."""
    k = LOW_PRECISION_FACTOR
    for row in report.rows:
        if row.value is None or row.reference is None or row.value.shape != row.reference.shape:
            continue
        t = truth[row.name].reference.detach().to("cpu", torch.float64)
        manual = float((row.value.detach().to("cpu", torch.float64) - t).abs().max()) if t.numel() else 0.0
        native = float((row.reference.detach().to("cpu", torch.float64) - t).abs().max()) if t.numel() else 0.0
        scale = float(t.abs().max()) if t.numel() else 0.0
        row.ok = manual <= k * native + k * eps * scale
        row.note = "" if row.ok else f"error vs float64: manual {manual:.1e}, native {native:.1e}"
    report.meta["judged"] = f"against float64: manual error <= {k:g} x native + {k:g} eps x scale"


def _run_fd(activation: str, loss: str, depth: int, device: str, **kw: int) -> FiniteDifferenceReport:
    torch.manual_seed(kw["seed"])
    model = MLP(kw["in_features"], [kw["width"]] * depth, kw["out_features"], activation, dtype=torch.float64)
    model.to(device)
    gen = torch.Generator().manual_seed(kw["seed"] + 1)
    x = torch.randn(kw["batch"], kw["in_features"], generator=gen, dtype=torch.float64).to(device)
    y = _make_target(loss, kw["batch"], kw["out_features"], torch.float64, device, gen)
    return finite_difference_check(model, x, target=y, loss=loss, fast_mode=True)


@contextlib.contextmanager
def _full_precision_matmul() -> Iterator[None]:
    """TF32 off on CUDA while comparing (restored afterwards)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _check_devices(devices: Optional[Sequence[str]]) -> list[str]:
    """The devices to run on (default: every available one); each must be available here."""
    devices = available_devices() if devices is None else list(devices)
    for d in devices:
        if d not in available_devices() and not (d.startswith("cuda:") and torch.cuda.is_available()):
            raise ValueError(f"devices: {d!r} is not available here (available: {', '.join(available_devices())})")
    if not devices:
        raise ValueError(f"devices: expected at least one of {', '.join(available_devices())}, got none")
    return devices


def _check_sizes(depths: Sequence[int], sizes: dict[str, int]) -> None:
    """``depths`` are integers >= 0 (hidden layers); every size is a positive integer (errors name the argument)."""
    if not depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in depths):
        raise ValueError(f"depths: expected integers >= 0 (hidden layers), got {list(depths)}")
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _run_one(
    config: tuple[str, int, str, str, str],
    kw: dict[str, int],
    finite_differences: bool,
    fd_cache: dict[tuple, FiniteDifferenceReport],
) -> ConfigResult:
    """One configuration (device, depth, activation, loss, dtype); an exception marks it as an error.

    The finite-difference check of (activation, loss, depth, device) runs once, into ``fd_cache``.
    """
    device, depth, activation, loss, dtype_name = config
    t0 = _now()
    result = ConfigResult(activation, loss, depth, dtype_name, device)
    try:
        result.grad, result.trace = _run_config(activation, loss, depth, dtype_name, device, **kw)
        key = (activation, loss, depth, device)
        if finite_differences:
            if key not in fd_cache:
                fd_cache[key] = _run_fd(activation, loss, depth, device, **kw)
            result.finite_differences = fd_cache[key]
    except Exception as exc:  # one broken configuration must not hide the others
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    result.seconds = _now() - t0
    return result


def verify_matrix(
    activations: Optional[Sequence[str]] = None,
    losses: Optional[Sequence[str]] = None,
    depths: Sequence[int] = (1, 2),
    dtypes: Sequence[str] = ("float64", "float32"),
    devices: Optional[Sequence[str]] = None,
    *,
    finite_differences: bool = True,
    in_features: int = 3,
    width: int = 4,
    out_features: int = 3,
    batch: int = 4,
    seed: int = 0,
    bug: Optional[str] = None,
    progress: Optional[Callable[[ConfigResult], None]] = None,
) -> MatrixResult:
    """Every configuration (activations x losses x depths x dtypes x devices): :func:`compare` and
    :func:`trace` against native autograd, and :func:`finite_difference_check` of the float64 model.

    ``depth`` is the number of hidden layers (0 is a linear model). The finite-difference check runs once per
    (activation, loss, depth, device), in float64, on the same weights. An exception inside one configuration
    marks it as an error and the matrix goes on. ``bug`` injects one of :data:`BUGS` (a testing hook; the run
    then takes the module's Python paths, which the bug reaches, not its C++ nodes, which it does not yet);
    ``progress`` is called after each configuration.
    """
    # None: every registered name (the registries, read now: a formula registered later is included)
    activations = _check_choices(activation_names() if activations is None else activations, activation_names(), "activations")  # noqa: E501
    losses = _check_choices(loss_names() if losses is None else losses, loss_names(), "losses")
    dtypes = _check_choices(dtypes, list(DTYPES), "dtypes")
    devices = _check_devices(devices)
    sizes = {"in_features": in_features, "width": width, "out_features": out_features, "batch": batch}
    _check_sizes(depths, sizes)
    kw = {**sizes, "seed": seed}
    fd_cache: dict[tuple, FiniteDifferenceReport] = {}
    results: list[ConfigResult] = []
    start = _now()
    with _full_precision_matmul(), inject_bug(bug), python_paths() if bug else contextlib.nullcontext():
        for config in itertools.product(devices, depths, activations, losses, dtypes):
            results.append(_run_one(config, kw, finite_differences, fd_cache))
            if progress is not None:
                progress(results[-1])
    settings = {
        "activations": activations,
        "losses": losses,
        "depths": list(depths),
        "dtypes": dtypes,
        "devices": devices,
        "finite_differences": finite_differences,
        "bug": bug,
        **kw,
    }
    return MatrixResult(results, _now() - start, settings)


def _now() -> float:
    import time

    return time.perf_counter()
