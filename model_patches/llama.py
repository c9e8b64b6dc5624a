"""Llama and the Llama-shaped decoders (same layer loop, same residual stream): blocks in ``model.layers``."""

from .base import StackAdapter

LLAMA_ADAPTER = StackAdapter(name="Llama-family", stack_paths=("model.layers", "layers"))

# model_type values whose decoder layers are called as `layer(hidden_states, ...)` and return the new
# hidden state; each one is covered by the exactness tests.
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
