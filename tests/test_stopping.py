"""Stopping rules: each fires when it should (and not before), the first to fire wins, relative_improvement
replays scikit-learn's MLP decision, divergence is a status, and the state survives a checkpoint."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from manualbp.train.stopping import StopContext, build_stopping


def rec(epoch, **kw):
    base = {"epoch": epoch, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5, "grad_norm": 1.0}
    return {**base, **kw}


def feed(rules, values, key="val_loss", **extra):
    """Feed per-epoch records; return (epoch, decision) of the first rule that fires, or (None, None)."""
    for e, v in enumerate(values, 1):
        d = rules.check(rec(e, **{key: v}, **extra), StopContext(epoch=e, step=10 * e))
        if d is not None:
            return e, d
    return None, None


def test_max_epochs_is_the_cap():
    r = build_stopping({"max_epochs": 3})
    assert feed(r, [1.0] * 10) == (3, ("completed", "max_epochs"))
    with pytest.raises(ValueError, match="stopping.max_epochs must be a positive integer"):
        build_stopping({})


def test_early_stopping_patience_min_delta_and_best():
    r = build_stopping({"max_epochs": 100, "early_stopping": {"patience": 3, "min_delta": 0.01}})
    # improves to 0.5 at epoch 3; 0.495 is not better by more than 0.01; stops 3 epochs after epoch 3
    values = [1.0, 0.8, 0.5, 0.495, 0.6, 0.499, 0.1]
    assert feed(r, values) == (6, ("stopped", "early_stopping"))
    assert r.best_epoch == 3 and r.es_best == 0.5 and r.restore_best
    assert "did not improve" in r.message


def test_early_stopping_on_accuracy_maximizes():
    r = build_stopping({"max_epochs": 100, "early_stopping": {"patience": 2, "monitor": "val_accuracy"}})
    assert feed(r, [0.5, 0.7, 0.6, 0.7, 0.9], key="val_accuracy") == (4, ("stopped", "early_stopping"))
    assert r.best_epoch == 2


def test_improved_flag_marks_best_epochs():
    r = build_stopping({"max_epochs": 100, "early_stopping": {"patience": 5}})
    flags = []
    for e, v in enumerate([1.0, 0.5, 0.7, 0.4], 1):
        r.check(rec(e, val_loss=v), StopContext(e, e))
        flags.append(r.improved)
    assert flags == [True, True, False, True]


def test_loss_below_and_grad_norm_below():
    r = build_stopping({"max_epochs": 100, "early_stopping": None, "loss_below": 0.1})
    assert feed(r, [0.5, 0.2, 0.09], key="train_loss") == (3, ("stopped", "loss_below"))
    r = build_stopping({"max_epochs": 100, "loss_below": {"value": 0.3, "monitor": "val_loss"}})
    assert feed(r, [0.5, 0.29]) == (2, ("stopped", "loss_below"))
    r = build_stopping({"max_epochs": 100, "grad_norm_below": {"value": 1e-3}})
    assert feed(r, [1.0, 1e-2, 9e-4], key="grad_norm") == (3, ("stopped", "grad_norm_below"))


def test_first_rule_to_fire_wins_in_order():
    # both loss_below and max_epochs hold at epoch 2: loss_below is recorded
    r = build_stopping({"max_epochs": 2, "loss_below": 0.5})
    assert feed(r, [1.0, 0.1], key="train_loss") == (2, ("stopped", "loss_below"))


def _sklearn_loss_curve(n_iter_no_change, tol):
    from sklearn.datasets import load_iris
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x, y = load_iris(return_X_y=True)
    clf = MLPClassifier(
        hidden_layer_sizes=(8,),
        solver="sgd",
        learning_rate_init=0.01,
        max_iter=500,
        tol=tol,
        n_iter_no_change=n_iter_no_change,
        random_state=0,
        batch_size=32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit((x - x.mean(0)) / x.std(0), y)
    return clf.loss_curve_, clf.n_iter_


@pytest.mark.parametrize("n_iter_no_change, tol", [(3, 1e-2), (5, 1e-3)])
def test_relative_improvement_replays_sklearn(n_iter_no_change, tol):
    """Fed scikit-learn's own loss curve, the rule stops at exactly the epoch where MLPClassifier stopped."""
    curve, n_iter = _sklearn_loss_curve(n_iter_no_change, tol)
    assert n_iter < 500  # sklearn stopped on its rule, not on max_iter
    r = build_stopping(
        {
            "max_epochs": 1000,
            "early_stopping": None,
            "relative_improvement": {"tol": tol, "n_iter_no_change": n_iter_no_change},
        }
    )
    epoch, decision = feed(r, curve, key="train_loss")
    assert decision == ("stopped", "relative_improvement")
    assert epoch == n_iter == len(curve)


def test_relative_improvement_hand_trace():
    r = build_stopping({"max_epochs": 100, "relative_improvement": {"tol": 0.1, "n_iter_no_change": 2}})
    # 1.0 best; 0.95 (count 1, best .95); 0.9 (count 2, best .9); 0.85 (count 3 > 2): stop at epoch 4
    assert feed(r, [1.0, 0.95, 0.9, 0.85], key="train_loss") == (4, ("stopped", "relative_improvement"))
    r = build_stopping({"max_epochs": 100, "relative_improvement": {"tol": 0.1, "n_iter_no_change": 2}})
    assert feed(r, [1.0, 0.95, 0.8, 0.75, 0.7, 0.6], key="train_loss") == (None, None)


def test_divergence_per_step_is_a_status():
    r = build_stopping({"max_epochs": 10})
    ctx = StopContext(0, 1)
    assert r.check_step(2.3, ctx) is None
    assert r.check_step(float("nan"), StopContext(0, 2)) == ("diverged", "divergence")
    assert "non-finite" in r.message
    r = build_stopping({"max_epochs": 10, "divergence": {"factor": 10}})
    assert r.check_step(2.0, ctx) is None  # the initial loss
    assert r.check_step(19.0, ctx) is None
    assert r.check_step(21.0, ctx) == ("diverged", "divergence")
    r = build_stopping({"max_epochs": 10})
    assert r.check(rec(1, train_loss=math.inf), StopContext(1, 5)) == ("diverged", "divergence")


def test_divergence_check_every():
    r = build_stopping({"max_epochs": 10, "divergence": {"check_every": 4}})
    assert all(r.needs_step_loss(s) for s in range(6))  # until the initial loss is known
    r.check_step(1.0, StopContext(0, 1))
    assert [r.needs_step_loss(s) for s in range(1, 6)] == [False, False, False, True, False]
    auto = build_stopping({"max_epochs": 10})
    auto.check_step(1.0, StopContext(0, 1))
    assert auto.check_every == 1 and all(auto.needs_step_loss(s) for s in range(1, 5))
    auto.device_type = "cuda"
    assert auto.check_every == 100 and not auto.needs_step_loss(1) and auto.needs_step_loss(200)


def test_max_steps_and_time_budget_per_step():
    r = build_stopping({"max_epochs": 10, "max_steps": 7})
    assert r.check_step(1.0, StopContext(0, 6)) is None
    assert r.check_step(1.0, StopContext(0, 7)) == ("completed", "max_steps")
    r = build_stopping({"max_epochs": 10, "time_budget": 2.5})
    assert r.check_step(1.0, StopContext(0, 3, elapsed_s=2.4)) is None
    assert r.check_step(None, StopContext(0, 4, elapsed_s=2.6)) == ("stopped", "time_budget")


def test_state_dict_round_trip():
    cfg = {"max_epochs": 50, "early_stopping": {"patience": 4}, "relative_improvement": {"n_iter_no_change": 3}}
    a, b = build_stopping(cfg), build_stopping(cfg)
    vals = np.linspace(1, 0.5, 5).tolist() + [0.6, 0.6]
    for e, v in enumerate(vals, 1):
        a.check(rec(e, val_loss=v, train_loss=v), StopContext(e, e))
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    rest = [0.7, 0.7, 0.7]
    da = [a.check(rec(e, val_loss=v, train_loss=v), StopContext(e, e)) for e, v in enumerate(rest, 8)]
    db = [b.check(rec(e, val_loss=v, train_loss=v), StopContext(e, e)) for e, v in enumerate(rest, 8)]
    assert da == db and da[-1] is not None


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"max_epochs": 5, "patience": 3}, "unknown config key 'stopping.patience'"),
        ({"max_epochs": 5, "early_stopping": {"patiense": 3}}, "unknown config key 'stopping.early_stopping.patiense'"),
        ({"max_epochs": 5, "early_stopping": {"patience": 0}}, "stopping.early_stopping.patience must be a positive"),
        ({"max_epochs": 5, "early_stopping": {"monitor": "val_f1"}}, "stopping.early_stopping.monitor must be one of"),
        ({"max_epochs": 5, "loss_below": -1}, "stopping.loss_below.value must be a positive number"),
        ({"max_epochs": 5, "time_budget": {"seconds": 0}}, "stopping.time_budget.seconds must be a positive"),
        ({"max_epochs": 5, "max_steps": 0}, "stopping.max_steps must be a positive integer"),
        ({"max_epochs": 5, "divergence": {"factor": 0.5}}, "stopping.divergence.factor must be a number > 1"),
        ({"max_epochs": 1.5}, "stopping.max_epochs must be a positive integer"),
    ],
)
def test_bad_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_stopping(cfg)
