"""The README's drop-in example runs as written, and the console script answers --version."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import README

import manualbp


def test_readme_example_runs():
    text = README.read_text()
    block = re.search(r"<!-- readme-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its example"
    exec(compile(block.group(1), "README.md", "exec"), {})


def test_version_flag():
    out = subprocess.run(
        [sys.executable, "-m", "manualbp.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"manualbp {manualbp.__version__}"


def test_readme_fused_example_runs(capsys):
    text = README.read_text()
    block = re.search(r"<!-- readme-fused -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its FusedTrainer example"
    exec(compile(block.group(1), "README.md", "exec"), {})
    accuracy = float(capsys.readouterr().out.split("train accuracy")[1])
    assert accuracy > 0.9  # it trained (chance is 0.1)


def test_readme_registry_example_runs(capsys):
    from manualbp import registry

    text = README.read_text()
    block = re.search(r"<!-- readme-registry -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lost its registry example"
    try:
        exec(compile(block.group(1), "README.md", "exec"), {})
    finally:
        for table, name in ((registry.ACTIVATION_REGISTRY, "softplus"), (registry.LOSS_REGISTRY, "log_cosh")):
            if name in table:
                table.remove(name)
    assert float(capsys.readouterr().out.split("test r2")[1]) > 0.2  # it learned (0 is the mean's score)
