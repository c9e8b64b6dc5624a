"""How a family's test class becomes three test classes, one per mode (see modes.py)."""

from __future__ import annotations

import unittest

from .modes import MODES


def three_modes(base: type, namespace: dict) -> None:
    """Define ``<base>_unpatched``, ``<base>_k1`` and ``<base>_kL`` in ``namespace`` (a test module's globals):
    ``base`` and a ``unittest.TestCase``, with ``hwbp_mode`` set; conftest.py's autouse fixture patches every model
    the test builds for that mode."""
    for mode in MODES:
        name = f"{base.__name__}_{mode}"
        namespace[name] = type(
            name, (base, unittest.TestCase), {"hwbp_mode": mode, "__module__": namespace["__name__"]}
        )
