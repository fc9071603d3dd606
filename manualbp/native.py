"""manualbp's compiled kernels: C++ loops over the same ATen kernels the Python paths call.

At digits scale (64-64-10, batch 32) a training step is about ten kernels of a few microseconds each, and
calling each one from Python costs as much again. ``manualbp/csrc`` holds the hot paths in C++: the drop-in
module's autograd nodes (``module.cpp``: ``MLPFunction`` and class-index ``CrossEntropyFunction``, which
``manualbp.nn`` uses in plain eager mode) and the fused trainer's whole epoch (``fused.cpp``). They call the
same ATen kernels with the same arguments in the same order as the Python code, so both give the same
numbers bit for bit (``tests/native/test_native.py``).

The extension is compiled once per machine, Python and torch version with
``torch.utils.cpp_extension.load`` (g++ and the Python headers; about a minute on 2 cores), on first use
or by ``python -m manualbp.native`` (which ``make install`` runs). Without a compiler everything still
works on the Python paths, only slower: a warning says so once.

Environment:
    MANUALBP_NATIVE: ``auto`` (default: build or load, fall back to Python with a warning), ``off``
        (never build; Python paths only), ``require`` (raise if the extension cannot be built).
    MANUALBP_NATIVE_DIR: where the build lives (default ``~/.cache/manualbp/native/<torch>-py<X.Y>``).

The kernels carry the mutation catalogue's runtime switch (``manualbp.verify.inject_bug`` sets it through
:func:`set_bug`): one integer that each formula site compares with its bug's code (:func:`bug_codes`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

__all__ = ["load", "available", "mode", "build_directory", "sources", "sources_hash", "NAME", "bug_codes", "set_bug"]

NAME = "manualbp_native"
MODES = ("auto", "off", "require")
_SOURCE_DIR = Path(__file__).parent / "csrc"
#: a build lock older than this is a killed build's (a build takes one to three minutes)
STALE_LOCK_S = 900.0


def mode() -> str:
    """The ``MANUALBP_NATIVE`` setting: auto, off or require (a clear error for anything else)."""
    value = os.environ.get("MANUALBP_NATIVE", "auto").strip().lower() or "auto"
    value = {"0": "off", "false": "off", "no": "off", "1": "require", "true": "require", "yes": "require"}.get(
        value, value
    )
    if value not in MODES:
        raise ValueError(f"MANUALBP_NATIVE must be one of {', '.join(MODES)}, got {os.environ['MANUALBP_NATIVE']!r}")
    return value


def sources() -> list[Path]:
    """The extension's C++ sources (``manualbp/csrc/*.cpp``)."""
    return sorted(_SOURCE_DIR.glob("*.cpp"))


def sources_hash() -> str:
    """A digest of every file in ``manualbp/csrc`` (sources and headers)."""
    digest = hashlib.sha256()
    for path in sorted(_SOURCE_DIR.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def build_directory() -> Path:
    """One build per torch and Python version, so upgrading torch never loads a stale binary."""
    root = os.environ.get("MANUALBP_NATIVE_DIR")
    if root:
        return Path(root).expanduser()
    tag = f"{torch.__version__.replace('+', '-')}-py{sys.version_info[0]}.{sys.version_info[1]}"
    return Path.home() / ".cache" / "manualbp" / "native" / tag


def load() -> Optional[ModuleType]:
    """The compiled extension, building it on first use; None where it is off or cannot be built (auto).

    ``MANUALBP_NATIVE`` is read on every call, so a test or a user can switch the Python paths on and off
    at any time; the build itself is attempted once per process. (The module's forward asks on every call:
    the answer is remembered per value of the variable.)
    """
    value = os.environ.get("MANUALBP_NATIVE")
    if value == _last[0]:
        return _last[1]
    module = _load()
    _last[:] = [value, module]
    return module


_last: list = [object(), None]  # the MANUALBP_NATIVE value last seen and load()'s answer for it


def _load() -> Optional[ModuleType]:
    setting = mode()
    if setting == "off":
        return None
    module, error = _built()
    if error is None:
        return module
    if setting == "require":
        raise RuntimeError(f"MANUALBP_NATIVE=require but manualbp's extension could not be built: {error}") from error
    if not _warned:
        _warned.append(True)
        warnings.warn(
            f"manualbp's compiled kernels are unavailable ({type(error).__name__}: {str(error)[:300]}); "
            "using the Python paths, which are slower at small sizes. Set MANUALBP_NATIVE=off to skip the build.",
            RuntimeWarning,
            stacklevel=2,
        )
    return None


_warned: list[bool] = []


@functools.cache
def _built() -> tuple[Optional[ModuleType], Optional[Exception]]:
    """The extension or the reason it could not be built (a missing compiler, headers, a failed build)."""
    try:
        module = _build(verbose=False)
    except Exception as error:
        return None, error
    _loaded[0] = module
    _switch(module)  # a bug set before the build
    return module, None


_loaded: list[Optional[ModuleType]] = [None]  # the extension, once this process has built or loaded it
_bug: list[Optional[str]] = [None]  # the catalogue bug the kernels compute (set_bug), None: none


def bug_codes() -> dict[str, int]:
    """The mutation catalogue's bugs that have a formula site in the kernels: name -> the switch's code.

    One list in ``csrc/native.h`` (``MANUALBP_BUGS``) is the source, so the names and the codes cannot drift.
    Builds the extension if needed (whatever ``MANUALBP_NATIVE`` says); empty where it cannot be built.
    """
    module = _built()[0]
    return dict(module.bug_codes()) if module is not None else {}


def set_bug(name: Optional[str]) -> Optional[str]:
    """Break the kernels' copy of one catalogue formula (``None``: every formula right again); returns the name
    set before, for the caller to restore. A testing hook: :func:`manualbp.verify.inject_bug` calls it.

    Applied at once where the extension is loaded, else by its build later in this process (never builds it);
    a name without a kernel site (not in :func:`bug_codes`) leaves the kernels right.
    """
    previous, _bug[0] = _bug[0], name
    if _loaded[0] is not None:
        _switch(_loaded[0])
    return previous


def _switch(module: ModuleType) -> None:
    module.set_bug(module.bug_codes().get(_bug[0], 0) if _bug[0] is not None else 0)


def available() -> bool:
    """Whether the compiled kernels are in use (building them if needed)."""
    return load() is not None


def _build(verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension  # imports setuptools: only when the extension is wanted

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"  # torch's build lock: a killed build leaves it behind, and the next one waits forever
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        warnings.warn(f"manualbp: removing a stale build lock {lock} (a build was killed)", RuntimeWarning, stacklevel=3)
        lock.unlink(missing_ok=True)
    start = time.perf_counter()
    said: list[bool] = []  # say so when this is a compile (a minute), not a load of a finished build (ms)

    def say() -> None:
        said.append(True)
        print(
            f"manualbp: compiling its C++ kernels into {directory} (once per machine and torch version, about "
            "a minute)...",
            file=sys.stderr,
            flush=True,
        )

    notice = threading.Timer(1.0, say)
    notice.start()
    try:
        module = cpp_extension.load(
            NAME,
            [str(s) for s in sources()],
            # torch rebuilds when a source or a flag changes, but not a header: the flag carries all of them
            extra_cflags=["-O2", f"-DMANUALBP_SOURCES={sources_hash()}"],
            build_directory=str(directory),
            verbose=verbose,
        )
    finally:
        notice.cancel()
    if said:
        print(f"manualbp: C++ kernels compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return module


def main() -> int:
    """``python -m manualbp.native``: build (or find) the extension and say where it is."""
    if mode() == "off":
        print("manualbp: MANUALBP_NATIVE=off, nothing to build")
        return 0
    try:
        module = _build(verbose="-v" in sys.argv[1:])
    except Exception as error:
        print(f"manualbp: the C++ kernels could not be built ({error}); the Python paths will be used", file=sys.stderr)
        return 1 if mode() == "require" or "--strict" in sys.argv[1:] else 0
    print(f"manualbp: C++ kernels ready ({module.__file__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
