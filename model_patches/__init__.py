"""Models whose structure misleads stack discovery (``hf_hwbp.discovery``), keyed by ``config.model_type``.

Most transformers models need nothing here: their residual stack is found from their structure. An entry is a
function ``model -> [(path, layers), ...]`` returning the stacks in the order the forward runs them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .resnet import resnet_stacks

StackFinder = Callable[[nn.Module], list[tuple[str, list[nn.Module]]]]

STACK_FINDERS: dict[str, StackFinder] = {"resnet": resnet_stacks}


def registered_model_types() -> list[str]:
    return sorted(STACK_FINDERS)


__all__ = ["STACK_FINDERS", "StackFinder", "registered_model_types"]
