"""Data sets: shapes and tasks, deterministic stratified splits, standardization from the training split
only (checked against scikit-learn's StandardScaler), files (.npz, .csv, IDX) and their errors."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from manualbp.train.data import load_dataset, read_idx


def load(cfg, seed=0, dtype=torch.float32):
    return load_dataset(cfg, seed, dtype, "cpu")


@pytest.mark.parametrize(
    "name, task, n, in_f, out_f",
    [
        ("digits", "classification", 1797, 64, 10),
        ("iris", "classification", 150, 4, 3),
        ("wine", "classification", 178, 13, 3),
        ("breast_cancer", "classification", 569, 30, 2),
        ("diabetes", "regression", 442, 10, 1),
        ("xor", "classification", 400, 2, 2),
        ("moons", "classification", 500, 2, 2),
        ("spirals", "classification", 600, 2, 3),
        ("teacher", "regression", 1000, 8, 1),
    ],
)
def test_builtin_sets(name, task, n, in_f, out_f):
    d = load({"name": name, "val_fraction": 0.1, "test_fraction": 0.2})
    assert (d.task, d.in_features, d.out_features) == (task, in_f, out_f)
    assert d.n_train + d.n_val + d.n_test == n
    assert abs(d.n_test - 0.2 * n) <= 1 and abs(d.n_val - 0.1 * n) <= 2
    for x in (d.x_train, d.x_val, d.x_test):
        assert x.dtype == torch.float32 and x.shape[1] == in_f
    if task == "classification":
        assert d.y_train.dtype == torch.int64 and d.y_train.dim() == 1
        assert int(d.y_train.max()) == out_f - 1 and int(d.y_train.min()) == 0
    else:
        assert d.y_train.dtype == torch.float32 and d.y_train.shape == (d.n_train, out_f)


def test_split_is_stratified_deterministic_and_seeded():
    a, b, c = load({"name": "digits"}, seed=0), load({"name": "digits"}, seed=0), load({"name": "digits"}, seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, c.y_test)
    full = np.bincount(np.concatenate([a.y_train.numpy(), a.y_val.numpy(), a.y_test.numpy()])) / 1797
    for y in (a.y_train, a.y_val, a.y_test):
        frac = np.bincount(y.numpy(), minlength=10) / len(y)
        assert np.abs(frac - full).max() < 0.02  # each split keeps the class proportions


def test_standardization_uses_the_training_split_only():
    from sklearn.datasets import load_wine
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    d = load({"name": "wine", "val_fraction": 0.0, "test_fraction": 0.25}, seed=3, dtype=torch.float64)
    x, y = load_wine(return_X_y=True)
    # the same split done by hand: sorted indices, as the loader returns them
    tr, te = train_test_split(np.arange(len(y)), test_size=0.25, random_state=3, stratify=y)
    tr, te = np.sort(tr), np.sort(te)
    scaler = StandardScaler().fit(x[tr])
    np.testing.assert_allclose(d.x_train.numpy(), scaler.transform(x[tr]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(d.x_test.numpy(), scaler.transform(x[te]), rtol=0, atol=1e-12)
    assert np.abs(d.x_train.numpy().mean(0)).max() < 1e-12
    assert np.abs(d.x_test.numpy().mean(0)).max() > 0.01  # the test split is not re-centred


def test_regression_targets_standardized_on_train():
    d = load({"name": "diabetes"}, dtype=torch.float64)
    assert abs(d.y_train.mean().item()) < 1e-12 and abs(d.y_train.std(unbiased=False).item() - 1) < 1e-12
    assert abs(d.y_test.mean().item()) > 1e-6


def test_no_validation_split():
    d = load({"name": "iris", "val_fraction": 0.0})
    assert d.n_val == 0 and d.x_val.shape == (0, 4) and d.n_train == 120


def test_synthetic_sets_follow_seed_and_params():
    a = load({"name": "moons", "n_samples": 100, "noise": 0.1}, seed=0)
    b = load({"name": "moons", "n_samples": 100, "noise": 0.1}, seed=1)
    assert a.n_train + a.n_val + a.n_test == 100 and not torch.equal(a.x_train, b.x_train)
    s = load({"name": "spirals", "n_samples": 200, "n_classes": 4})
    assert s.out_features == 4
    t = load({"name": "teacher", "n_features": 3, "n_outputs": 2, "teacher_hidden": [5], "noise": 0.0})
    assert t.in_features == 3 and t.out_features == 2


def test_xor_labels_are_the_xor_of_signs():
    d = load({"name": "xor", "noise": 0.05, "n_samples": 200}, dtype=torch.float64)
    x = d.x_train * torch.as_tensor(d.x_scale) + torch.as_tensor(d.x_mean)  # undo the standardization
    expected = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()
    assert torch.equal(expected, d.y_train)


def test_npz_file(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((60, 5)), np.repeat([3, 7, 9], 20)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    d = load({"name": "file", "path": str(tmp_path / "d.npz")})
    assert d.task == "classification" and d.out_features == 3 and d.in_features == 5
    np.savez(tmp_path / "r.npz", X=x, y=x[:, :2] @ np.ones((2, 1)))  # float targets: regression
    r = load({"name": "file", "path": str(tmp_path / "r.npz")})
    assert r.task == "regression" and r.out_features == 1
    np.savez(tmp_path / "p.npz", X=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    with pytest.raises(ValueError, match="without pickle"):
        load({"name": "file", "path": str(tmp_path / "p.npz")})
    np.savez(tmp_path / "k.npz", features=x, y=y)
    with pytest.raises(ValueError, match="must hold arrays 'X' and 'y'"):
        load({"name": "file", "path": str(tmp_path / "k.npz")})


def test_csv_file(tmp_path):
    rng = np.random.default_rng(1)
    lines = ["a,b,species,c"]
    for k in range(40):
        lines.append(f"{rng.normal():.5f},{rng.normal():.5f},{['cat', 'dog'][k % 2]},{k}")
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    d = load({"name": "file", "path": str(tmp_path / "d.csv"), "target": "species", "val_fraction": 0.0})
    assert d.in_features == 3 and d.out_features == 2 and d.task == "classification"
    with pytest.raises(ValueError, match="data.target: column 'label' is not in"):
        load({"name": "file", "path": str(tmp_path / "d.csv"), "target": "label"})
    with pytest.raises(ValueError, match="data.target must name the target column"):
        load({"name": "file", "path": str(tmp_path / "d.csv")})
    (tmp_path / "bad.csv").write_text("a,y\n1,0\nx,1\n2,0\n")
    with pytest.raises(ValueError, match="row 3, column 'a': 'x' is not a number"):
        load({"name": "file", "path": str(tmp_path / "bad.csv"), "target": "y"})


def write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype({0x08: ">u1", 0x0D: ">f4"}[code]).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)


def test_idx_files(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(50, 6, 5)).astype(np.uint8)
    labels = np.tile(np.arange(5), 10).astype(np.uint8)
    write_idx(tmp_path / "img-idx3-ubyte.gz", images, 0x08)
    write_idx(tmp_path / "lab-idx1-ubyte", labels, 0x08)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "img-idx3-ubyte.gz")), images)
    d = load(
        {
            "name": "file",
            "path": str(tmp_path / "img-idx3-ubyte.gz"),
            "labels_path": str(tmp_path / "lab-idx1-ubyte"),
            "val_fraction": 0.0,
        }
    )
    assert d.in_features == 30 and d.out_features == 5 and d.n_train + d.n_test == 50
    (tmp_path / "trunc").write_bytes((tmp_path / "lab-idx1-ubyte").read_bytes()[:-3])
    with pytest.raises(ValueError, match="malformed IDX file"):
        read_idx(str(tmp_path / "trunc"))
    (tmp_path / "junk").write_bytes(b"\x12\x34\x56\x78rest")
    with pytest.raises(ValueError, match="is not an IDX file"):
        read_idx(str(tmp_path / "junk"))
    with pytest.raises(ValueError, match="data.labels_path"):
        load({"name": "file", "path": str(tmp_path / "img-idx3-ubyte.gz")})


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"name": "mnist"}, "data.name must be one of"),
        ({"name": "digits", "n_samples": 10}, "unknown config key 'data.n_samples'"),
        ({"name": "digits", "val_fraction": 1.2}, r"data.val_fraction must be a number in \[0, 1\)"),
        ({"name": "digits", "val_fraction": 0.5, "test_fraction": 0.5}, "must be < 1"),
        ({"name": "file"}, "data.path must name"),
        ({"name": "file", "path": "/nonexistent/x.npz"}, "data.path: no such file"),
        ({"name": "digits", "path": "x.npz"}, "data.path is only read when data.name is 'file'"),
        ({"name": "moons", "noise": -1}, "data.noise must be a number >= 0"),
    ],
)
def test_bad_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        load(cfg)


@pytest.mark.slow
def test_mnist1d_offline():
    d = load({"name": "mnist1d"})
    assert (d.in_features, d.out_features, d.n_train + d.n_val + d.n_test) == (40, 10, 5000)
    state = np.random.get_state()[1].copy()
    load({"name": "mnist1d"}, seed=1)
    assert np.array_equal(state, np.random.get_state()[1])  # the global numpy RNG is left alone


FIELDS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


@pytest.mark.parametrize(
    "cfg, seed",
    [
        ({"name": "digits"}, 0),
        ({"name": "diabetes"}, 3),
        ({"name": "iris", "val_fraction": 0}, 1),
        ({"name": "xor", "n_samples": 60}, 2),
    ],
)
def test_cached_load_equals_a_fresh_build(tmp_path, monkeypatch, cfg, seed):
    monkeypatch.setenv("MANUALBP_CACHE_DIR", "off")
    fresh = load(cfg, seed, torch.float64)
    monkeypatch.setenv("MANUALBP_CACHE_DIR", str(tmp_path))
    cold, warm = load(cfg, seed, torch.float64), load(cfg, seed, torch.float64)
    assert len(list((tmp_path / "data").iterdir())) == 1
    for d in (cold, warm):
        assert (d.name, d.task, d.in_features, d.out_features) == (
            fresh.name,
            fresh.task,
            fresh.in_features,
            fresh.out_features,
        )
        for f in FIELDS:
            assert getattr(d, f).dtype == getattr(fresh, f).dtype and torch.equal(getattr(d, f), getattr(fresh, f)), f
        np.testing.assert_array_equal(d.x_mean, fresh.x_mean)
    # another seed or config is another entry; an unreadable entry is rebuilt
    load(cfg, seed + 1)
    assert len(list((tmp_path / "data").iterdir())) == 2
    for entry in (tmp_path / "data").iterdir():
        entry.write_bytes(b"not an npz")
    assert torch.equal(load(cfg, seed, torch.float64).x_train, fresh.x_train)


def test_cache_off_writes_nothing_and_file_sets_are_never_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MANUALBP_CACHE_DIR", "off")
    load({"name": "iris"})
    path = tmp_path / "d.npz"
    np.savez(path, X=np.random.default_rng(0).normal(size=(40, 3)), y=np.arange(40) % 2)
    monkeypatch.setenv("MANUALBP_CACHE_DIR", str(tmp_path / "cache"))
    load({"name": "file", "path": str(path)})
    assert not (tmp_path / "cache").exists()


def test_a_cached_load_does_not_import_scikit_learn(tmp_path):
    code = (
        "import sys; from manualbp.train.data import load_dataset; load_dataset({'name': 'digits'}); "
        "print('sklearn' in sys.modules)"
    )
    env = {**os.environ, "MANUALBP_CACHE_DIR": str(tmp_path)}
    first, second = (
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        for _ in range(2)
    )
    assert (first.stdout.strip(), second.stdout.strip()) == ("True", "False")


def test_one_hot_turns_a_classification_set_into_a_regression_on_class_vectors():
    from manualbp.train import load_dataset

    labels = load_dataset({"name": "iris"}, 0, torch.float64)
    hot = load_dataset({"name": "iris", "one_hot": True}, 0, torch.float64)
    assert hot.task == "regression" and hot.out_features == labels.out_features == 3
    assert torch.equal(hot.y_train.argmax(1), labels.y_train) and torch.equal(hot.y_train.sum(1), torch.ones(len(labels.y_train), dtype=torch.float64))
    assert torch.equal(hot.x_train, labels.x_train) and hot.y_test.dtype == torch.float64
    with pytest.raises(ValueError, match="data.one_hot: 'diabetes' is a regression set"):
        load_dataset({"name": "diabetes", "one_hot": True})
    with pytest.raises(TypeError, match="data.one_hot must be true or false"):
        load_dataset({"name": "iris", "one_hot": "yes"})


# -- label noise ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fraction, seed", [(0.2, 0), (0.3, 1), (0.05, 2)])
def test_label_noise_changes_the_training_labels_only(fraction, seed):
    clean = load({"name": "digits"}, seed)
    noisy = load({"name": "digits", "label_noise": fraction}, seed)
    for f in ("x_train", "x_val", "y_val", "x_test", "y_test"):  # same split, clean validation and test labels
        assert torch.equal(getattr(noisy, f), getattr(clean, f)), f
    changed = int((noisy.y_train != clean.y_train).sum())
    assert noisy.labels_changed == changed and noisy.label_noise == fraction and clean.labels_changed == 0
    # round(fraction * n) labels redrawn uniformly over 10 classes: 9/10 of them change, give or take sampling noise
    drawn = round(fraction * clean.n_train)
    assert changed <= drawn and abs(changed - 0.9 * drawn) <= 4 * (0.09 * drawn) ** 0.5 + 1
    assert int(noisy.y_train.min()) >= 0 and int(noisy.y_train.max()) < noisy.out_features
    again = load({"name": "digits", "label_noise": fraction}, seed)  # deterministic per seed
    assert torch.equal(again.y_train, noisy.y_train)
    other = load({"name": "digits", "label_noise": fraction}, seed + 10)
    assert not torch.equal(other.y_train, load({"name": "digits"}, seed + 10).y_train)


def test_noisy_labels_draws_exactly_the_fraction():
    from manualbp.train.data import noisy_labels

    y = np.arange(1000) % 4
    out, changed = noisy_labels(y, 0.25, 4, seed=3)
    assert out is not y and np.array_equal(y, np.arange(1000) % 4)  # a copy
    assert changed == int((out != y).sum()) and changed <= 250
    assert 150 <= changed <= 225  # 3/4 of the 250 redrawn labels, in expectation 187.5
    a, _ = noisy_labels(y, 0.25, 4, seed=3)
    b, _ = noisy_labels(y, 0.25, 4, seed=4)
    assert np.array_equal(a, out) and not np.array_equal(a, b)
    assert noisy_labels(y, 0.0, 4, seed=3)[1] == 0


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"name": "digits", "label_noise": 1.0}, r"data.label_noise must be a number in \[0, 1\)"),
        ({"name": "digits", "label_noise": -0.1}, r"data.label_noise must be a number in \[0, 1\)"),
        ({"name": "digits", "label_noise": "0.2"}, r"data.label_noise must be a number"),
        ({"name": "diabetes", "label_noise": 0.2}, "data.label_noise applies to classification sets only"),
        ({"name": "teacher", "label_noise": 0.1}, "data.label_noise applies to classification sets only"),
    ],
)
def test_label_noise_bad_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        load(cfg)


def test_label_noise_on_a_regression_file(tmp_path):
    path = tmp_path / "reg.npz"
    np.savez(path, X=np.random.default_rng(0).normal(size=(40, 3)), y=np.linspace(0, 1, 40))
    with pytest.raises(ValueError, match="data.label_noise applies to classification sets only"):
        load({"name": "file", "path": str(path), "label_noise": 0.2})
    assert load({"name": "file", "path": str(path), "label_noise": 0.0}).task == "regression"
