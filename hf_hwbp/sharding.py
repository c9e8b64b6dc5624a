"""The patch's interface for engines that shard parameters (FSDP2, DeepSpeed ZeRO-3): a parameter lifecycle.

Highway-BP differentiates each block's recorded local graph k + 1 times from the stack entry's backward, in an
order of its own (every block once per sweep, top to bottom, then the parameter step). An engine that keeps a
block's parameters sharded outside its forward and backward must gather them around each of those calls and
reduce their gradients once the last one ran. It does so through a ``ParameterLifecycle`` that it installs on the
patch (``HighwayPatch.lifecycle``); the patch calls ``connect(root, patch)`` at the start of every training forward
so that the engine can install (or check) one before any layer runs. Nothing here knows FSDP or DeepSpeed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from torch import Tensor, nn


class ParameterLifecycle:
    """When a stack's block parameters exist and where their gradients go during the Highway backward.

    The patch calls these methods; the defaults are what a model whose parameters are ordinary tensors needs
    (nothing to gather, gradients delivered by autograd). ``stack_index`` is the stack's index in
    ``HighwayPatch.hooked_stacks``; ``blocks`` and ``block`` are 0-based block indices of one recorded forward
    (block 0 is the first block the forward recorded: frozen layers at the bottom of a stack are not recorded).

    * ``block_parameters(stack_index, layers)``: the trainable parameter tensors these layers' forward reads, each
      once (under FSDP2: the unsharded ones). The patch calls it when a recorded forward starts (the parameters the
      stack entry returns gradients for) and for the forward's graph check (which parameters a block may read).
    * ``gathered(stack_index, blocks, prefetch)``: a context manager entered around every autograd call through
      the recorded local graphs of ``blocks`` in the Highway backward: each input-VJP of every sweep, the VJP of
      the side outputs, the routing of tensors a block hands on, the parameter VJP. ``prefetch`` names the blocks
      the next such call will need (a hint; it may be empty).
    * ``take_parameter_grads(stack_index, block, params, grads)``: called with block ``block``'s parameters (as
      ``block_parameters`` gives them for its layers) and their gradients right after its parameter VJP, when
      ``per_block_parameter_step`` is True. Returns what autograd should still deliver to those parameters, in the
      same order: ``None`` where the lifecycle consumed a gradient itself (accumulated and reduced it).
    * ``backward_finished(stack_index)``: the Highway backward of one recorded forward of that stack is over
      (also when it raised): nothing of its local graphs is differentiated again.
    * ``per_block_parameter_step``: False (the default) computes the parameter VJP of all blocks in one autograd
      call under ``gathered(stack_index, all blocks)``, and ``take_parameter_grads`` is not called; True computes
      it block by block, from the top, each under ``gathered(stack_index, [j], prefetch=[j - 1])`` and followed by
      ``take_parameter_grads``, so that one block's parameters are gathered at a time.

    Every method may raise ``HighwayBPError``; the gradients are then not delivered.
    """

    per_block_parameter_step: bool = False

    def block_parameters(self, stack_index: int, layers: Sequence[nn.Module]) -> list[Tensor]:
        return trainable_parameters(layers)

    def gathered(self, stack_index: int, blocks: Sequence[int], prefetch: Sequence[int] = ()) -> AbstractContextManager:
        return contextlib.nullcontext()

    def take_parameter_grads(
        self, stack_index: int, block: int, params: list[Tensor], grads: list[Tensor | None]
    ) -> list[Tensor | None]:
        return grads

    def backward_finished(self, stack_index: int) -> None:
        return None


class PatchSeam(Protocol):
    """What an engine that shards parameters may use of the patch (``hf_hwbp.patching.HighwayPatch``)."""

    lifecycle: ParameterLifecycle  # set it to install a lifecycle; unpatch_model resets it

    @property
    def hooked_stacks(self) -> tuple:
        """Every stack the patch hooks (``Stack``: ``.path``, ``.layers``), indexed as ``stack_index``."""

    def is_recording(self, stack_index: int) -> bool:
        """Whether a training forward of that stack is being recorded for Highway-BP right now."""

    def reinstall_hooks(self) -> None:
        """Put the patch's layer and root hooks in front of every other hook again."""


def trainable_parameters(layers: Sequence[nn.Module]) -> list[Tensor]:
    """The parameters of ``layers`` that require grad, each once, in ``parameters()`` order."""
    seen: dict[int, Tensor] = {}
    for layer in layers:
        for p in layer.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def connect(root: nn.Module, patch: PatchSeam) -> None:
    """Called by the patch at the start of every training forward of the patched model ``root``, before any layer
    runs: the place where an engine that shards parameters installs its ``ParameterLifecycle`` on ``patch`` (or
    refuses the set-up with ``HighwayBPError``). It must be cheap when nothing changed. Without a process group
    nothing is sharded: nothing to do. With one, ``hf_hwbp.fsdp.connect`` decides (FSDP2; what cannot run)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from . import fsdp  # the engines' side, imported once a process group exists (it imports this module)

    fsdp.connect(root, patch)


__all__ = ["ParameterLifecycle", "PatchSeam", "connect", "trainable_parameters"]
