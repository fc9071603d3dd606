"""The pytest plugin, exercised the way a user's suite would: through pytester."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from manualbp.verify import available_devices

pytest_plugins = ["pytester"]

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
    with pytest.raises(AssertionError, match="1 of 2 quantities differ"):
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


def test_entry_point_is_registered():
    eps = [ep for ep in entry_points(group="pytest11") if ep.name == "manualbp"]
    assert [ep.value for ep in eps] == ["manualbp.pytest_plugin"]


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
            "*gradients do not match: 2 of 2 quantities differ*",
            "*quantity*shape*max abs err*max rel err*exact*ok*",
            "*output*4*FAIL*",
            "*grad t*4*FAIL*",
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
    pytester.makepyfile(test_user="def test_uses(manualbp_verify):\n    assert manualbp_verify.devices\n")
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    pytester.runpytest().assert_outcomes(passed=1)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.runpytest("-p", "manualbp").assert_outcomes(passed=1)
    missing = pytester.runpytest()
    missing.assert_outcomes(errors=1)
    missing.stdout.fnmatch_lines(["*fixture 'manualbp_verify' not found*"])


@pytest.mark.parametrize("flag", ["--help"])
def test_option_is_documented(pytester, flag):
    result = pytester.runpytest("-p", "manualbp", flag)
    result.stdout.fnmatch_lines(["*manualbp gradient checks*", "*--manualbp-devices=*"])
