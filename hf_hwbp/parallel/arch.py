"""Per-architecture stage recipes: where the pieces of a causal LM live and how a layer is called.

A recipe is data plus two one-line functions, read off the model's own forward in transformers 5.x
(``GPT2Model.forward``, ``LlamaModel.forward``): the first stage runs the embeddings, every stage builds the
layer side inputs (causal mask, position ids, Llama's rotary ``position_embeddings``) for itself from the
batch shape, the last stage runs the final norm, the LM head and the model's own ``loss_function``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn


@dataclass(frozen=True)
class StageRecipe:
    """How one architecture is cut into stages.

    Attributes:
        name: the family, for messages.
        layers: dotted path of the ``nn.ModuleList`` of residual layers.
        embeddings: role -> dotted path of the modules the first stage runs before the stack.
        head: role -> dotted path of ``norm`` (final norm) and ``lm_head``, run by the last stage.
        shared: role -> dotted path of parameter-free modules every stage keeps (e.g. rotary embeddings).
        embed: ``(embedding modules, input_ids, position_ids) -> h_0``.
        layer_kwargs: ``(shared modules, h, causal_mask, position_ids) -> keyword arguments of every layer``.
    """

    name: str
    layers: str
    embeddings: Mapping[str, str]
    head: Mapping[str, str]
    embed: Callable[[Mapping[str, nn.Module], Tensor, Tensor], Tensor]
    layer_kwargs: Callable[[Mapping[str, nn.Module], Tensor, Tensor | None, Tensor], dict]
    shared: Mapping[str, str] = field(default_factory=dict)


GPT2_RECIPE = StageRecipe(
    name="GPT-2",
    layers="transformer.h",
    embeddings={"wte": "transformer.wte", "wpe": "transformer.wpe", "drop": "transformer.drop"},
    head={"norm": "transformer.ln_f", "lm_head": "lm_head"},
    embed=lambda m, ids, pos: m["drop"](m["wte"](ids) + m["wpe"](pos)),
    layer_kwargs=lambda m, h, mask, pos: {"attention_mask": mask, "position_ids": pos},
)

LLAMA_RECIPE = StageRecipe(
    name="Llama",
    layers="model.layers",
    embeddings={"embed_tokens": "model.embed_tokens"},
    head={"norm": "model.norm", "lm_head": "lm_head"},
    shared={"rotary_emb": "model.rotary_emb"},
    embed=lambda m, ids, pos: m["embed_tokens"](ids),
    layer_kwargs=lambda m, h, mask, pos: {
        "attention_mask": mask,
        "position_ids": pos,
        "position_embeddings": m["rotary_emb"](h, position_ids=pos),
    },
)

RECIPES: dict[str, StageRecipe] = {"gpt2": GPT2_RECIPE, "llama": LLAMA_RECIPE}


def get_module(model: nn.Module, path: str) -> nn.Module:
    module = model
    for attr in path.split("."):
        module = getattr(module, attr, None)
        if module is None:
            raise ValueError(f"{type(model).__name__} has no module at `{path}`.")
    return module


def recipe_for(model: nn.Module) -> StageRecipe:
    """The stage recipe of a supported causal LM (GPT2LMHeadModel, LlamaForCausalLM)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    recipe = RECIPES.get(model_type)
    if recipe is None:
        raise ValueError(
            f"Layer-parallel Highway-BP has no stage recipe for model_type={model_type!r} ({type(model).__name__}). "
            f"Supported: {', '.join(sorted(RECIPES))} causal LMs (GPT2LMHeadModel, LlamaForCausalLM)."
        )
    for path in (recipe.layers, *recipe.embeddings.values(), *recipe.head.values(), *recipe.shared.values()):
        get_module(model, path)  # a bare GPT2Model / LlamaModel has no lm_head: say so now
    return recipe
