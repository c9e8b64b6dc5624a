"""transformers' own model tests as a test of hf_hwbp (see docs/transformers_tests.md).

Every family's test class runs three ways (modes.py): unpatched, patched at k = 1 and patched at k = L, the patch
applied to every model a test builds, right after it is built. refusals.py lists the tests that may differ, with
the reason. The whole suite runs with ``python -m pytest tests/transformers_suite --transformers-suite``; without
the option only the default subset runs (DEFAULT_CLASS less NOT_IN_DEFAULT, a minute or so), the rest is
skipped with a reason naming that command.
"""

from __future__ import annotations

import contextlib

import pytest

from hf_hwbp import HighwayBPError

from .modes import patch_on_build
from .refusals import NOT_EXACT_AT_K1, NOT_RUN, REFUSALS

collect_ignore = ["vendor"]  # transformers' mixins: test data, no tests of their own

COMMAND = "python -m pytest tests/transformers_suite --transformers-suite"
# The default subset (without --transformers-suite): one family at k = 1, every test of its class but the 300-step
# overfit (half a minute unpatched, two minutes patched on a loaded 2-core machine).
DEFAULT_CLASS = "GPT2_k1"
NOT_IN_DEFAULT = ("test_training_overfit",)


# markers transformers' testing_utils and the vendored mixins put on tests (registered to keep the run quiet)
TRANSFORMERS_MARKERS = (
    "accelerate_tests",
    "flash_attn_test",
    "flash_attn_3_test",
    "flash_attn_4_test",
    "is_training_test",
    "slow",
    "torch_compile_test",
)


def pytest_configure(config):
    for marker in TRANSFORMERS_MARKERS:
        config.addinivalue_line("markers", f"{marker}: transformers' marker (tests/transformers_suite)")
    config.addinivalue_line("markers", "hwbp_no_subtests: a refusal's subtests raise through (transformers_suite)")


def _lookup(table: dict[str, str], family: str, test: str) -> str | None:
    return table.get(f"{family}::{test}", table.get(test))


def pytest_collection_modifyitems(config, items):
    run_all = config.getoption("--transformers-suite", default=False)
    for item in items:
        cls = getattr(item, "cls", None)
        mode = getattr(cls, "hwbp_mode", None)
        if mode is None:
            continue
        family = cls.__name__.rsplit("_", 1)[0]
        test = item.originalname if hasattr(item, "originalname") else item.name
        test = test.split("[")[0]
        if not run_all and (cls.__name__ != DEFAULT_CLASS or test in NOT_IN_DEFAULT):
            item.add_marker(pytest.mark.skip(reason=f"transformers' model tests: run them all with `{COMMAND}`"))
            continue
        reason = _lookup(NOT_RUN, family, test)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"not run in any mode: {reason}"))
            continue
        if mode == "unpatched":
            continue
        reason = _lookup(REFUSALS, family, test)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(raises=HighwayBPError, strict=True, reason=f"refused: {reason}"))
            item.add_marker(pytest.mark.hwbp_no_subtests)
            continue
        reason = _lookup(NOT_EXACT_AT_K1, family, test)
        if reason is not None and mode == "k1":
            item.add_marker(pytest.mark.xfail(raises=AssertionError, strict=True, reason=f"k = 1: {reason}"))


@pytest.fixture(autouse=True)
def _hwbp_mode(request):
    """Patch every transformers model the test builds for its class's mode (modes.py)."""
    mode = getattr(request.cls, "hwbp_mode", None)
    if mode is None:
        yield
        return
    if request.node.get_closest_marker("hwbp_no_subtests") is not None:
        # unittest's subTest would catch the refusal and report it as a failed subtest: let it reach the xfail
        request.instance.subTest = lambda *args, **kwargs: contextlib.nullcontext()
    with patch_on_build(mode):
        yield
