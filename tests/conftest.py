"""Fixtures shared by several test files.

The tests run the package with its defaults, as users get it. One default is changed on request only: a step whose k
reaches the number of blocks runs the model's own backward (``HighwayPatch.exact_steps_by_autograd``), so a test that
checks the Highway *engine's* exactness at k >= L against autograd asks for the engine there with the fixture
``engine_at_exact_steps`` (``@pytest.mark.usefixtures("engine_at_exact_steps")``, or a file's ``pytestmark``).
"""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    """``--transformers-suite``: run all of transformers' model tests on patched models (tests/transformers_suite;
    without it only a small subset runs)."""
    parser.addoption(
        "--transformers-suite",
        action="store_true",
        help="run all of transformers' own model tests, unpatched and patched (tests/transformers_suite)",
    )


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for one test, restored afterwards. A file that wants it for all its tests
    says ``pytestmark = pytest.mark.usefixtures("float64_default")``; setting the default at import would leak
    into every test file collected after it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def engine_at_exact_steps(monkeypatch):
    """Patches made in the test run the Highway engine on exact steps too (users get the model's own backward there,
    the same gradient at backprop's cost), so that k >= L checks the engine's own exactness against autograd. Asked
    for with ``@pytest.mark.usefixtures("engine_at_exact_steps")`` (or a file's ``pytestmark``)."""
    from hf_hwbp import patching

    monkeypatch.setattr(patching, "EXACT_STEPS_BY_AUTOGRAD", False)
