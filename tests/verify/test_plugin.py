"""The pytest plugin, exercised the way a user's suite would: through pytester."""

from __future__ import annotations

import os
from importlib.metadata import entry_points

import pytest
from helpers import ROOT

from manualbp.verify import available_devices

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

pytest_plugins = ["pytester"]

USES_FIXTURE = "def test_uses(manualbp_verify):\n    assert manualbp_verify.devices\n"

USER_TESTS = """
import pytest
import torch


class GoodSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        a = torch.sigmoid(z)
        ctx.save_for_backward(a)
        return a

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return g * a * (1 - a)


class BrokenSigmoid(GoodSigmoid):
    @staticmethod
    def backward(ctx, g):
        return g  # missing a (1 - a)


def test_good(manualbp_verify, manualbp_device):
    z = torch.randn(5, 3, dtype=torch.float64, device=manualbp_device, requires_grad=True)
    report = manualbp_verify.assert_gradients_match(GoodSigmoid.apply, torch.sigmoid, z)
    assert report.ok
    assert manualbp_device in manualbp_verify.devices


def test_broken_is_caught(manualbp_verify, manualbp_device):
    z = torch.randn(5, 3, dtype=torch.float64, device=manualbp_device, requires_grad=True)
    with pytest.raises(AssertionError, match="2 of 3 quantities differ"):  # grad z, grad^2 z
        manualbp_verify.assert_gradients_match(BrokenSigmoid.apply, torch.sigmoid, z)


def test_fixture_contents(manualbp_verify):
    assert manualbp_verify.devices[0] == "cpu"
    assert manualbp_verify.default_tolerances(torch.float32) == (1.3e-6, 1e-5)
    import manualbp
    model = manualbp.MLP(3, [4], 2, dtype=torch.float64)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    assert manualbp_verify.compare(model, x, y).ok and manualbp_verify.trace(model, x, y).ok
"""

FAILING_TEST = """
import torch

def test_fails(manualbp_verify):
    z = torch.randn(4, dtype=torch.float64, requires_grad=True)
    manualbp_verify.assert_gradients_match(lambda t: t * t, lambda t: t ** 3, z)
"""


def _declared_entry_points() -> dict[str, str]:
    """manualbp's pytest11 entry points as pyproject.toml declares them (name -> module)."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["entry-points"]["pytest11"]


def _installed_entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group="pytest11") if ep.value.startswith("manualbp")}


def test_entry_point_is_registered():
    """One entry point, named ``manualbp`` (what ``-p manualbp`` and ``-p no:manualbp`` name), whose module
    pulls in ``manualbp.pytest_plugin`` under that module's own name."""
    assert _declared_entry_points() == {"manualbp": "manualbp._pytest_entry"}
    assert list(_installed_entry_points()) == ["manualbp"]  # the value is stale until `pip install -e .`


@pytest.fixture
def declared(pytester, monkeypatch, tmp_path_factory):
    """Run pytest in a subprocess that sees the entry points of pyproject.toml (a stand-in dist-info ahead of
    the installed one, whatever that declares), with autoloading off and ``-p NAME`` for every entry point,
    which loads and registers it exactly as autoloading does."""
    site = tmp_path_factory.mktemp("site")
    info = site / "manualbp_declared-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: manualbp-declared\nVersion: 0\n")
    eps = _declared_entry_points()
    (info / "entry_points.txt").write_text("[pytest11]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT)]))
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_user=USES_FIXTURE)

    def run(*args: str, autoload: bool = True):
        flags = [f for name in eps for f in ("-p", name)] if autoload else []
        return pytester.runpytest_subprocess(*flags, *args)

    return run


@pytest.mark.parametrize(
    "how",
    ["-p manualbp.pytest_plugin", "conftest pytest_plugins", "conftest pytest_plugins, no autoload", "-p manualbp"],
)
def test_every_way_of_naming_the_plugin_works(declared, pytester, how):
    """``-p manualbp.pytest_plugin`` and ``pytest_plugins = ["manualbp.pytest_plugin"]`` next to the
    auto-loaded entry point (once "Plugin already registered under a different name"), and each alone."""
    args: tuple[str, ...] = ()
    if how.startswith("conftest"):
        pytester.makeconftest('pytest_plugins = ["manualbp.pytest_plugin"]\n')
    elif how == "-p manualbp.pytest_plugin":
        args = ("-p", "manualbp.pytest_plugin", "-p", "manualbp")  # twice over, by both names
    result = declared(*args, autoload=how != "conftest pytest_plugins, no autoload")
    assert "already registered" not in result.stderr.str()
    result.assert_outcomes(passed=1)


def test_the_module_name_alone_loads_it(declared):
    declared("-p", "manualbp.pytest_plugin", autoload=False).assert_outcomes(passed=1)


@pytest.mark.skipif(
    _installed_entry_points() != _declared_entry_points(),
    reason="the installed pytest11 entry points are not pyproject.toml's (reinstall: pip install -e .)",
)
def test_with_the_installed_entry_point_autoloaded(pytester, monkeypatch):
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    pytester.makepyfile(test_user=USES_FIXTURE)
    pytester.makeconftest('pytest_plugins = ["manualbp.pytest_plugin"]\n')
    pytester.runpytest("-p", "manualbp.pytest_plugin").assert_outcomes(passed=1)


def test_fixtures_in_a_user_suite(pytester):
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest("-p", "manualbp", "-v")
    n = len(available_devices())
    result.assert_outcomes(passed=2 * n + 1)
    result.stdout.fnmatch_lines(["*test_good?cpu? PASSED*", "*test_broken_is_caught?cpu? PASSED*"])


def test_a_mismatch_fails_the_user_test_with_a_table(pytester):
    pytester.makepyfile(test_user=FAILING_TEST)
    result = pytester.runpytest("-p", "manualbp")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*gradients do not match: 3 of 3 quantities differ*",
            "*quantity*shape*max abs err*max rel err*exact*ok*",
            "*output*4*FAIL*",
            "*grad t*4*FAIL*",
            "*grad^2 t*4*FAIL*",
        ]
    )


def test_devices_option(pytester):
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest("-p", "manualbp", "--manualbp-devices=cpu")
    result.assert_outcomes(passed=3)
    bad = pytester.runpytest("-p", "manualbp", "--manualbp-devices=tpu")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(["*--manualbp-devices: expected devices from cpu*got 'tpu'*"])


def test_loaded_by_its_entry_point(pytester, monkeypatch):
    """Without -p pytest finds the plugin through the pytest11 entry point, as in a user's project; with
    autoloading disabled, ``-p manualbp`` (the entry point's name) loads it, and without it the fixture is missing."""
    pytester.makepyfile(test_user=USES_FIXTURE)
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    pytester.runpytest().assert_outcomes(passed=1)
    pytester.runpytest("-p", "no:manualbp").assert_outcomes(errors=1)  # disabled by the entry point's name
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.runpytest("-p", "manualbp").assert_outcomes(passed=1)
    missing = pytester.runpytest()
    missing.assert_outcomes(errors=1)
    missing.stdout.fnmatch_lines(["*fixture 'manualbp_verify' not found*"])


@pytest.mark.parametrize("flag", ["--help"])
def test_option_is_documented(pytester, flag):
    result = pytester.runpytest("-p", "manualbp", flag)
    result.stdout.fnmatch_lines(["*manualbp gradient checks*", "*--manualbp-devices=*"])


@pytest.mark.parametrize("how", ["fixture", "import"])
def test_a_failing_assert_shows_the_message_not_the_helpers_source(pytester, how):
    call = (
        "manualbp_verify.assert_gradients_match"
        if how == "fixture"
        else "__import__('manualbp.testing').testing.assert_gradients_match"
    )
    pytester.makepyfile(test_user=FAILING_TEST.replace("manualbp_verify.assert_gradients_match", call))
    result = pytester.runpytest("-p", "manualbp")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "gradients do not match" in out and "test_user.py:5: AssertionError" in out  # at the user's line
    assert "compare_callables(" not in out and "raise AssertionError" not in out and "testing.py" not in out
