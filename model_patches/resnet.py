"""HF ResNet (ResNetModel, ResNetForImageClassification, ResNetBackbone): one stack per stage.

A stage is an ``nn.Sequential`` of residual layers; its first layer usually changes the shape (a strided
convolution and a projection shortcut), so it is not a block of the identity form: it stays outside the stack
and gets ordinary backprop, between the stack of the stage below and the stack of its own stage. The stack of
a stage is its run of layers whose shortcut is the identity.

A ResNet layer is ``relu(h + g(h))``, not ``h + g(h)``: its residual path is ``diag(relu'(h + g(h)))`` with the
forward's values held fixed, i.e. ``1[output > 0]`` (docs/algorithm.md, residual paths that are not the
identity). Highway-BP carries the gradient along that masked path.
"""

from __future__ import annotations

from torch import Tensor, nn


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


def relu_residual_gate(output: Tensor) -> Tensor:
    """relu'(h + g(h)) from the layer's output relu(h + g(h)): 1 where it is positive, 0 elsewhere."""
    return (output > 0).to(output.dtype)


def resnet_residual_gate(model: nn.Module):
    activation = getattr(getattr(model, "config", None), "hidden_act", "relu")
    if activation != "relu":
        raise ValueError(
            f"Highway-BP knows the residual path of ResNet layers act(h + g(h)) for act = relu only; this model "
            f"uses hidden_act={activation!r}. Train it unpatched, or pass the stages yourself with "
            "patch_model(model, k, layers=[...]) to treat the layers as h + g(h) (exact at k >= L only)."
        )
    return relu_residual_gate
