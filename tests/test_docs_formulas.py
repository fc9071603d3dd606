"""docs/formulas.md stays true: every place it names for a formula exists, in the file it names."""

from __future__ import annotations

import re

from helpers import ROOT


def _cited() -> list[tuple[str, str]]:
    """(file, symbol) pairs of the table: a `file` cell followed by the `symbols` cited for it."""
    pairs = []
    for line in (ROOT / "docs" / "formulas.md").read_text().splitlines():
        if not line.startswith("| ") or line.startswith("| formula") or line.startswith("|---"):
            continue
        for cell in line.split("|")[2:4]:
            for chunk in re.split(r";", cell):
                names = re.findall(r"`([^`]+)`", chunk)
                files = [n for n in names if n.endswith((".py", ".cpp", ".h"))]
                current = None
                for name in names:
                    if name in files:
                        current = name
                    elif current is not None:
                        pairs.append((current, name))
    return pairs


def test_every_cited_place_exists():
    pairs = _cited()
    assert len(pairs) >= 30, pairs  # the table was read
    missing = []
    for file, symbol in pairs:
        path = ROOT / "manualbp" / file
        assert path.exists(), file
        token = symbol.split("`")[0].rstrip(".")
        if token not in path.read_text():
            missing.append(f"{file}: {symbol}")
    assert missing == []
