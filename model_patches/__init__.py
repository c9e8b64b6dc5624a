"""What Highway-BP knows about model families, keyed by ``config.model_type``: the model-family registry.

Most transformers models need nothing here: their residual stack is found from their structure
(``hf_hwbp.discovery``) and their layers are ``h + g(h)``. A family whose structure misleads discovery, whose layers
are ``act(h + g(h))``, that Highway-BP refuses, or that layer-parallel training can cut into stages has one
``ModelFamily`` entry (``registry.py``), in its own module here, listed in ``BUILTIN_FAMILIES`` below. Discovery,
the residual gates (``gates.py``), the refusals and ``hf_hwbp.parallel.arch`` read the registry; so does a family
added at run time with ``register_family``.
"""

from __future__ import annotations

from . import albert, bit, gpt2, llama, reformer, regnet, resnet, vit
from .albert import albert_stacks
from .gates import relu_residual_gate, residual_gate
from .registry import (
    ModelFamily,
    StackFinder,
    StageRecipeEntry,
    families,
    family_of,
    post_activation_layers,
    refusal,
    register_family,
    stack_finder,
    stage_recipe,
    stage_recipes,
    unregister_family,
)
from .resnet import resnet_stacks
from .tested import TESTED_MODEL_TYPES, supported_model_types

# One line per family (its module holds the whole entry). The order is the order of the stage recipes in
# ``hf_hwbp.parallel.arch.supported_models()``.
BUILTIN_FAMILIES: tuple[ModelFamily, ...] = (
    gpt2.FAMILY,
    llama.FAMILY,
    vit.FAMILY,
    albert.FAMILY,
    resnet.FAMILY,
    regnet.FAMILY,
    bit.FAMILY,
    reformer.FAMILY,
)
for _family in BUILTIN_FAMILIES:
    register_family(_family)
del _family

__all__ = [
    "BUILTIN_FAMILIES",
    "ModelFamily",
    "StackFinder",
    "StageRecipeEntry",
    "TESTED_MODEL_TYPES",
    "albert_stacks",
    "families",
    "family_of",
    "post_activation_layers",
    "refusal",
    "register_family",
    "relu_residual_gate",
    "residual_gate",
    "resnet_stacks",
    "stack_finder",
    "stage_recipe",
    "stage_recipes",
    "supported_model_types",
    "unregister_family",
]
