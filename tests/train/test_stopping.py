"""Stopping rules: each fires when it should (and not before), the first to fire wins, relative_improvement
replays scikit-learn's MLP decision, divergence is a status, and the state survives a checkpoint."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from manualbp.train.stopping import StopContext, build_stopping, generalization_loss, training_progress


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


# -- Prechelt's criteria (GL_alpha, PQ_alpha, UP_s): each fires where the definition says ---------------------
def feed_pairs(rules, train, val):
    """Feed records with both losses; return (epoch, decision) of the first rule to fire, or (None, None)."""
    for e, (t, v) in enumerate(zip(train, val), 1):
        d = rules.check(rec(e, train_loss=t, val_loss=v), StopContext(epoch=e, step=10 * e))
        if d is not None:
            return e, d
    return None, None


def test_gl_and_pq_formulas():
    assert generalization_loss(0.95, 0.9) == pytest.approx(100 * (0.95 / 0.9 - 1))
    assert generalization_loss(0.8, 0.8) == 0.0
    assert generalization_loss(0.0, 0.0) == 0.0 and generalization_loss(0.1, 0.0) == math.inf
    assert training_progress([1.0, 0.9, 0.8]) == pytest.approx(125.0)  # 1000 (2.7 / (3 x 0.8) - 1)
    assert training_progress([0.5, 0.5, 0.5]) == 0.0
    assert training_progress([0.1, 0.0, 0.0]) == math.inf


def test_gl_fires_after_the_first_epoch_above_alpha():
    # E_opt: 1, .8, .8, .8, .7, .7, .7; GL: 0, 0, 2.5, 3.75, 0, 4.29, 5.71
    values = [1.0, 0.8, 0.82, 0.83, 0.7, 0.73, 0.74, 0.6]
    r = build_stopping({"max_epochs": 100, "early_stopping": None, "gl": {"alpha": 5}})
    assert feed(r, values) == (7, ("stopped", "gl"))
    assert r.best_epoch == 5 and r.best_rule == "gl" and r.restore_best
    assert "GL = 5.714 > alpha = 5" in r.message
    r = build_stopping({"max_epochs": 100, "early_stopping": None, "gl": 3})  # a bare number is alpha
    assert feed(r, values) == (4, ("stopped", "gl"))
    r = build_stopping({"max_epochs": 100, "early_stopping": None, "gl": {"alpha": 6}})
    assert feed(r, values) == (None, None)


def test_gl_on_accuracy_reads_the_error():
    # errors 1 - acc: .5, .4, .42, .45; GL: 0, 0, 5, 12.5
    r = build_stopping({"max_epochs": 100, "early_stopping": None, "gl": {"alpha": 10, "monitor": "val_accuracy"}})
    assert feed(r, [0.5, 0.6, 0.58, 0.55], key="val_accuracy") == (4, ("stopped", "gl"))
    assert r.best_epoch == 2


TRAIN = [1.0, 0.9, 0.8, 0.5, 0.45, 0.4, 0.2, 0.19, 0.18]
VAL = [1.0, 0.9, 0.95, 0.85, 0.9, 0.95, 1.0, 1.0, 1.0]
# strips of 3 end at epochs 3, 6, 9: GL 5.56, 11.76, 17.65; P_3 125, 125, 55.56; GL / P_3 0.044, 0.094, 0.318


@pytest.mark.parametrize("alpha, epoch", [(0.05, 6), (0.2, 9), (0.04, 3), (0.5, None)])
def test_pq_fires_only_at_the_end_of_a_strip(alpha, epoch):
    r = build_stopping({"max_epochs": 100, "early_stopping": None, "pq": {"alpha": alpha, "strip": 3}})
    assert feed_pairs(r, TRAIN, VAL) == ((epoch, ("stopped", "pq")) if epoch else (None, None))
    assert r.best_epoch == 4 or epoch == 3


def test_pq_with_no_training_progress_fires_when_gl_is_positive():
    r = build_stopping({"max_epochs": 100, "early_stopping": None, "pq": {"alpha": 3, "strip": 2}})
    assert feed_pairs(r, [0.5, 0.5, 0.5, 0.5], [1.0, 0.9, 0.9, 0.91]) == (4, ("stopped", "pq"))


@pytest.mark.parametrize(
    "values, s, epoch",
    [
        # strips of 2 end at epochs 2, 4, 6, 8, 10: .8, .85 (rise 1), .9 (rise 2), .95 (rise 3)
        ([1.0, 0.8, 0.7, 0.85, 0.6, 0.9, 0.5, 0.95, 0.4, 0.3], 1, 4),
        ([1.0, 0.8, 0.7, 0.85, 0.6, 0.9, 0.5, 0.95, 0.4, 0.3], 2, 6),
        ([1.0, 0.8, 0.7, 0.85, 0.6, 0.9, 0.5, 0.95, 0.4, 0.3], 3, 8),
        # ends .8, .85 (1), .7 (back to 0), .75 (1), .8 (2), .9 (3)
        ([1.0, 0.8, 0.7, 0.85, 0.6, 0.7, 0.5, 0.75, 0.4, 0.8, 0.1, 0.9], 2, 10),
        ([1.0, 0.8, 0.7, 0.85, 0.6, 0.7, 0.5, 0.75, 0.4, 0.8, 0.1, 0.9], 3, 12),
        # rises inside strips do not count: ends .8, .75, .65, .62, .58
        ([1.0, 0.8, 0.7, 0.75, 0.6, 0.65, 0.7, 0.62, 0.6, 0.58], 1, None),
        # no E_va(0): the first comparison is at epoch 2k
        ([1.0, 1.1, 1.2, 1.3], 1, 4),
    ],
)
def test_up_counts_successive_rising_strips(values, s, epoch):
    r = build_stopping({"max_epochs": 100, "early_stopping": None, "up": {"s": s, "strip": 2}})
    assert feed(r, values) == ((epoch, ("stopped", "up")) if epoch else (None, None))


def test_up_best_epoch_and_restore_best():
    values = [1.0, 0.8, 0.7, 0.85, 0.6, 0.7, 0.5, 0.75, 0.4, 0.8, 0.1, 0.9]
    r = build_stopping({"max_epochs": 100, "early_stopping": None, "up": {"s": 2, "strip": 2}})
    assert feed(r, values) == (10, ("stopped", "up"))
    assert r.best_epoch == 9 and r.restore_best
    r = build_stopping({"max_epochs": 100, "early_stopping": None, "up": {"s": 2, "strip": 2, "restore_best": False}})
    feed(r, values)
    assert not r.restore_best and r.best_epoch == 9  # still tracked (reported), not restored


def test_restore_best_picks_one_rule():
    r = build_stopping({"max_epochs": 100, "early_stopping": {"patience": 5}, "gl": 5})
    assert r.best_rule == "early_stopping" and r.restore_best
    r = build_stopping({"max_epochs": 100, "early_stopping": {"restore_best": False}, "gl": {"restore_best": True}})
    assert r.best_rule == "gl" and r.restore_best
    r = build_stopping({"max_epochs": 100, "early_stopping": None, "pq": {"restore_best": False}})
    assert r.best_rule == "pq" and not r.restore_best
    assert build_stopping({"max_epochs": 100, "early_stopping": None}).best_rule is None
    flags = []
    r = build_stopping({"max_epochs": 100, "early_stopping": None, "gl": 50})
    for e, v in enumerate([1.0, 0.5, 0.7, 0.4], 1):
        r.check(rec(e, val_loss=v), StopContext(e, e))
        flags.append(r.improved)
    assert flags == [True, True, False, True]
    with pytest.raises(ValueError, match="restore_best is on for early_stopping \\(val_loss\\), gl \\(val_accuracy\\)"):
        build_stopping({"max_epochs": 5, "early_stopping": {}, "gl": {"monitor": "val_accuracy"}})


@pytest.mark.parametrize("rule", ["gl", "pq", "up"])
def test_prechelt_state_survives_a_checkpoint(rule):
    cfg = {
        "max_epochs": 100,
        "early_stopping": None,
        rule: {"gl": {"alpha": 5}, "pq": {"alpha": 0.2, "strip": 3}, "up": {"s": 2, "strip": 2}}[rule],
    }
    train = [1.0, 0.9, 0.8, 0.5, 0.45, 0.4, 0.2, 0.19, 0.18, 0.17, 0.16, 0.15]
    val = [1.0, 0.8, 0.7, 0.85, 0.6, 0.7, 0.5, 0.75, 0.4, 0.8, 0.1, 0.9]
    whole = build_stopping(cfg)
    expected = feed_pairs(whole, train, val)
    assert expected[0] is not None
    cut = expected[0] - 2  # stop feeding one rules object, resume a fresh one from its state
    a = build_stopping(cfg)
    assert feed_pairs(a, train[:cut], val[:cut]) == (None, None)
    b = build_stopping(cfg)
    b.load_state_dict(torch.load(_save(a.state_dict()), weights_only=True))  # as the loop's checkpoint does
    assert b.state_dict() == a.state_dict()
    for e in range(cut + 1, len(val) + 1):
        d = b.check(rec(e, train_loss=train[e - 1], val_loss=val[e - 1]), StopContext(e, 10 * e))
        if d is not None:
            break
    assert (e, d) == expected and b.best_epoch == whole.best_epoch and b.message == whole.message


def _save(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"gl": {"alpha": 0}}, "stopping.gl.alpha must be a positive number, got 0"),
        ({"gl": {"alpha": "5"}}, "stopping.gl.alpha must be a positive number"),
        ({"gl": {"strip": 5}}, "unknown config key 'stopping.gl.strip'; gl takes alpha, monitor, restore_best"),
        ({"pq": {"alpha": -1}}, "stopping.pq.alpha must be a positive number"),
        ({"pq": {"strip": 1}}, "stopping.pq.strip must be an integer >= 2"),
        ({"up": {"s": 0}}, "stopping.up.s must be a positive integer"),
        ({"up": 2.5}, "stopping.up.s must be a positive integer"),
        ({"up": {"strip": 0}}, "stopping.up.strip must be a positive integer"),
        ({"up": {"monitor": "val_f1"}}, "stopping.up.monitor must be one of"),
        ({"pq": {"restore_best": "yes"}}, "stopping.pq.restore_best must be true or false"),
    ],
)
def test_prechelt_bad_config(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_stopping({"max_epochs": 5, "early_stopping": None, **cfg})


@pytest.mark.parametrize("rule", ["gl", "pq", "up"])
def test_prechelt_rules_end_to_end(rule, tmp_path, monkeypatch):
    """Each rule through manualbp.train.run on a small overfitting set: it stops the run, the run ends on the best
    epoch's weights, and a run killed midway resumes to the same stop."""
    from manualbp.train import run, sinks

    params = {"gl": {"alpha": 1}, "pq": {"alpha": 0.1, "strip": 2}, "up": {"s": 1, "strip": 2}}[rule]
    cfg = {
        "data": {"name": "digits", "val_fraction": 0.2, "label_noise": 0.3},
        "model": {"hidden": [32], "activation": "relu"},
        "optim": {"name": "adam", "lr": 0.01, "batch_size": 64},
        "stopping": {"max_epochs": 60, rule: params},
        "progress": False,
        "checkpoint_every_s": 0,
    }
    whole = run(cfg)
    assert whole.stop_reason == rule, whole.metrics["stop_message"]
    epochs = whole.metrics["epochs"]
    best = min(range(epochs), key=lambda k: whole.history[k]["val_loss"]) + 1
    assert whole.metrics["best_epoch"] == best and whole.metrics["restored_best"] == (best != epochs)
    assert whole.metrics["val_loss"] == pytest.approx(whole.history[best - 1]["val_loss"], rel=1e-5)
    assert whole.metrics["labels_changed"] > 0

    class Interrupt(Exception):
        pass

    class DyingSink(sinks.NullSink):
        def log(self, metrics, step):
            if step == epochs - 1:  # killed one epoch before the stop (checkpoints every epoch)
                raise Interrupt

    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(sinks, "build_sink", lambda *a: DyingSink())
        with pytest.raises(Interrupt):
            run({**cfg, "output_dir": out})
    resumed = run({**cfg, "output_dir": out})
    keep = ("epochs", "stop_reason", "stop_message", "best_epoch", "restored_best", "test_accuracy", "val_loss")
    assert {k: resumed.metrics[k] for k in keep} == {k: whole.metrics[k] for k in keep}
