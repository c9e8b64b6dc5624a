"""The layer-parallel stages build attention masks with transformers' builders, whose signatures moved within
5.x (5.0: ``input_embeds, cache_position, past_key_values``; 5.17: ``inputs_embeds, past_key_values``; 5.24:
``inputs_embeds, cache``). ``call_mask_builder`` must call each as it is spelled, and on the installed
transformers give the mask the model itself builds."""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.masking_utils import create_causal_mask

from hf_hwbp.parallel.stages import call_mask_builder

H = torch.zeros(2, 5, 8)
MASK = torch.ones(2, 5, dtype=torch.long)
POSITIONS = torch.arange(5)[None]


def builder_5_0(config, input_embeds, attention_mask, cache_position, past_key_values, position_ids=None):
    return {"embeds": input_embeds, "cache_position": cache_position, "cache": past_key_values, "pos": position_ids}


def builder_5_17(config, inputs_embeds, attention_mask, past_key_values, position_ids=None, layer_idx=None):
    return {"embeds": inputs_embeds, "cache": past_key_values, "pos": position_ids}


def builder_5_24(config, inputs_embeds, attention_mask, cache, position_ids=None, allow_is_causal_skip=True):
    return {"embeds": inputs_embeds, "cache": cache, "pos": position_ids}


def bidirectional_5_0(config, input_embeds, attention_mask, encoder_hidden_states=None):
    return {"embeds": input_embeds}


def test_each_signature_gets_its_own_keywords():
    for builder in (builder_5_0, builder_5_17, builder_5_24):
        got = call_mask_builder(builder, None, H, MASK, POSITIONS)
        assert got["embeds"] is H and got["cache"] is None and got["pos"] is POSITIONS
    assert torch.equal(call_mask_builder(builder_5_0, None, H, MASK, POSITIONS)["cache_position"], torch.arange(5))
    assert call_mask_builder(bidirectional_5_0, None, H, MASK)["embeds"] is H


def test_installed_builder_gives_the_models_mask():
    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1)
    config._attn_implementation = "eager"
    padded = MASK.clone()
    padded[1, :2] = 0
    ours = call_mask_builder(create_causal_mask, config, H, padded, POSITIONS)
    causal = torch.ones(5, 5).tril().bool()
    allowed = causal[None] & padded.bool()[:, None, :]
    assert ours.shape == (2, 1, 5, 5)
    assert torch.equal(ours[:, 0] == 0, allowed)  # eager masks: 0 where allowed, the dtype's minimum elsewhere
