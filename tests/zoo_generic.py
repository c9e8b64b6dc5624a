"""Tiny random models of every model type of the installed transformers, built generically (for the survey).

``tiny_config(model_type)`` takes the config class's defaults and shrinks every size it recognises by name, in the
config and in its sub-configs (layer counts to ``ZOO_LAYERS``, stage depths to at most 3, widths to 32, heads to 4,
feed-forward sizes to 64, experts to 4, images to 32 pixels, vocabularies to 128 tokens where the special token ids
allow it), keeping per-layer lists as long as the layer count. ``generic_inputs(model)`` feeds the base model
(``AutoModel``) what its ``main_input_name`` asks for. ``OVERRIDES`` gives the few model types whose config or
input the generic rules cannot guess. Nothing here is part of the tested library: a type this cannot build is
reported as "not built", with the error.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch
from tiny_models import _AUDIO, ZOO_LAYERS, ZOO_SEED, _projection

WIDTH = 32
HEADS = 4
BATCH = 2
SEQ = 12
IMAGE = 32
AUDIO_SAMPLES = 400

_LAYER_COUNT = re.compile(
    r"^(num_hidden_layers|num_layers|n_layers?|num_decoder_layers|num_encoder_layers|encoder_layers|decoder_layers|"
    r"depth|num_blocks|num_transformer_layers|text_layers|vision_layers|num_text_layers|num_vision_layers|"
    r"audio_layers|n_attn_blocks|num_attention_layers|num_backbone_layers)$"
)
_WIDTH = re.compile(
    r"^(hidden_size|d_model|n_embd|dim|emb_dim|embed_dim|word_embed_proj_dim|embedding_size|encoder_hidden_size|"
    r"decoder_hidden_size|text_hidden_size|vision_hidden_size|projection_dim|out_hidden_size|hidden_dim|"
    r"output_hidden_size|projector_hidden_size|input_embedding_size|output_embedding_size)$"
)
_HEADS = re.compile(r"^(num_attention_heads|n_heads?|num_heads|encoder_attention_heads|decoder_attention_heads|"
                    r"decoder_num_attention_heads|mamba_n_heads|linear_num_value_heads|index_n_heads)$")  # fmt: skip
_KV_HEADS = re.compile(r"^(num_key_value_heads|num_kv_heads|linear_num_key_heads|n_kv_heads)$")
_HEAD_DIM = re.compile(
    r"(head_dim|^kv_channels|^d_kv|^attention_head_size|^mamba_head_dim|^linear_key_head_dim|^linear_value_head_dim)$"
)
_FFN = re.compile(
    r"^(intermediate_size|ffn_dim|encoder_ffn_dim|decoder_ffn_dim|d_ff|d_inner|n_inner|mlp_dim|feed_forward_size|"
    r"decoder_intermediate_size|dense_intermediate_size)$"
)
_SMALL_FFN = re.compile(r"^(moe_intermediate_size|shared_expert_intermediate_size|expert_intermediate_size)$")
_EXPERTS = re.compile(r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts)$")
_TOP_K = re.compile(r"^(num_experts_per_tok|moe_topk|top_k|num_experts_per_token)$")
_INDICES = re.compile(r"(indexes|indices|index_list|_layer_ids|layers_to_)")
_MAMBA_HEADS = (
    ("num_heads", "head_dim", "expand"),
    ("mamba_n_heads", "mamba_d_head", "mamba_expand"),
    ("mamba_num_heads", "mamba_head_dim", "mamba_expand"),
)
_STATE = re.compile(r"^(state_size|ssm_state_size|mamba_d_state|d_state)$")


def _shrink(values: dict) -> dict:
    """One config's dict (sub-configs are dicts inside it), shrunk in place of a copy."""
    out = dict(values)
    old_counts: set[int] = set()
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(key, str):
            continue
        if isinstance(value, dict) and ("model_type" in value or any(isinstance(v, int) for v in value.values())):
            out[key] = _shrink(value)
        elif isinstance(value, int):
            if _LAYER_COUNT.match(key) and value > ZOO_LAYERS:
                old_counts.add(value)
                out[key] = ZOO_LAYERS
            elif _WIDTH.match(key) and value > WIDTH:
                out[key] = WIDTH
            elif _HEADS.match(key) and value > HEADS:
                out[key] = HEADS
            elif _KV_HEADS.match(key) and value > 2:
                out[key] = 2
            elif _HEAD_DIM.search(key) and value > 8:
                out[key] = 8
            elif _FFN.match(key) and value > 2 * WIDTH:
                out[key] = 2 * WIDTH
            elif _SMALL_FFN.match(key) and value > 16:
                out[key] = 16
            elif _EXPERTS.match(key) and value > 4:
                out[key] = 4
            elif _TOP_K.match(key) and value > 2:
                out[key] = 2
            elif key.endswith("lora_rank") and value > 16:
                out[key] = 16
            elif _STATE.match(key) and value > 8:
                out[key] = 8
            elif key in ("n_group", "topk_group", "num_shared_experts", "n_shared_experts") and value > 1:
                out[key] = 1
            elif key == "first_k_dense_replace" and value > 1:
                out[key] = 1
            elif key == "image_size" and value > IMAGE:
                out[key] = IMAGE
            elif key in ("patch_size", "window_size") and value > 4:
                out[key] = 4 if key == "patch_size" else 2
        elif isinstance(value, (list, tuple)) and value and all(type(v) is int for v in value):
            if key == "depths":
                out[key] = [min(v, 3) for v in value]
            elif key in ("hidden_sizes", "embed_dim", "embed_dims", "hidden_dims", "widths"):
                out[key] = [16 * 2**i for i in range(len(value))]
            elif key in ("num_heads", "num_attention_heads"):
                out[key] = [2**i for i in range(len(value))]
            elif key == "image_size" and max(value) > IMAGE:
                out[key] = [IMAGE] * len(value)
    for key, value in out.items():  # per-layer lists follow the layer count; layer indices stay below it
        if isinstance(value, (list, tuple)) and len(value) in old_counts and key not in ("depths",):
            out[key] = _every_kind(list(value), ZOO_LAYERS)
        elif isinstance(key, str) and _INDICES.search(key) and isinstance(value, (list, tuple)) and old_counts:
            if all(isinstance(v, int) for v in value):
                out[key] = [v for v in value if v < ZOO_LAYERS] or [ZOO_LAYERS - 1]
        elif isinstance(value, dict) and old_counts and value and all(_is_index(k) for k in value):
            out[key] = {k: v for k, v in value.items() if int(k) < ZOO_LAYERS}  # per-layer settings by index
    for key in ("out_features", "out_indices", "stage_names"):  # backbones: derived from the stages again
        out.pop(key, None)
    # Mamba-2 heads: heads * head_dim = expand * hidden
    for heads, head_dim, expand in _MAMBA_HEADS:
        if all(isinstance(out.get(k), int) for k in (heads, head_dim, expand)) and "hidden_size" in out:
            out[heads] = out[expand] * out["hidden_size"] // out[head_dim]
    for rope_key in ("rope_parameters", "rope_scaling"):  # multimodal rotary sections add up to head_dim / 2
        rope = out.get(rope_key)
        if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list):
            out[rope_key] = dict(rope, mrope_section=[1, 1, 2][: len(rope["mrope_section"])])
    if isinstance(out.get("conv_dim"), (list, tuple)):  # raw-audio feature encoders: the zoo's two conv layers
        out.update({k: _AUDIO[k] for k in ("conv_dim", "conv_kernel", "conv_stride")}, num_feat_extract_layers=2)
    return out


def _is_index(key) -> bool:
    return isinstance(key, int) or isinstance(key, str) and key.isdigit()


def _every_kind(values: list, n: int) -> list:
    """The first ``n`` entries of a per-layer list, with each kind of entry kept (a hybrid's attention layers)."""
    kinds = list(dict.fromkeys(map(repr, values)))
    if len(kinds) <= 1 or len(kinds) > n:
        return values[:n]
    picked = [values[[repr(v) for v in values].index(kind)] for kind in kinds]
    return picked + values[: n - len(picked)]


def _special_ids(values: dict) -> set[int]:
    ids: set[int] = set()
    for key, value in values.items():
        if isinstance(value, dict):
            ids |= _special_ids(value)
        elif isinstance(key, str) and re.search(r"token_id$|token_index$|^pad_index$", key):
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                    ids.add(v)
    return ids


def _small_vocab(values: dict, top: int) -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out[key] = _small_vocab(value, top)
        elif isinstance(key, str) and key.endswith("vocab_size") and isinstance(value, int) and value > top:
            out[key] = top
        else:
            out[key] = value
    return out


def tiny_config(model_type: str, **overrides):
    import transformers

    config_class = transformers.CONFIG_MAPPING[model_type]
    values = config_class().to_dict()
    for key in ("dtype", "torch_dtype", "transformers_version", "architectures", "_name_or_path", "model_type"):
        values.pop(key, None)
    values = _shrink(values)
    ids = _special_ids(values)
    if not ids or max(ids) < 4096:
        values = _small_vocab(values, max(128, max(ids, default=0) + 1))
    values.update(overrides)
    return config_class(**values)


def _find(config, name: str, default=None):
    """The first value of ``name`` in the config or its sub-configs."""
    value = getattr(config, name, None)
    if value is not None:
        return value
    for sub in vars(config).values():
        if hasattr(sub, "to_dict") and hasattr(sub, "model_type"):
            value = _find(sub, name)
            if value is not None:
                return value
    return default


def generic_inputs(model: torch.nn.Module, seed: int = 1) -> dict:
    """A batch for ``model.forward`` from its ``main_input_name`` and its config's sizes."""
    config = model.config
    g = torch.Generator().manual_seed(seed)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    name = getattr(model, "main_input_name", "input_ids")
    parameters = inspect.signature(model.forward).parameters
    batch: dict = {}
    if name == "input_ids" or "input_ids" in parameters and name not in parameters:
        vocab = _find(config, "vocab_size", 128)
        special = _special_ids(config.to_dict())
        pool = torch.tensor([i for i in range(3, min(vocab, 128)) if i not in special])
        batch["input_ids"] = pool[torch.randint(0, len(pool), (BATCH, SEQ), generator=g)]
    elif name in ("pixel_values", "pixel_values_videos"):
        channels = _find(config, "num_channels", 3)
        size = _find(config, "image_size", IMAGE)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        shape = (BATCH, channels, h, w)
        frames = _find(config, "num_frames")
        if frames is not None and "video" in type(model).__name__.lower() or name == "pixel_values_videos":
            shape = (BATCH, frames or 2, channels, h, w)
        batch[name] = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    elif name == "input_values":
        batch[name] = torch.randn(BATCH, AUDIO_SAMPLES, generator=g, dtype=torch.float64).to(dtype)
    elif name == "input_features":
        bins = _find(config, "num_mel_bins", _find(config, "feature_size", 80))
        frames = 2 * (_find(config, "max_source_positions", 8) or 8)
        batch[name] = torch.randn(BATCH, bins, min(frames, 64), generator=g, dtype=torch.float64).to(dtype)
    else:
        raise NotImplementedError(f"no generic input for main_input_name={name!r}")
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in parameters:
        vocab = _find(config, "vocab_size", 128)
        batch["decoder_input_ids"] = torch.randint(3, min(vocab, 128), (BATCH, SEQ - 3), generator=g)
    return batch


def _floating_outputs(value, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() and value.requires_grad else []
    if depth > 2:
        return []
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _floating_outputs(v, depth + 1)]
    return []


@dataclass(frozen=True)
class GenericCase:
    """A model type built by ``tiny_config`` as its base model (``AutoModel``), with the ``ZooEntry`` interface the
    survey uses. The loss is a fixed random projection of every floating output that requires grad."""

    model_type: str
    model_class: str = "AutoModel"
    dtype: torch.dtype = torch.float64
    overrides: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)  # extra inputs, or callables model -> tensor
    rtol: float | None = None
    task: str = "generic"
    stacks: int = 1

    def build(self, seed: int = 0) -> torch.nn.Module:
        import transformers

        torch.manual_seed(seed)
        config = tiny_config(self.model_type, **self.overrides)
        cls = getattr(transformers, self.model_class)
        model = cls.from_config(config) if self.model_class.startswith("AutoModel") else cls(config)
        model = model.to(self.dtype).train()
        object.__setattr__(self, "_model", model)  # generic_inputs reads the built model's config
        return model

    def batch(self, seed: int = 1) -> dict:
        model = self.__dict__.get("_model")
        if model is None:
            model = self.build()
        batch = generic_inputs(model, seed)
        for key, value in self.inputs.items():
            batch[key] = value(model) if callable(value) else value
        return batch

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        import numpy as np

        torch.manual_seed(ZOO_SEED)
        np.random.seed(ZOO_SEED)
        outputs = _floating_outputs(model(**batch))
        if not outputs:
            raise RuntimeError("the model returned no floating output that requires grad")
        return sum(_projection(t, 123 + i) for i, t in enumerate(outputs))


# Model types whose sizes or inputs the generic rules cannot guess.
OVERRIDES: dict[str, dict] = {
    "wav2vec2": dict(overrides=dict(_AUDIO)),
}


def model_types() -> list[str]:
    """Every model type of the installed transformers that has a base model class (``AutoModel``)."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return sorted(MODEL_MAPPING_NAMES)


def generic_case(model_type: str) -> GenericCase:
    return GenericCase(model_type, **OVERRIDES.get(model_type, {}))
