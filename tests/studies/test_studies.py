"""manualbp.studies and scripts/results.py: the measurements at initialization and the document generator."""

from __future__ import annotations

import ast
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, fake_job, results_script
from torch.func import functional_call

import manualbp
from manualbp import studies as S
from manualbp.train import run


def _exact_hessian_eigs(model, x, y, loss_fn):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        params, k = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[k : k + s.numel()].reshape(s)
            k += s.numel()
        return loss_fn(functional_call(model, params, (x,)), y)

    h = torch.autograd.functional.hessian(f, flat0)
    return torch.linalg.eigvalsh((h + h.T) / 2)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
def test_power_iteration_matches_the_exact_hessian_eigenvalue(activation):
    torch.manual_seed(0)
    model = manualbp.MLP(3, [4], 3, activation=activation, dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # a sharper loss than the default init, so the top eigenvalue stands out
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 3, (20,))
    eigs = _exact_hessian_eigs(model, x, y, manualbp.CrossEntropyLoss())
    top = eigs.max().item()
    est = S.hessian_lambda_max(model, x, y, "cross_entropy", iters=500, tol=1e-12)
    assert est.converged
    assert est.value == pytest.approx(top, rel=1e-6)
    assert est.loss == pytest.approx(manualbp.CrossEntropyLoss()(model(x), y).item())
    assert est.lr_bound == pytest.approx(2 / top)


def test_power_iteration_finds_the_largest_eigenvalue_when_a_negative_one_dominates():
    torch.manual_seed(39)  # a net whose Hessian has eigenvalues -1.17 ... 0.54: plain power iteration finds -1.17
    model = manualbp.MLP(3, [4], 3, activation="tanh", dtype=torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 3, (20,))
    eigs = _exact_hessian_eigs(model, x, y, manualbp.CrossEntropyLoss())
    assert -eigs.min() > eigs.max() > 0
    est = S.hessian_lambda_max(model, x, y, "cross_entropy", iters=2000, tol=1e-12)
    assert est.value == pytest.approx(eigs.max().item(), rel=1e-5)


def test_power_iteration_on_a_quadratic_loss_equals_the_gauss_newton_eigenvalue():
    # a linear model (no hidden layer) with the notes' squared error: H = X^T X / N (per output), exactly
    torch.manual_seed(1)
    model = manualbp.MLP(4, [], 1, dtype=torch.float64)
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randn(30, 1, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(30, 1, dtype=torch.float64)], 1)
    expected = torch.linalg.eigvalsh(xa.T @ xa / 30).max().item()
    est = S.hessian_lambda_max(model, x, y, "squared_error", iters=1000, tol=1e-13)
    assert est.value == pytest.approx(expected, rel=1e-6)


def test_initial_state_rebuilds_the_runs_weights_and_grad_norms_see_vanishing():
    cfg = {
        "data": {"name": "iris"},
        "model": {"hidden": [8, 8, 8], "activation": "sigmoid"},
        "init": {"name": "normal", "std": 0.01},
        "stopping": {"max_epochs": 1},
        "optim": {"lr": 1e-12, "batch_size": "full"},
        "logger": {"name": "none"},
        "progress": False,
        "seed": 3,
    }
    st = S.initial_state(cfg)
    trained = run(cfg).model  # one GD step at lr 1e-12: the weights are the initial ones to ~1e-12
    for a, b in zip(st.model.parameters(), trained.parameters()):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
    g = S.initial_grad_norms(st.model, st.data.x_train, st.data.y_train, st.loss)
    native = st.model.to_torch()
    torch.nn.functional.cross_entropy(native(st.data.x_train), st.data.y_train).backward()
    ref = [native[k].weight.grad.norm().item() for k in range(0, len(native), 2)]
    assert g == pytest.approx(ref, rel=1e-5)
    assert g[0] < 1e-3 * g[-1]  # vanishing towards the input under N(0, 0.01) and sigmoid


def test_saturation_counts_flat_units():
    model = manualbp.MLP(2, [3], 2, activation="tanh", dtype=torch.float64)
    with torch.no_grad():
        model.linears[0].weight.copy_(torch.tensor([[100.0, 0], [0, 0.01], [0.01, 0.01]]))
        model.linears[0].bias.zero_()
    x = torch.tensor([[1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    assert S.saturation(model, x) == [pytest.approx(1 / 3)]


def test_results_script_regenerates_the_document_from_a_tiny_fake_sweep(tmp_path):
    base = {"data": {"name": "iris"}, "model": {"hidden": [4], "activation": "sigmoid"}, "seed": 0}
    sweep = tmp_path / "multirun" / "batch_study"
    for num, (bs, lr, acc) in enumerate([("1", 0.1, 0.81), ("1", 1.0, 0.55), ("full", 0.1, 0.42), ("full", 1.0, 0.93)]):
        cfg = {**base, "optim": {"name": "sgd", "lr": lr, "batch_size": bs if bs == "full" else int(bs)}}
        hist = [
            {
                "epoch": e,
                "val_accuracy": acc * e / 2,
                "wall_time_s": 0.5 * e,
                "train_loss": 1.0 / e,
                "val_loss": 1.0 / e,
            }
            for e in (1, 2)
        ]
        fake_job(
            sweep,
            num,
            [f"optim.batch_size={bs}", f"optim.lr={lr}"],
            cfg,
            {
                "status": "completed",
                "test_accuracy": acc + 0.01,
                "epochs": 2,
                "steps": 2 if bs == "full" else 200,
                "wall_time_s": 1.0,
            },
            hist,
        )
    out = tmp_path / "docs" / "results.md"
    mod = results_script()
    assert mod.main(["--multirun", str(tmp_path / "multirun"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## 4. Single-example SGD vs mini-batch vs full-batch gradient descent" in text
    # the table comes from the fake sweep: per rate, and the best rate by final validation accuracy
    row_1 = next(line for line in text.splitlines() if line.startswith("| 1 "))
    assert "0.820" in row_1 and "0.560" in row_1 and "| 0.1 " in row_1
    row_full = next(line for line in text.splitlines() if line.startswith("| full "))
    assert "0.940" in row_full and "| 1 " in row_full
    assert (tmp_path / "docs" / "img" / "results_batch.png").stat().st_size > 1000
    # the studies without a sweep keep their command and say so
    assert "python experiments/train.py -m experiment=lr_study progress=false" in text
    assert text.count("*Not run yet") == 6  # every study but the batch study: init, lr, stopping, mnist1d, eos, saturation
    # --only regenerates one study and keeps the others' sections as the document has them
    out.write_text(text.replace("*Not run yet", "*KEPT, not run yet"))
    assert mod.main(["--multirun", str(tmp_path / "multirun"), "--out", str(out), "--only", "batch_study"]) == 0
    again = out.read_text()
    assert again.count("*KEPT, not run yet") == 6 and row_1 in again
    assert again.index("## 1. Initialization") < again.index("## 4. Single-example")


def test_every_study_preset_composes():
    from hydra import compose, initialize_config_dir

    mod = results_script()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for presets in mod.PRESETS.values():
            for p in presets:
                cfg = compose("train", overrides=[f"experiment={p}"], return_hydra_config=True)
                assert cfg.hydra.sweep.dir == f"multirun/{p}"
                assert cfg.hydra.sweeper.params, p


def test_lr_boundary_rule_marks_divergence_and_non_decrease():
    from manualbp.report import Job

    ok = Job(Path("a"), metrics={"status": "completed", "train_loss": 0.5})
    flat = Job(Path("b"), metrics={"status": "completed", "train_loss": 2.4})
    div = Job(Path("c"), metrics={"status": "diverged", "train_loss": math.nan})
    assert not S._unstable(ok, 2.3) and S._unstable(flat, 2.3) and S._unstable(div, 2.3)


def test_lr_section_reports_the_observed_boundary_next_to_two_over_lambda_max(tmp_path):
    base = {"data": {"name": "iris"}, "model": {"hidden": [4], "activation": "tanh"}, "seed": 0}
    sweep = tmp_path / "lr"
    for num, (lr, status, loss) in enumerate(
        [(0.1, "completed", 0.5), (1.0, "completed", 0.3), (10.0, "diverged", None)]
    ):
        cfg = {**base, "optim": {"name": "sgd", "lr": lr, "batch_size": "full"}, "stopping": {"max_epochs": 2}}
        hist = [{"epoch": e, "train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5} for e in (1, 2)]
        fake_job(
            sweep,
            num,
            [f"optim.lr={lr}"],
            cfg,
            {"status": status, "train_loss": loss, "epochs": 2, "loss": "cross_entropy"},
            hist,
        )
    sec = S.lr_section(S.load_sweep(sweep), tmp_path / "img", hessian_iters=300)
    st = S.initial_state({**base, "optim": {"batch_size": "full"}}, dtype=torch.float64)
    lam = S.hessian_lambda_max(st.model, st.data.x_train, st.data.y_train, "cross_entropy", iters=300)
    assert sec.lam["tanh"].value == pytest.approx(lam.value, rel=1e-6)
    assert sec.boundary[("tanh", "full")] == 10.0
    row = next(line for line in sec.markdown.splitlines() if line.startswith("| tanh") and "10.000" in line)
    assert f"{2 / lam.value:.3f}" in row and "| 1.000 " in row and "| 10.000 " in row
    assert "div@2" in sec.markdown


def test_stopping_section_tabulates_prechelts_criteria_and_the_trade_off(tmp_path):
    """Fake clean and noisy sweeps: criteria named as Prechelt names them, per-criterion means over seeds relative to
    the fastest, and the findings' verdicts computed from those numbers."""
    mod = results_script()
    # (rule config, epochs, test accuracy per seed); a slower criterion buys 0.02 of accuracy for 4x the epochs
    rules = {
        "max_epochs": ({}, 20, (0.50, 0.52)),
        "early_stopping": ({"early_stopping": {"patience": 3}}, 8, (0.55, 0.57)),
        "gl1": ({"gl": {"alpha": 1.0}}, 4, (0.54, 0.56)),
        "up4": ({"up": {"s": 4, "strip": 2}}, 16, (0.56, 0.58)),
    }
    num = 0
    for preset, noise in (("stopping_study", 0.0), ("stopping_study_noisy", 0.2)):
        for name, (stopping, epochs, accs) in rules.items():
            for seed, acc in enumerate(accs):
                hist = [
                    {
                        "epoch": e,
                        "train_loss": 1 / e,
                        "val_loss": abs(e - 3) + 1,
                        "train_accuracy": min(0.3 * e, 1.0),
                        "val_accuracy": 0.5,
                    }
                    for e in range(1, epochs + 1)
                ]
                reason = "max_epochs" if name == "max_epochs" else next(iter(stopping))
                metrics = {
                    "status": "completed",
                    "stop_reason": reason,
                    "epochs": epochs,
                    "test_accuracy": acc,
                    "test_loss": 1.0,
                    "n_train": 100,
                    "best_epoch": 3,
                    "restored_best": name != "max_epochs",
                }
                if noise:
                    metrics["labels_changed"] = 18
                cfg = {"seed": seed, "stopping": {"max_epochs": 20, **stopping}}
                fake_job(tmp_path / "multirun" / preset, num, [f"seed={seed}"], cfg, metrics, hist)
                num += 1
    labels = {S.rule_label(j) for j in S.load_sweep(tmp_path / "multirun" / "stopping_study")}
    assert labels == {"max_epochs", "early_stopping", "GL_1", "UP_4"}
    out = tmp_path / "results.md"
    assert mod.main(["--multirun", str(tmp_path / "multirun"), "--out", str(out), "--only", "stopping_study"]) == 0
    text = out.read_text()
    gl = next(line for line in text.splitlines() if line.startswith("| GL_1 ") and "2/2" in line)
    assert "| 4.0 " in gl and "| 1.00 " in gl and "0.550" in gl  # the fastest: epochs and test acc, mean of 2 seeds
    up = next(line for line in text.splitlines() if line.startswith("| UP_4 ") and "2/2" in line)
    assert "| 4.00 " in up and "0.570" in up and f"{0.43 / 0.45:.3f}" in up
    assert "Prechelt's trade-off (clean labels): the slower half of his criteria (UP_4) trains 4.0x" in text
    assert "-4.4%" not in text and "+4.4%" in text and "for about 4% lower test error): reproduced." in text
    assert "Clean first, noise later: 82.0% of the training labels are still correct" in text
    assert "(+0.050; the best criterion, UP_4: +0.060), against +0.050 with clean labels: **not reproduced**" in text
    assert (tmp_path / "img" / "results_stopping_noisy_tradeoff.png").stat().st_size > 1000


# --------------------------------------------------------------------------------------------------
# The package's shape: modules by what they do, imports one way, the old names still reachable
# --------------------------------------------------------------------------------------------------
STUDIES_DIR = ROOT / "manualbp" / "studies"
STUDIES_MODULES = sorted(p.stem for p in STUDIES_DIR.glob("*.py") if p.stem != "__init__")
BOTTOM = {"measure", "sweeps", "document", "figures"}  # import no other studies module


#: every name the flat manualbp/studies.py and manualbp/dynamics.py defined: each stays reachable where it was
OLD_STUDIES_NAMES = (
    "LOSSES InitialState initial_state initial_grad_norms saturation LambdaMax hessian_lambda_max override _finite _f "
    "epochs_to _lr _batch _plt _save Section INIT_LABELS _ordered init_section depth_section _unstable lr_section "
    "RULE_ORDER PRECHELT_NAMES FIRING_RULES rule_label _rule_order _mean _min_val _seed_rows SEED_HEADER CriterionStats "
    "_ends_at_best criterion_stats _criteria_table _stopping_figure _tradeoff_figure stopping_section batch_section "
    "baseline_section Study STUDIES load_sweep sweep_runtime sweep_wall_time read_sections write_results"
).split()
OLD_DYNAMICS_NAMES = (
    "_num _lr EosRun eos_runs Window window _eos_row eos_section eos_digits_section _layers _series saturation_runs "
    "_init_label _mean saturation_section"
).split()


def _sibling_imports(path: Path) -> set[str]:
    """The manualbp.studies modules ``path`` imports at module level."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return out


def test_the_studies_package_imports_one_way():
    """measure/sweeps/document/figures at the bottom (none imports another studies module), the study sections
    above them (importing only the bottom), so no cycle; the measurements neither plot nor write markdown."""
    assert BOTTOM < set(STUDIES_MODULES) and "dynamics" in STUDIES_MODULES
    for m in STUDIES_MODULES:
        deps = _sibling_imports(STUDIES_DIR / f"{m}.py")
        assert deps <= (set() if m in BOTTOM else BOTTOM), (m, deps)
    imported = {
        n for node in ast.walk(ast.parse((STUDIES_DIR / "measure.py").read_text())) if isinstance(node, (ast.Import, ast.ImportFrom))
        for n in [getattr(node, "module", None) or "", *(a.name for a in node.names)]
    }  # fmt: skip
    assert not {n for n in imported if "matplotlib" in n or "report" in n or "markdown" in n}, imported


@pytest.mark.slow  # a fresh interpreter per module (about 2.5 s each); the AST test above guards the direction fast
@pytest.mark.parametrize("module", STUDIES_MODULES)
def test_each_studies_module_imports_alone_and_the_package_reexports_its_names(module):
    """In a fresh interpreter: ``import manualbp.studies.<module>`` on its own, then each name of its ``__all__``
    and each old name it holds is the same object on ``manualbp.studies`` (dynamics: on ``manualbp.dynamics``)."""
    front, old = ("manualbp.dynamics", OLD_DYNAMICS_NAMES) if module == "dynamics" else ("manualbp.studies", OLD_STUDIES_NAMES)
    code = (
        "import importlib\n"
        f"mod = importlib.import_module('manualbp.studies.{module}')\n"
        f"front = importlib.import_module({front!r})\n"
        f"names = [*getattr(mod, '__all__', ()), *(n for n in {old!r} if hasattr(mod, n))]\n"
        "missing = [n for n in names if getattr(front, n, None) is not getattr(mod, n)]\n"
        "assert not missing, missing\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_old_names_are_all_still_there():
    from manualbp import dynamics as D

    assert [n for n in OLD_STUDIES_NAMES if not hasattr(S, n)] == []
    assert [n for n in OLD_DYNAMICS_NAMES if not hasattr(D, n)] == []


def test_every_name_the_scripts_and_tests_use_is_reexported():
    """``S.<name>`` (manualbp.studies) and ``D.<name>`` (manualbp.dynamics) as scripts/ and tests/ write them,
    and ``from manualbp.studies import <name>``, all resolve."""
    from manualbp import dynamics as D

    used = {"S": set(), "D": set()}
    for path in [*ROOT.glob("scripts/*.py"), *ROOT.glob("tests/**/*.py")]:
        text = path.read_text()
        if "import studies as S" in text:
            used["S"] |= set(re.findall(r"\bS\.(\w+)", text))
        if "import dynamics as D" in text:
            used["D"] |= set(re.findall(r"\bD\.(\w+)", text))
        used["S"] |= {n.strip() for names in re.findall(r"from manualbp\.studies import ([\w, ]+)", text) for n in names.split(",")}
    assert {"Section", "_plt", "_unstable", "lr_section", "saturation"} <= used["S"] and "_series" in used["D"]
    assert [n for n in sorted(used["S"]) if not hasattr(S, n)] == []
    assert [n for n in sorted(used["D"]) if not hasattr(D, n)] == []
