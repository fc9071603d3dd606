"""The house rule that a reader can follow every function: none in manualbp/ is longer than about 60 lines.

A function's length is ``end_lineno - lineno + 1`` of its ``def`` (docstring and body, decorators not counted),
for every function and method, nested ones included. Only a function that is a table of data may stay long: it
goes in :data:`ALLOWED` with its reason, and an entry goes when its function is split
(:func:`test_every_allowed_function_is_still_long`). Today there is none.
"""

from __future__ import annotations

import ast
import pathlib

from helpers import ROOT

PACKAGE = ROOT / "manualbp"
LIMIT = 60

#: "path/in/manualbp.py::Qualified.name" -> why it may be longer than LIMIT
ALLOWED: dict[str, str] = {}
REASONS = ("a table of data",)


def function_lengths(source: str) -> dict[str, int]:
    """{qualified name: lines} of every function in ``source``: methods as ``Class.name``, nested functions as
    ``outer.inner``."""
    lengths: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                lengths[name] = child.end_lineno - child.lineno + 1
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return lengths


def package_lengths(root: pathlib.Path = PACKAGE) -> dict[str, int]:
    """{"path::name": lines} of every function in every .py file under ``root``."""
    return {
        f"{path.relative_to(root).as_posix()}::{name}": lines
        for path in sorted(root.rglob("*.py"))
        for name, lines in function_lengths(path.read_text()).items()
    }


def too_long(lengths: dict[str, int], allowed: dict[str, str], limit: int = LIMIT) -> list[str]:
    """One line per function over ``limit`` lines that ``allowed`` does not name, longest first."""
    over = sorted(((n, q) for q, n in lengths.items() if n > limit and q not in allowed), reverse=True)
    return [f"{q}: {n} lines" for n, q in over]


def test_no_function_in_manualbp_is_longer_than_60_lines():
    offenders = too_long(package_lengths(), ALLOWED)
    assert not offenders, (
        f"functions longer than {LIMIT} lines (split each into a handful of named steps, helpers with docstrings; "
        "only a table of data may go in ALLOWED):\n  " + "\n  ".join(offenders)
    )


def test_every_allowed_function_is_still_long():
    """An entry goes once its function is split (or moved, or renamed), so the allowlist only shrinks."""
    lengths = package_lengths()
    stale = [q for q in ALLOWED if lengths.get(q, 0) <= LIMIT]
    assert not stale, f"ALLOWED names functions that are not (or no longer) over {LIMIT} lines: {stale}"
    assert set(ALLOWED.values()) <= set(REASONS)


def _def(name: str, lines: int, indent: str = "") -> str:
    """A function ``name`` of exactly ``lines`` lines (its def and lines - 1 assignments)."""
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 1))
    return f"{indent}def {name}():\n{body}"


def test_the_check_finds_a_long_function_method_and_nested_function(tmp_path):
    source = "\n".join(
        [
            _def("short", 60),
            _def("long", 61),
            "class Thing:\n" + _def("method", 61, "    "),
            "def outer():\n" + _def("inner", 61, "    ") + "    return inner\n",
        ]
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mod.py").write_text(source)
    lengths = package_lengths(tmp_path)
    assert lengths["sub/mod.py::short"] == 60 and lengths["sub/mod.py::long"] == 61
    assert too_long(lengths, {}) == [
        "sub/mod.py::outer: 63 lines",
        "sub/mod.py::outer.inner: 61 lines",
        "sub/mod.py::long: 61 lines",
        "sub/mod.py::Thing.method: 61 lines",
    ]
    assert too_long(lengths, {"sub/mod.py::long": REASONS[0], "sub/mod.py::outer": REASONS[0]}) == [
        "sub/mod.py::outer.inner: 61 lines",
        "sub/mod.py::Thing.method: 61 lines",
    ]
