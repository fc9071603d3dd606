"""Malformed tensors at the public API and malformed files at the loaders: a ValueError/TypeError with a
clear message, or a defined result; never a crash from deep inside torch, never unpickling."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import manualbp
from manualbp.train.data import load_dataset

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
    torch.complex64,
]
MODEL = manualbp.MLP(4, [5], 3)


@st.composite
def tensors(draw, feature_hint: int | None = None):
    ndim = draw(st.integers(0, 3))
    shape = [draw(st.integers(0, 5)) for _ in range(ndim)]
    if feature_hint is not None and ndim and draw(st.booleans()):
        shape[-1] = feature_hint
    dtype = draw(st.sampled_from(DTYPES))
    device = draw(st.sampled_from(["cpu", "cpu", "cpu", "meta"]))
    if dtype.is_floating_point or dtype.is_complex:
        t = torch.randn(shape, dtype=dtype if dtype != torch.float16 else torch.float32).to(dtype)
        special = draw(st.sampled_from([None, float("nan"), float("inf"), -float("inf"), 1e30]))
        if special is not None and t.numel():
            t.view(-1)[0] = special
    elif dtype == torch.bool:
        t = torch.randint(0, 2, shape).bool()
    else:
        low = 0 if dtype == torch.uint8 else -3
        t = torch.randint(low, 6, shape).to(dtype)
    if draw(st.booleans()) and t.dim() >= 2:
        t = t.transpose(0, 1)
    return t.to(device)


def _defined_or_clear(fn, *args):
    try:
        return fn(*args)
    except (ValueError, TypeError) as e:
        message = str(e)
        assert len(message) > 15 and ("input" in message or "target" in message or "reduction" in message), message
        return None


@settings(max_examples=80)
@given(x=tensors(feature_hint=4))
def test_model_forward_on_malformed_input(x):
    out = _defined_or_clear(MODEL, x)
    if out is not None:  # a defined result: float32 input of shape (*, 4) on the CPU
        assert x.dtype == torch.float32 and x.shape[-1] == 4 and out.shape == (*x.shape[:-1], 3)


@settings(max_examples=120)
@given(
    o=tensors(feature_hint=3),
    y=tensors(feature_hint=3),
    loss=st.sampled_from(["CrossEntropyLoss", "MSELoss", "SquaredErrorLoss"]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_losses_on_malformed_input(o, y, loss, reduction):
    value = _defined_or_clear(getattr(manualbp, loss)(reduction), o, y)
    if value is not None:
        assert o.is_floating_point() and o.device == y.device
        if reduction != "none":
            assert value.dim() == 0


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _load(path, **extra):
    return load_dataset(
        {"name": "file", "path": str(path), **extra}, seed=0, dtype=torch.float32, device=torch.device("cpu")
    )


@settings(max_examples=40)
@given(blob=st.binary(max_size=400), cut=st.integers(0, 600), kind=st.sampled_from(["npz", "csv", "idx"]))
def test_loaders_on_garbage_and_truncated_files(tmp_path_factory, blob, cut, kind):
    path = tmp_path_factory.mktemp("bad") / f"data.{kind}"
    if kind == "npz":
        good = _npz_bytes(X=np.random.rand(20, 3), y=np.arange(20) % 2)
        path.write_bytes(good[:cut] if cut < len(good) else blob)
        extra = {}
    elif kind == "csv":
        path.write_bytes(blob)
        extra = {"target": "label"}
    else:
        labels = path.with_name("labels.idx")
        labels.write_bytes(bytes([0, 0, 8, 1]) + (20).to_bytes(4, "big") + bytes(range(20)))
        path.write_bytes(blob)
        extra = {"labels_path": str(labels)}
    with pytest.raises(ValueError, match="data"):
        _load(path, **extra)


def test_npz_with_pickled_objects_is_refused_without_unpickling(tmp_path, monkeypatch):
    path = tmp_path / "evil.npz"
    np.savez(path, X=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    import pickle

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the loader tried to unpickle")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    with pytest.raises(ValueError, match="without pickle"):
        _load(path)


def test_csv_missing_its_target_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b,c\n1,2,0\n3,4,1\n")
    with pytest.raises(ValueError, match=r"data.target: column 'label' is not in .*\(columns: a, b, c\)"):
        _load(path, target="label")


@pytest.mark.parametrize("damage, message", [("magic", "bad magic number"), ("length", "malformed IDX file")])
def test_idx_wrong_magic_or_length(tmp_path, damage, message):
    images = bytes([0, 0, 8, 3]) + (4).to_bytes(4, "big") + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes(16)
    if damage == "magic":
        images = bytes([1, 2, 3, 4]) + images[4:]
    else:
        images = images[:-3]
    (tmp_path / "img.idx").write_bytes(images)
    (tmp_path / "lab.idx").write_bytes(bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big") + bytes([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=message):
        _load(tmp_path / "img.idx", labels_path=str(tmp_path / "lab.idx"))


def test_zip_that_is_not_an_npz(tmp_path):
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("X.npy", b"not an npy file")
    with pytest.raises(ValueError, match="data.path"):
        _load(path)
