"""Per-architecture stage recipes: where the pieces of a model live and how its layers are called.

A recipe is data plus small functions, read off the model's own forward in transformers 5.x (``GPT2Model.forward``,
``LlamaModel.forward`` and the Llama-shaped decoders, ``ViTModel.forward`` + ``ViTForImageClassification.forward``):
the first stage runs the embeddings, every stage builds the layer side inputs (attention masks, position ids, the
rotary ``position_embeddings``) for itself from the batch shape, the last stage runs the final norm, the head and the
model's own ``loss_function``. ``tests/test_parallel.py`` checks every recipe against the model's own forward.

Supported: causal LMs of the GPT-2 and Llama families (``GPT2LMHeadModel``; ``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``) and ``ViTForImageClassification`` (single-label).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError

CAUSAL, SLIDING, BIDIRECTIONAL = "full_attention", "sliding_attention", "bidirectional"


@dataclass(frozen=True)
class StageRecipe:
    """How one architecture is cut into stages.

    Attributes:
        name: the family, for messages.
        layers: dotted path of the ``nn.ModuleList`` of residual layers.
        embeddings: role -> dotted path of the modules the first stage runs before the stack.
        head: role -> dotted path of the modules the last stage runs after the stack (final norm, head).
        embed: ``(embedding modules, model input, position_ids) -> h_0``.
        layer_kwargs: ``(shared modules, h, attention mask, position_ids) -> keyword arguments of every layer``.
        logits: ``(head modules, h_L) -> logits``.
        loss: ``(loss_function, config, logits, labels, num_items_in_batch) -> loss``, with the model's own
            ``loss_function`` and config.
        count_items: ``labels -> the number of loss terms`` (what ``num_items_in_batch`` counts).
        activation_shape: ``(config, model input) -> shape of the residual stream``.
        mask_kinds: ``config -> the attention mask kind of every layer`` (``CAUSAL``, ``SLIDING``, ``BIDIRECTIONAL``).
        input_name: the model's input the first stage reads (``input_ids``, ``pixel_values``).
        labels_from_input: without labels, the inputs are the labels (causal LMs).
        shared: role -> dotted path of parameter-free modules every stage keeps (e.g. rotary embeddings).
        check: ``model -> None``, raises ``ValueError`` for a configuration the recipe does not reproduce.
    """

    name: str
    layers: str
    embeddings: Mapping[str, str]
    head: Mapping[str, str]
    embed: Callable[[Mapping[str, nn.Module], Tensor, Tensor], Tensor]
    layer_kwargs: Callable[[Mapping[str, nn.Module], Tensor, Tensor | None, Tensor], dict]
    logits: Callable[[Mapping[str, nn.Module], Tensor], Tensor]
    loss: Callable[[Callable, object, Tensor, Tensor, int | Tensor | None], Tensor]
    count_items: Callable[[Tensor], int]
    activation_shape: Callable[[object, Tensor], tuple[int, ...]]
    mask_kinds: Callable[[object], list[str]]
    input_name: str = "input_ids"
    labels_from_input: bool = True
    shared: Mapping[str, str] = field(default_factory=dict)
    check: Callable[[nn.Module], None] = lambda model: None


# ----- causal LMs ----------------------------------------------------------------------------------------------------
def _causal_lm_loss(loss_function, config, logits: Tensor, labels: Tensor, num_items_in_batch) -> Tensor:
    """The model's causal-LM loss (labels shifted inside, -100 ignored): the mean over this batch's tokens, or their
    sum over ``num_items_in_batch`` (micro-batches, gradient accumulation)."""
    return loss_function(logits, labels, vocab_size=config.vocab_size, num_items_in_batch=num_items_in_batch)


def _count_shifted_tokens(labels: Tensor) -> int:
    return int((labels[..., 1:] != -100).sum())


def _token_stream_shape(config, input_ids: Tensor) -> tuple[int, ...]:
    return (*input_ids.shape, config.hidden_size)


def _lm_logits(head: Mapping[str, nn.Module], h: Tensor) -> Tensor:
    return head["lm_head"](head["norm"](h))


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
    logits=_lm_logits,
    loss=_causal_lm_loss,
    count_items=_count_shifted_tokens,
    activation_shape=_token_stream_shape,
    mask_kinds=lambda config: [CAUSAL] * config.num_hidden_layers,
    check=_check_gpt2,
)


def _llama_family_recipe(name: str, mask_kinds: Callable[[object], list[str]]) -> StageRecipe:
    return StageRecipe(
        name=name,
        layers="model.layers",
        embeddings={"embed_tokens": "model.embed_tokens"},
        head={"norm": "model.norm", "lm_head": "lm_head"},
        shared={"rotary_emb": "model.rotary_emb"},
        embed=lambda m, ids, pos: m["embed_tokens"](ids),
        layer_kwargs=lambda m, h, mask, pos: {
            "attention_mask": mask,
            "position_ids": pos,
            "position_embeddings": m["rotary_emb"](h, position_ids=pos),
        },
        logits=_lm_logits,
        loss=_causal_lm_loss,
        count_items=_count_shifted_tokens,
        activation_shape=_token_stream_shape,
        mask_kinds=mask_kinds,
    )


LLAMA_RECIPE = _llama_family_recipe("Llama", lambda config: [CAUSAL] * config.num_hidden_layers)
# MistralModel.forward: one sliding-window mask for every layer when config.sliding_window is set
MISTRAL_RECIPE = _llama_family_recipe(
    "Mistral", lambda config: [CAUSAL if config.sliding_window is None else SLIDING] * config.num_hidden_layers
)
# Qwen2Model.forward / Qwen3Model.forward: the mask of config.layer_types[i] for layer i
QWEN_RECIPE = _llama_family_recipe("Qwen", lambda config: list(config.layer_types[: config.num_hidden_layers]))


# ----- ViT image classification ------------------------------------------------------------------------------------
def _vit_stream_shape(config, pixel_values: Tensor) -> tuple[int, ...]:
    height, width = pixel_values.shape[-2:]
    patches = (height // config.patch_size) * (width // config.patch_size)
    return (pixel_values.shape[0], patches + 1, config.hidden_size)  # + the [CLS] token


def _vit_embed(m: Mapping[str, nn.Module], pixel_values: Tensor, pos: Tensor) -> Tensor:
    embeddings = m["embeddings"]
    expected = embeddings.patch_embeddings.projection.weight.dtype  # ViTModel.forward casts the pixels
    return embeddings(pixel_values.to(expected))


def _vit_loss(loss_function, config, logits: Tensor, labels: Tensor, num_items_in_batch) -> Tensor:
    if (
        labels.dtype not in (torch.long, torch.int)
        or config.num_labels < 2
        or config.problem_type
        not in (
            None,
            "single_label_classification",
        )
    ):
        raise UnsupportedModelError(
            "Layer-parallel ViT trains single-label classification only (integer labels, num_labels >= 2): the "
            "regression and multi-label losses of transformers average each call, so micro-batches and gradient "
            f"accumulation would not add up to the batch's loss (problem_type={config.problem_type!r})."
        )
    return loss_function(labels, logits, config, num_items_in_batch=num_items_in_batch)


def _check_vit(model: nn.Module) -> None:
    if getattr(model.vit, "pooler", None) is not None:
        raise UnsupportedModelError("Layer-parallel ViT supports ViTForImageClassification (no pooler layer).")


VIT_RECIPE = StageRecipe(
    name="ViT",
    layers="vit.layers",
    embeddings={"embeddings": "vit.embeddings"},
    head={"norm": "vit.layernorm", "classifier": "classifier"},
    embed=_vit_embed,
    layer_kwargs=lambda m, h, mask, pos: {"attention_mask": mask},
    logits=lambda head, h: head["classifier"](head["norm"](h)[:, 0, :]),
    loss=_vit_loss,
    count_items=lambda labels: int((labels != -100).sum()),
    activation_shape=_vit_stream_shape,
    mask_kinds=lambda config: [BIDIRECTIONAL] * config.num_hidden_layers,
    input_name="pixel_values",
    labels_from_input=False,
    check=_check_vit,
)

# (model_type, task) -> recipe; the task is the head class the recipe reproduces
RECIPES: dict[str, tuple[str, StageRecipe]] = {
    "gpt2": ("GPT2LMHeadModel", GPT2_RECIPE),
    "llama": ("LlamaForCausalLM", LLAMA_RECIPE),
    "mistral": ("MistralForCausalLM", MISTRAL_RECIPE),
    "qwen2": ("Qwen2ForCausalLM", QWEN_RECIPE),
    "qwen3": ("Qwen3ForCausalLM", QWEN_RECIPE),
    "vit": ("ViTForImageClassification", VIT_RECIPE),
}


def supported_models() -> list[str]:
    """The model classes layer-parallel training supports."""
    return [cls for cls, _ in RECIPES.values()]


def get_module(model: nn.Module, path: str) -> nn.Module:
    module = model
    for attr in path.split("."):
        module = getattr(module, attr, None)
        if module is None:
            raise ValueError(f"{type(model).__name__} has no module at `{path}`.")
    return module


def recipe_for(model: nn.Module) -> StageRecipe:
    """The stage recipe of a supported model (see ``supported_models()``); a ``ValueError`` naming them otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    entry = RECIPES.get(model_type)
    supported = ", ".join(supported_models())
    if entry is None:
        raise UnsupportedModelError(
            f"Layer-parallel Highway-BP has no stage recipe for model_type={model_type!r} ({type(model).__name__}). "
            f"Supported: {supported}. Train other models with the single-process or DDP path (no layer_parallel)."
        )
    class_name, recipe = entry
    if all(cls.__name__ != class_name for cls in type(model).__mro__):
        raise UnsupportedModelError(
            f"Layer-parallel Highway-BP cuts {class_name} into stages, not {type(model).__name__} (its head and loss "
            f"differ). Supported: {supported}."
        )
    for path in (recipe.layers, *recipe.embeddings.values(), *recipe.head.values(), *recipe.shared.values()):
        get_module(model, path)
    recipe.check(model)
    return recipe
