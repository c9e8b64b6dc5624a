"""ALBERT (AlbertModel and its heads): layer groups shared across depths.

The encoder runs ``num_hidden_layers`` depths with ``num_hidden_groups`` groups of ``inner_group_num`` layers, group
``g`` at the depths ``i`` with ``int(i / (num_hidden_layers / num_hidden_groups)) == g``: a group's layers run
several times in a row, each pass on the output of the one before. Each group is a stack of its layers, run that many
times (``repeats``): Highway-BP runs over the unrolled depth, and the shared parameters' gradient sums over the depths
(docs/algorithm.md). When every group runs once, the groups themselves are the stack.
"""

from __future__ import annotations

from torch import nn

from .registry import ModelFamily


def albert_stacks(model: nn.Module) -> list[tuple]:
    """One stack per layer group, with the passes it runs (``repeats``); the groups as one stack when each runs
    once."""
    for name, module in model.named_modules():
        if not name.endswith("albert_layer_groups") or not isinstance(module, nn.ModuleList):
            continue
        config = model.config
        depths, groups = config.num_hidden_layers, config.num_hidden_groups
        runs = [sum(1 for i in range(depths) if int(i / (depths / groups)) == g) for g in range(groups)]
        if all(run == 1 for run in runs):
            return [(name, list(module))]
        return [
            (f"{name}.{g}.albert_layers", list(group.albert_layers), runs[g])
            for g, group in enumerate(module)
            if runs[g] > 0
        ]
    return []


FAMILY = ModelFamily(name="ALBERT", model_types=("albert",), find_stacks=albert_stacks)
