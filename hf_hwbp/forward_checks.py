"""What the patch checks in a training forward, before any gradient exists (docs/algorithm.md, "What is a residual
stack"): settings that the stack cannot run, activation checkpointing that Highway-BP cannot follow, and, once per
stack, that each block's recorded graph reads nothing it did not receive (a gradient that could not be routed).

Each check raises ``HighwayBPError`` with the way out; none of them runs in the backward.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .config import HighwayConfig
from .discovery import Stack
from .errors import HighwayBPError, UnsupportedModelError


def check_stack_settings(stack: Stack, config: HighwayConfig) -> None:
    """Settings this stack cannot run with."""
    if stack.residual_gate is not None and config.group_size > 1:
        raise UnsupportedModelError(
            f"Highway-BP: the layers of {stack.path} have a gated residual path (act(h + g(h))), which is defined "
            "per layer: group_size must be 1 for this model (set_highway_config(model, group_size=1))."
        )


# ----- activation checkpointing -------------------------------------------------------------------------------
def is_checkpointed(layer: nn.Module) -> bool:
    """Whether transformers checkpoints this layer's forward (``gradient_checkpointing_enable`` /
    ``activation_checkpointing_enable`` set it)."""
    return bool(getattr(layer, "gradient_checkpointing", False))


def preserves_rng_state(layer: nn.Module) -> bool:
    """False when the layer's checkpoint function says ``preserve_rng_state=False`` (a ``functools.partial`` of
    ``torch.utils.checkpoint.checkpoint``, as transformers builds it); True otherwise (torch's default)."""
    func = getattr(layer, "_gradient_checkpointing_func", None)
    return not (isinstance(func, functools.partial) and func.keywords.get("preserve_rng_state") is False)


def refuse_reentrant_checkpointing(stack: Stack, i: int, enclosing: str | None = None) -> None:
    """Layer ``i`` ran its forward with gradients disabled inside a training forward: the reentrant form of
    activation checkpointing (or a ``torch.no_grad()`` around the layer's computation), of the layer itself or of
    the ``enclosing`` module transformers checkpoints."""
    where = f", inside {enclosing}, which is checkpointed" if enclosing else ""
    raise HighwayBPError(
        f"Highway-BP: layer {i} of {stack.path} ran its forward with gradients disabled inside a training forward"
        f"{where}: "
        "that is reentrant activation checkpointing (use_reentrant=True), which recomputes the layer inside its own "
        "backward and accumulates parameter gradients behind autograd's back, so Highway-BP cannot run its "
        "iterations through it. Highway-BP supports the non-reentrant form (each Highway iteration then recomputes "
        "the layer, as backprop's single sweep does): call model.activation_checkpointing_enable() (non-reentrant by "
        "default), or model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}); "
        "or model.activation_checkpointing_disable()."
    )


def rng_state(device: torch.device) -> Tensor:
    """The state of the random generator that ``device``'s operations draw from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def check_rng(stack: Stack, i: int, device: torch.device, before: Tensor) -> None:
    """A layer checkpointed without preserving the RNG state may not draw random numbers."""
    if not torch.equal(before, rng_state(device)):
        raise HighwayBPError(
            f"Highway-BP: layer {i} of {stack.path} draws random numbers (dropout) and is checkpointed with "
            "preserve_rng_state=False: each of the k + 1 Highway sweeps would recompute it with new dropout "
            "masks, none of them the forward's. Keep preserve_rng_state=True (the default) in the "
            "checkpointing kwargs, or turn dropout off."
        )


# ----- the recorded graph of a block ----------------------------------------------------------------------------
def check_block_graph(
    stack: Stack, block: int, output: Tensor, sequence_start: int, allowed: set[int], stops: set[int]
) -> None:
    """Block ``block``'s recorded local graph (from ``output`` down) reads no tensor that requires grad from outside
    its layers without receiving it as an argument: its gradient would be lost. ``allowed``: ids of the tensors
    it may read as leaves (its parameters, its input and side-input leaves); ``stops``: ids of nodes where the walk
    ends (the stack input's alias); ``sequence_start``: autograd's sequence number when the block began."""
    pending, seen = [output.grad_fn], {}
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen or id(node) in stops:
            continue
        seen[id(node)] = node  # holding the node keeps its id unique during the walk
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in allowed and isinstance(variable, nn.Parameter):
                raise HighwayBPError(
                    f"Highway-BP: block {block} of {stack.path} reads a parameter ({tuple(variable.shape)}) that is "
                    "neither one of its layers' parameters nor passed to it as an argument, so its gradient cannot "
                    "be routed. Pass it to the layer as an argument, or register it in the layer; or call "
                    "unpatch_model(model)."
                )
            continue
        if node._sequence_nr() < sequence_start:
            raise HighwayBPError(
                f"Highway-BP: block {block} of {stack.path} reads a tensor that requires grad, computed outside its "
                f"layers ({node.name()}), without receiving it as an argument, so its gradient cannot be routed. "
                "Pass it to the layer as an argument; or call unpatch_model(model)."
            )
        pending.extend(fn for fn, _ in node.next_functions)


def reaches(tensor: Tensor, leaf: Tensor) -> bool:
    """Whether ``tensor``'s autograd graph reaches the leaf ``leaf``."""
    pending, seen = [tensor.grad_fn], {}
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        if getattr(node, "variable", None) is leaf:
            return True
        pending.extend(fn for fn, _ in node.next_functions)
    return False
