"""Stage: the part of a causal LM that one rank holds, and the three things it can run on a batch.

Every rank may build the full model (same seed or same checkpoint); ``build_stage`` keeps references to its
own modules only, so once the caller drops the full model the other stages' weights are freed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask

from .arch import StageRecipe, get_module, recipe_for
from .layout import StageLayout, make_layout


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

    def activation_shape(self, input_ids: Tensor) -> tuple[int, int, int]:
        return (*input_ids.shape, self.config.hidden_size)

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
    def embed(self, input_ids: Tensor) -> Tensor:
        """h_0 from token ids (first stage only)."""
        return self.recipe.embed(self.embeddings, input_ids, self.position_ids(input_ids.shape[1]))

    def position_ids(self, seq_len: int) -> Tensor:
        return torch.arange(seq_len, device=self.device).unsqueeze(0)

    def layer_kwargs(self, h: Tensor, attention_mask: Tensor | None = None) -> dict:
        """The side inputs every layer of this stage receives, built as the model's own forward builds them."""
        position_ids = self.position_ids(h.shape[1])
        mask = create_causal_mask(
            config=self.config, inputs_embeds=h, attention_mask=attention_mask, cache=None, position_ids=position_ids
        )
        return self.recipe.layer_kwargs(self.shared, h, mask, position_ids)

    def run_layers(self, h: Tensor, layer_indices: range, kwargs: dict) -> Tensor:
        for i in layer_indices:
            out = self.layers[i](h, **kwargs)
            h = out[0] if isinstance(out, (tuple, list)) else out
        return h

    def logits(self, h_last: Tensor) -> Tensor:
        """Final norm and LM head on the stack output (last stage only)."""
        return self.head["lm_head"](self.head["norm"](h_last))

    def loss(self, logits: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
        """The model's own causal-LM loss (labels are shifted inside, -100 ignored): the mean over this batch's
        tokens, or their sum divided by ``num_items_in_batch`` (micro-batches, gradient accumulation)."""
        return self.loss_function(
            logits, labels, vocab_size=self.config.vocab_size, num_items_in_batch=num_items_in_batch
        )


def build_stage(
    model: nn.Module,
    rank: int,
    world_size: int,
    *,
    group_size: int | str = 1,
    blocks_per_stage=None,
) -> Stage:
    """The stage ``rank`` of ``world_size`` of a GPT-2 or Llama causal LM.

    Args:
        model: the full model (GPT2LMHeadModel or LlamaForCausalLM), identical on every rank.
        rank: this process's stage index in ``[0, world_size)``.
        world_size: the number of stages S (= processes in the pipeline group).
        group_size: layers per Highway block (as in ``patch_model``), or ``"stage"`` (one block per stage).
        blocks_per_stage: optional explicit number of Highway blocks per stage.

    Raises:
        ValueError: S exceeds the number of Highway blocks, ``rank`` is out of range, or the model is not
            a supported causal LM.
    """
    recipe = recipe_for(model)
    num_layers = len(get_module(model, recipe.layers))
    layout = make_layout(num_layers, world_size, group_size, blocks_per_stage)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}.")
    return Stage(model, rank, layout, recipe)
