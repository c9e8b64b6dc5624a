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

__all__ = [
    "HighwayConfig",
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
