"""Stage: the part of a model that one rank holds, and the three things it can run on a batch.

Every rank may build the full model (same seed or same checkpoint); ``build_stage`` keeps references to its
own modules only, so once the caller drops the full model the other stages' weights are freed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask, create_sliding_window_causal_mask

from .arch import BIDIRECTIONAL, CAUSAL, SLIDING, StageRecipe, get_module, recipe_for
from .layout import StageLayout, make_layout

_MASK_BUILDERS = {CAUSAL: create_causal_mask, SLIDING: create_sliding_window_causal_mask}


def call_mask_builder(
    builder: Callable, config, h: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None = None
):
    """Call one of transformers' mask builders without a cache, as the installed transformers 5.x spells it.

    Their signatures moved within 5.x: ``input_embeds`` became ``inputs_embeds``, the required
    ``cache_position`` went away, ``past_key_values`` became ``cache``."""
    params = inspect.signature(builder).parameters
    kwargs = {"config": config, "attention_mask": attention_mask}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = h
    for name in ("cache", "past_key_values"):  # the new name only: passing the old one too warns on every rank
        if name in params:
            kwargs[name] = None
            break
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(h.shape[1], device=h.device)
    if position_ids is not None and "position_ids" in params:
        kwargs["position_ids"] = position_ids
    return builder(**kwargs)


class Stage(nn.Module):
    """Stage ``index`` of ``layout.num_stages``: embeddings (first), a run of layers, final norm + head (last).

    Attributes:
        index: the stage (= the rank in the pipeline group).
        layout: the placement of every layer and Highway block.
        layers: this stage's layers, bottom to top.
        blocks: this stage's Highway blocks as ranges into ``layers``.
        tied: parameters this stage shares with another stage (GPT-2's ``lm_head.weight`` is
            ``transformer.wte.weight``): their gradients are summed between the first and the last stage.
        has_tied: whether the model ties a parameter of the first stage to one of the last (every rank).
    """

    def __init__(self, model: nn.Module, index: int, layout: StageLayout, recipe: StageRecipe):
        super().__init__()
        self.index = index
        self.layout = layout
        self.recipe = recipe
        self.config = model.config
        self.loss_function = model.loss_function
        stack = get_module(model, recipe.layers)
        if len(stack) != layout.num_layers:
            raise ValueError(f"The layout covers {layout.num_layers} layers, the model has {len(stack)}.")
        self.layers = nn.ModuleList([stack[i] for i in layout.layers_of(index)])
        kinds = recipe.mask_kinds(model.config)
        self.mask_kinds = [kinds[i] for i in layout.layers_of(index)]  # the attention mask of each local layer
        self.blocks = layout.local_blocks(index)
        self.embeddings = nn.ModuleDict(
            {r: get_module(model, p) for r, p in recipe.embeddings.items()} if self.is_first else {}
        )
        self.head = nn.ModuleDict({r: get_module(model, p) for r, p in recipe.head.items()} if self.is_last else {})
        self.shared = nn.ModuleDict({r: get_module(model, p) for r, p in recipe.shared.items()})
        embedding_params = {id(p) for path in recipe.embeddings.values() for p in get_module(model, path).parameters()}
        head_params = [p for path in recipe.head.values() for p in get_module(model, path).parameters()]
        tied_ids = {id(p) for p in head_params if id(p) in embedding_params}
        self.has_tied = bool(tied_ids) and layout.num_stages > 1  # the same on every rank
        own = self.is_first != self.is_last  # a single stage holds both ends: nothing to exchange
        self.tied = [p for p in self.parameters() if id(p) in tied_ids] if own else []

    # ----- placement -----------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return self.layout.num_stages

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.layout.num_stages - 1

    @property
    def first_block(self) -> int:
        """Global 0-based index of this stage's first Highway block."""
        return self.layout.stage_blocks[self.index][0]

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.layers.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(p for p in self.layers.parameters()).device

    def activation_shape(self, model_input: Tensor) -> tuple[int, ...]:
        """The shape of the residual stream for a batch of this model input (token ids, pixels)."""
        return self.recipe.activation_shape(self.config, model_input)

    def count_items(self, labels: Tensor) -> int:
        """The loss terms of ``labels`` (tokens after the shift for causal LMs, samples for classification)."""
        return self.recipe.count_items(labels)

    def block_parameters(self) -> list[list[nn.Parameter]]:
        """The trainable parameters of each of this stage's Highway blocks."""
        out = []
        for block in self.blocks:
            seen: dict[int, nn.Parameter] = {}
            for i in block:
                for p in self.layers[i].parameters():
                    if p.requires_grad:
                        seen.setdefault(id(p), p)
            out.append(list(seen.values()))
        return out

    # ----- compute -------------------------------------------------------------------------------------
    def embed(self, model_input: Tensor) -> Tensor:
        """h_0 from the model input (token ids, pixels; first stage only)."""
        return self.recipe.embed(self.embeddings, model_input, self.position_ids(model_input.shape[1]))

    def position_ids(self, seq_len: int) -> Tensor:
        return torch.arange(seq_len, device=self.device).unsqueeze(0)

    def layer_kwargs(self, h: Tensor, attention_mask: Tensor | None = None) -> dict:
        """The side inputs the layers of this stage receive, built as the model's own forward builds them.

        When the stage's layers use different attention masks (Qwen's sliding-window layers), ``attention_mask``
        maps each mask kind to its mask and ``run_layers`` gives every layer its own."""
        position_ids = self.position_ids(h.shape[1])
        masks = {kind: self._mask(kind, h, attention_mask, position_ids) for kind in dict.fromkeys(self.mask_kinds)}
        mask = next(iter(masks.values())) if len(masks) == 1 else masks
        return self.recipe.layer_kwargs(self.shared, h, mask, position_ids)

    def _mask(self, kind: str, h: Tensor, attention_mask: Tensor | None, position_ids: Tensor):
        if kind == BIDIRECTIONAL:
            return call_mask_builder(create_bidirectional_mask, self.config, h, attention_mask)
        return call_mask_builder(_MASK_BUILDERS[kind], self.config, h, attention_mask, position_ids)

    def run_layers(self, h: Tensor, layer_indices: range, kwargs: dict) -> Tensor:
        masks = kwargs.get("attention_mask")
        for i in layer_indices:
            if isinstance(masks, dict):
                kwargs = {**kwargs, "attention_mask": masks[self.mask_kinds[i]]}
            out = self.layers[i](h, **kwargs)
            h = out[0] if isinstance(out, (tuple, list)) else out
        return h

    def logits(self, h_last: Tensor) -> Tensor:
        """Final norm and head on the stack output (last stage only)."""
        return self.recipe.logits(self.head, h_last)

    def loss(self, logits: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
        """The model's own loss (causal LMs shift the labels inside; -100 is ignored): the mean over this batch,
        or its sum divided by ``num_items_in_batch`` (micro-batches, gradient accumulation)."""
        return self.recipe.loss(self.loss_function, self.config, logits, labels, num_items_in_batch)


def build_stage(
    model: nn.Module,
    rank: int,
    world_size: int,
    *,
    group_size: int | str = 1,
    blocks_per_stage=None,
) -> Stage:
    """The stage ``rank`` of ``world_size`` of a supported model (``hf_hwbp.parallel.arch.supported_models()``).

    Args:
        model: the full model, identical on every rank.
        rank: this process's stage index in ``[0, world_size)``.
        world_size: the number of stages S (= processes in the pipeline group).
        group_size: layers per Highway block (as in ``patch_model``), or ``"stage"`` (one block per stage).
        blocks_per_stage: optional explicit number of Highway blocks per stage.

    Raises:
        ValueError: S exceeds the number of Highway blocks, ``rank`` is out of range, or the model is not
            supported.
    """
    recipe = recipe_for(model)
    num_layers = len(get_module(model, recipe.layers))
    layout = make_layout(num_layers, world_size, group_size, blocks_per_stage)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}.")
    return Stage(model, rank, layout, recipe)
