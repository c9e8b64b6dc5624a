"""Stage recipes: how layer-parallel training (``hf_hwbp.parallel``) cuts a model into stages.

A recipe is data plus small functions, read off the model's own forward in transformers 5.x: the first stage runs
the embeddings, every stage builds the layer side inputs (attention masks, position ids, the rotary
``position_embeddings``) for itself from the batch shape, the last stage runs the final norm, the head and the
model's own ``loss_function``. Each family's recipe sits in its own module (``gpt2.py``, ``llama.py``, ``vit.py``)
and is registered with its ``ModelFamily`` (``registry.py``); ``hf_hwbp.parallel.arch.recipe_for`` looks it up.
This module holds the recipe type and the pieces the causal-LM recipes share. ``tests/test_parallel.py`` checks
every recipe against the model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

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
def causal_lm_loss(loss_function, config, logits: Tensor, labels: Tensor, num_items_in_batch) -> Tensor:
    """The model's causal-LM loss (labels shifted inside, -100 ignored): the mean over this batch's tokens, or their
    sum over ``num_items_in_batch`` (micro-batches, gradient accumulation)."""
    return loss_function(logits, labels, vocab_size=config.vocab_size, num_items_in_batch=num_items_in_batch)


def count_shifted_tokens(labels: Tensor) -> int:
    return int((labels[..., 1:] != -100).sum())


def token_stream_shape(config, input_ids: Tensor) -> tuple[int, ...]:
    return (*input_ids.shape, config.hidden_size)


def lm_logits(head: Mapping[str, nn.Module], h: Tensor) -> Tensor:
    return head["lm_head"](head["norm"](h))


__all__ = [
    "BIDIRECTIONAL",
    "CAUSAL",
    "SLIDING",
    "StageRecipe",
    "causal_lm_loss",
    "count_shifted_tokens",
    "lm_logits",
    "token_stream_shape",
]
