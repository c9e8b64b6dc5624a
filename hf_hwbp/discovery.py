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
structure misleads these rules have an entry in the model-family registry (``hf_hwbp.model_patches``: ALBERT's
shared layer groups, the HF ResNet's stages; Reformer, refused), which is read first.
"""

from __future__ import annotations

import contextlib
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
        repeats: how many times one forward runs the layers in a row, each pass on the output of the one before
            (ALBERT's layer groups shared across depths): the stack's depth is ``repeats * len(layers)`` blocks.
            A pass beyond it is followed too (the patch counts the passes it sees).
    """

    path: str
    layers: tuple[nn.Module, ...]
    residual_gate: Callable[[Tensor], Tensor] | None = None
    repeats: int = 1

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        times = f", run {self.repeats} times" if self.repeats > 1 else ""
        return f"Stack({self.path!r}, {len(self.layers)} layers of {type(self.layers[0]).__name__}{times})"


def find_stacks(model: nn.Module) -> list[Stack]:
    """The residual stacks of a transformers model, in the order its forward runs them.

    Raises ValueError when there is none, naming ``layers=`` for stacks that discovery cannot see.
    """
    from .model_patches import family_of, residual_gate

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = family_of(model_type)
    _refuse_family(model)
    finder = None if family is None else family.find_stacks
    found = [(path, tuple(layers), *more) for path, layers, *more in finder(model)] if finder else _discover(model)
    stacks = [Stack(path, layers, residual_gate(layers, model), *more) for path, layers, *more in found]
    if not stacks:
        raise UnsupportedModelError(
            f"Highway-BP found no residual stack in {type(model).__name__} (model_type={model_type!r}): no "
            "nn.ModuleList of transformers layers whose length is a layer count of the config. Pass the stack "
            "yourself: patch_model(model, k, layers=<nn.ModuleList of blocks h -> h + g(h)>)."
        )
    check_stacks(model, stacks)
    return stacks


def _refuse_family(model: nn.Module) -> None:
    """A model family that cannot take Highway-BP (Reformer's reversible layers) is refused, found or given."""
    from .model_patches import family_of

    family = family_of(getattr(getattr(model, "config", None), "model_type", None))
    if family is not None and family.refusal is not None:
        raise UnsupportedModelError(f"Highway-BP cannot train {type(model).__name__}: {family.refusal}")


def stacks_from_layers(model: nn.Module, layers) -> list[Stack]:
    """Stacks given by the user: one ``nn.ModuleList`` / ``nn.Sequential``, or a list of them (in forward order)."""
    _refuse_family(model)  # layers= does not make reversible layers recordable
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
    return ", ".join(
        f"{s.path} ({len(s)} x {type(s.layers[0]).__name__}{f', {s.repeats} passes' if s.repeats > 1 else ''})"
        for s in stacks
    )


def _layer_counts(model: nn.Module) -> set[int]:
    """Every positive int whose name speaks of layers, depth or blocks in the configs of the model and its
    submodels, and the layer counts a config computes (Nemotron-H's is the length of its layer pattern)."""
    counts: set[int] = set()

    def add(value) -> None:
        for count in value if isinstance(value, (list, tuple)) else [value]:  # Swin's depths: per stage
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                counts.add(count)

    def visit(values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                visit(value)
            elif isinstance(key, str) and re.search(r"layer|depth|block", key):
                add(value)

    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")}
    for config in configs.values():
        visit(config.to_dict())
        for name in ("num_hidden_layers", "num_layers", "n_layer"):  # properties are not in to_dict()
            with contextlib.suppress(Exception):
                add(getattr(config, name, None))
    return counts


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_LISTS = (nn.ModuleList, nn.Sequential)


def _is_transformers_layer(layer: nn.Module) -> bool:
    return GradientCheckpointingLayer is not None and isinstance(layer, GradientCheckpointingLayer)


def _changes_shape(layer: nn.Module) -> bool:
    """A layer that convolves with a stride as its own operation (an audio feature encoder's conv layers, a patch
    embedding): its output cannot have its input's shape. (A convolution that changes the channel count says
    nothing: a bottleneck layer widens and narrows its state inside, Autoformer's decoder layers project their trend
    side output.)"""
    return any(
        isinstance(child, nn.modules.conv._ConvNd) and any(stride != 1 for stride in child.stride)
        for child in layer.children()
    )


def _signature(layer: nn.Module) -> dict[str, tuple]:
    """The shapes of a layer's parameters and the strides of its convolutions, by name."""
    signature = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    for name, module in layer.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            signature[f"{name}.stride"] = tuple(module.stride)
    return signature


def _entry_layers(layers: Sequence[nn.Module]) -> int:
    """How many leading layers of a list are not residual blocks of the rest's form: the first layer of a
    down-sampling stage (BiT, RegNet, Hiera), whose parameters have another width or whose convolutions another
    stride than the same names in the layers after it, or that has a convolution where they have nothing to train
    (a projection shortcut where they have the identity). They stay outside the stack (ordinary backprop), as the
    down-sampling between Swin's stages does. Only before layers that all share one form: the layers of a hybrid
    stack (Nemotron-H's Mamba, attention and MLP blocks) differ from each other and all belong to it."""
    signatures = [_signature(layer) for layer in layers]
    last = signatures[-1]
    trainable = {name for name, child in layers[-1].named_children() if any(True for _ in child.parameters())}
    entry = 0
    while entry < len(layers) - 1 and all(signature == last for signature in signatures[entry + 1 :]):
        own = signatures[entry]
        differs = any(last[name] != value for name, value in own.items() if name in last)
        projects = any(
            name.endswith(".stride") and name.partition(".")[0] not in trainable for name in own if name not in last
        )
        if not (differs or projects):
            break
        entry += 1
    return entry


def _discover(model: nn.Module) -> list[tuple[str, tuple[nn.Module, ...]]]:
    counts = _layer_counts(model)
    lists = []
    for name, module in model.named_modules():
        if not isinstance(module, _LISTS) or len(module) == 0:
            continue
        layers = list(module)
        if any(isinstance(x, _CONTAINERS) for x in layers) or _changes_shape(layers[-1]):
            continue  # a list of lists, or layers that change the shape (a stage's first layer may: see below)
        if all(_is_transformers_layer(x) for x in layers):
            lists.append((name, module, True))  # transformers' layers: the structure says it, whatever the config
        elif (
            len({type(x) for x in layers}) == 1
            and not type(layers[0]).__module__.startswith("torch.")
            and len(layers) in counts
        ):
            lists.append((name, module, False))  # other lists of one layer class: their length is a layer count
    lists = _without_per_operation_lists(lists)
    names = [n for n, m, _ in lists if len({type(x) for x in m}) == 1]

    def outermost(candidates) -> list[tuple[str, tuple[nn.Module, ...]]]:
        found: list[tuple[str, tuple[nn.Module, ...]]] = []
        for name, module in candidates:
            if any(name.startswith(path.partition("[")[0] + ".") for path, _ in found):
                continue
            # Stages: every layer of the list holds a candidate list of its own; those inner lists are the stacks.
            if all(any(n.startswith(f"{name}.{i}.") for n in names) for i in range(len(module))):
                continue
            layers = tuple(module)
            start = _entry_layers(layers)
            found.append((f"{name}[{start}:]" if start else name, layers[start:]))
        return found

    stacks = outermost((n, m) for n, m, marked in lists if marked)
    if stacks:
        return stacks
    # Models without transformers' layer base class: lists of one repeated layer class.
    return outermost((n, m) for n, m, marked in lists if len({type(x) for x in m}) == 1)


def _without_per_operation_lists(lists: list) -> list:
    """Per-operation lists: one layer split over several sibling lists of one length (XLM's ``attentions``,
    ``ffns``, ...), which hold different classes. Sibling lists of one class are stages, each a stack (PVT's and
    PoolFormer's blocks); beside transformers' layers, a sibling list of another class is a per-layer head
    (a detection decoder's box heads), and the layers stay a stack."""
    groups: dict[tuple[str, int], list] = {}
    for item in lists:
        groups.setdefault((item[0].rpartition(".")[0], len(item[1])), []).append(item)
    kept = []
    for group in groups.values():
        classes = {type(x) for _, module, _ in group for x in module}
        if len(group) == 1 or len(classes) == 1:
            kept.extend(group)
        else:
            kept.extend(item for item in group if item[2])
    return [item for item in lists if item in kept]
