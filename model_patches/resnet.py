"""HF ResNet (ResNetModel, ResNetForImageClassification, ResNetBackbone): one stack per stage.

A stage is an ``nn.Sequential`` of residual layers; its first layer usually changes the shape (a strided
convolution and a projection shortcut), so it is not a block of the identity form: it stays outside the stack
and gets ordinary backprop, between the stack of the stage below and the stack of its own stage. The stack of
a stage is its run of layers whose shortcut is the identity.

A ResNet layer is ``relu(h + g(h))``, not ``h + g(h)``: its residual path is ``diag(relu'(h + g(h)))`` with the
forward's values held fixed (``gates.py``; its layer classes are the family's ``post_activation_layers``).
Highway-BP carries the gradient along that masked path.
"""

from __future__ import annotations

from torch import nn

from .registry import ModelFamily


def resnet_stacks(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    stacks = []
    for name, module in model.named_modules():
        if not (name == "stages" or name.endswith(".stages")) or not isinstance(module, nn.ModuleList):
            continue
        for index, stage in enumerate(module):
            layers = list(stage.layers)
            start = len(layers)
            while start > 0 and isinstance(getattr(layers[start - 1], "shortcut", None), nn.Identity):
                start -= 1
            if start < len(layers):
                suffix = f"[{start}:]" if start else ""
                stacks.append((f"{name}.{index}.layers{suffix}", layers[start:]))
    return stacks


FAMILY = ModelFamily(
    name="ResNet",
    model_types=("resnet",),
    find_stacks=resnet_stacks,
    post_activation_layers=frozenset({"ResNetBasicLayer", "ResNetBottleNeckLayer"}),
)
