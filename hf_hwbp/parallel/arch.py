"""Per-architecture stage recipes: where the pieces of a model live and how its layers are called.

A recipe (``StageRecipe``) is data plus small functions, read off the model's own forward in transformers 5.x: the
first stage runs the embeddings, every stage builds the layer side inputs (attention masks, position ids, the rotary
``position_embeddings``) for itself from the batch shape, the last stage runs the final norm, the head and the
model's own ``loss_function``. Each recipe belongs to its model family's entry in the model-family registry
(``hf_hwbp.model_patches``: ``gpt2.py``, ``llama.py``, ``vit.py``); this module looks them up (``recipe_for``).
``tests/test_parallel.py`` checks every recipe against the model's own forward.

Supported: causal LMs of the GPT-2 and Llama families (``GPT2LMHeadModel``; ``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``) and ``ViTForImageClassification`` (single-label).
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..model_patches import StageRecipeEntry, stage_recipe, stage_recipes
from ..model_patches.gpt2 import GPT2_RECIPE
from ..model_patches.llama import LLAMA_RECIPE, MISTRAL_RECIPE, QWEN_RECIPE
from ..model_patches.recipes import BIDIRECTIONAL, CAUSAL, SLIDING, StageRecipe
from ..model_patches.vit import VIT_RECIPE


def supported_models() -> list[str]:
    """The model classes layer-parallel training supports."""
    return [entry.model_class for entry in stage_recipes().values()]


def get_module(model: nn.Module, path: str) -> nn.Module:
    module = model
    for attr in path.split("."):
        module = getattr(module, attr, None)
        if module is None:
            raise ValueError(f"{type(model).__name__} has no module at `{path}`.")
    return module


def recipe_for(model: nn.Module) -> StageRecipe:
    """The stage recipe of a supported model (see ``supported_models()``); a ``ValueError`` naming them otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    entry = stage_recipe(model_type)
    supported = ", ".join(supported_models())
    if entry is None:
        raise UnsupportedModelError(
            f"Layer-parallel Highway-BP has no stage recipe for model_type={model_type!r} ({type(model).__name__}). "
            f"Supported: {supported}. Train other models with the single-process or DDP path (no layer_parallel)."
        )
    class_name, recipe = entry
    if all(cls.__name__ != class_name for cls in type(model).__mro__):
        raise UnsupportedModelError(
            f"Layer-parallel Highway-BP cuts {class_name} into stages, not {type(model).__name__} (its head and loss "
            f"differ). Supported: {supported}."
        )
    for path in (recipe.layers, *recipe.embeddings.values(), *recipe.head.values(), *recipe.shared.values()):
        get_module(model, path)
    recipe.check(model)
    return recipe


__all__ = [
    "BIDIRECTIONAL",
    "CAUSAL",
    "GPT2_RECIPE",
    "LLAMA_RECIPE",
    "MISTRAL_RECIPE",
    "QWEN_RECIPE",
    "SLIDING",
    "VIT_RECIPE",
    "StageRecipe",
    "StageRecipeEntry",
    "get_module",
    "recipe_for",
    "supported_models",
]
