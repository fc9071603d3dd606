"""Data sets for training: scikit-learn's bundled sets, MNIST-1D (built offline), synthetic sets, and files.

:func:`load_dataset` returns a :class:`Dataset` of tensors already on the training device: a
deterministic train/val/test split by ``seed`` (stratified for classification), features standardized
with statistics of the training split only (and regression targets too). Nothing is downloaded.

The prepared arrays of every built-in set are cached on disk (``$MANUALBP_CACHE_DIR``, default
``~/.cache/manualbp``; ``MANUALBP_CACHE_DIR=off`` turns it off), keyed by the data config, the seed and the
versions of scikit-learn, numpy and mnist1d: a cached load skips importing scikit-learn (about 2 s of every
fresh process) and building MNIST-1D, and gives the same arrays bit for bit. ``file`` and ``teacher`` sets are
not cached.

``data.name``:

- ``digits``, ``iris``, ``wine``, ``breast_cancer`` (classification), ``diabetes`` (regression):
  scikit-learn's bundled copies.
- ``mnist1d``: MNIST-1D (Greydanus, 2020) generated with ``mnist1d.data.make_dataset`` and its
  default arguments (5000 sequences of length 40, 10 classes); its own train/test split is pooled and
  re-split by ``seed`` like every other set.
- ``xor``, ``moons``, ``spirals`` (classification) and ``teacher`` (regression from a random teacher
  MLP): synthetic, drawn from ``seed``; parameters ``n_samples``, ``noise`` (and ``n_classes`` for
  spirals; ``n_features``, ``n_outputs``, ``teacher_hidden`` for teacher).
- ``file`` with ``path``: ``.npz`` holding ``X`` and ``y``; ``.csv`` with a header row and the target
  column named by ``target``; or MNIST-format IDX files (``path`` the images, ``labels_path`` the
  labels, optionally gzipped). ``task`` (auto | classification | regression) says what ``y`` is; auto
  takes integer or string targets as classes and floating targets as regression.

Any classification set with ``one_hot: true`` becomes a regression problem whose targets are the one-hot
class vectors (for the notes' squared error on class labels, as in Cohen et al.'s MSE experiments).

``data.label_noise`` (classification only; default 0): the fraction of the *training* labels replaced by a
uniformly random class (symmetric label noise; a drawn class may be the label itself, so about
``label_noise * (C - 1) / C`` of the labels change). Exactly ``round(label_noise * n_train)`` training
examples are drawn, from a generator of their own seeded by ``seed``; the split and the validation and test
labels are untouched (clean). :attr:`Dataset.labels_changed` counts the labels that changed.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import json
import math
import os
import random
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from .defaults import DEFAULTS, is_number

__all__ = ["Dataset", "load_dataset", "DATASETS", "check_data_cfg", "read_idx", "noisy_labels"]

CLASSIFICATION = ("digits", "iris", "wine", "breast_cancer", "mnist1d", "xor", "moons", "spirals")
REGRESSION = ("diabetes", "teacher")
DATASETS = (*CLASSIFICATION, *REGRESSION, "file")

_COMMON = ("name", "path", "target", "val_fraction", "test_fraction", "standardize", "label_noise", "one_hot")
_EXTRA: dict[str, tuple[str, ...]] = {
    "xor": ("n_samples", "noise"),
    "moons": ("n_samples", "noise"),
    "spirals": ("n_samples", "noise", "n_classes"),
    "teacher": ("n_samples", "noise", "n_features", "n_outputs", "teacher_hidden"),
    "file": ("labels_path", "task"),
}
_SYNTH_DEFAULTS: dict[str, dict[str, Any]] = {
    "xor": {"n_samples": 400, "noise": 0.25},
    "moons": {"n_samples": 500, "noise": 0.2},
    "spirals": {"n_samples": 600, "noise": 0.2, "n_classes": 3},
    "teacher": {"n_samples": 1000, "noise": 0.1, "n_features": 8, "n_outputs": 1, "teacher_hidden": [16]},
}


@dataclass
class Dataset:
    """A split, standardized data set on one device.

    ``y_*`` are int64 class indices (N,) for classification and floats (N, out_features) for regression.
    ``x_mean``/``x_scale`` are the training split's standardization statistics (numpy, for reference).
    ``label_noise`` is the config's fraction of training labels redrawn, ``labels_changed`` how many changed.
    """

    name: str
    task: str
    in_features: int
    out_features: int
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    x_mean: Optional[np.ndarray] = None
    x_scale: Optional[np.ndarray] = None
    label_noise: float = 0.0
    labels_changed: int = 0

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_val(self) -> int:
        return int(self.x_val.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def check_data_cfg(cfg: object) -> dict[str, Any]:
    """Check a ``data`` config (names the bad key); returns it with the synthetic defaults filled in."""
    if not isinstance(cfg, Mapping):
        raise TypeError(f"data must be a mapping, got {type(cfg).__name__}")
    name = cfg.get("name")
    if name not in DATASETS:
        raise ValueError(f"data.name must be one of {', '.join(DATASETS)}, got {name!r}")
    allowed = _COMMON + _EXTRA.get(name, ())
    for key in cfg:
        if key not in allowed:
            raise ValueError(f"unknown config key 'data.{key}' for data set {name!r}; known keys: {', '.join(allowed)}")
    out = {**DEFAULTS["data"], **_SYNTH_DEFAULTS.get(name, {}), **cfg}
    for key in ("val_fraction", "test_fraction"):
        v = out.get(key, 0.0)
        if not (is_number(v) and 0 <= v < 1):
            raise ValueError(f"data.{key} must be a number in [0, 1), got {v!r}")
    if out.get("val_fraction", 0) + out.get("test_fraction", 0) >= 1:
        raise ValueError(
            f"data.val_fraction + data.test_fraction must be < 1 (something must be left to train on), "
            f"got {out.get('val_fraction')} + {out.get('test_fraction')}"
        )
    _check_label_noise(out)
    if "standardize" in out and not isinstance(out["standardize"], bool):
        raise TypeError(f"data.standardize must be true or false, got {out['standardize']!r}")
    if not isinstance(out.get("one_hot", False), bool):
        raise TypeError(f"data.one_hot must be true or false, got {out['one_hot']!r}")
    if "n_samples" in out and (
        isinstance(out["n_samples"], bool) or not isinstance(out["n_samples"], int) or out["n_samples"] < 8
    ):
        raise ValueError(f"data.n_samples must be an integer >= 8, got {out['n_samples']!r}")
    if "noise" in out and not (is_number(out["noise"]) and out["noise"] >= 0):
        raise ValueError(f"data.noise must be a number >= 0, got {out['noise']!r}")
    for key in ("n_classes", "n_features", "n_outputs"):
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < 1):
            raise ValueError(f"data.{key} must be a positive integer, got {out[key]!r}")
    if "teacher_hidden" in out:
        th = out["teacher_hidden"]
        th = [th] if isinstance(th, int) and not isinstance(th, bool) else th
        if not isinstance(th, (list, tuple)) or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in th):
            raise ValueError(
                f"data.teacher_hidden must be a list of positive layer widths, got {out['teacher_hidden']!r}"
            )
    if name == "file":
        path = out.get("path")
        if not isinstance(path, str) or not path:
            raise ValueError("data.path must name a .npz, .csv or IDX file when data.name is 'file', got None")
        task = out.get("task", "auto")
        if task not in ("auto", "classification", "regression"):
            raise ValueError(f"data.task must be 'auto', 'classification' or 'regression', got {task!r}")
    elif out.get("path") is not None:
        raise ValueError(f"data.path is only read when data.name is 'file' (data.name is {name!r})")
    return out


def _check_label_noise(cfg: Mapping[str, Any]) -> None:
    noise = cfg.get("label_noise", 0.0)
    if not (is_number(noise) and 0 <= noise < 1):
        raise ValueError(
            f"data.label_noise must be a number in [0, 1) (a fraction of the training labels), got {noise!r}"
        )
    regression = cfg["name"] in REGRESSION or (cfg["name"] == "file" and cfg.get("task") == "regression")
    if noise and regression:
        raise ValueError(
            f"data.label_noise applies to classification sets only; {cfg['name']!r} is a regression set "
            "(set data.label_noise to 0)"
        )


def noisy_labels(y: np.ndarray, fraction: float, n_classes: int, seed: int) -> tuple[np.ndarray, int]:
    """Replace ``round(fraction * len(y))`` randomly chosen labels by a uniformly random class of ``n_classes``.

    Returns the new labels (a copy) and how many of them differ from ``y``. The draws come from
    ``np.random.default_rng([seed, 17])``, a stream of their own.
    """
    rng = np.random.default_rng([seed, 17])
    n = round(fraction * len(y))
    idx = rng.choice(len(y), size=n, replace=False)
    out = y.copy()
    out[idx] = rng.integers(0, n_classes, size=n)
    return out, int(np.count_nonzero(out != y))


# --------------------------------------------------------------------------------------------------
# Sources: each returns (X float64 (N, F), y (N,) labels or (N, K) floats, task)
# --------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _mnist1d() -> tuple[np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    state_np, state_py = np.random.get_state(), random.getstate()
    try:  # make_dataset seeds the global RNGs; leave the caller's untouched
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state_np)
        random.setstate(state_py)
    x = np.concatenate([d["x"], d["x_test"]]).astype(np.float64)
    y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _sklearn(name: str) -> tuple[np.ndarray, np.ndarray]:
    import sklearn.datasets as D

    loader = {
        "digits": D.load_digits,
        "iris": D.load_iris,
        "wine": D.load_wine,
        "breast_cancer": D.load_breast_cancer,
        "diabetes": D.load_diabetes,
    }[name]
    x, y = loader(return_X_y=True)
    return np.asarray(x, dtype=np.float64), np.asarray(y)


def _xor(n: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Four Gaussian blobs at (+-1, +-1); the label is the XOR of the two signs."""
    corners = rng.integers(0, 2, size=(n, 2))
    x = (2.0 * corners - 1.0) + noise * rng.standard_normal((n, 2))
    return x, (corners[:, 0] ^ corners[:, 1]).astype(np.int64)


def _spirals(n: int, noise: float, n_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n_classes`` interleaved spiral arms in the plane (the classic CS231n set)."""
    per = max(n // n_classes, 1)
    xs, ys = [], []
    for k in range(n_classes):
        r = np.linspace(0.05, 1.0, per)
        t = np.linspace(k * 2 * math.pi / n_classes, k * 2 * math.pi / n_classes + 1.5 * math.pi, per)
        t = t + noise * rng.standard_normal(per)
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], 1))
        ys.append(np.full(per, k, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _teacher(cfg: Mapping[str, Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Regression targets from a random tanh teacher MLP (N(0,1) weights / sqrt(fan_in)) plus noise."""
    from ..nn import MLP

    g = torch.Generator().manual_seed(seed)
    hidden = cfg["teacher_hidden"]
    hidden = [hidden] if isinstance(hidden, int) else list(hidden)
    teacher = MLP(cfg["n_features"], hidden, cfg["n_outputs"], activation="tanh", dtype=torch.float64)
    with torch.no_grad():
        for lin in teacher.linears:
            lin.weight.normal_(0, 1 / math.sqrt(lin.in_features), generator=g)
            lin.bias.normal_(0, 0.1, generator=g)
        x = torch.randn(cfg["n_samples"], cfg["n_features"], generator=g, dtype=torch.float64)
        y = teacher(x)
        y = y + cfg["noise"] * torch.randn(y.shape, generator=g, dtype=torch.float64)
    return x.numpy(), y.numpy()


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format: magic 0 0 type ndim, big-endian int32 dims, data); may be gzipped."""
    with _open(path) as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"data.path: {path!r} is not an IDX file (bad magic number {raw[:4].hex()!r})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"data.path: {path!r} is a truncated IDX file (header needs {header} bytes)")
    dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + dtype.itemsize * int(np.prod(dims))
    if len(raw) != expected:
        raise ValueError(
            f"data.path: {path!r} is a malformed IDX file: dims {dims} need {expected} bytes, the file has {len(raw)}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(dims)
        .astype(np.float64 if dtype.kind == "f" else np.int64)
    )


def _read_csv(path: str, target: Optional[str]) -> tuple[np.ndarray, np.ndarray]:
    if not target:
        raise ValueError("data.target must name the target column of a .csv file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"data.path: {path!r} is not a readable UTF-8 CSV file: {e}") from None
    if not rows:
        raise ValueError(f"data.path: {path!r} is empty")
    header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if r]
    if target not in header:
        raise ValueError(f"data.target: column {target!r} is not in {path!r} (columns: {', '.join(header)})")
    if not body:
        raise ValueError(f"data.path: {path!r} has a header but no rows")
    t = header.index(target)
    feats = [k for k in range(len(header)) if k != t]
    x = np.empty((len(body), len(feats)), dtype=np.float64)
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise ValueError(f"data.path: {path!r} row {i + 2} has {len(row)} fields, the header {len(header)}")
        for j, k in enumerate(feats):
            try:
                x[i, j] = float(row[k])
            except ValueError:
                raise ValueError(
                    f"data.path: {path!r} row {i + 2}, column {header[k]!r}: {row[k]!r} is not a number"
                ) from None
    labels = [row[t].strip() for row in body]
    try:
        y = np.array([float(v) for v in labels])
        if np.all(y == np.round(y)):
            y = y.astype(np.int64)
    except ValueError:
        y = np.array(labels)  # string class names
    return x, y


def _read_file(cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    path = cfg["path"]
    if not os.path.isfile(path):
        raise ValueError(f"data.path: no such file {path!r}")
    lower = path.lower()
    if lower.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = set(z.files)
                xk = "X" if "X" in keys else "x" if "x" in keys else None
                if xk is None or "y" not in keys:
                    raise ValueError(f"data.path: {path!r} must hold arrays 'X' and 'y', it holds {sorted(keys)}")
                x, y = z[xk], z["y"]
        except ValueError as e:
            if str(e).startswith("data.path"):
                raise
            raise ValueError(f"data.path: cannot read {path!r} as .npz without pickle: {e}") from None
        except Exception as e:  # noqa: BLE001 - truncated or garbage files fail in many ways (EOFError, BadZipFile...)
            raise ValueError(f"data.path: cannot read {path!r} as .npz: {type(e).__name__}: {e}") from None
        if x.dtype.kind not in "biuf":
            raise ValueError(f"data.path: X in {path!r} must be numeric, got dtype {x.dtype}")
        return np.asarray(x, dtype=np.float64).reshape(len(x), -1), np.asarray(y)
    if lower.endswith(".csv"):
        return _read_csv(path, cfg.get("target"))
    # anything else: an IDX image file with an IDX label file
    labels = cfg.get("labels_path")
    if not labels:
        raise ValueError(
            f"data.path: {path!r} is neither .npz nor .csv; for MNIST-format IDX images set data.labels_path "
            "to the IDX label file"
        )
    if not os.path.isfile(labels):
        raise ValueError(f"data.labels_path: no such file {labels!r}")
    x = read_idx(path)
    y = read_idx(labels)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"data.labels_path: expected {len(x)} labels (one per image), got shape {y.shape}")
    x = x.reshape(len(x), -1)
    if x.max(initial=0) > 1:
        x = x / 255.0
    return x, y


# --------------------------------------------------------------------------------------------------
# Split, standardize, move
# --------------------------------------------------------------------------------------------------
def _split(n: int, y: np.ndarray, classification: bool, val: float, test: float, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    strat = y if classification else None

    def cut(ids: np.ndarray, frac: float, labels):
        if frac <= 0:
            return ids, ids[:0]
        try:
            a, b = train_test_split(ids, test_size=frac, random_state=seed, stratify=labels)
        except ValueError as e:
            raise ValueError(
                f"data: cannot split {len(ids)} examples (fraction {frac}) with stratification: {e}"
            ) from None
        return np.sort(a), np.sort(b)

    rest, test_idx = cut(idx, test, strat)
    val_rel = val / (1 - test) if val > 0 else 0.0
    train_idx, val_idx = cut(rest, val_rel, None if strat is None else strat[rest])
    return train_idx, val_idx, test_idx


def _raw_arrays(cfg: Mapping[str, Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The features and targets of a checked data config, as its source gives them (before any checks)."""
    name = cfg["name"]
    rng = np.random.default_rng(seed)
    if name in ("digits", "iris", "wine", "breast_cancer", "diabetes"):
        return _sklearn(name)
    if name == "mnist1d":
        return _mnist1d()
    if name == "xor":
        return _xor(cfg["n_samples"], cfg["noise"], rng)
    if name == "moons":
        from sklearn.datasets import make_moons

        return make_moons(cfg["n_samples"], noise=cfg["noise"], random_state=seed)
    if name == "spirals":
        return _spirals(cfg["n_samples"], cfg["noise"], cfg["n_classes"], rng)
    if name == "teacher":
        return _teacher(cfg, seed)
    return _read_file(cfg)


def _task(cfg: Mapping[str, Any], y: np.ndarray) -> str:
    """classification or regression: by the set's name, or for a file by ``task`` (auto: floating y is regression)."""
    if cfg["name"] != "file":
        return "regression" if cfg["name"] in REGRESSION else "classification"
    task = cfg.get("task", "auto")
    if task == "auto":
        task = "regression" if y.dtype.kind == "f" else "classification"
    return task


def _checked_features(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The features as a float64 matrix, after checking they are non-empty, finite and one row per target."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"data: expected a non-empty 2-D feature matrix, got shape {x.shape}")
    if len(y) != len(x):
        raise ValueError(f"data: {len(x)} examples but {len(y)} targets")
    if not np.all(np.isfinite(x)):
        raise ValueError("data: the features hold NaN or infinite values")
    return x


def _checked_targets(y: np.ndarray, task: str) -> tuple[np.ndarray, int]:
    """The targets and out_features: class indices 0..C-1 and C for classification, (N, K) float64 and K else."""
    if task == "classification":
        if y.ndim != 1:
            raise ValueError(f"data: classification targets must be one label per example, got shape {y.shape}")
        _, y = np.unique(y, return_inverse=True)  # labels -> class indices 0..C-1
        y = y.astype(np.int64)
        out_features = int(y.max()) + 1
        if out_features < 2:
            raise ValueError("data: a classification set needs at least 2 classes, got 1")
        return y, out_features
    y = np.asarray(y, dtype=np.float64)
    y = y.reshape(len(y), -1)
    if not np.all(np.isfinite(y)):
        raise ValueError("data: the regression targets hold NaN or infinite values")
    return y, y.shape[1]


def _standardized(x: np.ndarray, y: np.ndarray, train: np.ndarray, task: str):
    """Features (and regression targets) standardized with statistics of the training split only; returns
    x, y and the feature mean and scale."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[train])  # statistics of the training split only
    x = scaler.transform(x)
    if task == "regression":
        y = StandardScaler().fit(y[train]).transform(y)
    return x, y, scaler.mean_, scaler.scale_


def _prepare(cfg: Mapping[str, Any], seed: int) -> dict[str, np.ndarray]:
    """The split, standardized arrays of a checked data config (float64 features; what the cache holds)."""
    x, y = _raw_arrays(cfg, seed)
    task = _task(cfg, y)
    x = _checked_features(x, y)
    y, out_features = _checked_targets(y, task)
    tr, va, te = _split(len(x), y, task == "classification", cfg["val_fraction"], cfg["test_fraction"], seed)
    noise = cfg.get("label_noise", 0.0)
    if noise and task != "classification":
        raise ValueError(
            f"data.label_noise applies to classification sets only; {cfg['path']!r} holds regression targets"
        )
    mean = scale = None
    if cfg.get("standardize", True):
        x, y, mean, scale = _standardized(x, y, tr, task)
    arrays = {"task": np.array(task), "out_features": np.array(out_features)}
    for split, ids in (("train", tr), ("val", va), ("test", te)):
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x[ids], y[ids]
    if noise:  # the training labels only, after the (clean, stratified) split
        arrays["y_train"], changed = noisy_labels(arrays["y_train"], noise, out_features, seed)
        arrays["labels_changed"] = np.array(changed)
    if mean is not None:
        arrays["x_mean"], arrays["x_scale"] = np.asarray(mean), np.asarray(scale)
    return arrays


def _cache_path(cfg: Mapping[str, Any], seed: int) -> Optional[str]:
    """Where the prepared arrays of this config and seed are cached, or None (``file`` and ``teacher``, whose
    arrays depend on more than this file and the versions below; cache off)."""
    root = os.environ.get("MANUALBP_CACHE_DIR")
    if root is None:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "manualbp")
    if root.lower() in ("off", "none", "0", "") or cfg["name"] in ("file", "teacher"):
        return None
    key = json.dumps({"data": cfg, "seed": seed, **_cache_sources()}, sort_keys=True)
    return os.path.join(root, "data", f"{cfg['name']}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz")


@lru_cache(maxsize=1)
def _cache_sources() -> dict[str, Any]:
    """What cached arrays depend on besides config and seed, read once per process: the versions of the
    packages that build them, and this file (any change to how it builds a set invalidates the cache)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("scikit-learn", "numpy", "mnist1d"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    with open(__file__, "rb") as f:
        source = hashlib.sha256(f.read()).hexdigest()
    return {"versions": versions, "source": source}


def _read_cache(path: str) -> Optional[dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # missing, or unreadable: build it again
        return None


def _write_cache(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Atomically; a cache that cannot be written (read-only home, full disk) is only a missed speed-up."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def load_dataset(
    data_cfg: Mapping[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32, device: Any = "cpu"
) -> Dataset:
    """Load, split (train/val/test by ``seed``, stratified for classification), standardize and move a data set.

    Args:
        data_cfg: the ``data`` config (``name`` and its parameters; see the module docstring).
        seed: seeds the split and the synthetic sets.
        dtype: floating dtype of the features (and of regression targets).
        device: where the tensors live.
    """
    cfg = check_data_cfg(data_cfg)
    path = _cache_path(cfg, seed)
    a = _read_cache(path) if path else None
    if a is None:
        a = _prepare(cfg, seed)
        if path:
            _write_cache(path, a)
    task = str(a["task"])
    one_hot = bool(cfg.get("one_hot", False))
    if one_hot and task != "classification":
        raise ValueError(f"data.one_hot: {cfg['name']!r} is a regression set; one_hot turns class labels into targets")

    def tx(v: np.ndarray) -> Tensor:
        return torch.as_tensor(np.ascontiguousarray(v), dtype=dtype).to(device)

    def ty(v: np.ndarray) -> Tensor:
        if task == "classification":
            labels = torch.as_tensor(np.ascontiguousarray(v), dtype=torch.int64).to(device)
            # one_hot: the class as a 0/1 target vector, a regression problem for the squared error (Cohen et al.)
            return torch.nn.functional.one_hot(labels, int(a["out_features"])).to(dtype) if one_hot else labels
        return tx(v)

    return Dataset(
        name=cfg["name"],
        task="regression" if one_hot else task,
        in_features=int(a["x_train"].shape[1]),
        out_features=int(a["out_features"]),
        x_train=tx(a["x_train"]),
        y_train=ty(a["y_train"]),
        x_val=tx(a["x_val"]),
        y_val=ty(a["y_val"]),
        x_test=tx(a["x_test"]),
        y_test=ty(a["y_test"]),
        x_mean=a.get("x_mean"),
        x_scale=a.get("x_scale"),
        label_noise=float(cfg.get("label_noise", 0.0)),
        labels_changed=int(a["labels_changed"]) if "labels_changed" in a else 0,
    )
