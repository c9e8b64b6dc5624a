"""Checks and the tied-gradient exchange shared by every layer-parallel runner (Highway-BP and the baselines)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .comm import Comm


def check_world(num_stages: int | None, world_size: int) -> int:
    """The number of stages: ``num_stages`` if it matches the process group's size (None: that size)."""
    if num_stages is None:
        return world_size
    if num_stages != world_size:
        raise ValueError(
            f"Layer-parallel training runs one stage per process: {num_stages} stages were requested but the "
            f"process group has {world_size} processes. Launch with `torchrun --nproc_per_node {num_stages}` or "
            f"request num_stages={world_size}."
        )
    return num_stages


def tie_group(
    has_tied: bool, ends: tuple[int, int], group: dist.ProcessGroup | None
) -> tuple[bool, dist.ProcessGroup | None]:
    """Whether tied gradients cross ranks, and the group of the two ranks ``ends`` (first and last stage) that
    sums them. Every rank must call this (``new_group`` is collective)."""
    first, last = ends
    if not has_tied or first == last:
        return False, None
    if dist.get_world_size(group) == 2:
        return True, group
    ranks = [first, last]
    if group is not None:
        ranks = [dist.get_global_rank(group, r) for r in ranks]
    return True, dist.new_group(ranks)


class TiedGrads:
    """Sums the gradient of parameters split between the first and the last stage (GPT-2's tied embedding).

    Use ``with TiedGrads(params, comm, tie_group(...)):`` around one step: it sets the tied gradients aside,
    lets the step produce this rank's part alone, sums the parts of both ranks and adds back what was there
    before (so gradient accumulation keeps working). ``params``: this rank's tied parameters (empty on ranks
    that hold neither end).
    """

    def __init__(self, params: list[nn.Parameter], comm: Comm, tie: tuple[bool, dist.ProcessGroup | None]):
        tied, group = tie
        self.params = list(params) if tied else []
        self.comm, self.group = comm, group
        self.saved: list[Tensor | None] = []

    def __enter__(self):
        self.saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            return False
        for p, before in zip(self.params, self.saved):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            self.comm.all_reduce_sum(grad, self.group)
            p.grad = grad if before is None else before + grad
        return False
