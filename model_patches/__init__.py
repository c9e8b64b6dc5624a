"""Models whose structure misleads stack discovery (``hf_hwbp.discovery``), keyed by ``config.model_type``.

Most transformers models need nothing here: their residual stack is found from their structure. An entry is a
function ``model -> [(path, layers), ...]`` returning the stacks in the order the forward runs them.
``residual_gate`` (``gates.py``) knows the layer classes that are ``act(h + g(h))`` rather than ``h + g(h)``
(``POST_ACTIVATION_LAYERS``): it gives the diagonal of their residual path from a layer's output (docs/algorithm.md,
residual paths that are not the identity), or raises for an activation it cannot express that way.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .albert import albert_stacks
from .gates import POST_ACTIVATION_LAYERS, relu_residual_gate, residual_gate
from .resnet import resnet_stacks

# (path, layers) or (path, layers, repeats): see discovery.Stack.
StackFinder = Callable[[nn.Module], list[tuple]]

STACK_FINDERS: dict[str, StackFinder] = {"albert": albert_stacks, "resnet": resnet_stacks}

# Models Highway-BP refuses at patch_model, with the reason and the way out (their structure looks like a stack).
REFUSED_MODEL_TYPES: dict[str, str] = {
    "reformer": "its layers run inside a reversible autograd Function with gradients disabled and are recomputed in "
    "its backward, so no training forward of them can be recorded. Train it with ordinary backprop (do not patch "
    "it).",
}


# The model types of the zoo in tests/test_zoo.py (exact at k >= L and equal to the independent reference below),
# kept equal to it by a test. Discovery is not limited to them.
TESTED_MODEL_TYPES = (
    "albert", "audio-spectrogram-transformer", "bart", "beit", "bert", "big_bird", "biogpt", "bit", "blenderbot",
    "clip_vision_model", "codegen", "cohere", "convbert", "convnext", "convnextv2", "cvt", "deberta-v2", "deit",
    "dinov2", "dinov3_convnext", "distilbert", "electra", "esm", "falcon", "gemma", "gemma2", "gemma3_text",
    "gemma3n_text", "gemma4_text", "glm", "glpn", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gptj", "granite",
    "hiera", "hubert", "ijepa", "layoutlm", "led", "llama", "longformer", "longt5", "mamba", "marian", "mistral",
    "mixtral", "mpnet", "mpt", "mt5", "nemotron_h", "olmo", "olmo2", "olmoe", "openai-gpt", "opt", "patchtst",
    "pegasus", "persimmon", "phi", "phi3", "poolformer", "pvt", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "regnet",
    "resnet", "roberta", "roformer", "rwkv", "siglip_vision_model", "stablelm", "starcoder2", "swin", "swinv2",
    "switch_transformers", "t5", "umt5", "vit", "vit_msn", "vitdet", "wav2vec2", "whisper", "xlm-roberta", "xlnet",
)  # fmt: skip


def supported_model_types() -> list[str]:
    """The model types tested end to end (the zoo). Others work too when discovery finds their stack."""
    return sorted(TESTED_MODEL_TYPES)


__all__ = [
    "REFUSED_MODEL_TYPES",
    "POST_ACTIVATION_LAYERS",
    "STACK_FINDERS",
    "TESTED_MODEL_TYPES",
    "relu_residual_gate",
    "residual_gate",
    "StackFinder",
    "supported_model_types",
]
