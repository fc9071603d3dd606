"""What several test files share: the repository's paths, the native reference losses and relative errors,
fake sweep jobs, scripts/results.py as a module, and formulas registered from outside the package.

Every test file, in whichever folder of ``tests/`` it lives, imports it as ``helpers`` (``tests/conftest.py``
puts ``tests/`` on ``sys.path``)."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import pathlib

import torch
import torch.nn.functional as TF

import manualbp
from manualbp import registry

ROOT = pathlib.Path(__file__).resolve().parent.parent  # the repository
README = ROOT / "README.md"


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute error relative to the reference's largest magnitude."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return err / scale if scale > 0 else err


def native_loss(name: str, output: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """The reference losses written with PyTorch's own ops."""
    if name == "cross_entropy":
        return TF.cross_entropy(
            output.reshape(-1, output.shape[-1]),
            target.reshape(-1) if not target.is_floating_point() else target.reshape(-1, output.shape[-1]),
            reduction=reduction,
        ).reshape(output.shape[:-1] if reduction == "none" else ())
    if name == "mse":
        return TF.mse_loss(output, target, reduction=reduction)
    per_example = 0.5 * ((output - target) ** 2).sum(-1)  # the notes' 1/2 sum_k (o_k - y_k)^2
    return {"mean": per_example.mean, "sum": per_example.sum, "none": lambda: per_example}[reduction]()


def fake_job(root, num: int, overrides: list, config: dict, metrics: dict, history: list) -> None:
    """A finished sweep job directory as Hydra and manualbp.train.run leave it (``.hydra/overrides.yaml``,
    ``config.json``, ``metrics.json``, ``history.csv``); a None cell is written blank, as run() writes an epoch
    without a measurement."""
    import json

    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (d / "config.json").write_text(json.dumps(config))
    (d / "metrics.json").write_text(json.dumps(metrics))
    keys = list(history[0])
    rows = [",".join("" if h[k] is None else str(h[k]) for k in keys) + "\n" for h in history]
    (d / "history.csv").write_text(",".join(keys) + "\n" + "".join(rows))


def results_script():
    """scripts/results.py loaded as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("results_script", ROOT / "scripts" / "results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------------
# Formulas registered from outside the package, as a user would (tests/test_registry.py, tests/test_name_coverage.py)
# --------------------------------------------------------------------------------------------------
EXTRA_ACTIVATION = "softplus"
EXTRA_LOSS = "log_cosh"


def _log_cosh(input: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    d = input - target
    per_example = (d + TF.softplus(-2 * d) - math.log(2)).sum(-1)  # L_n = sum_k log cosh(o_k - y_k), stable
    return {"mean": per_example.mean, "sum": per_example.sum, "none": lambda: per_example}[reduction]()


def _log_cosh_backward(grad_output, input: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    scale = grad_output / input.shape[:-1].numel() if reduction == "mean" else grad_output
    if reduction == "none":
        scale = scale.unsqueeze(-1)
    return torch.tanh(input - target) * scale  # dL/do_k = tanh(o_k - y_k), times the reduction's factor


@contextlib.contextmanager
def extra_formulas():
    """softplus (a = log(1 + e^z), sigma' = 1 - e^{-a} from the output) and the log-cosh regression loss,
    registered through the public API for the block and removed after."""
    manualbp.register_activation(
        EXTRA_ACTIVATION,
        TF.softplus,
        lambda g, a: g * -torch.expm1(-a),  # dL/dz = dL/da sigmoid(z) = dL/da (1 - e^{-a})
        formula="a = log(1 + e^z)",
        derivative="(1 - e^{-{a}})",
    )
    manualbp.register_loss(
        EXTRA_LOSS, _log_cosh, _log_cosh_backward, formula="sum_k log cosh(o_k - y_k)", gradient="tanh(o - y)"
    )
    try:
        yield
    finally:
        registry.ACTIVATION_REGISTRY.remove(EXTRA_ACTIVATION)
        registry.LOSS_REGISTRY.remove(EXTRA_LOSS)
