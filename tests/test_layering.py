"""The house rules that code review would otherwise have to remember: modules use each other's public names."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "manualbp"


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
