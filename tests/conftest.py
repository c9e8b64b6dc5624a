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
