"""The engine's recorded stack for one pipeline stage and one micro-batch: scan across ranks, fused final VJPs.

``StageStack`` is ``hf_hwbp.engine.RecordedStack`` over the blocks one stage holds (global block numbering, so
the engine's reuse rule applies unchanged) with two additions (the runtime interleaves several micro-batches'
recursions by advancing the engine's ``recursion_steps`` generator):

- its scan is a :class:`ChainScan`: the reverse cumulative sum of the whole stack, where the part above this
  stage arrives as one tensor from the stage above and the part from here on leaves as one tensor to the stage
  below;
- a block whose delta is final (the engine is about to store its VJP for reuse) gets its input and parameter
  VJPs in one backward pass, so its parameter step later costs nothing: the zero-bubble split in reverse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..engine import RecordedStack, ResidualScan


class ChainScan(ResidualScan):
    """Reverse cumulative sum across pipeline stages.

    Args:
        exchange: ``exchange(total) -> above``: given the sum of this stage's inflow, return the sum of the
            inflow of every stage above (zeros on the last stage) and pass ``above + total`` to the stage below.
        all_reduce: sums the adaptive-stop statistics over every stage (in place, returns the tensor).
    """

    def __init__(self, exchange: Callable[[Tensor], Tensor], all_reduce: Callable[[Tensor], Tensor]):
        self.exchange = exchange
        self._all_reduce = all_reduce

    def __call__(self, top: Tensor, inflow: list[Tensor | None]) -> list[Tensor]:
        present = [u for u in inflow if u is not None]
        total = torch.zeros_like(top) if not present else sum(present[1:], present[0])
        return super().__call__(top + self.exchange(total), inflow)

    def all_reduce(self, stats: Tensor) -> Tensor:
        return self._all_reduce(stats)


class StageStack(RecordedStack):
    """One stage's recorded blocks for one micro-batch (see the module docstring).

    Args:
        inputs, outputs: the leaf input and the output of each local block, bottom to top.
        d: dloss/dh_N for this micro-batch (the stack output's gradient, from the last stage).
        block_params: the trainable parameters of each local block.
        scan: the cross-rank scan.
        first_block, num_blocks, need_input_grad: as in ``RecordedStack``.
        fuse: compute the parameter VJP of a block together with its final input VJP.
    """

    def __init__(
        self,
        inputs: Sequence[Tensor],
        outputs: Sequence[Tensor],
        d: Tensor,
        block_params: Sequence[Sequence[Tensor]],
        *,
        scan: ChainScan,
        first_block: int,
        num_blocks: int,
        need_input_grad: bool = True,
        fuse: bool = True,
    ):
        super().__init__(
            inputs,
            outputs,
            d,
            None,
            scan=scan,
            need_input_grad=need_input_grad,
            first_block=first_block,
            num_blocks=num_blocks,
        )
        self.block_params = [list(p) for p in block_params]
        self.fuse = fuse
        self.fused: set[int] = set()  # local blocks whose parameter VJP already ran with their final delta
        self._fresh_until = num_blocks

    def inflow(self, delta: list[Tensor], fresh_until: int, release: bool) -> list[Tensor | None]:
        self._fresh_until = fresh_until
        return super().inflow(delta, fresh_until, release)

    def scan(self, inflow: list[Tensor | None] | None) -> list[Tensor]:
        if inflow is None:  # delta^(0) = d everywhere: no stage has an inflow yet, nothing crosses ranks
            return ResidualScan()(self.d, [None] * len(self.outputs))
        return super().scan(inflow)

    def input_vjp(self, local_index: int, grad: Tensor) -> Tensor:
        params = self.block_params[local_index]
        final = self.first_block + local_index + 1 >= self._fresh_until  # the engine stores this VJP for reuse
        if not (self.fuse and final and params):
            return super().input_vjp(local_index, grad)
        x = self.inputs[local_index]
        x.grad = None
        torch.autograd.backward(self.outputs[local_index], grad, inputs=[x, *params])  # frees the block's graph
        self.fused.add(local_index)
        full, x.grad = x.grad, None
        return full - grad

    def weight_vjp(self, local_index: int, grad: Tensor) -> None:
        """Accumulate the block's parameter gradients for output gradient ``grad`` (frees its graph)."""
        if local_index not in self.fused and self.block_params[local_index]:
            torch.autograd.backward(self.outputs[local_index], grad, inputs=self.block_params[local_index])
        self.outputs[local_index] = None
        self.inputs[local_index] = None
