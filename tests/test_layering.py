"""The house rules that code review would otherwise have to remember: modules use each other's public names."""

from __future__ import annotations

import ast
import pathlib

from helpers import ROOT

PACKAGE = ROOT / "manualbp"


def _private_uses(path: pathlib.Path, module: str) -> list[str]:
    """``module._name`` attribute reads and ``from ...module import _name`` in ``path``."""
    tree = ast.parse(path.read_text())
    aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names if a.name == module}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr.startswith("_"):
                found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
        if isinstance(node, ast.ImportFrom) and (node.module or "").endswith(module):
            found += [f"{path.name}:{node.lineno} from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_nothing_reaches_into_the_training_loops_private_names():
    """The run-output helpers are public in manualbp.train.output; the fast paths and the LR finder use them."""
    offenders = [use for path in PACKAGE.rglob("*.py") if path.name != "loop.py" for use in _private_uses(path, "loop")]
    assert offenders == []


def test_the_run_output_module_is_what_the_loop_and_the_sweep_write_with():
    for name in ("train/loop.py", "fast/sweep.py"):
        source = (PACKAGE / name).read_text()
        assert "from ..train.output import" in source or "from .output import" in source, name
        assert "os.replace(" not in source, f"{name} writes a file by hand instead of through manualbp.train.output"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: pathlib.Path) -> set[str]:
    """The manualbp modules ``path`` imports at module level (imports inside functions are lazy: not edges)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("manualbp"):
                continue
            for alias in node.names:  # `from . import data` names a module; `from .config import X` the module
                candidate = f"{base}.{alias.name}"
                out.add(candidate if _exists(candidate) else base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("manualbp")}
    return out


def _exists(module: str) -> bool:
    rel = pathlib.Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def _cycles(modules: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle of the import graph restricted to ``modules`` (by depth-first search)."""
    found, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(modules.get(m, ())):
            if n not in modules:
                continue
            if state.get(n) == "open":
                found.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
    return found


def test_the_training_package_imports_one_way():
    """defaults <- the group modules <- config <- loop: no circle (a lazy import inside a function hid one)."""
    graph = {_module_name(p): _top_level_imports(p) for p in (PACKAGE / "train").glob("*.py")}
    graph = {m: {n for n in deps if n.startswith("manualbp.train.") and n != m} for m, deps in graph.items()}
    assert _cycles(graph) == []
    assert graph["manualbp.train.defaults"] == set()
    for group in ("data", "schedules", "stopping", "metrics"):
        assert "manualbp.train.config" not in graph[f"manualbp.train.{group}"], group
    source = (PACKAGE / "train" / "config.py").read_text()
    assert "    from . import" not in source  # the groups are imported at the top, not inside validate()


def test_backends_register_lazily():
    """Importing manualbp.train does not import the fast paths; looking up backend "fused" does."""
    import subprocess
    import sys

    code = (
        "import sys, manualbp.train as T\n"
        "assert not any(m.startswith('manualbp.fast') for m in sys.modules), 'fast paths imported eagerly'\n"
        "assert 'fused' in T.BACKENDS\n"
        "from manualbp.fast.backend import FusedBackend\n"
        "assert T.BACKENDS['fused'] is FusedBackend and dict(T.BACKENDS.items())['fused'] is FusedBackend\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    import pytest

    from manualbp.train import register_backend

    with pytest.raises(ValueError, match="a lazy backend is named 'module:Class'"):
        register_backend("broken", "manualbp.fast.backend")


def test_the_optimizer_steps_are_pure_math():
    """optim_steps sits beside functional: it imports nothing of manualbp (no nn, no train, no fast)."""
    imports = _top_level_imports(PACKAGE / "optim_steps.py")
    assert imports == set(), imports
    source = (PACKAGE / "optim_steps.py").read_text()
    assert "import manualbp" not in source and "from ." not in source
