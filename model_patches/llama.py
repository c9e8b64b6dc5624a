"""The Llama family of decoders (Llama, Mistral, Qwen2, Qwen3): discovery finds their stack (``model.layers``); the
family's entry holds the stage recipes of their causal LMs for layer-parallel training, read off
``LlamaModel.forward`` and the Llama-shaped decoders' (the rotary ``position_embeddings`` computed on every stage;
the attention mask kind of each layer as the model's own forward chooses it)."""

from __future__ import annotations

from collections.abc import Callable

from .recipes import (
    CAUSAL,
    SLIDING,
    StageRecipe,
    causal_lm_loss,
    count_shifted_tokens,
    lm_logits,
    token_stream_shape,
)
from .registry import ModelFamily, StageRecipeEntry


def _llama_family_recipe(name: str, mask_kinds: Callable[[object], list[str]]) -> StageRecipe:
    return StageRecipe(
        name=name,
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
        logits=lm_logits,
        loss=causal_lm_loss,
        count_items=count_shifted_tokens,
        activation_shape=token_stream_shape,
        mask_kinds=mask_kinds,
    )


LLAMA_RECIPE = _llama_family_recipe("Llama", lambda config: [CAUSAL] * config.num_hidden_layers)
# MistralModel.forward: one sliding-window mask for every layer when config.sliding_window is set
MISTRAL_RECIPE = _llama_family_recipe(
    "Mistral", lambda config: [CAUSAL if config.sliding_window is None else SLIDING] * config.num_hidden_layers
)
# Qwen2Model.forward / Qwen3Model.forward: the mask of config.layer_types[i] for layer i
QWEN_RECIPE = _llama_family_recipe("Qwen", lambda config: list(config.layer_types[: config.num_hidden_layers]))

FAMILY = ModelFamily(
    name="Llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    stage_recipes={
        "llama": StageRecipeEntry("LlamaForCausalLM", LLAMA_RECIPE),
        "mistral": StageRecipeEntry("MistralForCausalLM", MISTRAL_RECIPE),
        "qwen2": StageRecipeEntry("Qwen2ForCausalLM", QWEN_RECIPE),
        "qwen3": StageRecipeEntry("Qwen3ForCausalLM", QWEN_RECIPE),
    },
)
