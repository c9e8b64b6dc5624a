#!/usr/bin/env python
"""Survey: ``patch_model(model, k)`` without ``layers=``, as a new user would, on about a hundred transformers model
types (tiny random configs, float64 where the kernels allow it, train mode, dropout as shipped with the same seed in
every pass). Not part of pytest: it prints, and writes, a markdown table of what happens on each.

For each case: unpatched autograd gradients; ``patch_model``; then k = L against autograd and k = 1, 2 against the
independent reference (tests/reference.py). The verdicts:

- exact: k = L equals autograd and k = 1, 2 equal the reference (relative errors in the table). The Highway engine
  runs at k = L too (as in the test suite; users get the model's own backward there unless the step is not exact).
- refused: an error raised before any ``.grad`` exists (at ``patch_model`` or in the forward); its first line shown.
- crash after grad: an error raised after some ``.grad`` was written.
- no-op: the backward ran but ``last_highway_iterations`` is None (Highway-BP never applied).
- wrong at L / wrong below L: a gradient that differs from autograd / from the reference.
- reference failed: the reference itself could not run the case (the survey's limit, not the library's).
- not built: the tiny config or its input did not run unpatched (the survey's limit).

    python tests/zoo_survey.py                         # every case, table on stdout
    python tests/zoo_survey.py --out results.md        # and written to a file
    python tests/zoo_survey.py swin t5_attn_loss       # only these cases (names or model types)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import reference_highway_grads, residual_gates  # noqa: E402
from tiny_models import _AUDIO, _ENC, _GQA, _MOE, _S2S, _T5, _TEXT, _VISION, VOCAB, ZOO, ZOO_LAYERS, ZooEntry  # noqa: E402
from zoo_generic import generic_case, model_types  # noqa: E402

import hf_hwbp  # noqa: E402

L = ZOO_LAYERS
F32 = torch.float32


def E(model_type, model_class, config, task, **kw) -> ZooEntry:
    return ZooEntry(model_type, model_class, config, task, **kw)


# Cases beyond the tested zoo (the zoo's own entries, tests/tiny_models.py, are surveyed too, under their names).
CASES: dict[str, ZooEntry] = {
    # ----- decoders
    "bloom": E("bloom", "BloomForCausalLM", dict(_TEXT, n_layer=L, n_head=4), "lm"),
    "nemotron": E("nemotron", "NemotronForCausalLM", dict(_GQA, head_dim=8), "lm"),
    "cohere2": E("cohere2", "Cohere2ForCausalLM", dict(_GQA, sliding_window=4), "lm"),
    "glm4": E("glm4", "Glm4ForCausalLM", dict(_GQA, head_dim=8), "lm"),
    "helium": E("helium", "HeliumForCausalLM", dict(_GQA, head_dim=8), "lm"),
    "smollm3": E("smollm3", "SmolLM3ForCausalLM", _GQA, "lm"),
    "arcee": E("arcee", "ArceeForCausalLM", _GQA, "lm"),
    "seed_oss": E("seed_oss", "SeedOssForCausalLM", dict(_GQA, head_dim=8), "lm"),
    "ernie4_5": E("ernie4_5", "Ernie4_5ForCausalLM", dict(_GQA, head_dim=8), "lm"),
    "exaone4": E("exaone4", "Exaone4ForCausalLM", dict(_GQA, head_dim=8, sliding_window=4), "lm"),
    "granitemoe": E("granitemoe", "GraniteMoeForCausalLM", _MOE, "lm", dtype=F32),
    "phimoe": E("phimoe", "PhimoeForCausalLM", _MOE, "lm", dtype=F32),
    "jetmoe": E("jetmoe", "JetMoeForCausalLM", dict(_MOE, kv_channels=8, num_key_value_heads=4), "lm", dtype=F32),
    "gpt_oss": E(
        "gpt_oss", "GptOssForCausalLM", dict(_MOE, head_dim=8, sliding_window=4, num_local_experts=4), "lm", dtype=F32
    ),
    "reformer": E(
        "reformer",
        "ReformerModelWithLMHead",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_attention_heads=4,
            attention_head_size=8,
            feed_forward_size=48,
            attn_layers=["local", "local", "local"],
            axial_pos_embds=False,
            max_position_embeddings=64,
            is_decoder=True,
            pad_token_id=0,
            local_attn_chunk_length=4,
        ),
        "lm",
    ),
    "reformer_no_dropout": E(
        "reformer",
        "ReformerModelWithLMHead",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_attention_heads=4,
            attention_head_size=8,
            feed_forward_size=48,
            attn_layers=["local", "local", "local"],
            axial_pos_embds=False,
            max_position_embeddings=64,
            is_decoder=True,
            pad_token_id=0,
            local_attn_chunk_length=4,
            hidden_dropout_prob=0.0,
            local_attention_probs_dropout_prob=0.0,
            lsh_attention_probs_dropout_prob=0.0,
        ),
        "lm",
    ),
    "falcon_mamba": E(
        "falcon_mamba",
        "FalconMambaForCausalLM",
        dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=L, state_size=4),
        "lm",
    ),
    # ----- encoders
    "albert": E("albert", "AlbertForMaskedLM", dict(_ENC, embedding_size=16), "mlm"),
    "albert_one_group_twice": E(
        "albert",
        "AlbertForMaskedLM",
        dict(_ENC, embedding_size=16, num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2),
        "mlm",
    ),
    "albert_inner_group_twice": E(
        "albert",
        "AlbertForMaskedLM",
        dict(_ENC, embedding_size=16, num_hidden_layers=2, num_hidden_groups=1, inner_group_num=2),
        "mlm",
    ),
    "deberta": E("deberta", "DebertaForMaskedLM", _ENC, "mlm"),
    "camembert": E("camembert", "CamembertForMaskedLM", dict(_ENC, pad_token_id=1), "mlm"),
    "funnel": E(
        "funnel",
        "FunnelForMaskedLM",
        dict(vocab_size=VOCAB, block_sizes=[1, 1], num_decoder_layers=1, d_model=32, n_head=4, d_head=8, d_inner=48),
        "mlm",
    ),
    "funnel_decoder_eq_block": E(
        "funnel",
        "FunnelForMaskedLM",
        dict(vocab_size=VOCAB, block_sizes=[2, 2], num_decoder_layers=2, d_model=32, n_head=4, d_head=8, d_inner=48),
        "mlm",
    ),
    "funnel_blocks_eq_decoder": E(
        "funnel",
        "FunnelForMaskedLM",
        dict(vocab_size=VOCAB, block_sizes=[1, 1], num_decoder_layers=2, d_model=32, n_head=4, d_head=8, d_inner=48),
        "mlm",
    ),
    "squeezebert": E(
        "squeezebert",
        "SqueezeBertForMaskedLM",
        dict(
            _ENC,
            embedding_size=32,
            q_groups=1,
            k_groups=1,
            v_groups=1,
            post_attention_groups=1,
            intermediate_groups=1,
            output_groups=1,
        ),
        "mlm",
    ),
    "ernie": E("ernie", "ErnieForMaskedLM", _ENC, "mlm"),
    "megatron-bert": E("megatron-bert", "MegatronBertForMaskedLM", _ENC, "mlm"),
    "mobilebert": E(
        "mobilebert",
        "MobileBertForMaskedLM",
        dict(_ENC, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=2),
        "mlm",
    ),
    "rembert": E("rembert", "RemBertForMaskedLM", dict(_ENC, input_embedding_size=16, output_embedding_size=16), "mlm"),
    "nystromformer": E(
        "nystromformer", "NystromformerForMaskedLM", dict(_ENC, num_landmarks=4, segment_means_seq_len=12), "mlm"
    ),
    "yoso": E("yoso", "YosoForMaskedLM", dict(_ENC, use_expectation=True), "mlm"),
    "ibert": E("ibert", "IBertForMaskedLM", dict(_ENC, pad_token_id=1), "mlm"),
    "data2vec-text": E("data2vec-text", "Data2VecTextForMaskedLM", dict(_ENC, pad_token_id=1), "mlm"),
    "modernbert": E(
        "modernbert", "ModernBertForMaskedLM", dict(_ENC, global_attn_every_n_layers=2, local_attention=4), "mlm"
    ),
    "fnet": E("fnet", "FNetForMaskedLM", dict(_ENC, pad_token_id=1), "mlm"),
    "canine": E(
        "canine",
        "CanineModel",
        dict(
            hidden_size=32,
            num_hidden_layers=L,
            num_attention_heads=4,
            intermediate_size=48,
            downsampling_rate=2,
            num_hash_buckets=64,
            local_transformer_stride=4,
        ),
        "text",
    ),
    "luke": E("luke", "LukeForMaskedLM", dict(_ENC, entity_vocab_size=16, entity_emb_size=16), "mlm"),
    "xmod": E(
        "xmod", "XmodForMaskedLM", dict(_ENC, pad_token_id=1, languages=["en_XX"], default_language="en_XX"), "mlm"
    ),
    "roc_bert": E(
        "roc_bert",
        "RoCBertForMaskedLM",
        dict(_ENC, pronunciation_vocab_size=16, shape_vocab_size=16, concat_input=False),
        "mlm",
    ),
    "xlm": E(
        "xlm",
        "XLMWithLMHeadModel",
        dict(vocab_size=VOCAB, emb_dim=32, n_layers=L, n_heads=4, max_position_embeddings=64, pad_index=0),
        "lm",
    ),
    "flaubert": E(
        "flaubert",
        "FlaubertWithLMHeadModel",
        dict(vocab_size=VOCAB, emb_dim=32, n_layers=L, n_heads=4, max_position_embeddings=64, pad_index=0),
        "lm",
    ),
    # ----- encoder-decoders
    "mbart": E("mbart", "MBartForConditionalGeneration", _S2S, "seq2seq", stacks=2),
    "m2m_100": E(
        "m2m_100",
        "M2M100ForConditionalGeneration",
        dict(_S2S, encoder_layerdrop=0.0, decoder_layerdrop=0.0),
        "seq2seq",
        stacks=2,
    ),
    "blenderbot-small": E("blenderbot-small", "BlenderbotSmallForConditionalGeneration", _S2S, "seq2seq", stacks=2),
    "plbart": E("plbart", "PLBartForConditionalGeneration", _S2S, "seq2seq", stacks=2),
    "bigbird_pegasus": E(
        "bigbird_pegasus",
        "BigBirdPegasusForConditionalGeneration",
        dict(_S2S, attention_type="original_full"),
        "seq2seq",
        stacks=2,
    ),
    "pegasus_x": E(
        "pegasus_x",
        "PegasusXForConditionalGeneration",
        dict(_S2S, num_global_tokens=4, block_size=4, stagger_local_blocks=False),
        "seq2seq",
        stacks=2,
        streams={0: ((1, 1),)},  # the encoder's global tokens: a second residual stream
    ),
    "fsmt": E(
        "fsmt",
        "FSMTForConditionalGeneration",
        dict(_S2S, src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, langs=["en", "de"]),
        "seq2seq",
        stacks=2,
        dtype=F32,
    ),
    "prophetnet": E(
        "prophetnet",
        "ProphetNetForConditionalGeneration",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            num_encoder_layers=L,
            num_decoder_layers=L,
            num_encoder_attention_heads=4,
            num_decoder_attention_heads=4,
            ngram=2,
            num_buckets=8,
            relative_max_distance=16,
            max_position_embeddings=64,
            pad_token_id=0,
            decoder_start_token_id=0,
        ),
        "seq2seq",
        stacks=2,
    ),
    "switch_no_router_loss": E(
        "switch_transformers",
        "SwitchTransformersForConditionalGeneration",
        dict(_T5, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=16),
        "seq2seq",
        stacks=2,
        rtol=1e-6,
    ),
    "nllb-moe": E(
        "nllb-moe",
        "NllbMoeForConditionalGeneration",
        dict(
            _S2S,
            num_experts=4,
            expert_capacity=16,
            encoder_sparse_step=2,
            decoder_sparse_step=2,
            router_dtype="float32",
        ),
        "seq2seq",
        stacks=2,
        dtype=F32,
    ),
    # ----- audio
    "wav2vec2_as_shipped": E("wav2vec2", "Wav2Vec2Model", dict(_AUDIO, layerdrop=0.1), "audio"),
    "wav2vec2_no_layerdrop": E("wav2vec2", "Wav2Vec2Model", dict(_AUDIO, layerdrop=0.0), "audio"),
    "wav2vec2_ctc": E("wav2vec2", "Wav2Vec2ForCTC", dict(_AUDIO, layerdrop=0.0), "audio"),
    "hubert_as_shipped": E("hubert", "HubertModel", dict(_AUDIO, layerdrop=0.1), "audio"),
    "wavlm": E("wavlm", "WavLMModel", dict(_AUDIO, num_buckets=16, max_bucket_distance=32), "audio"),
    "sew": E("sew", "SEWModel", dict(_AUDIO, squeeze_factor=2), "audio"),
    "sew-d": E(
        "sew-d", "SEWDModel", dict(_AUDIO, squeeze_factor=2, position_buckets=8, max_relative_positions=16), "audio"
    ),
    "unispeech": E("unispeech", "UniSpeechModel", _AUDIO, "audio"),
    "unispeech-sat": E("unispeech-sat", "UniSpeechSatModel", _AUDIO, "audio"),
    "data2vec-audio": E(
        "data2vec-audio", "Data2VecAudioModel", dict(_AUDIO, num_conv_pos_embeddings=4, conv_pos_kernel_size=4), "audio"
    ),
    "wav2vec2-conformer": E(
        "wav2vec2-conformer",
        "Wav2Vec2ConformerModel",
        dict(_AUDIO, conv_depthwise_kernel_size=3, position_embeddings_type="rotary"),
        "audio",
    ),
    "speecht5": E(
        "speecht5",
        "SpeechT5ForSpeechToText",
        dict(
            _AUDIO,
            encoder_layers=L,
            decoder_layers=L,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_text_positions=64,
            max_speech_positions=256,
            pad_token_id=1,
            decoder_start_token_id=2,
        ),
        "audio-s2s",
        stacks=2,
    ),
    # ----- vision
    "data2vec-vision": E("data2vec-vision", "Data2VecVisionForImageClassification", _VISION, "vision"),
    "vit_mae": E("vit_mae", "ViTMAEModel", dict(_VISION, mask_ratio=0.5), "image"),
    "dinov2_with_registers": E(
        "dinov2_with_registers",
        "Dinov2WithRegistersForImageClassification",
        dict(_VISION, num_register_tokens=2),
        "vision",
    ),
    "yolos": E("yolos", "YolosModel", dict(_VISION, image_size=[16, 16], num_detection_tokens=2), "image"),
    "donut-swin": E(
        "donut-swin",
        "DonutSwinModel",
        dict(image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=2),
        "image",
    ),
    "convnext": E(
        "convnext",
        "ConvNextForImageClassification",
        dict(num_stages=2, hidden_sizes=[8, 16], depths=[3, 3], num_labels=5, patch_size=2),
        "vision",
    ),
    "convnextv2": E(
        "convnextv2",
        "ConvNextV2ForImageClassification",
        dict(num_stages=2, hidden_sizes=[8, 16], depths=[3, 3], num_labels=5, patch_size=2),
        "vision",
    ),
    "regnet": E(
        "regnet",
        "RegNetForImageClassification",
        dict(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 3], groups_width=8, num_labels=5),
        "vision",
    ),
    "bit": E(
        "bit",
        "BitForImageClassification",
        dict(
            embedding_size=8, hidden_sizes=[8, 16], depths=[2, 3], num_groups=2, num_labels=5, layer_type="bottleneck"
        ),
        "vision",
    ),
    "resnet_bottleneck": E(
        "resnet",
        "ResNetForImageClassification",
        dict(embedding_size=8, hidden_sizes=[8, 16], depths=[3, 3], layer_type="bottleneck", num_labels=5),
        "resnet",
        stacks=2,
    ),
    "focalnet": E(
        "focalnet",
        "FocalNetForImageClassification",
        dict(image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_labels=5),
        "vision",
    ),
    "poolformer": E(
        "poolformer",
        "PoolFormerForImageClassification",
        dict(
            hidden_sizes=[8, 16],
            depths=[2, 2],
            num_encoder_blocks=2,
            patch_sizes=[3, 3],
            strides=[2, 2],
            padding=[1, 1],
            num_labels=5,
        ),
        "vision",
    ),
    "pvt": E(
        "pvt",
        "PvtForImageClassification",
        dict(
            image_size=16,
            num_encoder_blocks=2,
            depths=[2, 2],
            sequence_reduction_ratios=[2, 1],
            hidden_sizes=[16, 32],
            patch_sizes=[4, 2],
            strides=[4, 2],
            num_attention_heads=[1, 2],
            mlp_ratios=[2, 2],
            num_labels=5,
        ),
        "vision",
    ),
    "segformer": E(
        "segformer",
        "SegformerForImageClassification",
        dict(
            num_encoder_blocks=2,
            depths=[2, 2],
            sr_ratios=[2, 1],
            hidden_sizes=[16, 32],
            patch_sizes=[3, 3],
            strides=[2, 2],
            num_attention_heads=[1, 2],
            num_labels=5,
        ),
        "vision",
    ),
    "cvt": E(
        "cvt",
        "CvtForImageClassification",
        dict(embed_dim=[8, 16, 32], depth=[3, 3, 3], num_heads=[1, 2, 2], num_labels=5),  # depth[i] > i (CvtStage)
        "vision",
    ),
    "levit": E(
        "levit",
        "LevitForImageClassification",
        dict(
            image_size=32,
            hidden_sizes=[16, 24, 32],
            num_attention_heads=[1, 2, 2],
            depths=[1, 1, 1],
            key_dim=[8, 8, 8],
            num_labels=5,
        ),
        "vision",
        image_size=32,
    ),
    "mobilevit": E(
        "mobilevit",
        "MobileViTForImageClassification",
        dict(image_size=16, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_labels=5),
        "vision",
    ),
    "efficientnet": E(
        "efficientnet",
        "EfficientNetForImageClassification",
        dict(image_size=32, width_coefficient=0.25, depth_coefficient=0.5, num_labels=5),
        "vision",
        image_size=32,
    ),
    "hiera": E(
        "hiera",
        "HieraForImageClassification",
        dict(
            image_size=[16, 16],
            patch_size=[3, 3],
            patch_stride=[2, 2],
            patch_padding=[1, 1],
            embed_dim=8,
            depths=[1, 2],
            num_heads=[1, 2],
            query_stride=[2, 2],
            num_query_pool=1,
            masked_unit_size=[4, 4],
            num_labels=5,
        ),
        "vision",
    ),
    "dinov3_convnext": E("dinov3_convnext", "DINOv3ConvNextModel", dict(hidden_sizes=[8, 16], depths=[3, 3]), "image"),
    "glpn": E(
        "glpn",
        "GLPNModel",
        dict(
            num_encoder_blocks=2,
            depths=[2, 2],
            sr_ratios=[2, 1],
            hidden_sizes=[16, 32],
            patch_sizes=[3, 3],
            strides=[2, 2],
            num_attention_heads=[1, 2],
        ),
        "image",
    ),
    "mobilevitv2": E(  # a convolution bias before a norm gets 5e-7 of the largest gradient: observed 1.1e-8 of it
        # at k = L against autograd, 7e-11 absolute where the largest gradient is 6e3 (1e-14 of it: float64 sums)
        "mobilevitv2",
        "MobileViTV2Model",
        dict(image_size=64, width_multiplier=0.25),
        "image",
        image_size=64,
        rtol=1e-7,
    ),
    # ----- decoders whose layer count is not a config key
    "nemotron_h": E(
        "nemotron_h",
        "NemotronHForCausalLM",
        dict(
            _GQA,
            layers_block_type=["mamba", "attention", "mlp"],
            mamba_num_heads=4,
            mamba_head_dim=8,
            ssm_state_size=8,
            n_groups=1,
            head_dim=8,
        ),
        "lm",
    ),
    # ----- LayerDrop (a separate check over seeds) and eval mode
    "m2m_100_layerdrop": E(
        "m2m_100",
        "M2M100ForConditionalGeneration",
        dict(_S2S, encoder_layerdrop=0.05, decoder_layerdrop=0.05),
        "seq2seq",
        stacks=2,
    ),
    "wav2vec2_layerdrop": E("wav2vec2", "Wav2Vec2Model", dict(_AUDIO, layerdrop=0.1), "audio"),
}
LAYERDROP = {"m2m_100_layerdrop", "wav2vec2_layerdrop"}
EVAL_MODE = ["gpt2", "bart"]  # the zoo's models, patched in eval mode


@dataclass
class Row:
    name: str
    model_type: str
    model_class: str
    dtype: str
    stacks: str = ""
    verdict: str = ""
    err_L: float | None = None
    err_k: tuple = ()
    message: str = ""
    seconds: float = 0.0


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:400]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _any_grad(model) -> bool:
    return any(p.grad is not None for p in model.parameters())


def _rel(actual: dict, expected: dict) -> float:
    if actual.keys() != expected.keys():
        return float("inf")
    floor = 1e-6 * max(g.double().norm().item() for g in expected.values())
    return max(
        (actual[n].double() - expected[n].double()).norm().item() / max(expected[n].double().norm().item(), floor)
        for n in expected
    )


def _tolerance(entry: ZooEntry) -> float:
    if entry.rtol is not None:
        return entry.rtol
    return 1e-10 if entry.dtype == torch.float64 else 1e-5


def batch_of(entry: ZooEntry) -> dict:
    g = torch.Generator().manual_seed(1)
    if entry.task == "audio-s2s":
        return {
            "input_values": torch.randn(2, 200, generator=g, dtype=torch.float64).to(entry.dtype),
            "labels": torch.randint(3, VOCAB, (2, 9), generator=g),
        }
    if entry.task == "whisper":
        return {
            "input_features": torch.randn(2, 8, 12, generator=g, dtype=torch.float64).to(entry.dtype),
            "decoder_input_ids": torch.randint(3, VOCAB, (2, 9), generator=g),
        }
    if entry.task == "ast":
        return {"input_values": torch.randn(2, 16, 16, generator=g, dtype=torch.float64).to(entry.dtype)}
    return entry.batch()


def loss_and_grads(entry, model, batch):
    model.zero_grad(set_to_none=True)
    entry.loss(model, batch).backward()
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    return grads


_NO_FLOAT64 = ("Float32, BFloat16 or Float16", "to have the same dtype", "not implemented for 'Double'")


def _has_repeated_layers(model: torch.nn.Module) -> bool:
    """Whether the model holds any list of two or more modules of one class of its own (not torch.nn's): what a
    residual stack would be made of. A model without one has no residual stack to look for."""
    return any(
        isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential))
        and len(m) > 1
        and len({type(x) for x in m}) == 1
        and not type(m[0]).__module__.startswith("torch.")
        for m in model.modules()
    )


def _with_eager_experts(entry):
    """The case with transformers' eager mixture-of-experts kernels (grouped_mm has no float64)."""
    if not hasattr(entry, "overrides"):
        raise TypeError("not a generic case")
    return dataclasses.replace(entry, overrides={**entry.overrides, "experts_implementation": "eager"})


class _Float64Throughout:
    """Turns the float32 casts inside a float64 model into no-ops (``x.float()``, ``x.to(torch.float32)``,
    ``softmax(dtype=torch.float32)``): a model whose norms compute in float32 (Gemma's) then runs in float64 only,
    so a gradient that differs from the reference by float32's rounding can be told from a wrong one."""

    def __enter__(self):
        tensor = torch.Tensor
        self.saved = tensor.float, tensor.to, tensor.softmax
        float_, to, softmax = self.saved

        def widen(value, self_):
            return torch.float64 if value is torch.float32 and self_.dtype == torch.float64 else value

        tensor.float = lambda t: t if t.dtype == torch.float64 else float_(t)
        tensor.to = lambda t, *a, **k: to(
            t, *(widen(x, t) for x in a), **{n: widen(v, t) if n == "dtype" else v for n, v in k.items()}
        )
        tensor.softmax = lambda t, *a, **k: softmax(t, *a, **{n: widen(v, t) for n, v in k.items()})
        return self

    def __exit__(self, *exc):
        torch.Tensor.float, torch.Tensor.to, torch.Tensor.softmax = self.saved


def survey(name: str, entry: ZooEntry) -> Row:
    """One case; a float64 case off by float32's rounding (<= 1e-5) is rerun with its float32 casts turned off, and
    is "exact to float32 rounding" when it is then exact."""
    row = _survey(name, entry)
    if row.verdict in ("wrong at L", "wrong below L") and row.dtype == "float64":
        worst = max([row.err_L or 0.0, *(e for e, _ in row.err_k or ())])
        if worst <= 1e-5:
            with _Float64Throughout():
                again = _survey(name, entry)
            if again.verdict == "exact":
                row.verdict = "exact to float32 rounding"
                row.message = (
                    f"(the model computes parts in float32; with those casts off: exact, "
                    f"{_fmt(again.err_L)} at L, {' / '.join(_fmt(e) for e, _ in again.err_k)} at k = 1 / 2)"
                )
    return row


def _survey(name: str, entry: ZooEntry) -> Row:
    row = Row(name, entry.model_type, entry.model_class, str(entry.dtype).replace("torch.", ""))
    start = time.perf_counter()
    try:
        try:
            model, batch = entry.build(), batch_of(entry)
            exact = loss_and_grads(entry, model, batch)
        except Exception as e:  # noqa: BLE001 - kernels without float64 (grouped-matmul MoE): eager, or float32
            if entry.dtype != torch.float64 or not any(text in str(e) for text in _NO_FLOAT64):
                raise
            try:  # transformers' eager experts (a loop of linear layers) run in float64
                entry = _with_eager_experts(entry)
                model, batch = entry.build(), batch_of(entry)
                exact = loss_and_grads(entry, model, batch)
            except Exception:  # noqa: BLE001
                entry = dataclasses.replace(entry, dtype=F32)
                row.dtype = "float32"
                model, batch = entry.build(), batch_of(entry)
                exact = loss_and_grads(entry, model, batch)
    except Exception as e:  # noqa: BLE001
        row.verdict, row.message = "not built", _first_line(e)
        return row
    if not all(torch.isfinite(g).all() for g in exact.values()):
        row.verdict, row.message = "not built", "the unpatched gradient is not finite with this tiny config"
        return row
    tol = _tolerance(entry)
    try:
        hf_hwbp.patch_model(model, k=1)
    except Exception as e:  # noqa: BLE001
        no_stack = "found no residual stack" in str(e) and not _has_repeated_layers(model)
        row.verdict = "no residual stack" if no_stack else "refused (patch_model)"
        row.message = _first_line(e)
        return row
    state = hf_hwbp.highway_state(model)
    row.stacks = ", ".join(f"`{s.path}` ({len(s)} x {type(s.layers[0]).__name__})" for s in state.stacks)
    num_blocks = state.num_blocks  # blocks per forward (a layer run at several depths counts at each)
    hf_hwbp.set_highway_k(model, num_blocks)
    try:
        model.zero_grad(set_to_none=True)
        entry.loss(model, batch).backward()
        got = _grads(model)
        model.zero_grad(set_to_none=True)
    except Exception as e:  # noqa: BLE001
        row.verdict = "crash after grad" if _any_grad(model) else "refused (forward)"
        row.message = _first_line(e)
        return row
    let_go = [f"`{state._stacks[s].path}`: {why}" for s, why in state._rejected.items()]
    if hf_hwbp.last_highway_iterations(model) is None:
        row.verdict = "let go" if let_go else "no-op"
        row.err_L = _rel(got, exact)
        row.message = "; ".join(let_go) or "last_highway_iterations is None after a training backward"
        return row
    row.err_L = _rel(got, exact)
    if not row.err_L <= tol:
        worst = max(
            exact, key=lambda n: (got.get(n, exact[n] * 0) - exact[n]).norm() / exact[n].norm().clamp_min(1e-300)
        )
        row.verdict, row.message = "wrong at L", f"worst parameter: {worst}"
        return row
    errs = []
    for k in (1, 2):
        gate_ctx = residual_gates([s.layers for s in state.stacks])
        try:
            with hf_hwbp.exact_backprop(model), gate_ctx as gate:
                expected = reference_highway_grads(
                    model,
                    [s.layers for s in state.stacks],
                    lambda m: entry.loss(m, batch),
                    k,
                    residual_gate=gate,
                    streams=entry.streams,
                )
        except Exception as e:  # noqa: BLE001
            row.verdict, row.message = "reference failed", _first_line(e)
            return row
        hf_hwbp.set_highway_k(model, k)
        try:
            got = loss_and_grads(entry, model, batch)
        except Exception as e:  # noqa: BLE001
            row.verdict = f"crash after grad (k={k})" if _any_grad(model) else f"refused (forward, k={k})"
            row.message = _first_line(e)
            return row
        errs.append((_rel(got, expected), _rel(expected, exact)))
    row.err_k = tuple(errs)
    bad = [e for e, _ in errs if not e <= tol]
    row.verdict = "wrong below L" if bad else "exact"
    notes = [f"let go: {'; '.join(let_go)}"] if let_go else []
    if not bad and max(d for _, d in errs) <= 1e-3:
        notes.append("k < L barely differs from backprop here")
    row.message = "; ".join(notes)
    row.seconds = time.perf_counter() - start
    return row


def survey_layerdrop(name: str, entry: ZooEntry, seeds: int = 30) -> Row:
    """Several seeds: which forwards drop a layer, and what each run does."""
    row = Row(name, entry.model_type, entry.model_class, str(entry.dtype).replace("torch.", ""))
    outcomes: dict[str, int] = {}
    first_message = {}
    for seed in range(seeds):
        model, batch = entry.build(), batch_of(entry)

        def loss_fn(m, seed=seed, batch=batch):
            torch.manual_seed(1000 + seed)
            np.random.seed(seed)  # SpecAugment's masks
            out = m(**batch)
            return out.loss if getattr(out, "loss", None) is not None else (out[0] ** 2).mean()

        model.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        exact = _grads(model)
        model.zero_grad(set_to_none=True)
        try:
            hf_hwbp.patch_model(model, k=L)
        except Exception as e:  # noqa: BLE001
            key = "refused (patch_model)"
            outcomes[key] = outcomes.get(key, 0) + 1
            first_message.setdefault(key, _first_line(e))
            continue
        row.stacks = ", ".join(f"`{s.path}` ({len(s)})" for s in hf_hwbp.highway_state(model).stacks)
        try:
            loss_fn(model).backward()
            err = _rel(_grads(model), exact)
            key = "exact" if err <= _tolerance(entry) else f"wrong at L ({err:.1e})"
            if hf_hwbp.last_highway_iterations(model) is None:
                key = "no-op"
        except Exception as e:  # noqa: BLE001
            key = "crash after grad" if _any_grad(model) else "refused (forward)"
            first_message.setdefault(key, _first_line(e))
        outcomes[key] = outcomes.get(key, 0) + 1
    row.verdict = ", ".join(f"{k}: {v}/{seeds} seeds" for k, v in sorted(outcomes.items()))
    row.message = " / ".join(f"{k}: {m}" for k, m in first_message.items())
    return row


def survey_eval(name: str, entry: ZooEntry) -> Row:
    """Patched in eval mode (as from_pretrained returns it): what a backward does and what the user is told."""
    row = Row(f"{name}_eval_mode", entry.model_type, entry.model_class, str(entry.dtype).replace("torch.", ""))
    model, batch = entry.build().eval(), batch_of(entry)
    exact = loss_and_grads(entry, model, batch)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    hf_logger = logging.getLogger("hf_hwbp")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hf_hwbp.patch_model(model, k=1)
            got = loss_and_grads(entry, model, batch)
    finally:
        hf_logger.removeHandler(handler)
    told = [str(w.message) for w in caught] + records
    iterations = hf_hwbp.last_highway_iterations(model)
    row.err_L = _rel(got, exact)
    if iterations is None:
        row.verdict = "eval: ordinary backprop" + (" (warned)" if told else " (silent)")
    else:
        row.verdict = f"eval: Highway-BP ran ({iterations} iterations)"
    row.message = (told[0].splitlines()[0] if told else "nothing said")[:300]
    return row


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.1e}"


def table(rows: list[Row]) -> str:
    lines = [
        "| case | model_type | class | dtype | stack(s) found | verdict | err k=L | err k=1 / k=2 (vs ref) | message |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ks = " / ".join(_fmt(e) for e, _ in r.err_k)
        msg = r.message.replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {r.name} | `{r.model_type}` | {r.model_class} | {r.dtype} | {r.stacks} | {r.verdict} | "
            f"{_fmt(r.err_L)} | {ks} | {msg} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="only these cases (case names or model types)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--no-zoo", action="store_true", help="skip the tested zoo's own entries")
    parser.add_argument("--seeds", type=int, default=30, help="seeds of the LayerDrop cases")
    parser.add_argument(
        "--all",
        action="store_true",
        help="also every other model type of the installed transformers (AutoModel), built from generic tiny configs "
        "(tests/zoo_generic.py)",
    )
    parser.add_argument("--timeout", type=int, default=300, help="seconds one case may take")
    parser.add_argument("--skip", nargs="*", default=[], help="cases (names or model types) to leave out")
    parser.add_argument(
        "--autograd-exact-steps",
        action="store_true",
        help="keep the users' default (k >= L runs the model's own backward); by default the survey runs the "
        "Highway engine at k = L too, as the test suite does, so that k = L checks the engine",
    )
    args = parser.parse_args(argv)
    from hf_hwbp import patching

    if not args.autograd_exact_steps and hasattr(patching, "EXACT_STEPS_BY_AUTOGRAD"):
        patching.EXACT_STEPS_BY_AUTOGRAD = False
    torch.set_num_threads(1)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    cases = {} if args.no_zoo else dict(ZOO)
    cases.update(CASES)
    if args.all:
        covered = {entry.model_type for entry in cases.values()}
        cases.update({t: generic_case(t) for t in model_types() if t not in covered and t not in cases})
    if args.names:
        cases = {n: e for n, e in cases.items() if n in args.names or e.model_type in args.names}
    cases = {n: e for n, e in cases.items() if n not in args.skip and e.model_type not in args.skip}
    rows = []
    signal.signal(signal.SIGALRM, _timed_out)
    for name, entry in cases.items():
        signal.alarm(args.timeout)
        try:
            if name in LAYERDROP:
                row = survey_layerdrop(name, entry, args.seeds)
            else:
                row = survey(name, entry)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            row = Row(name, entry.model_type, entry.model_class, "", verdict="survey error", message=_first_line(e))
        except _CaseTimeout:
            row = Row(name, entry.model_type, entry.model_class, "", verdict="not built", message="timed out")
        finally:
            signal.alarm(0)
        print(f"{name:32s} {row.verdict:24s} {_fmt(row.err_L):8s} {row.message[:150]}", flush=True)
        rows.append(row)
        if args.out:  # a case that exhausts the memory ends the process: keep what was surveyed
            _write(args, argv, rows)
    for name in EVAL_MODE:
        if not args.names or name in args.names or "eval" in args.names:
            rows.append(survey_eval(name, ZOO[name]))
            print(f"{rows[-1].name:32s} {rows[-1].verdict:24s} {rows[-1].message[:150]}", flush=True)
    if args.out:
        _write(args, argv, rows)
    return rows


def _write(args, argv, rows: list[Row]) -> None:
    command = " ".join(["python tests/zoo_survey.py", *(argv if argv is not None else sys.argv[1:])])
    text = table(rows) + "\n\n" + summary(rows)
    args.out.write_text(f"Command: `{command}` (transformers {transformers.__version__})\n\n{text}\n")


class _CaseTimeout(BaseException):
    """A case ran past --timeout (a BaseException: the survey's ``except Exception`` must not swallow it)."""


def _timed_out(signum, frame):
    raise _CaseTimeout


def summary(rows: list[Row]) -> str:
    """The model types by verdict (a type counts once per verdict it got)."""
    by_verdict: dict[str, set[str]] = {}
    for r in rows:
        verdict = r.verdict.split(" (")[0] if r.verdict.startswith(("refused", "crash")) else r.verdict
        by_verdict.setdefault(verdict, set()).add(r.model_type)
    lines = ["| verdict | model types | which |", "|---|---|---|"]
    for verdict, types in sorted(by_verdict.items(), key=lambda item: -len(item[1])):
        lines.append(f"| {verdict} | {len(types)} | {', '.join(f'`{t}`' for t in sorted(types))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
