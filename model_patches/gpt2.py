"""GPT-2 (``model_type="gpt2"``): discovery finds its stack (``transformer.h``); the family's entry holds the stage
recipe of ``GPT2LMHeadModel`` for layer-parallel training, read off ``GPT2Model.forward`` (learned positions added to
the token embeddings, then dropout; ``ln_f`` and the tied ``lm_head`` on the last stage)."""

from __future__ import annotations

from torch import nn

from hf_hwbp.errors import UnsupportedModelError

from .recipes import CAUSAL, StageRecipe, causal_lm_loss, count_shifted_tokens, lm_logits, token_stream_shape
from .registry import ModelFamily, StageRecipeEntry


def _check_gpt2(model: nn.Module) -> None:
    if getattr(model.config, "add_cross_attention", False):
        raise UnsupportedModelError(
            "Layer-parallel GPT-2 with cross-attention (add_cross_attention=True) is not supported."
        )


GPT2_RECIPE = StageRecipe(
    name="GPT-2",
    layers="transformer.h",
    embeddings={"wte": "transformer.wte", "wpe": "transformer.wpe", "drop": "transformer.drop"},
    head={"norm": "transformer.ln_f", "lm_head": "lm_head"},
    embed=lambda m, ids, pos: m["drop"](m["wte"](ids) + m["wpe"](pos)),
    layer_kwargs=lambda m, h, mask, pos: {"attention_mask": mask, "position_ids": pos},
    logits=lm_logits,
    loss=causal_lm_loss,
    count_items=count_shifted_tokens,
    activation_shape=token_stream_shape,
    mask_kinds=lambda config: [CAUSAL] * config.num_hidden_layers,
    check=_check_gpt2,
)

FAMILY = ModelFamily(
    name="GPT-2",
    model_types=("gpt2",),
    stage_recipes={"gpt2": StageRecipeEntry("GPT2LMHeadModel", GPT2_RECIPE)},
)
