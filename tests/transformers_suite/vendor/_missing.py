"""Empty stand-ins for the two test mixins that ``test_modeling_common.py`` imports and transformers' source
distribution (the sdist of transformers 5.25.0 on PyPI) does not ship: ``tests/exporters/test_export.py`` and
``tests/generation/test_utils.py``. They carry no tests; ``ModelTesterMixin`` only inherits from the first and checks
subclassing of the second (``test_generation_tester_mixin_inheritance``, skipped in this suite: see refusals.py).
"""


class ExportTesterMixin:
    """Stand-in: transformers' torch.export tests are not in its source distribution."""


class GenerationTesterMixin:
    """Stand-in: transformers' generation tests are not in its source distribution."""
