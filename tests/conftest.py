"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for one test, restored afterwards. A file that wants it for all its tests
    says ``pytestmark = pytest.mark.usefixtures("float64_default")``; setting the default at import would leak
    into every test file collected after it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(autouse=True)
def highway_engine_at_exact_steps(monkeypatch):
    """The tests check the Highway engine's own exactness at k >= L against autograd, so patches made in a test run
    the engine on exact steps too (users get the model's own backward there: tests/test_exact_steps.py checks that
    default by turning this back on with ``highway_state(model).exact_steps_by_autograd = True``)."""
    from hf_hwbp import patching

    monkeypatch.setattr(patching, "EXACT_STEPS_BY_AUTOGRAD", False)
