"""Tiny random transformers models for the tests, built from configs (no downloads)."""

from __future__ import annotations

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
