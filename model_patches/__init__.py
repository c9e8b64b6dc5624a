"""Architecture adapters: where each supported model keeps its residual stack.

An adapter is data: the attribute paths at which a model of that family (any head) holds the
``nn.ModuleList`` of its residual blocks. The registry is keyed by ``config.model_type``.
"""

from __future__ import annotations

from torch import nn

from .base import StackAdapter
from .gpt2 import GPT2_ADAPTER
from .llama import LLAMA_ADAPTER, LLAMA_FAMILY
from .vit import VIT_ADAPTER

ADAPTERS: dict[str, StackAdapter] = {"gpt2": GPT2_ADAPTER, "vit": VIT_ADAPTER}
ADAPTERS.update({model_type: LLAMA_ADAPTER for model_type in LLAMA_FAMILY})


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def find_stack(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The residual stack of a supported transformers model, and its model_type.

    Raises ValueError naming the supported types and the generic form for custom stacks.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise ValueError(
            f"Highway-BP has no adapter for model_type={model_type!r} ({type(model).__name__}). Supported model "
            f"types: {', '.join(supported_model_types())}. For another residual stack, pass its layers: "
            "patch_model(model, k, layers=<nn.ModuleList of blocks h -> h + g(h)>)."
        )
    return adapter.find(model), model_type


__all__ = ["ADAPTERS", "StackAdapter", "find_stack", "supported_model_types"]
