"""Shared test set-up for the whole tree: hypothesis profiles, threads, the data cache, devices.

``tests/`` mirrors the package (``tests/nn``, ``tests/train``, ...); this file and ``helpers.py`` stay at its root
and serve every folder. The test folders have no ``__init__.py``, so every test file's name is unique in the tree.
"""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings

# ``from helpers import ...`` from any folder of the tree (pytest puts a test file's own folder on sys.path)
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# CI: derandomized, no deadline, so a slow shared machine never turns a correct test red.
settings.register_profile(
    "ci", deadline=None, derandomize=True, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Tiny matmuls are fastest on one thread, and a shared machine never oversubscribes its cores.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses some tests start
# the data cache of this session (and its subprocesses) stays out of the user's ~/.cache
os.environ.setdefault("MANUALBP_CACHE_DIR", tempfile.mkdtemp(prefix="manualbp-test-cache-"))

# Comparisons on CUDA use full float32 precision.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_params():
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param(
            "cuda",
            id="cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")],
        ),
    ]
