"""``python -m hf_hwbp.plan``: will Highway-BP make my training faster? (the planner's command line).

    python -m hf_hwbp.plan --model_type gpt2 --batch_size 8 --seq_len 128
    python -m hf_hwbp.plan --model_name_or_path ./my-llama --ks 0 1 2 --processes 2 --output_dir plan_out

In Python the same planner is ``hf_hwbp.plan(model, example_batch, ...)`` (``hf_hwbp.planner.plan``). This module
is that callable too: importing it (``python -m`` does, so does ``import hf_hwbp.plan``) rebinds the package's
``plan`` attribute to the module, so the module forwards calls to the function and ``hf_hwbp.plan(...)`` means
one thing either way.
"""

from __future__ import annotations

import sys
import types

from .planner import plan as _plan
from .planner.cli import main


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _plan(*args, **kwargs)

    __call__.__doc__ = _plan.__doc__


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
