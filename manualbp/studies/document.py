"""The document: a study's :class:`Section`, the :class:`Study` record, number formatting, and reading and
writing ``docs/results.md`` (:func:`read_sections`, :func:`write_results`).

``_f`` formats a table cell (``-`` for a missing value); ``_ordered`` puts a study's values (activations,
inits, rules) in the order its tables and figures list them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

__all__ = ["Section", "Study", "STUDIES", "read_sections", "write_results"]


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        if math.isinf(x):
            return "inf"
        return f"{x:.{digits}f}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"
    return str(x)


def _ordered(values: Sequence[str], order: Sequence[str]) -> list[str]:
    known = [v for v in order if v in values]
    return known + sorted(v for v in set(values) if v not in order)


@dataclass
class Section:
    """One study's part of the document: markdown text plus the figure files it wrote."""

    markdown: str
    figures: list[str]


@dataclass
class Study:
    """A study of ``docs/results.md``: its preset(s), title, prose and table/figure builder."""

    key: str
    title: str
    presets: tuple[str, ...]
    intro: str
    build: Callable[..., Section]
    findings: str = ""


STUDIES: list[Study] = []  # filled by scripts/results.py's text (kept beside the numbers it describes)


def read_sections(path: Union[str, Path]) -> dict[str, str]:
    """The ``## title`` sections of a results document written by :func:`write_results` (title -> body)."""
    sections: dict[str, str] = {}
    title = None
    for line in Path(path).read_text().splitlines(keepends=True):
        if line.startswith("## "):
            title = line[3:].strip()
            sections[title] = ""
        elif title is not None:
            sections[title] += line
    return {t: body.strip() for t, body in sections.items()}


def write_results(sections: Mapping[str, str], out: Union[str, Path], header: str = "# Results\n") -> Path:
    """Write ``header`` then each titled section (already rendered markdown) to ``out``."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        header.rstrip()
        + "\n\n"
        + "\n\n".join(f"## {title}\n\n{body.strip()}" for title, body in sections.items())
        + "\n"
    )
    path.write_text(text)
    return path
