"""pytest plugin: manualbp's gradient checks for your own test suite.

Loading it, any of these ways (they can be combined; the plugin is registered once, as
``manualbp.pytest_plugin``):

- installed with manualbp, pytest loads it by itself through the ``pytest11`` entry point ``manualbp``
  (``-p no:manualbp`` turns that off);
- with ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` set: ``-p manualbp`` (the entry point's name) or
  ``-p manualbp.pytest_plugin`` (the module's);
- in a conftest: ``pytest_plugins = ["manualbp.pytest_plugin"]``.

Fixtures:

``manualbp_verify``
    The checks: ``assert_gradients_match(fn, reference_fn, *inputs, rtol=None, atol=None, seed=0, order=2,
    **kwargs)`` (outputs, gradients and second-order gradients, see :mod:`manualbp.testing`; raises
    AssertionError with a table of the mismatching quantities), ``compare``, ``trace``,
    ``finite_difference_check`` (from ``manualbp.verify``), ``default_tolerances(dtype)`` and ``devices``,
    the devices available here ("cpu", and "cuda" where a GPU is visible).

    ``check_function(fn, *sample_inputs, **options)`` and ``assert_function_conforms(...)``: the conformance
    suite of a custom autograd.Function (see :func:`manualbp.verify.check_function`), needing no reference.
    ``record()`` and ``assert_intermediates_match(rec, loss, grads)``: your hand-written backward, gradient by
    gradient, against autograd (see :mod:`manualbp.verify.intermediates`).

``manualbp_device``
    Runs the test once per available device (the id is the device name), or per device of
    ``--manualbp-devices=cpu,cuda``.

Example::

    def test_my_sigmoid(manualbp_verify, manualbp_device):
        x = torch.randn(8, 3, dtype=torch.float64, device=manualbp_device, requires_grad=True)
        manualbp_verify.assert_gradients_match(MySigmoid.apply, torch.sigmoid, x)

    def test_my_sigmoid_conforms(manualbp_verify):
        manualbp_verify.assert_function_conforms(MySigmoid, torch.randn(8, 3, dtype=torch.float64, requires_grad=True))
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("manualbp", "manualbp gradient checks")
    group.addoption(
        "--manualbp-devices",
        default=None,
        help="comma-separated devices for the manualbp_device fixture (default: every available device)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--manualbp-devices", default=None):
        _devices(config)  # a bad --manualbp-devices is a usage error before collection


def _available_devices() -> list[str]:
    from .verify import available_devices

    return available_devices()


def _devices(config: pytest.Config) -> list[str]:
    option = config.getoption("--manualbp-devices", default=None)
    if not option:
        return _available_devices()
    wanted = [d.strip() for d in option.split(",") if d.strip()]
    available = _available_devices()
    bad = [d for d in wanted if d not in available]
    if bad or not wanted:
        raise pytest.UsageError(f"--manualbp-devices: expected devices from {', '.join(available)}, got {option!r}")
    return wanted


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "manualbp_device" in metafunc.fixturenames:
        devices = _devices(metafunc.config)
        metafunc.parametrize("manualbp_device", devices, ids=devices)


class ManualbpVerify:
    """What the ``manualbp_verify`` fixture gives a test."""

    def __init__(self, devices: list[str]) -> None:
        from . import verify

        self.devices = devices
        self.compare = verify.compare
        self.trace = verify.trace
        self.finite_difference_check = verify.finite_difference_check
        self.default_tolerances = verify.default_tolerances
        self.check_function = verify.check_function
        self.record = verify.record
        self.assert_intermediates_match = verify.assert_intermediates_match

    def assert_gradients_match(
        self,
        fn: Callable[..., Any],
        reference_fn: Callable[..., Any],
        /,
        *inputs: Any,
        rtol: Optional[float] = None,
        atol: Optional[float] = None,
        seed: int = 0,
        order: int = 2,
        **kwargs: Any,
    ):
        """See :func:`manualbp.testing.assert_gradients_match`."""
        from .testing import assert_gradients_match

        __tracebackhide__ = True
        return assert_gradients_match(fn, reference_fn, *inputs, rtol=rtol, atol=atol, seed=seed, order=order, **kwargs)

    def assert_function_conforms(self, fn: Any, /, *sample_inputs: Any, **options: Any):
        """See :func:`manualbp.testing.assert_function_conforms`: one line per custom Function in a test."""
        from .testing import assert_function_conforms

        __tracebackhide__ = True
        return assert_function_conforms(fn, *sample_inputs, **options)

    def __repr__(self) -> str:
        return f"ManualbpVerify(devices={self.devices})"


@pytest.fixture
def manualbp_verify(request: pytest.FixtureRequest) -> ManualbpVerify:
    """manualbp's gradient checks and the available devices (see the module docstring)."""
    return ManualbpVerify(_devices(request.config))


@pytest.fixture
def manualbp_device(request: pytest.FixtureRequest) -> str:
    """One available device per test run (parametrized by the plugin)."""
    return getattr(request, "param", "cpu")
