"""Old import path of :mod:`hf_hwbp.examples.comparison` (the example scripts' ``--compare_backprop``), kept working."""

from .examples.comparison import (
    RunResult,
    StepTimer,
    compare_with_backprop,
    default_comparison_dir,
    result_of,
    run_label,
    train_and_evaluate,
    write_comparison,
)

__all__ = [
    "RunResult",
    "StepTimer",
    "compare_with_backprop",
    "default_comparison_dir",
    "result_of",
    "run_label",
    "train_and_evaluate",
    "write_comparison",
]
