"""The issue's reference points at full length (slow tier): digits 64-64-10 sigmoid, SGD lr 0.1, batch 32,
stratified 80/20, standardized; scikit-learn's MLPClassifier with the same settings as the yardstick."""

from __future__ import annotations

import warnings

import pytest
import torch

from manualbp.train import run

pytestmark = pytest.mark.slow



def digits(**kw):
    base = {
        "progress": False,
        "data": {"name": "digits", "val_fraction": 0.0, "test_fraction": 0.2},
        "stopping": {"max_epochs": 100, "early_stopping": None},
    }
    base.update(kw)
    return base


def sklearn_digits_accuracy(seed: int = 0) -> float:
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    scaler = StandardScaler().fit(xtr)
    clf = MLPClassifier(
        (64,),
        activation="logistic",
        solver="sgd",
        learning_rate_init=0.1,
        batch_size=32,
        momentum=0.0,
        alpha=0.0,
        max_iter=100,
        n_iter_no_change=100,
        random_state=seed,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(xtr), ytr)
    return clf.score(scaler.transform(xte), yte)


def test_digits_reference_accuracy_matches_sklearn():
    ours = run(digits())
    theirs = sklearn_digits_accuracy()
    assert ours.metrics["test_accuracy"] > 0.95
    assert abs(ours.metrics["test_accuracy"] - theirs) < 0.02


def test_zero_init_never_breaks_symmetry():
    """Zero init: chance for the first epochs; the 64 hidden units stay identical for all 100 epochs, so the
    net is a one-hidden-unit net and stays far below xavier's accuracy (it creeps to about 40%)."""
    r = run(digits(init={"name": "zeros"}))
    assert max(h["train_accuracy"] for h in r.history[:10]) < 0.15
    w1 = r.model.linears[0].weight
    assert torch.equal(w1, w1[:1].expand_as(w1))
    assert r.metrics["test_accuracy"] < 0.6


def test_deep_sigmoid_small_init_stalls_for_30_epochs_while_xavier_and_kaiming_learn():
    deep = {"hidden": [64, 64], "activation": "sigmoid"}
    acc = {}
    for name, init in [
        ("small", {"name": "normal", "std": 0.01}),
        ("xavier", {"name": "xavier_uniform"}),
        ("kaiming", {"name": "kaiming_normal"}),
    ]:
        acc[name] = run(digits(model=deep, init=init, stopping={"max_epochs": 30, "early_stopping": None}))
    assert acc["small"].metrics["test_accuracy"] < 0.2
    assert acc["xavier"].metrics["test_accuracy"] > 0.93
    assert acc["kaiming"].metrics["test_accuracy"] > 0.93


def test_mnist1d_trains():
    r = run(
        {
            "progress": False,
            "data": {"name": "mnist1d"},
            "model": {"hidden": [128], "activation": "relu"},
            "init": "kaiming_uniform",
            "stopping": {"max_epochs": 20},
        }
    )
    assert r.metrics["test_accuracy"] > 0.4  # chance is 0.1


def test_float64_lockstep_drift_after_many_steps():
    r = run(digits(backend="both", dtype="float64", stopping={"max_epochs": 20, "early_stopping": None}))
    assert r.metrics["steps"] > 800 and r.metrics["max_param_rel_diff"] < 1e-10
