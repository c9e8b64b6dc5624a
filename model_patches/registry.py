"""The model-family registry: what Highway-BP knows about a family of models, one entry per family.

Most transformers models need no entry: discovery (``hf_hwbp.discovery``) finds their residual stack from their
structure, and their layers are ``h + g(h)``. A family gets an entry when something about it cannot be read off the
structure: where its stacks are (ALBERT's shared layer groups, the HF ResNet's stages), layers whose residual path
is gated (``act(h + g(h))``), a refusal (Reformer), or how layer-parallel training cuts it into stages (a stage
recipe). Everything about one family sits in its ``ModelFamily``, in one module of this package; the lookups below
are what discovery, the residual gates, the refusals and ``hf_hwbp.parallel.arch`` read. Adding a family is adding
one entry: a module with its ``ModelFamily`` and one line in ``BUILTIN_FAMILIES`` (``__init__.py``), or
``register_family(family)`` at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple

from torch import nn

if TYPE_CHECKING:
    from .recipes import StageRecipe

# ``model -> [(path, layers), ...]`` or ``[(path, layers, repeats), ...]``: the stacks in the order the forward runs
# them (``repeats``: passes of the layers in a row within one forward; see ``hf_hwbp.discovery.Stack``).
StackFinder = Callable[[nn.Module], list[tuple]]


class StageRecipeEntry(NamedTuple):
    """A stage recipe and the model class (head) it reproduces, for one model type."""

    model_class: str
    recipe: StageRecipe


@dataclass(frozen=True, eq=False)  # an entry is itself: compared and hashed by identity
class ModelFamily:
    """Everything Highway-BP knows about one family of models beyond what discovery reads off their structure.

    Attributes:
        name: the family, for messages and docs.
        model_types: the ``config.model_type`` values it covers (each in one family only).
        find_stacks: replaces discovery for these model types (their structure misleads it); None: discovery.
            It returns ``(path, layers)`` or ``(path, layers, repeats)`` per stack, in forward order; ``repeats``
            is how many times one forward runs the layers in a row (ALBERT's groups shared across depths).
        post_activation_layers: class names of its layers that are ``act(h + g(h))`` and keep ``act`` in
            ``layer.activation`` (residual path ``diag(act'(...))``, ``gates.residual_gate``). Known by class
            wherever the layer sits (a BiT backbone inside another model), not only under these model types.
        refusal: why Highway-BP refuses these model types at ``patch_model``, and the way out; None: not refused.
        stage_recipes: model type -> how layer-parallel training cuts that model's head class into stages.
    """

    name: str
    model_types: tuple[str, ...]
    find_stacks: StackFinder | None = None
    post_activation_layers: frozenset[str] = frozenset()
    refusal: str | None = None
    stage_recipes: Mapping[str, StageRecipeEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.model_types, str) or not self.model_types:
            raise TypeError(f"ModelFamily {self.name!r}: model_types must be a non-empty tuple of model types.")
        object.__setattr__(self, "model_types", tuple(self.model_types))
        object.__setattr__(self, "post_activation_layers", frozenset(self.post_activation_layers))
        object.__setattr__(self, "stage_recipes", MappingProxyType(dict(self.stage_recipes)))
        if len(set(self.model_types)) != len(self.model_types):
            raise ValueError(f"ModelFamily {self.name!r} names a model type twice: {self.model_types}.")
        stray = sorted(set(self.stage_recipes) - set(self.model_types))
        if stray:
            raise ValueError(f"ModelFamily {self.name!r} has stage recipes for model types it does not cover: {stray}.")
        if self.refusal is not None and (self.find_stacks is not None or self.stage_recipes):
            raise ValueError(f"ModelFamily {self.name!r} is refused: it cannot also have stacks or stage recipes.")
        for model_type, entry in self.stage_recipes.items():
            if not isinstance(entry, StageRecipeEntry):
                raise TypeError(
                    f"ModelFamily {self.name!r}: the stage recipe of {model_type!r} must be a "
                    f"StageRecipeEntry(model_class, recipe), got {type(entry).__name__}."
                )


_FAMILIES: dict[str, ModelFamily] = {}  # name -> family, in registration order
_BY_MODEL_TYPE: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Add ``family`` to the registry (discovery, gates, refusals and stage recipes read it from then on).

    Raises ValueError when its name or one of its model types is already registered (``unregister_family`` first to
    replace an entry)."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"register_family takes a ModelFamily, got {type(family).__name__}.")
    if family.name in _FAMILIES:
        raise ValueError(f"A model family named {family.name!r} is already registered.")
    taken = {t: _BY_MODEL_TYPE[t].name for t in family.model_types if t in _BY_MODEL_TYPE}
    if taken:
        raise ValueError(f"Model family {family.name!r}: model types already registered by another family: {taken}.")
    _FAMILIES[family.name] = family
    for model_type in family.model_types:
        _BY_MODEL_TYPE[model_type] = family
    return family


def unregister_family(name: str) -> ModelFamily:
    """Remove the family registered as ``name`` and return it (KeyError when there is none)."""
    family = _FAMILIES.pop(name)
    for model_type in family.model_types:
        del _BY_MODEL_TYPE[model_type]
    return family


def families() -> tuple[ModelFamily, ...]:
    """The registered families, in registration order."""
    return tuple(_FAMILIES.values())


def family_of(model_type: str | None) -> ModelFamily | None:
    """The family that covers ``model_type`` (None: no family knowledge, discovery reads the structure)."""
    return _BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None


def stack_finder(model_type: str | None) -> StackFinder | None:
    family = family_of(model_type)
    return None if family is None else family.find_stacks


def refusal(model_type: str | None) -> str | None:
    family = family_of(model_type)
    return None if family is None else family.refusal


def post_activation_layers() -> frozenset[str]:
    """Every registered layer class that is ``act(h + g(h))``."""
    return frozenset(name for family in _FAMILIES.values() for name in family.post_activation_layers)


def stage_recipe(model_type: str | None) -> StageRecipeEntry | None:
    family = family_of(model_type)
    return None if family is None else family.stage_recipes.get(model_type)


def stage_recipes() -> dict[str, StageRecipeEntry]:
    """model type -> its stage recipe entry, for every model type layer-parallel training supports."""
    return {t: entry for family in _FAMILIES.values() for t, entry in family.stage_recipes.items()}


__all__ = [
    "ModelFamily",
    "StackFinder",
    "StageRecipeEntry",
    "families",
    "family_of",
    "post_activation_layers",
    "refusal",
    "register_family",
    "stack_finder",
    "stage_recipe",
    "stage_recipes",
    "unregister_family",
]
