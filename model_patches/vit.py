"""ViT (``model_type="vit"``): discovery finds its stack (``vit.layers``); the family's entry holds the stage
recipe of ``ViTForImageClassification`` (single-label) for layer-parallel training, read off ``ViTModel.forward`` and
``ViTForImageClassification.forward`` (the [CLS] token of the final layer norm to the classifier)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from hf_hwbp.errors import UnsupportedModelError

from .recipes import BIDIRECTIONAL, StageRecipe
from .registry import ModelFamily, StageRecipeEntry


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

FAMILY = ModelFamily(
    name="ViT",
    model_types=("vit",),
    stage_recipes={"vit": StageRecipeEntry("ViTForImageClassification", VIT_RECIPE)},
)
