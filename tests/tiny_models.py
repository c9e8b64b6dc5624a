"""Tiny random transformers models for the tests, built from configs (no downloads)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

VOCAB = 64
SEQ = 12
BATCH = 2
LAYERS = 4


def _gpt2_config(dropout: float = 0.0) -> GPT2Config:
    return GPT2Config(
        n_layer=LAYERS,
        n_embd=32,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        num_labels=3,
    )


def _llama_kwargs() -> dict:
    return dict(
        num_hidden_layers=LAYERS,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        num_labels=3,
    )


def _vit_config(dropout: float = 0.0) -> ViTConfig:
    return ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=48,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=5,
    )


BUILDERS = {
    "gpt2-lm": lambda: GPT2LMHeadModel(_gpt2_config()),
    "gpt2-base": lambda: GPT2Model(_gpt2_config()),
    "gpt2-seqcls": lambda: GPT2ForSequenceClassification(_gpt2_config()),
    "llama-lm": lambda: LlamaForCausalLM(LlamaConfig(**_llama_kwargs())),
    "llama-base": lambda: LlamaModel(LlamaConfig(**_llama_kwargs())),
    "llama-seqcls": lambda: LlamaForSequenceClassification(LlamaConfig(**_llama_kwargs())),
    "mistral-lm": lambda: MistralForCausalLM(MistralConfig(**_llama_kwargs())),
    "qwen2-lm": lambda: Qwen2ForCausalLM(Qwen2Config(**_llama_kwargs())),
    "qwen3-lm": lambda: Qwen3ForCausalLM(Qwen3Config(head_dim=8, **_llama_kwargs())),
    "vit-cls": lambda: ViTForImageClassification(_vit_config()),
    "vit-base": lambda: ViTModel(_vit_config(), add_pooling_layer=False),
}


def build(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[name]().to(dtype).train()


def make_batch(name: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    if name.startswith("vit"):
        batch = {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g, dtype=torch.float64)}
        if name.endswith("cls"):
            batch["labels"] = torch.randint(0, 5, (BATCH,), generator=g)
        return batch
    ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
    batch = {"input_ids": ids}
    if name.endswith("-lm"):
        batch["labels"] = ids
    elif name.endswith("seqcls"):
        batch["labels"] = torch.randint(0, 3, (BATCH,), generator=g)
    return batch


def loss_of(model: torch.nn.Module, batch: dict, **kwargs) -> torch.Tensor:
    """The model's own loss when it has a head with labels; else a fixed random projection of its output."""
    out = model(**batch, **kwargs)
    if getattr(out, "loss", None) is not None:
        return out.loss
    hidden = out.last_hidden_state
    g = torch.Generator().manual_seed(123)
    weights = torch.randn(hidden.shape, generator=g, dtype=torch.float64).to(hidden.dtype)
    return (hidden * weights).sum()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


# ----- the zoo: transformers architectures patched without layers= ------------------------------------------------
ZOO_LAYERS = 3
_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=ZOO_LAYERS,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
)
_GQA = dict(_TEXT, num_key_value_heads=2)
_MOE = dict(_GQA, num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
_VISION = dict(
    image_size=16,
    patch_size=4,
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=ZOO_LAYERS,
    num_attention_heads=4,
    intermediate_size=48,
    num_labels=5,
)

_ENC = dict(_TEXT, type_vocab_size=2)
_S2S = dict(
    vocab_size=VOCAB,
    d_model=32,
    encoder_layers=ZOO_LAYERS,
    decoder_layers=ZOO_LAYERS,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    max_position_embeddings=64,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
)
_T5 = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=ZOO_LAYERS,
    num_decoder_layers=ZOO_LAYERS,
    num_heads=4,
    decoder_start_token_id=0,
    pad_token_id=0,
)
# Raw-audio models: a 2-layer convolutional feature encoder (trainable, as shipped) under the transformer stack.
_AUDIO = dict(
    hidden_size=32,
    num_hidden_layers=ZOO_LAYERS,
    num_attention_heads=4,
    intermediate_size=48,
    conv_dim=(16, 16),
    conv_kernel=(10, 3),
    conv_stride=(5, 2),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    vocab_size=VOCAB,
    layerdrop=0.0,
)
_SWIN = dict(
    image_size=16, patch_size=2, embed_dim=16, depths=[ZOO_LAYERS, ZOO_LAYERS], num_heads=[2, 2], window_size=2
)

_STAGES = dict(hidden_sizes=[8, 16], depths=[3, 3], num_labels=5, initializer_range=0.2)

# Autoformer (float32 only: its auto-correlation makes float32 tensors inside the model): discovery finds both stacks.
AUTOFORMER = dict(
    prediction_length=4, context_length=8, label_length=4, lags_sequence=[1, 2], num_time_features=1, d_model=16,
    encoder_layers=ZOO_LAYERS, decoder_layers=ZOO_LAYERS, encoder_attention_heads=2, decoder_attention_heads=2,
    encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
)  # fmt: skip

ENTITY_VOCAB = 16  # LUKE's entity vocabulary
ZOO_SEED = 7  # dropout masks (torch) and SpecAugment masks (numpy) are drawn from this seed in every pass
AUDIO_SAMPLES = 200  # raw audio of the audio models: 39 frames after a (10, 3) / (5, 2) convolutional encoder


def _projection(t: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed random linear functional of ``t``: a loss that reads every entry of an output with no head."""
    g = torch.Generator().manual_seed(seed)
    return (t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum() / t.shape[0]


@dataclass(frozen=True)
class ZooEntry:
    """One architecture of the zoo: how to build it from a tiny config and feed it.

    ``task``: "lm" (causal LM with labels), "mlm" (masked LM), "seqcls", "vision", "seq2seq", "resnet" (a
    head with labels: the model's own loss); "text", "image", "audio", "whisper", "ast" (a model without a head,
    fed token ids, pixels, raw audio, log-mel features or a spectrogram: a fixed random projection of its first
    output is the loss).
    ``model_class``: a class of ``transformers``, or an ``AutoModel*`` class (built with ``from_config``).
    ``dtype``: float64 unless the model's kernels refuse it (MoE grouped matmuls: float32).
    ``stacks``: how many stacks discovery must find.
    ``rtol``: the tolerance of the comparisons when the dtype's own (tests/test_zoo.py) does not apply.
    ``forward_kwargs``: passed to every forward (``output_attentions=True``, ``output_router_logits=True``).
    ``side_loss``: "attentions": the loss also reads every attention map (a projection of each).
    ``attn_implementation``: forced on the config ("eager" where attention maps are read).
    ``image_size``: the side of the square images of vision tasks.
    ``streams``: residual streams besides the hidden state that the layers hand on (LUKE's entity states), as the
    independent reference takes them: stack index -> ((where a layer receives one: position or keyword, its place
    in the output), ...).
    Tasks "entity-mlm" (LUKE: token and entity ids, both masked-LM labels) and "layout-seqcls" (LiLT: token ids,
    boxes and a label) feed them.
    """

    model_type: str
    model_class: str
    config: dict
    task: str
    dtype: torch.dtype = torch.float64
    stacks: int = 1
    rtol: float | None = None
    forward_kwargs: dict = field(default_factory=dict)
    side_loss: str | None = None
    attn_implementation: str | None = None
    image_size: int = 16
    streams: dict = field(default_factory=dict)

    def build(self, seed: int = 0, **overrides) -> torch.nn.Module:
        import transformers

        torch.manual_seed(seed)
        config = transformers.AutoConfig.for_model(self.model_type, **{**self.config, **overrides})
        if self.attn_implementation is not None:
            config._attn_implementation = self.attn_implementation
        cls = getattr(transformers, self.model_class)
        model = cls.from_config(config) if self.model_class.startswith("AutoModel") else cls(config)
        return model.to(self.dtype).train()

    def batch(self, seed: int = 1) -> dict:
        g = torch.Generator().manual_seed(seed)
        if self.task in ("vision", "resnet", "image"):
            size = self.image_size
            pixels = torch.randn(BATCH, 3, size, size, generator=g, dtype=torch.float64).to(self.dtype)
            if self.task == "image":
                return {"pixel_values": pixels}
            return {"pixel_values": pixels, "labels": torch.randint(0, 5, (BATCH,), generator=g)}
        if self.task == "whisper":  # log-mel features (8 bins x 12 frames) and decoder tokens
            features = torch.randn(BATCH, 8, 12, generator=g, dtype=torch.float64).to(self.dtype)
            return {
                "input_features": features,
                "decoder_input_ids": torch.randint(3, VOCAB, (BATCH, SEQ - 3), generator=g),
            }
        if self.task == "ast":  # a 16 x 16 spectrogram
            return {"input_values": torch.randn(BATCH, 16, 16, generator=g, dtype=torch.float64).to(self.dtype)}
        if self.task == "audio":
            return {"input_values": torch.randn(BATCH, AUDIO_SAMPLES, generator=g, dtype=torch.float64).to(self.dtype)}
        if self.task == "timeseries":  # past values (with the lags' history) and the values to predict
            return self._time_series(g)
        ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
        if self.task == "entity-mlm":  # 3 entities per sequence, each a mention of up to 2 tokens (-1: padding)
            entities = torch.randint(1, ENTITY_VOCAB, (BATCH, 3), generator=g)
            mentions = torch.randint(0, SEQ, (BATCH, 3, 2), generator=g)
            mentions[:, :, 1] = torch.where(mentions[:, :, 1] > mentions[:, :, 0], mentions[:, :, 1], -1)
            return {
                "input_ids": ids,
                "labels": ids,
                "entity_ids": entities,
                "entity_position_ids": mentions,
                "entity_labels": entities,
            }
        if self.task == "layout-seqcls":  # a box (x0, y0, x1, y1) in 0..1000 per token
            corner = torch.randint(0, 500, (BATCH, SEQ, 2), generator=g)
            size = torch.randint(0, 400, (BATCH, SEQ, 2), generator=g)
            bbox = torch.cat([corner, corner + size], dim=-1)
            return {"input_ids": ids, "bbox": bbox, "labels": torch.randint(0, 3, (BATCH,), generator=g)}
        if self.task == "text":
            return {"input_ids": ids}
        if self.task == "seqcls":
            return {"input_ids": ids, "labels": torch.randint(0, 3, (BATCH,), generator=g)}
        if self.task == "seq2seq":
            return {"input_ids": ids, "labels": torch.randint(1, VOCAB, (BATCH, SEQ - 3), generator=g)}
        return {"input_ids": ids, "labels": ids}

    def _time_series(self, g: torch.Generator) -> dict:
        config = self.config
        channels = config.get("num_input_channels", config.get("input_size", 1))
        past = config["context_length"] + max(config.get("lags_sequence", [0]))
        future = config["prediction_length"]

        def values(length: int) -> torch.Tensor:
            shape = (BATCH, length, channels) if channels > 1 else (BATCH, length)
            return torch.randn(shape, generator=g, dtype=torch.float64).to(self.dtype)

        batch = {"past_values": values(past), "future_values": values(future)}
        features = config.get("num_time_features", 0)
        if features:
            batch["past_time_features"] = torch.randn(BATCH, past, features, generator=g).to(self.dtype)
            batch["future_time_features"] = torch.randn(BATCH, future, features, generator=g).to(self.dtype)
            batch["past_observed_mask"] = torch.ones_like(batch["past_values"])
        return batch

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The training loss of one forward, with the same random masks in every pass."""
        import numpy as np

        torch.manual_seed(ZOO_SEED)
        np.random.seed(ZOO_SEED)
        out = model(**batch, **self.forward_kwargs)
        loss = out.loss if getattr(out, "loss", None) is not None else _projection(out[0], 123)
        if self.side_loss == "attentions":
            names = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")
            maps = [a for name in names for a in (getattr(out, name, None) or ()) if a is not None]
            assert maps, "side_loss='attentions' but the model returned no attention maps"
            loss = loss + sum(_projection(a, 1000 + i) for i, a in enumerate(maps))
        return loss


ZOO: dict[str, ZooEntry] = {
    "gpt2": ZooEntry("gpt2", "GPT2LMHeadModel", dict(n_layer=ZOO_LAYERS, n_embd=32, n_head=4, vocab_size=VOCAB), "lm"),
    "llama": ZooEntry("llama", "LlamaForCausalLM", _GQA, "lm"),
    "mistral": ZooEntry("mistral", "MistralForCausalLM", _GQA, "lm"),
    "qwen2": ZooEntry("qwen2", "Qwen2ForCausalLM", _GQA, "lm"),
    "qwen3": ZooEntry("qwen3", "Qwen3ForCausalLM", dict(_GQA, head_dim=8), "lm"),
    "gemma": ZooEntry("gemma", "GemmaForCausalLM", dict(_GQA, head_dim=8), "lm"),
    "gemma2": ZooEntry("gemma2", "Gemma2ForCausalLM", dict(_GQA, head_dim=8), "lm"),
    "phi3": ZooEntry("phi3", "Phi3ForCausalLM", _GQA, "lm"),
    "phi": ZooEntry("phi", "PhiForCausalLM", _TEXT, "lm"),
    "olmo": ZooEntry("olmo", "OlmoForCausalLM", _GQA, "lm"),
    "olmo2": ZooEntry("olmo2", "Olmo2ForCausalLM", _GQA, "lm"),
    "granite": ZooEntry("granite", "GraniteForCausalLM", _GQA, "lm"),
    "stablelm": ZooEntry("stablelm", "StableLmForCausalLM", _GQA, "lm"),
    "starcoder2": ZooEntry("starcoder2", "Starcoder2ForCausalLM", _GQA, "lm"),
    "gpt_neox": ZooEntry("gpt_neox", "GPTNeoXForCausalLM", _TEXT, "lm"),
    "opt": ZooEntry("opt", "OPTForCausalLM", dict(_TEXT, ffn_dim=48, word_embed_proj_dim=32), "lm"),
    "falcon": ZooEntry("falcon", "FalconForCausalLM", dict(_TEXT, new_decoder_architecture=False), "lm"),
    "bert": ZooEntry("bert", "BertForMaskedLM", _TEXT, "mlm"),
    "roberta": ZooEntry("roberta", "RobertaForMaskedLM", dict(_TEXT, pad_token_id=1), "mlm"),
    "electra": ZooEntry("electra", "ElectraForSequenceClassification", dict(_TEXT, embedding_size=32), "seqcls"),
    "distilbert": ZooEntry(
        "distilbert",
        "DistilBertForMaskedLM",
        dict(vocab_size=VOCAB, dim=32, n_layers=ZOO_LAYERS, n_heads=4, hidden_dim=48, max_position_embeddings=64),
        "mlm",
    ),
    "vit": ZooEntry("vit", "ViTForImageClassification", _VISION, "vision"),
    "deit": ZooEntry("deit", "DeiTForImageClassification", _VISION, "vision"),
    "dinov2": ZooEntry("dinov2", "Dinov2ForImageClassification", _VISION, "vision"),
    "mixtral": ZooEntry("mixtral", "MixtralForCausalLM", _MOE, "lm", torch.float32),
    "qwen2_moe": ZooEntry(
        "qwen2_moe", "Qwen2MoeForCausalLM", dict(_MOE, shared_expert_intermediate_size=16), "lm", torch.float32
    ),
    "qwen3_moe": ZooEntry("qwen3_moe", "Qwen3MoeForCausalLM", dict(_MOE, head_dim=8), "lm", torch.float32),
    "bart": ZooEntry(
        "bart",
        "BartForConditionalGeneration",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=ZOO_LAYERS,
            decoder_layers=ZOO_LAYERS,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        "seq2seq",
        stacks=2,
    ),
    # T5LayerNorm computes its variance in float32, whatever the model's dtype: gradients through it round to float32
    # when the two sides sum in another order (observed <= 5e-8 relative against the reference).
    "t5": ZooEntry(
        "t5",
        "T5ForConditionalGeneration",
        dict(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=ZOO_LAYERS,
            num_decoder_layers=ZOO_LAYERS,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        ),
        "seq2seq",
        stacks=2,
        rtol=1e-6,
    ),
    "resnet": ZooEntry(
        "resnet",
        "ResNetForImageClassification",
        dict(embedding_size=8, hidden_sizes=[8, 16], depths=[3, 4], layer_type="basic", num_labels=5),
        "resnet",
        stacks=2,
    ),
    # ----- more decoders
    "gptj": ZooEntry(
        "gptj", "GPTJForCausalLM", dict(_TEXT, n_layer=ZOO_LAYERS, n_embd=32, n_head=4, rotary_dim=4), "lm"
    ),
    "gpt_bigcode": ZooEntry(
        "gpt_bigcode", "GPTBigCodeForCausalLM", dict(_TEXT, n_layer=ZOO_LAYERS, n_embd=32, n_head=4), "lm"
    ),
    "codegen": ZooEntry(
        "codegen",
        "CodeGenForCausalLM",
        dict(_TEXT, n_layer=ZOO_LAYERS, n_embd=32, n_head=4, rotary_dim=4, n_ctx=64),
        "lm",
    ),
    "gpt_neo": ZooEntry(
        "gpt_neo",
        "GPTNeoForCausalLM",
        dict(
            _TEXT,
            attention_types=[[["global", "local", "global"], 1]],
            num_layers=ZOO_LAYERS,
            num_heads=4,
            window_size=4,
        ),
        "lm",
    ),
    "openai-gpt": ZooEntry(
        "openai-gpt", "OpenAIGPTLMHeadModel", dict(_TEXT, n_layer=ZOO_LAYERS, n_embd=32, n_head=4), "lm"
    ),
    "mpt": ZooEntry(
        "mpt", "MptForCausalLM", dict(_TEXT, d_model=32, n_heads=4, n_layers=ZOO_LAYERS, expansion_ratio=2), "lm"
    ),
    "biogpt": ZooEntry("biogpt", "BioGptForCausalLM", _TEXT, "lm"),
    "persimmon": ZooEntry("persimmon", "PersimmonForCausalLM", _TEXT, "lm"),
    "cohere": ZooEntry("cohere", "CohereForCausalLM", _GQA, "lm"),
    "glm": ZooEntry("glm", "GlmForCausalLM", dict(_GQA, head_dim=8), "lm"),
    "gemma3_text": ZooEntry("gemma3_text", "Gemma3ForCausalLM", dict(_GQA, head_dim=8, sliding_window=4), "lm"),
    "xlnet": ZooEntry(
        "xlnet", "XLNetLMHeadModel", dict(vocab_size=VOCAB, d_model=32, n_layer=ZOO_LAYERS, n_head=4, d_inner=48), "lm"
    ),
    "olmoe": ZooEntry("olmoe", "OlmoeForCausalLM", _MOE, "lm", torch.float32),
    "mixtral-router-loss": ZooEntry(  # the router's load-balancing loss (a side output of every block) in the loss
        "mixtral",
        "MixtralForCausalLM",
        dict(_MOE, router_aux_loss_coef=0.5),
        "lm",
        torch.float32,
        forward_kwargs=dict(output_router_logits=True),
    ),
    "mamba": ZooEntry(
        "mamba",
        "MambaForCausalLM",
        dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=ZOO_LAYERS, state_size=4),
        "lm",
    ),
    "rwkv": ZooEntry(
        "rwkv",
        "RwkvForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=ZOO_LAYERS,
            attention_hidden_size=32,
            intermediate_size=48,
            context_length=64,
        ),
        "lm",
    ),
    # ----- more encoders
    "albert-groups": ZooEntry(
        "albert", "AlbertForMaskedLM", dict(_ENC, embedding_size=16, num_hidden_groups=ZOO_LAYERS), "mlm"
    ),
    "deberta-v2": ZooEntry("deberta-v2", "DebertaV2ForMaskedLM", _ENC, "mlm"),
    "xlm-roberta": ZooEntry("xlm-roberta", "XLMRobertaForMaskedLM", dict(_ENC, pad_token_id=1), "mlm"),
    "mpnet": ZooEntry("mpnet", "MPNetForMaskedLM", dict(_ENC, pad_token_id=1), "mlm"),
    "convbert": ZooEntry(
        "convbert", "ConvBertForMaskedLM", dict(_ENC, embedding_size=32, head_ratio=2, conv_kernel_size=3), "mlm"
    ),
    "roformer": ZooEntry("roformer", "RoFormerForMaskedLM", dict(_ENC, embedding_size=32), "mlm"),
    "esm": ZooEntry(
        "esm", "EsmForMaskedLM", dict(_ENC, pad_token_id=1, mask_token_id=2, position_embedding_type="rotary"), "mlm"
    ),
    "longformer": ZooEntry(
        "longformer", "LongformerForMaskedLM", dict(_ENC, pad_token_id=1, attention_window=4), "mlm"
    ),
    "big_bird": ZooEntry("big_bird", "BigBirdForMaskedLM", dict(_ENC, attention_type="original_full"), "mlm"),
    "layoutlm": ZooEntry("layoutlm", "LayoutLMForMaskedLM", _ENC, "mlm"),
    # ----- more encoder-decoders
    "pegasus": ZooEntry(  # sinusoidal positions (norm ~1) drown blocks initialised at std 0.02: k < L would be exact
        "pegasus", "PegasusForConditionalGeneration", dict(_S2S, init_std=0.3), "seq2seq", stacks=2
    ),
    "marian": ZooEntry("marian", "MarianMTModel", dict(_S2S, decoder_vocab_size=VOCAB), "seq2seq", stacks=2),
    "blenderbot": ZooEntry("blenderbot", "BlenderbotForConditionalGeneration", _S2S, "seq2seq", stacks=2),
    "led": ZooEntry(
        "led",
        "LEDForConditionalGeneration",
        dict(_S2S, max_encoder_position_embeddings=64, max_decoder_position_embeddings=64, attention_window=4),
        "seq2seq",
        stacks=2,
    ),
    "mt5": ZooEntry("mt5", "MT5ForConditionalGeneration", _T5, "seq2seq", stacks=2, rtol=1e-6),
    "umt5": ZooEntry("umt5", "UMT5ForConditionalGeneration", _T5, "seq2seq", stacks=2, rtol=1e-6),
    "longt5": ZooEntry(
        "longt5",
        "LongT5ForConditionalGeneration",
        dict(_T5, local_radius=4, encoder_attention_type="local"),
        "seq2seq",
        stacks=2,
        rtol=1e-6,
    ),
    # A loss on every attention map: the maps of layers >= 1 read the position bias that layer 0 computes and hands on.
    "t5-attention-loss": ZooEntry(
        "t5",
        "T5ForConditionalGeneration",
        _T5,
        "seq2seq",
        stacks=2,
        rtol=1e-6,
        forward_kwargs=dict(output_attentions=True),
        side_loss="attentions",
        attn_implementation="eager",
    ),
    # Trained as Switch trains: the router z-loss and load-balancing loss (router logits, side outputs) in the loss.
    "switch_transformers": ZooEntry(
        "switch_transformers",
        "SwitchTransformersForConditionalGeneration",
        dict(
            _T5,
            num_sparse_encoder_layers=1,
            num_sparse_decoder_layers=1,
            num_experts=4,
            expert_capacity=16,
            router_z_loss_coef=0.1,
            router_aux_loss_coef=0.1,
        ),
        "seq2seq",
        stacks=2,
        rtol=1e-6,
        forward_kwargs=dict(output_router_logits=True),
    ),
    # ----- audio
    "whisper": ZooEntry(
        "whisper",
        "WhisperModel",
        dict(_S2S, num_mel_bins=8, max_source_positions=6, max_target_positions=64),
        "whisper",
        stacks=2,
    ),
    "audio-spectrogram-transformer": ZooEntry(
        "audio-spectrogram-transformer",
        "ASTModel",
        dict(_VISION, num_mel_bins=16, max_length=16, frequency_stride=4, time_stride=4),
        "ast",
    ),
    "wav2vec2": ZooEntry("wav2vec2", "Wav2Vec2Model", _AUDIO, "audio"),  # its feature encoder trains
    "hubert": ZooEntry("hubert", "HubertModel", _AUDIO, "audio"),
    # ----- more vision
    "beit": ZooEntry("beit", "BeitForImageClassification", dict(_VISION, use_relative_position_bias=True), "vision"),
    "vit_msn": ZooEntry("vit_msn", "ViTMSNForImageClassification", _VISION, "vision"),
    "ijepa": ZooEntry("ijepa", "IJepaForImageClassification", _VISION, "vision"),
    "clip_vision_model": ZooEntry("clip_vision_model", "CLIPVisionModel", _VISION, "image"),
    "siglip_vision_model": ZooEntry("siglip_vision_model", "SiglipVisionModel", _VISION, "image"),
    "vitdet": ZooEntry(
        "vitdet",
        "VitDetModel",
        dict(_VISION, pretrain_image_size=16, window_block_indices=[], use_relative_position_embeddings=False),
        "image",
    ),
    "swin": ZooEntry("swin", "SwinForImageClassification", dict(_SWIN, num_labels=5), "vision", stacks=2),
    "swinv2": ZooEntry("swinv2", "Swinv2ForImageClassification", dict(_SWIN, num_labels=5), "vision", stacks=2),
    # ----- stages of down-sampling models: the residual blocks inside each stage are the stacks; a stage's first
    # layer, when it down-samples or projects its shortcut, stays outside (depth 4: a stack of 3 after it).
    # layer_scale_init_value=1: at the shipped 1e-6 the blocks add almost nothing and k < L would equal backprop.
    "convnext": ZooEntry(
        "convnext",
        "ConvNextForImageClassification",
        dict(_STAGES, num_stages=2, patch_size=2, layer_scale_init_value=1.0),
        "vision",
        stacks=2,
    ),
    "convnextv2": ZooEntry(
        "convnextv2", "ConvNextV2ForImageClassification", dict(_STAGES, num_stages=2, patch_size=2), "vision", stacks=2
    ),
    "dinov3_convnext": ZooEntry(
        "dinov3_convnext", "DINOv3ConvNextModel", dict(_STAGES, layer_scale_init_value=1.0), "image", stacks=2
    ),
    "bit": ZooEntry(  # pre-activation layers (the default): h + g(h)
        "bit",
        "BitForImageClassification",
        dict(_STAGES, embedding_size=8, depths=[4, 4], num_groups=2),
        "vision",
        stacks=2,
    ),
    "bit-bottleneck": ZooEntry(  # relu(h + g(h)): the residual path is gated by relu' (as ResNet's)
        "bit",
        "BitForImageClassification",
        dict(_STAGES, embedding_size=8, depths=[4, 4], num_groups=2, layer_type="bottleneck"),
        "vision",
        stacks=2,
    ),
    "regnet": ZooEntry(  # relu(h + g(h)), as ResNet's
        "regnet",
        "RegNetForImageClassification",
        dict(_STAGES, embedding_size=8, depths=[4, 4], groups_width=8),
        "vision",
        stacks=2,
    ),
    "cvt": ZooEntry(
        "cvt",
        "CvtForImageClassification",
        dict(embed_dim=[8, 16, 32], depth=[3, 3, 3], num_heads=[1, 2, 2], num_labels=5),
        "vision",
        stacks=3,
    ),
    "pvt": ZooEntry(
        "pvt",
        "PvtForImageClassification",
        dict(
            image_size=16, num_encoder_blocks=2, depths=[3, 3], sequence_reduction_ratios=[2, 1],
            hidden_sizes=[16, 32], patch_sizes=[4, 2], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
            num_labels=5,
        ),
        "vision",
        stacks=2,
    ),
    "poolformer": ZooEntry(
        "poolformer",
        "PoolFormerForImageClassification",
        dict(
            _STAGES, num_encoder_blocks=2, patch_sizes=[3, 3], strides=[2, 2], padding=[1, 1],
            layer_scale_init_value=1.0,
        ),
        "vision",
        stacks=2,
        rtol=1e-9,  # its token mixer pool(x) - x cancels: observed 1.2e-10 at k = L against autograd
    ),
    "glpn": ZooEntry(
        "glpn",
        "GLPNModel",
        dict(
            num_encoder_blocks=2, depths=[3, 3], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[3, 3],
            strides=[2, 2], num_attention_heads=[1, 2], initializer_range=0.2,
        ),
        "image",
        stacks=2,
    ),
    "hiera": ZooEntry(  # the first layer of each later stage pools its queries: it stays outside the stack
        "hiera",
        "HieraForImageClassification",
        dict(
            image_size=[16, 16], patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1], embed_dim=8,
            depths=[3, 4], num_heads=[1, 2], query_stride=[2, 2], num_query_pool=1, masked_unit_size=[4, 4],
            num_labels=5,
        ),
        "vision",
        stacks=2,
    ),
    # ----- one layer applied at several depths: Highway-BP over the unrolled depth (ALBERT's default: one layer)
    "albert": ZooEntry("albert", "AlbertForMaskedLM", dict(_ENC, embedding_size=16), "mlm"),
    # ----- per-layer side inputs: each layer reads its own slice of a tensor made from the embeddings
    "gemma3n_text": ZooEntry(
        "gemma3n_text",
        "Gemma3nForCausalLM",
        dict(
            _GQA, head_dim=8, num_kv_shared_layers=0, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
            laurel_rank=4, altup_num_inputs=2, sliding_window=4, activation_sparsity_pattern=[0.0] * ZOO_LAYERS,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], intermediate_size=[48] * 3,
        ),
        "lm",
    ),
    # Gemma4RMSNorm normalizes in float32 whatever the model's dtype: observed <= 7e-8 against the reference.
    "gemma4_text": ZooEntry(
        "gemma4_text",
        "Gemma4ForCausalLM",
        dict(
            _GQA, head_dim=8, global_head_dim=8, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
            sliding_window=4,
        ),
        "lm",
        rtol=1e-6,
    ),
    # ----- time series
    "patchtst": ZooEntry(  # its layers take `hidden_state=`
        "patchtst",
        "PatchTSTForPrediction",
        dict(
            num_input_channels=2, context_length=16, patch_length=4, patch_stride=4, d_model=16, num_attention_heads=2,
            num_hidden_layers=ZOO_LAYERS, ffn_dim=32, prediction_length=4,
        ),
        "timeseries",
    ),
    # ----- two residual streams handed on by each layer: the state is a tuple (docs/algorithm.md)
    "luke": ZooEntry(  # word and entity states; the loss reads both (masked-LM and masked-entity heads)
        "luke",
        "LukeForMaskedLM",
        dict(_ENC, entity_vocab_size=ENTITY_VOCAB, entity_emb_size=16),
        "entity-mlm",
        streams={0: ((1, 1),)},
    ),
    "lilt": ZooEntry(  # text and layout states (the layout stream is narrower: hidden_size / channel_shrink_ratio)
        "lilt",
        "LiltForSequenceClassification",
        dict(_ENC, hidden_size=24, channel_shrink_ratio=2, num_labels=3),
        "layout-seqcls",
        streams={0: ((1, 1),)},
    ),
    # global tokens that each encoder layer returns and the next one reads: a second stream of the encoder's state
    "pegasus_x": ZooEntry(
        "pegasus_x",
        "PegasusXForConditionalGeneration",
        dict(_S2S, num_global_tokens=4, block_size=4, stagger_local_blocks=False),
        "seq2seq",
        stacks=2,
        streams={0: ((1, 1),)},
    ),
    # ----- discovery by structure: layer counts that are no config key
    "nemotron_h": ZooEntry(  # hybrid: Mamba, attention and MLP blocks in one stack; its count is a property
        "nemotron_h",
        "NemotronHForCausalLM",
        dict(
            _GQA, layers_block_type=["mamba", "attention", "mlp"], mamba_num_heads=4, mamba_head_dim=8,
            ssm_state_size=8, n_groups=1, head_dim=8,
        ),
        "lm",
    ),
}  # fmt: skip


# Entries the library does not run right yet; strict: when it does, the XPASS fails and the mark must go.
ZOO_PENDING: dict[str, str] = {}

# Models Highway-BP must refuse, before any gradient exists, with a message that names a way out.
WAY_OUT = r"layers=|unpatch_model|ordinary backprop|do not patch|layerdrop"
_FUNNEL = dict(vocab_size=VOCAB, d_model=32, n_head=4, d_head=8, d_inner=48)
REFUSED = {
    # reversible layers: run without gradients and recomputed inside the model's own backward
    "reformer": ZooEntry(
        "reformer",
        "ReformerModelWithLMHead",
        dict(
            vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, attention_head_size=8, feed_forward_size=48,
            attn_layers=["local"] * ZOO_LAYERS, axial_pos_embds=False, max_position_embeddings=64, is_decoder=True,
            pad_token_id=0, local_attn_chunk_length=4,
        ),
        "lm",
    ),
    # num_decoder_layers == len(block_sizes): the list of blocks (ModuleLists, never called) looks like a stack
    "funnel": ZooEntry("funnel", "FunnelForMaskedLM", dict(_FUNNEL, block_sizes=[1, 1], num_decoder_layers=2), "mlm"),
    # the encoder's layers call layer.forward() directly: no hook ever runs
    "squeezebert": ZooEntry(
        "squeezebert",
        "SqueezeBertForMaskedLM",
        dict(_ENC, embedding_size=32, q_groups=1, k_groups=1, v_groups=1, post_attention_groups=1,
             intermediate_groups=1, output_groups=1),
        "mlm",
    ),
    # per-operation lists (attentions, layer_norm1, ffns, layer_norm2), each as long as the model is deep
    "xlm": ZooEntry(
        "xlm", "XLMWithLMHeadModel",
        dict(vocab_size=VOCAB, emb_dim=32, n_layers=ZOO_LAYERS, n_heads=4, max_position_embeddings=64, pad_index=0),
        "lm",
    ),
    # position embeddings added between the layers
    "yolos": ZooEntry("yolos", "YolosModel", dict(_TEXT, image_size=[16, 16], patch_size=4, num_detection_tokens=2,
                                                    num_channels=3), "image"),
}  # fmt: skip
REFUSAL_PENDING: dict[str, str] = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread runs them several times faster than two on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
