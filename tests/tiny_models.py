"""Tiny random transformers models for the tests, built from configs (no downloads)."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ZooEntry:
    """One architecture of the zoo: how to build it from a tiny config and feed it.

    ``task``: "lm" (causal LM with labels), "mlm" (masked LM), "seqcls", "vision", "seq2seq", "resnet".
    ``dtype``: float64 unless the model's kernels refuse it (MoE grouped matmuls: float32).
    ``rtol``: the tolerance of the comparisons when the dtype's own (tests/test_zoo.py) does not apply.
    """

    model_type: str
    model_class: str
    config: dict
    task: str
    dtype: torch.dtype = torch.float64
    stacks: int = 1
    rtol: float | None = None

    def build(self, seed: int = 0, **overrides) -> torch.nn.Module:
        import transformers

        torch.manual_seed(seed)
        config = transformers.AutoConfig.for_model(self.model_type, **{**self.config, **overrides})
        return getattr(transformers, self.model_class)(config).to(self.dtype).train()

    def batch(self, seed: int = 1) -> dict:
        g = torch.Generator().manual_seed(seed)
        if self.task in ("vision", "resnet"):
            pixels = torch.randn(BATCH, 3, 16, 16, generator=g, dtype=torch.float64).to(self.dtype)
            return {"pixel_values": pixels, "labels": torch.randint(0, 5, (BATCH,), generator=g)}
        ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
        if self.task == "seqcls":
            return {"input_ids": ids, "labels": torch.randint(0, 3, (BATCH,), generator=g)}
        if self.task == "seq2seq":
            return {"input_ids": ids, "labels": torch.randint(1, VOCAB, (BATCH, SEQ - 3), generator=g)}
        return {"input_ids": ids, "labels": ids}


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
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread runs them several times faster than two on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
