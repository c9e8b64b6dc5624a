"""Every entry of refusals.py names a test and a family of this suite: a renamed test or family cannot leave a
stale entry behind (nor silently stop applying one)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

from .refusals import NOT_EXACT_AT_K1, NOT_RUN, REFUSALS
from .vendor.test_modeling_common import ModelTesterMixin
from .vendor.test_training_mixin import TrainingTesterMixin


def _families() -> dict[str, type]:
    families = {}
    for path in Path(__file__).parent.glob("test_*.py"):
        module = importlib.import_module(f"{__package__}.{path.stem}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            mode = getattr(cls, "hwbp_mode", None)
            if mode is not None and cls.__module__ == module.__name__:
                families[cls.__name__[: -len(mode) - 1]] = cls
    return families


@pytest.mark.parametrize(
    "key",
    [*REFUSALS, *NOT_EXACT_AT_K1, *NOT_RUN],
)
def test_entry_names_a_test_of_the_suite(key):
    family, _, test = key.rpartition("::")
    families = _families()
    assert set(families) >= {"GPT2", "Llama", "Bert", "T5", "ViT"}, families
    if family:
        assert family in families, f"{key}: no family {family!r} in {sorted(families)}"
        assert hasattr(families[family], test), f"{key}: {family} has no {test}"
    else:
        assert hasattr(ModelTesterMixin, test) or hasattr(TrainingTesterMixin, test), f"{key}: no such test"
