"""hf_hwbp: Highway backpropagation (Fagnou et al., ICLR 2025) for Hugging Face Transformers."""

from .api import (
    exact_backprop,
    get_highway_config,
    highway_state,
    is_patched,
    last_highway_iterations,
    patch_model,
    set_highway_config,
    set_highway_k,
    unpatch_model,
    unwrap_model,
)
from .config import HighwayConfig
from .engine import HighwayResult, highway_backward, highway_iterations

__version__ = "0.1.0"

# The trainer pulls in transformers.Trainer (seconds to import): load it on first use.
_LAZY = {
    "HighwayTrainer": ".trainer",
    "HighwayTrainingArguments": ".trainer",
    "check_lora_targets": ".trainer",
    "build_schedule": ".schedules",
    "SCHEDULE_NAMES": ".schedules",
    "measure_fidelity": ".fidelity",
    "FidelityReport": ".fidelity",
    "HighwayGRU": ".rnn",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FidelityReport",
    "HighwayTrainer",
    "HighwayTrainingArguments",
    "SCHEDULE_NAMES",
    "build_schedule",
    "check_lora_targets",
    "measure_fidelity",
    "HighwayConfig",
    "HighwayGRU",
    "HighwayResult",
    "exact_backprop",
    "get_highway_config",
    "highway_backward",
    "highway_iterations",
    "highway_state",
    "is_patched",
    "last_highway_iterations",
    "patch_model",
    "set_highway_config",
    "set_highway_k",
    "unpatch_model",
    "unwrap_model",
]
