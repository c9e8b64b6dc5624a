"""hf_hwbp: Highway backpropagation (Fagnou et al., ICLR 2025) for Hugging Face Transformers.

The definition it implements is docs/algorithm.md. Entry points: ``patch_model`` (any training loop),
``HighwayCallback`` (any transformers Trainer), ``HighwayTrainer`` (a Trainer with the callback built in and
gradient-fidelity logging), ``LayerParallelTrainer`` (one pipeline stage per process). Settings: ``HighwayConfig``
(what a patched model's backward reads) and ``HighwayTrainingConfig`` (a training run's: k schedule, ``k="auto"``,
fidelity; JSON and command line).
"""

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
from .errors import HighwayBPError, UnsupportedModelError
from .training_config import HighwayTrainingConfig, UnsupportedTrainingSetupError

__version__ = "0.1.0"

# These pull in transformers' Trainer machinery (seconds to import): load them on first use.
_LAZY = {
    "HighwayCallback": ".callback",
    "add_highway_callback": ".callback",
    "HighwayArguments": ".arguments",
    "HighwayTrainingArguments": ".arguments",
    "HighwayTrainer": ".trainer",
    "LayerParallelTrainer": ".layer_parallel_trainer",
    "check_lora_targets": ".peft_checks",
    "add_highway_section": ".model_card",
    "UnsupportedDistributedSetupError": ".distributed_support",
    "check_distributed_support": ".distributed_support",
    "SCHEDULE_NAMES": ".schedules",
    "measure_fidelity": ".fidelity",
    "FidelityReport": ".fidelity",
    "HighwayGRU": ".rnn",
    "HighwayLSTM": ".rnn",
    "plan": ".planner",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SCHEDULE_NAMES",
    "FidelityReport",
    "HighwayArguments",
    "HighwayBPError",
    "HighwayCallback",
    "HighwayConfig",
    "HighwayGRU",
    "HighwayLSTM",
    "HighwayResult",
    "HighwayTrainer",
    "HighwayTrainingArguments",
    "HighwayTrainingConfig",
    "LayerParallelTrainer",
    "UnsupportedDistributedSetupError",
    "UnsupportedModelError",
    "UnsupportedTrainingSetupError",
    "add_highway_callback",
    "add_highway_section",
    "check_distributed_support",
    "check_lora_targets",
    "exact_backprop",
    "get_highway_config",
    "highway_backward",
    "highway_iterations",
    "highway_state",
    "is_patched",
    "last_highway_iterations",
    "measure_fidelity",
    "patch_model",
    "plan",
    "set_highway_config",
    "set_highway_k",
    "unpatch_model",
    "unwrap_model",
]
