"""Where a model keeps its residual stack(s), found from its structure.

A residual stack (docs/algorithm.md) is a list of layers each of which maps the hidden state to one of the same
shape, called once per forward of the model, in order, each on the output of the one before. A transformers 5.x
model runs such blocks from an ``nn.ModuleList`` of ``GradientCheckpointingLayer``s whose length is one of its
config's layer counts (``num_hidden_layers``, ``n_layer``, ``encoder_layers``, an entry of ``depths``, ...). The
candidates are those lists, less what the structure shows is not a stack:

- lists of containers (a ``ModuleList`` of ``ModuleList``s is never called itself);
- per-operation lists: several sibling lists of the same length (XLM's ``attentions``, ``ffns``, ...) split one
  layer over several lists;
- lists whose layers convolve with a stride or change the channel count (an audio model's feature encoder);
- a list whose layers each hold a candidate list (Swin's stages, whose inner blocks are the stacks, the
  down-sampling between stages staying outside, as for ResNet).

Every remaining list that does not sit inside another one is a stack; an encoder-decoder model has two, run one
after the other. The rest of the definition is checked at run time, in the forward (``recorder.py``). Models whose
structure misleads these rules are listed in the ``model_patches`` registry (the HF ResNet; Reformer, refused).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from .errors import UnsupportedModelError

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - transformers < 4.52
    GradientCheckpointingLayer = None


@dataclass(frozen=True, eq=False)
class Stack:
    """One residual stack: layers that feed each other, ``h_i = layers[i](h_{i-1})``.

    Attributes:
        path: where it lives in the model, for messages and ``highway_state(model).stacks``.
        layers: the layers, bottom to top.
        residual_gate: for layers ``act(h + g(h))``, the diagonal of their residual path from a layer's output
            (``a_j = act'(...)`` held fixed, e.g. ``1[output > 0]`` for ReLU); None for ``h + g(h)``.
    """

    path: str
    layers: tuple[nn.Module, ...]
    residual_gate: Callable[[Tensor], Tensor] | None = None

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"Stack({self.path!r}, {len(self.layers)} layers of {type(self.layers[0]).__name__})"


def find_stacks(model: nn.Module) -> list[Stack]:
    """The residual stacks of a transformers model, in the order its forward runs them.

    Raises ValueError when there is none, naming ``layers=`` for stacks that discovery cannot see.
    """
    from .model_patches import REFUSED_MODEL_TYPES, RESIDUAL_GATES, STACK_FINDERS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in REFUSED_MODEL_TYPES:
        reason = REFUSED_MODEL_TYPES[model_type]
        raise UnsupportedModelError(f"Highway-BP cannot train {type(model).__name__}: {reason}")
    finder = STACK_FINDERS.get(model_type)
    if finder is not None:
        gate = RESIDUAL_GATES[model_type](model) if model_type in RESIDUAL_GATES else None
        stacks = [Stack(path, tuple(layers), gate) for path, layers in finder(model)]
    else:
        stacks = _discover(model)
    if not stacks:
        raise UnsupportedModelError(
            f"Highway-BP found no residual stack in {type(model).__name__} (model_type={model_type!r}): no "
            "nn.ModuleList of transformers layers whose length is a layer count of the config. Pass the stack "
            "yourself: patch_model(model, k, layers=<nn.ModuleList of blocks h -> h + g(h)>)."
        )
    check_stacks(model, stacks)
    return stacks


def stacks_from_layers(model: nn.Module, layers) -> list[Stack]:
    """Stacks given by the user: one ``nn.ModuleList`` / ``nn.Sequential``, or a list of them (in forward order)."""
    groups = [layers] if isinstance(layers, (nn.ModuleList, nn.Sequential)) else layers
    if not isinstance(groups, (list, tuple)) or not groups:
        raise TypeError(f"layers must be an nn.ModuleList of residual blocks, got {type(layers).__name__}.")
    for group in groups:
        if not isinstance(group, (nn.ModuleList, nn.Sequential)):
            raise TypeError(
                "layers must be an nn.ModuleList (or nn.Sequential) of residual blocks, or a list of them for "
                f"several stacks; got a {type(layers).__name__} holding {type(group).__name__}."
            )
    names = {id(module): name for name, module in model.named_modules()}
    stacks = [Stack(names.get(id(group), f"layers[{i}]"), tuple(group)) for i, group in enumerate(groups)]
    check_stacks(model, stacks)
    return stacks


def check_stacks(model: nn.Module, stacks: Sequence[Stack]) -> None:
    """Refuse what Highway-BP cannot run: empty stacks, a module twice, a stack spread over several devices."""
    seen: dict[int, str] = {}
    for stack in stacks:
        if not stack.layers:
            raise ValueError(f"Highway-BP needs at least one layer in the stack; {stack.path} is empty.")
        for i, layer in enumerate(stack.layers):
            where = f"{stack.path}[{i}]"
            if id(layer) in seen:
                raise UnsupportedModelError(
                    f"Highway-BP: the same module ({type(layer).__name__}) is both {seen[id(layer)]} and {where}. "
                    "Highway-BP needs blocks that are distinct modules (a layer reused at several depths, as in "
                    "ALBERT, is not a stack of blocks). Pass a stack of distinct layers with layers=, or train "
                    "this model with ordinary backprop (do not patch it)."
                )
            seen[id(layer)] = where
        devices = {p.device for layer in stack.layers for p in layer.parameters()}
        if any(d.type == "meta" for d in devices):
            raise UnsupportedModelError(
                f"Highway-BP: parameters of {stack.path} are on the meta device (not loaded, or offloaded by a "
                "device_map). Load the model's weights on one device before patch_model."
            )
        if len(devices) > 1:
            raise UnsupportedModelError(
                f"Highway-BP: {stack.path} spans several devices ({', '.join(sorted(map(str, devices)))}), e.g. "
                "from device_map='auto'. Highway-BP runs each stack's backward on one device: load the model on "
                "one device (device_map={'': 0}), or split it into stages with hf_hwbp.parallel."
            )


def describe(stacks: Sequence[Stack]) -> str:
    return ", ".join(f"{s.path} ({len(s)} x {type(s.layers[0]).__name__})" for s in stacks)


def _layer_counts(model: nn.Module) -> set[int]:
    """Every positive int whose name speaks of layers or depth in the configs of the model and its submodels."""
    counts: set[int] = set()

    def visit(values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                visit(value)
            elif isinstance(key, str) and re.search(r"layer|depth", key):
                for count in value if isinstance(value, (list, tuple)) else [value]:  # Swin's depths: per stage
                    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                        counts.add(count)

    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")}
    for config in configs.values():
        visit(config.to_dict())
    return counts


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def _changes_shape(layer: nn.Module) -> bool:
    """A layer that convolves with a stride or changes the channel count as its own operation (an audio feature
    encoder's conv layers): its output cannot have its input's shape."""
    for child in layer.children():
        if isinstance(child, nn.modules.conv._ConvNd):
            if child.in_channels != child.out_channels or any(stride != 1 for stride in child.stride):
                return True
    return False


def _discover(model: nn.Module) -> list[Stack]:
    counts = _layer_counts(model)
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and len(module) in counts
        and not any(isinstance(x, _CONTAINERS) or _changes_shape(x) for x in module)
    ]
    # Per-operation lists: a parent holding several candidate lists of one length splits each layer over them.
    parents: dict[tuple[str, int], int] = {}
    for name, module in lists:
        key = (name.rpartition(".")[0], len(module))
        parents[key] = parents.get(key, 0) + 1
    lists = [(n, m) for n, m in lists if parents[(n.rpartition(".")[0], len(m))] == 1]

    # Lists of one repeated layer (T5's per-block `layer` list mixes attention and feed-forward: not a stage's blocks).
    names = [n for n, m in lists if len({type(x) for x in m}) == 1]

    def outermost(candidates):
        found: list[Stack] = []
        for name, module in candidates:
            if any(name.startswith(s.path + ".") for s in found):
                continue
            # Stages: every layer of the list holds a candidate list of its own; those inner lists are the stacks.
            if all(any(n.startswith(f"{name}.{i}.") for n in names) for i in range(len(module))):
                continue
            found.append(Stack(name, tuple(module)))
        return found

    if GradientCheckpointingLayer is not None:
        stacks = outermost((n, m) for n, m in lists if all(isinstance(x, GradientCheckpointingLayer) for x in m))
        if stacks:
            return stacks
    # Models without transformers' layer base class: lists of one repeated layer class.
    return outermost((n, m) for n, m in lists if len({type(x) for x in m}) == 1)
