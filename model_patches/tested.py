"""The model types of the zoo in tests/test_zoo.py (exact at k >= L and equal to the independent reference there),
kept equal to it by a test. Discovery is not limited to them, and most need no model-family entry (``registry.py``).
"""

from __future__ import annotations

TESTED_MODEL_TYPES = (
    "albert", "audio-spectrogram-transformer", "bart", "beit", "bert", "big_bird", "biogpt", "bit", "blenderbot",
    "clip_vision_model", "codegen", "cohere", "convbert", "convnext", "convnextv2", "cvt", "deberta-v2", "deit",
    "dinov2", "dinov3_convnext", "distilbert", "electra", "esm", "falcon", "gemma", "gemma2", "gemma3_text",
    "gemma3n_text", "gemma4_text", "glm", "glpn", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gptj", "granite",
    "hiera", "hubert", "ijepa", "layoutlm", "led", "lilt", "llama", "longformer", "longt5", "luke", "mamba",
    "marian", "mistral", "mixtral", "mpnet", "mpt", "mt5", "nemotron_h", "olmo", "olmo2", "olmoe", "openai-gpt",
    "opt", "patchtst", "pegasus", "pegasus_x", "persimmon", "phi", "phi3", "poolformer", "pvt", "qwen2",
    "qwen2_moe", "qwen3", "qwen3_moe", "regnet", "resnet", "roberta", "roformer", "rwkv", "siglip_vision_model",
    "stablelm", "starcoder2", "swin", "swinv2", "switch_transformers", "t5", "umt5", "vit", "vit_msn", "vitdet",
    "wav2vec2", "whisper", "xlm-roberta", "xlnet",
)  # fmt: skip


def supported_model_types() -> list[str]:
    """The model types tested end to end (the zoo). Others work too when discovery finds their stack."""
    return sorted(TESTED_MODEL_TYPES)


__all__ = ["TESTED_MODEL_TYPES", "supported_model_types"]
