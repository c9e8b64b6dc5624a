"""StackAdapter: how to find the residual stack of one architecture."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class StackAdapter:
    """Where an architecture keeps its residual blocks.

    Attributes:
        name: the family, for messages.
        stack_paths: dotted attribute paths tried in order on the model (heads first, bare model last).
    """

    name: str
    stack_paths: tuple[str, ...]

    def find(self, model: nn.Module) -> nn.ModuleList:
        for path in self.stack_paths:
            module = model
            for attr in path.split("."):
                module = getattr(module, attr, None)
                if module is None:
                    break
            if isinstance(module, nn.ModuleList):
                return module
        raise ValueError(
            f"{type(model).__name__} looks like a {self.name} model but none of {list(self.stack_paths)} is an "
            "nn.ModuleList. Pass the stack explicitly: patch_model(model, k, layers=<ModuleList>)."
        )
