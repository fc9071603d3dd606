"""Each of K models trained as one batched model follows the trajectory of training it alone (float64)."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

import manualbp
from manualbp.fast import VectorizedTrainer

D = torch.float64


def _models(k, activation="sigmoid", bias=True):
    out = []
    for seed in range(k):
        torch.manual_seed(100 + seed)  # each model its own initialization
        out.append(manualbp.MLP(6, [10, 7], 3, activation=activation, bias=bias, dtype=D))
    return out


def _clone(model):
    twin = manualbp.MLP(6, [10, 7], 3, activation=[a.name for a in model.activations], bias=model.bias, dtype=D)
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("plain", [False, True], ids=["momentum-wd", "plain-sgd"])  # plain: the fused step
@pytest.mark.parametrize("activation,loss", [("sigmoid", "cross_entropy"), ("relu", "mse"), ("tanh", "squared_error")])
def test_each_model_matches_training_it_alone(activation, loss, plain):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, dtype=D, generator=g)
    y = (
        torch.randint(0, 3, (120,), generator=g)
        if loss == "cross_entropy"
        else torch.randn(120, 3, dtype=D, generator=g)
    )
    K = 5
    lrs = [0.1, 0.05, 0.2, 0.01, 0.08]
    moms = [0.0, 0.9, 0.5, 0.9, 0.0]
    wds = [0.0, 1e-3, 0.0, 1e-2, 0.0]
    nest = [False, True, False, False, False]
    if plain:
        moms, wds, nest = [0.0] * K, [0.0] * K, [False] * K
    stop_at = {2: 4, 4: 7}  # model 2 stops after epoch 4, model 4 after epoch 7; the others go on
    models = _models(K, activation)
    refs = [_clone(m) for m in models]
    opts = [
        torch.optim.SGD(r.parameters(), lr=lr, momentum=m, weight_decay=w, nesterov=n)
        for r, lr, m, w, n in zip(refs, lrs, moms, wds, nest)
    ]
    loss_fn = {
        "cross_entropy": manualbp.CrossEntropyLoss,
        "mse": manualbp.MSELoss,
        "squared_error": manualbp.SquaredErrorLoss,
    }[loss]()
    trainer = VectorizedTrainer(models, loss, lr=lrs, momentum=moms, weight_decay=wds, nesterov=nest)
    for epoch in range(10):
        if epoch == 6:  # a per-model schedule: halve the rates of models 0 and 1
            lrs = [lrs[0] / 2, lrs[1] / 2, *lrs[2:]]
            trainer.set_lr(lrs)
            for opt, lr in zip(opts[:2], lrs[:2]):
                opt.param_groups[0]["lr"] = lr
        for k, last in stop_at.items():
            if epoch == last + 1:
                trainer.stop(k)
        for i in range(0, 120, 32):
            losses = trainer.step(x[i : i + 32], y[i : i + 32])
            for k, (ref, opt) in enumerate(zip(refs, opts)):
                if k in stop_at and epoch > stop_at[k]:
                    continue
                opt.zero_grad()
                ref_loss = loss_fn(ref(x[i : i + 32]), y[i : i + 32])
                ref_loss.backward()
                opt.step()
                assert abs(losses[k].item() - ref_loss.item()) <= 1e-10 * max(1.0, abs(ref_loss.item()))
    assert trainer.steps.tolist() == [40, 40, 20, 40, 32]
    for k, ref in enumerate(refs):
        for p, q in zip(trainer.model(k).parameters(), ref.parameters()):
            assert rel_err(p, q) <= 1e-10, k
    # the models really differ (no broadcast of one model's weights onto the others)
    assert (trainer.weights[0][0] - trainer.weights[0][1]).abs().max() > 1e-3


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_each_model_matches_training_it_alone_with_adam(optimizer):
    """K models with their own lr, betas, eps and weight decay (per-model (K, 1, 1) hyperparameters); one
    stops half-way and stays frozen (parameters and Adam state), the others go on."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 6, dtype=D, generator=g), torch.randint(0, 3, (96,), generator=g)
    K = 4
    lrs, betas = [0.01, 0.003, 0.02, 0.005], [(0.9, 0.999), (0.8, 0.99), (0.5, 0.9), (0.95, 0.9999)]
    eps, wds = [1e-8, 1e-6, 1e-8, 1e-3], [0.0, 1e-2, 0.1, 0.0]
    models = _models(K, "tanh")
    refs = [_clone(m) for m in models]
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    opts = [cls(r.parameters(), lr=lr, betas=b, eps=e, weight_decay=w) for r, lr, b, e, w in zip(refs, lrs, betas, eps, wds)]
    trainer = VectorizedTrainer(models, "cross_entropy", optimizer=optimizer, lr=lrs, betas=betas, eps=eps, weight_decay=wds)
    for epoch in range(6):
        if epoch == 3:
            trainer.stop(2)
            frozen = [p.clone() for p in trainer.parameters_of(2)] + [t[2].clone() for t in trainer.adam_state.tensors()]
        for i in range(0, 96, 32):
            losses = trainer.step(x[i : i + 32], y[i : i + 32])
            for k, (ref, opt) in enumerate(zip(refs, opts)):
                if k == 2 and epoch >= 3:
                    continue
                opt.zero_grad()
                ref_loss = manualbp.CrossEntropyLoss()(ref(x[i : i + 32]), y[i : i + 32])
                ref_loss.backward()
                opt.step()
                assert abs(losses[k].item() - ref_loss.item()) <= 1e-10 * max(1.0, abs(ref_loss.item()))
    for k, ref in enumerate(refs):
        for p, q in zip(trainer.model(k).parameters(), ref.parameters()):
            assert rel_err(p, q) <= 1e-10, k
    now = [p for p in trainer.parameters_of(2)] + [t[2] for t in trainer.adam_state.tensors()]
    assert all(torch.equal(a, b) for a, b in zip(now, frozen))
    assert trainer.adam_state.step.view(-1).tolist() == [18, 18, 9, 18] and trainer.steps.tolist() == [18, 18, 9, 18]
    # a resumed trainer continues with the same moments and step counts
    state = trainer.state_dict()
    trainer.step(x[:32], y[:32])
    after = [p.clone() for p in trainer.params]
    trainer.load_state_dict(state)
    trainer.step(x[:32], y[:32])
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, after))
    with pytest.raises(ValueError, match="betas: expected one pair"):
        VectorizedTrainer(_models(K), lr=0.1, optimizer=optimizer, betas=[(0.9, 0.99)] * 3)
    with pytest.raises(ValueError, match="momentum, dampening and nesterov are SGD's"):
        VectorizedTrainer(_models(K), lr=0.1, optimizer=optimizer, momentum=0.9)


@pytest.mark.parametrize("momentum", [0.9, 0.0])  # 0: the fused step
def test_per_model_batches_no_bias_and_grad_norms(momentum):
    """Inputs (K, N, in): each model sees its own batch order, as when each seed shuffles differently."""
    K = 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, dtype=D, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)
    models = _models(K, "tanh", bias=False)
    refs = [_clone(m) for m in models]
    opts = [torch.optim.SGD(r.parameters(), lr=0.1, momentum=momentum) for r in refs]
    trainer = VectorizedTrainer(models, manualbp.CrossEntropyLoss(), lr=0.1, momentum=momentum)
    orders = [torch.randperm(96, generator=torch.Generator().manual_seed(k)) for k in range(K)]
    for i in range(0, 96, 24):
        idx = torch.stack([o[i : i + 24] for o in orders])  # (K, 24)
        trainer.step(x[idx], y[idx])
        for k, (ref, opt) in enumerate(zip(refs, opts)):
            opt.zero_grad()
            manualbp.CrossEntropyLoss()(ref(x[idx[k]]), y[idx[k]]).backward()
            opt.step()
    norms = trainer.grad_norms()
    for k, ref in enumerate(refs):
        for p, q in zip(trainer.model(k).parameters(), ref.parameters()):
            assert rel_err(p, q) <= 1e-10
        for name, p in ref.named_parameters():
            assert abs(norms[name][k].item() - p.grad.norm().item()) <= 1e-10 * p.grad.norm().item()
    out = trainer.predict(x)
    assert out.shape == (K, 96, 3)
    torch.testing.assert_close(out[1], refs[1](x).detach(), rtol=1e-10, atol=1e-12)


def test_a_diverging_model_does_not_touch_the_others():
    K = 3
    x = torch.randn(64, 6, dtype=D)
    y = torch.randint(0, 3, (64,))
    models = _models(K, "relu")
    refs = [_clone(m) for m in models]
    trainer = VectorizedTrainer(models, "cross_entropy", lr=[0.1, float("inf"), 0.1])
    for _ in range(20):
        losses = trainer.step(x, y)
        if not torch.isfinite(losses[1]):
            trainer.stop(1)
    assert not bool(trainer.active[1])
    opt = torch.optim.SGD(refs[0].parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        manualbp.CrossEntropyLoss()(refs[0](x), y).backward()
        opt.step()
    for p, q in zip(trainer.model(0).parameters(), refs[0].parameters()):
        assert rel_err(p, q) <= 1e-10


def test_state_dict_roundtrip_and_errors():
    models = _models(2)
    trainer = VectorizedTrainer(models, "cross_entropy", lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 6, dtype=D), torch.randint(0, 3, (16,))
    trainer.step(x, y)
    state = trainer.state_dict()
    trainer.step(x, y)
    after = [p.clone() for p in trainer.params]
    trainer.load_state_dict(state)
    trainer.step(x, y)
    for p, q in zip(trainer.params, after):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    with pytest.raises(ValueError, match="another architecture"):
        VectorizedTrainer([models[0], manualbp.MLP(6, [5], 3, dtype=D)], lr=0.1)
    with pytest.raises(ValueError, match="one per model"):
        VectorizedTrainer(models, lr=[0.1, 0.2, 0.3])


@pytest.mark.parametrize("shared", [True, False])
def test_fused_step_soft_targets_grad_norms_and_shape_errors(shared):
    # soft targets whose rows do not sum to 1 (dL/do = softmax(o) sum_k y_k - y), shared or per-model
    # batches, grad norms of the fused step (never materialized during it) against native autograd
    K = 3
    g = torch.Generator().manual_seed(2)
    x = torch.randn(K, 20, 6, dtype=D, generator=g)
    y = torch.rand(K, 20, 3, dtype=D, generator=g) * 2
    if shared:
        x, y = x[0], y[0]
    models = _models(K, "sigmoid")
    refs = [_clone(m).to_torch() for m in models]
    opts = [torch.optim.SGD(r.parameters(), lr=0.3) for r in refs]
    trainer = VectorizedTrainer(models, "cross_entropy", lr=0.3)
    for _ in range(3):
        losses = trainer.step(x, y)
        for k, (ref, opt) in enumerate(zip(refs, opts)):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(ref(x if shared else x[k]), y if shared else y[k])
            loss.backward()
            opt.step()
            assert abs(losses[k].item() - loss.item()) <= 1e-12
    norms = trainer.grad_norms()
    for k, ref in enumerate(refs):
        for p, q in zip(trainer.model(k).parameters(), ref.parameters()):
            assert rel_err(p, q) <= 1e-12
        for (name, _), p in zip(models[0].named_parameters(), ref.parameters()):
            assert abs(norms[name][k].item() - p.grad.norm().item()) <= 1e-10 * p.grad.norm().item()
    with pytest.raises(ValueError, match="input must have shape"):
        trainer.step(x[..., :5], y)
    with pytest.raises(ValueError, match="target must have shape"):
        trainer.step(x, y[..., :2])
    with pytest.raises(ValueError, match=r"target \(class indices\) must have shape"):
        trainer.step(x, torch.zeros(7, dtype=torch.long))


def test_predict_reuses_its_buffers_but_never_hands_them_out():
    torch.manual_seed(0)
    models = [manualbp.MLP(5, [4], 3, dtype=torch.float64) for _ in range(3)]
    trainer = VectorizedTrainer(models, "cross_entropy", lr=0.1)
    a, b = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    first = trainer.predict(a)
    second = trainer.predict(b)  # same shape: the same buffers underneath
    assert first.data_ptr() != second.data_ptr()
    for k, model in enumerate(models):
        with torch.no_grad():
            assert torch.allclose(first[k], model(a), rtol=0, atol=1e-12)
            assert torch.allclose(second[k], model(b), rtol=0, atol=1e-12)


def test_small_groups_run_on_one_thread_and_the_count_comes_back():
    """VectorizedTrainer.threads: one CPU thread while K steps are under single_thread_flops (as the fused
    trainer's guard), torch's count kept above it, and the caller's count back after."""
    models = [manualbp.MLP(8, [8], 3) for _ in range(2)]
    trainer = VectorizedTrainer(models, "cross_entropy", lr=0.1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with trainer.threads(16):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        trainer.single_thread_flops = 1.0  # every step "large": torch's count stays
        with trainer.threads(16):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
